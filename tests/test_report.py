"""What a run reports: the counters (``pgexecutor.counters``) as the progress bar,
``stats()`` and the journal command show them, and the journal's HTML report
(``python -m pgexecutor journal PATH --html FILE``), opened in a real headless
Chromium where the system has one.

The journal is made by real processes (successes, an exception whose message is
HTML, a timeout, a crash); each test that runs them proves no worker group survived.
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter

import _report_tasks as rt
import psutil
import pytest
from conftest import ROOT, format_survivors, survivors_of

from pgexecutor import Journal, ProcessGroupExecutor, counters, spawned_groups

pytestmark = pytest.mark.timeout(180)

INPUTS = [5, 1, 12, 3, 8, "raise", "hang", 2, "crash", 7]
OKS = [x for x in INPUTS if isinstance(x, int)]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "pgexecutor", "journal", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


@pytest.fixture(scope="module")
def journal(tmp_path_factory) -> str:
    """A journal of one map over INPUTS on two workers (quarantine after one kill:
    the timeout and the crash are quarantined), its worker groups proven gone."""
    path = str(tmp_path_factory.mktemp("report") / "sweep.db")
    before = spawned_groups()
    with ProcessGroupExecutor(2, task_timeout=2.0, kill_grace=0.2) as ex:
        out = list(ex.map(
            rt.work, INPUTS, journal=Journal(path, quarantine_after=1), return_exceptions=True
        ))
    assert [o for o in out if not isinstance(o, BaseException)] == [x * x for x in OKS]
    left = survivors_of(spawned_groups() - before)
    assert not left, format_survivors(left)
    return path


# ---------------------------------------------------------------- the page's content


class Page(html.parser.HTMLParser):
    """The elements of a page: (tag, attributes) in order, and its text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def having(self, tag: str, cls: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == tag and a.get("class") == cls]


def write_page(journal: str, tmp_path) -> str:
    out = tmp_path / "report.html"
    run = cli(journal, "--html", str(out))
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout and "10 inputs" in run.stdout
    return out.read_text(encoding="utf-8")


def test_html_report_draws_counts_durations_timeline_and_kills(journal, tmp_path):
    page = Page(write_page(journal, tmp_path))
    cards = {a["data-count"]: a for a in page.having("div", "card")}
    text = " ".join(page.text)
    # The counts, as pgexecutor.counters defines them.
    assert set(cards) == {"ok", "failed", "error", "timeout", "crashed", "memory", "quarantined"}
    for name, n in {"ok": 7, "failed": 3, "error": 1, "timeout": 1, "crashed": 1,
                    "quarantined": 2}.items():
        assert f"{n} {name}" in " ".join(text.split()), name
    shares = {a["data-status"]: float(a["width"]) for a in page.having("rect", "share")}
    assert set(shares) == {"ok", "error", "timeout", "crashed"}
    assert shares["ok"] == pytest.approx(1000 * 7 / 10, abs=0.01)
    # The histogram holds every input with a run time, once.
    bins = Counter()
    for a in page.having("rect", "bin"):
        bins[a["data-status"]] += int(a["data-n"])
    timed = json.loads(cli(journal, "--json").stdout)
    conn = sqlite3.connect(journal)
    try:
        durations = dict(conn.execute("SELECT outcome, COUNT(*) FROM inputs "
                                      "WHERE duration IS NOT NULL GROUP BY outcome"))
    finally:
        conn.close()
    assert dict(bins) == durations and bins["ok"] == 7 and timed["inputs"] == 10
    # The timeline: one bar per timed input, on the lane of the worker that ran it,
    # and a cross where a worker was killed (the timeout) or died (the crash).
    tasks = page.having("rect", "task")
    assert Counter(a["data-status"] for a in tasks) == Counter(durations)
    kills = page.having("g", "kill")
    assert sorted(a["data-status"] for a in kills) == ["crashed", "timeout"]
    pids = {r["pid"] for r in timed["slowest"]} | {r["pid"] for r in timed["failed"]}
    for pid in pids - {None}:
        assert f"pid {pid}" in text  # a lane per worker
    assert len(pids) >= 3  # two workers, and the replacements of the killed ones
    # The tables: the slowest first, each failed input with its error.
    assert timed["slowest"][0]["input"] == "'hang'"
    assert text.index("'hang'", text.index("Slowest")) < text.index("Failed inputs")
    assert "Failed inputs (3)" in text
    assert "exited with status 3" in text and "exceeded its timeout of 2 s" in text


