"""A worker's argument arena: reused shared memory that carries large task arguments.

Why: a task's large out-of-band buffers (numpy arrays, see _protocol.OOBPayload) used
to cross the task pipe, which costs the manager thread and the worker a copy each,
in 1 MiB pieces with a wake-up for each, and the worker fresh memory to read into.
A *new* memfd per task is no better: fresh shared memory costs a page allocation per
4 KiB (measured here ~0.5 ms per MiB, as much as the pipe). So each worker gets one
memfd, made when it first needs one and then kept, mapped once on both sides: its
pages, once allocated, serve every later task. A task's arguments cost one copy, in
the manager thread (into its mapping, ~0.04 ms per MiB), and the task gets views of
the worker's mapping: no copy in the worker.

Who may touch which bytes when (the whole protocol; the parent's side is
:class:`ArgArena`, owned by the manager thread; the worker's is :class:`ArenaReader`,
owned by the worker's main loop):

* The parent places a task's buffers in a free *region* of the arena when it queues
  the task on a worker (``WorkerHandle.queue_task``), and writes a TASK_SHM frame
  that says where. The region belongs to that queued task from then on.
* The worker touches a region only for a task it runs (after it claimed the task's
  permit): the task's arguments are views of it, writable (as the pipe's bytearray
  was; a task changing its own arguments changes only its own region).
* When the task is over, its outcome encoded (large results already copied out to
  their own memfd, small ones joined into bytes), the worker releases the views. If
  it cannot (the task kept an argument somewhere, or an exception that refers to
  one outlives the task), or the task forked while it held them (the child shares
  the pages, MAP_SHARED, and may outlive the task), it says RETAINED before the
  outcome: that region stays the worker's for good, and the parent never writes it
  again.
* Otherwise a region is free again once its task left the worker's ``inflight``:
  its outcome arrived (sent after the views were released), or it was taken back
  (its permit was never claimed, so the worker skips it without touching it), or
  the worker is being killed or died (no task is queued on it again). So liveness
  is read from ``inflight`` itself at each placement: nothing else has to remember
  to free a region. A taken-back frame stays in the pipe: each TASK_SHM frame has a
  permit of its own (see ArgArena.put), so that the worker skips it even when the
  same task is queued on it again, in another region.
* The arena grows (``ftruncate`` and ``mremap`` of the parent's mapping, up to
  ARENA_MAX) and never shrinks: every region a worker maps lies inside the file, so
  no access faults with SIGBUS. The worker maps the whole file again when a region
  lies past its mapping.
* The memfd reaches the worker once, on its fd channel (a datagram tagged ``A``),
  before the first TASK_SHM frame is queued, and only once the worker said READY:
  by then it has taken the heartbeat page's datagram (sent before INIT), so the two
  are never mistaken for each other.
* A worker killed mid-task leaves nothing behind: its mapping dies with it, and the
  parent never reads from the arena. The parent's mapping (and its fd) is closed at
  the worker's reap.

Memory: the parent's mapping keeps one fd per worker that had large arguments. The
pages a worker touched stay mapped in it and count in its memory (PSS: half, being
shared with the parent) up to RESIDENT_MAX; past that, a finished task's region is
unmapped again (the file keeps it).

Tasks whose buffers do not fit (over TASK_MAX, no room below ARENA_MAX, or no fd
channel: workers started through a multiprocessing context) take the pipe as before
(TASK_OOB).
"""

from __future__ import annotations

import mmap
import os
import struct
import sys

from . import _protocol as proto

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

#: The datagram that carries the arena's memfd to the worker.
TAG = b"A"
#: TASK_SHM's payload starts with its permit and the region's offset in the arena.
START = struct.Struct("<QQ")
#: Permits of TASK_SHM frames have this bit set: no task id has it (see ArgArena.put).
_FRAME_PERMIT = 1 << 63
#: A task's buffers larger than this take the pipe: the manager thread copies a
#: task's buffers in one go, holding the GIL (~0.05-0.2 ms per MiB, more while the
#: pages are new), and a larger copy would delay every deadline it watches; the
#: pipe takes a large payload a piece at a time between its other work.
TASK_MAX = 64 << 20
#: An arena grows to at most this; a task that finds no room takes the pipe.
ARENA_MAX = 128 << 20
#: A worker unmaps a finished task's region (the file keeps it) once its arena is
#: larger than this: what stays mapped counts in its memory (PSS, half: shared).
RESIDENT_MAX = 64 << 20
_ALIGN = 64  # regions start at multiples of this (as buffers do in an OOBPayload)
_MAP_POPULATE = 0x8000  # Linux's MAP_POPULATE: map every page now, not one fault each


_KEPT = -1  # owns the regions of tasks that kept their arguments (RETAINED); no id()


