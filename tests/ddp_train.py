"""Trained by `accelerate launch --num_processes 2` from test_distributed.py: each rank saves its adapter."""

import sys
from pathlib import Path

import torch
from conftest import config, make_tokenizer, prompt_completion_dataset, tiny_model
from peft import LoraConfig

from trl_selfdistill import SelfDistillSFTTrainer

out = Path(sys.argv[1])
trainer = SelfDistillSFTTrainer(
    model=tiny_model(),
    args=config(out, max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2, ddp_backend="gloo"),
    train_dataset=prompt_completion_dataset(),
    processing_class=make_tokenizer(),
    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
)
trainer.train()
rank = trainer.accelerator.process_index
state = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
torch.save({"world": trainer.accelerator.num_processes, "state": state, "logs": trainer.state.log_history},
           out / f"rank{rank}.pt")
