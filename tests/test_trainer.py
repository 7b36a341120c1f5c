"""SelfDistillSFTTrainer: equivalence with SFTTrainer, loss composition, metrics, dataset types."""

import dataclasses

import pytest
import torch
from conftest import (
    assert_params_changed,
    config,
    conversational_dataset,
    make_tokenizer,
    params,
    prompt_completion_dataset,
    text_dataset,
    tiny_model,
)
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from trl_selfdistill import SelfDistillConfig, SelfDistillSFTTrainer


def lora():
    """A fresh config each time: PEFT rewrites `target_modules` of the config it is given."""
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def step_losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_lambda_zero_reproduces_sft_trainer(tmp_path):
    kwargs = dict(max_steps=5, learning_rate=1e-2)
    sft = SFTTrainer(
        model=tiny_model(),
        args=config(tmp_path / "a", cls=SFTConfig, **kwargs),
        train_dataset=prompt_completion_dataset(),
        processing_class=make_tokenizer(),
    )
    sft.train()
    ours = SelfDistillSFTTrainer(
        model=tiny_model(),
        args=config(tmp_path / "b", distill_coef=0.0, **kwargs),
        train_dataset=prompt_completion_dataset(),
        processing_class=make_tokenizer(),
    )
    ours.train()
    assert ours.teacher is None
    a, b = step_losses(sft), step_losses(ours)
    assert len(a) == 5 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6
    for (name, p), q in zip(sft.model.named_parameters(), ours.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def one_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_first_lora_step_has_zero_kl_and_sft_gradients(tmp_path):
    trainer = SelfDistillSFTTrainer(
        model=tiny_model(), args=config(tmp_path), train_dataset=prompt_completion_dataset(),
        processing_class=make_tokenizer(), peft_config=lora(),
    )
    trainer.model.train()
    inputs = one_batch(trainer)
    loss, grads = loss_and_grads(trainer, inputs)
    assert trainer._metrics["train"]["kl"] == [0.0]
    teacher, trainer.teacher = trainer.teacher, None  # plain SFT on the same batch
    sft_loss, sft_grads = loss_and_grads(trainer, inputs)
    trainer.teacher = teacher
    # The distillation path computes the CE in its own fused pass: equal up to fp32 summation order
    assert loss.item() == pytest.approx(sft_loss.item(), rel=1e-6)
    assert grads.keys() == sft_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], sft_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def full_ft_trainer(tmp_path, teacher_seed=1, **overrides):
    """Full fine-tuning against a teacher with other weights, so the distillation term is non-zero from step 1."""
    teacher_dir = tmp_path / "teacher"
    tiny_model(seed=teacher_seed).save_pretrained(teacher_dir)
    return SelfDistillSFTTrainer(
        model=tiny_model(),
        args=config(tmp_path, teacher_model_name_or_path=str(teacher_dir), **overrides),
        train_dataset=prompt_completion_dataset(),
        processing_class=make_tokenizer(),
    )


def test_loss_is_sft_plus_scaled_kl(tmp_path):
    trainer = full_ft_trainer(tmp_path, distill_coef=2.0, distill_temperature=0.7)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, one_batch(trainer))
    metrics = trainer._metrics["train"]
    assert metrics["kl"][0] > 0.01
    assert metrics["distill_loss"][0] == pytest.approx(2.0 * 0.7**2 * metrics["kl"][0])
    assert loss.item() == pytest.approx(metrics["sft_loss"][0] + metrics["distill_loss"][0], rel=1e-5)


def test_runtime_distill_coef_scales_the_term_and_is_logged(tmp_path):
    """`trainer.distill_coef` set between steps is the λ of the next loss; `args.distill_coef` is left alone."""
    trainer = full_ft_trainer(tmp_path, distill_coef=2.0, distill_temperature=0.7)
    trainer.model.train()
    inputs = one_batch(trainer)
    losses = []
    for coef in (2.0, 5.0):
        trainer.distill_coef = coef
        losses.append(trainer.compute_loss(trainer.model, dict(inputs)).item())
    metrics = trainer._metrics["train"]
    assert metrics["distill_coef"] == [2.0, 5.0] and trainer.args.distill_coef == 2.0
    assert metrics["kl"][0] > 0.01 and metrics["kl"][0] == metrics["kl"][1]  # same batch, same weights
    assert metrics["distill_loss"][1] == pytest.approx(5.0 / 2.0 * metrics["distill_loss"][0], rel=1e-6)
    # Only the distillation term changed: by (5 − 2)·τ²·KL
    assert losses[1] - losses[0] == pytest.approx(3.0 * 0.7**2 * metrics["kl"][0], rel=1e-5)


