"""The worker's main loop. It runs in the child, as the leader of its own group.

A worker reads frames from the manager (INIT once, then TASKs, then EXIT), runs each
task in order, and writes one RESULT or ERROR frame per task, at once: the manager
infers when a task starts from when the previous result arrived, so a result must
never wait in a buffer while the next task runs.

The worker reads tasks ahead of time (the manager writes up to 64 tiny ones ahead),
but it runs one only after taking that task's permit from its permit pipe: the
manager takes back the permits of tasks still waiting behind one that turned out
long, and runs them elsewhere (see ``_claim`` and ``_process.permit_pipe``).
"""

from __future__ import annotations

import _signal
import atexit
import faulthandler
import os
import sys
import time as _time

from . import _heartbeat, _platform
from . import _protocol as proto
from ._protocol import (
    CHILD_DUMP_FD,
    CHILD_PERMIT_FD,
    CHILD_RESULT_FD,
    CHILD_SHM_FD,
    CHILD_TASK_FD,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # ``typing`` costs a worker start milliseconds; annotations only
    from typing import Any

#: Signal the manager sends to the worker (the leader only) to get a stack dump.
#: (``_signal``: ``signal`` would import ``enum`` into every worker.)
DUMP_SIGNAL = _signal.SIGUSR2
_monotonic = _time.monotonic

# SIGINT reaches a worker's group only from the pool (no terminal's Ctrl-C does: the
# worker leads a group of its own), when it stops a cancelled task. The task sees
# KeyboardInterrupt so its finally blocks run; then the worker exits instead of
# taking its next task (which the pool runs elsewhere). Outside a task the worker
# just exits: a KeyboardInterrupt in its own loop would print a traceback.
_in_task = False
_interrupted = False


def _on_interrupt(signum: int, frame: Any) -> None:
    global _interrupted
    _interrupted = True
    if _in_task:
        raise KeyboardInterrupt
    _exit_cleanly(0)


def main() -> None:
    """Entry point of a fresh-interpreter worker (pipes at fds 3, 4, 5 and 7; socket at 6)."""
    _complete_package_on_demand()
    # The parent passes a memfd channel exactly where memfds exist (_process._shm_channel).
    shm_fd = CHILD_SHM_FD if _platform.HAS_MEMFD else None
    _serve(CHILD_TASK_FD, CHILD_RESULT_FD, CHILD_DUMP_FD, CHILD_PERMIT_FD, shm_fd)


def _complete_package_on_demand() -> None:
    """Turn the bootstrap's bare ``pgexecutor`` module into the real package, lazily.

    The bootstrap (see ``_process.bootstrap_code``) skips ``pgexecutor/__init__.py``
    to start fast. A task may still use the package (a nested executor, an error
    class): the first lookup of a public name runs the real ``__init__`` in the bare
    module. Private names are refused, so that ``from pgexecutor import _x`` imports
    the submodule as usual without loading the rest.
    """
    pkg = sys.modules.get("pgexecutor")
    if pkg is None or hasattr(pkg, "__file__"):
        return  # the real package (started through multiprocessing)
    import _thread

    lock = _thread.allocate_lock()

    def __getattr__(name: str) -> Any:
        if name.startswith("_") and name not in ("__all__", "__version__"):
            raise AttributeError(f"module 'pgexecutor' has no attribute {name!r}")
        with lock:
            if "__getattr__" in vars(pkg):
                del pkg.__getattr__
                _run_package_init(pkg)
        return getattr(pkg, name)

    vars(pkg)["__getattr__"] = __getattr__


def _run_package_init(pkg: Any) -> None:
    import importlib.util

    init = os.path.join(pkg.__path__[0], "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "pgexecutor", init, submodule_search_locations=list(pkg.__path__)
    )
    assert spec is not None and spec.loader is not None
    pkg.__spec__, pkg.__file__, pkg.__loader__ = spec, init, spec.loader
    pkg.__package__ = "pgexecutor"
    spec.loader.exec_module(pkg)


def mp_main(
    task_conn: Any, result_conn: Any, dump_conn: Any, permit_conn: Any, close_fds: list[int]
) -> None:
    """Entry point of a worker started through a multiprocessing context."""
    try:
        os.setpgid(0, 0)  # the parent does it too; whoever is first wins
    except OSError:
        pass
    fds = (
        _take_fd(task_conn), _take_fd(result_conn), _take_fd(dump_conn), _take_fd(permit_conn)
    )
    # A fork copied every fd of the parent. The parent's ends of our own pipes come
    # in close_fds (at-fork hooks closed the rest: _process and _guardian).
    for fd in close_fds:
        if fd not in fds:
            try:
                os.close(fd)
            except OSError:
                pass
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _serve(*fds)


def _take_fd(conn: Any) -> int:
    """Own a Connection's fd without Connection closing it when collected.

    multiprocessing's Connection has no public detach(); its fd lives in ``_handle``
    (stable since 3.3). Fall back to a dup if that ever changes.
    """
    fd = getattr(conn, "_handle", None)
    if isinstance(fd, int):
        conn._handle = None
        return fd
    fd = os.dup(conn.fileno())
    conn.close()
    return fd


def _exit_cleanly(code: int = 0) -> None:
    """Exit without joining threads a task may have left behind (they would hang us)."""
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code)


