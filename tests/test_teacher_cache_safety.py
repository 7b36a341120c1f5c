"""The teacher cache never serves wrong values: concurrent writers, damaged files, bad folders, read-only, resume."""

import hashlib
import json
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import config, make_tokenizer, prompt_completion_dataset, tiny_model
from peft import LoraConfig
from transformers import TrainerCallback

from trl_selfdistill import SelfDistillSFTTrainer
from trl_selfdistill.teacher_cache import TeacherCache, tensor_digest

FP = {"teacher": "t", "tokenizer": "v", "data": "d", "temperature": 0.5, "scope": "completion"}
K, VOCAB = 4, 320
FIX = "delete it, or point `teacher_cache_dir` elsewhere"


def open_cache(directory, **kwargs):
    return TeacherCache(directory, FP, topk=K, vocab_size=VOCAB, **kwargs)


def entry(key: str, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """Values determined by the key alone (1 to 5 rows), so any entry can be checked against its key."""
    seed = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, VOCAB, (1 + seed % 5, k), generator=g, dtype=torch.int32),
        torch.randn(1 + seed % 5, k, generator=g),
    )


def served_correctly(cache: TeacherCache, key: str) -> bool:
    got = cache.get(key, before_epoch=1)
    return got is not None and all(torch.equal(a, b) for a, b in zip(got, entry(key), strict=True))


def only(directory: Path, pattern: str) -> Path:
    (path,) = directory.glob(pattern)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Concurrent writers


def write_entries(directory: Path, who: str, n: int, go) -> None:
    torch.set_num_threads(1)  # a forked child: no thread pool inherited from the parent
    cache = open_cache(directory)
    go.wait()
    for i in range(n):
        cache.put(f"{who}-{i}", *entry(f"{who}-{i}"), epoch=0)
        if i % 50 == 0:
            cache.refresh()  # reads the other writer's shard while it is being written


def test_two_processes_writing_one_folder_never_mix_entries(tmp_path):
    """Two runs (both rank 0, as in a λ sweep) write one folder at the same time; every entry reads back its own
    values. (When both appended to `shard-0`, some index lines pointed at the other's rows.)"""
    n, directory = 1500, tmp_path / "cache"
    context = multiprocessing.get_context("fork")  # the children need no fresh imports
    go = context.Event()
    writers = [context.Process(target=write_entries, args=(directory, who, n, go)) for who in "ab"]
    for writer in writers:
        writer.start()
    go.set()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    cache = open_cache(directory)
    assert len(cache) == 2 * n and len(list(directory.glob("shard-*.jsonl"))) == 2
    assert all(served_correctly(cache, f"{who}-{i}") for who in "ab" for i in range(n))


# ---------------------------------------------------------------------------------------------------------------------
# Folders and fingerprints


def file_at(tmp_path: Path, relative: str) -> Path:
    (tmp_path / "f").write_text("not a folder")
    return tmp_path / relative


@pytest.mark.parametrize(
    "relative,message", [("f", r"/f is a file"), ("f/cache", r"/f/cache lies under the file .*/f\.")]
)
def test_a_cache_folder_that_is_a_file_or_lies_under_one_is_refused(tmp_path, relative, message):
    with pytest.raises(ValueError, match=message + r".*Point `teacher_cache_dir` to a folder"):
        open_cache(file_at(tmp_path, relative))


def delete(path: Path):
    path.unlink()


def garble(path: Path):
    path.write_text('{"version": 2, "to')


def make_list(path: Path):
    path.write_text("[1, 2]")


def make_folder(path: Path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    "damage,message",
    [
        (delete, "holds shards but no fingerprint.json"),
        (garble, "has an unreadable fingerprint.json"),
        (make_list, "has an unreadable fingerprint.json .not a JSON object"),
        (make_folder, "has an unreadable fingerprint.json"),
    ],
)
def test_a_missing_or_unreadable_fingerprint_is_refused(tmp_path, damage, message):
    open_cache(tmp_path).put("a", *entry("a"), epoch=0)
    damage(tmp_path / "fingerprint.json")
    with pytest.raises(ValueError, match=message) as error:
        open_cache(tmp_path)
    assert str(tmp_path) in str(error.value) and FIX in str(error.value)


