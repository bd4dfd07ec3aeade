"""Host side of the CuTe MoBA attention forward and backward: the sm80 (mma.sync) slot-pass
forward and backward everywhere, and on Hopper the sm90 segment forward (:func:`_forward_sm90`,
docs/design.md section 8) for the head dims it has tiles for.

``attention_cute(q, k, v, routing, softmax_scale, deterministic) -> (out, lse)`` runs, on the
caller's stream and without host synchronization (every size comes from shapes and host-known
bounds), only CuTe kernels. sm80 schedule:

1. the per-slot index (:mod:`moba_cute.kernels.slot_index`, 4 launches): zero the counters
   (+ the diagonal pass's query-tile offsets), count (``nused`` per (row, head), per-slot
   segment counts), scan (segment and tile offsets, the tile -> segment table, each pass's
   tile range), scatter (the per-slot row lists);
2. causal: the dense diagonal pass (own chunks, query-major tiles, exact causal mask);
3. one gather pass per remaining routing slot, in slot order (``topk - 1`` causal, ``topk``
   non-causal launches), each read-modify-writing the fp32 running state of its rows; a row's
   last used slot writes ``out`` and ``lse``.

sm90 schedule: one index for all gather slots (4 launches: prep, count, the pair lists built
from the routing's key-major index by ``PairListKernel``, scan), then per window of KV heads
(:func:`fwd_window_kv_heads`: one window unless the partials would outgrow their bound,
:func:`fwd_partials_bound`) the segment kernel (the window's gather pairs' normalized partials)
and the diagonal kernel merging each row's partials with its own chunk (causal) or the merge
kernel (non-causal). When one KV head's partials exceed the bound (inference prefill at ~128K+),
the windows are ranges of one query head's rows (:func:`fwd_row_window`; the index adds
``WindowCountKernel``).

``attention_backward_cute(q, k, v, out, lse, dout, dlse, routing, softmax_scale,
deterministic) -> (dq, dk, dv)``: ``delta = rowsum(dO * O) - dlse`` and a zeroed fp32
``dQ_acc`` (one row-wise kernel), the key-major dK/dV kernel, the per-slot index rebuilt (4
launches), the dQ diagonal + gather passes, then ``dq = dQ_acc`` converted (one kernel).
Always bitwise deterministic.

Per call the host work is a plan lookup, one workspace allocation and the launches:
everything that depends only on the call's shapes (bounds, grids, workspace layout, the
compiled kernels) is a :class:`FwdPlan` / :class:`BwdPlan`, cached per shape key, and every
kernel is called through :class:`~moba_cute.kernels.common.FastLauncher` with raw
addresses. Extra memory: docs/design.md (sections 3 and 5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import warnings

import torch

from ..configs import attention_sm80 as cfg
from ..configs import attention_sm90 as cfg90
from ..configs import tuned
from . import common

__all__ = ["attention_cute", "attention_backward_cute", "attention_unsupported_reason", "kernel_specs",
           "bwd_kernel_specs", "HAS_BACKWARD", "FWD_PLANS", "BWD_PLANS", "tile_override"]

HAS_BACKWARD = True
KERNEL_FAMILIES = ("sm80", "sm90")  # the forward's
BWD_KERNEL_FAMILIES = ("sm80", "sm90")  # the backward's (sm90: head dim 64/128)

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
INT32_MAX = 2**31 - 1
LOG2_E = 1.4426950408889634


def attention_unsupported_reason(dtype, head_dim, chunk_size, topk, arch):
    """None if the CuTe forward supports the configuration, else a short reason."""
    if dtype not in _DTYPES:
        return f"attention kernels support float16/bfloat16, not {dtype}"
    if head_dim not in cfg.FWD_TILES:
        return f"attention kernels support head dims {cfg.SUPPORTED_HEAD_DIMS}, not {head_dim}"
    if not (1 <= int(topk) <= 64):
        return f"attention kernels support 1 <= topk <= 64, not {topk}"
    if int(chunk_size) < 1 or int(chunk_size) % 16 != 0:
        return f"attention kernels need chunk_size a positive multiple of 16, not {chunk_size}"
    m = re.match(r"sm_?(\d+)", str(arch))
    if m is None or int(m.group(1)) < 80:
        return f"attention kernels need sm80 or newer, not {arch}"
    bm, bn, _, st = tiles(head_dim)
    if cfg.fwd_smem_bytes(head_dim, bm, bn, st) > cfg.SMEM_LIMIT:
        return f"forward tile for head_dim={head_dim} needs too much shared memory"
    for tab in (cfg.BWD_DKV_TILES, cfg.BWD_DQ_TILES):
        bbm, bbn, _ = tab[head_dim]
        if cfg.bwd_smem_bytes(head_dim, bbm, bbn) > cfg.SMEM_LIMIT:
            return f"backward tile for head_dim={head_dim} needs too much shared memory"
    return None


def tiles(head_dim, shape_class=None, device=None):
    """(bm, bn, threads, stages) of the sm80 forward for a head dim. For a launch plan
    (``shape_class`` given, ``device`` its CUDA device index): the tuner's override, else the
    tuned tables' tile (configs/tuned.py); then, and without a shape class, configs/attention_sm80.py.
    ``MOBA_CUTE_FWD_STAGES`` overrides the stages of all but the tuner's override."""
    t = None
    if shape_class is not None:
        t = tuned.forced("sm80_fwd", head_dim)
        if t is not None:
            return t
        t = tuned.lookup("sm80_fwd", head_dim, shape_class, device)
    bm, bn, nt, st = t if t is not None else cfg.FWD_TILES[head_dim]
    env = os.environ.get("MOBA_CUTE_FWD_STAGES")
    if env:
        st = int(env)
    return bm, bn, nt, st


def _i32(x, what):
    if x > INT32_MAX:
        raise ValueError(f"moba_cute attention: {what} = {x} exceeds 2^31-1 (not supported by the sm80 kernels)")
    return int(x)


# --- compile specs: (compile key, factory, fake arguments) by role ---------------------------
# (the launch plans below and tests/test_attention_compile.py both use these)

def _cdt(name):
    import cutlass

    return {"float16": cutlass.Float16, "bfloat16": cutlass.BFloat16}[name]


def _fake(ptrs, ints, floats=0):
    """Fake arguments: ``ptrs`` = (dtype, align) pairs, then ``ints`` Int32 and ``floats``
    Float32 scalars, then the stream (every kernel's argument order)."""
    import cutlass

    return (tuple(common.fake_gptr(dt, al) for dt, al in ptrs) + tuple(cutlass.Int32(1) for _ in range(ints))
            + tuple(cutlass.Float32(1.0) for _ in range(floats)) + (common.fake_stream(),))


def _i32p(n):
    import cutlass

    return [(cutlass.Int32, 4)] * n


def _cdt_f32():
    import cutlass

    return cutlass.Float32


def fake_args_fwd(dt):
    F = _cdt_f32()
    return _fake([(dt, 16)] * 4 + [(F, 4), (F, 16), (F, 4), (F, 4)] + _i32p(9), 15, 1)


def fake_args_index(dt):
    return _fake(_i32p(6) + [(dt, 16), (_cdt_f32(), 4)], 6)


def fake_args_dkv(dt):
    F = _cdt_f32()
    return _fake([(dt, 16)] * 4 + [(F, 4), (F, 4), (dt, 16), (dt, 16)] + _i32p(5), 8, 2)


def fake_args_dq(dt):
    F = _cdt_f32()
    return _fake([(dt, 16)] * 4 + [(F, 4), (F, 4), (F, 16)] + _i32p(8), 9, 2)


def slot_index_specs(dtype_name, head_dim, causal, bm):
    """The four kernels of the per-slot index (forward and dQ backward)."""
    from .slot_index import SlotIndexKernel, SlotPrepKernel, SlotScanKernel

    dt = _cdt(dtype_name)
    causal = bool(causal)
    return {
        "slot_prep": (("slotprep", bm, causal), lambda: SlotPrepKernel(bm, causal), _fake(_i32p(3), 4)),
        "slot_count": (("slotidx", False, causal, dtype_name, head_dim),
                       lambda: SlotIndexKernel(False, causal, dt, head_dim), fake_args_index(dt)),
        "slot_scan": (("slotscan", bm), lambda: SlotScanKernel(bm), _fake(_i32p(5), 3)),
        "slot_scatter": (("slotidx", True, causal, dtype_name, head_dim),
                         lambda: SlotIndexKernel(True, causal, dt, head_dim), fake_args_index(dt)),
    }


def kernel_specs(dtype_name, head_dim, causal, stages=None, tile=None):
    """Role -> (key, factory, fake args) of every kernel a forward call with this config runs
    (``tile``: (bm, bn, threads, stages), default :func:`tiles`; ``stages`` replaces its stages)."""
    from .moba_fwd_sm80 import MobaFwdSm80

    dt = _cdt(dtype_name)
    bm, bn, nt, st = tile if tile is not None else tiles(head_dim)
    if stages is not None:
        st = stages
    roles = {"diag": (True, True), "pass": (False, False)} if causal else {"first": (False, True),
                                                                           "pass": (False, False)}
    specs = {}
    for role, (diag, first) in roles.items():
        key = MobaFwdSm80.compile_key(dtype_name, head_dim, diag, first, bm, bn, nt, st)
        specs[role] = (key, (lambda d=diag, f=first: MobaFwdSm80(dt, head_dim, d, f, bm, bn, nt, st)),
                       fake_args_fwd(dt))
    specs.update(slot_index_specs(dtype_name, head_dim, causal, bm))
    return specs


def uses_sm90(dtype_name, head_dim, arch):
    """The sm90 segment forward serves this call (Hopper, a head dim it has tiles for), unless
    ``MOBA_CUTE_FWD_SM80=1`` asks for the sm80 slot passes."""
    return (str(arch).startswith("sm_90") and head_dim in cfg90.FWD_TILES
            and os.environ.get("MOBA_CUTE_FWD_SM80", "0") in ("", "0"))


