"""Journals: ``map(..., journal=...)``, sweeps that survive a killed parent and reruns.

Tasks append their input to a side file (named by an environment variable the
workers inherit) as they start, so a test can prove which inputs ran, and how often.
Blocking tasks wait on files ("gates"), never on timing; the only timing bounds are
generous safety nets. conftest.py checks after each test that no worker group is left.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import types

# The tasks live in a small module of their own: a fresh worker imports it in
# milliseconds (importing this test module would import pytest, which under load can
# take longer than a short task_timeout).
import _journal_tasks as jt
import pytest
from _journal_tasks import SIDE_ENV, T, task
from conftest import ROOT, require_extra, survivors_of

import pgexecutor
from pgexecutor import (
    Journal,
    JournalError,
    ProcessGroupExecutor,
    QuarantinedError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from pgexecutor.journal import default_key

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- helpers


@pytest.fixture
def side(tmp_path, monkeypatch):
    path = str(tmp_path / "side.txt")
    monkeypatch.setenv(SIDE_ENV, path)  # workers start at the first submit: they inherit it
    return path


@pytest.fixture
def ex():
    executor = ProcessGroupExecutor(max_workers=2, kill_grace=0.2)
    yield executor
    executor.kill_workers()


def ran(side: str) -> collections.Counter:
    """How many times each input started (from the side file)."""
    try:
        with open(side) as f:
            return collections.Counter(eval(line) for line in f if line.strip())
    except FileNotFoundError:
        return collections.Counter()


def open_gate(side: str, name: str = "gate") -> None:
    with open(f"{side}.{name}", "w"):
        pass


def key_of(x, pair: bool = False) -> str:
    """The default key of ``task(x)`` (``task(*x)`` with ``pair``), computed here
    independently of pgexecutor.journal: a named function with nothing captured is
    keyed by its name alone."""
    digest = hashlib.sha256(f"{task.__module__}.{task.__qualname__}".encode())
    digest.update(b"\0")
    digest.update(pickle.dumps(x if pair else (x,), protocol=4))
    return digest.hexdigest()[:32]


def rows(path) -> dict:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return {r["key"]: dict(r) for r in conn.execute("SELECT * FROM inputs")}
    finally:
        conn.close()


def owner(path):
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE name = 'owner'").fetchone()
        return json.loads(row[0]) if row and row[0] else None
    finally:
        conn.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "pgexecutor", "journal", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


# ---------------------------------------------------------------- the file


def test_journal_is_wal_sqlite_with_each_outcome_and_default_key(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    out = list(ex.map(task, [3, "raise", "crash"], journal=path, return_exceptions=True))
    assert out[0] == 9
    assert isinstance(out[1], ValueError) and isinstance(out[2], WorkerCrashedError)

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    got = rows(path)
    # The default key: sha256 of "module.qualname" and the input pickled (protocol 4).
    assert set(got) == {key_of(3), key_of("raise"), key_of("crash")}
    assert default_key(task, (3,)) == key_of(3)
    ok, err, crash = got[key_of(3)], got[key_of("raise")], got[key_of("crash")]
    assert ok["outcome"] == "ok" and pickle.loads(ok["result"]) == 9 and ok["error"] is None
    assert err["outcome"] == "error" and err["error"] == "ValueError: bad input"
    assert crash["outcome"] == "crashed" and "exited with status 3" in crash["error"]
    for r in (ok, err, crash):
        assert r["attempts"] == 1 and r["runs"] == 1
        assert r["pid"] and r["pid"] != os.getpid()
        assert r["duration"] is not None and 0 <= r["duration"] < T
        assert r["fn"] == "_journal_tasks.task"
    assert ok["input"] == "3" and crash["input"] == "'crash'"
    assert crash["kills"] == 1 and json.loads(crash["failures"])[0]["outcome"] == "crashed"
    assert owner(path) is None  # unlocked once the iteration ended


def test_each_outcome_is_committed_while_the_map_still_runs(ex, side, tmp_path):
    """Rows reach the file as tasks finish (batched, a fraction of a second behind),
    not when the map ends: here the map waits on a gate that only the test opens."""
    path = str(tmp_path / "sweep.db")
    inputs = [5, 6, 7, 8, "gate"]  # the gate last: no task can be queued behind it
    it = ex.map(task, inputs, journal=path)
    deadline = time.monotonic() + 10  # generous: the writer commits every 0.05 s
    while not {key_of(x) for x in inputs[:-1]} <= set(rows(path)):
        assert time.monotonic() < deadline, "finished inputs were not committed"
        time.sleep(0.02)
    assert key_of("gate") not in rows(path)
    assert owner(path)["pid"] == os.getpid()  # locked while the map runs
    open_gate(side)
    assert list(it) == [25, 36, 49, 64, "gate"]
    assert owner(path) is None


# ---------------------------------------------------------------- resuming


def test_rerun_yields_stored_results_in_order_without_running_them(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    inputs = [1, 2, "raise", 3]
    first = list(ex.map(task, inputs, journal=path, return_exceptions=True))
    assert first[:2] == [1, 4] and first[3] == 9 and isinstance(first[2], ValueError)
    submitted = ex.stats()["submitted"]

    again = list(ex.map(task, inputs, journal=path, return_exceptions=True))
    assert again[:2] == [1, 4] and again[3] == 9
    # The stored exception is replayed: same type and message, never rerun.
    assert type(again[2]) is ValueError and str(again[2]) == "bad input"
    assert ex.stats()["submitted"] == submitted
    assert ran(side) == {1: 1, 2: 1, "raise": 1, 3: 1}

    # Without return_exceptions the replayed exception is raised at its position.
    it = ex.map(task, inputs, journal=path)
    assert [next(it), next(it)] == [1, 4]
    with pytest.raises(ValueError, match="bad input"):
        next(it)

    # New inputs run; the old ones are replayed.
    assert list(ex.map(task, [4, 1, 2], journal=path)) == [16, 1, 4]
    assert ran(side) == {1: 1, 2: 1, "raise": 1, 3: 1, 4: 1}
    assert rows(path)[key_of(1)]["runs"] == 1


def test_large_results_are_stored_and_replayed(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    inputs = [("big", 32 * 2**20), ("big", 256)]
    first = list(ex.map(task, inputs, journal=path))
    assert len(first[0]) == 32 * 2**20
    again = list(ex.map(task, inputs, journal=path))
    assert again == first and ran(side) == {("big", 32 * 2**20): 1, ("big", 256): 1}


def test_a_stored_result_that_no_longer_unpickles_fails_at_its_position(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    assert list(ex.map(task, [2, 3], journal=path)) == [4, 9]
    conn = sqlite3.connect(path)  # as if the result's class had since been removed
    conn.execute("UPDATE inputs SET result = ? WHERE key = ?",
                 (b"\x80\x05cno_such_module\nThing\n.", key_of(2)))
    conn.commit()
    conn.close()
    out = list(ex.map(task, [2, 3], journal=path, return_exceptions=True))
    assert isinstance(out[0], ModuleNotFoundError) and out[1] == 9
    assert out[0].pgexecutor_stage == "unpickle-result"
    assert ran(side) == {2: 1, 3: 1}


DRIVER = os.path.join(ROOT, "tests", "scripts", "journal_driver.py")


def driver_env(side_file: str) -> dict:
    return dict(os.environ, SIDE=side_file,
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def driver_inputs(path) -> set:
    """The inputs of the driver's rows (``work(x, pause)``: the input column shows
    the pair)."""
    return {eval(r["input"])[0] for r in rows(path).values()}


def test_sigkill_of_the_parent_loses_nothing_that_finished(tmp_path):
    """A driver maps 40 inputs; SIGKILL it once some outcomes are in the journal;
    its rerun runs exactly the inputs the journal lacks (tasks log their starts)."""
    path, side_file, n = str(tmp_path / "sweep.db"), str(tmp_path / "side.txt"), 40
    env = driver_env(side_file)
    proc = subprocess.Popen([sys.executable, DRIVER, "print", path, str(n), "0.05"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the driver never journaled 5 outcomes"
            try:
                if len(rows(path)) >= 5:
                    break
            except sqlite3.Error:
                pass  # not created yet
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        out, _ = proc.communicate()
    pgids = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("PGIDS ")]
    assert not survivors_of(pgids[0] if pgids else []), "the driver's workers outlived it"
    done_before = driver_inputs(path)  # every committed row survived the SIGKILL
    assert len(done_before) >= 5
    assert len(done_before) < n, "the map finished before the kill: nothing to prove"
    assert owner(path)["pid"] == proc.pid  # the dead driver's lock is still there...
    first_run = ran(side_file)

    rerun = subprocess.run([sys.executable, DRIVER, "print", path, str(n), "0.05"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr  # ...and stale: the rerun took it over
    result = [int(line[2:]) for line in rerun.stdout.splitlines() if line.startswith("R ")]
    assert result == list(range(n))
    second_run = ran(side_file) - first_run
    assert not done_before & set(second_run), "an input that had finished ran again"
    assert set(second_run) == set(range(n)) - done_before
    assert owner(path) is None


def test_a_parent_killed_right_after_printing_a_result_never_reruns_it(tmp_path):
    """Durable before visible: the driver prints each result as the iterator yields
    it; SIGKILL it right after it printed a few. Every input whose result it printed
    is in the journal, and the rerun does not run it again (the side file counts
    every run). Tiny tasks, so results come faster than any batching window."""
    path, side_file, n = str(tmp_path / "sweep.db"), str(tmp_path / "side.txt"), 400
    env = driver_env(side_file)
    for kill_after in (1, 5):
        if os.path.exists(path):
            os.unlink(path)
        open(side_file, "w").close()
        proc = subprocess.Popen([sys.executable, DRIVER, "print", path, str(n)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        printed, pgids = [], []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("PGIDS "):
                    pgids = json.loads(line[6:])
                elif line.startswith("R "):
                    printed.append(int(line[2:]))
                    if len(printed) >= kill_after:
                        proc.send_signal(signal.SIGKILL)
                        break
        finally:
            proc.kill()
            rest, _ = proc.communicate()
        printed += [int(line[2:]) for line in rest.splitlines() if line.startswith("R ")]
        assert not survivors_of(pgids), "the driver's workers outlived it"
        assert len(printed) >= kill_after and len(printed) < n, printed
        assert set(printed) <= driver_inputs(path), "a result was shown before it was durable"
        first_run = ran(side_file)

        rerun = subprocess.run([sys.executable, DRIVER, "print", path, str(n)], env=env,
                               capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        second_run = ran(side_file) - first_run
        assert not set(printed) & set(second_run), "an input whose result was seen ran again"
        assert [int(x[2:]) for x in rerun.stdout.splitlines() if x.startswith("R ")] == list(
            range(n)
        )


# ---------------------------------------------------------------- final vs rerun, quarantine


def test_errors_are_final_kills_rerun_until_quarantined(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    inputs = [2, "raise", "crash"]
    for run in (1, 2):
        out = list(ex.map(task, inputs, journal=path, return_exceptions=True))
        assert out[0] == 4 and isinstance(out[1], ValueError)
        assert isinstance(out[2], WorkerCrashedError), (run, out[2])
    assert ran(side) == {2: 1, "raise": 1, "crash": 2}  # the crash ran again, the rest not

    out = list(ex.map(task, inputs, journal=path, return_exceptions=True))
    assert ran(side) == {2: 1, "raise": 1, "crash": 2}  # quarantined: not run a third time
    err = out[2]
    assert isinstance(err, QuarantinedError)
    assert err.key == key_of("crash")
    assert [f["outcome"] for f in err.failures] == ["crashed", "crashed"]
    assert "quarantined" in str(err) and "2 times" in str(err) and "status 3" in str(err)
    assert pickle.loads(pickle.dumps(err)).key == err.key

    it = ex.map(task, inputs, journal=path)  # without return_exceptions: raised in place
    assert next(it) == 4
    with pytest.raises(ValueError):
        next(it)
    with pytest.raises(QuarantinedError):
        list(ex.map(task, ["crash"], journal=path))


def test_timeout_counts_as_a_kill_and_quarantine_after_is_configurable(side, tmp_path):
    path = str(tmp_path / "sweep.db")
    journal = Journal(path, quarantine_after=1)
    with ProcessGroupExecutor(max_workers=1, kill_grace=0.2) as ex:
        slow = ex.options(task_timeout=2.0)
        first = list(slow.map(task, ["hang", 3], journal=journal, return_exceptions=True))
        assert isinstance(first[0], TaskTimeoutError) and first[1] == 9
        assert rows(path)[key_of("hang")]["outcome"] == "timeout"
        second = list(slow.map(task, ["hang", 3], journal=journal, return_exceptions=True))
    assert isinstance(second[0], QuarantinedError) and second[0].failures[0]["outcome"] == "timeout"
    assert ran(side) == {"hang": 1, 3: 1}


def test_workers_stopped_by_the_user_are_not_blamed_on_the_input(side, tmp_path):
    """terminate_workers() (or Ctrl-C) fails running tasks with WorkerCrashedError; the
    journal does not record that, so those inputs run again next time."""
    path = str(tmp_path / "sweep.db")
    ex = ProcessGroupExecutor(max_workers=1, kill_grace=0.2)
    it = ex.map(task, ["gate"], journal=path, return_exceptions=True)
    deadline = time.monotonic() + T
    while "gate" not in ran(side):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ex.terminate_workers()
    assert isinstance(next(it), WorkerCrashedError)
    assert rows(path) == {}


# ---------------------------------------------------------------- the command line


def test_cli_summary_json_and_exit_codes(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    journal = Journal(path, quarantine_after=1)
    inputs = [1, 2, "raise", "crash"]
    list(ex.map(task, inputs, journal=journal, return_exceptions=True))
    list(ex.map(task, inputs, journal=journal, return_exceptions=True))  # crash: quarantined

    text = cli(path)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "4 inputs" in out and "_journal_tasks.task" in out
    assert "ok 2" in out and "error 1" in out and "quarantined 1" in out
    assert "slowest:" in out
    assert key_of("crash") in out and "'crash'" in out and "exited with status 3" in out
    assert key_of("raise") in out and "ValueError: bad input" in out

    js = cli(path, "--json")
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert data["inputs"] == 4 and data["owner"] is None
    assert data["counts"]["ok"] == 2 and data["counts"]["quarantined"] == 1
    assert data["counts"]["error"] == 1
    failed = {f["key"]: f for f in data["failed"]}
    assert failed[key_of("crash")]["status"] == "quarantined"
    assert failed[key_of("crash")]["input"] == "'crash'"
    assert failed[key_of("raise")]["error"] == "ValueError: bad input"
    durations = [s["duration"] for s in data["slowest"]]
    assert durations == sorted(durations, reverse=True) and len(durations) == 4

    missing = cli(str(tmp_path / "nope.db"))
    assert missing.returncode == 2 and "no such journal" in missing.stderr
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello\n")
    assert cli(str(text_file)).returncode == 2
    foreign = str(tmp_path / "other.sqlite")
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    bad = cli(foreign)
    assert bad.returncode == 2 and "not a pgexecutor journal" in bad.stderr


# ---------------------------------------------------------------- bad input


def test_bad_journal_paths_fail_at_the_map_call_before_any_task(ex, side, tmp_path):
    with pytest.raises(JournalError, match="does not exist"):
        ex.map(task, [1], journal=str(tmp_path / "no" / "such" / "dir.db"))
    with pytest.raises(JournalError, match="directory"):
        ex.map(task, [1], journal=str(tmp_path))

    text_file = tmp_path / "notes.txt"
    text_file.write_bytes(b"precious notes\n")
    with pytest.raises(JournalError, match="not a pgexecutor journal"):
        ex.map(task, [1], journal=str(text_file))
    assert text_file.read_bytes() == b"precious notes\n"

    foreign = tmp_path / "app.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('ada')")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    with pytest.raises(JournalError, match="not a pgexecutor journal"):
        ex.map(task, [1], journal=foreign)
    assert foreign.read_bytes() == before  # not even switched to WAL
    assert not os.path.exists(f"{foreign}-wal")

    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(JournalError):
                ex.map(task, [1], journal=str(ro / "sweep.db"))
        finally:
            ro.chmod(0o700)

    with pytest.raises(TypeError, match="journal must be"):
        ex.map(task, [1], journal=42)
    assert ex.stats()["submitted"] == 0 and not ran(side)


def test_a_journal_in_use_by_a_running_map_is_refused(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    it = ex.map(task, ["gate", 1], journal=path)
    submitted = ex.stats()["submitted"]
    with pytest.raises(JournalError, match="in use by another running map"):
        ex.map(task, [7], journal=path)  # this very process holds it
    code = (
        "import sys; from pgexecutor import ProcessGroupExecutor\n"
        "try:\n"
        "    ProcessGroupExecutor(1).map(abs, [1], journal=sys.argv[1])\n"
        "except Exception as e: print(type(e).__name__, e)\n"
    )
    other = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert "JournalError" in other.stdout and f"pid {os.getpid()}" in other.stdout, other
    assert ex.stats()["submitted"] == submitted
    open_gate(side)
    assert list(it) == ["gate", 1]
    assert list(ex.map(task, [7], journal=path)) == [49]  # free again
    assert 7 in ran(side)


def test_a_dead_owners_lock_is_taken_over_a_live_ones_is_not(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    assert list(ex.map(task, [1], journal=path)) == [1]

    def hold(pid, start, host=None):
        conn = sqlite3.connect(path)
        value = json.dumps({"pid": pid, "start": start, "host": host or os.uname().nodename,
                            "since": time.time(), "token": "x"})
        conn.execute("UPDATE meta SET value = ? WHERE name = 'owner'", (value,))
        if conn.total_changes == 0:
            conn.execute("INSERT INTO meta VALUES ('owner', ?)", (value,))
        conn.commit()
        conn.close()

    import psutil

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        hold(sleeper.pid, psutil.Process(sleeper.pid).create_time())
        with pytest.raises(JournalError, match=f"pid {sleeper.pid}"):
            ex.map(task, [1], journal=path)
        refused = cli(path, "--unlock")  # a live owner on this host: --unlock refuses
        assert refused.returncode == 1 and "in use" in refused.stderr
        # The same pid with another start time is another process: the owner is dead.
        hold(sleeper.pid, psutil.Process(sleeper.pid).create_time() - 100)
        assert list(ex.map(task, [1], journal=path)) == [1]
    finally:
        sleeper.kill()
        sleeper.wait()
    hold(sleeper.pid, 12345.0)  # reaped: gone
    assert list(ex.map(task, [1, 2], journal=path)) == [1, 4]
    assert owner(path) is None
    # Another host's owner cannot be checked: refused, until --unlock.
    hold(4242, 1.0, host="another-host.example")
    with pytest.raises(JournalError, match="another-host.example.*--unlock"):
        ex.map(task, [1], journal=path)
    assert "cannot tell" in cli(path).stdout
    assert cli(path, "--unlock").returncode == 0
    assert list(ex.map(task, [1], journal=path)) == [1]


# ---------------------------------------------------------------- hostile use


def test_journal_none_is_a_plain_map_and_an_empty_map_makes_an_empty_journal(
    ex, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert list(ex.map(task, [1, 2], journal=None)) == [1, 4]
    assert os.listdir(tmp_path) == []
    path = str(tmp_path / "empty.db")
    assert list(ex.map(task, [], journal=path)) == []
    assert rows(path) == {} and owner(path) is None
    assert ex.stats()["submitted"] == 2
    assert "0 inputs" in cli(path).stdout


def test_equal_keys_run_once_and_share_the_outcome(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    assert list(ex.map(task, [2, 3, 2], journal=path)) == [4, 9, 4]
    assert ran(side) == {2: 1, 3: 1}
    # key= that names two inputs alike: the first one runs, both get its outcome.
    journal = Journal(str(tmp_path / "parity.db"), key=lambda x: x % 2)
    assert list(ex.map(task, [5, 7, 6], journal=journal)) == [25, 25, 36]
    assert 7 not in ran(side)
    assert set(rows(journal.path)) == {"0", "1"}


def test_unpicklable_input_or_failing_key_fails_at_the_map_call(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    lock = threading.Lock()
    with pytest.raises(JournalError, match=r"input #1 .*key=") as info:
        ex.map(task, [1, lock], journal=path)
    assert isinstance(info.value.__cause__, TypeError)

    def bad_key(x):
        raise KeyError("no id")

    with pytest.raises(JournalError, match="key= function raised for input #0") as info:
        ex.map(task, [1], journal=Journal(path, key=bad_key))
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(JournalError, match="must return a str or an int"):
        ex.map(task, [1], journal=Journal(path, key=lambda x: [x]))
    assert not os.path.exists(path) and ex.stats()["submitted"] == 0

    # With key=, an input that cannot travel fails at its position (with pickle's own
    # exception, as in a plain map). No task ran, so nothing is recorded: it fails
    # the same way at the call on the rerun.
    journal = Journal(path, key=lambda x: "lock" if x is lock else str(x))
    for _ in range(2):
        out = list(ex.map(task, [lock, 2, lock], journal=journal, return_exceptions=True))
        assert isinstance(out[0], TypeError) and "pickle" in str(out[0]) and out[1] == 4
        assert isinstance(out[2], TypeError)  # an equal key: the same outcome
    assert "lock" not in rows(path)
    assert ran(side)[2] == 1


def test_breaking_out_early_records_what_finished_and_unlocks(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    for r in ex.map(task, [1, "gate", 3, 4, 5, 6], journal=path):
        assert r == 1
        break
    assert owner(path) is None  # closed at once: the for loop dropped the iterator
    open_gate(side)
    assert key_of(1) in rows(path)
    # The inputs the break cancelled, and the gate whose result came too late, run now.
    assert list(ex.map(task, [1, "gate", 3], journal=path)) == [1, "gate", 9]
    assert ran(side)[1] == 1

    # An iterator never started, then dropped, unlocks too.
    it = ex.map(task, [8], journal=path)
    assert owner(path) is not None
    del it
    assert owner(path) is None
    # ... and so does close().
    it = ex.map(task, [9], journal=path)
    it.close()
    assert owner(path) is None


def test_keyboard_interrupt_mid_map_records_and_unlocks(tmp_path):
    """Ctrl-C while a task runs. The driver starts with SIGINT ignored, as a job a
    shell starts in the background (or a CI runner) does: it must restore the
    default handler itself, as every driver does, for Ctrl-C to interrupt it."""
    path = str(tmp_path / "sweep.db")
    ignore_then_exec = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", ignore_then_exec, DRIVER, "interrupt", path],
        capture_output=True, text=True, timeout=60, env=driver_env(str(tmp_path / "side")),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result == {"got": [0], "again": [0]}
    outcomes = {r["input"]: r["outcome"] for r in rows(path).values()}
    assert outcomes["0"] == "ok" and "1" not in outcomes  # interrupted: runs next time
    assert owner(path) is None


def test_two_threads_map_on_two_journals(ex, side, tmp_path):
    results: dict[int, list] = {}

    def run(n):
        results[n] = list(ex.map(task, range(n * 100, n * 100 + 20),
                                 journal=str(tmp_path / f"j{n}.db")))

    threads = [threading.Thread(target=run, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    for n in (1, 2):
        assert results[n] == [x * x for x in range(n * 100, n * 100 + 20)]
        assert len(rows(str(tmp_path / f"j{n}.db"))) == 20


def test_chunks_journal_each_input_and_isolate_killed_chunks(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    inputs = [1, "raise", 3, 4, "crash", 6, 7]  # chunks: [1, raise, 3] [4, crash, 6] [7]
    out = list(ex.map(task, inputs, journal=path, chunksize=3, return_exceptions=True))
    assert out[0] == 1 and isinstance(out[1], ValueError) and out[2] == 9 and out[6] == 49
    assert all(isinstance(e, WorkerCrashedError) for e in out[3:6])
    got = rows(path)
    assert got[key_of(1)]["duration"] is not None and got[key_of(1)]["chunk"] == 3
    assert got[key_of("raise")]["outcome"] == "error"
    for x in (4, "crash", 6):  # the culprit is unknown: recorded, counted against none
        assert got[key_of(x)]["outcome"] == "crashed" and got[key_of(x)]["kills"] == 0

    # The rerun replays the finished inputs and runs each of the killed chunk alone.
    out = list(ex.map(task, inputs, journal=path, chunksize=3, return_exceptions=True))
    assert out[3] == 16 and out[5] == 36 and isinstance(out[4], WorkerCrashedError)
    # (6 never started in the first run: the crash killed its chunk's worker first.)
    assert ran(side) == {1: 1, "raise": 1, 3: 1, 4: 2, "crash": 2, 6: 1, 7: 1}
    assert rows(path)[key_of("crash")]["kills"] == 1
    list(ex.map(task, ["crash"], journal=path, chunksize=3, return_exceptions=True))
    out = list(ex.map(task, inputs, journal=path, chunksize=3, return_exceptions=True))
    assert isinstance(out[4], QuarantinedError) and ran(side)["crash"] == 3
    assert out[:4] == [1, out[1], 9, 16] and isinstance(out[1], ValueError)


def test_map_timeout_progress_and_options_with_a_journal(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    it = ex.map(task, ["gate", 2], journal=path, timeout=0.3)
    with pytest.raises(TimeoutError):
        next(it)
    assert owner(path) is None  # the iterator ended with the TimeoutError
    open_gate(side)

    class Bar:
        total = None
        n = 0

        def update(self, n):
            self.n += n

        def set_postfix(self, *args, **kwargs):
            pass

    bar = Bar()
    view = ex.options(retries=0)
    assert list(view.map(task, [3, 5, 6], journal=path, progress=bar)) == [9, 25, 36]
    assert bar.n == 3 and bar.total == 3
    bar = Bar()
    assert list(view.map(task, [3, 5, 6], journal=path, progress=bar)) == [9, 25, 36]
    assert bar.n == 0  # nothing ran: the bar counts the inputs that run


def test_buffersize_bounds_the_tasks_ahead_with_a_journal(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    list(ex.map(task, [2, 4], journal=path))  # recorded: replayed below, not submitted
    before = ex.stats()["submitted"]
    inputs = ["gate", 1, 2, 3, 4, 5, 6]
    it = ex.map(task, inputs, journal=path, buffersize=2)
    assert ex.stats()["submitted"] - before == 2  # the gate and 1; nothing more yet
    open_gate(side)
    assert list(it) == ["gate", 1, 4, 9, 16, 25, 36]
    assert ex.stats()["submitted"] - before == 5  # 2 and 4 were replayed
    out = list(ex.map(task, inputs + [7, 8], journal=path, buffersize=1, chunksize=2))
    assert out == ["gate", 1, 4, 9, 16, 25, 36, 49, 64]
    assert ran(side)[7] == 1 and ran(side)[1] == 1
    with pytest.raises(ValueError):
        ex.map(task, [1], journal=path, buffersize=0)


# ---------------------------------------------------------------- errors say the real cause


def expect(x):
    """task(x)'s result, without running it (it would log a run in the side file)."""
    if isinstance(x, tuple):
        return bytes(range(256)) * (x[1] // 256)
    return x * x


def big(i: int) -> tuple:
    return ("big", 8192 + 256 * i)  # task(("big", n)) returns n bytes


def _check_full_disk(path, error: str) -> None:
    """The error names the journal and the cause, and hides it behind nothing."""
    assert error.startswith(f"journal {path!r}") and "disk is full" in error, error
    assert "cannot rollback" not in error


def test_a_full_disk_is_named_and_keeps_what_was_committed(ex, side, tmp_path, monkeypatch):
    """SQLite's max_page_count stands in for a full disk (the same SQLITE_FULL)."""
    from pgexecutor.journal import _store

    real = _store.connect

    def small(*args, **kwargs):
        conn = real(*args, **kwargs)
        conn.execute("PRAGMA max_page_count = 40")  # 160 KiB
        return conn

    monkeypatch.setattr(_store, "connect", small)
    path = str(tmp_path / "sweep.db")
    inputs = [big(i) for i in range(60)]
    assert list(ex.map(task, inputs[:3], journal=path)) == [expect(x) for x in inputs[:3]]
    got = []
    with pytest.raises(JournalError) as info:
        for r in ex.map(task, inputs, journal=path):
            got.append(r)
    _check_full_disk(path, str(info.value))
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert 3 <= len(got) < len(inputs)
    assert {key_of(x) for x in inputs[: len(got)]} <= set(rows(path))
    assert owner(path) is None
    monkeypatch.undo()
    before = ran(side)
    assert list(ex.map(task, inputs, journal=path)) == [expect(x) for x in inputs]
    assert not set(ran(side) - before) & set(inputs[: len(got)]), "a seen result ran again"


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root only): a real full disk, a real read-only filesystem."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the max_page_count test covers the rest)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _remount(mnt, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


