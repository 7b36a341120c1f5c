"""What the benchmark scripts share (`benchmark.py`, `method_cost.py`): a step timer, the fresh-process worker and
its result line, the merge of repeated runs, and number formatting. Memory is `trl_selfdistill.memory.MemoryMeter`.
"""

import json
import statistics
import subprocess
import sys
import time

RESULT_MARKER = "BENCHMARK_RESULT "


def step_timer_callback(device: str):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, from `on_step_begin` to `on_step_end` (data loading excluded)."""

        def __init__(self):
            self.times: list[float] = []
            self._start = None

        def _now(self) -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            if self._start is not None:
                self.times.append(self._now() - self._start)
                self._start = None

    return StepTimer()


def run_worker(script: str, payload: dict, timeout: float | None = None) -> dict:
    """`script --_worker <payload as JSON>` in a fresh Python process; its result is the last stdout line that starts
    with `RESULT_MARKER`. A timeout, or an exit without a result, is a failed result with the end of its stderr."""
    try:
        proc = subprocess.run(
            [sys.executable, script, "--_worker", json.dumps(payload)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout} s"}
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if not lines:
        return {"status": "failed", "error": f"worker exited with {proc.returncode} without a result:\n{tail}"}
    result = json.loads(lines[-1][len(RESULT_MARKER) :])
    if result.get("status") == "failed":
        result["stderr_tail"] = tail
    return result


def _ratio(a, b):
    if a is None or b is None or not (b > 0):
        return None
    return a / b


def _fmt(x, spec="{:.2f}", none="–"):
    return none if x is None else spec.format(x)


def _mb(x):
    if x is None:
        return "–"
    return f"{x / 1024:.2f} GB" if abs(x) >= 1024 else f"{x:.0f} MB"


# What each repeat keeps of its own in a merged result (`merge_runs`): its raw step times and readings
PER_RUN_KEYS = ("step_times_s", "timed_from", "median_step_s", "train_mem_mb", "load_avg_end")


def merge_runs(runs: list[dict]) -> dict:
    """Several repeats of one variant: pool the timed steps (median, mean, min and quartiles of the pool), keep the
    median of the scalar numbers, and under `runs` each repeat's own step times, median step, training memory and
    load average (the spread between runs)."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return runs[-1]
    merged = {key: value for key, value in ok[0].items() if key not in PER_RUN_KEYS}
    merged["runs"] = [{key: r.get(key) for key in PER_RUN_KEYS} for r in ok]
    pooled = [t for r in ok if r.get("step_times_s") for t in r["step_times_s"][r["timed_from"] :]]
    if pooled:
        merged["median_step_s"] = statistics.median(pooled)
        merged["mean_step_s"] = statistics.fmean(pooled)
        merged["min_step_s"] = min(pooled)
        quartiles = statistics.quantiles(pooled, n=4, method="inclusive") if len(pooled) > 1 else [pooled[0]] * 3
        merged["step_quartiles_s"] = [quartiles[0], quartiles[2]]
        merged["steps_timed"] = len(pooled)
    else:
        merged["median_step_s"] = None
    for key in ("init_s", "prefill_s", "train_s", "wall_s", "peak_mb", "train_mem_mb", "model_mb", "base_mb"):
        values = [r[key] for r in ok if r.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    merged["repeats"] = len(ok)
    return merged
