import json
import re

import pytest
from datasets import Dataset

from trl_selfdistill.knowledge import (
    builtin_facts,
    is_correct,
    load_facts,
    normalize_answer,
    slick_category,
    synthetic_facts,
)
from trl_selfdistill.knowledge.facts import DATA_DIR, subject_of
from trl_selfdistill.knowledge.synthetic import PLACES


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Paris", "paris"),
        ("  The  Hague ", "hague"),
        ("Washington, D.C.", "washington dc"),
        ("J. R. R. Tolkien", "j r r tolkien"),
        ("an apple a day", "apple day"),
        ("Theodore", "theodore"),  # articles only as whole words
        ("Saint-Exupéry!", "saint exupéry"),
        ("Berners–Lee", "berners lee"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("the united states", ["United States", "USA"], True),
        ("USA.", ["United States", "USA"], True),
        ("United States of America", ["United States", "USA"], False),
        ("Paris, France", ["Paris"], False),
        ("", ["The"], False),  # an empty answer never matches, even an alias that normalises away
        ("kyiv", ["Kiev", "Kyiv"], True),
    ],
)
def test_is_correct_matches_any_alias(prediction, answers, expected):
    assert is_correct(prediction, answers) is expected


def test_subject_of_reads_the_template_back():
    assert subject_of("What is the capital of Côte d'Ivoire?", "What is the capital of [X]?") == "Côte d'Ivoire"
    assert subject_of("Who is Ada's child?", "Who is [X]'s child?") == "Ada"
    assert subject_of("Who wrote Hamlet?", "What is the capital of [X]?") == ""
    assert subject_of("Who wrote Hamlet?", "") == ""


def test_load_folder_takes_relations_from_file_names_and_templates_from_parent(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "relation_query_templates.json").write_text(json.dumps({"P36": "What is the capital of [X]?"}))
    rows = [
        {"question": "What is the capital of France?", "answers": ["Paris"]},
        {"question": "What is the capital of France?", "answers": ["Paris", "City of Light"]},
        {"question": "What is the capital of Peru?", "answers": ["Lima "]},
    ]
    (tmp_path / "train" / "P36.train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "train" / "P50.train.jsonl").write_text(json.dumps({"question": "Who wrote X?", "answers": ["Y"]}))
    facts = load_facts(tmp_path / "train")
    assert facts["question"] == ["What is the capital of France?", "What is the capital of Peru?", "Who wrote X?"]
    assert facts["answers"] == [["Paris", "City of Light"], ["Lima"], ["Y"]]  # merged, stripped
    assert facts["relation"] == ["P36", "P36", "P50"]
    assert facts["subject"] == ["France", "Peru", ""]  # P50 has no template here
    assert len(set(facts["id"])) == 3


def test_load_keeps_given_columns_and_accepts_renamed_ones():
    data = Dataset.from_list([{"q": "Who wrote Hamlet?", "aliases": ["Shakespeare"], "relation": "author",
                               "id": "h1", "source": "hand"}])
    facts = load_facts(data, templates={"author": "Who wrote [X]?"}, question_column="q", answers_column="aliases")
    assert facts[0] == {"id": "h1", "question": "Who wrote Hamlet?", "answers": ["Shakespeare"], "relation": "author",
                        "subject": "Hamlet", "template": "Who wrote [X]?", "source": "hand"}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"answers": ["Paris"]}, "no question string"),
        ({"question": "  ", "answers": ["Paris"]}, "no question string"),
        ({"question": "Capital of France?"}, "no answer list"),
        ({"question": "Capital of France?", "answers": []}, "empty answer list"),
        ({"question": "Capital of France?", "answers": [" "]}, "empty answer list"),
        ({"question": "When did WW2 end?", "answers": [1945]}, "non-string answers"),
    ],
)
def test_bad_facts_raise_with_the_fix(row, message):
    with pytest.raises(ValueError, match=message):
        load_facts([row])


def test_builtin_sets_are_complete_and_light():
    curated = builtin_facts("curated")
    assert len(curated) >= 300
    assert all(curated["subject"]) and all(curated["template"])
    per_relation = {r: curated["relation"].count(r) for r in set(curated["relation"])}
    assert min(per_relation.values()) >= 20, per_relation  # room for same-relation exemplars and held-out sets
    for split in ("entityquestions-train", "entityquestions-dev"):
        facts = builtin_facts(split)
        assert 300 <= len(facts) <= 2000
        assert all(re.fullmatch(r"P\d+", r) for r in facts["relation"])
        assert sum(bool(s) for s in facts["subject"]) / len(facts) > 0.95
    assert (DATA_DIR / "entityquestions" / "LICENSE").read_text().startswith("MIT License")
    # the shipped sets stay light (the `world` set's categories are the largest part: 1.5 MB for the 5,934 facts that
    # give the embedded model 1,059 genuine Known facts, issue #23)
    assert sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file()) < 3_000_000
    with pytest.raises(ValueError, match="Choose one of"):
        builtin_facts("trivia")


def test_shipped_categories_match_the_curated_facts():
    curated, categorised = builtin_facts("curated"), builtin_facts("curated-smollm2")
    assert categorised["id"] == curated["id"] and categorised["answers"] == curated["answers"]
    for fact in categorised:
        p_greedy = sum(is_correct(a, fact["answers"]) for a in fact["greedy_answers"]) / len(fact["greedy_answers"])
        assert fact["p_greedy"] == p_greedy and fact["category"] == slick_category(p_greedy, fact["p_sample"])


@pytest.mark.parametrize("keys", ["name", "uuid"])
def test_synthetic_facts_are_reproducible_and_distinct(keys):
    facts = synthetic_facts(200, keys=keys, relation="founder", seed=3)
    assert facts[:] == synthetic_facts(200, keys=keys, relation="founder", seed=3)[:]
    assert facts["subject"] != synthetic_facts(200, keys=keys, relation="founder", seed=4)["subject"]
    assert len(set(facts["subject"])) == 200
    assert all(q == f"Who founded {s}?" for q, s in zip(facts["question"], facts["subject"], strict=True))
    assert set(facts["relation"]) == {"synthetic-founder"}
    assert all(len(answer.split()) == 2 for (answer,) in facts["answers"])  # first name + surname
    if keys == "uuid":
        assert all(re.fullmatch(r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", s) for s in facts["subject"])
    else:
        real = {piece.replace("|", "") for piece in PLACES}
        heads = {piece.split("|")[0] for piece in PLACES}
        assert not set(facts["subject"]) & real
        assert all(any(s.startswith(h) for h in heads) for s in facts["subject"])


def test_synthetic_facts_reject_unknown_settings():
    with pytest.raises(ValueError, match="choose one of"):
        synthetic_facts(3, relation="mayor")
    with pytest.raises(ValueError, match="keys='uuid'"):
        synthetic_facts(10**6, keys="name")
