"""
The check of what a user passes in, run at every entry point before any model loads: `trl-selfdistill sft`, `probe`
and `eval`, the training script, `SelfDistillSFTTrainer`, `ForgettingCallback` and `probe`. The command line and
Python so give the same message, and each names the problem and the fix (docs/troubleshooting.md lists them).

- `check_model_source`: a model (or teacher) path or Hub id that can be loaded: the folder exists and is a folder,
  holds a config, weights and (when a tokenizer is read from it) tokenizer files, its JSON files parse.
- `check_training_length`: `max_steps` / `num_train_epochs` that train at least one step.
- `check_prompt_template`: a prompt template whose only placeholder is `{question}`.
- `check_facts`: a fact set (however it was built) that can be probed and scored: not empty, a non-empty answer
  list per fact, unique ids, a category on every fact or on none.
- `check_output_dir`: nothing in the way of what a save writes (a folder where a file goes).
- `check_data_file`: a local training-data file that holds rows.

Dataset columns and tokens are checked by `data_checks` (`check_raw_dataset`, `check_prepared_dataset`: inside the
trainer, and by the training script before the model loads), fact files row by row by `knowledge.facts.load_facts`
(which calls `check_unique_ids`); this module holds the rest rather than repeating them.
"""

import json
import math
import string
from collections import Counter
from pathlib import Path

from huggingface_hub import is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

CONFIG_FILES = ("config.json", "adapter_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin")
# Any one of these is a tokenizer transformers can load (with tokenizer_config.json beside it, or alone)
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                      "vocab.txt", "*.tiktoken")
FILELESS_TOKENIZERS = ("ByT5Tokenizer", "CanineTokenizer")
JSON_FILES = ("config.json", "adapter_config.json", "tokenizer_config.json", "generation_config.json",
              "model.safetensors.index.json")
# Names a save writes into `output_dir` (model, adapter, tokenizer, card, results, arguments)
SAVED_NAMES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin",
               "model.safetensors.index.json", *CONFIG_FILES, "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "README.md",
               "training_args.bin", "forgetting_results.json")


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:limit]) + (", …" if len(names) > limit else "") if names else "nothing"


def _has(folder: Path, patterns) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in patterns)


def check_json_file(path: Path, fix: str) -> None:
    """Refuse a JSON file that does not parse (e.g. truncated by a killed run), naming the file and `fix`."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f"line {err.lineno}, column {err.colno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else err
        raise ValueError(f"{path} is not valid JSON ({where}); it may be truncated. {fix}") from err


def _fileless_tokenizer(folder: Path) -> bool:
    """A tokenizer that needs no vocabulary file: byte-level classes, or remote code (`auto_map`)."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text(encoding="utf-8"))
    return data.get("tokenizer_class") in FILELESS_TOKENIZERS or "auto_map" in data


