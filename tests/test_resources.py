"""Limits of the machine and of the user's code meet the pool: exhaustion of fds or
processes degrades the pool (never fails work a worker could run), a hung initializer
is bounded, and the drop-in details that embedded Pythons and shutdown rely on.

Tests that lower process limits do it in a subprocess driver (tests/scripts/), never
in the test process itself.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import wait

import pytest
from _resource_tasks import gated, noop, touch, wait_path

from pgexecutor import ProcessGroupExecutor

T = 60  # generous bound for anything that should take well under a second

# ----------------------------------------------------------------- cancel_futures


def test_shutdown_cancel_futures_cancels_every_task_not_yet_begun(tmp_path):
    """Two tasks running, three submitted behind them: the three are cancelled, every
    time, wherever they were (queued, or written ahead into a busy worker's pipe after
    a run of tiny tasks made the pool prefetch), and the two running ones complete,
    as CPython's semantics say (a task that began runs to completion)."""
    for loop in range(20):
        ex = ProcessGroupExecutor(max_workers=2)
        try:
            assert list(ex.map(noop, range(200))) == list(range(200))  # tiny: prefetching
            marks = [str(tmp_path / f"{loop}-started-{i}") for i in range(2)]
            gate = str(tmp_path / f"{loop}-gate")
            running = [ex.submit(gated, m, gate, "done") for m in marks]
            queued = [ex.submit(noop, i) for i in range(3)]
            assert all(wait_path(m) for m in marks)
            ex.shutdown(wait=False, cancel_futures=True)
            done, _ = wait(queued, timeout=T)
            assert len(done) == 3, f"loop {loop}: the queued tasks did not end"
            assert [f.cancelled() for f in queued] == [True] * 3, (
                f"loop {loop}: {[f._state for f in queued]}"
            )
            assert not any(f.done() for f in running)
            touch(gate)
            assert [f.result(timeout=T) for f in running] == ["done", "done"]
            assert ex.stats()["cancelled"] == 3
        finally:
            ex.shutdown(wait=True)
