"""The manager loop: the one owner of every worker, queued task and deadline.

Data flow (one way, like CPython's ``concurrent/futures/process.py``)::

    caller threads                    manager thread                     workers
    --------------                    --------------                     -------
    submit(fn, *args)                                                    (each leads its own
      |  pickle (fn, args) HERE, so                                        process group)
      |  a bad argument fails this
      |  future only, at once
      v
    inbox (deque) --wake pipe-->  poll() on: wake pipe,           TASK  +----------+
      :                           every worker's result pipe,   ------> | worker 1 | -> children,
      :                           every worker's pidfd          <------ |  (pgid)  |    grandchildren
      :                           timeout = nearest deadline    RESULT  +----------+
      :                               |                           ^      (a large result's
      :.. idle worker, manager asleep, no deadline: the caller ...:       buffers come in a
          writes the TASK itself (try_dispatch, under _lock)              memfd, over a socket)
                                      |
                                      +-- results/errors ---> future.set_result / set_exception
                                      +-- deadline passed --> stack dump, SIGTERM+SIGCONT group,
                                      |                       SIGKILL after kill_grace, replace
                                      +-- pidfd readable ---> fail the running task, requeue the
                                                              rest, kill the group, THEN reap

Worker and task state belong to whoever holds ``_lock``: this thread, which lets go
only while it sleeps in poll(). Other threads append to the inbox and write one byte
to the wake pipe, or, for a task that needs nothing more from the manager, take the
lock without waiting and write it to an idle worker themselves (``try_dispatch``). The
loop never blocks on a worker: pipes are non-blocking and partially written frames
wait in a per-worker buffer.

Tiny tasks go deep into each worker's pipe (``_prefetch_depth``), so one write carries
many and a worker works through them while the manager sleeps; a result is still
written the moment its task ends, which is how the manager knows the next one began.

Lifecycle of a worker: STARTING (spawned, INIT sent) -> READY (initializer ran) ->
RETIRING (EXIT sent: max_tasks_per_child or shutdown) or KILLING (signalled) -> DEAD
(the leader exited but is not reaped, so its pgid is still reserved and the group can
be signalled safely) -> reaped and forgotten.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import select
import signal
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from . import _guardian
from . import _process as proc_mod
from . import _protocol as proto
from ._worker import DUMP_SIGNAL
from .errors import (
    MemoryLimitError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerInitializerError,
)

logger = logging.getLogger("pgexecutor")

STARTING, READY, RETIRING, KILLING, DEAD = range(5)
_STATE_NAMES = ("starting", "ready", "retiring", "killing", "dead")

_STACK_WAIT = 0.1  # at most this long to collect a timed-out worker's stack dump
# The dump is complete once it ends a line and the pipe stays quiet this long. The
# faulthandler signal handler writes the whole dump in one burst, GIL or not (0.1-0.2
# ms measured, even for a task spinning in C), so a short pause means it is over; a
# worker preempted mid-dump usually stops mid-line, hence the newline condition.
_STACK_QUIET_MS = 2
_MEMORY_INTERVAL = 0.1  # seconds between memory samples of a limited task's group
_POLL_EXIT_INTERVAL = 0.05  # without pidfds, how often to look for dead workers
_MAX_START_FAILURES = 3  # workers that died before READY in a row: stop retrying
# Tasks in flight per worker once the pool is full: the one running plus those waiting
# in its pipe (see Manager._prefetch_depth).
_PREFETCH_MIN = 2  # tiny tasks: at least one waiting, so a worker never idles between them
_PREFETCH_MAX = 64  # tiny tasks: enough that a worker drains its pipe while we sleep
_PREFETCH_BUDGET = 0.002  # seconds of (recent average) work a worker may have queued
_AVG_WEIGHT = 0.25  # weight of the newest run time in the moving average
# After failing a future (timeout, crash), wait this long before starting the
# replacement worker: posix_spawn and its bookkeeping hold the GIL for a few ms, and
# the thread just woken to read that future would wait for them (up to the 5 ms
# switch interval). A short poll hands it the GIL first.
_SPAWN_PAUSE = 0.002

_JOIN_BELOW = 1 << 16  # task payloads smaller than this are copied into their frame
_DIRECT_MAX = 1 << 14  # try_dispatch takes payloads below this (an empty pipe takes them whole)
_IOV_MAX = 1024  # buffers per writev (Linux's IOV_MAX)

_task_ids = itertools.count(1)


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
    ``"memory"``, ``"cancelled"``. It is set before the future resolves, so
    done-callbacks can read it.
    """

    duration: float | None = None
    pid: int | None = None
    attempts: int = 0
    peak_memory: int | None = None
    outcome: str | None = None


class WorkItem:
    """A task on its way: its future, pickled call and per-task settings."""

    __slots__ = (
        "future",
        "payload",
        "task_id",
        "timeout",
        "max_memory",
        "retries",
        "attempts",
        "started",
        "pid",
        "peak_memory",
        "on_event",
        "sent",
    )

    def __init__(
        self,
        future: Future[Any],
        payload: bytes | proto.OOBPayload,
        timeout: float | None,
        max_memory: int | None,
        retries: int,
        on_event: Any = None,
    ) -> None:
        self.future = future
        self.payload = payload
        self.task_id = next(_task_ids)
        self.timeout = timeout
        self.max_memory = max_memory
        self.retries = retries
        self.attempts = 0
        self.started = 0.0
        self.pid = 0
        self.peak_memory: int | None = None
        self.on_event = on_event
        self.sent = False  # handed to a worker at least once (the future is RUNNING)


