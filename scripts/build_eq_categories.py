"""Build the `entityquestions-smollm2` categorised fact set: sample EntityQuestions facts and probe them with SliCK.

The shipped set was built with two single-threaded processes side by side (2 cores), then concatenated:

    OMP_NUM_THREADS=1 python scripts/build_eq_categories.py --source ../shared/data/entityquestions \
        --relations P495:700,P407:900 --out a.jsonl
    OMP_NUM_THREADS=1 python scripts/build_eq_categories.py --source ../shared/data/entityquestions \
        --relations P36:900,P106:200,P159:200 --out b.jsonl
    cat a.jsonl b.jsonl > trl_selfdistill/data/entityquestions/smollm2_categories.jsonl

Facts are sampled from `<source>/train/<relation>.train.jsonl` (seeded; one row per distinct question, with the
aliases of every row that asks it); the few-shot exemplars come from `<source>/dev`. Probing is the package's own
(`knowledge.probe`, cheap setting: three four-shot prompts, greedy, on the embedded SmolLM2-135M-Instruct). Each row
keeps what the loader cannot derive: question, answers, relation, category and p_greedy (id, subject and template
come back from the relation's template when the set is loaded).
`--num_prompts 1` estimates each relation's yield cheaply (how the relations above were chosen:
`--per_relation 16 --num_prompts 1 --seed 100` over all 24).
"""

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

from trl_selfdistill.embedded import load_model
from trl_selfdistill.knowledge import ProbeConfig, load_facts, probe


def sample(source: Path, relation: str, n: int, seed: int, skip: set[str]) -> list[dict]:
    """`n` distinct questions of `relation`, each with the aliases of every row that asks it, in a seeded order."""
    pooled: dict[str, list[str]] = {}
    for line in (source / "train" / f"{relation}.train.jsonl").open():
        row = json.loads(line)
        pooled.setdefault(row["question"], []).extend(row["answers"])
    questions = sorted(q for q in pooled if q not in skip)
    random.Random(f"{seed}:{relation}").shuffle(questions)
    return [{"question": q, "answers": list(dict.fromkeys(pooled[q]))} for q in questions[:n]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="EntityQuestions folder (train/, dev/, templates).")
    parser.add_argument("--relations", default="",
                        help="Comma-separated relations, each optionally with its own count (P36:900); default: every "
                        "train file, --per_relation each.")
    parser.add_argument("--per_relation", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_prompts", type=int, default=3)
    parser.add_argument("--num_shots", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--skip", type=Path, help="A JSONL of already-probed facts whose questions are not sampled.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    names = args.relations.split(",") if args.relations else sorted(
        p.name.split(".")[0] for p in (args.source / "train").glob("*.train.jsonl")
    )
    sizes = {name.split(":")[0]: int(name.split(":")[1]) if ":" in name else args.per_relation for name in names}
    relations = list(sizes)
    skip = {json.loads(line)["question"] for line in args.skip.open()} if args.skip else set()
    templates = args.source / "relation_query_templates.json"
    rows = []
    for relation in relations:
        rows += [dict(r, relation=relation) for r in sample(args.source, relation, sizes[relation], args.seed, skip)]
    facts = load_facts(rows, templates=templates)
    exemplars = load_facts(args.source / "dev", templates=templates)
    model, tokenizer = load_model()
    config = ProbeConfig.cheap(num_prompts=args.num_prompts, num_shots=args.num_shots, batch_size=args.batch_size)
    start = time.perf_counter()
    probed = probe(facts, model, tokenizer, exemplars=exemplars, config=config)
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:  # what the loader cannot derive (id, subject, template come from these)
        for row in probed:
            slim = {key: row[key] for key in ("question", "answers", "relation", "category")}
            f.write(json.dumps({**slim, "p_greedy": round(row["p_greedy"], 4)}, ensure_ascii=False,
                               separators=(",", ":")) + "\n")
    counts = Counter(zip(probed["relation"], probed["category"], strict=True))
    print(f"probed {len(probed)} facts x {args.num_prompts} prompts in {seconds:.0f} s "
          f"({len(probed) * args.num_prompts / seconds:.2f} prompts/s)")
    for relation in relations:
        n = sum(v for (r, _), v in counts.items() if r == relation)
        hk = counts[(relation, "HighlyKnown")]
        print(
            f"{relation}: {hk}/{n} HighlyKnown ({hk / max(n, 1):.0%}), MaybeKnown {counts[(relation, 'MaybeKnown')]}, "
            f"Unknown {counts[(relation, 'Unknown')]}"
        )


if __name__ == "__main__":
    main()
