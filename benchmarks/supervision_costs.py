"""What do the signs-of-life detectors cost?

* ``heartbeat()``: per call, inside a task (the page is mapped: two stores) and
  outside one (a no-op), measured with timeit in that process.
* ``stall_timeout``: one sample of a worker's group (``_process.group_progress``:
  the member scan plus /proc/PID/stat and /proc/PID/io of each member), for a worker
  alone and for a worker with 4 children; the manager takes one per worker every
  ``stall_timeout / 4`` seconds (never below 0.05 s). ``group_memory``'s sample
  (``max_memory``) is printed beside it for scale.

    python benchmarks/supervision_costs.py [--number 200000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = ROOT

from pgexecutor import ProcessGroupExecutor, _process, heartbeat  # noqa: E402


def heartbeat_cost(number: int) -> float:
    """ns per heartbeat() call in this process."""
    heartbeat()  # the first call maps the page
    best = min(timeit.repeat(heartbeat, number=number, repeat=5))
    return best / number * 1e9


def children_then_sleep(n: int, seconds: float) -> int:
    import subprocess

    procs = [subprocess.Popen(["sleep", str(seconds)]) for _ in range(n)]
    time.sleep(seconds)
    for p in procs:
        p.wait()
    return n


def sample_cost(fn, pgid: int, reps: int = 200) -> float:
    """µs per sample of the group ``pgid``."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(pgid)
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000)
    opts = parser.parse_args()
    print(f"heartbeat() outside a task: {heartbeat_cost(opts.number):6.0f} ns per call")
    with ProcessGroupExecutor(1, heartbeat_timeout=60) as ex:
        inside = ex.submit(heartbeat_cost, opts.number).result()
        print(f"heartbeat() inside a task:  {inside:6.0f} ns per call")
        for n in (0, 4):
            fut = ex.submit(children_then_sleep, n, 3.0)
            time.sleep(1.0)  # the children have started
            (pgid,) = ex.worker_pids()
            members = len(_process.group_members(pgid))
            progress = sample_cost(_process.group_progress, pgid)
            memory = sample_cost(_process.group_memory, pgid, reps=50)
            print(
                f"group of {members} process(es): stall sample {progress:7.0f} us, "
                f"memory sample {memory:7.0f} us"
            )
            fut.result()
    import psutil

    pids = len(psutil.pids())
    scan = sample_cost(lambda pgid: _process.group_members(pgid), os.getpgrp())
    print(f"(of which the member scan of all {pids} pids on this machine: {scan:.0f} us)")


if __name__ == "__main__":
    main()
