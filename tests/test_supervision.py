"""Supervision: the detector protocol, learned time limits (``task_timeout="auto"``),
and kills that never wait for a stack dump that cannot come.

Tests that start processes are proven leak-free by the autouse fixture in conftest.py.
"""

from __future__ import annotations

import functools
import math
import pickle
import time
from concurrent.futures import wait

import _supervision_tasks as tasks
import pytest

from pgexecutor import (
    AutoTimeout,
    ProcessGroupExecutor,
    TaskStalledError,
    TaskTimeoutError,
    task_info,
)
from pgexecutor._frontend import ExecutorOptions
from pgexecutor._ledger import WorkItem
from pgexecutor._settings import TaskSettings
from pgexecutor._supervision import RUN_TIMES_KEPT, Kill, RunTimes, Supervisor, task_key
from pgexecutor._worker import run_chunk

pytestmark = pytest.mark.timeout(180)


# ----------------------------------------------------------------- settings


@pytest.mark.parametrize("value", ["fast", "Auto", ""])
def test_a_string_other_than_auto_is_refused(value):
    with pytest.raises(ValueError, match="'auto'"):
        ProcessGroupExecutor(1, task_timeout=value)
    with ProcessGroupExecutor(1) as ex, pytest.raises(ValueError, match="'auto'"):
        ex.options(task_timeout=value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factor": 0}, "factor"),
        ({"factor": -2.0}, "factor"),
        ({"factor": math.nan}, "factor"),
        ({"factor": math.inf}, "factor"),
        ({"quantile": 0}, "quantile"),
        ({"quantile": 1.01}, "quantile"),
        ({"quantile": math.nan}, "quantile"),
        ({"min_samples": 0}, "min_samples"),
        ({"min_samples": 2.5}, "min_samples"),
        ({"floor": -1}, "floor"),
        ({"floor": math.nan}, "floor"),
        ({"initial": 0}, "initial"),
        ({"initial": math.nan}, "initial"),
    ],
)
def test_bad_auto_timeout_values_raise_value_error_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoTimeout(**kwargs)


def test_auto_timeout_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="factor"):
        AutoTimeout(factor="10")
    with pytest.raises(TypeError, match="min_samples"):
        AutoTimeout(min_samples=None)


def test_auto_in_constructor_and_options():
    with ProcessGroupExecutor(1, task_timeout="auto") as ex:
        assert ex.task_settings.auto == AutoTimeout()
        assert ex.task_settings.timeout is None and ex.task_settings.watched
        fixed = ex.options(task_timeout=5)
        assert fixed.task_timeout == 5 and fixed.task_settings.auto is None
        custom = AutoTimeout(factor=3, quantile=1, min_samples=2, initial=4, floor=0)
        learned = ex.options(task_timeout=custom)
        assert isinstance(learned, ExecutorOptions) and learned.task_timeout == custom
        assert learned.options(retries=1).task_timeout == custom  # kept by other options
        assert ex.options(task_timeout=None).task_settings.watched is False
    assert AutoTimeout(initial=math.inf).initial is None  # inf: no limit, as task_timeout
    assert TaskSettings.checked(max_memory=10).watched


# ----------------------------------------------------------------- the learner


def _item(settings: TaskSettings, key: str = "m.f", weight: int = 1) -> WorkItem:
    return WorkItem(None, b"", settings, key, weight)  # type: ignore[arg-type]


def test_learned_limit_is_initial_until_min_samples_then_factor_times_quantile():
    auto = AutoTimeout(factor=10, quantile=0.5, min_samples=4, initial=7.0, floor=0.0)
    settings = TaskSettings(auto=auto)
    learner = RunTimes()
    item = _item(settings)
    assert learner.limit(item) == 7.0
    for seconds in (0.4, 0.1, 0.3):
        learner.add(_item(settings), seconds)
    assert learner.limit(item) == 7.0  # 3 of 4 samples
    assert "only 3 of the 4" in learner.explain(item)
    learner.add(_item(settings), 0.2)
    # nearest rank: the 0.5 quantile of [0.1, 0.2, 0.3, 0.4] is the 2nd, 0.2
    assert learner.limit(item) == pytest.approx(2.0)
    assert learner.explain(item).startswith("learned: 10 x the 0.5 quantile (0.2 s) of 4 successful")
    learner.add(_item(settings), 5.0)  # recomputed as samples arrive
    assert learner.limit(item) == pytest.approx(3.0)
    other = _item(settings, key="m.g")
    assert learner.limit(other) == 7.0  # per task function


