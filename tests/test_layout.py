"""The package's shape (../shared/DESIGN.md): modules on floors, each importing only from floors below
or beside it, never from above; the figure and table modules on the side, imported by notebooks only."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tinyvit_lib"

FLOORS = {
    "utils": 0,
    "model": 1,
    "data": 1,
    "augment": 1,
    "logit_store": 1,
    "distill": 2,
    "teachers": 2,
    "trainer": 3,
    "experiment": 4,
    "train": 5,
    "precompute_logits": 5,
    "bench": 5,
    "profiles": 5,
}
SIDE = {"plots", "anatomy", "explore"}  # pure functions of results: may use floors 0-1 and each other


def package_imports(module: str) -> set[str]:
    """The tinyvit_lib modules that `module` imports (relative imports, anywhere in the file)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    }


def test_every_module_has_a_place():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(FLOORS) | SIDE, "add the new module to DESIGN.md's picture and to FLOORS or SIDE"


def test_no_module_imports_from_a_floor_above_it():
    upward = [
        (module, imported)
        for module in FLOORS
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
