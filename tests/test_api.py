"""ProcessGroupExecutor behaves like concurrent.futures.ProcessPoolExecutor.

Every test here checks one piece of the standard Executor contract (or one of the
process-group guarantees the rest of the library relies on) and fails if it breaks.
Blocking tasks wait on files ("gates") rather than sleeping, so no test depends on
timing beyond generous bounds. conftest.py checks after each test that every worker
group the test created is empty again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import gc
import importlib
import itertools
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
import weakref
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, CancelledError
from concurrent.futures.process import BrokenProcessPool

import pytest
from _light_tasks import add, square
from conftest import ROOT, format_survivors, group_members, spawned_pgids, survivors_of

from pgexecutor import (  # noqa: F401  (all four are public API)
    MemoryLimitError,
    ProcessGroupExecutor,
    TaskTimeoutError,
    WorkerCrashedError,
)

pytestmark = pytest.mark.timeout(60)

T = 30  # result() timeout: a safety net against hangs, never a performance bound
START_METHODS = ["fork", "spawn", "forkserver"]


# --------------------------------------------------------------------------------------
# Task functions (module level: picklable by reference, importable in spawned workers)
# --------------------------------------------------------------------------------------

_INIT_STATE = None
_PARENT_MARK = None


def echo(x):
    return x


def echo_kwargs(**kwargs):
    return kwargs


def raise_value_error(msg):
    raise ValueError(msg)


class CustomError(Exception):
    def __init__(self, msg, code):
        super().__init__(msg, code)
        self.code = code


def raise_custom(msg, code):
    raise CustomError(msg, code)


def fail_on(x, bad):
    """x * 10, or ValueError('bad x') when x is in ``bad``."""
    if x in (bad if isinstance(bad, (set, frozenset, list, tuple)) else (bad,)):
        raise ValueError(f"bad {x}")
    return x * 10


def sleep_then(delay, value):
    time.sleep(delay)
    return value


def wait_path(path, timeout=15.0):
    """True once ``path`` exists; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def touch(path):
    with open(path, "w"):
        pass
    return path


def gated(started, gate, value):
    """Signal ``started``, then block until ``gate`` exists (or 15 s pass)."""
    touch(started)
    if not wait_path(gate, 15.0):
        return "gate-timeout"
    return value


def worker_identity(delay=0.0):
    time.sleep(delay)
    return os.getpid(), os.getpgid(0), os.getppid()


def set_global(a, b):
    global _INIT_STATE
    _INIT_STATE = (a, b, os.getpid())


def get_global(_=None):
    return _INIT_STATE, os.getpid()


def failing_init(marker):
    raise RuntimeError(f"initializer exploded: {marker}")


def parent_mark(_=None):
    return _PARENT_MARK, os.getpid(), os.getpgid(0)


def record_in_proxies(d, lst, i):
    d[i] = i * i
    lst.append(i)
    return d["seed"] + i


class Payload:
    def __init__(self, n):
        self.n = n
        self.blob = bytes(1024)

    def get_n(self):
        return self.n


def payload_n(p):
    return p.n


def make_payload(n):
    return Payload(n)


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm2(self):
        return self.x * self.x + self.y * self.y


def make_point(x, y):
    return Point(x, y)


def stdin_info(_=None):
    st = os.fstat(0)
    data = os.read(0, 64)  # /dev/null: immediate EOF
    return stat.S_ISCHR(st.st_mode), st.st_rdev, st.st_ino, data


def import_and_get(modname, attr):
    return getattr(importlib.import_module(modname), attr)


def touch_and_wait_for_count(directory, n, timeout=15.0):
    """Register this worker in ``directory``; wait until ``n`` workers registered."""
    touch(os.path.join(directory, str(os.getpid())))
    deadline = time.monotonic() + timeout
    while len(os.listdir(directory)) < n:
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    return len(os.listdir(directory)), os.getpid()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def collected(ref, timeout=5.0):
    """True once the weakly referenced object is gone (the manager may lag a bit)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        if ref() is None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def error_text(exc):
    parts = [str(exc), repr(exc.args), str(getattr(exc, "remote_traceback", "") or "")]
    parts.append("".join(traceback.format_exception(exc)))
    return "\n".join(parts)


def ctx_for(method):
    return multiprocessing.get_context(method) if method else None


def run_script(args, cwd, timeout=50):
    """Run ``python *args`` with pgexecutor importable; return its stdout.

    The script prints ``PGIDS [...]`` (its spawned worker groups) and ``OK``; the
    groups must be empty once it exits.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    pgids = []
    for line in proc.stdout.splitlines():
        if line.startswith("PGIDS "):
            pgids = json.loads(line[len("PGIDS ") :])
    left = survivors_of(pgids)
    assert not left, "the script's worker groups outlived it:\n" + format_survivors(left)
    return proc.stdout


