"""A small asyncio service whose request handlers run jobs with a deadline.

Run it with ``python examples/asyncio_service.py`` (``--json PATH`` for a
machine-readable summary). It needs nothing beyond pgexecutor and takes a few seconds.

The service listens on a local TCP port. A client sends one line, the seconds of work
it wants; the handler runs the job in a ProcessGroupExecutor with ``await ex.run(...)``
under a deadline, and answers the result. Each job starts a child process (standing
in for a renderer, a converter, a solver) and waits for it. Three clients:

* ``fast`` asks for 0.2 s of work: it gets its answer.
* ``slow`` asks for 60 s, past the handler's deadline (1.5 s): ``asyncio.wait_for``
  cancels the await, so the job is stopped, child included, and the client gets
  ``deadline exceeded``.
* ``gone`` asks for 60 s and hangs up after the job started, as a browser tab that
  was closed. The handler notices the disconnect and cancels its job: the job's whole
  process tree is stopped at once, instead of holding a CPU for a minute for nobody.

Cancelling an awaited ``ex.run()`` stops the task: its worker's process group gets
SIGINT (the job sees KeyboardInterrupt, its ``finally`` blocks run), then SIGTERM and
SIGKILL within ``kill_grace``. The script checks its own outcome: each answer, and
that every process a stopped job started is gone (by pid and start time); it exits 1
if anything is off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

from pgexecutor import ProcessGroupExecutor, spawned_groups

DEADLINE = 1.5  # seconds a handler gives its job


def job(seconds: float, report: str) -> str:
    """The work: a child process that runs ``seconds``; reports both processes first."""
    child = subprocess.Popen(["sleep", str(seconds)])
    procs = [[p, psutil.Process(p).create_time()] for p in (os.getpid(), child.pid)]
    with open(report + ".tmp", "w") as f:
        json.dump(procs, f)
    os.replace(report + ".tmp", report)
    try:
        child.wait()
    finally:
        child.kill()  # stopped early (KeyboardInterrupt): do not leave the child behind
    return f"worked {seconds:g}s"


# ---------------------------------------------------------------- the service


def make_handler(ex: ProcessGroupExecutor, reports: str) -> Any:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name, seconds = (await reader.readline()).decode().split()
        report = os.path.join(reports, name)
        work = asyncio.ensure_future(
            asyncio.wait_for(ex.run(job, float(seconds), report), DEADLINE)
        )
        hung_up = asyncio.ensure_future(reader.read(1))  # b"": the client went away
        await asyncio.wait({work, hung_up}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()  # nobody will read the answer: stop the job and its tree
            await asyncio.gather(work, return_exceptions=True)
            print(f"  [{name}] client went away; its job was stopped")
            writer.close()
            return
        hung_up.cancel()
        try:
            answer = work.result()
        except TimeoutError:
            answer = "deadline exceeded"
        print(f"  [{name}] answered: {answer}")
        writer.write(answer.encode() + b"\n")
        await writer.drain()
        writer.close()

    return handle


async def client(port: int, name: str, seconds: float, reports: str, hang_up: bool) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{name} {seconds}\n".encode())
    await writer.drain()
    if hang_up:
        report = os.path.join(reports, name)
        while not os.path.exists(report):  # the job has started (and its child)
            await asyncio.sleep(0.05)
        writer.close()
        return "hung up"
    answer = (await reader.readline()).decode().strip()
    writer.close()
    return answer


async def serve_three_clients(ex: ProcessGroupExecutor, reports: str) -> dict[str, str]:
    server = await asyncio.start_server(make_handler(ex, reports), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        answers = await asyncio.gather(
            client(port, "fast", 0.2, reports, hang_up=False),
            client(port, "slow", 60, reports, hang_up=False),
            client(port, "gone", 60, reports, hang_up=True),
        )
    return dict(zip(["fast", "slow", "gone"], answers, strict=True))


# ---------------------------------------------------------------- the checks


def alive(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs: list[list[float]], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        left = [int(pid) for pid, ctime in procs if alive(int(pid), ctime)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write a summary here")
    args = parser.parse_args()
    reports = tempfile.mkdtemp(prefix="pgexecutor-asyncio-")
    started = time.monotonic()
    with ProcessGroupExecutor(max_workers=3, kill_grace=2.0) as ex:
        answers = asyncio.run(serve_three_clients(ex, reports))
        procs = {}
        for name in answers:
            with open(os.path.join(reports, name)) as f:
                procs[name] = json.load(f)
        # The stopped jobs' trees are gone within kill_grace (checked with psutil).
        survivors = {name: wait_gone(procs[name], 10.0) for name in ("slow", "gone")}
    elapsed = time.monotonic() - started
    ok = (
        answers == {"fast": "worked 0.2s", "slow": "deadline exceeded", "gone": "hung up"}
        and not any(survivors.values())
    )
    print(f"answers: {answers}")
    print(f"stopped jobs' processes still alive: {survivors}")
    print(f"{'OK' if ok else 'FAILED'} in {elapsed:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "answers": answers,
                    "procs": procs,
                    "survivors": survivors,
                    "elapsed": elapsed,
                    "worker_pgids": sorted(spawned_groups()),
                    "stats": ex.stats(),
                },
                f,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
