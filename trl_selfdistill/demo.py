"""`trl-selfdistill demo`: the paper's protocol (`trl_selfdistill.protocol`), offline, on the embedded
SmolLM2-135M-Instruct.

1. Knowledge: SliCK categories of the shipped facts, probed few-shot in the answer format the fine-tuning teaches
   (`Q: …\\nA: <answer>\\n`). For the embedded model the shipped categories are used unless `--reprobe`.
2. Splits: a training mix (Known facts + new facts: by default half real facts the model gets wrong, half fictional
   ones with name-like keys), a Known-only control of the mix's size, held-out Known facts about other entities.
3. Format learning: one epoch on Known facts only gives the snapshot S (the paper's teacher).
4. From S, the same number of steps each: (a) Known only, (b) plain SFT on the mix, (c) self-distillation on the mix
   with S as teacher, (d) attention-only freezing on the mix (`--methods` adds λ sweeps, LoRA, a forgetting budget
   and the peers); task, new-fact and held-out Known accuracy are evaluated during training.
5. `--seeds 0,1,2` repeats everything per seed and reports means with 95% intervals and the paired difference to
   plain SFT. Output under `--output_dir`: `results.json`, `table.md`, `plot.png`, `frontier.png`, and the
   self-distilled model of the first seed with its card.
"""

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import SelfDistillConfig
from .embedded import EMBEDDED, load_model, resolve
from .knowledge import AnswerFormat, ProbeConfig, builtin_facts, probe
from .knowledge.heuristics import parse_heuristics
from .knowledge.splits import concatenate_facts
from .methods import METHODS, parse_methods
from .protocol import NEW_FACTS, Protocol, parse_seeds
from .report import combine, frontier_table, read_regimes, regime_table, study_table
from .scripts.utils import tiny_checkpoint

DEFAULT_METHODS = "known_only,sft,selfdistill,freeze"
# The embedded model's categorised facts, each with heuristic labels: the world set (cities, airports, capitals,
# elements), the curated set and the EntityQuestions sample, probed the same way
EMBEDDED_FACTS = ("world-smollm2", "curated-smollm2", "entityquestions-smollm2")
# What to probe again for another model (or `--reprobe`): the uncategorised source of a categorised set, where there
# is one (the probe replaces the categories of a set that has them)
UNCATEGORISED = {"curated-smollm2": "curated"}


@dataclass
class Sizes:
    train: int
    heldout: int
    steps: int
    eval_steps: int


SIZES = {
    "default": Sizes(train=100, heldout=300, steps=80, eval_steps=16),
    "quick": Sizes(train=48, heldout=48, steps=16, eval_steps=8),
    "smoke": Sizes(train=16, heldout=8, steps=2, eval_steps=1),
}


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (0 or less is refused, not read as "use the default")."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}; omit the flag for the default")
    return value


def _labels(text: str) -> tuple[str, ...] | None:
    try:
        return parse_heuristics(text, "Heuristic labels")
    except ValueError as error:
        raise SystemExit(str(error)) from None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-selfdistill demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED, help="`embedded` (SmolLM2-135M-Instruct), a Hub id or a path")
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="a few-minute version (smaller sets, fewer steps)")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny random model of the same architecture")
    parser.add_argument("--facts", default=",".join(EMBEDDED_FACTS),
                        help="comma-separated built-in fact sets; categorised ones (`*-smollm2`) are used as they are "
                        "for the embedded model, probed again otherwise")
    parser.add_argument("--train_size", type=positive_int, help="training facts per run (mix and control)")
    parser.add_argument("--heldout_size", type=positive_int, help="held-out Known facts")
    parser.add_argument("--unknown_share", type=float, default=0.5, help="share of Unknown facts in the mix")
    parser.add_argument(
        "--new_facts", default="mixed", choices=NEW_FACTS,
        help="new facts of the mix: real facts the model gets wrong, fictional ones with name-like/UUID keys, or "
        "`mixed`: half real, half fictional name-like (capitals and authors)",
    )
    parser.add_argument("--steps", type=positive_int, help="optimizer steps of each stage-2 run")
    parser.add_argument("--eval_steps", type=positive_int, help="evaluate every this many steps")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--snapshot_learning_rate", type=float, default=5e-5)
    parser.add_argument("--distill_coef", type=float, default=1.0)
    parser.add_argument("--distill_temperature", type=float, default=2.0)
    parser.add_argument("--distill_scope", default="all", choices=["all", "completion", "prompt"])
    parser.add_argument("--snapshot_max_epochs", type=positive_int, default=6,
                        help="format learning: up to this many epochs, stopped once an epoch gains < 1 point on "
                        "other Known facts (1: one epoch)")
    parser.add_argument("--heuristics", default="none",
                        help="heuristic labels of the Known facts used (comma-separated among copy, prior, none; "
                        "`any`: all): `none` = genuine facts only")
    parser.add_argument("--train_heuristics", default=None,
                        help="the training Known facts' labels when they differ from --heuristics (e.g. `prior,copy`)")
    parser.add_argument("--methods", "--runs", dest="methods", default=DEFAULT_METHODS,
                        help=f"comma-separated stage-2 runs among {', '.join(METHODS)}; `name:value` sets λ "
                        "(selfdistill:2), the forgetting budget (budget:0.05, budget_stop:0.05, "
                        "stop_at_budget:0.05) or μ (l2init:0.01)")
    parser.add_argument("--seeds", default=None, help="seeds to run, e.g. `0,1,2` or `0-4` (default: --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reprobe", action="store_true", help="probe the facts even for the embedded model")
    parser.add_argument("--regimes", nargs="+", metavar="LABEL=DIR",
                        help="train nothing: print the decision table of studies already combined (each DIR holds a "
                        "results.json), one regime each, e.g. 'N=50 names=runs/a' 'N=200 UUIDs=runs/b'")
    parser.add_argument("--combine", nargs="+", metavar="DIR",
                        help="train nothing: combine the output folders of demo runs with other seeds (e.g. run in "
                        "parallel) into one study in --output_dir")
    return parser


