"""Helpers shared by the op modules of ``seqrec_fast.ops``: accumulation dtype, compile
detection, the autocast policy and leading-dimension flattening of the catalog losses, the
argument checks of the catalog losses (``linear_cross_entropy``,
``sampled_softmax_loss``, ``bpr_max_loss``), their backend resolution and reduction.

Imports nothing from ``seqrec_fast.ops`` (every op module imports it, never the reverse).
"""
from __future__ import annotations

import functools
import inspect
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


compiling = _checks.compiling   # True while torch.compile traces (one probe for the package)


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


def _range_check(name: str, ids: Tensor, n: int, allowed: Optional[int]) -> None:
    """Values of ``ids`` in [0, n) (or equal to ``allowed``). CPU (and any non-CUDA device):
    one host read, a ValueError naming ``name``. CUDA: no host sync — a device-side
    ``torch._assert_async``; a bad id then surfaces as a CUDA "device-side assert" error at the
    next synchronising call (and, as for any device assert, the CUDA context is unusable
    afterwards), its message naming ``name``."""
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= n)
    if allowed is not None:
        bad &= ids != allowed
    extra = f" or ignore_index={allowed}" if allowed is not None else ""
    if ids.device.type == "cuda":
        torch._assert_async(torch.logical_not(bad.any()),
                            f"{name} contains an id outside [0, {n}){extra}")
        return
    if bool(bad.any()):
        v = int(ids[bad][0])
        raise ValueError(f"{name} contains id {v} outside [0, {n}){extra}")


@torch.library.custom_op("seqrec_fast::check_id_range", mutates_args=())
def _check_id_range_op(ids: Tensor, arg: str, n: int, allowed: Optional[int]) -> Tensor:
    """``_range_check`` as an opaque op for torch.compile: it runs on the real values at run
    time (the same ValueError as eager on CPU) and returns a copy of ``ids`` that the traced
    code uses from then on, so the check is never dead code."""
    _range_check(arg, ids, n, allowed)
    return ids.clone()


@_check_id_range_op.register_fake
def _(ids, arg, n, allowed):
    return torch.empty_like(ids)


def check_range(name: str, ids: Tensor, n: int, allowed: Optional[int] = None) -> Tensor:
    """Values of ``ids`` in [0, n) (or equal to ``allowed``) -> the ids to use from then on.

    Eager: checked directly (CPU: a ValueError naming ``name``; CUDA: a device-side assert, no
    host sync). While torch.compile traces: the same check inside the opaque op
    ``seqrec_fast::check_id_range``, so compiled code raises the same error."""
    if compiling():
        return _check_id_range_op(ids, name, int(n), allowed)
    _range_check(name, ids, n, allowed)
    return ids


def _check_lengths(lengths: Tensor, seq_len: int) -> None:
    """Every length in [0, seq_len]. Not CUDA: one host read, a ValueError. CUDA: no host sync,
    a device-side ``torch._assert_async`` (as the catalog losses' id checks): a bad length
    surfaces as a CUDA device-side assert at the next synchronising call, naming the mask."""
    if lengths.numel() == 0:
        return
    bad = (lengths < 0) | (lengths > seq_len)
    if lengths.device.type == "cuda":
        torch._assert_async(torch.logical_not(bad.any()),
                            f"mask lengths must lie in [0, {seq_len}]")
        return
    if bool(bad.any()):
        lo, hi = (int(v) for v in torch.aminmax(lengths))
        raise ValueError(f"mask lengths must lie in [0, {seq_len}], got range [{lo}, {hi}]")


@torch.library.custom_op("seqrec_fast::lengths_mask", mutates_args=())
def _lengths_mask_op(lengths: Tensor, seq_len: int) -> Tensor:
    """lengths (B,) int -> mask (B, seq_len) bool, True at the first ``length`` positions,
    after ``_check_lengths``. An opaque op, so eager and torch.compile'd code (where
    Python-side checks of tensor values are traced away) run the same check. Shared by every
    op that takes lengths (routing, attention): one behaviour on every device."""
    _check_lengths(lengths, seq_len)
    return torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]


@_lengths_mask_op.register_fake
def _(lengths, seq_len):
    return lengths.new_empty((lengths.shape[0], seq_len), dtype=torch.bool)


