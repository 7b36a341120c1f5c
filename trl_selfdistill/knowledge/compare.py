"""Base model against fine-tuned model on the same facts: forgetting, learning, and the facts that flipped.

Both models answer every fact in the same format; `base[i]` and `tuned[i]` say whether each answered fact i
correctly. With A the facts the base answers:

- **forgetting** = 1 − Σ tuned / Σ base (`stats.relative_forgetting`): the relative drop of accuracy from the base
  model, the study's "relative forgetting from S" and the callback's `forgetting_from_start`. Its 95% interval
  resamples the facts (`stats.bootstrap` with one seed).
- **lost share** = |A ∩ not tuned| / |A|: the share of the facts the base answers that the fine-tuned model no
  longer answers (forgetting with the facts it gained left out; the same as forgetting when it gained none).
- **learning** = |not A ∩ tuned| / |not A|: the share of the facts the base missed that the fine-tuned model answers.
- **sign test**: the exact two-sided binomial (McNemar) test of lost = gained over the facts that flipped.

With a `heuristic` column (`copy`, `prior`, `none`: facts a model may answer by copying the question or from a
prior rather than from knowledge) or a SliCK `category` column, the same figures are given per value.
"""

from collections.abc import Sequence

from datasets import Dataset

from .metrics import accuracy
from .stats import bootstrap, relative_forgetting, sign_test

GROUP_COLUMNS = ("heuristic", "category")


def _share(numerator: Sequence[bool], denominator: Sequence[bool], indices: Sequence[int]) -> float | None:
    total = sum(denominator[i] for i in indices)
    return None if total == 0 else sum(numerator[i] and denominator[i] for i in indices) / total


def compare_correct(base: Sequence[bool], tuned: Sequence[bool], *, resamples: int = 2000, seed: int = 0) -> dict:
    """Forgetting, lost share, learning (each with its bootstrap interval), flip counts and the sign test."""
    if len(base) != len(tuned):
        raise ValueError(f"{len(base)} base answers for {len(tuned)} fine-tuned answers: score the same facts.")
    if not base:
        raise ValueError("No facts to compare.")
    base, tuned = [bool(ok) for ok in base], [bool(ok) for ok in tuned]
    missed = [not ok for ok in base]
    lost_flags = [not ok for ok in tuned]
    lost = sum(b and not t for b, t in zip(base, tuned, strict=True))
    gained = sum(t and not b for b, t in zip(base, tuned, strict=True))

    def interval(statistic):
        return bootstrap([len(base)], lambda _, idx: statistic(idx), resamples=resamples, seed=seed)

    return {
        "num_facts": len(base),
        "base_accuracy": accuracy(base),
        "tuned_accuracy": accuracy(tuned),
        "forgetting": interval(lambda idx: relative_forgetting(base, tuned, idx)),
        "lost_share": interval(lambda idx: _share(lost_flags, base, idx)),
        "learning": interval(lambda idx: _share(tuned, missed, idx)),
        "base_answered": sum(base),
        "lost": lost,
        "gained": gained,
        "sign_test_p": sign_test(lost, gained),
    }


def compare(facts: Dataset, base: Sequence[bool], tuned: Sequence[bool], *, resamples: int = 2000,
            seed: int = 0) -> dict:
    """`compare_correct` over all facts, and per value of each of `GROUP_COLUMNS` the facts carry."""
    results = {"all": compare_correct(base, tuned, resamples=resamples, seed=seed)}
    for column in GROUP_COLUMNS:
        if column not in facts.column_names:
            continue
        labels = [str(label) for label in facts[column]]
        results[f"by_{column}"] = {
            label: compare_correct([base[i] for i, x in enumerate(labels) if x == label],
                                   [tuned[i] for i, x in enumerate(labels) if x == label],
                                   resamples=resamples, seed=seed)
            for label in sorted(set(labels))
        }
    return results


def flipped(facts: Dataset, base_answers: Sequence[str], tuned_answers: Sequence[str], base: Sequence[bool],
            tuned: Sequence[bool]) -> list[dict]:
    """The facts one model answers and the other does not: `lost` (the base answered) or `gained` (the tuned does)."""
    keep = [c for c in ("relation", *GROUP_COLUMNS) if c in facts.column_names]
    rows = []
    for i, fact in enumerate(facts):
        if bool(base[i]) == bool(tuned[i]):
            continue
        rows.append({"id": fact["id"], "question": fact["question"], "answers": fact["answers"],
                     "flip": "lost" if base[i] else "gained", "base_answer": base_answers[i],
                     "tuned_answer": tuned_answers[i], **{c: fact[c] for c in keep}})
    return rows