SCRIPT_PGIDS = textwrap.dedent(
    """
    def _print_pgids():
        import json
        try:
            from pgexecutor import spawned_groups
            print("PGIDS", json.dumps(sorted(spawned_groups())))
        except Exception as err:
            print("PGIDS []  # no introspection:", err)
    """
)


# --------------------------------------------------------------------------------------
# submit / result / exceptions
# --------------------------------------------------------------------------------------


def test_is_an_executor():
    with ProcessGroupExecutor(max_workers=1) as ex:
        assert isinstance(ex, concurrent.futures.Executor)


def test_max_workers_is_the_number_of_workers_chosen():
    """``ex.max_workers``: what was given, or what ``None`` chose (the CPUs this
    process may run on, not the machine's count); read-only. Starts no process."""
    ex = ProcessGroupExecutor(max_workers=3)
    try:
        assert ex.max_workers == 3
        with pytest.raises(AttributeError):
            ex.max_workers = 5  # type: ignore[misc]
        assert ex.max_workers == 3
    finally:
        ex.shutdown()
    ex = ProcessGroupExecutor()
    try:
        expected = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
        assert ex.max_workers == expected
    finally:
        ex.shutdown()


def test_submit_result_and_done_callback():
    with ProcessGroupExecutor(max_workers=2) as ex:
        f = ex.submit(pow, 2, 10)
        assert isinstance(f, concurrent.futures.Future)
        assert f.result(timeout=T) == 1024
        assert f.done() and not f.cancelled() and f.exception() is None
        assert ex.submit(add, 1, b=41).result(timeout=T) == 42

        seen, called = [], threading.Event()

        def cb(fut):
            seen.append(fut.result())
            called.set()

        ex.submit(square, 9).add_done_callback(cb)
        assert called.wait(T) and seen == [81]


def test_task_exception_propagates_with_type_args_and_traceback():
    with ProcessGroupExecutor(max_workers=2) as ex:
        f = ex.submit(raise_value_error, "bad thing")
        exc = f.exception(timeout=T)
        assert type(exc) is ValueError and exc.args == ("bad thing",)
        with pytest.raises(ValueError, match="bad thing"):
            f.result()
        # the remote frames are visible (PPE: via __cause__; here via tblib or cause)
        assert "raise_value_error" in "".join(traceback.format_exception(exc))

        exc2 = ex.submit(raise_custom, "custom", 7).exception(timeout=T)
        assert type(exc2) is CustomError and exc2.code == 7 and exc2.args == ("custom", 7)
        # the pool is still usable after task exceptions
        assert ex.submit(square, 3).result(timeout=T) == 9


def test_large_arguments_and_results_roundtrip():
    big = os.urandom(8 * 2**20)
    with ProcessGroupExecutor(max_workers=2) as ex:
        assert ex.submit(echo, big).result(timeout=T) == big


def test_submit_fn_and_self_keywords_go_to_the_callable():
    with ProcessGroupExecutor(max_workers=1) as ex:
        assert ex.submit(echo_kwargs, fn=1).result(timeout=T) == {"fn": 1}
        assert ex.submit(echo_kwargs, self=2, fn=3).result(timeout=T) == {"self": 2, "fn": 3}
        with pytest.raises(TypeError):
            ex.submit()
        with pytest.raises(TypeError):
            ex.submit(fn=square)  # fn is positional-only


# --------------------------------------------------------------------------------------
# map
# --------------------------------------------------------------------------------------


def test_map_keeps_order():
    with ProcessGroupExecutor(max_workers=2) as ex:
        delays = [0.05 * ((7 * i) % 5) for i in range(12)]  # later items often finish first
        assert list(ex.map(sleep_then, delays, range(12))) == list(range(12))
        assert list(ex.map(square, range(30))) == [i * i for i in range(30)]
        assert list(ex.map(square, [])) == []


