"""The same program with ProcessPoolExecutor, then with ProcessGroupExecutor: one line apart.

Run it with ``python examples/swap_in.py`` (``--json PATH`` for a machine-readable
summary). It needs nothing beyond pgexecutor and finishes in about 15 seconds.

The program submits six inputs and waits for each result with ``result(timeout=5)``.
Input 2 hangs: its task starts a child process (``sleep 600``, standing in for a
solver, a converter, a DataLoader worker...) and waits for it. The hang is INJECTED,
to show the difference. The only change between the two runs is the line that makes
the executor::

    ex = ProcessPoolExecutor(max_workers=2)
    ex = ProcessGroupExecutor(max_workers=2, task_timeout=3)

* With ProcessPoolExecutor, ``result(timeout=5)`` gives up waiting but the task keeps
  running: the worker and its child stay alive, ``shutdown(wait=True)`` blocks for as
  long as the task runs (and so would the interpreter's exit). This script then cleans
  up as a user would have to by hand: it SIGKILLs the pool's own worker pids (read
  from the private ``ex._processes``), which orphans the child: still alive, now
  reparented, it has to be found and killed by its pid.
* With ProcessGroupExecutor the hung task fails on its own with TaskTimeoutError
  after 3 s (a subclass of ``concurrent.futures.TimeoutError``: the same ``except``
  clause catches it); its worker's whole process group, child included, is killed;
  the pool carries on and shutdown returns at once.

Throughout, a watcher thread records every process the executor's workers run (the
workers and all their descendants, by pid and start time); at the end the script
checks that none of them survived, and kills any that did (ours alone, by pid).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any

import psutil

from pgexecutor import ProcessGroupExecutor, close_idle_templates, spawned_groups

INPUTS = [0, 1, 2, 3, 4, 5]
HANGS = 2  # the input whose task hangs (INJECTED)
WAIT = 5.0  # the program waits this long for each result
TASK_TIMEOUT = 3.0  # ProcessGroupExecutor's limit


def job(x: int) -> int:
    """Square ``x``; for input HANGS, start a child and wait for it forever (INJECTED)."""
    if x == HANGS:
        child = subprocess.Popen(["sleep", "600"])  # INJECTED: a child that never ends
        child.wait()
    time.sleep(0.2)
    return x * x


def program(ex: Any) -> list[Future[Any]]:
    """The user's program: identical for both executors."""
    futures = [ex.submit(job, x) for x in INPUTS]
    for x, fut in zip(INPUTS, futures, strict=True):
        try:
            print(f"    input {x} -> {fut.result(timeout=WAIT)}")
        except FuturesTimeoutError as exc:
            if fut.done():  # the TASK timed out (pgexecutor's TaskTimeoutError)
                print(f"    input {x} -> {type(exc).__name__}: {exc}")
            else:  # only our WAIT ran out; the task goes on
                print(f"    input {x} -> no result after {WAIT:g}s; the task is still running")
    return futures


# ---------------------------------------------------------------- the harness


class Watcher(threading.Thread):
    """Records every process in the workers' trees, every 50 ms, by (pid, start time)."""

    def __init__(self, worker_pids: Any) -> None:
        super().__init__(daemon=True, name="process-watcher")
        self.worker_pids = worker_pids  # callable -> the executor's worker pids now
        self.seen: dict[tuple[int, float], dict[str, Any]] = {}
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def sweep(self) -> None:
        try:
            roots = list(self.worker_pids())
        except RuntimeError:  # the executor's dict changed size while we copied it
            return
        for pid in roots:
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    key = (p.pid, p.create_time())
                    if key not in self.seen:
                        info = {
                            "pid": p.pid,
                            "create_time": key[1],
                            "cmdline": " ".join(p.cmdline()),
                            "role": "worker" if p.pid in roots else "child",
                        }
                        with self.lock:
                            self.seen[key] = info
                except psutil.Error:
                    continue

    def run(self) -> None:
        while not self.halt.wait(0.05):
            self.sweep()

    def alive(self) -> list[dict[str, Any]]:
        """The recorded processes still running (same pid AND start time, not zombies)."""
        out = []
        with self.lock:
            items = list(self.seen.items())
        for (pid, ctime), info in items:
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - ctime) < 0.05 and p.status() != psutil.STATUS_ZOMBIE:
                    out.append({**info, "ppid": p.ppid()})
            except psutil.Error:
                continue
        return out


