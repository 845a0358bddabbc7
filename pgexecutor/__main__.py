"""``python -m pgexecutor journal PATH [--json] [--html FILE] [--top N] [--unlock]``.

Prints what a journaled ``map`` recorded: counts per outcome (as
``pgexecutor.counters`` defines them), the slowest inputs, and each failed input
with its key, input and error; ``--html`` writes the same as a page to look at
(``journal._html``). Exit status 0; 2 when
the journal cannot be read (missing, not a journal, damaged, locked by another
connection, ...: one line on stderr that says which, no traceback); 1 for ``--unlock``
refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import textwrap


def main(argv: list[str] | None = None) -> int:
    from .journal import COMPANIONS_NOTE

    parser = argparse.ArgumentParser(prog="python -m pgexecutor")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "journal",
        help="summarize a map's journal (an SQLite file)",
        description=textwrap.fill(
            "Summarize what a journaled map recorded. A journal is one SQLite file; the "
            f"PATH-wal and PATH-shm files beside it are {COMPANIONS_NOTE}."
        ),
        epilog=_counts_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="the journal file (PATH-wal and PATH-shm belong to it)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--html",
        metavar="FILE",
        help="write a self-contained HTML report (counts, run times, a timeline of the "
        "workers, the slowest and the failed inputs) to FILE",
    )
    p.add_argument("--top", type=int, default=10, help="how many slowest inputs (default 10)")
    p.add_argument(
        "--unlock",
        action="store_true",
        help="drop the lock of a map that died on another host (a dead map's lock on "
        "this host is taken over anyway)",
    )
    args = parser.parse_args(argv)

    from .errors import JournalError
    from .journal import format_summary, summarize, unlock, write_report

    try:
        if args.unlock:
            owner = unlock(args.path)
            print("not locked" if owner is None else f"unlocked (was held by {owner})")
            return 0
        if args.html is not None:
            summary = write_report(args.path, args.html, top=args.top)
        else:
            summary = summarize(args.path, top=args.top)
    except JournalError as exc:
        _error(exc)
        return 1 if args.unlock and "in use" in str(exc) else 2
    except (OSError, sqlite3.Error) as exc:  # what the journal did not foresee: still one line
        _error(f"journal {args.path!r}: {type(exc).__name__}: {exc}")
        return 2
    try:
        if args.html is not None and not args.json:
            print(f"wrote {args.html}: {summary['inputs']} inputs of {summary['fn'] or '?'}")
        elif args.json:
            json.dump(summary, sys.stdout, indent=2, default=str)
            print()
        else:
            print(format_summary(summary))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _counts_help() -> str:
    from .counters import MEANING

    width = max(map(len, MEANING))
    lines = "\n".join(f"  {name:<{width}}  {text}" for name, text in MEANING.items()
                      if name != "cancelled")
    return "Each input counts once, by its latest recorded outcome:\n" + lines


def _error(message: object) -> None:
    text = " ".join(str(message).split())  # one line, whatever the message holds
    print(f"python -m pgexecutor journal: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
