"""The documentation site builds with ``mkdocs build --strict``.

Strict mode turns every warning into a failure: a page that links to a missing page or
anchor, a page left out of the navigation, and an API reference (``::: pgexecutor.X``)
naming an object that no longer exists (mkdocstrings reads the docstrings from the
source, so a renamed function fails the build). Needs the ``doc`` extra; without it
the test is skipped, or fails under PGEXECUTOR_REQUIRE_EXTRAS (CI).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, require_extra


@pytest.mark.timeout(300)
def test_mkdocs_build_strict_succeeds(tmp_path):
    require_extra("mkdocs", "doc")
    require_extra("material", "doc")
    require_extra("mkdocstrings_handlers.python", "doc")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The reference pages were generated from the docstrings, not left empty.
    reference = (site / "reference" / "pgexecutor" / "index.html").read_text()
    assert 'id="pgexecutor.ProcessGroupExecutor.max_workers"' in reference
