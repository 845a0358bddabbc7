"""Task functions for test_resources (a light module: a fresh worker imports it fast)."""

from __future__ import annotations

import os
import time


def noop(x):
    return x


def wait_path(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def touch(path):
    with open(path, "w"):
        pass
    return path


def gated(started, gate, value):
    """Say it began (``started``), then wait for ``gate`` (30 s at most)."""
    touch(started)
    return value if wait_path(gate) else "gate-timeout"


def hang_forever(*_args):
    """An initializer (or task) that never returns."""
    while True:
        time.sleep(60)


def mark_init(directory):
    """An initializer that records which worker ran it."""
    touch(os.path.join(directory, str(os.getpid())))


def hang_unless_first(path):
    """An initializer that returns in the first worker to run it and hangs in the rest."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        hang_forever()
