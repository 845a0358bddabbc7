"""The manager loop: the one owner of every worker, queued task and deadline.

Data flow (one way, like CPython's ``concurrent/futures/process.py``)::

    caller threads                    manager thread                     workers
    --------------                    --------------                     -------
    submit(fn, *args)                                                    (each leads its own
      |  pickle (fn, args) HERE, no                                        process group)
      |  lock held: a bad argument
      |  fails this future only
      v
    Mailbox (deque) --wake pipe-->  poll() on: wake pipe,         TASK  +----------+
      :                           every worker's result pipe,   ------> | worker 1 | -> children,
      :                           every worker's pidfd          <------ |  (pgid)  |    grandchildren
      :                           timeout = nearest deadline    RESULT  +----------+
      :                               |                           ^      (a large result's
      :.. idle worker, manager asleep, no deadline: the caller ...:       buffers come in a
          writes the TASK itself (try_dispatch, under _lock)              memfd, over a socket)
                                      |
                                      +-- results/errors ---> Ledger: count, TaskInfo ------+
                                      |   (still pickled)                                  |
                                      +-- not a valid frame -> SIGKILL group, fail its task |
                                      |   (WorkerProtocolError), the rest goes on          v
                                      |                         delivery thread (_delivery):
                                      |                         unpickle, set_result /
                                      |                         set_exception, done-callbacks
                                      |                         (user's, journal's, bars'),
                                      |                         in order. Our own errors of a
                                      |                         future with no callback end
                                      |                         right here (TaskFuture.end_now)
                                      +-- a detector kills -> stack dump, SIGTERM+SIGCONT group,
                                      |   (_supervision)      SIGKILL after kill_grace, replace
                                      +-- long task ahead --> take back the tasks waiting behind
                                      |                       it (permits), run them elsewhere
                                      +-- pidfd readable ---> fail the running task, requeue the
                                                              rest, kill the group, THEN reap

The parts, each in its own module: ``_mailbox`` (how other threads reach this one),
``_worker_handle`` (one worker: state, pipes, timers, its group), ``_supervision``
(the detectors: time limits fixed or learned, memory, stalls, heartbeats; what each
concludes), ``_scheduling`` (how many workers, how deep each pipe), ``_ledger``
(outcomes, counters, TaskInfo), ``_delivery`` (the thread that unpickles outcomes and
ends futures),
``_process`` (POSIX: start, signal, reap), ``_platform`` (pidfd or polling),
``_guardian`` (the parent's death) and ``_exit`` (interpreter exit, fork). This module
joins them: the loop, the events, the commands, applying what supervision concludes,
death, reaping and shutdown.

Nothing a task controls runs here: no unpickling of what a worker sent (the delivery
thread does it), no done-callback, and what a worker writes is checked frame by frame
(``FrameReader`` with limits, then the frame's kind against the worker's state). A
worker that breaks the protocol, or whose event handling raises, is killed with its
group and its task fails; the loop goes on (``_contained``). Only a failure outside
any one worker's handling stops the pool (``_emergency_stop``).

Ownership (who may write what):

============================  =====================================================
state                          owner
============================  =====================================================
``queue``, ``workers``,        whoever holds ``Manager._lock``: the manager thread,
worker handles, ``scheduler``, which lets go only while it sleeps in poll(); then a
``ledger``/stats, ``pids``,    caller may take it without waiting (``try_dispatch``)
``_dump`` (stack-dump pipe),
``supervisor`` (learned times)
``mailbox.inbox``              any thread appends; the manager pops
``mailbox.sweep_due``          any thread sets (a cancel); the manager clears
``mailbox`` wake/close         ``Mailbox._lock``
``shutting_down``,             the manager thread
``_eof_due``
delivery job queue             the manager puts, the delivery thread gets
``finished``                   the delivery thread sets it, after the manager ended
                               and every job (future, callback) was done
``Stats.unpickle_failed``,     the delivery thread (a result that did not unpickle)
that task's TaskInfo.outcome
executor ``_shutdown``,        ``ProcessGroupExecutor._shutdown_lock``
``_started``, its counts
guardian registry              ``_guardian._lock``
spawn bookkeeping              ``_process._spawn_lock``
============================  =====================================================

Lock order: ``_shutdown_lock`` -> ``Manager._lock`` (only ever tried, never waited
for, from a caller) -> ``Mailbox._lock``; ``Manager._lock`` -> ``_process._spawn_lock``
and ``Manager._lock`` -> ``_guardian._lock``. No lock is held while pickling. Futures
are resolved in the delivery thread, which holds none of these locks, so done-callbacks
run there; anything they call must not wait for the executor to finish
(``shutdown()`` raises there, see the executor). The manager ends a future itself
only with an exception of its own (timeout, crash, cancel) and only when no callback
is attached (``TaskFuture.end_now``): that runs no user code.

The loop never blocks on a worker: pipes are non-blocking and partially written
frames wait in the worker's buffer. Tiny tasks go deep into each worker's pipe
(``Scheduler.depth``), so one write carries many and a worker works through them while
the manager sleeps; a result is written the moment its task ends, which is how the
manager knows the next one began.
"""

from __future__ import annotations

import errno
import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from typing import Any

from . import _exit, _guardian, _platform
from . import _process as proc_mod
from . import _protocol as proto
from ._delivery import Delivery, Encoded
from ._ledger import Ledger, Stats, TaskInfo, WorkItem
from ._mailbox import Command, KillTask, Mailbox, Shutdown, Terminate
from ._scheduling import MAX_START_FAILURES, SHORTAGE_ERRNOS, Scheduler
from ._supervision import ASK_STACK, Kill, Supervisor, Watch
from ._worker_handle import SERVING, DumpGate, State, WorkerHandle
from .errors import WorkerCrashedError, WorkerInitializerError, WorkerProtocolError

__all__ = ["Manager", "ManagerConfig", "TaskInfo", "WorkItem", "Stats"]

logger = logging.getLogger("pgexecutor")

