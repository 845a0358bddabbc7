"""Dask distributed: every task of a Dask worker runs in a process group of its own.

::

    from dask.distributed import Client
    from pgexecutor.dask import ProcessGroupPlugin

    client = Client(...)
    client.register_plugin(ProcessGroupPlugin(task_timeout=600, max_memory="8 GiB"))

    with dask.annotate(task_timeout=5):          # per task, overrides the plugin's
        fut = client.submit(mesh, geometry)
    fut.result()  # TaskTimeoutError, WorkerCrashedError, MemoryLimitError, ...

How it plugs in. A Dask worker runs a task by handing ``distributed.worker.
_run_task_simple(task, data, delay)`` to ``worker.executors["default"]`` (any executor
that is not a ThreadPoolExecutor gets exactly that call). The plugin installs
:class:`DaskProcessGroupExecutor` there. It runs ``_run_task_simple`` itself, in one of
its threads, Dask's own bookkeeping untouched, but with the task replaced by a stand-in
whose call sends the real task to a :class:`~pgexecutor.ProcessGroupExecutor` sized to
the worker's threads and waits. So timings, results and errors travel Dask's normal
path, and the error a client sees is the executor's own (TaskTimeoutError, ...).

Cancelling. Dask cannot stop a running task: ``client.cancel`` moves it to the
"cancelled" state and its thread stays busy until the function returns. The plugin
watches the worker's transitions; when an executing task is released it kills that
task's process group, and the stand-in raises ``distributed.Reschedule``, which the
worker state machine turns into "released" (or, if the scheduler asked for the key
again in the meantime, into a reschedule). The slot is free at once.

Dask settings. None are required. The executor starts its workers as fresh interpreters
(``posix_spawn``), which a daemonic Dask worker may do, so ``distributed.worker.daemon``
can stay at its default; ``mp_context`` (fork/forkserver) is deliberately not offered,
as multiprocessing refuses to start children from a daemonic process. Task processes
are not daemonic, so tasks may start their own pools. Dask's memory limits
(``distributed.worker.memory.*``) measure the Dask worker process only, not the task
processes: use ``max_memory`` for those. A ``retries=`` given to ``client.submit`` is
Dask's own (the scheduler reruns a failed task, timeouts included); the plugin's
``retries`` reruns a task whose process died or timed out, on the same worker.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from typing import Any

import dask.utils
from distributed import Reschedule, WorkerPlugin

from ._settings import check_grace, check_memory, check_retries, check_timeout
from .executor import ProcessGroupExecutor

try:
    from dask._task_spec import GraphNode, Task
    from distributed.worker import _run_task_simple
except ImportError as exc:  # pragma: no cover - depends on the installed version
    raise ImportError(
        "pgexecutor.dask needs dask and distributed >= 2024.11 (the task-spec "
        "releases): pip install 'pgexecutor[dask]'"
    ) from exc

__all__ = ["ProcessGroupPlugin", "DaskProcessGroupExecutor"]

logger = logging.getLogger("pgexecutor")



def _timeout(value: Any, name: str = "task_timeout") -> float | None:
    if isinstance(value, str):
        value = dask.utils.parse_timedelta(value)
    return check_timeout(value, name)


def _memory(value: Any) -> int | None:
    if isinstance(value, str):
        value = dask.utils.parse_bytes(value)
    return check_memory(value)


class ProcessGroupPlugin(WorkerPlugin):
    """Run every task of each Dask worker in a process group of its own.

    Register it once with ``client.register_plugin(ProcessGroupPlugin(...))``; workers
    that join later get it too. On each worker it installs a
    :class:`DaskProcessGroupExecutor` as the ``"default"`` executor, with as many task
    processes as the worker has threads.

    ``task_timeout`` (seconds, or a string such as ``"10 min"``), ``max_memory`` (bytes,
    or ``"4 GiB"``), ``kill_grace`` and ``retries`` mean what they mean for
    :class:`~pgexecutor.ProcessGroupExecutor`; ``task_timeout`` and ``max_memory`` can be
    set per task with ``dask.annotate(task_timeout=..., max_memory=...)`` (``None``
    lifts the limit for those tasks). ``max_tasks_per_child`` recycles task processes.

    The worker's original thread pool stays available as the executor named
    ``threads_executor`` (``"threads"``; ``None`` to drop it): tasks annotated with
    ``dask.annotate(executor="threads")`` run in threads, without a process hop and
    without the guarantees. When the plugin is removed the original executor is the
    default again.
    """

    name = "pgexecutor"
    idempotent = False

    def __init__(
        self,
        task_timeout: float | str | None = None,
        max_memory: int | str | None = None,
        kill_grace: float = 1.0,
        retries: int = 0,
        *,
        max_tasks_per_child: int | None = None,
        threads_executor: str | None = "threads",
    ) -> None:
        self.task_timeout = _timeout(task_timeout)
        self.max_memory = _memory(max_memory)
        self.kill_grace = check_grace(kill_grace)
        self.retries = check_retries(retries)
        self.max_tasks_per_child = max_tasks_per_child
        self.threads_executor = threads_executor
        self._executor: DaskProcessGroupExecutor | None = None
        self._previous: Executor | None = None
        self._added_alias = False

    def __getstate__(self) -> dict[str, Any]:
        # Only the settings travel to the workers, never a live executor.
        state = self.__dict__.copy()
        state.update(_executor=None, _previous=None, _added_alias=False)
        return state

    def setup(self, worker: Any) -> None:
        ex = DaskProcessGroupExecutor(
            worker,
            max_workers=worker.state.nthreads,
            task_timeout=self.task_timeout,
            max_memory=self.max_memory,
            kill_grace=self.kill_grace,
            retries=self.retries,
            max_tasks_per_child=self.max_tasks_per_child,
        )
        self._executor = ex
        self._previous = worker.executors.get("default")
        worker.executors["default"] = ex
        name = self.threads_executor
        if name and self._previous is not None and name not in worker.executors:
            worker.executors[name] = self._previous
            self._added_alias = True
        ex.warm_up()
        logger.info(
            "pgexecutor: Dask worker %s runs its tasks in %d process group(s) "
            "(task_timeout=%s, max_memory=%s)",
            getattr(worker, "address", "?"), worker.state.nthreads,
            self.task_timeout, self.max_memory,
        )

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        # Called in the worker's event loop on every task transition. An executing task
        # that is released (client.cancel, the scheduler forgetting it, the worker
        # losing it) enters "cancelled" while its thread keeps running: kill it now.
        if self._executor is not None and start in ("executing", "long-running") and finish in (
            "released", "cancelled"
        ):
            self._executor.cancel_key(key)

    async def teardown(self, worker: Any) -> None:
        ex = self._executor
        if ex is None:
            return
        self._executor = None
        if worker.executors.get("default") is ex:
            if self._previous is not None:
                worker.executors["default"] = self._previous
            else:
                del worker.executors["default"]
        if self._added_alias and self.threads_executor:
            if worker.executors.get(self.threads_executor) is self._previous:
                del worker.executors[self.threads_executor]
        status = str(getattr(worker, "status", ""))
        closing = any(word in status for word in ("closing", "closed", "failed"))
        closing = closing and "gracefully" not in status
        if closing:
            # The worker is going away: nobody waits for these tasks any more.
            await asyncio.to_thread(ex.terminate_workers)
        else:
            # Only the plugin is removed: running tasks finish, new ones use threads.
            ex.shutdown(wait=False)


class _TaskInProcessGroup:
    """Stands in for a Dask task in ``_run_task_simple``: calling it runs the real
    task in the process pool and waits (in a thread of DaskProcessGroupExecutor)."""

    __slots__ = ("owner", "task", "key", "timeout", "max_memory")

    def __init__(
        self, owner: DaskProcessGroupExecutor, task: Any, timeout: float | None,
        max_memory: int | None,
    ) -> None:
        self.owner = owner
        self.task = task
        self.key = task.key
        self.timeout = timeout
        self.max_memory = max_memory

    def __call__(self, values: Any = ()) -> Any:
        return self.owner._run_in_group(self, values)

    def __repr__(self) -> str:
        return f"<{self.task!r} in a process group>"


class DaskProcessGroupExecutor(Executor):
    """The executor :class:`ProcessGroupPlugin` installs on a Dask worker.

    Dask tasks (``_run_task_simple`` calls) are run as described in the module
    docstring; any other callable handed to it (``worker.executor.submit(f)``) runs in
    the process pool with the plugin's defaults. ``pool`` is the underlying
    :class:`~pgexecutor.ProcessGroupExecutor`.
    """

    def __init__(
        self,
        worker: Any,
        max_workers: int,
        *,
        task_timeout: float | None = None,
        max_memory: int | None = None,
        kill_grace: float = 1.0,
        retries: int = 0,
        max_tasks_per_child: int | None = None,
    ) -> None:
        self._worker = worker
        self.max_workers = max_workers
        self.pool = ProcessGroupExecutor(
            max_workers=max_workers,
            task_timeout=task_timeout,
            max_memory=max_memory,
            kill_grace=kill_grace,
            retries=retries,
            max_tasks_per_child=max_tasks_per_child,
            # Unpickling a task needs dask's task spec: import it when a task process
            # starts, not on the clock of the task's timeout.
            initializer=importlib.import_module,
            initargs=("dask._task_spec",),
        )
        # One waiting thread per running task. Dask runs at most ``nthreads`` tasks at
        # once (a cancelled one still counts until its thread returns); the spare
        # threads only cover calls made outside Dask's task path.
        self._threads = ThreadPoolExecutor(
            max_workers + 2, thread_name_prefix="pgexecutor-dask"
        )
        self._lock = threading.Lock()
        self._running: dict[Any, Future[Any]] = {}
        self._cancelled: set[Any] = set()

    # ------------------------------------------------------------ the Executor API

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if fn is _run_task_simple and args and isinstance(args[0], GraphNode):
            task = args[0]
            if not isinstance(task, Task):
                # Data and aliases only move values around: no process hop for them.
                return self._threads.submit(fn, *args, **kwargs)
            # This runs in the worker's event loop (Worker.execute -> run_in_executor),
            # so reading the task's state here is safe.
            timeout, max_memory = self._settings(task.key)
            with self._lock:
                self._cancelled.discard(task.key)  # a new run of the key starts clean
            stand_in = _TaskInProcessGroup(self, task, timeout, max_memory)
            return self._threads.submit(fn, stand_in, *args[1:], **kwargs)
        return self.pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        self._threads.shutdown(wait=wait, cancel_futures=cancel_futures)

    def terminate_workers(self) -> None:
        """Kill every task's group (SIGTERM, SIGKILL after kill_grace) and shut down."""
        self.pool.terminate_workers()
        self._threads.shutdown(wait=True)

    # ------------------------------------------------------------ per task

    def _settings(self, key: Any) -> tuple[float | None, int | None]:
        timeout = self.pool.task_settings.timeout
        max_memory = self.pool.task_settings.max_memory
        ts = self._worker.state.tasks.get(key)
        annotations = (getattr(ts, "annotations", None) or {}) if ts is not None else {}
        if "task_timeout" in annotations:
            timeout = _timeout(annotations["task_timeout"])
        if "max_memory" in annotations:
            max_memory = _memory(annotations["max_memory"])
        return timeout, max_memory

    def _run_in_group(self, stand_in: _TaskInProcessGroup, values: Any) -> Any:
        key = stand_in.key
        with self._lock:
            if key in self._cancelled:  # released before it even started
                self._cancelled.discard(key)
                raise Reschedule()
        opts = self.pool.options(task_timeout=stand_in.timeout, max_memory=stand_in.max_memory)
        # Pickling (task and its inputs) happens here, outside the lock: the event loop
        # takes the same lock in cancel_key and must not wait for a large pickle.
        fut = opts.submit(stand_in.task, values)
        with self._lock:
            self._running[key] = fut
            cancelled = key in self._cancelled
        try:
            if cancelled:
                self.pool.kill_task(fut)
            try:
                return fut.result()
            except CancelledError:
                # Killed because Dask released the task (see cancel_key). Reschedule
                # is the one outcome every state of a cancelled task accepts: released
                # if nobody wants it, rescheduled if the scheduler asked for it again.
                raise Reschedule() from None
        finally:
            with self._lock:
                if self._running.get(key) is fut:
                    del self._running[key]
                self._cancelled.discard(key)

    def cancel_key(self, key: Any) -> None:
        """Kill the process group running the task ``key`` (from the event loop)."""
        with self._lock:
            fut = self._running.get(key)
            if fut is None:
                # Not in the pool yet (its thread has not submitted it): it will see this.
                self._cancelled.add(key)
                return
        logger.info("pgexecutor: Dask released running task %r; killing its group", key)
        self.pool.kill_task(fut)

    def warm_up(self) -> None:
        """Start the task processes now rather than with the first tasks."""
        for _ in range(self.max_workers):
            self.pool.submit(int)
