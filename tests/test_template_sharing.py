"""Back-to-back executors share the template and the guardian (issue 20 item 4):
one template per interpreter and preload serves every executor of the process, and
lingers ``_template_pool.LINGER`` seconds after the last one for the next."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import _template_tasks as tasks
import psutil
import pytest
from conftest import (
    children_running,
    kill_driver_and_tracked,
    still_running,
    wait_gone,
)

from pgexecutor import (
    ProcessGroupExecutor,
    WorkerCrashedError,
    _guardian,
    _platform,
    _template_pool,
)

pytestmark = pytest.mark.skipif(not _platform.USE_PIDFD, reason="the template needs pidfds (Linux)")

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


@pytest.fixture
def long_linger(monkeypatch):
    """Lingering that outlasts the test's pauses (a slow, shared machine)."""
    monkeypatch.setattr(_template_pool, "LINGER", 600.0)


def templates() -> list[int]:
    return [p.pid for p in children_running(os.getpid(), "_template import serve")]


def test_back_to_back_executors_share_one_template_and_the_guardian(long_linger):
    with ProcessGroupExecutor(2, mp_context="template") as ex:
        first = ex.submit(tasks.whoami).result(timeout=60)
    (tpl,) = _template_pool.lingering()
    guardian = _guardian.guardian_pid()
    assert tpl == first["ppid"] and guardian is not None
    assert templates() == [tpl]  # it waits, running: not closed, not a zombie
    # The default start too: its very first workers are forks of the lingering one.
    with ProcessGroupExecutor(2) as ex:
        infos = [ex.submit(tasks.whoami).result(timeout=60) for _ in range(3)]
        assert _template_pool.lingering() == []  # in use again
    assert {i["ppid"] for i in infos} == {tpl}
    assert all(i["pid"] == i["pgid"] for i in infos)
    assert _guardian.guardian_pid() == guardian  # one guardian throughout
    assert _template_pool.lingering() == [tpl]


def test_a_lingering_template_goes_by_itself_with_the_guardian(monkeypatch):
    monkeypatch.setattr(_template_pool, "LINGER", 0.3)
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        ex.submit(tasks.whoami).result(timeout=60)
    (tpl,) = _template_pool.lingering()
    guardian = _guardian.guardian_pid()
    assert wait_gone(tpl, 30)
    assert wait_gone(guardian, 30)
    ours = {tpl, guardian}
    deadline = time.monotonic() + 30
    while ours & _children() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not ours & _children()  # both reaped: no zombie of ours
    assert _template_pool.lingering() == [] and _guardian.guardian_pid() is None


def test_executors_that_overlap_share_the_template(long_linger):
    with ProcessGroupExecutor(1, mp_context="template") as a, \
            ProcessGroupExecutor(1, mp_context="template") as b:
        pa = a.submit(tasks.whoami).result(timeout=60)["ppid"]
        pb = b.submit(tasks.whoami).result(timeout=60)["ppid"]
        # Crashes on both sides at once: each replaces its own worker through it.
        for ex in (a, b):
            with pytest.raises(WorkerCrashedError):
                ex.submit(tasks.crash).result(timeout=60)
        assert {a.submit(tasks.whoami).result(timeout=60)["ppid"],
                b.submit(tasks.whoami).result(timeout=60)["ppid"]} == {pa}
    assert pa == pb
    assert _template_pool.lingering() == [pa]


def test_another_preload_gets_its_own_template(long_linger):
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        plain = ex.submit(tasks.whoami).result(timeout=60)["ppid"]
    with ProcessGroupExecutor(1, preload=("_template_preload",)) as ex:
        state = ex.submit(tasks.preload_state).result(timeout=60)
        loaded = ex.submit(tasks.whoami).result(timeout=60)["ppid"]
    assert loaded != plain
    assert state["imported_in"] == loaded  # imported once, in that template
    assert sorted(_template_pool.lingering()) == sorted([plain, loaded])


def test_a_failed_preload_is_tried_again_by_the_next_executor(tmp_path, monkeypatch, long_linger):
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = tmp_path / "_pgx_flaky_preload.py"
    mod.write_text("raise ImportError('not installed yet')\n")
    with ProcessGroupExecutor(1, preload=("_pgx_flaky_preload",)) as ex:
        with pytest.raises(WorkerCrashedError, match="not installed yet"):
            ex.submit(tasks.whoami).result(timeout=60)
    assert _template_pool.lingering() == []  # a failed one is not kept
    mod.write_text("VALUE = 1\n")  # the program fixed it meanwhile
    with ProcessGroupExecutor(1, preload=("_pgx_flaky_preload",)) as ex:
        assert ex.submit(tasks.whoami).result(timeout=60)["pid"] > 0


