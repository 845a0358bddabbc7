"""The map runner: ``map(..., journal=...)`` on top of an executor's ``submit``.

::

    map() call (caller's thread)                       writer thread (_writer)
    ----------------------------                       -----------------------
    keys for every input (_keys)
    open + check the file, take the lock (_store)
    read the rows of these keys: replay, quarantine, or run (_plan)
    submit what runs (all at once, or buffersize) --> done-callback (delivery thread):
                                                        put (key, future) on a queue
    iterator: yields in input order                     <-- commits batches, releases
      replayed rows read from the file                      their keys
      others from their futures, once durable
    end of iteration / break / GC: cancel what waits, flush the writer, drop the lock

Who owns what: the *control connection* is opened in the map() call; it checks the
file, takes and drops the lock row, and reads stored results while the iterator runs
(a generator runs in one thread at a time; ``check_same_thread=False`` only lets the
iterator, and the close at its end, be in another thread than the map() call). The
writer thread owns its own connection and is the only one that writes rows. The
done-callback runs in the executor's delivery thread, so it only enqueues.

Every position gets an object of its own: the first position of a key that ran
yields the future's value (nobody else saw it); a replayed row, or a later position
of the same key, is unpickled afresh from the file.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

from .. import _progress
from .. import _protocol as proto
from .._frontend import check_buffersize, result_or_exception
from .._journal_chunk import run_chunk_timed
from ..errors import QuarantinedError, RemoteTaskError
from . import _records as rec
from . import _store as store
from ._keys import as_journal, function_name, make_keys
from ._writer import Writer


class Session:
    """One journaled map's hold on its journal, from the map() call to the end of the
    iteration: the lock, the control connection and the writer."""

    def __init__(self, path: str, quarantine_after: int, fn_name: str) -> None:
        self.path = path
        self.quarantine_after = quarantine_after
        self.conn = store.open_for_map(path)
        try:
            self.owner = store.take_lock(
                self.conn, path, {"quarantine_after": str(quarantine_after), "fn": fn_name}
            )
        except BaseException:
            self.conn.close()
            raise
        self.prior: dict[str, rec.Prior] = {}
        self.futures: list[Future[Any]] = []
        self.writer: Writer | None = None
        self.fn_name = fn_name
        self._close_lock = threading.Lock()
        self._closed = False

    def load_prior(self, keys: list[str]) -> None:
        try:
            found = store.load_rows(self.conn, keys)
        except sqlite3.Error as exc:
            raise store.explain(self.path, "reading its rows", exc) from exc
        for key, outcome, kills, failures, runs in found:
            try:
                past = json.loads(failures or "[]")
            except ValueError:
                past = []
            self.prior[key] = rec.Prior(outcome, int(kills or 0), past, int(runs or 0))

    def start_writer(self) -> Writer:
        self.writer = Writer(self.path, self.fn_name, self.prior)
        return self.writer

    def stored(self, key: str) -> tuple[str | None, bytes | None, str | None]:
        """``(outcome, value, error)`` of ``key``'s row."""
        try:
            row = self.conn.execute(
                "SELECT outcome, result, error FROM inputs WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                return None, None, None
            return row[0], store.join_value(self.conn, key, row[1]), row[2]
        except sqlite3.Error as exc:
            raise store.explain(self.path, "reading a stored result", exc) from exc

    def close(self) -> None:
        """Cancel what has not started, record what finished, drop the lock. Idempotent;
        runs at the end of the iteration, on break, on GC of the iterator, at exit."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        for fut in self.futures:
            fut.cancel()
        self.futures = []
        if self.writer is not None:
            self.writer.stop()
        store.release_lock(self.conn, self.path, self.owner)
        self.conn.close()


class _Quarantined:
    """The slot of a quarantined key (see _plan for the other slots)."""

    __slots__ = ("failures",)

    def __init__(self, failures: list[dict[str, Any]]) -> None:
        self.failures = failures


class JournaledMap(Iterator[Any]):
    """The iterator a journaled ``map`` returns. Ending it (exhausted, ``break``,
    ``close()``, garbage collection, interpreter exit) cancels what has not started,
    flushes the journal and unlocks it."""

    def __init__(self, results: Iterator[Any], session: Session) -> None:
        self._results = results
        self._finalizer = weakref.finalize(self, session.close)
        self.path = session.path

    def __iter__(self) -> JournaledMap:
        return self

    def __next__(self) -> Any:
        return next(self._results)

    def close(self) -> None:
        close = getattr(self._results, "close", None)
        if close is not None:
            close()
        self._finalizer()

    def __repr__(self) -> str:
        return f"<journaled map on {self.path!r}>"


def journal_map(
    submit: Callable[[Callable[..., Any], tuple[Any, ...]], Future[Any]],
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    timeout: float | None,
    chunksize: int,
    return_exceptions: bool,
    progress: Any,
    buffersize: int | None,
    journal: Any,
) -> Iterator[Any]:
    """``map(..., journal=...)`` of every executor, on top of its ``submit(fn, args)``.

    Everything that can fail does so here, in the map() call and before any task
    runs: the journal's path, format and lock, and every input's key. So every input
    is read (and keyed) now, even with ``buffersize``; what ``buffersize`` bounds is
    the tasks submitted ahead of what the caller consumed, as in a plain map.
    """
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    check_buffersize(buffersize)
    journal = as_journal(journal)
    make_bar = _progress.resolve(progress)
    if timeout is not None and math.isinf(timeout) and timeout > 0:
        timeout = None
    end_time = None if timeout is None else timeout + time.monotonic()
    inputs = list(zip(*iterables, strict=False))
    keys = make_keys(journal, fn, inputs)
    session = Session(journal.path, journal.quarantine_after, function_name(fn))
    try:
        session.load_prior(keys)
        slots, groups = _plan(session, keys, chunksize)
        writer = session.start_writer()
        tracker = None
        if make_bar is not None:  # counts the inputs that run
            tracker = _progress.Tracker(make_bar, sum(len(g) for g in groups), chunksize > 1)
        runner = _Runner(session, writer, submit, fn, inputs, keys, slots, groups, chunksize > 1,
                         tracker)
        for _ in range(len(groups) if buffersize is None else buffersize):
            if not runner.submit_next():
                break
    except BaseException:
        session.close()
        raise
    results = _iterate(session, writer, runner, keys, slots, end_time, return_exceptions)
    if tracker is not None:
        results = _progress.watch(tracker, results)
    return JournaledMap(results, session)


def _plan(
    session: Session, keys: list[str], chunksize: int
) -> tuple[dict[str, Any], list[list[int]]]:
    """Decide each distinct key's fate and group the inputs that run into tasks, in
    the order the iterator will need them. Equal keys (equal inputs, or a key= that
    names two inputs alike) run once and share the outcome.

    A key's slot is an outcome string (replayed from the file), a _Quarantined, or,
    for an input that runs, its task's group number (chunks: (group, index in it))
    until the task is submitted, then its Future (chunks: (Future, index)). Plain
    values, not an object per input: a 20,000-input map would otherwise pay more in
    garbage collection than in all the rest.
    """
    slots: dict[str, Any] = {}
    to_run: list[int] = []  # the first position of each key that runs
    prior_of = session.prior.get
    for i, key in enumerate(keys):
        if key in slots:
            continue
        prior = prior_of(key)
        if prior is None:
            slots[key] = None
            to_run.append(i)
        elif prior.outcome == "ok" or prior.outcome == "error":
            slots[key] = prior.outcome  # final: replayed, never rerun
        elif prior.outcome in rec.KILLS and prior.kills >= session.quarantine_after:
            slots[key] = _Quarantined(prior.failures)
        else:
            slots[key] = None
            to_run.append(i)
    if chunksize == 1:
        groups = [[i] for i in to_run]
        for g, i in enumerate(to_run):
            slots[keys[i]] = g
        return slots, groups

    # Inputs that killed a worker before (in a chunk, where the culprit is unknown)
    # run alone, so that a kill can be pinned on one input.
    def suspect(i: int) -> bool:
        p = prior_of(keys[i])
        return p is not None and p.outcome in rec.KILLS

    rest = [i for i in to_run if not suspect(i)]
    groups = [rest[s : s + chunksize] for s in range(0, len(rest), chunksize)]
    groups += [[i] for i in to_run if suspect(i)]
    groups.sort(key=lambda group: group[0])
    for g, group in enumerate(groups):
        for index, i in enumerate(group):
            slots[keys[i]] = (g, index)
    return slots, groups


class _Runner:
    """Submits the groups of a journaled map in order: all at once, or one more each
    time the caller takes a result (``buffersize``)."""

    def __init__(
        self,
        session: Session,
        writer: Writer,
        submit: Callable[[Callable[..., Any], tuple[Any, ...]], Future[Any]],
        fn: Callable[..., Any],
        inputs: list[tuple[Any, ...]],
        keys: list[str],
        slots: dict[str, Any],
        groups: list[list[int]],
        chunked: bool,
        tracker: _progress.Tracker | None,
    ) -> None:
        self.session = session
        self.writer = writer
        self.submit = submit
        self.fn = fn
        self.inputs = inputs
        self.keys = keys
        self.slots = slots
        self.groups = groups
        self.chunked = chunked
        self.tracker = tracker
        self.next = 0

    def submit_next(self) -> bool:
        """Submit the next group; False when all were."""
        if self.next >= len(self.groups):
            return False
        group = self.groups[self.next]
        self.groups[self.next] = []  # done with it: free it
        self.next += 1
        keys, inputs, slots, writer = self.keys, self.inputs, self.slots, self.writer
        if not self.chunked:
            key, args = keys[group[0]], inputs[group[0]]
            fut = self.submit(self.fn, args)
            fut.add_done_callback(functools.partial(writer.on_done, key, args))
            if key in slots:  # not yet yielded for the last time
                slots[key] = fut
        else:
            items = [(keys[i], inputs[i]) for i in group]
            fut = self.submit(run_chunk_timed, (self.fn, [args for _, args in items]))
            fut.add_done_callback(functools.partial(writer.on_chunk_done, items))
            for index, (key, _) in enumerate(items):
                if key in slots:
                    slots[key] = (fut, index)
        self.session.futures.append(fut)
        if self.tracker is not None:
            self.tracker.add(fut, len(group))
        return True

    def submit_through(self, group: int) -> None:
        while self.next <= group and self.submit_next():
            pass


def _iterate(
    session: Session,
    writer: Writer,
    runner: _Runner,
    keys: list[str],
    slots: dict[str, Any],
    end_time: float | None,
    return_exceptions: bool,
) -> Iterator[Any]:
    """Yield in input order, each outcome that ran only once it is durable. No local
    variable holds a result across a yield (a suspended generator would keep it)."""
    left: dict[str, int] | None = None
    if len(slots) != len(keys):  # equal keys: keep a slot until its last position
        left = {}
        for key in keys:
            left[key] = left.get(key, 0) + 1
    last: Any = None  # the task whose result was taken last
    waited: dict[str, Any] = {}  # equal keys already waited for: their problem, if any
    try:
        for key in keys:
            slot = slots[key]
            if isinstance(slot, int) or (type(slot) is tuple and isinstance(slot[0], int)):
                runner.submit_through(slot if isinstance(slot, int) else slot[0])
                slot = slots[key]
            task = slot[0] if type(slot) is tuple else slot
            ran = isinstance(task, Future)
            if ran and task is not last:
                last = task
                runner.submit_next()  # buffersize: one more each time a result is taken
            del task
            if ran:
                ok, out = _answer_task(slot, end_time)
                if key in waited:  # a later position of an outcome not recorded
                    recorded, problem = None, waited[key]
                else:
                    recorded, problem = writer.wait_durable(key)
                    if left is not None:
                        waited[key] = problem  # its next positions: nothing to wait for
                if problem is not None:
                    if writer.error is not None and problem is writer.error:
                        raise writer.error  # the file failed: nothing from here on is durable
                    ok, out = False, problem  # this input's outcome alone was not stored
                if left is not None and left[key] > 1 and recorded is not None:
                    slots[key] = recorded  # later positions: a fresh copy from the file
            else:
                ok, out = _answer_stored(session, key, slot)
            del slot
            if left is not None:
                left[key] -= 1
                if not left[key]:
                    del slots[key]  # free its future
            else:
                del slots[key]
            if ok or return_exceptions:
                yield out
                continue
            raise out
        session.close()  # flush now, so that a failure of the last batch is reported
        if writer.error is not None:
            raise writer.error
    finally:
        session.close()


def _answer_stored(session: Session, key: str, slot: Any) -> tuple[bool, Any]:
    if isinstance(slot, _Quarantined):
        return False, QuarantinedError(key, slot.failures)
    outcome, blob, error = session.stored(key)
    if outcome == "ok":
        try:
            return True, rec.load_result(blob or b"")
        except Exception as exc:
            # As for a result that does not unpickle when it arrives: unpickling's
            # own exception, marked with its stage and a note (PEP 678, 3.11+).
            proto.mark_pickling_fault(exc, proto.UNPICKLE_RESULT)
            note = f"pgexecutor: the result stored in journal {session.path!r} could not be unpickled"
            add_note = getattr(exc, "add_note", None)  # PEP 678, 3.11+
            if add_note is not None:
                add_note(note)
            return False, exc
    try:
        return False, proto.load_exception(blob or b"")
    except Exception:
        return False, RemoteTaskError("Exception", error or "(no message stored)", "")


def _answer_task(slot: Any, end_time: float | None) -> tuple[bool, Any]:
    index = None
    if isinstance(slot, tuple):
        slot, index = slot
    fut: Future[Any] = slot
    timeout = None if end_time is None else max(0.0, end_time - time.monotonic())
    ok, value = result_or_exception(fut, timeout)
    if not ok:
        return False, value
    if index is None:
        return True, value
    _, ok, item = rec.chunk_item(value, index)
    return (True, item) if ok else (False, proto.load_exception(item))

