"""
Self-distillation SFT on your own data: TRL's `trl sft` script with the self-distillation term, freezing from the
command line, and knowledge monitoring.

```bash
trl-selfdistill sft --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct --dataset_name trl-lib/Capybara \
    --use_peft --lora_target_modules all-linear --distill_coef 1.0 --knowledge_facts curated --output_dir out
trl-selfdistill sft --config recipes/lora.yaml            # any field as YAML; the command line overrides it
accelerate launch -m trl_selfdistill.scripts.sft ...     # the same script under your own launcher
```

Every argument of `SelfDistillConfig` (TRL's `SFTConfig` plus the distillation fields), `ModelConfig` (PEFT,
quantization, dtype), `ScriptArguments`/`DatasetMixtureConfig` (the data) and of the two dataclasses below is a flag.
"""

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from trl_selfdistill.knowledge.formats import DEFAULT_PROMPTS

logger = logging.getLogger(__name__)

FREEZE_PRESETS = ("attention_only", "mlp_only")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class FreezeArguments:
    """What trains: a preset of `trl_selfdistill.FreezeConfig` and/or its fields (see docs/freezing.md)."""

    freeze: str | None = field(
        default=None,
        metadata={"help": f"Freezing preset: {', '.join(FREEZE_PRESETS)}. The `freeze_*` fields refine it."},
    )
    freeze_groups: list[str] | None = field(
        default=None, metadata={"help": "FreezeConfig.groups: parameter groups that train (e.g. attention mlp)."}
    )
    freeze_layers: str | None = field(
        default=None, metadata={"help": "FreezeConfig.layers: decoder layers that may train ('0-5', 'last_half')."}
    )
    freeze_include: list[str] | None = field(
        default=None, metadata={"help": "FreezeConfig.include: modules that also train (PEFT target_modules names)."}
    )
    freeze_exclude: list[str] | None = field(
        default=None, metadata={"help": "FreezeConfig.exclude: modules that stay frozen."}
    )

    def freeze_config(self):
        """The `FreezeConfig` these arguments describe, or None when none is set."""
        from trl_selfdistill import FreezeConfig

        fields = {
            name: value
            for name, value in dict(
                groups=self.freeze_groups,
                layers=self.freeze_layers,
                include=self.freeze_include,
                exclude=self.freeze_exclude,
            ).items()
            if value is not None
        }
        if self.freeze is None:
            return FreezeConfig(**fields) if fields else None
        if self.freeze not in FREEZE_PRESETS:
            raise ValueError(
                f"Unknown `--freeze {self.freeze}`: choose one of {', '.join(FREEZE_PRESETS)}, or set the "
                "`--freeze_groups/--freeze_layers/--freeze_include/--freeze_exclude` fields."
            )
        return getattr(FreezeConfig, self.freeze)(**fields)


