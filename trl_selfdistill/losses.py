"""Per-token divergences between teacher and student, computed from hidden states without the full logits.

The divergence runs through TRL's chunked kernel (`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`), which
projects hidden states through each LM head in vocabulary tiles: neither model's `[N, V]` logits exist in full, and only
the positions the caller selects are projected. Reduction and masking stay with the caller.
"""

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
) -> torch.Tensor:
    """
    Divergence between teacher and student next-token distributions at each row of `[N, H]` hidden states.

    `beta` follows TRL: 0 is the forward KL(teacher ‖ student), 1 the reverse KL(student ‖ teacher), anything in between
    the generalized JSD with mixture β·teacher + (1-β)·student. Both distributions are softened by `temperature`.
    The gradient flows to the student's hidden states and head only. Returns `[N]` fp32 values (no τ² factor).
    """
    if student_head.weight.shape[0] != teacher_head.weight.shape[0]:
        raise ValueError(
            f"Teacher vocabulary ({teacher_head.weight.shape[0]}) differs from the student's "
            f"({student_head.weight.shape[0]}): distillation compares distributions over the same tokens. Use a "
            "teacher with the student's tokenizer."
        )
    divergence, _entropy = ChunkedDivergenceFunction.apply(
        student_hidden,
        student_head.weight,
        student_head.bias,
        teacher_hidden.detach(),
        teacher_head.weight.detach(),
        None if teacher_head.bias is None else teacher_head.bias.detach(),
        beta,
        temperature,
        student_head.logit_scale,
        student_head.softcap,
        teacher_head.logit_scale,
        teacher_head.softcap,
    )
    return divergence
