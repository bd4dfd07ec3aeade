"""Decode-step benchmark (issue 14, point 2): one (or a few) new queries per sequence against a KV
cache, MoBA through the public API against dense attention.

    python -m benchmarks.decode [--json OUT.json] [--lens 32K,64K,128K] [--batches 1,8] [--new 1,4]
                                [--moba 128:8,512:8,4096:12,dense] [--impls moba_cute,sdpa,fa4] [--reps 20]
    python -m benchmarks.decode --cpu-check    # no GPU: the calls' shapes and semantics on the CPU
    python -m benchmarks.decode --dry-run      # no GPU: the whole pipeline on tiny shapes (reference)

One step: B sequences, each with L cached tokens and n new ones (n = 1: one generated token; n > 1:
a few, as in speculative decoding); H=32 query heads, Hk=8 KV heads, D=128, bf16. As in a
transformers decode step the cache is updated before attending, so the n queries attend over
Sk = L + n keys, bottom-right aligned (query i sits at key position L + i, SPEC section 1).

* ``moba_cute.<arch>``: ``moba_cute.varlen_attention`` with backend "cute" (a fallback to the
  reference would be an error, not a silently slow figure), routing included, on the packed
  layout q (B*n, H, D), k/v (B*Sk, Hk, D); ``routing_ms`` is ``moba_cute.route`` alone. The
  ``--moba`` entry ``dense`` is a dense layer as the transformers integration runs it (one chunk
  over the whole cache, topk 1: ``moba_dense_last_layers``).
* ``sdpa``: dense ``torch.nn.functional.scaled_dot_product_attention`` under the flash backend on
  the padded layout q (B, H, n, D), k/v (B, Hk, Sk, D) contiguous (the layout of transformers' KV
  cache), ``enable_gqa=True`` (else K/V expanded to H heads outside the timed region); n = 1
  needs no mask (the query sees every key), n > 1 the lower-right causal bias.
* ``fa4``: dense FlashAttention-4, ``flash_attn.cute.flash_attn_varlen_func(causal=True)``
  (bottom-right aligned, as FlashAttention defines it) on MoBA's packed tensors, when importable.

Each is timed eagerly (CUDA events, L2 flushed before each run, median) and as the replay of a
CUDA graph captured from it, which is how generation loops run a step. ``vs_sdpa_eager`` /
``vs_sdpa_graph`` = sdpa ms / impl ms (> 1: faster than dense). Checks written to the records:
MoBA's output against the PyTorch reference with the same routing (SPEC section 3 bound), every
dense baseline against an fp32 masked softmax on a small probe before the run, graph replays
against eager calls. Without CUDA the script exits with status 2 (``--cpu-check`` and
``--dry-run`` run anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .configs import format_size, parse_size
from .results import _clean, _fmt, align_columns, git_commit, normalize_keys, results_path, write_results

__all__ = ["DECODE_KEYS", "Shape", "DecodeInputs", "make_decode_inputs", "moba_call", "moba_centroid_call",
           "route_call", "sdpa_call",
           "fa4_call", "dense_math", "flat", "cpu_check", "normalize_decode_record", "main"]

SUITE = "decode"
EXIT_NO_CUDA = 2
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

#: record keys, in this order
DECODE_KEYS = (
    "suite", "impl", "B", "H", "Hk", "D", "C", "K", "L", "Sq", "Sk", "dtype", "causal",
    "routing_ms", "eager_ms", "graph_ms", "vs_sdpa_eager", "vs_sdpa_graph",
    "check_err", "check_bound", "reps", "note",
)


@dataclass(frozen=True)
class Shape:
    """One decode step: B sequences of L cached + n new tokens."""

    B: int
    L: int
    n: int
    H: int = 32
    Hk: int = 8
    D: int = 128
    dtype: str = "bfloat16"

    @property
    def Sk(self) -> int:  # the cache after the step's own keys were appended
        return self.L + self.n

    def label(self) -> str:
        return f"B={self.B} L={format_size(self.L)} n={self.n} H={self.H}/{self.Hk} D={self.D} {self.dtype}"


@dataclass
class DecodeInputs:
    """MoBA's packed tensors and, for the dense baseline, the cache in transformers' layout."""

    shape: Shape
    q: torch.Tensor  # (B*n, H, D)
    k: torch.Tensor  # (B*Sk, Hk, D)
    v: torch.Tensor
    cu_q: torch.Tensor  # int32 (B+1,) = arange * n
    cu_k: torch.Tensor  # int32 (B+1,) = arange * Sk
    kc: Optional[torch.Tensor] = None  # (B, Hk, Sk, D) contiguous copy of k
    vc: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, shape: Shape, q, k, v, dense_cache: bool = True) -> "DecodeInputs":
        s = shape
        if q.shape != (s.B * s.n, s.H, s.D) or k.shape != (s.B * s.Sk, s.Hk, s.D) or v.shape != k.shape:
            raise ValueError(f"{s.label()}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
        ar = torch.arange(s.B + 1, dtype=torch.int32, device=q.device)
        kc = vc = None
        if dense_cache:
            kc, vc = (t.view(s.B, s.Sk, s.Hk, s.D).transpose(1, 2).contiguous() for t in (k, v))
        return cls(shape, q, k, v, ar * s.n, ar * s.Sk, kc, vc)

    def q4(self) -> torch.Tensor:
        """q as (B, H, n, D) (a view)."""
        s = self.shape
        return self.q.view(s.B, s.n, s.H, s.D).transpose(1, 2)


def make_decode_inputs(shape: Shape, device: str, seed: int = 0, dense_cache: bool = True) -> DecodeInputs:
    """Random normal inputs (never zeros)."""
    s = shape
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    dt = DTYPES[s.dtype]
    q = torch.randn(s.B * s.n, s.H, s.D, generator=g, device=device, dtype=dt)
    k = torch.randn(s.B * s.Sk, s.Hk, s.D, generator=g, device=device, dtype=dt)
    v = torch.randn(s.B * s.Sk, s.Hk, s.D, generator=g, device=device, dtype=dt)
    return DecodeInputs.build(s, q, k, v, dense_cache)


def flat(out: torch.Tensor, shape: Shape) -> torch.Tensor:
    """A dense (B, H, n, D) output in the packed (B*n, H, D) layout (packed ones unchanged)."""
    if out.dim() == 4:
        return out.transpose(1, 2).reshape(shape.B * shape.n, shape.H, shape.D)
    return out


# --------------------------------------------------------------------------------------------
# the calls (device-agnostic: --cpu-check runs the very functions the GPU run times)


def moba_call(mc, inp: DecodeInputs, chunk_size: int, topk: int, backend: str) -> Callable[[], torch.Tensor]:
    s = inp.shape
    q, k, v, cq, ck = inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k

    def call():
        return mc.varlen_attention(q, k, v, cq, ck, s.n, s.Sk, chunk_size, topk, causal=True, backend=backend)

    return call


def moba_cache_call(mc, inp: DecodeInputs, chunk_size: int, topk: int, backend: str) -> Callable[[], torch.Tensor]:
    """The MoBA call as moba_cute.integrations.transformers makes it in a decode step: the padded
    ``moba_cute.attention`` on q (B, H, n, D) and transformers' (B, Hk, Sk, D) cache seen as
    (B, n, H, D) / (B, Sk, Hk, D) by ``transpose(1, 2)`` (the decode kernels read those strides in
    place; the general path copies them), so the figure includes what the integration pays per
    layer. Returns the packed (B*n, H, D) output."""
    s = inp.shape
    if inp.kc is None:
        raise ValueError("moba_cache_call needs the dense cache (make_decode_inputs(dense_cache=True))")
    q4, kc, vc = inp.q4().transpose(1, 2), inp.kc.transpose(1, 2), inp.vc.transpose(1, 2)

    def call():
        out = mc.attention(q4, kc, vc, chunk_size, topk, causal=True, backend=backend)
        return out.reshape(s.B * s.n, s.H, s.D)

    return call


def moba_centroid_call(mc, inp: DecodeInputs, chunk_size: int, topk: int, backend: str) -> Callable[[], torch.Tensor]:
    """:func:`moba_call` with the full chunks' centroids cached (``moba_cute.key_centroids``, built
    here, outside the timed call: a decode loop extends it once per ``chunk_size`` steps), so the
    step's routing reads them instead of K."""
    s = inp.shape
    q, k, v, cq, ck = inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k
    cent = mc.key_centroids(k, chunk_size, ck, s.Sk, backend=backend)

    def call():
        return mc.varlen_attention(q, k, v, cq, ck, s.n, s.Sk, chunk_size, topk, causal=True, backend=backend,
                                   key_centroids=cent)

    return call


