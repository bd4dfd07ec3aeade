"""Public entry points: input validation, backend dispatch and autograd.

Every call validates its inputs before any work is done; a bad input raises TypeError or
ValueError whose message names the argument and the rule. Then it picks a backend:

* ``"reference"``: the pure PyTorch implementation (:mod:`moba_cute.reference`), any device.
* ``"cute"``: the CuTe DSL kernels; raises :class:`UnsupportedError` naming what is unsupported.
* ``"auto"`` (default): the kernels for CUDA tensors when they support the configuration,
  otherwise the reference, with a one-time warning that names what is unsupported. CPU
  tensors always use the reference, silently.

cu_seqlens *values* (start at 0, non-decreasing, end at the total, max_seqlen large enough)
are checked whenever the tensors live on the CPU. For CUDA tensors checking values would
synchronize the host, so it is done only in strict mode (:func:`set_strict_checks` or the
environment variable ``MOBA_CUTE_STRICT_CHECKS=1``); the kernels clamp every index so bad
values can never fault, but they do give meaningless results.

Sizes the CuTe kernels cannot index with 32-bit integers (``total_q * H * topk``,
``total_k * Hk`` and the other quantities of :func:`kernel_size_limits`) are refused with a
ValueError before the first kernel of the call is launched. docs/reliability.md lists what
every kind of bad input gets.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings

import torch

from . import reference
from .routing import Routing

__all__ = [
    "varlen_attention",
    "attention",
    "route",
    "attention_with_routing",
    "key_centroids",
    "kernel_paths",
    "set_strict_checks",
    "set_decode_path",
    "UnsupportedError",
]

BACKENDS = ("auto", "cute", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

INT32_MAX = 2**31 - 1

_strict = os.environ.get("MOBA_CUTE_STRICT_CHECKS", "0") not in ("", "0", "false", "False")
_decode = os.environ.get("MOBA_CUTE_DECODE", "1") not in ("", "0", "false", "False")
_warned: set[str] = set()


class UnsupportedError(RuntimeError):
    """Raised with ``backend="cute"`` when no kernel supports the requested configuration."""


def set_strict_checks(enabled: bool) -> None:
    """Check cu_seqlens values on CUDA too (one host synchronization per call)."""
    global _strict
    _strict = bool(enabled)


def set_decode_path(enabled: bool) -> None:
    """Use the decode-step kernels for calls with few queries per sequence (default on; the
    environment variable ``MOBA_CUTE_DECODE=0`` turns it off). Off, such calls run the general
    routing + attention kernels: same results up to rounding (tests compare both)."""
    global _decode
    _decode = bool(enabled)


# --------------------------------------------------------------------------------------------
# validation


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got a {t.dim()}-D tensor of shape {tuple(t.shape)}")


def _check_qkv(q, k, v, layout: str) -> None:
    if layout == "varlen":
        docs = ("(total_q, num_heads, head_dim)", "(total_k, num_kv_heads, head_dim)")
        nd = 3
    else:
        docs = ("(batch, seqlen_q, num_heads, head_dim)", "(batch, seqlen_k, num_kv_heads, head_dim)")
        nd = 4
    _check_tensor("q", q, nd, docs[0])
    _check_tensor("k", k, nd, docs[1])
    if v is not None:
        _check_tensor("v", v, nd, docs[1])
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the same dtype as q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the same device as q ({q.device}), got {t.device}")
    for name, t in named:
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got stride {t.stride(-1)}")
        if t.shape[-1] < 1 or t.shape[-2] < 1:
            raise ValueError(f"{name} must have at least one head and head_dim >= 1, got shape {tuple(t.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the same head_dim as q ({q.shape[-1]}), got {k.shape[-1]}")
    if layout == "padded" and k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have the same batch size as q ({q.shape[0]}), got {k.shape[0]}")
    h, hk = q.shape[-2], k.shape[-2]
    if h % hk != 0:
        raise ValueError(f"the number of query heads ({h}) must be a multiple of the number of KV heads of k ({hk})")


def _check_cu(name: str, cu, device, owner: str) -> None:
    """One ``cu_seqlens`` tensor's type, dtype, shape and device (``owner``: the tensor whose
    device it must share, for the message)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of batch+1 >= 2 offsets, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the same device as {owner} ({device}), got {cu.device}")


