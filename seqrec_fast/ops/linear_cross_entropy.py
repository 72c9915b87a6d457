"""Full-catalog softmax cross-entropy without a logits tensor: ``linear_cross_entropy``, also
over a catalog sharded across a process group (``linear_cross_entropy_sharded``).

Structure (DESIGN.md): custom ops ``seqrec_fast::linear_cross_entropy_fwd/_bwd`` return per-row
losses (fp32, fp64 for fp64 inputs) and the backward state; the reduction is ordinary torch on a
(B,) vector. Saved for backward: the inputs, lse (B,) and — Triton only — the softmax-weighted
item mean (B, d) = Σ_j softmax_j·item_j, computed in the forward pass flash-attention style so
that the user gradient is a (B, d) epilogue g/T·(softmax_item_mean - item_target). Never a
(B, N) tensor.

Backends: ``triton`` (``seqrec_fast.kernels.linear_cross_entropy``: CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1), ``cpp`` (``csrc/linear_cross_entropy``: C++ CPU kernels chunked over
the catalog, O(B·chunk) memory, float64 capable), ``eager`` (``linear_cross_entropy_ref``, which
builds the logits). float64 on CUDA runs eager.

NaN policy: no data checks on floats (they would synchronise). A NaN/Inf in a user row makes
that row's loss and gradient NaN; a NaN in an item row reaches every row (every row's partition
sum contains it). Extreme temperatures (e.g. 1e-30: logits of ±1e30) give finite losses and
gradients on every backend (probabilities are clamped to <= 1 where 1/T amplifies rounding);
where the softmax itself is decided by that rounding, backends may pick different ties.
Id checks (range of ``target``): a ValueError on CPU (one host read), the
same under ``torch.compile`` (through the opaque op ``seqrec_fast::check_id_range``); on CUDA a
device-side assert without host sync.

Sharded catalog (vocabulary-parallel cross-entropy, as Megatron-LM does for vocabularies; the
collectives are in ``catalog_parallel``): each rank computes the log-sum-exp of its shard with
the fused kernel and the target logit when it owns the target; one all-gather of these
(W, 2, B) values combines them (label smoothing adds one more of (W, 2, B)). Backward: the fused
kernel's gradient of the shard evaluated with the global log-sum-exp (exactly the
single-process gradient's rows); the user gradient is all-reduced (B·d values). The kernel sees
the shard plus one zero row (a copy of the shard per call) that stands for "target on another
rank".
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _ext
from ..reference.linear_cross_entropy import linear_cross_entropy_ref
from ._common import (REDUCTIONS, acc_dtype, autocast_inputs, check_bool, check_float_scalar,
                      check_ids, check_range, check_user_items, compiling, deferred_error,
                      flatten_rows, loss_fwd_fake, on_input_device, reduce_rows,
                      resolve_loss_backend)
from .catalog_parallel import (all_gather_list, check_group, copy_to_shards,
                               exchange_shard_offset, gather_replicated)

OP = "linear_cross_entropy"


def _triton():
    from seqrec_fast.kernels import linear_cross_entropy as k

    return k


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("seqrec_fast::linear_cross_entropy_fwd", mutates_args=())
@on_input_device
def _linear_cross_entropy_fwd_op(user: Tensor, items: Tensor, target: Tensor,
                                 bias: Optional[Tensor], temperature: float, ignore_index: int,
                                 label_smoothing: float, need_user_grad: bool,
                                 backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """-> loss_rows (B,), lse (B,) (fp32 / fp64), softmax_item_mean (B, d) fp32 (triton with
    need_user_grad) or (0, d)."""
    if backend == "cpp":
        loss, lse = _ext._C.linear_cross_entropy_fwd_cpu(user, items, target, bias, temperature,
                                                         ignore_index, label_smoothing, 0)
        return loss, lse, user.new_empty((0, user.shape[1]), dtype=loss.dtype)
    if backend == "triton":
        return _triton()._linear_cross_entropy_fwd(user, items, target, bias, temperature,
                                                   ignore_index, label_smoothing, need_user_grad)
    raise ValueError(f"no fused linear_cross_entropy kernel for backend {backend!r}")


@_linear_cross_entropy_fwd_op.register_fake
def _(user, items, target, bias, temperature, ignore_index, label_smoothing, need_user_grad,
      backend):
    return loss_fwd_fake(user, need_user_grad, backend)


@torch.library.custom_op("seqrec_fast::linear_cross_entropy_bwd", mutates_args=())
@on_input_device
def _linear_cross_entropy_bwd_op(grad_rows: Tensor, user: Tensor, items: Tensor,
                                 target: Tensor, bias: Optional[Tensor], lse: Tensor,
                                 softmax_item_mean: Tensor, temperature: float,
                                 ignore_index: int, label_smoothing: float, need_user: bool,
                                 need_items: bool, need_bias: bool,
                                 backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """-> d_user (B, d) | (0, d), d_items (N, d) | (0, d), d_bias (N,) | (0,)."""
    # a backward run inside an autocast region must not recast the kernels' own matmuls
    with torch.autocast(user.device.type, enabled=False):
        grad_rows = grad_rows.contiguous()
        if backend == "cpp":
            du, dw, db = _ext._C.linear_cross_entropy_bwd_cpu(
                grad_rows.to(lse.dtype), user, items, target, bias, lse, temperature,
                ignore_index, label_smoothing, need_user, need_items, need_bias, 0)
            return du, dw, db
        if backend == "triton":
            return _triton()._linear_cross_entropy_bwd(
                grad_rows, user, items, target, bias, lse, softmax_item_mean, temperature,
                ignore_index, label_smoothing, need_user, need_items, need_bias)
        raise ValueError(f"no fused linear_cross_entropy kernel for backend {backend!r}")


@_linear_cross_entropy_bwd_op.register_fake
def _(grad_rows, user, items, target, bias, lse, softmax_item_mean, temperature, ignore_index,
      label_smoothing, need_user, need_items, need_bias, backend):
    B, d = user.shape
    N = items.shape[0]
    return (user.new_empty((B if need_user else 0, d)),
            items.new_empty((N if need_items else 0, d)),
            items.new_empty((N if need_bias and bias is not None else 0,),
                            dtype=bias.dtype if bias is not None else items.dtype))


def _linear_cross_entropy_setup_context(ctx, inputs, output):
    (user, items, target, bias, temperature, ignore_index, label_smoothing, need_user_grad,
     backend) = inputs
    _, lse, softmax_item_mean = output
    ctx.mark_non_differentiable(lse, softmax_item_mean)
    ctx.args = (temperature, ignore_index, label_smoothing, backend)
    ctx.save_for_backward(user, items, target, bias, lse, softmax_item_mean)


def _linear_cross_entropy_backward(ctx, grad_rows, _grad_lse, _grad_item_mean):
    user, items, target, bias, lse, softmax_item_mean = ctx.saved_tensors
    temperature, ignore_index, label_smoothing, backend = ctx.args
    need_user, need_items, _, need_bias = ctx.needs_input_grad[:4]
    none = (None,) * 9
    if grad_rows is None or not (need_user or need_items or need_bias):
        return none
    du, dw, db = _linear_cross_entropy_bwd_op(grad_rows, user, items, target, bias, lse,
                                              softmax_item_mean, temperature, ignore_index,
                                              label_smoothing, need_user, need_items,
                                              bool(need_bias), backend)
    return ((du if need_user else None), (dw if need_items else None), None,
            (db if need_bias else None)) + (None,) * 5


_linear_cross_entropy_fwd_op.register_autograd(
    _linear_cross_entropy_backward, setup_context=_linear_cross_entropy_setup_context)


# ----------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------
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
        gets its full gradient, the shard its own rows' (``linear_cross_entropy_sharded``).

    Leading dimensions: ``user`` may be (..., dim) with ``target`` of shape (...) (e.g.
    (batch, seq_len, dim) and (batch, seq_len)); they are flattened, and "none" returns losses
    (and lse) of target's shape.

    Autocast (``torch.autocast`` on user's device type): like a matmul, ``user``, ``items`` and
    ``bias`` (fp32/fp16/bf16) are cast to the autocast dtype and the kernel runs on them with
    fp32 accumulation; the loss is returned in float32 (as autocast does for
    ``cross_entropy``). Gradients flow back through the casts to the original dtypes.

    Id checks: ``target`` outside [0, n_items) (other than ``ignore_index``) is a ValueError on
    CPU, compiled or not; on CUDA a device-side assert (no host sync), reported at the next
    synchronising call.

    Returns: loss in user's dtype (float32 under autocast; scalar, or target's shape for
    "none"); (loss, lse) with ``return_lse``. Raises TypeError / ValueError naming the bad
    argument.
    """
    try:
        return _linear_cross_entropy_public(user, items, target, bias, temperature, ignore_index,
                                            reduction, label_smoothing, return_lse, backend,
                                            process_group)
    except (TypeError, ValueError) as err:
        if not compiling():
            raise
        return deferred_error(err, user, pair=return_lse is True)


