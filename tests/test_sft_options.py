"""Every SFTConfig option that shapes the loss: the distillation path's CE is SFTTrainer's, or the option is refused.

With a LoRA adapter just created, the adapter-disabled teacher IS the student, so at the first step the divergence and
its gradient are 0 and `SelfDistillSFTTrainer`'s loss and gradients must equal `SFTTrainer`'s on the same batch (the
distillation path computes the CE in its own fused pass: equal up to fp32 summation order). Then two training steps
at λ=1 check the option end to end.
"""

import pytest
import torch
from conftest import (
    config,
    conversational_dataset,
    make_tokenizer,
    prompt_completion_dataset,
    text_dataset,
    tiny_model,
)
from peft import LoraConfig

from trl_selfdistill import SelfDistillSFTTrainer

# A chat template that marks the assistant's text, as `assistant_only_loss` requires
GENERATION_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<eos>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<eos>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)

OPTIONS = {
    "prompt_completion": (prompt_completion_dataset, {}),
    "completion_only_loss_off": (prompt_completion_dataset, {"completion_only_loss": False}),
    "text": (text_dataset, {}),
    "packing": (text_dataset, {"packing": True, "max_length": 64}),
    "padding_free": (prompt_completion_dataset, {"padding_free": True, "max_length": None}),
    "assistant_only_loss": (conversational_dataset, {"assistant_only_loss": True}),
    "dft": (prompt_completion_dataset, {"loss_type": "dft"}),
    "scope_all": (prompt_completion_dataset, {"distill_scope": "all"}),
    "scope_prompt": (prompt_completion_dataset, {"distill_scope": "prompt"}),
    "scope_prompt_padding_free": (prompt_completion_dataset, {"distill_scope": "prompt", "padding_free": True,
                                                              "max_length": None}),
    "chunked_rows": (prompt_completion_dataset, {"loss_chunk_rows": 3}),
}


def make_trainer(tmp_path, dataset_fn, **overrides):
    tokenizer = make_tokenizer()
    if overrides.get("assistant_only_loss"):
        tokenizer.chat_template = GENERATION_TEMPLATE
    return SelfDistillSFTTrainer(
        tiny_model(), args=config(tmp_path, max_steps=2, **overrides), train_dataset=dataset_fn(16),
        processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0),
    )


def loss_and_grads(trainer, inputs, num_items_in_batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("num_items", [None, "global"], ids=["micro_batch_mean", "num_items_in_batch"])
def test_first_step_equals_sft_trainer(tmp_path, name, num_items):
    dataset_fn, overrides = OPTIONS[name]
    trainer = make_trainer(tmp_path, dataset_fn, **overrides)
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = inputs["labels"][:, 1:] if "shift_labels" not in inputs else inputs["shift_labels"]
    # As Trainer with gradient accumulation: the label tokens of the whole (here: twice as large) global batch
    num_items_in_batch = None if num_items is None else 2 * (labels != -100).sum()
    trainer.current_gradient_accumulation_steps = 1 if num_items is None else 2  # what the training loop sets

    loss, grads = loss_and_grads(trainer, inputs, num_items_in_batch)
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(0.0, abs=1e-6)
    teacher, trainer.teacher = trainer.teacher, None  # SFTTrainer's own loss on the same model and batch
    sft_loss, sft_grads = loss_and_grads(trainer, inputs, num_items_in_batch)
    trainer.teacher = teacher

    assert loss.item() == pytest.approx(sft_loss.item(), rel=1e-6)
    assert grads.keys() == sft_grads.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads[key], sft_grads[key], rtol=1e-5, atol=1e-7, msg=key)
    metrics = trainer._metrics["train"]
    assert metrics["entropy"][0] == pytest.approx(metrics["entropy"][1], rel=1e-5)
    assert metrics["mean_token_accuracy"][0] == pytest.approx(metrics["mean_token_accuracy"][1])


@pytest.mark.parametrize("name", OPTIONS)
def test_trains_with_distillation(tmp_path, name):
    dataset_fn, overrides = OPTIONS[name]
    trainer = make_trainer(tmp_path, dataset_fn, gradient_accumulation_steps=2, **overrides)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logged) == 2 and logged[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logged[1]["kl"] > 0
    assert all(entry["num_tokens"] > 0 and 0 <= entry["mean_token_accuracy"] <= 1 for entry in logged)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"label_smoothing_factor": 0.1}, r"`label_smoothing_factor=0.1` cannot be combined with self-distillation"),
        ({"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum()},
         "a custom `compute_loss_func` cannot be combined"),
    ],
    ids=["label_smoothing", "compute_loss_func"],
)
def test_options_the_fused_loss_cannot_honour_are_refused(tmp_path, overrides, match):
    trainer_kwargs = {k: overrides.pop(k) for k in list(overrides) if k == "compute_loss_func"}
    with pytest.raises(ValueError, match=match):
        SelfDistillSFTTrainer(
            tiny_model(), args=config(tmp_path, **overrides), train_dataset=prompt_completion_dataset(8),
            processing_class=make_tokenizer(), **trainer_kwargs,
        )
    # λ=0 is SFTTrainer, which handles them
    SelfDistillSFTTrainer(
        tiny_model(), args=config(tmp_path, distill_coef=0.0, **overrides), train_dataset=prompt_completion_dataset(8),
        processing_class=make_tokenizer(), **trainer_kwargs,
    )
