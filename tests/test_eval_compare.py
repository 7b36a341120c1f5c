"""`trl-selfdistill eval` against a base model: forgetting, learning, flips, baseline files, PEFT adapters."""

import json

import pytest
from conftest import make_tokenizer, tiny_model
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trl_selfdistill.cli import main
from trl_selfdistill.knowledge.compare import compare, compare_correct
from trl_selfdistill.knowledge.stats import sign_test


def test_compare_counts_and_definitions():
    base = [1, 1, 1, 1, 0, 0, 0, 0]
    tuned = [1, 0, 0, 1, 1, 0, 0, 0]
    stats = compare_correct(base, tuned, resamples=200)
    assert stats["forgetting"]["mean"] == pytest.approx(1 - 3 / 4)  # relative drop from the base, as the study
    assert stats["lost_share"]["mean"] == pytest.approx(2 / 4) and stats["learning"]["mean"] == pytest.approx(1 / 4)
    assert (stats["lost"], stats["gained"], stats["base_answered"]) == (2, 1, 4)
    assert stats["sign_test_p"] == sign_test(2, 1)
    assert stats["forgetting"]["low"] <= stats["forgetting"]["mean"] <= stats["forgetting"]["high"]
    facts = Dataset.from_dict({"heuristic": ["copy", "none", "none", "none", "prior", "none", "none", "none"]})
    grouped = compare(facts, base, tuned, resamples=50)["by_heuristic"]
    assert set(grouped) == {"copy", "none", "prior"}
    assert (grouped["none"]["lost"], grouped["none"]["gained"], grouped["prior"]["gained"]) == (2, 0, 1)
    with pytest.raises(ValueError, match="same facts"):
        compare_correct([1], [1, 0])


@pytest.fixture
def models(tmp_path):
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)  # the adapter names its base's folder
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                     init_lora_weights=False)).save_pretrained(adapter)
    return base, adapter


def _facts(tmp_path, gold):
    rows = [{"question": f"What is the capital of country {i}?", "answers": [gold[i]], "relation": "capital",
             "heuristic": ["copy", "prior", "none"][i % 3]} for i in range(len(gold))]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


COMMON = ["--quiet", "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "4", "--format", "plain",
          "--resamples", "100", "--num_shots", "0"]  # zero-shot: the prompts do not depend on the gold answers


def test_eval_base_against_adapter_and_against_a_saved_baseline(tmp_path, models, capsys):
    base, adapter = models
    # Gold answers: what the base model says, for the first 6 of 10 facts; the other 4 it cannot answer
    main(["eval", "--model", str(base), "--facts", str(_facts(tmp_path, ["x"] * 10)), "--save_answers",
          str(tmp_path / "said.jsonl"), *COMMON])
    said = [json.loads(line)["answer"] for line in (tmp_path / "said.jsonl").read_text().splitlines()]
    gold = [answer if i < 6 and answer.strip(" .,") else f"nothing-{i}" for i, answer in enumerate(said)]
    facts = _facts(tmp_path, gold)
    main(["eval", "--model", str(base), "--facts", str(facts), "--save_answers", str(tmp_path / "base.jsonl"),
          *COMMON])

    out = tmp_path / "res" / "ft.json"
    main(["eval", "--model", str(adapter), "--base_model", str(base), "--facts", str(facts), "--out", str(out),
          *COMMON])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    stats = results["comparison"]["all"]
    answered = sum(bool(answer.strip(" .,")) for answer in said[:6])
    assert stats["base_answered"] == answered > 0 and results["base_accuracy"] == answered / 10
    flips = [json.loads(line) for line in (tmp_path / "res" / "ft.flips.jsonl").read_text().splitlines()]
    assert len(flips) == stats["lost"] + stats["gained"]
    assert all((f["flip"] == "lost") == (f["base_answer"] in f["answers"]) for f in flips)
    assert set(results["comparison"]["by_heuristic"]) == {"copy", "prior", "none"}
    assert "forgetting" in printed and "sign test p" in printed

    # The base model's saved answers give the same comparison without loading it
    again = tmp_path / "again.json"
    main(["eval", "--model", str(adapter), "--baseline", str(tmp_path / "base.jsonl"), "--facts", str(facts),
          "--out", str(again), *COMMON])
    assert json.loads(again.read_text())["comparison"] == results["comparison"]
    # ... and is refused in another format
    with pytest.raises(ValueError, match="was answered in"):
        main(["eval", "--model", str(adapter), "--baseline", str(tmp_path / "base.jsonl"), "--facts", str(facts),
              *COMMON, "--num_shots", "1"])


def test_eval_takes_the_monitor_format_from_the_model_folder(tmp_path, models):
    base, _ = models
    (base / "forgetting_results.json").write_text(json.dumps({"format": {"prompt": "Question: {question}\nAnswer:",
                                                                         "chat": False, "num_shots": 0}}))
    facts = _facts(tmp_path, ["a", "b", "c"])
    out = tmp_path / "r.json"
    quick = ["--quiet", "--max_new_tokens", "2", "--device", "cpu"]
    main(["eval", "--model", str(base), "--facts", str(facts), "--out", str(out), *quick])
    fmt = json.loads(out.read_text())["format"]
    assert (fmt["prompt"], fmt["num_shots"], fmt["chat"]) == ("Question: {question}\nAnswer:", 0, False)
    main(["eval", "--model", str(base), "--facts", str(facts), "--out", str(out), *quick, "--num_shots", "1",
          "--format", "chat"])
    fmt = json.loads(out.read_text())["format"]
    assert (fmt["prompt"], fmt["num_shots"], fmt["chat"]) == ("{question} Reply with the answer only.", 1, True)


@pytest.mark.parametrize("argv, message", [
    (["--base_model", "b", "--baseline", "f"], "choose one"),
    (["--num_shots", "-1"], "must be ≥ 0"),
    (["--num_shots", "9"], "num_shots=9"),
    (["--lm_eval_tasks", "no_such_task", "--num_shots", "0"], "Unknown lm-eval tasks"),
])
def test_eval_bad_options_fail_before_a_model_loads(tmp_path, argv, message):
    facts = _facts(tmp_path, ["a", "b", "c"])
    with pytest.raises(ValueError, match=message):
        main(["eval", "--model", "nowhere/x", "--facts", str(facts), *argv])
