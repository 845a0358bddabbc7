"""The task of tests/test_journal.py, importable by workers without importing pytest."""

import os
import time

SIDE_ENV = "PGX_JOURNAL_TEST_SIDE"
T = 30.0  # a safety net against hangs, never a performance bound


def task(x):
    """Record that ``x`` ran, then: square it, or raise / crash / hang / wait."""
    side = os.environ.get(SIDE_ENV)
    if side:
        with open(side, "a") as f:
            f.write(f"{x!r}\n")
    if x == "raise":
        raise ValueError("bad input")
    if x == "crash":
        os._exit(3)
    if x == "hang":
        time.sleep(60)
    if isinstance(x, tuple) and x[0] == "big":
        return bytes(range(256)) * (x[1] // 256)
    if isinstance(x, str) and x.startswith("gate"):
        deadline = time.monotonic() + T
        while not os.path.exists(f"{side}.{x}") and time.monotonic() < deadline:
            time.sleep(0.01)
        return x
    return x * x
