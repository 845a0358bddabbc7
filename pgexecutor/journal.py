"""Journals for ``map``: sweeps that survive a killed parent, Ctrl-C and reruns.

::

    for r in ex.map(mesh, geometries, journal="sweep.db", return_exceptions=True): ...
    ex.map(mesh, geometries, journal=Journal("sweep.db", key=lambda g: g.id))
    python -m pgexecutor journal sweep.db [--json]

A journal is an SQLite database (stdlib ``sqlite3``, WAL mode, ``synchronous=NORMAL``:
a SIGKILL or OOM kill of the parent keeps every committed transaction; a power loss
may lose the last ones). Each input has one row, found by its key; the row holds the
input's latest outcome and, for ``ok``, its pickled result, for the others its pickled
exception and a one-line summary.

How one journaled map runs::

    map() call (caller's thread)                       writer thread (one per map)
    ----------------------------                       ---------------------------
    keys for every input (hash, or key=)
    open + check the file, take the lock row
    read the rows of these keys: replay, quarantine, or run
    submit what runs (all at once, as Executor.map) --> done-callback (manager thread):
                                                        put (key, future) on a queue
    iterator: yields in input order                     <-- drains the queue; one
      replayed rows read from the file                      transaction per batch, at
      others from their futures                             most every _WINDOW seconds
    end of iteration / break / GC: cancel what waits, flush the writer, drop the lock

Who owns what: the *control connection* is opened in the map() call; it checks the
file, takes and drops the lock row, and reads stored results while the iterator runs
(a generator runs in one thread at a time; ``check_same_thread=False`` only lets the
iterator, and the close at its end, be in another thread than the map() call). The
*writer thread* opens its own connection and is the only one that writes rows. The
done-callback runs in the executor's manager thread, so it only enqueues: pickling
and SQL stay off the manager's path.

One writer per journal: the ``owner`` row of ``meta`` names the running map's pid,
process start time and host; a second map (another process, or another thread of
this one) is refused while that process lives. A journal left locked by a process
that died (SIGKILL) is taken over: same host, and the pid is gone or is a different
process (its start time differs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import pickle
import queue
import reprlib
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any

import psutil

from . import _progress
from . import _protocol as proto
from ._frontend import check_buffersize
from ._journal_chunk import run_chunk_timed
from .errors import (
    JournalError,
    MemoryLimitError,
    QuarantinedError,
    RemoteTaskError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerInitializerError,
)
from .executor import task_info

__all__ = ["Journal", "summarize", "format_summary"]

logger = logging.getLogger("pgexecutor")

FORMAT = "pgexecutor-journal"
VERSION = 1
OUTCOMES = ("ok", "error", "timeout", "crashed", "memory")
KILLS = ("timeout", "crashed", "memory")  # the outcomes where the task killed its worker
_SQLITE_HEADER = b"SQLite format 3\x00"
_KEY_PROTOCOL = 4  # fixed, so that a Python whose default protocol changes keeps the keys
_WINDOW = 0.05  # seconds: the writer commits at most this often (batching bound)
_BUSY_TIMEOUT = 10.0  # seconds sqlite waits for another connection's write to end
_ERROR_CHARS = 500
_SELECT_BATCH = 500  # keys per "WHERE key IN (...)" (SQLite allows 999 variables, or more)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)",
    """CREATE TABLE IF NOT EXISTS inputs (
        key TEXT PRIMARY KEY,       -- the input's key: a hash of fn and input, or key=
        fn TEXT,                    -- module.qualname of the task function
        input TEXT,                 -- repr of the input, truncated
        outcome TEXT NOT NULL,      -- ok, error, timeout, crashed, memory
        result BLOB,                -- ok: the pickled result, else the encoded exception
        error TEXT,                 -- not ok: 'Type: message', one line, truncated
        duration REAL,              -- seconds the (last attempt of the) task ran
        attempts INTEGER,           -- attempts in its last run (retries included)
        pid INTEGER,                -- the worker that ran its last attempt
        kills INTEGER NOT NULL DEFAULT 0,     -- workers it killed, over all runs
        failures TEXT NOT NULL DEFAULT '[]',  -- JSON list of its kills, oldest first
        runs INTEGER NOT NULL DEFAULT 0,      -- maps that ran it to an outcome
        finished REAL,              -- Unix time of its last outcome
        chunk INTEGER               -- inputs in the task it ran in (chunksize > 1)
    )""",
)

_INSERT = (
    "INSERT OR REPLACE INTO inputs (key, fn, input, outcome, result, error, duration, "
    "attempts, pid, kills, failures, runs, finished, chunk) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = 160
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


class Journal:
    """Where a ``map`` records each input's outcome, and how it names inputs.

    ``path``: the SQLite file (created if missing; an existing file that is not a
    journal is refused, never overwritten). ``key``: ``key(*args)`` -> str or int,
    an input's name in the journal; by default a hash of the task function's
    qualified name and the pickled input. ``quarantine_after``: an input whose task
    killed its worker (timeout, crash, memory) this many times, over all runs, is not
    run again and yields :class:`~pgexecutor.QuarantinedError`.
    """

    def __init__(
        self,
        path: str | bytes | os.PathLike[Any],
        *,
        key: Callable[..., Any] | None = None,
        quarantine_after: int = 2,
    ) -> None:
        self.path = os.fsdecode(os.fspath(path))
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable or None, got {key!r}")
        if isinstance(quarantine_after, bool) or not isinstance(quarantine_after, int):
            raise TypeError("quarantine_after must be an int")
        if quarantine_after < 1:
            raise ValueError("quarantine_after must be >= 1")
        self.key = key
        self.quarantine_after = quarantine_after

    def __repr__(self) -> str:
        return (
            f"Journal({self.path!r}, key={self.key!r}, "
            f"quarantine_after={self.quarantine_after})"
        )


def _as_journal(journal: Any) -> Journal:
    if isinstance(journal, Journal):
        return journal
    if isinstance(journal, (str, bytes, os.PathLike)):
        return Journal(journal)
    raise TypeError(f"journal must be a path or a pgexecutor.Journal, got {journal!r}")


# ====================================================================== keys


def function_name(fn: Any) -> str:
    """``module.qualname`` of a task function (of its class, for other callables)."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({function_name(fn.func)})"
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not isinstance(qualname, str):
        qualname, module = type(fn).__qualname__, type(fn).__module__
    return f"{module}.{qualname}"


