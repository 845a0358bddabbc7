"""pgexecutor: a ProcessPoolExecutor whose workers each lead their own process group.

A task that hangs, crashes or blows its memory budget is killed together with
everything it spawned; only its own future fails, and the pool keeps going.
"""

import logging as _logging

from ._frontend import ExecutorOptions
from ._heartbeat import heartbeat
from ._manager import TaskInfo
from ._settings import AutoTimeout
from .errors import (
    JournalError,
    MemoryLimitError,
    QuarantinedError,
    RemoteTaskError,
    TaskPicklingError,
    TaskStalledError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerInitializerError,
    WorkerProtocolError,
)
from .executor import ProcessGroupExecutor, close_idle_templates, spawned_groups, task_info

__all__ = [
    "ProcessGroupExecutor",
    "ExecutorOptions",
    "TaskTimeoutError",
    "TaskStalledError",
    "AutoTimeout",
    "heartbeat",
    "WorkerCrashedError",
    "MemoryLimitError",
    "WorkerInitializerError",
    "WorkerProtocolError",
    "RemoteTaskError",
    "TaskPicklingError",
    "TaskInfo",
    "task_info",
    "spawned_groups",
    "close_idle_templates",
    "Journal",
    "JournalError",
    "QuarantinedError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Journal on first use: a worker imports this package, and need not import sqlite3.
    if name == "Journal":
        from .journal import Journal

        return Journal
    raise AttributeError(f"module 'pgexecutor' has no attribute {name!r}")


# A library logs, the application decides where it goes: without this, Python's
# last-resort handler would print every timeout warning to stderr.
_logging.getLogger("pgexecutor").addHandler(_logging.NullHandler())