def test_learned_limit_has_a_floor_and_counts_chunks_per_call():
    auto = AutoTimeout(factor=2, quantile=1.0, min_samples=2, floor=1.5)
    settings = TaskSettings(auto=auto)
    learner = RunTimes()
    learner.add(_item(settings), 0.1)
    learner.add(_item(settings, weight=10), 2.0)  # a chunk of 10: 0.2 s per call
    assert learner.limit(_item(settings)) == 1.5  # 2 x 0.2 = 0.4, under the floor
    assert "floor of 1.5 s" in learner.explain(_item(settings))
    assert learner.limit(_item(settings, weight=5)) == pytest.approx(2.0)  # 5 x 2 x 0.2
    initial_none = TaskSettings(auto=AutoTimeout(min_samples=3))
    assert RunTimes().limit(_item(initial_none)) is None


def test_learned_limit_keeps_only_the_newest_run_times():
    settings = TaskSettings(auto=AutoTimeout(factor=1, quantile=1.0, min_samples=1, floor=0))
    learner = RunTimes()
    learner.add(_item(settings), 100.0)
    for _ in range(RUN_TIMES_KEPT):
        learner.add(_item(settings), 1.0)
    assert learner.count("m.f") == RUN_TIMES_KEPT
    assert learner.limit(_item(settings)) == 1.0  # the 100 s outlier aged out


def test_task_key_names_the_function_also_inside_partials_and_chunks():
    key = ("_supervision_tasks.nap", 1)
    assert task_key(tasks.nap, (1,)) == key
    assert task_key(functools.partial(tasks.nap, 1), ()) == key
    assert task_key(run_chunk, (tasks.nap, [(1,), (2,), (3,)])) == ("_supervision_tasks.nap", 3)
    assert task_key(tasks.other_nap, (1,))[0] != key[0]
    assert task_key(len, ([],)) == ("builtins.len", 1)


# ----------------------------------------------------------------- learned limits, live


def _learn(ex, n, seconds=0.01):
    for fut in [ex.submit(tasks.nap, seconds) for _ in range(n)]:
        assert fut.result(timeout=60) == seconds


def test_learned_limit_kills_a_hung_task_and_says_how_it_was_derived():
    auto = AutoTimeout(factor=5, quantile=0.9, min_samples=5, floor=0.5)
    with ProcessGroupExecutor(1, task_timeout=auto, kill_grace=0.2) as ex:
        first = ex.submit(tasks.nap, 0.01)
        first.result(timeout=60)
        assert task_info(first).timeout is None  # no samples yet, initial=None: no limit
        _learn(ex, 4)
        t0 = time.monotonic()
        hung = ex.submit(tasks.nap, 60)
        with pytest.raises(TaskTimeoutError) as ei:
            hung.result(timeout=60)
        assert time.monotonic() - t0 < 30
        err = ei.value
        assert not isinstance(err, TaskStalledError)
        assert err.timeout == 0.5  # 5 x ~0.01 s is under the floor
        assert "floor of 0.5 s" in str(err) and "5 successful run times of _supervision_tasks.nap" in str(err)
        assert pickle.loads(pickle.dumps(err)).derivation == err.derivation
        info = task_info(hung)
        assert info.outcome == "timeout" and info.timeout == 0.5
        ok = ex.submit(tasks.nap, 0.01)
        assert ok.result(timeout=60) == 0.01 and task_info(ok).timeout == 0.5
        other = ex.submit(tasks.other_nap, 0.01)  # another function: nothing learned
        assert other.result(timeout=60) == 0.01 and task_info(other).timeout is None
        assert ex.stats()["timed_out"] == 1


