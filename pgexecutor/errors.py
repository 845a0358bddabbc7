"""The errors a user of :class:`~pgexecutor.ProcessGroupExecutor` can see.

They subclass the standard library's exceptions on purpose, so that code written for
``ProcessPoolExecutor`` keeps catching them: a timeout is a
``concurrent.futures.TimeoutError`` and a dead worker is a ``BrokenProcessPool``.
Unlike ``ProcessPoolExecutor``, the pool is *not* broken afterwards: only the one
future fails and a fresh worker takes the dead one's place.

Pickling faults have no class of their own, for the same reason: an argument or a
result that fails to pickle or unpickle fails its future with the exception pickle
raised, which is what ``ProcessPoolExecutor`` raises, marked with
``exc.pgexecutor_stage`` (a key of :data:`PICKLING_STAGES`) and a note. Only when
that exception cannot travel from the worker either is it a :class:`TaskPicklingError`.
"""

from __future__ import annotations

from concurrent.futures import TimeoutError as _FuturesTimeoutError
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "TaskTimeoutError",
    "WorkerCrashedError",
    "MemoryLimitError",
    "WorkerInitializerError",
    "RemoteTaskError",
    "TaskPicklingError",
]


def _innermost_frame(stack: str | None) -> str | None:
    """Return the innermost ``File "...", line N in f`` line of the task's thread.

    faulthandler dumps every thread ("Thread 0x... (most recent call first):" blocks,
    innermost frame on top). The thread that ran the task is the one whose outermost
    frames are the worker's main loop (``pgexecutor/_worker.py``); the "Current
    thread" is merely whichever thread caught the dump signal, and helper threads (a
    DataLoader's pin-memory thread, say) would name the wrong place.
    """
    if not stack:
        return None
    blocks = [b for b in stack.split("\n\n") if "most recent call first" in b]
    chosen = (
        next((b for b in blocks if "_worker.py" in b), None)
        or next((b for b in blocks if "Current thread" in b), None)
        or (blocks[0] if blocks else None)
    )
    if chosen is None:
        return None
    frames = [ln.strip() for ln in chosen.splitlines() if ln.strip().startswith("File ")]
    if not frames:
        return None
    innermost = frames[0]
    if _is_library_frame(innermost):
        # Stuck in the standard library or a package (a wait, gmsh's generate): also
        # name the user's own line that called into it.
        caller = next((f for f in frames[1:] if not _is_library_frame(f)), None)
        if caller is not None:
            return f"{innermost}, called from {_with_source(caller)}"
    return _with_source(innermost)


#: Runtime libraries a native frame is rarely *about* (an allocation, a thread pool,
#: the libffi call into the library): the innermost frame elsewhere is named instead.
_RUNTIME_LIBRARIES = ("libc.so", "libstdc++", "libgomp", "libpthread", "libffi", "ld-linux", "libm.so", "libgcc")


def _innermost_native_frame(dump: str | None) -> str | None:
    """The innermost named native frame of the task's thread in a ``py-spy dump
    --native`` (``function (library)`` lines, innermost first; the task's thread is
    the one whose frames pass through the worker's loop), preferring one outside the
    runtime libraries. Stripped libraries show bare addresses: skipped."""
    if not dump:
        return None
    blocks = [b for b in dump.split("\nThread ") if "(" in b]
    chosen = next((b for b in blocks if "_worker.py" in b), blocks[-1] if blocks else "")
    named = [
        frame
        for frame in (line.strip() for line in chosen.splitlines()[1:])
        if frame.endswith(")") and ".py:" not in frame and not frame.startswith("0x")
    ]
    for frame in named:
        if not any(lib in frame for lib in _RUNTIME_LIBRARIES):
            return frame
    return named[0] if named else None


