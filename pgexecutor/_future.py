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
* **The result's own bytes.** A journal stores what the worker pickled, not a
  pickle made again here (which may differ, or fail): ``raw_outcome``, set for the
  tasks whose settings ask (``TaskSettings.keep_raw``), or :meth:`keep_result_bytes`
  before the task ends and :meth:`result_bytes` after (one standalone pickle).

Its resolver is the thread that resolves it and runs its done-callbacks (the
executor's delivery thread, see ``_delivery``); ``result()`` there of a future not
yet done refuses rather than wait for itself.

* **Unpickled by its reader.** A future that no callback watches ends as soon as
  its answer arrives, still pickled (:meth:`end_encoded`); the first ``result()`` /
  ``exception()`` unpickles it, in the caller's thread, once. So unpickling (user
  code: any ``__setstate__``) never runs in the manager's thread, and the common
  case costs no hop through the delivery thread either. A result that then fails to
  unpickle fails the future from that moment (as it would have at once).
* **A lighter condition.** ``Future.__init__`` builds a ``threading.Condition``: an
  RLock, a deque and five bound methods, and two lists, nine objects the garbage
  collector tracks, per future. With 20,000 futures alive (a burst of submits) the
  collector's walks over them cost as much as the submits themselves. A TaskFuture
  sets the same fields as ``Future.__init__`` (unchanged from 3.6 to 3.13; a test
  compares them) with a :class:`FutureCondition` instead: one tracked object (the
  RLock itself, subclassed), with a list of sleepers made only when a thread waits;
  and the waiters' and done-callbacks' lists are made only when ``wait()``,
  ``as_completed()`` or ``add_done_callback`` need them.