def _linear_cross_entropy_public(user, items, target, bias, temperature, ignore_index,
                                 reduction, label_smoothing, return_lse, backend, process_group):
    user, items, bias, out_dtype = autocast_inputs(user, items, bias)
    user, target, lead = flatten_rows(user, target)
    if out_dtype is not None:
        with torch.autocast(user.device.type, enabled=False):
            out = _linear_cross_entropy(user, items, target, bias, temperature, ignore_index,
                                        reduction, label_smoothing, return_lse, backend,
                                        process_group)
    else:
        out = _linear_cross_entropy(user, items, target, bias, temperature, ignore_index,
                                    reduction, label_smoothing, return_lse, backend,
                                    process_group)
    loss, lse = out if return_lse else (out, None)
    if out_dtype is not None:
        loss = loss.to(out_dtype)
    if lead is not None and reduction == "none":
        loss = loss.reshape(lead)
    if lead is not None and lse is not None:
        lse = lse.reshape(lead)
    return (loss, lse) if return_lse else loss


def _linear_cross_entropy(user, items, target, bias, temperature, ignore_index, reduction,
                          label_smoothing, return_lse, backend, process_group):
    """``linear_cross_entropy`` on 2-D user / 1-D target, autocast already resolved."""
    device, B, d, N = check_user_items(user, items)
    check_ids("target", target, (B,), device)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=(items.dtype,), device=device)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape (n_items,) = ({N},), got {tuple(bias.shape)}")
    temperature = check_float_scalar("temperature", temperature, lo=0.0, lo_open=True)
    label_smoothing = check_float_scalar("label_smoothing", label_smoothing, lo=0.0, hi=1.0,
                                         hi_open=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _checks.choice("reduction", reduction, REDUCTIONS)
    check_bool("return_lse", return_lse)
    if process_group is not None:
        return linear_cross_entropy_sharded(user, items, target, bias, temperature, ignore_index,
                                            reduction, label_smoothing, return_lse, backend,
                                            process_group)
    if 0 <= ignore_index < N:
        raise ValueError(f"ignore_index={ignore_index} is a valid item id in [0, {N}); "
                         "use a negative value")
    target = check_range("target", target, N, allowed=ignore_index)
    be = resolve_loss_backend(OP, backend, device, user.dtype)
    if be == "eager":
        return linear_cross_entropy_ref(user, items, target, bias=bias, temperature=temperature,
                                        ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing, return_lse=return_lse)
    need_user_grad = torch.is_grad_enabled() and user.requires_grad
    loss_rows, lse, _ = _linear_cross_entropy_fwd_op(user, items, target, bias, temperature,
                                                     ignore_index, label_smoothing,
                                                     need_user_grad, be)
    count = (target != ignore_index).sum() if reduction == "mean" else None
    loss = reduce_rows(loss_rows, reduction, count, user.dtype)
    return (loss, lse) if return_lse else loss


# ----------------------------------------------------------------------------------------------
# over a catalog sharded across a process group
# ----------------------------------------------------------------------------------------------
_DUMMY_BIAS = -3.0e4   # exp(-3e4 / T - lse) is exactly 0 in every float type we take


class _ShardedCrossEntropy(torch.autograd.Function):
    """Cross-entropy rows lse - z_target (B,) over a sharded catalog with the fused kernels.

    The shard gets one extra all-zero row with bias -3e4: rows whose target lives on another
    rank point at it (its softmax weight is exactly 0, its gradient is dropped). Forward: the
    kernel's shard log-sum-exp lse_r, the owned target logits, one all-gather of both. Backward:
    the kernel's column gradients evaluated with the GLOBAL lse, i.e. g·(softmax_j - onehot_j)
    of the whole catalog restricted to the shard — exact, no correction term; the user gradient
    of this shard (all-reduced by the caller's ``copy_to_shards``) is
    g/T·(Σ_j softmax_j·w_j - w_t), recomputed by the kernel (cpp) or from the forward's
    shard item mean Σ_j softmax_r,j·w_j (triton)."""

    @staticmethod
    def forward(ctx, user, items, bias, target, offset, temperature, backend, group, rank, world,
                need_user_grad):
        n, d = items.shape
        acc = acc_dtype(user.dtype)
        owned = (target >= offset) & (target < offset + n)
        t_aug = torch.where(owned, target - offset, torch.full_like(target, n))
        items_aug = torch.cat([items, items.new_zeros((1, d))])
        b = bias if bias is not None else items.new_zeros((n,))
        bias_aug = torch.cat([b, b.new_full((1,), _DUMMY_BIAS)])
        _, lse_r, shard_item_mean = _linear_cross_entropy_fwd_op(
            user, items_aug, t_aug, bias_aug, temperature, -100, 0.0, need_user_grad, backend)
        loc = t_aug.clamp(max=n - 1)
        z = (user.to(acc) * items[loc].to(acc)).sum(-1) + b[loc].to(acc)
        z_loc = torch.where(owned, z / temperature, torch.zeros_like(z))
        G = torch.stack(all_gather_list(torch.stack([lse_r.to(acc), z_loc]), group, world))
        lse = torch.logsumexp(G[:, 0], dim=0)
        ctx.save_for_backward(user, items_aug, t_aug, bias_aug, lse, lse_r.to(acc),
                              shard_item_mean, owned)
        ctx.args = (temperature, backend, bias is not None, n)
        ctx.mark_non_differentiable(lse)
        return lse - G[:, 1].sum(0), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_lse):
        user, items_aug, t_aug, bias_aug, lse, lse_r, shard_item_mean, owned = ctx.saved_tensors
        temperature, backend, has_bias, n = ctx.args
        nu, nw, nb = ctx.needs_input_grad[:3]
        nb = bool(nb and has_bias)
        if not (nu or nw or nb):
            return (None,) * 11
        g = g.to(lse.dtype).contiguous()
        kernel_user = nu and backend != "triton"
        du, dw, db = _linear_cross_entropy_bwd_op(g, user, items_aug, t_aug, bias_aug, lse,
                                                  shard_item_mean, temperature, -100, 0.0,
                                                  kernel_user, nw, nb, backend)
        if nu and backend == "triton":
            # shard_item_mean = Σ_j softmax_r,j·w_j with the shard's lse_r: rescale to the
            # global lse
            wt = torch.where(owned[:, None], items_aug[t_aug].float(),
                             torch.zeros((), device=user.device))
            du = ((torch.exp(lse_r - lse)[:, None] * shard_item_mean - wt)
                  * (g / temperature)[:, None]).to(user.dtype)
        return (du if nu else None, dw[:n] if nw else None, db[:n] if nb else None) + \
            (None,) * 8


