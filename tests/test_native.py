"""lb.l7.native: the mypyc build stands in for the sources only while it was built from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import lb.l7
import lb.l7.client as client
from lb.l7 import native

SOURCES = Path(lb.l7.__file__).parent


@pytest.fixture
def build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A copy of the sources and a "build" of them (its manifest only)."""
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    package = tmp_path / "lb" / "l7"
    package.mkdir(parents=True)
    for name in native.MODULES:
        shutil.copy(SOURCES / f"{name}.py", package)
    directory = tmp_path / "lb-native"
    directory.mkdir()
    (directory / native.MANIFEST).write_text(json.dumps(native.manifest(package, "x__mypyc")))
    return directory, package


def test_a_build_of_these_sources_is_usable(build: tuple[Path, Path]) -> None:
    directory, package = build
    assert native.usable(directory, package) is None


def test_an_edited_module_means_plain_python(build: tuple[Path, Path]) -> None:
    directory, package = build
    client = package / "client.py"
    client.write_text(client.read_text() + "\n# edited\n")
    assert native.usable(directory, package) == "built from other sources of client (run deploy/install.sh again)"


def test_no_build_another_interpreter_or_pure_python_asked(build: tuple[Path, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    directory, package = build
    assert "no usable build" in str(native.usable(directory / "missing", package))
    manifest = json.loads((directory / native.MANIFEST).read_text())
    (directory / native.MANIFEST).write_text(json.dumps({**manifest, "ext_suffix": ".cpython-312-x.so"}))
    assert native.usable(directory, package) == "built for another interpreter"
    (directory / native.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setenv(native.PURE_ENV, "1")
    assert native.usable(directory, package) == f"{native.PURE_ENV} is set"
    monkeypatch.setenv(native.PURE_ENV, "0")
    assert native.usable(directory, package) is None


def test_activate_changes_no_path_when_the_build_cannot_stand_in(build: tuple[Path, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    directory, package = build
    monkeypatch.setattr(native, "DIRECTORY", directory)
    (package / "stats.py").write_text("# another stats\n")
    path = [str(package)]
    assert native.activate(path) is not None
    assert path == [str(package)]


def test_the_compiled_modules_are_the_ones_in_use_when_built() -> None:
    """deploy/install.sh built them (CI runs it): then lb.l7 imports them, unless a
    source changed since (run install.sh again) or LB_PURE_PYTHON is set."""
    if not (native.DIRECTORY / native.MANIFEST).exists():
        pytest.skip("no mypyc build in this venv (deploy/install.sh warned why)")
    if lb.l7.NOT_COMPILED is None:
        assert client.__file__ is not None and client.__file__.startswith(str(native.DIRECTORY))
    else:
        assert client.__file__ == str(SOURCES / "client.py")
