"""A label-free drift signal: KL(reference ‖ current) of the next-token distribution where each answer starts.

The reference is a teacher (anything with `last_hidden_state(inputs)` and `.head`, e.g. `trainer.teacher`) or a
snapshot of the model itself taken by `snapshot`. Only last hidden states are kept; the per-token KL goes through the
project's chunked kernel (`losses.token_divergence`), so no `[N, vocab]` logits are built.

With `shard`, the ranks of a multi-process run share the batches (`sharding.RankSplit`) and every rank gets the mean;
every rank must then make the same calls.
"""

from contextlib import contextmanager
from dataclasses import replace

import torch

from ..distributed import as_whole, forward_through, gathered_parameters, is_sharded, is_split
from ..losses import LMHead, token_divergence
from ..teacher import causal_lm, eval_mode
from .formats import Prompt
from .generation import encode
from .sharding import RankSplit


def _backbone_hidden(model, inputs: dict, **kwargs):
    """The backbone's output on `inputs`, entered through `model` when its weights are sharded (FSDP2's root hook)."""
    with torch.no_grad(), eval_mode(model):
        return forward_through(model, lambda **kw: causal_lm(model).base_model(**kw), **inputs, use_cache=False,
                               **kwargs)


def _tensors(heads: list[LMHead]) -> list[torch.Tensor]:
    return [t for head in heads for t in (head.weight, head.bias) if t is not None]


def _rebuilt(heads: list[LMHead], tensors: list[torch.Tensor]) -> list[LMHead]:
    it = iter(tensors)
    return [replace(head, weight=next(it), bias=None if head.bias is None else next(it)) for head in heads]


@contextmanager
def full_heads(*heads: LMHead):
    """The heads with whole weights: as they are, or gathered copies when a rank holds only a shard (collective)."""
    if not any(is_split(t) for t in _tensors(list(heads))):
        yield list(heads)
        return
    with gathered_parameters(_tensors(list(heads))) as full:
        yield _rebuilt(list(heads), [as_whole(t) for t in full])


def _map_batches(num_items: int, batch_size: int, run, shard: bool, model) -> list:
    """`run(start, stop)` over the batches of `num_items` (shared out with `shard`), their results in order."""
    split = RankSplit.current() if shard else RankSplit()
    starts = list(range(0, num_items, batch_size))
    lockstep = split.world > 1 and is_sharded(model)
    return split.map(len(starts), lambda i: run(starts[i], min(starts[i] + batch_size, num_items)), lockstep)


class DriftMeter:
    """Mean KL(reference ‖ model) over `prompts` at their last token, i.e. on the first answer token."""

    def __init__(self, prompts: list[Prompt], tokenizer, batch_size: int = 16, shard: bool = False):
        if not prompts:
            raise ValueError("DriftMeter needs at least one prompt (e.g. the held-out questions).")
        self.prompts, self.tokenizer, self.batch_size, self.shard = prompts, tokenizer, batch_size, shard
        self.reference_hidden: torch.Tensor | None = None
        self.reference_head: LMHead | None = None

    def _inputs(self, start: int, stop: int, device):
        return encode(self.tokenizer, self.prompts[start:stop], "right").to(device)

    @staticmethod
    def _last(hidden: torch.Tensor, inputs) -> torch.Tensor:
        last = inputs["attention_mask"].sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]

    def _model_hidden(self, model, start: int, stop: int) -> torch.Tensor:
        inputs = self._inputs(start, stop, model.device)
        return self._last(_backbone_hidden(model, dict(inputs)).last_hidden_state, inputs)

    def snapshot(self, model, teacher=None) -> None:
        """Fix the reference: `teacher` when given, else the current `model` (its LM head copied if trainable)."""
        if teacher is not None:
            def hidden(start, stop):
                inputs = self._inputs(start, stop, model.device)
                return self._last(teacher.last_hidden_state(dict(inputs)), inputs).cpu()

            self.reference_hidden = torch.cat(_map_batches(len(self.prompts), self.batch_size, hidden, self.shard,
                                                           model))
            self.reference_head = teacher.head
            return
        self.reference_hidden = torch.cat(_map_batches(
            len(self.prompts), self.batch_size, lambda start, stop: self._model_hidden(model, start, stop).cpu(),
            self.shard, model))
        head = LMHead.of(causal_lm(model))
        if any(t.requires_grad for t in _tensors([head])) or is_sharded(model):
            # The head trains (full fine-tuning, tied embeddings) or is sharded: whole copies of its initial weights
            with gathered_parameters(_tensors([head])) as full:
                head = _rebuilt([head], [as_whole(t) for t in full])[0]
        self.reference_head = head

    def __call__(self, model) -> float:
        if self.reference_hidden is None:
            raise ValueError("DriftMeter has no reference yet: call `snapshot(model)` before training.")

        with full_heads(LMHead.of(causal_lm(model)), self.reference_head) as (head, reference_head):

            def divergence(start, stop):
                hidden = self._model_hidden(model, start, stop)
                with torch.no_grad():
                    kl = token_divergence(hidden, head, self.reference_hidden[start:stop].to(hidden.device),
                                          reference_head, beta=0.0)
                return kl.tolist()

            batches = _map_batches(len(self.prompts), self.batch_size, divergence, self.shard, model)
        values = [value for batch in batches for value in batch]
        return sum(values) / len(values)


class RepresentationDrift:
    """
    The paper's mechanism signal: mean 1 − cos(h, h_S) of the hidden state at the middle layer (`layer`, default
    half the model's layers), at the last token of each prompt's subject, against the same states of the model when
    `snapshot` was called (S). Prompts whose subject does not appear in them are skipped.
    """

    def __init__(self, prompts: list[Prompt], subjects: list[str], tokenizer, batch_size: int = 16,
                 layer: int | None = None, shard: bool = False):
        self.tokenizer, self.batch_size, self.layer, self.shard = tokenizer, batch_size, layer, shard
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

    def _states(self, model, start: int, stop: int) -> torch.Tensor:
        layer = self.layer if self.layer is not None else causal_lm(model).config.num_hidden_layers // 2
        batch = self.items[start:stop]
        inputs = encode(self.tokenizer, [prompt for prompt, _ in batch], "right").to(model.device)
        hidden = _backbone_hidden(model, dict(inputs), output_hidden_states=True).hidden_states[layer]
        index = torch.tensor([i for _, i in batch], device=hidden.device)
        return hidden[torch.arange(len(batch), device=hidden.device), index].float().cpu()

    def snapshot(self, model) -> None:
        states = _map_batches(len(self.items), self.batch_size, lambda start, stop: self._states(model, start, stop),
                              self.shard, model)
        self.reference = torch.cat(states)

    def __call__(self, model) -> float:
        if self.reference is None:
            raise ValueError("RepresentationDrift has no reference yet: call `snapshot(model)` before training.")

        def distance(start, stop):
            cosine = torch.nn.functional.cosine_similarity(self._states(model, start, stop),
                                                           self.reference[start:stop], dim=-1)
            return (1 - cosine).tolist()

        values = [v for batch in _map_batches(len(self.items), self.batch_size, distance, self.shard, model)
                  for v in batch]
        return sum(values) / len(values)
