"""The paper's protocol, written once: `trl-selfdistill demo` and `examples/reproduce_paper.py` are front ends to it.

Per seed:

1. **Splits** (`build_splits`): a training mix of `train_size` facts (`unknown_share` of them new), a Known-only
   control of the same size when the facts allow (else every Known fact left), and `heldout_size` held-out Known
   facts about entities no training fact mentions.
2. **Snapshot S** (format learning): plain SFT on the mix's Known facts at `snapshot_learning_rate`, one epoch or
   until converged (`snapshot_max_epochs`); S is every stage-2 run's starting point and the self-distillation teacher.
3. **Stage 2**: each method from S with the same data, steps, batch and schedule; a `ForgettingCallback` evaluates
   task, new-fact and held-out Known accuracy (greedy, zero-shot, in the training format) at step 0 and every
   `eval_steps`. The methods are the entries of `trl_selfdistill.methods.METHODS` (`parse_methods`; `name:value` sets
   a method's parameter: λ, a forgetting budget or μ). The budget methods steer on other Known facts
   (`monitor_splits`), never on the held-out set.
4. **Study** (`run_study`): every seed, then `summarize` (intervals and paired differences, `knowledge.stats`),
   `frontier_readings` (forgetting at matched new-fact accuracy), `results.json`, `table.md`, `plot.png`,
   `frontier.png`.
"""

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from transformers import PrinterCallback, TrainerCallback

from .config import SelfDistillConfig
from .knowledge import AnswerFormat, ForgettingCallback, KnowledgeSplits, build_splits, synthetic_facts
from .knowledge.facts import FACT_COLUMNS
from .knowledge.metrics import accuracy, accuracy_by
from .knowledge.splits import GENUINE_ONLY, entity_of, known_facts
from .knowledge.stats import (
    bootstrap,
    discordant,
    mean_interval,
    reading_at,
    relative_forgetting,
    sign_test,
)
from .memory import MemoryMeter, free_memory
from .methods import Build, Method
from .scripts.utils import count_parameters, save_and_push, sft_baseline
from .trainer import SelfDistillSFTTrainer

NEW_FACTS = ("real", "mixed", "synthetic-name", "synthetic-uuid")
BASELINE = "sft"  # the paired comparisons are against plain SFT
FRONTIER_TARGETS = (0.8, 0.9)
DEFAULT_BUDGET = 0.05  # relative forgetting a `budget` run allows when no value is given
MIN_MONITOR = 20
SEED_RESULTS = "seed_results.json"


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """`"0,1,2"`, `"0-4"` or an int → a list of distinct seeds."""
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        seeds = list(spec)
    elif "-" in spec.strip()[1:]:
        first, last = spec.split("-", 1)
        seeds = list(range(int(first), int(last) + 1))
    else:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={spec!r}: give distinct integers, e.g. `0,1,2` or `0-4`.")
    return seeds


