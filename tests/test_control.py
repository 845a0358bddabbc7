"""Per-task control. Memory limit over the whole group, retries, options(),
task_info(), stats() and map progress bars.

Every test starts real processes and allocates real memory (every page written, so it
is resident, not just reserved). The autouse fixture in conftest.py proves after each
test that no process of any worker group it created survived; tests whose tasks start
children also check those children by pid. Bounds on time are safety nets for a noisy
shared machine, never performance claims.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from concurrent.futures import Future

import _light_tasks as light
import pytest
from conftest import require_extra, wait_gone

from pgexecutor import (
    MemoryLimitError,
    ProcessGroupExecutor,
    TaskTimeoutError,
    WorkerCrashedError,
    task_info,
)

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
T = 60  # result() timeout: a safety net against hangs, never a performance bound

# A child that allocates argv[1] bytes (every page written) and then waits forever.
_ALLOCATING_CHILD = "import sys, time\ndata = b'\\x01' * int(sys.argv[1])\ntime.sleep(1000)\n"

has_pss = pytest.mark.skipif(
    not os.path.exists(f"/proc/{os.getpid()}/smaps_rollup"),
    reason="PSS needs Linux /proc/<pid>/smaps_rollup; elsewhere memory is RSS",
)


# ----------------------------------------------------------------- task functions
# (module level: importable by reference in the workers)


def add(a, b):
    return a + b


def getpid():
    return os.getpid()


def sleep_forever():
    time.sleep(1000)


def sleep_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def raise_value_error(x=None):
    raise ValueError(f"plain task error {x}")


def exit_with(code):
    os._exit(code)


def _write_atomic(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _append_pid(path):
    """Record this attempt (the worker's pid); returns how many attempts came before."""
    before = 0
    if os.path.exists(path):
        with open(path) as f:
            before = len(f.read().split())
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return before


def children_grow(n, nbytes, pid_path):
    """Stay small here while ``n`` children (fresh interpreters) take ``nbytes`` each."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _ALLOCATING_CHILD, str(nbytes)])
        for _ in range(n)
    ]
    _write_atomic(pid_path, " ".join(str(p.pid) for p in procs))
    time.sleep(1000)


def forked_children_grow(n, nbytes, pid_path):
    """Like children_grow, with os.fork() (a DataLoader's workers on Linux)."""
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                data = b"\x01" * nbytes  # noqa: F841 - held while we sleep
                time.sleep(1000)
            finally:
                os._exit(0)
        pids.append(pid)
    _write_atomic(pid_path, " ".join(str(p) for p in pids))
    time.sleep(1000)


def orphan_grows(nbytes, pid_path):
    """A child starts a grandchild that allocates, then exits: the grandchild is
    nobody's descendant any more (reparented), yet still in the worker's group."""
    middle = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]])\n"
        "open(sys.argv[3], 'w').write(str(p.pid))\n"
    )
    subprocess.run(
        [sys.executable, "-c", middle, _ALLOCATING_CHILD, str(nbytes), pid_path], check=True
    )
    time.sleep(1000)


def allocate_and_sleep(nbytes):
    data = b"\x01" * nbytes  # noqa: F841
    time.sleep(1000)


def allocate_hold_return(nbytes, hold):
    data = b"\x01" * nbytes
    time.sleep(hold)
    return len(data)


def share_pages_with_forked_children(nbytes, n, hold):
    """Write ``nbytes`` here, then fork ``n`` children that only read-share them.

    RSS counts the shared pages once per process (n + 1 times); PSS splits each page
    among the processes that map it, so the group's sum stays near ``nbytes``.
    """
    data = b"\x01" * nbytes
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            time.sleep(hold)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return len(data)


def attempt(path, action):
    """Record this attempt's worker pid in ``path``, then misbehave as told."""
    _append_pid(path)
    if action == "crash":
        os._exit(3)
    if action == "hang":
        time.sleep(1000)
    if action == "memory":
        allocate_and_sleep(300 * MiB)
    if action == "raise":
        raise ValueError("an ordinary task error")
    return os.getpid()


def crash_first_time(path, delay=0.0):
    """Crash the worker on the first attempt only (``path`` remembers the attempts)."""
    if _append_pid(path) == 0:
        time.sleep(delay)
        os._exit(7)
    return os.getpid()