def test_map_stops_at_shortest_iterable():
    with ProcessGroupExecutor(max_workers=2) as ex:
        assert list(ex.map(add, [1, 2, 3], [10, 20])) == [11, 22]
        # an endless iterable is fine as long as another one ends
        assert list(ex.map(add, itertools.count(), [1, 2, 3])) == [1, 3, 5]


def test_map_submits_without_being_iterated(tmp_path):
    paths = [str(tmp_path / f"m{i}") for i in range(4)]
    with ProcessGroupExecutor(max_workers=2) as ex:
        it = ex.map(touch, paths)
        assert all(wait_path(p, 15) for p in paths), "map() must schedule before iteration"
        assert list(it) == paths


def test_map_raises_task_exception_at_its_position():
    with ProcessGroupExecutor(max_workers=2) as ex:
        got = []
        with pytest.raises(ValueError, match="bad 3"):
            for v in ex.map(fail_on, range(6), itertools.repeat(3)):
                got.append(v)
        assert got == [0, 10, 20]


def test_map_timeout_raises_from_the_iterator(tmp_path):
    gate = str(tmp_path / "gate")
    with ProcessGroupExecutor(max_workers=2) as ex:
        list(ex.map(square, range(4)))  # warm up: worker start-up is not part of the timeout
        it = ex.map(gated, [str(tmp_path / "s0"), str(tmp_path / "s1")],
                    [str(tmp_path / "open"), gate], ["first", "second"], timeout=1.0)
        touch(str(tmp_path / "open"))
        assert next(it) == "first"
        with pytest.raises(concurrent.futures.TimeoutError) as ei:
            next(it)
        # a map() timeout is a wait timeout, not a killed task
        assert type(ei.value) is concurrent.futures.TimeoutError
        touch(gate)


@pytest.mark.parametrize("chunksize", [2, 7, 100])
def test_map_chunksize_gives_same_results(chunksize):
    with ProcessGroupExecutor(max_workers=2) as ex:
        expected = [a + b for a, b in zip(range(50), range(50, 100), strict=False)]
        assert list(ex.map(add, range(50), range(50, 100), chunksize=chunksize)) == expected
        # an exception still surfaces, after every result of the chunks before it
        got = []
        with pytest.raises(ValueError, match="bad 9"):
            for v in ex.map(fail_on, range(20), itertools.repeat(9), chunksize=chunksize):
                got.append(v)
        assert got == [i * 10 for i in range(len(got))]
        assert len(got) >= (9 // chunksize) * chunksize and len(got) <= 9


def test_map_chunksize_must_be_positive():
    with ProcessGroupExecutor(max_workers=1) as ex:
        with pytest.raises(ValueError):
            list(ex.map(square, range(3), chunksize=0))


def test_map_return_exceptions_yields_them_in_place():
    with ProcessGroupExecutor(max_workers=2) as ex:
        res = list(ex.map(fail_on, range(7), itertools.repeat((2, 5)), return_exceptions=True))
    assert len(res) == 7
    for i, r in enumerate(res):
        if i in (2, 5):
            assert isinstance(r, ValueError) and str(r) == f"bad {i}"
        else:
            assert r == i * 10


# --------------------------------------------------------------------------------------
# as_completed / wait / asyncio
# --------------------------------------------------------------------------------------


def test_as_completed():
    with ProcessGroupExecutor(max_workers=2) as ex:
        fs = [ex.submit(sleep_then, d, i) for i, d in enumerate([0.3, 0.0, 0.2, 0.1])]
        bad = ex.submit(raise_value_error, "ac")
        seen, errors = [], []
        for f in concurrent.futures.as_completed(fs + [bad], timeout=T):
            assert f.done()
            if f.exception() is not None:
                errors.append(f.exception())
            else:
                seen.append(f.result())
        assert sorted(seen) == [0, 1, 2, 3]
        assert len(errors) == 1 and str(errors[0]) == "ac"


def test_wait(tmp_path):
    gate = str(tmp_path / "gate")
    with ProcessGroupExecutor(max_workers=2) as ex:
        fs = [ex.submit(square, i) for i in range(5)]
        done, not_done = concurrent.futures.wait(fs, timeout=T)
        assert done == set(fs) and not not_done

        blocker = ex.submit(gated, str(tmp_path / "started"), gate, "released")
        assert wait_path(str(tmp_path / "started"))
        quick = ex.submit(square, 4)
        done, not_done = concurrent.futures.wait([blocker, quick], timeout=T,
                                                 return_when=FIRST_COMPLETED)
        assert quick in done and blocker in not_done

        err = ex.submit(raise_value_error, "first exception")
        done, not_done = concurrent.futures.wait([blocker, err], timeout=T,
                                                 return_when=FIRST_EXCEPTION)
        assert err in done and blocker in not_done

        done, not_done = concurrent.futures.wait([blocker], timeout=0.2)
        assert not done and not_done == {blocker}
        touch(gate)
        assert blocker.result(timeout=T) == "released"


def test_asyncio_run_in_executor():
    async def main(ex):
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(ex, square, i) for i in range(6)))
        with pytest.raises(ValueError, match="async boom"):
            await loop.run_in_executor(ex, raise_value_error, "async boom")
        wrapped = await asyncio.wrap_future(ex.submit(add, 2, 3))
        return results, wrapped

    with ProcessGroupExecutor(max_workers=2) as ex:
        results, wrapped = asyncio.run(asyncio.wait_for(main(ex), T))
    assert results == [i * i for i in range(6)] and wrapped == 5


