"""Workers forked from a template (``mp_context="template"`` / ``preload=``): each
guarantee of issue 20's items 1-2 (DESIGN fact 14)."""

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
    running,
    still_running,
    wait_gone,
)

from pgexecutor import ProcessGroupExecutor, WorkerCrashedError, _platform, spawned_groups

pytestmark = pytest.mark.skipif(not _platform.USE_PIDFD, reason="the template needs pidfds (Linux)")

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


def templates_of(pid: int) -> list[psutil.Process]:
    """Template processes that are children of ``pid``."""
    return children_running(pid, "_template import serve")


def the_template() -> psutil.Process:
    (tpl,) = [t for t in templates_of(os.getpid()) if t.status() != psutil.STATUS_ZOMBIE]
    return tpl


def fd_targets(pid: int) -> dict[int, str]:
    d = f"/proc/{pid}/fd"
    out = {}
    for name in os.listdir(d):
        try:
            out[int(name)] = os.readlink(os.path.join(d, name))
        except OSError:
            continue
    return out


def test_workers_are_forked_from_the_template_and_lead_their_own_groups():
    with ProcessGroupExecutor(2, mp_context="template") as ex:
        futs = [ex.submit(tasks.sleep_then, 0.3, i) for i in range(2)]
        assert [f.result() for f in futs] == [0, 1]
        tpl = the_template()
        infos = [ex.submit(tasks.whoami).result() for _ in range(4)]
        groups = set(spawned_groups())
        for info in infos:
            assert info["pid"] == info["pgid"] != os.getpgrp()
            assert info["ppid"] == tpl.pid  # forked by the template, not by us
            assert info["pgid"] in groups
        # The template leads a group of its own: in no worker's, not in ours.
        assert os.getpgid(tpl.pid) == tpl.pid != os.getpgrp()
        assert tpl.pid not in {i["pid"] for i in infos}
        assert tpl.pid in groups  # the leak check sees it too
        assert tpl.num_threads() == 1  # forks only from a single-threaded process
    assert wait_gone(tpl.pid, 15)
    assert not templates_of(os.getpid())  # reaped, not a zombie of ours


def test_default_start_forks_replacements_from_the_template():
    """mp_context=None: the first worker may be a fresh interpreter (the template
    starts beside it); once the template is up, replacements are its forks."""
    with ProcessGroupExecutor(1) as ex:
        first = ex.submit(tasks.whoami).result()
        assert first["pid"] == first["pgid"]
        tpl = None
        for _ in range(50):
            with pytest.raises(WorkerCrashedError):
                ex.submit(tasks.crash).result(timeout=60)
            info = ex.submit(tasks.whoami).result(timeout=60)
            assert info["pid"] == info["pgid"]
            tpls = [t.pid for t in templates_of(os.getpid())]
            if info["ppid"] in tpls:
                tpl = info["ppid"]
                break
            assert info["ppid"] == os.getpid()  # else a fresh interpreter of ours
        assert tpl is not None, "no worker ever came from the template"


def _forked_by(tpl: psutil.Process) -> set[int]:
    return {c.pid for c in tpl.children() if running(c)}


