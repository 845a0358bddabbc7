"""``ProcessGroupExecutor``: the public face; everything stateful is in ``_manager``.

It checks the settings, pickles each call in the caller's thread (outside any lock,
so an unpicklable argument fails exactly its own future at once and the manager never
sees it), hands it to the manager (or straight to an idle worker), and turns
shutdown, terminate and kill into the manager's commands. ``submit``, ``map``,
``options`` and the context manager are the shared front end (``_frontend``).
"""

from __future__ import annotations

# The "noqa: F401" modules are what the parent's threads use later (the worker imports
# them lazily, for a cheap start). They are imported here, at ``import pgexecutor``,
# and not lazily by the manager thread: if any thread of the user's forks while another
# thread is inside an import, that module's import lock stays held forever in the
# child, and the child's first executor would hang on it.
import fcntl  # noqa: F401
import mmap  # noqa: F401
import multiprocessing
import multiprocessing.connection  # noqa: F401
import os
import socket  # noqa: F401
import sys
import threading
import time
import traceback  # noqa: F401
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import cloudpickle  # noqa: F401
import psutil  # noqa: F401
import tblib  # noqa: F401  (the manager thread rebuilds tracebacks with it)

from . import _exit, _native, _process, _settings, _template_pool
from . import _protocol as proto
from ._frontend import PoolFrontEnd, argument_fault, unpicklable_arguments
from ._future import TaskFuture
from ._mailbox import KillTask, Shutdown, Terminate
from ._manager import Manager, ManagerConfig, TaskInfo, WorkItem
from ._manager_base import manager_failed
from ._map_slots import MapSlot, SlotGroup, failed_slot
from ._settings import AutoTimeout, TaskSettings
from ._supervision import task_key
from ._template import TemplateStart


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def spawned_groups() -> frozenset[int]:
    """Every process group this process has created, by id (a worker's pid is its
    group's id; worker templates and the standby are recorded too), for proving
    that nothing leaked: once the executors that made them have shut down and
    :func:`close_idle_templates` ran (or a second passed), no process may still
    belong to any of these groups (check with ``os.getpgid`` or psutil). Holds the
    last 100,000."""
    return _process.spawned_pgids()


def close_idle_templates() -> None:
    """End now the worker templates that wait for a next executor.

    Executors that start workers from a template (the default) share it, and when
    the last one shuts down it waits one second for the next executor, so that
    pools built one after another start in milliseconds; then it exits by itself,
    and at interpreter exit at once. Call this where nothing of the library may
    remain, such as a test's check for leftover processes. Templates in use by a
    running executor stay."""
    _template_pool.close_idle()


def _native_stacks(wanted: Any) -> str | None:
    """native_stacks: the py-spy executable, or None (not wanted, or not installed:
    then a warning, here, at construction)."""
    if not isinstance(wanted, bool):
        raise TypeError(f"native_stacks must be True or False, not {wanted!r}")
    if not wanted:
        return None
    py_spy = _native.find_py_spy()
    if py_spy is None:
        warnings.warn(
            "native_stacks=True needs py-spy (pip install 'pgexecutor[native]'), which is "
            "not installed: errors carry the Python stack only",
            RuntimeWarning,
            stacklevel=3,
        )
    return py_spy


def task_info(future: Future[Any]) -> TaskInfo | None:
    """What happened to a finished task: duration, worker pid, attempts, peak memory.

    Returns None for a future that did not come from a ProcessGroupExecutor or has
    not finished yet.
    """
    info = getattr(future, "info", None) if isinstance(future, TaskFuture) else None
    if isinstance(info, tuple):  # its fields, as the ledger leaves them
        return TaskInfo(*info)
    return getattr(future, "_pgexecutor_info", None)


def work_item(
    future: TaskFuture | MapSlot, payload: bytes | proto.OOBPayload, settings: TaskSettings,
    fn: Callable[..., Any], args: tuple[Any, ...],
) -> WorkItem:
    """The WorkItem of a pickled call; a learned limit (``task_timeout="auto"``) is
    learned per task function, so it carries the function's key."""
    if settings.auto is None:
        return WorkItem(future, payload, settings)
    return WorkItem(future, payload, settings, *task_key(fn, args))


