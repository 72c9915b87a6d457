"""capsule_routing: values and gradients of every backend against the float64 reference."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from _util import assert_close, assert_within_2x_eager, fused_backends
from seqrec_fast import backend as B
from seqrec_fast.nn import CapsuleRouting
from seqrec_fast.ops import capsule_routing
from seqrec_fast.ops.routing import _routing_fwd_op
from seqrec_fast.reference import routing_ref

FUSED = fused_backends("routing")
ALL = ["eager"] + FUSED
SHAPES = [  # (B, L, K, d)
    (1, 1, 1, 8),
    (3, 37, 7, 24),
    (4, 20, 4, 16),
    (2, 5, 1, 32),
    (5, 8, 3, 64),
]


def make(shape, bilinear, dtype=torch.float64, *, init=False, seed=0, all_padded_row=True,
         device="cpu"):
    b, l, k, d = shape
    g = torch.Generator().manual_seed(seed)
    seq = (torch.randn(b, l, d, generator=g, dtype=torch.float64) * 0.7)
    if bilinear == "shared":
        w = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    else:
        w = torch.randn(l, k * d, d, generator=g, dtype=torch.float64) / d ** 0.5
    mask = torch.rand(b, l, generator=g) < 0.75
    if all_padded_row and b > 1:
        mask[-1] = False
    mask[0, 0] = True
    init_logits = torch.randn(b, k, l, generator=g, dtype=torch.float64) if init else None
    gout = torch.randn(b, k, d, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(seq), mask.to(device), cast(w), (None if init_logits is None else
                                                 init_logits.to(device)), cast(gout)


def run(fn, seq, w, gout, **kw):
    seq = seq.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fn(seq, w, **kw)
    gs, gw = torch.autograd.grad(out, (seq, w), gout)
    return out.detach(), gs, gw


def check_against_reference(backend, shape, bilinear, dtype, softmax_axis, detach, init):
    seq, mask, w, init_logits, gout = make(shape, bilinear, dtype, init=init)
    kw = dict(num_interests=shape[2], iters=3, bilinear=bilinear, init_logits=init_logits,
              softmax_axis=softmax_axis, detach_routing=detach)
    got = run(lambda s, ww: capsule_routing(s, mask, ww, backend=backend, **kw), seq, w, gout)
    truth = run(lambda s, ww: routing_ref(s, mask, ww, **kw), seq.double(), w.double(),
                gout.double())
    same = run(lambda s, ww: routing_ref(s, mask, ww, **kw), seq, w, gout)
    for name, a, e, t in zip(("interests", "grad seq_emb", "grad weight"), got, same, truth):
        assert a.dtype == dtype, name
        assert_within_2x_eager(a, e, t, name=f"{backend} {dtype} {shape} {name}")
    # all-padded rows: zero interests, no NaN
    empty = ~mask.any(1)
    if empty.any():
        assert torch.equal(got[0][empty], torch.zeros_like(got[0][empty]))
        assert torch.equal(got[1][empty], torch.zeros_like(got[1][empty]))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
def test_fp32_matches_reference(backend, shape, bilinear):
    # vary the options across shapes so every combination meets several shapes
    i = SHAPES.index(shape)
    axis = ("interest", "sequence", "sequence_real")[i % 3]
    detach = (True, False)[(i // 2) % 2]
    init = bilinear == "shared"
    check_against_reference(backend, shape, bilinear, torch.float32, axis, detach, init)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
@pytest.mark.parametrize("softmax_axis", ["interest", "sequence", "sequence_real"])
@pytest.mark.parametrize("detach", [True, False])
def test_all_options(backend, bilinear, softmax_axis, detach):
    check_against_reference(backend, (3, 11, 3, 16), bilinear, torch.float32, softmax_axis,
                            detach, init=True)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
@pytest.mark.parametrize("detach", [True, False])
def test_half_precision(backend, dtype, bilinear, detach):
    check_against_reference(backend, (4, 13, 4, 32), bilinear, dtype, "interest", detach,
                            init=False)


@pytest.mark.parametrize("backend", [b for b in FUSED if b == "cpp"])
@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
@pytest.mark.parametrize("detach", [True, False])
def test_float64_exact(backend, bilinear, detach):
    seq, mask, w, init, gout = make((3, 9, 3, 8), bilinear, init=True)
    kw = dict(num_interests=3, bilinear=bilinear, init_logits=init, detach_routing=detach)
    got = run(lambda s, ww: capsule_routing(s, mask, ww, backend=backend, **kw), seq, w, gout)
    want = run(lambda s, ww: routing_ref(s, mask, ww, **kw), seq, w, gout)
    for name, a, e in zip(("interests", "grad seq_emb", "grad weight"), got, want):
        assert_close(a, e, atol=1e-12, rtol=1e-10, name=name)


@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
@pytest.mark.parametrize("softmax_axis", ["interest", "sequence", "sequence_real"])
def test_gradcheck_cpp(bilinear, softmax_axis):
    # Only the full-backprop mode is the true derivative: detach_routing=True stops gradients
    # through the routing logits on purpose, so finite differences cannot check it (the
    # float64 comparison with the reference's autograd does, in test_float64_exact).
    detach = False
    if "cpp" not in FUSED:
        pytest.fail("the C++ extension is not built") if os.environ.get(
            "SEQREC_FAST_REQUIRE_EXT") == "1" else pytest.skip("C++ extension not built")
    seq, mask, w, init, _ = make((2, 4, 2, 3), bilinear, init=True)
    seq.requires_grad_(True)
    w.requires_grad_(True)
    fn = lambda s, ww: capsule_routing(s, mask, ww, num_interests=2, bilinear=bilinear,  # noqa
                                       init_logits=init, softmax_axis=softmax_axis,
                                       detach_routing=detach, backend="cpp")
    assert torch.autograd.gradcheck(fn, (seq, w), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("detach", [True, False])
def test_opcheck(backend, per_position, detach):
    b, l, k, d = 3, 6, 2, 8
    if per_position:
        u = torch.randn(l, b, k, d, requires_grad=True)
    else:
        u = torch.randn(b, l, d, requires_grad=True)
    mask = torch.rand(b, l) < 0.7
    init = torch.randn(b, k, l)
    for seq_axis, seq_all in ((False, False), (True, False), (True, True)):
        torch.library.opcheck(_routing_fwd_op,
                              (u, mask, init, k, 3, seq_axis, seq_all, detach, backend))


def test_torch_compile_fullgraph():
    backend = FUSED[0] if FUSED else "eager"
    torch._dynamo.reset()
    for bilinear in ("shared", "per_position"):
        layer = CapsuleRouting(16, 3, seq_len=7, bilinear=bilinear, backend=backend).double()
        seq = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
        lengths = torch.tensor([7, 3, 0, 5])
        init = torch.randn(4, 3, 7, dtype=torch.float64)
        want = layer(seq, lengths, init_logits=init)
        (gs_want,) = torch.autograd.grad(want.sum(), seq)
        compiled = torch.compile(layer, fullgraph=True, backend="inductor")
        got = compiled(seq, lengths, init_logits=init)
        (gs_got,) = torch.autograd.grad(got.sum(), seq)
        assert_close(got, want, atol=1e-10, rtol=1e-8, name="compiled interests")
        assert_close(gs_got, gs_want, atol=1e-10, rtol=1e-8, name="compiled grad")


@pytest.mark.parametrize("backend", FUSED)
def test_shared_path_saves_no_bkld_tensor(backend):
    b, l, k, d = 8, 10, 4, 16
    seq, mask, w, init, _ = make((b, l, k, d), "shared", torch.float32, init=True)
    seq.requires_grad_(True)
    w.requires_grad_(True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    for detach in (True, False):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            capsule_routing(seq, mask, w, num_interests=k, bilinear="shared", init_logits=init,
                            detach_routing=detach, backend=backend)
    assert sizes and max(sizes) < b * k * l * d, sizes


def test_lengths_equal_prefix_mask():
    seq, _, w, _, _ = make((4, 6, 2, 8), "per_position", torch.float64)
    lengths = torch.tensor([6, 0, 2, 5])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    for backend in ALL:
        a = capsule_routing(seq, lengths, w, num_interests=2, backend=backend)
        c = capsule_routing(seq, mask, w, num_interests=2, backend=backend)
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ALL)
def test_padding_content_is_ignored(backend):
    seq, mask, w, init, _ = make((3, 9, 3, 16), "shared", torch.float32, init=True)
    a = capsule_routing(seq, mask, w, num_interests=3, bilinear="shared", init_logits=init,
                        backend=backend)
    seq2 = seq.clone()
    seq2[~mask] = 1e3
    c = capsule_routing(seq2, mask, w, num_interests=3, bilinear="shared", init_logits=init,
                        backend=backend)
    assert torch.allclose(a, c, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_empty_batch_is_an_error(backend):
    seq = torch.randn(0, 5, 8)
    w = torch.randn(5, 16, 8)
    with pytest.raises(ValueError, match="seq_emb.*empty batch"):
        capsule_routing(seq, torch.zeros(0, 5, dtype=torch.bool), w, num_interests=2,
                        backend=backend)


def test_nan_input_propagates_only_to_its_row():
    seq, mask, w, _, _ = make((3, 5, 2, 8), "per_position", torch.float32, all_padded_row=False)
    mask[:] = True
    seq[1, 2, 3] = float("nan")
    for backend in ALL:
        out = capsule_routing(seq, mask, w, num_interests=2, backend=backend)
        assert torch.isnan(out[1]).any()
        assert torch.isfinite(out[[0, 2]]).all()


class TestBadInput:
    def args(self):
        seq = torch.randn(2, 5, 8)
        return seq, torch.ones(2, 5, dtype=torch.bool), torch.randn(5, 16, 8)

    def test_wrong_rank(self):
        seq, mask, w = self.args()
        with pytest.raises(ValueError, match="seq_emb"):
            capsule_routing(seq[0], mask, w, num_interests=2)

    def test_mask_length_mismatch(self):
        seq, mask, w = self.args()
        with pytest.raises(ValueError, match="mask"):
            capsule_routing(seq, mask[:, :4], w, num_interests=2)

    def test_mask_dtype(self):
        seq, mask, w = self.args()
        with pytest.raises(TypeError, match="mask"):
            capsule_routing(seq, mask.float(), w, num_interests=2)
        with pytest.raises(TypeError, match="mask"):
            capsule_routing(seq, torch.tensor([1.0, 2.0]), w, num_interests=2)

    def test_lengths_out_of_range(self):
        seq, _, w = self.args()
        with pytest.raises(ValueError, match="mask"):
            capsule_routing(seq, torch.tensor([6, 1]), w, num_interests=2)
        with pytest.raises(ValueError, match="mask"):
            capsule_routing(seq, torch.tensor([-1, 1]), w, num_interests=2)

    def test_weight_shape(self):
        seq, mask, w = self.args()
        with pytest.raises(ValueError, match="weight"):
            capsule_routing(seq, mask, w, num_interests=3)  # K*d mismatch
        with pytest.raises(ValueError, match="weight"):
            capsule_routing(seq, mask, torch.randn(8, 8), num_interests=2)  # per_position
        with pytest.raises(ValueError, match="weight"):
            capsule_routing(seq, mask, w, num_interests=2, bilinear="shared")
        with pytest.raises(ValueError, match="weight"):
            capsule_routing(seq, mask, torch.randn(4, 16, 8), num_interests=2)  # L mismatch

    def test_counts(self):
        seq, mask, w = self.args()
        with pytest.raises(ValueError, match="num_interests"):
            capsule_routing(seq, mask, w, num_interests=0)
        with pytest.raises(ValueError, match="iters"):
            capsule_routing(seq, mask, w, num_interests=2, iters=0)
        with pytest.raises(TypeError, match="num_interests"):
            capsule_routing(seq, mask, w, num_interests=2.0)

    def test_dtypes(self):
        seq, mask, w = self.args()
        with pytest.raises(TypeError, match="weight"):
            capsule_routing(seq, mask, w.double(), num_interests=2)
        with pytest.raises(TypeError, match="seq_emb"):
            capsule_routing(seq.long(), mask, w, num_interests=2)

    def test_options(self):
        seq, mask, w = self.args()
        with pytest.raises(ValueError, match="bilinear"):
            capsule_routing(seq, mask, w, num_interests=2, bilinear="dense")
        with pytest.raises(ValueError, match="softmax_axis"):
            capsule_routing(seq, mask, w, num_interests=2, softmax_axis="batch")
        with pytest.raises(TypeError, match="detach_routing"):
            capsule_routing(seq, mask, w, num_interests=2, detach_routing=1)
        with pytest.raises(ValueError, match="backend"):
            capsule_routing(seq, mask, w, num_interests=2, backend="fast")

    def test_init_logits_shape(self):
        seq, mask, w = self.args()
        with pytest.raises(ValueError, match="init_logits"):
            capsule_routing(seq, mask, w, num_interests=2, init_logits=torch.randn(2, 3, 5))

    def test_mixed_devices(self):
        seq, mask, w = self.args()
        with pytest.raises(ValueError, match="weight"):
            capsule_routing(seq, mask, w.to("meta"), num_interests=2)
        with pytest.raises(ValueError, match="mask"):
            capsule_routing(seq, mask.to("meta"), w, num_interests=2)


class TestBackendChoice:
    def test_named_unavailable_backend_raises(self):
        seq, mask, w = TestBadInput().args()
        with pytest.raises(RuntimeError, match="cuda"):
            capsule_routing(seq, mask, w, num_interests=2, backend="cuda")

    def test_env_override(self, monkeypatch):
        seq, mask, w = TestBadInput().args()
        monkeypatch.setenv("SEQREC_FAST_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="cuda"):
            capsule_routing(seq, mask, w, num_interests=2)
        monkeypatch.setenv("SEQREC_FAST_BACKEND", "nonsense")
        with pytest.raises(ValueError, match="SEQREC_FAST_BACKEND"):
            capsule_routing(seq, mask, w, num_interests=2)

    def test_auto_on_cpu(self):
        want = "cpp" if "cpp" in FUSED else "eager"
        assert B.resolve("routing", "auto", torch.device("cpu")) == want

    def test_auto_fallback_warns_once(self, monkeypatch):
        monkeypatch.setattr(B._ext, "_C", None)
        monkeypatch.setattr(B, "_warned", set())
        with pytest.warns(RuntimeWarning, match="fell back to 'eager'"):
            assert B.resolve("routing", "auto", torch.device("cpu")) == "eager"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert B.resolve("routing", "auto", torch.device("cpu")) == "eager"


class TestModule:
    def test_mind_reproducible_with_generator(self):
        layer = CapsuleRouting(8, 3, bilinear="shared")
        seq = torch.randn(2, 6, 8)
        lengths = torch.tensor([6, 2])
        a = layer(seq, lengths, generator=torch.Generator().manual_seed(5))
        b = layer(seq, lengths, generator=torch.Generator().manual_seed(5))
        c = layer(seq, lengths, generator=torch.Generator().manual_seed(6))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert layer.weight.shape == (8, 8)

    def test_dr_shapes_and_grads(self):
        layer = CapsuleRouting(8, 4, seq_len=6)
        assert layer.weight.shape == (6, 32, 8)
        out = layer(torch.randn(3, 6, 8), torch.tensor([1, 6, 3]))
        assert out.shape == (3, 4, 8)
        out.sum().backward()
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()

    def test_requires_seq_len_for_per_position(self):
        with pytest.raises(ValueError, match="seq_len"):
            CapsuleRouting(8, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large(backend, bilinear, dtype):
    if not B.available("routing", backend, torch.device("cuda")):
        pytest.fail(f"backend {backend} not available on this GPU machine")
    torch.backends.cuda.matmul.allow_tf32 = False
    shape = (512, 200, 8, 64) if bilinear == "shared" else (256, 50, 4, 64)
    for detach, axis in ((True, "interest"), (False, "sequence")):
        seq, mask, w, init, gout = make(shape, bilinear, dtype, init=True, device="cuda")
        kw = dict(num_interests=shape[2], bilinear=bilinear, init_logits=init,
                  softmax_axis=axis, detach_routing=detach)
        got = run(lambda s, ww: capsule_routing(s, mask, ww, backend=backend, **kw), seq, w, gout)
        truth = run(lambda s, ww: routing_ref(s, mask, ww, **kw), seq.double(), w.double(),
                    gout.double())
        same = run(lambda s, ww: routing_ref(s, mask, ww, **kw), seq, w, gout)
        for name, a, e, t in zip(("v", "gs", "gw"), got, same, truth):
            assert_within_2x_eager(a, e, t, name=f"{backend} {name}")


@pytest.mark.parametrize("per_position", [True, False])
def test_cpp_backward_reuses_its_grad_u_buffer_only_when_free(per_position):
    """The C++ backward hands a large grad_u buffer (>= 4 MiB) out again once the previous
    gradient is gone: a gradient still held is never overwritten, and a reused (dirty) buffer
    gives the same values as a fresh one, padded positions included."""
    if "cpp" not in fused_backends("routing"):
        pytest.skip("C++ extension not built")
    if os.environ.get("SEQREC_FAST_REUSE_WORKSPACE") == "0":
        pytest.skip("the reusable workspace is turned off (SEQREC_FAST_REUSE_WORKSPACE=0)")
    from seqrec_fast import _ext

    g = torch.Generator().manual_seed(0)
    K, d = 4, 64
    B, L = (256, 16) if per_position else (1024, 16)          # grad_u of 4 MiB either way
    u = torch.randn(*((L, B, K, d) if per_position else (B, L, d)), generator=g)
    mask = torch.arange(L)[None, :] < torch.randint(1, L + 1, (B,), generator=g)[:, None]
    bwd = torch.ops.seqrec_fast.routing_bwd
    _, c, s = torch.ops.seqrec_fast.routing_fwd(u, mask, None, K, 3, False, False, True, "cpp")
    gvs = [torch.randn(B, K, d, generator=g) for _ in range(3)]

    def run(gv):
        return bwd(gv, None, mask, None, c, s, K, 3, False, False, True, per_position, "cpp")

    g1 = run(gvs[0])
    kept = g1.clone()
    g2 = run(gvs[1])                           # g1 still held: a new buffer
    assert g2.data_ptr() != g1.data_ptr()
    assert torch.equal(g1, kept)
    p2 = g2.data_ptr()
    del g2
    g3 = run(gvs[2])                           # g2 gone: its buffer again, still dirty
    assert g3.data_ptr() == p2 and g3._base is None
    fresh = run(gvs[2])                        # g3 held: a new buffer
    assert fresh.data_ptr() != g3.data_ptr()
    assert torch.equal(g3, fresh)
    assert torch.equal(g1, kept)
    # the buffer kept is the last one handed out; it can be released
    assert _ext._C.routing_workspace_cpu() == fresh.numel() * 4
    assert _ext._C.routing_workspace_cpu(release=True) == fresh.numel() * 4
    assert _ext._C.routing_workspace_cpu() == 0
    assert torch.equal(fresh, g3)                 # released by the cache, still ours


# ---------------------------------------------------------------------------------------------
# softmax_axis variants against formulas written here (not the package's reference)
# ---------------------------------------------------------------------------------------------
def formula(seq, mask, w, *, num_interests, iters, bilinear, init_logits, softmax_axis,
            detach_routing):
    """Capsule routing straight from the documented formulas, float64 autograd.

    "sequence" follows torch-rechub's CapsuleNetwork: softmax over the last axis of the
    (B, K, L) logits, then torch.where(mask == 0, 0, .), u_hat unmasked, logits of every
    position updated with matmul(u_hat, v).
    """
    B, L, d = seq.shape
    K = num_interests
    mb = mask[:, None, :]  # (B, 1, L)
    if softmax_axis != "sequence":
        seq = torch.where(mask[:, :, None], seq, torch.zeros((), dtype=seq.dtype))
    if bilinear == "shared":
        u = torch.einsum("oi,bli->blo", w, seq)[:, None].repeat(1, K, 1, 1)  # (B, K, L, d)
    else:
        u = torch.einsum("lkoi,bli->bklo", w.reshape(L, K, d, d), seq)
    b = torch.zeros(B, K, L, dtype=seq.dtype) if init_logits is None else \
        init_logits.to(seq.dtype).clone()
    for i in range(iters):
        uu = u.detach() if (detach_routing and i < iters - 1) else u
        if softmax_axis == "interest":
            c = torch.where(mb, torch.softmax(b, dim=1), torch.zeros(()).double())
        elif softmax_axis == "sequence":
            c = torch.where(mb == 0, torch.zeros(()).double(), torch.softmax(b, dim=-1))
        else:
            top = b.masked_fill(~mb, float("-inf")).amax(-1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros(()).double())
            e = torch.where(mb, torch.exp(b - top), torch.zeros(()).double())
            den = e.sum(-1, keepdim=True)
            c = e / torch.where(den > 0, den, torch.ones(()).double())
        s = torch.matmul(c.unsqueeze(2), uu).squeeze(2)  # (B, K, d)
        n = (s * s).sum(-1, keepdim=True)
        v = n / (1 + n) / torch.sqrt(n + 1e-9) * s
        if i < iters - 1:
            b = b + torch.matmul(uu, v.unsqueeze(-1)).squeeze(-1)
    return v


def variant_case(bilinear, seed=3):
    """(B=5, L=6, K=3, d=8): a full row, a length-1 row, an all-padded row, a non-prefix mask,
    and a row whose only real item is the last one."""
    g = torch.Generator().manual_seed(seed)
    B, L, K, d = 5, 6, 3, 8
    seq = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    if bilinear == "shared":
        w = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    else:
        w = torch.randn(L, K * d, d, generator=g, dtype=torch.float64) / d ** 0.5
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0] = True
    mask[1, 0] = True
    mask[3] = torch.tensor([True, False, True, True, False, True])
    mask[4, L - 1] = True
    init = torch.randn(B, K, L, generator=g, dtype=torch.float64)
    gout = torch.randn(B, K, d, generator=g, dtype=torch.float64)
    return seq, mask, w, init, gout, K


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("softmax_axis", ["interest", "sequence", "sequence_real"])
@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
@pytest.mark.parametrize("detach", [True, False])
def test_softmax_variants_match_formula(backend, softmax_axis, bilinear, detach):
    seq, mask, w, init, gout, K = variant_case(bilinear)
    dtype = torch.float32 if backend == "triton" else torch.float64
    kw = dict(num_interests=K, iters=3, bilinear=bilinear, init_logits=init,
              softmax_axis=softmax_axis, detach_routing=detach)
    got = run(lambda s, ww: capsule_routing(s, mask, ww, backend=backend, **kw),
              seq.to(dtype), w.to(dtype), gout.to(dtype))
    want = run(lambda s, ww: formula(s, mask, ww, **kw), seq, w, gout)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for name, a, e in zip(("interests", "grad seq_emb", "grad weight"), got, want):
        assert_close(a, e, name=f"{backend} {softmax_axis} {name}", **tol)


def test_sequence_is_torch_rechubs_softmax():
    # issue 12 reproducer: one real position out of 4, identity map, one iteration.
    # torch-rechub: c = softmax over all 4 positions (1/4 each) then zeroed -> |squash(u0/4)|.
    g = torch.Generator().manual_seed(0)
    e = torch.randn(1, 4, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, False, False]])

    def sq_norm(x):
        n = (x * x).sum()
        return (n / (1 + n) / torch.sqrt(n + 1e-9) * x).norm()

    for backend in ALL:
        dtype = torch.float32 if backend == "triton" else torch.float64
        kw = dict(num_interests=1, iters=1, bilinear="shared", backend=backend)
        got = capsule_routing(e.to(dtype), mask, torch.eye(8, dtype=dtype),
                              softmax_axis="sequence", **kw)
        assert abs(got.norm().item() - sq_norm(e[0, 0] / 4).item()) < 1e-6, backend
        real = capsule_routing(e.to(dtype), mask, torch.eye(8, dtype=dtype),
                               softmax_axis="sequence_real", **kw)
        assert abs(real.norm().item() - sq_norm(e[0, 0]).item()) < 1e-6, backend


@pytest.mark.parametrize("softmax_axis", ["interest", "sequence", "sequence_real"])
@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
def test_triton_chunked_rows_match_formula(softmax_axis, bilinear):
    # the streamed (several chunks per row) path of the Triton kernels, forced by block_l
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    from seqrec_fast.kernels import routing as kr
    from seqrec_fast.reference.routing import routing_iterations_ref  # noqa: F401 (layout doc)

    seq, mask, w, init, gout, K = variant_case(bilinear)
    B, L, d = seq.shape
    if softmax_axis != "sequence":
        seq = torch.where(mask[:, :, None], seq, torch.zeros((), dtype=seq.dtype))
    per_pos = bilinear == "per_position"
    for detach in (True, False):
        u64 = (torch.einsum("lod,bld->lbo", w, seq).reshape(L, B, K, d) if per_pos
               else seq @ w.t()).requires_grad_(True)
        if per_pos:
            uh = u64.permute(1, 2, 0, 3)
        else:
            uh = u64[:, None].expand(B, K, L, d)
        want = _iterations_formula(uh, mask, init, softmax_axis, detach)
        (gu_want,) = torch.autograd.grad(want, u64, gout)
        u = u64.detach().float()
        sa, sl = softmax_axis != "interest", softmax_axis == "sequence"
        v, c, s_ = kr._routing_fwd(u, mask, init.float(), K, 3, sa, sl, block_l=2)
        gu = kr._routing_bwd(gout.float(), u, mask, init.float(), c, s_, K, 3, sa, detach,
                             per_pos, sl, block_l=2)
        assert_close(v, want, atol=2e-5, rtol=1e-4, name=f"chunked v {softmax_axis}")
        assert_close(gu, gu_want, atol=2e-5, rtol=1e-4, name=f"chunked grad_u {softmax_axis}")


def _iterations_formula(u, mask, init, softmax_axis, detach, iters=3):
    """formula()'s iterations on a given u_hat (B, K, L, d)."""
    mb = mask[:, None, :]
    b = init.clone()
    z = torch.zeros((), dtype=u.dtype)
    for i in range(iters):
        uu = u.detach() if (detach and i < iters - 1) else u
        if softmax_axis == "interest":
            c = torch.where(mb, torch.softmax(b, dim=1), z)
        elif softmax_axis == "sequence":
            c = torch.where(mb, torch.softmax(b, dim=-1), z)
        else:
            c = torch.where(mb, torch.softmax(b.masked_fill(~mb, -1e300), dim=-1), z)
        s = torch.matmul(c.unsqueeze(2), uu).squeeze(2)
        n = (s * s).sum(-1, keepdim=True)
        v = n / (1 + n) / torch.sqrt(n + 1e-9) * s
        if i < iters - 1:
            b = b + torch.matmul(uu, v.unsqueeze(-1)).squeeze(-1)
    return v


