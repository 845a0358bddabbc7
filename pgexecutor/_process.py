"""Starting workers as process-group leaders; observing, signalling and reaping them.

Everything POSIX lives here so that the manager reads as policy. The hazards:

* **Group leadership without a race.** The default start uses ``posix_spawn`` with
  ``setpgroup=0``: the child is its own group leader *before* it executes a single
  instruction of Python, so there is no moment when signalling ``-pid`` misses it.
  (``posix_spawn`` is also vfork-fast and safe from a threaded parent, unlike fork.)
  With a multiprocessing ``mp_context`` the child calls ``setpgid(0, 0)`` and the parent
  calls ``setpgid(pid, pid)`` too, as shells do; whichever runs first wins.
* **The default start forks from a template** (``_template``): a fresh interpreter
  per executor that forks workers on request (their pipes travel over its socket).
  A forked worker is the template's child, so the template keeps it as a zombie
  until :func:`reap` asks; if the template died, init may have reaped it, and its
  group is signalled only after verifying its members (:func:`signal_group`).
  The pool's first workers, and every worker where pidfds are missing, start fresh.
* **A pgid is reserved only while its leader is unreaped or a member lives.** Once we
  reap the leader and its members are gone, the kernel may hand the number to an
  unrelated process. Hence :func:`observe_exit` looks at a death *without* reaping
  (``waitid(WNOWAIT)``), the manager signals the group, and only then calls
  :func:`reap`. Nothing here signals a group whose leader was reaped.
* **Pipe EOF is not death.** A task that forks copies the worker's pipe ends into its
  children, so EOF never comes while they live. Death is watched through a pidfd
  (Linux >= 5.3), which becomes readable when the process exits, whoever holds its pipes.
* **fd inheritance.** Python creates fds close-on-exec; the child's pipe ends (and,
  on Linux, its end of the socket that carries memfds of large results) are
  ``dup2``-ed onto 3 to 7 by the spawn's file actions, which clears close-on-exec on
  those copies only. So no worker inherits another worker's pipes, or the guardian's.
* **fds are a budget** (RLIMIT_NOFILE: 256 by default on macOS). The parent keeps per
  worker only what it must: the task pipe's write end, the result pipe's read end,
  both ends of the permit pipe, the pidfd and (Linux) the memfd socket: 6 on Linux, 4
  on macOS. The stack-dump pipe is one per pool (:func:`dump_pipe`), and the child's
  ends are closed as soon as the child holds them. A start that finds the budget (or
  the process table, or memory) exhausted raises OSError with nothing left open, and
  the manager tries again later (see _scheduling.SHORTAGE_ERRNOS).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# fds the child finds its pipes at (see _worker.main); defined beside the protocol,
# which the worker imports first.
from . import _platform
from ._protocol import (
    CHILD_DUMP_FD,
    CHILD_PERMIT_FD,
    CHILD_RESULT_FD,
    CHILD_SHM_FD,
    CHILD_TASK_FD,
)
from ._template import TemplateStart, pack_cwd_and_environ

_F_SETPIPE_SZ = 1031  # Linux: bigger pipes mean fewer syscalls for large payloads
_PIPE_SIZE = 1 << 20

# Every pgid this process created, for tests that prove nothing leaked.
_spawned: deque[int] = deque(maxlen=100_000)
_spawn_lock = threading.Lock()

# Workers forked by a template, by pid, until reaped (see signal_group).
_template_workers: dict[int, WorkerProcess] = {}

# fds that belong to this process alone: workers' pipe ends, the managers' wake-up
# pipes. A fork copies them all; every forked child closes them (below).
_parent_only_fds: set[int] = set()


def _after_fork_in_child() -> None:
    """Make a forked child (the user's ``os.fork()``, a multiprocessing fork, one of
    our fork-started workers) hold nothing of the parent's pool.

    A fork copies ``_spawn_lock`` in whatever state it was: if one of the parent's
    manager threads was starting a worker at that moment, the child's copy is held by
    a thread that does not exist there, and the child's first executor would wait on
    it forever. The child gets a fresh lock. It also closes its copies of the
    parent's worker pipes and wake-up pipes: through them a child could write into
    the parent's workers (the managers were told to refuse, see
    _manager.abandon_after_fork), and a copy of a pipe end keeps its EOF away."""
    global _spawn_lock
    _spawn_lock = threading.Lock()
    _template_workers.clear()  # the parent's workers, not ours
    for fd in _parent_only_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _parent_only_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def spawned_pgids() -> frozenset[int]:
    """Every worker process group this process has created (for leak checks)."""
    return frozenset(_spawned)


def mark_parent_only(*fds: int) -> None:
    """Record fds a fork-started worker must close (they belong to this process)."""
    _parent_only_fds.update(fds)


def unmark_parent_only(*fds: int) -> None:
    _parent_only_fds.difference_update(fds)


@dataclass(eq=False)
class WorkerProcess:
    """A started worker: its pid (== its pgid) and the parent's ends of its pipes."""

    pid: int
    to_worker: int  # parent writes tasks here (non-blocking)
    from_worker: int  # parent reads results here (non-blocking)
    # Parent reads faulthandler stack dumps here (non-blocking). One pipe for all of
    # a pool's workers (see dump_pipe): the pool owns it, close_fds leaves it open.
    dump: int
    # Permits (see permit_pipe): the parent writes one per task and keeps a read end
    # to take unclaimed ones back; the worker holds the other read end.
    permits_w: int = -1
    permits_r: int = -1
    pidfd: int = -1  # readable once the process exits; -1 where unavailable
    channel: Any = None  # unix socket: memfds of large results arrive here (or None)
    is_child: bool = True  # False for forkserver: only the forkserver can wait for it
    mp_process: Any = None
    # The _template.Template that forked it (its parent, which alone can reap it),
    # and which of its processes did (a restarted template is another parent)
    template: Any = None
    template_gen: int = 0
    create_time: float = 0.0
    reaped: bool = False
    exitcode: int | None = None
    _fds_open: bool = field(default=True, repr=False)

    def close_fds(self) -> None:
        """Close the parent's ends of the pipes and the pidfd (idempotent); not the
        pool's dump pipe."""
        if not self._fds_open:
            return
        self._fds_open = False
        fds = [self.to_worker, self.from_worker, self.permits_w, self.permits_r, self.pidfd]
        unmark_parent_only(*fds)
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.channel is not None:
            unmark_parent_only(self.channel.fileno())
            self.channel.close()  # memfds still in flight are freed with it


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()  # close-on-exec: never inherited by accident
    if _platform.CAN_RESIZE_PIPES:
        try:
            import fcntl

            fcntl.fcntl(w, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass
    return r, w


def dump_pipe() -> tuple[int, int]:
    """The pool's stack-dump pipe: ``(read end, write end)``, the read end non-blocking.

    Every worker of a pool gets the write end (its faulthandler writes there when the
    manager asks for its stack) and the manager reads the one read end: a dump is
    asked for one worker at a time (the manager waits for it), and stale bytes are
    dropped before each ask. One pipe per pool, not per worker, saves the parent an fd
    per worker. The caller closes both ends (close_dump_pipe) when its pool is done.
    """
    r, w = _pipe()
    os.set_blocking(r, False)
    mark_parent_only(r, w)
    return r, w


def close_dump_pipe(fds: tuple[int, int]) -> None:
    unmark_parent_only(*fds)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def permit_pipe() -> tuple[int, int]:
    """A worker's permit pipe, both ends non-blocking: ``(read end, write end)``.

    Why: tasks written ahead into a worker's pipe cannot be read back out of it, yet
    one of them must not wait there behind a task that turned out to hang while
    another worker could run it. So the worker runs a task only after it took that
    task's permit (8 bytes: its id; a TASK_SHM frame's own number, see _arena) from
    this pipe, and the parent, which keeps a read end too, takes back what was not
    claimed by reading it first. Reads of a pipe are
    serialised by the kernel, so each permit goes to exactly one side: nothing runs
    twice, nothing is lost. Writes of 8 bytes are atomic (< PIPE_BUF) and every read
    asks for a multiple of 8, so permits never split. O_NONBLOCK lives on the open
    file description, which the child's copy shares: the worker's read of an empty
    pipe returns at once too (a revoked task).
    """
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


#: errnos that mean "short of fds or memory now", not "no pidfds here"
_SHORT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def _open_pidfd(pid: int) -> int:
    """A pidfd for ``pid``, or -1 where the platform has none. Raises OSError when
    fds or memory are short: the start fails (and is retried) rather than leave the
    whole pool polling for exits."""
    if not _platform.USE_PIDFD:
        return -1
    try:
        return os.pidfd_open(pid)
    except OSError as exc:  # old kernel (< 5.3), or a sandbox that forbids it
        if exc.errno in _SHORT:
            raise
        return -1


def _record(pid: int) -> None:
    _spawned.append(pid)


def record_group(pgid: int) -> None:
    """Record a group this process created that is no worker's (the template's), so
    that leak checks (:func:`spawned_pgids`) see it too."""
    _spawned.append(pgid)


#: The bootstrap's first line: site.main() without pgexecutor's own editable finder
#: (see bootstrap_code).
_SITE_LINE = (
    "import sys, site; _add = site.addpackage; site.addpackage = lambda d, n, k: k "
    "if n.startswith('__editable__.pgexecutor-') else _add(d, n, k); site.main(); "
    "site.addpackage = _add; del _add\n"
)


def bootstrap_argv(python: str, code: str) -> list[str]:
    """The argv of a fresh worker or template: ``-S``, since the bootstrap runs
    ``site`` itself (see bootstrap_code)."""
    return [python, "-S", "-c", code]


def bootstrap_code(
    module: str = "pgexecutor._worker", func: str = "main", path: list[str] | None = None
) -> str:
    """The ``python -c`` program a fresh worker (or the template: ``_template``) runs:
    find this package, call ``module.func()``.

    It registers a bare module as the ``pgexecutor`` package, so that importing
    ``pgexecutor._worker`` does not run ``pgexecutor/__init__.py``: the public API
    (executor, manager, logging, concurrent.futures, multiprocessing, cloudpickle)
    would cost every worker start some 50 ms of imports it never uses. The bare
    package loads its real ``__init__`` when a task first asks it for a public name
    (see ``_worker._complete_package_on_demand``). ``path`` (the template's: its
    preload imports need the parent's sys.path) goes on the same line as the
    package's own directory, so that the call of ``main()`` stays on line 7 in
    every variant (:func:`dump_is_complete` looks for that frame).

    The interpreter starts with ``-S`` (see :func:`bootstrap_argv`) and the first
    line runs ``site.main()`` itself, so every ``.pth`` file, ``sitecustomize``,
    the venv's prefix and ``exit()`` are as in any interpreter, with one exception:
    pgexecutor's own editable install (``__editable__.pgexecutor-*.pth``). Its
    finder imports pathlib, re and importlib.util (24 ms of a 27 ms ``site`` here,
    in every fresh worker) only to find this package, which the lines below
    register directly.
    """
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(pkg_dir)
    if path is None:
        path_line = f"sys.path.insert(0, {root!r})\n"
    else:
        entries = [root] + [p for p in path if p and p != root]
        path_line = f"sys.path[:0] = [p for p in {entries!r} if p not in sys.path]\n"
    return (
        _SITE_LINE
        + path_line
        + "_pkg = type(sys)('pgexecutor')\n"
        f"_pkg.__path__ = [{pkg_dir!r}]\n"
        "sys.modules['pgexecutor'] = _pkg\n"
        f"from {module} import {func} as main\n"
        "main()\n"
    )


def _bottom_frame_line() -> bytes:
    """How a faulthandler dump of a fresh worker ends: the bootstrap's call of main()."""
    line = bootstrap_code().splitlines().index("main()") + 1
    return f'  File "<string>", line {line} in <module>\n'.encode()


_BOTTOM_FRAME = _bottom_frame_line()


def dump_is_complete(proc: WorkerProcess, dump: bytes | bytearray) -> bool:
    """True once ``dump``, a worker's faulthandler dump so far, is known to be whole.

    faulthandler dumps the main thread last (new threads go to the head of the list it
    walks) and each thread's outermost frame last, so a dump of a fresh-interpreter
    worker ends with the bootstrap's ``main()`` call. A worker started through
    multiprocessing ends elsewhere: False, and the caller waits for the pipe to go
    quiet instead. (A stack deeper than faulthandler's 100 frames ends in "...": the
    same.)
    """
    return proc.mp_process is None and dump.endswith(_BOTTOM_FRAME)


def _shm_channel() -> tuple[Any, Any]:
    """(parent end, child end) of a socket pair for passing memfds, or (None, None).

    Only where memfds exist (Linux): elsewhere large results take the pipe.
    """
    if not _platform.HAS_MEMFD:
        return None, None
    import socket

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    parent.setblocking(False)  # the manager never blocks on a worker
    return parent, child


def _close_all(fds: list[int], socks: tuple[Any, ...] = ()) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    for sock in socks:
        if sock is not None:
            sock.close()


def _open_pipes(opened: list[int]) -> tuple[int, int, int, int, int, int]:
    """A new worker's task, result and permit pipes: (task_r, task_w, res_r, res_w,
    permits_r, permits_w). Each fd is appended to ``opened`` as soon as it exists, so
    that the caller can close what was made when a later allocation fails (EMFILE)."""
    task_r, task_w = _pipe()
    opened += (task_r, task_w)
    res_r, res_w = _pipe()
    opened += (res_r, res_w)
    permits_r, permits_w = permit_pipe()
    opened += (permits_r, permits_w)
    return task_r, task_w, res_r, res_w, permits_r, permits_w


def _open_ends() -> tuple[int, int, int, int, int, int, Any, Any]:
    """A new worker's pipes (task, result, permits: read and write ends) and its
    large-result socket pair (None, None where there is none). Any fd allocation can
    fail (EMFILE at the fd limit): whatever was opened by then is closed again before
    the OSError goes on."""
    opened: list[int] = []
    channel = channel_child = None
    try:
        task_r, task_w, res_r, res_w, permits_r, permits_w = _open_pipes(opened)
        channel, channel_child = _shm_channel()
    except BaseException:
        _close_all(opened, (channel, channel_child))
        raise
    return task_r, task_w, res_r, res_w, permits_r, permits_w, channel, channel_child


def spawn_file_actions(sources: list[int], targets: list[int]) -> list[tuple[Any, ...]]:
    """``posix_spawn`` file actions that give the child stdin /dev/null and each of
    our fds ``sources`` at its fd in ``targets`` (the others are close-on-exec).
    Used for workers, the template and the guardian alike."""
    actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    if min(sources) > max(targets):
        # The usual case: every source lies above the targets, so no dup2 overwrites
        # one. (No scratch fds above them: near the fd limit those would not exist.)
        for fd, target in zip(sources, targets, strict=True):
            actions.append((os.POSIX_SPAWN_DUP2, fd, target))
    else:
        # A source sits among the targets: dup2 through scratch fds above every
        # source, so that no source is overwritten before it was copied.
        scratch = max(max(sources), max(targets)) + 1
        for i, fd in enumerate(sources):
            actions.append((os.POSIX_SPAWN_DUP2, fd, scratch + i))
        for i, target in enumerate(targets):
            actions.append((os.POSIX_SPAWN_DUP2, scratch + i, target))
        for i in range(len(sources)):
            actions.append((os.POSIX_SPAWN_CLOSE, scratch + i))
    return actions


def _spawn_fresh(python: str, dump: tuple[int, int]) -> WorkerProcess:
    """Start ``python -c bootstrap`` as a group leader with its pipes at fds 3-7.

    Any fd allocation can fail (EMFILE at the fd limit): whatever was opened by then
    is closed again before the OSError goes on.
    """
    dump_r, dump_w = dump
    task_r, task_w, res_r, res_w, permits_r, permits_w, channel, channel_child = _open_ends()
    opened = [task_r, task_w, res_r, res_w, permits_r, permits_w]
    child_ends = [task_r, res_w, dump_w, permits_r]
    targets = [CHILD_TASK_FD, CHILD_RESULT_FD, CHILD_DUMP_FD, CHILD_PERMIT_FD]
    if channel_child is not None:
        child_ends.append(channel_child.fileno())
        targets.append(CHILD_SHM_FD)
    try:
        pid = os.posix_spawn(
            python,
            bootstrap_argv(python, bootstrap_code()),
            os.environ,
            file_actions=spawn_file_actions(child_ends, targets),
            setpgroup=0,  # the child leads a new group whose id is its pid
            setsigmask=(),  # start with no signal blocked, whatever our thread blocks
            setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE),
        )
    except BaseException:
        _close_all(opened, (channel, channel_child))
        raise
    for fd in (task_r, res_w):  # the child's ends: close promptly (fds are a budget)
        os.close(fd)
    if channel_child is not None:
        channel_child.close()
    # The parent keeps permits_r on purpose (it takes unclaimed permits back).
    return WorkerProcess(
        pid=pid, to_worker=task_w, from_worker=res_r, dump=dump_r, channel=channel,
        permits_w=permits_w, permits_r=permits_r,
    )