def _with_source(frame: str) -> str:
    """``File "...", line N in f`` followed by that line's source, as a traceback shows it.

    faulthandler prints no source (it runs in a signal handler). The worker ran on this
    machine, so the file is read here; a file that is gone leaves the frame as it is.
    """
    head, sep, rest = frame.partition('", line ')
    if not sep or not head.startswith('File "'):
        return frame
    path, number = head[len('File "') :], rest.split(" ", 1)[0]
    if not number.isdigit() or path.startswith("<"):
        return frame
    import linecache

    linecache.checkcache(path)  # the file may have changed since this process read it
    source = linecache.getline(path, int(number)).strip()
    return f"{frame}: {source}" if source else frame


def _is_library_frame(frame: str) -> bool:
    """A frame in the standard library, an installed package, or pgexecutor itself."""
    return (
        "/lib/python3" in frame
        or "site-packages" in frame
        or "<frozen " in frame
        or "pgexecutor/_worker.py" in frame
        or 'File "<string>"' in frame
    )


class TaskTimeoutError(_FuturesTimeoutError):
    """The task ran longer than its ``task_timeout``; its worker's whole group was killed.

    ``timeout`` is the limit in seconds and ``pid`` the worker that ran the task.
    ``stack`` holds the Python stacks of every thread of the worker at the moment of
    expiry (a ``faulthandler`` dump), or ``None`` when the worker could not answer;
    ``str(error)`` names the innermost frame, which is usually where it hung.
    ``derivation`` says how a learned limit (``task_timeout="auto"``) was derived,
    None for a fixed one. ``native_stack`` (``native_stacks=True``, with py-spy) holds
    the worker's native and Python frames taken before the kill; ``str(error)`` then
    names the innermost native frame too.
    """

    derivation: str | None = None
    native_stack: str | None = None

    def __init__(
        self,
        timeout: float,
        pid: int | None = None,
        stack: str | None = None,
        attempts: int = 1,
    ) -> None:
        self.timeout = timeout
        self.pid = pid
        self.stack = stack
        self.attempts = attempts
        super().__init__(timeout, pid, stack, attempts)

    def __reduce__(self):  # type: ignore[override]
        # The state: ``derivation`` (and a subclass's own attributes) travel too.
        return (type(self), (self.timeout, self.pid, self.stack, self.attempts), self.__dict__)

    def __str__(self) -> str:
        msg = f"task exceeded its timeout of {self.timeout:g} s (worker pid {self.pid})"
        if self.derivation:
            msg += f"; the limit was {self.derivation}"
        return msg + self._where()

    def _where(self) -> str:
        """Where the task was when it was killed, and how often it was tried: the
        tail of the message, the same for every way a task is found hung."""
        msg = ""
        where = _innermost_frame(self.stack)
        if where:
            msg += f"; it was at {where}"
        native = _innermost_native_frame(self.native_stack)
        if native:
            msg += f"; natively in {native}"
        if self.attempts > 1:
            msg += f"; gave up after {self.attempts} attempts"
        return msg


class WorkerCrashedError(BrokenProcessPool):
    """The worker running the task died (signal, ``os._exit``, segfault, abort, ...).

    ``exitcode`` follows ``Popen.returncode``: negative is the signal number that
    killed it. A subclass of ``BrokenProcessPool`` so existing ``except`` clauses still
    fire, but the pool is **not** broken: only this future failed.
    """

    def __init__(
        self,
        pid: int | None = None,
        exitcode: int | None = None,
        reason: str | None = None,
        attempts: int = 1,
    ) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.reason = reason
        self.attempts = attempts
        super().__init__(pid, exitcode, reason, attempts)

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.pid, self.exitcode, self.reason, self.attempts))

    def _describe_exit(self) -> str:
        import signal

        if self.exitcode is None:
            return "exit status unknown"
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"killed by {name}"
        return f"exited with status {self.exitcode}"

    def __str__(self) -> str:
        msg = f"worker pid {self.pid} died while running the task ({self._describe_exit()})"
        if self.reason:
            msg += f": {self.reason}"
        if self.attempts > 1:
            msg += f"; gave up after {self.attempts} attempts"
        return msg


