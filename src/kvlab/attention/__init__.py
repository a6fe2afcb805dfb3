"""Attention computations kvlab checks caches and kernels with: the float64 reference
(`reference_attention`) and flash-decoding over hot + quantized blocks
(`kvlab.attention.flash_decoding`)."""

from kvlab.attention.reference import reference_attention

__all__ = ["reference_attention"]
