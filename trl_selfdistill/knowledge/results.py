"""The shape of `ForgettingCallback`'s results, defined once: what `forgetting_results.json` holds and what the
protocol, the forgetting budget, the CLI and the model card read.

These are `TypedDict`s, so the results stay plain JSON-ready dicts (saved, combined and re-read across runs as
before) while a type checker and a reader see every key, its type and its meaning in one place.
"""

from typing import NotRequired, TypedDict


class Evaluation(TypedDict, total=False):
    """One evaluation (an entry of `history`). Accuracies are None for an empty set."""

    step: int
    task_accuracy: float | None  # Known training facts
    new_fact_accuracy: float | None  # Unknown training facts (plasticity)
    heldout_known_accuracy: float | None  # held-out Known facts (stability)
    answered_known_accuracy: float | None  # held-out facts answered at the first evaluation
    default_answer_share: float | None  # held-out answers that are a default answer
    heldout_by_heuristic: dict[str, float]  # held-out accuracy per heuristic label, when the facts carry them
    drift_kl: float | None  # KL(teacher ‖ model) on the drift prompts; None without a teacher
    representation_drift: float | None  # hidden-state drift from the first evaluation's model


class Final(TypedDict):
    """The `final` block: the last evaluation, the held-out peak and start, and forgetting from both."""

    task_accuracy: float | None
    new_fact_accuracy: float | None
    heldout_known_accuracy: float | None
    heldout_known_peak: float | None
    heldout_known_initial: float | None
    forgetting_from_peak: float | None  # (peak − final) / peak
    forgetting_from_peak_abs: float | None  # peak − final
    forgetting_from_start: float | None  # (initial − final) / initial
    heldout_known_last_k: float | None  # mean of the last `LAST_K` evaluations after the first
    forgetting_last_k: float | None  # relative drop from the start to that mean
    answered_known_accuracy: float | None
    answered_known_forgetting: float | None  # 1 − answered_known_accuracy
    per_category: dict[str, float]  # accuracy on the training facts by SliCK category
    step: int


class Collapse(TypedDict):
    """Held-out facts lost between the first and last evaluation, and how many went to a default answer."""

    lost: int
    lost_to_default: int
    lost_to_default_share: float | None
    fired: bool  # the collapse rule (`metrics.collapse`)
    default_answer_share_start: float | None
    default_answer_share_end: float | None


class PerFact(TypedDict):
    """Per-fact correctness (0/1, in the order of the splits), for paired statistics over facts."""

    heldout_ids: list[str]
    heldout_start: list[int]
    heldout_end: list[int]
    new_end: list[int]
    heldout_answers_end: list[str]
    heldout_last_k: list[float]  # mean correctness over the last `LAST_K` evaluations after the first


class ForgettingResults(TypedDict):
    """Everything `forgetting_results.json` holds."""

    final: Final | None
    history: list[Evaluation]
    baseline: dict | None  # the reference model's `final`-like readings, when given
    sizes: dict[str, int]  # facts per split
    answered_known: int | None  # held-out facts answered at the first evaluation
    facts: str | None  # the fact set's name or path
    format: dict  # prompt, chat and num_shots of the evaluation format
    run: str | None  # a new id each time training begins
    eval_seconds: float
    probe: dict | None  # how the monitored facts were categorised (monitor mode)
    collapse: Collapse | None
    per_fact: PerFact | None
    # added by `trl-selfdistill eval --record` (`model_card.record_eval`)
    comparison: NotRequired[dict]  # accuracy against the base model on the same facts
    lm_eval: NotRequired[dict]  # lm-eval scores of the model and the base model
    eval: NotRequired[dict]  # what was evaluated: model, base model, facts, format


class MethodResult(ForgettingResults):
    """One protocol run (a method on one seed, `Protocol.run`): its results plus cost and per-relation numbers."""

    method: str  # the method's name, e.g. "selfdistill_tau:2"
    title: str
    seed: int
    wall_time_s: float
    steps: int
    s_per_step: float  # training time per step, evaluations excluded
    peak_memory_mb: float | None
    trainable_parameters: int
    heldout_by_relation: dict[str, float]  # at the last evaluation
    heldout_by_relation_start: dict[str, float]  # at the first
    budget: dict | None  # a forgetting budget's settings, history and stop (budget methods)


class SeedResult(TypedDict):
    """One seed of a protocol study (`Protocol.run_seed`, `seed_results.json`): its splits, snapshot and runs."""

    seed: int
    splits: dict[str, int]  # facts per split
    snapshot_curve: list[dict]  # held-out accuracy of format learning, per epoch
    control: int | None  # control facts, when a control method ran
    heldout_relations: list[str]  # each held-out fact's relation
    runs: dict[str, MethodResult]  # by method name