def _check_model_folder(path: Path, where: str, tokenizer: bool) -> None:
    if not _has(path, CONFIG_FILES):
        checkpoints = sorted(path.glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
        hint = (f" It holds checkpoints: pass one of them, e.g. {checkpoints[-1]}." if checkpoints else " Pass the "
                "`output_dir` or a `checkpoint-N` folder of a run, or a folder written by `save_pretrained`.")
        raise ValueError(
            f"{where}: {path} is not a model folder: it has no config.json or adapter_config.json (it holds "
            f"{_listing(path)}).{hint}"
        )
    for name in JSON_FILES:
        if (path / name).is_file():
            try:
                check_json_file(path / name, "Save the model there again, or copy the file from the base model.")
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err.__cause__
    if not _has(path, WEIGHT_PATTERNS):
        raise ValueError(
            f"{where}: the model folder {path} has no weights (no *.safetensors, pytorch_model*.bin or "
            f"adapter_model.*; it holds {_listing(path)}). Save the model there with `save_pretrained`, or point to a "
            "folder that has them."
        )
    adapter = (path / "adapter_config.json").is_file()  # loads on its base model, whose tokenizer serves it
    if tokenizer and not adapter and not _has(path, TOKENIZER_PATTERNS) and not _fileless_tokenizer(path):
        raise ValueError(
            f"{where}: the model folder {path} has no tokenizer files (none of {', '.join(TOKENIZER_PATTERNS)}; it "
            f"holds {_listing(path)}). Save the tokenizer beside the model (`tokenizer.save_pretrained('{path}')`, "
            "with the base model's tokenizer), or copy those files from the base model."
        )


def check_model_source(name_or_path: str, what: str, *, tokenizer: bool = True, model_init_kwargs=None) -> None:
    """
    Refuse a model that cannot be loaded, before loading it. `what` names the argument in the messages (`model`,
    `--model`); with `tokenizer`, the tokenizer is read from the same place. A local path must be an existing folder
    with a config, weights and tokenizer files whose JSON parses; a Hub id (not a local path) is checked only offline,
    for a cached copy.
    """
    from .embedded import EMBEDDED

    where = f"`{what} {name_or_path}`" if what.startswith("--") else f"`{what}={name_or_path!r}`"
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"{where}: give a local model folder or a Hub model id `owner/name`.")
    if name_or_path == EMBEDDED:
        return
    path = Path(name_or_path).expanduser()
    if path.is_file():
        raise ValueError(
            f"{where} is a file, not a model folder. Pass the folder that holds it ({path.absolute().parent}) if it "
            "is a saved model, or a Hub model id `owner/name`."
        )
    if path.is_dir():
        _check_model_folder(path, where, tokenizer)
        return
    try:
        validate_repo_id(name_or_path)
        hub_id = not name_or_path.startswith(("/", "./", "../", "~", ".\\"))
    except HFValidationError:
        hub_id = False
    if not hub_id or (len(path.parts) > 1 and path.parent.is_dir()):
        raise ValueError(
            f"{where}: there is no such folder ({path.absolute()}). Pass the folder of a saved model (the "
            "`output_dir` or a `checkpoint-N` folder of an earlier run) or a Hub model id `owner/name`."
        )
    kwargs = model_init_kwargs or {}
    if is_offline_mode() or kwargs.get("local_files_only"):
        cache = {"cache_dir": kwargs.get("cache_dir"), "revision": kwargs.get("revision")}
        if not any(isinstance(try_to_load_from_cache(name_or_path, file, **cache), str) for file in CONFIG_FILES):
            raise ValueError(
                f"{where} is not a local folder (none at {path.absolute()}), and the Hub is offline "
                "(`HF_HUB_OFFLINE=1` or `local_files_only`) with no cached copy of that repo. If it is a local model, "
                "fix the path; if a Hub model, download it once with network access "
                f"(`hf download {name_or_path}`) or unset `HF_HUB_OFFLINE`."
            )


def check_training_length(max_steps, num_train_epochs) -> None:
    """Refuse settings that train no step: the untrained model would be saved (and pushed) as a trained one."""
    if max_steps is not None and max_steps > 0:
        return
    if not (isinstance(num_train_epochs, (int, float)) and math.isfinite(num_train_epochs) and num_train_epochs > 0):
        raise ValueError(
            f"Nothing would be trained: `max_steps={max_steps}` and `num_train_epochs={num_train_epochs}` give 0 "
            "optimizer steps, and the untrained model would be saved as a trained one. Set `max_steps` to a number "
            "of optimizer steps ≥ 1 (e.g. 100), or `num_train_epochs` > 0 (e.g. 3) with `max_steps` unset (-1)."
        )


def check_prompt_template(template: str, what: str = "The prompt template") -> None:
    """Refuse a template that `str.format(question=...)` cannot fill: other or positional placeholders, lone braces."""
    if not isinstance(template, str):
        raise TypeError(f"{what} must be a string with `{{question}}`, got the {type(template).__name__} "
                        f"{template!r}.")
    try:
        parsed = [(name, conversion) for _, name, _, conversion in string.Formatter().parse(template)]
    except ValueError as err:
        raise ValueError(
            f"{what} {template!r} has an unmatched brace ({err}). Write a literal brace as `{{{{` or `}}}}`; the only "
            "placeholder is `{question}`."
        ) from err
    fields = [name for name, _ in parsed if name is not None]
    unknown = [f"{{{name}}}" for name in fields if name != "question"]
    unknown += [f"{{{name}!{conversion}}}" for name, conversion in parsed if conversion not in (None, "r", "s", "a")]
    if unknown:
        raise ValueError(
            f"{what} {template!r} has the placeholder(s) {', '.join(dict.fromkeys(unknown))}, but only `{{question}}` "
            "is filled in. Remove them, or write literal braces as `{{` and `}}`."
        )
    if "question" not in fields:
        raise ValueError(f"{what} {template!r} has no `{{question}}` placeholder; add one.")


