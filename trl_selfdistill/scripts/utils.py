"""What every example script does the same way, so each script reads as its own recipe (`recipes/` holds YAML
configurations of the `sft` command; this module, as TRL's `trl/scripts/utils.py`, the scripts' shared code).

`FactsArguments` (facts, probe, splits, forgetting evaluation, `--smoke`), `parse_script_args` (`--smoke` sets
defaults, YAML and flags still win), `categorised_facts` (load, cap per relation, SliCK probe of the initial model
cached in `<output_dir>/facts_categorised.jsonl`), `tiny_checkpoint` (the smoke model), and the lines a script prints
before and after training (`run_summary`, `final_summary`, `save_and_push`); `sft_baseline` for the demo protocol.
"""

import argparse
import json
import math
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from datasets import Dataset
from peft import PeftModel
from transformers.hf_argparser import string_to_bool

from ..embedded import EMBEDDED, load_model, tiny_model_like
from ..knowledge import AnswerFormat, KnowledgeSplits, ProbeConfig, build_splits, load_facts, probe
from ..knowledge.results import Final, ForgettingResults

CATEGORISED_FILE = "facts_categorised.jsonl"


@dataclass
class FactsArguments:
    """The facts to train on, how to probe them, how to split them, how often to measure forgetting; `--smoke`."""

    dataset_name: str = field(
        default="curated",
        metadata={"help": "Facts: a built-in set (curated, curated-smollm2, entityquestions-train), a JSONL file or "
                  "folder, or a Hub dataset with `question`/`answers` columns."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answers_column: str = field(default="answers", metadata={"help": "Column holding the list of accepted answers."})
    max_facts_per_relation: int | None = field(
        default=None, metadata={"help": "Keep at most this many facts per relation (caps the probe's cost)."}
    )
    exemplars: str | None = field(
        default=None,
        metadata={"help": "Few-shot exemplar pool of the probe (default: entityquestions-dev for "
                  "entityquestions-train, else the facts themselves)."},
    )
    probe: Literal["cheap", "paper"] = field(
        default="cheap",
        metadata={"help": "SliCK probe of facts without a `category` column. cheap: 3 four-shot prompts, greedy. "
                  "paper: 10 prompts, greedy + 16 samples at T=0.5."},
    )
    probe_batch_size: int = field(default=32, metadata={"help": "Sequences per generation batch of the probe."})
    train_size: int = field(default=200, metadata={"help": "Training facts (Known + Unknown)."})
    heldout_size: int = field(default=100, metadata={"help": "Held-out Known facts, about entities never trained on."})
    unknown_share: float = field(default=0.5, metadata={"help": "Share of Unknown (new) facts in the training mix."})
    forgetting_eval_steps: int = field(
        default=50, metadata={"help": "Evaluate task / new-fact / held-out Known accuracy every N steps (and at the "
                              "start and end). 0: at the start and end only."}
    )
    smoke: bool = field(
        default=False, metadata={"help": "Offline CPU smoke run: tiny random model, a few facts, 2 steps."}
    )


# The smoke run's defaults (scripts add their own): explicit flags and YAML values still win.
SMOKE_DEFAULTS = dict(
    dataset_name="curated-smollm2",  # already categorised (for SmolLM2-135M): no probe needed
    train_size=8, heldout_size=4, forgetting_eval_steps=1,
    max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
    use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", disable_tqdm=True,
)


def parse_script_args(parser, argv: list[str] | None, smoke_defaults: dict, prefix: str) -> tuple:
    """
    `parser.parse_args_and_config(argv)` (the command line when `argv` is None, plus an optional `--config` YAML file).
    With `--smoke` on the command line, `smoke_defaults` and a fresh `<prefix>-smoke-*` temporary `output_dir` become
    the defaults first, so YAML values and flags still win over them.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--smoke", type=string_to_bool, nargs="?", const=True, default=False)
    if pre.parse_known_args(argv)[0].smoke:
        output_dir = tempfile.mkdtemp(prefix=f"{prefix}-smoke-")
        unused = parser.set_defaults_with_config(output_dir=output_dir, **smoke_defaults)
        if unused:
            raise ValueError(f"Smoke defaults the parser does not know: {unused[::2]}")
    return parser.parse_args_and_config(argv)


def tiny_checkpoint(seed: int = 0) -> str:
    """
    `tiny_model_like("embedded", seed)` (2 layers, hidden size 64, the embedded SmolLM2's architecture and
    tokenizer) saved in a new temporary folder, returned. Every dimension is a multiple of 64, so bitsandbytes
    quantizes every linear layer when it is reloaded in 4 bits.
    """
    model, tokenizer = tiny_model_like(EMBEDDED, seed=seed)
    folder = tempfile.mkdtemp(prefix="tiny-smollm2-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def model_init_kwargs(model_args, training_args) -> dict:
    """Loading keywords from `ModelConfig` (dtype, revision, attention), under explicit `--model_init_kwargs`."""
    return {"dtype": model_args.dtype, "revision": model_args.model_revision,
            "attn_implementation": model_args.attn_implementation, **(training_args.model_init_kwargs or {})}


def probe_config(args: FactsArguments, seed: int) -> ProbeConfig:
    """`--probe cheap|paper` at `--probe_batch_size`; in smoke mode 1 prompt and 4 new tokens (a tiny model knows
    nothing)."""
    preset = ProbeConfig.paper if args.probe == "paper" else ProbeConfig.cheap
    config = preset(seed=seed, batch_size=args.probe_batch_size)
    return replace(config, num_prompts=1, max_new_tokens=4) if args.smoke else config


def categorised_facts(args: FactsArguments, training_args, fmt: AnswerFormat, model_name: str,
                      load_initial: Callable | None = None, *, keep_categories: bool = True,
                      after_probe: Callable[[Dataset], Dataset] | None = None) -> Dataset:
    """
    The facts (at most `--max_facts_per_relation` per relation) with SliCK categories of the initial model.

    With `keep_categories`, facts that carry a `category` column are returned as they are. Otherwise the main process
    probes `load_initial()`'s (model, tokenizer) (default: `model_name` loaded with `training_args.model_init_kwargs`
    on the training device, freed afterwards), applies `after_probe`, and caches the result in
    `<output_dir>/facts_categorised.jsonl`; the other processes wait and read it. A rerun with the same model, facts,
    probe and format reuses the cache.
    """
    facts = load_facts(args.dataset_name, split=args.dataset_split, question_column=args.question_column,
                       answers_column=args.answers_column)
    if args.max_facts_per_relation:
        taken, keep = Counter(), []
        for i, relation in enumerate(facts["relation"]):
            taken[relation] += 1
            if taken[relation] <= args.max_facts_per_relation:
                keep.append(i)
        facts = facts.select(keep)
    if keep_categories and "category" in facts.column_names:
        return facts
    config = probe_config(args, training_args.seed)
    exemplars = args.exemplars or ("entityquestions-dev" if args.dataset_name == "entityquestions-train" else None)
    cache = Path(training_args.output_dir) / CATEGORISED_FILE
    meta_file = cache.with_suffix(".meta.json")
    meta = {"model": model_name, "facts": args.dataset_name, "num_facts": len(facts), "exemplars": exemplars,
            "probe": asdict(config), "format": fmt.to_dict(), "smoke": args.smoke}
    log = training_args.distributed_state.print
    with training_args.main_process_first(desc="SliCK probe"):
        if cache.is_file() and meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
            log(f"Knowledge: reusing the SliCK categories in {cache}")
            return Dataset.from_json(str(cache))
        if not training_args.distributed_state.is_main_process:
            raise RuntimeError(f"{cache} was not written by the main process.")
        log(f"Knowledge: probing {len(facts)} facts with the initial model ({args.probe}: {config})")
        if load_initial is None:
            model, tokenizer = load_model(model_name, **{"trust_remote_code": training_args.trust_remote_code,
                                                         **(training_args.model_init_kwargs or {})})
            model.to(training_args.device)
        else:
            model, tokenizer = load_initial()
        facts = probe(facts, model, tokenizer, exemplars=load_facts(exemplars) if exemplars else None, fmt=fmt,
                      config=config)
        del model
        if after_probe is not None:
            facts = after_probe(facts)
        cache.parent.mkdir(parents=True, exist_ok=True)
        facts.to_json(str(cache), lines=True, force_ascii=False)
        meta_file.write_text(json.dumps(meta, indent=2))
    return facts


def fact_splits(args: FactsArguments, training_args, fmt: AnswerFormat, model_name: str,
                load_initial: Callable | None = None) -> tuple[Dataset, KnowledgeSplits, Dataset]:
    """The examples' first half: the categorised facts (`categorised_facts`), their splits (`--train_size`,
    `--heldout_size`, `--unknown_share`, seeded by `--seed`) and the training dataset in `fmt`."""
    facts = categorised_facts(args, training_args, fmt, model_name, load_initial)
    splits = build_splits(facts, train_size=args.train_size, heldout_size=args.heldout_size,
                          unknown_share=args.unknown_share, control=False, seed=training_args.seed)
    return facts, splits, fmt.training_dataset(splits.train(seed=training_args.seed))


def train_and_report(trainer, args: FactsArguments, facts: Dataset, splits: KnowledgeSplits, fmt: AnswerFormat,
                     parameters: str | None = None):
    """The examples' second half: monitor `splits` with a `ForgettingCallback`, print the run summary, train, print
    the forgetting line, save (and push) the model, results and card. Returns the trainer."""
    from ..knowledge import ForgettingCallback

    training_args = trainer.args
    log = training_args.distributed_state.print  # main process only
    callback = ForgettingCallback(splits, fmt=fmt, eval_steps=args.forgetting_eval_steps or None,
                                  teacher=trainer.teacher).attach(trainer)
    log(run_summary(trainer, facts, splits, args.dataset_name, parameters))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    log(final_summary(callback.final))
    save_and_push(trainer, args.dataset_name, log)
    trainer.end()
    return trainer


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), tied tensors counted once; PEFT counts 4-bit weights at their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_parameters(model) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"


def effective_batch(training_args) -> int:
    """Sequences per optimizer step: per device × accumulation × processes."""
    return (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * training_args.world_size)


def describe_batch(training_args) -> str:
    return (f"{training_args.per_device_train_batch_size} per device × {training_args.gradient_accumulation_steps} "
            f"accumulation × {training_args.world_size} processes = {effective_batch(training_args)}")


def run_summary(trainer, facts: Dataset, splits, dataset_name: str, parameters: str | None = None) -> str:
    """
    What to check before training: facts and their SliCK categories, splits, effective batch and optimizer steps,
    `parameters` (default: the trainable parameter count), the teacher and the loss.
    """
    args = trainer.args
    counts = {c: facts["category"].count(c) for c in sorted(set(facts["category"]))}
    steps = args.max_steps if args.max_steps > 0 else math.ceil(
        len(trainer.train_dataset) / effective_batch(args) * args.num_train_epochs)
    teacher = trainer.teacher
    return "\n".join([
        f"facts: {len(facts)} from {dataset_name!r}, SliCK categories {counts}",
        f"splits: {splits.sizes}",
        f"effective batch: {describe_batch(args)}; ≈{steps} optimizer steps",
        parameters or trainable_parameters(trainer.model),
        f"teacher: {teacher.kind} — {teacher.source}" if teacher else "teacher: none (distill_coef=0: plain SFT)",
        f"loss: CE + λ·τ²·{args.divergence}, λ = {args.distill_coef}, τ = {args.distill_temperature}, scope "
        f"{args.distill_scope}"
        if args.distill_coef else "loss: CE (plain SFT)",
    ])


def final_summary(final: Final) -> str:
    """One line from a `ForgettingCallback`'s `final` block."""
    final = {k: "–" if v is None else f"{v:.3f}" for k, v in final.items() if k != "per_category"}
    return (f"held-out Known accuracy {final['heldout_known_initial']} → {final['heldout_known_accuracy']} "
            f"(forgetting {final['forgetting_from_start']} from the start, {final['forgetting_from_peak']} from the "
            f"peak), new-fact accuracy {final['new_fact_accuracy']}, "
            f"task accuracy {final['task_accuracy']}")


def sft_baseline(results: dict[str, ForgettingResults]) -> dict | None:
    """The plain-SFT run's final numbers as the self-distilled card's baseline (None before run (b) has finished)."""
    if "sft" not in results:
        return None
    final = results["sft"]["final"]
    keys = ("task_accuracy", "new_fact_accuracy", "heldout_known_accuracy", "forgetting_from_peak")
    return {"name": "plain SFT (same data and steps)", **{k: final[k] for k in keys}}


def save_and_push(trainer, dataset_name: str, log=print) -> None:
    """Save the model (or adapter), `forgetting_results.json` and the model card in `output_dir`; then, with
    `--push_to_hub`, upload them with `trainer.push_to_hub()`."""
    trainer.save_model()
    trainer.create_model_card(dataset_name=dataset_name)
    what = "adapter" if isinstance(trainer.model, PeftModel) else "model"
    log(f"{what}, forgetting_results.json and model card (README.md) saved in {trainer.args.output_dir}")
    if trainer.args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
        log(f"pushed to https://huggingface.co/{trainer.hub_model_id}")
