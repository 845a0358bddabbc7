"""Outcomes: the one place where a task's future ends, is counted and gets its TaskInfo.

Every future a worker took ends here exactly once: a result, an exception, or
cancelled. The ledger also keeps the standard library's rule that
``set_running_or_notify_cancel()`` is called once per future (``hand_over``), which
is where a user's ``cancel()`` of a queued future wins or loses.

The ledger decides and counts; the delivery thread (``_delivery``) carries it out:
it unpickles the outcome and resolves the future, which runs its done-callbacks,
none of which may hold up the manager. The TaskInfo is on the future and the
counters count it before the job is queued, so a callback, or a caller woken by
the future, sees both.

Owner: the manager thread (whoever holds ``Manager._lock``); nothing here is
thread-safe on its own, except ``decode_failed``: whichever thread unpickles a
result (the delivery thread, or the future's first reader) calls it, under
``_failed_lock``; it writes only ``Stats.unpickle_failed`` and the TaskInfo of a
future the manager is done with.
"""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any

from . import _protocol as proto
from ._delivery import Delivery, Encoded
from ._future import TaskFuture
from ._map_slots import MapSlot
from ._settings import TaskSettings

logger = logging.getLogger("pgexecutor")

_task_ids = itertools.count(1)

#: The largest in-band payload a future keeps as its ``raw_outcome`` (beside the value
#: unpickled from it: kept twice). An out-of-band payload is kept whatever its size:
#: the value's arrays are views of it, so it costs nothing more.
RAW_MAX = 1 << 20

#: What the pool may end in its own thread (no user code): our futures, whose
#: end_encoded / end_now decline when a callback must run, and a map's slots.
_ENDS_HERE = (TaskFuture, MapSlot)


def _kept(item: WorkItem, raw: tuple[int, Any] | None) -> tuple[int, bytes | bytearray] | None:
    """What of a worker's answer ``(kind, payload)`` the future keeps: nothing unless
    its settings ask (``keep_raw``: a journaled map), in-band payloads up to RAW_MAX,
    no shared memory (RESULT_SHM: its mapping is the value's)."""
    if raw is None or not item.settings.keep_raw:
        return None
    kind, payload = raw
    if kind == proto.RESULT_OOB or (
        kind in (proto.RESULT, proto.ERROR) and isinstance(payload, (bytes, bytearray))
        and len(payload) <= RAW_MAX
    ):
        return kind, payload
    return None


@dataclass
class TaskInfo:
    """What happened to a task, readable with :func:`pgexecutor.task_info`.

    ``duration`` is the run time in seconds of the last attempt (from when the worker
    started it to when its outcome arrived), ``pid`` the worker that ran that attempt,
    ``attempts`` how many times it was started (retries included), ``peak_memory``
    the largest memory of the worker's group seen while that attempt ran (bytes, as
    :func:`pgexecutor._process.group_memory` counts it; None unless the task had a
    ``max_memory``, or if it ended before the first sample) and ``outcome`` one of
    ``"ok"``, ``"error"`` (the task raised), ``"timeout"``, ``"crashed"``,
    ``"memory"``, ``"cancelled"``. ``timeout`` is the time limit in seconds that
    applied to that attempt (a fixed ``task_timeout``, or the learned one of
    ``task_timeout="auto"`` as it stood when the attempt ended), None if none did.
    It is set before the future resolves, so done-callbacks can read it.
    """

    duration: float | None = None
    pid: int | None = None
    attempts: int = 0
    peak_memory: int | None = None
    outcome: str | None = None
    timeout: float | None = None


