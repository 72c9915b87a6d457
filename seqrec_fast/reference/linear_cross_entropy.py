"""Eager oracle of the full-catalog softmax cross-entropy (``linear_cross_entropy_ref``).

It builds the (B, N) logits on purpose: it is the readable definition the fused kernels of
``seqrec_fast.ops.linear_cross_entropy`` are tested against (in float64), and the ``eager``
backend (float32 inside for fp16/bf16 inputs,
the result in the input dtype).

Convention: ``logits = (user @ items.T + bias) / temperature``; the loss of row b is
``lse_b - (1-ε)·z[b, t_b] - ε/N·Σ_j z[b, j]`` (``torch.nn.functional.cross_entropy`` with
``label_smoothing=ε``). Rows whose target is ``ignore_index`` have loss 0 and no gradient;
``mean`` divides by the number of the other rows (NaN when there are none, as torch).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def linear_cross_entropy_ref(user: torch.Tensor, items: torch.Tensor, target: torch.Tensor, *,
                             bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                             ignore_index: int = -100, reduction: str = "mean",
                             label_smoothing: float = 0.0, return_lse: bool = False):
    """Full-catalog softmax cross-entropy through the (B, N) logits.

    user: (B, d); items: (N, d); target: (B,) int64 in [0, N) or ``ignore_index``;
    bias: (N,) or None. Returns loss (scalar, or (B,) for ``reduction="none"``) in the input
    dtype; with ``return_lse`` also lse (B,) (float32, float64 for float64 inputs).

    fp16/bf16 inputs are computed in float32 (the logits, the softmax and every reduction) and
    the loss is cast back once, so the reference is a trustworthy oracle at every dtype (in
    fp16 the label-smoothing sum over a catalog of 1e4 items alone overflows).
    """
    dtype = user.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = user.to(acc) @ items.to(acc).transpose(0, 1)
    if bias is not None:
        logits = logits + bias.to(acc)
    if temperature != 1.0:
        logits = logits / temperature
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing).to(dtype)
    if not return_lse:
        return loss
    lse = torch.logsumexp(logits, dim=-1).detach()
    return loss, lse