def test_a_corrupt_index_line_is_refused_with_file_and_line_but_a_torn_last_line_is_skipped(tmp_path):
    cache = open_cache(tmp_path)
    for key in "abc":
        cache.put(key, *entry(key), epoch=0)
    index = only(tmp_path, "shard-*.jsonl")
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines) + '{"key": "d", "off')  # an interrupted write: skipped
    assert len(open_cache(tmp_path)) == 3
    lines[2] = '{"key": "b", "offset": "zero"}\n'
    index.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"{index}, line 3, is not a valid teacher-cache index line") as error:
        open_cache(tmp_path)
    assert FIX in str(error.value)


def test_a_shard_written_for_another_fingerprint_is_ignored(tmp_path, caplog):
    """Two runs with different settings that raced to create the folder: only the fingerprint's own shards are read."""
    open_cache(tmp_path).put("a", *entry("a"), epoch=0)
    index = only(tmp_path, "shard-*.jsonl")
    lines = index.read_text().splitlines(keepends=True)
    index.write_text(json.dumps({"fingerprint": "someone-else", "version": 2}) + "\n" + "".join(lines[1:]))
    with caplog.at_level(logging.WARNING):
        assert len(open_cache(tmp_path)) == 0
    assert "written for another fingerprint" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Damaged entries


def flip_a_logprob_bit(data: Path, index: Path):
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x01
    data.write_bytes(bytes(raw))


def nan_bytes(data: Path, index: Path):
    raw = bytearray(data.read_bytes())
    raw[0:4] = raw[-4:] = np.float32("nan").tobytes()  # into a token id and a log-prob
    data.write_bytes(bytes(raw))


def truncate_then_append(data: Path, index: Path):
    """The data file loses its rows; a later run writes new ones, which stale index lines must not serve."""
    os.truncate(data, 0)
    cache = open_cache(data.parent)
    for i in range(4):
        cache.put(f"later-{i}", *entry(f"later-{i}"), epoch=0)


def resign(index: Path, data: Path, change):
    """Rewrite the data with `change` applied and a matching checksum: only the value checks can catch it."""
    from trl_selfdistill.teacher_cache import _checksum

    header, line = index.read_text().splitlines()
    fields = json.loads(line)
    rows = np.frombuffer(data.read_bytes(), dtype=np.int32).reshape(-1, 2 * K).copy()
    change(rows)
    data.write_bytes(rows.tobytes())
    fields["checksum"] = _checksum(fields["key"], rows.tobytes())
    index.write_text(f"{header}\n{json.dumps(fields)}\n")


def signed_nan(data: Path, index: Path):
    resign(index, data, lambda rows: rows[:, K:].view(np.float32).__setitem__((0, 0), np.inf))


def signed_id_out_of_vocabulary(data: Path, index: Path):
    resign(index, data, lambda rows: rows.__setitem__((0, 0), VOCAB))


def index_points_past_the_end(data: Path, index: Path):
    header, line = index.read_text().splitlines()
    index.write_text(f"{header}\n{json.dumps(json.loads(line) | {'offset': 64 * K * 8})}\n")


