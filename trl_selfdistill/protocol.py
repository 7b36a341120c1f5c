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
from .knowledge.metrics import accuracy_by
from .knowledge.results import MethodResult, SeedResult
from .knowledge.splits import GENUINE_ONLY, entity_of, known_facts
from .memory import MemoryMeter, free_memory
from .methods import Build, Method
from .report import SEED_RESULTS, write_outputs
from .scripts.utils import count_parameters, save_and_push, sft_baseline
from .study import make_study
from .trainer import SelfDistillSFTTrainer

NEW_FACTS = ("real", "mixed", "synthetic-name", "synthetic-uuid")
DEFAULT_BUDGET = 0.05  # relative forgetting a `budget` run allows when no value is given
MIN_MONITOR = 20


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
    ) -> MethodResult:
        """One method from the snapshot: the `ForgettingCallback` results plus cost and per-relation numbers."""
        run_splits = splits.known_only() if method.spec.control else splits
        self.log(f"\nStage 2, seed {seed}: {method.title} — {run_splits.sizes}")
        run_out = out / method.name.replace(":", "_")
        # From the trainer's construction on (its teacher copy or θ₀ counts); the sampler stops however this ends
        with MemoryMeter() as memory:
            trainer = self.trainer(method, run_splits, snapshot, seed, run_out, push=save and self.args.push_to_hub)
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
                ).attach(trainer, report=False)
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
        result: MethodResult = {
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
            "card_base_model": self.base_name,  # the card names the base model, not the snapshot folder
            **overrides,
        }
        if overrides.get("distill_coef") == 0:
            overrides["teacher_cache_dir"] = None  # no teacher, nothing to cache
        return replace(self.args, **overrides)

    # ---- 4. seeds and study -----------------------------------------------------------------------------------------
    def run_seed(self, seed: int, methods: Sequence[Method], out: Path, save: bool = False) -> SeedResult:
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
        result: SeedResult = {
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
