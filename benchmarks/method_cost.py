"""The cost of each stage-2 method of the paper protocol (`trl_selfdistill.protocol`): seconds per optimizer step and
peak training memory on the demo's model, facts, batch and settings, each run in its own process, side by side, with
ratios to plain SFT. The study's tables time methods inside long multi-method processes on a shared machine; this is
the comparable cost.

    python benchmarks/method_cost.py                       # every method below, 8 steps each, the embedded model
    python benchmarks/method_cost.py --methods sft,gkd --repeats 2 --threads 1 --out cost.json
    python benchmarks/method_cost.py --smoke   # a tiny random model, 3 steps, in-process: checks the script

Each run builds the method's trainer with `Protocol.trainer` (the same code the study runs, without its evaluation
callbacks) from the initial model and trains `--steps` steps on seed `--seed`'s training mix. Timing and memory are
`benchmarks/benchmark.py`'s: a step is `on_step_begin` → `on_step_end` (forward, backward, optimizer; SDFT's generation
included), the median over the steps after `--warmup`; memory is the peak resident set (CUDA: peak allocated) from
just before the trainer is built (so weights, a teacher copy or θ₀, optimizer state and activations all count) minus
that baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bench  # noqa: E402 - the step timer, worker runner and merge of repeats

from trl_selfdistill.memory import MemoryMeter  # noqa: E402

METHODS = ("sft", "selfdistill", "freeze", "lora_sft", "lora_selfdistill", "l2init", "gkd", "sdft")


def run_method(spec: dict) -> dict:
    """One method's trainer, built and trained in this process; its step times and peak training memory."""
    import torch

    from trl_selfdistill.demo import build_protocol, make_parser
    from trl_selfdistill.methods import parse_methods
    from trl_selfdistill.scripts.utils import count_parameters

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = tempfile.mkdtemp(prefix="sdcost-")
    argv = ["--output_dir", out, "--batch_size", str(spec["batch"]), "--seed", str(spec["seed"])]
    protocol = build_protocol(make_parser().parse_args(argv + (["--smoke"] if spec["smoke"] else [])))
    protocol.args = replace(protocol.args, max_steps=spec["steps"], logging_steps=10**6)
    method = parse_methods(spec["method"])[0]
    splits = protocol.splits(spec["seed"], control=method.spec.control)
    splits = splits.known_only() if method.spec.control else splits
    meter = MemoryMeter(device)
    gc.collect()
    meter.reset_peak()
    base_mb = meter.current_mb()
    start = time.perf_counter()
    trainer = protocol.trainer(method, splits, protocol.model, spec["seed"], Path(out) / "run")
    build_s = time.perf_counter() - start
    timer = bench.step_timer_callback(device)
    trainer.add_callback(timer)
    trainer.train()
    peak_mb = meter.peak_mb()
    timed = timer.times[spec["warmup"] :]
    return {
        "status": "ok",
        "method": method.name,
        "step_times_s": [round(t, 4) for t in timer.times],
        "timed_from": spec["warmup"],
        "median_step_s": statistics.median(timed),
        "build_s": build_s,
        "train_mem_mb": peak_mb - base_mb,
        "peak_mb": peak_mb,
        "trainable_parameters": count_parameters(trainer.model)[0],
    }


def _execute(spec: dict) -> dict:
    try:
        return run_method(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which goes on with the other methods
        traceback.print_exc()
        return {"status": "failed", "method": spec["method"], "error": f"{type(exc).__name__}: {exc}"}


def dispatch(spec: dict, inprocess: bool) -> dict:
    """`spec` in a fresh subprocess (a memory peak of its own), or in this process."""
    if inprocess:
        return _execute(spec)
    return {"method": spec["method"], **bench.run_worker(os.path.abspath(__file__), spec)}


def cost_table(rows: list[dict]) -> str:
    """Markdown: per method, median s/step and training memory, each with its ratio to SFT's."""
    sft = next((r for r in rows if r["method"] == "sft" and r["status"] == "ok"), None)
    lines = [
        "| method | median s/step | × SFT | training memory | × SFT | trainable parameters |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']}: {r['error'].splitlines()[0]} | | | | |")
            continue

        def ratio(key, r=r):
            return f"{r[key] / sft[key]:.2f}×" if sft and sft[key] > 0 else "–"

        lines.append(
            f"| {r['method']} | {r['median_step_s']:.2f} | {ratio('median_step_s')} | "
            f"{bench._mb(r['train_mem_mb'])} | {ratio('train_mem_mb')} | {r['trainable_parameters']:,} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated protocol methods (`name:value` sets λ or μ, as in `trl-selfdistill demo --methods`)",
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the median")
    p.add_argument("--batch", type=int, default=8, help="per-device batch (the demo's: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="run the method list this many times, round-robin")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (1 on a busy machine)")
    p.add_argument("--inprocess", action="store_true", help="every run in this process (memory peaks mix)")
    p.add_argument("--smoke", action="store_true", help="a tiny random model, 3 steps, in-process")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.inprocess = min(args.steps, 3), min(args.warmup, 1), True
    if args.warmup >= args.steps:
        p.error(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args._worker is not None:
        print(bench.RESULT_MARKER + json.dumps(_execute(json.loads(args._worker))), flush=True)
        return []
    from trl_selfdistill.methods import parse_methods

    methods = parse_methods(args.methods)
    if refused := [m.name for m in methods if m.spec.budget_mode]:
        raise SystemExit(
            f"{', '.join(refused)}: a budget run is self-distillation plus its monitor's evaluations: "
            "time `selfdistill`"
        )
    methods = [m.name for m in methods]
    if "sft" not in methods:
        methods.insert(0, "sft")  # the reference of the ratios
    runs = {m: [] for m in methods}
    for repeat in range(args.repeats):
        for method in methods:
            spec = {
                "method": method,
                "steps": args.steps,
                "warmup": args.warmup,
                "batch": args.batch,
                "seed": args.seed,
                "threads": args.threads,
                "smoke": args.smoke,
            }
            result = dispatch(spec, args.inprocess)
            runs[method].append(result)
            shown = (
                f"{result['median_step_s']:.2f} s/step, {bench._mb(result['train_mem_mb'])}"
                if result["status"] == "ok"
                else result["error"]
            )
            print(f"  {method}{f' (repeat {repeat + 1})' if args.repeats > 1 else ''}: {shown}", flush=True)
    rows = [bench.merge_runs(runs[m]) for m in methods]
    print(
        f"\nbatch {args.batch}, {args.steps} steps (median after {args.warmup}), seed {args.seed}, "
        f"{args.repeats} repeat(s), torch threads {args.threads or 'default'}\n"
    )
    print(cost_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
