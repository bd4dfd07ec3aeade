"""Per-slot key-major index for the slot-pass MoBA forward, and the all-slot pair lists of
the sm90 segment forward (CuTe DSL).

For every gather pass ``s' = s - s0`` (``s0 = 1`` causal: slot 0, the own chunk, is handled by
the dense diagonal pass; ``s0 = 0`` non-causal) the slot-pass forward needs the rows that chose
each (global chunk g, head h) in routing slot ``s``. Segments are numbered
``seg' = s' * nseg + g * H + h`` (``nseg = num_chunks_bound * H``), so one pass's segments are
contiguous.

:class:`SlotIndexKernel` runs one thread per (row, head) and is launched twice:

* ``scatter=False``: ``nused[row, head]`` = number of leading usable slots (``0 <= chunk <
  chunks of the row's sequence``; the first unusable slot ends the list), ``counts[seg'] += 1``
  for every gather slot (integer atomics: counts are exact), and rows that no other kernel
  writes get ``out = 0``, ``lse = -inf``: non-causal, rows with no usable slot; causal, rows
  outside every sequence (only garbage ``cu_seqlens`` leave such rows; the diagonal pass covers
  the rows of every sequence).
* ``scatter=True``: after :class:`SlotScanKernel` turned ``counts`` into the segments' start
  offsets (the cursor), ``rows_list[atomic_add(counts[seg'], 1)] = row``.

A call builds the index with four launches, no PyTorch op between them (docs/design.md, "Host
path"): :class:`SlotPrepKernel` (zero the counts; causal: the diagonal pass's query-tile
offsets), count, :class:`SlotScanKernel` (segment and tile offsets, the tile -> segment table,
each pass's tile range), scatter.

The order of rows inside a segment depends on timing, but the forward's result for a row does
not depend on its place in a tile, so the output is still bitwise deterministic. Everything is
clamped: garbage ``cu_seqlens`` cannot make it write out of bounds.

The sm90 segment forward (``merged``) takes one segment per (global chunk, head) for all gather
slots. Its lists come from the routing's own key-major index, which already holds every
segment's rows in ascending order: :class:`PairListKernel` (one CTA per segment) turns each
entry into the pair index the segment kernel writes its partial to, with no global atomics
(on the H200 the atomic count and scatter passes took 1.5 ms at 64K flashmoba, contending on
~1000 increments per segment counter). The count pass then only writes ``nused`` and the empty
rows. Its segment counts are in KV-head-major order and its pair indices head-major, so that
the scan, run with one "pass" per window of KV heads, gives each window of the forward its
own tile range and pair range.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Float32, Int32, Int64

from .centroids import block_exclusive_scan, clamp_seq, find_segment

THREADS = 256
SCAN_THREADS = 512
SCAN_ITEMS = 4  # consecutive counts per thread and step of the single-CTA scan


def _t(ptr):
    return cute.make_tensor(ptr, cute.make_layout(1 << 30))


class SlotIndexKernel:
    """Compile key: ("slotidx", scatter, causal, dtype_name, head_dim[, "merged"]).

    ``merged=True`` (the sm90 segment forward, :mod:`moba_cute.kernels.moba_fwd_sm90`): the
    count pass alone, without segment counts (:class:`PairListKernel` builds the lists)."""

    def __init__(self, scatter: bool, causal: bool, dtype, head_dim: int, merged: bool = False):
        assert not (merged and scatter), "the merged lists come from PairListKernel"
        self.merged = bool(merged)
        self.scatter = bool(scatter)
        self.causal = bool(causal)
        self.dtype = dtype
        self.D = head_dim
        self.nthr = THREADS

    @cute.jit
    def __call__(
        self,
        sel: cute.Pointer,
        cu_q: cute.Pointer,
        cu_chunks: cute.Pointer,
        counts: cute.Pointer,
        rows_list: cute.Pointer,
        nused: cute.Pointer,
        out: cute.Pointer,
        lse: cute.Pointer,
        B: Int32,
        total_q: Int32,
        H: Int32,
        topk: Int32,
        nseg: Int32,
        nblocks: Int32,
        stream: cuda.CUstream,
    ):
        self.kernel(sel, cu_q, cu_chunks, counts, rows_list, nused, out, lse, B, total_q, H, topk, nseg).launch(
            grid=(nblocks, 1, 1), block=(self.nthr, 1, 1), stream=stream
        )

    @cute.kernel
    def kernel(
        self,
        sel: cute.Pointer,
        cu_q: cute.Pointer,
        cu_chunks: cute.Pointer,
        counts: cute.Pointer,
        rows_list: cute.Pointer,
        nused: cute.Pointer,
        out: cute.Pointer,
        lse: cute.Pointer,
        B: Int32,
        total_q: Int32,
        H: Int32,
        topk: Int32,
        nseg: Int32,
    ):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        idx = bid * self.nthr + tid
        s0 = 1 if cutlass.const_expr(self.causal) else 0
        if idx < total_q * H:
            i = idx // H
            h = idx - i * H
            tsel = _t(sel + Int64(idx) * Int64(topk))
            tcc = _t(cu_chunks)
            b = find_segment(cu_q, B, i)
            qs, qe = clamp_seq(cu_q, b, total_q)
            nb = Int32(0)
            cc0 = Int32(0)
            if (i >= qs) & (i < qe):
                cc0 = tcc[b]
                nb = tcc[b + 1] - cc0
            nu = Int32(0)
            if nb > 0:  # (rows outside every sequence: garbage cu_seqlens; routing never wrote their slots)
                for s in cutlass.range(topk):
                    j = tsel[s]
                    if (nu == s) & (j >= 0) & (j < nb):
                        nu = nu + 1
            if cutlass.const_expr(not self.scatter):
                _t(nused)[idx] = nu
                empty = nu == 0
                if cutlass.const_expr(self.causal):
                    empty = (i < qs) | (i >= qe)  # the diagonal pass writes every row of a sequence
                if empty:
                    D = self.D
                    tout = cute.make_tensor(out + Int64(idx) * Int64(D), cute.make_layout(D))
                    for d in cutlass.range(D):
                        tout[d] = self.dtype(0.0)
                    _t(lse)[Int64(h) * Int64(total_q) + Int64(i)] = -Float32.inf
            if cutlass.const_expr(not self.merged):
                for s in cutlass.range(s0, nu):
                    seg = (cc0 + tsel[s]) * H + h + (s - s0) * nseg
                    if cutlass.const_expr(self.scatter):
                        pos = cute.arch.atomic_add((counts + seg).llvm_ptr, Int32(1))
                        _t(rows_list)[pos] = i
                    else:
                        cute.arch.atomic_add((counts + seg).llvm_ptr, Int32(1))


class PairListKernel:
    """The sm90 segment forward's entry lists, from the routing's key-major index (``offsets``,
    ``query_rows``: every (global chunk g, head h) segment's rows, ascending). One CTA per
    segment ``seg = g * H + h``: for each entry (row ``i``) it finds the slot ``s`` of chunk g in
    ``selection[i, h]`` and, for a gather slot (``s >= s0``: causal own chunks are the diagonal
    kernel's), writes the pair index ``(i * H + h) * KP + s - s0`` to
    ``rows_list[offsets[seg] + n]``, ``n`` counting the segment's pairs in row order (a block
    scan per 256 entries); ``counts[seg]`` = the segment's pairs. Deterministic, no global
    atomics. Entries whose row or slot does not check out (a routing built for other inputs)
    are dropped, and every index is clamped: a wrong routing gives wrong results, never an
    access out of bounds. ``vec = 4`` (``topk % 4 == 0``, ``selection`` 16-byte aligned) reads
    a row's slots in 16-byte vectors: the lookup is latency-bound, one dependent load per slot
    otherwise.

    ``head_major`` (the sm90 forward, which runs in windows of KV heads to bound its partial
    buffer): the pair index is ``(h * total_q + i) * KP + slot - s0`` and the segment's count goes
    to ``counts[(kvh * nbound + g) * G + h % G]`` (``G = H / Hk``, ``nbound = nseg / H``), so
    that a window of KV heads owns one contiguous range of pair indices and one of segments, and
    a KV head's query heads stay next to each other (they share its K/V chunk in L2). Compile
    key: ("pairlist", causal, vec), plus "fill" with ``fill_tail``, "hmajor" with ``head_major``."""

    def __init__(self, causal: bool, vec: int = 1, fill_tail: bool = False, head_major: bool = False,
                 dual: bool = False):
        assert vec in (1, 4)
        assert not (dual and (fill_tail or not head_major)), "dual: the forward's lists and the backward's"
        # dual (the training forward): also the backward's list, one pair index per entry in place
        # (``(row * H + h) * topk + slot``, every slot; -1 for an entry that does not check out),
        # which the backward then takes instead of building its own (:func:`attention_backward_cute`)
        self.dual = bool(dual)
        self.causal = bool(causal)
        self.vec = int(vec)
        # fill_tail (the sm90 backward, which walks whole segments): entries past the pairs get -1
        self.fill_tail = bool(fill_tail)
        self.head_major = bool(head_major)
        self.nthr = THREADS

    @staticmethod
    def compile_key(causal: bool, vec: int, fill_tail: bool = False, head_major: bool = False, dual: bool = False):
        return ("pairlist", bool(causal), int(vec)) + (("fill",) if fill_tail else ()) + (
            ("hmajor",) if head_major else ()) + (("dual",) if dual else ())

    @cute.jit
    def __call__(self, sel: cute.Pointer, cu_chunks: cute.Pointer, offsets: cute.Pointer, query_rows: cute.Pointer,
                 rows_list: cute.Pointer, counts: cute.Pointer, rows_all: cute.Pointer, B: Int32, total_q: Int32,
                 H: Int32, Hk: Int32, topk: Int32, nseg: Int32, cap: Int32, stream: cuda.CUstream):
        self.kernel(sel, cu_chunks, offsets, query_rows, rows_list, counts, rows_all, B, total_q, H, Hk, topk, nseg,
                    cap).launch(grid=(nseg, 1, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, sel: cute.Pointer, cu_chunks: cute.Pointer, offsets: cute.Pointer, query_rows: cute.Pointer,
               rows_list: cute.Pointer, counts: cute.Pointer, rows_all: cute.Pointer, B: Int32, total_q: Int32,
               H: Int32, Hk: Int32, topk: Int32, nseg: Int32, cap: Int32):
        tid, _, _ = cute.arch.thread_idx()
        seg, _, _ = cute.arch.block_idx()
        NW = self.nthr // 32
        s0 = 1 if cutlass.const_expr(self.causal) else 0
        smem = cutlass.utils.SmemAllocator()
        s_w = smem.allocate_tensor(Int32, cute.make_layout(NW + 1), 16)
        g = seg // H
        h = seg - g * H
        b = find_segment(cu_chunks, B, g)
        gl = g - _t(cu_chunks)[b]  # the chunk's index in its sequence, as the selection holds it
        to = _t(offsets)
        o0 = cutlass.min(cutlass.max(to[seg], Int32(0)), cap)
        o1 = cutlass.min(cutlass.max(to[seg + 1], o0), cap)
        tqr = _t(query_rows)
        trl = _t(rows_list)
        kp = topk - s0
        n = Int32(0)
        for base in cutlass.range(o0, o1, self.nthr, unroll=1):
            e = base + tid
            pair = Int32(-1)
            every = Int32(-1)  # (dual: the backward's entry)
            if e < o1:
                i = tqr[e]
                if (i >= 0) & (i < total_q):
                    ridx = i * H + h
                    slot = Int32(-1)
                    if cutlass.const_expr(self.vec == 4):
                        for s4 in cutlass.range(topk // 4, unroll=2):
                            x = cute.make_rmem_tensor(cute.make_layout(4), Int32)
                            src = sel + (Int64(ridx) * Int64(topk) + Int64(s4 * 4))
                            cute.autovec_copy(cute.make_tensor(src.align(16), cute.make_layout(4)), x)
                            for u in cutlass.range_constexpr(4):
                                if (slot < 0) & (x[u] == gl):
                                    slot = s4 * 4 + u
                    else:
                        tsel = _t(sel + Int64(ridx) * Int64(topk))
                        for s in cutlass.range(topk, unroll=4):
                            if (slot < 0) & (tsel[s] == gl):
                                slot = s
                    if slot >= s0:
                        if cutlass.const_expr(self.head_major):
                            pair = (h * total_q + i) * kp + slot - s0
                        else:
                            pair = ridx * kp + slot - s0
                    if cutlass.const_expr(self.dual):
                        if slot >= 0:
                            every = ridx * topk + slot
            if cutlass.const_expr(self.dual):
                if e < o1:
                    _t(rows_all)[e] = every
            flag = Int32(0)
            if pair >= 0:
                flag = Int32(1)
            pre, tot = block_exclusive_scan(flag, s_w, tid, NW)
            if pair >= 0:
                trl[o0 + n + pre] = pair
            n = n + tot
        if cutlass.const_expr(self.fill_tail):
            for e in cutlass.range(o0 + n + tid, o1, self.nthr, unroll=1):
                trl[e] = Int32(-1)
        if tid == 0:
            cseg = seg
            if cutlass.const_expr(self.head_major):
                G = H // Hk
                kvh = h // G
                cseg = (kvh * (nseg // H) + g) * G + (h - kvh * G)
            _t(counts)[cseg] = n


@cute.jit
def lower_bound(t: cute.Tensor, lo: Int32, n: Int32, x: Int32):
    """The first of ``t[lo : lo + n]`` (ascending) that is ``>= x``, as an offset from ``lo``
    (``n`` if none); binary search, as :func:`~moba_cute.kernels.centroids.find_segment`."""
    a = Int32(0)
    b = n
    while a < b:
        mid = a + (b - a) // 2
        if t[lo + mid] < x:
            a = mid + 1
        else:
            b = mid
    return a


class WindowCountKernel:
    """Windows of query rows for the sm90 forward (when one KV head's partials exceed the
    buffer's bound): a window is rows ``[rw * W, min((rw + 1) * W, total_q))`` of one query head
    ``h``, i.e. the pair indices ``[(h * total_q + rw * W) * KP, (h * total_q + r_hi) * KP)``.
    For every cell ``(h * nrw + rw) * nbound + g``, the pairs of segment (global chunk g, head h)
    that lie in window ``rw`` of head h: their count (``wcount``, which
    :class:`SlotScanKernel` then scans with one pass per window) and their first place in the
    segment's list (``wstart``). :class:`PairListKernel` wrote each segment's pair indices in
    ascending order (its rows in order, one head), so both are binary searches. One thread per
    cell; lists and counts are clamped as the pair lists were written. Compile key:
    ("wincount",)."""

    def __init__(self):
        self.nthr = THREADS

    @staticmethod
    def compile_key():
        return ("wincount",)

    @cute.jit
    def __call__(self, offsets: cute.Pointer, counts: cute.Pointer, rows_list: cute.Pointer, wcount: cute.Pointer,
                 wstart: cute.Pointer, total_q: Int32, H: Int32, Hk: Int32, KP: Int32, nbound: Int32, nrw: Int32,
                 W: Int32, cap: Int32, stream: cuda.CUstream):
        ncell = H * nrw * nbound
        self.kernel(offsets, counts, rows_list, wcount, wstart, total_q, H, Hk, KP, nbound, nrw, W, cap).launch(
            grid=((ncell + self.nthr - 1) // self.nthr, 1, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, offsets: cute.Pointer, counts: cute.Pointer, rows_list: cute.Pointer, wcount: cute.Pointer,
               wstart: cute.Pointer, total_q: Int32, H: Int32, Hk: Int32, KP: Int32, nbound: Int32, nrw: Int32,
               W: Int32, cap: Int32):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        cell = bid * self.nthr + tid
        if cell < H * nrw * nbound:
            hw = cell // nbound
            g = cell - hw * nbound
            h = hw // nrw
            rw = hw - h * nrw
            G = H // Hk
            kvh = h // G
            o0 = cutlass.min(cutlass.max(_t(offsets)[g * H + h], Int32(0)), cap)
            n = cutlass.min(cutlass.max(_t(counts)[(kvh * nbound + g) * G + (h - kvh * G)], Int32(0)), cap - o0)
            r_lo = cutlass.min(rw * W, total_q)
            r_hi = cutlass.min(r_lo + W, total_q)
            trl = _t(rows_list)
            a = lower_bound(trl, o0, n, (h * total_q + r_lo) * KP)
            b = lower_bound(trl, o0, n, (h * total_q + r_hi) * KP)
            _t(wcount)[cell] = b - a
            _t(wstart)[cell] = a


class SlotPrepKernel:
    """Zeroes the ``n`` per-slot segment counters (the count pass adds to them atomically) and,
    for the causal diagonal pass, writes ``cu_mt[b]`` = the first query tile of sequence b
    (``cu_mt[B]`` = tiles in all; ``bm`` rows a tile; lengths clamped as the kernels clamp
    them). Grid-stride zeroing over ``nblocks`` CTAs; CTA 0 also scans the tile counts.
    Compile key: ("slotprep", bm, diag)."""

    def __init__(self, bm: int, diag: bool):
        self.bm = int(bm)
        self.diag = bool(diag)
        self.nthr = THREADS

    @cute.jit
    def __call__(self, counts: cute.Pointer, cu_q: cute.Pointer, cu_mt: cute.Pointer, n: Int32, B: Int32,
                 total_q: Int32, nblocks: Int32, stream: cuda.CUstream):
        self.kernel(counts, cu_q, cu_mt, n, B, total_q, nblocks).launch(
            grid=(nblocks, 1, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, counts: cute.Pointer, cu_q: cute.Pointer, cu_mt: cute.Pointer, n: Int32, B: Int32,
               total_q: Int32, nblocks: Int32):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        tc = _t(counts)
        for i in cutlass.range(bid * self.nthr + tid, n, nblocks * self.nthr):
            tc[i] = Int32(0)
        if cutlass.const_expr(self.diag):
            if bid == 0:
                smem = cutlass.utils.SmemAllocator()
                s_w = smem.allocate_tensor(Int32, cute.make_layout(self.nthr // 32 + 1), 16)
                tmt = _t(cu_mt)
                bm = self.bm
                carry = Int32(0)
                for base in cutlass.range(0, B, self.nthr):
                    b = base + tid
                    nt = Int32(0)
                    if b < B:
                        qs, qe = clamp_seq(cu_q, b, total_q)
                        nt = (qe - qs + bm - 1) // bm
                    pre, tot = block_exclusive_scan(nt, s_w, tid, self.nthr // 32)
                    if b < B:
                        tmt[b + 1] = carry + pre + nt
                    carry = carry + tot
                if tid == 0:
                    tmt[0] = Int32(0)


class SlotScanKernel:
    """One CTA. Over the ``n = passes * nseg`` per-slot segment counts (pass-major, so one
    pass's segments are contiguous), writes in one sweep:

    * ``seg_off[i]`` = exclusive prefix sum of the counts (``seg_off[n]`` = total), and the
      same values into ``counts`` (the scatter pass's cursor: no separate copy);
    * ``tile_off[i]`` = exclusive prefix sum of ``ceil(count / bm)`` (``tile_off[n]`` = total);
    * ``tile_seg[t] = i`` for every tile ``t`` of segment ``i`` (entries at or past
      ``tiles_bound``, the table's size, are dropped: only garbage cu_seqlens get there);
    * ``pass_tiles[p] = tile_off[p * nseg]``, ``pass_tiles[passes]`` = total: each gather
      pass's tile range; ``pass_tiles[passes + 1 + p] = 0``: each pass's unit counter (the sm90
      segment kernel's persistent walk takes its units from it).

    Both scans run over steps of ``SCAN_THREADS * SCAN_ITEMS`` counts with a running carry.
    A single CTA suffices: the work is ~20 bytes per segment and tile (64K flashmoba: 115K
    segments, ~250K tiles). Compile key: ("slotscan", bm)."""

    def __init__(self, bm: int):
        self.bm = int(bm)
        self.nthr = SCAN_THREADS

    @cute.jit
    def __call__(self, counts: cute.Pointer, seg_off: cute.Pointer, tile_off: cute.Pointer, tile_seg: cute.Pointer,
                 pass_tiles: cute.Pointer, nseg: Int32, passes: Int32, tiles_bound: Int32, stream: cuda.CUstream):
        self.kernel(counts, seg_off, tile_off, tile_seg, pass_tiles, nseg, passes, tiles_bound).launch(
            grid=(1, 1, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, counts: cute.Pointer, seg_off: cute.Pointer, tile_off: cute.Pointer, tile_seg: cute.Pointer,
               pass_tiles: cute.Pointer, nseg: Int32, passes: Int32, tiles_bound: Int32):
        tid, _, _ = cute.arch.thread_idx()
        NW = self.nthr // 32
        E = SCAN_ITEMS
        bm = self.bm
        smem = cutlass.utils.SmemAllocator()
        s_w = smem.allocate_tensor(Int32, cute.make_layout(NW + 1), 16)
        tc = _t(counts)
        tso = _t(seg_off)
        tto = _t(tile_off)
        tts = _t(tile_seg)
        tpt = _t(pass_tiles)
        n = passes * nseg
        cnt = cute.make_rmem_tensor(cute.make_layout(E), Int32)
        nti = cute.make_rmem_tensor(cute.make_layout(E), Int32)
        carry_c = Int32(0)
        carry_t = Int32(0)
        for base in cutlass.range(0, n, self.nthr * E):
            i0 = base + tid * E
            lc = Int32(0)
            lt = Int32(0)
            for e in cutlass.range_constexpr(E):
                x = Int32(0)
                if i0 + e < n:
                    x = tc[i0 + e]
                cnt[e] = x
                nti[e] = (x + bm - 1) // bm
                lc = lc + x
                lt = lt + nti[e]
            pc, tot_c = block_exclusive_scan(lc, s_w, tid, NW)
            pt, tot_t = block_exclusive_scan(lt, s_w, tid, NW)
            rc = carry_c + pc
            rt = carry_t + pt
            for e in cutlass.range_constexpr(E):
                i = i0 + e
                if i < n:
                    tso[i] = rc
                    tc[i] = rc
                    tto[i] = rt
                    if i % nseg == 0:
                        tpt[i // nseg] = rt
                    for t in cutlass.range(rt, cutlass.min(rt + nti[e], tiles_bound)):
                        tts[t] = i
                rc = rc + cnt[e]
                rt = rt + nti[e]
            carry_c = carry_c + tot_c
            carry_t = carry_t + tot_t
        if tid == 0:
            tso[n] = carry_c
            tto[n] = carry_t
            tpt[passes] = carry_t
        for p in cutlass.range(tid, passes, self.nthr):
            tpt[passes + 1 + p] = 0
