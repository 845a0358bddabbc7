"""``map`` without a Future per item (``pgexecutor._map_slots``): the standard
behaviours of ``map`` on that path — order, per-position errors, arguments that do
not pickle, closing early, ``shutdown(cancel_futures=True)`` while it is read,
results in shared memory, inputs that wait for earlier tasks, many maps at once, a
map read from a done-callback — and the maps that still make futures.

CPython's own concurrent.futures suite (test_stdlib_suite) runs its map tests on
this path too. Nothing here depends on timing beyond generous safety nets.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import CancelledError

import pytest
from _light_tasks import add, square
from _oob_blob import Blob

from pgexecutor import ProcessGroupExecutor, WorkerCrashedError, _map_slots
from pgexecutor._future import TaskFuture

pytestmark = pytest.mark.timeout(120)

T = 60  # a safety net against hangs, never a performance bound
MIB = 1 << 20


def identity(x):
    return x


def touch(path):
    open(path, "w").close()
    return os.path.basename(path)


def wait_for(path):
    deadline = time.monotonic() + T
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return "released"


def crash_on(x, bad):
    if x == bad:
        os._exit(3)
    return x


def echo(b: Blob) -> Blob:
    return b


class Bar:
    def __init__(self):
        self.n = 0

    def update(self, n=1):
        self.n += n

    def set_postfix(self, mapping, refresh=True):
        pass


def test_a_map_makes_no_future_per_item_unless_something_needs_one(monkeypatch):
    """The claim itself: no TaskFuture for a plain map (items or chunks). A progress
    bar (done-callbacks) and cancel_running (a running item's cancel stops it) still
    get futures, and give the same results."""
    made: list[int] = []
    init = TaskFuture.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(TaskFuture, "__init__", counting)
    with ProcessGroupExecutor(max_workers=2) as ex:
        assert list(ex.map(square, range(200))) == [x * x for x in range(200)]
        assert list(ex.map(square, range(200), chunksize=7)) == [x * x for x in range(200)]
        assert list(ex.map(add, range(50), range(50), chunksize=4)) == [2 * x for x in range(50)]
        assert list(ex.map(square, iter(range(30)), buffersize=3)) == [x * x for x in range(30)]
        assert made == []
        bar = Bar()
        assert list(ex.map(square, range(5), progress=bar)) == [x * x for x in range(5)]
        assert bar.n == 5 and len(made) == 5
        assert list(ex.options(cancel_running=True).map(square, range(3))) == [0, 1, 4]
        assert len(made) == 8


def test_an_input_iterator_may_wait_for_what_earlier_tasks_did(tmp_path):
    """As with the standard library, each item of an iterator is handed over as it is
    read: an input that waits for the task it just gave must not deadlock (a map
    over a list may hand its tasks over in blocks; an iterator's never are)."""

    def inputs():
        for i in range(8):
            path = str(tmp_path / f"f{i}")
            yield path
            deadline = time.monotonic() + T
            while not os.path.exists(path):
                assert time.monotonic() < deadline, f"item {i} was held back"
                time.sleep(0.005)

    with ProcessGroupExecutor(max_workers=2) as ex:
        assert list(ex.map(touch, inputs())) == [f"f{i}" for i in range(8)]


def test_closing_a_map_early_cancels_what_no_worker_took(tmp_path):
    """Leaving the loop (the generator closed) cancels the items still queued: they
    never run, the pool counts them cancelled and shuts down. Those a worker took
    (the head, and what its pipe held: PREFETCH_MAX at most) run, as in the
    standard library's call queue."""
    gate = str(tmp_path / "gate")
    n = 400
    paths = [str(tmp_path / f"t{i}") for i in range(n)]
    ex = ProcessGroupExecutor(max_workers=1)
    try:
        it = ex.map(wait_for_then_touch, [(None, None), (gate, None)] + [(None, p) for p in paths])
        assert next(it) == "quick"  # (closing a generator never started runs nothing)
        it.close()
        open(gate, "w").close()
    finally:
        ex.shutdown(wait=True)
    ran = sum(os.path.exists(p) for p in paths)
    stats = ex.stats()
    assert ran == stats["completed"] - 2, (ran, stats)
    assert stats["cancelled"] == n - ran >= n - 70, (ran, stats)


def wait_for_then_touch(pair):
    gate, path = pair
    if gate is None and path is None:
        return "quick"
    if gate is not None:
        return wait_for(gate)
    return touch(path)


def test_an_item_whose_arguments_do_not_pickle_fails_its_own_position():
    with ProcessGroupExecutor(max_workers=2) as ex:
        out = list(ex.map(identity, [1, threading.Lock(), 3], return_exceptions=True))
        assert out[0] == 1 and out[2] == 3
        assert isinstance(out[1], TypeError) and "lock" in str(out[1])
        it = ex.map(identity, [1, threading.Lock(), 3])
        assert next(it) == 1
        with pytest.raises(TypeError):
            next(it)
        stats = ex.stats()
    assert stats["submitted"] == 6 and stats["failed"] == 2, stats


def test_each_item_gets_its_own_error_and_a_crash_fails_only_its_item():
    with ProcessGroupExecutor(max_workers=2) as ex:
        out = list(ex.map(crash_on, range(10), [4] * 10, return_exceptions=True))
        assert [o for i, o in enumerate(out) if i != 4] == [i for i in range(10) if i != 4]
        assert isinstance(out[4], WorkerCrashedError)
        errors = list(ex.map(square, ["a", "b"], return_exceptions=True))
        assert all(isinstance(e, TypeError) for e in errors) and errors[0] is not errors[1]


def test_shutdown_with_cancel_futures_while_a_map_is_read(tmp_path):
    """shutdown(cancel_futures=True) cancels the items no worker took: reading the
    map raises CancelledError there, after the results before it."""
    gate = str(tmp_path / "gate")
    ex = ProcessGroupExecutor(max_workers=1)
    it = ex.map(wait_for_then_touch, [(gate, None)] + [(None, str(tmp_path / f"t{i}")) for i in range(300)])
    got = []
    try:
        ex.shutdown(wait=False, cancel_futures=True)
        open(gate, "w").close()
        with pytest.raises(CancelledError):
            for value in it:
                got.append(value)
    finally:
        ex.shutdown(wait=True)
    assert got[0] == "released" and len(got) < 301
    assert ex.stats()["cancelled"] == 301 - len(got)


def test_results_in_shared_memory_reach_their_items(monkeypatch):
    """Large results travel in shared memory and are unpickled by the delivery
    thread, which ends the item (set_result) instead of its reader."""
    ended_by_delivery: list[int] = []
    set_result = _map_slots.MapSlot.set_result

    def counting(self, value):
        ended_by_delivery.append(1)
        set_result(self, value)

    monkeypatch.setattr(_map_slots.MapSlot, "set_result", counting)
    data = [bytes([i]) * (2 * MIB) for i in range(4)]
    with ProcessGroupExecutor(max_workers=2) as ex:
        out = list(ex.map(echo, [Blob(bytearray(d)) for d in data]))
    assert [bytes(b.data) for b in out] == data
    assert len(ended_by_delivery) == 4


def test_many_maps_at_once_from_several_threads():
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    with ProcessGroupExecutor(max_workers=2) as ex:

        def run(k: int) -> None:
            try:
                results[k] = list(ex.map(add, range(300), [k] * 300, chunksize=1 + k % 3))
            except BaseException as exc:  # noqa: BLE001 - any error is the failure
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
    assert errors == []
    assert results == {k: [x + k for x in range(300)] for k in range(6)}


def test_reading_a_map_in_a_done_callback_refuses_or_finishes_never_hangs(tmp_path):
    """Done-callbacks run in the thread that ends futures: a map read there must not
    wait for that thread (result() of an unfinished future refuses, and so does an
    unfinished item); the pool goes on."""
    gate = str(tmp_path / "gate")
    seen: list[str] = []
    with ProcessGroupExecutor(max_workers=2) as ex:

        def cb(_f):
            try:
                seen.append(str(list(ex.map(square, [2]))))
            except RuntimeError as exc:
                seen.append("refused: " + str(exc))

        fut = ex.submit(wait_for, gate)
        fut.add_done_callback(cb)  # before it can finish: the callback runs in the pool's thread
        open(gate, "w").close()
        assert fut.result(T) == "released"
        assert list(ex.map(square, range(3))) == [0, 1, 4]
    assert len(seen) == 1
    assert seen[0].startswith("refused: result() of an unfinished future") or seen[0] == "[4]"


def test_a_slot_follows_the_futures_rules():
    """The slot's own protocol, without a pool: cancel only while queued, the pool
    told once, a cancelled item never runs, waits time out, outcomes are final."""
    cancels: list[int] = []
    group = _map_slots.SlotGroup(lambda: cancels.append(1), None)
    slot = _map_slots.MapSlot(group)
    assert not slot.done() and slot.cancel() and slot.cancel() and cancels == [1]
    assert slot.cancelled() and not slot.set_running_or_notify_cancel()
    with pytest.raises(CancelledError):
        slot.result()
    slot = _map_slots.MapSlot(group)
    assert slot.set_running_or_notify_cancel() and not slot.cancel()
    from concurrent.futures import TimeoutError as FuturesTimeoutError

    with pytest.raises(FuturesTimeoutError):
        slot.result(0.01)
    with pytest.raises(FuturesTimeoutError):
        slot.exception(0)
    ender = threading.Timer(0.05, slot.set_result, args=(5,))
    ender.start()
    assert slot.result(T) == 5 and slot.exception() is None
    slot.set_exception(ValueError("late"))  # ended already: quiet, the result stays
    assert slot.result() == 5
    assert slot.end_now(ValueError("late"))  # the same
    assert slot.result() == 5
    failed = _map_slots.failed_slot(group, KeyError("k"))
    assert failed.done() and isinstance(failed.exception(), KeyError)
    with pytest.raises(KeyError):
        failed.result()


def test_ctrl_c_while_reading_a_map_cancels_the_rest(tmp_path):
    """A KeyboardInterrupt in the wait for an item (the user's Ctrl-C) leaves the
    map: the items still queued are cancelled, never run, and shutdown returns."""
    import signal

    gate = str(tmp_path / "gate")
    n = 300
    paths = [str(tmp_path / f"t{i}") for i in range(n)]
    ex = ProcessGroupExecutor(max_workers=1)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited ignored
    try:
        it = ex.map(wait_for_then_touch, [(None, None), (gate, None)] + [(None, p) for p in paths])
        assert next(it) == "quick"
        threading.Timer(0.2, os.kill, args=(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            next(it)  # waits for the gated item
    finally:
        signal.signal(signal.SIGINT, previous)
        open(gate, "w").close()
        ex.shutdown(wait=True)
    ran = sum(os.path.exists(p) for p in paths)
    stats = ex.stats()
    assert stats["cancelled"] == n - ran >= n - 70, (ran, stats)


def test_timeouts_of_every_size_in_a_map():
    """0 and negative: the first unfinished item times out; nan as 0 (as before);
    inf, None and timeouts no lock takes (1e308: OverflowError in a lock's wait)
    mean no limit."""
    from concurrent.futures import TimeoutError as FuturesTimeoutError

    with ProcessGroupExecutor(max_workers=2) as ex:
        for timeout in (0, -1, float("nan")):
            with pytest.raises(FuturesTimeoutError):
                list(ex.map(time.sleep, [0.5], timeout=timeout))
        for timeout in (float("inf"), None, 1e308, 10.0 ** 10):
            assert list(ex.map(square, [3, 4], timeout=timeout)) == [9, 16]
            assert list(ex.map(square, [3, 4], timeout=timeout, chunksize=2)) == [9, 16]
