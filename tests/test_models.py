"""Models: one interface, every backend, losses, readouts, sparse gradients, sparse optimizers."""
import math

import pytest
import torch

from seqrec_fast import backend as _backend
from seqrec_fast.models import MODELS, MIND, ComiRecDR, build_model
from seqrec_fast.optim import RowWiseAdagrad, RowWiseAdam, build_optimizers

N, L, B, D = 50, 8, 6, 16


def _batch(padding="right", seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([8, 5, 4, 1, 8, 6])
    j = torch.arange(L)[None]
    mask = j < lens[:, None] if padding == "right" else j >= (L - lens)[:, None]
    hist = torch.randint(1, N, (B, L), generator=g) * mask
    return {"history": hist, "mask": mask, "target": torch.randint(1, N, (B,), generator=g)}


def _backends():
    out = ["eager"]
    for be in ("cpp", "triton"):
        if all(_backend.available(op, be, "cpu") for op in
               ("routing", "attention", "sampled_softmax", "linear_cross_entropy")):
            out.append(be)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_interface_and_loss(name, loss):
    torch.manual_seed(0)
    m = build_model(name, N, dim=D, max_len=L, loss=loss, backend="eager")
    b = _batch()
    ue = m.user_embeddings(b["history"], b["mask"])
    K = 4 if m.multi_interest else 1
    assert ue.shape == (B, K, D) and torch.isfinite(ue).all()
    assert m.item_embeddings().shape == (N, D)
    lo = m.loss(b)
    assert lo.dim() == 0 and torch.isfinite(lo)
    lo.backward()
    assert m.item_emb.weight.grad is not None
    # initial loss ≈ log(#candidates) for random embeddings
    assert 0.5 * math.log(N) < lo.item() < 3 * math.log(N * 10 * B)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("backend", ["auto"] + _backends())
def test_every_backend_matches_eager(name, backend):
    torch.manual_seed(0)
    ref = build_model(name, N, dim=D, max_len=L, backend="eager")
    m = build_model(name, N, dim=D, max_len=L, backend=backend)
    m.load_state_dict(ref.state_dict())
    b = _batch()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ref.generator, m.generator = g1, g2
    a = ref.user_embeddings(b["history"], b["mask"])
    c = m.user_embeddings(b["history"], b["mask"])
    torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)
    m.generator = torch.Generator().manual_seed(1)
    m.loss(b).backward()


@pytest.mark.parametrize("name", ["gru4rec", "youtubednn"])
def test_padding_side_does_not_matter(name):
    # (ComiRec-DR/SA have per-position weights / position embeddings and MIND per-position random
    # logits: for them the padding side is part of the model, fixed by the sampler's option)
    torch.manual_seed(0)
    m = build_model(name, N, dim=D, max_len=L, backend="eager", readout="hard")
    r, l = _batch("right"), _batch("left")
    # same items, shifted: build the left-padded histories from the right-padded ones
    lens = r["mask"].sum(1)
    hist = torch.zeros_like(r["history"])
    for i in range(B):
        hist[i, L - lens[i]:] = r["history"][i, :lens[i]]
    m.generator = torch.Generator().manual_seed(0)
    a = m.user_embeddings(r["history"], r["mask"])
    m.generator = torch.Generator().manual_seed(0)
    c = m.user_embeddings(hist, l["mask"])
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_mind_dynamic_k():
    torch.manual_seed(0)
    m = MIND(N, dim=D, max_len=L, dynamic_k=True, backend="eager")
    b = _batch()
    v = m.user_embeddings(b["history"], b["mask"])
    # lens 8, 5, 4, 1: K_u = 3, 2, 2, 1 -> interests beyond K_u repeat interest 0
    for row, ku in ((0, 3), (1, 2), (2, 2), (3, 1)):
        for k in range(ku, 4):
            assert torch.equal(v[row, k], v[row, 0])
        if ku > 1:
            assert not torch.equal(v[row, 1], v[row, 0])


def test_pow_readout_and_hard_readout():
    torch.manual_seed(0)
    m = ComiRecDR(N, dim=D, max_len=L, readout="pow", readout_pow=2.0, backend="eager")
    interests = torch.randn(B, 4, D)
    tgt = torch.randn(B, D)
    out = m.read_out(interests, tgt)
    s = torch.einsum("bkd,bd->bk", interests, tgt)
    ref = torch.einsum("bk,bkd->bd", torch.softmax(s ** 2, 1), interests)
    torch.testing.assert_close(out, ref)
    m.readout = "hard"
    out = m.read_out(interests, tgt)
    torch.testing.assert_close(out, interests[torch.arange(B), s.argmax(1)])


