"""How late does a timed-out task's future fail, after its deadline?

Two tasks, each run ``--reps`` times on a warm one-worker pool with a fixed
``task_timeout``: one sleeping in Python (its faulthandler stack dump arrives, and
is attached to the error), one spinning in C with every catchable signal blocked
(no dump can ever come; before the stack was asked for ahead of the deadline, the
kill waited 0.1 s for it). The lateness is the time from submit to the future's
failure, minus the timeout (it includes the dispatch: the clock starts when the
manager hands the task over). Prints the median and the worst, in milliseconds.

    python benchmarks/deadline_latency.py [--reps 7] [--timeout 0.3] [--native]

``--native``: with ``native_stacks=True`` (py-spy; use a timeout of 2 s or more, so
that the dump, started 0.3 s ahead, is done by the deadline).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])

import _supervision_tasks as tasks  # noqa: E402

from pgexecutor import ProcessGroupExecutor, TaskTimeoutError  # noqa: E402


def lateness(
    fn, args: tuple, reps: int, timeout: float, native: bool
) -> tuple[list[float], int, int]:
    """Milliseconds late for each rep, and how many errors carried a Python stack
    and a native one."""
    late: list[float] = []
    stacks = natives = 0
    with ProcessGroupExecutor(1, task_timeout=timeout, kill_grace=0.1, native_stacks=native) as ex:
        for _ in range(reps):
            ex.options(task_timeout=None).submit(tasks.getpid).result()  # warm worker
            t0 = time.monotonic()
            fut = ex.submit(fn, *args)
            wait([fut])
            late.append((time.monotonic() - t0 - timeout) * 1000)
            err = fut.exception()
            assert isinstance(err, TaskTimeoutError), err
            stacks += err.stack is not None
            natives += err.native_stack is not None
    return late, stacks, natives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=0.3)
    parser.add_argument("--native", action="store_true", help="native_stacks=True (py-spy)")
    opts = parser.parse_args()
    for name, fn, args in (
        ("python sleep", tasks.nap, (1000,)),
        ("C spin, signals blocked", tasks.spin_with_every_signal_blocked, ()),
    ):
        late, stacks, natives = lateness(fn, args, opts.reps, opts.timeout, opts.native)
        print(
            f"{name:26s} late by: median {statistics.median(late):6.1f} ms, "
            f"max {max(late):6.1f} ms; stack attached {stacks}/{len(late)}, "
            f"native stack {natives}/{len(late)}"
        )


if __name__ == "__main__":
    main()
