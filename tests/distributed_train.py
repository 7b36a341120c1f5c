"""One engine × mode cell, launched by test_distributed.py (`accelerate launch`, or plain python for 1 process).

argv[1] is a JSON spec: `out`, `mode` (lora | qlora | adapter_copy | full | path), `base` (a saved tiny model: the
QLoRA base and the `path` teacher), `steps`, `batch` (per device), and optionally `accumulation`, `save_steps`,
`resume` (a checkpoint), `cache` (a teacher cache folder), `save_model` (a folder), `distill_coef`, `bf16`, `optim`,
`max_grad_norm`, `average_tokens_across_devices`, and `trainer: "sft"` (TRL's SFTTrainer on the same model and
data). Each rank writes `rank{r}.pt`: the engine it ran under, its full trainable weights, the logs, the teacher's
logits on a probe batch before and after training (and whether its gathered head was the student's), and the
parameter bytes it holds.

The engine runs on the CPU through `cpu_engines/sitecustomize.py` (on the launch's PYTHONPATH): the process group is
gloo and the device the CPU, and the engine is the one the accelerate config asks for. The test asserts that the
engine really was active.
"""

import json
import os
import sys
from pathlib import Path

import torch

spec = json.loads(sys.argv[1])
engine_launch = os.environ.get("ACCELERATE_USE_FSDP") == "true" or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"

from conftest import config, make_tokenizer, prompt_completion_dataset, tiny_model  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from trl_selfdistill import SelfDistillConfig, SelfDistillSFTTrainer  # noqa: E402
from trl_selfdistill.distributed import gathered_heads, gathered_parameters, local_shard, unwrap  # noqa: E402
from trl_selfdistill.teacher import causal_lm  # noqa: E402

out, mode = Path(spec["out"]), spec["mode"]
lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
kwargs, extra = {}, {}
if mode == "lora":
    model, kwargs["peft_config"] = tiny_model(), lora
elif mode == "qlora":
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(spec["base"], quantization_config=quant, device_map="cpu")
    kwargs["peft_config"] = lora
elif mode == "adapter_copy":
    model = get_peft_model(tiny_model(), lora)
elif mode == "full":
    model = tiny_model()
elif mode == "path":
    model, extra["teacher_model_name_or_path"] = tiny_model(), spec["base"]
else:
    raise ValueError(mode)
if spec.get("save_steps"):
    extra.update(save_strategy="steps", save_steps=spec["save_steps"])
if "distill_coef" in spec:
    extra["distill_coef"] = spec["distill_coef"]
if spec.get("cache"):
    extra["teacher_cache_dir"] = spec["cache"]
if spec.get("bf16"):
    extra["bf16"] = True
for key in ("optim", "max_grad_norm", "average_tokens_across_devices"):
    if key in spec:
        extra[key] = spec[key]
sft = spec.get("trainer") == "sft"
if not sft:
    # The KL shares the CE's global-batch denominator only over the answer tokens (`completion`); `all` averages per
    # micro-batch, so 2 processes × 2 rows equal 1 × 4 only when every row covers as many positions
    extra["distill_scope"] = spec.get("scope", "completion")
args = config(
    out, SFTConfig if sft else SelfDistillConfig, use_cpu=not engine_launch, max_steps=spec["steps"],
    per_device_train_batch_size=spec["batch"],
    gradient_accumulation_steps=spec.get("accumulation", 1),
    learning_rate=1e-2 if mode in ("full", "path") else 5e-2,
    ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None, **extra,
)
tokenizer = make_tokenizer()
trainer = (SFTTrainer if sft else SelfDistillSFTTrainer)(
    model=model, args=args, train_dataset=prompt_completion_dataset(), processing_class=tokenizer, **kwargs
)
probe = tokenizer(["Q: What is the capital of France?\nA: Paris", "Q: Who wrote Hamlet?\nA: William"],
                  return_tensors="pt", padding=True)


teacher = getattr(trainer, "teacher", None)  # SFTTrainer has none
heads_shared = []  # per gathering of the heads: does the teacher's share the student's gathered weight?


def teacher_logits() -> torch.Tensor | None:
    if teacher is None:
        return None
    hidden = teacher.last_hidden_state(dict(probe))
    student = causal_lm(unwrap(trainer.model_wrapped))
    with gathered_heads(student, teacher) as (student_head, head):
        heads_shared.append(head.weight.data_ptr() == student_head.weight.data_ptr())
        return (hidden @ head.weight.T).detach().clone()


before = teacher_logits()
trainer.train(resume_from_checkpoint=spec.get("resume"))
after = teacher_logits()
student = unwrap(trainer.model_wrapped)
names = [n for n, p in student.named_parameters() if p.requires_grad]
with gathered_parameters([p for p in student.parameters() if p.requires_grad]) as full:
    state = dict(zip(names, full, strict=True))
if spec.get("save_model"):
    trainer.save_model(spec["save_model"])
accelerator = trainer.accelerator
teacher_model = teacher.model if teacher else torch.nn.Linear(1, 1)
torch.save(
    {
        "out": str(out),
        "world": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "engine": str(accelerator.distributed_type).split(".")[-1],
        "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None,
        "zero_stage": accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "student_sharded": type(next(student.parameters())).__name__ == "DTensor"
        or hasattr(next(student.parameters()), "ds_id"),
        "state": state,
        "logs": trainer.state.log_history,
        "teacher_before": before,
        "teacher_after": after,
        "teacher_kind": teacher.kind if teacher else None,
        "heads_shared": heads_shared,
        # bytes of parameter data this rank holds for the teacher (its shards only, when sharded)
        "teacher_bytes": sum(local_shard(p).numel() * p.element_size() for p in teacher_model.parameters()),
        "teacher_full_bytes": sum(
            p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else p.numel() * p.element_size()
            for p in teacher_model.parameters()
        ),
    },
    out / f"rank{accelerator.process_index}.pt",
)
