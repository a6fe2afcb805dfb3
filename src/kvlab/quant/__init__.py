"""Number formats for KV caches, pure tensor arithmetic that imports nothing else of kvlab.

`fp8` (e4m3fn, e5m2, e4m3fnuz: scale, quantize, dequantize), `intq` (asymmetric grouped integers
at 2/4/8 bits, as KIVI), `ggml` (q8_0 / q4_0 blocks byte for byte), `packing` (sub-byte codes)
and `blocks` (token-block codecs of the mixed cache over these). FP8 KV *scales* (calibrate,
extract, export, check) are a capability of their own: `kvlab.scales`.
"""
