"""Shared inputs of one benchmark config and the callables each implementation exposes."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["Inputs", "make_inputs", "Runner", "Unsupported", "grad_fn", "environment", "routed_batch"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@contextlib.contextmanager
def environment(env: dict, names=()):
    """``env`` in force within the block and every other name of ``names`` unset; all of them
    as they were after."""
    saved = {n: os.environ.get(n) for n in set(names) | set(env)}
    try:
        for n in names:
            os.environ.pop(n, None)
        os.environ.update(env)
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def routed_batch(B: int, S: int, H: int, Hk: int, D: int, C: int, K: int, device: str = "cuda", seed: int = 0):
    """(q, k, v, cu_seqlens, routing) of ``B`` sequences of ``S`` tokens, bf16 random normal,
    causal CuTe routing with chunk ``C`` and top-``K``: the one-process A/B tools' inputs."""
    from moba_cute import route

    torch.manual_seed(seed)
    q = torch.randn(B * S, H, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(B * S, Hk, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(B * S, Hk, D, device=device, dtype=torch.bfloat16)
    cu = torch.arange(B + 1, device=device, dtype=torch.int32) * S
    return q, k, v, cu, route(q, k, cu, cu, S, S, C, K, True)


class Unsupported(Exception):
    """An implementation cannot run this config (recorded as null figures with the message)."""


@dataclass
class Inputs:
    """Packed (varlen) inputs shared by every implementation of one config.

    q (total, H, D), k/v (total, Hk, D) are leaf tensors with requires_grad; dout is the
    upstream gradient of the output (total, H, D). All random normal (never zeros).
    """

    cfg: object
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 (B+1,), the same for queries and keys (Sq = Sk)
    max_seqlen: int

    @property
    def device(self) -> torch.device:
        return self.q.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v, self.dout))


def make_inputs(cfg, device: str = "cuda", seed: int = 0) -> Inputs:
    dtype = DTYPES[cfg.dtype]
    lens = cfg.lengths()
    total = sum(lens)
    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def rnd(*shape, grad=True):
        t = torch.randn(*shape, generator=g, device=device, dtype=dtype)
        return t.requires_grad_(grad)

    q = rnd(total, cfg.H, cfg.D)
    k = rnd(total, cfg.Hk, cfg.D)
    v = rnd(total, cfg.Hk, cfg.D)
    dout = rnd(total, cfg.H, cfg.D, grad=False)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0)
    return Inputs(cfg, q, k, v, dout, cu.to(device=device, dtype=torch.int32), max(lens))


def grad_fn(fwd: Callable[[], torch.Tensor], leaves, dout_of: Callable[[torch.Tensor], torch.Tensor]):
    """A forward+backward callable: run ``fwd`` and backpropagate ``dout_of(out)`` to ``leaves``
    (torch.autograd.grad, so no .grad accumulates between runs)."""

    def run():
        out = fwd()
        return torch.autograd.grad(out, leaves, dout_of(out))

    return run


def no_grad_fn(fn: Callable[[], torch.Tensor]):
    """``fn`` under ``torch.no_grad()`` (an inference call: nothing kept for a backward)."""

    def run():
        with torch.no_grad():
            return fn()

    return run


@dataclass
class Runner:
    """What one implementation exposes for a config.

    ``route``: the routing alone (None for dense baselines); ``fwd``: forward, routing
    included; ``fwdbwd``: forward + backward (None if unsupported, say why in ``notes``).
    ``parts``: extra separately timed callables, recorded under the same key (e.g. flex_moba's
    ``mask_ms``, ``attn_fwd_ms``). ``combine``: optional function turning the timed parts into
    the record's routing/fwd/fwdbwd figures when those are sums of parts.
    """

    impl: str
    fwd: Optional[Callable] = None
    fwdbwd: Optional[Callable] = None
    route: Optional[Callable] = None
    parts: dict = field(default_factory=dict)
    combine: Optional[Callable[[dict], dict]] = None
    notes: list = field(default_factory=list)
    peak: Optional[Callable] = None  # what peak memory is measured on (default: fwdbwd or fwd)
    cleanup: Optional[Callable[[], None]] = None
