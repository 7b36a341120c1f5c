"""What a user passes in is checked before any model loads, with one message from the CLI and from Python that names
the problem and the fix; a push uploads only what this run saved. One section per class of issue 29's sweep."""

import json
import math
import unicodedata
from pathlib import Path

import pytest
from conftest import config, make_tokenizer, prompt_completion_dataset, tiny_model
from datasets import Dataset
from test_model_card import FakeHub

from trl_selfdistill import ForgettingCallback, SelfDistillSFTTrainer
from trl_selfdistill.cli import ModelArguments
from trl_selfdistill.cli import main as cli
from trl_selfdistill.data_checks import check_raw_dataset
from trl_selfdistill.embedded import load_model
from trl_selfdistill.hub import push_checkpoint, stage_upload
from trl_selfdistill.knowledge import AnswerFormat, KnowledgeSplits, is_correct, load_facts, probe
from trl_selfdistill.scripts.sft import parse_and_run

DATA = Path(__file__).parent / "data"
QUESTIONS = [f"What is the capital of {country}?" for country in ("France", "Japan", "Peru", "Chile", "Kenya")]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def facts_rows(**extra):
    return [{"question": q, "answers": ["x"], "relation": "capital", **extra} for q in QUESTIONS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def sft_argv(model, output_dir, data="prompt_completion", *extra):
    return ["--model_name_or_path", str(model), "--dataset_name", str(data if isinstance(data, Path) else DATA / data),
            "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--report_to", "none", "--bf16", "false", "--disable_tqdm", "true", "--save_strategy", "no", *extra]


def trainer_for(tmp_path, dataset=None, model=None, **overrides):
    return SelfDistillSFTTrainer(
        model=model if model is not None else tiny_model(), args=config(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else prompt_completion_dataset(8),
        processing_class=make_tokenizer(),
    )


def no_generation(*_args):
    raise AssertionError("generation ran before the input was checked")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Answers that normalise to nothing, Unicode normalisation

@pytest.mark.parametrize("prediction, aliases, expected", [
    ("A", ["A"], True),  # a multiple-choice letter
    ("a.", ["A"], True),
    ("(B)", ["B"], True),
    ("B", ["A"], False),
    ("The answer is A", ["A"], False),
    ("", ["A"], False),
    ("An", ["A"], False),
    ("The", ["The"], True),
    ("...", ["..."], True),
    ("—", ["—"], True),
    ("", ["..."], False),
    ("?", ["..."], False),
    (unicodedata.normalize("NFD", "Zürich"), ["Zürich"], True),
    ("Zürich", [unicodedata.normalize("NFD", "Zürich")], True),
    ("ＰＡＲＩＳ", ["Paris"], True),  # full-width letters
    ("O’Neil", ["O'Neil"], True),
    ("Berners–Lee", ["Berners-Lee"], True),
    ("the Eiffel Tower.", ["Eiffel Tower"], True),  # SQuAD behaviour kept
    ("Paris, France", ["Paris"], False),
])
def test_answers_that_normalise_to_nothing_and_unicode_forms_match(prediction, aliases, expected):
    assert is_correct(prediction, aliases) is expected


def test_a_fact_answered_with_its_letter_is_known():
    facts = load_facts([{"question": f"Q{i}? (A) yes (B) no", "answers": ["A"], "relation": "mc"} for i in range(6)])
    categorised = probe(facts, generate_fn=lambda prompts, greedy, n: [["A"] * n for _ in prompts])
    assert set(categorised["category"]) == {"HighlyKnown"}


# ---------------------------------------------------------------------------------------------------------------------
# 2. Chat rows whose message content is None

def chat(*turns):
    return [{"role": role, "content": content} for role, content in zip(("user", "assistant"), turns, strict=False)]


@pytest.mark.parametrize("columns, message", [
    ({"messages": [chat("Q?", "A")] * 3 + [chat("Q?", None)]},
     r"1 of 4 rows .* have a message with no `content` \(None\) in `messages`, the first at row 3 \(message 1\)"),
    ({"messages": [chat(None, "A"), chat("Q?", "A")]}, r"no `content` \(None\) in `messages`, the first at row 0"),
    ({"prompt": [chat("Q?"), chat(None)], "completion": [[chat("Q?", "A")[1]]] * 2},
     r"no `content` \(None\) in `prompt`, the first at row 1"),
])
def test_chat_messages_without_content_are_refused(tmp_path, columns, message):
    with pytest.raises(ValueError, match=message + r".*dataset.filter"):
        trainer_for(tmp_path, Dataset.from_dict(columns))


def test_a_tool_call_turn_may_have_no_content(tmp_path):
    call = [{"type": "function", "function": {"name": "capital", "arguments": {"country": "France"}}}]
    rows = [[{"role": "user", "content": "Q?", "tool_calls": None},
             {"role": "assistant", "content": None, "tool_calls": call},
             {"role": "assistant", "content": "Paris", "tool_calls": None}]] * 2
    check_raw_dataset(Dataset.from_dict({"messages": rows}), config(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# 3. Settings that train no step

NO_STEPS = [(0, 0), (-1, 0), (0, -2), (-1, math.nan)]


@pytest.mark.parametrize("max_steps, epochs", NO_STEPS)
def test_no_training_step_is_refused_in_python(tmp_path, max_steps, epochs):
    with pytest.raises(ValueError, match=r"Nothing would be trained: `max_steps=.*` and `num_train_epochs=.*` give 0 "
                                         r"optimizer steps.*Set `max_steps`"):
        trainer_for(tmp_path, model=str(tmp_path / "never-loaded"), max_steps=max_steps, num_train_epochs=epochs)


@pytest.mark.parametrize("entry", ["script", "cli"])
def test_no_training_step_is_refused_before_anything_loads(tmp_path, entry):
    argv = sft_argv(tmp_path / "no-model", tmp_path / "out", "prompt_completion", "--num_train_epochs", "0")
    argv[argv.index("--max_steps") + 1] = "0"
    with pytest.raises(ValueError, match="Nothing would be trained"):
        parse_and_run(argv) if entry == "script" else cli(["sft", *argv])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 4, 12. The upload manifest: nothing left by an earlier run goes up (a stale adapter, shard index, truncated config)

FULL_MODEL_UPLOAD = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja"}


def leave_an_earlier_run(folder: Path, adapter_config: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(adapter_config)
    (folder / "adapter_model.safetensors").write_bytes(b"an earlier LoRA run")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    (folder / "rng_state_3.pth").write_bytes(b"an earlier 4-process run")


@pytest.mark.parametrize("adapter_config", ['{"peft_type": "LORA", "r": 4}', '{"peft_type": "LO'],
                         ids=["stale-adapter", "truncated-stale-adapter-config"])
def test_a_push_uploads_only_what_this_runs_save_wrote(tmp_path, monkeypatch, capsys, adapter_config):
    out = tmp_path / "out"
    leave_an_earlier_run(out, adapter_config)
    trainer = trainer_for(tmp_path, max_steps=1, distill_coef=0.0, hub_model_id="someone/tiny")
    trainer.train()
    hub = FakeHub().patch(monkeypatch)
    trainer.push_to_hub()

    (upload,) = hub.uploads
    assert set(upload["files"]) == FULL_MODEL_UPLOAD
    assert f"uploading to someone/tiny: {', '.join(sorted(FULL_MODEL_UPLOAD))}" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").read_bytes() == b"an earlier LoRA run"  # left alone on disk


def test_checkpoint_pushes_upload_only_what_each_checkpoint_save_wrote(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for step in (1, 2):
        leave_an_earlier_run(out / f"checkpoint-{step}", '{"peft_type": "LORA"}')
    hub = FakeHub().patch(monkeypatch)
    trainer = trainer_for(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, push_to_hub=True,
                          hub_strategy="checkpoint", hub_model_id="someone/tiny", distill_coef=0.0)
    trainer.train()

    assert len(hub.uploads) == 4  # per checkpoint: model files at the root, resume files under last-checkpoint/
    for upload in hub.uploads:
        assert not {"adapter_config.json", "adapter_model.safetensors", "model.safetensors.index.json",
                    "rng_state_3.pth"} & set(upload["files"])
        assert "model.safetensors" in upload["files"]
    resume = [upload for upload in hub.uploads if upload.get("path_in_repo") == "last-checkpoint"]
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= set(resume[-1]["files"])


def test_a_folder_saved_by_no_run_is_checked_for_contradictions(tmp_path):
    """Without a manifest (a folder no save of this run wrote), stale-looking files are refused, naming the file."""
    folder = tmp_path / "folder"
    tiny_model().save_pretrained(folder)
    (folder / "adapter_config.json").write_text('{"peft_type": "LO')
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON \(line 1, column 15.*truncated"):
        stage_upload(folder)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds both an adapter .* and full weights .*earlier run's"):
        stage_upload(folder)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(ValueError, match="names shards that would not be uploaded"):
        stage_upload(folder)


# ---------------------------------------------------------------------------------------------------------------------
# 5. A checkpoint push without weights

def test_a_checkpoint_push_without_weights_is_refused(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, hub_strategy="every_save", hub_model_id="someone/tiny")
    folder = tmp_path / "out" / "checkpoint-5"
    folder.mkdir(parents=True)
    tiny_model().config.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    hub = FakeHub().patch(monkeypatch)
    with pytest.raises(ValueError, match=r"checkpoint-5 has no model weights to push.*configs and tokenizer only.*"
                                         r"stage3_gather_16bit_weights_on_model_save.*FULL_STATE_DICT.*hub_strategy"):
        push_checkpoint(trainer, str(folder))
    assert hub.uploads == []


def test_a_push_whose_save_wrote_no_weights_is_refused(tmp_path, monkeypatch):
    """As under ZeRO-3 without gathering the weights: the save writes configs and tokenizer only."""
    trainer = trainer_for(tmp_path, hub_model_id="someone/tiny", distill_coef=0.0)
    trainer.model.save_pretrained(tmp_path / "out")  # weights of an earlier save: not this push's

    def save_without_weights(output_dir=None, state_dict=None):
        trainer.model.config.save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)

    monkeypatch.setattr(trainer, "_save", save_without_weights)
    hub = FakeHub().patch(monkeypatch)
    with pytest.raises(ValueError, match=r"out has no model weights to push.*stage3_gather_16bit_weights_on"):
        trainer.push_to_hub()
    assert hub.uploads == []


# ---------------------------------------------------------------------------------------------------------------------
# 6, 7, 12. Model paths: a missing folder, a file, no tokenizer files, a truncated config

def model_folder(tmp_path, case: str) -> str:
    folder = tmp_path / "model"
    if case == "missing":
        return str(tmp_path / "runs" / "no-such-model")
    if case == "relative-missing":
        return "./no-such-model"
    tiny_model().save_pretrained(folder)
    if case == "file":
        return str(folder / "model.safetensors")
    if case == "truncated-config":
        make_tokenizer().save_pretrained(folder)
        (folder / "config.json").write_text('{"model_type": "lla')
    if case == "no-weights":
        make_tokenizer().save_pretrained(folder)
        (folder / "model.safetensors").unlink()
    if case == "checkpoints-only":
        (folder / "checkpoint-4").mkdir()
        (folder / "config.json").unlink()
    return str(folder)


MODEL_CASES = [
    ("missing", "there is no such folder"),
    ("relative-missing", "there is no such folder"),
    ("file", r"is a file, not a model folder. Pass the folder that holds it"),
    ("no-tokenizer", r"has no tokenizer files \(none of tokenizer.json.*tokenizer.save_pretrained"),
    ("truncated-config", r"config.json is not valid JSON \(line 1.*truncated"),
    ("no-weights", r"has no weights \(no \*.safetensors"),
    ("checkpoints-only", r"is not a model folder: it has no config.json.*It holds checkpoints: pass one of them"),
]


@pytest.mark.parametrize("case, message", MODEL_CASES, ids=[case for case, _ in MODEL_CASES])
@pytest.mark.parametrize("entry", ["eval", "probe", "sft", "SelfDistillSFTTrainer", "load_model"])
def test_a_model_that_cannot_be_loaded_is_named_before_loading(tmp_path, monkeypatch, case, message, entry):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ModelArguments, "load", no_generation)
    model = model_folder(tmp_path, case)
    facts = write_jsonl(tmp_path / "facts.jsonl", facts_rows())
    flag = {"eval": "`--model ", "probe": "`--model ", "sft": "`--model_name_or_path ",
            "SelfDistillSFTTrainer": "`model=", "load_model": "`name_or_path="}[entry]
    with pytest.raises(ValueError, match=message) as info:
        if entry in ("eval", "probe"):
            cli([entry, "--model", model, "--facts", str(facts), "--out", str(tmp_path / "out.jsonl")])
        elif entry == "sft":
            cli(["sft", *sft_argv(model, tmp_path / "out")])
        elif entry == "SelfDistillSFTTrainer":
            SelfDistillSFTTrainer(model=model, args=config(tmp_path), train_dataset=prompt_completion_dataset(4))
        else:
            load_model(model)
    assert str(info.value).startswith(flag)


def test_the_teacher_needs_no_tokenizer_files(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_model().save_pretrained(teacher)  # weights and config, no tokenizer: the student's tokenizer is used
    trainer = trainer_for(tmp_path, teacher_model_name_or_path=str(teacher))
    assert trainer.teacher is not None


# ---------------------------------------------------------------------------------------------------------------------
# 8, 10, 11. Fact sets: duplicate ids, categories on some facts only, empty sets and answer lists

def test_duplicate_fact_ids_are_refused_by_load_facts(tmp_path):
    rows = [{**row, "id": "P36-1" if i < 3 else f"P36-{i}"} for i, row in enumerate(facts_rows())]
    with pytest.raises(ValueError, match=r"1 fact ids of the facts from .*facts.jsonl are used by several facts: "
                                         r"'P36-1' \(3×\) \(id 'P36-1': 'What is the capital of France\?' / .*Give "
                                         "each fact its own id, or drop the `id` column"):
        load_facts(write_jsonl(tmp_path / "facts.jsonl", rows))


def test_duplicate_fact_ids_are_refused_by_probe_and_the_callback():
    facts = Dataset.from_list([{"id": "same", "question": q, "answers": ["x"], "relation": "capital"}
                               for q in QUESTIONS])
    with pytest.raises(ValueError, match=r"'same' \(5×\)"):
        probe(facts, generate_fn=no_generation)
    with pytest.raises(ValueError, match=r"exemplar pool are used by several facts: 'same'"):
        probe(load_facts(facts_rows()), generate_fn=no_generation, exemplars=facts)


def test_eval_on_facts_categorised_in_part_is_refused_before_loading(tmp_path, monkeypatch, model_dir):
    monkeypatch.setattr(ModelArguments, "load", no_generation)
    rows = [{**row, "category": "HighlyKnown" if i % 2 else None} for i, row in enumerate(facts_rows())]
    facts = write_jsonl(tmp_path / "facts.jsonl", rows)
    with pytest.raises(ValueError, match=r"3 of 5 facts of the fact set .* have no `category`, the first at row 0.*"
                                         r"trl-selfdistill probe.*remove_columns"):
        cli(["eval", "--model", str(model_dir), "--facts", str(facts)])


def test_the_callback_refuses_facts_categorised_in_part():
    facts = load_facts(facts_rows())
    splits = KnowledgeSplits(
        train_known=facts.select([0, 1]).add_column("category", ["HighlyKnown"] * 2),
        train_unknown=facts.select([2]).add_column("category", ["Unknown"]),
        heldout=facts.select([3, 4]).add_column("category", ["HighlyKnown", None]),
    )
    with pytest.raises(ValueError, match="1 of 2 facts of the held-out facts have no `category`, the first at row 1"):
        ForgettingCallback(splits)


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_dataset_file_is_named(tmp_path, content):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    with pytest.raises(ValueError, match=r"The dataset file .*train.jsonl is empty: it has no rows"):
        parse_and_run(sft_argv(tmp_path / "no-model", tmp_path / "out", data))


def test_a_folder_of_empty_dataset_files_is_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"The dataset .*data has no rows: its files are empty"):
        parse_and_run(sft_argv(tmp_path / "no-model", tmp_path / "out", data))


@pytest.mark.parametrize("facts, message", [
    (lambda: Dataset.from_list([]), r"The fact set to probe is empty \(0 facts\)"),
    (lambda: load_facts(facts_rows()).filter(lambda row: False), r"The fact set to probe is empty \(0 facts\)"),
    (lambda: Dataset.from_list([{"id": "1", "question": "Q?", "answers": [], "relation": "r"}]),
     r"1 facts of the fact set to probe have no answer \(an empty `answers` list\), the first at row 0"),
])
def test_probe_and_training_rows_refuse_fact_sets_they_cannot_use(facts, message):
    with pytest.raises(ValueError, match=message):
        probe(facts(), generate_fn=no_generation)
    with pytest.raises(ValueError, match=message.replace("fact set to probe", "training fact set")):
        AnswerFormat().training_dataset(facts().select_columns(["question", "answers"]) if len(facts()) else facts())


def test_probe_needs_fact_ids():
    with pytest.raises(ValueError, match=r"has no `id` column.*load_facts"):
        probe(Dataset.from_list([{"question": "Q?", "answers": ["a"]}]), generate_fn=no_generation)


# ---------------------------------------------------------------------------------------------------------------------
# 9. Prompt templates with other placeholders

TEMPLATES = [
    ("{x} {question}", r"has the placeholder\(s\) \{x\}, but only `\{question\}` is filled in"),
    ("Q: {question} {}", r"placeholder\(s\) \{\}"),
    ("{question} -> {answer}", r"placeholder\(s\) \{answer\}"),
    ("Q: {question} {0}", r"placeholder\(s\) \{0\}"),
    ("{question!x}", r"placeholder\(s\) \{question!x\}"),
    ("Q: {question", "unmatched brace"),
    ("Q: {question}}", "unmatched brace"),
    ("Q: {{question}}", r"has no `\{question\}` placeholder"),
]


@pytest.mark.parametrize("template, message", TEMPLATES)
def test_a_template_with_other_placeholders_is_refused_when_built(template, message):
    with pytest.raises(ValueError, match=message):
        AnswerFormat(prompt=template)


@pytest.mark.parametrize("entry", ["eval", "sft"])
def test_a_bad_template_is_refused_on_the_command_line(tmp_path, entry, model_dir):
    if entry == "eval":
        facts = write_jsonl(tmp_path / "facts.jsonl", facts_rows())
        with pytest.raises(ValueError, match=r"placeholder\(s\) \{answer\}"):
            cli(["eval", "--model", str(model_dir), "--facts", str(facts), "--prompt", "{question} {answer}"])
    else:
        with pytest.raises(ValueError, match=r"`--knowledge_prompt` '\{question\} \{answer\}' has the placeholder"):
            parse_and_run(sft_argv(tmp_path / "no-model", tmp_path / "out", "prompt_completion",
                                   "--knowledge_facts", "curated", "--knowledge_prompt", "{question} {answer}"))


# ---------------------------------------------------------------------------------------------------------------------
# 13. Something in the way of the save

def test_a_folder_where_the_save_writes_a_file_is_named(tmp_path):
    (tmp_path / "out" / "model.safetensors").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"out/model.safetensors is a folder, but the save writes a file of that"):
        trainer_for(tmp_path)


def test_the_save_checks_its_folder_again(tmp_path):
    trainer = trainer_for(tmp_path, distill_coef=0.0)
    (tmp_path / "later" / "tokenizer.json").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"later/tokenizer.json is a folder.*choose another `output_dir`"):
        trainer.save_model(str(tmp_path / "later"))


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ValueError, match=r"`output_dir=.*out'` is a file, not a folder"):
        parse_and_run(sft_argv(tmp_path / "no-model", tmp_path / "out"))
