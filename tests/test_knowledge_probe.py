from collections import Counter

import pytest
from conftest import tiny_model

from trl_selfdistill.knowledge import AnswerFormat, ProbeConfig, load_facts, probe, slick_category
from trl_selfdistill.knowledge.probe import few_shot_prompts

TEMPLATES = {"capital": "What is the capital of [X]?", "author": "Who wrote [X]?"}
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Chile": "Santiago", "Kenya": "Nairobi",
            "Egypt": "Cairo", "Cuba": "Havana"}


def capital_facts():
    rows = [{"question": f"What is the capital of {c}?", "answers": [a], "relation": "capital"}
            for c, a in CAPITALS.items()]
    return load_facts(rows, templates=TEMPLATES)


def last_question(prompt: str) -> str:
    return prompt.rsplit("Q: ", 1)[1].split("\n")[0]


class ScriptedGenerator:
    """Answers by the probed question: per-prompt greedy answers (in call order) and sampled answers; questions it
    has no script for (the probe's fictional entities) get `default`."""

    def __init__(self, greedy: dict[str, list[str]], samples: dict[str, list[str]], default: str = "?"):
        self.greedy, self.samples, self.seen = greedy, samples, Counter()
        self.default = default
        self.prompts = []

    def __call__(self, prompts, greedy, num_samples):
        self.prompts += prompts
        outputs = []
        for prompt in prompts:
            question = last_question(prompt)
            if greedy:
                answers = self.greedy.get(question, [self.default])
                outputs.append([answers[self.seen[question] % len(answers)]])
                self.seen[question] += 1
            else:
                outputs.append([self.samples[question][i % len(self.samples[question])] for i in range(num_samples)])
        return outputs


@pytest.mark.parametrize(
    "p_greedy, p_sample, category",
    [(1.0, 0.0, "HighlyKnown"), (0.3, 0.0, "MaybeKnown"), (0.0, 0.1, "WeaklyKnown"), (0.0, 0.0, "Unknown"),
     (0.0, None, "Unknown"), (1.0, None, "HighlyKnown")],
)
def test_slick_category(p_greedy, p_sample, category):
    assert slick_category(p_greedy, p_sample) == category


def test_scripted_generator_gives_exact_categories():
    q = "What is the capital of {}?".format
    generate = ScriptedGenerator(
        greedy={
            q("France"): ["Paris"],  # always right
            q("Japan"): ["Tokyo", "Kyoto", "Osaka"],  # right once in three prompts
            q("Peru"): ["Cusco"],  # never right greedily...
            q("Chile"): ["Lima"],  # ...nor here
            **{q(c): ["?"] for c in ("Kenya", "Egypt", "Cuba")},
        },
        samples={q("Peru"): ["Cusco", "Cusco", "Lima", "Cusco"], q("Chile"): ["Lima"],  # Peru: a quarter right
                 **{q(c): ["?"] for c in ("France", "Japan", "Kenya", "Egypt", "Cuba")}},
    )
    config = ProbeConfig(num_prompts=3, num_shots=2, num_samples=4, fictional_per_relation=0)
    facts = probe(capital_facts(), generate_fn=generate, config=config)
    by_subject = {row["subject"]: row for row in facts}
    assert by_subject["France"]["category"] == "HighlyKnown" and by_subject["France"]["p_greedy"] == 1
    assert by_subject["Japan"]["category"] == "MaybeKnown" and by_subject["Japan"]["p_greedy"] == pytest.approx(1 / 3)
    assert by_subject["Japan"]["greedy_answers"] == ["Tokyo", "Kyoto", "Osaka"]
    assert by_subject["Peru"]["category"] == "WeaklyKnown" and by_subject["Peru"]["p_sample"] == 0.25
    assert by_subject["Chile"]["category"] == "Unknown" and by_subject["Chile"]["p_sample"] == 0
    # 3 greedy prompts per fact, then the same 3 prompts sampled
    assert len(generate.prompts) == 2 * 3 * len(CAPITALS)


def test_cheap_probe_is_greedy_only():
    generate = ScriptedGenerator(greedy={f"What is the capital of {c}?": [a] for c, a in CAPITALS.items()}, samples={})
    facts = probe(capital_facts(), generate_fn=generate, config=ProbeConfig.cheap(fictional_per_relation=0))
    assert set(facts["category"]) == {"HighlyKnown"}
    assert facts["p_sample"] == [None] * len(CAPITALS)
    assert len(generate.prompts) == 3 * len(CAPITALS)
    assert all(prompt.count("Q: ") == 5 for prompt in generate.prompts)  # four shots + the question


def test_exemplars_are_same_relation_never_the_question_and_seeded():
    facts = capital_facts()
    pool = load_facts(
        [{"question": "Who wrote Hamlet?", "answers": ["Shakespeare"], "relation": "author"}]
        + [{"question": f"What is the capital of {c}?", "answers": [a], "relation": "capital"}
           for c, a in CAPITALS.items()],
        templates=TEMPLATES,
    )
    prompts = few_shot_prompts(facts, pool, AnswerFormat(), num_prompts=4, num_shots=3, seed=0)
    for fact, per_fact in zip(facts, prompts, strict=True):
        assert len(per_fact) == 4
        for prompt in per_fact:
            shots = prompt.split("\n\n")[:-1]
            assert len(shots) == 3
            assert all("capital" in shot for shot in shots)  # same relation only
            assert all(fact["question"] not in shot for shot in shots)  # never the fact itself
            assert last_question(prompt) == fact["question"]
        assert len(set(per_fact)) > 1  # different exemplar sets per prompt
    assert prompts == few_shot_prompts(facts, pool, AnswerFormat(), num_prompts=4, num_shots=3, seed=0)
    assert prompts != few_shot_prompts(facts, pool, AnswerFormat(), num_prompts=4, num_shots=3, seed=1)


def test_too_few_exemplars_raises():
    with pytest.raises(ValueError, match="lower `num_shots`"):
        few_shot_prompts(capital_facts(), capital_facts(), AnswerFormat(), num_prompts=1, num_shots=7, seed=0)


def test_generate_fn_must_answer_every_prompt():
    with pytest.raises(ValueError, match="one list of 1 answer"):
        probe(capital_facts(), generate_fn=lambda prompts, greedy, n: [["Paris"]], config=ProbeConfig.cheap())


def test_probe_needs_exactly_one_generator():
    with pytest.raises(ValueError, match="either `model`"):
        probe(capital_facts(), config=ProbeConfig.cheap())


def test_probe_with_a_tiny_model_runs_end_to_end(tokenizer):
    config = ProbeConfig(num_prompts=2, num_shots=2, num_samples=2, max_new_tokens=3, batch_size=8)
    facts = probe(capital_facts(), tiny_model(), tokenizer, config=config, progress=False)
    assert len(facts) == len(CAPITALS)
    assert all(len(answers) == 2 for answers in facts["greedy_answers"])
    assert set(facts["category"]) <= {"HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"}
    again = probe(capital_facts(), tiny_model(), tokenizer, config=config, progress=False)
    assert again["p_sample"] == facts["p_sample"] and again["greedy_answers"] == facts["greedy_answers"]
