"""Driver for test_containment: create an executor and exit without shutdown.

usage: forgotten_driver.py REPORT_DIR MODE
MODE "after-results": every result has arrived (tasks left background children).
MODE "running": a task is still in a short sleep when the script ends.
Prints "PGIDS a b ..." then falls off the end of the script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import report, restore_sigint, wait_reports  # noqa: E402

from pgexecutor import ProcessGroupExecutor  # noqa: E402


def leave_child(i):
    subprocess.Popen(["sleep", "1000"])  # still running in our group when we return
    time.sleep(0.2)
    return os.getpgid(0)


def short_sleep(report_dir):
    subprocess.Popen(["sleep", "1000"])
    report(report_dir, "running", 1)
    time.sleep(1.5)
    return "done"


def main() -> None:
    report_dir, mode = sys.argv[1], sys.argv[2]
    ex = ProcessGroupExecutor(max_workers=2)
    if mode == "after-results":
        pgids = sorted(set(ex.map(leave_child, range(4))))
    else:
        ex.submit(short_sleep, report_dir)
        pgids = [r["pgid"] for r in wait_reports(report_dir, 1)]
    print("PGIDS " + " ".join(map(str, pgids)), flush=True)


if __name__ == "__main__":
    restore_sigint()
    main()