def test_html_report_escapes_user_text_and_needs_nothing_from_outside(journal, tmp_path):
    raw = write_page(journal, tmp_path)
    page = Page(raw)
    assert rt.NASTY in " ".join(page.text)  # shown as text ...
    assert "<script" not in raw.lower()  # ... never as markup: the page has no script
    assert "&lt;script&gt;alert(&#x27;boom&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in raw
    assert not [t for t, _ in page.elements if t in ("script", "img", "link", "iframe")]
    for _, attrs in page.elements:
        for name, value in attrs.items():
            assert name not in ("src", "href") and not name.startswith("on"), (name, value)
    assert "http://" not in raw and "https://" not in raw and "url(" not in raw


def test_html_report_that_cannot_be_made_fails_in_one_line(journal, tmp_path):
    run = cli(str(tmp_path / "nope.db"), "--html", str(tmp_path / "r.html"))
    assert run.returncode == 2 and "no such journal" in run.stderr
    assert not (tmp_path / "r.html").exists()
    where = tmp_path / "no" / "such" / "dir" / "r.html"
    run = cli(journal, "--html", str(where))
    assert run.returncode == 2 and "No such file or directory" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


# ---------------------------------------------------------------- the text report


def test_cli_lists_quarantined_inputs_as_quarantined_in_slowest(journal):
    run = cli(journal, "--top", "20")
    assert run.returncode == 0, run.stderr
    slowest = run.stdout.split("slowest:")[1].split("\n\n")[0]
    hang = next(line for line in slowest.splitlines() if "'hang'" in line)
    assert "quarantined" in hang and "timeout" not in hang
    data = json.loads(cli(journal, "--json").stdout)
    row = next(r for r in data["slowest"] if r["input"] == "'hang'")
    assert (row["status"], row["outcome"]) == ("quarantined", "timeout")
    counts = data["counts"]
    assert counts["failed"] == 3 == sum(counts[c] for c in counters.CAUSES)
    assert counts["ok"] + counts["failed"] == data["inputs"]


def test_cli_says_the_wal_and_shm_files_belong_to_the_journal(journal):
    help_text = cli("--help").stdout
    assert "PATH-wal and PATH-shm" in " ".join(help_text.split())
    # A connection holds the journal open, as a running map does: both files exist.
    conn = sqlite3.connect(journal)
    try:
        conn.execute("SELECT COUNT(*) FROM inputs").fetchone()
        assert os.path.exists(journal + "-wal") and os.path.exists(journal + "-shm")
        out = cli(journal).stdout
    finally:
        conn.close()
    beside = out.splitlines()[1]
    assert f"{journal}-wal" in beside and f"{journal}-shm" in beside
    assert "part of the journal" in beside
    data = json.loads(cli(journal, "--json").stdout)
    assert data["files"][0] == journal


# ---------------------------------------------------------------- counters agree


class Bar:
    """A bar as map(progress=...) accepts it: the last postfix it was given."""

    def __init__(self) -> None:
        self.total = None
        self.n = 0
        self.postfix: dict[str, int] = {}

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix(self, counts: dict[str, int], refresh: bool = True) -> None:
        self.postfix = dict(counts)


