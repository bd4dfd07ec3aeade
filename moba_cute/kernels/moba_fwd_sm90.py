"""MoBA attention forward for Hopper (sm90): the key-major *segment* kernel (TMA, wgmma,
warp specialization with ``setmaxnreg``).

Schedule (docs/design.md, section 8): every selected (row, head, chunk) pair except the causal
own chunk is computed by one launch of :class:`MobaFwdSm90` per window of KV heads (the
partial buffer holds one window's pairs; one window unless the sequence is long). Its work
unit is up to ``SUB * 64`` consecutive entries of one (global chunk g, head h) segment of the
all-slot pair lists (:class:`~moba_cute.kernels.slot_index.PairListKernel` with
``head_major``, from the routing's key-major index): every row that chose chunk g in a gather
slot. An entry is the pair's head-major index ``p = (h * total_q + row) * KP + slot - s0``;
its partial is at ``p - pbase`` (``pbase``: the window's first pair). When one KV head's
partials exceed the bound (long prefill without gradients), the windows are ``nrw`` ranges of
one query head's rows instead, and a launch takes one window's units
(:class:`~moba_cute.kernels.slot_index.WindowCountKernel`, ``wstart``). The CTA:

* producer warpgroup (``setmaxnreg`` down): gathers each 64-row sub-tile of query rows with
  16-byte ``cp.async`` into a swizzled Q ring, two stages per consumer warpgroup
  (``PipelineCpAsync``); warp 0 loads
  the chunk's K and V n-blocks with TMA (``cp.async.bulk.tensor``, ``PipelineTmaAsync``).
  A chunk that fits one n-block (``C <= BN``: the flashmoba shape) is loaded once for all
  sub-tiles of the unit;
* consumer warpgroup (``setmaxnreg`` up): per sub-tile and n-block ``S = Q K^T`` (SS
  ``wgmma``), mask, online softmax (exp2, scale folded into the log2 domain), ``O += P V``
  (RS ``wgmma``: P stays in registers), then writes the pair's *normalized* partial output
  ``part_o[p] = O / l`` (input dtype) and ``part_lse[p] = m * scale_log2 + log2(l)`` (fp32,
  log2 domain).

Two CTAs run per SM (128 launch registers, 40 / 216 after ``setmaxnreg``), so one CTA's loads
overlap the other's math. (Two consumer warpgroups in one CTA per SM taking alternate sub-tiles
with the chunk resident measured slower on the H200: 5.1 against 4.1 ms at 64K flashmoba.
:class:`MobaFwdSm90Pair` is two consumer warpgroups for *streamed* chunks, sharing each n-block
loaded.) The
partials are merged with the own chunk by the diagonal kernel (causal: on wgmma,
:class:`~moba_cute.kernels.moba_fwd_diag_sm90.MobaDiagSm90`, for chunks of 128 keys or more, else
:class:`~moba_cute.kernels.moba_fwd_sm80.MobaFwdSm80` with ``merge=True``) or by
:class:`~moba_cute.kernels.merge.MergeKernel` (non-causal), which write ``out`` and ``lse``.
A pair's arithmetic does not depend on its place in the tile, and the merge reads a row's
partials in slot order, so the result is bitwise deterministic.

Variants (docs/design.md, section 8): clusters of two CTAs sharing each K/V n-block by TMA
multicast (``mcast=2``; the default for long chunks), Q in registers for streamed n-blocks
(``q_regs``), and FA3's intra-warpgroup overlap (``overlap``; always in
:class:`MobaFwdSm90Pair`), whose K and V n-blocks are in TMA rings of their own
(``split_kv``, :class:`SplitKV`).

Static configuration (compile key): ``(dtype, head_dim, bn, sub, kv_stages)`` (and the staged
epilogue, the overlap, ``"qregs"``, ``"mc2"``, or ``"pair"``); sizes and the
window are runtime scalars, Q/partials/index raw pointers, K/V TMA descriptors built per call on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cute.nvgpu import warp as nvwarp
from cutlass.utils import LayoutEnum

from .moba_fwd_sm80 import _flat, _online_softmax, _quad_max, _quad_sum
from .segments import segment_unit

BM = 64  # rows of one consumer warpgroup's wgmma (m64)
PRODUCER_REGS = 40
# consumer registers after setmaxnreg: 40 + 216 = 2 * 128 (two CTAs of 256 threads per SM)
CONSUMER_REGS = 216
CTAS_PER_SM = 2
PP_BARRIER = 3  # ping-pong: named barriers 3 and 4 (1: V tail zeroed, 2: staged epilogue)
SCHED_BARRIER = 5  # the persistent walk's producer warpgroup: the next unit taken


def acc_mn_view(t: cute.Tensor) -> cute.Tensor:
    """View a wgmma accumulator partition ((2, 2, V), MMA_M, MMA_N) as (rows, cols)."""
    lay = cute.make_layout(t.layout.shape)
    mn = cute.make_layout(
        ((lay.shape[0][1], lay.shape[1]), (lay.shape[0][0], lay.shape[0][2], lay.shape[2])),
        stride=((lay.stride[0][1], lay.stride[1]), (lay.stride[0][0], lay.stride[0][2], lay.stride[2])),
    )
    return cute.make_tensor(t.iterator, cute.composition(t.layout, mn))


def acc_as_a_operand(t: cute.Tensor) -> cute.Tensor:
    """View an m64nN accumulator-shaped register tensor ((2, 2, N/8), M, 1) as the A operand
    of an m64nXk16 wgmma with K = N: ((2, 2, 2), M, N/16) (same registers, no data movement)."""
    lay = cute.logical_divide(t.layout, ((None, None, 2), None, None))
    a = cute.make_layout(
        ((lay.shape[0][0], lay.shape[0][1], lay.shape[0][2][0]), lay.shape[1], (lay.shape[0][2][1], lay.shape[2])),
        stride=((lay.stride[0][0], lay.stride[0][1], lay.stride[0][2][0]), lay.stride[1],
                (lay.stride[0][2][1], lay.stride[2])),
    )
    return cute.make_tensor(t.iterator, a)


def swizzled_index(layout, coord):
    """Element index of ``coord`` in a shared-memory layout of 2-byte elements whose 128-byte
    swizzle lives in the iterator, applied by hand: bits 4-6 of the byte offset XOR bits 7-9
    (row tiles are whole 1024-byte swizzle periods)."""
    sb = cute.crd2idx(coord, layout) * 2
    return (sb ^ ((sb & 0x380) >> 3)) // 2


@cute.jit
def inv_row_sum(l: Float32):
    """``1 / l`` for normalizing a row's output, 0 for a row that saw no key (NaN propagates)."""
    inv = Float32(0.0)
    if (l > Float32(0.0)) | (l != l):
        inv = cute.arch.rcp_approx(l)
    return inv


@cute.jit
def row_lse_log2(m: Float32, l: Float32, scale_log2: Float32):
    """A row's log2-domain LSE from its raw-score max and sum: -inf for a row that saw no key
    (NaN propagates)."""
    val = -Float32.inf
    if (l > Float32(0.0)) | (l != l):
        val = m * scale_log2 + cute.math.log2(l, fastmath=False)
    return val


def kv_tma_atoms(k: cute.Pointer, v: cute.Pointer, total_k: Int32, Hk: Int32, D: int, smem_kv, BN: int,
                 mcast: int = 1):
    """TMA atoms for K and V seen as (keys, dim, kv head) tensors, a box = ``BN`` keys x ``D`` of
    one KV head into ``smem_kv`` (one stage's layout); returns (atom_k, tma_k, atom_v, tma_v,
    bytes of one K + V box). Shared by the sm90 forward and backward. ``mcast > 1``: multicast to
    the ``mcast`` CTAs of a cluster, each issuing ``BN / mcast`` of the box's keys."""
    kv_layout = cute.make_layout((total_k, D, Hk), stride=(Hk * D, 1, D))
    if mcast > 1:
        tma_op, kw = cpasync.CopyBulkTensorTileG2SMulticastOp(), {"num_multicast": mcast}
    else:
        tma_op, kw = cpasync.CopyBulkTensorTileG2SOp(), {}
    atom_k, tma_k = cpasync.make_tiled_tma_atom(tma_op, cute.make_tensor(k, kv_layout), smem_kv, (BN, D), **kw)
    atom_v, tma_v = cpasync.make_tiled_tma_atom(tma_op, cute.make_tensor(v, kv_layout), smem_kv, (BN, D), **kw)
    return atom_k, tma_k, atom_v, tma_v, 2 * cute.size_in_bytes(k.dtype, smem_kv)


def kv_tma_views(atom_k: cute.CopyAtom, tma_k: cute.Tensor, atom_v: cute.CopyAtom, tma_v: cute.Tensor,
                 sK: cute.Tensor, sV: cute.Tensor, kvh: Int32, key0: Int32, BN: int, D: int, rank=0, mcast: int = 1):
    """TMA partitions of KV head ``kvh``'s keys from ``key0`` on, in boxes of ``BN`` keys:
    (tKsK, tKgK, tVsV, tVgV), the global side indexed by box, the shared side by ring stage
    (``mcast > 1``: this CTA's slice of each box, ``rank`` its place in the cluster)."""
    gK = cute.local_tile(cute.domain_offset((key0, 0), tma_k[None, None, kvh]), (BN, D), (None, 0))
    gV = cute.local_tile(cute.domain_offset((key0, 0), tma_v[None, None, kvh]), (BN, D), (None, 0))
    tKsK, tKgK = cpasync.tma_partition(atom_k, rank, cute.make_layout(mcast), cute.group_modes(sK, 0, 2),
                                       cute.group_modes(gK, 0, 2))
    tVsV, tVgV = cpasync.tma_partition(atom_v, rank, cute.make_layout(mcast), cute.group_modes(sV, 0, 2),
                                       cute.group_modes(gV, 0, 2))
    return tKsK, tKgK, tVsV, tVgV


