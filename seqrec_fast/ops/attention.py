"""ComiRec-SA multi-interest self-attention (``multi_interest_attention``) and the label-aware
readout of MIND / ComiRec (``label_aware_attention``).

The whole attention (keys·w1 → tanh → ·w2 → masked softmax over the sequence → Aᵀ·seq_emb) is
one fused kernel per direction, registered as the ``seqrec_fast::attention_fwd`` /
``attention_bwd`` custom ops and run by the chosen backend: Triton (GPU, or CPU tensors under
TRITON_INTERPRET=1), C++ (CPU), or the eager reference. The hidden activations
H (B, L, d_a) are never stored: the backward recomputes them. Saved for backward: the inputs,
the interests (B, K, d) and the attention probabilities (B, K, L) in fp32 (fp64 for fp64
inputs; K values per position, like the logits), which are also what ``return_attention``
returns (cast to the input dtype).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _checks, _ext
from .. import backend as _backend
from ..reference.attention import attention_ref, label_aware_attention_ref
from ._common import (FLOATS, acc_dtype, autocast_cast, autocast_dtype, compiling,
                      deferred_error, on_input_device, sequence_mask, triton_float64)

OP = "attention"


def _kernels(backend: str):
    """(fwd, bwd) launchers of the concrete backend, with the same signatures:
    fwd(x, mask, w1, b1, w2, b2, pos) -> (interests, probs)
    bwd(gout, gprobs, x, mask, w1, b1, w2, b2, pos, out, probs) -> 6 grads (None if absent).
    """
    if backend == "cpp":
        C = _ext._C

        def bwd(gout, gprobs, x, mask, w1, b1, w2, b2, pos, out, probs):
            return C.attention_bwd_cpu(gout, gprobs, x, mask, w1, b1, w2, b2, pos, probs)

        return C.attention_fwd_cpu, bwd
    if backend == "triton":
        from seqrec_fast.kernels import attention as k

        return k._attention_fwd, k._attention_bwd
    raise ValueError(f"no fused attention kernel for backend {backend!r}")


@torch.library.custom_op("seqrec_fast::attention_fwd", mutates_args=())
@on_input_device
def _attention_fwd_op(seq_emb: Tensor, mask: Tensor, w1: Tensor, b1: Optional[Tensor],
                      w2: Tensor, b2: Optional[Tensor], pos_emb: Optional[Tensor],
                      backend: str) -> Tuple[Tensor, Tensor]:
    """-> interests (B, K, d) in seq_emb's dtype, attention probabilities (B, K, L) in fp32
    (fp64 for fp64 inputs), 0 at padded positions."""
    fwd, _ = _kernels(backend)
    out, probs = fwd(seq_emb, mask, w1, b1, w2, b2, pos_emb)
    return out, probs


@_attention_fwd_op.register_fake
def _(seq_emb, mask, w1, b1, w2, b2, pos_emb, backend):
    B, L, d = seq_emb.shape
    K = w2.shape[1]
    return (seq_emb.new_empty((B, K, d)),
            seq_emb.new_empty((B, K, L), dtype=acc_dtype(seq_emb.dtype)))


@torch.library.custom_op("seqrec_fast::attention_bwd", mutates_args=())
@on_input_device
def _attention_bwd_op(grad_out: Tensor, grad_probs: Optional[Tensor], seq_emb: Tensor,
                      mask: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                      b2: Optional[Tensor], pos_emb: Optional[Tensor], out: Tensor,
                      probs: Tensor, backend: str
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> grads of (seq_emb, w1, b1, w2, b2, pos_emb); an absent optional input gets an empty
    (0,) tensor."""
    _, bwd = _kernels(backend)
    grads = bwd(grad_out.contiguous(), grad_probs, seq_emb, mask, w1, b1, w2, b2, pos_emb,
                out, probs)
    return tuple(seq_emb.new_empty((0,)) if g is None else g for g in grads)


@_attention_bwd_op.register_fake
def _(grad_out, grad_probs, seq_emb, mask, w1, b1, w2, b2, pos_emb, out, probs, backend):
    def like(t):
        return seq_emb.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return (like(seq_emb), like(w1), like(b1), like(w2), like(b2), like(pos_emb))


def _setup_context(ctx, inputs, output):
    seq_emb, mask, w1, b1, w2, b2, pos_emb, backend = inputs
    out, probs = output
    ctx.backend = backend
    ctx.has = (b1 is not None, b2 is not None, pos_emb is not None)
    ctx.save_for_backward(seq_emb, mask, w1, b1, w2, b2, pos_emb, out, probs)


