"""Mixed precision (bf16 autocast, on CPU): the teacher's forward and the loss's head run in the student's precision.

Accelerate wraps the student's forward in autocast; the teacher's forward goes to the backbone past that wrapper, and
the loss runs outside the forward, so both need the autocast explicitly (`SelfDistillSFTTrainer._teacher_hidden`,
`_head_autocast`). Without it the teacher ran in fp32 while the student ran in bf16: on a GPU several times slower,
and an unchanged student already had a non-zero divergence at step 0.
"""

import pytest
import torch
from conftest import config, make_tokenizer, prompt_completion_dataset, tiny_model
from peft import LoraConfig

import trl_selfdistill.trainer as trainer_module
from trl_selfdistill import SelfDistillSFTTrainer


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


def build(tmp_path, peft: bool, **overrides):
    kwargs = dict(bf16=True, max_steps=2, distill_coef=1.0, distill_temperature=0.5, **overrides)
    return SelfDistillSFTTrainer(
        model=tiny_model(), args=config(tmp_path, **kwargs), train_dataset=prompt_completion_dataset(),
        processing_class=make_tokenizer(), peft_config=lora() if peft else None,
    )


def output_dtypes(trainer, module_suffix="layers.0.mlp.down_proj"):
    """The output dtype of every call of one linear layer, in the teacher and in the student (one module when the
    teacher is the student's adapter-disabled base: hooked once)."""
    seen = []
    for model in (trainer.teacher.model, trainer.model):
        layer = next(m for n, m in model.named_modules() if n.endswith(module_suffix))
        if not getattr(layer, "_recorded", False):
            layer._recorded = True
            layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


@pytest.mark.parametrize("peft", [False, True], ids=["model_copy", "adapter_disabled"])
@pytest.mark.parametrize("cache", [False, True], ids=["exact", "cache_prefill"])
def test_teacher_runs_in_bf16_and_an_unchanged_student_has_zero_divergence(tmp_path, peft, cache):
    extra = dict(teacher_cache_dir=str(tmp_path / "cache"), teacher_cache_prefill=True) if cache else {}
    trainer = build(tmp_path, peft, **extra)
    assert trainer.accelerator.mixed_precision == "bf16"
    dtypes = output_dtypes(trainer)
    trainer.train()
    # every forward of the layer (teacher and student; one module in LoRA) ran in bf16
    assert dtypes and set(dtypes) == {torch.bfloat16}, dtypes
    first = next(log for log in trainer.state.log_history if "kl" in log)
    assert first["kl"] == 0.0  # step 1: the student is still the teacher, in the same precision
    later = [log["kl"] for log in trainer.state.log_history if "kl" in log][1:]
    assert later and all(kl > 0 for kl in later)  # and the term is live once the student moves


def test_loss_head_runs_under_autocast_unless_cast_to_fp32(tmp_path, monkeypatch):
    seen = []
    original = trainer_module.fused_token_losses

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "fused_token_losses", spy)
    build(tmp_path / "a", peft=True).train()
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    fp32 = build(tmp_path / "b", peft=True, cast_lm_head_to_fp32=True)
    fp32.train()
    assert seen and set(seen) == {False}
    assert next(log for log in fp32.state.log_history if "kl" in log)["kl"] == 0.0


def test_cache_fingerprint_records_the_precision(tmp_path):
    """A cache filled under one precision is not served to a run under another (its log-probs differ by rounding)."""
    cache = dict(teacher_cache_dir=str(tmp_path / "cache"))
    build(tmp_path / "a", peft=True, **cache).train()
    with pytest.raises(ValueError, match="precision"):
        SelfDistillSFTTrainer(
            model=tiny_model(), args=config(tmp_path / "b", distill_coef=1.0, distill_temperature=0.5, max_steps=2,
                                            **cache),
            train_dataset=prompt_completion_dataset(), processing_class=make_tokenizer(), peft_config=lora(),
        )
