"""Batched dynamic (capsule) routing for MIND and ComiRec-DR: ``capsule_routing``.

Structure (DESIGN.md): the bilinear map u_hat = W·e is one batched GEMM done by torch (it is
where the FLOPs are and cuBLAS/MKL do it best), the routing iterations are one fused kernel
(``seqrec_fast::routing_fwd`` / ``routing_bwd`` custom ops) run by the chosen backend. The
GEMM's autograd turns the kernel's ``grad_u`` into gradients for ``seq_emb`` and ``weight``.
Padded rows of seq_emb are zeroed before the GEMM (except for torch-rechub's "sequence"
softmax, where they are data), so nothing there reaches u_hat or the weight gradient.
MIND on Triton instead runs ``seqrec_fast::routing_mind_fwd`` / ``routing_mind_bwd``: the
kernels compute u_hat = E·Wᵀ themselves (tl.dot) and return dE, dW (both detach modes).

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
from ..reference.routing import SOFTMAX_AXES, routing_ref
from ._common import (FLOATS, acc_dtype, autocast_cast, autocast_dtype, on_input_device,
                      sequence_mask)

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
@on_input_device
def _routing_fwd_op(u: Tensor, mask: Tensor, init_logits: Optional[Tensor], num_interests: int,
                    iters: int, seq_axis: bool, seq_all: bool, detach: bool, backend: str
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """u: (B, L, d) shared or (L, B, K, d) per-position -> v (B, K, d), c_last (B, K, L),
    s_last (B, K, d) (the last two fp32, fp64 for fp64 inputs). seq_axis: coupling softmax over
    the sequence; seq_all: over all L positions (torch-rechub) instead of the real ones."""
    fwd, _ = _kernels(backend, u.device)
    v, c_last, s_last = fwd(u, mask, init_logits, num_interests, iters, seq_axis, seq_all)
    return v, c_last, s_last


def _dims(u: Tensor, mask: Tensor, num_interests: int):
    B, L = mask.shape
    d = u.shape[-1]
    return B, num_interests, L, d


@_routing_fwd_op.register_fake
def _(u, mask, init_logits, num_interests, iters, seq_axis, seq_all, detach, backend):
    B, K, L, d = _dims(u, mask, num_interests)
    acc = acc_dtype(u.dtype)
    return (u.new_empty((B, K, d)), u.new_empty((B, K, L), dtype=acc),
            u.new_empty((B, K, d), dtype=acc))


@torch.library.custom_op("seqrec_fast::routing_bwd", mutates_args=())
@on_input_device
def _routing_bwd_op(grad_v: Tensor, u: Optional[Tensor], mask: Tensor,
                    init_logits: Optional[Tensor], c_last: Tensor, s_last: Tensor,
                    num_interests: int, iters: int, seq_axis: bool, seq_all: bool,
                    detach: bool, per_position: bool, backend: str) -> Tensor:
    """-> grad_u in u's layout: (B, L, d) summed over interests (shared) or (L, B, K, d)."""
    _, bwd = _kernels(backend, grad_v.device)
    return bwd(grad_v.contiguous(), u, mask, init_logits, c_last, s_last, num_interests, iters,
               seq_axis, detach, per_position, seq_all)


@_routing_bwd_op.register_fake
def _(grad_v, u, mask, init_logits, c_last, s_last, num_interests, iters, seq_axis, seq_all,
      detach, per_position, backend):
    B, K, d = grad_v.shape
    L = mask.shape[1]
    shape = (L, B, K, d) if per_position else (B, L, d)
    return grad_v.new_empty(shape)


def _setup_context(ctx, inputs, output):
    u, mask, init_logits, num_interests, iters, seq_axis, seq_all, detach, backend = inputs
    _, c_last, s_last = output
    ctx.mark_non_differentiable(c_last, s_last)
    ctx.args = (num_interests, iters, seq_axis, seq_all, detach, u.dim() == 4, backend)
    # u_hat is only needed to recompute the iterations when gradients flow through all of them
    ctx.save_for_backward(None if detach else u, mask, init_logits, c_last, s_last)


def _backward(ctx, grad_v, _grad_c, _grad_s):
    u, mask, init_logits, c_last, s_last = ctx.saved_tensors
    num_interests, iters, seq_axis, seq_all, detach, per_position, backend = ctx.args
    if grad_v is None:
        return (None,) * 9
    grad_u = _routing_bwd_op(grad_v, u, mask, init_logits, c_last, s_last, num_interests, iters,
                             seq_axis, seq_all, detach, per_position, backend)
    return (grad_u,) + (None,) * 8