_POLL_EXIT_INTERVAL = 0.05  # without pidfds, how often to look for dead workers
# The longest single sleep in poll(). Deadlines can be huge (a task_timeout of 1e9 s):
# poll() takes an int of milliseconds and overflows past ~24 days, so the loop wakes
# at least this often and sleeps again.
_MAX_SLEEP = 3600.0
_DIRECT_MAX = 1 << 14  # try_dispatch takes payloads below this (an empty pipe takes them whole)
#: A worker's result pipe at EOF while it owes an answer: how long its death may take
#: to show (the kernel closes a dying process's fds before its pidfd turns readable;
#: for a process with many threads or much memory that can take a while) before the
#: closed pipe counts as a protocol violation (a task closed the fd, or reused it).
_EOF_GRACE = 1.0
#: At most this many reads of one worker's pipe per event: a worker that writes
#: without pause must not keep the loop from its deadlines.
_READS_PER_EVENT = 16
_READS_AT_EXIT = 1024  # a dead worker's pipe holds what it wrote (unless a child writes on)
#: why a still-starting worker is stopped at shutdown (logged at DEBUG: the normal path)
_NOT_NEEDED = "not needed: the executor is shutting down"

_WAKE, _RESULT, _PIDFD, _WRITE = range(4)  # what a polled fd is


def _task_id(item: WorkItem) -> int:
    return item.task_id


@dataclass(frozen=True)
class ManagerConfig:
    max_workers: int
    mp_context: Any
    init_payload: bytes
    max_tasks_per_child: int | None
    kill_grace: float
    #: seconds a worker's initializer may run (from INIT_BEGUN), or None
    init_timeout: float | None = None
    py_spy: str | None = None  # native_stacks=True: the py-spy executable (see _native)