def _apply_config(config: dict[str, Any]) -> None:
    """Make this interpreter see what the parent sees: its sys.path and its
    multiprocessing authkey (the working directory is inherited at spawn)."""
    parent_path = config.get("sys_path")
    if parent_path is not None:
        sys.path[:] = list(parent_path) + [p for p in sys.path if p not in parent_path]
    authkey = config.get("authkey")
    if authkey is not None:
        # Manager proxies passed as arguments authenticate with the parent's key.
        _give_multiprocessing_authkey(authkey)


def _give_multiprocessing_authkey(authkey: bytes) -> None:
    """Set multiprocessing's authkey to ``authkey`` whenever multiprocessing loads.

    Importing multiprocessing only to set its key would cost every worker start
    ~15 ms, and most tasks never use it. So the key is set right after the module
    that holds it executes: at once if it is loaded already, otherwise by a one-shot
    import hook (a task unpickling a Manager proxy, or importing multiprocessing).
    """
    loaded = sys.modules.get("multiprocessing.process")
    if loaded is not None:
        loaded.current_process().authkey = authkey
        return
    sys.meta_path.insert(0, _AuthkeyHook(authkey))


class _AuthkeyHook:
    """A meta path finder for ``multiprocessing.process`` alone; see above."""

    def __init__(self, authkey: bytes) -> None:
        self.authkey = authkey

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "multiprocessing.process":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _SetAuthkeyAfter(spec.loader, self.authkey)  # type: ignore[assignment]
        return spec


