"""CPU/CI: every shipped configuration of the sm90 MoBA forward (the segment kernel, the all-slot index,
the merging diagonal on mma.sync and on wgmma, and the non-causal merge) compiles for sm_90a with fake
arguments, without spills; the segment kernel's and the wgmma diagonal's PTX holds the Hopper
instructions they are built on (wgmma, TMA, setmaxnreg, cp.async arriving on an mbarrier)."""

import pytest

pytest.importorskip("cutlass")

from moba_cute.configs import attention_sm90 as cfg90  # noqa: E402
from moba_cute.kernels import attention_launch as launch  # noqa: E402
from moba_cute.kernels import common  # noqa: E402
from moba_cute.kernels.moba_fwd_sm90 import SegVariant  # noqa: E402


def _seg(dtype, D, causal, tile, **switches):
    """The segment kernel's (key, factory, fake args) with the loop switches ``switches``."""
    return launch.kernel_specs_sm90(dtype, D, causal, tile, variant=SegVariant(**switches))["seg"]


def _specs():
    seen = {}
    for dtype in ("bfloat16", "float16"):
        for D in cfg90.SUPPORTED_HEAD_DIMS:
            for causal in (True, False):
                for tile in (cfg90.FWD_TILES[D],) + cfg90.ALT_TILES.get(D, ()):
                    # the staged epilogue (the default); row_windows adds the index's window counts
                    specs = launch.kernel_specs_sm90(dtype, D, causal, tile, row_windows=True)
                    for key, fac, fake in specs.values():
                        seen.setdefault(key, (fac, fake))
                # the fragment stores (MOBA_CUTE_FWD_STAGED=0), shipped tile
                key, fac, fake = _seg(dtype, D, causal, cfg90.FWD_TILES[D], staged=False)
                seen.setdefault(key, (fac, fake))
                # the causal diagonal on wgmma (MOBA_CUTE_FWD_DIAG_SM90=1), its merge from global
                # memory and staged in shared memory (MOBA_CUTE_FWD_DIAG_STAGED)
                if causal:
                    for staged in (False, True):
                        key, fac, fake = launch.kernel_specs_sm90(dtype, D, True, cfg90.FWD_TILES[D], diag_sm90=True,
                                                                  diag_staged=staged)["diag"]
                        assert key[0] == "moba_diag_sm90" and (key[-1] == "staged") == staged
                        seen.setdefault(key, (fac, fake))
                    # ... with the overlapped n-block loop (MOBA_CUTE_FWD_DIAG_OVERLAP=1)
                    key, fac, fake = launch.kernel_specs_sm90(dtype, D, True, cfg90.FWD_TILES[D], diag_sm90=True,
                                                              diag_staged=True, diag_overlap=True)["diag"]
                    assert key[-2:] == ("staged", "overlap") and fac().split_kv
                    seen.setdefault(key, (fac, fake))
                    # ... with its tiles interleaved (MOBA_CUTE_FWD_DIAG_INTERLEAVE=1)
                    key, fac, fake = launch.kernel_specs_sm90(dtype, D, True, cfg90.FWD_TILES[D], diag_sm90=True,
                                                              diag_staged=True, diag_interleave=True)["diag"]
                    assert key[-2:] == ("staged", "ilv") and fac().interleave
                    seen.setdefault(key, (fac, fake))
                # the intra-warpgroup overlap (MOBA_CUTE_FWD_OVERLAP=1) of the two-stage tiles
                for tile in cfg90.ALT_TILES.get(D, ()):
                    if len(tile) == 3 and tile[2] >= 2:
                        key, fac, fake = _seg(dtype, D, causal, tile, overlap=True)
                        assert key[-1] == "overlap"
                        seen.setdefault(key, (fac, fake))
                # Q in registers for streamed n-blocks (MOBA_CUTE_FWD_QREGS=1), one-consumer tiles
                for tile in (cfg90.FWD_TILES[D],) + cfg90.ALT_TILES.get(D, ()):
                    if len(tile) == 3 and tile[0] <= 64:
                        key, fac, fake = _seg(dtype, D, causal, tile, q_regs=True)
                        assert key[-1] == "qregs"
                        seen.setdefault(key, (fac, fake))
                    if len(tile) == 3:
                        # K/V multicast in clusters of two CTAs (MOBA_CUTE_FWD_MULTICAST=1)
                        key, fac, fake = _seg(dtype, D, causal, tile, mcast=2)
                        assert key[-1] == "mc2"
                        seen.setdefault(key, (fac, fake))
                    if len(tile) == 3 and tile[2] >= 2:  # ... with the overlap
                        key, fac, fake = _seg(dtype, D, causal, tile, overlap=True, mcast=2)
                        assert key[-2:] == ("overlap", "mc2")
                        seen.setdefault(key, (fac, fake))
                # the persistent walk of one-stage tiles (MOBA_CUTE_FWD_PERSISTENT=1)
                for tile in (cfg90.FWD_TILES[D],) + cfg90.ALT_TILES.get(D, ()):
                    if len(tile) == 3 and tile[2] == 1:
                        key, fac, fake = _seg(dtype, D, causal, tile, persistent=True)
                        assert key[-1] == "persist" and fac().persistent and fac().split_kv
                        seen.setdefault(key, (fac, fake))
                # the rescale skip (MOBA_CUTE_FWD_RESCALE_SKIP=1) in every streamed loop: each
                # tile's, the overlap's and the clusters'
                for tile in (cfg90.FWD_TILES[D],) + cfg90.ALT_TILES.get(D, ()):
                    kws = [{}]
                    if len(tile) == 3:
                        kws += [{"mcast": 2}] + ([{"overlap": True}] if tile[2] >= 2 else [])
                    for kw in kws:
                        key, fac, fake = _seg(dtype, D, causal, tile, rescale_skip=True, **kw)
                        assert key[-1] == "rskip" and fac().rescale_skip
                        seen.setdefault(key, (fac, fake))
    return sorted(seen.items(), key=lambda kv: str(kv[0]))


