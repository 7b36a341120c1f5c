import json

import pytest
from conftest import FACTS, answered_facts, config, conversational_dataset, make_tokenizer, tiny_model
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTTrainer

from trl_selfdistill import SelfDistillSFTTrainer
from trl_selfdistill.knowledge import AnswerFormat, ForgettingCallback, Generator, KnowledgeSplits, evaluate_knowledge
from trl_selfdistill.knowledge.results import Collapse, Evaluation, Final, ForgettingResults, PerFact

HISTORY_KEYS = {"step", "task_accuracy", "new_fact_accuracy", "heldout_known_accuracy", "answered_known_accuracy",
                "drift_kl", "default_answer_share", "representation_drift"}
FINAL_KEYS = {
    "task_accuracy", "new_fact_accuracy", "heldout_known_accuracy", "heldout_known_peak", "heldout_known_initial",
    "forgetting_from_peak", "forgetting_from_peak_abs", "forgetting_from_start", "answered_known_accuracy",
    "heldout_known_last_k", "forgetting_last_k",
    "answered_known_forgetting", "per_category", "step",
}


def fact_set(rows, category):
    return Dataset.from_list([{"id": f"{category}-{q}", "question": q, "answers": [a], "relation": "", "subject": q,
                               "template": "", "category": category} for q, a in rows])


def make_splits() -> KnowledgeSplits:
    return KnowledgeSplits(
        train_known=fact_set(FACTS[:3], "HighlyKnown"),
        train_unknown=fact_set(FACTS[5:7], "Unknown"),
        heldout=fact_set([FACTS[3], FACTS[4], FACTS[7]], "HighlyKnown"),
    )