class _SetAuthkeyAfter:
    """Loader wrapper: run the real loader, then set the key on the new module."""

    def __init__(self, loader: Any, authkey: bytes) -> None:
        self.loader = loader
        self.authkey = authkey

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        module.current_process().authkey = self.authkey

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _Channel:
    """The worker's side of the pipes: blocking reads ahead, one write per result."""

    def __init__(self, rfd: int, wfd: int, shm_fd: int | None = None) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.shm_fd = shm_fd
        self.shm_sock: Any = None
        self.arena: Any = None  # an _arena.ArenaReader, made at the first TASK_SHM
        self.reader = proto.FrameReader()
        self.frames: list[tuple[int, int, bytes | bytearray]] = []
        self.pos = 0

    def next_frame(self) -> tuple[int, int, bytes | bytearray] | None:
        """The next frame from the manager; ``None`` at end of file."""
        while self.pos >= len(self.frames):
            frames = self.reader.read_from(self.rfd)
            if frames is None:
                return None
            self.frames = frames
            self.pos = 0
        item = self.frames[self.pos]
        self.frames[self.pos] = (0, 0, b"")  # drop our reference to the payload
        self.pos += 1
        return item

    def send(self, kind: int, ident: int, payload: bytes | proto.OOBPayload = b"") -> None:
        """One frame; an out-of-band payload goes out by writev from where it lies."""
        if isinstance(payload, proto.OOBPayload):
            header = proto.HEADER.pack(kind, ident, payload.size)
            proto.write_parts(self.wfd, [header, *payload.parts])
        elif len(payload) < 1 << 16:
            proto.write_all(self.wfd, proto.frame(kind, ident, payload))
        else:
            header, body = proto.frame_parts(kind, ident, payload)
            proto.write_parts(self.wfd, [header, body])


    def arena_args(self, payload: bytes | bytearray) -> tuple[memoryview, list[Any]]:
        """A TASK_SHM's pickle and its buffers: views of the argument arena."""
        if self.arena is None:
            if self.shm_sock is None:
                raise OSError("a TASK_SHM frame, but this worker has no fd channel")
            from ._arena import ArenaReader  # (only workers that get large arguments)

            self.arena = ArenaReader(self.shm_sock)
        return self.arena.take(payload)  # type: ignore[no-any-return]

    def arena_done(self, task_id: int, views: list[Any]) -> None:
        """The TASK_SHM task is over: release its views of the arena, or say
        RETAINED if it kept one (before its outcome: see _arena)."""
        if not self.arena.finish(views):
            self.send(proto.RETAINED, task_id)

    def encode_result(
        self, data: bytes | proto.OOBPayload, detach: bool
    ) -> tuple[int, bytes | proto.OOBPayload]:
        """A RESULT frame's (kind, payload): large buffers go to shared memory now
        (put_in_shm: a copy, its memfd sent ahead of the frame), others stay in the
        frame. ``detach``: the payload may not refer to the buffers any more (they may
        be views of the argument arena, released before the frame is sent): an
        out-of-band payload is joined into bytes."""
        if not isinstance(data, proto.OOBPayload):
            return proto.RESULT, data
        if self.shm_fd is not None and data.size >= proto.SHM_MIN:
            try:
                if self.shm_sock is None:
                    import _socket

                    self.shm_sock = _socket.socket(fileno=self.shm_fd)
                head = proto.put_in_shm(self.shm_sock, data)
            except OSError:
                self.shm_fd = None  # no memfds here after all: the pipe from now on
            else:
                return proto.RESULT_SHM, bytes(head)
        if detach:
            return proto.RESULT_OOB, b"".join(data.parts)
        return proto.RESULT_OOB, data


_SETSID_REFUSED = (
    "os.setsid() is refused in a pgexecutor worker: the worker leads its own process "
    "group (that is how the pool kills a task's whole process tree), and a process "
    "group leader cannot start a session. To run a program in a session of its own, "
    "start it with subprocess.Popen(..., start_new_session=True), or call os.setsid() "
    "in a child after os.fork(); such a process leaves the worker's group and is not "
    "killed with it (see README: the escape hatch)"
)


def _explain_setsid() -> None:
    """Make ``os.setsid()`` in the worker itself fail with a message that says why.

    Under ProcessPoolExecutor a worker is no group leader and setsid() works; here it
    is one (the whole design rests on that), and the kernel answers a bare EPERM that
    sends people looking in the wrong place. The error stays a PermissionError with
    errno EPERM; in any other process (a child the task forked) setsid() is the real
    one. (subprocess's start_new_session calls setsid() in C, untouched.)
    """
    real = os.setsid
    worker_pid = os.getpid()

    def setsid() -> None:
        if os.getpid() == worker_pid:
            raise PermissionError(1, _SETSID_REFUSED)  # 1: EPERM
        real()

    setsid.__doc__ = real.__doc__
    os.setsid = setsid