def test_distill_term_keeps_student_closer_to_teacher(tmp_path):
    """Same data and steps: a large λ ends with a smaller KL to the teacher than a negligible one."""

    def final_kl(path, coef):
        trainer = full_ft_trainer(path, distill_coef=coef, max_steps=8, learning_rate=3e-3)
        trainer.train()
        return [log["kl"] for log in trainer.state.log_history if "kl" in log][-1]

    assert final_kl(tmp_path / "strong", 5.0) < 0.7 * final_kl(tmp_path / "weak", 1e-6)


def test_gradient_accumulation_matches_large_batch(tmp_path):
    def first_update(path, **kw):
        trainer = full_ft_trainer(path, max_steps=1, learning_rate=1e-3, optim="sgd", **kw)
        before = params(trainer.model)
        trainer.train()
        return {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}

    big = first_update(tmp_path / "big", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    acc = first_update(tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    # Updates are differences of fp32 weights up to 1.0 (the norms), so they are known to a couple of ulp of 1.0
    for name in big:
        torch.testing.assert_close(big[name], acc[name], rtol=1e-4, atol=2 * torch.finfo(torch.float32).eps, msg=name)


@pytest.mark.parametrize("dataset", [prompt_completion_dataset, conversational_dataset, text_dataset])
def test_dataset_types_train_and_log_metrics(tmp_path, dataset):
    trainer = SelfDistillSFTTrainer(
        model=tiny_model(),
        args=config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2),
        train_dataset=dataset(),
        eval_dataset=dataset(8),
        processing_class=make_tokenizer(),
        peft_config=lora(),
    )
    trainer.train()
    train_log = next(log for log in trainer.state.log_history if "loss" in log)
    eval_log = next(log for log in trainer.state.log_history if "eval_loss" in log)
    for key in ("sft_loss", "distill_loss", "kl", "entropy", "mean_token_accuracy", "num_tokens"):
        assert key in train_log, key
    for key in ("eval_sft_loss", "eval_distill_loss", "eval_kl", "eval_entropy", "eval_mean_token_accuracy"):
        assert key in eval_log, key
    assert eval_log["eval_kl"] > 0  # the adapter moved after 2 steps at lr 1e-2


def test_scope_selects_completion_or_all_real_positions(tmp_path):
    ds = prompt_completion_dataset()
    completion = SelfDistillSFTTrainer(
        model=tiny_model(), args=config(tmp_path / "c", distill_scope="completion"), train_dataset=ds,
        processing_class=make_tokenizer(), peft_config=lora(),
    )
    everything = SelfDistillSFTTrainer(  # the default scope
        model=tiny_model(), args=config(tmp_path / "a"), train_dataset=ds,
        processing_class=make_tokenizer(), peft_config=lora(),
    )
    inputs = one_batch(completion)
    mask_c, shifted = completion._distill_positions(inputs)
    mask_a, _ = everything._distill_positions(inputs)
    assert shifted
    assert torch.equal(mask_c, inputs["labels"][:, 1:] != -100)
    assert torch.equal(mask_a, inputs["attention_mask"][:, 1:].bool())  # right padding: real tokens are a prefix
    assert (mask_c & ~mask_a).sum() == 0 and mask_a.sum() > mask_c.sum()
    # `prompt`: the real positions the CE does not train on, i.e. `all` without `completion`
    prompt_only = SelfDistillSFTTrainer(
        model=tiny_model(), args=config(tmp_path / "p", distill_scope="prompt"), train_dataset=ds,
        processing_class=make_tokenizer(), peft_config=lora(),
    )
    mask_p, _ = prompt_only._distill_positions(inputs)
    assert torch.equal(mask_p, mask_a & ~mask_c) and mask_p.sum() > 0


def test_args_must_be_a_selfdistill_config_and_the_named_conversion_works(tmp_path):
    sft = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1,
                    eos_token="<eos>", pad_token="<pad>", learning_rate=3e-4, max_length=64)
    with pytest.raises(TypeError, match=r"SelfDistillConfig.from_sft_config\(your_config"):
        SelfDistillSFTTrainer(model=tiny_model(), args=sft, train_dataset=prompt_completion_dataset(),
                              processing_class=make_tokenizer())
    # The conversion the error names keeps every field, the special tokens included (`to_dict()` would not)
    args = SelfDistillConfig.from_sft_config(sft, distill_coef=0.5)
    assert args.distill_coef == 0.5
    assert all(getattr(args, f.name) == getattr(sft, f.name) for f in dataclasses.fields(sft) if f.init)
    trainer = SelfDistillSFTTrainer(model=tiny_model(), args=args, train_dataset=prompt_completion_dataset(),
                                    processing_class=make_tokenizer())
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.teacher is not None