def _spawn_mp(ctx: Any, dump: tuple[int, int]) -> WorkerProcess:
    """Start a worker through a multiprocessing context (fork, spawn or forkserver)."""
    from multiprocessing import process as mp_process
    from multiprocessing.connection import Connection

    from . import _worker

    dump_r = dump[0]
    opened: list[int] = []
    try:
        task_r, task_w, res_r, res_w, permits_r, permits_w = _open_pipes(opened)
        # The child gets a copy of permits_r; the parent keeps its own (see
        # permit_pipe). It gets a copy of the pool's dump pipe too (the Connection
        # closes its fd once the child started).
        child_permits = os.dup(permits_r)
        opened.append(child_permits)
        dump_w = os.dup(dump[1])
        opened.append(dump_w)
    except BaseException:
        _close_all(opened)
        raise
    conns = (
        Connection(task_r, readable=True, writable=False),
        Connection(res_w, readable=False, writable=True),
        Connection(dump_w, readable=False, writable=True),
        Connection(child_permits, readable=True, writable=False),
    )
    parent_ends = (task_w, res_r, permits_w, permits_r)  # (the dump pipe is marked already)
    # A fork-started child closes the parent's fds itself (_after_fork_in_child), but
    # parent_ends are not marked yet: it gets their numbers. Only a fork copies them;
    # in a spawned child the same numbers may be other, live fds.
    forked = ctx.get_start_method() == "fork"
    proc = ctx.Process(
        target=_worker.mp_main,
        args=(*conns, sorted(parent_ends) if forked else []),
        name="pgexecutor-worker",
    )
    proc.daemon = False  # daemonic processes may not have children (DataLoader, pools)
    # multiprocessing refuses to start children from a daemonic process; ours are not
    # multiprocessing's to police (a Dask worker is daemonic, yet must run executors).
    me = mp_process.current_process()
    was_daemon = me._config.get("daemon")  # type: ignore[attr-defined]
    try:
        me._config["daemon"] = False  # type: ignore[attr-defined]
        proc.start()
    except BaseException:
        for c in conns:
            c.close()
        for fd in parent_ends:
            os.close(fd)
        raise
    finally:
        if was_daemon is not None:
            me._config["daemon"] = was_daemon  # type: ignore[attr-defined]
    for c in conns:
        c.close()
    pid = proc.pid
    assert pid is not None
    try:
        os.setpgid(pid, pid)  # as shells do; the child does it too, first one wins
    except OSError:
        pass  # it already exec'd (spawn), or is not our child (forkserver)
    # multiprocessing reaps "its" children whenever another Process starts; we must
    # be the only one to reap (see the module docstring), so take it off its list.
    mp_process._children.discard(proc)  # type: ignore[attr-defined]
    return WorkerProcess(
        pid=pid,
        to_worker=task_w,
        from_worker=res_r,
        dump=dump_r,
        permits_w=permits_w,
        permits_r=permits_r,
        is_child=ctx.get_start_method() != "forkserver",
        mp_process=proc,
    )


