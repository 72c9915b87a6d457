"""Eager oracles of the sampled losses: ``sampled_softmax_ref`` (and the candidate logits it is
built on, ``sampled_candidates_ref``) and GRU4Rec's ``bpr_max_ref``.

They build the (B, candidates) logits on purpose: they are the readable definition the fused
kernels of ``seqrec_fast.ops.sampled_softmax`` are tested against (in float64), and the
``eager`` backend (float32 inside for fp16/bf16 inputs, the loss in the input dtype).

Convention: the candidates of row b are its positive ``t_b``, the negatives (shared ``(S,)`` or
its own ``(B, S)`` row) and, with ``in_batch_negatives``, the other rows' targets ``t_j``.
A candidate's logit is ``user_b·item/temperature - logQ(item)`` (the logQ correction is applied
to the final logit, Yi et al. 2019 / TF ``subtract_log_q``): negatives use ``log_q`` (same
shape as ``negatives``), the positive and the in-batch columns use ``target_log_q[j]`` (the
log-probability that item ``t_j`` shows up as somebody's target); absent means 0.
With ``remove_accidental_hits`` every candidate other than the positive whose id equals
``t_b`` (a sampled negative, each of its duplicates, or another row with the same target) is
REMOVED from row b's partition sum, i.e. its logit is -inf (not replaced by a zero score,
which would still add exp(0)). Loss_b = logsumexp(candidates) - positive logit.
"""
from __future__ import annotations

from typing import Optional

import torch


def _acc(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its accumulation dtype: float32 for fp16/bf16 (differentiably), else as is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sampled_candidates_ref(user: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
                           negatives: torch.Tensor, *, log_q: Optional[torch.Tensor] = None,
                           target_log_q: Optional[torch.Tensor] = None,
                           in_batch_negatives: bool = True, remove_accidental_hits: bool = True,
                           temperature: float = 1.0):
    """Corrected logits of every row's candidates: (B, 1 + S [+ B]), column 0 the positive,
    removed candidates at -inf. Differentiable in user and items."""
    B = user.shape[0]
    pos_w = items[target]                                        # (B, d)
    pos = (user * pos_w).sum(-1, keepdim=True) / temperature    # (B, 1)
    if target_log_q is not None:
        pos = pos - target_log_q.to(pos.dtype)[:, None]
    if negatives.dim() == 1:
        neg = (user @ items[negatives].transpose(0, 1)) / temperature      # (B, S)
        neg_ids = negatives[None, :].expand(B, -1)
        if log_q is not None:
            neg = neg - log_q.to(neg.dtype)[None, :]
    else:
        neg = torch.einsum("bd,bsd->bs", user, items[negatives]) / temperature
        neg_ids = negatives
        if log_q is not None:
            neg = neg - log_q.to(neg.dtype)
    removed = neg_ids == target[:, None] if remove_accidental_hits else torch.zeros_like(neg_ids, dtype=torch.bool)
    cols = [pos, neg]
    masks = [torch.zeros(B, 1, dtype=torch.bool, device=user.device), removed]
    if in_batch_negatives:
        inb = (user @ pos_w.transpose(0, 1)) / temperature     # (B, B): row b, column j = t_j
        if target_log_q is not None:
            inb = inb - target_log_q.to(inb.dtype)[None, :]
        diag = torch.eye(B, dtype=torch.bool, device=user.device)
        inb_removed = diag.clone()  # the diagonal is the positive itself, already column 0
        if remove_accidental_hits:
            inb_removed |= target[None, :] == target[:, None]
        cols.append(inb)
        masks.append(inb_removed)
    logits = torch.cat(cols, dim=1)
    mask = torch.cat(masks, dim=1)
    return logits.masked_fill(mask, float("-inf"))


def sampled_softmax_ref(user: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
                        negatives: torch.Tensor, *, log_q: Optional[torch.Tensor] = None,
                        target_log_q: Optional[torch.Tensor] = None,
                        in_batch_negatives: bool = True, remove_accidental_hits: bool = True,
                        temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Sampled softmax with logQ correction and accidental-hit removal (see module doc).

    user: (B, d); items: (N, d); target: (B,) int64; negatives: (S,) shared or (B, S) per row,
    int64; log_q: like ``negatives`` or None; target_log_q: (B,) or None.
    Returns loss: scalar or (B,) for ``reduction="none"``, in the input dtype (computed in
    float32 for fp16/bf16 inputs, every reduction included).
    """
    dtype = user.dtype
    user, items = _acc(user), _acc(items)
    logits = sampled_candidates_ref(user, items, target, negatives, log_q=log_q,
                                    target_log_q=target_log_q,
                                    in_batch_negatives=in_batch_negatives,
                                    remove_accidental_hits=remove_accidental_hits,
                                    temperature=temperature)
    loss = torch.logsumexp(logits, dim=1) - logits[:, 0]
    if reduction == "mean":
        return loss.mean().to(dtype)
    if reduction == "sum":
        return loss.sum().to(dtype)
    return loss.to(dtype)


def bpr_max_ref(user: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
                negatives: torch.Tensor, *, reg: float = 1.0, in_batch_negatives: bool = True,
                remove_accidental_hits: bool = True, temperature: float = 1.0,
                reduction: str = "mean") -> torch.Tensor:
    """GRU4Rec's BPR-max over the same candidates (no logQ):
    loss_b = -log Σ_j s_j σ(r_b - r_j) + reg · Σ_j s_j r_j², s = softmax of the negative scores
    r_j (removed candidates excluded from both sums). float32 inside for fp16/bf16 inputs."""
    dtype = user.dtype
    user, items = _acc(user), _acc(items)
    logits = sampled_candidates_ref(user, items, target, negatives,
                                    in_batch_negatives=in_batch_negatives,
                                    remove_accidental_hits=remove_accidental_hits,
                                    temperature=temperature)
    pos, neg = logits[:, :1], logits[:, 1:]
    keep = torch.isfinite(neg)
    any_kept = keep.any(1)
    # a row whose negatives were all removed gets loss 0 (softmax over nothing is undefined)
    s = torch.softmax(torch.where(any_kept[:, None], neg, torch.zeros_like(neg)), dim=1)
    s = torch.where(any_kept[:, None], s, torch.zeros_like(s))
    negz = torch.where(keep, neg, torch.zeros_like(neg))
    loss = -torch.log((s * torch.sigmoid(pos - negz)).sum(1) + 1e-24) + reg * (s * negz * negz).sum(1)
    loss = torch.where(any_kept, loss, torch.zeros_like(loss))
    if reduction == "mean":
        return loss.mean().to(dtype)
    if reduction == "sum":
        return loss.sum().to(dtype)
    return loss.to(dtype)
