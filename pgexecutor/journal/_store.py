"""Storage and locks: the SQLite file, what its errors mean, large values, the owner row.

A journal is an SQLite database (stdlib ``sqlite3``, WAL mode, ``synchronous=NORMAL``:
a SIGKILL or OOM kill of the parent keeps every committed transaction; a power loss
may lose the last ones). Table ``inputs`` has one row per key with the input's latest
outcome; ``meta`` holds the format, the map's settings and the ``owner`` row (the lock);
``parts`` holds the pieces of values too large for one SQLite value.

Errors: every ``sqlite3.Error`` that reaches a user becomes a JournalError that says
the cause in words (:func:`explain`: disk full, read-only, damaged, locked by another
connection, too large), with SQLite's own text beside it. A failed statement inside a
transaction is rolled back with :func:`rollback`, which never lets the rollback's own
failure ("cannot rollback - no transaction is active", after SQLite already rolled
back on SQLITE_FULL) hide the error that mattered.

One writer per journal: the ``owner`` row names the running map's pid, process start
time, host and a token; a second map is refused while that process lives. A journal
left locked by a process that died is taken over. A process that could not drop its
own lock (the disk was full) remembers the token in ``_abandoned``, so its next map
takes the journal over instead of refusing it as "in use by this process".
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import struct
import time
import urllib.parse
import uuid
from typing import Any

import psutil

from ..errors import JournalError

logger = logging.getLogger("pgexecutor")

FORMAT = "pgexecutor-journal"
VERSION = 1
BUSY_TIMEOUT = 10.0  # seconds a map waits for another connection's write to end
READ_BUSY_TIMEOUT = 2.0  # the same for the report (a locked journal is said so at once)
_SQLITE_HEADER = b"SQLite format 3\x00"
_SELECT_BATCH = 500  # keys per "WHERE key IN (...)" (SQLite allows 999 variables, or more)
#: SQLite's limit on one value (SQLITE_LIMIT_LENGTH), when the connection cannot say.
_DEFAULT_LENGTH_LIMIT = 1_000_000_000
#: Tests lower SQLite's limit to this many bytes on every connection (None: SQLite's).
length_limit_for_tests: int | None = None
_LIMIT_LENGTH = getattr(sqlite3, "SQLITE_LIMIT_LENGTH", 0)  # 3.11+ (setlimit/getlimit too)

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)",
    """CREATE TABLE IF NOT EXISTS inputs (
        key TEXT PRIMARY KEY,       -- the input's key: a hash of fn and input, or key=
        fn TEXT,                    -- module.qualname of the task function
        input TEXT,                 -- repr of the input, truncated
        outcome TEXT NOT NULL,      -- ok, error, timeout, crashed, memory
        result BLOB,                -- ok: the result as the worker pickled it, else the
                                    -- encoded exception (see _records: the forms)
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
    """CREATE TABLE IF NOT EXISTS parts (
        key TEXT NOT NULL,          -- the input whose result is too large for one value
        n INTEGER NOT NULL,         -- the piece's place, from 0
        data BLOB NOT NULL,
        PRIMARY KEY (key, n)
    )""",
)

