"""What a study writes: its tables (`study_table`, `frontier_table`, `relation_table`, `run_table`), its plots, and
`combine`, which builds one study from seeds run separately and writes it (`write_outputs`).
"""

import json
from collections.abc import Sequence
from pathlib import Path

from .knowledge.results import MethodResult, SeedResult
from .study import BASELINE, FRONTIER_TARGETS, frontier_by_step, heldout_start, make_study, summarize

SEED_RESULTS = "seed_results.json"


def combine(paths: Sequence[str | Path], out: str | Path, methods: Sequence[str] | None = None) -> dict:
    """
    One study from seeds run separately (in parallel processes or on other machines), or from methods added to a
    seed later: each path is a `seed_results.json` or an output folder of `run_study` (its `results.json`); writes
    the study's outputs in `out`. `methods` defaults to every method any seed ran.
    """
    per_seed, settings = [], {}
    for path in map(Path, paths):
        file = path if path.is_file() else path / SEED_RESULTS
        if not file.is_file():
            file = path / "results.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{path}: no {SEED_RESULTS} or results.json. Pass the output folders of runs "
                f"that finished at least one method (or their {SEED_RESULTS} files)."
            )
        data = json.loads(file.read_text())
        if "per_seed" in data:
            per_seed += data["per_seed"]
            settings = settings or data.get("settings", {})
        else:
            per_seed.append(data)
    study = make_study(_merge_seeds(per_seed), methods, settings)
    write_outputs(study, Path(out))
    return study



def _merge_seeds(per_seed: Sequence[SeedResult]) -> list[dict]:
    """One entry per seed: runs of the same seed from separate invocations (e.g. methods added later) are merged
    when they share the splits and S's held-out answers, i.e. the same snapshot; a method given twice is refused."""
    merged: dict[int, dict] = {}
    for seed in per_seed:
        first = merged.get(seed["seed"])
        if first is None:
            merged[seed["seed"]] = {**seed, "runs": dict(seed["runs"])}
            continue
        same_start = heldout_start(first) == heldout_start(seed)
        if first["splits"] != seed["splits"] or not same_start:
            raise ValueError(
                f"Seed {seed['seed']} appears twice with different splits or snapshot answers: combine "
                "results of the same protocol settings only."
            )
        if repeated := set(first["runs"]) & set(seed["runs"]):
            raise ValueError(f"Seeds repeat: seed {seed['seed']} has {sorted(repeated)} twice. Combine each run once.")
        first["runs"].update(seed["runs"])
        first["heldout_relations"] = first.get("heldout_relations") or seed.get("heldout_relations")
    return [merged[s] for s in sorted(merged)]


def _collapse(cell: dict | None) -> str:
    """`k of n (x%)`: lost held-out facts (all seeds) that the model now answers with a default answer."""
    if cell is None or not cell["lost"]:
        return "–"
    return f"{cell['lost_to_default']} of {cell['lost']} ({100 * cell['share']:.0f}%)"


def _interval(cell: dict | None, percent: bool = True, signed: bool = False, spec: str = ".3f") -> str:
    """`mean [low, high]`: in percent with one decimal, or as plain numbers formatted with `spec`; – when empty."""
    if cell is None or cell.get("mean") is None:
        return "–"
    scale, unit = (100, "%") if percent else (1, "")
    sign = "+" if signed else ""
    text = f"{scale * cell['mean']:{sign}.1f}{unit}" if percent else f"{cell['mean']:{spec}}"
    if cell.get("low") is not None:
        if percent:
            text += f" [{scale * cell['low']:{sign}.1f}, {scale * cell['high']:{sign}.1f}]"
        else:
            text += f" [{cell['low']:{spec}}, {cell['high']:{spec}}]"
    return text


def _paired(difference: dict | None) -> str:
    """A paired SFT − method reading at a plasticity target, with the number of seeds it pairs; – when none."""
    if difference is None or difference["mean"] is None:
        return "–"
    return _interval(difference, signed=True) + f" (n={difference['n']})"