def _env_flag(name, default):
    """The switch ``name`` (``1`` / ``0``), else ``default`` when unset or empty; any other value
    is a ``ValueError`` naming it."""
    env = os.environ.get(name, "")
    if env not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, not {env!r}")
    return env == "1" if env else default


def fwd_staged():
    """Whether the sm90 segment kernel stages its partials through shared memory and stores them
    in 16-byte pieces: the default (5-7% off the segment kernel on the H200: docs/design.md
    section 8, "Where the forward's time goes now"); ``MOBA_CUTE_FWD_STAGED=0`` keeps the
    4-byte stores from the accumulator fragments."""
    return _env_flag("MOBA_CUTE_FWD_STAGED", True)


def fwd_overlap():
    """Whether one-consumer sm90 tiles with two or more K/V stages overlap a streamed n-block's
    softmax with the previous block's PV (FA3's intra-warpgroup overlap, bitwise the same result):
    ``MOBA_CUTE_FWD_OVERLAP=1``. Off by default: with one K/V ring it was correct on the H100 but
    9-11% slower there (docs/design.md section 8, update 5, measured), and with K and V in rings
    of their own (``MobaFwdSm90.split_kv``) still 6% slower at moba-large 128K and 1% at C = 512.
    The two-consumer pair tile always overlaps."""
    return _env_flag("MOBA_CUTE_FWD_OVERLAP", False)


def fwd_q_regs():
    """Whether the one-consumer sm90 segment kernel holds a sub-tile's Q in registers for its
    streamed n-blocks (RS ``QK^T``: each n-block reads only K from shared memory; chunks longer
    than ``bn``, sequential loop): ``configs/attention_sm90.FWD_Q_REGS``, or
    ``MOBA_CUTE_FWD_QREGS=1`` / ``0``."""
    return _env_flag("MOBA_CUTE_FWD_QREGS", bool(cfg90.FWD_Q_REGS))


def fwd_rescale_skip():
    """Whether the sm90 segment kernel's streamed loops skip ``O``'s rescale in a warp whose row
    maxima all stayed put (bitwise the same result): ``configs/attention_sm90.FWD_RESCALE_SKIP``,
    or ``MOBA_CUTE_FWD_RESCALE_SKIP=1`` / ``0``."""
    return _env_flag("MOBA_CUTE_FWD_RESCALE_SKIP", bool(cfg90.FWD_RESCALE_SKIP))


def fwd_persistent(chunk_size, bn):
    """Whether the one-consumer sm90 segment kernel walks its units persistently
    (``SegVariant(persistent=True)``: two CTAs per SM, the next unit's K/V and Q loaded while this
    one finishes): for chunks of one n-block (``chunk_size <= bn``), by
    ``configs/attention_sm90.FWD_PERSISTENT``, or ``MOBA_CUTE_FWD_PERSISTENT=1`` / ``0``."""
    return int(chunk_size) <= int(bn) and _env_flag("MOBA_CUTE_FWD_PERSISTENT", bool(cfg90.FWD_PERSISTENT))


def fwd_kv_multicast(chunk_size, overlap=False):
    """Whether the one-consumer sm90 segment kernel runs in clusters of two CTAs that share each
    K/V n-block by TMA multicast (``SegVariant(mcast=2)``): by default for chunks of
    ``configs/attention_sm90.FWD_KV_MULTICAST_MIN_CHUNK`` keys or more without the overlap (H100,
    segment kernel: 1-3% faster at 2048 and 4096, 5% slower at 512, 39% at 128);
    ``MOBA_CUTE_FWD_MULTICAST=1`` / ``0`` forces either, also with the overlap. The built-in tile
    of such chunks is the pair tile (``FWD_LONG_CHUNK_TILES``), which never runs in clusters, so
    this applies to a one-consumer tile from the tuned table or ``MOBA_CUTE_SM90_TILES``."""
    return _env_flag("MOBA_CUTE_FWD_MULTICAST", int(chunk_size) >= cfg90.FWD_KV_MULTICAST_MIN_CHUNK and not overlap)


def fwd_diag_sm90(chunk_size):
    """Whether the sm90 forward's causal diagonal runs on wgmma (:class:`MobaDiagSm90`) rather than
    ``MobaFwdSm80(merge=True)`` (mma.sync): for chunks of ``configs/attention_sm90.DIAG_MIN_CHUNK``
    keys or more (H100, diagonal + merge: 23.7 -> 15.0 ms at moba-large 128K, 2.49 -> 2.42 ms at
    flashmoba 64K; docs/design.md, section 8). ``MOBA_CUTE_FWD_DIAG_SM90=1`` / ``0`` forces either."""
    return _env_flag("MOBA_CUTE_FWD_DIAG_SM90", int(chunk_size) >= cfg90.DIAG_MIN_CHUNK)


def fwd_diag_staged():
    """Whether the wgmma diagonal stages the partials it merges in shared memory (``cp.async``
    into the free K/V ring, several slots in flight) instead of reading them with 4-byte loads
    (``MobaDiagSm90(staged_merge=...)``): ``configs/attention_sm90.DIAG_STAGED_MERGE``, or
    ``MOBA_CUTE_FWD_DIAG_STAGED=1`` / ``0``."""
    return _env_flag("MOBA_CUTE_FWD_DIAG_STAGED", bool(cfg90.DIAG_STAGED_MERGE))


def fwd_diag_interleave():
    """Whether the wgmma diagonal launches a chunk's tiles short and long in turn
    (``MobaDiagSm90(interleave=...)``): ``configs/attention_sm90.DIAG_INTERLEAVE``, or
    ``MOBA_CUTE_FWD_DIAG_INTERLEAVE=1`` / ``0``."""
    return _env_flag("MOBA_CUTE_FWD_DIAG_INTERLEAVE", bool(cfg90.DIAG_INTERLEAVE))


def fwd_diag_overlap():
    """Whether the wgmma diagonal runs its n-blocks with FlashAttention-3's intra-warpgroup
    overlap (n's ``QK^T`` and n - 1's ``PV`` back to back, K and V in rings of their own;
    ``MobaDiagSm90(overlap=...)``): ``configs/attention_sm90.DIAG_OVERLAP``, or
    ``MOBA_CUTE_FWD_DIAG_OVERLAP=1`` / ``0``."""
    return _env_flag("MOBA_CUTE_FWD_DIAG_OVERLAP", bool(cfg90.DIAG_OVERLAP))


def sm90_tile_fields(tile):
    """(bn, sub, kv_stages, consumer warpgroups) of an sm90 forward tile: ``(bn, sub, kv_stages)``
    (one consumer warpgroup, two CTAs per SM) or ``(bn, sub, kv_stages, 2)`` (two that share
    every streamed n-block, one CTA per SM: ``MobaFwdSm90Pair``)."""
    return tile[0], tile[1], tile[2], cfg90.tile_consumers(tile)


def sm90_tiles(head_dim, shape_class=None, device=None, chunk_size=None):
    """(bn, sub, kv_stages[, 2]) of the sm90 segment kernel (:func:`sm90_tile_fields`): for a
    launch plan (``shape_class`` given) the tuner's override first; then
    ``MOBA_CUTE_SM90_TILES=bn,sub,stages[,2]`` (tile sweeps); then, for a plan, the tuned tables'
    tile for ``shape_class`` on CUDA device index ``device`` (configs/tuned.py); else
    configs/attention_sm90.py's built-in tile for chunks of ``chunk_size`` keys."""
    t = None
    if shape_class is not None:
        t = tuned.forced("sm90_fwd", head_dim)
        if t is not None:
            return t
    env = os.environ.get("MOBA_CUTE_SM90_TILES")
    if env:
        try:
            t = tuple(int(x) for x in env.split(","))
        except ValueError:
            t = ()
        if len(t) not in (3, 4) or (len(t) == 4 and t[3] not in (1, 2)) or min(t) < 1:
            raise ValueError("MOBA_CUTE_SM90_TILES must be bn,sub,kv_stages or bn,sub,kv_stages,consumers "
                             f"(positive integers, consumers 1 or 2), not {env!r}")
        return t
    if shape_class is not None:
        t = tuned.lookup("sm90_fwd", head_dim, shape_class, device)
    return t if t is not None else cfg90.fwd_tile(head_dim, chunk_size)


@contextlib.contextmanager
def tile_override(family, tile):
    """Within the block, every forward of ``family`` ("sm90_fwd" / "sm80_fwd") uses ``tile``, one
    of its shipped candidates (configs/tuned.py), over the environment and the tuned tables:
    what the tuner times. Forward plans are dropped on entry and exit, so calls re-plan (and
    compile) with the tile in force."""
    with tuned.forcing(family, tile, cfg.FWD_TILES if family == "sm80_fwd" else cfg90.FWD_TILES, FWD_PLANS.clear):
        yield


