"""The report: what a journal says happened, for ``python -m pgexecutor journal PATH``.

``summarize`` reads a journal into plain data (``--json`` prints it), ``format_summary``
makes the text (``_html`` makes the page of ``--html`` from ``read``'s rows), ``unlock``
drops the lock of a map that died on another host. The counts are those
``pgexecutor.counters`` defines. Every storage failure is a JournalError that names its
cause (locked, damaged, ...): the command line prints it as one line.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from typing import Any

from ..counters import CANCELLED, CAUSES, FAILED, OK, empty_counts
from ..errors import JournalError
from . import _store as store
from ._records import KILLS

#: Files SQLite keeps beside a journal in WAL mode: its write-ahead log and that
#: log's index. They are part of the journal (the log may hold committed outcomes not
#: yet copied into the main file): copy, move or delete them together with it.
COMPANIONS = ("-wal", "-shm")
COMPANIONS_NOTE = (
    "SQLite's write-ahead log and its index, part of the journal: copy, move or "
    "delete them together with it"
)


class Row:
    """One input's row, as the report and the HTML page read it."""

    __slots__ = (
        "key", "fn", "input", "outcome", "status", "error", "duration", "attempts",
        "pid", "kills", "failures", "runs", "finished",
    )

    def __init__(self, values: tuple[Any, ...], quarantine_after: int) -> None:
        (self.key, self.fn, self.input, self.outcome, self.error, self.duration,
         self.attempts, self.pid, self.kills, failures, self.runs, self.finished) = values
        self.failures: list[dict[str, Any]] = json.loads(failures or "[]")
        self.kills = self.kills or 0
        self.status: str = status_of(self.outcome, self.kills, quarantine_after)


def status_of(outcome: str, kills: int, quarantine_after: int) -> str:
    """The outcome, or ``quarantined`` for a kill repeated ``quarantine_after`` times
    (later maps do not run it again)."""
    return "quarantined" if outcome in KILLS and kills >= quarantine_after else outcome


def summarize(path: str | os.PathLike[str], top: int = 10) -> dict[str, Any]:
    """What a journal says happened, as plain data (``python -m pgexecutor journal
    PATH --json`` prints it): counts (``pgexecutor.counters`` defines them), the
    ``top`` slowest inputs, every failed input, the lock's owner if a map holds it,
    and the files that make up the journal."""
    return read(path, top)[0]


def read(path: str | os.PathLike[str], top: int = 10) -> tuple[dict[str, Any], list[Row]]:
    """``summarize``'s dict and every row, oldest outcome first (the HTML report)."""
    path = os.fsdecode(os.fspath(path))
    conn = store.open_for_reading(path)
    try:
        summary, rows = _read(conn, path, top)
    except sqlite3.Error as exc:
        raise store.explain(path, "reading it", exc) from exc
    finally:
        conn.close()
    # Looked at once our connection is closed: what the user sees beside the file.
    summary["files"] = [path] + [path + s for s in COMPANIONS if os.path.exists(path + s)]
    return summary, rows


def _read(conn: sqlite3.Connection, path: str, top: int) -> tuple[dict[str, Any], list[Row]]:
    meta = dict(conn.execute("SELECT name, value FROM meta"))
    quarantine_after = int(meta.get("quarantine_after") or 2)
    counts = empty_counts()
    del counts[CANCELLED]  # a journal records no cancelled task
    counts["quarantined"] = 0
    rows = [
        Row(values, quarantine_after)
        for values in conn.execute(
            "SELECT key, fn, input, outcome, error, duration, attempts, pid, kills, "
            "failures, runs, finished FROM inputs ORDER BY finished"
        )
    ]
    failed = []
    for r in rows:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
        if r.outcome == OK:
            continue
        counts[FAILED] += 1
        if r.status == "quarantined":
            counts["quarantined"] += 1
        failed.append({
            "key": r.key, "input": r.input, "status": r.status, "outcome": r.outcome,
            "error": r.error, "kills": r.kills, "failures": r.failures,
            "duration": r.duration, "attempts": r.attempts, "pid": r.pid, "runs": r.runs,
            "finished": r.finished, "fn": r.fn,
        })
    timed = sorted((r for r in rows if r.duration is not None), key=lambda r: -r.duration)
    slowest = [
        {"key": r.key, "input": r.input, "status": r.status, "outcome": r.outcome,
         "duration": r.duration, "attempts": r.attempts, "pid": r.pid}
        for r in timed[: max(top, 0)]
    ]
    owner = json.loads(meta["owner"]) if meta.get("owner") else None
    if owner is not None:
        here = owner.get("host") == socket.gethostname()
        owner = {k: owner.get(k) for k in ("pid", "host", "since")} | {
            "alive": store.owner_alive(owner) if here else None  # None: cannot tell
        }
    summary = {
        "path": path,
        "format": meta.get("format"),
        "version": int(meta.get("version") or 0),
        "fn": meta.get("fn"),
        "inputs": len(rows),
        "counts": counts,
        "quarantine_after": quarantine_after,
        "owner": owner,
        "slowest": slowest,
        "failed": failed,
    }
    return summary, rows


