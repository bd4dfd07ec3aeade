"""Host side of the decode-step forward (:mod:`moba_cute.kernels.decode`): a few new queries per
sequence against a long KV cache, routing and attention in two or three launches.

``decode_cute(q, k, v, cu_q, cu_k, max_q, max_k, chunk, topk, causal, scale, padded)`` returns
``(out (total_q, H, D), lse (H, total_q))``. ``padded=False``: the varlen layout, q (total_q, H,
D), k/v (total_k, Hk, D); ``padded=True``: q (B, Sq, H, D), k/v (B, Sk, Hk, D), each with any
(batch, token, head) strides that are whole 16-byte pieces (transformers' ``(B, Hk, S, D)`` cache
transposed is read in place). No host synchronization; CUDA-graph capturable.

Launches: scores (grid B x chunks x Hk), then attend: the per-head kernel (total_q x H x
splits) for chunks under ``GROUP_SELECT_MIN_CHUNK``, else the group kernel over the union of a
head group's selections (total_q x H/GT x splits: GT query heads of one KV head per CTA,
:func:`head_group`, sharing every key they read); when topk covers every chunk of the longest
sequence, the group kernel alone over every visible key. With several key splits, then merge
(total_q x H). Every output row is written (rows outside the
sequences, possible only with invalid cu_seqlens / max_seqlen_q, get 0 and -inf). ``splits`` spreads a
row's selected keys over CTAs when there are too few (row, head) pairs to fill the GPU (one
sequence) or a row selects many keys (large chunks): :func:`splits_for`, per call from shapes,
the count whose waves of CTAs end together (makespan model), within the plan's waves (CTAs per SM
at most: ``configs/decode.py: WAVES``, or the per-GPU tuned table's ``decode`` entry for the
call's shape class, :mod:`moba_cute.configs.tuned`).
"""

from __future__ import annotations

import contextlib

import torch

from ..configs import decode as cfg
from ..configs import tuned
from . import common

__all__ = ["decode_cute", "decode_unsupported_reason", "kernel_specs", "attend_launch", "DECODE_PLANS",
           "tile_override"]

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
LOG2_E = 1.4426950408889634