def route_call(mc, inp: DecodeInputs, chunk_size: int, topk: int, backend: str) -> Callable:
    s = inp.shape
    q, k, cq, ck = inp.q, inp.k, inp.cu_q, inp.cu_k

    def call():
        return mc.route(q, k, cq, ck, s.n, s.Sk, chunk_size, topk, True, backend=backend).selection

    return call


def sdpa_call(inp: DecodeInputs, gqa: bool = True) -> Callable[[], torch.Tensor]:
    """Dense SDPA on (B, H, n, D) x (B, Hk, Sk, D). ``gqa``: ``enable_gqa=True``; else K/V are
    expanded to H heads here, once (outside whatever times the returned call)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    s = inp.shape
    if inp.kc is None:
        raise ValueError("sdpa_call needs the dense cache (make_decode_inputs(dense_cache=True))")
    q4, kc, vc = inp.q4(), inp.kc, inp.vc
    kwargs = {}
    if s.H != s.Hk:
        if gqa:
            kwargs["enable_gqa"] = True
        else:
            kc, vc = (t.repeat_interleave(s.H // s.Hk, dim=1) for t in (kc, vc))
    # SDPA's is_causal is top-left aligned: wrong for Sq != Sk. One query at the end of its
    # sequence sees every key (no mask: the plain flash decode path); several need the
    # lower-right bias, which SDPA dispatches to the flash kernel's own (bottom-right) causal mode.
    mask = None if s.n == 1 else causal_lower_right(s.n, s.Sk)
    # the flash backend only on CUDA: the CPU check takes whatever SDPA picks there
    ctx = (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])) if q4.is_cuda else contextlib.nullcontext

    def call():
        with ctx():
            return F.scaled_dot_product_attention(q4, kc, vc, attn_mask=mask, **kwargs)

    return call


def fa4_call(inp: DecodeInputs) -> Callable[[], torch.Tensor]:
    """Dense FA4 varlen on the packed tensors (raises benchmarks.common.Unsupported if absent)."""
    from .baselines import _first, _load_fa4
    from .common import Unsupported

    fns = _load_fa4()
    if fns is None:
        from .baselines import fa4_available

        raise Unsupported(fa4_available()[1])
    varlen_func = fns[1]
    warnings.filterwarnings("ignore", category=UserWarning, module=r"cutlass(\.|$)")
    s = inp.shape
    q, k, v, cq, ck = inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k

    def call():
        return _first(varlen_func(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=s.n, max_seqlen_k=s.Sk,
                                  causal=True))

    return call


def dense_math(inp: DecodeInputs) -> torch.Tensor:
    """fp32 dense causal attention, bottom-right aligned, written out (materialized mask): the
    truth the dense baselines are probed against. Small shapes only."""
    s = inp.shape
    g = s.H // s.Hk
    q = inp.q.float().view(s.B, s.n, s.H, s.D).transpose(1, 2)
    k, v = (t.float().view(s.B, s.Sk, s.Hk, s.D).transpose(1, 2).repeat_interleave(g, dim=1) for t in (inp.k, inp.v))
    sc = (q @ k.transpose(-1, -2)) * s.D ** -0.5
    pos = torch.arange(s.n, device=q.device) + s.L
    sc = sc.masked_fill(torch.arange(s.Sk, device=q.device)[None, :] > pos[:, None], -math.inf)
    return flat(sc.softmax(-1) @ v, s)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------------------------
# CPU check


CPU_SHAPES = ((1, 40, 1), (3, 77, 4), (2, 64, 1), (2, 61, 4))  # (B, L, n): chunk-aligned and not
CPU_CHUNK = 8


def cpu_check(tol: float = 2e-5) -> list[tuple[str, float, bool]]:
    """The decode calls on the CPU (fp32, GQA 2, reference backend), on tiny shapes: ``(what,
    max error, ok)`` for (1) the dense SDPA call (with and without enable_gqa) against the
    written-out masked softmax, (2) the MoBA call with topk covering every chunk, and a dense
    layer as the transformers integration runs it, against the same (so they compute the same
    step), (3) the MoBA call from transformers' cache layout against the packed one, (4) the
    sparse MoBA call (topk 1, 2, 3) against the last n rows of a MoBA forward over the whole
    sequence (the decode step is the full forward's tail: bottom-right alignment)."""
    import moba_cute as mc

    out = []
    H, Hk, D, C = 4, 2, 16, CPU_CHUNK
    for i, (B, L, n) in enumerate(CPU_SHAPES):
        shape = Shape(B, L, n, H, Hk, D, "float32")
        Sk = shape.Sk
        g = torch.Generator().manual_seed(100 + i)
        q_full = torch.randn(B * Sk, H, D, generator=g)
        k = torch.randn(B * Sk, Hk, D, generator=g)
        v = torch.randn(B * Sk, Hk, D, generator=g)
        q = q_full.view(B, Sk, H, D)[:, L:].reshape(B * n, H, D)
        inp = DecodeInputs.build(shape, q, k, v)
        truth = dense_math(inp)
        tag = f"B={B} L={L} n={n}"

        def add(what, got, want):
            err = _max_diff(got, want)
            out.append((f"{tag}: {what}", err, err <= tol))

        add("sdpa vs masked softmax", flat(sdpa_call(inp)(), shape), truth)
        add("sdpa (K/V expanded) vs masked softmax", flat(sdpa_call(inp, gqa=False)(), shape), truth)
        every = -(-Sk // C)
        add(f"moba C={C} K={every} (every chunk) vs masked softmax", moba_call(mc, inp, C, every, "reference")(),
            truth)
        dc = dense_layer_chunk(Sk)
        add(f"moba C={dc} K=1 (dense layer) vs masked softmax", moba_call(mc, inp, dc, 1, "reference")(), truth)
        add(f"moba C={C} K=2 from the (B, Hk, Sk, D) cache vs from the packed tensors",
            moba_cache_call(mc, inp, C, 2, "reference")(), moba_call(mc, inp, C, 2, "reference")())
        for K in (1, 2, 3):
            full = mc.varlen_attention(q_full, k, v, inp.cu_k, inp.cu_k, Sk, Sk, C, K, causal=True,
                                       backend="reference")
            tail = full.view(B, Sk, H, D)[:, L:].reshape(B * n, H, D)
            add(f"moba C={C} K={K} vs the full forward's last {n} rows", moba_call(mc, inp, C, K, "reference")(),
                tail)
    return out


# --------------------------------------------------------------------------------------------
# GPU run


def normalize_decode_record(rec: dict) -> dict:
    """DECODE_KEYS in order (missing ones null), NaN/inf null, note a string; unknown keys are an error."""
    return normalize_keys(rec, DECODE_KEYS, kind="decode")


def _record(shape: Shape, impl: str, C=None, K=None, **figs) -> dict:
    s = shape
    return normalize_decode_record({"suite": SUITE, "impl": impl, "B": s.B, "H": s.H, "Hk": s.Hk, "D": s.D, "C": C,
                                    "K": K, "L": s.L, "Sq": s.n, "Sk": s.Sk, "dtype": s.dtype, "causal": True,
                                    **figs})


def _short(exc: BaseException, n: int = 200) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:n]}"


