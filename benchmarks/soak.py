#!/usr/bin/env python3
"""Soak: thousands of tasks, a tenth of them faulty, on 2 workers (issue 20, item 7).

    python benchmarks/soak.py [--tasks 3000] [--faults 0.10] [--timeout 0.5]
                              [--peers pgexecutor,pebble,deadpool] [--seed 1]

The mix (seeded, the same for every pool): ``ok`` tasks return at once; the faulty
tenth is spread evenly over hangs in Python (``time.sleep``), hangs in C (one C call
holding the GIL), segfaults, ``os._exit`` and trees (a task that starts
``sleep 1000`` and hangs). Every task is submitted with a per-task timeout; a pool
that does its job ends each hang after the timeout and keeps going.

The ideal wall time is what the hangs cost at the very least: their count times the
timeout, divided by the workers; everything else is overhead (killing, replacing
workers, the tiny tasks). The row gives wall time / ideal, and checks every outcome:
an ``ok`` task's value, a hang's timeout error, a crash's error. ``leaked`` counts
the ``sleep`` grandchildren of tree tasks still alive a second after the run (each
tree task writes its child's pid and create time; the harness then kills what is
left, by pid).

Peers with a per-task timeout only: ``pebble.ProcessPool`` (``schedule(timeout=)``)
and ``deadpool.Deadpool`` (``deadpool_timeout=``). ProcessPoolExecutor, loky and
multiprocessing.Pool have no per-task timeout (a hang there holds a worker for
good); mpire's ``task_timeout`` cannot stop a hang inside one C call. Neither can
deadpool's (its worker destroys itself from a Python thread, which never runs while
a C call holds the GIL): its row reads "did not finish". Each pool runs in a child
process of its own session, capped at 4 x ideal + 60 s, then killed with its group.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p
)
# Tree tasks write their child's pid and create time here (the workers inherit it).
os.environ.setdefault("PGX_SOAK_DIR", tempfile.mkdtemp(prefix="pgx-soak-"))

import psutil  # noqa: E402

from benchmarks import _soak_tasks as soak  # noqa: E402

WORKERS = 2


def plan(n: int, faults: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    bad = soak.KINDS[1:]
    kinds = ["ok"] * n
    for k, i in enumerate(rng.sample(range(n), round(n * faults))):
        kinds[i] = bad[k % len(bad)]
    return kinds


def expected(kind: str) -> str:
    return {"ok": "value", "hang_py": "timeout", "hang_c": "timeout", "tree": "timeout"}.get(kind, "crash")


# Each runner: submit every task, wait for all, return (wall seconds, outcome list)
# where an outcome is "value", "timeout", "crash" or "wrong: ...".


def run_pgexecutor(kinds: list[str], timeout: float) -> tuple[float, list[str]]:
    from pgexecutor import ProcessGroupExecutor, TaskTimeoutError, WorkerCrashedError

    with ProcessGroupExecutor(WORKERS, task_timeout=timeout) as ex:
        ex.submit(soak.run, "ok", 0).result()  # warm
        t0 = time.perf_counter()
        futs = [ex.submit(soak.run, k, i) for i, k in enumerate(kinds)]
        wait(futs)
        wall = time.perf_counter() - t0
    return wall, [_classify(f, i, TaskTimeoutError, WorkerCrashedError) for i, f in enumerate(futs)]


def run_pebble(kinds: list[str], timeout: float) -> tuple[float, list[str]]:
    from concurrent.futures import TimeoutError as FutTimeout

    import pebble

    pool = pebble.ProcessPool(WORKERS)
    try:
        pool.schedule(soak.run, args=("ok", 0)).result()
        t0 = time.perf_counter()
        futs = [pool.schedule(soak.run, args=(k, i), timeout=timeout) for i, k in enumerate(kinds)]
        wait(futs)
        wall = time.perf_counter() - t0
    finally:
        pool.stop()
        pool.join()
    return wall, [_classify(f, i, FutTimeout, pebble.ProcessExpired) for i, f in enumerate(futs)]


def run_deadpool(kinds: list[str], timeout: float) -> tuple[float, list[str]]:
    import deadpool

    with deadpool.Deadpool(max_workers=WORKERS) as ex:
        ex.submit(soak.run, "ok", 0).result()
        t0 = time.perf_counter()
        futs = [ex.submit(soak.run, k, i, deadpool_timeout=timeout) for i, k in enumerate(kinds)]
        wait(futs)
        wall = time.perf_counter() - t0
    return wall, [
        _classify(f, i, deadpool.TimeoutError, deadpool.ProcessError) for i, f in enumerate(futs)
    ]


RUNNERS: dict[str, Callable[[list[str], float], tuple[float, list[str]]]] = {
    "pgexecutor": run_pgexecutor,
    "pebble": run_pebble,
    "deadpool": run_deadpool,
}


def _classify(fut: Future[Any], i: int, timeout_error: type, crash_error: type) -> str:
    try:
        value = fut.result(timeout=0)
    except timeout_error:
        return "timeout"
    except crash_error:
        return "crash"
    except BaseException as exc:  # noqa: BLE001 - any other outcome is a wrong one
        return f"wrong: {type(exc).__name__}: {exc}"
    return "value" if value == i * 2 else f"wrong: value {value!r}"


def leaked_tree_children() -> list[psutil.Process]:
    """The tree tasks' ``sleep`` children still alive: exactly those the tasks
    reported (pid and create time), so nothing else is ever counted or killed."""
    out = []
    folder = os.environ["PGX_SOAK_DIR"]
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                created = float(f.read())
            p = psutil.Process(int(name))
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError, ValueError):
            pass
        os.unlink(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--faults", type=float, default=0.10)
    ap.add_argument("--timeout", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--peers", default="pgexecutor,pebble,deadpool")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    kinds = plan(args.tasks, args.faults, args.seed)
    hangs = sum(k in soak.HANGS for k in kinds)
    ideal = hangs * args.timeout / WORKERS
    counts = {k: kinds.count(k) for k in soak.KINDS}
    if args._one:
        run_one(args._one, kinds, args.timeout, ideal)
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {WORKERS} workers, "
          f"{args.tasks} tasks, timeout {args.timeout} s, mix {counts}")
    print(f"ideal wall time: {hangs} hangs x {args.timeout} s / {WORKERS} workers = {ideal:.1f} s\n")
    print("| pool | wall s | x ideal | wrong outcomes | leaked processes |")
    print("| --- | ---: | ---: | ---: | ---: |")
    cap = 4 * ideal + 60
    for name in args.peers.split(","):
        if name not in RUNNERS:
            sys.exit(f"unknown pool {name!r}; choose from {', '.join(RUNNERS)}")
        print(_run_capped(name, args, cap), flush=True)


def _run_capped(name: str, args: argparse.Namespace, cap: float) -> str:
    """Run one pool in a child process of its own session, so that a pool that never
    finishes (a hang it cannot stop) costs ``cap`` seconds, and then its whole group
    (the child and the pool's workers, unless they left it) is killed."""
    import signal
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--_one", name, "--tasks", str(args.tasks),
           "--faults", str(args.faults), "--timeout", str(args.timeout), "--seed", str(args.seed)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = child.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the group this call created
        child.communicate()
        leaked = leaked_tree_children()
        for p in leaked:
            _kill(p)
        return f"| {name} | did not finish in {cap:.0f} s | | | {len(leaked)} |"
    return out.strip() or f"| {name} | failed (exit {child.returncode}) | | | |"


def _kill(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.Error:
        pass


def run_one(name: str, kinds: list[str], timeout: float, ideal: float) -> None:
    """In the child: run one pool, print its row (and a few wrong outcomes)."""
    try:
        wall, outcomes = RUNNERS[name](kinds, timeout)
    except ImportError as exc:
        print(f"| {name} | not installed ({exc.name}) | | | |")
        return
    time.sleep(1.0)
    leaked = leaked_tree_children()
    for p in leaked:  # ours: started by this run's tree tasks
        _kill(p)
    wrong = [(i, o) for i, (k, o) in enumerate(zip(kinds, outcomes, strict=True)) if o != expected(k)]
    print(f"| {name} | {wall:.1f} | {wall / ideal:.2f}x | {len(wrong)} | {len(leaked)} |")
    for i, o in wrong[:3]:
        print(f"|   e.g. task {i} ({kinds[i]}): {o} | | | | |")

if __name__ == "__main__":
    main()
