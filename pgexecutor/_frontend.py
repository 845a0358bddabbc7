"""The front end every executor shares: ``submit``, ``map``, ``options`` and the
context manager, on top of one hook each executor defines, ``_submit(fn, args, kwargs,
settings)``; plus ``map`` itself (order, chunks, ``buffersize``, ``timeout``,
``return_exceptions``, progress, journals) built on that hook.

``ProcessGroupExecutor`` (executor.py) and ``RayExecutor`` (ray.py) are both a
:class:`PoolFrontEnd`. Nothing here holds state beyond the frozen per-task settings;
everything stateful lives behind ``_submit``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any, Literal, Protocol

from . import _progress
from . import _protocol as proto
from ._settings import UNSET, AutoTimeout, TaskSettings
from ._worker import run_chunk


class LightSubmitter(Protocol):
    """A map's ``submit`` without a Future per item: ``submit`` returns an object
    with the part of a Future that map reads (``result``, ``exception``, ``done``,
    ``cancelled``, ``cancel``); ``flush`` hands over what it holds back."""

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any: ...

    def flush(self) -> None: ...


class TaskSubmitter:
    """``submit``, ``map`` and ``options`` on one hook, ``_submit``, with the per-task
    settings in ``_settings``: what an executor and its ``options()`` views share."""

    _settings: TaskSettings

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        settings: TaskSettings,
    ) -> Future[Any]:
        """Submit one call with these per-task settings (the one hook)."""
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """As ``Executor.submit``: schedule ``fn(*args, **kwargs)``; returns its Future.

        The call is pickled here, in the caller's thread: arguments that do not pickle
        give a future already failed with pickle's own error (the pool goes on)."""
        return self._submit(fn, args, kwargs, self._settings)

    def _slot_submitter(self, settings: TaskSettings) -> LightSubmitter | None:
        """A map's ``submit`` that keeps no Future per item, or None: futures then
        (the hook's default; see ``_map_slots``)."""
        return None

    @property
    def task_settings(self) -> TaskSettings:
        """This executor's per-task settings (``options()`` views have theirs):
        ``timeout``, ``auto``, ``max_memory``, ``retries``, ``stall``, ``heartbeat``;
        frozen and validated."""
        return self._settings

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
        and runs only the rest (see the ``pgexecutor.journal`` package).
        """
        return self._map(
            fn, iterables, timeout, chunksize, return_exceptions, self._settings, progress,
            buffersize, journal,
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
            raw = dataclasses.replace(settings, keep_raw=True)  # the journal stores them

            def submit_raw(f: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
                return self._submit(f, args, {}, raw)

            return journal_map(
                submit_raw, fn, iterables, timeout, chunksize, return_exceptions, progress,
                buffersize, journal,
            )
        return map_via(
            submit, fn, iterables, timeout, chunksize, return_exceptions, progress, buffersize,
            self._slot_submitter(settings),
        )

    def options(
        self,
        *,
        task_timeout: float | str | AutoTimeout | None = UNSET,
        retries: int = UNSET,
        max_memory: int | None = UNSET,
        stall_timeout: float | None = UNSET,
        heartbeat_timeout: float | None = UNSET,
        cancel_running: bool = UNSET,
    ) -> ExecutorOptions:
        """A light view whose ``submit``/``map``/``run`` use these settings per task.

        The executor's own defaults stay as they are::

            slow = ex.options(task_timeout=600, retries=2)
            fut = slow.submit(mesh, geometry)
        """
        return ExecutorOptions(
            self,
            self._settings.updated(
                task_timeout, max_memory, retries, stall_timeout, heartbeat_timeout, cancel_running
            ),
        )

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``await ex.run(fn, *args, **kwargs)``: the result, or the task's exception.

        Cancelling the awaiting coroutine (``asyncio.wait_for``'s timeout, a
        ``TaskGroup`` sibling failing, Ctrl-C under ``asyncio.run``, a client gone)
        stops the task and its whole process tree, whatever ``cancel_running`` says:
        nobody can ever read its result, so it must not hold a CPU, memory or children.
        (asyncio's ``wrap_future`` cancels the source future when the awaiting side is
        cancelled; ``cancel_running=True`` makes that cancel stop a running task.)
        """
        import asyncio

        fut = self._submit(fn, args, kwargs, self._settings.updated(cancel_running=True))
        return await asyncio.wrap_future(fut)


