"""Losses between teacher and student computed from hidden states, on the positions the caller selects.

- `fused_token_losses`: the trainer's loss. CE against the gold tokens and the divergence to the teacher (exact, or a
  cached top-k) from ONE projection of the student per chunk of positions, gradients computed in the same pass;
  chunks are sized to a memory budget, so a small batch builds its `[N, V]` logits once and a large one never does.
- `token_divergence`: the divergence alone through TRL's chunked kernel
  (`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`), which projects in vocabulary tiles (used by the drift
  meter, where no CE is needed).

Both are tested against the naive fp64 reference in `tests/reference.py` (values and gradients).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction


@dataclass(frozen=True)
class LMHead:
    """An output projection and the logit transform its model applies (scale, then Gemma-style soft-capping)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> "LMHead":
        """Read the LM head of a causal LM, with the logit scale its config declares (TRL's fused head's rules)."""
        config = model.config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        if scale is None:
            scale = getattr(config, "output_multiplier", None)
        if scale is None:
            scale = getattr(config, "lm_head_multiplier", None)
        if scale is None and getattr(config, "logits_scaling", None) is not None:
            scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
        head = model.get_output_embeddings()
        return cls(
            weight=head.weight,
            bias=getattr(head, "bias", None),
            logit_scale=1.0 if scale is None else scale,
            softcap=getattr(config, "final_logit_softcapping", None),
        )


def check_vocabulary(teacher_vocab: int, student_vocab: int) -> None:
    """Refuse a teacher whose vocabulary differs from the student's: the divergence compares distributions over the
    same tokens."""
    if teacher_vocab != student_vocab:
        raise ValueError(
            f"The teacher's vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}): distillation "
            "compares distributions over the same tokens. Use a teacher with the student's tokenizer."
        )


def token_divergence(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    beta: float,
    temperature: float = 1.0,
    rows: int = 1024,
) -> torch.Tensor:
    """
    Divergence between teacher and student next-token distributions at each row of `[N, H]` hidden states.

    `beta` follows TRL: 0 is the forward KL(teacher ‖ student), 1 the reverse KL(student ‖ teacher), anything between
    the generalized JSD with mixture β·teacher + (1-β)·student. Both distributions are softened by `temperature`.
    The gradient flows to the student's hidden states and head only. Returns `[N]` fp32 values (no τ² factor).
    Rows go through the kernel `rows` at a time, which bounds its vocabulary-tile buffers (`rows × 32768` floats each).
    """
    check_vocabulary(teacher_head.weight.shape[0], student_head.weight.shape[0])
    # The teacher head is frozen; it is passed as given (a `.detach()` would drop ZeRO-3's `ds_status` tag)
    parts = []
    for start in range(0, max(student_hidden.shape[0], 1), rows):
        divergence, _entropy = ChunkedDivergenceFunction.apply(
            student_hidden[start : start + rows],
            student_head.weight,
            student_head.bias,
            teacher_hidden[start : start + rows].detach(),
            teacher_head.weight,
            teacher_head.bias,
            beta,
            temperature,
            student_head.logit_scale,
            student_head.softcap,
            teacher_head.logit_scale,
            teacher_head.softcap,
        )
        parts.append(divergence)
    return torch.cat(parts)


def _transform(z: torch.Tensor, head: LMHead, temperature: float, inplace: bool = False) -> torch.Tensor:
    """The logits as the model's distribution sees them: scale, soft-capping, then 1/τ (no copy where all are 1;
    `inplace`: over `z` itself, for logits nothing else holds)."""
    if head.logit_scale != 1.0:
        z = z.mul_(head.logit_scale) if inplace else z * head.logit_scale
    if head.softcap is not None:
        z = z.div_(head.softcap).tanh_().mul_(head.softcap) if inplace else head.softcap * torch.tanh(z / head.softcap)
    if temperature != 1.0:
        z = z.div_(temperature) if inplace else z / temperature
    return z


@torch.no_grad()
def teacher_topk(hidden: torch.Tensor, head: LMHead, k: int, temperature: float):
    """Top-`k` token ids and log-probs (at `temperature`) of a model at each of `[N, H]` rows, in fused-size chunks."""
    ids, logps = [], []
    rows = fused_chunk_rows(head.weight.shape[0], device=hidden.device)
    # The casts of the fused loss (head cast once, bias added in the same dtype), so that the cached log-probs are
    # the ones the loss would compute from the exact teacher
    head = _cast_head(head, _autocast_dtype(hidden.device))
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], rows):
            chunk = hidden[start : start + rows].to(head.weight.dtype)
            top = _log_probs(chunk, head, temperature).topk(k, dim=-1)
            ids.append(top.indices.to(torch.int32))
            logps.append(top.values)
    if not ids:
        return hidden.new_zeros((0, k), dtype=torch.int32), hidden.new_zeros((0, k), dtype=torch.float32)
    return torch.cat(ids), torch.cat(logps)