def _wait_for_standby(tpl: psutil.Process, workers: set[int]) -> int:
    """The template's child that is no worker: the standby, forked ahead of need."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        spare = _forked_by(tpl) - workers
        if spare:
            (pid,) = spare
            return pid
        time.sleep(0.01)
    raise AssertionError("no standby was forked")


def test_a_replacement_is_the_standby_forked_ahead_and_shutdown_ends_it():
    """Workers in milliseconds: the template forks the next worker while the pool
    works, so a crash's replacement is a hand-over (this failed before: each
    replacement was forked only when needed)."""
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        first = ex.submit(tasks.whoami).result()
        tpl = the_template()
        standby = _wait_for_standby(tpl, {first["pid"]})
        assert os.getpgid(standby) == standby  # already the leader of its own group
        with pytest.raises(WorkerCrashedError):
            ex.submit(tasks.crash).result(timeout=60)
        second = ex.submit(tasks.whoami).result(timeout=60)
        assert second["pid"] == standby and second["pgid"] == standby
        assert ex.worker_pids() == [standby]
        last = _wait_for_standby(tpl, {standby})  # and the next one is on its way
        last_proc = psutil.Process(last)
    assert not running(last_proc)  # shutdown ended the unused standby too
    assert last in spawned_groups()  # so that leak checks see it


def test_an_unused_standby_is_dropped_when_the_environment_changed(monkeypatch):
    """A standby forked before the parent's environment changed must not be handed
    out (a fresh start takes the environment of its moment): it is ended, reaped,
    and a worker is forked with the new one."""
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        first = ex.submit(tasks.whoami).result()
        tpl = the_template()
        stale = psutil.Process(_wait_for_standby(tpl, {first["pid"]}))
        monkeypatch.setenv("PGX_TEMPLATE_TEST", "changed")
        with pytest.raises(WorkerCrashedError):
            ex.submit(tasks.crash).result(timeout=60)
        info = ex.submit(tasks.whoami).result(timeout=60)
        assert info["pid"] != stale.pid
        assert ex.submit(tasks.cwd_and_env, "PGX_TEMPLATE_TEST").result()[1] == "changed"
        assert not running(stale)
        assert stale.pid not in {c.pid for c in tpl.children()}  # reaped, not a zombie


def test_recycling_every_task_hands_over_standbys_and_loses_nothing():
    """max_tasks_per_child=1 on the template start: each task a new worker, most of
    them standbys; every result right, every worker its own group, none left."""
    with ProcessGroupExecutor(2, mp_context="template", max_tasks_per_child=1) as ex:
        infos = list(ex.map(tasks.sleep_then, [0.0] * 30, range(30)))
        assert infos == list(range(30))
        whos = [ex.submit(tasks.whoami).result(timeout=60) for _ in range(10)]
    assert len({w["pid"] for w in whos}) == 10
    assert all(w["pid"] == w["pgid"] for w in whos)


def test_a_fork_of_the_parent_leaves_the_standby_to_the_parent():
    """A child of os.fork() holds none of the standby's pipe ends (they are
    parent-only): its exit changes nothing, and the parent still hands it over."""
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        first = ex.submit(tasks.whoami).result()
        standby = _wait_for_standby(the_template(), {first["pid"]})
        pid = os.fork()
        if pid == 0:  # the child: leaves at once, without running anything of ours
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        with pytest.raises(WorkerCrashedError):
            ex.submit(tasks.crash).result(timeout=60)
        assert ex.submit(tasks.whoami).result(timeout=60)["pid"] == standby


def test_a_standby_killed_before_its_hand_over_costs_one_start_only(caplog):
    """A standby that died while it waited (the OOM killer, a stray signal) is handed
    over dead: that start fails like any worker dying before READY, the next one
    comes from the template, and no task is lost."""
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        first = ex.submit(tasks.whoami).result()
        standby = _wait_for_standby(the_template(), {first["pid"]})
        os.kill(standby, signal.SIGKILL)  # ours: the test just saw the template fork it
        with pytest.raises(WorkerCrashedError):
            ex.submit(tasks.crash).result(timeout=60)
        info = ex.submit(tasks.whoami).result(timeout=60)
        assert info["pid"] != standby and info["pid"] == info["pgid"]
        assert [f.result(timeout=60) for f in [ex.submit(tasks.sleep_then, 0, i) for i in range(4)]] == [0, 1, 2, 3]


def test_a_removed_working_directory_does_not_stop_worker_starts(tmp_path, monkeypatch):
    """getcwd() fails once the parent's directory is removed: starts from the
    template (standby or not) go on, in the template's directory."""
    gone = tmp_path / "gone"
    gone.mkdir()
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        first = ex.submit(tasks.whoami).result()
        _wait_for_standby(the_template(), {first["pid"]})
        monkeypatch.chdir(gone)
        gone.rmdir()
        for _ in range(3):  # the standby, then forks from the template
            with pytest.raises(WorkerCrashedError):
                ex.submit(tasks.crash).result(timeout=60)
            assert ex.submit(tasks.sleep_then, 0, 5).result(timeout=60) == 5


def test_fresh_start_has_no_template():
    with ProcessGroupExecutor(1, mp_context="fresh") as ex:
        for _ in range(3):
            with pytest.raises(WorkerCrashedError):
                ex.submit(tasks.crash).result(timeout=60)
            info = ex.submit(tasks.whoami).result(timeout=60)
            assert info["ppid"] == os.getpid() and info["pid"] == info["pgid"]
        assert not templates_of(os.getpid())


