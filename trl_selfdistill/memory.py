"""Peak memory of this process, in MB: one meter for the protocol's runs and for the benchmarks.

On CUDA: the allocator's statistics (`memory_allocated`, `max_memory_allocated`, whose peak `reset_peak` resets).
On CPU: the resident set size. Its peak (`VmHWM`) is reset through `/proc/self/clear_refs` where Linux allows it
(`resettable`); where it does not, a thread samples the RSS every 20 ms from `reset_peak` on, so a peak that comes
and goes between two reads of the meter is still seen. The RSS includes what the allocator keeps after a free:
`free_memory()` hands it back first (CUDA's cache, glibc's `malloc_trim`), so a block's growth is not hidden by memory
an earlier block freed. A benchmark that needs exact per-variant figures runs one process per variant.
"""

import contextlib
import ctypes
import re
import sys
import threading
from pathlib import Path

import torch
from accelerate.utils.memory import clear_device_cache

SAMPLE_SECONDS = 0.02


def free_memory() -> None:
    """Collect garbage and hand freed memory back: the accelerator's cache (accelerate's `clear_device_cache`), and on
    glibc the heap pages `malloc_trim` can return (freed blocks the allocator would otherwise keep in the resident
    set)."""
    clear_device_cache(garbage_collection=True)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_mb(key: str) -> float | None:
    """A `/proc/self/status` field (kB) in MB, or None off Linux."""
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def _rss_mb() -> float:
    rss = _status_mb("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
    return rss


class MemoryMeter:
    """
    `reset_peak()`, then `current_mb()` and `peak_mb()` since the reset (the benchmarks' use). As a context manager,
    the peak growth of the block over its start, in `used_mb` once the block ends, however it ends (the protocol's
    use): `with MemoryMeter() as memory: ...; memory.used_mb`.
    """

    def __init__(self, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.resettable = False
        self.used_mb: float | None = None
        self._stop: threading.Event | None = None
        self._sampled = 0.0

    def reset_peak(self) -> None:
        self._stop_sampling()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.resettable = True
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS (Linux ≥ 4.0)
            self.resettable = True
        except OSError:
            self.resettable = False
            self._sampled, self._stop = _rss_mb(), threading.Event()
            threading.Thread(target=self._sample, args=(self._stop,), name="MemoryMeter", daemon=True).start()

    def _sample(self, stop: threading.Event) -> None:
        while not stop.wait(SAMPLE_SECONDS):
            self._sampled = max(self._sampled, _rss_mb())

    def _stop_sampling(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def current_mb(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / 2**20
        return _rss_mb()

    def peak_mb(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        if not self.resettable and self._stop is not None:
            return max(self._sampled, _rss_mb())
        peak = _status_mb("VmHWM")
        if peak is None:  # not Linux: the process's lifetime peak
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        return peak

    def __enter__(self) -> "MemoryMeter":
        self.used_mb = None
        free_memory()
        self.reset_peak()
        self._base = self.current_mb()
        return self

    def __exit__(self, *exc) -> bool:
        try:
            self.used_mb = self.peak_mb() - self._base
        finally:
            self._stop_sampling()
        return False
