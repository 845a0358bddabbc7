"""Journals for ``map``: sweeps that survive a killed parent, Ctrl-C and reruns.

::

    for r in ex.map(mesh, geometries, journal="sweep.db", return_exceptions=True): ...
    ex.map(mesh, geometries, journal=Journal("sweep.db", key=lambda g: g.id))
    python -m pgexecutor journal sweep.db [--json] [--html report.html]

Each input has one row in an SQLite file, found by its key; the row holds the
input's latest outcome: for ``ok`` the result as the worker pickled it, for the
others the exception and a one-line summary. The promises, and where each is kept:

* durable before visible: an outcome is committed before the iterator yields it
  (``_writer``: group commit);
* exactly what the task returned, an object of its own at every position
  (``_records``: the stored forms; ``_mapping``: who gets which object);
* keys that cannot collide: different functions never share rows (``_keys``);
* errors that say their cause, none losing a committed outcome (``_store``);
* only outcomes a task produced are recorded (``_records.outcome_of``);
* one map per journal at a time (``_store``: the owner row).

The parts: ``_keys`` (Journal, keys), ``_store`` (the file, its errors, the lock),
``_records`` (what is recorded, in which bytes), ``_writer`` (the writer thread),
``_mapping`` (the map runner and its iterator), ``_report`` (``summarize``, the
command line's text, ``unlock``), ``_html`` (the HTML report). Only ``_mapping``
runs in the map() call's thread and the iterator; ``_writer`` in its own thread;
nothing here in a worker (the chunk runner is ``pgexecutor._journal_chunk``, so
workers never import sqlite3).
"""

from __future__ import annotations

from ._html import write_report
from ._keys import Journal, default_key, function_name
from ._mapping import JournaledMap, journal_map
from ._report import COMPANIONS_NOTE, format_summary, summarize, unlock
from ._store import owner_alive

__all__ = [
    "COMPANIONS_NOTE",
    "Journal",
    "JournaledMap",
    "default_key",
    "format_summary",
    "function_name",
    "journal_map",
    "owner_alive",
    "summarize",
    "unlock",
    "write_report",
]
