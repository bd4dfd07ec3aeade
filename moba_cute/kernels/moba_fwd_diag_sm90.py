"""The sm90 forward's causal diagonal (every row's own chunk) on wgmma, merging the segment
kernel's partials: :class:`MobaDiagSm90`.

The segment kernel (:mod:`moba_cute.kernels.moba_fwd_sm90`) leaves every gather pair's
normalized partial; this kernel, run last, computes each row's own chunk and writes ``out`` and
``lse``. It takes the place of ``MobaFwdSm80(merge=True)`` (mma.sync) with the same arguments and
the same query tiles (``diag_tile``: ``BM = 64`` consecutive rows of one sequence and head) for
chunks of ``configs/attention_sm90.DIAG_MIN_CHUNK`` keys or more. With long chunks the diagonal
is real work: at moba-large's C = 4096 it is 4.4 TFLOP of the 128K forward, 23.7 ms on mma.sync
and 15.0 ms here on the H100 (docs/design.md, section 8); with short chunks it is mostly the
merge, which the staged merge streams faster than the mma.sync kernel (C = 128: 2.49 -> 2.42 ms
at 64K).

The CTA is the segment kernel's (``setmaxnreg``, two CTAs per SM):

* producer warpgroup: its four warps load the tile's 64 Q rows (contiguous rows of one head,
  16-byte ``cp.async`` into the swizzled Q stage); warp 0 loads the keys from the first row's
  chunk start to the last row's position with TMA, ``BN`` keys of K and V per stage; the
  warpgroup writes ``out = 0``, ``lse = -inf`` for the tile's rows that have no key position
  (``Sq > Sk``);
* consumer warpgroup: per n-block ``S = Q K^T`` (SS wgmma), the causal mask (row at position
  ``p`` sees keys ``[own_chunk_start(p), p]``; only n-blocks that cross a row's range are
  masked), online softmax, ``O += P V`` (RS wgmma); then each row of the launch's window
  merges its ``nused - 1`` partials (``part_o`` / ``part_lse``, log2-domain, in slot order)
  with the own chunk's state and writes ``out`` (input dtype) and ``lse`` (natural log, ``(H,
  total_q)``). The partials come into shared memory by ``cp.async`` (``staged_merge``, the
  default; without it, 4-byte loads in the accumulator's layout), slot ``j`` of the tile's 64
  rows per buffer (the free K/V ring and one more buffer: two slots in flight while one is
  merged); their lines are prefetched into L2 a few n-blocks before. A row's arithmetic does not depend on its
  tile or on how its partials are read, so the result is bitwise deterministic.

With ``overlap`` (off by default: within noise on the H100) the n-blocks run through the segment
kernel's ``stream_overlapped`` (FlashAttention-3's intra-warpgroup overlap, K and V in rings of
their own), with this kernel's causal mask and prefetch as its ``mask_block`` / ``block_done``
hooks; bitwise the sequential loop.

With ``interleave`` (off by default) a chunk's tiles are launched short and long in turn
(:func:`interleaved_tile`): the short ones are bound by their merge, the long ones by the tensor
cores, and in index order the CTAs resident together are of one kind.

Static configuration (compile key): ``(dtype, head_dim, bn, kv_stages)``, plus ``"staged"``,
``"overlap"`` and ``"ilv"``.
"""

from __future__ import annotations

from typing import NamedTuple

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
import cutlass.pipeline as pipeline
from cutlass import Boolean, Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warpgroup

from .moba_fwd_sm80 import LN2, _flat, _online_softmax, _quad_sum, partials_max, store_pair
from .moba_fwd_sm90 import (BM, MobaFwdSm90, SegVariant, gather_tma_pipelines, gemm_kblocks, inv_row_sum,
                            kernel_prologue, kv_tma_views, ring_state, row_lse_log2)
from .segments import diag_tile, zero_rows_without_keys


