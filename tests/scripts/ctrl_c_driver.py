"""Driver for test_containment: hanging tasks, then the test sends Ctrl-C (SIGINT to
our process group). usage: ctrl_c_driver.py REPORT_DIR MODE, MODE one of
"with-map" (map inside a with block) or "bare" (submit, never shut down)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import report, restore_sigint  # noqa: E402

from pgexecutor import ProcessGroupExecutor  # noqa: E402


def hang(i, report_dir):
    subprocess.Popen(["sleep", "1000"])
    report(report_dir, f"task{i}", 1)
    time.sleep(1000)


def main() -> None:
    report_dir, mode = sys.argv[1], sys.argv[2]
    if mode == "with-map":
        with ProcessGroupExecutor(max_workers=2) as ex:
            for r in ex.map(hang, range(4), [report_dir] * 4):
                print(r)
    else:
        ex = ProcessGroupExecutor(max_workers=2)
        futs = [ex.submit(hang, i, report_dir) for i in range(4)]
        for f in futs:
            f.result()


if __name__ == "__main__":
    restore_sigint()
    main()
