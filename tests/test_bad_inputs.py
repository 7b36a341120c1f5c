"""Bad inputs get an error (or, for dropped rows, a warning) that names the cause and the fix: one row per case."""

import json
import logging
import re
from types import SimpleNamespace

import pytest
from conftest import (
    config,
    conversational_dataset,
    make_tokenizer,
    prompt_completion_dataset,
    text_dataset,
    tiny_model,
)
from datasets import Dataset

from trl_selfdistill import SelfDistillSFTTrainer
from trl_selfdistill.data_checks import check_not_empty, check_numeric_fields, check_token_ids
from trl_selfdistill.knowledge.facts import load_facts
from trl_selfdistill.validation import check_model_source

LONG = "x" * 300  # over `max_length=64` byte tokens


def prompt_completion(prompts, completions) -> Dataset:
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def make_trainer(tmp_path, train_dataset, eval_dataset=None, **overrides):
    return SelfDistillSFTTrainer(
        model=tiny_model(),
        args=config(tmp_path, **overrides),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=make_tokenizer(),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Datasets

DATASET_ERRORS = [
    pytest.param(lambda: Dataset.from_dict({"body": ["a", "b"]}), {}, ValueError,
                 r"none of the columns SFT reads \(columns: \['body'\]\).*rename_column", id="no-text-column"),
    pytest.param(lambda: Dataset.from_dict({"prompt": ["a", "b"]}), {}, ValueError,
                 "has a `prompt` column but no `completion` column", id="prompt-without-completion"),
    pytest.param(lambda: Dataset.from_dict({"completion": ["a", "b"]}), {}, ValueError,
                 "has a `completion` column but no `prompt` column", id="completion-without-prompt"),
    pytest.param(lambda: prompt_completion([LONG] * 4, [" y"] * 4), {"max_length": 64}, ValueError,
                 r"Every one of the 4 rows .* dropped: truncated to `max_length=64`.*Raise `max_length`",
                 id="every-prompt-over-max-length"),
    pytest.param(lambda: Dataset.from_dict({"text": [""] * 8}), {}, ValueError,
                 "Every row of the train dataset is empty.*empty strings", id="empty-strings"),
    pytest.param(lambda: Dataset.from_dict({"text": [""] * 8}), {"distill_coef": 0.0}, ValueError,
                 "Every row of the train dataset is empty", id="empty-strings-plain-sft"),
    pytest.param(lambda: Dataset.from_dict({"input_ids": [[0, 0, 0, 0]] * 4}), {}, ValueError,
                 "only padding or special tokens.*`input_ids` made of padding", id="all-padding"),
    pytest.param(lambda: Dataset.from_dict({"input_ids": [[5]] * 4}), {}, ValueError,
                 "No row of the train dataset has a token for the loss to train on", id="nothing-to-predict"),
    pytest.param(lambda: prompt_completion(["a", "b"], [1, 2]), {}, TypeError,
                 r"`completion` column of the train dataset holds int64 values, not text.*str\(row",
                 id="int-completions"),
    pytest.param(lambda: prompt_completion(["a", "b", "c"], [" a", None, None]), {}, ValueError,
                 r"2 of 3 rows .* have no `completion` \(None\), the first at row 1.*dataset.filter",
                 id="none-completions"),
    pytest.param(lambda: prompt_completion([None, "b"], [" a", " b"]), {}, ValueError,
                 r"1 of 2 rows .* have no `prompt` \(None\), the first at row 0", id="none-prompts"),
    pytest.param(lambda: Dataset.from_dict({"text": [None, "a"]}), {"distill_coef": 0.0}, ValueError,
                 r"have no `text` \(None\)", id="none-text-plain-sft"),
    pytest.param(lambda: Dataset.from_dict({"input_ids": [[5, -3, 7]] * 2}), {"distill_coef": 0.0}, ValueError,
                 r"2 rows .* token ids outside 0 and up \(negative ids\).*another tokenizer", id="negative-token-ids"),
]


@pytest.mark.parametrize("dataset, overrides, error, message", DATASET_ERRORS)
def test_bad_train_data_is_refused_at_construction(tmp_path, dataset, overrides, error, message):
    with pytest.raises(error, match=message):
        make_trainer(tmp_path, dataset(), **overrides)


def test_an_empty_eval_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"The eval dataset is empty \(0 rows\)"):
        make_trainer(tmp_path, text_dataset(), eval_dataset=Dataset.from_dict({"text": []}))


def test_check_not_empty_names_the_dataset():
    with pytest.raises(ValueError, match=r"The train dataset is empty \(0 rows\).*`split`, `filter` or `select`"):
        check_not_empty(Dataset.from_dict({"text": []}), "train")