def test_a_lingering_template_killed_meanwhile_is_replaced(long_linger, caplog):
    caplog.set_level(logging.WARNING, logger="pgexecutor")
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        ex.submit(tasks.whoami).result(timeout=60)
    (tpl,) = _template_pool.lingering()
    proc = psutil.Process(tpl)
    proc.kill()  # a stray SIGKILL (our own child: its pid cannot have been reused)
    proc.wait(30)  # (psutil reaps it: as a waitpid(-1) of the program's would)
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        info = ex.submit(tasks.whoami).result(timeout=60)
    assert info["ppid"] not in (tpl, os.getpid())  # a new template's fork
    assert _template_pool.lingering() == [info["ppid"]]


def test_a_forked_child_starts_templates_of_its_own(long_linger):
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        ex.submit(tasks.whoami).result(timeout=60)
    (tpl,) = _template_pool.lingering()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's lingering template is not its own
        code = 1
        try:
            os.close(r)
            assert _template_pool.lingering() == []
            with ProcessGroupExecutor(1, mp_context="template") as ex:
                ppid = ex.submit(tasks.whoami).result(timeout=60)["ppid"]
            os.write(w, json.dumps({"ppid": ppid, "me": os.getpid()}).encode())
            _template_pool.close_idle()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child = json.loads(got)
    assert child["ppid"] != tpl
    assert _template_pool.lingering() == [tpl]  # the parent's still waits, untouched
    assert psutil.pid_exists(tpl)


@pytest.mark.parametrize("how", ["kill", "exit"])
def test_a_lingering_template_ends_with_the_program(how):
    """SIGKILLed or exiting normally while a template lingers (with a linger of an
    hour): the template and the guardian are gone within seconds."""
    drv = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "template_linger_driver.py"), how],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        start_new_session=True, text=True,
    )
    tracked: list[psutil.Process] = []
    try:
        line = drv.stdout.readline()
        assert line.startswith("LINGERING "), line + drv.stderr.read()
        info = json.loads(line[len("LINGERING "):])
        (tpl,) = info["template"]
        tracked = [psutil.Process(tpl), psutil.Process(info["guardian"])]
        if how == "kill":
            os.kill(drv.pid, signal.SIGKILL)
        assert drv.wait(60) == (-signal.SIGKILL if how == "kill" else 0)
        assert not still_running(tracked, 30)
    finally:
        kill_driver_and_tracked(drv, tracked)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}  # zombies included



def test_the_default_start_begins_its_template_at_shutdown_for_the_next_executor(long_linger):
    """Not while the pool works (its imports would compete with the tasks), but once
    its work is done: so that the next executor's first workers are forks (before,
    a pool that never replaced a worker had no template for the next one)."""
    with ProcessGroupExecutor(2) as ex:
        infos = [ex.submit(tasks.whoami).result(timeout=60) for _ in range(4)]
        assert {i["ppid"] for i in infos} == {os.getpid()}  # fresh: no template yet
        assert templates() == []
    (tpl,) = _template_pool.lingering()  # begun at the shutdown, waiting
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the next executor forks once it is ready
        with ProcessGroupExecutor(2) as ex:
            info = ex.submit(tasks.whoami).result(timeout=60)
        if info["ppid"] == tpl:
            break
        assert info["ppid"] == os.getpid()  # else a fresh interpreter, meanwhile
    assert info["ppid"] == tpl


def test_executors_built_and_shut_down_from_many_threads_at_once(long_linger):
    """Leases and give-backs race (four threads, executors overlapping and back to
    back, crashes in each): every task gets its own outcome, one template serves
    them all, and nothing but it is left."""
    import threading

    errors: list[BaseException] = []
    parents: set[int] = set()
    lock = threading.Lock()

    def run() -> None:
        try:
            for _ in range(3):
                with ProcessGroupExecutor(1, mp_context="template") as ex:
                    with pytest.raises(WorkerCrashedError):
                        ex.submit(tasks.crash).result(timeout=60)
                    info = ex.submit(tasks.whoami).result(timeout=60)
                with lock:
                    parents.add(info["ppid"])
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    (tpl,) = parents
    assert _template_pool.lingering() == [tpl] and templates() == [tpl]


def test_close_idle_templates_ends_a_waiting_template_at_once(long_linger):
    import pgexecutor

    with ProcessGroupExecutor(1, mp_context="template") as ex:
        ex.submit(tasks.whoami).result(timeout=60)
        pgexecutor.close_idle_templates()  # in use: it stays
        (tpl,) = templates()
    assert _template_pool.lingering() == [tpl]
    guardian = _guardian.guardian_pid()
    pgexecutor.close_idle_templates()
    # Closed and reaped before it returned (the guardian a moment later, if needed
    # by a thread of its own).
    assert tpl not in _children()
    assert _template_pool.lingering() == [] and _guardian.guardian_pid() is None
    assert wait_gone(guardian, 30)