def _serve(
    rfd: int, wfd: int, dump_fd: int, permit_fd: int, shm_fd: int | None = None
) -> None:
    # Our pipes must not leak into programs a task execs (fork is another matter:
    # the manager never relies on EOF for that reason).
    for fd in (rfd, wfd, dump_fd, permit_fd) if shm_fd is None else (rfd, wfd, dump_fd, permit_fd, shm_fd):
        os.set_inheritable(fd, False)
    chan = _Channel(rfd, wfd, shm_fd)
    _explain_setsid()
    # A stack dump on demand, written by C code in the signal handler: it works even
    # while a task is stuck in C holding the GIL.
    faulthandler.register(DUMP_SIGNAL, file=dump_fd, all_threads=True, chain=False)

    first = chan.next_frame()
    if first is None or first[0] != proto.INIT:
        _exit_cleanly(0)
        return
    try:
        config = proto.loads(first[2])
        _apply_config(config)
        initializer = config.get("initializer")
        if initializer is not None:
            # The manager's initializer_timeout counts from here: the interpreter's
            # start (slow on a loaded machine) is not the initializer's time, but
            # unpickling it (which imports its module) is.
            chan.send(proto.INIT_BEGUN, os.getpid())
            initializer, initargs = proto.loads(initializer)
            initializer(*initargs)
    except BaseException as exc:
        summary = f"{type(exc).__name__}: {exc}"
        text = proto.format_exception_text(exc)
        chan.send(proto.INIT_FAILED, os.getpid(), proto.encode_init_failure(summary, text))
        _exit_cleanly(1)
        return
    del first, config, initializer
    if shm_fd is not None:
        import _socket

        chan.shm_sock = _socket.socket(fileno=shm_fd)
        _heartbeat.receive(chan.shm_sock)  # sent before INIT: it is there by now
    chan.send(proto.READY, os.getpid())

    global _in_task
    _signal.signal(_signal.SIGINT, _on_interrupt)
    held = -1  # a permit taken that belongs to a later task (see _claim)
    try:
        while not _interrupted:
            msg = chan.next_frame()
            if msg is None or msg[0] == proto.EXIT:
                break
            kind, task_id, payload = msg
            del msg
            if kind == proto.TASK or kind == proto.TASK_OOB:
                permit = task_id
            elif kind == proto.TASK_SHM:
                permit = _shm_permit(payload)  # the frame's own (see _arena.ArgArena.put)
            else:
                continue
            held = _claim(permit_fd, permit, held)
            if held == permit:
                held = -1
                _in_task = True
                _answer_one(chan, task_id, payload, kind)
                _in_task = False
            del payload
    except KeyboardInterrupt:
        if not _interrupted:
            raise
        # the pool's SIGINT outside the task's own code (sending its outcome, say)
    _exit_cleanly(0)


def _shm_permit(payload: bytes | bytearray) -> int:
    from ._arena import ArenaReader

    return ArenaReader.permit(payload)


def _claim(permit_fd: int, permit: int, held: int) -> int:
    """Take the next permit unless one is held already; returns the permit in hand.

    The task may run only if that permit is its own ``permit``: its task id, or for
    a TASK_SHM frame the frame's own number (see _arena.ArgArena.put). The manager
    writes each task's permit before the task, in the same order, and takes back
    every permit still in the pipe when it revokes the tasks waiting here (they run
    elsewhere). So no permit in the pipe, or another one (of a task sent after the
    revoke), means this task was taken back: skip it and keep that permit for its
    own task.
    """
    if held != -1:
        return held
    try:
        data = os.read(permit_fd, 8)
    except BlockingIOError:
        return -1
    return int.from_bytes(data, "little") if len(data) == 8 else -1


def _answer_one(chan: _Channel, task_id: int, payload: bytes | bytearray, kind: int) -> None:
    """Run one task and send exactly one RESULT or ERROR frame for it.

    A TASK_SHM task's arguments are views of the argument arena: once the task is
    over and nothing of it is left but its encoded outcome, they are released (or
    the task kept one: RETAINED), and only then is the outcome sent, after which the
    parent may write the region again (see _arena).
    """
    views: list[Any] = []
    kind, answer = _run_one(chan, task_id, payload, kind, views)
    if views:
        chan.arena_done(task_id, views)
    chan.send(kind, task_id, answer)


