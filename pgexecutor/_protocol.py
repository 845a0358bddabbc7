"""The wire protocol between the manager and a worker: framing and serialization.

Every message is one frame: a fixed header ``(kind, ident, size)`` followed by
``size`` bytes of payload. Frames let both sides read with plain ``os.read`` calls
into a buffer (the manager reads non-blocking and never waits for the rest of a
message, so a worker that dies mid-write, or whose forked children keep the pipe open,
can never block it).

Payloads are pickles. Tasks go through cloudpickle, so lambdas, closures and classes
defined in ``__main__`` travel by value. Results go through plain pickle first and
cloudpickle only when plain pickle refuses (see :func:`dumps_result`). A task's
exception is sent as its traceback text plus, when it pickles, the exception itself,
as pickle reduces it plus its traceback and chain (a private Pickler: see "task
exceptions" below; nothing is registered with the process-wide ``copyreg``); the text
is the fallback when the exception cannot be pickled in the worker or unpickled here.

When the arguments or the result themselves fail to cross (a "pickling fault"), the
exception that pickle raised is what the caller gets, as with ProcessPoolExecutor,
marked with the stage that failed (see :func:`mark_pickling_fault`).

Workers import this module before anything else, so it imports nothing it does not
need on every task: no ``pickle`` (it drags in ``re``), no cloudpickle, traceback
or ``typing`` until an error or a by-value object calls for them (tblib: only the
parent, to rebuild a traceback). Every
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

# fds a fresh worker finds its pipes at: tasks in, results out, stack dumps out,
# a unix socket that carries shared memory (memfds) for large results, and the
# permits it must take before it runs a task (see _process.permit_pipe).
CHILD_TASK_FD, CHILD_RESULT_FD, CHILD_DUMP_FD, CHILD_SHM_FD, CHILD_PERMIT_FD = 3, 4, 5, 6, 7

#: kind (1 byte), ident (task id, or pid for READY), payload size.
HEADER = struct.Struct("<BQQ")
HEADER_SIZE = HEADER.size

# Manager -> worker.
TASK = 1  #: payload: cloudpickled (fn, args, kwargs); ident: task id
EXIT = 2  #: no payload: finish and exit cleanly
INIT = 3  #: payload: a cloudpickled dict: sys_path, initializer (pickled apart), authkey
TASK_OOB = 4  #: TASK whose pickle has out-of-band buffers (see OOBPayload)
#: TASK_OOB whose buffers wait in the worker's argument arena (see _arena); payload:
#: the arena offset they start at, then the OOBPayload's head
TASK_SHM = 5

# Worker -> manager.
READY = 10  #: ident: the worker's pid; the initializer succeeded
INIT_FAILED = 11  #: payload: pickled (summary, traceback text)
RESULT = 12  #: payload: pickled result
ERROR = 13  #: payload: an encoded exception (see dump_exception)
RESULT_OOB = 14  #: RESULT whose pickle has out-of-band buffers (see OOBPayload)
RESULT_SHM = 15  #: RESULT_OOB whose buffers are in a memfd sent on the fd channel
#: ident: task id; payload: SECONDS its call took to unpickle (imports, not its run)
UNPICKLED = 16
SECONDS = struct.Struct("<d")
#: ident: the worker's pid; it begins the initializer now (initializer_timeout counts
#: from here, see Manager._on_init_timeout). Sent only when there is an initializer.
INIT_BEGUN = 17
#: ident: task id; no payload. The running TASK_SHM task kept a reference to its
#: arguments' memory in the argument arena: its region is never reused (see _arena).
#: Sent before the task's outcome.
RETAINED = 18
#: names of the frames a worker sends, for error messages
KIND_NAMES = {
    READY: "READY", INIT_FAILED: "INIT_FAILED", RESULT: "RESULT", ERROR: "ERROR",
    RESULT_OOB: "RESULT_OOB", RESULT_SHM: "RESULT_SHM", UNPICKLED: "UNPICKLED",
    INIT_BEGUN: "INIT_BEGUN", RETAINED: "RETAINED",
}
#: Unpickling a call slower than this (seconds: a first import of the task's module on
#: a fresh worker) is not the task's own time: the worker says UNPICKLED (see _worker).
SLOW_UNPICKLE = 0.01

PICKLE_PROTOCOL = 5

# Pickling faults: where a task's arguments or result failed to cross between
# processes. The value of ``pgexecutor_stage`` on the exception the caller gets.
PICKLE_ARGUMENTS = "pickle-arguments"  #: in the caller, in submit(); nothing was sent
UNPICKLE_ARGUMENTS = "unpickle-arguments"  #: in the worker; the task did not run
PICKLE_RESULT = "pickle-result"  #: in the worker; the task ran
UNPICKLE_RESULT = "unpickle-result"  #: in the parent; the task ran

#: Buffers at least this big (numpy arrays, say) travel out of band: written from
#: and read into their final memory, never copied into or out of a pickle.
OOB_MIN = 1 << 16
_OOB_ALIGN = 64  # out-of-band buffers start at multiples of this in the payload
_OOB_PREFIX = struct.Struct("<IQ")  # buffer count, pickle length; then "<Q" per buffer

#: Results whose out-of-band buffers are this big go through shared memory.
SHM_MIN = 1 << 20

#: Frames at least this big are read straight into a buffer of their own size.
_DIRECT_MIN = 1 << 16
_READ_CHUNK = 1 << 16  # one read for everything else


def frame(kind: int, ident: int = 0, payload: bytes = b"") -> bytes:
    """Return one whole frame. Small frames are cheaper joined than written twice."""
    return HEADER.pack(kind, ident, len(payload)) + payload


def frame_parts(kind: int, ident: int, payload: bytes) -> tuple[bytes, bytes]:
    """Return header and payload separately, for ``writev`` of large payloads."""
    return HEADER.pack(kind, ident, len(payload)), payload


class OOBPayload:
    """A pickle with its large buffers kept apart, as the parts of one frame payload.

    Layout: prefix (buffer count, pickle length, each buffer's length), the pickle,
    then each buffer at the next multiple of 64 bytes (so that arrays rebuilt on
    the reading side are aligned). ``parts`` are written with one ``writev``; the
    buffers are views of the caller's own memory, not copies.
    """

    __slots__ = ("head", "buffers", "parts", "size")

    def __init__(self, data: bytes, buffers: list[memoryview]) -> None:
        head = bytearray(_OOB_PREFIX.pack(len(buffers), len(data)))
        head += struct.pack(f"<{len(buffers)}Q", *(b.nbytes for b in buffers))
        head += data
        self.head = head
        self.buffers = buffers
        parts: list[bytes | bytearray | memoryview] = [head]
        offset = len(head)
        for view in buffers:
            pad = -offset % _OOB_ALIGN
            if pad:
                parts.append(bytes(pad))
            parts.append(view)
            offset += pad + view.nbytes
        self.parts = parts
        self.size = offset


def split_head(view: memoryview) -> tuple[tuple[int, ...], memoryview, int]:
    """(buffer lengths, the pickle, where the head ends) of an OOBPayload's head."""
    count, size = _OOB_PREFIX.unpack_from(view, 0)
    pos = _OOB_PREFIX.size
    lengths: tuple[int, ...] = struct.unpack_from(f"<{count}Q", view, pos)
    pos += 8 * count
    return lengths, view[pos : pos + size], pos + size


def split_oob(payload: bytes | bytearray) -> tuple[memoryview, list[memoryview]]:
    """An :class:`OOBPayload`'s pickle and its buffers, as views of ``payload``."""
    view = memoryview(payload)
    lengths, data, pos = split_head(view)
    buffers = []
    for n in lengths:
        pos += -pos % _OOB_ALIGN
        if pos + n > len(view):
            raise ValueError("an out-of-band buffer runs past the end of its frame")
        buffers.append(view[pos : pos + n])
        pos += n
    return data, buffers


def loads_oob(payload: bytes | bytearray) -> Any:
    """Unpickle an :class:`OOBPayload`; its buffers are views of ``payload``, not copies."""
    data, buffers = split_oob(payload)
    return _plain_loads(data, buffers=buffers)


_NEXT_BUFFER, _BYTEARRAY8, _FRAME = 0x97, 0x96, 0x95  # pickle protocol 5 opcodes


def standalone_pickle(data: bytes | bytearray | memoryview, buffers: list[memoryview]) -> bytes:
    """One pickle that ``pickle.loads`` reads alone: ``data`` with its out-of-band
    buffers put in band.

    Each NEXT_BUFFER becomes a BYTEARRAY8 with the buffer's bytes, which is what
    pickle itself writes for a buffer kept in band (a READONLY_BUFFER after it still
    applies). FRAME opcodes are dropped: their lengths would be wrong once data is
    inserted, and frames are optional to the unpickler. Parsed, never run: no code of
    the pickle runs here.
    """
    if not buffers:
        return bytes(data)
    import pickletools

    raw = bytes(data)
    out = bytearray()
    starts = [int(pos or 0) for _, _, pos in pickletools.genops(raw)]
    it = iter(buffers)
    for pos, end in zip(starts, [*starts[1:], len(raw)], strict=True):
        code = raw[pos]
        if code == _FRAME:
            continue
        if code == _NEXT_BUFFER:
            buf = next(it)
            out.append(_BYTEARRAY8)
            out += buf.nbytes.to_bytes(8, "little")
            out += buf
            continue
        out += raw[pos:end]
    return bytes(out)


def shm_offsets(lengths: list[int] | tuple[int, ...]) -> tuple[list[int], int]:
    """Where each buffer starts in the shared memory, and its total size."""
    offsets = []
    pos = 0
    for n in lengths:
        pos += -pos % _OOB_ALIGN
        offsets.append(pos)
        pos += n
    return offsets, pos


def put_in_shm(sock: Any, payload: OOBPayload) -> bytearray:
    """Worker side of RESULT_SHM: the buffers go to a new memfd, sent over ``sock``.

    Returns the frame payload, which is only the head (the buffers' lengths and the
    pickle). Why: through a pipe, every byte is copied twice and the parent pays
    for the second copy and for faulting in fresh memory to hold it, one manager
    thread for all workers. Here the worker pays for one copy and the parent only
    maps pages that already exist. The memfd travels before the frame, so it is
    waiting when the parent reads the frame, even if the worker died since.
    """
    offsets, total = shm_offsets([b.nbytes for b in payload.buffers])
    fd = os.memfd_create("pgexecutor-result", os.MFD_CLOEXEC)
    try:
        # pwrite, not a copy through a mapping: the kernel fills fresh pages without
        # a page fault each (measured twice as fast for 8 MiB).
        for offset, buf in zip(offsets, payload.buffers, strict=True):
            done = 0
            while done < buf.nbytes:
                done += os.pwrite(fd, buf[done:], offset + done)
        os.ftruncate(fd, total)
        send_fd(sock, b"F", fd)
    finally:
        os.close(fd)
    return payload.head


def send_fd(sock: Any, tag: bytes, fd: int) -> None:
    """Send ``fd`` (SCM_RIGHTS copies it) in a datagram ``tag`` on an fd channel."""
    from _socket import SCM_RIGHTS, SOL_SOCKET

    sock.sendmsg([tag], [(SOL_SOCKET, SCM_RIGHTS, struct.pack("i", fd))])


def recv_fd_datagram(sock: Any, flags: int = 0) -> tuple[bytes, list[int]]:
    """The next datagram on an fd channel: its tag and the fds that came with it
    (the caller owns them). Raises OSError (BlockingIOError: none there, with
    MSG_DONTWAIT in ``flags``)."""
    from _socket import CMSG_SPACE, SCM_RIGHTS, SOL_SOCKET

    msg, ancillary, _, _ = sock.recvmsg(1, CMSG_SPACE(struct.calcsize("i")), flags)
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return msg, fds


def take_fd(sock: Any) -> int:
    """Parent side: the next memfd on a worker's fd channel, or -1 if none is there."""
    try:
        _, fds = recv_fd_datagram(sock)
    except OSError:
        return -1
    for extra in fds[1:]:
        os.close(extra)
    return fds[0] if fds else -1


class ShmPayload:
    """A RESULT_SHM frame's head with the memfd that arrived for it."""

    __slots__ = ("head", "fd")

    def __init__(self, head: bytes | bytearray, fd: int) -> None:
        self.head = head
        self.fd = fd

    def split(self) -> tuple[memoryview, list[memoryview]]:
        """Map the memory: the pickle and its buffers (views of the mapping).

        Mapped, not populated (no MAP_POPULATE): a page table entry is made when the
        caller first touches a page, and a read fault maps 64 KiB around it (the
        kernel's fault-around), so reading a whole 8 MiB result costs less than
        populating it up front (measured 0.7 vs 0.8-1.0 ms) and the pages never read
        cost nothing. Populating was 1-3 ms per 8 MiB in the delivery thread, which
        shares the GIL (and here two cores) with the manager and the caller. (Writing
        every page of a result costs more this way: a write fault maps one page.)
        """
        import mmap

        if self.fd < 0:
            raise OSError("the result's shared memory never arrived")
        try:
            lengths, data, _ = split_head(memoryview(self.head))
            offsets, total = shm_offsets(lengths)
            mem = mmap.mmap(self.fd, total, flags=mmap.MAP_SHARED)
        finally:
            self.close()
        view = memoryview(mem)
        return data, [view[o : o + n] for o, n in zip(offsets, lengths, strict=True)]

    def load(self) -> Any:
        """Map the memory and unpickle; the arrays are views of the mapping."""
        data, buffers = self.split()
        return _plain_loads(data, buffers=buffers)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _dumps_with_buffers(dump: Any, obj: Any) -> bytes | OOBPayload:
    """Run ``dump(obj, buffer_callback=...)``, keeping large buffers out of band."""
    buffers: list[memoryview] = []

    def keep_large(buf: Any) -> bool:  # False: out of band
        view = buf.raw()
        if view.nbytes < OOB_MIN:
            return True
        buffers.append(view)
        return False

    data = dump(obj, keep_large)
    return OOBPayload(data, buffers) if buffers else data


#: Frames a worker sends that need no payload, or a fixed one: payload sizes.
_FIXED_SIZES = {READY: 0, UNPICKLED: SECONDS.size, INIT_BEGUN: 0, RETAINED: 0}
_INIT_FAILED_MAX = 1 << 26  # an initializer's error text (and its traceback)
_SHOWN = 32  # bytes of a bad frame quoted in its error


def worker_frame_limits() -> dict[int, tuple[int, int]]:
    """The frames a worker may send: kind -> (least, most) payload bytes.

    A result can be as large as the machine's memory, not larger: a bigger size can
    only be garbage (and allocating a buffer for it would fail, or swap).
    """
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no sysconf names
        ram = 1 << 40
    limits = {kind: (size, size) for kind, size in _FIXED_SIZES.items()}
    limits[INIT_FAILED] = (0, _INIT_FAILED_MAX)
    for kind in (RESULT, ERROR, RESULT_OOB, RESULT_SHM):
        limits[kind] = (1, max(ram, 1 << 30))
    return limits


def encode_init_failure(summary: str, text: str) -> bytes:
    """INIT_FAILED's payload: text, not a pickle, so that reading it runs no code."""
    return f"{summary}\0{text}".encode("utf-8", "replace")


def decode_init_failure(payload: bytes | bytearray) -> tuple[str, str]:
    summary, _, text = bytes(payload).decode("utf-8", "replace").partition("\0")
    return summary, text


class FrameReader:
    """Incremental frame parser for bytes arriving in arbitrary pieces.

    Small frames are cut out of a shared buffer. A large frame (a numpy array, say)
    gets a bytearray of its own, and the pipe is read straight into it: the
    unpickled array then lives in that very memory, with no copy in between.

    With ``limits`` (kind -> least and most payload bytes) it reads an untrusted
    stream (what a worker, and any task it runs, may write): the first header of an
    unknown kind or an impossible size stops it for good, with ``error`` saying what
    was read; the frames before it are returned as usual. Without, every header is
    believed (the worker reading the manager's frames).
    """

    __slots__ = (
        "_buf", "_big", "_big_view", "_big_got", "_big_kind", "_big_ident", "drained",
        "_limits", "error",
    )

    def __init__(self, limits: dict[int, tuple[int, int]] | None = None) -> None:
        self._buf = bytearray()
        self._big: bytearray | None = None
        self._big_view: memoryview | None = None
        self._big_got = 0
        self._big_kind = 0
        self._big_ident = 0
        self.drained = False  # the last read_from took less than it asked for
        self._limits = limits
        self.error: str | None = None  # the stream broke the protocol (see above)

    def read_from(self, fd: int) -> list[tuple[int, int, bytes | bytearray]] | None:
        """Read once from ``fd``; return the frames completed, or None at end of file.

        A non-blocking ``fd`` with nothing to read raises BlockingIOError. After an
        error, it reads nothing more and returns [].
        """
        if self.error is not None:
            return []
        view = self._big_view
        if view is not None:
            want = len(view) - self._big_got
            n = os.readv(fd, [view[self._big_got :]])
            if n == 0:
                return None
            self.drained = n < want
            self._big_got += n
            return self._finish_big() if n == want else []
        data = os.read(fd, _READ_CHUNK)
        if not data:
            return None
        self.drained = len(data) < _READ_CHUNK
        return self.feed(data)

    def feed(self, data: bytes) -> list[tuple[int, int, bytes | bytearray]]:
        """Add ``data`` and return every frame it completes, in order."""
        if self.error is not None:
            return []
        if self._big_view is not None:  # (read_from reads into it directly)
            return self._feed_big(data)
        buf = self._buf
        buf += data
        out: list[tuple[int, int, bytes | bytearray]] = []
        pos = 0
        n = len(buf)
        limits = self._limits
        with memoryview(buf) as mv:
            while n - pos >= HEADER_SIZE:
                kind, ident, size = HEADER.unpack_from(buf, pos)
                if limits is not None:
                    bounds = limits.get(kind)
                    if bounds is None or not bounds[0] <= size <= bounds[1]:
                        self._invalid(kind, size, mv[pos : pos + _SHOWN])
                        break
                end = pos + HEADER_SIZE + size
                if end > n:
                    break
                out.append((kind, ident, bytes(mv[pos + HEADER_SIZE : end])))
                pos = end
        if self.error is not None:
            buf.clear()
            return out
        if n - pos >= HEADER_SIZE:
            kind, ident, size = HEADER.unpack_from(buf, pos)
            if size >= _DIRECT_MIN:
                self._start_big(kind, ident, size, pos + HEADER_SIZE)
                return out
        if pos:
            del buf[:pos]
        return out

    def _invalid(self, kind: int, size: int, shown: memoryview) -> None:
        """A header broke the limits: say what was read in ``error``."""
        assert self._limits is not None
        if kind not in self._limits:
            what = f"a frame of unknown kind {kind}"
        else:
            what = f"a frame of kind {kind} with an impossible payload size of {size} bytes"
        self.error = f"protocol violation: {what}; read {bytes(shown)!r}"

    def _feed_big(self, data: bytes) -> list[tuple[int, int, bytes | bytearray]]:
        """``feed`` while a large frame is being filled: its bytes first."""
        assert self._big_view is not None
        room = len(self._big_view) - self._big_got
        take = min(room, len(data))
        self._big_view[self._big_got : self._big_got + take] = data[:take]
        self._big_got += take
        if take < room:
            return []
        out = self._finish_big()
        rest = data[take:]
        return out + self.feed(rest) if rest else out

    def _start_big(self, kind: int, ident: int, size: int, start: int) -> None:
        """Move the head frame's first bytes to a buffer of its own; read on into it."""
        big = bytearray(size)
        got = len(self._buf) - start
        with memoryview(self._buf) as mv:
            big[:got] = mv[start:]
        self._buf.clear()
        self._big, self._big_view, self._big_got = big, memoryview(big), got
        self._big_kind, self._big_ident = kind, ident

    def _finish_big(self) -> list[tuple[int, int, bytes | bytearray]]:
        big = self._big
        assert big is not None and self._big_view is not None
        self._big_view.release()
        self._big = self._big_view = None
        return [(self._big_kind, self._big_ident, big)]

    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buf) + (HEADER_SIZE + self._big_got if self._big is not None else 0)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write everything to a blocking fd (the worker's side of the pipe)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_parts(fd: int, parts: list[Any]) -> None:
    """Write several buffers to a blocking fd, with as few ``writev`` calls as it takes."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = os.writev(fd, views)
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


_cloudpickle: Any = None
_cloud_pickler: Any = None


def _cloudpickle_module() -> Any:
    global _cloudpickle
    if _cloudpickle is None:
        import cloudpickle

        _cloudpickle = cloudpickle
    return _cloudpickle


def _pickler_class() -> Any:
    """cloudpickle's Pickler, except that code pickled by value keeps its file name.

    cloudpickle >= 3.1 writes every by-value code object (functions and classes of
    ``__main__``, lambdas, closures) with ``co_filename = "<dynamic-code>"``, so that
    its pickles do not depend on where the code lives. Tracebacks and stack dumps
    print ``co_filename``: a task defined in a script then showed up as ``File
    "<dynamic-code>", line 42`` in its remote traceback and in a TaskTimeoutError's
    stack, with no source line, where ProcessPoolExecutor shows the script's path and
    line. Our pickles are never compared, so we put the real name back. Workers run on
    the same machine, where linecache finds the source under that name.

    Only this module's pickler is changed: cloudpickle as Dask, Ray or the user call it
    keeps its own behaviour.
    """
    global _cloud_pickler
    if _cloud_pickler is not None:
        return _cloud_pickler
    from collections import ChainMap

    cp = _cloudpickle_module()
    base = getattr(cp, "Pickler", None) or cp.CloudPickler
    code_type = type(_pickler_class.__code__)
    table: Any = getattr(base, "dispatch_table", None)
    reduce_code = None if table is None else table.get(code_type)
    if table is None or reduce_code is None:  # a cloudpickle we do not know: as it is
        _cloud_pickler = base
        return base

    def reduce_code_keeping_filename(code: Any) -> Any:
        reduced = reduce_code(code)
        args = reduced[1]
        # args are types.CodeType's, co_filename the 11th on every Python >= 3.8.
        if len(args) > 10 and args[10] == "<dynamic-code>" and isinstance(code.co_filename, str):
            reduced = (reduced[0], (*args[:10], code.co_filename, *args[11:]), *reduced[2:])
        return reduced

    # One ChainMap level more than cloudpickle's, not two: pickle looks this up per object.
    maps = table.maps if isinstance(table, ChainMap) else [table]

    class Pickler(base):  # type: ignore[misc, valid-type]
        dispatch_table = ChainMap({code_type: reduce_code_keeping_filename}, *maps)

    _cloud_pickler = Pickler
    return Pickler


def _cloud_dump(obj: Any, buffer_callback: Any = None) -> bytes:
    """``cloudpickle.dumps(obj)`` with protocol 5 and the Pickler of _pickler_class."""
    import io

    with io.BytesIO() as file:
        _pickler_class()(file, protocol=PICKLE_PROTOCOL, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


def dumps(obj: Any) -> bytes:
    """cloudpickle ``obj`` with protocol 5."""
    return _cloud_dump(obj)


def _plain_dump(obj: Any, buffer_callback: Any) -> bytes:
    return _plain_dumps(obj, PICKLE_PROTOCOL, buffer_callback=buffer_callback)  # type: ignore[no-any-return]


def dumps_task(obj: Any) -> bytes | OOBPayload:
    """Pickle a task's ``(fn, args, kwargs)`` as cloudpickle would; buffers out of band.

    Plain pickle first: it costs a quarter of cloudpickle per call, and submit() is
    on the caller's hot path. The two differ only where plain pickle saves a
    reference the worker cannot resolve. Plain pickle refuses what it cannot find
    (lambdas, local classes): cloudpickle then. What it finds only because it runs
    in this process is what cloudpickle saves by value: objects of ``__main__`` (a
    reference to which puts that name in the stream, so we look for it) and of
    modules registered with ``cloudpickle.register_pickle_by_value`` (cloudpickle
    whenever there are any).

    An out-of-band buffer is a view of the caller's own memory (a numpy array's data),
    read when the task is written to a worker, not when it is submitted: as with
    ProcessPoolExecutor, which pickles in a feeder thread, an argument changed after
    submit() may be seen changed.
    """
    if not _pickled_by_value_modules():
        try:
            out = _dumps_with_buffers(_plain_dump, obj)
        except Exception:
            pass
        else:
            data = out.head if isinstance(out, OOBPayload) else out
            if b"__main__" not in data:
                return out
    return _dumps_with_buffers(_cloud_dump, obj)


_by_value: Any = None  # cloudpickle's registry, looked up once (see below)


def _pickled_by_value_modules() -> Any:
    """cloudpickle's registry of modules pickled by value (a non-empty stand-in if
    a cloudpickle version keeps it elsewhere: then always cloudpickle).

    Looked up once: ``register_pickle_by_value`` adds to that very set (and
    ``unregister`` removes from it), so the reference stays current; this runs in
    every submit."""
    global _by_value
    if _by_value is None:
        inner = getattr(_cloudpickle_module(), "cloudpickle", None)
        _by_value = getattr(inner, "_PICKLE_BY_VALUE_MODULES", True)
    return _by_value


def dumps_result(obj: Any) -> bytes | OOBPayload:
    """Pickle a task's result in the worker: plain pickle, or cloudpickle if it refuses.

    Plain pickle costs a tenth of cloudpickle per call and no import at worker start.
    It is safe to try first because it never silently differs from cloudpickle: both
    save importable functions and classes by reference, and whatever cloudpickle would
    save by value (a lambda, a class a by-value task defined, anything from the
    worker's ``__main__``) plain pickle refuses, since it checks that the name it would
    save resolves to the very same object.
    """
    try:
        return _dumps_with_buffers(_plain_dump, obj)
    except Exception:
        pass
    # Outside the except clause: if cloudpickle fails too, its error must not carry
    # plain pickle's as __context__ (the caller would see the same failure twice).
    return _dumps_with_buffers(_cloud_dump, obj)


def loads(data: bytes | bytearray | memoryview, buffers: list[memoryview] | None = None) -> Any:
    """Unpickle (with out-of-band ``buffers``, if any); cloudpickle's output is a
    standard pickle stream."""
    if buffers is None:
        return _plain_loads(data)
    return _plain_loads(data, buffers=buffers)


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # a broken __str__ (even one that exits) must not hide the error
        return f"<{type(exc).__name__} with an unprintable message>"


def _qualified_name(cls: type) -> str:
    try:
        module = getattr(cls, "__module__", None)
        name = getattr(cls, "__qualname__", cls.__name__)
    except BaseException:  # a hostile metaclass
        return "<an exception class>"
    return name if module in (None, "builtins") else f"{module}.{name}"


def format_exception_text(exc: BaseException) -> str:
    """The traceback text, as ``traceback`` prints it, never raising (not even the
    SystemExit of a hostile ``__str__``: the worker must survive it)."""
    try:
        import traceback

        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        return f"{_qualified_name(type(exc))}: {safe_str(exc)}\n"


# ---------------------------------------------------------------- task exceptions
#
# A task's exception travels as pickle would send it, plus what pickle drops: its
# traceback, ``__cause__``, ``__context__`` and ``__suppress_context__``, at every
# level (the chain, the members of an exception group, exceptions in its args). This
# is done by a private Pickler (_exception_pickler) and never through ``copyreg``:
# copyreg is process-wide, so registering a reducer there (as tblib's
# ``pickling_support.install`` does) would change how the worker then pickles task
# *results* and, where the parent encodes (journals), how the user's own code
# pickles in the parent, for good.


#: Key set in the globals of every frame rebuilt from a worker's traceback (see
#: came_from_worker): a Ctrl-C raised in this process never runs in such a frame.
_WORKER_FRAME = "__pgexecutor_worker_frame__"

_exception_pickler_class: Any = None


def _exception_pickler() -> Any:
    """The Pickler that encodes a task's exception: _pickler_class's (cloudpickle: an
    exception class of ``__main__`` travels by value) plus tracebacks and chains.

    Exceptions go through ``reducer_override`` (pickle asks it before anything else,
    for every object but a few builtin types), tracebacks through this class's own
    ``dispatch_table``; the process-wide ``copyreg`` table is only read (a reducer
    the user registered there is honoured, as pickle honours it).
    """
    global _exception_pickler_class
    if _exception_pickler_class is not None:
        return _exception_pickler_class
    from collections import ChainMap
    from types import TracebackType

    base = _pickler_class()
    table: Any = getattr(base, "dispatch_table", None)
    if table is None:
        import copyreg

        table = copyreg.dispatch_table
    maps = table.maps if isinstance(table, ChainMap) else [table]
    base_override = getattr(base, "reducer_override", None)

    class ExceptionPickler(base):  # type: ignore[misc, valid-type]
        dispatch_table = ChainMap({TracebackType: _reduce_traceback}, *maps)
        chainless: Any = None  # the exception whose cause and context stay behind

        def reducer_override(self, obj: Any) -> Any:
            if issubclass(type(obj), BaseException):
                return _reduce_exception(self, obj)
            if base_override is None:
                return NotImplemented
            return base_override(self, obj)

    _exception_pickler_class = ExceptionPickler
    return ExceptionPickler


def _reduce_exception(pickler: Any, exc: BaseException) -> Any:
    """Reduce ``exc`` as pickle would (its dispatch_table entry, else its
    ``__reduce_ex__``), with what pickle drops added to the state.

    The extra state is set by a state setter, after pickle memoized the object, so
    chains that loop back (a context that refers to an outer exception) pickle as
    pickle pickles any cycle through ``__dict__``.
    """
    reduce = pickler.dispatch_table.get(type(exc))
    rv = reduce(exc) if reduce is not None else exc.__reduce_ex__(PICKLE_PROTOCOL)
    if isinstance(rv, str) or not isinstance(rv, tuple) or not 2 <= len(rv) <= 6:
        return NotImplemented  # a global, or something pickle will reject itself
    func, args, state, items, dict_items, setter = rv + (None,) * (6 - len(rv))
    top = exc is pickler.chainless
    extras = (
        exc.__traceback__,
        None if top else exc.__cause__,
        None if top else exc.__context__,
        exc.__suppress_context__,
    )
    return (
        _rebuild_exception, (func, args), (state, setter, extras), items, dict_items,
        _set_exception_state,
    )


def _rebuild_exception(func: Any, args: Any) -> Any:
    """Call what the exception's reduction named, as unpickling does.

    An exception class whose ``__init__`` does not take its own ``args`` back (a
    common mistake: ``super().__init__(message)`` after taking two parameters) pickles
    but does not unpickle. Rather than lose the exception, it is then made as
    ``BaseException`` makes it, without ``__init__``: its ``args`` and, from the state
    that follows, its ``__dict__``.
    """
    try:
        return func(*args)
    except Exception:
        if not (isinstance(func, type) and issubclass(func, BaseException)):
            raise
        try:
            return func.__new__(func, *args)
        except Exception:
            pass
        raise


def _set_exception_state(exc: BaseException, state: Any) -> None:
    """Apply the reduction's own state as pickle's BUILD would, then what pickle
    drops (see _reduce_exception)."""
    inner, setter, (tb, cause, context, suppress) = state
    if inner is not None:  # pickle applies no state (nor calls the setter) for None
        if setter is not None:
            setter(exc, inner)
        else:
            _build(exc, inner)
    _set(exc, "__traceback__", tb)
    _set(exc, "__cause__", cause)
    _set(exc, "__context__", context)
    _set(exc, "__suppress_context__", suppress)


def _build(obj: Any, state: Any) -> None:
    """What pickle's BUILD opcode does with ``state``."""
    setstate = getattr(obj, "__setstate__", None)
    if setstate is not None:
        setstate(state)
        return
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    if state:
        obj.__dict__.update(state)
    if slots:
        for name, value in slots.items():
            setattr(obj, name, value)


def _reduce_traceback(tb: Any) -> Any:
    """A traceback as a flat tuple of (file, function, line, module globals) entries.

    Flat, not nested: a RecursionError's thousand frames must not make pickle recurse
    a thousand levels (it would fail with a RecursionError of its own). No locals
    travel (they may not pickle, and may be large).
    """
    entries = []
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        lineno = tb.tb_lineno
        names = {
            k: v
            for k, v in frame.f_globals.items()
            if k in ("__name__", "__file__") and isinstance(v, str)
        }
        entries.append(
            (code.co_filename, code.co_name, lineno if isinstance(lineno, int) else 0, names)
        )
        tb = tb.tb_next
    return _rebuild_traceback, (tuple(entries),)


def _rebuild_traceback(entries: tuple[tuple[str, str, int, dict[str, str]], ...]) -> Any:
    """A real traceback object from _reduce_traceback's entries (tblib makes the
    frames: code named and placed like the worker's, raising at the worker's line), or
    None if it cannot be made here: the exception is worth more than its frames.

    Each frame's globals are marked (see came_from_worker) only once the whole chain
    exists: a Ctrl-C that lands while tblib runs its frames must stay a Ctrl-C.
    """
    if not entries:
        return None
    try:
        from types import SimpleNamespace as Attrs  # what tblib reads of tb, frame, code

        from tblib import Traceback

        chain = None
        for filename, name, lineno, names in reversed(entries):
            line = max(lineno, 1)
            code = Attrs(co_filename=filename, co_name=name)
            frame = Attrs(f_globals=names, f_code=code, f_lineno=line)
            chain = Attrs(tb_frame=frame, tb_lineno=line, tb_next=chain)
        tb = Traceback(chain).as_traceback()
    except Exception:
        return None
    node = tb
    while node is not None:
        node.tb_frame.f_globals[_WORKER_FRAME] = True
        node = node.tb_next
    return tb


def came_from_worker(exc: BaseException | None) -> bool:
    """Whether ``exc`` is an exception a task raised in a worker (decoded by
    load_exception, perhaps raised again here by ``Future.result()``), as opposed to
    one raised in this process: its traceback runs through a frame rebuilt from the
    worker's. How a ``with`` block tells a task's KeyboardInterrupt from the user's
    Ctrl-C, which only ever interrupts frames of this process.
    """
    tb = getattr(exc, "__traceback__", None)
    while tb is not None:
        try:
            if tb.tb_frame.f_globals.get(_WORKER_FRAME) is True:
                return True
        except Exception:
            return False
        tb = tb.tb_next
    return False


def _pickle_exception(exc: BaseException, keep_chain: bool) -> bytes | None:
    """``exc`` through the exception Pickler; None if anything in it fails to pickle
    (a hostile ``__reduce__`` that exits included: this runs in the worker's loop)."""
    import io

    try:
        with io.BytesIO() as file:
            pickler = _exception_pickler()(file, protocol=PICKLE_PROTOCOL)
            if not keep_chain:
                pickler.chainless = exc
            pickler.dump(exc)
            return file.getvalue()
    except BaseException:
        return None


def dump_exception(exc: BaseException, stage: str | None = None) -> bytes:
    """Encode a task's exception (in the worker; in the parent for a journal).

    The exception is pickled as pickle would pickle it, plus its traceback and chain at
    every level (see _reduce_exception), so that the caller gets the attributes pickle
    keeps and ``traceback.format_exception`` shows the task's own lines. If that fails,
    it goes without its chain (which its traceback text shows anyway); if that fails
    too, only the text travels and the caller gets a RemoteTaskError.

    ``stage`` marks a pickling fault (UNPICKLE_ARGUMENTS or PICKLE_RESULT): the
    exception pickle raised goes without its chain, as with ProcessPoolExecutor, whose
    text is chained as ``__cause__`` (see load_exception).

    Never raises, whatever the exception's class does: the worker sends this and
    carries on with its next task.
    """
    text = format_exception_text(exc)
    blob = None if stage is not None else _pickle_exception(exc, keep_chain=True)
    if blob is None:
        blob = _pickle_exception(exc, keep_chain=False)
    return _plain_dumps(
        (_qualified_name(type(exc)), safe_str(exc), text, blob, stage), PICKLE_PROTOCOL
    )


def load_exception(payload: bytes | bytearray) -> BaseException:
    """Decode what :func:`dump_exception` made.

    Falls back to a RemoteTaskError (TaskPicklingError for a pickling fault) when the
    exception does not unpickle here. Runs in the manager thread, which must survive
    whatever a hostile class does while it is rebuilt, SystemExit included.
    """
    from .errors import RemoteTaskError, TaskPicklingError

    type_name, message, text, blob, stage = _plain_loads(payload)
    problem = None
    if blob is not None:
        try:
            exc = _plain_loads(blob)
        except BaseException as err:
            _reraise_interrupt(err)
            problem = f"{_qualified_name(type(err))}: {safe_str(err)}"
        else:
            if isinstance(exc, BaseException):
                if stage is not None:
                    _chain_remote_traceback(exc, text)
                    mark_pickling_fault(exc, stage)
                elif exc.__cause__ is None:
                    # As ProcessPoolExecutor: the worker's traceback text as the cause
                    # (code reads ``exc.__cause__.tb``). A cause the task itself set
                    # (``raise ... from``) stays: the text holds it anyway.
                    _chain_remote_traceback(exc, text)
                return exc
    fallback: RemoteTaskError
    if stage is None:
        fallback = RemoteTaskError(type_name, message, text)
    else:
        fallback = TaskPicklingError(stage, type_name, message, text)
    if problem is not None:
        fallback.unpickling_error = problem  # type: ignore[attr-defined]
    return fallback


def _reraise_interrupt(err: BaseException) -> None:
    """Re-raise a KeyboardInterrupt that may be the user's Ctrl-C (main thread only)."""
    if isinstance(err, KeyboardInterrupt):
        import threading

        if threading.current_thread() is threading.main_thread():
            raise err


def _chain_remote_traceback(exc: BaseException, text: str) -> None:
    """Chain the worker's traceback text as ``exc.__cause__``, as ProcessPoolExecutor
    does: ``traceback.print_exception`` then shows it above the exception. Setting a
    cause sets ``__suppress_context__``; the task's own value is put back."""
    from concurrent.futures.process import _RemoteTraceback

    suppress = exc.__suppress_context__
    # (typeshed says it takes a traceback object: CPython passes the text, as here)
    _set(exc, "__cause__", _RemoteTraceback(f'\n"""\n{text}"""'))  # type: ignore[arg-type]
    _set(exc, "__suppress_context__", suppress)


def mark_pickling_fault(exc: BaseException, stage: str) -> BaseException:
    """Say on ``exc`` itself which crossing failed, and return it.

    The caller gets pickle's own exception (the type ProcessPoolExecutor gives, so
    ``except pickle.PicklingError`` and friends keep working); ``exc.pgexecutor_stage``
    (one of PICKLE_ARGUMENTS, UNPICKLE_ARGUMENTS, PICKLE_RESULT, UNPICKLE_RESULT) and a
    PEP 678 note say where it happened, which the exception alone would not.
    Marking twice adds one note.
    """
    from .errors import PICKLING_STAGES

    note = f"pgexecutor: {PICKLING_STAGES[stage]}"
    _set(exc, "pgexecutor_stage", stage)
    try:
        notes = getattr(exc, "__notes__", None)
    except Exception:
        return exc
    # What add_note does (3.11+), but also on 3.10, where tracebacks do not print notes.
    if notes is None:
        _set(exc, "__notes__", [note])
    elif isinstance(notes, list) and note not in notes:
        notes.append(note)
    return exc


def _set(exc: BaseException, name: str, value: Any) -> None:
    """Set an attribute that is our bookkeeping, not the exception's own state, even on
    a class whose ``__setattr__`` refuses (a frozen dataclass, say)."""
    try:
        object.__setattr__(exc, name, value)
    except Exception:
        pass
