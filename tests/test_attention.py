"""multi_interest_attention (ComiRec-SA) and label_aware_attention: values and every gradient
of every backend against the float64 reference."""
from __future__ import annotations

import math
import os

import pytest
import torch

from _util import assert_close, assert_within_2x_eager, describe_error, fused_backends
from seqrec_fast import backend as B
from seqrec_fast.nn.attention import MultiInterestAttention
from seqrec_fast.ops.attention import (_attention_fwd_op, label_aware_attention,
                                       multi_interest_attention)
from seqrec_fast.reference.attention import attention_ref, label_aware_attention_ref

FUSED = fused_backends("attention")
ALL = ["eager"] + FUSED
SHAPES = [  # (B, L, K, d, d_a)
    (1, 1, 1, 8, 32),
    (3, 37, 7, 24, 40),      # L=37, K=7, d=24, d_a not a power of two
    (4, 20, 4, 16, 64),
    (2, 5, 1, 32, 100),      # K=1, d_a spans several 64-wide chunks
    (5, 8, 3, 64, 48),
    (2, 70, 2, 8, 24),       # L over one 64-position chunk (online softmax across chunks)
]
NAMES = ("interests", "attention", "grad seq_emb", "grad w1", "grad b1", "grad w2", "grad b2",
         "grad pos_emb")


def make(shape, dtype=torch.float64, *, seed=0, all_padded_row=True, device="cpu"):
    """-> tensors [seq, w1, b1, w2, b2, pos], mask, (grad_out, grad_att) in ``dtype``."""
    b, l, k, d, da = shape
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    seq = rn(b, l, d) * 0.7
    w1 = rn(d, da) / d ** 0.5
    b1 = rn(da) * 0.1
    w2 = rn(da, k) * 2 / da ** 0.5
    b2 = rn(k) * 0.1
    pos = rn(l, d) * 0.3
    mask = torch.rand(b, l, generator=g) < 0.75
    if all_padded_row and b > 1:
        mask[-1] = False
    mask[0, 0] = True
    grads = (rn(b, k, d), rn(b, k, l))
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return [cast(t) for t in (seq, w1, b1, w2, b2, pos)], mask.to(device), \
        tuple(cast(t) for t in grads)


def run(fn, tensors, grads, *, bias=True, pos=True, att=True):
    """Outputs and the gradients of every present input, in NAMES order (None when absent)."""
    ts = [t.detach().clone().requires_grad_(True) for t in tensors]
    use = [ts[0], ts[1], ts[2] if bias else None, ts[3], ts[4] if bias else None,
           ts[5] if pos else None]
    out = fn(*use, att)
    outs = out if att else (out,)
    present = [t for t in use if t is not None]
    gs = iter(torch.autograd.grad(outs, present, grads[:len(outs)]))
    res = [outs[0].detach(), outs[1].detach() if att else None]
    res += [next(gs) if t is not None else None for t in use]
    return res


def op(backend, mask):
    return lambda s, w1, b1, w2, b2, p, att: multi_interest_attention(
        s, mask, w1, b1, w2, b2, pos_emb=p, return_attention=att, backend=backend)


def ref(mask):
    return lambda s, w1, b1, w2, b2, p, att: attention_ref(
        s, mask, w1, b1, w2, b2, pos_emb=p, return_attention=att)


