"""`trl-selfdistill demo`: the paper's effect, offline, on the embedded SmolLM2-135M-Instruct.

1. Knowledge: SliCK categories of the shipped curated facts, probed few-shot in the answer format the fine-tuning
   teaches (`Q: …\\nA: <answer>\\n`). For the embedded model the shipped categories are used unless `--reprobe`.
2. Splits: a training mix (Known facts + new facts: by default half real facts the model gets wrong, half fictional
   ones with name-like keys), a Known-only control (the mix's size when enough Known facts are left), held-out Known
   facts about other entities.
3. Format learning: one epoch on Known facts only gives the snapshot S (the paper's teacher; its held-out Known
   accuracy is the peak reference).
4. From S, the same number of steps each: (a) Known only, (b) plain SFT on the mix, (c) self-distillation on the mix
   with S as teacher, (d) attention-only freezing on the mix; task, new-fact and held-out Known accuracy are evaluated
   during training.
5. Output under `--output_dir`: `results.json`, `table.md`, `plot.png`, and the self-distilled model with its card.
"""

import argparse
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import concatenate_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import SelfDistillConfig
from .embedded import EMBEDDED, load_model, tiny_model_like
from .freezing import FreezeConfig
from .knowledge import (
    AnswerFormat,
    ForgettingCallback,
    Generator,
    KnowledgeSplits,
    ProbeConfig,
    build_splits,
    builtin_facts,
    probe,
    synthetic_facts,
)
from .knowledge.facts import FACT_COLUMNS
from .knowledge.metrics import accuracy_by, answer_zero_shot, score
from .recipes import sft_baseline
from .trainer import SelfDistillSFTTrainer

RUNS = ("known_only", "sft", "selfdistill", "freeze", "selfdistill_cache")
DEFAULT_RUNS = RUNS[:4]
RUN_TITLES = {
    "known_only": "(a) Known only",
    "sft": "(b) SFT, Known + Unknown",
    "selfdistill": "(c) self-distillation",
    "freeze": "(d) attention only",
    "selfdistill_cache": "(c') self-distillation, teacher cache",
}


@dataclass
class Sizes:
    train: int
    heldout: int
    steps: int
    eval_steps: int


SIZES = {
    "default": Sizes(train=200, heldout=150, steps=80, eval_steps=20),
    "quick": Sizes(train=48, heldout=48, steps=16, eval_steps=8),
    "smoke": Sizes(train=16, heldout=8, steps=2, eval_steps=1),
}


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (0 or less is refused, not read as "use the default")."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}; omit the flag for the default")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-selfdistill demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED, help="`embedded` (SmolLM2-135M-Instruct), a Hub id or a path")
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="a few-minute version (smaller sets, fewer steps)")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny random model of the same architecture")
    parser.add_argument("--train_size", type=positive_int, help="training facts per run (mix and control)")
    parser.add_argument("--heldout_size", type=positive_int, help="held-out Known facts")
    parser.add_argument("--unknown_share", type=float, default=0.5, help="share of Unknown facts in the mix")
    parser.add_argument(
        "--new_facts", default="mixed", choices=["curated", "mixed", "synthetic-name", "synthetic-uuid"],
        help="Unknown facts of the mix: real facts the model gets wrong, fictional ones with name-like/UUID keys, or "
        "`mixed`: half real, half fictional name-like (capitals and authors)",
    )
    parser.add_argument("--steps", type=positive_int, help="optimizer steps of each stage-2 run")
    parser.add_argument("--eval_steps", type=positive_int, help="evaluate every this many steps")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--snapshot_learning_rate", type=float, default=5e-5)
    parser.add_argument("--distill_coef", type=float, default=1.0)
    parser.add_argument("--distill_temperature", type=float, default=0.5)
    parser.add_argument("--distill_scope", default="all", choices=["all", "completion"])
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--reprobe", action="store_true", help="probe the facts even for the embedded model")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def categorised_facts(args, model, tokenizer, fmt: AnswerFormat):
    if args.model == EMBEDDED and not args.reprobe:  # also in smoke mode: a random model knows nothing
        print("Knowledge: shipped SliCK categories of the curated facts for the embedded model (--reprobe to redo)")
        return builtin_facts("curated-smollm2")
    print("Knowledge: probing the curated facts (SliCK, 3 four-shot prompts, greedy)")
    return probe(builtin_facts("curated"), model, tokenizer, fmt=fmt, config=ProbeConfig.cheap(seed=args.seed))