def _check_cu_seqlens(cu_q, cu_k, device, prefix="") -> None:
    for name, cu in ((prefix + "cu_seqlens_q", cu_q), (prefix + "cu_seqlens_k", cu_k)):
        _check_cu(name, cu, device, "q")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(
            f"{prefix}cu_seqlens_q and {prefix}cu_seqlens_k must have the same length (batch+1), got {cu_q.numel()} "
            f"and {cu_k.numel()}"
        )


def _check_cu_values(name: str, cu: torch.Tensor, total: int, max_name: str, max_seqlen: int) -> None:
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if any(n < 0 for n in lens):
        raise ValueError(f"{name} must be non-decreasing, got {vals if len(vals) <= 16 else '...'}")
    if vals[-1] != total:
        raise ValueError(f"{name} must end at the total number of tokens ({total}), got {vals[-1]}")
    longest = max(lens)
    if max_seqlen < longest:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in {name} ({longest})")


def _check_scalars(chunk_size, topk, causal, softmax_scale, backend, **flags) -> None:
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not _is_int(topk) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be None or a real number, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale) or softmax_scale <= 0:
            raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, val in flags.items():
        if not isinstance(val, bool):
            raise TypeError(f"{name} must be a bool, got {type(val).__name__}")


def _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k) -> None:
    _check_qkv(q, k, v, "varlen")
    _check_cu_seqlens(cu_q, cu_k, q.device)
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if not _is_int(m) or m < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {m!r}")
    if q.device.type == "cpu" or _strict:
        _check_cu_values("cu_seqlens_q", cu_q, q.shape[0], "max_seqlen_q", max_q)
        _check_cu_values("cu_seqlens_k", cu_k, k.shape[0], "max_seqlen_k", max_k)


def _check_centroids(cent, name, batch, num_kv_heads, head_dim, max_k, chunk_size, device) -> None:
    """A chunk-centroid cache (see :func:`key_centroids`): fp32 ``(batch, n, Hk, D)`` on the
    keys' device with ``n >= max_seqlen_k // chunk_size`` (every full chunk) and unit stride in
    the head dim."""
    if not isinstance(cent, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cent).__name__}")
    if cent.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 (chunk centroids are summed in fp32), got {cent.dtype}")
    if cent.device != device:
        raise ValueError(f"{name} is on {cent.device}, the keys on {device}")
    need = int(max_k) // int(chunk_size)
    if (cent.dim() != 4 or cent.shape[0] != batch or cent.shape[2] != num_kv_heads or cent.shape[3] != head_dim
            or cent.shape[1] < need):
        raise ValueError(f"{name} must have shape (batch, n >= max_seqlen_k // chunk_size, num_kv_heads, head_dim) "
                         f"= ({batch}, >= {need}, {num_kv_heads}, {head_dim}), got {tuple(cent.shape)}")
    if cent.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {cent.stride()}")