def wait_for_gate_or_return(gate, x):
    if gate:
        deadline = time.monotonic() + T
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    return x


def fail_odd(x):
    if x % 2:
        raise ValueError(x)
    return x


# ----------------------------------------------------------------- helpers



def wait_for_file(path, timeout=T):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                text = f.read()
            if text:
                return text
        time.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


def read_pids(path):
    with open(path) as f:
        return [int(x) for x in f.read().split()]


def wait_until(cond, timeout=T):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# ----------------------------------------------------------------- max_memory


@pytest.mark.parametrize("how", [children_grow, forked_children_grow], ids=["spawned", "forked"])
def test_memory_limit_counts_children_of_a_small_task(how, tmp_path):
    """Two children of 200 MiB each: none alone passes 300 MiB, the group does."""
    limit = 300 * MiB
    pid_path = str(tmp_path / "children")
    with ProcessGroupExecutor(1, max_memory=limit, task_timeout=100) as ex:
        fut = ex.submit(how, 2, 200 * MiB, pid_path)
        t0 = time.monotonic()
        with pytest.raises(MemoryLimitError) as ei:
            fut.result(timeout=T)
        waited = time.monotonic() - t0
        err = ei.value
        assert isinstance(err, WorkerCrashedError)  # old except clauses still fire
        assert err.limit == limit
        # Over the limit, and sanely sized: at most the two children plus a worker.
        assert limit < err.rss < 2 * 200 * MiB + 300 * MiB
        assert err.attempts == 1 and "attempt" not in str(err)
        assert "MiB" in str(err) and str(err.pid) in str(err)
        assert waited < 60  # the 100 s task timeout never came into play
        children = read_pids(pid_path)
        assert len(children) == 2
        for pid in children:
            assert wait_gone(pid), f"child {pid} survived the memory kill"
        assert wait_gone(err.pid)
        info = task_info(fut)
        assert info.outcome == "memory" and info.pid == err.pid and info.attempts == 1
        assert info.peak_memory >= err.rss
        # The pool keeps working, on a new worker.
        assert ex.submit(getpid).result(timeout=T) != err.pid
        assert ex.submit(add, 1, 2).result(timeout=T) == 3


def test_memory_limit_counts_orphaned_grandchild_in_group(tmp_path):
    pid_path = str(tmp_path / "grandchild")
    with ProcessGroupExecutor(1, max_memory=200 * MiB, task_timeout=100) as ex:
        fut = ex.submit(orphan_grows, 300 * MiB, pid_path)
        with pytest.raises(MemoryLimitError) as ei:
            fut.result(timeout=T)
        assert ei.value.rss > 200 * MiB
        (grandchild,) = read_pids(pid_path)
        assert wait_gone(grandchild)
        assert ex.submit(add, 1, 1).result(timeout=T) == 2


def test_memory_sampled_while_task_runs_not_after(tmp_path):
    """A task that allocates and then never returns must still be stopped."""
    limit = 200 * MiB
    with ProcessGroupExecutor(1, kill_grace=0.5) as ex:
        fut = ex.options(max_memory=limit, task_timeout=100).submit(
            allocate_and_sleep, 400 * MiB
        )
        t0 = time.monotonic()
        with pytest.raises(MemoryLimitError) as ei:
            fut.result(timeout=T)
        assert time.monotonic() - t0 < 45  # long before its 100 s timeout
        assert ei.value.limit == limit and ei.value.rss > limit
        assert not isinstance(ei.value, TaskTimeoutError)
        assert ex.stats()["memory_killed"] == 1 and ex.stats()["timed_out"] == 0
        assert ex.submit(add, 2, 3).result(timeout=T) == 5


def test_memory_under_limit_reports_peak():
    with ProcessGroupExecutor(1, max_memory=4096 * MiB) as ex:
        fut = ex.submit(allocate_hold_return, 150 * MiB, 1.0)
        assert fut.result(timeout=T) == 150 * MiB
        info = task_info(fut)
        assert info.outcome == "ok"
        assert 150 * MiB <= info.peak_memory < 4096 * MiB
        # Without a limit nothing is sampled.
        fut = ex.options(max_memory=None).submit(allocate_hold_return, 10 * MiB, 0.3)
        fut.result(timeout=T)
        assert task_info(fut).peak_memory is None


