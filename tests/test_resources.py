"""Limits of the machine and of the user's code meet the pool: exhaustion of fds or
processes degrades the pool (never fails work a worker could run), a hung initializer
is bounded, and the drop-in details that embedded Pythons and shutdown rely on.

Tests that lower process limits do it in a subprocess driver (tests/scripts/), never
in the test process itself.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from concurrent.futures import wait

import psutil
import pytest
from _resource_tasks import gated, meet, noop, touch, wait_path
from conftest import ROOT, format_survivors, survivors_of

from pgexecutor import ProcessGroupExecutor, _platform
from pgexecutor._scheduling import PREFETCH_BUDGET

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


class _OnTakeBack(logging.Handler):
    """Runs ``then`` in the manager thread once it has taken tasks back from
    ``count`` workers (its DEBUG record of each take-back)."""

    def __init__(self, count: int, then) -> None:
        super().__init__(logging.DEBUG)
        self.left, self.then, self.seen = count, then, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.left and record.getMessage().startswith("took "):
            self.left -= 1
            if not self.left:
                self.then()
                self.seen.set()


def test_tasks_taken_back_from_two_workers_keep_submission_order(tmp_path):
    """The interleaving behind a rare failure of the test above, forced: two workers,
    each handed a long task with tiny ones written ahead behind it in the same pass
    (so their revoke timers fall due together), are both too slow to claim even
    their long task (stopped here). One pass takes back every task of both; they
    must be handed out again in submission order. Put back worker by worker, the
    second worker's tasks went first: a tiny task submitted later became the head
    of a worker whose long task, submitted earlier, waited behind it, and ran
    while both long tasks were meant to run (shutdown found it FINISHED)."""
    logger = logging.getLogger("pgexecutor")
    level = logger.level
    ex = ProcessGroupExecutor(max_workers=2)
    pids: list[int] = []
    try:
        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        pair = [ex.submit(meet, a, b), ex.submit(meet, b, a)]  # both workers ready
        assert [f.result(timeout=T) for f in pair] == [True, True]
        assert list(ex.map(noop, range(200))) == list(range(200))  # tiny: prefetching
        pids = ex.worker_pids()
        assert len(pids) == 2
        # Hold the manager: its lock is ours, so that it stops short of its next pass
        # and a submit cannot hand a task out itself (try_dispatch only tries the
        # lock): the five tasks below reach it together and go out in one pass,
        # round robin, each worker a long one with tiny ones written behind it.
        # (A done-callback no longer holds it: callbacks run on the delivery thread,
        # so the tasks went out as they came, and a worker given its long task alone
        # had nothing to take back: the test failed about 1 run in 8 under load.)
        manager_lock = ex._manager._lock
        assert manager_lock.acquire(timeout=T), "never held the manager"
        # The map made tasks look tiny, so that tasks are written behind a running
        # one (Scheduler.depth); but on a loaded machine 200 no-ops can average over
        # PREFETCH_BUDGET as the manager sees them (then nothing is written behind,
        # and nothing taken back). Their lock is ours: say they were tiny.
        ex._manager.scheduler.avg_run = PREFETCH_BUDGET / 100

        def resume():
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

        try:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)  # too slow to claim anything: all is taken back
            handler = _OnTakeBack(2, resume)
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
            marks = [str(tmp_path / f"started-{i}") for i in range(2)]
            gate = str(tmp_path / "gate")
            running = [ex.submit(gated, m, gate, "done") for m in marks]
            queued = [ex.submit(noop, i) for i in range(3)]
        finally:
            manager_lock.release()
        assert handler.seen.wait(T), "no pass took tasks back from both workers"
        assert all(wait_path(m) for m in marks)
        ex.shutdown(wait=False, cancel_futures=True)
        done, _ = wait(queued, timeout=T)
        assert [f.cancelled() for f in queued] == [True] * 3, [f._state for f in queued]
        touch(gate)
        assert [f.result(timeout=T) for f in running] == ["done", "done"]
    finally:
        logger.setLevel(level)
        for h in list(logger.handlers):
            if isinstance(h, _OnTakeBack):
                logger.removeHandler(h)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        touch(str(tmp_path / "gate"))
        ex.shutdown(wait=True)


def test_shutdown_cancel_futures_keeps_each_workers_next_task():
    """CPython's test_cancel_futures on a primed pool: of 50 sleeps submitted right
    before shutdown(cancel_futures=True) most are cancelled, yet each worker's next
    task (the call queue's counterpart) runs, so some complete, and nothing else."""
    import time as _time

    for _ in range(5):
        ex = ProcessGroupExecutor(2)
        for f in [ex.submit(_time.sleep, 0.1) for _ in range(2)]:
            f.result(timeout=T)
        fs = [ex.submit(_time.sleep, 0.1) for _ in range(50)]
        ex.shutdown(cancel_futures=True)
        cancelled = [f for f in fs if f.cancelled()]
        others = [f for f in fs if not f.cancelled()]
        assert len(cancelled) > 20
        assert 0 < len(others) <= 2
        assert all(f.done() and f.exception() is None for f in others)


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


@pytest.mark.parametrize("value", [None, float("inf")])
def test_initializer_timeout_none_or_inf_lets_a_slow_initializer_finish(value):
    """An initializer slower than task_timeout (importing torch, say) with no limit
    of its own: the tasks run."""
    import time as _time

    ex = ProcessGroupExecutor(1, initializer=_time.sleep, initargs=(1.0,), task_timeout=0.5,
                              initializer_timeout=value)
    with ex:
        assert ex.submit(noop, 7).result(timeout=T) == 7


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


# ----------------------------------------------------------------- fd exhaustion


def run_driver(name: str, *args: str, timeout: float = 240) -> dict:
    """Run tests/scripts/``name`` (it lowers its own limits); return its RESULT data
    after proving that no process of any worker group it created survived it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "scripts", name), *args],
        capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    data = json.loads(lines[-1][len("RESULT "):])
    left = survivors_of(data["groups"])
    assert not left, "worker processes survived the driver:\n" + format_survivors(left)
    return data


def test_fds_per_worker_are_what_the_docs_say(tmp_path):
    data = run_driver("fd_limit_driver.py", "count", str(tmp_path))
    assert data["workers"] == 5
    expected = 4 + (1 if _platform.USE_PIDFD else 0) + (1 if _platform.HAS_MEMFD else 0)
    assert data["per_worker"] == expected
    with open(os.path.join(ROOT, "docs", "guarantees.md")) as f:
        guarantees = f.read()
    assert f"{expected} per worker" in guarantees


def test_too_few_fds_for_every_worker_runs_every_task_on_those_that_started():
    """RLIMIT_NOFILE lets a few of 40 workers start: the pool runs on those, retries
    with back-off, logs the cause once, and not one of the 40 tasks fails."""
    data = run_driver("fd_limit_driver.py", "degrade")
    assert data["ok"] == 40, data["errors"]
    assert 1 < data["workers"] < 40
    assert data["refusals"] >= 1
    assert data["refusals_warned"] == 1


def test_the_issues_example_macos_default_limit_and_40_workers():
    """RLIMIT_NOFILE 256 (macOS's default), 40 workers, 40 tasks: all succeed."""
    data = run_driver("fd_limit_driver.py", "256")
    assert data["ok"] == 40, data["errors"]
    assert data["refusals_warned"] <= 1


def test_no_worker_can_start_fails_queued_tasks_naming_the_cause():
    """No fd left for even one worker: after the give-up time (shortened by the
    driver) the queued tasks fail with WorkerCrashedError naming EMFILE; once fds
    are free again the same executor runs tasks."""
    data = run_driver("fd_limit_driver.py", "none")
    assert len(data["errors"]) == 3
    for err in data["errors"]:
        assert "WorkerCrashedError" in err and "EMFILE" in err and "no worker could be started" in err
    assert data["after"] is True
    assert data["refusals_warned"] == 1



def test_workers_dying_before_ready_do_not_fail_tasks_another_worker_runs(tmp_path, caplog):
    """Every worker but the first dies before it is ready: the first runs all the
    tasks; the replacements are retried with back-off (not in a busy loop), and no
    task fails (before: the third early death failed the whole queue)."""
    import logging

    from _resource_tasks import exit_unless_first, short_sleep

    caplog.set_level(logging.DEBUG, logger="pgexecutor")
    ex = ProcessGroupExecutor(3, initializer=exit_unless_first, initargs=(str(tmp_path / "first"),))
    with ex:
        fs = [ex.submit(short_sleep, i) for i in range(30)]
        pids = {f.result(timeout=T) for f in fs}
    assert len(pids) == 1
    started = ex.stats()["workers_started"]
    # 30 tasks of 50 ms take ~1.5 s: at back-off pace that is a handful of restarts
    assert started < 20, started
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) <= 2, [r.getMessage() for r in warned]


# ----------------------------------------------------------------- drop-in details


def test_setsid_in_a_task_fails_with_a_message_that_says_what_to_do():
    from _resource_tasks import call_setsid, setsid_in_forked_child

    with ProcessGroupExecutor(1) as ex:
        kind, code, message = ex.submit(call_setsid).result(timeout=T)
        assert kind == "PermissionError" and code == errno.EPERM
        assert "process group" in message and "start_new_session=True" in message
        # a child the task forked is no group leader: setsid() works there
        assert ex.submit(setsid_in_forked_child).result(timeout=T) == "ok"


def test_multiprocessing_set_executable_is_honoured(tmp_path):
    """An embedded Python sets the interpreter with multiprocessing.set_executable():
    the default start uses it (a wrapper that records its pid, then execs Python)."""
    import multiprocessing
    from multiprocessing import spawn

    from _resource_tasks import getpid_task

    used = tmp_path / "used"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$$" >> {shlex.quote(str(used))}\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    wrapper.chmod(0o755)
    old = spawn.get_executable()
    multiprocessing.set_executable(str(wrapper))
    try:
        with ProcessGroupExecutor(2) as ex:
            pids = set(ex.map(getpid_task, range(6)))
            parents = {p: psutil.Process(p).ppid() for p in pids}
    finally:
        multiprocessing.set_executable(old)
    started_by_wrapper = {int(p) for p in used.read_text().split()}
    # A worker is the wrapper's interpreter itself, or a fork of one: the default
    # start forks its workers from a template, and the wrapper started the template.
    assert pids
    assert all(p in started_by_wrapper or parents[p] in started_by_wrapper for p in pids)
