"""Task functions of benchmarks/soak.py (a module of their own, so that every pool's
workers import them by name, fork or spawn alike)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time

KINDS = ("ok", "hang_py", "hang_c", "segfault", "exit", "tree")
HANGS = ("hang_py", "hang_c", "tree")  # end only when the pool kills them at the timeout


def run(kind: str, i: int) -> int:
    """One soak task: ``ok`` returns ``i * 2`` at once; the others misbehave."""
    if kind == "ok":
        return i * 2
    if kind == "hang_py":
        time.sleep(1000)
    elif kind == "hang_c":
        sum(range(10**12))  # one C call holding the GIL: no Python code runs
    elif kind == "segfault":
        ctypes.string_at(0)
    elif kind == "exit":
        os._exit(3)
    elif kind == "tree":
        child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
        with open(os.path.join(os.environ["PGX_SOAK_DIR"], str(child.pid)), "w") as f:
            f.write(str(_create_time(child.pid)))
        time.sleep(1000)
    raise AssertionError(kind)


def _create_time(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()
