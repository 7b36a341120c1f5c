"""
Checks of what a user hands the trainer, each raising an error that names the cause and the fix before work is wasted.

- `check_not_empty`, `check_raw_dataset`: a dataset before SFTTrainer's preparation (rows, columns, column types,
  missing values), which would otherwise fail inside it with a bare `StopIteration`, `KeyError` or `AttributeError`.
- `check_prepared_dataset`: the tokenized dataset after it: every row dropped by truncation (or some, with a warning
  saying how many), rows made only of padding or special tokens (empty strings, all-padding `input_ids`), no token
  left for the loss, negative token ids.
- `check_token_ids`: token ids of the prepared datasets inside the model's vocabulary.
- `check_numeric_fields`: the numeric fields of a config hold numbers (not the string "1.0").

The dataset checks read whole Arrow columns with vectorised operations, never a Python loop over rows, so they stay
cheap on large datasets. An `IterableDataset` is only checked for emptiness and, on its first row, for its columns.
"""

import dataclasses
import logging
import math
import numbers

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

logger = logging.getLogger(__name__)

_FORMATS = (
    "a `text` column (language modeling; another name with `dataset_text_field`), `prompt` and `completion` columns, "
    "or a `messages` column (conversational)"
)


def check_not_empty(dataset, name: str = "train") -> None:
    """Refuse a missing or empty dataset, which SFTTrainer would meet as a bare `StopIteration`."""
    if dataset is None:
        raise ValueError(f"No {name} dataset was given. Pass `{name}_dataset=` (a `datasets.Dataset`).")
    empty = len(dataset) == 0 if hasattr(dataset, "__len__") else next(iter(dataset), None) is None
    if empty:
        raise ValueError(
            f"The {name} dataset is empty (0 rows). Pass a dataset with at least one example; if it came from a "
            "`split`, `filter` or `select`, check that step."
        )


def _column_names(dataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)))  # an IterableDataset of unknown features: its first row


def _used_columns(columns: list[str], text_field: str, name: str) -> list[str]:
    """The text columns SFTTrainer will read, or the error naming the missing one."""
    if "prompt" in columns and "completion" not in columns:
        raise ValueError(
            f"The {name} dataset has a `prompt` column but no `completion` column (columns: {columns}). A "
            "prompt-completion dataset needs both: rename the answer column with "
            "`dataset.rename_column('<answer column>', 'completion')`."
        )
    if "prompt" in columns:
        return ["prompt", "completion"]
    if text_field in columns:
        return [text_field]
    if "messages" in columns or "conversations" in columns:
        return ["messages" if "messages" in columns else "conversations"]  # rendered by the chat template
    if "completion" in columns:
        raise ValueError(
            f"The {name} dataset has a `completion` column but no `prompt` column (columns: {columns}). A "
            "prompt-completion dataset needs both: rename the question column with "
            "`dataset.rename_column('<question column>', 'prompt')`."
        )
    raise ValueError(
        f"The {name} dataset has none of the columns SFT reads (columns: {columns}). It needs {_FORMATS}. Rename "
        f"yours with `dataset.rename_column`, set `dataset_text_field`, or pass a `formatting_func`."
    )


def _check_text_column(column: pa.ChunkedArray, field: str, name: str) -> None:
    """A text column holds strings (or, conversational, lists of messages) and no missing values."""
    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_list(kind)
            or pa.types.is_large_list(kind) or pa.types.is_null(kind)):
        raise TypeError(
            f"The `{field}` column of the {name} dataset holds {kind} values, not text. Convert it first, e.g. "
            f"`dataset = dataset.map(lambda row: {{'{field}': str(row['{field}'])}})`."
        )
    if column.null_count:
        first = pc.indices_nonzero(column.is_null()).to_numpy()[0]
        raise ValueError(
            f"{column.null_count} of {len(column)} rows of the {name} dataset have no `{field}` (None), the first at "
            f"row {first}. Drop them with `dataset.filter(lambda row: row['{field}'] is not None)`, or fill them in."
        )


def _check_messages(column: pa.ChunkedArray, field: str, name: str) -> None:
    """Every message of a conversational column has a `role` and a `content`: a None content would train as an empty
    turn (an assistant message carrying `tool_calls` may have none)."""
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(kind.value_type):
        return
    lists = column.combine_chunks()
    messages = lists.flatten()  # the messages of the rows held (a sliced array's offsets point into its values)
    keys = [kind.value_type.field(i).name for i in range(kind.value_type.num_fields)]
    for key in ("role", "content"):
        if key not in keys:
            raise ValueError(
                f"The messages of the `{field}` column of the {name} dataset have no `{key}` (their keys: {keys}). "
                "Each message is a dict like {'role': 'user', 'content': '...'}: rename the key with `dataset.map`."
            )
        bad = pc.or_(messages.is_null(), messages.field(key).is_null())
        if key == "content" and "tool_calls" in keys:
            bad = pc.and_(bad, messages.field("tool_calls").is_null())
        flagged = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
        if len(flagged):
            offsets = lists.offsets.to_numpy()
            rows = np.searchsorted(offsets, flagged + offsets[0], side="right") - 1
            first_row, first = int(rows[0]), int(flagged[0] + offsets[0] - offsets[rows[0]])
            raise ValueError(
                f"{len(np.unique(rows))} of {len(lists)} rows of the {name} dataset have a message with no `{key}` "
                f"(None) in `{field}`, the first at row {first_row} (message {first}): it would train as an empty "
                f"turn. Fill it in, or drop those rows with `dataset.filter(lambda row: all(m['{key}'] is not None "
                f"for m in row['{field}']))`."
            )


