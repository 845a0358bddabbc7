"""pgexecutor: a ProcessPoolExecutor whose workers each lead their own process group.

A task that hangs, crashes or blows its memory budget is killed together with
everything it spawned; only its own future fails, and the pool keeps going.
"""

from ._manager import TaskInfo
from .errors import (
    MemoryLimitError,
    RemoteTaskError,
    TaskPicklingError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerInitializerError,
)
from .executor import ExecutorOptions, ProcessGroupExecutor, task_info

__all__ = [
    "ProcessGroupExecutor",
    "ExecutorOptions",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "MemoryLimitError",
    "WorkerInitializerError",
    "RemoteTaskError",
    "TaskPicklingError",
    "TaskInfo",
    "task_info",
]
__version__ = "0.1.0"