class Manager:
    """Owns the workers and the queue; runs in its own thread (see module docstring)."""

    def __init__(self, config: ManagerConfig) -> None:
        self.cfg = config
        self.mailbox = Mailbox()
        self.queue: deque[WorkItem] = deque()  # not handed to any worker (now)
        self.workers: dict[int, WorkerHandle] = {}
        self.scheduler = Scheduler(config.max_workers)
        self.delivery = Delivery()
        self.ledger = Ledger(self.delivery)
        self.supervisor = Supervisor(config.py_spy)  # the detectors; learned run times
        self.shutting_down = False
        # Pids of the workers serving the executor, republished on every change;
        # other threads read this tuple and nothing else of ``workers``.
        self.pids: tuple[int, ...] = ()
        self._poller = select.poll()
        self._fd_owner: dict[int, tuple[int, WorkerHandle | None]] = {}
        self._register(self.mailbox.wake_r, select.POLLIN, _WAKE, None)
        self._use_pidfd = _platform.USE_PIDFD  # False once a worker came without one
        self._dump: tuple[int, int] | None = None  # the workers' stack-dump pipe (r, w)
        self._dump_gate = DumpGate()  # which worker's dump that pipe may carry now
        self._refusals_logged: set[tuple[str, int | None]] = set()  # causes of failed starts
        self._next_exit_poll = 0.0  # without pidfds: next look for dead workers
        # Workers whose result pipe hit EOF while they owed an answer -> when that
        # becomes a protocol violation (unless their death shows first).
        self._eof_due: dict[WorkerHandle, float] = {}
        self._lock = threading.Lock()  # see the ownership table
        self._serving = False  # the loop runs: try_dispatch may act for it
        self.thread = threading.Thread(target=self._run, name="pgexecutor-manager", daemon=True)

    @property
    def stats(self) -> Stats:
        return self.ledger.stats

    @property
    def finished(self) -> threading.Event:
        """Set once everything ended: the manager's thread, then every delivery (each
        future resolved, each of its done-callbacks run)."""
        return self.delivery.finished

    @property
    def resolver(self) -> threading.Thread:
        """The thread that resolves this manager's futures and runs their callbacks."""
        return self.delivery.thread

    # ------------------------------------------------------------ other threads' API

    def start(self) -> None:
        _exit.track(self)  # only started managers: interpreter exit joins their threads
        _guardian.hold()  # released when the thread ends: the last release ends it
        self.delivery.start()
        self.thread.start()

    def post(self, msg: WorkItem | Command) -> None:
        self.mailbox.post(msg)

    def on_manager_thread(self) -> bool:
        """True in a thread of this manager: the loop, or the delivery thread, where
        done-callbacks run. Anything there that waits for the manager to finish
        would wait for itself."""
        current = threading.current_thread()
        return current is self.delivery.thread or current is self.thread

    def try_dispatch(self, item: WorkItem) -> bool:
        """Hand ``item`` to an idle worker from the caller's thread, if that is safe now.

        It saves the hop through the manager thread, a wake-up and a GIL hand-off that
        make up a third of a round trip. The manager changes its state only while it
        holds ``_lock`` and lets go of it only to sleep in poll(), so whoever holds the
        lock owns the state. We do only what needs no later attention from the
        sleeping manager: nothing to supervise (it would not wake for it),
        a small frame written whole (no POLLOUT to watch), no older work queued (order),
        an idle worker (what dispatch would pick; the queue stays empty, so no new
        worker is due). Otherwise, or when the manager is awake (the lock is taken),
        False: post the item as usual.
        """
        payload = item.payload
        if item.settings.watched:
            return False
        if type(payload) is not bytes or len(payload) >= _DIRECT_MAX:
            return False
        if self.mailbox.inbox or self.queue:  # a hint, checked again under the lock
            return False
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if not self._serving or self.shutting_down or self.queue or self.mailbox.inbox:
                return False
            for w in self.workers.values():
                if w.state is State.READY and not w.inflight and not w.out and w.reading:
                    break
            else:
                return False
            if self._send(w, item, time.monotonic()):
                self._flush(w)
                if w.out:  # the pipe took only part after all: the manager must watch it
                    self.mailbox.wake()
            return True  # sent, or cancelled meanwhile (dropped, waiters told)
        finally:
            self._lock.release()

    def close_unstarted(self) -> None:
        """Shut down a manager whose thread never started: only its pipe to close."""
        self.mailbox.close()
        self.delivery.close_unstarted()

    def abandon_after_fork(self) -> None:
        """In a forked child: this manager is the parent's. Its thread does not exist
        here and its workers are the parent's, so nothing may reach them from here.
        Locks and the event may have been copied held by threads that do not exist in
        the child. (The fds themselves are closed by _process's at-fork hook.)"""
        self.mailbox.abandon_after_fork()
        self._lock = threading.Lock()
        self._serving = False
        self.delivery.abandon_after_fork()

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            with self._lock:  # ours while we run; let go only in poll (try_dispatch)
                self._serving = True
                try:
                    self._loop()
                finally:
                    self._serving = False
        except BaseException:
            logger.critical("pgexecutor manager crashed; killing all workers", exc_info=True)
            self._emergency_stop()
        finally:
            self._unregister(self.mailbox.wake_r)
            self.mailbox.close()
            _guardian.release()
            self.delivery.close()  # its thread ends after the last delivery: finished

    def _loop(self) -> None:
        # Act first, then sleep: whatever was posted before the thread started (the
        # first tasks, or a shutdown) must be dispatched without waiting for a wake-up.
        self._drain_mailbox()
        while True:
            now = time.monotonic()
            if not self._use_pidfd and now >= self._next_exit_poll:
                self._next_exit_poll = now + _POLL_EXIT_INTERVAL
                for w in list(self.workers.values()):
                    if w.state is not State.DEAD:
                        self._on_exit(w)
            if self.mailbox.sweep_due:
                self._sweep_cancelled()
            for w in list(self.workers.values()):
                due = w.next_due()
                if due is not None and now >= due:
                    self._contained(self._on_timer, w, now)
            if self._eof_due:
                for w, due in list(self._eof_due.items()):
                    if now >= due:
                        self._contained(self._on_eof_due, w)
            self._dispatch()
            if self.shutting_down and self._finish_shutdown():
                return
            self._wait_for_events()

    def _wait_for_events(self) -> None:
        timeout = self._next_wakeup()
        ms = -1 if timeout is None else int(min(timeout, _MAX_SLEEP) * 1000 + 0.999)
        self._lock.release()
        try:
            events = self._poller.poll(ms)
        finally:
            self._lock.acquire()
        for fd, _ev in events:
            owner = self._fd_owner.get(fd)
            if owner is None:
                continue
            kind, w = owner
            if kind == _WAKE:
                self._drain_mailbox()
            elif w is None:
                continue
            elif kind == _RESULT:
                self._contained(self._read_results, w)
            elif kind == _PIDFD:
                self._contained(self._on_exit, w)
            else:
                self._contained(self._flush, w)

    def _next_wakeup(self) -> float | None:
        """Seconds until the nearest timer of any worker; None to sleep until woken."""
        best: float | None = None
        for w in self.workers.values():
            t = w.next_due()
            if t is not None and (best is None or t < best):
                best = t
        now = time.monotonic()
        if not self._use_pidfd and self.workers:
            best = self._next_exit_poll if best is None else min(best, self._next_exit_poll)
        spawn = self.scheduler.next_spawn(now)
        if spawn is not None:
            best = spawn if best is None else min(best, spawn)
        for t in self._eof_due.values():
            best = t if best is None else min(best, t)
        return None if best is None else max(0.0, best - now)

    def _contained(self, handle: Callable[..., None], w: WorkerHandle, *args: Any) -> None:
        """Handle one event of ``w``; whatever goes wrong is ``w``'s alone.

        A bug of ours, or a state no one foresaw, while handling one worker must
        not end the loop (that would break the pool for every future): the worker's
        group is killed and its task fails; the others go on.
        """
        try:
            handle(w, *args)
        except Exception as exc:
            logger.error(
                "pgexecutor failed while handling worker pid=%d; killing its group",
                w.pid, exc_info=True,
            )
            detail = f"pgexecutor failed while handling this worker ({type(exc).__name__}: {proto.safe_str(exc)}); see the log"
            self._give_up_on(w, WorkerCrashedError(w.pid, None, detail), "internal error")

    # ------------------------------------------------------------ poll bookkeeping

    def _register(self, fd: int, mask: int, kind: int, worker: WorkerHandle | None) -> None:
        self._poller.register(fd, mask)
        self._fd_owner[fd] = (kind, worker)

    def _unregister(self, fd: int) -> None:
        if self._fd_owner.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except (KeyError, ValueError):
                pass

    # ------------------------------------------------------------ mailbox and commands

    def _drain_mailbox(self) -> None:
        inbox = self.mailbox.take()
        while inbox:
            msg = inbox.popleft()
            if type(msg) is WorkItem:
                self.queue.append(msg)
                continue
            # Tasks submitted before the command are handed out first (to workers
            # started for them, still starting included): a shutdown with
            # cancel_futures right after a burst of submits cancels only what no
            # worker took, as with the standard library's call queue.
            if self.queue and not self.shutting_down:
                self._dispatch()
            self._command(msg)

    def _command(self, cmd: Command) -> None:
        if isinstance(cmd, Shutdown):
            self.shutting_down = True
            if cmd.cancel_futures:
                # Tasks written ahead into a worker's pipe behind the one it runs (or
                # is about to begin) have not begun: take back every one whose permit
                # is unclaimed, so that they are cancelled too. Each worker's next
                # task is kept, begun or not (a worker still starting holds just that
                # one), as the standard library keeps what its call queue holds:
                # CPython's own test_cancel_futures requires that some of a burst
                # submitted right before the shutdown completes.
                for w in list(self.workers.values()):
                    if w.state is State.READY or w.state is State.RETIRING:
                        self._revoke(w)
                self._cancel_queue(running_too=False)
        elif isinstance(cmd, Terminate):
            self._terminate(cmd.hard, cmd.reason)
        elif isinstance(cmd, KillTask):
            self._kill_task(cmd.future)
        else:
            raise TypeError(f"not a manager command: {cmd!r}")

    def _terminate(self, hard: bool, reason: str) -> None:
        self.shutting_down = True
        self._cancel_queue(running_too=True)
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.state in SERVING:
                head = w.head()
                if head is not None:
                    w.inflight.popleft()
                    self.ledger.fail(head, WorkerCrashedError(w.pid, None, reason), "crashed", now)
                # Tasks waiting in its pipe never started: cancelled, not crashed.
                while w.inflight:
                    self.ledger.fail(w.inflight.popleft(), CancelledError(), "cancelled", now)
                self._kill(w, reason, hard=hard, now=now)
            elif hard:  # already being killed, or dead: no more grace for anyone
                if w.state is State.KILLING:
                    w.kill_deadline = now
                if w.reap_deadline is not None:
                    w.reap_deadline = now

    def _cancel_queue(self, running_too: bool) -> None:
        """Cancel the queued tasks that no worker has begun, as the standard
        library's ``shutdown(cancel_futures=True)`` does, and more: a task that was
        handed to a worker and came back unbegun (taken back from its pipe, or its
        worker was killed before reaching it) is cancelled too, although its future
        said RUNNING (the pool ends it cancelled: TaskFuture.cancel_running). Only a
        task that began once and is queued again for a retry keeps running: it
        began, and a begun task runs to completion. ``running_too``
        (terminate/kill): nothing more runs, retries included. (Each worker's next
        task is not in the queue: it runs, see _command.)"""
        now = time.monotonic()
        keep: deque[WorkItem] = deque()
        for item in self.queue:
            if item.attempts and not running_too:
                keep.append(item)
            else:
                self.ledger.fail(item, CancelledError(), "cancelled", now)
        self.queue = keep

    def _sweep_cancelled(self) -> None:
        """Drop the queued futures their users cancelled and tell their waiters."""
        self.mailbox.sweep_due = False  # before the sweep: a cancel during it sweeps again
        now = time.monotonic()
        keep: deque[WorkItem] = deque()
        for item in self.queue:
            if not item.sent and item.future.cancelled():
                self.ledger.fail(item, CancelledError(), "cancelled", now)
            else:
                keep.append(item)
        self.queue = keep

    def _kill_task(self, future: Future[Any]) -> None:
        """Stop ``future``'s task for good (a running future's cancel() with
        cancel_running, ``run()``'s cancellation, integrations such as Dask): stop the
        worker running it (SIGINT first, so its finally blocks run), or drop it from
        the queue or from a worker's pipe. The future may be cancelled already (its
        user's cancel() did it); then this only stops the task."""
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.state not in SERVING or not any(i.future is future for i in w.inflight):
                continue
            self._read_results(w)  # answers in the pipe move the head on
            head = w.head()
            if head is not None and head.future is future:
                w.inflight.popleft()
                # The worker lives on through the SIGINT for a moment: take back the
                # permits of the tasks behind it first, so it cannot start one of
                # them while the queue runs them elsewhere (it skips them).
                self.queue.extendleft(w.take_back(everything=True))
                self._kill(w, "its task was cancelled", hard=False, now=now, interrupt=True)
                self.ledger.fail(head, CancelledError(), "cancelled", now)
                return
            self._revoke(w, everything=True)  # waiting in the pipe: take it back
            break
        for item in self.queue:
            if item.future is future:
                self.queue.remove(item)
                self.ledger.fail(item, CancelledError(), "cancelled", now)
                return

    # ------------------------------------------------------------ dispatch

    def _dispatch(self) -> None:
        """Hand queued tasks to workers; start the workers the queue needs and hand
        them their first task at once (handed over is handed over: a shutdown with
        cancel_futures right after still lets it run, as the standard library's call
        queue does)."""
        if not self.queue:
            self._move_from_starting()
        self._hand_out()
        if self._adjust_workers() and self.queue:
            self._hand_out()

    def _move_from_starting(self) -> None:
        """A ready worker has nothing to do while tasks wait in the pipe of one still
        starting (a slow or hung initializer): take them back, so that the ready one
        runs them. Without this, an initializer that hangs (and has no
        initializer_timeout) would hold those tasks, and shutdown, forever although
        another worker is free; with it, the starting worker is left with nothing to
        do, and a shutdown stops it (_finish_shutdown)."""
        # (On every pass of the loop with an empty queue: a plain scan, rarely more.)
        for w in self.workers.values():
            if w.state is State.STARTING and w.inflight:
                break
        else:
            return
        if not any(w.state is State.READY and not w.inflight for w in self.workers.values()):
            return
        for w in list(self.workers.values()):
            if w.state is State.STARTING and w.inflight:
                self._put_back(w.take_back(everything=True))

    def _hand_out(self) -> None:
        if not self.queue:
            return
        # Ready workers first, then those still starting: a task handed to a starting
        # worker is written after its INIT and begins (its clock too) once the
        # initializer ran. Idle workers first, then one level deeper on each, round
        # robin. Prefetch only when the pool cannot grow: while a worker is still
        # starting (or more may start) the next task must go to it, or two tasks that
        # need to run side by side would run one after the other.
        ready = [w for w in self.workers.values() if w.state is State.READY and w.reading]
        starting = [w for w in self.workers.values() if w.state is State.STARTING]
        if not starting and len(ready) >= self.cfg.max_workers:
            now = time.monotonic()
            limits = [self.scheduler.depth(self._running_for(w, now)) for w in ready]
        else:
            limits = [1] * len(ready)
        targets = ready + starting
        limits += [1] * len(starting)
        queue = self.queue
        now = time.monotonic()
        for depth in range(max(limits, default=0)):
            for w, limit in zip(targets, limits, strict=True):
                if depth < limit and len(w.inflight) == depth and w.state in (State.READY, State.STARTING):
                    # Pop until one is sent: futures cancelled meanwhile are dropped.
                    while queue and not self._send(w, queue.popleft(), now):
                        pass
                    if not queue:
                        break
            if not queue:
                break
        for w in targets:
            if w.out or w.permits:
                self._flush(w)

    @staticmethod
    def _running_for(w: WorkerHandle, now: float) -> float | None:
        head = w.head()
        return None if head is None else now - head.started

    def _send(self, w: WorkerHandle, item: WorkItem, now: float) -> bool:
        """Queue ``item`` for ``w``; False if its user cancelled it meanwhile."""
        if not self.ledger.hand_over(item, now):
            return False
        w.queue_task(item, now, self.cfg.max_tasks_per_child)
        return True

    def _flush(self, w: WorkerHandle) -> None:
        """Write what the pipe takes now; the rest waits for POLLOUT."""
        w.flush()
        if w.out and not w.want_write:
            w.want_write = True
            self._register(w.proc.to_worker, select.POLLOUT, _WRITE, w)
        elif not w.out and w.want_write:
            w.want_write = False
            self._unregister(w.proc.to_worker)

    def _revoke(self, w: WorkerHandle, everything: bool = False) -> None:
        """Take back the tasks waiting in ``w``'s pipe behind a long one and queue them
        first, to run on whichever worker is free (see _process.permit_pipe)."""
        self._read_results(w)  # finished ones are not waiting any more
        back = w.take_back(everything)
        if back:
            self._put_back(back)
            logger.debug("took %d waiting task(s) back from worker pid=%d", len(back), w.pid)

    def _requeue(self, items: Iterable[WorkItem]) -> None:
        """Tasks handed to a worker that never began them go back to the front."""
        items = list(items)
        for item in items:
            item.started = 0.0
        self._put_back(items)

    def _put_back(self, items: list[WorkItem]) -> None:
        """Queue tasks that came back from a worker unbegun ahead of the tasks
        submitted after them, in submission (task id) order.

        The race this closes: one pass of the loop can take tasks back from several
        workers (their revoke timers fall due together when their heads were handed
        out together; and a worker slow to claim its head gives that back too).
        Pushing each worker's tasks to the front in turn put the last worker's
        tasks ahead of the first's: a task submitted later went to a worker before
        one submitted earlier, which was then stuck behind a long task. So, with two
        workers each given a long task and tiny ones written ahead behind it, a tiny
        one ran first on a worker that was then blocked by the long task it should
        have begun before (and shutdown(cancel_futures=True) found it FINISHED).
        Only the front of the queue is merged: what waits behind tasks newer than
        these is already in order.
        """
        if not items:
            return
        queue = self.queue
        back = sorted(items, key=_task_id)
        front: list[WorkItem] = []
        for item in back:
            while queue and queue[0].task_id < item.task_id:
                front.append(queue.popleft())
            front.append(item)
        queue.extendleft(reversed(front))

    def _adjust_workers(self) -> bool:
        """Start workers up to the target: replace dead ones, grow for queued work.
        True if it started any."""
        if self.queue:
            busy = sum(1 for w in self.workers.values() if w.state is State.READY and w.inflight)
            self.scheduler.grow_for(len(self.queue), busy)
        elif self.shutting_down:
            return False
        active = sum(1 for w in self.workers.values() if w.state in (State.STARTING, State.READY))
        if active >= self.scheduler.target:
            return False
        now = time.monotonic()
        if active >= self.scheduler.limit(now) or self.scheduler.spawn_paused(now):
            return False  # enough, backing off, or a caller was just woken: let it run first
        started = False
        while active < self.scheduler.limit(now):
            try:
                self._spawn()
            except OSError as exc:
                self._start_refused(exc, active, now)
                return started
            self.scheduler.start_succeeded()
            active += 1
            started = True
        return started

    def _start_refused(self, exc: OSError, running: int, now: float) -> None:
        """A worker could not start. Resources run short (fds, processes, memory):
        run on the ``running`` workers there are and try again after a back-off;
        the queue waits for them. Only with no worker at all, and once none could be
        started for ``Scheduler.give_up_after`` seconds (at once if the cause will not pass by
        waiting, such as a missing executable), do the queued tasks fail, with the
        cause in their error. Logged once per cause (WARNING), not once per retry."""
        sched = self.scheduler
        sched.start_refused(now, running)
        name = errno.errorcode.get(exc.errno or 0, "")
        cause = f"{exc} ({name})" if name else str(exc)
        key = (type(exc).__name__, exc.errno)
        if key in self._refusals_logged:
            logger.debug("could not start a worker (%s); retrying in %.2gs", cause, sched.backoff)
        else:
            self._refusals_logged.add(key)
            logger.warning(
                "could not start a worker (%s); running on %d worker(s) and trying again "
                "with back-off (logged once)", cause, running,
            )
        if running:
            return
        shortage = exc.errno in SHORTAGE_ERRNOS
        waited = sched.refused_for(now)
        if shortage and waited < sched.give_up_after:
            return
        if shortage:
            reason = f"no worker could be started for {waited:.0f}s: {cause}"
        else:
            reason = f"could not start a worker: {cause}"
        self._fail_queue(partial(WorkerCrashedError, None, None, reason))
        sched.stop_growing()

    def _spawn(self) -> None:
        if self._dump is None:  # one stack-dump pipe for all the workers (see _process)
            self._dump = proc_mod.dump_pipe()
        proc = proc_mod.spawn_worker(self.cfg.mp_context, self._dump)
        try:
            _guardian.register(proc.pid, proc.create_time, self.cfg.kill_grace)
        except OSError:  # the guardian could not start (fds short): nothing may run unguarded
            _guardian.unregister(proc.pid)
            proc_mod.abandon(proc)
            raise
        w = WorkerHandle(proc, self.supervisor, self._dump_gate)
        self.workers[w.pid] = w
        self._publish_pids()
        self.ledger.stats.workers_started += 1
        if proc.pidfd >= 0:
            self._register(proc.pidfd, select.POLLIN, _PIDFD, w)
        else:
            self._use_pidfd = False  # poll for exits from now on (see _platform)
        self._register(proc.from_worker, select.POLLIN, _RESULT, w)
        w.queue_frame(proto.frame(proto.INIT, 0, self.cfg.init_payload))
        if self.shutting_down and not self.queue:
            w.retire()
        self._flush(w)
        logger.debug("started worker pid=%d pgid=%d", w.pid, w.pid)

    def _publish_pids(self) -> None:
        """Republish ``pids``: the workers that serve the executor, i.e. not those
        being killed (signalled, in their kill grace) or dead and not yet reaped.
        One tuple assignment: readers in other threads see the old or the new."""
        self.pids = tuple(w.pid for w in self.workers.values() if w.state in SERVING)

    # ------------------------------------------------------------ results

    def _read_results(self, w: WorkerHandle, reads: int = _READS_PER_EVENT) -> None:
        """Read and handle what ``w`` wrote: at most ``reads`` reads (the next
        poll() comes back for the rest)."""
        for _ in range(reads):
            if not w.reading:
                return
            frames = w.read_frames()
            if frames is None:  # EOF: the worker closed its end. Quiet, not dead.
                self._on_eof(w)
                return
            for kind, ident, payload in frames:
                self._on_frame(w, kind, ident, payload)
            error = w.reader.error
            if error is not None:
                self._unregister(w.proc.from_worker)
                if w.state in SERVING:
                    self._violation(w, error)
                return
            if not frames or w.reader.drained:
                return  # the pipe is empty: spare the read that would say so

    def _on_eof(self, w: WorkerHandle) -> None:
        """The result pipe is at EOF. A worker that exits closes it (its death shows
        a moment later on its pidfd); so does a task that closes the worker's fd.
        Idle: it gets no more tasks (see _hand_out) and is retired. Owing an
        answer: a protocol violation, unless its death shows within _EOF_GRACE."""
        self._unregister(w.proc.from_worker)
        if w.state not in SERVING:
            return
        if w.inflight:
            self._eof_due[w] = time.monotonic() + _EOF_GRACE
        elif w.state is not State.RETIRING:
            w.retire()
            self._flush(w)

    def _on_eof_due(self, w: WorkerHandle) -> None:
        del self._eof_due[w]
        self._on_exit(w)  # without pidfds, its death may not have been looked for yet
        if w.state in SERVING and w.inflight:
            pending = w.reader.pending()
            partial_frame = f", {pending} bytes of an unfinished frame left" if pending else ""
            self._violation(w, f"protocol violation: the worker closed its result pipe while it owed an answer{partial_frame}")

    def _violation(self, w: WorkerHandle, detail: str) -> None:
        """``w`` wrote what the protocol does not allow (``detail`` says what): its
        group is killed, its running task fails with WorkerProtocolError."""
        head = w.head()
        logger.error(
            "worker pid=%d pgid=%d (%s, running %s): %s; killing its group",
            w.pid, w.pid, w.state.value, f"task {head.task_id}" if head else "no task", detail,
        )
        err = WorkerProtocolError(w.pid, detail, head.attempts if head is not None else 1)
        self._give_up_on(w, err, "protocol violation")

    def _give_up_on(self, w: WorkerHandle, err: BaseException, reason: str) -> None:
        """Kill ``w``'s group (SIGKILL: it cannot be trusted to finish) and fail its
        running task with ``err`` (or retry it); tasks waiting behind it are requeued."""
        now = time.monotonic()
        self._eof_due.pop(w, None)
        w.reading = False
        self._unregister(w.proc.from_worker)
        if w.state not in SERVING:
            return
        head = w.head()
        if head is not None:
            w.inflight.popleft()
        starting = w.state is State.STARTING
        self._kill(w, reason, hard=True, now=now)
        if head is not None:
            self._retry_or_fail(head, err, "crashed", now)
        elif starting and self.scheduler.start_failed():
            # Its initializer wrote garbage: a replacement would do the same.
            self._fail_queue(partial(WorkerCrashedError, w.pid, None, f"workers fail before they are ready: {err}"))
            self.scheduler.stop_growing()

    def _on_frame(self, w: WorkerHandle, kind: int, ident: int, payload: bytes | bytearray) -> None:
        if kind == proto.RESULT:  # the common case first
            if w.state in SERVING:
                self._on_answer(w, kind, ident, payload)
            return
        if kind == proto.RESULT_SHM:
            # The channel carries one memfd per RESULT_SHM frame, in frame order: take
            # it now, whatever becomes of this answer.
            channel = w.proc.channel
            shm = proto.ShmPayload(payload, -1 if channel is None else proto.take_fd(channel))
            if w.state not in SERVING:
                shm.close()
            elif shm.fd < 0:
                self._violation(w, f"protocol violation: a RESULT_SHM frame for task {ident} came without its shared memory")
            elif not self._on_answer(w, kind, ident, shm):
                shm.close()
            return
        if w.state not in SERVING:
            return  # a worker we gave up on: whatever it still says is moot
        if kind == proto.ERROR or kind == proto.RESULT_OOB:
            self._on_answer(w, kind, ident, payload)
        elif kind == proto.UNPICKLED:
            head = w.head()
            if head is None or head.task_id != ident:
                self._violation(w, self._unexpected(w, "UNPICKLED", ident))
                return
            # Its imports were not its run time: its clock starts that much later.
            (took,) = proto.SECONDS.unpack(payload)
            if took == took:  # not NaN
                head.started += max(0.0, min(took, time.monotonic() - head.started))
        elif kind == proto.INIT_BEGUN:
            w.initializer_began(time.monotonic(), self.cfg.init_timeout)
        elif kind == proto.READY:
            # (A worker may be RETIRING before it is ready: its max_tasks_per_child
            # tasks were all handed to it while it started.)
            if w.ready_seen or w.init_failed:
                self._violation(w, self._unexpected(w, "READY", ident))
                return
            if w.state is State.STARTING:
                w.state = State.READY
            w.ready_seen = True
            self.scheduler.start_failures = 0
            if w.inflight and not w.inflight[0].started:
                # Handed over while the worker started: it begins now.
                w.start_clock(w.inflight[0], time.monotonic())
        elif kind == proto.INIT_FAILED:
            if w.ready_seen or w.init_failed:
                self._violation(w, self._unexpected(w, "INIT_FAILED", ident))
                return
            summary, text = proto.decode_init_failure(payload)
            w.init_failed = True
            logger.warning("initializer failed in worker pid=%d: %s", w.pid, summary)
            message = f"the executor's initializer failed in a new worker: {summary}"
            self._requeue(w.inflight)  # handed to it while it started: they fail too
            w.inflight.clear()
            self._fail_queue(partial(WorkerInitializerError, message, text))
            self.scheduler.stop_growing()  # do not restart workers to fail again

    @staticmethod
    def _unexpected(w: WorkerHandle, what: str, ident: int) -> str:
        head = w.head()
        running = f"task {head.task_id}" if head is not None else "no task"
        return f"protocol violation: an unexpected {what} frame (ident {ident}) from a {w.state.value} worker running {running}"

    def _on_answer(self, w: WorkerHandle, kind: int, ident: int, payload: Any) -> bool:
        """A task's outcome arrived; False if it is not the running task's (then the
        worker broke the protocol: it is killed)."""
        inflight = w.inflight
        # The running task's (w.head(), inlined: _on_frame checked the state, and a
        # task's clock starts only once its worker is ready).
        if not inflight or inflight[0].task_id != ident or not inflight[0].started:
            self._violation(w, self._unexpected(w, proto.KIND_NAMES.get(kind, str(kind)), ident))
            return False
        item = inflight.popleft()
        now = time.monotonic()
        self.scheduler.observe_run(now - item.started)
        if w.inflight:
            w.start_clock(w.inflight[0], now)
        if kind != proto.ERROR:
            self.supervisor.succeeded(item, now - item.started)
        # Decoded elsewhere (the delivery thread, or whoever reads the future first):
        # unpickling runs the task's code (a __setstate__ may take seconds), which
        # must not hold up any deadline here.
        self.ledger.answer(item, Encoded(kind, payload, self.ledger.decode_failed), now)
        return True

    # ------------------------------------------------------------ supervision

    def _on_timer(self, w: WorkerHandle, now: float) -> None:
        """One of ``w``'s timers is due (see WorkerHandle: each state's timers)."""
        t = w.init_at()
        if t is not None and now >= t:
            self._on_init_timeout(w, now)
            return
        watch = w.watching()
        if watch is not None:
            t = watch.due()
            if t is not None and now >= t and self._supervise(w, watch, now):
                return
        t = w.revoke_at()
        if t is not None and now >= t:
            self._revoke(w)
        t = w.escalate_at()
        if t is not None and now >= t:
            sent = w.escalate()
            logger.info("worker pid=%d outlived its kill grace stage; sent %s", w.pid, sent)
        t = w.check_at()
        if t is not None and now >= t and not w.group_lingers(now):
            self._reap(w)

    def _supervise(self, w: WorkerHandle, watch: Watch, now: float) -> bool:
        """Apply what the running task's detectors conclude (see _supervision);
        True if its worker was killed."""
        verdict = watch.look(now)
        if verdict is None:
            return False
        if verdict is ASK_STACK:
            w.request_stack(now)
            return False
        assert isinstance(verdict, Kill)
        self._read_results(w)  # the answer may be sitting in the pipe
        item = watch.item
        if w.head() is not item:
            return False  # it finished after all; the next task's clock has started
        stack, native = w.take_stacks(now) if verdict.stack else (None, None)
        w.inflight.popleft()
        self.ledger.stats.count(verdict.counter)
        logger.warning(
            "task %d %s on worker pid=%d pgid=%d; killing its group",
            item.task_id, verdict.why, w.pid, w.pid,
        )
        self._kill(w, verdict.reason, hard=verdict.hard, now=now)
        self._retry_or_fail(item, verdict.error(stack, native), verdict.outcome, time.monotonic())
        return True

    def _on_init_timeout(self, w: WorkerHandle, now: float) -> None:
        """A worker's initializer ran past ``initializer_timeout``: kill its group and
        fail what waits for it, as a failing initializer does (INIT_FAILED): the
        tasks handed to it and the queue fail with WorkerInitializerError and no
        replacement starts until new work comes. Why not retry on a fresh worker:
        the initializer runs the same code in every worker, so one that hung is
        likely to hang again, and each retry would hold the queue for another whole
        timeout; the standard library, too, gives up on the pool when an initializer
        fails. New submissions start a fresh worker (which may succeed)."""
        self._read_results(w)  # READY or INIT_FAILED may be waiting in the pipe
        t = w.init_at()
        if t is None or now < t:
            return
        timeout = self.cfg.init_timeout
        stack, _native = w.take_stacks(now)  # where it hangs: the error's "remote traceback"
        logger.warning(
            "initializer of worker pid=%d ran past initializer_timeout=%gs; killing its group",
            w.pid, timeout,
        )
        message = (
            f"the executor's initializer did not finish within initializer_timeout={timeout:g}s "
            f"in a new worker (pid {w.pid}); its process group was killed"
        )
        w.init_failed = True
        self._kill(w, "initializer timeout", hard=False, now=now)  # requeues its tasks
        text = None if stack is None else "Stack of the worker when it was killed:\n" + stack
        self._fail_queue(partial(WorkerInitializerError, message, text))
        self.scheduler.stop_growing()  # do not restart workers to hang again

    def _retry_or_fail(self, item: WorkItem, exc: BaseException, outcome: str, now: float) -> None:
        if self.ledger.retry_or_fail(item, exc, outcome, now):
            self.queue.appendleft(item)
        self.scheduler.pause_spawning(time.monotonic())

    def _kill(
        self, w: WorkerHandle, reason: str, *, hard: bool, now: float, count: bool = True,
        interrupt: bool = False,
    ) -> None:
        """Signal a live worker's group; its leader's death finishes the job. What
        waited in its pipe goes back to the queue. ``count``: a kill to report in
        the stats (not a worker stopped as not needed); ``interrupt``: SIGINT first
        (see WorkerHandle.signal)."""
        if w.state not in SERVING:
            return
        w.reason = reason
        if count:
            self.ledger.stats.workers_killed += 1
        self._requeue(w.inflight)
        w.inflight.clear()
        if w.want_write:
            w.want_write = False
            self._unregister(w.proc.to_worker)
        w.signal(hard, now, self.cfg.kill_grace, interrupt)
        self._publish_pids()

    def _on_exit(self, w: WorkerHandle) -> None:
        if w.state is State.DEAD:
            return
        dead, code = proc_mod.observe_exit(w.proc)
        if not dead:
            return
        if w.proc.pidfd >= 0:
            self._unregister(w.proc.pidfd)
        self._read_results(w, _READS_AT_EXIT)  # results written before it died still count
        now = time.monotonic()
        if w.state in SERVING:
            head = w.head()
            if head is not None:
                w.inflight.popleft()
                self.ledger.stats.crashed += 1
                logger.warning(
                    "worker pid=%d pgid=%d died (exit code %s) while running task %d",
                    w.pid, w.pid, code, head.task_id,
                )
                self._retry_or_fail(head, WorkerCrashedError(w.pid, code), "crashed", now)
            self._requeue(w.inflight)  # handed over, never begun
            w.inflight.clear()
            if head is None and not w.ready_seen and not w.init_failed:
                self._on_start_exit(w, code, now)
            elif head is None and w.state is State.READY and not self.shutting_down:
                logger.warning("idle worker pid=%d died (exit code %s); replacing it", w.pid, code)
        w.mark_dead(now, self.cfg.kill_grace)
        self._publish_pids()
        if not w.group_lingers(now):
            self._reap(w)

    def _on_start_exit(self, w: WorkerHandle, code: int | None, now: float) -> None:
        """``w`` died before it was ready (its interpreter could not start: memory,
        a broken executable, a module that fails at import). After MAX_START_FAILURES
        in a row: with other workers ready, the pool runs on them and tries again
        after a back-off (the queue is theirs: no task fails while a worker can run
        it); with none, the queued tasks fail, with the exit code."""
        sched = self.scheduler
        first = sched.start_failures == 0
        (logger.warning if first else logger.debug)(
            "worker pid=%d exited (code %s) before it was ready", w.pid, code
        )
        if not sched.start_failed():
            return
        reason = f"workers exit before they are ready ({sched.start_failures} in a row)"
        others = [
            o for o in self.workers.values()
            if o is not w and o.state in (State.STARTING, State.READY)
        ]
        ready = sum(1 for o in others if o.ready_seen)
        if ready:
            # Logged once per run of early deaths (a READY from any worker ends it).
            log = logger.warning if sched.start_failures == MAX_START_FAILURES else logger.debug
            log("%s; running on %d ready worker(s), trying again with back-off", reason, ready)
            sched.start_refused(now, len(others), sched.start_failures - MAX_START_FAILURES + 1)
            return
        self._fail_queue(partial(WorkerCrashedError, w.pid, code, reason))
        sched.stop_growing()

    def _reap(self, w: WorkerHandle) -> None:
        # The guardian forgets the group before the reap frees its number, so it never
        # holds a pgid that may be recycled.
        self._eof_due.pop(w, None)
        _guardian.unregister(w.pid)
        for fd in (w.proc.from_worker, w.proc.to_worker, w.proc.pidfd):
            self._unregister(fd)
        escalated, code = w.reap()
        del self.workers[w.pid]
        self._publish_pids()
        if w.reason == _NOT_NEEDED:
            logger.debug("worker pid=%d pgid=%d stopped while starting: %s", w.pid, w.pid, w.reason)
        elif w.reason:
            logger.info(
                "worker pid=%d pgid=%d killed (%s) with %s; exit code %s",
                w.pid, w.pid, w.reason, "SIGKILL" if escalated else "SIGTERM", code,
            )
        else:
            logger.debug("worker pid=%d exited with code %s; group cleaned up", w.pid, code)

    def _fail_queue(self, make_error: Callable[[], BaseException]) -> None:
        """Fail every queued task, each with an error of its own (one exception
        instance on many futures would share, and grow, one traceback)."""
        now = time.monotonic()
        while self.queue:
            self.ledger.fail(self.queue.popleft(), make_error(), "crashed", now)

    # ------------------------------------------------------------ shutdown

    def _finish_shutdown(self) -> bool:
        """With nothing left to run, tell workers to exit; True once all are gone."""
        if self.queue:
            return False
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.state is State.STARTING and not w.inflight:
                # A replacement still starting (maybe inside a slow initializer) has
                # nothing left to do: stop it rather than make shutdown wait for it.
                self._kill(w, _NOT_NEEDED, hard=False, now=now, count=False)
            elif w.state is State.READY and not w.inflight:
                w.retire()
                self._flush(w)
        if self.workers:
            return False
        self._close_dump()
        proc_mod.close_start(self.cfg.mp_context)  # the template, if any, exits now
        return True

    def _close_dump(self) -> None:
        if self._dump is not None:
            proc_mod.close_dump_pipe(self._dump)
            self._dump = None

    def _emergency_stop(self) -> None:
        """Last resort if the loop itself fails: kill every group, fail every future."""
        def err() -> BaseException:
            return BrokenProcessPool("pgexecutor's manager thread failed; see the log")

        now = time.monotonic()
        for w in list(self.workers.values()):
            for item in w.inflight:
                self.ledger.fail(item, err(), "crashed", now)
            w.inflight.clear()
            try:
                _guardian.unregister(w.pid)
                if not w.proc.reaped:
                    w.reap()
            except Exception:
                logger.exception("could not clean up worker pid=%d", w.pid)
        self.workers.clear()
        self._publish_pids()
        self._close_dump()
        proc_mod.close_start(self.cfg.mp_context)
        inbox = self.mailbox.take()
        while inbox:
            msg = inbox.popleft()
            if type(msg) is WorkItem:
                self.queue.append(msg)
        self._fail_queue(err)
