"""Negative samplers for ``sampled_softmax_loss``, with exact log-probabilities.

Every sampler draws item ids i.i.d. *with replacement* from a fixed distribution q over
[0, n_items) and reports ``log q(id)`` — the per-draw probability. For the logQ correction
(Yi et al. 2019) subtract ``log_q`` as is; TensorFlow's sampled softmax subtracts the log of
the *expected count* instead, ``log(S·q)`` (:meth:`Sampler.log_expected_count`). Both are
exact; which to use is a modelling choice.

* :class:`UniformSampler`: q = 1/N.
* :class:`PopularitySampler`: q ∝ count^α (GRU4Rec's ``sample_alpha``; α=0 uniform, α=1
  proportional to popularity). Inverse-CDF sampling (``searchsorted`` on the device).
* :class:`LogUniformSampler`: TensorFlow's log-uniform (Zipfian) sampler, the one ComiRec trains
  with: ids must be sorted by decreasing popularity, q(k) = log((k+2)/(k+1)) / log(N+1).
* :class:`SampleCache`: pre-draws a large block on the device and hands out slices, so the
  training loop never waits for the host or launches a sampling kernel per step.

All sampling runs on the sampler's device with an optional ``torch.Generator`` on that device;
nothing synchronises with the host.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def _check_n(n_items) -> int:
    if isinstance(n_items, bool) or not isinstance(n_items, int):
        raise TypeError(f"n_items must be an int, got {type(n_items).__name__}")
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    return n_items


def _check_num(num) -> int:
    if isinstance(num, bool) or not isinstance(num, int):
        raise TypeError(f"num_samples must be an int, got {type(num).__name__}")
    if num < 0:
        raise ValueError(f"num_samples must be >= 0, got {num}")
    return num


class Sampler:
    """Base class: ``sample(num) -> (ids (num,) int64, log_q (num,) fp32)``."""

    n_items: int
    device: torch.device

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None
               ) -> Tuple[Tensor, Tensor]:
        ids = self._draw(_check_num(num_samples), generator)
        return ids, self.log_prob(ids)

    def sample_shape(self, shape, generator: Optional[torch.Generator] = None):
        """Samples of any shape, e.g. (batch, S) for per-row negatives."""
        shape = tuple(shape)
        n = math.prod(shape)
        ids, lq = self.sample(n, generator)
        return ids.view(shape), lq.view(shape)

    def log_prob(self, ids: Tensor) -> Tensor:
        """Exact log q(id) (fp32) for int64 ids in [0, n_items)."""
        raise NotImplementedError

    def probs(self) -> Tensor:
        """q over the whole catalog, (n_items,) float64 (for tests and small catalogs)."""
        return self.log_prob(torch.arange(self.n_items, device=self.device)).double().exp()

    @staticmethod
    def log_expected_count(log_q: Tensor, num_samples: int) -> Tensor:
        """log(S·q): TensorFlow's correction for S draws with replacement."""
        return log_q + math.log(num_samples)

    def _draw(self, num: int, generator) -> Tensor:
        raise NotImplementedError


class UniformSampler(Sampler):
    def __init__(self, n_items: int, device="cpu"):
        self.n_items = _check_n(n_items)
        self.device = torch.device(device)

    def _draw(self, num, generator):
        return torch.randint(0, self.n_items, (num,), device=self.device, generator=generator)

    def log_prob(self, ids):
        return torch.full(ids.shape, -math.log(self.n_items), device=ids.device,
                          dtype=torch.float32)


class PopularitySampler(Sampler):
    """q(i) ∝ counts[i]^alpha. counts: (n_items,) non-negative, at least one positive."""

    def __init__(self, counts, alpha: float = 1.0, device=None):
        counts = torch.as_tensor(counts)
        if counts.dim() != 1 or counts.numel() == 0:
            raise ValueError(f"counts must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
        device = torch.device(device) if device is not None else counts.device
        c = counts.to(device=device, dtype=torch.float64)
        if bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
            raise ValueError("counts must be finite and non-negative")
        w = torch.where(c > 0, c.pow(float(alpha)), torch.zeros_like(c))
        total = w.sum()
        if not bool(total > 0):
            raise ValueError("counts must have at least one positive entry")
        self.n_items = counts.numel()
        self.device = device
        self.alpha = float(alpha)
        p = w / total
        self._logp = torch.log(p).float()                      # -inf for count 0
        cdf = torch.cumsum(p, 0)
        cdf[-1] = 1.0
        self._cdf = cdf                                         # float64: exact enough for 1e8 items

    def _draw(self, num, generator):
        u = torch.rand(num, device=self.device, dtype=torch.float64, generator=generator)
        ids = torch.searchsorted(self._cdf, u, right=True)
        return ids.clamp_(max=self.n_items - 1)

    def log_prob(self, ids):
        return self._logp[ids]


class LogUniformSampler(Sampler):
    """TensorFlow's log-uniform candidate sampler over ids sorted by decreasing popularity:
    q(k) = (log(k+2) - log(k+1)) / log(N+1)."""

    def __init__(self, n_items: int, device="cpu"):
        self.n_items = _check_n(n_items)
        self.device = torch.device(device)
        self._log_range = math.log(self.n_items + 1)

    def _draw(self, num, generator):
        u = torch.rand(num, device=self.device, dtype=torch.float64, generator=generator)
        # inverse CDF: P(id <= k) = log(k+2)/log(N+1)  ->  k = floor(exp(u·log(N+1))) - 1
        ids = torch.floor(torch.exp(u * self._log_range)).long() - 1
        return ids.clamp_(0, self.n_items - 1)

    def log_prob(self, ids):
        k = ids.double()
        return (torch.log(torch.log1p(1.0 / (k + 1.0))) - math.log(self._log_range)).float()


class SampleCache:
    """Hands out slices of a large pre-drawn block of samples, refilled on the device.

    >>> cache = SampleCache(LogUniformSampler(10**6, device="cuda"), block=1 << 22)
    >>> ids, log_q = cache.next(8192)          # views into the block, no host sync

    The position in the block is a Python int, so handing out a slice is pure indexing; a
    refill is one sampling launch per ``block`` samples. Slices stay valid after a refill
    (a new block is allocated rather than overwritten).
    """

    def __init__(self, sampler: Sampler, block: int = 1 << 20,
                 generator: Optional[torch.Generator] = None):
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a Sampler, got {type(sampler).__name__}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        self.sampler = sampler
        self.block = block
        self.generator = generator
        self.refills = 0
        self._ids: Optional[Tensor] = None
        self._lq: Optional[Tensor] = None
        self._pos = block

    def _refill(self):
        self._ids, self._lq = self.sampler.sample(self.block, self.generator)
        self._pos = 0
        self.refills += 1

    def next(self, num_samples: int) -> Tuple[Tensor, Tensor]:
        """-> (ids (num,), log_q (num,)): the next ``num_samples`` draws."""
        num = _check_num(num_samples)
        if num > self.block:
            return self.sampler.sample(num, self.generator)
        if self._pos + num > self.block:
            self._refill()
        s = slice(self._pos, self._pos + num)
        self._pos += num
        return self._ids[s], self._lq[s]

    def next_shape(self, shape) -> Tuple[Tensor, Tensor]:
        shape = tuple(shape)
        ids, lq = self.next(math.prod(shape))
        return ids.view(shape), lq.view(shape)
