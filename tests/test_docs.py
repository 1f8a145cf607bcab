"""docs/architecture.md cannot drift from the code: its module map names
every package and module under lb/, and nothing that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_imports import import_graph

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def module_map_names() -> set[str]:
    """Every `lb/...` name written in the "Module map" section."""
    text = ARCHITECTURE.read_text()
    section = text.split("\n## Module map\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(lb/[\w/]*?(?:\.py|/))`", section))


def module_rows() -> dict[str, int]:
    """Dotted module name -> its row number in the module map."""
    section = ARCHITECTURE.read_text().split("\n## Module map\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].isdigit():
            continue
        for name in re.findall(r"`(lb/[\w/]*?(?:\.py|/))`", cells[1]):
            rows[name.removesuffix(".py").removesuffix("/").replace("/", ".")] = int(cells[0])
    return rows


def modules_and_packages() -> set[str]:
    """lb/x.py for each module, lb/x/ for each package (their __init__.py is the package)."""
    names = set()
    for path in (ROOT / "lb").rglob("*.py"):
        relative = path.relative_to(ROOT)
        if "__pycache__" in relative.parts:
            continue
        if path.name == "__init__.py":
            if relative.parent != Path("lb"):
                names.add(f"{relative.parent.as_posix()}/")
        else:
            names.add(relative.as_posix())
    return names


def test_module_map_names_every_module_and_package() -> None:
    missing = modules_and_packages() - module_map_names()
    assert not missing, f"docs/architecture.md's module map does not name: {sorted(missing)}"


def test_module_map_names_nothing_that_does_not_exist() -> None:
    extra = module_map_names() - modules_and_packages()
    assert not extra, f"docs/architecture.md's module map names what does not exist: {sorted(extra)}"


def test_no_comment_points_outside_the_repository() -> None:
    """Design and ELB references live in docs/, not in ../shared/."""
    offenders = []
    for path in [*(ROOT / "lb").rglob("*.py"), *(ROOT / "bpf").glob("*.[ch]"), *(ROOT / "tests").rglob("*.py")]:
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"shared/|REFERENCE\.md|ARCHITECTURE\.md|LAB-NOTES\.md", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "point these at docs/ instead:\n" + "\n".join(offenders)


def test_imports_go_one_way_down_the_module_map() -> None:
    """A module imports only modules of its own row or of rows above it."""
    rows = module_rows()
    rows["lb"] = 0
    upward = []
    for module, imported in import_graph().items():
        for target in imported:
            if rows[target] > rows[module]:
                upward.append(f"{module} (row {rows[module]}) imports {target} (row {rows[target]})")
    assert not upward, "imports against the module map's order:\n" + "\n".join(sorted(upward))


def test_no_merge_conflict_markers_are_committed() -> None:
    """A conflict resolved in one file and committed in another once left
    markers in docs/architecture.md; every tracked text file is checked."""
    offenders = []
    for path in [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml",
                 *(ROOT / "docs").rglob("*.md"), *(ROOT / "lb").rglob("*.py"), *(ROOT / "bpf").glob("*.[ch]"),
                 *(ROOT / "tests").rglob("*.py"), *(ROOT / "deploy").rglob("*"), *(ROOT / "vagrant").rglob("*")]:
        if not path.is_file() or path.suffix in (".key", ".pem") or ".vagrant" in path.parts:
            continue
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(lines, 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "=======":
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, "merge conflict markers: " + ", ".join(offenders)
