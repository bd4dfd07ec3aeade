"""Benchmark configurations: the standard suites of SPEC section 4, plus ``quick`` and ``host``.

A :class:`Config` is one point of a suite: batch shape, heads, head dim, MoBA chunk size C and
top-k K, and the per-sequence lengths of the packed batch. Pure Python, importable anywhere.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

__all__ = [
    "Config",
    "SUITES",
    "suite_configs",
    "parse_size",
    "parse_sizes",
    "format_size",
    "varlen_mix_lengths",
]

K_ = 1024


@dataclass(frozen=True)
class Config:
    """One benchmark point. Queries and keys have the same lengths (Sq = Sk) in every suite."""

    suite: str
    B: int
    H: int
    Hk: int
    D: int
    C: int
    K: int
    S: int  # sequence length (uniform batches) or total tokens (varlen batches)
    seqlens: tuple = field(default=())  # per-sequence lengths; () = B sequences of length S
    dtype: str = "bfloat16"
    causal: bool = True

    def lengths(self) -> list[int]:
        return list(self.seqlens) if self.seqlens else [self.S] * self.B

    @property
    def varlen(self) -> bool:
        return bool(self.seqlens)

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths())

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths())

    def label(self) -> str:
        base = f"B={self.B} H={self.H}/{self.Hk} D={self.D} C={self.C} K={self.K}"
        if self.varlen:
            return f"{base} varlen total={format_size(self.S)} max={format_size(self.max_seqlen)}"
        return f"{base} S={format_size(self.S)}"


def parse_size(text: str) -> int:
    """'8K' -> 8192, '1M' -> 1048576, '4097' -> 4097 (binary multiples, case-insensitive)."""
    t = str(text).strip().upper()
    mult = 1
    if t.endswith("K"):
        mult, t = K_, t[:-1]
    elif t.endswith("M"):
        mult, t = K_ * K_, t[:-1]
    try:
        val = int(t) * mult
    except ValueError:
        raise ValueError(f"bad size {text!r}: expected an integer, optionally with a K or M suffix") from None
    if val <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return val


def parse_sizes(text: str | None) -> list[int] | None:
    """'8K,16K 32K' -> [8192, 16384, 32768]; None or '' -> None (all sizes of the suite)."""
    if not text:
        return None
    parts = [p for p in text.replace(",", " ").split() if p]
    return [parse_size(p) for p in parts]


def format_size(n: int) -> str:
    if n % (K_ * K_) == 0:
        return f"{n // (K_ * K_)}M"
    if n % K_ == 0:
        return f"{n // K_}K"
    return str(n)


def varlen_mix_lengths(num: int = 64, total: int = 256 * K_, lo: int = 512, hi: int = 32 * K_,
                       seed: int = 0) -> list[int]:
    """Deterministic mixed sequence lengths for ``varlen-mix``: ``num`` lengths in [lo, hi]
    summing exactly to ``total``, log-uniformly spread, with ``lo`` and ``hi`` both present.

    Lengths are drawn log-uniformly from a fixed seed, then a common log-space shift (found by
    bisection, clipped to [lo, hi]) brings the sum to ``total``; the rounding remainder goes
    to the mid-sized sequences. The order is shuffled (fixed seed), as in a packed batch.
    """
    if not (num * lo <= total <= num * hi) or num < 2:
        raise ValueError("varlen_mix_lengths: total must lie in [num*lo, num*hi] and num >= 2")
    rng = random.Random(seed)
    u = sorted(rng.random() for _ in range(num - 2))
    ll, lh = math.log(lo), math.log(hi)
    base = [ll + x * (lh - ll) for x in u]

    def lengths(shift: float) -> list[int]:
        return [lo] + [int(round(min(max(math.exp(b + shift), lo), hi))) for b in base] + [hi]

    a, b = -(lh - ll), lh - ll
    for _ in range(200):
        mid = 0.5 * (a + b)
        if sum(lengths(mid)) > total:
            b = mid
        else:
            a = mid
    out = lengths(a)
    # Distribute the remainder one token at a time over the interior, middle-first.
    rem = total - sum(out)
    order = sorted(range(1, num - 1), key=lambda i: abs(i - num // 2))
    i = 0
    while rem != 0:
        j = order[i % len(order)]
        step = 1 if rem > 0 else -1
        if lo <= out[j] + step <= hi:
            out[j] += step
            rem -= step
        i += 1
    rng.shuffle(out)
    return out


def _flashmoba(sizes):
    return [Config("flashmoba", B=2, H=16, Hk=16, D=128, C=128, K=8, S=s) for s in sizes]


def _moba_large():
    big = [Config("moba-large", B=1, H=32, Hk=8, D=128, C=4096, K=12, S=s) for s in (128 * K_, 256 * K_, 512 * K_)]
    small = [Config("moba-large", B=1, H=32, Hk=8, D=128, C=512, K=3, S=s)
             for s in (8 * K_, 16 * K_, 32 * K_, 64 * K_)]
    return small + big


def _varlen_mix():
    lens = tuple(varlen_mix_lengths())
    return [Config("varlen-mix", B=len(lens), H=16, Hk=16, D=128, C=128, K=8, S=sum(lens), seqlens=lens)]


#: suite name -> list of configs (all sizes). ``flashmoba`` lists 256K and 512K too ("where
#: memory allows"): out-of-memory figures are recorded as null, never fatal.
SUITES: dict[str, list[Config]] = {
    "flashmoba": _flashmoba([8 * K_, 16 * K_, 32 * K_, 64 * K_, 128 * K_, 256 * K_, 512 * K_]),
    "moba-large": _moba_large(),
    "varlen-mix": _varlen_mix(),
    # A small fast subset for `make demo`: the flashmoba shape at 8K and 16K.
    "quick": [Config("quick", B=2, H=16, Hk=16, D=128, C=128, K=8, S=s) for s in (8 * K_, 16 * K_)],
    # Host overhead of one call (benchmarks/host.py, issue 16), at the flashmoba shape.
    "host": [Config("host", B=2, H=16, Hk=16, D=128, C=128, K=8, S=s) for s in (8 * K_, 16 * K_, 64 * K_)],
}

#: Sizes run by default (no --sizes): flashmoba stops at 128K unless asked for more, since a
#: single dense FA2 fwd+bwd at 512K takes tens of seconds.
DEFAULT_MAX_S = {"flashmoba": 128 * K_}


def suite_configs(suite: str, sizes: list[int] | None = None) -> list[Config]:
    """The configs of ``suite``, filtered to ``sizes`` (values of S) when given."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    cfgs = SUITES[suite]
    if sizes is None:
        cap = DEFAULT_MAX_S.get(suite)
        return [c for c in cfgs if cap is None or c.S <= cap]
    wanted = set(sizes)
    out = [c for c in cfgs if c.S in wanted]
    missing = wanted - {c.S for c in out}
    if missing:
        have = ", ".join(format_size(s) for s in sorted({c.S for c in cfgs}))
        raise ValueError(
            f"suite {suite!r} has no size {', '.join(format_size(s) for s in sorted(missing))}; it has {have}"
        )
    return out
