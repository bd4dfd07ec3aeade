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
    "kernel_paths",
    "set_strict_checks",
    "UnsupportedError",
]

BACKENDS = ("auto", "cute", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_strict = os.environ.get("MOBA_CUTE_STRICT_CHECKS", "0") not in ("", "0", "false", "False")
_warned: set[str] = set()


class UnsupportedError(RuntimeError):
    """Raised with ``backend="cute"`` when no kernel supports the requested configuration."""


def set_strict_checks(enabled: bool) -> None:
    """Check cu_seqlens values on CUDA too (one host synchronization per call)."""
    global _strict
    _strict = bool(enabled)


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


def _check_cu_seqlens(cu_q, cu_k, device) -> None:
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D tensor of batch+1 >= 2 offsets, got shape {tuple(cu.shape)}")
        if cu.device != device:
            raise ValueError(f"{name} must be on the same device as q ({device}), got {cu.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch+1), got {cu_q.numel()} and {cu_k.numel()}"
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


def kernel_paths(device=None) -> dict:
    """Which CuTe kernel family serves ``device`` (default: the current CUDA device).

    Returns ``{"route": "sm90" | "sm80" | None, "attention": ...}``: the instruction family of
    the kernels that run (``"sm80"``: mma.sync/cp.async code, which also runs on Hopper;
    ``"sm90"``: Hopper-only wgmma/TMA code); None where no kernel serves that device (or no
    CUDA device is present).
    """
    if device is None:
        if not torch.cuda.is_available():
            return {"route": None, "attention": None}
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    arch = _arch(device)
    out = {}
    for key, mod in (("route", _route_kernel_module()), ("attention", _attention_kernel_module())):
        if mod is None or arch is None:
            out[key] = None
            continue
        # a kernel module lists the families it has (default: sm80 mma.sync code only); a
        # device runs its own family if present, else the sm80 code
        families = getattr(mod, "KERNEL_FAMILIES", ("sm80",))
        out[key] = arch if arch in families else ("sm80" if "sm80" in families else None)
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


# --------------------------------------------------------------------------------------------
# public API


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

        if torch.compiler.is_compiling():
            return ops.routing_from_tensors(*ops.route_op(*args), *args[2:], k.shape[1])
        return ops.route_eager(*args)
    return reference.route(*args)


def _attend(q, k, v, routing: Routing, softmax_scale, deterministic, backend):
    mod = _attention_kernel_module()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    def reason(m, arch):
        if needs_grad and not getattr(m, "HAS_BACKWARD", False):
            return "the CuTe MoBA backward is not available yet (inputs require grad)"
        return m.attention_unsupported_reason(q.dtype, q.shape[-1], routing.chunk_size, routing.topk, arch)

    config = (q.dtype, q.shape[-1], routing.chunk_size, routing.topk, needs_grad)
    if _use_kernel("attention", mod, backend, q.device, reason, config):
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

        return attention_cute(q, k, v, routing, scale, deterministic)
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
    if routing.cu_seqlens_k.numel() and q.device.type == "cpu":
        _check_cu_values("routing.cu_seqlens_k", routing.cu_seqlens_k, k.shape[0], "routing.max_seqlen_k",
                         routing.max_seqlen_k)
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
):
    """MoBA attention over a packed variable-length batch (FlashAttention's varlen layout).

    q: (total_q, H, D); k, v: (total_k, Hk, D) with H % Hk == 0 (GQA/MQA); cu_seqlens_q/k:
    int32 (B+1,) offsets. Each query attends to the keys of its top-k chunks (own chunk
    forced when causal); see SPEC section 1. Returns ``out`` (total_q, H, D) in q's dtype,
    and the fp32 log-sum-exp ``(H, total_q)`` as well if ``return_lse``.
    """
    _check_scalars(chunk_size, topk, causal, softmax_scale, backend, return_lse=return_lse,
                   deterministic=deterministic)
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    r = _route(q.detach(), k.detach(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk,
               causal, backend)
    out, lse = _attend(q, k, v, r, softmax_scale, deterministic, backend)
    return (out, lse) if return_lse else out


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
):
    """MoBA attention on padded batches: q (B, Sq, H, D), k/v (B, Sk, Hk, D).

    Every sequence of the batch has the full length. Returns ``out`` (B, Sq, H, D), and the
    fp32 LSE (B, H, Sq) as well if ``return_lse``.
    """
    _check_scalars(chunk_size, topk, causal, softmax_scale, backend, return_lse=return_lse,
                   deterministic=deterministic)
    _check_qkv(q, k, v, "padded")
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if b < 1:
        raise ValueError(f"q must hold at least one sequence (batch >= 1), got batch {b}")
    cu_q = _padded_cu_seqlens(b, sq, q.device)
    cu_k = _padded_cu_seqlens(b, sk, q.device)
    res = varlen_attention(
        q.reshape(b * sq, h, d), k.reshape(b * sk, hk, d), v.reshape(b * sk, hk, d), cu_q, cu_k, sq, sk,
        chunk_size, topk, causal, softmax_scale, True, deterministic, backend,
    )
    out = res[0].view(b, sq, h, d)
    if not return_lse:
        return out
    return out, res[1].view(h, b, sq).permute(1, 0, 2)
