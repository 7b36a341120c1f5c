"""`trl_selfdistill.protocol`, `study` and `report`: method and seed parsing, and the study summary and tables on
hand-made per-seed results."""

import pytest

from trl_selfdistill.methods import Method, parse_methods
from trl_selfdistill.protocol import parse_seeds
from trl_selfdistill.report import frontier_table, study_table
from trl_selfdistill.study import frontier_readings, make_study, summarize


def test_parse_methods_reads_kinds_and_parameters():
    methods = parse_methods("sft, selfdistill:0.5,selfdistill,lora_selfdistill:2,budget:0.05,freeze")
    assert [m.name for m in methods] == ["sft", "selfdistill:0.5", "selfdistill", "lora_selfdistill:2", "budget:0.05",
                                         "freeze"]
    assert methods[1] == Method("selfdistill", 0.5) and methods[1].title == "self-distillation (λ=0.5)"


@pytest.mark.parametrize("spec, message", [
    ("sft,selfdistil", "Unknown method 'selfdistil'"),
    ("sft:2", "takes no parameter"),
    ("selfdistill:high", "must be a number"),
    ("sft,sft", "repeat"),
    ("budget_stop:x", "must be a number"),
    ("", "No methods"),
])
def test_parse_methods_refuses_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(spec)


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds(7) == [7]
    with pytest.raises(ValueError, match="distinct"):
        parse_seeds("1,1")


def _run(title, start, end, new_end, history):
    return {"title": title, "per_fact": {"heldout_start": start, "heldout_end": end, "new_end": new_end},
            "history": [{"step": i, "new_fact_accuracy": x, "heldout_known_accuracy": y} for i, (x, y) in
                        enumerate(history)], "s_per_step": 1.0, "peak_memory_mb": 100.0}


def _study():
    """Two seeds, 10 held-out facts all known by S; SFT loses 4 of them, self-distillation 1 (the same facts each
    time plus none of its own)."""
    start = [1] * 10
    per_seed = []
    for seed in range(2):
        sft_end = [0, 0, 0, 0] + [1] * 6
        sd_end = [0] + [1] * 9
        per_seed.append({"seed": seed, "runs": {
            "sft": _run("SFT", start, sft_end, [1, 1, 1, 0], [(0.0, 1.0), (0.5, 0.8), (1.0, 0.6)]),
            "selfdistill": _run("self-distillation", start, sd_end, [1, 1, 0, 0],
                                [(0.0, 1.0), (0.5, 0.95), (0.8, 0.9)]),
        }})
    return per_seed


def test_summary_reports_forgetting_the_paired_difference_and_the_sign_test():
    summary = summarize(_study(), resamples=200)
    assert summary["sft"]["forgetting"]["mean"] == pytest.approx(0.4)
    assert summary["selfdistill"]["forgetting"]["mean"] == pytest.approx(0.1)
    assert summary["selfdistill"]["new_fact_accuracy"]["mean"] == pytest.approx(0.5)
    assert summary["selfdistill"]["vs_sft"]["mean"] == pytest.approx(0.3)
    assert summary["selfdistill"]["vs_sft"]["low"] > 0  # SFT forgets more in every resample
    facts = summary["selfdistill"]["vs_sft_facts"]
    assert (facts["method_only"], facts["sft_only"]) == (6, 0) and facts["p_value"] == pytest.approx(2 / 64)
    assert "vs_sft" not in summary["sft"]


def test_frontier_readings_at_matched_new_fact_accuracy():
    readings = frontier_readings(_study(), targets=(0.5, 0.9))
    assert readings["sft"]["0.5"]["mean"] == pytest.approx(0.2) and readings["sft"]["0.5"]["reached"] == 2
    assert readings["selfdistill"]["0.5"]["mean"] == pytest.approx(0.05)
    assert readings["sft"]["0.9"]["mean"] == pytest.approx(1 - (0.8 + (0.6 - 0.8) * 0.8))
    assert readings["selfdistill"]["0.9"] == {"mean": None, "low": None, "high": None, "n": 0, "reached": 0,
                                              "seeds": 2, "vs_sft": {"mean": None, "low": None, "high": None, "n": 0}}