def new_facts(args, facts, count: int):
    """The Unknown facts of the mix (None: the probed Unknown facts)."""
    if args.new_facts == "curated":
        return None
    if args.new_facts != "mixed":
        return synthetic_facts(count, keys=args.new_facts.split("-")[1], relation="capital", seed=args.seed)
    # About half each; a few spare, since build_splits drops Unknown facts about held-out entities
    real = facts.filter(lambda c: c == "Unknown", input_columns="category").shuffle(seed=args.seed)
    num_real = min(count // 2 + 8, len(real))
    fictional = [synthetic_facts(n, keys="name", relation=relation, seed=args.seed)
                 for relation, n in (("capital", count // 4 + 4), ("author", count // 4 + 4))]
    return concatenate_datasets([real.select(range(num_real)).select_columns(list(FACT_COLUMNS)), *fictional])


def train_config(args, output_dir: Path, steps: int, lr: float, **overrides) -> SelfDistillConfig:
    kwargs = dict(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=max(1, steps // 8), save_strategy="no",
        report_to="none", seed=args.seed, bf16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        distill_coef=0.0, distill_temperature=args.distill_temperature, distill_scope=args.distill_scope,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return SelfDistillConfig(**kwargs)


def make_snapshot(args, splits: KnowledgeSplits, fmt: AnswerFormat, model, tokenizer, out: Path):
    """Stage 1: one epoch of plain SFT on the mix's Known facts only (the paper's format-learning snapshot)."""
    known = splits.train_known
    steps = max(1, -(-len(known) // args.batch_size))
    print(f"Stage 1: format learning, 1 epoch on {len(known)} Known facts ({steps} steps)")
    trainer = SelfDistillSFTTrainer(
        model=model, args=train_config(args, out / "snapshot", steps, args.snapshot_learning_rate),
        train_dataset=fmt.training_dataset(known.shuffle(seed=args.seed)), processing_class=tokenizer,
    )
    trainer.train()
    trainer.model.save_pretrained(out / "snapshot")
    tokenizer.save_pretrained(out / "snapshot")
    return out / "snapshot", heldout_by_relation(trainer.model, tokenizer, splits, fmt)


def run(name: str, args, sizes: Sizes, splits: KnowledgeSplits, fmt: AnswerFormat, snapshot: Path, out: Path,
        baseline: dict | None = None) -> dict:
    print(f"\nStage 2: {RUN_TITLES[name]}, {sizes.steps} steps from the snapshot")
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32)
    model.config._name_or_path = _base_name(args)
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    run_splits = splits.known_only() if name == "known_only" else splits
    overrides = {}
    if name.startswith("selfdistill"):
        overrides["distill_coef"] = args.distill_coef
    if name == "selfdistill_cache":
        overrides["teacher_cache_dir"] = str(out / name / "teacher_cache")
    trainer = SelfDistillSFTTrainer(
        model=model, args=train_config(args, out / name, sizes.steps, args.learning_rate, **overrides),
        train_dataset=fmt.training_dataset(run_splits.train(seed=args.seed)), processing_class=tokenizer,
        freeze_config=FreezeConfig.attention_only() if name == "freeze" else None,
    )
    callback = ForgettingCallback(run_splits, fmt=fmt, eval_steps=sizes.eval_steps, teacher=trainer.teacher,
                                  baseline=baseline, progress=False).attach(trainer)
    start = time.time()
    trainer.train()
    wall = time.time() - start
    if name == "selfdistill":
        trainer.save_model()
        dataset = "trl-selfdistill curated facts" + ("" if args.new_facts == "curated" else " + fictional new facts")
        trainer.create_model_card(model_name=f"{Path(_base_name(args)).name}-selfdistill-facts", dataset_name=dataset)
    title = RUN_TITLES[name] + (f" ({len(splits.control)} facts)" if name == "known_only" else "")
    results = {
        **callback.results(), "wall_time_s": wall, "title": title,
        "heldout_by_relation": heldout_by_relation(trainer.model, tokenizer, splits, fmt),
    }
    del trainer, model
    gc.collect()
    return results


def heldout_by_relation(model, tokenizer, splits: KnowledgeSplits, fmt: AnswerFormat) -> dict[str, float]:
    """Held-out Known accuracy per relation: where forgetting concentrates (e.g. relations the new facts share)."""
    (answers,) = answer_zero_shot(Generator(model, tokenizer, fmt, progress=False), [splits.heldout], fmt)
    return accuracy_by(splits.heldout["relation"], score(answers, splits.heldout))


def _base_name(args) -> str:
    return "HuggingFaceTB/SmolLM2-135M-Instruct" if args.model == EMBEDDED else args.model


def table(results: dict) -> str:
    def pct(value):
        return "–" if value is None else f"{value:.3f}"

    lines = [
        "| run | held-out Known: peak | held-out Known: end | relative forgetting | new-fact acc. | task acc. | wall time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        final = result["final"]
        forgetting = final["forgetting_from_peak"]
        lines.append(
            f"| {result['title']} | {pct(final['heldout_known_peak'])} | {pct(final['heldout_known_accuracy'])} | "
            f"{'–' if forgetting is None else f'{100 * forgetting:.1f}%'} | {pct(final['new_fact_accuracy'])} | "
            f"{pct(final['task_accuracy'])} | {result['wall_time_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in results.items():
        steps = [h["step"] for h in result["history"]]
        style = dict(marker="o", label=result["title"], color=f"C{RUNS.index(name)}")
        left.plot(steps, [h["heldout_known_accuracy"] for h in result["history"]], **style)
        if result["history"][0]["new_fact_accuracy"] is not None:
            right.plot(steps, [h["new_fact_accuracy"] for h in result["history"]], **style)
    left.set(title="Held-out Known accuracy (stability)", xlabel="step", ylabel="accuracy")
    right.set(title="New-fact accuracy (plasticity)", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    sizes = SIZES["smoke" if args.smoke else "quick" if args.quick else "default"]
    sizes = Sizes(
        *(given if given is not None else default for given, default in zip(
            (args.train_size, args.heldout_size, args.steps, args.eval_steps),
            (sizes.train, sizes.heldout, sizes.steps, sizes.eval_steps),
        ))
    )
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"Unknown runs {unknown}: choose among {', '.join(RUNS)}.")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    start = time.time()

    model, tokenizer = tiny_model_like(args.model) if args.smoke else load_model(args.model)
    fmt = AnswerFormat()
    facts = categorised_facts(args, model, tokenizer, fmt)
    counts = {c: facts["category"].count(c) for c in sorted(set(facts["category"]))}
    print(f"SliCK categories: {counts}")
    splits = build_splits(
        facts, train_size=sizes.train, heldout_size=sizes.heldout, unknown_share=args.unknown_share,
        new_facts=new_facts(args, facts, round(sizes.train * args.unknown_share)), control="known_only" in runs,
        control_size="available", seed=args.seed,
    )
    print(f"Splits: {splits.sizes}")
    if splits.control is not None:
        print(f"Known-only control: {len(splits.control)} facts" + (
            f" (fewer than the mix's {sizes.train}: no more Known facts besides the held-out set)"
            if len(splits.control) < sizes.train else ""))
    snapshot, snapshot_by_relation = make_snapshot(args, splits, fmt, model, tokenizer, out)
    del model
    gc.collect()

    results = {}
    for name in runs:
        baseline = sft_baseline(results) if name == "selfdistill" else None
        results[name] = run(name, args, sizes, splits, fmt, snapshot, out, baseline)

    summary = {
        "settings": {**vars(args), "sizes": vars(sizes), "slick_counts": counts, "splits": splits.sizes},
        "snapshot_heldout_by_relation": snapshot_by_relation,
        "runs": results,
        "total_wall_time_s": time.time() - start,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    plot(results, out / "plot.png")
    print("\n" + text)
    print(f"\nTotal wall time {summary['total_wall_time_s'] / 60:.1f} min. Results, table, plot and the "
          f"self-distilled model with its card are in {out}/")
