#!/usr/bin/env python3
"""Soak: thousands of tasks, a tenth of them faulty, on 2 workers (issue 20, item 7).

    python benchmarks/soak.py [--tasks 3000] [--faults 0.10] [--timeout 0.5]
                              [--peers NAME,...] [--seed 1] [--stall 10]

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

Peers (``--peers``): those with a per-task timeout run: ``pgexecutor``
(``task_timeout``), ``pebble`` (``schedule(timeout=)``), ``deadpool``
(``deadpool_timeout=``) and ``mpire`` (``apply_async(task_timeout=)``), through the
adapters of ``bench.py``. ``loky``, ``ppe-fork``, ``ppe-spawn`` (ProcessPoolExecutor)
and ``mp-pool-fork`` (multiprocessing.Pool) have no per-task timeout, so a hang holds a
worker for good: their rows read "no per-task timeout: cannot run" (and a crash breaks
the first three: see replacement.py).

A pool that stops making progress (no task resolved for ``--stall`` seconds, default
10) is given up on: its row says "stalled" with the count of tasks never resolved.
Expected there: deadpool's timeout cannot stop a hang inside one C call (its worker
destroys itself from a Python thread, which never runs while a C call holds the GIL).
mpire stops at its first crashed worker (``RuntimeError: Worker-N died
unexpectedly``) and fails every task still queued with that error, ``ok`` ones
included: its row counts them as wrong outcomes. Each pool runs in a child process of its own session, capped at
4 x ideal + 60 s, then killed with its group; the driver (a child subreaper, see
``_harness.py``) kills whatever the child left behind, after counting the tree tasks'
grandchildren still alive.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
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
from benchmarks import bench  # noqa: E402
from benchmarks._harness import (  # noqa: E402
    call_bounded,
    compile_sources,
    parse_peers,
    run_capped,
    set_subreaper,
)

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


NO_TIMEOUT = ("loky", "ppe-fork", "ppe-spawn", "mp-pool-fork")
PEER_ORDER = ["pgexecutor", "pebble", "deadpool", "mpire", *NO_TIMEOUT]


def _errors(name: str) -> tuple[type[BaseException], type[BaseException]]:
    """The error a timed-out task's result raises in pool ``name``, and a crashed one's."""
    if name == "pgexecutor":
        from pgexecutor import TaskTimeoutError, WorkerCrashedError

        return TaskTimeoutError, WorkerCrashedError
    if name == "pebble":
        import pebble

        return TimeoutError, pebble.ProcessExpired
    if name == "deadpool":
        import deadpool

        return deadpool.TimeoutError, deadpool.ProcessError
    return TimeoutError, RuntimeError  # mpire: "Worker-N died unexpectedly"


def _done(h: Any) -> bool:
    return bool(h.ready() if hasattr(h, "ready") else h.done())  # mpire's AsyncResult


def run_pool(name: str, kinds: list[str], timeout: float, stall: float) -> tuple[float, list[str], int]:
    """Submit every task to pool ``name`` (2 workers, warm), wait until all resolved or
    none resolved for ``stall`` s. Returns wall seconds (to the last result), one
    outcome per task ("value", "timeout", "crash", "never resolved", "wrong: ...")
    and how many never resolved."""
    timeout_error, crash_error = _errors(name)
    peer = bench.make_peers().get(name) or bench.DeadpoolPeer()
    peer.start(WORKERS)
    try:
        peer.result(peer.submit(soak.run, "ok", 0), 60)  # warm
        t0 = time.perf_counter()
        handles = [peer.submit_timeout(soak.run, (k, i), timeout) for i, k in enumerate(kinds)]
        pending, last = handles, time.perf_counter()
        while pending:
            time.sleep(0.01)
            still = [h for h in pending if not _done(h)]
            now = time.perf_counter()
            if len(still) < len(pending):
                last = now
            elif now - last > stall:
                break
            pending = still
        wall = last - t0
        outcomes = [_classify(peer, h, i, timeout_error, crash_error) for i, h in enumerate(handles)]
    finally:
        if not call_bounded(peer.shutdown, 10.0):
            print(f"|   {name}: shutdown() did not return in 10 s | | | | |", flush=True)
    return wall, outcomes, len(pending)


def _classify(
    peer: Any, h: Any, i: int, timeout_error: type[BaseException], crash_error: type[BaseException]
) -> str:
    if not _done(h):
        return "never resolved"
    try:
        value = peer.result(h, 0)
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
    ap.add_argument("--stall", type=float, default=10.0,
                    help="give a pool up when no task resolved for this many seconds")
    ap.add_argument("--peers", help="comma-separated, from: " + ",".join(PEER_ORDER))
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    kinds = plan(args.tasks, args.faults, args.seed)
    hangs = sum(k in soak.HANGS for k in kinds)
    ideal = hangs * args.timeout / WORKERS
    counts = {k: kinds.count(k) for k in soak.KINDS}
    if args._one:
        run_one(args._one, kinds, args.timeout, ideal, args.stall)
        return
    peers = parse_peers(args.peers, PEER_ORDER)
    compile_sources()
    subreaper = set_subreaper()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {WORKERS} workers, "
          f"{args.tasks} tasks, timeout {args.timeout} s, mix {counts}")
    print(f"ideal wall time: {hangs} hangs x {args.timeout} s / {WORKERS} workers = {ideal:.1f} s\n")
    print("| pool | wall s | x ideal | wrong outcomes | leaked processes |")
    print("| --- | ---: | ---: | ---: | ---: |")
    cap = 4 * ideal + 60
    t_run = time.perf_counter()
    for name in peers:
        if name in NO_TIMEOUT:
            print(f"| {name} | no per-task timeout: cannot run | | | |", flush=True)
            continue
        print(_run_capped(name, args, cap), flush=True)
    print(f"\nTotal wall time: {time.perf_counter() - t_run:.0f} s"
          + ("" if subreaper else " (no subreaper: strays not reaped)"))


def _run_capped(name: str, args: argparse.Namespace, cap: float) -> str:
    """Run one pool in a child process of its own session (``_harness.run_capped``), so
    that a pool that never finishes costs at most ``cap`` seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_one", name, "--tasks", str(args.tasks),
           "--faults", str(args.faults), "--timeout", str(args.timeout), "--seed", str(args.seed),
           "--stall", str(args.stall)]
    leaked: list[psutil.Process] = []
    run = run_capped(cmd, cap, before_reap=lambda: leaked.extend(leaked_tree_children()))
    for p in leaked:
        _kill(p)
    out = run.stdout.strip()
    if run.timed_out:
        return (out + "\n" if out else "") + f"| {name} | did not finish in {cap:.0f} s | | | {len(leaked)} |"
    return out or f"| {name} | failed (exit {run.returncode}) | | | |"