def _spawn_from_template(start: TemplateStart, dump: tuple[int, int], python: str) -> WorkerProcess:
    """Have the executor's template fork a worker holding its pipes at fds 3-7.

    The parent opens the pipes (as for a fresh worker) and hands the child's ends to
    the template over its socket; the template forks, the child moves them to 3-7
    and closes everything else (see ``_template``). Where pidfds are missing (macOS)
    the parent could not watch a process that is not its child: a fresh interpreter
    starts instead (``TemplateStart.usable``).

    The worker is the standby if one fits (see :class:`Standby`); the manager asks
    for the next one a moment later (:func:`prepare_standby`).
    """
    if not start.usable():
        return _spawn_fresh(python, dump)
    template = start.ready_template(python)
    if template is None:
        return _spawn_fresh(python, dump)
    proc = _claim_standby(start, template, dump)
    if proc is None:
        ends = _open_ends()
        try:
            pid = template.fork(_child_ends(ends, dump))
            generation = template.generation  # after fork(): it may have restarted it
        except BaseException:
            _close_ends(ends, parent_too=True)
            raise
        _close_ends(ends, parent_too=False)  # the template passed the child's on
        proc = _template_worker(pid, ends, dump, template, generation)
    return proc


#: How long after a template start the manager asks for the next standby: the
#: fork (page tables of a large address space) and the child's set-up then do
#: not compete for the CPUs with the worker just handed out and its first task.
#: Measured (torch preloaded, 2 cores, median of 20 replacements): at once 5.2 ms
#: back to back and 7.7 ms spaced out, 2 ms later 1.9 and 2.1 ms, 5 ms later 2.1
#: and 2.1 ms; longer delays miss back-to-back crashes (no standby ready yet).
STANDBY_DELAY = 0.002