# ---------------------------------------------------------------------------------------------
# issue 12: eager in half precision, non-finite padding, checks under compile, autocast
# ---------------------------------------------------------------------------------------------
def test_eager_half_precision_computes_in_fp32():
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(2, 4, 8, generator=g).half().requires_grad_(True)
    w = (torch.randn(4, 16, 8, generator=g) / 3).half().requires_grad_(True)
    lengths = torch.tensor([4, 0])
    out = capsule_routing(seq, lengths, w, num_interests=2, backend="eager")
    assert out.dtype == torch.float16
    out.float().square().sum().backward()
    for name, t in (("out", out), ("grad seq_emb", seq.grad), ("grad weight", w.grad)):
        assert torch.isfinite(t).all(), name
    want = capsule_routing(seq.detach().float(), lengths, w.detach().float(), num_interests=2,
                           backend="eager")
    assert torch.equal(out.detach(), want.half())
    if "cpp" in FUSED:
        cpp = capsule_routing(seq.detach(), lengths, w.detach(), num_interests=2, backend="cpp")
        assert_close(cpp, out.detach(), atol=2e-3, name="cpp vs eager fp16")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("softmax_axis", ["interest", "sequence_real"])
@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
@pytest.mark.parametrize("detach", [True, False])
def test_nonfinite_padding_changes_nothing(backend, softmax_axis, bilinear, detach):
    g = torch.Generator().manual_seed(1)
    B, L, K, d = 3, 6, 2, 8
    dtype = torch.float32 if backend == "triton" else torch.float64
    seq = torch.randn(B, L, d, generator=g, dtype=dtype)
    w = (torch.randn(d, d, generator=g) if bilinear == "shared"
         else torch.randn(L, K * d, d, generator=g)).to(dtype) / d ** 0.5
    gout = torch.randn(B, K, d, generator=g, dtype=dtype)
    lengths = torch.tensor([5, 3, 1])
    real = torch.arange(L)[None, :] < lengths[:, None]
    kw = dict(num_interests=K, bilinear=bilinear, softmax_axis=softmax_axis,
              detach_routing=detach, backend=backend)
    clean = run(lambda s, ww: capsule_routing(s, lengths, ww, **kw), seq, w, gout)
    dirty = seq.clone()
    dirty[1, 4] = float("nan")
    dirty[0, 5, :3] = float("inf")
    dirty[2, 1:] = float("-inf")
    got = run(lambda s, ww: capsule_routing(s, lengths, ww, **kw), dirty, w, gout)
    assert torch.equal(got[0], clean[0]), "interests"
    assert torch.equal(got[1][real], clean[1][real]), "grad seq_emb at real positions"
    assert torch.equal(got[1][~real], torch.zeros_like(got[1][~real])), "grad at padding"
    assert torch.equal(got[2], clean[2]), "grad weight"