INSERT = (
    "INSERT OR REPLACE INTO inputs (key, fn, input, outcome, result, error, duration, "
    "attempts, pid, kills, failures, runs, finished, chunk) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# ---------------------------------------------------------------- errors

#: SQLite's primary result codes, and what each means to the user.
_CAUSES = {
    3: "permission denied",  # SQLITE_PERM
    5: "locked by another connection (it held a write transaction or an exclusive lock "
       "for longer than we waited)",  # SQLITE_BUSY
    6: "locked by another connection",  # SQLITE_LOCKED
    8: "the journal is read-only (the file, its directory or its filesystem)",  # READONLY
    10: "an I/O error on the journal's disk",  # SQLITE_IOERR
    11: "the file is damaged (its SQLite structure is corrupt)",  # SQLITE_CORRUPT
    13: "the disk is full",  # SQLITE_FULL
    14: "the file cannot be opened (missing directory, or no permission)",  # CANTOPEN
    18: "a value is too large for SQLite",  # SQLITE_TOOBIG
    26: "the file is damaged or not an SQLite database",  # SQLITE_NOTADB
}


def cause(exc: BaseException) -> str:
    """The cause of a storage error in words, with the library's own text."""
    code = getattr(exc, "sqlite_errorcode", None)
    what = _CAUSES.get(code & 0xFF) if isinstance(code, int) else None
    if what is None and isinstance(exc, sqlite3.DataError) and "too big" in str(exc):
        what = _CAUSES[18]
    if what is None and isinstance(exc, OSError):
        import errno

        what = {errno.ENOSPC: _CAUSES[13], errno.EROFS: _CAUSES[8],
                errno.EACCES: _CAUSES[3]}.get(exc.errno or 0)
    own = f"{type(exc).__name__}: {exc}"
    return f"{what} ({own})" if what else own


def explain(path: str, doing: str, exc: BaseException) -> JournalError:
    """A JournalError for ``exc`` (raised while ``doing``), chained to it."""
    code = getattr(exc, "sqlite_errorcode", None)
    why = cause(exc)
    if isinstance(code, int) and code & 0xFF in (8, 14):  # READONLY, CANTOPEN: say which
        where = _unwritable(path)
        if where:
            why = f"{where} ({type(exc).__name__}: {exc})"
    err = JournalError(f"journal {path!r}: {doing} failed: {why}")
    err.__cause__ = exc
    return err


def _unwritable(path: str) -> str | None:
    """Why SQLite cannot write at ``path``, if a plain check can tell."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            return "the journal is read-only: its filesystem is mounted read-only"
    except OSError:
        return None
    if not os.access(parent, os.W_OK):
        return "the journal is read-only: its directory is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the journal is read-only: the file is not writable"
    return None


def read_only_filesystem(path: str) -> bool:
    try:
        return bool(os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def is_damage(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (11, 26)


def is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (5, 6)
    return "locked" in str(exc)


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open. SQLite ends some transactions itself
    on an error (SQLITE_FULL, SQLITE_IOERR): a ROLLBACK then fails with "no
    transaction is active", which must not replace the error being handled."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.debug("rollback failed", exc_info=True)


# ---------------------------------------------------------------- opening


def check_header(path: str) -> bool:
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
        raise JournalError(f"cannot read journal {path!r}: {cause(exc)}") from exc
    if not head:
        return True  # empty: what sqlite itself makes first; nothing to overwrite
    if head != _SQLITE_HEADER:
        raise JournalError(
            f"{path!r} exists and is not a pgexecutor journal (not an SQLite database); "
            "it was left untouched: choose another path"
        )
    return False


def check_meta(
    conn: sqlite3.Connection, path: str, allow_empty: bool = False
) -> dict[str, str | None]:
    """The meta rows of an existing file, after checking that it is our journal.

    Locked (another connection holds it) and damaged are said as such: neither means
    the file is not a journal.
    """
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        meta: dict[str, str | None] = (
            dict(conn.execute("SELECT name, value FROM meta")) if "meta" in tables else {}
        )
    except sqlite3.Error as exc:
        # It has SQLite's header (check_header): locked, damaged or unreadable, but
        # not "not a journal".
        raise explain(path, "reading", exc) from exc
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


def connect(
    path: str, *, check_same_thread: bool = True, busy: float | None = None, uri: bool = False
) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path,
        timeout=BUSY_TIMEOUT if busy is None else busy,
        isolation_level=None,  # autocommit; transactions are explicit BEGIN/COMMIT
        check_same_thread=check_same_thread,
        uri=uri,
    )
    if length_limit_for_tests is not None:
        conn.setlimit(_LIMIT_LENGTH, length_limit_for_tests)  # type: ignore[attr-defined]
    if not uri:
        conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def open_for_map(path: str) -> sqlite3.Connection:
    """Open (or create) ``path`` as a journal; raise JournalError if that cannot be."""
    new = check_header(path)
    parent = os.path.dirname(os.path.abspath(path))
    if new and not os.path.isdir(parent):
        raise JournalError(f"cannot create journal {path!r}: directory {parent!r} does not exist")
    try:
        conn = connect(path, check_same_thread=False)
    except sqlite3.Error as exc:
        raise explain(path, "opening or creating it", exc) from exc
    try:
        if not new:
            check_meta(conn, path, allow_empty=True)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(
                f"journal {path!r}: SQLite cannot use WAL mode there (got {mode!r}); "
                "put the journal on a local filesystem"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA:  # not executescript: it would COMMIT first
                conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('format', ?), ('version', ?)",
                (FORMAT, str(VERSION)),
            )
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
        if new:
            check_meta(conn, path)  # someone else may have made it meanwhile
    except JournalError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise explain(path, "preparing it for writing", exc) from exc
    return conn


def open_for_reading(path: str) -> sqlite3.Connection:
    """A connection that only reads (the report, ``--unlock``'s check)."""
    if not os.path.exists(path):
        raise JournalError(f"no such journal: {path!r}")
    if check_header(path):
        raise JournalError(f"{path!r} is empty, not a pgexecutor journal")
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    try:
        conn = connect(uri, uri=True, busy=READ_BUSY_TIMEOUT)
        try:
            check_meta(conn, path)
        except BaseException:
            conn.close()
            raise
        return conn
    except JournalError as exc:
        if not read_only_filesystem(path):
            raise
        first: BaseException = exc
    except sqlite3.Error as exc:
        if not read_only_filesystem(path):
            raise explain(path, "opening it", exc) from exc
        first = exc
    # WAL needs its -shm file, which a read-only filesystem cannot hold; nothing can
    # write there either, so reading it as immutable is safe.
    try:
        conn = connect(uri + "&immutable=1", uri=True, busy=READ_BUSY_TIMEOUT)
    except sqlite3.Error:
        raise explain(path, "opening it", first) from first
    try:
        check_meta(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


# ---------------------------------------------------------------- large values

#: The ``result`` of a row whose value lives in ``parts``: this, then the piece count
#: and total size. No pickle starts with it (a pickle of protocol 2+ starts with 0x80).
PARTS_MAGIC = b"PGX-PARTS\0"
_PARTS_HEAD = struct.Struct("<QQ")


def length_limit(conn: sqlite3.Connection) -> int:
    try:
        return int(conn.getlimit(_LIMIT_LENGTH))  # type: ignore[attr-defined]
    except (AttributeError, sqlite3.Error):  # Python < 3.11
        return _DEFAULT_LENGTH_LIMIT


def split_value(
    key: str, blob: bytes | bytearray | memoryview, limit: int
) -> tuple[bytes | bytearray | memoryview, list[tuple[str, int, memoryview]]]:
    """``(value for the row, rows for parts)``: a blob over a quarter of SQLite's limit
    (the row holds other columns too) goes to ``parts`` in pieces of that size."""
    size = len(blob)
    piece = max(1, limit // 4)
    if size <= piece:
        return blob, []
    view = memoryview(blob)
    pieces = [(key, n, view[start : start + piece]) for n, start in enumerate(range(0, size, piece))]
    return PARTS_MAGIC + _PARTS_HEAD.pack(len(pieces), size), pieces


def join_value(conn: sqlite3.Connection, key: str, blob: bytes | None) -> bytes | None:
    """The stored value of ``key``'s row: ``blob`` itself, or its parts joined."""
    if blob is None or not blob.startswith(PARTS_MAGIC):
        return blob
    count, size = _PARTS_HEAD.unpack_from(blob, len(PARTS_MAGIC))
    out = bytearray()
    for (data,) in conn.execute("SELECT data FROM parts WHERE key = ? ORDER BY n", (key,)):
        out += data
    if len(out) != size:
        raise JournalError(
            f"the stored result of key {key!r} is incomplete: {len(out)} of {size} bytes "
            f"in {count} parts"
        )
    return bytes(out)


def load_rows(
    conn: sqlite3.Connection, keys: list[str]
) -> list[tuple[str, str, int, str, int]]:
    """``(key, outcome, kills, failures, runs)`` of the rows of these keys."""
    unique = list(dict.fromkeys(keys))
    out: list[tuple[str, str, int, str, int]] = []
    for start in range(0, len(unique), _SELECT_BATCH):
        batch = unique[start : start + _SELECT_BATCH]
        marks = ",".join("?" * len(batch))
        out.extend(conn.execute(
            f"SELECT key, outcome, kills, failures, runs FROM inputs WHERE key IN ({marks})",
            batch,
        ))
    return out


# ---------------------------------------------------------------- the lock

_abandoned: set[str] = set()  # tokens of our own locks we could not drop (see docstring)


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
    gone, a zombie, or now a different process (another start time) is dead; so is
    a lock this very process gave up on (it could not drop it).
    """
    if owner.get("host") != socket.gethostname():
        return True
    if owner.get("pid") == os.getpid() and owner.get("token") in _abandoned:
        return False
    try:
        proc = psutil.Process(int(owner["pid"]))
        if abs(proc.create_time() - float(owner["start"])) > 0.05:
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, KeyError, TypeError, ValueError):
        return True  # cannot read it: do not steal a lock we cannot judge


def describe_owner(owner: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("since", 0))))
    here = owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()
    where = "this process" if here else f"pid {owner.get('pid')} on {owner.get('host')}"
    return f"{where}, since {since}"


def take_lock(conn: sqlite3.Connection, path: str, meta: dict[str, str]) -> str:
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
                    hint = (
                        " (an earlier map's iterator in this process that was neither "
                        "exhausted nor closed?)"
                        if owner.get("pid") == os.getpid()
                        else ""
                    )
                    raise JournalError(
                        f"journal {path!r} is in use by another running map: "
                        f"{describe_owner(owner)}{hint}. If that process is gone, run "
                        f"`python -m pgexecutor journal {path} --unlock`"
                    )
                logger.info(
                    "journal %s: taking over the lock of a map that died (%s)",
                    path, describe_owner(owner),
                )
            conn.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                [("owner", me), *meta.items()],
            )
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    except sqlite3.Error as exc:
        raise explain(path, "taking its lock", exc) from exc
    return me


def release_lock(conn: sqlite3.Connection, path: str, owner: str) -> None:
    """Drop our owner row; if that fails, remember that the lock is ours to take over."""
    try:
        conn.execute("UPDATE meta SET value = NULL WHERE name = 'owner' AND value = ?", (owner,))
    except sqlite3.Error as exc:
        _abandoned.add(json.loads(owner)["token"])
        logger.warning("journal %s: could not release its lock: %s", path, cause(exc))
