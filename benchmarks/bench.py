#!/usr/bin/env python3
"""Benchmark pgexecutor.ProcessGroupExecutor against other process pools.

    python benchmarks/bench.py [--quick] [--only NAME,...] [--peers NAME,...] [--json out.json]

Every peer runs with 2 workers, every scenario is repeated and summarised by
its median, and every figure is also shown as a ratio to
``concurrent.futures.ProcessPoolExecutor(mp_context=fork)`` measured in the
same run.  See benchmarks/README.md for what each row means.

Layout: the top-level process is a *driver*.  For each peer it starts a child
(this same file with ``--_child``) that runs the selected scenarios and
appends one JSON line per scenario to a file.  A scenario that hangs is cut
off by a faulthandler watchdog (its stack is saved), the child is restarted
for the remaining scenarios, and the driver, which is a child subreaper,
kills whatever processes the child left behind.  So one broken peer cannot
take the whole run down with it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import faulthandler
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from importlib import metadata

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
# Children started by spawn/forkserver/loky (or by exec in pgexecutor) must be
# able to import ``benchmarks._tasks`` and ``pgexecutor`` as well.
_pp = os.environ.get("PYTHONPATH")
if not _pp or REPO_ROOT not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = REPO_ROOT + (os.pathsep + _pp if _pp else "")

from benchmarks import _tasks  # noqa: E402
from benchmarks._harness import compile_sources, reap_strays, set_subreaper  # noqa: E402

N_WORKERS = 2
PGX_KILL_GRACE = 1.0  # pgexecutor's default kill_grace, made explicit
BASELINE = "ppe-fork"
FLOOR = "pipe-floor"  # not a pool: what a round trip costs with no pool at all

CONFIGS = {
    "full": dict(tiny=20000, roundtrips=2000, rt_warmup=200, arrays=50, array_mib=8,
                 reps=2, rounds=3, startup_reps=3, timeout_reps=3, timeout=0.5, cap=10.0,
                 linger=1.0, hang_guard=240.0),
    "quick": dict(tiny=2000, roundtrips=200, rt_warmup=50, arrays=10, array_mib=8,
                  reps=3, rounds=1, startup_reps=4, timeout_reps=1, timeout=0.5, cap=4.5,
                  linger=1.0, hang_guard=45.0),
}

SCENARIOS = ["startup", "submit", "map1", "map64", "roundtrip", "payload",
             "timeout_sleep", "timeout_cspin"]
#: Scenarios every round runs (see driver_main); the others run in the first only.
ROUND_SCENARIOS = frozenset({"startup", "submit", "map1", "map64", "roundtrip", "payload"})


def _dist_version(*names):
    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return "?"


# --------------------------------------------------------------------------
# Peer adapters
# --------------------------------------------------------------------------

class Peer:
    """Uniform face over one pool implementation.

    ``submit`` returns a handle understood by ``result``/``wait_resolved``;
    ``submit_timeout`` is only implemented by peers with per-task timeouts.
    """
    name = "?"
    desc = "?"
    supports_timeout = False
    only: frozenset[str] | None = None  # the scenarios it can run, if not all

    def check(self):
        """Import what is needed; return a version string (raise ImportError if missing)."""
        raise NotImplementedError

    def start(self, n):
        raise NotImplementedError

    def submit(self, fn, *args):
        raise NotImplementedError

    def result(self, h, timeout=None):
        return h.result(timeout)

    def submit_many(self, fn, items):
        hs = [self.submit(fn, x) for x in items]
        return [self.result(h) for h in hs]

    def map(self, fn, items, chunksize):
        raise NotImplementedError

    def roundtrip(self, fn, arg):
        return self.result(self.submit(fn, arg))

    def shutdown(self):
        raise NotImplementedError

    def warm(self, n):
        """Make sure all ``n`` workers exist and have run something."""
        hs = [self.submit(_tasks.sleep_pid, 0.05) for _ in range(2 * n)]
        return {self.result(h, 60) for h in hs}

    def submit_timeout(self, fn, args, timeout):
        raise NotImplementedError

    def wait_resolved(self, h, cap):
        """Wait up to ``cap`` s; return (resolved, outcome-name)."""
        try:
            exc = h.exception(timeout=cap)
        except cf.CancelledError:
            return True, "CancelledError"
        except cf.TimeoutError:
            return False, "unresolved"
        return True, ("result" if exc is None else type(exc).__name__)


class PgExecutorPeer(Peer):
    name = "pgexecutor"
    desc = "pgexecutor.ProcessGroupExecutor (default start method)"
    supports_timeout = True

    def check(self):
        import pgexecutor
        from pgexecutor import ProcessGroupExecutor, TaskTimeoutError, WorkerCrashedError  # noqa: F401
        v = getattr(pgexecutor, "__version__", None)
        return v or _dist_version("pgexecutor")

    def start(self, n):
        from pgexecutor import ProcessGroupExecutor
        self.ex = ProcessGroupExecutor(max_workers=n, kill_grace=PGX_KILL_GRACE)

    def submit(self, fn, *args):
        return self.ex.submit(fn, *args)

    def map(self, fn, items, chunksize):
        return list(self.ex.map(fn, items, chunksize=chunksize))

    def shutdown(self):
        self.ex.shutdown(wait=True)

    def submit_timeout(self, fn, args, timeout):
        return self.ex.options(task_timeout=timeout).submit(fn, *args)


class PPEPeer(Peer):
    supports_timeout = False

    def __init__(self, method):
        self.method = method
        self.name = "ppe-" + method
        self.desc = "concurrent.futures.ProcessPoolExecutor(mp_context=%s)" % method

    def check(self):
        return platform.python_version()

    def start(self, n):
        import multiprocessing as mp
        self.ex = cf.ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context(self.method))

    def submit(self, fn, *args):
        return self.ex.submit(fn, *args)

    def map(self, fn, items, chunksize):
        return list(self.ex.map(fn, items, chunksize=chunksize))

    def shutdown(self):
        self.ex.shutdown(wait=True)


class LokyPeer(PPEPeer):
    def __init__(self):
        self.name = "loky"
        self.desc = "loky.ProcessPoolExecutor (loky start method)"

    def check(self):
        import loky
        return getattr(loky, "__version__", None) or _dist_version("loky")

    def start(self, n):
        import loky
        self.ex = loky.ProcessPoolExecutor(max_workers=n)


class PebblePeer(Peer):
    name = "pebble"
    desc = "pebble.ProcessPool (default context: fork)"
    supports_timeout = True

    def check(self):
        import pebble  # noqa: F401
        return _dist_version("pebble", "Pebble")

    def start(self, n):
        import pebble
        self.pool = pebble.ProcessPool(max_workers=n)

    def submit(self, fn, *args):
        return self.pool.schedule(fn, args=args)

    def map(self, fn, items, chunksize):
        return list(self.pool.map(fn, items, chunksize=chunksize).result())

    def shutdown(self):
        self.pool.close()
        self.pool.join()

    def submit_timeout(self, fn, args, timeout):
        return self.pool.schedule(fn, args=args, timeout=timeout)


class MpirePeer(Peer):
    name = "mpire"
    desc = "mpire.WorkerPool(start_method=fork, keep_alive=True)"
    supports_timeout = True

    def check(self):
        import mpire  # noqa: F401
        return _dist_version("mpire")

    def start(self, n):
        import mpire
        self.pool = mpire.WorkerPool(n_jobs=n, start_method="fork", keep_alive=True)

    def submit(self, fn, *args):
        return self.pool.apply_async(fn, args=args)

    def result(self, h, timeout=None):
        return h.get(timeout)

    def map(self, fn, items, chunksize):
        return self.pool.map(fn, items, chunk_size=chunksize, progress_bar=False,
                             concatenate_numpy_output=False)

    def shutdown(self):
        self.pool.stop_and_join()
        self.pool.terminate()

    def submit_timeout(self, fn, args, timeout):
        return self.pool.apply_async(fn, args=args, task_timeout=timeout)

    def wait_resolved(self, h, cap):
        h.wait(cap)
        if not h.ready():
            return False, "unresolved"
        try:
            h.get(0)
        except Exception as e:  # noqa: BLE001
            return True, type(e).__name__
        return True, "result"


class MpPoolPeer(Peer):
    name = "mp-pool-fork"
    desc = "multiprocessing.Pool (fork), apply_async for submits"

    def check(self):
        return platform.python_version()

    def start(self, n):
        import multiprocessing as mp
        self.pool = mp.get_context("fork").Pool(n)

    def submit(self, fn, *args):
        return self.pool.apply_async(fn, args)

    def result(self, h, timeout=None):
        return h.get(timeout)

    def map(self, fn, items, chunksize):
        return self.pool.map(fn, items, chunksize=chunksize)

    def shutdown(self):
        self.pool.close()
        self.pool.join()


class PipeFloorPeer(Peer):
    """No pool: the least any process pool must do for one round trip, as a
    reference. A child forked from this (single-threaded) benchmark process reads a
    pickled call from a pipe, runs it and writes its pickled result back; the
    parent writes and then blocks reading. No manager, no future, no thread hand-off,
    no supervision: two process wake-ups and four pickle operations, in Python.
    Only the round trip runs (every other scenario needs a pool)."""
    name = "pipe-floor"
    desc = "no pool: a forked child answering pickled calls over a pipe (round trip only)"
    only = frozenset({"roundtrip"})

    def check(self):
        return platform.python_version()

    def start(self, n):
        import pickle
        import struct
        self._pickle = pickle
        self._head = struct.Struct("<I")
        self.children = []
        for _ in range(n):
            down_r, down_w = os.pipe()
            up_r, up_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: answer until the pipe closes
                os.close(down_w)
                os.close(up_r)
                for _pid, w, r in self.children:  # the earlier children's ends: their EOF
                    os.close(w)
                    os.close(r)
                self._serve(down_r, up_w)
                os._exit(0)
            os.close(down_r)
            os.close(up_w)
            self.children.append((pid, down_w, up_r))

    def _serve(self, rfd, wfd):
        head, pickle = self._head, self._pickle
        while True:
            data = self._read_frame(rfd)
            if data is None:
                return
            fn, args = pickle.loads(data)
            out = pickle.dumps(fn(*args), 5)
            os.write(wfd, head.pack(len(out)) + out)

    def _read_frame(self, fd):
        data = os.read(fd, 1 << 16)
        if not data:
            return None
        (size,) = self._head.unpack_from(data)
        while len(data) < size + 4:
            more = os.read(fd, 1 << 16)
            if not more:
                return None
            data += more
        return data[4:]

    def _call(self, child, fn, args):
        _pid, wfd, rfd = child
        data = self._pickle.dumps((fn, args), 5)
        os.write(wfd, self._head.pack(len(data)) + data)
        return self._pickle.loads(self._read_frame(rfd))

    def roundtrip(self, fn, arg):
        return self._call(self.children[0], fn, (arg,))

    def warm(self, n):
        return {self._call(c, _tasks.sleep_pid, (0.0,)) for c in self.children}

    def shutdown(self):
        for pid, wfd, rfd in self.children:
            os.close(wfd)  # the child reads EOF and exits
            os.close(rfd)
            os.waitpid(pid, 0)
        self.children = []


class DeadpoolPeer(PPEPeer):
    """Not in bench.py's own runs (replacement.py and soak.py use it)."""
    supports_timeout = True

    def __init__(self):
        self.name = "deadpool"
        self.desc = "deadpool.Deadpool (its default mp_context: forkserver)"

    def check(self):
        import deadpool  # noqa: F401
        return _dist_version("deadpool-executor")

    def start(self, n):
        import deadpool
        # Its default max_backlog (1000) makes submit block while 1000 tasks wait;
        # the other pools take any number: so does this one here.
        self.ex = deadpool.Deadpool(max_workers=n, max_backlog=10**9)

    def submit_timeout(self, fn, args, timeout):
        return self.ex.submit(fn, *args, deadpool_timeout=timeout)


