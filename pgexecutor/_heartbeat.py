"""``heartbeat()``: a task's sign of life, and the page of shared memory it writes.

Each worker has one small page of shared memory (a memfd; Linux, workers started as
fresh interpreters, the default). The manager creates it with the worker and sends
its fd on the worker's fd channel (:meth:`BeatPage.create`); the worker takes the fd
before its first task (:func:`receive`) and maps the page on the first
``heartbeat()``, in whichever process calls first: a thread of the task shares the
mapping, a forked child inherits it (``MAP_SHARED`` stays shared across fork) or the
fd. A beat writes two numbers, with no syscall and no lock: the time
(``CLOCK_MONOTONIC``, which is the manager's ``time.monotonic()`` too), then the id
of the task running now. The manager reads them when its heartbeat detector looks
(``_supervision.Heartbeat``).

Layout: bytes 0-7 the time of the last beat (a double), 8-15 that task's id (uint64).
The time is written first: a reader that sees the new id sees the new time (x86-64
keeps stores in order; elsewhere, a beat read half-written counts as the previous
one, and the next look sees it whole).

Owners: in a worker, the task's processes and threads write the page; the worker's
main loop sets ``task_id``. In the parent, the manager thread reads (BeatPage).
This module imports nothing heavy: it runs in every worker.
"""

from __future__ import annotations

import os
import struct
import sys
import time as _time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SIZE = 16
_TIME = struct.Struct("d")
_ID = struct.Struct("Q")
_BEAT = struct.Struct("dQ")
_TAG = b"H"  # the datagram that carries the page's fd to the worker
_monotonic = _time.monotonic

_fd = -1  # the page's memfd in this worker (and its forked children); -1: none
_page: Any = None  # its mapping, made by the first heartbeat()
#: the id of the task this worker runs now (0 between tasks); set by _worker
task_id = 0


def heartbeat() -> None:
    """Tell the executor that the task calling it is alive.

    With ``heartbeat_timeout=H``, a task that called ``heartbeat()`` once must call
    it again within H seconds, or its worker's group is killed and it fails with
    :class:`~pgexecutor.TaskStalledError`; a task that never calls it is not
    affected. It works from any thread of the task and from processes it forked,
    costs well under a microsecond (no system call), and does nothing outside a
    task of a :class:`~pgexecutor.ProcessGroupExecutor` (or where heartbeats are
    not available: see the README).
    """
    page = _page
    if page is None:
        page = _map()
        if page is None:
            return
    _TIME.pack_into(page, 0, _monotonic())
    _ID.pack_into(page, 8, task_id)


def _map() -> Any:
    global _page, _fd
    if _fd < 0:
        return None
    import mmap  # here, not at the worker's start: 2 ms of import a task may not need

    try:
        _page = mmap.mmap(_fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        _fd = -1  # the task closed it, say: heartbeats are off for this worker
        return None
    return _page


def receive(sock: Any) -> None:
    """Worker side, before the first task: take the page's fd from the fd channel
    (``sock``, an ``_socket.socket``), if the manager sent one."""
    global _fd
    import _socket

    try:
        _, ancillary, _, _ = sock.recvmsg(
            1, _socket.CMSG_SPACE(4), _socket.MSG_DONTWAIT | _socket.MSG_CMSG_CLOEXEC
        )
    except OSError:
        return  # nothing sent: a manager that does not supervise heartbeats this way
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS and len(data) >= 4:
            _fd = int.from_bytes(data[:4], sys.byteorder)


class BeatPage:
    """The parent's side of one worker's page: made with the worker, read by the
    heartbeat detector, closed at the reap. Owner: the manager thread.

    The parent keeps a mapping of the page and no fd: ``mmap.mmap`` would hold a
    duplicate of the fd for as long as the mapping lives (before Python 3.13's
    ``trackfd=False``), one more fd per worker in a parent that may run short of them
    (see _process: fds per worker). So the page is mapped with libc's mmap directly
    and the fd closed at once; a mapping needs no fd once made (POSIX).
    """

    __slots__ = ("_view", "_addr")

    def __init__(self, view: Any, addr: int) -> None:
        self._view = view  # a ctypes char array over the mapping
        self._addr = addr

    @classmethod
    def create(cls, channel: Any) -> BeatPage | None:
        """A new page, its fd sent on ``channel`` (the worker's fd channel, a
        socket); None where there is no channel or no memfd (heartbeats are then
        not seen: documented)."""
        if channel is None or not hasattr(os, "memfd_create"):
            return None
        from ._protocol import send_fd

        fd = os.memfd_create("pgexecutor-heartbeat", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, SIZE)
            view, addr = _map_readonly(fd)
            try:
                send_fd(channel, _TAG, fd)
            except OSError:
                _unmap(addr)
                return None
        finally:
            os.close(fd)  # the worker has its own copy now; ours is the mapping
        return cls(view, addr)

    def last_beat(self) -> tuple[float, int]:
        """(time of the last beat, the id of the task that made it); (0.0, 0): none."""
        when, ident = _BEAT.unpack_from(self._view, 0)
        return when, ident

    def close(self) -> None:
        if self._addr:
            addr, self._addr = self._addr, 0
            self._view = None
            _unmap(addr)


_libc: Any = None


def _mmap_calls() -> Any:
    global _libc
    if _libc is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
        ]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    return _libc


def _map_readonly(fd: int) -> tuple[Any, int]:
    """Map SIZE bytes of ``fd`` shared and read-only: (a ctypes view, its address)."""
    import ctypes
    import mmap

    libc = _mmap_calls()
    addr = libc.mmap(None, SIZE, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:  # MAP_FAILED
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return (ctypes.c_char * SIZE).from_address(addr), addr


def _unmap(addr: int) -> None:
    _mmap_calls().munmap(addr, SIZE)