@has_pss
def test_shared_copy_on_write_pages_count_once():
    """200 MiB shared by a worker and 3 forked children: RSS would say ~800 MiB."""
    limit = 500 * MiB
    with ProcessGroupExecutor(1, max_memory=limit) as ex:
        fut = ex.submit(share_pages_with_forked_children, 200 * MiB, 3, 2.0)
        assert fut.result(timeout=T) == 200 * MiB  # no MemoryLimitError
        peak = task_info(fut).peak_memory
        assert 200 * MiB <= peak < limit


def test_memory_limit_per_task_leaves_others_alone():
    """A limit set with options() applies to that task only."""
    with ProcessGroupExecutor(2, max_memory=None) as ex:
        big_ok = ex.submit(allocate_hold_return, 250 * MiB, 0.5)
        limited = ex.options(max_memory=150 * MiB).submit(allocate_and_sleep, 250 * MiB)
        with pytest.raises(MemoryLimitError):
            limited.result(timeout=T)
        assert big_ok.result(timeout=T) == 250 * MiB
        assert task_info(big_ok).peak_memory is None


# ----------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "action,error,counter",
    [
        ("crash", WorkerCrashedError, "crashed"),
        ("hang", TaskTimeoutError, "timed_out"),
        ("memory", MemoryLimitError, "memory_killed"),
    ],
)
def test_killed_task_retried_on_fresh_worker_then_gives_up(action, error, counter, tmp_path):
    path = str(tmp_path / "attempts")
    retries = 2
    with ProcessGroupExecutor(1, kill_grace=0.3) as ex:
        opts = ex.options(
            retries=retries,
            task_timeout=1.0 if action == "hang" else None,
            max_memory=150 * MiB if action == "memory" else None,
        )
        fut = opts.submit(attempt, path, action)
        with pytest.raises(error) as ei:
            fut.result(timeout=T)
        err = ei.value
        if action == "crash":
            assert type(err) is WorkerCrashedError and err.exitcode == 3
        assert err.attempts == retries + 1
        assert f"after {retries + 1} attempts" in str(err)
        pids = read_pids(path)
        assert len(pids) == retries + 1
        assert len(set(pids)) == retries + 1, "a retry ran on the worker that was killed"
        assert err.pid == pids[-1]
        info = task_info(fut)
        assert info.attempts == retries + 1 and info.pid == pids[-1]
        stats = ex.stats()
        assert stats["retried"] == retries
        assert stats[counter] == retries + 1  # every kill counts, the retried ones too
        assert stats["failed"] == 1  # ... but the future failed once
        assert ex.submit(add, 1, 1).result(timeout=T) == 2
    for pid in pids:
        assert wait_gone(pid)


def test_task_crashing_once_succeeds_with_one_retry(tmp_path):
    path = str(tmp_path / "attempts")
    with ProcessGroupExecutor(1, retries=1) as ex:
        fut = ex.submit(crash_first_time, path)
        pid = fut.result(timeout=T)
        first, second = read_pids(path)
        assert second == pid != first
        info = task_info(fut)
        assert info.attempts == 2 and info.outcome == "ok" and info.pid == pid
        stats = ex.stats()
        assert (stats["crashed"], stats["retried"], stats["completed"], stats["failed"]) == (
            1, 1, 1, 0
        )


def test_ordinary_exception_is_not_retried(tmp_path):
    path = str(tmp_path / "attempts")
    with ProcessGroupExecutor(1, retries=3) as ex:
        fut = ex.submit(attempt, path, "raise")
        with pytest.raises(ValueError, match="an ordinary task error"):
            fut.result(timeout=T)
        assert len(read_pids(path)) == 1
        info = task_info(fut)
        assert info.attempts == 1 and info.outcome == "error"
        assert ex.stats()["retried"] == 0


def test_retries_zero_retries_nothing_and_options_leave_default(tmp_path):
    with ProcessGroupExecutor(1) as ex:  # retries=0 by default
        path = str(tmp_path / "a")
        with pytest.raises(WorkerCrashedError) as ei:
            ex.submit(crash_first_time, path).result(timeout=T)
        assert ei.value.attempts == 1 and "attempts" not in str(ei.value)
        assert len(read_pids(path)) == 1
        # A per-task retry...
        path = str(tmp_path / "b")
        assert ex.options(retries=1).submit(crash_first_time, path).result(timeout=T)
        assert len(read_pids(path)) == 2
        # ... leaves the executor's own default at 0.
        path = str(tmp_path / "c")
        with pytest.raises(WorkerCrashedError):
            ex.submit(crash_first_time, path).result(timeout=T)
        assert len(read_pids(path)) == 1
        assert ex.stats()["retried"] == 1