def test_worker_sees_the_parents_cwd_and_environment_at_its_start(tmp_path, monkeypatch):
    """As a fresh interpreter would: the template started earlier, with older ones."""
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        assert ex.submit(tasks.cwd_and_env, "PGX_TEMPLATE_TEST").result()[1] is None
        monkeypatch.setenv("PGX_TEMPLATE_TEST", "now")
        monkeypatch.chdir(tmp_path)
        with pytest.raises(WorkerCrashedError):  # its replacement starts after the change
            ex.submit(tasks.crash).result(timeout=60)
        cwd, value = ex.submit(tasks.cwd_and_env, "PGX_TEMPLATE_TEST").result()
    assert value == "now"
    assert os.path.samefile(cwd, tmp_path)


def test_an_environment_larger_than_one_datagram_still_starts_forks(monkeypatch):
    """270 KB of environment (exec takes it) exceeds what one datagram of the
    template's socket may carry (EMSGSIZE, taken for the template's death: every
    start failed); it travels in a memfd instead, for forks and standbys alike."""
    for i in range(3):
        monkeypatch.setenv(f"PGX_BIG_{i}", str(i) * 90_000)
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        first = ex.submit(tasks.whoami).result(timeout=60)
        tpl = the_template()
        assert first["ppid"] == tpl.pid
        assert ex.submit(tasks.cwd_and_env, "PGX_BIG_2").result(timeout=60)[1] == "2" * 90_000
        _wait_for_standby(tpl, {first["pid"]})  # forked ahead with the large environment
        with pytest.raises(WorkerCrashedError):
            ex.submit(tasks.crash).result(timeout=60)
        second = ex.submit(tasks.whoami).result(timeout=60)
        assert second["ppid"] == tpl.pid and second["pid"] != first["pid"]
        assert ex.submit(tasks.cwd_and_env, "PGX_BIG_1").result(timeout=60)[1] == "1" * 90_000


def test_worker_writes_to_the_parents_stdout_as_it_is_at_its_start(tmp_path):
    out = tmp_path / "out"
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        ex.submit(tasks.whoami).result()  # the template runs, with our old stdout
        saved = os.dup(1)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT)
        try:
            os.dup2(fd, 1)
            with pytest.raises(WorkerCrashedError):  # its replacement starts now
                ex.submit(tasks.crash).result(timeout=60)
            ex.submit(tasks.write_stdout, "marker-for-template-test").result(timeout=60)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(fd)
    assert "marker-for-template-test" in out.read_text()


def test_worker_owns_exactly_its_fds_and_stdin_is_devnull():
    with ProcessGroupExecutor(2, mp_context="template") as ex:
        futs = [ex.submit(tasks.sleep_then, 0.3, i) for i in range(2)]
        [f.result() for f in futs]
        pids = list(ex._manager.pids)  # noqa: SLF001 (the test looks at the workers from outside)
        assert len(pids) == 2
        tpl = the_template()
        tpl_fds = fd_targets(tpl.pid)
        seen_pipes: dict[int, set[str]] = {}
        for pid in pids:
            fds = fd_targets(pid)
            # 0-2, the task pipe (3), result pipe (4), the pool's dump pipe (5), the
            # memfd socket (6), the permit pipe (7) and, where memfds exist, the
            # heartbeat page the worker took from its socket (see _heartbeat): nothing else.
            beat = [n for n, t in fds.items() if t.startswith("/memfd:pgexecutor-heartbeat")]
            assert len(beat) <= 1, fds
            assert sorted(set(fds) - set(beat)) == [0, 1, 2, 3, 4, 5, 6, 7], fds
            assert fds[0] == "/dev/null"
            for fd in (3, 4, 6, 7):
                seen_pipes.setdefault(fd, set()).add(fds[fd])
            # The template's own control socket never reaches a worker.
            tpl_socks = {t for n, t in tpl_fds.items() if n > 2 and t.startswith("socket:")}
            assert not tpl_socks & set(fds.values())
        # Shares no pipe with another worker (the dump pipe, 5, is the pool's by design).
        for fd, targets in seen_pipes.items():
            assert len(targets) == len(pids), f"fd {fd} shared between workers: {targets}"
        assert ex.submit(tasks.fds_of_self).result()["stdin"] == "/dev/null"