def check_against_reference(backend, shape, dtype, *, bias=True, pos=True, att=True,
                            device="cpu"):
    tensors, mask, grads = make(shape, dtype, device=device)
    kw = dict(bias=bias, pos=pos, att=att)
    got = run(op(backend, mask), tensors, grads, **kw)
    truth = run(ref(mask), [t.double() for t in tensors], tuple(g.double() for g in grads), **kw)
    same = run(ref(mask), tensors, grads, **kw)
    for name, a, e, t in zip(NAMES, got, same, truth):
        if t is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, name
        assert_within_2x_eager(a, e, t, name=f"{backend} {dtype} {shape} {name}")
    empty = ~mask.any(1)
    if empty.any():  # all-padded rows: zero interests, zero attention, zero gradients
        for i in (0, 2):
            assert torch.equal(got[i][empty], torch.zeros_like(got[i][empty])), NAMES[i]
        if att:
            assert torch.equal(got[1][empty], torch.zeros_like(got[1][empty]))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_reference(backend, shape):
    i = SHAPES.index(shape)  # vary the options across shapes
    check_against_reference(backend, shape, torch.float32, bias=i % 2 == 0,
                            pos=(i // 2) % 2 == 0, att=i % 3 != 1)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 13, 4, 32, 48), (2, 40, 3, 24, 72)],
                         ids=lambda s: "x".join(map(str, s)))
def test_half_precision(backend, dtype, shape):
    check_against_reference(backend, shape, dtype, att=shape[1] == 13)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("options", [(True, True, True), (False, False, False)],
                         ids=["all", "bare"])
def test_float64_exact(backend, options):
    bias, pos, att = options
    tensors, mask, grads = make((3, 9, 3, 8, 20))
    kw = dict(bias=bias, pos=pos, att=att)
    got = run(op(backend, mask), tensors, grads, **kw)
    want = run(ref(mask), tensors, grads, **kw)
    for name, a, e in zip(NAMES, got, want):
        if e is None:
            assert a is None
            continue
        assert_close(a, e, atol=1e-12, rtol=1e-10, name=f"{backend} {name}")


def _need_cpp():
    if "cpp" not in FUSED:
        if os.environ.get("SEQREC_FAST_REQUIRE_EXT") == "1":
            pytest.fail("the C++ extension is not built")
        pytest.skip("C++ extension not built")


@pytest.mark.parametrize("options", [(True, True, True), (False, False, False),
                                     (True, False, True)], ids=["all", "bare", "bias-att"])
def test_gradcheck_cpp(options):
    _need_cpp()
    bias, pos, att = options
    tensors, mask, _ = make((2, 4, 2, 3, 5))
    mask[1] = torch.tensor([True, False, True, False])
    ts = [t.requires_grad_(True) for t in tensors]

    def fn(s, w1, b1, w2, b2, p):
        return multi_interest_attention(s, mask, w1, b1 if bias else None, w2,
                                        b2 if bias else None, pos_emb=p if pos else None,
                                        return_attention=att, backend="cpp")

    assert torch.autograd.gradcheck(fn, tuple(ts), eps=1e-6, atol=1e-7)


def test_gradcheck_triton():
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    tensors, mask, _ = make((2, 3, 2, 4, 5))
    ts = [t.requires_grad_(True) for t in tensors]

    def fn(s, w1, b1, w2, b2, p):
        return multi_interest_attention(s, mask, w1, b1, w2, b2, pos_emb=p,
                                        return_attention=True, backend="triton")

    assert torch.autograd.gradcheck(fn, tuple(ts), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("options", [(True, True), (False, False)], ids=["all", "bare"])
def test_opcheck(backend, options):
    bias, pos = options
    tensors, mask, _ = make((3, 6, 2, 8, 12), torch.float32)
    s, w1, b1, w2, b2, p = [t.requires_grad_(True) for t in tensors]
    torch.library.opcheck(_attention_fwd_op, (s, mask, w1, b1 if bias else None, w2,
                                              b2 if bias else None, p if pos else None,
                                              backend))


def test_torch_compile_fullgraph():
    backend = "cpp" if "cpp" in FUSED else "eager"
    torch._dynamo.reset()
    layer = MultiInterestAttention(16, 3, seq_len=7, backend=backend).double()
    with torch.no_grad():
        layer.b1.normal_()
        layer.b2.normal_()
    seq = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 3, 0, 5])
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    for att in (False, True):
        mask = lengths if not att else torch.arange(7)[None, :] < lengths[:, None]
        want = layer(seq, mask, return_attention=att)
        got = compiled(seq, mask, return_attention=att)
        want, got = (want, got) if att else ((want,), (got,))
        loss = lambda outs: sum((o * o).sum() for o in outs)  # noqa: E731
        params = [seq] + list(layer.parameters())
        g_want = torch.autograd.grad(loss(want), params)
        g_got = torch.autograd.grad(loss(got), params)
        for a, e in zip(got + g_got, want + g_want):
            assert_close(a, e, atol=1e-10, rtol=1e-8, name="compiled")


@pytest.mark.parametrize("backend", FUSED)
def test_saves_no_hidden_activations(backend):
    b, l, k, d, da = 8, 10, 4, 16, 64
    tensors, mask, _ = make((b, l, k, d, da), torch.float32)
    s, w1, b1, w2, b2, p = [t.requires_grad_(True) for t in tensors]
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        multi_interest_attention(s, mask, w1, b1, w2, b2, pos_emb=p, backend=backend)
    assert sizes and max(sizes) <= b * l * d < b * l * da, sizes


def test_cpp_threaded_blocks_with_grad():
    """Batches big enough for several threads/blocks, params requiring grad (worker threads
    have their own grad mode), several chunks of rows per block."""
    _need_cpp()
    for shape in [(80, 8, 3, 16, 24), (150, 20, 2, 8, 20)]:
        check_against_reference("cpp", shape, torch.float32)
    # weight gradients reduced in a fixed order: bitwise reproducible
    tensors, mask, grads = make((300, 20, 2, 8, 20), torch.float32)
    a = run(op("cpp", mask), tensors, grads)
    b = run(op("cpp", mask), tensors, grads)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("backend", ALL)