def test_retry_still_runs_while_executor_shuts_down(tmp_path):
    """shutdown(wait=True) waits for running futures, and a retry is still running."""
    path = str(tmp_path / "attempts")
    ex = ProcessGroupExecutor(1, retries=1)
    fut = ex.submit(crash_first_time, path, 1.0)  # crashes 1 s into its first attempt
    wait_for_file(path)
    ex.shutdown(wait=True)  # posted while the first attempt still runs
    assert fut.result(timeout=0) == read_pids(path)[-1]
    assert task_info(fut).attempts == 2


# ----------------------------------------------------------------- options()


def test_options_apply_per_task_and_leave_defaults_untouched():
    with ProcessGroupExecutor(2, kill_grace=0.3) as ex:
        quick = ex.options(task_timeout=0.5)
        assert (quick.task_timeout, quick.max_memory, quick.retries) == (0.5, None, 0)
        with pytest.raises(TaskTimeoutError) as ei:
            quick.submit(sleep_forever).result(timeout=T)
        assert ei.value.timeout == 0.5
        # The executor's own defaults: no timeout, no limit, no retries.
        assert ex.submit(sleep_then_pid, 1.5).result(timeout=T)
        assert ex.submit(allocate_hold_return, 50 * MiB, 0.3).result(timeout=T) == 50 * MiB
        # Views compose: a view of a view keeps what it does not override.
        both = ex.options(retries=2).options(max_memory=64 * MiB)
        assert (both.task_timeout, both.max_memory, both.retries) == (None, 64 * MiB, 2)
        with pytest.raises(ValueError):
            ex.options(retries=-1)
        with pytest.raises(ValueError):
            ex.options(max_memory=0)
        with pytest.raises(ValueError):
            ex.options(task_timeout=0)


def test_options_map_applies_settings(tmp_path):
    with ProcessGroupExecutor(2, kill_grace=0.3) as ex:
        out = list(
            ex.options(task_timeout=1.0).map(
                wait_for_gate_or_return, [None, str(tmp_path / "never"), None], [1, 2, 3],
                return_exceptions=True,
            )
        )
        assert out[0] == 1 and out[2] == 3
        assert isinstance(out[1], TaskTimeoutError) and out[1].timeout == 1.0
        paths = [str(tmp_path / f"m{i}") for i in range(3)]
        assert len(list(ex.options(retries=1).map(crash_first_time, paths))) == 3
        out = list(
            ex.options(max_memory=150 * MiB).map(
                allocate_hold_return, [1 * MiB, 300 * MiB], [0.5, 100],
                return_exceptions=True,
            )
        )
        assert out[0] == 1 * MiB and isinstance(out[1], MemoryLimitError)
        # chunksize > 1: the view's settings cover each chunk.
        out = list(
            ex.options(task_timeout=1.0).map(
                wait_for_gate_or_return, [None, None, str(tmp_path / "never")], [1, 2, 3],
                chunksize=2, return_exceptions=True,
            )
        )
        assert out[:2] == [1, 2] and isinstance(out[2], TaskTimeoutError)


# ----------------------------------------------------------------- task_info, stats