def test_a_really_full_disk_then_room_again_in_the_same_process(ex, side, tmpfs):
    """ENOSPC on a 256 KiB tmpfs. The lock cannot even be dropped then; once there
    is room, the next map of this very process takes its own lock over."""
    path = str(tmpfs / "sweep.db")
    inputs = [big(i) for i in range(60)]
    assert list(ex.map(task, inputs[:3], journal=path)) == [expect(x) for x in inputs[:3]]
    got = []
    with pytest.raises(JournalError) as info:
        for r in ex.map(task, inputs, journal=path):
            got.append(r)
    _check_full_disk(path, str(info.value))
    assert len(got) >= 3 and {key_of(x) for x in inputs[: len(got)]} <= set(rows(path))
    _remount(tmpfs, "size=8m")
    before = ran(side)
    assert list(ex.map(task, inputs, journal=path)) == [expect(x) for x in inputs]
    assert not set(ran(side) - before) & set(inputs[: len(got)])
    assert owner(path) is None


def test_a_read_only_journal_is_named(ex, side, tmpfs):
    path = str(tmpfs / "sweep.db")
    assert list(ex.map(task, [1, 2], journal=path)) == [1, 4]
    _remount(tmpfs, "ro")
    with pytest.raises(JournalError, match="read-only"):
        ex.map(task, [1, 2, 3], journal=path)
    text = cli(path)  # reading still works
    assert text.returncode == 0 and "2 inputs" in text.stdout, text.stderr
    assert ran(side) == {1: 1, 2: 1}


