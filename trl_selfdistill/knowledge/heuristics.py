"""Heuristic labels: which facts a model can answer without knowing the entity they are about.

SliCK counts a fact as Known when the model answers it, but some answers need no knowledge of the entity:

- `copy`: an answer alias stands in the question, on word boundaries after normalisation ("What is the capital of
  Shostka Raion?" → "Shostka").
- `prior`: the answer is one of the relation's default answers, which the model gives whatever the entity. A default
  answer is one the model gives to at least `PRIOR_MODEL_SHARE` of `FICTIONAL_PER_RELATION` fictional entities of the
  relation (asked in the probe's own format and shots), or one that covers at least `PRIOR_SET_SHARE` of the
  relation's facts in the set ("United States of America" for "Which country was [X] created in?").
- `none`: neither; answering it takes knowing the entity. These are the genuine facts forgetting is measured on.

`copy` wins over `prior`. The labels depend only on the facts, the model and the probe's prompts, never on a training
run, so they are fixed before any result.
"""

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from datasets import Dataset

from .facts import normalize_answer

HEURISTICS = ("copy", "prior", "none")
GENUINE = "none"
PRIOR_MODEL_SHARE = 0.1
PRIOR_SET_SHARE = 0.15
FICTIONAL_PER_RELATION = 40
_VOWELS = set("aeiouy")


def copies_answer(question: str, answers: Iterable[str]) -> bool:
    """Whether any normalised alias stands in the normalised question as whole words."""
    padded = f" {normalize_answer(question)} "
    return any(alias and f" {alias} " in padded for alias in map(normalize_answer, answers))


def _split_word(word: str) -> tuple[str, str]:
    """A word cut after its first vowel past the middle's left ("Berga|mo"), so heads and tails recombine."""
    middle = max(1, len(word) // 2)
    for i in range(middle, len(word)):
        if word[i - 1].lower() in _VOWELS and word[i].lower() not in _VOWELS:
            return word[:i], word[i:]
    return word[:middle], word[middle:]


def fictional_subjects(subjects: Iterable[str], n: int, seed: int = 0) -> list[str]:
    """
    `n` distinct entity names that look like `subjects` but are none of them: the first word of one subject is
    replaced by the head of one real first word and the tail of another ("Dubai International Airport" → "Duhan
    International Airport"). Fewer when the subjects do not give `n` new names.
    """
    real = sorted({s for s in subjects if s and s[0].isalpha()})
    taken = {normalize_answer(s) for s in real}
    firsts = sorted({s.split()[0] for s in real if len(s.split()[0]) >= 4})
    if len(firsts) < 2:
        return []
    rng = random.Random(f"fictional:{seed}")
    names: list[str] = []
    for _ in range(50 * n):
        if len(names) == n:
            break
        head, tail = rng.sample(firsts, 2)
        word = _split_word(head)[0] + _split_word(tail)[1].lower()
        rest = rng.choice(real).split()[1:]
        name = " ".join([word, *rest])
        if normalize_answer(name) not in taken:
            taken.add(normalize_answer(name))
            names.append(name)
    return names


def fictional_facts(facts: Dataset, per_relation: int = FICTIONAL_PER_RELATION, seed: int = 0) -> Dataset:
    """Facts about fictional entities for every relation with a template and subjects (no gold answer)."""
    by_relation: dict[str, tuple[str, list[str]]] = {}
    for fact in facts.select_columns(["relation", "template", "subject"]):
        if fact["relation"] and "[X]" in (fact["template"] or "") and fact["subject"]:
            by_relation.setdefault(fact["relation"], (fact["template"], []))[1].append(fact["subject"])
    rows = []
    for relation, (template, subjects) in sorted(by_relation.items()):
        for i, name in enumerate(fictional_subjects(subjects, per_relation, seed)):
            rows.append({"id": f"fictional-{relation}-{i}", "question": template.replace("[X]", name),
                         "relation": relation, "subject": name, "template": template})
    return Dataset.from_list(rows) if rows else Dataset.from_dict(
        {key: [] for key in ("id", "question", "relation", "subject", "template")}
    )


def default_answers(
    facts: Dataset,
    fictional_answers: Mapping[str, Iterable[str]] | None = None,
    *,
    model_share: float = PRIOR_MODEL_SHARE,
    set_share: float = PRIOR_SET_SHARE,
) -> dict[str, list[str]]:
    """
    Relation → its default answers (normalised): the answers the model gave to at least `model_share` of its fictional
    entities (`fictional_answers`: relation → the greedy answers, one per fictional prompt), and the answers (first
    alias) that cover at least `set_share` of the relation's facts in `facts`.
    """
    defaults: dict[str, set[str]] = defaultdict(set)
    for relation, answers in (fictional_answers or {}).items():
        answers = [normalize_answer(a) for a in answers]
        for answer, count in Counter(answers).items():
            if answer and count >= max(2, model_share * len(answers)):
                defaults[relation].add(answer)
    per_relation: dict[str, Counter] = defaultdict(Counter)
    for relation, answers in zip(facts["relation"], facts["answers"], strict=True):
        if relation and answers:
            per_relation[relation][normalize_answer(answers[0])] += 1
    for relation, counts in per_relation.items():
        total = sum(counts.values())
        defaults[relation] |= {a for a, c in counts.items() if a and c >= set_share * total and total >= 10}
    return {relation: sorted(answers) for relation, answers in sorted(defaults.items()) if answers}


def heuristic_label(question: str, answers: Iterable[str], defaults: Iterable[str]) -> str:
    """`copy`, `prior` or `none` for one fact, given its relation's default answers (normalised)."""
    answers = list(answers)
    if copies_answer(question, answers):
        return "copy"
    if {normalize_answer(a) for a in answers} & set(defaults):
        return "prior"
    return GENUINE


def label_heuristics(facts: Dataset, defaults: Mapping[str, Iterable[str]]) -> Dataset:
    """`facts` with a `heuristic` column and its relation's `defaults` (the answers that made any `prior` label)."""
    facts = facts.remove_columns([c for c in ("heuristic", "defaults") if c in facts.column_names])
    defaults = {relation: sorted(answers) for relation, answers in defaults.items()}
    rows = zip(facts["question"], facts["answers"], facts["relation"], strict=True)
    labels = [heuristic_label(q, answers, defaults.get(relation, ())) for q, answers, relation in rows]
    return facts.add_column("heuristic", labels).add_column(
        "defaults", [defaults.get(relation, []) for relation in facts["relation"]]
    )


def parse_heuristics(text: str, flag: str = "heuristics") -> tuple[str, ...] | None:
    """A command line's labels: `none,prior` → ("none", "prior"); `any` → None (every label)."""
    if text.strip() == "any":
        return None
    labels = tuple(label.strip() for label in text.split(",") if label.strip())
    if not labels or set(labels) - set(HEURISTICS):
        raise ValueError(f"{flag} {text!r}: give some of {', '.join(HEURISTICS)} (comma-separated), or `any`.")
    return labels
