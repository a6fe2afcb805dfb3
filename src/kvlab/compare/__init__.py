"""Compare a test cache with a golden one: metrics per (step, layer, head), first divergence, report.

`diff_snapshots(golden, test)` streams two snapshots layer by layer; `run_study(model, prompt,
golden=SPEC, tests=[SPEC, ...])` captures the golden run and teacher-forced test runs first;
`write_report(study, path)` writes the HTML report.
"""

from kvlab.compare.diff import DiffResult, diff_snapshots
from kvlab.compare.metrics import Errors, error_maps, first_mismatch, kl_divergence, tensor_errors
from kvlab.compare.report import write_report
from kvlab.compare.study import Study, compare_snapshots, run_study

__all__ = [
    "DiffResult", "Errors", "Study", "compare_snapshots", "diff_snapshots", "error_maps", "first_mismatch",
    "kl_divergence", "run_study", "tensor_errors", "write_report",
]