def standby_wanted(mp_context: Any) -> bool:
    """Whether :func:`prepare_standby` would ask for a standby now: a template
    start whose template is ready and has none."""
    if not isinstance(mp_context, TemplateStart) or mp_context.standby is not None:
        return False
    template = mp_context.template
    return template is not None and template.ready and template.sock is not None


def start_is_handover(mp_context: Any) -> bool:
    """Whether the next start is likely a standby's hand-over (~0.3 ms of the
    manager's time), not a fork or a spawn that holds the GIL for milliseconds."""
    return isinstance(mp_context, TemplateStart) and mp_context.standby is not None


def prepare_standby(mp_context: Any, dump: tuple[int, int]) -> None:
    """Ask the executor's template for the next standby (the manager calls this
    ``STANDBY_DELAY`` after a template start; best effort)."""
    with _spawn_lock:
        if standby_wanted(mp_context):
            _prepare_standby(mp_context, mp_context.template, dump)


# The parent's and the child's ends of a new worker's pipes, as _open_ends gives them.
_Ends = tuple[int, int, int, int, int, int, Any, Any]


def _child_ends(ends: _Ends, dump: tuple[int, int]) -> list[int]:
    """The fds a forked worker gets at 3, 4, 5, 7 (and 6): see ``_template``."""
    task_r, _, _, res_w, permits_r, _, _, channel_child = ends
    fds = [task_r, res_w, dump[1], permits_r]
    if channel_child is not None:
        fds.append(channel_child.fileno())
    return fds


