"""MkDocs hook: the docstrings are written for reading in the source, with Sphinx
roles (:class:`X`, :func:`~pgexecutor.f`) and ``Example::`` before a literal block.
mkdocstrings renders a role as its text followed by a code span, and keeps the double
colon. This turns each role into a cross-reference that mkdocs-autorefs resolves later
in the build (to ``pgexecutor.X`` unless the name is already qualified; one that names
nothing documented stays plain code, as ``optional`` asks), and drops one colon."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|attr|data|exc|mod|obj):<code>(~?)([\w.]+)</code>")


# Names the docstrings use unqualified that live outside the pgexecutor namespace's
# reference pages (Journal is pgexecutor.Journal at run time, through a lazy import).
_HOMES = {
    "Journal": "pgexecutor.journal.Journal",
    "pgexecutor.Journal": "pgexecutor.journal.Journal",
    "ProcessGroupPlugin": "pgexecutor.dask.ProcessGroupPlugin",
    "DaskProcessGroupExecutor": "pgexecutor.dask.DaskProcessGroupExecutor",
}


def _reference(match: re.Match[str]) -> str:
    short, name = match.group(1), match.group(2)
    identifier = _HOMES.get(name) or (
        name if name.startswith("pgexecutor.") else f"pgexecutor.{name}"
    )
    shown = name.rsplit(".", 1)[-1] if short else name
    return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_reference, html).replace("::</p>", ":</p>")
