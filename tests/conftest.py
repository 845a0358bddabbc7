"""Shared fixtures: every test must leave no worker process group behind.

``pgexecutor.spawned_groups()`` lists every worker process group this
process created (a worker's pid is its pgid). After each test, every group created
during that test must be empty: no process, zombie or not, may still carry that pgid.
Zombies and slow exits get a generous grace period (LEAK_GRACE seconds) before the
test is failed; survivors are then SIGKILLed so one leak does not cascade.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

def require_extra(module: str, extra: str) -> Any:
    """Import ``module`` or skip the test, saying which extra to install.

    With PGEXECUTOR_REQUIRE_EXTRAS set (``.ci/run`` sets it) a missing extra fails the
    test instead: CI must run every integration. OSError counts as missing too: gmsh's
    module loads its shared library at import and fails so without libGLU and friends.
    """
    import importlib

    reason = (
        f"the {extra!r} extra is not installed or not importable ({module}); "
        f"pip install -e '.[test,{extra}]' to run this test"
    )
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as exc:
        if os.environ.get("PGEXECUTOR_REQUIRE_EXTRAS"):
            pytest.fail(f"{reason} (PGEXECUTOR_REQUIRE_EXTRAS is set): {exc}")
        pytest.skip(f"{reason}: {exc}")


#: Functions a driver script defines in its own ``__main__``, so that they travel by
#: value: a plain function, a closure, and a task that starts a child and hangs (its
#: report lists both processes as ``[pid, create_time]``, like _cluster_tasks).
MAIN_SCRIPT_FUNCTIONS = """
import json, os, subprocess, sys, time
import psutil

def square(x):
    return x * x

def make_adder(n):
    def adder(x):
        return x + n
    return adder

def hang_with_child(path):
    child = subprocess.Popen(["sleep", "300"])
    procs = [[p, psutil.Process(p).create_time()] for p in (os.getpid(), child.pid)]
    with open(path + ".tmp", "w") as f:
        json.dump({"procs": procs}, f)
    os.replace(path + ".tmp", path)
    time.sleep(300)
"""


def run_main_script(tmp_path, imports: str, main: str, argv: list[str], timeout: float) -> dict:
    """Run ``imports`` + MAIN_SCRIPT_FUNCTIONS + ``main`` as a script of its own; return
    the JSON it printed on its last ``RESULT `` line (the test fails with its output
    if it printed none or exited non-zero)."""
    script = tmp_path / "driver_script.py"
    script.write_text(textwrap.dedent(imports) + MAIN_SCRIPT_FUNCTIONS + textwrap.dedent(main))
    proc = subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(tmp_path),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("RESULT ") :])


def read_report(path, timeout: float = 60.0) -> dict:
    """The JSON report a tree-spawning task wrote (its processes as [pid, create_time])."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.05)
    raise AssertionError(f"the task never reported its processes in {path}")


