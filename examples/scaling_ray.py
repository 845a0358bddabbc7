"""Scaling out with Ray: the same Executor, errors and per-task timeouts, on a Ray cluster.

Run it with ``python examples/scaling_ray.py`` (needs the ``[ray]`` extra; about 20 s,
most of it starting Ray). It starts a local Ray with 2 CPUs (or joins ``--address``),
makes a :class:`pgexecutor.ray.RayExecutor` and maps a small "sweep" of eight inputs
with ``return_exceptions=True``. Two inputs misbehave, INJECTED to show what happens:

* input 3 starts a child process (``sleep 600``, standing in for a solver) and hangs
  waiting for it. After ``task_timeout`` (3 s, counted from when the task started on
  its node, not from when it was queued) it fails with TaskTimeoutError and the task's
  whole process group, child included, is killed on that node.
* input 5 dies abruptly (``os._exit``, as a segfaulting extension would): that input
  gets WorkerCrashedError; the Ray worker lives on and runs the next task.

The script also prints whether this Ray's workers lead their own process groups (the
start-up check; RayExecutor does not need it) and checks with psutil (pid and start
time) that no process of the two bad tasks survived; it exits 1 if one did.
``--json PATH`` writes a machine-readable summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
import ray

from pgexecutor import TaskTimeoutError, WorkerCrashedError
from pgexecutor.ray import RayExecutor

INPUTS = list(range(8))
HANGS, CRASHES = 3, 5  # INJECTED faults
TIMEOUT = 3.0


def job(x: int, report_dir: str) -> int:
    """One input of the sweep. It runs in a process that leads its own process group."""
    me = {"input": x, "pid": os.getpid(), "pgid": os.getpgid(0), "children": []}
    if x == HANGS:  # INJECTED: a child that never ends, and a task waiting for it
        child = subprocess.Popen(["sleep", "600"])
        me["children"].append([child.pid, psutil.Process(child.pid).create_time()])
        _report(report_dir, me)
        child.wait()
    _report(report_dir, me)
    if x == CRASHES:  # INJECTED: the process dies under the task
        os._exit(11)
    time.sleep(0.3)  # the "work"
    return x * x


def _report(report_dir: str, me: dict[str, Any]) -> None:
    me["procs"] = [[me["pid"], psutil.Process(me["pid"]).create_time()], *me["children"]]
    path = os.path.join(report_dir, f"{me['input']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(me, f)
    os.replace(path + ".tmp", path)


def alive(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", help="address of a running Ray cluster")
    ap.add_argument("--json", help="write a summary here")
    args = ap.parse_args()
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        print("starting a local Ray with 2 CPUs")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    outcomes = []
    with tempfile.TemporaryDirectory() as report_dir:
        with RayExecutor(task_timeout=TIMEOUT, kill_grace=0.5) as ex:
            print(f"Ray workers lead their own process groups: {ex.worker_process_groups}")
            t0 = time.monotonic()
            results = ex.map(job, INPUTS, [report_dir] * len(INPUTS), return_exceptions=True)
            for x, res in zip(INPUTS, results, strict=True):
                if isinstance(res, TaskTimeoutError):
                    outcomes.append({"input": x, "outcome": "timeout", "error": str(res)})
                    line = f"TIMEOUT  {res}"
                elif isinstance(res, WorkerCrashedError):
                    outcomes.append({"input": x, "outcome": "crashed", "exitcode": res.exitcode})
                    line = f"CRASHED  {res}"
                elif isinstance(res, BaseException):
                    outcomes.append({"input": x, "outcome": "error", "error": repr(res)})
                    line = f"ERROR    {res!r}"
                else:
                    outcomes.append({"input": x, "outcome": "ok", "result": res})
                    line = f"ok       {res}"
                print(f"  input {x}: {line}")
            elapsed = time.monotonic() - t0
        # The two bad tasks' processes, and what they started, must be gone. (The task
        # processes of the good inputs stay, idle, for the next tasks.)
        must_be_gone = []
        for x in (HANGS, CRASHES):
            with open(os.path.join(report_dir, f"{x}.json")) as f:
                must_be_gone += json.load(f)["procs"]
        deadline = time.monotonic() + 15
        while (survivors := [p for p in must_be_gone if alive(*p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
    ray.shutdown()
    ok = [o["outcome"] for o in outcomes] == [
        "timeout" if x == HANGS else "crashed" if x == CRASHES else "ok" for x in INPUTS
    ]
    print(f"\n{len(INPUTS)} inputs in {elapsed:.1f} s; {len(must_be_gone)} processes of the "
          f"bad tasks checked, {len(survivors)} survived")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"outcomes": outcomes, "elapsed": elapsed, "checked": must_be_gone,
                       "survivors": survivors, "as_expected": ok}, f, indent=1)
    return 0 if ok and not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
