"""Eager oracles of ComiRec-SA multi-interest self-attention and the label-aware readout.

Both compute in fp32 for fp16/bf16 inputs (as the kernels accumulate) and return the input
dtype: the reference is a trustworthy oracle at every dtype (no half-precision overflow or
underflow inside). float64 in, float64 out.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def attention_ref(seq_emb: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor,
                  b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor], *,
                  pos_emb: Optional[torch.Tensor] = None,
                  return_attention: bool = False):
    """Multi-interest self-attention as in ComiRec-SA.

    seq_emb: (B, L, d); mask: (B, L) bool, True at real items; w1: (d, d_a); b1: (d_a,) or None;
    w2: (d_a, K); b2: (K,) or None; pos_emb: (L, d) or None.

    keys = seq_emb + pos_emb; H = tanh(keys·w1 + b1) (B, L, d_a); A = H·w2 + b2 (B, L, K);
    attention = softmax of A over the real positions of the sequence axis, 0 at padded positions
    (B, K, L); interests = attention·seq_emb (B, K, d), values WITHOUT the position embedding.
    A row with every position padded gets all-zero attention, hence zero interests (no NaN).
    Padding is not data: seq_emb at padded positions is never read (a NaN or Inf there changes
    no value and no gradient; its gradient there is 0). Non-finite values at real positions
    propagate as PyTorch's matmul/tanh/softmax propagate them.
    fp16/bf16 inputs are computed in fp32 (autocast off) and the results cast back.
    Returns interests, or (interests, attention) when ``return_attention``.
    """
    dtype = seq_emb.dtype
    if dtype in (torch.float16, torch.bfloat16):
        with torch.autocast(seq_emb.device.type, enabled=False):
            up = [None if t is None else t.float() for t in (seq_emb, w1, b1, w2, b2, pos_emb)]
            res = attention_ref(up[0], mask, up[1], up[2], up[3], up[4], pos_emb=up[5],
                                return_attention=return_attention)
        return tuple(r.to(dtype) for r in res) if return_attention else res.to(dtype)
    # padded positions read as 0 (masked_fill's gradient there is 0: NaN cannot leak back)
    seq_emb = seq_emb.masked_fill(~mask[:, :, None], 0.0)
    keys = seq_emb if pos_emb is None else seq_emb + pos_emb
    h = keys @ w1
    if b1 is not None:
        h = h + b1
    h = torch.tanh(h)
    a = h @ w2
    if b2 is not None:
        a = a + b2
    a = a.transpose(1, 2)  # (B, K, L)
    m = mask[:, None, :]
    # finite fill: a fully padded row gives a uniform row that the mask then zeroes, never NaN
    att = torch.softmax(a.masked_fill(~m, torch.finfo(a.dtype).min), dim=-1) * m
    interests = att @ seq_emb
    if return_attention:
        return interests, att
    return interests


def label_aware_attention_ref(interests: torch.Tensor, target_emb: torch.Tensor,
                              exponent: float = math.inf) -> torch.Tensor:
    """Label-aware readout of the interests for a target item.

    interests: (B, K, d); target_emb: (B, d). Returns the user vector (B, d).
    exponent = inf: the interest with the largest <v_k, e_target> (hard readout, ComiRec; ties go to
    the lowest k; the gradient flows into that interest only). Finite p: MIND's
    Σ_k softmax_k(<v_k, e>^p)·v_k with ``torch.pow`` as in MIND's code (p = 1 plain softmax;
    an even p ranks by |score|; a non-integer p needs non-negative scores, else NaN).
    fp16/bf16 inputs are computed in fp32 (scores and their powers do not overflow) and the
    result cast back.
    """
    dtype = interests.dtype
    if dtype in (torch.float16, torch.bfloat16):  # fp32 inside, the input dtype out
        with torch.autocast(interests.device.type, enabled=False):
            out = label_aware_attention_ref(interests.float(), target_emb.float(), exponent)
        return out.to(dtype)
    scores = torch.einsum("bkd,bd->bk", interests, target_emb)
    if math.isinf(exponent):
        idx = scores.argmax(dim=1)
        return interests[torch.arange(interests.shape[0], device=interests.device), idx]
    w = torch.softmax(torch.pow(scores, exponent), dim=1)
    return torch.einsum("bk,bkd->bd", w, interests)
