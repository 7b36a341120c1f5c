"""`benchmarks/benchmark.py --suite --smoke` runs every table end to end at toy size and reports every row. No timing
assertions."""

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("sd_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def finite(x, low=0.0, high=math.inf):
    return isinstance(x, (int, float)) and math.isfinite(x) and low <= x <= high


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--suite", "--smoke", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}, proc.stdout


@pytest.fixture(scope="module")
def smoke(suite):
    """The suite's tables as one result: steps (SmolLM2 entry), wall time, scaling, and every target."""
    entries, stdout = suite
    results = dict(entries["smollm2-steps"])
    results["wall"] = entries["smollm2-3-epochs"]["wall"]
    results["scaling"] = entries["scaling"]["scaling"]
    results["targets"] = [t for name in ("smollm2-steps", "smollm2-3-epochs", "scaling")
                          for t in entries[name]["targets"]]
    return results, stdout


def test_suite_runs_each_entry_with_its_own_tables_and_reports_its_wall_time(suite):
    entries, stdout = suite
    on_cpu = load_benchmark()._device() == "cpu"
    # on CPU one more entry measures SmolLM2 at 1,024 tokens per micro-batch, where the memory goal vs GKD is set
    assert set(entries) == {"suite", "smollm2-steps", "smollm2-3-epochs", "qwen-steps", "scaling"} | (
        {"smollm2-1024-tokens"} if on_cpu else set())
    assert entries["suite"]["smoke"] and set(entries["suite"]["entries"]) == set(entries) - {"suite"}
    assert entries["smollm2-3-epochs"]["steps"] == [] and entries["scaling"]["wall"] == []
    assert entries["qwen-steps"]["scaling"] == [] and entries["qwen-steps"]["settings"]["variants"] == [
        "sft", "selfdistill", "gkd"]
    assert all(r["result"]["status"] == "ok" for r in entries["qwen-steps"]["steps"])
    assert entries["smollm2-steps"]["settings"]["repeats"] == 1
    assert entries["suite"]["complete"]  # suite.json is rewritten after each entry; the last write marks it whole
    assert "## Suite wall time" in stdout and "goal on one CUDA GPU" in stdout
    # every entry's targets, named by entry, in suite.json and in one printed table
    combined = entries["suite"]["targets"]
    assert combined == [{"entry": name, **t} for name in entries["suite"]["entries"] for t in entries[name]["targets"]]
    assert {t["entry"] for t in combined} == set(entries) - {"suite"}
    assert "## Targets, every entry" in stdout and "| smollm2-steps | lora: exact-KL peak memory" in stdout
    gkd_memory = {t["entry"]: t for t in combined if t["target"].startswith("lora: exact-KL peak memory / GKD")}
    assert gkd_memory["smollm2-steps"]["status"] == "n/a" and "128 here" in gkd_memory["smollm2-steps"]["note"]
    if on_cpu:
        at_1024 = entries["smollm2-1024-tokens"]["settings"]
        assert at_1024["batch"] * at_1024["seq"] == 1024
        assert gkd_memory["smollm2-1024-tokens"]["note"] == ""
        assert gkd_memory["smollm2-1024-tokens"]["status"] in ("PASS", "MISS")  # a verdict at 1,024 tokens


def test_suite_entries_per_device_and_repeats(monkeypatch, tmp_path):
    """On CUDA the 1,024-token entry is left out (the SmolLM2 table has 4,096 there); `--repeats` reaches the step
    tables only."""
    bench = load_benchmark()
    calls = []

    def fake_main(argv):
        calls.append(argv)
        return {"targets": []}

    monkeypatch.setattr(bench, "main", fake_main)
    monkeypatch.setattr(bench, "_device", lambda: "cuda")
    bench.run_suite(str(tmp_path), repeats=3)
    names = [Path(argv[argv.index("--out") + 1]).stem for argv in calls]
    assert names == [e.name for e in bench.SUITE if e.name != "smollm2-1024-tokens"]
    for name, argv in zip(names, calls, strict=True):
        has_steps = "--skip-steps" not in argv
        assert (argv[argv.index("--repeats") + 1] == "3") if has_steps else "--repeats" not in argv, name
        assert argv[argv.index("--timeout") + 1] == str(bench.SUITE_RUN_TIMEOUT)
    assert json.loads((tmp_path / "suite.json").read_text())["complete"]


def test_smoke_alone_runs_every_table_unless_one_is_named():
    bench = load_benchmark()
    plain = bench.parse_args(["--smoke"])
    assert plain.epochs == 2 and plain.scaling and not plain.skip_steps and plain.model == "tiny"
    named = bench.parse_args(["--smoke", "--scaling", "--skip-steps"])
    assert named.epochs is None and named.scaling
    assert bench.parse_args(["--smoke", "--variants", "sft,gkd"]).epochs is None


def test_step_table_has_every_row_with_sane_numbers(smoke):
    results, stdout = smoke
    assert results["settings"]["smoke"] and results["machine"]["torch"] and results["machine"]["cpu"]
    rows = {(r["mode"], r["variant"]): r for r in results["steps"]}
    assert set(rows) == {(m, v) for m in ("lora", "full") for v in ("sft", "selfdistill", "gkd")}  # the suite's
    steps, warmup = results["settings"]["steps"], results["settings"]["warmup"]
    repeats = results["settings"]["repeats"]
    for (mode, variant), row in rows.items():
        r = row["result"]
        assert r["status"] == "ok", (mode, variant, r)
        assert r["steps_timed"] == repeats * (steps - warmup) and r["steps_run"] == steps
        assert r["repeats"] == repeats
        assert finite(r["median_step_s"], 1e-5, 60) and finite(r["wall_s"], 0, 600)
        assert finite(r["peak_mb"], 1, 1e6) and finite(r["train_mem_mb"], -1e3, 1e6)
        assert finite(row["time_ratio"], 1e-3, 1e3)
    for mode in ("lora", "full"):
        assert rows[mode, "sft"]["time_ratio"] == 1.0
        teacher = "adapter_disabled" if mode == "lora" else "model_copy"
        assert rows[mode, "selfdistill"]["result"]["teacher"] == teacher
        assert finite(rows[mode, "selfdistill"]["result"]["logged"]["kl"])
    assert "| mode | trainer | median s/step |" in stdout and "GKDTrainer (teacher copy)" in stdout


def test_wall_time_table(smoke):
    results, _ = smoke
    rows = {(r["mode"], r["variant"]): r["result"] for r in results["wall"]}
    assert set(rows) == {(m, v) for m in ("lora", "full") for v in ("sft", "selfdistill_cache")}  # the suite's
    for (mode, variant), r in rows.items():
        assert r["status"] == "ok", (mode, variant, r)
        assert r["steps_run"] == 6  # the suite's 3 epochs × 2 batches of the smoke size
        assert finite(r["wall_s"], 1e-4, 600) and r["wall_s"] >= r["train_s"]
    for mode in ("lora", "full"):
        # The pre-pass filled the cache: every training step reads it, and its time counts in the wall time
        cache = rows[mode, "selfdistill_cache"]
        assert finite(cache["prefill_s"], 1e-5, 600) and cache["wall_s"] >= cache["prefill_s"] + cache["train_s"]
        assert cache["logged"]["teacher_cache_hit"] == pytest.approx(1.0)


@pytest.mark.parametrize("variants,want", [(None, ["sft", "selfdistill", "selfdistill_cache"]),
                                           ("sft,selfdistill", ["sft", "selfdistill"])])
def test_wall_table_runs_the_named_variants(variants, want):
    bench = load_benchmark()
    argv = ["--smoke", "--epochs", "1", "--skip-steps", "--mode", "lora"]
    argv += ["--variants", variants] if variants else []
    results = bench.main(argv)
    assert [r["variant"] for r in results["wall"]] == want
    assert all(r["result"]["status"] == "ok" for r in results["wall"])


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
    def verdicts_at(tokens):
        return {t["target"].split(" (")[0]: t["status"] for t in bench.evaluate_targets(steps, wall, [], tokens)}

    verdicts = verdicts_at(1024)
    assert verdicts == verdicts_at(None)  # tokens unknown: every verdict given
    # below 1,024 tokens per micro-batch the memory goal vs GKD gives no verdict; the others stand
    assert verdicts_at(512) == {**verdicts, "lora: exact-KL peak memory / GKDTrainer": "n/a"}
    assert verdicts["lora: exact-KL step time / SFT"] == "PASS"  # 1.4 ≤ 1.4
    assert verdicts["full: exact-KL step time / SFT"] == "MISS"  # 1.5 > 1.35
    assert verdicts["lora: exact-KL peak memory / SFT"] == "PASS"  # 1.05 ≤ 1.10
    assert verdicts["lora: exact-KL peak memory / GKDTrainer"] == "PASS"  # 0.525 ≤ 0.6
    assert verdicts["full: exact-KL peak memory / GKDTrainer"] == "n/a"  # no GKD row
    steps.append(row("full", "gkd", 2.0, 6000))
    assert verdicts_at(1024)["full: exact-KL peak memory / GKDTrainer"] == "n/a"  # both hold a copy: info only
    assert verdicts["lora: teacher-cache multi-epoch wall time / SFT"] == "MISS"  # 1.2 > 1.15


def test_a_run_in_its_own_process_returns_its_result_or_its_error():
    """`dispatch` outside `--inprocess`: the worker's result line comes back; a worker that fails reports why."""
    bench = load_benchmark()
    cell = bench.ScalingSpec(method="fused", vocab=512, seq=16, hidden=64, device="cpu", threads=1)
    alone = bench.dispatch(cell, inprocess=False, timeout=300)
    here = bench.dispatch(cell, inprocess=True, timeout=None)
    assert alone["status"] == "ok" and alone["loss"] == pytest.approx(here["loss"], rel=1e-6)
    bad = bench.VariantSpec(model="nope", device="cpu", mode="lora", variant="sft", batch=1, seq=8, examples=1,
                            steps=1)
    failed = bench.dispatch(bad, inprocess=False, timeout=300)
    assert failed["status"] == "failed" and "unknown model 'nope'" in failed["error"]
    assert "ValueError" in failed["stderr_tail"]


def test_repeats_pool_the_steps_and_keep_each_runs_spread():
    bench = load_benchmark()

    def run(times, mem):
        return {"status": "ok", "step_times_s": times, "timed_from": 1, "median_step_s": statistics.median(times[1:]),
                "steps_timed": len(times) - 1, "train_mem_mb": mem, "wall_s": sum(times)}

    merged = bench.merge_runs([run([9.0, 1.0, 2.0, 3.0], 100.0), {"status": "failed"},
                               run([9.0, 4.0, 5.0, 6.0], 300.0)])
    assert merged["repeats"] == 2 and merged["steps_timed"] == 6  # the failed run and the warm-up steps are left out
    assert merged["median_step_s"] == 3.5 and merged["min_step_s"] == 1.0
    assert merged["step_quartiles_s"] == [2.25, 4.75]  # inclusive quartiles: within the pooled steps
    assert [(r["median_step_s"], r["train_mem_mb"]) for r in merged["runs"]] == [(2.0, 100.0), (5.0, 300.0)]
    assert merged["runs"][1]["step_times_s"] == [9.0, 4.0, 5.0, 6.0] and "step_times_s" not in merged  # each its own
    assert merged["train_mem_mb"] == 200.0
    row = {"mode": "lora", "variant": "sft", "result": merged}
    table = bench.steps_table([row], "cpu")
    assert "| 3.500 | 2.250–4.750 |" in table and "per repeat: median 2.000–5.000 s/step" in table
    single = bench.merge_runs([run([9.0, 1.0, 2.0, 3.0], 100.0)])
    assert single["repeats"] == 1 and single["median_step_s"] == 2.0 and single["steps_timed"] == 3
    two = bench.merge_runs([run([9.0, 1.0], 100.0), run([9.0, 2.0], 100.0)])
    assert two["step_quartiles_s"] == [1.25, 1.75]  # never outside the data, even for two steps
    # no timed step at all: the median is None (the tables show "–"), not missing
    empty = bench.merge_runs([{**run([9.0, 1.0], 100.0), "step_times_s": [], "median_step_s": None}])
    assert empty["median_step_s"] is None and "| – | – |" in bench.steps_table(
        [{"mode": "lora", "variant": "sft", "result": empty}], "cpu")
    assert "training memory 0.10 GB" in bench._notes({"result": two}, None)  # equal as printed: one value
