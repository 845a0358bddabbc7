"""Task functions for tests/test_dask.py and tests/test_ray.py.

Only the standard library and psutil (a pgexecutor dependency) here: a task process
that has to import this module (when the function travels by reference) must not pay
for pytest or a cluster package on the clock of a short task_timeout. Tree-spawning tasks write a JSON report of every
process they started, as ``[pid, create_time]`` pairs, so the tests can check with
psutil that exactly those processes are gone (a pid alone may be recycled).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

# A shell that starts a grandchild and waits: task -> sh -> sleep.
_TREE = "sleep 300 & echo $!; wait"


def _spawn_tree(path: str) -> dict:
    child = subprocess.Popen(
        ["/bin/sh", "-c", _TREE], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    grandchild = int(child.stdout.readline())
    me = os.getpid()
    parent = psutil.Process(me).parent()
    grandparent = parent.parent() if parent is not None else None
    report = {
        "pid": me,
        "pgid": os.getpgid(0),
        "ppid": os.getppid(),
        "ancestors": [p.pid for p in (parent, grandparent) if p is not None],
        "procs": [[p, psutil.Process(p).create_time()] for p in (me, child.pid, grandchild)],
    }
    tmp = f"{path}.tmp{me}"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, path)
    return report


def spawn_tree_and_hang(path: str, once: bool = False) -> str:
    """Start task -> sh -> sleep, report the pids to ``path``, then hang.

    With ``once``, a second run (the scheduler rerunning it elsewhere) returns at once.
    """
    if once and os.path.exists(path):
        return "second run"
    _spawn_tree(path)
    time.sleep(300)
    return "woke up"


def spawn_tree_and_crash(path: str, how: str) -> None:
    """Start a tree, report it, then die: ``exit`` (os._exit(3)) or ``kill`` (SIGKILL)."""
    _spawn_tree(path)
    if how == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)


def spawn_tree_and_signal_ancestors(path: str, sig: int, generations=(1,)) -> str:
    """Start a tree, report it, then send ``sig`` to ancestors (1: the parent, 2: the
    grandparent; under RayExecutor those are the host and the Ray worker), and hang."""
    report = _spawn_tree(path)
    for g in generations:
        os.kill(report["ancestors"][g - 1], sig)
    time.sleep(300)
    return "woke up"


def hold_memory(nbytes: int, seconds: float = 60.0) -> int:
    """Allocate and touch ``nbytes``, then keep them for ``seconds``."""
    block = bytearray(nbytes)
    for i in range(0, nbytes, 4096):
        block[i] = 1
    time.sleep(seconds)
    return len(block)


def where() -> dict:
    """Which process ran this: pid, pgid, parent pid."""
    return {"pid": os.getpid(), "pgid": os.getpgid(0), "ppid": os.getppid()}


def sleep_and_report(seconds: float) -> dict:
    """Sleep, then say where and when (monotonic clocks differ between processes, so
    wall time) it ran."""
    start = time.time()
    time.sleep(seconds)
    return {"pid": os.getpid(), "start": start, "stop": time.time()}


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def python_executable() -> str:
    return sys.executable
