"""Closed-book QA facts: loading, validation, answer normalisation and alias matching.

A fact is a row with `id`, `question`, `answers` (every accepted alias), `relation` (e.g. Wikidata `P36`, "" when
unknown), `template` (the relation's question with `[X]` for the subject, "" when unknown) and `subject` (the entity
the question is about, read back through the template, "" when it cannot be). Other columns are kept.
"""

import hashlib
import json
import re
import string
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

from datasets import Dataset, load_dataset

from ..validation import check_unique_ids

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN = {
    "curated": DATA_DIR / "curated",
    "curated-smollm2": DATA_DIR / "curated_smollm2_categories.jsonl",
    "entityquestions-smollm2": DATA_DIR / "entityquestions" / "smollm2_categories.jsonl",
    "world-smollm2": DATA_DIR / "world" / "smollm2_categories.jsonl",
    "entityquestions-train": DATA_DIR / "entityquestions" / "train",
    "entityquestions-dev": DATA_DIR / "entityquestions" / "dev",
}
TEMPLATE_FILES = ("templates.json", "relation_query_templates.json")
FACT_COLUMNS = ("id", "question", "answers", "relation", "subject", "template")

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _strip_punctuation(text: str) -> str:
    """Hyphens and dashes separate words ("Berners-Lee" = "Berners Lee"); other punctuation, ASCII or Unicode, goes
    ("D.C." = "DC", "O’Neil" = "O'Neil")."""
    return "".join(
        " " if unicodedata.category(c) == "Pd" else "" if c in string.punctuation or unicodedata.category(c)[0] == "P"
        else c
        for c in text
    )


def _match_keys(text: str) -> tuple[str, str, str]:
    """
    The text under three normalisations, lightest last: SQuAD's (no punctuation, no articles); without dropping
    articles; without dropping punctuation either. All are NFKC-normalised (composed accents, full-width letters) and
    case-folded, with whitespace collapsed.
    """
    light = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    no_punctuation = " ".join(_strip_punctuation(light).split())
    return " ".join(_ARTICLES.sub(" ", no_punctuation).split()), no_punctuation, light


def normalize_answer(text: str) -> str:
    """NFKC, case-fold, drop punctuation (hyphens and dashes become spaces) and articles, collapse whitespace
    (SQuAD-style). An answer made only of articles or punctuation ("A", "The", "...") normalises to ""."""
    return _match_keys(text)[0]


def is_correct(prediction: str, answers: Iterable[str]) -> bool:
    """
    Exact match after normalisation against any gold alias. An alias that `normalize_answer` empties (a
    multiple-choice letter "A", "The", "...") is matched under the lightest normalisation that keeps something of it
    (articles kept, then punctuation kept too), so "A" and "a." match it and "" never does.
    """
    predicted = _match_keys(prediction)
    for answer in answers:
        gold = _match_keys(answer)
        level = next((i for i, key in enumerate(gold) if key), None)
        if level is not None and predicted[level] == gold[level]:
            return True
    return False


def subject_of(question: str, template: str) -> str:
    """The `[X]` part of `question` under `template`, or "" when the question does not follow the template."""
    if "[X]" not in template:
        return ""
    pattern = re.escape(template).replace(re.escape("[X]"), "(.+)")
    match = re.fullmatch(pattern, question.strip())
    return match.group(1).strip() if match else ""


