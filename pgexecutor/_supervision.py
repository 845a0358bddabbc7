"""Supervision: the detectors that decide a running task must die, and why.

Each detector looks at the task running on one worker through a per-attempt *check*
with one protocol (:class:`Check`): when it next needs to look (a monotonic time, or
None), and what it concludes when it looks (nothing, or a :class:`Kill` saying the
outcome, the reason and the error). A check that knows when it would kill (a
deadline) says so too, so that the worker's stack can be asked for just before.
A :class:`Watch` joins the checks of one attempt; the manager asks the watch of each
running task when to wake up (``due``) and what it concludes (``look``), and only
applies the conclusions (``Manager._supervise``): it never knows which detectors
exist. A new detector is one more check class here and one more entry in
``Supervisor.detectors`` (when it applies, and how it makes its check).

The detectors: :class:`FixedTimeout` (``task_timeout=seconds``),
:class:`LearnedTimeout` (``task_timeout="auto"``, from :class:`RunTimes`),
:class:`MemoryLimit` (``max_memory``), :class:`Stall` (``stall_timeout``) and
:class:`Heartbeat` (``heartbeat_timeout``, from ``_heartbeat``'s page).

Owner: the manager thread (whoever holds ``Manager._lock``), as for the worker
handles that hold the watches. Nothing here blocks or signals; checks only read
(the clock, /proc).
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import signal
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import _process
from ._heartbeat import BeatPage
from ._journal_chunk import run_chunk_timed
from ._ledger import WorkItem
from ._settings import AutoTimeout, TaskSettings
from ._worker import run_chunk
from .errors import MemoryLimitError, TaskStalledError, TaskTimeoutError

logger = logging.getLogger("pgexecutor")

#: A task's first memory sample waits this long after its start. A sample costs
#: ~0.5 ms per process of the group (benchmarks/memory_sampling.py); taken at
#: every start it slowed tiny limited tasks (0.66-0.83x throughput there).
FIRST_SAMPLE = 0.02
MEMORY_INTERVAL = 0.1  # seconds between memory samples of a limited task's group
#: The worker's stack is asked for this long before a known deadline (at most a
#: tenth of the limit), so that the kill need not wait for it: a worker whose every
#: signal is blocked never answers, and one that answers has done so by then.
STACK_LEAD = 0.05
#: The same with ``native_stacks=True``: py-spy takes ~50-200 ms (see _native).
NATIVE_LEAD = 0.3
#: Run times kept per task function for learned limits (the newest).
RUN_TIMES_KEPT = 1000
#: A stalled-looking group is sampled this often, as a fraction of stall_timeout
#: (each sample scans the group: benchmarks/supervision_costs.py), but not more often
#: than STALL_MIN_INTERVAL.
STALL_SAMPLES = 4
STALL_MIN_INTERVAL = 0.05


@dataclass(frozen=True)
class Kill:
    """A conclusion: kill the worker's group and fail (or retry) the task.

    ``outcome`` is the task's outcome (TaskInfo, retries, journals: ``"timeout"``,
    ``"memory"``), ``counter`` the Stats event it counts as, ``why`` what the log
    says, ``reason`` why the group is being killed (the reap's log line), ``hard``
    SIGKILL at once rather than SIGTERM first, ``stack`` whether the error should
    carry the worker's stack dumps, and ``error`` makes the error from them (the
    Python dump, and the native one of ``native_stacks=True``; None where missing).
    """

    outcome: str
    counter: str
    why: str
    reason: str
    hard: bool
    stack: bool
    error: Callable[[str | None, str | None], BaseException]


class AskStack:
    """A conclusion: ask the worker for its stack dump now (a kill is near)."""

    def __repr__(self) -> str:
        return "ASK_STACK"


ASK_STACK = AskStack()


class Check(Protocol):
    """One detector's watch over one attempt of one task (see the module docstring)."""

    def next_look(self) -> float | None:
        """When to look next (monotonic seconds), or None: no need to."""

    def look(self, now: float) -> Kill | None:
        """Look (``now`` >= next_look()): None, or the kill it concludes."""

    def deadline(self) -> float | None:
        """When it will conclude a kill unless the task ends first, if it knows."""


