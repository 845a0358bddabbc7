"""Scaling out with Dask: per-task timeouts that kill whole process trees, on a cluster.

Run it with ``python examples/scaling_dask.py`` (needs the ``[dask]`` extra; about 15 s).
It starts a ``LocalCluster(processes=True)`` with 2 workers of 1 thread (or uses
``--scheduler ADDRESS``), registers :class:`pgexecutor.dask.ProcessGroupPlugin` and
submits eight inputs of a small "sweep". Two of them misbehave, INJECTED to show what
happens:

* input 3 starts a child process (``sleep 600``, standing in for a solver) and hangs
  waiting for it. It runs under ``dask.annotate(task_timeout=3)``: after 3 s the
  client gets TaskTimeoutError and the task's whole process group, child included, is
  killed; the Dask worker lives on and takes the next task.
* input 5 dies abruptly (``os._exit``, as a segfaulting extension would): the client
  gets WorkerCrashedError for that input only; no Dask worker is lost and the scheduler
  does not reschedule it onto another victim.

Every task reports the pids of the processes it started; at the end the script checks
with psutil (pid and start time) that none survived, and exits 1 if one did.
``--json PATH`` writes a machine-readable summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import dask
import psutil
from dask.distributed import Client, LocalCluster, wait

from pgexecutor import TaskTimeoutError, WorkerCrashedError
from pgexecutor.dask import ProcessGroupPlugin

INPUTS = list(range(8))
HANGS, CRASHES = 3, 5  # INJECTED faults
TIMEOUT = 3.0


def job(x: int, report_dir: str) -> dict[str, Any]:
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
    return {"input": x, "square": x * x, "pid": me["pid"]}


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


def run(client: Client, report_dir: str) -> dict[str, Any]:
    client.register_plugin(ProcessGroupPlugin(task_timeout=60, kill_grace=0.5))
    t0 = time.monotonic()
    futures = []
    for x in INPUTS:
        if x == HANGS:
            with dask.annotate(task_timeout=TIMEOUT):  # per task, overrides the plugin's 60 s
                futures.append(client.submit(job, x, report_dir, pure=False))
        else:
            futures.append(client.submit(job, x, report_dir, pure=False))
    wait(futures)
    outcomes = []
    for x, fut in zip(INPUTS, futures, strict=True):
        exc = fut.exception()
        if exc is None:
            res = fut.result()
            outcomes.append({"input": x, "outcome": "ok", "result": res["square"]})
            line = f"ok       {res['square']}"
        elif isinstance(exc, TaskTimeoutError):
            outcomes.append({"input": x, "outcome": "timeout", "error": str(exc)})
            line = f"TIMEOUT  {exc}"
        elif isinstance(exc, WorkerCrashedError):
            outcomes.append({"input": x, "outcome": "crashed", "exitcode": exc.exitcode})
            line = f"CRASHED  {exc}"
        else:
            outcomes.append({"input": x, "outcome": "error", "error": repr(exc)})
            line = f"ERROR    {exc!r}"
        print(f"  input {x}: {line}")
    elapsed = time.monotonic() - t0

    # The processes of the two bad tasks, and what they started, must be gone. (The
    # task processes of the good inputs stay, idle, for the next tasks.)
    must_be_gone = []
    for x in (HANGS, CRASHES):
        with open(os.path.join(report_dir, f"{x}.json")) as f:
            must_be_gone += json.load(f)["procs"]
    deadline = time.monotonic() + 15
    while (survivors := [p for p in must_be_gone if alive(*p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {"outcomes": outcomes, "elapsed": elapsed, "checked": must_be_gone,
            "survivors": survivors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheduler", help="address of a running Dask scheduler")
    ap.add_argument("--json", help="write a summary here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as report_dir:
        if args.scheduler:
            with Client(args.scheduler) as client:
                summary = run(client, report_dir)
        else:
            print("starting a LocalCluster: 2 workers x 1 thread, processes=True")
            with LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                # Dask logs every failed task ("Compute Failed") with its traceback; the
                # two failures here are expected, so keep the output to this script's.
                silence_logs=logging.CRITICAL,
            ) as cluster, Client(cluster) as client:
                summary = run(client, report_dir)
    ok = [o["outcome"] for o in summary["outcomes"]] == [
        "timeout" if x == HANGS else "crashed" if x == CRASHES else "ok" for x in INPUTS
    ]
    print(f"\n{len(INPUTS)} inputs in {summary['elapsed']:.1f} s; "
          f"{len(summary['checked'])} processes of the bad tasks checked, "
          f"{len(summary['survivors'])} survived")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "as_expected": ok}, f, indent=1)
    return 0 if ok and not summary["survivors"] else 1


if __name__ == "__main__":
    sys.exit(main())