def _close_ends(ends: _Ends, parent_too: bool) -> None:
    """Close the child's ends (passed on, or given up), and the parent's if asked."""
    task_r, task_w, res_r, res_w, permits_r, permits_w, channel, channel_child = ends
    fds = [task_r, res_w] + ([task_w, res_r, permits_r, permits_w] if parent_too else [])
    _close_all(fds, (channel_child, channel) if parent_too else (channel_child,))


def _template_worker(
    pid: int, ends: _Ends, dump: tuple[int, int], template: Any, generation: int
) -> WorkerProcess:
    _, task_w, res_r, _, permits_r, permits_w, channel, _ = ends
    proc = WorkerProcess(
        pid=pid, to_worker=task_w, from_worker=res_r, dump=dump[0], channel=channel,
        permits_w=permits_w, permits_r=permits_r, is_child=False, template=template,
        template_gen=generation,
    )
    _template_workers[pid] = proc
    return proc


@dataclass(eq=False)
class Standby:
    """One worker per executor forked from its template ahead of need.

    Why: a fork of a template that imported torch costs milliseconds (copying the
    page tables of a large address space), and the worker's own set-up more; a
    sweep's worker sits idle that long at every crash, timeout and recycle. Asked
    for by the manager ``STANDBY_DELAY`` after each template start, the next one is
    forked while the pool works, and a start becomes a hand-over of pipes that
    already exist.

    What it must match: a start takes the parent's working directory, environment,
    stdout and stderr as they are *then* (a fresh spawn would), so the standby
    records them (``fingerprint``) and is only handed out if they did not change;
    otherwise it is discarded and a worker is forked as before. Until handed out it
    is no worker: it is not registered with the guardian and runs nothing. It waits
    for its first frame on its task pipe, whose only writer is this process
    (close-on-exec, closed in our fork children), so if we die it reads EOF and
    exits, as it does when we close that end. While its template lives it is the
    template's unreaped child, so its pgid (== pid) cannot be recycled under us.
    """

    template: Any
    generation: int
    fingerprint: bytes
    ends: _Ends


