"""sampled_softmax_loss and bpr_max_loss: every backend against the float64 reference.

Triton runs through the interpreter on CPU (tiny shapes: it is slow); the C++ kernel gets the
odd shapes, float64 exactness and gradcheck; cuda-marked tests take the big shapes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _util import assert_close, compare_three, fused_backends, grads_of, need_cpp
from seqrec_fast.ops.sampled_softmax import (_sampled_softmax_fwd_op, bpr_max_loss,
                                             sampled_softmax_loss)
from seqrec_fast.reference.sampled_softmax import sampled_softmax_ref

OP = "sampled_softmax"
FUSED = fused_backends(OP)


def make_sampled(b, n, d, s, *, per_row=False, hits=True, log_q=True, seed=0, device="cpu"):
    """Inputs with accidental hits on purpose: repeated targets in the batch, negatives equal to
    a row's target (several times), duplicated negatives."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(b, d, generator=g, dtype=torch.float64) * 0.5
    items = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5
    target = torch.randint(0, n, (b,), generator=g)
    shape = (b, s) if per_row else (s,)
    neg = torch.randint(0, n, shape, generator=g)
    if hits and b > 1:
        target[1] = target[0]
    if hits and s >= 3:
        if per_row:
            neg[0, :2] = target[0]
            neg[-1, 1] = target[-1]
            neg[:, 2] = neg[:, 0]
        else:
            neg[0] = neg[1] = target[0]
            neg[2] = neg[-1]
    lq = torch.randn(shape, generator=g, dtype=torch.float64) - 3 if log_q else None
    tlq = torch.randn(b, generator=g, dtype=torch.float64) - 3 if log_q else None
    gout = torch.randn(b, generator=g, dtype=torch.float64)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(user), mv(items), mv(target), mv(neg), mv(lq), mv(tlq), mv(gout)


def _sampled_fn(backend, target, neg, lq, tlq, **kw):
    kw.setdefault("reduction", "none")

    def ours(user, items):
        return sampled_softmax_loss(user, items, target, neg, log_q=lq, target_log_q=tlq,
                                    backend=backend, **kw)

    def ref(user, items):
        return sampled_softmax_ref(user, items, target, neg,
                                   log_q=None if lq is None else lq.to(user.dtype),
                                   target_log_q=None if tlq is None else tlq.to(user.dtype), **kw)

    return ours, ref


