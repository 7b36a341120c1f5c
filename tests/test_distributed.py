"""Real 2-process runs on CPU (gloo), one per engine × teacher mode, against a 1-process run of the same global batch.

Engines come from TRL's shipped accelerate configs (`trl/accelerate_configs/{fsdp2,zero2,zero3}.yaml`) with
`--num_processes 2 --mixed_precision no`; `cpu_engines/sitecustomize.py` switches them on for CPU (accelerate would
silently fall back) and every cell asserts the engine was active and the student sharded where the engine shards it.

Tolerance against 1 process: the gradients differ by fp32 reduction order (~1e-7 relative), which Adam at these
learning rates turns into up to ~1e-4 absolute on weights of size ~0.1 after 4 steps; DDP shows the same gap, so
`WEIGHT_ATOL` is an engine-independent bound. The KL per step agrees to `KL_RTOL`. bitsandbytes' 4-bit CPU matmul
depends on the batch shape (plain DDP QLoRA differs from 1 process by ~7e-2), so QLoRA cells compare the KL curve
loosely and are exact against each other only through `ranks identical`.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import trl
from accelerate.utils import DistributedType
from conftest import tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trl_selfdistill.distributed import check_engine
from trl_selfdistill.teacher import ModelTeacher

HERE = Path(__file__).parent
TRL_CONFIGS = Path(trl.__file__).parent / "accelerate_configs"
LAUNCH = {
    "ddp": ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"],
    "fsdp2": ["--config_file", str(TRL_CONFIGS / "fsdp2.yaml")],
    "zero2": ["--config_file", str(TRL_CONFIGS / "zero2.yaml")],
    "zero3": ["--config_file", str(TRL_CONFIGS / "zero3.yaml")],
}
ENGINE = {  # what the ranks must report: (accelerate distributed type, FSDP version, ZeRO stage, student sharded)
    "ddp": ("MULTI_CPU", None, None, False),
    "fsdp2": ("FSDP", 2, None, True),
    "zero2": ("DEEPSPEED", None, 2, False),
    "zero3": ("DEEPSPEED", None, 3, True),
}
STEPS, BATCH = 4, 2  # per device: the 1-process reference runs 2 × BATCH
WEIGHT_ATOL, KL_RTOL = 2e-4, 1e-4
QLORA_KL_RTOL = 0.1


def _run(cmd: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "cpu_engines"), str(HERE), str(HERE.parent)]),
           "OMP_NUM_THREADS": "1"}
    # The first DeepSpeed launch on a machine compiles its CPU shared-memory op (about two minutes)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [torch.load(path) for path in sorted(out.glob("rank*.pt"))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("distributed")
    tiny_model().save_pretrained(path / "base")  # the QLoRA base and the `path` teacher: the initial student
    return path


@pytest.fixture(scope="module")
def launch(workdir):
    """`launch(engine, mode, **spec)`: the rank outputs of a 2-process run (engine None: 1 process, 2 × BATCH)."""

    @functools.cache
    def run(engine, mode, flags=(), **spec):
        name = f"{engine}-{mode}-{abs(hash((flags, json.dumps(spec, sort_keys=True))))}"
        out = workdir / name
        spec = {"out": str(out), "mode": mode, "base": str(workdir / "base"), "steps": STEPS,
                "batch": BATCH if engine else 2 * BATCH, **spec}
        worker = [str(HERE / "distributed_train.py"), json.dumps(spec)]
        if engine is None:
            return _run([sys.executable, *worker], out)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCH[engine], *flags,
               "--num_processes", "2", "--mixed_precision", "no", *worker]
        return _run(cmd, out)

    return lambda engine, mode, flags=(), **spec: run(engine, mode, tuple(flags), **spec)


def kl_curve(rank: dict) -> torch.Tensor:
    return torch.tensor([log["kl"] for log in rank["logs"] if "kl" in log], dtype=torch.float64)


def assert_engine(rank: dict, engine: str):
    assert rank["world"] == 2
    assert (rank["engine"], rank["fsdp_version"], rank["zero_stage"], rank["student_sharded"]) == ENGINE[engine]


def assert_ranks_identical(ranks: list[dict]):
    assert len(ranks) == 2 and ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name


CELLS = [
    pytest.param("ddp", "lora", id="ddp-lora"),
    pytest.param("fsdp2", "lora", id="fsdp2-lora", marks=pytest.mark.slow),
    pytest.param("fsdp2", "qlora", id="fsdp2-qlora", marks=pytest.mark.slow),
    pytest.param("fsdp2", "full", id="fsdp2-full", marks=pytest.mark.slow),
    pytest.param("zero2", "full", id="zero2-full", marks=pytest.mark.slow),
    pytest.param("zero2", "qlora", id="zero2-qlora", marks=pytest.mark.slow),
    pytest.param("zero3", "lora", id="zero3-lora", marks=pytest.mark.slow),
    pytest.param("zero3", "full", id="zero3-full", marks=pytest.mark.slow),
    pytest.param("zero3", "path", id="zero3-path", marks=pytest.mark.slow),
    pytest.param("zero3", "adapter_copy", id="zero3-adapter_copy", marks=pytest.mark.slow),
]
SAVE_MODEL = {("fsdp2", "full"), ("zero3", "full")}
RESUME = {  # cells whose run also writes a checkpoint at step 2: the uninterrupted run of the resume test
    ("fsdp2", "lora"): ("--fsdp_state_dict_type", "SHARDED_STATE_DICT"),
    ("zero3", "full"): (),
}


def cell_spec(workdir: Path, engine: str, mode: str) -> dict:
    """The launch arguments of a cell: a checkpoint at step 2 for the resume test, a `save_model()` folder."""
    spec = {}
    if (engine, mode) in RESUME:
        spec.update(flags=RESUME[engine, mode], save_steps=2)
    if (engine, mode) in SAVE_MODEL:
        spec["save_model"] = str(workdir / f"saved-{engine}-{mode}")
    return spec


@pytest.mark.parametrize("engine, mode", CELLS)
def test_two_processes_match_one(launch, workdir, engine, mode):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    ranks = launch(engine, mode, **cell_spec(workdir, engine, mode))
    reference = launch(None, mode)[0]
    assert_engine(ranks[0], engine)
    assert_ranks_identical(ranks)
    rank = ranks[0]
    kl, kl_reference = kl_curve(rank), kl_curve(reference)
    assert kl[0] == 0.0 and kl[-1] > 0  # the teacher is the initial student, and the student moved away from it
    assert torch.equal(rank["teacher_before"], rank["teacher_after"])  # the teacher never trained
    # An adapter teacher's head is the student's: gathered once (FSDP2: one all-gather, one full copy), not twice
    shared = rank["teacher_kind"] in ("adapter_disabled", "adapter_copy")
    assert rank["heads_shared"] == [shared, shared], rank["teacher_kind"]
    torch.testing.assert_close(rank["teacher_before"], reference["teacher_before"], rtol=1e-5, atol=1e-5)
    if mode == "qlora":
        torch.testing.assert_close(kl, kl_reference, rtol=QLORA_KL_RTOL, atol=0)
    else:
        torch.testing.assert_close(kl, kl_reference, rtol=KL_RTOL, atol=1e-7)
        assert rank["state"].keys() == reference["state"].keys()
        for name, value in rank["state"].items():
            torch.testing.assert_close(value, reference["state"][name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    if rank["teacher_kind"] == "model_copy":
        # A separate frozen teacher is sharded like the student: each rank holds half of it under FSDP2 and ZeRO-3
        share = rank["teacher_bytes"] / rank["teacher_full_bytes"]
        assert share == pytest.approx(0.5, abs=0.05) if ENGINE[engine][3] else share == 1.0
    if (engine, mode) in SAVE_MODEL:
        loaded = dict(AutoModelForCausalLM.from_pretrained(workdir / f"saved-{engine}-{mode}").named_parameters())
        for name, value in rank["state"].items():
            assert torch.equal(loaded[name].detach(), value), name


@pytest.mark.slow
def test_bf16_mixed_precision_under_ddp(launch):
    """bf16 autocast with 2 processes: the teacher runs in the student's precision on every rank (the first KL is
    exactly 0), the ranks stay identical, and the one-gather metrics follow the 1-process run of the same batch."""
    ranks = launch("ddp", "lora", bf16=True)
    reference = launch(None, "lora", bf16=True)[0]
    assert_engine(ranks[0], "ddp")
    assert ranks[0]["mixed_precision"] == reference["mixed_precision"] == "bf16"
    assert_ranks_identical(ranks)
    kl, kl_reference = kl_curve(ranks[0]), kl_curve(reference)
    assert kl[0] == 0.0 and kl[-1] > 0
    torch.testing.assert_close(kl, kl_reference, rtol=5e-2, atol=1e-4)  # bf16 products: looser than fp32's KL_RTOL
    tokens = [log["num_tokens"] for log in ranks[0]["logs"] if "num_tokens" in log]
    assert tokens == [log["num_tokens"] for log in reference["logs"] if "num_tokens" in log]


def test_first_step_is_sft_trainers_with_and_without_token_averaging(launch):
    """DDP, LoRA, one SGD step without clipping (so the gradient's scale reaches the weights): the KL is 0 (the
    teacher is the initial student), so the step must move the weights exactly as SFTTrainer's does with the same
    `average_tokens_across_devices`, which sets how the CE is normalised across ranks."""
    one_step = dict(steps=1, optim="sgd", max_grad_norm=0.0)
    states = {}
    for average in (True, False):
        for trainer in ("selfdistill", "sft"):
            ranks = launch("ddp", "lora", trainer=trainer, average_tokens_across_devices=average, **one_step)
            assert_engine(ranks[0], "ddp")
            assert_ranks_identical(ranks)
            if trainer == "selfdistill":
                assert kl_curve(ranks[0]).tolist() == [0.0]
            states[trainer, average] = ranks[0]["state"]
    for average in (True, False):
        sft = states["sft", average]
        assert states["selfdistill", average].keys() == sft.keys() and sft
        for name, value in states["selfdistill", average].items():
            torch.testing.assert_close(value, sft[name], rtol=1e-5, atol=1e-8, msg=f"{name}, averaged: {average}")
    # the ranks hold different token counts here, so the setting matters: the comparison above could fail
    gap = max((states["sft", True][n] - states["sft", False][n]).abs().max().item() for n in states["sft", True])
    assert gap > 1e-5


@pytest.mark.parametrize("engine, mode", list(RESUME), ids=["fsdp2-lora-sharded", "zero3-full"])
def test_resume_reproduces_the_uninterrupted_run(launch, workdir, engine, mode):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    full = launch(engine, mode, **cell_spec(workdir, engine, mode))
    checkpoint = Path(full[0]["out"]) / "out" / "checkpoint-2"
    resumed = launch(engine, mode, RESUME[engine, mode], resume=str(checkpoint))
    assert_engine(resumed[0], engine)
    assert_ranks_identical(resumed)
    for name, value in full[0]["state"].items():
        assert torch.equal(resumed[0]["state"][name], value), name


@pytest.mark.slow
def test_accumulation_and_teacher_cache_on_a_sharded_teacher(launch, workdir):
    """FSDP2, full fine-tuning, 2 ranks × 1 row × accumulation 2: after the first epoch (checkpoint at step 4) the
    weights equal the 1-process run with batch 4, and the second epoch serves the teacher from the cache."""
    ranks = launch("fsdp2", "full", batch=1, accumulation=2, steps=2 * STEPS, save_steps=STEPS,
                   cache=str(workdir / "teacher-cache"))
    assert_engine(ranks[0], "fsdp2")
    assert_ranks_identical(ranks)
    logs = [log for log in ranks[0]["logs"] if "kl" in log]
    assert logs[0]["kl"] == 0.0
    assert [log["teacher_cache_hit"] for log in logs] == [0.0] * STEPS + [1.0] * STEPS
    reference = launch(None, "full", steps=2 * STEPS, save_steps=STEPS)  # the same learning-rate schedule
    epoch_one = [load_file(Path(run[0]["out"]) / "out" / f"checkpoint-{STEPS}" / "model.safetensors")
                 for run in (ranks, reference)]
    assert epoch_one[0].keys() == epoch_one[1].keys()
    for name, value in epoch_one[0].items():
        torch.testing.assert_close(value, epoch_one[1][name], rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_fsdp1_is_refused_with_what_works():
    fsdp1 = SimpleNamespace(
        distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1))
    )
    with pytest.raises(ValueError, match="FSDP1.*fsdp_version: 2"):
        check_engine(fsdp1)


def test_copy_of_a_zero3_partitioned_model_is_refused_with_the_path_to_load():
    model = tiny_model()
    model.name_or_path = "org/initial-model"
    next(model.parameters()).ds_id = 0  # what DeepSpeed's `zero.Init` sets on every parameter it partitions
    with pytest.raises(ValueError, match="teacher_model_name_or_path='org/initial-model'"):
        ModelTeacher.copy_of(model)
