"""Limits of the machine and of the user's code meet the pool: exhaustion of fds or
processes degrades the pool (never fails work a worker could run), a hung initializer
is bounded, and the drop-in details that embedded Pythons and shutdown rely on.

Tests that lower process limits do it in a subprocess driver (tests/scripts/), never
in the test process itself.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import wait

import pytest
from _resource_tasks import gated, noop, touch, wait_path

from pgexecutor import ProcessGroupExecutor

T = 60  # generous bound for anything that should take well under a second


def shutdown_within(ex: ProcessGroupExecutor, seconds: float) -> bool:
    """shutdown(wait=True) from a thread; False (and the workers killed) if it is
    still waiting after ``seconds``."""
    t = threading.Thread(target=ex.shutdown, kwargs={"wait": True}, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        ex.kill_workers()
        t.join(T)
        return False
    return True

# ----------------------------------------------------------------- cancel_futures


def test_shutdown_cancel_futures_cancels_every_task_not_yet_begun(tmp_path):
    """Two tasks running, three submitted behind them: the three are cancelled, every
    time, wherever they were (queued, or written ahead into a busy worker's pipe after
    a run of tiny tasks made the pool prefetch), and the two running ones complete,
    as CPython's semantics say (a task that began runs to completion)."""
    for loop in range(20):
        ex = ProcessGroupExecutor(max_workers=2)
        try:
            assert list(ex.map(noop, range(200))) == list(range(200))  # tiny: prefetching
            marks = [str(tmp_path / f"{loop}-started-{i}") for i in range(2)]
            gate = str(tmp_path / f"{loop}-gate")
            running = [ex.submit(gated, m, gate, "done") for m in marks]
            queued = [ex.submit(noop, i) for i in range(3)]
            assert all(wait_path(m) for m in marks)
            ex.shutdown(wait=False, cancel_futures=True)
            done, _ = wait(queued, timeout=T)
            assert len(done) == 3, f"loop {loop}: the queued tasks did not end"
            assert [f.cancelled() for f in queued] == [True] * 3, (
                f"loop {loop}: {[f._state for f in queued]}"
            )
            assert not any(f.done() for f in running)
            touch(gate)
            assert [f.result(timeout=T) for f in running] == ["done", "done"]
            assert ex.stats()["cancelled"] == 3
        finally:
            ex.shutdown(wait=True)


# ----------------------------------------------------------------- initializer_timeout


def test_hung_initializer_times_out_and_fails_the_waiting_task(tmp_path):
    from _resource_tasks import hang_forever

    from pgexecutor import WorkerInitializerError

    ex = ProcessGroupExecutor(1, initializer=hang_forever, initializer_timeout=0.5)
    try:
        fs = [ex.submit(noop, i) for i in range(3)]
        for f in fs:
            err = f.exception(timeout=T)
            assert isinstance(err, WorkerInitializerError), repr(err)
            assert "initializer_timeout=0.5s" in str(err)
        # where it hung: the worker's stack, taken just before the kill
        assert "hang_forever" in (fs[0].exception().remote_traceback or "")
    finally:
        assert shutdown_within(ex, T)


def test_initializer_timeout_defaults_to_task_timeout(tmp_path):
    from _resource_tasks import hang_forever

    from pgexecutor import WorkerInitializerError

    ex = ProcessGroupExecutor(1, initializer=hang_forever, task_timeout=0.5)
    try:
        err = ex.submit(noop, 1).exception(timeout=T)
        assert isinstance(err, WorkerInitializerError) and "initializer_timeout=0.5s" in str(err)
    finally:
        ex.shutdown(wait=True)


def test_initializer_within_its_timeout_runs_tasks(tmp_path):
    from _resource_tasks import mark_init

    ex = ProcessGroupExecutor(2, initializer=mark_init, initargs=(str(tmp_path),),
                              initializer_timeout=30)
    with ex:
        assert list(ex.map(noop, range(20))) == list(range(20))
    assert os.listdir(tmp_path)


@pytest.mark.parametrize(
    "value, error",
    [(float("nan"), ValueError), (-1, ValueError), (0, ValueError), (True, TypeError),
     ("1", TypeError), (b"1", TypeError)],
)
def test_initializer_timeout_is_checked(value, error):
    with pytest.raises(error, match="initializer_timeout"):
        ProcessGroupExecutor(1, initializer=noop, initializer_timeout=value)


def test_initializer_timeout_none_or_inf_means_no_limit():
    for value in (None, float("inf")):
        ex = ProcessGroupExecutor(1, task_timeout=5, initializer_timeout=value)
        assert ex._manager.cfg.init_timeout is None
        ex.shutdown()
    ex = ProcessGroupExecutor(1, task_timeout=5)
    assert ex._manager.cfg.init_timeout == 5
    ex.shutdown()


def test_shutdown_returns_although_one_initializer_hangs_without_a_timeout(tmp_path):
    """No initializer_timeout: one worker's initializer hangs, the other's does not.
    Its tasks move to the ready worker, and shutdown(wait=True) stops the worker still
    starting (it has nothing to do) instead of waiting for it forever."""
    from _resource_tasks import hang_unless_first

    ex = ProcessGroupExecutor(2, initializer=hang_unless_first, initargs=(str(tmp_path / "first"),))
    fs = [ex.submit(noop, i) for i in range(10)]
    assert shutdown_within(ex, 30), "shutdown(wait=True) waited for a hung initializer"
    results = [f.result(timeout=0) for f in fs]
    assert results == list(range(10))
