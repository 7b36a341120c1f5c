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
import json
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
from .knowledge.results import ForgettingResults
from .teacher import causal_lm

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
EVAL_TEMPLATE = TEMPLATE.with_name("eval_section.md")  # `eval` against the base model, and lm-eval: in the card
EVAL_MARKERS = ("<!-- trl-selfdistill eval -->", "<!-- /trl-selfdistill eval -->")
PAPER_ID = "2604.15574"

# metric key: (label, higher is better, split, what the split holds); one table for the card and the model-index
METRICS = {
    "task_accuracy": ("Task accuracy", True, "train_known", "Known training facts"),
    "new_fact_accuracy": ("New-fact accuracy", True, "train_unknown", "Unknown training facts"),
    "heldout_known_accuracy": ("Held-out Known accuracy", True, "heldout_known", "held-out Known facts"),
    "forgetting_from_start": ("Forgetting (relative, from the start)", False, "heldout_known", "held-out Known facts"),
    "forgetting_from_peak": (
        "Forgetting from the peak (relative, secondary)", False, "heldout_known", "held-out Known facts"
    ),
    "answered_known_accuracy": (
        "Held-out Known accuracy, facts answered at step 0", True, "heldout_known", "held-out Known facts"
    ),
    "answered_known_forgetting": (
        "Forgetting of the facts answered at step 0 (relative)", False, "heldout_known", "held-out Known facts"
    ),
}
PERCENT_METRICS = ("forgetting_from_start", "forgetting_from_peak", "answered_known_forgetting")
# Hub metric ids (https://hf.co/metrics) of the metrics that have one; the forgetting figures have none
HUB_METRIC_TYPES = {"task_accuracy": "accuracy", "new_fact_accuracy": "accuracy", "heldout_known_accuracy": "accuracy",
                    "answered_known_accuracy": "accuracy"}
EVAL_RESULTS_DIR = ".eval_results"

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
SCOPE_LABELS = {
    "completion": "completion tokens (the tokens the CE loss trains on)",
    "all": "every non-padding token",
    "prompt": "prompt tokens (the real tokens the CE loss does not train on)",
}

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
    tracker_urls: dict[str, str] = field(default_factory=dict)  # wandb, trackio, comet: the run's pages (badges)
    training_format: str | None = None  # conversational, prompt-completion or language modeling
    training_prompt: str | None = None  # the first training prompt, when prompts are plain text

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
            metric_type=HUB_METRIC_TYPES.get(key, key),
            metric_name=label,
            metric_value=final[key],
        )
        for key, (label, _, split, what) in METRICS.items()
        if final.get(key) is not None
    ]


def eval_results_entries(results: ForgettingResults | None, source_url: str | None = None) -> dict[str, list[dict]]:
    """
    The Hub's eval results (`.eval_results/<name>.yaml`, https://hf.co/docs/hub/eval-results) of `results`: one file
    per evaluated set that has a Hub dataset id: the knowledge facts when they were loaded from the Hub (held-out Known
    accuracy, which the notes mark as a subset: it is not the benchmark's own score) and each lm-eval task whose
    dataset is on the Hub (its first metric, as lm-eval reports it, in percent).
    Sets without a Hub id (the package's own facts, local files) have no entry: the card's table shows them.
    """
    results = results or {}
    source = {"url": source_url, "name": "trl-selfdistill"} if source_url else None
    files: dict[str, list[dict]] = {}

    def add(name, dataset_id, task_id, value, notes):
        entry = {"dataset": {"id": dataset_id, **({"task_id": task_id} if task_id else {})},
                 "value": round(100 * value, 2), "notes": notes}
        files[re.sub(r"[^\w.-]", "_", name)] = [{**entry, **({"source": source} if source else {})}]

    final = results.get("final") or {}
    if is_hub_id(results.get("facts")) and final.get("heldout_known_accuracy") is not None:
        size = (results.get("sizes") or {}).get("heldout_known")
        add(results["facts"].split("/")[-1], results["facts"], None, final["heldout_known_accuracy"],
            f"held-out Known subset{f' ({size} facts)' if size else ''}: the facts the base model knew, not the "
            "whole set; closed-book exact match over aliases (trl-selfdistill)")
    lm_eval = results.get("lm_eval") or {}
    for task, metrics in (lm_eval.get("model") or {}).items():
        dataset_id = (lm_eval.get("datasets") or {}).get(task)
        if is_hub_id(dataset_id) and metrics:
            metric, value = next(iter(metrics.items()))
            add(task, dataset_id, task, value, f"lm-eval {task} {metric}")
    return files