def test_non_contiguous_inputs(backend):
    tensors, mask, grads = make((3, 7, 2, 8, 12), torch.float32)
    s, w1, b1, w2, b2, p = tensors
    s_nc = s.transpose(0, 1).contiguous().transpose(0, 1)
    w1_nc = w1.t().contiguous().t()
    w2_nc = w2.t().contiguous().t()
    mask_nc = mask.t().contiguous().t()
    assert not (s_nc.is_contiguous() or w1_nc.is_contiguous() or mask_nc.is_contiguous())
    got = run(op(backend, mask_nc), [s_nc, w1_nc, b1, w2_nc, b2, p], grads)
    want = run(op(backend, mask), tensors, grads)
    for name, a, e in zip(NAMES, got, want):
        assert_close(a, e, atol=1e-6, rtol=1e-5, name=f"{backend} {name}")


def test_lengths_equal_prefix_mask():
    tensors, _, _ = make((4, 6, 2, 8, 16))
    lengths = torch.tensor([6, 0, 2, 5])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    s, w1, b1, w2, b2, p = tensors
    for backend in ALL:
        a = multi_interest_attention(s, lengths, w1, b1, w2, b2, pos_emb=p, backend=backend)
        c = multi_interest_attention(s, mask, w1, b1, w2, b2, pos_emb=p, backend=backend)
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ALL)
def test_padding_content_is_ignored(backend):
    tensors, mask, _ = make((3, 9, 3, 16, 32), torch.float32)
    s, w1, b1, w2, b2, p = tensors
    a, wa = multi_interest_attention(s, mask, w1, b1, w2, b2, pos_emb=p, return_attention=True,
                                     backend=backend)
    s2 = s.clone()
    s2[~mask] = 1e3
    c, wc = multi_interest_attention(s2, mask, w1, b1, w2, b2, pos_emb=p, return_attention=True,
                                     backend=backend)
    assert torch.allclose(a, c, atol=1e-5) and torch.allclose(wa, wc, atol=1e-6)
    # attention rows are distributions over the real positions
    sums = wa.sum(-1)
    real = mask.any(1)
    assert torch.allclose(sums[real], torch.ones_like(sums[real]), atol=1e-5)
    assert torch.equal(wa.masked_select(~mask[:, None, :].expand_as(wa)),
                       torch.zeros(int((~mask[:, None, :].expand_as(wa)).sum())))


