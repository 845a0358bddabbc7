"""Mesh a few dozen parametrised geometries with the real gmsh, some of which hang or crash it.

Run it with ``python examples/gmsh_meshing.py`` (``--quick`` for the reduced size the
tests use, ``--json PATH`` for a machine-readable summary, ``-v`` for pgexecutor's log).

One ``ex.map(mesh_case, inputs, return_exceptions=True)`` over disks, graded rectangles,
boxes and spheres at several mesh sizes and algorithms; each result is the mesh's
statistics (nodes, elements, element quality). Among the inputs are some that gmsh
4.15.2 itself cannot cope with. These are REAL gmsh behaviour, found by trying, not
injected (see ``_gmsh_cases.py``):

* ``bowtie``: a self-intersecting curve loop; the 2D mesher loops forever in C++;
* ``transfinite_bad``: a transfinite surface with 3 corners for 5 sides: loops forever;
* ``embed_outside``: a curve embedded in a surface it leaves: loops forever;
* size field ``0.05 + 1/x`` on a rectangle touching x = 0: gmsh's formula evaluator
  throws on the division by zero, nothing catches it: std::terminate, SIGABRT;
* size field ``q + 0.1`` (an unknown variable): the same SIGABRT.

One more input is an INJECTED fault, not gmsh behaviour: a NULL read through ctypes
just before meshing (SIGSEGV), standing in for a segfault in native code.

The hangs spin inside gmsh's C++ code (the GIL is released, nothing in Python can stop
them); ``task_timeout`` kills the worker's whole process group. By default the limit
is learned (``task_timeout=AutoTimeout(...)``, ``--timeout auto``): no one has to
know how long a good mesh takes; ten times the slowest of the meshes that succeeded
so far (at least 2 s; 10 s until 3 have) is the limit, and the script prints what it
learned. ``--timeout SECONDS`` sets a fixed limit instead. Each bad input costs
exactly one failed result, reported with its parameters, and the rest of the map
completes. At the end the example checks with psutil that no process of any worker
group it created survived.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import psutil

from pgexecutor import (
    AutoTimeout,
    ProcessGroupExecutor,
    TaskTimeoutError,
    WorkerCrashedError,
    close_idle_templates,
    spawned_groups,
    task_info,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gmsh_cases import CASES, mesh_case  # noqa: E402  (imports gmsh only when called)

# (label, params, expected outcome, what it is). Bad inputs take their parameters
# from _gmsh_cases.CASES, where each one is documented.
GOOD: list[tuple[str, dict[str, Any]]] = (
    [(f"disk h={s}", {"shape": "disk", "size": s}) for s in (0.2, 0.1, 0.07, 0.05)]
    + [(f"disk algo={a}", {"shape": "disk", "size": 0.08, "algorithm": a}) for a in (1, 5, 6, 8)]
    + [
        (f"rect h={f.replace(' ', '')}", {"shape": "rectangle", "size_formula": f})
        for f in ("0.02 + 0.1*x", "0.03 + 0.05*y", "0.02 + 0.05*(x+y)", "0.01 + 0.2*x*y")
    ]
    + [(f"box h={s}", {"shape": "box", "size": s}) for s in (0.25, 0.15, 0.1)]
    + [(f"box algo3d={a}", {"shape": "box", "size": 0.2, "algorithm3d": a}) for a in (1, 4, 10)]
    + [(f"sphere h={s}", {"shape": "sphere", "size": s}) for s in (0.3, 0.2, 0.15)]
    + [(f"rect h={s}", {"shape": "rectangle", "size": s}) for s in (0.1, 0.05)]
)
BAD: list[tuple[str, str, str]] = [  # (case name, expected outcome, what it is)
    ("bowtie_hang", "timeout", "real gmsh hang: self-intersecting curve loop"),
    ("size_formula_abort", "crashed", "real gmsh crash: 1/x at x=0 in a size field"),
    ("transfinite_hang", "timeout", "real gmsh hang: transfinite surface, 3 corners, 5 sides"),
    ("injected_segfault", "crashed", "INJECTED fault: NULL read via ctypes, not gmsh"),
    ("embed_hang", "timeout", "real gmsh hang: embedded curve leaves its surface"),
    ("size_formula_typo_abort", "crashed", "real gmsh crash: unknown variable in a size field"),
]


def make_inputs(quick: bool) -> list[dict[str, Any]]:
    """Good inputs with a bad one every few places; quick keeps every bad one."""
    good = GOOD[::4] if quick else GOOD
    step = max(1, len(good) // len(BAD))
    out: list[dict[str, Any]] = []
    bad = iter(BAD)
    for i, (label, params) in enumerate(good):
        out.append({"label": label, "params": params, "expected": "ok", "what": "normal"})
        if i % step == step - 1:
            case = next(bad, None)
            if case is not None:
                name, expected, what = case
                out.append(
                    {"label": name, "params": dict(CASES[name]), "expected": expected, "what": what}
                )
    for name, expected, what in bad:  # any left over
        out.append({"label": name, "params": dict(CASES[name]), "expected": expected, "what": what})
    return out


def call_chain(stack: str | None, stop: str = "mesh_case") -> str:
    """``generate < mesh_case``: the task's thread in a faulthandler dump, innermost first."""
    for block in (stack or "").split("\n\n"):
        names = [
            line.strip().rsplit(" in ", 1)[1]
            for line in block.splitlines()
            if line.strip().startswith("File ") and " in " in line
        ]
        if stop in names:
            return " < ".join(names[: names.index(stop) + 1])
    return "?"


