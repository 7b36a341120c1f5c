"""The demo end to end in smoke mode: every stage runs and every output is written."""

import json
from argparse import Namespace

from trl_selfdistill.cli import main
from trl_selfdistill.demo import new_facts
from trl_selfdistill.knowledge import builtin_facts


def test_demo_smoke_writes_table_plot_results_and_card(tmp_path, capsys):
    runs = "known_only,sft,selfdistill,freeze,selfdistill_cache"
    main(["demo", "--smoke", "--output_dir", str(tmp_path), "--batch_size", "8", "--runs", runs])
    summary = json.loads((tmp_path / "results.json").read_text())
    assert list(summary["runs"]) == runs.split(",")
    for name, result in summary["runs"].items():
        assert [h["step"] for h in result["history"]] == [0, 1, 2], name
        assert result["final"]["heldout_known_peak"] is not None
        assert result["heldout_by_relation"].keys() == summary["snapshot_heldout_by_relation"].keys() != set()
    assert summary["runs"]["known_only"]["final"]["new_fact_accuracy"] is None
    assert summary["runs"]["selfdistill"]["baseline"]["name"].startswith("plain SFT")
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 7 and "(c) self-distillation" in table and "teacher cache" in table
    assert (tmp_path / "selfdistill_cache" / "teacher_cache" / "fingerprint.json").exists()
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    card = (tmp_path / "selfdistill" / "README.md").read_text()
    assert "heldout_known_accuracy" in card and "plain SFT" in card
    assert (tmp_path / "selfdistill" / "model.safetensors").exists()
    assert "(d) attention only" in capsys.readouterr().out


def test_mixed_new_facts_are_half_real_unknown_half_fictional():
    facts = builtin_facts("curated-smollm2")
    mixed = new_facts(Namespace(new_facts="mixed", seed=0), facts, 100)
    real = [r for r in mixed["relation"] if not r.startswith("synthetic-")]
    unknown_ids = {i for i, c in zip(facts["id"], facts["category"]) if c == "Unknown"}
    assert set(mixed.filter(lambda r: not r.startswith("synthetic-"), input_columns="relation")["id"]) <= unknown_ids
    assert len(real) == 58 and len(mixed) == 116  # half each, with spares for Unknown facts about held-out entities
    assert {r for r in mixed["relation"] if r.startswith("synthetic-")} == {"synthetic-capital", "synthetic-author"}
    assert new_facts(Namespace(new_facts="curated", seed=0), facts, 100) is None
