"""Cancelling means stopping (issue 21): ``cancel_running``, ``await ex.run()``,
abandoned maps, and the race between a cancel and a task's result.

Every test starts real processes; the autouse fixture in conftest.py proves that no
process of any worker group survived, and tests whose tasks start children check
those by pid and start time. Time bounds are safety nets, never performance claims.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError, as_completed, wait

import pytest
from conftest import assert_tree_gone, read_report, wait_gone

from pgexecutor import ProcessGroupExecutor

pytestmark = pytest.mark.timeout(90)

T = 60  # result() timeout: a safety net against hangs, never a performance bound


# ----------------------------------------------------------------- task functions
# (module level: importable by reference in the workers)


def square(x):
    return x * x


def fail(msg):
    raise ValueError(msg)


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def _report(path, pids):
    procs = [[p, _ctime(p)] for p in pids]
    with open(path + ".tmp", "w") as f:
        json.dump({"procs": procs}, f)
    os.replace(path + ".tmp", path)


def _ctime(pid):
    import psutil

    return psutil.Process(pid).create_time()


def hang_with_finally(path):
    """Reports its pid, hangs; its finally block writes ``path + '.finally'``."""
    try:
        _report(path, [os.getpid()])
        time.sleep(300)
    finally:
        with open(path + ".finally", "w") as f:
            f.write("ran")


def hang_with_child(path):
    """Starts a child that sleeps, reports both processes, hangs."""
    child = subprocess.Popen(["sleep", "300"])
    _report(path, [os.getpid(), child.pid])
    time.sleep(300)


def hang_ignoring_signals(path):
    """Ignores SIGINT and SIGTERM: only the SIGKILL at the end of kill_grace stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _report(path, [os.getpid()])
    time.sleep(300)


def hang_swallowing_interrupt(path):
    """Catches KeyboardInterrupt and goes on: the SIGTERM after it stops the task."""
    _report(path, [os.getpid()])
    while True:
        try:
            time.sleep(300)
        except KeyboardInterrupt:
            pass


def hang_item(path, i):
    """A map item: the second reports and hangs, the others return at once."""
    if i == 1:
        hang_with_finally(path)
    return i


def hang_once(path, i):
    """Item 1 hangs the first time only (until its finally ran); reports whether the
    stopped run happened before."""
    if i == 1 and not os.path.exists(path + ".finally"):
        hang_with_finally(path)
    return i, os.path.exists(path + ".finally")


def chunk_item(path, i):
    """Item 3 hangs; the items after it leave a mark if they ever start."""
    if i == 3:
        hang_with_finally(path)
    if i > 3:
        open(f"{path}.after{i}", "w").close()
    return i


# ----------------------------------------------------------------- helpers


def started(path, timeout=T):
    return read_report(str(path), timeout)


def wait_file(path, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------- 1. the setting


@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0])
def test_cancel_running_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="cancel_running must be True or False"):
        ProcessGroupExecutor(max_workers=1, cancel_running=bad)
    with ProcessGroupExecutor(max_workers=1) as ex:
        with pytest.raises(TypeError, match="cancel_running must be True or False"):
            ex.options(cancel_running=bad)


def test_settings_carry_cancel_running():
    with ProcessGroupExecutor(max_workers=1, cancel_running=True) as ex:
        assert ex.task_settings.cancel_running is True
        view = ex.options(cancel_running=False)
        assert view.cancel_running is False
        assert view.options(task_timeout=5).cancel_running is False
        assert ex.options(task_timeout=5).cancel_running is True


def test_default_cancel_of_a_running_task_returns_false(tmp_path):
    """The standard meaning: cancel() of a running future refuses; the task finishes."""
    path = str(tmp_path / "r")
    with ProcessGroupExecutor(max_workers=1) as ex:
        fut = ex.submit(sleep_then, 0.5, "done")
        while not fut.running():
            time.sleep(0.01)
        assert fut.cancel() is False
        assert fut.result(timeout=T) == "done"
    del path


# ----------------------------------------------------------------- 1. stopping


