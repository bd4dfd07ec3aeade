"""Host side of the decode-step forward (:mod:`moba_cute.kernels.decode`): a few new queries per
sequence against a long KV cache, routing and attention in two or three launches.

``decode_cute(q, k, v, cu_q, cu_k, max_q, max_k, chunk, topk, causal, scale, padded)`` returns
``(out (total_q, H, D), lse (H, total_q))``. ``padded=False``: the varlen layout, q (total_q, H,
D), k/v (total_k, Hk, D); ``padded=True``: q (B, Sq, H, D), k/v (B, Sk, Hk, D), each with any
(batch, token, head) strides that are whole 16-byte pieces (transformers' ``(B, Hk, S, D)`` cache
transposed is read in place). No host synchronization; CUDA-graph capturable.

Launches: scores (grid B x chunks x Hk), attend (B x max_q*H x splits), and, with several key
splits, merge (B x max_q*H). ``splits`` spreads a row's selected keys over CTAs when there are
too few (row, head) pairs to fill the GPU (one sequence) or a row selects many keys (large
chunks); it depends only on shapes (:class:`DecodePlan`, cached per shape key).
"""

from __future__ import annotations


import torch

from . import common

from ..configs import decode as cfg
from . import common

__all__ = ["decode_cute", "decode_unsupported_reason", "kernel_specs", "DECODE_PLANS"]

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
LOG2_E = 1.4426950408889634