def _free() -> None:
    from .timing import free_memory

    try:
        free_memory()
    except Exception:  # noqa: BLE001 - after a failed capture the synchronize may raise again
        pass


def _fail(what: str, e: BaseException, notes: list) -> None:
    from .timing import is_oom

    notes.append(f"{what}: {'out of memory' if is_oom(e) else _short(e)}")
    if os.environ.get("MOBA_BENCH_DEBUG"):
        import traceback

        traceback.print_exc()
    _free()


def _eager_ms(timer, fn, what: str, notes: list):
    try:
        t = timer.time(fn)
        if t.note:
            notes.append(f"{what}: {t.note}")
        return t.median_ms, t.reps
    except Exception as e:  # noqa: BLE001 - recorded, never fatal
        _fail(what, e, notes)
        return None, None


def _graph_ms(timer, fn, what: str, notes: list):
    """Median ms of the replay of a CUDA graph captured from ``fn``; the replay must compute what
    an eager call computes (noted otherwise)."""
    from .host import capture_graph

    g = static = None
    try:
        g, static = capture_graph(fn)
        g.replay()
        torch.cuda.synchronize()
        diff = _max_diff(static, fn())
        if diff != 0:
            notes.append(f"{what}: replay differs from the eager call by up to {diff:.3g}")
        return timer.time(g.replay).median_ms
    except Exception as e:  # noqa: BLE001
        _fail(what, e, notes)
        return None
    finally:
        g = static = None
        _free()  # the graph's private memory pool


