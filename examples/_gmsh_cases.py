"""gmsh geometry builders for pgexecutor examples: normal, hanging and crashing cases.

Standalone: needs only ``gmsh`` (``pip install gmsh``; headless Debian also needs
``apt-get install -y --no-install-recommends libglu1-mesa libgl1 libxcursor1 libxft2
libxinerama1 libgomp1``).

    python -c 'from examples._gmsh_cases import mesh_case; print(mesh_case({"shape": "box"}))'

Each call initializes gmsh, builds one model, meshes it, returns statistics and
finalizes gmsh, so it is safe to call repeatedly in one worker process.

The pathological cases in ``CASES`` are REAL gmsh 4.15.2 behaviour, not injected:

* ``bowtie_hang``: a self-intersecting 4-segment curve loop ("bowtie") in the built-in
  kernel. The 2D mesher keeps "splitting those edges and trying again" and never
  returns (observed > 300 s), 100 % CPU, constant ~33 MiB RSS, inside libgmsh (C++).
  gmsh is called through ctypes.CDLL, so the GIL is released: other Python threads
  keep running, but the call cannot be interrupted from Python.
* ``transfinite_hang``: a transfinite+recombined surface given 3 corners for a
  5-sided loop: same symptoms (C loop, constant memory).
* ``embed_hang``: embedding a curve that leaves the surface: same symptoms.
* ``size_formula_abort``: a MathEval background size field ``"0.05 + 1/x"`` on a
  rectangle touching x = 0: division by zero throws an uncaught std::runtime_error
  inside the mesher -> std::terminate -> SIGABRT (within ~0.1 s).
* ``size_formula_typo_abort``: a MathEval formula with an unknown variable: SIGABRT.

``inject`` adds faults that are NOT gmsh behaviour, clearly labelled as injected:
``"segfault"`` (reads address 0 via ctypes -> SIGSEGV), ``"abort"`` (os.abort()),
``"sleep"`` (a Python-level hang in time.sleep).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

DEFAULTS: dict[str, Any] = {
    "shape": "box",  # disk | rectangle | box | sphere | bowtie | transfinite_bad | embed_outside
    "size": None,  # Mesh.MeshSizeMax; None -> 0.1 in 2D, 0.2 in 3D
    "size_formula": None,  # MathEval background size field, e.g. "0.02 + 0.1*x"
    "algorithm": None,  # Mesh.Algorithm (2D) if given
    "algorithm3d": None,  # Mesh.Algorithm3D if given
    "threads": 1,  # General.NumThreads (keep 1 when several workers share the cores)
    "verbose": False,  # General.Terminal
    "inject": None,  # None | "segfault" | "abort" | "sleep"  (INJECTED faults)
}

CASES: dict[str, dict[str, Any]] = {
    # normal, fast (< 0.2 s each on a 2-core machine)
    "disk_2d": {"shape": "disk", "size": 0.1},
    "rectangle_graded_2d": {"shape": "rectangle", "size_formula": "0.02 + 0.1*x"},
    "box_3d": {"shape": "box", "size": 0.2},
    "sphere_3d": {"shape": "sphere", "size": 0.2},
    # real hangs (never return)
    "bowtie_hang": {"shape": "bowtie"},
    "transfinite_hang": {"shape": "transfinite_bad"},
    "embed_hang": {"shape": "embed_outside"},
    # real crashes (SIGABRT)
    "size_formula_abort": {"shape": "rectangle", "size_formula": "0.05 + 1/x"},
    "size_formula_typo_abort": {"shape": "rectangle", "size_formula": "q + 0.1"},
    # INJECTED faults (not gmsh behaviour)
    "injected_segfault": {"shape": "box", "inject": "segfault"},
    "injected_abort": {"shape": "box", "inject": "abort"},
    "injected_sleep": {"shape": "box", "inject": "sleep"},
}

_DIM = {
    "disk": 2,
    "rectangle": 2,
    "bowtie": 2,
    "transfinite_bad": 2,
    "embed_outside": 2,
    "box": 3,
    "sphere": 3,
}


def _build(gmsh: Any, shape: str) -> None:
    occ, geo = gmsh.model.occ, gmsh.model.geo
    if shape == "disk":
        occ.addDisk(0, 0, 0, 1, 1)
        occ.synchronize()
    elif shape == "rectangle":
        occ.addRectangle(0, 0, 0, 1, 1)
        occ.synchronize()
    elif shape == "box":
        occ.addBox(0, 0, 0, 1, 1, 1)
        occ.synchronize()
    elif shape == "sphere":
        occ.addSphere(0, 0, 0, 1)
        occ.synchronize()
    elif shape == "bowtie":
        # Self-intersecting curve loop (0,0)->(1,1)->(1,0)->(0,1)->(0,0): real hang.
        pts = [geo.addPoint(x, y, 0, 0.1) for x, y in [(0, 0), (1, 1), (1, 0), (0, 1)]]
        lines = [geo.addLine(pts[i], pts[(i + 1) % 4]) for i in range(4)]
        geo.addPlaneSurface([geo.addCurveLoop(lines)])
        geo.synchronize()
    elif shape == "transfinite_bad":
        # 5-sided surface declared transfinite with only 3 corners, recombined: real hang.
        coords = [(0, 0), (1, 0), (1, 1), (0, 1), (0.5, 1.5)]
        pts = [geo.addPoint(x, y, 0, 0.2) for x, y in coords]
        lines = [geo.addLine(pts[i], pts[(i + 1) % 5]) for i in range(5)]
        surf = geo.addPlaneSurface([geo.addCurveLoop(lines)])
        geo.synchronize()
        for c in lines:
            gmsh.model.mesh.setTransfiniteCurve(c, 7)
        gmsh.model.mesh.setTransfiniteSurface(surf, cornerTags=pts[:3])
        gmsh.model.mesh.setRecombine(2, surf)
    elif shape == "embed_outside":
        # Embedding a curve that runs out of the surface: real hang.
        surf = occ.addRectangle(0, 0, 0, 1, 1)
        line = occ.addLine(occ.addPoint(0.5, 0.5, 0), occ.addPoint(3, 0.5, 0))
        occ.synchronize()
        gmsh.model.mesh.embed(1, [line], 2, surf)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _inject(kind: str | None) -> None:
    """INJECTED FAULTS: deliberately not gmsh behaviour."""
    if kind is None:
        return
    if kind == "segfault":
        import ctypes

        ctypes.string_at(0)  # INJECTED: NULL read -> SIGSEGV
    elif kind == "abort":
        os.abort()  # INJECTED: SIGABRT
    elif kind == "sleep":
        while True:  # INJECTED: Python-level hang
            time.sleep(3600)
    else:
        raise ValueError(f"unknown inject {kind!r}")


def mesh_case(params: dict[str, Any]) -> dict[str, Any]:
    """Build and mesh one geometry; return mesh statistics.

    ``params`` keys (all optional): see ``DEFAULTS``; ``params`` may also be one of
    ``CASES`` or ``{"case": "<name>", ...overrides}``.

    Returns ``{"case", "shape", "dim", "nodes", "elements", "min_quality",
    "mean_quality", "seconds", "pid", "gmsh_version"}``; quality is gmsh's minSICN
    (1 = ideal, <= 0 = inverted) over the elements of the top dimension.
    Raises ``Exception`` (gmsh's own) on ordinary meshing errors.
    """
    import gmsh

    p = dict(DEFAULTS)
    if "case" in params:
        p.update(CASES[params["case"]])
    p.update({k: v for k, v in params.items() if k != "case"})
    shape = p["shape"]
    dim = _DIM.get(shape)
    if dim is None:
        raise ValueError(f"unknown shape {shape!r}")
    size = p["size"] if p["size"] is not None else (0.1 if dim == 2 else 0.2)

    t0 = time.perf_counter()
    # interruptible=True makes gmsh set SIGINT to SIG_DFL until finalize(); it may only
    # touch signal handlers from the main thread.
    gmsh.initialize(
        ["-noenv"],
        readConfigFiles=False,
        interruptible=threading.current_thread() is threading.main_thread(),
    )
    try:
        gmsh.option.setNumber("General.Terminal", 1 if p["verbose"] else 0)
        gmsh.option.setNumber("General.NumThreads", p["threads"])
        gmsh.model.add("case")
        _build(gmsh, shape)
        gmsh.option.setNumber("Mesh.MeshSizeMax", size)
        if p["algorithm"] is not None:
            gmsh.option.setNumber("Mesh.Algorithm", p["algorithm"])
        if p["algorithm3d"] is not None:
            gmsh.option.setNumber("Mesh.Algorithm3D", p["algorithm3d"])
        if p["size_formula"] is not None:
            field = gmsh.model.mesh.field.add("MathEval")
            gmsh.model.mesh.field.setString(field, "F", p["size_formula"])
            gmsh.model.mesh.field.setAsBackgroundMesh(field)
        _inject(p["inject"])
        gmsh.model.mesh.generate(dim)

        node_tags = gmsh.model.mesh.getNodes()[0]
        _, elem_tags, _ = gmsh.model.mesh.getElements(dim)
        tags = [int(t) for block in elem_tags for t in block]
        if not tags:
            raise RuntimeError(f"gmsh produced no {dim}D elements for shape {shape!r}")
        qual = [float(q) for q in gmsh.model.mesh.getElementQualities(tags, "minSICN")]
        return {
            "case": params.get("case"),
            "shape": shape,
            "dim": dim,
            "nodes": len(node_tags),
            "elements": len(tags),
            "min_quality": min(qual) if qual else None,
            "mean_quality": sum(qual) / len(qual) if qual else None,
            "seconds": time.perf_counter() - t0,
            "pid": os.getpid(),
            "gmsh_version": gmsh.__version__,
        }
    finally:
        gmsh.finalize()


if __name__ == "__main__":
    import sys

    names = sys.argv[1:] or ["disk_2d", "rectangle_graded_2d", "box_3d", "sphere_3d"]
    for name in names:
        print(name, mesh_case({"case": name}), flush=True)