def test_sampled_negatives_log_uniform():
    m = build_model("youtubednn", 1001, dim=4, max_len=L)
    m.generator = torch.Generator().manual_seed(0)
    ids, lq = m.sample_negatives(20000, "cpu")
    assert ids.min() >= 1 and ids.max() <= 1000
    # P(id 1) = log(2)/log(1001)
    frac = (ids == 1).float().mean().item()
    assert abs(frac - math.log(2) / math.log(1001)) < 0.01
    assert torch.allclose(lq[ids == 1][0], torch.tensor(math.log(20000 * math.log(2) / math.log(1001))))


def test_model_argument_errors():
    with pytest.raises(ValueError, match="name"):
        build_model("sasrec", N)
    with pytest.raises(ValueError, match="loss"):
        build_model("mind", N, loss="bpr")
    with pytest.raises(ValueError, match="backend"):
        build_model("mind", N, backend="gpu")
    with pytest.raises(TypeError, match="dim"):
        build_model("mind", N, dim=2.5)
    m = build_model("comirec-dr", N, dim=D, max_len=L, backend="eager")
    with pytest.raises(ValueError, match="history"):
        m.user_embeddings(torch.zeros(B, L + 1, dtype=torch.long), torch.ones(B, L + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="history"):
        m.user_embeddings(torch.zeros(B, L), torch.ones(B, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch is missing"):
        m.loss({"history": torch.zeros(B, L, dtype=torch.long)})


def test_sparse_gradients_touch_only_used_rows():
    torch.manual_seed(0)
    m = build_model("comirec-sa", 10_000, dim=D, max_len=L, sparse=True, num_negatives=32,
                    backend="eager")
    m.generator = torch.Generator().manual_seed(0)
    b = _batch()
    m.loss(b).backward()
    g = m.item_emb.weight.grad
    assert g.is_sparse
    rows = g.coalesce().indices()[0].unique()
    assert rows.numel() <= B * L + B + 32
    assert set(b["target"].tolist()) <= set(rows.tolist())


@pytest.mark.parametrize("opt", [RowWiseAdagrad, RowWiseAdam])
def test_rowwise_optimizers_update_only_touched_rows(opt):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(100, 8))
    before = w.detach().clone()
    o = opt([w], lr=0.1)
    idx = torch.tensor([3, 7, 3])
    torch.nn.functional.embedding(idx, w, sparse=True).sum().backward()
    o.step()
    changed = (w.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 7]
    # matches the dense formula on the touched rows
    g = torch.zeros(100, 8)
    g[3] = 2.0
    g[7] = 1.0
    if opt is RowWiseAdagrad:
        acc = g.pow(2).mean(1)
        exp = before - 0.1 * g / (acc.sqrt() + 1e-8)[:, None]
    else:  # first Adam step: m/(1-b1) / sqrt(v/(1-b2)) = sign(g)
        exp = before - 0.1 * torch.sign(g)
    torch.testing.assert_close(w.detach()[[3, 7]], exp[[3, 7]], atol=1e-5, rtol=1e-5)
    # a dense gradient updates every row with a non-zero gradient
    o.zero_grad()
    w.grad = torch.ones_like(w)
    o.step()
    with pytest.raises(ValueError, match="lr"):
        opt([w], lr=-1)


def test_build_optimizers():
    m = build_model("comirec-dr", N, dim=D, max_len=L, sparse=True, backend="eager")
    opts = build_optimizers(m, "rowwise_adagrad", 1e-3)
    assert isinstance(opts[-1], RowWiseAdagrad) and len(opts) == 2
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizers(m, "sgd")


def test_bf16_autocast_runs():
    torch.manual_seed(0)
    for name in ("comirec-dr", "comirec-sa", "youtubednn"):
        m = build_model(name, N, dim=D, max_len=L, backend="eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lo = m.loss(_batch())
        lo.backward()
        assert torch.isfinite(lo)


def test_named_backend_must_cover_every_op(monkeypatch):
    # a backend named explicitly never silently runs an op elsewhere: building the model fails
    # when one of its ops has no kernel there ("auto" picks per op, "eager" always works)
    if not torch.cuda.is_available():
        for name in ("comirec-dr", "comirec-sa", "youtubednn"):
            with pytest.raises(ValueError, match="'cuda' was asked for by name"):
                build_model(name, N, dim=D, max_len=L, backend="cuda")
        monkeypatch.setenv("SEQREC_FAST_BACKEND", "cuda")
        with pytest.raises(ValueError, match="SEQREC_FAST_BACKEND='cuda'"):
            build_model("mind", N, dim=D, max_len=L)
        monkeypatch.delenv("SEQREC_FAST_BACKEND")
    # the softmax losses have no CUDA C++ kernel: 'cuda' can never cover a model's loss
    with pytest.raises(ValueError, match="sampled_softmax"):
        build_model("gru4rec", N, dim=D, max_len=L, backend="cuda")
    for be in ["auto"] + _backends():
        build_model("comirec-sa", N, dim=D, max_len=L, backend=be, loss="full")
    if _backend.available("routing", "cpp", "cpu"):
        m = build_model("comirec-dr", N, dim=D, max_len=L, backend="cpp")
        m.generator = torch.Generator().manual_seed(0)
        m.loss(_batch()).backward()


def test_dr_bilinear_init():
    torch.manual_seed(0)
    m = ComiRecDR(N, dim=D, max_len=L, backend="eager")
    w = m.routing.weight.detach().view(L, 4, D, D)
    dev = w - torch.eye(D)
    assert dev.abs().max() < 0.2 and dev.std() > 0          # identity + small noise
    m = ComiRecDR(N, dim=D, max_len=L, backend="eager", bilinear_init="normal")
    assert 0.8 < m.routing.weight.std().item() < 1.2        # ComiRec's N(0, 1)
    with pytest.raises(ValueError, match="bilinear_init"):
        ComiRecDR(N, dim=D, max_len=L, bilinear_init="xavier")


@pytest.mark.parametrize("name", ["comirec-dr", "comirec-sa", "mind", "youtubednn", "gru4rec"])
@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_one_dense_item_grad_per_step(name, loss, monkeypatch):
    # a model's loss looks the item table up through one alias whose backward builds ONE dense
    # gradient: the same gradients as direct dense lookups, dense layout
    from seqrec_fast.models import _common, base
    from seqrec_fast.models._common import one_dense_grad_table

    calls = []
    monkeypatch.setattr(_common, "one_dense_grad_table",
                        lambda w: calls.append(1) or one_dense_grad_table(w))

    torch.manual_seed(0)
    m = build_model(name, N, dim=D, max_len=L, loss=loss, num_negatives=20, backend="eager")
    ref = build_model(name, N, dim=D, max_len=L, loss=loss, num_negatives=20, backend="eager")
    ref.load_state_dict(m.state_dict())
    m.generator, ref.generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    m.loss(_batch()).backward()
    ref._loss(_batch()).backward()                              # the direct lookups
    assert m._step_table is None and len(calls) == 1
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        assert p.grad.layout == torch.strided, n
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6, msg=n)
    # the op itself: several lookups, repeated ids, and a dense use of the table
    w = torch.randn(30, 4, requires_grad=True)
    w2 = w.detach().clone().requires_grad_()
    ids = [torch.tensor([[1, 2, 2], [0, 29, 1]]), torch.tensor([5, 1])]
    t = one_dense_grad_table(w)
    out = sum((torch.nn.functional.embedding(i, t, sparse=True) ** 2).sum() for i in ids)
    (out + (t * 0.5).sum()).backward()
    out2 = sum((torch.nn.functional.embedding(i, w2) ** 2).sum() for i in ids)
    (out2 + (w2 * 0.5).sum()).backward()
    assert w.grad.layout == torch.strided
    torch.testing.assert_close(w.grad, w2.grad)
    # no alias when gradients are sparse (row-wise optimizers) or not needed
    ms = build_model(name, N, dim=D, max_len=L, sparse=True, num_negatives=20, backend="eager")
    ms.generator = torch.Generator().manual_seed(1)
    ms.loss(_batch()).backward()
    assert ms.item_emb.weight.grad.is_sparse
    with torch.no_grad():
        assert torch.isfinite(m.loss(_batch()))
    assert len(calls) == 1