def _function_material(fn: Any) -> bytes:
    """What of ``fn`` goes into the default key: its name and, for a partial, its
    bound arguments (``partial(mesh, quality=2)`` and ``quality=3`` are two sweeps)."""
    material = function_name(fn).encode()
    while isinstance(fn, functools.partial):
        material += pickle.dumps((fn.args, fn.keywords), protocol=_KEY_PROTOCOL)
        fn = fn.func
    return material


def default_key(fn: Any, args: tuple[Any, ...]) -> str:
    """The default key: sha256 of the function's qualified name and the input pickled
    with the standard pickle (protocol 4), as 32 hex digits.

    Stable across runs and machines for inputs whose pickle is (numbers, strings,
    tuples, lists, dicts built in the same order, dataclasses, numpy arrays). Not for
    sets of strings (their order follows the per-process string hash) or objects that
    pickle differently each time: pass ``key=`` for those.
    """
    digest = hashlib.sha256(_function_material(fn))
    digest.update(b"\0")
    digest.update(pickle.dumps(args, protocol=_KEY_PROTOCOL))
    return digest.hexdigest()[:32]


_PLAIN_REPR = (int, float, str, bytes, bool, type(None))


def _short_repr(args: tuple[Any, ...]) -> str:
    try:
        if all(type(a) in _PLAIN_REPR for a in args):  # the common case, 1/5 of reprlib
            return repr(args[0] if len(args) == 1 else args)[:200]
        return _repr.repr(args[0] if len(args) == 1 else args)[:200]
    except Exception as exc:  # a broken __repr__ must not lose the row
        return f"<unrepresentable input: {type(exc).__name__}>"