@dataclass
class KnowledgeArguments:
    """Knowledge monitoring: which facts the initial model knows, and how much of them training forgets."""

    knowledge_facts: str | None = field(
        default=None,
        metadata={
            "help": "Facts to monitor: a built-in set (curated, entityquestions-dev, ...), a JSONL file or folder, or "
            "a Hub dataset of question/answers rows. When training begins the initial model is probed (SliCK), each "
            "process taking its share, unless the facts carry categories from this model (`trl-selfdistill probe` "
            "output); the facts it knows are evaluated during training (held-out Known accuracy, forgetting, drift)."
        },
    )
    knowledge_question_column: str = field(
        default="question", metadata={"help": "Column of the fact set holding the question (SimpleQA: `problem`)."}
    )
    knowledge_answers_column: str = field(
        default="answers",
        metadata={
            "help": "Column holding the gold answers: a list, one string, a JSON list in a string, or a nested "
            "field by dotted path (NQ-open: `answer`, PopQA: `possible_answers`, TriviaQA: `answer.aliases`)."
        },
    )
    knowledge_split: str = field(default="train", metadata={"help": "Split of a Hub fact set."})
    knowledge_exemplars: str | None = field(
        default=None,
        metadata={"help": "Few-shot exemplar pool of the probe (default: the facts themselves, never a fact's own)."},
    )
    knowledge_format: Literal["auto", "chat", "plain"] = field(
        default="auto",
        metadata={
            "help": "Format the facts are asked in. `auto`: chat (the tokenizer's chat template) when the training "
            "data is conversational, else plain `Q:/A:` text."
        },
    )
    knowledge_prompt: str | None = field(
        default=None,
        metadata={
            "help": f"Question template with {{question}}. Default: {DEFAULT_PROMPTS['chat']!r} in chat format, "
            f"{DEFAULT_PROMPTS['plain']!r} in plain format."
        },
    )
    knowledge_system_prompt: str | None = field(default=None, metadata={"help": "System message in chat format."})
    knowledge_probe_size: int | None = field(
        default=500, metadata={"help": "Facts probed (a seeded random sample); None or 0: all of them."}
    )
    knowledge_probe_prompts: int = field(
        default=3,
        metadata={"help": "Few-shot prompts per fact of the (greedy) probe. HighlyKnown: all of them answered "
                  "correctly; MaybeKnown: some. The monitor keeps both (SliCK's Known)."},
    )
    knowledge_heuristics: str = field(
        default="none",
        metadata={"help": "Heuristic labels of the Known facts monitored (comma-separated among none, copy, prior; "
                  "`any`: all). `none`: genuine facts only, whose answers the model can neither copy from the "
                  "question nor guess as the relation's default answer (docs/evaluation.md)."},
    )
    knowledge_reprobe: bool = field(
        default=False,
        metadata={"help": "Probe the facts even when they carry categories from this model (a file written by "
                  "`trl-selfdistill probe`, a `*-smollm2` set); categories from another model are always re-probed."},
    )
    knowledge_shots: int = field(
        default=4,
        metadata={
            "help": "Same-relation exemplars before each question when the Known facts are evaluated during training "
            "(0: zero-shot). Few-shot keeps the measure on what the model knows, not on how your data taught it to "
            "phrase answers (a chat model answers zero-shot in sentences, which exact match scores as wrong)."
        },
    )
    knowledge_heldout_size: int | None = field(
        default=200, metadata={"help": "Known facts evaluated during training; None or 0: every Known fact."}
    )
    knowledge_eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate the facts every N optimizer steps (default: with each evaluation of `eval_steps`, "
            "else at the start and the end only)."
        },
    )
    knowledge_batch_size: int = field(default=32, metadata={"help": "Sequences generated per batch."})
    knowledge_drift_size: int = field(
        default=64, metadata={"help": "Held-out prompts of the drift KL to the initial model (0: no drift)."}
    )
    knowledge_max_new_tokens: int = field(default=16, metadata={"help": "Generation budget per answer."})
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop when `metric_for_best_model` (e.g. knowledge/heldout_known_accuracy) has not improved for "
            "this many evaluations (transformers' EarlyStoppingCallback). Needs an eval split and `eval_strategy`."
        },
    )

    def __post_init__(self):
        for name in ("knowledge_probe_size", "knowledge_heldout_size"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"`{name}={value}` must be ≥ 0 (0 or None: all facts).")
            setattr(self, name, value or None)
        if self.knowledge_shots < 0:
            raise ValueError(f"`knowledge_shots={self.knowledge_shots}` must be ≥ 0 (0: zero-shot).")
        for name in ("knowledge_probe_prompts", "knowledge_batch_size", "knowledge_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}={getattr(self, name)}` must be ≥ 1.")
        if self.knowledge_eval_steps is not None and self.knowledge_eval_steps < 1:
            raise ValueError(f"`knowledge_eval_steps={self.knowledge_eval_steps}` must be ≥ 1 (or unset).")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"`early_stopping_patience={self.early_stopping_patience}` must be ≥ 1 (or unset).")
        self.heuristics()  # a bad label fails when the flags are parsed
        if self.knowledge_drift_size < 0:
            raise ValueError(f"`knowledge_drift_size={self.knowledge_drift_size}` must be ≥ 0 (0: no drift).")

    def heuristics(self) -> tuple[str, ...] | None:
        """`knowledge_heuristics` as the labels `monitor_splits` keeps (None: any)."""
        from trl_selfdistill.knowledge.heuristics import parse_heuristics

        return parse_heuristics(self.knowledge_heuristics, "--knowledge_heuristics")

    def answer_format(self, conversational: bool, tokenizer):
        """The `AnswerFormat` the facts are asked in (see `knowledge_format`)."""
        return answer_format(self.knowledge_format, self.knowledge_prompt, self.knowledge_system_prompt,
                             conversational, tokenizer, flag="--knowledge_format")


