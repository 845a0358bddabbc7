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
``_guardian`` (the parent's death) and ``_exit`` (interpreter exit, fork).

``Manager`` itself is one object, run by one thread, whose code is split by
responsibility into mixins, one module each (all of them are the manager: they share
its state, its lock and its thread, and the table below holds for each):

- this module: the loop, poll() and its fds, the mailbox, what caller threads call
  (``post``, ``try_dispatch``, ...), and containment of one worker's handling;
- ``_manager_dispatch``: handing tasks out (pipe depth, permits, taking back and
  putting back), how many workers run, starting them, refused starts, the pids;
- ``_manager_answers``: reading result pipes, checking frames, answers to the
  ledger, EOF, protocol violations;
- ``_manager_applying``: applying what supervision concludes when a timer is due
  (stack, kill, initializer timeout, retry or fail);
- ``_manager_deaths``: killing groups, a worker's exit, reaping, giving up on a
  worker, failing the queue, the emergency stop;
- ``_manager_commands``: the mailbox's commands (shutdown, terminate, kill a task,
  cancel sweeps) and finishing a shutdown;
- ``_manager_base``: the shared settings, constants and the declared state and
  methods (for the type checker; no behaviour).

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
``supervisor`` (learned times),
``_standby_due``
``mailbox.inbox``              any thread appends; the manager pops
``mailbox.sweep_due``          any thread sets (a cancel); the manager clears
``mailbox`` wake/close         ``Mailbox._lock``
``shutting_down``,             the manager thread
``_eof_due``
delivery job queue             the manager puts, the delivery thread gets
``finished``                   the delivery thread sets it, after the manager ended
                               and every job (future, callback) was done
``Stats.unpickle_failed``,     the delivery thread (a result that did not unpickle)
that task's TaskInfo outcome
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

import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import _exit, _guardian, _platform
from . import _protocol as proto
from ._delivery import Delivery
from ._ledger import Ledger, Stats, TaskInfo, WorkItem
from ._mailbox import Command, Mailbox
from ._manager_answers import ManagerAnswers
from ._manager_applying import ManagerApplying
from ._manager_base import (
    PIDFD,
    RESULT,
    WAKE,
    ManagerConfig,
    manager_failed,
    queue_work,
)
from ._manager_commands import ManagerCommands
from ._manager_deaths import ManagerDeaths
from ._manager_dispatch import ManagerDispatch
from ._scheduling import Scheduler
from ._supervision import Supervisor
from ._worker_handle import DumpGate, State, WorkerHandle
from .errors import WorkerCrashedError

__all__ = ["Manager", "ManagerConfig", "TaskInfo", "WorkItem", "Stats"]

logger = logging.getLogger("pgexecutor")

_POLL_EXIT_INTERVAL = 0.05  # without pidfds, how often to look for dead workers
# The longest single sleep in poll(). Deadlines can be huge (a task_timeout of 1e9 s):
# poll() takes an int of milliseconds and overflows past ~24 days, so the loop wakes
# at least this often and sleeps again.
_MAX_SLEEP = 3600.0
_DIRECT_MAX = 1 << 14  # try_dispatch takes payloads below this (an empty pipe takes them whole)


class Manager(ManagerCommands, ManagerDeaths, ManagerApplying, ManagerAnswers, ManagerDispatch):
    """Owns the workers and the queue; runs in its own thread (see module docstring).
    Its parts are the mixins it inherits, one module each (see the module map)."""

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
        self._register(self.mailbox.wake_r, select.POLLIN, WAKE, None)
        self._use_pidfd = _platform.USE_PIDFD  # False once a worker came without one
        self._dump: tuple[int, int] | None = None  # the workers' stack-dump pipe (r, w)
        self._dump_gate = DumpGate()  # which worker's dump that pipe may carry now
        self._refusals_logged: set[tuple[str, int | None]] = set()  # causes of failed starts
        self._next_exit_poll = 0.0  # without pidfds: next look for dead workers
        self._standby_due: float | None = None  # when to ask for the next standby
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

    def start(self) -> None:
        _exit.track(self)  # only started managers: interpreter exit joins their threads
        _guardian.hold()  # released when the thread ends: the last release ends it
        self.delivery.start()
        self.thread.start()

    def post(self, msg: WorkItem | list[WorkItem] | Command) -> bool:
        """Hand the loop ``msg`` (a task, a block of a map's tasks, or a command);
        False if the manager has ended (see Mailbox.post)."""
        return self.mailbox.post(msg)

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
            self._fail_leftovers()
            _guardian.release()
            self.delivery.close()  # its thread ends after the last delivery: finished

    def _fail_leftovers(self) -> None:
        """Tasks posted after the loop's last look (only when it failed: a shutdown
        drains the inbox first, and nothing is posted after it): no worker will run
        them; they fail as the emergency stop's did."""
        items: deque[WorkItem] = deque()
        for msg in self.mailbox.leftovers():
            queue_work(items, msg)
        if items:
            with self._lock:
                self.queue.extend(items)
                self._fail_queue(manager_failed)

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
            if self._standby_due is not None and now >= self._standby_due:
                self._tend_standby()
            self._wait_for_events(now)

    def _wait_for_events(self, since: float) -> None:
        """Sleep in poll() until an event or the next timer; ``since``: when this
        pass began (its dispatch acted on the scheduler's state as of then)."""
        timeout = self._next_wakeup(since)
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
            if kind == WAKE:
                self._drain_mailbox()
            elif w is None:
                continue
            elif kind == RESULT:
                self._contained(self._read_results, w)
            elif kind == PIDFD:
                self._contained(self._on_exit, w)
            else:
                self._contained(self._flush, w)

    def _next_wakeup(self, since: float) -> float | None:
        """Seconds until the nearest timer of any worker; None to sleep until woken.

        A paused (or backed-off) start is judged as of ``since``, the pass's start:
        one that was still paused for that pass's dispatch is due even if its time
        passed since (the manager lost the CPU, or reaped a group): it must wake up
        for it, at once, not forget it (no worker, a task queued, asleep for good).
        """
        best: float | None = None
        for w in self.workers.values():
            t = w.next_due()
            if t is not None and (best is None or t < best):
                best = t
        now = time.monotonic()
        if not self._use_pidfd and self.workers:
            best = self._next_exit_poll if best is None else min(best, self._next_exit_poll)
        spawn = self.scheduler.next_spawn(since)
        if spawn is not None:
            best = spawn if best is None else min(best, spawn)
        for t in self._eof_due.values():
            best = t if best is None else min(best, t)
        if self._standby_due is not None:
            best = self._standby_due if best is None else min(best, self._standby_due)
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

    def _register(self, fd: int, mask: int, kind: int, worker: WorkerHandle | None) -> None:
        self._poller.register(fd, mask)
        self._fd_owner[fd] = (kind, worker)

    def _unregister(self, fd: int) -> None:
        if self._fd_owner.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _drain_mailbox(self) -> None:
        inbox = self.mailbox.take()
        while inbox:
            msg = inbox.popleft()
            if queue_work(self.queue, msg):
                continue
            # Tasks submitted before the command are handed out first (to workers
            # started for them, still starting included): a shutdown with
            # cancel_futures right after a burst of submits cancels only what no
            # worker took, as with the standard library's call queue.
            if self.queue and not self.shutting_down:
                self._dispatch()
            self._command(msg)
