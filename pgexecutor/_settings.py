"""Per-task settings, as one frozen and validated value, and the checks of every number.

A task's ``task_timeout`` (seconds, or learned: :class:`AutoTimeout`), ``max_memory``,
``retries``, ``stall_timeout`` and ``heartbeat_timeout`` come from the executor's
constructor or an ``options()`` view; they travel together from the front end to the
manager as one :class:`TaskSettings`, checked once where the user gave them, so an
error names the parameter and points at the caller's line, never at a thread.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

#: "not given" for ``options()`` keywords, where None means "no limit"
UNSET: Any = object()


def real(value: Any, name: str, what: str) -> float:
    """``value`` as a float if it is a real number, else an error naming ``name``.

    bool, str and None are refused although float() would take some of them: a
    ``True`` or ``"10"`` passed as a number of seconds is a mistake, not a setting.
    """
    if value is None or isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be {what}, not {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {what}, not {type(value).__name__} {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{name} must be {what}, not nan")
    return number


def integer(value: Any, name: str, what: str) -> int:
    """``value`` as an int: an int, or a float without fraction (``2e9`` bytes).
    ``1.5`` is refused rather than truncated: silently 1 is never what was meant."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{name} must be {what}, not {type(value).__name__} {value!r}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{name} must be {what}, not {value!r}")
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, not {type(value).__name__} {value!r}") from None


def check_timeout(value: Any, name: str = "task_timeout") -> float | None:
    """A time limit: a positive number of seconds; None or ``inf`` for none."""
    if value is None:
        return None
    number = real(value, name, "a positive number of seconds or None")
    if not number > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    return None if math.isinf(number) else number


def check_initializer_timeout(value: Any, task_timeout: float | None) -> float | None:
    """initializer_timeout: checked like a task_timeout; not given (UNSET), it is the
    executor's ``task_timeout`` (already checked), so a pool whose tasks are bounded
    is not held forever by an initializer that hangs."""
    if value is UNSET:
        return task_timeout
    return check_timeout(value, "initializer_timeout")
@dataclass(frozen=True)
class AutoTimeout:
    """A time limit learned from the task function's own run times.

    Per task function (its module and qualified name; for ``map`` chunks, the
    function mapped, each chunk's time counted per item), the run times of the
    tasks that succeeded are kept (the last 1000). Until ``min_samples`` exist a
    task's limit is ``initial`` (None: no limit); then it is ``max(floor, factor x
    the quantile of those run times)``. It is recomputed as samples arrive and applies
    to the tasks already running too. ``task_timeout="auto"`` is ``AutoTimeout()``.
    """

    factor: float = 10.0
    quantile: float = 0.95
    min_samples: int = 20
    initial: float | None = None
    floor: float = 1.0

    def __post_init__(self) -> None:
        factor = real(self.factor, "AutoTimeout factor", "a finite number > 0")
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"AutoTimeout factor must be a finite number > 0, not {self.factor!r}")
        quantile = real(self.quantile, "AutoTimeout quantile", "a number in (0, 1]")
        if not 0 < quantile <= 1:
            raise ValueError(f"AutoTimeout quantile must be a number in (0, 1], not {self.quantile!r}")
        samples = integer(self.min_samples, "AutoTimeout min_samples", "a whole number >= 1")
        if samples < 1:
            raise ValueError(f"AutoTimeout min_samples must be a whole number >= 1, not {self.min_samples!r}")
        floor = real(self.floor, "AutoTimeout floor", "a finite number of seconds >= 0")
        if not (floor >= 0 and math.isfinite(floor)):
            raise ValueError(f"AutoTimeout floor must be a finite number of seconds >= 0, not {self.floor!r}")
        initial = check_timeout(self.initial, "AutoTimeout initial")
        for name, value in (
            ("factor", factor), ("quantile", quantile), ("min_samples", samples),
            ("floor", floor), ("initial", initial),
        ):
            object.__setattr__(self, name, value)


def check_task_timeout(value: Any) -> tuple[float | None, AutoTimeout | None]:
    """task_timeout: seconds (see check_timeout), ``"auto"`` or an AutoTimeout;
    returns (fixed seconds or None, learned or None)."""
    if isinstance(value, AutoTimeout):
        return None, value
    if isinstance(value, str):
        if value == "auto":
            return None, AutoTimeout()
        raise ValueError(
            f"task_timeout must be a positive number of seconds, None, 'auto' or an "
            f"AutoTimeout, not {value!r}"
        )
    return check_timeout(value), None


def check_grace(value: Any) -> float:
    """kill_grace: finite and >= 0, or a SIGTERM-proof task would never be killed."""
    number = real(value, "kill_grace", "a finite number of seconds >= 0")
    if not (number >= 0 and math.isfinite(number)):
        raise ValueError(f"kill_grace must be a finite number of seconds >= 0, not {value!r}")
    return number


