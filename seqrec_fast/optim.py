"""Optimizers: dense Adam (the default) and row-wise sparse optimizers for the item table.

``dense_adam`` is ``torch.optim.Adam`` with torch's fused implementation where torch has one for
the parameters (CPU and CUDA floating-point tensors): one pass over each tensor per step and no
temporaries, where the default (foreach) implementation makes several passes and allocates
(n_items, d) intermediates. Same algorithm and hyper-parameters; results equal to rounding. On
CPU at 1 thread it is ~5x faster on a 100k x 64 item table (8 ms against 42 ms a step).

Row-wise sparse optimizers for the item table: a step costs O(rows touched), not O(n_items).

Use with a model built with ``sparse=True`` (its item-table gradient is then a sparse COO tensor
holding only the rows of the step's history, targets and negatives). A dense gradient is also
accepted (every row is then updated). Semantics:

* ``RowWiseAdagrad`` (FBGEMM's EXACT_ROWWISE_ADAGRAD, GRU4Rec's Adagrad): one accumulator per
  row, G_r += mean_j(g_rj²); w_r -= lr · g_r / (sqrt(G_r) + eps).
* ``RowWiseAdam`` (lazy Adam, as TF's LazyAdam / torch.optim.SparseAdam): first/second moments
  updated only on touched rows; bias correction with a per-row step count.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer


def _rows_and_values(p: torch.Tensor):
    """-> (rows (r,) int64 or None for all rows, grad values (r, d))."""
    g = p.grad
    if g.is_sparse:
        g = g.coalesce()
        return g.indices()[0], g.values()
    return None, g


class _RowWise(Optimizer):
    """Shared part of the row-wise optimizers: 2-D tables only, and the (group, param, touched
    rows, gradient rows) of every parameter that has a gradient."""

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"params must be 2-D (n_rows, d) tables, got shape {tuple(p.shape)}")

    def _tables(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    rows, g = _rows_and_values(p)
                    yield group, p, rows, g.float()


class RowWiseAdagrad(_RowWise):
    """params: 2-D tensors (n_rows, d). lr > 0, eps > 0, weight_decay >= 0 (applied to touched
    rows only). State: ``sum`` (n_rows,) fp32."""

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-8, weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group, p, rows, g in self._tables():
            st = self.state[p]
            if "sum" not in st:
                st["sum"] = torch.zeros(p.shape[0], device=p.device, dtype=torch.float32)
            w = p.data if rows is None else p.data[rows]
            if group["weight_decay"]:
                g = g + group["weight_decay"] * w.float()
            acc = st["sum"] if rows is None else st["sum"][rows]
            acc = acc + g.pow(2).mean(1)
            upd = (w.float() - group["lr"] * g / (acc.sqrt() + group["eps"])[:, None]).to(p.dtype)
            if rows is None:
                st["sum"].copy_(acc)
                p.data.copy_(upd)
            else:
                st["sum"][rows] = acc
                p.data[rows] = upd
        return loss


class RowWiseAdam(_RowWise):
    """Lazy Adam on touched rows. params: 2-D tensors (n_rows, d). State: ``exp_avg``,
    ``exp_avg_sq`` (n_rows, d) fp32 and ``step`` (n_rows,) int64 per-row counts."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group, p, rows, g in self._tables():
            b1, b2 = group["betas"]
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
                st["exp_avg_sq"] = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
                st["step"] = torch.zeros(p.shape[0], device=p.device, dtype=torch.int64)
            if st["step"].device != p.device:
                # Optimizer.load_state_dict leaves a state entry named "step" where it was
                # loaded (the CPU, for a checkpoint): bring the per-row counts to the table
                st["step"] = st["step"].to(p.device)
            sel = slice(None) if rows is None else rows
            m = st["exp_avg"][sel].mul_(b1).add_(g, alpha=1 - b1) if rows is None else \
                st["exp_avg"][sel] * b1 + g * (1 - b1)
            v = st["exp_avg_sq"][sel].mul_(b2).addcmul_(g, g, value=1 - b2) if rows is None else \
                st["exp_avg_sq"][sel] * b2 + g * g * (1 - b2)
            t = st["step"][sel] + 1
            c1 = 1 - b1 ** t.double()
            c2 = 1 - b2 ** t.double()
            denom = (v / c2.float()[:, None]).sqrt_().add_(group["eps"])
            upd = (p.data[sel].float() - group["lr"] * (m / c1.float()[:, None]) / denom)
            st["step"][sel] = t
            if rows is not None:
                st["exp_avg"][rows] = m
                st["exp_avg_sq"][rows] = v
            p.data[sel] = upd.to(p.dtype)
        return loss


OPTIMIZERS = ("adam", "rowwise_adagrad", "rowwise_adam")
_FUSED_ADAM_DEVICES = ("cpu", "cuda")


def fused_adam_supported(params) -> bool:
    """True when torch's fused Adam kernel takes every tensor of ``params``: floating point (not
    complex) and all on CPU or all on CUDA devices."""
    params = list(params)
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_FUSED_ADAM_DEVICES) & set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - torch without the helper
        devices = set()
    kinds = {p.device.type for p in params}
    return (len(kinds) == 1 and kinds <= devices
            and all(torch.is_floating_point(p) for p in params))


def dense_adam(params, lr: float = 1e-3, **kwargs) -> torch.optim.Adam:
    """``torch.optim.Adam(params, lr, **kwargs)``, fused (``fused=True``) when
    :func:`fused_adam_supported`, else torch's default implementation. Explicit ``fused`` /
    ``foreach`` in ``kwargs`` are honoured as given."""
    params = list(params)
    if "fused" not in kwargs and "foreach" not in kwargs and not kwargs.get("differentiable"):
        if fused_adam_supported(p for group in _param_tensors(params) for p in group):
            kwargs["fused"] = True
    return torch.optim.Adam(params, lr=lr, **kwargs)


def _param_tensors(params):
    """params as given to an optimizer (tensors or param-group dicts) -> lists of tensors."""
    for p in params:
        yield list(p["params"]) if isinstance(p, dict) else [p]


def build_optimizers(model, name: str = "adam", lr: float = 1e-3, sparse_lr: float = None):
    """-> list of optimizers. "adam": one dense Adam over everything (default, ComiRec).
    "rowwise_adagrad" / "rowwise_adam": the item table (model.item_emb.weight) gets the row-wise
    optimizer (``sparse_lr``, default 0.05 for Adagrad, ``lr`` for Adam), the rest dense Adam.
    Dense Adam is :func:`dense_adam` (torch's fused kernel where available)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "adam":
        return [dense_adam(model.parameters(), lr=lr)]
    table = model.item_emb.weight
    rest = [p for p in model.parameters() if p is not table]
    opts = [dense_adam(rest, lr=lr)] if rest else []
    if name == "rowwise_adagrad":
        opts.append(RowWiseAdagrad([table], lr=sparse_lr or 0.05))
    else:
        opts.append(RowWiseAdam([table], lr=sparse_lr or lr))
    return opts