def test_study_table_has_one_row_per_method_and_says_when_a_target_is_not_reached():
    per_seed = _study()
    study = {"summary": summarize(per_seed, resamples=50), "frontier": frontier_readings(per_seed)}
    lines = study_table(study).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| SFT | 2 |") and lines[3].startswith("| self-distillation | 2 |")
    assert "6 / 0 (p=0.031)" in lines[3]
    frontier = frontier_table(study).splitlines()
    assert "not reached (0/2 seeds)" in frontier[3] and "+22.0% [+22.0, +22.0] (n=2)" in frontier[3]


def test_per_seed_table_gives_each_seeds_paired_difference_within_it():
    from trl_selfdistill.report import per_seed_table

    lines = per_seed_table({"per_seed": _study()}).splitlines()
    assert len(lines) == 2 + 2 * 2  # header, rule, then 2 seeds × 2 methods
    # Within each seed: SFT loses 4 of 10, self-distillation 1; the 3 facts only SFT lost decide the difference
    assert lines[2].startswith("| 0 | SFT | 40.0% [") and "| 1.000 |" not in lines[2]
    assert lines[3].startswith("| 0 | self-distillation | 10.0% [") and "| +30.0% [" in lines[3]
    assert "| 3 / 0 |" in lines[3] and lines[5].startswith("| 1 | self-distillation | 10.0% [")


def test_frontier_paired_difference_uses_the_seeds_where_both_reach_the_target():
    readings = frontier_readings(_study(), targets=(0.5,))
    # at new-fact accuracy 0.5: SFT 0.8 → 20% forgetting, self-distillation 0.95 → 5%, in both seeds
    assert readings["selfdistill"]["0.5"]["vs_sft"]["mean"] == pytest.approx(0.15)
    assert readings["selfdistill"]["0.5"]["vs_sft"]["n"] == 2 and "vs_sft" not in readings["sft"]["0.5"]


def test_drift_is_summarised_at_the_end_and_at_matched_new_fact_accuracy():
    from trl_selfdistill.report import drift_table

    per_seed = _study()
    for seed, shift in zip(per_seed, (0.0, 0.02), strict=True):
        for run, slope in ((seed["runs"]["sft"], 0.1), (seed["runs"]["selfdistill"], 0.01)):
            for h in run["history"]:  # drift grows with training: slope × step, + a per-seed shift after step 0
                h["representation_drift"] = slope * h["step"] + (shift if h["step"] else 0.0)
                h["drift_kl"] = 10 * h["representation_drift"]
    summary = summarize(per_seed, resamples=20)
    sft, sd = summary["sft"]["drift"], summary["selfdistill"]["drift"]
    assert sft["representation_drift"]["mean"] == pytest.approx(0.2 + 0.01)  # step 2, seeds 0 and 1
    assert sft["drift_kl"]["mean"] == pytest.approx(2.1)
    # SFT reaches new-fact accuracy 0.8 between steps 1 (0.5) and 2 (1.0): 60% of the way
    assert sft["representation_drift_at_0.8"]["mean"] == pytest.approx(0.1 + 0.6 * 0.1 + 0.01)
    assert sd["representation_drift_at_0.8"]["mean"] == pytest.approx(0.02 + 0.01)  # step 2 hits 0.8
    assert sd["representation_drift_at_0.9"]["n"] == 0  # self-distillation never reaches 0.9
    lines = drift_table({"summary": summary}).splitlines()
    assert len(lines) == 4 and lines[3].startswith("| self-distillation | 0.03 [")
    assert lines[3].split(" | ")[3] == "–"  # not reached at 0.9
    for seed in per_seed:  # runs without drift measurements: no drift block, no table
        for run in seed["runs"].values():
            for h in run["history"]:
                h.pop("representation_drift"), h.pop("drift_kl")
    assert "drift" not in summarize(per_seed, resamples=20)["sft"]
    assert drift_table({"summary": summarize(per_seed, resamples=20)}) is None


