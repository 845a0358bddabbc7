"""A fresh worker (and the template) starts with ``python -S`` and runs ``site``
itself, without pgexecutor's own editable finder (``_process.bootstrap_code``): every
other effect of ``site`` must be there, as in the parent — ``sitecustomize``, the
venv's prefix, site-packages on ``sys.path``, ``exit()``/``help()``, the import
hooks that ``.pth`` files install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_fresh_worker_and_a_template_fork_see_what_site_sets_up(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.pgx_sitecustomized = 1\n")
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(f"""
        import builtins, json, sys
        sys.path.insert(0, {REPO!r})
        import pgexecutor
        from pgexecutor import ProcessGroupExecutor

        def view():
            import builtins, sys
            return {{
                "prefix": sys.prefix, "base": sys.base_prefix,
                "sitecustomized": getattr(builtins, "pgx_sitecustomized", 0),
                "exit": callable(getattr(builtins, "exit", None)),
                "help": hasattr(builtins, "help"),
                "path": [p for p in sys.path if "site-packages" in p],
                # sys.meta_path, but pgexecutor's own (its editable install's finder
                # is the one hook a worker leaves out, on purpose; _AuthkeyHook)
                "hooks": sorted(
                    c.__name__ for c in (f if isinstance(f, type) else type(f) for f in sys.meta_path)
                    if "pgexecutor" not in c.__module__
                ),
            }}

        out = {{"parent": view()}}
        for start in ("fresh", None):  # None: the first workers, then the template's forks
            with ProcessGroupExecutor(1, mp_context=start, max_tasks_per_child=1) as ex:
                out[str(start)] = [ex.submit(view).result(60) for _ in range(2)]
        pgexecutor.close_idle_templates()
        print(json.dumps(out))
    """))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=100,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    parent = out["parent"]
    assert parent["sitecustomized"] == 1 and parent["exit"] and parent["help"]
    for start in ("fresh", "None"):
        for seen in out[start]:
            assert seen == parent, (start, seen, parent)
