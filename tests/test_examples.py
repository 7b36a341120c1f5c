"""Every example's `--smoke` mode runs offline on CPU and does what it says (tiny random model, a few steps)."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_selfdistill.scripts.utils import tiny_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["sft_selfdistill", "qlora_selfdistill", "full_ft_selfdistill", "freeze_attention_only", "reproduce_paper"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def temp_in_tmp_path(tmp_path, monkeypatch):
    """The smoke checkpoints go to `tempfile`'s folder: keep them inside the test's own folder."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))


def smoke(name: str, out: Path, *argv: str):
    module = load(name)
    return module.main(*module.parse_args(["--smoke", "--output_dir", str(out), *argv]))


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def assert_forgetting_results(out: Path, steps: int = 2) -> dict:
    results = json.loads((out / "forgetting_results.json").read_text())
    history = results["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == steps
    assert results["final"]["step"] == steps and results["final"]["heldout_known_accuracy"] is not None
    assert results["sizes"]["heldout_known"] > 0
    return results


def assert_card(out: Path) -> str:
    card = (out / "README.md").read_text()
    assert "Held-out Known accuracy" in card  # the forgetting results made it into the card
    return card


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_layout(name):
    """PEP 723 header, launch commands in the docstring, one parser for the CLI and YAML, `--smoke`."""
    text = (EXAMPLES / f"{name}.py").read_text()
    assert text.startswith("# /// script\n") and '"trl-selfdistill"' in text.split("# ///\n")[0]
    doc = load(name).__doc__
    assert f"accelerate launch examples/{name}.py" in doc
    assert f"accelerate launch --num_processes 8 examples/{name}.py" in doc
    assert f"python examples/{name}.py --smoke" in doc
    assert "push_to_hub" in doc
    help_text = load(name).make_parser().format_help()
    for flag in ("--distill_coef", "--distill_temperature", "--teacher_model_name_or_path", "--dataset_name",
                 "--model_name_or_path", "--smoke"):
        assert flag in help_text
    assert f"examples/{name}.py" in (EXAMPLES / "README.md").read_text()


def test_yaml_config_and_flags_override_smoke_defaults(tmp_path):
    module = load("sft_selfdistill")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("distill_temperature: 2.0\ntrain_size: 6\nlora_r: 2\n")
    script_args, training_args, model_args = module.parse_args(
        ["--smoke", "--config", str(recipe), "--train_size", "10", "--output_dir", str(tmp_path / "out")])
    assert script_args.smoke and script_args.train_size == 10  # flag > YAML > smoke default
    assert training_args.distill_temperature == 2.0 and model_args.lora_r == 2
    assert training_args.use_cpu and training_args.max_steps == 2  # smoke defaults
    assert model_args.use_peft and model_args.lora_target_modules == "all-linear"


def test_sft_selfdistill_lora(tmp_path):
    out = tmp_path / "out"
    trainer = smoke("sft_selfdistill", out)
    assert trainer.teacher.kind == "adapter_disabled"
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    kl = logged(trainer, "kl")
    assert len(kl) == 2 and kl[0] == 0.0 and kl[1] > 0  # the teacher is the initial model: KL 0 before any update
    assert logged(trainer, "distill_loss") and logged(trainer, "knowledge/heldout_known_accuracy")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert_forgetting_results(out)
    assert "self-distillation" in assert_card(out)


def test_qlora_selfdistill_four_bit(tmp_path):
    out = tmp_path / "out"
    trainer = smoke("qlora_selfdistill", out)
    base = trainer.model.get_base_model()
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert trainer.teacher.kind == "adapter_disabled"
    assert len(logged(trainer, "kl")) == 2 and all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert_forgetting_results(out)
    assert_card(out)


def test_full_ft_copies_the_initial_model(tmp_path):
    out = tmp_path / "out"
    trainer = smoke("full_ft_selfdistill", out)
    assert trainer.teacher.kind == "model_copy" and "copy" in trainer.teacher.source
    kl = logged(trainer, "kl")
    assert kl[0] == 0.0 and kl[-1] > 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert_forgetting_results(out)
    assert_card(out)


def test_full_ft_loads_a_snapshot_teacher(tmp_path):
    module = load("full_ft_selfdistill")
    snapshot = tiny_checkpoint(seed=1)  # other weights than the student's (seed 0), same vocabulary
    out = tmp_path / "out"
    trainer = module.main(*module.parse_args(["--smoke", "--output_dir", str(out),
                                              "--teacher_model_name_or_path", snapshot]))
    assert trainer.teacher.kind == "model_copy" and Path(snapshot).name in trainer.teacher.source
    assert logged(trainer, "kl")[0] > 1e-3  # a different teacher from the first step (a copy gives exactly 0)
    assert_forgetting_results(out)


def test_freeze_attention_only_trains_attention_only(tmp_path):
    out = tmp_path / "out"
    trainer = smoke("freeze_attention_only", out)
    assert trainer.teacher is None and not logged(trainer, "kl")  # plain SFT by default
    initial = AutoModelForCausalLM.from_pretrained(trainer.model.config._name_or_path, dtype=torch.float32)
    before = dict(initial.named_parameters())
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}
    attention = {n for n in before if ".self_attn." in n}
    assert changed == attention  # every attention weight moved, nothing else did (MLP, embeddings, norms)
    assert set(trainer.freeze_report.trainable_names) == attention
    assert (out / "model.safetensors").is_file()
    assert_forgetting_results(out)
    assert "attention" in assert_card(out)


def test_reproduce_paper_protocol(tmp_path):
    out = tmp_path / "out"
    summary = smoke("reproduce_paper", out)
    assert summary["methods"] == ["known_only", "sft", "selfdistill", "freeze"] and len(summary["seeds"]) == 1
    runs = summary["per_seed"][0]["runs"]
    for result in runs.values():
        assert result["history"][0]["step"] == 0 and result["history"][-1]["step"] == 2
    assert runs["known_only"]["sizes"]["train_unknown"] == 0 and runs["sft"]["sizes"]["train_unknown"] == 4
    assert runs["freeze"]["trainable_parameters"] < runs["sft"]["trainable_parameters"]
    assert runs["selfdistill"]["baseline"]["name"].startswith("plain SFT")
    # The relation filter dropped the relations the (fake) categories made all Unknown
    facts = [json.loads(line) for line in (out / "facts_categorised.jsonl").read_text().splitlines()]
    assert len(facts) == 72 and "p_greedy" in facts[0]
    assert len({f["relation"] for f in facts}) == 12 and len(summary["settings"]["relations_kept"]) == 8
    table = (out / "table.md").read_text()
    assert "| self-distillation | 1 |" in table and "| attention only | 0.000 |" in table  # study table and seed 0
    assert "per relation" in table
    assert json.loads((out / "results.json").read_text())["summary"].keys() == runs.keys()
    assert (out / "plot.png").is_file() and (out / "frontier.png").is_file()
    assert (out / "snapshot" / "model.safetensors").is_file()
    assert (out / "selfdistill" / "model.safetensors").is_file()
    assert_forgetting_results(out / "selfdistill")
    assert "plain SFT" in assert_card(out / "selfdistill")  # the baseline run is on the card


def test_script_runs_from_the_command_line(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(EXAMPLES / "sft_selfdistill.py"), "--smoke", "--output_dir", str(out),
                           "--max_steps", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("effective batch: 4 per device × 1 accumulation × 1 processes = 4", "trainable parameters:",
                 "teacher: adapter_disabled"):
        assert line in done.stdout
    assert_forgetting_results(out, steps=1)
    assert (out / "adapter_model.safetensors").is_file()
