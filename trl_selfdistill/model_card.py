"""Model cards that say how the model was trained and how much it forgot (the Hub push is `trl_selfdistill.hub`).

`render_model_card(CardInfo)` is pure (it reads only the environment, for secret values to redact): it fills the
package's own template (`templates/model_card.md`) and puts the forgetting metrics into the `model-index` metadata
through huggingface_hub's `EvalResult`, so the Hub page shows them.
`write_model_card(trainer)` gathers a `CardInfo` from a trainer and writes `<output_dir>/README.md`. The results it
shows are this run's only: those of a `ForgettingCallback` registered with the trainer, never a results file found
in `output_dir` (which may be an earlier run's). Every string that enters a card is sanitized: Hugging Face tokens and
secret environment values are redacted, absolute paths cut to their last component.
"""

import importlib.metadata
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from peft import PeftModel

from .config import HF_TOKEN
from .embedded import EMBEDDED_HUB_ID, cache_dir
from .knowledge.callback import RESULTS_FILE, ForgettingCallback
from .teacher import causal_lm

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
PAPER_ID = "2604.15574"

# metric key: (label, higher is better, split, what the split holds); one table for the card and the model-index
METRICS = {
    "task_accuracy": ("Task accuracy", True, "train_known", "Known training facts"),
    "new_fact_accuracy": ("New-fact accuracy", True, "train_unknown", "Unknown training facts"),
    "heldout_known_accuracy": ("Held-out Known accuracy", True, "heldout_known", "held-out Known facts"),
    "forgetting_from_peak": ("Forgetting from peak (relative)", False, "heldout_known", "held-out Known facts"),
    "forgetting_from_peak_abs": ("Forgetting from peak (absolute)", False, "heldout_known", "held-out Known facts"),
    "answered_known_accuracy": (
        "Held-out Known accuracy, facts answered at step 0", True, "heldout_known", "held-out Known facts"
    ),
    "answered_known_forgetting": (
        "Forgetting of the facts answered at step 0 (relative)", False, "heldout_known", "held-out Known facts"
    ),
}
PERCENT_METRICS = ("forgetting_from_peak", "answered_known_forgetting")
SIZE_LABELS = {
    "train_known": "Known facts trained on",
    "train_unknown": "Unknown (new) facts trained on",
    "heldout_known": "held-out Known facts (never trained on, measure forgetting)",
}
DIVERGENCE_LABELS = {
    "forward_kl": "forward KL, KL(teacher ‖ student)",
    "reverse_kl": "reverse KL, KL(student ‖ teacher)",
    "jsd": "generalized Jensen-Shannon divergence",
}
SCOPE_LABELS = {"completion": "completion tokens (the tokens the CE loss trains on)", "all": "every non-padding token"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SEGMENT = r"[^\s/\\`'\"()<>\[\]|,;]+"
_POSIX_PATH = re.compile(rf"(?<![\w./~-])~?/(?:{_SEGMENT}/)+({_SEGMENT})/?")
_WINDOWS_PATH = re.compile(rf"(?<!\w)[A-Za-z]:\\(?:{_SEGMENT}\\)*({_SEGMENT})\\?")
_SECRET_ENV = re.compile(r"TOKEN|SECRET|KEY|PASSWORD", re.IGNORECASE)
REDACTED = "[REDACTED]"


def sanitize(text: str) -> str:
    """Redact HF tokens and secret environment values; cut absolute paths to their last component."""
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and len(value) >= 8:
            text = text.replace(value, REDACTED)
    text = HF_TOKEN.sub(REDACTED, text)
    text = _POSIX_PATH.sub(r"\1", text)
    return _WINDOWS_PATH.sub(r"\1", text)


def _sanitize_tree(obj):
    if isinstance(obj, str):
        return sanitize(obj)
    if isinstance(obj, dict):
        return {_sanitize_tree(k): _sanitize_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize_tree(v) for v in obj]
    return obj


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repo id `owner/name` (what `base_model:` and `datasets:` metadata accept)."""
    return bool(name) and _HUB_ID.match(name) is not None


def display_name(name_or_path: str) -> str:
    """A Hub id unchanged; a local path (existing, absolute or home-relative) cut to its last component."""
    local = os.path.exists(name_or_path) or re.match(r"^(/|~|\.\.?/|[A-Za-z]:\\)", name_or_path)
    return re.split(r"[/\\]", name_or_path.rstrip("/\\"))[-1] if local else name_or_path


def base_model_name(model) -> str:
    """The base model's name for a card: its Hub id, a local folder's name, or else the architecture; never empty.

    A model loaded from the embedded model's fp32 cache folder is named by its Hub id: `from_pretrained` sets
    `_name_or_path` to the folder it loads from (`config.json` does not store it).
    """
    base = causal_lm(model)
    name_or_path = getattr(base.config, "_name_or_path", "") or ""
    if name_or_path:
        embedded = Path(name_or_path).expanduser().resolve() == cache_dir().resolve()
        return EMBEDDED_HUB_ID if embedded else display_name(name_or_path)
    return (getattr(base.config, "architectures", None) or [type(base).__name__])[0]


@dataclass
class CardInfo:
    """Everything a card shows. `distill_coef=0` (the default) describes plain SFT."""

    model_name: str
    base_model: str
    distill_coef: float = 0.0
    distill_temperature: float | None = None
    divergence: str | None = None
    jsd_beta: float | None = None
    distill_scope: str | None = None
    teacher_kind: str | None = None
    teacher_source: str | None = None
    freeze_report: str | None = None
    datasets: list[str] = field(default_factory=list)
    num_train_examples: int | None = None
    results: dict | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    hub_model_id: str | None = None
    library_name: str = "transformers"

    @property
    def distilled(self) -> bool:
        return bool(self.distill_coef)


def _format(value, percent: bool = False) -> str | None:
    if value is None:
        return None
    return f"{value:.1%}" if percent else f"{value:.3f}"


def _eval_results(info: CardInfo) -> list[EvalResult]:
    final = (info.results or {}).get("final") or {}
    # The facts measured: the knowledge set the results name (a monitor-only run), else the training data
    dataset = (info.results or {}).get("facts") or (info.datasets[0] if info.datasets else "custom")
    return [
        EvalResult(
            task_type="question-answering",
            task_name="Closed-book QA",
            dataset_type=dataset,
            dataset_name=f"{dataset} ({what})",
            dataset_split=split,
            metric_type=key,
            metric_name=label,
            metric_value=final[key],
        )
        for key, (label, _, split, what) in METRICS.items()
        if final.get(key) is not None
    ]


def _results_context(results: dict | None) -> dict:
    if not results:
        return {"result_rows": [], "baseline_name": None}
    final = results.get("final") or {}
    baseline = results.get("baseline") or {}
    rows = [
        {
            "label": f"{label} {'↑' if higher else '↓'}",
            "split": what,
            "value": _format(final.get(key), key in PERCENT_METRICS) or "–",
            "baseline": _format(baseline.get(key), key in PERCENT_METRICS) or "–",
        }
        for key, (label, higher, _, what) in METRICS.items()
        if final.get(key) is not None or baseline.get(key) is not None
    ]
    return {
        "result_rows": rows,
        "baseline_name": (baseline.get("name") or "baseline") if baseline else None,
        "heldout_initial": _format(final.get("heldout_known_initial")),
        "heldout_peak": _format(final.get("heldout_known_peak")),
        "heldout_final": _format(final.get("heldout_known_accuracy")),
        "final_step": final.get("step"),
        "per_category": {k: _format(v) for k, v in (final.get("per_category") or {}).items() if v is not None},
        "num_evaluations": len(results.get("history") or []),
    }


def render_model_card(info: CardInfo) -> ModelCard:
    """The card for `info`: metadata (base model, tags, `model-index` eval results) and the package's template."""
    info = CardInfo(**{f.name: _sanitize_tree(getattr(info, f.name)) for f in fields(info)})
    tags = [
        tag
        for tag in dict.fromkeys(["trl", "sft", "self-distillation", "trl-selfdistill", *info.tags])
        if info.distilled or tag != "self-distillation"
    ]
    eval_results = _eval_results(info)
    card_data = ModelCardData(
        base_model=info.base_model if is_hub_id(info.base_model) else None,
        datasets=[d for d in info.datasets if is_hub_id(d)] or None,
        library_name=info.library_name,
        pipeline_tag="text-generation",
        tags=tags,
        model_name=info.model_name,
        eval_results=eval_results or None,
    )
    results = info.results or {}
    prompt_format = (results.get("format") or {}).get("prompt")
    sizes = results.get("sizes") or {}
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        info=info,
        base_model_is_hub=is_hub_id(info.base_model),
        repo_id=info.hub_model_id or info.model_name,
        divergence_label=DIVERGENCE_LABELS.get(info.divergence, info.divergence),
        scope_label=SCOPE_LABELS.get(info.distill_scope, info.distill_scope),
        sizes=[(SIZE_LABELS.get(k, k.replace("_", " ")), n) for k, n in sizes.items() if n is not None],
        prompt_format=prompt_format,
        example_prompt=repr(prompt_format.replace("{question}", "What is the capital of France?"))
        if prompt_format
        else None,
        paper_id=PAPER_ID,
        results_file=RESULTS_FILE,
        **_results_context(info.results),
    )


