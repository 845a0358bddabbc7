"""Reading what workers write: the manager's protocol part.

Owns the reading of every worker's result pipe: frames checked by ``FrameReader``
and against the worker's state, answers passed (still pickled) to the ledger,
heartbeats, progress and stack dumps routed, EOF while an answer is owed (with
its grace), and what counts as a protocol violation (the worker is killed with its
group, its task fails with ``WorkerProtocolError``; the loop goes on)."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

from . import _protocol as proto
from ._delivery import Encoded
from ._manager_base import (
    EOF_GRACE,
    READS_PER_EVENT,
    ManagerBase,
)
from ._worker_handle import SERVING, State, WorkerHandle
from .errors import WorkerInitializerError, WorkerProtocolError

logger = logging.getLogger("pgexecutor")


class ManagerAnswers(ManagerBase):
    """The manager's answers part (see the module docstring)."""

    def _read_results(self, w: WorkerHandle, reads: int = READS_PER_EVENT) -> None:
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
        answer: a protocol violation, unless its death shows within EOF_GRACE."""
        self._unregister(w.proc.from_worker)
        if w.state not in SERVING:
            return
        if w.inflight:
            self._eof_due[w] = time.monotonic() + EOF_GRACE
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
        elif kind == proto.RETAINED:
            if not w.arena_kept(ident):
                self._violation(w, self._unexpected(w, "RETAINED", ident))
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