def write_eval_results(
    folder: str | os.PathLike, results: ForgettingResults | None, source_url: str | None = None
) -> list[Path]:
    """Write `eval_results_entries` as `<folder>/.eval_results/<name>.yaml`; returns the files written."""
    import yaml

    written = []
    for name, entries in eval_results_entries(results, source_url).items():
        path = Path(folder) / EVAL_RESULTS_DIR / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(_sanitize_tree(entries), sort_keys=False), encoding="utf-8")
        written.append(path)
    return written


def _results_context(results: ForgettingResults | None) -> dict:
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
        "collapse": _collapse_warning(results.get("collapse")),
        "collapse_line": _collapse_line(results.get("collapse")),
    }


def _collapse_line(collapse: dict | None) -> str | None:
    """The collapse diagnostic in one sentence, for every run that recorded it (`knowledge.metrics.collapse`)."""
    if not collapse:
        return None
    share = _format(collapse.get("lost_to_default_share"), True)
    start, end = collapse.get("default_answer_share_start"), collapse.get("default_answer_share_end")
    text = f"Held-out Known facts lost since the start: {collapse['lost']}"
    if collapse["lost"]:
        text += f", {collapse['lost_to_default']} of them ({share}) now answered with a default answer"
    if start is not None and end is not None:
        text += (f"; default answers among all held-out answers: {_format(start, True)} at the start, "
                 f"{_format(end, True)} at the end")
    return text + "."


def _collapse_warning(collapse: dict | None) -> str | None:
    """The card's warning when the collapse diagnostic fired (`knowledge.metrics.collapse`), else None; the counts and
    shares are in `_collapse_line`, printed just above it."""
    if not collapse or not collapse.get("fired"):
        return None
    return ("**Collapse onto default answers.** Most held-out Known facts this run lost are now answered with a "
            "default answer (the training mix's most common answers, or what the model answers about any entity of "
            "the relation): the new facts' common answers are taking over what the model knew. Mix Known facts with "
            "varied answers, lower the learning rate or stop earlier.")


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
    fmt = results.get("format") or {}
    prompt_format = fmt.get("prompt") if _follows(info.training_prompt, fmt) else None
    sizes = results.get("sizes") or {}
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        info=info,
        base_model_is_hub=is_hub_id(info.base_model),
        hub_datasets=[d for d in info.datasets if is_hub_id(d)],
        repo_id=info.hub_model_id or info.model_name,
        divergence_label=DIVERGENCE_LABELS.get(info.divergence, info.divergence),
        scope_label=SCOPE_LABELS.get(info.distill_scope, info.distill_scope),
        sizes=[(SIZE_LABELS.get(k, k.replace("_", " ")), n) for k, n in sizes.items() if n is not None],
        prompt_format=prompt_format,
        example_prompt=_example_prompt(info, prompt_format),
        example_question=repr(EXAMPLE_QUESTION),
        eval_format=_format_phrase(fmt),
        paper_id=PAPER_ID,
        results_file=RESULTS_FILE,
        eval_section=eval_section(info.results),
        **_results_context(info.results),
    )


def eval_section(results: dict | None) -> str:
    """The card's section for `eval` results (comparison with the base model, lm-eval before/after), between
    `EVAL_MARKERS` so that a later `eval --record` replaces it; "" when there are none."""
    import jinja2

    context = _eval_context(results)
    if not (context["comparison"] or context["lm_eval_rows"]):
        return ""
    text = jinja2.Template(EVAL_TEMPLATE.read_text(encoding="utf-8")).render(**context).strip()
    return f"{EVAL_MARKERS[0]}\n{text}\n{EVAL_MARKERS[1]}"


