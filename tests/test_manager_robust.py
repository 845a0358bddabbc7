"""The manager thread cannot be broken, or held up, by what a task does.

* Anything a worker writes that is not a valid frame (stray bytes, an oversized
  length, an unknown kind, a frame for another task, a closed pipe, a RESULT_SHM
  without its memfd) kills that worker's group and fails its running task with
  WorkerProtocolError; every other future and the pool go on. The frame reader is
  fuzzed (fixed seed, many cases).
* Unpickling results and running done-callbacks happen in the delivery thread, so
  a result that takes seconds to unpickle, or a slow callback, does not delay
  another task's deadline.

Every test that starts processes relies on the autouse fixture in conftest.py to
prove that no worker group survived.
"""

from __future__ import annotations

import os
import pickle
import random
import sys
import threading
import time
from concurrent.futures import wait

import pytest

from pgexecutor import (
    ProcessGroupExecutor,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerProtocolError,
    _manager,
    task_info,
)
from pgexecutor import _protocol as proto

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------- task functions


def _my_channel():
    """The worker's channel object, found on the stack (the result fd is 4 in a
    fresh-interpreter worker, elsewhere in a forked one)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_run_one":
            return frame.f_locals["chan"], frame.f_locals["task_id"]
        frame = frame.f_back
    raise AssertionError("not in a pgexecutor worker")


def write_then_return(how: str):
    chan, task_id = _my_channel()
    fd = chan.wfd
    if how == "stray":
        os.write(fd, b"xyz")
    elif how == "garbage":
        os.write(fd, random.Random(7).randbytes(300))
    elif how == "oversized":
        os.write(fd, proto.HEADER.pack(proto.RESULT, task_id, 1 << 62))
    elif how == "unknown-kind":
        os.write(fd, proto.frame(99, task_id, b"hello"))
    elif how == "wrong-task":
        os.write(fd, proto.frame(proto.RESULT, task_id + 1000, pickle.dumps("forged")))
    elif how == "ready-again":
        os.write(fd, proto.frame(proto.READY, os.getpid()))
    elif how == "shm-without-fd":
        os.write(fd, proto.frame(proto.RESULT_SHM, task_id, b"\0" * 24))
    elif how == "closed-pipe":
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)  # the result goes nowhere; the manager sees EOF
        os.close(devnull)
    return "written"


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def sleep_forever():
    time.sleep(1000)


def _slow_rebuild(seconds, value):
    if os.environ.get("PGX_TEST_PARENT") == str(os.getpid()):
        time.sleep(seconds)  # only where it is unpickled: the parent
    return value


class SlowToUnpickle:
    def __init__(self, seconds):
        self.seconds = seconds

    def __reduce__(self):
        return (_slow_rebuild, (self.seconds, "slow"))


def make_slow(seconds):
    return SlowToUnpickle(seconds)


def _failing_rebuild():
    raise ValueError("this result does not unpickle in the parent")


class FailsToUnpickle:
    def __reduce__(self):
        return (_failing_rebuild, ())


def make_unpicklable_here():
    return FailsToUnpickle()


def big_array():
    import numpy as np

    return {"a": np.arange(300_000, dtype=np.float64), "tag": "big"}


@pytest.fixture(autouse=True)
def _mark_parent(monkeypatch):
    monkeypatch.setenv("PGX_TEST_PARENT", str(os.getpid()))


# ------------------------------------------------------------ protocol violations

VIOLATIONS = {
    "stray": "b'xyz",
    "garbage": "protocol violation",
    "oversized": "impossible payload size",
    "unknown-kind": "unknown kind 99",
    "wrong-task": "unexpected RESULT frame",
    "ready-again": "unexpected READY frame",
    "shm-without-fd": "without its shared memory",
    "closed-pipe": "closed its result pipe",
}


@pytest.mark.parametrize("mp_context", [None, "fork"], ids=["spawn-default", "fork"])
@pytest.mark.parametrize("how", sorted(VIOLATIONS))
def test_a_task_that_breaks_the_protocol_fails_alone(how, mp_context):
    if how == "shm-without-fd" and mp_context == "fork":
        pytest.skip("forked workers send results through the pipe only")
    with ProcessGroupExecutor(max_workers=2, mp_context=mp_context) as ex:
        ex.submit(sleep_then, 0, 0).result(timeout=30)  # the pool is up
        neighbour = ex.submit(sleep_then, 1.5, "neighbour")
        bad = ex.submit(write_then_return, how)
        with pytest.raises(WorkerProtocolError) as info:
            bad.result(timeout=30)
        err = info.value
        assert isinstance(err, WorkerCrashedError)
        assert "protocol violation" in str(err) and VIOLATIONS[how] in str(err), str(err)
        assert err.pid not in ex.worker_pids()  # its group was killed
        assert task_info(bad).outcome == "crashed"
        # Every other future, and the pool, go on.
        assert neighbour.result(timeout=30) == "neighbour"
        assert list(ex.map(abs, range(-20, 0))) == list(range(20, 0, -1))
        stats = ex.stats()
        assert stats["failed"] == 1 and stats["workers_killed"] == 1


def test_an_error_while_handling_one_worker_is_contained(monkeypatch, caplog):
    """A bug of ours while handling one worker's answer kills that worker and fails
    its task; the loop, and every other future, go on (before: the manager thread
    died and every later future got BrokenProcessPool)."""
    real = _manager.Manager._on_answer
    calls = []

    def flaky(self, w, kind, ident, payload):
        calls.append(ident)
        if len(calls) == 2:
            raise RuntimeError("a bug in the manager")
        return real(self, w, kind, ident, payload)

    monkeypatch.setattr(_manager.Manager, "_on_answer", flaky)
    with ProcessGroupExecutor(max_workers=2) as ex:
        assert ex.submit(sleep_then, 0, 1).result(timeout=30) == 1
        neighbour = ex.submit(sleep_then, 1.0, "neighbour")
        victim = ex.submit(sleep_then, 0.1, "victim")
        with pytest.raises(WorkerCrashedError, match="a bug in the manager"):
            victim.result(timeout=30)
        assert neighbour.result(timeout=30) == "neighbour"
        assert [f.result(timeout=30) for f in [ex.submit(pow, 2, k) for k in range(5)]] == [1, 2, 4, 8, 16]
    logged = [r for r in caplog.records if "failed while handling worker" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None


# ------------------------------------------------------------ the frame reader, fuzzed

LIMITS = proto.worker_frame_limits()
KINDS = sorted(LIMITS)


def _random_frame(rng: random.Random) -> tuple[int, int, bytes]:
    kind = rng.choice(KINDS)
    least, most = LIMITS[kind]
    if least == most:
        size = least
    else:
        size = rng.choice([1, 2, 17, 100, 4000, 70_000, rng.randrange(1, 200_000)])
    return kind, rng.randrange(1 << 64), rng.randbytes(size)


def _split(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 12)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def test_fuzz_valid_streams_in_random_pieces_come_back_exactly():
    rng = random.Random(20261206)
    for _ in range(400):
        frames = [_random_frame(rng) for _ in range(rng.randrange(1, 6))]
        stream = b"".join(proto.frame(k, i, p) for k, i, p in frames)
        reader = proto.FrameReader(LIMITS)
        got = []
        for piece in _split(rng, stream):
            got += [(k, i, bytes(p)) for k, i, p in reader.feed(piece)]
        assert reader.error is None
        assert got == frames
        assert reader.pending() == 0


def test_fuzz_truncated_streams_give_only_whole_frames():
    rng = random.Random(7)
    for _ in range(400):
        frames = [_random_frame(rng) for _ in range(rng.randrange(1, 5))]
        stream = b"".join(proto.frame(k, i, p) for k, i, p in frames)
        cut = rng.randrange(len(stream))
        reader = proto.FrameReader(LIMITS)
        got = []
        for piece in _split(rng, stream[:cut]):
            got += [(k, i, bytes(p)) for k, i, p in reader.feed(piece)]
        assert reader.error is None
        assert got == frames[: len(got)]
        whole = sum(proto.HEADER_SIZE + len(p) for _, _, p in got)
        assert reader.pending() == cut - whole


def test_fuzz_garbage_never_raises_and_never_allocates_a_huge_buffer():
    """Random bytes (and random bytes after valid frames), in random pieces: the
    reader returns valid frames or stops with an error naming what it read; it never
    raises and never believes a size larger than the machine's memory."""
    rng = random.Random(1234)
    errors = 0
    for case in range(3000):
        prefix = [_random_frame(rng) for _ in range(rng.randrange(0, 3))]
        junk = rng.randbytes(rng.randrange(1, 200))
        if case % 3 == 0:  # a plausible kind with a random (mostly huge) size
            junk = proto.HEADER.pack(rng.choice(KINDS), 5, rng.randrange(1 << 64)) + junk
        stream = b"".join(proto.frame(k, i, p) for k, i, p in prefix) + junk
        reader = proto.FrameReader(LIMITS)
        got = []
        for piece in _split(rng, stream):
            got += reader.feed(piece)
        for kind, _ident, payload in got:
            least, most = LIMITS[kind]
            assert least <= len(payload) <= most
        assert [(k, i, bytes(p)) for k, i, p in got[: len(prefix)]] == prefix
        assert reader.pending() <= 1 << 20
        if reader.error is not None:
            errors += 1
            assert reader.error.startswith("protocol violation: ")
            assert "read b" in reader.error
            assert reader.feed(b"more") == [] and reader.pending() == 0
    assert errors > 1000  # most garbage is caught at its first header