def test_bar_stats_and_journal_report_count_the_same_run_alike(tmp_path):
    """failed is every task that did not return a result, in all three places, and
    its causes add up to it."""
    path = str(tmp_path / "j.db")
    inputs = [1, 2, "raise", "hang", 3, "crash", "memory"]
    bar = Bar()
    with ProcessGroupExecutor(2, kill_grace=0.2) as ex:
        view = ex.options(task_timeout=2.0, max_memory=150 * rt.MiB)
        out = list(view.map(rt.work, inputs, journal=path, progress=bar,
                            return_exceptions=True))
        stats = ex.stats()
    assert out[:2] == [1, 4] and bar.n == len(inputs)
    want = {"ok": 3, "failed": 4, "error": 1, "timeout": 1, "crashed": 1, "memory": 1}
    assert bar.postfix == want
    named = {k: v for k, v in want.items() if k in counters.STATS}  # all but error
    assert {k: stats[counters.STATS[k]] for k in named} == named
    assert stats[counters.STATS["cancelled"]] == 0
    assert stats["failed"] - stats["timed_out"] - stats["crashed"] - stats["memory_killed"] == 1
    data = json.loads(cli(path, "--json").stdout)
    assert {k: data["counts"][k] for k in want} == want
    text = cli(path).stdout
    assert "ok 3  failed 4 (error 1, timeout 1, crashed 1, memory 1;" in text


# ---------------------------------------------------------------- in a real browser


#: An environment variable every process of one browser run inherits (its crash
#: handlers included, which start sessions of their own): how we find what we started.
MARK = "PGX_REPORT_TEST_BROWSER"


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip(
            "Chromium is not installed (a system package: apt-get install chromium); "
            "the HTML report's browser test needs it"
        )
    return exe


def _ours(mark: str) -> list[psutil.Process]:
    """Live processes of the browser run tagged ``mark`` (zombies are dead)."""
    found = []
    for p in psutil.process_iter(["environ", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and (p.info["environ"] or {}).get(MARK) == mark:
            found.append(p)
    return found


def run_browser(tmp_path, *args: str) -> tuple[str, str]:
    """Run headless Chromium on ``args`` in a session of its own; return (stdout,
    stderr) once it exits, and leave none of its processes behind."""
    exe = _chromium()
    mark = uuid.uuid4().hex
    profile = tmp_path / f"chromium-{mark}"
    env = dict(os.environ, HOME=str(profile), **{MARK: mark})
    cmd = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        # The group we created (its zygotes outlive the browser), then, by pid, any
        # process of ours that left it (crash handlers start sessions of their own).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in _ours(mark):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    deadline = time.monotonic() + 10
    while _ours(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _ours(mark), [p.pid for p in _ours(mark)]
    assert proc.returncode == 0, err[-3000:]
    return out, err


def console_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + size]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + size
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):  # undo the row's filter (PNG spec, section 9)
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, channels, rows


def test_html_report_renders_in_headless_chromium(journal, tmp_path):
    write_page(journal, tmp_path)
    url = (tmp_path / "report.html").as_uri()
    dom, err = run_browser(tmp_path, "--dump-dom", url)
    assert not console_errors(err), console_errors(err)
    page = Page(dom)
    svgs = [a.get("class") for t, a in page.elements if t == "svg"]
    assert svgs == ["outcomes", "histogram", "timeline"]
    assert len(page.having("rect", "task")) >= 9 and len(page.having("g", "kill")) == 2
    assert {a["data-count"] for a in page.having("div", "card")} >= {"ok", "failed"}
    assert "Failed inputs (3)" in " ".join(page.text)

    shot = tmp_path / "shot.png"
    _, err = run_browser(tmp_path, f"--screenshot={shot}", "--window-size=1200,1400",
                         "--hide-scrollbars", url)
    assert not console_errors(err), console_errors(err)
    width, channels, rows = png_pixels(shot.read_bytes())
    colours: Counter[bytes] = Counter()
    for row in rows:
        for x in range(0, width * channels, channels * 2):  # every other pixel
            colours[row[x : x + 3]] += 1
    assert len(colours) > 50, "the screenshot is blank"
    ok_green = bytes.fromhex("2e9d5b")  # the ok outcome's colour: the SVG was painted
    assert colours[ok_green] > 500, colours.most_common(5)
