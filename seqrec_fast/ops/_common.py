"""Helpers shared by the op modules of ``seqrec_fast.ops``: accumulation dtype, compile
detection, the argument checks of the catalog losses (``linear_cross_entropy``,
``sampled_softmax_loss``, ``bpr_max_loss``), their backend resolution and reduction.

Imports nothing from ``seqrec_fast.ops`` (every op module imports it, never the reverse).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend

FLOATS = _checks.FLOAT_DTYPES  # the float inputs every op takes
REDUCTIONS = ("mean", "sum", "none")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for every other float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compiling() -> bool:
    """True while torch.compile traces (data-dependent checks are skipped then)."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


# ----------------------------------------------------------------------------------------------
# argument checks of the catalog losses
# ----------------------------------------------------------------------------------------------
def check_user_items(user, items):
    """user (B, d), items (N, d) of one float dtype and device -> (device, B, d, N)."""
    _checks.tensor("user", user, ndim=2, dtypes=FLOATS)
    device = user.device
    _checks.tensor("items", items, ndim=2, dtypes=FLOATS, device=device)
    if items.dtype != user.dtype:
        raise TypeError(f"items has dtype {items.dtype} but user has {user.dtype}")
    B, d = user.shape
    if B == 0:
        raise ValueError("user is an empty batch (shape (0, d)): the loss of no rows is undefined")
    if d == 0:
        raise ValueError(f"user must have dim >= 1, got shape {tuple(user.shape)}")
    if items.shape[1] != d:
        raise ValueError(f"items must have shape (n_items, {d}) to match user (batch, {d}), "
                         f"got {tuple(items.shape)}")
    if items.shape[0] == 0:
        raise ValueError("items is an empty catalog (shape (0, d))")
    return device, B, d, items.shape[0]


def check_ids(name, ids, shape, device):
    """``ids``: an int64 tensor on ``device`` (of ``shape`` unless it is None)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of item ids, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the inputs are on {device}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(ids.shape)}")


def check_range(name, ids, n, allowed: Optional[int] = None):
    """Values of ``ids`` in [0, n) (or equal to ``allowed``); one host sync, skipped when
    compiling."""
    if compiling() or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= n)
    if allowed is not None:
        bad &= ids != allowed
    if bool(bad.any()):
        v = int(ids[bad][0])
        extra = f" or ignore_index={allowed}" if allowed is not None else ""
        raise ValueError(f"{name} contains id {v} outside [0, {n}){extra}")


def check_float_scalar(name, value, *, lo=None, lo_open=False, hi=None, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------
# backend and reduction of the catalog losses
# ----------------------------------------------------------------------------------------------
def resolve_loss_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend of a catalog loss: float64 never runs on Triton (``auto`` falls
    back to eager, an explicit ``triton`` is a TypeError) and there is no CUDA C++ kernel."""
    be = _backend.resolve(op, backend, device)
    if be == "triton" and dtype == torch.float64:
        requested = backend if backend != "auto" else None
        if requested == "triton":
            raise TypeError(f"{op}: the triton backend takes float32/bfloat16/float16 inputs, "
                            "not float64 (use backend='cpp' or 'eager')")
        return "eager"
    if be == "cuda":  # no CUDA C++ kernel for these ops: Triton is the GPU path
        raise RuntimeError(f"{op}: backend 'cuda' is not available (the GPU path is 'triton')")
    return be


def softmax_item_mean_rows(user: Tensor, need_user_grad: bool, backend: str) -> int:
    """Rows of the ``softmax_item_mean`` (B, d) a loss forward returns: only Triton computes it
    (for the user gradient); the other backends return a (0, d) placeholder."""
    return user.shape[0] if (need_user_grad and backend == "triton") else 0


def reduce_rows(loss_rows: Tensor, reduction: str, count: Optional[Tensor], dtype) -> Tensor:
    """Per-row losses (B,) -> "none" (B,) | "sum" | "mean" (over ``count`` rows when given),
    in ``dtype``."""
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / (count if count is not None else loss_rows.shape[0])
    return total.to(dtype)