#: why a still-starting worker is stopped at shutdown (logged at DEBUG: the normal path)
_NOT_NEEDED = "not needed: the executor is shutting down"


class _Worker:
    __slots__ = (
        "proc",
        "pid",
        "state",
        "reader",
        "inflight",
        "out",
        "want_write",
        "tasks_sent",
        "kill_at",
        "term_sent",
        "kill_sent",
        "next_check",
        "next_memory",
        "init_failed",
        "reason",
        "reading",
    )

    def __init__(self, proc: proc_mod.WorkerProcess) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.state = STARTING
        self.reader = proto.FrameReader()
        self.inflight: deque[WorkItem] = deque()
        self.out: deque[memoryview] = deque()
        self.want_write = False
        self.tasks_sent = 0
        self.kill_at: float | None = None
        self.term_sent = False
        self.kill_sent = False
        self.next_check = 0.0
        self.next_memory = 0.0
        self.init_failed = False
        self.reason = ""
        self.reading = True


@dataclass
class ManagerConfig:
    max_workers: int
    mp_context: Any
    init_payload: bytes
    max_tasks_per_child: int | None
    kill_grace: float


class Stats:
    """Counters of what the executor did (read with ``executor.stats()``).

    Futures: ``submitted``; each ends in exactly one of ``completed`` (a result),
    ``failed`` (any exception, after its last attempt) or ``cancelled``. Events, one
    per attempt that ended that way, so a retried task can add several: ``timed_out``,
    ``crashed`` (the worker died on its own), ``memory_killed``. ``retried`` counts
    attempts started again after such an event. Workers: ``workers_started`` (the
    first ones and every replacement) and ``workers_killed`` (groups this executor
    signalled: timeout, memory limit, cancel, terminate; not workers that crashed
    or retired). Written by whoever holds the manager's lock, except ``submitted``
    (the caller's thread, under the executor's submit lock); the executor adds the
    futures it failed itself (arguments that do not pickle) to ``failed``.
    """

    submitted: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    crashed: int
    memory_killed: int
    retried: int
    workers_started: int
    workers_killed: int

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
        for name in self.FIELDS:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.FIELDS}


def _set_info(item: WorkItem, outcome: str, now: float) -> None:
    info = TaskInfo(
        duration=(now - item.started) if item.started else None,
        pid=item.pid or None,
        attempts=item.attempts,
        peak_memory=item.peak_memory,
        outcome=outcome,
    )
    item.future._pgexecutor_info = info  # type: ignore[attr-defined]