def test_lengths_checked_under_compile():
    backend = FUSED[0] if FUSED else "eager"
    torch._dynamo.reset()
    seq = torch.randn(2, 5, 8)
    w = torch.randn(5, 16, 8)

    def fn(s, lengths):
        return capsule_routing(s, lengths, w, num_interests=2, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    good = torch.tensor([5, 2])
    assert_close(compiled(seq, good), fn(seq, good), atol=1e-6, name="compiled")
    for bad in (torch.tensor([6, 1]), torch.tensor([-1, 1])):
        with pytest.raises(ValueError) as eager_err:
            fn(seq, bad)
        with pytest.raises(ValueError) as compiled_err:
            compiled(seq, bad)
        assert str(compiled_err.value) == str(eager_err.value)


@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
def test_autocast_cpu_bf16(bilinear):
    torch.manual_seed(0)
    layer = CapsuleRouting(16, 3, seq_len=7, bilinear=bilinear, init_logits="zeros")
    seq = torch.randn(4, 7, 16)
    lengths = torch.tensor([7, 3, 0, 5])
    want = layer(seq, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(seq, lengths)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), want, atol=3e-2, rtol=3e-2, name="autocast interests")
    got.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# issue 11: MIND with u_hat computed inside the Triton kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softmax_axis", ["interest", "sequence", "sequence_real"])
