"""The fused ops the models use, and the backend rule for models.

Backend rule (DESIGN.md "Backends"): a model passes its ``backend`` to every fused op it calls.
``"auto"`` lets each op pick its fastest kernel for the tensors' device (and fall back, saying
so once). A backend named explicitly (``"cpp"``, ``"triton"``, ``"cuda"``, ``"eager"``, also
through ``SEQREC_FAST_BACKEND``) must have a kernel for EVERY fused op the model uses:
:func:`check_backend` verifies that when the model is built and raises ``ValueError`` naming the
ops and the reason otherwise — a model never runs some of its ops on a backend other than the
one asked for. The training readout (``label_aware_attention``, a (B, K) score matrix and a
gather) is plain PyTorch for every backend. Shapes as in the ops.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from ..ops.attention import label_aware_attention as _label_aware_attention
from ..ops.attention import multi_interest_attention as _multi_interest_attention
from ..ops.softmax import linear_cross_entropy as _linear_cross_entropy
from ..ops.softmax import sampled_softmax_loss as _sampled_softmax_loss

# backend-registry names (seqrec_fast.backend) of the fused ops
OP_ROUTING, OP_ATTENTION = "routing", "attention"
OP_SAMPLED, OP_FULL = "sampled_softmax", "linear_cross_entropy"


def _device_for(backend: str) -> torch.device:
    """The device type a named backend runs on (where its availability is checked)."""
    if backend == "cpp":
        return torch.device("cpu")
    if backend == "cuda":
        return torch.device("cuda")
    # triton: GPU when there is one, else CPU tensors under TRITON_INTERPRET=1
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_backend(backend: str, ops: Sequence[str], model: str) -> None:
    """Raise ValueError when ``backend`` (or SEQREC_FAST_BACKEND for "auto") is named explicitly
    and lacks a kernel for one of ``ops``. "auto" and "eager" always pass. A backend that exists
    for another device type than the tensors the model is later given (e.g. "cpp" with CUDA
    tensors) is caught by the op itself at call time."""
    be = backend
    if be == "auto":
        be = os.environ.get("SEQREC_FAST_BACKEND", "auto") or "auto"
        if be not in _backend.BACKENDS:
            raise ValueError(f"SEQREC_FAST_BACKEND must be one of {_backend.BACKENDS}, got {be!r}")
    if be in ("auto", "eager"):
        return
    dev = _device_for(be)
    missing = []
    for op in ops:
        why = _backend.reason_unavailable(op, be, dev)
        if why is None and be == "cuda" and op in (OP_SAMPLED, OP_FULL):
            why = "the softmax losses have no CUDA C++ kernel (their GPU path is 'triton')"
        if why is not None:
            missing.append(f"{op} ({why})")
    if missing:
        src = "SEQREC_FAST_BACKEND" if backend == "auto" else "backend"
        raise ValueError(f"{model}: {src}={be!r} was asked for by name but it has no kernel for "
                         f"{'; '.join(missing)}. Use backend='auto' (each op picks its fastest "
                         f"available kernel) or 'eager'.")


class _OneDenseGrad(torch.autograd.Function):
    """Identity on the item table (n_items, d) whose backward turns the gradients of all the
    step's lookups into ONE dense (n_items, d) gradient. The lookups take the returned alias with
    ``F.embedding(..., sparse=True)``; autograd sums their sparse (rows, values) gradients by
    concatenation, and the backward scatters that sum into one zero-initialised dense tensor.
    Looking up the table directly instead materializes one dense (n_items, d) gradient PER lookup
    (zero-fill + per-row adds) and then adds them: on CPU at 1 thread, with a 100k x 64 table and
    two lookups per step (history, targets+negatives), that was ~12 ms of a ~55 ms step in
    bench/train.py (whose allocator setting returns every freed large buffer to the OS, so each
    fresh (n_items, d) tensor is page-faulted in again) and ~4 ms of ~35 ms with glibc's default.
    The models use it on CPU (measured there); the non-CPU branch keeps ATen's deterministic
    dense embedding backward."""

    @staticmethod
    def forward(ctx, table):
        ctx.shape = table.shape
        return table.view_as(table)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if not grad.is_sparse:
            return grad
        rows, values = grad._indices()[0], grad._values()
        if values.device.type == "cpu":
            # sequential on CPU (deterministic); faster than ATen's per-row dense embedding backward
            return values.new_zeros(ctx.shape).index_add_(0, rows, values)
        # the dense embedding backward ATen's own lookup would run (sort-based, deterministic)
        return torch.ops.aten.embedding_dense_backward(values, rows, ctx.shape[0], -1, False)


def one_dense_grad_table(table: Tensor) -> Tensor:
    """An alias of ``table`` (n_items, d) for the lookups of one step: look it up with
    ``F.embedding(ids, alias, sparse=True)`` and ``table`` receives ONE dense gradient (the sum
    of all lookups'), as with direct dense lookups — same values, up to summation order."""
    return _OneDenseGrad.apply(table)


def multi_interest_attention(seq_emb: Tensor, mask: Tensor, w1: Tensor, b1: Optional[Tensor],
                             w2: Tensor, b2: Optional[Tensor], pos_emb: Optional[Tensor],
                             backend: str) -> Tensor:
    """ComiRec-SA interests: seq_emb (B, L, d), mask (B, L) bool, w1 (d, d_a), w2 (d_a, K),
    pos_emb (L, d) -> (B, K, d)."""
    return _multi_interest_attention(seq_emb, mask, w1, b1, w2, b2, pos_emb=pos_emb,
                                     backend=backend)


def label_aware_attention(interests: Tensor, target_emb: Tensor, pow: float) -> Tensor:
    """Readout: interests (B, K, d), target_emb (B, d) -> user vector (B, d);
    pow = inf is the hard readout."""
    return _label_aware_attention(interests, target_emb, pow=pow)


def full_softmax(user: Tensor, items: Tensor, target: Tensor, bias: Optional[Tensor],
                 backend: str) -> Tensor:
    """Full-catalog softmax CE: user (B, d), items (N, d), target (B,), bias (N,) -> scalar."""
    return _linear_cross_entropy(user, items, target, bias=bias, backend=backend)


def sampled_softmax(user: Tensor, items: Tensor, target: Tensor, negatives: Tensor,
                    log_q: Optional[Tensor], target_log_q: Optional[Tensor],
                    backend: str) -> Tensor:
    """Sampled softmax with shared negatives: user (B, d), items (M, d), target (B,),
    negatives (S,), log_q (S,), target_log_q (B,) -> scalar. Accidental hits removed, no in-batch
    negatives (ComiRec)."""
    return _sampled_softmax_loss(user, items, target, negatives, log_q=log_q,
                                 target_log_q=target_log_q, in_batch_negatives=False,
                                 remove_accidental_hits=True, backend=backend)


__all__ = ["check_backend", "one_dense_grad_table", "multi_interest_attention",
           "label_aware_attention", "full_softmax", "sampled_softmax"]
