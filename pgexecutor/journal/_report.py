"""The report: what a journal says happened, for ``python -m pgexecutor journal PATH``.

``summarize`` reads a journal into plain data (``--json`` prints it), ``format_summary``
makes the text, ``unlock`` drops the lock of a map that died on another host. Every
storage failure is a JournalError that names its cause (locked, damaged, ...): the
command line prints it as one line.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from typing import Any

from ..errors import JournalError
from . import _store as store
from ._records import KILLS, OUTCOMES


def summarize(path: str | os.PathLike[str], top: int = 10) -> dict[str, Any]:
    """What a journal says happened, as plain data (``python -m pgexecutor journal
    PATH --json`` prints it): counts per outcome, the ``top`` slowest inputs, every
    failed or quarantined input, and the lock's owner if a map holds it."""
    path = os.fsdecode(os.fspath(path))
    conn = store.open_for_reading(path)
    try:
        return _summarize(conn, path, top)
    except sqlite3.Error as exc:
        raise store.explain(path, "reading it", exc) from exc
    finally:
        conn.close()


def _summarize(conn: sqlite3.Connection, path: str, top: int) -> dict[str, Any]:
    meta = dict(conn.execute("SELECT name, value FROM meta"))
    quarantine_after = int(meta.get("quarantine_after") or 2)
    counts = dict.fromkeys((*OUTCOMES, "quarantined"), 0)
    failed = []
    for key, fn, inp, outcome, error, duration, attempts, pid, kills, failures, runs, fin in (
        conn.execute(
            "SELECT key, fn, input, outcome, error, duration, attempts, pid, kills, "
            "failures, runs, finished FROM inputs ORDER BY finished"
        )
    ):
        status = outcome
        if outcome in KILLS and (kills or 0) >= quarantine_after:
            status = "quarantined"
        counts[status] = counts.get(status, 0) + 1
        if status != "ok":
            failed.append({
                "key": key, "input": inp, "status": status, "outcome": outcome,
                "error": error, "kills": kills, "failures": json.loads(failures or "[]"),
                "duration": duration, "attempts": attempts, "pid": pid, "runs": runs,
                "finished": fin, "fn": fn,
            })
    slowest = [
        {"key": k, "input": i, "outcome": o, "duration": d, "attempts": a, "pid": p}
        for k, i, o, d, a, p in conn.execute(
            "SELECT key, input, outcome, duration, attempts, pid FROM inputs "
            "WHERE duration IS NOT NULL ORDER BY duration DESC LIMIT ?",
            (top,),
        )
    ]
    owner = json.loads(meta["owner"]) if meta.get("owner") else None
    if owner is not None:
        here = owner.get("host") == socket.gethostname()
        owner = {k: owner.get(k) for k in ("pid", "host", "since")} | {
            "alive": store.owner_alive(owner) if here else None  # None: cannot tell
        }
    return {
        "path": path,
        "format": meta.get("format"),
        "version": int(meta.get("version") or 0),
        "fn": meta.get("fn"),
        "inputs": sum(counts.values()),
        "counts": counts,
        "quarantine_after": quarantine_after,
        "owner": owner,
        "slowest": slowest,
        "failed": failed,
    }


def format_summary(s: dict[str, Any]) -> str:
    """The text ``python -m pgexecutor journal PATH`` prints for ``summarize()``'s dict."""
    lines = [f"journal {s['path']}: {s['inputs']} inputs, function {s['fn'] or '?'}"]
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
    lines.append(
        "  " + "  ".join(f"{name} {n}" for name, n in s["counts"].items())
        + f"   (quarantine after {s['quarantine_after']} kills)"
    )
    if s["slowest"]:
        lines.append("")
        lines.append("slowest:")
        for r in s["slowest"]:
            lines.append(
                f"  {r['duration']:9.3f} s  {r['outcome']:<8} {_clip(r['key'], 32):<32}  "
                f"{_clip(r['input'] or '', 60)}"
            )
    if s["failed"]:
        lines.append("")
        lines.append(f"failed or quarantined ({len(s['failed'])}):")
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
