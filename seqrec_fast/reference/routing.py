"""Eager oracle of capsule routing (MIND / ComiRec-DR)."""
from __future__ import annotations

from typing import Optional

import torch

SQUASH_EPS = 1e-9

# softmax_axis values: the coupling softmax over the interests (ComiRec), over all L positions
# with padded ones zeroed afterwards (torch-rechub), over the real positions only.
SOFTMAX_AXES = ("interest", "sequence", "sequence_real")


def squash(s: torch.Tensor) -> torch.Tensor:
    """Capsule squash along the last axis: |s|²/(1+|s|²)/sqrt(|s|²+1e-9)·s."""
    n = (s * s).sum(-1, keepdim=True)
    return n / (1 + n) / torch.sqrt(n + SQUASH_EPS) * s


def bilinear_ref(seq_emb: torch.Tensor, weight: torch.Tensor, num_interests: int,
                 bilinear: str) -> torch.Tensor:
    """u_hat (B, K, L, d) of capsule routing.

    shared: ``weight (d, d)``, u_hat[b,k,l] = weight @ seq_emb[b,l] for every k (MIND).
    per_position: ``weight (L, K*d, d)``, u_hat[b,k,l] = weight[l, k*d:(k+1)*d] @ seq_emb[b,l]
    (ComiRec-DR).
    """
    B, L, d = seq_emb.shape
    K = num_interests
    if bilinear == "shared":
        return (seq_emb @ weight.transpose(0, 1)).unsqueeze(1).expand(B, K, L, d)
    u = torch.einsum("lod,bld->blo", weight, seq_emb)  # (B, L, K*d)
    return u.reshape(B, L, K, d).transpose(1, 2)


def routing_ref(seq_emb: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, *,
                num_interests: int, iters: int = 3, bilinear: str = "per_position",
                init_logits: Optional[torch.Tensor] = None, softmax_axis: str = "interest",
                detach_routing: bool = True) -> torch.Tensor:
    """Dynamic (capsule) routing as in ComiRec's official code.

    seq_emb: (B, L, d); mask: (B, L) bool, True at real items; weight: (d, d) shared or
    (L, K*d, d) per position; init_logits: (B, K, L) or None (zeros), treated as a constant.
    Returns interests (B, K, d) in seq_emb's dtype; fp16/bf16 inputs are computed in fp32
    internally (float64 stays float64).

    Each iteration (m = mask): p = softmax(b) over
      "interest":      the interest axis (ComiRec),
      "sequence":      all L positions of the sequence, padded ones included (torch-rechub),
      "sequence_real": the real positions only (p = 0 at padded ones);
    c = p·m, s = Σ_l c·u_hat, v = squash(s), b += <u_hat, v> (every position, not after the
    last iteration). With ``detach_routing`` every iteration before the last sees u_hat
    detached (no gradient through b), as ComiRec. A row with every position padded gets zero
    interests (and zero gradients).

    Padding: for "interest" and "sequence_real" seq_emb is zeroed at padded positions before
    the bilinear map, so nothing there (NaN / Inf included) reaches a value or gradient. For
    "sequence" padded positions are part of the computation by definition, as in
    torch-rechub: their logits are updated from the u_hat there and stay in the softmax
    denominator.
    """
    dtype = seq_emb.dtype
    if dtype in (torch.float16, torch.bfloat16):  # fp32 inside: the oracle at every dtype
        seq_emb, weight = seq_emb.float(), weight.float()
    if softmax_axis != "sequence":
        seq_emb = torch.where(mask[:, :, None], seq_emb, seq_emb.new_zeros(()))
    u = bilinear_ref(seq_emb, weight, num_interests, bilinear)
    v = routing_iterations_ref(u, mask, init_logits, iters=iters, softmax_axis=softmax_axis,
                               detach_routing=detach_routing)
    return v.to(dtype)


def routing_iterations_ref(u: torch.Tensor, mask: torch.Tensor,
                           init_logits: Optional[torch.Tensor], *, iters: int = 3,
                           softmax_axis: str = "interest",
                           detach_routing: bool = True) -> torch.Tensor:
    """The routing iterations alone, on u_hat (B, K, L, d) (see ``routing_ref``) -> (B, K, d)."""
    if softmax_axis not in SOFTMAX_AXES:
        raise ValueError(f"softmax_axis must be one of {SOFTMAX_AXES}, got {softmax_axis!r}")
    B, K, L, d = u.shape
    m = mask[:, None, :]  # (B, 1, L)
    if init_logits is None:
        b = torch.zeros(B, K, L, dtype=u.dtype, device=u.device)
    else:
        b = init_logits.detach().to(u.dtype)
    v = None
    for i in range(iters):
        last = i == iters - 1
        uu = u if (last or not detach_routing) else u.detach()
        if softmax_axis == "interest":
            c = torch.softmax(b, dim=1)
        elif softmax_axis == "sequence":
            c = torch.softmax(b, dim=2)
        else:
            # finite fill so an all-padded row gives a uniform (then zeroed) row, never NaN
            c = torch.softmax(b.masked_fill(~m, torch.finfo(b.dtype).min), dim=2)
        c = torch.where(m, c, c.new_zeros(()))
        s = (c.unsqueeze(-1) * uu).sum(2)  # (B, K, d)
        v = squash(s)
        if not last:
            b = b + (uu * v.unsqueeze(2)).sum(-1)
    return v
