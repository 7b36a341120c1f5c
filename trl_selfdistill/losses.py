"""Per-token divergences between teacher and student, computed from hidden states without the full logits.

The divergence runs through TRL's chunked kernel (`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`), which
projects hidden states through each LM head in vocabulary tiles: neither model's `[N, V]` logits exist in full, and only
the positions the caller selects are projected. Reduction and masking stay with the caller.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from trl.kernels import ChunkedLogProbFunction
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
        """Read the LM head of a causal LM, with the logit scale its config declares (same rules as TRL's fused head)."""
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

    `beta` follows TRL: 0 is the forward KL(teacher ‖ student), 1 the reverse KL(student ‖ teacher), anything in between
    the generalized JSD with mixture β·teacher + (1-β)·student. Both distributions are softened by `temperature`.
    The gradient flows to the student's hidden states and head only. Returns `[N]` fp32 values (no τ² factor).
    Rows go through the kernel `rows` at a time, which bounds its vocabulary-tile buffers (`rows × 32768` floats each).
    """
    if student_head.weight.shape[0] != teacher_head.weight.shape[0]:
        raise ValueError(
            f"Teacher vocabulary ({teacher_head.weight.shape[0]}) differs from the student's "
            f"({student_head.weight.shape[0]}): distillation compares distributions over the same tokens. Use a "
            "teacher with the student's tokenizer."
        )
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


def _transform(z: torch.Tensor, head: LMHead, temperature: float) -> torch.Tensor:
    z = z * head.logit_scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z / temperature


@torch.no_grad()
def teacher_topk(hidden: torch.Tensor, head: LMHead, k: int, temperature: float, rows: int = 256):
    """Top-`k` token ids and log-probs (at `temperature`) of the teacher at each of `[N, H]` rows, in row chunks."""
    ids, logps = [], []
    for start in range(0, hidden.shape[0], rows):
        z = hidden[start : start + rows].float() @ head.weight.float().T
        if head.bias is not None:
            z = z + head.bias.float()
        logp = torch.log_softmax(_transform(z, head, temperature), dim=-1)
        top = logp.topk(k, dim=-1)
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


def topk_token_divergence(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_ids: torch.Tensor,
    teacher_logps: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """
    `token_divergence` against a cached teacher: its top-k log-probs plus one tail bin holding the remaining mass.

    The student is coarsened to the same k+1 bins (its log-probs at the teacher's top-k ids and its own tail mass),
    with its log-normalizer from TRL's chunked log-prob kernel, so no `[N, V]` logits exist. Merging bins never
    increases a divergence, so the result is a lower bound of the exact value; the gap is the tail mass times the
    divergence inside the tail (chain rule), small when the teacher's tail mass is.
    """
    ids = teacher_ids.long()
    # Log-normalizer with gradient: log Z = z_y - log p(y), for y the teacher's top token
    z = torch.einsum("nh,nkh->nk", student_hidden, student_head.weight[ids])
    if student_head.bias is not None:
        z = z + student_head.bias[ids]
    z = _transform(z, student_head, temperature)
    log_p_top1 = ChunkedLogProbFunction.apply(
        student_hidden, student_head.weight, student_head.bias, ids[:, 0], temperature, 32768,
        student_head.softcap, student_head.logit_scale, ("log_probs",),
    )[0]
    log_z = z[:, :1] - log_p_top1.unsqueeze(-1)
    log_p = (z - log_z).float()
    log_q = teacher_logps.float()
    return _coarse(torch.cat([log_p, _log_tail(log_p)], -1), torch.cat([log_q, _log_tail(log_q)], -1), beta)
