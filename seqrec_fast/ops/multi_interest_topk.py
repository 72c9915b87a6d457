"""Catalog-scale multi-interest retrieval: the exact top-n items by max over a user's interests
(``multi_interest_topk``), registered as the ``seqrec_fast::multi_interest_topk`` custom op and
run by the chosen backend: Triton (GPU, or CPU tensors under TRITON_INTERPRET=1), C++ (CPU),
or the eager reference. Inference only: no gradient (inputs that require grad are fine, the
outputs never do).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _ext
from .. import backend as _backend
from ..reference.multi_interest_topk import multi_interest_topk_ref
from ._common import on_input_device

OP = "multi_interest_topk"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_ITEMS = 2**31 - 1  # ids are packed into 32 bits by the Triton kernel


@torch.library.custom_op("seqrec_fast::multi_interest_topk", mutates_args=())
@on_input_device
def _multi_interest_topk_op(interests: Tensor, items: Tensor, n: int,
                            interest_mask: Optional[Tensor], exclude: Optional[Tensor],
                            backend: str) -> Tuple[Tensor, Tensor]:
    """-> scores (U, n) fp32, ids (U, n) int64 (validated inputs, concrete backend)."""
    if backend == "cpp":
        return tuple(_ext._C.multi_interest_topk_fwd_cpu(interests, items, n, interest_mask,
                                                          exclude))
    if backend == "triton":
        from seqrec_fast.kernels import multi_interest_topk as k

        return k._multi_interest_topk_fwd(interests, items, n, interest_mask, exclude)
    if backend == "eager":
        s, i = multi_interest_topk_ref(interests, items, n, interest_mask=interest_mask,
                                       exclude=exclude)
        return s.float(), i
    raise ValueError(f"no multi_interest_topk kernel for backend {backend!r}")


@_multi_interest_topk_op.register_fake
def _(interests, items, n, interest_mask, exclude, backend):
    U = interests.shape[0]
    return (interests.new_empty((U, n), dtype=torch.float32),
            interests.new_empty((U, n), dtype=torch.int64))


def _validate(interests, items, n, interest_mask, exclude):
    _checks.tensor("interests", interests, ndim=3, dtypes=_FLOATS)
    device = interests.device
    _checks.tensor("items", items, ndim=2, dtypes=_FLOATS, device=device)
    U, K, d = interests.shape
    if K < 1 or d < 1:
        raise ValueError(f"interests must have num_interests >= 1 and dim >= 1, got shape "
                         f"{tuple(interests.shape)}")
    if items.shape[1] != d:
        raise ValueError(f"items must have shape (num_items, dim={d}), got {tuple(items.shape)}")
    if items.dtype != interests.dtype:
        raise TypeError(f"items has dtype {items.dtype} but interests has {interests.dtype}")
    if items.shape[0] > MAX_ITEMS:
        raise ValueError(f"items may hold at most {MAX_ITEMS} rows, got {items.shape[0]}")
    _checks.positive_int("n", n)
    if interest_mask is not None:
        _checks.tensor("interest_mask", interest_mask, ndim=2, dtypes=(torch.bool,),
                       device=device)
        if tuple(interest_mask.shape) != (U, K):
            raise ValueError(f"interest_mask must have shape (users, num_interests) = "
                             f"{(U, K)}, got {tuple(interest_mask.shape)}")
    if exclude is not None:
        _checks.tensor("exclude", exclude, dtypes=(torch.int64, torch.int32), device=device)
        if exclude.dim() == 1:
            exclude = exclude[None, :].expand(U, -1)
        if exclude.dim() != 2 or exclude.shape[0] != U:
            raise ValueError(f"exclude must have shape (users={U}, E) or (E,), got "
                             f"{tuple(exclude.shape)}")
        exclude = exclude.to(torch.int64)   # the kernels make it contiguous
        N = items.shape[0]
        # value check needs a host sync; skipped while torch.compile traces
        if exclude.numel() and not _checks.compiling():
            lo, hi = torch.stack(torch.aminmax(exclude)).tolist()   # one host read
            if lo < -1 or hi >= N:
                raise ValueError(f"exclude ids must lie in [0, {N}) or be -1 (padding), got "
                                 f"range [{lo}, {hi}]")
        if exclude.shape[1] == 0:
            exclude = None
    return exclude


def multi_interest_topk(interests: Tensor, items: Tensor, n: int, *,
                        interest_mask: Optional[Tensor] = None,
                        exclude: Optional[Tensor] = None,
                        backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """The exact top-n items of every user by the max score over the user's interests.

    score(u, i) = max over the unmasked k of <interests[u, k], items[i]>, accumulated in fp32.

    Args:
      interests: (users, num_interests, dim), fp32/bf16/fp16.
      items: (num_items, dim), same dtype and device (item id = row index).
      n: number of items per user, >= 1.
      interest_mask: (users, num_interests) bool, True = use the interest, or None (all used).
      exclude: ids never returned to a user: (users, E) int64/int32 padded with -1, or (E,) for
        every user (e.g. the padding id 0, or each user's history). Ids outside [0, num_items)
        other than -1 raise ValueError.
      backend: "auto" | "triton" | "cpp" | "eager" (env SEQREC_FAST_BACKEND overrides "auto").

    Returns (scores (users, n) fp32, ids (users, n) int64), best first. Order: score
    descending, ties broken by the smaller id. Where fewer than n items can be returned
    (n > num_items, exclusions, every interest of the user masked), the remaining places hold
    id -1 and score -inf. Items scoring NaN or -inf are never returned. users = 0 gives (0, n)
    outputs. Nothing of size (users, num_items) is ever allocated: every backend but the eager
    reference keeps a running top-n while it walks tiles of users x items.

    Why this is ComiRec's merge: ComiRec retrieves each interest's top-n list, concatenates
    the K lists, sorts by score and keeps the first occurrence of every id, n of them.
    (1) Each item in the true top-n by max-score is in that merge: if item i is among the
    n best by max and its max is reached at interest k*, every item beating i at k* has a
    max-score above i's, so fewer than n items beat i at k* and i is in k*'s top-n list.
    (2) The merged list ranks each item by its best score among the lists that hold it,
    which for an item of the true top-n is its max (it is in k*'s list, and no list can
    hold a score above the max). (3) Any item of the merge outside the true top-n has a
    listed score <= its max, which is below the n-th max score (or ties it with a larger
    id). So the merge's first n are the true top-n by max, with their max scores; the two
    differ only among items of exactly equal score (ComiRec keeps list order there, this op
    the smaller id, which can also change which tied item takes the n-th place).
    Inference only: no autograd (outputs never require grad). On GPUs fp32 inputs use
    3xTF32 dots (fp32-level error) unless torch's fp32 matmul precision allows tf32.
    """
    exclude = _validate(interests, items, n, interest_mask, exclude)
    be = _backend.resolve(OP, backend, interests.device)
    with torch.no_grad():
        return _multi_interest_topk_op(interests.detach(), items.detach(), n, interest_mask,
                                       exclude, be)