@dataclass
class Protocol:
    """
    Everything the runs share. `args` is the base training config of every stage-2 run (steps, batch, lr, schedule,
    λ, τ, ...); each run replaces `output_dir`, `seed`, `distill_coef` and what its method changes.
    """

    model: str  # name or path of the initial model
    facts: Dataset  # categorised (a `category` column from `probe`)
    args: SelfDistillConfig
    fmt: AnswerFormat = field(default_factory=AnswerFormat)
    train_size: int = 200
    heldout_size: int = 150
    unknown_share: float = 0.5
    new_facts: str = "mixed"
    known_categories: tuple[str, ...] = ("HighlyKnown",)
    heuristics: tuple[str, ...] | None = GENUINE_ONLY  # heuristic labels of the Known facts used (None: any)
    train_heuristics: tuple[str, ...] | None | str = "same"  # the training Known facts' labels, if other
    eval_steps: int | None = 20
    snapshot_learning_rate: float | None = None
    # Format learning runs up to this many epochs, stopping once the monitor facts' accuracy gains less than
    # `snapshot_min_gain` over an epoch (1: one epoch, no monitor)
    snapshot_max_epochs: int = 1
    snapshot_min_gain: float = 0.01
    lora_lr_scale: float = 10.0
    lora_rank: int = 16
    budget_defaults: dict = field(default_factory=dict)  # ForgettingBudgetCallback keywords but `mode`
    budget_monitor_size: int = 150  # Known facts the budget steers on (`monitor_splits`)
    peer_options: dict = field(default_factory=dict)  # peer kind → keywords of its factory
    base_name: str | None = None  # what the saved model's card names as the base model
    save_method: str | None = "selfdistill"  # the run whose model and card are saved (first seed only)
    dataset_name: str = "trl-selfdistill facts"  # what the saved run's card names as its data
    log: Callable[[str], None] = print
    progress: "StudyProgress" = field(default_factory=lambda: StudyProgress())

    def __post_init__(self):
        if self.new_facts not in NEW_FACTS:
            raise ValueError(f"new_facts={self.new_facts!r}: choose among {', '.join(NEW_FACTS)}.")
        if "category" not in self.facts.column_names:
            raise ValueError("The facts have no `category` column: categorise them first with `probe`.")
        if "mode" in self.budget_defaults:
            raise ValueError(
                "`budget_defaults` sets no `mode`: the method picks it (`budget`: adapt, `budget_stop`: "
                "adapt_or_stop, `stop_at_budget`: stop). Remove `mode` and choose the method instead."
            )

    # ---- 1. splits ------------------------------------------------------------------------------------------------
    def splits(self, seed: int, control: bool = True) -> KnowledgeSplits:
        """The seed's splits; the control has the mix's size when enough Known facts are left (else all of them)."""
        count = round(self.train_size * self.unknown_share)
        splits = build_splits(
            self.facts,
            train_size=self.train_size,
            heldout_size=self.heldout_size,
            unknown_share=self.unknown_share,
            new_facts=self._new_facts(count, seed),
            known_categories=self.known_categories,
            heuristics=self.heuristics,
            train_heuristics=self.train_heuristics,
            control=control,
            control_size="available",
            seed=seed,
        )
        if control and len(splits.control) < self.train_size:
            self.log(
                f"Known-only control: {len(splits.control)} facts, fewer than the mix's {self.train_size} "
                "(no more Known facts besides the held-out set): it makes more passes over its facts."
            )
        return splits

    def _new_facts(self, count: int, seed: int) -> Dataset | None:
        """The new facts of the mix (None: the probed Unknown facts)."""
        if self.new_facts == "real":
            return None
        if self.new_facts != "mixed":
            return synthetic_facts(count, keys=self.new_facts.split("-")[1], relation="capital", seed=seed)
        # About half real Unknown facts, half fictional capitals and authors (a few spare of each, since
        # build_splits drops new facts about held-out entities)
        real = self.facts.filter(lambda c: c == "Unknown", input_columns="category").shuffle(seed=seed)
        num_real = min(count // 2 + 8, len(real))
        fictional = [
            synthetic_facts(n, keys="name", relation=relation, seed=seed)
            for relation, n in (("capital", count // 4 + 4), ("author", count // 4 + 4))
        ]
        return concatenate_datasets([real.select(range(num_real)).select_columns(list(FACT_COLUMNS)), *fictional])

    def monitor_splits(self, splits: KnowledgeSplits, seed: int) -> KnowledgeSplits:
        """
        Known facts for a forgetting budget to steer on: up to `budget_monitor_size` of them, about entities that
        neither the training facts, the control nor the held-out set mention, so the held-out set still measures
        the budget run without bias.
        """
        used = {
            entity_of(f)
            for facts in (
                splits.train_known,
                splits.train_unknown,
                splits.heldout,
                splits.control if splits.control is not None else splits.heldout,
            )
            for f in facts.select_columns(["subject", "question"])
        }
        known = known_facts(self.facts, self.known_categories, self.heuristics)
        free = [i for i, f in enumerate(known.select_columns(["subject", "question"])) if entity_of(f) not in used]
        random.Random(f"monitor:{seed}").shuffle(free)
        if len(free) < MIN_MONITOR:
            raise ValueError(
                f"Only {len(free)} Known facts are left besides the splits for the budget to steer on "
                f"(at least {MIN_MONITOR} are needed): lower `heldout_size` or `train_size`, or probe more "
                "facts."
            )
        monitor = known.select(free[: self.budget_monitor_size])
        return KnowledgeSplits(monitor.select([]), monitor.select([]), monitor)

    # ---- 2. snapshot ------------------------------------------------------------------------------------------------
    def snapshot(self, splits: KnowledgeSplits, seed: int, out: Path) -> tuple[str, list[dict]]:
        """
        Stage 1: plain SFT on the mix's Known facts, saved in `out/snapshot` (model and tokenizer): one epoch, or up
        to `snapshot_max_epochs` until converged, i.e. until an epoch raises the accuracy on other Known facts (the
        budget's `monitor_splits`, never the held-out set) by less than `snapshot_min_gain`. Returns the folder and
        the monitor's curve (step, accuracy; empty for one epoch).
        """
        lr = self.snapshot_learning_rate or self.args.learning_rate
        epochs = self.snapshot_max_epochs
        self.log(f"Stage 1: format learning, {'up to ' if epochs > 1 else ''}{epochs} epoch(s) of plain SFT on "
                 f"{len(splits.train_known)} Known facts (lr {lr})")
        dataset = self.fmt.training_dataset(splits.train_known.shuffle(seed=seed))
        run_args = self._run_args(
            out / "snapshot", seed, distill_coef=0.0, num_train_epochs=epochs, max_steps=-1, learning_rate=lr
        )
        trainer = SelfDistillSFTTrainer(model=self.model, args=run_args, train_dataset=dataset)
        trainer.remove_callback(PrinterCallback)
        monitor = None
        if epochs > 1:
            per_epoch = -(-len(dataset) // (run_args.per_device_train_batch_size * run_args.world_size
                                            * run_args.gradient_accumulation_steps))
            monitor = ForgettingCallback(self.monitor_splits(splits, seed), fmt=self.fmt, eval_steps=per_epoch,
                                         drift_size=0).attach(trainer)
            trainer.add_callback(_Plateau(monitor, self.snapshot_min_gain, self.log))
        trainer.train()
        trainer.save_model()
        self.args.distributed_state.wait_for_everyone()
        curve = [] if monitor is None else [
            {"step": e["step"], "monitor_accuracy": e["heldout_known_accuracy"]} for e in monitor.history
        ]
        del trainer
        free_memory()
        return str(out / "snapshot"), curve

    # ---- 3. one stage-2 run -----------------------------------------------------------------------------------------
    def run(
        self,
        method: Method,
        splits: KnowledgeSplits,
        snapshot: str,
        seed: int,
        out: Path,
        baseline: dict | None = None,
        save: bool = False,
    ) -> dict:
        """One method from the snapshot: the `ForgettingCallback` results plus cost and per-relation numbers."""
        run_splits = splits.known_only() if method.spec.control else splits
        self.log(f"\nStage 2, seed {seed}: {method.title} — {run_splits.sizes}")
        run_out = out / method.name.replace(":", "_")
        # From the trainer's construction on (its teacher copy or θ₀ counts); the sampler stops however this ends
        with MemoryMeter() as memory:
            trainer = self.trainer(method, run_splits, snapshot, seed, run_out, push=save and self.args.push_to_hub)
            if self.base_name:
                trainer.model.config._name_or_path = self.base_name  # the card names the base, not the snapshot folder
            teacher = getattr(trainer, "teacher", None)
            forgetting = ForgettingCallback(
                run_splits, fmt=self.fmt, eval_steps=self.eval_steps, teacher=teacher, baseline=baseline
            ).attach(trainer)
            trainer.add_callback(_Progress(forgetting, f"seed {seed} · {method.title}", self.progress, self.log))
            trainer.remove_callback(PrinterCallback)  # the progress lines say it, without raw metric dicts
            budget = monitor = None
            if method.spec.budget_mode:
                # The budget steers on its own Known facts, disjoint from the held-out set it is judged on
                from .budget import ForgettingBudgetCallback

                monitor = ForgettingCallback(
                    self.monitor_splits(splits, seed),
                    fmt=self.fmt,
                    drift_size=0,
                    eval_steps=max(1, (self.eval_steps or 16) // 2),
                ).attach(trainer)
                options = {"budget": DEFAULT_BUDGET, **self.budget_defaults, "mode": method.spec.budget_mode}
                if method.value is not None:
                    options["budget"] = method.value
                budget = ForgettingBudgetCallback(forgetting=monitor, **options).attach(trainer)
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
        self.progress.run_done(wall)
        steps = trainer.state.global_step
        if save:  # model (or adapter), forgetting_results.json and card; uploaded with `push_to_hub`
            save_and_push(trainer, self.dataset_name, self.log)
        results = forgetting.results()
        heldout_end = results["per_fact"]["heldout_end"]
        result = {
            **results,
            "method": method.name,
            "title": method.title,
            "seed": seed,
            "wall_time_s": wall,
            "steps": steps,
            "s_per_step": (wall - forgetting.eval_seconds - (monitor.eval_seconds if monitor else 0)) / max(steps, 1),
            "peak_memory_mb": memory.used_mb,
            "trainable_parameters": count_parameters(trainer.model)[0],
            "heldout_by_relation": accuracy_by(splits.heldout["relation"], heldout_end),
            "heldout_by_relation_start": accuracy_by(splits.heldout["relation"], results["per_fact"]["heldout_start"]),
            "budget": None
            if budget is None
            else {
                "budget": budget.budget,
                "mode": budget.mode,
                "history": budget.history,
                "stopped_at": budget.stopped_at,
                "monitor_size": len(monitor.splits.heldout),
                "monitor_final": monitor.final,
            },
        }
        del trainer, forgetting, budget, monitor
        free_memory()
        return result

    def trainer(
        self, method: Method, splits: KnowledgeSplits, snapshot: str, seed: int, out: Path, push: bool = False
    ):
        """The untrained trainer of one stage-2 run of `method` from `snapshot` on `splits` (the mix, or for
        `known_only` the caller's `splits.known_only()`), with the protocol's settings; `run` adds the evaluation
        callbacks (and a budget's) and trains it. `benchmarks/method_cost.py` times it alone."""
        overrides = {**method.spec.overrides(method, self), "push_to_hub": push}
        if method.spec.teacher_cache:
            overrides["teacher_cache_dir"] = str(out / "teacher_cache")
        facts = splits.train(seed=seed)
        dataset = self.fmt.training_dataset(facts)
        if method.spec.new_fact_weight is not None:  # per-row weights of the distillation term, by SliCK category
            weights = [method.spec.new_fact_weight if c == "Unknown" else 1.0 for c in facts["category"]]
            dataset = dataset.add_column("distill_weight", weights)
        build = Build(self, method, dataset, snapshot, self._run_args(out, seed, **overrides))
        return method.spec.build(build)

    def _run_args(self, output_dir: Path, seed: int, **overrides) -> SelfDistillConfig:
        overrides = {
            "output_dir": str(output_dir),
            "seed": seed,
            "save_strategy": "no",
            "push_to_hub": False,
            "hub_model_id": self.args.hub_model_id if overrides.get("push_to_hub") else None,
            **overrides,
        }
        if overrides.get("distill_coef") == 0:
            overrides["teacher_cache_dir"] = None  # no teacher, nothing to cache
        return replace(self.args, **overrides)

    # ---- 4. seeds and study -----------------------------------------------------------------------------------------
    def run_seed(self, seed: int, methods: Sequence[Method], out: Path, save: bool = False) -> dict:
        """
        Splits, snapshot and every method for one seed; returns {"seed", "splits", "control", "runs"}, also written
        to `out/seed_results.json` after each run, so an interrupted seed keeps the runs it finished.
        """
        torch.manual_seed(seed)
        splits = self.splits(seed, control=any(m.spec.control for m in methods))
        self.log(
            f"Seed {seed}: splits {splits.sizes}" + (f", control {len(splits.control)}" if splits.control else "")
        )
        snapshot, curve = self.snapshot(splits, seed, out)
        result = {
            "seed": seed,
            "splits": splits.sizes,
            "snapshot_curve": curve,
            "control": None if splits.control is None else len(splits.control),
            "heldout_relations": list(splits.heldout["relation"]),
            "runs": {},
        }
        for method in methods:
            baseline = sft_baseline(result["runs"]) if method.kind == "selfdistill" else None
            result["runs"][method.name] = self.run(
                method, splits, snapshot, seed, out, baseline, save=save and method.name == self.save_method
            )
            if self.args.distributed_state.is_main_process:
                (out / SEED_RESULTS).write_text(json.dumps(result, indent=2))
        return result

    def run_study(
        self, seeds: Sequence[int], methods: Sequence[Method], out: Path, settings: dict | None = None
    ) -> dict:
        """Every seed (`out/seed-<s>` each, `out` itself for a single seed), then the summary; writes the outputs
        (`settings`, the front end's own, go into `results.json` as they are)."""
        start = time.perf_counter()
        out = Path(out)
        self.progress.start(len(seeds) * len(methods))
        per_seed = [
            self.run_seed(seed, methods, out if len(seeds) == 1 else out / f"seed-{seed}", save=i == 0)
            for i, seed in enumerate(seeds)
        ]
        study = make_study(per_seed, [m.name for m in methods], settings)
        study["wall_time_s"] = time.perf_counter() - start
        if self.args.distributed_state.is_main_process:
            write_outputs(study, out)
        return study


def make_study(per_seed: Sequence[dict], methods: Sequence[str] | None = None, settings: dict | None = None) -> dict:
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


def _merge_seeds(per_seed: Sequence[dict]) -> list[dict]:
    """One entry per seed: runs of the same seed from separate invocations (e.g. methods added later) are merged
    when they share the splits and S's held-out answers, i.e. the same snapshot; a method given twice is refused."""
    merged: dict[int, dict] = {}
    for seed in per_seed:
        first = merged.get(seed["seed"])
        if first is None:
            merged[seed["seed"]] = {**seed, "runs": dict(seed["runs"])}
            continue
        same_start = _start(first) == _start(seed)
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


def _start(seed: dict) -> list[int]:
    return next(iter(seed["runs"].values()))["per_fact"]["heldout_start"]


# ---- statistics over seeds ------------------------------------------------------------------------------------------
def _per_fact(per_seed: Sequence[dict], method: str, key: str) -> list[list[int]]:
    return [seed["runs"][method]["per_fact"][key] for seed in per_seed]


def summarize(per_seed: Sequence[dict], resamples: int = 2000) -> dict:
    """
    Per method, over the seeds that ran it: relative forgetting from S and new-fact accuracy at the end, each the mean
    over seeds with a two-level bootstrap interval (`knowledge.stats.bootstrap`); and against plain SFT, over the
    seeds that ran both, the paired difference of forgetting (SFT − method: positive = the method forgets less) with
    its interval, and the per-fact sign test over those seeds.
    """
    summary = {}
    for method in _methods(per_seed):
        seeds = [seed for seed in per_seed if method in seed["runs"]]
        start = [_start(seed) for seed in seeds]
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
            start = [_start(seed) for seed in paired]
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


def _methods(per_seed: Sequence[dict]) -> list[str]:
    """Every method of any seed, in the order they first appear."""
    return list(dict.fromkeys(method for seed in per_seed for method in seed["runs"]))


def _difference(start, base_end, end, indices) -> float | None:
    a, b = relative_forgetting(start, base_end, indices), relative_forgetting(start, end, indices)
    return None if a is None or b is None else a - b


def frontier_by_step(result: dict) -> dict[int, tuple[float, float]]:
    """Step → (new-fact accuracy, held-out Known accuracy) at each evaluation of a run, in training order."""
    return {
        h["step"]: (h["new_fact_accuracy"], h["heldout_known_accuracy"])
        for h in result["history"]
        if h["new_fact_accuracy"] is not None and h["heldout_known_accuracy"] is not None
    }


def frontier_points(result: dict) -> list[tuple[float, float]]:
    """(new-fact accuracy, held-out Known accuracy) at each evaluation of a run, in training order."""
    return list(frontier_by_step(result).values())


def frontier_readings(per_seed: Sequence[dict], targets: Sequence[float] = FRONTIER_TARGETS) -> dict:
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


def _reading(result: dict, target: float) -> float | None:
    """Relative forgetting from the run's first evaluation where its curve reaches new-fact accuracy `target`."""
    heldout = reading_at(frontier_points(result), target)
    initial = result["history"][0]["heldout_known_accuracy"]
    return None if heldout is None or not initial else 1 - heldout / initial


# ---- outputs --------------------------------------------------------------------------------------------------------
def _collapse(cell: dict | None) -> str:
    """`k of n (x%)`: lost held-out facts (all seeds) that the model now answers with a default answer."""
    if cell is None or not cell["lost"]:
        return "–"
    return f"{cell['lost_to_default']} of {cell['lost']} ({100 * cell['share']:.0f}%)"


def _interval(cell: dict | None, percent: bool = True, signed: bool = False) -> str:
    if cell is None or cell.get("mean") is None:
        return "–"
    scale, unit = (100, "%") if percent else (1, "")
    sign = "+" if signed else ""
    text = f"{scale * cell['mean']:{sign}.1f}{unit}" if percent else f"{cell['mean']:.3f}"
    if cell.get("low") is not None:
        low, high = scale * cell["low"], scale * cell["high"]
        text += f" [{low:{sign}.1f}, {high:{sign}.1f}]" if percent else f" [{cell['low']:.3f}, {cell['high']:.3f}]"
    return text


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
            difference = cell.get("vs_sft")
            paired = (
                "–"
                if difference is None or difference["mean"] is None
                else (_interval(difference, signed=True) + f" (n={difference['n']})")
            )
            cells += [_interval(cell) + reached, paired]
        lines.append(f"| {study['summary'][method]['title']} | " + " | ".join(cells) + " |")
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


def run_table(runs: dict) -> str:
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
    if (relations := relation_table(study)) is not None:
        parts.append(
            "\nHeld-out Known accuracy per relation, pooled over the seeds (a method's column: the seeds that "
            "ran it):\n\n" + relations
        )
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


# ---- helpers --------------------------------------------------------------------------------------------------------
class _Plateau(TrainerCallback):
    """Stops format learning at the first epoch-end evaluation that beats the best earlier one by < `min_gain`."""

    def __init__(self, monitor: ForgettingCallback, min_gain: float, log: Callable[[str], None]):
        self.monitor, self.min_gain, self.log = monitor, min_gain, log

    def on_step_end(self, args, state, control, **kwargs):
        history = self.monitor.history
        if len(history) < 2 or history[-1]["step"] != state.global_step:
            return
        accuracies = [entry["heldout_known_accuracy"] for entry in history]
        self.log(f"  format learning, step {state.global_step}: monitor accuracy {accuracies[-1]:.3f}")
        if accuracies[-1] - max(accuracies[:-1]) < self.min_gain:
            self.log(f"  converged at step {state.global_step} (gain < {self.min_gain} over an epoch)")
            control.should_training_stop = True


@dataclass
class StudyProgress:
    """Runs done out of the study's, and their wall times: the study's ETA is the mean run time × the runs left."""

    total: int = 0
    walls: list[float] = field(default_factory=list)

    def start(self, total: int) -> None:
        self.total, self.walls = total, []

    def run_done(self, wall: float) -> None:
        self.walls.append(wall)

    def eta(self, run_left_s: float) -> str:
        """`this run ~X min, study ~Y min` (the study part once a run has finished, when there is a study)."""
        text = f"run ETA {run_left_s / 60:.1f} min"
        later = self.total - len(self.walls) - 1
        if self.walls and later >= 0:
            text += f", study ETA {(run_left_s + later * sum(self.walls) / len(self.walls)) / 60:.0f} min"
        return text


class _Progress(TrainerCallback):
    """One line at each evaluation of a run: where it is, what the held-out and new facts read, and the ETA."""

    def __init__(self, forgetting: ForgettingCallback, name: str, study: StudyProgress, log: Callable[[str], None]):
        self.forgetting, self.name, self.study, self.log = forgetting, name, study, log
        self.begin = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()
        self._report(state)

    def on_step_end(self, args, state, control, **kwargs):
        history = self.forgetting.history
        if history and history[-1]["step"] == state.global_step:
            self._report(state)

    def _report(self, state) -> None:
        entry = self.forgetting.history[-1] if self.forgetting.history else None
        if entry is None:
            return
        done, total = state.global_step, state.max_steps
        elapsed = time.perf_counter() - self.begin
        left = elapsed / done * (total - done) if done else 0.0
        reading = ", ".join(
            f"{label} {entry[key]:.3f}"
            for label, key in (("held-out", "heldout_known_accuracy"), ("new facts", "new_fact_accuracy"))
            if entry.get(key) is not None
        )
        run = len(self.study.walls) + 1
        where = f"run {run}/{self.study.total}" if self.study.total else "run"
        eta = self.study.eta(left) if done else "ETA after the first evaluation"
        self.log(f"  [{where} · {self.name}] step {done}/{total} · {reading} · {eta}")