def _versions() -> dict[str, str]:
    from . import __version__

    versions = {"trl_selfdistill": __version__}
    for package in ("trl", "transformers", "peft", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _hyperparameters(trainer, model) -> dict[str, Any]:
    args = trainer.args
    batch = args.per_device_train_batch_size
    hyperparameters = {
        "learning rate": args.learning_rate,
        "scheduler": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        **({"max steps": args.max_steps} if args.max_steps > 0 else {"epochs": args.num_train_epochs}),
        "steps trained": trainer.state.global_step,
        "per-device batch size": batch,
        "gradient accumulation steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
        "effective batch size": batch * args.gradient_accumulation_steps * args.world_size,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "seed": args.seed,
    }
    if isinstance(model, PeftModel):
        config = model.peft_config[model.active_adapter]
        targets = config.target_modules  # PEFT expands `all-linear` into full module names: keep their last part
        targets = ", ".join(sorted({t.split(".")[-1] for t in targets})) if not isinstance(targets, str) else targets
        hyperparameters["adapter"] = (
            f"{config.peft_type.value} r={config.r}, alpha={config.lora_alpha}, target modules: {targets}"
            if hasattr(config, "r")
            else config.peft_type.value
        )
    return hyperparameters


def run_results(trainer) -> dict | None:
    """This run's forgetting results: those of the `ForgettingCallback` registered with `trainer` that has evaluated.

    A results file in `output_dir` is never read: it may be an earlier run's, and a card must describe this one.
    """
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ForgettingCallback):
            results = callback.results()
            if results.get("final"):
                return results
    return None