class MemoryLimitError(WorkerCrashedError):
    """The memory of the worker's group passed ``max_memory``; the group was killed.

    ``rss`` is the measured memory in bytes (see the README for how shared pages
    count) and ``limit`` the budget.
    """

    def __init__(
        self,
        rss: int = 0,
        limit: int = 0,
        pid: int | None = None,
        exitcode: int | None = None,
        attempts: int = 1,
    ) -> None:
        self.rss = rss
        self.limit = limit
        super().__init__(pid, exitcode, None, attempts)
        self.args = (rss, limit, pid, exitcode, attempts)

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.rss, self.limit, self.pid, self.exitcode, self.attempts))

    def __str__(self) -> str:
        msg = (
            f"the memory of worker pid {self.pid}'s process group reached "
            f"{self.rss / 2**20:.1f} MiB, over its limit of {self.limit / 2**20:.1f} MiB; "
            "the group was killed"
        )
        if self.attempts > 1:
            msg += f"; gave up after {self.attempts} attempts"
        return msg


class WorkerProtocolError(WorkerCrashedError):
    """The worker wrote what the protocol does not allow on its result pipe (a task
    wrote to it, closed it, or the worker broke); its group was killed.

    ``detail`` says what was read. A :class:`WorkerCrashedError`, so code that
    handles a crashed worker handles this one too; only this future failed.
    """

    def __init__(self, pid: int | None = None, detail: str = "", attempts: int = 1) -> None:
        self.detail = detail
        super().__init__(pid, None, detail, attempts)
        self.args = (pid, detail, attempts)

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.pid, self.detail, self.attempts))

    def __str__(self) -> str:
        msg = f"worker pid {self.pid} broke the protocol and was killed: {self.detail}"
        if self.attempts > 1:
            msg += f"; gave up after {self.attempts} attempts"
        return msg


class WorkerInitializerError(BrokenProcessPool):
    """The ``initializer`` raised in a new worker; the futures waiting for it fail.

    ``remote_traceback`` is the initializer's traceback text from the worker.
    """

    def __init__(self, message: str, remote_traceback: str | None = None) -> None:
        self.remote_traceback = remote_traceback
        super().__init__(message, remote_traceback)

    def __str__(self) -> str:
        text = str(self.args[0])
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback
        return text