@pytest.mark.parametrize(
    "damage,problem",
    [
        (flip_a_logprob_bit, "checksum mismatch"),
        (nan_bytes, "checksum mismatch"),
        (truncate_then_append, "past the end of the data file"),
        (signed_nan, "non-finite log-probs"),
        (signed_id_out_of_vocabulary, "token ids outside"),
        (index_points_past_the_end, "past the end of the data file"),
    ],
)
def test_a_damaged_entry_is_a_miss_and_is_stored_again(tmp_path, caplog, damage, problem):
    open_cache(tmp_path).put("a", *entry("a"), epoch=0)
    data, index = only(tmp_path, "shard-*.bin"), only(tmp_path, "shard-*.jsonl")
    damage(data, index)
    cache = open_cache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cache.get("a", before_epoch=1) is None
    assert problem in caplog.text and data.name in caplog.text
    cache.put("a", *entry("a"), epoch=0)  # what the trainer does after the teacher ran for the miss
    assert served_correctly(open_cache(tmp_path), "a") and served_correctly(cache, "a")
    if damage is truncate_then_append:
        assert all(served_correctly(cache, f"later-{i}") for i in range(4))


@pytest.mark.parametrize(
    "bad,message",
    [
        ((0, 0, "logp", float("nan")), "non-finite"),
        ((1, 2, "logp", float("inf")), "non-finite"),
        ((0, 3, "logp", float("-inf")), "non-finite"),
        ((0, 0, "id", -1), "token ids outside"),
        ((0, 1, "id", VOCAB), "token ids outside"),
    ],
)
def test_put_refuses_values_it_could_not_serve(tmp_path, bad, message):
    row, col, which, value = bad
    ids, logps = entry("a")
    (logps if which == "logp" else ids)[row, col] = value
    cache = open_cache(tmp_path)
    with pytest.raises(ValueError, match=f"cache key a has {message}.*never cached"):
        cache.put("a", ids, logps, epoch=0)
    assert len(cache) == 0 and not list(tmp_path.glob("shard-*"))


def test_topk_larger_than_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`teacher_cache_topk=321` exceeds the vocabulary \(320 tokens\)"):
        TeacherCache(tmp_path, FP, topk=321, vocab_size=VOCAB)


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprint of the teacher


def test_the_weight_digest_covers_every_byte():
    w = torch.zeros(100_000)
    changed = w.clone()
    changed[1] = 1e-30  # outside any strided sample, and tiny
    assert tensor_digest([("w", w)]) == tensor_digest([("w", w.clone())])
    assert tensor_digest([("w", w)]) != tensor_digest([("w", changed)])
    assert tensor_digest([("w", w)]) != tensor_digest([("w", w.half())])
    assert tensor_digest([("w", w)]) != tensor_digest([("v", w)])


# ---------------------------------------------------------------------------------------------------------------------
# Read-only reuse


def complete_cache(directory: Path, keys="abcdef") -> None:
    cache = open_cache(directory)
    for key in keys:
        cache.put(key, *entry(key), epoch=0)


def snapshot(directory: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


def test_reading_a_complete_cache_writes_nothing(tmp_path):
    """Opening a complete cache, serving every entry and re-offering stored keys leaves the folder as it was. (The
    folder is also made read-only; tests running as root write through that, so the snapshot is what proves it.)"""
    directory = tmp_path / "cache"
    complete_cache(directory)
    before = snapshot(directory)
    directory.chmod(0o555)
    try:
        cache = open_cache(directory)
        assert all(served_correctly(cache, key) for key in "abcdef")
        for key in "abcdef":
            cache.put(key, *entry(key), epoch=0)
            cache.put(key, *entry(key), epoch=3)
    finally:
        directory.chmod(0o755)
    assert snapshot(directory) == before


def test_a_folder_it_may_not_write_serves_and_stores_nothing(tmp_path, monkeypatch, caplog):
    """A folder `os.access` reports read-only (a read-only mount, or permissions for a non-root user; simulated here,
    since tests may run as root): entries are served, rows it lacks are computed but not stored, with a warning."""
    directory = tmp_path / "cache"
    complete_cache(directory, keys="abc")
    before = snapshot(directory)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
    with caplog.at_level(logging.WARNING):
        cache = open_cache(directory)
    assert "is read-only for this process" in caplog.text and not cache.writable
    assert all(served_correctly(cache, key) for key in "abc")
    cache.put("new", *entry("new"), epoch=0)
    assert cache.get("new", before_epoch=1) is None and snapshot(directory) == before


# ---------------------------------------------------------------------------------------------------------------------
# In the trainer


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def cached_trainer(tmp_path, cache_dir, model=None, callbacks=None, **overrides):
    kwargs = {
        "teacher_cache_dir": str(cache_dir),
        "teacher_cache_topk": 16,
        "num_train_epochs": 2,
        "max_steps": -1,
        "per_device_train_batch_size": 4,
        "learning_rate": 2e-2,
        **overrides,
    }
    return SelfDistillSFTTrainer(
        model=model or tiny_model(),
        args=config(tmp_path, **kwargs),
        train_dataset=prompt_completion_dataset(8),
        processing_class=make_tokenizer(),
        peft_config=lora(),
        callbacks=callbacks,
    )


def test_trainer_refuses_topk_larger_than_the_vocabulary_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"`teacher_cache_topk=321` exceeds the vocabulary \(320 tokens\)"):
        cached_trainer(tmp_path, tmp_path / "cache", teacher_cache_topk=321)


