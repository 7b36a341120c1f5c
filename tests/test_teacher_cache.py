"""The on-disk teacher cache: storage, resume, fingerprint refusal, and its use inside the trainer."""

import json

import pytest
import torch
from conftest import config, make_tokenizer, prompt_completion_dataset, tiny_model
from datasets import Dataset
from peft import LoraConfig

from trl_selfdistill import SelfDistillSFTTrainer
from trl_selfdistill.teacher_cache import TeacherCache


def lora():
    """A fresh config each time: PEFT rewrites `target_modules` of the config it is given."""
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
FP = {"teacher": "t", "tokenizer": "v", "data": "d", "temperature": 0.5, "scope": "completion"}


def rows(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, k), generator=g, dtype=torch.int32), torch.randn(n, k, generator=g)


def open_cache(directory, fingerprint=FP, topk=4):
    return TeacherCache(directory, fingerprint, topk=topk, vocab_size=320)


def test_put_get_round_trip_and_resume(tmp_path):
    cache = open_cache(tmp_path)
    a, b = rows(3, 4), rows(5, 4, seed=1)
    cache.put("a", *a, epoch=0)
    cache.put("b", *b, epoch=0)
    for got, want in zip(cache.get("b", before_epoch=1), b, strict=True):
        assert torch.equal(got, want)
    resumed = open_cache(tmp_path)
    assert len(resumed) == 2 and resumed.get("missing", before_epoch=1) is None
    for got, want in zip(resumed.get("a", before_epoch=1), a, strict=True):
        assert torch.equal(got, want)


def test_entries_are_served_only_in_epochs_after_the_one_they_were_written_in(tmp_path):
    cache = open_cache(tmp_path)
    cache.put("a", *rows(2, 4), epoch=1)
    assert cache.get("a", before_epoch=1) is None and cache.get("a", before_epoch=2) is not None
    other_run = open_cache(tmp_path)
    other_run.put("a", *rows(2, 4), epoch=0)  # a duplicate written earlier in its own run: stored, and preferred
    assert len(other_run) == 1 and open_cache(tmp_path).get("a", before_epoch=1) is not None


def test_interrupted_writes_are_dropped_not_misread(tmp_path):
    cache = open_cache(tmp_path)
    cache.put("a", *rows(3, 4), epoch=0)
    (data,), (index,) = tmp_path.glob("shard-*.bin"), tmp_path.glob("shard-*.jsonl")
    with data.open("ab") as f:
        f.write(b"\x00" * 20)  # rows cut short
    with index.open("a") as f:
        f.write('{"key": "half", "offset"')  # index line cut short
    resumed = open_cache(tmp_path)
    assert len(resumed) == 1
    c = rows(2, 4, seed=2)
    resumed.put("c", *c, epoch=0)
    assert torch.equal(open_cache(tmp_path).get("c", before_epoch=1)[1], c[1])


@pytest.mark.parametrize("field,value", [("data", "other"), ("teacher", "x"), ("temperature", 1.0), ("topk", 8)])
def test_a_cache_built_for_something_else_is_refused(tmp_path, field, value):
    open_cache(tmp_path).put("a", *rows(1, 4), epoch=0)
    fingerprint, topk = dict(FP), 4
    if field == "topk":
        topk = value
    else:
        fingerprint[field] = value
    with pytest.raises(ValueError, match=f"other {field}.*new folder"):
        open_cache(tmp_path, fingerprint, topk=topk)


def cached_trainer(tmp_path, cache_dir, dataset=None, eval_dataset=None, **overrides):
    kwargs = dict(teacher_cache_dir=str(cache_dir), teacher_cache_topk=64, num_train_epochs=3, max_steps=-1,
                  per_device_train_batch_size=4, learning_rate=2e-2)
    kwargs.update(overrides)
    return SelfDistillSFTTrainer(
        model=tiny_model(), args=config(tmp_path, **kwargs), train_dataset=dataset or prompt_completion_dataset(8),
        eval_dataset=eval_dataset, processing_class=make_tokenizer(), peft_config=lora(),
    )