def record_eval(folder: str | os.PathLike, results: dict) -> list[Path]:
    """
    Add `eval`'s results (the comparison with the base model, the lm-eval table) to a model folder: into its
    `forgetting_results.json` (created if missing), its card (`README.md`: the section between `EVAL_MARKERS`,
    replaced or appended) and its Hub eval results (`.eval_results/`). Returns the files written.
    """
    folder = Path(folder)
    path = folder / RESULTS_FILE
    stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    stored.update({key: results[key] for key in ("comparison", "lm_eval") if results.get(key)})
    stored.setdefault("facts", results.get("facts"))
    stored["eval"] = {key: results.get(key) for key in ("model", "base_model", "facts", "num_facts", "accuracy",
                                                         "base_accuracy", "format")}
    stored = _sanitize_tree(stored)
    path.write_text(json.dumps(stored, indent=2), encoding="utf-8")
    section = eval_section(stored)
    card_path = folder / "README.md"
    text = card_path.read_text(encoding="utf-8") if card_path.is_file() else f"# {folder.name}\n"
    start, end = text.find(EVAL_MARKERS[0]), text.find(EVAL_MARKERS[1])
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(EVAL_MARKERS[1]):]
    else:  # at the end of the Results (before the next section of the package's card), else at the end
        after = [text.find(heading) for heading in ("\n## Training hyperparameters", "\n## Citations")]
        at = min([i for i in after if i >= 0], default=len(text.rstrip("\n")))
        text = text[:at].rstrip("\n") + "\n\n" + section + "\n" + text[at:]
    card_path.write_text(sanitize(text), encoding="utf-8")
    return [path, card_path, *write_eval_results(folder, stored)]


EXAMPLE_QUESTION = "What is the capital of France?"


def _example_prompt(info: CardInfo, prompt_format: str | None) -> str | None:
    """The Quick start's prompt string: the training format filled in when known; for plain-text training data in an
    unknown format, the question alone (the snippet says to write it as the training prompts are written); None for
    chat training data or when the training data is unknown (the snippet then passes chat messages)."""
    if prompt_format:
        return repr(prompt_format.replace("{question}", EXAMPLE_QUESTION))
    plain = info.training_format and not info.training_format.startswith("conversational")
    return repr(EXAMPLE_QUESTION) if plain else None


def _follows(training_prompt: str | None, fmt: dict) -> bool:
    """Whether a training prompt is the plain format `fmt` filled in (so the format is the training format)."""
    template = fmt.get("prompt")
    if not training_prompt or not template or fmt.get("chat") or "{question}" not in template:
        return False
    pattern = re.escape(template).replace(re.escape("{question}"), ".+")
    return re.fullmatch(rf"(?s)(.*\n)?{pattern}", training_prompt) is not None


def _format_phrase(fmt: dict) -> str | None:
    """How the facts were asked, in words: chat or plain, the prompt, zero-shot or with shots."""
    if not fmt.get("prompt"):
        return None
    shots = fmt.get("num_shots") or 0
    kind = "as a chat user turn" if fmt.get("chat") else "in plain text"
    return f"{kind} `{fmt['prompt']!r}`" + (f" after {shots} same-relation exemplars" if shots else ", zero-shot")