def test_frame_reader_from_a_pipe_stops_at_an_oversized_header():
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        os.write(w, proto.frame(proto.READY, 1) + proto.HEADER.pack(proto.RESULT, 2, 1 << 60))
        reader = proto.FrameReader(LIMITS)
        assert reader.read_from(r) == [(proto.READY, 1, b"")]
        assert reader.error is not None and "impossible payload size" in reader.error
        assert reader.read_from(r) == []
    finally:
        os.close(r)
        os.close(w)


# ------------------------------------------------------------ nothing slow on the manager


def test_a_result_slow_to_unpickle_does_not_delay_another_tasks_timeout():
    """Before: a 1 s task_timeout fired after 3.6 s next to a result taking 3 s to
    unpickle in the parent (the manager thread unpickled it)."""
    with ProcessGroupExecutor(max_workers=2) as ex:
        wait([ex.submit(sleep_then, 0.2, 0) for _ in range(2)])  # both workers up
        start = time.monotonic()
        hung = ex.options(task_timeout=1.0).submit(sleep_forever)
        slow = ex.submit(make_slow, 3.0)
        with pytest.raises(TaskTimeoutError):
            hung.result(timeout=30)
        fired_after = time.monotonic() - start
        assert slow.result(timeout=30) == "slow"
    assert fired_after < 2.5, f"the timeout fired after {fired_after:.2f} s"