class ArgArena:
    """The parent's side of one worker's arena (see the module docstring).

    Owner: the manager thread. ``regions`` lists (``id()`` of the queued task it
    belongs to, start, end) in the order they were placed: an id, not the task, so
    that a finished task (its future, its result) is not kept alive by its region
    until the next placement. While the task is queued on the worker it lives, so no
    other object has its id; a region whose id is reused later by a new task only
    looks in use a while longer.
    """

    __slots__ = ("_map", "regions", "_frames")

    def __init__(self, mapping: mmap.mmap) -> None:
        self._map = mapping
        self.regions: list[tuple[int, int, int]] = []
        self._frames = 0  # TASK_SHM frames made: each one's permit is its own

    @classmethod
    def open(cls, channel: Any, size: int) -> ArgArena | None:
        """A new arena of ``size`` bytes, its memfd sent to the worker on ``channel``;
        None if any step fails (the tasks then take the pipe)."""
        try:
            fd = os.memfd_create("pgexecutor-args", os.MFD_CLOEXEC)
        except OSError:
            return None
        mapping = None
        try:
            os.ftruncate(fd, size)
            # (The mapping keeps a duplicate of the fd: ours is closed below.)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
            proto.send_fd(channel, TAG, fd)
        except (OSError, ValueError):
            if mapping is not None:
                mapping.close()
            return None
        finally:
            os.close(fd)
        return cls(mapping)

    @property
    def size(self) -> int:
        return len(self._map)

    def put(
        self, owner: object, payload: proto.OOBPayload, live: Iterable[object]
    ) -> tuple[bytes, bytes] | None:
        """Copy ``payload``'s buffers into a free region that ``owner`` (a queued
        task, one of ``live`` while its region is in use) holds from now on; return
        (the task's permit, TASK_SHM's payload), or None if no region can be had.

        The permit is this frame's own, not the task id (as other frames' permits
        are): a task taken back and queued on the same worker again has two frames
        with its id in the pipe, and a permit by id would let the worker run the
        first, stale one, whose region was freed at the take-back (and may hold
        another task's arguments by then). A stale plain frame is harmless: it holds
        the same bytes.
        """
        self._forget_freed(live)
        offsets, total = proto.shm_offsets([b.nbytes for b in payload.buffers])
        start = self._place(total) if total <= TASK_MAX else -1
        if start < 0:
            return None
        mapping = self._map
        for offset, buf in zip(offsets, payload.buffers, strict=True):
            mapping.seek(start + offset)
            mapping.write(buf)  # a memcpy; no view of the mapping outlives it
        self.regions.append((id(owner), start, start + total))
        self._frames += 1
        permit = _FRAME_PERMIT | self._frames
        return permit.to_bytes(8, "little"), START.pack(permit, start) + bytes(payload.head)

    def retain(self, owner: object) -> bool:
        """The worker kept ``owner``'s arguments (RETAINED): its region is never
        freed. False if ``owner`` holds no region."""
        kept = False
        for i, (ident, start, end) in enumerate(self.regions):
            if ident == id(owner):  # (every region it may hold: see put)
                self.regions[i] = (_KEPT, start, end)
                kept = True
        return kept

    def _forget_freed(self, live: Iterable[object]) -> None:
        """Drop the regions whose tasks are no longer queued on the worker."""
        if self.regions:
            keep = {id(item) for item in live}
            keep.add(_KEPT)
            self.regions = [r for r in self.regions if r[0] in keep]

    def _place(self, n: int) -> int:
        """Where a region of ``n`` bytes starts: the first gap among the regions in
        use that holds it, else past them all (growing the arena); -1 if the arena
        would grow past ARENA_MAX or cannot grow."""
        pos = 0
        for _, start, end in sorted(self.regions, key=lambda r: r[1]):
            if start - pos >= n:
                return pos
            pos = max(pos, end + (-end % _ALIGN))
        if pos + n > len(self._map):
            want = pos + n
            if want > ARENA_MAX:
                return -1
            grown = min(ARENA_MAX, max(want, len(self._map) * 3 // 2))
            try:
                self._map.resize(grown)  # ftruncate + mremap: the contents stay
            except (OSError, ValueError, BufferError):
                return -1
        return pos

    def close(self) -> None:
        self.regions = []
        self._map.close()


class ArenaReader:
    """The worker's side: maps the arena (its fd taken from the fd channel when the
    first TASK_SHM frame needs it) and hands a task views of its region; after the
    task, tells whether the task let go of them (see the module docstring).

    One task at a time: ``_current`` is the region of the task that runs now.
    """

    __slots__ = ("_sock", "_fd", "_map", "_view", "_current", "_slices", "_forked", "__weakref__")

    def __init__(self, sock: Any) -> None:
        self._sock = sock  # the worker's end of its fd channel (an _socket.socket)
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None  # of _map
        self._current = (0, 0)
        self._slices: list[memoryview] = []  # the running task's, under its buffers
        # A task that forks while it holds its arguments: the child shares the
        # arena's pages (MAP_SHARED), not a copy-on-write snapshot as with the pipe's
        # private memory, and may outlive the task still reading or writing them.
        # Such a region is kept for good (RETAINED), as if the task had kept it.
        self._forked = False
        import weakref

        ref = weakref.ref(self)
        os.register_at_fork(before=lambda: _note_fork(ref))

    @staticmethod
    def permit(payload: bytes | bytearray) -> int:
        """The permit a TASK_SHM frame runs with (see ArgArena.put)."""
        return START.unpack_from(payload, 0)[0]  # type: ignore[no-any-return]

    def take(self, payload: bytes | bytearray) -> tuple[memoryview, list[Any]]:
        """A TASK_SHM's pickle and its buffers: writable views of the arena (as the
        pipe's bytearray was writable), no copy.

        Each buffer is a PickleBuffer over a slice of the mapping: whatever a task
        makes of it (a numpy array, a memoryview of a memoryview of it) holds either
        the PickleBuffer or an export of that slice, never an unaccounted view of
        the mapping's own buffer, so :meth:`finish` can tell whether the task let
        go (a memoryview made from a memoryview shares its source's buffer and
        counts as no export of it: plain slices handed out could escape).
        """
        from _pickle import PickleBuffer

        _, start = START.unpack_from(payload, 0)
        lengths, data, _ = proto.split_head(memoryview(payload)[START.size :])
        offsets, total = proto.shm_offsets(lengths)
        end = start + total
        if self._fd < 0:
            self._fd = self._receive()
        view = self._view
        if view is None or len(view) < end:
            view = self._remap(end)
        self._current = (start, end)
        self._slices = [view[start + o : start + o + n] for o, n in zip(offsets, lengths, strict=True)]
        return data, [PickleBuffer(s) for s in self._slices]

    def finish(self, buffers: list[Any]) -> bool:
        """After the task (its outcome encoded, nothing of it left but ``buffers``):
        release its views of the arena; False if the task kept one (a reference to
        a buffer, or an array made from one), so that its region must never be
        written again.

        A reference cycle (an exception kept in a frame it was raised through) can
        hold a buffer until the garbage collector runs: it is run once before a
        region is given up for good.
        """
        if self._forked:
            self._forked = False
            self._slices = []
            return False
        if not _release_all(buffers, self._slices):
            import gc

            gc.collect()
            if not _release_all(buffers, self._slices):
                self._slices = []
                return False
        self._slices = []
        self._drop_pages()
        return True

    def _drop_pages(self) -> None:
        """Unmap the finished region's pages from this process if the arena is large
        (the file keeps them), so that an arena of many regions does not stay counted
        in this worker's memory (PSS, see ``max_memory``) between tasks."""
        mapping = self._map
        if mapping is None or len(mapping) <= RESIDENT_MAX:
            return
        start, end = self._current
        page = mmap.PAGESIZE
        first = start - start % page
        last = min(len(mapping), end + (-end % page))
        if last > first:
            try:
                mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
            except (OSError, ValueError):
                pass

    def _remap(self, end: int) -> memoryview:
        """Map the whole arena anew: the parent grew it past our mapping. The old
        mapping lives on as long as a view a task kept of it."""
        size = os.fstat(self._fd).st_size
        if size < end:
            raise OSError(f"the argument arena holds {size} bytes, a task's arguments end at {end}")
        # Shared and writable: a task may change its own arguments in place (as with
        # the pipe's bytearray); its region is its own and the parent never reads it.
        mapping = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED)
        self._map, self._view = mapping, memoryview(mapping)
        return self._view

    def _receive(self) -> int:
        """The arena's fd: the next datagram on the channel (the parent sent it
        before the frame that asks for it)."""
        import _socket

        try:
            msg, fds = proto.recv_fd_datagram(
                self._sock, _socket.MSG_DONTWAIT | _socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            raise OSError("the argument arena's memfd never arrived") from None
        if msg != TAG or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(f"expected the argument arena's memfd, got {msg!r} with {len(fds)} fds")
        return fds[0]


def _note_fork(ref: Any) -> None:
    """At a fork in the worker (os.fork, multiprocessing's fork): if a task holds
    arguments in the arena now, its region must never be reused (see ArenaReader)."""
    reader = ref()
    if reader is not None and reader._slices:
        reader._forked = True


def _release_all(buffers: list[Any], slices: list[memoryview]) -> bool:
    """Release a task's buffers (PickleBuffers) and the slices of the mapping under
    them if nothing else holds them; True if that was all of them. Held: anything
    but these lists refers to one, or an object made from one (a numpy array, a
    memoryview) still has a slice's buffer (then release() refuses). Called again
    after a garbage collection, it picks up where it stopped."""
    for i in range(len(buffers)):
        # getrefcount sees the list's slot and its own argument.
        if sys.getrefcount(buffers[i]) > 2:
            return False
    for buf in buffers:
        buf.release()  # nothing holds it: its export of the slice goes
    free = True
    for i in range(len(slices)):
        if sys.getrefcount(slices[i]) > 2:
            free = False
            continue
        try:
            slices[i].release()
        except BufferError:
            free = False
    return free
