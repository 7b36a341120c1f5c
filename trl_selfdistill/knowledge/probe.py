"""SliCK knowledge categories (Gekhman et al., 2024): what a model knows, measured with few-shot prompts.

For each fact, `num_prompts` different `num_shots`-shot prompts (same-relation exemplars from a separate pool, never
the fact itself) are answered once greedily and `num_samples` times at temperature T. With P0 the share of correct
greedy answers and Ps the share of correct samples: HighlyKnown P0 = 1, MaybeKnown 0 < P0 < 1, WeaklyKnown P0 = 0 and
Ps > 0, Unknown P0 = Ps = 0. Without samples (the cheap setting) WeaklyKnown cannot be told from Unknown.

Every probed fact also gets a heuristic label (`copy`, `prior` or `none`, see `heuristics`): the model is asked the
same few-shot prompts about fictional entities of each relation, and the answers it gives whatever the entity are its
default answers.
"""

import random
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
from datasets import Dataset

from ..validation import check_facts
from .facts import is_correct
from .formats import AnswerFormat, Prompt
from .generation import GenerateFn, Generator
from .heuristics import FICTIONAL_PER_RELATION, default_answers, fictional_facts, label_heuristics

SLICK_CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
PROBE_MODEL = "probe_model"  # the column naming the model that probed the categories (`embedded.model_id`)
PROBE_COLUMNS = ("p_greedy", "p_sample", "category", "greedy_answers", "heuristic", "defaults", PROBE_MODEL)


@dataclass(frozen=True)
class ProbeConfig:
    """SliCK probing settings. Defaults are the paper's; `ProbeConfig.cheap()` fits a CPU."""

    num_prompts: int = field(default=10, metadata={"help": "Different few-shot prompts per fact (N_ex)."})
    num_shots: int = field(default=4, metadata={"help": "Same-relation exemplars in each prompt."})
    num_samples: int = field(default=16, metadata={"help": "Sampled answers per prompt (0: greedy only)."})
    temperature: float = field(default=0.5, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=40, metadata={"help": "Top-k of sampling."})
    max_new_tokens: int = field(default=16, metadata={"help": "Generation budget per answer (stops at end of line)."})
    batch_size: int = field(default=32, metadata={"help": "Sequences generated per batch (prompts × samples)."})
    seed: int = field(default=0, metadata={"help": "Seeds exemplar choice and sampling."})
    fictional_per_relation: int = field(
        default=FICTIONAL_PER_RELATION,
        metadata={"help": "Fictional entities asked per relation to find the model's default answers (0: none)."},
    )

    def __post_init__(self):
        if self.num_prompts < 1 or self.num_shots < 0 or self.num_samples < 0 or self.fictional_per_relation < 0:
            raise ValueError(
                f"num_prompts={self.num_prompts}, num_shots={self.num_shots}, num_samples={self.num_samples}: need "
                "at least one prompt and non-negative shots and samples."
            )

    @classmethod
    def paper(cls, **overrides) -> "ProbeConfig":
        """10 four-shot prompts, 1 greedy + 16 samples at T=0.5, top-k 40 (170 generations per fact)."""
        return replace(cls(), **overrides)

    @classmethod
    def cheap(cls, **overrides) -> "ProbeConfig":
        """3 four-shot prompts, greedy only (3 generations per fact): HighlyKnown = all three correct."""
        return replace(cls(num_prompts=3, num_samples=0), **overrides)


def slick_category(p_greedy: float, p_sample: float | None) -> str:
    """SliCK category from P0 (greedy) and Ps (sampled; None when no samples were drawn)."""
    if p_greedy == 1:
        return "HighlyKnown"
    if p_greedy > 0:
        return "MaybeKnown"
    return "WeaklyKnown" if p_sample else "Unknown"


