"""`trl-selfdistill eval`: a model's accuracy on facts, and against its base model what it forgot and learned.

Both models answer the same prompts (the monitor's format and shots), one after the other, each freed before the next
loads; `knowledge.compare` turns the two columns of correctness into forgetting, learning, their intervals, the sign
test and the facts that flipped. With `--lm_eval_tasks`, lm-evaluation-harness runs the tasks on each model while it is
loaded (`lm_eval_tasks.run_tasks`), giving a before/after table.
"""

import gc
import json
from collections import Counter
from pathlib import Path

DEFAULT_SHOTS = 4  # as `sft --knowledge_shots`


def monitor_format(model: str) -> dict | None:
    """The format the `ForgettingCallback` asked in during training: `format` of the model folder's results file."""
    from .knowledge.callback import RESULTS_FILE

    path = Path(model) / RESULTS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("format")


def resolve_format(args, model: str):
    """(`AnswerFormat`, shots, where they come from) for `eval`'s options and `model`; explicit options win over the
    monitor's."""
    from .scripts.sft import answer_format

    saved = monitor_format(model) if args.format == "auto" else None
    choice = args.format if args.format != "auto" else ("chat" if saved and saved.get("chat") else "plain")
    fmt = answer_format(choice, args.prompt or (saved or {}).get("prompt"), args.system_prompt, False)
    shots = args.num_shots if args.num_shots is not None else (saved or {}).get("num_shots", DEFAULT_SHOTS)
    return fmt, shots, "the monitor's (forgetting_results.json)" if saved else "options"


def build_prompts(facts, exemplars, fmt, num_shots: int, seed: int) -> list:
    """One prompt per fact: zero-shot, or after `num_shots` same-relation exemplars (as the monitor and the probe)."""
    from .knowledge.probe import few_shot_prompts

    if not num_shots:
        return [fmt.prompt_for(question) for question in facts["question"]]
    return [per_fact[0] for per_fact in few_shot_prompts(facts, exemplars, fmt, 1, num_shots, seed)]


def format_record(fmt, num_shots: int) -> dict:
    return {"prompt": fmt.prompt, "chat": fmt.chat, "system_prompt": fmt.system_prompt, "num_shots": num_shots}


def read_baseline(path: str, facts, record: dict) -> list[dict]:
    """The base model's saved answers for `facts`, in their order; refused for a missing fact or another format."""
    rows = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if not {"id", "answer", "correct", "format"} <= set(row):
                raise ValueError(f"{path}:{number} is not a saved answer (id, answer, correct, format): write the "
                                 "baseline with `trl-selfdistill eval --model BASE --save_answers FILE`.")
            rows[row["id"]] = row
    missing = [fact_id for fact_id in facts["id"] if fact_id not in rows]
    if missing:
        raise ValueError(f"The baseline {path} has no answer for {len(missing)} of the {len(facts)} facts (e.g. "
                         f"{missing[:3]}): save it on the same fact set, or pass `--base_model`.")
    formats = {json.dumps(rows[fact_id]["format"], sort_keys=True) for fact_id in facts["id"]}
    if formats != {json.dumps(record, sort_keys=True)}:
        raise ValueError(f"The baseline {path} was answered in {sorted(formats)}, this evaluation asks in {record}: "
                         "give the same --format, --prompt and --num_shots, or pass `--base_model`.")
    return [rows[fact_id] for fact_id in facts["id"]]


def answer_with(name: str, model_args, prompts, facts, fmt, args, lm_tasks, manager) -> dict:
    """Load `name`, answer every prompt greedily, run the lm-eval tasks, free the model; answers and correctness."""
    import torch

    from .knowledge import Generator
    from .knowledge.metrics import score
    from .lm_eval_tasks import run_tasks

    model, tokenizer = model_args.load(name)
    if fmt.chat and tokenizer.chat_template is None:
        raise ValueError(f"`--format chat` needs a chat template, and the tokenizer of {name} has none: use "
                         "`--format plain`.")
    generator = Generator(model, tokenizer, fmt, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          progress=not model_args.quiet)
    answers = [output[0] for output in generator(prompts, True, 1)]
    result = {"answers": answers, "correct": score(answers, facts), "device": str(model.device),
              "dtype": str(model.dtype).removeprefix("torch.")}
    if lm_tasks:
        result["lm_eval"], result["lm_eval_datasets"] = run_tasks(
            model, tokenizer, lm_tasks, limit=args.lm_eval_limit, batch_size=args.batch_size, manager=manager
        )
    del model, generator
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _percent(interval: dict) -> str:
    if interval["mean"] is None:
        return "n/a"
    bounds = "" if interval["low"] is None else f" [{interval['low']:.1%}, {interval['high']:.1%}]"
    return f"{interval['mean']:.1%}{bounds}"


