"""Decode-step MoBA forward (CuTe DSL): a few new queries per sequence against a long KV cache.

The general path (routing into a key-major index, then segment kernels) scales its index work
with the number of (chunk, head) segments, not with the rows: at one query per sequence its
seven routing launches and index passes cost more than dense attention over the whole cache.
Here two kernels do the step, reading K once and K/V only of the selected chunks:

* :class:`DecodeScoresKernel`, one CTA per (chunk, KV head, sequence): the chunk's centroid (fp32
  sum of its real keys in a fixed order, divided by its length: SPEC section 1.2) and its exact
  fp32 score with every query row of the sequence for the query heads of that KV head, written to
  ``scores[b, i, h, j]``. Cost: all of K once plus ``4 * rows * heads * chunks`` bytes. 128
  threads, or 1024 for long chunks (few CTAs). With the centroids cached
  (:func:`moba_cute.key_centroids`, written by this kernel's ``"centroids"`` mode) its
  ``"cached"`` mode reads ``4 * D`` bytes per full chunk and KV head instead, one warp per chunk.
* :class:`DecodeAttendKernel`, one CTA per (query row, head, key split): the selection (own chunk
  forced when causal; the best ``topk - 1`` past chunks by repeated arg-max over the scores in
  shared memory, NaN ranked as +inf, ties to the larger chunk: the reference's rule), then
  attention over the selected keys, split over the CTA's warps in 32-key pieces (each warp keeps
  an online softmax), merged in a fixed warp order (bitwise deterministic). Cost: the selected
  chunks' K and V once per (row, head).

* :class:`DecodeGroupKernel`, one CTA per (query row, group of ``GT`` query heads of one KV head,
  key split), reading each key and value row once for the group: when ``topk`` covers every
  chunk (dense layers, short caches: no scores, every visible key) and, after the scores, for
  long chunks (each head's selection, then the union of the group's chunks with per-head masks).
  K/V pieces are staged per lane with cp.async. :class:`DecodeGroupMmaKernel` is the same on
  tensor cores (mma.sync, up to 16 heads as the rows of an m16 tile) for head dims 32/64/128.
* :class:`DecodeMergeKernel` when a row's keys were split over several CTAs: the splits' states
  in split order.

Query, key and value are read in place through (batch, token, head) strides: the packed varlen
layout (``padded=False``: token ``cu_seqlens[b] + t``) and the padded one (``padded=True``:
``b * batch_stride + t * token_stride``), which covers transformers' ``(B, Hk, S, D)`` cache seen
as ``(B, S, Hk, D)`` without a copy. Output ``(total_q, H, D)`` and LSE ``(H, total_q)`` as the
other forward kernels write them; the attend kernels run one CTA per output row (and head, key
split), so every row is written. Cost model and figures: docs/design.md section 10.

Compile keys: ("decode_scores", dtype, D, padded, threads, mode), ("decode_attend", dtype, D,
padded, causal), ("decode_group", dtype, D, padded, causal, GT, select), ("decode_group_mma",
dtype, D, padded, causal, GT, select, stages, warps), ("decode_merge", dtype, D).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync
from cutlass.cute.nvgpu import warp as nvwarp

from ..configs.decode import (ATTEND_MIN_CTAS, ATTEND_V_UNROLL, ATTEND_WARPS, GROUP_KEYS_PER_LANE, GROUP_MAX_CHUNKS,
                              GROUP_MAX_HEADS, GROUP_MIN_CTAS, GROUP_STAGES, KEYS_PER_PIECE, MAX_CHUNKS, MAX_TOPK,
                              MERGE_THREADS, SCORE_UNROLL)
from .centroids import chunk_partial_sums, clamp_seq, find_segment
from .moba_fwd_sm80 import _as_a_operand, _mn_view, _online_softmax, _quad_sum

ATTEND_THREADS = 32 * ATTEND_WARPS
LN2 = 0.6931471805599453


def _g(ptr):
    return cute.make_tensor(ptr, cute.make_layout(1 << 30))


@cute.jit
def _warp_sum(x: Float32):
    for i in cutlass.range_constexpr(5):
        x = x + cute.arch.shuffle_sync_bfly(x, offset=16 >> i)
    return x


@cute.jit
def _warp_max(x: Float32):
    for i in cutlass.range_constexpr(5):
        x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=16 >> i))
    return x


@cute.jit
def _better(v: Float32, j: Int32, bv: Float32, bj: Int32):
    """Whether chunk ``j`` with score ``v`` ranks before chunk ``bj`` with ``bv`` (ties: larger
    index; ``bj == -1``: nothing yet)."""
    return (bj < 0) | (v > bv) | ((v == bv) & (j > bj))


@cute.jit
def _warp_argmax(v: Float32, j: Int32):
    for i in cutlass.range_constexpr(5):
        ov = cute.arch.shuffle_sync_bfly(v, offset=16 >> i)
        oj = cute.arch.shuffle_sync_bfly(j, offset=16 >> i)
        if (oj >= 0) & _better(ov, oj, v, j):
            v = ov
            j = oj
    return v, j


class DecodeScoresKernel:
    """Chunk centroids and their scores with the sequence's query rows (see the module doc).
    Grid (B, chunks, Hk); rows of the sequence past ``max_q`` are not scored.

    ``mode``: ``"scores"``, every chunk's centroid from K; ``"cached"``, the centroids of the
    sequence's full chunks (``j < len_k // chunk``) read from ``cent[b, j, hk, :]`` (fp32, element
    strides ``c_sb, c_sj, c_sh``), only a partial last chunk from K, ``cpw`` consecutive chunks
    per warp (grid (B, chunks / (warps * cpw), Hk): a CTA per chunk would spend its time starting
    up; a warp loads its chunks' centroids together and each query row once for all of them);
    ``"centroids"``, no scores: the means of full chunks ``j0 + blockIdx.y`` written to ``cent``
    (what ``"cached"`` reads)."""

    def __init__(self, dtype, head_dim: int, padded: bool, threads: int, mode: str = "scores", cpw: int = 1):
        assert head_dim % 32 == 0 and head_dim <= 256 and threads % 32 == 0
        assert mode in ("scores", "cached", "centroids")
        assert cpw >= 1 and (cpw == 1 or mode == "cached")
        self.CPW = int(cpw)
        self.dtype = dtype
        self.D = head_dim
        self.padded = padded
        self.threads = threads
        self.mode = mode
        self.CV = head_dim // 8  # threads per key row (16-byte pieces)
        self.R = threads // self.CV  # key rows summed side by side
        self.VEC = head_dim // 32  # query elements per lane in the dot products

    @cute.jit
    def __call__(self, q: cute.Pointer, k: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer,
                 scores: cute.Pointer, cent: cute.Pointer, q_sb: Int64, q_st: Int64, q_sh: Int64, k_sb: Int64,
                 k_st: Int64, k_sh: Int64, c_sb: Int64, c_sj: Int64, c_sh: Int64, B: Int32, H: Int32, Hk: Int32,
                 total_q: Int32, total_k: Int32, max_q: Int32, chunk: Int32, nchunks: Int32, j0: Int32,
                 stream: cuda.CUstream):
        gy = nchunks - j0
        if cutlass.const_expr(self.mode == "cached"):
            per_cta = self.threads // 32 * self.CPW
            gy = (gy + per_cta - 1) // per_cta
        self.kernel(q, k, cu_q, cu_k, scores, cent, q_sb, q_st, q_sh, k_sb, k_st, k_sh, c_sb, c_sj, c_sh, H, Hk,
                    total_q, total_k, max_q, chunk, nchunks, j0).launch(grid=(B, gy, Hk), block=(self.threads, 1, 1),
                                                                         stream=stream)

    @cute.jit
    def chunk_mean(self, k: cute.Pointer, kp: Int64, k_st: Int64, length: Int32, sred: cute.Tensor,
                   scent: cute.Tensor, tid: Int32):
        """``scent`` = the fp32 mean of ``length`` key rows from ``kp`` (stride ``k_st``), summed in
        a fixed order: ``CV`` threads per row, ``R`` rows side by side, then over the ``R`` partial
        sums. Contains barriers."""
        D, CV, R = self.D, self.CV, self.R
        ty = tid // CV
        cv = tid - ty * CV
        # (strides and offsets are whole 16-byte pieces: the host checks the strides)
        chunk_partial_sums(k + cute.assume(kp + Int64(cv * 8), divby=8), k_st, length, ty, cv, R, D, SCORE_UNROLL,
                           sred)
        cute.arch.sync_threads()
        for d in cutlass.range(tid, D, self.threads):
            s = Float32(0.0)
            for r in cutlass.range_constexpr(R):
                s = s + sred[r * D + d]
            scent[d] = s / Float32(length)
        cute.arch.sync_threads()

    @cute.kernel
    def kernel(self, q: cute.Pointer, k: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer, scores: cute.Pointer,
               cent: cute.Pointer, q_sb: Int64, q_st: Int64, q_sh: Int64, k_sb: Int64, k_st: Int64, k_sh: Int64,
               c_sb: Int64, c_sj: Int64, c_sh: Int64, H: Int32, Hk: Int32, total_q: Int32, total_k: Int32,
               max_q: Int32, chunk: Int32, nchunks: Int32, j0: Int32):
        tid, _, _ = cute.arch.thread_idx()
        b, jy, hk = cute.arch.block_idx()
        lane = tid % 32
        warp = tid // 32
        j = jy + j0
        D = self.D
        VEC = self.VEC
        smem = cutlass.utils.SmemAllocator()
        sred = smem.allocate_tensor(Float32, cute.make_layout(self.R * D), 16)  # (up to 64 KB)
        scent = smem.allocate_tensor(Float32, cute.make_layout(D), 16)

        qs, qe = clamp_seq(cu_q, b, total_q)
        ks, ke = clamp_seq(cu_k, b, total_k)
        nq = cutlass.min(qe - qs, max_q)
        kst = Int64(j) * Int64(chunk)
        length = Int32(cutlass.max(cutlass.min(Int64(ke - ks) - kst, Int64(chunk)), Int64(0)))
        qbase, kbase = token_bases(qs, ks, self.padded)
        kp = Int64(b) * k_sb + (kbase + kst) * k_st + Int64(hk) * k_sh
        cp = Int64(b) * c_sb + Int64(j) * c_sj + Int64(hk) * c_sh
        if cutlass.const_expr(self.mode == "centroids"):
            if length == chunk:  # full chunks only
                self.chunk_mean(k, kp, k_st, length, sred, scent, tid)
                for d in cutlass.range(tid, D, self.threads):
                    _g(cent)[cp + Int64(d)] = scent[d]
        elif cutlass.const_expr(self.mode == "cached"):
            self.cached_scores(q, k, scores, cent, q_sb, q_st, q_sh, k_sb, k_st, k_sh, c_sb, c_sj, c_sh, H, Hk,
                               max_q, chunk, nchunks, j0, b, jy, hk, nq, ks, ke, qbase, kbase, sred, scent, tid)
        else:
            G = H // Hk
            cen = cute.make_rmem_tensor(cute.make_layout(VEC), Float32)
            live = (length > 0) & (nq > 0)
            if live:
                self.chunk_mean(k, kp, k_st, length, sred, scent, tid)
                for e in cutlass.range_constexpr(VEC):
                    cen[e] = scent[lane * VEC + e]
            if live:
                # one warp per (query row, query head of this KV head): exact fp32 dot products
                for r in cutlass.range(warp, nq * G, self.threads // 32, unroll=1):
                    i = r // G
                    h = hk * G + (r - i * G)
                    qp = q + cute.assume(Int64(b) * q_sb + (qbase + Int64(i)) * q_st + Int64(h) * q_sh, divby=8)
                    qv = cute.make_tensor((qp + Int64(lane * VEC)).align(VEC * 2),
                                          cute.make_layout(VEC)).load().to(Float32)
                    part = Float32(0.0)
                    for e in cutlass.range_constexpr(VEC):
                        part = part + qv[e] * cen[e]
                    tot = _warp_sum(part)
                    if lane == 0:
                        _g(scores)[((Int64(b) * Int64(max_q) + Int64(i)) * Int64(H) + Int64(h)) * Int64(nchunks)
                                   + Int64(j)] = tot

    @cute.jit
    def cached_scores(self, q: cute.Pointer, k: cute.Pointer, scores: cute.Pointer, cent: cute.Pointer, q_sb: Int64,
                      q_st: Int64, q_sh: Int64, k_sb: Int64, k_st: Int64, k_sh: Int64, c_sb: Int64, c_sj: Int64,
                      c_sh: Int64, H: Int32, Hk: Int32, max_q: Int32, chunk: Int32, nchunks: Int32, j0: Int32,
                      b: Int32, jy: Int32, hk: Int32, nq: Int32, ks: Int32, ke: Int32, qbase: Int64, kbase: Int64,
                      sred: cute.Tensor, scent: cute.Tensor, tid: Int32):
        """``"cached"`` mode: warp ``w`` scores chunks ``jb + w * CPW ..`` (``CPW`` of them) with
        every (query row, query head of KV head ``hk``) pair of sequence ``b``: the centroids
        read from the cache (a partial last chunk summed from K by the CTA), each query row
        loaded once for all of the warp's chunks (exact fp32 dot products)."""
        D, VEC, CPW = self.D, self.VEC, self.CPW
        NW = self.threads // 32
        lane = tid % 32
        warp = tid // 32
        G = H // Hk
        lk = ke - ks
        jb = j0 + jy * (NW * CPW)  # this CTA's chunks: [jb, jb + NW * CPW)
        jw = jb + warp * CPW
        # a partial last chunk among this CTA's chunks: the CTA sums it from K (CTA-uniform branch)
        jp = lk // chunk
        if (lk - jp * chunk > 0) & (jp >= jb) & (jp < jb + NW * CPW) & (nq > 0):
            kpp = Int64(b) * k_sb + (kbase + Int64(jp) * Int64(chunk)) * k_st + Int64(hk) * k_sh
            self.chunk_mean(k, kpp, k_st, lk - jp * chunk, sred, scent, tid)
        cen = cute.make_rmem_tensor(cute.make_layout((VEC, CPW)), Float32)
        live = cute.make_rmem_tensor(cute.make_layout(CPW), Int32)
        any_live = Int32(0)
        for c in cutlass.range_constexpr(CPW):
            jc = jw + c
            length = Int32(cutlass.max(cutlass.min(Int64(lk) - Int64(jc) * Int64(chunk), Int64(chunk)), Int64(0)))
            live[c] = Int32(0)
            for e in cutlass.range_constexpr(VEC):
                cen[e, c] = Float32(0.0)
            if (jc < nchunks) & (length > 0) & (nq > 0):
                live[c] = Int32(1)
                any_live = Int32(1)
                if length == chunk:
                    cp = Int64(b) * c_sb + Int64(jc) * c_sj + Int64(hk) * c_sh
                    for e in cutlass.range_constexpr(VEC):
                        cen[e, c] = _g(cent)[cp + Int64(lane * VEC + e)]
                else:
                    for e in cutlass.range_constexpr(VEC):
                        cen[e, c] = scent[lane * VEC + e]
        if any_live != 0:
            for r in cutlass.range(nq * G, unroll=1):
                i = r // G
                h = hk * G + (r - i * G)
                qp = q + cute.assume(Int64(b) * q_sb + (qbase + Int64(i)) * q_st + Int64(h) * q_sh, divby=8)
                qv = cute.make_tensor((qp + Int64(lane * VEC)).align(VEC * 2), cute.make_layout(VEC)).load().to(Float32)
                sbase = ((Int64(b) * Int64(max_q) + Int64(i)) * Int64(H) + Int64(h)) * Int64(nchunks) + Int64(jw)
                for c in cutlass.range_constexpr(CPW):
                    part = Float32(0.0)
                    for e in cutlass.range_constexpr(VEC):
                        part = part + qv[e] * cen[e, c]
                    tot = _warp_sum(part)
                    if (lane == 0) & (live[c] != 0):
                        _g(scores)[sbase + Int64(c)] = tot


@cute.jit
def split_range(sp: Int32, splits: Int32, n: Int32):
    """Split ``sp``'s share ``[lo, hi)`` of a row's ``n`` work units: ``splits`` near-equal
    ranges of the row's actual work (the host sizes ``splits`` by the most a row can have), so no
    split idles while another takes a whole extra wave."""
    lo = Int32((Int64(sp) * Int64(n)) // Int64(splits))
    hi = Int32((Int64(sp + 1) * Int64(n)) // Int64(splits))
    return lo, hi


@cute.jit
def token_bases(qs: Int32, ks: Int32, padded: cutlass.Constexpr):
    """Token offsets of a sequence's first query and key: its ``cu_seqlens`` starts (varlen), or 0
    (padded: the batch stride places the sequence)."""
    qbase = Int64(qs)
    kbase = Int64(ks)
    if cutlass.const_expr(padded):
        qbase = Int64(0)
        kbase = Int64(0)
    return qbase, kbase


@cute.jit
def selection_bounds(p: Int32, lk: Int32, chunk: Int32, nchunks: Int32, topk: Int32, valid, causal: cutlass.Constexpr):
    """A row's selection (SPEC 1.3) for the query at key position ``p`` of a sequence of ``lk``
    keys: ``(ncand, take, own)``, the best ``take`` of candidate chunks ``[0, ncand)`` and
    ``own = 1`` when the own chunk ``p // chunk`` is forced in (causal, ``p >= 0``). Rows that
    are not ``valid`` select nothing."""
    nch = cutlass.min((lk + chunk - 1) // chunk, nchunks)
    ncand = nch
    take = cutlass.min(topk, nch)
    own = Int32(0)
    if cutlass.const_expr(causal):
        ncand = cutlass.min(cutlass.max(p, Int32(0)) // chunk, nch)
        take = cutlass.min(topk - 1, ncand)
        own = cutlass.select_(valid & (p >= 0), Int32(1), Int32(0))
        if p < 0:
            ncand = Int32(0)
            take = Int32(0)
    return cutlass.select_(valid, ncand, Int32(0)), cutlass.select_(valid, take, Int32(0)), own


@cute.jit
def locate_row(cu_q: cute.Pointer, cu_k: cute.Pointer, B: Int32, r: Int32, total_q: Int32, total_k: Int32,
               max_q: Int32, padded: cutlass.Constexpr):
    """Output row ``r``: its sequence ``b`` and index ``i`` there, the sequence's query count
    ``nq`` and key count ``lk``, the token offsets of its first query and key (0 when
    ``padded``: the batch stride places them), and whether ``r`` is a row the call computes
    (inside a clamped sequence, ``i < max_q``); other rows (only with invalid ``cu_seqlens`` /
    ``max_seqlen_q``) get 0 and -inf."""
    b = find_segment(cu_q, B, r)
    qs, qe = clamp_seq(cu_q, b, total_q)
    ks, ke = clamp_seq(cu_k, b, total_k)
    i = r - qs
    valid = (r >= qs) & (r < qe) & (i < max_q)
    qbase, kbase = token_bases(qs, ks, padded)
    return b, i, qe - qs, ke - ks, qbase, kbase, valid


@cute.jit
def merge_states(tm: cute.Tensor, tl: cute.Tensor, tacc: cute.Tensor, n: Int32, D: cutlass.Constexpr, tid: Int32,
                 nthreads: cutlass.Constexpr, out: cute.Pointer, lse: cute.Pointer, row: Int64, h: Int32, H: Int32,
                 total_q: Int32, dtype: cutlass.Constexpr):
    """Merge ``n`` online-softmax states (log2-domain max ``tm[s]``, sum ``tl[s]``, unnormalized
    ``tacc[s * D + d]``) in order ``s = 0 .. n-1`` and write the row's output and LSE (a state
    with nothing attended has ``tm = -inf``, ``tl = 0``; an empty row gets 0 and -inf, a NaN
    sum propagates)."""
    M = -Float32.inf
    for s in cutlass.range(n, unroll=8):
        M = cute.arch.fmax(M, tm[s])
    M_use = cutlass.select_(M == -Float32.inf, Float32(0.0), M)
    L = Float32(0.0)
    for s in cutlass.range(n, unroll=8):
        L = L + tl[s] * cute.math.exp2(tm[s] - M_use, fastmath=True)
    live = (L > Float32(0.0)) | (L != L)
    inv = Float32(0.0)
    if live:
        inv = cute.arch.rcp_approx(L)
    for d in cutlass.range(tid, D, nthreads, unroll=1):
        o = Float32(0.0)
        for s in cutlass.range(n, unroll=8):  # (loads in flight: the states may be in L2)
            o = o + tacc[s * D + d] * cute.math.exp2(tm[s] - M_use, fastmath=True)
        _g(out)[(row * Int64(H) + Int64(h)) * Int64(D) + Int64(d)] = (o * inv).to(dtype)
    if tid == 0:
        val = -Float32.inf
        if live:
            val = (M_use + cute.math.log2(L, fastmath=False)) * LN2
        _g(lse)[Int64(h) * Int64(total_q) + row] = val


@cute.jit
def store_state(tm: cute.Tensor, tl: cute.Tensor, tacc: cute.Tensor, n: Int32, D: cutlass.Constexpr, tid: Int32,
                nthreads: cutlass.Constexpr, part_ml: cute.Pointer, part_acc: cute.Pointer, pidx: Int64):
    """``n`` states (as for :func:`merge_states`) merged in order into one unnormalized state,
    written as split ``pidx``'s (max, sum) and output for :class:`DecodeMergeKernel`."""
    M = -Float32.inf
    for s in cutlass.range(n, unroll=8):
        M = cute.arch.fmax(M, tm[s])
    M_use = cutlass.select_(M == -Float32.inf, Float32(0.0), M)
    for d in cutlass.range(tid, D, nthreads, unroll=1):
        o = Float32(0.0)
        for s in cutlass.range(n, unroll=8):  # (loads in flight: the states may be in L2)
            o = o + tacc[s * D + d] * cute.math.exp2(tm[s] - M_use, fastmath=True)
        _g(part_acc)[pidx * Int64(D) + Int64(d)] = o
    if tid == 0:
        L = Float32(0.0)
        for s in cutlass.range(n, unroll=8):
            L = L + tl[s] * cute.math.exp2(tm[s] - M_use, fastmath=True)
        _g(part_ml)[pidx * Int64(2)] = M
        _g(part_ml)[pidx * Int64(2) + Int64(1)] = L


class _AttendLaunch:
    """The attend kernels' host entry (one argument list for all): grid (total_q, H / GT,
    splits) of ``THREADS``, ``MIN_CTAS`` CTAs per SM as the launch bound."""

    GT = 1  # query heads per CTA
    MIN_CTAS = ATTEND_MIN_CTAS
    NW = ATTEND_WARPS  # warps per CTA
    THREADS = ATTEND_THREADS

    @cute.jit
    def __call__(self, q: cute.Pointer, k: cute.Pointer, v: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer,
                 scores: cute.Pointer, out: cute.Pointer, lse: cute.Pointer, part_ml: cute.Pointer,
                 part_acc: cute.Pointer, q_sb: Int64, q_st: Int64, q_sh: Int64, k_sb: Int64, k_st: Int64,
                 k_sh: Int64, v_sb: Int64, v_st: Int64, v_sh: Int64, B: Int32, H: Int32, Hk: Int32, total_q: Int32,
                 total_k: Int32, max_q: Int32, chunk: Int32, nchunks: Int32, topk: Int32, splits: Int32,
                 scale_log2: Float32, stream: cuda.CUstream):
        self.kernel(q, k, v, cu_q, cu_k, scores, out, lse, part_ml, part_acc, q_sb, q_st, q_sh, k_sb, k_st, k_sh,
                    v_sb, v_st, v_sh, B, H, Hk, total_q, total_k, max_q, chunk, nchunks, topk, splits,
                    scale_log2, *self.extras()).launch(grid=(total_q, H // self.GT, splits),
                                                       block=(self.THREADS, 1, 1), stream=stream,
                                                       min_blocks_per_mp=self.MIN_CTAS, preferred_smem_carveout=100)

    def extras(self):
        """Kernel arguments past the common list (built at trace time)."""
        return ()


class DecodeAttendKernel(_AttendLaunch):
    """Selection and attention of one (output row, head, key split) per CTA (see the module
    doc), grid (total_q, H, splits); the row's sequence comes from a binary search of
    ``cu_seqlens_q``. The selected chunks' 32-key pieces are numbered slot by slot; split ``sp``
    takes its even share of them (:func:`split_range`), dealt round-robin to its warps (lane ``t`` scores
    key ``t`` of a piece from its whole row, then every lane accumulates ``D / 32`` output
    elements from each value row). One split: the CTA writes ``out``/``lse``; several: its merged
    state goes to ``part_ml`` (max, sum) / ``part_acc`` (unnormalized output) for
    :class:`DecodeMergeKernel`. Every split recomputes the selection (a few microseconds, the
    scores are in L2)."""

    def __init__(self, dtype, head_dim: int, padded: bool, causal: bool):
        assert head_dim % 32 == 0 and head_dim <= 256
        self.dtype = dtype
        self.D = head_dim
        self.padded = padded
        self.causal = causal
        self.VEC = head_dim // 32  # output elements per lane
        self.PIECES = head_dim // 8  # 16-byte pieces of a key row

    @cute.jit
    def attend_piece(self, k: cute.Pointer, v: cute.Pointer, krow0: Int64, vrow0: Int64, k_st: Int64, v_st: Int64,
                     t0: Int32, nkeys: Int32, sq: cute.Tensor, lane: Int32, m: cute.Tensor, lsum: cute.Tensor,
                     acc: cute.Tensor):
        """Online softmax of one warp over keys ``t0 .. t0 + nkeys - 1`` (``1 <= nkeys <= 32``;
        state ``m[0]``, ``lsum[0]``, ``acc``): lane ``t`` loads key ``t0 + t`` and computes its
        score, then every lane accumulates its ``D / 32`` output elements from each value row.
        ``krow0`` / ``vrow0``: element offsets of key 0 of this KV head."""
        VEC = self.VEC
        t = t0 + cutlass.min(lane, nkeys - 1)  # (lanes past the end re-read the last key)
        kp = k + cute.assume(krow0 + Int64(t) * k_st, divby=8)
        kr = cute.make_rmem_tensor(cute.make_layout((8, self.PIECES)), self.dtype)
        for c in cutlass.range_constexpr(self.PIECES):
            kr[None, c].store(cute.make_tensor(kp + c * 8, cute.make_layout(8)).load())
        # the score, one key piece after the other (its registers free up as it is used)
        s = Float32(0.0)
        kf = cute.make_rmem_tensor(cute.make_layout(8), Float32)
        for c in cutlass.range_constexpr(self.PIECES):
            kf.store(kr[None, c].load().to(Float32))
            for e in cutlass.range_constexpr(8):
                s = s + sq[c * 8 + e] * kf[e]
        if lane >= nkeys:
            s = -Float32.inf
        m_new = cute.arch.fmax(m[0], _warp_max(s))
        m_use = cutlass.select_(m_new == -Float32.inf, Float32(0.0), m_new)
        corr = cute.math.exp2(m[0] - m_use, fastmath=True)
        p = cute.math.exp2(s - m_use, fastmath=True)
        lsum[0] = lsum[0] * corr + p
        acc.store(acc.load() * corr)
        m[0] = m_new
        for kk in cutlass.range(nkeys, unroll=ATTEND_V_UNROLL):
            vp = v + cute.assume(vrow0 + Int64(t0 + kk) * v_st, divby=8)
            vv = cute.make_tensor((vp + lane * VEC).align(VEC * 2), cute.make_layout(VEC)).load().to(Float32)
            acc.store(acc.load() + cute.arch.shuffle_sync(p, kk) * vv)

    @cute.jit
    def finish(self, m: cute.Tensor, lsum: cute.Tensor, acc: cute.Tensor, sm: cute.Tensor, sl: cute.Tensor,
               sacc: cute.Tensor, tid: Int32, r: Int32, h: Int32, H: Int32, total_q: Int32, splits: Int32, sp: Int32,
               out: cute.Pointer, lse: cute.Pointer, part_ml: cute.Pointer, part_acc: cute.Pointer):
        """The warps' states into shared memory (warp ``w``: ``sm[w]``, ``sl[w]``, ``sacc[w * D +
        d]``), then merged in warp order into row ``r``'s output (one split) or stored as split
        ``sp``'s state. Contains barriers."""
        D = self.D
        VEC = self.VEC
        NW = ATTEND_WARPS
        lane = tid % 32
        warp = tid // 32
        tot = _warp_sum(lsum[0])
        if lane == 0:
            sm[warp] = m[0]
            sl[warp] = tot
        for e in cutlass.range_constexpr(VEC):
            sacc[warp * D + lane * VEC + e] = acc[e]
        cute.arch.sync_threads()
        row = Int64(r)
        if splits == 1:
            merge_states(sm, sl, sacc, Int32(NW), D, tid, ATTEND_THREADS, out, lse, row, h, H, total_q, self.dtype)
        else:
            store_state(sm, sl, sacc, Int32(NW), D, tid, ATTEND_THREADS, part_ml, part_acc,
                        (row * Int64(H) + Int64(h)) * Int64(splits) + Int64(sp))

    @cute.jit
    def select(self, scores: cute.Pointer, srow: Int64, ncand: Int32, take: Int32, first: Int32, ssc: cute.Tensor,
               sarg: cute.Tensor, ssel: cute.Tensor, tid: Int32):
        """The ``take`` best of chunks ``[0, ncand)`` into ``ssel[first:]`` (all of them when
        ``take == ncand``). Contains barriers; the caller syncs before reading ``ssel``."""
        lane = tid % 32
        warp = tid // 32
        if take >= ncand:
            for c in cutlass.range(tid, ncand, ATTEND_THREADS, unroll=1):
                ssel[first + c] = c
        else:
            gs = _g(scores)
            for c in cutlass.range(tid, ncand, ATTEND_THREADS, unroll=1):
                x = gs[srow + Int64(c)]
                ssc[c] = cutlass.select_(x != x, Float32.inf, x)  # NaN ranks as +inf
            # a thread only reads the entries c == tid (mod threads), which it loaded and marks
            # taken itself, so one barrier per round (for the warp results) suffices
            for rnd in cutlass.range(take, unroll=1):
                bv = -Float32.inf
                bj = Int32(-1)
                for c in cutlass.range(tid, ncand, ATTEND_THREADS, unroll=1):
                    x = ssc[c]
                    if (x == x) & _better(x, c, bv, bj):
                        bv = x
                        bj = c
                bv, bj = _warp_argmax(bv, bj)
                par = (rnd % 2) * ATTEND_WARPS
                if lane == 0:
                    sarg[2 * (par + warp)] = bv
                    sarg[2 * (par + warp) + 1] = Float32(bj)  # (exact: chunk ids < 2^24)
                cute.arch.sync_threads()
                wv = -Float32.inf
                wj = Int32(-1)
                for w in cutlass.range_constexpr(ATTEND_WARPS):
                    ov = sarg[2 * (par + w)]
                    oj = Int32(sarg[2 * (par + w) + 1])
                    if (oj >= 0) & _better(ov, oj, wv, wj):
                        wv = ov
                        wj = oj
                if wj >= 0:
                    if wj % ATTEND_THREADS == tid:
                        ssc[wj] = Float32.nan  # taken
                if tid == 0:
                    ssel[first + rnd] = wj

    @cute.kernel
    def kernel(self, q: cute.Pointer, k: cute.Pointer, v: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer,
               scores: cute.Pointer, out: cute.Pointer, lse: cute.Pointer, part_ml: cute.Pointer,
               part_acc: cute.Pointer, q_sb: Int64, q_st: Int64, q_sh: Int64, k_sb: Int64, k_st: Int64, k_sh: Int64,
               v_sb: Int64, v_st: Int64, v_sh: Int64, B: Int32, H: Int32, Hk: Int32, total_q: Int32,
               total_k: Int32, max_q: Int32, chunk: Int32, nchunks: Int32, topk: Int32, splits: Int32,
               scale_log2: Float32):
        tid, _, _ = cute.arch.thread_idx()
        r, h, sp = cute.arch.block_idx()
        NW = ATTEND_WARPS
        lane = tid % 32
        warp = tid // 32
        smem = cutlass.utils.SmemAllocator()
        ssc = smem.allocate_tensor(Float32, cute.make_layout(MAX_CHUNKS), 16)
        sarg = smem.allocate_tensor(Float32, cute.make_layout(4 * NW), 16)
        ssel = smem.allocate_tensor(Int32, cute.make_layout(MAX_TOPK), 16)
        sq = smem.allocate_tensor(Float32, cute.make_layout(self.D), 16)  # the query row, log2 domain
        sm = smem.allocate_tensor(Float32, cute.make_layout(NW), 16)  # the warps' states
        sl = smem.allocate_tensor(Float32, cute.make_layout(NW), 16)
        sacc = smem.allocate_tensor(Float32, cute.make_layout(NW * self.D), 16)

        # every row writes its output: rows outside the sequences get 0 and -inf
        b, i, nq, lk, qbase, kbase, valid = locate_row(cu_q, cu_k, B, r, total_q, total_k, max_q, self.padded)
        hk = h // (H // Hk)
        # selection: slots [0, first + take); causal: slot 0 is the own chunk
        p = i + lk - nq  # the query's key position (bottom-right aligned)
        ncand, take, first = selection_bounds(p, lk, chunk, nchunks, topk, valid, self.causal)
        if (first != 0) & (tid == 0):
            ssel[0] = p // chunk
        nslots = first + take
        srow = ((Int64(b) * Int64(max_q) + Int64(i)) * Int64(H) + Int64(h)) * Int64(nchunks)
        self.select(scores, srow, ncand, take, first, ssc, sarg, ssel, tid)
        if valid:
            qp = q + cute.assume(Int64(b) * q_sb + (qbase + Int64(i)) * q_st + Int64(h) * q_sh, divby=8)
            for x in cutlass.range(tid, self.D, ATTEND_THREADS, unroll=1):
                sq[x] = _g(qp)[x].to(Float32) * scale_log2
        cute.arch.sync_threads()

        # this split's 32-key pieces of the selected chunks, round-robin over the warps
        krow0 = Int64(b) * k_sb + kbase * k_st + Int64(hk) * k_sh
        vrow0 = Int64(b) * v_sb + kbase * v_st + Int64(hk) * v_sh
        per = (chunk + KEYS_PER_PIECE - 1) // KEYS_PER_PIECE
        lo, hi = split_range(sp, splits, nslots * per)
        m = cute.make_rmem_tensor(cute.make_layout(1), Float32)
        lsum = cute.make_rmem_tensor(cute.make_layout(1), Float32)
        acc = cute.make_rmem_tensor(cute.make_layout(self.VEC), Float32)
        m.fill(-Float32.inf)
        lsum.fill(0.0)
        acc.fill(0.0)
        for it in cutlass.range(lo + warp, hi, NW, unroll=1):
            s = it // per
            c0 = ssel[s] * chunk
            t0 = c0 + (it - s * per) * KEYS_PER_PIECE
            end = cutlass.min(c0 + chunk, lk)
            if cutlass.const_expr(self.causal):
                end = cutlass.min(end, p + 1)
            nkeys = cutlass.min(end - t0, Int32(KEYS_PER_PIECE))
            if nkeys > 0:
                self.attend_piece(k, v, krow0, vrow0, k_st, v_st, t0, nkeys, sq, lane, m, lsum, acc)

        self.finish(m, lsum, acc, sm, sl, sacc, tid, r, h, H, total_q, splits, sp, out, lse, part_ml, part_acc)


class DecodeGroupKernel(_AttendLaunch):
    """The ``GT`` query heads of one KV head per CTA (grid (total_q, H / GT, splits), 8 warps),
    reading each key and value row once for all of them. ``select=False`` (``topk`` covers every
    chunk of the longest sequence: dense layers, short caches): every visible key. ``select=True``
    (large chunks, few of them): warp ``g`` selects head ``g``'s chunks (the per-head rule, in
    warp-wide arg-max rounds), warp 0 lists the union of the heads' selections in chunk order with
    each chunk's head mask, and the CTA attends over the union's keys, each head masked to its own
    chunks (the bytes of the union, not of each head's selection).

    Key rows are split over lanes: ``LPR = D / 8`` lanes hold 16 bytes each of one key, ``RW =
    32 / LPR`` keys per warp step. Each lane copies its own pieces of the next tile into a private
    shared-memory ring of ``GROUP_STAGES`` tiles (``GROUP_KEYS_PER_LANE`` keys per lane group)
    with cp.async while it computes on the current one (no barriers: a lane reads back only what
    it copied), and keeps its 8 dims of every
    head's query (fp32, log2 domain) and output state in registers; a key's scores are summed over
    its ``LPR`` lanes by butterfly shuffles. Tiles of ``T = RW * U`` keys are dealt round-robin to
    the warps, split ``sp`` taking its even share of them (:func:`split_range`); each lane group keeps an
    online softmax, and the ``8 * RW`` states per head merge in a fixed order (bitwise
    deterministic). Outputs and split states as :class:`DecodeAttendKernel`'s."""

    MIN_CTAS = GROUP_MIN_CTAS

    def __init__(self, dtype, head_dim: int, padded: bool, causal: bool, group: int, select: bool):
        assert head_dim % 32 == 0 and head_dim <= 256 and 1 <= group <= GROUP_MAX_HEADS
        self.dtype = dtype
        self.D = head_dim
        self.padded = padded
        self.causal = causal
        self.GT = group
        self.select = select
        self.LPR = head_dim // 8  # lanes per key row
        self.RW = 32 // self.LPR  # key rows per warp step
        self.U = GROUP_KEYS_PER_LANE
        self.T = self.RW * self.U  # keys per warp tile
        self.S = GROUP_STAGES
        self.NS = ATTEND_WARPS * self.RW  # online-softmax states per head
        self.RING = self.S * self.U * 2 * ATTEND_THREADS * 8  # ring elements (K and V pieces)
        # the merge reuses the ring for the states' outputs
        assert self.GT * self.NS * self.D * 4 <= self.RING * 2

    @cute.jit
    def select_head(self, scores: cute.Pointer, srow: Int64, ncand: Int32, take: Int32, ssc: cute.Tensor, base: Int32,
                    lane: Int32):
        """One warp: the best ``take`` of chunks ``[0, ncand)`` by the scores at ``srow``, marked
        taken (NaN) in ``ssc[base + c]`` (all of them when ``take >= ncand``). Lane ``c % 32`` owns
        entry ``c``: it loads it, ranks it and marks it, so no barrier is needed."""
        gs = _g(scores)
        for c in cutlass.range(lane, ncand, 32, unroll=1):
            x = gs[srow + Int64(c)]
            ssc[base + c] = cutlass.select_(x != x, Float32.inf, x)  # NaN ranks as +inf
            if take >= ncand:
                ssc[base + c] = Float32.nan
        if take < ncand:
            for rnd in cutlass.range(take, unroll=1):
                bv = -Float32.inf
                bj = Int32(-1)
                for c in cutlass.range(lane, ncand, 32, unroll=1):
                    x = ssc[base + c]
                    if (x == x) & _better(x, c, bv, bj):
                        bv = x
                        bj = c
                bv, bj = _warp_argmax(bv, bj)
                if bj >= 0:
                    if bj % 32 == lane:
                        ssc[base + bj] = Float32.nan

    @cute.jit
    def union(self, scores: cute.Pointer, srow0: Int64, nchunks: Int32, ncand: Int32, take: Int32, own: Int32,
              ssc: cute.Tensor, slist: cute.Tensor, tid: Int32):
        """Head ``g``'s best ``take`` of chunks ``[0, ncand)`` (warp ``g % NW``; scores of head
        ``g`` at ``srow0 + g * nchunks``), then the union over the heads (plus the own chunk
        ``ncand`` when ``own``) into ``slist`` in chunk order as ``chunk * 65536 + head mask``;
        returns its length. Contains barriers."""
        lane = tid % 32
        warp = tid // 32
        MC = GROUP_MAX_CHUNKS
        for g in cutlass.range_constexpr(self.GT):
            if warp == g % self.NW:
                self.select_head(scores, srow0 + Int64(g) * Int64(nchunks), ncand, take, ssc, g * MC, lane)
        cute.arch.sync_threads()
        n = ncand + cutlass.select_(own != 0, Int32(1), Int32(0))
        if warp == 0:
            count = Int32(0)
            below = cute.arch.lanemask_lt()
            for base in cutlass.range(0, n, 32, unroll=1):
                c = base + lane
                bits = Int32(0)
                if c < ncand:
                    for g in cutlass.range_constexpr(self.GT):
                        x = ssc[g * MC + c]
                        bits = bits | cutlass.select_(x != x, Int32(1 << g), Int32(0))
                elif c < n:
                    bits = Int32((1 << self.GT) - 1)  # the own chunk: every head
                ball = cute.arch.vote_ballot_sync(bits != 0)
                if bits != 0:
                    slist[count + cute.arch.popc(Int32(ball & Int32(below)))] = c * 65536 + bits
                count = count + cute.arch.popc(ball)
            if lane == 0:
                slist[MC] = count
        cute.arch.sync_threads()
        return slist[MC]

    @cute.jit
    def row_tiles(self, cu_q: cute.Pointer, cu_k: cute.Pointer, scores: cute.Pointer, B: Int32, H: Int32, Hk: Int32,
                  total_q: Int32, total_k: Int32, max_q: Int32, chunk: Int32, nchunks: Int32, topk: Int32, r: Int32,
                  h0: Int32, ssc: cute.Tensor, slist: cute.Tensor, tid: Int32):
        """Output row ``r``'s sequence, its KV head, the end of its visible keys and the CTA's key
        tiles: every visible key, or (select) the union's chunks, ``tps`` tiles each (the last one
        only up to the visible end). Every row writes its output: rows outside the sequences get 0
        and -inf (``valid`` false, no tiles)."""
        b, i, nq, lk, qbase, kbase, valid = locate_row(cu_q, cu_k, B, r, total_q, total_k, max_q, self.padded)
        hk = h0 // (H // Hk)
        p = i + lk - nq  # the query's key position (bottom-right aligned)
        end = lk  # visible keys [0, end)
        if cutlass.const_expr(self.causal):
            end = cutlass.max(cutlass.min(p + 1, lk), Int32(0))
        end = cutlass.select_(valid, end, Int32(0))
        ntiles = (end + self.T - 1) // self.T
        tps = (chunk + self.T - 1) // self.T
        if cutlass.const_expr(self.select):
            ncand, take, own = selection_bounds(p, lk, chunk, nchunks, topk, valid, self.causal)
            srow0 = ((Int64(b) * Int64(max_q) + Int64(i)) * Int64(H) + Int64(h0)) * Int64(nchunks)
            n = self.union(scores, srow0, nchunks, ncand, take, own, ssc, slist, tid)
            ntiles = n * tps
            if n > 0:  # only the last chunk of the list can end early: the own chunk (causal), or
                # the sequence's last one; its tiles past the visible end are not dealt out
                c0 = (slist[n - 1] >> 16) * chunk
                last = cutlass.max(cutlass.min(c0 + chunk, end) - c0, Int32(0))
                ntiles = (n - 1) * tps + (last + self.T - 1) // self.T
        return b, i, lk, qbase, kbase, valid, hk, end, ntiles, tps

    @cute.jit
    def warp_tiles(self, b: Int32, kbase: Int64, hk: Int32, k_sb: Int64, k_st: Int64, k_sh: Int64, v_sb: Int64,
                   v_st: Int64, v_sh: Int64, sp: Int32, splits: Int32, ntiles: Int32, warp: Int32):
        """The row's K and V bases, split ``sp``'s first tile, this warp's tile count (the split's
        share of the row's ``ntiles`` tiles, :func:`split_range`, round-robin over the warps) and
        the 16-byte cp.async atom."""
        krow0 = Int64(b) * k_sb + kbase * k_st + Int64(hk) * k_sh
        vrow0 = Int64(b) * v_sb + kbase * v_st + Int64(hk) * v_sh
        lo, hi = split_range(sp, splits, ntiles)
        nw = cutlass.max((hi - lo - warp + self.NW - 1) // self.NW, Int32(0))
        atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), self.dtype,
                                   num_bits_per_copy=128)
        return krow0, vrow0, lo, nw, atom

    @cute.jit
    def write_heads(self, sm: cute.Tensor, sl: cute.Tensor, sacc: cute.Tensor, n: cutlass.Constexpr, tid: Int32,
                    r: Int32, h0: Int32, H: Int32, total_q: Int32, splits: Int32, sp: Int32, out: cute.Pointer,
                    lse: cute.Pointer, part_ml: cute.Pointer, part_acc: cute.Pointer):
        """Each head's ``n`` states (``sm``/``sl``/``sacc``, head-major) merged in order into its
        output row, or into the split's state when the row has several splits."""
        row = Int64(r)
        for g in cutlass.range_constexpr(self.GT):
            tm = cute.make_tensor(sm.iterator + g * n, cute.make_layout(n))
            tl = cute.make_tensor(sl.iterator + g * n, cute.make_layout(n))
            tacc = cute.make_tensor(sacc.iterator + g * n * self.D, cute.make_layout(n * self.D))
            if splits == 1:
                merge_states(tm, tl, tacc, Int32(n), self.D, tid, self.THREADS, out, lse, row, h0 + g, H, total_q,
                             self.dtype)
            else:
                store_state(tm, tl, tacc, Int32(n), self.D, tid, self.THREADS, part_ml, part_acc,
                            (row * Int64(H) + Int64(h0 + g)) * Int64(splits) + Int64(sp))

    @cute.jit
    def tile_keys(self, tile: Int32, end: Int32, chunk: Int32, tps: Int32, slist: cute.Tensor):
        """Tile ``tile``'s first token, the end of its visible keys and the mask of heads that
        attend to them (select: a chunk of the union takes ``tps`` tiles, the last one padded)."""
        tbase = tile * self.T
        limit = end
        bits = Int32((1 << self.GT) - 1)
        if cutlass.const_expr(self.select):
            slot = tile // tps
            ent = slist[cutlass.min(slot, Int32(GROUP_MAX_CHUNKS - 1))]
            c0 = (ent >> 16) * chunk
            tbase = c0 + (tile - slot * tps) * self.T
            limit = cutlass.min(c0 + chunk, end)
            bits = ent & 65535
        return tbase, limit, bits

    @cute.jit
    def issue(self, k: cute.Pointer, v: cute.Pointer, krow0: Int64, vrow0: Int64, k_st: Int64, v_st: Int64,
              tile: Int32, stage: Int32, end: Int32, chunk: Int32, tps: Int32, slist: cute.Tensor, ring: cute.Tensor,
              tid: Int32, atom: cutlass.Constexpr):
        """This lane's K and V pieces of ``tile`` into ring ``stage`` (cp.async; keys past the end
        copy key 0, masked later)."""
        lane = tid % 32
        kg = lane // self.LPR
        dx = lane - kg * self.LPR
        tbase, limit, _ = self.tile_keys(tile, end, chunk, tps, slist)
        for u in cutlass.range_constexpr(self.U):
            t = tbase + u * self.RW + kg
            t = cutlass.select_(t < limit, t, Int32(0))
            slot = cute.assume(((stage * self.U + u) * 2 * ATTEND_THREADS + tid) * 8, divby=8)
            cute.copy(atom, cute.make_tensor(k + cute.assume(krow0 + Int64(t) * k_st + Int64(dx * 8), divby=8),
                                             cute.make_layout(8)),
                      cute.make_tensor(ring.iterator + slot, cute.make_layout(8)))
            cute.copy(atom, cute.make_tensor(v + cute.assume(vrow0 + Int64(t) * v_st + Int64(dx * 8), divby=8),
                                             cute.make_layout(8)),
                      cute.make_tensor(ring.iterator + slot + ATTEND_THREADS * 8, cute.make_layout(8)))

    @cute.jit
    def compute(self, tile: Int32, stage: Int32, end: Int32, chunk: Int32, tps: Int32, slist: cute.Tensor,
                ring: cute.Tensor, qr: cute.Tensor, m: cute.Tensor, lsum: cute.Tensor, acc: cute.Tensor, tid: Int32):
        """The online-softmax step of this lane group over its ``U`` keys of ``tile`` (ring
        ``stage``), for every head."""
        GT, U = self.GT, self.U
        lane = tid % 32
        kg = lane // self.LPR
        s = cute.make_rmem_tensor(cute.make_layout((U, GT)), Float32)
        tbase, limit, tbits = self.tile_keys(tile, end, chunk, tps, slist)
        for u in cutlass.range_constexpr(U):
            bits = cutlass.select_(tbase + u * self.RW + kg < limit, tbits, Int32(0))
            slot = cute.assume(((stage * U + u) * 2 * ATTEND_THREADS + tid) * 8, divby=8)
            kf = cute.make_tensor(ring.iterator + slot, cute.make_layout(8)).load().to(Float32)
            for g in cutlass.range_constexpr(GT):
                part = Float32(0.0)
                for e in cutlass.range_constexpr(8):
                    part = part + qr[e, g] * kf[e]
                for i in cutlass.range_constexpr(self.LPR.bit_length() - 1):  # sum over the row's lanes
                    part = part + cute.arch.shuffle_sync_bfly(part, offset=self.LPR >> (i + 1))
                s[u, g] = cutlass.select_(((bits >> g) & 1) != 0, part, -Float32.inf)
        # scores -> probabilities (s reused), states rescaled
        for g in cutlass.range_constexpr(GT):
            mt = s[0, g]
            for u in cutlass.range_constexpr(1, U):
                mt = cute.arch.fmax(mt, s[u, g])
            m_new = cute.arch.fmax(m[g], mt)
            m_use = cutlass.select_(m_new == -Float32.inf, Float32(0.0), m_new)
            corr = cute.math.exp2(m[g] - m_use, fastmath=True)
            acc[None, g].store(acc[None, g].load() * corr)
            ls = lsum[g] * corr
            for u in cutlass.range_constexpr(U):
                s[u, g] = cute.math.exp2(s[u, g] - m_use, fastmath=True)
                ls = ls + s[u, g]
            lsum[g] = ls
            m[g] = m_new
        for u in cutlass.range_constexpr(U):
            slot = cute.assume(((stage * U + u) * 2 * ATTEND_THREADS + tid) * 8 + ATTEND_THREADS * 8, divby=8)
            vf = cute.make_tensor(ring.iterator + slot, cute.make_layout(8)).load().to(Float32)
            for g in cutlass.range_constexpr(GT):
                acc[None, g].store(acc[None, g].load() + s[u, g] * vf)

    @cute.kernel
    def kernel(self, q: cute.Pointer, k: cute.Pointer, v: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer,
               scores: cute.Pointer, out: cute.Pointer, lse: cute.Pointer, part_ml: cute.Pointer,
               part_acc: cute.Pointer, q_sb: Int64, q_st: Int64, q_sh: Int64, k_sb: Int64, k_st: Int64, k_sh: Int64,
               v_sb: Int64, v_st: Int64, v_sh: Int64, B: Int32, H: Int32, Hk: Int32, total_q: Int32,
               total_k: Int32, max_q: Int32, chunk: Int32, nchunks: Int32, topk: Int32, splits: Int32,
               scale_log2: Float32):
        tid, _, _ = cute.arch.thread_idx()
        r, hg, sp = cute.arch.block_idx()
        GT, D, NW, NS, S = self.GT, self.D, ATTEND_WARPS, self.NS, self.S
        lane = tid % 32
        warp = tid // 32
        kg = lane // self.LPR
        dx = lane - kg * self.LPR
        smem = cutlass.utils.SmemAllocator()
        ring = smem.allocate_tensor(self.dtype, cute.make_layout(self.RING), 16)
        sq = smem.allocate_tensor(Float32, cute.make_layout(GT * D), 16)
        sm = smem.allocate_tensor(Float32, cute.make_layout(GT * NS), 16)
        sl = smem.allocate_tensor(Float32, cute.make_layout(GT * NS), 16)
        ssc = None
        slist = None
        if cutlass.const_expr(self.select):
            ssc = smem.allocate_tensor(Float32, cute.make_layout(GT * GROUP_MAX_CHUNKS), 16)
            slist = smem.allocate_tensor(Int32, cute.make_layout(GROUP_MAX_CHUNKS + 1), 16)

        h0 = hg * GT  # the group's first query head (GT divides H / Hk: one KV head)
        b, i, lk, qbase, kbase, valid, hk, end, ntiles, tps = self.row_tiles(
            cu_q, cu_k, scores, B, H, Hk, total_q, total_k, max_q, chunk, nchunks, topk, r, h0, ssc, slist, tid)
        if valid:
            for x in cutlass.range(tid, GT * D, ATTEND_THREADS, unroll=1):
                g = x // D
                qp = q + cute.assume(Int64(b) * q_sb + (qbase + Int64(i)) * q_st + Int64(h0 + g) * q_sh, divby=8)
                sq[x] = _g(qp)[x - g * D].to(Float32) * scale_log2
        cute.arch.sync_threads()
        qr = cute.make_rmem_tensor(cute.make_layout((8, GT)), Float32)
        for g in cutlass.range_constexpr(GT):
            for e in cutlass.range_constexpr(8):
                qr[e, g] = sq[g * D + dx * 8 + e]
        m = cute.make_rmem_tensor(cute.make_layout(GT), Float32)
        lsum = cute.make_rmem_tensor(cute.make_layout(GT), Float32)
        acc = cute.make_rmem_tensor(cute.make_layout((8, GT)), Float32)
        m.fill(-Float32.inf)
        lsum.fill(0.0)
        acc.fill(0.0)

        krow0, vrow0, lo, nw, atom = self.warp_tiles(b, kbase, hk, k_sb, k_st, k_sh, v_sb, v_st, v_sh, sp, splits,
                                                     ntiles, warp)
        for st in cutlass.range_constexpr(S - 1):
            if st < nw:
                self.issue(k, v, krow0, vrow0, k_st, v_st, lo + warp + st * NW, Int32(st), end, chunk, tps, slist,
                           ring, tid, atom)
            cute.arch.cp_async_commit_group()
        for j in cutlass.range(nw, unroll=1):
            jn = j + S - 1
            if jn < nw:
                self.issue(k, v, krow0, vrow0, k_st, v_st, lo + warp + jn * NW, jn % S, end, chunk, tps, slist, ring,
                           tid, atom)
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(S - 1)
            self.compute(lo + warp + j * NW, j % S, end, chunk, tps, slist, ring, qr, m, lsum, acc, tid)
        cute.arch.cp_async_wait_group(0)
        cute.arch.sync_threads()  # (the ring becomes the states' outputs)

        sacc = cute.make_tensor(cute.recast_ptr(ring.iterator, dtype=Float32), cute.make_layout(GT * NS * D))
        sidx = warp * self.RW + kg
        for g in cutlass.range_constexpr(GT):
            if dx == 0:
                sm[g * NS + sidx] = m[g]
                sl[g * NS + sidx] = lsum[g]
            for e in cutlass.range_constexpr(8):
                sacc[(g * NS + sidx) * D + dx * 8 + e] = acc[e, g]
        cute.arch.sync_threads()
        self.write_heads(sm, sl, sacc, NS, tid, r, h0, H, total_q, splits, sp, out, lse, part_ml, part_acc)


class DecodeGroupMmaKernel(DecodeGroupKernel):
    """:class:`DecodeGroupKernel` on tensor cores (mma.sync m16n8k16), for up to 16 query heads
    of one KV head per CTA (the rows of the m16 tile; rows past ``GT`` are zero and masked).
    Each warp takes 16-key tiles (round-robin over the CTA's tiles, as the CUDA-core kernel's
    warps do), copies them into its own two-stage K/V ring with cp.async (warp barriers only),
    computes ``S = Q K^T`` and ``O += P V`` with ldmatrix'd fragments, as the sm80 forward does,
    and keeps an online softmax per row; the 8 warps' states merge in warp order. Selection,
    union and tile numbering as :class:`DecodeGroupKernel`'s (``T = 16``)."""

    def __init__(self, dtype, head_dim: int, padded: bool, causal: bool, group: int, select: bool, stages: int,
                 warps: int = ATTEND_WARPS):
        assert head_dim in (32, 64, 128) and 1 <= group <= 16 and stages >= 2 and warps in (4, 8)
        self.NW = warps
        self.THREADS = 32 * warps
        self.MIN_CTAS = ATTEND_WARPS // warps  # (the CUDA-core kernel's one CTA of 8 warps per SM)
        self.dtype = dtype
        self.D = head_dim
        self.padded = padded
        self.causal = causal
        self.GT = group
        self.select = select
        self.T = 16  # keys per warp tile
        self.S = stages  # ring stages per warp (stages - 1 tiles in flight while one is used)
        self.DP = head_dim + 8  # padded smem rows: conflict-free ldmatrix without swizzle
        self.TILE = self.T * self.DP  # elements of one K (or V) tile
        self.RING = self.NW * self.S * 2 * self.TILE
        # (the ring also holds the selection's scores, then the warps' output states)
        assert self.GT * GROUP_MAX_CHUNKS * 4 <= self.RING * 2
        assert self.GT * self.NW * self.D * 4 <= self.RING * 2

    def extras(self):
        """The m16n8k16 MMA the kernel partitions its fragments by."""
        return (cute.make_tiled_mma(nvwarp.MmaF16BF16Op(self.dtype, Float32, (16, 8, 16)), (1, 1, 1),
                                    permutation_mnk=(16, 16, 16)),)

    @cute.jit
    def issue_mma(self, k: cute.Pointer, v: cute.Pointer, krow0: Int64, vrow0: Int64, k_st: Int64, v_st: Int64,
                  tile: Int32, sK: cute.Tensor, sV: cute.Tensor, end: Int32, chunk: Int32, tps: Int32,
                  slist: cute.Tensor, lane: Int32, atom: cutlass.Constexpr):
        """The warp's cp.async copies of ``tile``'s 16 K and V rows into ``sK``/``sV`` (keys past
        the tile's visible end copy key 0, masked later)."""
        CV = self.D // 8
        tbase, limit, _ = self.tile_keys(tile, end, chunk, tps, slist)
        for it in cutlass.range_constexpr(self.T * CV // 32):
            idx = lane + it * 32
            rr = idx // CV
            cv = idx - rr * CV
            t = tbase + rr
            t = cutlass.select_(t < limit, t, Int32(0))
            dst = cute.assume(rr * self.DP + cv * 8, divby=8)
            cute.copy(atom, cute.make_tensor(k + cute.assume(krow0 + Int64(t) * k_st + Int64(cv * 8), divby=8),
                                             cute.make_layout(8)),
                      cute.make_tensor(sK.iterator + dst, cute.make_layout(8)))
            cute.copy(atom, cute.make_tensor(v + cute.assume(vrow0 + Int64(t) * v_st + Int64(cv * 8), divby=8),
                                             cute.make_layout(8)),
                      cute.make_tensor(sV.iterator + dst, cute.make_layout(8)))

    @cute.kernel
    def kernel(self, q: cute.Pointer, k: cute.Pointer, v: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer,
               scores: cute.Pointer, out: cute.Pointer, lse: cute.Pointer, part_ml: cute.Pointer,
               part_acc: cute.Pointer, q_sb: Int64, q_st: Int64, q_sh: Int64, k_sb: Int64, k_st: Int64, k_sh: Int64,
               v_sb: Int64, v_st: Int64, v_sh: Int64, B: Int32, H: Int32, Hk: Int32, total_q: Int32,
               total_k: Int32, max_q: Int32, chunk: Int32, nchunks: Int32, topk: Int32, splits: Int32,
               scale_log2: Float32, tiled_mma: cute.TiledMma):
        tid, _, _ = cute.arch.thread_idx()
        r, hg, sp = cute.arch.block_idx()
        GT, D, NW, T, DP = self.GT, self.D, self.NW, self.T, self.DP
        dt = self.dtype
        lane = tid % 32
        warp = tid // 32
        smem = cutlass.utils.SmemAllocator()
        ring = smem.allocate_tensor(dt, cute.make_layout(self.RING), 16)
        sQ = smem.allocate_tensor(dt, cute.make_layout((16, D), stride=(DP, 1)), 16)
        sm = smem.allocate_tensor(Float32, cute.make_layout(GT * NW), 16)
        sl = smem.allocate_tensor(Float32, cute.make_layout(GT * NW), 16)
        ringf = cute.make_tensor(cute.recast_ptr(ring.iterator, dtype=Float32), cute.make_layout(self.RING // 2))
        slist = None
        if cutlass.const_expr(self.select):
            slist = smem.allocate_tensor(Int32, cute.make_layout(GROUP_MAX_CHUNKS + 1), 16)

        h0 = hg * GT
        b, i, lk, qbase, kbase, valid, hk, end, ntiles, tps = self.row_tiles(
            cu_q, cu_k, scores, B, H, Hk, total_q, total_k, max_q, chunk, nchunks, topk, r, h0, ringf, slist, tid)
        # the query rows (unscaled: the scores are scaled in fp32), zero past the group
        for x in cutlass.range(tid, 16 * D, self.THREADS, unroll=1):
            g = x // D
            d = x - g * D
            val = dt(0.0)
            if valid & (g < GT):
                qp = q + cute.assume(Int64(b) * q_sb + (qbase + Int64(i)) * q_st + Int64(h0 + g) * q_sh, divby=8)
                val = _g(qp)[d]
            sQ[g, d] = val
        cute.arch.sync_threads()  # (also: the selection's scores in the ring are consumed)

        thr_mma = tiled_mma.get_slice(lane)
        kv_layout = cute.make_layout((T, D), stride=(DP, 1))
        sK0 = cute.make_tensor(ring.iterator, kv_layout)
        sVt0 = cute.composition(sK0, cute.make_layout((D, T), stride=(T, 1)))
        tSrQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ))
        tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(sK0))
        tOrVt = thr_mma.make_fragment_B(thr_mma.partition_B(sVt0))
        acc_O = cute.make_rmem_tensor(thr_mma.partition_shape_C((16, D)), Float32)
        acc_S = cute.make_rmem_tensor(thr_mma.partition_shape_C((16, T)), Float32)
        ld = cute.make_copy_atom(nvwarp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dt)
        ldt = cute.make_copy_atom(nvwarp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4), dt)
        s2r_Q = cute.make_tiled_copy_A(ld, tiled_mma).get_slice(lane)
        s2r_K = cute.make_tiled_copy_B(ld, tiled_mma).get_slice(lane)
        s2r_V = cute.make_tiled_copy_B(ldt, tiled_mma).get_slice(lane)
        tSsQ = s2r_Q.partition_S(sQ)
        tSrQ_v = s2r_Q.retile(tSrQ)
        tSrK_v = s2r_K.retile(tSrK)
        tOrVt_v = s2r_V.retile(tOrVt)
        for kb in cutlass.range_constexpr(cute.size(tSsQ.shape[2])):
            cute.copy(s2r_Q, tSsQ[None, None, kb], tSrQ_v[None, None, kb])
        acc_O_mn = _mn_view(acc_O)
        acc_S_mn = _mn_view(acc_S)
        tOcO_mn = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((16, D))))
        tScS_mn = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((16, T))))
        NR = cute.size(acc_O_mn, mode=[0])  # rows per thread (2)
        NCO = cute.size(acc_O_mn, mode=[1])
        NCS = cute.size(acc_S_mn, mode=[1])
        row_max = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
        row_sum = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
        acc_O.fill(0.0)
        row_max.fill(-Float32.inf)
        row_sum.fill(0.0)

        krow0, vrow0, lo, nw, atom = self.warp_tiles(b, kbase, hk, k_sb, k_st, k_sh, v_sb, v_st, v_sh, sp, splits,
                                                     ntiles, warp)
        wbase = warp * (self.S * 2 * self.TILE)  # the warp's ring: stage s holds K at 2s, V at 2s + 1
        # tiles j + 1 .. j + S - 1 in flight while tile j is used (one commit group per tile, empty
        # past the warp's last, so that wait_group(S - 1) always means "tile j has landed")
        for j0 in cutlass.range_constexpr(self.S - 1):
            if j0 < nw:
                nb = wbase + j0 * 2 * self.TILE
                self.issue_mma(k, v, krow0, vrow0, k_st, v_st, lo + warp + j0 * NW,
                               cute.make_tensor(ring.iterator + cute.assume(nb, divby=8), kv_layout),
                               cute.make_tensor(ring.iterator + cute.assume(nb + self.TILE, divby=8), kv_layout),
                               end, chunk, tps, slist, lane, atom)
            cute.arch.cp_async_commit_group()
        for j in cutlass.range(nw, unroll=1):
            tile = lo + warp + j * NW
            if j + self.S - 1 < nw:
                nb = wbase + ((j + self.S - 1) % self.S) * 2 * self.TILE
                self.issue_mma(k, v, krow0, vrow0, k_st, v_st, tile + (self.S - 1) * NW,
                               cute.make_tensor(ring.iterator + cute.assume(nb, divby=8), kv_layout),
                               cute.make_tensor(ring.iterator + cute.assume(nb + self.TILE, divby=8), kv_layout),
                               end, chunk, tps, slist, lane, atom)
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(self.S - 1)
            cute.arch.sync_warp()
            cb = wbase + (j % self.S) * 2 * self.TILE
            sKc = cute.make_tensor(ring.iterator + cute.assume(cb, divby=8), kv_layout)
            sVc = cute.make_tensor(ring.iterator + cute.assume(cb + self.TILE, divby=8), kv_layout)
            tSsK = s2r_K.partition_S(sKc)
            tOsVt = s2r_V.partition_S(cute.composition(sVc, cute.make_layout((D, T), stride=(T, 1))))
            # S = Q K^T
            acc_S.fill(0.0)
            nk = cute.size(tSsK.shape[2])
            cute.copy(s2r_K, tSsK[None, None, 0], tSrK_v[None, None, 0])
            for kb in cutlass.range_constexpr(nk):
                if cutlass.const_expr(kb + 1 < nk):
                    cute.copy(s2r_K, tSsK[None, None, kb + 1], tSrK_v[None, None, kb + 1])
                cute.gemm(tiled_mma, acc_S, tSrQ[None, None, kb], tSrK[None, None, kb], acc_S)
            # mask: keys past the tile's visible end, heads that did not select its chunk
            tbase, limit, bits = self.tile_keys(tile, end, chunk, tps, slist)
            nvis = limit - tbase
            for rr in cutlass.range_constexpr(NR):
                g = tOcO_mn[rr, 0][0]
                off = ((bits >> g) & 1) == 0
                for c in cutlass.range_constexpr(NCS):
                    if off | (tScS_mn[0, c][1] >= nvis):
                        acc_S_mn[rr, c] = -Float32.inf
            # online softmax (rows: heads)
            _online_softmax(acc_S_mn, acc_O_mn, row_max, row_sum, scale_log2)
            # O += P V
            tOrP = _as_a_operand(acc_S, dt)
            nkv = cute.size(tOrP.shape[2])
            cute.copy(s2r_V, tOsVt[None, None, 0], tOrVt_v[None, None, 0])
            for kb in cutlass.range_constexpr(nkv):
                if cutlass.const_expr(kb + 1 < nkv):
                    cute.copy(s2r_V, tOsVt[None, None, kb + 1], tOrVt_v[None, None, kb + 1])
                cute.gemm(tiled_mma, acc_O, tOrP[None, None, kb], tOrVt[None, None, kb], acc_O)
            cute.arch.sync_warp()  # (the stage is refilled next iteration)
        cute.arch.cp_async_wait_group(0)
        cute.arch.sync_threads()  # (the ring becomes the states' outputs)

        # the warps' states (log2-domain max, sum, unnormalized output) per head, merged in warp order
        for rr in cutlass.range_constexpr(NR):
            row_sum[rr] = _quad_sum(row_sum[rr])
            g = tOcO_mn[rr, 0][0]
            if g < GT:
                if lane % 4 == 0:
                    sm[g * NW + warp] = row_max[rr] * scale_log2
                    sl[g * NW + warp] = row_sum[rr]
                for c in cutlass.range_constexpr(NCO):
                    ringf[(g * NW + warp) * D + tOcO_mn[rr, c][1]] = acc_O_mn[rr, c]
        cute.arch.sync_threads()
        self.write_heads(sm, sl, ringf, NW, tid, r, h0, H, total_q, splits, sp, out, lse, part_ml, part_acc)


