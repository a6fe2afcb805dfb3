"""Offloaded decoding: the cost model that chooses splits, the hardware microbenchmark it
reads, and the forward-only decode benchmark. The caches themselves are cache policies
(`kvlab.caches.flexgen`, `kvlab.caches.kvpr`, `kvlab.caches.offload`)."""