def _kill(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.Error:
        pass


def run_one(name: str, kinds: list[str], timeout: float, ideal: float, stall: float) -> None:
    """In the child: run one pool, print its row (and a few wrong outcomes)."""
    try:
        wall, outcomes, unresolved = run_pool(name, kinds, timeout, stall)
    except ImportError as exc:
        print(f"| {name} | not installed ({exc.name}) | | | |", flush=True)
        os._exit(0)
    time.sleep(1.0)
    leaked = leaked_tree_children()
    for p in leaked:  # ours: started by this run's tree tasks
        _kill(p)
    wrong = [(i, o) for i, (k, o) in enumerate(zip(kinds, outcomes, strict=True)) if o != expected(k)]
    if unresolved:
        head = f"stalled: {unresolved} tasks never resolved (none for {stall:.0f} s) | "
        print(f"| {name} | {head}| {len(wrong)} | {len(leaked)} |")
    else:
        ratio = f"{wall / ideal:.2f}x" + (" (tasks failed)" if wrong else "")
        print(f"| {name} | {wall:.1f} | {ratio} | {len(wrong)} | {len(leaked)} |")
    for i, o in wrong[:3]:
        print(f"|   e.g. task {i} ({kinds[i]}): {o} | | | | |")
    sys.stdout.flush()
    os._exit(0)  # a stalled pool's threads must not keep this child alive


if __name__ == "__main__":
    main()