def test_learned_limit_uses_initial_before_enough_samples():
    auto = AutoTimeout(min_samples=50, initial=0.5)
    with ProcessGroupExecutor(1, task_timeout=auto, kill_grace=0.2) as ex:
        with pytest.raises(TaskTimeoutError) as ei:
            ex.submit(tasks.nap, 60).result(timeout=60)
        assert ei.value.timeout == 0.5 and "initial limit" in str(ei.value)


def test_a_new_learned_limit_applies_to_a_task_already_running():
    """A task that began with no limit (no samples yet) is killed as soon as the
    samples arrive and it is past its new deadline."""
    auto = AutoTimeout(factor=2, quantile=1.0, min_samples=5, floor=0.3)
    with ProcessGroupExecutor(2, task_timeout=auto, kill_grace=0.2) as ex:
        long = ex.submit(tasks.nap, 60)
        time.sleep(0.5)  # it runs past the limit to come; the other worker learns
        _learn(ex, 5)
        learned_at = time.monotonic()
        with pytest.raises(TaskTimeoutError) as ei:
            long.result(timeout=60)
        assert time.monotonic() - learned_at < 10  # at once, not after its 60 s
        assert ei.value.timeout == pytest.approx(0.3)


def test_learned_limit_with_map_chunks_and_retries():
    auto = AutoTimeout(factor=5, quantile=1.0, min_samples=3, floor=0.4)
    with ProcessGroupExecutor(2, task_timeout=auto, retries=1, kill_grace=0.2) as ex:
        # chunks of 4 calls of nap: per call ~0.01 s
        assert list(ex.map(tasks.nap, [0.01] * 16, chunksize=4)) == [0.01] * 16
        results = list(ex.map(tasks.nap, [0.01, 0.01, 60, 0.01], chunksize=2, return_exceptions=True))
        assert results[:2] == [0.01, 0.01]
        for err in results[2:]:
            assert isinstance(err, TaskTimeoutError)
            assert err.attempts == 2  # retried once, then failed
            assert err.timeout == pytest.approx(0.4)  # the floor: 2 x 5 x 0.01 is less
        assert ex.stats()["timed_out"] == 2 and ex.stats()["retried"] == 1


def test_learned_limit_with_a_journal(tmp_path):
    auto = AutoTimeout(factor=5, quantile=1.0, min_samples=3, floor=0.4)
    path = tmp_path / "sweep.db"
    with ProcessGroupExecutor(1, task_timeout=auto, kill_grace=0.2) as ex:
        _learn(ex, 3)
        out = list(ex.map(tasks.nap, [0.01, 60], journal=str(path), return_exceptions=True))
    assert out[0] == 0.01 and isinstance(out[1], TaskTimeoutError)


# ----------------------------------------------------------------- the protocol


class _KillAtFirstLook:
    """A detector from outside: kills every task at its first look, with its own error."""

    def __init__(self, item: WorkItem, pid: int, now: float) -> None:
        self.item, self.pid, self.at = item, pid, now + 0.2

    def next_look(self) -> float | None:
        return self.at

    def deadline(self) -> float | None:
        return self.at

    def look(self, now: float) -> Kill | None:
        pid = self.pid

        def error(stack: str | None, native: str | None) -> BaseException:
            return RuntimeError(f"killed by a plugged-in detector on {pid}; stack={bool(stack)}")

        return Kill(
            outcome="timeout", counter="timed_out", why="was judged", reason="judged",
            hard=False, stack=True, error=error,
        )