def load_templates(source: str | Path | Mapping[str, str] | None) -> dict[str, str]:
    """Relation → question template (`[X]` marks the subject), from a mapping or a JSON file."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return dict(source)
    return json.loads(Path(source).read_text())


def builtin_facts(name: str) -> Dataset:
    """A fact set shipped with the package (`BUILTIN`): `curated`, the `*-smollm2` sets, `entityquestions-*`."""
    if name not in BUILTIN:
        raise ValueError(f"Unknown built-in fact set {name!r}. Choose one of {sorted(BUILTIN)}.")
    facts = load_facts(BUILTIN[name])
    if name.endswith("-smollm2"):  # categorised by the embedded model
        from ..embedded import EMBEDDED_HUB_ID
        from .probe import PROBE_MODEL

        facts = facts.add_column(PROBE_MODEL, [EMBEDDED_HUB_ID] * len(facts))
    return facts


def load_facts(
    source,
    *,
    templates: str | Path | Mapping[str, str] | None = None,
    relation: str | None = None,
    split: str = "train",
    question_column: str = "question",
    answers_column: str = "answers",
) -> Dataset:
    """
    Load and validate facts from a `Dataset`, a list of dicts, a JSON/JSONL file, a folder of JSONL files (one per
    relation, named `<relation>.<anything>.jsonl` as in EntityQuestions), a built-in name, or a Hub dataset id.

    Relations come from a `relation` column, else `relation`, else the file name. Templates come from `templates`,
    else a `templates.json` / `relation_query_templates.json` beside the files (for a folder, also one up). Rows
    with the same question are merged, their aliases pooled; two facts with one `id` are refused.
    """
    if isinstance(source, str) and source in BUILTIN:
        return builtin_facts(source)
    if isinstance(source, (Dataset, list, tuple)):
        rows, found_templates = [dict(row, _file_relation=relation) for row in source], {}
    elif Path(source).exists():
        rows, found_templates = _read_path(Path(source), relation)
    elif _looks_like_a_path(Path(source)):
        raise FileNotFoundError(
            f"No fact file or folder at {Path(source).absolute()}. Pass an existing JSON/JSONL file or a "
            f"folder of JSONL files, a built-in set ({', '.join(sorted(BUILTIN))}), or a Hub dataset id."
        )
    else:
        dataset = load_dataset(source, split=split)
        rows, found_templates = [dict(row, _file_relation=relation) for row in dataset], {}
    templates = {**found_templates, **load_templates(templates)}
    facts = _merge([_clean(row, i, templates, question_column, answers_column) for i, row in enumerate(rows)])
    check_unique_ids([fact["id"] for fact in facts], [fact["question"] for fact in facts], f"facts from {source}"
                     if isinstance(source, (str, Path)) else "facts")
    return Dataset.from_list(facts)


def _looks_like_a_path(path: Path) -> bool:
    """A name meant as a local file or folder rather than a Hub dataset id: a JSON suffix, or a folder that exists."""
    return path.suffix in (".json", ".jsonl") or path.is_absolute() or (len(path.parts) > 1 and path.parent.is_dir())


def _json_kind(value) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def _json_records(file: Path) -> list[dict]:
    """The objects of a JSON file (a list of them) or a JSONL file (one per line), each error naming file and line."""
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            message = f"{file}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}). Fix the file."
            raise ValueError(message) from err
        if not isinstance(records, list):
            raise ValueError(
                f"{file} holds a JSON {_json_kind(records)}, not a list of facts. Give a list of objects like "
                '[{"question": "...", "answers": ["..."]}], or one object per line in a .jsonl file.'
            )
        where = [f"{file}: item {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{file}:{number}: not valid JSON ({err.msg}, column {err.colno}). Each line of a JSONL fact file "
                    "is one JSON object; fix or delete that line."
                ) from err
            where.append(f"{file}:{number}")
    for record, place in zip(records, where, strict=True):
        if not isinstance(record, dict):
            raise ValueError(
                f"{place} is a JSON {_json_kind(record)} ({json.dumps(record)[:60]}), not an object. Each fact is "
                'an object like {"question": "...", "answers": ["..."]}.'
            )
    return records


def _read_path(path: Path, relation: str | None) -> tuple[list[dict], dict[str, str]]:
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"No *.jsonl files in {path}. Point to a JSONL file or a folder of them.")
    rows = []
    for file in files:
        file_relation = relation if relation is not None else (file.name.split(".")[0] if path.is_dir() else None)
        rows += [dict(record, _file_relation=file_relation) for record in _json_records(file)]
    if not rows:
        raise ValueError(
            f"No facts in {path}: {'its files are' if path.is_dir() else 'the file is'} empty. Give one JSON object "
            'per line, like {"question": "...", "answers": ["..."]}.'
        )
    # Beside the files, or one folder up for a folder of files (EntityQuestions: <root>/train/*.jsonl)
    folders = [path, path.parent] if path.is_dir() else [path.parent]
    for candidate in [folder / name for folder in folders for name in TEMPLATE_FILES]:
        if candidate.is_file():
            return rows, load_templates(candidate)
    return rows, {}


def _clean(row: dict, index: int, templates: dict, question_column: str, answers_column: str) -> dict:
    where = f"Fact {index}"
    question = row.pop(question_column, None)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(
            f"{where} has no question string in column {question_column!r} (got {question!r}). Every fact needs a "
            "non-empty question; pass `question_column=` if yours is named differently."
        )
    columns = sorted(key for key in row if not key.startswith("_"))
    answers = _answers_of(row, answers_column)
    if not isinstance(answers, (list, tuple)):
        raise ValueError(
            f"{where} ({question!r}) has no answer list in column {answers_column!r} (got {answers!r}; the row's "
            f"columns: {columns}). Give a list "
            "of gold aliases, one string, or a JSON list as a string; pass `answers_column=` if yours is named "
            "differently (a dotted path such as `answer.aliases` reaches into a nested column)."
        )
    bad = [answer for answer in answers if not isinstance(answer, str)]
    if bad:
        raise ValueError(
            f"{where} ({question!r}) has non-string answers {bad!r}. Answers are matched as text: convert them with "
            "`str` (e.g. years) before loading."
        )
    answers = list(dict.fromkeys(answer.strip() for answer in answers if answer.strip()))
    if not answers:
        raise ValueError(f"{where} ({question!r}) has an empty answer list. Give at least one gold alias or drop it.")
    file_relation = row.pop("_file_relation", None)
    relation = str(row.pop("relation", None) or file_relation or "")
    template = row.pop("template", None) or templates.get(relation, "")
    subject = row.pop("subject", None) or subject_of(question, template)
    fact_id = row.pop("id", None)
    if fact_id is None:
        fact_id = f"{relation or 'fact'}-{hashlib.sha1(question.strip().encode()).hexdigest()[:10]}"
    return {"id": str(fact_id), "question": question.strip(), "answers": answers, "relation": relation,
            "subject": subject, "template": template, **row}


def _answers_of(row: dict, column: str):
    """
    The gold aliases of `row` in `column`, popped from the row, in the shapes standard QA sets use: a list
    (NQ-open's `answer`), one string (SimpleQA's `answer`), a JSON list in a string (PopQA's `possible_answers`), or a
    nested field reached by a dotted path (TriviaQA's `answer.aliases`). A mapping given as it is (TriviaQA's
    `answer`) pools its `value`, `aliases` and `normalized_aliases`. Anything else goes back for the caller to refuse.
    """
    if column in row:
        value = row.pop(column)
    else:
        top, *path = column.split(".")
        value = row.pop(top, None)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, dict):
        pooled = [value.get("value"), *(value.get("aliases") or []), *(value.get("normalized_aliases") or [])]
        return [alias for alias in pooled if alias] if any(pooled) else value
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return [value]
        return parsed if isinstance(parsed, list) else [value]
    return [value] if isinstance(value, str) else value


def _merge(rows: list[dict]) -> list[dict]:
    """One row per question, pooling the aliases of repeated questions (EntityQuestions repeats some)."""
    merged: dict[str, dict] = {}
    for row in rows:
        first = merged.setdefault(row["question"], row)
        if first is not row:
            first["answers"] = list(dict.fromkeys(first["answers"] + row["answers"]))
    return list(merged.values())
