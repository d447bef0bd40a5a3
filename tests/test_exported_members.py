"""The public names of each package: sorted, all present, and nothing public left out."""

from __future__ import annotations

import importlib
import re
import types

import pytest

PACKAGES = ["receiver", "storage"]


def isort_key(name: str) -> tuple[int, list[str | int]]:
    """Ruff's RUF022 order: CONSTANTS, then Classes, then the rest, each in natural order."""
    if name.isupper() or not name.strip("_0123456789"):
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    parts: list[str | int] = []
    for number, text in re.findall(r"(\d+)|(\D+)", name):
        parts += [int(number)] if number else [text]
    return group, parts


def test_isort_key_matches_ruff() -> None:
    """The order the test expects is the one ruff's RUF022 writes."""
    names = ["item10", "FetchError", "TASK_ID", "item2", "Fetched", "AssetKind"]
    assert sorted(names, key=isort_key) == [
        "TASK_ID",
        "AssetKind",
        "FetchError",
        "Fetched",
        "item2",
        "item10",
    ]


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_sorted(package: str) -> None:
    """A package's __all__ is in ruff's isort-style order, without repeats."""
    exported = importlib.import_module(package).__all__
    assert exported == sorted(exported, key=isort_key)
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_exists(package: str) -> None:
    """Every name in a package's __all__ can be imported from it."""
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)
    assert set(module.__all__) <= set(namespace)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_exported(package: str) -> None:
    """What a package imports for its users is listed in its __all__."""
    module = importlib.import_module(package)
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and name != "annotations"  # from __future__
        and not isinstance(value, types.ModuleType)
    }
    assert public == set(module.__all__)