@pytest.mark.parametrize("where", ["header", "page 2", "last page"])
def test_a_damaged_journal_is_named_by_map_and_the_cli(ex, side, tmp_path, where):
    path = str(tmp_path / "sweep.db")
    list(ex.map(task, range(300), journal=path))
    size = os.path.getsize(path)
    offset, n = {"header": (16, 84), "page 2": (4096, 4096), "last page": (size - 4096, 4096)}[where]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(range(256)) * (n // 256) + bytes(n % 256))
    with pytest.raises(JournalError, match="damaged") as info:
        list(ex.map(task, range(300), journal=path))
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    out = cli(path)
    assert out.returncode == 2 and "damaged" in out.stderr, out
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "not a pgexecutor journal" not in out.stderr


def test_a_journal_locked_by_another_connection_is_said_so(ex, side, tmp_path, monkeypatch):
    from pgexecutor.journal import _store

    path = str(tmp_path / "sweep.db")
    list(ex.map(task, [1], journal=path))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE meta SET value = value WHERE name = 'fn'")
        out = cli(path)
        assert out.returncode == 2 and "locked by another connection" in out.stderr, out
        assert "not a pgexecutor journal" not in out.stderr and "Traceback" not in out.stderr
        monkeypatch.setattr(_store, "BUSY_TIMEOUT", 0.2)
        with pytest.raises(JournalError, match="locked by another connection"):
            ex.map(task, [1, 2], journal=path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert list(ex.map(task, [1, 2], journal=path)) == [1, 4]


def test_a_result_over_sqlites_limit_is_stored_in_parts(ex, side, tmp_path, monkeypatch):
    """SQLite refuses a value over SQLITE_LIMIT_LENGTH (1 GB by default): lowered to
    64 KiB here, a 1 MiB result is stored in pieces and replayed whole."""
    from pgexecutor.journal import _store

    monkeypatch.setattr(_store, "length_limit_for_tests", 64 * 1024)
    path = str(tmp_path / "sweep.db")
    inputs = [("big", 2**20), 3, ("big", 2**20 + 256)]
    first = list(ex.map(task, inputs, journal=path))
    assert first == [expect(x) for x in inputs]
    conn = sqlite3.connect(path)
    pieces = conn.execute("SELECT count(*) FROM parts").fetchone()[0]
    conn.close()
    assert pieces >= 2 * (2**20 // (16 * 1024))
    again = list(ex.map(task, inputs, journal=path))
    assert again == first and ran(side) == {x: 1 for x in inputs}


def test_an_outcome_that_cannot_be_stored_fails_its_own_position(ex, side, tmp_path, monkeypatch):
    """A chunk's items are pickled again in the parent (the worker pickled the chunk
    as a whole); one that refuses to is a JournalError at its position alone, not
    recorded, and runs again next time. The others are recorded."""
    monkeypatch.setattr(jt, "IN_PARENT", True)
    path = str(tmp_path / "sweep.db")
    out = list(ex.map(jt.worker_only, [1, "odd", 2, "odd"], journal=path, chunksize=3,
                      return_exceptions=True))
    assert out[0] == 1 and out[2] == 2
    assert isinstance(out[1], JournalError) and "could not be recorded" in str(out[1])
    assert isinstance(out[3], JournalError)  # an equal input: not shown either
    assert "runs again next time" in str(out[1])
    assert {r["input"] for r in rows(path).values()} == {"1", "2"}
    it = ex.map(jt.worker_only, [1, "odd"], journal=path, chunksize=3)
    assert next(it) == 1
    with pytest.raises(JournalError):
        next(it)


# ---------------------------------------------------------------- only what a task produced


def test_a_broken_manager_records_nothing(side, tmp_path, monkeypatch):
    """The manager fails before handing anything out: every future fails with
    BrokenProcessPool, which no task produced: nothing is recorded, all run later."""
    from concurrent.futures.process import BrokenProcessPool

    from pgexecutor import _manager

    def broken(self):
        if self.queue:
            raise RuntimeError("simulated manager bug")

    monkeypatch.setattr(_manager.Manager, "_dispatch", broken)
    path = str(tmp_path / "sweep.db")
    ex = ProcessGroupExecutor(max_workers=1, kill_grace=0.2)
    try:
        out = list(ex.map(task, [1, 2], journal=path, return_exceptions=True))
    finally:
        ex.shutdown(wait=False)
    assert all(isinstance(e, BrokenProcessPool) for e in out), out
    assert rows(path) == {}
    monkeypatch.undo()
    with ProcessGroupExecutor(max_workers=1) as ex2:
        assert list(ex2.map(task, [1, 2], journal=path)) == [1, 4]


def test_a_chunk_mates_base_exception_is_not_another_inputs_error(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    out = list(ex.map(jt.exit_task, [2, "exit", 3], journal=path, chunksize=3,
                      return_exceptions=True))
    assert isinstance(out[1], SystemExit)
    stored = {r["input"]: r["outcome"] for r in rows(path).values()}
    for x in ("2", "3"):
        assert stored.get(x) in (None, "ok"), stored  # never a final error of its own


# ---------------------------------------------------------------- the parent is left alone


PARENT_STATE_SCRIPT = """
import copyreg, json, logging, os, signal, sys
sys.path.insert(0, sys.argv[2])
import _journal_tasks as jt
from pgexecutor import Journal, ProcessGroupExecutor

def state():
    handlers = {}
    for s in signal.valid_signals():
        try:
            handlers[int(s)] = repr(signal.getsignal(s))
        except (OSError, ValueError):
            pass
    loggers = {name: (lg.level, lg.propagate, lg.disabled, [repr(h) for h in lg.handlers])
               for name, lg in [("", logging.getLogger()), ("pgexecutor", logging.getLogger("pgexecutor"))]}
    return {"copyreg": sorted(map(repr, copyreg.dispatch_table)),
            "extension": sorted(map(repr, copyreg._extension_registry)),
            "signals": handlers, "logging": repr(loggers),
            "loggers": sorted(logging.root.manager.loggerDict)}

import pgexecutor.journal  # noqa: imported: what it does on import is not a map's doing
before = state()
path = sys.argv[1]
with ProcessGroupExecutor(2, kill_grace=0.2) as ex:
    j = Journal(path, quarantine_after=1)
    list(ex.map(jt.task, [1, "raise", "crash"], journal=j, return_exceptions=True))
    list(ex.map(jt.task, [1, "raise", "crash", 2], journal=j, return_exceptions=True))
    list(ex.options(task_timeout=0.5).map(jt.task, ["hang"], journal=path, return_exceptions=True))
print(json.dumps({"before": before, "after": state()}))
"""


def test_journaling_leaves_the_parents_pickling_signals_and_logging_alone(tmp_path):
    """In a fresh interpreter: a journaled map that records errors, crashes and a
    timeout changes no copyreg entry, no signal handler and no logging setup."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", PARENT_STATE_SCRIPT, str(tmp_path / "j.db"), tests_dir],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for part in ("copyreg", "extension", "signals", "logging", "loggers"):
        assert got["before"][part] == got["after"][part], part


def test_package_exports():
    for name in ("Journal", "JournalError", "QuarantinedError"):
        assert name in pgexecutor.__all__ and getattr(pgexecutor, name)
    with pytest.raises(ValueError):
        Journal("x.db", quarantine_after=0)
    with pytest.raises(TypeError):
        Journal("x.db", key="id")


# ---------------------------------------------------------------- exactly what the task returned


def test_the_stored_result_is_the_workers_bytes_not_a_repickle(ex, tmp_path):
    """The result's class records which process pickled it: the replayed one was
    pickled by the worker, not again by the parent."""
    path = str(tmp_path / "sweep.db")
    first = list(ex.map(jt.stamp, [1, 2], journal=path))
    assert [r.value for r in first] == [1, 2]
    worker_pids = {r.pickled_by for r in first}
    assert os.getpid() not in worker_pids
    again = list(ex.map(jt.stamp, [1, 2], journal=path))
    assert [r.value for r in again] == [1, 2]
    assert {r.pickled_by for r in again} <= worker_pids, "the parent pickled the result again"


def test_only_journaled_tasks_keep_the_workers_bytes(ex, tmp_path):
    """TaskFuture.raw_outcome is opt-in (TaskSettings.keep_raw): a plain future does
    not hold its result twice."""
    fut = ex.submit(jt.pair, 1)
    assert fut.result(timeout=T) == [1, 1] and fut.raw_outcome is None
    assert ex.task_settings.keep_raw is False
    assert list(ex.map(jt.stamp, [5], journal=str(tmp_path / "j.db")))[0].value == 5


def test_the_callers_edits_never_reach_the_journal(ex, tmp_path):
    """The caller changes each result in place the moment it gets it; the rerun
    replays what the tasks returned."""
    path = str(tmp_path / "sweep.db")
    inputs = list(range(200))
    for r in ex.map(jt.pair, inputs, journal=path):
        r[0] = "edited"
        r.append("more")
    assert list(ex.map(jt.pair, inputs, journal=path)) == [[x, x] for x in inputs]


def test_large_array_results_edited_in_place_replay_as_returned(ex, tmp_path):
    """Arrays travel out of band (a pickle with its buffers apart) or through shared
    memory; the caller's ``a *= 10`` changes neither what is stored nor the other
    positions of an equal input."""
    pytest.importorskip("numpy")
    path = str(tmp_path / "sweep.db")
    sizes = [20_000, 300_000, 20_000]  # 160 KB: out of band; 2.4 MB: shared memory
    out = list(ex.map(jt.array, sizes, journal=path))
    assert out[0] is not out[2]
    for a in out:
        a *= 10
    assert out[2][1] == 10 and out[0][1] == 10
    again = list(ex.map(jt.array, sizes, journal=path))
    for a, n in zip(again, sizes, strict=True):
        assert a.shape == (n,) and a[1] == 1 and a[-1] == n - 1
        a *= 10  # writable, and its own
    assert again[0] is not again[2] and again[2][1] == 10


def test_equal_inputs_get_objects_of_their_own(ex, side, tmp_path):
    path = str(tmp_path / "sweep.db")
    out = list(ex.map(jt.pair, [1, 2, 1, 1], journal=path))
    assert out == [[1, 1], [2, 2], [1, 1], [1, 1]]
    assert out[0] is not out[2] and out[2] is not out[3]
    out[0].append("edited")
    assert out[2] == [1, 1] and out[3] == [1, 1]
    again = list(ex.map(jt.pair, [1, 1], journal=path))
    assert again == [[1, 1], [1, 1]] and again[0] is not again[1]
    # Chunks too, and errors: each position its own exception.
    chunked = list(ex.map(task, [3, 3, "raise", "raise"], journal=str(tmp_path / "c.db"),
                          chunksize=2, return_exceptions=True))
    assert chunked[:2] == [9, 9] and chunked[2] is not chunked[3]


# ---------------------------------------------------------------- keys


def _pairs():
    lam1, lam2 = (lambda x: x + 1), (lambda x: x + 2)  # noqa: E731
    a, b = jt.Scale(2), jt.Scale(10)
    d2 = types.FunctionType(jt.scaled.__code__, jt.scaled.__globals__, "scaled", (10,))
    d2.__kwdefaults__ = {"plus": 0}
    d2.__qualname__ = jt.scaled.__qualname__
    d3 = types.FunctionType(jt.scaled.__code__, jt.scaled.__globals__, "scaled", (2,))
    d3.__kwdefaults__ = {"plus": 5}
    d3.__qualname__ = jt.scaled.__qualname__
    return {
        "closures of one factory": (jt.make_scaler(2), jt.make_scaler(10)),
        "two lambdas": (lam1, lam2),
        "two instances of one callable class": (a, b),
        "bound methods of two instances": (a.apply, b.apply),
        "partial arguments": (functools.partial(jt.mul, 2), functools.partial(jt.mul, 10)),
        "defaults": (jt.scaled, d2),
        "keyword defaults": (jt.scaled, d3),
    }


@pytest.mark.parametrize("case", sorted(_pairs()))
def test_different_functions_never_share_rows(ex, tmp_path, case):
    f, g = _pairs()[case]
    assert f(3) != g(3)
    path = str(tmp_path / "sweep.db")
    assert list(ex.map(f, [1, 2, 3], journal=path)) == [f(1), f(2), f(3)]
    assert list(ex.map(g, [1, 2, 3], journal=path)) == [g(1), g(2), g(3)], case
    assert len(rows(path)) == 6
    assert list(ex.map(f, [1, 2, 3], journal=path)) == [f(1), f(2), f(3)]


KEYS_SCRIPT = """
import functools, json, sys
sys.path.insert(0, sys.argv[1])
import _journal_tasks as jt
from pgexecutor.journal import default_key

def factory(names):
    def check(x):
        return x in names
    return check

fns = [jt.task, jt.make_scaler(3), jt.Scale(4), jt.Scale(4).apply,
       functools.partial(jt.mul, 2), jt.scaled, factory({"alpha", "beta", "gamma", "delta"}),
       factory({"k": {"z", "y", "x"}})]
print(json.dumps([default_key(f, (5, "x")) for f in fns]))
"""


def test_keys_are_the_same_in_another_process(tmp_path):
    """Same function, same input, another process (another string hash seed): the
    same keys, captured sets of strings included."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    outs = []
    for seed in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-c", KEYS_SCRIPT, tests_dir], capture_output=True, text=True,
            timeout=60, env=dict(os.environ, PYTHONHASHSEED=seed,
                                 PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1]
    assert len(set(outs[0])) == len(outs[0])  # and all different
    assert outs[0][0] == key_of((5, "x"), pair=True)  # a named function: as before


def test_a_key_that_cannot_be_made_safely_is_refused_naming_key(ex, tmp_path):
    lock = threading.Lock()

    def locked(x):
        with lock:
            return x

    path = str(tmp_path / "sweep.db")
    with pytest.raises(JournalError, match=r"closure variable 'lock'.*key=") as info:
        ex.map(locked, [1], journal=path)
    assert "Journal(path, key=" in str(info.value)
    with pytest.raises(JournalError, match="key="):
        ex.map(functools.partial(jt.mul, threading.Lock()), [1], journal=path)
    with pytest.raises(JournalError, match="encodes differently each time.*key="):
        ex.map(jt.make_fickle(), [1], journal=path)
    assert not os.path.exists(path) and ex.stats()["submitted"] == 0
    # A module's own function travels by reference: a worker imports it, closure and
    # all, so its name is its key, whatever it captured (here a decorator's lock).
    assert list(ex.map(jt.guarded, [1], journal=path)) == [101]
    digest = hashlib.sha256(b"_journal_tasks.guarded\0" + pickle.dumps((1,), protocol=4))
    assert set(rows(path)) == {digest.hexdigest()[:32]}


# ---------------------------------------------------------------- Ray


def test_ray_executor_journals_where_the_driver_runs(side, tmp_path):
    ray = require_extra("ray", "ray")
    from pgexecutor.ray import RayExecutor

    side_file = side

    def ray_task(x):  # nested: travels by value to the Ray workers, with side_file
        with open(side_file, "a") as f:
            f.write(f"{x!r}\n")
        if x == "raise":
            raise ValueError("bad input")
        return x * 2

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        path = str(tmp_path / "sweep.db")
        with RayExecutor(max_workers=2, kill_grace=0.5) as ex:
            out = list(ex.map(ray_task, [1, "raise", 2], journal=path, return_exceptions=True))
            assert out[0] == 2 and isinstance(out[1], ValueError) and out[2] == 4
            again = list(ex.map(ray_task, [1, "raise", 2, 3], journal=path,
                                return_exceptions=True))
        assert again[0] == 2 and isinstance(again[1], ValueError) and again[2:] == [4, 6]
        assert {r["outcome"] for r in rows(path).values()} == {"ok", "error"}
        assert ran(side) == {1: 1, "raise": 1, 2: 1, 3: 1}
    finally:
        if started:
            ray.shutdown()  # forking beside Ray's threads hangs: later tests fork