def test_a_new_detector_needs_no_change_to_the_manager(monkeypatch):
    """The manager applies any detector's conclusion: a detector added to the
    supervisor's list kills, with its error and the worker's stack (asked for before
    its deadline), and nothing else changes."""
    original = Supervisor.__init__

    def init(self: Supervisor, *args: object) -> None:
        original(self, *args)
        self.detectors = (*self.detectors, (lambda settings: True, _KillAtFirstLook))

    monkeypatch.setattr(Supervisor, "__init__", init)
    with ProcessGroupExecutor(1, max_memory=1 << 40, kill_grace=0.2) as ex:
        fut = ex.submit(tasks.nap, 60)
        with pytest.raises(RuntimeError, match="plugged-in detector.*stack=True"):
            fut.result(timeout=60)
        assert ex.stats()["timed_out"] == 1 and task_info(fut).outcome == "timeout"


# ----------------------------------------------------------------- prompt kills


def test_a_task_spinning_in_c_with_every_signal_blocked_fails_at_its_deadline():
    """No faulthandler dump can come from it: the kill must not wait for one (it
    waited 0.1 s for it before). benchmarks/deadline_latency.py measures the
    lateness; here a generous bound, the median of three."""
    timeout = 0.5
    lates = []
    with ProcessGroupExecutor(1, task_timeout=timeout, kill_grace=0.2) as ex:
        for _ in range(3):
            ex.options(task_timeout=None).submit(tasks.getpid).result(timeout=60)  # a warm worker
            t0 = time.monotonic()
            fut = ex.submit(tasks.spin_with_every_signal_blocked)
            wait([fut], timeout=60)
            lates.append(time.monotonic() - t0 - timeout)
            assert isinstance(fut.exception(), TaskTimeoutError)
            assert fut.exception().stack is None
    assert sorted(lates)[1] < 0.04, lates


def test_a_hung_python_task_still_carries_its_stack():
    with ProcessGroupExecutor(1, task_timeout=0.5, kill_grace=0.2) as ex:
        with pytest.raises(TaskTimeoutError) as ei:
            ex.submit(tasks.nap, 60).result(timeout=60)
    assert "_supervision_tasks.py" in (ei.value.stack or ""), ei.value.stack
    assert "in nap" in str(ei.value)


# ----------------------------------------------------------------- heartbeats


def test_heartbeat_is_a_no_op_outside_a_task():
    from pgexecutor import heartbeat

    assert heartbeat() is None


def test_heartbeat_settings_are_checked():
    for bad in (0, -1, math.nan, "5"):
        with pytest.raises((ValueError, TypeError), match="heartbeat_timeout"):
            ProcessGroupExecutor(1, heartbeat_timeout=bad)
        with pytest.raises((ValueError, TypeError), match="stall_timeout"):
            ProcessGroupExecutor(1, stall_timeout=bad)
    with ProcessGroupExecutor(1, heartbeat_timeout=3, stall_timeout=4) as ex:
        view = ex.options(heartbeat_timeout=None)
        assert view.heartbeat_timeout is None and view.stall_timeout == 4
        assert ex.options(stall_timeout=None, heartbeat_timeout=None).task_settings.watched is False


def test_a_task_that_stops_beating_is_killed_as_stalled():
    with ProcessGroupExecutor(1, heartbeat_timeout=0.5, kill_grace=0.2) as ex:
        t0 = time.monotonic()
        fut = ex.submit(tasks.beat_then_hang, 3, 0.1)
        with pytest.raises(TaskStalledError) as ei:
            fut.result(timeout=60)
        assert time.monotonic() - t0 < 30
        err = ei.value
        assert isinstance(err, TaskTimeoutError) and err.timeout == 0.5
        assert "no heartbeat() for 0.5 s" in str(err)
        assert "beat_then_hang" in (err.stack or "")  # the dump still comes
        assert pickle.loads(pickle.dumps(err)).reason == err.reason
        assert task_info(fut).outcome == "timeout" and ex.stats()["timed_out"] == 1


def test_a_task_that_never_beats_is_not_affected():
    with ProcessGroupExecutor(1, heartbeat_timeout=0.2) as ex:
        assert ex.submit(tasks.never_beats, 1.0).result(timeout=60) == "slept"


