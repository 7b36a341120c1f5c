"""Knowledge and forgetting metrics (the paper's three-way split), from one batched greedy evaluation.

- task accuracy: Known training facts (the task/format is learned);
- new-fact accuracy (plasticity): Unknown training facts;
- held-out Known accuracy (stability): Known facts about entities never trained on;
- forgetting: the relative drop of held-out Known accuracy from its peak, (peak − final) / peak, and from the start;
- answered Known accuracy: held-out accuracy on the facts the reference model answered correctly in the evaluation
  format at the start. SliCK "Known" comes from few-shot prompts; a fact the model does not answer zero-shot in the
  evaluation format at step 0 cannot be forgotten in it, so forgetting measured on these facts is the cleaner signal;
- collapse: of the held-out facts answered at the start and lost since, the share now answered with a default answer
  (`default_answers_of`), and the share of all held-out answers that are a default answer. A model that forgets by
  collapsing onto the training mix's common answers shows it here.
"""

from collections import Counter, defaultdict
from collections.abc import Sequence

from datasets import Dataset

from .facts import is_correct, normalize_answer
from .formats import AnswerFormat, Prompt
from .generation import GenerateFn
from .results import Evaluation, Final
from .splits import KnowledgeSplits

# Readings averaged over the last evaluations, so that one noisy evaluation cannot flip a result
LAST_K = 3


def last_k_per_fact(history: Sequence[Sequence[bool]], k: int = LAST_K) -> list[float]:
    """Per fact, the mean correctness over the last `k` evaluations after the first (all of them when fewer)."""
    later = list(history[1:]) or list(history)
    window = later[-k:]
    return [sum(oks) / len(window) for oks in zip(*window, strict=True)]


SET_METRICS = {
    "task_accuracy": "train_known",
    "new_fact_accuracy": "train_unknown",
    "heldout_known_accuracy": "heldout",
}


def score(predictions: Sequence[str], facts: Dataset) -> list[bool]:
    """Exact match (normalised, any alias) of each prediction against its fact's answers."""
    if len(predictions) != len(facts):
        raise ValueError(f"{len(predictions)} predictions for {len(facts)} facts: give one prediction per fact.")
    return [is_correct(prediction, answers) for prediction, answers in zip(predictions, facts["answers"], strict=True)]


def accuracy(correct: Sequence[bool]) -> float | None:
    """Share of correct answers; None for an empty set."""
    return sum(correct) / len(correct) if len(correct) else None


