"""The import graph read from source: every kind of import counts, and circles are found."""

from __future__ import annotations

from pathlib import Path

from tests.import_graph import import_circles, import_graph


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_function_local_relative_and_lazy_imports_close_circles(tmp_path):
    src = _package(tmp_path, {
        "pkg/__init__.py": '_EXPORTS = {"run": "pkg.low"}\n',
        "pkg/low.py": "def helper():\n    from pkg.high import run\n",
        "pkg/high.py": "from . import low\nfrom .sub import leaf\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/leaf.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import high\n",
        "pkg/alone.py": "import pkg.sub.leaf\nimport os\n",
    })
    graph = import_graph(src, "pkg")
    assert graph["pkg"] == {"pkg.low"}
    assert graph["pkg.high"] == {"pkg.low", "pkg.sub.leaf"}
    assert graph["pkg.alone"] == {"pkg.sub.leaf"}
    assert import_circles(graph) == [["pkg.high", "pkg.low", "pkg.sub.leaf"]]


def test_a_graph_that_runs_one_way_has_no_circle():
    assert import_circles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


SRC = Path(__file__).resolve().parents[1] / "src"


def test_no_import_circle_anywhere_in_kvlab():
    assert import_circles(import_graph(SRC, "kvlab")) == []


def test_the_run_spec_reads_the_engines_as_data_not_their_runners():
    graph = import_graph(SRC, "kvlab")
    assert {m for m in graph["kvlab.runspec"] if m.startswith("kvlab.engines")} == {"kvlab.engines.settings"}
    assert graph["kvlab.engines.settings"] <= {"kvlab.caches.registry", "kvlab.errors", "kvlab.params"}


def test_compare_is_analysis_only():
    graph = import_graph(SRC, "kvlab")
    runners = {"kvlab.models", "kvlab.capture", "kvlab.distributed", "kvlab.runner", "kvlab.study"}
    loading = {m: graph[m] & runners for m in graph if m.startswith("kvlab.compare")}
    assert {m: deps for m, deps in loading.items() if deps} == {}


def test_model_facts_is_the_ground_floor():
    assert import_graph(SRC, "kvlab")["kvlab.model_facts"] == {"kvlab.errors"}


def test_the_bare_package_name_in_a_string_is_no_import(tmp_path):
    src = _package(tmp_path, {"pkg/__init__.py": "from pkg import home\n", "pkg/home.py": 'DIR = "pkg"\n'})
    assert import_circles(import_graph(src, "pkg")) == []


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_quant_holds_number_formats_that_import_nothing_above_them():
    graph = import_graph(SRC, "kvlab")
    quant = {m: sorted(t for t in targets if not _in(t, "kvlab.quant") and t != "kvlab.errors")
             for m, targets in graph.items() if _in(m, "kvlab.quant")}
    assert "kvlab.quant.fp8" in quant
    assert {m: t for m, t in quant.items() if t} == {}


def test_the_scales_capability_is_in_no_circle():
    circles = import_circles(import_graph(SRC, "kvlab"))
    assert [c for c in circles if any(_in(m, "kvlab.scales") for m in c)] == []
