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
    main(["probe", "--model", str(model_dir), "--facts", str(facts_file), "--out", str(categorised), "--quiet",
          "--batch_size", "8", "--device", "cpu", "--dtype", "float32"])
    assert f"{len(CAPITALS)} facts probed" in capsys.readouterr().out
    facts = load_facts(categorised)
    assert len(facts) == len(CAPITALS)
    assert set(facts["category"]) <= {"HighlyKnown", "MaybeKnown", "Unknown"}  # no samples: never WeaklyKnown
    assert all(len(answers) == 3 for answers in facts["greedy_answers"])

    results_file = tmp_path / "new" / "folder" / "results.json"  # created before the evaluation runs
    main(["eval", "--model", str(model_dir), "--facts", str(categorised), "--out", str(results_file), "--quiet",
          "--prompt", "Question: {question}\\nAnswer:"])  # a literal backslash-n, as typed in a shell
    results = json.loads(results_file.read_text())
    assert results["num_facts"] == len(CAPITALS)
    assert set(results["per_category"]) == set(facts["category"])
    assert set(results["per_relation"]) == {"capital"}
    assert 0 <= results["accuracy"] <= 1
    assert results["format"]["prompt"] == "Question: {question}\nAnswer:"
    assert "accuracy" in capsys.readouterr().out


def test_old_hyphenated_flags_and_yaml_config(tmp_path, model_dir, facts_file):
    config = tmp_path / "probe.yaml"
    config.write_text(f"model: {model_dir}\nfacts: {facts_file}\nexemplars: {facts_file}\n"
                      "num_prompts: 2\nnum_shots: 2\nquiet: true\n")
    out = tmp_path / "categorised.jsonl"
    main(["probe", "--config", str(config), "--out", str(out), "--batch-size", "4", "--cheap", "--limit", "2"])
    facts = load_facts(out)
    assert len(facts) == 2 and all(len(answers) == 2 for answers in facts["greedy_answers"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dtype_and_device_reach_the_model(tmp_path, model_dir, facts_file, dtype):
    out = tmp_path / "results.json"
    main(["eval", "--model", str(model_dir), "--facts", str(facts_file), "--out", str(out), "--quiet",
          "--dtype", dtype, "--device", "cpu", "--max_new_tokens", "2"])
    results = json.loads(out.read_text())
    assert (results["dtype"], results["device"]) == (dtype, "cpu")


BAD_INPUTS = [
    (["probe", "--out", "{tmp}/x.jsonl", "--cheap", "--paper"], ValueError, "choose one"),
    (["probe", "--out", "{tmp}/x.jsonl", "--limit", "0"], ValueError, "at least 1"),
    (["probe", "--out", "{tmp}/x.jsonl", "--limit", "-1"], ValueError, "at least 1"),
    (["probe", "--out", "{tmp}/x.jsonl", "--facts", "{tmp}/empty.jsonl"], ValueError, "is empty"),
    (["probe", "--out", "{tmp}/x.jsonl", "--bogus"], ValueError, "--bogus"),
    (["probe", "--out", "{tmp}/x.jsonl", "--config", "{tmp}/bad.yaml"], ValueError, "num_promts"),
    (["eval", "--model", "x", "--facts", "{facts}", "--bogus"], ValueError, "--bogus"),
    (["eval", "--model", "nowhere/x", "--facts", "{facts}", "--out", "{tmp}/file.txt/r.json"], ValueError,
     "cannot be created"),
    (["eval", "--model", "nowhere/x", "--facts", "{tmp}/bad_line.jsonl"], Exception, "."),
]


@pytest.mark.parametrize("argv, error, message", BAD_INPUTS)
def test_bad_input_fails_before_any_model_loads(tmp_path, facts_file, argv, error, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "bad.yaml").write_text("num_promts: 3\n")
    (tmp_path / "bad_line.jsonl").write_text('{"question": "Q?", "answers": ["A"]}\n{not json\n')
    argv = [arg.format(tmp=tmp_path, facts=facts_file) for arg in argv]
    with pytest.raises(error, match=message) as raised:
        main(argv)
    # The fact loader's own error comes through as it is (the model "nowhere/x" was never reached)
    assert "nowhere" not in str(raised.value)


def test_demo_refuses_zero_steps(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--smoke", "--steps", "0"])
    assert "--steps: must be a positive integer, got 0" in capsys.readouterr().err