def check_raw_dataset(dataset, args, formatting_func=None, name: str = "train") -> None:
    """
    Check a dataset before SFTTrainer's preparation: not empty, the columns of one of SFT's formats present, their
    values text (or messages) and never None, nor the role or content of any message. Pre-tokenized datasets
    (`input_ids`) and those given with a `formatting_func` are only checked for emptiness here;
    `check_prepared_dataset` checks their tokens.
    """
    check_not_empty(dataset, name)
    columns = _column_names(dataset)
    if "input_ids" in columns or formatting_func is not None:
        return
    used = _used_columns(columns, args.dataset_text_field, name)
    if isinstance(dataset, Dataset):
        table = dataset.with_format("arrow")
        for field in used:
            _check_text_column(table[field], field, name)
            _check_messages(table[field], field, name)


def _row_counts(lists: pa.ListArray, keep, skip_first: bool = False) -> np.ndarray:
    """
    Per row of a list array, how many of its elements `keep` (a vectorised predicate on a NumPy array) accepts, the
    first element of each row left out with `skip_first`.
    """
    offsets = lists.offsets.to_numpy()  # into `lists.values`, which a sliced array keeps whole
    starts, empty = offsets[:-1], offsets[1:] == offsets[:-1]
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64)
    kept = keep(lists.values.to_numpy(zero_copy_only=False)[: offsets[-1]])
    if skip_first:
        kept[starts[~empty]] = False
    counts = np.add.reduceat(np.append(kept, False).view(np.uint8), starts, dtype=np.int64)
    counts[empty] = 0  # `reduceat` gives an empty row the element at its start
    return counts


def _token_counter(dataset: Dataset):
    """
    `count(column, keep, skip_first=False)`, `_row_counts` over the rows of the dataset's backing Arrow table, and the
    mask of the table rows the dataset holds. Row numbers are so those of the data as given to SFTTrainer, which drops
    rows (truncation) and reorders them (`shuffle_dataset`) through an index mapping that `Dataset` reads row by row
    (seconds per 100k rows): the kept rows are found by SFTTrainer's own rule (a label other than -100). Only a
    dataset whose rows are another selection is read through its mapping.
    """
    table = dataset.data
    rows = np.ones(table.num_rows, dtype=bool)
    if table.num_rows != len(dataset):
        if "labels" in table.column_names:
            rows = _row_counts(table.column("labels").combine_chunks(), lambda labels: labels != -100) > 0
        if np.count_nonzero(rows) != len(dataset):
            table = dataset.with_format("arrow")[:]
            rows = np.ones(table.num_rows, dtype=bool)

    def count(column: str, keep, skip_first: bool = False) -> np.ndarray:
        return _row_counts(table.column(column).combine_chunks(), keep, skip_first)

    return count, rows


def _examples(flagged: np.ndarray, limit: int = 3) -> str:
    """The first rows flagged, numbered as given to the trainer."""
    return ", ".join(str(i) for i in np.flatnonzero(flagged)[:limit])


