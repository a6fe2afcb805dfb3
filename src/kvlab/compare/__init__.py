"""Compare a test cache with a golden one: metrics per (step, layer, head), first divergence, report.

`diff_snapshots(golden, test)` streams two snapshots layer by layer; `write_report(study, path)`
writes the HTML report of a `Study`. Analysis only: capturing the runs to compare (`run_study`)
is `kvlab.study`'s, which loads models and runs them.
"""

from kvlab.compare.diff import DiffResult, diff_snapshots
from kvlab.compare.metrics import Errors, error_maps, first_mismatch, kl_divergence, tensor_errors
from kvlab.compare.report import write_report
from kvlab.compare.study import Study

__all__ = [
    "DiffResult", "Errors", "Study", "diff_snapshots", "error_maps", "first_mismatch", "kl_divergence",
    "tensor_errors", "write_report",
]
