"""seqrec_fast.nn loss modules: the same values and gradients as the functional ops, options
checked when the module is built, and the models' losses built from them."""
from __future__ import annotations

import pytest
import torch

from _util import assert_close
from seqrec_fast.models import build_model
from seqrec_fast.nn import LinearCrossEntropyLoss, SampledSoftmaxLoss
from seqrec_fast.ops import linear_cross_entropy, sampled_softmax_loss


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_module_matches_op(reduction):
    g = torch.Generator().manual_seed(0)
    user, items = torch.randn(6, 8, generator=g), torch.randn(30, 8, generator=g)
    bias = torch.randn(30, generator=g)
    target = torch.randint(0, 30, (6,), generator=g)
    target[2] = -1
    kw = dict(temperature=0.7, ignore_index=-1, reduction=reduction, label_smoothing=0.1)
    u1, i1, b1 = _leaves(user, items, bias)
    u2, i2, b2 = _leaves(user, items, bias)
    got = LinearCrossEntropyLoss(**kw)(u1, i1, target, b1)
    want = linear_cross_entropy(u2, i2, target, bias=b2, **kw)
    assert_close(got, want, atol=0.0, name="loss")
    got.sum().backward()
    want.sum().backward()
    for a, b, name in ((u1, u2, "user"), (i1, i2, "items"), (b1, b2, "bias")):
        assert_close(a.grad, b.grad, atol=0.0, name=name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_module_takes_leading_dims(reduction):
    """user (batch, seq_len, d) with target (batch, seq_len): the module forwards to the op,
    which flattens them; "none" returns target's shape."""
    g = torch.Generator().manual_seed(2)
    user, items = torch.randn(3, 5, 8, generator=g), torch.randn(30, 8, generator=g)
    target = torch.randint(0, 30, (3, 5), generator=g)
    target[1, 2] = -100
    u1, u2 = _leaves(user, user)
    got = LinearCrossEntropyLoss(reduction=reduction)(u1, items, target)
    want = linear_cross_entropy(u2.reshape(15, 8), items, target.reshape(15),
                                reduction=reduction)
    assert got.shape == (target.shape if reduction == "none" else ())
    assert_close(got, want.reshape(got.shape), atol=0.0, name="loss")
    got.sum().backward()
    want.sum().backward()
    assert_close(u1.grad, u2.grad, atol=0.0, name="user")
    with pytest.raises(ValueError, match="target"):
        LinearCrossEntropyLoss()(user, items, target.reshape(15))


@pytest.mark.parametrize("per_row", [False, True])
def test_sampled_softmax_module_matches_op(per_row):
    g = torch.Generator().manual_seed(1)
    user, items = torch.randn(5, 8, generator=g), torch.randn(40, 8, generator=g)
    target = torch.randint(0, 40, (5,), generator=g)
    negatives = torch.randint(0, 40, (5, 7) if per_row else (7,), generator=g)
    log_q = torch.randn(negatives.shape, generator=g)
    t_lq = torch.randn(5, generator=g)
    kw = dict(in_batch_negatives=not per_row, remove_accidental_hits=True, temperature=0.5)
    u1, i1 = _leaves(user, items)
    u2, i2 = _leaves(user, items)
    got = SampledSoftmaxLoss(**kw)(u1, i1, target, negatives, log_q, t_lq)
    want = sampled_softmax_loss(u2, i2, target, negatives, log_q=log_q, target_log_q=t_lq, **kw)
    assert_close(got, want, atol=0.0, name="loss")
    got.backward()
    want.backward()
    assert_close(u1.grad, u2.grad, atol=0.0, name="user")
    assert_close(i1.grad, i2.grad, atol=0.0, name="items")


def test_bad_options_raise_when_built():
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        SampledSoftmaxLoss(backend="gpu")
    with pytest.raises(ValueError, match="reduction"):
        SampledSoftmaxLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="temperature"):   # numeric ranges: at the first call
        LinearCrossEntropyLoss(temperature=0.0)(torch.randn(2, 4), torch.randn(5, 4),
                                                torch.tensor([1, 2]))


@pytest.mark.parametrize("loss,cls", [("full", LinearCrossEntropyLoss),
                                      ("sampled", SampledSoftmaxLoss)])
def test_models_use_the_loss_modules(loss, cls):
    m = build_model("comirec-sa", 50, dim=8, max_len=6, loss=loss, backend="eager")
    assert isinstance(m.criterion, cls) and m.criterion.backend == "eager"
    assert not list(m.criterion.parameters())           # nothing added to the state dict
    assert not any(k.startswith("criterion") for k in m.state_dict())


def test_comirec_sa_builds_its_attention_layer():
    from seqrec_fast.nn import MultiInterestAttention

    m = build_model("comirec-sa", 50, dim=8, max_len=6, backend="eager")
    assert isinstance(m.attention, MultiInterestAttention)
    assert m.attention.pos_emb.shape == (6, 8) and m.attention.hidden_dim == 32
    hist = torch.randint(1, 50, (3, 4))                  # shorter than max_len: first 4 positions
    mask = torch.tensor([4, 2, 0])
    want = m.attention(m.embed(hist), mask)
    assert torch.equal(m.user_embeddings(hist, mask), want)