def few_shot_prompts(
    facts: Dataset, exemplars: Dataset, fmt: AnswerFormat, num_prompts: int, num_shots: int, seed: int
) -> list[list[Prompt]]:
    """`num_prompts` prompts per fact, each with `num_shots` same-relation exemplars drawn from `exemplars`."""
    pool = defaultdict(list)
    for shot in exemplars.select_columns(["id", "question", "answers", "relation"]):
        pool[shot["relation"]].append(shot)
    everything = [shot for shots in pool.values() for shot in shots]
    prompts = []
    for fact in facts.select_columns(["id", "question", "relation"]):
        # Facts of unknown relation ("") draw exemplars from the whole pool
        candidates = pool[fact["relation"]] if fact["relation"] else everything
        candidates = [s for s in candidates if s["id"] != fact["id"] and s["question"] != fact["question"]]
        if len(candidates) < num_shots:
            raise ValueError(
                f"Only {len(candidates)} exemplars of relation {fact['relation']!r} besides {fact['question']!r}, "
                f"but each prompt needs num_shots={num_shots}. Add same-relation facts to the exemplar pool "
                "(`exemplars=`) or lower `num_shots`."
            )
        per_fact = []
        for j in range(num_prompts):
            shots = random.Random(f"{seed}:{fact['id']}:{j}").sample(candidates, num_shots)
            per_fact.append(fmt.prompt_for(fact["question"], [(s["question"], s["answers"][0]) for s in shots]))
        prompts.append(per_fact)
    return prompts


def _generator(model, tokenizer, generate_fn, fmt: AnswerFormat, config: "ProbeConfig", progress: bool,
               shard: bool = False) -> GenerateFn:
    if (model is None) == (generate_fn is None):
        raise ValueError("Pass either `model` (with `tokenizer`) or `generate_fn`, not both or neither.")
    if generate_fn is not None:
        return generate_fn
    return Generator(
        model,
        tokenizer,
        fmt,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        batch_size=config.batch_size,
        progress=progress,
        shard=shard,
        seed=config.seed,
    )


def _fictional_prompts(facts: Dataset, pool: Dataset, fmt: AnswerFormat, config: "ProbeConfig"):
    fictional = fictional_facts(facts, config.fictional_per_relation, config.seed)
    prompts = few_shot_prompts(fictional, pool, fmt, 1, config.num_shots, config.seed)
    return fictional["relation"], [per_fact[0] for per_fact in prompts]


def _label(facts: Dataset, relations: list[str], fictional_greedy: list[list[str]]) -> Dataset:
    fictional_answers: dict[str, list[str]] = defaultdict(list)
    for relation, outputs in zip(relations, fictional_greedy, strict=True):
        fictional_answers[relation].append(outputs[0])
    return label_heuristics(facts, default_answers(facts, fictional_answers))


def probe(
    facts: Dataset,
    model=None,
    tokenizer=None,
    *,
    generate_fn: GenerateFn | None = None,
    exemplars: Dataset | None = None,
    fmt: AnswerFormat | None = None,
    config: ProbeConfig | None = None,
    progress: bool = True,
    shard: bool = False,
) -> Dataset:
    """
    Categorise `facts` with SliCK. Generation runs with `model` + `tokenizer`, or an injected `generate_fn`.
    `exemplars` defaults to `facts` itself (a fact is never its own exemplar). Returns `facts` with the columns
    `p_greedy`, `p_sample` (None without samples), `category`, `greedy_answers`, `heuristic` (`copy`, `prior` or
    `none`), `defaults` (the relation's default answers, normalised) and, with a `model`, `probe_model` (its
    recorded name, `model_name`: what later runs check before reusing the categories). With `shard`, every rank of a
    multi-process
    run calls `probe` and the ranks share the generation (`Generator(shard=True)`); every rank gets the result.
    """
    config = config or ProbeConfig.cheap()
    fmt = fmt or AnswerFormat()
    check_facts(facts, "fact set to probe", categories=False)  # the probe replaces any categories
    if exemplars is not None:
        check_facts(exemplars, "exemplar pool", categories=False)
    generate_fn = _generator(model, tokenizer, generate_fn, fmt, config, progress, shard)
    facts = facts.remove_columns([c for c in PROBE_COLUMNS if c in facts.column_names])
    if len(facts) == 0:
        raise ValueError("No facts to probe: the fact set is empty. Load at least one fact with `load_facts`.")
    pool = facts if exemplars is None else exemplars
    per_fact = few_shot_prompts(facts, pool, fmt, config.num_prompts, config.num_shots, config.seed)
    prompts = [prompt for prompts in per_fact for prompt in prompts]
    relations, fictional_prompts = _fictional_prompts(facts, pool, fmt, config)
    torch.manual_seed(config.seed)
    # One greedy pass over the facts' prompts and the fictional entities' prompts
    greedy = _checked(generate_fn(prompts + fictional_prompts, True, 1), len(prompts) + len(fictional_prompts), 1)
    greedy, fictional_greedy = greedy[: len(prompts)], greedy[len(prompts) :]
    sampled = None
    if config.num_samples:
        sampled = _checked(generate_fn(prompts, False, config.num_samples), len(prompts), config.num_samples)

    p_greedy, p_sample, categories, greedy_answers = [], [], [], []
    n = config.num_prompts
    for i, answers in enumerate(facts["answers"]):
        block = slice(i * n, (i + 1) * n)
        firsts = [outputs[0] for outputs in greedy[block]]
        p0 = sum(is_correct(a, answers) for a in firsts) / n
        ps = None
        if sampled is not None:
            samples = [a for outputs in sampled[block] for a in outputs]
            ps = sum(is_correct(a, answers) for a in samples) / len(samples)
        p_greedy.append(p0)
        p_sample.append(ps)
        categories.append(slick_category(p0, ps))
        greedy_answers.append(firsts)
    probed = (
        facts.add_column("p_greedy", p_greedy)
        .add_column("p_sample", p_sample)
        .add_column("category", categories)
        .add_column("greedy_answers", greedy_answers)
    )
    probed = _label(probed, relations, fictional_greedy)
    return probed if model is None else probed.add_column(PROBE_MODEL, [model_name(model)] * len(probed))


