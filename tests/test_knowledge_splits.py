import pytest
from datasets import Dataset

from trl_selfdistill.knowledge import KnowledgeSplits, build_splits, synthetic_facts
from trl_selfdistill.knowledge.splits import entity_of


def categorised(num_entities: int = 40) -> Dataset:
    """Two facts per entity (capital and language), Known for even entities, Unknown for odd ones."""
    rows = []
    for i in range(num_entities):
        category = "HighlyKnown" if i % 2 == 0 else "Unknown"
        for relation, template in (("capital", "What is the capital of [X]?"), ("language", "What is spoken in [X]?")):
            rows.append({"id": f"{relation}-{i}", "question": template.replace("[X]", f"Land{i}"),
                         "answers": [f"A{i}"], "relation": relation, "subject": f"Land{i}", "template": template,
                         "category": category})
    return Dataset.from_list(rows)


def entities(facts: Dataset) -> set[str]:
    return {entity_of(fact) for fact in facts}


def test_split_sizes_shares_and_disjoint_entities():
    splits = build_splits(categorised(), train_size=12, heldout_size=10, unknown_share=0.25, seed=1)
    assert splits.sizes == {"train_known": 9, "train_unknown": 3, "heldout_known": 10}
    assert set(splits.train_known["category"]) == set(splits.heldout["category"]) == {"HighlyKnown"}
    assert set(splits.train_unknown["category"]) == {"Unknown"}
    trained = entities(splits.train_known) | entities(splits.train_unknown) | entities(splits.control)
    assert not trained & entities(splits.heldout)
    # The control is Known-only, the mix's size, and contains the mix's Known facts
    assert len(splits.control) == 12 and set(splits.control["category"]) == {"HighlyKnown"}
    assert set(splits.train_known["id"]) <= set(splits.control["id"])
    assert len(splits.train()) == 12
    assert splits.train(seed=0)["id"] != splits.train(seed=1)["id"]
    again = build_splits(categorised(), train_size=12, heldout_size=10, unknown_share=0.25, seed=1)
    assert again.heldout["id"] == splits.heldout["id"]


def test_known_only_control_run():
    splits = build_splits(categorised(), train_size=8, heldout_size=10).known_only()
    assert splits.sizes == {"train_known": 8, "train_unknown": 0, "heldout_known": 10}
    with pytest.raises(ValueError, match="control=True"):
        build_splits(categorised(), train_size=8, heldout_size=10, control=False).known_only()


def test_new_facts_supply_the_unknowns():
    new = synthetic_facts(30, seed=0)
    splits = build_splits(categorised(), train_size=20, heldout_size=10, new_facts=new, control=False)
    assert splits.sizes == {"train_known": 10, "train_unknown": 10, "heldout_known": 10}
    assert set(splits.train_unknown["id"]) <= set(new["id"])
    assert set(splits.train()["category"]) == {"HighlyKnown", "Unknown"}


def test_control_size_available_takes_the_known_facts_left():
    facts = categorised(num_entities=30)  # 30 Known facts
    splits = build_splits(facts, train_size=24, heldout_size=10, control_size="available")
    assert len(splits.control) == 20  # 30 Known minus the 10 held out, fewer than train_size
    assert set(splits.train_known["id"]) <= set(splits.control["id"])
    assert not entities(splits.control) & entities(splits.heldout)
    assert len(build_splits(facts, train_size=8, heldout_size=10, control_size="available").control) == 8
    assert len(build_splits(facts, train_size=8, heldout_size=10, control_size=16).control) == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(train_size=30, heldout_size=10), "cannot fill"),  # the control needs 30 Known facts besides the 10
        (dict(train_size=8, heldout_size=10, control_size=2), "smaller than the 4 Known facts"),
        (dict(train_size=20, heldout_size=30, control=False), "cannot fill"),
        (dict(train_size=40, heldout_size=4, unknown_share=1.0, control=False), "Unknown facts"),
        (dict(train_size=4, heldout_size=4, unknown_share=1.5), "between 0 and 1"),
    ],
)
def test_impossible_splits_raise(kwargs, message):
    facts = categorised(num_entities=30)  # 15 Known entities = 30 Known facts, 30 Unknown facts
    with pytest.raises(ValueError, match=message):
        build_splits(facts, **kwargs)


def test_uncategorised_facts_raise():
    with pytest.raises(ValueError, match="categorise them first"):
        build_splits(categorised().remove_columns("category"), train_size=4, heldout_size=4)


