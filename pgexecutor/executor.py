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
import copy
import fcntl  # noqa: F401
import itertools
import math
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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any, Literal

import cloudpickle  # noqa: F401
import psutil  # noqa: F401
from tblib import pickling_support  # noqa: F401

from . import _exit, _process, _progress, _settings
from . import _protocol as proto
from ._future import TaskFuture
from ._mailbox import KillTask, Shutdown, Terminate
from ._manager import Manager, ManagerConfig, TaskInfo, WorkItem
from ._settings import TaskSettings
from ._worker import run_chunk

_UNSET: Any = _settings.UNSET


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# The checks live in _settings; these names are what the integrations import.
_check_timeout = _settings.check_timeout
_check_grace = _settings.check_grace
_check_memory = _settings.check_memory
_check_retries = _settings.check_retries


def spawned_groups() -> frozenset[int]:
    """Every worker process group this process has created, by id (a worker's pid is
    its group's id), for proving that nothing leaked: once the executors that made
    them have shut down, no process may still belong to any of these groups (check
    with ``os.getpgid`` or psutil). Holds the last 100,000."""
    return _process.spawned_pgids()


def task_info(future: Future[Any]) -> TaskInfo | None:
    """What happened to a finished task: duration, worker pid, attempts, peak memory.

    Returns None for a future that did not come from a ProcessGroupExecutor or has
    not finished yet.
    """
    info = getattr(future, "info", None) if isinstance(future, TaskFuture) else None
    return info if isinstance(info, TaskInfo) else getattr(future, "_pgexecutor_info", None)


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
        else:
            max_workers = _settings.integer(max_workers, "max_workers", "a whole number > 0 or None")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if isinstance(mp_context, str):
            mp_context = multiprocessing.get_context(mp_context)
        kill_grace = _check_grace(kill_grace)
        self._max_workers = max_workers
        self._mp_context = mp_context
        self._settings = TaskSettings.checked(task_timeout, max_memory, retries)
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
        self._submitted = 0  # under _shutdown_lock
        self._failed_in_caller = 0  # futures failed in submit() (arguments would not pickle)
        self._shutdown = False
        self._started = False
        # The process whose executor this is: a forked child inherits the object, but
        # not the manager thread, and the workers are the parent's (see _forked).
        self._owner_pid = os.getpid()
        # If the executor is dropped without shutdown, finish its work and clean up,
        # as shutdown(wait=False) would. The finalizer must not reference self.
        weakref.finalize(self, self._manager.post, Shutdown(False))

    # ------------------------------------------------------------------ submit

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(fn, args, kwargs, self._settings)

    @property
    def task_settings(self) -> TaskSettings:
        """The per-task settings of this executor (``options()`` views have theirs):
        ``timeout``, ``max_memory``, ``retries``; frozen and validated."""
        return self._settings

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        settings: TaskSettings,
    ) -> Future[Any]:
        self._refuse_if_forked("submit to")
        self._refuse_if_shut_down()  # before pickling: a closed pool says so first
        # Pickled outside the lock: submitting threads do not wait on each other's
        # pickling (a large argument can take a while).
        try:
            payload: bytes | proto.OOBPayload | None = proto.dumps_task((fn, args, kwargs))
            error: BaseException | None = None
        except BaseException as exc:
            payload, error = None, exc
        with self._shutdown_lock:
            self._refuse_if_shut_down()
            if not self._started:
                self._started = True
                self._manager.start()
            self._submitted += 1
            if payload is None:
                # Counted apart from the manager's ``failed``: two threads doing += on
                # one attribute could lose an increment.
                self._failed_in_caller += 1
                assert error is not None
                return _unpicklable_arguments(error)
            fut = TaskFuture(self._manager.mailbox.note_cancel, self._manager.thread)
            item = WorkItem(fut, payload, settings)
            if not self._manager.try_dispatch(item):
                self._manager.post(item)
            return fut

    def _refuse_if_shut_down(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exit.interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _forked(self) -> bool:
        """True in a child forked from the process that made this executor."""
        return os.getpid() != self._owner_pid

    def _refuse_if_forked(self, action: str) -> None:
        """A forked child must not use its parent's executor: the workers, their
        pipes and the manager thread are the parent's (a task written from here
        would run in the parent's worker, an answer would never come back here)."""
        if self._forked():
            raise RuntimeError(
                f"cannot {action} a ProcessGroupExecutor from a forked child (pid "
                f"{os.getpid()}): it belongs to process {self._owner_pid}; create a new "
                "executor in the child"
            )

    # ------------------------------------------------------------------ map

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
        return_exceptions: bool = False,
        progress: Any = False,
        journal: Any = None,
    ) -> Iterator[Any]:
        """Like ``Executor.map``; ``return_exceptions=True`` yields errors in place.

        With ``chunksize > 1`` each chunk is one task (its ``task_timeout`` covers the
        whole chunk), yet an item's exception still lands at that item's position.

        ``buffersize=N`` (as in Python 3.14) keeps at most N tasks (chunks, with
        ``chunksize > 1``) submitted ahead of the results the caller has taken: the
        inputs are read as the results are consumed, so an endless iterable works in
        bounded memory. ``None`` (the default) reads every input and submits
        everything at once.

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
            fn, iterables, timeout, chunksize, return_exceptions, self._settings, progress, buffersize,
            journal,
        )

    def _map(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        return_exceptions: bool,
        settings: TaskSettings,
        progress: Any = False,
        buffersize: int | None = None,
        journal: Any = None,
    ) -> Iterator[Any]:
        def submit(f: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
            return self._submit(f, args, {}, settings)

        if journal is not None:
            return _journal_map(
                submit, fn, iterables, timeout, chunksize, return_exceptions, progress, buffersize,
                journal,
            )
        return _map_via(
            submit, fn, iterables, timeout, chunksize, return_exceptions, progress, buffersize
        )

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
        return ExecutorOptions(self, self._settings.updated(task_timeout, max_memory, retries))

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ``Executor.shutdown``. In a forked child it does nothing: the executor
        is the parent's (so a ``with`` block that spans a fork ends quietly there).

        From a done-callback (which runs on the manager's thread) ``wait=True``
        cannot wait for that thread: the shutdown begins, then RuntimeError, as
        ProcessPoolExecutor does (its join of its own thread raises).
        """
        if self._forked():
            return
        with self._shutdown_lock:
            self._shutdown = True
            if not self._started:
                # No task was ever submitted: no thread, no worker; release the fds.
                self._manager.close_unstarted()
                return
            self._manager.post(Shutdown(cancel_futures))
        if wait:
            if self._manager.on_manager_thread():
                raise RuntimeError(
                    "shutdown(wait=True) called from a done-callback, which runs on the "
                    "executor's manager thread: it cannot wait for itself. The shutdown "
                    "has begun; call shutdown(wait=False) there"
                )
            self._join()

    def _join(self) -> None:
        try:
            self._manager.finished.wait()
        except KeyboardInterrupt:
            # Ctrl-C while waiting for tasks: stop them all rather than wait more.
            self._manager.post(Terminate(True, "interrupted while shutting down"))
            self._manager.finished.wait(timeout=min(self._kill_grace + 5.0, threading.TIMEOUT_MAX))
            raise

    def _terminate(self, hard: bool, reason: str) -> None:
        self._refuse_if_forked("kill or terminate the workers of")
        with self._shutdown_lock:
            self._shutdown = True
            if not self._started:
                self._manager.close_unstarted()
                return
            self._manager.post(Terminate(hard, reason))
        if not self._manager.on_manager_thread():
            self._join()
        # From a done-callback: the kill is under way; the manager carries it out as
        # soon as the callback returns (it cannot wait for itself).

    def terminate_workers(self) -> None:
        """SIGTERM every worker group (SIGKILL after ``kill_grace``) and shut down.

        Running futures fail with WorkerCrashedError, queued ones are cancelled.
        Returns once every group is gone; from a done-callback (the manager's own
        thread) it returns at once and the groups are signalled right after.
        """
        self._terminate(False, "terminated by terminate_workers()")

    def kill_workers(self) -> None:
        """SIGKILL every worker group at once and shut down (see terminate_workers)."""
        self._terminate(True, "killed by kill_workers()")

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> Literal[False]:
        if self._forked():
            return False  # the parent's executor: nothing of it is ours to stop
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
        with self._shutdown_lock:
            counters["submitted"] = self._submitted
            counters["failed"] += self._failed_in_caller
        return counters

    def worker_pids(self) -> list[int]:
        """Pids (each equal to its group id) of the workers serving this executor:
        starting, ready or busy, or retiring after ``max_tasks_per_child``.

        A worker being killed (timeout, memory limit, cancel, terminate) leaves this
        list the moment its group is signalled, before its future fails, although
        its processes may live on for up to ``kill_grace`` seconds.
        """
        return list(self._manager.pids)

    def kill_task(self, future: Future[Any]) -> None:
        """Stop ``future``'s task for good, unlike ``future.cancel()``, which (as the
        standard library says) cannot stop a task that runs: if it runs, its worker's
        whole group is killed (SIGTERM, SIGKILL after ``kill_grace``) and replaced; if
        it waits (queued, or in a worker's pipe), it is dropped. The future ends
        cancelled. Returns at once; a future of another executor, or one that already
        ended, is left alone. (Dask's cancel and Ray use this.)"""
        if self._forked():
            return
        with self._shutdown_lock:
            if not self._started:
                return
        self._manager.post(KillTask(future))