def test_heartbeats_count_from_any_thread_of_the_task():
    """The task's main thread never beats; a thread does, for 1 s: the task lives
    that long (beats seen), then is killed (they stopped)."""
    with ProcessGroupExecutor(1, heartbeat_timeout=0.4, kill_grace=0.2) as ex:
        t0 = time.monotonic()
        fut = ex.submit(tasks.beat_from_a_thread_then_hang, 1.0, 0.05)
        with pytest.raises(TaskStalledError):
            fut.result(timeout=60)
        assert time.monotonic() - t0 >= 1.0


def test_heartbeats_count_from_a_forked_child():
    with ProcessGroupExecutor(1, heartbeat_timeout=0.4, kill_grace=0.2) as ex:
        assert ex.submit(tasks.beat_from_a_forked_child, 1.0, 0.05, False).result(timeout=60) == "child done"
        t0 = time.monotonic()
        with pytest.raises(TaskStalledError):
            ex.submit(tasks.beat_from_a_forked_child, 1.0, 0.05, True).result(timeout=60)
        assert time.monotonic() - t0 >= 1.0


def test_beats_of_one_task_do_not_count_for_the_next():
    """Each task's beats carry its id: a task that never beats is unaffected even
    right after one that did."""
    with ProcessGroupExecutor(1, heartbeat_timeout=0.3, kill_grace=0.2) as ex:
        with pytest.raises(TaskStalledError):
            ex.submit(tasks.beat_then_hang, 2, 0.05).result(timeout=60)
        assert ex.submit(tasks.never_beats, 0.8).result(timeout=60) == "slept"


# ----------------------------------------------------------------- stalls


def test_a_sleeping_task_is_stalled():
    with ProcessGroupExecutor(1, stall_timeout=0.5, kill_grace=0.2) as ex:
        t0 = time.monotonic()
        fut = ex.submit(tasks.nap, 60)
        with pytest.raises(TaskStalledError) as ei:
            fut.result(timeout=60)
        assert time.monotonic() - t0 < 30
        assert "no CPU or I/O progress for 0.5 s" in str(ei.value)
        assert ei.value.timeout == 0.5
        assert "in nap" in str(ei.value)  # the stack, asked for at the kill


def test_a_task_waiting_on_a_sleeping_grandchild_is_stalled():
    with ProcessGroupExecutor(1, stall_timeout=0.5, kill_grace=0.2) as ex:
        with pytest.raises(TaskStalledError):
            ex.submit(tasks.wait_on_sleeping_grandchild, 60).result(timeout=60)


@pytest.mark.parametrize("fn", [tasks.spin, tasks.wait_on_busy_child], ids=["busy", "busy-child"])
def test_a_busy_task_or_one_waiting_on_a_busy_child_is_never_stalled(fn):
    with ProcessGroupExecutor(1, stall_timeout=1.0) as ex:
        assert ex.submit(fn, 3.0).result(timeout=60) is not None


def test_task_info_timeout_is_the_fixed_limit_or_none():
    with ProcessGroupExecutor(1) as ex:
        limited = ex.options(task_timeout=30).submit(tasks.nap, 0.01)
        free = ex.submit(tasks.nap, 0.01)
        assert limited.result(timeout=60) == free.result(timeout=60) == 0.01
        assert task_info(limited).timeout == 30 and task_info(free).timeout is None


# ----------------------------------------------------------------- native stacks


def _py_spy_or_skip() -> str:
    import os

    from pgexecutor import _native

    found = _native.find_py_spy()
    if found is None:
        if os.environ.get("PGEXECUTOR_REQUIRE_EXTRAS"):
            pytest.fail("py-spy (the 'native' extra) is not installed")
        pytest.skip("py-spy is not installed: pip install -e '.[native]'")
    return found


