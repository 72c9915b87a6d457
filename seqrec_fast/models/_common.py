"""What every model shares around the fused ops: the backend rule and the item table's
one-dense-gradient alias.

Backend rule (DESIGN.md "Backends"): a model passes its ``backend`` to every fused op it calls.
``"auto"`` lets each op pick its fastest kernel for the tensors' device (and fall back, saying
so once). A backend named explicitly (``"cpp"``, ``"triton"``, ``"cuda"``, ``"eager"``, also
through ``SEQREC_FAST_BACKEND``) must have a kernel for EVERY fused op the model uses:
:func:`check_backend` verifies that when the model is built and raises ``ValueError`` naming the
ops and the reason otherwise — a model never runs some of its ops on a backend other than the
one asked for. The training readout (``label_aware_attention``, a (B, K) score matrix and a
gather) is plain PyTorch for every backend. The models call the ops through the
``seqrec_fast.nn`` layers and losses.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from .. import backend as _backend

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
    (zero-fill + per-row adds) and then adds them, a measurable share of a CPU training step
    (bench/NOTES.md, "One dense item-table gradient per step"). The models use it on CPU
    (measured there); the non-CPU branch keeps ATen's deterministic dense embedding backward."""

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


__all__ = ["check_backend", "one_dense_grad_table"]