def accuracy_by(groups: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy per group label (e.g. SliCK category or relation)."""
    by_group = defaultdict(list)
    for group, ok in zip(groups, correct, strict=True):
        by_group[group].append(ok)
    return {group: accuracy(oks) for group, oks in sorted(by_group.items())}


def relative_drop(reference: float | None, value: float | None) -> float | None:
    """(reference − value) / reference; None when either is missing or the reference is 0."""
    if reference is None or value is None or reference == 0:
        return None
    return (reference - value) / reference


def answer_zero_shot(generate_fn: GenerateFn, facts: Sequence[Dataset], fmt: AnswerFormat) -> list[list[str]]:
    """Greedy zero-shot answers, in the training format, for several fact sets in one batched call."""
    prompts = [fmt.prompt_for(question) for dataset in facts for question in dataset["question"]]
    outputs = generate_fn(prompts, True, 1)
    answers, start = [], 0
    for dataset in facts:
        answers.append([output[0] for output in outputs[start : start + len(dataset)]])
        start += len(dataset)
    return answers


def answers_for_prompts(generate_fn: GenerateFn, prompts: Sequence[Sequence[Prompt]]) -> list[list[str]]:
    """Per set, the greedy answer to each of its prompts, in one batched call."""
    outputs = generate_fn([prompt for per_set in prompts for prompt in per_set], True, 1)
    answers, start = [], 0
    for per_set in prompts:
        answers.append([output[0] for output in outputs[start : start + len(per_set)]])
        start += len(per_set)
    return answers


def correct_for_prompts(
    generate_fn: GenerateFn, prompts: Sequence[Sequence[Prompt]], facts: Sequence[Dataset]
) -> list[list[bool]]:
    """Per fact of each set: is the greedy answer to its prompt (`prompts[i][j]` asks fact j of set i) correct?"""
    return [score(answers, dataset) for answers, dataset in zip(answers_for_prompts(generate_fn, prompts), facts,
                                                                strict=True)]


def default_answers_of(splits: KnowledgeSplits, min_count: int = 2) -> list[set[str]]:
    """
    Per held-out fact, the answers (normalised) that count as default answers: the most common first alias of each
    relation among the training facts (seen at least `min_count` times), pooled over relations since a mix's common
    answer ("United States of America") can take over another relation's facts; plus the fact's own relation's
    defaults from the probe (its `defaults` column, when present: the model's answers to fictional entities).
    """
    per_relation: dict[str, Counter] = defaultdict(Counter)
    for facts in (splits.train_known, splits.train_unknown):
        # hand-made sets may have no relation column: one relation for all their facts
        relations = facts["relation"] if "relation" in facts.column_names else [""] * len(facts)
        for relation, answers in zip(relations, facts["answers"], strict=True):
            per_relation[relation][normalize_answer(answers[0])] += 1
    common = set()
    for counts in per_relation.values():
        top = max(counts.values())
        if top >= min_count:
            common |= {answer for answer, count in counts.items() if count == top}
    heldout = splits.heldout
    own = heldout["defaults"] if "defaults" in heldout.column_names else [[]] * len(heldout)
    return [common | set(defaults or []) for defaults in own]


COLLAPSE_SHARE = 0.5  # a majority of the lost facts now answered with a default answer ...
COLLAPSE_MIN_LOST = 5  # ... out of at least this many lost facts (fewer: too few to call it)


def default_share(answers: Sequence[str], defaults: Sequence[set[str]]) -> float | None:
    """Share of `answers` that are one of their fact's default answers."""
    hits = [normalize_answer(a) in d for a, d in zip(answers, defaults, strict=True)]
    return accuracy(hits)


def collapse(start: Sequence[bool], end: Sequence[bool], answers: Sequence[str], defaults: Sequence[set[str]]) -> dict:
    """
    Held-out facts right at the start and wrong at the end (`lost`), how many of them now get a default answer, and
    whether that is a collapse (`fired`): at least `COLLAPSE_MIN_LOST` facts lost, and at least `COLLAPSE_SHARE` of
    them to a default answer, i.e. forgetting by the mix's common answers taking over, not by interference between
    facts. The rule was fixed before the studies it is applied to (docs/evaluation.md, "Collapse").
    """
    lost = [i for i, (was, now) in enumerate(zip(start, end, strict=True)) if was and not now]
    to_default = sum(normalize_answer(answers[i]) in defaults[i] for i in lost)
    share = to_default / len(lost) if lost else None
    fired = len(lost) >= COLLAPSE_MIN_LOST and share is not None and share >= COLLAPSE_SHARE
    return {"lost": len(lost), "lost_to_default": to_default, "lost_to_default_share": share, "fired": fired}


def correct_zero_shot(generate_fn: GenerateFn, facts: Sequence[Dataset], fmt: AnswerFormat) -> list[list[bool]]:
    """Per fact of each set: is its greedy zero-shot answer, in the format `fmt`, correct? One batched call."""
    return correct_for_prompts(generate_fn, [[fmt.prompt_for(q) for q in dataset["question"]] for dataset in facts],
                               facts)


def knowledge_metrics(splits: KnowledgeSplits, correct: Sequence[Sequence[bool]], answered=None) -> dict:
    """
    The metrics of `evaluate_knowledge` from the per-fact correctness of the train Known, train Unknown and held-out
    sets (in that order). With `answered` (one flag per held-out fact: answered correctly by the reference model in
    the evaluation format), also `answered_known_accuracy`, the accuracy on those facts only (None when none is).
    """
    metrics = {name: accuracy(ok) for name, ok in zip(SET_METRICS, correct, strict=True)}
    if answered is not None:
        metrics["answered_known_accuracy"] = accuracy(
            [ok for ok, keep in zip(correct[2], answered, strict=True) if keep]
        )
    train_sets, train_correct = (splits.train_known, splits.train_unknown), [*correct[0], *correct[1]]
    if all("category" in facts.column_names for facts in train_sets):
        metrics["per_category"] = accuracy_by([c for facts in train_sets for c in facts["category"]], train_correct)
    else:
        metrics["per_category"] = {}
    return metrics


def evaluate_knowledge(
    generate_fn: GenerateFn, splits: KnowledgeSplits, fmt: AnswerFormat, answered: Sequence[bool] | None = None
) -> dict:
    """
    `task_accuracy`, `new_fact_accuracy`, `heldout_known_accuracy` (None for an empty set) and `per_category`
    (accuracy on the training facts by SliCK category), from one greedy zero-shot pass in the training format; with
    `answered`, also `answered_known_accuracy` (see `knowledge_metrics`).
    """
    sets = [getattr(splits, name) for name in SET_METRICS.values()]
    return knowledge_metrics(splits, correct_zero_shot(generate_fn, sets, fmt), answered)


def forgetting_summary(history: Sequence[Evaluation], per_category: dict[str, float]) -> Final:
    """The `final` block of the results: last evaluation, held-out peak and start, and forgetting from both."""
    last = history[-1]
    heldout = [entry["heldout_known_accuracy"] for entry in history if entry["heldout_known_accuracy"] is not None]
    peak = max(heldout) if heldout else None
    initial = history[0]["heldout_known_accuracy"]
    final = last["heldout_known_accuracy"]
    window = [entry["heldout_known_accuracy"] for entry in (history[1:] or history)][-LAST_K:]
    last_k = None if None in window else sum(window) / len(window)
    return {
        "task_accuracy": last["task_accuracy"],
        "new_fact_accuracy": last["new_fact_accuracy"],
        "heldout_known_accuracy": final,
        "heldout_known_peak": peak,
        "heldout_known_initial": initial,
        "forgetting_from_peak": relative_drop(peak, final),
        "forgetting_from_peak_abs": None if peak is None or final is None else peak - final,
        "forgetting_from_start": relative_drop(initial, final),
        # the mean of the last `LAST_K` evaluations after the first, which one noisy evaluation cannot flip
        "heldout_known_last_k": last_k,
        "forgetting_last_k": relative_drop(initial, last_k),
        # On the held-out facts the reference model answered correctly in the evaluation format (accuracy 1 there at
        # the start), forgetting from the start is 1 − accuracy
        "answered_known_accuracy": last.get("answered_known_accuracy"),
        "answered_known_forgetting": relative_drop(1.0, last.get("answered_known_accuracy")),
        "per_category": per_category,
        "step": last["step"],
    }
