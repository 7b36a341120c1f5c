"""Documents and metric of the trl-selfdistill lm-eval tasks, built with the package (`trl_selfdistill`).

Each document holds the fact (`id`, `question`, `answers`) and `prompt`, the package's prompt for it; the metric is
the package's exact match (`trl_selfdistill.knowledge.is_correct`) of the answer line against every alias.
"""

from datasets import DatasetDict

from trl_selfdistill.knowledge import AnswerFormat, builtin_facts, is_correct
from trl_selfdistill.knowledge.probe import few_shot_prompts


def known_facts(facts: str, num_shots: int = 0, exemplars: str | None = None, seed: int = 0, **_) -> DatasetDict:
    """The HighlyKnown facts of the built-in set `facts`, asked in the plain training format `Q: …\\nA:` after
    `num_shots` same-relation exemplars from `exemplars` (default: the set itself, never a fact's own)."""
    source = builtin_facts(facts)
    known = source.filter(lambda fact: fact["category"] == "HighlyKnown")
    fmt = AnswerFormat()
    if num_shots:
        pool = builtin_facts(exemplars) if exemplars else source
        prompts = [p[0] for p in few_shot_prompts(known, pool, fmt, 1, num_shots, seed)]
    else:
        prompts = [fmt.prompt_for(question) for question in known["question"]]
    known = known.select_columns(["id", "question", "answers", "relation"]).add_column("prompt", prompts)
    return DatasetDict({"test": known})


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match, as the package scores: the first line of the generation against any alias, normalised."""
    answer = AnswerFormat().parse(results[0])
    return {"exact_match": float(is_correct(answer, doc["answers"]))}
