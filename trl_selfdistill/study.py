"""A study over seeds: the per-seed results of `Protocol.run_seed` turned into means, intervals and paired tests.

`make_study` summarises per method, over the seeds that ran it (`summarize`: relative forgetting from S and new-fact
accuracy with two-level bootstrap intervals, the paired difference to plain SFT with its interval and the per-fact
sign test, the mean of the last evaluations, the collapse diagnostic pooled over seeds) and reads the
stability–plasticity curves at fixed new-fact accuracies (`frontier_readings`). Tables and plots: `report`.
"""

from collections.abc import Sequence

from .knowledge.metrics import accuracy
from .knowledge.results import MethodResult, SeedResult
from .knowledge.stats import (
    bootstrap,
    discordant,
    mean_interval,
    reading_at,
    relative_forgetting,
    sign_test,
)

BASELINE = "sft"  # the paired comparisons are against plain SFT
FRONTIER_TARGETS = (0.8, 0.9)


def heldout_start(seed: SeedResult) -> list[int]:
    """Per held-out fact of a seed, whether S answered it (the same in every run of the seed)."""
    return next(iter(seed["runs"].values()))["per_fact"]["heldout_start"]


def make_study(
    per_seed: Sequence[SeedResult], methods: Sequence[str] | None = None, settings: dict | None = None
) -> dict:
    """The study of `per_seed` results (`Protocol.run_seed` outputs): the summary and frontier readings over them.
    `methods` defaults to every method any seed ran; a method run on some seeds only is summarised over those (the
    table says over how many)."""
    seeds = [seed["seed"] for seed in per_seed]
    methods = list(methods or _methods(per_seed))
    if unknown := [m for m in methods if not any(m in seed["runs"] for seed in per_seed)]:
        raise ValueError(f"No seed ran {unknown}: choose among {_methods(per_seed)}.")
    per_seed = [{**seed, "runs": {m: seed["runs"][m] for m in methods if m in seed["runs"]}} for seed in per_seed]
    return {
        "settings": settings or {},
        "seeds": seeds,
        "methods": methods,
        "per_seed": list(per_seed),
        "summary": summarize(per_seed),
        "frontier": frontier_readings(per_seed),
    }



def _per_fact(per_seed: Sequence[SeedResult], method: str, key: str) -> list[list[int]]:
    return [seed["runs"][method]["per_fact"][key] for seed in per_seed]


def summarize(per_seed: Sequence[SeedResult], resamples: int = 2000) -> dict:
    """
    Per method, over the seeds that ran it: relative forgetting from S and new-fact accuracy at the end, each the mean
    over seeds with a two-level bootstrap interval (`knowledge.stats.bootstrap`); and against plain SFT, over the
    seeds that ran both, the paired difference of forgetting (SFT − method: positive = the method forgets less) with
    its interval, and the per-fact sign test over those seeds.
    """
    summary = {}
    for method in _methods(per_seed):
        seeds = [seed for seed in per_seed if method in seed["runs"]]
        start = [heldout_start(seed) for seed in seeds]
        end = _per_fact(seeds, method, "heldout_end")
        new = _per_fact(seeds, method, "new_end")
        runs = [seed["runs"][method] for seed in seeds]
        row = {
            "title": runs[0]["title"],
            "seeds": [seed["seed"] for seed in seeds],
            "forgetting": bootstrap(
                [len(s) for s in start],
                lambda s, idx, start=start, end=end: relative_forgetting(start[s], end[s], idx),
                resamples=resamples,
            ),
            "forgetting_by_seed": [relative_forgetting(start[s], end[s]) for s in range(len(seeds))],
            "heldout_start": mean_interval([accuracy(s) for s in start]),
            "heldout_end": mean_interval([accuracy(e) for e in end]),
            "new_fact_accuracy": (
                bootstrap(
                    [len(n) for n in new],
                    lambda s, idx, new=new: accuracy([new[s][i] for i in idx]),
                    resamples=resamples,
                )
                if all(new)
                else None
            ),
            "s_per_step": mean_interval([run["s_per_step"] for run in runs]),
            "peak_memory_mb": mean_interval(
                [run["peak_memory_mb"] for run in runs if run["peak_memory_mb"] is not None]
            ),
        }
        if drift := _drift(runs):
            row["drift"] = drift
        collapses = [run.get("collapse") for run in runs]
        if all(collapses):  # the held-out facts lost since S that now get a default answer, pooled over seeds
            lost, to_default = sum(c["lost"] for c in collapses), sum(c["lost_to_default"] for c in collapses)
            row["collapse"] = {
                "lost": lost, "lost_to_default": to_default, "share": to_default / lost if lost else None,
                "default_answer_share_end": mean_interval([c["default_answer_share_end"] for c in collapses]),
            }
        last = [seed["runs"][method]["per_fact"].get("heldout_last_k") for seed in seeds]
        if all(values is not None for values in last):  # forgetting from the mean of the last evaluations
            row["forgetting_last_k"] = bootstrap(
                [len(s) for s in start],
                lambda s, idx, start=start, last=last: relative_forgetting(start[s], last[s], idx),
                resamples=resamples,
            )
        paired = [seed for seed in seeds if BASELINE in seed["runs"]]
        if method != BASELINE and paired:
            start = [heldout_start(seed) for seed in paired]
            base, end = _per_fact(paired, BASELINE, "heldout_end"), _per_fact(paired, method, "heldout_end")
            row["vs_sft"] = bootstrap(
                [len(s) for s in start],
                lambda s, idx, start=start, base=base, end=end: _difference(start[s], base[s], end[s], idx),
                resamples=resamples,
            )
            base_last = [seed["runs"][BASELINE]["per_fact"].get("heldout_last_k") for seed in paired]
            last = [seed["runs"][method]["per_fact"].get("heldout_last_k") for seed in paired]
            if all(v is not None for v in base_last + last):
                row["vs_sft_last_k"] = bootstrap(
                    [len(s) for s in start],
                    lambda s, idx, start=start, base=base_last, end=last: _difference(start[s], base[s], end[s], idx),
                    resamples=resamples,
                )
            kept, lost = 0, 0
            for b, e in zip(base, end, strict=True):
                method_only, sft_only = discordant(e, b)
                kept, lost = kept + method_only, lost + sft_only
            row["vs_sft_facts"] = {"method_only": kept, "sft_only": lost, "p_value": sign_test(kept, lost)}
        summary[method] = row
    return summary


