"""Tests mirror the source: the tests of `src/kvlab/<folder>/<module>.py` are in `tests/<folder>/`.

A test file is named `test_<module>.py` or `test_<module>_<aspect>.py` after the module it tests
in the mirrored folder (`test_package.py`: the folder's `__init__.py`); the few tests that cut
across the whole package are listed in CROSS_CUTTING, each with what it covers.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "kvlab"
TESTS = ROOT / "tests"

CROSS_CUTTING = {
    "test_bench.py": "every kvlab name the bench/ scripts import exists",
    "test_bad_input.py": "every command: a bad input is one error line, exit 2 and no new files",
    "test_import_graph.py": "the import circles of the whole source tree",
    "test_layout.py": "this rule",
    "test_readme.py": "the README's commands, run as written",
    "test_transformers_contract.py": "the parts of transformers' API that every part stands on",
}


def _test_files() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def _mirror(test_folder: Path) -> Path:
    return SRC / test_folder.relative_to(TESTS)


def _tests_a_module(test_file: Path) -> bool:
    folder = _mirror(test_file.parent)
    stem = test_file.stem.removeprefix("test_")
    if stem == "package":
        return (folder / "__init__.py").is_file()
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    return stem in modules or any(stem.startswith(m + "_") for m in modules)


def test_every_test_folder_mirrors_a_source_folder():
    folders = {f.parent for f in _test_files()}
    missing = [str(d.relative_to(ROOT)) for d in sorted(folders) if not _mirror(d).is_dir()]
    assert not missing, f"test folders without a src/kvlab folder of the same name: {missing}"


def test_every_test_folder_is_a_package():
    """Test files in two folders may share a name (caches/test_fp8.py, quant/test_fp8.py)."""
    folders = {f.parent for f in _test_files()}
    loose = [str(d.relative_to(ROOT)) for d in sorted(folders) if not (d / "__init__.py").is_file()]
    assert not loose, f"test folders without __init__.py: {loose}"


def test_every_test_file_is_named_after_the_module_it_tests():
    unnamed = [str(f.relative_to(ROOT)) for f in _test_files()
               if not (f.parent == TESTS and f.name in CROSS_CUTTING) and not _tests_a_module(f)]
    assert not unnamed, ("test files not named test_<module>[_<aspect>].py after a module of the mirrored "
                         f"src/kvlab folder (nor listed in CROSS_CUTTING): {unnamed}")


def test_cross_cutting_tests_exist():
    assert sorted(f.name for f in TESTS.glob("test_*.py") if f.name in CROSS_CUTTING) == sorted(CROSS_CUTTING)


def test_the_design_layout_names_every_module_and_folder_of_the_package():
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    layout = text.split("## Layout", 1)[1].split("```", 2)[1]
    named = {line.split()[0].rstrip("/") for line in layout.splitlines() if line.startswith("  ") and line.split()
             and not line.startswith("   ")}
    present = {p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")}
    present |= {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    missing = sorted(name for name in present if name not in named and name + ".py" not in named)
    assert missing == [], f"docs/DESIGN.md's Layout names no line for: {missing}"
    gone = sorted(n for n in named if n.removesuffix(".py") not in present and n != "store")
    assert gone == [], f"docs/DESIGN.md's Layout names what the package no longer has: {gone}"