def study_table(study: dict) -> str:
    """Per method, at the end of training: forgetting, new-fact accuracy, paired difference to SFT, cost."""
    lines = [
        "| method | seeds | relative forgetting [95% CI] | the same, mean of the last 3 evaluations | new-fact acc. "
        "[95% CI] | SFT − method [95% CI] | the same, last 3 | facts kept only by method / only by SFT (p) | "
        "lost facts now a default answer | s/step | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in study["summary"].values():
        facts = row.get("vs_sft_facts")
        facts_text = f"{facts['method_only']} / {facts['sft_only']} (p={facts['p_value']:.3f})" if facts else "–"
        memory = row["peak_memory_mb"]["mean"]
        lines.append(
            f"| {row['title']} | {len(row['seeds'])} | {_interval(row['forgetting'])} | "
            f"{_interval(row.get('forgetting_last_k'))} | {_interval(row['new_fact_accuracy'], percent=False)} | "
            f"{_interval(row.get('vs_sft'), signed=True)} | {_interval(row.get('vs_sft_last_k'), signed=True)} | "
            f"{facts_text} | {_collapse(row.get('collapse'))} | {row['s_per_step']['mean']:.2f} | "
            f"{'–' if memory is None else f'{memory:.0f} MB'} |"
        )
    return "\n".join(lines)


def per_seed_table(study: dict) -> str:
    """Per seed and method, issue #30's view: forgetting and the paired difference to SFT within the seed (intervals
    over its held-out facts), new-fact accuracy, the facts kept by one side only, and the collapse diagnostic."""
    lines = [
        "| seed | method | relative forgetting [95% CI] | new-fact acc. | SFT − method [95% CI] | facts kept only by "
        "method / only by SFT | lost facts now a default answer |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for seed in study["per_seed"]:
        for row in summarize([seed]).values():
            facts, new = row.get("vs_sft_facts"), (row["new_fact_accuracy"] or {}).get("mean")
            kept = f"{facts['method_only']} / {facts['sft_only']}" if facts else "–"
            lines.append(
                f"| {seed['seed']} | {row['title']} | {_interval(row['forgetting'])} | "
                f"{'–' if new is None else f'{new:.3f}'} | {_interval(row.get('vs_sft'), signed=True)} | {kept} | "
                f"{_collapse(row.get('collapse'))} |"
            )
    return "\n".join(lines)


def frontier_table(study: dict) -> str:
    """Per method and target new-fact accuracy: forgetting where the curve reaches it, and SFT − method there."""
    targets = list(next(iter(study["frontier"].values())))
    header = (
        "| method | " + " | ".join(f"forgetting at new-fact acc. {t} | SFT − method at {t}" for t in targets) + " |"
    )
    lines = [header, "|---" + "|---:|---:" * len(targets) + "|"]
    for method, by_target in study["frontier"].items():
        cells = []
        for target in targets:
            cell = by_target[target]
            if not cell["reached"]:
                cells += [f"not reached (0/{cell['seeds']} seeds)", "–"]
                continue
            reached = "" if cell["reached"] == cell["seeds"] else f" ({cell['reached']}/{cell['seeds']} seeds)"
            cells += [_interval(cell) + reached, _paired(cell.get("vs_sft"))]
        lines.append(f"| {study['summary'][method]['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drift_table(study: dict) -> str | None:
    """Per method, the paper's mechanism signals over the seeds: hidden-state drift at the middle layer and the
    first-answer-token KL, at the end and at matched new-fact accuracy. None when no run measured them."""
    rows = {m: r["drift"] for m, r in study["summary"].items() if r.get("drift")}
    if not rows:
        return None
    targets = [f"{t:g}" for t in FRONTIER_TARGETS]
    columns = [("representation_drift", "hidden-state drift (1 − cos) at the end")]
    columns += [(f"representation_drift_at_{t}", f"the same at new-fact acc. {t}") for t in targets]
    columns += [("drift_kl", "first-answer-token KL(S ‖ model) at the end")]
    columns += [(f"drift_kl_at_{t}", f"the same at new-fact acc. {t}") for t in targets]
    lines = ["| method | " + " | ".join(c[1] for c in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for method, drift in rows.items():
        cells = [_number(drift.get(key)) for key, _ in columns]
        lines.append(f"| {study['summary'][method]['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(cell: dict | None) -> str:
    """A small positive quantity (drift) with 4 significant digits and its interval, or – when not reached."""
    text = _interval(cell, percent=False, spec=".4g")
    return text if text == "–" or cell["n"] > 1 else text + " (n=1)"


def read_regimes(specs: Sequence[str]) -> dict[str, dict]:
    """`["LABEL=DIR", ...]` → {label: the study in DIR/results.json} (a `combine` or demo output folder)."""
    studies = {}
    for spec in specs:
        label, sep, folder = spec.rpartition("=")
        if not sep or not label.strip():
            raise SystemExit(f"{spec!r}: give each regime as LABEL=DIR, e.g. 'N=200 UUIDs=runs/n200-uuid'.")
        file = Path(folder) / "results.json"
        if not file.is_file():
            raise SystemExit(f"{file}: not found. Combine the regime's seeds first (`--combine DIRS --output_dir "
                             f"{folder}`), then pass that folder.")
        studies[label.strip()] = json.loads(file.read_text())
    return studies


def regime_table(studies: dict[str, dict]) -> str:
    """
    The decision table over regimes (number of new facts, key type...): per regime and method, over its seeds,
    forgetting and new-fact accuracy at the end, the paired SFT − method at the end and at matched new-fact accuracy
    (the Known-only control's row is then SFT's forgetting beyond training itself), and hidden-state drift from S at
    the end and at new-fact accuracy 0.9. `studies` maps a regime's label to its study (`make_study`, `combine`).
    """
    targets = [f"{t:g}" for t in FRONTIER_TARGETS]
    lines = [
        "| regime | method | seeds | relative forgetting [95% CI] | new-fact acc. | SFT − method [95% CI] | "
        + " | ".join(f"SFT − method at new-fact acc. {t}" for t in targets)
        + f" | hidden-state drift | the same at new-fact acc. {targets[-1]} |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(targets) + "---:|---:|",
    ]
    for label, study in studies.items():
        for method, row in study["summary"].items():
            readings = []
            for target in targets:
                cell = study["frontier"][method][target]
                if method == BASELINE:
                    readings.append(f"({_interval(cell)} forgotten)" if cell["reached"] else "not reached")
                elif not cell["reached"]:
                    readings.append(f"not reached (0/{cell['seeds']})")
                else:
                    readings.append(_paired(cell.get("vs_sft")))
            drift = row.get("drift", {})
            new = "–" if row["new_fact_accuracy"] is None else f"{row['new_fact_accuracy']['mean']:.3f}"
            lines.append(
                f"| {label} | {row['title']} | {len(row['seeds'])} | {_interval(row['forgetting'])} | "
                f"{new} | {_interval(row.get('vs_sft'), signed=True)} | "
                + " | ".join(readings)
                + f" | {_number(drift.get('representation_drift'))} | "
                f"{_number(drift.get(f'representation_drift_at_{targets[-1]}'))} |"
            )
    return "\n".join(lines)


def relation_table(study: dict) -> str | None:
    """
    Held-out Known accuracy per relation, pooled over the seeds (facts answered / facts): at S and at the end of each
    method; where forgetting concentrates (e.g. the relations whose template the new facts share). None when the
    seeds do not record their held-out relations.
    """
    if not all(seed.get("heldout_relations") for seed in study["per_seed"]):
        return None
    relations = sorted({r for seed in study["per_seed"] for r in seed["heldout_relations"]})

    def pooled(method: str | None, relation: str) -> str:
        correct = total = 0
        for seed in study["per_seed"]:
            if method is not None and method not in seed["runs"]:
                continue
            run = seed["runs"][method or next(iter(seed["runs"]))]
            answers = run["per_fact"]["heldout_start" if method is None else "heldout_end"]
            for rel, ok in zip(seed["heldout_relations"], answers, strict=True):
                if rel == relation:
                    correct, total = correct + ok, total + 1
        return "–" if not total else f"{correct / total:.2f}"

    counts = {r: sum(seed["heldout_relations"].count(r) for seed in study["per_seed"]) for r in relations}
    methods = study["methods"]
    titles = [study["summary"][m]["title"] for m in methods]
    lines = [
        "| relation | held-out facts (all seeds) | S | " + " | ".join(titles) + " |",
        "|---|---:|---:|" + "---:|" * len(methods),
    ]
    for relation in relations:
        lines.append(
            f"| {relation} | {counts[relation]} | {pooled(None, relation)} | "
            + " | ".join(pooled(m, relation) for m in methods)
            + " |"
        )
    return "\n".join(lines)


def run_table(runs: dict[str, MethodResult]) -> str:
    """One seed's runs: held-out Known at S and at the end, forgetting, new-fact and task accuracy, wall time."""

    def fmt(value):
        return "–" if value is None else f"{value:.3f}"

    lines = [
        "| run | held-out Known: S | end | relative forgetting from S | from peak | new-fact acc. | task acc. | "
        "wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in runs.values():
        final = result["final"]
        from_start, from_peak = final["forgetting_from_start"], final["forgetting_from_peak"]
        lines.append(
            f"| {result['title']} | {fmt(final['heldout_known_initial'])} | {fmt(final['heldout_known_accuracy'])} | "
            f"{'–' if from_start is None else f'{100 * from_start:.1f}%'} | "
            f"{'–' if from_peak is None else f'{100 * from_peak:.1f}%'} | {fmt(final['new_fact_accuracy'])} | "
            f"{fmt(final['task_accuracy'])} | {result['wall_time_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def write_outputs(study: dict, out: Path) -> None:
    """`results.json`, `table.md` (the study table, then each seed's runs), `plot.png` and `frontier.png`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(study, indent=2))
    parts = [
        study_table(study),
        "\nAt matched plasticity (the stability–plasticity curves read at fixed new-fact "
        "accuracies; Student-t intervals over seeds):\n\n" + frontier_table(study),
    ]
    if (drift := drift_table(study)) is not None:
        parts.append("\nThe paper's mechanism, drift from S (mean over seeds, Student-t interval):\n\n" + drift)
    if (relations := relation_table(study)) is not None:
        parts.append(
            "\nHeld-out Known accuracy per relation, pooled over the seeds (a method's column: the seeds that "
            "ran it):\n\n" + relations
        )
    parts.append("\nPer seed (intervals over the seed's held-out facts):\n\n" + per_seed_table(study))
    for seed in study["per_seed"]:
        parts.append(f"\nSeed {seed['seed']}:\n\n" + run_table(seed["runs"]))
    (out / "table.md").write_text("\n".join(parts) + "\n")
    try:
        plot_curves(study, out / "plot.png")
        plot_frontier(study, out / "frontier.png")
    except ImportError:
        pass  # matplotlib is optional outside the `demo` extra


def _styles(methods: Sequence[str]) -> dict[str, dict]:
    """One distinct colour per method (matplotlib's 20-colour `tab20` map), and a dashed line after the first 20."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    return {m: {"color": colours[i % 20], "linestyle": "-" if i < 20 else "--"} for i, m in enumerate(methods)}


def plot_curves(study: dict, path: Path) -> None:
    """Held-out Known and new-fact accuracy over steps, one line per method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(study["methods"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for method in study["methods"]:
        for i, seed in enumerate(s for s in study["per_seed"] if method in s["runs"]):
            result = seed["runs"][method]
            steps = [h["step"] for h in result["history"]]
            style = dict(
                marker="o", markersize=3, alpha=0.8, label=result["title"] if i == 0 else None, **styles[method]
            )
            left.plot(steps, [h["heldout_known_accuracy"] for h in result["history"]], **style)
            if result["history"][0]["new_fact_accuracy"] is not None:
                right.plot(steps, [h["new_fact_accuracy"] for h in result["history"]], **style)
    left.set(title="Held-out Known accuracy (stability)", xlabel="step", ylabel="accuracy")
    right.set(title="New-fact accuracy (plasticity)", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    fig.legend(*left.get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_frontier(study: dict, path: Path) -> None:
    """The stability–plasticity frontier: held-out Known accuracy relative to S against new-fact accuracy. Per method,
    every evaluation of every seed as a thin line, and the mean over its seeds at each evaluation step as a thick line
    with markers (steps that every seed evaluated), one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(study["methods"])
    fig, ax = plt.subplots(figsize=(9, 6))
    for method in study["methods"]:
        curves = []
        for seed in (s for s in study["per_seed"] if method in s["runs"]):
            result = seed["runs"][method]
            initial = result["history"][0]["heldout_known_accuracy"]
            curve = {step: (x, y / initial) for step, (x, y) in frontier_by_step(result).items()} if initial else {}
            if not curve:
                continue
            ax.plot(*zip(*curve.values(), strict=True), linewidth=0.7, alpha=0.3, **styles[method])
            curves.append(curve)
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [[sum(c[step][k] for c in curves) / len(curves) for step in steps] for k in (0, 1)]
        ax.plot(
            *mean,
            linewidth=2,
            marker="o",
            markersize=4,
            label=f"{study['summary'][method]['title']} (mean of {len(curves)})",
            **styles[method],
        )
    for target in FRONTIER_TARGETS:
        ax.axvline(target, color="grey", linestyle=":", linewidth=1)
    ax.set(
        title="Stability–plasticity frontier (thin: each seed; thick: mean over seeds at each evaluation)",
        xlabel="new-fact accuracy",
        ylabel="held-out Known accuracy / accuracy of S",
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