class WorkItem:
    """A task on its way: its future, pickled call, settings and attempt bookkeeping."""

    __slots__ = (
        "future",
        "payload",
        "task_id",
        "settings",
        "attempts",
        "started",
        "pid",
        "peak_memory",
        "sent",
        "key",
        "weight",
        "limit",
    )

    def __init__(
        self,
        future: TaskFuture | MapSlot,
        payload: bytes | proto.OOBPayload,
        settings: TaskSettings,
        key: str = "",
        weight: int = 1,
    ) -> None:
        self.future = future
        self.payload = payload
        self.task_id = next(_task_ids)
        self.settings = settings
        self.attempts = 0  # attempts started (retries included)
        self.started = 0.0  # monotonic start of the current attempt; 0.0: not begun
        self.pid = 0  # the worker it was last handed to
        self.peak_memory: int | None = None
        # Handed to a worker at least once: set_running_or_notify_cancel() was called
        # (it must be called once only) and the future is RUNNING.
        self.sent = False
        # For learned time limits (see _supervision.RunTimes): the task function's
        # identity and how many calls of it the task makes (a map chunk's size).
        self.key = key
        self.weight = weight
        # The time limit of the current attempt (seconds or None), for TaskInfo; a
        # learned limit is written by its detector as it changes.
        self.limit: float | None = settings.timeout


class Stats:
    """Counters of what the executor did (read with ``executor.stats()``).

    What each means for a user is defined in ``pgexecutor.counters`` (shared with
    the progress bar and the journal report). Futures: ``submitted``; each ends in
    exactly one of ``completed`` (a result), ``failed`` (any exception, after its
    last attempt) or ``cancelled``. Events, one
    per attempt that ended that way, so a retried task can add several: ``timed_out``,
    ``crashed`` (the worker died on its own), ``memory_killed``. ``retried`` counts
    attempts started again after such an event. Workers: ``workers_started`` (the
    first ones and every replacement) and ``workers_killed`` (groups this executor
    signalled: timeout, memory limit, cancel, terminate; not workers that crashed,
    retired or were stopped as not needed at shutdown). One writer: the manager
    thread. ``submitted`` and the futures failed before reaching it (arguments that
    do not pickle) are the executor's own counts, added in its ``stats()``.
    """

    FIELDS = (
        "submitted",
        "completed",
        "failed",
        "cancelled",
        "timed_out",
        "crashed",
        "memory_killed",
        "retried",
        "workers_started",
        "workers_killed",
    )

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.timed_out = 0
        self.crashed = 0
        self.memory_killed = 0
        self.retried = 0
        self.workers_started = 0
        self.workers_killed = 0
        # Results counted as completed whose unpickling then failed (in the delivery
        # thread or a reader's, under Ledger._failed_lock): failed after all. Kept
        # apart, not moved between the two counters, so the manager stays the one
        # writer of those.
        self.unpickle_failed = 0

    def count(self, counter: str) -> None:
        """One more of ``counter`` (a name in FIELDS): the event a detector's kill
        counts as (see _supervision.Kill)."""
        setattr(self, counter, getattr(self, counter) + 1)

    def snapshot(self) -> dict[str, int]:
        counters = {name: getattr(self, name, 0) for name in self.FIELDS}
        moved = self.unpickle_failed
        counters["completed"] -= moved
        counters["failed"] += moved
        counters["submitted"] = 0  # the executor's count (see the class docstring)
        return counters