class SlotSubmitter:
    """``submit`` for one map without a Future per item (see _map_slots): each call
    pickles its task here, in the caller's thread, and returns the item's slot; the
    tasks reach the manager in blocks (``post``: the executor's ``_post_block``).

    Blocks grow from one task (the first starts at once, written straight to an idle
    worker when there is one) to ``MAX_BLOCK``, and a block is never held back for
    more than ``MAX_HOLD`` seconds, so slow inputs start as they come. ``flush``
    hands over what is held (map calls it once the inputs are read, and after each
    task of a map with ``buffersize``).
    """

    MAX_BLOCK = 256
    MAX_HOLD = 0.002

    def __init__(
        self, post: Callable[[list[WorkItem], int], None], group: SlotGroup,
        settings: TaskSettings,
    ) -> None:
        self._post = post
        self._group = group
        self._settings = settings
        self._block: list[WorkItem] = []
        self._failed = 0  # held items whose arguments did not pickle
        self._limit = 1
        self._since = 0.0  # when the oldest held item was read

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> MapSlot:
        try:
            payload = proto.dumps_task((fn, args, {}))
        except BaseException as exc:
            fault = argument_fault(exc)  # (re-raises the user's Ctrl-C)
            self._failed += 1
            return failed_slot(self._group, fault)
        slot = MapSlot(self._group)
        item = work_item(slot, payload, self._settings, fn, args)
        block = self._block
        block.append(item)
        now = time.monotonic()
        if len(block) == 1:
            self._since = now
        if len(block) >= self._limit or now - self._since >= self.MAX_HOLD:
            self.flush()
        return slot

    def flush(self) -> None:
        block, failed = self._block, self._failed
        if not block and not failed:
            return
        self._block, self._failed = [], 0
        self._limit = min(self.MAX_BLOCK, self._limit * 2)
        self._post(block, failed)