@pytest.mark.parametrize("detach", [True, False])
def test_mind_fused_kernel(dtype, softmax_axis, detach, monkeypatch):
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    from seqrec_fast.kernels import routing as kr

    def unfused(*a, **k):
        raise AssertionError("the shared Triton path must not run the unfused kernels")

    monkeypatch.setattr(kr, "_routing_fwd", unfused)
    monkeypatch.setattr(kr, "_routing_bwd", unfused)
    seq, mask, w, init, gout, K = variant_case("shared", seed=5)
    kw = dict(num_interests=K, iters=3, bilinear="shared", init_logits=init,
              softmax_axis=softmax_axis, detach_routing=detach)
    got = run(lambda s, ww: capsule_routing(s, mask, ww, backend="triton", **kw),
              seq.to(dtype), w.to(dtype), gout.to(dtype))
    truth = run(lambda s, ww: routing_ref(s, mask, ww, **kw), seq, w, gout)
    # same-dtype eager: the plain computation in that dtype (GEMM output rounded like ours)
    same = run(lambda s, ww: routing_ref(s, mask, ww, **kw), seq.to(dtype), w.to(dtype),
               gout.to(dtype))
    for name, a, e, t in zip(("interests", "grad seq_emb", "grad weight"), got, same, truth):
        assert a.dtype == dtype, name
        assert_within_2x_eager(a, e, t, name=f"fused {dtype} {softmax_axis} {name}")


