"""The main demo: a map over tasks that hang, crash and spawn process trees.

Run it with ``python examples/demo.py`` (``-v`` also prints pgexecutor's log, where
"task N" is row N of the table). Each input is one of:

* ``normal``   -- returns a number;
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

from pgexecutor import (
    ProcessGroupExecutor,
    TaskTimeoutError,
    close_idle_templates,
    counters,
    spawned_groups,
)

KINDS = [
    "normal", "hang-c", "normal", "segfault", "tree", "normal", "abort", "error", "normal", "tree",
    "normal",
]
#: How the table names each outcome, and what it means (pgexecutor.counters says it
#: once for the progress bar, stats() and the journal report).
LABELS = {"ok": "ok", "error": "ERROR", "timeout": "TIMEOUT", "crashed": "CRASHED"}
#: The executor's DEBUG lines worth showing with -v (the rest repeat what the
#: WARNING/INFO lines say, or are bookkeeping).
SHOWN_DEBUG = ("started worker",)


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


def show_log() -> None:
    """``-v``: pgexecutor's log between the table's rows (on stdout: in the order it
    happened, even through a pipe), warnings and infos (kills, deaths) and the worker
    starts. pgexecutor numbers tasks from 1 in the order they were submitted; this
    process submits nothing but the map, so "task N" is row N of the table."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("    [%(name)s] %(message)s"))
    handler.addFilter(
        lambda r: r.levelno >= logging.INFO or str(r.msg).startswith(SHOWN_DEBUG)
    )
    log = logging.getLogger("pgexecutor")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)


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
        show_log()
    before = spawned_groups()
    t0 = time.monotonic()
    print(f"{len(KINDS)} tasks on 2 workers, task_timeout=2s, kill_grace=0.5s. Outcomes:")
    for outcome, label in LABELS.items():
        print(f"  {label:<8} {counters.MEANING[outcome]}")
    print(f"\n{'task':>6}  {'input':<9} {'outcome':<9} detail")
    tally = dict.fromkeys(LABELS, 0)
    with ProcessGroupExecutor(max_workers=2, task_timeout=2.0, kill_grace=0.5) as ex:
        numbers = range(1, len(KINDS) + 1)  # task N is input N, as pgexecutor's log says
        results = ex.map(job, numbers, KINDS, return_exceptions=True)
        for n, kind, res in zip(numbers, KINDS, results, strict=True):
            outcome = counters.cause_of(res) if isinstance(res, BaseException) else counters.OK
            tally[outcome] += 1
            if isinstance(res, TaskTimeoutError):
                # str(res) names the innermost frame of the worker's stack at expiry;
                # res.stack holds the whole faulthandler dump of every thread.
                detail = f"{res}; its group was killed"
            elif isinstance(res, Exception):
                detail = str(res) if outcome == "crashed" else f"{type(res).__name__}: {res}"
            else:
                detail = f"value={res['value']} (worker pid {res['pid']} = pgid {res['pgid']})"
            print(f"{n:>6}  {kind:<9} {LABELS[outcome]:<9} {detail}")
        stats = ex.stats()
    elapsed = time.monotonic() - t0
    # The worker template would wait a second for a next executor: end it now, so
    # that the count below covers every process the library started.
    close_idle_templates()
    created = spawned_groups() - before
    time.sleep(0.2)  # let init reap the last SIGKILLed orphans
    left = survivors(created)
    failed = len(KINDS) - tally[counters.OK]
    causes = ", ".join(f"{c} {tally[c]}" for c in LABELS if c != counters.OK)
    print(f"\nfinished in {elapsed:.1f}s: ok {tally[counters.OK]}, failed {failed} ({causes})")
    print(f"executor.stats(): {stats}")
    print(f"worker groups created: {len(created)}; processes left in them: {len(left)}")
    for p in left:
        print("  LEAKED:", p.pid, p.cmdline())
    if left:
        return 1
    print("no process survived.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
