"""linear_cross_entropy: every backend against the float64 reference.

Triton runs through the interpreter on CPU (tiny shapes: it is slow); the C++ kernel gets the
odd shapes, float64 exactness and gradcheck; cuda-marked tests take the big shapes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _util import assert_close, compare_three, fused_backends, grads_of, need_cpp
from seqrec_fast import backend as B
from seqrec_fast.ops.linear_cross_entropy import (_linear_cross_entropy_fwd_op,
                                                  linear_cross_entropy)
from seqrec_fast.reference.linear_cross_entropy import linear_cross_entropy_ref

OP = "linear_cross_entropy"
FUSED = fused_backends(OP)


def make_lce(b, n, d, *, bias=False, ignore=0, peaked=0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(b, d, generator=g, dtype=torch.float64) * 0.5
    items = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5
    target = torch.randint(0, n, (b,), generator=g)
    for i in range(min(peaked, b)):  # a user equal to (a multiple of) its target: peaked softmax
        user[i] = items[target[i]] * 4.0
    if ignore:
        target[torch.randperm(b, generator=g)[:ignore]] = -100
    bvec = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    gout = torch.randn(b, generator=g, dtype=torch.float64)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(user), mv(items), mv(target), mv(bvec), mv(gout)



# (B, N, d, options): odd shapes; options rotate bias / temperature / smoothing / ignore_index
LCE_CASES = [
    ((1, 1, 8), dict()),
    ((1, 507, 24), dict(bias=True)),
    ((5, 507, 24), dict(temperature=0.3, ignore=2)),
    ((3, 61, 123), dict(label_smoothing=0.1, bias=True)),
    ((33, 100, 16), dict(temperature=2.0, label_smoothing=0.2, ignore=5)),
    ((6, 300, 64), dict(peaked=3)),
]


def _lce_fn(backend, opts, reduction="none"):
    kw = dict(temperature=opts.get("temperature", 1.0),
              label_smoothing=opts.get("label_smoothing", 0.0), reduction=reduction)

    def ours(user, items, bias, target):
        return linear_cross_entropy(user, items, target, bias=bias, backend=backend, **kw)

    def ref(user, items, bias, target):
        return linear_cross_entropy_ref(user, items, target, bias=bias, **kw)

    return ours, ref


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", LCE_CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_lce_fp32_matches_reference(backend, case):
    (b, n, d), opts = case
    if backend == "triton" and n * b > 2000:
        n = 200  # the interpreter is slow; the C++ kernel takes the full odd shapes
    user, items, target, bias, gout = make_lce(b, n, d, bias=opts.get("bias", False),
                                               ignore=opts.get("ignore", 0),
                                               peaked=opts.get("peaked", 0))
    ours, ref = _lce_fn(backend, opts)
    compare_three(lambda u, w, bb: ours(u, w, bb, target), lambda u, w, bb: ref(u, w, bb, target),
                  [user, items, bias], gout, torch.float32, f"{backend} {b}x{n}x{d}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lce_half_precision(backend, dtype):
    user, items, target, bias, gout = make_lce(9, 150, 32, bias=True, ignore=2, peaked=2)
    ours, ref = _lce_fn(backend, dict(temperature=0.5, label_smoothing=0.05))
    compare_three(lambda u, w, bb: ours(u, w, bb, target), lambda u, w, bb: ref(u, w, bb, target),
                  [user, items, bias], gout, dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lce_reductions(backend, reduction):
    user, items, target, bias, _ = make_lce(7, 90, 16, ignore=3, bias=True)
    ours, ref = _lce_fn(backend, dict(label_smoothing=0.1), reduction)
    compare_three(lambda u, w, bb: ours(u, w, bb, target), lambda u, w, bb: ref(u, w, bb, target),
                  [user, items, bias], None, torch.float32, f"{backend} {reduction}")


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
def test_lce_all_rows_ignored(backend):
    user, items, _, _, _ = make_lce(3, 20, 8)
    user = user.float().requires_grad_(True)
    items = items.float().requires_grad_(True)
    target = torch.full((3,), -1, dtype=torch.int64)
    mean = linear_cross_entropy(user, items, target, ignore_index=-1, backend=backend)
    assert torch.isnan(mean)  # 0 / 0, as torch.nn.functional.cross_entropy
    total = linear_cross_entropy(user, items, target, ignore_index=-1, reduction="sum",
                                 backend=backend)
    total.backward()
    assert total.item() == 0.0
    assert torch.count_nonzero(user.grad) == 0 and torch.count_nonzero(items.grad) == 0


@pytest.mark.parametrize("backend", FUSED)
def test_lce_return_lse_and_no_grad(backend):
    user, items, target, bias, _ = make_lce(6, 70, 16, bias=True, ignore=1)
    user, items, bias = user.float(), items.float(), bias.float()
    loss, lse = linear_cross_entropy(user, items, target, bias=bias, temperature=0.7,
                                     return_lse=True, reduction="none", backend=backend)
    want = torch.logsumexp(((user.double() @ items.double().T) + bias.double()) / 0.7, 1)
    assert lse.dtype == torch.float32 and not lse.requires_grad
    assert_close(lse, want, atol=1e-5, rtol=1e-5, name="lse")
    with torch.no_grad():
        loss2 = linear_cross_entropy(user, items, target, bias=bias, temperature=0.7,
                                     reduction="none", backend=backend)
    assert_close(loss2, loss, atol=1e-6, name="no-grad loss")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("which", ["user", "items", "bias"])
def test_lce_partial_grads(backend, which):
    user, items, target, bias, _ = make_lce(5, 40, 8, bias=True)
    t = {"user": user.float(), "items": items.float(), "bias": bias.float()}
    t[which].requires_grad_(True)
    linear_cross_entropy(t["user"], t["items"], target, bias=t["bias"], backend=backend).backward()
    ref = {k: v.detach().double().requires_grad_(k == which) for k, v in t.items()}
    linear_cross_entropy_ref(ref["user"], ref["items"], target, bias=ref["bias"]).backward()
    assert_close(t[which].grad, ref[which].grad, atol=1e-5, rtol=1e-4, name=which)
    for k in t:
        if k != which:
            assert t[k].grad is None


def test_lce_triton_split_and_atomic_paths():
    """The column-split forward (partials merged on the host) and the row-split backward (fp32
    atomics) give the same results as one program per row block."""
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    from seqrec_fast.kernels import linear_cross_entropy as K

    user, items, target, bias, gout = make_lce(70, 130, 24, bias=True, ignore=3, peaked=2)
    user, items, bias = user.float(), items.float(), bias.float()
    args = (user, items, target, bias, 0.8, -100, 0.1, True)
    base = K._linear_cross_entropy_fwd(*args, splits=1)
    split = K._linear_cross_entropy_fwd(*args, splits=3)
    for a, e in zip(split, base):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name="split fwd")
    loss, lse, item_mean = base
    common = (gout.float(), user, items, target, bias, lse, item_mean, 0.8, -100, 0.1, True, True,
              True)
    one = K._linear_cross_entropy_bwd(*common, b_splits=1)
    two = K._linear_cross_entropy_bwd(*common, b_splits=2)
    for a, e in zip(two, one):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name="row-split bwd")


@pytest.mark.parametrize("backend", FUSED)
def test_lce_non_contiguous_inputs(backend):
    user, items, target, bias, gout = make_lce(6, 50, 16, bias=True, ignore=1)
    big_u = torch.randn(6, 40, dtype=torch.float64)
    big_u[:, 3:19] = user
    items_t = items.T.contiguous().T  # column-major (N, d)
    target2 = torch.stack([target, target], 1)[:, 1]  # stride 2
    bias2 = torch.stack([bias, bias], 1)[:, 0]
    kw = dict(temperature=0.5, reduction="none")
    got = linear_cross_entropy(big_u[:, 3:19].float(), items_t.float(), target2,
                               bias=bias2.float(), backend=backend, **kw)
    want = linear_cross_entropy_ref(user, items, target, bias=bias, **kw)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="non-contiguous")


def test_lce_cpp_float64_exact_and_chunks():
    need_cpp(FUSED)
    from seqrec_fast import _ext

    user, items, target, bias, gout = make_lce(9, 203, 12, bias=True, ignore=2, peaked=2)
    kw = dict(temperature=0.6, label_smoothing=0.15, reduction="none")
    got = grads_of(lambda u, w, b: linear_cross_entropy(u, w, target, bias=b, backend="cpp", **kw),
                   [user, items, bias], gout)
    want = grads_of(lambda u, w, b: linear_cross_entropy_ref(u, w, target, bias=b, **kw),
                    [user, items, bias], gout)
    for name, a, e in zip(("loss", "du", "dw", "db"), got, want):
        assert a.dtype == torch.float64
        assert_close(a, e, atol=1e-12, rtol=1e-10, name=name)
    # the chunk width changes nothing but the order of the online log-sum-exp
    for chunk in (1, 7, 64, 1000):
        loss, lse = _ext._C.linear_cross_entropy_fwd_cpu(user, items, target, bias, 0.6, -100,
                                                         0.15, chunk)
        assert_close(loss, got[0], atol=1e-12, rtol=1e-10, name=f"chunk {chunk}")


def test_lce_gradcheck_cpp():
    need_cpp(FUSED)
    user, items, target, bias, _ = make_lce(4, 11, 3, bias=True, ignore=1, peaked=1)
    fn = lambda u, w, b: linear_cross_entropy(  # noqa: E731
        u, w, target, bias=b, temperature=0.7, label_smoothing=0.1, reduction="none",
        backend="cpp")
    args = tuple(t.clone().requires_grad_(True) for t in (user, items, bias))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck is not None  # (double backward is not supported)


@pytest.mark.parametrize("backend", FUSED)
def test_lce_saves_no_bn_tensor(backend):
    b, n, d = 16, 300, 8
    user, items, target, bias, _ = make_lce(b, n, d, bias=True)
    user, items, bias = (t.float().requires_grad_(True) for t in (user, items, bias))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(user, items, target, bias=bias, backend=backend)
    assert sizes and max(sizes) <= n * d, sizes  # items itself is the largest saved tensor
    assert b * n not in sizes


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("with_bias", [False, True])
def test_lce_opcheck(backend, with_bias):
    user, items, target, bias, _ = make_lce(5, 37, 8, bias=with_bias, ignore=1)
    user = user.float().requires_grad_(True)
    items = items.float().requires_grad_(True)
    if bias is not None:
        bias = bias.float().requires_grad_(True)
    torch.library.opcheck(_linear_cross_entropy_fwd_op,
                          (user, items, target, bias, 0.9, -100, 0.1, True, backend))


def test_lce_torch_compile_fullgraph():
    backend = FUSED[0] if FUSED else "eager"
    torch._dynamo.reset()
    user, items, target, bias, _ = make_lce(6, 50, 8, bias=True, ignore=1)
    user, items, bias = user.float(), items.float(), bias.float()

    def loss_fn(u, w, b):
        return linear_cross_entropy(u, w, target, bias=b, temperature=0.5, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    got = grads_of(compiled, [user, items, bias], None)
    want = grads_of(loss_fn, [user, items, bias], None)
    for name, a, e in zip(("loss", "du", "dw", "db"), got, want):
        assert_close(a, e, atol=1e-6, rtol=1e-5, name=f"compiled {name}")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 9), n=st.integers(1, 80), d=st.integers(1, 40),
       temperature=st.sampled_from([0.25, 1.0, 3.0]), smoothing=st.sampled_from([0.0, 0.3]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lce_hypothesis_cpp(b, n, d, temperature, smoothing, with_bias, seed):
    need_cpp(FUSED)
    user, items, target, bias, gout = make_lce(b, n, d, bias=with_bias, seed=seed,
                                               ignore=b // 3)
    kw = dict(temperature=temperature, label_smoothing=smoothing, reduction="none")
    got = grads_of(lambda u, w: linear_cross_entropy(u, w, target, bias=bias, backend="cpp", **kw),
                   [user, items], gout)
    want = grads_of(lambda u, w: linear_cross_entropy_ref(u, w, target, bias=bias, **kw),
                    [user, items], gout)
    for name, a, e in zip(("loss", "du", "dw"), got, want):
        assert_close(a, e, atol=1e-11, rtol=1e-9, name=name)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 20), n=st.integers(1, 70), d=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_lce_hypothesis_triton(b, n, d, seed):
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    user, items, target, bias, gout = make_lce(b, n, d, bias=True, seed=seed, ignore=b // 4)
    ours, ref = _lce_fn("triton", dict(temperature=0.5, label_smoothing=0.1))
    compare_three(lambda u, w, bb: ours(u, w, bb, target), lambda u, w, bb: ref(u, w, bb, target),
                  [user, items, bias], gout, torch.float32, f"triton {b}x{n}x{d}")


class TestLceBadInput:
    def args(self):
        return torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 3])

    def test_target_out_of_range(self):
        u, w, t = self.args()
        with pytest.raises(ValueError, match="target"):
            linear_cross_entropy(u, w, torch.tensor([1, 10, 2]))
        with pytest.raises(ValueError, match="target"):
            linear_cross_entropy(u, w, torch.tensor([1, -5, 2]))
        linear_cross_entropy(u, w, torch.tensor([1, -100, 2]))  # ignore_index is fine

    def test_target_dtype_and_shape(self):
        u, w, t = self.args()
        with pytest.raises(TypeError, match="target"):
            linear_cross_entropy(u, w, t.int())
        with pytest.raises(TypeError, match="target"):
            linear_cross_entropy(u, w, t.float())
        with pytest.raises(ValueError, match="target"):
            linear_cross_entropy(u, w, t[:2])

    def test_shapes_and_dtypes(self):
        u, w, t = self.args()
        with pytest.raises(ValueError, match="user"):
            linear_cross_entropy(u[0], w, t)
        with pytest.raises(ValueError, match="items"):
            linear_cross_entropy(u, w[:, :4], t)
        with pytest.raises(TypeError, match="items"):
            linear_cross_entropy(u, w.double(), t)
        with pytest.raises(TypeError, match="user"):
            linear_cross_entropy(u.long(), w, t)
        with pytest.raises(ValueError, match="bias"):
            linear_cross_entropy(u, w, t, bias=torch.randn(9))
        with pytest.raises(TypeError, match="bias"):
            linear_cross_entropy(u, w, t, bias=torch.randn(10).double())

    def test_empty(self):
        u, w, t = self.args()
        with pytest.raises(ValueError, match="user"):
            linear_cross_entropy(u[:0], w, t[:0])
        with pytest.raises(ValueError, match="items"):
            linear_cross_entropy(u, w[:0], t)

    def test_options(self):
        u, w, t = self.args()
        with pytest.raises(ValueError, match="temperature"):
            linear_cross_entropy(u, w, t, temperature=0.0)
        with pytest.raises(ValueError, match="label_smoothing"):
            linear_cross_entropy(u, w, t, label_smoothing=1.0)
        with pytest.raises(ValueError, match="reduction"):
            linear_cross_entropy(u, w, t, reduction="avg")
        with pytest.raises(ValueError, match="ignore_index"):
            linear_cross_entropy(u, w, t, ignore_index=3)
        with pytest.raises(TypeError, match="ignore_index"):
            linear_cross_entropy(u, w, t, ignore_index=1.5)
        with pytest.raises(ValueError, match="backend"):
            linear_cross_entropy(u, w, t, backend="fast")
        with pytest.raises(RuntimeError, match="cuda"):
            linear_cross_entropy(u, w, t, backend="cuda")

    def test_devices(self):
        u, w, t = self.args()
        with pytest.raises(ValueError, match="items"):
            linear_cross_entropy(u, w.to("meta"), t)
        with pytest.raises(ValueError, match="target"):
            linear_cross_entropy(u, w, t.to("meta"))

    def test_float64_triton_refused(self):
        if "triton" not in FUSED:
            pytest.skip("triton not available")
        u, w, t = self.args()
        with pytest.raises(TypeError, match="float64"):
            linear_cross_entropy(u.double(), w.double(), t, backend="triton")


def test_lce_auto_backend_on_cpu():
    want = "cpp" if "cpp" in FUSED else "eager"
    assert B.resolve(OP, "auto", torch.device("cpu")) == want


def test_lce_nan_in_user_row_stays_in_row():
    user, items, target, _, _ = make_lce(4, 30, 8)
    user = user.float()
    user[2, 1] = float("nan")
    for backend in ["eager"] + FUSED:
        loss = linear_cross_entropy(user, items.float(), target, reduction="none",
                                    backend=backend)
        assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all(), backend



# ----------------------------------------------------------------------------------------------
# GPU: big shapes, true bf16 tensor-core paths
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(512, 30011, 64), (256, 5003, 128), (300, 2000, 24)])
def test_lce_cuda_large(dtype, shape):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    b, n, d = shape
    user, items, target, bias, gout = make_lce(b, n, d, bias=True, ignore=7, peaked=5,
                                               device="cuda")
    ours, ref = _lce_fn("triton", dict(temperature=0.5, label_smoothing=0.1))
    compare_three(lambda u, w, bb: ours(u, w, bb, target), lambda u, w, bb: ref(u, w, bb, target),
                  [user, items, bias], gout, dtype, f"cuda {dtype} {shape}")


@pytest.mark.cuda
def test_lce_cuda_tf32_follows_torch_setting():
    b, n, d = 256, 4096, 64
    user, items, target, _, gout = make_lce(b, n, d, device="cuda")
    u, w = user.float(), items.float()
    truth = linear_cross_entropy_ref(user, items, target, reduction="none")
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        strict = linear_cross_entropy(u, w, target, reduction="none", backend="triton")
        torch.set_float32_matmul_precision("high")
        tf32 = linear_cross_entropy(u, w, target, reduction="none", backend="triton")
    finally:
        torch.set_float32_matmul_precision(prev)
    e_strict = (strict.double() - truth).abs().max().item()
    e_tf32 = (tf32.double() - truth).abs().max().item()
    assert e_strict < 1e-4 and e_strict < e_tf32


@pytest.mark.cuda
def test_lce_cuda_memory_is_not_bn():
    b, n, d = 4096, 200_000, 64
    user = torch.randn(b, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    items = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, n, (b,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(user, items, target, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # gradients (n·d + b·d bf16) plus small partials; far below the (b, n) logits (1.6 GB fp16)
    assert extra < n * d * 2 + b * d * 2 + 64 * 2**20, extra / 2**20




# ----------------------------------------------------------------------------------------------
# numerics policy: dot precision, the eager oracle at every dtype
# ----------------------------------------------------------------------------------------------
def test_fp32_dot_precision_follows_torch_setting():
    """3xTF32 under torch's default "highest" (fp32-level error on tensor cores), tf32 when the
    user allows it; never "ieee" (FMA with register spills on sm_90)."""
    from seqrec_fast.kernels._utils import fp32_dot_precision

    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert fp32_dot_precision() == "tf32x3"
        for p in ("high", "medium"):
            torch.set_float32_matmul_precision(p)
            assert fp32_dot_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(prev)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lce_eager_reference_accumulates_in_fp32(dtype):
    """fp16 eager used to return inf at B = 1100 with label smoothing (the Σ_j log p_j of each
    row overflows fp16); the reference computes in fp32 and returns the input dtype."""
    user, items, target, bias, _ = make_lce(1100, 10000, 16, bias=True)
    kw = dict(temperature=0.7, label_smoothing=0.1)
    truth = linear_cross_entropy_ref(user, items, target, bias=bias, reduction="sum", **kw)
    cast = lambda t: t.to(dtype)  # noqa: E731
    for red in ("sum", "mean", "none"):
        got = linear_cross_entropy(cast(user), cast(items), target, bias=cast(bias), reduction=red,
                                   backend="eager", **kw)
        assert got.dtype == dtype and torch.isfinite(got).all(), red
        total = got.double().sum() * (1100 if red == "mean" else 1)
        assert abs(total.item() - truth.item()) < 0.02 * abs(truth.item()), (red, total, truth)


# ----------------------------------------------------------------------------------------------
# validation compiled or not, autocast, leading dimensions
# ----------------------------------------------------------------------------------------------
def _raises_same_compiled(fn, args, exc, match):
    """``fn(*args)`` raises ``exc`` matching ``match`` eagerly and under
    torch.compile(fullgraph=True)."""
    with pytest.raises(exc, match=match):
        fn(*args)
    torch._dynamo.reset()
    with pytest.raises(exc, match=match):
        torch.compile(fn, fullgraph=True, backend="inductor")(*args)


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
def test_lce_validation_is_the_same_compiled(backend):
    u, w = torch.randn(3, 8), torch.randn(10, 8)
    fn = lambda u, w, t: linear_cross_entropy(u, w, t, backend=backend)  # noqa: E731
    _raises_same_compiled(fn, (u, w, torch.tensor([1, 10, 2])), ValueError, "target")
    _raises_same_compiled(fn, (u, w, torch.tensor([1, -5, 2])), ValueError, "target")
    _raises_same_compiled(fn, (u, w, torch.tensor([1, 2])), ValueError, "target")
    _raises_same_compiled(fn, (u, w[:, :4], torch.tensor([1, 2, 3])), ValueError, "items")
    _raises_same_compiled(fn, (u[:, None], w, torch.tensor([1, 2, 3])), ValueError, "target")


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
def test_lce_leading_dims(backend):
    """user (..., d) with target (...): flattened; "none" returns target's shape."""
    user, items, target, bias, _ = make_lce(12, 40, 8, bias=True, ignore=2)
    user, items, bias = user.float(), items.float(), bias.float()
    u3, t3 = user.reshape(3, 4, 8), target.reshape(3, 4)
    for red in ("none", "mean", "sum"):
        got = linear_cross_entropy(u3, items, t3, bias=bias, reduction=red, backend=backend)
        want = linear_cross_entropy(user, items, target, bias=bias, reduction=red,
                                    backend=backend)
        assert got.shape == (t3.shape if red == "none" else ())
        assert_close(got, want.reshape(got.shape), atol=1e-6, rtol=1e-6, name=red)
    loss, lse = linear_cross_entropy(u3, items, t3, reduction="none", return_lse=True,
                                     backend=backend)
    assert lse.shape == (3, 4)
    leaf = u3.clone().requires_grad_()
    linear_cross_entropy(leaf, items, t3, backend=backend).backward()
    assert leaf.grad.shape == (3, 4, 8)
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(u3, items, target, backend=backend)


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
def test_lce_cpu_autocast_bf16(backend):
    """Under CPU bf16 autocast the op runs like a matmul on bf16-cast embeddings and returns
    an fp32 loss; gradients reach the fp32 parameters."""
    user, items, target, bias, _ = make_lce(6, 70, 16, bias=True, ignore=1)
    u = user.float().requires_grad_()
    w = items.float().requires_grad_()
    b = bias.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(u, w, target, bias=b, label_smoothing=0.1, backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert u.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    want = linear_cross_entropy_ref(user, items, target, bias=bias, label_smoothing=0.1)
    u2, w2, b2 = (t.detach().double().requires_grad_() for t in (user, items, bias))
    linear_cross_entropy_ref(u2, w2, target, bias=b2, label_smoothing=0.1).backward()
    assert abs(loss.item() - want.item()) < 2e-2 * max(1.0, abs(want.item()))
    for name, a, e in (("du", u.grad, u2.grad), ("dw", w.grad, w2.grad), ("db", b.grad, b2.grad)):
        assert_close(a, e, atol=2e-2 * max(1.0, e.abs().max().item()), rtol=0, name=name)
    # backward inside the autocast region: the fused kernels are not recast (the same bits);
    # eager's backward is torch autograd, whose matmuls autocast recasts (within tolerance)
    u3, w3, b3 = (t.detach().clone().requires_grad_() for t in (u, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(u3, w3, target, bias=b3, label_smoothing=0.1,
                             backend=backend).backward()
    for a, e in ((u3.grad, u.grad), (w3.grad, w.grad), (b3.grad, b.grad)):
        if backend == "eager":
            assert_close(a, e, atol=2e-2 * max(1.0, e.abs().max().item()), rtol=0)
        else:
            assert torch.equal(a, e)


@pytest.mark.cuda
def test_lce_and_sampled_id_checks_do_not_sync():
    """The id range checks run on the device (torch._assert_async): no host sync per call."""
    from seqrec_fast.ops import sampled_softmax_loss

    user, items, target, _, _ = make_lce(64, 1000, 32, device="cuda")
    u, w = user.float(), items.float()
    neg = torch.randint(0, 1000, (128,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        linear_cross_entropy(u, w, target, backend="triton")
        sampled_softmax_loss(u, w, target, neg, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_lce_tiny_temperature_is_finite_everywhere():
    """temperature = 1e-30 (logits of ±1e30, one row entirely below -1e30): loss and
    gradients finite and equal across backends (Triton item gradients used to be inf: the
    recomputed logit and the saved lse differ by rounding amplified by 1/T)."""
    user, items, target, _, _ = make_lce(4, 20, 8)
    user, items = user.float(), items.float()
    items[:, 0] += 5.0
    user[0] = 0.0
    user[0, 0] = -1.0
    outs = {}
    for be in ["eager"] + FUSED:
        u, w = user.clone().requires_grad_(), items.clone().requires_grad_()
        loss = linear_cross_entropy(u, w, target, temperature=1e-30, reduction="none",
                                    backend=be)
        loss.sum().backward()
        outs[be] = (loss.detach(), u.grad, w.grad)
    for be, got in outs.items():
        for name, a, e in zip(("loss", "du", "dw"), got, outs["eager"]):
            assert torch.isfinite(a).all(), (be, name)
            assert (a - e).abs().max().item() <= 1e-4 * e.abs().max().item(), (be, name)


def test_check_id_range_op_opcheck_and_errors():
    """The opaque id check behind compiled validation: opcheck, and the eager errors."""
    from seqrec_fast.ops._common import _check_id_range_op

    ids = torch.tensor([0, 3, -100, 9])
    torch.library.opcheck(_check_id_range_op, (ids, "target", 10, -100))
    out = _check_id_range_op(ids, "target", 10, -100)
    assert torch.equal(out, ids) and out.data_ptr() != ids.data_ptr()
    with pytest.raises(ValueError, match="target contains id 10"):
        _check_id_range_op(torch.tensor([1, 10]), "target", 10, None)
    with pytest.raises(ValueError, match="negatives contains id -100"):
        _check_id_range_op(torch.tensor([-100]), "negatives", 10, None)
