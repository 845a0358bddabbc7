"""``TaskFuture``: the futures a ProcessGroupExecutor hands out.

It is a plain :class:`concurrent.futures.Future` to its users, with two additions the
pool needs and the base class cannot give through its public protocol:

* **The pool hears of a cancellation.** ``cancel()`` on a queued future only marks it;
  ``wait()`` and ``as_completed()`` see it once the owner calls
  ``set_running_or_notify_cancel()``. A manager asleep in poll() would not do that
  until some unrelated event woke it, and a shutdown waiting for the queue to drain
  would wait forever. So ``cancel()`` calls a hook that wakes the manager.
* **A running task can end cancelled.** The pool can really stop a task that already
  runs (its worker's group is killed: ``terminate_workers()``, an integration's
  cancel) or drop one waiting in a worker's pipe. ``Future.cancel()`` refuses a
  RUNNING future, so :meth:`cancel_running` does it here, keeping the base class's
  invariants: the state changes under ``_condition``, every waiter of ``wait()`` /
  ``as_completed()`` is told (``add_cancelled``), callbacks run once. Touching those
  fields is this subclass's business alone; no other module does.
* **cancel() may stop a running task** (``cancel_running=True``): the future is given
  a ``stop`` hook. ``cancel()`` then ends a RUNNING future cancelled itself, under
  ``_condition``, so it decides atomically against the task's outcome arriving: if
  the outcome came first, ``cancel()`` returns False and the result stays; if the
  cancel came first, the late outcome is dropped (``set_result`` / ``set_exception``
  on a future cancelled that way return quietly instead of raising
  ``InvalidStateError`` in the pool's thread). Then ``stop`` asks the pool to stop
  the task (it posts a command: quick, safe from any thread, callbacks included).
"""

from __future__ import annotations

import threading
from _thread import get_ident
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, RUNNING
from typing import Any


class TaskFuture(Future[Any]):
    """A ``Future`` whose cancellation reaches the pool (see the module docstring)."""

    def __init__(
        self,
        on_cancel: Callable[[], None] | None = None,
        resolver: threading.Thread | None = None,
        stop: Callable[[TaskFuture], None] | None = None,
    ) -> None:
        super().__init__()
        self._on_cancel = on_cancel
        # cancel_running=True: how cancel() has the pool stop this task once it runs
        self._stop = stop
        # The thread that resolves it (the manager's): done-callbacks run there, and a
        # wait for an unfinished future from there could never end. Compared by
        # ident: result() is on every caller's hot path.
        self._resolver = resolver
        #: the task's TaskInfo once it ended (pgexecutor.task_info reads it)
        self.info: Any = None
        #: The outcome as the worker sent it, set before the future resolves (see
        #: Ledger.resolve): ``(kind, payload)`` with kind ``_protocol.RESULT`` (the
        #: pickle), ``RESULT_OOB`` (an OOBPayload's bytes: the result's large
        #: buffers are views of it) or ``ERROR`` (an encoded exception). Kept only
        #: for tasks whose settings ask (``TaskSettings.keep_raw``); None otherwise,
        #: or if the outcome came from elsewhere. A journal stores these
        #: bytes: exactly what the task returned, never re-pickled from an object
        #: the caller may have changed.
        self.raw_outcome: tuple[int, bytes | bytearray] | None = None

    def result(self, timeout: float | None = None) -> Any:
        resolver = self._resolver
        if resolver is not None and resolver.ident == get_ident():
            self._refuse_self_wait("result")
        return Future.result(self, timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        resolver = self._resolver
        if resolver is not None and resolver.ident == get_ident():
            self._refuse_self_wait("exception")
        return Future.exception(self, timeout)

    def _refuse_self_wait(self, what: str) -> None:
        """A done-callback (it runs in the manager's thread) that waits for a future
        the same manager has yet to resolve would wait forever: say so instead."""
        if not self.done():
            raise RuntimeError(
                f"{what}() of an unfinished future called from a done-callback: callbacks "
                "run in the executor's manager thread, which would wait for itself. Wait "
                "in another thread, or chain with add_done_callback"
            )

    def take_raw_outcome(self) -> tuple[int, bytes | bytearray] | None:
        """Return :attr:`raw_outcome` and drop it here (its reader keeps it)."""
        raw, self.raw_outcome = self.raw_outcome, None
        return raw

    def cancel(self) -> bool:
        """``Future.cancel()``; if it took effect, tell the pool (it may be asleep).

        With a ``stop`` hook (``cancel_running=True``) a RUNNING future is cancelled
        too and its task stopped. Tried again after ``Future.cancel()`` refused: the
        pool may have handed the task over between the two looks (states only move
        forward, so twice is enough).
        """
        stop = self._stop
        if stop is not None and self._end_if_running():
            self._stopped(stop)
            return True
        cancelled = super().cancel()
        if cancelled:
            if self._on_cancel is not None:
                self._on_cancel()
        elif stop is not None and self._end_if_running():
            self._stopped(stop)
            return True
        return cancelled

    def _stopped(self, stop: Callable[[TaskFuture], None]) -> None:
        """This RUNNING future was just cancelled by its user: have the pool stop the
        task first (quick), then run the callbacks (user code, maybe slow)."""
        stop(self)
        self._invoke_callbacks()  # type: ignore[attr-defined]  # Future's own, not typeshed's

    def _end_if_running(self) -> bool:
        """RUNNING -> cancelled, waiters told, under ``_condition``; callbacks not yet
        run (the caller runs them once). False if it was not RUNNING."""
        with self._condition:
            if self._state != RUNNING:
                return False
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        return True

    def cancel_running(self) -> bool:
        """End a RUNNING future as cancelled; False if it is not running.

        For the pool only: the task is known to be stopped (its group was killed, or
        it never left a worker's pipe) before this is called.
        """
        if not self._end_if_running():
            return False
        self._invoke_callbacks()  # type: ignore[attr-defined]  # Future's own, not typeshed's
        return True

    def set_result(self, result: Any) -> None:
        """``Future.set_result``; quiet if its user cancelled it while it ran (the
        outcome lost that race: see the module docstring)."""
        try:
            super().set_result(result)
        except InvalidStateError:
            if not self.cancelled():
                raise

    def set_exception(self, exception: BaseException | None) -> None:
        """``Future.set_exception``; quiet if cancelled while it ran (as set_result)."""
        try:
            super().set_exception(exception)
        except InvalidStateError:
            if not self.cancelled():
                raise


def end_cancelled(fut: Future[Any], running: bool) -> bool:
    """End ``fut`` as cancelled and tell its waiters; False if it was already done.

    ``running`` says whether the pool called ``set_running_or_notify_cancel()`` on it
    already (the task was handed to a worker). The pool calls that exactly once per
    future: a second call on a cancelled future raises. A plain ``Future`` that runs
    (an integration's own) cannot be cancelled through its protocol: it gets a
    ``CancelledError`` as its exception, so ``result()`` still raises that.
    """
    if not running:
        # PENDING, or CANCELLED by its user and not yet notified. Future.cancel, not
        # ours: the pool itself needs no wake-up.
        if not Future.cancel(fut):
            return False  # finished by someone else
        fut.set_running_or_notify_cancel()  # tells wait() / as_completed()
        return True
    if isinstance(fut, TaskFuture):
        return fut.cancel_running()
    try:
        fut.set_exception(CancelledError())
    except InvalidStateError:
        return False
    return True
