"""The HTML report: ``python -m pgexecutor journal PATH --html report.html``.

One self-contained page (inline CSS and SVG; no script, no font, no request to
anywhere), drawn only from what the journal records (``_report.read``): the counts,
a histogram of run times, a timeline of which worker ran which input and where
workers were killed, the slowest inputs and the failed ones with their errors.

The timeline places each input at ``finished - duration`` .. ``finished`` on the lane
of ``pid``, the worker that ran its last attempt: a journal keeps only the latest
outcome of each input, so earlier attempts (retries, earlier runs) are not drawn, and
inputs whose latest outcome is from an earlier run are left out (said on the page).

Everything from the journal (inputs' reprs, keys, errors, the function's name) is
user text: it goes through :func:`_e` (``html.escape``) and nowhere else.
"""

from __future__ import annotations

import contextlib
import html
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ..counters import CAUSES, FAILED, MEANING, OK
from ._report import COMPANIONS_NOTE, Row, read

#: Colour of each status (the journal's outcomes and ``quarantined``).
COLOURS = {
    "ok": "#2e9d5b",
    "error": "#e0a020",
    "timeout": "#8a5cd0",
    "crashed": "#d64545",
    "memory": "#2f7fd1",
    "quarantined": "#3b3b3b",
}
#: What the drawings colour by: the latest outcome (a quarantined input's is its
#: cause; the tables say it is quarantined).
OUTCOMES = (OK, *CAUSES)
KILLED = ("timeout", "crashed", "memory")  # the task killed its worker, or it died
#: A gap longer than this (seconds) between outcomes separates two runs of the map.
RUN_GAP = 300.0
MAX_BARS = 20_000  # bars in the timeline (the latest ones beyond that are drawn)
MAX_FAILED = 500  # rows of the failed table
HIST_BINS = 24

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
 color:#1d1d1f;background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#555}.note{color:#666;font-size:12.5px;margin:4px 0}
