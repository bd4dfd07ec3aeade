"""MoBA attention backward for Hopper (sm90): one key-major kernel per (global chunk, KV head)
that computes dK, dV and every pair's dQ contribution (TMA, wgmma, warp specialization).

Schedule (docs/design.md, section 9): the CTA of chunk ``g`` and KV head ``kvh`` keeps the
chunk's K and V (``C <= BN = 128`` keys, one TMA box each) in shared memory and walks the
pairs of the segments ``g * H + kvh * G + j`` (``G = H // Hk`` query heads of the KV group;
own-chunk pairs included, which get the causal mask) in 64-row sub-tiles. The entries are
pair indices ``p = (row * H + h) * K + slot`` (``PairListKernel(causal=False,
fill_tail=True)`` over the routing's key-major index: every selected pair, own chunk in slot 0;
-1 for an entry it dropped).

* producer warpgroup (``setmaxnreg`` down): gathers each sub-tile's Q and dO rows with 16-byte
  ``cp.async`` into swizzled rings, and the rows' pair index, LSE and ``delta`` with 4-byte
  ``cp.async`` (``PipelineCpAsync``, two stages); warp 0 loads K and V with TMA once;
* two consumer warpgroups (``setmaxnreg`` up), each owning 64 of the chunk's keys (the M
  dimension of the swapped products, FA3's ``SdP_swapAB``): ``S^T = K Q^T`` and
  ``dP^T = V dO^T`` (SS wgmma), ``P^T = exp2(S^T * scale_log2 - lse_log2)`` (masked:
  padding rows, keys past the chunk, causal ``t <= pos`` on own-chunk pairs),
  ``dS^T = P^T (dP^T - delta) * scale``; ``dV += P^T dO`` and ``dK += dS^T Q`` with ``P^T``,
  ``dS^T`` as register A operands (RS wgmma); ``dS^T`` is also stored transposed to shared
  memory (rows contiguous: the MN-major A operand), and the two warpgroups compute
  ``dQ_p = dS K`` for the sub-tile, each for half of the head dim, and stage pair ``p``'s
  partial in the input dtype in one of two shared buffers; the producer warpgroup copies a
  staged sub-tile out in 16-byte pieces while the consumers go on with the next one
  (``PipelineAsync`` of two stages, consumers -> producer).

``with_dq=False`` (chunks over 128 keys): one CTA per 128-key tile of a chunk computes dK and
dV only (``chunks * ktiles * Hk`` CTAs); the chunk's dQ partials come from
:class:`~moba_cute.kernels.moba_bwd_dq_sm90.MobaBwdDqSm90Pair` (or ``MobaBwdDqSm90``), which
stream the key tiles. This variant skips a sub-tile none of whose rows sees the CTA's key tile
(``reach_skip``: causal own-chunk rows before the tile), and with ``pingpong`` its two
warpgroups take turns issuing their wgmmas (FA3's ping-pong; each keeps its own copy of the rows'
last visible keys, so they meet at no barrier but the turns).

``chain=True`` (chunks over 128 keys, ``MOBA_CUTE_BWD_DQ_CHAIN``; the 5-GEMM schedule): the
one-pass kernel per 128-key tile, its dQ contributions staged in fp32; warps 0-1 of the producer
warpgroup gather, warps 2-3 add each staged sub-tile to the pair's fp32 accumulator in key-tile
order (:meth:`MobaBwdSm90.chain_issue`: a semaphore per sub-tile, one bulk copy or bulk reduce-add
per row), so no dQ kernel recomputes ``S`` and ``dP``; the sums stay bitwise deterministic.

``overlap=True`` (the default where it fits the registers, ``configs/attention_sm90.BWD_OVERLAP``):
a sub-tile in FA3/FA4's order, ``dV``, ``dQ_p`` and ``dK`` issued back to back and ``dQ_p`` staged
while ``dK`` runs (``dQ_p``'s accumulator in ``S^T``'s registers), instead of ``dK``, drain,
``dQ_p``, drain, stage; the same GEMMs on the same operands, so the same bits.

``persistent=True`` (chunks of one key tile in the overlapped order, ``MOBA_CUTE_BWD_PERSISTENT``;
``configs/attention_sm90.BWD_PERSISTENT``): a grid of about one CTA
per SM walks the launch's (chunk, KV head) units, taken from a counter (:meth:`producer_persistent`,
:meth:`consumer_persistent`): a unit's K/V load and first gathers overlap the previous unit's last
sub-tiles and its dK/dV store; the same GEMMs per pair, so the same bits.

The partial buffer holds one window of KV heads: a launch covers KV heads ``[kv0, kv0 + nkv)``
(a linear grid of ``chunks * nkv`` CTAs, chunk-major; ``Hw = nkv * G`` query heads) and stores
pair ``(row, h, slot)`` at ``((row * Hw + h - kv0 * G) * K + slot) * D``, so the launch plan bounds the buffer's size
(docs/design.md, section 9) by running the key-major kernel and the reduction once per window.

dK and dV are written once, in the input dtype, when the CTA ends. A row-wise kernel
(:class:`~moba_cute.kernels.bwd_rowwise.DqReduceKernel`) sums a row's partials in slot order:
no atomics, bitwise deterministic (a pair's arithmetic does not depend on its place in the
sub-tile). Compile key: ``(dtype, head_dim, causal)``, plus ``"dkv"`` for ``with_dq=False`` or
``"chain"`` for the chain, and ``"ovl"`` for the overlapped order (:meth:`MobaBwdSm90.compile_key`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.utils import LayoutEnum
from cutlass.cutlass_dsl import dsl_user_op
from cutlass._mlir.dialects import llvm

from .centroids import clamp_seq, find_segment
from .moba_fwd_sm80 import _flat, store_pair
from .moba_fwd_sm90 import (PP_BARRIER, PingPong, acc_as_a_operand, acc_mn_view, gather_tma_pipelines,
                           gemm_kblocks, kernel_prologue, kv_tma_atoms, kv_tma_views, ring_state, swizzled_index,
                           zero_rows_from)

BM = 64  # rows (pairs) per sub-tile: the N dimension of S^T, the M dimension of dQ
BN = 128  # keys per CTA: two consumer warpgroups of 64 (the M dimension of S^T, dK, dV)
QS = 2  # Q / dO / row-data ring stages
# the launch gives 168 registers to each of 384 threads: the producer's 128 threads hand back
# 136 each (17408), of which each of the 256 consumer threads takes 64 more (16384). 32 for the
# producer: with 24, ptxas spills one of its gather offsets
PRODUCER_REGS = 32
CONSUMER_REGS = 232
# the persistent walk's producer holds its unit and ring states across the gathers (spills 8
# bytes with 32); the pool has 8 more: 40 * 128 + 232 * 256 = 168 * 384
PRODUCER_REGS_PERSISTENT = 40
BAR_META = 1  # named barriers among the 256 consumer threads
BAR_DS = 2
# (3, 4: the ping-pong's PP_BARRIER + 0 / 1) 5, 6: a warpgroup's own row data written (ping-pong)
BAR_ROWS = 5
BAR_CHAIN = 7  # the chain's adding warps: the dQ chain's semaphore taken / released
BAR_SCHED = 8  # the persistent walk's producer warpgroup: the next unit taken
UNIT_FIELDS = 16  # a unit hand-over slot (persistent walk): 10 fields used, padded
CHAIN_THREADS = 64  # the chain: warps 0-1 of the producer warpgroup gather, warps 2-3 add


@cute.jit
def warp_max_i32(x: Int32):
    """The largest ``x`` of the warp's 32 lanes (butterfly shuffles), in every lane."""
    for off in cutlass.range_constexpr(5):
        x = cutlass.max(x, cute.arch.shuffle_sync_bfly(x, offset=16 >> off))
    return x


class DkvFrags(NamedTuple):
    """A consumer thread's wgmma operands and accumulators in :meth:`MobaBwdSm90.consumer`:
    ``S^T``/``dP^T`` (A = K, V; B = Q, dO), dV/dK's B (dO^T, Q^T), dQ's A (sdS) and B (K^T), the
    accumulators, ``P^T`` and ``dS^T`` in the input dtype and as register A operands, and the
    (rows, cols) views of S^T, dP^T, dQ and their coordinates."""
    tSrK: Any
    tSrV: Any
    tSrQ: Any
    tSrdO: Any
    tVrdOt: Any
    tKrQt: Any
    tQrdS: Any
    tQrKt: Any
    acc_S: Any
    acc_dP: Any
    acc_dK: Any
    acc_dV: Any
    acc_dQ: Any
    rP: Any
    rdS: Any
    tPa: Any
    tdSa: Any
    S_mn: Any
    dP_mn: Any
    cS_mn: Any
    dQ_mn: Any
    cQ_mn: Any


@dsl_user_op
def bulk_store_s2g(smem: cute.Pointer, gmem: cute.Pointer, nbytes: int, *, loc=None, ip=None):
    """``nbytes`` (a multiple of 16, both addresses 16-byte aligned) from shared to global memory
    by the TMA unit (``cp.async.bulk``, bulk group: wait with ``cp_async_bulk_wait_group``)."""
    llvm.inline_asm(None, [gmem.llvm_ptr, smem.toint(loc=loc, ip=ip).ir_value(), Int32(nbytes).ir_value()],
                    "cp.async.bulk.global.shared::cta.bulk_group [$0], [$1], $2;", "l,r,r",
                    has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)