SPECS = _specs()


@pytest.mark.parametrize("key,spec", [pytest.param(k, s, id=str(k)) for k, s in SPECS])
def test_sm90_forward_compiles_without_spills(key, spec):
    fac, fake = spec
    rep = common.compile_for_arch(fac(), fake, "sm_90a")
    assert "Used" in rep.ptxas, "no ptxas report"
    assert rep.spill_stores == 0 and rep.spill_loads == 0, rep.ptxas[-600:]
    assert rep.stack_frame == 0, rep.ptxas[-600:]
    if key[0] in ("moba_fwd_sm90", "moba_diag_sm90"):
        for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "setmaxnreg.inc", "setmaxnreg.dec",
                      "cp.async.mbarrier.arrive"):
            assert instr in rep.ptx, instr
        # no wgmma serialized by ptxas (the streamed path overlaps QK^T, PV and the softmax)
        assert "C7520" not in rep.ptxas, [ln for ln in rep.ptxas.splitlines() if "C7520" in ln][:1]
        if key[0] == "moba_fwd_sm90":  # Q in registers: ldmatrix from the swizzled Q ring
            assert ("ldmatrix" in rep.ptx) == ("qregs" in key)
            # the rescale skip: one warp vote per streamed n-block
            assert ("vote.sync.any" in rep.ptx) == ("rskip" in key)
            # multicast: TMA to the cluster, cluster-wide barrier init, releases on the peer's barriers
            for instr in ("multicast::cluster", "barrier.cluster.wait", "mapa.shared::cluster"):
                assert (instr in rep.ptx) == ("mc2" in key), instr


def test_sm90_configs_fit_their_ctas_per_sm():
    for D in cfg90.FWD_TILES:
        for tile in (cfg90.FWD_TILES[D],) + cfg90.ALT_TILES.get(D, ()):
            bn, sub, kst, nw = launch.sm90_tile_fields(tile)
            smem = cfg90.fwd_smem_bytes(D, bn, kst, staged=nw == 1, consumers=nw)
            assert cfg90.ctas_per_sm(tile) * smem <= cfg90.SMEM_PER_SM, (D, tile)
            assert sub >= 1 and bn % 16 == 0 and kst >= 1 and nw in (1, 2) and len(tile) in (3, 4)


