"""Interpreter exit and fork, for every executor of the process.

At exit the standard library's rule holds: submitted work is finished first (a
``threading._register_atexit`` hook, which runs before non-daemon threads are joined,
like ProcessPoolExecutor's), unless the program is dying of Ctrl-C, when every group
is killed at once. Only managers whose thread started are tracked: an executor never
used costs exit nothing. In a forked child the parent's managers are abandoned: their
threads do not exist there and their workers are the parent's. A manager is done
when its ``finished`` is set: its loop ended and every future of it was delivered
(resolved, done-callbacks run; see ``_delivery``).

Owner: ``_exit_lock`` guards ``_global_shutdown``; ``_live`` is a WeakSet written by
starting threads and read at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING

from ._mailbox import Shutdown, Terminate
from ._protocol import came_from_worker

if TYPE_CHECKING:
    from ._manager import Manager

logger = logging.getLogger("pgexecutor")

_live: weakref.WeakSet[Manager] = weakref.WeakSet()  # started managers
_EXIT_NOTICE_AFTER = 10.0  # seconds of waiting at exit before saying why
_global_shutdown = False
_exit_lock = threading.Lock()
_forks = 0  # incremented in every forked child (fork_generation)


def interpreter_exiting() -> bool:
    """True once interpreter exit began: no new work is taken. (A bool read needs no
    lock; the lock orders the write against the exit hook's posts.)"""
    return _global_shutdown


def fork_generation() -> int:
    """How many forks separate this process from the one that imported pgexecutor:
    an object made at generation N is its maker's when the number is still N. Cheaper
    than os.getpid(), which is a system call on every glibc since 2.25."""
    return _forks


def _after_fork_in_child() -> None:
    """The parent's managers are not the child's: their threads do not exist in a
    forked child, and its exit must not post to (or wait for) them. The exit lock may
    have been copied held."""
    global _exit_lock, _forks
    _forks += 1
    for m in list(_live):
        m.abandon_after_fork()
    _live.clear()
    _exit_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def track(manager: Manager) -> None:
    _live.add(manager)


def _exiting_on_interrupt() -> bool:
    """The program dies of a Ctrl-C: not of a KeyboardInterrupt a task raised, which
    ``result()`` raised again here (that is an ordinary uncaught task exception)."""
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return isinstance(last, KeyboardInterrupt) and not came_from_worker(last)


def _python_exit() -> None:
    """At interpreter exit: finish submitted work (as ProcessPoolExecutor does) unless
    the program is dying of Ctrl-C, in which case kill every worker group at once."""
    global _global_shutdown
    with _exit_lock:
        _global_shutdown = True
    managers = list(_live)  # started ones only (see Manager.start)
    hard = _exiting_on_interrupt()
    for m in managers:
        m.post(Terminate(True, "the program was interrupted") if hard else Shutdown(False))
    try:
        for m in managers:
            # Finishing submitted work can take as long as that work; a task that
            # never ends (no task_timeout) keeps the program from exiting, as with
            # ProcessPoolExecutor. Say so once, and how to get out: Ctrl-C below.
            if not m.finished.wait(_EXIT_NOTICE_AFTER):
                logger.warning(
                    "interpreter exit waits for the tasks submitted to an executor; "
                    "a task with no task_timeout may never end: Ctrl-C kills every "
                    "worker group at once"
                )
                m.finished.wait()
    except KeyboardInterrupt:
        _kill_everything(managers)
        raise


def _kill_everything(managers: list[Manager]) -> None:
    for m in managers:
        m.post(Terminate(True, "the program was interrupted"))
    for m in managers:
        m.finished.wait(timeout=5.0)


def _atexit_last_resort() -> None:
    """Runs after threads were joined; anything still alive here is killed."""
    managers = [m for m in list(_live) if not m.finished.is_set()]
    if managers:
        _kill_everything(managers)


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
atexit.register(_atexit_last_resort)
