"""The template (zygote): a single-threaded interpreter that forks workers on request.

Why: a fresh interpreter per worker costs tens of ms (seconds with torch imported),
and every crash, timeout and recycle pays it again. Forking the parent would be fast
but unsafe (its manager threads hold locks a fork copies held: DESIGN fact 7). A
template is a fresh interpreter of its own, started with ``posix_spawn`` like a fresh
worker, that imports the worker code and the ``preload`` modules once, stays
single-threaded, and forks a worker whenever the parent asks.

This module holds both sides; the template imports it through the same bare-package
bootstrap as a fresh worker (``_process.bootstrap_code``), so it imports little.

The hazards, and what answers each (DESIGN fact 14):

* **Group leadership.** The child calls ``setpgid(0, 0)`` and the template
  ``setpgid(pid, pid)``, as shells do: the group exists before the parent hears the
  pid. The template leads a group of its own (``setpgroup=0``), in no worker's.
* **A recycled pgid.** A forked worker is the *template's* child: the parent can
  watch it (``pidfd_open`` works for any pid) but cannot ``waitid`` it. So the
  template never reaps on its own (SIGCHLD stays at its default: zombies wait); the
  parent, once its pidfd says the worker died, asks for the exit status (``W``:
  ``waitid(WNOWAIT)``, the zombie stays), signals the group, and only then asks the
  template to reap (``R``). Until that request the pgid stays reserved.
* **What a worker must not inherit.** The child moves the pipe ends the parent
  passed (over ``SCM_RIGHTS``) to fds 3-7 (and the parent's current stdout and
  stderr to 1 and 2, as a fresh spawn would inherit them), closes every other fd above 2 (the
  template's control socket, whatever a preloaded module opened), gets stdin
  /dev/null from the template (which got it at its spawn), resets every signal's
  disposition to a fresh interpreter's and unblocks every signal, and reseeds
  ``random`` (and numpy's global generator, if loaded): forks of one template would
  otherwise all draw the same numbers. It takes the parent's working directory and
  environment as they are at the request (sent with it), as a fresh spawn would.
* **The template's death.** If it dies (a stray signal, the OOM killer), init reaps
  its zombies at once and their pgids may be recycled. The parent notices at its
  next request (EOF), marks that template's workers as orphans, whose groups are then
  signalled only after verifying their members (``_guardian.signal_verified``), and
  starts a new template for the next worker (logged at WARNING).
* **The parent's death.** The template is registered with the guardian like a worker
  group. It also exits at EOF of its control socket, whose only other end is the
  parent's (close-on-exec, and closed in every fork child of the parent).

Protocol (SOCK_SEQPACKET, one message per datagram; ``!cI`` = op + pid):
template -> parent first: ``b"OK"`` or ``b"ER" + text`` (a preload import failed).
``F`` + cwd/environ + fds: fork a worker; reply ``!i`` pid (or ``-errno``).
``M`` + fds, the last a memfd holding cwd/environ: the same, for a large environment.
``W pid``: exit status without reaping; reply ``!ii`` (1, code) or (0, 0) if alive.
``R pid``: reap; reply ``!ii`` (1, code).

Ownership: a :class:`Template` is shared by the executors of a process that start
workers from one (``_template_pool`` leases it out and keeps it a moment after the
last). Starts (fork, fork-ahead, readiness) are serialized by ``_process``'s
``_spawn_lock``; every request and reply pair, from any executor's manager thread,
holds the template's ``_lock``, so replies never go to the wrong asker.
"""

from __future__ import annotations

import os
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_REQ = struct.Struct("!cI")
_REPLY = struct.Struct("!ii")
_PID = struct.Struct("!i")
_CONTROL_FD = 3
_MAX_MSG = 1 << 16
_MAX_FORK_MSG = 1 << 20  # a fork request carries the cwd and environment
#: A cwd and environment larger than this travel in a memfd (request ``M``): one
#: datagram must fit the socket's send buffer (at most net.core.wmem_max, about
#: 208 KiB by default), or sendmsg fails with EMSGSIZE, while exec takes an
#: environment of several MiB.
_INLINE_WHERE = 32 << 10
_MAX_FDS = 10  # a fork request's fds: stdout, stderr, the worker's five, a memfd


