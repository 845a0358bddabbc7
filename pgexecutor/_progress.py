"""Progress bars for ``map(..., progress=...)``.

The bar advances when a future *finishes* (a done-callback), not when the caller's
iteration reaches it: results come back in order, so a slow first item would
otherwise freeze the bar while everything behind it is already done. Its postfix
counts how items ended, as ``pgexecutor.counters`` defines the counts (the same
definition as ``stats()`` and the journal report): ``ok`` and ``failed`` (every item
that did not return a result), then, once not zero, the cause of the failures
(``error``, ``timeout``, ``crashed``, ``memory``) and ``cancelled``.

Done-callbacks run in the executor's delivery thread (or in the caller's, for a
future that was already done), never in the manager's: a slow bar (a redraw to a
slow terminal, a custom object) delays other futures' delivery, not any deadline.
The counting is under a lock and the bar is told little: one
``set_postfix(..., refresh=False)`` and one ``update(n)`` per finished future; tqdm
then redraws at most every ``mininterval``. The tracker never holds a future or a
result: ``map`` drops each result as soon as it is yielded and this must not undo it.

tqdm is an optional extra (``pip install 'pgexecutor[progress]'``), imported only
when ``progress=True`` asks for it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

# Names, not ``from . import counters``: in a fresh worker the package is a bare module
# until a public name is looked up on it (_worker._complete_package_on_demand); that
# lookup would run the package's __init__ in the middle of this import, which imports
# this module's importer again (a circular import: a Ray host's task failed so).
from .counters import CANCELLED, FAILED, OK, cause_of, empty_counts

__all__ = ["Tracker", "resolve", "watch"]

_MISSING_TQDM = (
    "map(progress=True) draws its bar with tqdm, an optional dependency: "
    "pip install 'pgexecutor[progress]' (or pip install tqdm)"
)

#: postfix keys that show even while zero (the others show once they are not)
_ALWAYS = (OK, FAILED)

#: how long the end of a finished map waits for done-callbacks still running in the
#: delivery thread (microseconds in practice), so the bar's last line is complete
_CLOSE_WAIT = 2.0


def resolve(progress: Any) -> Callable[[int | None], tuple[Any, bool]] | None:
    """Check ``progress`` BEFORE anything is submitted; return a bar factory or None.

    ``progress`` is False/None (no bar), True (a tqdm bar on stderr, closed when the
    map's iteration ends) or an object with ``update(n)`` and ``set_postfix(mapping,
    refresh=...)`` such as a ``tqdm(...)`` the caller made and owns (we set its
    ``total`` if it is None, and never close it). The factory takes the item count
    (None when unknown) and returns ``(bar, owned)``.
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError(_MISSING_TQDM) from exc

        def make(total: int | None) -> tuple[Any, bool]:
            return tqdm(total=total, unit="task"), True

        return make
    if (
        not isinstance(progress, type)  # tqdm itself, not a bar: say so below
        and callable(getattr(progress, "update", None))
        and callable(getattr(progress, "set_postfix", None))
    ):

        def use(total: int | None) -> tuple[Any, bool]:
            if getattr(progress, "total", None) is None:
                try:
                    progress.total = total
                except AttributeError:
                    pass
            return progress, False

        return use
    raise TypeError(
        "progress must be True, False, or a bar such as tqdm(...) (an object with "
        f"update() and set_postfix()); got {progress!r}"
    )


def _classify(fut: Future[Any], size: int, chunked: bool) -> dict[str, int]:
    """How the items of one finished future ended: counts of ok, failed and the
    failures' cause, or cancelled (see ``pgexecutor.counters``)."""
    if fut.cancelled():
        return {CANCELLED: size}
    exc = fut.exception()
    if exc is None:
        if not chunked:
            return {OK: 1}
        # A chunk's result is (values, errors): errors maps the index of each item
        # that raised to its pickled exception, or is None (see _worker.run_chunk).
        _, errors = fut.result()
        failed = len(errors) if errors else 0
        return {OK: size - failed, FAILED: failed, "error": failed}
    info = getattr(fut, "info", None)  # the ledger's TaskInfo: who ended the task
    cause = cause_of(exc, getattr(info, "outcome", None))
    return {FAILED: size, cause: size}


class Tracker:
    """Counts the outcomes of a map's futures on a bar. ``total`` is the item count,
    or None when it is not known up front (a map with ``buffersize``: the bar then
    counts without a total)."""

    def __init__(
        self, make_bar: Callable[[int | None], tuple[Any, bool]], total: int | None, chunked: bool
    ) -> None:
        self.bar, self.owned = make_bar(total)
        self.chunked = chunked
        self.counts = empty_counts()
        self.expected = 0  # items of the futures added so far
        self.seen = 0
        self.closed = False
        self.cond = threading.Condition()

    def add(self, fut: Future[Any], size: int) -> None:
        """Watch one more future (``size`` items: a chunk's, or 1)."""
        with self.cond:
            self.expected += size
        fut.add_done_callback(functools.partial(self.done, size=size))

    def postfix(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if v or k in _ALWAYS}

    def done(self, fut: Future[Any], size: int) -> None:
        try:
            got = _classify(fut, size, self.chunked)
        except BaseException:  # never let a bar break the delivery thread
            got = {FAILED: size, "error": size}
        with self.cond:
            if self.closed:
                return
            for key, n in got.items():
                self.counts[key] += n
            self.seen += size
            try:
                self.bar.set_postfix(self.postfix(), refresh=False)
                self.bar.update(size)
            finally:
                self.cond.notify_all()

    def close(self, finished: bool) -> None:
        """End of the map's iteration. After a full run, wait (briefly) for the
        callbacks of the last futures; after an early exit, stop at once."""
        with self.cond:
            if finished:
                self.cond.wait_for(lambda: self.seen >= self.expected, timeout=_CLOSE_WAIT)
            self.closed = True
            if self.owned:
                self.bar.close()
            else:
                refresh = getattr(self.bar, "refresh", None)
                if callable(refresh):
                    refresh()


def watch(tracker: Tracker, results: Iterator[Any]) -> Iterator[Any]:
    """``results`` wrapped so that ``tracker``'s bar is closed when iteration ends
    (the map adds each future to the tracker as it submits it)."""
    return _closing(results, tracker)


def _closing(results: Iterator[Any], tracker: Tracker) -> Iterator[Any]:
    finished = False
    try:
        yield from results
        finished = True
    finally:
        tracker.close(finished)
