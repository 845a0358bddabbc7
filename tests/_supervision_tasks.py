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


def beat_then_hang(beats, every):
    """Call heartbeat() ``beats`` times, ``every`` seconds apart, then hang."""
    from pgexecutor import heartbeat

    for _ in range(beats):
        heartbeat()
        time.sleep(every)
    time.sleep(1000)


def beat_from_a_thread_then_hang(seconds, every):
    import threading

    from pgexecutor import heartbeat

    def beat():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            heartbeat()
            time.sleep(every)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    t.join()
    time.sleep(1000)


def beat_from_a_forked_child(seconds, every, then_hang):
    """The worker itself never beats: a forked child does, for ``seconds``."""
    from pgexecutor import heartbeat

    pid = os.fork()
    if pid == 0:
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                heartbeat()
                time.sleep(every)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    if then_hang:
        time.sleep(1000)
    return "child done"


def never_beats(seconds):
    time.sleep(seconds)
    return "slept"


def spin(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def wait_on_busy_child(seconds):
    """Sleep in the worker while a child (same group) burns CPU."""
    import subprocess
    import sys

    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    subprocess.run([sys.executable, "-c", code], check=True)
    return "child done"


def wait_on_sleeping_grandchild(seconds):
    import subprocess

    subprocess.run(["sh", "-c", f"sleep {seconds}"], check=True)
    return "done"
