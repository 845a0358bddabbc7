#!/usr/bin/env python3
"""What does ``max_memory`` cost? Two measurements, printed with their ratios.

    python benchmarks/memory_sampling.py [--quick] [--tasks N] [--reps R]

1. **Throughput** with ``max_memory=None`` (nothing is ever sampled) against a limit
   so large it never trips (1 TiB), so every task pays whatever sampling costs: tiny
   tasks (``noop``, through ``map`` and ``submit``) and 30 ms tasks (each sampled
   once), 2 workers. The ratio ``limited / unlimited`` should be close to 1. A third
   column samples every task at its very start (``_supervision.FIRST_SAMPLE = 0``), to
   show why the manager waits a little before a task's first sample.

2. **One ``group_memory()`` call** on a process group of 5 processes (a leader and
   4 children, each holding some written memory), in CPU time (user + system of this
   process, which is what the manager thread spends) and wall time, split into its
   two parts: finding the group's members (a scan of every pid on the machine) and
   reading each member's memory. Also shown: the share of one core spent sampling
   one limited worker at the manager's interval (0.1 s), and the per-process cost of
   the alternatives (psutil's ``memory_full_info()`` PSS, plain RSS).

Every figure is the median of several repetitions. The machine may be shared and
noisy: read ratios, not absolute values.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
_pp = os.environ.get("PYTHONPATH")
if not _pp or REPO_ROOT not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = REPO_ROOT + (os.pathsep + _pp if _pp else "")

import psutil  # noqa: E402

from benchmarks import _tasks  # noqa: E402
from pgexecutor import ProcessGroupExecutor  # noqa: E402
from pgexecutor import _process as proc_mod  # noqa: E402
from pgexecutor import _supervision as supervision  # noqa: E402

HUGE = 1 << 40  # 1 TiB: sampled, never trips
N_WORKERS = 2

# The group for (2): a leader that starts 4 children; each writes 20 MiB and waits.
_HOLD = "import sys, time\ndata = b'\\x01' * (20 << 20)\nprint('ready', flush=True)\ntime.sleep(1000)\n"
_LEADER = (
    "import subprocess, sys, time\n"
    "kids = [subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=subprocess.PIPE)"
    " for _ in range(4)]\n"
    "for k in kids: k.stdout.readline()\n"
    "data = b'\\x01' * (20 << 20)\n"
    "print('ready', flush=True)\n"
    "time.sleep(1000)\n"
)


def _median(xs):
    return statistics.median(xs)


# --------------------------------------------------------------------------- (1)


def _throughput(max_memory, n_tasks, how, first_sample):
    """Tasks per second through a warmed-up pool of N_WORKERS."""
    saved = supervision.FIRST_SAMPLE
    supervision.FIRST_SAMPLE = first_sample
    try:
        with ProcessGroupExecutor(N_WORKERS, max_memory=max_memory) as ex:
            # Warm up: every worker started and has run something.
            list(ex.map(_tasks.sleep_pid, [0.05] * (2 * N_WORKERS)))
            t0 = time.perf_counter()
            if how == "map":
                for _ in ex.map(_tasks.noop, range(n_tasks)):
                    pass
            elif how == "submit":
                fs = [ex.submit(_tasks.noop, i) for i in range(n_tasks)]
                for f in fs:
                    f.result()
            else:  # "30 ms": long enough to be sampled once each
                for _ in ex.map(_tasks.sleep_pid, [0.03] * n_tasks):
                    pass
            return n_tasks / (time.perf_counter() - t0)
    finally:
        supervision.FIRST_SAMPLE = saved


def bench_throughput(n_tasks, reps):
    first = supervision.FIRST_SAMPLE
    n_sleep = max(50, n_tasks // 50)
    print(
        f"\n## 1. Throughput: {n_tasks} x noop (map, submit) and {n_sleep} x sleep(30 ms), "
        f"{N_WORKERS} workers; median (best) of {reps}, configurations interleaved\n"
    )
    print(
        f"Columns: no limit; a 1 TiB limit (first sample {first * 1e3:g} ms into a task, as "
        "shipped); the same limit sampled at every task's start (first sample at 0 ms)."
    )
    print()
    print(
        "| tasks | max_memory=None (tasks/s) | 1 TiB (tasks/s) | ratio | "
        "1 TiB, sample at start (tasks/s) | ratio |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    configs = [(None, first), (HUGE, first), (HUGE, 0.0)]
    out = {}
    for how in ("map", "submit", "30 ms"):
        n = n_sleep if how == "30 ms" else n_tasks
        got: dict[int, list[float]] = {i: [] for i in range(len(configs))}
        for rep in range(reps):  # interleave, rotating the order, so noise hits all alike
            order = list(range(len(configs)))
            order = order[rep % len(order):] + order[: rep % len(order)]
            for i in order:
                got[i].append(_throughput(configs[i][0], n, how, configs[i][1]))
        med = [_median(got[i]) for i in range(len(configs))]
        best = [max(got[i]) for i in range(len(configs))]
        out[how] = med
        print(
            f"| {how} | {med[0]:,.0f} ({best[0]:,.0f}) | {med[1]:,.0f} ({best[1]:,.0f}) | "
            f"{med[1] / med[0]:.2f} ({best[1] / best[0]:.2f}) | "
            f"{med[2]:,.0f} ({best[2]:,.0f}) | {med[2] / med[0]:.2f} ({best[2] / best[0]:.2f}) |"
        )
    return out


# --------------------------------------------------------------------------- (2)


def _start_group():
    leader = subprocess.Popen(
        [sys.executable, "-c", _LEADER, _HOLD],
        stdout=subprocess.PIPE,
        start_new_session=True,  # its own group (pgid == pid); Python 3.10 has no process_group=
    )
    assert leader.stdout is not None
    leader.stdout.readline()
    return leader


def _cpu_and_wall(fn, calls):
    """Median per-call CPU time (this process, user+system) and wall time, in µs."""
    cpu, wall = [], []
    for _ in range(calls):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    # process_time has a coarse tick on some kernels: use the mean for CPU.
    return statistics.fmean(cpu) * 1e6, _median(wall) * 1e6


def bench_group_memory(calls):
    leader = _start_group()
    pgid = leader.pid
    try:
        members = proc_mod.group_members(pgid)
        n_pids = len(psutil.pids())
        total = proc_mod.group_memory(pgid)
        print(
            f"\n## 2. group_memory() on a group of {len(members)} processes "
            f"({total / 2**20:.0f} MiB counted; {n_pids} pids on the machine), "
            f"{calls} calls\n"
        )
        rows = [
            ("group_memory(pgid): the whole sample", lambda: proc_mod.group_memory(pgid)),
            ("  group_members(pgid): scan every pid", lambda: proc_mod.group_members(pgid)),
            (
                f"  process_memory(pid) x {len(members)}",
                lambda: [proc_mod.process_memory(p) for p in members],
            ),
            (
                f"  alternative: psutil memory_full_info().pss x {len(members)}",
                lambda: [psutil.Process(p).memory_full_info().pss for p in members],
            ),
            (
                f"  alternative: psutil memory_info().rss x {len(members)}",
                lambda: [psutil.Process(p).memory_info().rss for p in members],
            ),
        ]
        print("| call | CPU µs/call | wall µs/call |")
        print("| --- | ---: | ---: |")
        results = {}
        for name, fn in rows:
            fn()  # warm
            cpu, wall = _cpu_and_wall(fn, calls)
            results[name] = (cpu, wall)
            print(f"| {name} | {cpu:,.0f} | {wall:,.0f} |")
        cpu = results[rows[0][0]][0]
        interval = supervision.MEMORY_INTERVAL
        share = cpu / 1e6 / interval
        print(
            f"\nSampling one limited worker every {interval:g} s costs the manager "
            f"thread {share * 100:.2f} % of one core ({cpu:,.0f} µs per {interval * 1e3:g} ms)."
        )
        return results
    finally:
        os.killpg(pgid, 9)
        leader.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tasks and calls")
    ap.add_argument("--tasks", type=int, help="tiny tasks per run (default 5000, quick 1000)")
    ap.add_argument("--reps", type=int, help="repetitions (default 7, quick 3)")
    args = ap.parse_args()
    n_tasks = args.tasks or (1000 if args.quick else 5000)
    reps = args.reps or (3 if args.quick else 7)
    calls = 100 if args.quick else 500
    print(
        f"# max_memory sampling cost: Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, psutil {psutil.__version__}"
    )
    tp = bench_throughput(n_tasks, reps)
    gm = bench_group_memory(calls)
    print("\n## Ratios\n")
    for how, (a, b, c) in tp.items():
        print(
            f"- {how}: throughput with a never-tripping limit is {b / a:.2f}x that without "
            f"({c / a:.2f}x if every task were sampled at its start)"
        )
    whole = gm["group_memory(pgid): the whole sample"][0]
    scan = gm["  group_members(pgid): scan every pid"][0]
    print(f"- group_memory: the pid scan is {scan / whole * 100:.0f} % of its CPU time")


if __name__ == "__main__":
    main()