class Ledger:
    """Ends futures and counts it (see the module docstring)."""

    def __init__(self, delivery: Delivery) -> None:
        self.stats = Stats()
        self.delivery = delivery
        self._failed_lock = threading.Lock()

    def hand_over(self, item: WorkItem, now: float) -> bool:
        """The task leaves the queue for a worker: its future becomes RUNNING. False
        if its user cancelled it meanwhile; then it is dropped and its waiters told."""
        if item.sent:
            return True
        if not item.future.set_running_or_notify_cancel():
            self._record(item, "cancelled", now)
            return False
        item.sent = True
        return True

    def answer(self, item: WorkItem, outcome: Encoded, now: float) -> None:
        """The worker answered (a result, or the task's exception, both still
        pickled): the delivery thread decodes it and ends the future. For a task
        whose settings ask (a journaled map), the answer's bytes are left on the
        future first (``raw_outcome``)."""
        item.payload = b""
        error = outcome.kind == proto.ERROR
        self._record(item, "error" if error else "ok", now)
        fut = item.future
        if item.settings.keep_raw and isinstance(fut, TaskFuture):
            fut.raw_outcome = _kept(item, (outcome.kind, outcome.payload))
        # Unpickled by its first reader when no callback needs it now: no hop
        # through the delivery thread on the common path (TaskFuture.end_encoded).
        # Not a memfd's result: an unread future would hold the fd open.
        if outcome.kind == proto.RESULT_SHM or not (
            isinstance(fut, _ENDS_HERE) and fut.end_encoded(outcome, error)
        ):
            self.delivery.decode(fut, outcome)

    def decode_failed(self, fut: Any) -> None:
        """A result counted as completed did not unpickle here (any thread)."""
        with self._failed_lock:
            self.stats.unpickle_failed += 1
            info = getattr(fut, "info", None)
            if isinstance(info, tuple):  # TaskInfo's fields (see _record)
                fut.info = (*info[:4], "error", *info[5:])

    def fail(self, item: WorkItem, exc: BaseException, outcome: str, now: float) -> None:
        """End the task with ``exc`` (a CancelledError ends it cancelled)."""
        item.payload = b""
        fut = item.future
        # An error of ours (timeout, crash, cancel) needs no unpickling: a future
        # without done-callbacks ends here at once, so that it is not queued
        # behind another's slow result or callback.
        quick = isinstance(fut, _ENDS_HERE)
        if isinstance(exc, CancelledError):
            self._record(item, "cancelled", now)
            if not (quick and fut.end_now(None)):  # type: ignore[attr-defined]
                assert isinstance(fut, Future)  # a slot's end_now never declines
                self.delivery.cancel(fut, running=item.sent)
            return
        self._record(item, outcome, now)
        if fut.done():
            return
        if not self.hand_over(item, now):
            return  # never handed over, and cancelled by its user just now
        if not (quick and fut.end_now(exc)):  # type: ignore[attr-defined]
            assert isinstance(fut, Future)  # a slot's end_now never declines
            self.delivery.fail(fut, exc)

    def retry_or_fail(self, item: WorkItem, exc: BaseException, outcome: str, now: float) -> bool:
        """A worker was lost under this task (timeout, crash, memory). True: it is to
        run again (retries remain; the caller queues it first); else it failed here.

        Retries go on during a plain shutdown: the future is still running and
        shutdown(wait=True) waits for running futures. (terminate/kill fail in-flight
        tasks themselves and never come through here.)
        """
        if item.attempts <= item.settings.retries:
            self.stats.retried += 1
            logger.info(
                "retrying task %d (%s on worker pid=%d; attempt %d of %d)",
                item.task_id, outcome, item.pid, item.attempts + 1, item.settings.retries + 1,
            )
            item.started = 0.0
            item.peak_memory = None  # task_info reports the last attempt, like duration
            return True
        if hasattr(exc, "attempts"):
            exc.attempts = item.attempts
            if exc.args:  # keep repr() and args in step; attempts is the last argument
                exc.args = (*exc.args[:-1], item.attempts)
        self.fail(item, exc, outcome, now)
        return False

    def _record(self, item: WorkItem, outcome: str, now: float) -> None:
        """Count the outcome and leave the TaskInfo's fields on the future (before it
        ends, so that done-callbacks can read it).

        A plain tuple, in TaskInfo's field order, made a TaskInfo when read
        (``pgexecutor.task_info``): a dataclass per task stayed an object the garbage
        collector walks, a tuple of numbers and a string it stops tracking, and with
        20,000 futures alive that was 5 % of a burst of submits."""
        if outcome == "ok":
            self.stats.completed += 1
        elif outcome == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.failed += 1
        item.future.info = (
            (now - item.started) if item.started else None,  # duration
            item.pid or None,
            item.attempts,
            item.peak_memory,
            outcome,
            item.limit,  # timeout
        )
