"""MoBA attention backward for sm80-class GPUs (cp.async, ldmatrix, mma.sync m16n8k16).

Two kernels (docs/design.md, section 5), both bitwise deterministic, no atomics:

* :class:`MobaBwdDkvSm80` -- key-major. One CTA per (global chunk ``g``, KV head, ``BN``-key
  tile of the chunk). It walks the routing's key-major row list of the segments
  ``g * H + h`` for the ``G = H // Hk`` query heads of its KV head (adjacent segments: one
  contiguous range of ``query_rows``) in tiles of ``BM`` (row, head) entries, and for each
  tile recomputes ``S^T = K Q^T`` (keys are the mma M dimension), ``P^T = exp(scale S^T -
  lse)``, ``dP^T = V dO^T``, ``dS^T = P^T (dP^T - delta)``, then accumulates ``dV += P^T dO``
  and ``dK += scale dS^T Q`` in registers (``P^T`` / ``dS^T`` are reused from the accumulator
  registers as the A operand, FA2 style). dK, dV are written once, in the input dtype, for
  the keys of the tile. Masks: ``t <= p`` (causal), ``t < Sk`` (partial last chunk), padding
  entries of the last row tile.
* :class:`MobaBwdDqSm80` -- query side, slot passes like the forward: one launch per routing
  slot (causal: a dense diagonal pass for the own chunk, then gather passes for slots 1..K-1;
  same per-slot index as the forward, :mod:`moba_cute.kernels.slot_index`). A tile of ``BM``
  rows (all with the same chunk in this slot, or contiguous rows for the diagonal) recomputes
  ``S``, ``P``, ``dP = dO V^T``, ``dS`` over the chunk's ``BN``-key n-blocks and
  read-modify-writes the rows' fp32 ``dQ_acc`` (already multiplied by the softmax scale);
  within a pass a (row, head) occurs once, passes are stream-ordered, so no atomics and a row's
  arithmetic never depends on its tile position.

``delta = rowsum(dO * O) - dlse`` (fp32, layout ``row * H + h``) and ``lse`` (fp32,
``(H, total_q)``) come from the host.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warp

from .centroids import clamp_seq, find_segment
from .moba_fwd_sm80 import _as_a_operand, _flat, _mn_view
from .segments import pass_rows

LOG2_E = 1.4426950408889634


def _transposed(s: cute.Tensor, rows: int, cols: int):
    """(cols, rows) view of a (rows, cols) shared tile (for ldmatrix.trans B operands)."""
    return cute.composition(s, cute.make_layout((cols, rows), stride=(rows, 1)))


def _tiled_mma(dtype, nw: int):
    return cute.make_tiled_mma(
        warp.MmaF16BF16Op(dtype, Float32, (16, 8, 16)),
        (nw, 1, 1),
        permutation_mnk=(nw * 16, 16, 16),
    )


# ============================================================================ dK, dV (key-major)

class MobaBwdDkvSm80:
    """dK, dV of one (chunk, KV head, key tile) per CTA. See the module docstring."""

    def __init__(self, dtype, head_dim: int, causal: bool, bm: int = 64, bn: int = 64, threads: int = 128):
        assert head_dim % 16 == 0
        assert bn == 16 * (threads // 32), "one 16-key mma strip per warp"
        assert bm % 16 == 0
        assert (bm * head_dim // 8) % threads == 0 and (bn * head_dim // 8) % threads == 0
        self.dtype = dtype
        self.D = head_dim
        self.causal = bool(causal)
        self.BM = bm
        self.BN = bn
        self.NT = threads
        self.NW = threads // 32
        self.DP = head_dim + 8

    @staticmethod
    def compile_key(dtype_name: str, head_dim: int, causal: bool, bm: int, bn: int, threads: int):
        return ("moba_bwd_dkv_sm80", dtype_name, int(head_dim), bool(causal), int(bm), int(bn), int(threads))

    @cute.jit
    def __call__(
        self,
        q: cute.Pointer,
        k: cute.Pointer,
        v: cute.Pointer,
        dout: cute.Pointer,
        lse: cute.Pointer,
        delta: cute.Pointer,
        dk: cute.Pointer,
        dv: cute.Pointer,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        offsets: cute.Pointer,
        query_rows: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        tiles_per_chunk: Int32,
        grid_x: Int32,
        scale: Float32,
        scale_log2: Float32,
        stream: cuda.CUstream,
    ):
        tiled_mma = _tiled_mma(self.dtype, self.NW)
        self.kernel(
            q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, cu_chunks, offsets, query_rows, B, total_q, total_k,
            H, Hk, chunk_size, tiles_per_chunk, scale, scale_log2, tiled_mma,
        ).launch(grid=(grid_x, Hk, 1), block=(self.NT, 1, 1), stream=stream)

    @cute.kernel
    def kernel(
        self,
        q: cute.Pointer,
        k: cute.Pointer,
        v: cute.Pointer,
        dout: cute.Pointer,
        lse: cute.Pointer,
        delta: cute.Pointer,
        dk: cute.Pointer,
        dv: cute.Pointer,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        offsets: cute.Pointer,
        query_rows: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        tiles_per_chunk: Int32,
        scale: Float32,
        scale_log2: Float32,
        tiled_mma: cute.TiledMma,
    ):
        tid, _, _ = cute.arch.thread_idx()
        bid, kvh, _ = cute.arch.block_idx()
        BM = self.BM
        BN = self.BN
        D = self.D
        DP = self.DP
        NT = self.NT
        CV = D // 8
        dt = self.dtype

        smem = cutlass.utils.SmemAllocator()
        sK = smem.allocate_tensor(dt, cute.make_layout((BN, D), stride=(DP, 1)), 128)
        sV = smem.allocate_tensor(dt, cute.make_layout((BN, D), stride=(DP, 1)), 128)
        sQ = smem.allocate_tensor(dt, cute.make_layout((BM, D), stride=(DP, 1)), 128)
        sdO = smem.allocate_tensor(dt, cute.make_layout((BM, D), stride=(DP, 1)), 128)
        sRow = smem.allocate_tensor(Int32, cute.make_layout(BM), 16)
        sHead = smem.allocate_tensor(Int32, cute.make_layout(BM), 16)
        sHi = smem.allocate_tensor(Int32, cute.make_layout(BM), 16)  # last visible key (local); -1: none
        sLse = smem.allocate_tensor(Float32, cute.make_layout(BM), 16)  # lse * log2(e)
        sDel = smem.allocate_tensor(Float32, cute.make_layout(BM), 16)

        tcc = _flat(cu_chunks)
        toff = _flat(offsets)
        g = bid // tiles_per_chunk
        kt = bid - g * tiles_per_chunk
        nch = Int32(0)
        if B > 0:
            nch = tcc[B]
        if g < nch:
            b = find_segment(cu_chunks, B, g)
            qs, qe = clamp_seq(cu_q, b, total_q)
            ks, ke = clamp_seq(cu_k, b, total_k)
            sk = ke - ks
            shift = sk - (qe - qs)
            j = g - tcc[b]
            kbeg = j * chunk_size + kt * BN
            kend = cutlass.min(j * chunk_size + chunk_size, sk)
            kend = cutlass.min(kend, kbeg + BN)
            if kbeg < kend:
                G = H // Hk
                seg_lo = g * H + kvh * G
                e_lo = toff[seg_lo]
                e_hi = toff[seg_lo + G]
                ntile = (e_hi - e_lo + BM - 1) // BM
                atom_g2s = cute.make_copy_atom(
                    cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dt, num_bits_per_copy=128
                )
                self.load_keys(atom_g2s, k, sK, ks, kbeg, kend, Hk, kvh, tid)
                self.load_keys(atom_g2s, v, sV, ks, kbeg, kend, Hk, kvh, tid)
                cute.arch.cp_async_commit_group()

                thr_mma = tiled_mma.get_slice(tid)
                ld = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dt)
                ldt = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4), dt)
                s2r_A = cute.make_tiled_copy_A(ld, tiled_mma).get_slice(tid)
                s2r_B = cute.make_tiled_copy_B(ld, tiled_mma).get_slice(tid)
                s2r_Bt = cute.make_tiled_copy_B(ldt, tiled_mma).get_slice(tid)

                # S^T = K Q^T and dP^T = V dO^T: A = K / V (keys x D), B = Q / dO (rows x D)
                tArK = thr_mma.make_fragment_A(thr_mma.partition_A(sK))
                tArV = thr_mma.make_fragment_A(thr_mma.partition_A(sV))
                tBrQ = thr_mma.make_fragment_B(thr_mma.partition_B(sQ))
                tBrO = thr_mma.make_fragment_B(thr_mma.partition_B(sdO))
                tAsK = s2r_A.partition_S(sK)
                tAsV = s2r_A.partition_S(sV)
                tArK_v = s2r_A.retile(tArK)
                tArV_v = s2r_A.retile(tArV)
                tBsQ = s2r_B.partition_S(sQ)
                tBsO = s2r_B.partition_S(sdO)
                tBrQ_v = s2r_B.retile(tBrQ)
                tBrO_v = s2r_B.retile(tBrO)
                # dV += P^T dO, dK += dS^T Q: B = dO^T / Q^T (D x rows), ldmatrix.trans
                sQt = _transposed(sQ, BM, D)
                sOt = _transposed(sdO, BM, D)
                tBrQt = thr_mma.make_fragment_B(thr_mma.partition_B(sQt))
                tBrOt = thr_mma.make_fragment_B(thr_mma.partition_B(sOt))
                tBsQt = s2r_Bt.partition_S(sQt)
                tBsOt = s2r_Bt.partition_S(sOt)
                tBrQt_v = s2r_Bt.retile(tBrQt)
                tBrOt_v = s2r_Bt.retile(tBrOt)

                acc_dK = cute.make_rmem_tensor(thr_mma.partition_shape_C((BN, D)), Float32)
                acc_dV = cute.make_rmem_tensor(thr_mma.partition_shape_C((BN, D)), Float32)
                acc_S = cute.make_rmem_tensor(thr_mma.partition_shape_C((BN, BM)), Float32)
                acc_P = cute.make_rmem_tensor(thr_mma.partition_shape_C((BN, BM)), Float32)
                acc_dK.fill(0.0)
                acc_dV.fill(0.0)
                acc_S_mn = _mn_view(acc_S)
                acc_P_mn = _mn_view(acc_P)
                tScS_mn = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((BN, BM))))
                NR = cute.size(acc_S_mn, mode=[0])
                NC = cute.size(acc_S_mn, mode=[1])
                nkd = cute.size(tAsK.shape[2])
                nkr = cute.size(tBsQt.shape[2])

                for t in cutlass.range(ntile):
                    # ---- row table of this tile (entries e_lo + t*BM ..)
                    cute.arch.sync_threads()
                    if tid < BM:
                        e = e_lo + t * BM + tid
                        trow = _flat(query_rows)
                        if e < e_hi:
                            row = trow[e]
                            row = cutlass.min(cutlass.max(row, qs), qe - 1)
                            hh = kvh * G
                            for jj in cutlass.range(1, G):
                                if e >= toff[seg_lo + jj]:
                                    hh = hh + 1
                            sRow[tid] = row
                            sHead[tid] = hh
                            if cutlass.const_expr(self.causal):
                                sHi[tid] = row - qs + shift
                            else:
                                sHi[tid] = sk - 1
                            sLse[tid] = _flat(lse)[Int64(hh) * Int64(total_q) + Int64(row)] * LOG2_E
                            sDel[tid] = _flat(delta)[Int64(row) * Int64(H) + Int64(hh)]
                        else:
                            sRow[tid] = cutlass.min(cutlass.max(trow[e_lo], qs), qe - 1)
                            sHead[tid] = kvh * G
                            sHi[tid] = Int32(-1)
                            sLse[tid] = Float32(0.0)
                            sDel[tid] = Float32(0.0)
                    cute.arch.sync_threads()
                    for it in cutlass.range_constexpr(BM * CV // NT):
                        idx = tid + it * NT
                        r = idx // CV
                        cv = idx % CV
                        off = (Int64(sRow[r]) * Int64(H) + Int64(sHead[r])) * Int64(D) + Int64(cv * 8)
                        src = cute.make_tensor(q + cute.assume(off, divby=8), cute.make_layout(8))
                        dst = cute.make_tensor(sQ.iterator + cute.assume(r * DP + cv * 8, divby=8), cute.make_layout(8))
                        cute.copy(atom_g2s, src, dst)
                    cute.arch.cp_async_commit_group()
                    for it in cutlass.range_constexpr(BM * CV // NT):
                        idx = tid + it * NT
                        r = idx // CV
                        cv = idx % CV
                        off = (Int64(sRow[r]) * Int64(H) + Int64(sHead[r])) * Int64(D) + Int64(cv * 8)
                        src = cute.make_tensor(dout + cute.assume(off, divby=8), cute.make_layout(8))
                        dst = cute.make_tensor(sdO.iterator + cute.assume(r * DP + cv * 8, divby=8), cute.make_layout(8))
                        cute.copy(atom_g2s, src, dst)
                    cute.arch.cp_async_commit_group()

                    # ---- S^T = K Q^T
                    cute.arch.cp_async_wait_group(1)
                    cute.arch.sync_threads()
                    acc_S.fill(0.0)
                    for kb in cutlass.range_constexpr(nkd):
                        cute.copy(s2r_A, tAsK[None, None, kb], tArK_v[None, None, kb])
                        cute.copy(s2r_B, tBsQ[None, None, kb], tBrQ_v[None, None, kb])
                        cute.gemm(tiled_mma, acc_S, tArK[None, None, kb], tBrQ[None, None, kb], acc_S)
                    # ---- mask, P^T
                    for c in cutlass.range_constexpr(NC):
                        col = tScS_mn[0, c][1]
                        hi = sHi[col] - kbeg
                        l2 = sLse[col]
                        for r in cutlass.range_constexpr(NR):
                            m = tScS_mn[r, 0][0]
                            x = acc_S_mn[r, c] * scale_log2 - l2
                            if (m > hi) | (m >= kend - kbeg):
                                x = -Float32.inf
                            acc_S_mn[r, c] = cute.math.exp2(x, fastmath=True)
                    # ---- dP^T = V dO^T
                    cute.arch.cp_async_wait_group(0)
                    cute.arch.sync_threads()
                    acc_P.fill(0.0)
                    for kb in cutlass.range_constexpr(nkd):
                        cute.copy(s2r_A, tAsV[None, None, kb], tArV_v[None, None, kb])
                        cute.copy(s2r_B, tBsO[None, None, kb], tBrO_v[None, None, kb])
                        cute.gemm(tiled_mma, acc_P, tArV[None, None, kb], tBrO[None, None, kb], acc_P)
                    # ---- dV += P^T dO
                    tP = _as_a_operand(acc_S, dt)
                    for kb in cutlass.range_constexpr(nkr):
                        cute.copy(s2r_Bt, tBsOt[None, None, kb], tBrOt_v[None, None, kb])
                        cute.gemm(tiled_mma, acc_dV, tP[None, None, kb], tBrOt[None, None, kb], acc_dV)
                    # ---- dS^T = P^T (dP^T - delta) * scale
                    for c in cutlass.range_constexpr(NC):
                        col = tScS_mn[0, c][1]
                        dl = sDel[col]
                        for r in cutlass.range_constexpr(NR):
                            acc_P_mn[r, c] = acc_S_mn[r, c] * (acc_P_mn[r, c] - dl) * scale
                    # ---- dK += dS^T Q
                    tdS = _as_a_operand(acc_P, dt)
                    for kb in cutlass.range_constexpr(nkr):
                        cute.copy(s2r_Bt, tBsQt[None, None, kb], tBrQt_v[None, None, kb])
                        cute.gemm(tiled_mma, acc_dK, tdS[None, None, kb], tBrQt[None, None, kb], acc_dK)

                # ---- epilogue: dK, dV of the tile's real keys, input dtype
                acc_dK_mn = _mn_view(acc_dK)
                acc_dV_mn = _mn_view(acc_dV)
                tOcO_mn = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((BN, D))))
                NCO = cute.size(acc_dK_mn, mode=[1])
                for r in cutlass.range_constexpr(NR):
                    m = tOcO_mn[r, 0][0]
                    if m < kend - kbeg:
                        base = ((Int64(ks) + Int64(kbeg + m)) * Int64(Hk) + Int64(kvh)) * Int64(D)
                        for c in cutlass.range_constexpr(NCO // 2):
                            col = tOcO_mn[r, (0, c)][1]
                            pk = cute.make_rmem_tensor(cute.make_layout(2), dt)
                            pk.store(acc_dK_mn[r, (None, c)].load().to(dt))
                            cute.autovec_copy(pk, cute.make_tensor((dk + base + col).align(4), cute.make_layout(2)))
                            pv = cute.make_rmem_tensor(cute.make_layout(2), dt)
                            pv.store(acc_dV_mn[r, (None, c)].load().to(dt))
                            cute.autovec_copy(pv, cute.make_tensor((dv + base + col).align(4), cute.make_layout(2)))

    @cute.jit
    def load_keys(self, atom, src_ptr: cute.Pointer, dst: cute.Tensor, ks: Int32, kbeg: Int32, kend: Int32,
                  Hk: Int32, kvh: Int32, tid: Int32):
        """cp.async the ``BN x D`` key tile; keys past ``kend`` repeat the last key (masked)."""
        CV = self.D // 8
        for it in cutlass.range_constexpr(self.BN * CV // self.NT):
            idx = tid + it * self.NT
            r = idx // CV
            cv = idx % CV
            t = cutlass.min(kbeg + r, kend - 1)
            off = ((Int64(ks) + Int64(t)) * Int64(Hk) + Int64(kvh)) * Int64(self.D) + Int64(cv * 8)
            s = cute.make_tensor(src_ptr + cute.assume(off, divby=8), cute.make_layout(8))
            d = cute.make_tensor(dst.iterator + cute.assume(r * self.DP + cv * 8, divby=8), cute.make_layout(8))
            cute.copy(atom, s, d)


# ============================================================================ dQ (slot passes)

class MobaBwdDqSm80:
    """One dQ pass (diagonal or gather). See the module docstring."""

    def __init__(self, dtype, head_dim: int, diag: bool, bm: int = 64, bn: int = 64, threads: int = 128):
        assert head_dim % 16 == 0
        assert bm == 16 * (threads // 32), "one 16-row mma strip per warp"
        assert (bm * head_dim // 8) % threads == 0 and (bn * head_dim // 8) % threads == 0
        assert bn % 16 == 0
        self.dtype = dtype
        self.D = head_dim
        self.diag = bool(diag)
        self.BM = bm
        self.BN = bn
        self.NT = threads
        self.NW = threads // 32
        self.DP = head_dim + 8

    @staticmethod
    def compile_key(dtype_name: str, head_dim: int, diag: bool, bm: int, bn: int, threads: int):
        return ("moba_bwd_dq_sm80", dtype_name, int(head_dim), bool(diag), int(bm), int(bn), int(threads))

    @cute.jit
    def __call__(
        self,
        q: cute.Pointer,
        k: cute.Pointer,
        v: cute.Pointer,
        dout: cute.Pointer,
        lse: cute.Pointer,
        delta: cute.Pointer,
        dq_acc: cute.Pointer,
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
        pass_rel: Int32,
        grid_x: Int32,
        scale: Float32,
        scale_log2: Float32,
        stream: cuda.CUstream,
    ):
        tiled_mma = _tiled_mma(self.dtype, self.NW)
        grid_y = Int32(1)
        if cutlass.const_expr(self.diag):
            grid_y = H
        self.kernel(
            q, k, v, dout, lse, delta, dq_acc, cu_q, cu_k, cu_chunks, tiles, rows_list, tile_seg, seg_off,
            tile_off, B, total_q, total_k, H, Hk, chunk_size, nseg, pass_rel, scale, scale_log2, tiled_mma,
        ).launch(grid=(grid_x, grid_y, 1), block=(self.NT, 1, 1), stream=stream)

    @cute.kernel
    def kernel(
        self,
        q: cute.Pointer,
        k: cute.Pointer,
        v: cute.Pointer,
        dout: cute.Pointer,
        lse: cute.Pointer,
        delta: cute.Pointer,
        dq_acc: cute.Pointer,
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
        pass_rel: Int32,
        scale: Float32,
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

        smem = cutlass.utils.SmemAllocator()
        sQ = smem.allocate_tensor(dt, cute.make_layout((BM, D), stride=(DP, 1)), 128)
        sdO = smem.allocate_tensor(dt, cute.make_layout((BM, D), stride=(DP, 1)), 128)
        sK = smem.allocate_tensor(dt, cute.make_layout((BN, D), stride=(DP, 1)), 128)
        sV = smem.allocate_tensor(dt, cute.make_layout((BN, D), stride=(DP, 1)), 128)
        sRow = smem.allocate_tensor(Int32, cute.make_layout(BM), 16)
        sLo = smem.allocate_tensor(Int32, cute.make_layout(BM), 16)
        sHi = smem.allocate_tensor(Int32, cute.make_layout(BM), 16)

        # ------------------------------------------------------------------ tile -> rows, keys
        valid, h, ks, kbeg, kend, _, _, _ = pass_rows(
            self.diag, sRow, sLo, sHi, tid, BM, tiles, cu_q, cu_k, cu_chunks, tile_seg, seg_off, tile_off,
            rows_list, B, total_q, total_k, H, chunk_size, bid, by, pass_rel * nseg)
        cute.arch.sync_threads()

        if valid != 0:
            kvh = h // (H // Hk)
            nblk = (kend - kbeg + BN - 1) // BN
            atom_g2s = cute.make_copy_atom(
                cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dt, num_bits_per_copy=128
            )
            for it in cutlass.range_constexpr(BM * CV // NT):
                idx = tid + it * NT
                r = idx // CV
                cv = idx % CV
                off = (Int64(sRow[r]) * Int64(H) + Int64(h)) * Int64(D) + Int64(cv * 8)
                cute.copy(atom_g2s, cute.make_tensor(q + cute.assume(off, divby=8), cute.make_layout(8)),
                          cute.make_tensor(sQ.iterator + cute.assume(r * DP + cv * 8, divby=8), cute.make_layout(8)))
                cute.copy(atom_g2s, cute.make_tensor(dout + cute.assume(off, divby=8), cute.make_layout(8)),
                          cute.make_tensor(sdO.iterator + cute.assume(r * DP + cv * 8, divby=8), cute.make_layout(8)))
            cute.arch.cp_async_commit_group()

            thr_mma = tiled_mma.get_slice(tid)
            ld = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dt)
            ldt = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4), dt)
            s2r_A = cute.make_tiled_copy_A(ld, tiled_mma).get_slice(tid)
            s2r_B = cute.make_tiled_copy_B(ld, tiled_mma).get_slice(tid)
            s2r_Bt = cute.make_tiled_copy_B(ldt, tiled_mma).get_slice(tid)
            tArQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ))
            tArO = thr_mma.make_fragment_A(thr_mma.partition_A(sdO))
            tBrK = thr_mma.make_fragment_B(thr_mma.partition_B(sK))
            tBrV = thr_mma.make_fragment_B(thr_mma.partition_B(sV))
            sKt = _transposed(sK, BN, D)
            tBrKt = thr_mma.make_fragment_B(thr_mma.partition_B(sKt))
            tAsQ = s2r_A.partition_S(sQ)
            tAsO = s2r_A.partition_S(sdO)
            tBsK = s2r_B.partition_S(sK)
            tBsV = s2r_B.partition_S(sV)
            tBsKt = s2r_Bt.partition_S(sKt)
            tArQ_v = s2r_A.retile(tArQ)
            tArO_v = s2r_A.retile(tArO)
            tBrK_v = s2r_B.retile(tBrK)
            tBrV_v = s2r_B.retile(tBrV)
            tBrKt_v = s2r_Bt.retile(tBrKt)

            acc_dQ = cute.make_rmem_tensor(thr_mma.partition_shape_C((BM, D)), Float32)
            acc_S = cute.make_rmem_tensor(thr_mma.partition_shape_C((BM, BN)), Float32)
            acc_P = cute.make_rmem_tensor(thr_mma.partition_shape_C((BM, BN)), Float32)
            acc_dQ_mn = _mn_view(acc_dQ)
            acc_S_mn = _mn_view(acc_S)
            acc_P_mn = _mn_view(acc_P)
            tOcO_mn = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((BM, D))))
            tScS_mn = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((BM, BN))))
            NR = cute.size(acc_dQ_mn, mode=[0])
            NCO = cute.size(acc_dQ_mn, mode=[1])
            NCS = cute.size(acc_S_mn, mode=[1])
            nkd = cute.size(tAsQ.shape[2])
            nkn = cute.size(tBsKt.shape[2])

            r_lo = cute.make_rmem_tensor(cute.make_layout(NR), Int32)
            r_hi = cute.make_rmem_tensor(cute.make_layout(NR), Int32)
            r_row = cute.make_rmem_tensor(cute.make_layout(NR), Int32)
            r_l2 = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
            r_dl = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
            mine = False
            tl = _flat(lse)
            tdl = _flat(delta)
            for r in cutlass.range_constexpr(NR):
                m = tOcO_mn[r, 0][0]
                r_lo[r] = sLo[m]
                r_hi[r] = sHi[m]
                r_row[r] = sRow[m]
                mine = mine | (r_lo[r] <= r_hi[r])
                r_l2[r] = tl[Int64(h) * Int64(total_q) + Int64(r_row[r])] * LOG2_E
                r_dl[r] = tdl[Int64(r_row[r]) * Int64(H) + Int64(h)]
            active = cute.arch.vote_any_sync(mine)

            # ---- dQ_acc in (fp32, zero-initialized by the host)
            acc_dQ.fill(0.0)
            for r in cutlass.range_constexpr(NR):
                if r_lo[r] <= r_hi[r]:
                    sbase = dq_acc + (Int64(r_row[r]) * Int64(H) + Int64(h)) * Int64(D)
                    for c in cutlass.range_constexpr(NCO // 2):
                        scol = tOcO_mn[r, (0, c)][1]
                        cute.autovec_copy(cute.make_tensor((sbase + scol).align(8), cute.make_layout(2)),
                                          acc_dQ_mn[r, (None, c)])

            for nb in cutlass.range(nblk):
                n0 = kbeg + nb * BN
                cute.arch.sync_threads()  # everyone is done with the previous K / V
                self.load_kv(atom_g2s, k, sK, ks, n0, kend, Hk, kvh, tid)
                cute.arch.cp_async_commit_group()
                self.load_kv(atom_g2s, v, sV, ks, n0, kend, Hk, kvh, tid)
                cute.arch.cp_async_commit_group()
                cute.arch.cp_async_wait_group(1)
                cute.arch.sync_threads()
                if active:
                    acc_S.fill(0.0)
                    for kb in cutlass.range_constexpr(nkd):
                        cute.copy(s2r_A, tAsQ[None, None, kb], tArQ_v[None, None, kb])
                        cute.copy(s2r_B, tBsK[None, None, kb], tBrK_v[None, None, kb])
                        cute.gemm(tiled_mma, acc_S, tArQ[None, None, kb], tBrK[None, None, kb], acc_S)
                    for r in cutlass.range_constexpr(NR):
                        lo = r_lo[r] - n0
                        hi = r_hi[r] - n0
                        for c in cutlass.range_constexpr(NCS):
                            col = tScS_mn[0, c][1]
                            x = acc_S_mn[r, c] * scale_log2 - r_l2[r]
                            if (col < lo) | (col > hi):
                                x = -Float32.inf
                            acc_S_mn[r, c] = cute.math.exp2(x, fastmath=True)
                cute.arch.cp_async_wait_group(0)
                cute.arch.sync_threads()
                if active:
                    acc_P.fill(0.0)
                    for kb in cutlass.range_constexpr(nkd):
                        cute.copy(s2r_A, tAsO[None, None, kb], tArO_v[None, None, kb])
                        cute.copy(s2r_B, tBsV[None, None, kb], tBrV_v[None, None, kb])
                        cute.gemm(tiled_mma, acc_P, tArO[None, None, kb], tBrV[None, None, kb], acc_P)
                    for r in cutlass.range_constexpr(NR):
                        for c in cutlass.range_constexpr(NCS):
                            acc_P_mn[r, c] = acc_S_mn[r, c] * (acc_P_mn[r, c] - r_dl[r]) * scale
                    tdS = _as_a_operand(acc_P, dt)
                    for kb in cutlass.range_constexpr(nkn):
                        cute.copy(s2r_Bt, tBsKt[None, None, kb], tBrKt_v[None, None, kb])
                        cute.gemm(tiled_mma, acc_dQ, tdS[None, None, kb], tBrKt[None, None, kb], acc_dQ)

            # ---- dQ_acc out
            for r in cutlass.range_constexpr(NR):
                if r_lo[r] <= r_hi[r]:
                    abase = dq_acc + (Int64(r_row[r]) * Int64(H) + Int64(h)) * Int64(D)
                    for c in cutlass.range_constexpr(NCO // 2):
                        acol = tOcO_mn[r, (0, c)][1]
                        cute.autovec_copy(acc_dQ_mn[r, (None, c)],
                                          cute.make_tensor((abase + acol).align(8), cute.make_layout(2)))

    @cute.jit
    def load_kv(self, atom, src_ptr: cute.Pointer, dst: cute.Tensor, ks: Int32, n0: Int32, kend: Int32,
                Hk: Int32, kvh: Int32, tid: Int32):
        CV = self.D // 8
        for it in cutlass.range_constexpr(self.BN * CV // self.NT):
            idx = tid + it * self.NT
            r = idx // CV
            cv = idx % CV
            t = cutlass.min(n0 + r, kend - 1)
            off = ((Int64(ks) + Int64(t)) * Int64(Hk) + Int64(kvh)) * Int64(self.D) + Int64(cv * 8)
            s = cute.make_tensor(src_ptr + cute.assume(off, divby=8), cute.make_layout(8))
            d = cute.make_tensor(dst.iterator + cute.assume(r * self.DP + cv * 8, divby=8), cute.make_layout(8))
            cute.copy(atom, s, d)
