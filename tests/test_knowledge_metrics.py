import evaluate
import pytest
from datasets import Dataset

from trl_selfdistill.knowledge import (
    EXACT_MATCH_METRIC_PATH,
    AnswerFormat,
    KnowledgeSplits,
    evaluate_knowledge,
    forgetting_summary,
    score,
)
from trl_selfdistill.knowledge.metrics import accuracy, accuracy_by, relative_drop


def facts(rows, category):
    return Dataset.from_list(
        [{"id": f"{category}-{i}", "question": q, "answers": a, "relation": "r", "subject": q.split()[-1].strip("?"),
          "template": "", "category": category} for i, (q, a) in enumerate(rows)]
    )


def test_score_and_accuracy_on_hand_made_predictions():
    gold = facts([("Capital of France?", ["Paris"]), ("Capital of USA?", ["Washington, D.C.", "Washington"]),
                  ("Author of Hamlet?", ["William Shakespeare", "Shakespeare"])], "HighlyKnown")
    correct = score(["paris", "Washington DC", "Marlowe"], gold)
    assert correct == [True, True, False]
    assert accuracy(correct) == pytest.approx(2 / 3)
    assert accuracy([]) is None
    assert accuracy_by(["a", "b", "a"], correct) == {"a": 0.5, "b": 1.0}
    with pytest.raises(ValueError, match="one prediction per fact"):
        score(["paris"], gold)


@pytest.mark.parametrize(
    "reference, value, expected",
    [(0.9, 0.85, 0.05 / 0.9), (0.5, 0.5, 0.0), (0.1, 0.85, -7.5), (0.0, 0.5, None), (None, 0.5, None),
     (0.5, None, None)],
)
def test_relative_drop(reference, value, expected):
    assert relative_drop(reference, value) == (pytest.approx(expected) if expected is not None else None)


def test_forgetting_summary_from_a_history():
    history = [
        {"step": 0, "task_accuracy": 0.2, "new_fact_accuracy": 0.0, "heldout_known_accuracy": 0.1},
        {"step": 40, "task_accuracy": 0.8, "new_fact_accuracy": 0.3, "heldout_known_accuracy": 0.9},
        {"step": 80, "task_accuracy": 0.9, "new_fact_accuracy": 0.5, "heldout_known_accuracy": 0.85,
         "answered_known_accuracy": 0.75},
    ]
    final = forgetting_summary(history, {"HighlyKnown": 0.9, "Unknown": 0.5})
    assert final == {
        "task_accuracy": 0.9,
        "new_fact_accuracy": 0.5,
        "heldout_known_accuracy": 0.85,
        "heldout_known_peak": 0.9,
        "heldout_known_initial": 0.1,
        "forgetting_from_peak": pytest.approx(0.05 / 0.9),
        "forgetting_from_peak_abs": pytest.approx(0.05),
        "forgetting_from_start": pytest.approx(-7.5),
        "heldout_known_last_k": pytest.approx((0.9 + 0.85) / 2),  # the evaluations after the first (2 < k = 3)
        "forgetting_last_k": pytest.approx(1 - 0.875 / 0.1),
        "answered_known_accuracy": 0.75,
        "answered_known_forgetting": pytest.approx(0.25),
        "per_category": {"HighlyKnown": 0.9, "Unknown": 0.5},
        "step": 80,
    }


def test_evaluate_knowledge_in_one_zero_shot_call():
    splits = KnowledgeSplits(
        train_known=facts([("Capital of France?", ["Paris"]), ("Capital of Peru?", ["Lima"])], "HighlyKnown"),
        train_unknown=facts([("Capital of Bergadena?", ["Vostrel"])], "Unknown"),
        heldout=facts([("Capital of Japan?", ["Tokyo"]), ("Capital of Chile?", ["Santiago"]),
                       ("Capital of Cuba?", ["Havana"]), ("Capital of Kenya?", ["Nairobi"])], "HighlyKnown"),
    )
    replies = {"Capital of France?": "Paris", "Capital of Peru?": "Cusco", "Capital of Bergadena?": "Vostrel",
               "Capital of Japan?": "Tokyo", "Capital of Chile?": "Santiago", "Capital of Cuba?": "Havana"}
    calls = []

    def generate(prompts, greedy, num_samples):
        calls.append((list(prompts), greedy))
        return [[replies.get(p.removeprefix("Q: ").removesuffix("\nA:"), "?")] for p in prompts]

    metrics = evaluate_knowledge(generate, splits, AnswerFormat())
    assert metrics == {"task_accuracy": 0.5, "new_fact_accuracy": 1.0, "heldout_known_accuracy": 0.75,
                       "per_category": {"HighlyKnown": 0.5, "Unknown": 1.0}}
    (prompts, greedy), = calls  # one batched greedy call, zero-shot prompts in the training format
    assert greedy and len(prompts) == 7 and prompts[0] == "Q: Capital of France?\nA:"
    # Restricted to the held-out facts answered at the start (Japan, Kenya): one of the two is still answered
    answered = evaluate_knowledge(generate, splits, AnswerFormat(), answered=[True, False, False, True])
    assert answered["answered_known_accuracy"] == 0.5 and answered["heldout_known_accuracy"] == 0.75


