"""The fused CE + divergence path against the naive fp64 reference: values, gradients, chunking, cached teachers."""

import importlib.util
from pathlib import Path

import pytest
import torch
from reference import cross_entropy, divergence, logits, topk_divergence
from test_losses import make_case as divergence_case

from trl_selfdistill.losses import (
    FUSED_BUFFERS,
    FUSED_MIN_ROWS_ACCELERATOR,
    LMHead,
    TeacherTarget,
    fused_chunk_rows,
    fused_token_losses,
    teacher_topk,
)

LIVE_BUFFERS_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fused_live_buffers.py"

BETAS = [0.0, 1.0, 0.5]


def make_case(n, h, v, seed=0, **head):
    """`test_losses.make_case` plus gold targets (every third ignored) and per-row CE / divergence weights."""
    hs, ht, s_head, t_head = divergence_case(n, h, v, seed=seed, **head)
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::3] = -100  # ignored positions: no CE there, the divergence still counts
    ce_w = torch.rand(n, generator=g) * (targets != -100)
    div_w = torch.rand(n, generator=g)
    return hs, ht, s_head, t_head, targets, ce_w, div_w


def reference_loss(hs, ht, s_head, t_head, targets, ce_w, div_w, beta, tau, dft=False):
    z = logits(hs, s_head.weight, s_head.bias, s_head.logit_scale, s_head.softcap)
    zt = logits(ht, t_head.weight, t_head.bias, t_head.logit_scale, t_head.softcap)
    ce, div = cross_entropy(z, targets, dft), divergence(z, zt, beta, tau)
    return (ce * ce_w.double()).sum() + (div * div_w.double()).sum(), ce, div


