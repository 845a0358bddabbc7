#!/usr/bin/env python3
"""Worker replacement latency and pool startup (issue 20, items 3, 4 and 8).

    python benchmarks/replacement.py [--reps N] [--no-torch]

Replacement: one worker; a task crashes it (``os._exit``); the clock starts when that
task's future has failed and the next task is submitted, and stops at its result:
the time a sweep's worker sits idle per crash. ``N`` times per executor (default 10),
with a task module that imports nothing and one that imports torch, for:

* ``pgexecutor fresh`` (``mp_context="fresh"``: a fresh interpreter per worker),
* ``pgexecutor template`` (``mp_context="template"``, ``preload`` the task module;
  for torch also a row with ``preload=("torch",)`` alone),
* ``pebble`` (``pebble.ProcessPool``: forks the parent, which imported the module).

Startup: construct a 2-worker pool and get one trivial result (shutdown not timed),
``N`` times, alternating ``pgexecutor fresh``, ``pgexecutor default`` (the template
starts beside the first, fresh, workers), ``pgexecutor template`` and
``ProcessPoolExecutor(mp_context=spawn)``.

Medians in ms, and ratios to pebble (replacement) or to ProcessPoolExecutor(spawn)
(startup). All in one run, so the ratios compare like with like on a loaded machine.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p
)

from pgexecutor import ProcessGroupExecutor  # noqa: E402


def _replacements(submit, mod, reps: int) -> list[float]:
    """``reps`` crash-then-next-task cycles on a warm one-worker pool; ms each."""
    assert submit(mod.ident, 0).result(timeout=600) == 0  # warm: the worker exists
    out = []
    for i in range(reps):
        fut = submit(mod.crash)
        try:
            fut.result(timeout=600)
        except Exception:
            pass
        else:
            raise AssertionError("the crash task returned")
        t0 = time.perf_counter()
        assert submit(mod.ident, i).result(timeout=600) == i
        out.append((time.perf_counter() - t0) * 1000)
    return out


def bench_replacement(reps: int, torch: bool) -> dict[str, list[float]]:
    mod = importlib.import_module("benchmarks._torch_tasks" if torch else "benchmarks._replace_tasks")
    results: dict[str, list[float]] = {}
    with ProcessGroupExecutor(1, mp_context="fresh") as ex:
        results["pgexecutor fresh"] = _replacements(ex.submit, mod, reps)
    if torch:
        with ProcessGroupExecutor(1, mp_context="template", preload=("torch",)) as ex:
            results["pgexecutor template, preload torch"] = _replacements(ex.submit, mod, reps)
    # As the docs advise: preload the task's own module too (pebble's fork of the
    # parent has it imported; a template that has not imports it in every worker).
    preload = (("torch",) if torch else ()) + (mod.__name__,)
    with ProcessGroupExecutor(1, mp_context="template", preload=preload) as ex:
        results[f"pgexecutor template, preload {', '.join(preload)}"] = _replacements(
            ex.submit, mod, reps
        )
    try:
        import pebble
    except ImportError:
        print("pebble is not installed: skipped (pip install pebble)")
    else:
        pool = pebble.ProcessPool(max_workers=1)
        try:
            results["pebble"] = _replacements(
                lambda fn, *a: pool.schedule(fn, args=a), mod, reps
            )
        finally:
            pool.close()
            pool.join()
    return results


def _startup_once(make) -> float:
    t0 = time.perf_counter()
    ex = make()
    ex.submit(abs, -1).result(timeout=600)
    dt = (time.perf_counter() - t0) * 1000
    ex.shutdown()
    return dt


def bench_startup(reps: int) -> dict[str, list[float]]:
    spawn = multiprocessing.get_context("spawn")
    makers = {
        "pgexecutor fresh": lambda: ProcessGroupExecutor(2, mp_context="fresh"),
        "pgexecutor default": lambda: ProcessGroupExecutor(2),
        "pgexecutor template": lambda: ProcessGroupExecutor(2, mp_context="template"),
        "ProcessPoolExecutor(spawn)": lambda: ProcessPoolExecutor(2, mp_context=spawn),
    }
    results: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(reps):
        for name, make in makers.items():
            results[name].append(_startup_once(make))
    return results


_HOLD = 0.2  # seconds each of the N first tasks holds its worker


def _start_n(make, n: int) -> float:
    """ms from construction until each of ``n`` workers ran a task of a module that
    imports torch (less the tasks' own ``_HOLD``), shutdown not timed."""
    from benchmarks import _torch_tasks

    t0 = time.perf_counter()
    ex = make()
    try:
        futs = [ex.submit(_torch_tasks.pid_after, _HOLD) for _ in range(n)]
        pids = {f.result(timeout=600) for f in futs}
        dt = (time.perf_counter() - t0 - _HOLD) * 1000
    finally:
        ex.shutdown()
    if len(pids) != n:
        raise AssertionError(f"{n} tasks ran on {len(pids)} workers, not {n}")
    return dt


def _import_once() -> float:
    import subprocess

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return (time.perf_counter() - t0) * 1000


def bench_torch_start(reps: int, n: int = 8) -> dict[str, list[float]]:
    """Item 3's last figure: starting ``n`` workers that need torch, against one
    ``import torch`` in a fresh interpreter (the least any worker start can cost)."""
    spawn = multiprocessing.get_context("spawn")
    makers = {
        f"pgexecutor, {n} workers, preload torch": lambda: ProcessGroupExecutor(n, preload=("torch",)),
        f"pgexecutor fresh, {n} workers": lambda: ProcessGroupExecutor(n, mp_context="fresh"),
        f"ProcessPoolExecutor(spawn), {n} workers": lambda: ProcessPoolExecutor(n, mp_context=spawn),
    }
    results: dict[str, list[float]] = {"one import torch (python -c)": []}
    results.update({name: [] for name in makers})
    for _ in range(reps):
        results["one import torch (python -c)"].append(_import_once())
        for name, make in makers.items():
            results[name].append(_start_n(make, n))
    return results


def template_memory() -> None:
    """What a template that preloaded torch costs: its PSS (its pages, shared ones
    split between the processes that share them) and RSS, beside one worker's."""
    import psutil

    from benchmarks import _torch_tasks

    with ProcessGroupExecutor(1, preload=("torch",)) as ex:
        worker = ex.submit(_torch_tasks.pid_after, 0).result(timeout=600)
        me = psutil.Process()
        templates = [
            c for c in me.children()
            if "_template import serve" in " ".join(c.cmdline())
        ]
        print("\nmemory with torch preloaded (MiB)")
        print("| process | PSS | RSS |")
        print("| --- | ---: | ---: |")
        for label, proc in [("template", t) for t in templates] + [("worker", psutil.Process(worker))]:
            info = proc.memory_full_info()
            print(f"| {label} | {info.pss / 2**20:.0f} | {info.rss / 2**20:.0f} |")


def _table(title: str, results: dict[str, list[float]], base: str) -> None:
    print(f"\n{title}")
    print("| executor | median ms | min ms | max ms | x " + base + " |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ref = statistics.median(results[base]) if base in results else None
    for name, xs in results.items():
        med = statistics.median(xs)
        ratio = f"{med / ref:.2f}" if ref else "-"
        print(f"| {name} | {med:.1f} | {min(xs):.1f} | {max(xs):.1f} | {ratio} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch rows")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, reps={args.reps}")
    _table("replacement latency, plain task module", bench_replacement(args.reps, False), "pebble")
    if not args.no_torch:
        _table(
            "replacement latency, task module imports torch",
            bench_replacement(args.reps, True), "pebble",
        )
    _table("startup: 2-worker pool, first result", bench_startup(args.reps),
           "ProcessPoolExecutor(spawn)")
    if not args.no_torch:
        torch_reps = max(1, min(args.reps, 3))  # each rep imports torch ~20 times
        _table("start of 8 workers whose tasks import torch (all 8 ran one)",
               bench_torch_start(torch_reps), "one import torch (python -c)")
        template_memory()


if __name__ == "__main__":
    main()
