"""Large task arguments through each worker's argument arena (pgexecutor/_arena.py).

What must hold: large arguments reach the task intact, writable, as views of the
arena (no pipe, no copy in the worker); a region is written again only when its task
is done with it: not while the task runs or waits, not when the task kept its
arguments (RETAINED), not for a task taken back or retried elsewhere; a worker that
dies leaves nothing behind (fds, wrong data); starts through a multiprocessing
context keep the pipe.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import mmap
import os
import socket
import time
from collections.abc import Iterator

import pytest
from _oob_blob import Blob

from pgexecutor import ProcessGroupExecutor, WorkerCrashedError, _arena
from pgexecutor import _protocol as proto

T = 60
MIB = 1 << 20


def blob(n: int, seed: int) -> Blob:
    return Blob(bytearray(pattern(n, seed)))


def pattern(n: int, seed: int) -> bytes:
    unit = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (unit * (n // 4096 + 1))[:n]


def digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ tasks


def where(b: Blob) -> tuple[str, bool, str]:
    """What holds the argument's memory here (an mmap: the arena; a bytearray: the
    pipe's frame), whether it is writable, its digest."""
    view = memoryview(b.data)
    holder = view.obj
    while isinstance(holder, memoryview):
        holder = holder.obj
    return type(holder).__name__, not view.readonly, digest(view)


def echo(b: Blob) -> Blob:
    return b


def check(b: Blob) -> str:
    return digest(b.data)


def slow_check(b: Blob, delay: float) -> tuple[int, str]:
    time.sleep(delay)
    return os.getpid(), digest(b.data)


_KEPT: list[Blob] = []


def keep(b: Blob) -> str:
    """Keep the argument past the task (a cache, a log): its memory must stay intact."""
    _KEPT.append(b)
    return digest(b.data)


def kept_digests() -> list[str]:
    return [digest(b.data) for b in _KEPT]


def crash_once(b: Blob, marker: str) -> str:
    """Kill the worker the first time (mid-task, its arguments mapped); then check."""
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os.kill(os.getpid(), 9)
    return digest(b.data)


def fork_reader(b: Blob, gate: str, out: str) -> str:
    """Fork a child that reads the argument only after the task returned (once the
    test opens ``gate``) and writes its digest to ``out``."""
    pid = os.fork()
    if pid == 0:  # the child: the worker's own fork, in the worker's group
        code = 1
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
            with open(out + ".tmp", "w") as f:
                f.write(digest(b.data))
            os.rename(out + ".tmp", out)
            code = 0
        finally:
            os._exit(code)
    return digest(b.data)


def sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def arena_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "pgexecutor-args" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


needs_memfd = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd on this platform")


# ------------------------------------------------------------------ the parent's arena


class _Owner:
    """Stands for a queued task (the arena only compares identities)."""


def _payload(n: int, seed: int) -> proto.OOBPayload:
    out = proto.dumps_task((check, (blob(n, seed),), {}))
    assert isinstance(out, proto.OOBPayload)
    return out


