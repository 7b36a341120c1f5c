"""`benchmarks/benchmark.py` runs end to end at toy size and reports every row. No timing assertions."""

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trl_selfdistill import SelfDistillConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"
VARIANTS = ("sft", "selfdistill", "selfdistill_cache", "gkd")
HAS_CACHE = "teacher_cache_dir" in {f.name for f in dataclasses.fields(SelfDistillConfig)}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("sd_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(x, low=0.0, high=math.inf):
    return isinstance(x, (int, float)) and math.isfinite(x) and low <= x <= high


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_step_table_has_every_row_with_sane_numbers(smoke):
    results, stdout = smoke
    assert results["settings"]["smoke"] and results["machine"]["torch"] and results["machine"]["cpu"]
    rows = {(r["mode"], r["variant"]): r for r in results["steps"]}
    assert set(rows) == {(m, v) for m in ("lora", "full") for v in VARIANTS}
    steps, warmup = results["settings"]["steps"], results["settings"]["warmup"]
    for (mode, variant), row in rows.items():
        r = row["result"]
        if variant == "selfdistill_cache" and not HAS_CACHE:
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", (mode, variant, r)
        assert r["steps_timed"] == steps - warmup
        # The cache row trains two epochs over the same batches: one filling the cache, one reading it
        assert r["steps_run"] == (2 * steps if variant == "selfdistill_cache" else steps)
        assert finite(r["median_step_s"], 1e-5, 60) and finite(r["wall_s"], 0, 600)
        assert finite(r["peak_mb"], 1, 1e6) and finite(r["train_mem_mb"], -1e3, 1e6)
        assert finite(row["time_ratio"], 1e-3, 1e3)
    for mode in ("lora", "full"):
        assert rows[mode, "sft"]["time_ratio"] == 1.0
        teacher = "adapter_disabled" if mode == "lora" else "model_copy"
        assert rows[mode, "selfdistill"]["result"]["teacher"] == teacher
        assert finite(rows[mode, "selfdistill"]["result"]["logged"]["kl"])
        if HAS_CACHE:
            cache = rows[mode, "selfdistill_cache"]["result"]
            assert finite(cache["fill_median_step_s"], 1e-5, 60)
            if "teacher_cache_hit" in cache["logged"]:
                assert cache["logged"]["teacher_cache_hit"] == pytest.approx(0.5)  # epoch 1 misses, epoch 2 hits
    assert "| mode | trainer | median s/step |" in stdout and "GKDTrainer (teacher copy)" in stdout


def test_wall_time_table(smoke):
    results, _ = smoke
    rows = {(r["mode"], r["variant"]): r["result"] for r in results["wall"]}
    assert set(rows) == {(m, v) for m in ("lora", "full") for v in ("sft", "selfdistill", "selfdistill_cache")}
    for (mode, variant), r in rows.items():
        if variant == "selfdistill_cache" and not HAS_CACHE:
            continue
        assert r["status"] == "ok", (mode, variant, r)
        assert r["steps_run"] == 4  # 2 epochs × 2 batches
        assert finite(r["wall_s"], 1e-4, 600) and r["wall_s"] >= r["train_s"]


def test_scaling_table_matches_the_naive_reference(smoke):
    results, stdout = smoke
    cells = results["scaling"]
    assert [(c["vocab"], c["seq"]) for c in cells] == [(512, 16), (512, 64), (2048, 16), (2048, 64)]
    for cell in cells:
        naive, fused = cell["naive"], cell["fused"]
        assert naive["status"] == fused["status"] == "ok"
        assert finite(naive["extra_mb"]) and finite(fused["extra_mb"])
        # Same random inputs in both runs: the fused CE + KL equals the full-logit one
        assert fused["loss"] == pytest.approx(naive["loss"], rel=1e-4, abs=1e-6)
    assert "| vocab | seq (N) | naive extra memory |" in stdout


def test_targets_are_reported(smoke):
    results, stdout = smoke
    names = [t["target"] for t in results["targets"]]
    assert any("lora: exact-KL step time" in n for n in names) and any("full: exact-KL step time" in n for n in names)
    assert any("GKDTrainer" in n for n in names) and any("wall time" in n for n in names)
    assert all(t["status"] in ("PASS", "MISS", "n/a") for t in results["targets"])
    assert "## Targets" in stdout


def test_target_verdicts_and_naive_skip_logic():
    bench = load_benchmark()

    def row(mode, variant, step, mem, table="steps"):
        return {"table": table, "mode": mode, "variant": variant,
                "result": {"status": "ok", "median_step_s": step, "wall_s": step, "train_mem_mb": mem}}

    steps = [row("lora", "sft", 1.0, 1000), row("lora", "selfdistill", 1.4, 1050), row("lora", "gkd", 1.2, 2000),
             row("full", "sft", 1.0, 4000), row("full", "selfdistill", 1.5, 5000)]
    wall = [row("lora", "sft", 10.0, 0, "wall"), row("lora", "selfdistill_cache", 12.0, 0, "wall")]
    for rows in (steps, wall):
        for r in rows:
            ref = next(x for x in rows if x["mode"] == r["mode"] and x["variant"] == "sft")["result"]
            key = "wall_s" if r["table"] == "wall" else "median_step_s"
            r["time_ratio"] = r["result"][key] / ref[key]
            r["mem_ratio"] = bench._ratio(r["result"]["train_mem_mb"], ref["train_mem_mb"])
    verdicts = {t["target"].split(" (")[0]: t["status"] for t in bench.evaluate_targets(steps, wall, [])}
    assert verdicts["lora: exact-KL step time / SFT"] == "PASS"  # 1.4 ≤ 1.5
    assert verdicts["full: exact-KL step time / SFT"] == "MISS"  # 1.5 > 1.35
    assert verdicts["lora: exact-KL peak memory / SFT"] == "PASS"  # 1.05 ≤ 1.10
    assert verdicts["lora: exact-KL peak memory / GKDTrainer"] == "PASS"  # 0.525 ≤ 0.6
    assert verdicts["full: exact-KL peak memory / GKDTrainer"] == "n/a"  # no GKD row
    assert verdicts["lora: teacher-cache multi-epoch wall time / SFT"] == "MISS"  # 1.2 > 1.15


def test_cache_row_is_skipped_without_the_config_field(monkeypatch):
    bench = load_benchmark()
    monkeypatch.setattr(bench, "cache_supported", lambda: False)
    spec = dict(kind="variant", variant="selfdistill_cache", device="cpu", mode="lora", model="tiny", steps=2)
    result = bench.run_variant(spec)
    assert result["status"] == "skipped" and "teacher_cache_dir" in result["note"]
    sft = {"status": "ok", "median_step_s": 1.0, "train_mem_mb": 1.0, "peak_mb": 2.0, "steps_timed": 1, "init_s": 0.1}
    steps = [{"table": "steps", "mode": "lora", "variant": v, "result": r}
             for v, r in (("sft", sft), ("selfdistill_cache", result))]
    assert "skipped: SelfDistillConfig has no `teacher_cache_dir`" in bench.steps_table(steps, "cpu")
