"""Tasks for replacement.py that import nothing heavy (``_torch_tasks`` has the same
functions in a module that imports torch)."""

import os
import time


def crash() -> None:
    os._exit(1)


def ident(x):
    return x


def pid_after(seconds: float) -> int:
    """Hold the worker a little (so that each of N tasks gets a worker of its own),
    then say which worker ran the task."""
    time.sleep(seconds)
    return os.getpid()