@pytest.mark.parametrize("how", ["constructor", "options"])
def test_cancel_stops_a_running_task_its_finally_runs(tmp_path, how):
    path = str(tmp_path / "task")
    calls = []
    kw = {"cancel_running": True} if how == "constructor" else {}
    with ProcessGroupExecutor(max_workers=1, kill_grace=5.0, **kw) as ex:
        sub = ex if how == "constructor" else ex.options(cancel_running=True)
        fut = sub.submit(hang_with_finally, path)
        queued = [ex.submit(square, i) for i in range(3)]  # behind it, untouched
        report = started(path)
        (pid,) = report["procs"][0][:1]
        fut.add_done_callback(calls.append)
        waiter_done = []

        def waiter():
            done, _ = wait([fut], timeout=T)
            waiter_done.append(fut in done)

        t = threading.Thread(target=waiter)
        t.start()
        assert fut.cancel() is True
        # Told at once: cancelled, the callback ran once, waiters woken.
        assert fut.cancelled() and fut.done()
        assert calls == [fut]
        t.join(T)
        assert waiter_done == [True]
        assert next(as_completed([fut], timeout=T)) is fut
        with pytest.raises(CancelledError):
            fut.result(timeout=0)
        # The task saw KeyboardInterrupt: its finally block ran, then it was gone.
        assert wait_file(path + ".finally"), "the task's finally block never ran"
        assert wait_gone(pid), "the cancelled task's worker survived"
        # A replacement took over; the queued tasks ran as usual.
        assert [q.result(timeout=T) for q in queued] == [0, 1, 4]
        assert pid not in ex.worker_pids()
        assert ex.submit(os.getpid).result(timeout=T) != pid
        assert fut.cancel() is True  # cancelled already: as the standard library says
        assert calls == [fut]
        stats = ex.stats()
    assert stats["cancelled"] == 1 and stats["workers_killed"] == 1


def test_cancel_stops_the_whole_tree(tmp_path):
    path = str(tmp_path / "tree")
    with ProcessGroupExecutor(max_workers=1, cancel_running=True, kill_grace=2.0) as ex:
        fut = ex.submit(hang_with_child, path)
        report = started(path)
        assert fut.cancel() is True
        assert_tree_gone(report, 15)


@pytest.mark.parametrize("task", [hang_ignoring_signals, hang_swallowing_interrupt])
def test_sigint_escalates_within_kill_grace(tmp_path, task):
    """A task that ignores SIGINT (and SIGTERM) is still stopped: SIGTERM then SIGKILL
    follow within kill_grace."""
    path = str(tmp_path / "stubborn")
    with ProcessGroupExecutor(max_workers=1, cancel_running=True, kill_grace=1.0) as ex:
        fut = ex.submit(task, path)
        report = started(path)
        assert fut.cancel() is True
        assert fut.cancelled()
        assert_tree_gone(report, 15)
        assert ex.submit(square, 3).result(timeout=T) == 9


def test_keyboardinterrupt_of_the_stop_is_not_the_outcome(tmp_path):
    """The KeyboardInterrupt the task sees is the stop, not its result: the future is
    cancelled, and a with block / map around it do not take it for Ctrl-C."""
    path = str(tmp_path / "ki")
    with ProcessGroupExecutor(max_workers=2, cancel_running=True) as ex:
        fut = ex.submit(hang_with_finally, path)
        other = ex.submit(sleep_then, 0.3, "other")
        started(path)
        fut.cancel()
        assert wait_file(path + ".finally")
        time.sleep(0.2)  # the worker's ERROR frame (its KeyboardInterrupt) arrives late
        assert fut.cancelled()
        with pytest.raises(CancelledError):
            fut.exception(timeout=0)
        assert other.result(timeout=T) == "other"
    assert ex.stats()["failed"] == 0


def test_cancel_of_a_finished_future_keeps_its_result():
    with ProcessGroupExecutor(max_workers=1, cancel_running=True) as ex:
        fut = ex.submit(square, 7)
        assert fut.result(timeout=T) == 49
        assert fut.cancel() is False
        assert fut.result(timeout=0) == 49


def test_cancel_of_a_queued_future_is_as_before():
    with ProcessGroupExecutor(max_workers=1, cancel_running=True) as ex:
        first = ex.submit(sleep_then, 0.5, "first")
        queued = ex.submit(square, 2)
        assert queued.cancel() is True
        assert queued.cancelled()
        assert first.result(timeout=T) == "first"
        assert ex.stats()["workers_killed"] == 0


# ----------------------------------------------------------------- 2. nothing lost


def _running_future(stops):
    from pgexecutor._future import TaskFuture

    fut = TaskFuture(stop=stops.append)
    assert fut.set_running_or_notify_cancel()
    return fut


