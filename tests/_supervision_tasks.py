"""Task functions for the supervision tests (imports nothing heavy: tests with
short limits must not depend on how long a worker takes to import a test module)."""

from __future__ import annotations

import os
import re
import signal
import time


def nap(seconds):
    """Sleep; every call is the same task function for learned limits."""
    time.sleep(seconds)
    return seconds


def other_nap(seconds):
    time.sleep(seconds)
    return seconds


def spin_with_every_signal_blocked():
    """Spin in C (the regex engine backtracking exponentially, GIL held) with every
    catchable signal blocked: no faulthandler dump can ever come, no SIGTERM acts."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
    re.match(r"(a+)+$", "a" * 64 + "b")


def getpid():
    return os.getpid()
