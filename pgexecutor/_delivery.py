"""The delivery thread: where futures end, away from the manager's loop.

Ending a future runs code the user controls: unpickling its result or exception
(any ``__reduce__``/``__setstate__``, any import it triggers) and its done-callbacks
(the user's, a journal's, a progress bar's, asyncio's). On the manager thread, a
result that took 3 s to unpickle delayed every other task's deadline by 3 s. So the
manager only decides *how* a task ended: the ledger counts it, sets its TaskInfo
and hands the outcome here, still encoded; this thread decodes it, resolves the
future and so runs its callbacks, one outcome after the other, in the order the
manager decided them.

Most futures never come here: one that no callback watches ends at once, still
encoded, and its first reader decodes it (``TaskFuture.end_encoded``); one the
manager fails itself (timeout, crash, cancel) ends at once too
(``TaskFuture.end_now``). Neither runs user code in the manager's thread, and the
common round trip pays no hop through this thread.

Nothing here waits for the manager, so a callback may submit, cancel, or shut the
pool down without waiting (``shutdown(wait=True)`` from a callback must still
refuse: it would wait for this very thread, see the executor).

Owner: the job queue is a ``SimpleQueue``: the manager (and, for the last job, the
thread that closes it) puts, this thread alone gets. ``finished`` is set by this
thread when it ends, after the last job: by then the manager's thread has ended
(its end is what closes the queue), so ``finished`` means "everything ended,
every callback ran".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from queue import SimpleQueue
from typing import Any

from . import _protocol as proto
from ._future import TaskFuture, end_cancelled
from ._map_slots import MapSlot

#: What the delivery thread ends: a Future (ours, or an integration's), or a map's
#: slot whose result came in shared memory (a slot's other endings need no thread:
#: see the ledger).
Ending = Future[Any] | MapSlot

logger = logging.getLogger("pgexecutor")

# What a job asks for: (what, future, argument).
_DECODE = 0  #: argument: an Encoded outcome (a worker's RESULT*/ERROR frame)
_FAIL = 1  #: argument: the exception the manager made (timeout, crash, ...)
_CANCEL = 2  #: argument: whether the future is RUNNING (see end_cancelled)
_CLOSE = None  #: the last job: the manager's thread has ended


class Encoded:
    """A task's outcome as the worker sent it: a frame kind and its payload, and who
    to tell if a result does not unpickle (the ledger: it counts it as failed).

    Decoded in the delivery thread, or by the future's first reader (see
    ``TaskFuture.end_encoded``). For RESULT_SHM the payload is a
    :class:`_protocol.ShmPayload` (its memfd is closed by the decode, or by
    ``discard``).
    """

    __slots__ = ("kind", "payload", "on_failure")

    def __init__(self, kind: int, payload: Any, on_failure: Callable[[Ending], None]) -> None:
        self.kind = kind
        self.payload = payload
        self.on_failure = on_failure

    def decode(self, fut: Ending, keep: bool) -> tuple[bool, Any]:
        """(True, value) or (False, exception); runs user code. Raises only a
        KeyboardInterrupt that may be the user's Ctrl-C (in the main thread: a reader
        unpickling there); the answer then stays as it is, to be decoded again. With
        ``keep``, the result's own pickle goes to ``fut`` (a TaskFuture) first."""
        kind, payload = self.kind, self.payload
        try:
            if kind == proto.RESULT and not keep:  # the common case first
                ok, value = True, proto.loads(payload)
            elif kind == proto.ERROR:
                ok, value = False, proto.load_exception(payload)
            elif kind == proto.RESULT:
                if keep:
                    fut.set_result_bytes(bytes(payload))  # type: ignore[union-attr]  # keep: a TaskFuture
                ok, value = True, proto.loads(payload)
            else:
                if kind == proto.RESULT_OOB:
                    data, buffers = proto.split_oob(payload)
                else:
                    data, buffers = payload.split()  # RESULT_SHM
                if keep:
                    fut.set_result_bytes(proto.standalone_pickle(data, buffers))  # type: ignore[union-attr]
                ok, value = True, proto.loads(data, buffers)
        except BaseException as exc:  # any exception a hostile __setstate__ raises
            if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
                raise
            ok, value = False, proto.mark_pickling_fault(exc, proto.UNPICKLE_RESULT)
            if kind != proto.ERROR:
                self.on_failure(fut)
        self.payload = None  # the raw bytes go as soon as the value exists
        return ok, value

    def discard(self) -> None:
        if self.kind == proto.RESULT_SHM and self.payload is not None:
            self.payload.close()
        self.payload = None


class Delivery:
    """Decodes outcomes and ends futures in a thread of its own (see the module
    docstring)."""

    def __init__(self) -> None:
        self._jobs: SimpleQueue[tuple[int, Ending, Any] | None] = SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="pgexecutor-delivery", daemon=True)
        self.finished = threading.Event()

    # ------------------------------------------------------------ the manager's side

    def start(self) -> None:
        self.thread.start()

    def decode(self, fut: Ending, outcome: Encoded) -> None:
        """End ``fut`` with what ``outcome`` decodes to."""
        self._jobs.put((_DECODE, fut, outcome))

    def fail(self, fut: Future[Any], exc: BaseException) -> None:
        self._jobs.put((_FAIL, fut, exc))

    def cancel(self, fut: Future[Any], running: bool) -> None:
        self._jobs.put((_CANCEL, fut, running))

    def close(self) -> None:
        """No more jobs: the thread ends after those queued (then ``finished``)."""
        self._jobs.put(_CLOSE)

    def close_unstarted(self) -> None:
        """The manager never started: nothing to deliver, ever."""
        self.finished.set()

    def on_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def abandon_after_fork(self) -> None:
        """In a forked child: the thread does not exist here, the jobs are the
        parent's. (A SimpleQueue has no lock a vanished thread could hold.)"""
        self._jobs = SimpleQueue()
        self.finished = threading.Event()
        self.finished.set()

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        jobs = self._jobs
        try:
            while True:
                job = jobs.get()
                if job is _CLOSE:
                    return
                try:
                    self._deliver(*job)
                except BaseException:  # noqa: BLE001 - one future's trouble is its own
                    logger.exception("pgexecutor could not deliver the outcome of a task")
                del job
        finally:
            self.finished.set()

    def _deliver(self, what: int, fut: Ending, arg: Any) -> None:
        if what == _CANCEL:
            assert isinstance(fut, Future)  # (a slot is only ever decoded here)
            end_cancelled(fut, running=arg)
            return
        if what == _DECODE:
            if fut.done():  # nobody will read it (an integration's own future)
                arg.discard()
                return
            ok, value = arg.decode(fut, isinstance(fut, TaskFuture) and fut.wants_result_bytes())
        else:
            ok, value = False, arg
        try:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        except InvalidStateError:
            pass  # ended meanwhile by someone else (an integration cancelling its own)