class ProcessGroupExecutor(PoolFrontEnd):
    """A ``ProcessPoolExecutor`` whose workers each lead their own process group.

    A task that runs past ``task_timeout`` (seconds; or ``"auto"`` /
    :class:`AutoTimeout`: learned from the function's own run times), crashes its
    worker, or (with ``max_memory``) lets its group grow past the budget fails on its
    own with :class:`TaskTimeoutError`, :class:`WorkerCrashedError` or
    :class:`MemoryLimitError`; one whose group makes no CPU or I/O progress for
    ``stall_timeout`` seconds, or that called :func:`heartbeat` and then not again
    within ``heartbeat_timeout`` seconds, fails with :class:`TaskStalledError`
    (``native_stacks=True``: its error carries the native frames too, via py-spy). The
    worker's *whole group* (every process the task spawned) is killed, SIGTERM then
    SIGKILL after ``kill_grace`` seconds, and a fresh
    worker takes its place. The pool is never broken.

    ``initializer_timeout`` (seconds; default: ``task_timeout``, else None for no
    limit) bounds the ``initializer`` in each new worker, counted from when the
    worker begins it (its unpickling, hence its module's import, included). One that
    runs longer has its worker's group killed, and the tasks waiting for it fail with
    :class:`WorkerInitializerError`, as when the initializer raises.
    ``cancel_running=True`` (or ``options(cancel_running=True)``) makes
    ``future.cancel()`` stop a task that already runs: its worker's group gets
    SIGINT (the task sees KeyboardInterrupt; its ``finally`` blocks run), then
    SIGTERM and SIGKILL within ``kill_grace``; the future ends cancelled at once. By
    default ``cancel()`` keeps the standard meaning (a running task is not stopped).
    ``await ex.run(fn, ...)`` stops its task whenever the awaiting coroutine is
    cancelled.

    By default (``mp_context=None``) workers are forked from a template: a fresh,
    single-threaded interpreter per executor that imported the worker code and the
    ``preload`` modules (a tuple of module names) once. A replacement worker then
    starts in milliseconds instead of an interpreter's start (plus, say, torch's
    import). Without ``preload`` the pool's first ``max_workers`` workers start as
    fresh interpreters and the template starts with the first replacement (which is
    fresh too if the template is not ready yet); ``mp_context="template"`` (or a
    ``preload``) starts it with the first worker and waits for it. A preload module that fails to import fails the queued
    tasks with its traceback. Linux only (pidfds); elsewhere, or if the template
    cannot start, each worker is a fresh interpreter, as with ``mp_context="fresh"``.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        task_timeout: float | str | AutoTimeout | None = None,
        kill_grace: float = 1.0,
        max_memory: int | None = None,
        retries: int = 0,
        initializer_timeout: float | None = _settings.UNSET,
        stall_timeout: float | None = None,
        heartbeat_timeout: float | None = None,
        native_stacks: bool = False,
        cancel_running: bool = False,
        preload: tuple[str, ...] = (),
    ) -> None:
        if os.name != "posix":
            raise OSError("ProcessGroupExecutor needs POSIX process groups (Linux, macOS)")
        if max_workers is None:
            max_workers = _default_workers()
        else:
            max_workers = _settings.integer(max_workers, "max_workers", "a whole number > 0 or None")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        preload = _settings.check_preload(preload)
        if mp_context == "fresh":
            if preload:
                raise ValueError("preload needs the template: not with mp_context='fresh'")
            mp_context = None  # each worker a fresh interpreter (posix_spawn), as before
        elif mp_context is None or mp_context == "template":
            eager = mp_context == "template" or bool(preload)
            mp_context = TemplateStart(preload, eager, first_fresh=max_workers)
        elif preload:
            raise ValueError(
                "preload needs workers forked from a template: mp_context=None or "
                f"'template', not {mp_context!r}"
            )
        if isinstance(mp_context, str):
            mp_context = multiprocessing.get_context(mp_context)
        kill_grace = _settings.check_grace(kill_grace)
        py_spy = _native_stacks(native_stacks)
        self._max_workers = max_workers
        self._mp_context = mp_context
        self._settings = TaskSettings.checked(
            task_timeout, max_memory, retries, stall_timeout, heartbeat_timeout, cancel_running
        )
        init_timeout = _settings.check_initializer_timeout(initializer_timeout, self._settings.timeout)
        self._kill_grace = kill_grace
        init_payload = proto.dumps(
            {
                "sys_path": list(sys.path),
                "initializer": (
                    proto.dumps((initializer, tuple(initargs))) if initializer else None
                ),
                "authkey": bytes(multiprocessing.current_process().authkey),
            }
        )
        self._manager = Manager(
            ManagerConfig(
                max_workers=max_workers,
                mp_context=mp_context,
                init_payload=init_payload,
                max_tasks_per_child=max_tasks_per_child,
                kill_grace=kill_grace,
                init_timeout=init_timeout,
                py_spy=py_spy,
            )
        )
        # What every future gets: made once (a bound method made per submit would be
        # one more object per future for the collector to walk).
        self._note_cancel = self._manager.mailbox.note_cancel
        self._shutdown_lock = threading.Lock()
        self._submitted = 0  # under _shutdown_lock
        self._failed_in_caller = 0  # futures failed in submit() (arguments would not pickle)
        self._shutdown = False
        self._started = False
        # The process whose executor this is: a forked child inherits the object, but
        # not the manager thread, and the workers are the parent's (see _forked).
        self._owner_pid = os.getpid()
        self._generation = _exit.fork_generation()
        manager = self._manager

        def stop(fut: TaskFuture) -> None:
            manager.post(KillTask(fut))

        # cancel_running=True: a running future's cancel() stops its task (see
        # _future); one hook for all futures, nothing built per submit. It must not
        # reference self (the finalizer below).
        self._stop_task = stop
        # If the executor is dropped without shutdown, finish its work and clean up,
        # as shutdown(wait=False) would. The finalizer must not reference self.
        weakref.finalize(self, self._manager.post, Shutdown(False))

    # ------------------------------------------------------------------ submit

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        settings: TaskSettings,
    ) -> Future[Any]:
        if self._generation != _exit.fork_generation():
            self._refuse_if_forked("submit to")
        if self._shutdown or _exit.interpreter_exiting():
            self._refuse_if_shut_down()  # before pickling: a closed pool says so first
        # Pickled outside the lock: submitting threads do not wait on each other's
        # pickling (a large argument can take a while).
        try:
            payload: bytes | proto.OOBPayload | None = proto.dumps_task((fn, args, kwargs))
            error: BaseException | None = None
        except BaseException as exc:
            payload, error = None, exc
        with self._shutdown_lock:
            if payload is None:
                self._accept_locked(0, 1)
                assert error is not None
                return unpicklable_arguments(error)
            self._accept_locked(1, 0)
            fut = TaskFuture(
                self._note_cancel, self._manager.resolver,
                self._stop_task if settings.cancel_running else None,
            )
            item = work_item(fut, payload, settings, fn, args)
            if not self._manager.try_dispatch(item) and not self._manager.post(item):
                # The manager ended (only if its loop failed: see Manager._run).
                self._failed_in_caller += 1
                fut.set_exception(manager_failed())
            return fut

    def _slot_submitter(self, settings: TaskSettings) -> SlotSubmitter | None:
        """A map's submit without a Future per item (see _map_slots), unless a future
        per item is needed: ``cancel_running`` (a running item's cancel stops it) or
        a journal (``keep_raw``: the answers' bytes stay on the futures)."""
        if settings.cancel_running or settings.keep_raw:
            return None
        return SlotSubmitter(
            self._post_block, SlotGroup(self._note_cancel, self._manager.resolver), settings
        )

    def _post_block(self, items: list[WorkItem], failed: int) -> None:
        """Hand the manager a block of a map's tasks (already pickled, in the caller's
        thread); ``failed``: items whose arguments did not pickle, counted here. One
        lock and one wake-up per block, not per task. Raises as submit() does if the
        executor is shut down (the block is not run)."""
        if self._generation != _exit.fork_generation():
            self._refuse_if_forked("submit to")
        with self._shutdown_lock:
            self._accept_locked(len(items), failed)
            if not items:
                return
            manager = self._manager
            if len(items) == 1:
                if manager.try_dispatch(items[0]) or manager.post(items[0]):
                    return
            elif manager.post(items):
                return
            self._failed_in_caller += len(items)  # the manager ended (see _submit)
            for item in items:
                item.future.end_now(manager_failed())

    def _accept_locked(self, tasks: int, failed: int) -> None:
        """Under ``_shutdown_lock``: refuse if shut down, start the manager with the
        first task, count ``tasks`` submitted and ``failed`` ones whose arguments did
        not pickle (counted apart from the manager's ``failed``: two threads doing +=
        on one attribute could lose an increment)."""
        self._refuse_if_shut_down()
        if not self._started:
            self._started = True
            self._manager.start()
        self._submitted += tasks + failed
        self._failed_in_caller += failed

    def _refuse_if_shut_down(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exit.interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _forked(self) -> bool:
        """True in a child forked from the process that made this executor."""
        return _exit.fork_generation() != self._generation

    def _refuse_if_forked(self, action: str) -> None:
        """A forked child must not use its parent's executor: the workers, their
        pipes and the manager thread are the parent's (a task written from here
        would run in the parent's worker, an answer would never come back here)."""
        if self._forked():
            raise RuntimeError(
                f"cannot {action} a ProcessGroupExecutor from a forked child (pid "
                f"{os.getpid()}): it belongs to process {self._owner_pid}; create a new "
                "executor in the child"
            )

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ``Executor.shutdown``. In a forked child it does nothing: the executor
        is the parent's (so a ``with`` block that spans a fork ends quietly there).

        From a done-callback (which runs on the executor's delivery thread)
        ``wait=True`` cannot wait for that thread: the shutdown begins, then
        RuntimeError, as ProcessPoolExecutor does (its join of its own thread raises).
        """
        if self._forked():
            return
        with self._shutdown_lock:
            self._shutdown = True
            if not self._started:
                # No task was ever submitted: no thread, no worker; release the fds.
                self._manager.close_unstarted()
                return
            self._manager.post(Shutdown(cancel_futures))
        if wait:
            if self._manager.on_manager_thread():
                raise RuntimeError(
                    "shutdown(wait=True) called from a done-callback, which runs on the "
                    "executor's delivery thread: it cannot wait for itself. The shutdown "
                    "has begun; call shutdown(wait=False) there"
                )
            self._join()

    def _join(self) -> None:
        try:
            self._manager.finished.wait()
        except KeyboardInterrupt:
            # Ctrl-C while waiting for tasks: stop them all rather than wait more.
            self._manager.post(Terminate(True, "interrupted while shutting down"))
            self._manager.finished.wait(timeout=min(self._kill_grace + 5.0, threading.TIMEOUT_MAX))
            raise

    def _terminate(self, hard: bool, reason: str) -> None:
        self._refuse_if_forked("kill or terminate the workers of")
        with self._shutdown_lock:
            self._shutdown = True
            if not self._started:
                self._manager.close_unstarted()
                return
            self._manager.post(Terminate(hard, reason))
        if not self._manager.on_manager_thread():
            self._join()
        # From a done-callback: the kill is under way (the manager carries it out
        # meanwhile); waiting here would wait for the callbacks, this one included.

    def terminate_workers(self) -> None:
        """SIGTERM every worker group (SIGKILL after ``kill_grace``) and shut down.

        Running futures fail with WorkerCrashedError, queued ones are cancelled.
        Returns once every group is gone; from a done-callback (the executor's
        delivery thread) it returns at once while the groups are signalled.
        """
        self._terminate(False, "terminated by terminate_workers()")

    def kill_workers(self) -> None:
        """SIGKILL every worker group at once and shut down (see terminate_workers)."""
        self._terminate(True, "killed by kill_workers()")

    def _interrupted(self) -> None:
        """A with block left by Ctrl-C: stop the tasks rather than wait for them."""
        if not self._forked():  # the parent's executor: nothing of it is ours to stop
            self._terminate(False, "the with block was interrupted (KeyboardInterrupt)")

    # ------------------------------------------------------------------ introspection

    @property
    def max_workers(self) -> int:
        """How many workers this executor runs at most: the ``max_workers`` given, or
        the number chosen for ``max_workers=None`` (the CPUs this process may run on).
        Read-only: the pool's size is fixed at construction."""
        return self._max_workers

    def stats(self) -> dict[str, int]:
        """Counters: submitted, completed, failed, cancelled, timed_out, crashed,
        memory_killed, retried, workers_started, workers_killed.

        ``completed`` (a result), ``failed`` (every task that did not return a
        result, whatever the cause) and ``cancelled`` count futures, each once;
        ``timed_out``, ``crashed`` and ``memory_killed`` count attempts that ended
        so (a retried task can add several). :mod:`pgexecutor.counters` defines
        each, as the progress bar and the journal report use them too."""
        counters = self._manager.stats.snapshot()
        with self._shutdown_lock:
            counters["submitted"] = self._submitted
            counters["failed"] += self._failed_in_caller
        return counters

    def worker_pids(self) -> list[int]:
        """Pids (each equal to its group id) of the workers serving this executor:
        starting, ready or busy, or retiring after ``max_tasks_per_child``.

        A worker being killed (timeout, memory limit, cancel, terminate) leaves this
        list the moment its group is signalled, before its future fails, although
        its processes may live on for up to ``kill_grace`` seconds.
        """
        return list(self._manager.pids)

    def kill_task(self, future: Future[Any]) -> None:
        """Stop ``future``'s task for good, unlike ``future.cancel()``, which (as the
        standard library says) cannot stop a task that runs: if it runs, its worker's
        whole group is stopped (SIGINT, then SIGTERM and SIGKILL within ``kill_grace``)
        and replaced; if
        it waits (queued, or in a worker's pipe), it is dropped. The future ends
        cancelled. Returns at once; a future of another executor, or one that already
        ended, is left alone. (Dask's cancel and Ray use this.)"""
        if self._forked():
            return
        with self._shutdown_lock:
            if not self._started:
                return
        self._manager.post(KillTask(future))
