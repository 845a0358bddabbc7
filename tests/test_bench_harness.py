"""The benchmark's own machinery: the ``pipe-floor`` reference and the rounds.

A figure of ``benchmarks/bench.py`` is only as good as its harness: the floor
must really answer each call (a floor that echoed bytes without running the call
would look cheaper than any pool could be), must leave no process behind, and the
rounds must pool every round's samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psutil

from benchmarks import _tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_bench() -> Any:
    """bench.py puts the repository on PYTHONPATH when imported (for its spawned
    workers): not in this process, whose later tests start workers of their own."""
    saved = os.environ.get("PYTHONPATH")
    try:
        from benchmarks import bench as module
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return module


bench = _import_bench()


def test_pipe_floor_runs_each_call_in_its_child_and_leaves_nothing() -> None:
    peer = bench.PipeFloorPeer()
    peer.start(2)
    pids = [pid for pid, _w, _r in peer.children]
    try:
        assert peer.warm(2) == set(pids)  # each child ran the call itself
        assert os.getpid() not in pids
        for i in (0, 7, -3, 10**30):
            assert peer.roundtrip(_tasks.noop, i) == i
        big = "x" * (1 << 20)  # longer than one read: the frame is read whole
        assert peer.roundtrip(_tasks.noop, big) == big
    finally:
        peer.shutdown()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        try:
            os.waitpid(pid, os.WNOHANG)
            raise AssertionError(f"child {pid} was not reaped by shutdown")
        except ChildProcessError:
            pass


def test_merge_pools_samples_and_keeps_the_first_error() -> None:
    into = {"rt_p50": {"unit": "us", "samples": [1.0, 2.0]}, "payload": {"error": "first"}}
    bench._merge(into, {
        "rt_p50": {"unit": "us", "samples": [3.0]},
        "payload": {"error": "second"},
        "submit": {"unit": "ms", "samples": [5.0]},
    })
    assert into["rt_p50"]["samples"] == [1.0, 2.0, 3.0]
    assert into["payload"] == {"error": "first"}
    assert into["submit"]["samples"] == [5.0]


def test_rounds_pool_the_samples_of_every_round(tmp_path: os.PathLike[str]) -> None:
    out = os.path.join(str(tmp_path), "out.json")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--quick",
         "--only", "roundtrip", "--peers", "pgexecutor,pipe-floor", "--rounds", "2", "--json", out],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.load(open(out))
    reps = bench.CONFIGS["quick"]["reps"]
    for peer in ("ppe-fork", "pgexecutor", "pipe-floor"):
        samples = doc["results"][peer]["rt_p50"]["samples"]
        assert len(samples) == 2 * reps, (peer, samples)
        assert all(s > 0 for s in samples)
    assert "round 2 of 2" in proc.stderr
    assert "(reference)" in proc.stdout  # the floor under the round-trip target
