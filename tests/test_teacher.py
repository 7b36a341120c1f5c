"""Teacher strategies (adapter disabled, adapter copy, model copy/path) and the start-up guards."""


import pytest
import torch
from conftest import (
    assert_params_changed,
    assert_params_unchanged,
    config,
    make_tokenizer,
    params,
    prompt_completion_dataset,
    tiny_model,
)
from peft import LoraConfig, PromptTuningConfig, get_peft_model

from trl_selfdistill import SelfDistillSFTTrainer
from trl_selfdistill.teacher import AdapterCopyTeacher, AdapterDisabledTeacher, ModelTeacher, causal_lm


def lora():
    """A fresh config each time: PEFT rewrites `target_modules` of the config it is given."""
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
PROBE = torch.tensor([[5, 40, 77, 120, 9, 200, 33]])


def make(tmp_path, model=None, peft_config=None, **overrides):
    return SelfDistillSFTTrainer(
        model=tiny_model() if model is None else model,
        args=config(tmp_path, **overrides),
        train_dataset=prompt_completion_dataset(),
        processing_class=make_tokenizer(),
        peft_config=peft_config,
    )


def logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def test_adapter_disabled_teacher_is_the_initial_model_bit_for_bit(tmp_path):
    initial = logits(tiny_model())
    trainer = make(tmp_path, peft_config=lora(), max_steps=4, learning_rate=5e-2)
    assert isinstance(trainer.teacher, AdapterDisabledTeacher)
    trainer.train()
    model = trainer.model.eval()
    trained = logits(model)
    with model.disable_adapter():
        disabled = logits(model)
        teacher_hidden = trainer.teacher.last_hidden_state({"input_ids": PROBE})
    assert not torch.allclose(trained, initial, atol=1e-3)
    assert torch.equal(disabled, initial)
    assert torch.equal(logits(model), trained)
    base_hidden = tiny_model().model(input_ids=PROBE).last_hidden_state
    assert torch.equal(teacher_hidden, base_hidden.detach())


def live_parameters() -> dict[int, torch.nn.Parameter]:
    import gc

    gc.collect()
    return {p.data_ptr(): p for p in gc.get_objects() if isinstance(p, torch.nn.Parameter) and p.numel()}


def test_adapter_disabled_teacher_keeps_no_second_copy(tmp_path):
    model = tiny_model()
    before = live_parameters()
    trainer = make(tmp_path, model=model, peft_config=lora())
    new = {ptr: p for ptr, p in live_parameters().items() if ptr not in before}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert new and all("lora_" in names.get(id(p), "?") for p in new.values())
    assert trainer.teacher.model is trainer.model
    assert trainer.teacher.head.weight is causal_lm(trainer.model).lm_head.weight


def test_full_fine_tuning_copies_the_model_once(tmp_path):
    model = tiny_model()
    before = live_parameters()
    trainer = make(tmp_path, model=model, max_steps=3)
    new = live_parameters().keys() - before.keys()
    assert isinstance(trainer.teacher, ModelTeacher)
    assert sum(p.numel() for p in trainer.teacher.model.parameters()) == sum(p.numel() for p in model.parameters())
    assert {p.data_ptr() for p in trainer.teacher.model.parameters()} <= new
    teacher_before, student_before = params(trainer.teacher.model), params(trainer.model)
    trainer.train()
    assert_params_unchanged(teacher_before, trainer.teacher.model)
    assert_params_changed(student_before, trainer.model, list(student_before))
    assert not any(p.requires_grad for p in trainer.teacher.model.parameters())


def test_adapter_copy_teacher_freezes_the_snapshot_adapter(tmp_path):
    stage1 = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    snapshot = {n: p.detach().clone() for n, p in stage1.named_parameters() if "lora_" in n}
    trainer = make(tmp_path, model=stage1, max_steps=3, learning_rate=5e-2)
    assert isinstance(trainer.teacher, AdapterCopyTeacher)
    teacher_params = {n: p for n, p in trainer.model.named_parameters() if ".teacher." in n}
    assert teacher_params and not any(p.requires_grad for p in teacher_params.values())
    for name, p in teacher_params.items():
        assert torch.equal(p, snapshot[name.replace(".teacher.", ".default.")])
    trainer.train()
    logged_kl = [log["kl"] for log in trainer.state.log_history if "kl" in log]
    assert logged_kl[0] == 0.0 and logged_kl[-1] > 0  # student == snapshot at step 1, then it moves
    for name, p in trainer.model.named_parameters():
        if ".teacher." in name:
            assert torch.equal(p, snapshot[name.replace(".teacher.", ".default.")]), name
        elif ".default." in name and "lora_" in name:
            assert not torch.equal(p, snapshot[name]), name
    assert trainer.model.active_adapter == "default"


def test_teacher_loaded_from_a_path(tmp_path):
    tiny_model(seed=3).save_pretrained(tmp_path / "snap")
    trainer = make(tmp_path, peft_config=lora(), teacher_model_name_or_path=str(tmp_path / "snap"))
    assert isinstance(trainer.teacher, ModelTeacher)
    torch.testing.assert_close(trainer.teacher.model.lm_head.weight, tiny_model(seed=3).lm_head.weight)


@pytest.mark.parametrize(
    "peft_config,match",
    [
        (LoraConfig(r=4, target_modules="all-linear", bias="all"), "bias"),
        (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]), "modules_to_save"),
        (LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), "lm_head"),
        (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prompt-learning"),
    ],
)
def test_adapter_guards(tmp_path, peft_config, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path, peft_config=peft_config)


def test_trainable_base_weights_are_refused(tmp_path):
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="teacher would drift"):
        make(tmp_path, model=model)


def test_vocabulary_mismatch_is_refused(tmp_path):
    tiny_model(vocab_size=400).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="vocabulary"):
        make(tmp_path, teacher_model_name_or_path=str(tmp_path / "other"))


@pytest.mark.parametrize(
    "peft,mode,match",
    [
        (False, "adapter_disabled", "needs a PEFT model"),
        (False, "adapter_copy", "needs a PEFT model"),
        (True, "adapter_copy", "adapter_disabled"),
        (True, "model_copy", "no second copy"),
    ],
)
def test_teacher_mode_must_fit_the_model(tmp_path, peft, mode, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path, peft_config=lora() if peft else None, teacher_mode=mode)


def test_qlora_four_bit_steps_on_cpu(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model().save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    initial = logits(model)
    trainer = make(tmp_path, model=model, peft_config=lora(), max_steps=3, learning_rate=5e-2)
    assert isinstance(trainer.teacher, AdapterDisabledTeacher)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kl" in log]
    assert logs[0]["kl"] == 0.0 and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    assert_params_changed(lora_before, trainer.model, [n for n in lora_before if "lora_B" in n])
    with trainer.model.disable_adapter():
        assert torch.equal(logits(trainer.model.eval()), initial)


def test_a_teacher_with_another_vocabulary_is_refused_at_construction(tmp_path):
    """`make_teacher`'s one vocabulary check (also the kernels'), before any step runs."""
    student = tiny_model()
    other = tiny_model(vocab_size=student.config.vocab_size + 64)
    other.save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match=rf"teacher's vocabulary \({student.config.vocab_size + 64}\) differs from "
                                         rf"the student's \({student.config.vocab_size}\)"):
        SelfDistillSFTTrainer(model=student, args=config(tmp_path, teacher_model_name_or_path=str(tmp_path / "t")),
                              train_dataset=prompt_completion_dataset(), processing_class=make_tokenizer())