SAMPLED_CASES = [  # (B, N, d, S, per_row, in_batch, remove_hits, log_q)
    (6, 40, 24, 9, False, True, True, True),
    (6, 40, 24, 9, False, True, False, False),
    (6, 40, 24, 9, False, False, True, True),
    (5, 30, 16, 7, True, True, True, True),
    (5, 30, 16, 7, True, False, False, True),
    (5, 30, 16, 7, True, False, True, False),
    (1, 3, 8, 1, False, True, True, False),
    (3, 25, 123, 40, False, True, True, True),
]


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
@pytest.mark.parametrize("case", SAMPLED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sampled_fp32_matches_reference(backend, case):
    b, n, d, s, per_row, in_batch, hits, with_lq = case
    user, items, target, neg, lq, tlq, gout = make_sampled(b, n, d, s, per_row=per_row,
                                                           log_q=with_lq)
    ours, ref = _sampled_fn(backend, target, neg, lq, tlq, in_batch_negatives=in_batch,
                            remove_accidental_hits=hits, temperature=0.7)
    compare_three(ours, ref, [user, items], gout, torch.float32, f"{backend} {case}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_row", [False, True])
def test_sampled_half_precision(backend, dtype, per_row):
    user, items, target, neg, lq, tlq, gout = make_sampled(8, 50, 32, 12, per_row=per_row)
    ours, ref = _sampled_fn(backend, target, neg, lq, tlq)
    compare_three(ours, ref, [user, items], gout, dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sampled_reductions(backend, reduction):
    user, items, target, neg, lq, tlq, _ = make_sampled(5, 30, 8, 6)
    ours, ref = _sampled_fn(backend, target, neg, lq, tlq, reduction=reduction)
    compare_three(ours, ref, [user, items], None, torch.float32, f"{backend} {reduction}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("per_row", [False, True])
def test_sampled_non_contiguous_inputs(backend, per_row):
    user, items, target, neg, lq, tlq, _ = make_sampled(5, 30, 8, 6, per_row=per_row)
    target2 = torch.stack([target, target], 1)[:, 1]
    neg2 = torch.stack([neg, neg], -1)[..., 0]
    lq2 = torch.stack([lq, lq], -1)[..., 1]
    tlq2 = torch.stack([tlq, tlq], -1)[..., 0]
    got = sampled_softmax_loss(user.float(), items.T.contiguous().T.float(), target2, neg2,
                               log_q=lq2.float(), target_log_q=tlq2.float(), reduction="none",
                               backend=backend)
    want = sampled_softmax_ref(user, items, target, neg, log_q=lq, target_log_q=tlq,
                               reduction="none")
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="non-contiguous")


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
def test_accidental_hits_are_removed_not_zeroed(backend):
    """Hand-computed: row 0 and row 1 share target 3; negatives [3, 3, 5, 5]."""
    d = 4
    items = torch.randn(8, d, dtype=torch.float64)
    user = torch.randn(2, d, dtype=torch.float64)
    target = torch.tensor([3, 3])
    neg = torch.tensor([3, 3, 5, 5])
    z = user @ items.T
    loss = sampled_softmax_loss(user.float(), items.float(), target, neg, reduction="none",
                                backend=backend).double()
    # kept candidates of each row: its positive and the two copies of item 5 (the other row's
    # target is item 3 too, so it is removed as well)
    want = torch.logsumexp(torch.stack([z[:, 3], z[:, 5], z[:, 5]], 1), 1) - z[:, 3]
    assert_close(loss, want, atol=1e-5, name="removed hits")
    zeroed = torch.logsumexp(torch.stack([z[:, 3], z[:, 5], z[:, 5], 0 * z[:, 3],
                                          0 * z[:, 3], 0 * z[:, 3]], 1), 1) - z[:, 3]
    assert (loss - zeroed).abs().min() > 1e-3  # replacing by a zero vector would differ
    # without removal every copy of item 3 counts: 2 negatives + the other row's target
    kept = sampled_softmax_loss(user.float(), items.float(), target, neg, reduction="none",
                                remove_accidental_hits=False, backend=backend).double()
    want_kept = torch.logsumexp(torch.stack([z[:, 3]] * 4 + [z[:, 5], z[:, 5]], 1), 1) - z[:, 3]
    assert_close(kept, want_kept, atol=1e-5, name="hits kept")


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
def test_log_q_semantics(backend):
    """Shared log_q shifts each sample's logit; target_log_q shifts the positive and its in-batch
    column for every other row."""
    d = 4
    items = torch.randn(6, d, dtype=torch.float64)
    user = torch.randn(2, d, dtype=torch.float64)
    target = torch.tensor([0, 1])
    neg = torch.tensor([4, 5])
    lq = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    tlq = torch.tensor([-0.5, -1.5], dtype=torch.float64)
    z = user @ items.T
    loss = sampled_softmax_loss(user.float(), items.float(), target, neg, log_q=lq.float(),
                                target_log_q=tlq.float(), reduction="none",
                                backend=backend).double()
    row0 = torch.stack([z[0, 0] + 0.5, z[0, 4] + 1.0, z[0, 5] + 2.0, z[0, 1] + 1.5])
    row1 = torch.stack([z[1, 1] + 1.5, z[1, 4] + 1.0, z[1, 5] + 2.0, z[1, 0] + 0.5])
    want = torch.stack([torch.logsumexp(row0, 0) - row0[0], torch.logsumexp(row1, 0) - row1[0]])
    assert_close(loss, want, atol=1e-5, name="log_q")


@pytest.mark.parametrize("backend", FUSED)
def test_sampled_opcheck(backend):
    for per_row in (False, True):
        user, items, target, neg, lq, tlq, _ = make_sampled(4, 20, 8, 5, per_row=per_row)
        user = user.float().requires_grad_(True)
        items = items.float().requires_grad_(True)
        torch.library.opcheck(_sampled_softmax_fwd_op,
                              (user, items, target, neg, lq.float(), tlq.float(), True, True,
                               0.5, True, backend))


def test_sampled_torch_compile_fullgraph():
    backend = FUSED[0] if FUSED else "eager"
    torch._dynamo.reset()
    user, items, target, neg, lq, tlq, _ = make_sampled(5, 30, 8, 6)
    user, items, lq, tlq = user.float(), items.float(), lq.float(), tlq.float()

    def loss_fn(u, w):
        return sampled_softmax_loss(u, w, target, neg, log_q=lq, target_log_q=tlq,
                                    backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    got = grads_of(compiled, [user, items], None)
    want = grads_of(loss_fn, [user, items], None)
    for name, a, e in zip(("loss", "du", "dw"), got, want):
        assert_close(a, e, atol=1e-6, rtol=1e-5, name=f"compiled {name}")


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("in_batch", [False, True])
def test_sampled_cpp_float64_exact_and_gradcheck(per_row, in_batch):
    need_cpp(FUSED)
    user, items, target, neg, lq, tlq, gout = make_sampled(6, 20, 5, 7, per_row=per_row)
    ours, ref = _sampled_fn("cpp", target, neg, lq, tlq, in_batch_negatives=in_batch,
                            temperature=0.8)
    got = grads_of(ours, [user, items], gout)
    want = grads_of(ref, [user, items], gout)
    for name, a, e in zip(("loss", "du", "dw"), got, want):
        assert a.dtype == torch.float64
        assert_close(a, e, atol=1e-12, rtol=1e-10, name=name)
    args = tuple(t.clone().requires_grad_(True) for t in (user, items))
    assert torch.autograd.gradcheck(ours, args, eps=1e-6, atol=1e-7)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 12), n=st.integers(1, 40), d=st.integers(1, 33), s=st.integers(1, 20),
       per_row=st.booleans(), in_batch=st.booleans(), hits=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sampled_hypothesis(b, n, d, s, per_row, in_batch, hits, seed):
    backend = "triton" if "triton" in FUSED else "eager"
    user, items, target, neg, lq, tlq, gout = make_sampled(b, n, d, s, per_row=per_row,
                                                           seed=seed)
    ours, ref = _sampled_fn(backend, target, neg, lq, tlq, in_batch_negatives=in_batch,
                            remove_accidental_hits=hits)
    compare_three(ours, ref, [user, items], gout, torch.float32, f"{backend}")


class TestSampledBadInput:
    def args(self):
        return torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 3]), torch.tensor([4, 5])

    def test_negatives(self):
        u, w, t, n = self.args()
        with pytest.raises(ValueError, match="negatives"):
            sampled_softmax_loss(u, w, t, torch.tensor([4, 10]))
        with pytest.raises(ValueError, match="negatives"):
            sampled_softmax_loss(u, w, t, torch.tensor([-1, 2]))
        with pytest.raises(TypeError, match="negatives"):
            sampled_softmax_loss(u, w, t, n.int())
        with pytest.raises(TypeError, match="negatives"):
            sampled_softmax_loss(u, w, t, n.float())
        with pytest.raises(ValueError, match="S = 0"):
            sampled_softmax_loss(u, w, t, n[:0])
        with pytest.raises(ValueError, match="S = 0"):
            sampled_softmax_loss(u, w, t, torch.zeros(3, 0, dtype=torch.int64))
        with pytest.raises(ValueError, match="negatives"):
            sampled_softmax_loss(u, w, t, torch.zeros(2, 4, dtype=torch.int64))
        with pytest.raises(ValueError, match="negatives"):
            sampled_softmax_loss(u, w, t, torch.zeros(3, 4, 1, dtype=torch.int64))

    def test_target(self):
        u, w, t, n = self.args()
        with pytest.raises(ValueError, match="target"):
            sampled_softmax_loss(u, w, torch.tensor([1, 2, 10]), n)
        with pytest.raises(TypeError, match="target"):
            sampled_softmax_loss(u, w, t.int(), n)

    def test_log_q(self):
        u, w, t, n = self.args()
        with pytest.raises(ValueError, match="log_q"):
            sampled_softmax_loss(u, w, t, n, log_q=torch.zeros(3))
        with pytest.raises(TypeError, match="log_q"):
            sampled_softmax_loss(u, w, t, n, log_q=torch.zeros(2, dtype=torch.int64))
        with pytest.raises(ValueError, match="target_log_q"):
            sampled_softmax_loss(u, w, t, n, target_log_q=torch.zeros(2))

    def test_options(self):
        u, w, t, n = self.args()
        with pytest.raises(TypeError, match="in_batch_negatives"):
            sampled_softmax_loss(u, w, t, n, in_batch_negatives=1)
        with pytest.raises(TypeError, match="remove_accidental_hits"):
            sampled_softmax_loss(u, w, t, n, remove_accidental_hits="yes")
        with pytest.raises(ValueError, match="temperature"):
            sampled_softmax_loss(u, w, t, n, temperature=-1.0)
        with pytest.raises(ValueError, match="reduction"):
            sampled_softmax_loss(u, w, t, n, reduction="batchmean")
        with pytest.raises(ValueError, match="user"):
            sampled_softmax_loss(u[:0], w, t[:0], n)
        with pytest.raises(RuntimeError, match="cuda"):
            sampled_softmax_loss(u, w, t, n, backend="cuda")