def _make_keys(journal: Journal, fn: Any, inputs: list[tuple[Any, ...]]) -> list[str]:
    keys: list[str] = []
    if journal.key is None:
        try:
            material = _function_material(fn)
        except Exception as exc:
            raise JournalError(
                f"the arguments bound to {function_name(fn)} do not pickle, so no default "
                f"journal key can be made ({type(exc).__name__}: {exc}); pass "
                "Journal(path, key=...) to name the inputs yourself"
            ) from exc
        base = hashlib.sha256(material)
        base.update(b"\0")
        for i, args in enumerate(inputs):
            try:
                pickled = pickle.dumps(args, protocol=_KEY_PROTOCOL)
            except Exception as exc:
                raise JournalError(
                    f"input #{i} ({_short_repr(args)}) cannot be pickled by the standard "
                    f"pickle, so it has no default journal key ({type(exc).__name__}: "
                    f"{exc}); pass Journal(path, key=...) to name the inputs yourself"
                ) from exc
            digest = base.copy()
            digest.update(pickled)
            keys.append(digest.hexdigest()[:32])
        return keys
    for i, args in enumerate(inputs):
        try:
            key = journal.key(*args)
        except Exception as exc:
            raise JournalError(
                f"the journal's key= function raised for input #{i} ({_short_repr(args)}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise JournalError(
                f"the journal's key= function must return a str or an int; for input #{i} "
                f"({_short_repr(args)}) it returned {key!r}"
            )
        keys.append(str(key))
    return keys


# ====================================================================== the file


def _check_header(path: str) -> bool:
    """True if ``path`` is empty or a new file, False if it holds something; raises
    JournalError for a file that is not an SQLite database (it is left untouched)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return True
    except IsADirectoryError:
        raise JournalError(f"journal {path!r} is a directory, not a journal file") from None
    except OSError as exc:
        raise JournalError(f"cannot read journal {path!r}: {exc}") from exc
    if not head:
        return True  # empty: what sqlite itself makes first; nothing to overwrite
    if head != _SQLITE_HEADER:
        raise JournalError(
            f"{path!r} exists and is not a pgexecutor journal (not an SQLite database); "
            "it was left untouched: choose another path"
        )
    return False


def _check_meta(
    conn: sqlite3.Connection, path: str, allow_empty: bool = False
) -> dict[str, str | None]:
    """The meta rows of an existing file, after checking that it is our journal."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        meta: dict[str, str | None] = (
            dict(conn.execute("SELECT name, value FROM meta")) if "meta" in tables else {}
        )
    except sqlite3.DatabaseError as exc:
        raise JournalError(
            f"{path!r} is not a pgexecutor journal (unreadable as SQLite: {exc}); it was "
            "left untouched: choose another path"
        ) from exc
    if not tables and allow_empty:
        return {}  # an empty database (one whose creation was cut short): ours to fill
    if meta.get("format") != FORMAT or "inputs" not in tables:
        raise JournalError(
            f"{path!r} is an SQLite database but not a pgexecutor journal; it was left "
            "untouched: choose another path"
        )
    if meta.get("version") != str(VERSION):
        raise JournalError(
            f"{path!r} is a pgexecutor journal of version {meta.get('version')}, this "
            f"pgexecutor reads version {VERSION}"
        )
    return meta


