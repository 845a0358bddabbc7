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


def call_setsid():
    try:
        os.setsid()
    except PermissionError as exc:
        return ["PermissionError", exc.errno, str(exc)]
    return ["ok", os.getsid(0), os.getpid()]


def setsid_in_forked_child():
    """os.fork(), then setsid() in the child: that child is no group leader, so it
    gets a session of its own; it reports whether it leads it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.write(w, b"ok" if os.getsid(0) == os.getpid() else b"no")
        except BaseException as exc:  # noqa: BLE001
            os.write(w, repr(exc).encode()[:200])
        os._exit(0)
    os.close(w)
    data = os.read(r, 4096)
    os.close(r)
    os.waitpid(pid, 0)
    return data.decode()


def getpid_task(_i):
    return os.getpid()


def exit_unless_first(path):
    """An initializer: the first worker to run it starts; every later one dies
    before it is ready (os._exit, so no INIT_FAILED: a start that failed)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        os._exit(3)


def short_sleep(i):
    time.sleep(0.05)
    return os.getpid()


def meet(mine, other):
    """Say it began (``mine``), then wait for its partner (``other``): two of these
    end only if they run side by side, on two workers."""
    touch(mine)
    return wait_path(other)
