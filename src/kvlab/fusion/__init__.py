"""RAG KV fusion: chunk caches computed once, stored, and fused into a prompt's cache."""