class Manager:
    """Owns the workers and the queue; runs in its own thread (see module docstring)."""

    def __init__(self, config: ManagerConfig) -> None:
        self.cfg = config
        self.inbox: deque[Any] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        proc_mod.mark_parent_only(self._wake_r, self._wake_w)
        self._woken = False
        self._wake_lock = threading.Lock()
        self._closed = False
        self.queue: deque[WorkItem] = deque()
        self.workers: dict[int, _Worker] = {}
        self._poller = select.poll()
        self._fd_owner: dict[int, tuple[int, _Worker | None]] = {}
        self._register(self._wake_r, select.POLLIN, 0, None)
        self._target = 0
        self._start_failures = 0
        self.shutting_down = False
        self.stats = Stats()
        self._use_pidfd = True
        self._next_exit_poll = 0.0
        self._avg_run: float | None = None  # moving average of task run times (seconds)
        self._spawn_after = 0.0  # no worker starts before this (see _SPAWN_PAUSE)
        self._lock = threading.Lock()  # held by the manager except in poll (try_dispatch)
        self._serving = False  # the loop runs: try_dispatch may act for it
        self.thread = threading.Thread(target=self._run, name="pgexecutor-manager", daemon=True)
        self.finished = threading.Event()

    # ------------------------------------------------------------ other threads' API

    def start(self) -> None:
        self.thread.start()

    def post(self, msg: Any) -> None:
        """Hand the manager a work item or a command; thread-safe and cheap.

        The wake write happens under a lock shared with ``_close``: once the pipe is
        closed its fd number may be reused by anything, and a stray byte written there
        (a finalizer, a second shutdown) would corrupt someone else's file.
        """
        self.inbox.append(msg)
        if not self._woken:
            self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._closed:
                return
            self._woken = True
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass  # already full: it is awake anyway

    def try_dispatch(self, item: WorkItem) -> bool:
        """Hand ``item`` to an idle worker from the caller's thread, if that is safe now.

        It saves the hop through the manager thread, a wake-up and a GIL hand-off that
        make up a third of a round trip. The manager changes its state only while it
        holds ``_lock`` and lets go of it only to sleep in poll(), so whoever holds the
        lock owns the state. We do only what needs no later attention from the
        sleeping manager: no deadline or memory limit (it would not wake for them),
        a small frame written whole (no POLLOUT to watch), no older work queued (order),
        an idle worker (what _dispatch would pick; the queue stays empty, so no new
        worker is due). Otherwise, or when the manager is awake (the lock is taken),
        False: post the item as usual.
        """
        payload = item.payload
        if item.timeout is not None or item.max_memory is not None:
            return False
        if type(payload) is not bytes or len(payload) >= _DIRECT_MAX:
            return False
        if self.inbox or self.queue:  # a hint, checked again under the lock
            return False
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if not self._serving or self.shutting_down or self.queue or self.inbox:
                return False
            for w in self.workers.values():
                if w.state == READY and not w.inflight and not w.out:
                    break
            else:
                return False
            self._send_task(w, item)
            self._flush(w)
            if w.out:  # the pipe took only part after all: the manager must watch it
                self._wake()
            return True
        finally:
            self._lock.release()

    # ------------------------------------------------------------ poll bookkeeping

    _WAKE, _RESULT, _PIDFD, _WRITE = range(4)

    def _register(self, fd: int, mask: int, kind: int, worker: _Worker | None) -> None:
        self._poller.register(fd, mask)
        self._fd_owner[fd] = (kind, worker)

    def _unregister(self, fd: int) -> None:
        if fd in self._fd_owner:
            del self._fd_owner[fd]
            try:
                self._poller.unregister(fd)
            except (KeyError, ValueError):
                pass

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            logger.critical("pgexecutor manager crashed; killing all workers", exc_info=True)
            self._emergency_stop()
        finally:
            self._close()
            self.finished.set()

    def _loop(self) -> None:
        # The state is ours while we hold _lock; we let go only to sleep (try_dispatch).
        lock = self._lock
        lock.acquire()
        self._serving = True
        try:
            self._run_loop()
        finally:
            self._serving = False
            lock.release()

    def _run_loop(self) -> None:
        lock = self._lock
        # Act first, then sleep: whatever was posted before the thread started (the
        # first tasks, or a shutdown) must be dispatched without waiting for a wake-up.
        self._drain_inbox()
        while True:
            now = time.monotonic()
            if not self._use_pidfd and now >= self._next_exit_poll:
                self._next_exit_poll = now + _POLL_EXIT_INTERVAL
                for w in list(self.workers.values()):
                    if w.state != DEAD:
                        self._on_exit(w)
            self._check_timers(now)
            self._dispatch()
            if self.shutting_down and self._finish_shutdown():
                return
            timeout = self._next_wakeup()
            ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
            lock.release()
            try:
                events = self._poller.poll(ms)
            finally:
                lock.acquire()
            for fd, _ev in events:
                owner = self._fd_owner.get(fd)
                if owner is None:
                    continue
                kind, wk = owner
                if kind == self._WAKE:
                    self._drain_inbox()
                elif kind == self._RESULT:
                    assert wk is not None
                    self._read_results(wk)
                elif kind == self._PIDFD:
                    assert wk is not None
                    self._on_exit(wk)
                elif kind == self._WRITE:
                    assert wk is not None
                    self._flush(wk)

    def _drain_inbox(self) -> None:
        try:
            # One read: post() writes one byte per wake-up, so a few at most wait here.
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        self._woken = False  # before draining: a later post() must write again
        inbox = self.inbox
        while inbox:
            msg = inbox.popleft()
            if type(msg) is WorkItem:
                self.queue.append(msg)
            else:
                self._command(*msg)

    def _command(self, name: str, *args: Any) -> None:
        if name == "shutdown":
            (cancel_futures,) = args
            self.shutting_down = True
            if cancel_futures:
                self._cancel_queue()
        elif name == "terminate":
            (hard, reason) = args
            self.shutting_down = True
            self._cancel_queue()
            now = time.monotonic()
            for w in list(self.workers.values()):
                if w.state in (STARTING, READY, RETIRING):
                    if w.inflight:
                        item = w.inflight.popleft()
                        self._fail(item, WorkerCrashedError(w.pid, None, reason), "crashed", now)
                    # Tasks waiting in its pipe never started: cancelled, not crashed.
                    while w.inflight:
                        self._fail(w.inflight.popleft(), CancelledError(), "cancelled", now)
                    self._kill(w, reason, hard=hard, now=now)
                elif w.state in (KILLING, DEAD) and hard:
                    w.kill_at = now
        elif name == "cancel":
            (future,) = args
            self._cancel_running(future)

    def _cancel_queue(self) -> None:
        while self.queue:
            item = self.queue.popleft()
            if not item.future.cancel():
                # Already running (a retry waiting for a new worker): fail it instead.
                self._fail(item, CancelledError(), "cancelled", time.monotonic())
            else:
                self.stats.cancelled += 1

    def _cancel_running(self, future: Future[Any]) -> None:
        """Kill the worker running ``future`` (used by integrations such as Dask)."""
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.state in (READY, RETIRING) and w.inflight and w.inflight[0].future is future:
                item = w.inflight.popleft()
                self._kill(w, "its task was cancelled", hard=False, now=now)
                self._fail(item, CancelledError(), "cancelled", now)
                return
        for item in list(self.queue):
            if item.future is future:
                self.queue.remove(item)
                self._fail(item, CancelledError(), "cancelled", now)
                return

    def _next_wakeup(self) -> float | None:
        """Seconds until the nearest deadline, kill or check; None to sleep until woken."""
        best: float | None = None
        for w in self.workers.values():
            t: float | None = None
            if w.state in (READY, RETIRING) and w.inflight:
                head = w.inflight[0]
                if head.timeout is not None:
                    t = head.started + head.timeout
                if head.max_memory is not None:
                    t = w.next_memory if t is None else min(t, w.next_memory)
            elif w.state == KILLING and not w.kill_sent:
                t = w.kill_at
            elif w.state == DEAD:
                t = w.next_check
            if t is not None and (best is None or t < best):
                best = t
        if not self._use_pidfd and self.workers:
            best = self._next_exit_poll if best is None else min(best, self._next_exit_poll)
        now = time.monotonic()
        if self._spawn_after:
            if self._spawn_after > now:
                best = self._spawn_after if best is None else min(best, self._spawn_after)
            else:
                self._spawn_after = 0.0
        if best is None:
            return None
        return max(0.0, best - now)

    # ------------------------------------------------------------ workers

    def _spawn(self) -> None:
        proc = proc_mod.spawn_worker(self.cfg.mp_context)
        w = _Worker(proc)
        self.workers[w.pid] = w
        self.stats.workers_started += 1
        _guardian.register(w.pid, proc.create_time, self.cfg.kill_grace)
        if proc.pidfd >= 0:
            self._register(proc.pidfd, select.POLLIN, self._PIDFD, w)
        else:
            self._use_pidfd = False
        self._register(proc.from_worker, select.POLLIN, self._RESULT, w)
        self._queue_frame(w, proto.frame(proto.INIT, 0, self.cfg.init_payload))
        if self.shutting_down and not self.queue:
            self._queue_frame(w, proto.frame(proto.EXIT))
            w.state = RETIRING
        self._flush(w)
        logger.debug("started worker pid=%d pgid=%d", w.pid, w.pid)

    def _active(self) -> int:
        n = 0
        for w in self.workers.values():
            if w.state == STARTING or w.state == READY:
                n += 1
        return n

    def _adjust_workers(self) -> None:
        """Start workers up to the target: replace dead ones, grow for queued work."""
        if self.queue:
            if self._target < self.cfg.max_workers:
                busy = 0
                for w in self.workers.values():
                    if w.state == READY and w.inflight:
                        busy += 1
                self._target = max(self._target, min(self.cfg.max_workers, len(self.queue) + busy))
        elif self.shutting_down:
            return
        active = self._active()
        if active < self._target and self._spawn_after > time.monotonic():
            return  # a caller was just woken: let it run first (see _SPAWN_PAUSE)
        while active < self._target:
            try:
                self._spawn()
            except OSError as exc:
                logger.error("could not start a worker: %s", exc)
                self._fail_queue(WorkerCrashedError(None, None, f"could not start a worker: {exc}"))
                self._target = 0
                return
            active += 1

    def _pool_is_full(self) -> bool:
        """Every worker the pool may have is running and ready for work."""
        ready = 0
        for w in self.workers.values():
            if w.state == STARTING:
                return False
            if w.state == READY:
                ready += 1
        return ready >= self.cfg.max_workers

    def _dispatch(self) -> None:
        if self.queue:
            ready = [w for w in self.workers.values() if w.state == READY]
            # Idle workers first, then one level deeper on each, round robin. A
            # prefetched task waits behind the one running, so prefetch only when the
            # pool cannot grow: while a worker is still starting (or more may start)
            # the next task must go to it, or two tasks that need to run side by side
            # would run one after the other.
            if self._pool_is_full():
                now = time.monotonic()
                limits = [self._prefetch_depth(w, now) for w in ready]
            else:
                limits = [1] * len(ready)
            queue = self.queue
            for depth in range(max(limits, default=0)):
                for w, limit in zip(ready, limits, strict=True):
                    if depth < limit and len(w.inflight) == depth and w.state == READY:
                        self._send_task(w, queue.popleft())
                        if not queue:
                            break
                if not queue:
                    break
            for w in ready:
                if w.out:
                    self._flush(w)
        self._adjust_workers()

    def _prefetch_depth(self, w: _Worker, now: float) -> int:
        """How many tasks ``w`` may hold: the one running plus those in its pipe.

        A task written to a worker's pipe is committed to that worker: if the one ahead
        of it turns out long, it waits while another worker may sit idle. So queue
        deep only for tiny tasks, as many as fit in _PREFETCH_BUDGET at the recent
        average run time, and never behind a task already running longer than that.
        Deep pipes are what make tiny tasks fast: one write carries many tasks, and a
        worker works through them while the manager sleeps or reads results.
        """
        avg = self._avg_run
        if avg is None or avg > _PREFETCH_BUDGET:
            # Unknown or long tasks: nothing waits in a pipe. One round trip of idle
            # time per task costs little next to the task, while a task stuck behind a
            # hung one would wait for its whole timeout with another worker idle.
            return 1
        if w.inflight and now - w.inflight[0].started > _PREFETCH_BUDGET:
            return 1  # the running one already looks long: queue nothing behind it
        return max(_PREFETCH_MIN, min(_PREFETCH_MAX, int(_PREFETCH_BUDGET / max(avg, 1e-6))))

    def _send_task(self, w: _Worker, item: WorkItem) -> None:
        if not item.sent:
            if not item.future.set_running_or_notify_cancel():
                self.stats.cancelled += 1
                return  # cancelled while queued
            item.sent = True
        item.pid = w.pid
        w.inflight.append(item)
        if len(w.inflight) == 1:
            self._start_clock(w, item, time.monotonic())
        payload = item.payload
        if type(payload) is bytes:
            if len(payload) < _JOIN_BELOW:
                self._queue_frame(w, proto.frame(proto.TASK, item.task_id, payload))
            else:  # a large payload is not copied: header and payload go out by writev
                self._queue_frame(w, proto.HEADER.pack(proto.TASK, item.task_id, len(payload)))
                self._queue_frame(w, payload)
        else:  # arrays and such, written from the caller's memory (see OOBPayload)
            assert isinstance(payload, proto.OOBPayload)
            self._queue_frame(w, proto.HEADER.pack(proto.TASK_OOB, item.task_id, payload.size))
            for part in payload.parts:
                self._queue_frame(w, part)
        w.tasks_sent += 1
        limit = self.cfg.max_tasks_per_child
        if limit is not None and w.tasks_sent >= limit:
            self._queue_frame(w, proto.frame(proto.EXIT))
            w.state = RETIRING

    def _start_clock(self, w: _Worker, item: WorkItem, now: float) -> None:
        """The task at the head of a worker's pipe starts now (deadlines count from here).

        Only a start counts as an attempt: a task that waited in a killed worker's pipe
        goes back to the queue without having used one.
        """
        item.started = now
        item.attempts += 1
        if item.max_memory is not None:
            w.next_memory = now  # sample at once, then every _MEMORY_INTERVAL

    def _queue_frame(self, w: _Worker, data: bytes | bytearray | memoryview) -> None:
        if data:
            w.out.append(memoryview(data))

    def _flush(self, w: _Worker) -> None:
        """Write what the pipe takes now; the rest waits for POLLOUT."""
        fd = w.proc.to_worker
        out = w.out
        try:
            while out:
                n = os.writev(fd, out if len(out) <= _IOV_MAX else list(itertools.islice(out, _IOV_MAX)))
                while n:
                    head = out[0]
                    if n >= len(head):
                        n -= len(head)
                        out.popleft()
                    else:
                        out[0] = head[n:]
                        n = 0
        except BlockingIOError:
            pass
        except OSError:
            out.clear()  # the worker is gone; its pidfd will tell us
        if out and not w.want_write:
            w.want_write = True
            self._register(fd, select.POLLOUT, self._WRITE, w)
        elif not out and w.want_write:
            w.want_write = False
            self._unregister(fd)

    def _read_results(self, w: _Worker) -> None:
        if not w.reading:
            return
        fd = w.proc.from_worker
        reader = w.reader
        while True:
            try:
                frames = reader.read_from(fd)
            except BlockingIOError:
                return
            except OSError:
                frames = None
            if frames is None:
                # EOF: the worker closed its end. Not death (see _process), just quiet.
                w.reading = False
                self._unregister(fd)
                return
            for kind, ident, payload in frames:
                self._on_frame(w, kind, ident, payload)
            if reader.drained:
                return  # the pipe is empty: spare the read that would say so

    def _on_frame(self, w: _Worker, kind: int, ident: int, payload: bytes | bytearray) -> None:
        if kind == proto.RESULT or kind == proto.ERROR or kind == proto.RESULT_OOB:
            self._on_answer(w, kind, ident, payload)
        elif kind == proto.RESULT_SHM:
            # The channel carries one memfd per RESULT_SHM frame, in frame order: take
            # it now, whatever becomes of this answer.
            channel = w.proc.channel
            shm = proto.ShmPayload(payload, -1 if channel is None else proto.take_fd(channel))
            if not self._on_answer(w, kind, ident, shm):
                shm.close()
        elif kind == proto.READY:
            if w.state == STARTING:
                w.state = READY
            self._start_failures = 0
        elif kind == proto.INIT_FAILED:
            summary, text = proto.loads(payload)
            w.init_failed = True
            logger.warning("initializer failed in worker pid=%d: %s", w.pid, summary)
            init_err = WorkerInitializerError(
                f"the executor's initializer failed in a new worker: {summary}", text
            )
            self._fail_queue(init_err)
            self._target = 0  # do not restart workers to fail again; a new submit will

    def _on_answer(self, w: _Worker, kind: int, ident: int, payload: Any) -> bool:
        """A task's outcome arrived; False if nobody waits for it any more."""
        if not w.inflight or w.inflight[0].task_id != ident:
            return False  # a late answer from a worker we already gave up on
        item = w.inflight.popleft()
        now = time.monotonic()
        run = now - item.started
        avg = self._avg_run
        self._avg_run = run if avg is None else avg + _AVG_WEIGHT * (run - avg)
        if w.inflight:
            self._start_clock(w, w.inflight[0], now)
        self._start_failures = 0
        if kind == proto.ERROR:
            self._fail(item, proto.load_exception(payload), "error", now)
            return True
        try:
            if kind == proto.RESULT:
                value = proto.loads(payload)
            elif kind == proto.RESULT_OOB:
                value = proto.loads_oob(payload)
            else:
                value = payload.load()  # RESULT_SHM
        except BaseException as exc:
            err = proto.mark_pickling_fault(exc, proto.UNPICKLE_RESULT)
            self._fail(item, err, "error", now)
            return True
        _set_info(item, "ok", now)
        self.stats.completed += 1
        self._resolve(item, value)
        return True

    # ------------------------------------------------------------ outcomes

    def _resolve(self, item: WorkItem, value: Any) -> None:
        fut = item.future
        item.payload = b""
        if not fut.done():
            fut.set_result(value)

    def _fail(self, item: WorkItem, exc: BaseException, outcome: str, now: float) -> None:
        fut = item.future
        item.payload = b""
        _set_info(item, outcome, now)
        if outcome != "cancelled":
            self.stats.failed += 1
        else:
            self.stats.cancelled += 1
        if fut.done():
            return
        if isinstance(exc, CancelledError):
            # A running future cannot be cancelled through the Future API; mark it so.
            with fut._condition:  # type: ignore[attr-defined]
                fut._state = "CANCELLED_AND_NOTIFIED"  # type: ignore[attr-defined]
                fut._condition.notify_all()  # type: ignore[attr-defined]
            fut._invoke_callbacks()  # type: ignore[attr-defined]
            return
        fut.set_exception(exc)

    def _fail_or_retry(self, item: WorkItem, exc: BaseException, outcome: str, now: float) -> None:
        """A worker was lost under this task: run it again if retries remain.

        Retries go on during a plain shutdown: the future is still running and
        shutdown(wait=True) waits for running futures. (terminate/kill fail in-flight
        tasks themselves and never come through here.)
        """
        if item.attempts <= item.retries:
            self.stats.retried += 1
            logger.info(
                "retrying task %d (%s on worker pid=%d; attempt %d of %d)",
                item.task_id, outcome, item.pid, item.attempts + 1, item.retries + 1,
            )
            item.started = 0.0
            item.peak_memory = None  # task_info reports the last attempt, like duration
            self.queue.appendleft(item)
            return
        if hasattr(exc, "attempts"):
            exc.attempts = item.attempts
            if exc.args:  # keep repr() and args in step; attempts is the last argument
                exc.args = (*exc.args[:-1], item.attempts)
        self._fail(item, exc, outcome, now)

    def _fail_queue(self, exc: BaseException) -> None:
        now = time.monotonic()
        while self.queue:
            item = self.queue.popleft()
            if not item.sent and not item.future.set_running_or_notify_cancel():
                continue
            self._fail(item, exc, "crashed", now)

    def _requeue(self, items: deque[WorkItem]) -> None:
        """Tasks sent to a worker that never started them go back to the front."""
        for item in reversed(items):
            item.started = 0.0
            self.queue.appendleft(item)
        items.clear()

    # ------------------------------------------------------------ timers

    def _check_timers(self, now: float) -> None:
        for w in list(self.workers.values()):
            st = w.state
            if st in (READY, RETIRING) and w.inflight:
                head = w.inflight[0]
                if head.timeout is not None and now >= head.started + head.timeout:
                    self._on_timeout(w, head, now)
                elif head.max_memory is not None and now >= w.next_memory:
                    self._sample_memory(w, head, now)
            elif st == KILLING and not w.kill_sent and w.kill_at is not None and now >= w.kill_at:
                self._escalate(w)
            elif st == DEAD and now >= w.next_check:
                self._check_dead(w, now)

    def _on_timeout(self, w: _Worker, item: WorkItem, now: float) -> None:
        self._read_results(w)  # the answer may be sitting in the pipe
        if not w.inflight or w.inflight[0] is not item:
            return
        stack = self._collect_stack(w)
        w.inflight.popleft()
        self.stats.timed_out += 1
        logger.warning(
            "task %d timed out after %gs on worker pid=%d pgid=%d; killing its group",
            item.task_id, item.timeout, w.pid, w.pid,
        )
        self._kill(w, "timeout", hard=False, now=now)
        assert item.timeout is not None
        err = TaskTimeoutError(item.timeout, w.pid, stack, item.attempts)
        self._fail_or_retry(item, err, "timeout", time.monotonic())
        self._spawn_after = time.monotonic() + _SPAWN_PAUSE

    def _collect_stack(self, w: _Worker) -> str | None:
        """Ask the worker for a faulthandler dump of its threads; wait briefly."""
        fd = w.proc.dump
        try:
            while os.read(fd, 65536):  # drop anything stale
                pass
        except (BlockingIOError, OSError):
            pass
        if not proc_mod.signal_leader(w.pid, DUMP_SIGNAL):
            return None
        proc_mod.signal_leader(w.pid, signal.SIGCONT)  # a stopped worker cannot answer
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        dump = bytearray()
        deadline = time.monotonic() + _STACK_WAIT
        while not proc_mod.dump_is_complete(w.proc, dump):
            left_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            settled = dump.endswith(b"\n")
            if not poller.poll(min(left_ms, _STACK_QUIET_MS) if settled else left_ms):
                if settled:
                    break
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not data:
                break
            dump += data
        text = dump.decode("utf-8", "replace").strip()
        return text or None

    #: A task's first memory sample waits this long after its start. A sample costs
    #: ~0.5 ms per process of the group (benchmarks/memory_sampling.py); taken at
    #: every start it slowed tiny limited tasks (0.66-0.83x throughput there).
    _FIRST_SAMPLE = 0.02

    def _sample_memory(self, w: _Worker, item: WorkItem, now: float) -> None:
        first = item.started + self._FIRST_SAMPLE
        if now < first:
            w.next_memory = first
            return
        w.next_memory = now + _MEMORY_INTERVAL
        used = proc_mod.group_memory(w.pid)
        limit = item.max_memory
        if limit is not None and used > limit:
            # The task may have finished with its answer still in the pipe: then the
            # memory belongs to no running task and killing would fail a success.
            self._read_results(w)
            if not w.inflight or w.inflight[0] is not item or w.state not in (READY, RETIRING):
                return
        if item.peak_memory is None or used > item.peak_memory:
            item.peak_memory = used
        if limit is not None and used > limit:
            w.inflight.popleft()
            self.stats.memory_killed += 1
            logger.warning(
                "task %d: group of worker pid=%d uses %d bytes, over its limit of %d; killing it",
                item.task_id, w.pid, used, limit,
            )
            self._kill(w, "memory limit", hard=True, now=now)
            err = MemoryLimitError(used, limit, w.pid, -signal.SIGKILL, item.attempts)
            self._fail_or_retry(item, err, "memory", now)

    # ------------------------------------------------------------ killing and death

    def _kill(self, w: _Worker, reason: str, *, hard: bool, now: float) -> None:
        """Signal a live worker's group; its leader's death finishes the job."""
        if w.state in (KILLING, DEAD):
            return
        w.state = KILLING
        w.reason = reason
        self.stats.workers_killed += 1
        self._requeue(w.inflight)
        w.out.clear()
        if w.want_write:
            w.want_write = False
            self._unregister(w.proc.to_worker)
        # The leader is alive (hence unreaped): its pgid is ours to signal.
        if hard:
            proc_mod.signal_group(w.pid, signal.SIGKILL)
            w.kill_sent = True
            w.kill_at = now
        else:
            proc_mod.signal_group(w.pid, signal.SIGTERM)
            w.kill_at = now + self.cfg.kill_grace
        # SIGCONT after SIGTERM: a stopped process would otherwise never act on it.
        proc_mod.signal_group(w.pid, signal.SIGCONT)
        w.term_sent = True

    def _escalate(self, w: _Worker) -> None:
        """The grace period is over and the leader still lives: SIGKILL the group."""
        logger.info("worker pid=%d ignored SIGTERM for %gs; sending SIGKILL", w.pid, self.cfg.kill_grace)
        proc_mod.signal_group(w.pid, signal.SIGKILL)
        w.kill_sent = True

    def _on_exit(self, w: _Worker) -> None:
        if w.state == DEAD:
            return
        dead, code = proc_mod.observe_exit(w.proc)
        if not dead:
            return
        if w.proc.pidfd >= 0:
            self._unregister(w.proc.pidfd)
        self._read_results(w)  # results written before it died still count
        now = time.monotonic()
        was = w.state
        if was in (STARTING, READY, RETIRING):
            if w.inflight:
                item = w.inflight.popleft()
                self.stats.crashed += 1
                logger.warning(
                    "worker pid=%d pgid=%d died (exit code %s) while running task %d",
                    w.pid, w.pid, code, item.task_id,
                )
                err = WorkerCrashedError(w.pid, code)
                self._fail_or_retry(item, err, "crashed", now)
                self._requeue(w.inflight)
                self._spawn_after = time.monotonic() + _SPAWN_PAUSE
            elif was == STARTING and not w.init_failed:
                self._start_failures += 1
                logger.warning("worker pid=%d exited (code %s) before it was ready", w.pid, code)
                if self._start_failures >= _MAX_START_FAILURES:
                    self._fail_queue(
                        WorkerCrashedError(
                            w.pid, code,
                            f"workers exit before they are ready ({self._start_failures} in a row)",
                        )
                    )
                    self._target = 0
            elif was == READY and not self.shutting_down:
                logger.warning("idle worker pid=%d died (exit code %s); replacing it", w.pid, code)
        w.state = DEAD
        if not w.term_sent:
            # Whatever the task left in the group hears SIGTERM first, SIGKILL later.
            proc_mod.signal_group(w.pid, signal.SIGTERM)
            proc_mod.signal_group(w.pid, signal.SIGCONT)
            w.term_sent = True
        if w.kill_at is None:
            w.kill_at = now + self.cfg.kill_grace
        self._check_dead(w, now)

    def _check_dead(self, w: _Worker, now: float) -> None:
        """The leader is a zombie: reap it once its group is empty or the grace is over."""
        assert w.kill_at is not None
        if now < w.kill_at and proc_mod.live_members(w.pid, exclude=w.pid):
            w.next_check = now + 0.02
            return
        self._finish(w)

    def _finish(self, w: _Worker) -> None:
        # Last sweep while the unreaped leader still reserves the pgid. After reap()
        # the number may be recycled: this worker's pgid is never signalled again.
        escalated = w.kill_sent or bool(proc_mod.live_members(w.pid, exclude=w.pid))
        proc_mod.signal_group(w.pid, signal.SIGKILL)
        # The guardian forgets the group before the reap frees its number, so it never
        # holds a pgid that may be recycled.
        _guardian.unregister(w.pid)
        code = proc_mod.reap(w.proc)
        for fd in (w.proc.from_worker, w.proc.to_worker, w.proc.pidfd):
            self._unregister(fd)
        w.proc.close_fds()
        del self.workers[w.pid]
        if w.reason == _NOT_NEEDED:
            logger.debug("worker pid=%d pgid=%d stopped while starting: %s", w.pid, w.pid, w.reason)
        elif w.reason:
            logger.info(
                "worker pid=%d pgid=%d killed (%s) with %s; exit code %s",
                w.pid, w.pid, w.reason, "SIGKILL" if escalated else "SIGTERM", code,
            )
        else:
            logger.debug("worker pid=%d exited with code %s; group cleaned up", w.pid, code)

    # ------------------------------------------------------------ shutdown

    def _finish_shutdown(self) -> bool:
        """With nothing left to run, tell workers to exit; True once all are gone."""
        if self.queue:
            return False
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.state == STARTING and not w.inflight:
                # A replacement still starting (maybe inside a slow initializer) has
                # nothing left to do: stop it rather than make shutdown wait for it.
                self._kill(w, _NOT_NEEDED, hard=False, now=now)
                self.stats.workers_killed -= 1  # housekeeping, not a kill to report
            elif w.state == READY and not w.inflight:
                self._queue_frame(w, proto.frame(proto.EXIT))
                w.state = RETIRING
                self._flush(w)
        return not self.workers

    def _emergency_stop(self) -> None:
        """Last resort if the loop itself fails: kill every group, fail every future."""
        err = BrokenProcessPool("pgexecutor's manager thread failed; see the log")
        for w in list(self.workers.values()):
            if not w.proc.reaped:
                proc_mod.signal_group(w.pid, signal.SIGKILL)
            for item in w.inflight:
                if not item.future.done():
                    item.future.set_exception(err)
            try:
                proc_mod.reap(w.proc)
            except Exception:
                pass
            w.proc.close_fds()
            _guardian.unregister(w.pid)
        self.workers.clear()
        while self.inbox:
            msg = self.inbox.popleft()
            if type(msg) is WorkItem:
                self.queue.append(msg)
        for item in self.queue:
            if not item.sent and not item.future.set_running_or_notify_cancel():
                continue
            if not item.future.done():
                item.future.set_exception(err)
        self.queue.clear()

    def _close(self) -> None:
        with self._wake_lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._wake_r, self._wake_w):
                self._unregister(fd)
            proc_mod.unmark_parent_only(self._wake_r, self._wake_w)
            os.close(self._wake_r)
            os.close(self._wake_w)


