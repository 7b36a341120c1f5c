"""Assemble the study of 2026-11-30 from its three invocations per seed (see docs/reproduction.md, "How it was run").

Phase a (seed-S): sft, selfdistill, known_only, written by the protocol before it recorded the held-out relations:
they are added from the seed's splits, rebuilt with the same code and settings (the check: the same split sizes).
Phase b (seed-S-b): the budget run; its process stopped when writing seed_results.json (a bug fixed in the same
session), so the run's result is rebuilt from the files the run itself wrote: its forgetting_results.json (history,
per-fact answers, evaluation time) and its log (budget signal and λ at each evaluation, train_runtime); peak memory
was not recorded. Phase c (seed-S-c): the other methods, written by the protocol as they are.
"""

import ast
import json
import re
import sys
from pathlib import Path

from trl_selfdistill.demo import SIZES, base_config, categorised_facts, make_parser
from trl_selfdistill.knowledge import AnswerFormat
from trl_selfdistill.knowledge.metrics import accuracy_by
from trl_selfdistill.methods import Method
from trl_selfdistill.protocol import Protocol

root = Path(sys.argv[1])
args = make_parser().parse_args(["--output_dir", "/tmp/unused"])
facts = categorised_facts(args, "unused", AnswerFormat())
for seed in (0, 1, 2):
    protocol = Protocol(model="unused", facts=facts, args=base_config(args, SIZES["default"]), train_size=100,
                        heldout_size=300, eval_steps=16, log=lambda *_: None)
    splits = protocol.splits(seed)
    relations = list(splits.heldout["relation"])
    a = root / f"seed-{seed}" / "seed_results.json"
    data = json.loads(a.read_text())
    assert data["splits"] == splits.sizes, (data["splits"], splits.sizes)
    data["heldout_relations"] = relations
    a.write_text(json.dumps(data, indent=2))
    run_dir = root / f"seed-{seed}-b" / "budget"
    results_file = run_dir / "forgetting_results.json"
    if not results_file.is_file():
        print(f"seed {seed}: no budget run")
        continue
    results = json.loads(results_file.read_text())
    log = (root / f"seed-{seed}-b.log").read_text()
    budget_logs = [ast.literal_eval(m) for m in re.findall(r"\{'budget/signal'[^}]*\}", log)]
    steps_per_epoch = -(-100 // 8)
    history = [{"step": round(float(b["epoch"]) * steps_per_epoch), "signal": float(b["budget/signal"]),
                "distill_coef": float(b["budget/distill_coef"]), "exceeded": b["budget/exceeded"] in ("1", 1)}
               for b in budget_logs]
    runtime = float(re.findall(r"'train_runtime': '([0-9.]+)'", log)[-1])
    steps = results["history"][-1]["step"]
    method = Method("budget")
    run = {**results, "method": method.name, "title": method.title, "seed": seed, "wall_time_s": runtime,
           "steps": steps, "s_per_step": (runtime - results["eval_seconds"]) / steps, "peak_memory_mb": None,
           "heldout_by_relation": accuracy_by(relations, results["per_fact"]["heldout_end"]),
           "heldout_by_relation_start": accuracy_by(relations, results["per_fact"]["heldout_start"]),
           "budget": {"budget": 0.05, "history": history, "stopped_at": None, "monitor_size": 150,
                      "rebuilt_from": "forgetting_results.json and the log"}}
    seed_result = {"seed": seed, "splits": splits.sizes, "control": None, "heldout_relations": relations,
                   "runs": {"budget": run}}
    (root / f"seed-{seed}-b" / "seed_results.json").write_text(json.dumps(seed_result, indent=2))
    print(f"seed {seed}: budget rebuilt, {len(history)} budget evaluations, final λ {history[-1]['distill_coef']}")
