"""MoBA attention forward for sm80-class GPUs (cp.async, ldmatrix, mma.sync m16n8k16).

Schedule (docs/design.md): *slot passes*. Pass 0 of a causal call is the dense causal
diagonal (every row's own chunk): query-major tiles of ``BM`` contiguous rows of one sequence
and one head against the keys from the own chunk of the first row to the position of the last
row, masked to ``own_chunk_start(p) <= t <= p``. Every other pass ``s`` handles routing slot
``s`` only: tiles of up to ``BM`` gathered rows that all chose the same (global chunk, head)
in that slot (from :mod:`moba_cute.kernels.slot_index`). Within one pass a (row, head) occurs
at most once, so a tile owns its rows' running state -- the unnormalized fp32 output
``O_acc (total_q, H, D)`` and the row max/sum ``m, l (total_q * H)`` -- and read-modify-writes
it without atomics; passes run in stream order. The state is read at the start of a tile
(``first=False``), the online softmax continues over the chunk's ``BN``-key n-blocks, and at
the end a row either stores the state again or, when this was its last used slot
(``slot + 1 >= nused[row, head]``), writes ``out`` (input dtype) and ``lse`` (fp32, natural
log, layout ``(H, total_q)``) directly. A row's arithmetic does not depend on its position
in the tile, so results are bitwise deterministic whatever order the index lists rows in.

One kernel class; the static configuration (its compile key) is ``(dtype, head_dim, diag,
first, bm, bn, threads, stages)``; all sizes are runtime scalars and all tensors raw global pointers.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warp

from .segments import pass_rows, zero_rows_without_keys

LOG2_E = 1.4426950408889634
LN2 = 0.6931471805599453


def _flat(ptr):
    return cute.make_tensor(ptr, cute.make_layout(1 << 30))


@cute.jit
def partials_max(tpl: cute.Tensor, pbase: Int64, n: Int32, unroll: cutlass.Constexpr):
    """``(M, M_use)`` of ``n`` log2-domain partial LSEs ``tpl[pbase + j]``: their max (fmax:
    a NaN does not win) and the base to weight them by (0 when every one is -inf)."""
    M = -Float32.inf
    for j in cutlass.range(n, unroll=unroll):
        M = cute.arch.fmax(M, tpl[pbase + Int64(j)])
    M_use = M
    if M == -Float32.inf:
        M_use = Float32(0.0)
    return M, M_use


@cute.jit
def store_pair(dtype: cutlass.Constexpr, x0: Float32, x1: Float32, dst: cute.Pointer):
    """Two fp32 values (adjacent columns of an accumulator row) to ``dtype`` and one store of
    both at ``dst`` (4 bytes for a 16-bit ``dtype``, 8 for fp32)."""
    pair = cute.make_rmem_tensor(cute.make_layout(2), Float32)
    pair[0] = x0
    pair[1] = x1
    po = cute.make_rmem_tensor(cute.make_layout(2), dtype)
    po.store(pair.load().to(dtype))
    cute.autovec_copy(po, cute.make_tensor(dst.align(2 * dtype.width // 8), cute.make_layout(2)))


@cute.jit
def _quad_max(x: Float32) -> Float32:
    x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=2))
    x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=1))
    return x


@cute.jit
def _quad_sum(x: Float32) -> Float32:
    x = x + cute.arch.shuffle_sync_bfly(x, offset=2)
    x = x + cute.arch.shuffle_sync_bfly(x, offset=1)
    return x


@cute.jit
def _online_softmax(S_mn: cute.Tensor, O_mn: cute.Tensor, row_max: cute.Tensor, row_sum: cute.Tensor,
                    scale_log2: Float32, corr_out: cute.Tensor = None):
    """One online-softmax step over an m16n8 accumulator tile in (rows, cols) view: each row's
    running max (raw scores, quad-reduced) and sum updated, ``O`` rescaled, and ``S`` replaced by
    ``exp2(S * scale_log2 - max * scale_log2)`` (a row with nothing visible uses max 0). With
    ``corr_out`` the rescale factors go there and ``O`` is left to the caller (whose previous
    ``O += P V`` may still be running on the tensor cores)."""
    for r in cutlass.range_constexpr(cute.size(S_mn, mode=[0])):
        srow = S_mn[r, None].load()
        cur = _quad_max(srow.reduce(cute.ReductionOp.MAX, -Float32.inf, 0))
        m_old = row_max[r]
        m_new = cute.arch.fmax(m_old, cur)
        m_use = m_new
        if m_new == -Float32.inf:
            m_use = Float32(0.0)
        m_scaled = m_use * scale_log2
        e = cute.math.exp2(srow * scale_log2 - m_scaled, fastmath=True)
        corr = cute.math.exp2(m_old * scale_log2 - m_scaled, fastmath=True)
        row_sum[r] = row_sum[r] * corr + e.reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
        if cutlass.const_expr(corr_out is None):
            O_mn[r, None] = O_mn[r, None].load() * corr
        else:
            corr_out[r] = corr
        row_max[r] = m_new
        S_mn[r, None] = e


def _mn_view(t: cute.Tensor) -> cute.Tensor:
    """View an mma.sync m16n8 accumulator partition ((2,2), MMA_M, MMA_N) as (rows, cols)."""
    lay = cute.make_layout(t.layout.shape)
    mn = cute.make_layout(
        ((lay.shape[0][1], lay.shape[1]), (lay.shape[0][0], lay.shape[2])),
        stride=((lay.stride[0][1], lay.stride[1]), (lay.stride[0][0], lay.stride[2])),
    )
    return cute.make_tensor(t.iterator, cute.composition(t.layout, mn))


def _as_a_operand(acc: cute.Tensor, dt):
    """Convert an m16n8 fp32 accumulator (M, N) to the input dtype laid out as the A operand of
    an m16n8k16 mma with K = N (the FA2 register reuse of P)."""
    rP = cute.make_fragment_like(acc, dt)
    rP.store(acc.load().to(dt))
    pl = cute.logical_divide(rP.layout, (None, None, 2))
    return cute.make_tensor(
        rP.iterator,
        cute.make_layout(
            ((pl.shape[0], pl.shape[2][0]), pl.shape[1], pl.shape[2][1]),
            stride=((pl.stride[0], pl.stride[2][0]), pl.stride[1], pl.stride[2][1]),
        ),
    )


class MobaFwdSm80:
    """One pass of the MoBA forward. See the module docstring."""

    def __init__(self, dtype, head_dim: int, diag: bool, first: bool, bm: int = 64, bn: int = 64,
                 threads: int = 128, stages: int = 1, merge: bool = False):
        assert head_dim % 16 == 0
        assert bm == 16 * (threads // 32), "one 16-row mma strip per warp"
        assert (bm * head_dim // 8) % threads == 0 and (bn * head_dim // 8) % threads == 0
        assert bn % 16 == 0
        assert stages in (1, 2)
        assert not merge or (diag and first)
        # merge (the sm90 segment schedule's diagonal, run last): a row with more slots merges
        # the gather kernel's partials (``oacc`` = part_o in the input dtype, ``mst`` = part_lse,
        # ``pass_rel`` = partials per (row, head)) with its own chunk and writes out/lse; a launch
        # covers heads ``h0 .. h0 + nh`` (grid y) and rows ``[row_lo, row_hi)``, the window whose
        # partials the buffer holds (a window of query rows has one head: nh = 1); its diagonal
        # tiles start at ``t0``
        self.merge = bool(merge)
        self.NS = stages  # 1: one K and one V buffer (FA2 order); 2: ring of two (K, V) n-blocks
        self.dtype = dtype
        self.D = head_dim
        self.diag = bool(diag)
        self.first = bool(first)
        self.BM = bm
        self.BN = bn
        self.NT = threads
        self.NW = threads // 32
        self.DP = head_dim + 8  # padded smem rows: conflict-free ldmatrix without swizzle

    @staticmethod
    def compile_key(dtype_name: str, head_dim: int, diag: bool, first: bool, bm: int, bn: int, threads: int,
                    stages: int = 1, merge: bool = False):
        key = ("moba_fwd_sm80", dtype_name, int(head_dim), bool(diag), bool(first), int(bm), int(bn), int(threads),
               int(stages))
        return key + ("merge",) if merge else key

    @cute.jit
    def __call__(
        self,
        q: cute.Pointer,
        k: cute.Pointer,
        v: cute.Pointer,
        out: cute.Pointer,
        lse: cute.Pointer,
        oacc: cute.Pointer,
        mst: cute.Pointer,
        lst: cute.Pointer,
        nused: cute.Pointer,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        tiles: cute.Pointer,  # diag: cu_mtiles (B+1); gather: this pass's [tile_lo, tile_hi)
        rows_list: cute.Pointer,
        tile_seg: cute.Pointer,
        seg_off: cute.Pointer,
        tile_off: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        nseg: Int32,
        slot: Int32,
        pass_rel: Int32,
        h0: Int32,
        nh: Int32,
        row_lo: Int32,
        row_hi: Int32,
        t0: Int32,
        grid_x: Int32,
        scale_log2: Float32,
        stream: cuda.CUstream,
    ):
        tiled_mma = cute.make_tiled_mma(
            warp.MmaF16BF16Op(self.dtype, Float32, (16, 8, 16)),
            (self.NW, 1, 1),
            permutation_mnk=(self.NW * 16, 16, 16),
        )
        grid_y = Int32(1)
        if cutlass.const_expr(self.diag):
            grid_y = nh
        self.kernel(
            q, k, v, out, lse, oacc, mst, lst, nused, cu_q, cu_k, cu_chunks, tiles, rows_list, tile_seg,
            seg_off, tile_off, B, total_q, total_k, H, Hk, chunk_size, nseg, slot, pass_rel, h0, row_lo, row_hi, t0,
            scale_log2,
            tiled_mma,
        ).launch(grid=(grid_x, grid_y, 1), block=(self.NT, 1, 1), stream=stream)

    @cute.kernel
    def kernel(
        self,
        q: cute.Pointer,
        k: cute.Pointer,
        v: cute.Pointer,
        out: cute.Pointer,
        lse: cute.Pointer,
        oacc: cute.Pointer,
        mst: cute.Pointer,
        lst: cute.Pointer,
        nused: cute.Pointer,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        tiles: cute.Pointer,
        rows_list: cute.Pointer,
        tile_seg: cute.Pointer,
        seg_off: cute.Pointer,
        tile_off: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        nseg: Int32,
        slot: Int32,
        pass_rel: Int32,
        h0: Int32,
        row_lo: Int32,
        row_hi: Int32,
        t0: Int32,
        scale_log2: Float32,
        tiled_mma: cute.TiledMma,
    ):
        tid, _, _ = cute.arch.thread_idx()
        bid, by, _ = cute.arch.block_idx()
        BM = self.BM
        BN = self.BN
        D = self.D
        DP = self.DP
        NT = self.NT
        CV = D // 8
        dt = self.dtype
        lane = tid % 32

        smem = cutlass.utils.SmemAllocator()
        sQ = smem.allocate_tensor(dt, cute.make_layout((BM, D), stride=(DP, 1)), 128)
        NS = self.NS
        kv_layout = cute.make_layout((BN, D), stride=(DP, 1))
        sKbuf = smem.allocate_tensor(dt, cute.make_layout(NS * BN * DP), 128)
        sVbuf = smem.allocate_tensor(dt, cute.make_layout(NS * BN * DP), 128)
        sK = cute.make_tensor(sKbuf.iterator, kv_layout)
        sV = cute.make_tensor(sVbuf.iterator, kv_layout)
        sRow = smem.allocate_tensor(Int32, cute.make_layout(BM), 16)  # loadable global row
        sLo = smem.allocate_tensor(Int32, cute.make_layout(BM), 16)  # first visible key (local)
        sHi = smem.allocate_tensor(Int32, cute.make_layout(BM), 16)  # last visible key; < lo: no row
        sP = sRow  # merge: the tile rows' partials merged among themselves (fp32, padded rows)
        sPM = sRow  # merge: their log2-domain max, and weight sum relative to it
        sPW = sRow
        if cutlass.const_expr(self.merge):
            sP = smem.allocate_tensor(Float32, cute.make_layout((BM, D), stride=(D + 8, 1)), 16)
            sPM = smem.allocate_tensor(Float32, cute.make_layout(BM), 16)
            sPW = smem.allocate_tensor(Float32, cute.make_layout(BM), 16)

        # ------------------------------------------------------------------ tile -> rows, keys
        valid, h, ks, kbeg, kend, qs, m0, i_lo = pass_rows(
            self.diag, sRow, sLo, sHi, tid, BM, tiles, cu_q, cu_k, cu_chunks, tile_seg, seg_off, tile_off,
            rows_list, B, total_q, total_k, H, chunk_size, bid + t0, h0 + by, pass_rel * nseg)
        if cutlass.const_expr(self.diag):
            # rows with no key position (p < 0): out = 0, lse = -inf
            zero_rows_without_keys(out, lse, qs, m0, i_lo, h, H, total_q, tid, NT, D, dt)
        cute.arch.sync_threads()

        if valid != 0:
            kvh = h // (H // Hk)
            nblk = (kend - kbeg + BN - 1) // BN
            atom_g2s = cute.make_copy_atom(
                cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dt, num_bits_per_copy=128
            )
            # ---- Q tile (gathered rows) -> smem
            for it in cutlass.range_constexpr(BM * CV // NT):
                idx = tid + it * NT
                r = idx // CV
                cv = idx % CV
                off = (Int64(sRow[r]) * Int64(H) + Int64(h)) * Int64(D) + Int64(cv * 8)
                qsrc = cute.make_tensor(q + cute.assume(off, divby=8), cute.make_layout(8))
                qdst = cute.make_tensor(sQ.iterator + cute.assume(r * DP + cv * 8, divby=8), cute.make_layout(8))
                cute.copy(atom_g2s, qsrc, qdst)
            if cutlass.const_expr(NS == 1):
                cute.arch.cp_async_commit_group()
                self.load_kv(atom_g2s, k, sK, ks, kbeg, kend, Int32(0), Hk, kvh, tid)
                cute.arch.cp_async_commit_group()
            else:
                self.load_kv(atom_g2s, k, sK, ks, kbeg, kend, Int32(0), Hk, kvh, tid)
                self.load_kv(atom_g2s, v, sV, ks, kbeg, kend, Int32(0), Hk, kvh, tid)
                cute.arch.cp_async_commit_group()
                if nblk > 1:
                    sK1 = cute.make_tensor((sKbuf.iterator + BN * DP).align(16), kv_layout)
                    sV1 = cute.make_tensor((sVbuf.iterator + BN * DP).align(16), kv_layout)
                    self.load_kv(atom_g2s, k, sK1, ks, kbeg, kend, Int32(BN), Hk, kvh, tid)
                    self.load_kv(atom_g2s, v, sV1, ks, kbeg, kend, Int32(BN), Hk, kvh, tid)
                cute.arch.cp_async_commit_group()

            if cutlass.const_expr(self.merge):
                # the partials stream in while the Q/K/V copies are in flight; the diagonal's
                # epilogue then reads one merged partial per row from shared memory
                self.premerge(sP, sPM, sPW, sRow, sLo, sHi, oacc, mst, nused, h, H, pass_rel, total_q, h0, row_lo,
                              row_hi, tid)

            # ---- MMA partitions
            thr_mma = tiled_mma.get_slice(tid)
            tSrQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ))
            tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(sK))
            sVt = cute.composition(sV, cute.make_layout((D, BN), stride=(BN, 1)))
            tOrVt = thr_mma.make_fragment_B(thr_mma.partition_B(sVt))
            acc_O = cute.make_rmem_tensor(thr_mma.partition_shape_C((BM, D)), Float32)
            acc_S = cute.make_rmem_tensor(thr_mma.partition_shape_C((BM, BN)), Float32)

            ld = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dt)
            ldt = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4), dt)
            s2r_Q = cute.make_tiled_copy_A(ld, tiled_mma).get_slice(tid)
            s2r_K = cute.make_tiled_copy_B(ld, tiled_mma).get_slice(tid)
            s2r_V = cute.make_tiled_copy_B(ldt, tiled_mma).get_slice(tid)
            tSsQ = s2r_Q.partition_S(sQ)
            tSrQ_v = s2r_Q.retile(tSrQ)
            tSrK_v = s2r_K.retile(tSrK)
            tOrVt_v = s2r_V.retile(tOrVt)

            acc_O_mn = _mn_view(acc_O)
            acc_S_mn = _mn_view(acc_S)
            tOcO_mn = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((BM, D))))
            tScS_mn = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((BM, BN))))
            NR = cute.size(acc_O_mn, mode=[0])  # rows per thread (2)
            NCO = cute.size(acc_O_mn, mode=[1])
            NCS = cute.size(acc_S_mn, mode=[1])

            # ---- per-thread rows
            r_lo = cute.make_rmem_tensor(cute.make_layout(NR), Int32)
            r_hi = cute.make_rmem_tensor(cute.make_layout(NR), Int32)
            r_row = cute.make_rmem_tensor(cute.make_layout(NR), Int32)
            row_max = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
            row_sum = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
            mine = False
            for r in cutlass.range_constexpr(NR):
                m = tOcO_mn[r, 0][0]
                r_lo[r] = sLo[m]
                r_hi[r] = sHi[m]
                r_row[r] = sRow[m]
                mine = mine | (r_lo[r] <= r_hi[r])
            active = cute.arch.vote_any_sync(mine)

            # ---- running state: fresh, or read back from the previous pass
            acc_O.fill(0.0)
            for r in cutlass.range_constexpr(NR):
                row_max[r] = -Float32.inf
                row_sum[r] = Float32(0.0)
            if cutlass.const_expr(not self.first):
                tm = _flat(mst)
                tlst = _flat(lst)
                for r in cutlass.range_constexpr(NR):
                    if r_lo[r] <= r_hi[r]:
                        sridx = Int64(r_row[r]) * Int64(H) + Int64(h)
                        sbase = oacc + sridx * Int64(D)
                        for c in cutlass.range_constexpr(NCO // 2):
                            scol = tOcO_mn[r, (0, c)][1]
                            osrc = cute.make_tensor((sbase + scol).align(8), cute.make_layout(2))
                            cute.autovec_copy(osrc, acc_O_mn[r, (None, c)])
                        row_max[r] = tm[sridx]
                        if lane % 4 == 0:
                            row_sum[r] = tlst[sridx]

            cute.arch.cp_async_wait_group(1)
            cute.arch.sync_threads()
            if active:
                for kb in cutlass.range_constexpr(cute.size(tSsQ.shape[2])):
                    cute.copy(s2r_Q, tSsQ[None, None, kb], tSrQ_v[None, None, kb])

            for nb in cutlass.range(nblk):
                n0 = kbeg + nb * BN
                stage = Int32(0)
                if cutlass.const_expr(NS == 1):
                    cute.arch.cp_async_wait_group(0)
                    cute.arch.sync_threads()
                    self.load_kv(atom_g2s, v, sV, ks, kbeg, kend, nb * BN, Hk, kvh, tid)
                    cute.arch.cp_async_commit_group()
                else:
                    stage = nb % 2
                    cute.arch.cp_async_wait_group(1)
                    cute.arch.sync_threads()
                sKc = cute.make_tensor(sKbuf.iterator + cute.assume(stage * (BN * DP), divby=8), kv_layout)
                sVc = cute.make_tensor(sVbuf.iterator + cute.assume(stage * (BN * DP), divby=8), kv_layout)
                tSsK = s2r_K.partition_S(sKc)
                tOsVt = s2r_V.partition_S(cute.composition(sVc, cute.make_layout((D, BN), stride=(BN, 1))))
                if active:
                    acc_S.fill(0.0)
                    nk = cute.size(tSsK.shape[2])
                    cute.copy(s2r_K, tSsK[None, None, 0], tSrK_v[None, None, 0])
                    for kb in cutlass.range_constexpr(nk):
                        if cutlass.const_expr(kb + 1 < nk):
                            cute.copy(s2r_K, tSsK[None, None, kb + 1], tSrK_v[None, None, kb + 1])
                        cute.gemm(tiled_mma, acc_S, tSrQ[None, None, kb], tSrK[None, None, kb], acc_S)
                if cutlass.const_expr(NS == 1):
                    cute.arch.cp_async_wait_group(0)
                    cute.arch.sync_threads()
                    if nb + 1 < nblk:
                        self.load_kv(atom_g2s, k, sK, ks, kbeg, kend, (nb + 1) * BN, Hk, kvh, tid)
                        cute.arch.cp_async_commit_group()
                if active:
                    # ---- mask (only where an n-block crosses a row's visible range)
                    need = False
                    for r in cutlass.range_constexpr(NR):
                        need = need | (r_lo[r] > n0) | (r_hi[r] < n0 + BN - 1)
                    if need:
                        for r in cutlass.range_constexpr(NR):
                            lo = r_lo[r] - n0
                            hi = r_hi[r] - n0
                            for c in cutlass.range_constexpr(NCS):
                                col = tScS_mn[0, c][1]
                                if (col < lo) | (col > hi):
                                    acc_S_mn[r, c] = -Float32.inf
                    # ---- online softmax
                    _online_softmax(acc_S_mn, acc_O_mn, row_max, row_sum, scale_log2)
                    # ---- O += P V
                    tOrP = _as_a_operand(acc_S, dt)
                    nkv = cute.size(tOrP.shape[2])
                    cute.copy(s2r_V, tOsVt[None, None, 0], tOrVt_v[None, None, 0])
                    for kb in cutlass.range_constexpr(nkv):
                        if cutlass.const_expr(kb + 1 < nkv):
                            cute.copy(s2r_V, tOsVt[None, None, kb + 1], tOrVt_v[None, None, kb + 1])
                        cute.gemm(tiled_mma, acc_O, tOrP[None, None, kb], tOrVt[None, None, kb], acc_O)
                if cutlass.const_expr(NS == 2):
                    # everyone is done with this stage: refill it with n-block nb + 2
                    cute.arch.sync_threads()
                    if nb + 2 < nblk:
                        self.load_kv(atom_g2s, k, sKc, ks, kbeg, kend, (nb + 2) * BN, Hk, kvh, tid)
                        self.load_kv(atom_g2s, v, sVc, ks, kbeg, kend, (nb + 2) * BN, Hk, kvh, tid)
                    cute.arch.cp_async_commit_group()

            # ---- epilogue: store the state, or finish the row
            for r in cutlass.range_constexpr(NR):
                row_sum[r] = _quad_sum(row_sum[r])
            tnu = _flat(nused)
            tm = _flat(mst)
            tlst = _flat(lst)
            for r in cutlass.range_constexpr(NR):
                mine_r = r_lo[r] <= r_hi[r]
                if cutlass.const_expr(self.merge):
                    # rows of other windows: their partials are not in the buffer now
                    mine_r = mine_r & (r_row[r] >= row_lo) & (r_row[r] < row_hi)
                if mine_r:
                    grow = r_row[r]
                    ridx = Int64(grow) * Int64(H) + Int64(h)
                    last = slot + 1 >= tnu[ridx]
                    l = row_sum[r]
                    if last:
                        self.finish_row(acc_O_mn, tOcO_mn, r, l, row_max[r] * scale_log2, out, lse, ridx, grow, h,
                                        total_q, lane)
                    else:
                        if cutlass.const_expr(self.merge):
                            self.merge_row(acc_O_mn, tOcO_mn, r, row_max[r], l, out, lse, sP, sPM, sPW, ridx,
                                           grow, h, total_q, scale_log2, lane)
                        else:
                            abase = oacc + ridx * Int64(D)
                            for c in cutlass.range_constexpr(NCO // 2):
                                acol = tOcO_mn[r, (0, c)][1]
                                adst = cute.make_tensor((abase + acol).align(8), cute.make_layout(2))
                                cute.autovec_copy(acc_O_mn[r, (None, c)], adst)
                            if lane % 4 == 0:
                                tm[ridx] = row_max[r]
                                tlst[ridx] = l

    @cute.jit
    def premerge(self, sP: cute.Tensor, sPM: cute.Tensor, sPW: cute.Tensor, sRow: cute.Tensor, sLo: cute.Tensor,
                 sHi: cute.Tensor, part_o: cute.Pointer, part_lse: cute.Pointer, nused: cute.Pointer, h: Int32,
                 H: Int32, KP: Int32, total_q: Int32, h0: Int32, row_lo: Int32, row_hi: Int32, tid: Int32):
        """Merge each tile row's ``nused - 1`` normalized partials ``part_o[((h - h0) * total_q +
        row - row_lo) * KP + j]`` (the window: heads from ``h0``, rows ``[row_lo, row_hi)``; rows
        outside it take none; log2-domain LSE ``part_lse``), in slot
        order, into ``sP[m] = sum_j 2^(L_j - M) o_j``,
        ``sPM[m] = M = max_j L_j``, ``sPW[m] = sum_j 2^(L_j - M)`` (``M`` taken as 0 when every
        ``L_j`` is -inf). Two threads per row, each 16-byte pieces ``2i + tid % 2`` (a thread pair
        reads 32 contiguous bytes per load), two partials in flight."""
        D = self.D
        CV = D // 8
        NP = CV // 2  # pieces per thread
        tpl = _flat(part_lse)
        tnu = _flat(nused)
        half = tid % 2
        for m in cutlass.range(tid // 2, self.BM, self.NT // 2):
            npart = Int32(0)
            pbase = Int64(0)
            if (sLo[m] <= sHi[m]) & (sRow[m] >= row_lo) & (sRow[m] < row_hi):
                ridx = Int64(sRow[m]) * Int64(H) + Int64(h)
                npart = tnu[ridx] - 1
                pbase = (Int64(h - h0) * Int64(total_q) + Int64(sRow[m] - row_lo)) * Int64(KP)
            M, M_use = partials_max(tpl, pbase, npart, 4)
            acc = cute.make_rmem_tensor(cute.make_layout(NP * 8), Float32)
            acc.fill(0.0)
            wsum = Float32(0.0)
            for j in cutlass.range(npart, unroll=2):
                w = cute.math.exp2(tpl[pbase + Int64(j)] - M_use, fastmath=True)
                wsum = wsum + w
                obase = part_o + (pbase + Int64(j)) * Int64(D)
                for i in cutlass.range_constexpr(NP):
                    pv = cute.make_rmem_tensor(cute.make_layout(8), self.dtype)
                    src = cute.make_tensor(obase + cute.assume((2 * i + half) * 8, divby=8), cute.make_layout(8))
                    cute.autovec_copy(src, pv)
                    pf = pv.load().to(Float32)
                    for e in cutlass.range_constexpr(8):
                        acc[i * 8 + e] = acc[i * 8 + e] + w * pf[e]
            for i in cutlass.range_constexpr(NP):
                dst = cute.make_tensor(sP.iterator + cute.assume(m * (D + 8) + (2 * i + half) * 8, divby=8),
                                       cute.make_layout(8))
                cute.autovec_copy(cute.make_tensor(acc.iterator + i * 8, cute.make_layout(8)), dst)
            if half == 0:
                sPM[m] = M
                sPW[m] = wsum

    @cute.jit
    def merge_row(self, acc_O_mn: cute.Tensor, tOcO_mn: cute.Tensor, r: cutlass.Constexpr, m_own: Float32,
                  l_own: Float32, out: cute.Pointer, lse: cute.Pointer, sP: cute.Tensor, sPM: cute.Tensor,
                  sPW: cute.Tensor, ridx: Int64, grow: Int32, h: Int32, total_q: Int32, scale_log2: Float32,
                  lane: Int32):
        """out/lse of row ``r`` (this thread's columns): the own chunk's (unnormalized O, m, l)
        merged with the row's pre-merged partials (``premerge``)."""
        NCO = cute.size(acc_O_mn, mode=[1])
        m = tOcO_mn[r, 0][0]
        M_p = sPM[m]
        L_own = -Float32.inf
        if (l_own > Float32(0.0)) | (l_own != l_own):  # NaN propagates
            L_own = m_own * scale_log2 + cute.math.log2(l_own, fastmath=False)
        M = cute.arch.fmax(L_own, M_p)
        M_use = M
        if M == -Float32.inf:
            M_use = Float32(0.0)
        own_scale = Float32(0.0)
        w_own = Float32(0.0)
        if (l_own > Float32(0.0)) | (l_own != l_own):  # NaN propagates
            w_own = cute.math.exp2(L_own - M_use, fastmath=True)
            own_scale = w_own / l_own
        # the partials were weighted relative to their own max (0 when all were -inf)
        M_p_use = M_p
        if M_p == -Float32.inf:
            M_p_use = Float32(0.0)
        a = cute.math.exp2(M_p_use - M_use, fastmath=True)
        wsum = w_own + a * sPW[m]
        for c in cutlass.range_constexpr(NCO // 2):
            col = tOcO_mn[r, (0, c)][1]
            pv = cute.make_rmem_tensor(cute.make_layout(2), Float32)
            cute.autovec_copy(cute.make_tensor((sP.iterator + m * (self.D + 8) + col).align(8),
                                               cute.make_layout(2)), pv)
            acc_O_mn[r, (0, c)] = acc_O_mn[r, (0, c)] * own_scale + a * pv[0]
            acc_O_mn[r, (1, c)] = acc_O_mn[r, (1, c)] * own_scale + a * pv[1]
        self.finish_row(acc_O_mn, tOcO_mn, r, wsum, M_use, out, lse, ridx, grow, h, total_q, lane)

    @cute.jit
    def finish_row(self, acc_O_mn: cute.Tensor, tOcO_mn: cute.Tensor, r: cutlass.Constexpr, l: Float32,
                   base_log2: Float32, out: cute.Pointer, lse: cute.Pointer, ridx: Int64, grow: Int32, h: Int32,
                   total_q: Int32, lane: Int32):
        """Write row ``r``'s ``out = O / l`` (this thread's columns, input dtype) and
        ``lse = (base_log2 + log2 l) * ln 2``; ``l = 0`` gives (0, -inf), a NaN ``l`` NaN."""
        NCO = cute.size(acc_O_mn, mode=[1])
        inv = Float32(0.0)
        if (l > Float32(0.0)) | (l != l):  # NaN propagates
            inv = cute.arch.rcp_approx(l)
        obase = out + ridx * Int64(self.D)
        for c in cutlass.range_constexpr(NCO // 2):
            col = tOcO_mn[r, (0, c)][1]
            store_pair(self.dtype, acc_O_mn[r, (0, c)] * inv, acc_O_mn[r, (1, c)] * inv, obase + col)
        if lane % 4 == 0:
            val = -Float32.inf
            if (l > Float32(0.0)) | (l != l):  # NaN propagates
                val = (base_log2 + cute.math.log2(l, fastmath=False)) * LN2
            _flat(lse)[Int64(h) * Int64(total_q) + Int64(grow)] = val

    @cute.jit
    def load_kv(self, atom, src_ptr: cute.Pointer, dst: cute.Tensor, ks: Int32, kbeg: Int32, kend: Int32,
                n0: Int32, Hk: Int32, kvh: Int32, tid: Int32):
        """cp.async one ``BN x D`` n-block of K or V; keys past ``kend`` repeat the last key
        (memory safe; the mask gives them probability 0)."""
        CV = self.D // 8
        for it in cutlass.range_constexpr(self.BN * CV // self.NT):
            idx = tid + it * self.NT
            r = idx // CV
            cv = idx % CV
            t = cutlass.min(kbeg + n0 + r, kend - 1)
            off = ((Int64(ks) + Int64(t)) * Int64(Hk) + Int64(kvh)) * Int64(self.D) + Int64(cv * 8)
            s = cute.make_tensor(src_ptr + cute.assume(off, divby=8), cute.make_layout(8))
            d = cute.make_tensor(dst.iterator + cute.assume(r * self.DP + cv * 8, divby=8), cute.make_layout(8))
            cute.copy(atom, s, d)
