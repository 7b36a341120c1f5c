"""NaN/inf never trains silently and is never saved: config refusal, teacher checks, per-term errors, save guard."""

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import config, make_tokenizer, prompt_completion_dataset, tiny_model
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from trl_selfdistill import SelfDistillConfig, SelfDistillSFTTrainer
from trl_selfdistill import trainer as trainer_module
from trl_selfdistill.trainer import NonFiniteError

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("distill_coef", NAN, ValueError, "`distill_coef` must be finite, got nan"),
        ("distill_coef", INF, ValueError, "`distill_coef` must be finite, got inf"),
        ("distill_coef", -1.0, ValueError, "must be ≥ 0"),
        ("distill_coef", "1.0", TypeError, "`distill_coef` must be a number, got the str '1.0'"),
        ("distill_coef", True, TypeError, "`distill_coef` must be a number"),
        ("distill_temperature", NAN, ValueError, "`distill_temperature` must be finite, got nan"),
        ("distill_temperature", INF, ValueError, "`distill_temperature` must be finite, got inf"),
        ("distill_temperature", 0.0, ValueError, "must be > 0"),
        ("jsd_beta", NAN, ValueError, "`jsd_beta` must be finite"),
        ("teacher_cache_topk", 2.5, TypeError, "`teacher_cache_topk` must be an integer, got the float 2.5"),
        ("loss_chunk_rows", 0, ValueError, "`loss_chunk_rows` must be an integer ≥ 1 or None, got 0"),
    ],
    ids=lambda v: repr(v) if isinstance(v, (float, str, bool)) else None,
)
def test_non_finite_or_mistyped_config_values_are_refused(tmp_path, field, value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        config(tmp_path, **{field: value})


def poison(model: torch.nn.Module, name_part: str = "layers.0.mlp.up_proj.weight") -> None:
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if name_part in n)[0, 0] = math.nan


@pytest.mark.parametrize("mode", ["model_copy_from_path", "adapter_disabled"])
def test_teacher_with_a_nan_weight_is_refused_at_construction(tmp_path, mode):
    model = tiny_model()
    kwargs = {}
    if mode == "model_copy_from_path":
        teacher = tiny_model()
        poison(teacher)
        teacher.save_pretrained(tmp_path / "teacher")
        args = config(tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher"))
    else:
        poison(model)
        args = config(tmp_path)
        kwargs["peft_config"] = LoraConfig(r=4, target_modules="all-linear")
    with pytest.raises(NonFiniteError, match=r"teacher .* non-finite weights in 1 tensors \(.*up_proj"):
        SelfDistillSFTTrainer(
            model, args=args, train_dataset=prompt_completion_dataset(8), processing_class=make_tokenizer(), **kwargs
        )


def checkpoint_weights_are_finite(output_dir: Path) -> list[str]:
    names = []
    for checkpoint in sorted(output_dir.glob("checkpoint-*")):
        tensors = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values()), checkpoint.name
        names.append(checkpoint.name)
    return names


def test_nan_teacher_output_stops_training_at_that_step_and_keeps_checkpoints(tmp_path):
    args = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=1)
    trainer = SelfDistillSFTTrainer(
        tiny_model(), args=args, train_dataset=prompt_completion_dataset(16), processing_class=make_tokenizer()
    )
    teacher_forward, calls = trainer.teacher.last_hidden_state, []

    def nan_from_third_call(inputs):
        calls.append(1)
        hidden = teacher_forward(inputs)
        return hidden * math.nan if len(calls) >= 3 else hidden

    trainer.teacher.last_hidden_state = nan_from_third_call
    with pytest.raises(NonFiniteError, match=r"Non-finite teacher output .* at optimizer step 3 \(epoch"):
        trainer.train()
    assert checkpoint_weights_are_finite(Path(args.output_dir)) == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the update of step 3 never ran


def test_nan_distill_term_names_the_term_and_step(tmp_path, monkeypatch):
    args = config(tmp_path, max_steps=2)
    trainer = SelfDistillSFTTrainer(
        tiny_model(), args=args, train_dataset=prompt_completion_dataset(8), processing_class=make_tokenizer()
    )
    fused = trainer_module.fused_token_losses

    def infinite_divergence(*args, **kwargs):
        result = fused(*args, **kwargs)
        result.divergence = result.divergence * INF
        return result

    monkeypatch.setattr(trainer_module, "fused_token_losses", infinite_divergence)
    with pytest.raises(
        NonFiniteError, match=r"Non-finite distillation term \(KL to the teacher\) at optimizer step 1"
    ):
        trainer.train()


class PoisonAfterStep(TrainerCallback):
    """Puts a NaN into a trainable weight at the end of optimizer step `step` (what a diverging update does)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            poison(model)


@pytest.mark.parametrize("distill_coef", [0.0, 1.0])
def test_nan_weights_are_never_saved_and_the_next_ce_stops_training(tmp_path, distill_coef):
    # Step 1 saves a good checkpoint; its end poisons the weights; the step-2 save is refused before writing
    args = config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, distill_coef=distill_coef)
    trainer = SelfDistillSFTTrainer(
        tiny_model(),
        args=args,
        train_dataset=prompt_completion_dataset(16),
        processing_class=make_tokenizer(),
        callbacks=[PoisonAfterStep(2)],
    )
    with pytest.raises(NonFiniteError, match=r"Refusing to save: 1 trainable tensors hold NaN/inf .* at step 2"):
        trainer.train()
    assert checkpoint_weights_are_finite(Path(args.output_dir)) == ["checkpoint-1"]

    # Without a save in between, the next step's CE is non-finite and stops the run
    args = config(tmp_path / "b", max_steps=3, distill_coef=distill_coef)
    trainer = SelfDistillSFTTrainer(
        tiny_model(),
        args=args,
        train_dataset=prompt_completion_dataset(16),
        processing_class=make_tokenizer(),
        callbacks=[PoisonAfterStep(1)],
    )
    with pytest.raises(NonFiniteError, match=r"Non-finite (SFT loss \(CE\)|teacher output).* at optimizer step 2"):
        trainer.train()
    with pytest.raises(NonFiniteError, match="Refusing to save"):
        trainer.save_model()
    assert not (Path(args.output_dir) / "model.safetensors").exists()


def test_a_finite_run_trains_and_saves_through_the_checks(tmp_path):
    """A finite λ=1 run is not stopped by the checks and its save is not refused (that they change no value is
    `tests/test_trainer.py::test_lambda_zero_reproduces_sft_trainer` and `tests/test_sft_options.py`)."""
    args = config(tmp_path, max_steps=2)
    trainer = SelfDistillSFTTrainer(
        tiny_model(), args=args, train_dataset=prompt_completion_dataset(8), processing_class=make_tokenizer()
    )
    trainer.train()
    trainer.save_model()
    assert (Path(args.output_dir) / "model.safetensors").is_file()
    assert isinstance(trainer.args, SelfDistillConfig)
