"""FreezeConfig / apply_freeze / PEFT targeting: exact trainable sets per architecture, frozen weights untouched."""

import json
import re

import pytest
import torch
from conftest import assert_params_changed, assert_params_unchanged, make_tokenizer, params, prompt_completion_dataset
from conftest import tiny_model as tiny_llama
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from trl_selfdistill.freezing import (
    FreezeConfig,
    apply_freeze,
    check_freeze_with_adapter_teacher,
    freeze_for_peft,
    peft_target_modules,
    restrict_peft_config,
)
from trl_selfdistill.teacher import check_adapter_teacher

DECODER = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, max_position_embeddings=64
)
LLAMA_LIKE = dict(DECODER, num_key_value_heads=2)
PROJ_ATTN = [f"self_attn.{m}_proj.weight" for m in "qkvo"]
PROJ_MLP = [f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]

# model type: (config kwargs, layer prefix, attention parameters of a layer, MLP parameters of a layer)
ARCHS = {
    "llama": (LLAMA_LIKE, "model.layers", PROJ_ATTN, PROJ_MLP),
    "qwen2": (
        LLAMA_LIKE,
        "model.layers",
        PROJ_ATTN + ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
        PROJ_MLP,
    ),
    "mistral": (LLAMA_LIKE, "model.layers", PROJ_ATTN, PROJ_MLP),
    "gemma": (dict(LLAMA_LIKE, head_dim=16), "model.layers", PROJ_ATTN, PROJ_MLP),
    "phi3": (
        dict(LLAMA_LIKE, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        "model.layers",
        ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight"],
        ["mlp.gate_up_proj.weight", "mlp.down_proj.weight"],
    ),
    "gpt_neox": (
        dict(DECODER, eos_token_id=1, bos_token_id=2),
        "gpt_neox.layers",
        [f"attention.{m}.{p}" for m in ("query_key_value", "dense") for p in ("weight", "bias")],
        [f"mlp.{m}.{p}" for m in ("dense_h_to_4h", "dense_4h_to_h") for p in ("weight", "bias")],
    ),
    "gpt2": (
        dict(vocab_size=128, n_embd=64, n_head=4, n_positions=64, eos_token_id=1, bos_token_id=2),
        "transformer.h",
        [f"attn.{m}.{p}" for m in ("c_attn", "c_proj") for p in ("weight", "bias")],
        [f"mlp.{m}.{p}" for m in ("c_fc", "c_proj") for p in ("weight", "bias")],
    ),
}


def arch_model(model_type: str, num_layers: int = 2, seed: int = 0):
    kwargs = dict(ARCHS[model_type][0])
    kwargs["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = num_layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs), dtype=torch.float32)
    # Biases start at 0 and some (the key bias) get no gradient; random values make "changed" a fair test
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model


def expected(model_type: str, group: str, layers=(0, 1)) -> set[str]:
    _, prefix, attention, mlp = ARCHS[model_type]
    return {f"{prefix}.{i}.{p}" for i in layers for p in {"attention": attention, "mlp": mlp}[group]}


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def train_steps(model, steps: int = 2, vocab: int = 128):
    """A plain torch loop: AdamW on the trainable parameters, random tokens."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(3, vocab, (2, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def check_counts(report, model):
    total = sum(p.numel() for p in model.parameters())  # tied tensors once
    assert report.total == total
    assert sum(c["trainable"] + c["frozen"] for c in report.by_group.values()) == total
    assert sum(c["trainable"] + c["frozen"] for c in report.by_layer.values()) == total
    assert sum(c["trainable"] for c in report.by_group.values()) == report.trainable
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert set(report.trainable_names) == trainable(model)


@pytest.mark.parametrize("model_type", list(ARCHS))
@pytest.mark.parametrize("preset", ["attention", "mlp"])
def test_preset_trains_exactly_its_group(model_type, preset):
    model = arch_model(model_type)
    cfg = FreezeConfig.attention_only() if preset == "attention" else FreezeConfig.mlp_only()
    report = apply_freeze(model, cfg)
    want = expected(model_type, preset)
    assert trainable(model) == want
    check_counts(report, model)
    assert report.summary().endswith(f"— {preset} in layers 0-1 (of 2)")

    before = params(model)
    train_steps(model)
    assert_params_changed(before, model, sorted(want))
    assert_params_unchanged(before, model, [n for n in before if n not in want])


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_default_trains_everything_and_report_serialises(model_type):
    model = arch_model(model_type)
    for param in model.parameters():
        param.requires_grad_(False)
    report = apply_freeze(model, FreezeConfig())
    assert all(p.requires_grad for p in model.parameters())
    check_counts(report, model)
    assert report.description == "all parameters"
    assert json.loads(json.dumps(report.to_dict()))["total"] == report.total
    table = report.to_markdown()
    assert "| group | trainable | frozen |" in table and f"| **total** | {report.total:,} | 0 |" in table
    tied = model_type in ("gemma", "gpt2")
    assert (report.tied_embeddings is not None) == tied
    assert ("lm_head" in report.by_group) != tied  # a tied head is counted under `embeddings`


def layer_indices(names) -> set[int]:
    return {int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)\.", n))}


@pytest.mark.parametrize(
    ("layers", "want"),
    [
        ([0], {0}),
        ([-1], {3}),
        ("2", {2}),
        ("1-2", {1, 2}),
        ("0, 3", {0, 3}),
        ("0-1,3", {0, 1, 3}),
        ("first_half", {0, 1}),
        ("last_half", {2, 3}),
        ("last:0.25", {3}),
        ("first:0.1", {0}),  # at least one layer
        ("first:1", {0, 1, 2, 3}),
    ],
)
def test_layer_selection(layers, want):
    model = tiny_llama(num_hidden_layers=4)
    report = apply_freeze(model, FreezeConfig.attention_only(layers=layers))
    assert trainable(model) == {f"model.layers.{i}.{p}" for i in want for p in PROJ_ATTN}
    assert {int(k) for k, c in report.by_layer.items() if k != "outside" and c["trainable"]} == want
    check_counts(report, model)


def test_layers_leave_outside_parameters_to_groups():
    model = tiny_llama(num_hidden_layers=4)
    report = apply_freeze(model, FreezeConfig(layers="last_half"))
    names = trainable(model)
    assert layer_indices(names) == {2, 3}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert report.description == (
        "attention, mlp, norms in layers 2-3 (of 4); embeddings, lm_head, norms outside the layers"
    )


def in_layers(names, layers=(0, 1)) -> set[str]:
    return {f"model.layers.{i}.{n}" for i in layers for n in names}


@pytest.mark.parametrize(
    ("cfg", "want"),
    [
        (FreezeConfig(include=["q_proj", "v_proj"]), in_layers([PROJ_ATTN[0], PROJ_ATTN[2]])),
        (FreezeConfig(include=r".*\.(q|v)_proj"), in_layers([PROJ_ATTN[0], PROJ_ATTN[2]])),
        (FreezeConfig(include=r"model\.layers\.1\.mlp"), in_layers(PROJ_MLP, [1])),
        (FreezeConfig.attention_only(exclude=["o_proj"]), in_layers(PROJ_ATTN[:3])),
        (FreezeConfig.attention_only(exclude=r"model\.layers\.0\..*"), in_layers(PROJ_ATTN, [1])),
        (FreezeConfig.mlp_only(include=["lm_head"]), in_layers(PROJ_MLP) | {"lm_head.weight"}),
        (FreezeConfig(groups=["norms"], layers=[0]), in_layers(NORMS, [0]) | {"model.norm.weight"}),
        # an enclosing module included, a module inside it excluded
        (FreezeConfig(include=["layers.0"], exclude=["self_attn"]), in_layers(PROJ_MLP + NORMS, [0])),
    ],
)
def test_include_exclude(cfg, want):
    model = tiny_llama()
    check_counts(apply_freeze(model, cfg), model)
    assert trainable(model) == want


def test_tied_embeddings():
    model = arch_model("gpt2")
    report = apply_freeze(model, FreezeConfig.attention_only())
    assert "transformer.wte.weight" not in trainable(model) and "is frozen" in report.tied_embeddings

    report = apply_freeze(model, FreezeConfig(groups=["lm_head"]))
    assert trainable(model) == {"transformer.wte.weight"}  # the head is the input embedding
    assert model.lm_head.weight.requires_grad and "trains" in report.tied_embeddings
    assert report.description == "embeddings (tied lm_head) outside the layers"

    with pytest.raises(ValueError, match=r"tied input/output embeddings.*Exclude both names or neither"):
        apply_freeze(model, FreezeConfig(groups=["embeddings"], exclude=["lm_head"]))
    apply_freeze(model, FreezeConfig(exclude=["lm_head", "wte"]))
    assert "transformer.wte.weight" not in trainable(model) and "transformer.wpe.weight" in trainable(model)


class Mixer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)


class Block(nn.Module):
    """Unusual names: attention is `mixer` (found by its qkv), the feed-forward is `channel` (the one child left)."""

    def __init__(self, d):
        super().__init__()
        self.mixer = Mixer(d)
        self.channel = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class ToyLM(nn.Module):
    """No norms, no transformers base class: only the structural hooks FreezeConfig relies on."""

    def __init__(self, d=8, vocab=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(3))
        self.head = nn.Linear(d, vocab, bias=False)

    def get_input_embeddings(self):
        return self.tok

    def get_output_embeddings(self):
        return self.head


def test_structural_detection_on_unknown_architecture():
    model = ToyLM()
    report = apply_freeze(model, FreezeConfig.attention_only(layers="last:0.34"))
    assert trainable(model) == {f"blocks.2.mixer.{m}.{p}" for m in ("qkv", "out") for p in ("weight", "bias")}
    check_counts(report, model)
    apply_freeze(model, FreezeConfig.mlp_only(layers=[0]))
    assert trainable(model) == {f"blocks.0.channel.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert set(report.by_group) == {"attention", "mlp", "embeddings", "lm_head"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(groups=["attn"]), r"Unknown group 'attn' in `groups`. Did you mean 'attention'\?"),
        (dict(groups=[]), r"trains nothing"),
        (dict(layers="middle"), r"Cannot read `layers='middle'`.*'first_half'"),
        (dict(layers="first:1.5"), r"Cannot read `layers="),
        (dict(layers="5-2"), r"Cannot read `layers="),
        (dict(layers=[]), r"Cannot read `layers="),
        (dict(layers=2), r"Cannot read `layers=2`.*list of indices"),
        (dict(include="q_proj("), r"not a valid regex"),
        (dict(exclude=["q_proj", ""]), r"list of non-empty module names"),
        (dict(include=["q_proj"], exclude=["q_proj"]), r"\['q_proj'\] appear in both `include` and `exclude`"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreezeConfig(**kwargs)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (FreezeConfig.attention_only(layers=[2]), r"Layer indices \[2\] are out of range: the model has 2 decoder"),
        (FreezeConfig.attention_only(layers="0-7"), r"out of range.*Fix `layers`"),
        (FreezeConfig(include=["q_prj"]), r"`include` entry 'q_prj' matches no module.*target_modules"),
        (FreezeConfig.attention_only(exclude=r"q_proj"), r"`exclude` entry 'q_proj' matches no module.*full-match"),
        (FreezeConfig(include=r".*self_attn", exclude=["self_attn"]), r"'model.layers.0.self_attn' is matched by"),
        (FreezeConfig.attention_only(exclude=["self_attn"]), r"selects no parameter.*Widen"),
    ],
)
def test_bad_selection(cfg, match):
    with pytest.raises(ValueError, match=match):
        apply_freeze(tiny_llama(), cfg)


def test_group_the_architecture_lacks():
    with pytest.raises(ValueError, match=r"ToyLM has no \['norms'\] parameters.*Remove \['norms'\] from `groups`"):
        apply_freeze(ToyLM(), FreezeConfig(groups=["attention", "norms"]))


def test_sft_trainer_with_frozen_mlp(tmp_path):
    """The plain TRL path: apply_freeze, then hand the model to `trl.SFTTrainer`."""
    model = tiny_llama()
    report = apply_freeze(model, FreezeConfig.attention_only())
    before = params(model)
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=prompt_completion_dataset(), processing_class=make_tokenizer()
    )
    trainer.train()
    optimized = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    assert optimized == report.trainable
    assert_params_changed(before, model, report.trainable_names)
    assert_params_unchanged(before, model, [n for n in before if n not in report.trainable_names])


# ---------------------------------------------------------------------------------------------------------------------
# PEFT: the FreezeConfig chooses where adapters go; base weights stay frozen


def adapted(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def test_peft_target_modules():
    assert peft_target_modules(tiny_llama(), FreezeConfig.attention_only(layers=[1])) == [
        f"model.layers.1.self_attn.{m}_proj" for m in "qkvo"
    ]
    # GPT-2 has `c_proj` in both attention and MLP: full names keep them apart
    gpt2 = arch_model("gpt2")
    targets = peft_target_modules(gpt2, FreezeConfig.attention_only())
    assert targets == [f"transformer.h.{i}.attn.{m}" for i in (0, 1) for m in ("c_attn", "c_proj")]
    assert "lm_head" not in peft_target_modules(gpt2, FreezeConfig())  # like PEFT's all-linear
    config = restrict_peft_config(LoraConfig(r=2, fan_in_fan_out=True), gpt2, FreezeConfig.attention_only())
    peft_model = get_peft_model(gpt2, config)
    assert adapted(peft_model.get_base_model()) == set(targets)


@pytest.mark.parametrize("target_modules", [None, "all-linear", "ALL-LINEAR"])
def test_restrict_fills_unset_targets(target_modules):
    model = tiny_llama()
    user = LoraConfig(r=2, target_modules=target_modules)
    config = restrict_peft_config(user, model, FreezeConfig.mlp_only(layers="last_half"))
    assert config.target_modules == {f"model.layers.1.mlp.{m}_proj" for m in ("gate", "up", "down")}
    assert user.target_modules == target_modules  # a copy
    peft_model = get_peft_model(model, config)
    assert adapted(peft_model.get_base_model()) == config.target_modules
    check_adapter_teacher(peft_model)


def test_restrict_keeps_explicit_targets_inside_the_selection():
    model = tiny_llama()
    config = LoraConfig(target_modules=["q_proj", "v_proj"])
    config = restrict_peft_config(config, model, FreezeConfig.attention_only())
    assert config.target_modules == {"q_proj", "v_proj"}
    config = LoraConfig(target_modules=["q_proj"], layers_to_transform=[1])
    assert restrict_peft_config(config, model, FreezeConfig.attention_only(layers=[1])).target_modules == {"q_proj"}


@pytest.mark.parametrize(
    ("peft_config", "cfg", "match"),  # peft_config: LoraConfig's target_modules, or its keyword arguments
    [
        (["gate_proj"], FreezeConfig.attention_only(), r"outside the FreezeConfig selection \(model.layers.0.mlp"),
        (["q_proj"], FreezeConfig.attention_only(layers=[0]), r"\(model.layers.1.self_attn.q_proj\)"),
        (r".*\.mlp\..*", FreezeConfig.attention_only(), r"outside the FreezeConfig selection"),
        (dict(modules_to_save=["lm_head"]), FreezeConfig.attention_only(), r"\(lm_head\).*`modules_to_save`"),
        (None, FreezeConfig(groups=["attention", "norms"]), r"`groups` contains \['norms'\].*teacher.*would drift"),
        (None, FreezeConfig(include=["input_layernorm"]), r"no Linear/Conv1D layer.*Select 'attention'"),
    ],
)
def test_restrict_refuses_conflicts(peft_config, cfg, match):
    kwargs = peft_config if isinstance(peft_config, dict) else dict(target_modules=peft_config)
    with pytest.raises(ValueError, match=match):
        restrict_peft_config(LoraConfig(**kwargs), tiny_llama(), cfg)


def test_check_freeze_with_adapter_teacher():
    check_freeze_with_adapter_teacher(FreezeConfig())
    check_freeze_with_adapter_teacher(FreezeConfig.mlp_only())
    for group in ("embeddings", "lm_head", "norms"):
        with pytest.raises(ValueError, match=rf"`groups` contains \['{group}'\].*drop \['{group}'\]"):
            check_freeze_with_adapter_teacher(FreezeConfig(groups=["attention", group]))


def test_freeze_for_peft_narrows_an_existing_adapter():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    report = freeze_for_peft(peft_model, FreezeConfig.attention_only(layers=[1]))
    want = {
        f"base_model.model.model.layers.1.self_attn.{m}_proj.lora_{ab}.default.weight" for m in "qkvo" for ab in "AB"
    }
    assert trainable(peft_model) == want
    assert report.adapters_only and report.summary().endswith("— adapters on attention in layers 1 (of 2)")
    assert report.total == sum(p.numel() for p in peft_model.parameters())
    assert report.trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    check_adapter_teacher(peft_model)  # nothing outside the adapter was unfrozen

    with pytest.raises(ValueError, match=r"No trainable adapter weight.*restrict_peft_config"):
        freeze_for_peft(get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])), FreezeConfig.mlp_only())
    with pytest.raises(ValueError, match=r"expects a PeftModel.*apply_freeze"):
        freeze_for_peft(tiny_llama(), FreezeConfig.attention_only())
    with pytest.raises(ValueError, match=r"has PEFT adapters.*freeze_for_peft"):
        apply_freeze(peft_model, FreezeConfig.attention_only())