class RemoteTaskError(Exception):
    """A task's exception that could not travel back as itself.

    Raised when the exception the task raised cannot be pickled in the worker or
    unpickled here. ``type_name`` names the original class and ``remote_traceback``
    holds its full traceback text as the worker formatted it.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(type_name, message, remote_traceback)

    def __str__(self) -> str:
        return (
            f"{self.type_name}: {self.message}\n\n"
            f"(the exception could not be transferred from the worker; remote traceback:)\n"
            f"{self.remote_traceback}"
        )


#: Where a task's arguments or result failed to cross between processes, as
#: ``pgexecutor_stage`` names it on the exception, and the note it adds there.
PICKLING_STAGES = {
    "pickle-arguments": "pickling the task's arguments in the caller failed; nothing was sent",
    "unpickle-arguments": "unpickling the task's arguments in the worker failed; the task did not run",
    "pickle-result": "pickling the task's result in the worker failed; the task ran",
    "unpickle-result": "unpickling the task's result in the parent failed; the task ran",
}


class TaskPicklingError(RemoteTaskError):
    """A pickling fault whose own exception could not travel back either.

    When a task's arguments or result fail to pickle or unpickle, the future fails
    with the very exception pickle raised (``pickle.PicklingError``, ``TypeError:
    cannot pickle '_thread.lock' object``, your ``__reduce__``'s error, ...), as with
    ``ProcessPoolExecutor``, and ``exc.pgexecutor_stage`` says which step failed.
    Only if that exception, raised in the worker, cannot itself be pickled there or
    unpickled here does the future fail with this instead: ``stage`` is that step (a
    key of PICKLING_STAGES), ``type_name`` names the original exception's class and
    ``remote_traceback`` holds its traceback text.
    """

    def __init__(self, stage: str, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(type_name, message, remote_traceback)
        self.stage = self.pgexecutor_stage = stage
        self.args = (stage, type_name, message, remote_traceback)

    def __reduce__(self):  # type: ignore[override]
        return (type(self), self.args)

    def __str__(self) -> str:
        what = PICKLING_STAGES.get(self.stage, self.stage)
        return (
            f"{self.type_name}: {self.message}\n\n"
            f"(pgexecutor: {what}, and that exception could not be transferred from the "
            f"worker either; remote traceback:)\n{self.remote_traceback}"
        )


# ---------------------------------------------------------------- journals
# Kept at the end of the module (with their own __all__ entries) to ease merging.

__all__ += ["JournalError", "QuarantinedError"]


class JournalError(RuntimeError):
    """A ``map(..., journal=...)`` could not use its journal.

    Raised by the ``map()`` call itself, before any task runs: the path cannot be
    created or written, the file is not a pgexecutor journal (it is left untouched),
    another running map holds the journal, or an input's key cannot be made. Raised by
    the map's iterator if writing to the journal fails later (disk full, say).
    """


class QuarantinedError(Exception):
    """The input killed its worker (timeout, crash, memory) ``quarantine_after`` times
    across runs of a journaled ``map``, so it was not run again.

    ``key`` is the input's key in the journal, ``failures`` the earlier failures, oldest
    first, each a dict with ``outcome`` (``"timeout"``, ``"crashed"``, ``"memory"``),
    ``error`` (its summary), ``kills`` (workers it killed in that run: more than one
    with ``retries``) and ``at`` (a Unix time). To try it again, delete its row
    (``DELETE FROM inputs WHERE key = ...``), use a new journal, or raise
    ``quarantine_after``.
    """

    def __init__(self, key: str, failures: list[dict[str, object]] | None = None) -> None:
        self.key = key
        self.failures = list(failures or [])
        super().__init__(key, self.failures)

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.key, self.failures))

    def __str__(self) -> str:
        n = sum(int(f.get("kills", 1)) for f in self.failures)  # type: ignore[call-overload]
        msg = f"input {self.key!r} is quarantined: it killed its worker {n} time{'s' * (n != 1)}"
        if self.failures:
            msg += " (" + "; ".join(
                f"{f.get('outcome')}: {f.get('error')}" for f in self.failures
            ) + ")"
        return msg + "; it was not run again"


# ---------------------------------------------------------------- supervision
# Kept at the end of the module (with their own __all__ entries) to ease merging.

__all__ += ["TaskStalledError"]


class TaskStalledError(TaskTimeoutError):
    """The task stopped making progress; its worker's whole group was killed.

    ``reason`` says which sign of life was missing: no CPU time used and no I/O done
    by any process of the group for ``timeout`` seconds (``stall_timeout``), or no
    :func:`pgexecutor.heartbeat` call for ``timeout`` seconds after an earlier one
    (``heartbeat_timeout``). A ``TaskTimeoutError``, so ``except`` clauses for
    timeouts catch it; ``stack`` is as there.
    """

    def __init__(
        self,
        reason: str,
        timeout: float,
        pid: int | None = None,
        stack: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(timeout, pid, stack, attempts)
        self.reason = reason
        self.args = (reason, timeout, pid, stack, attempts)  # attempts last, as the ledger expects

    def __reduce__(self):  # type: ignore[override]
        return (type(self), self.args, self.__dict__)

    def __str__(self) -> str:
        return f"task stalled: {self.reason} (worker pid {self.pid})" + self._where()
