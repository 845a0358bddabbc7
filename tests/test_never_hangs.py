"""The pool never hangs and never turns broken, whatever an ordinary program does.

Each program runs as a script of its own under a hard time bound: a hang fails the
test (it does not stall the suite). Every script ends by printing the worker groups
it created (``pgexecutor.spawned_groups()``); the test then proves none survived.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, wait

import pytest
from conftest import alive, format_survivors, survivors_of

from pgexecutor import ProcessGroupExecutor, TaskTimeoutError, WorkerInitializerError

#: What every script starts with: the helpers it needs and a SIGINT handler (a
#: background job inherits SIGINT ignored; these programs must act as if run by hand).
PRELUDE = """
import json, os, signal, sys, threading, time
from concurrent.futures import wait, as_completed, CancelledError, FIRST_COMPLETED
import pgexecutor
from pgexecutor import ProcessGroupExecutor
signal.signal(signal.SIGINT, signal.default_int_handler)

def report(**data):
    data["groups"] = sorted(pgexecutor.spawned_groups())
    print("RESULT " + json.dumps(data), flush=True)
"""


def run_program(tmp_path, body: str, timeout: float = 60.0, expect_rc: int = 0) -> dict:
    """Run PRELUDE + ``body`` as ``__main__`` of a fresh interpreter; a hang past
    ``timeout`` fails the test. Returns the data of its last ``RESULT`` line, after
    checking that no process of any worker group it created survived it."""
    script = tmp_path / "program.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the program hung (still running after {timeout:g} s):\n{exc.stdout}\n{exc.stderr}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == expect_rc and lines, proc.stdout + proc.stderr
    data = json.loads(lines[-1][len("RESULT "):])
    data["stderr"] = proc.stderr
    left = survivors_of(data["groups"])
    assert not left, "worker processes survived the program:\n" + format_survivors(left)
    return data


# ------------------------------------------------------------------ cancellation


def test_cancelling_queued_futures_does_not_stall_the_pool(tmp_path):
    data = run_program(tmp_path, """
        ex = ProcessGroupExecutor(max_workers=2)
        fs = [ex.submit(time.sleep, 0.2) for _ in range(20)]
        cancelled = sum(f.cancel() for f in fs)
        value = ex.submit(pow, 2, 10).result()
        ex.shutdown(wait=True)
        report(cancelled=cancelled, value=value, stats=ex.stats())
    """)
    assert data["value"] == 1024
    assert data["cancelled"] >= 15  # the first one or two may have been handed over
    assert data["stats"]["cancelled"] == data["cancelled"]


def test_leaving_a_long_map_early_then_shutting_down_returns(tmp_path):
    data = run_program(tmp_path, """
        ex = ProcessGroupExecutor(max_workers=2)
        for i, r in enumerate(ex.map(abs, range(10_000))):
            if i == 10:
                break
        ex.shutdown()
        report(stats=ex.stats())
    """)
    s = data["stats"]
    assert s["cancelled"] > 0
    assert s["completed"] + s["cancelled"] == 10_000


def test_an_expired_map_timeout_then_shutdown_returns(tmp_path):
    data = run_program(tmp_path, """
        from concurrent.futures import TimeoutError
        ex = ProcessGroupExecutor(max_workers=2)
        try:
            for r in ex.map(time.sleep, [0.05] * 200, timeout=0.5):
                pass
            expired = False
        except TimeoutError:
            expired = True
        ex.shutdown()
        report(expired=expired)
    """)
    assert data["expired"]


def test_a_cancelled_future_reaches_wait_and_as_completed_at_once(tmp_path):
    """cancel() of a queued future while every worker is busy: the waiter must not
    wait for a worker to free up (the manager was asleep with no deadline)."""
    data = run_program(tmp_path, """
        ex = ProcessGroupExecutor(max_workers=1)
        busy = ex.submit(time.sleep, 30)
        queued = [ex.submit(pow, 2, i) for i in range(5)]
        time.sleep(0.5)
        assert all(f.cancel() for f in queued)
        done, not_done = wait(queued, timeout=10)
        order = [f in queued for f in as_completed(queued, timeout=10)]
        ex.kill_workers()
        report(done=len(done), not_done=len(not_done), seen=len(order))
    """)
    assert data["done"] == 5 and data["not_done"] == 0 and data["seen"] == 5


@pytest.mark.parametrize("how", ["shutdown-cancel-thread", "kill_workers", "terminate_workers"])
def test_every_cancel_path_wakes_waiters(tmp_path, how):
    """wait() and as_completed() without a timeout return for futures the pool
    cancels: shutdown(cancel_futures=True) from another thread, kill, terminate."""
    data = run_program(tmp_path, f"""
        how = {how!r}
        def started_then_sleep(path):
            open(path, "w").close()
            time.sleep(60)
        ex = ProcessGroupExecutor(max_workers=1)
        running = ex.submit(started_then_sleep, "started")
        while not os.path.exists("started"):
            time.sleep(0.01)
        queued = [ex.submit(time.sleep, 60) for _ in range(4)]
        if how == "shutdown-cancel-thread":
            t = threading.Thread(target=ex.shutdown, kwargs=dict(wait=False, cancel_futures=True))
            t.start(); t.join()
            done, _ = wait(queued)  # no timeout: the program's bound catches a hang
            list(as_completed(queued))
            ex.kill_workers()
        else:
            getattr(ex, how)()
            done, _ = wait(queued + [running])
            list(as_completed(queued + [running]))
        report(cancelled=[f.cancelled() for f in queued],
               running=repr(running.exception()) if not running.cancelled() else "cancelled")
    """)
    assert data["cancelled"] == [True] * 4
    assert "WorkerCrashedError" in data["running"]


def test_shutdown_cancel_futures_keeps_what_was_handed_to_a_starting_worker(tmp_path):
    """As with the standard library's call queue: a task handed to a worker (even
    one still starting) runs to completion; only the rest is cancelled."""
    data = run_program(tmp_path, """
        ex = ProcessGroupExecutor(max_workers=2)
        fs = [ex.submit(time.sleep, 0.1) for _ in range(50)]
        ex.shutdown(cancel_futures=True)
        cancelled = [f for f in fs if f.cancelled()]
        others = [f for f in fs if not f.cancelled()]
        report(cancelled=len(cancelled), others=len(others),
               others_ok=all(f.done() and f.exception() is None for f in others))
    """)
    assert data["cancelled"] > 20
    assert data["others"] > 0 and data["others_ok"]


def test_cancelling_at_random_moments_never_loses_a_future(tmp_path):
    """Futures cancelled from another thread while they are queued, being handed
    over, running or finished: every one ends (done), and shutdown returns."""
    data = run_program(tmp_path, """
        import random
        random.seed(7)
        ex = ProcessGroupExecutor(max_workers=2)
        fs = []
        def canceller():
            for _ in range(400):
                if fs:
                    random.choice(fs).cancel()
                time.sleep(0.0005)
        t = threading.Thread(target=canceller)
        t.start()
        for i in range(600):
            fs.append(ex.submit(time.sleep, random.choice([0, 0, 0.001, 0.01])))
        t.join()
        done, not_done = wait(fs, timeout=60)
        ex.shutdown()
        s = ex.stats()
        report(not_done=len(not_done), cancelled=sum(f.cancelled() for f in fs), stats=s)
    """, timeout=120)
    assert data["not_done"] == 0
    s = data["stats"]
    assert s["completed"] + s["cancelled"] + s["failed"] == 600
    assert s["cancelled"] == data["cancelled"]


# ------------------------------------------------------------------ limits


@pytest.mark.parametrize(
    "settings",
    [
        "task_timeout=float('inf')",
        "task_timeout=1e9",
        "task_timeout=86400 * 30",
        "kill_grace=1e9",
        "task_timeout=10, kill_grace=86400 * 30",
    ],
)
def test_huge_limits_keep_the_pool_working(tmp_path, settings):
    data = run_program(tmp_path, f"""
        ex = ProcessGroupExecutor(max_workers=1, {settings})
        a = ex.submit(pow, 2, 3).result(timeout=30)
        b = ex.options(task_timeout=float('inf')).submit(pow, 2, 4).result(timeout=30)
        c = ex.options(task_timeout=1e12).submit(pow, 2, 5).result(timeout=30)
        d = ex.submit(pow, 2, 6).result(timeout=30)
        ex.shutdown()
        report(values=[a, b, c, d])
    """)
    assert data["values"] == [8, 16, 32, 64]


def test_an_infinite_map_timeout_means_no_limit():
    with ProcessGroupExecutor(max_workers=1) as ex:
        assert list(ex.map(abs, [-1, -2], timeout=float("inf"))) == [1, 2]


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"kill_grace": float("nan")}, ValueError, "kill_grace"),
        ({"kill_grace": float("inf")}, ValueError, "kill_grace"),
        ({"kill_grace": -1}, ValueError, "kill_grace"),
        ({"kill_grace": None}, TypeError, "kill_grace"),
        ({"kill_grace": "1"}, TypeError, "kill_grace"),
        ({"task_timeout": float("nan")}, ValueError, "task_timeout"),
        ({"task_timeout": 0}, ValueError, "task_timeout"),
        ({"task_timeout": -5}, ValueError, "task_timeout"),
        ({"task_timeout": float("-inf")}, ValueError, "task_timeout"),
        ({"task_timeout": "10"}, ValueError, "task_timeout"),  # a string other than "auto"
        ({"task_timeout": True}, TypeError, "task_timeout"),
        ({"max_memory": 1.5}, ValueError, "max_memory"),
        ({"max_memory": float("inf")}, ValueError, "max_memory"),
        ({"max_memory": 0}, ValueError, "max_memory"),
        ({"max_memory": "1G"}, TypeError, "max_memory"),
        ({"max_memory": True}, TypeError, "max_memory"),
        ({"retries": 1.7}, ValueError, "retries"),
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": None}, TypeError, "retries"),
        ({"retries": float("nan")}, ValueError, "retries"),
        ({"max_workers": 1.5}, ValueError, "max_workers"),
        ({"max_workers": float("nan")}, ValueError, "max_workers"),
        ({"max_workers": "2"}, TypeError, "max_workers"),
        ({"max_workers": True}, TypeError, "max_workers"),
    ],
)
def test_every_number_is_validated_and_the_error_names_it(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ProcessGroupExecutor(**kwargs)
    with ProcessGroupExecutor(max_workers=1) as ex:
        per_task = {k: v for k, v in kwargs.items() if k in ("task_timeout", "max_memory", "retries")}
        if per_task:
            with pytest.raises(exc, match=name):
                ex.options(**per_task)


def test_reasonable_numbers_are_accepted_as_given():
    import fractions

    ex = ProcessGroupExecutor(
        max_workers=2, task_timeout=fractions.Fraction(3, 2), kill_grace=0, max_memory=2e9, retries=2
    )
    view = ex.options(task_timeout=float("inf"), max_memory=1 << 30, retries=0)
    assert (view.task_timeout, view.max_memory, view.retries) == (None, 1 << 30, 0)
    assert ex.options().task_timeout == 1.5 and ex.options().max_memory == 2_000_000_000
    ex.shutdown()


# ------------------------------------------------------------------ a hung task among tiny ones


@pytest.mark.parametrize("task_timeout", [None, 600])
def test_no_task_waits_behind_a_hung_one_while_a_worker_is_free(tmp_path, task_timeout):
    """Tiny tasks go deep into workers' pipes; one of them hangs. Those written
    behind it are taken back and run on the other worker."""
    data = run_program(tmp_path, f"""
        def job(i):
            if i == 500:
                time.sleep(3600)
            return i
        ex = ProcessGroupExecutor(max_workers=2, task_timeout={task_timeout})
        fs = [ex.submit(job, i) for i in range(2000)]
        done, not_done = wait(fs[:500] + fs[501:], timeout=60)
        hung_running = fs[500].running()
        ex.kill_workers()
        report(done=len(done), stuck=[fs.index(f) for f in not_done], hung_running=hung_running)
    """, timeout=120)
    assert data["stuck"] == [] and data["done"] == 1999
    assert data["hung_running"]


@pytest.mark.parametrize("hang", [0.5, 3600])
def test_tasks_taken_back_from_a_slow_worker_run_exactly_once(tmp_path, hang):
    """Whether the slow task ends (its worker then reads the tasks that were taken
    back from it) or is killed at its timeout, each task runs exactly once."""
    log = tmp_path / "ran.log"
    data = run_program(tmp_path, f"""
        LOG = {str(log)!r}
        def job(i):
            fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, b"%d\\n" % i)
            os.close(fd)
            if i in (300, 900):
                time.sleep({hang})
            return i
        ex = ProcessGroupExecutor(max_workers=2, task_timeout=3)
        fs = [ex.submit(job, i) for i in range(1500)]
        results = [f.exception() or f.result() for f in fs]
        ex.shutdown()
        report(ok=sum(1 for r in results if isinstance(r, int)),
               timeouts=[i for i, r in enumerate(results) if not isinstance(r, int)])
    """, timeout=120)
    ran = [int(x) for x in log.read_text().split()]
    assert sorted(ran) == list(range(1500)), "a task ran twice or never"
    if hang == 0.5:
        assert data["ok"] == 1500
    else:
        assert data["timeouts"] == [300, 900]


# ------------------------------------------------------------------ the manager thread


@pytest.mark.parametrize("call", ["shutdown()", "shutdown(wait=False)", "kill_workers()", "terminate_workers()"])
def test_stopping_the_pool_from_a_done_callback_finishes(tmp_path, call):
    data = run_program(tmp_path, f"""
        ex = ProcessGroupExecutor(max_workers=2)
        errors = []
        def stop(f):
            try:
                ex.{call}
            except RuntimeError as e:
                errors.append(str(e))
        def started_then_sleep(path):
            open(path, "w").close()
            time.sleep(60)
        other = ex.submit(started_then_sleep, "started")
        while not os.path.exists("started"):
            time.sleep(0.01)
        fut = ex.submit(pow, 2, 5)
        fut.add_done_callback(stop)
        value = fut.result()
        ex.shutdown(wait=False)
        if {call!r} != "shutdown()" and {call!r} != "shutdown(wait=False)":
            other_outcome = repr(other.exception())
        else:
            ex.kill_workers()
            other_outcome = None
        ex.shutdown(wait=True)  # returns: the manager is done
        try:
            ex.submit(pow, 1, 1)
            refused = False
        except RuntimeError:
            refused = True
        report(value=value, errors=errors, other=other_outcome, refused=refused)
    """)
    assert data["value"] == 32 and data["refused"]
    if call == "shutdown()":
        # As ProcessPoolExecutor: the wait cannot happen there and says so.
        assert len(data["errors"]) == 1 and "done-callback" in data["errors"][0]
    else:
        assert data["errors"] == []
    if call in ("kill_workers()", "terminate_workers()"):
        assert "WorkerCrashedError" in data["other"]


def test_waiting_for_another_future_in_a_done_callback_raises_instead_of_hanging(tmp_path):
    """Callbacks run in the manager's thread; result() there of a future that thread
    has yet to resolve would wait forever (as with ProcessPoolExecutor). It raises."""
    data = run_program(tmp_path, """
        ex = ProcessGroupExecutor(max_workers=2)
        slow = ex.submit(time.sleep, 5)
        seen = []
        def cb(f):
            try:
                seen.append(slow.result())
            except RuntimeError as e:
                seen.append("refused: " + str(e))
            seen.append(f.result())  # its own future is done: fine
        def gated(path):
            while not os.path.exists(path):
                time.sleep(0.01)
            return 8
        fast = ex.submit(gated, "go")
        fast.add_done_callback(cb)  # before it can finish: the callback runs in the manager
        open("go", "w").close()
        fast.result()
        slow.result()
        ex.shutdown()
        report(seen=seen)
    """)
    assert data["seen"][0].startswith("refused: result() of an unfinished future")
    assert data["seen"][1] == 8


def test_worker_pids_can_be_read_from_any_thread_while_workers_come_and_go():
    errors: list[BaseException] = []
    stop = threading.Event()
    with ProcessGroupExecutor(max_workers=2, max_tasks_per_child=1) as ex:

        def reader():
            while not stop.is_set():
                try:
                    ex.worker_pids()
                except BaseException as exc:  # noqa: BLE001 - any error is the failure
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            assert list(ex.map(abs, range(-40, 0))) == list(range(40, 0, -1))
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert errors == []


def test_a_worker_being_killed_is_no_longer_listed():
    """worker_pids() lists the workers serving the pool: one whose group was
    signalled is gone from it before its future fails, even while it lives on
    through its kill grace (here: it ignores SIGTERM)."""
    with ProcessGroupExecutor(max_workers=1, task_timeout=0.5, kill_grace=3) as ex:
        fut = ex.submit(_ignore_term_and_hang)
        while not fut.running():
            time.sleep(0.01)
        time.sleep(0.2)
        (pid,) = ex.worker_pids()
        with pytest.raises(TaskTimeoutError):
            fut.result(timeout=30)
        assert pid not in ex.worker_pids()
        assert alive(pid)  # still inside its kill grace: listed nowhere, not yet gone


def _ignore_term_and_hang():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)


# ------------------------------------------------------------------ fork


@pytest.mark.parametrize("task_timeout", [None, 5])
def test_a_forked_child_gets_a_clear_error_and_the_parent_is_untouched(tmp_path, task_timeout):
    data = run_program(tmp_path, f"""
        ex = ProcessGroupExecutor(max_workers=1, task_timeout={task_timeout})
        first = ex.submit(pow, 2, 2).result()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            out = {{}}
            try:
                ex.submit(pow, 2, 3)
                out["submit"] = "accepted"
            except RuntimeError as e:
                out["submit"] = str(e)
            try:
                list(ex.map(abs, [1]))
                out["map"] = "accepted"
            except RuntimeError as e:
                out["map"] = "refused"
            ex.shutdown(wait=True)  # the parent's: nothing to do here, returns
            with ProcessGroupExecutor(max_workers=1) as own:
                out["own"] = own.submit(pow, 3, 2).result(timeout=30)
            with ex:  # a with block spanning the fork ends quietly in the child
                pass
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        child = json.loads(os.read(r, 65536).decode())
        os.waitpid(pid, 0)
        after = [ex.submit(pow, 2, i).result(timeout=30) for i in range(5)]
        ex.shutdown()
        report(child=child, first=first, after=after)
    """)
    assert "forked child" in data["child"]["submit"]
    assert data["child"]["map"] == "refused"
    assert data["child"]["own"] == 9
    assert data["after"] == [1, 2, 4, 8, 16]


def test_a_forked_child_never_writes_into_the_parents_pipes(tmp_path):
    """The child's copies of an executor's wake-up pipe are closed at the fork; the
    numbers then belong to the child's own files. The executor's finalizer, run in the
    child when it drops the executor (or at its exit), must not write there."""
    data = run_program(tmp_path, """
        import gc
        def pipes():  # (fd, "pipe:[inode]"): listdir's own fd is no pipe
            out = set()
            for fd in os.listdir("/proc/self/fd"):
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("pipe:"):
                    out.add((int(fd), target))
            return out
        before = pipes()
        ex = ProcessGroupExecutor(max_workers=1)  # never used: no manager thread
        ours = {fd for fd, _ in pipes() - before}
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            files = []
            while not ours <= {f.fileno() for f in files} and len(files) < 100:
                files.append(open(f"f{len(files)}", "w+b"))
            del ex
            gc.collect()  # the finalizer posts a shutdown
            written = []
            for f in files:
                f.seek(0)
                written.append(len(f.read()))
            os.write(w, json.dumps({"reused": ours <= {f.fileno() for f in files},
                                    "written": sum(written)}).encode())
            os._exit(0)
        os.close(w)
        child = json.loads(os.read(r, 65536).decode())
        os.waitpid(pid, 0)
        ex.shutdown()
        report(child=child, ours=len(ours))
    """)
    assert data["ours"] >= 1 and data["child"]["reused"]
    assert data["child"]["written"] == 0


def test_futures_failed_together_get_exceptions_of_their_own():
    """An initializer that fails fails every queued task, each with its own error
    object (one shared instance would share, and grow, one traceback)."""
    with ProcessGroupExecutor(max_workers=1, initializer=_failing_initializer) as ex:
        futures = [ex.submit(abs, -i) for i in range(5)]
        errors = [f.exception(timeout=60) for f in futures]
    assert all(isinstance(e, WorkerInitializerError) for e in errors)
    assert len({id(e) for e in errors}) == 5


def _failing_initializer():
    raise ValueError("no")


# ------------------------------------------------------------------ interpreter exit


def test_unused_executors_do_not_spoil_interpreter_exit(tmp_path):
    """An executor never used, one shut down unused, and one whose task is still
    running at exit: exit prints no error and the running task finishes."""
    marker = tmp_path / "finished.txt"
    data = run_program(tmp_path, f"""
        def slow(path):
            time.sleep(1.0)
            with open(path, "w") as f:
                f.write("done")
        unused = ProcessGroupExecutor(max_workers=1)
        closed = ProcessGroupExecutor(max_workers=1)
        closed.shutdown()
        busy = ProcessGroupExecutor(max_workers=1)
        busy.submit(slow, {str(marker)!r})
        unused2 = ProcessGroupExecutor(max_workers=1)
        report()
    """)
    assert "Error" not in data["stderr"] and "Traceback" not in data["stderr"], data["stderr"]
    assert marker.read_text() == "done"


def test_ctrl_c_ends_an_exit_that_waits_for_a_hung_task(tmp_path):
    """Exit waits for submitted work, as ProcessPoolExecutor does; a task that never
    ends keeps it waiting (the README says so). Ctrl-C then kills every worker
    group and the program ends at once."""
    script = tmp_path / "exit_hang.py"
    script.write_text(PRELUDE + textwrap.dedent("""
        ex = ProcessGroupExecutor(max_workers=1)
        fut = ex.submit(time.sleep, 3600)
        while not fut.running():
            time.sleep(0.01)
        print("WORKER", ex.worker_pids()[0], flush=True)
        report()
    """))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True,
    )
    try:
        worker = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("WORKER "):
                worker = int(line.split()[1])
            if line.startswith("RESULT "):
                break
        assert worker is not None
        time.sleep(0.5)
        assert proc.poll() is None, "exit did not wait for the running task"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 15
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)


# ------------------------------------------------------------------ in-process sanity


def test_queued_cancel_reaches_wait_in_process():
    """The same as above, in this process, for the futures' own protocol."""
    with ProcessGroupExecutor(max_workers=1) as ex:
        busy = ex.submit(time.sleep, 1.0)
        queued = ex.submit(pow, 2, 2)
        assert queued.cancel()
        done, _ = wait([queued, busy], timeout=30, return_when=FIRST_COMPLETED)
        assert queued in done
        with pytest.raises(CancelledError):
            queued.result()
        assert busy.result(timeout=30) is None