def test_taskfuture_cancel_of_running_decides_against_a_late_result():
    """The future's own protocol: cancel() wins over a RUNNING future at once (the
    pool asked to stop it once, callbacks once); the outcome arriving afterwards is
    dropped quietly instead of raising InvalidStateError in the pool's thread."""
    stops, calls = [], []
    fut = _running_future(stops)
    fut.add_done_callback(calls.append)
    assert fut.cancel() is True
    assert stops == [fut] and calls == [fut]
    fut.set_result(42)  # lost the race: quiet
    fut.set_exception(ValueError("late"))
    assert fut.cancelled()
    assert fut.cancel() is True
    assert stops == [fut] and calls == [fut]


def test_taskfuture_result_first_keeps_it():
    stops, calls = [], []
    fut = _running_future(stops)
    fut.add_done_callback(calls.append)
    fut.set_result(42)
    assert fut.cancel() is False
    assert fut.result(0) == 42 and stops == [] and calls == [fut]
    from concurrent.futures import InvalidStateError

    with pytest.raises(InvalidStateError):
        fut.set_result(1)  # a second outcome is still a bug, cancelled or not


def test_taskfuture_without_stop_hook_keeps_the_standard_meaning():
    from pgexecutor._future import TaskFuture

    fut = TaskFuture()
    fut.set_running_or_notify_cancel()
    assert fut.cancel() is False
    assert fut.running()


