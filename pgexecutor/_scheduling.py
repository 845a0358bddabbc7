"""Scheduling policy: how many workers to run, how deep to fill each one's pipe, and
when the next one may start. Numbers and decisions only: no I/O, no signals.

Owner: the manager thread (whoever holds ``Manager._lock``).
"""

from __future__ import annotations

#: Tasks in flight per worker once the pool is full: the one running plus those
#: waiting in its pipe (see depth()).
PREFETCH_MIN = 2  # tiny tasks: at least one waiting, so a worker never idles between them
PREFETCH_MAX = 64  # tiny tasks: enough that a worker drains its pipe while we sleep
PREFETCH_BUDGET = 0.002  # seconds of (recent average) work a worker may have queued
#: A task that runs this long has the tasks waiting behind it in its worker's pipe
#: taken back (their permits, see _process.permit_pipe) to run elsewhere.
REVOKE_AFTER = 0.005
AVG_WEIGHT = 0.25  # weight of the newest run time in the moving average
#: After failing a future (timeout, crash), wait this long before starting the
#: replacement worker: posix_spawn and its bookkeeping hold the GIL for a few ms, and
#: the thread just woken to read that future would wait for them (up to the 5 ms
#: switch interval). A short poll hands it the GIL first.
SPAWN_PAUSE = 0.002
MAX_START_FAILURES = 3  # workers that died before READY in a row: stop retrying


class Scheduler:
    """The pool's policy state (see the module docstring)."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self.target = 0  # workers the pool should have now (grows with queued work)
        self.avg_run: float | None = None  # moving average of task run times (seconds)
        self.spawn_after = 0.0  # no worker starts before this monotonic time
        self.start_failures = 0  # workers in a row that died before they were ready

    def observe_run(self, seconds: float) -> None:
        avg = self.avg_run
        self.avg_run = seconds if avg is None else avg + AVG_WEIGHT * (seconds - avg)
        self.start_failures = 0

    def grow_for(self, queued: int, busy: int) -> None:
        """Queued work wants one worker per task, beside the busy ones, up to the max."""
        if self.target < self.max_workers:
            self.target = max(self.target, min(self.max_workers, queued + busy))

    def stop_growing(self) -> None:
        """Workers fail to start (or to initialise): start none until new work comes."""
        self.target = 0

    def pause_spawning(self, now: float) -> None:
        self.spawn_after = now + SPAWN_PAUSE

    def spawn_paused(self, now: float) -> bool:
        return self.spawn_after > now

    def next_spawn(self, now: float) -> float | None:
        """When a paused spawn is due (a wake-up for the loop), or None."""
        if not self.spawn_after:
            return None
        if self.spawn_after > now:
            return self.spawn_after
        self.spawn_after = 0.0
        return None

    def start_failed(self) -> bool:
        """A worker died before it was ready; True once that happened too often."""
        self.start_failures += 1
        return self.start_failures >= MAX_START_FAILURES

    def depth(self, head_running_for: float | None) -> int:
        """How many tasks a worker may hold: the one running plus those in its pipe.

        A task written to a worker's pipe waits behind the one running: deep pipes
        are what make tiny tasks fast (one write carries many, and a worker works
        through them while the manager sleeps), so queue deep only for tiny tasks, as
        many as fit in PREFETCH_BUDGET at the recent average run time, and never
        behind a task already running longer than that. What waits behind a task
        that turns out long is taken back after REVOKE_AFTER (Manager._revoke).
        ``head_running_for``: how long the worker's current task has run, or None.
        """
        avg = self.avg_run
        if avg is None or avg > PREFETCH_BUDGET:
            # Unknown or long tasks: nothing waits in a pipe. One round trip of idle
            # time per task costs little next to the task.
            return 1
        if head_running_for is not None and head_running_for > PREFETCH_BUDGET:
            return 1  # the running one already looks long: queue nothing behind it
        return max(PREFETCH_MIN, min(PREFETCH_MAX, int(PREFETCH_BUDGET / max(avg, 1e-6))))
