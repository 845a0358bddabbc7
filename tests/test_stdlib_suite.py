"""CPython's own concurrent.futures tests, run against ProcessGroupExecutor.

The running interpreter's ``test.test_concurrent_futures`` package holds the tests
CPython runs against ``ProcessPoolExecutor``. Here its executor-level test classes
(submit, map, wait, as_completed, shutdown, initializer, crashes) are combined with
mixins whose ``executor_type`` is ``ProcessGroupExecutor``, once per start method, and
collected by pytest like any unittest.TestCase. CPython's ``create_executor_tests``
builds the classes, so its own naming and set-up (``ExecutorMixin``) apply unchanged.

The package ships with CPython's test suite, which many distributions (and 3.11 on
this project's CI machine) leave out; the module is skipped then, with the reason.
``.ci/run`` runs it under a Python that has it (see there).

A few tests do not apply to a swap-in; each is skipped with its reason in
``NOT_APPLICABLE``. Everything else must pass, except the known bugs listed with their
cause in ``KNOWN_FAILURES`` (expected failures: one that passes fails the run until its
entry is removed) and ``KNOWN_HANGS`` (skipped, since they hang rather than fail).
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import sys
import textwrap
import unittest
import weakref

import pytest

try:
    from test.test_concurrent_futures import (
        test_as_completed,
        test_deadlock,
        test_init,
        test_process_pool,
        test_shutdown,
        test_wait,
    )
    from test.test_concurrent_futures.util import BaseTestCase, ExecutorMixin
except ImportError as exc:  # the interpreter was installed without its test suite
    if os.environ.get("PGEXECUTOR_REQUIRE_STDLIB_SUITE"):
        raise
    pytest.skip(
        f"Python {sys.version.split()[0]} has no test.test_concurrent_futures "
        f"(installed without CPython's test suite: {exc}); .ci/run runs this module "
        "under a Python that has it",
        allow_module_level=True,
    )

import multiprocessing

from pgexecutor import ProcessGroupExecutor

#: The start methods ProcessGroupExecutor is tested with, as ``mp_context``.
CONTEXTS = ("spawn", "fork", "forkserver")

_PRIVATE = "reads ProcessPoolExecutor's private attributes ({})"
_BREAKS = "expects the pool to break ({}); a ProcessGroupExecutor never breaks: only the " \
    "future concerned fails and a fresh worker takes its place (docs/guide/errors.md)"
_OTHER_TYPE = "builds a concurrent.futures.ProcessPoolExecutor itself and reads its " \
    "private attributes ({}): it tests ProcessPoolExecutor, not the executor under test"

#: (CPython test class, test name) -> why it does not apply to a swap-in. Keep short.
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    # test_process_pool.ProcessPoolExecutorTest
    ("ProcessPoolExecutorTest", "test_killed_child"): (
        _PRIVATE.format("_processes") + "; and " + _BREAKS.format("BrokenProcessPool on the "
        "next submit after a worker was killed")
    ),
    ("ProcessPoolExecutorTest", "test_saturation"): _PRIVATE.format("_processes"),
    ("ProcessPoolExecutorTest", "test_idle_process_reuse_one"): _PRIVATE.format("_processes"),
    ("ProcessPoolExecutorTest", "test_idle_process_reuse_multiple"): _PRIVATE.format(
        "_processes"
    ),
    ("ProcessPoolExecutorTest", "test_max_tasks_per_child"): (
        _PRIVATE.format("_processes") + "; under fork it expects a ValueError that "
        "ProcessPoolExecutor raises because it forks from a threaded parent on demand. "
        "tests/test_api.py::test_max_tasks_per_child_recycles_workers covers recycling"
    ),
    ("ProcessPoolExecutorTest", "test_max_tasks_per_child_defaults_to_spawn_context"): (
        _PRIVATE.format("_mp_context") + "; without mp_context each worker is forked "
        "from a template, a fresh single-threaded interpreter (spawn's semantics "
        "without a context object)"
    ),
    ("ProcessPoolExecutorTest", "test_python_finalization_error"): (
        "makes the creation of ProcessPoolExecutor's second thread (its queue feeder) "
        "fail and expects BrokenProcessPool; ProcessGroupExecutor starts one thread only"
    ),
    # test_shutdown.ProcessPoolShutdownTest
    ("ProcessPoolShutdownTest", "test_processes_terminate"): _PRIVATE.format("_processes"),
    ("ProcessPoolShutdownTest", "test_context_manager_shutdown"): _OTHER_TYPE.format(
        "_processes"
    ),
    ("ProcessPoolShutdownTest", "test_del_shutdown"): _OTHER_TYPE.format(
        "_processes, _call_queue, _executor_manager_thread"
    ),
    ("ProcessPoolShutdownTest", "test_shutdown_no_wait"): _OTHER_TYPE.format(
        "_processes, _call_queue, _executor_manager_thread"
    ),
    ("ProcessPoolShutdownTest", "test_hang_gh83386"): (
        "CPython skips it for ProcessPoolExecutor, and the script it runs is broken for any "
        "other process executor (it calls multiprocessing.set_start_method without "
        "importing multiprocessing); tests/test_containment.py::"
        "test_script_that_never_shuts_down_exits_and_leaves_nothing covers the behaviour"
    ),
    # test_init.FailingInitializerMixin
    ("FailingInitializerMixin", "test_initializer"): (
        _PRIVATE.format("_broken") + "; and " + _BREAKS.format("BrokenExecutor from every "
        "submit after an initializer failed; here the queued futures fail with "
        "WorkerInitializerError, a BrokenProcessPool, and a later submit tries again: "
        "tests/test_api.py::test_failing_initializer_fails_futures_instead_of_hanging")
    ),
    # test_deadlock.ExecutorDeadlockTest
    ("ExecutorDeadlockTest", "test_gh105829_should_not_deadlock_if_wakeup_pipe_full"): (
        "patches ProcessPoolExecutor's private _ExecutorManagerThread and _ThreadWakeup"
    ),
    ("ExecutorDeadlockTest", "test_shutdown_deadlock_pickle"): _PRIVATE.format(
        "_executor_manager_thread"
    ),
    ("ExecutorDeadlockTest", "test_error_at_task_unpickle"): _BREAKS.format(
        "BrokenProcessPool when a worker cannot unpickle its call; here that future fails "
        "with the UnpicklingError itself, its stage noted"
    ),
    ("ExecutorDeadlockTest", "test_exit_at_task_unpickle"): _BREAKS.format(
        "BrokenProcessPool when unpickling the call raises SystemExit in the worker; here "
        "that future fails with the SystemExit"
    ),
    ("ExecutorDeadlockTest", "test_error_during_result_unpickle_in_result_handler"): (
        _BREAKS.format("BrokenProcessPool when the parent cannot unpickle a result; here "
                       "that future fails with the UnpicklingError")
    ),
    ("ExecutorDeadlockTest", "test_exit_during_result_unpickle_in_result_handler"): (
        _BREAKS.format("BrokenProcessPool when unpickling a result raises SystemExit in "
                       "the parent; here that future fails with the SystemExit")
    ),
}

#: (CPython test class, test name) -> the bug (and where it is) that makes it fail
#: today. Marked expectedFailure, so the day it passes it fails as an "unexpected
#: success" and its entry must go. Each one is a bug to fix, not a difference to keep.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

#: Known failures that hang instead of failing: skipped, so the run ends. Same rule.
KNOWN_HANGS: dict[tuple[str, str], str] = {}

#: Tests whose child interpreter imports the executor type by name from
#: concurrent.futures (``from concurrent.futures import {executor_type}``). They run
#: as CPython wrote them, with only that import naming the module the type lives in.
IMPORTS_BY_NAME = {
    ("ProcessPoolShutdownTest", "test_interpreter_shutdown"),
    ("ProcessPoolShutdownTest", "test_submit_after_interpreter_shutdown"),
}
_IMPORT = "from concurrent.futures import {executor_type}"


def _importing_from_pgexecutor(test):
    """CPython's ``test`` with its child's import of the executor type taken from
    pgexecutor (installed: the child runs isolated, ``-I``, so it ignores PYTHONPATH)."""
    try:
        source = textwrap.dedent(inspect.getsource(test))
    except OSError:
        source = ""
    if source.count(_IMPORT) != 1:
        reason = f"{test.__qualname__} changed: it no longer contains {_IMPORT!r} once"
        return unittest.skip(f"cannot adapt: {reason}")(test)
    source = source.replace(_IMPORT, "from pgexecutor import {executor_type}")
    tree = ast.parse(source)
    ast.increment_lineno(tree, test.__code__.co_firstlineno - 1)
    namespace: dict[str, object] = {}
    code = compile(tree, inspect.getsourcefile(test) or "<cpython test>", "exec")
    exec(code, sys.modules[test.__module__].__dict__, namespace)
    return namespace[test.__name__]


#: CPython's test classes any swap-in for ProcessPoolExecutor must pass.
SUITES = (
    test_process_pool.ProcessPoolExecutorTest,  # with executor.ExecutorTest
    test_wait.WaitTests,
    test_as_completed.AsCompletedTests,
    test_shutdown.ProcessPoolShutdownTest,  # with ExecutorShutdownTest
    test_init.InitializerMixin,
    test_init.FailingInitializerMixin,
    test_deadlock.ExecutorDeadlockTest,
)


class _Tracked(ProcessGroupExecutor):
    """ProcessGroupExecutor that remembers its instances, so that an executor a
    failing test made and never shut down (test_deadlock's _check_crash makes its own)
    is killed at tearDown instead of leaking into the next test."""

    made: list[weakref.ref[ProcessGroupExecutor]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made.append(weakref.ref(self))


_Tracked.__name__ = _Tracked.__qualname__ = "ProcessGroupExecutor"  # scripts import it by name


def _mixin(ctx: str) -> type:
    def get_context(self):
        if ctx not in multiprocessing.get_all_start_methods():
            self.skipTest(f"start method {ctx!r} is not available here")
        return multiprocessing.get_context(ctx)

    def tearDown(self):
        for ref in _Tracked.made:
            ex = ref()
            if ex is not None and ex is not getattr(self, "executor", None):
                ex.kill_workers()  # a no-op for one the test shut down
        _Tracked.made.clear()
        ExecutorMixin.tearDown(self)

    name = f"ProcessGroup{ctx.capitalize()}Mixin"
    return type(name, (ExecutorMixin,), {
        "executor_type": _Tracked, "ctx": ctx, "get_context": get_context,
        "tearDown": tearDown,
    })


def _known_failure(test, why: str):
    """A copy of CPython's ``test`` to mark (marking it would change CPython's own)."""

    @functools.wraps(test)
    def known_failure(self, *args, **kwargs):
        return test(self, *args, **kwargs)

    known_failure.__doc__ = f"known failure: {why}"
    return known_failure


def _adapted(suite: type) -> dict[str, object]:
    """``suite``'s tests that do not apply (skipped) or import by name (adapted), looked
    up along its MRO (a test of ExecutorTest is listed under ProcessPoolExecutorTest)."""
    names = {klass.__name__ for klass in suite.__mro__}
    out: dict[str, object] = {}
    for (klass, test), reason in NOT_APPLICABLE.items():
        if klass in names and hasattr(suite, test):
            out[test] = unittest.skip(f"not applicable: {reason}")(getattr(suite, test))
    for (klass, test), why in KNOWN_FAILURES.items():
        if klass in names and hasattr(suite, test):
            out[test] = unittest.expectedFailure(_known_failure(getattr(suite, test), why))
    for (klass, test), why in KNOWN_HANGS.items():
        if klass in names and hasattr(suite, test):
            out[test] = unittest.skip(f"known bug, hangs: {why}")(getattr(suite, test))
    for klass, test in IMPORTS_BY_NAME:
        if klass in names and hasattr(suite, test):
            out[test] = _importing_from_pgexecutor(getattr(suite, test))
    return out


def _build() -> None:
    for ctx in CONTEXTS:
        exe = _mixin(ctx)
        for suite in SUITES:
            name = f"{exe.__name__[:-5]}{suite.__name__.removesuffix('Mixin')}"
            if not name.endswith("Test"):
                name += "Test" if not name.endswith("Tests") else ""
            bases = (suite, exe, BaseTestCase)
            globals()[name] = type(name, bases, {"__module__": __name__, **_adapted(suite)})


_build()