def comparison_line(stats: dict) -> str:
    """Forgetting, lost share, learning and the sign test in one line."""
    return (f"forgetting {_percent(stats['forgetting'])}; lost {stats['lost']} of the {stats['base_answered']} facts "
            f"the base answers ({_percent(stats['lost_share'])}), gained {stats['gained']} of the "
            f"{stats['num_facts'] - stats['base_answered']} it missed (learning {_percent(stats['learning'])}); "
            f"sign test p = {stats['sign_test_p']:.3g}")


def run_eval(args, model_args, columns) -> dict:
    """Everything `eval` does after parsing; returns the results it prints and writes."""
    from .knowledge.compare import compare, flipped
    from .knowledge.metrics import accuracy, accuracy_by
    from .lm_eval_tasks import check_tasks

    # Every input is checked before a model loads: facts, exemplars, prompts (enough shots), baseline, lm-eval tasks
    from .validation import check_model_source

    facts = columns.load(args.facts)
    exemplars = columns.load(args.exemplars, categories=False) if args.exemplars else facts
    fmt, num_shots, format_source = resolve_format(args, model_args.model)
    record = format_record(fmt, num_shots)
    prompts = build_prompts(facts, exemplars, fmt, num_shots, args.seed)
    baseline = read_baseline(args.baseline, facts, record) if args.baseline else None
    lm_tasks = [task.strip() for task in (args.lm_eval_tasks or "").split(",") if task.strip()]
    manager = check_tasks(lm_tasks) if lm_tasks else None

    model_args.check()
    if args.base_model:
        check_model_source(args.base_model, "--base_model")

    base = None
    if args.base_model:
        base = answer_with(args.base_model, model_args, prompts, facts, fmt, args, lm_tasks, manager)
    elif baseline is not None:
        base = {"answers": [row["answer"] for row in baseline], "correct": [bool(row["correct"]) for row in baseline]}
    tuned = answer_with(model_args.model, model_args, prompts, facts, fmt, args, lm_tasks, manager)

    correct = tuned["correct"]
    results = {
        "model": model_args.model,
        "base_model": args.base_model or (f"baseline file {args.baseline}" if args.baseline else None),
        "facts": args.facts,
        "num_facts": len(facts),
        "accuracy": accuracy(correct),
        "per_category": accuracy_by(facts["category"], correct) if "category" in facts.column_names else {},
        "per_relation": accuracy_by(facts["relation"], correct),
        "format": {**record, "source": format_source},
        "device": tuned["device"],
        "dtype": tuned["dtype"],
    }
    shots = f"{num_shots} shots" if num_shots else "zero-shot"
    print(f"accuracy {results['accuracy']:.3f} on {len(facts)} facts ({model_args.model}; greedy, {shots}, "
          f"{'chat' if fmt.chat else 'plain'} prompt {fmt.prompt!r} from {format_source}, {results['device']}, "
          f"{results['dtype']})")
    counts = Counter(facts["category"]) if "category" in facts.column_names else {}
    for category, value in results["per_category"].items():
        print(f"  {category:<12} {value:.3f}  (n={counts[category]})")
    rows = []
    if base is not None:
        results["base_accuracy"] = accuracy(base["correct"])
        results["comparison"] = compare(facts, base["correct"], correct, resamples=args.resamples, seed=args.seed)
        rows = flipped(facts, base["answers"], tuned["answers"], base["correct"], correct)
        print(f"base accuracy {results['base_accuracy']:.3f} ({results['base_model']})")
        print(comparison_line(results["comparison"]["all"]))
        for key, groups in results["comparison"].items():
            for label, stats in (groups.items() if key != "all" else []):
                print(f"  {key.removeprefix('by_')}={label} (n={stats['num_facts']}): {comparison_line(stats)}")
    if tuned.get("lm_eval"):
        results["lm_eval"] = {"tasks": lm_tasks, "limit": args.lm_eval_limit, "model": tuned["lm_eval"],
                              "base_model": (base or {}).get("lm_eval"), "datasets": tuned["lm_eval_datasets"]}
        for task, metrics in tuned["lm_eval"].items():
            before = ((base or {}).get("lm_eval") or {}).get(task, {})
            for metric, value in metrics.items():
                then = f"{before[metric]:.3f} → " if metric in before else ""
                print(f"lm-eval {task} {metric}: {then}{value:.3f}")
    flips_path = args.flips or (str(Path(args.out).with_suffix(".flips.jsonl")) if args.out and base else None)
    if flips_path and base is not None:
        _write_jsonl(flips_path, rows)
        results["flips_file"] = flips_path
        print(f"Wrote {flips_path} ({len(rows)} facts flipped)")
    if args.save_answers:
        _write_jsonl(args.save_answers, [
            {"id": fact_id, "question": question, "answer": answer, "correct": ok, "format": record}
            for fact_id, question, answer, ok in zip(facts["id"], facts["question"], tuned["answers"], correct,
                                                     strict=True)
        ])
        print(f"Wrote {args.save_answers}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"Wrote {args.out}")
    if args.record:
        from .model_card import record_eval

        written = [str(path.relative_to(model_args.model)) for path in record_eval(model_args.model, results)]
        print(f"Recorded in {model_args.model}: {', '.join(written)}")
    return results


def _write_jsonl(path: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
