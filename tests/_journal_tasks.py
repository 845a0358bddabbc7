"""The task of tests/test_journal.py, importable by workers without importing pytest."""

import os
import time

SIDE_ENV = "PGX_JOURNAL_TEST_SIDE"
T = 30.0  # a safety net against hangs, never a performance bound


def task(x):
    """Record that ``x`` ran, then: square it, or raise / crash / hang / wait."""
    side = os.environ.get(SIDE_ENV)
    if side:
        with open(side, "a") as f:
            f.write(f"{x!r}\n")
    if x == "raise":
        raise ValueError("bad input")
    if x == "crash":
        os._exit(3)
    if x == "hang":
        time.sleep(60)
    if isinstance(x, tuple) and x[0] == "big":
        return bytes(range(256)) * (x[1] // 256)
    if isinstance(x, str) and x.startswith("gate"):
        deadline = time.monotonic() + T
        while not os.path.exists(f"{side}.{x}") and time.monotonic() < deadline:
            time.sleep(0.01)
        return x
    return x * x


def exit_task(x):
    """Record that ``x`` ran; "exit" raises SystemExit (a BaseException)."""
    side = os.environ.get(SIDE_ENV)
    if side:
        with open(side, "a") as f:
            f.write(f"{x!r}\n")
    if x == "exit":
        raise SystemExit(7)
    return x * x


class PidStamp:
    """Remembers which process pickled it: a re-pickle in the parent shows."""

    def __init__(self, value, pickled_by=None):
        self.value = value
        self.pickled_by = pickled_by

    def __reduce__(self):
        return (PidStamp, (self.value, os.getpid()))


def stamp(x):
    return PidStamp(x)


def pair(x):
    """A fresh mutable result: [x, x]."""
    return [x, x]


def array(n):
    import numpy as np

    return np.arange(n, dtype=np.int64)


def make_scaler(k):
    """A factory: each call makes a different function of one qualname."""

    def scale(x):
        return x * k

    return scale


class Scale:
    """A callable class: two instances compute different things."""

    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return x * self.k

    def apply(self, x):
        return x * self.k


def scaled(x, k=2, *, plus=0):
    return x * k + plus


def mul(a, b):
    return a * b


IN_PARENT = False  # the test sets it in its own process; a worker's copy stays False


class WorkerOnly:
    """Pickles in a worker, refuses to in the test's process."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        if IN_PARENT:
            raise TypeError("WorkerOnly does not pickle here")
        return (WorkerOnly, (self.value,))


def worker_only(x):
    return WorkerOnly(x) if x == "odd" else x


class Fickle:
    """Pickles differently each time (a counter in its state)."""

    n = 0

    def __reduce__(self):
        Fickle.n += 1
        return (Fickle, (), {"n": Fickle.n})


def make_fickle():
    state = Fickle()

    def fickle(x):
        return (x, state is not None)

    return fickle


def _serialized(f):
    """A decorator whose closure holds a lock (which has no stable form)."""
    import functools
    import threading

    lock = threading.Lock()

    @functools.wraps(f)
    def wrapper(x):
        with lock:
            return f(x)

    return wrapper


@_serialized
def guarded(x):
    return x + 100