class PreloadError(OSError):
    """A ``preload`` module failed to import in the template. An OSError with no
    errno, so the manager treats it as a start that will not succeed by waiting:
    the queued tasks fail with this text."""


class TemplateGone(OSError):
    """The template died (or its socket broke) during a request."""


# ---------------------------------------------------------------- the template side


def serve() -> None:
    """The template's main: preload, say so, then serve requests until EOF."""
    import _socket
    import fcntl
    import traceback

    # Our control socket must not sit where a worker's pipes go (3-7), and must not
    # leak into anything exec'd: move it up, close-on-exec.
    fd = fcntl.fcntl(_CONTROL_FD, fcntl.F_DUPFD_CLOEXEC, 16)
    os.close(_CONTROL_FD)
    sock = _socket.socket(fileno=fd)
    preload = [m for m in os.environ.pop("PGEXECUTOR_PRELOAD", "").split(",") if m]
    try:
        import pgexecutor._worker  # noqa: F401  (what every worker runs)

        for name in preload:
            try:
                __import__(name)
            except BaseException as exc:
                text = "".join(traceback.format_exception(exc))
                raise PreloadError(
                    f"preload module {name!r} failed to import in the template:\n{text}"
                ) from exc
    except BaseException as exc:
        try:
            sock.send(b"ER" + str(exc).encode("utf-8", "replace")[: _MAX_MSG - 16])
        finally:
            os._exit(1)
    try:
        sock.send(b"OK")
    except OSError:
        os._exit(0)  # the parent went away while we imported

    while True:
        try:
            msg, fds, _flags, _addr = _recv_fds(sock, fcntl)
        except InterruptedError:
            continue
        except OSError:
            break
        if not msg:
            break  # EOF: the parent closed us or died
        op, pid = _REQ.unpack(msg[: _REQ.size])
        if op == b"F":
            sock.send(_PID.pack(_fork_worker(fds, fcntl, msg[_REQ.size :])))
        elif op == b"M" and fds:
            where = _read_where(fds.pop())
            sock.send(_PID.pack(_fork_worker(fds, fcntl, where)))
        elif op == b"W":
            sock.send(_REPLY.pack(*_status(pid, reap=False)))
        elif op == b"R":
            sock.send(_REPLY.pack(*_status(pid, reap=True)))
        for fd in fds:
            os.close(fd)
    os._exit(0)


def _recv_fds(sock: Any, fcntl: Any) -> tuple[bytes, list[int], int, Any]:
    import _socket
    import array

    fds = array.array("i")
    msg, ancdata, flags, addr = sock.recvmsg(_MAX_FORK_MSG, _socket.CMSG_SPACE(_MAX_FDS * fds.itemsize))
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return msg, list(fds), flags, addr


def _read_where(fd: int) -> bytes:
    """An ``M`` request's cwd and environment, from the memfd that came with it."""
    try:
        parts, offset = [], 0
        while chunk := os.pread(fd, 1 << 20, offset):
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def fork_request(where: bytes, fds: list[int]) -> tuple[bytes, list[int], int | None]:
    """A fork request's datagram and fds: ``F`` with ``where`` inline, or ``M``
    with ``where`` in a memfd appended to the fds (see ``_INLINE_WHERE``); the
    memfd, if any, is the caller's to close once the request was sent."""
    if len(where) <= _INLINE_WHERE:
        return _REQ.pack(b"F", 0) + where, fds, None
    fd = os.memfd_create("pgexecutor-environ", os.MFD_CLOEXEC)
    try:
        view = memoryview(where)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return _REQ.pack(b"M", 0), fds + [fd], fd


def _status(pid: int, reap: bool) -> tuple[int, int]:
    try:
        if reap:
            _, status = os.waitpid(pid, 0)
            return 1, os.waitstatus_to_exitcode(status)
        res = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return 1, 0
    if res is None:
        return 0, 0
    if res.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return 1, -res.si_status
    return 1, res.si_status