def test_freeze_config_full_fine_tuning_trains_attention_only(tmp_path):
    from trl_selfdistill import FreezeConfig

    trainer = SelfDistillSFTTrainer(
        model=tiny_model(), args=config(tmp_path, max_steps=2), train_dataset=prompt_completion_dataset(),
        processing_class=make_tokenizer(), freeze_config=FreezeConfig.attention_only(),
    )
    before = params(trainer.model)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == {n for n in before if ".self_attn." in n}
    assert trainer.freeze_report.trainable == sum(p.numel() for n, p in after.items() if ".self_attn." in n)


def test_freeze_config_with_lora_places_adapters_on_attention_only(tmp_path):
    from trl_selfdistill import FreezeConfig

    trainer = SelfDistillSFTTrainer(
        model=tiny_model(), args=config(tmp_path, max_steps=1), train_dataset=prompt_completion_dataset(),
        processing_class=make_tokenizer(), peft_config=lora(), freeze_config=FreezeConfig.attention_only(),
    )
    adapters = [n for n, _ in trainer.model.named_parameters() if "lora_" in n]
    assert adapters and all(".self_attn." in n for n in adapters)
    before = params(trainer.model)
    trainer.train()
    assert trainer.freeze_report.trainable == sum(before[n].numel() for n in adapters)
    assert_params_changed(before, trainer.model, [n for n in adapters if "lora_B" in n])


def test_a_distill_weight_column_weights_each_rows_distillation_term(tmp_path):
    data = prompt_completion_dataset(16)
    distinct = len(set(data["prompt"]))

    def loss(weights, inputs=None):
        """The first batch's loss of a perturbed student (the same perturbation each time) against the initial
        model, with `weights[i % distinct]` on row i's term (no column when None)."""
        rows = data if weights is None else data.add_column("distill_weight", [weights[i % distinct] for i in
                                                                               range(len(data))])
        trainer = SelfDistillSFTTrainer(model=tiny_model(), args=config(tmp_path, distill_coef=1.0),
                                        train_dataset=rows, processing_class=make_tokenizer())
        torch.manual_seed(0)
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        inputs = inputs or one_batch(trainer)
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, dict(inputs)).item(), inputs

    none, inputs = loss(None)
    ones, _ = loss([1.0] * distinct, inputs)
    zeros, _ = loss([0.0] * distinct, inputs)
    twos, _ = loss([2.0] * distinct, inputs)
    first = [1.0 if i < distinct // 2 else 0.0 for i in range(distinct)]
    part_a, _ = loss(first, inputs)
    part_b, _ = loss([1.0 - w for w in first], inputs)
    kl = ones - zeros
    assert none == pytest.approx(ones, rel=1e-6) and kl > 1e-4
    assert twos - zeros == pytest.approx(2 * kl, rel=1e-5)
    assert (part_a - zeros) + (part_b - zeros) == pytest.approx(kl, rel=1e-5)  # each row's term, once
    assert 0 < part_a - zeros < kl


def test_distill_weights_are_refused_where_rows_cannot_be_told_apart(tmp_path):
    data = prompt_completion_dataset(8)
    with pytest.raises(ValueError, match="packing"):
        SelfDistillSFTTrainer(model=tiny_model(), args=config(tmp_path, padding_free=True, max_length=None),
                              train_dataset=data.add_column("distill_weight", [1.0] * 8),
                              processing_class=make_tokenizer())
    with pytest.raises(ValueError, match="finite number"):
        SelfDistillSFTTrainer(model=tiny_model(), args=config(tmp_path), processing_class=make_tokenizer(),
                              train_dataset=data.add_column("distill_weight", [-1.0] * 8))


def test_end_is_safe_on_transformers_without_trainer_end(tmp_path, monkeypatch):
    """Scripts call `trainer.end()`; before transformers 5.18 `Trainer` has no `end`, and it must not fail there."""
    import transformers

    trainer = SelfDistillSFTTrainer(model=tiny_model(), args=config(tmp_path),
                                    train_dataset=prompt_completion_dataset(), processing_class=make_tokenizer())
    called = []
    monkeypatch.setattr(transformers.Trainer, "end", lambda self: called.append(self), raising=False)
    trainer.end()
    assert called == [trainer]
    monkeypatch.delattr(transformers.Trainer, "end", raising=False)
    trainer.end()  # nothing to release, no AttributeError
