"""``map`` without a Future per item: slots that share one condition per map.

A ``concurrent.futures.Future`` costs a Condition (with its RLock) to build, one to
take for every state change, and a wake-up of its own; ``multiprocessing.Pool``
keeps none per item, and for a map of tiny tasks those costs were a third of the
caller's time. A map's items are read by one reader only, the map's generator, in
order; nobody else ever sees them. So each item gets a :class:`MapSlot`: a few
fields and no lock of its own. All slots of one map share a :class:`SlotGroup`,
whose one condition guards every slot's state and wakes the reader only when the
slot it waits for ends.

A slot speaks both protocols the pool needs, with the same names and rules as
``TaskFuture`` (see ``_future``), so the manager, the ledger and the delivery thread
treat it as they treat a future: ``set_running_or_notify_cancel`` exactly once when
a worker takes it, ``end_encoded`` / ``end_now`` / ``set_result`` /
``set_exception`` to end it, ``cancelled``/``done``, ``info``. To its reader it is
the part of a Future a map uses: ``result``, ``exception``, ``done``, ``cancelled``
and ``cancel`` (a queued item only, as ``Future.cancel``). It has no callbacks,
so the pool always ends it at once in its own thread (the ``end_*`` calls never
refuse), and its answer is unpickled by its reader, in the reader's thread.

Maps that need a real Future per item keep them: a progress bar (done-callbacks),
a journal (the answers' bytes), ``cancel_running`` (a running item's cancel stops
it), and other executors (Ray).

Owner: a slot's state, value and pending answer change under its group's
condition (the pool's threads end it, its reader cancels it); its reader alone
decodes the pending answer, once (the map's generator cannot run in two threads at
once). Reads of a slot's state without the condition are single attribute loads,
atomic under the GIL, and the writers store the answer before the state.
"""

from __future__ import annotations

import threading
from _thread import get_ident
from collections.abc import Callable
from concurrent.futures import CancelledError, InvalidStateError
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any

from ._future import Pending, refuse_self_wait, wait_limit

# States, ordered: everything from FINISHED on is done.
PENDING = 0
RUNNING = 1
FINISHED = 2
CANCELLED = 3  # by its reader while queued; the pool has not noticed yet
CANCELLED_NOTIFIED = 4  # the pool knows: it will never run


class SlotGroup:
    """What the slots of one map share: the condition and who waits on it.

    ``on_cancel`` wakes the manager to drop cancelled items (``Mailbox.note_cancel``);
    ``resolver`` is the delivery thread, which must never wait for a slot (it may be
    the one to end it)."""

    __slots__ = ("cond", "waiting_for", "resolver", "on_cancel")

    def __init__(self, on_cancel: Callable[[], None], resolver: threading.Thread | None) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.waiting_for: MapSlot | None = None  # under cond: the slot the reader waits for
        self.resolver = resolver
        self.on_cancel = on_cancel