section{background:#fff;border:1px solid #e2e4e8;border-radius:8px;padding:14px 18px;
 margin-top:16px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{border:1px solid #e2e4e8;border-radius:8px;padding:8px 14px;min-width:92px;
 background:#fff}
.card b{display:block;font-size:24px;line-height:1.2}
.card span{font-size:12px;color:#555}
.card.total{background:#f0f2f5}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;
 vertical-align:baseline}
dl.legend{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:8px 0 0;
 font-size:12.5px}
dl.legend dt{font-weight:600}dl.legend dd{margin:0;color:#444}
svg{display:block;width:100%;height:auto}
svg text{font:11px system-ui,sans-serif;fill:#444}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceef1;vertical-align:top}
th{font-weight:600;color:#444;background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code,.mono{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
 overflow-wrap:anywhere}
.badge{display:inline-block;padding:0 7px;border-radius:9px;color:#fff;font-size:12px;
 white-space:nowrap}
.err{white-space:pre-wrap;color:#8a1c1c}
"""


def _e(text: object) -> str:
    """User text, escaped for HTML (element content and quoted attributes alike)."""
    return html.escape("" if text is None else str(text), quote=True)


def seconds(x: float) -> str:
    """A duration for people: ``850 µs``, ``12.3 ms``, ``4.56 s``, ``3.2 min``, ``1.5 h``."""
    if x == 0:
        return "0"
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    if x < 1:
        return f"{x * 1e3:.3g} ms"
    if x < 120:
        return f"{x:.3g} s"
    if x < 7200:
        return f"{x / 60:.3g} min"
    return f"{x / 3600:.3g} h"


def _badge(status: str, outcome: str | None = None) -> str:
    """A coloured label; a quarantined input's names its cause beside it."""
    label = f'<span class="badge" style="background:{COLOURS.get(status, "#777")}">{_e(status)}</span>'
    if outcome is not None and outcome != status:
        label += f' <span class="badge" style="background:{COLOURS.get(outcome, "#777")}">{_e(outcome)}</span>'
    return label


# ---------------------------------------------------------------- counts


def _counts(summary: dict[str, Any]) -> str:
    counts: dict[str, int] = summary["counts"]
    total = summary["inputs"]
    cards = [f'<div class="card total" data-count="inputs"><b>{total}</b><span>inputs</span></div>']
    for name in (OK, FAILED, *CAUSES, "quarantined"):
        n = counts.get(name, 0)
        colour = COLOURS.get(name, "#777")
        cards.append(
            f'<div class="card" data-count="{name}"><b>{n}</b>'
            f'<span><i class="sw" style="background:{colour}"></i>{name}</span></div>'
        )
    # One stacked bar: the share of each outcome (ok and the causes: a partition).
    shares = counts
    bar = ['<svg class="outcomes" viewBox="0 0 1000 26" role="img" aria-label="outcomes">']
    x = 0.0
    for outcome in OUTCOMES:
        n = shares.get(outcome, 0)
        if not n or not total:
            continue
        w = 1000 * n / total
        bar.append(
            f'<rect class="share" data-status="{outcome}" x="{x:.2f}" y="0" width="{w:.2f}" '
            f'height="26" fill="{COLOURS[outcome]}"><title>{outcome}: {n} of {total}</title>'
            "</rect>"
        )
        x += w
    bar.append("</svg>")
    legend = "".join(
        f"<dt>{name}</dt><dd>{_e(MEANING[name])}</dd>"
        for name in (OK, FAILED, *CAUSES, "quarantined")
    )
    return (
        '<section id="counts"><h2>Outcomes</h2>'
        f'<div class="cards">{"".join(cards)}</div>{"".join(bar)}'
        f'<dl class="legend">{legend}</dl>'
        f'<p class="note">Each input counts once, by its latest outcome; quarantined '
        f"inputs are counted under their cause too (quarantine after "
        f"{summary['quarantine_after']} kills).</p></section>"
    )


# ---------------------------------------------------------------- histogram


def _histogram(rows: Sequence[Row]) -> str:
    timed = [r for r in rows if r.duration is not None and r.duration >= 0]
    head = '<section id="durations"><h2>Run times</h2>'
    if not timed:
        return head + '<p class="note">No run time recorded.</p></section>'
    lo = min(r.duration for r in timed)
    hi = max(r.duration for r in timed)
    log = lo > 0 and hi / lo > 50
    if log:
        a, b = math.log10(lo), math.log10(hi)
        edges = [10 ** (a + (b - a) * i / HIST_BINS) for i in range(HIST_BINS + 1)]
    else:
        top = hi if hi > 0 else 1.0
        edges = [top * i / HIST_BINS for i in range(HIST_BINS + 1)]
    bins: list[dict[str, int]] = [dict.fromkeys(OUTCOMES, 0) for _ in range(HIST_BINS)]
    for r in timed:
        d = r.duration
        if log:
            i = int((math.log10(d) - a) / (b - a) * HIST_BINS) if b > a else 0
        else:
            i = int(d / edges[-1] * HIST_BINS)
        bins[min(max(i, 0), HIST_BINS - 1)][r.outcome] += 1
    peak = max(sum(b_.values()) for b_ in bins) or 1
    W, H, L, R, B, T = 1000, 240, 46, 30, 34, 10  # size; margins
    pw, ph = W - L - R, H - B - T
    bw = pw / HIST_BINS
    out = [
        f'<svg class="histogram" viewBox="0 0 {W} {H}" role="img" '
        f'aria-label="histogram of run times">'
    ]
    for frac in (0, 0.5, 1):  # y grid and its counts
        y = T + ph * (1 - frac)
        out.append(
            f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" stroke="#e6e8eb"/>'
            f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{round(peak * frac)}</text>'
        )
    for i, counts in enumerate(bins):
        y = T + ph
        for outcome in OUTCOMES:
            n = counts[outcome]
            if not n:
                continue
            h = ph * n / peak
            y -= h
            out.append(
                f'<rect class="bin" data-status="{outcome}" data-n="{n}" '
                f'x="{L + i * bw + 1:.2f}" y="{y:.2f}" width="{bw - 2:.2f}" height="{h:.2f}" '
                f'fill="{COLOURS[outcome]}">'
                f"<title>{n} {outcome}, {seconds(edges[i])} to {seconds(edges[i + 1])}"
                f"</title></rect>"
            )
    for i in range(0, HIST_BINS + 1, 4):  # x labels at every fourth edge
        x = L + i * bw
        out.append(
            f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle">{seconds(edges[i])}</text>'
        )
    out.append(
        f'<line x1="{L}" y1="{T + ph}" x2="{W - R}" y2="{T + ph}" stroke="#999"/></svg>'
    )
    scale = "logarithmic" if log else "linear"
    return (
        head + "".join(out)
        + f'<p class="note">{len(timed)} inputs by the run time of their last attempt '
        f"({scale} scale, {seconds(lo)} to {seconds(hi)}).</p></section>"
    )


# ---------------------------------------------------------------- timeline


def latest_run(rows: Sequence[Row]) -> list[Row]:
    """The rows of the map that ran last: the intervals after the last gap of more
    than RUN_GAP seconds in which nothing ran (a journal holds every run's latest
    outcomes, possibly days apart)."""
    spans = sorted(
        (r for r in rows if r.duration is not None and r.finished is not None),
        key=lambda r: r.finished - r.duration,
    )
    start = 0
    reach = -math.inf
    for i, r in enumerate(spans):
        if r.finished - r.duration > reach + RUN_GAP:
            start = i
        reach = max(reach, r.finished)
    return spans[start:]


def _ticks(span: float) -> Iterable[float]:
    """Round tick steps (1, 2, 5 x 10^k) giving about 8 ticks over ``span``."""
    raw = span / 8 if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    n = int(span / step) + 1
    return (i * step for i in range(n + 1) if i * step <= span * 1.0001)


def _timeline(rows: Sequence[Row]) -> str:
    head = '<section id="timeline"><h2>Timeline: which worker ran which input</h2>'
    run = latest_run(rows)
    if not run:
        return head + '<p class="note">No run times recorded.</p></section>'
    left_out = len(rows) - len(run)
    drawn = run[-MAX_BARS:]
    t0 = min(r.finished - r.duration for r in drawn)
    t1 = max(r.finished for r in drawn)
    span = max(t1 - t0, 1e-3)
    lanes: dict[Any, int] = {}
    for r in drawn:  # ordered by start: lanes in the order the workers began
        lanes.setdefault(r.pid, len(lanes))
    LH, L, R, T, B = 16, 92, 30, 8, 30  # lane height; margins
    W = 1000
    pw = W - L - R
    H = T + LH * len(lanes) + B

    def x(t: float) -> float:
        return L + pw * (t - t0) / span

    out = [
        f'<svg class="timeline" viewBox="0 0 {W} {H}" role="img" '
        f'aria-label="timeline of the workers">'
    ]
    for pid, lane in lanes.items():
        y = T + lane * LH
        if lane % 2:
            out.append(f'<rect x="{L}" y="{y}" width="{pw}" height="{LH}" fill="#f4f5f7"/>')
        label = "pid ?" if pid is None else f"pid {int(pid)}"
        out.append(f'<text x="{L - 6}" y="{y + LH - 4}" text-anchor="end">{label}</text>')
    for tick in _ticks(span):
        tx = x(t0 + tick)
        out.append(
            f'<line x1="{tx:.1f}" y1="{T}" x2="{tx:.1f}" y2="{H - B}" stroke="#e2e4e8"/>'
            f'<text x="{tx:.1f}" y="{H - B + 16}" text-anchor="middle">+{seconds(tick)}</text>'
        )
    kills = []
    for r in drawn:
        y = T + lanes[r.pid] * LH + 2
        x0, x1 = x(r.finished - r.duration), x(r.finished)
        status = r.outcome if r.status == r.outcome else f"{r.outcome}, {r.status}"
        tip = f"{r.input} — {status}, {seconds(r.duration)}, worker pid {r.pid}"
        if r.error:
            tip += f"\n{r.error}"
        out.append(
            f'<rect class="task" data-status="{r.outcome}" x="{x0:.2f}" y="{y}" '
            f'width="{max(x1 - x0, 0.8):.2f}" height="{LH - 4}" rx="2" '
            f'fill="{COLOURS.get(r.outcome, "#777")}"><title>{_e(tip)}</title></rect>'
        )
        if r.outcome in KILLED:
            kills.append((x1, y, r))
    for kx, ky, r in kills:  # on top of every bar: a worker killed (or dead) here
        cy = ky + (LH - 4) / 2
        out.append(
            f'<g class="kill" data-status="{r.outcome}"><title>worker pid {r.pid} '
            f"{'killed' if r.outcome != 'crashed' else 'died'} ({r.outcome}) under "
            f"{_e(r.input)}</title>"
            f'<path d="M{kx - 5:.1f} {cy - 5:.1f}L{kx + 5:.1f} {cy + 5:.1f}'
            f'M{kx - 5:.1f} {cy + 5:.1f}L{kx + 5:.1f} {cy - 5:.1f}" '
            f'stroke="#111" stroke-width="2.4" stroke-linecap="round"/></g>'
        )
    out.append("</svg>")
    began = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0))
    notes = [
        f"{len(drawn)} inputs on {len(lanes)} worker(s), from {began}, over {seconds(span)}. "
        "Each bar is an input's last attempt (hover for its input); a cross marks a "
        "worker killed (timeout, memory) or dead (crashed) under it; a new lane is the "
        "worker that replaced it."
    ]
    if left_out:
        notes.append(
            f"{left_out} input(s) whose latest outcome came from an earlier run (or has no "
            "run time) are not drawn."
        )
    if len(run) > len(drawn):
        notes.append(f"Only the last {len(drawn)} of this run's {len(run)} inputs are drawn.")
    return head + "".join(out) + "".join(f'<p class="note">{n}</p>' for n in notes) + "</section>"


# ---------------------------------------------------------------- tables


def _slowest(summary: dict[str, Any]) -> str:
    rows = summary["slowest"]
    if not rows:
        return ""
    body = "".join(
        f'<tr><td class="num">{i}</td><td class="num">{seconds(r["duration"])}</td>'
        f"<td>{_badge(r['status'], r['outcome'])}</td><td class=\"mono\">{_e(r['input'])}</td>"
        f"<td class=\"mono\">{_e(r['key'])}</td><td class=\"num\">{_e(r['pid'])}</td></tr>"
        for i, r in enumerate(rows, 1)
    )
    return (
        f'<section id="slowest"><h2>Slowest {len(rows)} inputs</h2><table>'
        "<tr><th>#</th><th>run time</th><th>status</th><th>input</th><th>key</th>"
        f"<th>worker pid</th></tr>{body}</table></section>"
    )


def _failed(summary: dict[str, Any]) -> str:
    rows = summary["failed"]
    head = f'<section id="failed"><h2>Failed inputs ({len(rows)})</h2>'
    if not rows:
        return head + '<p class="note">None: every input returned a result.</p></section>'
    body = []
    for r in rows[:MAX_FAILED]:
        history = ""
        if r["kills"]:
            history = (
                f"<div class=\"note\">killed its worker {r['kills']}x over {r['runs']} run(s): "
                + _e(", ".join(str(f.get("outcome")) for f in r["failures"]))
                + "</div>"
            )
        body.append(
            f"<tr><td>{_badge(r['status'], r['outcome'])}</td><td class=\"mono\">{_e(r['input'])}"
            f"<div class=\"note\">key {_e(r['key'])}</div></td>"
            f"<td><div class=\"err mono\">{_e(r['error'])}</div>{history}</td></tr>"
        )
    more = ""
    if len(rows) > MAX_FAILED:
        more = (
            f'<p class="note">{len(rows) - MAX_FAILED} more not shown: '
            "<code>python -m pgexecutor journal PATH --json</code> lists them all.</p>"
        )
    return (
        head + "<table><tr><th>status</th><th>input</th><th>error</th></tr>"
        + "".join(body) + f"</table>{more}</section>"
    )


# ---------------------------------------------------------------- the page


def render(summary: dict[str, Any], rows: Sequence[Row]) -> str:
    """The whole page, from ``_report.read``'s summary and rows."""
    path = summary["path"]
    files = summary.get("files", [path])
    beside = (
        f"<p class=\"note\">With {_e(', '.join(files[1:]))} beside it: "
        f"{_e(COMPANIONS_NOTE)}.</p>"
        if len(files) > 1
        else ""
    )
    owner = summary["owner"]
    lock = (
        ""
        if owner is None
        else f"<p class=\"note\">In use by pid {_e(owner['pid'])} on {_e(owner['host'])}: "
        "a map may still be writing it.</p>"
    )
    made = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>pgexecutor journal: {_e(path)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>Journal <code>{_e(path)}</code></h1>"
        f"<p class=\"sub\">{summary['inputs']} inputs of <code>{_e(summary['fn'] or '?')}</code>"
        f" &middot; report made {_e(made)}</p>{beside}{lock}"
        + _counts(summary)
        + _histogram(rows)
        + _timeline(rows)
        + _slowest(summary)
        + _failed(summary)
        + "</main></body></html>\n"
    )


def write_report(path: str | os.PathLike[str], out: str | os.PathLike[str], top: int = 10) -> dict[str, Any]:
    """Write the page for journal ``path`` to ``out`` (replaced whole: a reader never
    sees half a page); return the summary it was drawn from."""
    summary, rows = read(path, top)
    page = render(summary, rows)
    out = os.fspath(out)
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return summary