def kernel_specs_sm90(dtype_name, head_dim, causal, tile=None, topk=None, variant=None, row_windows=False,
                      diag_sm90=False, diag_staged=False, diag_overlap=False, diag_interleave=False):
    """Role -> (key, factory, fake args) of every kernel a forward call on sm90 runs: the
    all-slot index, the segment kernel, and the merge (causal: in the diagonal kernel).
    ``topk``: the pair lists read selection rows in 16-byte vectors when it is a multiple of 4
    (None: both variants, for the compile tests). ``variant``: the segment kernel's loop
    switches (``moba_fwd_sm90.SegVariant``; None: its defaults, the staged epilogue and nothing
    else; a plan's: :func:`fwd_staged`, :func:`fwd_overlap`, :func:`fwd_q_regs`,
    :func:`fwd_kv_multicast`, :func:`fwd_rescale_skip`), of which the tile takes what it can.
    ``row_windows``: the index's per-window counts (:func:`fwd_row_window`). ``diag_sm90``: the
    causal diagonal on wgmma (:func:`fwd_diag_sm90`), ``diag_staged`` its merge through shared
    memory (:func:`fwd_diag_staged`), ``diag_overlap`` its overlapped n-block loop
    (:func:`fwd_diag_overlap`), ``diag_interleave`` its tile order (:func:`fwd_diag_interleave`)."""
    from .merge import MergeKernel
    from .moba_fwd_diag_sm90 import MobaDiagSm90
    from .moba_fwd_sm80 import MobaFwdSm80
    from .moba_fwd_sm90 import MobaFwdSm90, MobaFwdSm90Pair, SegVariant
    from .slot_index import PairListKernel, SlotIndexKernel, SlotPrepKernel, SlotScanKernel, WindowCountKernel

    dt = _cdt(dtype_name)
    F = _cdt_f32()
    bn, sub, kst, nw = sm90_tile_fields(tile if tile is not None else sm90_tiles(head_dim))
    unit = 64 * sub
    bm, dbn, nt, st = tiles(head_dim)
    causal = bool(causal)
    variant = SegVariant() if variant is None else variant
    # two consumer warpgroups sharing each streamed n-block, or one
    kern = MobaFwdSm90Pair if nw == 2 else MobaFwdSm90
    seg = (kern.compile_key(dtype_name, head_dim, bn, sub, kst, variant),
           lambda: kern(dt, head_dim, bn, sub, kst, variant))
    specs = {
        "seg": seg + (_fake([(dt, 16)] * 4 + [(F, 4)] + _i32p(10), 11, 1),),
        "slot_prep": (("slotprep", bm, causal), lambda: SlotPrepKernel(bm, causal), _fake(_i32p(3), 4)),
        "slot_count": (("slotidx", False, causal, dtype_name, head_dim, "merged"),
                       lambda: SlotIndexKernel(False, causal, dt, head_dim, True), fake_args_index(dt)),
        "slot_scan": (("slotscan", unit), lambda: SlotScanKernel(unit), _fake(_i32p(5), 3)),
    }
    for vec in (1, 4):
        if topk is None or vec == (4 if topk % 4 == 0 else 1):
            # head-major pair indices, KV-head-major segments: windows of KV heads are contiguous;
            # "dual" (a training forward): also the backward's list, kept for it
            for dual in (False, True):
                role = "pair_list" + "_dual" * dual + ("" if topk is not None else f"_v{vec}")
                specs[role] = (PairListKernel.compile_key(causal, vec, head_major=True, dual=dual),
                               lambda v=vec, d=dual: PairListKernel(causal, v, head_major=True, dual=d),
                               _fake([(_i32p(1)[0][0], 16 if vec == 4 else 4)] + _i32p(6), 7))
    if row_windows:
        specs["win_count"] = (WindowCountKernel.compile_key(), WindowCountKernel, _fake(_i32p(5), 8))
    if causal:
        # the diagonal kernel's state pointers carry the partials: oacc = part_o, mst = part_lse
        fake = _fake([(dt, 16)] * 4 + [(F, 4), (dt, 16), (F, 4), (F, 4)] + _i32p(9), 15, 1)
        if diag_sm90:
            dbn90, dks90 = cfg90.DIAG_TILES[head_dim]
            assert bm == 64, "the diagonal's query tiles (cu_mt) are wgmma's 64 rows"
            specs["diag"] = (MobaDiagSm90.compile_key(dtype_name, head_dim, dbn90, dks90, diag_staged, diag_overlap,
                                                      diag_interleave),
                             lambda: MobaDiagSm90(dt, head_dim, dbn90, dks90, diag_staged, diag_overlap,
                                                  diag_interleave), fake)
        else:
            specs["diag"] = (MobaFwdSm80.compile_key(dtype_name, head_dim, True, True, bm, dbn, nt, st, merge=True),
                             lambda: MobaFwdSm80(dt, head_dim, True, True, bm, dbn, nt, st, merge=True), fake)
    else:
        specs["merge"] = (("merge", dtype_name, head_dim), lambda: MergeKernel(dt, head_dim),
                          _fake([(dt, 16), (F, 4), *_i32p(1), (dt, 16), (F, 4)], 7))
    return specs


def bwd_kernel_specs(dtype_name, head_dim, causal):
    """Role -> (key, factory, fake args) of every kernel a backward call with this config runs."""
    from .bwd_rowwise import BwdPrepKernel, DqConvertKernel
    from .moba_bwd_sm80 import MobaBwdDkvSm80, MobaBwdDqSm80

    dt = _cdt(dtype_name)
    F = _cdt_f32()
    kbm, kbn, knt = cfg.BWD_DKV_TILES[head_dim]
    qbm, qbn, qnt = cfg.BWD_DQ_TILES[head_dim]
    specs = {"dkv": (MobaBwdDkvSm80.compile_key(dtype_name, head_dim, causal, kbm, kbn, knt),
                     (lambda: MobaBwdDkvSm80(dt, head_dim, causal, kbm, kbn, knt)), fake_args_dkv(dt))}
    for role, diag in (("dq_diag", True), ("dq_pass", False)) if causal else (("dq_pass", False),):
        specs[role] = (MobaBwdDqSm80.compile_key(dtype_name, head_dim, diag, qbm, qbn, qnt),
                       (lambda d=diag: MobaBwdDqSm80(dt, head_dim, d, qbm, qbn, qnt)), fake_args_dq(dt))
    for role, has_dlse in (("bwd_prep", False), ("bwd_prep_dlse", True)):
        specs[role] = (("bwdprep", dtype_name, head_dim, has_dlse),
                       (lambda h=has_dlse: BwdPrepKernel(dt, head_dim, h)),
                       _fake([(dt, 16), (dt, 16), (F, 4), (F, 4), (F, 16)], 4))
    specs["dq_convert"] = (("dqconvert", dtype_name, head_dim), lambda: DqConvertKernel(dt, head_dim),
                           _fake([(F, 16), (dt, 16)], 2))
    specs.update(slot_index_specs(dtype_name, head_dim, causal, qbm))
    return specs


def _bwd_sm80_forced():
    """``MOBA_CUTE_BWD_SM80=1``: the sm80 backward kernels on Hopper too."""
    return os.environ.get("MOBA_CUTE_BWD_SM80", "0") not in ("", "0")


def uses_sm90_bwd(dtype_name, head_dim, arch):
    """The sm90 backward serves this call: Hopper, head dim 64 or 128 (any chunk size), unless
    ``MOBA_CUTE_BWD_SM80=1`` asks for the sm80 kernels. Chunks of at most 128 keys: the one-pass
    :class:`~moba_cute.kernels.moba_bwd_sm90.MobaBwdSm90`; longer chunks: its dK/dV-only variant
    per 128-key tile and :class:`~moba_cute.kernels.moba_bwd_dq_sm90.MobaBwdDqSm90Pair` (or
    ``MobaBwdDqSm90``: :func:`bwd_dq_pair`) for dQ."""
    return str(arch).startswith("sm_90") and head_dim in (64, 128) and not _bwd_sm80_forced()


PARTIALS_MIN_BYTES = 1 << 30


def _partials_bound(total_q, H, D, env_name):
    """The bound on a partial buffer: the sm80 kernels' fp32 accumulator (``total_q * H * D * 4``
    bytes: the forward's running state, the backward's dQ), so the peak memory is no higher than
    that path's (README: 1.04x FA2's at 512K), or 1 GiB where that is larger, so that short
    sequences keep one window (one launch each). The environment variable ``env_name`` replaces
    it (tests force several windows with it)."""
    env = os.environ.get(env_name)
    return max(PARTIALS_MIN_BYTES, total_q * H * D * 4) if env in (None, "") else int(env)


