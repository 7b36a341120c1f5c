"""Training and held-out sets: a Known + Unknown training mix, a Known-only control, held-out Known facts.

Held-out facts share no entity (subject) with any training fact, so held-out accuracy measures knowledge the
fine-tuning never touched directly: its drop is forgetting. Known facts (held-out, training and control) are genuine
(`heuristic` = `none`) by default when the facts carry heuristic labels: a fact the model answers by copying from the
question or by a default answer measures no knowledge of its entity (see `heuristics`).
"""

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from datasets import Dataset, concatenate_datasets

from .facts import FACT_COLUMNS, normalize_answer
from .heuristics import GENUINE

KNOWN_CATEGORIES = ("HighlyKnown", "MaybeKnown")
GENUINE_ONLY = (GENUINE,)


def known_facts(facts: Dataset, categories: Sequence[str], heuristics: Sequence[str] | None = GENUINE_ONLY) -> Dataset:
    """The facts of `categories` whose heuristic label is one of `heuristics` (None, or no label column: any)."""
    known = facts.filter(lambda c: c in categories, input_columns="category")
    if heuristics is None or "heuristic" not in known.column_names:
        return known
    return known.filter(lambda h: h in heuristics, input_columns="heuristic")


def entity_of(fact: dict) -> str:
    """The entity a fact is about: its normalised subject, or its question when the subject is unknown."""
    return normalize_answer(fact["subject"] or fact["question"])


def check_disjoint(train_sets: Iterable[Dataset], heldout: Dataset) -> None:
    """Raise if a held-out fact is about an entity that a training fact is about."""
    trained = {entity_of(fact) for facts in train_sets for fact in facts}
    shared = [fact["question"] for fact in heldout if entity_of(fact) in trained]
    if shared:
        raise ValueError(
            f"{len(shared)} held-out facts are about entities the training facts cover (e.g. {shared[:3]}). Held-out "
            "facts must be about entities never trained on: build the sets with `build_splits`, or drop those facts "
            "from the held-out set."
        )


@dataclass
class KnowledgeSplits:
    """The fact sets a forgetting experiment trains and evaluates on; validated on construction."""

    train_known: Dataset
    train_unknown: Dataset
    heldout: Dataset
    control: Dataset | None = None

    def __post_init__(self):
        if len(self.heldout) == 0:
            raise ValueError("The held-out set is empty: forgetting is measured on it. Give it Known facts.")
        if "category" in self.heldout.column_names and not set(self.heldout["category"]) & set(KNOWN_CATEGORIES):
            raise ValueError(
                f"The held-out set has no Known facts (categories: {sorted(set(self.heldout['category']))}), so "
                "there is nothing to forget. Use HighlyKnown (or MaybeKnown) facts of the initial model."
            )
        trained = [self.train_known, self.train_unknown] + ([self.control] if self.control is not None else [])
        check_disjoint(trained, self.heldout)

    @property
    def sizes(self) -> dict[str, int]:
        return {
            "train_known": len(self.train_known),
            "train_unknown": len(self.train_unknown),
            "heldout_known": len(self.heldout),
        }

    def train(self, seed: int = 0) -> Dataset:
        """The training facts (Known and Unknown), shuffled."""
        return concatenate_facts([self.train_known, self.train_unknown], labels=False).shuffle(seed=seed)

    def known_only(self) -> "KnowledgeSplits":
        """The splits of the Known-only control run: the control set in place of the mix, the same held-out set."""
        if self.control is None:
            raise ValueError("These splits have no control set: build them with `build_splits(..., control=True)`.")
        return KnowledgeSplits(self.control, self.train_unknown.select([]), self.heldout)


