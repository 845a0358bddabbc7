"""TaskFuture's lighter condition (``_future.FutureCondition``): it must be a Future in
every way the standard library and asyncio rely on, while building no
``threading.Condition`` per future (see the module docstring of ``_future``)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, as_completed, wait
from concurrent.futures import TimeoutError as FuturesTimeoutError

import pytest

from pgexecutor._future import FutureCondition, TaskFuture

pytestmark = pytest.mark.timeout(60)

T = 30  # a safety net against hangs, never a performance bound


def test_a_task_future_has_every_field_a_future_sets():
    """TaskFuture sets Future.__init__'s fields itself (the two lists made on first
    use); if a Python version adds one, this fails instead of a Future method
    hitting a missing attribute."""
    fut = TaskFuture()
    assert all(hasattr(fut, name) for name in vars(Future()))
    assert not any(isinstance(v, type(threading.Condition())) for v in vars(fut).values())
    assert isinstance(fut._condition, type(threading.RLock()))  # the lock itself


def _tracked_per_object(make) -> float:
    gc.collect()
    before = len(gc.get_objects())
    keep = [make() for _ in range(1000)]
    after = len(gc.get_objects())
    del keep
    return (after - before - 1) / 1000  # (the list ``keep``)


def test_it_allocates_fewer_tracked_objects_than_a_future():
    """The point of it: fewer objects for the collector per future. A TaskFuture is
    two (itself and its condition, which is its lock); a Future is several more."""
    assert _tracked_per_object(TaskFuture) <= 2
    assert _tracked_per_object(Future) >= 4


def test_waiters_and_callbacks_lists_are_made_on_first_use_and_work():
    fut = TaskFuture()
    assert fut._waiter_list is None and fut._done_callbacks == ()
    seen: list[object] = []
    fut.add_done_callback(lambda f: seen.append(("a", f.result())))
    assert fut._done_callbacks is not TaskFuture._done_callbacks
    assert TaskFuture._done_callbacks == ()  # the shared default stays empty
    other = TaskFuture()
    assert other._done_callbacks == ()
    fut.set_running_or_notify_cancel()
    fut.set_result(5)
    assert seen == [("a", 5)]
    fut.add_done_callback(lambda f: seen.append(("late", f.result())))  # runs at once
    assert seen == [("a", 5), ("late", 5)]
    # wait() makes the waiters' list under the condition and leaves it empty
    g = TaskFuture()
    g.set_running_or_notify_cancel()
    threading.Timer(0.02, g.set_result, args=(1,)).start()
    done, _ = wait([g], timeout=T)
    assert done == {g} and g._waiter_list == []


def test_callbacks_added_from_many_threads_at_once_each_run_once():
    """The first add makes the list, under the condition: threads racing to add the
    first callback lose none."""
    def add(fut: TaskFuture, start: threading.Barrier, calls: list[int], i: int) -> None:
        start.wait(T)
        fut.add_done_callback(lambda f: calls.append(i))

    for _ in range(20):
        fut = TaskFuture()
        calls: list[int] = []
        start = threading.Barrier(8)
        threads = [threading.Thread(target=add, args=(fut, start, calls, i)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        fut.set_running_or_notify_cancel()
        fut.set_result(None)
        assert sorted(calls) == list(range(8))


def test_every_waiter_wakes_when_the_future_ends():
    fut = TaskFuture()
    fut.set_running_or_notify_cancel()
    got: list[object] = []

    def waiter():
        got.append(fut.result(5 * T))  # woken by set_result, long before this

    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + T
    while len(fut._condition._sleepers or ()) < 8:  # all asleep (their sleeper locks listed)
        assert time.monotonic() < deadline
        time.sleep(0.001)
    fut.set_result(7)
    for t in threads:
        t.join(T)
    assert not any(t.is_alive() for t in threads), "a waiter was not woken"
    assert got == [7] * 8
    assert fut._condition._sleepers is None


def test_a_wait_that_times_out_leaves_nothing_behind_and_later_waits_work():
    fut = TaskFuture()
    for timeout in (0, -1, 0.01):
        with pytest.raises(FuturesTimeoutError):
            fut.result(timeout)
        with pytest.raises(FuturesTimeoutError):
            fut.exception(timeout)
    assert not fut._condition._sleepers
    threading.Timer(0.05, fut.cancel).start()
    with pytest.raises(CancelledError):
        fut.result(T)


def test_the_condition_on_its_own():
    cond = FutureCondition()
    with cond:
        assert not cond.wait(0) and not cond.wait(0.01)
        assert cond.wait_for(lambda: True, 0) is True
        assert cond.wait_for(lambda: False, 0.01) is False
    assert cond.acquire(False)
    other: list[bool] = []
    t = threading.Thread(target=lambda: other.append(cond.acquire(False)))
    t.start()
    t.join(T)
    assert other == [False]  # held by this thread
    assert cond.acquire(False)  # re-entrant, as Future needs (repr inside set_result)
    cond.release()
    cond.release()
    woken: list[int] = []

    def sleeper(i):
        with cond:
            if cond.wait(T):
                woken.append(i)

    threads = [threading.Thread(target=sleeper, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + T
    while len(cond._sleepers or ()) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    with cond:
        cond.notify(2)
    deadline = time.monotonic() + T
    while len(woken) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert len(woken) == 2 and len(cond._sleepers) == 1
    with cond:
        cond.notify_all()
    for t in threads:
        t.join(T)
    assert sorted(woken) == [0, 1, 2]


def test_wait_as_completed_and_asyncio_see_task_futures():
    a, b, c = TaskFuture(), TaskFuture(), TaskFuture()
    for f in (a, b, c):
        f.set_running_or_notify_cancel()
    threading.Timer(0.02, b.set_result, args=("b",)).start()
    done, pending = wait([a, b, c], timeout=T, return_when=FIRST_COMPLETED)
    assert done == {b} and pending == {a, c}
    a.set_exception(ValueError("a"))
    c.set_result("c")
    assert {f for f in as_completed([a, b, c], timeout=T)} == {a, b, c}

    async def main():
        d = TaskFuture()
        d.set_running_or_notify_cancel()
        asyncio.get_running_loop().call_later(0.02, d.set_result, "d")
        return await asyncio.wrap_future(d)

    assert asyncio.run(main()) == "d"


def test_ctrl_c_while_waiting_leaves_the_future_usable():
    """A KeyboardInterrupt in a waiting thread (the user's Ctrl-C) ends that wait only:
    its sleeper is taken off the list, and a later wait gets the result."""
    import os
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited ignored
    try:
        fut = TaskFuture()
        fut.set_running_or_notify_cancel()
        threading.Timer(0.05, os.kill, args=(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            fut.result(T)
        assert not fut._condition._sleepers
    finally:
        signal.signal(signal.SIGINT, previous)
    threading.Timer(0.05, fut.set_result, args=(3,)).start()
    assert fut.result(T) == 3


def test_a_timeout_past_what_a_lock_takes_means_no_limit():
    fut = TaskFuture()
    fut.set_running_or_notify_cancel()
    threading.Timer(0.05, fut.set_result, args=(4,)).start()
    assert fut.result(1e308) == 4
    assert fut.exception(float("inf")) is None


class _SlowAnswer:
    """A Pending answer (see _future.Pending) whose unpickling the test controls:
    it waits for ``go``; the first ``interrupt`` decodes raise KeyboardInterrupt
    (a reader's Ctrl-C in the middle of a __setstate__)."""

    def __init__(self, interrupt: int = 0) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.decodes: list[int] = []
        self.interrupt = interrupt

    def decode(self, fut: object, keep_bytes: bool) -> tuple[bool, object]:
        self.decodes.append(threading.get_ident())
        self.started.set()
        assert self.go.wait(T)
        if self.interrupt:
            self.interrupt -= 1
            raise KeyboardInterrupt
        return True, ["the", "result"]


def _ended_with(answer: _SlowAnswer) -> TaskFuture:
    fut = TaskFuture()
    fut.set_running_or_notify_cancel()
    assert fut.end_encoded(answer, error=False)
    return fut


def test_readers_wait_for_the_one_unpickling_and_done_does_not():
    """One reader unpickles (user code, maybe slow) outside the condition: a second
    reader waits for its outcome instead of unpickling again, and done() or repr()
    from a third thread do not wait at all."""
    answer = _SlowAnswer()
    fut = _ended_with(answer)
    got: list[object] = []
    first = threading.Thread(target=lambda: got.append(fut.result()))
    first.start()
    assert answer.started.wait(T)
    second = threading.Thread(target=lambda: got.append(fut.result()))
    second.start()
    deadline = time.monotonic() + T
    while not fut._condition._sleepers:  # the second reader sleeps on the condition
        assert time.monotonic() < deadline
        time.sleep(0.001)
    checked: list[object] = []
    looker = threading.Thread(target=lambda: checked.append((fut.done(), repr(fut))))
    looker.start()
    looker.join(T)
    assert checked and checked[0][0] is True and "not unpickled yet" in checked[0][1]
    answer.go.set()
    first.join(T)
    second.join(T)
    assert got == [["the", "result"]] * 2 and got[0] is got[1]
    assert len(answer.decodes) == 1
    assert fut.result() is got[0] and fut._condition._sleepers is None


def test_an_interrupted_unpickling_is_taken_over_by_the_next_reader():
    answer = _SlowAnswer(interrupt=1)
    fut = _ended_with(answer)
    errors: list[BaseException] = []

    def interrupted_reader() -> None:
        try:
            fut.result()
        except KeyboardInterrupt as exc:
            errors.append(exc)

    first = threading.Thread(target=interrupted_reader)
    first.start()
    assert answer.started.wait(T)
    got: list[object] = []
    second = threading.Thread(target=lambda: got.append(fut.result()))
    second.start()
    deadline = time.monotonic() + T
    while not fut._condition._sleepers:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    answer.go.set()  # the first is interrupted; the waiting second takes over
    first.join(T)
    second.join(T)
    assert len(errors) == 1 and got == [["the", "result"]]
    assert len(answer.decodes) == 2 and answer.decodes[1] != answer.decodes[0]
    assert fut.result() == ["the", "result"] and fut.exception() is None


class _SelfReadingAnswer:
    """A Pending answer whose unpickling reads its own future (a __setstate__ that
    reaches its future through some global): an error, not a thread that waits
    for itself forever."""

    def __init__(self) -> None:
        self.seen: list[BaseException] = []

    def decode(self, fut: TaskFuture, keep_bytes: bool) -> tuple[bool, object]:
        try:
            fut.result()
        except RuntimeError as exc:
            self.seen.append(exc)
        return True, "done"


def test_an_unpickling_that_reads_its_own_future_gets_an_error_not_a_hang():
    answer = _SelfReadingAnswer()
    fut = TaskFuture()
    fut.set_running_or_notify_cancel()
    assert fut.end_encoded(answer, error=False)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(fut.result()), daemon=True)
    reader.start()
    reader.join(T)
    assert not reader.is_alive(), "the unpickling waited for itself"
    assert got == ["done"]
    assert len(answer.seen) == 1 and "being unpickled" in str(answer.seen[0])
