"""Element-wise error metrics between a golden tensor and a test tensor.

Everything is computed in float64 from the two tensors element by element: max abs error,
relative L2 error and cosine similarity, either over a whole tensor or per (head, position)
of a `[batch, heads, seq, head_dim]` cache. Never from sums of outputs, which hide
cancelling errors and layout mistakes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

_TINY = 1e-30


@dataclass(frozen=True)
class Errors:
    max_abs: float
    rel_l2: float
    cosine: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def tensor_errors(golden: torch.Tensor, test: torch.Tensor) -> Errors:
    """Max abs error, relative L2 error (||t - g|| / ||g||) and cosine over whole tensors."""
    if golden.shape != test.shape:
        raise ValueError(f"shape mismatch: golden {tuple(golden.shape)} vs test {tuple(test.shape)}")
    g = golden.detach().to(torch.float64).reshape(-1)
    t = test.detach().to(torch.float64).reshape(-1)
    diff = t - g
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    g_norm = float(torch.linalg.vector_norm(g))
    rel = float(torch.linalg.vector_norm(diff)) / max(g_norm, _TINY)
    denom = g_norm * float(torch.linalg.vector_norm(t))
    cosine = float(torch.dot(g, t)) / denom if denom > _TINY else (1.0 if max_abs == 0 else 0.0)
    return Errors(max_abs=max_abs, rel_l2=rel, cosine=cosine)


@dataclass(frozen=True)
class RowSums:
    """Float64 sums over the last dimension, from which every error metric follows.

    Sums add up: the errors of a head or a layer are those of its rows' summed RowSums, so a
    diff can stream a cache chunk by chunk and still report exact whole-tensor figures.
    """

    diff_sq: torch.Tensor
    golden_sq: torch.Tensor
    test_sq: torch.Tensor
    dot: torch.Tensor
    max_abs: torch.Tensor


def row_sums(golden: torch.Tensor, test: torch.Tensor) -> RowSums:
    """Per-row sums of (t - g)^2, g^2, t^2, g*t and max |t - g| over the last dimension.

    A row holding NaN or Inf has a non-finite `golden_sq` or `test_sq` (squares of float32,
    float16 or bfloat16 values cannot overflow float64), which is how a caller finds it.
    """
    if golden.shape != test.shape:
        raise ValueError(f"shape mismatch: golden {tuple(golden.shape)} vs test {tuple(test.shape)}")
    g = golden.detach().to(torch.float64)
    t = test.detach().to(torch.float64)
    diff = t - g
    # einsum reduces each product in one pass (a batched dot), where `(a * b).sum(-1)` takes two
    return RowSums(
        diff_sq=torch.einsum("...d,...d->...", diff, diff),
        golden_sq=torch.einsum("...d,...d->...", g, g),
        test_sq=torch.einsum("...d,...d->...", t, t),
        dot=torch.einsum("...d,...d->...", g, t),
        max_abs=diff.abs().amax(dim=-1) if diff.shape[-1] else diff.new_zeros(diff.shape[:-1]),
    )


def rel_l2_and_cosine(
    diff_sq: torch.Tensor, golden_sq: torch.Tensor, test_sq: torch.Tensor, dot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative L2 error and cosine from summed squares; two all-zero vectors have cosine 1."""
    g_norm, t_norm = golden_sq.sqrt(), test_sq.sqrt()
    rel = diff_sq.sqrt() / g_norm.clamp_min(_TINY)
    denom = g_norm * t_norm
    both_zero = (g_norm <= _TINY) & (t_norm <= _TINY)
    cosine = torch.where(denom > _TINY, dot / denom.clamp_min(_TINY), both_zero.to(torch.float64))
    return rel, cosine


def error_maps(golden: torch.Tensor, test: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per (batch, head, position) errors of `[batch, heads, seq, head_dim]` tensors.

    Returns float64 tensors `[batch, heads, seq]` named max_abs, rel_l2 and cosine; the
    reduction is over head_dim only.
    """
    sums = row_sums(golden, test)
    rel, cosine = rel_l2_and_cosine(sums.diff_sq, sums.golden_sq, sums.test_sq, sums.dot)
    return {"max_abs": sums.max_abs, "rel_l2": rel, "cosine": cosine}


def kl_divergence(golden_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(golden || test) per row of `[steps, vocab]` logits, in float64 (nats)."""
    g = torch.log_softmax(golden_logits.to(torch.float64), dim=-1)
    t = torch.log_softmax(test_logits.to(torch.float64), dim=-1)
    return (g.exp() * (g - t)).sum(-1)


def first_mismatch(golden_tokens: list[int], test_tokens: list[int]) -> int | None:
    """Index of the first step where the two token lists differ (None when they agree)."""
    for i, (a, b) in enumerate(zip(golden_tokens, test_tokens)):
        if a != b:
            return i
    return None