def make_peers():
    return {p.name: p for p in [PgExecutorPeer(), PPEPeer("fork"), PPEPeer("spawn"),
                                LokyPeer(), PebblePeer(), MpirePeer(), MpPoolPeer(),
                                PipeFloorPeer()]}


PEER_ORDER = ["pgexecutor", "ppe-fork", "ppe-spawn", "loky", "pebble", "mpire", "mp-pool-fork",
              "pipe-floor"]


# --------------------------------------------------------------------------
# Scenarios (run inside the per-peer child)
# --------------------------------------------------------------------------

class Skip(Exception):
    pass


NO_TIMEOUT = "no per-task timeout"
NOT_A_POOL = "not a pool: round trip only"


def _ms(dt):
    return dt * 1e3


def _pool(peer, body):
    """Start a warmed-up pool, run ``body()``, shut the pool down."""
    peer.start(N_WORKERS)
    notes = []
    try:
        pids = peer.warm(N_WORKERS)
        if len(pids) < N_WORKERS:
            notes.append("warm-up reached only %d distinct worker pid(s)" % len(pids))
        out = body()
    finally:
        peer.shutdown()
    return out, notes


def sc_startup(peer, cfg):
    """Pools built one after another in this (fresh) process: construct, first
    result, shutdown. The first is the process's first pool (nothing of any pool
    ran here before: pgexecutor's template and guardian start with it); the others
    come back to back, as in a test suite or a loop over experiments (pgexecutor
    shares its template and guardian between them: see _template_pool)."""
    first, total = [], []
    for _ in range(cfg["startup_reps"]):
        gc.collect()
        t0 = time.perf_counter()
        peer.start(N_WORKERS)
        r = peer.roundtrip(_tasks.noop, 7)
        t1 = time.perf_counter()
        peer.shutdown()
        first.append(_ms(t1 - t0))
        total.append(_ms(time.perf_counter() - t0))
        assert r == 7, r
    return {
        "startup_cold": ("ms", first[:1]),
        "startup_first": ("ms", first[1:]),
        "startup": ("ms", total[1:]),
    }, []


