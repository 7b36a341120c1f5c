"""`trl-selfdistill sft`: TRL's `sft` script with the distillation term, freezing and knowledge monitoring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import answered_facts, make_tokenizer, tiny_model, write_jsonl

from trl_selfdistill.scripts.sft import parse_and_run

DATA = Path(__file__).parent / "data"
QUESTIONS = [f"What is the capital of {country}?" for country in
             ("France", "Japan", "Peru", "Chile", "Kenya", "Cuba", "Spain", "Italy")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model with a chat template, saved as a user's model folder."""
    path = tmp_path_factory.mktemp("model")
    tiny_model().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def common(model_dir, output_dir, data="chat", *extra):
    return ["--model_name_or_path", str(model_dir), "--dataset_name", str(DATA / data), "--output_dir",
            str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none",
            "--bf16", "false", "--disable_tqdm", "true", "--save_strategy", "no", *extra]


@pytest.fixture(scope="module")
def facts_known(tmp_path_factory):
    """Facts the tiny model saved in `model_dir` "knows" (`conftest.answered_facts`)."""
    return answered_facts(tmp_path_factory.mktemp("facts") / "answered.jsonl", QUESTIONS)


@pytest.mark.parametrize("data, extra", [
    ("chat", ["--freeze", "attention_only"]),
    ("prompt_completion", ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]),
])
def test_sft_trains_on_local_jsonl(tmp_path, model_dir, data, extra):
    trainer = parse_and_run(common(model_dir, tmp_path / "out", data, *extra))
    assert trainer.state.global_step == 2
    assert trainer.teacher is not None and "sft_loss" in trainer.state.log_history[-1]
    assert (tmp_path / "out" / "README.md").is_file()
    if data == "chat":  # attention only trains; the chat data has a test split, which becomes the eval set
        assert trainer.freeze_report is not None and "attention" in trainer.freeze_report.summary()
        assert trainer.eval_dataset is not None
    else:
        assert trainer.teacher.kind == "adapter_disabled" and trainer.eval_dataset is None


def test_yaml_recipe_with_command_line_override(tmp_path, model_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {model_dir}\ndataset_name: {DATA / 'chat'}\ndistill_coef: 0.5\n"
                      "max_steps: 5\nlearning_rate: 1.0e-3\ndtype: bfloat16\n")
    argv = ["--config", str(recipe), "--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--report_to",
            "none", "--bf16", "false", "--disable_tqdm", "true", "--save_strategy", "no"]
    trainer = parse_and_run(argv)
    assert trainer.args.distill_coef == 0.5 and trainer.args.learning_rate == 1e-3
    assert trainer.state.global_step == 1  # the command line wins over the YAML
    assert trainer.model.dtype == torch.bfloat16  # ModelConfig's dtype reached the model


def test_knowledge_monitor_and_early_stopping_on_eval_knowledge_metrics(tmp_path, model_dir, facts_known):
    argv = common(model_dir, tmp_path / "out", "chat", "--knowledge_facts", str(facts_known),
                  "--knowledge_drift_size", "4", "--learning_rate", "0.05",
                  "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                  "--max_steps", "6", "--metric_for_best_model", "knowledge/answered_known_accuracy",
                  "--greater_is_better", "true", "--load_best_model_at_end", "true", "--early_stopping_patience", "1")
    trainer = parse_and_run(argv)
    results = json.loads((tmp_path / "out" / "forgetting_results.json").read_text())
    assert results["sizes"]["heldout_known"] == results["answered_known"] > 0
    assert results["facts"] == str(facts_known)
    # Chat data: the facts are asked through the chat template, after 4 exemplars (the default)
    assert results["format"]["chat"] is True and results["format"]["num_shots"] == 4
    evaluations = [log for log in trainer.state.log_history if "eval_loss" in log]
    # Every evaluation returned the knowledge metrics, and the best-model tracking and early stopping read them:
    # answered accuracy starts at 1 (by construction) and falls at this learning rate, so the run stops when it
    # has not improved for `patience` evaluations
    assert results["history"][0]["answered_known_accuracy"] == 1.0
    steps = {entry["step"]: entry["answered_known_accuracy"] for entry in results["history"]}
    assert len(evaluations) == trainer.state.global_step < 6
    assert trainer.state.best_metric == max(steps[step] for step in range(1, trainer.state.global_step + 1))
    metrics = trainer.evaluate()
    assert {"eval_knowledge/heldout_known_accuracy", "eval_knowledge/answered_known_accuracy",
            "eval_knowledge/drift_kl"} <= set(metrics)
    assert results["run"] == trainer.callback_handler.callbacks[0].run_id


