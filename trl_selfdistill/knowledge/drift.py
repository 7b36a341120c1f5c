"""A label-free drift signal: KL(reference ‖ current) of the next-token distribution where each answer starts.

The reference is a teacher (anything with `last_hidden_state(inputs)` and `.head`, e.g. `trainer.teacher`) or a
snapshot of the model itself taken by `snapshot`. Only last hidden states are kept; the per-token KL goes through the
project's chunked kernel (`losses.token_divergence`), so no `[N, vocab]` logits are built.
"""

from dataclasses import replace

import torch

from ..losses import LMHead, token_divergence
from ..teacher import causal_lm, eval_mode
from .formats import Prompt
from .generation import encode


class DriftMeter:
    """Mean KL(reference ‖ model) over `prompts` at their last token, i.e. on the first answer token."""

    def __init__(self, prompts: list[Prompt], tokenizer, batch_size: int = 16):
        if not prompts:
            raise ValueError("DriftMeter needs at least one prompt (e.g. the held-out questions).")
        self.prompts, self.tokenizer, self.batch_size = prompts, tokenizer, batch_size
        self.reference_hidden: torch.Tensor | None = None
        self.reference_head: LMHead | None = None

    def _last_hidden(self, forward, device) -> torch.Tensor:
        rows = []
        for start in range(0, len(self.prompts), self.batch_size):
            inputs = encode(self.tokenizer, self.prompts[start : start + self.batch_size], "right").to(device)
            hidden = forward(dict(inputs))
            last = inputs["attention_mask"].sum(dim=1) - 1
            rows.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)])
        return torch.cat(rows)

    def _model_hidden(self, model) -> torch.Tensor:
        def forward(inputs):
            with torch.no_grad(), eval_mode(model):
                return causal_lm(model).base_model(**inputs, use_cache=False).last_hidden_state

        return self._last_hidden(forward, model.device)

    def snapshot(self, model, teacher=None) -> None:
        """Fix the reference: `teacher` when given, else the current `model` (its LM head copied if trainable)."""
        if teacher is not None:
            self.reference_hidden = self._last_hidden(teacher.last_hidden_state, model.device)
            self.reference_head = teacher.head
            return
        self.reference_hidden = self._model_hidden(model)
        head = LMHead.of(causal_lm(model))
        if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
            # The head trains (full fine-tuning, tied embeddings): keep its initial weights
            head = replace(
                head,
                weight=head.weight.detach().clone(),
                bias=None if head.bias is None else head.bias.detach().clone(),
            )
        self.reference_head = head

    def __call__(self, model) -> float:
        if self.reference_hidden is None:
            raise ValueError("DriftMeter has no reference yet: call `snapshot(model)` before training.")
        hidden = self._model_hidden(model)
        with torch.no_grad():
            kl = token_divergence(
                hidden,
                LMHead.of(causal_lm(model)),
                self.reference_hidden.to(hidden.device),
                self.reference_head,
                beta=0.0,
            )
        return kl.mean().item()
