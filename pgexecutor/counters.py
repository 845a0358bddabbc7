"""What the counters mean: one definition for the progress bar, ``stats()`` and the
journal report.

Every task ends in exactly one of three ways:

``ok``
    It returned a result.
``failed``
    It did not return a result: it ended with an exception, whatever the cause.
    The cause is exactly one of:

    * ``error``: the task raised an exception of its own (or its arguments or its
      result could not be pickled);
    * ``timeout``: it ran past its time limit (or stalled); its worker's process
      group was killed;
    * ``crashed``: its worker died under it (a signal such as SIGSEGV, ``os._exit``,
      the kernel's OOM killer), or the pool stopped it (``terminate_workers()``,
      ``kill_workers()``, Ctrl-C, an initializer that failed);
    * ``memory``: its worker's group grew past ``max_memory`` and was killed.
``cancelled``
    It was cancelled before it ended (``future.cancel()``, ``kill_task()``,
    ``shutdown(cancel_futures=True)``): neither ok nor failed.

So ``ok + failed + cancelled`` is the number of tasks that ended, and
``error + timeout + crashed + memory == failed``.

Where each count shows, and what it counts:

* the progress bar (``map(..., progress=...)``) counts a map's items as they end:
  ``ok`` and ``failed`` always, each cause and ``cancelled`` once it is not zero;
* ``executor.stats()`` counts futures (a chunk of ``map(chunksize=n)`` is one):
  ``completed`` is ``ok``; ``failed`` and ``cancelled`` are as above. Its
  ``timed_out``, ``crashed`` and ``memory_killed`` count *events*, one per attempt
  that ended so: a task that timed out, was retried (``retries=``) and then
  returned counts in ``timed_out`` and in ``completed``. Its ``crashed`` counts
  workers that died on their own, not tasks the pool stopped. Without retries and
  without ``terminate_workers()``/``kill_workers()``, they equal the bar's
  ``timeout``, ``crashed`` and ``memory``, and the bar's ``error`` is ``failed``
  minus those three (``STATS`` names the counter of each);
* the journal report (``python -m pgexecutor journal PATH``) counts a journal's
  inputs by their latest recorded outcome: ``ok``, ``failed`` and its causes,
  and ``quarantined``: the inputs among ``timeout``/``crashed``/``memory`` that
  killed their worker ``quarantine_after`` times and are no longer run. A journal
  records only what a task did: neither cancelled tasks nor tasks the pool
  stopped (they run again next time).
"""

from __future__ import annotations

from typing import Any

from .errors import MemoryLimitError, TaskTimeoutError, WorkerCrashedError

__all__ = ["CANCELLED", "CAUSES", "FAILED", "MEANING", "OK", "STATS", "cause_of", "empty_counts"]

OK = "ok"
FAILED = "failed"
CANCELLED = "cancelled"
#: Why a failed task failed: every failed task has exactly one of these.
CAUSES = ("error", "timeout", "crashed", "memory")

#: One line per count, for the places that explain them (the journal command's
#: ``--help``, its HTML report, the demo).
MEANING = {
    OK: "returned a result",
    FAILED: "did not return a result (error + timeout + crashed + memory)",
    "error": "the task raised an exception",
    "timeout": "ran past its time limit; its worker's process group was killed",
    "crashed": "its worker died under it (a signal, an exit) or the pool stopped it",
    "memory": "its worker's group grew past max_memory and was killed",
    CANCELLED: "cancelled before it ended; neither ok nor failed",
    "quarantined": "killed its worker quarantine_after times; later maps do not run it",
}

#: The name of each count in ``executor.stats()`` (see the module docstring for how
#: the event counters there differ with retries); ``error`` has none there.
STATS = {
    OK: "completed",
    FAILED: "failed",
    CANCELLED: "cancelled",
    "timeout": "timed_out",
    "crashed": "crashed",
    "memory": "memory_killed",
}


def cause_of(exc: BaseException, outcome: str | None = None) -> str:
    """The cause (one of ``CAUSES``) of a task that failed with ``exc``.

    ``outcome`` is the task's ``TaskInfo.outcome`` where the executor gave one: it
    says who ended the task (a task that raised a TaskTimeoutError of its own is an
    ``error``); without it, the exception's type decides.
    """
    if outcome is not None and outcome in CAUSES:
        return outcome
    if isinstance(exc, MemoryLimitError):  # before WorkerCrashedError: a subclass
        return "memory"
    if isinstance(exc, TaskTimeoutError):
        return "timeout"
    if isinstance(exc, WorkerCrashedError):
        return "crashed"
    return "error"


def empty_counts() -> dict[str, Any]:
    """Zero of every count, in display order: ok, failed, the causes, cancelled."""
    return dict.fromkeys((OK, FAILED, *CAUSES, CANCELLED), 0)
