"""Driver for test_resources: the pool under a low open-files limit (RLIMIT_NOFILE).

usage: fd_limit_driver.py MODE
MODE "count": how many fds the parent holds per worker (5 workers running).
MODE "degrade": the limit lets only a few of 40 workers start; every task must still
    succeed on the workers that did, and the failed start is logged once.
MODE "256": macOS's default limit (256) and 40 workers, from a cold start: whether
    or not every worker fits, every task succeeds.
MODE "none": the limit lets no worker start; queued tasks fail (after a shortened
    give-up time) with an error naming the cause, and once the limit is raised again
    the same executor runs new tasks.
The limit is lowered in this process only (never in the test process). Prints one
"RESULT {json}" line, with the worker groups it created under "groups".
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import restore_sigint  # noqa: E402

import pgexecutor  # noqa: E402
from pgexecutor import ProcessGroupExecutor, _scheduling  # noqa: E402


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def open_fds() -> list[int]:
    return sorted(int(n) for n in os.listdir("/dev/fd"))


def limit_with_room(room: int) -> int:
    """The lowest fd limit under which this process can open ``room`` more fds (a
    new fd takes the lowest free number, which must lie below the limit; fds this
    process inherited may sit anywhere, even above)."""
    fds = set(open_fds())
    limit, free = 0, 0
    while free < room:
        if limit not in fds:
            free += 1
        limit += 1
    return limit


def lower_limit(to: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (to, hard))
    return soft, hard


def started_then_wait(path, gate):
    open(path, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def short_task(i):
    time.sleep(0.2)
    return os.getpid()


def wait_files(paths, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            raise AssertionError(f"tasks did not start: {paths}")
        time.sleep(0.01)


def count(tmp: str) -> dict:
    gate = os.path.join(tmp, "gate")
    # Fresh interpreters: the default start would begin its template (one socket)
    # and a standby (five fds) at a moment of its own, in the middle of the count.
    with ProcessGroupExecutor(max_workers=5, mp_context="fresh") as ex:
        first = [ex.submit(started_then_wait, os.path.join(tmp, "s0"), gate)]
        wait_files([os.path.join(tmp, "s0")])
        with_one = len(open_fds())
        marks = [os.path.join(tmp, f"s{i}") for i in range(1, 5)]
        more = [ex.submit(started_then_wait, m, gate) for m in marks]
        wait_files(marks)
        with_five = len(open_fds())
        open(gate, "w").close()
        pids = {f.result(timeout=60) for f in first + more}
    return {"per_worker": (with_five - with_one) / 4, "workers": len(pids)}


def degrade(records: Records, limit: int | None = None) -> dict:
    ex = ProcessGroupExecutor(max_workers=40)
    if limit is None:
        ex.submit(short_task, 0).result(timeout=60)  # the guardian and one worker run
        # Room for a few more workers (6 fds each on Linux, 8 while one starts).
        limit = limit_with_room(6 * 4 + 3)
    soft, hard = lower_limit(limit)
    try:
        fs = [ex.submit(short_task, i) for i in range(40)]
        outcomes = []
        for f in fs:
            try:
                outcomes.append(["ok", f.result(timeout=120)])
            except BaseException as exc:  # noqa: BLE001
                outcomes.append(["error", repr(exc)])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    ex.shutdown(wait=True)
    return {
        "limit": limit,
        "ok": sum(1 for o in outcomes if o[0] == "ok"),
        "errors": [o[1] for o in outcomes if o[0] != "ok"][:3],
        "workers": len({o[1] for o in outcomes if o[0] == "ok"}),
    }


def none(records: Records) -> dict:
    _scheduling.START_GIVE_UP = 1.0  # the test's patience, not the library's 30 s
    ex = ProcessGroupExecutor(max_workers=4)
    soft, hard = lower_limit(limit_with_room(1))
    try:
        fs = [ex.submit(short_task, i) for i in range(3)]
        errors = [repr(f.exception(timeout=60)) for f in fs]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    after = ex.submit(short_task, 0).result(timeout=60)  # the pool is not broken
    ex.shutdown(wait=True)
    return {"errors": errors, "after": isinstance(after, int)}


def main() -> None:
    mode = sys.argv[1]
    records = Records()
    logger = logging.getLogger("pgexecutor")
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    if mode == "count":
        data = count(sys.argv[2])
    elif mode == "degrade":
        data = degrade(records)
    elif mode == "256":
        data = degrade(records, 256)
    else:
        data = none(records)
    data["refusals_warned"] = sum(
        1 for r in records.records
        if r.levelno >= logging.WARNING and "could not start a worker" in r.getMessage()
    )
    data["refusals"] = sum(1 for r in records.records if "could not start a worker" in r.getMessage())
    data["groups"] = sorted(pgexecutor.spawned_groups())
    print("RESULT " + json.dumps(data), flush=True)


if __name__ == "__main__":
    restore_sigint()
    main()