class ExecutorOptions:
    """What :meth:`ProcessGroupExecutor.options` returns: per-task settings."""

    def __init__(self, executor: Any, settings: TaskSettings) -> None:
        self._executor = executor
        self.task_settings = settings

    @property
    def task_timeout(self) -> float | None:
        return self.task_settings.timeout

    @property
    def max_memory(self) -> int | None:
        return self.task_settings.max_memory

    @property
    def retries(self) -> int:
        return self.task_settings.retries

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._executor._submit(fn, args, kwargs, self.task_settings)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
        return_exceptions: bool = False,
        progress: Any = False,
        journal: Any = None,
    ) -> Iterator[Any]:
        """``ProcessGroupExecutor.map`` with this view's settings (``buffersize``,
        ``progress`` and ``journal`` too)."""
        return self._executor._map(
            fn, iterables, timeout, chunksize, return_exceptions, self.task_settings, progress,
            buffersize, journal,
        )

    def options(
        self,
        *,
        task_timeout: float | None = _UNSET,
        retries: int = _UNSET,
        max_memory: int | None = _UNSET,
    ) -> ExecutorOptions:
        """A view on this view: unset settings keep this view's values."""
        return ExecutorOptions(
            self._executor, self.task_settings.updated(task_timeout, max_memory, retries)
        )