@pytest.mark.parametrize("backend", ALL)
def test_all_rows_padded(backend):
    tensors, _, _ = make((3, 5, 2, 8, 16), torch.float32)
    ts = [t.requires_grad_(True) for t in tensors]
    mask = torch.zeros(3, 5, dtype=torch.bool)
    out, att = multi_interest_attention(ts[0], mask, *ts[1:5], pos_emb=ts[5],
                                        return_attention=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(att, torch.zeros_like(att))
    (out.sum() + att.sum()).backward()
    for t in ts:
        assert torch.isfinite(t.grad).all() and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("backend", ALL)
def test_empty_batch(backend):
    tensors, _, _ = make((1, 5, 2, 8, 16), torch.float32)
    s = torch.randn(0, 5, 8)
    with pytest.raises(ValueError, match="seq_emb.*empty batch"):
        multi_interest_attention(s, torch.zeros(0, 5, dtype=torch.bool), tensors[1], tensors[2],
                                 tensors[3], tensors[4], backend=backend)


def test_hypothesis_random_shapes():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    backends = [b for b in FUSED if b == "cpp"] or ["eager"]

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(b=st.integers(1, 4), l=st.integers(1, 12), k=st.integers(1, 6),
                      d=st.integers(1, 20), da=st.integers(1, 40), seed=st.integers(0, 2**16),
                      bias=st.booleans(), pos=st.booleans(), att=st.booleans())
    def check(b, l, k, d, da, seed, bias, pos, att):
        tensors, mask, grads = make((b, l, k, d, da), seed=seed)
        kw = dict(bias=bias, pos=pos, att=att)
        want = run(ref(mask), tensors, grads, **kw)
        for backend in backends:
            got = run(op(backend, mask), tensors, grads, **kw)
            for name, a, e in zip(NAMES, got, want):
                if e is not None:
                    assert_close(a, e, atol=1e-11, rtol=1e-9, name=f"{backend} {name}")

    check()


def test_hypothesis_triton():
    if "triton" not in FUSED:
        pytest.skip("triton not available")
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
    @hypothesis.given(b=st.integers(1, 3), l=st.integers(1, 20), k=st.integers(1, 5),
                      d=st.integers(1, 20), da=st.integers(1, 70), seed=st.integers(0, 2**16))
    def check(b, l, k, d, da, seed):
        tensors, mask, grads = make((b, l, k, d, da), seed=seed)
        got = run(op("triton", mask), tensors, grads)
        want = run(ref(mask), tensors, grads)
        for name, a, e in zip(NAMES, got, want):
            assert_close(a, e, atol=1e-11, rtol=1e-9, name=f"triton {name}")

    check()


# ------------------------------------------------ half-precision oracle, padding, non-finite

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_computes_half_in_fp32(dtype):
    """attention_ref / label_aware_attention_ref on fp16/bf16 = the fp32 computation on the same
    (rounded) inputs, cast back: values and gradients, bitwise."""
    tensors, mask, grads = make((3, 9, 3, 16, 20), dtype)
    half = run(ref(mask), tensors, grads)
    full = run(ref(mask), [t.float() for t in tensors], tuple(g.float() for g in grads))
    for name, a, e in zip(NAMES, half, full):
        assert a.dtype == dtype, name
        assert torch.equal(a, e.to(dtype)), f"{name}: {describe_error(a, e)}"
    v, e = tensors[0][:, :3, :], tensors[0][:, 4, :]
    for p in (math.inf, 1.0, 2.0):
        got = label_aware_attention_ref(v, e, p)
        assert got.dtype == dtype
        assert torch.equal(got, label_aware_attention_ref(v.float(), e.float(), p).to(dtype)), p


@pytest.mark.parametrize("backend", ALL)
def test_fp16_logits_beyond_half_range(backend):
    """Logits beyond fp16's 65504 (b2 = 65000 shifts them all; the softmax does not care): a
    half-precision h·w2 + b2 overflows to inf and the softmax gives NaN; every backend (the
    eager reference included) computes in fp32 and gets the float64 result."""
    tensors, mask, _ = make((3, 9, 3, 16, 20))
    tensors[3] = tensors[3] * 30       # w2: logit gaps of tens
    tensors[4] = torch.full_like(tensors[4], 65000.0)
    h = [t.half() for t in tensors]
    out, att = multi_interest_attention(h[0], mask, *h[1:5], pos_emb=h[5],
                                        return_attention=True, backend=backend)
    assert out.dtype == att.dtype == torch.float16
    # float64 computation on the same (fp16-rounded) inputs
    d = [t.double() for t in h]
    want = multi_interest_attention(d[0], mask, *d[1:5], pos_emb=d[5], return_attention=True,
                                    backend="eager")
    assert_close(out, want[0], atol=5e-3, rtol=2e-3, name=f"{backend} interests")
    assert_close(att, want[1], atol=2e-3, name=f"{backend} attention")


def test_label_aware_half_scores_beyond_half_range():
    """Scores of ~3e2 (squared: 1e5, beyond fp16) in the soft readout, and two interests whose
    fp16 scores would both overflow to inf in the hard one: computed in fp32 inside."""
    v = torch.zeros(2, 3, 4, dtype=torch.float64)
    v[:, 0, 0], v[:, 1, 0], v[:, 2, 0] = 250.0, 300.0, -100.0
    v[:, :, 1] = torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)
    e = torch.zeros(2, 4, dtype=torch.float64)
    e[:, 0] = 1.0
    for p, scale in ((2.0, 1.0), (math.inf, 400.0)):   # hard: scores 1e5, 1.2e5 overflow fp16
        want = label_aware_attention(v, e * scale, exponent=p)
        got = label_aware_attention(v.half(), (e * scale).half(), exponent=p)
        assert got.dtype == torch.float16
        assert_close(got, want, atol=1e-3, rtol=1e-3, name=f"exponent {p}")


def _plant(t, mask, value):
    t = t.clone()
    t[~mask] = value
    return t


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape", [(3, 9, 3, 16, 20), (2, 70, 2, 8, 24)],
                         ids=lambda s: "x".join(map(str, s)))
def test_nonfinite_padding_changes_nothing(backend, value, shape):
    """NaN/Inf in seq_emb at padded positions: every value and every gradient (seq_emb's at
    every position, w1, b1, w2, b2, pos_emb) is what clean padding gives; the all-padded row
    keeps zero interests, zero attention and zero gradients."""
    tensors, mask, grads = make(shape, torch.float32)
    assert (~mask).any() and not mask[-1].any()
    clean = run(op(backend, mask), tensors, grads)
    dirty = run(op(backend, mask), [_plant(tensors[0], mask, value)] + tensors[1:], grads)
    for name, a, e in zip(NAMES, dirty, clean):
        assert_close(a, e, atol=1e-6, rtol=1e-6, name=f"{backend} {value} {name}")
    assert torch.count_nonzero(dirty[2][~mask]) == 0   # d seq_emb at padded positions
    for i in (0, 1):
        assert torch.count_nonzero(dirty[i][-1]) == 0, NAMES[i]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("value", [math.inf, -math.inf], ids=["inf", "-inf"])
