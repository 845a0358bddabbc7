"""The host process of a Ray worker's tasks (see pgexecutor/ray.py).

This module runs inside a pgexecutor worker process started by a Ray worker (the
"host"); it must not import ray. The host keeps its own one-process
ProcessGroupExecutor, whose worker runs the user's call in a process group of its own
and whose guardian is a *grandchild* of the Ray worker. That is the point: when a Ray
worker exits in an orderly way (ray.cancel(force=True), ray.shutdown(), the job
ending) Ray SIGKILLs its direct children (``RAY_kill_child_processes_on_worker_exit``,
on by default), which would take a guardian that is its child down with it and leave
the task's own children running. The host and its guardian are those direct children;
the host's guardian outlives them, sees the host gone and kills the task's group.
"""

from __future__ import annotations

import threading
from typing import Any

from . import _protocol as proto
from ._frontend import ExecutorOptions
from ._settings import TaskSettings
from .executor import ProcessGroupExecutor

_pools: dict[float, ProcessGroupExecutor] = {}
_lock = threading.Lock()


def pool_for(kill_grace: float) -> ProcessGroupExecutor:
    """This process's one-worker pool for ``kill_grace`` (made on first use, then kept)."""
    with _lock:
        pool = _pools.get(kill_grace)
        if pool is None:
            pool = _pools[kill_grace] = make_pool(kill_grace)
        return pool


def make_pool(kill_grace: float) -> ProcessGroupExecutor:
    """A one-worker pool whose worker is always this process's *direct* child.

    ``mp_context="fresh"``, not the default template start: a worker forked from a
    template is the template's child, so after its first replacement the host would
    be a grandchild of the Ray worker. Ray's orderly exit SIGKILLs direct children
    only (the template and the guardian), and the host, orphaned, would run its task
    on; the chain Ray worker -> host -> task process is what the guardians rely on.
    """
    return ProcessGroupExecutor(max_workers=1, kill_grace=kill_grace, mp_context="fresh")


def call_pickled(payload: bytes) -> Any:
    """In the task process: unpickle the driver's call and make it."""
    try:
        fn, args, kwargs = proto.loads(payload)
    except BaseException as exc:
        raise proto.mark_pickling_fault(exc, proto.UNPICKLE_ARGUMENTS) from None
    return fn(*args, **kwargs)


def host_call(payload: bytes, settings: TaskSettings, kill_grace: float) -> Any:
    """In the host: run the call in the task process with the task's limits, and wait.

    TaskTimeoutError, WorkerCrashedError, MemoryLimitError or the call's own exception
    is raised from here as itself, and travels back to the Ray worker the same way.
    """
    view = ExecutorOptions(pool_for(kill_grace), settings)
    return view.submit(call_pickled, payload).result()
