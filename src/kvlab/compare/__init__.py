"""Compare a test cache with a golden one: metrics per (step, layer, head), first divergence."""

from kvlab.compare.metrics import Errors, error_maps, first_mismatch, kl_divergence, tensor_errors

__all__ = ["Errors", "error_maps", "first_mismatch", "kl_divergence", "tensor_errors"]
