"""README.md's promises that a reader acts on: its short example, its commands and links.

The example is taken from the README itself (its first ``python`` code block, and the
``text`` block after it that shows the output), run as a script of its own, as a
reader would paste it, and its output compared line for line. The test then checks,
with the worker groups the script reports, that nothing it started survived: the hung
task's ``sleep`` child above all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
from conftest import ROOT, format_survivors, run_in_own_session, survivors_of

README = os.path.join(ROOT, "README.md")

# Appended to the example: which worker groups the script created (for the leak check).
REPORT_GROUPS = """

import json as _json
import pgexecutor as _pgx
print("RESULT " + _json.dumps(sorted(_pgx.spawned_groups())))
"""


def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced code block as (language, body)."""
    return [
        (m.group(1), m.group(2))
        for m in re.finditer(r"^```(\w*)\n(.*?)^```\s*$", text, re.MULTILINE | re.DOTALL)
    ]


def example_and_output(text: str) -> tuple[str, list[str]]:
    """The first ``python`` block and the first ``text`` block after it."""
    blocks = fenced_blocks(text)
    for i, (lang, body) in enumerate(blocks):
        if lang == "python":
            for later_lang, later_body in blocks[i + 1 :]:
                if later_lang == "text":
                    return body, later_body.strip().splitlines()
            break
    raise AssertionError("README.md has no python block followed by a text block of its output")


def run_script(tmp_path: Any, source: str, limit: float) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as ``python readme_example.py`` in its own session."""
    script = tmp_path / "readme_example.py"
    script.write_text(source)
    return run_in_own_session(
        [sys.executable, str(script)], str(tmp_path), limit, "the README's example"
    )


@pytest.mark.timeout(150)
def test_readme_example_prints_what_the_readme_shows_and_leaves_nothing(tmp_path):
    code, expected = example_and_output(readme())
    assert "ProcessGroupExecutor" in code and len(code.splitlines()) <= 15
    proc = run_script(tmp_path, code + REPORT_GROUPS, limit=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    reports = [ln for ln in lines if ln.startswith("RESULT ")]
    assert len(reports) == 1, proc.stdout
    printed = [ln for ln in lines if not ln.startswith("RESULT ")]
    assert printed == expected, f"printed:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    groups = json.loads(reports[0][len("RESULT ") :])
    assert groups, "the example created no worker group"
    left = survivors_of(set(groups))
    assert not left, "processes of the example's worker groups survived:\n" + format_survivors(
        left
    )


def test_readme_keeps_the_test_command_that_ci_runs():
    """.ci/run takes the test command from the README's first line that matches this;
    it must install the doc extra, which tests/test_docs.py needs."""
    commands = re.findall(
        r"^python -m pip install -e '(.*)' && python -m pytest$", readme(), re.MULTILINE
    )
    assert commands, "README.md lost its test command line"
    extras = set(commands[0].strip(".[]").split(","))
    assert {"test", "doc"} <= extras, commands[0]


def test_readme_links_point_to_files_that_exist():
    """The README's relative links (into docs/, LICENSE) name files of this repository,
    so a renamed page breaks this test as it would break the build of the docs."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme())
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert local, "README.md links to nothing of the repository"
    missing = [link for link in local if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing, missing