def _fork_worker(fds: list[int], fcntl: Any, where: bytes) -> int:
    try:
        pid = os.fork()
    except OSError as exc:
        return -(exc.errno or 1)
    if pid == 0:
        try:
            _become_worker(fds, fcntl, where)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(70)
    try:
        os.setpgid(pid, pid)  # as shells do; the child does it too, first one wins
    except OSError:
        pass  # it already exec'd a program, or died: its own setpgid ran first
    return pid


def _become_worker(fds: list[int], fcntl: Any, where: bytes) -> None:
    """In the forked child: own group, own fds only, fresh signals and seeds, serve."""
    import _signal

    os.setpgid(0, 0)
    _take_cwd_and_environ(where)
    from pgexecutor._protocol import (
        CHILD_DUMP_FD,
        CHILD_PERMIT_FD,
        CHILD_RESULT_FD,
        CHILD_SHM_FD,
        CHILD_TASK_FD,
    )

    # The parent sends its stdout and stderr first (a fresh spawn inherits them as
    # they are now; the template's may be older), then the worker's pipes.
    targets = [1, 2, CHILD_TASK_FD, CHILD_RESULT_FD, CHILD_DUMP_FD, CHILD_PERMIT_FD, CHILD_SHM_FD]
    top = max(targets) + 1
    # Copy every source above the targets first, so that no dup2 overwrites a source.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, top) for fd in fds]
    for fd, target in zip(high, targets, strict=False):
        os.dup2(fd, target)  # clears close-on-exec on the copy: _serve sets it again
    os.closerange(top, _max_fd())  # every fd we do not own: no other worker's, no socket's
    # Signals as a fresh interpreter has them: defaults, Python's SIGINT handler,
    # SIGPIPE and SIGXFSZ ignored; nothing blocked (the mask survives fork).
    for sig in range(1, _signal.NSIG):
        if sig in (_signal.SIGKILL, _signal.SIGSTOP):
            continue
        try:
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
    if hasattr(_signal, "SIGXFSZ"):
        _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
    _reseed()
    from pgexecutor._worker import main

    main()


def pack_cwd_and_environ() -> bytes:
    """The parent's working directory and environment now, as a fresh worker would
    inherit them at its spawn (a template started earlier may have older ones).

    A working directory that was removed has no path to send (getcwd fails with
    ENOENT): the worker then keeps the template's, where a fresh spawn would have
    inherited the removed one; either way no path leads there any more."""
    try:
        cwd = os.getcwdb()
    except OSError:
        cwd = b""  # the worker's chdir(b"") fails and it stays where it is
    items = [cwd] + [k + b"=" + v for k, v in os.environb.items()]
    return b"\0".join(items)


def _take_cwd_and_environ(where: bytes) -> None:
    if not where:
        return
    cwd, *items = where.split(b"\0")
    try:
        os.chdir(cwd)
    except OSError:
        pass  # removed since: stay in the template's, as a spawn would have failed
    env = dict(item.split(b"=", 1) for item in items if b"=" in item)
    os.environb.clear()  # through os.environ: putenv/unsetenv follow
    os.environb.update(env)


