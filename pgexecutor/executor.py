"""``ProcessGroupExecutor``: the public face; everything stateful is in ``_manager``.

This module only validates, pickles and enqueues. Pickling happens here, in the
caller's thread, so an unpicklable argument fails exactly its own future at once and
the manager never sees it.
"""

from __future__ import annotations

# The "noqa: F401" modules are what the parent's threads use later (the worker imports
# them lazily, for a cheap start). They are imported here, at ``import pgexecutor``,
# and not lazily by the manager thread: if any thread of the user's forks while another
# thread is inside an import, that module's import lock stays held forever in the
# child, and the child's first executor would hang on it.
import fcntl  # noqa: F401
import itertools
import mmap  # noqa: F401
import multiprocessing
import multiprocessing.connection  # noqa: F401
import os
import socket  # noqa: F401
import sys
import threading
import time
import traceback  # noqa: F401
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any, Literal

import cloudpickle  # noqa: F401
import psutil  # noqa: F401
from tblib import pickling_support  # noqa: F401

from . import _manager, _progress
from . import _protocol as proto
from ._manager import Manager, ManagerConfig, TaskInfo, WorkItem
from ._worker import run_chunk

_UNSET: Any = object()


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _check_timeout(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None")
    return value


def _check_memory(value: int | None) -> int | None:
    if value is None:
        return None
    value = int(value)
    if value <= 0:
        raise ValueError("max_memory must be a positive number of bytes or None")
    return value


def _check_retries(value: int) -> int:
    value = int(value)
    if value < 0:
        raise ValueError("retries must be >= 0")
    return value


def task_info(future: Future[Any]) -> TaskInfo | None:
    """What happened to a finished task: duration, worker pid, attempts, peak memory.

    Returns None for a future that did not come from a ProcessGroupExecutor or has
    not finished yet.
    """
    return getattr(future, "_pgexecutor_info", None)


class ProcessGroupExecutor(Executor):
    """A ``ProcessPoolExecutor`` whose workers each lead their own process group.

    A task that runs past ``task_timeout``, crashes its worker, or (with
    ``max_memory``) lets its group grow past the budget fails on its own with
    :class:`TaskTimeoutError`, :class:`WorkerCrashedError` or
    :class:`MemoryLimitError`; the worker's *whole group* (every process the task
    spawned) is killed, SIGTERM then SIGKILL after ``kill_grace`` seconds, and a fresh
    worker takes its place. The pool is never broken.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        task_timeout: float | None = None,
        kill_grace: float = 1.0,
        max_memory: int | None = None,
        retries: int = 0,
    ) -> None:
        if os.name != "posix":
            raise OSError("ProcessGroupExecutor needs POSIX process groups (Linux, macOS)")
        if max_workers is None:
            max_workers = _default_workers()
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if isinstance(mp_context, str):
            mp_context = multiprocessing.get_context(mp_context)
        kill_grace = float(kill_grace)
        if kill_grace < 0:
            raise ValueError("kill_grace must be >= 0")
        self._max_workers = max_workers
        self._mp_context = mp_context
        self._task_timeout = _check_timeout(task_timeout, "task_timeout")
        self._max_memory = _check_memory(max_memory)
        self._retries = _check_retries(retries)
        self._kill_grace = kill_grace
        init_payload = proto.dumps(
            {
                "sys_path": list(sys.path),
                "initializer": (
                    proto.dumps((initializer, tuple(initargs))) if initializer else None
                ),
                "authkey": bytes(multiprocessing.current_process().authkey),
            }
        )
        self._manager = Manager(
            ManagerConfig(
                max_workers=max_workers,
                mp_context=mp_context,
                init_payload=init_payload,
                max_tasks_per_child=max_tasks_per_child,
                kill_grace=kill_grace,
            )
        )
        self._shutdown_lock = threading.Lock()
        self._failed_in_caller = 0  # futures failed in submit() (arguments would not pickle)
        self._shutdown = False
        self._started = False
        _manager.track(self._manager)
        # If the executor is dropped without shutdown, finish its work and clean up,
        # as shutdown(wait=False) would. The finalizer must not reference self.
        weakref.finalize(self, self._manager.post, ("shutdown", False))

    # ------------------------------------------------------------------ submit

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(fn, args, kwargs, self._task_timeout, self._max_memory, self._retries)

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        max_memory: int | None,
        retries: int,
    ) -> Future[Any]:
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _manager._global_shutdown:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            if not self._started:
                self._started = True
                self._manager.start()
            try:
                payload = proto.dumps_task((fn, args, kwargs))
            except BaseException as exc:
                self._manager.stats.submitted += 1
                # Counted apart from the manager's ``failed``: two threads doing += on
                # one attribute could lose an increment.
                self._failed_in_caller += 1
                return _unpicklable_arguments(exc)
            self._manager.stats.submitted += 1
            fut: Future[Any] = Future()
            item = WorkItem(fut, payload, timeout, max_memory, retries)
            if not self._manager.try_dispatch(item):
                self._manager.post(item)
            return fut

    # ------------------------------------------------------------------ map

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        return_exceptions: bool = False,
        progress: Any = False,
        journal: Any = None,
    ) -> Iterator[Any]:
        """Like ``Executor.map``; ``return_exceptions=True`` yields errors in place.

        With ``chunksize > 1`` each chunk is one task (its ``task_timeout`` covers the
        whole chunk), yet an item's exception still lands at that item's position.

        ``progress=True`` shows a tqdm bar (``pip install 'pgexecutor[progress]'``)
        that advances as tasks finish, in any order, and counts ``ok``, ``failed``,
        ``timeout``, ``crashed`` and ``memory`` as they happen; it closes when the
        iteration ends. Pass your own ``tqdm(...)`` (or any object with ``update(n)``
        and ``set_postfix(mapping, refresh=...)``) to choose where and how it draws;
        that bar is yours to close.

        ``journal="sweep.db"`` (or a :class:`pgexecutor.Journal`) records each input's
        outcome in an SQLite file; the same map run again yields the recorded results
        and runs only the rest (see ``pgexecutor/journal.py``).
        """
        return self._map(
            fn, iterables, timeout, chunksize, return_exceptions,
            self._task_timeout, self._max_memory, self._retries, progress, journal,
        )

    def _map(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        return_exceptions: bool,
        task_timeout: float | None,
        max_memory: int | None,
        retries: int,
        progress: Any = False,
        journal: Any = None,
    ) -> Iterator[Any]:
        def submit(f: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
            return self._submit(f, args, {}, task_timeout, max_memory, retries)

        if journal is not None:
            return _journal_map(
                submit, fn, iterables, timeout, chunksize, return_exceptions, progress, journal
            )
        return _map_via(submit, fn, iterables, timeout, chunksize, return_exceptions, progress)

    # ------------------------------------------------------------------ options

    def options(
        self,
        *,
        task_timeout: float | None = _UNSET,
        retries: int = _UNSET,
        max_memory: int | None = _UNSET,
    ) -> ExecutorOptions:
        """A light view whose ``submit``/``map`` use these settings per task.

        The executor's own defaults stay as they are::

            slow = ex.options(task_timeout=600, retries=2)
            fut = slow.submit(mesh, geometry)
        """
        return _options_view(
            self, (self._task_timeout, self._max_memory, self._retries),
            task_timeout, max_memory, retries,
        )

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            self._shutdown = True
            if not self._started:
                # No task was ever submitted: no thread, no worker; release the fds.
                self._manager._close()
                self._manager.finished.set()
                return
            self._manager.post(("shutdown", cancel_futures))
        if wait:
            self._join()

    def _join(self) -> None:
        try:
            self._manager.finished.wait()
        except KeyboardInterrupt:
            # Ctrl-C while waiting for tasks: stop them all rather than wait more.
            self._manager.post(("terminate", True, "interrupted while shutting down"))
            self._manager.finished.wait(timeout=self._kill_grace + 5.0)
            raise

    def _terminate(self, hard: bool, reason: str) -> None:
        with self._shutdown_lock:
            if not self._started:
                self._shutdown = True
                self._manager._close()
                self._manager.finished.set()
                return
            self._shutdown = True
            self._manager.post(("terminate", hard, reason))
        self._join()

    def terminate_workers(self) -> None:
        """SIGTERM every worker group (SIGKILL after ``kill_grace``) and shut down.

        Running futures fail with WorkerCrashedError, queued ones are cancelled.
        """
        self._terminate(False, "terminated by terminate_workers()")

    def kill_workers(self) -> None:
        """SIGKILL every worker group at once and shut down (see terminate_workers)."""
        self._terminate(True, "killed by kill_workers()")

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> Literal[False]:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._terminate(False, "the with block was interrupted (KeyboardInterrupt)")
            return False
        self.shutdown(wait=True)
        return False

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, int]:
        """Counters: submitted, completed, failed, cancelled, timed_out, crashed,
        memory_killed, retried, workers_started, workers_killed."""
        counters = self._manager.stats.snapshot()
        counters["failed"] += self._failed_in_caller
        return counters

    def worker_pids(self) -> list[int]:
        """Pids (each equal to its group id) of the workers alive right now."""
        return [w.pid for w in list(self._manager.workers.values())]

    def _kill_task(self, future: Future[Any]) -> None:
        """Stop ``future``'s task for good: if it runs, its worker's whole group is
        killed (SIGTERM, SIGKILL after ``kill_grace``) and replaced; if it waits, it is
        dropped. The future ends cancelled. For integrations (Dask's cancel, Ray)."""
        with self._shutdown_lock:
            if not self._started:
                return
        self._manager.post(("cancel", future))


class ExecutorOptions:
    """What :meth:`ProcessGroupExecutor.options` returns: per-task settings."""

    def __init__(
        self,
        executor: ProcessGroupExecutor,
        task_timeout: float | None,
        max_memory: int | None,
        retries: int,
    ) -> None:
        self._executor = executor
        self.task_timeout = task_timeout
        self.max_memory = max_memory
        self.retries = retries

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._executor._submit(
            fn, args, kwargs, self.task_timeout, self.max_memory, self.retries
        )

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        return_exceptions: bool = False,
        progress: Any = False,
        journal: Any = None,
    ) -> Iterator[Any]:
        """``ProcessGroupExecutor.map`` with this view's settings (``progress`` and
        ``journal`` too)."""
        return self._executor._map(
            fn, iterables, timeout, chunksize, return_exceptions,
            self.task_timeout, self.max_memory, self.retries, progress, journal,
        )

    def options(
        self,
        *,
        task_timeout: float | None = _UNSET,
        retries: int = _UNSET,
        max_memory: int | None = _UNSET,
    ) -> ExecutorOptions:
        """A view on this view: unset settings keep this view's values."""
        return _options_view(
            self._executor, (self.task_timeout, self.max_memory, self.retries),
            task_timeout, max_memory, retries,
        )


def _options_view(
    executor: Any,
    base: tuple[float | None, int | None, int],
    task_timeout: Any,
    max_memory: Any,
    retries: Any,
) -> ExecutorOptions:
    """``options()`` of every executor and view: each setting left ``_UNSET`` keeps its
    ``base`` value (task_timeout, max_memory, retries); each one given is checked."""
    base_timeout, base_memory, base_retries = base
    return ExecutorOptions(
        executor,
        base_timeout if task_timeout is _UNSET else _check_timeout(task_timeout, "task_timeout"),
        base_memory if max_memory is _UNSET else _check_memory(max_memory),
        base_retries if retries is _UNSET else _check_retries(retries),
    )


def _journal_map(*args: Any) -> Iterator[Any]:
    """``map(..., journal=...)``: imported on use, so workers never import sqlite3."""
    from .journal import journal_map

    return journal_map(*args)


def _unpicklable_arguments(exc: BaseException) -> Future[Any]:
    """The future ``submit()`` returns when a task's arguments do not pickle: already
    failed, so the caller learns it at once and nothing reaches a worker."""
    fut: Future[Any] = Future()
    fut.set_running_or_notify_cancel()
    fut.set_exception(proto.pickling_error("arguments", "pickling them in the caller failed", exc))
    return fut


def _map_via(
    submit: Callable[[Callable[..., Any], tuple[Any, ...]], Future[Any]],
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    timeout: float | None,
    chunksize: int,
    return_exceptions: bool,
    progress: Any,
) -> Iterator[Any]:
    """``map`` of every executor, on top of its ``submit(fn, args)``: one task per item
    or, with ``chunksize > 1``, one ``run_chunk`` task per chunk. Everything is
    submitted before the first result is awaited, as ``Executor.map`` does."""
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    make_bar = _progress.resolve(progress)  # a missing tqdm fails before any submit
    end_time = None if timeout is None else timeout + time.monotonic()
    args_iter = zip(*iterables, strict=False)
    sizes: list[int] | None = None
    if chunksize == 1:
        fs = [submit(fn, args) for args in args_iter]
    else:
        fs, sizes = [], []
        while chunk := list(itertools.islice(args_iter, chunksize)):
            sizes.append(len(chunk))
            fs.append(submit(run_chunk, (fn, chunk)))
    results = _yield_results(fs, end_time, return_exceptions, chunked=sizes is not None, sizes=sizes)
    if make_bar is None:
        return results
    return _progress.watch(make_bar, fs, sizes, results)


def _result_or_exception(fut: Future[Any], timeout: float | None) -> tuple[bool, Any]:
    try:
        return True, fut.result(timeout)
    except FuturesTimeoutError:
        if not fut.done():
            raise  # map's own timeout: the standard meaning
        return False, fut.exception()
    except Exception as exc:
        return False, exc


def _pop_result(
    fs: list[Future[Any]], end_time: float | None, return_exceptions: bool
) -> tuple[bool, Any]:
    """Take the next future off ``fs`` and wait for it (map's timeout applies)."""
    fut = fs.pop()
    timeout = None if end_time is None else max(0.0, end_time - time.monotonic())
    if return_exceptions:
        return _result_or_exception(fut, timeout)
    return True, fut.result(timeout)


def _yield_results(
    fs: list[Future[Any]],
    end_time: float | None,
    return_exceptions: bool,
    chunked: bool,
    sizes: list[int] | None = None,
) -> Iterator[Any]:
    """Yield results in order; on exit (even early) cancel what is still pending.

    No local variable holds a result across a ``yield``: a suspended generator's frame
    would keep the last value alive for as long as the caller holds the iterator.
    """
    fs.reverse()  # pop() from the end is O(1) and drops our reference as we go
    if sizes is not None:
        sizes.reverse()
    try:
        while fs:
            if not chunked:
                yield _pop_result(fs, end_time, return_exceptions)[1]
                continue
            assert sizes is not None
            size = sizes.pop()
            ok, out = _pop_result(fs, end_time, return_exceptions)
            if not ok:
                # The whole chunk failed (its worker hung or died): every item of it
                # gets that error, so positions stay aligned with the inputs.
                for _ in range(size):
                    yield out
                continue
            values, errors = out  # see run_chunk
            del out
            values.reverse()
            if errors is None:
                while values:
                    yield values.pop()
                continue
            count = len(values)
            while values:
                index = count - len(values)
                if index not in errors:
                    yield values.pop()
                    continue
                values.pop()
                if return_exceptions:
                    yield proto.load_exception(errors.pop(index))
                    continue
                raise proto.load_exception(errors.pop(index))
    finally:
        for fut in fs:
            fut.cancel()