def answer_format(choice: str, prompt: str | None, system_prompt: str | None, conversational: bool, tokenizer=None,
                  flag: str = "--format"):
    """
    The `AnswerFormat` of the monitor (and of `eval`): `choice` `chat`, `plain`, or `auto` (chat when the data is
    `conversational`); `prompt` defaults to `DEFAULT_PROMPTS` of that mode. A typed `\\n` becomes a newline.
    """
    from trl_selfdistill.knowledge import AnswerFormat

    chat = {"chat": True, "plain": False}.get(choice, conversational)
    if chat and tokenizer is not None and tokenizer.chat_template is None:
        raise ValueError(
            f"`{flag} chat` needs a tokenizer with a chat template, and this one has none. Use `{flag} plain`, or "
            "set `--chat_template_path`."
        )
    return AnswerFormat.for_data(chat, prompt and prompt.replace("\\n", "\n"), system_prompt)


def check_inputs(script_args, training_args, knowledge_args) -> None:
    """The cheap checks of `trl_selfdistill.validation` that need no file of the model: steps, output folder, prompt
    template, data file. `trl-selfdistill sft` runs them before it launches any process, `main` before it loads
    anything."""
    from trl_selfdistill.validation import (
        check_data_file,
        check_output_dir,
        check_prompt_template,
        check_training_length,
    )

    check_training_length(training_args.max_steps, training_args.num_train_epochs)
    check_output_dir(training_args.output_dir)
    if knowledge_args is not None and knowledge_args.knowledge_prompt is not None:
        check_prompt_template(knowledge_args.knowledge_prompt, "`--knowledge_prompt`")
    if script_args.dataset_name:
        check_data_file(Path(script_args.dataset_name))


def check_models(training_args, model_args) -> None:
    """The model and teacher can be loaded (`validation.check_model_source`): checked before any model file is read."""
    from trl_selfdistill.validation import check_model_source

    init_kwargs = {"revision": model_args.model_revision, **(training_args.model_init_kwargs or {})}
    check_model_source(model_args.model_name_or_path, "--model_name_or_path", model_init_kwargs=init_kwargs)
    if training_args.teacher_model_name_or_path is not None:
        check_model_source(training_args.teacher_model_name_or_path, "--teacher_model_name_or_path", tokenizer=False,
                           model_init_kwargs=init_kwargs)


def _load_dataset(what: str, *args, **kwargs):
    """`datasets.load_dataset`, with a dataset whose files hold no row named (datasets raises a bare StopIteration)."""
    from datasets import load_dataset

    try:
        return load_dataset(*args, **kwargs)
    except StopIteration as err:
        raise ValueError(
            f"The dataset {what} has no rows: its files are empty. Give files with one example per line (JSONL) or "
            "per row, or point `--dataset_name` at the right ones."
        ) from err


