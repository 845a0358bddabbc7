"""The examples, run for real (reduced size) as their users would run them.

Each example runs as a subprocess with ``--json PATH`` and reports what happened to
every input, the pids of the processes its tasks started and the worker process groups
it created. The tests assert on those outcomes, then check for themselves, with psutil,
that every reported process is gone (by pid AND start time, so a recycled pid is not
mistaken for a survivor) and that no process of any reported worker group survives.

torch_training needs the ``[torch]`` extra and gmsh_meshing the ``[gmsh]`` extra; a test
whose extra is missing is skipped, unless PGEXECUTOR_REQUIRE_EXTRAS is set (for CI),
in which case it fails. swap_in needs nothing extra.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import psutil
import pytest
from conftest import format_survivors, require_extra, run_in_own_session, survivors_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def require(module: str, extra: str) -> None:
    """Skip (or, with PGEXECUTOR_REQUIRE_EXTRAS set, fail) when ``module`` is missing."""
    require_extra(module, extra)


def run_example(tmp_path: Any, name: str, *args: str, limit: float = 120.0) -> dict[str, Any]:
    """Run ``examples/<name>.py *args --json ...``; return its summary (exit code 0 or not).

    The example runs in its own session so that, should it overrun ``limit``, it can be
    killed with everything in its group (its pgexecutor workers are then killed by
    pgexecutor's guardian, which watches the example's process).
    """
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, os.path.join(EXAMPLES, f"{name}.py"), *args, "--json", str(out)]
    proc = run_in_own_session(cmd, ROOT, limit, name)
    stdout, stderr = proc.stdout, proc.stderr
    print(stdout)  # shown by pytest when the test fails
    print(stderr, file=sys.stderr)
    assert out.exists(), f"{name} exited {proc.returncode} without a summary:\n{stderr}"
    summary = json.loads(out.read_text())
    summary["_returncode"] = proc.returncode
    summary["_stdout"] = stdout
    return summary


def alive(pid: int, create_time: float) -> bool:
    """Is this very process (same pid and start time) still running (not a zombie)?"""
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_worker_groups_empty(pgids: list[int]) -> None:
    assert pgids, "the example reported no worker process group"
    left = survivors_of(set(pgids))
    assert not left, "processes of the example's worker groups survived:\n" + format_survivors(left)


# ------------------------------------------------------------------ torch


@pytest.mark.timeout(180)
def test_torch_training_hung_dataloader_is_killed_with_its_group(tmp_path: Any) -> None:
    require("torch", "torch")
    s = run_example(tmp_path, "torch_training", "--quick", "--timeout", "10", limit=150)
    assert s["_returncode"] == 0, s["_stdout"]
    tasks = s["tasks"]
    hung = s["hang_index"]
    assert len(tasks) == 3

    # Which task failed, and how: only the one whose Dataset hangs (injected), by timeout.
    assert [t["outcome"] for t in tasks] == ["timeout" if i == hung else "ok" for i in range(3)]
    assert "exceeded its timeout of 10 s" in tasks[hung]["error"]
    # the task's own thread was stuck waiting for a batch from its DataLoader
    assert "_next_data" in tasks[hung]["hung_in"]
    assert tasks[hung]["hung_in"].endswith("train_task")
    for t in tasks:
        if t["outcome"] == "ok":
            assert math.isfinite(t["train_loss"]) and math.isfinite(t["eval_loss"])
            assert t["eval_loss"] < 50

    # Every task really used DataLoader worker processes, in its own worker's group:
    # 2 for training + 2 for evaluation, or just the 2 training ones for the hung task.
    for i, t in enumerate(tasks):
        assert len(t["dataloader_workers"]) == (2 if i == hung else 4), t["dataloader_workers"]
        assert t["dataloader_pgids"] == [t["worker_pid"]]
        assert t["dataloader_in_worker_group"]
    # The hung task's DataLoader workers died with the group, promptly.
    assert 0 <= tasks[hung]["dataloader_gone_after_deadline"] < 10

    # Checked here, independently of the example: every DataLoader worker is gone...
    workers = [w for t in tasks for w in t["dataloader_workers"]]
    assert len(workers) == 10
    still = [w for w in workers if alive(w["pid"], w["create_time"])]
    assert not still, f"DataLoader workers still alive: {still}"
    # ...and no process of any worker group survives.
    assert_worker_groups_empty(s["worker_pgids"])
    assert s["stats"]["timed_out"] == 1 and s["stats"]["completed"] == 2


# ------------------------------------------------------------------ gmsh

BAD_GMSH = {  # case -> (outcome, signal)
    "bowtie_hang": ("timeout", None),
    "transfinite_hang": ("timeout", None),
    "embed_hang": ("timeout", None),
    "size_formula_abort": ("crashed", "SIGABRT"),
    "size_formula_typo_abort": ("crashed", "SIGABRT"),
    "injected_segfault": ("crashed", "SIGSEGV"),
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "timeout, native", [("5", False), ("auto", False), ("auto", True)],
    ids=["fixed", "learned", "learned-native"],
)
def test_gmsh_meshing_each_bad_input_costs_one_result(
    tmp_path: Any, timeout: str, native: bool
) -> None:
    require("gmsh", "gmsh")
    if native:
        from pgexecutor import _native

        if _native.find_py_spy() is None:
            if os.environ.get("PGEXECUTOR_REQUIRE_EXTRAS"):
                pytest.fail("py-spy (the 'native' extra) is not installed")
            pytest.skip("py-spy is not installed: pip install -e '.[native]'")
    sys.path.insert(0, EXAMPLES)
    try:
        from _gmsh_cases import CASES
    finally:
        sys.path.remove(EXAMPLES)
    extra = ["--native"] if native else []
    s = run_example(tmp_path, "gmsh_meshing", "--quick", "--timeout", timeout, *extra, limit=120)
    assert s["_returncode"] == 0, s["_stdout"]
    inputs = s["inputs"]

    failed = {x["label"]: x for x in inputs if x["outcome"] != "ok"}
    assert set(failed) == set(BAD_GMSH), "exactly the bad inputs fail, one result each"
    for label, (outcome, sig) in BAD_GMSH.items():
        x = failed[label]
        assert x["outcome"] == outcome, (label, x)
        assert x["params"] == CASES[label], "a failure is reported with its parameters"
        if outcome == "timeout":
            assert "generate" in x["hung_in"], x  # stuck inside gmsh's mesher
            if timeout == "auto":  # the limit was learned (or the initial one), and says so
                assert x["derivation"] and "mesh_case" in x["derivation"], x
                assert x["limit"] >= 2.0, x  # the floor
        else:
            assert x["signal"] == sig, (label, x)
    # each bad input killed its own worker: no two failures share one
    assert len({x["worker_pid"] for x in failed.values()}) == len(BAD_GMSH)

    ok = [x for x in inputs if x["outcome"] == "ok"]
    assert len(ok) >= 6
    for x in ok:
        st = x["stats"]
        assert st["nodes"] > 0 and st["elements"] > 0 and st["dim"] in (2, 3), x
        assert st["shape"] == x["params"]["shape"]
    assert s["stats"]["timed_out"] == 3 and s["stats"]["crashed"] == 3
    if timeout == "auto":
        assert s["learned_limit"] >= 2.0
    if native:  # best effort (py-spy may be late under load), but not never
        hung_in = [x["native_in"] for x in failed.values() if x["outcome"] == "timeout"]
        assert any(f and "gmsh::" in f for f in hung_in), hung_in

    assert_worker_groups_empty(s["worker_pgids"])


# ------------------------------------------------------------------ swap_in


@pytest.mark.timeout(120)
def test_swap_in_shows_the_difference_and_leaves_nothing(tmp_path: Any) -> None:
    s = run_example(tmp_path, "swap_in", limit=90)
    assert s["_returncode"] == 0, s["_stdout"]
    assert s["elapsed"] < 60
    ppe, pge = s["ppe"], s["pge"]

    # ProcessPoolExecutor: the wait timed out, the task did not; its worker and child
    # lived on, shutdown blocked, and killing the workers orphaned the child.
    assert ppe["hung_done_after_wait"] is False
    roles = sorted(p["role"] for p in ppe["alive_after_program"])
    assert roles == ["child", "worker", "worker"], ppe["alive_after_program"]
    assert ppe["shutdown_blocked"] is True
    assert [p["cmdline"] for p in ppe["orphans"]] == ["sleep 600"]
    assert ppe["orphans"][0]["ppid"] not in ppe["workers_killed"]
    assert ppe["hung_result"].startswith("BrokenProcessPool")

    # ProcessGroupExecutor: the task itself failed, its child died with the group.
    assert pge["hung_done_after_wait"] is True
    assert pge["hung_result"].startswith("TaskTimeoutError")
    assert pge["alive_after_program"] == []
    assert pge["shutdown_blocked"] is False and pge["shutdown_seconds"] < 5
    assert any(p["cmdline"] == "sleep 600" for p in pge["processes_seen"])

    # Checked here: nothing either run started is alive, and the worker groups are empty.
    for run in (ppe, pge):
        assert run["left"] == []
        still = [p for p in run["processes_seen"] if alive(p["pid"], p["create_time"])]
        assert not still, still
    assert_worker_groups_empty(pge["worker_pgids"])


@pytest.mark.parametrize(
    "name,module,extra",
    [("scaling_dask", "distributed", "dask"), ("scaling_ray", "ray", "ray")],
)
def test_scaling_out_example_runs_and_leaves_nothing(
    tmp_path: Any, name: str, module: str, extra: str
) -> None:
    """The README's "Scaling out" examples: one hang and one crash fail alone, and no
    process of either bad task (or anything it started) survives."""
    require(module, extra)
    s = run_example(tmp_path, name, limit=150)
    assert s["_returncode"] == 0, s["_stdout"]
    assert s["as_expected"] is True, s["outcomes"]
    outcomes = sorted(o["outcome"] for o in s["outcomes"])
    assert outcomes.count("timeout") == 1 and outcomes.count("crashed") == 1, outcomes
    assert s["checked"], "the example checked no process of the bad tasks"
    assert s["survivors"] == []
    # Independently of the example's own check: every process it reported is gone.
    for pid, started in (tuple(p)[:2] for p in s["checked"]):
        try:
            proc = psutil.Process(pid)
            same = abs(proc.create_time() - started) < 0.05  # not a recycled pid
            assert not (same and proc.status() != psutil.STATUS_ZOMBIE), f"pid {pid} survived"
        except psutil.NoSuchProcess:
            pass


# ------------------------------------------------------------------ asyncio_service


@pytest.mark.timeout(120)
def test_asyncio_service_stops_jobs_past_their_deadline_or_whose_client_left(
    tmp_path: Any,
) -> None:
    s = run_example(tmp_path, "asyncio_service", limit=90)
    assert s["_returncode"] == 0, s["_stdout"]
    assert s["answers"] == {"fast": "worked 0.2s", "slow": "deadline exceeded", "gone": "hung up"}
    # Checked here too: every process of the stopped jobs (worker and child) is gone.
    for name in ("slow", "gone"):
        procs = s["procs"][name]
        assert len(procs) == 2
        still = [pid for pid, ctime in procs if alive(pid, ctime)]
        assert not still, f"{name}: processes of the stopped job survived: {still}"
    assert s["stats"]["cancelled"] == 2 and s["stats"]["completed"] == 1
    assert_worker_groups_empty(s["worker_pgids"])


# ------------------------------------------------------------------ demo


@pytest.mark.timeout(150)
def test_demo_table_has_a_header_a_legend_and_the_logs_numbering() -> None:
    """``python examples/demo.py -v``: a header over the table, one line per outcome
    class, and a log whose "task N" is row N of the table, no line said twice."""
    import re

    sys.path.insert(0, EXAMPLES)
    try:
        import demo
    finally:
        sys.path.remove(EXAMPLES)
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "demo.py"), "-v"],
        capture_output=True, text=True, timeout=120, start_new_session=True,
    )
    out = proc.stdout
    print(out, proc.stderr)  # shown by pytest when the test fails
    log = [ln for ln in out.splitlines() if ln.startswith("    [pgexecutor] ")]
    started = [int(m) for m in re.findall(r"started worker pid=(\d+)", out)]
    assert_worker_groups_empty(started)  # every worker the log names: its group is empty
    assert proc.returncode == 0 and "no process survived." in out

    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split() == ["task", "input", "outcome", "detail"])
    rows = {}
    for ln in lines[header + 1 :]:
        m = re.match(r"\s*(\d+)  (\S+)\s+(\S+)\s+(.*)", ln)
        if m and not ln.startswith("    ["):
            rows[int(m[1])] = (m[2], m[3], m[4])
    assert sorted(rows) == list(range(1, len(demo.KINDS) + 1))
    assert [kind for kind, _, _ in rows.values()] == demo.KINDS
    # One explanation line per outcome class the table shows, above it.
    shown = {outcome for _, outcome, _ in rows.values()}
    assert {"ERROR", "TIMEOUT", "CRASHED"} <= shown
    legend = {ln.split()[0] for ln in lines[1:header] if ln.strip()}
    assert shown <= legend
    # The log's "task N" is row N: the timeouts and deaths it names are those rows'.
    timed_out = {int(n) for n in re.findall(r"task (\d+) timed out", out)}
    died = {int(n) for n in re.findall(r"died \(exit code -?\d+\) while running task (\d+)", out)}
    assert timed_out == {n for n, r in rows.items() if r[1] == "TIMEOUT"}
    assert died == {n for n, r in rows.items() if r[1] == "CRASHED"}
    assert [n for n, r in rows.items() if r[1] == "ERROR"] == [8] and "input 8" in rows[8][2]
    assert len(log) == len(set(log)), [ln for ln in log if log.count(ln) > 1]
    ok = sum(1 for r in rows.values() if r[1] == "ok")
    assert f"ok {ok}, failed {len(rows) - ok} (error 1, " in out
