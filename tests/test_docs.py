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


def test_every_public_name_has_an_api_reference_entry():
    """Each name of ``pgexecutor.__all__`` (and the cluster modules' ``__all__``) is
    rendered by a ``::: ...`` line of docs/reference/, so a new public name cannot go
    undocumented (Journal is rendered from its home, pgexecutor.journal)."""
    import glob

    import pgexecutor

    text = ""
    for page in glob.glob(os.path.join(ROOT, "docs", "reference", "*.md")):
        with open(page, encoding="utf-8") as f:
            text += f.read()
    rendered = {line.split()[1] for line in text.splitlines() if line.startswith("::: ")}
    names = [f"pgexecutor.{n}" for n in pgexecutor.__all__]
    names += ["pgexecutor.ray.RayExecutor", "pgexecutor.dask.ProcessGroupPlugin",
              "pgexecutor.dask.DaskProcessGroupExecutor"]
    homes = {"pgexecutor.Journal": "pgexecutor.journal.Journal"}
    missing = [n for n in names if homes.get(n, n) not in rendered]
    assert not missing, f"public names without a reference entry: {missing}"