def probe_dense(make_call, shape: Shape, device: str, tol: float) -> tuple[bool, str]:
    """Run a dense baseline's call on a small problem of the run's heads against
    :func:`dense_math`: (ok, what happened)."""
    small = Shape(2, 300, shape.n, shape.H, shape.Hk, shape.D, shape.dtype)
    try:
        inp = make_decode_inputs(small, device, seed=7)
        err = _max_diff(flat(make_call(inp)(), small), dense_math(inp))
    except Exception as e:  # noqa: BLE001
        return False, _short(e)
    return err <= tol, f"max error {err:.3g} against an fp32 masked softmax at {small.label()} (bound {tol:g})"


def check_moba(mc, inp: DecodeInputs, out: torch.Tensor, C: int, K: int, backend: str) -> tuple[float, float]:
    """(error of ``out`` against the fp32 reference with the routing the kernels pick, SPEC bound =
    2 x the error of the reference computed in the input dtype + 1e-5)."""
    from moba_cute import reference

    s = inp.shape
    r = mc.route(inp.q, inp.k, inp.cu_q, inp.cu_k, s.n, s.Sk, C, K, True, backend=backend)
    o32, _ = reference.attention(inp.q, inp.k, inp.v, r)
    olp, _ = reference.attention(inp.q, inp.k, inp.v, r, compute_dtype=inp.q.dtype)
    return _max_diff(out, o32), 2 * _max_diff(olp, o32) + 1e-5


