"""The main demo: a map over tasks that hang, crash and spawn process trees.

Run it with ``python examples/demo.py`` (``-v`` also prints pgexecutor's log). Each input is one of:

* ``ok``       -- returns a number;
* ``hang-c``   -- hangs inside C code with SIGTERM blocked (a catastrophic regex, the
                  kind of loop a mesher gets stuck in): only SIGKILL stops it;
* ``segfault`` -- dereferences NULL through ctypes: the worker dies of SIGSEGV;
* ``abort``    -- calls C's abort(): SIGABRT;
* ``tree``     -- starts ``bash -c 'sleep 1000 & sleep 1000 & wait'`` (children and
                  grandchildren) plus a double-forked daemon-ish child, then hangs;
* ``error``    -- raises ValueError (an ordinary task exception).

Every bad input costs exactly its own result; the rest of the map completes. At the end
the demo lists every process of every worker group it created and shows none survived.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time

import psutil

from pgexecutor import ProcessGroupExecutor, TaskTimeoutError, WorkerCrashedError, spawned_groups

KINDS = ["ok", "hang-c", "ok", "segfault", "tree", "ok", "abort", "error", "ok", "tree", "ok"]


def job(i: int, kind: str) -> dict:
    """One unit of work; ``kind`` chooses the (injected) fault."""
    me = {"input": i, "kind": kind, "pid": os.getpid(), "pgid": os.getpgid(0)}
    if kind == "hang-c":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        re.match(r"(a+)+$", "a" * 64 + "b")  # exponential backtracking, all in C
    elif kind == "segfault":
        ctypes.string_at(0)
    elif kind == "abort":
        ctypes.CDLL(None).abort()
    elif kind == "tree":
        subprocess.Popen(["bash", "-c", "sleep 1000 & sleep 1000 & wait"])
        if os.fork() == 0:  # a double fork: the grandchild stays in our group
            if os.fork() == 0:
                time.sleep(1000)
            os._exit(0)
        time.sleep(1000)
    elif kind == "error":
        raise ValueError(f"input {i} is invalid")
    me["value"] = i * i
    return me


def survivors(pgids: frozenset[int]) -> list[psutil.Process]:
    """Live processes in any of these groups (zombies excluded: they are dead)."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) in pgids and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


def main() -> int:
    if "-v" in sys.argv[1:]:  # show the executor's own log: starts, kills, replacements
        logging.basicConfig(format="    [%(name)s] %(message)s")
        logging.getLogger("pgexecutor").setLevel(logging.DEBUG)
    before = spawned_groups()
    t0 = time.monotonic()
    print(f"{len(KINDS)} tasks on 2 workers, task_timeout=2s, kill_grace=0.5s\n")
    with ProcessGroupExecutor(max_workers=2, task_timeout=2.0, kill_grace=0.5) as ex:
        results = ex.map(job, range(len(KINDS)), KINDS, return_exceptions=True)
        for i, (kind, res) in enumerate(zip(KINDS, results, strict=True)):
            if isinstance(res, TaskTimeoutError):
                # str(res) names the innermost frame of the worker's stack at expiry;
                # res.stack holds the whole faulthandler dump of every thread.
                what = f"TIMEOUT   {res}; its group was killed"
            elif isinstance(res, WorkerCrashedError):
                what = f"CRASHED   {res}"
            elif isinstance(res, Exception):
                what = f"ERROR     {type(res).__name__}: {res}"
            else:
                what = f"ok        value={res['value']} (worker pid {res['pid']} = pgid {res['pgid']})"
            print(f"  input {i:2d} {kind:9s} {what}")
        stats = ex.stats()
    elapsed = time.monotonic() - t0
    created = spawned_groups() - before
    time.sleep(0.2)  # let init reap the last SIGKILLed orphans
    left = survivors(created)
    print(f"\nfinished in {elapsed:.1f}s; counters: {stats}")
    print(f"worker groups created: {len(created)}; processes left in them: {len(left)}")
    for p in left:
        print("  LEAKED:", p.pid, p.cmdline())
    if left:
        return 1
    print("no process survived.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