_routing_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---- MIND fused: u = seq_emb · weightᵀ inside the Triton routing kernels
@torch.library.custom_op("seqrec_fast::routing_mind_fwd", mutates_args=())
@on_input_device
def _routing_mind_fwd_op(seq_emb: Tensor, weight: Tensor, mask: Tensor,
                         init_logits: Optional[Tensor], num_interests: int, iters: int,
                         seq_axis: bool, seq_all: bool, detach: bool
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    """seq_emb (B, L, d), weight (d, d) -> v (B, K, d), c_last (B, K, L), s_last (B, K, d)
    (fp32); the Triton kernel computes u_hat itself (kernels.routing._routing_mind_fwd)."""
    from seqrec_fast.kernels import routing as k

    return k._routing_mind_fwd(seq_emb, weight, mask, init_logits, num_interests, iters,
                               seq_axis, seq_all)


@_routing_mind_fwd_op.register_fake
def _(seq_emb, weight, mask, init_logits, num_interests, iters, seq_axis, seq_all, detach):
    B, L, d = seq_emb.shape
    K = num_interests
    return (seq_emb.new_empty((B, K, d)), seq_emb.new_empty((B, K, L), dtype=torch.float32),
            seq_emb.new_empty((B, K, d), dtype=torch.float32))


@torch.library.custom_op("seqrec_fast::routing_mind_bwd", mutates_args=())
@on_input_device
def _routing_mind_bwd_op(grad_v: Tensor, seq_emb: Tensor, weight: Tensor, mask: Tensor,
                         init_logits: Optional[Tensor], c_last: Tensor, s_last: Tensor,
                         num_interests: int, iters: int, seq_axis: bool, seq_all: bool,
                         detach: bool) -> Tuple[Tensor, Tensor]:
    """-> (grad seq_emb (B, L, d), grad weight (d, d)); detach: through the last iteration
    only (c_last, s_last), else through every iteration (recomputed from seq_emb, weight)."""
    from seqrec_fast.kernels import routing as k

    return k._routing_mind_bwd(grad_v, seq_emb, weight, mask, c_last, s_last, num_interests,
                               seq_all, detach=detach, init_logits=init_logits, iters=iters,
                               seq_axis=seq_axis)


@_routing_mind_bwd_op.register_fake
def _(grad_v, seq_emb, weight, mask, init_logits, c_last, s_last, num_interests, iters,
      seq_axis, seq_all, detach):
    return torch.empty_like(seq_emb), torch.empty_like(weight)


def _mind_setup_context(ctx, inputs, output):
    seq_emb, weight, mask, init_logits, num_interests, iters, seq_axis, seq_all, detach = inputs
    _, c_last, s_last = output
    ctx.mark_non_differentiable(c_last, s_last)
    ctx.args = (num_interests, iters, seq_axis, seq_all, detach)
    ctx.save_for_backward(seq_emb, weight, mask, init_logits, c_last, s_last)


def _mind_backward(ctx, grad_v, _grad_c, _grad_s):
    seq_emb, weight, mask, init_logits, c_last, s_last = ctx.saved_tensors
    num_interests, iters, seq_axis, seq_all, detach = ctx.args
    if grad_v is None:
        return (None,) * 9
    d_seq, d_weight = _routing_mind_bwd_op(grad_v, seq_emb, weight, mask, init_logits, c_last,
                                           s_last, num_interests, iters, seq_axis, seq_all,
                                           detach)
    return (d_seq, d_weight) + (None,) * 7


_routing_mind_fwd_op.register_autograd(_mind_backward, setup_context=_mind_setup_context)


def _mind_fused(be: str, bilinear: str, seq_emb: Tensor) -> bool:
    """The fused MIND kernels take this call: Triton, shared map, a register-resident row."""
    if be != "triton" or bilinear != "shared":
        return False
    from seqrec_fast.kernels import routing as k

    return k.mind_fusable(seq_emb.shape[1], seq_emb.shape[2], seq_emb.dtype)


def _validate(seq_emb, mask, weight, num_interests, iters, bilinear, init_logits, softmax_axis,
              detach_routing):
    _checks.tensor("seq_emb", seq_emb, ndim=3, dtypes=FLOATS)
    device = seq_emb.device
    B, L, d = seq_emb.shape
    K = _checks.positive_int("num_interests", num_interests)
    _checks.positive_int("iters", iters)
    _checks.choice("bilinear", bilinear, ("per_position", "shared"))
    _checks.choice("softmax_axis", softmax_axis, SOFTMAX_AXES)
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
    mask = sequence_mask(mask, B, L, device)
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
        meaning the first ``length`` positions are real. A length outside [0, seq_len] is a
        ValueError on CPU, eager and under torch.compile alike; on CUDA it is checked without
        a host sync, by a device-side assert (the error surfaces at the next synchronising
        call), compiled or not.
      weight: nn.Linear orientation (out before in): (dim, dim) for ``bilinear="shared"``
        (MIND: u_hat = seq_emb · weightᵀ, the same for every interest) or
        (seq_len, num_interests*dim, dim) for ``"per_position"`` (ComiRec-DR:
        u_hat[b,k,l] = weight[l, k*dim:(k+1)*dim] · seq_emb[b,l]).
      num_interests: K >= 1. iters: routing iterations (>= 1, default 3).
      init_logits: (batch, num_interests, seq_len) initial routing logits (MIND draws them
        from N(0, 1)), a constant (no gradient); None means zeros (ComiRec-DR).
      softmax_axis: the axis of the coupling softmax c = softmax(b), m the mask:
        "interest" (ComiRec's official code): c[k,l] = exp(b[k,l]) / Σ_k' exp(b[k',l]) · m[l];
        "sequence" (torch-rechub's CapsuleNetwork exactly): c[k,l] = exp(b[k,l]) /
          Σ_{l'<L} exp(b[k,l']) · m[l] — the denominator runs over ALL L positions, padded ones
          included, and is not renormalised after zeroing; the logits of padded positions are
          updated like the others (b += <u_hat, v> with u_hat computed from whatever embedding
          sits there), so padded positions change the result (the one variant where they do);
        "sequence_real": c[k,l] = exp(b[k,l]) / Σ_{l' real} exp(b[k,l']) · m[l] (softmax
          over the real positions only; before this option existed "sequence" meant this).
      detach_routing: True (ComiRec): iterations before the last see u_hat detached;
        False: gradients flow through every iteration.
      backend: "auto" | "triton" | "cuda" | "cpp" | "eager" (env SEQREC_FAST_BACKEND
        overrides "auto").

    Every iteration: c as above, s = Σ_l c·u_hat, v = squash(s), b += <u_hat, v> (not after
    the last). Padding: except for "sequence", values and gradients do not depend on what sits
    at padded positions (NaN / Inf there change nothing; the gradient there is zero).

    Autocast: under ``torch.autocast`` for seq_emb's device type, seq_emb and weight (when
    float32/16) are cast to the autocast dtype first, like a matmul's inputs, and the result
    has that dtype (gradients reach float32 parameters through the cast). float64 is left as
    is. init_logits is always used in fp32 (fp64 for fp64 inputs).

    Returns: interests (batch, num_interests, dim) in seq_emb's dtype (the autocast dtype under
    autocast). A row whose positions are all padded gets zero interests and zero gradients
    (never NaN). An empty batch raises ValueError.
    Raises: TypeError / ValueError naming the bad argument; RuntimeError when a backend named
    explicitly cannot run here.
    """
    if isinstance(seq_emb, torch.Tensor) and isinstance(weight, torch.Tensor):
        ac = autocast_dtype(seq_emb.device.type)
        if ac is not None:
            seq_emb, weight = autocast_cast(ac, seq_emb, weight)
            with torch.autocast(seq_emb.device.type, enabled=False):
                return capsule_routing(seq_emb, mask, weight,
                                       num_interests=num_interests, iters=iters,
                                       bilinear=bilinear, init_logits=init_logits,
                                       softmax_axis=softmax_axis,
                                       detach_routing=detach_routing, backend=backend)
    mask = _validate(seq_emb, mask, weight, num_interests, iters, bilinear, init_logits,
                     softmax_axis, detach_routing)
    be = _backend.resolve(OP, backend, seq_emb.device)
    if be == "eager":
        return routing_ref(seq_emb, mask, weight, num_interests=num_interests, iters=iters,
                           bilinear=bilinear, init_logits=init_logits,
                           softmax_axis=softmax_axis, detach_routing=detach_routing)
    B, L, d = seq_emb.shape
    K = num_interests
    mask = mask.contiguous()
    seq_axis, seq_all = softmax_axis != "interest", softmax_axis == "sequence"
    if _mind_fused(be, bilinear, seq_emb):
        # u_hat never leaves the chip; the kernels ignore padded rows of seq_emb themselves
        init = None if init_logits is None else init_logits.detach().float().contiguous()
        v, _, _ = _routing_mind_fwd_op(seq_emb, weight, mask, init, K, iters, seq_axis, seq_all,
                                       detach_routing)
        return v
    if softmax_axis != "sequence":
        # padding is not data: zero it before the GEMM so NaN / Inf there reach neither u_hat
        # nor the weight gradient (torch.where passes no gradient to the padded entries)
        seq_emb = torch.where(mask[:, :, None], seq_emb, seq_emb.new_zeros(()))
    if bilinear == "shared":
        u = torch.matmul(seq_emb, weight.t())  # (B, L, d)
    else:
        # (L, B, d) @ (L, d, K*d) -> (L, B, K*d) -> (L, B, K, d), no copy
        u = torch.bmm(seq_emb.transpose(0, 1), weight.transpose(1, 2)).view(L, B, K, d)
    if init_logits is not None:
        init_logits = init_logits.detach().to(acc_dtype(seq_emb.dtype)).contiguous()
    v, _, _ = _routing_fwd_op(u, mask, init_logits, K, iters, seq_axis, seq_all,
                              detach_routing, be)
    return v