def count_teacher_calls(trainer):
    calls = []
    forward = trainer.teacher.last_hidden_state
    trainer.teacher.last_hidden_state = lambda inputs: calls.append(1) or forward(inputs)
    return calls


def test_later_epochs_run_no_teacher_forward(tmp_path):
    trainer = cached_trainer(tmp_path, tmp_path / "cache", eval_dataset=prompt_completion_dataset(4),
                             eval_strategy="epoch")
    calls = count_teacher_calls(trainer)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kl" in log]
    assert len(logs) == 6 and len(calls) == 2 + 3  # 2 steps per epoch: only epoch 1 runs the teacher; + 3 evals
    assert [log["teacher_cache_hit"] for log in logs] == [0, 0, 1, 1, 1, 1]
    assert len(trainer.teacher_cache) == 8
    assert logs[-1]["kl"] > 0
    # held-out batches always run the exact teacher, and log the top-k approximation beside it: a lower bound (loose
    # on this near-uniform random model, where the top 64 of 320 tokens hold little of the mass)
    evals = [log for log in trainer.state.log_history if "eval_kl" in log]
    assert len(evals) == 3 and all(0 < log["eval_kl_topk"] <= log["eval_kl"] for log in evals)


def test_full_vocabulary_cache_reproduces_exact_training(tmp_path):
    """k = vocabulary size: the tail bin is empty and cached epochs train exactly like the teacher forward."""
    exact = cached_trainer(tmp_path / "e", None, teacher_cache_dir=None)
    exact.train()
    cached = cached_trainer(tmp_path / "c", tmp_path / "cache", teacher_cache_topk=320)
    cached.train()
    a = [log["loss"] for log in exact.state.log_history if "loss" in log]
    b = [log["loss"] for log in cached.state.log_history if "loss" in log]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_trainer_refuses_a_cache_of_other_data_or_settings(tmp_path):
    cached_trainer(tmp_path / "a", tmp_path / "cache", max_steps=1).train()
    with pytest.raises(ValueError, match="other data"):
        other = Dataset.from_dict({"prompt": ["Q: What is 2+2?\nA:"] * 8, "completion": [" 4"] * 8})
        cached_trainer(tmp_path / "b", tmp_path / "cache", dataset=other)
    with pytest.raises(ValueError, match="other temperature"):
        cached_trainer(tmp_path / "c", tmp_path / "cache", distill_temperature=1.0)
    stored = json.loads((tmp_path / "cache" / "fingerprint.json").read_text())
    assert stored["topk"] == 64 and stored["teacher"].startswith("adapter_disabled:")


def test_prefill_pass_fills_the_cache_so_every_epoch_reads_it(tmp_path):
    trainer = cached_trainer(tmp_path, tmp_path / "cache", teacher_cache_prefill=True,
                             teacher_cache_prefill_batch_size=3)
    calls = count_teacher_calls(trainer)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kl" in log]
    assert len(calls) == 3  # the pre-pass only: 8 examples in batches of 3; no teacher forward while training
    assert [log["teacher_cache_hit"] for log in logs] == [1] * 6 and logs[-1]["kl"] > 0
    assert len(trainer.teacher_cache) == 8

    # A second run on the complete cache (e.g. a resumed one) runs no teacher at all, and trains the same way
    again = cached_trainer(tmp_path / "again", tmp_path / "cache", teacher_cache_prefill=True)
    again_calls = count_teacher_calls(again)
    assert again.prefill_teacher_cache() == 0
    again.train()
    assert len(again_calls) == 0
    torch.testing.assert_close([log["loss"] for log in again.state.log_history if "kl" in log],
                               [log["loss"] for log in logs], rtol=1e-5, atol=1e-6)


def test_prefill_needs_a_cache_folder(tmp_path):
    with pytest.raises(ValueError, match="`teacher_cache_prefill=True` fills the teacher cache, but"):
        config(tmp_path, teacher_cache_prefill=True)