# --------------------------------------------------------------------------------------
# context manager and shutdown
# --------------------------------------------------------------------------------------


def test_context_manager_waits_and_shuts_down():
    ex = ProcessGroupExecutor(max_workers=2)
    with ex as entered:
        assert entered is ex
        fs = [ex.submit(sleep_then, 0.2, i) for i in range(4)]
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_context_manager_does_not_swallow_exceptions():
    with pytest.raises(KeyError):
        with ProcessGroupExecutor(max_workers=1) as ex:
            ex.submit(square, 2).result(timeout=T)
            raise KeyError("propagates")


def test_shutdown_wait_true_finishes_work_and_reaps_workers():
    ex = ProcessGroupExecutor(max_workers=2)
    fs = [ex.submit(worker_identity, 0.2) for _ in range(5)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in fs)
    pids = {f.result()[0] for f in fs}
    # "resources freed" on return: the workers have exited and been reaped already
    left = [m for pid in pids for m in group_members(pid)]
    assert not left, "workers still present after shutdown(wait=True):\n" + format_survivors(left)


def test_shutdown_wait_false_returns_at_once_and_work_completes(tmp_path):
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    ex = ProcessGroupExecutor(max_workers=1)
    f = ex.submit(gated, started, gate, "done")
    assert wait_path(started)
    queued = ex.submit(square, 5)
    t0 = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - t0 < 5.0
    assert not f.done(), "shutdown(wait=False) must not wait for running tasks"
    with pytest.raises(RuntimeError, match="cannot schedule new futures after"):
        ex.submit(square, 1)
    touch(gate)
    assert f.result(timeout=T) == "done"
    assert queued.result(timeout=T) == 25  # already-submitted work still runs


def test_shutdown_cancel_futures_cancels_queued(tmp_path):
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    ex = ProcessGroupExecutor(max_workers=1)
    try:
        blocker = ex.submit(gated, started, gate, "blocker done")
        assert wait_path(started)
        queued = [ex.submit(square, i) for i in range(6)]
        ex.shutdown(wait=False, cancel_futures=True)
        # with wait=False the cancelling may happen in the background (as in PPE)
        deadline = time.monotonic() + 10
        while sum(q.cancelled() for q in queued) < len(queued) - 1:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert not blocker.done()
        cancelled = [q for q in queued if q.cancelled()]
        # ProcessPoolExecutor may already have handed one item to its call queue
        assert len(cancelled) >= len(queued) - 1, [q._state for q in queued]
        for q in cancelled:
            with pytest.raises(CancelledError):
                q.result(timeout=0)
        touch(gate)
        assert blocker.result(timeout=T) == "blocker done"
        for q in queued:
            if not q.cancelled():
                assert q.result(timeout=T) == queued.index(q) ** 2
    finally:
        touch(gate)
        ex.shutdown(wait=True)


def test_cancel_queued_future(tmp_path):
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with ProcessGroupExecutor(max_workers=1) as ex:
        blocker = ex.submit(gated, started, gate, "ok")
        assert wait_path(started)
        queued = [ex.submit(square, i) for i in range(4)]
        assert queued[-1].cancel() and queued[-1].cancelled()
        touch(gate)
        assert blocker.result(timeout=T) == "ok"
        assert [q.result(timeout=T) for q in queued[:-1]] == [0, 1, 4]
        with pytest.raises(CancelledError):
            queued[-1].result()


