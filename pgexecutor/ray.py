"""Ray: the same Executor, errors and ``options()``, with tasks on a Ray cluster.

::

    from pgexecutor.ray import RayExecutor

    with RayExecutor(task_timeout=600, max_memory=8 * 2**30) as ex:  # uses ray.init()'s cluster
        for res in ex.map(mesh, geometries, return_exceptions=True):
            ...                           # TaskTimeoutError, WorkerCrashedError, ...

How a task runs::

    driver (this process)                   a Ray worker, on any node
    ---------------------                   -------------------------
    submit(): pickle the call here
      -> queue -> manager thread --------->  _run_task (a streaming generator task)
         (at most max_workers Ray tasks        -> host process (one per Ray worker, kept)
          handed to Ray at once)                  -> task process, leads its own group:
                                                     the call, and whatever it spawns
                 <-- ("started", ...) -----  once the host has the call
                 <-- ("ok", value) | ("error", exc) -- when the call ends

Why process groups inside the Ray worker: Ray runs a task in the Ray worker process
itself; only recent Ray releases put each worker in a process group of its own
(``RAY_process_group_cleanup_enabled``), and none has a per-task timeout. Running the
call in a ProcessGroupExecutor *inside* the Ray task gives every guarantee of pgexecutor
on every node, whatever Ray's settings: ``task_timeout`` counts from the moment the task
process starts the call (not from scheduling), and on expiry, crash or memory overrun
the call's whole group is killed (SIGTERM, SIGKILL after ``kill_grace``) and the error
comes back as itself. The Ray worker lives on and keeps its processes for the next task.

Why the host in between: when a Ray worker exits in an orderly way (force-cancel,
``ray.shutdown()``, the job ending) Ray SIGKILLs the worker's direct children
(``RAY_kill_child_processes_on_worker_exit``, on by default), not recursively. A pool
made in the Ray worker would lose its worker *and its guardian* that way, and the
task's own children would run on. So the Ray worker's pool runs one "host" process,
which makes the pool that runs the calls; that pool's guardian is a grandchild of the
Ray worker, survives Ray's kill, sees the host die and kills the task's group. If the
Ray worker crashes instead, the guardians chain the same way. Cost: one more process
per Ray worker and one more local hop per task.

The backstop: the driver knows when each task started (the first streamed item). If no
outcome arrives by ``start + (retries + 1) * (task_timeout + kill_grace) +
backstop_margin``, the Ray worker itself is stuck (stopped, wedged in a lock): the
driver force-cancels the Ray task (``ray.cancel(force=True)``, which kills the Ray
worker and, through the guardians, the task's group) and fails the future with
TaskTimeoutError.

Requirements: pgexecutor installed on every node (as Ray needs for any library); the
call's function and arguments travel with cloudpickle, so functions from the driver's
``__main__`` and closures work, and functions from your own modules must be importable
on the nodes (Ray's ``runtime_env`` ``py_modules``/``working_dir``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from typing import Any

import ray

from . import _protocol as proto
from ._frontend import PoolFrontEnd, unpicklable_arguments
from ._future import TaskFuture, end_cancelled
from ._ray_host import host_call, pool_for
from ._settings import TaskSettings, check_grace
from .errors import TaskTimeoutError, WorkerCrashedError

__all__ = ["RayExecutor"]

logger = logging.getLogger("pgexecutor")

_POLL = 0.05  # seconds: how soon the manager sees a new submit while tasks run
_CANCEL_POLL = 0.1  # how soon a running Ray task notices a plain ray.cancel()
_GIVE_UP_AFTER_CANCEL = 60.0  # a force-cancelled task that never answers: fail it anyway

ENABLE_HINT = (
    "To make Ray start every worker in a process group of its own (and kill that group "
    "when the worker exits), set RAY_process_group_cleanup_enabled=1 in the environment "
    "of `ray start` on every node, or in this process's environment before ray.init() "
    "starts a local cluster."
)


# ====================================================================== Ray worker side



def _run_task(
    payload: bytes, settings: TaskSettings, kill_grace: float
) -> Iterator[tuple[Any, ...]]:
    """The Ray task: hand the call to this Ray worker's host (a one-process pool whose
    worker runs ``host_call``; see pgexecutor/_ray_host.py for why); stream its start,
    then its outcome."""
    host = pool_for(kill_grace)
    fut = host.submit(host_call, payload, settings, kill_grace)
    restore = _let_cancel_interrupt()
    try:
        # RUNNING once the host has the call; the task process gets it right after
        # (first use: once it has started) and task_timeout counts from then.
        while not fut.running() and not fut.done():
            time.sleep(0.002)
        node = ray.get_runtime_context().get_node_id()
        yield ("started", os.getpid(), node, host.worker_pids())
        # Short waits, not one long one: a plain ray.cancel() raises KeyboardInterrupt
        # here through _thread.interrupt_main(), which sets a flag the interpreter
        # checks between bytecodes but cannot wake a lock acquire that blocks for good.
        while not fut.done():
            wait([fut], timeout=_CANCEL_POLL)
        try:
            value = fut.result()
        except BaseException as exc:  # the call's own error, or a pgexecutor one
            yield ("error", proto.dump_exception(exc))
            return
    except BaseException:
        # ray.cancel() without force raises KeyboardInterrupt here: killing the host's
        # group makes the host's guardian kill the task's group too.
        host.kill_task(fut)
        raise
    finally:
        restore()
    yield ("ok", value)


def _let_cancel_interrupt() -> Callable[[], None]:
    """Make a plain ``ray.cancel()`` reach this task; return what undoes it.

    Ray cancels a running task with ``_thread.interrupt_main()``, which simulates a
    SIGINT and does nothing while SIGINT's disposition is SIG_IGN or SIG_DFL. A Ray
    worker inherits SIG_IGN from a raylet started by a driver that ignored SIGINT
    (POSIX keeps ignored dispositions across fork and exec: a driver run from a
    background job, under ``nohup``): cancel() would then never stop the task. So
    for the task's duration the main thread gets Python's default handler back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal.signal() works in the main thread only
    previous = signal.getsignal(signal.SIGINT)
    if previous not in (signal.SIG_IGN, signal.SIG_DFL):
        return lambda: None
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore() -> None:
        signal.signal(signal.SIGINT, previous)

    return restore


