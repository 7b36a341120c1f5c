import json

import pytest
from conftest import make_tokenizer, tiny_model

from trl_selfdistill.cli import main
from trl_selfdistill.knowledge import load_facts

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Chile": "Santiago", "Kenya": "Nairobi",
            "Cuba": "Havana"}


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [{"question": f"What is the capital of {c}?", "answers": [a], "relation": "capital"}
            for c, a in CAPITALS.items()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_probe_then_eval(tmp_path, model_dir, facts_file, capsys):
    categorised = tmp_path / "categorised.jsonl"
    main(["probe", "--model", str(model_dir), "--facts", str(facts_file), "--out", str(categorised), "--cheap",
          "--quiet", "--batch-size", "8"])
    assert f"{len(CAPITALS)} facts probed" in capsys.readouterr().out
    facts = load_facts(categorised)
    assert len(facts) == len(CAPITALS)
    assert set(facts["category"]) <= {"HighlyKnown", "MaybeKnown", "Unknown"}  # no samples: never WeaklyKnown
    assert all(len(answers) == 3 for answers in facts["greedy_answers"])

    results_file = tmp_path / "results.json"
    main(["eval", "--model", str(model_dir), "--facts", str(categorised), "--out", str(results_file), "--quiet",
          "--prompt", "Question: {question}\\nAnswer:"])  # a literal backslash-n, as typed in a shell
    results = json.loads(results_file.read_text())
    assert results["num_facts"] == len(CAPITALS)
    assert set(results["per_category"]) == set(facts["category"])
    assert set(results["per_relation"]) == {"capital"}
    assert 0 <= results["accuracy"] <= 1
    assert results["format"]["prompt"] == "Question: {question}\nAnswer:"
    assert "accuracy" in capsys.readouterr().out


def test_cli_rejects_unknown_and_conflicting_options(tmp_path, facts_file):
    with pytest.raises(SystemExit):
        main(["probe", "--facts", str(facts_file), "--out", str(tmp_path / "x.jsonl"), "--cheap", "--paper"])
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--facts", str(facts_file), "--bogus"])
