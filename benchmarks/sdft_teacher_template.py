"""Teacher's mean log-prob of the gold completion tokens under SDFT teacher templates (embedded SmolLM2-135M)."""
import sys

import torch

sys.path.insert(0, "tests")
from conftest import FACTS
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_selfdistill.embedded import resolve

path = resolve("embedded")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
templates = {
    "none (student prompt)": lambda p, c: p,
    "package one-shot {privileged_context}{prompt}": lambda p, c: (p + c + "\n") + p,
    "TRL default {prompt}\\n\\n{privileged_context}, context = demonstration": lambda p, c: (
        p + "\n\n" + (p + c + "\n")
    ),
    "TRL default, context = 'Example response: <answer>' (TRL example script)": lambda p, c: (
        p + "\n\n" + "Example response:" + c.rstrip("\n")
    ),
}
for name, build in templates.items():
    lps, top1 = [], []
    for q, a in FACTS:
        p, c = f"Q: {q}\nA:", f" {a}\n"
        ctx = tok(build(p, c))["input_ids"]
        full = tok(build(p, c) + c)["input_ids"]
        n = len(full) - len(ctx)
        with torch.no_grad():
            logp = model(torch.tensor([full])).logits[0, -n - 1 : -1].log_softmax(-1)
        tgt = torch.tensor(full[-n:])
        lps.append(logp.gather(1, tgt[:, None]).mean().item())
        top1.append((logp.argmax(-1) == tgt).float().mean().item())
    print(f"{name}: mean token log-prob {sum(lps) / len(lps):.3f}, top-1 agreement {sum(top1) / len(top1):.3f}")
