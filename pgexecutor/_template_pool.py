"""Templates shared by the executors of one process, and kept a moment after the last.

Why: a template is a fresh interpreter that imports the worker code (and the
``preload`` modules: seconds for torch). A program that builds executors back to
back (a test suite, a notebook cell run again, a loop over experiments) paid that
for each one, and its first workers started as fresh interpreters besides. So one
template per (interpreter, preload) serves every executor of the process that
starts workers from a template, and when the last of them is done with it, it stays
``LINGER`` seconds for the next one before it is closed (it exits at EOF of its
socket and is reaped here: no process of ours outlives that moment).

While it lingers it stays registered with the guardian, which therefore lingers too
(``_guardian.close_if_unused`` ends it after the template): back-to-back executors
share both. If the parent dies meanwhile, the guardian kills the template's group,
and the template also reads EOF on its socket (whose only other end is ours).

A template whose preload failed is not kept: the next executor tries again (the
program may have installed the module since). One that died is restarted by its
next fork request (``Template._fork``), as before.

Owner: ``_lock`` guards ``_entries`` and ``_closer``. Lock order:
``_process._spawn_lock`` -> ``_lock`` -> ``_guardian._lock`` (``Template.close``
unregisters), and ``_lock`` is never held while waiting for a template to exit:
the linger thread closes outside it.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from dataclasses import dataclass

from . import _guardian
from ._template import Template

#: Seconds an unused template waits for the next executor before it is closed.
#: Long enough for executors built one after another; short enough that a program
#: done with its pool does not keep an interpreter (tens of MiB, more with a
#: preload) for long.
LINGER = 1.0

_Key = tuple[str, tuple[str, ...]]


@dataclass(eq=False)
class _Entry:
    template: Template
    users: int = 0
    idle_since: float | None = None  # set while nobody uses it (lingering)


_lock = threading.Lock()
_entries: dict[_Key, _Entry] = {}
_closer: threading.Thread | None = None  # the linger thread, while one runs
_wake = threading.Condition(_lock)


def lease(python: str, preload: tuple[str, ...]) -> Template:
    """The template for this interpreter and preload, shared; give it back with
    :func:`give_back`. It is not started here (the caller decides when)."""
    key = (python, tuple(preload))
    with _lock:
        entry = _entries.get(key)
        if entry is None or entry.template.failed is not None:
            entry = _entries[key] = _Entry(Template(python, tuple(preload)))
        entry.users += 1
        entry.idle_since = None
        return entry.template


def give_back(template: Template) -> None:
    """An executor is done with ``template``. The last user's give-back makes it
    linger (if it runs) or drops it (if it never started, or its preload failed)."""
    global _closer
    key = (template.python, template.preload)
    with _lock:
        entry = _entries.get(key)
        shared = entry is not None and entry.template is template
        if shared:
            assert entry is not None
            entry.users -= 1
            if entry.users > 0:
                return
            if template.sock is not None and template.failed is None:
                entry.idle_since = time.monotonic()
                if _closer is None:
                    _closer = threading.Thread(
                        target=_linger, name="pgexecutor-template-linger", daemon=True
                    )
                    _closer.start()
                else:
                    _wake.notify()
                return
            del _entries[key]
    # Never started, its preload failed, or not shared (any more): nobody else can
    # use it.
    _close([template])


def _linger() -> None:
    """Close each template that nobody used for ``LINGER`` seconds; end when none
    lingers (a new one starts at the next give-back)."""
    global _closer
    while True:
        due: list[Template] = []
        with _lock:
            now = time.monotonic()
            nearest = None
            for key, entry in list(_entries.items()):
                if entry.idle_since is None:
                    continue
                ends = entry.idle_since + LINGER
                if ends <= now:
                    del _entries[key]
                    due.append(entry.template)
                elif nearest is None or ends < nearest:
                    nearest = ends
            if not due:
                if nearest is None:
                    _closer = None
                    return
                _wake.wait(nearest - now)
                continue
        _close(due)


def _close(templates: list[Template]) -> None:
    for template in templates:
        template.close()
    _guardian.close_if_unused()


def close_idle() -> None:
    """Close every template nobody uses now, at once (at interpreter exit; tests
    call it to check that nothing else of theirs is left)."""
    with _lock:
        idle = [key for key, entry in _entries.items() if entry.users == 0]
        due = [_entries.pop(key).template for key in idle]
    _close(due)


def lingering() -> list[int]:
    """Pids of the templates that wait, unused, for the next executor."""
    with _lock:
        return [
            e.template.pid for e in _entries.values()
            if e.users == 0 and e.template.pid is not None
        ]


def _after_fork_in_child() -> None:
    """The parent's templates are the parent's (their sockets are closed in the
    child by _process's at-fork hook); the linger thread does not exist here."""
    global _lock, _wake, _closer
    _lock = threading.Lock()
    _wake = threading.Condition(_lock)
    _closer = None
    _entries.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(close_idle)  # what lingers goes with the program, reaped
