"""Records: which outcomes a journal keeps, and the bytes it keeps for them.

Only outcomes a task produced are recorded (:func:`outcome_of`): its result, its own
exception, or its killing of its worker (timeout, crash, memory). Not what the pool
did to it: a cancelled task, one stopped by ``terminate_workers()``/``kill_workers()``/
Ctrl-C, one failed by a broken manager, one whose worker's initializer failed, one
whose arguments never left the caller, nor a whole chunk's exception (which input of
the chunk caused it is unknown).

The stored result is what the task returned, as the worker pickled it
(``TaskFuture.raw_outcome``): these bytes are not made from the caller's object, so
no later change of that object reaches the journal. Forms of the ``result`` column:

* a pickle (starts with 0x80): the worker's RESULT payload, or, where the worker's
  bytes are not at hand (shared memory, a chunk's item, another executor), the value
  pickled here *before* the iterator yields it;
* ``OOB_MAGIC`` + a RESULT_OOB payload: a pickle with its out-of-band buffers (large
  arrays), self-contained (see ``_protocol.OOBPayload``);
* for failures, an encoded exception as ``_protocol.load_exception`` reads it: the
  worker's own ERROR payload, or one encoded here without touching the process's
  pickling (no ``copyreg`` registration: that would change how the caller's own
  program pickles exceptions and tracebacks).

Each read unpickles afresh: every position that yields a stored result gets an
object of its own.
"""

from __future__ import annotations

import pickle
import time
from concurrent.futures import BrokenExecutor, CancelledError, Future
from typing import Any

from .. import _protocol as proto
from ..counters import CAUSES, OK
from ..errors import (
    MemoryLimitError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerInitializerError,
)

OUTCOMES = (OK, *CAUSES)  # ok, error, timeout, crashed, memory
KILLS = ("timeout", "crashed", "memory")  # the outcomes where the task killed its worker
OOB_MAGIC = b"PGX-OOB\0"
_ERROR_CHARS = 500
#: Reasons of a WorkerCrashedError that mean the pool stopped the task, not the task
#: its worker: terminate_workers(), kill_workers(), Ctrl-C, a failed manager.
_POOL_STOPS = ("terminate", "kill_workers", "interrupted", "manager thread failed")


class Prior:
    """An input's row as this map found it (only this map writes it meanwhile)."""

    __slots__ = ("outcome", "kills", "failures", "runs")

    def __init__(self, outcome: str, kills: int, failures: list[dict[str, Any]], runs: int):
        self.outcome = outcome
        self.kills = kills
        self.failures = failures
        self.runs = runs


def outcome_of(exc: BaseException, info: Any) -> str | None:
    """The journal's outcome for a failed task; None: not the task's doing, not
    recorded (it runs again next time). ``info``: its TaskInfo, if the executor
    gives one (its ``outcome`` says who ended it)."""
    if isinstance(exc, (CancelledError, WorkerInitializerError)):
        return None
    if getattr(exc, "pgexecutor_stage", None) == proto.PICKLE_ARGUMENTS:
        return None  # never left the caller: the task did not run
    told = getattr(info, "outcome", None)
    if told == "error":
        return "error"  # the task's own exception, whatever its type
    if told == "cancelled":
        return None
    if isinstance(exc, MemoryLimitError):
        return "memory"
    if isinstance(exc, TaskTimeoutError):
        return "timeout"
    if isinstance(exc, WorkerCrashedError):
        reason = exc.reason or ""
        if exc.exitcode is None and any(stop in reason for stop in _POOL_STOPS):
            return None
        return "crashed"
    if told is not None or isinstance(exc, BrokenExecutor):
        return None  # the pool failed it (a broken manager), not the task
    return "error"


def summary(exc: BaseException) -> str:
    text = proto.safe_str(exc).strip().split("\n\n")[0].replace("\n", " ")
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= _ERROR_CHARS else line[: _ERROR_CHARS - 3] + "..."


def take_raw(fut: Future[Any]) -> tuple[int, bytes | bytearray] | None:
    """The worker's own bytes of ``fut``'s outcome, if its executor kept them."""
    take = getattr(fut, "take_raw_outcome", None)
    return take() if take is not None else None


def result_blob(raw: tuple[int, bytes | bytearray] | None, value: Any) -> bytes | bytearray:
    """What to store for a result (see the module docstring for the forms)."""
    if raw is not None:
        kind, payload = raw
        if kind == proto.RESULT:
            return payload
        if kind == proto.RESULT_OOB:
            return OOB_MAGIC + payload
    return dump_value(value)


def dump_value(value: Any) -> bytes:
    """Plain pickle (a tenth of cloudpickle's cost on small values), cloudpickle for
    what plain pickle refuses (lambdas, local classes), as a worker does."""
    try:
        return pickle.dumps(value, protocol=proto.PICKLE_PROTOCOL)
    except Exception:
        return proto.dumps(value)


def load_result(blob: bytes | bytearray) -> Any:
    """A fresh object from a stored result (raises what unpickling raises)."""
    if blob[: len(OOB_MAGIC)] == OOB_MAGIC:
        # A bytearray of its own: the arrays rebuilt on it are writable and belong
        # to this position alone.
        return proto.loads_oob(bytearray(memoryview(blob)[len(OOB_MAGIC) :]))
    return proto.loads(blob)


def error_blob(raw: tuple[int, bytes | bytearray] | None, exc: BaseException) -> bytes | bytearray:
    """What to store for a failure: the worker's encoding, or one made here."""
    if raw is not None and raw[0] == proto.ERROR:
        return raw[1]
    return encode_exception(exc)


def encode_exception(exc: BaseException) -> bytes:
    """``_protocol.dump_exception``'s form, made in the parent without tblib's
    ``copyreg`` registration (see the module docstring): the exception pickles
    without its frames (their text travels beside it)."""
    try:
        blob: bytes | None = proto.dumps(exc)
    except Exception:
        blob = None
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return pickle.dumps(
        (name, proto.safe_str(exc), proto.format_exception_text(exc), blob, None),
        protocol=proto.PICKLE_PROTOCOL,
    )


def chunk_item(value: Any, index: int) -> tuple[float | None, bool, Any]:
    """``(seconds, ok, value or encoded exception)`` of item ``index`` of a chunk's
    result, as ``_journal_chunk.run_chunk_timed`` shapes it."""
    values, errors = value
    seconds, item = values[index]
    if errors and index in errors:
        return seconds, False, errors[index]
    return seconds, True, item


def failure_entry(outcome: str, error: str, kills: int, size: int) -> dict[str, Any]:
    """One kill, for the ``failures`` column."""
    failure: dict[str, Any] = {"outcome": outcome, "error": error, "kills": kills, "at": time.time()}
    if size > 1:
        failure["chunk"] = size
    return failure