@dsl_user_op
def bulk_reduce_add_f32(smem: cute.Pointer, gmem: cute.Pointer, nbytes: int, *, loc=None, ip=None):
    """As :func:`bulk_store_s2g`, adding fp32 values to global memory (in L2, element-wise atomic)."""
    llvm.inline_asm(None, [gmem.llvm_ptr, smem.toint(loc=loc, ip=ip).ir_value(), Int32(nbytes).ir_value()],
                    "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [$0], [$1], $2;", "l,r,r",
                    has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)


class MobaBwdSm90(PingPong):
    """dK, dV and per-pair dQ partials of one (chunk, KV head); see the module docstring.
    ``with_dq=False``: dK and dV only, for chunks longer than one key tile (one CTA per 128-key
    tile of a chunk; their dQ comes from
    :class:`~moba_cute.kernels.moba_bwd_dq_sm90.MobaBwdDqSm90`)."""

    def __init__(self, dtype, head_dim: int, causal: bool, with_dq: bool = True, pingpong: bool = False,
                 reach_skip: bool = True, chain: bool = False, chain_pipe: bool = False, overlap: bool = False,
                 persistent: bool = False):
        assert head_dim in (64, 128), "128-byte swizzled rows"
        assert not (persistent and (chain or not with_dq)), "the persistent walk: the one-pass kernel, no chain"
        # a grid of about one CTA per SM walks the (chunk, KV head) units, taken from a counter
        # (:meth:`producer_persistent`): a unit's K/V load and first gathers overlap the
        # previous unit's last sub-tiles instead of starting a CTA (chunks of one key tile)
        self.persistent = bool(persistent)
        assert not (pingpong and with_dq), "ping-pong: the dK/dV-only kernel"
        assert not (overlap and not with_dq), "the overlapped sub-tile: the one-pass kernel"
        assert not (chain and not with_dq), "the dQ chain: the one-pass kernel"
        # chunks over one key tile, 5 GEMMs: each 128-key tile's CTA adds its dQ contribution to
        # the pair's fp32 accumulator in key-tile order (a semaphore per sub-tile; docs/design.md
        # section 9), instead of MobaBwdDqSm90 recomputing S and dP
        self.chain = bool(chain)
        # the chain's adding warps release a sub-tile's semaphore after issuing the next sub-tile
        # (its writes finish meanwhile) and hand the staging buffer back once it is read
        self.chain_pipe = bool(chain_pipe)
        # FA3/FA4's order within a sub-tile: dQ issued right after dV and before dK, and staged
        # while dK runs (instead of dK, drain, dQ, drain, stage)
        self.overlap = bool(overlap)
        # the dQ staging buffers' row stride in elements (rows padded by 16 bytes: the 8 rows of a
        # fragment store fall in distinct banks): fp32 for the chain, else the input dtype
        self.dq_rs = head_dim + (4 if self.chain else 8)
        self.dtype = dtype
        self.D = head_dim
        self.causal = bool(causal)
        self.with_dq = bool(with_dq)
        # the two warpgroups take turns issuing their wgmmas (FA3's ping-pong), so one's exp2 and
        # selects run under the other's GEMMs; each then keeps its own copy of the rows' data
        self.pingpong = bool(pingpong)
        self.HI_COPIES = 2 if self.pingpong else 1
        # each sub-tile's reach (its rows' largest last visible key), for skipping the key tiles
        # past it (:meth:`sub_tile_reach`): with chunks over one key tile
        self.track_reach = (not self.with_dq or self.chain) and bool(reach_skip)
        self.THREADS = 384  # producer + two consumer warpgroups
        self.QS = QS

    @staticmethod
    def compile_key(dtype_name: str, head_dim: int, causal: bool, with_dq: bool = True, pingpong: bool = False,
                    reach_skip: bool = True, chain: bool = False, chain_pipe: bool = False, overlap: bool = False,
                    persistent: bool = False):
        key = ("moba_bwd_sm90", dtype_name, int(head_dim), bool(causal))
        if with_dq:
            return (key + (("chain",) + ("noskip",) * (not reach_skip) + ("pipe",) * bool(chain_pipe)) * bool(chain)
                    + ("ovl",) * bool(overlap) + ("persist",) * bool(persistent))
        return key + ("dkv",) + ("pingpong",) * bool(pingpong) + ("noskip",) * (not reach_skip)

    def _layouts(self):
        dt, D = self.dtype, self.D
        atom_d = warpgroup.make_smem_layout_atom(sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dt, D), dt)
        sQ = cute.tile_to_shape(atom_d, (BM, D, self.QS), order=(0, 1, 2))
        sK = cute.tile_to_shape(atom_d, (BN, D, 1), order=(0, 1, 2))
        # dS (rows x keys, rows contiguous): the MN-major A operand of dQ = dS K, so that the
        # fragment of dS^T (keys x rows) is stored as pairs of adjacent rows (4-byte stores)
        atom_s = warpgroup.make_smem_layout_atom(sm90_utils.get_smem_layout_atom(LayoutEnum.COL_MAJOR, dt, BM), dt)
        sdS = cute.tile_to_shape(atom_s, (BM, BN), order=(1, 0))
        return sQ, sK, sdS

    def _storage(self, sQ_layout, sK_layout, sdS_layout, kv_stages: int, dq_staging: bool):
        """The shared-memory struct of both backward kernels: mbarriers, each ring stage's row
        data, the Q/dO rings, K/V (``kv_stages``), dS; with ``dq_staging`` the one-pass kernel's
        dQ staging buffers and their mbarriers."""
        dt, D = self.dtype, self.D
        MR, AL = cute.struct.MemRange, cute.struct.Align
        fields = {"mbar_q": MR[cutlass.Int64, 2 * self.QS], "mbar_kv": MR[cutlass.Int64, 2 * kv_stages]}
        if dq_staging:
            fields["mbar_dq"] = MR[cutlass.Int64, 4]  # dQ staging handoff, 2 buffers
        if self.persistent:
            fields["mbar_unit"] = MR[cutlass.Int64, 4]  # unit hand-over, 2 slots
            fields["sUnit"] = AL[MR[Int32, 2 * UNIT_FIELDS], 16]
        for name in ("sPidx", "sLse", "sDel", "sHi", "sLoc"):  # row data of each ring stage
            n = BM * self.QS * (self.HI_COPIES if name == "sHi" else 1)
            fields[name] = AL[MR[Float32 if name in ("sLse", "sDel") else Int32, n], 16]
        if self.track_reach:  # the largest last visible key of each half (32 rows) of a sub-tile
            fields["sMaxHi"] = AL[MR[Int32, 2 * self.QS * self.HI_COPIES], 16]
        for name, layout in (("sQ", sQ_layout), ("sdO", sQ_layout), ("sK", sK_layout), ("sV", sK_layout),
                             ("sdS", sdS_layout)):
            fields[name] = AL[MR[dt, cute.cosize(layout)], 1024]
        if dq_staging:
            # dQ partials of two sub-tiles (rows padded by 16 bytes), their rows' places (-1: none)
            # (the chain: fp32, added to the pair's accumulator)
            fields["sdQ"] = AL[MR[Float32 if self.chain else dt, 2 * BM * self.dq_rs], 128]
            fields["sLocQ"] = AL[MR[Int32, 2 * BM], 16]
        return cute.struct(type("Storage", (), {"__annotations__": fields}))

    def _mma_dq(self):
        """dQ = dS K: A = sdS (MN-major, :meth:`_layouts`), B = K^T (MN-major view of sK); the
        head dim split over the two consumer warpgroups."""
        MN_ = warpgroup.OperandMajorMode.MN
        return sm90_utils.make_trivial_tiled_mma(self.dtype, self.dtype, MN_, MN_, Float32, (1, 2, 1),
                                                 (BM, self.D // 2))

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
        part_dq: cute.Pointer,
        sems: cute.Pointer,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        offsets: cute.Pointer,
        pairs: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        topk: Int32,
        kv0: Int32,
        Hw: Int32,
        ktiles: Int32,
        nchunks: Int32,
        nkv: Int32,
        scale: Float32,
        scale_log2: Float32,
        stream: cuda.CUstream,
    ):
        dt, D = self.dtype, self.D
        K_, MN_ = warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.MN
        # keys split over the two consumer warpgroups (M); dQ's head dim split over them (N)
        mma_sdp = sm90_utils.make_trivial_tiled_mma(dt, dt, K_, K_, Float32, (2, 1, 1), (64, BM))
        mma_dkv = sm90_utils.make_trivial_tiled_mma(dt, dt, K_, MN_, Float32, (2, 1, 1), (64, D),
                                                    a_source=warpgroup.OperandSource.RMEM)
        mma_dq = self._mma_dq()
        sQ_layout, sK_layout, sdS_layout = self._layouts()
        atom_k, tma_k, atom_v, tma_v, self.kv_bytes = kv_tma_atoms(k, v, total_k, Hk, D,
                                                                   cute.select(sK_layout, mode=[0, 1]), BN)
        Storage = self._storage(sQ_layout, sK_layout, sdS_layout, kv_stages=1, dq_staging=True)

        self.kernel(
            tma_k, tma_v, atom_k, atom_v, q, dout, lse, delta, dk, dv, part_dq, sems, cu_q, cu_k, cu_chunks, offsets,
            pairs, B, total_q, total_k, H, Hk, chunk_size, topk, kv0, Hw, ktiles, scale, scale_log2, sQ_layout,
            sK_layout, sdS_layout, mma_sdp, mma_dkv, mma_dq, Storage,
        ).launch(grid=(nchunks * ktiles * nkv, 1, 1), block=(self.THREADS, 1, 1), stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(
        self,
        tma_k: cute.Tensor,
        tma_v: cute.Tensor,
        atom_k: cute.CopyAtom,
        atom_v: cute.CopyAtom,
        q: cute.Pointer,
        dout: cute.Pointer,
        lse: cute.Pointer,
        delta: cute.Pointer,
        dk: cute.Pointer,
        dv: cute.Pointer,
        part_dq: cute.Pointer,
        sems: cute.Pointer,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        offsets: cute.Pointer,
        pairs: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        topk: Int32,
        kv0: Int32,
        Hw: Int32,
        ktiles: Int32,
        scale: Float32,
        scale_log2: Float32,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sdS_layout: cute.ComposedLayout,
        mma_sdp: cute.TiledMma,
        mma_dkv: cute.TiledMma,
        mma_dq: cute.TiledMma,
        Storage: cutlass.Constexpr,
    ):
        tid, _, _ = cute.arch.thread_idx()
        # one linear grid, chunk-major: a chunk's KV heads run side by side, so the heavy segments
        # (causal: the early chunks of a sequence, chosen by most later rows) start in the first
        # waves for every head instead of the last heads' heavy chunks starting in the last wave
        bid, _, _ = cute.arch.block_idx()
        nkv = Hw // (H // Hk)
        gt = bid // nkv
        kvw = bid - gt * nkv
        g = gt // ktiles  # the chunk and its 128-key tile
        kt = gt - g * ktiles
        kvh = kv0 + kvw  # this launch covers KV heads [kv0, kv0 + nkv) (the partial buffer's window)
        warp, st = kernel_prologue(atom_k, atom_v, Storage)
        # (the chain: warps 0-1 gather, warps 2-3 add the dQ contributions: CHAIN_THREADS each)
        pipe_q, pipe_kv = gather_tma_pipelines(st, self.QS, 256, 1, 8, self.kv_bytes,
                                               CHAIN_THREADS if self.chain else 128)
        # dQ staging buffers: the consumer warpgroups fill them, the producer warpgroup copies them
        # out (mbarriers: ordered for compute-sanitizer's racecheck too, unlike bar.arrive)
        group = pipeline.CooperativeGroup
        pipe_dq = pipeline.PipelineAsync.create(
            barrier_storage=st.mbar_dq.data_ptr(), num_stages=2,
            producer_group=group(pipeline.Agent.Thread, 256),
            consumer_group=group(pipeline.Agent.Thread, CHAIN_THREADS if self.chain else 128),
            defer_sync=True)
        pipe_u = None
        if cutlass.const_expr(self.persistent):
            # the persistent walk's units: producer warp 0 -> the consumer warpgroups (two slots)
            pipe_u = pipeline.PipelineAsync.create(
                barrier_storage=st.mbar_unit.data_ptr(), num_stages=2, producer_group=group(pipeline.Agent.Thread, 32),
                consumer_group=group(pipeline.Agent.Thread, 256), defer_sync=True)
        cute.arch.mbarrier_init_fence()
        sQ, sdO, sK, sV, sdS = self.smem_views(st, sQ_layout, sK_layout, sdS_layout)
        G = H // Hk
        if cutlass.const_expr(self.persistent):
            cute.arch.sync_threads()  # barrier init visible to all warpgroups
            sunit = st.sUnit.get_tensor(cute.make_layout(2 * UNIT_FIELDS))
            if warp < 4:
                cute.arch.setmaxregister_decrease(PRODUCER_REGS_PERSISTENT)
                self.producer_persistent(tma_k, tma_v, atom_k, atom_v, q, dout, lse, delta, pairs, part_dq, st, sQ,
                                         sdO, sK, sV, pipe_q, pipe_kv, pipe_dq, pipe_u, sunit, sems, cu_q, cu_k,
                                         cu_chunks, offsets, B, total_q, total_k, H, Hk, chunk_size, kv0, nkv, topk,
                                         tid, warp)
            else:
                cute.arch.setmaxregister_increase(CONSUMER_REGS)
                self.consumer_persistent(dk, dv, st, sQ, sdO, sK, sV, sdS, pipe_q, pipe_kv, pipe_dq, pipe_u, sunit,
                                         mma_sdp, mma_dkv, mma_dq, Hk, H, kv0 * G, Hw, topk, scale, scale_log2,
                                         tid - 128)
        else:
            qs, shift, ks, kbeg, nkeys, e_lo, e_hi, nsub = self.locate(cu_q, cu_k, cu_chunks, offsets, B, total_q,
                                                                       total_k, H, Hk, chunk_size, g, kvh, kt * BN, BN)
            cute.arch.sync_threads()  # barrier init visible to all warpgroups

            if warp < 4:
                cute.arch.setmaxregister_decrease(PRODUCER_REGS)
                if nkeys > 0:
                    # the chain's semaphores: sub-tile t of (chunk g, KV head kvh) at e_lo // BM + g * Hk + kvh + t
                    # (a segment group adds at most one partial sub-tile to e_lo // BM)
                    if cutlass.const_expr(self.chain):
                        self.producer_chain(tma_k, tma_v, atom_k, atom_v, q, dout, lse, delta, pairs, part_dq, st, sQ,
                                            sdO, sK, sV, pipe_q, pipe_kv, pipe_dq, e_lo, e_hi, nsub, kvh, ks + kbeg,
                                            total_q, H, topk, tid, warp, sems, e_lo // BM + g * Hk + kvh, kt)
                    else:
                        self.producer(tma_k, tma_v, atom_k, atom_v, q, dout, lse, delta, pairs, part_dq, st, sQ, sdO,
                                      sK, sV, pipe_q, pipe_kv, pipe_dq, e_lo, e_hi, nsub, kvh, ks + kbeg, total_q, H,
                                      topk, tid, warp)
            else:
                cute.arch.setmaxregister_increase(CONSUMER_REGS)
                if nkeys > 0:
                    self.consumer(dk, dv, st, sQ, sdO, sK, sV, sdS, pipe_q, pipe_kv, pipe_dq, mma_sdp, mma_dkv, mma_dq,
                                  e_lo, e_hi, nsub, nkeys, ks + kbeg, kvh, Hk, qs, shift, kbeg, H, kv0 * G, Hw, topk,
                                  scale, scale_log2, tid - 128)

    def smem_views(self, st, sQ_layout, sK_layout, sdS_layout):
        """The shared-memory tensors (swizzled): Q and dO rings, K, V, dS."""
        return (st.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner),
                st.sdO.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner),
                st.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner),
                st.sV.get_tensor(sK_layout.outer, swizzle=sK_layout.inner),
                st.sdS.get_tensor(sdS_layout.outer, swizzle=sdS_layout.inner))

    @cute.jit
    def locate(self, cu_q: cute.Pointer, cu_k: cute.Pointer, cu_chunks: cute.Pointer, offsets: cute.Pointer,
               B: Int32, total_q: Int32, total_k: Int32, H: Int32, Hk: Int32, chunk_size: Int32, g: Int32,
               kvh: Int32, koff: Int32, span: Int32):
        """Global chunk ``g``, keys ``[koff, koff + span)`` of it, KV head ``kvh``: the sequence's
        first query row ``qs`` and first key ``ks``, the rows' position shift (bottom-right),
        the first key ``kbeg`` (of the sequence) and how many keys there are (``nkeys``, 0 past
        the grid's chunk bound), and the entries ``[e_lo, e_hi)`` of the GQA group's segments in
        ``nsub`` sub-tiles."""
        tcc = _flat(cu_chunks)
        b = find_segment(cu_chunks, B, g)
        qs, qe = clamp_seq(cu_q, b, total_q)
        ks, ke = clamp_seq(cu_k, b, total_k)
        shift = (ke - ks) - (qe - qs)
        kbeg = (g - tcc[b]) * chunk_size + koff
        nkeys = cutlass.max(cutlass.min(cutlass.min(chunk_size - koff, span), (ke - ks) - kbeg), Int32(0))
        G = H // Hk
        seg_lo = g * H + kvh * G
        e_lo = Int32(0)
        e_hi = Int32(0)
        if g < tcc[B]:  # the grid covers a bound on the chunk count
            toff = _flat(offsets)
            e_lo = toff[seg_lo]
            e_hi = cutlass.max(toff[seg_lo + G], e_lo)
        else:
            nkeys = Int32(0)
        nsub = (e_hi - e_lo + BM - 1) // BM
        return qs, shift, ks, kbeg, nkeys, e_lo, e_hi, nsub

    @cute.jit
    def producer(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom,
                 q: cute.Pointer, dout: cute.Pointer, lse: cute.Pointer, delta: cute.Pointer, pairs: cute.Pointer,
                 part_dq: cute.Pointer, st, sQ: cute.Tensor, sdO: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor,
                 pipe_q, pipe_kv, pipe_dq,
                 e_lo: Int32, e_hi: Int32, nsub: Int32, kvh: Int32, key0: Int32, total_q: Int32, H: Int32,
                 topk: Int32, tid: Int32, warp: Int32):
        if warp == 0:  # K and V of the chunk's key tile, once
            self.load_kv_tile(tma_k, tma_v, atom_k, atom_v, sK, sV, pipe_kv,
                              pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1), kvh, key0)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.QS)
        for t in cutlass.range(nsub, unroll=1):
            self.gather_subtile(q, dout, lse, delta, pairs, st, sQ, sdO, pipe_q, q_state, e_lo, e_hi, t, total_q, H,
                                topk, tid, warp)
            q_state.advance()
            if cutlass.const_expr(self.with_dq):
                # the previous sub-tile's dQ partials, staged by the consumers meanwhile: the next
                # gather is issued when the consumers work on this one (one sub-tile of lookahead)
                if t > 0:
                    self.store_dq_pieces(st, pipe_dq, part_dq, t - 1, tid)
        if cutlass.const_expr(self.with_dq):
            if nsub > 0:
                self.store_dq_pieces(st, pipe_dq, part_dq, nsub - 1, tid)

    @cute.jit
    def producer_persistent(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom,
                            atom_v: cute.CopyAtom, q: cute.Pointer, dout: cute.Pointer, lse: cute.Pointer,
                            delta: cute.Pointer, pairs: cute.Pointer, part_dq: cute.Pointer, st, sQ: cute.Tensor,
                            sdO: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor, pipe_q, pipe_kv, pipe_dq, pipe_u,
                            sunit: cute.Tensor, work: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer,
                            cu_chunks: cute.Pointer, offsets: cute.Pointer, B: Int32, total_q: Int32, total_k: Int32,
                            H: Int32, Hk: Int32, chunk_size: Int32, kv0: Int32, nkv: Int32, topk: Int32, tid: Int32,
                            warp: Int32):
        """The persistent walk's producer (``persistent``). Thread 0 takes the next unit (chunk
        ``u // nkv``, KV head ``kv0 + u % nkv``) from the launch's counter ``work``, so CTAs finish
        together, and hands it to the warpgroup (named barrier); all four warps locate it; warp 0
        passes its fields to the consumers through ``pipe_u`` (two ``sUnit`` slots; keys -1: no
        unit left) and loads its K and V once the one K/V stage is free (the previous unit's last
        sub-tile done); the Q/dO ring and the dQ copy-out run on across units (``T``: sub-tiles
        gathered so far, the copy-out one sub-tile behind as in :meth:`producer`)."""
        # units: the chunks, within the routing's bound (num_chunks_bound: the index's size), x nkv
        nb = Int32((Int64(total_k) + Int64(B) * Int64(chunk_size - 1)) // Int64(chunk_size))
        units = cutlass.min(_flat(cu_chunks)[B], nb) * nkv
        # (ring states from counters, not held: the producer has 40 registers)
        T = Int32(0)  # sub-tiles gathered: the Q ring's and the dQ copy-out's position
        ui = Int32(0)  # units taken: the hand-over slots' and (one K/V load each) the K/V stage's position
        going = Int32(1)
        while going != 0:
            # (the slot's unit number was read by every warp two units back, before the previous
            # unit's barrier: free to write)
            slot = (ui % 2) * UNIT_FIELDS
            if tid == 0:
                sunit[slot + 9] = cute.arch.atomic_add(work.llvm_ptr, Int32(1))
            cute.arch.barrier(barrier_id=BAR_SCHED, number_of_threads=128)
            u = sunit[slot + 9]
            if u >= units:
                going = Int32(0)
                u = Int32(0)  # (a unit within the bound: locate reads index entries that exist)
            g = u // nkv
            kvh = kv0 + (u - g * nkv)
            qs, shift, ks, kbeg, nkeys, e_lo, e_hi, nsub = self.locate(cu_q, cu_k, cu_chunks, offsets, B, total_q,
                                                                       total_k, H, Hk, chunk_size, g, kvh, Int32(0),
                                                                       BN)
            if (going == 0) | (nkeys <= 0):
                nkeys = Int32(0)
                nsub = Int32(0)
                e_hi = e_lo
            if warp == 0:
                us = ring_state(2, ui, producer=True)
                pipe_u.producer_acquire(us)
                nk = nkeys
                if going == 0:
                    nk = Int32(-1)
                if tid == 0:  # (one writer: the warp's arrives order its writes for the consumers)
                    for i, x in enumerate((e_lo, e_hi, nk, ks + kbeg, kvh, qs, shift, kbeg)):
                        sunit[slot + i] = x
                pipe_u.producer_commit(us)
                if going != 0:  # (a unit without keys too: the consumers wait for each unit's K/V)
                    self.load_kv_tile(tma_k, tma_v, atom_k, atom_v, sK, sV, pipe_kv, ring_state(1, ui, producer=True),
                                      kvh, ks + kbeg)
            ui += 1
            for t in cutlass.range(nsub, unroll=1):
                self.gather_subtile(q, dout, lse, delta, pairs, st, sQ, sdO, pipe_q,
                                    ring_state(self.QS, T, producer=True), e_lo, e_hi, t, total_q, H, topk, tid, warp)
                if T > 0:
                    self.store_dq_pieces(st, pipe_dq, part_dq, T - 1, tid)
                T += 1
        if T > 0:
            self.store_dq_pieces(st, pipe_dq, part_dq, T - 1, tid)

    @cute.jit
    def consumer_persistent(self, dk: cute.Pointer, dv: cute.Pointer, st, sQ: cute.Tensor, sdO: cute.Tensor,
                            sK: cute.Tensor, sV: cute.Tensor, sdS: cute.Tensor, pipe_q, pipe_kv, pipe_dq, pipe_u,
                            sunit: cute.Tensor, mma_sdp: cute.TiledMma, mma_dkv: cute.TiledMma, mma_dq: cute.TiledMma,
                            Hk: Int32, H: Int32, h0: Int32, Hw: Int32, topk: Int32, scale: Float32,
                            scale_log2: Float32, ctid: Int32):
        """The persistent walk's consumers: per unit the producer hands over (``pipe_u``, until
        keys -1) the loop of :meth:`consumer`, with the ring positions counted across units
        (``T``); K and V go back to the producer once the unit's last sub-tile is done, before
        dK and dV are stored from registers, so the next unit's K/V load runs under the store."""
        f = self.dkv_frags(sQ, sdO, sK, sV, sdS, mma_sdp, mma_dkv, mma_dq, ctid)
        wg = ctid // 128
        T = Int32(0)  # sub-tiles consumed: the Q ring's and the dQ staging's position
        ui = Int32(0)  # units handed over: the slots' and the K/V stage's position
        nkeys = Int32(0)
        while nkeys >= 0:  # (keys -1: no unit left)
            # (the unit's fields are read from its slot where needed, not held in registers, and
            # ring states made from the counters where used; the slot goes back at the unit's end)
            pipe_u.consumer_wait(ring_state(2, ui))
            slot = (ui % 2) * UNIT_FIELDS
            nkeys = sunit[slot + 2]
            if nkeys >= 0:
                nsub = (sunit[slot + 1] - sunit[slot] + BM - 1) // BM
                f.acc_dK.fill(0.0)
                f.acc_dV.fill(0.0)
                pipe_kv.consumer_wait(ring_state(1, ui))
                if nkeys < BN:
                    # (as in consumer: keys past the chunk zeroed for dQ = dS K)
                    zero_rows_from(sK, 0, nkeys, ctid, 256, BN, self.D, self.dtype)
                for t in cutlass.range(nsub, unroll=1):
                    q_state = ring_state(self.QS, T + t)
                    stage = (T + t) % self.QS
                    pipe_q.consumer_wait(q_state)
                    if ctid < BM:
                        self.row_meta(st, stage, ctid, sunit[slot] + t * BM + ctid < sunit[slot + 1], nkeys,
                                      sunit[slot + 5], sunit[slot + 6], sunit[slot + 7], H, h0, Hw, topk)
                    cute.arch.fence_view_async_shared()
                    cute.arch.barrier(barrier_id=BAR_META, number_of_threads=256)
                    self.sub_tile(f, st, stage, stage, T + t, wg, ctid, sdS, pipe_dq, mma_sdp, mma_dkv, mma_dq, scale,
                                  scale_log2)
                    pipe_q.consumer_release(q_state)
                T += nsub
                # every wgmma reading K and V is done (each sub-tile drains); the zeroed K rows
                # (generic proxy) ordered before the next unit's TMA (async proxy) overwrites them
                cute.arch.fence_view_async_shared()
                cute.arch.barrier(barrier_id=BAR_META, number_of_threads=256)
                pipe_kv.consumer_release(ring_state(1, ui))
                self.store_dkv_frags(dk, dv, f, mma_dkv, ctid, sunit[slot + 2], sunit[slot + 3], sunit[slot + 4], Hk)
            pipe_u.consumer_release(ring_state(2, ui))
            ui += 1

    @cute.jit
    def producer_chain(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom,
                       q: cute.Pointer, dout: cute.Pointer, lse: cute.Pointer, delta: cute.Pointer,
                       pairs: cute.Pointer, part_dq: cute.Pointer, st, sQ: cute.Tensor, sdO: cute.Tensor,
                       sK: cute.Tensor, sV: cute.Tensor, pipe_q, pipe_kv, pipe_dq, e_lo: Int32, e_hi: Int32,
                       nsub: Int32, kvh: Int32, key0: Int32, total_q: Int32, H: Int32, topk: Int32, tid: Int32,
                       warp: Int32, sems: cute.Pointer, sem0: Int32, kt: Int32):
        """The chain's producer warpgroup, in two halves that do not wait for each other: warps 0-1
        gather the sub-tiles (32 rows each; warp 0 also loads the key tile), warps 2-3 add each
        staged dQ contribution in key-tile order (:meth:`chain_issue`, :meth:`chain_release`). The
        consumers may run up to the two staging buffers ahead of the chain, and the next gather
        never waits for it (with one warpgroup for both, every sub-tile's hand-over stood between
        two gathers)."""
        if warp < 2:
            if warp == 0:  # K and V of the chunk's key tile, once
                self.load_kv_tile(tma_k, tma_v, atom_k, atom_v, sK, sV, pipe_kv,
                                  pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1), kvh, key0)
            q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.QS)
            for t in cutlass.range(nsub, unroll=1):
                self.gather_subtile(q, dout, lse, delta, pairs, st, sQ, sdO, pipe_q, q_state, e_lo, e_hi, t, total_q,
                                    H, topk, tid, warp, warp * 32, Int32(32), 32)
                q_state.advance()
        else:
            ctid = tid - CHAIN_THREADS
            for u in cutlass.range(nsub, unroll=1):
                dq_state = ring_state(2, u)
                self.chain_issue(st, pipe_dq, dq_state, part_dq, u, ctid, sems, sem0, kt)
                if cutlass.const_expr(self.chain_pipe):
                    # sub-tile u - 1's writes finish behind u's issue; the buffer goes back once read
                    if u > 0:
                        self.chain_release(sems + (sem0 + u - 1), ctid, kt, 1)
                    cute.arch.cp_async_bulk_wait_group(0, read=True)
                else:
                    self.chain_release(sems + (sem0 + u), ctid, kt, 0)
                pipe_dq.consumer_release(dq_state)
            if cutlass.const_expr(self.chain_pipe):
                if nsub > 0:
                    self.chain_release(sems + (sem0 + nsub - 1), ctid, kt, 0)

    @cute.jit
    def load_kv_tile(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom,
                     sK: cute.Tensor, sV: cute.Tensor, pipe_kv, kv_state, kvh: Int32, key0: Int32):
        """Warp 0: one 128-key K and V tile from key ``key0`` into the ring stage of ``kv_state``
        (past the tensor, TMA fills zeros; keys past the chunk are masked, and zeroed in K for
        dQ, by the consumers)."""
        tKsK, tKgK, tVsV, tVgV = kv_tma_views(atom_k, tma_k, atom_v, tma_v, sK, sV, kvh, key0, BN, self.D)
        pipe_kv.producer_acquire(kv_state)
        bar = pipe_kv.producer_get_barrier(kv_state)
        cute.copy(atom_k, tKgK[None, 0], tKsK[None, kv_state.index], tma_bar_ptr=bar)
        cute.copy(atom_v, tVgV[None, 0], tVsV[None, kv_state.index], tma_bar_ptr=bar)

    def sdp_fragments(self, thr_sdp, sK: cute.Tensor, sV: cute.Tensor, sQ: cute.Tensor, sdO: cute.Tensor):
        """This thread's wgmma fragments (shared-memory descriptors) of ``S^T = K Q^T`` and
        ``dP^T = V dO^T``: A = K, V; B = Q, dO."""
        return (thr_sdp.make_fragment_A(thr_sdp.partition_A(sK)), thr_sdp.make_fragment_A(thr_sdp.partition_A(sV)),
                thr_sdp.make_fragment_B(thr_sdp.partition_B(sQ)), thr_sdp.make_fragment_B(thr_sdp.partition_B(sdO)))

    @cute.jit
    def gather_subtile(self, q: cute.Pointer, dout: cute.Pointer, lse: cute.Pointer, delta: cute.Pointer,
                       pairs: cute.Pointer, st, sQ: cute.Tensor, sdO: cute.Tensor, pipe_q, q_state, e_lo: Int32,
                       e_hi: Int32, t: Int32, total_q: Int32, H: Int32, topk: Int32, tid: Int32, warp: Int32,
                       rbeg=None, nr=None, RW: cutlass.Constexpr = 16):
        """Producer warpgroup: sub-tile ``t``'s Q and dO rows (16-byte cp.async into the swizzled
        ring stage) and each row's pair index, LSE and delta; warp w gathers rows 16w .. 16w + 15,
        lane j < 16 reads row 16w + j's entry (past the segment end: the last entry; the consumers
        mask it). With ``rbeg``/``nr``: this warp's rows are ``[rbeg, rbeg + nr)``, ``nr <= RW``
        (three gathering warps, :class:`~moba_cute.kernels.moba_bwd_dq_sm90.MobaBwdDqSm90Pair`)."""
        D = self.D
        CV = D // 8
        sq_base = cute.recast_ptr(sQ.iterator, None, self.dtype)
        so_base = cute.recast_ptr(sdO.iterator, None, self.dtype)
        q_outer = sQ.layout
        tpairs = _flat(pairs)
        atom_i = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.ALWAYS), Int32,
                                     num_bits_per_copy=32)
        atom_f = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.ALWAYS), Float32,
                                     num_bits_per_copy=32)
        sPidx = st.sPidx.get_tensor(cute.make_layout(BM * self.QS))
        sLse = st.sLse.get_tensor(cute.make_layout(BM * self.QS))
        sDel = st.sDel.get_tensor(cute.make_layout(BM * self.QS))
        lane = tid % 32
        RPI = 32 // CV  # whole rows per copy instruction of a warp
        rows_h = total_q * H
        full = rbeg is None  # (four warps of 16 rows: no bound checks)
        if cutlass.const_expr(full):
            rbeg = warp * 16
            nr = Int32(16)
        rr = rbeg + lane % RW
        e = cutlass.min(e_lo + t * BM + rr, e_hi - 1)
        p = tpairs[e]
        ridx = cutlass.min(cutlass.max(p // topk, Int32(0)), rows_h - 1)  # clamped: memory safe
        row = ridx // H
        h = ridx - row * H
        pipe_q.producer_acquire(q_state)
        stage = q_state.index
        if lane < nr:
            cute.copy(atom_i, cute.make_tensor(pairs + e, cute.make_layout(1)),
                      cute.make_tensor(sPidx.iterator + stage * BM + rr, cute.make_layout(1)))
            cute.copy(atom_f, cute.make_tensor(lse + (Int64(h) * Int64(total_q) + Int64(row)), cute.make_layout(1)),
                      cute.make_tensor(sLse.iterator + stage * BM + rr, cute.make_layout(1)))
            cute.copy(atom_f, cute.make_tensor(delta + Int64(ridx), cute.make_layout(1)),
                      cute.make_tensor(sDel.iterator + stage * BM + rr, cute.make_layout(1)))
        for it in cutlass.range_constexpr((RW + RPI - 1) // RPI):
            rl = it * RPI + lane // CV
            src_r = cute.arch.shuffle_sync(ridx, rl)
            if cutlass.const_expr(full):
                self._copy_q_do(q, dout, sq_base, so_base, q_outer, stage, src_r, rbeg + rl, lane % CV)
            else:
                if rl < nr:
                    self._copy_q_do(q, dout, sq_base, so_base, q_outer, stage, src_r, rbeg + rl, lane % CV)
        pipe_q.producer_commit(q_state)

    @cute.jit
    def _copy_q_do(self, q: cute.Pointer, dout: cute.Pointer, sq_base, so_base, q_outer, stage, src_r: Int32, r: Int32,
                   cv: Int32):
        """16-byte piece ``cv`` of Q's and dO's (row, head) row ``src_r`` into sub-tile row ``r``."""
        D = self.D
        off = Int64(src_r) * Int64(D) + Int64(cv * 8)
        so = swizzled_index(q_outer, (r, cv * 8, 0)) + stage * (BM * D)
        atom_row = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), self.dtype,
                                       num_bits_per_copy=128)
        cute.copy(atom_row, cute.make_tensor(q + cute.assume(off, divby=8), cute.make_layout(8)),
                  cute.make_tensor(sq_base + cute.assume(so, divby=8), cute.make_layout(8)))
        cute.copy(atom_row, cute.make_tensor(dout + cute.assume(off, divby=8), cute.make_layout(8)),
                  cute.make_tensor(so_base + cute.assume(so, divby=8), cute.make_layout(8)))

    @cute.jit
    def chain_issue(self, st, pipe_dq, dq_state, part_dq: cute.Pointer, u: Int32, tid: Int32,
                    sems: cute.Pointer, sem0: Int32, kt: Int32):
        """The chain (key tile ``kt``'s CTA; ``tid`` one of its ``CHAIN_THREADS`` = 64 threads, one
        per row of the sub-tile), sub-tile ``u``: once staged, and once the CTA of tile ``kt - 1``
        has released its semaphore (``sems[sem0 + u] == kt``; tile 0 does not wait), each real row's 512
        bytes of fp32 contribution leave the staging buffer by one bulk copy (tile 0) or bulk
        reduce-add (``cp.reduce.async.bulk``: the add happens in L2, nothing comes back to the SM)
        to the pair's accumulator, one bulk group per sub-tile. :meth:`chain_release` passes the
        semaphore on. A pair's key tiles thus add in order: bitwise deterministic. Forward
        progress: a CTA waits only on the CTA of the previous key tile of its chunk and KV head,
        which the linear grid launches before it."""
        D = self.D
        RS = self.dq_rs
        b = u % 2
        pipe_dq.consumer_wait(dq_state)
        sem = sems + (sem0 + u)
        if kt > 0:
            if tid == 0:
                while cute.arch.load(sem, Int32, sem="acquire", scope="gpu") != kt:
                    pass
            cute.arch.barrier(barrier_id=BAR_CHAIN, number_of_threads=CHAIN_THREADS)
        loc = st.sLocQ.get_tensor(cute.make_layout(2 * BM))[b * BM + tid]
        if loc >= 0:
            src = st.sdQ.get_tensor(cute.make_layout(2 * BM * RS)).iterator + (b * BM * RS + tid * RS)
            dst = part_dq + Int64(loc) * Int64(D)
            if kt == 0:
                bulk_store_s2g(src, dst, D * 4)
            else:
                bulk_reduce_add_f32(src, dst, D * 4)
        cute.arch.cp_async_bulk_commit_group()

    @cute.jit
    def chain_release(self, sem: cute.Pointer, tid: Int32, kt: Int32, pending: cutlass.Constexpr):
        """A sub-tile's semaphore to ``kt + 1`` once its bulk writes are done (all the adding
        threads' bulk groups but the ``pending`` newest): CUTLASS's ``GenericBarrier::arrive_inc``,
        the threads' barrier, then one thread's gpu-scope fence and release store."""
        cute.arch.cp_async_bulk_wait_group(pending, read=False)
        cute.arch.barrier(barrier_id=BAR_CHAIN, number_of_threads=CHAIN_THREADS)
        if tid == 0:
            cute.arch.fence_acq_rel_gpu()
            cute.arch.store(sem, kt + 1, sem="release", scope="gpu")

    @cute.jit
    def store_dq_pieces(self, st, pipe_dq, part_dq: cute.Pointer, u: Int32, tid: Int32):
        """Producer warpgroup: sub-tile ``u``'s staged dQ partials (input dtype) to their places in
        the window's buffer, whole 16-byte pieces (a warp writes 2 rows of 256 bytes at D = 128);
        then the staging buffer is free for sub-tile ``u + 2``. (The chain: :meth:`chain_issue`.)"""
        D = self.D
        RS = self.dq_rs
        CV = D // 8
        b = u % 2
        dq_state = ring_state(2, u)
        pipe_dq.consumer_wait(dq_state)
        sdq = st.sdQ.get_tensor(cute.make_layout(2 * BM * RS)).iterator
        sloc = st.sLocQ.get_tensor(cute.make_layout(2 * BM))
        for i in cutlass.range_constexpr(BM * CV // 128):
            idx = i * 128 + tid
            n = idx // CV
            piece = idx - n * CV
            loc = sloc[b * BM + n]
            if loc >= 0:
                v = cute.make_tensor((sdq + (b * BM * RS + n * RS + piece * 8)).align(16), cute.make_layout(8)).load()
                dst = part_dq + (Int64(loc) * Int64(D) + Int64(piece * 8))
                cute.make_tensor(dst.align(16), cute.make_layout(8)).store(v)
        pipe_dq.consumer_release(dq_state)

    def dkv_frags(self, sQ: cute.Tensor, sdO: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor, sdS: cute.Tensor,
                  mma_sdp: cute.TiledMma, mma_dkv: cute.TiledMma, mma_dq: cute.TiledMma, ctid: Int32) -> "DkvFrags":
        """A consumer thread's wgmma operands and accumulators (:class:`DkvFrags`); dK and dV not
        zeroed."""
        D, dt = self.D, self.dtype
        thr_sdp = mma_sdp.get_slice(ctid)
        thr_dkv = mma_dkv.get_slice(ctid)
        thr_dq = mma_dq.get_slice(ctid)
        # S^T = K Q^T, dP^T = V dO^T (keys x rows)
        tSrK, tSrV, tSrQ, tSrdO = self.sdp_fragments(thr_sdp, sK, sV, sQ, sdO)
        # dV += P^T dO, dK += dS^T Q: B = dO^T / Q^T (head dim x rows, MN-major views)
        sdOt = cute.composition(sdO, cute.make_ordered_layout((D, BM, self.QS), order=(1, 0, 2)))
        sQt = cute.composition(sQ, cute.make_ordered_layout((D, BM, self.QS), order=(1, 0, 2)))
        # dQ = dS K: A = dS (rows x keys), B = K^T (head dim x keys, MN-major view)
        sKt = cute.composition(sK, cute.make_ordered_layout((D, BN, 1), order=(1, 0, 2)))
        acc_S = cute.make_rmem_tensor(thr_sdp.partition_shape_C((BN, BM)), Float32)
        acc_dP = cute.make_rmem_tensor(thr_sdp.partition_shape_C((BN, BM)), Float32)
        acc_dK = cute.make_rmem_tensor(thr_dkv.partition_shape_C((BN, D)), Float32)
        acc_dV = cute.make_rmem_tensor(thr_dkv.partition_shape_C((BN, D)), Float32)
        if cutlass.const_expr(self.overlap):
            # dQ in S^T's registers (S^T is dead once P^T is in rP, until the next sub-tile's
            # S^T, issued after dQ is staged): with dQ in flight beside dK, a register file of
            # its own spilled at D = 128
            assert cute.size(thr_dq.partition_shape_C((BM, D))) <= cute.size(acc_S)
            acc_dQ = cute.make_tensor(acc_S.iterator, cute.make_layout(thr_dq.partition_shape_C((BM, D))))
        else:
            acc_dQ = cute.make_rmem_tensor(thr_dq.partition_shape_C((BM, D)), Float32)
        rP = cute.make_rmem_tensor(acc_S.layout.shape, dt)
        rdS = cute.make_rmem_tensor(acc_S.layout.shape, dt)
        f = DkvFrags(tSrK, tSrV, tSrQ, tSrdO, thr_dkv.make_fragment_B(thr_dkv.partition_B(sdOt)),
                     thr_dkv.make_fragment_B(thr_dkv.partition_B(sQt)), thr_dq.make_fragment_A(thr_dq.partition_A(sdS)),
                     thr_dq.make_fragment_B(thr_dq.partition_B(sKt)), acc_S, acc_dP, acc_dK, acc_dV, acc_dQ, rP, rdS,
                     acc_as_a_operand(rP), acc_as_a_operand(rdS), acc_mn_view(acc_S), acc_mn_view(acc_dP),
                     acc_mn_view(thr_sdp.partition_C(cute.make_identity_tensor((BN, BM)))), acc_mn_view(acc_dQ),
                     acc_mn_view(thr_dq.partition_C(cute.make_identity_tensor((BM, D)))))
        return f

    @cute.jit
    def consumer(self, dk: cute.Pointer, dv: cute.Pointer, st, sQ: cute.Tensor,
                 sdO: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor, sdS: cute.Tensor, pipe_q, pipe_kv, pipe_dq,
                 mma_sdp: cute.TiledMma, mma_dkv: cute.TiledMma, mma_dq: cute.TiledMma, e_lo: Int32, e_hi: Int32,
                 nsub: Int32, nkeys: Int32, key0: Int32, kvh: Int32, Hk: Int32, qs: Int32, shift: Int32,
                 kbeg: Int32, H: Int32, h0: Int32, Hw: Int32, topk: Int32, scale: Float32, scale_log2: Float32,
                 ctid: Int32):
        D, dt = self.D, self.dtype
        f = self.dkv_frags(sQ, sdO, sK, sV, sdS, mma_sdp, mma_dkv, mma_dq, ctid)
        f.acc_dK.fill(0.0)
        f.acc_dV.fill(0.0)
        pipe_kv.consumer_wait(pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1))
        if cutlass.const_expr(self.with_dq) and nkeys < BN:
            # keys past the chunk meet dS = 0 in dQ = dS K: zero them so that a non-finite key
            # there cannot reach dQ as 0 * inf (synced by BAR_META before the first wgmma)
            zero_rows_from(sK, 0, nkeys, ctid, 256, BN, D, dt)
        wg = ctid // 128
        if cutlass.const_expr(self.pingpong):
            if wg == 1:
                cute.arch.barrier_arrive(barrier_id=PP_BARRIER, number_of_threads=256)  # warpgroup 0 first
        for t in cutlass.range(nsub, unroll=1):
            q_state = ring_state(self.QS, t)
            stage = t % self.QS
            hslot = stage  # (the rows' last visible keys: one copy per warpgroup with the ping-pong)
            pipe_q.consumer_wait(q_state)
            if cutlass.const_expr(self.pingpong):
                hslot = wg * self.QS + stage
                if ctid % 128 < BM:
                    n = ctid % 128
                    self.row_meta(st, stage, n, e_lo + t * BM + n < e_hi, nkeys, qs, shift, kbeg, H, h0, Hw, topk,
                                  hslot)
                cute.arch.fence_view_async_shared()
                cute.arch.barrier(barrier_id=BAR_ROWS + wg, number_of_threads=128)
            else:
                if ctid < BM:
                    self.row_meta(st, stage, ctid, e_lo + t * BM + ctid < e_hi, nkeys, qs, shift, kbeg, H, h0, Hw,
                                  topk)
                # cp.async wrote Q / dO (generic proxy) for wgmma (async proxy)
                cute.arch.fence_view_async_shared()
                cute.arch.barrier(barrier_id=BAR_META, number_of_threads=256)
            live = True  # (the one-pass kernel: a chunk's own rows see its first key)
            if cutlass.const_expr(self.track_reach):
                live = self.sub_tile_reach(st, hslot) >= 0  # (else no row of it sees this key tile)
            if live:
                self.sub_tile(f, st, stage, hslot, t, wg, ctid, sdS, pipe_dq, mma_sdp, mma_dkv, mma_dq, scale,
                              scale_log2)
            else:
                # (no wgmma: the turns only, which the other warpgroup counts on)
                self.pp_idle(wg)
                self.pp_idle(wg)
                if cutlass.const_expr(self.chain):
                    self.stage_nothing(st, pipe_dq, t, ctid)  # (the chain still passes the sub-tile on)
            pipe_q.consumer_release(q_state)
        if cutlass.const_expr(self.pingpong):
            if wg == 0:
                # (warpgroup 1's last pass: every arrive on a barrier is matched before the exit)
                cute.arch.barrier(barrier_id=PP_BARRIER, number_of_threads=256)

        # ---- dK, dV of the chunk's keys, input dtype
        self.store_dkv_frags(dk, dv, f, mma_dkv, ctid, nkeys, key0, kvh, Hk)

    @cute.jit
    def store_dkv_frags(self, dk: cute.Pointer, dv: cute.Pointer, f: "DkvFrags", mma_dkv: cute.TiledMma, ctid: Int32,
                        nkeys: Int32, key0: Int32, kvh: Int32, Hk: Int32):
        """:meth:`store_dkv` of a consumer thread's dK and dV accumulators."""
        cK_mn = acc_mn_view(mma_dkv.get_slice(ctid).partition_C(cute.make_identity_tensor((BN, self.D))))
        self.store_dkv(dk, dv, acc_mn_view(f.acc_dK), acc_mn_view(f.acc_dV), cK_mn, nkeys, key0, kvh, Hk)

    @cute.jit
    def sub_tile(self, f: "DkvFrags", st, stage, hslot, t: Int32, wg: Int32, ctid: Int32, sdS: cute.Tensor,
                 pipe_dq, mma_sdp: cute.TiledMma, mma_dkv: cute.TiledMma, mma_dq: cute.TiledMma, scale: Float32,
                 scale_log2: Float32):
        """One sub-tile of :meth:`consumer`: S^T, dP^T, the softmax gradient, dV and dK (and the
        one-pass kernel's dQ partials)."""
        if cutlass.const_expr(self.overlap):
            self.sub_tile_overlapped(f, st, stage, hslot, t, wg, ctid, sdS, pipe_dq, mma_sdp, mma_dkv, mma_dq,
                                     scale, scale_log2)
        else:
            self.sub_tile_sequential(f, st, stage, hslot, t, wg, ctid, sdS, pipe_dq, mma_sdp, mma_dkv, mma_dq, scale,
                                     scale_log2)

    @cute.jit
    def sub_tile_sequential(self, f: "DkvFrags", st, stage, hslot, t: Int32, wg: Int32, ctid: Int32,
                            sdS: cute.Tensor, pipe_dq, mma_sdp: cute.TiledMma, mma_dkv: cute.TiledMma,
                            mma_dq: cute.TiledMma, scale: Float32, scale_log2: Float32):
        """:meth:`sub_tile` one GEMM group at a time (dQ after dK, both drained)."""
        self.sdp_softmax(f, st, stage, hslot, wg, mma_sdp, scale, scale_log2)
        # ---- dV += P^T dO (register A), issued before dS^T is staged for dQ
        atom_kv = self.issue_dv(f, stage, wg, mma_dkv)
        if cutlass.const_expr(self.with_dq):
            self.publish_ds(sdS, f)
        # ---- dK += dS^T Q; then dQ_p = dS K once P^T and dS^T are no longer needed (register
        # pressure: dK, dV and dQ accumulators are live together)
        self.issue_dk(f, atom_kv, stage)
        self.pp_pass(wg)
        warpgroup.wait_group(0)
        if cutlass.const_expr(self.with_dq):
            self.issue_dq(f, mma_dq)
            warpgroup.wait_group(0)
            self.stage_dq(st, pipe_dq, stage, t, f.dQ_mn, f.cQ_mn, ctid)

    @cute.jit
    def sdp_softmax(self, f: "DkvFrags", st, stage, hslot, wg: Int32, mma_sdp: cute.TiledMma, scale: Float32,
                    scale_log2: Float32):
        """S^T = K Q^T and dP^T = V dO^T, then P^T and dS^T in registers (fp32 and the input dtype)."""
        dt = self.dtype
        self.pp_turn(wg)
        warpgroup.fence()
        gemm_kblocks(mma_sdp, f.acc_S, f.tSrK, f.tSrQ, 0, stage)
        gemm_kblocks(mma_sdp, f.acc_dP, f.tSrV, f.tSrdO, 0, stage)
        warpgroup.commit_group()
        self.pp_pass(wg)
        warpgroup.wait_group(0)
        self.probs_and_ds(st, stage, f.S_mn, f.dP_mn, f.cS_mn, scale, scale_log2, hslot=hslot)
        f.rP.store(f.acc_S.load().to(dt))
        f.rdS.store(f.acc_dP.load().to(dt))

    @cute.jit
    def issue_dv(self, f: "DkvFrags", stage, wg: Int32, mma_dkv: cute.TiledMma):
        """dV += P^T dO (register A), one commit group; returns the accumulating atom (dK's too)."""
        self.pp_turn(wg)
        warpgroup.fence()
        atom_kv = cute.make_mma_atom(mma_dkv.op)
        atom_kv.set(warpgroup.Field.ACCUMULATE, True)
        for kb in cutlass.range_constexpr(cute.size(f.tPa.shape[2])):
            cute.gemm(atom_kv, f.acc_dV, f.tPa[None, None, kb], f.tVrdOt[None, None, kb, stage], f.acc_dV)
        warpgroup.commit_group()
        return atom_kv

    @cute.jit
    def publish_ds(self, sdS: cute.Tensor, f: "DkvFrags"):
        """dS^T -> sdS (rows x keys) for dQ; made visible to the async proxy, then to both
        warpgroups (BAR_DS)."""
        self.store_ds(sdS, acc_mn_view(f.rdS), f.cS_mn)
        cute.arch.fence_view_async_shared()
        cute.arch.barrier(barrier_id=BAR_DS, number_of_threads=256)

    @cute.jit
    def issue_dk(self, f: "DkvFrags", atom_kv, stage):
        """dK += dS^T Q (register A, ``issue_dv``'s accumulating atom), one commit group."""
        warpgroup.fence()
        for kb in cutlass.range_constexpr(cute.size(f.tdSa.shape[2])):
            cute.gemm(atom_kv, f.acc_dK, f.tdSa[None, None, kb], f.tKrQt[None, None, kb, stage], f.acc_dK)
        warpgroup.commit_group()

    @cute.jit
    def issue_dq(self, f: "DkvFrags", mma_dq: cute.TiledMma):
        """dQ_p = dS K (A from sdS; this warpgroup's head-dim half), one commit group."""
        warpgroup.fence()
        gemm_kblocks(mma_dq, f.acc_dQ, f.tQrdS, f.tQrKt, None, 0)
        warpgroup.commit_group()

    @cute.jit
    def sub_tile_overlapped(self, f: "DkvFrags", st, stage, hslot, t: Int32, wg: Int32, ctid: Int32,
                            sdS: cute.Tensor, pipe_dq, mma_sdp: cute.TiledMma, mma_dkv: cute.TiledMma,
                            mma_dq: cute.TiledMma, scale: Float32, scale_log2: Float32):
        """:meth:`sub_tile` in FA3/FA4's order (``overlap``; the same GEMMs and arithmetic, so the
        same bits): dV, dQ and dK issued back to back, dQ staged while dK runs. (S^T and dP^T
        stay one commit group: splitting it, to run P^T's exp2 under dP^T as FA4 does, spilled
        4-8 bytes of the 232 registers at D = 128.)"""
        self.sdp_softmax(f, st, stage, hslot, wg, mma_sdp, scale, scale_log2)
        # ---- dV += P^T dO (register A) under the dS^T store
        atom_kv = self.issue_dv(f, stage, wg, mma_dkv)
        self.publish_ds(sdS, f)
        # ---- dQ_p, then dK
        self.issue_dq(f, mma_dq)
        warpgroup.wait_group(1)  # dV done (issued before the dS^T store): P^T's registers free for dK
        self.issue_dk(f, atom_kv, stage)
        warpgroup.wait_group(1)  # dQ done, dK in flight
        self.stage_dq(st, pipe_dq, stage, t, f.dQ_mn, f.cQ_mn, ctid)
        warpgroup.wait_group(0)

    @cute.jit
    def row_meta(self, st, stage, n: Int32, inside, nkeys: Int32, qs: Int32, shift: Int32, kbeg: Int32, H: Int32,
                 h0: Int32, Hw: Int32, topk: Int32, hslot=None):
        """Sub-tile row ``n``'s last visible key (-1: padding past the segments or an entry the
        index dropped) and its pair's place in the window's partial buffer,
        ``(row * Hw + h - h0) * K + slot``. One buffer per stage: the other warpgroup may still
        read the previous sub-tile's. ``hslot``: the last visible key's copy (ping-pong: one per
        warpgroup), else ``stage``."""
        hi, loc = self.pair_place(st, stage, n, inside, nkeys, qs, shift, kbeg, H, h0, Hw, topk)
        hs = stage if hslot is None else hslot
        st.sHi.get_tensor(cute.make_layout(BM * self.QS * self.HI_COPIES))[hs * BM + n] = hi
        st.sLoc.get_tensor(cute.make_layout(BM * self.QS))[stage * BM + n] = loc
        if cutlass.const_expr(self.track_reach):
            # (the 64 rows are two whole warps): each warp's largest, for :meth:`sub_tile_reach`
            mx = warp_max_i32(hi)
            sMax = st.sMaxHi.get_tensor(cute.make_layout(2 * self.QS * self.HI_COPIES))
            idx = hs * 2 + n // 32
            if n % 32 == 0:
                sMax[idx] = mx

    @cute.jit
    def sub_tile_reach(self, st, hslot):
        """The largest last visible key of a sub-tile's rows (after :meth:`row_meta` and its
        barrier; -1: none of them sees a key). Causal own-chunk rows see only the keys up to
        their position: the key tiles past it (dK/dV's CTA, dQ's streamed tiles) are skipped."""
        sMax = st.sMaxHi.get_tensor(cute.make_layout(2 * self.QS * self.HI_COPIES))
        return cutlass.max(sMax[hslot * 2], sMax[hslot * 2 + 1])

    @cute.jit
    def pair_place(self, st, stage, n: Int32, inside, nkeys: Int32, qs: Int32, shift: Int32, kbeg: Int32, H: Int32,
                   h0: Int32, Hw: Int32, topk: Int32):
        """:meth:`row_meta`'s values of ring stage ``stage``'s row ``n``: (last visible key, place)."""
        hi = Int32(-1)
        loc = Int32(0)
        p = st.sPidx.get_tensor(cute.make_layout(BM * self.QS))[stage * BM + n]
        if inside & (p >= 0):
            hi = nkeys - 1
            ridx = p // topk
            slot = p - ridx * topk
            row = ridx // H
            loc = (row * Hw + (ridx - row * H - h0)) * topk + slot
            if cutlass.const_expr(self.causal):
                if slot == 0:  # the own chunk: keys up to the row's position
                    hi = cutlass.min(hi, row - qs + shift - kbeg)
        return hi, loc

    @cute.jit
    def probs_and_ds(self, st, stage, S_mn: cute.Tensor, dP_mn: cute.Tensor, cS_mn: cute.Tensor, scale: Float32,
                     scale_log2: Float32, koff: Int32 = 0, hslot=None):
        """In place: S^T -> P^T = exp2(S^T * scale_log2 - lse_log2), dP^T -> dS^T = P^T (dP^T -
        delta) * scale; masked keys (past the row's last visible key, copy ``hslot`` of
        :meth:`row_meta`; the tile's keys start at ``koff`` of the chunk) by select, so that a
        non-finite S or dP there stays out."""
        LOG2E = 1.4426950408889634
        sLse = st.sLse.get_tensor(cute.make_layout(BM * self.QS))
        sDel = st.sDel.get_tensor(cute.make_layout(BM * self.QS))
        sHi = st.sHi.get_tensor(cute.make_layout(BM * self.QS * self.HI_COPIES))
        hs = stage if hslot is None else hslot
        for c in cutlass.range_constexpr(cute.size(S_mn, mode=[1])):
            n = cS_mn[0, c][1]
            hi = sHi[hs * BM + n] - koff
            l2 = sLse[stage * BM + n] * LOG2E
            dl = sDel[stage * BM + n]
            for r in cutlass.range_constexpr(cute.size(S_mn, mode=[0])):
                m = cS_mn[r, 0][0]
                pv = cute.math.exp2(S_mn[r, c] * scale_log2 - l2, fastmath=True)
                ok = m <= hi
                S_mn[r, c] = cutlass.select_(ok, pv, Float32(0.0))
                dP_mn[r, c] = cutlass.select_(ok, pv * (dP_mn[r, c] - dl) * scale, Float32(0.0))

    @cute.jit
    def store_ds(self, sdS: cute.Tensor, dS_mn: cute.Tensor, cS_mn: cute.Tensor):
        """dS^T (keys x rows, registers) -> sdS (rows x keys, rows contiguous): fragment columns
        2c, 2c + 1 are adjacent rows, one 4-byte store per pair (the 128-byte swizzle moves
        16-byte pieces only)."""
        base = cute.recast_ptr(sdS.iterator, None, self.dtype)
        for c in cutlass.range_constexpr(cute.size(dS_mn, mode=[1]) // 2):
            n = cS_mn[0, 2 * c][1]
            for r in cutlass.range_constexpr(cute.size(dS_mn, mode=[0])):
                so = swizzled_index(sdS.layout, (n, cS_mn[r, 0][0]))
                pr = cute.make_rmem_tensor(cute.make_layout(2), self.dtype)
                pr[0] = dS_mn[r, 2 * c]
                pr[1] = dS_mn[r, 2 * c + 1]
                cute.autovec_copy(pr, cute.make_tensor((base + so).align(4), cute.make_layout(2)))

    @cute.jit
    def stage_dq(self, st, pipe_dq, stage, t: Int32, dQ_mn: cute.Tensor, cQ_mn: cute.Tensor, ctid: Int32):
        """The sub-tile's dQ partials in the input dtype (a CPU study, tests/
        test_dq_partials_numerics.py, found the rounding far inside SPEC's dq bound; the chain: fp32) to staging
        buffer ``t % 2`` with their rows' places (-1: padding), for the producer warpgroup to
        copy out (:meth:`store_dq_pieces`, :meth:`chain_issue`) while the consumers go on (row
        stride ``dq_rs``)."""
        D = self.D
        RS = self.dq_rs
        b = t % 2
        dq_state = ring_state(2, t, producer=True)
        pipe_dq.producer_acquire(dq_state)  # sub-tile t - 2 copied out
        sdq = st.sdQ.get_tensor(cute.make_layout(2 * BM * RS)).iterator + b * BM * RS
        for r in cutlass.range_constexpr(cute.size(dQ_mn, mode=[0])):
            n = cQ_mn[r, 0][0]
            for c in cutlass.range_constexpr(cute.size(dQ_mn, mode=[1]) // 2):
                col = cQ_mn[r, 2 * c][1]  # columns 2c, 2c + 1 are adjacent
                store_pair(Float32 if self.chain else self.dtype, dQ_mn[r, 2 * c], dQ_mn[r, 2 * c + 1],
                           sdq + (n * RS + col))
        if cutlass.const_expr(self.chain):
            cute.arch.fence_view_async_shared()  # (the chain copies the buffer out by bulk copies)
        if ctid < BM:
            loc = Int32(-1)
            if st.sHi.get_tensor(cute.make_layout(BM * self.QS))[stage * BM + ctid] >= 0:
                loc = st.sLoc.get_tensor(cute.make_layout(BM * self.QS))[stage * BM + ctid]
            st.sLocQ.get_tensor(cute.make_layout(2 * BM))[b * BM + ctid] = loc
        pipe_dq.producer_commit(dq_state)

    @cute.jit
    def stage_nothing(self, st, pipe_dq, t: Int32, ctid: Int32):
        """A skipped sub-tile's staging buffer: no row has a place (the chain's copy-out only
        releases its semaphore)."""
        b = t % 2
        dq_state = ring_state(2, t, producer=True)
        pipe_dq.producer_acquire(dq_state)
        if ctid < BM:
            st.sLocQ.get_tensor(cute.make_layout(2 * BM))[b * BM + ctid] = Int32(-1)
        pipe_dq.producer_commit(dq_state)

    @cute.jit
    def store_dkv(self, dk: cute.Pointer, dv: cute.Pointer, dK_mn: cute.Tensor, dV_mn: cute.Tensor,
                  cK_mn: cute.Tensor, nkeys: Int32, key0: Int32, kvh: Int32, Hk: Int32):
        """dK and dV of the chunk's keys (rows < nkeys) in the input dtype, (total_k, Hk, D)."""
        D = self.D
        for r in cutlass.range_constexpr(cute.size(dK_mn, mode=[0])):
            m = cK_mn[r, 0][0]
            if m < nkeys:
                base = (Int64(key0 + m) * Int64(Hk) + Int64(kvh)) * Int64(D)
                for c in cutlass.range_constexpr(cute.size(dK_mn, mode=[1]) // 2):
                    col = cK_mn[r, 2 * c][1]  # columns 2c, 2c + 1 are adjacent
                    for acc_mn, out in ((dK_mn, dk), (dV_mn, dv)):
                        store_pair(self.dtype, acc_mn[r, 2 * c], acc_mn[r, 2 * c + 1], out + base + col)
