"""The demo end to end in smoke mode: every stage runs and every output is written."""

import json

from trl_selfdistill.cli import main


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
