"""The demo end to end in smoke mode: every stage runs and every output is written."""

import json

import pytest

from trl_selfdistill.cli import main
from trl_selfdistill.demo import SIZES, base_config, make_parser
from trl_selfdistill.knowledge import builtin_facts
from trl_selfdistill.protocol import Protocol


def test_demo_smoke_writes_table_plot_results_and_card(tmp_path, capsys):
    runs = "known_only,sft,selfdistill,freeze,selfdistill_cache"
    main(["demo", "--smoke", "--output_dir", str(tmp_path), "--batch_size", "8", "--runs", runs])
    summary = json.loads((tmp_path / "results.json").read_text())
    seed = summary["per_seed"][0]
    assert list(seed["runs"]) == runs.split(",") and summary["seeds"] == [0]
    assert seed["control"] == seed["splits"]["train_known"] + seed["splits"]["train_unknown"]  # same-size control
    assert len(seed["heldout_relations"]) == seed["splits"]["heldout_known"]
    for name, result in seed["runs"].items():
        assert [h["step"] for h in result["history"]] == [0, 1, 2], name
        assert result["final"]["heldout_known_peak"] is not None
        assert len(result["per_fact"]["heldout_end"]) == seed["splits"]["heldout_known"]
        assert set(result["heldout_by_relation"]) == set(summary["per_seed"][0]["runs"]["sft"]["heldout_by_relation"])
        assert result["s_per_step"] > 0 and result["steps"] == 2
    assert seed["runs"]["known_only"]["final"]["new_fact_accuracy"] is None
    assert seed["runs"]["selfdistill"]["baseline"]["name"].startswith("plain SFT")
    table = (tmp_path / "table.md").read_text()
    assert "| self-distillation | 1 |" in table and "| self-distillation, teacher cache | 1 |" in table
    assert "Held-out Known accuracy per relation" in table
    assert (tmp_path / "selfdistill_cache" / "teacher_cache" / "fingerprint.json").exists()
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG" == (tmp_path / "frontier.png").read_bytes()[:4]
    card = (tmp_path / "selfdistill" / "README.md").read_text()
    assert "Held-out Known accuracy" in card and "plain SFT" in card
    # The card's forgetting is the study's: relative to the start, as the table's "relative forgetting from S"
    final = seed["runs"]["selfdistill"]["final"]
    rows = [line for line in card.splitlines() if line.startswith("| Forgetting (relative, from the start)")]
    if final["forgetting_from_start"] is not None:  # None when the tiny model answers no held-out fact at the start
        assert f"| {final['forgetting_from_start']:.1%} |" in rows[0]
    assert (tmp_path / "selfdistill" / "model.safetensors").exists()
    out = capsys.readouterr().out
    assert "| attention only | 1 |" in out
    # Progress: one line per evaluation of each run, with where it is and the ETA; no raw metric dicts
    assert "[run 1/5 · seed 0 · Known only] step 0/2" in out and "[run 5/5 · seed 0 · " in out
    assert "step 2/2 · held-out" in out and "study ETA" in out
    assert "{'loss'" not in out and "'knowledge/" not in out


def test_demo_with_seeds_writes_one_folder_per_seed_and_the_paired_summary(tmp_path, capsys):
    main(["demo", "--smoke", "--output_dir", str(tmp_path), "--batch_size", "8", "--methods", "sft,selfdistill:2",
          "--seeds", "3,4"])
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["seeds"] == [3, 4] and [s["seed"] for s in summary["per_seed"]] == [3, 4]
    assert (tmp_path / "seed-3" / "seed_results.json").is_file() and (tmp_path / "seed-4" / "selfdistill_2").is_dir()
    assert summary["summary"]["selfdistill:2"]["forgetting"]["seeds"] == 2
    assert "vs_sft_facts" in summary["summary"]["selfdistill:2"]
    assert set(summary["frontier"]["sft"]) == {"0.8", "0.9"}
    # Seeds run separately combine into the same study
    main(["demo", "--smoke", "--output_dir", str(tmp_path / "five"), "--batch_size", "8", "--methods",
          "sft,selfdistill:2", "--seed", "5"])
    main(["demo", "--combine", str(tmp_path), str(tmp_path / "five"), "--output_dir", str(tmp_path / "all")])
    combined = json.loads((tmp_path / "all" / "results.json").read_text())
    assert combined["seeds"] == [3, 4, 5] and combined["summary"]["sft"]["forgetting"]["seeds"] == 3
    assert combined["per_seed"][:2] == summary["per_seed"]
    # A method added to a seed later (same splits and snapshot) merges into that seed
    main(["demo", "--smoke", "--output_dir", str(tmp_path / "five_freeze"), "--batch_size", "8", "--methods",
          "freeze", "--seed", "5"])
    main(["demo", "--combine", str(tmp_path / "five"), str(tmp_path / "five_freeze"), "--output_dir",
          str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "all" / ".." / "merged" / "results.json").read_text())
    assert merged["seeds"] == [5] and merged["methods"] == ["sft", "selfdistill:2", "freeze"]
    with pytest.raises(ValueError, match="Seeds repeat"):
        main(["demo", "--combine", str(tmp_path), str(tmp_path / "seed-3"), "--output_dir", str(tmp_path / "x")])
    # The decision table over regimes, from combined folders
    capsys.readouterr()
    main(["demo", "--regimes", f"seeds 3-5={tmp_path / 'all'}", f"seed 5={tmp_path / 'merged'}"])
    table = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[:3] for line in table[2:]] == [
        ["| seeds 3-5", "SFT", "3"], ["| seeds 3-5", "self-distillation (λ=2)", "3"], ["| seed 5", "SFT", "1"],
        ["| seed 5", "self-distillation (λ=2)", "1"], ["| seed 5", "attention only", "1"]]


