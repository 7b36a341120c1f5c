"""Batched answer generation: prompts in, parsed answers out.

A `GenerateFn` is `generate_fn(prompts, greedy, num_samples) -> answers`, one list per prompt: one answer when greedy,
`num_samples` sampled answers otherwise. `Generator` is the model-backed one; tests pass scripted functions instead.
"""

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import BatchEncoding, GenerationConfig

from ..distributed import is_sharded
from ..teacher import eval_mode
from .formats import AnswerFormat, Prompt
from .sharding import RankSplit

GenerateFn = Callable[[Sequence[Prompt], bool, int], list[list[str]]]


def encode(tokenizer, prompts: Sequence[Prompt], padding_side: str) -> BatchEncoding:
    """Tokenize plain prompts, or chat prompts through the chat template (which already holds the special tokens)."""
    chat = isinstance(prompts[0], list)
    if chat:
        prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return tokenizer(
        list(prompts), return_tensors="pt", padding=True, padding_side=padding_side, add_special_tokens=not chat
    )


class Generator:
    """
    Greedy or sampled generation with `model`, batched and left-padded, stopped at the end of the answer line
    (`fmt.stop`), on the model's device. Each continuation is cut to its answer with `fmt.parse`.

    With `shard`, the ranks of a multi-process run share the batches and every rank gets all the answers
    (`sharding.RankSplit`): every rank must make the same calls. Sampled batches are seeded from `seed` and the
    batch's index, so samples do not depend on how many ranks share the work.
    """

    def __init__(
        self,
        model,
        tokenizer,
        fmt: AnswerFormat | None = None,
        *,
        max_new_tokens: int = 16,
        temperature: float = 0.5,
        top_k: int = 40,
        batch_size: int = 32,
        progress: bool = True,
        shard: bool = False,
        seed: int = 0,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token, which batched generation needs: set one.")
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt or AnswerFormat()
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.batch_size, self.progress, self.shard, self.seed = batch_size, progress, shard, seed

    def _config(self, greedy: bool, num_samples: int) -> GenerationConfig:
        sampling = {} if greedy else dict(temperature=self.temperature, top_k=self.top_k, top_p=1.0)
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=1 if greedy else num_samples,
            stop_strings=[self.fmt.stop] if self.fmt.stop else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
            **sampling,
        )

    def __call__(self, prompts: Sequence[Prompt], greedy: bool = True, num_samples: int = 1) -> list[list[str]]:
        if not prompts:
            return []
        config = self._config(greedy, num_samples)
        per_batch = max(1, self.batch_size // config.num_return_sequences)
        # Prompts of similar length share a batch, so little padding is generated over
        order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
        batches = [order[start : start + per_batch] for start in range(0, len(order), per_batch)]
        split = RankSplit.current() if self.shard else RankSplit()
        lockstep = split.world > 1 and is_sharded(self.model)  # each forward is a collective
        n = config.num_return_sequences

        def run(batch: int):
            indices = batches[batch]
            inputs = encode(self.tokenizer, [prompts[i] for i in indices], "left").to(self.model.device)
            with _seeded(None if greedy else self.seed * 1_000_003 + batch, self.model.device):
                output = self.model.generate(**inputs, generation_config=config, tokenizer=self.tokenizer,
                                             synced_gpus=lockstep)
            texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            return [[self.fmt.parse(text) for text in texts[j * n : (j + 1) * n]] for j in range(len(indices))]

        desc = "greedy" if greedy else f"{num_samples} samples"
        bar = None if not self.progress else (lambda items: tqdm(items, desc=f"Generating ({desc})"))
        with torch.no_grad(), eval_mode(self.model):
            results = split.map(len(batches), run, lockstep, progress=bar)
        answers: list[list[str]] = [[] for _ in prompts]
        for indices, per_batch_answers in zip(batches, results, strict=True):
            for i, per_prompt in zip(indices, per_batch_answers, strict=True):
                answers[i] = per_prompt
        return answers


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    """The random generators seeded with `seed` inside the block and restored after it (nothing when None)."""
    if seed is None:
        yield
        return
    devices = {"devices": []} if device.type == "cpu" else {"device_type": device.type}
    with torch.random.fork_rng(**devices):
        torch.manual_seed(seed)
        yield