class DecodeMergeKernel:
    """The splits' states of every (row, head) merged in split order into ``out``/``lse``.
    Grid (total_q, H), one CTA of ``MERGE_THREADS``."""

    def __init__(self, dtype, head_dim: int):
        self.dtype = dtype
        self.D = head_dim

    @cute.jit
    def __call__(self, part_ml: cute.Pointer, part_acc: cute.Pointer, out: cute.Pointer, lse: cute.Pointer, H: Int32,
                 total_q: Int32, splits: Int32, stream: cuda.CUstream):
        self.kernel(part_ml, part_acc, out, lse, H, total_q, splits).launch(
            grid=(total_q, H, 1), block=(MERGE_THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, part_ml: cute.Pointer, part_acc: cute.Pointer, out: cute.Pointer, lse: cute.Pointer, H: Int32,
               total_q: Int32, splits: Int32):
        tid, _, _ = cute.arch.thread_idx()
        r, h, _ = cute.arch.block_idx()
        row = Int64(r)
        base = (row * Int64(H) + Int64(h)) * Int64(splits)
        tm = cute.make_tensor(part_ml + base * Int64(2), cute.make_layout(1 << 20, stride=2))
        tl = cute.make_tensor(part_ml + base * Int64(2) + Int64(1), cute.make_layout(1 << 20, stride=2))
        tacc = _g(part_acc + base * Int64(self.D))
        merge_states(tm, tl, tacc, splits, self.D, tid, MERGE_THREADS, out, lse, row, h, H, total_q, self.dtype)
