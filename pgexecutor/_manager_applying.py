"""Applying what supervision concludes: the manager's timer part.

``_supervision`` decides (time limits, memory, stalls, heartbeats); this part owns
acting on it when a worker's timer is due: asking for a stack, killing with the
detector's error, an initializer that ran too long, and retrying or failing a task
whose worker died under it."""

from __future__ import annotations

import logging
import time
from functools import partial

from . import _process as proc_mod
from ._ledger import WorkItem
from ._manager_base import (
    ManagerBase,
)
from ._supervision import ASK_STACK, Kill, Watch
from ._worker_handle import WorkerHandle
from .errors import WorkerInitializerError

logger = logging.getLogger("pgexecutor")


class ManagerApplying(ManagerBase):
    """The manager's applying part (see the module docstring)."""

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
        if not proc_mod.start_is_handover(self.cfg.mp_context):
            # (A standby's hand-over is quick: no pause, the replacement is ready sooner.)
            self.scheduler.pause_spawning(time.monotonic())
