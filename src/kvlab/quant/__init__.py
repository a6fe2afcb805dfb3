"""Number formats for KV caches: fp8 now; integer and ggml block formats beside it."""