def test_many_cancels_race_finishing_tasks():
    """300 tiny tasks while 4 threads cancel them at random: each future ends done,
    either cancelled or with its correct result, and each callback runs exactly once."""
    n = 300
    counts = [0] * n
    lock = threading.Lock()

    def counter(i):
        def cb(_f):
            with lock:
                counts[i] += 1
        return cb

    with ProcessGroupExecutor(max_workers=2, cancel_running=True, kill_grace=0.5) as ex:
        futs = []
        for i in range(n):
            f = ex.submit(square, i)
            f.add_done_callback(counter(i))
            futs.append(f)
        answers: list[list[tuple[int, bool]]] = [[] for _ in range(4)]

        def canceller(k):
            rng = random.Random(k)
            order = list(range(n))
            rng.shuffle(order)
            for i in order[: n // 2]:
                answers[k].append((i, futs[i].cancel()))

        threads = [threading.Thread(target=canceller, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        done, not_done = wait(futs, timeout=T)
        assert not not_done, f"{len(not_done)} futures left pending"
        for i, f in enumerate(futs):
            if f.cancelled():
                continue
            assert f.result(timeout=0) == i * i
        for k in range(4):
            for i, said in answers[k]:
                # cancel() True means cancelled; False means it finished with its result
                assert said == futs[i].cancelled(), (i, said)
        assert ex.submit(square, 5).result(timeout=T) == 25
    time.sleep(0.1)  # callbacks of the last futures ran before shutdown returned
    assert counts == [1] * n


# ----------------------------------------------------------------- 3. asyncio


def test_run_returns_the_result_or_raises():
    async def main(ex):
        assert await ex.run(square, 6) == 36
        assert await ex.options(task_timeout=30).run(square, 7) == 49
        with pytest.raises(ValueError, match="boom"):
            await ex.run(fail, "boom")

    with ProcessGroupExecutor(max_workers=1) as ex:
        asyncio.run(main(ex))


@pytest.mark.parametrize("view", [False, True])
def test_run_wait_for_timeout_stops_the_tree(tmp_path, view):
    """Whatever cancel_running says (False here), a cancelled await stops the task."""
    path = str(tmp_path / "aw")

    async def main(ex):
        sub = ex.options(task_timeout=600) if view else ex
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(sub.run(hang_with_child, path), timeout=1.0)

    with ProcessGroupExecutor(max_workers=1, kill_grace=2.0) as ex:
        asyncio.run(main(ex))
        report = started(path, timeout=5)
        assert_tree_gone(report, 15)
        assert ex.submit(square, 4).result(timeout=T) == 16


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup is 3.11+")
def test_run_taskgroup_sibling_failure_stops_the_task(tmp_path):
    path = str(tmp_path / "tg")

    async def failing_sibling():
        while not os.path.exists(path):
            await asyncio.sleep(0.02)
        raise RuntimeError("sibling failed")

    async def main(ex):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(ex.run(hang_with_child, path))
            tg.create_task(failing_sibling())

    with ProcessGroupExecutor(max_workers=1, kill_grace=2.0) as ex:
        with pytest.raises(Exception) as info:  # an ExceptionGroup (3.11+)
            asyncio.run(main(ex))
        assert info.group_contains(RuntimeError, match="sibling failed")
        assert_tree_gone(read_report(path), 15)


def test_run_in_executor_cancellation_with_cancel_running(tmp_path):
    path = str(tmp_path / "rie")

    async def main(ex):
        loop = asyncio.get_running_loop()
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(loop.run_in_executor(ex, hang_with_child, path), 1.0)

    with ProcessGroupExecutor(max_workers=1, cancel_running=True, kill_grace=2.0) as ex:
        asyncio.run(main(ex))
        assert_tree_gone(started(path, timeout=5), 15)


# ----------------------------------------------------------------- 4. abandoned maps


@pytest.mark.parametrize("how", ["break", "exception", "gc"])
@pytest.mark.parametrize("buffersize", [None, 2])
def test_abandoned_map_stops_its_running_tasks(tmp_path, how, buffersize):
    """The map's iterator is abandoned while item 1 runs (item 0 was taken): the
    running task is stopped (its finally runs), the queued ones are cancelled."""
    path = str(tmp_path / "m")
    with ProcessGroupExecutor(max_workers=2, cancel_running=True, kill_grace=2.0) as ex:
        args = ([path] * 6, range(6))
        if how == "break":
            for i in ex.map(hang_item, *args, buffersize=buffersize):
                assert i == 0
                report = started(path)
                break
        elif how == "exception":
            with pytest.raises(KeyError):
                for _ in ex.map(hang_item, *args, buffersize=buffersize):
                    report = started(path)
                    raise KeyError("the loop body failed")
        else:
            it = ex.map(hang_item, *args, buffersize=buffersize)
            assert next(it) == 0
            report = started(path)
            del it
            gc.collect()
        assert wait_file(path + ".finally"), "the running item's finally never ran"
        assert_tree_gone(report, 15)
        assert ex.submit(square, 2).result(timeout=T) == 4
        assert ex.stats()["cancelled"] >= 1


def test_abandoned_map_without_cancel_running_lets_the_running_task_finish(tmp_path):
    """Default: as the standard library, only tasks not started are cancelled."""
    with ProcessGroupExecutor(max_workers=1) as ex:
        for _ in ex.map(sleep_then, [0.0, 0.5, 0.0, 0.0], ["a", "b", "c", "d"]):
            deadline = time.monotonic() + T
            while ex.stats()["completed"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)  # "b" has begun
            break
        ex.shutdown(wait=True)
        stats = ex.stats()
    # "b" ran to its end: no worker was stopped. (Tasks written ahead into the
    # worker's pipe are RUNNING too and finish, as in the standard library.)
    assert stats["workers_killed"] == 0
    assert stats["completed"] >= 2 and stats["completed"] + stats["cancelled"] == 4


def test_abandoned_journaled_map_stops_running_tasks_they_run_next_time(tmp_path):
    """A journaled map left early stops its running task (cancel_running=True); the
    stopped task is not recorded as finished, so the next run of the map runs it."""
    db = str(tmp_path / "sweep.db")
    path = str(tmp_path / "j")
    args = ([path] * 4, range(4))
    with ProcessGroupExecutor(max_workers=2, cancel_running=True, kill_grace=2.0) as ex:
        for first in ex.map(hang_once, *args, journal=db):
            assert first == (0, False)
            report = started(path)
            break
        assert wait_file(path + ".finally"), "the running item's finally never ran"
        assert_tree_gone(report, 15)
        again = list(ex.map(hang_once, *args, journal=db))
    assert again[0] == (0, False)  # recorded the first time: not run again
    assert again[1] == (1, True)  # stopped, not recorded: run again, after the stop
    assert [i for i, _ in again] == [0, 1, 2, 3]


def test_stopped_chunk_starts_no_further_item(tmp_path):
    """chunksize > 1: stopping a chunk stops it whole; the items after the one that
    saw KeyboardInterrupt do not start (each item's errors are otherwise its own)."""
    path = str(tmp_path / "c")
    with ProcessGroupExecutor(max_workers=1, cancel_running=True, kill_grace=2.0) as ex:
        it = ex.map(chunk_item, [path] * 6, range(6), chunksize=3)
        assert [next(it), next(it), next(it)] == [0, 1, 2]
        report = started(path)
        del it
        gc.collect()
        assert wait_file(path + ".finally"), "the running item's finally never ran"
        assert_tree_gone(report, 15)
        assert ex.submit(square, 3).result(timeout=T) == 9
    assert not [n for n in os.listdir(tmp_path) if ".after" in n]
