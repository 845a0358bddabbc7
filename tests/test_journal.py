"""Journals: ``map(..., journal=...)``, sweeps that survive a killed parent and reruns.

Tasks append their input to a side file (named by an environment variable the
workers inherit) as they start, so a test can prove which inputs ran, and how often.
Blocking tasks wait on files ("gates"), never on timing; the only timing bounds are
generous safety nets. conftest.py checks after each test that no worker group is left.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

# The task lives in a small module of its own: a fresh worker imports it in
# milliseconds (importing this test module would import pytest, which under load can
# take longer than a short task_timeout).
from _journal_tasks import SIDE_ENV, T, task
from conftest import ROOT, require_extra

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


def key_of(x) -> str:
    """The default key, computed here independently of pgexecutor.journal."""
    digest = hashlib.sha256(f"{task.__module__}.{task.__qualname__}".encode())
    digest.update(b"\0")
    digest.update(pickle.dumps((x,), protocol=4))
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


DRIVER = """
import json, os, sys, time
from pgexecutor import ProcessGroupExecutor

def work(x):
    with open(os.environ["SIDE"], "a") as f:
        f.write(f"{x}\\n")
    time.sleep(0.05)
    return x * 10

if __name__ == "__main__":
    with ProcessGroupExecutor(2) as ex:
        out = list(ex.map(work, range(int(sys.argv[2])), journal=sys.argv[1]))
    print("RESULT " + json.dumps(out), flush=True)
"""


def test_sigkill_of_the_parent_loses_nothing_that_finished(tmp_path):
    """A driver maps 40 inputs; SIGKILL it once some outcomes are in the journal;
    its rerun runs exactly the inputs the journal lacks (tasks log their starts)."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    path, side_file, n = str(tmp_path / "sweep.db"), str(tmp_path / "side.txt"), 40
    env = dict(os.environ, SIDE=side_file,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), path, str(n)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
        proc.communicate()
    done_before = set(rows(path))  # every committed row survived the SIGKILL
    assert len(done_before) >= 5
    assert len(done_before) < n, "the map finished before the kill: nothing to prove"
    assert owner(path)["pid"] == proc.pid  # the dead driver's lock is still there...
    first_run = ran(side_file)

    rerun = subprocess.run([sys.executable, str(script), path, str(n)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr  # ...and stale: the rerun took it over
    result = json.loads(rerun.stdout.split("RESULT ", 1)[1])
    assert result == [x * 10 for x in range(n)]
    script_key = {_driver_key(x): x for x in range(n)}
    finished = {script_key[k] for k in done_before}
    second_run = ran(side_file) - first_run
    assert not finished & set(second_run), "an input that had finished ran again"
    assert set(second_run) == set(range(n)) - finished
    assert owner(path) is None


def _driver_key(x) -> str:
    digest = hashlib.sha256(b"__main__.work")
    digest.update(b"\0")
    digest.update(pickle.dumps((x,), protocol=4))
    return digest.hexdigest()[:32]


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
        out = list(ex.map(task, [lock, 2], journal=journal, return_exceptions=True))
        assert isinstance(out[0], TypeError) and "pickle" in str(out[0]) and out[1] == 4
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


KEYBOARD_DRIVER = """
import json, os, signal, sys, threading, time
from pgexecutor import ProcessGroupExecutor

def work(x):
    if x == 1:
        time.sleep(60)  # still running when Ctrl-C comes
    return x

if __name__ == "__main__":
    path = sys.argv[1]
    got = []
    try:
        with ProcessGroupExecutor(2, kill_grace=0.2) as ex:
            for r in ex.map(work, [0, 1, 2], journal=path):
                got.append(r)
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    except KeyboardInterrupt:
        pass
    # The journal is unlocked: a new map on it works at once and replays input 0.
    with ProcessGroupExecutor(1) as ex:
        again = list(ex.map(work, [0], journal=path))
    print("RESULT " + json.dumps({"got": got, "again": again}), flush=True)
"""


def test_keyboard_interrupt_mid_map_records_and_unlocks(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(KEYBOARD_DRIVER))
    path = str(tmp_path / "sweep.db")
    proc = subprocess.run(
        [sys.executable, str(script), path], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
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


def test_a_failing_write_is_reported_by_the_iterator(ex, side, tmp_path, monkeypatch):
    """Disk full, I/O error...: simulated with a broken INSERT. The iterator raises
    JournalError (by the end of the map at the latest) and the journal is unlocked."""
    import pgexecutor.journal as journal_module

    monkeypatch.setattr(journal_module, "_INSERT", "INSERT INTO no_such_table VALUES (?)")
    path = str(tmp_path / "sweep.db")
    with pytest.raises(JournalError, match="writing to journal .* failed"):
        list(ex.map(task, [1, 2, 3], journal=path))
    assert rows(path) == {} and owner(path) is None


def test_package_exports():
    for name in ("Journal", "JournalError", "QuarantinedError"):
        assert name in pgexecutor.__all__ and getattr(pgexecutor, name)
    with pytest.raises(ValueError):
        Journal("x.db", quarantine_after=0)
    with pytest.raises(TypeError):
        Journal("x.db", key="id")


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