def procs_alive(procs) -> list[int]:
    """Pids of ``[pid, create_time]`` pairs whose process still runs (zombies are dead;
    the start time tells a recycled pid from the process that was reported)."""
    left = []
    for pid, ctime in procs:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - ctime) < 0.05 and p.status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def wait_procs_gone(procs, timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for every ``[pid, create_time]`` pair to be gone; return
    the pids still alive then."""
    deadline = time.monotonic() + timeout
    while True:
        left = procs_alive(procs)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def assert_tree_gone(report: dict, timeout: float) -> float:
    """Assert every process a task reported is gone within ``timeout`` s; return how
    long that took. After a failed check, SIGKILL exactly those processes."""
    procs = report["procs"]
    t0 = time.monotonic()
    left = wait_procs_gone(procs, timeout)
    if left:
        for pid, ctime in procs:
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - ctime) < 0.05:
                    p.kill()
            except psutil.NoSuchProcess:
                pass
    assert not left, f"task processes survived {timeout:g}s: {left} of {procs}"
    return time.monotonic() - t0


def run_in_own_session(
    cmd: list[str], cwd: str, limit: float, what: str
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (stdin /dev/null) in a session of its own and return its outcome.
    Should it overrun ``limit`` seconds, its whole group is killed (its pgexecutor
    workers are then killed by the guardian, which watches its process) and the test
    fails with its output."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this call created
        out, err = proc.communicate()
        pytest.fail(f"{what} ran over {limit:g}s\n--- stdout\n{out}\n--- stderr\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def children_running(pid: int, marker: str) -> list[psutil.Process]:
    """Children of ``pid`` whose command line contains ``marker`` (zombies included;
    none if ``pid`` is gone): our guardians ("guardian_main"), templates
    ("_template import serve")."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if marker in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def running(p: psutil.Process) -> bool:
    """``p`` (the very process: pid and create time) runs, and is no zombie."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_running(procs: list[psutil.Process], within: float = 30.0) -> list[int]:
    """Wait up to ``within`` s for every one of ``procs`` to end; the pids that did not."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(running(p) for p in procs):
        time.sleep(0.05)
    return [p.pid for p in procs if running(p)]


def kill_driver_and_tracked(drv: subprocess.Popen, procs: list[psutil.Process]) -> None:
    """Clean-up after a driver-script test: SIGKILL what it reported (ours, checked by
    pid and create time) if still running, and the driver itself."""
    for p in procs:
        if running(p):
            p.kill()
    if drv.poll() is None:
        drv.kill()
        drv.wait()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie is dead, only unreaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    """Poll until ``pid`` is gone (or a zombie); False if it outlived ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


#: seconds to wait for a test's worker groups to empty before calling it a leak
LEAK_GRACE = 10.0


def _spawned_pgids_func():
    """pgexecutor.spawned_groups, or None while pgexecutor is not importable yet."""
    try:
        import pgexecutor  # noqa: PLC0415
    except Exception:
        return None
    return getattr(pgexecutor, "spawned_groups", None)


def close_lingering_templates() -> None:
    """End the templates that wait for a next executor (see _template_pool), as the
    program's exit would: a test's executors may share them, the next test's not,
    and the leak check must see that they go."""
    try:
        from pgexecutor import close_idle_templates  # noqa: PLC0415
    except Exception:
        return
    close_idle_templates()


def spawned_pgids() -> frozenset[int] | None:
    func = _spawned_pgids_func()
    if func is None:
        return None
    try:
        return frozenset(func())
    except Exception:
        return None


def group_members(pgid: int) -> list[dict]:
    """Every process (zombies included) whose process group is ``pgid``.

    Each entry: ``{"pid", "pgid", "status", "cmdline", "ppid"}``.
    """
    found = []
    for proc in psutil.process_iter(["pid", "status", "cmdline", "ppid"]):
        pid = proc.info["pid"]
        try:
            pg = os.getpgid(pid)
        except (ProcessLookupError, PermissionError, OSError):
            continue
        if pg != pgid:
            continue
        found.append(
            {
                "pid": pid,
                "pgid": pg,
                "status": proc.info.get("status"),
                "cmdline": " ".join(proc.info.get("cmdline") or []) or "?",
                "ppid": proc.info.get("ppid"),
            }
        )
    return found


def survivors_of(pgids, grace: float = LEAK_GRACE) -> list[dict]:
    """Poll until every group in ``pgids`` is empty or ``grace`` runs out.

    Returns the processes still present at the end (empty list = clean).
    """
    own = os.getpgrp()
    pgids = {p for p in pgids if p and p != own}
    if not pgids:
        return []
    deadline = time.monotonic() + grace
    delay = 0.02
    while True:
        left = [m for pg in sorted(pgids) for m in group_members(pg)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def format_survivors(left: list[dict]) -> str:
    return "\n".join(
        f"  pid={m['pid']} pgid={m['pgid']} ppid={m['ppid']} status={m['status']} "
        f"cmdline={m['cmdline']!r}"
        for m in left
    )


def _kill_groups(pgids) -> None:
    own = os.getpgrp()
    for pg in pgids:
        if not pg or pg == own:
            continue
        try:
            os.killpg(pg, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(autouse=True)
def no_leaked_worker_groups(request):
    """Fail the test if any worker group it created still has a process after it."""
    before = spawned_pgids()
    yield
    close_lingering_templates()
    after = spawned_pgids()
    if after is None:  # pgexecutor not importable: nothing to check
        return
    new = after - (before or frozenset())
    if not new:
        return
    left = survivors_of(new)
    if left:
        _kill_groups({m["pgid"] for m in left})
        pytest.fail(
            f"{request.node.nodeid}: {len(left)} process(es) of worker groups created "
            f"by this test survived {LEAK_GRACE:g} s after it ended:\n"
            + format_survivors(left),
            pytrace=False,
        )
