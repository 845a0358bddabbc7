"""One worker as the manager sees it: its state, its pipes, its deadlines, its group.

Lifecycle::

    STARTING --READY frame--> READY --EXIT sent--> RETIRING --exit--> DEAD --reap--> gone
        |                       |                     |                 ^
        +-----------------------+---------------------+--> KILLING -----+
                      (timeout, memory, cancel, terminate: group signalled)

STARTING: spawned, INIT written; tasks may be handed to it already (they begin once
the initializer ran). RETIRING: EXIT is queued behind its tasks (max_tasks_per_child
or shutdown). KILLING: its group got SIGTERM+SIGCONT (SIGKILL at ``kill_deadline``).
DEAD: the leader exited but is not reaped, so its pgid stays reserved and the group can
still be signalled safely; it is reaped once the group is empty or ``reap_deadline``
passed. Each state's timers are defined once, below (``*_at`` methods), and
``next_due`` is their minimum.

Owner: the manager thread (whoever holds ``Manager._lock``).
"""

from __future__ import annotations

import enum
import itertools
import math
import os
import select
import signal
import time
from collections import deque

from . import _process
from . import _protocol as proto
from ._ledger import WorkItem
from ._scheduling import REVOKE_AFTER
from ._worker import DUMP_SIGNAL

_JOIN_BELOW = 1 << 16  # task payloads smaller than this are copied into their frame
_IOV_MAX = 1024  # buffers per writev (Linux's IOV_MAX)
_MEMORY_INTERVAL = 0.1  # seconds between memory samples of a limited task's group
#: A task's first memory sample waits this long after its start. A sample costs
#: ~0.5 ms per process of the group (benchmarks/memory_sampling.py); taken at
#: every start it slowed tiny limited tasks (0.66-0.83x throughput there).
_FIRST_SAMPLE = 0.02
_DEAD_CHECK = 0.02  # how often a dead leader's group is looked at before the reap
_STACK_WAIT = 0.1  # at most this long to collect a timed-out worker's stack dump
# The dump is complete once it ends a line and the pipe stays quiet this long. The
# faulthandler signal handler writes the whole dump in one burst, GIL or not (0.1-0.2
# ms measured, even for a task spinning in C), so a short pause means it is over; a
# worker preempted mid-dump usually stops mid-line, hence the newline condition.
_STACK_QUIET_MS = 2
_WORKER_FRAMES = proto.worker_frame_limits()  # what a worker may send (FrameReader)


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"
    KILLING = "killing"
    DEAD = "dead"


SERVING = (State.STARTING, State.READY, State.RETIRING)  # not killed, not dead