class Worker(Protocol):
    """What a detector may see of the worker running the task (a WorkerHandle)."""

    @property
    def pid(self) -> int:
        """The worker's pid, which is its group's id."""

    @property
    def beats(self) -> BeatPage | None:
        """Its heartbeat page, if it has one."""


#: A detector: whether it applies to tasks with these settings, and how it makes its
#: check for a task that begins now on ``worker`` (None: nothing to watch there).
Detector = tuple[Callable[[TaskSettings], bool], Callable[[WorkItem, Worker, float], "Check | None"]]


class Watch:
    """The checks of one attempt of one task (the head of a worker's pipe).

    ``due`` is asked on every pass of the manager's loop, so it is cached until the
    next look or the next change of learned limits (``RunTimes.version``): the only
    changes that can bring a check's time *earlier*. Changes that move it later (a
    start moved after a slow unpickling, a heartbeat) make the cached time early,
    which costs one look that finds nothing.
    """

    __slots__ = ("item", "checks", "asked_for", "run_times", "lead", "_due", "_version")

    def __init__(
        self, item: WorkItem, checks: Sequence[Check], run_times: RunTimes, lead: float = STACK_LEAD
    ) -> None:
        self.item = item
        self.checks = checks
        self.lead = lead  # the stack is asked for this long before a deadline (at most)
        self.asked_for: float | None = None  # the deadline the stack was asked for
        self.run_times = run_times
        self._due: float | None = None
        self._version = -1  # of run_times when _due was computed; -1: not computed

    def _ask_at(self) -> tuple[float, float] | None:
        """(when to ask for the stack, the deadline it is for), or None."""
        deadline: float | None = None
        for check in self.checks:
            t = check.deadline()
            if t is not None and (deadline is None or t < deadline):
                deadline = t
        if deadline is None or deadline == self.asked_for:
            return None
        lead = min(self.lead, max(0.0, deadline - self.item.started) / 10)
        return deadline - lead, deadline

    def due(self) -> float | None:
        """The nearest time any check needs to look, or the stack be asked for."""
        version = self.run_times.version
        if self._version == version:
            return self._due
        best: float | None = None
        for check in self.checks:
            t = check.next_look()
            if t is not None and (best is None or t < best):
                best = t
        ask = self._ask_at()
        if ask is not None and (best is None or ask[0] < best):
            best = ask[0]
        self._due, self._version = best, version
        return best

    def look(self, now: float) -> Kill | AskStack | None:
        """Let the checks that are due look; the first kill wins. Else ASK_STACK if
        a deadline is near and the stack was not asked for it yet."""
        self._version = -1  # due() computes afresh after any look
        for check in self.checks:
            t = check.next_look()
            if t is not None and now >= t:
                kill = check.look(now)
                if kill is not None:
                    return kill
        ask = self._ask_at()
        if ask is not None and now >= ask[0]:
            self.asked_for = ask[1]
            return ASK_STACK
        return None


class Supervisor:
    """Makes the watch of each task that begins, from every detector; learns run times.

    One per manager. ``detectors`` is the one list to extend with a new detector.
    """

    def __init__(self, py_spy: str | None = None) -> None:
        self.run_times = RunTimes()
        #: the py-spy executable when native stacks are wanted (see _native)
        self.py_spy = py_spy
        self.lead = STACK_LEAD if py_spy is None else NATIVE_LEAD
        self._native_warned = False
        self.detectors: tuple[Detector, ...] = (
            (lambda s: s.timeout is not None, FixedTimeout.for_task),
            (lambda s: s.auto is not None, self.run_times.check_for),
            (lambda s: s.max_memory is not None, MemoryLimit.for_task),
            (lambda s: s.stall is not None, Stall.for_task),
            (lambda s: s.heartbeat is not None, Heartbeat.for_task),
        )
        # settings -> the makers of the detectors that apply (a task's start is on
        # the hot path; few distinct settings exist)
        self._plans: dict[TaskSettings, tuple[Callable[[WorkItem, Worker, float], Check | None], ...]] = {}

    def watch(self, item: WorkItem, worker: Worker, now: float) -> Watch | None:
        """The watch over ``item``, which begins now on ``worker``; None if nothing
        watches it (the fast path: most tasks have no limits)."""
        settings = item.settings
        if not settings.watched:
            return None
        plan = self._plans.get(settings)
        if plan is None:
            plan = self._plans[settings] = tuple(make for applies, make in self.detectors if applies(settings))
        checks = []
        for make in plan:
            check = make(item, worker, now)
            if check is not None:
                checks.append(check)
        return Watch(item, checks, self.run_times, self.lead) if checks else None

    def native_failed(self, pid: int, why: str, late: bool) -> None:
        """No native stack for worker ``pid``'s kill. ``late``: py-spy was still at
        work (logged at INFO); else it failed or could not start, which is said
        once, at WARNING: py-spy is missing its ptrace rights, usually (see _native)."""
        if late:
            logger.info("native_stacks: no native stack for worker pid=%d: %s", pid, why)
        elif not self._native_warned:
            self._native_warned = True
            logger.warning(
                "native_stacks: no native stack for worker pid=%d: %s. py-spy needs ptrace "
                "rights over the workers (root or CAP_SYS_PTRACE, or kernel.yama."
                "ptrace_scope=0); errors carry the Python stack only (said once)", pid, why,
            )

    def succeeded(self, item: WorkItem, seconds: float) -> None:
        """``item`` ran to completion in ``seconds``: a sample for learned limits."""
        if item.settings.auto is not None:
            self.run_times.add(item, seconds)


