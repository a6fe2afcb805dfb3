"""Attention computations kvlab checks caches and kernels against."""

from kvlab.attention.reference import reference_attention

__all__ = ["reference_attention"]