def grads(*tensors):
    out = [None if t is None else t.grad.clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("n,h,v,rows", [(1, 8, 50, None), (7, 13, 97, None), (7, 13, 97, 2), (33, 16, 4000, 5)])
def test_values_and_gradients_match_reference(beta, tau, n, h, v, rows):
    hs, ht, s_head, t_head, targets, ce_w, div_w = make_case(n, h, v, seed=n + v)
    got = fused_token_losses(hs, s_head, targets, TeacherTarget(ht, t_head), ce_w, div_w, beta, tau, rows=rows)
    got.loss.backward()
    got_grads = grads(hs, s_head.weight)

    want, ce, div = reference_loss(hs, ht, s_head, t_head, targets, ce_w, div_w, beta, tau)
    want.backward()
    torch.testing.assert_close(got.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.ce.double(), ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.divergence.double(), div.detach(), rtol=1e-4, atol=1e-6)
    for mine, ref in zip(got_grads, grads(hs, s_head.weight), strict=True):
        torch.testing.assert_close(mine.double(), ref.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dft", [False, True])
@pytest.mark.parametrize("beta,softcap", [(0.3, 3.0), (0.0, None)])  # autograd; closed form
def test_bias_scale_softcap_and_dft_reach_both_terms(dft, beta, softcap):
    hs, ht, s_head, t_head, targets, ce_w, div_w = make_case(9, 8, 61, seed=3, bias=True, scale=0.7, softcap=softcap)
    got = fused_token_losses(hs, s_head, targets, TeacherTarget(ht, t_head), ce_w, div_w, beta, 0.5, dft=dft, rows=4)
    got.loss.backward()
    got_grads = grads(hs, s_head.weight, s_head.bias)
    want, _, _ = reference_loss(hs, ht, s_head, t_head, targets, ce_w, div_w, beta, 0.5, dft=dft)
    want.backward()
    torch.testing.assert_close(got.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for mine, ref in zip(got_grads, grads(hs, s_head.weight, s_head.bias), strict=True):
        torch.testing.assert_close(mine.double(), ref.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_bf16_hidden_states_and_head_match_the_reference_of_their_values(beta):
    """bf16 inputs (projected in bf16, then everything in fp32) against the fp64 reference of the same bf16 values."""
    hs, ht, s_head, t_head, targets, ce_w, div_w = make_case(10, 16, 300, seed=5, bias=True)
    hs, ht = hs.detach().bfloat16().requires_grad_(), ht.bfloat16()
    s_head = LMHead(*(t.detach().bfloat16().requires_grad_() for t in (s_head.weight, s_head.bias)))
    t_head = LMHead(t_head.weight.bfloat16(), t_head.bias.bfloat16())
    got = fused_token_losses(hs, s_head, targets, TeacherTarget(ht, t_head), ce_w, div_w, beta, 0.5, rows=4)
    got.loss.backward()
    got_grads = grads(hs, s_head.weight, s_head.bias)
    assert [g.dtype for g in got_grads] == [torch.bfloat16] * 3
    want, _, _ = reference_loss(hs, ht, s_head, t_head, targets, ce_w, div_w, beta, 0.5)
    want.backward()
    torch.testing.assert_close(got.loss.double(), want.detach(), rtol=1e-2, atol=1e-3)
    # the logits' gradient goes through bf16
    for mine, ref in zip(got_grads, grads(hs, s_head.weight, s_head.bias), strict=True):
        assert (mine.double() - ref).norm() < 2e-2 * ref.norm()


def test_metrics_are_the_student_entropy_and_top1_at_temperature_one():
    hs, ht, s_head, t_head, targets, ce_w, div_w = make_case(12, 8, 40, seed=7)
    targets[5] = logits(hs, s_head.weight)[5].argmax()  # at least one correct top-1
    got = fused_token_losses(hs, s_head, targets, TeacherTarget(ht, t_head), ce_w, div_w, 0.0, 0.5)
    log_p = torch.log_softmax(logits(hs, s_head.weight), -1)
    torch.testing.assert_close(got.entropy.double(), -(log_p.exp() * log_p).sum(-1).detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(got.is_top1, log_p.argmax(-1) == targets) and got.is_top1[5]


@pytest.mark.parametrize("beta", BETAS)
def test_cached_topk_teacher_matches_the_binned_reference(beta):
    hs, ht, s_head, t_head, targets, ce_w, div_w = make_case(10, 8, 70, seed=11)
    with torch.no_grad():
        exact = fused_token_losses(hs, s_head, targets, TeacherTarget(ht, t_head), ce_w, div_w, beta, 0.5, topk=6)
    log_t = torch.log_softmax(logits(ht, t_head.weight) / 0.5, -1)
    top = log_t.topk(6, -1)
    assert torch.equal(exact.topk_ids.long(), top.indices)
    torch.testing.assert_close(exact.topk_logps.double(), top.values, rtol=1e-5, atol=1e-6)

    cached = TeacherTarget(topk_ids=exact.topk_ids, topk_logps=exact.topk_logps)
    got = fused_token_losses(hs, s_head, targets, cached, ce_w, div_w, beta, 0.5, rows=3)
    got.loss.backward()
    got_grads = grads(hs, s_head.weight)
    z = logits(hs, s_head.weight)
    ref_div = topk_divergence(z, exact.topk_ids, exact.topk_logps, beta, 0.5)
    want = (cross_entropy(z, targets) * ce_w.double()).sum() + (ref_div * div_w.double()).sum()
    want.backward()
    torch.testing.assert_close(got.divergence.double(), ref_div.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(exact.topk_divergence, got.divergence, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for mine, ref in zip(got_grads, grads(hs, s_head.weight), strict=True):
        torch.testing.assert_close(mine.double(), ref.double(), rtol=1e-4, atol=1e-6)
    assert (got.divergence <= exact.divergence + 1e-6).all()  # merging bins never increases a divergence


@pytest.mark.parametrize("beta", BETAS)
def test_zero_divergence_and_gradient_when_student_is_teacher(beta):
    hs, _, s_head, _, targets, _, div_w = make_case(6, 8, 77)
    teacher = TeacherTarget(hs.detach().clone(), LMHead(s_head.weight.detach().clone()))
    got = fused_token_losses(hs, s_head, targets, teacher, torch.zeros(6), div_w, beta, 0.5)
    got.loss.backward()
    assert torch.allclose(got.divergence, torch.zeros(6), atol=1e-6)
    assert hs.grad.abs().max() < 1e-6 and s_head.weight.grad.abs().max() < 1e-6


def test_no_rows_give_a_connected_zero_and_the_teacher_gets_no_gradient():
    hs, ht, s_head, t_head, targets, ce_w, div_w = make_case(4, 8, 30)
    empty = fused_token_losses(hs[:0], s_head, targets[:0], TeacherTarget(ht[:0], t_head), ce_w[:0], div_w[:0], 0, 1)
    empty.loss.backward()
    assert empty.loss.item() == 0.0 and hs.grad.abs().max() == 0 and empty.ce.shape == (0,)

    ht.requires_grad_()
    t_weight = t_head.weight.clone().requires_grad_()
    got = fused_token_losses(hs, s_head, targets, TeacherTarget(ht, LMHead(t_weight)), ce_w, div_w, 0.5, 1.0)
    got.loss.backward()
    assert ht.grad is None and t_weight.grad is None and hs.grad.abs().sum() > 0


def test_chunk_rows_follow_the_memory_budget():
    assert fused_chunk_rows(49152) == 97  # 256 MiB over 14 fp32 buffers of 49,152 logits
    assert fused_chunk_rows(320) > 10_000 and fused_chunk_rows(10**9) == 1
    assert fused_chunk_rows(49152, device="cpu") == 97


def test_chunks_on_an_accelerator_have_a_floor_of_rows():
    """On a GPU the budget's few rows at a large vocabulary would make skinny matrix products: 256 at least."""
    assert fused_chunk_rows(151936) == 31 and fused_chunk_rows(151936, device="cuda") == FUSED_MIN_ROWS_ACCELERATOR
    assert fused_chunk_rows(320, device="cuda") == fused_chunk_rows(320)  # the budget's rows when they are more


@pytest.mark.parametrize("beta", BETAS)
def test_autocast_projects_in_its_dtype_and_matches_the_reference_of_those_values(beta):
    """Under bf16 autocast (mixed-precision training) the products run in bf16 from fp32 inputs, as `nn.Linear`
    would: the result is the fp64 reference of the bf16-rounded inputs, not the fp32 one; gradients stay fp32."""
    hs, ht, s_head, t_head, targets, ce_w, div_w = make_case(10, 16, 300, seed=5, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_token_losses(hs, s_head, targets, TeacherTarget(ht, t_head), ce_w, div_w, beta, 0.5, rows=4)
    got.loss.backward()
    got_grads = grads(hs, s_head.weight, s_head.bias)
    assert [g.dtype for g in got_grads] == [torch.float32] * 3

    def rounded(t):  # to bf16, in fp64; the gradient passes through the rounding unchanged
        return t.double() + (t.detach().bfloat16().double() - t.detach().double())

    leaves = [t.detach().double().requires_grad_() for t in (hs, s_head.weight, s_head.bias)]
    r_hs, r_w, r_b = (rounded(t) for t in leaves)
    z = rounded(rounded(r_hs @ r_w.T) + r_b)  # a bf16 product, then the bias added in bf16
    zt = rounded(rounded(rounded(ht) @ rounded(t_head.weight).T) + rounded(t_head.bias))
    want = (cross_entropy(z, targets) * ce_w.double()).sum() + (divergence(z, zt, beta, 0.5) * div_w.double()).sum()
    full, _, _ = reference_loss(hs, ht, s_head, t_head, targets, ce_w, div_w, beta, 0.5)
    err_bf16, err_fp32 = (got.loss.double() - want).abs(), (got.loss.double() - full).abs()
    assert err_bf16 < 1e-4 * want.abs() and err_bf16 < 0.1 * err_fp32  # the bf16 values, not the fp32 ones
    want.backward()
    for mine, ref in zip(
        got_grads, (t.grad for t in leaves), strict=True
    ):  # the logits' gradient goes through bf16 products
        assert (mine.double() - ref).norm() < 2e-2 * ref.norm()


def test_fp16_autocast_keeps_small_gradients():
    """Under fp16 autocast the logits' gradient (not yet multiplied by fp16's loss scale) is below fp16's range at
    small per-token weights: its products run in fp32, so the gradient is the reference's, not flushed to 0."""
    hs, ht, s_head, t_head, targets, ce_w, div_w = make_case(10, 16, 300, seed=5)
    ce_w, div_w = ce_w * 1e-6, div_w * 1e-6
    with torch.autocast("cpu", dtype=torch.float16):
        got = fused_token_losses(hs, s_head, targets, TeacherTarget(ht, t_head), ce_w, div_w, 0.0, 0.5, rows=4)
    got.loss.backward()
    got_grads = grads(hs, s_head.weight)
    want, _, _ = reference_loss(hs, ht, s_head, t_head, targets, ce_w, div_w, 0.0, 0.5)
    want.backward()
    for mine, ref in zip(got_grads, grads(hs, s_head.weight), strict=True):
        assert (mine.double() - ref).norm() < 2e-2 * ref.norm()


def test_fp16_head_weights_keep_small_gradients_without_an_fp32_copy():
    """An fp16 head (LoRA on an fp16 base), no autocast: fp16 products with the gradient scaled per chunk, equal to
    the reference of the fp16 values, where plain fp16 products would flush the small gradient to 0."""
    hs, ht, s_head, t_head, targets, ce_w, div_w = make_case(10, 16, 300, seed=5)
    ce_w, div_w = ce_w * 1e-6, div_w * 1e-6
    half = LMHead(s_head.weight.detach().half())
    t_half = LMHead(t_head.weight.half())
    made = []

    class Shapes(torch.overrides.TorchFunctionMode):  # every tensor a torch function returns: shape and dtype
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                made.append((tuple(out.shape), out.dtype))
            return out

    with Shapes():
        got = fused_token_losses(hs, half, targets, TeacherTarget(ht, t_half), ce_w, div_w, 0.0, 0.5, rows=4)
    got.loss.backward()
    assert made and ((300, 16), torch.float32) not in made  # no fp32 copy of the [V, H] head
    r_hs = hs.detach().half().double().requires_grad_()
    want, _, _ = reference_loss(
        r_hs,
        ht.half().double(),
        LMHead(half.weight.double()),
        LMHead(t_half.weight.double()),
        targets,
        ce_w,
        div_w,
        0.0,
        0.5,
    )
    want.backward()
    assert hs.grad.abs().max() > 0
    assert (hs.grad.double() - r_hs.grad).norm() < 2e-2 * r_hs.grad.norm()


@pytest.mark.parametrize("bias", [False, True])
def test_cache_top_k_under_autocast_is_what_the_loss_computes(bias):
    """The cache pre-pass (`teacher_topk`) and the loss's own top-k outputs cast the head the same way, bias
    included, so a pre-filled cache holds the log-probs the exact teacher gives in training."""
    _, ht, _, t_head, targets, ce_w, div_w = make_case(12, 16, 300, seed=2, bias=bias)
    student = TeacherTarget(ht, t_head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_token_losses(
            ht.clone().requires_grad_(), t_head, targets, student, ce_w, div_w, 0.0, 0.5, topk=5, rows=4
        )
        ids, logps = teacher_topk(ht, t_head, 5, 0.5)
    assert torch.equal(ids, fused.topk_ids)
    torch.testing.assert_close(logps, fused.topk_logps, rtol=0, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_autocast_teacher_equal_to_student_gives_exactly_zero(beta):
    """The student's and the teacher's logits go through the same bf16 products: an unchanged student is at 0 (a
    teacher projected in fp32 against a bf16 student would sit at the bf16 rounding instead)."""
    hs, _, s_head, _, targets, _, div_w = make_case(6, 8, 77)
    teacher = TeacherTarget(hs.detach().clone(), LMHead(s_head.weight.detach().clone()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_token_losses(hs, s_head, targets, teacher, torch.zeros(6), div_w, beta, 0.5)
    assert torch.allclose(got.divergence, torch.zeros(6), atol=1e-6)  # as in fp32: the JSD's mixture rounds
    if beta == 0.0:  # the closed form takes both through the same steps: exactly 0
        assert torch.equal(got.divergence, torch.zeros(6))


def _live_buffer_counter():
    spec = importlib.util.spec_from_file_location("fused_live_buffers", LIVE_BUFFERS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_live_buffers_of_every_path_fit_the_budget_and_the_worst_path_sets_it():
    """The allocator's peak over a few chunks (the last one partial), per loss path, in `[rows, V]` fp32 buffers:
    none exceeds `FUSED_BUFFERS` (beyond 1 %: the `[rows]` and `[rows, k]` vectors), so the chunk budget holds, and
    the worst path uses it (the count is not slack)."""
    counter = _live_buffer_counter()
    counts = {
        name: counter.live_buffers(n=20, vocab=4096, hidden=16, rows=8, **path) for name, path in counter.PATHS.items()
    }
    counts["JSD, trained head"] = counter.live_buffers(n=20, vocab=4096, hidden=16, rows=8, beta=0.5, train_head=True)
    assert max(counts.values()) <= 1.01 * FUSED_BUFFERS, counts
    assert max(counts.values()) > FUSED_BUFFERS - 1, counts
    assert counts["closed-form forward KL"] <= 1.01 * 4, counts
    # Under bf16 autocast the bf16 products add half-size temporaries (and on CPU their fp32 accumulation): within
    # the budget on every path
    mixed = {
        name: counter.live_buffers(n=20, vocab=4096, hidden=16, rows=8, autocast=True, **path)
        for name, path in counter.PATHS.items()
    }
    assert max(mixed.values()) <= 1.01 * FUSED_BUFFERS, mixed


def test_vocabulary_mismatch_is_refused():
    hs, ht, s_head, _, targets, ce_w, div_w = make_case(2, 8, 30)
    with pytest.raises(ValueError, match="vocabulary"):
        fused_token_losses(hs, s_head, targets, TeacherTarget(ht, LMHead(torch.randn(31, 8))), ce_w, div_w, 0.0)


@pytest.mark.parametrize("dft", [False, True])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_closed_form_forward_kl_path_with_bias_scale_and_dft(dft, tau):
    """β=0 with an exact teacher and no soft-capping takes the closed-form gradient: same values and gradients."""
    hs, ht, s_head, t_head, targets, ce_w, div_w = make_case(11, 8, 83, seed=9, bias=True, scale=0.7)
    got = fused_token_losses(
        hs, s_head, targets, TeacherTarget(ht, t_head), ce_w, div_w, 0.0, tau, dft=dft, rows=4, topk=5
    )
    got.loss.backward()
    got_grads = grads(hs, s_head.weight, s_head.bias)
    want, ce, div = reference_loss(hs, ht, s_head, t_head, targets, ce_w, div_w, 0.0, tau, dft=dft)
    want.backward()
    torch.testing.assert_close(got.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.divergence.double(), div.detach(), rtol=1e-4, atol=1e-6)
    for mine, ref in zip(got_grads, grads(hs, s_head.weight, s_head.bias), strict=True):
        torch.testing.assert_close(mine.double(), ref.double(), rtol=1e-4, atol=1e-6)
    zt = logits(ht, t_head.weight, t_head.bias, 0.7)
    ref_topk = topk_divergence(logits(hs, s_head.weight, s_head.bias, 0.7), got.topk_ids, got.topk_logps, 0.0, tau)
    assert torch.equal(got.topk_ids.long(), torch.log_softmax(zt / tau, -1).topk(5, -1).indices)
    torch.testing.assert_close(got.topk_divergence.double(), ref_topk.detach(), rtol=1e-4, atol=1e-6)