# ---------------------------------------------------------------- time limits


class FixedTimeout:
    """``task_timeout=seconds``: killed that long after it began."""

    __slots__ = ("item", "pid", "timeout")

    def __init__(self, item: WorkItem, pid: int, timeout: float) -> None:
        self.item = item
        self.pid = pid
        self.timeout = timeout

    @classmethod
    def for_task(cls, item: WorkItem, worker: Worker, now: float) -> FixedTimeout | None:
        timeout = item.settings.timeout
        return None if timeout is None else cls(item, worker.pid, timeout)

    def deadline(self) -> float | None:
        return self.item.started + self.timeout  # started moves if unpickling was slow

    next_look = deadline

    def look(self, now: float) -> Kill | None:
        if now < self.item.started + self.timeout:
            return None
        return _timeout_kill(self.item, self.pid, self.timeout, None)


def _timeout_kill(item: WorkItem, pid: int, limit: float, derivation: str | None) -> Kill:
    attempts = item.attempts

    def error(stack: str | None, native: str | None) -> BaseException:
        err = TaskTimeoutError(limit, pid, stack, attempts)
        err.derivation = derivation
        err.native_stack = native
        return err

    how = f" ({derivation})" if derivation else ""
    return Kill(
        outcome="timeout", counter="timed_out", why=f"timed out after {limit:g} s{how}",
        reason="timeout", hard=False, stack=True, error=error,
    )


def task_key(fn: Any, args: tuple[Any, ...]) -> tuple[str, int]:
    """(the identity of a task's function, how many calls of it the task makes).

    The identity is the module and qualified name, stable across processes and runs
    (not ``id()``): a ``functools.partial`` is its function, a callable object its
    class. A ``map`` chunk (``fn`` is a chunk runner, ``args`` its function and list
    of argument tuples) is the function mapped, as many times as the chunk is long.
    """
    weight = 1
    if (fn is run_chunk or fn is run_chunk_timed) and len(args) in (2, 3):
        fn, weight = args[0], max(1, len(args[1]))
    while isinstance(fn, functools.partial):
        fn = fn.func
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', '?')}", weight