class DiagTile(NamedTuple):
    """A diagonal query tile (:func:`~moba_cute.kernels.segments.diag_tile`): the sequence's first
    query row ``qs`` and key ``ks``, the bottom-right shift ``Sk - Sq``, the tile's first local
    row ``m0``, its rows with a key position ``[i_lo, i_hi)``, and their keys ``[kbeg, kend)``
    from ``ks``."""
    qs: Int32
    ks: Int32
    shift: Int32
    m0: Int32
    i_lo: Int32
    i_hi: Int32
    kbeg: Int32
    kend: Int32


class MergeWindow(NamedTuple):
    """The partials a launch merges: heads from ``h0``, rows ``[row_lo, row_hi)``, ``KP`` per
    (row, head) at ``((h - h0) * total_q + row - row_lo) * KP + j``; ``nused`` per (row, head)."""
    part_o: cute.Pointer
    part_lse: cute.Pointer
    nused: cute.Pointer
    h0: Int32
    row_lo: Int32
    row_hi: Int32
    KP: Int32


class DiagLoop(NamedTuple):
    """What the overlapped n-block loop (``MobaFwdSm90.stream_overlapped``) hands the diagonal's
    hooks: the thread's rows' visible key ranges, the n-block after which the partials are
    prefetched, the merge window, the rows' merge work and the thread's place in its quad."""
    r_lo: cute.Tensor
    r_hi: cute.Tensor
    pf_at: Int32
    mw: MergeWindow
    rows: "MergeRows"
    qd: Int32


class MergeRows(NamedTuple):
    """A consumer thread's rows in the merge (rmem tensors, one entry per row): 1 where the launch
    writes the row, its partials' count and first pair index."""
    mine: cute.Tensor
    npart: cute.Tensor
    pbase: cute.Tensor


PREFETCH_BLOCKS = 6  # n-blocks before the epilogue at which a tile's partials are prefetched
MERGE_BARRIER = 5  # named barrier of the consumer warpgroup's merge (1: V tail zeroed)