def load_data(script_args, training_args, dataset_args):
    """The train and eval splits, as TRL's `sft` script loads them, checked before any model is loaded."""
    from trl import get_dataset

    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given: `datasets` is used, `dataset_name` ignored.")
        dataset = get_dataset(dataset_args)
    elif Path(script_args.dataset_name or "").is_file():  # one local file: the training split
        path = Path(script_args.dataset_name)
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"Cannot read {path}: give a {', '.join(FILE_BUILDERS)} file, or a folder of them.")
        dataset = _load_dataset(str(path), builder, data_files={script_args.dataset_train_split: str(path)},
                                streaming=script_args.dataset_streaming)
    elif script_args.dataset_name:
        dataset = _load_dataset(script_args.dataset_name, script_args.dataset_name, name=script_args.dataset_config,
                                streaming=script_args.dataset_streaming)
    else:
        raise ValueError(
            "No training data: pass `--dataset_name` (a Hub id, a local file or a folder) or `datasets` in a --config."
        )
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    if train_split not in dataset:
        raise ValueError(
            f"The dataset has no {train_split!r} split (it has {sorted(dataset)}). Name the training split with "
            "`--dataset_train_split`."
        )
    eval_dataset = dataset[test_split] if test_split in dataset else None
    if eval_dataset is None and training_args.eval_strategy != "no":
        raise ValueError(
            f"`--eval_strategy {training_args.eval_strategy}` needs an eval split, but the dataset has no "
            f"{test_split!r} split (it has {sorted(dataset)}). Name it with `--dataset_test_split`, or set "
            "`--eval_strategy no`."
        )
    return dataset[train_split], eval_dataset


def check_columns(dataset, training_args) -> bool:
    """Raise before any model loads unless `dataset` is one of SFT's formats (`data_checks.check_raw_dataset`: the
    trainer runs the same check); return whether it is conversational."""
    from trl.data_utils import is_conversational

    from trl_selfdistill.data_checks import check_raw_dataset

    check_raw_dataset(dataset, training_args)
    return is_conversational(next(iter(dataset)))


