"""The writer: one thread per journaled map, the only one that writes rows.

Durable before visible (DESIGN.md, fact 19): the iterator yields an outcome only
once the transaction that records it has committed, so a parent killed at any
moment never runs again an input whose outcome its caller saw. Group commit keeps
that cheap::

    done-callback (delivery thread)    writer thread                  iterator
    ------------------------------     -------------                  --------
    put (key, future) on the queue --> take all queued; gather up to
                                       WINDOW s (MIN_GAP if one waits)
                                       build rows; one transaction;
                                       COMMIT, then release the keys --> wait_durable(key)
                                                                         returns; yield

The iterator that needs a key not yet released says so (``_flush_now``): the writer
then gathers only until MIN_GAP after its last commit, so a caller that keeps up
with tiny tasks sees each result at most that late and pays for a few outcomes per
transaction, not one. What this thread owns: its connection, the queue's
far end, ``_released`` (under ``_cond``; the iterator pops its keys) and ``error``.

A failure of the file (disk full, read-only, I/O error, damage) stops the recording:
``error`` is set, every later key is released with it, and the iterator raises it
at the first outcome not committed before it. A failure of one row (a value SQLite
refuses) costs that input alone: its key is released with a per-input JournalError.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from typing import Any

from .. import _protocol as proto
from ..errors import JournalError
from ..executor import task_info
from . import _records as rec
from . import _store as store
from ._keys import short_repr

logger = logging.getLogger("pgexecutor")

WINDOW = 0.05  # seconds: when no one waits, the writer gathers outcomes this long
MIN_GAP = 0.005  # seconds: the least time between two commits, even when someone waits
_STOP = object()
# Errors of the file itself (not of one row): recording stops.
_FILE_FAULTS = {3, 5, 6, 8, 10, 11, 13, 14, 26}

# What the writer records for one finished input: (key, args, future, index of the
# input in its chunk or None without chunks, inputs in its task). A tuple, not an
# object: a 20,000-input map would pay more in garbage collection than in the rest.
Entry = tuple
Released = tuple  # (the outcome recorded or None, the JournalError that stopped it or None)


class Writer:
    """The writer thread of one map (see the module docstring)."""

    def __init__(self, path: str, fn_name: str, prior: dict[str, rec.Prior]) -> None:
        self.path = path
        self.fn_name = fn_name
        self.prior = prior
        self.error: JournalError | None = None  # the file failed: nothing more is recorded
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._accepting = True
        self._flush_now = threading.Event()
        self._cond = threading.Condition()
        self._released: dict[str, Released] = {}
        self._over = False  # the thread ended: no key will be released any more
        self._thread = threading.Thread(
            target=self._main, name=f"pgexecutor-journal {path}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------ other threads

    def on_done(self, key: str, args: tuple[Any, ...], fut: Future[Any]) -> None:
        """Done-callback, in the executor's delivery thread (or a cancelling one): enqueue only.
        No lock: an entry that slips in after stop()'s _STOP is simply not recorded,
        as if it had finished after the close."""
        if self._accepting:
            self._queue.put((key, args, fut, None, 1))

    def on_chunk_done(self, items: list[tuple[str, tuple[Any, ...]]], fut: Future[Any]) -> None:
        """on_done for a chunk's task: one entry per input."""
        if self._accepting:
            size = len(items)
            for index, (key, args) in enumerate(items):
                self._queue.put((key, args, fut, index, size))

    def wait_durable(self, key: str) -> Released:
        """Wait until ``key``'s outcome is committed (or known not to be recorded)."""
        got = self._released.pop(key, None)  # the usual case: long committed
        if got is not None:
            return got
        with self._cond:
            while key not in self._released:
                if self._over:
                    return None, self.error or JournalError(
                        f"journal {self.path!r}: the writer stopped before recording this outcome"
                    )
                self._flush_now.set()  # someone waits: commit without gathering
                self._cond.wait(1.0)
            return self._released.pop(key)

    def stop(self) -> None:
        """Record what was queued, then end the thread."""
        self._accepting = False
        self._queue.put(_STOP)
        self._flush_now.set()
        self._thread.join()

    # ------------------------------------------------------------ the thread

    def _main(self) -> None:
        conn = None
        try:
            conn = store.connect(self.path)
            self._loop(conn)
        except BaseException as exc:  # the iterator reports it
            logger.error("journal %s: the writer failed", self.path, exc_info=True)
            if self.error is None:
                self.error = store.explain(self.path, "writing", exc)
        finally:
            if conn is not None:
                conn.close()
            with self._cond:
                self._over = True
                self._cond.notify_all()

    def _loop(self, conn: sqlite3.Connection) -> None:
        limit = store.length_limit(conn)
        last = 0.0
        stop = False
        while not stop:
            batch = [self._queue.get()]
            self._drain(batch)
            if _STOP not in batch:
                # Gathering: with no one waiting, at most one commit per WINDOW, so a
                # burst of tiny tasks costs one transaction.
                wait = last + WINDOW - time.monotonic()
                if wait > 0:
                    self._flush_now.wait(wait)
                # Even when someone waits, gather for MIN_GAP after the last commit:
                # a caller that keeps up with the tasks would otherwise cost one
                # transaction and two thread wake-ups per outcome.
                wait = last + MIN_GAP - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self._drain(batch)
            self._flush_now.clear()
            stop = _STOP in batch
            self._write(conn, [e for e in batch if e is not _STOP], limit)
            del batch
            last = time.monotonic()

    def _drain(self, batch: list[Any]) -> None:
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _write(self, conn: sqlite3.Connection, batch: list[Entry], limit: int) -> None:
        released: dict[str, Released] = {}
        rows: list[tuple[Any, ...]] = []
        for n, entry in enumerate(batch):
            if n % 16 == 15:
                # Let the manager thread have the GIL: otherwise it could wait a
                # whole switch interval (5 ms) for a long batch, workers idle.
                time.sleep(0)
            key = entry[0]
            if self.error is not None:
                released[key] = (None, self.error)
                continue
            try:
                row = self._row(entry)
            except Exception as exc:
                logger.warning("journal %s: could not record input %s", self.path, key, exc_info=True)
                released[key] = (None, self._input_error(entry, exc))
                continue
            if row is None:
                released[key] = (None, None)
            else:
                rows.append(row)
        if rows and self.error is None:
            self._commit(conn, rows, limit, released)
        with self._cond:
            self._released.update(released)
            self._cond.notify_all()

    def _commit(
        self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], limit: int,
        released: dict[str, Released],
    ) -> None:
        """One transaction for the batch; if a row spoils it, one per row."""
        try:
            self._transaction(conn, rows, limit)
        except sqlite3.Error as exc:
            if self._is_file_fault(exc) or len(rows) == 1:
                self._fail_rows(rows, exc, released)
                return
            for row in rows:
                try:
                    self._transaction(conn, [row], limit)
                except sqlite3.Error as one:
                    self._fail_rows([row], one, released)
                    if self.error is not None:
                        return
                else:
                    released[row[0]] = (row[3], None)
            return
        for row in rows:
            released[row[0]] = (row[3], None)

    def _is_file_fault(self, exc: BaseException) -> bool:
        code = getattr(exc, "sqlite_errorcode", None)
        return not isinstance(code, int) or code & 0xFF in _FILE_FAULTS

    def _fail_rows(
        self, rows: list[tuple[Any, ...]], exc: sqlite3.Error, released: dict[str, Released]
    ) -> None:
        if self._is_file_fault(exc):
            logger.error("journal %s: writing failed: %s", self.path, store.cause(exc))
            self.error = JournalError(
                f"journal {self.path!r}: writing failed: {store.cause(exc)}. The outcomes "
                "committed before are kept; the ones after are not recorded (they run "
                "again next time)"
            )
            self.error.__cause__ = exc
            for row in rows:
                released[row[0]] = (None, self.error)
            return
        for row in rows:
            logger.warning("journal %s: could not store input %s: %s", self.path, row[0], exc)
            err = JournalError(
                f"journal {self.path!r}: the outcome of input {row[2]} (key {row[0]!r}) "
                f"could not be stored: {store.cause(exc)}; it is not recorded and runs "
                "again next time"
            )
            err.__cause__ = exc
            released[row[0]] = (None, err)

    def _input_error(self, entry: Entry, exc: BaseException) -> JournalError:
        err = JournalError(
            f"journal {self.path!r}: the outcome of input {short_repr(entry[1])} (key "
            f"{entry[0]!r}) could not be recorded ({type(exc).__name__}: {exc}); it runs "
            "again next time"
        )
        err.__cause__ = exc
        return err

    def _transaction(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], limit: int) -> None:
        parts: list[tuple[str, int, Any]] = []
        stored = []
        clear = []
        for row in rows:
            value, pieces = store.split_value(row[0], row[4], limit)
            if pieces or row[0] in self.prior:
                clear.append((row[0],))  # a value's old pieces go with it
            parts.extend(pieces)
            stored.append(row if value is row[4] else (*row[:4], value, *row[5:]))
        conn.execute("BEGIN IMMEDIATE")
        try:
            if clear:
                conn.executemany("DELETE FROM parts WHERE key = ?", clear)
            conn.executemany(store.INSERT, stored)
            if parts:
                conn.executemany("INSERT INTO parts (key, n, data) VALUES (?, ?, ?)", parts)
            conn.execute("COMMIT")
        except BaseException:
            store.rollback(conn)
            raise

    # ------------------------------------------------------------ rows

    def _row(self, entry: Entry) -> tuple[Any, ...] | None:
        key, args, fut, index, size = entry
        if fut.cancelled():
            return None
        raw = rec.take_raw(fut)
        info = task_info(fut)
        duration = getattr(info, "duration", None)
        pid = getattr(info, "pid", None)
        attempts = getattr(info, "attempts", None) or 1
        exc = fut.exception()
        if exc is None:
            value = fut.result()
            if index is None:
                blob = rec.result_blob(raw, value)
                return self._make_row(entry, "ok", blob, None, duration, attempts, pid, 0, None)
            duration, ok, item = rec.chunk_item(value, index)
            if ok:
                blob = rec.dump_value(item)
                return self._make_row(entry, "ok", blob, None, duration, attempts, pid, 0, None)
            err = rec.summary(proto.load_exception(item))
            return self._make_row(entry, "error", item, err, duration, attempts, pid, 0, None)
        outcome = rec.outcome_of(exc, info)
        if outcome is None or (index is not None and outcome == "error"):
            return None  # not this input's doing (see _records)
        error = rec.summary(exc)
        kills, failure = 0, None
        if outcome in rec.KILLS:
            # A killed chunk of several inputs: the culprit is unknown, so it counts
            # against none of them; their next run puts each in a task of its own.
            kills = attempts if size == 1 else 0
            failure = rec.failure_entry(outcome, error, kills, size)
        blob = rec.error_blob(raw, exc)
        return self._make_row(entry, outcome, blob, error, duration, attempts, pid, kills, failure)

    def _make_row(
        self,
        entry: Entry,
        outcome: str,
        blob: bytes | bytearray,
        error: str | None,
        duration: float | None,
        attempts: int,
        pid: int | None,
        kills: int,
        failure: dict[str, Any] | None,
    ) -> tuple[Any, ...]:
        key, args, _, index, size = entry
        prior = self.prior.get(key)
        failures = "[]"
        if failure is not None or (prior and prior.failures):
            failures = json.dumps([*(prior.failures if prior else ()), *([failure] if failure else ())])
        return (
            key,
            self.fn_name,
            short_repr(args),
            outcome,
            blob,
            error,
            duration,
            attempts,
            pid,
            (prior.kills if prior else 0) + kills,
            failures,
            (prior.runs if prior else 0) + 1,
            time.time(),
            size if index is not None else None,
        )

