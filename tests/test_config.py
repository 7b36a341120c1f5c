"""SelfDistillConfig: defaults, validation messages, parser round-trip."""

import dataclasses

import pytest
from trl import SFTConfig, TrlParser

from trl_selfdistill import SelfDistillConfig

NEW_FIELDS = {f.name for f in dataclasses.fields(SelfDistillConfig)} - {f.name for f in dataclasses.fields(SFTConfig)}


def make(**kwargs):
    return SelfDistillConfig(output_dir="out", use_cpu=True, bf16=False, report_to="none", **kwargs)


def test_defaults_are_the_measured_setting():
    """λ = 1 and the forward KL as in the paper; τ = 2 over every position, the setting chosen on genuine facts
    (docs/reproduction.md, issue #30), not the paper's τ = 0.5."""
    args = make()
    assert (args.distill_coef, args.distill_temperature, args.divergence) == (1.0, 2.0, "forward_kl")
    assert (args.distill_scope, args.teacher_mode) == ("all", "auto")
    assert args.divergence_beta == 0.0


def test_every_new_field_has_help():
    assert NEW_FIELDS == {
        "distill_coef",
        "distill_temperature",
        "divergence",
        "jsd_beta",
        "distill_scope",
        "teacher_mode",
        "teacher_model_name_or_path",
        "teacher_cache_dir",
        "teacher_cache_topk",
        "teacher_cache_prefill",
        "teacher_cache_prefill_batch_size",
        "loss_chunk_rows",
        "cast_lm_head_to_fp32",
        "card_base_model",
    }
    for f in dataclasses.fields(SelfDistillConfig):
        if f.name in NEW_FIELDS:
            assert len(f.metadata.get("help", "")) > 20, f.name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"distill_coef": -0.1}, "distill_coef.*≥ 0"),
        ({"distill_temperature": 0.0}, "distill_temperature.*> 0"),
        ({"distill_temperature": -1.0}, "distill_temperature"),
        ({"divergence": "kl"}, "forward_kl, reverse_kl, jsd"),
        ({"divergence": "jsd", "jsd_beta": 1.5}, "strictly between 0 and 1"),
        ({"divergence": "jsd", "jsd_beta": 0.0}, "forward_kl"),
        ({"distill_scope": "answer"}, "completion, all, prompt"),
        ({"teacher_mode": "ema"}, "auto, adapter_disabled"),
        ({"teacher_mode": "adapter_disabled", "teacher_model_name_or_path": "x"}, "contradicts"),
        ({"teacher_cache_topk": 0}, "teacher_cache_topk"),
        ({"teacher_cache_dir": "c", "distill_coef": 0.0}, "runs no teacher"),
    ],
)
def test_bad_values_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_divergence_maps_to_trl_beta():
    assert make(divergence="reverse_kl").divergence_beta == 1.0
    assert make(divergence="jsd", jsd_beta=0.3).divergence_beta == 0.3


def test_parser_reads_cli_and_yaml(tmp_path):
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text(
        "output_dir: out\ndistill_coef: 2.0\ndivergence: jsd\njsd_beta: 0.25\nuse_cpu: true\nbf16: false\n"
    )
    (args,) = TrlParser((SelfDistillConfig,)).parse_args_and_config(
        ["--config", str(yaml), "--distill_temperature", "0.7", "--report_to", "none"]
    )
    assert (args.distill_coef, args.divergence, args.jsd_beta, args.distill_temperature) == (2.0, "jsd", 0.25, 0.7)
    with pytest.raises(SystemExit):
        TrlParser((SelfDistillConfig,)).parse_args(["--output_dir", "o", "--divergence", "kl"])


def test_installed_trl_is_in_the_range_the_package_claims():
    """pyproject's `trl` range is the tested one: the suite fails if it runs on a TRL outside it."""
    import importlib.metadata
    from pathlib import Path

    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    (trl,) = [Requirement(dep) for dep in project["dependencies"] if Requirement(dep).name == "trl"]
    assert trl.specifier.contains(importlib.metadata.version("trl")), (trl, importlib.metadata.version("trl"))


def test_configs_raise_no_deprecation_warning_and_keep_the_checkpointing_choice(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default = SelfDistillConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
        off = SelfDistillConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False)
    assert not [w for w in caught if "checkpointing" in str(w.message)]
    assert default.gradient_checkpointing is True and off.gradient_checkpointing is False
    if hasattr(off, "activation_checkpointing"):  # transformers ≥ 5.x renamed it
        assert off.activation_checkpointing is False
