"""Native stacks of a hung worker, taken with py-spy (``native_stacks=True``, the
``[native]`` extra): the C/C++ frames under the Python ones, so a user sees the
function a mesher was stuck in.

``py-spy dump --native --pid P`` reads the worker's memory with ptrace. It needs the
right to trace the worker: root or CAP_SYS_PTRACE; otherwise the same user, and
Yama's ``kernel.yama.ptrace_scope`` at 0 (at 1, only an ancestor may trace, and
py-spy, a child of the parent like the worker, is its sibling); containers often
forbid ptrace altogether (seccomp, no CAP_SYS_PTRACE). Where it is refused the
error carries the Python dump alone and the log says why, once per executor.

A dump takes ~50-200 ms (py-spy reads the symbols of every loaded library), so it is
started ahead of a known deadline (see ``_supervision.Watch``) and, at the kill,
waited for at most NATIVE_WAIT: the future fails within 200 ms of its deadline.
The worker (the group's leader) is dumped, and up to MEMBERS other live processes
of its group (a DataLoader's workers, a subprocess: the ones that are Python or have
symbols say where they are; the others are left out). Owner: the manager thread.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import subprocess
import time

from . import _process

logger = logging.getLogger("pgexecutor")

#: At the kill, how long to wait at most for a dump that is still running.
NATIVE_WAIT = 0.15
#: Other members of the worker's group dumped besides the worker (at most).
MEMBERS = 3


def find_py_spy() -> str | None:
    """The py-spy executable: on PATH, or installed with the py-spy package (a
    virtual environment's bin directory need not be on PATH)."""
    found = shutil.which("py-spy")
    if found:
        return found
    try:
        dist = importlib.metadata.distribution("py-spy")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "py-spy":
            path = str(dist.locate_file(file))
            if os.access(path, os.X_OK):
                return path
    return None


class NativeDump:
    """One ``py-spy dump --native`` of a worker, running in the background."""

    __slots__ = ("proc", "pid")

    def __init__(self, exe: str, pid: int) -> None:
        self.pid = pid
        self.proc = subprocess.Popen(
            [exe, "dump", "--native", "--pid", str(pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def result(self, wait: float) -> tuple[str | None, str | None, bool]:
        """(the dump, None, False) or (None, why there is none, whether it was only
        late), waiting at most ``wait`` seconds for py-spy to finish; py-spy is then
        killed and reaped either way."""
        try:
            out, err = self.proc.communicate(timeout=max(0.0, wait))
        except subprocess.TimeoutExpired:
            self.discard()
            return None, "py-spy had not finished by the kill", True
        if self.proc.returncode != 0:
            text = err.decode("utf-8", "replace").strip().splitlines()
            why = f"py-spy failed (exit {self.proc.returncode}): {text[-1] if text else ''}"
            return None, why, False
        return out.decode("utf-8", "replace").strip() or None, None, False

    def discard(self) -> None:
        """Stop it (the task ended before its kill, or it took too long); reap it."""
        if self.proc.poll() is None:
            self.proc.kill()  # its ptrace attachment ends with it
        try:
            self.proc.communicate(timeout=5.0)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            pass


def start(exe: str, pid: int) -> list[NativeDump]:
    """Dumps of worker ``pid`` (first) and of up to MEMBERS other live members of its
    group, all running at once. Raises OSError if the worker's cannot start."""
    dumps = [NativeDump(exe, pid)]
    try:
        others = _process.live_members(pid, exclude=pid)[:MEMBERS]
    except Exception:  # /proc unreadable for a moment: the worker's alone
        others = []
    for member in others:
        try:
            dumps.append(NativeDump(exe, member))
        except OSError:
            break
    return dumps


def take(
    dumps: list[NativeDump] | None, exe: str, pid: int, since: float
) -> tuple[str | None, str | None, bool]:
    """The native stacks for a kill decided at ``since``: of the dumps started
    earlier, or started now, waited for until NATIVE_WAIT after ``since``.

    Returns (text, None, False): the worker's dump, then each other member's that
    succeeded under a ``--- group member pid N ---`` line; or (None, why, late) when
    the worker's failed (``late``: it was only not done in time)."""
    try:
        if not dumps:
            dumps = start(exe, pid)
    except OSError as exc:
        return None, f"py-spy could not start: {exc}", False
    text, why, late = dumps[0].result(NATIVE_WAIT - (time.monotonic() - since))
    for dump in dumps[1:]:
        member, _, _ = dump.result(NATIVE_WAIT - (time.monotonic() - since))
        if text is not None and member is not None:
            text += f"\n\n--- group member pid {dump.pid} ---\n{member}"
    return text, why, late


def discard(dumps: list[NativeDump] | None) -> None:
    for dump in dumps or ():
        dump.discard()
