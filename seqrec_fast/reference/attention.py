"""Eager oracles of ComiRec-SA multi-interest self-attention and the label-aware readout."""
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
    Returns interests, or (interests, attention) when ``return_attention``.
    """
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
    """
    scores = torch.einsum("bkd,bd->bk", interests, target_emb)
    if math.isinf(exponent):
        idx = scores.argmax(dim=1)
        return interests[torch.arange(interests.shape[0], device=interests.device), idx]
    w = torch.softmax(torch.pow(scores, exponent), dim=1)
    return torch.einsum("bk,bkd->bd", w, interests)