def load_tokenizer(model_args, training_args, conversational: bool):
    """The tokenizer of the model, with a pad token; refused when chat data meets a tokenizer without a template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if conversational and tokenizer.chat_template is None and training_args.chat_template_path is None:
        raise ValueError(
            f"The training data is conversational, but the tokenizer of {model_args.model_name_or_path} has no chat "
            "template. Use a chat (instruct) model, or give a template with `--chat_template_path` (a Jinja file or "
            "a tokenizer with one)."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def probe_config(knowledge_args, seed: int):
    """The probe's setting: SliCK's cheap one (greedy only), `knowledge_probe_prompts` four-shot prompts per fact."""
    from trl_selfdistill.knowledge import ProbeConfig

    return ProbeConfig.cheap(num_prompts=knowledge_args.knowledge_probe_prompts,
                             batch_size=knowledge_args.knowledge_batch_size,
                             max_new_tokens=knowledge_args.knowledge_max_new_tokens, seed=seed)


def knowledge_callback(trainer, knowledge_args, facts, exemplars, fmt):
    """
    The `ForgettingCallback` that monitors `facts`, attached to `trainer`: when training begins, every rank probes its
    share of the facts with the initial model (or the facts' own categories serve, when that model probed them), and
    the Known ones are evaluated during training, each rank taking its share.
    """
    from trl_selfdistill import ForgettingCallback

    args = trainer.args
    return ForgettingCallback(
        facts,
        fmt=fmt,
        eval_steps=knowledge_args.knowledge_eval_steps,
        teacher=trainer.teacher,
        drift_size=knowledge_args.knowledge_drift_size,
        batch_size=knowledge_args.knowledge_batch_size,
        max_new_tokens=knowledge_args.knowledge_max_new_tokens,
        progress=not args.disable_tqdm,
        num_shots=knowledge_args.knowledge_shots,
        exemplars=exemplars,
        seed=args.seed,
        facts_source=knowledge_args.knowledge_facts,
        probe_config=probe_config(knowledge_args, args.seed),
        heldout_size=knowledge_args.knowledge_heldout_size,
        heuristics=knowledge_args.heuristics(),
        reprobe=knowledge_args.knowledge_reprobe,
    ).attach(trainer)


def knowledge_summary(monitor) -> str:
    """One line: held-out Known accuracy at the start, peak and end; the same for the facts answered at step 0."""
    final, results = monitor.final, monitor.results()

    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    first = monitor.history[0]
    return (
        f"held-out Known accuracy {fmt(final['heldout_known_initial'])} at step 0, peak "
        f"{fmt(final['heldout_known_peak'])}, {fmt(final['heldout_known_accuracy'])} at step {final['step']} "
        f"({results['sizes']['heldout_known']} SliCK-Known facts; forgetting {fmt(final['forgetting_from_start'])} "
        f"from the start, {fmt(final['forgetting_from_peak'])} from the peak); answered Known accuracy "
        f"{fmt(first['answered_known_accuracy'])} → "
        f"{fmt(final['answered_known_accuracy'])} ({results['answered_known']} facts answered at step 0); drift KL "
        f"{fmt(monitor.history[-1]['drift_kl'])}"
    )


def load_knowledge_facts(knowledge_args, seed: int):
    """
    The facts to probe (a seeded sample of `knowledge_probe_size`) and the few-shot exemplar pool (the
    `knowledge_exemplars` set, else the whole fact set); loading errors surface here, before any model loads.
    """
    from trl_selfdistill.knowledge import load_facts
    from trl_selfdistill.validation import check_facts

    columns = dict(question_column=knowledge_args.knowledge_question_column,
                   answers_column=knowledge_args.knowledge_answers_column)
    facts = load_facts(knowledge_args.knowledge_facts, split=knowledge_args.knowledge_split, **columns)
    check_facts(facts, f"fact set {knowledge_args.knowledge_facts!r}", categories=False)
    # The exemplar pool is read with the same column mapping (a split of the same kind of set)
    exemplars = (load_facts(knowledge_args.knowledge_exemplars, split=knowledge_args.knowledge_split, **columns)
                 if knowledge_args.knowledge_exemplars else facts)
    if knowledge_args.knowledge_probe_size and knowledge_args.knowledge_probe_size < len(facts):
        facts = facts.shuffle(seed=seed).select(range(knowledge_args.knowledge_probe_size))
    return facts, exemplars


def main(script_args, training_args, model_args, dataset_args, freeze_args=None, knowledge_args=None):
    """Train with `SelfDistillSFTTrainer` as TRL's `sft` script trains with `SFTTrainer`; returns the trainer."""
    from transformers import EarlyStoppingCallback
    from trl import get_peft_config, get_quantization_config

    from trl_selfdistill import SelfDistillSFTTrainer
    from trl_selfdistill.distributed import describe_engine
    from trl_selfdistill.embedded import EMBEDDED, EMBEDDED_HUB_ID, model_id, resolve
    from trl_selfdistill.knowledge.probe import few_shot_prompts, reusable_categories

    freeze_args = freeze_args or FreezeArguments()
    knowledge_args = knowledge_args or KnowledgeArguments()
    # Every input is checked before the model loads: steps, paths, prompt, the freezing, the fact set, the data, the
    # model folder, the tokenizer
    check_inputs(script_args, training_args, knowledge_args)
    freeze_config = freeze_args.freeze_config()
    facts, exemplars = (
        load_knowledge_facts(knowledge_args, training_args.seed) if knowledge_args.knowledge_facts else (None, None)
    )
    if knowledge_args.early_stopping_patience and not training_args.metric_for_best_model:
        raise ValueError(
            "`early_stopping_patience` needs `metric_for_best_model` (e.g. knowledge/heldout_known_accuracy with "
            "`--greater_is_better true`, or loss) and `load_best_model_at_end`."
        )
    metric = training_args.metric_for_best_model or ""
    if metric.removeprefix("eval_").startswith("knowledge/") and not knowledge_args.knowledge_facts:
        raise ValueError(
            f"`metric_for_best_model={metric}` is a knowledge metric, but no knowledge is monitored: set "
            "`--knowledge_facts` (e.g. curated), or choose another metric (e.g. loss)."
        )
    train_dataset, eval_dataset = load_data(script_args, training_args, dataset_args)
    conversational = check_columns(train_dataset, training_args)
    check_models(training_args, model_args)
    embedded = model_args.model_name_or_path == EMBEDDED
    model_args.model_name_or_path = resolve(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_args, training_args, conversational)
    fmt = None
    if facts is not None:
        fmt = knowledge_args.answer_format(conversational, tokenizer)
        reuse, why = reusable_categories(facts, model_id(model_args.model_name_or_path),
                                         knowledge_args.knowledge_reprobe)
        if not reuse:  # the probe's prompts can be built (enough shots)
            config = probe_config(knowledge_args, training_args.seed)
            few_shot_prompts(facts, exemplars, fmt, config.num_prompts, config.num_shots, config.seed)
        training_args.distributed_state.print(
            f"[trl_selfdistill] knowledge: {'using ' + why if reuse else why + ': probing them when training begins'}"
        )

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    if embedded and training_args.card_base_model is None:  # the card names the model, not the local cache folder
        training_args.card_base_model = EMBEDDED_HUB_ID

    trainer = SelfDistillSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        freeze_config=freeze_config,
    )
    args = training_args
    loss = (f"loss: CE + λ·τ²·{args.divergence} (λ={args.distill_coef}, τ={args.distill_temperature}, scope "
            f"{args.distill_scope}); teacher: {trainer.teacher.source}" if trainer.teacher else "loss: CE (plain SFT)")
    trainer.accelerator.print(f"[trl_selfdistill] engine: {describe_engine(trainer.accelerator)}; {loss}")
    monitor = knowledge_callback(trainer, knowledge_args, facts, exemplars, fmt) if facts is not None else None
    if knowledge_args.early_stopping_patience:  # after the knowledge callback, which puts itself first
        trainer.add_callback(EarlyStoppingCallback(knowledge_args.early_stopping_patience))

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("✅ Training completed.")
    if monitor is not None:
        trainer.accelerator.print(f"[trl_selfdistill] knowledge: {knowledge_summary(monitor)}")
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():  # the card (method, freezing, knowledge results) beside the model
        trainer.create_model_card(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"💾 Model and model card saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()
    return trainer


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_selfdistill import SelfDistillConfig

    dataclass_types = (ScriptArguments, SelfDistillConfig, ModelConfig, DatasetMixtureConfig, FreezeArguments,
                       KnowledgeArguments)
    if subparsers is not None:
        return subparsers.add_parser("sft", help="Self-distillation SFT on your data", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


def check_remaining(remaining: list[str]) -> None:
    """Raise for flags (or YAML keys) that neither the script's dataclasses nor `accelerate launch` know."""
    from accelerate.commands.launch import launch_command_parser

    # argparse keeps its options in `_actions` (stdlib, stable); accelerate has no public list of its flags
    known = {option for action in launch_command_parser()._actions for option in action.option_strings}
    known.add("--accelerate_config")
    unknown = [arg for arg in remaining if arg.startswith("-") and arg.split("=")[0] not in known]
    if unknown:
        raise ValueError(
            f"Unknown arguments {unknown}: no field of ScriptArguments, SelfDistillConfig, ModelConfig, "
            "DatasetMixtureConfig, FreezeArguments or KnowledgeArguments, nor an `accelerate launch` option, has that "
            "name. Check the spelling (fields use underscores) in the command line or the --config YAML; "
            "`trl-selfdistill sft --help` lists them."
        )


def parse_args(argv: list[str] | None = None, parser=None):
    """
    Parse `argv` (flags and `--config` YAML). Returns the dataclasses, the leftover YAML keys and the leftover flags;
    anything that is not an `accelerate launch` option is an error.
    """
    parser = parser or make_parser()
    *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    check_remaining(config_remaining + cli_remaining)
    return parsed, config_remaining, cli_remaining


def parse_and_run(argv: list[str] | None = None):
    """Parse `argv` and run `main` in this process (under `accelerate launch`, or alone); returns the trainer."""
    parsed, _, cli_remaining = parse_args(argv)
    if cli_remaining:
        raise ValueError(f"{cli_remaining} are `accelerate launch` options: give them before `-m`, or use "
                         "`trl-selfdistill sft`, which passes them on.")
    return main(*parsed)


if __name__ == "__main__":
    parse_and_run()
