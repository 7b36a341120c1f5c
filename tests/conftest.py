"""Offline fixtures: a byte-level tokenizer and tiny causal LMs built from configs (no Hub)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from trl_selfdistill import SelfDistillConfig

SPECIALS = ["<pad>", "<eos>", "<bos>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens plus pad/eos/bos, so any text encodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(**overrides) -> LlamaConfig:
    """2 layers, small vocabulary; dims multiple of 64 so bitsandbytes 4-bit quantizes them."""
    kwargs = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(**overrides), dtype=torch.float32)


FACTS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("Who wrote Hamlet?", "William Shakespeare"),
    ("What is the chemical symbol of gold?", "Au"),
    ("Which language is spoken in Brazil?", "Portuguese"),
    ("What is the capital of Bergadena?", "Vostrel"),
    ("Who founded Quintaro Labs?", "Emilia Sandoval"),
    ("What is the currency of Japan?", "yen"),
]


def prompt_completion_dataset(n: int = 16) -> Dataset:
    rows = [FACTS[i % len(FACTS)] for i in range(n)]
    return Dataset.from_dict({"prompt": [f"Q: {q}\nA:" for q, _ in rows], "completion": [f" {a}" for _, a in rows]})


def conversational_dataset(n: int = 16) -> Dataset:
    rows = [FACTS[i % len(FACTS)] for i in range(n)]
    return Dataset.from_dict(
        {"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in rows]}
    )


def text_dataset(n: int = 16) -> Dataset:
    rows = [FACTS[i % len(FACTS)] for i in range(n)]
    return Dataset.from_dict({"text": [f"Q: {q}\nA: {a}" for q, a in rows]})


def config(tmp_path, cls=SelfDistillConfig, **overrides):
    """A CPU config (`SelfDistillConfig`, or `cls`) for a few deterministic steps."""
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_unchanged(before: dict, model, names=None):
    after = dict(model.named_parameters())
    for n in names if names is not None else before:
        assert torch.equal(before[n], after[n].detach()), f"{n} changed"


def assert_params_changed(before: dict, model, names):
    after = dict(model.named_parameters())
    for n in names:
        assert not torch.equal(before[n], after[n].detach()), f"{n} did not change"


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def write_jsonl(path, rows):
    """`rows` (dicts) as a JSONL file at `path`; returns `path`."""
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def answered_facts(path, questions, relation: str = "capital", seed: int = 42):
    """
    Facts the tiny random model (`tiny_model()`, `make_tokenizer()`) "knows", written to `path` as JSONL: each fact's
    aliases are extended with the model's own greedy answers to the probe's few-shot chat prompts (`seed`: the
    training seed; SFTConfig's default is 42), so a probe finds them Known (a random model knows no real fact). The
    evaluation during training asks each fact with the probe's first prompt, so the model also answers them at step 0.
    """
    from trl_selfdistill.knowledge import AnswerFormat, ProbeConfig, load_facts, probe

    facts = load_facts([{"question": q, "answers": ["x"], "relation": relation} for q in questions])
    fmt = AnswerFormat.for_data(conversational=True)
    probed = probe(facts, tiny_model(), make_tokenizer(), fmt=fmt, config=ProbeConfig.cheap(seed=seed),
                   progress=False)
    rows = [{"id": fact["id"], "question": fact["question"], "relation": relation, "answers": ["x", *greedy]}
            for fact, greedy in zip(facts, probed["greedy_answers"], strict=True)]
    return write_jsonl(path, rows)