def test_an_empty_train_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"The train dataset is empty \(0 rows\)"):
        make_trainer(tmp_path, Dataset.from_dict({"text": []}))


def over_vocabulary() -> Dataset:
    return Dataset.from_dict({"input_ids": [[5, 6, 7]] * 3 + [[5, 320, 7]]})  # the tiny model has 320 embeddings


@pytest.mark.parametrize("split", ["train", "eval"])
def test_token_ids_over_the_model_vocabulary_are_refused(split):
    ok = Dataset.from_dict({"input_ids": [[5, 300, 319]] * 4})  # over the tokenizer's 259 tokens, not the model's
    check_token_ids(SimpleNamespace(model=tiny_model(), train_dataset=ok, eval_dataset={"eval": ok}))
    datasets = {"train_dataset": ok, "eval_dataset": {"eval": ok}}
    datasets["train_dataset" if split == "train" else "eval_dataset"] = over_vocabulary()
    with pytest.raises(ValueError, match=rf"1 rows of the {split} dataset hold token ids outside the model's "
                                         r"vocabulary \(0 to 319\), e.g. rows 3.*another tokenizer"):
        check_token_ids(SimpleNamespace(model=tiny_model(), **datasets))


def test_token_ids_are_read_from_the_selected_rows_only():
    """A `select` leaves the other rows in the Arrow table: their ids are none of the check's business."""
    rows = {"input_ids": [[5, 6], [5, 999], [5, 7]], "labels": [[5, 6], [5, 999], [5, 7]]}
    selected = Dataset.from_dict(rows).select([0, 2])
    check_token_ids(SimpleNamespace(model=tiny_model(), train_dataset=selected, eval_dataset=None))
    with pytest.raises(ValueError, match="e.g. rows 0"):  # row 1 of the table is row 0 of this selection
        check_token_ids(SimpleNamespace(model=tiny_model(), train_dataset=Dataset.from_dict(rows).select([1, 2]),
                                        eval_dataset=None))


def test_token_ids_over_the_model_vocabulary_are_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        make_trainer(tmp_path, over_vocabulary())


DATASET_WARNINGS = [
    pytest.param(lambda: prompt_completion([LONG] * 3 + ["Q"] * 5, [" y"] * 8), {"max_length": 64},
                 "3 of 8 rows of the train dataset were dropped: truncated to `max_length=64`", 5,
                 id="some-truncated"),
    pytest.param(lambda: Dataset.from_dict({"text": ["", "a b c", "", "d e f"]}), {},
                 r"2 of 4 rows of the train dataset hold only padding or special tokens \(e.g. rows 0, 2\)", 4,
                 id="some-empty-strings"),
    pytest.param(lambda: Dataset.from_dict({"text": ["", "a b c", "", "d e f"]}), {"shuffle_dataset": True},
                 r"2 of 4 rows .* \(e.g. rows 0, 2\)", 4, id="some-empty-strings-shuffled-numbered-as-given"),
]


@pytest.mark.parametrize("dataset, overrides, message, rows", DATASET_WARNINGS)
def test_dropped_or_empty_rows_are_counted_in_a_warning(tmp_path, caplog, dataset, overrides, message, rows):
    with caplog.at_level(logging.WARNING, logger="trl_selfdistill.data_checks"):
        trainer = make_trainer(tmp_path, dataset(), **overrides)
    assert len(trainer.train_dataset) == rows
    assert any(re.search(message, record.getMessage()) for record in caplog.records)


@pytest.mark.parametrize("dataset", [prompt_completion_dataset, conversational_dataset, text_dataset])
def test_good_data_passes_without_warnings(tmp_path, caplog, dataset):
    with caplog.at_level(logging.WARNING, logger="trl_selfdistill.data_checks"):
        make_trainer(tmp_path, dataset(), max_length=64)
    assert not caplog.records


# ---------------------------------------------------------------------------------------------------------------------
# Teacher source and numeric fields

TEACHER_ERRORS = [
    pytest.param(lambda tmp: str(tmp / "missing" / "checkpoint-5"), {}, "there is no such folder", id="absolute-path"),
    pytest.param(lambda tmp: "./runs/checkpoint-5", {}, "there is no such folder", id="dot-relative-path"),
    pytest.param(lambda tmp: "out/checkpoint-5", {}, "there is no such folder", id="path-in-an-existing-folder"),
    pytest.param(lambda tmp: "nobody-here/no-such-model", {"local_files_only": True},
                 "Hub is offline .* no cached copy.*hf download nobody-here/no-such-model", id="offline-hub-id"),
]