def test_knowledge_set_the_model_does_not_know(tmp_path, model_dir):
    facts = write_jsonl(tmp_path / "facts.jsonl",
                        [{"question": q, "answers": ["Zzyzx"], "relation": "capital"} for q in QUESTIONS])
    with pytest.raises(ValueError, match="knows none of the 8 facts .*larger or easier fact set"):
        parse_and_run(common(model_dir, tmp_path / "out", "chat", "--knowledge_facts", str(facts)))
    assert not (tmp_path / "out" / "forgetting_results.json").exists()


BAD_INPUTS = [
    # (what, argv additions or a dataset to write, expected message)
    ("no TRL column", {"question": "Q?", "reply": "A"}, "none of the columns SFT reads"),
    ("prompt without completion", {"prompt": "Q?"}, "no `completion` column"),
    ("malformed knowledge row", ["--knowledge_facts", "{tmp}/bad_facts.jsonl"], "answer"),
    ("unknown YAML key", ["--config", "{tmp}/typo.yaml"], "distil_coef"),
    ("unknown flag", ["--distil_coef", "1"], "distil_coef"),
    ("unknown freeze preset", ["--freeze", "attention"], "attention_only"),
    ("eval without an eval split", ["--eval_strategy", "steps"], "no 'test' split"),
    ("early stopping without a metric", ["--early_stopping_patience", "2"], "metric_for_best_model"),
    ("knowledge metric without knowledge", ["--metric_for_best_model", "knowledge/heldout_known_accuracy"],
     "no knowledge is monitored"),
]


@pytest.mark.parametrize("what, bad, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_refused_before_training(tmp_path, what, bad, message):
    write_jsonl(tmp_path / "bad_facts.jsonl", [{"question": "What is the capital of France?", "answers": 3}])
    (tmp_path / "typo.yaml").write_text("distil_coef: 1.0\n")
    data = "prompt_completion"
    if isinstance(bad, dict):
        data = tmp_path / "data"
        data.mkdir()
        write_jsonl(data / "train.jsonl", [bad, bad])
        bad = []
    # The model folder does not exist: every error must come before the model is needed
    argv = common(tmp_path / "no-model", tmp_path / "out", str(data), *[a.format(tmp=tmp_path) for a in bad])
    with pytest.raises(ValueError, match=message):
        parse_and_run(argv)


def test_chat_data_with_a_tokenizer_without_chat_template(tmp_path):
    path = tmp_path / "model"
    tiny_model().save_pretrained(path)
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template.*--chat_template_path"):
        parse_and_run(common(path, tmp_path / "out", "chat"))


def test_sft_command_passes_launcher_options_to_accelerate(tmp_path, model_dir, monkeypatch):
    """`--accelerate_config NAME` resolves to the config TRL ships; launcher flags go to accelerate, not the script."""
    import accelerate.commands.launch

    from trl_selfdistill.cli import SCRIPT_MODULE, main

    launched = []
    monkeypatch.setattr(accelerate.commands.launch, "launch_command", launched.append)
    argv = common(model_dir, tmp_path / "out")
    main(["sft", *argv, "--accelerate_config", "multi_gpu", "--num_processes", "2"])
    (args,) = launched
    assert Path(args.config_file).name == "multi_gpu.yaml" and args.num_processes == 2
    assert args.module and args.training_script == SCRIPT_MODULE and args.training_script_args == argv


def test_console_script_launches_through_accelerate(tmp_path, model_dir):
    """`trl-selfdistill sft` parses, then runs the script under `accelerate launch` (one CPU process here)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    argv = common(model_dir, tmp_path / "out", "prompt_completion", "--max_steps", "1")
    command = [sys.executable, "-m", "trl_selfdistill.cli", "sft", *argv, "--num_processes", "1", "--cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Training completed" in done.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_parse(recipe):
    """Every shipped recipe names only fields the script has (no typo goes unnoticed), with the flags it documents."""
    from trl_selfdistill.scripts.sft import parse_args

    (script_args, training_args, model_args, _, freeze_args, knowledge_args), config_rest, _ = parse_args(
        ["--config", str(recipe), "--bf16", "false"]  # bf16 needs a GPU; this machine may have none
    )
    assert config_rest == []
    assert model_args.model_name_or_path and script_args.dataset_name and knowledge_args.knowledge_facts == "curated"
    assert training_args.distill_coef == 1.0
    assert (freeze_args.freeze_config() is not None) == (recipe.stem == "attention_only")
    assert model_args.use_peft == (recipe.stem in ("lora", "qlora"))
