"""The chunked divergence against the naive full-logit reference: values and gradients."""

import pytest
import torch
from reference import divergence, logits

from trl_selfdistill.losses import LMHead, token_divergence

BETAS = [0.0, 1.0, 0.1, 0.5, 0.9]


def make_case(n, h, v, seed=0, bias=False, scale=1.0, softcap=None):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    ht = torch.randn(n, h, generator=g)
    ws = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    wt = torch.randn(v, h, generator=g) / h**0.5
    bs = torch.randn(v, generator=g).requires_grad_() if bias else None
    bt = torch.randn(v, generator=g) if bias else None
    return hs, ht, LMHead(ws, bs, scale, softcap), LMHead(wt, bt, scale, softcap)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("n,h,v", [(1, 8, 50), (7, 13, 97), (33, 16, 40000)])
def test_values_and_gradients_match_reference(beta, temperature, n, h, v):
    hs, ht, s_head, t_head = make_case(n, h, v, seed=n + v)
    got = token_divergence(hs, s_head, ht, t_head, beta=beta, temperature=temperature)
    (got * torch.linspace(0.5, 1.5, n)).sum().backward()
    got_grads = hs.grad.clone(), s_head.weight.grad.clone()
    hs.grad = s_head.weight.grad = None

    want = divergence(logits(hs, s_head.weight), logits(ht, t_head.weight), beta, temperature)
    (want * torch.linspace(0.5, 1.5, n).double()).sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_grads[0], hs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_grads[1], s_head.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_bias_scale_and_softcap_reach_the_divergence(beta):
    hs, ht, s_head, t_head = make_case(5, 8, 61, bias=True, scale=0.7, softcap=3.0)
    got = token_divergence(hs, s_head, ht, t_head, beta=beta, temperature=0.5)
    got.sum().backward()
    want = divergence(
        logits(hs, s_head.weight, s_head.bias, 0.7, 3.0), logits(ht, t_head.weight, t_head.bias, 0.7, 3.0), beta, 0.5
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    grad_bias = s_head.bias.grad.clone()
    s_head.bias.grad = None
    hs.grad = s_head.weight.grad = None
    want.sum().backward()
    torch.testing.assert_close(grad_bias, s_head.bias.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_zero_with_zero_gradient_when_student_is_teacher(beta):
    hs, _, s_head, _ = make_case(6, 8, 77)
    got = token_divergence(hs, s_head, hs.detach().clone(), LMHead(s_head.weight.detach().clone()), beta, 0.5)
    got.sum().backward()
    assert torch.allclose(got, torch.zeros_like(got), atol=1e-6)
    assert torch.allclose(hs.grad, torch.zeros_like(hs.grad), atol=1e-6)
    assert torch.allclose(s_head.weight.grad, torch.zeros_like(s_head.weight.grad), atol=1e-6)


def test_masked_rows_match_masked_reference_and_all_masked_is_zero():
    b, t, h, v = 3, 5, 8, 50
    hs, ht, s_head, t_head = make_case(b * t, h, v)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool).reshape(-1)
    got = token_divergence(hs[mask], s_head, ht[mask], t_head, beta=0.0, temperature=0.5).sum()
    want = (divergence(logits(hs, s_head.weight), logits(ht, t_head.weight), 0.0, 0.5) * mask).sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert hs.grad[~mask].abs().max() == 0  # unselected rows get no gradient

    hs.grad = None
    none = torch.zeros_like(mask)
    empty = token_divergence(hs[none], s_head, ht[none], t_head, beta=0.0, temperature=0.5).sum()
    empty.backward()
    assert empty.item() == 0.0
    assert hs.grad.abs().max() == 0


def test_teacher_receives_no_gradient():
    hs, ht, s_head, _ = make_case(4, 8, 30)
    ht.requires_grad_()
    t_weight = torch.randn(30, 8, requires_grad=True)
    token_divergence(hs, s_head, ht, LMHead(t_weight), beta=0.5, temperature=1.0).sum().backward()
    assert ht.grad is None and t_weight.grad is None
    assert hs.grad.abs().sum() > 0


def test_vocabulary_mismatch_is_refused():
    hs, ht, s_head, _ = make_case(2, 8, 30)
    with pytest.raises(ValueError, match="vocabulary"):
        token_divergence(hs, s_head, ht, LMHead(torch.randn(31, 8)), beta=0.0)


def test_row_chunks_give_the_same_values_and_gradients():
    hs, ht, s_head, t_head = make_case(37, 8, 90, seed=5)
    whole = token_divergence(hs, s_head, ht, t_head, beta=0.0, temperature=0.5, rows=1024)
    whole.sum().backward()
    grads = hs.grad.clone(), s_head.weight.grad.clone()
    hs.grad = s_head.weight.grad = None
    chunked = token_divergence(hs, s_head, ht, t_head, beta=0.0, temperature=0.5, rows=5)
    chunked.sum().backward()
    # The head's gradient sums over rows chunk by chunk, a different fp32 reduction order (a few ulp, ~3e-6 at |g|~5)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.grad, grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_head.weight.grad, grads[1], rtol=1e-5, atol=1e-6)