@pytest.mark.parametrize("source, init_kwargs, message", TEACHER_ERRORS)
def test_a_teacher_that_cannot_be_loaded_is_refused_before_loading(tmp_path, monkeypatch, source, init_kwargs,
                                                                   message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=message):
        check_model_source(source(tmp_path), "teacher_model_name_or_path", model_init_kwargs=init_kwargs)


def test_the_trainer_checks_the_teacher_path(tmp_path):
    with pytest.raises(ValueError, match=r"`teacher_model_name_or_path=.*`: there is no such folder"):
        make_trainer(tmp_path, prompt_completion_dataset(), teacher_model_name_or_path=str(tmp_path / "snapshot"))


NUMERIC_ERRORS = [
    pytest.param("distill_coef", "1.0", r"`distill_coef` must be a number, got the str '1.0'.*`distill_coef=1.0`",
                 id="coef-as-string"),
    pytest.param("distill_temperature", None, "`distill_temperature` must be a number, got the NoneType None",
                 id="temperature-none"),
    pytest.param("jsd_beta", True, "`jsd_beta` must be a number, got the bool True", id="beta-bool"),
    pytest.param("teacher_cache_topk", 64.0, "`teacher_cache_topk` must be an integer, got the float 64.0",
                 id="topk-float"),
]


@pytest.mark.parametrize("field, value, message", NUMERIC_ERRORS)
def test_numeric_fields_must_hold_numbers(tmp_path, field, value, message):
    args = config(tmp_path)
    check_numeric_fields(args)  # the defaults pass
    setattr(args, field, value)
    with pytest.raises(TypeError, match=message):
        check_numeric_fields(args)


# ---------------------------------------------------------------------------------------------------------------------
# Fact files

FACT_FILE_ERRORS = [
    pytest.param("facts.jsonl", '{"question": "Q1?", "answers": ["a"]}\n{"question": "Q2?", "answers": ["b"]\n',
                 ValueError, r"facts.jsonl:2: not valid JSON \(Expecting ',' delimiter, column 37\).*fix or delete",
                 id="bad-json-line"),
    pytest.param("facts.jsonl", '{"question": "Q1?", "answers": ["a"]}\n\n["Q2?", "b"]\n', ValueError,
                 r'facts.jsonl:3 is a JSON list \(\["Q2\?", "b"\]\), not an object', id="line-is-a-list"),
    pytest.param("facts.jsonl", "", ValueError, "No facts in .*facts.jsonl: the file is empty", id="empty-file"),
    pytest.param("facts.jsonl", "\n  \n", ValueError, "the file is empty", id="blank-lines-only"),
    pytest.param("facts.json", '{"question": "Q1?"}', ValueError, "holds a JSON object, not a list of facts",
                 id="json-object-not-list"),
    pytest.param("facts.json", '[{"question": "Q1?", "answers": ["a"]}, 3]', ValueError,
                 r"facts.json: item 1 is a JSON number \(3\), not an object", id="json-list-item-not-object"),
    pytest.param("facts.json", '[{"question": "Q1?",\n "answers": ["a"]', ValueError, r"facts.json:2: not valid JSON",
                 id="bad-json-file"),
    pytest.param(None, None, FileNotFoundError,
                 "No fact file or folder at .*missing.jsonl. Pass an existing JSON/JSONL file", id="missing-file"),
]


@pytest.mark.parametrize("name, content, error, message", FACT_FILE_ERRORS)
def test_bad_fact_files_name_the_file_and_line(tmp_path, name, content, error, message):
    path = tmp_path / (name or "missing.jsonl")
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=message):
        load_facts(str(path))


def test_an_empty_fact_folder_is_refused(tmp_path):
    (tmp_path / "P36.test.jsonl").write_text("")
    with pytest.raises(ValueError, match="No facts in .*: its files are empty"):
        load_facts(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Leftovers of an earlier run


def test_a_corrupted_results_file_of_an_earlier_run_does_not_stop_training(tmp_path):
    trainer = make_trainer(tmp_path, prompt_completion_dataset(), max_steps=2, save_strategy="steps", save_steps=1)
    stale = tmp_path / "out" / "forgetting_results.json"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('{"forgetting": 0.1, ')  # an earlier run killed while writing it
    trainer.train()  # today: ValueError at the first checkpoint (SFTTrainer._save_checkpoint writes the card)
    assert trainer.state.global_step == 2
    assert (tmp_path / "out" / "checkpoint-1").is_dir()
    assert json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