DRIFTS = ("representation_drift", "drift_kl")


def _drift(runs: Sequence[MethodResult], targets: Sequence[float] = FRONTIER_TARGETS) -> dict:
    """
    The paper's mechanism signals over the seeds (mean and Student-t interval): `representation_drift` (1 − cos of
    the middle layer's hidden state at the held-out subject's last token, against S) and `drift_kl` (KL(S ‖ model) of
    the first answer token), at the last evaluation and where the stability–plasticity curve first reaches each
    target new-fact accuracy (`_at`: interpolated as the forgetting readings are). Empty when no run measured them.
    """
    out = {}
    for key in DRIFTS:
        ends = [run["history"][-1].get(key) for run in runs if run["history"]]
        if not ends or any(v is None for v in ends):
            continue
        out[key] = mean_interval(ends)
        for target in targets:
            values = [v for run in runs if (v := _at(run, key, target)) is not None]
            out[f"{key}_at_{target:g}"] = mean_interval(values)
    return out


def _at(result: MethodResult, key: str, target: float) -> float | None:
    points = [(h["new_fact_accuracy"], h[key]) for h in result["history"]
              if h["new_fact_accuracy"] is not None and h.get(key) is not None]
    return reading_at(points, target)


def _methods(per_seed: Sequence[SeedResult]) -> list[str]:
    """Every method of any seed, in the order they first appear."""
    return list(dict.fromkeys(method for seed in per_seed for method in seed["runs"]))


def _difference(start, base_end, end, indices) -> float | None:
    a, b = relative_forgetting(start, base_end, indices), relative_forgetting(start, end, indices)
    return None if a is None or b is None else a - b


def frontier_by_step(result: MethodResult) -> dict[int, tuple[float, float]]:
    """Step → (new-fact accuracy, held-out Known accuracy) at each evaluation of a run, in training order."""
    return {
        h["step"]: (h["new_fact_accuracy"], h["heldout_known_accuracy"])
        for h in result["history"]
        if h["new_fact_accuracy"] is not None and h["heldout_known_accuracy"] is not None
    }


def frontier_points(result: MethodResult) -> list[tuple[float, float]]:
    """(new-fact accuracy, held-out Known accuracy) at each evaluation of a run, in training order."""
    return list(frontier_by_step(result).values())


def frontier_readings(per_seed: Sequence[SeedResult], targets: Sequence[float] = FRONTIER_TARGETS) -> dict:
    """
    Per method and target new-fact accuracy: relative forgetting from S where the run's stability–plasticity curve
    first reaches the target (`stats.reading_at`), the mean over the seeds that reach it with a Student-t interval,
    how many seeds reach it, and `vs_sft`: the paired difference SFT − method over the seeds where both reach it
    (mean and Student-t interval; positive = the method forgets less at the same plasticity).
    """
    readings = {}
    for method in _methods(per_seed):
        seeds = [seed for seed in per_seed if method in seed["runs"]]
        by_target = {}
        for target in targets:
            values = {seed["seed"]: _reading(seed["runs"][method], target) for seed in seeds}
            values = {s: v for s, v in values.items() if v is not None}
            cell = {**mean_interval(list(values.values())), "reached": len(values), "seeds": len(seeds)}
            if method != BASELINE:
                base = {
                    seed["seed"]: _reading(seed["runs"][BASELINE], target)
                    for seed in seeds
                    if BASELINE in seed["runs"]
                }
                cell["vs_sft"] = mean_interval([base[s] - v for s, v in values.items() if base.get(s) is not None])
            by_target[f"{target:g}"] = cell
        readings[method] = by_target
    return readings


def _reading(result: MethodResult, target: float) -> float | None:
    """Relative forgetting from the run's first evaluation where its curve reaches new-fact accuracy `target`."""
    heldout = reading_at(frontier_points(result), target)
    initial = result["history"][0]["heldout_known_accuracy"]
    return None if heldout is None or not initial else 1 - heldout / initial