def test_mixed_new_facts_are_half_real_unknown_half_fictional(tmp_path):
    facts = builtin_facts("curated-smollm2")
    args = make_parser().parse_args(["--output_dir", str(tmp_path)])
    protocol = Protocol(model="unused", facts=facts, args=base_config(args, _sizes()), new_facts="mixed")
    mixed = protocol._new_facts(100, seed=0)
    real = [r for r in mixed["relation"] if not r.startswith("synthetic-")]
    unknown_ids = {i for i, c in zip(facts["id"], facts["category"], strict=True) if c == "Unknown"}
    assert set(mixed.filter(lambda r: not r.startswith("synthetic-"), input_columns="relation")["id"]) <= unknown_ids
    assert len(real) == 58 and len(mixed) == 116  # half each, with spares for Unknown facts about held-out entities
    assert {r for r in mixed["relation"] if r.startswith("synthetic-")} == {"synthetic-capital", "synthetic-author"}
    assert Protocol(model="unused", facts=facts, args=protocol.args, new_facts="real")._new_facts(100, 0) is None
    with pytest.raises(ValueError, match="new_facts='curated'"):
        Protocol(model="unused", facts=facts, args=protocol.args, new_facts="curated")


def _sizes():

    return SIZES["smoke"]


def test_budget_methods_adapt_or_stop_as_their_mode_says(tmp_path, monkeypatch):
    """A signal always over budget: `budget` raises λ to its cap and trains on, `budget_stop` stops at the cap,
    `stop_at_budget` stops at once."""
    from dataclasses import replace

    from trl_selfdistill.budget import ForgettingBudgetCallback
    from trl_selfdistill.methods import parse_methods
    from trl_selfdistill.scripts.utils import tiny_checkpoint

    monkeypatch.setattr(ForgettingBudgetCallback, "_check_forgetting_callback", lambda self, args: None)
    monkeypatch.setattr(ForgettingBudgetCallback, "_evaluation",
                        lambda self, state, model: (state.global_step, 1.0))  # a random model knows no facts
    args = base_config(make_parser().parse_args(["--output_dir", str(tmp_path), "--batch_size", "8"]),
                       SIZES["smoke"])
    protocol = Protocol(
        model=tiny_checkpoint(),
        facts=builtin_facts("curated-smollm2"),
        args=replace(args, max_steps=4),
        train_size=16,
        heldout_size=8,
        eval_steps=2,
        budget_defaults={"max_coef": 2.0},
        budget_monitor_size=20,
    )
    runs = protocol.run_seed(0, parse_methods("budget:0.2,budget_stop,stop_at_budget"), tmp_path)["runs"]
    adapt, adapt_or_stop, stop = runs["budget:0.2"], runs["budget_stop"], runs["stop_at_budget"]
    assert [r["budget"]["mode"] for r in runs.values()] == ["adapt", "adapt_or_stop", "stop"]
    assert adapt["budget"]["budget"] == 0.2 and stop["budget"]["budget"] == 0.05  # the protocol's default
    assert [h["distill_coef"] for h in adapt["budget"]["history"]] == [1.0, 2.0, 2.0, 2.0, 2.0]  # monitor: every step
    assert adapt["steps"] == 4 and adapt["budget"]["stopped_at"] is None
    assert adapt_or_stop["budget"]["stopped_at"] == adapt_or_stop["steps"] == 2  # λ 1 → 2 (the cap), then a stop
    assert stop["budget"]["stopped_at"] == stop["steps"] == 1  # the first evaluation over budget
    assert [h["distill_coef"] for h in stop["budget"]["history"]] == [1.0, 1.0]


def test_budget_defaults_leave_the_mode_to_the_method():
    args = base_config(make_parser().parse_args(["--output_dir", "unused"]), SIZES["smoke"])
    with pytest.raises(ValueError, match="choose the method instead"):
        Protocol(model="unused", facts=builtin_facts("curated-smollm2"), args=args, budget_defaults={"mode": "stop"})