def _backward(ctx, grad_out, grad_probs):
    seq_emb, mask, w1, b1, w2, b2, pos_emb, out, probs = ctx.saved_tensors
    if grad_out is None and grad_probs is None:
        return (None,) * 8
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    gx, gw1, gb1, gw2, gb2, gpos = _attention_bwd_op(grad_out, grad_probs, seq_emb, mask, w1,
                                                     b1, w2, b2, pos_emb, out, probs,
                                                     ctx.backend)
    has_b1, has_b2, has_pos = ctx.has
    return (gx, None, gw1, gb1 if has_b1 else None, gw2, gb2 if has_b2 else None,
            gpos if has_pos else None, None)


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(seq_emb, mask, w1, b1, w2, b2, pos_emb, return_attention):
    _checks.tensor("seq_emb", seq_emb, ndim=3, dtypes=FLOATS)
    device, dtype = seq_emb.device, seq_emb.dtype
    B, L, d = seq_emb.shape
    if B < 1 or L < 1 or d < 1:
        raise ValueError(f"seq_emb must have batch >= 1 (an empty batch is an error), seq_len >= 1 "
                         f"and dim >= 1, got shape {tuple(seq_emb.shape)}")

    def param(name, t, shape, what):
        _checks.tensor(name, t, ndim=len(shape), dtypes=FLOATS, device=device)
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but seq_emb has {dtype}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, "
                             f"got {tuple(t.shape)}")

    _checks.tensor("w1", w1, ndim=2, dtypes=FLOATS, device=device)
    d_a = w1.shape[1]
    if d_a < 1:
        raise ValueError(f"w1 must have shape (dim, hidden) with hidden >= 1, got {tuple(w1.shape)}")
    param("w1", w1, (d, d_a), "(dim, hidden)")
    _checks.tensor("w2", w2, ndim=2, dtypes=FLOATS, device=device)
    K = w2.shape[1]
    if K < 1:
        raise ValueError(f"w2 must have shape (hidden, num_interests) with num_interests >= 1, "
                         f"got {tuple(w2.shape)}")
    param("w2", w2, (d_a, K), "(hidden, num_interests)")
    if b1 is not None:
        param("b1", b1, (d_a,), "(hidden,)")
    if b2 is not None:
        param("b2", b2, (K,), "(num_interests,)")
    if pos_emb is not None:
        param("pos_emb", pos_emb, (L, d), "(seq_len, dim)")
    if not isinstance(return_attention, bool):
        raise TypeError(f"return_attention must be a bool, got {type(return_attention).__name__}")
    return sequence_mask(mask, B, L, device)