# ----------------------------------------------------------------------------------------------
# BPR-max
# ----------------------------------------------------------------------------------------------
def test_bpr_max_matches_formula():
    d = 4
    items = torch.randn(6, d, dtype=torch.float64)
    user = torch.randn(2, d, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 0])
    neg = torch.tensor([0, 4, 5])
    loss = bpr_max_loss(user, items, target, neg, reg=0.5, reduction="none")
    z = (user @ items.T).detach()
    for b in range(2):
        r = torch.stack([z[b, 4], z[b, 5]])  # the hit (item 0) and the other row's target: removed
        s = torch.softmax(r, 0)
        want = -torch.log((s * torch.sigmoid(z[b, 0] - r)).sum()) + 0.5 * (s * r * r).sum()
        assert abs(loss[b].item() - want.item()) < 1e-10
    loss.sum().backward()
    assert torch.isfinite(user.grad).all()
    with pytest.raises(ValueError, match="backend"):
        bpr_max_loss(user, items, target, neg, backend="triton")



# ----------------------------------------------------------------------------------------------
# GPU: big shapes, true bf16 tensor-core paths
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_sampled_cuda_large(dtype, per_row):
    torch.set_float32_matmul_precision("highest")
    b, n, d, s = (1024, 50000, 64, 2048) if not per_row else (512, 20000, 64, 64)
    user, items, target, neg, lq, tlq, gout = make_sampled(b, n, d, s, per_row=per_row,
                                                           device="cuda")
    ours, ref = _sampled_fn("triton", target, neg, lq, tlq, temperature=0.5)
    compare_three(ours, ref, [user, items], gout, dtype, f"cuda sampled {dtype}")