def _probe() -> tuple[int, int]:
    return os.getpid(), os.getpgid(0)


# ====================================================================== driver side


class _Item:
    __slots__ = (
        "future", "payload", "settings", "attempts", "gen",
        "started", "pid", "node", "task_pids", "backstop", "cancelled_at", "reason",
    )

    def __init__(
        self, future: Future[Any], payload: bytes, settings: TaskSettings
    ) -> None:
        self.future = future
        self.payload = payload
        self.settings = settings
        self.attempts = 0
        self.gen: Any = None
        self.started: float | None = None
        self.pid: int | None = None
        self.node: str | None = None
        self.task_pids: list[int] = []
        self.backstop: float | None = None
        self.cancelled_at: float | None = None
        # why *we* cancelled it: "timeout" or "terminate" (forced), "cancel" (its user's)
        self.reason: str | None = None


class RayExecutor(PoolFrontEnd):
    """A ``concurrent.futures.Executor`` that runs tasks on Ray, each in a process group.

    Same errors and ``options()`` as :class:`~pgexecutor.ProcessGroupExecutor`:
    ``task_timeout`` (counted from the moment the task starts running on its node),
    ``max_memory`` (bytes, for the task's process group) and ``retries`` apply per
    task; a task that hangs, crashes or overruns fails with TaskTimeoutError,
    WorkerCrashedError or MemoryLimitError and everything it spawned is killed.

    Ray: uses the cluster of an earlier ``ray.init()``; otherwise calls
    ``ray.init(address, **init_kwargs)`` itself (``address=None`` starts a local one,
    which ``shutdown()`` then stops). ``max_workers`` (default: the cluster's CPUs) caps
    how many tasks are handed to Ray at once; ``remote_args`` go to ``.options()`` of
    the Ray task (``{"num_cpus": 1}`` unless given). Ray's own task retries are off:
    ``retries`` reruns a task whose process died or timed out, and one whose Ray worker
    died.

    ``future.cancel()`` works while a task waits in this executor's queue (at most
    ``max_workers`` are handed to Ray); with ``cancel_running=True`` (or
    ``options(cancel_running=True)``) it also stops a running task and its process
    tree on its node, as ProcessGroupExecutor's does; ``await ex.run(fn, ...)`` stops
    its task whenever the awaiting coroutine is cancelled. ``terminate_workers()``
    also stops the running ones (WorkerCrashedError), killing their groups.

    The errors' ``pid`` is the task process's, except for the errors the driver
    raises itself (a lost Ray worker, the backstop below): there it is the Ray worker's.

    At start-up a tiny task checks whether Ray workers lead their own process group;
    the answer is in its ``worker_process_groups`` attribute. RayExecutor does not depend on it
    (see the module docstring), but if not, it logs how to enable it, and with
    ``require_process_groups=True`` it raises instead.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        task_timeout: float | None = None,
        kill_grace: float = 1.0,
        max_memory: int | None = None,
        retries: int = 0,
        cancel_running: bool = False,
        remote_args: dict[str, Any] | None = None,
        address: str | None = None,
        init_kwargs: dict[str, Any] | None = None,
        require_process_groups: bool = False,
        backstop_margin: float = 30.0,
    ) -> None:
        kill_grace = check_grace(kill_grace)
        self._settings = TaskSettings.checked(
            task_timeout, max_memory, retries, cancel_running=cancel_running
        )
        self._kill_grace = kill_grace
        self._backstop_margin = float(backstop_margin)
        self._owns_ray = False
        if not ray.is_initialized():
            ray.init(address=address, **(init_kwargs or {}))
            self._owns_ray = True
        args = {"num_cpus": 1}
        args.update(remote_args or {})
        if max_workers is None:
            cpus = ray.cluster_resources().get("CPU", 1)
            per_task = args.get("num_cpus") or 1
            max_workers = max(1, int(cpus // per_task))
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._max_workers = max_workers
        self._remote = ray.remote(_run_task).options(
            num_returns="streaming", max_retries=0, retry_exceptions=False, **args
        )
        self.worker_process_groups = self._check_worker_groups(require_process_groups)

        self._lock = threading.Lock()
        self._inbox: deque[Any] = deque()
        self._wake = threading.Event()
        self._sweep_due = False  # set by _note_cancel (any thread), cleared by the manager
        self._queue: deque[_Item] = deque()
        self._running: dict[int, _Item] = {}  # id(generator) -> item
        self._stopping = False
        self._shutdown = False
        self._thread = threading.Thread(target=self._run, name="pgexecutor-ray", daemon=True)
        self._finished = threading.Event()
        self._thread.start()
        weakref.finalize(self, _post, self._inbox, self._wake, ("shutdown", False))

    # ------------------------------------------------------------ start-up check

    def _probe_worker(self) -> tuple[int, int]:
        return ray.get(ray.remote(_probe).options(num_cpus=0).remote(), timeout=120)

    def _check_worker_groups(self, require: bool) -> bool:
        pid, pgid = self._probe_worker()
        if pid == pgid:
            return True
        msg = (
            f"Ray workers do not lead their own process group (a worker had pid {pid}, "
            f"process group {pgid}). RayExecutor does not rely on it: each task runs in a "
            "process group it creates inside the Ray worker, killed on timeout, crash or "
            "memory overrun. But processes started outside RayExecutor's tasks are not "
            "cleaned up when Ray kills a worker. " + ENABLE_HINT
        )
        if require:
            raise RuntimeError(msg)
        logger.warning("%s", msg)
        return False

    @property
    def max_workers(self) -> int:
        """How many tasks are handed to Ray at once, at most: the ``max_workers``
        given, or the number chosen for ``max_workers=None`` (the cluster's CPUs
        divided by each task's ``num_cpus``). Read-only."""
        return self._max_workers

    # ------------------------------------------------------------ Executor API

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        settings: TaskSettings,
    ) -> Future[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            try:
                payload = proto.dumps((fn, args, kwargs))
            except BaseException as exc:
                return unpicklable_arguments(exc)
            # A cancel() wakes the manager, which tells the waiters (see _launch).
            fut: Future[Any] = TaskFuture(
                self._note_cancel, self._thread,
                self._stop_task if settings.cancel_running else None,
            )
            _post(
                self._inbox, self._wake,
                _Item(fut, payload, settings),
            )
            return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
        _post(self._inbox, self._wake, ("shutdown", cancel_futures))
        if wait:
            self._finished.wait()
            if self._owns_ray and ray.is_initialized():
                self._owns_ray = False
                ray.shutdown()

    def terminate_workers(self) -> None:
        """Fail running tasks with WorkerCrashedError (their Ray workers are
        force-cancelled, their groups killed), cancel queued ones, and shut down."""
        with self._lock:
            self._shutdown = True
        _post(self._inbox, self._wake, ("terminate",))
        self.shutdown(wait=True)

    # ------------------------------------------------------------ the manager thread
    # One owner for all task state, as in ProcessGroupExecutor: other threads only
    # append to the inbox and set the wake event.

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            logger.critical("pgexecutor RayExecutor manager failed", exc_info=True)
            err = WorkerCrashedError(None, None, "RayExecutor's manager thread failed; see the log")
            for item in list(self._running.values()) + list(self._queue):
                if not item.future.done():
                    if item.future.set_running_or_notify_cancel() or item.gen is not None:
                        item.future.set_exception(err)
        finally:
            self._finished.set()

    def _loop(self) -> None:
        while True:
            self._drain_inbox()
            self._sweep_cancelled()
            self._launch()
            if self._stopping and not self._queue and not self._running:
                return
            now = time.monotonic()
            wait = _POLL
            for item in self._running.values():
                if item.backstop is not None and item.cancelled_at is None:
                    wait = min(wait, max(0.0, item.backstop - now))
            if self._running:
                gens = [item.gen for item in self._running.values()]
                ready, _ = ray.wait(gens, num_returns=1, timeout=wait, fetch_local=True)
                if ready and len(gens) > 1:
                    ready, _ = ray.wait(gens, num_returns=len(gens), timeout=0, fetch_local=True)
                for gen in ready:
                    found = self._running.get(id(gen))
                    if found is not None:
                        self._advance(found)
            else:
                self._wake.wait(wait)
                self._wake.clear()
            self._check_backstops(time.monotonic())

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            msg = inbox.popleft()
            if type(msg) is _Item:
                self._queue.append(msg)
            elif msg[0] == "shutdown":
                self._stopping = True
                if msg[1]:
                    self._cancel_queue(running_too=False)
            elif msg[0] == "stop":
                self._stop(msg[1])
            elif msg[0] == "terminate":
                self._stopping = True
                self._cancel_queue(running_too=True)
                now = time.monotonic()
                for item in self._running.values():
                    if item.cancelled_at is None:
                        item.reason = "terminate"
                        item.cancelled_at = now
                        ray.cancel(item.gen, force=True)

    def _cancel_queue(self, running_too: bool) -> None:
        """Cancel what no Ray task was started for, as the standard library's
        shutdown(cancel_futures=True) does, and tell the waiters. A retry waiting to be
        relaunched is RUNNING: it runs, unless ``running_too`` (terminate)."""
        keep: deque[_Item] = deque()
        for item in self._queue:
            if item.gen is not None and not running_too:
                keep.append(item)
            else:
                end_cancelled(item.future, running=item.gen is not None)
        self._queue = keep

    def _stop_task(self, fut: TaskFuture) -> None:
        """A running future's cancel() with cancel_running (any thread): stop its task."""
        _post(self._inbox, self._wake, ("stop", fut))

    def _stop(self, fut: Future[Any]) -> None:
        """Stop ``fut``'s task: a plain ``ray.cancel`` raises KeyboardInterrupt in the
        Ray task, which has its host stop the task's process group (SIGINT first, see
        ``_run_task``); a retry waiting in the queue is dropped."""
        for item in self._running.values():
            if item.future is fut:
                if item.cancelled_at is None:
                    item.reason = "cancel"
                    item.cancelled_at = time.monotonic()
                    ray.cancel(item.gen, force=False)
                return
        for item in self._queue:
            if item.future is fut:
                self._queue.remove(item)
                end_cancelled(fut, running=item.gen is not None)
                return

    def _note_cancel(self) -> None:
        """A queued future was cancelled (any thread): sweep the queue soon."""
        self._sweep_due = True
        self._wake.set()

    def _sweep_cancelled(self) -> None:
        """Queued futures their users cancelled: drop them and tell their waiters now."""
        if not self._sweep_due:
            return
        self._sweep_due = False
        keep: deque[_Item] = deque()
        for item in self._queue:
            if item.gen is None and item.future.cancelled():
                item.future.set_running_or_notify_cancel()  # False: waiters are told
            else:
                keep.append(item)
        self._queue = keep

    def _launch(self) -> None:
        while self._queue and len(self._running) < self._max_workers:
            item = self._queue.popleft()
            if item.gen is None and not item.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            item.attempts += 1
            item.started = item.backstop = item.cancelled_at = None
            item.reason = None
            item.gen = self._remote.remote(
                item.payload, item.settings, self._kill_grace
            )
            self._running[id(item.gen)] = item

    def _advance(self, item: _Item) -> None:
        """The item's generator has its next message (or its error) ready."""
        try:
            msg = ray.get(next(item.gen))
        except StopIteration:
            self._finish(item, exc=WorkerCrashedError(item.pid, None, "the Ray task ended without a result"))
            return
        except ray.exceptions.RayTaskError as err:
            # Our task body itself failed on the Ray worker (e.g. pgexecutor missing there).
            cause = getattr(err, "cause", None)
            self._finish(item, exc=cause if isinstance(cause, BaseException) else err)
            return
        except ray.exceptions.RayError as err:
            self._on_ray_failure(item, err)
            return
        kind = msg[0]
        if kind == "started":
            item.pid, item.node, item.task_pids = msg[1], msg[2], msg[3]
            item.started = time.monotonic()
            if item.settings.timeout is not None:
                per_attempt = item.settings.timeout + self._kill_grace
                item.backstop = (
                    item.started + (item.settings.retries + 1) * per_attempt + self._backstop_margin
                )
        elif kind == "ok":
            self._finish(item, value=msg[1])
        else:
            self._finish(item, exc=proto.load_exception(msg[1]))

    def _on_ray_failure(self, item: _Item, err: BaseException) -> None:
        """Ray says the task did not finish: we cancelled it, or its Ray worker died."""
        if item.reason == "timeout":
            assert item.settings.timeout is not None
            exc: BaseException = TaskTimeoutError(item.settings.timeout, item.pid, None, item.attempts)
            self._finish(item, exc=exc)
            return
        if item.reason == "terminate":
            self._finish(item, exc=WorkerCrashedError(item.pid, None, "terminated by terminate_workers()"))
            return
        if item.reason == "cancel":  # its user cancelled it: the future says so already
            self._running.pop(id(item.gen), None)
            end_cancelled(item.future, running=True)
            return
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = f"the Ray worker was lost ({type(err).__name__}: {first})"
        if isinstance(err, ray.exceptions.OutOfMemoryError):
            reason = f"Ray's memory monitor killed the Ray worker: {first}"
        if item.attempts <= item.settings.retries and not self._stopping:
            logger.info("retrying a task after %s (attempt %d)", reason, item.attempts + 1)
            del self._running[id(item.gen)]
            self._queue.appendleft(item)
            return
        self._finish(item, exc=WorkerCrashedError(item.pid, None, reason, item.attempts))

    def _finish(self, item: _Item, *, value: Any = None, exc: BaseException | None = None) -> None:
        self._running.pop(id(item.gen), None)
        item.payload = b""
        fut = item.future
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    def _check_backstops(self, now: float) -> None:
        for item in list(self._running.values()):
            if item.cancelled_at is None:
                if item.backstop is not None and now >= item.backstop:
                    logger.warning(
                        "task process %s on Ray worker pid=%s (node %s) gave no answer %gs "
                        "past its timeout; force-cancelling it (its Ray worker is killed)",
                        item.task_pids, item.pid, item.node, self._backstop_margin,
                    )
                    item.reason = "timeout"
                    item.cancelled_at = now
                    ray.cancel(item.gen, force=True)
            elif now >= item.cancelled_at + _GIVE_UP_AFTER_CANCEL:
                # Ray never confirmed the cancel (a lost node?): stop waiting for it.
                self._on_ray_failure(item, RuntimeError("the force-cancel was never confirmed"))

    # ------------------------------------------------------------ context manager


def _post(inbox: deque[Any], wake: threading.Event, msg: Any) -> None:
    inbox.append(msg)
    wake.set()
