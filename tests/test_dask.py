"""Dask: ProcessGroupPlugin on a LocalCluster(processes=True).

Every guarantee is checked against the processes the task itself started: tasks from
tests/_cluster_tasks.py write the pids (and create times) of their whole tree, and the
tests poll with psutil until each of those processes is gone. The processes live in
the Dask worker processes' groups, not ours, so the autouse fixture of conftest.py does
not see them; these tests check them by pid.

One cluster (2 workers x 2 threads) serves the module; the test that SIGKILLs a Dask
worker runs last and waits for the nanny to bring the worker back.
"""

from __future__ import annotations

import functools
import os
import signal
import time

import conftest
import psutil
import pytest
from conftest import (
    children_running,
    procs_alive,
    read_report,
    require_extra,
    run_main_script,
    wait_procs_gone,
)


def _module_extra(module: str, extra: str):
    """conftest.require_extra, for module level: the whole file skips (or fails in CI)."""
    try:
        return require_extra(module, extra)
    except pytest.skip.Exception as exc:
        pytest.skip(exc.msg, allow_module_level=True)


# Skips without the [dask] extra (fails instead under PGEXECUTOR_REQUIRE_EXTRAS, as in CI).
dask = _module_extra("dask", "dask")
_module_extra("distributed", "dask")

import _cluster_tasks as tasks  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

from pgexecutor import MemoryLimitError, TaskTimeoutError, WorkerCrashedError  # noqa: E402
from pgexecutor.dask import DaskProcessGroupExecutor, ProcessGroupPlugin  # noqa: E402

pytestmark = pytest.mark.timeout(120)

DEFAULT_TIMEOUT = 60.0  # the plugin's default; tests that expect a timeout annotate less
GONE_WITHIN = 15.0  # generous: two shared, noisy cores


# ---------------------------------------------------------------- helpers


# Each test here checks against this module's bound (keyword ``timeout`` overrides it).
assert_tree_gone = functools.partial(conftest.assert_tree_gone, timeout=GONE_WITHIN)


# ---------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=True,
        dashboard_address=None,
        worker_dashboard_address=None,
    ) as cl:
        yield cl


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster) as c:
        c.register_plugin(ProcessGroupPlugin(task_timeout=DEFAULT_TIMEOUT, kill_grace=0.5))
        yield c


def worker_addresses(client) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


# ---------------------------------------------------------------- installation


def test_plugin_installs_a_pool_sized_to_the_worker_threads(client):
    def describe(dask_worker):
        ex = dask_worker.executors["default"]
        return {
            "type": type(ex).__name__,
            "max_workers": ex.pool._max_workers,
            "task_timeout": ex.pool.task_settings.timeout,
            "nthreads": dask_worker.state.nthreads,
            "pid": os.getpid(),
        }

    info = client.run(describe)
    assert len(info) == 2
    for d in info.values():
        assert d["type"] == DaskProcessGroupExecutor.__name__
        assert d["max_workers"] == d["nthreads"] == 2
        assert d["task_timeout"] == DEFAULT_TIMEOUT
    # A task runs in a process of its own that leads its group, started by the worker.
    where = client.submit(tasks.where, pure=False).result(timeout=60)
    assert where["pid"] == where["pgid"]
    dask_worker_of(where["ppid"], {d["pid"] for d in info.values()})


def test_two_tasks_of_one_worker_run_side_by_side_in_separate_groups(client):
    addr = worker_addresses(client)[0]
    futs = [
        client.submit(tasks.sleep_and_report, 1.5, workers=[addr], pure=False)
        for _ in range(2)
    ]
    a, b = client.gather(futs)
    assert a["pid"] != b["pid"]
    assert a["start"] < b["stop"] and b["start"] < a["stop"], "they ran one after the other"


