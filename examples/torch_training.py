"""A small real torch (CPU) training sweep where one task's DataLoader hangs.

Run it with ``python examples/torch_training.py`` (``--quick`` for the reduced size the
tests use, ``--json PATH`` for a machine-readable summary, ``-v`` for pgexecutor's log).

Each task trains a small MLP on a synthetic regression problem and then evaluates it on
held-out data, reading both through ``torch.utils.data.DataLoader(num_workers=2)``: each
task starts four DataLoader worker processes of its own. They are forked children of
the pgexecutor worker running the task, so they sit in that worker's process group.

One task's ``Dataset.__getitem__`` blocks forever. That fault is INJECTED (see
``_torch_cases.SyntheticDataset``), to show what happens: the task's process waits
forever for its first batch, and its two DataLoader workers wait forever in
``__getitem__``. When ``task_timeout`` expires pgexecutor kills the worker's whole
group, so the DataLoader workers die with it; the task fails with TaskTimeoutError and
every other task finishes and reports its loss. (Killing only the task's process would
not do: its DataLoader workers, stuck in ``__getitem__``, never run torch's parent-alive
check, and stay alive as orphans of init.)

A monitor thread watches every DataLoader worker (each one records its pid as it starts)
and notes when it died. At the end the example checks, with psutil and by pid (plus
start time, so a recycled pid is not mistaken for a survivor), that every DataLoader
worker is gone and that no process of any worker group it created is left.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, as_completed
from importlib import metadata
from typing import Any

# One intra-op thread everywhere: several tasks share two cores. Workers inherit the
# environment, so torch in every worker (and DataLoader worker) starts with it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import psutil  # noqa: E402

from pgexecutor import (  # noqa: E402
    ProcessGroupExecutor,
    TaskTimeoutError,
    WorkerCrashedError,
    close_idle_templates,
    spawned_groups,
    task_info,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def warm_up() -> None:
    """Worker initializer: pay torch's one-time costs before any task's clock starts.

    Importing torch takes seconds, and so does the first optimizer (its first use
    imports torch._dynamo); on a busy machine that could eat a task's whole timeout.
    """
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import _torch_cases  # imports torch

    torch = _torch_cases.torch
    torch.set_num_threads(1)
    model = _torch_cases.make_model()
    torch.optim.SGD(model.parameters(), lr=0.1).step()


def run_task(spec: dict[str, Any], pid_log: str) -> dict[str, Any]:
    """One task, run in a pgexecutor worker: train and evaluate (see _torch_cases)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from _torch_cases import train_task

    return train_task(
        spec["seed"],
        spec["hang"],
        lr=spec["lr"],
        epochs=spec["epochs"],
        n=spec["n"],
        num_workers=2,
        threads=1,
        pid_log=pid_log,
    )