def _fingerprint(where: bytes) -> bytes:
    """What a worker inherits at its start that can change between starts: the
    working directory and environment (``where``, as pack_cwd_and_environ gives
    them), and which files fds 1 and 2 are."""
    ids = []
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
            ids.append(f"{st.st_dev}:{st.st_ino}")
        except OSError:
            ids.append("closed")
    return where + b"\0\0" + ",".join(ids).encode()


def _prepare_standby(start: TemplateStart, template: Any, dump: tuple[int, int]) -> None:
    """Ask ``template`` for the next standby, if there is none (best effort: a
    failure here only means the next start forks as usual)."""
    if start.standby is not None:
        return
    try:
        ends = _open_ends()
    except OSError:
        return  # fds short: the pool's workers need them more
    where = pack_cwd_and_environ()
    try:
        asked = template.fork_ahead(_child_ends(ends, dump), where)
    except OSError:  # fds short for /dev/null in place of a closed stdout, say
        asked = False
    if not asked:
        _close_ends(ends, parent_too=True)
        return
    _close_ends(ends, parent_too=False)
    _, task_w, res_r, _, permits_r, permits_w, channel, _ = ends
    mark_parent_only(task_w, res_r, permits_w, permits_r)
    if channel is not None:
        mark_parent_only(channel.fileno())
    start.standby = Standby(template, template.generation, _fingerprint(where), ends)


def _claim_standby(start: TemplateStart, template: Any, dump: tuple[int, int]) -> WorkerProcess | None:
    """The standby as a worker, if it fits this start; else None (and it is gone)."""
    standby: Standby | None = start.standby
    if standby is None:
        return None
    start.standby = None
    fits = standby.template is template and standby.fingerprint == _fingerprint(
        pack_cwd_and_environ()
    )
    try:
        pid = standby.template.collect_ahead(standby.generation)
    except OSError:
        _release_ends(standby.ends)  # a child it may have made reads EOF and exits
        return None
    _record(pid)
    if not fits or not standby.template.alive():
        # Not for this start, or an orphan: its template died after forking it (the
        # reply was already in the socket); the start goes on to a new template.
        _discard(standby, pid)
        return None
    _release_ends(standby.ends, close=False)
    return _template_worker(pid, standby.ends, dump, standby.template, standby.generation)


def _release_ends(ends: _Ends, close: bool = True) -> None:
    """Undo _prepare_standby's marks (spawn_worker marks a worker's ends again)."""
    _, task_w, res_r, _, permits_r, permits_w, channel, _ = ends
    unmark_parent_only(task_w, res_r, permits_w, permits_r)
    if channel is not None:
        unmark_parent_only(channel.fileno())
    if close:
        _close_all([task_w, res_r, permits_r, permits_w], (channel,))


def _discard(standby: Standby, pid: int) -> None:
    """End a standby that will not be used: EOF on its pipes, SIGKILL to its group
    (its template's unreaped child: the pgid is still its own), then the template
    reaps it. If the template died, init reaps the standby once EOF ends it, and
    its pgid may be recycled: it is never signalled then."""
    _release_ends(standby.ends)
    if not standby.template.alive():
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        standby.template.status(pid, reap=True)
    except OSError:
        pass  # the template died: init reaped it


def _drop_standby(start: TemplateStart) -> None:
    """At shutdown: the standby goes before its template (whose EOF would orphan it)."""
    standby: Standby | None = start.standby
    start.standby = None
    if standby is None:
        return
    try:
        pid = standby.template.collect_ahead(standby.generation)
    except OSError:
        _release_ends(standby.ends)
        return
    _record(pid)
    _discard(standby, pid)


def warm_start(mp_context: Any) -> None:
    """The executor shuts down: a default start with no template begins one now
    (see ``TemplateStart.warm``); other starts have nothing to warm."""
    if isinstance(mp_context, TemplateStart) and mp_context.usable():
        with _spawn_lock:
            mp_context.warm(executable())


def close_start(mp_context: Any) -> None:
    """The executor is done with its start method: stop its standby and its
    template, if any."""
    if isinstance(mp_context, TemplateStart):
        with _spawn_lock:
            _drop_standby(mp_context)
        mp_context.close()


def executable() -> str:
    """The interpreter a fresh worker runs: ``multiprocessing.set_executable()``'s if
    the program set one (an embedded Python, whose ``sys.executable`` is the host
    application), else ``sys.executable``, as the standard library's spawn does."""
    spawn = sys.modules.get("multiprocessing.spawn")  # set_executable() imported it
    exe = spawn.get_executable() if spawn is not None else None
    return os.fsdecode(exe) if exe else sys.executable


def spawn_worker(mp_context: Any, dump: tuple[int, int], python: str | None = None) -> WorkerProcess:
    """Start one worker as the leader of a new process group; ``dump`` is the pool's
    stack-dump pipe (:func:`dump_pipe`).

    The parent's ends of its pipes come back non-blocking: the manager must never
    block on a worker. Raises OSError if it cannot start (fds, processes or memory
    short: see the module docstring), with nothing of it left open or running.
    """
    with _spawn_lock:  # one spawn at a time: keeps fd bookkeeping consistent
        if mp_context is None:
            proc = _spawn_fresh(python or executable(), dump)
        elif isinstance(mp_context, TemplateStart):
            proc = _spawn_from_template(mp_context, dump, python or executable())
        else:
            proc = _spawn_mp(mp_context, dump)
        _record(proc.pid)
        mark_parent_only(proc.to_worker, proc.from_worker, proc.permits_w, proc.permits_r)
        if proc.channel is not None:
            mark_parent_only(proc.channel.fileno())
    for fd in (proc.to_worker, proc.from_worker):
        os.set_blocking(fd, False)
    try:
        proc.pidfd = _open_pidfd(proc.pid)
    except OSError:
        abandon(proc)
        raise
    if proc.pidfd >= 0:
        mark_parent_only(proc.pidfd)
    proc.create_time = process_create_time(proc.pid)
    return proc