def test_results_and_task_errors_travel_as_usual(client):
    assert client.submit(tasks.add, 2, 3).result(timeout=60) == 5
    with pytest.raises(ValueError, match="boom"):
        client.submit(tasks.fail, "boom").result(timeout=60)
    # A graph with dependencies: values flow between task processes.
    x = client.submit(tasks.add, 1, 1)
    y = client.submit(tasks.add, x, 10)
    assert y.result(timeout=60) == 12


# ---------------------------------------------------------------- the guarantees


def test_hung_task_times_out_and_its_tree_is_gone(client, tmp_path):
    path = str(tmp_path / "tree.json")
    t0 = time.monotonic()
    with dask.annotate(task_timeout=2):
        fut = client.submit(tasks.spawn_tree_and_hang, path, pure=False)
    report = read_report(path)
    assert report["pid"] == report["pgid"]
    with pytest.raises(TaskTimeoutError) as info:
        fut.result(timeout=90)
    elapsed = time.monotonic() - t0
    assert info.value.timeout == 2
    assert info.value.pid == report["pid"]
    assert elapsed < 30, f"the 2 s annotation was not honoured ({elapsed:.1f} s)"
    assert_tree_gone(report)


def test_annotations_reach_tasks_of_a_delayed_graph(client, tmp_path):
    path = str(tmp_path / "tree.json")
    with dask.annotate(task_timeout=2):
        hung = dask.delayed(tasks.spawn_tree_and_hang)(path)
    fut = client.compute(hung)
    report = read_report(path)
    with pytest.raises(TaskTimeoutError):
        fut.result(timeout=90)
    assert_tree_gone(report)


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_crash_gives_worker_crashed_error_and_kills_the_tree(client, tmp_path, how):
    path = str(tmp_path / "tree.json")
    fut = client.submit(tasks.spawn_tree_and_crash, path, how, pure=False)
    with pytest.raises(WorkerCrashedError) as info:
        fut.result(timeout=90)
    assert info.value.exitcode == (3 if how == "exit" else -signal.SIGKILL)
    assert_tree_gone(read_report(path))
    # The Dask worker itself did not die: the next task runs normally.
    assert client.submit(tasks.add, 1, 2, pure=False).result(timeout=60) == 3


def test_max_memory_annotation(client):
    with dask.annotate(max_memory="150 MiB"):
        fut = client.submit(tasks.hold_memory, 400 * 2**20, pure=False)
    with pytest.raises(MemoryLimitError) as info:
        fut.result(timeout=90)
    assert info.value.limit == 150 * 2**20
    # Without the annotation the same task fits (the plugin sets no memory limit).
    assert client.submit(tasks.hold_memory, 50 * 2**20, 0.1, pure=False).result(timeout=60)


def test_cancel_kills_the_running_group_and_frees_the_slot(client, tmp_path):
    addr = worker_addresses(client)[0]
    paths = [str(tmp_path / f"tree{i}.json") for i in range(2)]
    # Both threads of one worker hang (no timeout would end them for a minute).
    futs = [
        client.submit(
            tasks.spawn_tree_and_hang, p, workers=[addr], allow_other_workers=False, pure=False
        )
        for p in paths
    ]
    reports = [read_report(p) for p in paths]
    t0 = time.monotonic()
    client.cancel(futs[0])
    quick = client.submit(tasks.add, 20, 22, workers=[addr], allow_other_workers=False, pure=False)
    assert quick.result(timeout=30) == 42
    freed = time.monotonic() - t0
    assert freed < 15, f"the slot took {freed:.1f} s to free"
    assert_tree_gone(reports[0])
    # Only the cancelled task's group was killed.
    assert len(procs_alive(reports[1]["procs"])) == 3
    client.cancel(futs[1])
    assert_tree_gone(reports[1])


