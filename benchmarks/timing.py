"""Timing and memory measurement (SPEC section 4): CUDA events, warm-up excluded, median of at
least 10 runs (fewer, noted, only when one run takes more than 2 s), L2 flushed between runs.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

__all__ = ["Timing", "Timer", "time_idle", "is_oom", "free_memory"]

SLOW_RUN_S = 2.0
MIN_REPS_SLOW = 3


@dataclass
class Timing:
    median_ms: float
    reps: int
    note: str = ""


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors (the typed one, or a RuntimeError saying so)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "cudaerrormemoryallocation" in msg)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def time_idle(fn, device: str = "cuda", reps: int = 20, warmup: int = 2, clock: str = "device") -> Timing:
    """Median of ``reps`` single calls of ``fn``, each started with the GPU idle (synchronized
    first, no L2 flush queued): unlike :class:`Timer`, host overhead that a busy GPU would hide
    counts. ``clock="device"``: CUDA events around the call (until its last GPU work ends; wall
    clock on the CPU); ``clock="host"``: ``time.perf_counter`` until the call returns (host time
    only, the GPU work being asynchronous)."""
    if reps < 1 or warmup < 0 or clock not in ("device", "host"):
        raise ValueError("time_idle: reps >= 1, warmup >= 0, clock 'device' or 'host'")
    cuda = device == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        if cuda and clock == "device":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
    return Timing(statistics.median(times), reps)


class Timer:
    """Times a callable on ``device`` ("cuda": CUDA events; "cpu": wall clock, dry runs only)."""

    def __init__(self, device: str = "cuda", reps: int = 10, warmup: int = 2, flush_bytes: int | None = None):
        if reps < 1 or warmup < 1:
            raise ValueError("reps and warmup must be >= 1")
        self.device = device
        self.reps = reps
        self.warmup = warmup
        self._flush = None
        if device == "cuda":
            if flush_bytes is None:
                l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)
                flush_bytes = max(4 * l2, 256 << 20)
            self._flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device="cuda")

    @property
    def flush_bytes(self) -> int:
        return 0 if self._flush is None else self._flush.numel() * 4

    def _flush_l2(self) -> None:
        if self._flush is not None:
            self._flush.zero_()

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _one(self, fn) -> float:
        """One run in ms (synchronized), L2 flushed before it."""
        self._flush_l2()
        if self.device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def time(self, fn) -> Timing:
        """Warm up (compiles, caches), then time ``reps`` runs and return the median."""
        last = None
        for _ in range(self.warmup):
            last = self._one(fn)
        reps, note = self.reps, ""
        if last is not None and last > SLOW_RUN_S * 1e3:
            reps = min(self.reps, MIN_REPS_SLOW)
            note = f"{reps} runs (one run takes {last / 1e3:.1f} s > {SLOW_RUN_S:.0f} s)"
        if self.device == "cuda":
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for i in range(reps):
                self._flush_l2()
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            times = [self._one(fn) for _ in range(reps)]
        return Timing(statistics.median(times), reps, note)

    def peak_memory_gb(self, fn) -> float | None:
        """Peak allocated memory (GB = 1e9 bytes) during one call of ``fn``, including every
        tensor alive at the time (the inputs), excluding the timer's L2-flush buffer."""
        if self.device != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.flush_bytes) / 1e9