def test_sampled_cpp_item_gradient_is_deterministic():
    """Shared negatives with heavily repeated ids over many chunks and threads: the C++ item
    gradient is summed in column order, the same bits on every run."""
    if "cpp" not in FUSED:
        pytest.skip("C++ extension not built")
    n = torch.get_num_threads()
    torch.set_num_threads(8)                      # more threads than cores: varied interleaving
    try:
        g = torch.Generator().manual_seed(0)
        B, N, S, d = 4096, 12, 2048, 8            # 2^18 / B = 64 columns per chunk: 32 chunks
        user = torch.randn(B, d, generator=g)
        items = torch.randn(N, d, generator=g)
        target = torch.randint(0, N, (B,), generator=g)
        neg = torch.randint(0, N, (S,), generator=g)
        grads = []
        for _ in range(4):
            w = items.clone().requires_grad_()
            sampled_softmax_loss(user, w, target, neg, backend="cpp").backward()
            grads.append(w.grad)
        for other in grads[1:]:
            assert torch.equal(grads[0], other)
    finally:
        torch.set_num_threads(n)



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_sampled_eager_reference_accumulates_in_fp32(dtype, per_row):
    """The eager oracle computes in fp32 for half inputs: each row's loss is the float64 truth
    (of the half-rounded inputs) rounded once to the input dtype, not a sum of half-rounded
    logits; its gradients reach the half leaves in their dtype."""
    user, items, target, neg, lq, tlq, _ = make_sampled(64, 500, 16, 20, per_row=per_row)
    user, items = (user * 8).to(dtype), (items * 8).to(dtype)  # logits of several hundred
    lq, tlq = lq.to(dtype), tlq.to(dtype)
    kw = dict(log_q=lq, target_log_q=tlq, temperature=0.5, reduction="none")
    truth = sampled_softmax_ref(user.double(), items.double(), target, neg,
                                **{**kw, "log_q": lq.double(), "target_log_q": tlq.double()})
    u, w = user.clone().requires_grad_(), items.clone().requires_grad_()
    got = sampled_softmax_ref(u, w, target, neg, **kw)
    assert got.dtype == dtype and torch.isfinite(got).all()
    ulp = torch.finfo(dtype).eps * truth.abs().clamp_min(1.0)
    err = (got.double() - truth).abs()
    assert (err <= ulp).all(), f"max err {err.max():.3e}, {int((err > ulp).sum())} rows > 1 ulp"
    got.sum().backward()
    assert u.grad.dtype == dtype and torch.isfinite(u.grad).all() and torch.isfinite(w.grad).all()