def ring_state(stages: int, i, producer: bool = False):
    """Consumer state of item ``i`` of a ring its producer fills in order: stage ``i % stages``,
    phase ``(i // stages) % 2``; ``producer``: the producer's state of that item (phase flipped)."""
    stage, phase = i % stages, (i // stages) % 2
    return pipeline.PipelineState(stages, i, stage, phase ^ 1 if producer else phase)


class UnitArgs(NamedTuple):
    """The index arrays and sizes :func:`~moba_cute.kernels.segments.segment_unit` decodes a work
    unit from (the persistent walk's producer decodes one unit after the other)."""
    tiles: Any
    tile_seg: Any
    seg_off: Any
    tile_off: Any
    seg_start: Any
    cu_k: Any
    cu_chunks: Any
    wstart: Any
    B: Any
    total_k: Any
    H: Any
    Hk: Any
    chunk_size: Any
    nbound: Any
    nrw: Any


@dataclass(frozen=True)
class SplitKV:
    """K and V n-blocks in TMA rings of their own (``MobaFwdSm90.split_kv``; the same stage
    index and phase in both): K's stage goes back to the producer once ``QK^T`` has read it,
    V's once ``PV`` has. (A dataclass, as the pipelines are, so that the DSL carries it through
    runtime branches and keeps their stage counts static.)"""
    k: Any
    v: Any


def gather_tma_pipelines(st, q_stages: int, q_consumers: int, kv_stages: int, kv_consumers: int, kv_bytes: int,
                         q_producers: int = 128, mcast: int = 1, v_barriers=None, v_stages=None):
    """The two pipelines of the sm90 kernels: the producer warpgroup's ``cp.async`` row ring
    (``q_producers`` threads -> ``q_consumers`` threads; mbarriers ``st.mbar_q``) and warp 0's TMA
    K/V stages (one thread -> ``kv_consumers`` warps, ``kv_bytes`` per stage; ``st.mbar_kv``).
    ``mcast > 1``: the K/V stages are multicast over a cluster of ``mcast`` CTAs, so a stage is
    free once every CTA's consumer warps released it (lane ``r`` of each warp arrives on CTA
    ``r``'s barrier). ``v_barriers`` (a shared mbarrier range of ``2 * kv_stages``): K and V get
    rings of their own, ``st.mbar_kv`` K's (:class:`SplitKV`; V's of ``v_stages`` stages, default
    ``kv_stages``). Initialized without a sync: the
    caller fences and syncs once for all its pipelines (cluster-wide with ``mcast > 1``)."""
    group = pipeline.CooperativeGroup
    pipe_q = pipeline.PipelineCpAsync.create(
        barrier_storage=st.mbar_q.data_ptr(), num_stages=q_stages,
        producer_group=group(pipeline.Agent.Thread, q_producers),
        consumer_group=group(pipeline.Agent.Thread, q_consumers),
        defer_sync=True)
    kw = {"cta_layout_vmnk": cute.make_layout((1, mcast, 1, 1))} if mcast > 1 else {}

    def tma_ring(barriers, tx_count, stages=kv_stages):
        return pipeline.PipelineTmaAsync.create(
            barrier_storage=barriers.data_ptr(), num_stages=stages, producer_group=group(pipeline.Agent.Thread, 1),
            consumer_group=group(pipeline.Agent.Thread, kv_consumers * mcast), tx_count=tx_count, defer_sync=True,
            **kw)

    if v_barriers is None:
        return pipe_q, tma_ring(st.mbar_kv, kv_bytes)
    return pipe_q, SplitKV(tma_ring(st.mbar_kv, kv_bytes // 2),
                           tma_ring(v_barriers, kv_bytes // 2, kv_stages if v_stages is None else v_stages))


@cute.jit
def kernel_prologue(atom_k: cute.CopyAtom, atom_v: cute.CopyAtom, Storage: cutlass.Constexpr):
    """The sm90 kernels' start: the warp index (warp-uniform), warp 0 prefetching the K/V TMA
    descriptors, the shared-memory struct; returns (warp, st)."""
    warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
    if warp == 0:
        cpasync.prefetch_descriptor(atom_k)
        cpasync.prefetch_descriptor(atom_v)
    smem = cutlass.utils.SmemAllocator()
    return warp, smem.allocate(Storage)


@cute.jit
def zero_rows_from(s: cute.Tensor, stage, nvalid: Int32, tid: Int32, nthr: cutlass.Constexpr,
                   rows: cutlass.Constexpr, D: cutlass.Constexpr, dtype: cutlass.Constexpr):
    """Zero rows ``[nvalid, rows)`` of ring stage ``stage`` of a (rows, D, stages) shared
    tensor (``nthr`` threads from ``tid``) and fence the generic-proxy writes for the wgmma that
    reads them; the caller syncs the threads."""
    for i in cutlass.range(tid, rows * D, nthr):
        rr = i // D
        if rr >= nvalid:
            s[rr, i - rr * D, stage] = dtype(0.0)
    cute.arch.fence_view_async_shared()


@cute.jit
def gemm_kblocks(tiled_mma: cute.TiledMma, acc: cute.Tensor, tA: cute.Tensor, tB: cute.Tensor, a_stage, b_stage,
                 zero_init: cutlass.Constexpr = True):
    """``acc = A B`` (``zero_init``) or ``acc += A B``: one wgmma per k-block (mode 2 of the
    partitions); ``a_stage`` / ``b_stage`` pick a shared-memory operand's ring stage (mode 3),
    ``a_stage=None`` for a register A operand. The caller fences, commits and waits."""
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for kb in cutlass.range_constexpr(cute.size(tA.shape[2])):
        if cutlass.const_expr(a_stage is None):
            cute.gemm(atom, acc, tA[None, None, kb], tB[None, None, kb, b_stage], acc)
        else:
            cute.gemm(atom, acc, tA[None, None, kb, a_stage], tB[None, None, kb, b_stage], acc)
        if cutlass.const_expr(zero_init):
            atom.set(warpgroup.Field.ACCUMULATE, True)


class PingPong:
    """FA3's ping-pong between two consumer warpgroups, for the sm90 kernels that have it (the
    forward's and backward's; ``self.pingpong`` says whether this configuration does): named
    barriers ``PP_BARRIER + 0 / 1``. Without it the calls are no-ops."""

    @cute.jit
    def pp_turn(self, wg: Int32):
        """Wait for warpgroup ``wg``'s turn to issue its wgmmas (the other's :meth:`pp_pass`), so
        that one warpgroup's softmax runs under the other's GEMMs."""
        if cutlass.const_expr(self.pingpong):
            cute.arch.barrier(barrier_id=PP_BARRIER + wg, number_of_threads=256)

    @cute.jit
    def pp_pass(self, wg: Int32):
        """Give the other warpgroup its turn, after this one's wgmmas are issued."""
        if cutlass.const_expr(self.pingpong):
            cute.arch.barrier_arrive(barrier_id=PP_BARRIER + 1 - wg, number_of_threads=256)

    @cute.jit
    def pp_idle(self, wg: Int32):
        """A turn without wgmmas (a warpgroup without a sub-tile, or one that skips it)."""
        self.pp_turn(wg)
        self.pp_pass(wg)


class ConsumerFrags(NamedTuple):
    """A consumer thread's wgmma operands and state (built by :meth:`MobaFwdSm90.consumer`): the
    QK^T and PV tiled MMAs, Q / K / V^T fragments, the S and O accumulators, P in the input dtype
    (and as PV's register A operand), (rows, cols) views of S and O and of their coordinates, and
    the rows' running max and sum."""
    mma_qk: Any
    mma_pv: Any
    tSrQ: Any
    tSrK: Any
    tOrVt: Any
    acc_S: Any
    acc_O: Any
    rP: Any
    tOrP: Any
    S_mn: Any
    O_mn: Any
    cS_mn: Any
    cO_mn: Any
    row_max: Any
    row_sum: Any


class QRegFrags(NamedTuple):
    """Q in registers for an RS QK^T (``SegVariant(q_regs=True)``): the tiled MMA, the Q
    fragment (A) and the K descriptors (B), the ldmatrix tiled copy, its view of the Q ring and
    of the fragment."""
    mma: Any
    tSrQ: Any
    tSrK: Any
    s2r: Any
    tQsQ: Any
    tQrQ: Any


@dataclass(frozen=True)
class SegVariant:
    """The switches of the segment kernel's loops, one bundle from the launch plan to the compile
    key and the kernel (:meth:`for_tile`: those a tile takes of those asked for).

    ``staged``: the staged epilogue of chunks of one n-block (a sub-tile's normalized partials go
    through its own Q ring stage, free once its QK^T is done, and out in whole 16-byte pieces
    instead of 4-byte stores from the accumulator fragments); the shipped default.
    ``overlap``: FA3's intra-warpgroup overlap (:meth:`MobaFwdSm90.stream_overlapped`), two or
    more K/V stages. ``q_regs``: in the sequential loop a sub-tile's Q is loaded into registers
    (ldmatrix) once and QK^T runs as RS wgmma, so each n-block's QK^T reads only K from shared
    memory, and the Q stage goes back to the producer before the sub-tile's first n-block;
    bitwise the SS result; on the H100 1.9% faster at moba-large 128K, 8% slower at C = 512 (the
    L2 -> SM crossbar, not shared memory, bounds the loop; docs/design.md, section 8); 64-key
    n-blocks only (with 128-key ones S, P, O and Q do not fit the consumer's registers).
    ``mcast = 2``: K/V multicast, clusters of two CTAs take one work unit, rank r its sub-tiles
    r, r + 2, ..., and each n-block is read from L2 once for both (every chunk streamed per step,
    also a chunk of one n-block), so a K/V byte that crosses the crossbar feeds 128 rows instead
    of 64; with or without the overlap. ``rescale_skip``: in the streamed loops a warp skips O's
    rescale where every factor of its rows is exactly 1 (no row max moved; bitwise the same O).
    ``persistent``: for chunks of one n-block (``C <= bn``, the launch plan's choice) a grid of
    at most two CTAs per SM walks the units (each CTA takes the next from the pass's counter),
    with K and V in one-stage rings of their own: the next unit's K loads once this unit's last ``QK^T`` is
    done, its V once the last ``PV`` is, and its Q rows are gathered during this unit's last
    sub-tiles, so no CTA start, unit decode or first K/V load lies on the consumer's path.
    One-stage one-consumer tiles with the staged epilogue, no clusters."""

    staged: bool = True
    overlap: bool = False
    q_regs: bool = False
    mcast: int = 1
    rescale_skip: bool = False
    persistent: bool = False

    def for_tile(self, bn: int, kv_stages: int) -> "SegVariant":
        overlap = bool(self.overlap) and kv_stages >= 2
        mcast = 2 if int(self.mcast) == 2 else 1
        persistent = bool(self.persistent) and bool(self.staged) and not overlap and mcast == 1 and kv_stages == 1
        return SegVariant(bool(self.staged), overlap, bool(self.q_regs) and not overlap and bn <= 64 and not persistent,
                          mcast, bool(self.rescale_skip), persistent)

    def key(self) -> tuple:
        """The compile-key suffix (of a variant :meth:`for_tile` has settled)."""
        return (("staged",) * self.staged + ("overlap",) * self.overlap + ("qregs",) * self.q_regs
                + ("mc2",) * (self.mcast == 2) + ("rskip",) * self.rescale_skip + ("persist",) * self.persistent)


class MobaFwdSm90(PingPong):
    """Key-major segment forward (all gather slots in one launch). See the module docstring."""

    def __init__(self, dtype, head_dim: int, bn: int = 128, sub: int = 4, kv_stages: int = 1,
                 variant: SegVariant = SegVariant()):
        assert head_dim in (64, 128), "128-byte swizzled rows"
        assert bn % 16 == 0 and bn <= 256
        self.dtype = dtype
        self.D = head_dim
        self.BN = bn
        self.SUB = sub
        self.KS = kv_stages
        self.QS = 2  # Q ring stages
        self.THREADS = 256  # producer and consumer warpgroups
        self.CTAS = CTAS_PER_SM
        self.NW = 1  # consumer warpgroups
        self.PRODUCER_REGS, self.CONSUMER_REGS = PRODUCER_REGS, CONSUMER_REGS
        self.Q_PRODUCERS = 128  # threads gathering Q rows
        v = self.variant = variant.for_tile(bn, kv_stages)
        self.staged, self.overlap, self.q_regs, self.CL, self.rescale_skip, self.persistent = (
            v.staged, v.overlap, v.q_regs, v.mcast, v.rescale_skip, v.persistent)
        self.pingpong = False  # (MobaFwdSm90Pair)

    @property
    def split_kv(self) -> bool:
        """K and V in TMA rings of their own (:class:`SplitKV`): with the overlap. Its loop holds
        block n - 1's V while block n's K is read, so the producer refills K as soon as ``QK^T``
        has read it, instead of after the previous block's ``PV`` (a joint K/V stage left every
        block's load exposed). Persistent: the next unit's K and V load as soon as this unit is
        done with each."""
        return self.overlap or self.persistent

    @staticmethod
    def compile_key(dtype_name: str, head_dim: int, bn: int, sub: int, kv_stages: int,
                    variant: SegVariant = SegVariant()):
        return (("moba_fwd_sm90", dtype_name, int(head_dim), int(bn), int(sub), int(kv_stages))
                + variant.for_tile(bn, kv_stages).key())

    def _layouts(self):
        dt, D = self.dtype, self.D
        atom = warpgroup.make_smem_layout_atom(sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dt, D), dt)
        sQ = cute.tile_to_shape(atom, (BM, D, self.QS), order=(0, 1, 2))
        sK = cute.tile_to_shape(atom, (self.BN, D, self.KS), order=(0, 1, 2))
        return sQ, sK

    def _storage(self, sQ_layout, sKV_layout):
        """The shared-memory struct: mbarriers (split K/V: V's own), the Q ring, K and V; staged,
        also the places of two sub-tiles' staged rows."""
        MR, AL = cute.struct.MemRange, cute.struct.Align
        fields = {"mbar_q": MR[cutlass.Int64, 2 * self.QS], "mbar_kv": MR[cutlass.Int64, 2 * self.KS],
                  "sQ": AL[MR[self.dtype, cute.cosize(sQ_layout)], 1024],
                  "sK": AL[MR[self.dtype, cute.cosize(sKV_layout)], 1024],
                  "sV": AL[MR[self.dtype, cute.cosize(sKV_layout)], 1024]}
        if self.split_kv:
            fields["mbar_v"] = MR[cutlass.Int64, 2 * self.KS]
        if self.staged:
            fields["sLoc"] = AL[MR[Int32, 2 * BM], 16]
        if self.persistent:
            fields["mbar_unit"] = MR[cutlass.Int64, 4]
            fields["sUnit"] = AL[MR[Int32, 8], 16]  # two units' (first entry, rows, keys, unit number)
        fields.update(self._extra_smem())
        return cute.struct(type("Storage", (), {"__annotations__": fields}))

    def _extra_smem(self):
        """Further shared-memory fields of a subclass (name -> MemRange)."""
        return {}

    def _v_barriers(self, st):
        """V's own ring barriers where K and V are split, else None (one K/V ring)."""
        return st.mbar_v if self.split_kv else None

    def host_setup(self, k: cute.Pointer, v: cute.Pointer, total_k: Int32, Hk: Int32):
        """The launch's static pieces (traced inside ``__call__``): the QK^T (SS) and PV (RS)
        tiled MMAs, the Q and K/V shared-memory layouts, the K/V TMA atoms (a box is one n-block
        of one KV head; sets ``self.kv_bytes``) and the shared-memory struct."""
        dt, D, BN = self.dtype, self.D, self.BN
        tiled_mma_qk = sm90_utils.make_trivial_tiled_mma(
            dt, dt, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K, Float32, (1, 1, 1), (BM, BN))
        tiled_mma_pv = sm90_utils.make_trivial_tiled_mma(
            dt, dt, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.MN, Float32, (1, 1, 1), (BM, D),
            a_source=warpgroup.OperandSource.RMEM)
        sQ_layout, sKV_layout = self._layouts()
        atom_k, tma_k, atom_v, tma_v, self.kv_bytes = kv_tma_atoms(k, v, total_k, Hk, D,
                                                                   cute.select(sKV_layout, mode=[0, 1]), BN, self.CL)
        Storage = self._storage(sQ_layout, sKV_layout)
        return tiled_mma_qk, tiled_mma_pv, sQ_layout, sKV_layout, atom_k, tma_k, atom_v, tma_v, Storage

    @cute.jit
    def __call__(
        self,
        q: cute.Pointer,
        k: cute.Pointer,
        v: cute.Pointer,
        part_o: cute.Pointer,
        part_lse: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        tiles: cute.Pointer,
        rows_list: cute.Pointer,
        tile_seg: cute.Pointer,
        seg_off: cute.Pointer,
        tile_off: cute.Pointer,
        seg_start: cute.Pointer,
        wstart: cute.Pointer,
        work: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        KP: Int32,
        nbound: Int32,
        pbase: Int32,
        nrw: Int32,
        grid_x: Int32,
        scale_log2: Float32,
        stream: cuda.CUstream,
    ):
        (tiled_mma_qk, tiled_mma_pv, sQ_layout, sKV_layout, atom_k, tma_k, atom_v, tma_v,
         Storage) = self.host_setup(k, v, total_k, Hk)
        self.kernel(
            tma_k, tma_v, atom_k, atom_v, q, part_o, part_lse, cu_k, cu_chunks, tiles, rows_list, tile_seg,
            seg_off, tile_off, seg_start, wstart, work, B, total_q, total_k, H, Hk, chunk_size, KP, nbound, pbase, nrw,
            scale_log2, sQ_layout, sKV_layout, tiled_mma_qk, tiled_mma_pv, Storage,
        ).launch(grid=(grid_x * self.CL, 1, 1), block=(self.THREADS, 1, 1), stream=stream,
                 cluster=(self.CL, 1, 1) if self.CL > 1 else None,
                 min_blocks_per_mp=self.CTAS, preferred_smem_carveout=100)

    @cute.kernel
    def kernel(
        self,
        tma_k: cute.Tensor,
        tma_v: cute.Tensor,
        atom_k: cute.CopyAtom,
        atom_v: cute.CopyAtom,
        q: cute.Pointer,
        part_o: cute.Pointer,
        part_lse: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        tiles: cute.Pointer,
        rows_list: cute.Pointer,
        tile_seg: cute.Pointer,
        seg_off: cute.Pointer,
        tile_off: cute.Pointer,
        seg_start: cute.Pointer,
        wstart: cute.Pointer,
        work: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        KP: Int32,
        nbound: Int32,
        pbase: Int32,
        nrw: Int32,
        scale_log2: Float32,
        sQ_layout: cute.ComposedLayout,
        sKV_layout: cute.ComposedLayout,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        Storage: cutlass.Constexpr,
    ):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        warp, st = kernel_prologue(atom_k, atom_v, Storage)
        pipe_q, pipe_kv = gather_tma_pipelines(st, self.QS, 128, self.KS, 4 * self.NW, self.kv_bytes,
                                               self.Q_PRODUCERS, self.CL, self._v_barriers(st))
        pipe_u = None
        if cutlass.const_expr(self.persistent):
            # the persistent walk's units, producer warp 0 -> the consumer warpgroup (two stages)
            pipe_u = pipeline.PipelineAsync.create(
                barrier_storage=st.mbar_unit.data_ptr(), num_stages=2,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 32),
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 128), defer_sync=True)
        # barrier init visible to both warpgroups, and with a cluster to the peer CTA, which
        # multicasts into this CTA's stages and arrives on its barriers
        cluster = cute.make_layout((self.CL, 1))
        pipeline.pipeline_init_arrive(cluster_shape_mn=cluster, is_relaxed=True)
        sQ = st.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = st.sK.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sV = st.sV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)

        UNIT = BM * self.SUB
        if cutlass.const_expr(self.persistent):
            pipeline.pipeline_init_wait(cluster_shape_mn=cluster)
            ua = UnitArgs(tiles, tile_seg, seg_off, tile_off, seg_start, cu_k, cu_chunks, wstart, B, total_k, H,
                          Hk, chunk_size, nbound, nrw)
            sunit = st.sUnit.get_tensor(cute.make_layout(8))  # two slots: (first entry, rows, keys, unit)
            if warp < 4:
                cute.arch.setmaxregister_decrease(self.PRODUCER_REGS)
                self.producer_persistent(tma_k, tma_v, atom_k, atom_v, q, rows_list, sQ, sK, sV, sunit, pipe_u,
                                         pipe_q, pipe_kv, ua, work, total_q, KP, tid, warp)
            else:
                cute.arch.setmaxregister_increase(self.CONSUMER_REGS)
                self.consumer_persistent(part_o, part_lse, rows_list, sQ, sK, sV, sunit, pipe_u, pipe_q, pipe_kv,
                                         tiled_mma_qk, tiled_mma_pv, pbase, scale_log2, tid - 128, st)
        else:
            unit = _flat(tiles)[0] + bid // self.CL  # (a cluster's CTAs share their unit)
            r0, nrows, h, ks, kbeg, kend = segment_unit(tiles, tile_seg, seg_off, tile_off, seg_start, cu_k,
                                                        cu_chunks, unit, Int32(UNIT), Int32(0), B,
                                                        total_k, H, chunk_size, True, Hk, nbound, nrw, wstart)
            nsub = (nrows + BM - 1) // BM
            nblk = (kend - kbeg + self.BN - 1) // self.BN
            pipeline.pipeline_init_wait(cluster_shape_mn=cluster)

            if warp < 4:
                cute.arch.setmaxregister_decrease(self.PRODUCER_REGS)
                if nrows > 0:
                    self.producer(tma_k, tma_v, atom_k, atom_v, q, rows_list, sQ, sK, sV, pipe_q, pipe_kv, r0, nrows,
                                  nsub, nblk, h, H, Hk, total_q, ks + kbeg, KP, tid, warp)
            else:
                cute.arch.setmaxregister_increase(self.CONSUMER_REGS)
                if nrows > 0:
                    self.consumer(part_o, part_lse, rows_list, sQ, sK, sV, pipe_q, pipe_kv, tiled_mma_qk, tiled_mma_pv,
                                  r0, nrows, nsub, nblk, kend - kbeg, pbase, scale_log2, tid - 128, st)

    @cute.jit
    def producer(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom,
                 q: cute.Pointer, rows_list: cute.Pointer, sQ: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor,
                 pipe_q, pipe_kv, r0: Int32, nrows: Int32, nsub: Int32, nblk: Int32, h: Int32, H: Int32, Hk: Int32,
                 total_q: Int32, key0: Int32, KP: Int32, tid: Int32, warp: Int32):
        if cutlass.const_expr(self.CL > 1):
            self.producer_multicast(tma_k, tma_v, atom_k, atom_v, q, rows_list, sQ, sK, sV, pipe_q, pipe_kv, r0,
                                    nrows, nsub, nblk, h, H, Hk, total_q, key0, KP, tid, warp)
        else:
            self.producer_single(tma_k, tma_v, atom_k, atom_v, q, rows_list, sQ, sK, sV, pipe_q, pipe_kv, r0, nrows,
                                 nsub, nblk, h, H, Hk, total_q, key0, KP, tid, warp)

    @cute.jit
    def producer_single(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom,
                        q: cute.Pointer, rows_list: cute.Pointer, sQ: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor,
                        pipe_q, pipe_kv, r0: Int32, nrows: Int32, nsub: Int32, nblk: Int32, h: Int32, H: Int32,
                        Hk: Int32, total_q: Int32, key0: Int32, KP: Int32, tid: Int32, warp: Int32):
        """One CTA: each sub-tile's rows (warp w: rows 16w .. 16w + 15), then warp 0 streams the
        chunk's n-blocks for it (a chunk of one n-block: once, for the whole unit)."""
        # TMA views: this KV head's keys from the chunk start, in n-blocks of BN
        kv_views = kv_tma_views(atom_k, tma_k, atom_v, tma_v, sK, sV, h // (H // Hk), key0, self.BN, self.D)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.QS)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.KS)
        for t in cutlass.range(nsub, unroll=1):
            # warp w gathers rows 16w .. 16w + 15 of the sub-tile
            self.gather_rows(q, rows_list, sQ, pipe_q, q_state, r0, t * BM, nrows, warp * 16, Int32(16), h, H,
                             total_q, KP, tid % 32, 16)
            q_state.advance()
            if warp == 0:
                if (t == 0) | (nblk > 1):
                    for n in cutlass.range(nblk, unroll=1):
                        self.load_kv_block(atom_k, atom_v, kv_views, pipe_kv, kv_state, n)
                        kv_state.advance()

    @cute.jit
    def producer_multicast(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom,
                           atom_v: cute.CopyAtom, q: cute.Pointer, rows_list: cute.Pointer, sQ: cute.Tensor,
                           sK: cute.Tensor, sV: cute.Tensor, pipe_q, pipe_kv, r0: Int32, nrows: Int32, nsub: Int32,
                           nblk: Int32, h: Int32, H: Int32, Hk: Int32, total_q: Int32, key0: Int32, KP: Int32,
                           tid: Int32, warp: Int32):
        """``CL = 2``: per step, this CTA's sub-tile (rank r: sub-tiles r, r + 2, ...; none in an odd
        unit's last step on rank 1) and all of the chunk's n-blocks, each issued half by either CTA
        and multicast to both. Both CTAs stream the same steps, so every stage is acquired, filled
        and released by both; the tail keeps this CTA alive until the peer's last arrives landed."""
        rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
        kv_views = kv_tma_views(atom_k, tma_k, atom_v, tma_v, sK, sV, h // (H // Hk), key0, self.BN, self.D, rank,
                                self.CL)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.QS)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.KS)
        for j in cutlass.range((nsub + self.CL - 1) // self.CL, unroll=1):
            t = j * self.CL + rank
            if t < nsub:
                self.gather_rows(q, rows_list, sQ, pipe_q, q_state, r0, t * BM, nrows, warp * 16, Int32(16), h, H,
                                 total_q, KP, tid % 32, 16)
                q_state.advance()
            if warp == 0:
                for n in cutlass.range(nblk, unroll=1):
                    self.load_kv_block(atom_k, atom_v, kv_views, pipe_kv, kv_state, n)
                    kv_state.advance()
        if warp == 0:
            if cutlass.const_expr(self.split_kv):
                pipe_kv.k.producer_tail(kv_state.clone())
                pipe_kv.v.producer_tail(kv_state)
            else:
                pipe_kv.producer_tail(kv_state)

    @cute.jit
    def producer_persistent(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom,
                            atom_v: cute.CopyAtom, q: cute.Pointer, rows_list: cute.Pointer, sQ: cute.Tensor,
                            sK: cute.Tensor, sV: cute.Tensor, sunit: cute.Tensor, pipe_u, pipe_q, pipe_kv: SplitKV,
                            ua: "UnitArgs", work: cute.Pointer, total_q: Int32, KP: Int32, tid: Int32, warp: Int32):
        """The persistent walk's producer (``SegVariant.persistent``). Thread 0 takes the next unit
        from the pass's counter ``work`` (units in the order CTAs ask: no CTA waits behind a
        longer share) and hands its number to the warpgroup (named barrier); warp 0 passes the
        unit's (first entry, rows, keys) to the consumer through ``pipe_u`` (two ``sUnit`` slots;
        rows -1: no unit left) and loads its K by TMA once the one-stage K ring frees up (the
        previous unit's last ``QK^T`` done); the four warps gather the unit's sub-tiles' rows into
        the Q ring, which runs on across units; warp 0 loads V after its rows of the first
        sub-tile, since V frees up last (the previous unit's last ``PV``)."""
        tq = _flat(ua.tiles)
        end = tq[1]
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.QS)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        u_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 2)
        UNIT = BM * self.SUB
        going = Int32(1)
        while going != 0:
            # (each warp read the slot's unit number two units back, before the previous unit's
            # barrier: free)
            slot = (u_state.count % 2) * 4
            if tid == 0:
                sunit[slot + 3] = tq[0] + cute.arch.atomic_add(work.llvm_ptr, Int32(1))
            cute.arch.barrier(barrier_id=SCHED_BARRIER, number_of_threads=128)
            u = sunit[slot + 3]
            r0, nrows, h, ks, kbeg, kend = segment_unit(ua.tiles, ua.tile_seg, ua.seg_off, ua.tile_off,
                                                        ua.seg_start, ua.cu_k, ua.cu_chunks, u, Int32(UNIT),
                                                        Int32(0), ua.B, ua.total_k, ua.H, ua.chunk_size, True,
                                                        ua.Hk, ua.nbound, ua.nrw, ua.wstart)
            if u >= end:
                going = Int32(0)
            nsub = (nrows + BM - 1) // BM
            kv_views = kv_tma_views(atom_k, tma_k, atom_v, tma_v, sK, sV, h // (ua.H // ua.Hk), ks + kbeg,
                                    self.BN, self.D)
            if warp == 0:
                pipe_u.producer_acquire(u_state)
                sunit[slot] = r0
                sunit[slot + 1] = nrows
                if going == 0:
                    sunit[slot + 1] = Int32(-1)
                sunit[slot + 2] = kend - kbeg
                pipe_u.producer_commit(u_state)
                if going != 0:
                    self.load_ring_box(atom_k, pipe_kv.k, kv_views[0], kv_views[1], kv_state, Int32(0))
            u_state.advance()
            for t in cutlass.range(nsub, unroll=1):
                self.gather_rows(q, rows_list, sQ, pipe_q, q_state, r0, t * BM, nrows, warp * 16, Int32(16), h,
                                 ua.H, total_q, KP, tid % 32, 16)
                q_state.advance()
                if (warp == 0) & (t == 0):
                    self.load_ring_box(atom_v, pipe_kv.v, kv_views[2], kv_views[3], kv_state, Int32(0))
            if warp == 0:
                if (nsub == 0) & (going != 0):
                    self.load_ring_box(atom_v, pipe_kv.v, kv_views[2], kv_views[3], kv_state, Int32(0))
            kv_state.advance()

    @cute.jit
    def load_ring_box(self, atom: cute.CopyAtom, ring, s_part: cute.Tensor, g_part: cute.Tensor, state, n: Int32):
        """Box ``n`` of a TMA partition (:func:`kv_tma_views`) into stage ``state`` of a K or V
        ring of its own (:class:`SplitKV`), acquired here (one thread of warp 0; multicast with
        ``CL = 2``: this CTA's half of the box, into both CTAs' stage)."""
        ring.producer_acquire(state)
        cute.copy(atom, g_part[None, n], s_part[None, state.index], tma_bar_ptr=ring.producer_get_barrier(state),
                  **self.mcast_kw())

    def mcast_kw(self) -> dict:
        """``cute.copy``'s keyword for a TMA box multicast to the cluster's CTAs (none without)."""
        return {"mcast_mask": cutlass.Int16((1 << self.CL) - 1)} if self.CL > 1 else {}

    @cute.jit
    def load_kv_block(self, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom, kv_views, pipe_kv, kv_state, n: Int32):
        """n-block ``n`` of the chunk's K and V by TMA into ring stage ``kv_state`` (one thread of
        warp 0; the caller advances the state). Multicast (``CL = 2``): this CTA's half of the
        block, into both CTAs' stage; the stage's barrier expects the whole block's bytes. Split
        K/V: K into its ring, then V into its own."""
        tKsK, tKgK, tVsV, tVgV = kv_views
        if cutlass.const_expr(self.split_kv):
            self.load_ring_box(atom_k, pipe_kv.k, tKsK, tKgK, kv_state, n)
            self.load_ring_box(atom_v, pipe_kv.v, tVsV, tVgV, kv_state, n)
        else:
            kw = self.mcast_kw()
            pipe_kv.producer_acquire(kv_state)
            bar = pipe_kv.producer_get_barrier(kv_state)
            cute.copy(atom_k, tKgK[None, n], tKsK[None, kv_state.index], tma_bar_ptr=bar, **kw)
            cute.copy(atom_v, tVgV[None, n], tVsV[None, kv_state.index], tma_bar_ptr=bar, **kw)

    @cute.jit
    def gather_rows(self, q: cute.Pointer, rows_list: cute.Pointer, sQ: cute.Tensor, pipe_q, q_state, r0: Int32,
                    e0: Int32, nrows: Int32, rbeg: Int32, nr: Int32, h: Int32, H: Int32, total_q: Int32, KP: Int32,
                    lane: Int32, RW: cutlass.Constexpr):
        """One warp's share of a sub-tile's Q gather: rows ``[rbeg, rbeg + nr)`` (``nr <= RW``) of
        the 64-row sub-tile whose first entry is ``e0``, into ring stage ``q_state`` (acquired
        and committed here). Lane j < RW loads row rbeg + j's pair-list entry once (issued before
        the wait for a free stage) and the copies take it by shuffle: one dependent load per
        thread instead of one per piece. A copy instruction moves ``32 // (D / 8)`` whole rows
        (contiguous 256-byte rows at D = 128: whole DRAM lines), 16-byte pieces written at their
        swizzled offsets (128-byte swizzle applied by hand: row tiles are whole 1024-byte swizzle
        periods). Padding rows (past ``nrows``) repeat the last entry."""
        e = cutlass.min(e0 + rbeg + lane % RW, nrows - 1)
        # the entry (h * total_q + row) * KP + slot -> Q's (row, h)
        my_ridx = (_flat(rows_list)[r0 + e] // KP - h * total_q) * H + h
        self.copy_rows(q, sQ, pipe_q, q_state, my_ridx, rbeg, nr, lane, RW)

    @cute.jit
    def copy_rows(self, q: cute.Pointer, sQ: cute.Tensor, pipe_q, q_state, my_ridx: Int32, rbeg: Int32, nr: Int32,
                  lane: Int32, RW: cutlass.Constexpr):
        """Rows ``[rbeg, rbeg + nr)`` (``nr <= RW``) of a 64-row Q sub-tile into ring stage
        ``q_state`` (acquired and committed here), row ``rbeg + j`` from Q's (row, head) row
        ``my_ridx`` of lane ``j`` (:meth:`gather_rows`)."""
        D = self.D
        CV = D // 8
        RPI = 32 // CV  # rows per copy instruction of a warp
        sq_base = cute.recast_ptr(sQ.iterator, None, self.dtype)
        q_outer = sQ.layout  # (the swizzle lives in the iterator)
        atom_g2s = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), self.dtype,
                                       num_bits_per_copy=128)
        pipe_q.producer_acquire(q_state)
        for it in cutlass.range_constexpr((RW + RPI - 1) // RPI):
            rl = it * RPI + lane // CV
            cv = lane % CV
            ridx = cute.arch.shuffle_sync(my_ridx, rl)
            if cutlass.const_expr(RW % RPI == 0 and RW * 4 == BM):
                self._copy_row(atom_g2s, q, sq_base, q_outer, q_state.index, ridx, rbeg + rl, cv)
            else:
                if rl < nr:
                    self._copy_row(atom_g2s, q, sq_base, q_outer, q_state.index, ridx, rbeg + rl, cv)
        pipe_q.producer_commit(q_state)

    @cute.jit
    def _copy_row(self, atom_g2s: cute.CopyAtom, q: cute.Pointer, sq_base, q_outer, stage, ridx: Int32, r: Int32,
                  cv: Int32):
        """16-byte piece ``cv`` of Q row ``ridx`` (of the (row, head) view) into sub-tile row ``r``."""
        D = self.D
        src = cute.make_tensor(q + cute.assume(Int64(ridx) * Int64(D) + Int64(cv * 8), divby=8), cute.make_layout(8))
        so = swizzled_index(q_outer, (r, cv * 8, 0)) + stage * (BM * D)
        dst = cute.make_tensor(sq_base + cute.assume(so, divby=8), cute.make_layout(8))
        cute.copy(atom_g2s, src, dst)

    @cute.jit
    def consumer_frags(self, tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma, sQ: cute.Tensor,
                       sK: cute.Tensor, sV: cute.Tensor, ctid: Int32):
        """The wgmma operands and state (:class:`ConsumerFrags`) of thread ``ctid`` (0-127) of a
        consumer warpgroup."""
        D, BN, dt = self.D, self.BN, self.dtype
        thr_qk = tiled_mma_qk.get_slice(ctid)
        thr_pv = tiled_mma_pv.get_slice(ctid)
        tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ))
        tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK))
        sVt = cute.composition(sV, cute.make_ordered_layout((D, BN, self.KS), order=(1, 0, 2)))
        tOrVt = thr_pv.make_fragment_B(thr_pv.partition_B(sVt))
        acc_S = cute.make_rmem_tensor(thr_qk.partition_shape_C((BM, BN)), Float32)
        acc_O = cute.make_rmem_tensor(thr_pv.partition_shape_C((BM, D)), Float32)
        rP = cute.make_rmem_tensor(acc_S.layout.shape, dt)
        tOrP = acc_as_a_operand(rP)
        S_mn = acc_mn_view(acc_S)
        O_mn = acc_mn_view(acc_O)
        cS_mn = acc_mn_view(thr_qk.partition_C(cute.make_identity_tensor((BM, BN))))
        cO_mn = acc_mn_view(thr_pv.partition_C(cute.make_identity_tensor((BM, D))))
        NR = cute.size(O_mn, mode=[0])
        row_max = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
        row_sum = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
        return ConsumerFrags(tiled_mma_qk, tiled_mma_pv, tSrQ, tSrK, tOrVt, acc_S, acc_O, rP, tOrP, S_mn, O_mn,
                             cS_mn, cO_mn, row_max, row_sum)

    @cute.jit
    def consumer(self, part_o: cute.Pointer, part_lse: cute.Pointer, rows_list: cute.Pointer, sQ: cute.Tensor,
                 sK: cute.Tensor, sV: cute.Tensor, pipe_q, pipe_kv, tiled_mma_qk: cute.TiledMma,
                 tiled_mma_pv: cute.TiledMma, r0: Int32, nrows: Int32, nsub: Int32, nblk: Int32, nkeys: Int32,
                 pbase: Int32, scale_log2: Float32, ctid: Int32, st):
        wg = Int32(0)  # this thread's consumer warpgroup (two: MobaFwdSm90Pair)
        if cutlass.const_expr(self.NW > 1):
            wg = ctid // 128
            ctid = ctid % 128
        frags = self.consumer_frags(tiled_mma_qk, tiled_mma_pv, sQ, sK, sV, ctid)
        trl = _flat(rows_list)
        tpl = _flat(part_lse)

        kv_first = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.KS)
        if cutlass.const_expr(self.NW > 1 or self.CL > 1):
            self.consumer_streamed(frags, part_o, tpl, trl, sQ, sK, sV, pipe_q, pipe_kv, r0, nrows, nsub, nblk, nkeys,
                                   pbase, scale_log2, ctid, wg)
        elif nblk == 1:
            # the chunk fits one n-block: loaded once for the whole unit, never released
            if cutlass.const_expr(self.split_kv):
                pipe_kv.k.consumer_wait(kv_first)
                pipe_kv.v.consumer_wait(kv_first)
            else:
                pipe_kv.consumer_wait(kv_first)
            if nkeys < self.BN:
                # keys past the chunk (the next chunk or sequence, or TMA's zero fill) get
                # probability 0; zero their V rows so that a non-finite value there cannot
                # reach O as 0 * inf
                self.zero_v_tail(sV, Int32(0), nkeys, ctid, wg)
            self.one_block_subtiles(frags, part_o, tpl, trl, sQ, st, pipe_q, pipe_kv, kv_first, r0, nrows, nsub, nkeys,
                                    0, pbase, scale_log2, ctid)
        else:
            self.consumer_streamed(frags, part_o, tpl, trl, sQ, sK, sV, pipe_q, pipe_kv, r0, nrows, nsub, nblk, nkeys,
                                   pbase, scale_log2, ctid, wg)

    @cute.jit
    def one_block_subtiles(self, f: ConsumerFrags, part_o: cute.Pointer, tpl: cute.Tensor, trl: cute.Tensor,
                           sQ: cute.Tensor, st, pipe_q, pipe_kv, kv, r0: Int32, nrows: Int32, nsub: Int32,
                           nkeys: Int32, qi, pbase: Int32, scale_log2: Float32, ctid: Int32):
        """A unit's sub-tiles against its chunk of one n-block (K and V waited for): no running
        state, and the sub-tiles overlap. Sub-tile t's PV and sub-tile t + 1's QK^T are issued
        back to back; t's epilogue (global stores) runs while t + 1's QK^T is on the tensor
        cores. ``qi``: the first sub-tile's place in the Q ring (0 for one CTA per unit). The
        persistent walk gives K back (``kv``) once the last QK^T is done and V once the last PV
        is."""
        dt = self.dtype
        acc_S, acc_O, rP, tOrP, tOrVt = f.acc_S, f.acc_O, f.rP, f.tOrP, f.tOrVt
        tSrQ, tSrK, S_mn, cS_mn = f.tSrQ, f.tSrK, f.S_mn, f.cS_mn
        O_mn, cO_mn, row_max, row_sum = f.O_mn, f.cO_mn, f.row_max, f.row_sum
        self.qk(pipe_q, f.mma_qk, acc_S, tSrQ, tSrK, qi)
        warpgroup.wait_group(0)
        if cutlass.const_expr(not self.staged):
            pipe_q.consumer_release(ring_state(self.QS, qi))
        if cutlass.const_expr(self.persistent):
            if nsub == 1:
                pipe_kv.k.consumer_release(kv)
        self.softmax_one_block(S_mn, cS_mn, row_max, row_sum, nkeys, scale_log2)
        rP.store(acc_S.load().to(dt))
        for t in cutlass.range(nsub, unroll=1):
            warpgroup.fence()
            gemm_kblocks(f.mma_pv, acc_O, tOrP, tOrVt, None, 0)
            warpgroup.commit_group()
            if t + 1 < nsub:
                self.qk(pipe_q, f.mma_qk, acc_S, tSrQ, tSrK, qi + t + 1)
                warpgroup.wait_group(1)  # PV(t) done; QK^T(t + 1) may still run
            else:
                warpgroup.wait_group(0)
                if cutlass.const_expr(self.persistent):
                    pipe_kv.v.consumer_release(kv)
            if cutlass.const_expr(self.staged):
                # (staged: sub-tile t's Q stage holds its partials until they are out)
                self.epilogue_staged(O_mn, cO_mn, row_max, row_sum, part_o, tpl, trl, sQ, st, r0, t, qi + t, nrows,
                                     pbase, scale_log2, ctid)
                pipe_q.consumer_release(ring_state(self.QS, qi + t))
            else:
                self.epilogue(O_mn, cO_mn, row_max, row_sum, part_o, tpl, trl, r0, t, nrows, pbase, scale_log2,
                              ctid % 32)
            if t + 1 < nsub:
                warpgroup.wait_group(0)
                if cutlass.const_expr(not self.staged):
                    pipe_q.consumer_release(ring_state(self.QS, qi + t + 1))
                if cutlass.const_expr(self.persistent):
                    if t + 2 == nsub:
                        pipe_kv.k.consumer_release(kv)
                self.softmax_one_block(S_mn, cS_mn, row_max, row_sum, nkeys, scale_log2)
                rP.store(acc_S.load().to(dt))

    @cute.jit
    def consumer_persistent(self, part_o: cute.Pointer, part_lse: cute.Pointer, rows_list: cute.Pointer,
                            sQ: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor,
                            sunit: cute.Tensor, pipe_u, pipe_q, pipe_kv: SplitKV, tiled_mma_qk: cute.TiledMma,
                            tiled_mma_pv: cute.TiledMma, pbase: Int32, scale_log2: Float32, ctid: Int32, st):
        """The persistent walk's consumer: per unit the producer hands over (``pipe_u``, until one
        of -1 rows), the one-n-block loop of :meth:`consumer`, the Q ring's index running on
        across units (``qi``), K released once the unit's last ``QK^T`` is done and V once its
        last ``PV`` is."""
        f = self.consumer_frags(tiled_mma_qk, tiled_mma_pv, sQ, sK, sV, ctid)
        trl = _flat(rows_list)
        tpl = _flat(part_lse)
        qi = Int32(0)  # sub-tiles consumed: the Q ring's position
        ui = Int32(0)  # units walked: the K and V rings' position
        going = Int32(1)
        while going != 0:
            us = ring_state(2, ui)
            pipe_u.consumer_wait(us)
            slot = (ui % 2) * 4
            r0 = sunit[slot]
            nrows = sunit[slot + 1]
            nkeys = sunit[slot + 2]
            pipe_u.consumer_release(us)
            nsub = (nrows + BM - 1) // BM
            kv = ring_state(1, ui)
            if nrows < 0:
                going = Int32(0)  # no unit left
            else:
                pipe_kv.k.consumer_wait(kv)
                pipe_kv.v.consumer_wait(kv)
                if nsub > 0:
                    if nkeys < self.BN:
                        # (as in consumer: keys past the chunk get probability 0, their V rows zero)
                        self.zero_v_tail(sV, Int32(0), nkeys, ctid, Int32(0))
                    self.one_block_subtiles(f, part_o, tpl, trl, sQ, st, pipe_q, pipe_kv, kv, r0, nrows, nsub, nkeys,
                                            qi, pbase, scale_log2, ctid)
                    qi += nsub
                else:
                    pipe_kv.k.consumer_release(kv)
                    pipe_kv.v.consumer_release(kv)
            ui += 1

    @cute.jit
    def consumer_streamed(self, f: ConsumerFrags, part_o: cute.Pointer, tpl: cute.Tensor, trl: cute.Tensor,
                          sQ: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor, pipe_q, pipe_kv, r0: Int32, nrows: Int32,
                          nsub: Int32, nblk: Int32, nkeys: Int32, pbase: Int32, scale_log2: Float32, ctid: Int32,
                          wg: Int32):
        """Chunks longer than one n-block: K/V n-blocks streamed per step, online softmax. A step
        is one sub-tile per consumer warpgroup (``NW``) of each CTA of the cluster (``CL``):
        warpgroup ``wg`` (``ctid`` its thread) of rank ``r`` takes sub-tiles ``r * NW + wg``, plus
        multiples of ``NW * CL``, and every warpgroup reads each n-block of a step, so two
        warpgroups (MobaFwdSm90Pair) or two CTAs sharing multicast n-blocks compute 128 rows per
        block loaded. A warpgroup without a sub-tile in the last step still waits for and
        releases its n-blocks."""
        BN, dt, NW = self.BN, self.dtype, self.NW
        NS = NW * self.CL  # sub-tiles per step (the cluster's ranks and the CTA's warpgroups)
        NR = cute.size(f.O_mn, mode=[0])
        lane = ctid % 32
        rank = Int32(0)
        if cutlass.const_expr(self.CL > 1):
            rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
        qr = None
        if cutlass.const_expr(self.q_regs):
            qr = self.q_reg_frags(sQ, sK, ctid)
        corr = cute.make_rmem_tensor(cute.make_layout(NR), Float32)  # (rescale_skip's factors; else unused)
        if cutlass.const_expr(self.pingpong):
            if wg == 1:
                cute.arch.barrier_arrive(barrier_id=PP_BARRIER, number_of_threads=256)  # warpgroup 0 first
        for j in cutlass.range((nsub + NS - 1) // NS, unroll=1):
            t = j * NS + rank * NW + wg
            # the producer fills the Q ring in the order of this CTA's sub-tiles: the i-th is stage
            # i % QS, phase (i // QS) % 2
            q_state = ring_state(self.QS, j * NW + wg)
            has = (t < nsub) if cutlass.const_expr(NS > 1) else True  # (one warpgroup: always)
            if has:
                pipe_q.consumer_wait(q_state)
                # the gathered rows were written by cp.async (generic proxy); wgmma reads them
                # through the async proxy
                cute.arch.fence_view_async_shared()
                if cutlass.const_expr(self.q_regs):
                    self.load_q_regs(qr, q_state.index)
                    pipe_q.consumer_release(q_state)  # (ldmatrix loads ordered before the arrive)
                f.acc_O.fill(0.0)
                for r in cutlass.range_constexpr(NR):
                    f.row_max[r] = -Float32.inf
                    f.row_sum[r] = Float32(0.0)
            if cutlass.const_expr(self.overlap):
                self.stream_overlapped(f, pipe_q, pipe_kv, sV, q_state, has, j, nblk, nkeys, scale_log2, ctid, wg)
            else:
                for n in cutlass.range(nblk, unroll=1):
                    # streamed n-blocks, in the producer's order: block j * nblk + n
                    b = j * nblk + n
                    kv_idx = b % self.KS
                    nvalid = nkeys - n * BN
                    self.wait_kv_block(pipe_kv, sV, b, nvalid, ctid, wg)
                    if has:
                        # ---- S = Q K^T
                        warpgroup.fence()
                        if cutlass.const_expr(self.q_regs):
                            gemm_kblocks(qr.mma, f.acc_S, qr.tSrQ, qr.tSrK, None, kv_idx)
                        else:
                            gemm_kblocks(f.mma_qk, f.acc_S, f.tSrQ, f.tSrK, q_state.index, kv_idx)
                        warpgroup.commit_group()
                        warpgroup.wait_group(0)
                        if cutlass.const_expr(not self.q_regs):
                            if n == nblk - 1:
                                pipe_q.consumer_release(q_state)  # Q of this sub-tile is no longer read
                        # ---- mask the keys past the chunk end, online softmax
                        self.mask_keys_from(f.S_mn, f.cS_mn, nvalid)
                        if cutlass.const_expr(self.rescale_skip):
                            _online_softmax(f.S_mn, f.O_mn, f.row_max, f.row_sum, scale_log2, corr)
                            self.rescale_o(f.O_mn, corr)
                        else:
                            _online_softmax(f.S_mn, f.O_mn, f.row_max, f.row_sum, scale_log2)
                        f.rP.store(f.acc_S.load().to(dt))
                        # ---- O += P V
                        warpgroup.fence()
                        gemm_kblocks(f.mma_pv, f.acc_O, f.tOrP, f.tOrVt, None, kv_idx, zero_init=False)
                        warpgroup.commit_group()
                        warpgroup.wait_group(0)
                    pipe_kv.consumer_release(ring_state(self.KS, b))
            if has:
                self.epilogue(f.O_mn, f.cO_mn, f.row_max, f.row_sum, part_o, tpl, trl, r0, t, nrows, pbase,
                              scale_log2, lane)
        if cutlass.const_expr(self.pingpong):
            if wg == 0:
                # (warpgroup 1's last pass: every arrive on a barrier is matched before the exit)
                cute.arch.barrier(barrier_id=PP_BARRIER, number_of_threads=256)

    @cute.jit
    def stream_overlapped(self, f: ConsumerFrags, pipe_q, pipe_kv: SplitKV, sV: cute.Tensor, q_state, has, j: Int32,
                          nblk: Int32, nkeys: Int32, scale_log2: Float32, ctid: Int32, wg: Int32, ext=None):
        """Step ``j``'s n-blocks with FlashAttention-3's intra-warpgroup overlap (two or more K/V
        stages): n's ``QK^T`` and n - 1's ``PV`` are issued back to back, n's softmax runs while
        that ``PV`` is on the tensor cores, then ``O`` is rescaled and ``P`` replaced. The same
        operations on ``O`` in the same order as one block after the other (bitwise equal). Block
        0 is peeled and the Q stage released after the last ``PV``, so that no branch sits between
        a wgmma issue and its wait (ptxas serializes the wgmmas otherwise: warning C7520). K and V
        are in rings of their own (``split_kv``): block n's K goes back once its ``QK^T`` is done,
        n - 1's V once its ``PV`` is; a V tail is zeroed when V has landed, before its ``PV``. A
        warpgroup without a sub-tile (``has`` false) waits for and releases the same stages.
        ``ext``: a subclass's per-call data for its :meth:`mask_block` and :meth:`block_done`
        hooks (the causal diagonal's row ranges and partial prefetch)."""
        BN, dt, KS = self.BN, self.dtype, self.KS
        NR = cute.size(f.O_mn, mode=[0])
        corr = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
        b0 = j * nblk
        # ---- n-block 0: S = Q K^T, softmax (O is zero)
        pipe_kv.k.consumer_wait(ring_state(KS, b0))
        if has:
            self.pp_turn(wg)
            warpgroup.fence()
            gemm_kblocks(f.mma_qk, f.acc_S, f.tSrQ, f.tSrK, q_state.index, b0 % KS)
            warpgroup.commit_group()
            self.pp_pass(wg)
            warpgroup.wait_group(0)
            pipe_kv.k.consumer_release(ring_state(KS, b0))
            self.mask_block(f, ext, nkeys, Int32(0))
            _online_softmax(f.S_mn, f.O_mn, f.row_max, f.row_sum, scale_log2)
            f.rP.store(f.acc_S.load().to(dt))
        else:
            self.pp_idle(wg)
            pipe_kv.k.consumer_release(ring_state(KS, b0))
        self.block_done(ext, Int32(0))
        for n in cutlass.range(1, nblk, unroll=1):
            b = b0 + n
            pipe_kv.k.consumer_wait(ring_state(KS, b))
            pipe_kv.v.consumer_wait(ring_state(KS, b - 1))  # (a full block: only the last has a V tail)
            if has:
                # ---- S = Q K^T of block n, then O += P V of block n - 1 behind it
                self.pp_turn(wg)
                warpgroup.fence()
                gemm_kblocks(f.mma_qk, f.acc_S, f.tSrQ, f.tSrK, q_state.index, b % KS)
                warpgroup.commit_group()
                gemm_kblocks(f.mma_pv, f.acc_O, f.tOrP, f.tOrVt, None, (b - 1) % KS, zero_init=False)
                warpgroup.commit_group()
                self.pp_pass(wg)
                warpgroup.wait_group(1)  # QK^T(n) done; PV(n - 1) may still run
                pipe_kv.k.consumer_release(ring_state(KS, b))
                # ---- softmax of block n on the CUDA cores meanwhile
                self.mask_block(f, ext, nkeys, n)
                _online_softmax(f.S_mn, f.O_mn, f.row_max, f.row_sum, scale_log2, corr)
                warpgroup.wait_group(0)  # PV(n - 1) done: O and P are free
                self.rescale_o(f.O_mn, corr)
                f.rP.store(f.acc_S.load().to(dt))
            else:
                self.pp_idle(wg)
                pipe_kv.k.consumer_release(ring_state(KS, b))
            pipe_kv.v.consumer_release(ring_state(KS, b - 1))
            self.block_done(ext, n)
        # ---- the last block's O += P V
        blast = b0 + nblk - 1
        nlast = nkeys - (nblk - 1) * BN  # the last block's keys in the chunk
        pipe_kv.v.consumer_wait(ring_state(KS, blast))
        if nlast < BN:
            self.zero_v_tail(sV, blast % KS, nlast, ctid, wg)
        if has:
            self.pp_turn(wg)
            warpgroup.fence()
            gemm_kblocks(f.mma_pv, f.acc_O, f.tOrP, f.tOrVt, None, blast % KS, zero_init=False)
            warpgroup.commit_group()
            self.pp_pass(wg)
            warpgroup.wait_group(0)
            pipe_q.consumer_release(q_state)  # (Q was last read by the last QK^T)
        else:
            self.pp_idle(wg)
        pipe_kv.v.consumer_release(ring_state(KS, blast))

    @cute.jit
    def mask_block(self, f: ConsumerFrags, ext, nkeys: Int32, n: Int32):
        """:meth:`stream_overlapped`'s mask of n-block ``n``: the keys past the chunk's ``nkeys``."""
        self.mask_keys_from(f.S_mn, f.cS_mn, nkeys - n * self.BN)

    def block_done(self, ext, n: Int32):
        """:meth:`stream_overlapped`'s hook after n-block ``n``'s softmax (nothing here)."""

    @cute.jit
    def rescale_o(self, O_mn: cute.Tensor, corr: cute.Tensor):
        """O's rows times their online-softmax factors ``corr``. With ``rescale_skip`` a warp
        whose factors are all exactly 1 (no row max moved, the common case once the rows' maxima
        settle) skips the multiplies: one vote instead of ``D / 4`` multiplies per row, the same
        bits."""
        NR = cute.size(O_mn, mode=[0])
        if cutlass.const_expr(self.rescale_skip):
            moved = corr[0] != Float32(1.0)
            for r in cutlass.range_constexpr(1, NR):
                moved = moved | (corr[r] != Float32(1.0))
            if cute.arch.vote_any_sync(moved):
                for r in cutlass.range_constexpr(NR):
                    O_mn[r, None] = O_mn[r, None].load() * corr[r]
        else:
            for r in cutlass.range_constexpr(NR):
                O_mn[r, None] = O_mn[r, None].load() * corr[r]

    def q_reg_frags(self, sQ: cute.Tensor, sK: cute.Tensor, ctid: Int32) -> "QRegFrags":
        """``q_regs``: the RS QK^T tiled MMA, the register Q fragment and its K operand, and the
        ldmatrix copy that fills the fragment from a Q ring stage (thread ``ctid``)."""
        dt = self.dtype
        mma = sm90_utils.make_trivial_tiled_mma(
            dt, dt, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K, Float32, (1, 1, 1), (BM, self.BN),
            a_source=warpgroup.OperandSource.RMEM)
        thr = mma.get_slice(ctid)
        tSrQ = thr.make_fragment_A(thr.partition_shape_A((BM, self.D)))
        tSrK = thr.make_fragment_B(thr.partition_B(sK))
        s2r = cute.make_tiled_copy_A(
            cute.make_copy_atom(nvwarp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dt), mma)
        thr_s2r = s2r.get_slice(ctid)
        return QRegFrags(mma, tSrQ, tSrK, s2r, thr_s2r.partition_S(sQ), thr_s2r.retile(tSrQ))

    @cute.jit
    def load_q_regs(self, qr: "QRegFrags", stage: Int32):
        """Q of ring stage ``stage`` into the register fragment (``q_regs``)."""
        for kb in cutlass.range_constexpr(cute.size(qr.tSrQ.shape[2])):
            cute.copy(qr.s2r, qr.tQsQ[None, None, kb, stage], qr.tQrQ[None, None, kb])

    @cute.jit
    def wait_kv_block(self, pipe_kv, sV: cute.Tensor, b: Int32, nvalid: Int32, ctid: Int32, wg: Int32):
        """Wait for streamed n-block ``b``; zero its V rows from ``nvalid`` on (past the chunk)."""
        pipe_kv.consumer_wait(ring_state(self.KS, b))
        if nvalid < self.BN:
            self.zero_v_tail(sV, b % self.KS, nvalid, ctid, wg)

    @cute.jit
    def qk(self, pipe_q, tiled_mma_qk: cute.TiledMma, acc_S: cute.Tensor, tSrQ: cute.Tensor, tSrK: cute.Tensor,
           t: Int32):
        """Wait for sub-tile ``t``'s gathered Q and issue ``S = Q K^T`` (n-block stage 0) as one
        committed wgmma group; the caller waits for it and releases the Q stage."""
        pipe_q.consumer_wait(ring_state(self.QS, t))
        cute.arch.fence_view_async_shared()  # cp.async wrote Q (generic proxy); wgmma reads it (async)
        warpgroup.fence()
        gemm_kblocks(tiled_mma_qk, acc_S, tSrQ, tSrK, t % self.QS, 0)
        warpgroup.commit_group()

    @cute.jit
    def mask_keys_from(self, S_mn: cute.Tensor, cS_mn: cute.Tensor, lim: Int32):
        """S = -inf for the n-block's keys from ``lim`` on (past the chunk's end)."""
        if lim < self.BN:
            for c in cutlass.range_constexpr(cute.size(S_mn, mode=[1])):
                if cS_mn[0, c][1] >= lim:
                    for r in cutlass.range_constexpr(cute.size(S_mn, mode=[0])):
                        S_mn[r, c] = -Float32.inf

    @cute.jit
    def softmax_one_block(self, S_mn: cute.Tensor, cS_mn: cute.Tensor, row_max: cute.Tensor, row_sum: cute.Tensor,
                          nkeys: Int32, scale_log2: Float32):
        """Softmax numerator of a sub-tile's only n-block in place (keys past ``nkeys`` masked),
        its row max and this thread's part of the row sum."""
        NR = cute.size(S_mn, mode=[0])
        self.mask_keys_from(S_mn, cS_mn, nkeys)
        for r in cutlass.range_constexpr(NR):
            srow = S_mn[r, None].load()
            m = _quad_max(srow.reduce(cute.ReductionOp.MAX, -Float32.inf, 0))
            m_use = m
            if m == -Float32.inf:
                m_use = Float32(0.0)
            e = cute.math.exp2(srow * scale_log2 - m_use * scale_log2, fastmath=True)
            row_sum[r] = e.reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
            row_max[r] = m
            S_mn[r, None] = e

    @cute.jit
    def epilogue(self, O_mn: cute.Tensor, cO_mn: cute.Tensor, row_max: cute.Tensor, row_sum: cute.Tensor,
                 part_o: cute.Pointer, tpl: cute.Tensor, trl: cute.Tensor, r0: Int32, t: Int32, nrows: Int32,
                 pbase: Int32, scale_log2: Float32, lane: Int32):
        """Sub-tile ``t``'s normalized partial outputs (input dtype) and log2-domain LSEs, at
        the pair index less ``pbase`` (the window's first pair)."""
        D, dt = self.D, self.dtype
        NR = cute.size(O_mn, mode=[0])
        NCO = cute.size(O_mn, mode=[1])
        for r in cutlass.range_constexpr(NR):
            l = _quad_sum(row_sum[r])
            e_idx = t * BM + cO_mn[r, 0][0]
            if e_idx < nrows:
                p = trl[r0 + e_idx] - pbase
                inv = inv_row_sum(l)
                obase = part_o + Int64(p) * Int64(D)
                for c in cutlass.range_constexpr(NCO // 2):
                    col = cO_mn[r, 2 * c][1]  # columns 2c, 2c + 1 are adjacent
                    pair = cute.make_rmem_tensor(cute.make_layout(2), Float32)
                    pair[0] = O_mn[r, 2 * c] * inv
                    pair[1] = O_mn[r, 2 * c + 1] * inv
                    po = cute.make_rmem_tensor(cute.make_layout(2), dt)
                    po.store(pair.load().to(dt))
                    cute.autovec_copy(po, cute.make_tensor((obase + col).align(4), cute.make_layout(2)))
                if lane % 4 == 0:
                    tpl[p] = row_lse_log2(row_max[r], l, scale_log2)

    @cute.jit
    def epilogue_staged(self, O_mn: cute.Tensor, cO_mn: cute.Tensor, row_max: cute.Tensor, row_sum: cute.Tensor,
                        part_o: cute.Pointer, tpl: cute.Tensor, trl: cute.Tensor, sQ: cute.Tensor, st, r0: Int32,
                        t: Int32, gi: Int32, nrows: Int32, pbase: Int32, scale_log2: Float32, ctid: Int32):
        """:meth:`epilogue` through shared memory: the normalized partials into sub-tile ``t``'s
        own Q ring stage (its QK^T has completed; the caller releases the stage afterwards), each
        row's place (-1: padding) into ``sLoc``, a barrier among the 128 consumer threads, then
        whole 16-byte pieces to the partial buffer (a warp stores 2 rows of 256 bytes at D = 128).
        The LSEs are stored directly, one per row. ``gi``: the sub-tile's place in the Q ring
        (``t`` but in the persistent walk, whose ring runs on across units)."""
        D, dt = self.D, self.dtype
        CV = D // 8
        NR = cute.size(O_mn, mode=[0])
        NCO = cute.size(O_mn, mode=[1])
        lane = ctid % 32
        stage = gi % self.QS
        sq_base = cute.recast_ptr(sQ.iterator, None, dt)
        q_outer = sQ.layout  # (the swizzle lives in the iterator: applied by hand, as the gather does)
        sloc = st.sLoc.get_tensor(cute.make_layout(2 * BM))
        lb = (gi % 2) * BM  # (two location buffers: sub-tile gi + 2 writes after gi + 1's barrier)
        for r in cutlass.range_constexpr(NR):
            l = _quad_sum(row_sum[r])
            m = cO_mn[r, 0][0]
            e_idx = t * BM + m
            inv = inv_row_sum(l)
            for c in cutlass.range_constexpr(NCO // 2):
                col = cO_mn[r, 2 * c][1]  # columns 2c, 2c + 1 are adjacent (one 16-byte unit)
                pair = cute.make_rmem_tensor(cute.make_layout(2), Float32)
                pair[0] = O_mn[r, 2 * c] * inv
                pair[1] = O_mn[r, 2 * c + 1] * inv
                po = cute.make_rmem_tensor(cute.make_layout(2), dt)
                po.store(pair.load().to(dt))
                so = swizzled_index(q_outer, (m, col, 0)) + stage * (BM * D)
                cute.autovec_copy(po, cute.make_tensor((sq_base + so).align(4), cute.make_layout(2)))
            if lane % 4 == 0:
                p = Int32(-1)
                if e_idx < nrows:
                    p = trl[r0 + e_idx] - pbase
                    tpl[p] = row_lse_log2(row_max[r], l, scale_log2)
                sloc[lb + m] = p
        cute.arch.barrier(barrier_id=2, number_of_threads=128)
        for i in cutlass.range_constexpr(BM * CV // 128):
            idx = i * 128 + ctid
            n = idx // CV
            cv = idx - n * CV
            p = sloc[lb + n]
            if p >= 0:
                so = swizzled_index(q_outer, (n, cv * 8, 0)) + stage * (BM * D)
                v = cute.make_tensor((sq_base + so).align(16), cute.make_layout(8)).load()
                dst = part_o + (Int64(p) * Int64(D) + Int64(cv * 8))
                cute.make_tensor(dst.align(16), cute.make_layout(8)).store(v)

    @cute.jit
    def zero_v_tail(self, sV: cute.Tensor, stage: Int32, nvalid: Int32, ctid: Int32, wg: Int32):
        """Zero V rows ``[nvalid, BN)`` of a stage (consumer warpgroup 0, whose ``ctid`` is the
        thread; generic-proxy writes fenced for the wgmma that reads them), then named barrier 1
        among the consumer warpgroups, which all read the stage."""
        if wg == 0:
            zero_rows_from(sV, stage, nvalid, ctid, 128, self.BN, self.D, self.dtype)
        cute.arch.barrier(barrier_id=1, number_of_threads=128 * self.NW)


PAIR_PRODUCER_REGS = 40
# 168 x 384 registers at launch (one CTA per SM): 40 x 128 + 232 x 256 = 64,512
PAIR_CONSUMER_REGS = 232
PAIR_GATHER_ROWS = 22  # rows of a sub-tile per gathering warp (warps 1-3: 22 + 22 + 20)


class MobaFwdSm90Pair(MobaFwdSm90):
    """The segment kernel with two consumer warpgroups that share every streamed K/V n-block
    (one 384-thread CTA per SM, FlashAttention-3's 128-row tile as two 64-row sub-tiles).

    With ``C > BN`` each sub-tile streams the whole chunk's K/V from L2: at 64 rows per n-block
    a wgmma does 64 FLOP per byte of K/V loaded, and moba-large (C = 4096) then needs ~6.8 TB/s
    of L2 -> SM traffic at its measured rate (docs/design.md, section 8). Here warpgroup w takes
    sub-tiles w, w + 2, ... and both read each n-block of a step, which halves that traffic.
    The producer warpgroup's warp 0 only streams K/V (one TMA n-block after the other, a step's
    blocks once for both warpgroups), so no Q gather waits behind a full K/V ring; warps 1-3
    gather the Q sub-tiles (four ring stages: two per warpgroup). Chunks of one n-block are
    streamed too (a step reloads them): this kernel is for long chunks, chosen per shape by the
    tuner (tile ``(bn, sub, kv_stages, 2)``). Epilogue: the fragment stores. The warpgroups take
    turns issuing their wgmmas (FA3's ping-pong, named barriers ``PP_BARRIER`` + 0/1), so one's
    softmax runs under the other's GEMMs. With K and V in rings of their own (``split_kv``) it is
    the built-in tile from 512-key chunks: 1.06-1.14x the one-consumer tiles' forward on the H100
    (configs/attention_sm90.FWD_LONG_CHUNK_TILES)."""

    def __init__(self, dtype, head_dim: int, bn: int = 128, sub: int = 8, kv_stages: int = 2,
                 variant: SegVariant = SegVariant()):
        super().__init__(dtype, head_dim, bn, sub, kv_stages, self.takes(variant))
        self.pingpong = True
        self.NW = 2
        self.QS = 2 * self.NW
        self.THREADS = 128 * (1 + self.NW)
        self.CTAS = 1
        self.PRODUCER_REGS, self.CONSUMER_REGS = PAIR_PRODUCER_REGS, PAIR_CONSUMER_REGS
        self.Q_PRODUCERS = 96

    @staticmethod
    def takes(variant: SegVariant) -> SegVariant:
        """What this kernel takes of ``variant``: the rescale skip; it always overlaps, stores
        its partials from the fragments and runs one CTA per unit."""
        return SegVariant(staged=False, overlap=True, rescale_skip=variant.rescale_skip)

    @staticmethod
    def compile_key(dtype_name: str, head_dim: int, bn: int, sub: int, kv_stages: int,
                    variant: SegVariant = SegVariant()):
        key = ("moba_fwd_sm90", dtype_name, int(head_dim), int(bn), int(sub), int(kv_stages), "pair", "pingpong")
        return key + ("rskip",) * MobaFwdSm90Pair.takes(variant).rescale_skip

    @cute.jit
    def producer(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom,
                 q: cute.Pointer, rows_list: cute.Pointer, sQ: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor,
                 pipe_q, pipe_kv, r0: Int32, nrows: Int32, nsub: Int32, nblk: Int32, h: Int32, H: Int32, Hk: Int32,
                 total_q: Int32, key0: Int32, KP: Int32, tid: Int32, warp: Int32):
        if warp == 0:
            kv_views = kv_tma_views(atom_k, tma_k, atom_v, tma_v, sK, sV, h // (H // Hk), key0, self.BN, self.D)
            kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.KS)
            for j in cutlass.range((nsub + self.NW - 1) // self.NW, unroll=1):
                for n in cutlass.range(nblk, unroll=1):
                    self.load_kv_block(atom_k, atom_v, kv_views, pipe_kv, kv_state, n)
                    kv_state.advance()
        else:
            q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.QS)
            rbeg = (warp - 1) * PAIR_GATHER_ROWS
            nr = cutlass.min(PAIR_GATHER_ROWS, BM - rbeg)
            for t in cutlass.range(nsub, unroll=1):
                self.gather_rows(q, rows_list, sQ, pipe_q, q_state, r0, t * BM, nrows, rbeg, nr, h, H, total_q, KP,
                                 tid % 32, PAIR_GATHER_ROWS)
                q_state.advance()