def test_task_info_for_each_outcome():
    with ProcessGroupExecutor(1, kill_grace=0.3) as ex:
        assert task_info(Future()) is None
        slow = ex.submit(sleep_then_pid, 0.3)
        seen = []
        slow.add_done_callback(lambda f: seen.append(task_info(f)))
        pid = slow.result(timeout=T)
        info = task_info(slow)
        assert (info.outcome, info.pid, info.attempts, info.peak_memory) == ("ok", pid, 1, None)
        assert 0.3 <= info.duration < 30
        assert wait_until(lambda: seen) and seen[0] is not None  # set before callbacks run

        bad = ex.submit(raise_value_error, 1)
        with pytest.raises(ValueError):
            bad.result(timeout=T)
        info = task_info(bad)
        assert (info.outcome, info.pid, info.attempts) == ("error", pid, 1)
        assert 0 <= info.duration < 30

        hung = ex.options(task_timeout=0.5).submit(sleep_forever)
        with pytest.raises(TaskTimeoutError) as ei:
            hung.result(timeout=T)
        info = task_info(hung)
        assert (info.outcome, info.pid, info.attempts) == ("timeout", ei.value.pid, 1)
        assert 0.5 <= info.duration < 30

        crashed = ex.submit(exit_with, 4)
        with pytest.raises(WorkerCrashedError) as ei:
            crashed.result(timeout=T)
        info = task_info(crashed)
        assert (info.outcome, info.pid, info.attempts) == ("crashed", ei.value.pid, 1)
        assert info.duration is not None and info.duration >= 0

        mem = ex.options(max_memory=150 * MiB).submit(allocate_and_sleep, 300 * MiB)
        with pytest.raises(MemoryLimitError) as ei:
            mem.result(timeout=T)
        info = task_info(mem)
        assert (info.outcome, info.pid, info.attempts) == ("memory", ei.value.pid, 1)
        assert info.peak_memory >= ei.value.rss > 150 * MiB

        pending = ex.submit(sleep_then_pid, 0.5)
        assert task_info(pending) is None or pending.done()
        pending.result(timeout=T)


def test_task_info_peak_memory_is_per_attempt(tmp_path):
    """The attempt that succeeded reports its own peak, not the killed one's."""
    path = str(tmp_path / "attempts")
    with ProcessGroupExecutor(1, retries=1, max_memory=250 * MiB) as ex:
        fut = ex.submit(big_then_small, path)
        assert fut.result(timeout=T) == "small"
        info = task_info(fut)
        assert info.attempts == 2 and info.outcome == "ok"
        assert info.peak_memory < 250 * MiB


def big_then_small(path):
    if _append_pid(path) == 0:
        allocate_and_sleep(400 * MiB)
    time.sleep(0.5)  # long enough to be sampled
    return "small"


def test_stats_counters_exact(tmp_path):
    zero = dict.fromkeys(
        [
            "submitted", "completed", "failed", "cancelled", "timed_out", "crashed",
            "memory_killed", "retried", "workers_started", "workers_killed",
        ],
        0,
    )
    ex = ProcessGroupExecutor(1, kill_grace=0.3)
    assert ex.stats() == zero

    def expect(**changes):
        zero.update(changes)
        got = {k: v for k, v in ex.stats().items() if k != "workers_started"}
        want = {k: v for k, v in zero.items() if k != "workers_started"}
        assert got == want  # workers_started is checked at the end (replacements race)

    assert ex.submit(add, 1, 2).result(timeout=T) == 3
    expect(submitted=1, completed=1)
    with pytest.raises(ValueError):
        ex.submit(raise_value_error).result(timeout=T)
    expect(submitted=2, failed=1)
    with pytest.raises(TaskTimeoutError):
        ex.options(task_timeout=0.5).submit(sleep_forever).result(timeout=T)
    expect(submitted=3, failed=2, timed_out=1, workers_killed=1)
    with pytest.raises(WorkerCrashedError):
        ex.submit(exit_with, 9).result(timeout=T)
    expect(submitted=4, failed=3, crashed=1)
    with pytest.raises(MemoryLimitError):
        ex.options(max_memory=150 * MiB).submit(allocate_and_sleep, 300 * MiB).result(timeout=T)
    expect(submitted=5, failed=4, memory_killed=1, workers_killed=2)
    assert ex.options(retries=1).submit(crash_first_time, str(tmp_path / "once")).result(T)
    expect(submitted=6, completed=2, crashed=2, retried=1)
    with pytest.raises(WorkerCrashedError):
        ex.options(retries=1).submit(exit_with, 9).result(timeout=T)
    expect(submitted=7, failed=5, crashed=4, retried=2)
    assert ex.submit(add, 2, 2).result(timeout=T) == 4  # runs on the last replacement
    expect(submitted=8, completed=3)
    ex.shutdown(wait=True)
    # One worker at first, plus one replacement per kill or crash: 1 + 1 + 1 + 1 + 3.
    zero["workers_started"] = 7
    assert ex.stats() == zero


# ----------------------------------------------------------------- progress


