"""Batched dynamic (capsule) routing for MIND and ComiRec-DR: ``capsule_routing``.

Structure (DESIGN.md): the bilinear map u_hat = W·e is one batched GEMM done by torch (it is
where the FLOPs are and cuBLAS/MKL do it best), the routing iterations are one fused kernel
(``seqrec_fast::routing_fwd`` / ``routing_bwd`` custom ops) run by the chosen backend. The
GEMM's autograd turns the kernel's ``grad_u`` into gradients for ``seq_emb`` and ``weight``.

u_hat layouts handed to the kernels:
  shared (MIND):         (B, L, d)     = seq_emb @ weightᵀ, identical for every interest
  per_position (DR):     (L, B, K, d)  = bmm over positions, straight out of the GEMM
Saved for backward: the last iteration's coupling c (B, K, L) and pre-squash s (B, K, d) in
fp32; u_hat only when ``detach_routing=False`` (the kernels then recompute the iterations).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _ext
from .. import backend as _backend
from ..reference.routing import routing_ref
from ._common import FLOATS, acc_dtype

OP = "routing"


def _kernels(backend: str, device: torch.device):
    """(fwd, bwd) launchers of the concrete backend."""
    if backend == "cpp":
        return _ext._C.routing_fwd_cpu, _ext._C.routing_bwd_cpu
    if backend == "cuda":
        return _ext._C.routing_fwd_cuda, _ext._C.routing_bwd_cuda
    if backend == "triton":
        from seqrec_fast.kernels import routing as k

        return k._routing_fwd, k._routing_bwd
    raise ValueError(f"no fused routing kernel for backend {backend!r}")


@torch.library.custom_op("seqrec_fast::routing_fwd", mutates_args=())
def _routing_fwd_op(u: Tensor, mask: Tensor, init_logits: Optional[Tensor], num_interests: int,
                    iters: int, seq_axis: bool, detach: bool, backend: str
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """u: (B, L, d) shared or (L, B, K, d) per-position -> v (B, K, d), c_last (B, K, L),
    s_last (B, K, d) (the last two fp32, fp64 for fp64 inputs)."""
    fwd, _ = _kernels(backend, u.device)
    v, c_last, s_last = fwd(u, mask, init_logits, num_interests, iters, seq_axis)
    return v, c_last, s_last


def _dims(u: Tensor, mask: Tensor, num_interests: int):
    B, L = mask.shape
    d = u.shape[-1]
    return B, num_interests, L, d


@_routing_fwd_op.register_fake
def _(u, mask, init_logits, num_interests, iters, seq_axis, detach, backend):
    B, K, L, d = _dims(u, mask, num_interests)
    acc = acc_dtype(u.dtype)
    return (u.new_empty((B, K, d)), u.new_empty((B, K, L), dtype=acc),
            u.new_empty((B, K, d), dtype=acc))


@torch.library.custom_op("seqrec_fast::routing_bwd", mutates_args=())
def _routing_bwd_op(grad_v: Tensor, u: Optional[Tensor], mask: Tensor,
                    init_logits: Optional[Tensor], c_last: Tensor, s_last: Tensor,
                    num_interests: int, iters: int, seq_axis: bool, detach: bool,
                    per_position: bool, backend: str) -> Tensor:
    """-> grad_u in u's layout: (B, L, d) summed over interests (shared) or (L, B, K, d)."""
    _, bwd = _kernels(backend, grad_v.device)
    return bwd(grad_v.contiguous(), u, mask, init_logits, c_last, s_last, num_interests, iters,
               seq_axis, detach, per_position)


@_routing_bwd_op.register_fake
def _(grad_v, u, mask, init_logits, c_last, s_last, num_interests, iters, seq_axis, detach,
      per_position, backend):
    B, K, d = grad_v.shape
    L = mask.shape[1]
    shape = (L, B, K, d) if per_position else (B, L, d)
    return grad_v.new_empty(shape)


def _setup_context(ctx, inputs, output):
    u, mask, init_logits, num_interests, iters, seq_axis, detach, backend = inputs
    _, c_last, s_last = output
    ctx.mark_non_differentiable(c_last, s_last)
    ctx.args = (num_interests, iters, seq_axis, detach, u.dim() == 4, backend)
    # u_hat is only needed to recompute the iterations when gradients flow through all of them
    ctx.save_for_backward(None if detach else u, mask, init_logits, c_last, s_last)


def _backward(ctx, grad_v, _grad_c, _grad_s):
    u, mask, init_logits, c_last, s_last = ctx.saved_tensors
    num_interests, iters, seq_axis, detach, per_position, backend = ctx.args
    if grad_v is None:
        return None, None, None, None, None, None, None, None
    grad_u = _routing_bwd_op(grad_v, u, mask, init_logits, c_last, s_last, num_interests, iters,
                             seq_axis, detach, per_position, backend)
    return grad_u, None, None, None, None, None, None, None