class PoolFrontEnd(TaskSubmitter, Executor):
    """``concurrent.futures.Executor`` plus per-task settings, for every executor here.

    A subclass sets ``_settings`` (its defaults, a TaskSettings) and defines
    ``_submit``, ``shutdown`` and ``terminate_workers``.
    """

    def terminate_workers(self) -> None:
        raise NotImplementedError

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> Literal[False]:
        """Shut down and wait, as ``Executor``; a with block left by Ctrl-C stops its
        tasks instead of waiting for them (``_interrupted``).

        A KeyboardInterrupt that a task raised (``result()`` raises it again here) is
        that task's outcome, not the user's Ctrl-C: it leaves the block as any other
        task exception does, and the other tasks finish.
        """
        if (
            exc_type is not None
            and issubclass(exc_type, KeyboardInterrupt)
            and not proto.came_from_worker(exc_val)
        ):
            self._interrupted()
        else:
            self.shutdown(wait=True)
        return False

    def _interrupted(self) -> None:
        self.terminate_workers()


class ExecutorOptions(TaskSubmitter):
    """What ``options()`` returns: the executor's ``submit``/``map``/``options`` with
    other per-task settings (a view: it owns nothing, shutting down is the executor's)."""

    def __init__(self, executor: TaskSubmitter, settings: TaskSettings) -> None:
        self._executor = executor
        self._settings = settings

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        settings: TaskSettings,
    ) -> Future[Any]:
        return self._executor._submit(fn, args, kwargs, settings)

    def _slot_submitter(self, settings: TaskSettings) -> LightSubmitter | None:
        return self._executor._slot_submitter(settings)

    @property
    def task_timeout(self) -> float | AutoTimeout | None:
        return self._settings.task_timeout

    @property
    def max_memory(self) -> int | None:
        return self._settings.max_memory

    @property
    def retries(self) -> int:
        return self._settings.retries

    @property
    def stall_timeout(self) -> float | None:
        return self._settings.stall

    @property
    def heartbeat_timeout(self) -> float | None:
        return self._settings.heartbeat

    @property
    def cancel_running(self) -> bool:
        return self._settings.cancel_running


def journal_map(*args: Any) -> Iterator[Any]:
    """``map(..., journal=...)``: imported on use, so workers never import sqlite3."""
    from .journal import journal_map as run

    return run(*args)


def unpicklable_arguments(exc: BaseException) -> Future[Any]:
    """The future ``submit()`` returns when a task's arguments do not pickle: already
    failed, so the caller learns it at once and nothing reaches a worker.

    It fails with pickle's own exception, as ProcessPoolExecutor's future does, marked
    with its stage (see _protocol.mark_pickling_fault). A KeyboardInterrupt is not a
    pickling fault but the user's Ctrl-C, which arrives in whatever the main thread
    runs (here: a long pickle): it propagates from submit() instead of being kept in
    a future nobody may look at.
    """
    fut: Future[Any] = Future()
    fut.set_running_or_notify_cancel()
    fut.set_exception(argument_fault(exc))
    return fut


def argument_fault(exc: BaseException) -> BaseException:
    """What pickling a task's arguments raised, marked as that stage's fault; a
    KeyboardInterrupt is raised again instead (see unpicklable_arguments)."""
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    return proto.mark_pickling_fault(exc, proto.PICKLE_ARGUMENTS)


def check_buffersize(buffersize: Any) -> None:
    """Python 3.14's checks, with its messages (bool passes, as it does there)."""
    if buffersize is None:
        return
    if not isinstance(buffersize, int):
        raise TypeError("buffersize must be an integer or None")
    if buffersize < 1:
        raise ValueError("buffersize must be None or > 0")


#: Inputs a map reads without delay (see map_via's ``eager``).
_SEQUENCES = (list, tuple, range)


