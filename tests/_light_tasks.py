"""Task functions for tests with short task_timeouts.

A fresh worker imports a task function's module before it can run it, and that
import counts toward the task's time when it does not finish within it (a hung import
must time out too). A test module imports pytest, psutil and more: on a loaded machine
that alone can take a second. This module imports nothing heavy, so the tests that
expect quick tasks to finish within a short task_timeout do not depend on the load.
"""

from __future__ import annotations

import os
import time

MiB = 1 << 20


def square(x):
    return x * x


def add(a, b):
    return a + b


def maybe_fail(i):
    if i == 1:
        raise ValueError("one")
    if i == 2:
        os._exit(2)
    if i == 3:
        time.sleep(1000)
    return i


def allocate_and_sleep(nbytes):
    data = b"\x01" * nbytes  # noqa: F841
    time.sleep(1000)


def outcome_task(action):
    """One task per outcome, for progress counts."""
    if action == "ok":
        return "ok"
    if action == "raise":
        raise ValueError("failed on purpose")
    if action == "hang":
        time.sleep(1000)
    if action == "crash":
        os._exit(5)
    if action == "memory":
        allocate_and_sleep(300 * MiB)
    raise AssertionError(action)