def abandon(proc: WorkerProcess) -> None:
    """Undo a start that cannot be completed: SIGKILL the new group (its leader is
    unreaped, so the pgid is still ours), reap the leader, close the parent's fds."""
    signal_group(proc.pid, signal.SIGKILL)
    reap(proc)
    proc.close_fds()


def process_create_time(pid: int) -> float:
    """The process's start time (psutil's notion), or 0.0 if it is gone."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return 0.0


def _status_to_code(si_code: int, si_status: int) -> int:
    if si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return -si_status
    return si_status


def observe_exit(proc: WorkerProcess) -> tuple[bool, int | None]:
    """Has the worker exited? Returns ``(dead, exitcode)`` WITHOUT reaping it.

    While the leader stays an unreaped zombie its pgid stays reserved, so the caller
    can still signal the group safely. ``exitcode`` may be None when the platform
    cannot tell before reaping; :func:`reap` then gives it.
    """
    if proc.reaped:
        return True, proc.exitcode
    if proc.template is not None:
        return _observe_template_worker(proc)
    if proc.is_child and _platform.HAS_WAITID:
        try:
            res = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # somebody else reaped it: treat as dead
            proc.reaped = True
            return True, proc.exitcode
        if res is None:
            return False, None
        proc.exitcode = _status_to_code(res.si_code, res.si_status)
        return True, proc.exitcode
    if not proc.is_child and proc.mp_process is not None:
        # forkserver: the forkserver reaps it and reports the status on a socket.
        code = proc.mp_process._popen.poll()
        if code is None:
            return False, None
        proc.exitcode = code
        return True, code
    # No waitid (macOS): a zombie is dead but not reaped.
    try:
        import psutil

        dead = psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
    except Exception:
        dead = True
    return dead, None


def _observe_template_worker(proc: WorkerProcess) -> tuple[bool, int | None]:
    """A template's worker: its pidfd says whether it died; the template, which alone
    may ``waitid`` it, gives the exit status and keeps the zombie (see _template)."""
    import select

    if proc.pidfd >= 0:
        poller = select.poll()
        poller.register(proc.pidfd, select.POLLIN)
        if not poller.poll(0):
            return False, None
    if _parent_gone(proc):  # init reaps it: no status, and its pgid may go
        proc.reaped = True
        return True, None
    try:
        dead, code = proc.template.status(proc.pid, reap=False)
    except OSError:  # the template died: init reaped its zombies (the pgid may go)
        proc.reaped = True
        return True, None
    if dead:
        proc.exitcode = code
    return dead, (code if dead else None)


def _orphaned(pgid: int) -> WorkerProcess | None:
    """The template worker ``pgid`` if its template died (or it is gone): its leader
    may then have been reaped by init, and its pgid may be recycled."""
    proc = _template_workers.get(pgid)
    if proc is None:
        return None
    if proc.reaped or _parent_gone(proc):
        return proc
    return None


def _parent_gone(proc: WorkerProcess) -> bool:
    """Whether the template process that forked ``proc`` is gone (a template that
    was restarted since counts as gone: the new one is not its parent)."""
    tpl = proc.template
    return bool(tpl.generation != proc.template_gen or not tpl.alive())


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the whole group. Only call while its leader is unreaped.

    A template's worker whose template died was reaped by init, maybe: its members
    are verified one by one, as the guardian does (never a blind killpg)."""
    orphan = _orphaned(pgid)
    if orphan is not None:
        from . import _guardian

        return _guardian.signal_verified(pgid, orphan.create_time, sig)
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def signal_leader(pid: int, sig: int) -> bool:
    """Send ``sig`` to the leader alone. Only call while it is unreaped."""
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def group_members(pgid: int) -> list[int]:
    """Pids of the processes (zombies included) whose process group is ``pgid``."""
    import psutil

    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                members.append(pid)
        except OSError:
            continue
    return members


def live_members(pgid: int, exclude: int | None = None) -> list[int]:
    """Members of the group that are not zombies (zombies are already dead)."""
    import psutil

    alive = []
    for pid in group_members(pgid):
        if pid == exclude:
            continue
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


def reap(proc: WorkerProcess) -> int | None:
    """Collect the dead leader's exit status. After this its pgid may be recycled."""
    if proc.reaped:
        _template_workers.pop(proc.pid, None)
        return proc.exitcode
    if proc.template is not None:
        _template_workers.pop(proc.pid, None)
        if _parent_gone(proc):
            proc.reaped = True
            return proc.exitcode
        try:
            _, proc.exitcode = proc.template.status(proc.pid, reap=True)
        except OSError:
            pass  # the template died: init reaped it
    elif proc.is_child:
        try:
            _, status = os.waitpid(proc.pid, 0)
            proc.exitcode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            pass
    elif proc.mp_process is not None:
        proc.exitcode = proc.mp_process._popen.wait(timeout=1.0)
    proc.reaped = True
    return proc.exitcode




