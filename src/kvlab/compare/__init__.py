"""Compare a test cache with a golden one: metrics per (step, layer, head), first divergence, report.

`diff_snapshots(golden, test)` streams two snapshots layer by layer; `run_study(model, prompt,
golden=SPEC, tests=[SPEC, ...])` captures the golden run and teacher-forced test runs first;
`write_report(study, path)` writes the HTML report.
"""

from kvlab.compare.metrics import Errors, error_maps, first_mismatch, kl_divergence, tensor_errors

__all__ = [
    "DiffResult", "Errors", "Study", "compare_snapshots", "diff_snapshots", "error_maps", "first_mismatch",
    "kl_divergence", "run_study", "tensor_errors", "write_report",
]

_LAZY = {
    "DiffResult": "kvlab.compare.diff",
    "diff_snapshots": "kvlab.compare.diff",
    "Study": "kvlab.compare.study",
    "compare_snapshots": "kvlab.compare.study",
    "run_study": "kvlab.compare.study",
    "write_report": "kvlab.compare.report",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvlab.compare' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