def test_signals_are_reset_and_random_reseeded_in_each_worker():
    # The preload module ignores SIGTERM/SIGUSR1, blocks SIGUSR2/SIGHUP and seeds random.
    with ProcessGroupExecutor(2, preload=("_template_preload",), max_tasks_per_child=1) as ex:
        state = ex.submit(tasks.signal_state).result()
        assert state["blocked"] == []
        assert state["term_default"] and state["usr1_default"] and state["int_python"]
        draws = {ex.submit(tasks.draw).result() for _ in range(4)}
        assert len(draws) == 4  # four workers, four different streams
        np_draws = {ex.submit(tasks.draw_numpy).result() for _ in range(4)}
        if np_draws != {None}:  # numpy's global generator too (reseeded by us)
            assert len(np_draws) == 4


def test_dead_worker_stays_a_zombie_until_the_parent_says_reap():
    """The handshake that keeps a dead worker's pgid reserved (DESIGN facts 2, 14)."""
    from pgexecutor._template import Template

    tpl = Template(sys.executable, ())
    tpl.start()
    pipes = [os.pipe() for _ in range(5)]
    try:
        # A worker whose task pipe is at EOF exits at once (code 0).
        pid = tpl.fork([pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][0], pipes[4][0]])
        for r, w in pipes:
            os.close(r)
            os.close(w)
        pipes = []
        pidfd = os.pidfd_open(pid)
        try:
            import select

            assert select.select([pidfd], [], [], 30)[0], "the worker never exited"
        finally:
            os.close(pidfd)
        time.sleep(0.2)  # the template had time to reap it, if it did so on its own
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert os.getpgid(pid) == pid  # the zombie keeps its group id reserved
        assert tpl.status(pid, reap=False) == (True, 0)
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # still there
        assert tpl.status(pid, reap=True) == (True, 0)
        assert wait_gone(pid, 5) and not psutil.pid_exists(pid) or psutil.Process(pid).ppid() != tpl.pid
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        tpl_pid = tpl.pid
        tpl.close()
    assert not psutil.pid_exists(tpl_pid) or psutil.Process(tpl_pid).ppid() != os.getpid()


def test_module_state_never_leaks_and_preload_runs_once_in_the_template():
    with ProcessGroupExecutor(1, preload=("_template_preload",), max_tasks_per_child=1) as ex:
        results = [ex.submit(tasks.preload_state).result() for _ in range(3)]
        tpl = the_template()
    assert len({r["pid"] for r in results}) == 3
    for r in results:
        assert r["seen"] == []  # the previous worker's append is not here
        assert r["imported_in"] == tpl.pid  # imported once, in the template


def test_initializer_runs_in_each_worker_not_in_the_template(tmp_path):
    with ProcessGroupExecutor(
        1, mp_context="template", initializer=tasks.record_init, initargs=(str(tmp_path),),
        max_tasks_per_child=1,
    ) as ex:
        pids = [ex.submit(tasks.whoami).result()["pid"] for _ in range(3)]
        tpl = the_template()
    ran_in = {int(n) for n in os.listdir(tmp_path)}
    assert set(pids) <= ran_in
    assert tpl.pid not in ran_in


def test_workers_are_not_daemonic():
    with ProcessGroupExecutor(1, mp_context="template") as ex:
        assert ex.submit(tasks.run_mp_child).result() == 0


def test_template_death_mid_run_starts_a_new_one(caplog):
    caplog.set_level(logging.WARNING, logger="pgexecutor")
    with ProcessGroupExecutor(2, mp_context="template") as ex:
        assert ex.submit(tasks.whoami).result()
        old = the_template()
        running = ex.submit(tasks.sleep_then, 1.0, 7)
        time.sleep(0.2)
        old.kill()  # SIGKILL: init reaps its zombies from now on
        old.wait(10)
        assert running.result(timeout=60) == 7  # a live worker is not disturbed
        with pytest.raises(WorkerCrashedError):
            ex.submit(tasks.crash).result(timeout=60)
        # Replacements come from a new template; the pool is not broken.
        infos = [ex.submit(tasks.whoami).result(timeout=60) for _ in range(4)]
        new = the_template()
        assert new.pid != old.pid
        assert any(i["ppid"] == new.pid for i in infos)
    assert "template" in caplog.text and "died" in caplog.text


