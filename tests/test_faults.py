"""Faults: timeouts, crashes, forks, exceptions, pickling faults,
return_exceptions, terminate/kill, and what shutdown leaves behind.

Every test here starts real processes; the autouse fixture in conftest.py proves after
each one that no process of any worker group it created survived.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from concurrent.futures import CancelledError, wait
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures.process import BrokenProcessPool

import _light_tasks as light
import psutil
import pytest
from conftest import alive, run_main_script, wait_gone

from pgexecutor import (
    ProcessGroupExecutor,
    RemoteTaskError,
    TaskPicklingError,
    TaskTimeoutError,
    WorkerCrashedError,
)

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------- task functions


def add(a, b):
    return a + b


def getpid():
    return os.getpid()


def sleep_forever():
    time.sleep(1000)


def ignore_term_and_sleep():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(1000)


def spin_in_c_blocking_term():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    re.match(r"(a+)+$", "a" * 64 + "b")  # exponential backtracking inside C


def exit_with(code):
    os._exit(code)


def kill_self(sig):
    os.kill(os.getpid(), sig)
    time.sleep(10)


def segfault():
    ctypes.string_at(0)


def abort():
    ctypes.CDLL(None).abort()


def spawn_child_and_report(path):
    """Start a child in our group that outlives the task, and report its pid."""
    p = subprocess.Popen(["sleep", "1000"])
    with open(path, "w") as f:
        f.write(str(p.pid))
    return p.pid


def fork_then(action):
    """Fork a child that keeps the worker's pipes open, then misbehave."""
    pid = os.fork()
    if pid == 0:
        time.sleep(1000)
        os._exit(0)
    if action == "crash":
        os._exit(7)
    if action == "hang":
        time.sleep(1000)
    return pid


def pool_then_crash():
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(2)
    assert pool.map(abs, [-1, -2]) == [1, 2]
    os._exit(5)  # the pool's workers still hold copies of our pipes


def raise_value_error(x):
    raise ValueError(f"bad input {x}")


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(a)  # args == (a,): unpickling calls NeedsTwoArgs(a) -> TypeError
        self.b = b


def raise_unpicklable_exception():
    raise NeedsTwoArgs("first", "second")


class HoldsLock(Exception):
    def __init__(self):
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_exception_holding_lock():
    raise HoldsLock()


def return_lock():
    return threading.Lock()


class Unpicklable:
    def __reduce__(self):
        raise TypeError("I refuse to be pickled")


class _Killer:
    """Unpickling this kills the process doing it (the worker)."""

    def __reduce__(self):
        return (os._exit, (9,))


class _BadReducer:
    def __reduce__(self):
        return (int, ("not a number",))  # fails to unpickle in the worker


class ReturnsBadUnpickle:
    """Pickles fine in the worker, fails to unpickle in the parent."""

    def __reduce__(self):
        return (_fail_on_load, ())


def _fail_on_load():
    raise RuntimeError("cannot rebuild me here")


def return_bad_unpickle():
    return ReturnsBadUnpickle()


def leave_background_child(path):
    p = subprocess.Popen(["bash", "-c", "sleep 1000 & wait"])
    with open(path, "w") as f:
        f.write(str(p.pid))
    return os.getpgid(0)


def check_pgid():
    return os.getpid(), os.getpgid(0)



# ----------------------------------------------------------------- timeouts


@pytest.mark.parametrize(
    "fn", [sleep_forever, ignore_term_and_sleep, spin_in_c_blocking_term], ids=["sleep", "ignores-term", "c-spin"]
)
def test_timeout_kills_group_and_fails_at_once(fn):
    with ProcessGroupExecutor(1, task_timeout=0.5, kill_grace=0.5) as ex:
        fut = ex.submit(fn)
        behind = ex.options(task_timeout=None).submit(add, 1, 2)  # queued behind: must not fail
        t0 = time.monotonic()
        with pytest.raises(TaskTimeoutError) as ei:
            fut.result(timeout=30)
        waited = time.monotonic() - t0
        err = ei.value
        assert isinstance(err, FuturesTimeoutError)
        assert err.timeout == 0.5 and isinstance(err.pid, int)
        # It fails at expiry, not after the grace period: generous bound on a noisy box.
        assert waited < 0.5 + 5.0
        assert behind.result(timeout=30) == 3
        assert wait_gone(err.pid)
        assert err.pid not in ex.worker_pids()