def _throughput(peer, cfg, key, call):
    items = list(range(cfg["tiny"]))

    def body():
        samples = []
        for _ in range(cfg["reps"]):
            gc.collect()
            t0 = time.perf_counter()
            res = call(items)
            samples.append(_ms(time.perf_counter() - t0))
            if list(res) != items:
                raise AssertionError("wrong results from %s" % key)
        return samples
    samples, notes = _pool(peer, body)
    return {key: ("ms", samples)}, notes


def sc_submit(peer, cfg):
    return _throughput(peer, cfg, "submit", lambda it: peer.submit_many(_tasks.noop, it))


def sc_map1(peer, cfg):
    return _throughput(peer, cfg, "map1", lambda it: peer.map(_tasks.noop, it, 1))


def sc_map64(peer, cfg):
    return _throughput(peer, cfg, "map64", lambda it: peer.map(_tasks.noop, it, 64))


def _p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def sc_roundtrip(peer, cfg):
    def body():
        p50, p99 = [], []
        for _ in range(cfg["reps"]):
            for i in range(cfg["rt_warmup"]):
                peer.roundtrip(_tasks.noop, i)
            lat = []
            for i in range(cfg["roundtrips"]):
                t0 = time.perf_counter()
                r = peer.roundtrip(_tasks.noop, i)
                lat.append((time.perf_counter() - t0) * 1e6)
                if r != i:
                    raise AssertionError("wrong roundtrip result")
            p50.append(statistics.median(lat))
            p99.append(_p99(lat))
        return p50, p99
    (p50, p99), notes = _pool(peer, body)
    return {"rt_p50": ("us", p50), "rt_p99": ("us", p99)}, notes


