"""``map(..., buffersize=N)`` (Python 3.14's meaning) and per-position exceptions.

With ``buffersize=N`` at most N tasks (chunks, with ``chunksize > 1``) are submitted
ahead of the results the caller has taken, so inputs are read as results are
consumed and an endless iterable works in bounded memory. The inputs here count how
many items were read, which is what the tests check; nothing depends on timing.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import TimeoutError as FuturesTimeoutError

import pytest

from pgexecutor import ProcessGroupExecutor, WorkerCrashedError

pytestmark = pytest.mark.timeout(90)

T = 30  # a safety net against hangs, never a performance bound


def square(x):
    return x * x


def divide(a, b):
    return a / b


def exit_with(code):
    os._exit(code)


class Counted:
    """An input iterable that records how many items were taken from it."""

    def __init__(self, items=None):
        self.items = itertools.count() if items is None else iter(items)
        self.taken = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        self.taken += 1
        return item


class Bar:
    """The smallest bar ``progress=`` accepts; records what it was told."""

    def __init__(self):
        self.total = None
        self.n = 0
        self.lock = threading.Lock()

    def update(self, n):
        with self.lock:
            self.n += n

    def set_postfix(self, mapping, refresh=True):
        pass


@pytest.fixture
def ex():
    with ProcessGroupExecutor(2) as executor:
        yield executor


# ----------------------------------------------------------------- arguments


@pytest.mark.parametrize("view", [False, True], ids=["executor", "options-view"])
@pytest.mark.parametrize("chunksize", [1, 3])
def test_buffersize_is_checked_like_python_3_14_before_anything_runs(view, chunksize):
    with ProcessGroupExecutor(1) as executor:
        target = executor.options(retries=0) if view else executor
        for bad in (0, -1):
            with pytest.raises(ValueError, match=r"buffersize must be None or > 0"):
                target.map(square, range(4), chunksize=chunksize, buffersize=bad)
        for bad in ("2", 2.0):
            with pytest.raises(TypeError, match="buffersize must be an integer or None"):
                target.map(square, range(4), chunksize=chunksize, buffersize=bad)
        assert executor.stats()["submitted"] == 0
        assert list(target.map(square, range(4), chunksize=chunksize, buffersize=None)) == [
            0, 1, 4, 9,
        ]


# ----------------------------------------------------------------- bounded reading


@pytest.mark.parametrize("buffersize", [1, 2, 5])
def test_inputs_are_read_only_as_results_are_taken(ex, buffersize):
    src = Counted()
    it = ex.map(square, src, buffersize=buffersize)
    assert src.taken == buffersize  # submitted up front, nothing more
    for k in range(1, 8):
        assert next(it) == (k - 1) ** 2
        # one more was read (and submitted) before waiting for each result
        assert src.taken == buffersize + k
    it.close()


def test_buffer_counts_chunks_with_chunksize(ex):
    src = Counted()
    it = ex.map(square, src, chunksize=3, buffersize=2)
    assert src.taken == 2 * 3  # two chunks of three
    got = [next(it) for _ in range(7)]  # three chunks reached: one more read each time
    assert got == [x * x for x in range(7)]
    assert src.taken == (2 + 3) * 3
    it.close()


def test_endless_input_works(ex):
    before = ex.stats()["submitted"]
    got = list(itertools.islice(ex.map(square, itertools.count(), buffersize=4), 200))
    assert got == [x * x for x in range(200)]
    assert ex.stats()["submitted"] - before == 200 + 4


def test_several_iterables_stop_at_the_shortest(ex):
    src = Counted(range(100))
    got = list(ex.map(divide, src, itertools.repeat(2, 5), buffersize=3))
    assert got == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert src.taken <= 6  # zip reads one past the shortest, as zip does


def test_empty_and_no_iterables(ex):
    assert list(ex.map(square, [], buffersize=2)) == []
    assert list(ex.map(square, buffersize=2)) == []


def test_map_without_consuming_reads_only_the_buffer():
    # Python 3.14's test_map_buffersize_when_buffer_is_full, on this executor.
    ints = iter(range(10))
    executor = ProcessGroupExecutor(1)
    executor.map(str, ints, buffersize=2)
    executor.shutdown(wait=True)
    assert next(ints) == 2


# ----------------------------------------------------------------- early exit


def _durations(src):
    """First task short, the rest slow: while the first result is taken, the later
    ones are still running or queued (2 workers), so closing has something to cancel.
    Not instant: after a 0 s task the pool would write the next tasks ahead into the
    workers' pipes (tiny tasks go deep), and a task handed over is RUNNING, as in
    ProcessPoolExecutor's call queue: cancel() cannot take it back."""
    return (0.3 if i == 0 else 1.0 for i in src)


