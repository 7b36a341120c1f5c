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


class RepresentationDrift:
    """
    The paper's mechanism signal: mean 1 − cos(h, h_S) of the hidden state at the middle layer (`layer`, default
    half the model's layers), at the last token of each prompt's subject, against the same states of the model when
    `snapshot` was called (S). Prompts whose subject does not appear in them are skipped.
    """

    def __init__(self, prompts: list[Prompt], subjects: list[str], tokenizer, batch_size: int = 16,
                 layer: int | None = None):
        self.tokenizer, self.batch_size, self.layer = tokenizer, batch_size, layer
        self.items = []  # (prompt, index of the subject's last token)
        for prompt, subject in zip(prompts, subjects, strict=True):
            index = self._subject_end(prompt, subject) if subject else None
            if index is not None:
                self.items.append((prompt, index))
        if not self.items:
            raise ValueError("RepresentationDrift found no prompt that names its subject: give facts with subjects.")
        self.reference: torch.Tensor | None = None

    def _subject_end(self, prompt: Prompt, subject: str) -> int | None:
        chat = isinstance(prompt, list)
        if chat:
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        end = text.rfind(subject)
        if end < 0:
            return None
        end += len(subject)
        offsets = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=not chat)["offset_mapping"]
        inside = [i for i, (start, stop) in enumerate(offsets) if start < end and stop > start]
        return inside[-1] if inside else None

    def _states(self, model) -> torch.Tensor:
        layer = self.layer if self.layer is not None else causal_lm(model).config.num_hidden_layers // 2
        rows = []
        for start in range(0, len(self.items), self.batch_size):
            batch = self.items[start : start + self.batch_size]
            inputs = encode(self.tokenizer, [prompt for prompt, _ in batch], "right").to(model.device)
            with torch.no_grad(), eval_mode(model):
                out = causal_lm(model).base_model(**inputs, use_cache=False, output_hidden_states=True)
            hidden = out.hidden_states[layer]
            index = torch.tensor([i for _, i in batch], device=hidden.device)
            rows.append(hidden[torch.arange(len(batch), device=hidden.device), index].float())
        return torch.cat(rows)

    def snapshot(self, model) -> None:
        self.reference = self._states(model)

    def __call__(self, model) -> float:
        if self.reference is None:
            raise ValueError("RepresentationDrift has no reference yet: call `snapshot(model)` before training.")
        states = self._states(model)
        cosine = torch.nn.functional.cosine_similarity(states, self.reference.to(states.device), dim=-1)
        return (1 - cosine).mean().item()