def test_orphan_of_a_dead_template_is_not_taken_for_the_new_ones_child():
    """A worker outliving its template: once a new template runs, the orphan's death
    must not be read (or reaped, or its group signalled) through the new one."""
    with ProcessGroupExecutor(2, mp_context="template") as ex:
        running = [ex.submit(tasks.sleep_then, 0.5, i) for i in range(2)]
        assert [f.result() for f in running] == [0, 1]
        old = the_template()
        orphan = ex.submit(tasks.sleep_then, 3.0, 5)  # keeps one worker busy
        time.sleep(0.3)
        old.kill()
        old.wait(10)
        # The other worker crashes: its replacement comes from a new template.
        with pytest.raises(WorkerCrashedError):
            ex.submit(tasks.crash).result(timeout=60)
        assert ex.submit(tasks.whoami).result(timeout=60)["ppid"] == the_template().pid
        assert orphan.result(timeout=60) == 5
        # Now the orphan crashes: its exit status is lost with its parent (None),
        # never a made-up 0 from the new template.
        errors = []
        for _ in range(8):  # until the orphan is the one that ran a crash
            with pytest.raises(WorkerCrashedError) as info:
                ex.submit(tasks.crash).result(timeout=60)
            errors.append(info.value.exitcode)
            if info.value.exitcode != 3:
                break
        assert errors[-1] is None and set(errors[:-1]) <= {3}, errors


def test_preload_import_error_is_clear_at_the_first_submit():
    with ProcessGroupExecutor(1, preload=("_template_badpreload",)) as ex:
        fut = ex.submit(tasks.whoami)
        with pytest.raises(WorkerCrashedError) as info:
            fut.result(timeout=60)
        # Later submits fail the same way (no retry loop, no hang).
        with pytest.raises(WorkerCrashedError, match="_template_badpreload"):
            ex.submit(tasks.whoami).result(timeout=60)
    text = str(info.value)
    assert "_template_badpreload" in text
    assert "ZeroDivisionError" in text and "the preload module's own failure" in text
    assert "Traceback" in text


def test_missing_preload_module_names_it():
    with ProcessGroupExecutor(1, preload=("no_such_module_for_pgexecutor",)) as ex:
        with pytest.raises(WorkerCrashedError, match="no_such_module_for_pgexecutor"):
            ex.submit(tasks.whoami).result(timeout=60)


@pytest.mark.parametrize(
    "preload, mp_context, error",
    [
        ("torch", None, TypeError),
        (("os", 3), None, TypeError),
        (("a..b",), None, ValueError),
        (("",), None, ValueError),
        (("os",), "spawn", ValueError),
        (("os",), "fresh", ValueError),
    ],
)
def test_preload_is_validated(preload, mp_context, error):
    with pytest.raises(error):
        ProcessGroupExecutor(1, mp_context=mp_context, preload=preload)


def test_parent_sigkill_leaves_no_template_and_no_worker(tmp_path):
    report_dir = tmp_path / "reports"
    report_dir.mkdir()
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as o, open(err, "w") as e:
        drv = subprocess.Popen(
            [sys.executable, os.path.join(SCRIPTS, "template_parent_death_driver.py"), str(report_dir)],
            stdout=o, stderr=e, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    tracked: list[psutil.Process] = []
    pgids: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        line = None
        while time.monotonic() < deadline and line is None:
            for ln in out.read_text().splitlines():
                if ln.startswith("READY "):
                    line = ln[len("READY "):]
            if drv.poll() is not None:
                break
            time.sleep(0.05)
        assert line, out.read_text() + err.read_text()
        info = json.loads(line)
        (tpl_pid,) = info["template"]
        tracked.append(psutil.Process(tpl_pid))
        for r in info["reports"]:
            assert r["pid"] == r["pgid"]
            pgids.add(r["pgid"])
            tracked += [psutil.Process(r["pid"])] + [psutil.Process(m) for m in r["members"]]
        assert len(tracked) == 5
        # ... and the standby: no worker yet, not registered with the guardian; it
        # must end at EOF of its task pipe, whose only writer died with the driver.
        (standby,) = set(info["forked"]) - {r["pid"] for r in info["reports"]}
        tracked.append(psutil.Process(standby))
        os.kill(drv.pid, signal.SIGKILL)
        drv.wait(30)
        assert not still_running(tracked, 30)
    finally:
        kill_driver_and_tracked(drv, tracked)