def _dq_partials_per_kv(total_q, H, Hk, D, K, elem_bytes):
    """Bytes of the sm90 backward's dQ partials for one KV head: ``total_q * G * K * D *
    elem_bytes`` (2 in the input dtype, 4 for the chain's fp32)."""
    return total_q * (H // Hk) * max(K, 1) * D * elem_bytes


def dq_window_kv_heads(total_q, H, Hk, D, K, elem_bytes=2):
    """KV heads per window of the sm90 backward's dQ partial buffer (:func:`_dq_partials_per_kv`
    bytes per KV head), within :func:`_partials_bound` (``MOBA_CUTE_DQ_PARTIAL_BYTES``)."""
    cap = _partials_bound(total_q, H, D, "MOBA_CUTE_DQ_PARTIAL_BYTES")
    per_kv = _dq_partials_per_kv(total_q, H, Hk, D, K, elem_bytes)
    return max(1, min(Hk, cap // max(per_kv, 1)))


def fwd_partials_bound(total_q, H, D, inference=False):
    """The bound on the sm90 forward's partial buffer. With gradients (training) the backward
    holds more than the forward (its peak is the step's), so :func:`_partials_bound`. Without
    (``inference``: prefill), the forward is the peak: 1/16 of q's bytes (FA2's forward holds
    q, k, v and out), at least ``FWD_INFER_MIN_BYTES`` so that sequences up to ~64K keep windows
    of KV heads. ``MOBA_CUTE_FWD_PARTIAL_BYTES`` replaces both."""
    if not inference or os.environ.get("MOBA_CUTE_FWD_PARTIAL_BYTES") not in (None, ""):
        return _partials_bound(total_q, H, D, "MOBA_CUTE_FWD_PARTIAL_BYTES")
    return max(FWD_INFER_MIN_BYTES, total_q * H * D * 2 // 16)


FWD_INFER_MIN_BYTES = 512 << 20
ROW_WINDOW_MIN_ROWS = 64  # a diagonal tile's rows


def _pair_bytes(D):
    return 2 * D + 4  # a gather pair's partial: normalized o (input dtype) and an fp32 LSE


def fwd_window_kv_heads(total_q, H, Hk, D, KP, inference=False):
    """KV heads per window of the sm90 forward's partial buffer (``total_q * G * KP * (2 D + 4)``
    bytes per KV head: a normalized ``o`` and an fp32 LSE per gather pair), within
    :func:`fwd_partials_bound`; at least one KV head. A divisor of ``Hk``: the index's scan gives
    every window the same number of segments."""
    cap = fwd_partials_bound(total_q, H, D, inference)
    per_kv = total_q * (H // Hk) * max(KP, 1) * _pair_bytes(D)
    fit = cap // max(per_kv, 1)
    return max(d for d in range(1, Hk + 1) if Hk % d == 0 and (d <= fit or d == 1))


def fwd_row_window(total_q, H, Hk, D, KP, inference=False):
    """Rows per window when even one KV head's partials exceed :func:`fwd_partials_bound`
    (long prefill without gradients, or a forced bound): windows are then ranges of one query
    head's rows (the index gives each its own tile range: ``WindowCountKernel``), as many as the
    bound holds, at least ``ROW_WINDOW_MIN_ROWS``. None: windows of whole KV heads do."""
    if KP <= 0:
        return None
    cap = fwd_partials_bound(total_q, H, D, inference)
    G = H // Hk
    if total_q * G * KP * _pair_bytes(D) <= cap:
        return None
    W = min(total_q, max(ROW_WINDOW_MIN_ROWS, cap // (KP * _pair_bytes(D))))
    if W >= total_q and G == 1:
        return None  # a window of one KV head is one query head's rows
    return W


def bwd_kernel_specs_sm90(dtype_name, head_dim, causal, topk, overlap=None, persistent=False):
    """Role -> (key, factory, fake args) of the sm90 backward's kernels: delta, the pair lists
    of every selected pair (own chunks included), the key-major kernel, the dQ reduction.
    ``overlap``: the key-major kernel's sub-tiles in FA3/FA4's order (None: :func:`bwd_overlap`'s rule).
    ``persistent``: the key-major kernel's persistent walk (:func:`bwd_persistent`) and the reset
    of its unit counters; with the overlapped order only."""
    from .bwd_rowwise import BwdPrepKernel, DqReduceKernel, ZeroKernel
    from .moba_bwd_sm90 import MobaBwdSm90
    from .slot_index import PairListKernel

    dt = _cdt(dtype_name)
    F = _cdt_f32()
    I = _i32p(1)[0][0]
    vec = 4 if topk % 4 == 0 else 1
    ovl = bwd_overlap(dtype_name, head_dim, causal) if overlap is None else bool(overlap)
    pers = bool(persistent) and ovl
    specs = {
        "bwd90": (MobaBwdSm90.compile_key(dtype_name, head_dim, causal, overlap=ovl, persistent=pers),
                  lambda: MobaBwdSm90(dt, head_dim, causal, overlap=ovl, persistent=pers),
                  _fake([(dt, 16)] * 4 + [(F, 4), (F, 4), (dt, 16), (dt, 16), (dt, 16), (I, 4)] + _i32p(5), 12, 2)),
        # causal=False: keeps slot 0 (the own chunk), pair index (row * H + h) * topk + slot
        "pair_list": (PairListKernel.compile_key(False, vec, fill_tail=True),
                      lambda: PairListKernel(False, vec, fill_tail=True),
                      _fake([(I, 16 if vec == 4 else 4)] + _i32p(6), 7)),
        "dq_reduce": (("dqreduce", dtype_name, head_dim), lambda: DqReduceKernel(dt, head_dim),
                      _fake([(dt, 16), (I, 4), (I, 4), (I, 4), (dt, 16)], 7)),
    }
    if pers:
        specs["zero32"] = (("zero32",), ZeroKernel, _fake([(I, 4)], 2))
    for role, has_dlse in (("bwd_prep", False), ("bwd_prep_dlse", True)):
        specs[role] = (("bwdprep", dtype_name, head_dim, has_dlse, "nozero"),
                       (lambda h=has_dlse: BwdPrepKernel(dt, head_dim, h, zero_dq=False)),
                       _fake([(dt, 16), (dt, 16), (F, 4), (F, 4), (F, 16)], 4))
    return specs


def bwd_dq_pair():
    """The pair dQ kernel (:class:`~moba_cute.kernels.moba_bwd_dq_sm90.MobaBwdDqSm90Pair`) for
    chunks over 128 keys: ``configs/attention_sm90.BWD_DQ_PAIR``, ``MOBA_CUTE_BWD_DQ_PAIR=0/1``
    overrides it."""
    return _env_flag("MOBA_CUTE_BWD_DQ_PAIR", cfg90.BWD_DQ_PAIR)


def bwd_dkv_pingpong():
    """The dK/dV-only kernel's ping-pong (``MobaBwdSm90(with_dq=False, pingpong=True)``):
    ``configs/attention_sm90.BWD_DKV_PINGPONG``, ``MOBA_CUTE_BWD_DKV_PINGPONG=0/1`` overrides it."""
    return _env_flag("MOBA_CUTE_BWD_DKV_PINGPONG", cfg90.BWD_DKV_PINGPONG)


def bwd_reach_skip():
    """The long-chunk backward skips the key tiles past a sub-tile's reach (causal own-chunk rows):
    ``configs/attention_sm90.BWD_REACH_SKIP``, ``MOBA_CUTE_BWD_REACH_SKIP=0/1`` overrides it."""
    return _env_flag("MOBA_CUTE_BWD_REACH_SKIP", cfg90.BWD_REACH_SKIP)


def bwd_dq_chain(total_q, H, Hk, D, K):
    """The 5-GEMM backward for chunks over 128 keys (``MobaBwdSm90(chain=True)``: each key tile's
    CTA adds its dQ contribution in key-tile order): ``configs/attention_sm90.BWD_DQ_CHAIN``, where
    its fp32 partials for one KV head (:func:`_dq_partials_per_kv`, the least its windows hold)
    are within ``BWD_CHAIN_MAX_BOUNDS`` times :func:`_partials_bound` (else the bf16
    partials of the pair dQ kernel, half the bytes). ``MOBA_CUTE_BWD_DQ_CHAIN=1`` forces it on,
    ``0`` off."""
    forced = _env_flag("MOBA_CUTE_BWD_DQ_CHAIN", None)
    if forced is not None:
        return forced
    per_kv = _dq_partials_per_kv(total_q, H, Hk, D, K, 4)
    cap = cfg90.BWD_CHAIN_MAX_BOUNDS * _partials_bound(total_q, H, D, "MOBA_CUTE_DQ_PARTIAL_BYTES")
    return cfg90.BWD_DQ_CHAIN and per_kv <= cap


def bwd_chain_pipe():
    """The chain's adding warps release a sub-tile's semaphore after issuing the next one
    (``MobaBwdSm90(chain_pipe=True)``): ``configs/attention_sm90.BWD_CHAIN_PIPE``,
    ``MOBA_CUTE_BWD_CHAIN_PIPE=0/1`` overrides it."""
    return _env_flag("MOBA_CUTE_BWD_CHAIN_PIPE", cfg90.BWD_CHAIN_PIPE)


def kept_pairs_on():
    """Whether the sm90 training forward writes the sm90 backward's pair lists beside its own (one
    pair-list kernel for both; held from the forward to the backward in place of the backward's
    own): ``configs/attention_sm90.KEEP_BWD_PAIRS``, ``MOBA_CUTE_KEEP_BWD_PAIRS=0/1`` overrides it."""
    return _env_flag("MOBA_CUTE_KEEP_BWD_PAIRS", bool(cfg90.KEEP_BWD_PAIRS))


def bwd_persistent(chunk_size, dtype_name, head_dim, causal):
    """Whether the one-pass sm90 backward kernel walks its (chunk, KV head) units persistently
    (``MobaBwdSm90(persistent=True)``: about one CTA per SM taking units from a counter): for
    chunks of one key tile (``chunk_size <= 128``) in the overlapped order (:func:`bwd_overlap`;
    the sequential one spills 4 bytes with it at fp16, D = 128), by
    ``configs/attention_sm90.BWD_PERSISTENT``, or ``MOBA_CUTE_BWD_PERSISTENT=1`` / ``0``."""
    return (int(chunk_size) <= 128 and bwd_overlap(dtype_name, head_dim, causal)
            and _env_flag("MOBA_CUTE_BWD_PERSISTENT", bool(cfg90.BWD_PERSISTENT)))


def bwd_overlap(dtype_name, head_dim, causal, chain=False):
    """Whether the one-pass backward kernel runs its sub-tiles in FA3/FA4's order
    (``MobaBwdSm90(overlap=True)``): ``configs/attention_sm90.BWD_OVERLAP`` (``MOBA_CUTE_BWD_OVERLAP=0/1``
    overrides it), except for the configurations in ``BWD_OVERLAP_SPILLS``."""
    return (_env_flag("MOBA_CUTE_BWD_OVERLAP", cfg90.BWD_OVERLAP)
            and (dtype_name, int(head_dim), bool(causal), bool(chain)) not in cfg90.BWD_OVERLAP_SPILLS)


def bwd_kernel_specs_sm90_chain(dtype_name, head_dim, causal, topk, reach_skip=None, chain_pipe=None,
                                overlap=None):
    """The sm90 backward's kernels for chunks over 128 keys with the dQ chain: those of
    :func:`bwd_kernel_specs_sm90` with the one-pass kernel per 128-key tile adding fp32 dQ
    partials in key-tile order, the reduction of fp32 partials and the semaphores' reset."""
    from .bwd_rowwise import DqReduceKernel, ZeroKernel
    from .moba_bwd_sm90 import MobaBwdSm90

    specs = bwd_kernel_specs_sm90(dtype_name, head_dim, causal, topk)
    dt = _cdt(dtype_name)
    F = _cdt_f32()
    I = _i32p(1)[0][0]
    rs = bwd_reach_skip() if reach_skip is None else bool(reach_skip)
    pipe = bwd_chain_pipe() if chain_pipe is None else bool(chain_pipe)
    # (the pipelined hand-over keeps the sequential order)
    ovl = (bwd_overlap(dtype_name, head_dim, causal, chain=True) and not pipe) if overlap is None else bool(overlap)
    specs["bwd90"] = (MobaBwdSm90.compile_key(dtype_name, head_dim, causal, True, False, rs, chain=True,
                                              chain_pipe=pipe, overlap=ovl),
                      lambda: MobaBwdSm90(dt, head_dim, causal, True, False, rs, chain=True, chain_pipe=pipe,
                                          overlap=ovl),
                      _fake([(dt, 16)] * 4 + [(F, 4), (F, 4), (dt, 16), (dt, 16), (F, 16), (I, 4)] + _i32p(5), 12, 2))
    specs["dq_reduce"] = (("dqreduce", dtype_name, head_dim, "f32"), lambda: DqReduceKernel(dt, head_dim),
                          _fake([(F, 16), (I, 4), (I, 4), (I, 4), (dt, 16)], 7))
    specs["zero32"] = (("zero32",), ZeroKernel, _fake([(I, 4)], 2))
    return specs


def bwd_kernel_specs_sm90_long(dtype_name, head_dim, causal, topk, dq_pair=None, dkv_pingpong=None,
                               reach_skip=None):
    """The sm90 backward's kernels for chunks over 128 keys: those of
    :func:`bwd_kernel_specs_sm90` but the one-pass kernel, plus the dK/dV-only kernel (one CTA per
    128-key tile; ``dkv_pingpong``, None: :func:`bwd_dkv_pingpong`) and the dQ kernel that
    streams a chunk's key tiles (``dq_pair``: two sub-tiles sharing each tile; None:
    :func:`bwd_dq_pair`)."""
    from .moba_bwd_dq_sm90 import MobaBwdDqSm90, MobaBwdDqSm90Pair
    from .moba_bwd_sm90 import MobaBwdSm90

    specs = bwd_kernel_specs_sm90(dtype_name, head_dim, causal, topk)
    dt = _cdt(dtype_name)
    F = _cdt_f32()
    one_pass = specs.pop("bwd90")
    pp = bwd_dkv_pingpong() if dkv_pingpong is None else bool(dkv_pingpong)
    rs = bwd_reach_skip() if reach_skip is None else bool(reach_skip)
    specs["bwd90_dkv"] = (MobaBwdSm90.compile_key(dtype_name, head_dim, causal, False, pp, rs),
                          lambda: MobaBwdSm90(dt, head_dim, causal, False, pp, rs), one_pass[2])
    dq_cls = MobaBwdDqSm90Pair if (bwd_dq_pair() if dq_pair is None else dq_pair) else MobaBwdDqSm90
    specs["dq90"] = (dq_cls.compile_key(dtype_name, head_dim, causal, rs),
                     lambda: dq_cls(dt, head_dim, causal, rs),
                     _fake([(dt, 16)] * 4 + [(F, 4), (F, 4), (dt, 16)] + _i32p(5), 12, 2))
    return specs


DQ90_TARGET_CTAS = 528  # 4 waves of one CTA per SM on a 132-SM H100/H200


# --- launch plans: everything of a call that depends only on its shapes ----------------------

class _SlotIndexPlan:
    """Sizes, grids and memory layout of the per-slot index (docs/design.md section 3). The
    layout is its own (offsets from the index's base), so an index built by the forward can be
    kept and read by a backward whose plan has the same tile height (:meth:`same_as`)."""

    def __init__(self, B, total_q, H, K, nseg, causal, bm, unit=None, Hk=None, windows=1, row_window=None):
        self.bm = bm
        self.s0 = 1 if causal else 0
        self.kp = K - self.s0  # gather slots per (row, head)
        # all slots at once (sm90 segment kernel), units of `unit` rows; its lists come from the
        # routing's key-major index (PairListKernel), packed at each segment's offset there. One
        # "pass" per window of KV heads (`windows` equal ones): its segments are contiguous
        # (KV-head-major order), so the scan gives each window its tile range. Windows of
        # `row_window` query rows of one head instead: WindowCountKernel counts each window's
        # entries of every (chunk, head) segment, and the scan runs over those counts (one pass
        # per (head, row window), `nbound` cells each)
        self.merged = unit is not None
        self.Hk = Hk
        self.nseg_all = nseg
        self.row_window = row_window
        self.nrw = 0
        rows_tot = total_q * H
        if self.merged and row_window is not None:
            self.nrw = -(-total_q // row_window)
            windows = H * self.nrw
            self.nseg = nseg // H  # a pass (window) has one cell per chunk of its head
            entries = row_window * self.kp
        else:
            self.nseg = nseg // windows if self.merged else nseg  # segments of one pass
            entries = (rows_tot // windows) * self.kp if self.merged else rows_tot  # entries of one pass
        self.npass = (windows if self.kp > 0 else 0) if self.merged else self.kp
        self.causal = causal
        tb = unit if self.merged else bm
        # tiles of one pass: each segment's last tile may be partial
        self.bound_pass = (entries + tb - 1) // tb + min(self.nseg, entries)
        self.tiles_bound = max(self.npass, 1) * self.bound_pass
        self.n_counts = self.npass * self.nseg
        _i32(self.n_counts, "index cells (windows x segments)")
        _i32(self.tiles_bound, "tile table")
        self.idx_blocks = (rows_tot + 255) // 256
        # (the merged counts are written whole by PairListKernel: nothing to zero)
        self.n_zero = 0 if self.merged else self.n_counts
        self.prep_blocks = max(1, min((self.n_zero + 255) // 256, 512))
        # the per-slot row lists, or the pair lists (packed at the routing's segment offsets)
        self.list_cap = rows_tot * K if self.merged else rows_tot * max(self.kp, 1)
        _i32(self.list_cap, "per-slot row lists / pair lists")
        self.mt_bound = (total_q + B * (bm - 1)) // bm
        self.gather = self.npass > 0 and nseg > 0 and rows_tot > 0
        self.layout = layout = common.WorkspaceLayout()
        for name, n in (("nused", rows_tot), ("counts", self.n_counts), ("seg_off", self.n_counts + 1),
                        ("tile_off", self.n_counts + 1), ("tile_seg", self.tiles_bound),
                        ("pass_tiles", 2 * self.npass + 1), ("cu_mt", B + 1)):
            layout.add(name, 4 * n)
        if self.nrw:
            # the pair lists' per-segment counts, and each window's first entry in a segment
            layout.add("seg_pairs", 4 * nseg)
            layout.add("wstart", 4 * self.n_counts)
        # last: a forward that may consume its routing writes the pair lists over the routing's
        # query_rows (same places) and allocates the index without this piece
        layout.add("rows_list", 4 * self.list_cap)

    def same_as(self, other) -> bool:
        return (self.bm, self.merged, self.npass, self.nseg, self.layout.offsets, self.layout.nbytes) == (
            other.bm, other.merged, other.npass, other.nseg, other.layout.offsets, other.layout.nbytes)

    def launch(self, ks, p, sel, cu_q, cu_chunks, out, lse, B, total_q, H, K, stream, offsets=None,
               query_rows=None, bwd_pairs=None):
        """The index into workspace pieces ``p`` (name -> address). Non-causal rows with no usable
        slot and causal rows outside every sequence get ``out = 0, lse = -inf`` (the backward
        passes dq as ``out``: zero rows). The merged lists read the routing's key-major index
        (``offsets``, ``query_rows``); ``bwd_pairs`` (an address; merged lists only, launched
        when :attr:`gather`): the sm90 backward's pair list is written there too."""
        ks["slot_prep"](p["counts"], cu_q, p["cu_mt"], self.n_zero, B, total_q, self.prep_blocks, stream)
        idx_args = (sel, cu_q, cu_chunks, p["counts"], p["rows_list"], p["nused"], out, lse, B, total_q, H, K,
                    self.nseg, self.idx_blocks, stream)
        ks["slot_count"](*idx_args)
        if self.gather:
            if self.merged:
                # (without a second list, its pointer is a stand-in; the per-slot lists of the
                # sm80 passes have no pair-list kernel)
                pair_list = ks["pair_list_dual"] if bwd_pairs is not None else ks["pair_list"]
                also = bwd_pairs if bwd_pairs is not None else p["rows_list"]
            if self.nrw:
                pair_list(sel, cu_chunks, offsets, query_rows, p["rows_list"], p["seg_pairs"], also, B, total_q, H,
                          self.Hk, K, self.nseg_all, self.list_cap, stream)
                ks["win_count"](offsets, p["seg_pairs"], p["rows_list"], p["counts"], p["wstart"], total_q, H,
                                self.Hk, self.kp, self.nseg, self.nrw, self.row_window, self.list_cap, stream)
            elif self.merged:
                pair_list(sel, cu_chunks, offsets, query_rows, p["rows_list"], p["counts"], also, B, total_q, H,
                          self.Hk, K, self.npass * self.nseg, self.list_cap, stream)
            ks["slot_scan"](p["counts"], p["seg_off"], p["tile_off"], p["tile_seg"], p["pass_tiles"], self.nseg,
                            self.npass, self.tiles_bound, stream)
            if not self.merged:
                ks["slot_scatter"](*idx_args)

    def work_counter(self, p, sp):
        """Gather pass ``sp``'s unit counter (zeroed by the scan; :class:`SlotScanKernel`)."""
        return p["pass_tiles"] + 4 * (self.npass + 1 + sp)

    def pass_args(self, p, sp):
        """The index pointers of gather pass ``sp`` (0-based among the gather passes)."""
        return (p["pass_tiles"] + 4 * sp, p["rows_list"], p["tile_seg"], p["seg_off"], p["tile_off"])


def _plan_key(q, k, routing):
    total_q, H, D = q.shape
    total_k, Hk, _ = k.shape
    return (q.dtype, total_q, H, D, total_k, Hk, routing.cu_seqlens_q.shape[0] - 1, int(routing.chunk_size),
            int(routing.topk), bool(routing.causal), routing.num_chunks_bound, q.device.index)


class _PlanBase:
    def __init__(self, key, arch):
        dtype, total_q, H, D, total_k, Hk, B, C, K, causal, nbound, _ = key
        self.dtype_name = _DTYPES[dtype]
        self.total_q, self.H, self.D, self.total_k, self.Hk, self.B = total_q, H, D, total_k, Hk, B
        self.C, self.K, self.causal, self.nbound = C, K, causal, nbound
        self.nseg = nbound * H
        self.rows = total_q * H
        self.arch = arch
        _i32(self.rows * max(K, 1), "total_q*H*topk")
        _i32(max(K, 1) * self.nseg + 1, "passes*num_chunks_bound*H")
        _i32(total_k * Hk, "total_k*Hk")
        self.layout = common.WorkspaceLayout()  # the call's own scratch (the index has its own)

    def workspace(self, device, kept=None, rows_list=None, pairs=None):
        """Scratch memory of one call: (tensors to hold while launching, name -> address). One
        allocation for the call's pieces and the per-slot index after them, unless ``kept`` is
        an index tensor built earlier (the forward's, reused by the backward) or the string
        "separate" (the index gets an allocation of its own, to be kept past the call).
        ``rows_list``: the address the index's lists go to instead of its own last piece (the
        routing's ``query_rows``, which a forward that owns its routing may overwrite).
        ``pairs`` (the sm90 backward): the address of the pair lists the training forward kept,
        used instead of the layout's last piece, which is then not allocated."""
        n_own = self.layout.nbytes
        if self.index is None:  # the sm90 backward: no per-slot index
            if pairs is not None:
                n_own = self.layout.offsets["pairs"]
            ws = torch.empty(n_own, dtype=torch.uint8, device=device)
            p = {n: ws.data_ptr() + o for n, o in self.layout.offsets.items()}
            if pairs is not None:
                p["pairs"] = pairs
            return [ws], p
        n_index = self.index.layout.offsets["rows_list"] if rows_list is not None else self.index.layout.nbytes
        ws = torch.empty(n_own + (n_index if kept is None else 0), dtype=torch.uint8, device=device)
        base = ws.data_ptr()
        if kept == "separate":
            kept = torch.empty(self.index.layout.nbytes, dtype=torch.uint8, device=device)
        ib = kept.data_ptr() if kept is not None else base + n_own
        p = {n: base + o for n, o in self.layout.offsets.items()}
        p.update({n: ib + o for n, o in self.index.layout.offsets.items()})
        if rows_list is not None:
            p["rows_list"] = rows_list
        return [ws, kept], p


class FwdPlan(_PlanBase):
    """Forward launch plan of one shape key (see the module docstring). Its tile (``tile``:
    :func:`sm90_tiles` or :func:`tiles` for the key's shape class and device) is chosen here,
    once per key, and is in every compile key of its kernel set."""

    def __init__(self, key, arch, inference=False):
        super().__init__(key, arch)
        self.shape_class = tuned.shape_class(self.dtype_name, self.D, self.causal, self.C, self.K, self.rows)
        device = key[-1]
        bm = tiles(self.D)[0]
        self.sm90 = uses_sm90(self.dtype_name, self.D, arch)
        if str(arch).startswith("sm_90") and not self.sm90 and self.D not in cfg90.FWD_TILES:
            _warn_once(f"moba_cute: the sm90 forward has no tiles for head_dim={self.D} "
                       f"(it has {cfg90.SUPPORTED_HEAD_DIMS}); using the sm80 (mma.sync) forward")
        if self.sm90:
            self.tile = sm90_tiles(self.D, self.shape_class, device, self.C)
            kp = self.K - (1 if self.causal else 0)
            # windows of KV heads: the segment kernel and the merge run once per window, whose
            # partials (normalized o in the input dtype, log2-domain LSE; head-major) the buffer
            # holds; or windows of `row_window` rows of one query head when one KV head's
            # partials do not fit (inference: a tighter bound, the forward is the peak)
            self.row_window = fwd_row_window(self.total_q, self.H, self.Hk, self.D, kp, inference)
            if self.row_window is not None:
                nkv = 1
            else:
                nkv = fwd_window_kv_heads(self.total_q, self.H, self.Hk, self.D, kp, inference) if kp > 0 else self.Hk
            self.windows = self.Hk // nkv
            self.win_heads = self.H // self.windows  # query heads of a window of KV heads
            self.index = _SlotIndexPlan(self.B, self.total_q, self.H, self.K, self.nseg, self.causal, bm,
                                        unit=64 * self.tile[1], Hk=self.Hk, windows=self.windows,
                                        row_window=self.row_window)
            npart = self.index.kp * (self.row_window if self.row_window is not None
                                     else self.total_q * self.win_heads)
            self.layout.add("part_o", npart * self.D * 2)
            self.layout.add("part_lse", npart * 4)
            self.fwd_windows = self._windows()
            from .moba_fwd_sm90 import MobaFwdSm90Pair, SegVariant

            bn, _, kst, nw = sm90_tile_fields(self.tile)
            # the switches this tile takes (the kernels' own rules); clusters only for one-consumer
            # tiles, and by default only without the overlap that takes effect
            v = SegVariant(fwd_staged(), fwd_overlap(), fwd_q_regs(), 1, fwd_rescale_skip(),
                           fwd_persistent(self.C, bn))
            v = MobaFwdSm90Pair.takes(v) if nw == 2 else v.for_tile(bn, kst)
            if nw == 1 and fwd_kv_multicast(self.C, v.overlap):
                v = dataclasses.replace(v, mcast=2).for_tile(bn, kst)
            self.variant = v
            # the segment kernel's grid: one CTA per unit, or two per SM walking the units
            self.seg_grid = self.index.bound_pass
            if v.persistent:
                self.seg_grid = max(1, min(self.seg_grid, cfg90.CTAS_PER_SM * common.sm_count(device)))
            self.diag_sm90 = self.causal and fwd_diag_sm90(self.C)
            self.diag_staged = self.diag_sm90 and fwd_diag_staged()
            self.diag_overlap = self.diag_sm90 and fwd_diag_overlap()
            self.diag_interleave = self.diag_sm90 and fwd_diag_interleave()
            specs = kernel_specs_sm90(self.dtype_name, self.D, self.causal, self.tile, self.K, v,
                                      row_windows=self.row_window is not None, diag_sm90=self.diag_sm90,
                                      diag_staged=self.diag_staged, diag_overlap=self.diag_overlap,
                                      diag_interleave=self.diag_interleave)
            self.ks = common.KernelSet(specs, arch)
            return
        self.tile = tiles(self.D, self.shape_class, device)
        bm = self.tile[0]
        st = 1 if self.K > 1 else 0  # running state only when a row has more than one slot
        self.layout.add("oacc", st * self.rows * self.D * 4)
        self.layout.add("mst", st * self.rows * 4)
        self.layout.add("lst", st * self.rows * 4)
        self.index = _SlotIndexPlan(self.B, self.total_q, self.H, self.K, self.nseg, self.causal, bm)
        self.ks = common.KernelSet(kernel_specs(self.dtype_name, self.D, self.causal, tile=self.tile), arch)

    def _windows(self):
        """The sm90 forward's windows in launch order: (scan pass, first head, heads, first row,
        end row, first pair index, first diagonal tile, grid of the diagonal or merge kernel).
        Windows of KV heads cover all rows of their query heads; windows of query rows
        (``row_window``) one head's rows ``[r_lo, r_hi)``."""
        total_q, ix = self.total_q, self.index
        if self.row_window is None:
            nh = self.win_heads
            spans = [(w, w * nh, nh, 0, total_q) for w in range(self.windows)]
        else:
            W = self.row_window
            spans = [(h * ix.nrw + rw, h, 1, rw * W, min(total_q, (rw + 1) * W))
                     for h in range(self.H) for rw in range(ix.nrw)]
        bm = ix.bm  # the diagonal's query tile
        out = []
        for sp, h0, nh, r_lo, r_hi in spans:
            pbase = (h0 * total_q + r_lo) * ix.kp  # head-major pair index (h * total_q + row) * KP + slot
            if not self.causal:
                t0, grid = 0, _merge_blocks(nh * (r_hi - r_lo))
            elif self.row_window is None:
                t0, grid = 0, ix.mt_bound
            else:
                # a sequence's tiles start at its first row, so tile t's first row lies in
                # (bm * (t - B), bm * t]: tiles [r_lo // bm, (r_hi - 1) // bm + B] hold the window's rows
                t0 = r_lo // bm
                grid = min(ix.mt_bound, (r_hi - 1) // bm + self.B + 1) - t0
            out.append((sp, h0, nh, r_lo, r_hi, pbase, t0, grid))
        return out


_WARNED = set()


def _warn_once(msg):
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def _merge_blocks(rows):
    from .merge import grid_blocks

    return grid_blocks(rows)


class BwdPlan(_PlanBase):
    """Backward launch plan of one shape key (see the module docstring)."""

    def __init__(self, key, arch):
        super().__init__(key, arch)
        from .bwd_rowwise import grid_blocks

        self.row_blocks = grid_blocks(self.rows, self.D)
        self.sm90 = uses_sm90_bwd(self.dtype_name, self.D, arch) and self.K > 0
        if str(arch).startswith("sm_90") and not self.sm90 and self.K > 0 and not _bwd_sm80_forced():
            _warn_once(f"moba_cute: the sm90 backward does not cover head_dim={self.D} (it has 64 and 128); "
                       "using the sm80 (mma.sync) backward")
        if self.sm90:
            npair = self.rows * self.K
            G = self.H // self.Hk
            self.ktiles = (self.C + 127) // 128
            self.chain = self.ktiles > 1 and bwd_dq_chain(self.total_q, self.H, self.Hk, self.D, self.K)
            pbytes = 4 if self.chain else 2  # (the chain's dQ partials are its fp32 accumulators)
            nkv = dq_window_kv_heads(self.total_q, self.H, self.Hk, self.D, self.K, pbytes)
            # KV-head windows (kv0, nkv, first dq-reduce block count): the dQ partials of one window
            # at a time, so the buffer stays within dq_window_kv_heads' bound
            self.dq_windows = tuple((kv0, n, grid_blocks(self.total_q * n * G, self.D))
                                    for kv0, n in ((kv0, min(nkv, self.Hk - kv0)) for kv0 in range(0, self.Hk, nkv)))
            self.layout.add("delta", self.rows * 4)
            # dQ partial of every pair of a window (input dtype)
            self.layout.add("part_dq", self.total_q * nkv * G * self.K * self.D * pbytes)
            self.layout.add("counts", (self.nseg + 1) * 4)
            self.list_cap = _i32(npair, "pair lists")
            if self.chain:
                # the chain's semaphores, one per sub-tile of a (chunk, KV head): index e_lo // 64 +
                # g * Hk + kvh + t (MobaBwdSm90.kernel)
                self.nsem = _i32(self.list_cap // 64 + self.nbound * self.Hk + 2, "dQ chain semaphores")
                self.layout.add("sems", self.nsem * 4)
            # the key-major kernel's linear grid: chunks x key tiles x KV heads of a launch
            _i32(self.nbound * self.ktiles * self.Hk, "sm90 backward grid")
            self.bwd_grid = self.nbound  # chunks the grid covers (a bound on the chunk count)
            # the persistent walk (chunks of one key tile): a grid of at least one CTA per SM per
            # window (its "chunks" times nkv), units from a counter per window, zeroed per call
            self.persistent = (self.ktiles == 1 and not self.chain
                               and bwd_persistent(self.C, self.dtype_name, self.D, self.causal))
            if self.persistent:
                self.layout.add("work", 4 * len(self.dq_windows))
                self.sms = common.sm_count(key[-1])
            # last: a backward given the training forward's list (kept_pairs) allocates without it
            self.layout.add("pairs", npair * 4)
            self.index = None
            # chunks over 128 keys: dK/dV per 128-key tile, dQ by a kernel streaming the tiles, its
            # (chunk, KV head) pairs split over zsplit CTAs
            if self.chain:
                specs = bwd_kernel_specs_sm90_chain(self.dtype_name, self.D, self.causal, self.K)
            elif self.ktiles > 1:
                self.zsplit = max(1, min(64, -(-DQ90_TARGET_CTAS // max(self.nbound * nkv, 1))))
                _i32(self.nbound * self.zsplit, "sm90 dQ grid")
                specs = bwd_kernel_specs_sm90_long(self.dtype_name, self.D, self.causal, self.K)
            else:
                specs = bwd_kernel_specs_sm90(self.dtype_name, self.D, self.causal, self.K,
                                              persistent=self.persistent)
            self.ks = common.KernelSet(specs, arch)
            return
        kbm, kbn, _ = cfg.BWD_DKV_TILES[self.D]
        qbm, _, _ = cfg.BWD_DQ_TILES[self.D]
        self.tiles_per_chunk = (self.C + kbn - 1) // kbn
        self.dkv_grid = _i32(self.nbound * self.tiles_per_chunk, "dK/dV grid")
        self.layout.add("delta", self.rows * 4)
        self.layout.add("dq_acc", self.rows * self.D * 4)
        self.index = _SlotIndexPlan(self.B, self.total_q, self.H, self.K, self.nseg, self.causal, qbm)
        self.ks = common.KernelSet(bwd_kernel_specs(self.dtype_name, self.D, self.causal), arch)

    def bwd_chunks(self, nkv):
        """The one-pass kernel's grid for a window of ``nkv`` KV heads, in chunks (times ``nkv``
        CTAs): one per chunk, or with the persistent walk enough for one CTA per SM."""
        return max(1, min(self.nbound, -(-self.sms // nkv))) if self.persistent else self.bwd_grid


FWD_PLANS = common.PlanCache(FwdPlan)
BWD_PLANS = common.PlanCache(BwdPlan)

def _routing_ptrs(routing):
    """The routing tensors the kernels read (contiguous; held by the caller while it launches)
    and their addresses: cu_seqlens_q, cu_seqlens_k, cu_chunks, selection, offsets, query_rows."""
    ts = [common.contiguous(t) for t in (routing.cu_seqlens_q, routing.cu_seqlens_k, routing.cu_chunks)]
    ts += [common.kernel_input(routing.selection)]  # 16-byte aligned: the sm90 pair lists load vectors
    ts += [common.contiguous(t) for t in (routing.offsets, routing.query_rows)]
    return ts, [t.data_ptr() for t in ts]


def _scale_log2(softmax_scale, D):
    scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    return scale, scale * LOG2_E


# --- entry points ----------------------------------------------------------------------------

def attention_cute(q, k, v, routing, softmax_scale, deterministic, *, out=None, lse=None, keep_index=False,
                   inference=False, consume_routing=False):
    """MoBA forward with the CuTe kernels. Returns ``out`` (total_q, H, D) in q's dtype and the
    fp32 ``lse`` (H, total_q). Deterministic whatever ``deterministic`` says. ``out``/``lse``
    may be given (contiguous, right shape and dtype): tests pass NaN-filled buffers.

    ``keep_index=True`` returns ``(out, lse, index)`` instead: ``index`` is the per-slot index
    the forward built (a uint8 tensor, or None), which :func:`attention_backward_cute` takes to
    skip rebuilding it (4 launches; memory: ``total_q * H * (topk + 1) * 4`` bytes and the
    tile tables, held from the forward to the backward). The sm90 forward's all-slot index is
    not the backward's: it keeps the sm90 backward's pair lists instead (an int32 tensor of
    ``total_q * H * topk``, written by its own pair-list kernel; :func:`kept_pairs_on`), or None.

    ``inference=True`` (no backward will follow): the sm90 forward's partial buffer gets a
    tighter bound (:func:`fwd_partials_bound`), since the forward is then the call's peak.
    ``consume_routing=True`` (the caller made ``routing`` for this call alone and drops it
    after): the sm90 forward writes its pair lists over ``routing.query_rows`` instead of a
    buffer of its own (``total_q * H * topk * 4`` bytes less at the peak)."""
    del deterministic  # both schedules are deterministic by construction
    want_index = keep_index
    q, k, v = (common.kernel_input(t) for t in (q, k, v))
    total_q, H, D = q.shape
    dev = q.device
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(H, total_q, dtype=torch.float32, device=dev)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (H, total_q) and lse.dtype == torch.float32 and lse.is_contiguous()
    if total_q == 0 or H == 0:
        return (out, lse, None) if keep_index else (out, lse)
    key = _plan_key(q, k, routing)
    inference = bool(inference) and not keep_index
    plan = FWD_PLANS.get(key + (inference,), key, common.arch_of(dev), inference)
    _, scale_log2 = _scale_log2(softmax_scale, D)
    ks, ix = plan.ks, plan.index
    stream = common.raw_stream(dev)
    # (the sm90 forward's all-slot index is not the backward's per-slot one; it keeps the sm90
    # backward's pair lists instead, written by its own pair-list kernel beside its lists)
    keep_index = keep_index and not plan.sm90
    kept_pairs = None
    if want_index and plan.sm90 and ix.gather and kept_pairs_on():
        kept_pairs = torch.empty(ix.list_cap, dtype=torch.int32, device=dev)
    rts, (cu_q, cu_k, cu_chunks, sel, p_offsets, p_rows) = _routing_ptrs(routing)
    # (PairListKernel reads each entry before it writes over it: in place is safe)
    in_place = consume_routing and plan.sm90 and rts[5].numel() >= plan.index.list_cap
    held, p = plan.workspace(dev, kept="separate" if keep_index else None, rows_list=p_rows if in_place else None)
    p_out, p_lse = out.data_ptr(), lse.data_ptr()
    B = plan.B
    ix.launch(ks, p, sel, cu_q, cu_chunks, p_out, p_lse, B, total_q, H, plan.K, stream, p_offsets, p_rows,
              bwd_pairs=None if kept_pairs is None else kept_pairs.data_ptr())
    if plan.sm90:
        _forward_sm90(plan, p, q, k, v, p_out, p_lse, cu_q, cu_k, cu_chunks, p_offsets, scale_log2, stream)
        return (out, lse, kept_pairs) if want_index else (out, lse)
    head = (q.data_ptr(), k.data_ptr(), v.data_ptr(), p_out, p_lse, p["oacc"], p["mst"], p["lst"], p["nused"],
            cu_q, cu_k, cu_chunks)
    sizes = (B, total_q, plan.total_k, H, plan.Hk, plan.C, plan.nseg)
    if plan.causal:
        unused = p["nused"]  # the diagonal pass reads no gather-index pointer
        ks["diag"](*head, p["cu_mt"], unused, unused, unused, unused, *sizes, 0, 0, 0, H, 0, total_q, 0,
                   ix.mt_bound, scale_log2, stream)
    if ix.gather:
        for sp in range(ix.npass):
            role = "first" if (not plan.causal and sp == 0) else "pass"
            ks[role](*head, *ix.pass_args(p, sp), *sizes, sp + ix.s0, sp, 0, H, 0, total_q, 0, ix.bound_pass,
                     scale_log2, stream)
    # the scratch goes back to the caching allocator on return, stream-ordered after the launches
    return (out, lse, held[1]) if keep_index else (out, lse)


def _forward_sm90(plan, p, q, k, v, p_out, p_lse, cu_q, cu_k, cu_chunks, p_offsets, scale_log2, stream):
    """The sm90 schedule after the index, per window (``plan.fwd_windows``): the segment kernel
    writes the window's gather pairs' partials; the diagonal kernel (causal) or the merge kernel
    writes the window's out/lse."""
    ks, ix = plan.ks, plan.index
    B, total_q, H = plan.B, plan.total_q, plan.H
    nbound = plan.nbound
    wstart = p.get("wstart", p["seg_off"])  # (read only with windows of query rows)
    for sp, h0, nh, r_lo, r_hi, pbase, t0, grid in plan.fwd_windows:
        if ix.gather:
            ks["seg"](q.data_ptr(), k.data_ptr(), v.data_ptr(), p["part_o"], p["part_lse"], cu_k, cu_chunks,
                      p["pass_tiles"] + 4 * sp, p["rows_list"], p["tile_seg"], p["seg_off"], p["tile_off"], p_offsets,
                      wstart, ix.work_counter(p, sp), B, total_q, plan.total_k, H, plan.Hk, plan.C, ix.kp, nbound,
                      pbase, ix.nrw, plan.seg_grid, scale_log2, stream)
        if plan.causal:
            unused = p["nused"]
            ks["diag"](q.data_ptr(), k.data_ptr(), v.data_ptr(), p_out, p_lse, p["part_o"], p["part_lse"], unused,
                       p["nused"], cu_q, cu_k, cu_chunks, p["cu_mt"], unused, unused, unused, unused, B, total_q,
                       plan.total_k, H, plan.Hk, plan.C, plan.nseg, 0, ix.kp, h0, nh, r_lo, r_hi, t0, grid,
                       scale_log2, stream)
        elif ix.gather:
            ks["merge"](p["part_o"], p["part_lse"], p["nused"], p_out, p_lse, nh * (r_hi - r_lo), total_q, H, ix.kp,
                        h0, r_lo, grid, stream)


def attention_backward_cute(q, k, v, out, lse, dout, dlse, routing, softmax_scale, deterministic, *, dq=None,
                            dk=None, dv=None, index=None):
    """MoBA backward with the CuTe kernels: ``(dq, dk, dv)`` in the input dtype.

    ``dlse`` (H, total_q) or None: the gradient reaching the LSE output. Always bitwise
    deterministic (dK/dV key-major with register accumulation, dQ by slot passes without
    atomics), whatever ``deterministic`` says. ``dq``/``dk``/``dv`` may be given (contiguous,
    right shape and dtype): tests pass NaN-filled buffers. ``index``: what the forward kept
    (``attention_cute(..., keep_index=True)``): the sm80 backward reuses the per-slot index when
    its dQ passes use the same tile height, the sm90 backward the pair lists (for this routing);
    else they are rebuilt. Extra memory: docs/design.md."""
    del deterministic
    q, k, v, out, dout, lse = (common.kernel_input(t) for t in (q, k, v, out, dout, lse))
    if dlse is not None:
        dlse = common.contiguous(dlse.float())
    total_q, H, D = q.shape
    total_k = k.shape[0]
    dev = q.device
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if total_q == 0 or H == 0 or total_k == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return dq, dk, dv
    key = _plan_key(q, k, routing)
    plan = BWD_PLANS.get(key, key, common.arch_of(dev))
    scale, scale_log2 = _scale_log2(softmax_scale, D)
    ks, ix = plan.ks, plan.index
    stream = common.raw_stream(dev)
    # (the training forward's plan: the one whose index the forward kept)
    kept_pairs = None
    if plan.sm90:
        # the sm90 forward's keep: the backward's pair lists, built from this routing
        if (index is not None and index.dtype == torch.int32 and index.numel() == plan.list_cap
                and index.device == dev):
            kept_pairs = index
        index = None
    elif index is not None and not ix.same_as(FWD_PLANS.get(key + (False,), key, common.arch_of(dev)).index):
        index = None
    held, p = plan.workspace(dev, kept=index, pairs=None if kept_pairs is None else kept_pairs.data_ptr())
    rts, (cu_q, cu_k, cu_chunks, sel, p_offsets, p_rows) = _routing_ptrs(routing)
    p_q, p_k, p_v, p_do, p_lse = q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), lse.data_ptr()
    B, Hk, C = plan.B, plan.Hk, plan.C
    rows = plan.rows

    if plan.sm90:
        _backward_sm90(plan, p, q, k, v, out, dout, p_lse, dlse, dq, dk, dv, cu_q, cu_k, cu_chunks, sel, p_offsets,
                       p_rows, scale, scale_log2, stream, kept_pairs is not None)
        return dq, dk, dv
    # delta = rowsum(dO * O) - dlse, dQ_acc = 0
    role = "bwd_prep" if dlse is None else "bwd_prep_dlse"
    ks[role](out.data_ptr(), p_do, p_lse if dlse is None else dlse.data_ptr(), p["delta"], p["dq_acc"], rows,
             total_q, H, plan.row_blocks, stream)
    # dK, dV: key-major, one CTA per (chunk, KV head, key tile)
    if plan.dkv_grid > 0:
        ks["dkv"](p_q, p_k, p_v, p_do, p_lse, p["delta"], dk.data_ptr(), dv.data_ptr(), cu_q, cu_k, cu_chunks,
                  p_offsets, p_rows, B, total_q, total_k,
                  H, Hk, C, plan.tiles_per_chunk, plan.dkv_grid, scale, scale_log2, stream)
    # dQ: slot passes over dQ_acc (the forward's index, or rebuilt)
    if index is None:
        ix.launch(ks, p, sel, cu_q, cu_chunks, dq.data_ptr(), p_lse, B, total_q, H, plan.K, stream)
    head = (p_q, p_k, p_v, p_do, p_lse, p["delta"], p["dq_acc"], cu_q, cu_k, cu_chunks)
    sizes = (B, total_q, total_k, H, Hk, C, plan.nseg)
    if plan.causal:
        unused = p["nused"]
        ks["dq_diag"](*head, p["cu_mt"], unused, unused, unused, unused, *sizes, 0, ix.mt_bound, scale,
                      scale_log2, stream)
    if ix.gather:
        for sp in range(ix.npass):
            ks["dq_pass"](*head, *ix.pass_args(p, sp), *sizes, sp, ix.bound_pass, scale, scale_log2, stream)
    ks["dq_convert"](p["dq_acc"], dq.data_ptr(), rows, plan.row_blocks, stream)
    return dq, dk, dv


def _backward_sm90(plan, p, q, k, v, out, dout, p_lse, dlse, dq, dk, dv, cu_q, cu_k, cu_chunks, sel, p_offsets,
                   p_rows, scale, scale_log2, stream, pairs_given=False):
    """delta; the pair lists of every selected pair (unless the training forward wrote them:
    ``pairs_given``); per window of KV heads, the key-major kernel (dK, dV, per-pair dQ
    partials) and the dQ reduction in slot order."""
    ks = plan.ks
    rows, H, K = plan.rows, plan.H, plan.K
    total_q, total_k = q.shape[0], k.shape[0]
    role = "bwd_prep" if dlse is None else "bwd_prep_dlse"
    # (dq_acc is not zeroed: the pointer is unused)
    ks[role](out.data_ptr(), dout.data_ptr(), p_lse if dlse is None else dlse.data_ptr(), p["delta"], p["delta"],
             rows, total_q, H, plan.row_blocks, stream)
    if plan.nseg > 0 and not pairs_given:
        # (the second list's pointer: a stand-in)
        ks["pair_list"](sel, cu_chunks, p_offsets, p_rows, p["pairs"], p["counts"], p["pairs"], plan.B, total_q, H,
                        plan.Hk, K, plan.nseg, plan.list_cap, stream)
    G = H // plan.Hk
    p_q, p_k, p_v, p_do = q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr()
    if plan.chain:
        ks["zero32"](p["sems"], plan.nsem, min(264, -(-plan.nsem // 256)), stream)
    elif plan.persistent:
        ks["zero32"](p["work"], len(plan.dq_windows), 1, stream)
    if plan.ktiles > 1 and not plan.chain and plan.bwd_grid > 0:
        # dK/dV per 128-key tile, every KV head at once (no dQ partials: dk stands in for them)
        ks["bwd90_dkv"](p_q, p_k, p_v, p_do, p_lse, p["delta"], dk.data_ptr(), dv.data_ptr(), dk.data_ptr(),
                        dk.data_ptr(), cu_q, cu_k, cu_chunks, p_offsets, p["pairs"], plan.B, total_q, total_k, H,
                        plan.Hk, plan.C, K, 0,
                        H, plan.ktiles, plan.bwd_grid, plan.Hk, scale, scale_log2, stream)
    for w, (kv0, nkv, blocks) in enumerate(plan.dq_windows):
        if plan.ktiles > 1 and not plan.chain and plan.bwd_grid > 0:
            ks["dq90"](p_q, p_k, p_v, p_do, p_lse, p["delta"], p["part_dq"], cu_q, cu_k, cu_chunks, p_offsets,
                       p["pairs"], plan.B, total_q, total_k, H, plan.Hk, plan.C, K, kv0, nkv * G, plan.zsplit,
                       plan.bwd_grid, nkv, scale, scale_log2, stream)
        elif plan.bwd_grid > 0:
            # (one key tile per chunk, or the chain's ktiles; sems: the chain's semaphores, the
            # persistent walk's unit counter, else a stand-in)
            sems = p["sems"] if plan.chain else (p["work"] + 4 * w if plan.persistent else p["part_dq"])
            ks["bwd90"](p_q, p_k, p_v, p_do, p_lse, p["delta"], dk.data_ptr(), dv.data_ptr(), p["part_dq"], sems,
                        cu_q, cu_k, cu_chunks, p_offsets, p["pairs"], plan.B, total_q, total_k, H, plan.Hk, plan.C, K,
                        kv0, nkv * G, plan.ktiles, plan.bwd_chunks(nkv), nkv, scale, scale_log2, stream)
        ks["dq_reduce"](p["part_dq"], sel, cu_q, cu_chunks, dq.data_ptr(), plan.B, total_q, H, kv0 * G, nkv * G, K,
                        blocks, stream)