def _journal_map(*args: Any) -> Iterator[Any]:
    """``map(..., journal=...)``: imported on use, so workers never import sqlite3."""
    from .journal import journal_map

    return journal_map(*args)


def _unpicklable_arguments(exc: BaseException) -> Future[Any]:
    """The future ``submit()`` returns when a task's arguments do not pickle: already
    failed, so the caller learns it at once and nothing reaches a worker.

    It fails with pickle's own exception, as ProcessPoolExecutor's future does, marked
    with its stage (see _protocol.mark_pickling_fault). A KeyboardInterrupt is not a
    pickling fault but the user's Ctrl-C, which arrives in whatever the main thread
    runs (here: a long pickle): it propagates from submit() instead of being kept in
    a future nobody may look at.
    """
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    fut: Future[Any] = Future()
    fut.set_running_or_notify_cancel()
    fut.set_exception(proto.mark_pickling_fault(exc, proto.PICKLE_ARGUMENTS))
    return fut


def _check_buffersize(buffersize: Any) -> None:
    """Python 3.14's checks, with its messages (bool passes, as it does there)."""
    if buffersize is None:
        return
    if not isinstance(buffersize, int):
        raise TypeError("buffersize must be an integer or None")
    if buffersize < 1:
        raise ValueError("buffersize must be None or > 0")


