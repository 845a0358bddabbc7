"""The guardian: a watchdog process that kills every worker group if we die.

Why a separate process: when the parent is SIGKILLed (or OOM-killed, or calls
``os._exit``) nothing in it runs, and a worker cannot be trusted to notice: one stuck
in C code holding the GIL runs no Python watchdog, and ``PR_SET_PDEATHSIG`` would
kill the worker alone, not its group (nor exists on macOS). So one guardian per parent
process sits outside every worker group, reading a pipe whose *only* writer is the
parent. The kernel closes that write end when the parent dies, however it dies, and
the guardian's read returns EOF.

That EOF only comes if no other process holds a copy of the write end: it is
close-on-exec (workers started by ``posix_spawn`` never see it), a fork-started worker
closes it first thing, and ``os.register_at_fork`` closes it in any other child the
parent forks.

Over the pipe the parent tells the guardian which groups are live, ``+ pid
create_time grace`` and ``- pid``. At EOF the guardian SIGTERMs (and SIGCONTs) each
group, waits up to the grace period (at most one second), then SIGKILLs what is left.
Its lifetime: it starts with the first worker group registered and lives while any
manager thread of this process runs (``hold()``/``release()``) or any group is
registered: a worker template lingering for the next executor is one (see
``_template_pool``), so back-to-back executors share the guardian too. When the last
manager finishes with no group left registered (or the lingering template is closed
after it), the pipe is closed: the guardian reads EOF with nothing to kill, exits at
once and is reaped, so a process whose executors are all shut down has, a moment
later, no child and no fd of ours. The next executor's first worker starts a fresh
guardian.

It never signals a group blindly: a pgid is reused once its leader is reaped and its
members are gone, so it checks the leader is still the process it was told about (same
create time), and otherwise signals, one by one, only members that started after the
worker did.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from . import _platform

_MAX_GRACE = 1.0
_CHILD_FD = 3

#: Guards _state, _registry, _holds and _exiting. Lock order: it is always the
#: innermost lock. It is taken under a Manager's _lock (register/unregister from the
#: manager thread) and under an executor's _shutdown_lock (hold() from
#: Manager.start()), and nothing else is ever taken while it is held.
_lock = threading.Lock()
_state: dict[str, object] = {"pid": None, "owner": None, "wfd": None}
_registry: dict[int, tuple[float, float]] = {}
#: manager threads of this process that are running (hold() minus release())
_holds = 0
#: guardians we told to exit (pipe closed) but have not reaped yet
_exiting: list[int] = []
#: how long release() waits itself for a guardian told to exit, before a thread does
_QUICK_EXIT = 0.006


def _start_locked() -> None:
    """Spawn the guardian (its own group, stdin /dev/null, the pipe's read end at 3)."""
    r, w = os.pipe()
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    # A bare module stands in for the package, as in the workers' bootstrap
    # (_process.bootstrap_code): importing pgexecutor/__init__ (cloudpickle, psutil,
    # multiprocessing, ...) would cost every guardian start, and so every executor's
    # start and stop, ~0.1 s of CPU it never uses.
    code = (
        "import sys; "
        f"sys.path.insert(0, {os.path.dirname(pkg_dir)!r}); "
        "_pkg = type(sys)('pgexecutor'); "
        f"_pkg.__path__ = [{pkg_dir!r}]; "
        "sys.modules['pgexecutor'] = _pkg; "
        "from pgexecutor._guardian import guardian_main; guardian_main(); "
        "import os; os._exit(0)"
    )
    from . import _process  # the parent's side only: the guardian never imports it

    actions = _process.spawn_file_actions([r], [_CHILD_FD])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        pid = os.posix_spawn(
            sys.executable,
            # -S: no site processing (~20 ms of CPU here, in every executor's start,
            # competing with the first workers'); what it imports is found through
            # PYTHONPATH, our sys.path (psutil included), and the stdlib.
            [sys.executable, "-S", "-c", code],
            env,
            file_actions=actions,
            setpgroup=0,  # not in our group: a Ctrl-C to our terminal must spare it
            setsigmask=(),
        )
    finally:
        os.close(r)
    _state.update(pid=pid, owner=os.getpid(), wfd=w)
    for pgid, (ctime, grace) in _registry.items():
        _send_locked(f"+ {pgid} {ctime!r} {grace!r}\n")


def _send_locked(line: str) -> bool:
    wfd = _state["wfd"]
    if not isinstance(wfd, int):
        return False
    try:
        os.write(wfd, line.encode())  # < PIPE_BUF: atomic
        return True
    except OSError as exc:
        # logging imported here, not at the top: the guardian process imports this
        # module too, and logging (re, enum, traceback) was half its start.
        import logging

        logging.getLogger("pgexecutor").warning(
            "pgexecutor guardian is gone (%s); starting a new one", exc
        )
        _close_locked()
        return False


def _close_quietly(fd: object) -> None:
    if isinstance(fd, int):
        try:
            os.close(fd)
        except OSError:
            pass


def _close_locked() -> None:
    _close_quietly(_state["wfd"])
    pid = _state["pid"]
    if isinstance(pid, int) and _state["owner"] == os.getpid():
        _exiting.append(pid)  # our child: reaped now if it already exited, else later
        _reap_locked(pid)
    _state.update(pid=None, owner=None, wfd=None)


def _ensure_locked() -> None:
    if _state["owner"] != os.getpid() or _state["wfd"] is None:
        _start_locked()


def register(pgid: int, create_time: float, grace: float) -> None:
    """Tell the guardian a worker group exists (start the guardian if needed)."""
    with _lock:
        _registry[pgid] = (create_time, grace)
        _ensure_locked()
        if not _send_locked(f"+ {pgid} {create_time!r} {grace!r}\n"):
            _start_locked()  # replays the registry, this group included


def unregister(pgid: int) -> None:
    """The group is gone (its leader was reaped): the guardian must forget it."""
    with _lock:
        _registry.pop(pgid, None)
        if _state["owner"] == os.getpid():
            _send_locked(f"- {pgid}\n")


def hold() -> None:
    """A manager thread starts: keep the guardian (it starts at the first register)."""
    global _holds
    with _lock:
        _holds += 1
        _reap_exited_locked()


def release() -> None:
    """A manager thread ended: when it was the last one and no group is registered,
    the guardian ends (:func:`close_if_unused`)."""
    global _holds
    with _lock:
        _holds = max(0, _holds - 1)
    close_if_unused()


def close_if_unused() -> None:
    """With no manager thread running and no group registered (a lingering template
    is one: see _template_pool), close the guardian's pipe: it reads EOF, has
    nothing to kill, exits, and is reaped here, so nothing the library started
    outlives its last executor. The next executor's first worker starts a fresh
    guardian (register)."""
    with _lock:
        pid = _state["pid"]
        if _holds or _registry or not isinstance(pid, int) or _state["owner"] != os.getpid():
            return
        _close_locked()
        if pid not in _exiting:
            return  # it had exited already and was reaped just now
    # Usually it is idle in its read and exits within a few ms: reap it here, so that
    # no thread of ours outlives the shutdown.
    deadline = time.monotonic() + _QUICK_EXIT
    while time.monotonic() < deadline:
        time.sleep(0.002)
        with _lock:
            if pid not in _exiting or _reap_locked(pid):
                return
    # Reaped by a thread of its own, so that shutdown does not wait for it: a guardian
    # idle in its read exits within ms, but one still starting (an executor that lived
    # a few ms) must finish its interpreter's start-up (~0.1-0.2 s) before it reads
    # EOF. The thread blocks in waitpid() holding no lock and ends with the guardian.
    threading.Thread(
        target=_reap_when_gone, args=(pid,), name="pgexecutor-guardian-reaper", daemon=True
    ).start()


def _reap_when_gone(pid: int) -> None:
    """Wait for the guardian's exit without reaping it, then reap it under the lock:
    once reaped its pid may be recycled (a new worker, even), so the reap and the
    removal from ``_exiting`` must be one step for ``hold()``'s reaping too."""
    if _platform.HAS_WAITID:
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass  # reaped already (by hold(), or a waitpid(-1) of the program's)
        with _lock:
            if pid in _exiting:
                _reap_locked(pid)
        return
    delay = 0.001
    while True:
        with _lock:
            if pid not in _exiting or _reap_locked(pid):
                return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _reap_locked(pid: int) -> bool:
    """Reap an exiting guardian if it has exited; True once it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = pid  # someone reaped it for us (a waitpid(-1) of the program's)
    if done:
        _exiting.remove(pid)
        return True
    return False


def _reap_exited_locked() -> None:
    for pid in list(_exiting):
        _reap_locked(pid)


def guardian_pid() -> int | None:
    """The guardian's pid in this process, if one runs."""
    pid = _state["pid"]
    return pid if isinstance(pid, int) and _state["owner"] == os.getpid() else None


def _after_fork_in_child() -> None:
    # A forked child holding our write end would keep the guardian's EOF from ever
    # arriving. Drop it (the fd, not the guardian: it is the parent's).
    _close_quietly(_state["wfd"])
    _state.update(pid=None, owner=None, wfd=None)
    _registry.clear()
    global _lock, _holds
    _lock = threading.Lock()
    _holds = 0  # the parent's manager threads do not exist here
    _exiting.clear()  # the parent's children, not ours


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------- the guardian side


def _leader_state(pid: int, create_time: float) -> str:
    """"ours" (our worker, alive or an unreaped zombie), "stranger" (a newer process
    has the number), or "gone" (no process has it)."""
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.Error:
        return "stranger"  # cannot tell: do not touch it
    return "ours" if abs(started - create_time) < 0.05 else "stranger"


def _members_started_after(pgid: int, create_time: float) -> list[int]:
    """Members of ``pgid`` that started after the worker: the ones we may signal."""
    import psutil

    out = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
            if psutil.Process(pid).create_time() + 0.05 >= create_time:
                out.append(pid)
        except (OSError, psutil.Error):
            continue
    return out


def _our_members(pgid: int, create_time: float) -> list[int] | None:
    """The processes we may signal in group ``pgid``; None means "killpg is safe".

    POSIX rule that decides it: a pid number stays reserved as long as any process
    uses it as its pgid, so the number of a group with even one member left cannot be
    handed to a new process.
    - Leader alive (or an unreaped zombie) and it is our worker: the group is ours,
      signal it whole.
    - A process with that pid exists but started at another time: our group emptied
      at some point and the number was recycled. Everything in it is a stranger.
    - No process has that pid: our leader died and was reaped (by init, after the
      parent died). Its orphans still carry the pgid, and since they hold the number
      it cannot have been recycled while they live. Signal members one by one, and only
      those no older than our worker (a recycled group whose new leader also died
      before we looked is the one case this cannot tell apart).
    """
    state = _leader_state(pgid, create_time)
    if state == "ours":
        return None
    if state == "stranger":
        return []
    return _members_started_after(pgid, create_time)


def _signal_verified(pgid: int, create_time: float, sig: int) -> bool:
    """Signal the group if it is still ours; True if anything was signalled."""
    members = _our_members(pgid, create_time)
    if members is None:
        try:
            os.killpg(pgid, sig)
            return True
        except OSError:
            return False
    hit = False
    for pid in members:
        try:
            os.kill(pid, sig)
            hit = True
        except OSError:
            pass
    return hit


def signal_verified(pgid: int, create_time: float, sig: int) -> bool:
    """Signal a group whose leader may have been reaped by someone else (a template
    worker whose template died): killpg only if the leader is still the process that
    started at ``create_time``, else only the members no older than it."""
    return _signal_verified(pgid, create_time, sig)


def _group_alive(pgid: int, create_time: float) -> bool:
    import psutil

    members = _our_members(pgid, create_time)
    if members is None:
        members = _members_started_after(pgid, create_time)
    for pid in members:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            continue
    return False


def kill_groups(groups: dict[int, tuple[float, float]]) -> None:
    """SIGTERM + SIGCONT every group, wait out the grace, SIGKILL the rest."""
    if not groups:
        return
    grace = min(_MAX_GRACE, max((g for _, g in groups.values()), default=0.0))
    for pgid, (ctime, _) in groups.items():
        _signal_verified(pgid, ctime, signal.SIGTERM)
        _signal_verified(pgid, ctime, signal.SIGCONT)  # a stopped process ignores TERM
    deadline = time.monotonic() + grace
    pending = dict(groups)
    while pending and time.monotonic() < deadline:
        time.sleep(0.02)
        pending = {p: v for p, v in pending.items() if _group_alive(p, v[0])}
    for pgid, (ctime, _) in pending.items():
        _signal_verified(pgid, ctime, signal.SIGKILL)


def guardian_main(fd: int = _CHILD_FD) -> None:
    """Read registrations until EOF (the parent died or exited), then clean up."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # we must outlive the parent's dying moments
    import psutil  # noqa: F401  (imported now, so that the kill at EOF is quick)

    os.set_inheritable(fd, False)
    groups: dict[int, tuple[float, float]] = {}
    pending = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            parts = raw.decode().split()
            if not parts:
                continue
            if parts[0] == "+" and len(parts) == 4:
                groups[int(parts[1])] = (float(parts[2]), float(parts[3]))
            elif parts[0] == "-" and len(parts) == 2:
                groups.pop(int(parts[1]), None)
    kill_groups(groups)
