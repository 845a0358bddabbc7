"""Tasks for replacement.py whose module imports torch (as a real task module would)."""

import os

import torch  # noqa: F401  (the point: a worker must have imported it to run these)


def crash() -> None:
    os._exit(1)


def ident(x):
    return x


def pid_after(seconds: float) -> int:
    """Hold the worker a little, so that each of N tasks gets a worker of its own."""
    import time

    time.sleep(seconds)
    return os.getpid()