def on_input_device(fn):
    """Decorator for the body of a custom op that launches kernels: run it with the CUDA device
    of its first tensor argument current. Triton launches on the current device and its current
    stream, whatever device the tensors are on, so without this a call on cuda:1 tensors from a
    process whose current device is cuda:0 would launch on the wrong GPU. A no-op for CPU
    tensors. Put it under ``@torch.library.custom_op`` (the op's schema comes from ``fn``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, Tensor)), None)
        if t is not None and t.is_cuda:
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    # the schema is inferred from the signature: resolve the annotations in fn's own module
    # (they are strings under ``from __future__ import annotations``)
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)
    return wrapper


def sequence_mask(mask, B: int, L: int, device) -> Tensor:
    """The (B, L) bool mask from a bool mask (``_checks.sequence_mask``) or int lengths (B,):
    type, device and shape checked here, the values by the opaque op
    ``seqrec_fast::lengths_mask`` (so the value check also runs inside a torch.compile'd
    graph): CPU a ValueError, CUDA a device-side assert (no host sync)."""
    if isinstance(mask, Tensor) and mask.dim() == 1:
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but the inputs are on {device}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.dtype == torch.bool:
            raise TypeError(f"mask as lengths (batch,) must be an integer tensor, got {mask.dtype}")
        if mask.shape[0] != B:
            raise ValueError(f"mask as lengths must have shape ({B},), got {tuple(mask.shape)}")
        return _lengths_mask_op(mask, L)
    return _checks.sequence_mask(mask, B, L, device)


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


@torch.library.custom_op("seqrec_fast::raise_error", mutates_args=())
def _raise_error_op(like: Tensor, kind: str, message: str) -> Tensor:
    """Raises ``kind(message)`` when the compiled graph runs (see ``deferred_error``)."""
    raise {"TypeError": TypeError}.get(kind, ValueError)(message)


@_raise_error_op.register_fake
def _(like, kind, message):
    return like.new_empty(())


def deferred_error(err: Exception, like, pair: bool = False):
    """Under torch.compile(fullgraph=True) a ``raise`` in traced code ends the trace with
    dynamo's own "Observed exception" error. The public catalog losses therefore catch their
    argument errors while compiling and return this instead: an opaque op that raises the same
    TypeError / ValueError, with the same message, when the compiled code runs. ``like``: a
    tensor for the fake output (a placeholder scalar, never returned for real)."""
    if not isinstance(like, Tensor):
        raise err
    out = _raise_error_op(like, type(err).__name__, str(err))
    return (out, out) if pair else out


_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when torch.autocast is on for ``device_type`` (cpu / cuda), else
    None."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(dt: torch.dtype, *tensors):
    """The cast policy of the ops under autocast (that of torch.matmul): fp32/fp16/bf16 tensors
    go to ``dt`` (differentiably); fp64 tensors and None stay as they are. -> a list."""
    return [t.to(dt) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_FROM else t
            for t in tensors]


def autocast_inputs(user: Tensor, items: Tensor, bias: Optional[Tensor] = None):
    """The cast policy of the catalog losses under ``torch.autocast`` (on user's device type),
    that of a matmul: fp32/fp16/bf16 ``user``/``items``/``bias`` go to the autocast dtype
    (differentiably); the loss is returned in float32. -> (user, items, bias, out_dtype), where
    out_dtype is None when autocast is off (nothing cast) and torch.float32 when it is on."""
    if not isinstance(user, Tensor) or not isinstance(items, Tensor):
        return user, items, bias, None  # the argument checks report it
    dt = autocast_dtype(user.device.type)
    if dt is None:
        return user, items, bias, None
    user, items, bias = autocast_cast(dt, user, items, bias)
    return user, items, bias, torch.float32


def flatten_rows(user, target):
    """user (..., d) with target (...) -> (user (rows, d), target (rows,), target's shape or
    None when user is already 2-D). A target of another shape is a ValueError naming it."""
    if not isinstance(user, Tensor) or user.dim() <= 2:
        return user, target, None
    lead = tuple(user.shape[:-1])
    if not isinstance(target, Tensor):
        return user, target, None  # check_ids reports it
    if tuple(target.shape) != lead:
        raise ValueError(f"target must have shape {lead} to match user {tuple(user.shape)} "
                         f"(user (..., d), target (...)), got {tuple(target.shape)}")
    return user.reshape(-1, user.shape[-1]), target.reshape(-1), lead


# ----------------------------------------------------------------------------------------------
# backend and reduction of the catalog losses
# ----------------------------------------------------------------------------------------------
def triton_float64(op: str, be: str, backend: str, dtype: torch.dtype) -> str:
    """``be`` (the resolved backend), unless it is Triton on float64 inputs, which the caller
    has ruled out: then ``auto`` (or SEQREC_FAST_BACKEND) takes eager, and an explicit
    ``backend="triton"`` is a TypeError."""
    if be != "triton" or dtype != torch.float64:
        return be
    if backend == "triton":
        raise TypeError(f"{op}: the triton backend takes float32/bfloat16/float16 inputs, not "
                        "float64 here (use backend='eager', or 'cpp' on CPU tensors)")
    return "eager"


def resolve_loss_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend of a catalog loss: float64 never runs on Triton (``auto`` falls
    back to eager, an explicit ``triton`` is a TypeError) and there is no CUDA C++ kernel."""
    be = triton_float64(op, _backend.resolve(op, backend, device), backend, dtype)
    if be == "cuda":  # no CUDA C++ kernel for these ops: Triton is the GPU path
        raise RuntimeError(f"{op}: backend 'cuda' is not available (the GPU path is 'triton')")
    return be


def loss_fwd_fake(user: Tensor, need_user_grad: bool, backend: str):
    """Fake outputs of a catalog loss's forward op (``register_fake``): loss_rows (B,), lse (B,)
    in the accumulation dtype, and softmax_item_mean (B, d) — only Triton computes it (for the
    user gradient); the other backends return a (0, d) placeholder."""
    B, d = user.shape
    acc = acc_dtype(user.dtype)
    rows = B if (need_user_grad and backend == "triton") else 0
    return (user.new_empty((B,), dtype=acc), user.new_empty((B,), dtype=acc),
            user.new_empty((rows, d), dtype=acc))


def reduce_rows(loss_rows: Tensor, reduction: str, count: Optional[Tensor], dtype) -> Tensor:
    """Per-row losses (B,) -> "none" (B,) | "sum" | "mean" (over ``count`` rows when given),
    in ``dtype``."""
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / (count if count is not None else loss_rows.shape[0])
    return total.to(dtype)