@cute.jit
def interleaved_tile(i: Int32, n: Int32, P: Int32):
    """The tile the ``i``-th of a launch's ``n`` tiles runs: in each group of ``P`` (a chunk's
    tiles when the sequence starts the chunk; the last group may be shorter) the order 0, P - 1,
    1, P - 2, ..., so that the CTAs resident together mix short and long tiles (a bijection of
    ``[0, n)``; ``P < 2``: the identity)."""
    out = i
    if P >= 2:
        base = (i // P) * P
        size = cutlass.min(P, n - base)
        j = i - base
        half = j // 2
        out = base + half
        if j % 2 == 1:
            out = base + size - 1 - half
    return out


class MobaDiagSm90(MobaFwdSm90):
    """Causal diagonal + merge on wgmma. See the module docstring."""

    def __init__(self, dtype, head_dim: int, bn: int = 64, kv_stages: int = 2, staged_merge: bool = False,
                 overlap: bool = False, interleave: bool = False):
        # (its own merge epilogue; overlap: the segment kernel's stream_overlapped loop, K and V
        # in rings of their own)
        super().__init__(dtype, head_dim, bn, 1, kv_stages, SegVariant(staged=False, overlap=overlap))
        self.QS = 1  # one Q tile per CTA
        # the partials staged in shared memory (merge_staged), and the grid with the window's
        # heads fastest; else 4-byte loads from global memory and heads slowest
        self.staged_merge = bool(staged_merge)
        # a chunk's tiles launched short and long in turn (interleaved_tile)
        self.interleave = bool(interleave)

    @staticmethod
    def compile_key(dtype_name: str, head_dim: int, bn: int, kv_stages: int, staged_merge: bool = False,
                    overlap: bool = False, interleave: bool = False):
        key = ("moba_diag_sm90", dtype_name, int(head_dim), int(bn), int(kv_stages))
        # (the overlap as the segment kernel's rule takes it: two or more K/V stages)
        ov = SegVariant(staged=False, overlap=overlap).for_tile(bn, kv_stages).overlap
        return key + ("staged",) * bool(staged_merge) + ("overlap",) * ov + ("ilv",) * bool(interleave)

    def _extra_smem(self):
        # staged merge: the tile's rows' partial counts and first indices (for the copies), and
        # one merge buffer besides those in the K/V ring
        if not self.staged_merge:
            return {}
        MR, AL = cute.struct.MemRange, cute.struct.Align
        return {"sRow": AL[MR[Int32, 2 * BM], 16], "sPart": AL[MR[self.dtype, BM * self.prow()], 16]}

    def prow(self):
        """Elements per row of a merge buffer: D + 8, so that the eight rows a warp reads at once
        fall in distinct banks (272-byte rows at D = 128)."""
        return self.D + 8

    @cute.jit
    def __call__(
        self,
        q: cute.Pointer,
        k: cute.Pointer,
        v: cute.Pointer,
        out: cute.Pointer,
        lse: cute.Pointer,
        part_o: cute.Pointer,
        part_lse: cute.Pointer,
        unused_lst: cute.Pointer,
        nused: cute.Pointer,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        unused_cu_chunks: cute.Pointer,
        cu_mt: cute.Pointer,
        unused_rows_list: cute.Pointer,
        unused_tile_seg: cute.Pointer,
        unused_seg_off: cute.Pointer,
        unused_tile_off: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        unused_nseg: Int32,
        unused_slot: Int32,
        KP: Int32,
        h0: Int32,
        nh: Int32,
        row_lo: Int32,
        row_hi: Int32,
        t0: Int32,
        grid_x: Int32,
        scale_log2: Float32,
        stream: cuda.CUstream,
    ):
        # (the arguments of MobaFwdSm80(merge=True): the launch path calls either kernel)
        (tiled_mma_qk, tiled_mma_pv, sQ_layout, sKV_layout, atom_k, tma_k, atom_v, tma_v,
         Storage) = self.host_setup(k, v, total_k, Hk)
        self.kernel(
            tma_k, tma_v, atom_k, atom_v, q, out, lse, part_o, part_lse, nused, cu_q, cu_k, cu_mt, B, total_q,
            total_k, H, Hk, chunk_size, KP, h0, nh, row_lo, row_hi, t0, scale_log2, sQ_layout, sKV_layout,
            tiled_mma_qk, tiled_mma_pv, Storage,
        ).launch(grid=(grid_x * nh, 1, 1) if self.staged_merge else (grid_x, nh, 1), block=(self.THREADS, 1, 1),
                 stream=stream,
                 min_blocks_per_mp=self.CTAS, preferred_smem_carveout=100)

    @cute.kernel
    def kernel(
        self,
        tma_k: cute.Tensor,
        tma_v: cute.Tensor,
        atom_k: cute.CopyAtom,
        atom_v: cute.CopyAtom,
        q: cute.Pointer,
        out: cute.Pointer,
        lse: cute.Pointer,
        part_o: cute.Pointer,
        part_lse: cute.Pointer,
        nused: cute.Pointer,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_mt: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        KP: Int32,
        h0: Int32,
        nh: Int32,
        row_lo: Int32,
        row_hi: Int32,
        t0: Int32,
        scale_log2: Float32,
        sQ_layout: cute.ComposedLayout,
        sKV_layout: cute.ComposedLayout,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        Storage: cutlass.Constexpr,
    ):
        tid, _, _ = cute.arch.thread_idx()
        bid, by, _ = cute.arch.block_idx()
        warp, st = kernel_prologue(atom_k, atom_v, Storage)
        pipe_q, pipe_kv = gather_tma_pipelines(st, self.QS, 128, self.KS, 4, self.kv_bytes, 128,
                                               v_barriers=self._v_barriers(st))
        cute.arch.mbarrier_init_fence()
        sQ = st.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = st.sK.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sV = st.sV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)

        # tiles in index order: a chunk's tiles run together and share its K/V in L2 (longest first
        # across chunks measured 9% slower on the H100). Staged: the window's heads fastest, so
        # that a KV head's query heads also share it (heads slowest read K/V once per query head)
        h = h0 + by
        tile = bid
        if cutlass.const_expr(self.staged_merge):
            h = h0 + bid % nh
            tile = bid // nh
        if cutlass.const_expr(self.interleave):
            gx, _, _ = cute.arch.grid_dim()
            ntiles = gx // nh if cutlass.const_expr(self.staged_merge) else gx
            tile = interleaved_tile(tile, ntiles, chunk_size // BM)
        t = DiagTile(*diag_tile(cu_mt, cu_q, cu_k, B, total_q, total_k, chunk_size, tile + t0, BM))
        nblk = (t.kend - t.kbeg + self.BN - 1) // self.BN
        cute.arch.sync_threads()  # barrier init visible to both warpgroups

        if warp < 4:
            cute.arch.setmaxregister_decrease(self.PRODUCER_REGS)
            zero_rows_without_keys(out, lse, t.qs, t.m0, t.i_lo, h, H, total_q, tid, 128, self.D, self.dtype)
            if t.i_lo < t.i_hi:
                self.diag_producer(tma_k, tma_v, atom_k, atom_v, q, sQ, sK, sV, pipe_q, pipe_kv, t, nblk, h, H, Hk,
                                   tid, warp)
        else:
            cute.arch.setmaxregister_increase(self.CONSUMER_REGS)
            if t.i_lo < t.i_hi:
                mw = MergeWindow(part_o, part_lse, nused, h0, row_lo, row_hi, KP)
                bufs, sRow = None, None
                if cutlass.const_expr(self.staged_merge):
                    bufs = self.merge_buffers(sK, sV, st.sPart.data_ptr())
                    sRow = st.sRow.get_tensor(cute.make_layout(2 * BM))
                self.diag_consumer(out, lse, mw, sQ, sK, sV, bufs, sRow, pipe_q, pipe_kv, tiled_mma_qk, tiled_mma_pv,
                                   t, nblk, h, H, total_q, chunk_size, scale_log2, tid - 128)

    @cute.jit
    def diag_producer(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom,
                      q: cute.Pointer, sQ: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor, pipe_q, pipe_kv,
                      t: DiagTile, nblk: Int32, h: Int32, H: Int32, Hk: Int32, tid: Int32, warp: Int32):
        """Warp ``w`` loads tile rows ``16w .. 16w + 15`` (rows without a key position or past
        the sequence repeat a loadable row); warp 0 then streams the ``nblk`` K/V n-blocks."""
        lane = tid % 32
        i = cutlass.max(cutlass.min(t.m0 + warp * 16 + lane % 16, t.i_hi - 1), t.i_lo)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.QS)
        self.copy_rows(q, sQ, pipe_q, q_state, (t.qs + i) * H + h, warp * 16, Int32(16), lane, 16)
        if warp == 0:
            kv_views = kv_tma_views(atom_k, tma_k, atom_v, tma_v, sK, sV, h // (H // Hk), t.ks + t.kbeg, self.BN,
                                    self.D)
            kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.KS)
            for n in cutlass.range(nblk, unroll=1):
                self.load_kv_block(atom_k, atom_v, kv_views, pipe_kv, kv_state, n)
                kv_state.advance()

    @cute.jit
    def diag_consumer(self, out: cute.Pointer, lse: cute.Pointer, mw: MergeWindow, sQ: cute.Tensor,
                      sK: cute.Tensor, sV: cute.Tensor, bufs, sRow, pipe_q, pipe_kv, tiled_mma_qk: cute.TiledMma,
                      tiled_mma_pv: cute.TiledMma, t: DiagTile, nblk: Int32, h: Int32, H: Int32, total_q: Int32,
                      chunk_size: Int32, scale_log2: Float32, ctid: Int32):
        """The tile's n-blocks one after the other (two CTAs per SM overlap one's softmax with the
        other's GEMMs), then :meth:`merge_epilogue`."""
        dt = self.dtype
        f = self.consumer_frags(tiled_mma_qk, tiled_mma_pv, sQ, sK, sV, ctid)
        NR = cute.size(f.O_mn, mode=[0])
        # this thread's rows' visible keys [lo, hi], relative to kbeg (a row without one: lo > hi)
        r_lo = cute.make_rmem_tensor(cute.make_layout(NR), Int32)
        r_hi = cute.make_rmem_tensor(cute.make_layout(NR), Int32)
        for r in cutlass.range_constexpr(NR):
            i = t.m0 + f.cO_mn[r, 0][0]
            r_lo[r] = Int32(1)
            r_hi[r] = Int32(0)
            if (i >= t.i_lo) & (i < t.i_hi):
                p = i + t.shift
                r_lo[r] = (p // chunk_size) * chunk_size - t.kbeg
                r_hi[r] = p - t.kbeg
            f.row_max[r] = -Float32.inf
            f.row_sum[r] = Float32(0.0)
        f.acc_O.fill(0.0)
        rows = self.merge_rows(t, mw, f.cO_mn, h, H, total_q)
        # the partials were written long before: prefetch them into L2 a few n-blocks before the
        # epilogue reads them (3% off the kernel at moba-large 128K on the H100)
        pf_at = cutlass.max(nblk - PREFETCH_BLOCKS, 0)
        nkeys = t.kend - t.kbeg
        q_state = ring_state(self.QS, 0)
        pipe_q.consumer_wait(q_state)
        cute.arch.fence_view_async_shared()  # cp.async wrote Q (generic proxy); wgmma reads it (async)
        if cutlass.const_expr(self.overlap):
            ext = DiagLoop(r_lo, r_hi, pf_at, mw, rows, ctid % 4)
            self.stream_overlapped(f, pipe_q, pipe_kv, sV, q_state, Boolean(True), Int32(0), nblk, nkeys, scale_log2,
                                   ctid, Int32(0), ext)
        else:
            self.diag_blocks(f, pipe_kv, sV, r_lo, r_hi, mw, rows, pf_at, nblk, nkeys, scale_log2, ctid)
        self.merge_epilogue(f, t, mw, rows, out, lse, bufs, sRow, h, H, total_q, scale_log2, ctid)

    @cute.jit
    def diag_blocks(self, f, pipe_kv, sV: cute.Tensor, r_lo: cute.Tensor, r_hi: cute.Tensor, mw: MergeWindow, rows,
                    pf_at: Int32, nblk: Int32, nkeys: Int32, scale_log2: Float32, ctid: Int32):
        """The n-blocks one after the other: S = Q K^T, mask and softmax, O += P V, each waited
        for (the other CTA on the SM fills the tensor cores meanwhile)."""
        dt = self.dtype
        for n in cutlass.range(nblk, unroll=1):
            kv_idx = n % self.KS
            # (V rows past the last row's position are zeroed: 0 * inf cannot reach O)
            self.wait_kv_block(pipe_kv, sV, n, nkeys - n * self.BN, ctid, Int32(0))
            # ---- S = Q K^T
            warpgroup.fence()
            gemm_kblocks(f.mma_qk, f.acc_S, f.tSrQ, f.tSrK, 0, kv_idx)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            # ---- causal mask, online softmax
            self.mask_causal(f.S_mn, f.cS_mn, r_lo, r_hi, n * self.BN)
            _online_softmax(f.S_mn, f.O_mn, f.row_max, f.row_sum, scale_log2)
            f.rP.store(f.acc_S.load().to(dt))
            # ---- O += P V
            warpgroup.fence()
            gemm_kblocks(f.mma_pv, f.acc_O, f.tOrP, f.tOrVt, None, kv_idx, zero_init=False)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            pipe_kv.consumer_release(ring_state(self.KS, n))
            if n == pf_at:
                self.prefetch_partials(mw, rows, ctid % 4)

    @cute.jit
    def mask_block(self, f, ext, nkeys: Int32, n: Int32):
        """The overlapped loop's mask of n-block ``n``: each row's visible keys (:meth:`mask_causal`)."""
        self.mask_causal(f.S_mn, f.cS_mn, ext.r_lo, ext.r_hi, n * self.BN)

    @cute.jit
    def block_done(self, ext, n: Int32):
        """After n-block ``n`` of the overlapped loop: the partials' L2 prefetch at ``ext.pf_at``."""
        if n == ext.pf_at:
            self.prefetch_partials(ext.mw, ext.rows, ext.qd)

    @cute.jit
    def mask_causal(self, S_mn: cute.Tensor, cS_mn: cute.Tensor, r_lo: cute.Tensor, r_hi: cute.Tensor, n0: Int32):
        """S = -inf outside each row's visible keys ``[r_lo, r_hi]`` (relative to the tile's
        first key; the n-block starts at ``n0``); n-blocks inside every row's range are left
        as they are."""
        NR = cute.size(S_mn, mode=[0])
        need = False
        for r in cutlass.range_constexpr(NR):
            need = need | (r_lo[r] > n0) | (r_hi[r] < n0 + self.BN - 1)
        if need:
            for r in cutlass.range_constexpr(NR):
                lo = r_lo[r] - n0
                hi = r_hi[r] - n0
                for c in cutlass.range_constexpr(cute.size(S_mn, mode=[1])):
                    col = cS_mn[0, c][1]
                    if (col < lo) | (col > hi):
                        S_mn[r, c] = -Float32.inf

    @cute.jit
    def merge_rows(self, t: DiagTile, mw: MergeWindow, cO_mn: cute.Tensor, h: Int32, H: Int32, total_q: Int32):
        """This thread's rows' merge work (:class:`MergeRows`): whether the launch writes the row
        (a key position, in the window), its partials' count and first index."""
        NR = cute.size(cO_mn, mode=[0])
        tnu = _flat(mw.nused)
        rows = MergeRows(cute.make_rmem_tensor(cute.make_layout(NR), Int32),
                         cute.make_rmem_tensor(cute.make_layout(NR), Int32),
                         cute.make_rmem_tensor(cute.make_layout(NR), Int32))
        for r in cutlass.range_constexpr(NR):
            i = t.m0 + cO_mn[r, 0][0]
            grow = t.qs + i
            rows.mine[r] = Int32(0)
            rows.npart[r] = Int32(0)
            rows.pbase[r] = Int32(0)
            if (i >= t.i_lo) & (i < t.i_hi) & (grow >= mw.row_lo) & (grow < mw.row_hi):
                rows.mine[r] = Int32(1)
                rows.npart[r] = tnu[Int64(grow) * Int64(H) + Int64(h)] - 1
                rows.pbase[r] = ((h - mw.h0) * total_q + grow - mw.row_lo) * mw.KP
        return rows

    @cute.jit
    def prefetch_partials(self, mw: MergeWindow, rows, qd: Int32):
        """L2 prefetch of this thread's rows' partials: thread ``qd`` of a row's quad takes
        partials ``qd, qd + 4, ...`` (their 128-byte lines), thread 0 also the LSEs."""
        NR = cute.size(rows.npart, mode=[0])
        LINES = max(1, self.D * 2 // 128)
        for r in cutlass.range_constexpr(NR):
            for j in cutlass.range(qd, rows.npart[r], 4, unroll=1):
                base = mw.part_o + (Int64(rows.pbase[r]) + Int64(j)) * Int64(self.D)
                for ln in cutlass.range_constexpr(LINES):
                    cute.arch.prefetch((base + ln * 64).llvm_ptr, cache_level="L2")
            if (qd == 0) & (rows.npart[r] > 0):
                cute.arch.prefetch((mw.part_lse + Int64(rows.pbase[r])).llvm_ptr, cache_level="L2")
                cute.arch.prefetch((mw.part_lse + (Int64(rows.pbase[r]) + Int64(rows.npart[r] - 1))).llvm_ptr,
                                   cache_level="L2")

    @cute.jit
    def merge_epilogue(self, f, t: DiagTile, mw: MergeWindow, rows, out: cute.Pointer, lse: cute.Pointer,
                       bufs, sRow, h: Int32, H: Int32, total_q: Int32, scale_log2: Float32, ctid: Int32):
        """Each of this thread's rows in the window: the own chunk's (unnormalized O, max, sum)
        and the row's partials weighted against their common max, in slot order; ``out = O / w``,
        ``lse = (M + log2 w) ln 2`` with ``w`` the total weight. The partials are read from
        global memory (:meth:`merge_fragments`) or staged in shared memory
        (:meth:`merge_staged`): the same arithmetic in the same order, so the same bits."""
        NR = cute.size(f.O_mn, mode=[0])
        tpl = _flat(mw.part_lse)
        base = cute.make_rmem_tensor(cute.make_layout(NR), Float32)  # M (0 when all is -inf)
        wsum = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
        for r in cutlass.range_constexpr(NR):
            l_own = _quad_sum(f.row_sum[r])
            own_scale = Float32(0.0)
            w_own = Float32(0.0)
            M_use = Float32(0.0)
            if rows.mine[r] != 0:
                L_own = row_lse_log2(f.row_max[r], l_own, scale_log2)
                M_p, _ = partials_max(tpl, Int64(rows.pbase[r]), rows.npart[r], 4)
                M = cute.arch.fmax(L_own, M_p)
                if M != -Float32.inf:
                    M_use = M
                if (l_own > Float32(0.0)) | (l_own != l_own):  # NaN propagates
                    w_own = cute.math.exp2(L_own - M_use, fastmath=True)
                    own_scale = w_own / l_own
            base[r] = M_use
            wsum[r] = w_own
            f.O_mn[r, None] = f.O_mn[r, None].load() * own_scale
        if cutlass.const_expr(self.staged_merge):
            self.merge_staged(f, mw, rows, base, wsum, bufs, sRow, ctid)
        else:
            self.merge_fragments(f, mw, rows, base, wsum)
        for r in cutlass.range_constexpr(NR):
            if rows.mine[r] != 0:
                grow = t.qs + t.m0 + f.cO_mn[r, 0][0]
                inv = inv_row_sum(wsum[r])
                obase = out + (Int64(grow) * Int64(H) + Int64(h)) * Int64(self.D)
                for c in cutlass.range_constexpr(cute.size(f.O_mn, mode=[1]) // 2):
                    col = f.cO_mn[r, 2 * c][1]
                    store_pair(self.dtype, f.O_mn[r, 2 * c] * inv, f.O_mn[r, 2 * c + 1] * inv, obase + col)
                if ctid % 4 == 0:
                    val = -Float32.inf
                    if (wsum[r] > Float32(0.0)) | (wsum[r] != wsum[r]):  # NaN propagates
                        val = (base[r] + cute.math.log2(wsum[r], fastmath=False)) * LN2
                    _flat(lse)[Int64(h) * Int64(total_q) + Int64(grow)] = val

    @cute.jit
    def add_partial(self, f, r: cutlass.Constexpr, lse_log2: Float32, base: cute.Tensor, wsum: cute.Tensor,
                    src: cute.Pointer):
        """One partial of row ``r``: weight ``w = exp2(lse_log2 - base[r])`` into ``wsum[r]`` and
        ``O[r] += w * partial`` for this thread's columns, the partial's row at ``src`` (global or
        shared memory: both merges run this code), read two adjacent columns at a time."""
        w = cute.math.exp2(lse_log2 - base[r], fastmath=True)
        wsum[r] = wsum[r] + w
        for c in cutlass.range_constexpr(cute.size(f.O_mn, mode=[1]) // 2):
            col = f.cO_mn[r, 2 * c][1]  # columns 2c, 2c + 1 are adjacent
            pv = cute.make_rmem_tensor(cute.make_layout(2), self.dtype)
            cute.autovec_copy(cute.make_tensor((src + col).align(4), cute.make_layout(2)), pv)
            pf = pv.load().to(Float32)
            f.O_mn[r, 2 * c] = f.O_mn[r, 2 * c] + w * pf[0]
            f.O_mn[r, 2 * c + 1] = f.O_mn[r, 2 * c + 1] + w * pf[1]

    @cute.jit
    def merge_fragments(self, f, mw: MergeWindow, rows, base: cute.Tensor, wsum: cute.Tensor):
        """The partials straight from global memory, 4-byte loads in the accumulator's layout
        (both rows' loads interleaved)."""
        NR = cute.size(f.O_mn, mode=[0])
        tpl = _flat(mw.part_lse)
        nmax = Int32(0)
        for r in cutlass.range_constexpr(NR):
            nmax = cutlass.max(nmax, rows.npart[r])
        for j in cutlass.range(nmax, unroll=1):
            for r in cutlass.range_constexpr(NR):
                if j < rows.npart[r]:
                    pj = Int64(rows.pbase[r]) + Int64(j)
                    self.add_partial(f, r, tpl[pj], base, wsum, mw.part_o + pj * Int64(self.D))

    @cute.jit
    def merge_staged(self, f, mw: MergeWindow, rows, base: cute.Tensor, wsum: cute.Tensor, bufs, sRow: cute.Tensor,
                     ctid: Int32):
        """The partials through shared memory: slot ``j`` of the tile's 64 rows into one of the
        ``bufs`` by ``cp.async`` (:meth:`stage_partials`), the next buffers' slots in flight while
        one is merged; named barrier ``MERGE_BARRIER`` among the consumer warpgroup's threads."""
        NR = cute.size(f.O_mn, mode=[0])
        tpl = _flat(mw.part_lse)
        # the tile's rows' (count, first index): the copies take any row
        snp = sRow
        spb = cute.make_tensor(sRow.iterator + BM, cute.make_layout(BM))
        if ctid % 4 == 0:
            for r in cutlass.range_constexpr(NR):
                snp[f.cO_mn[r, 0][0]] = rows.npart[r]
                spb[f.cO_mn[r, 0][0]] = rows.pbase[r]
        # (the ring's last reads were wgmma's, through the async proxy)
        cute.arch.fence_view_async_shared()
        cute.arch.barrier(barrier_id=MERGE_BARRIER, number_of_threads=128)
        nmax = Int32(0)
        for x in cutlass.range(BM, unroll_full=True):
            nmax = cutlass.max(nmax, snp[x])
        NB = len(bufs)
        P = self.prow()
        for b in cutlass.range_constexpr(NB):
            self.stage_partials(mw.part_o, bufs[b], snp, spb, Int32(b), ctid)
            cute.arch.cp_async_commit_group()
        for j0 in cutlass.range(0, nmax, NB, unroll=1):
            for b in cutlass.range_constexpr(NB):
                j = j0 + b
                cute.arch.cp_async_wait_group(NB - 1)
                cute.arch.barrier(barrier_id=MERGE_BARRIER, number_of_threads=128)
                for r in cutlass.range_constexpr(NR):
                    if j < rows.npart[r]:
                        self.add_partial(f, r, tpl[Int64(rows.pbase[r]) + Int64(j)], base, wsum,
                                         bufs[b] + f.cO_mn[r, 0][0] * P)
                cute.arch.barrier(barrier_id=MERGE_BARRIER, number_of_threads=128)
                self.stage_partials(mw.part_o, bufs[b], snp, spb, j + NB, ctid)
                cute.arch.cp_async_commit_group()
        cute.arch.cp_async_wait_group(0)

    def merge_buffers(self, sK: cute.Tensor, sV: cute.Tensor, spart: cute.Pointer):
        """The merge's buffers of ``64 x prow()`` elements (traced once): as many as the K/V ring's
        K and V regions each hold (free after the last n-block), then ``sPart``."""
        P = self.prow()
        per = self.KS * self.BN * self.D // (BM * P)
        bufs = [cute.recast_ptr(reg.iterator, None, self.dtype) + b * BM * P for reg in (sK, sV) for b in range(per)]
        return bufs + [spart]

    @cute.jit
    def stage_partials(self, part_o: cute.Pointer, buf: cute.Pointer, snp: cute.Tensor, spb: cute.Tensor, j: Int32,
                       ctid: Int32):
        """cp.async of slot ``j``'s partial of each of the tile's rows that has one into ``buf``
        (row ``rl`` at ``rl * prow()``); ``D / 8`` consecutive threads per row."""
        D = self.D
        CV = D // 8
        atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), self.dtype,
                                   num_bits_per_copy=128)
        for it in cutlass.range_constexpr(BM * CV // 128):
            idx = ctid + it * 128
            rl = idx // CV
            cv = idx % CV
            if j < snp[rl]:
                src = part_o + cute.assume((Int64(spb[rl]) + Int64(j)) * Int64(D) + Int64(cv * 8), divby=8)
                dst = buf + cute.assume(rl * self.prow() + cv * 8, divby=8)
                cute.copy(atom, cute.make_tensor(src, cute.make_layout(8)), cute.make_tensor(dst, cute.make_layout(8)))