def multi_interest_attention(seq_emb: Tensor, mask: Tensor, w1: Tensor, b1: Optional[Tensor],
                             w2: Tensor, b2: Optional[Tensor], *,
                             pos_emb: Optional[Tensor] = None, return_attention: bool = False,
                             backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """ComiRec-SA multi-interest self-attention.

    keys = seq_emb + pos_emb; H = tanh(keys·w1 + b1); A = H·w2 + b2 (B, L, K);
    attention = softmax of A over the real positions of the sequence axis (0 at padded ones);
    interests = attentionᵀ·seq_emb — the values are seq_emb WITHOUT the position embedding.

    Args:
      seq_emb: (batch, seq_len, dim) item embeddings, fp32/bf16/fp16/fp64 (fp64 on a GPU runs
        eager: Triton takes no fp64 there).
      mask: (batch, seq_len) bool, True at real items (any pattern), or int lengths (batch,)
        meaning the first ``length`` positions are real. A length outside [0, seq_len] is a
        ValueError on CPU, eager and under torch.compile alike; on CUDA it is checked without
        a host sync, by a device-side assert (the error surfaces at the next synchronising
        call), compiled or not — as ``capsule_routing``.
      w1: (dim, hidden) (ComiRec: hidden = 4·dim); b1: (hidden,) or None.
      w2: (hidden, num_interests); b2: (num_interests,) or None.
      pos_emb: (seq_len, dim) position embedding added to the keys only, or None.
      return_attention: also return the attention weights (batch, num_interests, seq_len)
        (differentiable).
      backend: "auto" | "triton" | "cpp" | "eager" (env SEQREC_FAST_BACKEND overrides
        "auto"); "cuda" raises RuntimeError saying why: attention has no CUDA C++ kernel (Triton
        is its GPU backend).

    All tensors share seq_emb's dtype and device. Returns interests (batch, num_interests, dim)
    [, attention]. A row whose positions are all padded gets all-zero attention, zero interests
    and zero gradients (never NaN; ComiRec's code would give it uniform weights instead).
    An empty batch (batch = 0) raises ValueError.

    Numerics: fp16/bf16 inputs are computed with fp32 accumulation (fp32 logits and softmax)
    and returned in the input dtype. Padding is not data: seq_emb at padded positions is never
    read, so a NaN/Inf there changes no value and no gradient (the gradient there is 0).
    Non-finite values at real positions give PyTorch's result on every backend (the eager
    reference's): e.g. an Inf in seq_emb[b, l, j] saturates tanh in the keys of position l and
    makes feature j of each interest of row b ±inf (NaN where its weight underflows to 0),
    everything else finite. Gradients of non-finite inputs are not specified.

    Autocast: under ``torch.autocast`` (CPU or CUDA) the op is cast like ``torch.matmul``:
    fp32/fp16/bf16 tensor arguments are cast to the autocast dtype (differentiably, so fp32
    parameters get fp32 gradients), the op runs in that dtype (fp32 accumulation) and returns
    it; fp64 arguments are not cast.

    Raises: TypeError / ValueError naming the bad argument, compiled
    (``torch.compile(fullgraph=True)``) or not: while compiling, an argument error becomes an
    opaque op that raises it when the graph runs; RuntimeError when a backend named explicitly
    cannot run here.
    """
    try:
        return _multi_interest_attention(seq_emb, mask, w1, b1, w2, b2, pos_emb,
                                         return_attention, backend)
    except (TypeError, ValueError) as err:
        if not compiling():
            raise
        return deferred_error(err, seq_emb, pair=return_attention is True)


def _multi_interest_attention(seq_emb, mask, w1, b1, w2, b2, pos_emb, return_attention,
                              backend):
    dt = autocast_dtype(seq_emb.device.type) if isinstance(seq_emb, Tensor) else None
    if dt is not None:
        seq_emb, w1, b1, w2, b2, pos_emb = autocast_cast(dt, seq_emb, w1, b1, w2, b2, pos_emb)
    mask = _validate(seq_emb, mask, w1, b1, w2, b2, pos_emb, return_attention)
    be = _gpu_float64(_backend.resolve(OP, backend, seq_emb.device), backend, seq_emb.device,
                      seq_emb.dtype)
    if dt is not None:  # inputs cast already; the kernels and the reference run as they are
        with torch.autocast(seq_emb.device.type, enabled=False):
            return _dispatch(seq_emb, mask, w1, b1, w2, b2, pos_emb, return_attention, be)
    return _dispatch(seq_emb, mask, w1, b1, w2, b2, pos_emb, return_attention, be)


def _gpu_float64(be: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """float64 attention never runs Triton on a GPU: triton 3.6's compiler aborts the process
    on the kernels' fp64 dots for sm_90 and triton 3.9 spills ~1.3 KB (seen with
    bench/sm90_report.py's stub). ``auto`` (or SEQREC_FAST_BACKEND) takes eager there; an
    explicit ``backend="triton"`` is a TypeError. Under the interpreter (CPU) fp64 stays on
    Triton (the tests' float64 oracle comparisons)."""
    if device.type != "cuda":
        return be
    return triton_float64("multi_interest_attention", be, backend, dtype)


def _dispatch(seq_emb, mask, w1, b1, w2, b2, pos_emb, return_attention, be):
    if be == "eager":
        return attention_ref(seq_emb, mask, w1, b1, w2, b2, pos_emb=pos_emb,
                             return_attention=return_attention)
    out, probs = _attention_fwd_op(seq_emb, mask.contiguous(), w1, b1, w2, b2, pos_emb, be)
    if return_attention:
        return out, probs.to(seq_emb.dtype)
    return out


def label_aware_attention(interests: Tensor, target_emb: Tensor, *,
                          exponent: float = float("inf")) -> Tensor:
    """Label-aware readout of a user's interests for the target item (training time).

    Args:
      interests: (batch, num_interests, dim).
      target_emb: (batch, dim) embedding of the target item, same dtype and device.
      exponent: ``inf`` (default, ComiRec): the interest with the largest <v_k, e_target>
        (hard readout; ties go to the lowest k; the gradient flows into that interest and,
        through nothing else, not into target_emb). Finite p > 0 (MIND):
        Σ_k softmax_k(<v_k, e>^p)·v_k, with ``torch.pow`` as in MIND's code: p = 1 is a plain
        softmax; an even p ranks by |<v_k, e>|; a non-integer p needs non-negative scores
        (a negative score to a fractional power is NaN).

    Returns the user vector (batch, dim). Eager PyTorch (a (B, K) score matrix and a gather or a
    weighted sum: nothing worth fusing), computed in fp32 for fp16/bf16 inputs. Under
    ``torch.autocast`` both inputs are cast to the autocast dtype first (fp64 ones are not),
    as for ``multi_interest_attention``.
    """
    if isinstance(interests, Tensor) and isinstance(target_emb, Tensor):
        dt = autocast_dtype(interests.device.type)
        if dt is not None:
            interests, target_emb = autocast_cast(dt, interests, target_emb)
    _checks.tensor("interests", interests, ndim=3, dtypes=FLOATS)
    _checks.tensor("target_emb", target_emb, ndim=2, dtypes=FLOATS, device=interests.device)
    B, K, d = interests.shape
    if B < 1:
        raise ValueError("interests must have batch >= 1 (an empty batch), as every op requires")
    if K < 1 or d < 1:
        raise ValueError(f"interests must have num_interests >= 1 and dim >= 1, got shape "
                         f"{tuple(interests.shape)}")
    if tuple(target_emb.shape) != (B, d):
        raise ValueError(f"target_emb must have shape (batch, dim) = {(B, d)}, got "
                         f"{tuple(target_emb.shape)}")
    if target_emb.dtype != interests.dtype:
        raise TypeError(f"target_emb has dtype {target_emb.dtype} but interests has "
                        f"{interests.dtype}")
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        raise TypeError(f"exponent must be a float (or inf), got {type(exponent).__name__}")
    if math.isnan(exponent) or exponent <= 0:
        raise ValueError(f"exponent must be > 0 (inf for the hard readout), got {exponent}")
    return label_aware_attention_ref(interests, target_emb, float(exponent))