def read_pid_log(path: str) -> list[dict[str, Any]]:
    """Lines ``pid pgid ppid create_time role`` written by each DataLoader worker."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                pid, pgid, ppid, ctime, role = line.split()
                out.append(
                    {
                        "pid": int(pid),
                        "pgid": int(pgid),
                        "ppid": int(ppid),
                        "create_time": float(ctime),
                        "role": role,
                    }
                )
    except FileNotFoundError:
        pass
    return out


def is_alive(pid: int, create_time: float) -> bool:
    """Is this very process (not a later one that reused the pid) still running?"""
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - create_time) > 0.05:
            return False  # the pid was recycled: ours is gone
        return p.status() != psutil.STATUS_ZOMBIE  # a zombie is dead, only unreaped
    except psutil.NoSuchProcess:
        return False


class DeathMonitor(threading.Thread):
    """Polls every DataLoader worker the tasks recorded; notes when each was gone."""

    def __init__(self, logs: list[str], interval: float = 0.01) -> None:
        super().__init__(daemon=True, name="dataloader-death-monitor")
        self.logs = logs
        self.interval = interval
        self.dead_at: dict[int, float] = {}  # pid -> monotonic time first seen dead
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for path in self.logs:
                for w in read_pid_log(path):
                    if w["pid"] not in self.dead_at and not is_alive(w["pid"], w["create_time"]):
                        self.dead_at[w["pid"]] = time.monotonic()
            self.stop.wait(self.interval)


def group_survivors(pgids: frozenset[int]) -> list[dict[str, Any]]:
    """Processes (zombies included, flagged) whose process group is one of ``pgids``."""
    out = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            pg = os.getpgid(p.pid)
        except OSError:
            continue
        if pg in pgids:
            out.append(
                {
                    "pid": p.pid,
                    "pgid": pg,
                    "status": p.info["status"],
                    "cmdline": " ".join(p.info["cmdline"] or []),
                }
            )
    return out


def call_chain(stack: str | None, stop: str = "train_task") -> str:
    """``get < _try_get_data < ... < train_task``: the task's thread, innermost first.

    ``stack`` is TaskTimeoutError.stack, a faulthandler dump of every thread of the
    worker; the task's thread is the one whose frames include ``stop``.
    """
    for block in (stack or "").split("\n\n"):
        names = [
            line.strip().rsplit(" in ", 1)[1]
            for line in block.splitlines()
            if line.strip().startswith("File ") and " in " in line
        ]
        if stop in names:
            return " < ".join(names[: names.index(stop) + 1])
    return "?"


def _stamp(when: dict[int, float], i: int, _fut: Any) -> None:
    """Future callback: note when task ``i`` finished (runs in the executor's thread)."""
    when.setdefault(i, time.monotonic())


def print_outcome(out: dict[str, Any], timeout: float) -> None:
    p = out["params"]
    head = f"  task {out['task']} seed={p['seed']} lr={p['lr']:<5g}"
    if out["outcome"] == "ok":
        print(
            f"{head} ok       train_loss={out['train_loss']:.4f} "
            f"eval_loss={out['eval_loss']:.4f} in {out['duration']:.1f}s on worker "
            f"{out['worker_pid']}",
            flush=True,
        )
    elif out["outcome"] == "timeout":
        print(
            f"{head} TIMEOUT  after {timeout:g}s on worker {out['worker_pid']}, whose whole "
            f"group was killed;\n{'':32s}the task was waiting for a batch in "
            f"{out['hung_in']}",
            flush=True,
        )
    else:
        print(f"{head} {out['outcome'].upper():8s} {out['error']}", flush=True)


def make_tasks(n_tasks: int, hang_index: int, epochs: int, n: int) -> list[dict[str, Any]]:
    lrs = [0.05, 0.1, 0.2]
    return [
        {"seed": i, "lr": lrs[i % len(lrs)], "hang": i == hang_index, "epochs": epochs, "n": n}
        for i in range(n_tasks)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced size (3 tasks, 2 epochs)")
    ap.add_argument("--tasks", type=int, help="number of tasks (default 6, quick 3)")
    ap.add_argument("--epochs", type=int, help="epochs per task (default 3, quick 2)")
    ap.add_argument("--timeout", type=float, help="task_timeout in seconds (default 15, quick 10)")
    ap.add_argument("--json", metavar="PATH", help="write a machine-readable summary here")
    ap.add_argument("-v", action="store_true", help="print pgexecutor's log")
    args = ap.parse_args(argv)
    if args.v:
        logging.basicConfig(format="    [%(relativeCreated)6.0fms %(name)s] %(message)s")
        logging.getLogger("pgexecutor").setLevel(logging.DEBUG)
    n_tasks = args.tasks or (3 if args.quick else 6)
    epochs = args.epochs or (2 if args.quick else 3)
    n = 256 if args.quick else 512
    hang_index = 1
    tasks = make_tasks(n_tasks, hang_index, epochs, n)
    timeout, grace = args.timeout or (10.0 if args.quick else 15.0), 1.0

    print(
        f"torch {metadata.version('torch')} (CPU), {n_tasks} tasks on 2 workers, "
        f"task_timeout={timeout:g}s, kill_grace={grace:g}s.\n"
        f"Each task trains an MLP ({epochs} epoch(s), {n} samples) and evaluates it, both "
        f"through DataLoader(num_workers=2).\n"
        f"Task {hang_index}'s Dataset.__getitem__ hangs forever: an INJECTED fault, to show "
        f"what a timeout does to its DataLoader workers.\n",
        flush=True,
    )

    tmp = tempfile.TemporaryDirectory(prefix="pgx-torch-")
    logs = [os.path.join(tmp.name, f"task-{i}.pids") for i in range(n_tasks)]
    monitor = DeathMonitor(logs)
    monitor.start()
    before = spawned_groups()
    done_at: dict[int, float] = {}
    outcomes: list[dict[str, Any]] = [{} for _ in tasks]
    t0 = time.monotonic()
    with ProcessGroupExecutor(
        max_workers=2, task_timeout=timeout, kill_grace=grace, initializer=warm_up,
        # importing torch may take longer than a task may run: the initializer gets its
        # own bound (by default it would get task_timeout)
        initializer_timeout=300,
    ) as ex:
        futs: dict[Future[Any], int] = {}
        for i, spec in enumerate(tasks):
            fut = ex.submit(run_task, spec, logs[i])
            fut.add_done_callback(functools.partial(_stamp, done_at, i))
            futs[fut] = i
        for fut in as_completed(futs):
            i = futs[fut]
            info = task_info(fut)
            out: dict[str, Any] = {"task": i, "params": tasks[i]}
            out["duration"] = info.duration if info else None
            out["worker_pid"] = info.pid if info else None
            exc = fut.exception()
            if exc is None:
                res = fut.result()
                out.update(outcome="ok", train_loss=res["train_loss"], eval_loss=res["eval_loss"])
            elif isinstance(exc, TaskTimeoutError):
                out.update(
                    outcome="timeout",
                    error=str(exc),
                    hung_in=call_chain(exc.stack),
                    stack=exc.stack,
                )
            elif isinstance(exc, WorkerCrashedError):
                out.update(outcome="crashed", error=str(exc))
            else:
                out.update(outcome="error", error=f"{type(exc).__name__}: {exc}")
            outcomes[i] = out
            print_outcome(out, timeout)
    stats = ex.stats()  # after shutdown: counts any worker started to replace a killed one
    elapsed = time.monotonic() - t0
    close_idle_templates()  # the worker template would wait a second for a next executor
    created = spawned_groups() - before

    # Proof. Give the monitor a moment to see the last DataLoader workers (of the
    # successful tasks, which exit on their own) go, then check each one ourselves.
    recorded = {i: read_pid_log(path) for i, path in enumerate(logs)}
    all_dl = [w for ws in recorded.values() for w in ws]
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(is_alive(w["pid"], w["create_time"]) for w in all_dl):
        time.sleep(0.05)
    monitor.stop.set()
    monitor.join()
    dl_alive = [w for w in all_dl if is_alive(w["pid"], w["create_time"])]
    left = group_survivors(created)
    deadline = time.monotonic() + 5.0
    while left and time.monotonic() < deadline:  # an orphan may await init's reaping
        time.sleep(0.05)
        left = group_survivors(created)

    for i, out in enumerate(outcomes):
        ws = recorded[i]
        out["dataloader_workers"] = ws
        out["dataloader_pids"] = [w["pid"] for w in ws]
        out["dataloader_pgids"] = sorted({w["pgid"] for w in ws})
        out["dataloader_in_worker_group"] = bool(ws) and all(
            w["pgid"] == out["worker_pid"] for w in ws
        )
        if out["outcome"] == "timeout" and ws and all(w["pid"] in monitor.dead_at for w in ws):
            gone = max(monitor.dead_at[w["pid"]] for w in ws)
            # the task failed (duration - timeout) after its deadline, seen from here
            task_deadline = done_at[i] - ((out["duration"] or timeout) - timeout)
            out["dataloader_gone_after_deadline"] = gone - task_deadline
            out["dataloader_gone_after_failure"] = gone - done_at[i]
    tmp.cleanup()

    print("\nDataLoader workers of each task, from their own pid records:")
    for out in outcomes:
        dl = ", ".join(str(w["pid"]) for w in out["dataloader_workers"]) or "none"
        groups = ",".join(str(g) for g in out["dataloader_pgids"])
        whose = "its worker's" if out["dataloader_in_worker_group"] else "NOT its worker's"
        line = f"  task {out['task']}: {dl} (process group {groups}, {whose})"
        if out["outcome"] != "ok":
            line += ", killed with their group"
            if "dataloader_gone_after_deadline" in out:
                line += (
                    f": all gone {out['dataloader_gone_after_deadline']:.2f}s after the "
                    f"task's deadline"
                )
        print(line)
    print(f"\nfinished in {elapsed:.1f}s; counters: {stats}")
    print(f"DataLoader worker processes started: {len(all_dl)}; still alive: {len(dl_alive)}")
    for w in dl_alive:
        print("  ALIVE:", w)
    live_left = [m for m in left if m["status"] != psutil.STATUS_ZOMBIE]
    print(
        f"worker groups created: {len(created)}; processes left in them: {len(live_left)}"
        + (
            f" (+{len(left) - len(live_left)} unreaped zombies)"
            if len(left) > len(live_left)
            else ""
        )
    )
    for m in left:
        print("  LEFT:", m)
    expected_failures = {hang_index} if hang_index < n_tasks else set()
    failures = {o["task"] for o in outcomes if o["outcome"] != "ok"}
    ok = not dl_alive and not live_left and failures == expected_failures
    print("no process survived." if not dl_alive and not live_left else "PROCESSES SURVIVED.")

    if args.json:
        summary = {
            "example": "torch_training",
            "tasks": outcomes,
            "hang_index": hang_index,
            "worker_pgids": sorted(created),
            "dataloader_pids": [w["pid"] for w in all_dl],
            "dataloader_alive": dl_alive,
            "survivors": left,
            "stats": stats,
            "elapsed": elapsed,
            "task_timeout": timeout,
            "ok": ok,
        }
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