def test_mind_fused_partial_dw_reduction():
    # fewer programs than rows: each program accumulates several rows' dW before the sum
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    from seqrec_fast.kernels import routing as kr

    seq, mask, w, init, gout, K = variant_case("shared", seed=6)
    seq, w, gout = seq.float(), w.float(), gout.float()
    v, c, s = kr._routing_mind_fwd(seq, w, mask, init.float(), K, 3, False, False)
    for detach in (True, False):
        kw = dict(detach=detach, init_logits=init.float(), iters=3)
        de1, dw1 = kr._routing_mind_bwd(gout, seq, w, mask, c, s, K, programs=1, **kw)
        de3, dw3 = kr._routing_mind_bwd(gout, seq, w, mask, c, s, K, programs=3, **kw)
        assert torch.equal(de1, de3)  # the per-program scratch is reused row after row
        assert_close(dw3, dw1, atol=1e-6, rtol=1e-6, name="dW over 3 vs 1 programs")


def test_mind_fused_opcheck():
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    from seqrec_fast.ops.routing import _routing_mind_fwd_op

    b, l, k, d = 3, 6, 2, 16
    seq = torch.randn(b, l, d, requires_grad=True)
    w = (torch.randn(d, d) / 4).requires_grad_(True)
    mask = torch.rand(b, l) < 0.7
    init = torch.randn(b, k, l)
    for seq_axis, seq_all in ((False, False), (True, True)):
        for detach in (True, False):
            torch.library.opcheck(_routing_mind_fwd_op,
                                  (seq, w, mask, init, k, 3, seq_axis, seq_all, detach))