def linear_cross_entropy_sharded(user, items, target, bias, temperature, ignore_index, reduction,
                                 label_smoothing, return_lse, backend, process_group):
    """Arguments as ``linear_cross_entropy`` (validated there, except the id range); ``items``
    (n_r, d) and ``bias`` (n_r,) are this rank's shard."""
    group, rank, world = check_group(process_group)
    device = user.device
    n_local = items.shape[0]
    offset, N = exchange_shard_offset(group, rank, world, device, n_local, user, target)
    if 0 <= ignore_index < N:
        raise ValueError(f"ignore_index={ignore_index} is a valid item id in [0, {N}); "
                         "use a negative value")
    target = check_range("target", target, N, allowed=ignore_index)
    be = resolve_loss_backend(OP, backend, device, user.dtype)
    acc = acc_dtype(user.dtype)
    u = copy_to_shards(user, group)
    owned = (target >= offset) & (target < offset + n_local)
    loc = (target - offset).clamp(0, n_local - 1)
    if be == "eager":
        logits = u.to(acc) @ items.to(acc).t()
        if bias is not None:
            logits = logits + bias.to(acc)
        lse_r = torch.logsumexp(logits / temperature, dim=1)
        z = (u.to(acc) * items[loc].to(acc)).sum(-1)
        if bias is not None:
            z = z + bias[loc].to(acc)
        z_loc = torch.where(owned, z / temperature, torch.zeros_like(z))
        G = gather_replicated(torch.stack([lse_r, z_loc]), group, rank, world)
        lse = torch.logsumexp(G[:, 0], dim=0)
        rows = lse - G[:, 1].sum(0)
    else:
        need_user_grad = torch.is_grad_enabled() and user.requires_grad
        rows, lse = _ShardedCrossEntropy.apply(u, items, bias, target, offset, temperature, be,
                                               group, rank, world, need_user_grad)
    if label_smoothing > 0:
        # loss = lse - (1-ε)·z_t - ε/N·Σ_j z_j: the ε terms are linear in the logits
        z = (u.to(acc) * items[loc].to(acc)).sum(-1)
        tot = u.to(acc) @ items.to(acc).sum(0)
        if bias is not None:
            z = z + bias[loc].to(acc)
            tot = tot + bias.to(acc).sum()
        z_loc = torch.where(owned, z / temperature, torch.zeros_like(z))
        G2 = gather_replicated(torch.stack([z_loc, tot / temperature]), group, rank, world)
        rows = rows + label_smoothing * G2[:, 0].sum(0) - (label_smoothing / N) * G2[:, 1].sum(0)
    valid = target != ignore_index
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    count = valid.sum() if reduction == "mean" else None
    loss = reduce_rows(rows, reduction, count, user.dtype)
    return (loss, lse.detach()) if return_lse else loss