def test_main_functions_and_closures_from_a_client_script(client, tmp_path):
    path = str(tmp_path / "tree.json")
    imports = """
        import dask
        from dask.distributed import Client
        from pgexecutor import TaskTimeoutError
        """
    main = """
        if __name__ == "__main__":
            out = {}
            with Client(sys.argv[1]) as client:
                out["square"] = client.submit(square, 7).result(timeout=60)
                out["closure"] = client.submit(make_adder(10), 5).result(timeout=60)
                out["lambda"] = client.submit(lambda x: x - 1, 3).result(timeout=60)
                with dask.annotate(task_timeout=1.5):
                    fut = client.submit(hang_with_child, sys.argv[2], pure=False)
                try:
                    fut.result(timeout=90)
                    out["hang"] = "returned"
                except TaskTimeoutError:
                    out["hang"] = "TaskTimeoutError"
            print("RESULT " + json.dumps(out), flush=True)
        """
    out = run_main_script(tmp_path, imports, main, [client.scheduler.address, path], timeout=110)
    assert out == {"square": 49, "closure": 15, "lambda": 2, "hang": "TaskTimeoutError"}
    assert_tree_gone(read_report(path))


def test_plugin_default_timeout_removal_and_threads_executor(client, tmp_path):
    # The plugin's own default applies to a task without annotations.
    client.register_plugin(ProcessGroupPlugin(task_timeout=1.5, kill_grace=0.5))
    try:
        path = str(tmp_path / "tree.json")
        fut = client.submit(tasks.spawn_tree_and_hang, path, pure=False)
        with pytest.raises(TaskTimeoutError):
            fut.result(timeout=90)
        assert_tree_gone(read_report(path))

        worker_pids = set(client.run(os.getpid).values())
        # The worker's thread pool is still there, by name.
        with dask.annotate(executor="threads"):
            in_threads = client.submit(tasks.where, pure=False).result(timeout=60)
        assert in_threads["pid"] in worker_pids

        # Removing the plugin puts the thread pool back as the default.
        client.unregister_worker_plugin("pgexecutor")
        plain = client.submit(tasks.where, pure=False).result(timeout=60)
        assert plain["pid"] in worker_pids
    finally:
        client.register_plugin(ProcessGroupPlugin(task_timeout=DEFAULT_TIMEOUT, kill_grace=0.5))
    again = client.submit(tasks.where, pure=False).result(timeout=60)
    assert again["pid"] == again["pgid"] and again["pid"] not in worker_pids


def dask_worker_of(ppid: int, dask_workers: set[int]) -> int:
    """The Dask worker that started a task process whose parent is ``ppid``: a
    fresh interpreter is the worker's child, a fork the child of the worker's
    template (pgexecutor's), which is the worker's child."""
    if ppid not in dask_workers:
        ppid = psutil.Process(ppid).ppid()
    assert ppid in dask_workers
    return ppid


def guardians_of(pid: int) -> list[list[float]]:
    found = []
    for child in children_running(pid, "guardian_main"):
        try:
            found.append([child.pid, child.create_time()])
        except psutil.NoSuchProcess:
            pass
    return found


def test_sigkilled_dask_worker_leaves_no_task_tree(client, tmp_path):
    """Runs last in this module: it kills a Dask worker (the nanny restarts it)."""
    path = str(tmp_path / "tree.json")
    fut = client.submit(tasks.spawn_tree_and_hang, path, True, pure=False)
    report = read_report(path)
    dask_workers = set(client.run(os.getpid).values())
    dask_worker = dask_worker_of(report["ppid"], dask_workers)
    guardians = guardians_of(dask_worker)
    assert guardians, "the Dask worker has no pgexecutor guardian"
    t0 = time.monotonic()
    os.kill(dask_worker, signal.SIGKILL)  # a process of the cluster this module started
    assert_tree_gone(report)
    print(f"\ntask tree gone {time.monotonic() - t0:.2f} s after SIGKILL of the Dask worker")
    assert not wait_procs_gone(guardians, GONE_WITHIN), "the guardian outlived its Dask worker"
    # The scheduler reruns the task elsewhere; that run returns at once (once=True).
    assert fut.result(timeout=90) == "second run"
    client.wait_for_workers(2, timeout=90)