DENSE = (0, 1)  # --moba "dense": chunk size chosen per shape by dense_layer_chunk
CACHE_SUFFIX = ".hf_cache"  # impl suffix of the MoBA call made from transformers' cache layout
CENT_SUFFIX = ".centroid_cache"  # impl suffix of the MoBA call with cached chunk centroids (--centroid-cache)


def dense_layer_chunk(Sk: int) -> int:
    """The chunk size of a dense layer in moba_cute.integrations.transformers (``_attend``): one
    chunk over the longest key sequence, rounded up to the kernels' multiple of 16."""
    return max(16, -(-max(Sk, 1) // 16) * 16)


def parse_moba(text: str) -> list[tuple[int, int]]:
    """'128:8,512:8,dense' -> [(128, 8), (512, 8), DENSE] (chunk_size:topk pairs)."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if part.lower() == "dense":
            out.append(DENSE)
            continue
        try:
            c, k = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"bad --moba entry {part!r}: expected CHUNK:TOPK, e.g. 128:8") from None
        if c < 1 or k < 1:
            raise ValueError(f"bad --moba entry {part!r}: chunk size and topk must be >= 1")
        out.append((c, k))
    if not out:
        raise ValueError("--moba lists no CHUNK:TOPK pair")
    return out


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [parse_size(p) for p in text.replace(",", " ").split() if p]
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    if not vals:
        raise ValueError(f"{what}: empty list")
    return vals


IMPLS = ("moba_cute", "sdpa", "fa4")


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="output file (default benchmarks/results/decode_<device>_<date>.json)")
    p.add_argument("--lens", default="32K,64K,128K", help="cached tokens L per sequence (default 32K,64K,128K)")
    p.add_argument("--batches", default="1,8", help="batch sizes B (default 1,8)")
    p.add_argument("--new", default="1,4", help="new queries n per sequence and step (default 1,4)")
    p.add_argument("--moba", default="128:8,512:8,4096:12,dense",
                   help="MoBA CHUNK:TOPK pairs, or 'dense' (the integration's dense layer: one chunk, topk 1); "
                        "default 128:8,512:8,4096:12,dense (4096:12 is moba-large's)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--reps", type=int, default=20, help="timed runs per figure (median; default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-graph", action="store_true", help="do not time CUDA-graph replays")
    p.add_argument("--no-check", action="store_true", help="skip the per-config check against the reference")
    p.add_argument("--centroid-cache", action="store_true",
                   help="also time each selective MoBA config with its chunk centroids cached (moba_cute.key_centroids)")
    p.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds (default 480); once spent, the remaining points are recorded as skipped")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only: tiny shapes through the reference, no graphs (checks the pipeline and the files)")
    p.add_argument("--cpu-check", action="store_true",
                   help="CPU only: check the decode calls on tiny shapes against the reference, then exit")
    args = p.parse_args(argv)
    try:
        args.lens = _ints(args.lens, "--lens")
        args.batches = _ints(args.batches, "--batches")
        args.new = _ints(args.new, "--new")
        args.moba = parse_moba(args.moba)
    except ValueError as e:
        p.error(str(e))
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in args.impls if s not in IMPLS]
    if bad:
        p.error(f"unknown impl(s) {bad}; choose from {IMPLS}")
    if args.reps < 1 or args.warmup < 1:
        p.error("--reps and --warmup must be >= 1")
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def _stamp(t0: float) -> str:
    return f"[{time.monotonic() - t0:6.1f} s]"


def format_decode_table(records: list[dict], device: str = "") -> str:
    cols = ["B", "L", "n", "impl", "C:K", "route", "eager", "graph", "xSDPA e/g", "check", "note"]
    rows, notes = [], {}  # note -> its number (the same note printed once)
    for r in records:
        tag = ""
        if r.get("note"):
            tag = f"[{notes.setdefault(r['note'], len(notes) + 1)}]"
        ck = "-" if r["C"] is None else f"{r['C']}:{r['K']}"
        chk = "-"
        if r.get("check_err") is not None:
            chk = f"{r['check_err']:.2g}{'' if r['check_err'] <= r['check_bound'] else ' FAIL'}"
        rows.append([str(r["B"]), format_size(r["L"]), str(r["Sq"]), r["impl"], ck, _fmt(r["routing_ms"], 3),
                     _fmt(r["eager_ms"], 3), _fmt(r["graph_ms"], 3),
                     f"{_fmt(r['vs_sdpa_eager'])}/{_fmt(r['vs_sdpa_graph'])}", chk, tag])
    lines = []
    if device:
        lines.append(f"device: {device}   (ms, median; xSDPA = sdpa ms / impl ms, eager/graph; check = max error "
                     "against the reference, FAIL above the SPEC bound)")
    lines += align_columns(cols, rows)
    lines += [f"[{i}] {n}" for n, i in notes.items()]
    return "\n".join(lines)


def _run_cpu_check() -> int:
    res = cpu_check()
    for what, err, ok in res:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}: max error {err:.3g}")
    bad = sum(not ok for _, _, ok in res)
    print(f"cpu check: {len(res) - bad} of {len(res)} passed")
    return 0 if bad == 0 else 1


@dataclass
class Env:
    """Where a run happens: the GPU (CuTe kernels, CUDA graphs) or a CPU dry run (reference)."""

    device: str
    backend: str  # moba_cute backend of the timed MoBA calls
    moba_impl: Optional[str]  # record name of the MoBA calls (None: no kernel path, not run)
    probe_tol: float


def _dry_run_args(args) -> None:
    """Tiny CPU stand-ins for the run's shapes (the pipeline and the files, not performance)."""
    args.lens, args.batches, args.new = [200, 333], [2], [1, 3]
    args.heads, args.kv_heads, args.head_dim, args.dtype = 4, 2, 16, "float32"
    args.moba = [(16, 3), DENSE]
    args.impls = [i for i in args.impls if i != "fa4"]
    args.no_graph = True
    args.reps, args.warmup = min(args.reps, 3), 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(argv)
    if args.cpu_check:
        return _run_cpu_check()
    if args.dry_run:
        _dry_run_args(args)
    elif not torch.cuda.is_available():
        print("error: no CUDA device is available: the decode benchmark needs an NVIDIA GPU. "
              "--cpu-check checks the calls on the CPU; --dry-run runs the pipeline there.", file=sys.stderr)
        return EXIT_NO_CUDA

    from .moba import cute_impl_name, import_moba, kernel_paths
    from .run import _versions
    from .timing import Timer

    t0 = time.monotonic()
    mc = import_moba()
    meta = {"device": None, **_versions(), "commit": git_commit(), "suite": SUITE,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.decode " + " ".join(argv),
            "step": "Sq = n new queries per sequence against Sk = L + n keys (cache updated first), "
                    "bottom-right aligned; MoBA routing included"}
    if args.dry_run:
        name = "cpu-dry-run"
        env = Env("cpu", "reference", "reference", 1e-5)
        meta.update(dry_run=True, kernel_paths=None,
                    timing={"reps": args.reps, "warmup": args.warmup, "statistic": "median",
                            "method": "wall clock (CPU dry run: not a performance figure)"})
        print("dry run on the CPU: tiny shapes, MoBA through the reference, no CUDA graphs; timings are wall "
              "clock and say nothing about GPU performance", flush=True)
    else:
        from .baselines import fa4_version

        paths = kernel_paths()
        name = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        # bf16/fp16 probe outputs are averages over ~300 values: their rounding stays far below
        env = Env("cuda", "cute", cute_impl_name(paths) if paths.get("route") and paths.get("attention") else None,
                  1e-2)
        meta.update(kernel_paths=paths, flash_attn_4=fa4_version(),
                    hardware={"sm": f"sm_{props.major}{props.minor}", "sms": props.multi_processor_count,
                              "l2_bytes": getattr(props, "L2_cache_size", None), "mem_bytes": props.total_memory},
                    timing={"reps": args.reps, "warmup": args.warmup, "statistic": "median",
                            "method": "CUDA events, L2 flushed before each run; graph_ms: replay of a CUDA graph "
                                      "captured from the same call"})
    meta["device"] = name
    path = args.json or results_path(os.path.join("benchmarks", "results"), SUITE, name)
    timer = Timer(env.device, reps=args.reps, warmup=args.warmup)
    H, Hk, D, dt = args.heads, args.kv_heads, args.head_dim, args.dtype

    # probe the dense baselines once per n (the mask differs): GQA mode, semantics
    sdpa_gqa: dict = {}
    fa4_ok: dict = {}
    probes = {}
    for n in args.new:
        shape = Shape(1, 300, n, H, Hk, D, dt)
        if "sdpa" in args.impls:
            ok, msg = probe_dense(lambda i: sdpa_call(i, gqa=True), shape, env.device, env.probe_tol)
            sdpa_gqa[n] = True if ok else None
            probes[f"sdpa n={n} enable_gqa"] = msg
            if not ok and H != Hk:
                ok, msg = probe_dense(lambda i: sdpa_call(i, gqa=False), shape, env.device, env.probe_tol)
                sdpa_gqa[n] = False if ok else None
                probes[f"sdpa n={n} expanded K/V"] = msg
        if "fa4" in args.impls:
            ok, msg = probe_dense(fa4_call, shape, env.device, env.probe_tol)
            fa4_ok[n] = ok
            probes[f"fa4 n={n}"] = msg
    meta["probes"] = probes
    for k_, v_ in probes.items():
        print(f"probe {k_}: {v_}", flush=True)
    if "moba_cute" in args.impls and env.moba_impl is None:
        print(f"moba_cute: no CuTe kernel path on this device (kernel_paths() = {meta['kernel_paths']}): "
              "not recorded", flush=True)

    records: list[dict] = []

    def save():
        write_results(path, meta, records, normalize=normalize_decode_record)

    def budget_left() -> bool:
        return time.monotonic() - t0 < args.time_budget

    print(f"decode on {name}: B {args.batches}, L {[format_size(x) for x in args.lens]}, n {args.new}, "
          f"MoBA {args.moba}, impls {args.impls}", flush=True)
    try:
        with torch.no_grad():
            for B in args.batches:
                for L in args.lens:
                    for n in args.new:
                        shape = Shape(B, L, n, H, Hk, D, dt)
                        print(f"\n{_stamp(t0)} {shape.label()} (Sk={shape.Sk})", flush=True)
                        records += _run_shape(args, env, shape, mc, sdpa_gqa.get(n), fa4_ok.get(n, False), probes,
                                              timer, budget_left, t0)
                        save()
    except KeyboardInterrupt:
        print("interrupted: writing what was measured", file=sys.stderr)
    save()
    print()
    print(format_decode_table(records, name))
    print(f"\nresults: {path}")
    print(f"done in {time.monotonic() - t0:.0f} s")
    return 0


def _run_shape(args, env: Env, shape: Shape, mc, sdpa_gqa, fa4_ok, probes, timer, budget_left, t0) -> list[dict]:
    """The records of one (B, L, n): sdpa, every MoBA config, fa4; ratios against sdpa."""
    from .timing import is_oom

    out: list[dict] = []
    skipped = f"skipped: time budget of {args.time_budget:.0f} s spent"
    want_sdpa = "sdpa" in args.impls
    try:
        inp = make_decode_inputs(shape, env.device, dense_cache=want_sdpa)
    except Exception as e:  # noqa: BLE001
        _free()
        msg = f"inputs: {'out of memory' if is_oom(e) else _short(e)}"
        return [_record(shape, i, note=msg) for i in args.impls]

    def timed(impl, fn, C=None, K=None, route_fn=None, check=None, notes=None):
        notes = list(notes or [])
        if not budget_left():
            return _record(shape, impl, C, K, note=skipped)
        figs = {}
        reps = []
        if route_fn is not None:
            figs["routing_ms"], r = _eager_ms(timer, route_fn, "routing", notes)
            reps.append(r)
        figs["eager_ms"], r = _eager_ms(timer, fn, "eager", notes)
        reps.append(r)
        if figs["eager_ms"] is not None and not args.no_graph:
            figs["graph_ms"] = _graph_ms(timer, fn, "graph", notes)
        if check is not None and figs["eager_ms"] is not None:
            try:
                figs["check_err"], figs["check_bound"] = check()
                if figs["check_err"] > figs["check_bound"]:
                    notes.append(f"CHECK FAILED: error {figs['check_err']:.3g} > bound {figs['check_bound']:.3g}")
            except Exception as e:  # noqa: BLE001
                _fail("check", e, notes)
        reps = [x for x in reps if x]
        rec = _record(shape, impl, C, K, **figs, reps=min(reps) if reps else None, note="; ".join(notes))
        print(f"  {_stamp(t0)} {impl:<15} {'' if C is None else f'C={C} K={K}':<12} "
              f"route={_fmt(rec['routing_ms'], 3)} eager={_fmt(rec['eager_ms'], 3)} graph={_fmt(rec['graph_ms'], 3)}"
              + (f"  note: {rec['note']}" if rec["note"] else ""), flush=True)
        return rec

    try:
        if want_sdpa:
            if sdpa_gqa is None:
                out.append(_record(shape, "sdpa", note="probe failed: " + "; ".join(
                    v for k, v in probes.items() if k.startswith(f"sdpa n={shape.n}"))))
            else:
                notes = [] if sdpa_gqa else ["K/V expanded to H heads outside the timed region (no enable_gqa)"]
                try:
                    fn = sdpa_call(inp, gqa=sdpa_gqa)
                except Exception as e:  # noqa: BLE001
                    _fail("sdpa", e, notes)
                    out.append(_record(shape, "sdpa", note="; ".join(notes)))
                else:
                    out.append(timed("sdpa", fn, notes=notes))
                    del fn
                    _free()
        if "moba_cute" in args.impls and env.moba_impl is not None:
            for C, K in args.moba:
                notes = []
                if (C, K) == DENSE:
                    C = dense_layer_chunk(shape.Sk)
                    notes.append("a dense layer as the transformers integration runs it (one chunk, topk 1)")
                fn = moba_call(mc, inp, C, K, env.backend)
                check = None if args.no_check else (
                    lambda fn=fn, C=C, K=K: check_moba(mc, inp, fn(), C, K, env.backend))
                out.append(timed(env.moba_impl, fn, C, K, route_fn=route_call(mc, inp, C, K, env.backend),
                                 check=check, notes=notes))
                _free()
                if getattr(args, "centroid_cache", False) and K < -(-shape.Sk // C):
                    fc = moba_centroid_call(mc, inp, C, K, env.backend)
                    same = (lambda fc=fc, fn=fn: (_max_diff(fc(), fn()), 0.0))
                    out.append(timed(env.moba_impl + CENT_SUFFIX, fc, C, K, check=same,
                                     notes=["the full chunks' centroids cached (built outside the timed call); "
                                            "check = difference from the uncached call"]))
                    del fc
                    _free()
                if want_sdpa and (C, K) == args.moba[0]:
                    # once per shape: the same call from transformers' cache layout, as the
                    # integration makes it (the padded API on transposed views)
                    same = (lambda C=C, K=K: (_max_diff(moba_cache_call(mc, inp, C, K, env.backend)(),
                                                        moba_call(mc, inp, C, K, env.backend)()), 0.0))
                    out.append(timed(env.moba_impl + CACHE_SUFFIX, moba_cache_call(mc, inp, C, K, env.backend), C,
                                     K, check=same, notes=["K/V from transformers' (B, Hk, Sk, D) cache through the "
                                                           "padded API, as the integration calls it; check = "
                                                           "difference from the packed call"]))
                    _free()
        if "fa4" in args.impls:
            if not fa4_ok:
                out.append(_record(shape, "fa4", note="probe failed: " + probes.get(f"fa4 n={shape.n}", "not run")))
            else:
                out.append(timed("fa4", fa4_call(inp),
                                 notes=["num_splits=1 (FA4's default; this FA4 refuses split-KV on sm90)"]))
    finally:
        del inp
        _free()
    base = next((r for r in out if r["impl"] == "sdpa"), None)
    for r in out:
        for kind in ("eager", "graph"):
            b, x = (base or {}).get(f"{kind}_ms"), r.get(f"{kind}_ms")
            r[f"vs_sdpa_{kind}"] = _clean(b / x) if b and x else None
    return out


if __name__ == "__main__":
    sys.exit(main())
