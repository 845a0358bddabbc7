"""Handing tasks out and starting workers: the manager's dispatch part.

Owns (under ``Manager._lock``, on the manager thread) the way queued tasks reach
workers: which worker takes which task and how deep into its pipe (``Scheduler``),
writing frames and flushing what a pipe did not take, taking back tasks written
ahead (permits) and putting them back in order, how many workers run, starting
them and what a refused start means, and publishing the serving pids.
``Manager.try_dispatch`` uses ``_send``/``_flush`` from a caller's thread while it
holds the lock (see its docstring)."""

from __future__ import annotations

import errno
import logging
import select
import time
from collections.abc import Iterable
from functools import partial

from . import _guardian
from . import _process as proc_mod
from . import _protocol as proto
from ._ledger import WorkItem
from ._manager_base import (
    PIDFD,
    RESULT,
    WRITE,
    ManagerBase,
    task_id,
)
from ._scheduling import SHORTAGE_ERRNOS
from ._worker_handle import SERVING, State, WorkerHandle
from .errors import WorkerCrashedError

logger = logging.getLogger("pgexecutor")


class ManagerDispatch(ManagerBase):
    """The manager's dispatch part (see the module docstring)."""

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
            self._register(w.proc.to_worker, select.POLLOUT, WRITE, w)
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
        back = sorted(items, key=task_id)
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
            self._register(proc.pidfd, select.POLLIN, PIDFD, w)
        else:
            self._use_pidfd = False  # poll for exits from now on (see _platform)
        self._register(proc.from_worker, select.POLLIN, RESULT, w)
        w.queue_frame(proto.frame(proto.INIT, 0, self.cfg.init_payload))
        if self.shutting_down and not self.queue:
            w.retire()
        self._flush(w)
        logger.debug("started worker pid=%d pgid=%d", w.pid, w.pid)
        if proc_mod.standby_wanted(self.cfg.mp_context):
            self._standby_due = time.monotonic() + proc_mod.STANDBY_DELAY

    def _tend_standby(self) -> None:
        """Its time came: ask the template for the next standby (see _process)."""
        self._standby_due = None
        if not self.shutting_down and self._dump is not None:
            proc_mod.prepare_standby(self.cfg.mp_context, self._dump)

    def _publish_pids(self) -> None:
        """Republish ``pids``: the workers that serve the executor, i.e. not those
        being killed (signalled, in their kill grace) or dead and not yet reaped.
        One tuple assignment: readers in other threads see the old or the new."""
        self.pids = tuple(w.pid for w in self.workers.values() if w.state in SERVING)