def test_mind_fused_under_compile():
    # the fused MIND ops are opaque custom ops: torch.compile(fullgraph=True) runs them as they
    # are (Triton under the interpreter here), with the same values, gradients and checks
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(3, 6, 16, generator=g, requires_grad=True)
    w = (torch.randn(16, 16, generator=g) / 4).requires_grad_(True)
    init = torch.randn(3, 2, 6, generator=g)

    def fn(s, ww, lengths):
        return capsule_routing(s, lengths, ww, num_interests=2, bilinear="shared",
                               init_logits=init, softmax_axis="sequence", backend="triton")

    lengths = torch.tensor([6, 2, 0])
    want = fn(seq, w, lengths)
    gw = torch.autograd.grad(want.sum(), (seq, w))
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    got = compiled(seq, w, lengths)
    gg = torch.autograd.grad(got.sum(), (seq, w))
    assert_close(got, want, atol=1e-6, name="compiled fused interests")
    for a, e in zip(gg, gw):
        assert_close(a, e, atol=1e-6, name="compiled fused gradient")
    with pytest.raises(ValueError, match="lengths"):
        compiled(seq, w, torch.tensor([7, 1, 0]))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("softmax_axis", ["interest", "sequence", "sequence_real"])
@pytest.mark.parametrize("bilinear", ["shared", "per_position"])
@pytest.mark.parametrize("detach", [True, False])
def test_softmax_variants_match_formula_cuda(backend, softmax_axis, bilinear, detach):
    # the CUDA C++ kernels and the GPU Triton kernels (fused MIND included) against formula()
    if not B.available("routing", backend, torch.device("cuda")):
        pytest.fail(f"backend {backend} not available on this GPU machine")
    torch.backends.cuda.matmul.allow_tf32 = False
    seq, mask, w, init, gout, K = variant_case(bilinear)
    kw = dict(num_interests=K, iters=3, bilinear=bilinear, softmax_axis=softmax_axis,
              detach_routing=detach)
    cuda = lambda t: t.to("cuda", torch.float32)  # noqa: E731
    got = run(lambda s, ww: capsule_routing(s, mask.cuda(), ww, init_logits=init.cuda(),
                                            backend=backend, **kw),
              cuda(seq), cuda(w), cuda(gout))
    want = run(lambda s, ww: formula(s, mask, ww, init_logits=init, **kw), seq, w, gout)
    for name, a, e in zip(("interests", "grad seq_emb", "grad weight"), got, want):
        assert_close(a.cpu(), e, atol=2e-5, rtol=1e-4, name=f"{backend} {softmax_axis} {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("detach", [True, False])
def test_mind_fused_cuda_headline(dtype, detach):
    # the fused MIND kernels at the headline (L, K, d) = (50, 4, 64), true bf16/fp16 dots
    if not B.available("routing", "triton", torch.device("cuda")):
        pytest.fail("triton not available on this GPU machine")
    from seqrec_fast.kernels import routing as kr

    assert kr.mind_fusable(50, 64, dtype)
    shape = (1024, 50, 4, 64)
    seq, mask, w, init, gout = make(shape, "shared", dtype, init=True, device="cuda")
    kw = dict(num_interests=4, bilinear="shared", init_logits=init, detach_routing=detach)
    got = run(lambda s, ww: capsule_routing(s, mask, ww, backend="triton", **kw), seq, w, gout)
    truth = run(lambda s, ww: routing_ref(s, mask, ww, **kw), seq.double(), w.double(),
                gout.double())
    same = run(lambda s, ww: routing_ref(s, mask, ww, **kw), seq, w, gout)
    for name, a, e, t in zip(("v", "gs", "gw"), got, same, truth):
        assert_within_2x_eager(a, e, t, name=f"fused {dtype} detach={detach} {name}")


@pytest.mark.parametrize("softmax_axis", ["interest", "sequence"])
def test_mind_row_too_large_for_registers_takes_the_unfused_kernels(softmax_axis, monkeypatch):
    # the dispatch boundary of the fused MIND kernels: a shared-map row of pow2(L)·pow2(d) >
    # _RESIDENT_MAX elements goes to the unfused (streamed) Triton kernels, with the reference's
    # values and gradients (L=129: odd, several chunks; an all-padded row)
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    from seqrec_fast.kernels import routing as kr

    assert kr.mind_fusable(128, 64, torch.float32)
    assert not kr.mind_fusable(129, 33, torch.float32)

    def fused(*a, **k):
        raise AssertionError("a row this large must not take the fused MIND kernels")

    monkeypatch.setattr(kr, "_routing_mind_fwd", fused)
    monkeypatch.setattr(kr, "_routing_mind_bwd", fused)
    check_against_reference("triton", (2, 129, 2, 33), "shared", torch.float32, softmax_axis,
                            softmax_axis == "interest", True)