def check_prepared_dataset(dataset, raw_rows: int | None, processing_class, args, packing: bool,
                           name: str = "train") -> None:
    """
    Check a tokenized dataset (SFTTrainer's preparation done, `raw_rows` rows before it).

    Refused: no row left (every one dropped because truncation to `max_length` left it no loss token), negative token
    ids (the model's vocabulary is checked by `check_token_ids` once the model exists), rows all made of padding or
    special tokens, and no token anywhere for the
    loss to train on. Warned: some rows dropped by truncation (how many), some rows of padding or special tokens only.
    """
    if not isinstance(dataset, Dataset):
        return
    dropped = raw_rows - len(dataset) if raw_rows is not None and not packing else 0
    if len(dataset) == 0:
        raise ValueError(
            f"Every one of the {raw_rows} rows of the {name} dataset was dropped: truncated to "
            f"`max_length={args.max_length}` tokens, none keeps a token the loss trains on (with "
            f"`truncation_mode={args.truncation_mode!r}` the prompt alone fills `max_length`). Raise `max_length`, "
            "set `truncation_mode='keep_end'`, or shorten the prompts."
        )
    if dropped > 0:
        logger.warning(
            f"{dropped} of {raw_rows} rows of the {name} dataset were dropped: truncated to `max_length="
            f"{args.max_length}` tokens, they keep no token the loss trains on (the prompt alone fills `max_length`). "
            f"Training uses the other {len(dataset)}. To keep them, raise `max_length`, set "
            "`truncation_mode='keep_end'`, or shorten the prompts."
        )
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    count, rows = _token_counter(dataset)
    _check_ids(count, rows, None, name)
    special = {*tokenizer.all_special_ids, tokenizer.pad_token_id} - {None}
    special = np.array(sorted(special), dtype=np.int64)
    empty_rows = (count("input_ids", lambda ids: ~np.isin(ids, special)) == 0) & rows
    if np.count_nonzero(empty_rows) == np.count_nonzero(rows):
        shown = ", ".join(tokenizer.convert_ids_to_tokens(special[:5].tolist())) + (", …" if len(special) > 5 else "")
        raise ValueError(
            f"Every row of the {name} dataset is empty: after tokenization each holds only padding or special tokens "
            f"({shown}), so the model would learn nothing (or to emit padding). Check the data: empty strings in the "
            "text column, or `input_ids` made of padding."
        )
    if empty_rows.any():
        logger.warning(
            f"{np.count_nonzero(empty_rows)} of {len(dataset)} rows of the {name} dataset hold only padding or "
            f"special tokens (e.g. rows {_examples(empty_rows)}): empty strings, or `input_ids` made of padding. They "
            "teach the model to emit padding or nothing; drop them with `dataset.filter`."
        )
    # Position 0 is never predicted: a row trains on its labels from the second token on (packed rows: roughly)
    if "labels" in dataset.column_names:
        trained = count("labels", lambda labels: labels != -100, skip_first=True) > 0
        if not (trained & rows).any():
            raise ValueError(
                f"No row of the {name} dataset has a token for the loss to train on: the loss would be 0 and nothing "
                "learned. Each row needs at least one labelled token after its first (for prompt-completion data, a "
                "non-empty completion)."
            )


def _check_ids(count, rows: np.ndarray, vocab_size: int | None, name: str) -> None:
    outside = (count("input_ids", lambda ids: (ids < 0) | (ids >= vocab_size) if vocab_size else ids < 0) > 0) & rows
    if outside.any():
        bound = f"the model's vocabulary (0 to {vocab_size - 1})" if vocab_size else "0 and up (negative ids)"
        raise ValueError(
            f"{np.count_nonzero(outside)} rows of the {name} dataset hold token ids outside {bound}, e.g. rows "
            f"{_examples(outside)}. The `input_ids` were made with another tokenizer: tokenize with the model's own "
            "(`processing_class`), or pass the text and let the trainer tokenize it."
        )


def check_token_ids(trainer) -> None:
    """
    Refuse token ids of the trainer's prepared datasets outside its model's input embeddings, which would fail with a
    bare `IndexError` at the first step. Called once the model exists (SFTTrainer prepares data before keeping it).
    """
    vocab_size = trainer.model.get_input_embeddings().num_embeddings
    evals = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"eval": trainer.eval_dataset}
    for name, dataset in {"train": trainer.train_dataset, **evals}.items():
        if isinstance(dataset, Dataset) and "input_ids" in dataset.column_names:
            _check_ids(*_token_counter(dataset), vocab_size, name)


def check_real(label: str, value, fix: str) -> float:
    """`value` as a float; a TypeError naming `label` and `fix` for anything but a real number (a bool included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{label} must be a number, got the {type(value).__name__} {value!r}. {fix}")
    return float(value)


def check_finite(name: str, value, fix: str) -> float:
    """`value` (a real number) as a float; a ValueError naming `name` and `fix` for a NaN or an infinity."""
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}. {fix}")
    return float(value)


def check_numeric_fields(config) -> None:
    """
    Refuse a non-number in a numeric field declared by `type(config)` itself (not its parents), e.g.
    `distill_coef="1.0"`: command-line and YAML parsers convert them, but Python code passes values as they are.
    """
    own = {f.name for f in dataclasses.fields(type(config))} - {
        f.name for base in type(config).__bases__ if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)
    }
    for field in dataclasses.fields(type(config)):
        if field.name not in own or field.type not in (int, float):
            continue
        value = getattr(config, field.name)
        if value is None and field.default is None:
            continue  # an optional field (HfArgumentParser rewrites `int | None` annotations to `int` in place)
        wanted = numbers.Integral if field.type is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise TypeError(
                f"`{field.name}` must be {'an integer' if field.type is int else 'a number'}, got the "
                f"{type(value).__name__} {value!r}. Pass a {field.type.__name__}, e.g. `{field.name}="
                f"{field.default!r}`."
            )