def test_nonfinite_real_input_as_eager(backend, value):
    """An Inf in seq_emb at a real position: every backend gives PyTorch's (the eager
    reference's) result: ±inf in that feature of each interest of the row (the keys saturate
    tanh), the attention and all other entries finite and equal."""
    tensors, mask, _ = make((2, 7, 3, 16, 20), torch.float32)
    s = tensors[0].clone()
    s[0, 0, 3] = value
    want = multi_interest_attention(s, mask, *tensors[1:5], pos_emb=tensors[5],
                                    return_attention=True, backend="eager")
    got = multi_interest_attention(s, mask, *tensors[1:5], pos_emb=tensors[5],
                                   return_attention=True, backend=backend)
    assert int(torch.isinf(want[0]).sum()) == 3 and not torch.isnan(want[0]).any()
    for name, a, e in zip(("interests", "attention"), got, want):
        for pred in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(pred(a), pred(e)), f"{backend} {name} {pred.__name__}"
        fin = torch.isfinite(e)
        assert_close(a[fin], e[fin], atol=1e-5, rtol=1e-5, name=f"{backend} {name}")


# ------------------------------------------------------------------ compile checks, autocast

def _compile_backends():
    return [b for b in ALL if b != "triton"]  # triton_op cannot be traced under the interpreter


