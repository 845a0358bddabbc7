"""Per-task settings, as one frozen and validated value, and the checks of every number.

A task's ``task_timeout``, ``max_memory`` and ``retries`` come from the executor's
constructor or an ``options()`` view; they travel together from the front end to the
manager as one :class:`TaskSettings`, checked once where the user gave them, so an
error names the parameter and points at the caller's line, never at a thread.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
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


def check_retries(value: Any) -> int:
    number = integer(value, "retries", "a whole number >= 0")
    if number < 0:
        raise ValueError(f"retries must be a whole number >= 0, not {value!r}")
    return number


@dataclass(frozen=True)
class TaskSettings:
    """What applies to one task: its time limit (seconds, or None), the memory its
    worker's group may use (bytes, or None) and how often it is run again after its
    worker was lost under it (timeout, crash, memory). Build it with :meth:`checked`;
    the fields are then known to be valid."""

    timeout: float | None = None
    max_memory: int | None = None
    retries: int = 0
    #: Keep the worker's bytes of the outcome on the future (``TaskFuture.raw_outcome``):
    #: a journaled map stores them. Off elsewhere: a held future would keep its result
    #: twice.
    keep_raw: bool = False

    @classmethod
    def checked(cls, task_timeout: Any = None, max_memory: Any = None, retries: Any = 0) -> TaskSettings:
        return cls(check_timeout(task_timeout), check_memory(max_memory), check_retries(retries))

    def updated(
        self, task_timeout: Any = UNSET, max_memory: Any = UNSET, retries: Any = UNSET
    ) -> TaskSettings:
        """These settings with the ones given replaced (each checked); UNSET keeps."""
        return TaskSettings(
            self.timeout if task_timeout is UNSET else check_timeout(task_timeout),
            self.max_memory if max_memory is UNSET else check_memory(max_memory),
            self.retries if retries is UNSET else check_retries(retries),
        )