@contextlib.contextmanager
def arena_pair(size: int) -> Iterator[tuple[_arena.ArgArena, _arena.ArenaReader]]:
    """A parent's arena of ``size`` bytes and the worker's reader of it, over a
    socket pair standing for the worker's fd channel; all closed after."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        arena = _arena.ArgArena.open(parent, size)
        assert arena is not None
        reader = _arena.ArenaReader(child)
        try:
            yield arena, reader
        finally:
            arena.close()
            if reader._fd >= 0:
                os.close(reader._fd)
    finally:
        parent.close()
        child.close()


@needs_memfd
def test_regions_in_use_are_never_written_and_freed_ones_are_reused():
    with arena_pair(MIB) as (arena, reader):
        a, b, c = _Owner(), _Owner(), _Owner()
        live: list[object] = [a]
        msg_a = arena.put(a, _payload(MIB, 1), live)
        live.append(b)
        msg_b = arena.put(b, _payload(MIB, 2), live)
        assert msg_a is not None and msg_b is not None
        spans = sorted((s, e) for _, s, e in arena.regions)
        assert spans[0][1] <= spans[1][0], "two tasks in flight share memory"
        live.append(c)
        assert arena.put(c, _payload(MIB, 3), live) is not None
        assert len(arena.regions) == 3  # all three in flight: the arena grew
        # What the worker reads for b is b's, though a and c were placed around it.
        permit_b, body_b = msg_b
        assert _arena.ArenaReader.permit(body_b) == int.from_bytes(permit_b, "little")
        assert permit_b != msg_a[0], "each frame has a permit of its own"
        data, views = reader.take(body_b)
        fn, (got,), _ = proto.loads(data, views)
        assert digest(got.data) == digest(pattern(MIB, 2))
        del got, fn
        assert reader.finish(views)
        # a's answer came (it left inflight): its region is the next one's.
        start_a = next(s for o, s, _ in arena.regions if o == id(a))
        live.remove(a)
        d = _Owner()
        live.append(d)
        assert arena.put(d, _payload(MIB, 4), live) is not None
        assert next(s for o, s, _ in arena.regions if o == id(d)) == start_a
        assert all(o != id(a) for o, _, _ in arena.regions)
        # Kept (RETAINED): never given out again, even after its task left.
        assert arena.retain(d)
        live.remove(d)
        e = _Owner()
        live.append(e)
        assert arena.put(e, _payload(MIB, 5), live) is not None
        start_e = next(s for o, s, _ in arena.regions if o == id(e))
        assert start_e != start_a
        # Past ARENA_MAX nothing is placed: the task takes the pipe.
        assert arena._place(_arena.ARENA_MAX + 1) == -1


@needs_memfd
def test_the_worker_releases_views_the_task_let_go_and_reports_those_it_kept():
    with arena_pair(MIB) as (arena, reader):
        live: list[object] = []

        def take(seed: int) -> tuple[Blob, list[memoryview]]:
            owner = _Owner()
            live.append(owner)
            msg = arena.put(owner, _payload(MIB, seed), live)
            assert msg is not None
            data, views = reader.take(msg[1])
            _, (b,), _ = proto.loads(data, views)
            return b, views

        b, views = take(1)
        view = memoryview(b.data)
        assert isinstance(view.obj, memoryview) and isinstance(view.obj.obj, mmap.mmap)
        assert not view.readonly
        del view
        del b
        assert reader.finish(views)  # let go: released

        b, views = take(2)
        held = b.data  # a reference to the view itself
        del b
        assert not reader.finish(views)
        del held

        b, views = take(3)
        exported = memoryview(b.data)  # an object made from it (as numpy makes arrays)
        del b
        assert not reader.finish(views)
        exported.release()

        b, views = take(5)
        derived = memoryview(memoryview(b.data))  # shares the first one's buffer
        del b
        assert not reader.finish(views)
        derived.release()

        b, views = take(6)
        underneath = memoryview(b.data).obj  # the slice itself, no export of it
        del b
        assert not reader.finish(views)
        del underneath

        b, views = take(4)
        cycle: list[object] = [b]
        cycle.append(cycle)  # only a reference cycle holds it: the collector frees it
        del b, cycle
        gc.disable()
        try:
            assert reader.finish(views)
        finally:
            gc.enable()


# ------------------------------------------------------------------ through a pool


@needs_memfd
def test_large_arguments_are_views_of_the_arena_writable_and_intact():
    with ProcessGroupExecutor(2) as ex:
        list(ex.map(sleep, [0.0] * 4))  # both workers ready: large arguments take the arena
        blobs = [blob(2 * MIB, i) for i in range(6)]
        got = list(ex.map(where, blobs))
    assert [g[2] for g in got] == [digest(b.data) for b in blobs]
    assert all(g[1] for g in got), "arguments must be writable, as after pickle"
    assert {g[0] for g in got} == {"mmap"}, got


@pytest.mark.parametrize("mp_context", ["fork", "forkserver", "spawn"])
def test_workers_of_a_multiprocessing_context_take_the_pipe(mp_context):
    with ProcessGroupExecutor(1, mp_context=mp_context) as ex:
        ex.submit(sleep, 0.0).result(timeout=T)
        holder, writable, got = ex.submit(where, blob(2 * MIB, 7)).result(timeout=T)
    assert got == digest(pattern(2 * MIB, 7))
    assert writable and holder == "bytearray"


@needs_memfd
def test_many_tasks_in_flight_each_see_their_own_arguments():
    # Tiny tasks: the pool queues several per worker, each in a region of its own;
    # regions are reused round after round.
    with ProcessGroupExecutor(2) as ex:
        for rnd in range(4):
            blobs = [blob(MIB + 4096 * i, 100 * rnd + i) for i in range(24)]
            assert list(ex.map(check, blobs)) == [digest(b.data) for b in blobs]
            back = list(ex.map(echo, blobs[:8]))
            assert [digest(b.data) for b in back] == [digest(b.data) for b in blobs[:8]]


@needs_memfd
def test_arguments_a_task_kept_are_never_overwritten():
    with ProcessGroupExecutor(1) as ex:
        ex.submit(sleep, 0.0).result(timeout=T)
        kept = [ex.submit(keep, blob(2 * MIB, i)).result(timeout=T) for i in range(3)]
        # Later tasks need regions too: none may be one that a kept argument lives in.
        others = [blob(2 * MIB, 50 + i) for i in range(6)]
        assert list(ex.map(check, others)) == [digest(b.data) for b in others]
        assert ex.submit(kept_digests).result(timeout=T) == kept


@needs_memfd
def test_a_child_the_task_forked_still_reads_its_arguments_after_the_task(tmp_path):
    """The arena's pages are shared with a forked child (a pipe's were a private,
    copy-on-write copy): a task that forks keeps its region for good, so the next
    task's arguments never land under a child still reading (or writing) it."""
    gate, out = str(tmp_path / "gate"), str(tmp_path / "out")
    with ProcessGroupExecutor(1) as ex:
        ex.submit(sleep, 0.0).result(timeout=T)
        first = blob(2 * MIB, 1)
        assert ex.submit(fork_reader, first, gate, out).result(timeout=T) == digest(first.data)
        others = [blob(2 * MIB, 60 + i) for i in range(4)]
        assert list(ex.map(check, others)) == [digest(b.data) for b in others]
        open(gate, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(out) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(out) as f:
            assert f.read() == digest(first.data)


@needs_memfd
def test_a_worker_killed_mid_task_leaves_no_arena_and_the_retry_gets_the_arguments(tmp_path):
    marker = str(tmp_path / "crashed")
    data = blob(3 * MIB, 9)
    with ProcessGroupExecutor(1, retries=1) as ex:
        ex.submit(sleep, 0.0).result(timeout=T)
        assert ex.submit(crash_once, data, marker).result(timeout=T) == digest(data.data)
        assert os.path.exists(marker)
        assert arena_fds() <= 1  # the dead worker's arena was closed at its reap
        assert ex.submit(check, blob(3 * MIB, 10)).result(timeout=T) == digest(pattern(3 * MIB, 10))
    assert arena_fds() == 0


@needs_memfd
def test_a_crash_without_retry_fails_only_its_own_future():
    with ProcessGroupExecutor(1) as ex:
        ex.submit(sleep, 0.0).result(timeout=T)
        bad = ex.submit(crash_once, blob(2 * MIB, 1), "/nonexistent/dir/marker")
        good = [ex.submit(check, blob(2 * MIB, 20 + i)) for i in range(3)]
        with pytest.raises((WorkerCrashedError, OSError)):
            bad.result(timeout=T)
        assert [f.result(timeout=T) for f in good] == [digest(pattern(2 * MIB, 20 + i)) for i in range(3)]


@needs_memfd
def test_tasks_taken_back_from_a_pipe_run_elsewhere_with_their_own_arguments(monkeypatch):
    # Tiny tasks first, so that the pool queues deep; then one long task, and large
    # arguments queued behind it, which are taken back (their permits) and run on the
    # other worker, their regions there new ones. Repeated until a take-back happened.
    from pgexecutor._worker_handle import WorkerHandle

    taken: list[int] = []
    real = WorkerHandle.take_back

    def take_back(self: WorkerHandle, everything: bool):  # type: ignore[no-untyped-def]
        back = real(self, everything)
        taken.extend(item.task_id for item in back)
        return back

    monkeypatch.setattr(WorkerHandle, "take_back", take_back)
    with ProcessGroupExecutor(2) as ex:
        for attempt in range(8):
            blobs = [blob(MIB, 10 * attempt + i) for i in range(10)]
            list(ex.map(sleep, [0.0] * 200))
            long = ex.submit(sleep, 0.3)
            futures = [ex.submit(slow_check, b, 0.001) for b in blobs]
            got = [f.result(timeout=T) for f in futures]
            long.result(timeout=T)
            assert [g[1] for g in got] == [digest(b.data) for b in blobs]
            if taken:
                break
    assert taken, "no task was ever taken back: the scenario did not happen"


@needs_memfd
def test_recycled_workers_each_get_a_new_arena_and_close_it():
    gc.disable()  # closed at the reap itself, not whenever the collector runs
    try:
        with ProcessGroupExecutor(1, max_tasks_per_child=2) as ex:
            for i in range(8):
                assert ex.submit(check, blob(2 * MIB, i)).result(timeout=T) == digest(pattern(2 * MIB, i))
                assert arena_fds() <= 1  # the live worker's at most
        assert arena_fds() == 0
    finally:
        gc.enable()


@needs_memfd
def test_a_task_that_times_out_with_large_arguments_leaves_the_next_intact():
    with ProcessGroupExecutor(1, task_timeout=0.5) as ex:
        ex.submit(sleep, 0.0).result(timeout=T)
        hung = ex.submit(slow_check, blob(2 * MIB, 1), 30)
        nxt = ex.submit(check, blob(2 * MIB, 2))
        with pytest.raises(TimeoutError):
            hung.result(timeout=T)
        assert nxt.result(timeout=T) == digest(pattern(2 * MIB, 2))


@needs_memfd
def test_a_finished_task_and_its_result_are_not_kept_alive_by_its_region():
    import weakref

    with ProcessGroupExecutor(1) as ex:
        ex.submit(sleep, 0.0).result(timeout=T)
        fut = ex.submit(echo, blob(2 * MIB, 1))
        result = fut.result(timeout=T)
        assert digest(result.data) == digest(pattern(2 * MIB, 1))
        gone = weakref.ref(result)
        del result, fut
        gc.collect()
        assert gone() is None, "the finished task's result is still referenced"


@needs_memfd
def test_arguments_larger_than_task_max_take_the_pipe():
    # One copy that large would hold the manager thread (and the GIL) too long.
    with ProcessGroupExecutor(1) as ex:
        ex.submit(sleep, 0.0).result(timeout=T)
        n = _arena.TASK_MAX + 4096
        holder, writable, got = ex.submit(where, blob(n, 3)).result(timeout=T)
        assert got == digest(pattern(n, 3)) and writable
        assert holder == "bytearray"
        assert ex.submit(where, blob(2 * MIB, 4)).result(timeout=T)[0] == "mmap"


def forge_retained() -> int:
    """Write a RETAINED frame for a task that is not running (a task can write to the
    result pipe): the protocol is broken, the worker is killed, this task fails."""
    import sys

    frame = sys._getframe()
    while frame.f_code.co_name != "_run_one":
        frame = frame.f_back
    chan, task_id = frame.f_locals["chan"], frame.f_locals["task_id"]
    os.write(chan.wfd, proto.frame(proto.RETAINED, task_id + 1000))
    time.sleep(30)
    return 0


@needs_memfd
def test_a_forged_retained_frame_is_a_protocol_violation():
    from pgexecutor.errors import WorkerProtocolError

    with ProcessGroupExecutor(1) as ex:
        with pytest.raises(WorkerProtocolError, match="RETAINED"):
            ex.submit(forge_retained).result(timeout=T)
        assert ex.submit(check, blob(2 * MIB, 5)).result(timeout=T) == digest(pattern(2 * MIB, 5))


def _read_frame(reader: proto.FrameReader, fd: int, frames: list) -> tuple:  # type: ignore[type-arg]
    import select

    while not frames:
        assert select.select([fd], [], [], 20)[0], "the worker sent nothing in 20 s"
        got = reader.read_from(fd)
        assert got is not None, "the worker closed its result pipe"
        frames.extend(got)
    return frames.pop(0)  # type: ignore[no-any-return]


@needs_memfd
def test_a_stale_frame_of_a_task_queued_again_is_skipped():
    # A task taken back (its permit taken from the pipe) and queued on the same worker
    # again has two frames with its id in the pipe; its first region was freed at the
    # take-back and may hold another task's arguments by now. With a permit by task
    # id the worker would run the first, stale frame; each TASK_SHM frame has a
    # permit of its own, so it runs the second. (The worker's loop in a forked child,
    # the manager's side played here.)
    from pgexecutor import _worker

    task_r, task_w = os.pipe()
    res_r, res_w = os.pipe()
    dump_r, dump_w = os.pipe()
    permit_r, permit_w = os.pipe()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            for fd in (task_w, res_r, dump_r, permit_w):
                os.close(fd)
            parent.close()
            os.set_blocking(permit_r, False)
            _worker._serve(task_r, res_w, dump_w, permit_r, os.dup(child.fileno()))
        finally:
            os._exit(3)
    try:
        for fd in (task_r, res_w, dump_w, permit_r):
            os.close(fd)
        child.close()
        reader = proto.FrameReader()
        frames: list = []  # type: ignore[type-arg]
        os.write(task_w, proto.frame(proto.INIT, 0, proto.dumps({})))
        assert _read_frame(reader, res_r, frames)[0] == proto.READY
        arena = _arena.ArgArena.open(parent, MIB)
        assert arena is not None
        task = _Owner()
        live: list[object] = [task]
        stale = arena.put(task, proto.dumps_task((check, (blob(MIB, 1),), {})), live)
        assert stale is not None
        live.remove(task)  # taken back: its region is free...
        other = _Owner()
        placed = arena.put(other, proto.dumps_task((check, (blob(MIB, 2),), {})), [other])
        assert placed is not None  # ... and holds another task's arguments now
        live = [other, task]  # queued again, in a region of its own
        again = arena.put(task, proto.dumps_task((check, (blob(MIB, 1),), {})), live)
        assert again is not None
        os.write(permit_w, again[0])  # only the new frame's permit
        os.write(task_w, proto.frame(proto.TASK_SHM, 7, stale[1]) + proto.frame(proto.TASK_SHM, 7, again[1]))
        kind, ident, payload = _read_frame(reader, res_r, frames)
        assert (kind, ident) == (proto.RESULT, 7)
        assert proto.loads(payload) == digest(pattern(MIB, 1))
        os.write(task_w, proto.frame(proto.EXIT))
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        arena.close()
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        for fd in (task_w, res_r, dump_r, permit_w):
            os.close(fd)
        parent.close()


def _rss_of_mapping(addr: int) -> int:
    """Resident bytes of this process's mapping that holds ``addr`` (smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no such mapping")


@needs_memfd
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="no smaps")
@pytest.mark.parametrize("large", [False, True], ids=["small-arena", "large-arena"])
def test_a_large_arena_does_not_stay_mapped_in_the_worker_between_tasks(monkeypatch, large):
    # What stays mapped counts in the worker's memory (max_memory): past RESIDENT_MAX
    # a finished task's region is unmapped again (the file keeps it).
    import ctypes

    if large:
        monkeypatch.setattr(_arena, "RESIDENT_MAX", 0)
    with arena_pair(4 * MIB) as (arena, reader):
        owner = _Owner()
        placed = arena.put(owner, _payload(4 * MIB, 1), [owner])
        assert placed is not None
        data, views = reader.take(placed[1])
        _, (b,), _ = proto.loads(data, views)
        assert digest(b.data) == digest(pattern(4 * MIB, 1))  # every page read
        view = memoryview(b.data)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        view.release()
        del b, view
        assert _rss_of_mapping(addr) >= 4 * MIB
        assert reader.finish(views)
        left = _rss_of_mapping(addr)
        assert (left < MIB) if large else (left >= 4 * MIB)
