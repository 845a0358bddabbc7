"""The chunk runner of a journaled ``map(chunksize > 1)``; it runs in the worker.

Apart from ``journal.py`` so that a worker does not import sqlite3 to run it.
"""

from __future__ import annotations

import time
from typing import Any

from . import _protocol as proto


def run_chunk_timed(
    fn: Any, chunk: list[tuple[Any, ...]]
) -> tuple[list[tuple[float, Any]], dict[int, bytes] | None]:
    """``_worker.run_chunk`` that also times each item, so the journal can record
    every input's own duration.

    Returns ``(values, errors)`` shaped as run_chunk's (the progress bar reads
    ``errors``), except that each value is ``(seconds, value)``, with value None where
    the item raised; ``errors`` maps such an item's index to its encoded exception.
    """
    values: list[tuple[float, Any]] = []
    errors: dict[int, bytes] | None = None
    for args in chunk:
        t0 = time.perf_counter()
        try:
            value = fn(*args)
        except BaseException as exc:  # SystemExit too: the item's outcome (see run_chunk)
            if errors is None:
                errors = {}
            errors[len(values)] = proto.dump_exception(exc)
            value = None
        values.append((time.perf_counter() - t0, value))
    return values, errors