def kill_recorded(watcher: Watcher, only: str | None = None) -> list[dict[str, Any]]:
    """SIGKILL recorded processes still alive (by pid, after checking the start time)."""
    killed = []
    for info in watcher.alive():
        if only is not None and info["role"] != only:
            continue
        try:
            os.kill(info["pid"], signal.SIGKILL)
            killed.append(info)
        except OSError:
            pass
    return killed


def wait_gone(watcher: Watcher, seconds: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while True:
        left = watcher.alive()
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def show(procs: list[dict[str, Any]], indent: str = "      ") -> None:
    parents = {p["ppid"] for p in procs if p["role"] == "child"}
    for p in procs:
        what = p["role"]
        if what == "worker":
            what += " (running the hung task)" if p["pid"] in parents else " (idle)"
        print(f"{indent}pid {p['pid']:<7d} ppid {p['ppid']:<7d} {what:31s} {p['cmdline'][:40]}")


def with_ppe() -> dict[str, Any]:
    print("== with ProcessPoolExecutor ==    ex = ProcessPoolExecutor(max_workers=2)")
    ex = ProcessPoolExecutor(max_workers=2)
    watcher = Watcher(lambda: ex._processes or {})  # private, read-only: pid -> Process
    watcher.start()
    report: dict[str, Any] = {}
    shutdown: threading.Thread | None = None
    try:
        t0 = time.monotonic()
        futures = program(ex)
        report["program_seconds"] = time.monotonic() - t0
        hung = futures[INPUTS.index(HANGS)]
        report["hung_done_after_wait"] = hung.done()
        watcher.sweep()
        alive = watcher.alive()
        report["alive_after_program"] = alive
        print(f"  after the program ({report['program_seconds']:.1f}s), still alive:")
        show(alive)

        shutdown = threading.Thread(target=ex.shutdown, kwargs={"wait": True}, daemon=True)
        t1 = time.monotonic()
        shutdown.start()
        shutdown.join(2.0)
        report["shutdown_blocked"] = shutdown.is_alive()
        print(
            "  ex.shutdown(wait=True): "
            + (
                "still blocked after 2s: it waits for the hung task (and so would interpreter exit)"
                if shutdown.is_alive()
                else f"returned after {time.monotonic() - t1:.1f}s"
            )
        )

        print("  cleanup by hand: SIGKILL the pool's own workers (pids from ex._processes)")
        killed = kill_recorded(watcher, only="worker")
        report["workers_killed"] = [p["pid"] for p in killed]
        time.sleep(0.5)
        orphans = watcher.alive()
        report["orphans"] = orphans
        if orphans:
            print("  ...which orphans what the hung task started; still alive, reparented:")
            show(orphans)
            print("  killing those by pid too")
            kill_recorded(watcher)
        shutdown.join(5.0)
        report["shutdown_returned_after_cleanup"] = not shutdown.is_alive()
        exc = hung.exception(timeout=0) if hung.done() else None
        report["hung_result"] = f"{type(exc).__name__}: {exc}" if exc else "not done"
        print(f"  shutdown returned; the hung input's future: {report['hung_result']}")
    finally:
        # Never leave anything behind, even if the above failed half-way.
        kill_recorded(watcher)
        left = wait_gone(watcher, 5.0)
        watcher.halt.set()
        if shutdown is not None:
            shutdown.join(5.0)
    report["left"] = left
    report["processes_seen"] = list(watcher.seen.values())
    print(f"  processes the pool ran: {len(watcher.seen)}; alive now: {len(left)}\n")
    return report


def with_pge() -> dict[str, Any]:
    print(
        "== with ProcessGroupExecutor ==  "
        f"ex = ProcessGroupExecutor(max_workers=2, task_timeout={TASK_TIMEOUT:g})"
    )
    before = spawned_groups()
    ex = ProcessGroupExecutor(max_workers=2, task_timeout=TASK_TIMEOUT, kill_grace=0.5)
    watcher = Watcher(ex.worker_pids)
    watcher.start()
    report: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        futures = program(ex)
        report["program_seconds"] = time.monotonic() - t0
        hung = futures[INPUTS.index(HANGS)]
        report["hung_done_after_wait"] = hung.done()
        exc = hung.exception(timeout=0) if hung.done() else None
        report["hung_result"] = f"{type(exc).__name__}: {exc}" if exc else "not done"
        watcher.sweep()
        children = [p for p in watcher.seen.values() if p["role"] == "child"]
        report["alive_after_program"] = [p for p in watcher.alive() if p["role"] == "child"]
        print(
            f"  after the program ({report['program_seconds']:.1f}s): the hung task had started "
            + ", ".join(f"pid {p['pid']} ({p['cmdline']})" for p in children)
            + f"; alive now: {len(report['alive_after_program'])}"
        )
        show(report["alive_after_program"])
        t1 = time.monotonic()
        ex.shutdown(wait=True)
        report["shutdown_seconds"] = time.monotonic() - t1
        report["shutdown_blocked"] = False
        print(f"  ex.shutdown(wait=True) returned in {report['shutdown_seconds']:.2f}s")
    finally:
        ex.kill_workers()  # a no-op after a clean shutdown
        left = wait_gone(watcher, 5.0)
        watcher.halt.set()
        kill_recorded(watcher)  # only if something is wrong; reported below anyway
    close_idle_templates()  # (it would wait a second for a next executor)
    created = spawned_groups() - before
    in_groups = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getpgid(p.pid) in created and p.info["status"] != psutil.STATUS_ZOMBIE:
                in_groups.append({"pid": p.pid, "cmdline": " ".join(p.info["cmdline"] or [])})
        except OSError:
            continue
    report.update(
        left=left,
        worker_pgids=sorted(created),
        survivors=in_groups,
        processes_seen=list(watcher.seen.values()),
    )
    print(
        f"  processes the pool ran: {len(watcher.seen)}; alive now: {len(left)}; "
        f"worker groups: {len(created)}, processes left in them: {len(in_groups)}\n"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write a machine-readable summary here")
    args = ap.parse_args(argv)
    print(
        f"{len(INPUTS)} inputs on 2 workers; input {HANGS}'s task starts `sleep 600` and "
        "waits for it (an INJECTED hang).\n"
    )
    t0 = time.monotonic()
    ppe = with_ppe()
    pge = with_pge()
    elapsed = time.monotonic() - t0
    ok = (
        not ppe["left"]
        and not pge["left"]
        and not pge["survivors"]
        and pge["hung_result"].startswith("TaskTimeoutError")
    )
    print(
        f"finished in {elapsed:.1f}s. ProcessPoolExecutor: hung task still running after "
        f"the program: {not ppe['hung_done_after_wait']}, shutdown blocked: "
        f"{ppe['shutdown_blocked']}, orphans after killing its workers: {len(ppe['orphans'])}. "
        f"ProcessGroupExecutor: hung task failed by itself: {pge['hung_done_after_wait']}, "
        f"processes left: {len(pge['left']) + len(pge['survivors'])}."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"example": "swap_in", "ppe": ppe, "pge": pge, "elapsed": elapsed, "ok": ok},
                f,
                indent=1,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