def test_shutdown_is_idempotent_and_works_without_tasks():
    ex = ProcessGroupExecutor(max_workers=2)
    ex.shutdown()
    ex.shutdown()
    ex.shutdown(wait=False)
    ex2 = ProcessGroupExecutor(max_workers=2)
    assert ex2.submit(square, 3).result(timeout=T) == 9
    ex2.shutdown(wait=True)
    ex2.shutdown(wait=True)


@pytest.mark.parametrize("wait", [True, False])
def test_submit_after_shutdown_raises_runtime_error(wait):
    ex = ProcessGroupExecutor(max_workers=1)
    ex.submit(square, 1).result(timeout=T)
    ex.shutdown(wait=wait)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after") as ei:
        ex.submit(square, 2)
    assert type(ei.value) is RuntimeError
    with pytest.raises(RuntimeError, match="cannot schedule new futures after"):
        list(ex.map(square, [1, 2]))
    ex.shutdown(wait=True)


# --------------------------------------------------------------------------------------
# constructor arguments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1])
def test_max_workers_must_be_positive(n):
    with pytest.raises(ValueError, match=r"^max_workers must be greater than 0$"):
        ProcessGroupExecutor(max_workers=n)


def test_default_max_workers_is_the_affinity_size(tmp_path):
    n = len(os.sched_getaffinity(0))
    ex = ProcessGroupExecutor()
    try:
        # visible effect: n tasks run at the same time ...
        d = tmp_path / "reg"
        d.mkdir()
        res = [f.result(timeout=T) for f in
               [ex.submit(touch_and_wait_for_count, str(d), n) for _ in range(n)]]
        assert all(count >= n for count, _ in res)
        # ... and never more than n workers
        pids = {pid for pid, _, _ in ex.map(worker_identity, [0.05] * (3 * n))}
        assert len(pids) <= n
    finally:
        ex.shutdown(wait=True)


def test_default_max_workers_follows_cpu_affinity_not_cpu_count(tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs to tell affinity from cpu_count")
    script = textwrap.dedent(
        """
        import json, os, time
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        from pgexecutor import ProcessGroupExecutor

        def slow_pid(_):
            time.sleep(0.1)
            return os.getpid()

        with ProcessGroupExecutor() as ex:
            mw = getattr(ex, "_max_workers", None)
            pids = set(ex.map(slow_pid, range(6)))
        print(json.dumps({"mw": mw, "npids": len(pids)}))
        _print_pgids()
        print("OK")
        """
    )
    out = run_script(["-c", SCRIPT_PGIDS + script], cwd=str(tmp_path))
    info = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert info["mw"] in (None, 1) and info["npids"] == 1, info


@pytest.mark.parametrize("method", [None, "spawn"])
def test_initializer_and_initargs_are_visible_to_tasks(method):
    with ProcessGroupExecutor(max_workers=2, mp_context=ctx_for(method),
                              initializer=set_global, initargs=("configured", 7)) as ex:
        res = [f.result(timeout=T) for f in [ex.submit(get_global) for _ in range(6)]]
    for state, pid in res:
        assert state == ("configured", 7, pid)  # ran in that very worker
    assert _INIT_STATE is None  # ... and not in the parent


def test_failing_initializer_fails_futures_instead_of_hanging():
    ex = ProcessGroupExecutor(max_workers=2, initializer=failing_init, initargs=("marker-8731",))
    try:
        f = ex.submit(square, 3)
        with pytest.raises(BrokenProcessPool) as ei:
            f.result(timeout=20)
        assert "marker-8731" in error_text(ei.value)
        # later work fails too (at submit, like PPE's broken pool, or via its future)
        try:
            f2 = ex.submit(square, 4)
        except BrokenProcessPool:
            pass
        else:
            with pytest.raises(BrokenProcessPool):
                f2.result(timeout=20)
    finally:
        ex.shutdown(wait=True)


def test_max_tasks_per_child_recycles_workers():
    with ProcessGroupExecutor(max_workers=1, max_tasks_per_child=2) as ex:
        infos = [ex.submit(worker_identity).result(timeout=T) for _ in range(6)]
    pids = [pid for pid, _, _ in infos]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5], pids
    assert len(set(pids)) == 3
    assert all(pgid == pid for pid, pgid, _ in infos)  # replacements lead their groups too

    with ProcessGroupExecutor(max_workers=2, max_tasks_per_child=1) as ex:
        pids = [pid for pid, _, _ in ex.map(worker_identity, [0.0] * 6)]
    assert len(set(pids)) == 6
    known = spawned_pgids()
    if known is not None:
        assert set(pids) <= known


