"""One worker as the manager sees it: its state, its pipes, its deadlines, its group.

Lifecycle::

    STARTING --READY frame--> READY --EXIT sent--> RETIRING --exit--> DEAD --reap--> gone
        |                       |                     |                 ^
        +-----------------------+---------------------+--> KILLING -----+
                      (timeout, memory, cancel, terminate: group signalled)

STARTING: spawned, INIT written; tasks may be handed to it already (they begin once
the initializer ran); its one timer is ``initializer_timeout``, from INIT_BEGUN on.
RETIRING: EXIT is queued behind its tasks (max_tasks_per_child or shutdown). KILLING:
its group got SIGTERM+SIGCONT (SIGKILL at ``kill_deadline``), or, for a cancelled
task, SIGINT first (SIGTERM at ``term_at``).
DEAD: the leader exited but is not reaped, so its pgid stays reserved and the group can
still be signalled safely; it is reaped once the group is empty or ``reap_deadline``
passed. Each state's timers are defined once, below (``*_at`` methods), and
``next_due`` is their minimum. The running task's supervision (time limits, memory)
is its :class:`~pgexecutor._supervision.Watch`, made when its clock starts.

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

from . import _native, _process
from . import _protocol as proto
from ._arena import TASK_MAX, ArgArena
from ._heartbeat import BeatPage
from ._ledger import WorkItem
from ._scheduling import REVOKE_AFTER
from ._supervision import Supervisor, Watch
from ._worker import DUMP_SIGNAL

_JOIN_BELOW = 1 << 16  # task payloads smaller than this are copied into their frame
_IOV_MAX = 1024  # buffers per writev (Linux's IOV_MAX)
_DEAD_CHECK = 0.02  # how often a dead leader's group is looked at before the reap
#: At most this long to wait for a stack dump asked for at the kill itself (see
#: take_stack); one asked for earlier (Watch: before a deadline) is not waited for.
_STACK_WAIT = 0.05
#: A dump asked for at least this long ago has arrived if it ever will: the signal
#: handler writes it in one burst as soon as the worker runs.
_STACK_SETTLED = 0.002
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
        "term_at",
        "reap_deadline",
        "next_check",
        "init_deadline",
        "dumps",
        "supervisor",
        "watch",
        "stack_asked",
        "beats",
        "native",
        "arena",
        "arena_refused",
    )

    def __init__(
        self, proc: _process.WorkerProcess, supervisor: Supervisor, dumps: DumpGate
    ) -> None:
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
        self.term_at = 0.0  # KILLING after SIGINT: SIGTERM is due then
        self.reap_deadline: float | None = None  # DEAD: reap then, members or not
        self.next_check = 0.0  # DEAD: next look at the group's members
        self.init_deadline: float | None = None  # STARTING: its initializer must end by then
        self.dumps = dumps  # the pool's one stack-dump pipe: who may use it now
        self.supervisor = supervisor
        self.watch: Watch | None = None  # the supervision of the task that began last
        self.stack_asked = 0.0  # when a stack dump was asked for this task; 0.0: not
        # Its heartbeat page, sent on its fd channel before INIT (see _heartbeat).
        self.beats = BeatPage.create(proc.channel)
        self.native: list[_native.NativeDump] | None = None  # py-spy dumps under way
        # Its argument arena (see _arena), made when a large task is first queued.
        self.arena: ArgArena | None = None
        self.arena_refused = False  # making one failed: large arguments take the pipe

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

    def _watch_of(self, head: WorkItem) -> Watch | None:
        """The watch of the running task (not a stale one of a task taken back)."""
        watch = self.watch
        return watch if watch is not None and watch.item is head else None

    def _supervise_of(self, head: WorkItem) -> float | None:
        watch = self._watch_of(head)
        return None if watch is None else watch.due()

    def _revoke_of(self, head: WorkItem) -> float | None:
        return head.started + REVOKE_AFTER if len(self.inflight) > 1 else None

    def watching(self) -> Watch | None:
        """The watch of the running task, if anything watches it."""
        head = self.head()
        return None if head is None else self._watch_of(head)

    def revoke_at(self) -> float | None:
        head = self.head()
        return None if head is None else self._revoke_of(head)

    def init_at(self) -> float | None:
        """STARTING: when its initializer overruns ``initializer_timeout``, if it has
        begun one and that has a limit."""
        if self.state is State.STARTING and not self.ready_seen and not self.init_failed:
            return self.init_deadline
        return None

    def initializer_began(self, now: float, timeout: float | None) -> None:
        """The worker says it begins its initializer: the initializer's clock starts."""
        if timeout is not None and self.state is State.STARTING:
            self.init_deadline = now + timeout

    def escalate_at(self) -> float | None:
        if self.state is State.KILLING:
            if not self.term_sent:
                return self.term_at
            if not self.kill_sent:
                return self.kill_deadline
        return None

    def check_at(self) -> float | None:
        return self.next_check if self.state is State.DEAD else None

    def next_due(self) -> float | None:
        """The nearest of this worker's timers, or None. (On the hot path: the loop
        asks every worker on every pass, so the running task is found once.)"""
        head = self.head()
        if head is None:
            if self.state is State.STARTING:
                return self.init_at()
            return self.escalate_at() if self.state is State.KILLING else self.check_at()
        best = self._revoke_of(head)
        if self.watch is not None:
            t = self._supervise_of(head)
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
        self.stack_asked = 0.0
        if self.native is not None:  # asked for the task before, which ended in time
            _native.discard(self.native)
            self.native = None
        # (On the hot path: a task without limits skips the supervisor's call.)
        self.watch = self.supervisor.watch(item, self, now) if item.settings.watched else None

    # ------------------------------------------------------------ the task pipe

    def queue_task(self, item: WorkItem, now: float, max_tasks: int | None) -> None:
        """Queue ``item``'s frame and permit (``flush`` writes them)."""
        item.pid = self.pid
        self.inflight.append(item)
        if len(self.inflight) == 1 and self.ready_seen:
            self.start_clock(item, now)
        payload = item.payload
        if type(payload) is bytes:
            self.permits += item.task_id.to_bytes(8, "little")
            if len(payload) < _JOIN_BELOW:
                self.queue_frame(proto.frame(proto.TASK, item.task_id, payload))
            else:  # a large payload is not copied: header and payload go out by writev
                self.queue_frame(proto.HEADER.pack(proto.TASK, item.task_id, len(payload)))
                self.queue_frame(payload)
        else:  # arrays and such, from the caller's memory (see OOBPayload)
            assert isinstance(payload, proto.OOBPayload)
            shm = self._to_arena(item, payload) if payload.size >= proto.SHM_MIN else None
            if shm is not None:
                permit, body = shm
                self.permits += permit
                self.queue_frame(proto.frame(proto.TASK_SHM, item.task_id, body))
            else:  # written from where the buffers lie
                self.permits += item.task_id.to_bytes(8, "little")
                self.queue_frame(proto.HEADER.pack(proto.TASK_OOB, item.task_id, payload.size))
                for part in payload.parts:
                    self.queue_frame(part)
        self.tasks_sent += 1
        if max_tasks is not None and self.tasks_sent >= max_tasks:
            self.retire()

    def _to_arena(self, item: WorkItem, payload: proto.OOBPayload) -> tuple[bytes, bytes] | None:
        """(the permit, TASK_SHM's payload) for ``item``, its buffers copied into
        this worker's argument arena (made now if it has none); None: they take the
        pipe. Only once the worker is READY: see _arena on the heartbeat page's
        datagram. The permit is the frame's own (see _arena.ArgArena.put), not the
        task id."""
        channel = self.proc.channel
        if channel is None or not self.ready_seen or payload.size > TASK_MAX:
            return None
        arena = self.arena
        if arena is None:
            if self.arena_refused:
                return None
            arena = self.arena = ArgArena.open(channel, payload.size)
            if arena is None:
                self.arena_refused = True
                return None
        return arena.put(item, payload, self.inflight)

    def arena_kept(self, task_id: int) -> bool:
        """RETAINED: the running task ``task_id`` kept its arguments' views of the
        arena, whose region is never written again. False if that is not the
        running task, or it has no region (the worker broke the protocol)."""
        head = self.head()
        if head is None or head.task_id != task_id or self.arena is None:
            return False
        return self.arena.retain(head)

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
        if self.state in (State.STARTING, State.READY):  # (RETIRING: its EXIT is sent)
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

    def signal(self, hard: bool, now: float, grace: float, interrupt: bool = False) -> None:
        """SIGTERM (or SIGKILL) + SIGCONT the live worker's group: KILLING.

        ``interrupt`` (a cancelled task): SIGINT first, so the task sees
        KeyboardInterrupt and its ``finally`` blocks and context managers run; SIGTERM
        follows at half the grace, SIGKILL at its end, as ever. (No terminal's Ctrl-C
        reaches a worker's group: a SIGINT there comes from us alone.)
        """
        self.state = State.KILLING
        self.out.clear()
        self.permits.clear()
        # The leader is alive (hence unreaped): its pgid is ours to signal.
        if hard:
            _process.signal_group(self.pid, signal.SIGKILL)
            self.kill_sent = True
            self.kill_deadline = now
        elif interrupt and grace > 0:
            _process.signal_group(self.pid, signal.SIGINT)
            self.kill_deadline = now + grace
            self.term_at = now + grace / 2
            # SIGCONT: a stopped process would otherwise never act on it.
            _process.signal_group(self.pid, signal.SIGCONT)
            return  # term_sent stays False: escalate() sends SIGTERM next
        else:
            _process.signal_group(self.pid, signal.SIGTERM)
            self.kill_deadline = now + grace
        # SIGCONT after SIGTERM: a stopped process would otherwise never act on it.
        _process.signal_group(self.pid, signal.SIGCONT)
        self.term_sent = True

    def escalate(self) -> str:
        """A stage of the kill is due and the leader still lives: after SIGINT, SIGTERM
        (+SIGCONT); after SIGTERM, SIGKILL. Returns the signal's name (for the log)."""
        if not self.term_sent:
            _process.signal_group(self.pid, signal.SIGTERM)
            _process.signal_group(self.pid, signal.SIGCONT)
            self.term_sent = True
            return "SIGTERM"
        _process.signal_group(self.pid, signal.SIGKILL)
        self.kill_sent = True
        return "SIGKILL"

    def mark_dead(self, now: float, grace: float) -> None:
        """The leader exited (not reaped: the pgid stays reserved). Whatever the task
        left in the group hears SIGTERM first, SIGKILL at the reap deadline."""
        self.state = State.DEAD
        if not self.term_sent:
            _process.signal_group(self.pid, signal.SIGTERM)
            _process.signal_group(self.pid, signal.SIGCONT)
            self.term_sent = True
        self.reap_deadline = self.kill_deadline if self.kill_deadline is not None else now + grace

    def look_at_group(self, when: float) -> None:
        """DEAD: look at the group's members (and reap, if none live) at ``when``."""
        self.next_check = when

    def group_lingers(self, now: float) -> bool:
        """DEAD: True while members live and the reap deadline has not passed."""
        assert self.reap_deadline is not None
        if now < self.reap_deadline and self._members_live():
            self.next_check = now + _DEAD_CHECK
            return True
        return False

    def _members_live(self) -> bool:
        """Whether processes of the group other than the leader live. When /proc
        cannot be listed (EMFILE: the process is out of fds) they may: True, and
        the reap deadline's SIGKILL settles it."""
        try:
            return bool(_process.live_members(self.pid, exclude=self.pid))
        except OSError:
            return True

    def reap(self) -> tuple[bool, int | None]:
        """SIGKILL what is left of the group, reap the leader, close the fds.

        Returns (whether SIGKILL was needed, exit code). After this the pgid may be
        recycled: it is never signalled again. The caller unregisters it from the
        guardian first, so the guardian never holds a pgid that may be recycled.
        """
        escalated = self.kill_sent or self._members_live()
        _process.signal_group(self.pid, signal.SIGKILL)
        code = _process.reap(self.proc)
        self.proc.close_fds()
        self.dumps.release(self.pid)
        _native.discard(self.native)
        self.native = None
        if self.beats is not None:
            self.beats.close()
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        return escalated, code

    def request_stack(self, now: float) -> bool:
        """Ask the worker for a faulthandler dump of its threads (not waiting for
        it: see take_stack), and with native_stacks start py-spy on its group. False
        if no Python dump was asked for: the leader is gone, or the pool's dump pipe
        carries another worker's dump right now (see DumpGate)."""
        asked = alive = False
        if not self.dumps.take(self.pid, now):
            alive = True  # as far as we know: py-spy still looks
        else:
            fd = self.proc.dump
            try:
                while os.read(fd, 65536):  # drop anything stale (an earlier task's)
                    pass
            except OSError:
                pass
            if _process.signal_leader(self.pid, DUMP_SIGNAL):
                _process.signal_leader(self.pid, signal.SIGCONT)  # a stopped worker cannot answer
                self.stack_asked = now
                asked = alive = True
            else:
                self.dumps.release(self.pid)
        py_spy = self.supervisor.py_spy
        if py_spy is not None and alive:
            _native.discard(self.native)
            self.native = None
            try:
                self.native = _native.start(py_spy, self.pid)
            except OSError:
                pass  # take_stacks tries again and says why
        return asked

    def take_stacks(self, now: float) -> tuple[str | None, str | None]:
        """(the Python stack dump, the native one) of the running task, for its kill
        decided at ``now``; the native one only with ``native_stacks=True`` (py-spy:
        see _native, waited for until NATIVE_WAIT after ``now``)."""
        python = self._take_python_stack(now)
        py_spy = self.supervisor.py_spy
        if py_spy is None:
            return python, None
        native, why, late = _native.take(self.native, py_spy, self.pid, now)
        self.native = None
        if why is not None:
            self.supervisor.native_failed(self.pid, why, late)
        return python, native

    def _take_python_stack(self, now: float) -> str | None:
        """The faulthandler dump of the running task, best effort and without
        delaying its kill: one asked for a while ago (before the deadline) is taken
        as far as it arrived, waiting only to complete one that is being written; one
        not asked for yet is asked for now and waited for at most _STACK_WAIT.

        A worker spinning in C with every signal blocked never answers: asked early,
        it costs nothing (the old way waited 0.1 s for it at every such kill).
        """
        asked = self.stack_asked
        if not asked and not self.request_stack(now):
            return None
        fresh = not asked or now - asked < _STACK_SETTLED
        self.stack_asked = 0.0
        try:
            return self._read_dump(fresh)
        finally:
            self.dumps.release(self.pid)

    def _read_dump(self, fresh: bool) -> str | None:
        fd = self.proc.dump
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        dump = bytearray()
        deadline = time.monotonic() + _STACK_WAIT
        while not _process.dump_is_complete(self.proc, dump):
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                data = None
            except OSError:
                break
            if data:
                dump += data
                continue
            if data is not None or (not dump and not fresh):
                break  # EOF; or asked long ago and nothing came: nothing will
            left_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            settled = dump.endswith(b"\n")
            if not poller.poll(min(left_ms, _STACK_QUIET_MS) if settled else left_ms) and settled:
                break
        text = dump.decode("utf-8", "replace").strip()
        return text or None


class DumpGate:
    """Who may use the pool's one stack-dump pipe (see _process.dump_pipe) now.

    faulthandler writes a dump as raw text in many small writes: two workers dumping
    into one pipe at once would interleave, and a dump could not be told from
    another. So one worker at a time is asked; an ask whose dump was never taken
    (the task finished meanwhile, or the worker spins in C with signals blocked)
    stops holding the pipe after HOLD seconds. Stacks are best effort: a second
    worker that needs one while the pipe is held goes without its Python dump.
    Owner: the manager thread.
    """

    HOLD = 0.25

    __slots__ = ("holder", "since")

    def __init__(self) -> None:
        self.holder = 0  # pid of the worker asked; 0: the pipe is free
        self.since = 0.0

    def take(self, pid: int, now: float) -> bool:
        if self.holder and self.holder != pid and now - self.since < self.HOLD:
            return False
        self.holder, self.since = pid, now
        return True

    def release(self, pid: int) -> None:
        if self.holder == pid:
            self.holder = 0
