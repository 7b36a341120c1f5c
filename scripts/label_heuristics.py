"""Add the heuristic labels (`copy`, `prior`, `none`) to a shipped categorised fact set, in place.

The model is asked only about fictional entities of each relation, with the prompts the set's probe used:

    python scripts/label_heuristics.py curated-smollm2
    python scripts/label_heuristics.py entityquestions-smollm2 --exemplars ../shared/data/entityquestions/dev

Each row gains `heuristic` and `defaults` (its relation's default answers, normalised); nothing else changes.
"""

import argparse
import json
import time
from collections import Counter

from trl_selfdistill.embedded import load_model
from trl_selfdistill.knowledge import ProbeConfig, builtin_facts, load_facts
from trl_selfdistill.knowledge.facts import BUILTIN
from trl_selfdistill.knowledge.probe import label_with_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="A built-in categorised set, e.g. curated-smollm2.")
    parser.add_argument("--exemplars", help="Set or folder the probe drew its shots from (default: the set itself).")
    args = parser.parse_args()
    path = BUILTIN[args.name]
    facts = builtin_facts(args.name)
    exemplars = load_facts(args.exemplars) if args.exemplars else None
    model, tokenizer = load_model()
    start = time.perf_counter()
    labelled = label_with_model(facts, model, tokenizer, exemplars=exemplars, config=ProbeConfig.cheap())
    seconds = time.perf_counter() - start
    by_question = {row["question"]: (row["heuristic"], row["defaults"]) for row in labelled}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with path.open("w") as f:
        for row in rows:
            heuristic, defaults = by_question[row["question"].strip()]
            row = {key: value for key, value in row.items() if key not in ("heuristic", "defaults")}
            f.write(json.dumps({**row, "heuristic": heuristic, "defaults": defaults}, ensure_ascii=False,
                               separators=(",", ":")) + "\n")
    counts = Counter(zip(labelled["relation"], labelled["category"], labelled["heuristic"], strict=True))
    print(json.dumps({"set": args.name, "seconds": round(seconds, 1),
                      "defaults": {r: d for r, d in zip(labelled["relation"], labelled["defaults"], strict=True)},
                      "counts": {"/".join(k): n for k, n in sorted(counts.items())}}, ensure_ascii=False))


if __name__ == "__main__":
    main()