class WorkerHandle:
    """A started worker process and everything the manager tracks about it."""

    __slots__ = (
        "proc",
        "pid",
        "state",
        "ready_seen",
        "init_failed",
        "reason",
        "inflight",
        "out",
        "permits",
        "want_write",
        "tasks_sent",
        "reader",
        "reading",
        "term_sent",
        "kill_sent",
        "kill_deadline",
        "reap_deadline",
        "next_check",
        "next_memory",
    )

    def __init__(self, proc: _process.WorkerProcess) -> None:
        self.proc = proc
        self.pid = proc.pid  # also its pgid
        self.state = State.STARTING
        self.ready_seen = False  # READY arrived: the initializer ran, tasks may start
        self.init_failed = False
        self.reason = ""  # why it is being killed (for the log)
        # Handed over, in order: the head runs (once ``started``), the rest wait in
        # its pipe, each behind its permit (see _process.permit_pipe).
        self.inflight: deque[WorkItem] = deque()
        self.out: deque[memoryview] = deque()  # frames not yet written
        self.permits = bytearray()  # permits not yet written; they go before ``out``
        self.want_write = False  # registered for POLLOUT
        self.tasks_sent = 0
        # What the worker writes is untrusted: a task can write to the pipe too.
        self.reader = proto.FrameReader(_WORKER_FRAMES)
        self.reading = True  # False after EOF on its result pipe, or a protocol violation
        self.term_sent = False
        self.kill_sent = False
        self.kill_deadline: float | None = None  # KILLING: SIGKILL is due then
        self.reap_deadline: float | None = None  # DEAD: reap then, members or not
        self.next_check = 0.0  # DEAD: next look at the group's members
        self.next_memory = 0.0

    # ------------------------------------------------------------ timers

    def head(self) -> WorkItem | None:
        """The task running now, if one began (a task handed to a starting worker
        has not)."""
        if self.state in (State.READY, State.RETIRING) and self.inflight:
            item = self.inflight[0]
            if item.started:
                return item
        return None

    # Each timer is defined once, on the running task (``_*_of``); ``*_at`` and
    # ``next_due`` only find that task first.

    def _timeout_of(self, head: WorkItem) -> float | None:
        timeout = head.settings.timeout
        return None if timeout is None else head.started + timeout

    def _revoke_of(self, head: WorkItem) -> float | None:
        return head.started + REVOKE_AFTER if len(self.inflight) > 1 else None

    def _memory_of(self, head: WorkItem) -> float | None:
        return None if head.settings.max_memory is None else self.next_memory

    def timeout_at(self) -> float | None:
        head = self.head()
        return None if head is None else self._timeout_of(head)

    def revoke_at(self) -> float | None:
        head = self.head()
        return None if head is None else self._revoke_of(head)

    def memory_at(self) -> float | None:
        head = self.head()
        return None if head is None else self._memory_of(head)

    def escalate_at(self) -> float | None:
        if self.state is State.KILLING and not self.kill_sent:
            return self.kill_deadline
        return None

    def check_at(self) -> float | None:
        return self.next_check if self.state is State.DEAD else None

    def next_due(self) -> float | None:
        """The nearest of this worker's timers, or None. (On the hot path: the loop
        asks every worker on every pass, so the running task is found once.)"""
        head = self.head()
        if head is None:
            return self.escalate_at() if self.state is State.KILLING else self.check_at()
        best = self._timeout_of(head)
        for t in (self._revoke_of(head), self._memory_of(head)):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def start_clock(self, item: WorkItem, now: float) -> None:
        """The task at the head of the pipe begins now (deadlines count from here).

        Only a start counts as an attempt: a task that waited in a killed worker's
        pipe goes back to the queue without having used one.
        """
        item.started = now
        item.attempts += 1
        if item.settings.max_memory is not None:
            self.next_memory = now + _FIRST_SAMPLE

    # ------------------------------------------------------------ the task pipe

    def queue_task(self, item: WorkItem, now: float, max_tasks: int | None) -> None:
        """Queue ``item``'s frame and permit (``flush`` writes them)."""
        item.pid = self.pid
        self.inflight.append(item)
        if len(self.inflight) == 1 and self.ready_seen:
            self.start_clock(item, now)
        self.permits += item.task_id.to_bytes(8, "little")
        payload = item.payload
        if type(payload) is bytes:
            if len(payload) < _JOIN_BELOW:
                self.queue_frame(proto.frame(proto.TASK, item.task_id, payload))
            else:  # a large payload is not copied: header and payload go out by writev
                self.queue_frame(proto.HEADER.pack(proto.TASK, item.task_id, len(payload)))
                self.queue_frame(payload)
        else:  # arrays and such, written from the caller's memory (see OOBPayload)
            assert isinstance(payload, proto.OOBPayload)
            self.queue_frame(proto.HEADER.pack(proto.TASK_OOB, item.task_id, payload.size))
            for part in payload.parts:
                self.queue_frame(part)
        self.tasks_sent += 1
        if max_tasks is not None and self.tasks_sent >= max_tasks:
            self.retire()

    def retire(self) -> None:
        """Queue EXIT: it takes no more tasks and exits after those it has."""
        self.queue_frame(proto.frame(proto.EXIT))
        if self.state in (State.STARTING, State.READY):
            self.state = State.RETIRING

    def queue_frame(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self.out.append(memoryview(data))

    def flush(self) -> None:
        """Write what the pipes take now; the caller watches POLLOUT while ``out``.

        Permits go first: the worker must find a task's permit by the time it reads
        the task (see _process.permit_pipe).
        """
        if self.permits:
            try:
                n = os.write(self.proc.permits_w, self.permits)
                del self.permits[:n]
            except BlockingIOError:
                pass
            except OSError:
                self.permits.clear()  # the worker is gone; its pidfd will tell
            if self.permits:
                # Cannot happen in practice: at most 64 permits per worker are
                # unclaimed and a pipe holds 8192. No task may pass its permit.
                return
        out = self.out
        try:
            while out:
                n = os.writev(
                    self.proc.to_worker, out if len(out) <= _IOV_MAX else list(itertools.islice(out, _IOV_MAX))
                )
                while n:
                    first = out[0]
                    if n >= len(first):
                        n -= len(first)
                        out.popleft()
                    else:
                        out[0] = first[n:]
                        n = 0
        except BlockingIOError:
            pass
        except OSError:
            out.clear()  # the worker is gone; its pidfd will tell

    def take_back(self, everything: bool) -> list[WorkItem]:
        """The tasks waiting in its pipe whose permits are unclaimed, newest first.

        They are the newest in ``inflight``: a worker claims permits in order. The
        worker skips them when it reaches them. ``everything``: the head too, if the
        worker has not claimed it yet.
        """
        if len(self.inflight) < (1 if everything else 2):
            return []
        # Permits not written yet belong to the newest tasks; then the pipe's.
        count = len(self.permits) // 8
        self.permits.clear()
        try:
            count += len(os.read(self.proc.permits_r, 8 * len(self.inflight))) // 8
        except OSError:  # BlockingIOError: every permit in the pipe was claimed
            pass
        count = min(count, len(self.inflight))
        back = [self.inflight.pop() for _ in range(count)]
        for item in back:
            if item.started:
                # The head, not claimed yet (the worker was slow to reach it): its
                # clock had started, but that was no attempt.
                item.started = 0.0
                item.attempts -= 1
        if self.state is State.READY:
            self.tasks_sent -= count
        return back

    def read_frames(self) -> list[tuple[int, int, bytes | bytearray]] | None:
        """Frames waiting in the result pipe ([] if none); None at EOF, which is not
        death (a forked grandchild may hold the pipe): the pidfd says death. After
        the frames it returns, ``reader.error`` may say the stream broke the
        protocol: nothing more is read from it then."""
        try:
            frames = self.reader.read_from(self.proc.from_worker)
        except BlockingIOError:
            return []
        except OSError:
            frames = None
        if frames is None or self.reader.error is not None:
            self.reading = False
        return frames

    # ------------------------------------------------------------ the group

    def signal(self, hard: bool, now: float, grace: float) -> None:
        """SIGTERM (or SIGKILL) + SIGCONT the live worker's group: KILLING."""
        self.state = State.KILLING
        self.out.clear()
        self.permits.clear()
        # The leader is alive (hence unreaped): its pgid is ours to signal.
        if hard:
            _process.signal_group(self.pid, signal.SIGKILL)
            self.kill_sent = True
            self.kill_deadline = now
        else:
            _process.signal_group(self.pid, signal.SIGTERM)
            self.kill_deadline = now + grace
        # SIGCONT after SIGTERM: a stopped process would otherwise never act on it.
        _process.signal_group(self.pid, signal.SIGCONT)
        self.term_sent = True

    def escalate(self) -> None:
        """The grace period is over and the leader still lives: SIGKILL the group."""
        _process.signal_group(self.pid, signal.SIGKILL)
        self.kill_sent = True

    def mark_dead(self, now: float, grace: float) -> None:
        """The leader exited (not reaped: the pgid stays reserved). Whatever the task
        left in the group hears SIGTERM first, SIGKILL at the reap deadline."""
        self.state = State.DEAD
        if not self.term_sent:
            _process.signal_group(self.pid, signal.SIGTERM)
            _process.signal_group(self.pid, signal.SIGCONT)
            self.term_sent = True
        self.reap_deadline = self.kill_deadline if self.kill_deadline is not None else now + grace

    def group_lingers(self, now: float) -> bool:
        """DEAD: True while members live and the reap deadline has not passed."""
        assert self.reap_deadline is not None
        if now < self.reap_deadline and _process.live_members(self.pid, exclude=self.pid):
            self.next_check = now + _DEAD_CHECK
            return True
        return False

    def reap(self) -> tuple[bool, int | None]:
        """SIGKILL what is left of the group, reap the leader, close the fds.

        Returns (whether SIGKILL was needed, exit code). After this the pgid may be
        recycled: it is never signalled again. The caller unregisters it from the
        guardian first, so the guardian never holds a pgid that may be recycled.
        """
        escalated = self.kill_sent or bool(_process.live_members(self.pid, exclude=self.pid))
        _process.signal_group(self.pid, signal.SIGKILL)
        code = _process.reap(self.proc)
        self.proc.close_fds()
        return escalated, code

    def sample_memory(self, now: float) -> int:
        self.next_memory = now + _MEMORY_INTERVAL
        return _process.group_memory(self.pid)

    def collect_stack(self) -> str | None:
        """Ask the worker for a faulthandler dump of its threads; wait briefly."""
        fd = self.proc.dump
        try:
            while os.read(fd, 65536):  # drop anything stale
                pass
        except OSError:
            pass
        if not _process.signal_leader(self.pid, DUMP_SIGNAL):
            return None
        _process.signal_leader(self.pid, signal.SIGCONT)  # a stopped worker cannot answer
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        dump = bytearray()
        deadline = time.monotonic() + _STACK_WAIT
        while not _process.dump_is_complete(self.proc, dump):
            left_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            settled = dump.endswith(b"\n")
            if not poller.poll(min(left_ms, _STACK_QUIET_MS) if settled else left_ms):
                if settled:
                    break
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not data:
                break
            dump += data
        text = dump.decode("utf-8", "replace").strip()
        return text or None
