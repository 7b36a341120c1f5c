"""On-disk cache of the teacher's top-k next-token log-probs, keyed by example, so later epochs skip the teacher.

Folder layout:

- `fingerprint.json`: what the cache was built for (format version, k, teacher weights, tokenizer, training data, τ,
  scope). Opening the folder for anything else is refused with what differs. A folder that holds shards but no
  readable `fingerprint.json` is refused too (what its entries were built for is unknown). The file is created once,
  atomically (written aside, then hard-linked into place, so the first of two racing processes wins).
- One shard per writing process, created at its first write: `shard-<uuid>.bin` holds fixed-size rows (k int32 ids,
  then k float32 log-probs, one row per covered position), written in order from byte 0; `shard-<uuid>.jsonl` holds a
  header line `{"fingerprint", "version"}` (a digest of the fingerprint) then one line per entry:
  `{"key", "offset", "rows", "epoch", "checksum"}`: the byte offset of its rows in the `.bin`, their count, the
  training epoch it was written in, and the 64-bit xxh3 hash of the key followed by the rows' bytes.

Concurrency needs no lock: a process appends only to its own shard, whose name no other process (another rank, or
another run sharing the folder, e.g. a λ sweep) can take, so an index line only ever points into data its own writer
wrote. Rows are written and flushed before their index line, and readers take complete lines only. Readers read
every shard whose header carries their fingerprint's digest, and ignore (with a warning) one carrying another.

Reads are checked: an entry is served only if its rows lie inside the data file, its checksum matches, every log-prob
is finite and every id is inside the vocabulary. Anything else (bytes altered on disk, a truncated data file, a data
write lost in a crash) is not served, with one warning per shard: another copy of the key is tried (several runs may
have stored it; the one from the earliest epoch is served first), and without one the teacher runs for that example
and its values are stored again. A damaged entry costs a teacher forward and never serves wrong values. Nothing is
fsynced: a power loss can lose the newest entries, which the checks turn into misses. `put` refuses non-finite
log-probs and ids outside the vocabulary (`ValueError`), so they are never stored.

Index lines: a last line without its newline is an interrupted write and is skipped (read again later, in case its
writer is still running); any other line that is not a valid entry stops with an error naming the file and line.

Epochs: `get(key, before_epoch=e)` serves only entries written in an epoch before `e`. The trainer passes its current
epoch, so the first epoch of every run runs the teacher (even on a full cache) and a later epoch serves what earlier
epochs stored. Which values a step uses therefore depends only on its epoch, never on what an interrupted earlier
attempt or another run has written: a run resumed from a checkpoint trains exactly like an uninterrupted one.

Read-only folders: construction writes nothing when the folder and its fingerprint exist. If the process may not write
to the folder (`os.access`), the cache serves what it holds and stores nothing: rows it lacks run the teacher every
epoch (a warning says so).
"""

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import xxhash

logger = logging.getLogger(__name__)

VERSION = 2
_FIX = "delete it, or point `teacher_cache_dir` elsewhere"