def native_frame(dump: str | None, stop: str = "mesh_case") -> str | None:
    """The innermost named native frame of the task's thread in a py-spy dump,
    outside the C/C++ runtime (libgmsh is stripped: its inner frames have no names,
    its API functions do)."""
    runtime = ("libc.so", "libstdc++", "libgomp", "libpthread", "libffi", "ld-linux")
    for block in (dump or "").split("\nThread "):
        if stop in block:
            for line in block.splitlines()[1:]:
                frame = line.strip()
                if (
                    frame.endswith(")") and ".py:" not in frame and not frame.startswith("0x")
                    and not any(lib in frame for lib in runtime)
                ):
                    return frame
    return None


def group_survivors(pgids: frozenset[int]) -> list[dict[str, Any]]:
    """Processes (zombies included, flagged) whose process group is one of ``pgids``."""
    out = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            pg = os.getpgid(p.pid)
        except OSError:
            continue
        if pg in pgids:
            out.append(
                {
                    "pid": p.pid,
                    "pgid": pg,
                    "status": p.info["status"],
                    "cmdline": " ".join(p.info["cmdline"] or []),
                }
            )
    return out


def describe(res: Any) -> dict[str, Any]:
    if isinstance(res, TaskTimeoutError):
        return {
            "outcome": "timeout",
            "error": str(res),
            "worker_pid": res.pid,
            "hung_in": call_chain(res.stack),
            "limit": res.timeout,
            "derivation": res.derivation,
            "native_in": native_frame(res.native_stack),
        }
    if isinstance(res, WorkerCrashedError):
        sig = None
        if res.exitcode is not None and res.exitcode < 0:
            sig = signal.Signals(-res.exitcode).name
        return {
            "outcome": "crashed",
            "error": str(res),
            "worker_pid": res.pid,
            "exitcode": res.exitcode,
            "signal": sig,
        }
    if isinstance(res, BaseException):
        return {"outcome": "error", "error": f"{type(res).__name__}: {res}"}
    return {"outcome": "ok", "stats": res, "worker_pid": res["pid"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="reduced size (every bad input, fewer good)"
    )
    ap.add_argument(
        "--timeout", default="auto",
        help="task_timeout: 'auto' (learned; the default) or a number of seconds",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--native", action="store_true",
        help="native_stacks=True: name the C++ function a hang spins in (needs py-spy)",
    )
    ap.add_argument("--json", metavar="PATH", help="write a machine-readable summary here")
    ap.add_argument("-v", action="store_true", help="print pgexecutor's log")
    args = ap.parse_args(argv)
    if args.v:
        logging.basicConfig(format="    [%(relativeCreated)6.0fms %(name)s] %(message)s")
        logging.getLogger("pgexecutor").setLevel(logging.DEBUG)

    inputs = make_inputs(args.quick)
    n_bad = sum(x["expected"] != "ok" for x in inputs)
    # Learned: 10 x the slowest successful mesh (quantile 1.0) once 3 exist, at least
    # 2 s; 10 s before that. A hang is then found without knowing how long meshes take.
    timeout: float | AutoTimeout = (
        AutoTimeout(factor=10, quantile=1.0, min_samples=3, initial=10.0, floor=2.0)
        if args.timeout == "auto"
        else float(args.timeout)
    )
    shown = "auto (learned)" if args.timeout == "auto" else f"{float(args.timeout):g}s"
    print(
        f"gmsh {importlib.metadata.version('gmsh')}: {len(inputs)} geometries ({n_bad} bad) on "
        f"{args.workers} workers, task_timeout={shown}, kill_grace=0.5s.\n"
        "gmsh's own abort message may appear on stderr when a crashing input kills its worker.\n",
        flush=True,
    )
    before = spawned_groups()
    t0 = time.monotonic()
    with ProcessGroupExecutor(
        max_workers=args.workers,
        task_timeout=timeout,
        kill_grace=0.5,
        native_stacks=args.native,
        initializer=importlib.import_module,  # import gmsh once per worker, off the clock
        initargs=("gmsh",),
        initializer_timeout=300,  # its own bound: the import may outlast task_timeout
    ) as ex:
        results = ex.map(mesh_case, [x["params"] for x in inputs], return_exceptions=True)
        for i, (inp, res) in enumerate(zip(inputs, results, strict=True)):
            inp.update(describe(res), index=i)
            head = f"  {i:2d} {inp['label']:24s}"
            if inp["outcome"] == "ok":
                st = inp["stats"]
                print(
                    f"{head} ok       {st['dim']}D {st['nodes']:5d} nodes {st['elements']:5d} "
                    f"elements, min quality {st['min_quality']:.2f}, {st['seconds']:.2f}s"
                )
                continue
            print(f"{head} {inp['outcome'].upper():8s} params={inp['params']}  ({inp['what']})")
            if inp["outcome"] == "timeout":
                print(
                    f"{'':38s}still meshing after {inp['limit']:.3g}s in {inp['hung_in']} "
                    f"(C++); worker {inp['worker_pid']}'s group killed"
                )
                if inp["derivation"]:
                    print(f"{'':38s}the limit was {inp['derivation']}")
                if inp["native_in"]:
                    print(f"{'':38s}natively in {inp['native_in']}")
            elif inp["outcome"] == "crashed":
                print(f"{'':38s}worker {inp['worker_pid']} died of {inp['signal']}; replaced")
            else:
                print(f"{'':38s}{inp['error']}")
        learned = None
        if isinstance(timeout, AutoTimeout):
            # What it learned: the limit a good mesh runs under now.
            probe = ex.submit(mesh_case, GOOD[0][1])
            probe.result()
            learned = task_info(probe).timeout
            print(f"\nlearned limit for mesh_case after this map: {learned:.3g}s")
    stats = ex.stats()  # after shutdown: counts any worker started to replace a killed one
    elapsed = time.monotonic() - t0
    close_idle_templates()  # the worker template would wait a second for a next executor
    created = spawned_groups() - before
    left = group_survivors(created)
    deadline = time.monotonic() + 5.0
    while left and time.monotonic() < deadline:  # an orphan may await init's reaping
        time.sleep(0.05)
        left = group_survivors(created)
    live_left = [m for m in left if m["status"] != psutil.STATUS_ZOMBIE]

    mismatched = [x for x in inputs if x["outcome"] != x["expected"]]
    failed = [x for x in inputs if x["outcome"] != "ok"]
    print(f"\nfinished in {elapsed:.1f}s; counters: {stats}")
    print(
        f"{len(inputs) - len(failed)} meshed, {len(failed)} failed "
        f"(expected {n_bad}: one per bad input); unexpected outcomes: {len(mismatched)}"
    )
    for x in mismatched:
        print(
            f"  UNEXPECTED: {x['label']} expected {x['expected']}, got {x['outcome']}: "
            f"{x.get('error')}"
        )
    print(
        f"worker groups created: {len(created)}; processes left in them: {len(live_left)}"
        + (
            f" (+{len(left) - len(live_left)} unreaped zombies)"
            if len(left) > len(live_left)
            else ""
        )
    )
    for m in left:
        print("  LEFT:", m)
    print("no process survived." if not live_left else "PROCESSES SURVIVED.")
    ok = not mismatched and not live_left

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "example": "gmsh_meshing",
                    "inputs": inputs,
                    "worker_pgids": sorted(created),
                    "survivors": left,
                    "stats": stats,
                    "elapsed": elapsed,
                    "task_timeout": args.timeout,
                    "learned_limit": learned,
                    "ok": ok,
                },
                f,
                indent=1,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
