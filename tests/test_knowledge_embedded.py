import pytest

from trl_selfdistill.knowledge import AnswerFormat, Generator, ProbeConfig, builtin_facts, probe, synthetic_facts
from trl_selfdistill.knowledge.facts import load_facts


@pytest.mark.slow
def test_embedded_model_knows_capitals_and_not_fictional_ones():
    from trl_selfdistill.embedded import load_model

    model, tokenizer = load_model("embedded")
    curated = builtin_facts("curated")
    known = curated.filter(lambda q: q in {"What is the capital of France?", "What is the capital of Japan?",
                                           "What is the capital of Italy?"}, input_columns="question")
    # Probed with the real capitals as exemplars
    fictional = synthetic_facts(2, relation="capital", seed=0).map(lambda fact: {"relation": "capital"})
    facts = load_facts(list(known) + list(fictional))
    categorised = probe(facts, model, tokenizer, exemplars=curated, config=ProbeConfig.cheap(), progress=False)
    by_question = dict(zip(categorised["question"], categorised["category"], strict=True))
    assert by_question["What is the capital of France?"] == "HighlyKnown"
    assert [by_question[q] for q in fictional["question"]] == ["Unknown", "Unknown"]
    # The answers are parsed from the first line only
    greedy = Generator(model, tokenizer, AnswerFormat(), progress=False)
    (answer,), = greedy(["Q: What is the capital of Germany?\nA: Berlin\n\nQ: What is the capital of France?\nA:"])
    assert answer == "Paris"