def _parse_smaps_rollup(data: bytes) -> int:
    """``Pss`` + ``SwapPss`` of a smaps_rollup text, in bytes (the file says kB)."""
    total = 0
    for line in data.splitlines():
        if line.startswith((b"Pss:", b"SwapPss:")):
            total += int(line.split()[1]) * 1024
    return total


def process_memory(pid: int) -> int:
    """One process's memory in bytes: PSS (+ swapped PSS) on Linux, else RSS.

    Raises ``psutil.NoSuchProcess`` (or ``OSError``) for a process that is gone. A
    zombie counts 0: it holds no memory any more. See :func:`group_memory` for why.
    """
    if _platform.HAS_SMAPS_ROLLUP:
        # Read the file ourselves: psutil's memory_full_info() reads it too, plus
        # statm and the process's start time, ~20 % more for nothing we need here.
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                return _parse_smaps_rollup(f.read())
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            pass  # gone (psutil says so below), not ours, or a pid the kernel refuses
    import psutil

    p = psutil.Process(pid)
    if _platform.HAS_PSS:
        try:
            full = p.memory_full_info()  # /proc/<pid>/smaps on kernels before 4.14
            return int(full.pss) + int(getattr(full, "swap", 0))
        except (psutil.AccessDenied, AttributeError):
            pass
    return int(p.memory_info().rss)


def group_memory(pgid: int) -> int:
    """The memory of every live process in the group ``pgid``, summed, in bytes.

    What is counted, and why (this is what ``max_memory`` limits and what
    ``MemoryLimitError.rss`` and ``TaskInfo.peak_memory`` report):

    * **Linux: PSS + SwapPss** of each member, from ``/proc/<pid>/smaps_rollup``.
      PSS (proportional set size) splits every shared page among the processes
      mapping it, so summed over the group each page counts once: a DataLoader's
      forked workers share their parent's copy-on-write pages, and RSS would count
      those once per process, tripping a limit the group never used. USS (private
      pages only) goes wrong the other way: right after a fork *all* of the parent's
      pages are shared, so a group of one parent and four forked children would sum
      to almost nothing. Swapped-out pages (their proportional share) count too,
      otherwise a leaking task under memory pressure would hide in swap.
    * **Elsewhere (macOS): RSS**, the only figure available without privileges. It
      overcounts pages shared within the group, so a limit trips early, never late.

    The members are found by scanning every pid's process group (a grandchild whose
    parent died is still in the group, but no longer anyone's descendant). Cost: one
    ``getpgid`` per pid on the machine, plus one read of smaps_rollup per member,
    which makes the kernel walk that process's page tables (a few hundred µs for a
    Python process); see ``benchmarks/memory_sampling.py``. Never raises: a process
    that vanishes or cannot be read is skipped.
    """
    try:
        members = group_members(pgid)
    except Exception:  # /proc unreadable for a moment: no sample, rather than no manager
        return 0
    total = 0
    for pid in members:
        try:
            total += process_memory(pid)
        except Exception:  # psutil.NoSuchProcess/AccessDenied, OSError: it is gone
            continue
    return total


def process_progress(pid: int) -> int:
    """One process's work so far, as one number that grows while it works: CPU clock
    ticks (utime+stime of itself, cutime+cstime of the children it reaped) plus the
    bytes it read and wrote (``rchar``+``wchar``, any fd: files, pipes, sockets).

    Linux: ``/proc/<pid>/stat`` fields 14-17 and ``/proc/<pid>/io`` (the latter needs
    the same user; without it, CPU alone). Elsewhere psutil's CPU times. Raises
    OSError (or psutil's errors) for a process that is gone.
    """
    if _platform.LINUX:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        # fields[0] is field 3 (state): utime..cstime are fields 14-17
        total = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        try:
            with open(f"/proc/{pid}/io", "rb") as f:
                for line in f.read().splitlines():
                    if line.startswith((b"rchar:", b"wchar:")):
                        total += int(line.split()[1])
        except PermissionError:
            pass
        return total
    import psutil

    times = psutil.Process(pid).cpu_times()
    return int((times.user + times.system + times.children_user + times.children_system) * 1e6)


def group_progress(pgid: int) -> int:
    """The sum of :func:`process_progress` over the group's members (zombies too:
    their counts move into their parent's only when reaped, so both are counted
    until then). Compare two readings for equality: a member leaving the group
    (reaped by a parent outside it) can make the sum smaller, which also is a
    change. Never raises. Cost: the member scan of :func:`group_members` plus two
    small reads per member (benchmarks/supervision_costs.py)."""
    try:
        members = group_members(pgid)
    except Exception:  # /proc unreadable for a moment
        return 0
    total = 0
    for pid in members:
        try:
            total += process_progress(pid)
        except Exception:  # gone, or not readable
            continue
    return total