def format_counts(counts: dict[str, int], quarantine_after: int) -> str:
    """``ok 2  failed 3 (error 1, timeout 1, crashed 1, memory 0; quarantined 1)``."""
    causes = ", ".join(f"{c} {counts.get(c, 0)}" for c in CAUSES)
    return (
        f"ok {counts.get(OK, 0)}  failed {counts.get(FAILED, 0)} "
        f"({causes}; quarantined {counts.get('quarantined', 0)}, after "
        f"{quarantine_after} kills)"
    )


def format_summary(s: dict[str, Any]) -> str:
    """The text ``python -m pgexecutor journal PATH`` prints for ``summarize()``'s dict."""
    lines = [f"journal {s['path']}: {s['inputs']} inputs, function {s['fn'] or '?'}"]
    beside = s.get("files", [])[1:]
    if beside:
        lines.append(f"  with {', '.join(beside)} beside it: {COMPANIONS_NOTE}")
    owner = s["owner"]
    if owner is None:
        lines.append("  not in use")
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"] or 0))
        state = {
            True: "running",
            False: "dead: a stale lock, the next map takes it over",
            None: "another host: cannot tell if it runs; --unlock if it does not",
        }[owner["alive"]]
        lines.append(f"  in use by pid {owner['pid']} on {owner['host']} since {since} ({state})")
    lines.append("  " + format_counts(s["counts"], s["quarantine_after"]))
    if s["slowest"]:
        lines.append("")
        lines.append("slowest:")
        for r in s["slowest"]:
            lines.append(
                f"  {r['duration']:9.3f} s  {r['status']:<11} {_clip(r['key'], 32):<32}  "
                f"{_clip(r['input'] or '', 60)}"
            )
    if s["failed"]:
        lines.append("")
        lines.append(f"failed ({len(s['failed'])}):")
        for r in s["failed"]:
            lines.append(
                f"  {r['status']:<11} {_clip(r['key'], 32):<32}  {_clip(r['input'] or '', 60)}"
            )
            lines.append(f"      {_clip(r['error'] or '', 160)}")
            if r["kills"]:
                lines.append(
                    f"      killed its worker {r['kills']}x over {r['runs']} run(s): "
                    + ", ".join(str(f.get("outcome")) for f in r["failures"])
                )
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def unlock(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Drop a journal's lock row (``--unlock``); refuse if its owner runs on this host.
    Returns the owner that was removed, or None if the journal was not locked."""
    path = os.fsdecode(os.fspath(path))
    conn = store.open_for_reading(path)
    conn.close()
    try:
        return _unlock(path)
    except sqlite3.Error as exc:
        raise store.explain(path, "unlocking it", exc) from exc


def _unlock(path: str) -> dict[str, Any] | None:
    conn = store.connect(path, busy=store.READ_BUSY_TIMEOUT)
    try:
        row = conn.execute("SELECT value FROM meta WHERE name = 'owner'").fetchone()
        if not row or not row[0]:
            return None
        owner: dict[str, Any] = json.loads(row[0])
        if owner.get("host") == socket.gethostname() and store.owner_alive(owner):
            raise JournalError(
                f"journal {path!r} is in use by a running map ({store.describe_owner(owner)}); "
                "not unlocking it"
            )
        conn.execute("UPDATE meta SET value = NULL WHERE name = 'owner' AND value = ?", row)
        return owner
    finally:
        conn.close()