"""

from __future__ import annotations

import _thread
import threading
from _thread import get_ident
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
    _AllCompletedWaiter,
)
from time import monotonic as _monotonic
from typing import Any, Protocol

_PENDING: Any = object()  # ``_result`` of a future ended by end_encoded, until unpickled


def wait_limit(timeout: float | None) -> float | None:
    """``timeout`` as a lock's wait takes it: None (no limit) for inf, and for any
    timeout past ``threading.TIMEOUT_MAX`` (~292 years), which a lock refuses with
    OverflowError (``Future.result(1e308)`` raises it in the standard library)."""
    if timeout is not None and timeout >= threading.TIMEOUT_MAX:
        return None
    return timeout


class FutureCondition(_thread.RLock):  # type: ignore[misc]
    """The part of ``threading.Condition`` a Future uses: ``with``,
    ``acquire``/``release`` (``concurrent.futures.wait`` takes every future's),
    ``wait``, ``wait_for``, ``notify``, ``notify_all``.

    It *is* the RLock (the C type ``threading.RLock()`` makes, subclassed): one
    object for the collector instead of a wrapper and its lock, and ``with``,
    ``acquire`` and ``release`` are the lock's own C methods, no Python call
    between. An RLock, as threading.Condition's default: Future takes it again
    inside itself (``set_result`` on a finished future formats ``repr(self)``,
    which takes it, into its InvalidStateError). It never waits while holding it
    twice, so ``wait`` releases it once. Each waiting thread sleeps on a lock of
    its own (as in threading.Condition), listed under the condition's lock; the
    list exists only while someone waits.
    """

    __slots__ = ("_sleepers",)

    def __init__(self) -> None:
        self._sleepers: list[Any] | None = None

    def wait(self, timeout: float | None = None) -> bool:
        """As ``Condition.wait``: release, sleep until notified or ``timeout``
        (<= 0: do not sleep), take the lock again; True if notified."""
        timeout = wait_limit(timeout)
        sleeper = threading.Lock()
        sleeper.acquire()
        if self._sleepers is None:
            self._sleepers = []
        self._sleepers.append(sleeper)
        self.release()
        woken = False
        try:
            if timeout is None:
                woken = sleeper.acquire()
            elif timeout > 0:
                woken = sleeper.acquire(True, timeout)
            else:
                woken = sleeper.acquire(False)
            return woken
        finally:
            self.acquire()
            if not woken and self._sleepers is not None:
                try:
                    self._sleepers.remove(sleeper)
                except ValueError:
                    pass  # notified between the timeout and here

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        """As ``Condition.wait_for``."""
        end = None
        result = predicate()
        while not result:
            if timeout is not None:
                if end is None:
                    end = _monotonic() + timeout
                else:
                    timeout = end - _monotonic()
                    if timeout <= 0:
                        break
            self.wait(timeout)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        sleepers = self._sleepers
        while sleepers and n > 0:
            sleepers.pop(0).release()
            n -= 1

    def notify_all(self) -> None:
        sleepers, self._sleepers = self._sleepers, None
        for sleeper in sleepers or ():
            sleeper.release()


class Pending(Protocol):
    """An answer not unpickled yet (``_delivery.Encoded``)."""

    def decode(self, fut: Any, keep_bytes: bool) -> tuple[bool, Any]: ...


class TaskFuture(Future[Any]):
    """A ``Future`` whose cancellation reaches the pool (see the module docstring)."""

    #: Future's list of done-callbacks; empty and shared until the first is added
    #: (add_done_callback makes the future's own list, under ``_condition``).
    _done_callbacks: Any = ()

    def __init__(
        self,
        on_cancel: Callable[[], None] | None = None,
        resolver: threading.Thread | None = None,
        stop: Callable[[TaskFuture], None] | None = None,
    ) -> None:
        # Future.__init__'s fields, with a FutureCondition (see the module docstring).
        self._condition = FutureCondition()  # type: ignore[assignment]
        self._state = PENDING
        self._result = None
        self._exception = None
        # Future.__init__'s two lists are made on first use (see _waiters and
        # add_done_callback): most futures never have a waiter or a callback.
        self._waiter_list: list[Any] | None = None
        self._on_cancel = on_cancel
        # cancel_running=True: how cancel() has the pool stop this task once it runs
        self._stop = stop
        # The thread that resolves it (the delivery thread): done-callbacks run there,
        # and a wait for an unfinished future from there could never end (its turn
        # comes after the callback's). Compared by ident: result() is on every
        # caller's hot path.
        self._resolver = resolver
        #: the task's TaskInfo fields once it ended, a tuple (pgexecutor.task_info
        #: makes the TaskInfo; see Ledger._record)
        self.info: Any = None
        # None: not wanted; b"": wanted, not there (yet); else the result's pickle.
        self._result_bytes: bytes | None = None
        self._pending: Pending | None = None  # FINISHED, not unpickled yet
        self._decoder: int | None = None  # the thread unpickling it (see _decode)
        #: The outcome as the worker sent it, set before the future resolves (see
        #: Ledger.answer): ``(kind, payload)`` with kind ``_protocol.RESULT`` (the
        #: pickle), ``RESULT_OOB`` (an OOBPayload's bytes: the result's large
        #: buffers are views of it) or ``ERROR`` (an encoded exception). Kept only
        #: for tasks whose settings ask (``TaskSettings.keep_raw``); None otherwise,
        #: or if the outcome came from elsewhere. A journal stores these
        #: bytes: exactly what the task returned, never re-pickled from an object
        #: the caller may have changed.
        self.raw_outcome: tuple[int, bytes | bytearray] | None = None

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        """Future's list of ``wait()`` / ``as_completed()`` waiters, which append to it
        and remove from it under ``_condition`` (as do Future's own methods): made
        then. This class's own methods read ``_waiter_list`` and make none."""
        waiters = self._waiter_list
        if waiters is None:
            waiters = self._waiter_list = []
        return waiters

    @_waiters.setter
    def _waiters(self, waiters: list[Any]) -> None:
        self._waiter_list = waiters

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        """``Future.add_done_callback``, with this future's own list made first."""
        if type(self._done_callbacks) is tuple:
            with self._condition:
                if type(self._done_callbacks) is tuple:
                    self._done_callbacks = []
        Future.add_done_callback(self, fn)

    def result(self, timeout: float | None = None) -> Any:
        resolver = self._resolver
        if resolver is not None and resolver.ident == get_ident():
            self._refuse_self_wait("result")
        value = Future.result(self, timeout)  # read with the state, under _condition
        if value is not _PENDING:
            return value
        if self._decode():
            return self._result
        return Future.result(self, 0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        resolver = self._resolver
        if resolver is not None and resolver.ident == get_ident():
            self._refuse_self_wait("exception")
        Future.exception(self, timeout)  # waits (or raises CancelledError, TimeoutError)
        if self._result is _PENDING:
            self._decode()
        return Future.exception(self, 0)  # read again, under _condition

    def end_encoded(self, answer: Pending, error: bool) -> bool:
        """End it now with ``answer``, unpickled later by its first reader; False if
        a done-callback (or a ``wait(return_when=FIRST_EXCEPTION)``, which must know
        at once whether a result is an error) needs it unpickled now, elsewhere.

        ``error``: the answer is the task's exception (waiters hear add_exception).
        Runs no user code: the state changes under ``_condition``, waiters told, as
        set_result / set_exception do.
        """
        with self._condition:
            if self._done_callbacks or self._state != RUNNING:  # type: ignore[attr-defined, has-type]
                return False
            waiters = self._waiter_list or ()
            if waiters and not error and any(
                type(w) is _AllCompletedWaiter and w.stop_on_exception for w in waiters
            ):
                return False
            self._pending = answer
            self._result = _PENDING
            self._state = FINISHED
            for waiter in waiters:
                if error:
                    waiter.add_exception(self)
                else:
                    waiter.add_result(self)
            self._condition.notify_all()
        return True

    def _decode(self) -> bool:
        """Unpickle the pending answer, once, in this (the reading) thread. True if
        it was a result (now in ``_result``, final).

        Unpickling runs user code (any ``__setstate__``, maybe slow), so it runs
        outside ``_condition``, which ``done()`` and every other look at the future
        take. The first reader claims it under ``_condition``; a reader that comes
        meanwhile sleeps on ``_condition`` until the outcome is published (no lock
        of its own per future: one object fewer for the collector). If the
        unpickling is interrupted (the caller's Ctrl-C), the claim is given up and
        the next reader unpickles it."""
        cond = self._condition
        with cond:
            while True:
                answer = self._pending
                if answer is None:
                    return False  # another reader did it: read it as usual
                if self._decoder is None:
                    break
                if self._decoder == get_ident():  # its own unpickling asks for it
                    raise RuntimeError(
                        "the result of this future was read while it was being "
                        "unpickled, by the unpickling itself (a __setstate__ or "
                        "__reduce__ of the result that reads its own future)"
                    )
                cond.wait()  # another reader is at it: its outcome, or its turn
            self._decoder = get_ident()
        try:
            ok, value = answer.decode(self, self._result_bytes is not None)
        except BaseException:
            with cond:
                self._decoder = None
                cond.notify_all()  # a waiting reader takes it over
            raise
        with cond:
            # A reader in Future.result sees either _PENDING (and comes here) or
            # the outcome: the exception is set before the placeholder goes.
            if ok:
                self._result = value
            else:
                self._exception = value
                self._result = None
            self._pending = None
            self._decoder = None
            cond.notify_all()
        return ok

    def __repr__(self) -> str:
        if self._result is _PENDING:
            return f"<{type(self).__name__} at {id(self):#x} state=finished (not unpickled yet)>"
        return Future.__repr__(self)

    def _refuse_self_wait(self, what: str) -> None:
        if not self.done():
            refuse_self_wait(what)

    def keep_result_bytes(self) -> None:
        """Ask for :meth:`result_bytes`: call before the task ends (at submit)."""
        if self._result_bytes is None:
            self._result_bytes = b""

    def wants_result_bytes(self) -> bool:
        return self._result_bytes is not None

    def set_result_bytes(self, data: bytes) -> None:
        """For the pool: the result as the worker pickled it, before the future ends."""
        self._result_bytes = data

    def result_bytes(self) -> bytes | None:
        """The result exactly as the worker pickled it: one standard pickle, which
        ``pickle.loads`` turns into the result (large buffers a worker sent out of
        band are put back in band). None unless :meth:`keep_result_bytes` was called
        before the task ended, or if the task did not return a result."""
        if self._result is _PENDING:
            self._decode()
        return self._result_bytes or None

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
            for waiter in self._waiter_list or ():
                waiter.add_cancelled(self)
            self._condition.notify_all()
        return True

    def end_now(self, exc: BaseException | None) -> bool:
        """End it in the calling thread (the manager's) with ``exc``, or cancelled
        (None), if that runs no code but the standard library's: no done-callback is
        attached. True if it ended (or had already); False if callbacks must run,
        which is the delivery thread's job.

        Checked and done under ``_condition``, so a callback added meanwhile either
        comes before (False) or finds the future done (and runs in its adder's
        thread, as ever). The same steps as set_exception / cancel +
        set_running_or_notify_cancel, with the same invariants.
        """
        with self._condition:
            if self._done_callbacks:  # type: ignore[attr-defined]
                return False
            state = self._state  # type: ignore[has-type]
            if state == FINISHED or state == CANCELLED_AND_NOTIFIED:
                return True
            if exc is None:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiter_list or ():
                    waiter.add_cancelled(self)
            else:
                if state != RUNNING and state != PENDING:
                    return False  # cancelled by its user: the slow path sorts it out
                self._exception = exc
                self._state = FINISHED
                for waiter in self._waiter_list or ():
                    waiter.add_exception(self)
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


def refuse_self_wait(what: str) -> None:
    """A done-callback (it runs in the executor's delivery thread) that waits for a
    future (or a map's item) that thread has yet to resolve would wait forever: say
    so instead."""
    raise RuntimeError(
        f"{what}() of an unfinished future called from a done-callback: callbacks "
        "run in the executor's thread that resolves futures, which would wait for itself. Wait "
        "in another thread, or chain with add_done_callback"
    )


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
