"""Driver for test_containment: start hanging, tree-spawning tasks, then die.

usage: parent_death_driver.py REPORT_DIR MODE
MODE "wait": sleep until a signal kills us (SIGKILL, SIGTERM, SIGINT...).
MODE "exit": on SIGUSR1, os._exit(1) (no cleanup at all runs).
Prints one line "READY {json}" when every task has reported its group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402
from _common import report, restore_sigint, wait_reports  # noqa: E402

from pgexecutor import ProcessGroupExecutor  # noqa: E402


def rendezvous(directory, i):
    open(os.path.join(directory, str(i)), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(directory)) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)


def hang_in_c(report_dir):
    # child bash, its child sleep, and a double-forked sleep orphaned yet still in our group
    subprocess.Popen(["bash", "-c", "(sleep 1000 &); sleep 1000 & wait"])
    report(report_dir, "c-hang", 3)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    re.match(r"(a+)+$", "a" * 64 + "b")  # exponential backtracking in C, GIL held


def hang_with_term_ignoring_children(report_dir):
    subprocess.Popen(["bash", "-c", 'trap "" TERM; sleep 1000; exit 0'])
    report(report_dir, "children-ignore-term", 2)
    time.sleep(1000)


def hang_ignoring_term(report_dir):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen(["bash", "-c", "sleep 1000 & wait"])
    report(report_dir, "worker-ignores-term", 2)
    time.sleep(1000)


def main() -> None:
    report_dir, mode = sys.argv[1], sys.argv[2]
    if mode == "exit":
        signal.signal(signal.SIGUSR1, lambda *_: os._exit(1))
    ex = ProcessGroupExecutor(max_workers=3)
    # Warm up: three tasks that wait for each other run on three workers at once, so
    # all three are started and idle afterwards, and each hanging task below lands on
    # a worker of its own.
    meet = os.path.join(report_dir, "meet")
    os.mkdir(meet)
    list(ex.map(rendezvous, [meet] * 3, range(3)))
    futs = [
        ex.submit(fn, report_dir)
        for fn in (hang_in_c, hang_with_term_ignoring_children, hang_ignoring_term)
    ]
    reports = wait_reports(report_dir, len(futs))
    guardians = [
        c.pid for c in psutil.Process().children() if "guardian_main" in " ".join(c.cmdline())
    ]
    info = {"driver": os.getpid(), "guardian": guardians[0] if guardians else None, "reports": reports}
    print("READY " + json.dumps(info), flush=True)
    while True:
        time.sleep(1000)


if __name__ == "__main__":
    restore_sigint()
    main()
