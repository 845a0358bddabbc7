"""Driver for test_journal: a journaled map in a process the test can kill.

usage: journal_driver.py MODE JOURNAL N
  print      map ``work`` over range(N): prints "PGIDS [...]" after the first result,
             then "R x" for every result, flushed at once; "DONE" at the end
  interrupt  Ctrl-C (SIGINT to itself) while input 1 still runs; then a new map on
             the same journal; prints "RESULT {...}"
``work`` appends its input to the file named by $SIDE before it returns, so the test
knows every run of every input.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import restore_sigint  # noqa: E402

from pgexecutor import ProcessGroupExecutor, spawned_groups  # noqa: E402


def work(x, pause=0.0):
    with open(os.environ["SIDE"], "a") as f:
        f.write(f"{x}\n")
    if pause:
        time.sleep(pause)
    return x * 10


def sleepy(x):
    if x == 1:
        time.sleep(60)  # still running when Ctrl-C comes
    return x


def print_mode(path: str, n: int, pause: float) -> None:
    with ProcessGroupExecutor(2) as ex:
        first = True
        for r in ex.map(work, range(n), [pause] * n, journal=path):
            if first:
                print("PGIDS " + json.dumps(sorted(spawned_groups())), flush=True)
                first = False
            print(f"R {r // 10}", flush=True)
    print("DONE", flush=True)


def interrupt_mode(path: str) -> None:
    got = []
    try:
        with ProcessGroupExecutor(2, kill_grace=0.2) as ex:
            for r in ex.map(sleepy, [0, 1, 2], journal=path):
                got.append(r)
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    except KeyboardInterrupt:
        pass
    # The journal is unlocked: a new map on it works at once and replays input 0.
    with ProcessGroupExecutor(1) as ex:
        again = list(ex.map(sleepy, [0], journal=path))
    print("RESULT " + json.dumps({"got": got, "again": again}), flush=True)


def main() -> None:
    restore_sigint()
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "print":
        pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
        print_mode(path, int(sys.argv[3]), pause)
    elif mode == "interrupt":
        interrupt_mode(path)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