def tensor_digest(tensors) -> str:
    """A hash of every byte of named tensors, with their names, shapes and dtypes (xxh3-128, several GB/s)."""
    h = xxhash.xxh3_128()
    for name, t in tensors:
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def vocab_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def row_key(input_ids: torch.Tensor, positions: torch.Tensor) -> str:
    """Key of one sequence: its token ids and the positions the term covers."""
    h = hashlib.sha1(input_ids.to(torch.int64).cpu().numpy().tobytes())
    h.update(positions.to(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _checksum(key: str, data: bytes) -> int:
    h = xxhash.xxh3_64(key.encode())
    h.update(data)
    return h.intdigest()


class _Entry(NamedTuple):
    shard: int  # index into `TeacherCache._shards`
    offset: int  # byte offset of the first row in the shard's data file
    rows: int
    epoch: int  # training epoch it was written in
    checksum: int


class _Shard:
    """Read state of one shard: its files, how far its index has been read, and whether its header matched."""

    def __init__(self, index: Path, number: int):
        self.index, self.data, self.number = index, index.with_suffix(".bin"), number
        self.read_to = 0  # bytes of the index already parsed
        self.lines = 0
        self.valid: bool | None = None  # header not read yet
        self.reader = None  # open data file, for reads
        self.warned = False


class TeacherCache:
    """The cache in `directory`; see the module docstring for the format and the rules."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, topk: int, vocab_size: int):
        if topk > vocab_size:
            raise ValueError(
                f"`teacher_cache_topk={topk}` exceeds the vocabulary ({vocab_size} tokens): the teacher has no "
                f"{topk} tokens to keep. Set `teacher_cache_topk` ≤ {vocab_size} (k = vocabulary size caches the "
                "exact distribution)."
            )
        self.dir, self.topk, self.vocab_size = Path(directory), topk, vocab_size
        self.row_bytes = 8 * topk
        self.fingerprint = {"version": VERSION, "topk": topk, **fingerprint}
        self._digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self._make_folder()
        self.writable = os.access(self.dir, os.W_OK)
        self._check_fingerprint()
        if not self.writable:
            logger.warning(
                f"The teacher cache folder {self.dir} is read-only for this process: its entries are used, and rows "
                "it lacks run the teacher every epoch without being stored. Make it writable to complete the cache."
            )
        self.index: dict[str, _Entry] = {}  # key -> the entry served
        self._spares: dict[str, list[_Entry]] = {}  # key -> other copies (from other runs), tried if it is damaged
        self._shards: list[_Shard] = []
        self._by_path: dict[Path, _Shard] = {}
        self._own: _Shard | None = None
        self._writers = None  # (data file, index file) of this process's shard, opened at its first write
        self._written = 0  # bytes written to this process's data file
        self.refresh()

    # ----------------------------------------------------------------------------------------------------------------
    # Opening

    def _make_folder(self) -> None:
        existing = self.dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            where = "is a file" if existing == self.dir else f"lies under the file {existing}"
            raise ValueError(
                f"`teacher_cache_dir` {self.dir} {where}. Point `teacher_cache_dir` to a folder (a new path is "
                "created)."
            )
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"Cannot create the teacher cache folder {self.dir} ({e.strerror}). Point `teacher_cache_dir` to a "
                "folder this process can write to."
            ) from e

    def _check_fingerprint(self) -> None:
        stored = self.dir / "fingerprint.json"
        if not stored.exists():
            if any(self.dir.glob("shard-*")):
                raise ValueError(
                    f"The teacher cache folder {self.dir} holds shards but no fingerprint.json, so what they were "
                    f"built for is unknown and they cannot be trusted: {_FIX}."
                )
            if not self.writable:
                return
            aside = self.dir / f".fingerprint-{uuid.uuid4().hex}.json"
            aside.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
            try:
                os.link(aside, stored)  # atomic, and fails if another process created it first
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links: the last writer wins, and a loser's shards are ignored
                os.replace(aside, stored)
            finally:
                aside.unlink(missing_ok=True)
        try:
            found = json.loads(stored.read_text())
            if not isinstance(found, dict):
                raise TypeError("not a JSON object")
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(
                f"The teacher cache folder {self.dir} has an unreadable fingerprint.json ({e}), so what its entries "
                f"were built for is unknown: {_FIX}."
            ) from e
        if found != self.fingerprint:
            diff = sorted(k for k in set(found) | set(self.fingerprint) if found.get(k) != self.fingerprint.get(k))
            raise ValueError(
                f"The teacher cache in {self.dir} was built for other {', '.join(diff)} and cannot be reused. "
                "Point `teacher_cache_dir` to a new folder, or delete this one to rebuild it."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Reading

    def refresh(self) -> None:
        """Read index lines appended since the last call, from every other process's shard."""
        for path in sorted(self.dir.glob("shard-*.jsonl")):
            shard = self._by_path.get(path)
            if shard is None:
                shard = self._add_shard(path)
            if shard is self._own or shard.valid is False:
                continue
            with path.open("rb") as f:
                f.seek(shard.read_to)
                while (line := f.readline()).endswith(b"\n"):  # a line without newline is still being written
                    shard.lines += 1
                    self._read_line(shard, line)
                    shard.read_to = f.tell()
                    if shard.valid is False:
                        break

    def _read_line(self, shard: _Shard, line: bytes) -> None:
        try:
            entry = json.loads(line)
            if shard.valid is None:
                shard.valid = entry["fingerprint"] == self._digest and entry["version"] == VERSION
                if not shard.valid:
                    logger.warning(
                        f"Teacher cache shard {shard.index} was written for another fingerprint (a run with other "
                        "settings wrote into this folder); its entries are ignored."
                    )
                return
            key, offset, rows, epoch, checksum = (entry[f] for f in ("key", "offset", "rows", "epoch", "checksum"))
            if not (isinstance(key, str) and all(type(v) is int for v in (offset, rows, epoch, checksum))):
                raise TypeError("wrong field types")
            if offset < 0 or rows < 1 or epoch < 0:
                raise ValueError("negative offset or epoch, or no rows")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{shard.index}, line {shard.lines}, is not a valid teacher-cache index line ({e}: {line[:100]!r}). "
                f"The cache folder {self.dir} is damaged: {_FIX}."
            ) from e
        self._add(key, _Entry(shard.number, offset, rows, epoch, checksum))

    def _add_shard(self, index: Path) -> _Shard:
        shard = self._by_path[index] = _Shard(index, len(self._shards))
        self._shards.append(shard)
        return shard

    def get(self, key: str, before_epoch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The top-k ids and log-probs of `key`, if stored in an epoch before `before_epoch` and intact; else None."""
        while (entry := self.index.get(key)) is not None and entry.epoch < before_epoch:
            shard = self._shards[entry.shard]
            raw, problem = self._read_rows(shard, entry)
            if problem is None and _checksum(key, raw) != entry.checksum:
                problem = "checksum mismatch"
            if problem is None:
                rows = np.frombuffer(raw, dtype=np.int32).reshape(entry.rows, 2 * self.topk)
                ids, logps = rows[:, : self.topk], rows[:, self.topk :].view(np.float32)
                problem = self._invalid(ids, logps)
                if problem is None:
                    return torch.from_numpy(ids.copy()), torch.from_numpy(logps.copy())
            if not shard.warned:
                shard.warned = True
                logger.warning(
                    f"Teacher cache shard {shard.data} has a damaged entry ({problem}); it is not served, and without "
                    "an intact copy the teacher recomputes it and it is stored again (reported once per shard)."
                )
            self._drop(key)
        return None

    def _add(self, key: str, entry: _Entry) -> None:
        """Index an entry; of several for one key (written by several runs), the earliest-epoch one is served first."""
        old = self.index.get(key)
        if old is None or entry.epoch < old.epoch:
            self.index[key] = entry
        if old is not None:
            self._spares.setdefault(key, []).append(entry if self.index[key] is old else old)

    def _drop(self, key: str) -> None:
        """Forget the served entry of `key` (found damaged): its next copy, if any, takes its place."""
        spares = self._spares.pop(key, [])
        if not spares:
            del self.index[key]
            return
        spares.sort(key=lambda e: e.epoch)
        self.index[key] = spares.pop(0)
        if spares:
            self._spares[key] = spares

    def _read_rows(self, shard: _Shard, entry: _Entry) -> tuple[bytes, str | None]:
        size = entry.rows * self.row_bytes
        if entry.offset % self.row_bytes:
            return b"", "offset not on a row boundary"
        try:
            if shard.reader is None:
                shard.reader = shard.data.open("rb")
            shard.reader.seek(entry.offset)
            raw = shard.reader.read(size)
        except OSError as e:
            return b"", f"data file unreadable: {e}"
        if len(raw) < size:
            return raw, "rows past the end of the data file"
        return raw, None

    def _invalid(self, ids: np.ndarray, logps: np.ndarray) -> str | None:
        if not np.isfinite(logps).all():
            return "non-finite log-probs"
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            return f"token ids outside [0, {self.vocab_size})"
        return None

    # ----------------------------------------------------------------------------------------------------------------
    # Writing

    def put(self, key: str, ids: torch.Tensor, logps: torch.Tensor, epoch: int) -> None:
        """Store the `[rows, k]` top-k ids and log-probs of `key`, written in training epoch `epoch`.

        A key already stored in this epoch or an earlier one, or a read-only folder, stores nothing. Non-finite
        log-probs or ids outside the vocabulary raise `ValueError` and are never stored.
        """
        if ids.ndim != 2 or ids.shape != logps.shape or ids.shape[1] != self.topk:
            raise ValueError(
                f"Teacher cache entries are [rows, {self.topk}] ids and log-probs; got {tuple(ids.shape)} and "
                f"{tuple(logps.shape)}."
            )
        ids, logps = ids.to(torch.int32).cpu().numpy(), logps.float().cpu().numpy()
        problem = self._invalid(ids, logps)
        if problem is not None:
            raise ValueError(f"The teacher's top-k for cache key {key} has {problem}; such values are never cached.")
        stored = self.index.get(key)
        if (stored is not None and stored.epoch <= epoch) or not self.writable:
            return
        raw = np.concatenate([ids, logps.view(np.int32)], axis=1).tobytes()
        if self._writers is None:
            self._open_shard()
        data, index = self._writers
        data.write(raw)
        data.flush()  # rows reach the file before the index line that points at them
        entry = _Entry(self._own.number, self._written, len(ids), epoch, _checksum(key, raw))
        line = {"key": key, "offset": entry.offset, "rows": entry.rows, "epoch": epoch, "checksum": entry.checksum}
        index.write(json.dumps(line) + "\n")
        index.flush()
        self._written += len(raw)
        self._add(key, entry)

    def _open_shard(self) -> None:
        name = f"shard-{uuid.uuid4().hex}"
        data = (self.dir / f"{name}.bin").open("xb")
        index = (self.dir / f"{name}.jsonl").open("x", encoding="utf-8")
        index.write(json.dumps({"fingerprint": self._digest, "version": VERSION}) + "\n")
        index.flush()
        self._own = self._add_shard(Path(index.name))
        self._own.valid = True
        self._writers = (data, index)

    def __len__(self) -> int:
        return len(self.index)
