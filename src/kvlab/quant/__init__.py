"""Number formats for KV caches (fp8 now; integer and ggml block formats beside it) and FP8 KV scales:
calibrate, extract, export and check them."""

from kvlab.quant.scales import KVScales, ScalesError

__all__ = ["KVScales", "ScalesError"]