def test_native_stacks_name_the_c_function_a_timed_out_task_spins_in():
    _py_spy_or_skip()
    timeout = 1.0
    with ProcessGroupExecutor(1, task_timeout=timeout, kill_grace=0.2, native_stacks=True) as ex:
        ex.options(task_timeout=None).submit(tasks.getpid).result(timeout=60)
        t0 = time.monotonic()
        fut = ex.submit(tasks.spin_with_every_signal_blocked)
        wait([fut], timeout=60)
        late = time.monotonic() - t0 - timeout
        err = fut.exception()
    assert isinstance(err, TaskTimeoutError)
    assert err.native_stack is not None and "sre_" in err.native_stack, err.native_stack
    assert "spin_with_every_signal_blocked" in err.native_stack  # the Python frames too
    assert "natively in sre_" in str(err)
    assert late < 1.0, late  # within 200 ms, measured in benchmarks; generous here
    assert pickle.loads(pickle.dumps(err)).native_stack == err.native_stack


def test_native_stacks_without_py_spy_warns_once_at_construction(monkeypatch):
    from pgexecutor import _native

    monkeypatch.setattr(_native, "find_py_spy", lambda: None)
    with pytest.warns(RuntimeWarning, match="py-spy"):
        ex = ProcessGroupExecutor(1, task_timeout=0.5, kill_grace=0.2, native_stacks=True)
    with ex, pytest.raises(TaskTimeoutError) as ei:
        ex.submit(tasks.nap, 60).result(timeout=60)
    assert ei.value.native_stack is None and "in nap" in str(ei.value)  # the Python dump
    with pytest.raises(TypeError, match="native_stacks"):
        ProcessGroupExecutor(1, native_stacks="yes")


def test_native_stacks_refused_degrade_to_the_python_stack_and_say_why(monkeypatch, tmp_path, caplog):
    import logging

    from pgexecutor import _native

    refusing = tmp_path / "py-spy"
    refusing.write_text("#!/bin/sh\necho 'Permission denied (os error 13)' >&2\nexit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setattr(_native, "find_py_spy", lambda: str(refusing))
    caplog.set_level(logging.WARNING, logger="pgexecutor")
    with ProcessGroupExecutor(1, task_timeout=0.5, kill_grace=0.2, native_stacks=True) as ex:
        for _ in range(2):
            with pytest.raises(TaskTimeoutError) as ei:
                ex.submit(tasks.nap, 60).result(timeout=60)
            assert ei.value.native_stack is None and "in nap" in str(ei.value)
    said = [r.getMessage() for r in caplog.records if "native_stacks" in r.getMessage()]
    assert len(said) == 1 and "Permission denied" in said[0] and "ptrace" in said[0], said


def test_native_stacks_include_other_members_of_the_group():
    _py_spy_or_skip()
    with ProcessGroupExecutor(1, task_timeout=2.0, kill_grace=0.2, native_stacks=True) as ex:
        fut = ex.submit(tasks.wait_on_busy_child, 60)  # a Python child spins
        with pytest.raises(TaskTimeoutError) as ei:
            fut.result(timeout=60)
    dump = ei.value.native_stack or ""
    assert "wait_on_busy_child" in dump.split("--- group member")[0]  # the worker first
    assert "--- group member pid" in dump and "<string>" in dump.split("--- group member")[1], dump


def test_two_workers_timing_out_together_never_get_each_others_stack():
    """The pool's workers share one stack-dump pipe (_process.dump_pipe): two dumps at
    once would interleave, or land on the wrong error. One worker at a time is asked
    (DumpGate); the other goes without a Python dump rather than with a wrong one."""
    for _ in range(3):
        with ProcessGroupExecutor(2, task_timeout=0.6, kill_grace=0.2) as ex:
            # Both workers ready first, so that the two deadlines fall together.
            assert ex.submit(tasks.getpid).result(timeout=60)
            fs = [ex.submit(tasks.nap, 60), ex.submit(tasks.other_nap, 60)]
            errors = [f.exception(timeout=60) for f in fs]
        assert all(isinstance(e, TaskTimeoutError) for e in errors)
        mine, theirs = "in nap", "in other_nap"
        for err, (own, other) in zip(errors, ((mine, theirs), (theirs, mine)), strict=True):
            stack = err.stack or ""
            assert other not in stack, stack
            if stack:
                assert own in stack or own.split()[1] in stack, stack
        assert any(e.stack for e in errors)  # at least the first one asked has its dump
