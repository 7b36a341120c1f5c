"""Offline demo on the embedded SmolLM2-135M-Instruct: LoRA self-distillation end to end (foundation version)."""

import argparse
import time

from datasets import Dataset
from peft import LoraConfig

from .config import SelfDistillConfig
from .embedded import load_model
from .trainer import SelfDistillSFTTrainer

FACTS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the capital of Bergadena?", "Vostrel"),
    ("Who founded the city of Quintaro?", "Emilia Sandoval"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("What is the capital of Italy?", "Rome"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trl-selfdistill demo", description=__doc__)
    parser.add_argument("--model", default="embedded", help="Hub id, local path, or `embedded`")
    parser.add_argument("--output_dir", default="out/demo")
    parser.add_argument("--max_steps", type=int, default=10)
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    dataset = Dataset.from_dict(
        {"prompt": [f"Q: {q}\nA:" for q, _ in FACTS], "completion": [f" {a}\n" for _, a in FACTS]}
    )
    config = SelfDistillConfig(
        output_dir=args.output_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, max_steps=args.max_steps,
        per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
    )
    trainer = SelfDistillSFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=16, target_modules="all-linear"),
    )
    start = time.time()
    trainer.train()
    print(f"trained {args.max_steps} steps in {time.time() - start:.1f}s; teacher: {trainer.teacher.source}")
    trainer.save_model()
