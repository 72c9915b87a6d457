"""Negative samplers: exact log-probabilities, sampled frequencies (chi-square), the cache."""
from __future__ import annotations

import math

import pytest
import torch

from seqrec_fast.ops.samplers import (LogUniformSampler, PopularitySampler, SampleCache,
                                      UniformSampler)
from seqrec_fast.ops.sampled_softmax import sampled_softmax_loss

N = 40
COUNTS = torch.tensor([float((i * 7919) % 53 + (0 if i % 9 == 4 else 1)) for i in range(N)])
COUNTS[5] = 0.0  # never sampled


def samplers(device="cpu"):
    return {
        "uniform": UniformSampler(N, device=device),
        "pop1": PopularitySampler(COUNTS, alpha=1.0, device=device),
        "pop075": PopularitySampler(COUNTS, alpha=0.75, device=device),
        "pop0": PopularitySampler(COUNTS, alpha=0.0, device=device),
        "loguniform": LogUniformSampler(N, device=device),
    }


def expected_probs(name):
    if name == "uniform":
        return torch.full((N,), 1.0 / N, dtype=torch.float64)
    if name.startswith("pop"):
        alpha = {"pop1": 1.0, "pop075": 0.75, "pop0": 0.0}[name]
        c = COUNTS.double()
        w = torch.where(c > 0, c.pow(alpha), torch.zeros_like(c))
        return w / w.sum()
    k = torch.arange(N, dtype=torch.float64)
    return (torch.log(k + 2) - torch.log(k + 1)) / math.log(N + 1)  # TensorFlow's formula


@pytest.mark.parametrize("name", ["uniform", "pop1", "pop075", "pop0", "loguniform"])
def test_exact_log_probabilities(name):
    s = samplers()[name]
    want = expected_probs(name)
    got = s.probs()
    assert abs(got.sum().item() - 1.0) < 1e-6
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9)
    ids, lq = s.sample(1000, generator=torch.Generator().manual_seed(1))
    assert ids.dtype == torch.int64 and lq.dtype == torch.float32
    assert torch.equal(lq, s.log_prob(ids))
    assert torch.allclose(lq.double().exp(), want[ids], rtol=1e-5)


@pytest.mark.parametrize("name", ["uniform", "pop1", "pop075", "pop0", "loguniform"])
def test_frequencies_chi_square(name):
    s = samplers()[name]
    n = 400_000
    ids, _ = s.sample(n, generator=torch.Generator().manual_seed(123))
    assert int(ids.min()) >= 0 and int(ids.max()) < N
    counts = torch.bincount(ids, minlength=N).double()
    p = expected_probs(name)
    support = p > 0
    assert counts[~support].sum() == 0, "an item with probability 0 was drawn"
    exp = p[support] * n
    chi2 = ((counts[support] - exp) ** 2 / exp).sum().item()
    dof = int(support.sum()) - 1
    # P(chi2 > dof + 6·sqrt(2·dof)) is far below 1e-4 for these dof; the seed is fixed anyway
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_loguniform_large_catalog_tail():
    s = LogUniformSampler(10**7)
    ids, lq = s.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert int(ids.max()) < 10**7 and int(ids.min()) >= 0
    # P(id < 100) = log(101) / log(1e7 + 1)
    frac = (ids < 100).double().mean().item()
    want = math.log(101) / math.log(10**7 + 1)
    assert abs(frac - want) < 0.01
    assert torch.allclose(lq.double().exp(),
                          (torch.log(ids.double() + 2) - torch.log(ids.double() + 1))
                          / math.log(10**7 + 1), rtol=1e-4)


def test_sample_shape_and_expected_count():
    s = UniformSampler(N)
    ids, lq = s.sample_shape((3, 5))
    assert ids.shape == (3, 5) and lq.shape == (3, 5)
    assert torch.allclose(s.log_expected_count(lq, 5), torch.full((3, 5), math.log(5 / N)))


def test_sample_cache_slices_one_stream():
    s = PopularitySampler(COUNTS, alpha=0.5)
    cache = SampleCache(s, block=100, generator=torch.Generator().manual_seed(7))
    got = [cache.next(30) for _ in range(3)]
    ref_ids, ref_lq = s.sample(100, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.cat([g[0] for g in got]), ref_ids[:90])
    assert torch.equal(torch.cat([g[1] for g in got]), ref_lq[:90])
    assert cache.refills == 1
    ids4, _ = cache.next(30)  # does not fit in the 10 left: a new block
    assert cache.refills == 2 and ids4.shape == (30,)
    assert torch.equal(got[0][0], ref_ids[:30])  # earlier slices are untouched by the refill
    ids, lq = cache.next_shape((2, 4))
    assert ids.shape == (2, 4)
    big, _ = cache.next(1000)  # larger than a block: drawn directly
    assert big.shape == (1000,)


def test_sampler_feeds_sampled_softmax():
    s = LogUniformSampler(N)
    neg, lq = s.sample(16, generator=torch.Generator().manual_seed(0))
    user = torch.randn(6, 8, requires_grad=True)
    items = torch.randn(N, 8, requires_grad=True)
    target = torch.randint(0, N, (6,))
    loss = sampled_softmax_loss(user, items, target, neg, log_q=lq,
                                target_log_q=s.log_prob(target), backend="eager")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(items.grad).all()


class TestBadInput:
    def test_n_items(self):
        with pytest.raises(ValueError, match="n_items"):
            UniformSampler(0)
        with pytest.raises(TypeError, match="n_items"):
            LogUniformSampler(10.0)

    def test_counts(self):
        with pytest.raises(ValueError, match="counts"):
            PopularitySampler(torch.tensor([1.0, -1.0]))
        with pytest.raises(ValueError, match="counts"):
            PopularitySampler(torch.zeros(3))
        with pytest.raises(ValueError, match="counts"):
            PopularitySampler(torch.ones(2, 2))
        with pytest.raises(TypeError, match="alpha"):
            PopularitySampler(torch.ones(3), alpha="1")

    def test_cache_and_num(self):
        with pytest.raises(TypeError, match="sampler"):
            SampleCache(object())
        with pytest.raises(ValueError, match="block"):
            SampleCache(UniformSampler(3), block=0)
        with pytest.raises(ValueError, match="num_samples"):
            UniformSampler(3).sample(-1)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["uniform", "pop075", "loguniform"])
def test_cuda_cache_never_syncs(name):
    s = samplers("cuda")[name]
    cache = SampleCache(s, block=1 << 16, generator=torch.Generator(device="cuda").manual_seed(0))
    cache.next(10)  # the first block (allocation) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            ids, lq = cache.next(8192)
            assert ids.is_cuda and lq.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode("default")
    counts = torch.bincount(s.sample(200_000)[0], minlength=N).double().cpu()
    p = expected_probs(name)
    support = p > 0
    exp = p[support] * 200_000
    dof = int(support.sum()) - 1
    assert ((counts[support] - exp) ** 2 / exp).sum().item() < dof + 6 * math.sqrt(2 * dof)
