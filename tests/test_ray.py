"""Ray: RayExecutor on a local ``ray.init(num_cpus=2)``, started once per session.

As in test_dask.py, tasks from tests/_cluster_tasks.py report the pids (and create
times) of the whole tree they start, and the tests poll with psutil until exactly those
processes are gone: they live in Ray's processes' groups, out of sight of conftest's
autouse fixture. ``_cluster_tasks`` travels by value (cloudpickle), so Ray workers need
not import anything from tests/.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import conftest
import pytest
from conftest import read_report, require_extra, run_main_script


def _module_extra(module: str, extra: str):
    """conftest.require_extra, for module level: the whole file skips (or fails in CI)."""
    try:
        return require_extra(module, extra)
    except pytest.skip.Exception as exc:
        pytest.skip(exc.msg, allow_module_level=True)


# Skips without the [ray] extra (fails instead under PGEXECUTOR_REQUIRE_EXTRAS, as in CI).
ray = _module_extra("ray", "ray")

import _cluster_tasks as tasks  # noqa: E402
import cloudpickle  # noqa: E402

from pgexecutor import (  # noqa: E402
    MemoryLimitError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from pgexecutor.ray import ENABLE_HINT, RayExecutor  # noqa: E402

pytestmark = pytest.mark.timeout(150)

GONE_WITHIN = 20.0  # generous: two shared, noisy cores, and Ray's own kill delays


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One local Ray for all of Ray's tests (starting one takes 5-15 s here).

    All of them are in this file, so module scope starts Ray once per session, and it
    also stops Ray before any module that runs later: with Ray's threads alive in this
    process, forking hangs (gRPC and fork), e.g. test_api's ``mp_context="fork"`` case.
    """
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cloudpickle.register_pickle_by_value(tasks)
    yield
    cloudpickle.unregister_pickle_by_value(tasks)
    if started:
        ray.shutdown()


@pytest.fixture
def ex():
    executor = RayExecutor(max_workers=2, kill_grace=0.5)
    yield executor
    executor.terminate_workers()


# ---------------------------------------------------------------- helpers


# Each test here checks against this module's bound (keyword ``timeout`` overrides it).
assert_tree_gone = functools.partial(conftest.assert_tree_gone, timeout=GONE_WITHIN)


# ---------------------------------------------------------------- start-up check


def test_start_up_check_matches_what_ray_workers_are(ex):
    @ray.remote(num_cpus=0)
    def leads():
        return os.getpgid(0) == os.getpid()

    assert ex.worker_process_groups is ray.get(leads.remote(), timeout=60)


def test_start_up_check_explains_how_to_enable_groups(monkeypatch, caplog):
    monkeypatch.setattr(RayExecutor, "_probe_worker", lambda self: (1234, 99))
    with pytest.raises(RuntimeError, match="RAY_process_group_cleanup_enabled=1"):
        RayExecutor(max_workers=1, require_process_groups=True)
    with caplog.at_level("WARNING", logger="pgexecutor"):
        ex = RayExecutor(max_workers=1)
    try:
        assert ex.worker_process_groups is False
        assert ENABLE_HINT in caplog.text and "pid 1234, process group 99" in caplog.text
    finally:
        ex.shutdown()


