"""The manager's mailbox: how other threads hand it tasks and commands, and wake it.

Callers append to a deque (thread-safe in CPython, no lock) and write one byte to a
wake-up pipe that the manager polls beside its workers' pipes; ``woken`` keeps a burst
of posts to one byte. Commands are typed values, not strings: a mistyped one fails
where it is written, not silently in the manager's thread.

Hazard: once the wake pipe is closed its fd numbers can be reused by any file the
process opens, and a stray byte written there (a finalizer, a late post) would land in
someone else's file. So the write and the close share ``_lock``, and nothing is
written once ``closed``. In a forked child the pipe is the parent's: the child's copy
is closed by _process's at-fork hook and the mailbox is marked closed (abandon).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from . import _process


@dataclass(frozen=True)
class Shutdown:
    """Finish what was handed to workers (and queued, unless cancel_futures), then stop."""

    cancel_futures: bool


@dataclass(frozen=True)
class Terminate:
    """Stop everything now: SIGTERM (or SIGKILL if ``hard``) every group."""

    hard: bool
    reason: str


@dataclass(frozen=True)
class KillTask:
    """Stop one future's task for good (integrations' cancel): kill or drop it."""

    future: Future[Any]


Command = Shutdown | Terminate | KillTask


class Mailbox:
    """Owned by nobody and everybody: see the module docstring for its rules."""

    def __init__(self) -> None:
        self.inbox: deque[Any] = deque()  # WorkItems and Commands, in posting order
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)
        _process.mark_parent_only(self.wake_r, self._wake_w)
        self.woken = False  # a byte is in the pipe: later posts need not write another
        self._lock = threading.Lock()  # the wake write vs close (see module docstring)
        self.closed = False
        # A forked child inherits this object (and may run its executor's finalizer at
        # exit, even with ``_lock`` copied held): only the process that made the pipe
        # ever touches it.
        self._pid = os.getpid()
        # A queued future was cancelled: the manager sweeps its queue (set by any
        # thread, cleared by the manager before each sweep).
        self.sweep_due = False

    def post(self, msg: Any) -> bool:
        """Hand the manager a work item or a command; thread-safe and cheap. False if
        the mailbox is closed (the manager ended): nothing will ever read ``msg``.

        The append and the close share ``_lock``: a message is either refused here
        or in the inbox before the close, where the ending manager looks last
        (:meth:`leftovers`). Without it a task posted while the manager died was
        never answered."""
        with self._lock:
            if self.closed:
                return False
            self.inbox.append(msg)
        if not self.woken:
            self.wake()
        return True

    def note_cancel(self) -> None:
        """A queued future was cancelled (TaskFuture.cancel calls this, any thread).

        Its waiters learn of it only when the manager calls
        ``set_running_or_notify_cancel()``, and a shutdown waits for the queue to
        drain: so wake the manager to sweep the queue now, rather than when some
        worker next becomes free. Many cancels in a row cost one sweep.
        """
        self.sweep_due = True
        if not self.woken:
            self.wake()

    def wake(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self.closed:
                return
            self.woken = True
            try:
                os.write(self._wake_w, b"\0")
            except OSError:  # BlockingIOError: full, so it is awake anyway
                pass

    def take(self) -> deque[Any]:
        """For the manager: empty the wake pipe and return the inbox to drain."""
        try:
            # One read: post() writes one byte per wake-up, so a few at most wait here.
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        self.woken = False  # before draining: a later post() must write again
        return self.inbox

    def leftovers(self) -> list[Any]:
        """For the ending manager, after :meth:`close`: what was posted and never
        taken (the wake pipe is closed: only the inbox is read)."""
        assert self.closed
        out = []
        while self.inbox:
            out.append(self.inbox.popleft())
        return out

    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self.closed:
                return
            self.closed = True
            _process.unmark_parent_only(self.wake_r, self._wake_w)
            os.close(self.wake_r)
            os.close(self._wake_w)

    def abandon_after_fork(self) -> None:
        """In a forked child: never write again (the fds are closed by _process's
        at-fork hook); the lock may have been copied held by a vanished thread."""
        self._lock = threading.Lock()
        self.closed = True