def test_a_slow_done_callback_does_not_delay_another_tasks_timeout():
    ran_in = []

    def slow_callback(fut):
        ran_in.append(threading.current_thread().name)
        time.sleep(3.0)

    with ProcessGroupExecutor(max_workers=2) as ex:
        wait([ex.submit(sleep_then, 0.2, 0) for _ in range(2)])
        start = time.monotonic()
        hung = ex.options(task_timeout=1.0).submit(sleep_forever)
        fast = ex.submit(sleep_then, 0.05, 1)
        fast.add_done_callback(slow_callback)
        with pytest.raises(TaskTimeoutError):
            hung.result(timeout=30)
        fired_after = time.monotonic() - start
    assert fired_after < 2.5, f"the timeout fired after {fired_after:.2f} s"
    assert ran_in == ["pgexecutor-delivery"]


def test_shutdown_waits_for_every_done_callback():
    seen = []

    def callback(fut):
        time.sleep(0.1)
        seen.append(fut.result())

    ex = ProcessGroupExecutor(max_workers=2)
    futures = [ex.submit(sleep_then, 0.01, k) for k in range(8)]
    for f in futures:
        f.add_done_callback(callback)
    ex.shutdown(wait=True)
    assert sorted(seen) == list(range(8))


def test_a_result_that_fails_to_unpickle_counts_as_failed():
    with ProcessGroupExecutor(max_workers=1) as ex:
        fut = ex.submit(make_unpicklable_here)
        with pytest.raises(ValueError, match="does not unpickle") as info:
            fut.result(timeout=30)
        assert info.value.pgexecutor_stage == proto.UNPICKLE_RESULT
        assert task_info(fut).outcome == "error"
        assert ex.submit(pow, 2, 3).result(timeout=30) == 8
        stats = ex.stats()
    assert stats["completed"] == 1 and stats["failed"] == 1


# ------------------------------------------------------------ the result's own bytes


def test_result_bytes_are_the_workers_pickle():
    with ProcessGroupExecutor(max_workers=1) as ex:
        plain = ex.submit(sleep_then, 0.3, {"k": [1, 2.5, "x"]})
        plain.keep_result_bytes()
        not_asked = ex.submit(sleep_then, 0.0, 1)
        assert plain.result(timeout=30) == {"k": [1, 2.5, "x"]}
        assert pickle.loads(plain.result_bytes()) == {"k": [1, 2.5, "x"]}
        assert not_asked.result(timeout=30) == 1 and not_asked.result_bytes() is None


def test_result_bytes_of_an_out_of_band_result_load_alone():
    np = pytest.importorskip("numpy")
    with ProcessGroupExecutor(max_workers=1) as ex:
        ex.submit(sleep_then, 0, 0).result(timeout=30)
        gate = ex.submit(sleep_then, 0.3, 0)  # keeps the next one from ending before we ask
        fut = ex.submit(big_array)
        fut.keep_result_bytes()
        gate.result(timeout=30)
        value = fut.result(timeout=30)
    again = pickle.loads(fut.result_bytes())
    assert again["tag"] == "big" and np.array_equal(again["a"], value["a"])


class _SlowBar:
    """A progress object whose every update takes a while (a slow terminal)."""

    total = None

    def __init__(self):
        self.updates = 0

    def update(self, n):
        if not self.updates:
            time.sleep(3.0)
        self.updates += n

    def set_postfix(self, mapping, refresh=True):
        pass


