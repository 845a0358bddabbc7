#!/usr/bin/env python3
"""Worker replacement after a crash, pool startup, and the start of 8 torch workers,
for pgexecutor and its peers (issue 20, items 3, 4 and 8).

    python benchmarks/replacement.py [--reps 8] [--start-reps 2] [--no-torch]
                                     [--peers NAME,...] [--limit 120]

Peers (``--peers``; all by default): ``pgexecutor-fresh`` (``mp_context="fresh"``: a
fresh interpreter per worker), ``pgexecutor`` (the default: workers forked from a
template that imported nothing of the task's), ``pgexecutor-preload`` (a template that
preloads the task module, so torch too where it imports torch), ``pebble``
(``pebble.ProcessPool``, forks the parent), ``deadpool`` (``deadpool.Deadpool``, its
default ``forkserver``), ``loky`` (``loky.get_reusable_executor``), ``mpire``
(``mpire.WorkerPool(start_method="fork")``), ``mp-pool-fork``
(``multiprocessing.Pool``, fork), ``ppe-fork`` and ``ppe-spawn``
(``concurrent.futures.ProcessPoolExecutor``). The fork-based peers fork a parent that
has imported the task module (torch too, for the torch figures), as a user's program
would have.

Figures, each in ms, medians over the repetitions:

* **replacement, plain / torch**: a one-worker pool, warm; a task crashes the worker
  (``os._exit(1)``); the clock starts once that task's result has failed and stops at
  the next task's result: the time a sweep's worker sits idle per crash. ``--reps``
  times. The torch figure uses a task module that imports torch
  (``benchmarks/_torch_tasks.py``). Where the pool does not replace the worker by
  itself, the clock covers what the user must do instead (the *recovery* column):

  - ``ppe-fork``, ``ppe-spawn``: the crash breaks the pool (``BrokenProcessPool``);
    timed: construct a new ``ProcessPoolExecutor(1)`` and get the next result (the
    broken one is shut down after the clock stops);
  - ``loky``: ``TerminatedWorkerError`` breaks the executor; timed: call
    ``get_reusable_executor(max_workers=1)`` again (it shuts the broken one down and
    starts a new one, as loky documents) and get the next result;
  - ``mpire``: the crashed task fails with ``RuntimeError("Worker-0 died
    unexpectedly")`` and the pool takes no more work (the next result never comes);
    timed: a new ``WorkerPool`` and the next result (the old one terminated after);
  - ``mp-pool-fork``: the Pool replaces the worker, but the crashed task's result
    never arrives (``get()`` would wait forever). The clock starts when the crashed
    worker is seen gone (its pid polled every ms), and stops at the next result;
  - ``pgexecutor*``, ``pebble``, ``deadpool``: the crashed task's future fails and the
    pool replaces the worker; nothing more to do.

* **startup**: construct a 2-worker pool and get one trivial result (shutdown not
  timed), ``--reps`` times, back to back: pgexecutor's executors share their
  template, so its first start is the program's first pool and the others fork
  (the max column shows the first).
* **start of 8 torch workers**: construct an 8-worker pool (pgexecutor: its lingering
  templates closed first, so that each is the program's first pool, its template
  importing torch once), submit 8 tasks of the torch
  module that each hold their worker 0.2 s, until all 8 results (from 8 distinct
  workers) are in, less the 0.2 s; shutdown not timed; ``--start-reps`` times, beside
  ``python -c "import torch"`` (the least any worker start that needs torch costs).
* **memory**: PSS and RSS of a template that preloaded torch, beside one worker's.

Ratios: to ``pebble`` and to ``ppe-fork`` (also to ``ppe-spawn`` for startup, and to
the import for the start of 8). Each
peer runs in a child process of its own session with a time limit (``--limit``); a
peer that outruns it is killed with its process group, its remaining figures read
``hung``, and the driver (a child subreaper) kills every process the child left
behind (``benchmarks/_harness.py``). Timings from one run compare like with like on a
loaded machine; across runs, compare ratios.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import bench  # noqa: E402  (sets PYTHONPATH for spawned workers too)
from benchmarks._harness import (  # noqa: E402
    call_bounded,
    compile_sources,
    parse_peers,
    run_capped,
    set_subreaper,
)

PLAIN, TORCH = "benchmarks._replace_tasks", "benchmarks._torch_tasks"
WAIT = 60.0  # s: the most any one result may take before the figure is an error
# s: the most the untimed shutdown of a broken pool may take (mpire's terminate()
# sometimes hangs waiting for its handler threads); what it leaves behind is killed
# by the driver when this child exits.
CLEANUP_WAIT = 5.0
HOLD = 0.2  # s each of the 8 first tasks holds its worker
START_N = 8
MARK = "@@replacement "  # the child's result lines (a peer may print too)

FIGURES = [  # key, title
    ("replace_plain", "replacement latency, plain task module (1 worker)"),
    ("replace_torch", "replacement latency, task module imports torch (1 worker)"),
    ("startup", "startup: 2-worker pool, first result (shutdown not timed)"),
    ("start8", f"start of {START_N} workers whose tasks import torch (all {START_N} ran one)"),
]


# --------------------------------------------------------------------------
# What each peer must do after a crash (adapters of bench.py, extended)
# --------------------------------------------------------------------------


class Replacing:
    """What this benchmark adds to a bench.py adapter: how to see that the crashed
    task is over, and what the user must do before the next task can run."""

    #: How the next result is got after a crash (the table's recovery column).
    recovery = "the pool replaces the worker"

    def use_module(self, mod: ModuleType) -> None:
        """The task module of the next figure (the pgexecutor template preloads it)."""

    def wait_crash(self, h: Any, pid: int) -> str:
        """Wait until the crashed task ``h`` (run by worker ``pid``) is over; return
        how it ended."""
        resolved, outcome = self.wait_resolved(h, WAIT)  # type: ignore[attr-defined]
        if not resolved:
            raise RuntimeError(f"the crashed task's result did not fail within {WAIT:.0f} s")
        return outcome

    def after_crash(self) -> Callable[[], Any] | None:
        """Timed: what makes the pool run tasks again; returns untimed cleanup."""
        return None

    def cold(self) -> None:
        """Make the next start the program's first (untimed): nothing to do but for
        pgexecutor, whose executors share their template."""


class PgxPeer(Replacing, bench.PgExecutorPeer):
    def __init__(self, name: str, mode: str) -> None:
        self.name, self.mode = name, mode
        self.preload: tuple[str, ...] = ()
        self.desc = {"fresh": 'ProcessGroupExecutor(mp_context="fresh")',
                     "default": "ProcessGroupExecutor() (template, nothing preloaded)",
                     "preload": "ProcessGroupExecutor(preload=(task module,))"}[mode]

    def use_module(self, mod: ModuleType) -> None:
        self.preload = (mod.__name__,) if self.mode == "preload" else ()

    def cold(self) -> None:
        """Close the templates that linger from the figures before (executors of one
        program share them): the next pool is the program's first, as a start of 8
        must be, its template importing torch once."""
        from pgexecutor import close_idle_templates

        close_idle_templates()

    def start(self, n: int) -> None:
        from pgexecutor import ProcessGroupExecutor

        if self.mode == "fresh":
            self.ex = ProcessGroupExecutor(n, mp_context="fresh")
        else:
            self.ex = ProcessGroupExecutor(n, preload=self.preload)


class PebblePeer(Replacing, bench.PebblePeer):
    pass


class DeadpoolPeer(Replacing, bench.DeadpoolPeer):
    pass


class RebuildingPPE(Replacing, bench.PPEPeer):
    recovery = "BrokenProcessPool: new pool + next result"

    def after_crash(self) -> Callable[[], Any] | None:
        old = self.ex
        self.start(1)
        return lambda: old.shutdown(wait=True)


class ReusableLoky(Replacing, bench.LokyPeer):
    recovery = "TerminatedWorkerError: get_reusable_executor() again + next result"

    def __init__(self) -> None:
        super().__init__()
        self.desc = "loky.get_reusable_executor"

    def start(self, n: int) -> None:
        import loky

        self.ex = loky.get_reusable_executor(max_workers=n)

    def after_crash(self) -> Callable[[], Any] | None:
        self.start(1)  # loky sees the executor broken: shuts it down, makes a new one
        return None


class RebuildingMpire(Replacing, bench.MpirePeer):
    recovery = "pool stops: new WorkerPool + next result"

    def after_crash(self) -> Callable[[], Any] | None:
        old = self.pool
        self.start(1)
        return old.terminate

    def shutdown(self) -> None:
        self.pool.terminate()  # stop_and_join on a pool that lost a worker can raise


class PollingMpPool(Replacing, bench.MpPoolPeer):
    recovery = "result never arrives: timed from the worker's death"

    def wait_crash(self, h: Any, pid: int) -> str:
        limit = time.monotonic() + WAIT
        while _alive(pid):
            if time.monotonic() > limit:
                raise RuntimeError(f"the crashing worker was alive after {WAIT:.0f} s")
            time.sleep(0.001)
        return "never resolved" if not h.ready() else "resolved"

    def shutdown(self) -> None:
        # close()+join() would wait for the lost task's result for ever.
        self.pool.terminate()
        self.pool.join()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def make_peers() -> dict[str, Replacing]:
    peers: list[Any] = [
        PgxPeer("pgexecutor-fresh", "fresh"), PgxPeer("pgexecutor", "default"),
        PgxPeer("pgexecutor-preload", "preload"), PebblePeer(), DeadpoolPeer(),
        ReusableLoky(), RebuildingMpire(), PollingMpPool(),
        RebuildingPPE("fork"), RebuildingPPE("spawn"),
    ]
    return {p.name: p for p in peers}


PEER_ORDER = list(make_peers())


# --------------------------------------------------------------------------
# Figures (run in the per-peer child)
# --------------------------------------------------------------------------


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def replacements(peer: Any, mod: ModuleType, reps: int) -> tuple[list[float], list[str]]:
    """``reps`` crash-then-next-task cycles on a one-worker pool; ms each."""
    peer.use_module(mod)
    peer.start(1)
    samples, outcomes, hung_cleanups = [], set(), 0
    try:
        for i in range(reps):
            pid = peer.result(peer.submit(mod.pid_after, 0), WAIT)  # warm; untimed
            outcomes.add(peer.wait_crash(peer.submit(mod.crash), pid))
            t0 = time.perf_counter()
            cleanup = peer.after_crash()
            got = peer.result(peer.submit(mod.ident, i), WAIT)
            samples.append(_ms(t0))
            if cleanup is not None and not call_bounded(cleanup, CLEANUP_WAIT):
                hung_cleanups += 1
            if got != i:
                raise AssertionError(f"next task returned {got!r}, not {i!r}")
    finally:
        peer.shutdown()
    notes = [f"crashed task: {', '.join(sorted(outcomes))}"]
    if hung_cleanups:
        notes.append(f"shutting the broken pool down hung {hung_cleanups}/{reps} times "
                     f"(left after {CLEANUP_WAIT:.0f} s; untimed)")
    return samples, notes


def startups(peer: Any, mod: ModuleType, reps: int) -> tuple[list[float], list[str]]:
    peer.use_module(mod)
    samples = []
    for i in range(reps):
        t0 = time.perf_counter()
        peer.start(2)
        try:
            got = peer.result(peer.submit(mod.ident, i), WAIT)
            samples.append(_ms(t0))
        finally:
            peer.shutdown()
        if got != i:
            raise AssertionError(f"task returned {got!r}")
    return samples, []


def start_n(peer: Any, mod: ModuleType, reps: int) -> tuple[list[float], list[str]]:
    """ms from construction until each of ``START_N`` workers ran a task of a module
    that imports torch (less the tasks' own ``HOLD``), shutdown not timed."""
    peer.use_module(mod)
    samples = []
    for _ in range(reps):
        peer.cold()
        t0 = time.perf_counter()
        peer.start(START_N)
        try:
            handles = [peer.submit(mod.pid_after, HOLD) for _ in range(START_N)]
            pids = {peer.result(h, WAIT) for h in handles}
            samples.append(_ms(t0) - HOLD * 1000)
        finally:
            peer.shutdown()
        if len(pids) != START_N:
            raise AssertionError(f"{START_N} tasks ran on {len(pids)} workers")
    return samples, []


def template_memory() -> list[tuple[str, float, float]]:
    """A template that preloaded torch: its PSS (its pages, shared ones split between
    the processes that share them) and RSS, beside one worker's; MiB."""
    import psutil

    from benchmarks import _torch_tasks
    from pgexecutor import ProcessGroupExecutor, close_idle_templates

    rows = []
    close_idle_templates()  # only the torch template shares pages with the worker
    with ProcessGroupExecutor(1, preload=("torch",)) as ex:
        worker = ex.submit(_torch_tasks.pid_after, 0).result(timeout=WAIT)
        template = psutil.Process(psutil.Process(worker).ppid())
        for label, proc in [("template", template), ("worker", psutil.Process(worker))]:
            info = proc.memory_full_info()
            rows.append((label, info.pss / 2**20, info.rss / 2**20))
    return rows


def child_main(args: argparse.Namespace) -> None:
    # Before the driver kills us at the limit: every thread's stack to stderr.
    faulthandler.dump_traceback_later(max(1.0, args.limit - 5), exit=True)
    peer: Any = make_peers()[args._child]

    def emit(**rec: Any) -> None:
        print(MARK + json.dumps(rec), flush=True)

    try:
        emit(version=peer.check(), desc=peer.desc, recovery=peer.recovery)
    except Exception as exc:  # noqa: BLE001 - ImportError and whatever the import raised
        emit(unavailable=f"{type(exc).__name__}: {exc}")
        return
    plain = importlib.import_module(PLAIN)
    jobs: list[tuple[str, Callable[[], tuple[list[float], list[str]]]]] = [
        ("startup", lambda: startups(peer, plain, args.reps)),
        ("replace_plain", lambda: replacements(peer, plain, args.reps)),
    ]
    if not args.no_torch:
        jobs += [
            ("replace_torch", lambda: replacements(peer, importlib.import_module(TORCH), args.reps)),
            ("start8", lambda: start_n(peer, importlib.import_module(TORCH), args.start_reps)),
        ]
    for key, job in jobs:
        if key not in args.only:
            continue
        sys.stderr.write(f"  [{peer.name}] {key} ...")
        sys.stderr.flush()
        t0 = time.perf_counter()
        try:
            samples, notes = job()
        except Exception as exc:  # noqa: BLE001 - reported in the table's notes
            emit(figure=key, error=f"{type(exc).__name__}: {exc}")
            sys.stderr.write(" ERROR\n")
            continue
        sys.stderr.write(f" ok ({time.perf_counter() - t0:.1f} s)\n")
        emit(figure=key, samples=samples, notes=notes)
    if peer.name == "pgexecutor-preload" and not args.no_torch:
        emit(memory=template_memory())


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def import_torch_samples(reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True, timeout=WAIT)
        out.append(_ms(t0))
    return out


def _fmt(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def print_table(title: str, key: str, results: dict[str, dict[str, Any]],
                bases: list[tuple[str, list[float] | None]], recovery: bool) -> None:
    """One markdown table: a row per peer, medians and ratios to each base."""
    meds = {b: statistics.median(xs) for b, xs in bases if xs}
    heads = ["peer", "median ms", "min", "max"] + [f"x {b}" for b, _ in bases]
    if recovery:
        heads.append("after a crash")
    print(f"\n{title}\n")
    print("| " + " | ".join(heads) + " |")
    print("| --- |" + " ---: |" * (len(heads) - 1 - recovery) + (" --- |" if recovery else ""))
    for name, res in results.items():
        rec = res.get(key)
        extra = [res.get("recovery", "")] if recovery else []
        if not isinstance(rec, list):
            why = rec if isinstance(rec, str) else "-"
            print("| " + " | ".join([name, why] + [""] * (2 + len(bases)) + extra) + " |")
            continue
        med = statistics.median(rec)
        ratios = [f"{med / meds[b]:.2f}x" if b in meds else "-" for b, _ in bases]
        print("| " + " | ".join([name, _fmt(med), _fmt(min(rec)), _fmt(max(rec))] + ratios + extra) + " |")


def run_peer(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Run one peer's child; its figures (samples, or a word saying why none) and notes."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, "--reps", str(args.reps),
           "--start-reps", str(args.start_reps), "--only", args.only] + (["--no-torch"] if args.no_torch else [])
    run = run_capped(cmd, args.limit)
    res: dict[str, Any] = {}
    notes = [f"{name}: killed {s} (left behind)" for s in run.strays]
    for line in run.stdout.splitlines():
        if not line.startswith(MARK):
            continue
        rec = json.loads(line[len(MARK):])
        if "unavailable" in rec:
            return {k: "not installed" for k, _ in FIGURES}, [f"{name}: {rec['unavailable']}"]
        if "version" in rec:
            res.update(version=rec["version"], recovery=rec["recovery"])
            notes.append(f"{name}: {rec['desc']} {rec['version']}")
        elif "memory" in rec:
            res["memory"] = rec["memory"]
        elif "error" in rec:
            res[rec["figure"]] = "ERR"
            notes.append(f"{name} {rec['figure']}: {rec['error']}")
        else:
            res[rec["figure"]] = rec["samples"]
            notes += [f"{name} {rec['figure']}: {n}" for n in rec["notes"]]
    for key, _ in FIGURES:
        if key not in res and run.timed_out:
            res[key] = "hung"
    if run.timed_out:
        notes.append(f"{name}: killed at the {args.limit:.0f} s limit")
    elif run.returncode:
        notes.append(f"{name}: child exited with {run.returncode}")
    return res, notes


def driver_main(args: argparse.Namespace) -> None:
    peers = parse_peers(args.peers, PEER_ORDER)
    compile_sources()
    subreaper = set_subreaper()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, reps={args.reps}, "
          f"start reps={args.start_reps}")
    t_run = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for name in peers:
        sys.stderr.write(f"{name}:\n")
        results[name], peer_notes = run_peer(name, args)
        notes += peer_notes
    imports = None
    if not args.no_torch and "start8" in args.only:
        imports = import_torch_samples(args.start_reps)

    def samples_of(name: str, key: str) -> list[float] | None:
        rec = results.get(name, {}).get(key)
        return rec if isinstance(rec, list) else None

    for key, title in FIGURES:
        if key not in args.only or (args.no_torch and key in ("replace_torch", "start8")):
            continue
        # Startup (item 4) is also judged against ProcessPoolExecutor(spawn).
        names = ("pebble", "ppe-fork") + (("ppe-spawn",) if key == "startup" else ())
        bases = [(b, samples_of(b, key)) for b in names]
        table = results
        if key == "start8":
            bases = [("import", imports)] + bases
            table = {"one `python -c \"import torch\"`": {key: imports}, **results}
        print_table(title, key, table, bases, recovery=key.startswith("replace"))
    memory = results.get("pgexecutor-preload", {}).get("memory")
    if memory:
        print("\nmemory with torch preloaded (MiB)\n")
        print("| process | PSS | RSS |\n| --- | ---: | ---: |")
        for label, pss, rss in memory:
            print(f"| {label} | {pss:.0f} | {rss:.0f} |")
    print("\nNotes:")
    for n in notes:
        print("  - " + n)
    print(f"Total wall time: {time.perf_counter() - t_run:.0f} s"
          + ("" if subreaper else " (no subreaper: strays not reaped)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=8, help="replacements and startups per peer")
    ap.add_argument("--start-reps", type=int, default=2, help=f"starts of {START_N} torch workers")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch figures")
    ap.add_argument("--only", default=",".join(k for k, _ in FIGURES),
                    help="comma-separated figures, from: " + ",".join(k for k, _ in FIGURES))
    ap.add_argument("--peers", help="comma-separated, from: " + ",".join(PEER_ORDER))
    ap.add_argument("--limit", type=float, default=120.0, help="seconds per peer before it is killed")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child_main(args)
    else:
        driver_main(args)


if __name__ == "__main__":
    main()
