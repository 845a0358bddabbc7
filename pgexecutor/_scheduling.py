"""Scheduling policy: how many workers to run, how deep to fill each one's pipe, and
when the next one may start (a back-off after starts that failed: the pool shrinks to
what the machine gives it instead of failing work). Numbers and decisions only: no
I/O, no signals.

Owner: the manager thread (whoever holds ``Manager._lock``).
"""

from __future__ import annotations

import errno

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
#: A worker that cannot be started (fds, processes or memory exhausted) is tried again
#: after a back-off that doubles from START_BACKOFF_MIN up to START_BACKOFF_MAX; the
#: pool runs on the workers it has meanwhile.
START_BACKOFF_MIN = 0.05
START_BACKOFF_MAX = 2.0
#: With no worker at all, queued tasks fail once no worker could be started for this
#: long (seconds): the shortage may pass (another program closes its files), but a
#: caller must not wait forever either.
START_GIVE_UP = 30.0
#: errnos of a start that may succeed later: the machine or this process is short of
#: something (EMFILE/ENFILE: fds; EAGAIN: processes, RLIMIT_NPROC; ENOMEM; ENOSPC).
#: Any other (ENOENT: no such executable, EACCES, ...) will not pass by waiting.
SHORTAGE_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM, errno.ENOSPC}
)


class Scheduler:
    """The pool's policy state (see the module docstring)."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self.target = 0  # workers the pool should have now (grows with queued work)
        self.avg_run: float | None = None  # moving average of task run times (seconds)
        self.spawn_after = 0.0  # no worker starts before this monotonic time
        # Workers in a row that died before they were ready (a READY resets it; a task
        # that ends on another worker does not: the pool would respawn forever).
        self.start_failures = 0
        # Back-off after a worker could not start (see start_refused): run at most
        # ``cap`` workers until ``retry_at``; ``refused_since`` is when the current
        # run of refusals began (None: the last start succeeded).
        self.cap: int | None = None
        self.retry_at = 0.0
        self.backoff = 0.0
        self.refusals = 0  # spawns refused in a row
        self.refused_since: float | None = None
        self.give_up_after = START_GIVE_UP

    def observe_run(self, seconds: float) -> None:
        avg = self.avg_run
        self.avg_run = seconds if avg is None else avg + AVG_WEIGHT * (seconds - avg)

    def grow_for(self, queued: int, busy: int) -> None:
        """Queued work wants one worker per task, beside the busy ones, up to the max."""
        if self.target < self.max_workers:
            self.target = max(self.target, min(self.max_workers, queued + busy))

    def limit(self, now: float) -> int:
        """How many workers may run now: the target, held at ``cap`` during a
        back-off. Once the back-off is over, starts are tried up to the target again
        (the first refusal caps it anew)."""
        if self.cap is not None and now < self.retry_at:
            return min(self.target, self.cap)
        return self.target

    def start_refused(self, now: float, running: int, streak: int | None = None) -> None:
        """A worker could not start with ``running`` others running: hold the pool at
        that size for a back-off that doubles with each refusal in a row (``streak``:
        the caller's count, for starts that fail after the spawn, see Manager.
        _on_start_exit; else this class counts refused spawns)."""
        if streak is None:
            self.refusals += 1
            streak = self.refusals
        self.cap = running
        self.backoff = min(START_BACKOFF_MAX, START_BACKOFF_MIN * 2.0 ** min(max(streak - 1, 0), 16))
        self.retry_at = now + self.backoff
        if self.refused_since is None:
            self.refused_since = now

    def start_succeeded(self) -> None:
        """A worker was spawned: the shortage of fds or processes is over."""
        self.cap = None
        self.refused_since = None
        self.refusals = 0

    def refused_for(self, now: float) -> float:
        """Seconds since the current run of refused starts began (0 if none)."""
        return 0.0 if self.refused_since is None else now - self.refused_since

    def stop_growing(self) -> None:
        """Workers fail to start (or to initialise): start none until new work comes."""
        self.target = 0

    def pause_spawning(self, now: float) -> None:
        self.spawn_after = now + SPAWN_PAUSE

    def spawn_paused(self, now: float) -> bool:
        return self.spawn_after > now

    def next_spawn(self, now: float) -> float | None:
        """When a paused spawn or a retry after a back-off is due (a wake-up for the
        loop), or None."""
        due = None
        if self.spawn_after:
            if self.spawn_after > now:
                due = self.spawn_after
            else:
                self.spawn_after = 0.0
        if self.cap is not None and self.cap < self.target and self.retry_at > now:
            due = self.retry_at if due is None else min(due, self.retry_at)
        return due

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