def kernel_size_limits(total_q, H, D, total_k, Hk, B, chunk_size, topk, causal, fam="sm80", attention=True,
                       backward=True) -> list:
    """``(rule, value)`` for every quantity the CuTe kernels of a call index with 32-bit integers
    (each must be <= 2^31 - 1): the routing's (``kernels/route_launch.py``), and with
    ``attention`` the forward's and, with ``backward``, the backward's
    (``kernels/attention_launch.py``). Host arithmetic on shapes only; ``fam`` ("sm80" /
    "sm90") picks the tiles the bounds depend on. Bounds that depend on a tile size use the
    smallest tile a call of that family may get, so they are never below the launch modules'
    own checks (tests/test_hostile.py compares them with the launch plans)."""
    from .configs import attention_sm80 as acfg
    from .configs import routing as rcfg
    from .routing import num_chunks_bound

    G = H // Hk
    R = total_q * H
    K = max(int(topk), 1)
    C = int(chunk_size)
    nbound = num_chunks_bound(total_k, B, C)
    nseg = nbound * H
    out = [
        ("chunk_size", C),
        ("batch + 1 (cu_seqlens length)", B + 1),
        ("total_q * num_heads * topk", R * K),
        ("total_q * num_heads", R),
        ("total_k * num_kv_heads * head_dim / 8", total_k * Hk * D // 8),
        ("num_chunks * num_heads + 1 (num_chunks <= (total_k + batch * (chunk_size - 1)) // chunk_size)",
         nseg + 1),
        ("num_chunks * num_kv_heads * head_dim", nbound * Hk * D),
    ]
    # routing: query tiles (rows_tile packed rows of one KV head) and the key-major blocks
    cap_l = rcfg.list_cap(min(max(1, K - 1 if causal else K), rcfg.LIST_CAPS[-1]))
    tile = rcfg.topk_tile(fam, D, cap_l, causal)
    bm = tile[0] if tile is not None else 64
    rows_tile = G * (bm // G) if G <= bm else bm
    mt_bound = (total_q * G + B * (rows_tile - 1)) // rows_tile
    out += [("routing query tiles * num_kv_heads", mt_bound * Hk)]
    try:
        from .kernels.route_launch import _km_block_rows
    except ImportError:  # pragma: no cover (the routing kernels are not importable)
        _km_block_rows = None
    if _km_block_rows is not None:
        _, kb_bound, tb_bound = _km_block_rows(total_q, total_k, B, C, H, R * K)
        out += [("routing key-major count table", tb_bound * H),
                ("total_q * num_heads * topk + key-major blocks", R * K + 2 * kb_bound * H + 1024)]
    if attention:
        kp = K - 1 if causal else K  # gather slots per (row, head)
        out += [("total_k * num_kv_heads", total_k * Hk),
                ("topk * num_chunks * num_heads + 1", K * nseg + 1)]
        # per-slot tile tables: sm80 slot passes (tiles of bm rows) and, on sm90, the merged
        # index of the segment kernel (units of 64 * sub entries); over every tile a tuned table
        # may pick (configs/tuned.py), so the bound holds whatever the plan's tile is
        from .configs import tuned

        bms = [min(t[0] for d in acfg.FWD_TILES for t in tuned.candidates("sm80_fwd", d))]
        if backward:
            bms.append(min(t[0] for t in acfg.BWD_DQ_TILES.values()))
        for bm_a in bms:
            out.append(("per-slot tile table", max(kp, 1) * ((R + bm_a - 1) // bm_a + min(nseg, R))))
        if fam == "sm90":
            try:
                from .configs import attention_sm90 as cfg90

                unit = min(64 * t[1] for d in cfg90.FWD_TILES for t in tuned.candidates("sm90_fwd", d))
            except (ImportError, AttributeError):  # pragma: no cover (no sm90 forward)
                unit = None
            if unit is not None:
                out.append(("merged slot tile table", (R * kp + unit - 1) // unit + min(nseg, R * kp)))
        if backward:
            kbn = min(t[1] for t in acfg.BWD_DKV_TILES.values())
            out.append(("dK/dV grid (num_chunks * ceil(chunk_size / 64))", nbound * ((C + kbn - 1) // kbn)))
    return out


_SIZES_OK: set = set()


def _check_kernel_sizes(q, k, B, chunk_size, topk, causal, attention, backward) -> None:
    """Refuse, before any launch, a call whose sizes the CuTe kernels cannot index (the answer is
    kept per shape: a call's host path stays a set lookup). Not under torch.compile, where the
    launch modules' own checks (at run time, before their first launch) stand in."""
    if torch.compiler.is_compiling():
        return
    total_q, H, D = q.shape
    total_k, Hk, _ = k.shape
    fam = _arch(q.device) or "sm80"
    key = (total_q, H, D, total_k, Hk, B, int(chunk_size), int(topk), causal, fam, attention, backward)
    if key in _SIZES_OK:
        return
    for rule, val in kernel_size_limits(*key):
        if val > INT32_MAX:
            raise ValueError(
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, batch {B}, chunk_size {chunk_size}, topk {topk}: "
                f"{rule} = {val} must be <= 2^31-1 for the CuTe kernels (32-bit indexing); split the batch "
                f"(or use backend='reference')"
            )
    if len(_SIZES_OK) >= 1024:
        _SIZES_OK.clear()
    _SIZES_OK.add(key)


def _check_routing(routing, q, k) -> None:
    """A Routing given to attention_with_routing must fit q and k: tensor kinds and sizes always,
    values on CPU and in strict mode."""
    from .routing import chunk_offsets, num_chunks_bound

    total_q, H, _ = q.shape
    total_k = k.shape[0]
    cu_q, cu_k = routing.cu_seqlens_q, routing.cu_seqlens_k
    _check_cu_seqlens(cu_q, cu_k, q.device, "routing.")
    B = cu_q.numel() - 1
    K = routing.topk
    nbound = num_chunks_bound(total_k, B, routing.chunk_size)
    expect = {
        "selection": (total_q, H, K),
        "offsets": (nbound * H + 1,),
        "query_rows": (total_q * H * K,),
        "cu_chunks": (B + 1,),
    }
    for name, shape in expect.items():
        t = getattr(routing, name)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise TypeError(f"routing.{name} must be an int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != q.device:
            raise ValueError(f"routing.{name} must be on the same device as q ({q.device}), got {t.device}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"routing.{name} must have shape {shape} for q {tuple(q.shape)} and k {tuple(k.shape)} "
                f"(batch {B}, chunk_size {routing.chunk_size}, topk {K}), got {tuple(t.shape)}: was the routing "
                f"made for these tensors?"
            )
    if not (q.device.type == "cpu" or _strict):
        return
    _check_cu_values("routing.cu_seqlens_q", cu_q, total_q, "routing.max_seqlen_q", routing.max_seqlen_q)
    _check_cu_values("routing.cu_seqlens_k", cu_k, total_k, "routing.max_seqlen_k", routing.max_seqlen_k)
    cu_chunks = chunk_offsets(cu_k, routing.chunk_size)
    if not torch.equal(routing.cu_chunks, cu_chunks):
        raise ValueError("routing.cu_chunks must be the chunk offsets of routing.cu_seqlens_k and chunk_size")
    from .reference import _batch_index, _key_major

    qb = _batch_index(cu_q, total_q)
    nc = (cu_chunks[1:] - cu_chunks[:-1]).to(torch.int64)[qb].view(total_q, 1, 1)
    sel = routing.selection.to(torch.int64)
    if total_q and bool(((sel < -1) | (sel >= nc)).any()):
        raise ValueError("routing.selection must hold local chunk ids in [-1, chunks of the row's sequence)")
    offsets, query_rows = _key_major(routing.selection, qb, cu_chunks, nbound)
    if not (torch.equal(offsets, routing.offsets) and torch.equal(query_rows, routing.query_rows)):
        raise ValueError("routing.offsets / routing.query_rows must be the key-major index of routing.selection "
                         "(as moba_cute.route builds it)")


# --------------------------------------------------------------------------------------------
# dispatch


_ARCHS: dict = {}


def _arch(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    arch = _ARCHS.get(idx, False)
    if arch is False:
        major, _ = torch.cuda.get_device_capability(idx)
        # mma.sync / cp.async code runs on Ampere and later
        arch = "sm90" if major == 9 else ("sm80" if major in (8, 10, 11, 12) else None)
        if not torch.compiler.is_compiling():
            _ARCHS[idx] = arch
    return arch


def _route_kernel_module():
    try:
        from .kernels import route_launch
    except ImportError:
        return None
    return route_launch


def _attention_kernel_module():
    try:
        from .kernels import attention_launch
    except ImportError:
        return None
    return attention_launch


def _decode_kernel_module():
    try:
        from .kernels import decode_launch
    except ImportError:
        return None
    return decode_launch


def kernel_paths(device=None) -> dict:
    """Which CuTe kernel family serves ``device`` (default: the current CUDA device).

    Returns ``{"route": "sm90" | "sm80" | None, "attention": ..., "attention_backward": ...,
    "decode": ...}`` (``decode``: the decode-step kernels of calls with at most
    ``configs/decode.py: MAX_QUERIES`` queries per sequence and no gradient: mma.sync on the
    tensor cores for head dims 32/64/128, CUDA-core code otherwise, built for the device's family):
    the instruction family of the kernels that run (``"sm80"``: mma.sync/cp.async code, which
    also runs on Hopper; ``"sm90"``: Hopper-only wgmma/TMA code); None where no kernel serves
    that device (or no CUDA device is present). A configuration the device's family does not
    cover (e.g. the sm90 forward with head dim 96) runs the sm80 code, with a one-time warning
    naming the reason.
    """
    if device is None:
        if not torch.cuda.is_available():
            return {"route": None, "attention": None, "attention_backward": None, "decode": None}
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    arch = _arch(device)
    out = {}
    att = _attention_kernel_module()
    for key, mod, attr in (("route", _route_kernel_module(), "KERNEL_FAMILIES"), ("attention", att, "KERNEL_FAMILIES"),
                           ("attention_backward", att, "BWD_KERNEL_FAMILIES")):
        if mod is None or arch is None:
            out[key] = None
            continue
        # a kernel module lists the families it has (default: sm80 mma.sync code only); a
        # device runs its own family if present, else the sm80 code
        families = getattr(mod, attr, ("sm80",))
        out[key] = arch if arch in families else ("sm80" if "sm80" in families else None)
    out["decode"] = arch if (arch is not None and _decode_kernel_module() is not None) else None
    return out


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


_REASONS: dict = {}


def _use_kernel(what: str, module, backend: str, device, reason_fn, config=None) -> bool:
    """Decide between kernel and reference; raise or warn as the backend asks. ``config``, when
    given, is a hashable key of everything ``reason_fn`` looks at: its answer is cached."""
    if backend == "reference":
        return False
    if device.type != "cuda":
        if backend == "cute":
            raise UnsupportedError(f"backend='cute' needs CUDA tensors; got tensors on {device}")
        return False
    arch = _arch(device)
    if module is None:
        reason = f"no CuTe {what} kernel is available in this build"
    elif arch is None:
        reason = f"the CuTe {what} kernels need compute capability 8.0 or newer"
    elif config is None or torch.compiler.is_compiling():  # (no global-dict side effects in a trace)
        reason = reason_fn(module, arch)
    else:
        ck = (what, arch) + config
        if ck not in _REASONS:
            _REASONS[ck] = reason_fn(module, arch)
        reason = _REASONS[ck]
    if reason is None:
        return True
    if backend == "cute":
        raise UnsupportedError(f"backend='cute': {reason}")
    _warn_once(f"moba_cute: using the PyTorch reference for {what}: {reason}")
    return False


def _uses_decode(q, k, v, B, H, D, max_q, max_k, chunk_size, topk, backend) -> bool:
    """Whether a call runs the decode-step kernels (few queries per sequence, no gradient: see
    configs/decode.py); otherwise the general path (or the reference) decides as usual."""
    if not _decode or backend == "reference" or q.device.type != "cuda" or torch.compiler.is_compiling():
        return False
    if _needs_grad(q, k, v) or _arch(q.device) is None:
        return False
    mod = _decode_kernel_module()
    return mod is not None and mod.decode_unsupported_reason(q.dtype, D, H, chunk_size, topk, max_q, max_k, B) is None


# --------------------------------------------------------------------------------------------
# public API


def key_centroids(k, chunk_size, cu_seqlens_k=None, max_seqlen_k=None, out=None, start_chunk=0, backend="auto"):
    """The centroids (fp32 means) of every full chunk of the keys: the cache that
    :func:`varlen_attention` / :func:`attention` take as ``key_centroids`` so that a decode step
    reads a few centroids instead of all of K for its routing.

    ``k``: packed (total_k, Hk, D) with ``cu_seqlens_k`` and ``max_seqlen_k``, or padded
    (B, S, Hk, D) without them. Returns ``out`` (B, n, Hk, D) fp32, allocated (zeros, ``n =
    max_seqlen_k // chunk_size``) when None; only chunks ``start_chunk <= j < len_k // chunk_size``
    of each sequence are written, so a decode loop extends its cache as chunks fill up::

        cent = key_centroids(k_cache, C, out=torch.zeros(B, max_len // C, Hk, D, device=dev))
        ...  # the cache grows past a chunk boundary: n_before full chunks were cached
        key_centroids(k_cache, C, out=cent, start_chunk=n_before)
        out = attention(q, k_cache, v_cache, C, K, key_centroids=cent)

    On the GPU (fp16/bf16) the decode scores kernel writes them with its own summation (bitwise
    what a step computes from K for chunks under 1024 keys, fp32 rounding apart for longer ones);
    elsewhere PyTorch (the reference).
    """
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not _is_int(start_chunk) or start_chunk < 0:
        raise ValueError(f"start_chunk must be a non-negative integer, got {start_chunk!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
    padded = k.dim() == 4
    if padded:
        if cu_seqlens_k is not None or max_seqlen_k is not None:
            raise ValueError("key_centroids: padded k (B, S, Hk, D) takes no cu_seqlens_k / max_seqlen_k")
        B, max_k, hk, d = k.shape
        cu = _padded_cu_seqlens(B, max_k, k.device)
    elif k.dim() == 3:
        if cu_seqlens_k is None or max_seqlen_k is None:
            raise ValueError("key_centroids: packed k (total_k, Hk, D) needs cu_seqlens_k and max_seqlen_k")
        _check_cu("cu_seqlens_k", cu_seqlens_k, k.device, "k")
        if not _is_int(max_seqlen_k) or max_seqlen_k < 0:
            raise ValueError(f"max_seqlen_k must be a non-negative integer, got {max_seqlen_k!r}")
        if k.device.type == "cpu" or _strict:
            _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)
        B, max_k, hk, d = cu_seqlens_k.shape[0] - 1, int(max_seqlen_k), k.shape[1], k.shape[2]
        cu = cu_seqlens_k
    else:
        raise ValueError(f"k must be (total_k, Hk, D) with cu_seqlens_k or (B, S, Hk, D), got shape {tuple(k.shape)}")
    if k.dtype not in FLOAT_DTYPES:
        raise ValueError(f"k must be a floating tensor (fp16/bf16/fp32/fp64), got {k.dtype}")
    if min(hk, d) < 1:
        raise ValueError(f"k must have at least one head and head dim >= 1, got shape {tuple(k.shape)}")
    if out is None:
        out = torch.zeros(B, max_k // chunk_size, hk, d, dtype=torch.float32, device=k.device)
    else:
        _check_centroids(out, "out", B, hk, d, max_k, chunk_size, k.device)
    from .configs import decode as dcfg

    if (backend != "reference" and k.device.type == "cuda" and k.dtype in (torch.float16, torch.bfloat16)
            and d in dcfg.SUPPORTED_HEAD_DIMS and max_k // chunk_size - start_chunk <= dcfg.MAX_GRID_Y
            and not torch.compiler.is_compiling()):  # (one CTA row per chunk: the grid's y limit)
        from .kernels.decode_launch import key_centroids_cute

        return key_centroids_cute(k, cu, max_k, int(chunk_size), out, int(start_chunk), padded)
    if backend == "cute":
        raise UnsupportedError(f"key_centroids: the CuTe kernel takes fp16/bf16 CUDA keys with head dim in "
                               f"{dcfg.SUPPORTED_HEAD_DIMS} and at most {dcfg.MAX_GRID_Y} chunks to write")
    kv = k.reshape(-1, hk, d)
    starts = cu.tolist()
    for b in range(B):
        lk = starts[b + 1] - starts[b]
        n = lk // chunk_size
        if n > start_chunk:
            rows = kv[starts[b] + start_chunk * chunk_size: starts[b] + n * chunk_size]
            out[b, start_chunk:n] = rows.to(torch.float32).view(n - start_chunk, chunk_size, hk, d).mean(1)
    return out


def route(
    q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk, causal=True, backend="auto"
) -> Routing:
    """MoBA routing for a packed batch: see :class:`moba_cute.routing.Routing` for the layout."""
    _check_scalars(chunk_size, topk, causal, None, backend)
    _check_varlen(q, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _route(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk, causal, backend)


def _route(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk, causal, backend):
    """:func:`route` on validated arguments."""
    args = (q, k, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), int(chunk_size), int(topk), causal)
    mod = _route_kernel_module()
    if _use_kernel(
        "routing",
        mod,
        backend,
        q.device,
        lambda m, arch: m.route_unsupported_reason(q.dtype, q.shape[-1], chunk_size, topk, arch),
        (q.dtype, q.shape[-1], args[6], args[7]),
    ):
        from . import ops

        _check_kernel_sizes(q, k, cu_seqlens_q.shape[0] - 1, chunk_size, topk, causal, False, False)

        if torch.compiler.is_compiling():
            return ops.routing_from_tensors(*ops.route_op(*args), *args[2:], k.shape[1])
        return ops.route_eager(*args)
    return reference.route(*args)


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _attention_uses_kernel(q, k, v, chunk_size, topk, causal, batch, backend) -> bool:
    """Whether the attention runs the CuTe kernels (raising or warning as the backend asks); if
    so, the sizes are checked here, before the call launches anything (routing included)."""
    mod = _attention_kernel_module()
    needs_grad = _needs_grad(q, k, v)

    def reason(m, arch):
        if needs_grad and not getattr(m, "HAS_BACKWARD", False):
            return "the CuTe MoBA backward is not available yet (inputs require grad)"
        return m.attention_unsupported_reason(q.dtype, q.shape[-1], chunk_size, topk, arch)

    config = (q.dtype, q.shape[-1], chunk_size, topk, needs_grad)
    use = _use_kernel("attention", mod, backend, q.device, reason, config)
    if use:
        _check_kernel_sizes(q, k, batch, chunk_size, topk, causal, True, needs_grad)
    return use


def _attend(q, k, v, routing: Routing, softmax_scale, deterministic, backend, use_kernel=None, owned=False):
    """``owned``: ``routing`` was made for this call alone (the forward may write over it)."""
    needs_grad = _needs_grad(q, k, v)
    if use_kernel is None:
        use_kernel = _attention_uses_kernel(q, k, v, routing.chunk_size, routing.topk, routing.causal,
                                            routing.cu_seqlens_q.shape[0] - 1, backend)
    if use_kernel:
        from . import ops

        scale = None if softmax_scale is None else float(softmax_scale)
        if torch.compiler.is_compiling():
            # a custom op (differentiable through its registered backward): torch.compile traces it
            r = routing
            return ops.attention_op(q, k, v, r.selection, r.offsets, r.query_rows, r.cu_chunks, r.cu_seqlens_q,
                                    r.cu_seqlens_k, r.max_seqlen_q, r.max_seqlen_k, r.chunk_size, r.topk,
                                    r.causal, scale, deterministic)
        if needs_grad:
            return ops.AttentionFunction.apply(q, k, v, routing, scale, deterministic)
        from .kernels.attention_launch import attention_cute

        # no backward follows: the forward may bound its scratch tighter (it is the call's peak)
        return attention_cute(q, k, v, routing, scale, deterministic, inference=True, consume_routing=owned)
    return reference.attention(q, k, v, routing, softmax_scale)


def attention_with_routing(
    q, k, v, routing: Routing, softmax_scale=None, return_lse=False, deterministic=False, backend="auto"
):
    """MoBA attention with a given routing (from :func:`route`), varlen layout.

    ``q`` (total_q, H, D), ``k``/``v`` (total_k, Hk, D) must be the batch the routing was made
    for. Returns ``out`` (total_q, H, D), and ``lse`` (H, total_q) fp32 if ``return_lse``.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moba_cute.Routing (from moba_cute.route), got {type(routing).__name__}")
    _check_scalars(routing.chunk_size, routing.topk, routing.causal, softmax_scale, backend,
                   return_lse=return_lse, deterministic=deterministic)
    _check_qkv(q, k, v, "varlen")
    if tuple(routing.selection.shape[:2]) != (q.shape[0], q.shape[1]):
        raise ValueError(
            f"routing was made for {tuple(routing.selection.shape[:2])} (total_q, num_heads) but q has "
            f"{tuple(q.shape[:2])}"
        )
    if routing.num_kv_heads != k.shape[1]:
        raise ValueError(f"routing was made for {routing.num_kv_heads} KV heads but k has {k.shape[1]}")
    if routing.selection.device != q.device:
        raise ValueError(f"routing must be on the same device as q ({q.device}), got {routing.selection.device}")
    _check_routing(routing, q, k)
    out, lse = _attend(q, k, v, routing, softmax_scale, deterministic, backend)
    return (out, lse) if return_lse else out


def varlen_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    chunk_size,
    topk,
    causal=True,
    softmax_scale=None,
    return_lse=False,
    deterministic=False,
    backend="auto",
    key_centroids=None,
):
    """MoBA attention over a packed variable-length batch (FlashAttention's varlen layout).

    q: (total_q, H, D); k, v: (total_k, Hk, D) with H % Hk == 0 (GQA/MQA); cu_seqlens_q/k:
    int32 (B+1,) offsets. Each query attends to the keys of its top-k chunks (own chunk
    forced when causal); see SPEC section 1. Returns ``out`` (total_q, H, D) in q's dtype,
    and the fp32 log-sum-exp ``(H, total_q)`` as well if ``return_lse``.

    ``key_centroids``: a cache of the full chunks' centroids, fp32 (B, n, Hk, D), as
    :func:`key_centroids` computes them; decode steps on the GPU read it instead of K for the
    routing (other calls compute the centroids from k). Entries ``j < len_k // chunk_size`` of
    each sequence must hold its chunk means.
    """
    _check_scalars(chunk_size, topk, causal, softmax_scale, backend, return_lse=return_lse,
                   deterministic=deterministic)
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if key_centroids is not None:
        _check_centroids(key_centroids, "key_centroids", cu_seqlens_k.shape[0] - 1, k.shape[1], k.shape[2],
                         max_seqlen_k, chunk_size, k.device)
    if _uses_decode(q, k, v, cu_seqlens_q.shape[0] - 1, q.shape[1], q.shape[2], max_seqlen_q, max_seqlen_k,
                    chunk_size, topk, backend):
        from .kernels.decode_launch import decode_cute

        out, lse = decode_cute(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                               int(chunk_size), int(topk), causal, softmax_scale, False, key_centroids)
        return (out, lse) if return_lse else out
    out, lse = _varlen_general(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk,
                               causal, softmax_scale, deterministic, backend)
    return (out, lse) if return_lse else out


def _varlen_general(q, k, v, cu_q, cu_k, max_q, max_k, chunk_size, topk, causal, softmax_scale, deterministic,
                    backend):
    """:func:`varlen_attention` on validated arguments that do not take the decode path: routing,
    then attention; ``(out, lse)``."""
    use_kernel = _attention_uses_kernel(q, k, v, int(chunk_size), int(topk), causal, cu_q.shape[0] - 1, backend)
    r = _route(q.detach(), k.detach(), cu_q, cu_k, max_q, max_k, chunk_size, topk, causal, backend)
    return _attend(q, k, v, r, softmax_scale, deterministic, backend, use_kernel, owned=True)


_PADDED_CU: dict = {}


def _padded_cu_seqlens(batch: int, seqlen: int, device) -> torch.Tensor:
    """``arange(batch + 1) * seqlen`` (int32), kept per (batch, seqlen, device): building it costs
    two PyTorch kernels per call. Not kept when made inside a CUDA graph capture or a
    torch.compile trace (the tensor would belong to that graph)."""
    if torch.compiler.is_compiling():
        return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen
    key = (batch, seqlen, device)
    cu = _PADDED_CU.get(key)
    if cu is None:
        cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if len(_PADDED_CU) >= 64:
                _PADDED_CU.clear()
            _PADDED_CU[key] = cu
    return cu


def attention(
    q,
    k,
    v,
    chunk_size,
    topk,
    causal=True,
    softmax_scale=None,
    return_lse=False,
    deterministic=False,
    backend="auto",
    key_centroids=None,
):
    """MoBA attention on padded batches: q (B, Sq, H, D), k/v (B, Sk, Hk, D).

    Every sequence of the batch has the full length. Returns ``out`` (B, Sq, H, D), and the
    fp32 LSE (B, H, Sq) as well if ``return_lse``. ``key_centroids``: as for
    :func:`varlen_attention`, (B, n >= Sk // chunk_size, Hk, D).
    """
    _check_scalars(chunk_size, topk, causal, softmax_scale, backend, return_lse=return_lse,
                   deterministic=deterministic)
    _check_qkv(q, k, v, "padded")
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if b < 1:
        raise ValueError(f"q must hold at least one sequence (batch >= 1), got batch {b}")
    if key_centroids is not None:
        _check_centroids(key_centroids, "key_centroids", b, hk, d, sk, chunk_size, k.device)
    cu_q = _padded_cu_seqlens(b, sq, q.device)
    cu_k = _padded_cu_seqlens(b, sk, q.device)
    if _uses_decode(q, k, v, b, h, d, sq, sk, chunk_size, topk, backend):
        # (strided q/k/v read in place, e.g. transformers' (B, Hk, S, D) cache transposed)
        from .kernels.decode_launch import decode_cute

        res = decode_cute(q, k, v, cu_q, cu_k, sq, sk, int(chunk_size), int(topk), causal, softmax_scale, True,
                          key_centroids)
    else:  # (checked above: the packed views and their cu_seqlens are valid by construction)
        res = _varlen_general(
            q.reshape(b * sq, h, d), k.reshape(b * sk, hk, d), v.reshape(b * sk, hk, d), cu_q, cu_k, sq, sk,
            chunk_size, topk, causal, softmax_scale, deterministic, backend,
        )
    out = res[0].view(b, sq, h, d)
    if not return_lse:
        return out
    return out, res[1].view(h, b, sq).permute(1, 0, 2)
