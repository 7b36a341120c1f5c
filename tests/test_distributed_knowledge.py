"""`trl-selfdistill sft --knowledge_facts` end to end on 2 CPU processes under each engine, against 1 process.

The command is the user's, from a model folder: the launcher, the probe when training begins and the evaluations
during training, each rank taking its share of the batches (`knowledge.sharding`). `cpu_engines/sitecustomize.py` turns
FSDP and DeepSpeed on for the CPU in the launched processes, and the run's engine line says which one ran.

Equality with 1 process: the probe and the step-0 evaluation run on identical weights in identical batches, so their
categories, held-out facts and answers are equal. After training the weights differ by fp32 reduction order (~1e-7
relative, `test_distributed.py`), which may flip a near-tie greedy answer of the random tiny model: later evaluations
may differ by `FLIPS` held-out facts, no more.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import answered_facts, make_tokenizer, tiny_model, write_jsonl

HERE = Path(__file__).parent
QUESTIONS = [f"What is the capital of {country}?" for country in
             ("France", "Japan", "Peru", "Chile", "Kenya", "Cuba", "Spain", "Italy", "Ghana", "Nepal", "Laos",
              "Chad", "Oman", "Fiji", "Iraq", "Mali")]
LAUNCH = {
    None: [],
    # DDP on CPU is accelerate's MULTI_CPU (gloo), which `use_cpu` asks for
    "ddp": ["--num_processes", "2", "--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no", "--use_cpu",
            "true"],
    "fsdp2": ["--accelerate_config", "fsdp2", "--num_processes", "2", "--mixed_precision", "no"],
    "zero3": ["--accelerate_config", "zero3", "--num_processes", "2", "--mixed_precision", "no"],
}
ENGINE_LINE = {None: "engine: one process", "ddp": "engine: DDP, 2 processes", "fsdp2": "engine: FSDP2, 2 processes",
               "zero3": "engine: DeepSpeed ZeRO-3, 2 processes"}
LORA = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
FLIPS = 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("knowledge-engines")
    tiny_model().save_pretrained(path / "model")
    make_tokenizer().save_pretrained(path / "model")
    answered_facts(path / "facts.jsonl", QUESTIONS)
    return path


def sft_command(workdir: Path, out: Path, facts: Path, *extra: str) -> list[str]:
    """The user's command: `trl-selfdistill sft` from the model folder, on the chat data, monitoring `facts`."""
    return [sys.executable, "-m", "trl_selfdistill.cli", "sft", "--model_name_or_path", str(workdir / "model"),
            "--dataset_name", str(HERE / "data" / "chat"), "--output_dir", str(out), "--report_to", "none", "--bf16",
            "false", "--disable_tqdm", "true", "--save_strategy", "no", "--knowledge_facts", str(facts),
            "--knowledge_batch_size", "4",
            "--knowledge_heuristics", "any",  # a random model answers every capital alike: all `prior`
            *extra]


def run_command(cmd: list[str], out: Path, engines: bool) -> tuple[dict, str, float]:
    """(the run's forgetting results, its stdout, its wall seconds)."""
    path = [str(HERE / "cpu_engines"), str(HERE.parent)] if engines else [str(HERE.parent)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "forgetting_results.json").read_text()), proc.stdout, wall


@pytest.fixture(scope="module")
def sft(workdir):
    """`sft(engine, mode)`: (results, stdout, wall seconds) of the CLI run; engine None: 1 process, batch 4."""
    done = {}

    def run(engine, mode):
        if (engine, mode) in done:
            return done[engine, mode]
        out = workdir / f"{engine}-{mode}"
        cmd = sft_command(workdir, out, workdir / "facts.jsonl", *LAUNCH[engine], "--max_steps", "2",
                          "--per_device_train_batch_size", "2" if engine else "4", "--learning_rate", "0.05",
                          "--knowledge_eval_steps", "1", "--knowledge_drift_size", "8",
                          *(LORA if mode == "lora" else []))
        results, stdout, wall = done[engine, mode] = run_command(cmd, out, engines=True)
        print(f"\n{engine or 'one process'} {mode}: {wall:.1f} s, probe {results['probe']['seconds']:.2f} s")  # -s
        return done[engine, mode]

    return run


