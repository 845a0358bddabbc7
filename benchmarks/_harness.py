"""What the benchmark drivers share to run each pool in a child process of its own.

A pool under test may hang, break, or leave processes behind. Each driver
(``bench.py``, ``replacement.py``, ``soak.py``) therefore runs one pool per child
process and, after the child, cleans up only what that child started:

* ``set_subreaper`` makes the driver a child subreaper (``PR_SET_CHILD_SUBREAPER``),
  so processes a finished child leaves behind (orphans whose parent died) are
  re-parented to the driver instead of init, where ``reap_strays`` finds them;
* ``parse_peers`` reads the ``--peers`` option;
* ``call_bounded`` bounds a call that may hang (a broken pool's shutdown);
* ``run_capped`` starts a child in a session of its own and, when it outruns its
  limit, kills that session's process group: a pgid this call created, never a
  process found by name;
* ``compile_sources`` writes the bytecode of pgexecutor and of the benchmarks'
  task modules, as installing a package does.

No state: each function acts on the calling process and its descendants only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_PR_SET_CHILD_SUBREAPER = 36


def compile_sources() -> None:
    """Write the ``.pyc`` files of pgexecutor and ``benchmarks/``, as pip does when it
    installs a package (the peers' were written so).

    A checkout installed in editable mode has none until an interpreter writes them,
    and under ``PYTHONDONTWRITEBYTECODE=1`` (set on the machine these figures come
    from) none ever does: every fresh worker would compile each module it imports
    again, some 15 ms that no installed copy pays.
    """
    import compileall

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for sub in ("pgexecutor", "benchmarks"):
        compileall.compile_dir(os.path.join(root, sub), quiet=1)


def parse_peers(text: str | None, known: list[str]) -> list[str]:
    """The ``--peers NAME,...`` option: ``known`` (in its order) when not given; exits
    with the list of choices on an unknown name."""
    if not text:
        return list(known)
    peers = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in peers if p not in known]
    if bad:
        sys.exit(f"unknown peer(s) {bad}; choose from {','.join(known)}")
    return peers


def set_subreaper() -> bool:
    """Make this process a child subreaper (Linux); False where that is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except Exception:  # noqa: BLE001 - not Linux, or no libc: the caller says so
        return False


def reap_strays(linger: float) -> list[str]:
    """Processes our finished children left behind (we are a subreaper): give them
    ``linger`` seconds to exit on their own (a helper that notices its parent is gone,
    such as pgexecutor's guardian or multiprocessing's resource tracker, needs a few
    ms), then kill and reap the rest. Returns a description of each one killed.

    Every process found here descends from this process, so only what we started
    is ever signalled."""
    killed = []
    try:
        import psutil

        procs = psutil.Process().children(recursive=True)
        _, alive = psutil.wait_procs(procs, timeout=linger)
        for p in alive:
            try:
                killed.append("pid %d %s" % (p.pid, " ".join(p.cmdline())[:120]))
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
    except ImportError:
        pass
    while True:  # zombies re-parented to us: reap them, or they stay until we exit
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    return killed


def call_bounded(fn: Callable[[], object], limit: float) -> bool:
    """Call ``fn`` in a daemon thread; whether it returned (or raised) within ``limit`` s.
    For a pool's shutdown, which hangs in some peers once the pool is broken: the
    child carries on (and exits with ``os._exit`` if such a thread is left)."""
    def call() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - a broken pool's shutdown may raise; it returned
            pass

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(limit)
    return not t.is_alive()


@dataclass
class CappedRun:
    """How one child went: its exit status (None if it outran its limit and was
    killed), its stdout, and the stray processes killed after it."""

    returncode: int | None
    stdout: str
    strays: list[str] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_capped(
    cmd: list[str], limit: float, linger: float = 1.0, before_reap: Callable[[], None] | None = None
) -> CappedRun:
    """Run ``cmd`` (its stderr passes through) in a new session for at most ``limit``
    seconds. On timeout, SIGKILL the session's process group (the child and every
    worker that stayed in it); then call ``before_reap`` (to count what is left),
    and, if this process is a subreaper, reap the processes that left the group
    (workers that lead their own) via ``reap_strays``."""
    # stdout goes to a file, not a pipe: the pool's workers inherit it, and a pipe
    # would not reach EOF while one of them (a hung or leaked worker) still lives.
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(cmd, stdout=out, text=True, start_new_session=True)
        try:
            rc: int | None = child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            # The group this call created (start_new_session): the child leads it.
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            rc = None
        out.seek(0)
        text = out.read()
    if before_reap is not None:
        before_reap()
    return CappedRun(rc, text, reap_strays(linger))
