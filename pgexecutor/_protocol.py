"""The wire protocol between the manager and a worker: framing and serialization.

Every message is one frame: a fixed header ``(kind, ident, size)`` followed by
``size`` bytes of payload. Frames let both sides read with plain ``os.read`` calls
into a buffer (the manager reads non-blocking and never waits for the rest of a
message, so a worker that dies mid-write, or whose forked children keep the pipe open,
can never block it).

Payloads are pickles. Tasks go through cloudpickle, so lambdas, closures and classes
defined in ``__main__`` travel by value. Results go through plain pickle first and
cloudpickle only when plain pickle refuses (see :func:`dumps_result`). A task's
exception is sent as its traceback text plus, when it pickles, the exception itself
with its traceback made picklable by tblib; the text is the fallback when the
exception cannot be pickled in the worker or unpickled here.

Workers import this module before anything else, so it imports nothing it does not
need on every task: no ``pickle`` (it drags in ``re``), no cloudpickle, tblib,
traceback or ``typing`` until an error or a by-value object calls for them. Every
import here is paid again by each worker at startup.
"""

from __future__ import annotations

import os
import struct

try:  # the C accelerator alone: the ``pickle`` module would import ``re`` & co.
    from _pickle import dumps as _plain_dumps
    from _pickle import loads as _plain_loads
except ImportError:  # pragma: no cover - an interpreter without _pickle
    from pickle import dumps as _plain_dumps
    from pickle import loads as _plain_loads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .errors import TaskPicklingError

# fds a fresh worker finds its pipes at: tasks in, results out, stack dumps out.
CHILD_TASK_FD, CHILD_RESULT_FD, CHILD_DUMP_FD = 3, 4, 5

#: kind (1 byte), ident (task id, or pid for READY), payload size.
HEADER = struct.Struct("<BQQ")
HEADER_SIZE = HEADER.size

# Manager -> worker.
TASK = 1  #: payload: cloudpickled (fn, args, kwargs); ident: task id
EXIT = 2  #: no payload: finish and exit cleanly
INIT = 3  #: payload: cloudpickled WorkerConfig

# Worker -> manager.
READY = 10  #: ident: the worker's pid; the initializer succeeded
INIT_FAILED = 11  #: payload: pickled (summary, traceback text)
RESULT = 12  #: payload: cloudpickled result
ERROR = 13  #: payload: an encoded exception (see dump_exception)

PICKLE_PROTOCOL = 5


def frame(kind: int, ident: int = 0, payload: bytes = b"") -> bytes:
    """Return one whole frame. Small frames are cheaper joined than written twice."""
    return HEADER.pack(kind, ident, len(payload)) + payload


def frame_parts(kind: int, ident: int, payload: bytes) -> tuple[bytes, bytes]:
    """Return header and payload separately, for ``writev`` of large payloads."""
    return HEADER.pack(kind, ident, len(payload)), payload


class FrameReader:
    """Incremental frame parser for bytes arriving in arbitrary pieces."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def needed(self) -> int:
        """Bytes still missing to complete the frame at the head of the buffer."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return HEADER_SIZE - len(buf)
        _, _, size = HEADER.unpack_from(buf, 0)
        return HEADER_SIZE + size - len(buf)

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Add ``data`` and return every frame it completes, in order."""
        buf = self._buf
        buf += data
        out: list[tuple[int, int, bytes]] = []
        pos = 0
        n = len(buf)
        while n - pos >= HEADER_SIZE:
            kind, ident, size = HEADER.unpack_from(buf, pos)
            end = pos + HEADER_SIZE + size
            if end > n:
                break
            out.append((kind, ident, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buf)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write everything to a blocking fd (the worker's side of the pipe)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_exact(fd: int, size: int) -> bytes | None:
    """Read exactly ``size`` bytes from a blocking fd; ``None`` at end of file."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            return None
        got += n
    return bytes(buf)


_cloudpickle: Any = None


def _cloudpickle_module() -> Any:
    global _cloudpickle
    if _cloudpickle is None:
        import cloudpickle

        _cloudpickle = cloudpickle
    return _cloudpickle


def dumps(obj: Any) -> bytes:
    """cloudpickle ``obj`` with protocol 5."""
    return _cloudpickle_module().dumps(obj, protocol=PICKLE_PROTOCOL)


def dumps_result(obj: Any) -> bytes:
    """Pickle a task's result in the worker: plain pickle, or cloudpickle if it refuses.

    Plain pickle costs a tenth of cloudpickle per call and no import at worker start.
    It is safe to try first because it never silently differs from cloudpickle: both
    save importable functions and classes by reference, and whatever cloudpickle would
    save by value (a lambda, a class a by-value task defined, anything from the
    worker's ``__main__``) plain pickle refuses, since it checks that the name it would
    save resolves to the very same object.
    """
    try:
        return _plain_dumps(obj, PICKLE_PROTOCOL)
    except Exception:
        return dumps(obj)


def loads(data: bytes) -> Any:
    """Unpickle; cloudpickle's output is a standard pickle stream."""
    return _plain_loads(data)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not hide the real error
        return f"<{type(exc).__name__} with an unprintable message>"


def _qualified_name(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if module in (None, "builtins") else f"{module}.{name}"


def format_exception_text(exc: BaseException) -> str:
    """The traceback text, as ``traceback`` prints it, never raising."""
    try:
        import traceback

        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        return f"{_qualified_name(type(exc))}: {_safe_str(exc)}\n"


def dump_exception(exc: BaseException) -> bytes:
    """Encode a task's exception in the worker.

    The exception is pickled with its traceback (tblib turns the frames into plain
    data), so the caller's ``traceback.format_exception`` shows the task's own lines.
    If that fails, only the text travels and the caller gets a RemoteTaskError.
    """
    text = format_exception_text(exc)
    blob: bytes | None
    try:
        from tblib import pickling_support

        pickling_support.install(exc)
        blob = dumps(exc)
    except Exception:
        blob = None
    return _plain_dumps((_qualified_name(type(exc)), _safe_str(exc), text, blob), PICKLE_PROTOCOL)


def load_exception(payload: bytes) -> BaseException:
    """Decode what :func:`dump_exception` made, falling back to a RemoteTaskError."""
    from .errors import RemoteTaskError

    type_name, message, text, blob = _plain_loads(payload)
    if blob is not None:
        try:
            exc = _plain_loads(blob)
        except Exception as err:
            fallback = RemoteTaskError(type_name, message, text)
            fallback.__cause__ = None
            fallback.unpickling_error = f"{type(err).__name__}: {_safe_str(err)}"  # type: ignore[attr-defined]
            return fallback
        if isinstance(exc, BaseException):
            return exc
    return RemoteTaskError(type_name, message, text)


def pickling_error(stage: str, where: str, err: BaseException) -> TaskPicklingError:
    """A TaskPicklingError that says what failed, where, and why."""
    from .errors import TaskPicklingError

    return TaskPicklingError(stage, f"{where}: {_qualified_name(type(err))}: {_safe_str(err)}")