def _eval_context(results: dict | None) -> dict:
    """The `eval` sections of a card: the comparison with the base model and the lm-eval before/after table."""
    results = results or {}
    context = {"comparison": None, "lm_eval_rows": [], "lm_eval_limit": None}
    comparison = results.get("comparison")
    if comparison:
        def row(label, stats):
            interval = stats["forgetting"]
            low = "" if interval.get("low") is None else f" [{interval['low']:.1%}, {interval['high']:.1%}]"
            return {"label": label, "n": stats["num_facts"], "base": _format(stats["base_accuracy"]),
                    "tuned": _format(stats["tuned_accuracy"]),
                    "forgetting": f"{interval['mean']:.1%}{low}" if interval.get("mean") is not None else "–",
                    "lost": stats["lost"], "gained": stats["gained"], "p": f"{stats['sign_test_p']:.3g}"}

        rows = [row("all", comparison["all"])]
        for key, groups in comparison.items():
            rows += [row(f"{key.removeprefix('by_')} = {label}", stats)
                     for label, stats in (groups.items() if key != "all" else [])]
        run = results.get("eval") or results  # `record_eval` keeps eval's own fields under `eval`
        context["comparison"] = {"rows": rows, "num_facts": comparison["all"]["num_facts"],
                                 "facts": run.get("facts"), "format": _format_phrase(run.get("format") or {})}
    lm_eval = results.get("lm_eval") or {}
    for task, metrics in (lm_eval.get("model") or {}).items():
        before = (lm_eval.get("base_model") or {}).get(task, {})
        context["lm_eval_rows"] += [{"task": task, "metric": metric, "base": _format(before.get(metric)) or "–",
                                     "tuned": _format(value)} for metric, value in metrics.items()]
    context["lm_eval_limit"] = lm_eval.get("limit")
    return context


def _versions() -> dict[str, str]:
    from . import __version__

    versions = {"trl_selfdistill": __version__}
    for package in ("trl", "transformers", "peft", "torch", "datasets", "tokenizers"):  # TRL's list, and ours
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


def run_results(trainer) -> ForgettingResults | None:
    """This run's forgetting results, once it has evaluated: those of `trainer.knowledge_monitor` (the
    `ForgettingCallback` attached to report, see `ForgettingCallback.attach`), or of a trainer that has none, such as a
    plain `trl.SFTTrainer` given `callbacks=[ForgettingCallback(...)]`, of its reporting `ForgettingCallback`.

    A results file in `output_dir` is never read: it may be an earlier run's, and a card must describe this one.
    """
    monitor = getattr(trainer, "knowledge_monitor", None)
    if monitor is None:
        callbacks = trainer.callback_handler.callbacks
        monitor = next((c for c in callbacks if isinstance(c, ForgettingCallback) and c.report), None)
    results = monitor.results() if monitor is not None else None
    return results if results and results.get("final") else None


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
        base_model=getattr(args, "card_base_model", None) or base_model_name(model),
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
        tracker_urls=_tracker_urls(),
        **_training_format(train_dataset),
    )


def _tracker_urls() -> dict[str, str]:
    """The run's Weights & Biases, Trackio and Comet pages, found as TRL's `create_model_card` finds them."""
    from transformers import is_wandb_available
    from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url

    urls = {"trackio": get_trackio_space_url(), "comet": get_comet_experiment_url()}
    if is_wandb_available():
        import wandb

        urls["wandb"] = wandb.run.url if wandb.run is not None else None
    return {name: url for name, url in urls.items() if url}


def _training_format(dataset) -> dict:
    """`training_format` and `training_prompt` of a card from the training data's first row (none when unknown)."""
    from trl.data_utils import is_conversational

    try:
        row = next(iter(dataset))
    except (TypeError, StopIteration):
        return {}
    if is_conversational(row):
        return {"training_format": "conversational (the tokenizer's chat template)"}
    if isinstance(row.get("prompt"), str):
        return {"training_format": "prompt-completion (plain text)", "training_prompt": row["prompt"]}
    if "text" in row:
        return {"training_format": "language modeling (a `text` column)"}
    return {}


def write_model_card(trainer, model_name=None, dataset_name=None, tags=None) -> Path | None:
    """Write `<output_dir>/README.md` on the main process (returns its path; `None` on the other processes)."""
    if not trainer.is_world_process_zero():
        return None
    info = card_info(trainer, model_name, dataset_name, tags)
    card = render_model_card(info)
    path = Path(trainer.args.output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(path)
    hub_url = f"https://huggingface.co/{info.hub_model_id}" if info.hub_model_id else None
    write_eval_results(path.parent, info.results, hub_url)
    return path