def _map_via(
    submit: Callable[[Callable[..., Any], tuple[Any, ...]], Future[Any]],
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    timeout: float | None,
    chunksize: int,
    return_exceptions: bool,
    progress: Any,
    buffersize: int | None = None,
) -> Iterator[Any]:
    """``map`` of every executor, on top of its ``submit(fn, args)``: one task per item
    or, with ``chunksize > 1``, one ``run_chunk`` task per chunk.

    Without ``buffersize`` every input is read and submitted before the first result
    is awaited, as ``Executor.map`` does. With it, as in Python 3.14, the first
    ``buffersize`` tasks are submitted now and one more each time the caller takes a
    result (before waiting for it), so at most ``buffersize`` tasks are ever ahead of
    what the caller consumed; with chunks, it counts chunks (3.14's
    ProcessPoolExecutor does too).
    """
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    _check_buffersize(buffersize)
    make_bar = _progress.resolve(progress)  # a missing tqdm fails before any submit
    if timeout is not None and math.isinf(timeout) and timeout > 0:
        timeout = None  # waits take no inf; no limit is what it means
    end_time = None if timeout is None else timeout + time.monotonic()
    args_iter = zip(*iterables, strict=False)
    chunked = chunksize > 1
    jobs: Iterator[tuple[Callable[..., Any], tuple[Any, ...], int]]
    if chunked:
        chunks = iter(lambda: list(itertools.islice(args_iter, chunksize)), [])
        jobs = ((run_chunk, (fn, chunk), len(chunk)) for chunk in chunks)
    else:
        jobs = ((fn, args, 1) for args in args_iter)
    # Oldest on the right: the results loop pops there, new tasks go in on the left.
    fs: deque[Future[Any]] = deque()
    sizes: deque[int] | None = deque() if chunked else None
    tracker: _progress.Tracker | None = None

    def submit_next() -> bool:
        """Read one more input and submit it; False once the inputs are exhausted."""
        job = next(jobs, None)
        if job is None:
            return False
        f, args, size = job
        fut = submit(f, args)
        fs.appendleft(fut)
        if sizes is not None:
            sizes.appendleft(size)
        if tracker is not None:
            tracker.add(fut, size)
        return True

    if buffersize is None:
        while submit_next():
            pass
        if make_bar is not None:
            tracker = _progress.Tracker(
                make_bar, sum(sizes) if sizes is not None else len(fs), chunked
            )
            for i in range(len(fs) - 1, -1, -1):
                tracker.add(fs[i], 1 if sizes is None else sizes[i])
        refill = None
    else:
        if make_bar is not None:
            tracker = _progress.Tracker(make_bar, None, chunked)  # total not known yet
        for _ in range(buffersize):
            if not submit_next():
                break
        refill = submit_next
    results = _yield_results(fs, end_time, return_exceptions, sizes, refill)
    if tracker is None:
        return results
    return _progress.watch(tracker, results)


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
    fs: deque[Future[Any]], end_time: float | None, return_exceptions: bool
) -> tuple[bool, Any]:
    """Take the next future off ``fs`` and wait for it (map's timeout applies)."""
    fut = fs.pop()
    timeout = None if end_time is None else max(0.0, end_time - time.monotonic())
    if return_exceptions:
        return _result_or_exception(fut, timeout)
    return True, fut.result(timeout)


def _own_copy(exc: BaseException) -> BaseException:
    """A new instance like ``exc`` (same cause, context and traceback), so that no two
    positions of a map share one exception object: a caller may annotate, chain or
    re-raise each on its own (every raise extends the instance's traceback)."""
    try:
        new = copy.copy(exc)
    except Exception:
        return exc
    if new is exc or type(new) is not type(exc):
        return exc
    new.__cause__ = exc.__cause__
    new.__context__ = exc.__context__
    new.__suppress_context__ = exc.__suppress_context__
    return new.with_traceback(exc.__traceback__)


def _yield_results(
    fs: deque[Future[Any]],
    end_time: float | None,
    return_exceptions: bool,
    sizes: deque[int] | None = None,
    refill: Callable[[], bool] | None = None,
) -> Iterator[Any]:
    """Yield results in order, oldest future (the right end of ``fs``) first; with
    ``sizes`` each future is a chunk of that many items. ``refill`` (buffered maps)
    submits one more task before each wait, until it returns False. On exit, even
    early, cancel what is still pending; the inputs are not read any further.

    No local variable holds a result across a ``yield``: a suspended generator's frame
    would keep the last value alive for as long as the caller holds the iterator.
    """
    try:
        while fs:
            if refill is not None and not refill():
                refill = None  # the inputs are exhausted
            if sizes is None:
                yield _pop_result(fs, end_time, return_exceptions)[1]
                continue
            size = sizes.pop()
            ok, out = _pop_result(fs, end_time, return_exceptions)
            if not ok:
                # The whole chunk failed (its worker hung or died): every item of it
                # gets that error, each its own instance, so positions stay aligned.
                yield out
                for _ in range(size - 1):
                    yield _own_copy(out)
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
