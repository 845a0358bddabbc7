"""The paths other platforms take, run on Linux too.

Without pidfds (macOS, kernels before 5.3, sandboxes that refuse them) the manager
learns of a worker's death by polling ``waitid(WNOHANG | WNOWAIT)``; the environment
variable ``PGEXECUTOR_NO_PIDFD=1`` makes Linux take that path, so it cannot rot
unseen. Each program runs in a fresh interpreter with the variable set, under a hard
time bound, and proves that none of its worker groups survived.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import format_survivors, survivors_of

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: pidfds exist to be turned off")

PROGRAM = """
import json, os, signal, subprocess, sys, time
import pgexecutor
from pgexecutor import ProcessGroupExecutor, TaskTimeoutError, WorkerCrashedError

def pidfds():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        except OSError:
            pass
    return n

def crash():
    os.kill(os.getpid(), signal.SIGKILL)

def fork_then_crash():
    # The grandchild holds copies of the worker's pipes: no EOF arrives when the
    # worker dies; only the exit itself says so.
    subprocess.Popen(["sleep", "300"])
    time.sleep(0.2)
    os._exit(7)

out = {}
with ProcessGroupExecutor(max_workers=2, task_timeout=1, kill_grace=0.5) as ex:
    out["squares"] = list(ex.map(pow, range(20), [2] * 20))
    out["pidfds"] = pidfds()
    for name, fn in (("crash", crash), ("fork_then_crash", fork_then_crash)):
        try:
            ex.submit(fn).result(timeout=30)
        except WorkerCrashedError as err:
            out[name] = err.exitcode
    try:
        ex.submit(time.sleep, 60).result(timeout=30)
    except TaskTimeoutError:
        out["timeout"] = True
    out["after"] = ex.submit(pow, 3, 3).result(timeout=30)
out["groups"] = sorted(pgexecutor.spawned_groups())
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("no_pidfd", [True, False], ids=["waitid-polling", "pidfd"])
def test_worker_deaths_are_seen_with_and_without_pidfds(tmp_path, no_pidfd):
    env = dict(os.environ)
    env.pop("PGEXECUTOR_NO_PIDFD", None)
    if no_pidfd:
        env["PGEXECUTOR_NO_PIDFD"] = "1"
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(PROGRAM))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120,
        env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["squares"] == [i * i for i in range(20)]
    assert out["crash"] == -9 and out["fork_then_crash"] == 7
    assert out["timeout"] is True and out["after"] == 27
    if no_pidfd:
        assert out["pidfds"] == 0, "PGEXECUTOR_NO_PIDFD=1 still opened pidfds"
    elif hasattr(os, "pidfd_open"):
        assert out["pidfds"] >= 1, "the pidfd path was not taken"
    left = survivors_of(out["groups"])
    assert not left, "worker processes survived:\n" + format_survivors(left)
