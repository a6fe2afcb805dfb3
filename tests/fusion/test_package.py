"""kvlab.fusion's public names, loaded on first use, and imports that run one way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kvlab.fusion
from tests.import_graph import import_circles, import_graph

SRC = Path(kvlab.fusion.__file__).resolve().parents[2]


def test_each_public_name_is_what_its_module_defines():
    for name, module in kvlab.fusion._EXPORTS.items():
        assert getattr(kvlab.fusion, name) is getattr(sys.modules[module], name)


def test_opening_a_store_loads_no_model_code_and_functions_outlive_their_modules_import():
    script = (
        "import sys, types\n"
        "from kvlab.fusion import open_store\n"
        "open_store('memory://')\n"
        "assert 'transformers' not in sys.modules and 'kvlab.fusion.fused' not in sys.modules\n"
        "import kvlab.fusion.evaluate, kvlab.fusion.explain_report, kvlab.fusion.precompute\n"
        "from kvlab.fusion import evaluate, explain, precompute\n"
        "assert all(isinstance(f, types.FunctionType) for f in (evaluate, explain, precompute))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_no_import_circle_passes_through_fusion():
    circles = import_circles(import_graph(SRC, "kvlab"))
    assert [c for c in circles if any(m.startswith("kvlab.fusion") for m in c)] == []
