"""On-disk cache of the teacher's top-k next-token log-probs, keyed by example, so later epochs skip the teacher.

Layout of the cache folder: `fingerprint.json` (what the cache was built for; a mismatch is refused), and per process
an append-only `shard-<rank>.bin` of fixed-size rows (k int32 ids, then k float32 log-probs, one row per position)
with its index `shard-<rank>.jsonl` (`{"key", "row", "n"}` per example). Rows are written and flushed before their
index line, and only complete index lines pointing inside the data file are read back, so an interrupted run resumes
with what it had finished. Reads go through `numpy.memmap`.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

VERSION = 1


def tensor_digest(tensors) -> str:
    """A short hash of named tensors: a strided sample of each one's values plus its name and shape."""
    h = hashlib.sha256()
    for name, t in tensors:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def vocab_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def row_key(input_ids: torch.Tensor, positions: torch.Tensor) -> str:
    """Key of one sequence: its token ids and the positions the term covers."""
    h = hashlib.sha1(input_ids.to(torch.int64).cpu().numpy().tobytes())
    h.update(positions.to(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


class TeacherCache:
    def __init__(self, directory: str | os.PathLike, fingerprint: dict, topk: int, rank: int = 0):
        self.dir, self.topk = Path(directory), topk
        self.fingerprint = {"version": VERSION, "topk": topk, **fingerprint}
        self.dir.mkdir(parents=True, exist_ok=True)
        stored = self.dir / "fingerprint.json"
        if stored.exists():
            found = json.loads(stored.read_text())
            if found != self.fingerprint:
                diff = sorted(k for k in set(found) | set(self.fingerprint) if found.get(k) != self.fingerprint.get(k))
                raise ValueError(
                    f"The teacher cache in `{self.dir.name}` was built for other {', '.join(diff)} and cannot be reused. "
                    "Point `teacher_cache_dir` to a new folder, or delete this one to rebuild it."
                )
        elif rank == 0:
            stored.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
        self.rank = rank
        self.row_bytes = 8 * topk
        self.index: dict[str, tuple[int, int, int]] = {}  # key -> (shard, first row, rows)
        self._read_offsets: dict[int, int] = {}
        self._maps: dict[int, np.memmap] = {}
        # This process appends to its own shard: drop what an interrupted write left half done
        own, own_index = self._data(rank), self.dir / f"shard-{rank}.jsonl"
        if own.exists() and own.stat().st_size % self.row_bytes:
            os.truncate(own, own.stat().st_size // self.row_bytes * self.row_bytes)
        if own_index.exists():
            text = own_index.read_bytes()
            os.truncate(own_index, text.rfind(b"\n") + 1)
        self.refresh()

    def _data(self, shard: int) -> Path:
        return self.dir / f"shard-{shard}.bin"

    def refresh(self) -> None:
        """Read index lines appended since the last call, from every process's shard."""
        for path in sorted(self.dir.glob("shard-*.jsonl")):
            shard = int(path.stem.split("-")[1])
            size = self._data(shard).stat().st_size if self._data(shard).exists() else 0
            with path.open("rb") as f:
                f.seek(self._read_offsets.get(shard, 0))
                while (line := f.readline()).endswith(b"\n"):  # a line without newline is still being written
                    entry = json.loads(line)
                    if (entry["row"] + entry["n"]) * self.row_bytes <= size:
                        self.index[entry["key"]] = (shard, entry["row"], entry["n"])
                    self._read_offsets[shard] = f.tell()

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if key not in self.index:
            return None
        shard, row, n = self.index[key]
        rows = self._rows(shard, row + n)[row : row + n]
        ids = torch.from_numpy(rows[:, : self.topk].copy())
        logps = torch.from_numpy(rows[:, self.topk :].copy().view(np.float32))
        return ids, logps

    def _rows(self, shard: int, needed: int) -> np.ndarray:
        mapped = self._maps.get(shard)
        if mapped is None or mapped.shape[0] < needed:
            rows = self._data(shard).stat().st_size // self.row_bytes
            mapped = np.memmap(self._data(shard), dtype=np.int32, mode="r", shape=(rows, 2 * self.topk))
            self._maps[shard] = mapped
        return mapped

    def put(self, key: str, ids: torch.Tensor, logps: torch.Tensor) -> None:
        if key in self.index:
            return
        rows = np.concatenate(
            [ids.to(torch.int32).cpu().numpy(), logps.float().cpu().numpy().view(np.int32)], axis=1
        )
        data = self._data(self.rank)
        with data.open("ab") as f:
            first = f.tell() // self.row_bytes
            f.write(np.ascontiguousarray(rows).tobytes())
            f.flush()
            os.fsync(f.fileno())
        with (self.dir / f"shard-{self.rank}.jsonl").open("a") as f:
            f.write(json.dumps({"key": key, "row": first, "n": len(rows)}) + "\n")
        self.index[key] = (self.rank, first, len(rows))

    def __len__(self) -> int:
        return len(self.index)