def test_sm90_pair_kernel_for_four_field_tiles():
    """A fourth tile field 2 builds the two-consumer kernel (one 384-thread CTA per SM, its own
    compile key); three fields the one-consumer kernel."""
    from moba_cute.kernels.moba_fwd_sm90 import MobaFwdSm90, MobaFwdSm90Pair

    key, fac, _ = launch.kernel_specs_sm90("bfloat16", 128, True, (128, 8, 2, 2))["seg"]
    kern = fac()
    assert isinstance(kern, MobaFwdSm90Pair) and key[-2:] == ("pair", "pingpong") and kern.pingpong
    assert (kern.THREADS, kern.CTAS, kern.NW, kern.QS) == (384, 1, 2, 4)
    assert kern.PRODUCER_REGS * 128 + kern.CONSUMER_REGS * 256 <= (65536 // 384) // 8 * 8 * 384
    key1, fac1, _ = launch.kernel_specs_sm90("bfloat16", 128, True, (128, 8, 2))["seg"]
    assert type(fac1()) is MobaFwdSm90 and key1 != key
    assert launch.sm90_tile_fields((128, 8, 2)) == (128, 8, 2, 1)
    assert fac1().overlap is False and kern.overlap is True  # one consumer: only when asked for
    _, fac_o, _ = _seg("bfloat16", 128, True, (128, 8, 1), overlap=True)
    assert fac_o().overlap is False  # one K/V stage cannot overlap


def test_fwd_q_regs_env_and_key(monkeypatch):
    """``MOBA_CUTE_FWD_QREGS`` (default ``configs/attention_sm90.FWD_Q_REGS``); the overlapped loop
    keeps Q in shared memory, so an overlapped kernel neither takes the flag nor its key."""
    from moba_cute.kernels.moba_fwd_sm90 import MobaFwdSm90

    _check_flag(monkeypatch, "MOBA_CUTE_FWD_QREGS", launch.fwd_q_regs, bool(cfg90.FWD_Q_REGS))
    key, fac, _ = _seg("bfloat16", 128, True, (64, 8, 2), q_regs=True)
    assert key[-1] == "qregs" and fac().q_regs
    key, fac, _ = _seg("bfloat16", 128, True, (64, 8, 2), overlap=True, q_regs=True)
    assert key[-1] == "overlap" and not fac().q_regs
    key, fac, _ = _seg("bfloat16", 128, True, (128, 8, 1), q_regs=True)
    assert key[-1] == "staged" and not fac().q_regs  # 128-key n-blocks: no registers for Q
    assert MobaFwdSm90.compile_key("bfloat16", 128, 64, 8, 2, SegVariant(q_regs=True))[-2:] == ("staged", "qregs")


def test_fwd_rescale_skip_env_and_key(monkeypatch):
    """``MOBA_CUTE_FWD_RESCALE_SKIP`` (default ``configs/attention_sm90.FWD_RESCALE_SKIP``) and
    the segment kernel's compile key, one- and two-consumer tiles."""
    _check_flag(monkeypatch, "MOBA_CUTE_FWD_RESCALE_SKIP", launch.fwd_rescale_skip, bool(cfg90.FWD_RESCALE_SKIP))
    for tile in ((64, 8, 2), (128, 8, 2, 2)):
        on = _seg("bfloat16", 128, True, tile, rescale_skip=True)
        off = _seg("bfloat16", 128, True, tile)
        assert on[0] == off[0] + ("rskip",) and on[1]().rescale_skip and not off[1]().rescale_skip


def _check_flag(monkeypatch, name, flag, default):
    """A 0/1 environment switch: its default, both values, and a clear error for anything else."""
    monkeypatch.delenv(name, raising=False)
    assert flag() is default
    for env, want in (("1", True), ("0", False)):
        monkeypatch.setenv(name, env)
        assert flag() is want
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=name):
        flag()
    monkeypatch.delenv(name)


