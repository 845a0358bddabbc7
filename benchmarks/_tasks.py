"""Task functions used by ``benchmarks/bench.py``.

They live in their own importable module (``benchmarks._tasks``) so that
spawn-based peers (ProcessPoolExecutor(spawn), loky, pgexecutor with a
spawn/forkserver start method) can unpickle them by reference.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time


def noop(x):
    """Tiny task: returns its argument."""
    return x


def identity(x):
    """Payload task: returns its (large) argument unchanged."""
    return x


def sleep_pid(delay):
    """Warm-up task: sleep a little so that every worker gets one, return the pid."""
    time.sleep(delay)
    return os.getpid()


def _report(info_path, grandchild=True):
    """Write where this task runs to ``info_path`` (atomically), before hanging.

    Fields: pid, pgid, ppid, t_start (time.monotonic(), CLOCK_MONOTONIC, which is
    comparable across processes on Linux) and the pid of a grandchild
    (``sleep 1000``) started in the worker's process group, or None.
    """
    t_start = time.monotonic()
    gpid = None
    if grandchild:
        argv = [shutil.which("sleep") or "sleep", "1000"]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, close_fds=True)
        except OSError:
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"],
                                    stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, close_fds=True)
        gpid = proc.pid
        # Keep the Popen object from being collected (its __del__ is harmless, but
        # we do not want anything to wait for it).
        _KEEP.append(proc)
    info = {"pid": os.getpid(), "pgid": os.getpgid(0), "ppid": os.getppid(),
            "grandchild": gpid, "t_start": t_start}
    tmp = "%s.%d.tmp" % (info_path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, info_path)


_KEEP = []


def hang_sleep(info_path, grandchild=True):
    """A task that sleeps (interruptibly) far past any timeout."""
    _report(info_path, grandchild)
    time.sleep(1000)
    return "finished?!"


def hang_cspin(info_path, grandchild=True):
    """A task that ignores/blocks SIGTERM and then spins inside one C call.

    ``sum(range(10**12))`` runs entirely in C: no Python signal handler, no
    thread switch and no eval-breaker check can happen until it returns (hours).
    SIGTERM is blocked in this thread and, when this is the main thread, also
    set to SIG_IGN (so it cannot kill the process through another thread
    either). Only SIGKILL stops it.
    """
    _report(info_path, grandchild)  # grandchild is started with SIGTERM still deliverable
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread of the worker
        pass
    return sum(range(10 ** 12))