def test_trainer_refuses_a_cache_of_a_teacher_that_differs_in_one_weight(tmp_path):
    cached_trainer(tmp_path / "a", tmp_path / "cache")
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    with pytest.raises(ValueError, match="other teacher"):
        cached_trainer(tmp_path / "b", tmp_path / "cache", model=model)


class CrashAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")


def step_logs(trainer) -> dict[int, dict]:
    return {log["step"]: log for log in trainer.state.log_history if "loss" in log}


def test_resuming_with_a_cache_trains_like_the_uninterrupted_run(tmp_path):
    """A crash in epoch 1 after the cache got rows that the last checkpoint has not trained on: the resumed run must
    replay those steps with the exact teacher, as the uninterrupted run did, not with the cached top-k."""
    uninterrupted = cached_trainer(tmp_path / "u", tmp_path / "cache-u")
    uninterrupted.train()
    crashed = cached_trainer(
        tmp_path / "r", tmp_path / "cache-r", save_strategy="steps", save_steps=1, callbacks=[CrashAtStep(2)]
    )
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert len(crashed.teacher_cache) == 8  # step 2 stored its rows; checkpoint-1 has not trained on them
    resumed = cached_trainer(tmp_path / "r", tmp_path / "cache-r", save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "r" / "out" / "checkpoint-1"))
    want, got = step_logs(uninterrupted), step_logs(resumed)
    assert sorted(got) == [1, 2, 3, 4] and [want[s]["teacher_cache_hit"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    for step in (2, 3, 4):  # step 1's log comes from the checkpoint
        assert got[step]["teacher_cache_hit"] == want[step]["teacher_cache_hit"]
        for key in ("loss", "kl", "sft_loss"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_a_trainer_whose_cache_holds_nan_bytes_recomputes_those_rows(tmp_path, caplog):
    """NaN bytes over every stored value (once `index … out of bounds` in the loss): the damaged rows are not
    served; the teacher recomputes them in the epoch that finds them, and the next epoch serves the fresh copies."""
    cached_trainer(tmp_path / "a", tmp_path / "cache", num_train_epochs=1).train()
    for data in (tmp_path / "cache").glob("shard-*.bin"):
        data.write_bytes(np.full(data.stat().st_size // 4, np.nan, dtype=np.float32).tobytes())
    trainer = cached_trainer(tmp_path / "b", tmp_path / "cache", num_train_epochs=3)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    logs = [log for log in trainer.state.log_history if "kl" in log]
    assert [log["teacher_cache_hit"] for log in logs] == [0, 0, 0, 0, 1, 1]
    assert all(np.isfinite(log["loss"]) and np.isfinite(log["kl"]) for log in logs)
    assert "damaged entry (checksum mismatch)" in caplog.text