def test_fwd_kv_multicast_env_and_key(monkeypatch):
    """``MOBA_CUTE_FWD_MULTICAST`` (default: chunks of ``configs/attention_sm90.FWD_KV_MULTICAST_MIN_CHUNK``
    keys or more, without the overlap): clusters of two CTAs for one-consumer tiles, with or without
    the overlapped loop when forced; the pair tile keeps one CTA."""
    from moba_cute.kernels.moba_fwd_sm90 import MobaFwdSm90Pair

    lo = cfg90.FWD_KV_MULTICAST_MIN_CHUNK
    _check_flag(monkeypatch, "MOBA_CUTE_FWD_MULTICAST", lambda: launch.fwd_kv_multicast(lo), True)
    _check_flag(monkeypatch, "MOBA_CUTE_FWD_MULTICAST", lambda: launch.fwd_kv_multicast(lo - 64), False)
    assert launch.fwd_kv_multicast(2 * lo) is True and launch.fwd_kv_multicast(128) is False
    assert launch.fwd_kv_multicast(lo, overlap=True) is False  # (slower with the overlap)
    monkeypatch.setenv("MOBA_CUTE_FWD_MULTICAST", "1")
    assert launch.fwd_kv_multicast(128, overlap=True) is True
    monkeypatch.delenv("MOBA_CUTE_FWD_MULTICAST")
    key, fac, _ = _seg("bfloat16", 128, True, (64, 8, 2), mcast=2)
    assert key[-1] == "mc2" and fac().CL == 2
    key, fac, _ = _seg("bfloat16", 128, True, (64, 8, 2), overlap=True, mcast=2)
    assert key[-2:] == ("overlap", "mc2") and fac().CL == 2 and fac().overlap
    _, fac, _ = _seg("bfloat16", 128, True, (128, 8, 2, 2), mcast=2)
    assert isinstance(fac(), MobaFwdSm90Pair) and fac().CL == 1


def test_fwd_persistent_env_and_key(monkeypatch):
    """``MOBA_CUTE_FWD_PERSISTENT`` (default ``configs/attention_sm90.FWD_PERSISTENT``) applies to
    chunks of one n-block; the variant takes it only for one-stage one-consumer tiles with the
    staged epilogue and no clusters, and then has its own compile key."""
    from moba_cute.kernels.moba_fwd_sm90 import MobaFwdSm90Pair

    _check_flag(monkeypatch, "MOBA_CUTE_FWD_PERSISTENT", lambda: launch.fwd_persistent(128, 128),
                bool(cfg90.FWD_PERSISTENT))
    monkeypatch.setenv("MOBA_CUTE_FWD_PERSISTENT", "1")
    assert launch.fwd_persistent(128, 128) and launch.fwd_persistent(16, 128)
    assert not launch.fwd_persistent(129, 128)  # a streamed chunk
    monkeypatch.delenv("MOBA_CUTE_FWD_PERSISTENT")
    on = _seg("bfloat16", 128, True, (128, 8, 1), persistent=True)
    off = _seg("bfloat16", 128, True, (128, 8, 1))
    assert on[0] == off[0] + ("persist",) and on[1]().persistent and not off[1]().persistent
    for tile, kw in (((64, 8, 2), {}), ((128, 8, 1), {"staged": False}), ((128, 8, 1), {"mcast": 2}),
                     ((128, 8, 2, 2), {})):
        key, fac, _ = _seg("bfloat16", 128, True, tile, persistent=True, **kw)
        assert "persist" not in key and not fac().persistent, (tile, kw)
    assert not MobaFwdSm90Pair.takes(SegVariant(persistent=True)).persistent


def test_fwd_overlap_env(monkeypatch):
    _check_flag(monkeypatch, "MOBA_CUTE_FWD_OVERLAP", launch.fwd_overlap, False)


