"""The teacher and the student meet at the same positions, under the same mask and temperature, on every path.

For each teacher path (a frozen copy of the model, the LoRA model with its adapter disabled, the teacher cache read
back) × `distill_scope` × τ, the trainer's KL (`kl` metric: the mean over the positions it covers) equals the KL
written from the definitions: full-vocabulary fp64 softmaxes of the two models' logits at τ, position t predicting
token t+1, at exactly the positions the scope names (completion: label tokens; all: real positions; prompt: real
positions without a label). A shifted position, a wrong mask or a temperature applied to one side only fails it.
"""

import pytest
import torch
from conftest import config, make_tokenizer, prompt_completion_dataset, tiny_model
from peft import LoraConfig
from reference import divergence, topk_divergence

from trl_selfdistill import SelfDistillSFTTrainer

TOPK = 8


def build(tmp_path, path: str, scope: str, tau: float):
    """The trainer and a function giving the reference teacher's logits on a batch."""
    overrides = dict(distill_scope=scope, distill_temperature=tau)
    if path == "adapter_disabled":  # random adapter weights: the student differs from its adapter-disabled self
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
        trainer = SelfDistillSFTTrainer(model=tiny_model(), args=config(tmp_path, **overrides),
                                        train_dataset=prompt_completion_dataset(), processing_class=make_tokenizer(),
                                        peft_config=lora)

        def teacher_logits(inputs):
            with trainer.model.disable_adapter():
                return trainer.model(**inputs).logits

        return trainer, teacher_logits
    if path == "cache":
        overrides.update(teacher_cache_dir=str(tmp_path / "cache"), teacher_cache_topk=TOPK)
    trainer = SelfDistillSFTTrainer(model=tiny_model(), args=config(tmp_path, **overrides),
                                    train_dataset=prompt_completion_dataset(), processing_class=make_tokenizer())
    with torch.no_grad():  # the student moves away from the copy the trainer took as teacher
        generator = torch.Generator().manual_seed(0)
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    initial = tiny_model()
    return trainer, lambda inputs: initial(**inputs).logits


def reference_kl(trainer, teacher_logits, inputs, path, scope, tau):
    model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        student = trainer.model(**model_inputs).logits[:, :-1].double()
        teacher = teacher_logits(model_inputs)[:, :-1].double()
    labels, mask = inputs["labels"][:, 1:], inputs["attention_mask"].bool()
    real = mask[:, 1:] & mask[:, :-1]
    positions = {"completion": labels != -100, "all": real, "prompt": real & (labels == -100)}[scope]
    assert positions.sum() > 0
    s, t = student[positions], teacher[positions]
    if path != "cache":
        return divergence(s, t, beta=0.0, temperature=tau).mean().item()
    log_t = torch.log_softmax(t / tau, dim=-1)
    top = log_t.topk(TOPK, dim=-1)
    return topk_divergence(s, top.indices, top.values, beta=0.0, temperature=tau).mean().item()


@pytest.mark.parametrize("tau", [0.5, 2.0])
@pytest.mark.parametrize("scope", ["completion", "all", "prompt"])
@pytest.mark.parametrize("path", ["model_copy", "adapter_disabled", "cache"])
def test_trainer_kl_is_the_kl_from_the_definitions(tmp_path, path, scope, tau):
    trainer, teacher_logits = build(tmp_path, path, scope, tau)
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, dict(inputs))  # the cache path: fills the cache from the teacher's forward
    if path == "cache":
        trainer.state.epoch = 1.0  # entries are served from the epoch after the one that wrote them
        trainer.compute_loss(trainer.model, dict(inputs))  # ... and reads it back: no teacher forward
        assert trainer._metrics["train"]["teacher_cache_hit"][-2:] == [0.0, 1.0]
    expected = reference_kl(trainer, teacher_logits, inputs, path, scope, tau)
    assert expected > 1e-4  # the two models differ: a misalignment would show
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(expected, rel=2e-5)