def decode_unsupported_reason(dtype, head_dim, num_heads, chunk_size, topk, max_seqlen_q, max_seqlen_k, batch=1):
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
    if num_heads > cfg.MAX_GRID_Y:
        return f"decode kernels take num_heads <= {cfg.MAX_GRID_Y}"
    nch = -(-max_seqlen_k // chunk_size)
    if nch > cfg.MAX_CHUNKS:
        return f"decode kernels take up to {cfg.MAX_CHUNKS} chunks per sequence"
    if topk < nch and batch * max_seqlen_q * num_heads * nch > cfg.MAX_SCORES:
        return f"the decode kernels' chunk scores (batch * max_seqlen_q * num_heads * chunks) exceed {cfg.MAX_SCORES}"
    return None


def _cdt(name):
    import cutlass

    return {"float16": cutlass.Float16, "bfloat16": cutlass.BFloat16}[name]


def head_group(num_heads, num_kv_heads, head_dim):
    """Query heads of one KV head that one CTA of the group kernel serves together: the largest
    of :func:`group_sizes` dividing the GQA group size."""
    G = num_heads // num_kv_heads
    return max(g for g in group_sizes(head_dim) if G % g == 0)


def kernel_specs(dtype_name, head_dim, padded, causal, group=1, stages=None, warps=None):
    """Role -> (compile key, factory, fake args) of the decode kernels of one configuration
    (``group``: query heads per CTA of the group kernel, :func:`head_group`; ``stages``: ring
    stages and warps of the tensor-core group kernel, default ``GROUP_MMA_STAGES`` and
    ``GROUP_MMA_WARPS``)."""
    import cutlass

    from .decode import (DecodeAttendKernel, DecodeGroupKernel, DecodeGroupMmaKernel, DecodeMergeKernel,
                         DecodeScoresKernel)

    dt = _cdt(dtype_name)
    P = common.fake_gptr
    f32, i32 = cutlass.Float32, cutlass.Int32
    L = tuple(cutlass.Int64(8) for _ in range(3))
    I = lambda n: tuple(cutlass.Int32(1) for _ in range(n))  # noqa: E731
    s = common.fake_stream()
    attend_args = ((P(dt), P(dt), P(dt), P(i32, 4), P(i32, 4), P(f32, 4), P(dt), P(f32, 4), P(f32, 4), P(f32, 4))
                   + L + L + L + I(10) + (f32(1.0), s))
    score_args = (P(dt), P(dt), P(i32, 4), P(i32, 4), P(f32, 4), P(f32, 4)) + L + L + L + I(9) + (s,)
    # centroids from K ("scores"; "centroids" writes them), or read for full chunks ("cached")
    specs = {
        role: (("decode_scores", dtype_name, head_dim, padded, n, mode) + ((cpw,) if cpw > 1 else ()),
               lambda n=n, mode=mode, cpw=cpw: DecodeScoresKernel(dt, head_dim, padded, n, mode, cpw), score_args)
        for role, n, mode, cpw in (("scores", cfg.SCORE_THREADS, "scores", 1),
                                   ("scores_wide", cfg.SCORE_WIDE_THREADS, "scores", 1),
                                   ("scores_cached", cfg.SCORE_THREADS, "cached", cfg.SCORE_CACHED_CHUNKS_PER_WARP),
                                   ("centroids", cfg.SCORE_THREADS, "centroids", 1))
    }
    specs.update({
        "attend": (("decode_attend", dtype_name, head_dim, padded, causal),
                   lambda: DecodeAttendKernel(dt, head_dim, padded, causal), attend_args),
        "merge": (("decode_merge", dtype_name, head_dim), lambda: DecodeMergeKernel(dt, head_dim),
                  (P(f32, 4), P(f32, 4), P(dt), P(f32, 4)) + I(3) + (s,)),
    })
    # the group kernel: on tensor cores for the head dims mma.sync takes, else on CUDA cores
    mma = head_dim in cfg.GROUP_MMA_HEAD_DIMS
    stages = cfg.GROUP_MMA_STAGES if stages is None else stages
    warps = cfg.GROUP_MMA_WARPS if warps is None else warps
    for role, select in (("group", False), ("group_select", True)):
        if mma:
            specs[role] = (("decode_group_mma", dtype_name, head_dim, padded, causal, group, select, stages, warps),
                           lambda select=select: DecodeGroupMmaKernel(dt, head_dim, padded, causal, group, select,
                                                                      stages, warps), attend_args)
        else:
            specs[role] = (("decode_group", dtype_name, head_dim, padded, causal, group, select),
                           lambda select=select: DecodeGroupKernel(dt, head_dim, padded, causal, group, select),
                           attend_args)
    return specs


def group_sizes(head_dim):
    """Every head-group size :func:`head_group` can pick: powers of two up to the m16 tile's 16
    rows on tensor cores (``GROUP_MMA_HEAD_DIMS``), else 1 .. ``GROUP_MAX_HEADS``."""
    if head_dim in cfg.GROUP_MMA_HEAD_DIMS:
        return list(cfg.GROUP_MMA_SIZES)
    return list(range(1, cfg.GROUP_MAX_HEADS + 1))


def group_tile(head_dim):
    """Keys per warp tile of the group kernel: 16 on tensor cores, else ``GROUP_KEYS_PER_LANE``
    per lane group."""
    if head_dim in cfg.GROUP_MMA_HEAD_DIMS:
        return 16
    return 32 // (head_dim // 8) * cfg.GROUP_KEYS_PER_LANE


def splits_for(pairs, pieces, sms, waves=None, resident=1):
    """Key splits of one row, over ``pairs`` (row, head group) CTAs that each hold ``pieces``
    32-key pieces at most and ``resident`` of which fit an SM at once: the count ``s`` that
    minimises the makespan ``rounds(s) * (ceil(pieces / s) + SPLIT_OVERHEAD_PIECES)``, with
    ``rounds(s) = ceil(pairs * s / (sms * resident))`` the waves of CTAs the launch runs in (a
    last wave that fills a third of the SMs costs as much as a full one), at most ``waves`` CTAs
    per SM (default ``WAVES``; the tuner's knob), ``MAX_SPLITS`` and one split per
    ``MIN_PIECES_PER_WARP`` pieces per warp. Ties take fewer splits (less to merge)."""
    waves = cfg.WAVES if waves is None else waves
    pairs = max(pairs, 1)
    cap = max(1, min(-(-waves * sms // pairs), -(-pieces // (cfg.MIN_PIECES_PER_WARP * cfg.ATTEND_WARPS)),
                     cfg.MAX_SPLITS))
    slots = max(sms * resident, 1)
    return min(range(1, cap + 1),
               key=lambda s: (-(-pairs * s // slots) * (-(-pieces // s) + cfg.SPLIT_OVERHEAD_PIECES), s))


def group_resident(head_dim, warps):
    """CTAs of the group kernel an SM holds at once (its launch bound): the tensor-core kernel's
    ``ATTEND_WARPS // warps``, the CUDA-core one's ``GROUP_MIN_CTAS``."""
    if head_dim in cfg.GROUP_MMA_HEAD_DIMS:
        return max(1, cfg.ATTEND_WARPS // warps)
    return cfg.GROUP_MIN_CTAS


def attend_launch(topk, nch, chunk, max_k, total_q, H, plan):
    """Which attend kernel a call runs and in how many key splits: ``(role, heads per CTA,
    splits)``. topk covering every chunk of the longest sequence: ``"group"`` (no scores, no
    selection, the heads of a KV head share what they read); chunks of ``GROUP_SELECT_MIN_CHUNK``
    keys and more, at most ``GROUP_MAX_CHUNKS`` of them: ``"group_select"`` (the union of the
    heads' selections read once); else ``"attend"``, one CTA per (row, head). The splits are
    sized by what a row can attend to at most (the group kernel's key tiles of ``plan.tile``
    keys, with selection whole tiles per chunk; the per-head kernel's 32-key pieces); each kernel
    then deals its row's actual work out evenly over them. Without ``plan.group_ok`` (too little
    shared memory) always ``"attend"``, which selects every chunk without reading scores when
    topk covers them."""
    group = topk >= nch or (chunk >= cfg.GROUP_SELECT_MIN_CHUNK and nch <= cfg.GROUP_MAX_CHUNKS)
    if group and plan.group_ok:
        role = "group" if topk >= nch else "group_select"
        gt = plan.group
        tiles = (-(-max_k // plan.tile) if role == "group"
                 else min(nch, gt * topk) * -(-chunk // plan.tile))
        splits = splits_for(total_q * H // gt, -(-tiles * plan.tile // cfg.KEYS_PER_PIECE), plan.sms,
                            plan.waves, plan.resident)
        return role, gt, splits
    pieces = min(topk, nch) * plan.per  # a row's 32-key pieces at most
    return "attend", 1, splits_for(total_q * H, pieces, plan.sms, plan.waves, cfg.ATTEND_MIN_CTAS)


_DEVICE: dict = {}
#: opt-in shared memory per block by compute capability, where the device properties lack it
_SMEM_OPTIN = {(8, 0): 166912, (8, 7): 166912, (9, 0): 232448, (10, 0): 232448}


def _device_info(dev):
    """``(SM count, opt-in shared memory per block in bytes, device index)`` of a CUDA device,
    cached."""
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    info = _DEVICE.get(idx)
    if info is None:
        prop = torch.cuda.get_device_properties(idx)
        smem = getattr(prop, "shared_memory_per_block_optin", None)
        if not smem:
            smem = _SMEM_OPTIN.get((prop.major, prop.minor), 101376)  # (sm86/89/120: 99 KB)
        info = _DEVICE[idx] = (common.sm_count(idx), int(smem), idx)
    return info


def group_smem_bytes(head_dim, group, stages=None, warps=None):
    """Shared memory of the group kernel (a bound: ring, query rows, states, selection)."""
    if head_dim in cfg.GROUP_MMA_HEAD_DIMS:  # per-warp K/V rings of 16-key tiles (the scores alias them)
        stages = cfg.GROUP_MMA_STAGES if stages is None else stages
        warps = cfg.GROUP_MMA_WARPS if warps is None else warps
        tile = 16 * (head_dim + 8) * 2
        return (warps * stages * 2 * tile + tile + 2 * group * warps * 4
                + (cfg.GROUP_MAX_CHUNKS + 1) * 4 + 5 * 128)
    ring = cfg.GROUP_STAGES * cfg.GROUP_KEYS_PER_LANE * 2 * 32 * cfg.ATTEND_WARPS * 16
    states = 2 * group * cfg.ATTEND_WARPS * (32 // (head_dim // 8)) * 4
    select = group * cfg.GROUP_MAX_CHUNKS * 4 + (cfg.GROUP_MAX_CHUNKS + 1) * 4
    return ring + group * head_dim * 4 + states + select + 6 * 128  # (+ alignment)


class DecodePlan:
    """The kernels of a decode call's shape key (not of the cache length, which grows every step:
    the chunk count and the key splits are computed per call)."""

    def __init__(self, key, arch):
        (self.dtype_name, self.B, self.max_q, self.H, self.Hk, self.D, self.C, self.K, self.causal, padded,
         self.sms, smem, self.device) = key
        self.group = head_group(self.H, self.Hk, self.D)
        # the group kernel's ring needs datacenter GPUs' shared memory (A100 and up); others
        # (99 KB per block: sm86/89/120) run the per-head kernel
        self.stages, self.warps = cfg.GROUP_MMA_STAGES, cfg.GROUP_MMA_WARPS
        self.group_ok = group_smem_bytes(self.D, self.group, self.stages, self.warps) <= smem
        self.resident = group_resident(self.D, self.warps)
        self.per = -(-self.C // cfg.KEYS_PER_PIECE)  # 32-key pieces per chunk (per-head kernel)
        self.tile = group_tile(self.D)  # keys per warp tile (group kernel)
        self.ks = common.KernelSet(kernel_specs(self.dtype_name, self.D, padded, self.causal, self.group,
                                                self.stages, self.warps), arch)
        # CTAs per SM the key splits aim for: the tuner's override, else the tuned table's entry
        # for the shape class ((query, head) rows: B * max_q * H), else WAVES
        self.shape_class = tuned.shape_class(self.dtype_name, self.D, self.causal, self.C, self.K,
                                             self.B * self.max_q * self.H)
        t = tuned.forced("decode", self.D)
        if t is None:
            t = tuned.lookup("decode", self.D, self.shape_class, self.device)
        self.waves = t[0] if t is not None else cfg.WAVES


DECODE_PLANS = common.PlanCache(DecodePlan)


@contextlib.contextmanager
def tile_override(tile):
    """Within the block, every decode call uses ``tile`` (``(waves,)``, one of the shipped
    ``decode`` candidates, configs/tuned.py) over the tuned tables: what the tuner times. Decode
    plans are dropped on entry and exit."""
    with tuned.forcing("decode", tile, cfg.SUPPORTED_HEAD_DIMS, DECODE_PLANS.clear):
        yield


def _strides(t, padded):
    """(batch, token, head) strides in elements, and whether the kernels can read ``t`` in place
    (16-byte aligned base, 16-byte multiples)."""
    if padded:
        sb, st, sh = t.stride(0), t.stride(1), t.stride(2)
    else:
        sb, st, sh = 0, t.stride(0), t.stride(1)
    ok = t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(x % 8 == 0 for x in (sb, st, sh))
    return (sb, st, sh), ok


def decode_cute(q, k, v, cu_q, cu_k, max_q, max_k, chunk_size, topk, causal, softmax_scale, padded,
                centroids=None):
    """The decode-step forward (see the module docstring): ``(out, lse)``. ``centroids``: the full
    chunks' centroids (fp32 ``(B, chunks, Hk, D)``, checked by the caller), read instead of K."""
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
    if total_q == 0:  # (B >= 1: the caller checked cu_seqlens)
        return out, lse
    strides = []
    tensors = []
    for t in (q, k, v):
        st, ok = _strides(t, padded)
        if not ok:  # (a copy, contiguous and 16-byte aligned)
            t = common.kernel_input(t)
            st, _ = _strides(t, padded)
        strides.append(st)
        tensors.append(t)
    q, k, v = tensors
    key = (_DTYPES[q.dtype], B, max_q, H, Hk, D, chunk_size, topk, causal, padded) + _device_info(dev)
    plan = DECODE_PLANS.get(key, key, common.arch_of(dev))
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    nch = max(1, -(-max_k // chunk_size))
    role, _, splits = attend_launch(topk, nch, chunk_size, max_k, total_q, H, plan)
    every = topk >= nch  # (no scores: the group kernel or the per-head one selects every chunk)
    # one fp32 workspace: chunk scores (B, max_q, H, chunks), then the splits' states
    nsc = 0 if every else B * max_q * H * nch
    npart = total_q * H * splits * (D + 2) if splits > 1 else 0
    work = torch.empty(max(nsc + npart, 1), dtype=torch.float32, device=dev)
    p_sc = work.data_ptr()
    stream = common.raw_stream(dev)
    pq, pk, pv = q.data_ptr(), k.data_ptr(), v.data_ptr()
    pcq, pck = cu_q.data_ptr(), cu_k.data_ptr()
    (qsb, qst, qsh), (ksb, kst, ksh), (vsb, vst, vsh) = strides
    ks = plan.ks
    if not every:
        if centroids is not None:
            role_s, pc, (csb, csj, csh) = "scores_cached", centroids.data_ptr(), centroids.stride()[:3]
        else:
            role_s, pc, (csb, csj, csh) = ("scores_wide" if chunk_size >= cfg.SCORE_WIDE_MIN_CHUNK else "scores"), 0, \
                (0, 0, 0)
        ks[role_s](pq, pk, pcq, pck, p_sc, pc, qsb, qst, qsh, ksb, kst, ksh, csb, csj, csh, B, H, Hk, total_q, total_k,
                   max_q, chunk_size, nch, 0, stream)
    p_ml = p_sc + 4 * nsc  # (max, sum) per (row, head, split); then the unnormalized outputs
    p_acc = p_ml + 4 * 2 * total_q * H * splits
    ks[role](
        pq, pk, pv, pcq, pck, p_sc, out.data_ptr(), lse.data_ptr(), p_ml, p_acc, qsb, qst, qsh, ksb, kst, ksh, vsb,
        vst, vsh, B, H, Hk, total_q, total_k, max_q, chunk_size, nch, topk, splits, float(scale * LOG2_E),
        stream)
    if splits > 1:
        ks["merge"](p_ml, p_acc, out.data_ptr(), lse.data_ptr(), H, total_q, splits, stream)
    return out, lse


def key_centroids_cute(k, cu_k, max_k, chunk_size, out, start_chunk, padded):
    """Write the means of the full chunks ``j >= start_chunk`` of every sequence's keys into
    ``out[b, j, hk, :]`` (fp32; the caller checked the shapes): the centroids :func:`decode_cute`
    reads with ``centroids``, summed as the step's 128-thread scores kernel sums them
    (``"centroids"`` mode): bitwise the same for chunks under ``SCORE_WIDE_MIN_CHUNK`` keys,
    fp32 rounding apart for longer ones (whose steps sum with 1024 threads)."""
    if padded:
        B, Hk, D = k.shape[0], k.shape[2], k.shape[3]
        total_k = B * k.shape[1]
    else:
        total_k, Hk, D = k.shape
        B = cu_k.numel() - 1
    nfull = max_k // chunk_size
    if nfull <= start_chunk or B == 0:
        return out
    st, ok = _strides(k, padded)
    if not ok:
        k = common.kernel_input(k)
        st, _ = _strides(k, padded)
    dev = k.device
    key = (_DTYPES[k.dtype], D, padded)
    ks = _CENTROID_KERNELS.get(key)
    if ks is None:
        ks = _CENTROID_KERNELS[key] = common.KernelSet(kernel_specs(_DTYPES[k.dtype], D, padded, True),
                                                       common.arch_of(dev))
    csb, csj, csh = out.stride()[:3]
    ksb, kst, ksh = st
    ks["centroids"](  # (128 threads: 1024 spill with the padded layout; a cache is built once)
        0, k.data_ptr(), cu_k.data_ptr(), cu_k.data_ptr(), 0, out.data_ptr(), 0, 0, 0, ksb, kst, ksh, csb, csj, csh,
        B, Hk, Hk, 0, total_k, 1, chunk_size, nfull, start_chunk, common.raw_stream(dev))
    return out


_CENTROID_KERNELS: dict = {}
