"""The public surface: ``vaelab.__all__`` lists exactly what the package exports."""

from __future__ import annotations

import types

import vaelab


def test_all_is_complete_and_exists():
    exported = {
        name
        for name, value in vars(vaelab).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == set(vaelab.__all__)
    assert len(vaelab.__all__) == len(set(vaelab.__all__))


def test_every_public_object_is_documented():
    for name in vaelab.__all__:
        assert getattr(vaelab, name).__doc__, f"vaelab.{name} has no docstring"


def test_the_evaluation_modules_named_in_the_readme_are_attributes():
    """``import vaelab`` alone makes ``vaelab.loglik`` and its siblings usable, as the README
    promises; run in a fresh interpreter, where no other import has loaded them already."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    named = set(re.findall(r"`vaelab\.([a-z_]+)`", (root / "README.md").read_text()))
    modules = sorted(n for n in named if (root / "src" / "vaelab" / f"{n}.py").is_file())
    assert {"loglik", "ais", "gap", "diagnostics", "ppca"} <= set(modules)
    probe = "import vaelab; " + "; ".join(f"vaelab.{name}.__name__" for name in modules)
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