def test_exact_match_metric_loads_from_the_package():
    metric = evaluate.load(EXACT_MATCH_METRIC_PATH)
    result = metric.compute(predictions=["The Paris", "Lima", "usa"],
                            references=[["Paris"], ["Cusco"], ["United States", "USA"]])
    assert result == {"exact_match": pytest.approx(2 / 3)}


def test_collapse_counts_lost_facts_that_now_get_a_default_answer():
    from trl_selfdistill.knowledge.metrics import collapse, default_answers_of, default_share

    known = facts([("Country of Lyon?", ["United States"]), ("Country of Graz?", ["United States"]),
                   ("Country of Kobe?", ["Japan"])], "HighlyKnown")
    unknown = facts([("Language of Zorb?", ["English"]), ("Language of Quax?", ["English"])],
                    "Unknown").map(lambda row: {"relation": "language"})
    heldout = facts([("Country of Dubai?", ["United Arab Emirates"]), ("Country of Oslo?",
                    ["Norway"]), ("Country of Perth?", ["Australia"]), ("Language of Faust?",
                    ["German"])], "HighlyKnown")
    heldout = heldout.add_column("defaults", [["france"], [], [], []])
    splits = KnowledgeSplits(known, unknown, heldout)
    defaults = default_answers_of(splits)
    # each relation's most common training answer (seen twice), pooled; plus the fact's own probe defaults
    assert defaults == [{"united states", "english", "france"}] + [{"united states", "english"}] * 3
    start, end = [True, True, True, False], [False, False, True, False]
    answers = ["United States of America", "the United States", "Australia", "English"]
    assert collapse(start, end, answers, defaults) == {"lost": 2, "lost_to_default": 1, "lost_to_default_share": 0.5,
                                                       "fired": False}  # half of 2: too few lost to call it
    assert default_share(answers, defaults) == 0.5
    assert collapse([True], [True], ["x"], [set()])["lost_to_default_share"] is None
    # It fires from 5 lost facts with at least half of them to a default answer, not below either
    lost5 = dict(start=[True] * 5, end=[False] * 5, defaults=[{"oz"}] * 5)
    assert collapse(answers=["Oz", "Oz", "Oz", "a", "b"], **lost5)["fired"] is True
    assert collapse(answers=["Oz", "Oz", "a", "b", "c"], **lost5)["fired"] is False
    assert collapse(start=[True] * 4, end=[False] * 4, answers=["Oz"] * 4, defaults=[{"oz"}] * 4)["fired"] is False


def test_last_k_per_fact_averages_the_last_evaluations_after_the_first():
    from trl_selfdistill.knowledge.metrics import last_k_per_fact

    history = [[1, 1], [1, 0], [0, 0], [1, 0], [1, 1]]
    assert last_k_per_fact(history, k=3) == [pytest.approx(2 / 3), pytest.approx(1 / 3)]
    assert last_k_per_fact(history[:2], k=3) == [1.0, 0.0]  # only one evaluation after the first
    assert last_k_per_fact(history[:1], k=3) == [1.0, 1.0]  # none after it: the first


def test_defaults_of_hand_made_sets_without_relations_pool_their_answers():
    from trl_selfdistill.knowledge.metrics import default_answers_of

    bare = Dataset.from_list([{"question": f"Q{i}?", "answers": ["Paris" if i < 2 else f"A{i}"]} for i in range(4)])
    held = Dataset.from_list([{"question": "Capital of Peru?", "answers": ["Lima"]}])
    splits = KnowledgeSplits.__new__(KnowledgeSplits)  # no validation: the sets carry no entities
    splits.train_known, splits.train_unknown, splits.heldout, splits.control = bare, bare.select([]), held, None
    assert default_answers_of(splits) == [{"paris"}]
