"""Seconds per optimizer step of each peer (`trl_selfdistill.peers`) and of plain SFT on the embedded SmolLM2-135M,
batch 16, CPU, fp32: `python benchmarks/peers_step_time.py sft,l2init,gkd,sdft 4` (methods, steps). Prints each
step's time (on_step_end to on_step_end), the mean after the first step, the peak RSS and the logged losses."""
import resource
import sys
import tempfile
import time

sys.path.insert(0, "tests")
from conftest import FACTS
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback

from trl_selfdistill import SelfDistillConfig
from trl_selfdistill.embedded import resolve
from trl_selfdistill.peers import PEERS
from trl_selfdistill.trainer import SelfDistillSFTTrainer


class Clock(TrainerCallback):
    def __init__(self): self.t = []
    def on_step_end(self, *a, **k): self.t.append(time.perf_counter())

path = resolve("embedded")
tok = AutoTokenizer.from_pretrained(path)
print("pad", tok.pad_token, "eos", tok.eos_token, "nl ids", tok("\n", add_special_tokens=False)["input_ids"])
rows = [FACTS[i % len(FACTS)] for i in range(64)]
ds = Dataset.from_dict({"prompt": [f"Q: {q}\nA:" for q, _ in rows], "completion": [f" {a}\n" for _, a in rows]})
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
for name in sys.argv[1].split(","):
    args = SelfDistillConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=1e-5, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                             logging_steps=1, seed=0, gradient_checkpointing=False, disable_tqdm=True,
                             distill_coef=0.0)
    start = time.perf_counter()
    if name == "sft":
        tr = SelfDistillSFTTrainer(path, args, train_dataset=ds, processing_class=tok)
    else:
        tr = PEERS[name](path, args, ds, tok)
    clock = Clock()
    tr.add_callback(clock)
    t0 = time.perf_counter()
    tr.train()
    gaps = [b - a for a, b in zip([t0] + clock.t[:-1], clock.t, strict=True)]
    print(name, "build %.1fs" % (t0 - start), "per step", ["%.2f" % g for g in gaps],
          "mean after first %.2f s/step" % (sum(gaps[1:]) / len(gaps[1:])),
          "maxrss %.0f MiB" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    for h in tr.state.log_history:
        print({k: v for k, v in h.items() if "length" in k or "loss" in k})