class LogRecorder(TrainerCallback):
    """Stands in for a `report_to` integration: it sees exactly what `on_log` receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_attached_callback_logs_and_writes_results(tmp_path, tokenizer):
    splits, fmt = make_splits(), AnswerFormat()
    trainer = SelfDistillSFTTrainer(
        model=tiny_model(),
        args=config(tmp_path, max_steps=4),
        train_dataset=fmt.training_dataset(splits.train()),
        processing_class=tokenizer,
    )
    recorder = LogRecorder()
    trainer.add_callback(recorder)
    callback = ForgettingCallback(splits, fmt=fmt, eval_steps=2, teacher=trainer.teacher, max_new_tokens=4)
    callback.attach(trainer)
    trainer.train()

    results = json.loads((tmp_path / "out" / "forgetting_results.json").read_text())
    assert set(results) == {"final", "history", "baseline", "sizes", "answered_known", "facts", "format", "run",
                            "eval_seconds", "per_fact", "collapse", "probe"}
    assert results["probe"] is None  # given splits: nothing was probed
    assert results["per_fact"]["heldout_ids"] == splits.heldout["id"]
    # The collapse diagnostic: held-out facts lost since the start, read from the per-fact records
    lost = sum(a and not b for a, b in zip(callback.answered, callback.correct[2], strict=True))
    assert results["collapse"]["lost"] == lost and 0 <= results["collapse"]["lost_to_default"] <= lost
    assert results["collapse"]["default_answer_share_end"] == results["history"][-1]["default_answer_share"]
    assert results["per_fact"]["heldout_answers_end"] == callback.heldout_answers
    assert len(callback.heldout_answers) == 3
    assert results["per_fact"]["heldout_start"] == [int(ok) for ok in callback.answered]
    assert results["per_fact"]["heldout_end"] == [int(ok) for ok in callback.correct[2]]
    assert len(results["per_fact"]["new_end"]) == 2 and 0 < results["eval_seconds"] < 600
    assert results["run"] == callback.run_id and len(results["run"]) == 32
    initial = results["history"][0]["heldout_known_accuracy"]
    assert results["answered_known"] == sum(callback.answered) == round(3 * initial)
    assert set(results["final"]) == FINAL_KEYS
    assert results["sizes"] == {"train_known": 3, "train_unknown": 2, "heldout_known": 3}
    assert results["format"] == {"prompt": "Q: {question}\nA:", "chat": False, "num_shots": 0}
    assert results["baseline"] is None
    assert [entry["step"] for entry in results["history"]] == [0, 2, 4]
    assert all(set(entry) == HISTORY_KEYS for entry in results["history"])
    # The teacher is the initial model: no drift at step 0, some after training at a high learning rate
    assert results["history"][0]["drift_kl"] == pytest.approx(0.0, abs=1e-5)
    assert results["history"][-1]["drift_kl"] > 1e-3
    # The middle layer's state at each held-out subject moved too, from exactly S's at step 0
    assert results["history"][0]["representation_drift"] == pytest.approx(0.0, abs=1e-6)
    assert results["history"][-1]["representation_drift"] > 1e-4
    assert results["final"] == callback.final
    assert results["final"]["heldout_known_peak"] == callback.peak["heldout_known_accuracy"]
    assert results["final"]["heldout_known_initial"] == results["history"][0]["heldout_known_accuracy"]
    # The final evaluation is the trained model's, zero-shot in the training format
    fresh = evaluate_knowledge(Generator(trainer.model, tokenizer, fmt, max_new_tokens=4, progress=False), splits, fmt)
    assert fresh["heldout_known_accuracy"] == results["final"]["heldout_known_accuracy"]
    assert fresh["per_category"] == results["final"]["per_category"]

    # Every evaluation reached the log watchers (report_to), without swallowing the training metrics
    knowledge_logs = [logs for logs in recorder.logs if "knowledge/task_accuracy" in logs]
    assert len(knowledge_logs) == 3
    assert {"knowledge/heldout_known_accuracy", "knowledge/drift_kl", "knowledge/accuracy_HighlyKnown",
            "knowledge/accuracy_Unknown"} <= set(knowledge_logs[-1])
    assert not any("sft_loss" in logs or "loss" in logs for logs in knowledge_logs)
    train_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert len(train_logs) == 4 and all("sft_loss" in logs for logs in train_logs)


def test_callback_passed_to_any_trainer_keeps_history(tmp_path, tokenizer):
    splits, fmt = make_splits(), AnswerFormat()
    callback = ForgettingCallback(splits, fmt=fmt, drift_size=0, max_new_tokens=4)
    trainer = SFTTrainer(
        model=tiny_model(),
        args=config(tmp_path, max_steps=3),
        train_dataset=fmt.training_dataset(splits.train()),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    # No eval_steps anywhere: start and end only
    assert [entry["step"] for entry in callback.history] == [0, 3]
    assert all(entry["drift_kl"] is None for entry in callback.history)
    logged = [entry for entry in trainer.state.log_history if "knowledge/heldout_known_accuracy" in entry]
    assert [entry["step"] for entry in logged] == [0, 3]
    assert (tmp_path / "out" / "forgetting_results.json").is_file()


def test_callback_rejects_bad_eval_steps():
    with pytest.raises(ValueError, match="positive number of steps"):
        ForgettingCallback(make_splits(), eval_steps=0)


def test_few_shot_evaluation_asks_each_fact_after_fixed_exemplars():
    splits = make_splits()
    pool = fact_set(FACTS, "HighlyKnown")
    callback = ForgettingCallback(splits, num_shots=2, exemplars=pool, seed=3, drift_size=0)
    train_known, train_unknown, heldout = callback.prompts
    assert (len(train_known), len(train_unknown), len(heldout)) == (3, 2, 3)
    for prompt, question in zip(heldout, splits.heldout["question"], strict=True):
        blocks = prompt.split("\n\n")  # two exemplar blocks, then the question itself
        assert len(blocks) == 3 and blocks[-1] == f"Q: {question}\nA:"
        assert question not in blocks[0] + blocks[1]  # a fact is never its own exemplar
    assert callback.prompts == ForgettingCallback(splits, num_shots=2, exemplars=pool, seed=3).prompts
    with pytest.raises(ValueError, match="needs `exemplars`"):
        ForgettingCallback(splits, num_shots=2)


def test_callback_from_facts_given_in_callbacks_probes_in_the_datas_format_and_reaches_the_card(tmp_path):
    """README's snippet: `callbacks=[ForgettingCallback(facts)]` works like `.attach`; the model is probed when
    training begins, asked in chat format (the data is conversational) after 4 shots, as `sft --knowledge_facts`
    does; the card then carries the forgetting metrics."""
    questions = [f"What is the capital of {c}?" for c in ("France", "Japan", "Peru", "Chile", "Kenya", "Cuba")]
    facts = answered_facts(tmp_path / "facts.jsonl", questions, seed=0)  # Known to the tiny model, probed at seed 0
    callback = ForgettingCallback(str(facts), heuristics=None)  # a random model answers every capital alike: `prior`
    trainer = SelfDistillSFTTrainer(model=tiny_model(), args=config(tmp_path, max_steps=2),
                                    train_dataset=conversational_dataset(), processing_class=make_tokenizer(),
                                    callbacks=[callback])
    assert callback.trainer is trainer and trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    results = callback.results()
    # The results have the typed shape the protocol, budget and card read, key for key
    assert set(results) == ForgettingResults.__required_keys__ and set(results["final"]) == set(Final.__annotations__)
    assert set(results["collapse"]) == set(Collapse.__annotations__)
    assert set(results["per_fact"]) == set(PerFact.__annotations__)
    assert all(set(entry) <= set(Evaluation.__annotations__) for entry in results["history"])
    assert trainer.knowledge_monitor is callback
    assert results["format"] == {"prompt": "{question} Reply with the answer only.", "chat": True, "num_shots": 4}
    assert results["probe"]["reused"] is False and results["probe"]["categories"] == {"HighlyKnown": 6}
    assert results["sizes"]["heldout_known"] == 6 and results["history"][0]["heldout_known_accuracy"] == 1.0
    # Its metrics went through `trainer.log` (report_to), as an attached callback's do
    assert any("knowledge/heldout_known_accuracy" in logs for logs in trainer.state.log_history)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Held-out Known accuracy" in card and "Forgetting (relative, from the start)" in card


@pytest.mark.parametrize("answers, fires", [("one default", True), ("varied", False)])
def test_collapse_onto_the_mixs_default_answer_is_reported_and_warned_on_the_card(tmp_path, tokenizer, answers,
                                                                                  fires):
    """Issue #30's failure, in small: Known training facts that share one answer teach it as the answer to anything,
    and held-out facts the model answered at the start are lost to it. The diagnostic fires and the card warns; with
    varied training answers the same forgetting is no collapse."""
    fmt = AnswerFormat()
    towns = ["Arlo", "Bexby", "Corin", "Dunmore", "Elsford", "Farrow", "Galen", "Hollis"]
    train = [(f"Which country is the town of {t} in?", "Oz" if answers == "one default" else f"{t[:2]}{i}")
             for i, t in enumerate(towns)]
    train_known = fact_set(train, "HighlyKnown")
    trainer = SelfDistillSFTTrainer(model=tiny_model(), args=config(tmp_path, max_steps=40, learning_rate=3e-2),
                                    train_dataset=fmt.training_dataset(train_known), processing_class=tokenizer)
    countries = ["Peru", "Chile", "Kenya", "Cuba", "Spain", "Italy", "Ghana", "Nepal", "Laos", "Chad", "Oman", "Fiji"]
    held = [f"Which country is the city of {c}ville in?" for c in countries]
    # Held-out facts the model answers at the start: their answer is its own
    generate = Generator(trainer.model, tokenizer, fmt, max_new_tokens=4, progress=False)
    start = generate([fmt.prompt_for(q) for q in held])
    heldout = fact_set([(q, a[0]) for q, a in zip(held, start, strict=True) if a[0]], "HighlyKnown")
    assert len(heldout) >= 8
    splits = KnowledgeSplits(train_known=train_known, train_unknown=heldout.select([]), heldout=heldout)
    callback = ForgettingCallback(splits, fmt=fmt, teacher=trainer.teacher, max_new_tokens=4, drift_size=0)
    callback.attach(trainer)
    trainer.train()
    collapse = callback.results()["collapse"]
    assert collapse["lost"] >= 5  # the training overwrote what the model answered at the start, either way
    assert collapse["fired"] is fires
    if fires:
        assert collapse["lost_to_default_share"] > 0.8 and collapse["default_answer_share_end"] > 0.5
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("Collapse onto default answers" in card) is fires
    # Every card reports the diagnostic, fired or not
    line = f"Held-out Known facts lost since the start: {collapse['lost']}, {collapse['lost_to_default']} of them"
    assert line in card