class RunTimes:
    """The run times of the tasks that succeeded, per task function, and the limits
    learned from them (``task_timeout="auto"``: see AutoTimeout).

    A sample is a task's run time divided by its weight (a map chunk's length), so a
    function's single calls and its chunks learn together; a task's limit is its
    weight times the learned per-call limit (the floor applies to the whole task).
    """

    def __init__(self) -> None:
        # key -> (samples in arrival order, the same sorted)
        self._samples: dict[str, tuple[deque[float], list[float]]] = {}
        self.version = 0  # counts the samples added: limits may have changed

    def add(self, item: WorkItem, seconds: float) -> None:
        # The limit that applied: as it stood before this sample (TaskInfo.timeout).
        item.limit = self.limit(item)
        entry = self._samples.get(item.key)
        if entry is None:
            entry = self._samples[item.key] = (deque(), [])
        order, ranked = entry
        sample = max(0.0, seconds) / item.weight
        if len(order) >= RUN_TIMES_KEPT:
            del ranked[bisect.bisect_left(ranked, order.popleft())]
        order.append(sample)
        bisect.insort(ranked, sample)
        self.version += 1

    def count(self, key: str) -> int:
        entry = self._samples.get(key)
        return 0 if entry is None else len(entry[0])

    def _quantile(self, key: str, auto: AutoTimeout) -> float | None:
        """The ``auto.quantile`` of the samples (nearest rank), or None if fewer than
        ``auto.min_samples``."""
        entry = self._samples.get(key)
        if entry is None or len(entry[1]) < auto.min_samples:
            return None
        ranked = entry[1]
        return ranked[max(0, math.ceil(auto.quantile * len(ranked)) - 1)]

    def limit(self, item: WorkItem) -> float | None:
        """The limit for ``item`` now: seconds, or None (no limit yet)."""
        auto = item.settings.auto
        assert auto is not None
        q = self._quantile(item.key, auto)
        if q is None:
            return auto.initial
        return max(auto.floor, item.weight * auto.factor * q)

    def explain(self, item: WorkItem) -> str:
        """How ``item``'s limit was derived, for its error."""
        auto = item.settings.auto
        assert auto is not None
        q = self._quantile(item.key, auto)
        n = self.count(item.key)
        if q is None:
            return (
                f"AutoTimeout's initial limit: only {n} of the {auto.min_samples} "
                f"successful run times of {item.key} needed to learn one"
            )
        per = f" per call, x {item.weight} calls" if item.weight > 1 else ""
        which = "the longest" if auto.quantile == 1 else f"the {auto.quantile:g} quantile"
        how = f"{auto.factor:g} x {which} ({q:.3g} s{per}) of {n} successful run times of {item.key}"
        if auto.floor >= item.weight * auto.factor * q:
            return f"AutoTimeout's floor of {auto.floor:g} s, above {how}"
        return f"learned: {how}"

    def check_for(self, item: WorkItem, worker: Worker, now: float) -> LearnedTimeout | None:
        if item.settings.auto is None:
            return None
        item.limit = self.limit(item)
        return LearnedTimeout(self, item, worker.pid)


class LearnedTimeout:
    """``task_timeout="auto"``: killed once it ran longer than its function's learned
    limit, as it stands now (it changes as samples arrive, and applies at once)."""

    __slots__ = ("run_times", "item", "pid")

    def __init__(self, run_times: RunTimes, item: WorkItem, pid: int) -> None:
        self.run_times = run_times
        self.item = item
        self.pid = pid

    def deadline(self) -> float | None:
        limit = self.run_times.limit(self.item)
        self.item.limit = limit  # what TaskInfo.timeout reports, should the task end now
        return None if limit is None else self.item.started + limit

    next_look = deadline

    def look(self, now: float) -> Kill | None:
        limit = self.run_times.limit(self.item)
        if limit is None or now < self.item.started + limit:
            return None
        return _timeout_kill(self.item, self.pid, limit, self.run_times.explain(self.item))


# ---------------------------------------------------------------- memory


class MemoryLimit:
    """``max_memory``: the group's memory, sampled every MEMORY_INTERVAL; killed
    (SIGKILL at once: a group over its budget may be about to take the machine) as
    soon as a sample is over the limit. Records the task's peak as it goes."""

    __slots__ = ("item", "pid", "next")

    def __init__(self, item: WorkItem, pid: int, now: float) -> None:
        self.item = item
        self.pid = pid
        self.next = now + FIRST_SAMPLE

    @classmethod
    def for_task(cls, item: WorkItem, worker: Worker, now: float) -> MemoryLimit | None:
        return None if item.settings.max_memory is None else cls(item, worker.pid, now)

    def next_look(self) -> float | None:
        return self.next

    def deadline(self) -> float | None:
        return None  # not known ahead: no stack for memory kills

    def look(self, now: float) -> Kill | None:
        limit = self.item.settings.max_memory
        assert limit is not None
        self.next = now + MEMORY_INTERVAL
        used = _process.group_memory(self.pid)
        item = self.item
        if item.peak_memory is None or used > item.peak_memory:
            item.peak_memory = used
        if used <= limit:
            return None
        pid, attempts = self.pid, item.attempts

        def error(stack: str | None, native: str | None) -> BaseException:
            return MemoryLimitError(used, limit, pid, -signal.SIGKILL, attempts)

        return Kill(
            outcome="memory", counter="memory_killed",
            why=f"its group uses {used} bytes, over its limit of {limit}",
            reason="memory limit", hard=True, stack=False, error=error,
        )