def _postfix_counts(bar):
    text = bar.postfix or ""
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}


def _quiet_bar(**kwargs):
    tqdm = require_extra("tqdm", "progress")
    return tqdm.tqdm(file=io.StringIO(), mininterval=0, **kwargs)


def test_progress_counts_every_outcome_as_it_happens():
    bar = _quiet_bar()
    actions = ["ok", "raise", "hang", "ok", "crash", "memory", "ok"]
    with ProcessGroupExecutor(2, kill_grace=0.3) as ex:
        view = ex.options(task_timeout=2.0, max_memory=150 * MiB)
        out = list(view.map(light.outcome_task, actions, return_exceptions=True, progress=bar))
    assert out[0] == "ok" and isinstance(out[2], TaskTimeoutError)
    assert bar.total == len(actions) and bar.n == len(actions)
    counts = _postfix_counts(bar)
    # failed: every item without a result; then its cause (pgexecutor.counters)
    assert counts == {"ok": 3, "failed": 4, "error": 1, "timeout": 1, "crashed": 1, "memory": 1}
    assert "timeout=1" in bar.fp.getvalue()  # it reached the rendered bar too


def test_progress_advances_as_futures_finish_not_in_order(tmp_path):
    gate = str(tmp_path / "gate")
    bar = _quiet_bar()
    with ProcessGroupExecutor(2) as ex:
        it = ex.map(wait_for_gate_or_return, [gate, None, None, None, None], range(5), progress=bar)
        # The first item blocks and nobody iterates, yet the others finish and count.
        # (At most one may wait in the blocked worker's pipe: the executor prefetches.)
        assert wait_until(lambda: bar.n >= 3), bar.n
        assert bar.n < 5 and _postfix_counts(bar)["ok"] == bar.n
        open(gate, "w").close()
        assert list(it) == [0, 1, 2, 3, 4]
    assert bar.n == 5


def test_progress_counts_items_of_chunks():
    bar = _quiet_bar()
    with ProcessGroupExecutor(2) as ex:
        out = list(ex.map(fail_odd, range(10), chunksize=3, return_exceptions=True, progress=bar))
    assert [x for x in out if not isinstance(x, Exception)] == [0, 2, 4, 6, 8]
    assert (bar.total, bar.n) == (10, 10)
    counts = _postfix_counts(bar)
    assert (counts["ok"], counts["failed"]) == (5, 5)


def test_progress_true_draws_a_tqdm_bar_on_stderr(capsys):
    require_extra("tqdm", "progress")
    with ProcessGroupExecutor(2) as ex:
        assert list(ex.map(add, range(6), range(6), progress=True)) == [0, 2, 4, 6, 8, 10]
        assert list(ex.map(add, range(3), range(3))) == [0, 2, 4]  # default: no bar
    err = capsys.readouterr().err
    assert "6/6" in err and "ok=6" in err
    assert err.count("ok=") >= 1 and "3/3" not in err


def test_progress_accepts_any_bar_like_object():
    """update() and set_postfix() are all a bar needs; tqdm is not imported for it."""

    class Bar:
        def __init__(self):
            self.total = None
            self.n = 0
            self.postfix = {}

        def update(self, n):
            self.n += n

        def set_postfix(self, counts, refresh=True):
            self.postfix = dict(counts)

    bar = Bar()
    with ProcessGroupExecutor(1) as ex:
        out = list(ex.map(fail_odd, range(4), progress=bar, return_exceptions=True))
    assert len(out) == 4
    assert (bar.total, bar.n) == (4, 4)
    assert bar.postfix["ok"] == 2 and bar.postfix["failed"] == 2


def test_progress_without_tqdm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes "import tqdm" fail
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with ProcessGroupExecutor(1) as ex:
        with pytest.raises(ImportError, match=r"pgexecutor\[progress\]"):
            ex.map(add, [1], [2], progress=True)
        with pytest.raises(TypeError):
            ex.map(add, [1], [2], progress="yes")
        class BarClass:
            def update(self, n):
                pass

            def set_postfix(self, counts, refresh=True):
                pass

        with pytest.raises(TypeError):
            ex.map(add, [1], [2], progress=BarClass)  # the class (tqdm), not a bar
        assert ex.stats()["submitted"] == 0  # nothing was submitted before the error
