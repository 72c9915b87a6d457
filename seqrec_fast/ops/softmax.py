"""Catalog-scale softmax losses: ``linear_cross_entropy`` (full catalog, no logits tensor) and
``sampled_softmax_loss`` (shared / per-row negatives, in-batch negatives, logQ correction,
accidental-hit removal), plus GRU4Rec's ``bpr_max_loss`` (eager composite).

Structure (DESIGN.md): custom ops ``seqrec_fast::linear_cross_entropy_fwd/_bwd`` and
``seqrec_fast::sampled_softmax_fwd/_bwd`` return per-row losses (fp32, fp64 for fp64 inputs)
and the backward state; the reduction is ordinary torch on a (B,) vector. Saved for backward:
the inputs, lse (B,) and — Triton only — ``udir`` (B, d) = Σ_j softmax_j·item_j, computed in
the forward pass flash-attention style so that the user gradient is a (B, d) epilogue
g/T·(udir - item_target). Never a (B, N) or (B, S, d) tensor.

Backends: ``triton`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), ``cpp`` (C++
CPU kernels chunked over the catalog / candidates: O(B·chunk) memory, float64 capable),
``eager`` (the reference, which builds the logits). float64 on CUDA runs eager.

NaN policy: no data checks on floats (they would synchronise). A NaN/Inf in a user row makes
that row's loss and gradient NaN; a NaN in an item row reaches every row (every row's partition
sum contains it). Id checks (range of ``target``/``negatives``) cost one host sync and are
skipped while ``torch.compile`` traces.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _ext
from .. import backend as _backend
from ..reference.softmax import bpr_max_ref, linear_cross_entropy_ref, sampled_softmax_ref

OP_LCE = "linear_cross_entropy"
OP_SAMPLED = "sampled_softmax"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton():
    from seqrec_fast.kernels import softmax as k

    return k


# ----------------------------------------------------------------------------------------------
# full-catalog cross-entropy: custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("seqrec_fast::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd_op(user: Tensor, items: Tensor, target: Tensor, bias: Optional[Tensor],
                temperature: float, ignore_index: int, label_smoothing: float,
                need_user_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """-> loss_rows (B,), lse (B,) (fp32 / fp64), udir (B, d) fp32 (triton with
    need_user_grad) or (0, d)."""
    if backend == "cpp":
        loss, lse = _ext._C.linear_cross_entropy_fwd_cpu(user, items, target, bias, temperature,
                                                         ignore_index, label_smoothing, 0)
        return loss, lse, user.new_empty((0, user.shape[1]), dtype=loss.dtype)
    if backend == "triton":
        return _triton()._lce_fwd(user, items, target, bias, temperature, ignore_index,
                                  label_smoothing, need_user_grad)
    raise ValueError(f"no fused linear_cross_entropy kernel for backend {backend!r}")


def _udir_rows(user: Tensor, need_user_grad: bool, backend: str) -> int:
    return user.shape[0] if (need_user_grad and backend == "triton") else 0


@_lce_fwd_op.register_fake
def _(user, items, target, bias, temperature, ignore_index, label_smoothing, need_user_grad,
      backend):
    B, d = user.shape
    acc = _acc(user.dtype)
    return (user.new_empty((B,), dtype=acc), user.new_empty((B,), dtype=acc),
            user.new_empty((_udir_rows(user, need_user_grad, backend), d), dtype=acc))


@torch.library.custom_op("seqrec_fast::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(grad_rows: Tensor, user: Tensor, items: Tensor, target: Tensor,
                bias: Optional[Tensor], lse: Tensor, udir: Tensor, temperature: float,
                ignore_index: int, label_smoothing: float, need_user: bool, need_items: bool,
                need_bias: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """-> d_user (B, d) | (0, d), d_items (N, d) | (0, d), d_bias (N,) | (0,)."""
    grad_rows = grad_rows.contiguous()
    if backend == "cpp":
        du, dw, db = _ext._C.linear_cross_entropy_bwd_cpu(
            grad_rows.to(lse.dtype), user, items, target, bias, lse, temperature, ignore_index,
            label_smoothing, need_user, need_items, need_bias, 0)
        return du, dw, db
    if backend == "triton":
        return _triton()._lce_bwd(grad_rows, user, items, target, bias, lse, udir, temperature,
                                  ignore_index, label_smoothing, need_user, need_items,
                                  need_bias)
    raise ValueError(f"no fused linear_cross_entropy kernel for backend {backend!r}")


@_lce_bwd_op.register_fake
def _(grad_rows, user, items, target, bias, lse, udir, temperature, ignore_index,
      label_smoothing, need_user, need_items, need_bias, backend):
    B, d = user.shape
    N = items.shape[0]
    return (user.new_empty((B if need_user else 0, d)),
            items.new_empty((N if need_items else 0, d)),
            items.new_empty((N if need_bias and bias is not None else 0,),
                            dtype=bias.dtype if bias is not None else items.dtype))


def _lce_setup_context(ctx, inputs, output):
    (user, items, target, bias, temperature, ignore_index, label_smoothing, need_user_grad,
     backend) = inputs
    _, lse, udir = output
    ctx.mark_non_differentiable(lse, udir)
    ctx.args = (temperature, ignore_index, label_smoothing, backend)
    ctx.save_for_backward(user, items, target, bias, lse, udir)


def _lce_backward(ctx, grad_rows, _grad_lse, _grad_udir):
    user, items, target, bias, lse, udir = ctx.saved_tensors
    temperature, ignore_index, label_smoothing, backend = ctx.args
    need_user, need_items, _, need_bias = ctx.needs_input_grad[:4]
    none = (None,) * 9
    if grad_rows is None or not (need_user or need_items or need_bias):
        return none
    du, dw, db = _lce_bwd_op(grad_rows, user, items, target, bias, lse, udir, temperature,
                             ignore_index, label_smoothing, need_user, need_items,
                             bool(need_bias), backend)
    return ((du if need_user else None), (dw if need_items else None), None,
            (db if need_bias else None)) + (None,) * 5


_lce_fwd_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# ----------------------------------------------------------------------------------------------
# sampled softmax: custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("seqrec_fast::sampled_softmax_fwd", mutates_args=())
def _sampled_fwd_op(user: Tensor, items: Tensor, target: Tensor, negatives: Tensor,
                    log_q: Optional[Tensor], target_log_q: Optional[Tensor],
                    in_batch_negatives: bool, remove_accidental_hits: bool,
                    temperature: float, need_user_grad: bool,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """-> loss_rows (B,), lse (B,) (fp32 / fp64), udir (B, d) fp32 (triton) | (0, d)."""
    if backend == "cpp":
        loss, lse = _ext._C.sampled_softmax_fwd_cpu(user, items, target, negatives, log_q,
                                                    target_log_q, in_batch_negatives,
                                                    remove_accidental_hits, temperature)
        return loss, lse, user.new_empty((0, user.shape[1]), dtype=loss.dtype)
    if backend == "triton":
        return _triton()._sampled_fwd(user, items, target, negatives, log_q, target_log_q,
                                      in_batch_negatives, remove_accidental_hits, temperature,
                                      need_user_grad)
    raise ValueError(f"no fused sampled_softmax kernel for backend {backend!r}")


@_sampled_fwd_op.register_fake
def _(user, items, target, negatives, log_q, target_log_q, in_batch_negatives,
      remove_accidental_hits, temperature, need_user_grad, backend):
    B, d = user.shape
    acc = _acc(user.dtype)
    return (user.new_empty((B,), dtype=acc), user.new_empty((B,), dtype=acc),
            user.new_empty((_udir_rows(user, need_user_grad, backend), d), dtype=acc))


@torch.library.custom_op("seqrec_fast::sampled_softmax_bwd", mutates_args=())
def _sampled_bwd_op(grad_rows: Tensor, user: Tensor, items: Tensor, target: Tensor,
                    negatives: Tensor, log_q: Optional[Tensor], target_log_q: Optional[Tensor],
                    lse: Tensor, udir: Tensor, in_batch_negatives: bool,
                    remove_accidental_hits: bool, temperature: float, need_user: bool,
                    need_items: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """-> d_user (B, d) | (0, d), d_items (N, d) | (0, d)."""
    if backend == "cpp":
        du, dw = _ext._C.sampled_softmax_bwd_cpu(grad_rows.to(lse.dtype).contiguous(), user,
                                                 items, target, negatives, log_q, target_log_q,
                                                 lse, in_batch_negatives, remove_accidental_hits,
                                                 temperature, need_user, need_items)
        return du, dw
    if backend == "triton":
        return _triton()._sampled_bwd(grad_rows.contiguous(), user, items, target, negatives,
                                      log_q, target_log_q, lse, udir, in_batch_negatives,
                                      remove_accidental_hits, temperature, need_user,
                                      need_items)
    raise ValueError(f"no fused sampled_softmax kernel for backend {backend!r}")


@_sampled_bwd_op.register_fake
def _(grad_rows, user, items, target, negatives, log_q, target_log_q, lse, udir,
      in_batch_negatives, remove_accidental_hits, temperature, need_user, need_items, backend):
    B, d = user.shape
    N = items.shape[0]
    return user.new_empty((B if need_user else 0, d)), items.new_empty((N if need_items else 0, d))


def _sampled_setup_context(ctx, inputs, output):
    (user, items, target, negatives, log_q, target_log_q, in_batch, remove_hits, temperature,
     need_user_grad, backend) = inputs
    _, lse, udir = output
    ctx.mark_non_differentiable(lse, udir)
    ctx.args = (in_batch, remove_hits, temperature, backend)
    ctx.save_for_backward(user, items, target, negatives, log_q, target_log_q, lse, udir)


def _sampled_backward(ctx, grad_rows, _grad_lse, _grad_udir):
    user, items, target, negatives, log_q, target_log_q, lse, udir = ctx.saved_tensors
    in_batch, remove_hits, temperature, backend = ctx.args
    need_user, need_items = ctx.needs_input_grad[:2]
    if grad_rows is None or not (need_user or need_items):
        return (None,) * 11
    du, dw = _sampled_bwd_op(grad_rows, user, items, target, negatives, log_q, target_log_q,
                             lse, udir, in_batch, remove_hits, temperature, need_user,
                             need_items, backend)
    return ((du if need_user else None), (dw if need_items else None)) + (None,) * 9


_sampled_fwd_op.register_autograd(_sampled_backward, setup_context=_sampled_setup_context)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def _check_user_items(user, items):
    _checks.tensor("user", user, ndim=2, dtypes=_FLOATS)
    device = user.device
    _checks.tensor("items", items, ndim=2, dtypes=_FLOATS, device=device)
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


def _check_ids(name, ids, shape, device):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of item ids, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the inputs are on {device}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(ids.shape)}")


def _check_range(name, ids, n, allowed: Optional[int] = None):
    """Values of ``ids`` in [0, n) (or equal to ``allowed``); one host sync, skipped when
    compiling."""
    if _compiling() or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= n)
    if allowed is not None:
        bad &= ids != allowed
    if bool(bad.any()):
        v = int(ids[bad][0])
        extra = f" or ignore_index={allowed}" if allowed is not None else ""
        raise ValueError(f"{name} contains id {v} outside [0, {n}){extra}")


def _check_float_scalar(name, value, *, lo=None, lo_open=False, hi=None, hi_open=False):
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


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype,
             explicit_ok=("triton", "cpp", "eager", "auto")) -> str:
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


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------
def _reduce(loss_rows: Tensor, reduction: str, count: Optional[Tensor], dtype) -> Tensor:
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / (count if count is not None else loss_rows.shape[0])
    return total.to(dtype)


def linear_cross_entropy(user: Tensor, items: Tensor, target: Tensor, *,
                         bias: Optional[Tensor] = None, temperature: float = 1.0,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, return_lse: bool = False,
                         backend: str = "auto", process_group=None):
    """Softmax cross-entropy over the whole item catalog without a (B, N) logits tensor.

    Args:
      user: (batch, dim) user / query embeddings, fp32/bf16/fp16 (fp64 on cpp/eager).
      items: (n_items, dim) item embeddings (the classifier), same dtype.
      target: (batch,) int64 item ids in [0, n_items), or ``ignore_index``.
      bias: (n_items,) per-item bias (same dtype) or None.
      temperature: > 0; logits = (user·itemᵀ + bias) / temperature.
      ignore_index: rows with this target get loss 0 and no gradient; ``mean`` averages over
        the other rows (NaN when every row is ignored, as torch's cross_entropy).
      reduction: "mean" | "sum" | "none" ((batch,) per-row losses, with per-row gradients).
      label_smoothing: ε in [0, 1): loss = lse - (1-ε)·z_target - ε/N·Σ_j z_j (torch's).
      return_lse: also return lse (batch,) (fp32, fp64 for fp64 inputs; no gradient).
      backend: "auto" | "triton" | "cpp" | "eager" (env SEQREC_FAST_BACKEND overrides auto).
      process_group: None, or a torch.distributed process group (``"default"``: the default
        group) over which the catalog is sharded by rows: ``items`` (and ``bias``) are then this
        rank's contiguous shard (rank order, see ``seqrec_fast.distributed.shard_rows``),
        ``target`` holds global ids, and ``user``/``target`` must be identical on every rank.
        The loss is the single-process loss over the whole catalog, on every rank; ``user``
        gets its full gradient, the shard its own rows' (seqrec_fast/ops/catalog_parallel.py).

    Returns: loss in user's dtype (scalar, or (batch,) for "none"); (loss, lse) with
    ``return_lse``. Raises TypeError / ValueError naming the bad argument.
    """
    device, B, d, N = _check_user_items(user, items)
    _check_ids("target", target, (B,), device)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=(items.dtype,), device=device)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape (n_items,) = ({N},), got {tuple(bias.shape)}")
    temperature = _check_float_scalar("temperature", temperature, lo=0.0, lo_open=True)
    label_smoothing = _check_float_scalar("label_smoothing", label_smoothing, lo=0.0, hi=1.0,
                                          hi_open=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _checks.choice("reduction", reduction, _REDUCTIONS)
    _check_bool("return_lse", return_lse)
    if process_group is not None:
        from .catalog_parallel import linear_cross_entropy_sharded

        return linear_cross_entropy_sharded(user, items, target, bias, temperature, ignore_index,
                                            reduction, label_smoothing, return_lse, backend,
                                            process_group)
    if 0 <= ignore_index < N:
        raise ValueError(f"ignore_index={ignore_index} is a valid item id in [0, {N}); "
                         "use a negative value")
    _check_range("target", target, N, allowed=ignore_index)
    be = _resolve(OP_LCE, backend, device, user.dtype)
    if be == "eager":
        return linear_cross_entropy_ref(user, items, target, bias=bias, temperature=temperature,
                                        ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing, return_lse=return_lse)
    need_user_grad = torch.is_grad_enabled() and user.requires_grad
    loss_rows, lse, _ = _lce_fwd_op(user, items, target, bias, temperature, ignore_index,
                                    label_smoothing, need_user_grad, be)
    count = (target != ignore_index).sum() if reduction == "mean" else None
    loss = _reduce(loss_rows, reduction, count, user.dtype)
    return (loss, lse) if return_lse else loss


def _check_sampled(user, items, target, negatives, log_q, target_log_q, in_batch_negatives,
                   remove_accidental_hits, temperature, reduction, check_ids=True):
    device, B, d, N = _check_user_items(user, items)
    _check_ids("target", target, (B,), device)
    _check_ids("negatives", negatives, None, device)
    if negatives.dim() not in (1, 2):
        raise ValueError(f"negatives must be (S,) shared or (batch, S) per row, got shape "
                         f"{tuple(negatives.shape)}")
    if negatives.dim() == 2 and negatives.shape[0] != B:
        raise ValueError(f"per-row negatives must have shape (batch, S) = ({B}, S), got "
                         f"{tuple(negatives.shape)}")
    if negatives.shape[-1] == 0:
        raise ValueError("negatives is empty (S = 0): a sampled softmax needs at least one "
                         "negative")
    if log_q is not None:
        _checks.tensor("log_q", log_q, dtypes=_FLOATS, device=device)
        if log_q.shape != negatives.shape:
            raise ValueError(f"log_q must have the shape of negatives {tuple(negatives.shape)}, "
                             f"got {tuple(log_q.shape)}")
    if target_log_q is not None:
        _checks.tensor("target_log_q", target_log_q, ndim=1, dtypes=_FLOATS, device=device)
        if target_log_q.shape[0] != B:
            raise ValueError(f"target_log_q must have shape (batch,) = ({B},), got "
                             f"{tuple(target_log_q.shape)}")
    _check_bool("in_batch_negatives", in_batch_negatives)
    _check_bool("remove_accidental_hits", remove_accidental_hits)
    temperature = _check_float_scalar("temperature", temperature, lo=0.0, lo_open=True)
    _checks.choice("reduction", reduction, _REDUCTIONS)
    if check_ids:   # sharded catalogs check against the global size
        _check_range("target", target, N)
        _check_range("negatives", negatives, N)
    return device, temperature


def sampled_softmax_loss(user: Tensor, items: Tensor, target: Tensor, negatives: Tensor, *,
                         log_q: Optional[Tensor] = None, target_log_q: Optional[Tensor] = None,
                         in_batch_negatives: bool = True, remove_accidental_hits: bool = True,
                         temperature: float = 1.0, reduction: str = "mean",
                         backend: str = "auto", process_group=None) -> Tensor:
    """Sampled softmax: each row's positive against sampled (and in-batch) negatives.

    Args:
      user: (batch, dim); items: (n_items, dim), same float dtype; target: (batch,) int64.
      negatives: int64 ids, (S,) shared by the whole batch (TF / GRU4Rec style) or (batch, S)
        one set per row. Duplicates are kept (each is a sample); S >= 1.
      log_q: log sampling probability of each negative, same shape as ``negatives`` (shared:
        one value per sample, the same for every row; per row: per (row, sample)). It is
        subtracted from the logit (logQ correction). Pass log(S·q) for TF's expected-count
        convention or log q (a constant shift of all negatives) — whatever you subtract.
        None: no correction.
      target_log_q: (batch,) log-probability of ``target[j]`` appearing as a target (its
        in-batch sampling probability). It corrects row j's positive logit AND column j when
        it serves as an in-batch negative for the other rows (Yi et al. 2019). None: 0.
      in_batch_negatives: use the other rows' targets as extra negatives.
      remove_accidental_hits: drop from row b's partition sum every candidate (negative,
        duplicate, or other row's target) whose id equals target[b] — removed, not
        replaced by a zero logit.
      temperature: > 0; logit = user·item / temperature - logQ.
      reduction: "mean" | "sum" | "none".
      backend: "auto" | "triton" | "cpp" | "eager".
      process_group: None, or a torch.distributed process group (``"default"``) over which the
        catalog is sharded by rows (as in ``linear_cross_entropy``): ``items`` is this rank's
        shard, ids are global, and ``user``/``target``/``negatives``/``log_q``/``target_log_q``
        are identical on every rank. Each rank contributes the candidate rows it owns to one
        all-reduce of the (U, d) candidate table (U = distinct target/negative ids); the loss
        and the user gradient are then those of the single-process op on every rank.

    Returns the loss in user's dtype. ``log_q``/``target_log_q`` get no gradient.
    """
    device, temperature = _check_sampled(user, items, target, negatives, log_q, target_log_q,
                                         in_batch_negatives, remove_accidental_hits,
                                         temperature, reduction,
                                         check_ids=process_group is None)
    if process_group is not None:
        from .catalog_parallel import sampled_softmax_sharded

        return sampled_softmax_sharded(user, items, target, negatives, log_q, target_log_q,
                                       in_batch_negatives, remove_accidental_hits, temperature,
                                       reduction, backend, process_group)
    be = _resolve(OP_SAMPLED, backend, device, user.dtype)
    if be == "eager":
        return sampled_softmax_ref(user, items, target, negatives,
                                   log_q=None if log_q is None else log_q.detach(),
                                   target_log_q=None if target_log_q is None else target_log_q.detach(),
                                   in_batch_negatives=in_batch_negatives,
                                   remove_accidental_hits=remove_accidental_hits,
                                   temperature=temperature, reduction=reduction)
    need_user_grad = torch.is_grad_enabled() and user.requires_grad
    acc = _acc(user.dtype)
    lq = None if log_q is None else log_q.detach().to(acc).contiguous()
    tlq = None if target_log_q is None else target_log_q.detach().to(acc).contiguous()
    loss_rows, _, _ = _sampled_fwd_op(user, items, target, negatives.contiguous(), lq, tlq,
                                      in_batch_negatives, remove_accidental_hits, temperature,
                                      need_user_grad, be)
    return _reduce(loss_rows, reduction, None, user.dtype)


def bpr_max_loss(user: Tensor, items: Tensor, target: Tensor, negatives: Tensor, *,
                 reg: float = 1.0, in_batch_negatives: bool = True,
                 remove_accidental_hits: bool = True, temperature: float = 1.0,
                 reduction: str = "mean", backend: str = "auto") -> Tensor:
    """GRU4Rec's BPR-max over the sampled candidates of ``sampled_softmax_loss`` (no logQ):
    loss_b = -log Σ_j s_j·σ(r_b - r_j) + reg·Σ_j s_j·r_j², s = softmax over the negatives' scores
    r_j (removed accidental hits take part in neither sum).

    Eager composite: the (batch, S [+ batch]) scores are small next to a catalog, so only
    ``backend="auto"``/``"eager"`` exist for it.
    """
    device, temperature = _check_sampled(user, items, target, negatives, None, None,
                                         in_batch_negatives, remove_accidental_hits,
                                         temperature, reduction)
    reg = _check_float_scalar("reg", reg, lo=0.0)
    if backend not in ("auto", "eager"):
        raise ValueError(f"bpr_max_loss has only the eager backend, got backend={backend!r}")
    return bpr_max_ref(user, items, target, negatives, reg=reg,
                       in_batch_negatives=in_batch_negatives,
                       remove_accidental_hits=remove_accidental_hits, temperature=temperature,
                       reduction=reduction)
