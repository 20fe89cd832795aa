"""The public surface: what each package's ``__all__`` promises exists, the top-level one holds the user's
entry points, and the README's "Python API" section names exactly ``timm_local.__all__``.

Every module of ``timm_local`` is imported (a cheap walk: the package is imported once), so an ``__all__``
that names something renamed or made private fails here rather than in a user's ``from ... import *``.
"""
from __future__ import annotations

import importlib
import re

import pytest

import timm_local

from tests.helpers import ROOT


PACKAGES = ["timm_local", "timm_local.training", "timm_local.engine", "timm_local.methods", "timm_local.families",
            "timm_local.data", "timm_local.models"]

#: What a user's script needs from ``import timm_local`` (README's examples and docs/contributing.md's table).
USER_ENTRY_POINTS = {
    "create_local_model", "LocalModel", "train", "TrainConfig", "export_backbone", "load_exported",
    "register_method", "create_method", "list_methods", "register_family", "list_families", "FamilyAdapter",
    "create_datasets", "list_datasets", "UserError",
}


def _check_surface(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no docstring saying what its surface is for"
    names = module.__all__
    assert len(names) == len(set(names)), f"{module_name}.__all__ repeats a name"
    assert not [n for n in names if n.startswith("_")], f"{module_name}.__all__ exports a private name"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{module_name}.__all__ names what the package does not have: {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_a_package_all_is_importable_and_public(package: str) -> None:
    _check_surface(package)


def test_detectron2_plugin_surface() -> None:
    pytest.importorskip("detectron2")
    _check_surface("det")


def test_every_module_all_names_what_the_module_defines() -> None:
    """Also the modules' own ``__all__`` (what a package re-exports comes from them)."""
    wrong = {}
    for path in sorted((ROOT / "timm_local").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module = importlib.import_module(name)
        bad = [n for n in getattr(module, "__all__", ()) if n.startswith("_") or not hasattr(module, n)]
        if bad:
            wrong[name] = bad
    assert not wrong, f"__all__ entries that are private or missing: {wrong}"


def test_top_level_all_holds_the_user_entry_points() -> None:
    assert USER_ENTRY_POINTS <= set(timm_local.__all__), USER_ENTRY_POINTS - set(timm_local.__all__)


def _readme_api_names() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    bullets = [line for line in section.splitlines() if line.startswith("- ")]
    return {name for line in bullets for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", line)}


def test_readme_api_section_names_exactly_the_top_level_all() -> None:
    documented = _readme_api_names()
    exported = set(timm_local.__all__)
    assert documented == exported, (f"README 'Python API' lacks {sorted(exported - documented)}, "
                                    f"names {sorted(documented - exported)} that timm_local.__all__ lacks")