def test_regime_table_gives_each_regime_and_method_its_paired_readings(tmp_path):
    import json

    from trl_selfdistill.report import read_regimes, regime_table

    per_seed = _study()
    study = make_study(per_seed)
    other = make_study([{**seed, "runs": {"sft": seed["runs"]["sft"]}} for seed in per_seed])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(study))
    studies = read_regimes([f"N=50 names={tmp_path / 'a'}"])
    lines = regime_table({**studies, "N=200 UUIDs": other}).splitlines()
    assert len(lines) == 2 + 2 + 1
    sd = lines[3].split(" | ")
    assert sd[0] == "| N=50 names" and sd[1] == "self-distillation" and sd[2] == "2"
    assert sd[5].startswith("+30.0% [") and sd[6] == "+22.0% [+22.0, +22.0] (n=2)"  # at 0.8: 32% vs 10%
    assert sd[7] == "not reached (0/2)"  # self-distillation never reaches new-fact accuracy 0.9
    assert lines[2].split(" | ")[6].startswith("(") and lines[4].startswith("| N=200 UUIDs | SFT | 2 |")
    with pytest.raises(SystemExit, match="LABEL=DIR"):
        read_regimes([str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--combine"):
        read_regimes([f"x={tmp_path / 'missing'}"])


def test_budget_monitor_facts_are_known_and_about_entities_the_splits_do_not_mention(tmp_path):
    from trl_selfdistill.demo import SIZES, base_config, make_parser
    from trl_selfdistill.knowledge import builtin_facts
    from trl_selfdistill.knowledge.splits import entity_of
    from trl_selfdistill.protocol import Protocol

    facts = builtin_facts("curated-smollm2")
    args = base_config(make_parser().parse_args(["--output_dir", str(tmp_path)]), SIZES["smoke"])
    protocol = Protocol(model="unused", facts=facts, args=args, train_size=40, heldout_size=60, new_facts="real",
                        budget_monitor_size=50)
    splits = protocol.splits(seed=1)
    monitor = protocol.monitor_splits(splits, seed=1).heldout
    assert len(monitor) == 50 and set(monitor["category"]) == {"HighlyKnown"}
    used = {
        entity_of(f) for s in (splits.train_known, splits.train_unknown, splits.heldout, splits.control) for f in s
    }
    assert not {entity_of(f) for f in monitor} & used
    with pytest.raises(ValueError, match="Known facts are left besides the splits"):
        Protocol(
            model="unused", facts=facts, args=args, train_size=40, heldout_size=140, new_facts="real"
        ).monitor_splits(
            Protocol(model="unused", facts=facts, args=args, train_size=40, heldout_size=140, new_facts="real").splits(
                0
            ),
            0,
        )


def test_a_method_run_on_some_seeds_is_summarised_over_those_and_paired_with_sft_there():
    per_seed = _study()
    start = [1] * 10
    per_seed[1]["runs"]["freeze"] = _run("attention only", start, [1] * 10, [0, 0, 0, 0], [(0.0, 1.0), (0.1, 1.0)])
    study = make_study(per_seed)
    assert study["methods"] == ["sft", "selfdistill", "freeze"]
    row = study["summary"]["freeze"]
    assert row["seeds"] == [1] and row["forgetting"]["mean"] == 0 and row["vs_sft"]["mean"] == pytest.approx(0.4)
    assert row["vs_sft_facts"]["method_only"] == 4 and study["frontier"]["freeze"]["0.8"]["seeds"] == 1
    assert "| attention only | 1 |" in study_table(study) and "| attention only |" in frontier_table(study)
    with pytest.raises(ValueError, match="No seed ran"):
        make_study(per_seed, ["lora_sft"])


def test_peak_memory_sees_a_block_allocation_that_is_freed_before_the_block_ends():
    import time

    import torch

    from trl_selfdistill.memory import MemoryMeter

    with MemoryMeter() as memory:
        block = torch.ones(64, 2**20)  # 256 MiB, written so the pages are resident
        time.sleep(0.2)
        del block
    assert memory.used_mb is not None and memory.used_mb > 200


def test_peak_memory_of_a_later_block_is_not_hidden_by_memory_an_earlier_block_freed():
    import time

    import torch

    from trl_selfdistill.memory import MemoryMeter

    def churn():  # 300 × 1 MiB: below glibc's mmap threshold once it has adapted, so freed blocks stay in the heap
        blocks = [torch.ones(2**18) for _ in range(300)]
        time.sleep(0.1)
        del blocks

    churn()
    with MemoryMeter() as memory:
        churn()
    # What the earlier churn freed was handed back first, so this one grows the process (without `malloc_trim` the
    # allocator reuses the freed blocks and the growth reads ≈ 0 MB: measured 0.004 MB against 300 MB with it)
    assert memory.used_mb > 250


def test_relation_table_pools_the_held_out_answers_of_every_seed_per_relation():
    from trl_selfdistill.report import relation_table

    per_seed = _study()
    for seed in per_seed:  # facts 0-4 are capitals, 5-9 languages; SFT loses capitals 0-3, self-distillation 0
        seed["heldout_relations"] = ["capital"] * 5 + ["language"] * 5
    table = relation_table(make_study(per_seed))
    assert "| capital | 10 | 1.00 | 0.20 | 0.80 |" in table and "| language | 10 | 1.00 | 1.00 | 1.00 |" in table
    del per_seed[0]["heldout_relations"]
    assert relation_table(make_study(per_seed)) is None


def test_a_run_whose_trainer_fails_to_build_leaves_no_memory_sampler_running(tmp_path):
    import threading
    from types import SimpleNamespace

    from conftest import config
    from datasets import Dataset

    from trl_selfdistill.protocol import Protocol

    protocol = Protocol(
        model="unused",
        facts=Dataset.from_dict({"category": ["HighlyKnown"]}),
        args=config(tmp_path),
        log=lambda *_: None,
    )

    def fail(*_args, **_kwargs):
        raise ValueError("bad settings")

    protocol.trainer = fail
    before = sum(t.name == "MemoryMeter" for t in threading.enumerate())
    with pytest.raises(ValueError, match="bad settings"):
        protocol.run(
            parse_methods("sft")[0], splits=SimpleNamespace(sizes={}), snapshot="unused", seed=0, out=tmp_path
        )
    assert sum(t.name == "MemoryMeter" for t in threading.enumerate()) == before


@pytest.mark.parametrize("min_gain, epochs_run", [(0.01, 1), (-1.0, 3)])
def test_format_learning_stops_once_the_monitor_facts_stop_improving(tmp_path, min_gain, epochs_run):
    from trl_selfdistill.demo import SIZES, base_config, make_parser
    from trl_selfdistill.knowledge import builtin_facts
    from trl_selfdistill.protocol import Protocol
    from trl_selfdistill.scripts.utils import tiny_checkpoint

    args = base_config(make_parser().parse_args(["--output_dir", str(tmp_path)]), SIZES["smoke"])
    protocol = Protocol(model=tiny_checkpoint(), facts=builtin_facts("curated-smollm2"), args=args, train_size=16,
                        heldout_size=8, new_facts="real", snapshot_max_epochs=3, snapshot_min_gain=min_gain,
                        budget_monitor_size=24, log=lambda *_: None)
    splits = protocol.splits(seed=0, control=False)
    path, curve = protocol.snapshot(splits, 0, tmp_path)
    per_epoch = -(-len(splits.train_known) // args.per_device_train_batch_size)
    # A random model answers nothing, so an epoch never gains: it stops after the first one unless told not to
    assert [point["step"] for point in curve] == [per_epoch * e for e in range(epochs_run + 1)]
    assert all(point["monitor_accuracy"] == 0 for point in curve)
    assert (tmp_path / "snapshot" / "config.json").is_file() and path == str(tmp_path / "snapshot")


def test_each_method_is_one_entry_whose_overrides_set_what_it_says():
    from types import SimpleNamespace

    from trl_selfdistill.methods import METHODS

    protocol = SimpleNamespace(args=SimpleNamespace(distill_coef=1.0, learning_rate=1e-4), lora_lr_scale=10.0)

    def overrides(name):
        method = parse_methods(name)[0]
        return method.spec.overrides(method, protocol)

    assert overrides("sft") == overrides("known_only") == overrides("freeze") == {"distill_coef": 0.0}
    assert overrides("selfdistill") == {"distill_coef": 1.0} and overrides("selfdistill:2") == {"distill_coef": 2.0}
    assert overrides("budget:0.1") == {"distill_coef": 1.0}  # the value is the budget, λ stays the config's
    assert overrides("selfdistill_prompt:2") == {"distill_coef": 2.0, "distill_scope": "prompt"}
    assert overrides("selfdistill_completion")["distill_scope"] == "completion"
    protocol.args.distill_temperature = 0.5
    assert overrides("selfdistill_tau:2") == {"distill_coef": 1.0, "distill_temperature": 2.0}
    assert overrides("lora_selfdistill:0.5") == {"distill_coef": 0.5, "learning_rate": pytest.approx(1e-3)}
    assert overrides("lora_sft") == {"distill_coef": 0.0, "learning_rate": pytest.approx(1e-3)}
    assert overrides("freeze_mlp") == {"distill_coef": 0.0}
    assert overrides("l2match:2") == {"distill_coef": 2.0}  # λ of the KL whose gradient norm the pull matches
    assert overrides("asft:0.5") == {"distill_coef": 0.5, "loss_type": "dft", "distill_temperature": 1.0,
                                     "divergence": "forward_kl", "distill_scope": "completion"}
    assert [k for k, spec in METHODS.items() if spec.control] == ["known_only"]
    assert {k: spec.budget_mode for k, spec in METHODS.items() if spec.budget_mode} == {
        "budget": "adapt", "budget_stop": "adapt_or_stop", "stop_at_budget": "stop"}
    # every parameter a method takes is named in its title
    for kind, spec in METHODS.items():
        if spec.parameter:
            assert parse_methods(f"{kind}:3")[0].title == f"{spec.title} ({spec.parameter}=3)"


def test_known_rows_only_puts_no_distillation_on_new_fact_rows(tmp_path):
    from trl_selfdistill.demo import SIZES, base_config, make_parser
    from trl_selfdistill.knowledge import builtin_facts
    from trl_selfdistill.protocol import Protocol
    from trl_selfdistill.scripts.utils import tiny_checkpoint

    args = base_config(make_parser().parse_args(["--output_dir", str(tmp_path)]), SIZES["smoke"])
    protocol = Protocol(model="unused", facts=builtin_facts("curated-smollm2"), args=args, train_size=16,
                        heldout_size=8, new_facts="real", log=lambda *_: None)
    splits = protocol.splits(seed=0, control=False)
    trainer = protocol.trainer(parse_methods("selfdistill_known")[0], splits, tiny_checkpoint(), 0, tmp_path)
    weights = sorted(trainer._row_weights.values())
    assert weights == [0.0] * len(splits.train_unknown) + [1.0] * len(splits.train_known)
    plain = protocol.trainer(parse_methods("selfdistill")[0], splits, tiny_checkpoint(), 0, tmp_path)
    assert plain._row_weights is None
    from trl_selfdistill.peers import MatchedL2SFTTrainer

    matched = protocol.trainer(parse_methods("l2match")[0], splits, tiny_checkpoint(), 0, tmp_path)
    assert isinstance(matched, MatchedL2SFTTrainer) and matched.distill_coef == args.distill_coef


def test_the_summary_reads_forgetting_from_the_mean_of_the_last_evaluations_too():
    per_seed = _study()
    for seed in per_seed:
        for run in seed["runs"].values():  # the last evaluations of every fact: halfway between S and the end
            run["per_fact"]["heldout_last_k"] = [(a + b) / 2 for a, b in
                                                 zip(run["per_fact"]["heldout_start"], run["per_fact"]["heldout_end"],
                                                     strict=True)]
    summary = summarize(per_seed, resamples=200)
    assert summary["sft"]["forgetting_last_k"]["mean"] == pytest.approx(0.2)  # 4 of 10 lost at the end, half on avg
    assert summary["selfdistill"]["forgetting_last_k"]["mean"] == pytest.approx(0.05)
    assert summary["selfdistill"]["vs_sft_last_k"]["mean"] == pytest.approx(0.15)
    assert "the same, mean of the last 3 evaluations" in study_table(make_study(per_seed))


def test_the_summary_pools_the_collapse_diagnostic_over_seeds():
    per_seed = _study()
    for i, seed in enumerate(per_seed):
        seed["runs"]["sft"]["collapse"] = {"lost": 4, "lost_to_default": i + 1, "default_answer_share_end": 0.1}
        seed["runs"]["selfdistill"]["collapse"] = {"lost": 1, "lost_to_default": 1, "default_answer_share_end": 0.3}
    summary = summarize(per_seed, resamples=50)
    assert summary["sft"]["collapse"]["lost"] == 8 and summary["sft"]["collapse"]["share"] == pytest.approx(3 / 8)
    assert summary["selfdistill"]["collapse"]["default_answer_share_end"]["mean"] == pytest.approx(0.3)
    table = study_table(make_study(per_seed))
    assert "| 3 of 8 (38%) |" in table and "| 2 of 2 (100%) |" in table
