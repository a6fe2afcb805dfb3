"""Attention kernels kvlab checks caches with: flash-decoding over hot + quantized blocks
(`kvlab.attention.flash_decoding`)."""