def test_closing_the_iterator_cancels_what_is_pending_and_reads_no_more():
    src = Counted()
    with ProcessGroupExecutor(2) as executor:
        it = executor.map(time.sleep, _durations(src), buffersize=3)
        assert next(it) is None
        taken = src.taken
        assert taken == 4
        it.close()
        with pytest.raises(StopIteration):
            next(it)
    stats = executor.stats()
    assert src.taken == taken == stats["submitted"]
    # two were running when the iterator was closed; the fourth had no worker yet
    assert stats["cancelled"] >= 1
    assert stats["completed"] + stats["cancelled"] == stats["submitted"]


def test_break_then_drop_cancels_what_is_pending():
    src = Counted()
    with ProcessGroupExecutor(2) as executor:
        for _ in executor.map(time.sleep, _durations(src), buffersize=3):
            break  # the iterator is dropped here (refcounting closes it)
        taken = src.taken
    stats = executor.stats()
    assert src.taken == taken == stats["submitted"] == 4
    assert stats["cancelled"] >= 1
    assert stats["completed"] + stats["cancelled"] == stats["submitted"]


# ----------------------------------------------------------------- with the other options


def test_timeout_raises_from_the_iterator(ex):
    it = ex.map(time.sleep, [0, 0, 20, 0], timeout=2, buffersize=1)
    assert next(it) is None
    assert next(it) is None
    with pytest.raises(FuturesTimeoutError):
        next(it)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_return_exceptions_and_raising(ex, chunksize):
    args = ([1, 2, 3, 4, 5], [1, 1, 0, 1, 0])
    got = list(ex.map(divide, *args, chunksize=chunksize, buffersize=1, return_exceptions=True))
    assert got[:2] == [1.0, 2.0] and got[3] == 4.0
    assert isinstance(got[2], ZeroDivisionError) and isinstance(got[4], ZeroDivisionError)
    it = ex.map(divide, *args, chunksize=chunksize, buffersize=1)
    assert [next(it), next(it)] == [1.0, 2.0]
    with pytest.raises(ZeroDivisionError):
        next(it)


@pytest.mark.parametrize("chunksize", [1, 4])
def test_progress_counts_every_item_without_a_known_total(ex, chunksize):
    bar = Bar()
    got = list(ex.map(square, range(10), chunksize=chunksize, buffersize=2, progress=bar))
    assert got == [x * x for x in range(10)]
    assert bar.n == 10
    assert bar.total is None  # the map cannot know how many inputs there are


def test_options_view_takes_buffersize(ex):
    src = Counted()
    it = ex.options(task_timeout=30).map(square, src, buffersize=2)
    assert src.taken == 2
    assert next(it) == 0 and src.taken == 3
    it.close()


# ----------------------------------------------------------------- one exception per position


@pytest.mark.parametrize("buffersize", [None, 1])
def test_each_position_of_a_failed_chunk_gets_its_own_exception(ex, buffersize):
    # The chunk's worker dies: one future failed, but each of its items is a position.
    got = list(ex.map(exit_with, [3, 3, 3], chunksize=3, buffersize=buffersize,
                      return_exceptions=True))
    assert all(type(e) is WorkerCrashedError for e in got), got
    assert len({id(e) for e in got}) == 3
    assert {(e.pid, e.exitcode, str(e)) for e in got} == {(got[0].pid, 3, str(got[0]))}


def test_each_position_of_an_unpicklable_chunk_gets_its_own_exception(ex):
    lock = threading.Lock()
    got = list(ex.map(id, [lock, lock], chunksize=2, return_exceptions=True))
    assert all(type(e) is TypeError and getattr(e, "pgexecutor_stage", None) for e in got), got
    assert got[0] is not got[1]
    assert str(got[0]) == str(got[1])
    # and two unpicklable submits never share an instance either
    first, second = (ex.submit(id, lock).exception(timeout=T) for _ in range(2))
    assert first is not second