def card_info(trainer, model_name=None, dataset_name=None, tags=None) -> CardInfo:
    """A `CardInfo` from a `SelfDistillSFTTrainer` (or a plain `trl.SFTTrainer`) and its output folder."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    hub_model_id = trainer.hub_model_id or args.hub_model_id
    if model_name is None:
        model_name = hub_model_id.split("/")[-1] if hub_model_id else Path(args.output_dir).name
    datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    teacher = getattr(trainer, "teacher", None)
    freeze_report = getattr(trainer, "freeze_report", None)
    distill_coef = getattr(args, "distill_coef", 0.0) or 0.0
    train_dataset = trainer.train_dataset
    return CardInfo(
        model_name=model_name,
        base_model=base_model_name(model),
        distill_coef=distill_coef,
        distill_temperature=getattr(args, "distill_temperature", None) if distill_coef else None,
        divergence=getattr(args, "divergence", None) if distill_coef else None,
        jsd_beta=getattr(args, "jsd_beta", None) if distill_coef else None,
        distill_scope=getattr(args, "distill_scope", None) if distill_coef else None,
        teacher_kind=teacher.kind if teacher is not None else None,
        teacher_source=teacher.source if teacher is not None else None,
        freeze_report=freeze_report.to_markdown() if freeze_report is not None else None,
        datasets=[display_name(d) for d in datasets],
        num_train_examples=len(train_dataset) if hasattr(train_dataset, "__len__") else None,
        results=run_results(trainer),
        hyperparameters=_hyperparameters(trainer, model),
        tags=[*getattr(trainer, "_tag_names", []), *([tags] if isinstance(tags, str) else tags or [])],
        versions=_versions(),
        hub_model_id=hub_model_id,
        library_name="peft" if isinstance(model, PeftModel) else "transformers",
    )


def write_model_card(trainer, model_name=None, dataset_name=None, tags=None) -> Path | None:
    """Write `<output_dir>/README.md` on the main process (returns its path; `None` on the other processes)."""
    if not trainer.is_world_process_zero():
        return None
    card = render_model_card(card_info(trainer, model_name, dataset_name, tags))
    path = Path(trainer.args.output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path