def sc_payload(peer, cfg):
    try:
        import numpy as np
    except ImportError:
        raise Skip("numpy not installed") from None
    elems = cfg["array_mib"] * (1 << 20) // 8
    arrays = [np.full(elems, i, dtype=np.float64) for i in range(cfg["arrays"])]

    def body():
        samples = []
        for _ in range(cfg["reps"]):
            gc.collect()
            t0 = time.perf_counter()
            res = peer.map(_tasks.identity, arrays, 1)
            samples.append(_ms(time.perf_counter() - t0))
            if len(res) != len(arrays) or any(r.shape != (elems,) or r[-1] != i
                                              for i, r in enumerate(res)):
                raise AssertionError("wrong payload results")
            del res
        return samples
    samples, notes = _pool(peer, body)
    return {"payload": ("ms", samples)}, notes


# ---- timeouts --------------------------------------------------------------

def _alive(pid):
    """True if ``pid`` exists and is not a zombie."""
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _group_members(pgid):
    """Live (non-zombie) pids whose process group is ``pgid``."""
    import psutil
    out = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and _alive(pid):
                out.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return out


class GroupMonitor(threading.Thread):
    """Waits for the task's info file, then polls until its processes are gone.

    If the worker leads/sits in a process group other than ours, "group" means
    every live process with that pgid (found with psutil).  Otherwise (a peer
    whose workers share the parent's group) it means the worker pid plus the
    grandchild the task started.  Zombies count as gone.
    """
    POLL = 0.005

    def __init__(self, info_path, timeout, cap, linger):
        super().__init__(daemon=True)
        self.info_path, self.timeout, self.cap, self.linger = info_path, timeout, cap, linger
        self.info = None
        self.deadline = None
        self.mode = None
        self.t_worker_gone = None
        self.t_all_gone = None
        self.leftover = []
        self.error = None
        self.stop = threading.Event()

    def _read_info(self):
        limit = time.monotonic() + self.timeout + self.cap
        while time.monotonic() < limit and not self.stop.is_set():
            if os.path.exists(self.info_path):
                try:
                    with open(self.info_path) as f:
                        return json.load(f)
                except (OSError, ValueError):
                    pass
            time.sleep(0.002)
        return None

    def _snapshot(self):
        info = self.info
        if self.mode == "pgid":
            members = _group_members(info["pgid"])
            gp = info.get("grandchild")
            if gp and gp not in members and _alive(gp):
                members.append(gp)  # escaped the group: still counts as a leftover
            return info["pid"] in members, members
        members = [p for p in (info["pid"], info.get("grandchild")) if p and _alive(p)]
        return info["pid"] in members, members

    def run(self):
        try:
            self.info = self._read_info()
            if self.info is None:
                self.error = "task never reported its pid/pgid"
                return
            self.deadline = self.info["t_start"] + self.timeout
            self.mode = "pgid" if self.info["pgid"] != os.getpgid(0) else "tree"
            limit = self.deadline + self.cap
            while not self.stop.is_set():
                worker_alive, members = self._snapshot()
                now = time.monotonic()
                if not worker_alive and self.t_worker_gone is None:
                    self.t_worker_gone = now
                if not members:
                    self.t_all_gone = now
                    return
                self.leftover = members
                if now > limit:
                    return
                if self.t_worker_gone is not None and now - self.t_worker_gone > self.linger:
                    return  # the worker is dead but something of its group outlived it
                time.sleep(self.POLL)
        except Exception:  # noqa: BLE001
            self.error = traceback.format_exc()


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _bounded(fn, limit):
    """Run fn() in a daemon thread; return (finished, exception-or-None)."""
    box = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            box["exc"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    return not t.is_alive(), box.get("exc")


HUNG_SHUTDOWN = []


def _timeout_scenario(peer, cfg, kind, fn):
    if not peer.supports_timeout:
        raise Skip(NO_TIMEOUT)
    import psutil  # noqa: F401  (required)
    late, wgone, ggone, notes = [], [], [], []
    tmpdir = tempfile.mkdtemp(prefix="pgx-bench-")
    for _rep in range(cfg["timeout_reps"]):
        info_path = os.path.join(tmpdir, "info-%s.json" % uuid.uuid4().hex)
        peer.start(N_WORKERS)
        mon = None
        try:
            peer.warm(N_WORKERS)
            mon = GroupMonitor(info_path, cfg["timeout"], cfg["cap"], cfg["linger"])
            mon.start()
            h = peer.submit_timeout(fn, (info_path, True), cfg["timeout"])
            resolved, outcome = peer.wait_resolved(h, cfg["timeout"] + cfg["cap"])
            t_res = time.monotonic()
            mon.join(cfg["timeout"] + 2 * cfg["cap"] + 5)
            mon.stop.set()
            if mon.error:
                raise RuntimeError("monitor: " + mon.error)
            if mon.deadline is None:
                raise RuntimeError("monitor did not finish")
            late.append(_ms(t_res - mon.deadline) if resolved else None)
            wgone.append(_ms(mon.t_worker_gone - mon.deadline) if mon.t_worker_gone else None)
            ggone.append(_ms(mon.t_all_gone - mon.deadline) if mon.t_all_gone else None)
            desc = "outcome=%s, worker pgid %s (%s), leftover=%d" % (
                outcome, "== parent's" if mon.mode == "tree" else "own",
                "leader" if mon.info["pgid"] == mon.info["pid"] else "not leader",
                len(mon.leftover) if not mon.t_all_gone else 0)
            notes.append(desc)
        finally:
            if mon is not None:
                mon.stop.set()
                info = mon.info
                if info:
                    # Clean up after the peer: the grandchild always, the worker when it
                    # is still spinning (cspin), the whole foreign group if any.
                    if info.get("grandchild"):
                        _kill(info["grandchild"])
                    for p in mon.leftover:
                        if p != info["pid"] or kind == "cspin":
                            _kill(p)
                    if mon.mode == "pgid":
                        try:
                            os.killpg(info["pgid"], signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
            ok, exc = _bounded(peer.shutdown, 20)
            if not ok:
                HUNG_SHUTDOWN.append(peer.name)
                notes.append("shutdown() did not return within 20 s")
            elif exc is not None:
                notes.append("shutdown() raised %s" % type(exc).__name__)
    shutil.rmtree(tmpdir, ignore_errors=True)
    # Collapse identical per-repetition notes: "... (3/3 reps)".
    counts = {}
    for n in notes:
        counts[n] = counts.get(n, 0) + 1
    notes = ["%s (%d/%d reps)" % (n, c, cfg["timeout_reps"]) for n, c in counts.items()]
    pre = kind + "_"
    return {pre + "late": ("ms", late), pre + "worker_gone": ("ms", wgone),
            pre + "group_gone": ("ms", ggone)}, notes


def sc_timeout_sleep(peer, cfg):
    return _timeout_scenario(peer, cfg, "sleep", _tasks.hang_sleep)


def sc_timeout_cspin(peer, cfg):
    return _timeout_scenario(peer, cfg, "cspin", _tasks.hang_cspin)


SCENARIO_FUNCS = {
    "startup": sc_startup, "submit": sc_submit, "map1": sc_map1, "map64": sc_map64,
    "roundtrip": sc_roundtrip, "payload": sc_payload,
    "timeout_sleep": sc_timeout_sleep, "timeout_cspin": sc_timeout_cspin,
}


def child_main(args):
    cfg = CONFIGS["quick" if args.quick else "full"]
    peer = make_peers()[args._child]
    out = open(args._out, "a", buffering=1)

    def emit(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()
    try:
        version = peer.check()
    except Exception as e:  # noqa: BLE001  (ImportError and anything the import raised)
        emit({"kind": "peer", "available": False,
              "note": "%s: %s" % (type(e).__name__, e),
              "traceback": traceback.format_exc()})
        os._exit(0)
    emit({"kind": "peer", "available": True, "version": version, "desc": peer.desc})
    dump = open(args._dump, "w")
    for sc in args._scenarios.split(","):
        sys.stderr.write("  [%s] %s ..." % (peer.name, sc))
        sys.stderr.flush()
        t0 = time.perf_counter()
        rec = {"kind": "scenario", "scenario": sc, "metrics": {}, "notes": [],
               "error": None, "skipped": None}
        dump.seek(0)
        dump.truncate()
        dump.write("hang guard: scenario %s exceeded %.0f s\n" % (sc, cfg["hang_guard"]))
        dump.flush()
        faulthandler.dump_traceback_later(cfg["hang_guard"], exit=True, file=dump)
        try:
            if peer.only is not None and sc not in peer.only:
                raise Skip(NOT_A_POOL)
            metrics, notes = SCENARIO_FUNCS[sc](peer, cfg)
            rec["metrics"] = {k: {"unit": u, "samples": s} for k, (u, s) in metrics.items()}
            rec["notes"] = notes
        except Skip as e:
            rec["skipped"] = str(e)
        except Exception as e:  # noqa: BLE001
            rec["error"] = "%s: %s" % (type(e).__name__, e)
            rec["traceback"] = traceback.format_exc()
        finally:
            faulthandler.cancel_dump_traceback_later()
        status = ("skipped" if rec["skipped"] else "ERROR" if rec["error"] else "ok")
        sys.stderr.write(" %s (%.1f s)\n" % (status, time.perf_counter() - t0))
        emit(rec)
        if HUNG_SHUTDOWN:
            break  # the pool is wedged; let the driver restart us for the rest
    out.close()
    sys.stderr.flush()
    os._exit(3 if HUNG_SHUTDOWN else 0)


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

METRICS = [
    # key, label, scenario
    ("startup_cold", "first pool of the process: start to first result", "startup"),
    ("startup_first", "pools back to back: start to first result", "startup"),
    ("startup", "pools back to back: start+1 task+shutdown", "startup"),
    ("submit", "{tiny} submits gathered", "submit"),
    ("map1", "map {tiny} chunksize=1", "map1"),
    ("map64", "map {tiny} chunksize=64", "map64"),
    ("rt_p50", "round trip p50", "roundtrip"),
    ("rt_p99", "round trip p99", "roundtrip"),
    ("payload", "map identity {arrays}x{array_mib}MiB", "payload"),
    ("sleep_late", "sleep: result late by", "timeout_sleep"),
    ("sleep_worker_gone", "sleep: worker gone after", "timeout_sleep"),
    ("sleep_group_gone", "sleep: group gone after", "timeout_sleep"),
    ("cspin_late", "C spin: result late by", "timeout_cspin"),
    ("cspin_worker_gone", "C spin: worker gone after", "timeout_cspin"),
    ("cspin_group_gone", "C spin: group gone after", "timeout_cspin"),
]
NONE_WORD = {"late": "never", "worker_gone": "alive", "group_gone": "leak"}


def _none_word(key):
    for suffix, w in NONE_WORD.items():
        if key.endswith(suffix):
            return w
    return "-"


def _fmt(x):
    if x >= 100:
        return "%.0f" % x
    if x >= 10:
        return "%.1f" % x
    return "%.2f" % x


def _summary(key, m):
    """(display string, numeric median or None)."""
    samples = m["samples"]
    good = [s for s in samples if s is not None]
    if not samples:
        return "-", None
    if len(good) == len(samples):
        med = statistics.median(good)
        return _fmt(med), med
    word = _none_word(key)
    if not good:
        return word, None
    return "%s %d/%d" % (word, len(samples) - len(good), len(samples)), None


def _md_row(cells, header=False):
    """One markdown table row (and the separator line after a header)."""
    row = "| " + " | ".join(str(c) for c in cells) + " |"
    if header:
        row += "\n|" + "|".join([" --- "] + [" ---: "] * (len(cells) - 1)) + "|"
    return row


#: What issues 6 and 20 ask of pgexecutor. ("speedup", key, base peer, at least)
#: compares base/value; ("ratio", key, base peer, at most) compares value/base;
#: ("ms", key, None, at most) is an absolute bound in milliseconds.
TARGETS = [
    ("tiny submit throughput", "speedup", "submit", BASELINE, 6.0),
    ("map, chunksize 1 (vs multiprocessing.Pool)", "speedup", "map1", "mp-pool-fork", 1.0),
    ("map, chunksize 64 (vs multiprocessing.Pool)", "speedup", "map64", "mp-pool-fork", 1.0),
    ("round trip p50", "ratio", "rt_p50", BASELINE, 0.3),
    ("start to first result, back to back (vs ppe-spawn)", "ratio", "startup_first",
     "ppe-spawn", 0.3),
    ("start to first result, the program's first pool (vs ppe-spawn)", "ratio",
     "startup_cold", "ppe-spawn", 0.3),
    ("payload", "speedup", "payload", BASELINE, 6.0),
    ("timeout lateness, Python (sleep)", "ms", "sleep_late", None, 10.0),
    ("timeout lateness, C spin", "ms", "cspin_late", None, 10.0),
    ("group gone after deadline, SIGTERM-proof task", "ms", "cspin_group_gone", None,
     PGX_KILL_GRACE * 1e3 + 50.0),
]


def _target_rows(table, ratio, scenarios):
    """(label, target, measured, met) for every target whose scenario ran."""
    scenario_of = {k: sc for k, _, sc in METRICS}
    out = []
    for label, how, key, base, bound in TARGETS:
        if scenario_of[key] not in scenarios:
            continue
        if how == "ms":
            v = table.get(("pgexecutor", key), (None, None))[1]
            target, measured = "<= %.0f ms" % bound, ("%.1f ms" % v if v is not None else "-")
            ok = v is not None and v <= bound
        else:
            r = ratio("pgexecutor", key, base)
            if how == "speedup":
                target = ">= %.1fx" % bound
                measured = "%.2fx" % (1 / r) if r else "-"
                ok = bool(r) and 1 / r >= bound
            else:
                target = "<= %.2fx" % bound
                measured = "%.2fx" % r if r is not None else "-"
                ok = r is not None and r <= bound
            if base != BASELINE:
                target += " of " + base
        out.append((label, target, measured, "yes" if ok else "**no**"))
        if key == "rt_p50":
            floor = ratio(FLOOR, key, base)
            if floor is not None:
                # What the target asks measured against what no pool can beat.
                out.append(("round trip p50 of %s (no pool: the floor)" % FLOOR,
                            "(reference)", "%.2fx" % floor, "-"))
    return out


def _run_peer(name, scenarios, cfg, quick, notes):
    """Run ``scenarios`` for one peer in children of its own (a new one after a
    scenario that hung or killed its child); ``(info, results)`` of the peer."""
    remaining = list(scenarios)
    results = {}
    info = None
    hangs = 0
    while remaining:
        fd, out = tempfile.mkstemp(prefix="pgx-bench-", suffix=".jsonl")
        os.close(fd)
        fd, dump = tempfile.mkstemp(prefix="pgx-bench-", suffix=".dump")
        os.close(fd)
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", name,
               "--_scenarios", ",".join(remaining), "--_out", out, "--_dump", dump]
        if quick:
            cmd.append("--quick")
        backstop = cfg["hang_guard"] * len(remaining) + 60
        try:
            rc = subprocess.run(cmd, timeout=backstop).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        strays = reap_strays(cfg["linger"])
        if strays:
            notes.append("%s: driver killed %d process(es) still running %.1f s after its "
                         "child exited: %s" % (name, len(strays), cfg["linger"],
                                               "; ".join(strays)))
        with open(out) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        with open(dump) as f:
            dump_text = f.read()
        os.unlink(out)
        os.unlink(dump)
        if not lines:
            notes.append("%s: child produced nothing (rc=%s)" % (name, rc))
            break
        head = lines[0]
        if not head["available"]:
            info = {"available": False, "note": head["note"]}
            notes.append("%s: SKIPPED, %s" % (name, head["note"]))
            if name == "pgexecutor" and head.get("traceback"):
                notes.append("pgexecutor import traceback:\n" + head["traceback"].rstrip())
            remaining = []
            break
        info = {"available": True, "version": head["version"], "desc": head["desc"]}
        for rec in lines[1:]:
            sc = rec["scenario"]
            remaining.remove(sc)
            if rec["skipped"]:
                if rec["skipped"] not in (NO_TIMEOUT, NOT_A_POOL):
                    notes.append("%s %s: skipped (%s)" % (name, sc, rec["skipped"]))
                results[sc] = {"skipped": rec["skipped"]}
                continue
            if rec["error"]:
                notes.append("%s %s: ERROR %s" % (name, sc, rec["error"]))
                if name == "pgexecutor":
                    notes.append("traceback:\n" + rec.get("traceback", "").rstrip())
                results[sc] = {"error": rec["error"], "traceback": rec.get("traceback")}
            for k, m in rec["metrics"].items():
                results[k] = m
            for n in rec["notes"]:
                notes.append("%s %s: %s" % (name, sc, n))
        if remaining and rc != 0:
            sys.stderr.write(" child died (rc=%s)\n" % rc)
            hangs += 1
            sc = remaining.pop(0)
            err = "child died (rc=%s) during %s" % (rc, sc)
            if dump_text.startswith("hang guard"):
                err = dump_text.splitlines()[0]
            notes.append("%s %s: ERROR %s" % (name, sc, err))
            if dump_text.strip():
                notes.append("stack at cutoff:\n" + "\n".join(dump_text.splitlines()[:40]))
            results[sc] = {"error": err, "dump": dump_text}
            if hangs >= 2 and remaining:
                notes.append("%s: two scenarios died/hung, not run: %s"
                             % (name, ",".join(remaining)))
                for sc in remaining:
                    results[sc] = {"error": "not run"}
                remaining = []
        elif remaining:
            notes.append("%s: child exited early, not run: %s" % (name, ",".join(remaining)))
            break
    return info, results


def _merge(into, more):
    """Add one round's results of a peer to those of the rounds before: samples
    are appended; an error or a skip stays as first seen."""
    for k, v in more.items():
        if k in into and "samples" in into[k] and "samples" in v:
            into[k]["samples"].extend(v["samples"])
        elif k not in into:
            into[k] = v


def driver_main(args):
    mode = "quick" if args.quick else "full"
    cfg = CONFIGS[mode]
    scenarios = SCENARIOS if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        sys.exit("unknown scenario(s) %s; choose from %s" % (bad, ",".join(SCENARIOS)))
    peers = PEER_ORDER if not args.peers else [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEER_ORDER]
    if bad:
        sys.exit("unknown peer(s) %s; choose from %s" % (bad, ",".join(PEER_ORDER)))
    if BASELINE not in peers:
        peers = [BASELINE] + peers  # ratios need the baseline from the same run
    compile_sources()
    subreaper = set_subreaper()

    print("pgexecutor benchmark (%s mode): Python %s on %s, %d CPUs, %d workers per pool"
          % (mode, platform.python_version(), platform.platform(), os.cpu_count() or 0, N_WORKERS))
    print("config: " + ", ".join("%s=%s" % kv for kv in cfg.items()))
    sys.stdout.flush()
    t_run = time.perf_counter()
    results, info, notes = {}, {}, []
    rounds = args.rounds if args.rounds is not None else cfg["rounds"]
    if rounds < 1:
        sys.exit("--rounds must be at least 1")
    for rnd in range(rounds):
        # Peers take turns, a different one first each round, so that a slow spell
        # of this machine does not fall on one peer's figures only.
        order = peers[rnd % len(peers):] + peers[:rnd % len(peers)]
        # The timeout scenarios measure lateness against a fixed bound, not against
        # a peer, and take long: the first round runs them.
        todo = [sc for sc in scenarios if rnd == 0 or sc in ROUND_SCENARIOS]
        if not todo:
            break
        for name in order:
            if info.get(name, {}).get("available") is False:
                continue
            sys.stderr.write("%s (round %d of %d):\n" % (name, rnd + 1, rounds))
            peer_info, peer_results = _run_peer(name, todo, cfg, args.quick, notes)
            if peer_info is not None and name not in info:
                info[name] = peer_info
            _merge(results.setdefault(name, {}), peer_results)
    elapsed = time.perf_counter() - t_run

    # ---- tables ------------------------------------------------------------
    shown = [p for p in peers if info.get(p, {}).get("available")]
    rows = [(k, lab.format(**cfg), sc) for k, lab, sc in METRICS if sc in scenarios]
    unit_of = {}
    for p in shown:
        for k, _, _ in rows:
            if k in results[p] and "unit" in results[p][k]:
                unit_of[k] = results[p][k]["unit"]

    def cell(p, k, sc):
        r = results[p]
        if k in r and "samples" in r[k]:
            return _summary(k, r[k])
        if sc in r and "error" in r[sc]:
            return "ERR", None
        if sc in r and "skipped" in r[sc]:
            return ("n/a" if r[sc]["skipped"] in (NO_TIMEOUT, NOT_A_POOL) else "skip"), None
        return "-", None

    table = {(p, k): cell(p, k, sc) for p in shown for k, _, sc in rows}
    label_of = {}
    for k, lab, _ in rows:
        label_of[k] = lab + (" [us]" if unit_of.get(k, "ms") == "us" else "")

    def ratio(p, k, base_peer=BASELINE):
        v = table.get((p, k), (None, None))[1]
        base = table.get((base_peer, k), (None, None))[1]
        return v / base if (v is not None and base) else None

    print()
    print("### Absolute figures")
    print()
    print("Median of all repetitions of %d round(s); ms unless noted; lower is better." % rounds)
    print()
    print(_md_row(["figure"] + shown, header=True))
    for k, _, _ in rows:
        print(_md_row([label_of[k]] + [table[(p, k)][0] for p in shown]))
    print()
    print("### Ratio to %s" % BASELINE)
    print()
    print("Value / %s's value in the same run; below 1.00x = faster than the stdlib fork pool."
          % BASELINE)
    print()
    print(_md_row(["figure"] + shown, header=True))
    for k, lab, _ in rows:
        cells = []
        for p in shown:
            r = ratio(p, k)
            cells.append("%.2fx" % r if r is not None else "-")
        if all(c == "-" for c in cells):
            continue
        print(_md_row([lab] + cells))
    if "pgexecutor" in shown:
        print()
        print("### pgexecutor against the targets of issues 6 and 20")
        print()
        print(_md_row(["figure", "target", "measured", "met"], header=True))
        for label, target, measured, met in _target_rows(table, ratio, scenarios):
            print(_md_row([label, target, measured, met]))
    print()
    print("Peers: " + "; ".join("%s=%s" % (p, info[p]["version"]) for p in shown))
    if notes:
        print("Notes:")
        for n in notes:
            print("  - " + n.replace("\n", "\n    "))
    print("Total wall time: %.1f s%s" % (elapsed, "" if subreaper else " (no subreaper: strays not reaped)"))

    if args.json:
        doc = {"mode": mode, "config": cfg, "python": platform.python_version(),
               "platform": platform.platform(), "cpus": os.cpu_count(), "workers": N_WORKERS,
               "baseline": BASELINE, "peers": info, "scenarios": scenarios,
               "results": {}, "notes": notes, "wall_time_s": elapsed}
        for p in peers:
            doc["results"][p] = {}
            for k, v in results.get(p, {}).items():
                v = dict(v)
                if "samples" in v:
                    good = [s for s in v["samples"] if s is not None]
                    v["median"] = statistics.median(good) if len(good) == len(v["samples"]) and good else None
                    base = results.get(BASELINE, {}).get(k, {})
                    bgood = [s for s in base.get("samples", []) if s is not None]
                    if v["median"] is not None and bgood and len(bgood) == len(base["samples"]):
                        bmed = statistics.median(bgood)
                        v["ratio_to_baseline"] = v["median"] / bmed if bmed else None
                doc["results"][p][k] = v
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print("JSON written to %s" % args.json)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (2,000 tiny tasks, 200 round trips, 10 arrays, 1 timeout rep)")
    ap.add_argument("--only", metavar="NAME,...",
                    help="scenarios to run: " + ",".join(SCENARIOS))
    ap.add_argument("--peers", metavar="NAME,...",
                    help="peers to run (%s is always added): %s" % (BASELINE, ",".join(PEER_ORDER)))
    ap.add_argument("--rounds", type=int, metavar="N",
                    help="run every peer N times in turn, samples pooled (default: 3, --quick 1)")
    ap.add_argument("--json", metavar="OUT", help="also write all samples to this JSON file")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_scenarios", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_dump", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        child_main(args)
    else:
        driver_main(args)


if __name__ == "__main__":
    main()