def _run_one(
    chan: _Channel, task_id: int, payload: bytes | bytearray, kind: int, views: list[Any]
) -> tuple[int, bytes | proto.OOBPayload]:
    """Run one task; its outcome frame's (kind, payload). ``views`` gets a TASK_SHM
    task's buffers (views of the argument arena).

    Arguments that fail to unpickle (or to be read from the arena), or a result that
    fails to pickle, fail this task alone with the exception raised, marked with its
    stage (see _protocol).
    """
    begun = _monotonic()
    try:
        if kind == proto.TASK:
            fn, args, kwargs = proto.loads(payload)
        elif kind == proto.TASK_OOB:
            fn, args, kwargs = proto.loads_oob(payload)
        else:  # TASK_SHM
            pickled, buffers = chan.arena_args(payload)
            views += buffers
            del buffers
            fn, args, kwargs = proto.loads(pickled, views)
            del pickled
    except BaseException as exc:
        return proto.ERROR, proto.dump_exception(exc, proto.UNPICKLE_ARGUMENTS)
    took = _monotonic() - begun
    if took > proto.SLOW_UNPICKLE:
        # Importing the task's module (the first task of its kind on a fresh worker:
        # a test module, torch, gmsh) is not the task's own time: the manager moves
        # its clock's start by this much. A hung import still times out: the clock
        # ran meanwhile.
        chan.send(proto.UNPICKLED, task_id, proto.SECONDS.pack(took))
    chunked = fn is run_chunk
    _heartbeat.task_id = task_id  # whose heartbeat() it is (see _heartbeat)
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        _heartbeat.task_id = 0
        del fn, args, kwargs
        return proto.ERROR, proto.dump_exception(exc)
    _heartbeat.task_id = 0
    del fn, args, kwargs
    data: bytes | proto.OOBPayload | None
    try:
        data = proto.dumps_result(result)
    except BaseException as exc:
        data = _pickle_chunk_items_apart(result) if chunked else None
        if data is None:
            return proto.ERROR, proto.dump_exception(exc, proto.PICKLE_RESULT)
    del result
    return chan.encode_result(data, detach=bool(views))


def _pickle_chunk_items_apart(out: Any) -> bytes | proto.OOBPayload | None:
    """A chunk's ``(values, errors)`` (see run_chunk) that failed to pickle as a whole:
    pickle each value alone, and fail only the items whose values do not pickle, each
    at its own position (as an item that raised does). None if even that fails.

    ProcessPoolExecutor fails the whole chunk here; so would we without this, and
    with ``return_exceptions=True`` every item of the chunk would be that error.
    """
    try:
        values, errors = out
        errors = dict(errors or {})
        kept = []
        for index, value in enumerate(values):
            if index not in errors:
                try:
                    proto.dumps_result(value)
                except BaseException as exc:
                    errors[index] = proto.dump_exception(exc, proto.PICKLE_RESULT)
                    value = None
            kept.append(value)
        return proto.dumps_result((kept, errors))
    except BaseException:
        return None


def run_chunk(
    fn: Any, chunk: list[Any], star: bool = True
) -> tuple[list[Any], dict[int, bytes] | None]:
    """Run ``fn`` over a chunk of argument tuples (``map`` with ``chunksize > 1``);
    with ``star=False`` each item is the one argument itself (a map over a single
    iterable: a chunk of plain values pickles and unpickles several times faster
    than one of 1-tuples).

    Returns ``(values, errors)``: one value per item (None where it raised) and, only
    if some item raised, ``{index: its encoded exception}``. Each item's exception is
    captured on its own, so ``map`` can yield the results before it and raise (or,
    with ``return_exceptions``, yield) the error in place; and a chunk without errors
    is one plain list, the cheapest thing to pickle and to iterate.

    Every BaseException is the item's own outcome, SystemExit and KeyboardInterrupt
    too: a worker leads its own process group, so no Ctrl-C of a terminal reaches it,
    and one item's ``sys.exit()`` must not fail the items after it.
    """
    values: list[Any] = []
    errors: dict[int, bytes] | None = None
    for args in chunk:
        try:
            values.append(fn(*args) if star else fn(args))
        except BaseException as exc:
            if _interrupted:
                raise  # the pool stops this chunk: no further item may start
            if errors is None:
                errors = {}
            errors[len(values)] = proto.dump_exception(exc)
            values.append(None)
    return values, errors