def test_a_slow_progress_bar_does_not_delay_another_tasks_timeout():
    bar = _SlowBar()
    with ProcessGroupExecutor(max_workers=2) as ex:
        wait([ex.submit(sleep_then, 0.2, 0) for _ in range(2)])
        start = time.monotonic()
        hung = ex.options(task_timeout=1.0).submit(sleep_forever)
        out = []
        mapping = threading.Thread(
            target=lambda: out.extend(ex.map(abs, [-1, -2, -3, -4, -5], progress=bar))
        )
        mapping.start()
        with pytest.raises(TaskTimeoutError):
            hung.result(timeout=30)
        fired_after = time.monotonic() - start
        mapping.join(30)
    assert fired_after < 2.5, f"the timeout fired after {fired_after:.2f} s"
    assert out == [1, 2, 3, 4, 5] and bar.updates == 5


_rebuilt: list[int] = []


def _counted_rebuild(value):
    if os.environ.get("PGX_TEST_PARENT") == str(os.getpid()):
        time.sleep(0.5)
        _rebuilt.append(value)
    return [value]


class CountedUnpickle:
    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (_counted_rebuild, (self.value,))


def make_counted(value):
    return CountedUnpickle(value)


def test_a_result_is_unpickled_once_whoever_reads_it():
    """A future without callbacks ends still pickled; its readers unpickle it once
    (in the first reader's thread), and every reader gets the same object."""
    _rebuilt.clear()
    with ProcessGroupExecutor(max_workers=1) as ex:
        fut = ex.submit(make_counted, 42)
        wait([fut], timeout=30)
        assert fut.done() and "not unpickled yet" in repr(fut)
        got = []
        readers = [threading.Thread(target=lambda: got.append(fut.result())) for _ in range(4)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(30)
        assert got == [[42]] * 4 and all(g is got[0] for g in got)
        assert fut.exception() is None and fut.result() is got[0]
        assert "returned list" in repr(fut)
    assert _rebuilt == [42]


@pytest.mark.parametrize("mp_context", ["fresh", "template"])
def test_a_spawn_pause_that_ends_while_the_manager_is_busy_still_wakes_it(monkeypatch, mp_context):
    """After a crash the manager pauses the replacement's start for a moment (the
    woken caller runs first). A pass that saw the pause, then lost the CPU (or spent
    it on other work) until the pause was over, must still wake up for the start:
    this hung for good, a task queued and no worker, when the loop computed its next
    wake-up after the pause had ended (the pause was forgotten, no wake-up due)."""
    from pgexecutor._manager_dispatch import ManagerDispatch

    real = ManagerDispatch._dispatch

    def dispatch_then_lose_the_cpu(self):
        real(self)
        if self.queue and not self.workers:  # the pause kept it from starting one
            time.sleep(0.005)  # longer than the pause (SPAWN_PAUSE, 2 ms)

    monkeypatch.setattr(ManagerDispatch, "_dispatch", dispatch_then_lose_the_cpu)
    with ProcessGroupExecutor(1, mp_context=mp_context) as ex:
        for i in range(4):
            crash = ex.submit(os._exit, 3)
            after = ex.submit(abs, -i)  # queued (or waiting in the pipe) behind the crash
            with pytest.raises(WorkerCrashedError):
                crash.result(timeout=30)
            assert after.result(timeout=30) == i


def test_a_task_submitted_while_the_manager_dies_fails_too(monkeypatch):
    """The manager's loop fails (a bug of ours, simulated): the emergency stop fails
    what it holds, but a task posted after it took the inbox and before the mailbox
    closed was never answered (its result() waited for good; seen in CI as a hung
    journal test). Now it fails with BrokenProcessPool too, as does a submit after
    the manager ended."""
    from concurrent.futures.process import BrokenProcessPool

    from pgexecutor import _manager

    real_stop = _manager.Manager._emergency_stop
    stopped = threading.Event()

    def broken(self):
        if self.queue:
            raise RuntimeError("simulated manager bug")

    def slow_stop(self):
        real_stop(self)
        stopped.set()
        time.sleep(0.5)  # the window: inbox taken, mailbox not closed yet

    monkeypatch.setattr(_manager.Manager, "_dispatch", broken)
    monkeypatch.setattr(_manager.Manager, "_emergency_stop", slow_stop)
    ex = ProcessGroupExecutor(max_workers=1)
    try:
        first = ex.submit(abs, -1)
        assert stopped.wait(30)
        during = ex.submit(abs, -2)
        for fut in (first, during):
            with pytest.raises(BrokenProcessPool):
                fut.result(timeout=30)
        with pytest.raises(BrokenProcessPool):  # the manager ended, or is ending
            ex.submit(abs, -3).result(timeout=30)
    finally:
        ex.shutdown(wait=False)