# ---------------------------------------------------------------- interpreter exit

_live: weakref.WeakSet[Manager] = weakref.WeakSet()
_global_shutdown = False
_exit_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """The parent's managers are not the child's: their threads do not exist in a
    forked child, and its exit must not post to (or wait for) them. The exit lock may
    have been copied held."""
    global _exit_lock
    _live.clear()
    _exit_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def track(manager: Manager) -> None:
    _live.add(manager)


def _exiting_on_interrupt() -> bool:
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return isinstance(last, KeyboardInterrupt)


def _python_exit() -> None:
    """At interpreter exit: finish submitted work (as ProcessPoolExecutor does) unless
    the program is dying of Ctrl-C, in which case kill every worker group at once."""
    global _global_shutdown
    with _exit_lock:
        _global_shutdown = True
    managers = list(_live)
    hard = _exiting_on_interrupt()
    for m in managers:
        if hard:
            m.post(("terminate", True, "the program was interrupted"))
        else:
            m.post(("shutdown", False))
    try:
        for m in managers:
            m.thread.join()
    except KeyboardInterrupt:
        _kill_everything(managers)
        raise


def _kill_everything(managers: list[Manager]) -> None:
    for m in managers:
        m.post(("terminate", True, "the program was interrupted"))
    for m in managers:
        m.thread.join(timeout=5.0)


def _atexit_last_resort() -> None:
    """Runs after threads were joined; anything still alive here is killed."""
    managers = [m for m in list(_live) if m.thread.is_alive()]
    if managers:
        _kill_everything(managers)


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
import atexit  # noqa: E402

atexit.register(_atexit_last_resort)