def _log_tail(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ exp(logp)) over the last dim: the log-mass outside the top-k bins."""
    return torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-6)).unsqueeze(-1)


def _coarse(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """D between two distributions given as log-probs over the same bins (β as in `token_divergence`)."""
    p, q = log_p.exp(), log_q.exp()
    if beta == 0.0:
        return (q * (log_q - log_p)).sum(-1)
    if beta == 1.0:
        return (p * (log_p - log_q)).sum(-1)
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log(1 - beta))
    return beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Fused CE + divergence: one student projection per chunk of positions

# fp32 `[rows, V]` buffers the fused loss holds at once on its worst path, as counted from the allocator by
# `benchmarks/fused_live_buffers.py`: 14 for the autograd path with 0 < β < 1 (the JSD's mixture and the tensors
# autograd saves); 10 soft-capped, 8 for β = 1, 6 against a cached top-k teacher, 4 in closed form
# (`_forward_kl_chunk`)
FUSED_BUFFERS = 14
# Default budget of those buffers: chunks are as large as fit, one chunk (the full logits) when everything fits
FUSED_BUDGET_BYTES = 256 * 2**20
# On an accelerator, chunks have at least this many rows whatever the budget: with fewer, the projection is a skinny
# matrix product that leaves most of the chip idle and the loss pays one launch per kernel per chunk (measured in
# `docs/performance.md`). At V=152k, 256 rows are 0.6 GB per 4 buffers, a few % of such a run's memory.
FUSED_MIN_ROWS_ACCELERATOR = 256


def fused_chunk_rows(vocab_size: int, budget_bytes: int = FUSED_BUDGET_BYTES, device=None) -> int:
    """Rows of a fused chunk so that its `FUSED_BUFFERS` fp32 `[rows, V]` buffers fit `budget_bytes` (at least 1);
    on a `device` other than the CPU, at least `FUSED_MIN_ROWS_ACCELERATOR`."""
    rows = max(1, budget_bytes // (FUSED_BUFFERS * 4 * vocab_size))
    if device is not None and torch.device(device).type != "cpu":
        rows = max(rows, FUSED_MIN_ROWS_ACCELERATOR)
    return rows


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives matrix products on `device` here, or None when autocast is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _same_values(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """`a` and `b` are the same tensor, or views of the same memory with the same layout."""
    if a is None or b is None:
        return a is b
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _cast_head(head: LMHead, dtype: torch.dtype | None, like: LMHead | None = None, cast: LMHead | None = None):
    """`head` with its weight and bias in `dtype` (None: as is), cast once per call; `cast` is reused when `head`
    holds the same tensors as `like` (a teacher that is the student's own head: LoRA)."""
    if dtype is None:
        return head
    if like is not None and _same_values(head.weight, like.weight) and _same_values(head.bias, like.bias):
        return LMHead(cast.weight, cast.bias, head.logit_scale, head.softcap)
    bias = None if head.bias is None else head.bias.to(dtype)
    return LMHead(head.weight.to(dtype), bias, head.logit_scale, head.softcap)


@dataclass(frozen=True)
class TeacherTarget:
    """The teacher side of `fused_token_losses`: its hidden states and head (exact), or cached top-k log-probs."""

    hidden: torch.Tensor | None = None
    head: LMHead | None = None
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None

    def __post_init__(self):
        if (self.hidden is None) == (self.topk_ids is None):
            raise ValueError("A TeacherTarget holds either `hidden` and `head` (exact) or `topk_ids`/`topk_logps`.")


@dataclass
class FusedLosses:
    """What `fused_token_losses` returns: the weighted loss (with gradient) and detached per-row values."""

    loss: torch.Tensor  # Σ ce_weights·ce' + Σ divergence_weights·divergence, ce' = ce (nll) or p(y)·ce (dft)
    ce: torch.Tensor  # [N] -log p(target) at τ=1, 0 where the target is -100
    divergence: torch.Tensor  # [N] D(teacher, student) at τ (no τ² factor)
    entropy: torch.Tensor  # [N] entropy of the student at τ=1
    is_top1: torch.Tensor  # [N] the target is the student's argmax
    topk_ids: torch.Tensor | None = None  # [N, k] the teacher's top-k at τ (exact teacher and `topk` only)
    topk_logps: torch.Tensor | None = None
    topk_divergence: torch.Tensor | None = None  # [N] the divergence against those k bins plus the tail


def _coarse_student(log_q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student's log-probs on the bins of a cached teacher: its top-k ids, then the tail."""
    top = log_q.gather(1, ids.long())
    return torch.cat([top, _log_tail(top)], -1)


def _project(hidden: torch.Tensor, head: LMHead, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits `hidden @ weight.T + bias` of `[rows, H]` hidden states (into `out`, a reused buffer, if given)."""
    weight = head.weight
    if out is not None and hidden.dtype == weight.dtype == torch.float32:
        torch.matmul(hidden, weight.T, out=out)
        return out if head.bias is None else out.add_(head.bias)
    z = hidden @ weight.T
    if head.bias is not None:
        z = z + head.bias
    return z.float() if out is None else out.copy_(z)


@torch.no_grad()
def _log_probs(hidden: torch.Tensor, head: LMHead, temperature: float) -> torch.Tensor:
    """fp32 log-softmax at `temperature` of the logits of `[rows, H]` hidden states through `head` (no gradient)."""
    return torch.log_softmax(_transform(_project(hidden, head), head, temperature, inplace=True), -1)


def _log_softmax_(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """log-softmax over the last dim in place over `x`, and its softmax into `probs`, with no other `[rows, V]`
    buffer (the same steps as `torch.log_softmax`: subtract the max, then the log-sum of the exponentials)."""
    x.sub_(x.amax(-1, keepdim=True))
    norm = torch.exp(x, out=probs).sum(-1, keepdim=True)
    probs.div_(norm)
    return x.sub_(norm.log_())


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[r, v]·b[r, v] for each row, without an `[rows, V]` product."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _student_stats(log_p: torch.Tensor, targets: torch.Tensor, p: torch.Tensor | None = None):
    """CE at τ=1 (0 where the target is -100), log p(y), and the detached metrics: entropy and top-1 (`p`: exp(log_p),
    when the caller has it)."""
    valid = targets != -100
    log_p_y = log_p.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    ce = torch.where(valid, -log_p_y, torch.zeros_like(log_p_y))
    with torch.no_grad():
        stats = {"entropy": -_row_dot(log_p.exp() if p is None else p, log_p), "is_top1": log_p.argmax(-1) == targets}
    return ce, log_p_y, stats


@torch.no_grad()
def _topk_outputs(log_t: torch.Tensor, log_q: torch.Tensor, k: int, beta: float) -> dict:
    """The exact teacher's top-k at τ (for the cache) and the divergence against those k bins plus the tail."""
    top = log_t.topk(k, dim=-1)
    ids = top.indices.to(torch.int32)
    divergence = _coarse(_coarse_student(log_q, ids), torch.cat([top.values, _log_tail(top.values)], -1), beta)
    return {"topk_ids": ids, "topk_logps": top.values, "topk_divergence": divergence}


def _forward_kl_chunk(h, head, targets, ce_w, div_w, teacher, tau, dft, topk, work):
    """`_fused_chunk` for the paper's case (forward KL to an exact teacher, no soft-capping) in closed form,

        ∂/∂s [w·CE + v·KL(p_t ‖ q)] = w·(p - onehot(y)) + v·(q - p_t)/τ,  p = softmax(s), q = softmax(s/τ), s = scale·z

    in the four fp32 `[rows, V]` buffers of `work` (shared by all chunks) and no other: s, then log p, then log p_t;
    log q; q, then p_t; p, then the gradient with respect to z, which is returned. The student's log q and the
    teacher's log p_t go through the same steps, so a teacher equal to the student gives a divergence of exactly 0.
    """
    a, log_q, c, dz = (buffer[: h.shape[0]] for buffer in work)
    s = _transform(_project(h, head, a), head, 1.0, inplace=True)
    _log_softmax_(torch.div(s, tau, out=log_q), c)  # c holds q
    log_p = _log_softmax_(s, dz)  # dz holds p
    ce, log_p_y, stats = _student_stats(log_p, targets, dz)
    w = (ce_w * (targets != -100) * (log_p_y.exp() if dft else 1.0)).unsqueeze(1)  # with DFT's detached p(y)
    coef = (div_w / tau).unsqueeze(1)
    # dz = scale·[w·(p - onehot) + v/τ·(q - p_t)]: the student's part, then the teacher's buffers replace a and c
    dz.mul_(w).scatter_add_(1, targets.clamp(min=0).unsqueeze(1), -w).addcmul_(c, coef)
    log_t = _log_softmax_(_transform(_project(teacher.hidden, teacher.head, a), teacher.head, tau, inplace=True), c)
    p_t = c
    out = _topk_outputs(log_t, log_q, topk, 0.0) if topk else {}
    dz.addcmul_(p_t, -coef)
    if head.logit_scale != 1.0:
        dz.mul_(head.logit_scale)
    div = _row_dot(p_t, log_t.sub_(log_q))
    total = (ce * w.squeeze(1)).sum() + (div * div_w).sum()
    return total, dz, {"ce": ce, "divergence": div, **stats, **out}


def _fused_chunk(h, head, targets, ce_w, div_w, teacher, beta, tau, dft, topk, work):
    """Values and the logits' gradient of one chunk; the student is projected once, the teacher once (no grad).
    `work`: the closed-form path's buffers (`_forward_kl_chunk`), or None for the autograd path."""
    if work is not None:
        with torch.no_grad():
            return _forward_kl_chunk(h, head, targets, ce_w, div_w, teacher, tau, dft, topk, work)
    z = _project(h, head).requires_grad_(True)
    with torch.enable_grad():
        s = _transform(z, head, 1.0)
        log_p = torch.log_softmax(s, -1)
        ce, log_p_y, stats = _student_stats(log_p, targets)
        ce_term = ce * log_p_y.detach().exp() if dft else ce
        log_q = torch.log_softmax(s / tau, -1)
        if teacher.hidden is not None:
            log_t = _log_probs(teacher.hidden, teacher.head, tau)
            div = _coarse(log_q, log_t, beta)  # log-softmax of finite logits is finite: no 0·∞
        else:
            log_tk = teacher.topk_logps.float()
            div = _coarse(_coarse_student(log_q, teacher.topk_ids), torch.cat([log_tk, _log_tail(log_tk)], -1), beta)
        total = (ce_term * ce_w).sum() + (div * div_w).sum()
    (dz,) = torch.autograd.grad(total, z)
    out = {"ce": ce.detach(), "divergence": div.detach(), **stats}
    if topk and teacher.hidden is not None:
        out.update(_topk_outputs(log_t, log_q.detach(), topk, beta))
    return total.detach(), dz, out


class _FusedLossFunction(torch.autograd.Function):
    """Computes the loss and its gradients chunk by chunk in forward (the loss is a scalar); backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head, targets, ce_w, div_w, teacher, beta, tau, dft, topk, rows, stats):
        # Under autocast the matrix products run in its dtype, as the model's own head would (the weights are cast
        # once per call), else in the head's; the rest is fp32. The body runs with autocast off, so every cast is the
        # one written here.
        dtype = _autocast_dtype(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            return _FusedLossFunction._forward(
                ctx,
                hidden,
                weight,
                bias,
                head,
                targets,
                ce_w,
                div_w,
                teacher,
                beta,
                tau,
                dft,
                topk,
                rows,
                stats,
                dtype,
            )

    @staticmethod
    def _forward(
        ctx, hidden, weight, bias, head, targets, ce_w, div_w, teacher, beta, tau, dft, topk, rows, stats, dtype
    ):
        head = LMHead(weight, bias, head.logit_scale, head.softcap)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        head_c = _cast_head(head, dtype)
        teacher_head_c = None if teacher.head is None else _cast_head(teacher.head, dtype, head, head_c)
        weight_c = head_c.weight
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if bias is not None and ctx.needs_input_grad[2]
            else None
        )
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        closed_form = beta == 0.0 and teacher.hidden is not None and head.softcap is None
        work = (
            torch.empty((4, min(rows, hidden.shape[0]), weight.shape[0]), dtype=torch.float32, device=hidden.device)
            if closed_form
            else None
        )
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            if teacher.hidden is not None:
                part = TeacherTarget(teacher.hidden[chunk].to(teacher_head_c.weight.dtype), teacher_head_c)
            else:
                part = TeacherTarget(topk_ids=teacher.topk_ids[chunk], topk_logps=teacher.topk_logps[chunk])
            h = hidden[chunk].detach().to(weight_c.dtype)
            total, dz, out = _fused_chunk(
                h, head_c, targets[chunk], ce_w[chunk], div_w[chunk], part, beta, tau, dft, topk, work
            )
            loss += total
            for key, value in out.items():
                stats.setdefault(key, []).append(value)
            if weight_c.dtype == torch.float16:
                # The logits' gradient is not yet multiplied by fp16's loss scale here, and its small entries would
                # flush to 0 in fp16: scale the chunk by a power of two (exact) so its largest entry is in [1, 2)
                scale = torch.exp2(-torch.floor(torch.log2(dz.abs().amax().clamp(min=2.0**-126))))
                dz_c = (dz * scale).to(torch.float16)
                grad_h[chunk] = (dz_c @ weight_c).float().div_(scale)
                if grad_w is not None:
                    grad_w.add_((dz_c.T @ h).float().div_(scale))
            else:
                dz_c = dz.to(weight_c.dtype)
                grad_h[chunk] = (dz_c @ weight_c).float()
                if grad_w is not None:
                    grad_w.addmm_(dz.T, h) if weight_c.dtype == torch.float32 else grad_w.add_(dz_c.T @ h)
            if grad_b is not None:
                grad_b += dz.sum(0)
            del dz, dz_c  # not held into the next chunk's peak
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scaled = [
            None if g is None else (g * grad_loss).to(dtype)
            for g, dtype in zip((grad_h, grad_w, grad_b), ctx.dtypes, strict=True)
        ]
        return (*scaled, *([None] * 11))


def fused_token_losses(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    targets: torch.Tensor,
    teacher: TeacherTarget,
    ce_weights: torch.Tensor,
    divergence_weights: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    dft: bool = False,
    topk: int | None = None,
    rows: int | None = None,
) -> FusedLosses:
    r"""
    CE against the gold tokens and the divergence to the teacher from ONE projection of the student per chunk:

        loss = Σ_i ce_weights_i · ce'_i + Σ_i divergence_weights_i · D_i
        ce_i = -log softmax(z_i)[y_i]  (0 where y_i = -100),  ce'_i = ce_i, or p_i(y_i)·ce_i (DFT, p detached)
        D_i  = D(softmax(z^t_i / τ), softmax(z_i / τ)),  β as in `token_divergence`

    `z_i` are the student's logits at row `i` of `[N, H]` hidden states (head scale and soft-capping applied), `z^t`
    the teacher's (exact: from its hidden states and head; or a cached top-k at τ, where D is taken over those k bins
    plus the tail: merging bins never increases a divergence, so this is a lower bound of the exact value, whose gap
    is the tail mass times the divergence inside the tail). Rows are processed `rows` at a time (default: as many as
    `FUSED_BUDGET_BYTES` allows, so small batches build their logits once); per chunk the student's `[rows, V]`
    logits are built once, and the gradients of the loss with respect to the hidden states, weight and bias are
    computed there (the loss is a scalar), so nothing is re-projected in backward. The gradient reaches the student's
    hidden states and head only. With `topk`, the exact teacher's top-k at τ (ids, log-probs) and the divergence
    against them are returned too, for the teacher cache. Values are fp32. The projections and the gradient's matrix
    products run in autocast's dtype under autocast (as `nn.Linear` would; the head is cast once per call), else in
    the head weight's dtype; in fp16 the gradient is scaled by a power of two per chunk so that it does not underflow.
    Everything else is fp32.
    """
    if teacher.head is not None:
        check_vocabulary(teacher.head.weight.shape[0], student_head.weight.shape[0])
    n = student_hidden.shape[0]
    rows = rows or fused_chunk_rows(student_head.weight.shape[0], device=student_hidden.device)
    stats: dict[str, list] = {}
    weight, bias = student_head.weight, student_head.bias
    loss = _FusedLossFunction.apply(
        student_hidden,
        weight,
        bias,
        student_head,
        targets,
        ce_weights.float(),
        divergence_weights.float(),
        teacher,
        beta,
        temperature,
        dft,
        topk,
        rows,
        stats,
    )
    if n == 0:
        zeros = student_hidden.new_zeros(0, dtype=torch.float32)
        empty_topk = student_hidden.new_zeros((0, topk or 0), dtype=torch.float32)
        return FusedLosses(
            loss,
            zeros,
            zeros,
            zeros,
            zeros.bool(),
            *((empty_topk.to(torch.int32), empty_topk, zeros) if topk and teacher.hidden is not None else ()),
        )
    return FusedLosses(loss, **{key: torch.cat(values) for key, values in stats.items()})