def accuracies(results: dict) -> list[float]:
    return [entry["heldout_known_accuracy"] for entry in results["history"]]


CELLS = [
    pytest.param("ddp", "lora", id="ddp-lora"),
    pytest.param("fsdp2", "lora", id="fsdp2-lora", marks=pytest.mark.slow),
    pytest.param("zero3", "lora", id="zero3-lora", marks=pytest.mark.slow),
    pytest.param("zero3", "full", id="zero3-full", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("engine, mode", CELLS)
def test_knowledge_monitor_shared_by_two_processes_equals_one(sft, engine, mode):
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    one, _, _ = sft(None, mode)
    two, stdout, _ = sft(engine, mode)
    assert ENGINE_LINE[engine] in stdout
    if mode == "full":  # the partitioned student cannot be copied: the teacher came from the model's folder, unasked
        assert "loaded again" in stdout
    # The probe: the same categories, labels and monitored facts
    assert two["probe"]["reused"] is False and two["probe"]["categories"] == one["probe"]["categories"]
    assert two["probe"]["heuristics"] == one["probe"]["heuristics"]
    assert two["per_fact"]["heldout_ids"] == one["per_fact"]["heldout_ids"]
    assert two["sizes"] == one["sizes"] and two["sizes"]["heldout_known"] > 0
    # Step 0: the same answers, hence the same accuracies; no drift from the initial model yet
    assert two["per_fact"]["heldout_start"] == one["per_fact"]["heldout_start"]
    drifts = ("drift_kl", "representation_drift")
    assert ({k: v for k, v in two["history"][0].items() if k not in drifts}
            == {k: v for k, v in one["history"][0].items() if k not in drifts})
    assert two["history"][0]["drift_kl"] == pytest.approx(0.0, abs=1e-5)
    # Later evaluations: the same steps, accuracies within `FLIPS` facts
    assert [e["step"] for e in two["history"]] == [e["step"] for e in one["history"]] == [0, 1, 2]
    tolerance = FLIPS / two["sizes"]["heldout_known"] + 1e-9
    assert accuracies(two) == pytest.approx(accuracies(one), abs=tolerance)
    # drift after training: tiny (~1e-4) and as sensitive as the weights to the reduction order
    assert two["history"][-1]["drift_kl"] == pytest.approx(one["history"][-1]["drift_kl"], rel=0.25)


def test_probe_file_is_reused_for_its_model_and_redone_for_another(sft, workdir, tmp_path):
    """Categories from `trl-selfdistill probe`-like output are used as they are when this model probed them: the file
    calls half of the facts the model knows Unknown, so what is monitored shows whose categories were used."""
    one, _, _ = sft(None, "lora")
    facts = [json.loads(line) for line in (workdir / "facts.jsonl").read_text().splitlines()]
    probed_known = sorted(one["per_fact"]["heldout_ids"])
    listed = set(probed_known[: len(probed_known) // 2])
    for model, reused in ((str(workdir / "model"), True), ("some/other-model", False)):
        rows = [{**fact, "category": "HighlyKnown" if fact["id"] in listed else "Unknown", "heuristic": "none",
                 "probe_model": model} for fact in facts]
        path = write_jsonl(tmp_path / f"categorised-{reused}.jsonl", rows)
        out = tmp_path / f"out-{reused}"
        results, stdout, _ = run_command(sft_command(workdir, out, path, "--max_steps", "1",
                                                     "--per_device_train_batch_size", "2", "--knowledge_drift_size",
                                                     "0"), out, engines=False)
        assert results["probe"]["reused"] is reused
        if reused:  # said at start-up, before the model loads; the file's categories decide what is monitored
            assert f"knowledge: using the categories in the fact set, probed with {workdir / 'model'}" in stdout
            assert set(results["per_fact"]["heldout_ids"]) == listed
        else:  # probed again: every fact the model knows is monitored
            assert "not " + str(workdir / "model") in stdout
            assert sorted(results["per_fact"]["heldout_ids"]) == probed_known
            assert results["probe"]["categories"] == one["probe"]["categories"]