def test_fwd_diag_sm90_env(monkeypatch):
    """The wgmma diagonal serves chunks from ``DIAG_MIN_CHUNK`` keys on; ``MOBA_CUTE_FWD_DIAG_SM90``
    forces either kernel (same role, same arguments); the non-causal set has no diagonal."""
    from moba_cute.kernels.moba_fwd_diag_sm90 import MobaDiagSm90
    from moba_cute.kernels.moba_fwd_sm80 import MobaFwdSm80

    monkeypatch.delenv("MOBA_CUTE_FWD_DIAG_SM90", raising=False)
    lo = cfg90.DIAG_MIN_CHUNK
    assert launch.fwd_diag_sm90(lo) is True and launch.fwd_diag_sm90(4096) is True
    assert launch.fwd_diag_sm90(lo - 16) is False and launch.fwd_diag_sm90(64) is False
    monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_SM90", "1")
    assert launch.fwd_diag_sm90(64) is True
    monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_SM90", "0")
    assert launch.fwd_diag_sm90(4096) is False
    monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_SM90", "on")
    with pytest.raises(ValueError, match="MOBA_CUTE_FWD_DIAG_SM90"):
        launch.fwd_diag_sm90(4096)
    on = launch.kernel_specs_sm90("bfloat16", 128, True, diag_sm90=True)
    off = launch.kernel_specs_sm90("bfloat16", 128, True)
    assert isinstance(on["diag"][1](), MobaDiagSm90) and isinstance(off["diag"][1](), MobaFwdSm80)
    assert len(on["diag"][2]) == len(off["diag"][2])  # one launch call serves both
    assert "diag" not in launch.kernel_specs_sm90("bfloat16", 128, False, diag_sm90=True)
    kern = on["diag"][1]()
    bn, kst = cfg90.DIAG_TILES[128]
    assert (kern.BN, kern.KS, kern.QS, kern.CTAS) == (bn, kst, 1, 2)
    smem = 64 * 128 * 2 + kst * 2 * bn * 128 * 2 + 1024 + 128
    assert kern.CTAS * smem <= cfg90.SMEM_PER_SM
    # the staged merge: its default, the environment, and one more 64-row buffer (padded rows)
    _check_flag(monkeypatch, "MOBA_CUTE_FWD_DIAG_STAGED", launch.fwd_diag_staged, bool(cfg90.DIAG_STAGED_MERGE))
    staged = launch.kernel_specs_sm90("bfloat16", 128, True, diag_sm90=True, diag_staged=True)["diag"]
    ks = staged[1]()
    assert ks.staged_merge and not kern.staged_merge and staged[0] != on["diag"][0]
    bufs = 2 * (kst * bn * 128 // (64 * ks.prow())) + 1
    assert bufs >= 2, "at least one slot in flight while one is merged"
    assert ks.CTAS * (smem + 2 * 64 * 4 + 64 * ks.prow() * 2) <= cfg90.SMEM_PER_SM
    # the overlapped loop: its default, the environment; V's ring barriers besides K's
    _check_flag(monkeypatch, "MOBA_CUTE_FWD_DIAG_OVERLAP", launch.fwd_diag_overlap, bool(cfg90.DIAG_OVERLAP))
    ov = launch.kernel_specs_sm90("bfloat16", 128, True, diag_sm90=True, diag_staged=True, diag_overlap=True)["diag"]
    assert ov[0] == staged[0] + ("overlap",) and ov[1]().overlap and not ks.overlap
    # the interleaved tile order: its default, the environment
    _check_flag(monkeypatch, "MOBA_CUTE_FWD_DIAG_INTERLEAVE", launch.fwd_diag_interleave, bool(cfg90.DIAG_INTERLEAVE))
    il = launch.kernel_specs_sm90("bfloat16", 128, True, diag_sm90=True, diag_staged=True, diag_interleave=True)["diag"]
    assert il[0] == staged[0] + ("ilv",) and il[1]().interleave and not ks.interleave


def test_sm90_tiles_env(monkeypatch):
    monkeypatch.setenv("MOBA_CUTE_SM90_TILES", "128,8,2,2")
    assert launch.sm90_tiles(128) == (128, 8, 2, 2)
    for bad in ("128,8", "128,8,2,3", "128,8,0", "a,b,c", "128,8,2,2,1"):
        monkeypatch.setenv("MOBA_CUTE_SM90_TILES", bad)
        with pytest.raises(ValueError, match="MOBA_CUTE_SM90_TILES"):
            launch.sm90_tiles(128)


def test_sm90_dispatch():
    assert launch.uses_sm90("bfloat16", 128, "sm_90a")
    assert launch.uses_sm90("float16", 64, "sm_90a")
    assert not launch.uses_sm90("bfloat16", 96, "sm_90a")  # no sm90 tiles: the sm80 passes
    assert not launch.uses_sm90("bfloat16", 128, "sm_80")
    assert not launch.uses_sm90("bfloat16", 128, "sm_100a")  # no wgmma on Blackwell
    assert "sm90" in launch.KERNEL_FAMILIES
