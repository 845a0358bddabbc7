"""MkDocs hook: the docstrings are written for reading in the source, with Sphinx
roles (:class:`X`, :func:`f`) and ``Example::`` before a literal block. mkdocstrings
renders a role as its text followed by the code span, and keeps the double colon:
drop the role's text and one colon, so the page shows just ``X`` and ``Example:``."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|attr|data|exc|mod|obj):(?=<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub("", html).replace("::</p>", ":</p>")
