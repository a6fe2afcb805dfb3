"""Attention traces in GGUF: record them from a run, read them (kvlab's or ggml-native), check them.

`record_trace` writes q, k, v, mask and attention output of chosen layers at each step;
`TraceFile` reads a trace back into torch tensors whatever its ggml layout; `check_trace`
recomputes each attention in float64 and compares element-wise, per layer, step and head.
"""

from kvlab.trace.check import CheckReport, HeadError, check_trace
from kvlab.trace.format import LAYOUTS, TensorLayout, TraceError, tensor_name
from kvlab.trace.reader import AttentionStep, TraceFile
from kvlab.trace.record import TraceRecorder, TraceSummary, record_trace
from kvlab.trace.writer import TraceWriter

__all__ = [
    "AttentionStep", "CheckReport", "HeadError", "LAYOUTS", "TensorLayout", "TraceError", "TraceFile",
    "TraceRecorder", "TraceSummary", "TraceWriter", "check_trace", "record_trace", "tensor_name",
]
