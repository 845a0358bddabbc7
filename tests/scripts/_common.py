"""Shared bits of the containment drivers (run as scripts, never collected by pytest)."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil


def restore_sigint() -> None:
    """Make Ctrl-C raise KeyboardInterrupt here, however the test run was started.

    A job a shell starts in the background (``cmd &``, a CI runner's non-interactive
    shell) inherits SIGINT and SIGQUIT ignored, and a disposition ignored at exec stays
    ignored: Python then installs no KeyboardInterrupt handler, so the Ctrl-C our test
    sends (and the SIGINT that is meant to kill us) would simply be dropped. Every
    driver calls this first, so that it behaves as a program started from a terminal.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)


def live_members(pgid: int) -> list[int]:
    """Non-zombie pids whose process group is ``pgid``."""
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except OSError:
            continue
    return out


def report(report_dir: str, name: str, expect_members: int) -> None:
    """Write {pid, pgid, members} once the task's group holds ``expect_members`` others."""
    me, pgid = os.getpid(), os.getpgid(0)
    deadline = time.monotonic() + 30
    while True:
        members = [p for p in live_members(pgid) if p != me]
        if len(members) >= expect_members or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    tmp = os.path.join(report_dir, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"name": name, "pid": me, "pgid": pgid, "members": members}, f)
    os.rename(tmp, os.path.join(report_dir, name + ".json"))


def wait_reports(report_dir: str, n: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        names = sorted(f for f in os.listdir(report_dir) if f.endswith(".json"))
        if len(names) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out = []
    for name in names:
        with open(os.path.join(report_dir, name)) as f:
            out.append(json.load(f))
    return out
