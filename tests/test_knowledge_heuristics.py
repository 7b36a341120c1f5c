"""Heuristic labels: `copy` (answer in the question), `prior` (a default answer of the relation), `none` (genuine)."""

import pytest
from test_knowledge_probe import TEMPLATES, ScriptedGenerator

from trl_selfdistill.knowledge import ProbeConfig, load_facts, probe
from trl_selfdistill.knowledge.heuristics import (
    copies_answer,
    default_answers,
    fictional_facts,
    fictional_subjects,
    heuristic_label,
)
from trl_selfdistill.knowledge.splits import known_facts

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Chile": "Santiago", "Kenya": "Nairobi",
            "Egypt": "Cairo", "Djibouti": "Djibouti", "Shostka Raion": "Shostka"}


def capital_facts():
    rows = [{"question": f"What is the capital of {c}?", "answers": [a], "relation": "capital"}
            for c, a in CAPITALS.items()]
    return load_facts(rows, templates=TEMPLATES)


@pytest.mark.parametrize(
    "question, answers, copies",
    [
        ("What is the capital of Shostka Raion?", ["Shostka"], True),
        ("What is the capital of Djibouti?", ["Djibouti City", "Djibouti"], True),  # any alias
        ("What is the capital of Indiana?", ["Indianapolis"], False),  # not on a word boundary
        ("What is the capital of the Sand-Lake region?", ["Sand Lake"], True),  # normalised: hyphen = space
        ("What is the capital of France?", ["Paris"], False),
    ],
)
def test_copy_is_an_alias_in_the_question_on_word_boundaries(question, answers, copies):
    assert copies_answer(question, answers) is copies


def test_labels_copy_wins_over_prior():
    assert heuristic_label("Which country is Chicago in?", ["United States"], ["united states"]) == "prior"
    assert heuristic_label("Which country is the United States Virgin Islands in?", ["United States"],
                           ["united states"]) == "copy"
    assert heuristic_label("Which country is Lyon in?", ["France"], ["united states"]) == "none"


def test_fictional_subjects_look_like_the_real_ones_and_are_none_of_them():
    real = ["Dubai International Airport", "Sydney Kingsford Smith Airport", "Tokyo Haneda Airport", "Oslo Airport"]
    names = fictional_subjects(real, 6, seed=0)
    assert len(names) == len(set(names)) == 6
    assert not set(names) & set(real)
    assert all(name.split()[-1] == "Airport" for name in names)  # the rest of a real subject is kept
    assert names == fictional_subjects(real, 6, seed=0) != fictional_subjects(real, 6, seed=1)


def test_fictional_facts_follow_each_relation_template():
    fictional = fictional_facts(capital_facts(), per_relation=5, seed=0)
    assert len(fictional) == 5
    assert all(q.startswith("What is the capital of ") for q in fictional["question"])
    assert not set(fictional["subject"]) & set(CAPITALS)


def test_a_dominant_answer_of_the_set_is_a_default():
    rows = [{"question": f"Which country is City{i} in?", "answers": ["Japan" if i < 3 else f"Land{i}"],
             "relation": "country"} for i in range(12)]
    facts = load_facts(rows)
    assert default_answers(facts) == {"country": ["japan"]}  # 3 of 12 = 25% ≥ 15%
    assert default_answers(facts, set_share=0.3) == {}


def test_probe_labels_the_models_default_answer_as_prior():
    # The model answers "Nairobi" about every fictional country: Kenya's capital is a default, not knowledge
    generate = ScriptedGenerator(
        greedy={f"What is the capital of {c}?": [a] for c, a in CAPITALS.items()}, samples={}, default="Nairobi"
    )
    facts = probe(capital_facts(), generate_fn=generate, config=ProbeConfig.cheap(num_shots=2))
    label = dict(zip(facts["subject"], facts["heuristic"], strict=True))
    assert label == {"France": "none", "Japan": "none", "Peru": "none", "Chile": "none", "Kenya": "prior",
                     "Egypt": "none", "Djibouti": "copy", "Shostka Raion": "copy"}
    assert facts["defaults"][0] == ["nairobi"]
    assert set(known_facts(facts, ("HighlyKnown",))["subject"]) == {"France", "Japan", "Peru", "Chile", "Egypt"}
    # 3 prompts per fact, then one per fictional entity
    assert len(generate.prompts) == 3 * len(CAPITALS) + len(fictional_facts(capital_facts()))


def test_a_model_without_defaults_labels_no_prior():
    generate = ScriptedGenerator(greedy={f"What is the capital of {c}?": [a] for c, a in CAPITALS.items()}, samples={})
    facts = probe(capital_facts(), generate_fn=generate, config=ProbeConfig.cheap(num_shots=2))
    assert "prior" not in facts["heuristic"]
    assert facts["defaults"][0] == []


def test_labelling_a_categorised_set_gives_the_probes_labels():
    from trl_selfdistill.knowledge.probe import label_with_model

    script = {f"What is the capital of {c}?": [a] for c, a in CAPITALS.items()}
    config = ProbeConfig.cheap(num_shots=2)
    probed = probe(capital_facts(), generate_fn=ScriptedGenerator(script, {}, default="Nairobi"), config=config)
    generate = ScriptedGenerator(script, {}, default="Nairobi")
    relabelled = label_with_model(probed.remove_columns(["heuristic", "defaults"]), generate_fn=generate,
                                  config=config)
    assert relabelled["heuristic"] == probed["heuristic"] and relabelled["defaults"] == probed["defaults"]
    assert len(generate.prompts) == len(fictional_facts(capital_facts()))  # only the fictional entities are asked