class MapSlot:
    """One item of a map (see the module docstring)."""

    __slots__ = ("_group", "_state", "_value", "_error", "_pending", "info", "raw_outcome")

    def __init__(self, group: SlotGroup) -> None:
        self._group = group
        self._state = PENDING
        self._value: Any = None
        self._error: BaseException | None = None
        self._pending: Pending | None = None  # FINISHED, answer not unpickled yet
        self.info: Any = None  # the TaskInfo's fields, set by the ledger
        self.raw_outcome = None  # never kept for a slot (journals use futures)

    # ------------------------------------------------------------ the reader's side

    def done(self) -> bool:
        return self._state >= FINISHED

    def cancelled(self) -> bool:
        return self._state >= CANCELLED

    def running(self) -> bool:
        return self._state == RUNNING

    def cancel(self) -> bool:
        """As ``Future.cancel``: only an item no worker took yet; True if cancelled."""
        group = self._group
        with group.cond:
            state = self._state
            if state == RUNNING or state == FINISHED:
                return False
            if state == PENDING:
                self._state = CANCELLED
        if state == PENDING:
            group.on_cancel()
        return True

    def result(self, timeout: float | None = None) -> Any:
        """As ``Future.result``: the value, or raise the task's exception,
        CancelledError, or TimeoutError after ``timeout`` seconds."""
        error = self._settle(timeout, "result")
        if error is not None:
            try:
                raise error
            finally:
                del error  # no cycle through this frame's traceback
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As ``Future.exception``."""
        return self._settle(timeout, "exception")

    def _settle(self, timeout: float | None, what: str) -> BaseException | None:
        """Wait until it ended, raise CancelledError if cancelled, unpickle a pending
        answer; the task's exception, or None (then ``_value`` holds the result)."""
        if self._state < FINISHED:
            self._wait(timeout, what)
        if self._state >= CANCELLED:
            raise CancelledError()
        if self._pending is not None:
            self._decode()
        return self._error

    def _wait(self, timeout: float | None, what: str) -> None:
        group = self._group
        resolver = group.resolver
        if resolver is not None and resolver.ident == get_ident():
            refuse_self_wait(what)
        with group.cond:
            if self._state >= FINISHED:
                return
            group.waiting_for = self
            try:
                # wait_for re-checks after every wake-up.
                ended = group.cond.wait_for(self.done, wait_limit(timeout))
            finally:
                group.waiting_for = None
        if not ended:
            raise FuturesTimeoutError()

    def _decode(self) -> None:
        """Unpickle the answer, here in the reader's thread, once. A Ctrl-C during it
        leaves the answer pending (decode re-raises only that), to try again."""
        answer = self._pending
        assert answer is not None
        ok, value = answer.decode(self, False)
        if ok:
            self._value = value
        else:
            self._error = value
        self._pending = None

    def __repr__(self) -> str:
        names = ("pending", "running", "finished", "cancelled", "cancelled")
        return f"<MapSlot at {id(self):#x} state={names[self._state]}>"

    # ------------------------------------------------------------ the pool's side

    def set_running_or_notify_cancel(self) -> bool:
        """As the Future's: False (and the reader told) if it was cancelled; else it
        runs now. Called once, when a worker takes it."""
        group = self._group
        with group.cond:
            state = self._state
            if state == CANCELLED:
                self._state = CANCELLED_NOTIFIED
                self._notify(group)
                return False
            if state != PENDING:
                raise InvalidStateError(f"{self!r}: set_running_or_notify_cancel called twice")
            self._state = RUNNING
        return True

    def end_encoded(self, answer: Pending, error: bool) -> bool:
        """End it with the answer still pickled; its reader unpickles it. Always
        True unless it ended already (a slot has no callbacks to run elsewhere)."""
        group = self._group
        with group.cond:
            if self._state != RUNNING:
                return False
            self._pending = answer
            self._state = FINISHED
            self._notify(group)
        return True

    def end_now(self, exc: BaseException | None) -> bool:
        """End it with ``exc``, or cancelled (None); True (also if it had ended)."""
        group = self._group
        with group.cond:
            if self._state >= FINISHED:
                return True
            if exc is None:
                self._state = CANCELLED_NOTIFIED
            else:
                self._error = exc
                self._state = FINISHED
            self._notify(group)
        return True

    def set_result(self, value: Any) -> None:
        """For the delivery thread (an answer in shared memory, unpickled there)."""
        self._set(value, None)

    def set_exception(self, exc: BaseException | None) -> None:
        self._set(None, exc)

    def _set(self, value: Any, exc: BaseException | None) -> None:
        group = self._group
        with group.cond:
            if self._state >= FINISHED:
                return  # ended meanwhile (cancelled at shutdown): quiet, as TaskFuture
            self._value, self._error = value, exc
            self._state = FINISHED
            self._notify(group)

    def _notify(self, group: SlotGroup) -> None:
        """Under ``group.cond``: wake the reader if it waits for this slot."""
        if group.waiting_for is self:
            group.cond.notify()


def failed_slot(group: SlotGroup, exc: BaseException) -> MapSlot:
    """A slot that failed before it reached the pool (its arguments did not pickle)."""
    slot = MapSlot(group)
    slot.end_now(exc)
    return slot
