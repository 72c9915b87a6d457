"""The fused ops the models use, each with the eager reference as the fallback while an op has
not landed in ``seqrec_fast.ops`` (import checked at call time, so a model switches to the fused
op as soon as it exists). Shapes as in the ops."""
from __future__ import annotations

import importlib
import inspect
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..reference.attention import attention_ref, label_aware_attention_ref
from ..reference.softmax import linear_cross_entropy_ref, sampled_softmax_ref


def _fused(module: str, name: str):
    """The fused op, or None while it has not landed. Returns (fn, accepts_backend)."""
    try:
        mod = importlib.import_module(f"seqrec_fast.ops.{module}")
    except ImportError:
        return None
    fn = getattr(mod, name, None)
    if fn is None:
        return None
    return fn, "backend" in inspect.signature(fn).parameters


_fell_back: set = set()


def _call(found, *args, backend: str, **kwargs):
    """Run a fused op with the model's backend. A model spans several ops: when the backend it
    names has no kernel for THIS op (e.g. "cpp" for an op with only Triton/eager kernels), the op
    runs with "auto" instead, and that is said once (warnings)."""
    fn, takes_backend = found
    if not takes_backend:
        return fn(*args, **kwargs)
    try:
        return fn(*args, backend=backend, **kwargs)
    except RuntimeError as exc:
        if backend == "auto" or "is not available" not in str(exc):
            raise
        key = (fn.__name__, backend)
        if key not in _fell_back:
            _fell_back.add(key)
            warnings.warn(f"seqrec_fast.models: {fn.__name__} has no {backend!r} kernel here "
                          f"({exc}); running it with backend='auto'", RuntimeWarning, stacklevel=3)
        return fn(*args, backend="auto", **kwargs)


def multi_interest_attention(seq_emb: Tensor, mask: Tensor, w1: Tensor, b1: Optional[Tensor],
                             w2: Tensor, b2: Optional[Tensor], pos_emb: Optional[Tensor],
                             backend: str) -> Tensor:
    """ComiRec-SA interests: seq_emb (B, L, d), mask (B, L) bool, w1 (d, d_a), w2 (d_a, K),
    pos_emb (L, d) -> (B, K, d)."""
    fn = _fused("attention", "multi_interest_attention")
    if fn is not None:
        return _call(fn, seq_emb, mask, w1, b1, w2, b2, pos_emb=pos_emb, backend=backend)
    return attention_ref(seq_emb, mask, w1, b1, w2, b2, pos_emb=pos_emb)


def label_aware_attention(interests: Tensor, target_emb: Tensor, pow: float, backend: str) -> Tensor:
    """Readout: interests (B, K, d), target_emb (B, d) -> user vector (B, d);
    pow = inf is the hard readout."""
    fn = _fused("attention", "label_aware_attention")
    if fn is not None:
        return _call(fn, interests, target_emb, pow=pow, backend=backend)
    return label_aware_attention_ref(interests, target_emb, pow=pow)


def full_softmax(user: Tensor, items: Tensor, target: Tensor, bias: Optional[Tensor],
                 backend: str) -> Tensor:
    """Full-catalog softmax CE: user (B, d), items (N, d), target (B,), bias (N,) -> scalar."""
    fn = _fused("softmax", "linear_cross_entropy")
    if fn is not None:
        return _call(fn, user, items, target, bias=bias, backend=backend)
    return linear_cross_entropy_ref(user, items, target, bias=bias)


def sampled_softmax(user: Tensor, items: Tensor, target: Tensor, negatives: Tensor,
                    log_q: Optional[Tensor], target_log_q: Optional[Tensor],
                    backend: str) -> Tensor:
    """Sampled softmax with shared negatives: user (B, d), items (M, d), target (B,),
    negatives (S,), log_q (S,), target_log_q (B,) -> scalar. Accidental hits removed, no in-batch
    negatives (ComiRec)."""
    fn = _fused("softmax", "sampled_softmax_loss")
    kw = dict(log_q=log_q, target_log_q=target_log_q, in_batch_negatives=False,
              remove_accidental_hits=True)
    if fn is not None:
        return _call(fn, user, items, target, negatives, backend=backend, **kw)
    return sampled_softmax_ref(user, items, target, negatives, **kw)


def log_uniform_sample(n: int, range_max: int, generator: Optional[torch.Generator],
                       device) -> tuple:
    """``n`` draws with replacement from the log-uniform (Zipfian) distribution over ranks
    [0, range_max): P(r) = log((r+2)/(r+1)) / log(range_max+1). Returns (ranks (n,) int64,
    log_prob (n,) float32)."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    r = (torch.exp(u * math.log(range_max + 1.0)).floor().long() - 1).clamp_(0, range_max - 1)
    return r, log_uniform_log_prob(r, range_max)


def log_uniform_log_prob(r: Tensor, range_max: int) -> Tensor:
    """log P(r) of the log-uniform distribution; r: any shape int64 -> float32, same shape."""
    rf = r.to(torch.float64)
    return (torch.log(torch.log1p(1.0 / (rf + 1))) - math.log(math.log(range_max + 1.0))
            ).to(torch.float32)