@pytest.mark.parametrize("n", [0, -1])
def test_max_tasks_per_child_must_be_positive(n):
    with pytest.raises(ValueError):
        ProcessGroupExecutor(max_workers=1, max_tasks_per_child=n)


@pytest.mark.parametrize("method", START_METHODS)
def test_mp_context_start_methods(method, monkeypatch):
    # a value set in the parent before the pool starts: only forked workers inherit it
    monkeypatch.setattr(sys.modules[__name__], "_PARENT_MARK", "set-in-parent")
    with ProcessGroupExecutor(max_workers=2, mp_context=multiprocessing.get_context(method)) as ex:
        infos = [f.result(timeout=T) for f in [ex.submit(parent_mark) for _ in range(4)]]
        assert ex.submit(lambda x: x * 3, 5).result(timeout=T) == 15
        assert list(ex.map(square, range(5))) == [0, 1, 4, 9, 16]
    for mark, pid, pgid in infos:
        assert pgid == pid != os.getpgrp()
        assert (mark == "set-in-parent") == (method == "fork"), (method, mark)


@pytest.mark.parametrize("method", [None, "spawn", "forkserver"])
def test_manager_proxies_as_arguments(method):
    with multiprocessing.Manager() as mgr:
        d = mgr.dict(seed=100)
        lst = mgr.list()
        with ProcessGroupExecutor(max_workers=2, mp_context=ctx_for(method)) as ex:
            fs = [ex.submit(record_in_proxies, d, lst, i) for i in range(6)]
            assert [f.result(timeout=T) for f in fs] == [100 + i for i in range(6)]
        assert {k: v for k, v in d.items() if k != "seed"} == {i: i * i for i in range(6)}
        assert sorted(lst) == list(range(6))


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------


def test_finished_futures_do_not_keep_arguments_or_results_alive():
    with ProcessGroupExecutor(max_workers=2) as ex:
        arg = Payload(5)
        arg_ref = weakref.ref(arg)
        f = ex.submit(payload_n, arg)
        assert f.result(timeout=T) == 5
        del arg
        assert collected(arg_ref), "argument kept alive by a finished future / the executor"

        obj = Payload(6)
        obj_ref = weakref.ref(obj)
        f2 = ex.submit(obj.get_n)  # the callable itself must not be kept either
        assert f2.result(timeout=T) == 6
        del obj
        assert collected(obj_ref), "callable kept alive by a finished future / the executor"

        f3 = ex.submit(make_payload, 7)
        res = f3.result(timeout=T)
        assert type(res) is Payload and res.n == 7
        res_ref, fut_ref = weakref.ref(res), weakref.ref(f3)
        del res, f3
        assert collected(fut_ref), "finished future kept alive by the executor"
        assert collected(res_ref), "result kept alive by the executor"

        for item in ex.map(make_payload, range(4)):
            item_ref = weakref.ref(item)
            del item
            assert collected(item_ref), "map() iterator keeps yielded results alive"
        del f, f2


# --------------------------------------------------------------------------------------
# process groups and the worker environment
# --------------------------------------------------------------------------------------


def test_each_worker_leads_its_own_process_group():
    with ProcessGroupExecutor(max_workers=2) as ex:
        infos = [f.result(timeout=T) for f in [ex.submit(worker_identity, 0.2) for _ in range(4)]]
        pids = {pid for pid, _, _ in infos}
        for pid, pgid, _ in infos:
            assert pgid == pid, "worker is not its group's leader"
            assert pgid != os.getpgrp(), "worker shares the parent's group"
        assert len({pgid for _, pgid, _ in infos}) == len(pids)
        known = spawned_pgids()
        if known is not None:
            assert pids <= known, "spawned_pgids() misses a worker"
        for pid in pids:  # the parent sees the worker in that group while it lives
            assert pid in [m["pid"] for m in group_members(pid)]