_routing_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(seq_emb, mask, weight, num_interests, iters, bilinear, init_logits, softmax_axis,
              detach_routing):
    _checks.tensor("seq_emb", seq_emb, ndim=3, dtypes=FLOATS)
    device = seq_emb.device
    B, L, d = seq_emb.shape
    K = _checks.positive_int("num_interests", num_interests)
    _checks.positive_int("iters", iters)
    _checks.choice("bilinear", bilinear, ("per_position", "shared"))
    _checks.choice("softmax_axis", softmax_axis, ("interest", "sequence"))
    if not isinstance(detach_routing, bool):
        raise TypeError(f"detach_routing must be a bool, got {type(detach_routing).__name__}")
    if B < 1 or L < 1 or d < 1:
        raise ValueError(f"seq_emb must have batch >= 1 (an empty batch is an error), seq_len >= 1 "
                         f"and dim >= 1, got shape {tuple(seq_emb.shape)}")
    _checks.tensor("weight", weight, dtypes=FLOATS, device=device)
    if weight.dtype != seq_emb.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but seq_emb has {seq_emb.dtype}")
    want = (d, d) if bilinear == "shared" else (L, K * d, d)
    if tuple(weight.shape) != want:
        what = "(dim, dim)" if bilinear == "shared" else "(seq_len, num_interests*dim, dim)"
        raise ValueError(f"weight for bilinear={bilinear!r} must have shape {what} = {want}, "
                         f"got {tuple(weight.shape)}")
    mask = _checks.sequence_mask(mask, B, L, device)
    if init_logits is not None:
        _checks.tensor("init_logits", init_logits, ndim=3, dtypes=FLOATS, device=device)
        if tuple(init_logits.shape) != (B, K, L):
            raise ValueError(f"init_logits must have shape (batch, num_interests, seq_len) = "
                             f"{(B, K, L)}, got {tuple(init_logits.shape)}")
    return mask


def capsule_routing(seq_emb: Tensor, mask: Tensor, weight: Tensor, *, num_interests: int,
                    iters: int = 3, bilinear: str = "per_position",
                    init_logits: Optional[Tensor] = None, softmax_axis: str = "interest",
                    detach_routing: bool = True, backend: str = "auto") -> Tensor:
    """Dynamic routing of a behaviour sequence into ``num_interests`` interest capsules.

    Args:
      seq_emb: (batch, seq_len, dim) item embeddings, fp32/bf16/fp16 (fp64 on cpp/eager).
      mask: (batch, seq_len) bool, True at real items (any pattern), or int lengths (batch,)
        meaning the first ``length`` positions are real.
      weight: nn.Linear orientation (out before in): (dim, dim) for ``bilinear="shared"``
        (MIND: u_hat = seq_emb · weightᵀ, the same for every interest) or
        (seq_len, num_interests*dim, dim) for ``"per_position"`` (ComiRec-DR:
        u_hat[b,k,l] = weight[l, k*dim:(k+1)*dim] · seq_emb[b,l]).
      num_interests: K >= 1. iters: routing iterations (>= 1, default 3).
      init_logits: (batch, num_interests, seq_len) initial routing logits (MIND draws them
        from N(0, 1)), a constant (no gradient); None means zeros (ComiRec-DR).
      softmax_axis: "interest" (ComiRec's official code: coupling softmax over interests) or
        "sequence" (softmax over the real positions, as torch-rechub and many ports do).
      detach_routing: True (ComiRec): iterations before the last see u_hat detached;
        False: gradients flow through every iteration.
      backend: "auto" | "triton" | "cuda" | "cpp" | "eager" (env SEQREC_FAST_BACKEND
        overrides "auto").

    Returns: interests (batch, num_interests, dim) in seq_emb's dtype. A row whose positions
    are all padded gets zero interests and zero gradients (never NaN). An empty batch raises
    ValueError.
    Raises: TypeError / ValueError naming the bad argument; RuntimeError when a backend named
    explicitly cannot run here.
    """
    mask = _validate(seq_emb, mask, weight, num_interests, iters, bilinear, init_logits,
                     softmax_axis, detach_routing)
    be = _backend.resolve(OP, backend, seq_emb.device)
    if be == "eager":
        return routing_ref(seq_emb, mask, weight, num_interests=num_interests, iters=iters,
                           bilinear=bilinear, init_logits=init_logits,
                           softmax_axis=softmax_axis, detach_routing=detach_routing)
    B, L, d = seq_emb.shape
    K = num_interests
    if bilinear == "shared":
        u = torch.matmul(seq_emb, weight.t())  # (B, L, d)
    else:
        # (L, B, d) @ (L, d, K*d) -> (L, B, K*d) -> (L, B, K, d), no copy
        u = torch.bmm(seq_emb.transpose(0, 1), weight.transpose(1, 2)).view(L, B, K, d)
    if init_logits is not None:
        acc = torch.float64 if seq_emb.dtype == torch.float64 else torch.float32
        init_logits = init_logits.detach().to(acc).contiguous()
    v, _, _ = _routing_fwd_op(u, mask.contiguous(), init_logits, K, iters,
                              softmax_axis == "sequence", detach_routing, be)
    return v