def categorised_facts(args, model_path: str, fmt: AnswerFormat):
    """The fact sets of `--facts`, categorised for the model (shipped categories for the embedded model)."""
    names = [n.strip() for n in args.facts.split(",") if n.strip()]
    if args.model == EMBEDDED and not args.reprobe:  # also in smoke mode: a random model knows nothing
        sets = [builtin_facts(name) for name in names]
        if all("category" in facts.column_names for facts in sets):
            print(f"Knowledge: shipped SliCK categories of {', '.join(names)} for the embedded model (--reprobe "
                  "to redo)")
            return concatenate_facts(sets)
    sets = [builtin_facts(UNCATEGORISED.get(name, name)) for name in names]
    print(f"Knowledge: probing {sum(map(len, sets))} facts (SliCK, 3 four-shot prompts, greedy)")
    model, tokenizer = load_model(model_path)
    raw = concatenate_facts(sets, labels=False)  # the probe labels them again
    facts = probe(raw, model, tokenizer, fmt=fmt, config=ProbeConfig.cheap(seed=args.seed))
    del model
    return facts


def base_config(args, sizes: Sizes) -> SelfDistillConfig:
    """The training settings every stage-2 run shares (the protocol sets output_dir, seed and λ per run)."""
    return SelfDistillConfig(
        output_dir=args.output_dir, max_steps=sizes.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=max(1, sizes.steps // 8), save_strategy="no", report_to="none", seed=args.seed, bf16=False,
        gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), distill_coef=args.distill_coef,
        distill_temperature=args.distill_temperature, distill_scope=args.distill_scope, dataloader_num_workers=0,
        disable_tqdm=True,
    )


def build_protocol(args) -> Protocol:
    """The demo's `Protocol` from its parsed flags (`make_parser`): the model (a tiny random one with `--smoke`), the
    categorised facts, the sizes of `--smoke`/`--quick`/the defaults under explicit size flags, and the training
    settings."""
    sizes = SIZES["smoke" if args.smoke else "quick" if args.quick else "default"]
    sizes = Sizes(
        *(given if given is not None else default for given, default in zip(
            (args.train_size, args.heldout_size, args.steps, args.eval_steps),
            (sizes.train, sizes.heldout, sizes.steps, sizes.eval_steps), strict=True,
        ))
    )
    model_path = tiny_checkpoint() if args.smoke else resolve(args.model)
    fmt = AnswerFormat()
    facts = categorised_facts(args, model_path, fmt)
    counts = {c: facts["category"].count(c) for c in sorted(set(facts["category"]))}
    print(f"SliCK categories: {counts}")
    return Protocol(
        model=model_path, facts=facts, args=base_config(args, sizes), fmt=fmt, train_size=sizes.train,
        heldout_size=sizes.heldout, unknown_share=args.unknown_share, new_facts=args.new_facts,
        eval_steps=sizes.eval_steps, snapshot_learning_rate=args.snapshot_learning_rate,
        snapshot_max_epochs=args.snapshot_max_epochs, heuristics=_labels(args.heuristics),
        train_heuristics="same" if args.train_heuristics is None else _labels(args.train_heuristics),
        base_name="HuggingFaceTB/SmolLM2-135M-Instruct" if args.model == EMBEDDED else args.model,
    )


def quiet() -> None:
    """The demo's screen carries the package's own lines: no per-dataset-map or weight-loading progress bars, and no
    DeepSpeed accelerator guess on a machine without a GPU."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    quiet()
    if args.regimes:
        print(regime_table(read_regimes(args.regimes)))
        return
    if args.combine:
        study = combine(args.combine, args.output_dir)
        print(study_table(study) + "\n\n" + frontier_table(study) + f"\n\nSeeds {study['seeds']} combined in "
              f"{args.output_dir}/")
        return
    try:
        methods = parse_methods(args.methods)
        seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    except ValueError as err:
        raise SystemExit(str(err)) from err
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    protocol = build_protocol(args)
    study = protocol.run_study(seeds, methods, out)
    print("\n" + study_table(study) + "\n\n" + frontier_table(study))
    print(
        f"\nTotal wall time {(time.time() - start) / 60:.1f} min ({', '.join(str(s) for s in seeds)}). results.json, "
        f"table.md, plot.png, frontier.png and the self-distilled model with its card are in {out}/"
    )