def _connect(path: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path,
        timeout=_BUSY_TIMEOUT,
        isolation_level=None,  # autocommit; transactions are explicit BEGIN/COMMIT
        check_same_thread=check_same_thread,
    )
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _open_for_map(path: str) -> sqlite3.Connection:
    """Open (or create) ``path`` as a journal; raise JournalError if that cannot be."""
    new = _check_header(path)
    parent = os.path.dirname(os.path.abspath(path))
    if new and not os.path.isdir(parent):
        raise JournalError(f"cannot create journal {path!r}: directory {parent!r} does not exist")
    try:
        conn = _connect(path, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open or create journal {path!r}: {exc}") from exc
    try:
        if not new:
            _check_meta(conn, path, allow_empty=True)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(
                f"journal {path!r}: SQLite cannot use WAL mode there (got {mode!r}); "
                "put the journal on a local filesystem"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:  # not executescript: it would COMMIT first
                conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('format', ?), ('version', ?)",
                (FORMAT, str(VERSION)),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if new:
            _check_meta(conn, path)  # someone else may have made it meanwhile
    except JournalError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise JournalError(f"cannot write journal {path!r}: {exc}") from exc
    return conn


# ====================================================================== the lock


def _me() -> dict[str, Any]:
    proc = psutil.Process()
    return {
        "pid": proc.pid,
        "start": proc.create_time(),
        "host": socket.gethostname(),
        "since": time.time(),
        "token": uuid.uuid4().hex,
    }


def owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the process that holds a journal's lock still runs.

    On another host we cannot tell: it counts as alive. On this one, a pid that is
    gone, a zombie, or now a different process (another start time) is dead.
    """
    if owner.get("host") != socket.gethostname():
        return True
    try:
        proc = psutil.Process(int(owner["pid"]))
        if abs(proc.create_time() - float(owner["start"])) > 0.05:
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, KeyError, TypeError, ValueError):
        return True  # cannot read it: do not steal a lock we cannot judge


def _describe_owner(owner: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("since", 0))))
    where = "this process" if owner.get("pid") == os.getpid() and owner.get(
        "host"
    ) == socket.gethostname() else f"pid {owner.get('pid')} on {owner.get('host')}"
    return f"{where}, since {since}"


def _take_lock(conn: sqlite3.Connection, path: str, meta: dict[str, str]) -> str:
    """Write our owner row (and ``meta``, in the same transaction) unless a live map
    holds the journal; return the owner row we wrote."""
    me = json.dumps(_me())
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'owner'").fetchone()
            if row and row[0]:
                owner = json.loads(row[0])
                if owner_alive(owner):
                    conn.execute("ROLLBACK")
                    hint = (
                        " (an earlier map's iterator in this process that was neither "
                        "exhausted nor closed?)"
                        if owner.get("pid") == os.getpid()
                        else ""
                    )
                    raise JournalError(
                        f"journal {path!r} is in use by another running map: "
                        f"{_describe_owner(owner)}{hint}. If that process is gone, run "
                        f"`python -m pgexecutor journal {path} --unlock`"
                    )
                logger.info(
                    "journal %s: taking over the lock of a map that died (%s)",
                    path, _describe_owner(owner),
                )
            conn.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                [("owner", me), *meta.items()],
            )
            conn.execute("COMMIT")
        except sqlite3.Error:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise JournalError(f"cannot lock journal {path!r}: {exc}") from exc
    return me


# ====================================================================== one map's session

_STOP = object()


# What the writer records for one finished input: (key, args, future, index of the
# input in its chunk or None without chunks, inputs in its task). A tuple, not an
# object: see _plan_and_submit on garbage collection.
_Entry = tuple


class _Prior:
    """An input's row as this map found it (only this map writes it meanwhile)."""

    __slots__ = ("outcome", "kills", "failures", "runs")

    def __init__(self, outcome: str, kills: int, failures: list[dict[str, Any]], runs: int):
        self.outcome = outcome
        self.kills = kills
        self.failures = failures
        self.runs = runs


class _Session:
    """One journaled map's hold on its journal, from the map() call to the end of the
    iteration: the lock, the control connection and the writer thread."""

    def __init__(self, journal: Journal, fn_name: str) -> None:
        self.path = journal.path
        self.quarantine_after = journal.quarantine_after
        self.fn_name = fn_name
        self.conn = _open_for_map(self.path)
        try:
            self.owner = _take_lock(
                self.conn, self.path, {"quarantine_after": str(self.quarantine_after), "fn": fn_name}
            )
        except BaseException:
            self.conn.close()
            raise
        self.prior: dict[str, _Prior] = {}
        self.futures: list[Future[Any]] = []
        self.error: BaseException | None = None  # the writer's first failure
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._accepting = True
        self._flush_now = threading.Event()
        self._close_lock = threading.Lock()
        self._closed = False
        self._writer = threading.Thread(
            target=self._write_loop, name=f"pgexecutor-journal {self.path}", daemon=True
        )
        self._writer.start()

    # ------------------------------------------------------------ reading (control conn)

    def load_prior(self, keys: Iterable[str]) -> None:
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _SELECT_BATCH):
            batch = unique[start : start + _SELECT_BATCH]
            marks = ",".join("?" * len(batch))
            for key, outcome, kills, failures, runs in self.conn.execute(
                f"SELECT key, outcome, kills, failures, runs FROM inputs WHERE key IN ({marks})",
                batch,
            ):
                try:
                    past = json.loads(failures or "[]")
                except ValueError:
                    past = []
                self.prior[key] = _Prior(outcome, int(kills or 0), past, int(runs or 0))

    def stored(self, key: str) -> tuple[bytes | None, str | None]:
        row = self.conn.execute("SELECT result, error FROM inputs WHERE key = ?", (key,)).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def check(self) -> None:
        if self.error is not None:
            raise JournalError(
                f"writing to journal {self.path!r} failed ({type(self.error).__name__}: "
                f"{self.error}); results after that point are not recorded"
            ) from self.error

    # ------------------------------------------------------------ writing (writer thread)

    def on_done(self, key: str, args: tuple[Any, ...], fut: Future[Any]) -> None:
        """Done-callback, in the manager thread (or a cancelling one): enqueue only.
        No lock: an entry that slips in after close()'s _STOP is simply not recorded,
        as if it had finished after the close."""
        if self._accepting:
            self._queue.put((key, args, fut, None, 1))

    def on_chunk_done(self, items: list[tuple[str, tuple[Any, ...]]], fut: Future[Any]) -> None:
        """on_done for a chunk's task: one entry per input."""
        if self._accepting:
            size = len(items)
            for index, (key, args) in enumerate(items):
                self._queue.put((key, args, fut, index, size))

    def _write_loop(self) -> None:
        try:
            self._write_batches()
        except BaseException as exc:  # the iterator reports it (session.check)
            logger.error("journal %s: the writer failed", self.path, exc_info=True)
            self.error = exc

    def _write_batches(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(self.path)
        except sqlite3.Error as exc:
            self.error = exc
        last = 0.0
        stop = False
        while not stop:
            batch = [self._queue.get()]
            self._drain(batch)
            if _STOP not in batch:
                # Batching: at most one commit per _WINDOW, so a burst of tiny tasks
                # costs one transaction, and nothing waits longer than _WINDOW.
                wait = last + _WINDOW - time.monotonic()
                if wait > 0:
                    self._flush_now.wait(wait)  # close() cuts the wait short
                    self._drain(batch)
            stop = _STOP in batch
            rows = []
            for n, entry in enumerate(batch):
                if entry is _STOP:
                    continue
                if n % 16 == 15:
                    # Let the manager thread have the GIL: otherwise it could wait a
                    # whole switch interval (5 ms) for a long batch, workers idle.
                    time.sleep(0)
                try:
                    row = self._row(entry)
                except Exception:
                    logger.warning(
                        "journal %s: could not record input %s; it will run again next time",
                        self.path, entry[0], exc_info=True,
                    )
                    row = None
                if row is not None:
                    rows.append(row)
            del batch
            if rows and conn is not None and self.error is None:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        conn.executemany(_INSERT, rows)
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                except sqlite3.Error as exc:
                    logger.error("journal %s: writing failed: %s", self.path, exc)
                    self.error = exc
            last = time.monotonic()
        if conn is not None:
            conn.close()

    def _drain(self, batch: list[Any]) -> None:
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _row(self, entry: _Entry) -> tuple[Any, ...] | None:
        key, args, fut, index, size = entry
        if fut.cancelled():
            return None
        info = task_info(fut)
        duration = getattr(info, "duration", None)
        pid = getattr(info, "pid", None)
        attempts = getattr(info, "attempts", None) or 1
        exc = fut.exception()
        blob: bytes
        if exc is None:
            value = fut.result()
            if index is not None:
                values, errors = value
                duration, value = values[index]
                if errors and index in errors:
                    blob = errors[index]
                    return self._failed_row(
                        entry, "error", proto.load_exception(blob), blob, duration, attempts, pid
                    )
            return self._make_row(
                entry, "ok", _dump_result(value), None, duration, attempts, pid, 0, None
            )
        outcome = _outcome(exc)
        if outcome is None:
            return None
        return self._failed_row(
            entry, outcome, exc, proto.dump_exception(exc), duration, attempts, pid
        )

    def _failed_row(
        self,
        entry: _Entry,
        outcome: str,
        exc: BaseException,
        blob: bytes,
        duration: float | None,
        attempts: int,
        pid: int | None,
    ) -> tuple[Any, ...]:
        summary = _summary(exc)
        failure = None
        kills = 0
        if outcome in KILLS:
            # A killed chunk of several inputs: the culprit is unknown, so it counts
            # against none of them; their next run puts each in a task of its own.
            size = entry[4]
            kills = attempts if size == 1 else 0
            failure = {"outcome": outcome, "error": summary, "kills": kills, "at": time.time()}
            if size > 1:
                failure["chunk"] = size
        return self._make_row(entry, outcome, blob, summary, duration, attempts, pid, kills, failure)

    def _make_row(
        self,
        entry: _Entry,
        outcome: str,
        blob: bytes,
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
            _short_repr(args),
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

    # ------------------------------------------------------------ the end

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
        self._accepting = False
        self._queue.put(_STOP)
        self._flush_now.set()
        self._writer.join()
        try:
            self.conn.execute(
                "UPDATE meta SET value = NULL WHERE name = 'owner' AND value = ?", (self.owner,)
            )
        except sqlite3.Error as exc:
            logger.warning("journal %s: could not release its lock: %s", self.path, exc)
        self.conn.close()


def _dump_result(value: Any) -> bytes:
    """A result for the file: plain pickle (a tenth of cloudpickle's cost on small
    values), cloudpickle for what plain pickle refuses (lambdas, local classes)."""
    try:
        return pickle.dumps(value, protocol=proto.PICKLE_PROTOCOL)
    except Exception:
        return proto.dumps(value)


def _outcome(exc: BaseException) -> str | None:
    """The journal's outcome for a task's exception; None: do not record (the user
    stopped the executor, or the worker's initializer failed: not the input's doing)."""
    if isinstance(exc, WorkerInitializerError):
        return None
    if isinstance(exc, MemoryLimitError):
        return "memory"
    if isinstance(exc, TaskTimeoutError):
        return "timeout"
    if isinstance(exc, WorkerCrashedError):
        reason = exc.reason or ""
        if exc.exitcode is None and (
            "terminate" in reason or "kill_workers" in reason or "interrupted" in reason
        ):
            return None  # terminate_workers(), kill_workers(), Ctrl-C
        return "crashed"
    return "error"


def _summary(exc: BaseException) -> str:
    text = proto.safe_str(exc).strip().split("\n\n")[0].replace("\n", " ")
    summary = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return summary if len(summary) <= _ERROR_CHARS else summary[: _ERROR_CHARS - 3] + "..."


# ====================================================================== map


class _Quarantined:
    """The slot of a quarantined key (see _plan_and_submit for the other slots)."""

    __slots__ = ("failures",)

    def __init__(self, failures: list[dict[str, Any]]) -> None:
        self.failures = failures


class JournaledMap(Iterator[Any]):
    """The iterator a journaled ``map`` returns. Ending it (exhausted, ``break``,
    ``close()``, garbage collection, interpreter exit) cancels what has not started,
    flushes the journal and unlocks it."""

    def __init__(self, results: Iterator[Any], session: _Session) -> None:
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
    journal = _as_journal(journal)
    make_bar = _progress.resolve(progress)
    if timeout is not None and math.isinf(timeout) and timeout > 0:
        timeout = None
    end_time = None if timeout is None else timeout + time.monotonic()
    inputs = list(zip(*iterables, strict=False))
    keys = _make_keys(journal, fn, inputs)
    session = _Session(journal, function_name(fn))
    try:
        session.load_prior(keys)
        slots, groups = _plan(session, inputs, keys, chunksize)
        tracker = None
        if make_bar is not None:  # counts the inputs that run
            tracker = _progress.Tracker(make_bar, sum(len(g) for g in groups), chunksize > 1)
        runner = _Runner(session, submit, fn, inputs, keys, slots, groups, chunksize > 1, tracker)
        for _ in range(len(groups) if buffersize is None else buffersize):
            if not runner.submit_next():
                break
    except BaseException:
        session.close()
        raise
    results = _iterate(session, runner, keys, slots, end_time, return_exceptions)
    if tracker is not None:
        results = _progress.watch(tracker, results)
    return JournaledMap(results, session)


def _plan(
    session: _Session, inputs: list[tuple[Any, ...]], keys: list[str], chunksize: int
) -> tuple[dict[str, Any], list[list[int]]]:
    """Decide each distinct key's fate and group the inputs that run into tasks, in
    the order the iterator will need them. Equal keys (equal inputs, or a key= that
    names two inputs alike) run once and share the outcome.

    A key's slot is "ok" or "error" (replayed from the file), a _Quarantined, or, for
    an input that runs, its task's group number (chunks: (group, index in it)) until
    the task is submitted, then its Future (chunks: (Future, index)). Plain values,
    not an object per input: a 20,000-input map would otherwise pay more in garbage
    collection than in all the rest.
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
        elif prior.outcome in KILLS and prior.kills >= session.quarantine_after:
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
        return p is not None and p.outcome in KILLS

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
        session: _Session,
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
        session, keys, inputs, slots = self.session, self.keys, self.inputs, self.slots
        if not self.chunked:
            key, args = keys[group[0]], inputs[group[0]]
            fut = self.submit(self.fn, args)
            fut.add_done_callback(functools.partial(session.on_done, key, args))
            if key in slots:  # not yet yielded for the last time
                slots[key] = fut
        else:
            items = [(keys[i], inputs[i]) for i in group]
            fut = self.submit(run_chunk_timed, (self.fn, [args for _, args in items]))
            fut.add_done_callback(functools.partial(session.on_chunk_done, items))
            for index, (key, _) in enumerate(items):
                if key in slots:
                    slots[key] = (fut, index)
        session.futures.append(fut)
        if self.tracker is not None:
            self.tracker.add(fut, len(group))
        return True

    def submit_through(self, group: int) -> None:
        while self.next <= group and self.submit_next():
            pass


def _iterate(
    session: _Session,
    runner: _Runner,
    keys: list[str],
    slots: dict[str, Any],
    end_time: float | None,
    return_exceptions: bool,
) -> Iterator[Any]:
    """Yield in input order. No local variable holds a result across a yield (a
    suspended generator would keep it alive)."""
    left: dict[str, int] | None = None
    if len(slots) != len(keys):  # equal keys: keep a slot until its last position
        left = {}
        for key in keys:
            left[key] = left.get(key, 0) + 1
    last: Any = None  # the task whose result was taken last
    try:
        for key in keys:
            if session.error is not None:
                session.check()
            slot = slots[key]
            if isinstance(slot, int) or (type(slot) is tuple and isinstance(slot[0], int)):
                runner.submit_through(slot if isinstance(slot, int) else slot[0])
                slot = slots[key]
            task = slot[0] if type(slot) is tuple else slot
            if isinstance(task, Future) and task is not last:
                last = task
                runner.submit_next()  # buffersize: one more each time a result is taken
            del task
            ok, out = _answer(session, key, slot, end_time)
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
        session.check()
    finally:
        session.close()


def _answer(
    session: _Session, key: str, slot: Any, end_time: float | None
) -> tuple[bool, Any]:
    if isinstance(slot, _Quarantined):
        return False, QuarantinedError(key, slot.failures)
    if isinstance(slot, str):  # "ok" or "error": replayed from the file
        blob, error = session.stored(key)
        if slot == "ok":
            try:
                return True, proto.loads(blob or b"")
            except Exception as exc:
                # As for a result that does not unpickle when it arrives: unpickling's
                # own exception, marked with its stage and a note (PEP 678, 3.11+).
                exc.pgexecutor_stage = "unpickle-result"  # type: ignore[attr-defined]
                note = f"pgexecutor: the result stored in journal {session.path!r} could not be unpickled"
                add_note = getattr(exc, "add_note", None)
                if add_note is not None:
                    add_note(note)
                return False, exc
        try:
            return False, proto.load_exception(blob or b"")
        except Exception:
            return False, RemoteTaskError("Exception", error or "(no message stored)", "")
    index = None
    if isinstance(slot, tuple):
        slot, index = slot
    fut: Future[Any] = slot
    timeout = None if end_time is None else max(0.0, end_time - time.monotonic())
    try:
        value = fut.result(timeout)
    except FuturesTimeoutError:
        if not fut.done():
            raise  # map's own timeout: the standard meaning
        return False, fut.exception()
    except Exception as exc:
        return False, exc
    if index is None:
        return True, value
    values, errors = value
    if errors and index in errors:
        return False, proto.load_exception(errors[index])
    return True, values[index][1]


# ====================================================================== reading a journal


def _open_for_reading(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise JournalError(f"no such journal: {path!r}")
    if _check_header(path):
        raise JournalError(f"{path!r} is empty, not a pgexecutor journal")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT)
    except sqlite3.Error:
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT)
    try:
        _check_meta(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def summarize(path: str | os.PathLike[str], top: int = 10) -> dict[str, Any]:
    """What a journal says happened, as plain data (``python -m pgexecutor journal
    PATH --json`` prints it): counts per outcome, the ``top`` slowest inputs, every
    failed or quarantined input, and the lock's owner if a map holds it."""
    path = os.fsdecode(os.fspath(path))
    conn = _open_for_reading(path)
    try:
        meta = dict(conn.execute("SELECT name, value FROM meta"))
        quarantine_after = int(meta.get("quarantine_after") or 2)
        counts = dict.fromkeys((*OUTCOMES, "quarantined"), 0)
        failed = []
        for key, fn, inp, outcome, error, duration, attempts, pid, kills, failures, runs, fin in (
            conn.execute(
                "SELECT key, fn, input, outcome, error, duration, attempts, pid, kills, "
                "failures, runs, finished FROM inputs ORDER BY finished"
            )
        ):
            status = outcome
            if outcome in KILLS and (kills or 0) >= quarantine_after:
                status = "quarantined"
            counts[status] = counts.get(status, 0) + 1
            if status != "ok":
                failed.append({
                    "key": key, "input": inp, "status": status, "outcome": outcome,
                    "error": error, "kills": kills, "failures": json.loads(failures or "[]"),
                    "duration": duration, "attempts": attempts, "pid": pid, "runs": runs,
                    "finished": fin, "fn": fn,
                })
        slowest = [
            {"key": k, "input": i, "outcome": o, "duration": d, "attempts": a, "pid": p}
            for k, i, o, d, a, p in conn.execute(
                "SELECT key, input, outcome, duration, attempts, pid FROM inputs "
                "WHERE duration IS NOT NULL ORDER BY duration DESC LIMIT ?",
                (top,),
            )
        ]
        owner = json.loads(meta["owner"]) if meta.get("owner") else None
        if owner is not None:
            here = owner.get("host") == socket.gethostname()
            owner = {k: owner.get(k) for k in ("pid", "host", "since")} | {
                "alive": owner_alive(owner) if here else None  # None: cannot tell
            }
        return {
            "path": path,
            "format": meta.get("format"),
            "version": int(meta.get("version") or 0),
            "fn": meta.get("fn"),
            "inputs": sum(counts.values()),
            "counts": counts,
            "quarantine_after": quarantine_after,
            "owner": owner,
            "slowest": slowest,
            "failed": failed,
        }
    finally:
        conn.close()


def format_summary(s: dict[str, Any]) -> str:
    """The text ``python -m pgexecutor journal PATH`` prints for ``summarize()``'s dict."""
    lines = [f"journal {s['path']}: {s['inputs']} inputs, function {s['fn'] or '?'}"]
    owner = s["owner"]
    if owner is None:
        lines.append("  not in use")
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"] or 0))
        state = {
            True: "running",
            False: "dead: a stale lock, the next map takes it over",
            None: "another host: cannot tell if it runs; --unlock if it does not",
        }[owner["alive"]]
        lines.append(f"  in use by pid {owner['pid']} on {owner['host']} since {since} ({state})")
    lines.append(
        "  " + "  ".join(f"{name} {n}" for name, n in s["counts"].items())
        + f"   (quarantine after {s['quarantine_after']} kills)"
    )
    if s["slowest"]:
        lines.append("")
        lines.append("slowest:")
        for r in s["slowest"]:
            lines.append(
                f"  {r['duration']:9.3f} s  {r['outcome']:<8} {_clip(r['key'], 32):<32}  "
                f"{_clip(r['input'] or '', 60)}"
            )
    if s["failed"]:
        lines.append("")
        lines.append(f"failed or quarantined ({len(s['failed'])}):")
        for r in s["failed"]:
            lines.append(
                f"  {r['status']:<11} {_clip(r['key'], 32):<32}  {_clip(r['input'] or '', 60)}"
            )
            lines.append(f"      {_clip(r['error'] or '', 160)}")
            if r["kills"]:
                lines.append(
                    f"      killed its worker {r['kills']}x over {r['runs']} run(s): "
                    + ", ".join(str(f.get("outcome")) for f in r["failures"])
                )
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def unlock(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Drop a journal's lock row (``--unlock``); refuse if its owner runs on this host.
    Returns the owner that was removed, or None if the journal was not locked."""
    path = os.fsdecode(os.fspath(path))
    conn = _open_for_reading(path)
    conn.close()
    conn = _connect(path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE name = 'owner'").fetchone()
        if not row or not row[0]:
            return None
        owner: dict[str, Any] = json.loads(row[0])
        if owner.get("host") == socket.gethostname() and owner_alive(owner):
            raise JournalError(
                f"journal {path!r} is in use by a running map ({_describe_owner(owner)}); "
                "not unlocking it"
            )
        conn.execute("UPDATE meta SET value = NULL WHERE name = 'owner' AND value = ?", row)
        return owner
    finally:
        conn.close()