def _module_in(tmp_path, name: str, source: str):
    """Write and import a module of tasks from ``tmp_path`` (also on the workers' path)."""
    import importlib

    (tmp_path / f"{name}.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    return importlib.import_module(name)


@pytest.fixture
def forget_modules():
    names: list[str] = []
    path = list(sys.path)
    yield names
    sys.path[:] = path
    for name in names:
        sys.modules.pop(name, None)


def test_a_slow_import_of_the_task_module_is_not_the_tasks_time(tmp_path, forget_modules):
    """A fresh worker imports the task's module first (torch, gmsh: seconds). The
    task's clock starts again once that is done: 1.5 s of import + 1.5 s of run fit
    in a 2.5 s task_timeout."""
    forget_modules.append("slow_to_import")
    mod = _module_in(tmp_path, "slow_to_import", textwrap.dedent("""
        import time
        time.sleep(1.5)

        def job():
            time.sleep(1.5)
            return "done"
    """))
    with ProcessGroupExecutor(1, task_timeout=2.5) as ex:
        assert ex.submit(mod.job).result(timeout=60) == "done"


def test_a_hung_import_of_the_task_module_still_times_out(tmp_path, forget_modules):
    forget_modules.append("hangs_on_import_in_workers")
    mod = _module_in(tmp_path, "hangs_on_import_in_workers", textwrap.dedent(f"""
        import os, time
        if os.getpid() != {os.getpid()}:  # only in a worker
            time.sleep(1000)

        def job():
            return "never"
    """))
    with ProcessGroupExecutor(1, task_timeout=1.0, kill_grace=0.2) as ex:
        with pytest.raises(TaskTimeoutError) as ei:
            ex.submit(mod.job).result(timeout=60)
    assert "hangs_on_import_in_workers" in (ei.value.stack or "")


def test_timeout_per_task_via_options_and_clock_starts_at_start():
    with ProcessGroupExecutor(1, kill_grace=0.2) as ex:
        quick = ex.options(task_timeout=3.0)
        # Each of these sleeps 1s with a 3s timeout; if the clock started at submit,
        # the third one (queued behind two) would time out.
        futs = [quick.submit(time.sleep, 1.0) for _ in range(3)]
        assert [f.result(timeout=60) for f in futs] == [None, None, None]
        hung = ex.options(task_timeout=0.3).submit(sleep_forever)
        with pytest.raises(TaskTimeoutError):
            hung.result(timeout=30)
        assert ex.task_settings.timeout is None  # the executor's own default is untouched
        assert ex.submit(add, 2, 2).result(timeout=30) == 4


def test_timeout_replaces_worker_and_pool_keeps_working():
    # The good tasks get no timeout: unpickling a task's function counts as its run
    # time, and a fresh worker's first import of this test module can take longer
    # than 0.3 s on a loaded machine.
    with ProcessGroupExecutor(2, kill_grace=0.2) as ex:
        bad = [ex.options(task_timeout=0.3).submit(sleep_forever) for _ in range(3)]
        good = [ex.submit(add, i, i) for i in range(20)]
        for f in bad:
            with pytest.raises(TaskTimeoutError):
                f.result(timeout=60)
        assert [f.result(timeout=60) for f in good] == [2 * i for i in range(20)]
        assert ex.stats()["timed_out"] == 3


def test_timeout_kills_children_in_group(tmp_path):
    def spawn_and_hang(path):
        spawn_child_and_report(path)
        time.sleep(1000)

    path = str(tmp_path / "child")
    with ProcessGroupExecutor(1, task_timeout=1.0, kill_grace=0.3) as ex:
        with pytest.raises(TaskTimeoutError):
            ex.submit(spawn_and_hang, path).result(timeout=30)
        child = int(open(path).read())
        assert wait_gone(child)


# ----------------------------------------------------------------- crashes


@pytest.mark.parametrize(
    "fn,args,expected",
    [
        (exit_with, (0,), 0),
        (exit_with, (3,), 3),
        (kill_self, (signal.SIGKILL,), -signal.SIGKILL),
        (segfault, (), -signal.SIGSEGV),
        (abort, (), -signal.SIGABRT),
    ],
    ids=["exit0", "exit3", "sigkill", "segfault", "abort"],
)
def test_crash_fails_only_its_future(fn, args, expected):
    with ProcessGroupExecutor(2) as ex:
        before = [ex.submit(add, 1, 1) for _ in range(4)]
        bad = ex.submit(fn, *args)
        after = [ex.submit(add, 2, 2) for _ in range(4)]
        with pytest.raises(WorkerCrashedError) as ei:
            bad.result(timeout=30)
        err = ei.value
        assert isinstance(err, BrokenProcessPool)  # old except clauses still fire
        assert err.exitcode == expected
        assert isinstance(err.pid, int)
        assert [f.result(timeout=30) for f in before + after] == [2] * 4 + [4] * 4
        # The pool is not broken.
        assert ex.submit(add, 3, 3).result(timeout=30) == 6


def test_crash_kills_children_left_in_group(tmp_path):
    def child_then_crash(path):
        spawn_child_and_report(path)
        os._exit(1)

    path = str(tmp_path / "child")
    with ProcessGroupExecutor(1, kill_grace=0.3) as ex:
        with pytest.raises(WorkerCrashedError):
            ex.submit(child_then_crash, path).result(timeout=30)
        assert wait_gone(int(open(path).read()))
        assert ex.submit(add, 1, 2).result(timeout=30) == 3


def test_idle_worker_killed_from_outside_is_replaced():
    with ProcessGroupExecutor(2) as ex:
        pids = {f.result(timeout=30) for f in [ex.submit(getpid) for _ in range(20)]}
        deadline = time.monotonic() + 30
        while len(ex.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = ex.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            current = ex.worker_pids()
            if victim not in current and len(current) == 2:
                break
            time.sleep(0.05)
        assert victim not in ex.worker_pids()
        assert len(ex.worker_pids()) == 2  # replaced without waiting for new work
        results = {f.result(timeout=30) for f in [ex.submit(getpid) for _ in range(20)]}
        assert victim not in results
        assert pids  # sanity


# ----------------------------------------------------------------- forks


@pytest.mark.parametrize("action", ["crash", "hang"])
def test_death_noticed_when_task_forked(action):
    with ProcessGroupExecutor(1, task_timeout=2.0, kill_grace=0.3) as ex:
        fut = ex.submit(fork_then, action)
        expected = WorkerCrashedError if action == "crash" else TaskTimeoutError
        with pytest.raises(expected):
            fut.result(timeout=30)
        assert ex.submit(add, 1, 1).result(timeout=30) == 2


def test_death_noticed_with_fork_pool_alive():
    with ProcessGroupExecutor(1, kill_grace=0.3) as ex:
        with pytest.raises(WorkerCrashedError) as ei:
            ex.submit(pool_then_crash).result(timeout=60)
        assert ei.value.exitcode == 5


# ----------------------------------------------------------------- exceptions


def test_exception_type_args_and_traceback_through_worker_frames():
    with ProcessGroupExecutor(1) as ex:
        fut = ex.submit(raise_value_error, 42)
        exc = fut.exception(timeout=30)
        assert type(exc) is ValueError
        assert exc.args == ("bad input 42",)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        assert "raise_value_error" in text
        assert __file__.rstrip("c") in text or "test_faults.py" in text
        assert 'raise ValueError(f"bad input {x}")' in text or "line" in text


def test_exception_with_custom_init_round_trips():
    # Plain pickle cannot rebuild it (args == ("first",) but __init__ needs two);
    # tblib's reducer restores args and __dict__ without calling __init__.
    with ProcessGroupExecutor(1) as ex:
        exc = ex.submit(raise_unpicklable_exception).exception(timeout=30)
        assert type(exc) is NeedsTwoArgs
        assert exc.args == ("first",) and exc.b == "second"


def raise_exception_from_worker_only_module():
    """Raise an exception whose class lives in a module only the worker has."""
    import types

    mod = types.ModuleType("pgx_worker_only_errors")
    exec("class WorkerOnlyError(Exception):\n    pass\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    raise mod.WorkerOnlyError("only the worker can import me")


def test_exception_that_fails_to_unpickle_arrives_as_remote_error():
    with ProcessGroupExecutor(1) as ex:
        exc = ex.submit(raise_exception_from_worker_only_module).exception(timeout=30)
        assert isinstance(exc, RemoteTaskError)
        assert exc.type_name == "pgx_worker_only_errors.WorkerOnlyError"
        assert "raise_exception_from_worker_only_module" in exc.remote_traceback
        assert "only the worker can import me" in str(exc)
        assert "WorkerOnlyError" in str(exc)
        assert ex.submit(add, 1, 1).result(timeout=30) == 2


def test_exception_that_fails_to_pickle_arrives_as_remote_error():
    with ProcessGroupExecutor(1) as ex:
        exc = ex.submit(raise_exception_holding_lock).exception(timeout=30)
        assert isinstance(exc, RemoteTaskError)
        assert "HoldsLock" in exc.type_name
        assert "holds a lock" in str(exc)
        assert "raise_exception_holding_lock" in exc.remote_traceback


_MAIN_TASKS = """
import threading, traceback
from pgexecutor import ProcessGroupExecutor

def fail_here(x):
    raise ValueError(f"bad {x}")  # MARK-RAISE

class Boom:
    def explode(self):
        raise KeyError("boom")  # MARK-METHOD

class HoldsLockHere(Exception):
    def __init__(self):
        super().__init__("cannot travel")
        self.lock = threading.Lock()

def raise_unpicklable():
    raise HoldsLockHere()  # MARK-UNPICKLABLE

def hang_here():
    threading.Event().wait()  # MARK-HANG

def text(exc):
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

if __name__ == "__main__":
    with ProcessGroupExecutor(1, task_timeout=3, kill_grace=0.2) as ex:
        out = {
            "function": text(ex.submit(fail_here, 3).exception()),
            "method": text(ex.submit(Boom().explode).exception()),
            # formatted in the worker: RemoteTaskError's text
            "remote": ex.submit(raise_unpicklable).exception().remote_traceback,
        }
        hung = ex.submit(hang_here).exception()
        out["stack"], out["where"] = hung.stack, str(hung)
    print("RESULT " + json.dumps(out), flush=True)
"""


def _line_with(script_text, marker):
    lines = script_text.splitlines()
    number = next(i for i, ln in enumerate(lines, 1) if marker in ln)
    return number, lines[number - 1].strip()


def test_tasks_defined_in_a_script_show_its_file_line_and_source(tmp_path):
    # Functions and classes of __main__ travel by value; their frames must still name
    # the script, as ProcessPoolExecutor's do (cloudpickle writes "<dynamic-code>").
    out = run_main_script(tmp_path, "", _MAIN_TASKS, [], timeout=90)
    script = str(tmp_path / "driver_script.py")
    source = (tmp_path / "driver_script.py").read_text()
    for key, fn, marker in [
        ("function", "fail_here", "MARK-RAISE"),
        ("method", "explode", "MARK-METHOD"),
        ("remote", "raise_unpicklable", "MARK-UNPICKLABLE"),
    ]:
        line, code = _line_with(source, marker)
        assert f'File "{script}", line {line}, in {fn}\n    {code}\n' in out[key], out[key]
        assert "<dynamic-code>" not in out[key]
    line, code = _line_with(source, "MARK-HANG")
    frame = f'File "{script}", line {line} in hang_here'
    assert frame in out["stack"], out["stack"]
    assert f"{frame}: {code}" in out["where"], out["where"]


def test_tasks_defined_with_python_c_show_their_line(tmp_path):
    code = (
        "from pgexecutor import ProcessGroupExecutor\n"
        "import traceback\n"
        "def fail_here():\n"
        "    raise ValueError('from -c')\n"
        "with ProcessGroupExecutor(1) as ex:\n"
        "    e = ex.submit(fail_here).exception()\n"
        "print(''.join(traceback.format_exception(type(e), e, e.__traceback__)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert 'File "<string>", line 4, in fail_here' in proc.stdout, proc.stdout


# ----------------------------------------------------------------- pickling faults
#
# An argument or a result that fails to cross gives the exception pickle raised, of
# the type ProcessPoolExecutor gives in the same case; ``pgexecutor_stage`` and a note
# say which crossing failed; worker-side failures chain the worker's traceback as
# ``__cause__``, as ProcessPoolExecutor does. Only that future fails.


class ErrorAtPickle:
    """As in CPython's test_concurrent_futures/test_deadlock.py."""

    def __reduce__(self):
        raise pickle.PicklingError("Error in pickle")


class CustomPickleError(Exception):
    pass


class CustomErrorAtPickle:
    def __reduce__(self):
        raise CustomPickleError("my reducer says no")


class ExitAtPickle:
    def __reduce__(self):
        sys.exit(7)


class InterruptAtPickle:
    def __reduce__(self):
        raise KeyboardInterrupt


class RaisesAtPickle:
    """Pickling raises ``exc`` (built in the process that pickles)."""

    def __init__(self, make_exc):
        self.make_exc = make_exc

    def __reduce__(self):
        raise self.make_exc()


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


class SubclassOfBase(BaseException):
    pass


def needs_two_args():
    return NeedsTwoArgs("first", "second")


def bad_str():
    return BadStr("ignored")


def subclass_of_base():
    return SubclassOfBase("not an Exception")


def huge_message():
    return ValueError("x" * (8 << 20))


def make(factory, *args):
    return factory(*args)


def lock_at(i, bad):
    return threading.Lock() if i == bad else i


def assert_marked(exc, stage, worker_side):
    """``exc`` says which crossing failed and, from a worker, carries its traceback."""
    assert exc.pgexecutor_stage == stage
    note = {
        "pickle-arguments": "pgexecutor: pickling the task's arguments in the caller failed",
        "unpickle-arguments": "pgexecutor: unpickling the task's arguments in the worker failed",
        "pickle-result": "pgexecutor: pickling the task's result in the worker failed",
        "unpickle-result": "pgexecutor: unpickling the task's result in the parent failed",
    }[stage]
    assert len([n for n in exc.__notes__ if n.startswith(note)]) == 1, exc.__notes__
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if sys.version_info >= (3, 11):
        assert note in text  # tracebacks print notes from 3.11 on
    if worker_side:
        # ProcessPoolExecutor's _RemoteTraceback: the worker's traceback, as text
        assert type(exc.__cause__).__name__ == "_RemoteTraceback"
        assert "Traceback (most recent call last)" in str(exc.__cause__)
        assert str(exc.__cause__) in text
    else:
        assert exc.__cause__ is None
    return text


@pytest.mark.parametrize(
    "arg, expected, message",
    [
        (threading.Lock(), TypeError, "cannot pickle '_thread.lock' object"),
        (ErrorAtPickle(), pickle.PicklingError, "Error in pickle"),
        (CustomErrorAtPickle(), CustomPickleError, "my reducer says no"),
        (Unpicklable(), TypeError, "I refuse to be pickled"),
        (ExitAtPickle(), SystemExit, "7"),
    ],
    ids=["lock", "PicklingError", "custom", "TypeError-from-reduce", "SystemExit"],
)
def test_unpicklable_argument_fails_only_its_future_with_picklings_own_error(
    arg, expected, message
):
    with ProcessGroupExecutor(1) as ex:
        before = ex.submit(add, 1, 1)
        bad = ex.submit(add, arg, 1)
        assert bad.done()  # failed in submit(): nothing reached a worker
        exc = bad.exception()
        assert type(exc) is expected and str(exc) == message
        with pytest.raises(expected):
            bad.result()
        assert_marked(exc, "pickle-arguments", worker_side=False)
        assert before.result(timeout=30) == 2
        assert ex.submit(add, 2, 2).result(timeout=30) == 4


def test_keyboard_interrupt_while_pickling_an_argument_propagates_from_submit():
    # Ctrl-C lands in whatever the main thread runs, a long pickle in submit() too: it
    # must interrupt the program, not wait in a future nobody may look at.
    with ProcessGroupExecutor(1) as ex:
        with pytest.raises(KeyboardInterrupt):
            ex.submit(add, InterruptAtPickle(), 1)
        assert ex.submit(add, 1, 1).result(timeout=30) == 2


@pytest.mark.parametrize(
    "factory, expected, message",
    [
        (threading.Lock, TypeError, "cannot pickle '_thread.lock' object"),
        (ErrorAtPickle, pickle.PicklingError, "Error in pickle"),
        (CustomErrorAtPickle, CustomPickleError, "my reducer says no"),
        (ExitAtPickle, SystemExit, "7"),
    ],
    ids=["lock", "PicklingError", "custom", "SystemExit"],
)
def test_result_that_fails_to_pickle_gives_picklings_own_error(factory, expected, message):
    with ProcessGroupExecutor(1) as ex:
        fut = ex.submit(make, factory)
        exc = fut.exception(timeout=30)
        assert type(exc) is expected and str(exc) == message
        with pytest.raises(expected):
            fut.result()
        text = assert_marked(exc, "pickle-result", worker_side=True)
        if factory is not threading.Lock:  # the reducer that raised is in the worker's traceback
            assert "__reduce__" in str(exc.__cause__) and "test_faults.py" in text
        assert ex.submit(add, 1, 1).result(timeout=30) == 2


@pytest.mark.parametrize(
    "make_exc, check",
    [
        # __init__ takes two arguments, args holds one: plain pickle could not rebuild it
        (needs_two_args, lambda e: e.args == ("first",) and e.b == "second"),
        (bad_str, lambda e: e.args == ("ignored",)),
        (subclass_of_base, lambda e: e.args == ("not an Exception",)),
        (huge_message, lambda e: len(e.args[0]) == 8 << 20),
    ],
    ids=["odd-init", "broken-str", "BaseException-subclass", "huge-message"],
)
def test_odd_exception_raised_while_pickling_a_result_arrives_as_itself(make_exc, check):
    with ProcessGroupExecutor(1) as ex:
        exc = ex.submit(make, RaisesAtPickle, make_exc).exception(timeout=60)
        assert type(exc) is type(make_exc()) and check(exc)
        assert_marked(exc, "pickle-result", worker_side=True)
        assert ex.submit(add, 1, 1).result(timeout=30) == 2


def test_pickling_fault_whose_exception_cannot_travel_gives_task_pickling_error():
    # The result's reducer raises an exception that holds a lock: it cannot be sent
    # back either, so its text travels, in a TaskPicklingError (a RemoteTaskError).
    with ProcessGroupExecutor(1) as ex:
        exc = ex.submit(make, RaisesAtPickle, HoldsLock).exception(timeout=30)
        assert type(exc) is TaskPicklingError and isinstance(exc, RemoteTaskError)
        assert exc.stage == exc.pgexecutor_stage == "pickle-result"
        assert exc.type_name.endswith("HoldsLock")
        assert "__reduce__" in exc.remote_traceback and "holds a lock" in exc.remote_traceback
        assert "pickling the task's result in the worker failed" in str(exc)
        assert pickle.loads(pickle.dumps(exc)).args == exc.args
        assert ex.submit(add, 1, 1).result(timeout=30) == 2


def test_result_that_fails_to_unpickle_in_parent_gives_its_own_error():
    with ProcessGroupExecutor(1) as ex:
        fut = ex.submit(return_bad_unpickle)
        exc = fut.exception(timeout=30)
        assert type(exc) is RuntimeError and str(exc) == "cannot rebuild me here"
        assert_marked(exc, "unpickle-result", worker_side=False)
        assert ex.submit(add, 1, 1).result(timeout=30) == 2


def test_argument_that_fails_to_unpickle_in_worker_gives_its_own_error():
    with ProcessGroupExecutor(1) as ex:
        exc = ex.submit(add, _BadReducer(), 1).exception(timeout=30)
        assert type(exc) is ValueError and "not a number" in str(exc)
        assert_marked(exc, "unpickle-arguments", worker_side=True)
        assert "_run_one" in str(exc.__cause__)
        assert ex.submit(add, 1, 1).result(timeout=30) == 2


def test_argument_whose_unpickling_kills_the_worker():
    with ProcessGroupExecutor(1) as ex:
        before = ex.submit(add, 1, 1)
        bad = ex.submit(add, _Killer(), 1)
        after = [ex.submit(add, 2, 2) for _ in range(3)]
        with pytest.raises(WorkerCrashedError) as ei:
            bad.result(timeout=30)
        assert ei.value.exitcode == 9
        assert before.result(timeout=30) == 2
        assert [f.result(timeout=30) for f in after] == [4, 4, 4]


def test_chunked_map_fails_only_the_items_whose_result_does_not_pickle():
    with ProcessGroupExecutor(1) as ex:
        out = list(ex.map(lock_at, range(5), [2] * 5, chunksize=5, return_exceptions=True))
        assert out[:2] == [0, 1] and out[3:] == [3, 4]
        assert type(out[2]) is TypeError
        assert_marked(out[2], "pickle-result", worker_side=True)
        it = ex.map(lock_at, range(5), [3] * 5, chunksize=5)
        assert [next(it), next(it), next(it)] == [0, 1, 2]
        with pytest.raises(TypeError, match="cannot pickle"):
            next(it)


def _outcome(fut):
    try:
        fut.result(timeout=60)
    except BaseException as exc:  # SystemExit included
        return type(exc)
    return None


def test_pickling_faults_raise_what_process_pool_executor_raises():
    # Side by side, the cases where ProcessPoolExecutor keeps working: each future
    # fails with the same exception type in both.
    from concurrent.futures import ProcessPoolExecutor

    cases = [
        (add, (threading.Lock(), 1)),
        (add, (ErrorAtPickle(), 1)),
        (add, (CustomErrorAtPickle(), 1)),
        (make, (threading.Lock,)),
        (make, (ErrorAtPickle,)),
        (make, (CustomErrorAtPickle,)),
        (make, (ExitAtPickle,)),
    ]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as ppe:
        theirs = [_outcome(ppe.submit(fn, *args)) for fn, args in cases]
    with ProcessGroupExecutor(1) as ex:
        ours = [_outcome(ex.submit(fn, *args)) for fn, args in cases]
    assert ours == theirs
    assert theirs == [TypeError, pickle.PicklingError, CustomPickleError] * 2 + [SystemExit]


# ----------------------------------------------------------------- return_exceptions


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_return_exceptions_yields_errors_in_place(chunksize):
    with ProcessGroupExecutor(2, task_timeout=1.0, kill_grace=0.2) as ex:
        out = list(ex.map(light.maybe_fail, range(6), return_exceptions=True, chunksize=chunksize))
    assert out[0] == 0 and out[4] == 4 and out[5] == 5
    assert isinstance(out[1], ValueError)
    if chunksize == 1:
        assert isinstance(out[2], WorkerCrashedError)
        assert isinstance(out[3], TaskTimeoutError)
    else:
        # items 2 and 3 share a chunk: the whole chunk's worker died or hung
        assert isinstance(out[2], (WorkerCrashedError, TaskTimeoutError))


def test_map_without_return_exceptions_raises_crash_at_position():
    with ProcessGroupExecutor(2) as ex:
        it = ex.map(light.maybe_fail, [0, 4, 2, 5])
        assert next(it) == 0
        assert next(it) == 4
        with pytest.raises(WorkerCrashedError):
            next(it)


# ----------------------------------------------------------------- terminate / kill


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers(method, tmp_path):
    def hang_with_child(path):
        spawn_child_and_report(path)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1000)

    path = str(tmp_path / "child")
    ex = ProcessGroupExecutor(1, kill_grace=30.0 if method == "kill_workers" else 0.3)
    running = ex.submit(hang_with_child, path)
    queued = ex.submit(add, 1, 1)
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    child = int(open(path).read())
    workers = ex.worker_pids()
    t0 = time.monotonic()
    getattr(ex, method)()
    elapsed = time.monotonic() - t0
    with pytest.raises(WorkerCrashedError):
        running.result(timeout=10)
    assert queued.cancelled() or isinstance(queued.exception(timeout=10), (CancelledError, BrokenProcessPool))
    assert wait_gone(child)
    for pid in workers:
        assert wait_gone(pid)
    if method == "kill_workers":
        assert elapsed < 10  # did not wait out the 30 s grace period
    with pytest.raises(RuntimeError, match="cannot schedule new futures after"):
        ex.submit(add, 1, 1)


# ----------------------------------------------------------------- after shutdown


def test_shutdown_kills_background_children_of_finished_tasks(tmp_path):
    path = str(tmp_path / "bg")
    with ProcessGroupExecutor(1, kill_grace=0.3) as ex:
        pgid = ex.submit(leave_background_child, path).result(timeout=30)
        bg = int(open(path).read())
        assert alive(bg)
        assert os.getpgid(bg) == pgid
    assert wait_gone(bg)


def _counts():
    me = psutil.Process()
    return me.num_threads(), me.num_fds()


def test_threads_and_fds_return_to_baseline():
    # Warm up once (lazy imports). The guardian and its pipe go with the last executor
    # (tests/test_cleanup.py), so they are not part of this baseline either way.
    with ProcessGroupExecutor(2) as ex:
        ex.submit(add, 1, 1).result(timeout=30)
    gc.collect()
    base = _counts()
    for _ in range(3):
        with ProcessGroupExecutor(2, kill_grace=0.1) as ex:
            list(ex.map(add, range(50), range(50)))
            with pytest.raises(TaskTimeoutError):
                ex.options(task_timeout=0.5).submit(sleep_forever).result(timeout=30)
            with pytest.raises(WorkerCrashedError):
                ex.submit(exit_with, 1).result(timeout=30)
    gc.collect()
    # The last executor's guardian exits at EOF and a short-lived thread reaps it:
    # both are gone within a second or two (README), not at the instant of shutdown.
    deadline = time.monotonic() + 10
    while _counts() != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counts() == base


def test_twenty_thousand_tiny_tasks_do_not_grow_memory():
    me = psutil.Process()
    with ProcessGroupExecutor(2) as ex:
        for f in [ex.submit(add, i, 1) for i in range(2000)]:  # warm-up
            f.result(timeout=60)
        gc.collect()
        rss0 = me.memory_info().rss
        total = 0
        for _batch in range(10):
            futs = [ex.submit(add, i, 1) for i in range(2000)]
            total += sum(f.result(timeout=60) for f in futs)
            del futs
        gc.collect()
        rss1 = me.memory_info().rss
    assert total == 10 * sum(range(1, 2001))
    assert rss1 - rss0 < 20 * 2**20, (rss0, rss1)  # generous: no per-task leak


def test_many_crashes_in_a_row_never_break_the_pool():
    with ProcessGroupExecutor(2) as ex:
        futs = [ex.submit(exit_with, 1) if i % 2 else ex.submit(add, i, 0) for i in range(30)]
        for i, f in enumerate(futs):
            if i % 2:
                assert isinstance(f.exception(timeout=60), WorkerCrashedError)
            else:
                assert f.result(timeout=60) == i



def slow_after_first(marker):
    """Initializer: quick in the first worker, 60 s in every later one."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        time.sleep(60)
    else:
        os.close(fd)


def test_shutdown_does_not_wait_for_a_replacement_still_starting(tmp_path, caplog):
    # After the only task timed out, a replacement starts and sits in a 60 s
    # initializer; nothing is queued, so shutdown stops it instead of waiting.
    caplog.set_level(logging.DEBUG, logger="pgexecutor")
    ex = ProcessGroupExecutor(1, initializer=slow_after_first, initargs=(str(tmp_path / "m"),))
    with pytest.raises(TaskTimeoutError):
        ex.options(task_timeout=0.5).submit(sleep_forever).result(timeout=30)
    deadline = time.monotonic() + 30
    while ex.stats()["workers_started"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    replacement = [p for p in ex.worker_pids()]
    t0 = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - t0 < 20, "shutdown waited for the replacement's initializer"
    for pid in replacement:
        assert wait_gone(pid)
    stopped = [r for r in caplog.records if "stopped while starting" in r.getMessage()]
    assert stopped and all(r.levelno == logging.DEBUG for r in stopped)


def hang_if_one(i):
    if i == 1:
        time.sleep(1000)
    time.sleep(0.3)
    return i


def test_no_task_waits_behind_a_hung_one_while_a_worker_is_idle():
    # A task written into the hung worker's pipe would wait for its whole timeout
    # (60 s here) while the other worker sits idle.
    with ProcessGroupExecutor(2, kill_grace=0.2) as ex:
        hung = ex.options(task_timeout=60).submit(hang_if_one, 1)
        good = [ex.submit(hang_if_one, i) for i in (0, 2, 3, 4, 5)]
        done, not_done = wait(good, timeout=30)
        assert not not_done, "a task waited behind the hung one"
        assert sorted(f.result() for f in done) == [0, 2, 3, 4, 5]
        assert not hung.done()
        ex.kill_workers()
