"""Driver for test_template: workers forked from a template hang with children; then
the test SIGKILLs us.

usage: template_parent_death_driver.py REPORT_DIR
Prints one line "READY {json}" with the template's pid and the tasks' reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402
from _common import report, restore_sigint, wait_reports  # noqa: E402

from pgexecutor import ProcessGroupExecutor  # noqa: E402


def hang_with_child(report_dir, name):
    subprocess.Popen(["sleep", "1000"])
    report(report_dir, name, 1)
    time.sleep(1000)


def main() -> None:
    restore_sigint()
    report_dir = sys.argv[1]
    ex = ProcessGroupExecutor(max_workers=2, mp_context="template")
    futs = [ex.submit(hang_with_child, report_dir, f"t{i}") for i in range(2)]
    reports = wait_reports(report_dir, len(futs))
    templates = [
        c.pid for c in psutil.Process().children() if "_template import serve" in " ".join(c.cmdline())
    ]
    # The template's children: the two workers and the standby forked ahead of need.
    forked = []
    for _ in range(200):
        forked = [c.pid for t in templates for c in psutil.Process(t).children()]
        if len(forked) >= 3:
            break
        time.sleep(0.05)
    print(
        "READY " + json.dumps({"template": templates, "reports": reports, "forked": forked}),
        flush=True,
    )
    while True:
        time.sleep(1000)


if __name__ == "__main__":
    main()