def _std_fds() -> tuple[list[int], list[int]]:
    """Our fds 1 and 2 to pass to a worker, and the ones opened for it: a closed one
    (a daemon's) is passed as /dev/null, since a fd that is not open cannot travel."""
    out, opened = [], []
    for fd in (1, 2):
        try:
            os.fstat(fd)
            out.append(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            opened.append(null)
            out.append(null)
    return out, opened


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (OSError, ValueError):
        return 1 << 16


def _reseed() -> None:
    rnd = sys.modules.get("random")
    if rnd is not None:
        rnd.seed()
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        try:
            np_random.seed()
        except Exception:
            pass


# ---------------------------------------------------------------- the parent side


class Template:
    """The parent's handle on one template process (see the module docstring)."""

    def __init__(self, python: str, preload: tuple[str, ...]) -> None:
        import threading

        self.python = python
        self.preload = preload
        self.pid: int | None = None
        self.create_time = 0.0
        self.sock: Any = None
        self.failed: PreloadError | None = None  # a preload that failed stays failed
        self.ready = False  # it said "OK" (preloaded)
        self.generation = 0  # processes started so far: tells a worker's parent apart
        # A fork asked for ahead of need (the standby, see _process): its reply (the
        # pid, or -errno) is read later, before any other reply (the socket keeps
        # replies in request order).
        self._ahead = False  # a fork-ahead request was sent and not yet collected
        self._ahead_reply: int | None = None  # its reply, once read
        self._lock = threading.Lock()

    # The parent starts it, lazily: at the first worker.
    def start(self) -> None:
        import socket

        from . import _guardian, _process

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PGEXECUTOR_PRELOAD"] = ",".join(self.preload)
        code = _process.bootstrap_code("pgexecutor._template", "serve", sys.path)
        try:
            actions = _process.spawn_file_actions([child.fileno()], [_CONTROL_FD])
            import signal

            pid = os.posix_spawn(
                self.python, _process.bootstrap_argv(self.python, code), env,
                file_actions=actions,
                setpgroup=0,  # a group of its own: in no worker's, not in ours
                setsigmask=(),
                setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE),
            )
        except BaseException:
            parent.close()
            child.close()
            raise
        child.close()
        self.pid = pid
        self.sock = parent
        _process.mark_parent_only(parent.fileno())
        _process.record_group(pid)
        self.create_time = _process.process_create_time(pid)
        self.generation += 1
        try:
            # Our child, in a group of its own: the guardian kills it with the workers
            # if we die (it also exits at EOF of its socket).
            _guardian.register(pid, self.create_time, 0.0)
        except OSError:
            self.close()
            raise

    def _await_ready(self) -> None:
        """The template's first message: preloaded, or why not."""
        msg = self.sock.recv(_MAX_MSG)
        if msg == b"OK":
            self.ready = True
            return
        if msg.startswith(b"ER"):
            self.failed = PreloadError(msg[2:].decode("utf-8", "replace"))
            self.close()
            raise self.failed
        self.close()
        raise TemplateGone(0, "the template exited before it was ready")

    def ready_now(self) -> bool:
        """Has the template said it is ready (without waiting)? Raises OSError if it
        said it cannot be (a preload failed) or died."""
        if self.ready:
            return True
        import select

        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        if not poller.poll(0):
            return False
        self._await_ready()
        return True


    def alive(self) -> bool:
        """Whether the template process runs (not yet exited): one waitid, no reap."""
        pid = self.pid
        if pid is None:
            return False
        try:
            return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def _ensure(self) -> bool:
        """Start the template if none runs; True if a new one was started."""
        if self.failed is not None:
            raise self.failed
        if self.sock is not None:
            return False
        self.start()
        return True

    def _request(self, op: bytes, pid: int, fds: list[int] | None = None, size: int = 8) -> bytes:
        memfd = None
        if op == b"F":  # (an OSError here, fds short, is no death of the template)
            data, fds, memfd = fork_request(pack_cwd_and_environ(), fds or [])
        else:
            data = _REQ.pack(op, pid)
        try:
            reply = self._exchange(data, fds or [], size)
        finally:
            if memfd is not None:
                os.close(memfd)
        if len(reply) != size:
            self._lost("end of file")
            raise TemplateGone(0, "the template died")
        return reply

    def _exchange(self, data: bytes, fds: list[int], size: int) -> bytes:
        """Send one request, return its reply; a broken socket is the template's death."""
        import socket

        try:
            if not self.ready:
                self._await_ready()
            self._settle_ahead()
            if fds:
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
            else:
                self.sock.send(data)
            reply: bytes = self.sock.recv(size)
            return reply
        except (PreloadError, TemplateGone):
            raise
        except OSError as exc:
            self._lost(str(exc))
            raise TemplateGone(0, f"the template died ({exc})") from exc

    def _settle_ahead(self) -> None:
        """Read a fork-ahead's reply if it is due, so the next reply is the next
        request's. Raises OSError (the caller's handling applies)."""
        if self._ahead and self._ahead_reply is None:
            reply = self.sock.recv(_PID.size)
            if len(reply) != _PID.size:
                raise OSError("end of file")
            (self._ahead_reply,) = _PID.unpack(reply)

    def fork_ahead(self, fds: list[int], where: bytes) -> bool:
        """Ask for a worker now and collect its pid later (:meth:`collect_ahead`): the
        fork runs in the template while the parent goes on. Only on a ready template
        with no fork-ahead outstanding; False if none was asked for. The fds travel
        with the request (SCM_RIGHTS copies them at send): the caller may close its
        copies at once. ``where``: pack_cwd_and_environ() of the moment (the caller
        keeps it to tell whether they changed by the hand-over)."""
        import socket

        with self._lock:
            if self.sock is None or not self.ready or self._ahead:
                return False
            std, opened = _std_fds()
            try:
                data, all_fds, memfd = fork_request(where, std + fds)
                if memfd is not None:
                    opened.append(memfd)
                self.sock.sendmsg(
                    [data],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(all_fds)}i", *all_fds))],
                )
            except OSError as exc:
                self._lost(str(exc))
                return False
            finally:
                for fd in opened:
                    os.close(fd)
            self._ahead = True
            self._ahead_reply = None
            return True

    def collect_ahead(self, generation: int) -> int:
        """The pid of the worker :meth:`fork_ahead` asked for (waits for the fork if
        it is still under way). Raises TemplateGone if that template is gone (its
        child, if any, sees EOF on its task pipe once the caller closes it, and
        exits), OSError if the fork failed."""
        with self._lock:
            if not self._ahead or self.sock is None or self.generation != generation:
                raise TemplateGone(0, "the template that forked ahead is gone")
            try:
                self._settle_ahead()
            except OSError as exc:
                self._lost(str(exc))
                raise TemplateGone(0, f"the template died ({exc})") from exc
            pid = self._ahead_reply
            self._ahead = False
            self._ahead_reply = None
            assert pid is not None
            if pid < 0:
                raise OSError(-pid, os.strerror(-pid))
            return pid

    def _lost(self, why: str) -> None:
        """The template died under a request: say so, reap it; the next fork starts
        a new one. Its live workers go on (they are orphans now: see _process)."""
        import logging

        logging.getLogger("pgexecutor").warning(
            "the worker template (pid %s) died (%s); the next worker comes from a new one",
            self.pid, why,
        )
        self.close()

    def fork(self, fds: list[int]) -> int:
        """Fork a worker that gets our stdout and stderr at 1 and 2 and ``fds`` at
        3, 4, 5, 7, 6 (see _protocol); its pid. Raises OSError."""
        std, opened = _std_fds()
        try:
            return self._fork(std + fds)
        finally:
            for fd in opened:
                os.close(fd)

    def _fork(self, fds: list[int]) -> int:
        with self._lock:
            for attempt in range(2):
                fresh = self._ensure()
                try:
                    (pid,) = _PID.unpack(self._request(b"F", 0, fds, _PID.size))
                except TemplateGone:
                    if fresh or attempt:
                        raise
                    continue  # it died since the last request (logged): a new one
                if pid < 0:
                    raise OSError(-pid, os.strerror(-pid))
                return pid
        raise TemplateGone(0, "the template died")

    def status(self, pid: int, reap: bool) -> tuple[bool, int | None]:
        """``(dead, exitcode)`` of a worker it forked; with ``reap`` the zombie goes.
        Raises TemplateGone if the template died (its zombies were reaped by init)."""
        with self._lock:
            if self.sock is None:
                raise TemplateGone(0, "the template died")
            dead, code = _REPLY.unpack(self._request(b"R" if reap else b"W", pid))
            return bool(dead), code

    def close(self) -> None:
        """Close the control socket (the template exits at EOF) and reap it."""
        from . import _guardian, _process

        sock, pid, ready = self.sock, self.pid, self.ready
        self.sock = None
        self.pid = None
        self.ready = False
        self._ahead = False  # an uncollected fork-ahead's child exits at EOF (see _process)
        self._ahead_reply = None
        if pid is not None and not ready:
            # Still importing (an executor that lived a few ms): it has forked no
            # worker yet, and it is our unreaped child leading its own group, so
            # killing that group is safe and spares shutdown the wait for its imports.
            try:
                os.killpg(pid, 9)
            except OSError:
                pass
        if sock is not None:
            _process.unmark_parent_only(sock.fileno())
            sock.close()
        if pid is None:
            return
        _guardian.unregister(pid)
        import time

        deadline = time.monotonic() + 2.0
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            if time.monotonic() > deadline:
                # Still running (stuck in a preload import?): it is our unreaped
                # child, so its pgid is ours to kill.
                try:
                    os.killpg(pid, 9)
                except OSError:
                    pass
                os.waitpid(pid, 0)
                return
            time.sleep(0.001)


