"""Driver for test_containment: a real SIGTTIN. Run as a session leader whose stdin is
a pty slave; we make it our controlling terminal (we are then its foreground group),
and a task in a worker (a background group of our session) reads /dev/tty.

usage: tty_driver.py REPORT_DIR. Prints "RESULT {json}".
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import termios
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import report, restore_sigint, wait_reports  # noqa: E402

from pgexecutor import ProcessGroupExecutor, TaskTimeoutError  # noqa: E402


def read_terminal(report_dir):
    report(report_dir, "tty", 0)
    with open("/dev/tty", "rb", buffering=0) as tty:
        return tty.read(1)  # a background group reading its terminal: SIGTTIN stops us


def main() -> None:
    report_dir = sys.argv[1]
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    out = {"foreground_is_us": os.tcgetpgrp(0) == os.getpgrp()}
    with ProcessGroupExecutor(1, task_timeout=3.0, kill_grace=0.3) as ex:
        fut = ex.submit(read_terminal, report_dir)
        (rep,) = wait_reports(report_dir, 1)
        out["pgid"] = rep["pgid"]
        out["stopped_seen"] = False
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline and not fut.done():
            try:
                if psutil.Process(rep["pid"]).status() == psutil.STATUS_STOPPED:
                    out["stopped_seen"] = True
                    break
            except psutil.Error:
                break
            time.sleep(0.01)
        try:
            out["result"] = repr(fut.result(timeout=60))
        except TaskTimeoutError as exc:
            out["error"] = type(exc).__name__
            out["stack"] = exc.stack
        except BaseException as exc:
            out["error"] = type(exc).__name__ + ": " + str(exc)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    restore_sigint()
    main()