def decode_unsupported_reason(dtype, head_dim, num_heads, chunk_size, topk, max_seqlen_q, max_seqlen_k):
    """None if the decode kernels take this call (configs/decode.py), else a short reason (the
    caller then runs the general path)."""
    if dtype not in _DTYPES:
        return f"decode kernels support float16/bfloat16, not {dtype}"
    if head_dim not in cfg.SUPPORTED_HEAD_DIMS:
        return f"decode kernels support head dims {cfg.SUPPORTED_HEAD_DIMS}, not {head_dim}"
    if not 1 <= topk <= cfg.MAX_TOPK:
        return f"decode kernels support 1 <= topk <= {cfg.MAX_TOPK}, not {topk}"
    if not 1 <= max_seqlen_q <= cfg.MAX_QUERIES:
        return f"decode kernels take 1 to {cfg.MAX_QUERIES} queries per sequence, not max_seqlen_q={max_seqlen_q}"
    if max_seqlen_q * num_heads > cfg.MAX_GRID_Y:
        return f"decode kernels take max_seqlen_q * num_heads <= {cfg.MAX_GRID_Y}"
    if -(-max_seqlen_k // chunk_size) > cfg.MAX_CHUNKS:
        return f"decode kernels take up to {cfg.MAX_CHUNKS} chunks per sequence"
    return None


def _cdt(name):
    import cutlass

    return {"float16": cutlass.Float16, "bfloat16": cutlass.BFloat16}[name]


def kernel_specs(dtype_name, head_dim, padded, causal):
    """Role -> (compile key, factory, fake args) of the decode kernels of one configuration."""
    import cutlass

    from .decode import DecodeAttendKernel, DecodeMergeKernel, DecodeScoresKernel

    dt = _cdt(dtype_name)
    P = common.fake_gptr
    f32, i32 = cutlass.Float32, cutlass.Int32
    L = tuple(cutlass.Int64(8) for _ in range(3))
    I = lambda n: tuple(cutlass.Int32(1) for _ in range(n))  # noqa: E731
    s = common.fake_stream()
    scores = ((("decode_scores", dtype_name, head_dim, padded), lambda: DecodeScoresKernel(dt, head_dim, padded),
               (P(dt), P(dt), P(i32, 4), P(i32, 4), P(f32, 4)) + L + L + I(8) + (s,)))
    attend = ((("decode_attend", dtype_name, head_dim, padded, causal),
               lambda: DecodeAttendKernel(dt, head_dim, padded, causal),
               (P(dt), P(dt), P(dt), P(i32, 4), P(i32, 4), P(f32, 4), P(dt), P(f32, 4), P(f32, 4), P(f32, 4))
               + L + L + L + I(11) + (f32(1.0), s)))
    merge = ((("decode_merge", dtype_name, head_dim), lambda: DecodeMergeKernel(dt, head_dim),
              (P(i32, 4), P(f32, 4), P(f32, 4), P(dt), P(f32, 4)) + I(5) + (s,)))
    return {"scores": scores, "attend": attend, "merge": merge}


_SM_COUNT: dict = {}


def _sm_count(dev) -> int:
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


class DecodePlan:
    """Everything of a decode call that depends only on its shape key: not on the cache length,
    which grows every step (the chunk count is per call)."""

    def __init__(self, key, arch):
        (self.dtype_name, self.B, self.max_q, self.H, self.Hk, self.D, self.C, K, causal, padded, sms) = key
        pieces = K * -(-self.C // cfg.KEYS_PER_PIECE)  # a row's 32-key pieces at most
        pairs = max(1, self.B * self.max_q * self.H)
        # enough CTAs for the waves, each giving every warp a few pieces
        self.splits = max(1, min(-(-cfg.WAVES * sms // pairs), -(-pieces // (cfg.MIN_PIECES_PER_WARP * cfg.ATTEND_WARPS)),
                                 cfg.MAX_SPLITS))
        self.pps = -(-pieces // self.splits)
        self.part_words = self.splits * (self.D + 2) if self.splits > 1 else 0  # per (row, head)
        self.ks = common.KernelSet(kernel_specs(self.dtype_name, self.D, padded, causal), arch)


DECODE_PLANS = common.PlanCache(DecodePlan)


def _strides(t, padded):
    """(batch, token, head) strides in elements, and whether the kernels can read ``t`` in place
    (16-byte aligned base, 16-byte multiples)."""
    if padded:
        sb, st, sh = t.stride(0), t.stride(1), t.stride(2)
    else:
        sb, st, sh = 0, t.stride(0), t.stride(1)
    ok = t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(x % 8 == 0 for x in (sb, st, sh))
    return (sb, st, sh), ok


def decode_cute(q, k, v, cu_q, cu_k, max_q, max_k, chunk_size, topk, causal, softmax_scale, padded):
    """The decode-step forward (see the module docstring): ``(out, lse)``."""
    if padded:
        B, Sq, H, D = q.shape
        total_q, total_k, Hk = B * Sq, B * k.shape[1], k.shape[2]
    else:
        total_q, H, D = q.shape
        total_k, Hk = k.shape[0], k.shape[1]
        B = cu_q.numel() - 1
    dev = q.device
    out = torch.empty((total_q, H, D), dtype=q.dtype, device=dev)
    lse = torch.empty((H, total_q), dtype=torch.float32, device=dev)
    if total_q == 0 or B == 0:
        return out, lse
    strides = []
    tensors = []
    for t in (q, k, v):
        st, ok = _strides(t, padded)
        if not ok:
            t = t.contiguous().clone() if t.is_contiguous() else t.contiguous()
            st, _ = _strides(t, padded)
        strides.append(st)
        tensors.append(t)
    q, k, v = tensors
    key = (_DTYPES[q.dtype], B, max_q, H, Hk, D, chunk_size, topk, causal, padded, _sm_count(dev))
    plan = DECODE_PLANS.get(key, key, common.arch_of(dev))
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    nch = max(1, -(-max_k // chunk_size))
    # one fp32 workspace: chunk scores (B, max_q, H, chunks), then the splits' states
    nsc = B * max_q * H * nch
    work = torch.empty(nsc + total_q * H * plan.part_words, dtype=torch.float32, device=dev)
    p_sc = work.data_ptr()
    stream = common.raw_stream(dev)
    pq, pk, pv = q.data_ptr(), k.data_ptr(), v.data_ptr()
    pcq, pck = cu_q.data_ptr(), cu_k.data_ptr()
    (qsb, qst, qsh), (ksb, kst, ksh), (vsb, vst, vsh) = strides
    ks = plan.ks
    ks["scores"](pq, pk, pcq, pck, p_sc, qsb, qst, qsh, ksb, kst, ksh, B, H, Hk, total_q, total_k,
                 max_q, chunk_size, nch, stream)
    splits = plan.splits
    p_ml = p_sc + 4 * nsc  # (max, sum) per (row, head, split); then the unnormalized outputs
    p_acc = p_ml + 4 * 2 * total_q * H * splits
    ks["attend"](pq, pk, pv, pcq, pck, p_sc, out.data_ptr(), lse.data_ptr(), p_ml, p_acc, qsb, qst,
                 qsh, ksb, kst, ksh, vsb, vst, vsh, B, H, Hk, total_q, total_k, max_q, chunk_size, nch,
                 topk, splits, plan.pps, float(scale * LOG2_E), stream)
    if splits > 1:
        ks["merge"](pcq, p_ml, p_acc, out.data_ptr(), lse.data_ptr(), B, H, total_q, max_q, splits, stream)
    return out, lse