class TemplateStart:
    """The start method ``mp_context="template"``: workers forked from a template.

    One per executor; it leases the shared :class:`Template` at the first worker
    (``_template_pool``) and gives it back at shutdown (``_process.close_start``).
    """

    def __init__(self, preload: tuple[str, ...] = (), eager: bool = True, first_fresh: int = 0) -> None:
        self.preload = preload
        #: not eager: this many first workers start fresh, with no template at all. A
        #: pool's first workers start at once, and a template starting beside them
        #: competes for the CPUs (2-worker startup: ~50 -> ~90 ms measured); only
        #: replacements (crashes, timeouts, recycling) need it.
        self.first_fresh = first_fresh
        self.spawns = 0
        #: False (the default start, nothing to preload): workers start as fresh
        #: interpreters until the template is ready, and for good if it cannot start.
        self.eager = eager
        self.broken = False
        self.template: Template | None = None
        #: the worker forked ahead of need (a _process.Standby), or None; used by
        #: _process alone, from the executor's manager thread
        self.standby: Any = None

    @staticmethod
    def get_start_method() -> str:
        return "template"

    @staticmethod
    def usable() -> bool:
        """Only with pidfds: the parent must watch processes that are not its
        children (elsewhere each worker is a fresh interpreter, as by default)."""
        from . import _platform

        return bool(_platform.USE_PIDFD)

    def ready_template(self, python: str) -> Template | None:
        """The template to fork from, or None: start a fresh interpreter instead.

        Eager (a preload, or ``mp_context="template"``): always the template, started
        and waited for here. Otherwise a template that is up already (shared with
        another executor, or lingering after one: ``_template_pool``) serves from
        the first worker on; if none is, the pool's first workers start fresh
        (see ``first_fresh``), the first replacement starts one (as does the
        shutdown: :meth:`warm`), and until it is ready a fresh worker is as good
        as a forked one: start it, go on without it, use it once it said it is
        ready.
        A template that cannot start (a broken interpreter, say) is given up for
        good, with a warning: the pool runs on fresh interpreters.
        """
        if self.broken:
            return None
        self.spawns += 1
        if self.eager:
            return self.template_for(python)
        template = self.template_for(python)
        try:
            if template.sock is None:
                if self.spawns <= self.first_fresh:
                    return None
                template.start()
            if template.ready_now():
                return template
        except OSError as exc:
            self._give_up(exc)
        return None

    def warm(self, python: str) -> None:
        """The executor shuts down: start the template now if none runs (in the
        background: nothing waits for it, and it lingers, see ``_template_pool``),
        so that the next executor's first workers are forks instead of fresh
        interpreters. Not while the pool works: its imports (a fresh interpreter's
        start, tens of ms of CPU) would compete with the tasks, and a latency
        measured then would show it."""
        if self.broken or self.eager:
            return
        template = self.template_for(python)
        try:
            if template.sock is None:
                template.start()
        except OSError as exc:
            self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        import logging

        logging.getLogger("pgexecutor").warning(
            "could not start the worker template (%s); workers start as fresh "
            "interpreters", exc,
        )
        self.broken = True
        self.close()

    def template_for(self, python: str) -> Template:
        """This executor's lease of the shared template for ``python``."""
        from . import _template_pool

        if self.template is None or self.template.python != python:
            self.close()
            self.template = _template_pool.lease(python, self.preload)
        return self.template

    def close(self) -> None:
        """Give the template back (it lingers for the next executor)."""
        from . import _template_pool

        template, self.template = self.template, None
        if template is not None:
            _template_pool.give_back(template)