@pytest.mark.parametrize("backend", _compile_backends())
def test_bad_input_raises_the_same_compiled(backend):
    """Lengths above seq_len, negative lengths, a mask of the wrong shape, a weight of another
    dtype: the same ValueError/TypeError from torch.compile(fullgraph=True) as eagerly."""
    torch._dynamo.reset()
    tensors, _, _ = make((2, 5, 2, 8, 12), torch.float32)
    s, w1, b1, w2, b2, p = tensors

    def f(s, mask, w1):
        return multi_interest_attention(s, mask, w1, b1, w2, b2, pos_emb=p, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    good = compiled(s, torch.tensor([5, 2]), w1)
    assert_close(good, f(s, torch.tensor([5, 2]), w1), atol=1e-6, name="compiled")
    # lengths are data: the graph compiled above runs the check (no recompilation)
    for lengths in ([6, 2], [-1, 2]):
        for fn in (f, compiled):
            with pytest.raises(ValueError, match=r"mask lengths must lie in \[0, 5\]"):
                fn(s, torch.tensor(lengths), w1)
    # argument errors found while tracing (fresh compilations, as a first call would be)
    cases = [(ValueError, "mask must have shape", (s, torch.ones(2, 4, dtype=torch.bool), w1)),
             (TypeError, "w1 has dtype", (s, torch.tensor([5, 2]), w1.double()))]
    for err, msg, args in cases:
        with pytest.raises(err, match=msg):
            f(*args)
        torch._dynamo.reset()
        with pytest.raises(err, match=msg):
            torch.compile(f, fullgraph=True, backend="inductor")(*args)


def test_lengths_mask_op():
    from seqrec_fast.ops._common import _lengths_mask_op
    torch.library.opcheck(_lengths_mask_op, (torch.tensor([3, 0, 5]), 5))
    assert torch.equal(_lengths_mask_op(torch.tensor([2, 0]), 3),
                       torch.tensor([[True, True, False], [False, False, False]]))


@pytest.mark.parametrize("backend", ALL)
def test_lengths_errors_match_routing(backend):
    """Attention and routing share one lengths op: the same error for the same bad lengths."""
    from seqrec_fast.ops import capsule_routing
    tensors, _, _ = make((2, 5, 2, 8, 12), torch.float32)
    s, w1, b1, w2, b2, p = tensors
    w = torch.randn(8, 8)
    for lengths in ([6, 2], [-1, 2]):
        errs = []
        for call in (lambda m: multi_interest_attention(s, m, w1, b1, w2, b2, backend=backend),
                     lambda m: capsule_routing(s, m, w, num_interests=2, bilinear="shared",
                                               backend=backend)):
            with pytest.raises(ValueError) as e:
                call(torch.tensor(lengths))
            errs.append(str(e.value))
        assert errs[0] == errs[1] and "mask lengths must lie in [0, 5]" in errs[0], errs


@pytest.mark.cuda
def test_cuda_lengths_never_sync():
    """Int lengths on CUDA are checked by a device-side assert: no host sync (as routing)."""
    tensors, _, _ = make((64, 20, 4, 32, 128), torch.float32, device="cuda")
    s, w1, b1, w2, b2, p = tensors
    lengths = torch.randint(0, 21, (64,), device="cuda")
    multi_interest_attention(s, lengths, w1, b1, w2, b2, backend="triton")   # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        multi_interest_attention(s, lengths, w1, b1, w2, b2, pos_emb=p, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("seq_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autocast_cpu_bf16(backend, seq_dtype):
    """Under torch.autocast("cpu", bfloat16) the layer (fp32 parameters) takes fp32 or bf16
    sequences, runs in bf16 and returns bf16 close to the fp32 result; gradients reach the
    fp32 parameters (fp32, close to the fp32 gradients)."""
    torch.manual_seed(0)
    layer = MultiInterestAttention(16, 3, hidden_dim=24, seq_len=7, backend=backend)
    with torch.no_grad():
        layer.b1.normal_(0, 0.1)
        layer.b2.normal_(0, 0.1)
    seq = torch.randn(4, 7, 16)
    lengths = torch.tensor([7, 3, 0, 5])
    out32 = layer(seq, lengths)
    g32 = torch.autograd.grad(out32.square().sum(), list(layer.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(seq.to(seq_dtype), lengths)
        loss = out.float().square().sum()
    assert out.dtype == torch.bfloat16
    scale = max(1.0, out32.abs().max().item())
    assert_close(out, out32, atol=3e-2 * scale, name=f"{backend} autocast interests")
    grads = torch.autograd.grad(loss, list(layer.parameters()))
    gscale = max(g.abs().max().item() for g in g32)  # b2's gradient is ~0: one common scale
    for (name, prm), g, g_ref in zip(layer.named_parameters(), grads, g32):
        assert g.dtype == torch.float32, name
        assert_close(g, g_ref, atol=3e-2 * gscale, name=f"{backend} autocast grad {name}")
    # the readout under autocast: bf16 interests, fp32 target
    with torch.autocast("cpu", dtype=torch.bfloat16):
        user = label_aware_attention(out, torch.randn(4, 16), exponent=1.0)
    assert user.dtype == torch.bfloat16


class TestBadInput:
    def args(self):
        s = torch.randn(2, 5, 8)
        return [s, torch.ones(2, 5, dtype=torch.bool), torch.randn(8, 12), torch.randn(12),
                torch.randn(12, 3), torch.randn(3)]

    def call(self, args, **kw):
        return multi_interest_attention(*args, **kw)

    def swap(self, i, value, **kw):
        args = self.args()
        args[i] = value
        return self.call(args, **kw)

    def test_seq_emb(self):
        with pytest.raises(ValueError, match="seq_emb"):
            self.swap(0, torch.randn(5, 8))
        with pytest.raises(TypeError, match="seq_emb"):
            self.swap(0, torch.randn(2, 5, 8).long())
        with pytest.raises(TypeError, match="seq_emb"):
            self.swap(0, [[1.0]])
        with pytest.raises(ValueError, match="seq_emb"):
            self.swap(0, torch.randn(2, 0, 8))

    def test_mask(self):
        with pytest.raises(ValueError, match="mask"):
            self.swap(1, torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(TypeError, match="mask"):
            self.swap(1, torch.ones(2, 5))
        with pytest.raises(ValueError, match="mask"):
            self.swap(1, torch.tensor([6, 1]))
        with pytest.raises(ValueError, match="mask"):
            self.swap(1, torch.ones(2, 5, dtype=torch.bool, device="meta"))

    def test_weights(self):
        with pytest.raises(ValueError, match="w1"):
            self.swap(2, torch.randn(7, 12))
        with pytest.raises(ValueError, match="w1"):
            self.swap(2, torch.randn(8, 12, 1))
        with pytest.raises(ValueError, match="b1"):
            self.swap(3, torch.randn(11))
        with pytest.raises(ValueError, match="w2"):
            self.swap(4, torch.randn(11, 3))
        with pytest.raises(ValueError, match="w2"):
            self.swap(4, torch.randn(12, 0))
        with pytest.raises(ValueError, match="b2"):
            self.swap(5, torch.randn(4))
        with pytest.raises(TypeError, match="w2"):
            self.swap(4, torch.randn(12, 3, dtype=torch.float64))
        with pytest.raises(TypeError, match="b1"):
            self.swap(3, torch.randn(12).half())
        with pytest.raises(ValueError, match="w1"):
            self.swap(2, torch.randn(8, 12, device="meta"))

    def test_pos_emb(self):
        with pytest.raises(ValueError, match="pos_emb"):
            self.call(self.args(), pos_emb=torch.randn(6, 8))
        with pytest.raises(TypeError, match="pos_emb"):
            self.call(self.args(), pos_emb=torch.randn(5, 8).double())

    def test_options(self):
        with pytest.raises(TypeError, match="return_attention"):
            self.call(self.args(), return_attention=1)
        with pytest.raises(ValueError, match="backend"):
            self.call(self.args(), backend="fast")
        with pytest.raises(RuntimeError, match="cuda"):
            self.call(self.args(), backend="cuda")


class TestModule:
    def test_defaults_and_shapes(self):
        layer = MultiInterestAttention(8, 4)
        assert layer.w1.shape == (8, 32) and layer.w2.shape == (32, 4)
        assert layer.pos_emb is None and torch.count_nonzero(layer.b1) == 0
        out = layer(torch.randn(3, 6, 8), torch.tensor([1, 6, 0]))
        assert out.shape == (3, 4, 8) and torch.equal(out[2], torch.zeros(4, 8))
        out.sum().backward()
        assert torch.isfinite(layer.w1.grad).all()

    def test_position_embedding(self):
        layer = MultiInterestAttention(8, 2, hidden_dim=20, seq_len=6, bias=False)
        assert layer.pos_emb.shape == (6, 8) and layer.b1 is None
        seq = torch.randn(2, 6, 8)
        out, att = layer(seq, torch.tensor([6, 3]), return_attention=True)
        assert att.shape == (2, 2, 6)
        out.sum().backward()
        assert layer.pos_emb.grad is not None and torch.count_nonzero(layer.pos_emb.grad) > 0
        # a shorter history takes the table's first L rows; a longer one is refused
        short = torch.randn(2, 5, 8)
        want = multi_interest_attention(short, torch.tensor([5, 3]), layer.w1, None, layer.w2,
                                        None, pos_emb=layer.pos_emb[:5], backend="eager")
        assert_close(layer(short, torch.tensor([5, 3])), want, atol=1e-6, name="short")
        with pytest.raises(ValueError, match="pos_emb"):
            layer(torch.randn(2, 7, 8), torch.tensor([5, 3]))
        compiled = torch.compile(layer, fullgraph=True)            # the same error compiled
        with pytest.raises(ValueError, match="pos_emb"):
            compiled(torch.randn(2, 7, 8), torch.tensor([5, 3]))

    def test_matches_functional(self):
        layer = MultiInterestAttention(8, 3, seq_len=5).double()
        seq = torch.randn(2, 5, 8, dtype=torch.float64)
        mask = torch.tensor([5, 2])
        want = attention_ref(seq, torch.arange(5)[None] < mask[:, None], layer.w1, layer.b1,
                             layer.w2, layer.b2, pos_emb=layer.pos_emb)
        assert_close(layer(seq, mask), want, atol=1e-12, name="module")

    def test_bad_args(self):
        with pytest.raises(ValueError, match="dim"):
            MultiInterestAttention(0, 2)
        with pytest.raises(TypeError, match="num_interests"):
            MultiInterestAttention(8, 2.0)
        with pytest.raises(ValueError, match="seq_len"):
            MultiInterestAttention(8, 2, seq_len=0)


class TestLabelAware:
    def data(self, b=5, k=4, d=8, dtype=torch.float64, seed=0):
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(b, k, d, generator=g, dtype=torch.float64).to(dtype)
        e = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
        return v, e

    def test_hard_readout_picks_best_interest(self):
        v, e = self.data()
        out = label_aware_attention(v, e)
        best = torch.einsum("bkd,bd->bk", v, e).argmax(1)
        assert torch.equal(out, v[torch.arange(5), best])

    def test_hard_readout_gradients(self):
        v, e = self.data()
        v.requires_grad_(True)
        e.requires_grad_(True)
        out = label_aware_attention(v, e, exponent=math.inf)
        g = torch.randn_like(out)
        gv, = torch.autograd.grad(out, v, g)
        best = torch.einsum("bkd,bd->bk", v, e).argmax(1)
        want = torch.zeros_like(v)
        want[torch.arange(5), best] = g
        assert torch.equal(gv, want)
        assert out.grad_fn is not None

    @pytest.mark.parametrize("p", [1.0, 2.0, 3])
    def test_soft_readout(self, p):
        v, e = self.data()
        scores = torch.einsum("bkd,bd->bk", v, e)
        w = torch.softmax(scores ** p, dim=1)
        want = (w[:, :, None] * v).sum(1)
        assert_close(label_aware_attention(v, e, exponent=p), want, atol=1e-12, name="soft")
        assert_close(label_aware_attention_ref(v, e, p), want, atol=1e-12, name="soft ref")

    @pytest.mark.parametrize("p", [1.0, 2.0])
    def test_soft_readout_gradcheck(self, p):
        v, e = self.data(b=3, k=3, d=4)
        v.requires_grad_(True)
        e.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: label_aware_attention(a, b, exponent=p), (v, e))

    def test_large_pow_approaches_hard(self):
        v, e = self.data(dtype=torch.float64)
        e = e * 10
        hard = label_aware_attention(v, e)
        # odd large power of positive-dominant scores: the softmax concentrates on the argmax
        soft = label_aware_attention(v, e, exponent=31)
        pos = torch.einsum("bkd,bd->bk", v, e).max(1).values > 1
        assert_close(soft[pos], hard[pos], atol=1e-6, name="pow 31")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_dtypes(self, dtype):
        v, e = self.data(dtype=dtype)
        assert label_aware_attention(v, e).dtype == dtype
        assert label_aware_attention(v, e, exponent=1.0).dtype == dtype

    def test_bad_input(self):
        v, e = self.data()
        with pytest.raises(ValueError, match="interests"):
            label_aware_attention(v[0], e)
        with pytest.raises(ValueError, match="target_emb"):
            label_aware_attention(v, e[:, :3])
        with pytest.raises(ValueError, match="target_emb"):
            label_aware_attention(v, e[:4])
        with pytest.raises(TypeError, match="target_emb"):
            label_aware_attention(v, e.float())
        with pytest.raises(ValueError, match="exponent"):
            label_aware_attention(v, e, exponent=0)
        with pytest.raises(ValueError, match="exponent"):
            label_aware_attention(v, e, exponent=float("nan"))
        with pytest.raises(TypeError, match="exponent"):
            label_aware_attention(v, e, exponent="inf")
        with pytest.raises(ValueError, match="empty batch"):       # as every other op
            label_aware_attention(v[:0], e[:0])


class TestBackendChoice:
    def test_auto_on_cpu(self):
        want = "cpp" if "cpp" in FUSED else "eager"
        assert B.resolve("attention", "auto", torch.device("cpu")) == want

    def test_env_override(self, monkeypatch):
        args = TestBadInput().args()
        monkeypatch.setenv("SEQREC_FAST_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="cuda"):
            multi_interest_attention(*args)
        monkeypatch.setenv("SEQREC_FAST_BACKEND", "eager")
        want = attention_ref(args[0], args[1], *args[2:])
        assert torch.equal(multi_interest_attention(*args), want)


# ------------------------------------------------------------------------------------ GPU only

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1024, 50, 4, 64, 256), (256, 200, 8, 64, 256),
                                   (300, 37, 7, 24, 100)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_large(dtype, shape):
    if not B.available("attention", "triton", torch.device("cuda")):
        pytest.fail("the triton backend is not available on this GPU machine")
    torch.backends.cuda.matmul.allow_tf32 = False
    check_against_reference("triton", shape, dtype, att=shape[1] == 50, device="cuda")


@pytest.mark.cuda
def test_cuda_peak_memory_below_quarter_of_eager():
    b, l, k, d, da = 4096, 50, 4, 64, 256
    tensors, mask, grads = make((b, l, k, d, da), torch.float32, device="cuda")
    mask = mask.cuda()

    def peak(fn):
        ts = [t.detach().clone().requires_grad_(True) for t in tensors]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(ts)
        out.backward(grads[0])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours = peak(lambda ts: multi_interest_attention(ts[0], mask, *ts[1:5], pos_emb=ts[5],
                                                    backend="triton"))
    eager = peak(lambda ts: attention_ref(ts[0], mask, *ts[1:5], pos_emb=ts[5]))
    assert ours <= eager / 4, (ours / 2**20, eager / 2**20)


@pytest.mark.cuda
def test_cuda_compile_and_opcheck():
    tensors, mask, _ = make((6, 9, 3, 16, 40), torch.float32, device="cuda")
    s, w1, b1, w2, b2, p = [t.requires_grad_(True) for t in tensors]
    torch.library.opcheck(_attention_fwd_op, (s, mask, w1, b1, w2, b2, p, "triton"))
    layer = MultiInterestAttention(16, 3, seq_len=9, backend="triton").cuda()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    want = layer(s, mask)
    got = compiled(s, mask)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="compiled cuda")


def test_float64_on_a_gpu_never_takes_triton():
    """triton 3.6's compiler aborts the process on the fp64 attention dots for sm_90: fp64 CUDA
    tensors run eager under auto; an explicit 'triton' is a TypeError (CPU: unchanged)."""
    from seqrec_fast.ops.attention import _gpu_float64

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _gpu_float64("triton", "auto", cuda, torch.float64) == "eager"
    with pytest.raises(TypeError, match="float64"):
        _gpu_float64("triton", "triton", cuda, torch.float64)
    assert _gpu_float64("triton", "auto", cuda, torch.float32) == "triton"
    assert _gpu_float64("triton", "triton", cpu, torch.float64) == "triton"
    assert _gpu_float64("cpp", "auto", cpu, torch.float64) == "cpp"


@pytest.mark.cuda
def test_cuda_float64_runs_eager():
    tensors, mask, _ = make((3, 7, 2, 8, 16), torch.float64, device="cuda")
    s, w1, b1, w2, b2, p = tensors
    got = multi_interest_attention(s, mask.cuda(), w1, b1, w2, b2, pos_emb=p)
    want = attention_ref(s, mask.cuda(), w1, b1, w2, b2, pos_emb=p)
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="float64"):
        multi_interest_attention(s, mask.cuda(), w1, b1, w2, b2, pos_emb=p, backend="triton")
