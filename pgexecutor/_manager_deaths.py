"""Deaths and reaping: the manager's part that ends workers.

Owns killing a worker's group (SIGTERM+SIGCONT, SIGKILL after ``kill_grace``), what
a worker's exit means for its tasks (the running one fails, the rest are requeued),
reaping only after the group is dead, giving up on a worker whose handling failed,
failing the queue, and the emergency stop when the loop itself fails."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

from . import _guardian
from . import _process as proc_mod
from ._manager_base import (
    FIRST_GROUP_LOOK,
    NOT_NEEDED,
    READS_AT_EXIT,
    ManagerBase,
    manager_failed,
    queue_work,
)
from ._scheduling import MAX_START_FAILURES
from ._worker_handle import SERVING, State, WorkerHandle
from .errors import WorkerCrashedError

logger = logging.getLogger("pgexecutor")


class ManagerDeaths(ManagerBase):
    """The manager's deaths part (see the module docstring)."""

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
        self._read_results(w, READS_AT_EXIT)  # results written before it died still count
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
        # Its group is looked at (a scan of /proc: ~1 ms) and reaped on the timer,
        # a moment from now: this pass's dispatch starts the replacement first.
        w.look_at_group(now + FIRST_GROUP_LOOK)

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
        if w.reason == NOT_NEEDED:
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

    def _emergency_stop(self) -> None:
        """Last resort if the loop itself fails: kill every group, fail every future."""
        now = time.monotonic()
        for w in list(self.workers.values()):
            for item in w.inflight:
                self.ledger.fail(item, manager_failed(), "crashed", now)
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
            queue_work(self.queue, inbox.popleft())
        self._fail_queue(manager_failed)