# ----------------------------------------------------------------------------------------------
# validation compiled or not, autocast
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager"] + FUSED)
def test_sampled_validation_is_the_same_compiled(backend):
    u, w = torch.randn(3, 8), torch.randn(10, 8)
    t, neg = torch.tensor([1, 2, 3]), torch.tensor([4, 5])

    def fn(u, w, t, neg):
        return sampled_softmax_loss(u, w, t, neg, backend=backend)

    for args, exc, match in [((u, w, torch.tensor([1, 10, 2]), neg), ValueError, "target"),
                             ((u, w, t, torch.tensor([4, -1])), ValueError, "negatives"),
                             ((u, w, t, torch.tensor([[4, 11]] * 3)), ValueError, "negatives"),
                             ((u, w, t, torch.tensor([[4, 5]] * 2)), ValueError, "negatives"),
                             ((u, w, t[:2], neg), ValueError, "target"),
                             ((u, w, t, neg.int()), TypeError, "negatives")]:
        with pytest.raises(exc, match=match):
            fn(*args)
        torch._dynamo.reset()
        with pytest.raises(exc, match=match):
            torch.compile(fn, fullgraph=True, backend="inductor")(*args)


def test_bpr_max_validation_is_the_same_compiled():
    u, w, t = torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 3])

    def fn(u, w, t, neg):
        return bpr_max_loss(u, w, t, neg)

    for neg, exc in [(torch.tensor([4, 11]), ValueError), (torch.tensor([4, 5]).int(), TypeError)]:
        with pytest.raises(exc, match="negatives"):
            fn(u, w, t, neg)
        torch._dynamo.reset()
        with pytest.raises(exc, match="negatives"):
            torch.compile(fn, fullgraph=True, backend="inductor")(u, w, t, neg)


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
@pytest.mark.parametrize("per_row", [False, True])
def test_sampled_cpu_autocast_bf16(backend, per_row):
    """CPU bf16 autocast: embeddings cast to bf16, loss in fp32, gradients reach the fp32
    parameters; values within bf16 tolerance of the float64 truth."""
    user, items, target, neg, lq, tlq, _ = make_sampled(6, 40, 16, 9, per_row=per_row)
    u = user.float().requires_grad_()
    w = items.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sampled_softmax_loss(u, w, target, neg, log_q=lq.float(),
                                    target_log_q=tlq.float(), backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert u.grad.dtype == w.grad.dtype == torch.float32
    u2, w2 = user.clone().requires_grad_(), items.clone().requires_grad_()
    want = sampled_softmax_ref(u2, w2, target, neg, log_q=lq, target_log_q=tlq)
    want.backward()
    assert abs(loss.item() - want.item()) < 2e-2 * max(1.0, abs(want.item()))
    for name, a, e in (("du", u.grad, u2.grad), ("dw", w.grad, w2.grad)):
        assert_close(a, e, atol=2e-2 * max(1.0, e.abs().max().item()), rtol=0, name=name)
    u3, w3 = u.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # backward inside the region: the same
        sampled_softmax_loss(u3, w3, target, neg, log_q=lq.float(), target_log_q=tlq.float(),
                             backend=backend).backward()
    for a, e in ((u3.grad, u.grad), (w3.grad, w.grad)):
        if backend == "eager":  # torch autograd: autocast recasts its backward matmuls
            assert_close(a, e, atol=2e-2 * max(1.0, e.abs().max().item()), rtol=0)
        else:                   # the fused kernels are not recast: the same bits
            assert torch.equal(a, e)


def test_sampled_cpp_per_row_item_gradient_is_deterministic():
    """Per-row negatives with heavily repeated ids over many chunks, 2 threads, reduction
    "none": the C++ item gradient is scatter-added in chunk order, the same bits on every run
    (it used to be added under a mutex in thread arrival order)."""
    if "cpp" not in FUSED:
        pytest.skip("C++ extension not built")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        B, N, S, d = 1024, 12, 256, 16            # 2^18 / (B·d) = 16 samples per chunk: 16 chunks
        user = torch.randn(B, d, generator=g)
        items = torch.randn(N, d, generator=g)
        target = torch.randint(0, N, (B,), generator=g)
        neg = torch.randint(0, N, (B, S), generator=g)
        gout = torch.randn(B, generator=g)
        grads = []
        for _ in range(8):
            w = items.clone().requires_grad_()
            u = user.clone().requires_grad_()
            loss = sampled_softmax_loss(u, w, target, neg, reduction="none", backend="cpp")
            loss.backward(gout)
            grads.append((w.grad, u.grad))
        for w_grad, u_grad in grads[1:]:
            assert torch.equal(grads[0][0], w_grad)
            assert torch.equal(grads[0][1], u_grad)
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# non-finite inputs: one behaviour on every backend
# ----------------------------------------------------------------------------------------------
def _loss_and_grads(fn, user, items):
    u, w = user.clone().requires_grad_(), items.clone().requires_grad_()
    loss = fn(u, w)
    loss.sum().backward()
    return loss.detach(), u.grad, w.grad


@pytest.mark.parametrize("per_row", [False, True])
def test_sampled_log_q_minus_inf_gives_inf_loss_everywhere(per_row):
    """A negative with log_q = -inf (sampling probability 0) has a +inf corrected logit: the
    loss of every row that sees it is +inf on every backend (Triton used to give NaN); the
    gradients of those rows are NaN (inf - inf), at the same places on every backend."""
    user, items, target, neg, lq, _, _ = make_sampled(4, 20, 8, 5, per_row=per_row, hits=False)
    user, items, lq = user.float(), items.float(), lq.float()
    if per_row:
        lq[1, 2] = float("-inf")
    else:
        lq[2] = float("-inf")
    outs = {}
    for be in ["eager"] + FUSED:
        outs[be] = _loss_and_grads(
            lambda u, w, be=be: sampled_softmax_loss(u, w, target, neg, log_q=lq,
                                                     reduction="none", backend=be), user, items)
    want_inf = torch.ones(4, dtype=torch.bool) if not per_row else torch.arange(4) == 1
    for be, (loss, du, dw) in outs.items():
        assert torch.equal(torch.isposinf(loss), want_inf), (be, loss)
        assert torch.isfinite(loss[~want_inf]).all(), be
        assert torch.equal(torch.isnan(du), torch.isnan(outs["eager"][1])), be
        assert torch.equal(torch.isnan(dw), torch.isnan(outs["eager"][2])), be


def test_sampled_tiny_temperature_is_finite_everywhere():
    """temperature = 1e-30: logits of ±1e30 (one row entirely below -1e30, the old finite
    "-inf" of the Triton online softmax); loss and gradients are finite and agree across
    backends (Triton item gradients used to be NaN/inf)."""
    user, items, target, neg, _, _, _ = make_sampled(4, 20, 8, 5, hits=False)
    user, items = user.float(), items.float()
    items[:, 0] += 5.0
    user[0] = 0.0
    user[0, 0] = -1.0                          # u_0·w_j ≈ -5 for every item: logits ≈ -5e30
    outs = {be: _loss_and_grads(lambda u, w, be=be: sampled_softmax_loss(
        u, w, target, neg, temperature=1e-30, reduction="none", backend=be), user, items)
        for be in ["eager"] + FUSED}
    ref = outs["eager"]
    for be, got in outs.items():
        for name, a, e in zip(("loss", "du", "dw"), got, ref):
            assert torch.isfinite(a).all(), (be, name)
            scale = e.abs().max().item()
            assert (a - e).abs().max().item() <= 1e-4 * scale, (be, name)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_triton_backward_touches_only_candidate_rows(per_row, dtype):
    """The Triton backward accumulates per distinct candidate in a compact fp32 table and
    scatters it into the dense item gradient in the items' dtype: no fp32 (N, d) temporary
    (it used to zero-fill one and cast it, 256 MB at 1M items, d 64). (The C++ backward does
    the same; its ATen calls are not visible to a Python dispatch mode, so only the values are
    tested for it.)"""
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    backend = "triton"
    from torch.utils._python_dispatch import TorchDispatchMode

    N, d = 5000, 8
    user, items, target, neg, lq, tlq, gout = make_sampled(6, N, d, 7, per_row=per_row)
    u = user.to(dtype).requires_grad_()
    w = items.to(dtype).requires_grad_()
    loss = sampled_softmax_loss(u, w, target, neg, log_q=lq.float(), target_log_q=tlq.float(),
                                reduction="none", backend=backend)
    big = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.numel() >= N * d:
                    big.append((str(func), t.dtype, tuple(t.shape)))
            return out

    with Record():
        loss.backward(gout.to(dtype))
    fp32_big = [b for b in big if b[1] == torch.float32 and dtype != torch.float32]
    assert not fp32_big, fp32_big
    assert len({b[0] for b in big if "zeros" in b[0] or "empty" in b[0]}) <= 1, big
    ref_u, ref_w = user.to(dtype).requires_grad_(), items.to(dtype).requires_grad_()
    sampled_softmax_loss(ref_u, ref_w, target, neg, log_q=lq.float(), target_log_q=tlq.float(),
                         reduction="none", backend="eager").backward(gout.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(w.grad.float(), ref_w.grad.float(), atol=tol, rtol=tol, name="items grad")
