"""The package's shape as docs/design.md draws it: modules on floors, each importing only from floors
below it, never from above; the side modules (floor `—`) imported by notebooks only, using floors 0-1
and each other. The floors are read from the table of docs/design.md, so the picture and the code are
checked against each other."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tinyvit_lib"
DESIGN = ROOT / "docs" / "design.md"
SIDE_FLOOR = "—"  # the floor cell of a side module's row


def read_floors(markdown: str) -> tuple[dict[str, int], set[str]]:
    """({module: floor}, {side modules}) from the first table headed `| floor | module | holds |`:
    one row per module, its name in backticks (`data.py` or `data`), the floor a number or `—`."""
    floors: dict[str, int] = {}
    side: set[str] = set()
    in_table = False
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not in_table:
            in_table = line.lstrip().startswith("|") and [c.lower() for c in cells[:3]] == ["floor", "module", "holds"]
            continue
        if not line.lstrip().startswith("|"):
            break  # the table ends at the first line that is not a row
        if set(cells[0]) <= set("-: "):
            continue  # the separator row
        names = [name.removesuffix(".py") for name in re.findall(r"`([^`]+)`", cells[1])]
        assert names, f"docs/design.md: a row without a module in backticks: {line!r}"
        for name in names:
            assert name not in floors and name not in side, f"docs/design.md: {name} has two rows"
            if cells[0] == SIDE_FLOOR:
                side.add(name)
            else:
                assert cells[0].isdigit(), (
                    f"docs/design.md: floor {cells[0]!r} of {name} is not a number or {SIDE_FLOOR}"
                )
                floors[name] = int(cells[0])
    assert floors, "docs/design.md has no table headed | floor | module | holds |"
    return floors, side


FLOORS, SIDE = read_floors(DESIGN.read_text(encoding="utf-8"))


def package_imports(module: str) -> set[str]:
    """The tinyvit_lib modules that `module` imports (relative imports, anywhere in the file)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    }


def test_the_design_table_reads_as_floors_and_side_modules():
    floors, side = read_floors(
        "| floor | module | holds |\n|---|---|---|\n| 1 | `model.py` | `TinyViT` |\n| — | `plots` | figures |\n\nafter"
    )
    assert floors == {"model": 1} and side == {"plots"}  # backticks in the holds column are not modules
    assert FLOORS["utils"] == 0 and "plots" in SIDE


def test_every_module_has_a_place():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(FLOORS) | SIDE, "give the new module a row in docs/design.md's table of floors"


def test_no_module_imports_from_a_floor_above_it():
    upward = [
        (module, imported)
        for module in FLOORS
        if (PACKAGE / f"{module}.py").exists()
        for imported in package_imports(module)
        if imported in SIDE or FLOORS[imported] > FLOORS[module]
    ]
    assert not upward, f"imports from above: {upward}"


def test_side_modules_use_only_the_ground_floors():
    reach = [
        (module, imported)
        for module in SIDE
        for imported in package_imports(module)
        if imported not in SIDE and FLOORS[imported] > 1
    ]
    assert not reach, reach


def test_utils_imports_nothing_from_the_package():
    assert package_imports("utils") == set()