def test_hand_made_splits_are_validated():
    facts = categorised()
    known = facts.filter(lambda c: c == "HighlyKnown", input_columns="category")
    unknown = facts.filter(lambda c: c == "Unknown", input_columns="category")
    with pytest.raises(ValueError, match="entities the training facts cover"):
        KnowledgeSplits(known.select(range(0, 4)), unknown.select(range(2)), known.select(range(3, 6)))
    with pytest.raises(ValueError, match="no Known facts"):
        KnowledgeSplits(known.select(range(4)), unknown.select(range(2)), unknown.select(range(2, 6)))
    with pytest.raises(ValueError, match="empty"):
        KnowledgeSplits(known.select(range(4)), unknown.select(range(2)), known.select([]))
    ok = KnowledgeSplits(known.select(range(4)), unknown.select(range(2)), known.select(range(4, 8)))
    assert ok.sizes == {"train_known": 4, "train_unknown": 2, "heldout_known": 4}


def test_concatenate_facts_keeps_the_columns_every_set_has():
    from trl_selfdistill.knowledge import builtin_facts
    from trl_selfdistill.knowledge.splits import concatenate_facts

    categorised, plain = builtin_facts("entityquestions-smollm2"), builtin_facts("curated")
    both = concatenate_facts([plain, categorised], labels=False)  # what the demo probes again for another model
    assert len(both) == len(plain) + len(categorised) and "category" not in both.column_names
    shipped = [categorised, builtin_facts("curated-smollm2")]
    assert "category" in concatenate_facts(shipped, labels=False).column_names


def labelled(num_entities: int = 60) -> Dataset:
    """`categorised` with every third entity's facts labelled `prior` (answerable by a default answer)."""
    facts = categorised(num_entities)
    return facts.add_column("heuristic", ["prior" if int(s[4:]) % 3 == 0 else "none" for s in facts["subject"]])


def test_known_facts_are_genuine_by_default_and_all_on_request():
    from trl_selfdistill.knowledge.splits import monitor_splits

    splits = build_splits(labelled(), train_size=12, heldout_size=10, unknown_share=0.25, seed=0)
    for known in (splits.train_known, splits.heldout, splits.control):
        assert set(known["heuristic"]) == {"none"}
    assert "prior" in build_splits(labelled(), train_size=12, heldout_size=20, unknown_share=0.25, seed=0,
                                   heuristics=None).heldout["heuristic"]
    assert set(monitor_splits(labelled()).heldout["heuristic"]) == {"none"}
    assert set(monitor_splits(labelled(), heuristics=None).heldout["heuristic"]) == {"none", "prior"}
    # Too few genuine facts: the error says which labels were kept
    with pytest.raises(ValueError, match="heuristic: none"):
        build_splits(labelled(), train_size=30, heldout_size=30, seed=0)


def test_monitoring_only_heuristic_facts_is_refused_with_the_way_out():
    from trl_selfdistill.knowledge.splits import monitor_splits

    facts = categorised(4).add_column("heuristic", ["copy"] * 8)
    with pytest.raises(ValueError, match="heuristics=None"):
        monitor_splits(facts)


def test_training_known_facts_can_follow_other_labels_than_the_held_out_set():
    facts = labelled(90)
    splits = build_splits(facts, train_size=10, heldout_size=20, unknown_share=0.5, seed=0,
                          train_heuristics=("prior",))
    assert set(splits.heldout["heuristic"]) == {"none"}
    assert set(splits.train_known["heuristic"]) == set(splits.control["heuristic"]) == {"prior"}
    trained = entities(splits.train_known) | entities(splits.train_unknown) | entities(splits.control)
    assert not trained & entities(splits.heldout)
    # the default follows the held-out labels, and unlabelled facts split as before
    same = build_splits(facts, train_size=10, heldout_size=20, unknown_share=0.5, seed=0)
    assert set(same.train_known["heuristic"]) == {"none"}
    plain = build_splits(categorised(), train_size=12, heldout_size=10, unknown_share=0.25, seed=1,
                         train_heuristics=("prior",))
    assert plain.heldout["id"] == build_splits(categorised(), train_size=12, heldout_size=10, unknown_share=0.25,
                                               seed=1).heldout["id"]


def test_concatenating_labelled_and_unlabelled_sets_is_refused():
    from trl_selfdistill.knowledge.splits import concatenate_facts

    assert "heuristic" in concatenate_facts([labelled(4), labelled(6)]).column_names
    assert "heuristic" not in concatenate_facts([categorised(4), categorised(6)]).column_names
    with pytest.raises(ValueError, match="no heuristic labels"):
        concatenate_facts([labelled(4), categorised(6)])