def test_max_workers_is_the_number_given_or_the_clusters_cpus(monkeypatch):
    """``ex.max_workers``: the number given, or for None the cluster's CPUs (2 in this
    module's Ray) divided by each task's ``num_cpus``; read-only."""
    monkeypatch.setattr(RayExecutor, "_probe_worker", lambda self: (1, 1))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    for kwargs, expected in [
        ({"max_workers": 3}, 3),
        ({}, cpus),
        ({"remote_args": {"num_cpus": 2}}, max(1, cpus // 2)),
    ]:
        ex = RayExecutor(**kwargs)
        try:
            assert ex.max_workers == expected, kwargs
            with pytest.raises(AttributeError):
                ex.max_workers = 7  # type: ignore[misc]
        finally:
            ex.shutdown()


# ---------------------------------------------------------------- the host's design


def test_host_pool_workers_stay_direct_children_after_a_replacement():
    # The guardians rely on Ray worker -> host -> task process being parent -> child
    # (pgexecutor/_ray_host.py). With the default template start a replacement would be
    # the template's child, and Ray's orderly exit (SIGKILL to direct children only)
    # would leave an orphaned host running its task: this failed then.
    from pgexecutor._ray_host import make_pool

    pool = make_pool(0.5)
    try:
        for _ in range(6):  # the template, if one were used, is ready after a few starts
            crashed = pool.submit(os._exit, 3)
            with pytest.raises(WorkerCrashedError):
                crashed.result(timeout=60)
            assert pool.submit(os.getppid).result(timeout=60) == os.getpid()
    finally:
        pool.shutdown()


def test_plain_ray_cancel_reaches_a_task_even_where_sigint_was_ignored():
    # Ray's plain cancel is _thread.interrupt_main(), a no-op while SIGINT is SIG_IGN,
    # which Ray workers inherit from a driver run in the background (nohup, `cmd &` in
    # a script). _run_task gives the main thread Python's handler for the task's span.
    import _thread

    from pgexecutor.ray import _let_cancel_interrupt

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        restore = _let_cancel_interrupt()
        with pytest.raises(KeyboardInterrupt):
            _thread.interrupt_main()
            for _ in range(1000):  # the interpreter raises it at the next check
                time.sleep(0.001)
        restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        _thread.interrupt_main()  # ignored again: nothing is raised
        time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, before)


# ---------------------------------------------------------------- the Executor API


def test_results_map_and_errors(ex):
    assert ex.submit(tasks.add, 2, 3).result(timeout=60) == 5
    assert list(ex.map(tasks.add, range(5), range(5))) == [0, 2, 4, 6, 8]
    assert list(ex.map(tasks.add, range(7), range(7), chunksize=3)) == [0, 2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError, match="boom"):
        ex.submit(tasks.fail, "boom").result(timeout=60)
    out = list(ex.map(tasks.fail, ["a", "b"], return_exceptions=True))
    assert [type(e) for e in out] == [ValueError, ValueError]
    # An argument that cannot be pickled fails its own future at once.
    lock_arg = ex.submit(tasks.add, 1, threading.Lock())
    assert lock_arg.done()
    with pytest.raises(TypeError, match="cannot pickle") as pickling_fault:  # pickle's own error
        lock_arg.result()
    assert pickling_fault.value.pgexecutor_stage == "pickle-arguments"
    # An options() view maps too, and a view of a view keeps the settings it does not set.
    view = ex.options(task_timeout=30).options(retries=1)
    assert (view.task_timeout, view.retries) == (30.0, 1)
    assert list(view.map(tasks.add, range(4), range(4), chunksize=2)) == [0, 2, 4, 6]


def test_map_buffersize_reads_inputs_as_results_are_taken(ex):
    taken = []

    def inputs():
        for i in itertools.count():
            taken.append(i)
            yield i

    with pytest.raises(ValueError, match="buffersize must be None or > 0"):
        ex.map(tasks.add, inputs(), inputs(), buffersize=0)
    for target in (ex, ex.options(task_timeout=60)):
        taken.clear()
        it = target.map(tasks.add, inputs(), itertools.repeat(1), buffersize=2)
        assert len(taken) == 2
        assert [next(it) for _ in range(5)] == [1, 2, 3, 4, 5]
        assert len(taken) == 2 + 5
        it.close()
        assert len(taken) == 2 + 5
    it = ex.map(tasks.add, range(7), range(7), chunksize=3, buffersize=1)
    assert list(it) == [0, 2, 4, 6, 8, 10, 12]


def test_queued_future_can_be_cancelled_and_terminate_kills_running(tmp_path):
    ex = RayExecutor(max_workers=1, kill_grace=0.5)
    path = str(tmp_path / "tree.json")
    hung = ex.submit(tasks.spawn_tree_and_hang, path)
    queued = ex.submit(tasks.add, 1, 1)
    report = read_report(path)
    assert queued.cancel() is True
    ex.terminate_workers()
    with pytest.raises(WorkerCrashedError):
        hung.result(timeout=60)
    assert_tree_gone(report)


# ---------------------------------------------------------------- the guarantees


@pytest.mark.parametrize("how", ["cancel", "shutdown-cancel-futures-thread", "terminate"])
def test_cancelled_futures_reach_wait_at_once(tmp_path, how):
    """As with ProcessGroupExecutor: every way a queued future ends cancelled tells
    wait() and as_completed() at once, not when a worker frees up."""
    from concurrent.futures import as_completed, wait

    ex = RayExecutor(max_workers=1, kill_grace=0.5)
    try:
        path = str(tmp_path / "tree.json")
        hung = ex.submit(tasks.spawn_tree_and_hang, path)
        queued = [ex.submit(tasks.add, i, 1) for i in range(3)]
        report = read_report(path)
        if how == "cancel":
            assert all(f.cancel() for f in queued)
        elif how == "shutdown-cancel-futures-thread":
            t = threading.Thread(target=ex.shutdown, kwargs=dict(wait=False, cancel_futures=True))
            t.start()
            t.join()
        else:
            threading.Thread(target=ex.terminate_workers).start()
        done, not_done = wait(queued, timeout=30)
        assert not not_done and all(f.cancelled() for f in queued)
        assert len(list(as_completed(queued, timeout=30))) == 3
    finally:
        ex.terminate_workers()
    with pytest.raises(WorkerCrashedError):
        hung.result(timeout=60)
    assert_tree_gone(report)


def test_cancel_running_stops_a_running_task_and_its_tree(tmp_path):
    """cancel_running=True: cancel() of a running task returns True, the future is
    cancelled at once, and the task's tree on its node is stopped."""
    from concurrent.futures import CancelledError

    ex = RayExecutor(max_workers=1, kill_grace=0.5, cancel_running=True)
    try:
        path = str(tmp_path / "tree.json")
        fut = ex.submit(tasks.spawn_tree_and_hang, path)
        report = read_report(path)
        assert fut.cancel() is True
        assert fut.cancelled()
        with pytest.raises(CancelledError):
            fut.result(timeout=0)
        assert_tree_gone(report)
        assert ex.submit(tasks.add, 2, 3).result(timeout=60) == 5
    finally:
        ex.terminate_workers()


def test_run_returns_and_its_cancellation_stops_the_tree(ex, tmp_path):
    import asyncio

    path = str(tmp_path / "tree.json")

    async def main():
        assert await ex.run(tasks.add, 1, 2) == 3
        job = asyncio.ensure_future(ex.run(tasks.spawn_tree_and_hang, path))
        while not os.path.exists(path):  # it runs (Ray may take a while to start it)
            await asyncio.sleep(0.05)
        job.cancel()  # as wait_for's timeout or a client gone would
        with pytest.raises(asyncio.CancelledError):
            await job

    asyncio.run(main())
    assert_tree_gone(read_report(path))
    assert ex.submit(tasks.add, 1, 1).result(timeout=60) == 2


def test_hung_task_times_out_and_its_tree_is_gone(ex, tmp_path):
    path = str(tmp_path / "tree.json")
    t0 = time.monotonic()
    fut = ex.options(task_timeout=2).submit(tasks.spawn_tree_and_hang, path)
    report = read_report(path)
    assert report["pid"] == report["pgid"], "the task process does not lead its group"
    with pytest.raises(TaskTimeoutError) as info:
        fut.result(timeout=90)
    assert time.monotonic() - t0 < 30
    assert info.value.timeout == 2 and info.value.pid == report["pid"]
    assert info.value.stack and "spawn_tree_and_hang" in info.value.stack
    assert_tree_gone(report)
    # The same Ray worker pool goes on working.
    assert ex.submit(tasks.add, 1, 1).result(timeout=60) == 2


def test_timeout_counts_from_the_start_not_from_scheduling():
    # 3 tasks handed to Ray at once, 2 CPUs: the third waits in Ray's queue for ~3 s
    # and then runs 3 s. Counted from scheduling it would pass its 4.5 s limit.
    ex = RayExecutor(max_workers=3, kill_grace=0.5)
    try:
        opts = ex.options(task_timeout=4.5)
        futs = [opts.submit(tasks.sleep_and_report, 3.0) for _ in range(3)]
        results = [f.result(timeout=90) for f in futs]
    finally:
        ex.shutdown()
    first_stop = min(r["stop"] for r in results)
    last_start = max(r["start"] for r in results)
    assert last_start >= first_stop - 0.5, f"the third task did not wait: {results}"


def test_crash_gives_worker_crashed_error_and_kills_the_tree(ex, tmp_path):
    path = str(tmp_path / "tree.json")
    fut = ex.submit(tasks.spawn_tree_and_crash, path, "exit")
    with pytest.raises(WorkerCrashedError) as info:
        fut.result(timeout=90)
    assert info.value.exitcode == 3
    assert_tree_gone(read_report(path))


def test_max_memory(ex):
    fut = ex.options(max_memory=150 * 2**20).submit(tasks.hold_memory, 400 * 2**20)
    with pytest.raises(MemoryLimitError) as info:
        fut.result(timeout=90)
    assert info.value.limit == 150 * 2**20


def test_ray_worker_death_gives_worker_crashed_error_and_no_tree_survives(ex, tmp_path):
    # The task SIGKILLs its own Ray worker (its grandparent; the host is its parent):
    # Ray reports the worker lost, and the guardians kill the task's group.
    path = str(tmp_path / "tree.json")
    fut = ex.submit(tasks.spawn_tree_and_signal_ancestors, path, signal.SIGKILL, (2,))
    with pytest.raises(WorkerCrashedError) as info:
        fut.result(timeout=90)
    report = read_report(path)
    assert info.value.pid == report["ancestors"][1]  # the Ray worker
    assert_tree_gone(report)


def test_backstop_force_cancels_a_stuck_ray_worker(tmp_path):
    # The task SIGSTOPs its Ray worker and the host between them, so nothing on that
    # node can enforce the timeout or answer. The driver's backstop (timeout +
    # kill_grace + 2 s margin) force-cancels the Ray task; Ray kills the stopped
    # worker; its guardian kills the host, whose guardian kills the task's group.
    ex = RayExecutor(max_workers=2, kill_grace=0.5, backstop_margin=2.0)
    path = str(tmp_path / "tree.json")
    t0 = time.monotonic()
    fut = ex.options(task_timeout=1).submit(
        tasks.spawn_tree_and_signal_ancestors, path, signal.SIGSTOP, (1, 2)
    )
    try:
        with pytest.raises(TaskTimeoutError):
            fut.result(timeout=120)
        failed_after = time.monotonic() - t0
        report = read_report(path)
        took = assert_tree_gone(report, timeout=40)
        print(f"\nbackstop: failed after {failed_after:.1f} s, tree gone {took:.1f} s later")
        assert failed_after >= 3.0, "the backstop fired before timeout + grace + margin"
    finally:
        ex.terminate_workers()


def test_driver_death_leaves_no_task_tree(tmp_path):
    path = str(tmp_path / "tree.json")
    script = tmp_path / "dying_driver.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
            import cloudpickle, ray
            import _cluster_tasks as tasks
            from pgexecutor.ray import RayExecutor

            cloudpickle.register_pickle_by_value(tasks)
            ray.init(address=sys.argv[1], log_to_driver=False)
            ex = RayExecutor(max_workers=1)
            fut = ex.submit(tasks.spawn_tree_and_hang, sys.argv[2])
            print("SUBMITTED", flush=True)
            time.sleep(600)
            """
        )
    )
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, str(script), address, path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(tmp_path),
    )
    try:
        report = read_report(path, timeout=90)
    finally:
        driver.kill()  # the driver this test started dies without any cleanup
        driver.wait()
    took = assert_tree_gone(report, timeout=60)
    print(f"\ntask tree gone {took:.1f} s after the driver's SIGKILL")


def test_main_functions_and_closures_from_a_driver_script(tmp_path):
    path = str(tmp_path / "tree.json")
    imports = """
        import ray
        from pgexecutor import TaskTimeoutError
        from pgexecutor.ray import RayExecutor
        """
    main = """
        if __name__ == "__main__":
            ray.init(address=sys.argv[1], log_to_driver=False)
            out = {}
            with RayExecutor(max_workers=2, kill_grace=0.5) as ex:
                out["square"] = ex.submit(square, 7).result(timeout=60)
                out["closure"] = ex.submit(make_adder(10), 5).result(timeout=60)
                out["lambda"] = list(ex.map(lambda x: x - 1, [3, 4]))
                fut = ex.options(task_timeout=1.5).submit(hang_with_child, sys.argv[2])
                try:
                    fut.result(timeout=90)
                    out["hang"] = "returned"
                except TaskTimeoutError:
                    out["hang"] = "TaskTimeoutError"
            print("RESULT " + json.dumps(out), flush=True)
        """
    address = ray.get_runtime_context().gcs_address
    out = run_main_script(tmp_path, imports, main, [address, path], timeout=140)
    assert out == {"square": 49, "closure": 15, "lambda": [2, 3], "hang": "TaskTimeoutError"}
    assert_tree_gone(read_report(path))