# ---------------------------------------------------------------- signs of life


def _stalled_kill(item: WorkItem, pid: int, reason: str, limit: float) -> Kill:
    attempts = item.attempts

    def error(stack: str | None, native: str | None) -> BaseException:
        err = TaskStalledError(reason, limit, pid, stack, attempts)
        err.native_stack = native
        return err

    return Kill(
        outcome="timeout", counter="timed_out", why=f"stalled ({reason})",
        reason="stalled", hard=False, stack=True, error=error,
    )


class Stall:
    """``stall_timeout=S``: killed once no process of the worker's group used CPU
    time or did I/O for S seconds (see _process.group_progress).

    The group is sampled every S/STALL_SAMPLES; progress counts from the sample that
    saw it, so a stall is called between S and S(1 + 1/STALL_SAMPLES) after the
    last progress. A task that sleeps, or waits on something outside its group (a
    lock, a server, a child it started in a new session), makes no progress: it is
    stalled by this definition.
    """

    __slots__ = ("item", "pid", "limit", "last", "progress_at", "next")

    def __init__(self, item: WorkItem, pid: int, limit: float, now: float) -> None:
        self.item = item
        self.pid = pid
        self.limit = limit
        # The first reading waits for the first look: a scan of the group at every
        # task's start would cost tiny tasks a millisecond each.
        self.last: int | None = None
        self.progress_at = now  # beginning is progress
        self.next = now + self._interval()

    def _interval(self) -> float:
        return max(STALL_MIN_INTERVAL, self.limit / STALL_SAMPLES)

    @classmethod
    def for_task(cls, item: WorkItem, worker: Worker, now: float) -> Stall | None:
        limit = item.settings.stall
        return None if limit is None else cls(item, worker.pid, limit, now)

    def next_look(self) -> float | None:
        return self.next

    def deadline(self) -> float | None:
        # None: asking for the stack early would itself be progress (the worker's
        # handler runs and writes the dump), and a stalled worker answers at once.
        return None

    def look(self, now: float) -> Kill | None:
        progress = _process.group_progress(self.pid)
        if progress != self.last:
            if self.last is not None:
                self.progress_at = now
            self.last = progress
        if now - self.progress_at >= self.limit:
            reason = f"no CPU or I/O progress for {self.limit:g} s"
            return _stalled_kill(self.item, self.pid, reason, self.limit)
        self.next = min(now + self._interval(), self.progress_at + self.limit)
        return None


class Heartbeat:
    """``heartbeat_timeout=H``: once the task called heartbeat(), killed when H
    seconds pass without another call (read from the worker's page: the time of its
    last beat, exact; no beat yet: looked at every H/2, so the first is seen by then).
    """

    __slots__ = ("item", "pid", "page", "limit", "seen", "next")

    def __init__(self, item: WorkItem, pid: int, page: BeatPage, limit: float, now: float) -> None:
        self.item = item
        self.pid = pid
        self.page = page
        self.limit = limit
        self.seen: float | None = None  # the time of the task's last beat
        self.next = now + limit / 2

    @classmethod
    def for_task(cls, item: WorkItem, worker: Worker, now: float) -> Heartbeat | None:
        limit, page = item.settings.heartbeat, worker.beats
        return None if limit is None or page is None else cls(item, worker.pid, page, limit, now)

    def _read(self) -> float | None:
        when, ident = self.page.last_beat()
        if ident == self.item.task_id and (self.seen is None or when > self.seen):
            self.seen = when
        return self.seen

    def deadline(self) -> float | None:
        seen = self._read()  # fresh: a task that beats in time is never asked for its stack
        return None if seen is None else seen + self.limit

    def next_look(self) -> float | None:
        return self.next if self.seen is None else self.seen + self.limit

    def look(self, now: float) -> Kill | None:
        seen = self._read()
        if seen is None:
            self.next = now + self.limit / 2
            return None
        if now < seen + self.limit:
            return None
        reason = f"no heartbeat() for {self.limit:g} s (the last was {now - seen:.3g} s ago)"
        return _stalled_kill(self.item, self.pid, reason, self.limit)