def check_preload(value: Any) -> tuple[str, ...]:
    """preload: a tuple (or list) of module names, each a dotted Python identifier.

    Checked here, where the user gave it; whether each module imports is learnt in
    the template, at the first worker (a clear error on the first submit's future)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise TypeError(f"preload must be a tuple of module names, not {value!r}")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"preload must hold module names (str), not {name!r}")
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"preload: {name!r} is not a module name")
    return names


def check_memory(value: Any) -> int | None:
    """max_memory: a positive whole number of bytes, or None for no limit."""
    if value is None:
        return None
    number = integer(value, "max_memory", "a positive whole number of bytes or None")
    if number <= 0:
        raise ValueError(f"max_memory must be a positive whole number of bytes or None, not {value!r}")
    return number


def check_flag(value: Any, name: str) -> bool:
    """A yes/no setting: a bool only (``1`` or ``"yes"`` is a mistake, not a setting)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__} {value!r}")
    return value


def check_retries(value: Any) -> int:
    number = integer(value, "retries", "a whole number >= 0")
    if number < 0:
        raise ValueError(f"retries must be a whole number >= 0, not {value!r}")
    return number


@dataclass(frozen=True)
class TaskSettings:
    """What applies to one task: its time limit (seconds, learned, or None), the memory its
    worker's group may use (bytes, or None), how often it is run again after its
    worker was lost under it (timeout, crash, memory), and how long it may go without
    progress (CPU or I/O) or between heartbeats (seconds, or None); ``cancel_running``:
    whether ``future.cancel()`` stops the task once it runs (the standard library's
    cancel only reaches queued ones). Build it with :meth:`checked`; the fields are
    then known to be valid."""

    timeout: float | None = None
    max_memory: int | None = None
    retries: int = 0
    #: a learned time limit (``task_timeout="auto"``); then ``timeout`` is None
    auto: AutoTimeout | None = None
    #: seconds without CPU time or I/O in the worker's group (``stall_timeout``)
    stall: float | None = None
    #: seconds between heartbeat() calls, once the task made one (``heartbeat_timeout``)
    heartbeat: float | None = None
    #: ``future.cancel()`` stops the task once it runs (``cancel_running``)
    cancel_running: bool = False
    #: Keep the worker's bytes of the outcome on the future (``TaskFuture.raw_outcome``):
    #: a journaled map stores them. Off elsewhere: a held future would keep its result
    #: twice.
    keep_raw: bool = False
    #: True if anything watches the task while it runs (see _supervision): such a task
    #: is never handed to a worker behind the sleeping manager's back
    watched: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        watched = any(
            limit is not None
            for limit in (self.timeout, self.max_memory, self.auto, self.stall, self.heartbeat)
        )
        object.__setattr__(self, "watched", watched)

    @classmethod
    def checked(
        cls,
        task_timeout: Any = None,
        max_memory: Any = None,
        retries: Any = 0,
        stall_timeout: Any = None,
        heartbeat_timeout: Any = None,
        cancel_running: Any = False,
    ) -> TaskSettings:
        timeout, auto = check_task_timeout(task_timeout)
        return cls(
            timeout, check_memory(max_memory), check_retries(retries), auto,
            check_timeout(stall_timeout, "stall_timeout"),
            check_timeout(heartbeat_timeout, "heartbeat_timeout"),
            check_flag(cancel_running, "cancel_running"),
        )

    @property
    def task_timeout(self) -> float | AutoTimeout | None:
        """The time limit as the user gave it: seconds, an AutoTimeout, or None."""
        return self.auto if self.auto is not None else self.timeout

    def updated(
        self,
        task_timeout: Any = UNSET,
        max_memory: Any = UNSET,
        retries: Any = UNSET,
        stall_timeout: Any = UNSET,
        heartbeat_timeout: Any = UNSET,
        cancel_running: Any = UNSET,
    ) -> TaskSettings:
        """These settings with the ones given replaced (each checked); UNSET keeps."""
        timeout, auto = (
            (self.timeout, self.auto) if task_timeout is UNSET else check_task_timeout(task_timeout)
        )
        return TaskSettings(
            timeout,
            self.max_memory if max_memory is UNSET else check_memory(max_memory),
            self.retries if retries is UNSET else check_retries(retries),
            auto,
            self.stall if stall_timeout is UNSET else check_timeout(stall_timeout, "stall_timeout"),
            self.heartbeat if heartbeat_timeout is UNSET
            else check_timeout(heartbeat_timeout, "heartbeat_timeout"),
            self.cancel_running if cancel_running is UNSET
            else check_flag(cancel_running, "cancel_running"),
            self.keep_raw,
        )
