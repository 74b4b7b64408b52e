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