def build_splits(
    facts: Dataset,
    *,
    train_size: int,
    heldout_size: int,
    unknown_share: float = 0.5,
    new_facts: Dataset | None = None,
    known_categories: Sequence[str] = ("HighlyKnown",),
    unknown_categories: Sequence[str] = ("Unknown",),
    control: bool = True,
    control_size: int | Literal["available"] | None = None,
    heuristics: Sequence[str] | None = GENUINE_ONLY,
    train_heuristics: Sequence[str] | None | Literal["same"] = "same",
    seed: int = 0,
) -> KnowledgeSplits:
    """
    Split categorised `facts` (the output of `probe`) into `train_size` training facts, a `unknown_share` of them
    Unknown, and `heldout_size` held-out Known facts about other entities. The Unknown facts come from `new_facts`
    when given (e.g. `synthetic_facts`), else from `facts`. With `control`, also a Known-only set of `control_size`
    facts (default `train_size`; `"available"`: every Known fact left, up to `train_size`), a superset of the training
    Known facts, disjoint from the held-out entities too. Known facts are those of `known_categories` whose
    `heuristic` label is in `heuristics` (default: genuine only; None: any; unlabelled facts: any); the training and
    control Known facts may follow other labels (`train_heuristics`, default the same), e.g. heuristic ones, to see
    what a mix of copy and default-answer facts does to genuine held-out knowledge.
    """
    if "category" not in facts.column_names:
        raise ValueError("The facts have no `category` column: categorise them first with `probe`.")
    if not 0 <= unknown_share <= 1:
        raise ValueError(f"unknown_share={unknown_share} must be a share between 0 and 1.")
    num_unknown = round(train_size * unknown_share)
    num_known = train_size - num_unknown
    train_heuristics = heuristics if train_heuristics == "same" else train_heuristics
    known = known_facts(facts, known_categories, heuristics)
    if train_heuristics != heuristics and "heuristic" in facts.column_names:
        # every Known fact of either kind, each usable where its label allows
        known = known_facts(facts, known_categories, None)
        labels = known["heuristic"]
        heldout_ok = [heuristics is None or label in heuristics for label in labels]
        train_ok = [train_heuristics is None or label in train_heuristics for label in labels]
    else:
        heldout_ok = train_ok = [True] * len(known)
    if new_facts is None:
        unknown = facts.filter(lambda c: c in unknown_categories, input_columns="category")
    else:
        unknown = new_facts.remove_columns([c for c in ("category",) if c in new_facts.column_names])
        unknown = unknown.add_column("category", ["Unknown"] * len(unknown))

    rng = random.Random(seed)
    groups = defaultdict(list)
    for i, fact in enumerate(known.select_columns(["subject", "question"])):
        groups[entity_of(fact)].append(i)
    entities = sorted(groups)
    rng.shuffle(entities)
    heldout_indices, train_indices, heldout_entities = [], [], set()
    for entity in entities:
        if len(heldout_indices) < heldout_size and any(heldout_ok[i] for i in groups[entity]):
            heldout_indices += [i for i in groups[entity] if heldout_ok[i]]
            heldout_entities.add(entity)
        else:
            train_indices += [i for i in groups[entity] if train_ok[i]]
    # The last held-out entity may overshoot: its surplus facts are dropped, never trained on
    heldout_indices = heldout_indices[:heldout_size]
    rng.shuffle(train_indices)
    if control_size == "available":
        control_size = max(num_known, min(train_size, len(train_indices)))
    control_size = train_size if control_size is None else control_size
    if control and control_size < num_known:
        raise ValueError(f"control_size={control_size} is smaller than the {num_known} Known facts of the mix, which "
                         "the control contains: raise it or lower `train_size`.")
    needed = control_size if control else num_known
    if len(heldout_indices) < heldout_size or len(train_indices) < needed:
        raise ValueError(
            f"{len(known)} Known facts ({', '.join(known_categories)}"
            f"{'; heuristic: ' + ', '.join(heuristics) if heuristics and 'heuristic' in facts.column_names else ''}) "
            f"cannot fill {heldout_size} held-out facts plus {needed} training Known facts"
            f"{' (the control set)' if control else ''} with disjoint entities. Lower `heldout_size` or `train_size`, "
            "probe more facts, widen `known_categories` or `heuristics`, or pass `control=False`."
        )

    unknown_indices = [i for i, fact in enumerate(unknown) if entity_of(fact) not in heldout_entities]
    rng.shuffle(unknown_indices)
    if len(unknown_indices) < num_unknown:
        raise ValueError(
            f"Only {len(unknown_indices)} Unknown facts about non-held-out entities, but {num_unknown} are needed "
            f"({unknown_share:.0%} of {train_size}). Lower `unknown_share` or `train_size`, or pass more `new_facts`."
        )
    return KnowledgeSplits(
        train_known=known.select(train_indices[:num_known]),
        train_unknown=unknown.select(unknown_indices[:num_unknown]),
        heldout=known.select(heldout_indices),
        control=known.select(train_indices[:control_size]) if control else None,
    )


def concatenate_facts(sets: list[Dataset], labels: bool = True) -> Dataset:
    """Concatenate fact sets on the columns they share: the fact columns, `category`, and with `labels` the heuristic
    labels, which must then be on every set or none (without `labels` they are dropped)."""
    labelled = ["heuristic" in facts.column_names for facts in sets]
    if labels and any(labelled) and not all(labelled):
        raise ValueError(
            f"{labelled.count(False)} of {len(sets)} fact sets carry no heuristic labels while the others do, so "
            "their facts could not be told genuine or not. Label them too (`knowledge.probe.label_with_model`, or "
            "probe them again), or drop the `heuristic` column from all."
        )
    wanted = [*FACT_COLUMNS, "category", *(("heuristic", "defaults") if labels else ())]
    columns = [c for c in wanted if all(c in facts.column_names for facts in sets)]
    return concatenate_datasets([facts.select_columns(columns) for facts in sets])


def monitor_splits(
    facts: Dataset,
    *,
    heldout_size: int | None = None,
    known_categories: Sequence[str] = KNOWN_CATEGORIES,
    heuristics: Sequence[str] | None = GENUINE_ONLY,
    seed: int = 0,
) -> KnowledgeSplits:
    """
    Splits for monitoring a run on the user's own data: no training facts, and up to `heldout_size` (None: all)
    of the categorised `facts` (the output of `probe`) that the model knows, in a seeded random order, genuine ones
    only by default (`heuristics`, as in `build_splits`). Raises when it knows none of them.
    """
    if "category" not in facts.column_names:
        raise ValueError("The facts have no `category` column: categorise them first with `probe`.")
    known = known_facts(facts, known_categories, heuristics)
    if len(known) == 0 and len(known_facts(facts, known_categories, None)):
        counts = ", ".join(f"{h}: {n}" for h, n in sorted(Counter(facts["heuristic"]).items()))
        raise ValueError(
            f"Every fact the model knows is answerable by a heuristic ({counts}): copied from the question or the "
            "relation's default answer, which measures no knowledge. Use facts whose answers the model cannot guess, "
            "or pass `heuristics=None` to monitor them anyway."
        )
    if len(known) == 0:
        counts = ", ".join(f"{c}: {n}" for c, n in sorted(Counter(facts["category"]).items()))
        raise ValueError(
            f"The model knows none of the {len(facts)} facts ({counts}), so there is no knowledge whose forgetting "
            "could be measured. Use a larger or easier fact set (e.g. `curated`, or more rows of "
            "`entityquestions-dev`), or a larger model."
        )
    known = known.shuffle(seed=seed)
    if heldout_size is not None:
        known = known.select(range(min(heldout_size, len(known))))
    return KnowledgeSplits(train_known=known.select([]), train_unknown=known.select([]), heldout=known)
