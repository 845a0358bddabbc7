"""Commands and shutdown: the manager's part that obeys other threads.

Owns what the mailbox's commands do (``Shutdown``, ``Terminate``, ``KillTask``):
cancelling the queue and tasks written ahead, sweeping cancelled futures, killing one
task's worker, and finishing a shutdown (retiring workers, closing the stack-dump
pipe and the start template)."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import CancelledError, Future
from typing import Any

from . import _exit
from . import _process as proc_mod
from ._ledger import WorkItem
from ._mailbox import Command, KillTask, Shutdown, Terminate
from ._manager_base import (
    NOT_NEEDED,
    ManagerBase,
)
from ._worker_handle import SERVING, State
from .errors import WorkerCrashedError


class ManagerCommands(ManagerBase):
    """The manager's commands part (see the module docstring)."""

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

    def _finish_shutdown(self) -> bool:
        """With nothing left to run, tell workers to exit; True once all are gone."""
        if self.queue:
            return False
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.state is State.STARTING and not w.inflight:
                # A replacement still starting (maybe inside a slow initializer) has
                # nothing left to do: stop it rather than make shutdown wait for it.
                self._kill(w, NOT_NEEDED, hard=False, now=now, count=False)
            elif w.state is State.READY and not w.inflight:
                w.retire()
                self._flush(w)
        if self.workers:
            return False
        self._close_dump()
        # The pool's work is done: a default start with no template yet begins one
        # now, for the next executor (it lingers, see _template_pool); not earlier,
        # where its imports would compete with the pool's tasks for the CPUs, nor
        # when the program exits (no next executor).
        if not _exit.interpreter_exiting():
            proc_mod.warm_start(self.cfg.mp_context)
        proc_mod.close_start(self.cfg.mp_context)  # the template lingers for the next one
        return True

    def _close_dump(self) -> None:
        if self._dump is not None:
            proc_mod.close_dump_pipe(self._dump)
            self._dump = None