def map_via(
    submit: Callable[[Callable[..., Any], tuple[Any, ...]], Future[Any]],
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    timeout: float | None,
    chunksize: int,
    return_exceptions: bool,
    progress: Any,
    buffersize: int | None = None,
    light: LightSubmitter | None = None,
) -> Iterator[Any]:
    """``map`` of every executor, on top of its ``submit(fn, args)``: one task per item
    or, with ``chunksize > 1``, one ``run_chunk`` task per chunk.

    With ``light`` (an executor's submit that keeps no Future per item) it submits
    through that instead, unless a progress bar needs futures (done-callbacks).

    Without ``buffersize`` every input is read and submitted before the first result
    is awaited, as ``Executor.map`` does. With it, as in Python 3.14, the first
    ``buffersize`` tasks are submitted now and one more each time the caller takes a
    result (before waiting for it), so at most ``buffersize`` tasks are ever ahead of
    what the caller consumed; with chunks, it counts chunks (3.14's
    ProcessPoolExecutor does too).
    """
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    check_buffersize(buffersize)
    make_bar = _progress.resolve(progress)  # a missing tqdm fails before any submit
    if timeout is not None and math.isinf(timeout) and timeout > 0:
        timeout = None  # waits take no inf; no limit is what it means
    end_time = None if timeout is None else timeout + time.monotonic()
    chunked = chunksize > 1
    jobs: Iterator[tuple[Callable[..., Any], tuple[Any, ...], int]]
    if chunked and len(iterables) == 1:
        # One iterable: its items themselves are the arguments (run_chunk's star=False).
        values = iter(iterables[0])
        chunks = iter(lambda: list(itertools.islice(values, chunksize)), [])
        jobs = ((run_chunk, (fn, chunk, False), len(chunk)) for chunk in chunks)
    elif chunked:
        args_iter = zip(*iterables, strict=False)
        chunks = iter(lambda: list(itertools.islice(args_iter, chunksize)), [])
        jobs = ((run_chunk, (fn, chunk), len(chunk)) for chunk in chunks)
    else:
        jobs = ((fn, args, 1) for args in zip(*iterables, strict=False))
    flush: Callable[[], None] | None = None
    eager = True  # hand each task over as it is read
    if light is not None and make_bar is None:
        submit, flush = light.submit, light.flush
        # ``light`` may hold tasks back to hand them over in blocks: only while the
        # inputs are plain sequences, read without delay. An iterator may wait for
        # what earlier tasks do (a queue they fill), so none of those may be held.
        eager = buffersize is not None or not all(type(it) in _SEQUENCES for it in iterables)
    # Oldest on the right: the results loop pops there, new tasks go in on the left.
    # Futures, or what ``light`` gives.
    fs: deque[Any] = deque()
    sizes: deque[int] | None = deque() if chunked else None
    tracker: _progress.Tracker | None = None

    def submit_next() -> bool:
        """Read one more input and submit it; False once the inputs are exhausted."""
        job = next(jobs, None)
        if job is None:
            return False
        f, args, size = job
        fut = submit(f, args)
        if eager and flush is not None:
            flush()
        fs.appendleft(fut)
        if sizes is not None:
            sizes.appendleft(size)
        if tracker is not None:
            tracker.add(fut, size)
        return True

    if buffersize is None:
        while submit_next():
            pass
        if flush is not None:
            flush()
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


def result_or_exception(fut: Future[Any], timeout: float | None) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, exception)`` of ``fut``: ``map``'s
    ``return_exceptions=True`` (the journal's map uses it too).

    Any exception the future holds is its outcome, SystemExit, KeyboardInterrupt and
    GeneratorExit of a task included. What is raised *while waiting* is not: the
    map's own timeout, or the caller's Ctrl-C, which interrupts the wait with a
    KeyboardInterrupt that is not the future's (``result()`` raises the very object
    the future holds, so identity tells them apart).
    """
    try:
        return True, fut.result(timeout)
    except FuturesTimeoutError:
        if not fut.done():
            raise  # map's own timeout: the standard meaning
        return False, fut.exception()
    except Exception as exc:
        return False, exc
    except BaseException as exc:
        if fut.done() and not fut.cancelled() and fut.exception(0) is exc:
            return False, exc
        raise


def _pop_result(
    fs: deque[Future[Any]], end_time: float | None, return_exceptions: bool
) -> tuple[bool, Any]:
    """Take the next future off ``fs`` and wait for it (map's timeout applies)."""
    fut = fs.pop()
    timeout = None if end_time is None else max(0.0, end_time - time.monotonic())
    if return_exceptions:
        return result_or_exception(fut, timeout)
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