@pytest.mark.parametrize("method", [None, "spawn"])
def test_worker_stdin_is_dev_null(method):
    devnull = os.stat(os.devnull)
    # make the parent's fd 0 something else, so inheriting it would be caught
    r, w = os.pipe()
    os.write(w, b"parent stdin must not reach workers")
    saved = os.dup(0)
    os.dup2(r, 0)
    try:
        with ProcessGroupExecutor(max_workers=1, mp_context=ctx_for(method)) as ex:
            is_chr, rdev, ino, data = ex.submit(stdin_info).result(timeout=T)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(r)
        os.close(w)
    assert is_chr and rdev == devnull.st_rdev and ino == devnull.st_ino
    assert data == b""


def test_lambdas_closures_partials_and_classes():
    factor = 7

    class Local:
        def __init__(self, v):
            self.v = v

    def build_local(x):
        return Local(x * factor)

    with ProcessGroupExecutor(max_workers=2) as ex:
        assert ex.submit(lambda: 42).result(timeout=T) == 42
        assert ex.submit(lambda x: x * factor, 6).result(timeout=T) == 42
        r = ex.submit(build_local, 5).result(timeout=T)
        assert isinstance(r, Local) and r.v == 35
        back = ex.submit(lambda loc: Local(loc.v + 1), Local(1)).result(timeout=T)
        assert isinstance(back, Local) and back.v == 2
        p = ex.submit(make_point, 1, 2).result(timeout=T)
        assert isinstance(p, Point) and (p.x, p.y) == (1, 2)
        assert ex.submit(Point.norm2, Point(3, 4)).result(timeout=T) == 25
        assert ex.submit(functools.partial(add, 1), 2).result(timeout=T) == 3
        assert list(ex.map(lambda a, b: a - b, [5, 6], [1, 2])) == [4, 4]


MAIN_SCRIPT = SCRIPT_PGIDS + textwrap.dedent(
    """
    import multiprocessing, sys
    from pgexecutor import ProcessGroupExecutor

    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def total(self):
            return self.x + self.y

    def make_point(x, y):
        return Point(x * 10, y * 10)

    def main(method):
        ctx = multiprocessing.get_context(method) if method else None
        with ProcessGroupExecutor(max_workers=2, mp_context=ctx) as ex:
            p = ex.submit(make_point, 1, 2).result(timeout=30)
            assert isinstance(p, Point), type(p)
            assert p.total() == 30
            assert ex.submit(Point.total, Point(4, 5)).result(timeout=30) == 9
            pts = list(ex.map(make_point, [1, 2], [3, 4]))
            assert [(q.x, q.y) for q in pts] == [(10, 30), (20, 40)]
        _print_pgids()
        print("OK")

    if __name__ == "__main__":
        main(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "default" else None)
    """
)


@pytest.mark.parametrize(
    "form,method", [("-c", "default"), ("script", "default"), ("script", "spawn")]
)
def test_objects_defined_in_main_module(tmp_path, form, method):
    if form == "-c":
        args = ["-c", MAIN_SCRIPT, method]
    else:
        path = tmp_path / "user_script.py"
        path.write_text(MAIN_SCRIPT)
        args = [str(path), method]
    out = run_script(args, cwd=str(tmp_path))
    assert out.strip().splitlines()[-1] == "OK", out


@pytest.mark.parametrize("method", [None, "spawn", "forkserver"])
def test_workers_see_the_parents_sys_path(tmp_path, monkeypatch, method):
    name = f"pgx_probe_{uuid.uuid4().hex[:10]}"
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / f"{name}.py").write_text(
        "VALUE = 'from the extra path'\n\ndef triple(x):\n    return 3 * x\n"
    )
    monkeypatch.syspath_prepend(str(extra))
    with ProcessGroupExecutor(max_workers=1, mp_context=ctx_for(method)) as ex:
        assert ex.submit(import_and_get, name, "VALUE").result(timeout=T) == "from the extra path"
        mod = importlib.import_module(name)
        try:
            # a function from that module travels by reference: the worker imports it
            assert ex.submit(mod.triple, 4).result(timeout=T) == 12
        finally:
            sys.modules.pop(name, None)


def test_group_members_helper_sees_a_workers_group():
    with ProcessGroupExecutor(max_workers=1) as ex:
        pid, pgid, _ = ex.submit(worker_identity).result(timeout=T)
        members = group_members(pgid)
        assert [m["pid"] for m in members] == [pid]
        assert collections.Counter(m["pgid"] for m in members) == {pgid: 1}
