"""The task of tests/test_report.py: imports nothing heavy (a fresh worker imports this
module within the task's time limit; see _light_tasks)."""

from __future__ import annotations

import os
import time

MiB = 1 << 20
#: The error of "raise": user text that must reach the HTML page escaped.
NASTY = "<script>alert('boom')</script> & \"quoted\""


def work(x):
    """An int: its square (after x milliseconds); else the fault that ``x`` names."""
    if x == "raise":
        raise ValueError(NASTY)
    if x == "hang":
        time.sleep(1000)
    if x == "crash":
        os._exit(3)
    if x == "memory":
        data = b"\x01" * (300 * MiB)  # noqa: F841
        time.sleep(1000)
    time.sleep(x / 1000)
    return x * x