def label_with_model(
    facts: Dataset,
    model=None,
    tokenizer=None,
    *,
    generate_fn: GenerateFn | None = None,
    exemplars: Dataset | None = None,
    fmt: AnswerFormat | None = None,
    config: ProbeConfig | None = None,
    progress: bool = True,
) -> Dataset:
    """
    Add `heuristic` and `defaults` to already-categorised `facts` (asking the model only about fictional entities),
    with the prompts `probe` would use: the same `exemplars`, `fmt` and `config` as the categories' probe.
    """
    config = config or ProbeConfig.cheap()
    fmt = fmt or AnswerFormat()
    generate_fn = _generator(model, tokenizer, generate_fn, fmt, config, progress)
    relations, prompts = _fictional_prompts(facts, facts if exemplars is None else exemplars, fmt, config)
    torch.manual_seed(config.seed)
    return _label(facts, relations, _checked(generate_fn(prompts, True, 1), len(prompts), 1) if prompts else [])


def model_name(model) -> str:
    """The recorded name (`embedded.model_id`) of a model, PEFT- or engine-wrapped or not: its `name_or_path`."""
    from ..distributed import unwrap
    from ..embedded import model_id
    from ..teacher import causal_lm

    return model_id(causal_lm(unwrap(model)).config._name_or_path)


def reusable_categories(facts: Dataset, model: str, reprobe: bool = False) -> tuple[bool, str]:
    """
    Whether `facts`' SliCK categories can stand for `model`'s (a recorded name, `model_name`), and why: they exist, no
    re-probe was asked for, and the model that probed them (`probe_model`) is `model` or was not recorded.
    """
    if "category" not in facts.column_names:
        return False, "the facts have no categories"
    if reprobe:
        return False, "a new probe was asked for"
    recorded = set(facts[PROBE_MODEL]) if PROBE_MODEL in facts.column_names else {None}
    if recorded == {model}:
        return True, f"the categories in the fact set, probed with {model}"
    if recorded == {None}:
        return True, "the categories in the fact set (no probing model recorded: re-probe to measure this model)"
    return False, f"the categories were probed with {', '.join(sorted(map(str, recorded)))}, not {model}"


def _checked(outputs: list[list[str]], num_prompts: int, per_prompt: int) -> list[list[str]]:
    if len(outputs) != num_prompts or any(len(answers) != per_prompt for answers in outputs):
        raise ValueError(
            f"generate_fn returned {len(outputs)} answer lists for {num_prompts} prompts; it must return one list of "
            f"{per_prompt} answer(s) per prompt, in order."
        )
    return outputs