def check_facts(facts, name: str = "fact set", categories: bool = True, ids: bool = True) -> None:
    """
    Refuse a fact set (a `Dataset` of `id`/`question`/`answers` rows, from `load_facts` or built by hand) that probing
    or scoring would fail on or get wrong: empty, without the fact columns, a fact without answers, two facts with one
    id (a fact's own id keeps its exemplars out, so shared ids silently drop exemplars), or, with `categories` (results
    are reported by category), a `category` on only some facts. Without `ids` (training rows), ids are not needed.
    """
    if facts is None or len(facts) == 0:
        raise ValueError(
            f"The {name} is empty (0 facts). Give facts with `question` and `answers` (`load_facts` reads files, "
            "folders and Hub datasets); if it came from a `filter`, `select` or split, check that step."
        )
    needed = ("id", "question", "answers") if ids else ("question", "answers")
    missing = [column for column in needed if column not in facts.column_names]
    if missing:
        raise ValueError(
            f"The {name} has no {', '.join(f'`{c}`' for c in missing)} column (columns: {facts.column_names}). Load "
            "the facts with `trl_selfdistill.knowledge.load_facts`, which adds ids and checks every row."
        )
    no_answers = [i for i, answers in enumerate(facts["answers"]) if not answers or not any(
        isinstance(a, str) and a.strip() for a in answers)]
    if no_answers:
        raise ValueError(
            f"{len(no_answers)} facts of the {name} have no answer (an empty `answers` list), the first at row "
            f"{no_answers[0]} ({facts[no_answers[0]]['question']!r}). Give each fact at least one gold alias, or drop "
            "those rows; `load_facts` refuses them with the row named."
        )
    if ids:
        check_unique_ids(facts["id"], facts["question"], name)
    if categories and "category" in facts.column_names:
        without = [i for i, category in enumerate(facts["category"]) if not category]
        if without and len(without) < len(facts):
            raise ValueError(
                f"{len(without)} of {len(facts)} facts of the {name} have no `category`, the first at row "
                f"{without[0]}: results by category need all of them. Categorise them all (`trl-selfdistill probe`, "
                "or `probe(facts, ...)`), or drop the `category` column (`facts.remove_columns('category')`)."
            )


def check_unique_ids(ids, questions, name: str = "fact set") -> None:
    """Refuse fact ids used by more than one fact, naming them and the questions of the first."""
    repeated = {fact_id: n for fact_id, n in Counter(ids).items() if n > 1}
    if not repeated:
        return
    shown = ", ".join(f"{fact_id!r} ({n}×)" for fact_id, n in list(repeated.items())[:5]) + (
        ", …" if len(repeated) > 5 else "")
    first = next(iter(repeated))
    asked = [question for fact_id, question in zip(ids, questions, strict=True) if fact_id == first][:2]
    raise ValueError(
        f"{len(repeated)} fact ids of the {name} are used by several facts: {shown} (id {first!r}: "
        f"{' / '.join(map(repr, asked))}). Ids must be unique: a fact's id keeps it out of its own "
        "few-shot exemplars, so a shared id silently drops the other facts from the pool. Give each fact its own id, "
        "or drop the `id` column (`load_facts` then makes one from each question)."
    )


def check_output_dir(output_dir) -> None:
    """Refuse an `output_dir` that is a file, or holds a folder where a save writes a file (model.safetensors/)."""
    if output_dir is None:
        return
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`output_dir={str(output_dir)!r}` is a file, not a folder. Choose a folder to save into.")
    blocked = [path / name for name in SAVED_NAMES if (path / name).is_dir()]
    if blocked:
        raise ValueError(
            f"{', '.join(map(str, blocked))} {'is a folder' if len(blocked) == 1 else 'are folders'}, but the save "
            "writes a file of that name there. Move or delete it, or choose another `output_dir`."
        )


def check_data_file(path: Path) -> None:
    """Refuse a local data file without a single row (an empty or blank file) before `load_dataset` reads it."""
    if not path.is_file():
        return
    with path.open("rb") as f:
        blank = not f.read(1 << 16).strip()
    if blank and path.stat().st_size < (1 << 16):
        raise ValueError(
            f"The dataset file {path} is empty: it has no rows. Give a file with one example per line (JSONL) or "
            "per row, or point `--dataset_name` at the right file."
        )
