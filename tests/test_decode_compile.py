"""CPU/CI: every configuration of the decode-step kernels (kernels/decode.py: scores, attend,
merge; dtype x head dim x varlen/padded x causal) compiles for sm_80 and sm_90a with 16-byte
vector loads of K and no spills; the decode path's limits (configs/decode.py)."""

import pytest

pytest.importorskip("cutlass")

import torch  # noqa: E402

from moba_cute.configs import decode as cfg  # noqa: E402
from moba_cute.kernels import common, decode_launch  # noqa: E402


def _specs():
    seen = {}
    for dtype in ("bfloat16", "float16"):
        for D in cfg.SUPPORTED_HEAD_DIMS:
            for padded in (False, True):
                for causal in (True, False):
                    for g in decode_launch.group_sizes(D):
                        for key, fac, fake in decode_launch.kernel_specs(dtype, D, padded, causal, g).values():
                            seen.setdefault(key, (fac, fake))
    return sorted(seen.items(), key=lambda kv: str(kv[0]))


CASES = [pytest.param(key, spec, arch, id=f"{key}-{arch}") for key, spec in _specs() for arch in ("sm_80", "sm_90a")]


@pytest.mark.parametrize("key,spec,arch", CASES)
def test_decode_kernels_compile_without_spills(key, spec, arch):
    fac, fake = spec
    rep = common.compile_for_arch(fac(), fake, arch)
    assert "Used" in rep.ptxas, "no ptxas report"
    assert rep.spill_stores == 0 and rep.spill_loads == 0, rep.ptxas[-600:]
    assert rep.stack_frame == 0, rep.ptxas[-600:]
    if key[0] in ("decode_scores", "decode_attend"):
        assert "ld.global.v4" in rep.ptx  # K rows in 16-byte pieces
    if key[0] in ("decode_group", "decode_group_mma"):
        assert "cp.async.cg.shared.global" in rep.ptx and ", 16;" in rep.ptx  # 16-byte K/V copies
    if key[0] == "decode_group_mma":
        assert "mma.sync.aligned.m16n8k16" in rep.ptx and "ldmatrix" in rep.ptx


def test_decode_limits():
    r = decode_launch.decode_unsupported_reason
    assert r(torch.bfloat16, 128, 32, 128, 8, 1, 131072) is None
    assert r(torch.float16, 64, 8, 4096, 64, 16, 1 << 20) is None
    assert "float16" in r(torch.float32, 128, 32, 128, 8, 1, 1000)
    assert "head dims" in r(torch.bfloat16, 96, 32, 128, 8, 1, 1000)
    assert "topk" in r(torch.bfloat16, 128, 32, 128, 65, 1, 1000)
    assert "queries" in r(torch.bfloat16, 128, 32, 128, 8, cfg.MAX_QUERIES + 1, 1000)
    assert "chunks" in r(torch.bfloat16, 128, 32, 16, 8, 1, 16 * cfg.MAX_CHUNKS + 1)
    assert "num_heads" in r(torch.bfloat16, 128, 65536, 128, 8, 16, 1000)
    assert r(torch.bfloat16, 128, 8192, 128, 8, 16, 1000) is None
    # chunk scores sized by the longest sequence: refused past 1 GiB, unless topk covers every
    # chunk (no scores then)
    assert "scores" in r(torch.bfloat16, 128, 64, 128, 8, 16, 1 << 20, batch=1000)
    assert r(torch.bfloat16, 128, 64, 128, 8, 16, 1 << 20, batch=10) is None
    assert r(torch.bfloat16, 128, 64, 4096, 64, 16, 1 << 18, batch=10 ** 6) is None


def test_decode_splits_and_groups():
    """Key splits: the count whose waves of CTAs end together (a last wave that fills a few SMs
    costs a whole one), within WAVES CTAs per SM, MAX_SPLITS and a few 32-key pieces per warp;
    head groups take the largest divisor of the GQA group that fits."""
    f = decode_launch.splits_for
    assert f(32, 8 * 4, 132) == 2  # one sequence, C=128, K=8: 32 pieces, two splits of 16
    # one sequence, C=4096, K=12 (32 pairs, 1536 pieces): 4 splits are one wave of 128 CTAs;
    # 9 (the most WAVES allows) would be 288 CTAs, three waves at one CTA per SM
    assert f(32, 12 * 128, 132) == 4
    assert f(32, 12 * 128, 132, resident=2) == 8  # two per SM: 256 CTAs are one wave
    assert f(64, 1025, 132, 4) == 2  # B = 8, 32K, every chunk: 128 CTAs, not 9 splits' 576
    assert f(8, 4096, 132, 2) == 16  # B = 1, 128K, C = 4096 (union bound of 32 chunks)
    assert f(2048, 32, 132) == 1  # enough (row, head) pairs: no split, no merge
    assert f(1, 10 ** 6, 132) == cfg.MAX_SPLITS
    for pairs in (1, 3, 8, 32, 64, 200, 4096):
        for pieces in (1, 16, 33, 1025, 4096, 10 ** 5):
            for waves in cfg.WAVE_CHOICES:
                s = f(pairs, pieces, 132, waves)
                assert 1 <= s <= cfg.MAX_SPLITS
                assert s == 1 or (s <= -(-waves * 132 // pairs)
                                  and pieces > (s - 1) * cfg.MIN_PIECES_PER_WARP * cfg.ATTEND_WARPS)
    g = decode_launch.head_group
    assert g(32, 8, 256) == 4 and g(32, 4, 256) == 4 and g(24, 8, 256) == 3 and g(32, 16, 256) == 2
    assert g(32, 32, 256) == 1 and g(28, 4, 256) == 1 and g(16, 1, 256) == 4
    # tensor cores: up to 16 heads, powers of two
    assert g(32, 8, 128) == 4 and g(32, 4, 64) == 8 and g(32, 2, 128) == 16 and g(64, 1, 32) == 16
    assert g(24, 8, 128) == 1 and g(48, 4, 128) == 4


def test_decode_attend_launch():
    """Which attend kernel a call runs, and its key splits (each kernel deals a row's actual work
    out evenly over them)."""
    from types import SimpleNamespace

    def plan(D=128, C=4096, group=4, group_ok=True):
        tile = decode_launch.group_tile(D)
        return SimpleNamespace(group=group, tile=tile, per=-(-C // cfg.KEYS_PER_PIECE), sms=132, group_ok=group_ok,
                               waves=cfg.WAVES, resident=decode_launch.group_resident(D, cfg.GROUP_MMA_WARPS))

    f = decode_launch.attend_launch
    L = 128 * 1024 + 1
    # C=4096, K=12 at 128K: 33 chunks, the union of 4 heads' selections
    assert f(12, 33, 4096, L, 1, 32, plan()) == ("group_select", 4, 16)  # one wave of 128 CTAs
    # the union bound: 2 heads of 3 chunks each out of 33 -> at most 6 chunks of whole tiles
    # 2 heads of 3 chunks each: the union bound is 6 chunks (768 pieces) over 16 (row, head) pairs
    role, gt, splits = f(3, 33, 4096, L, 1, 32, plan(group=2))
    assert gt == 2 and splits == decode_launch.splits_for(16, 6 * 4096 // 32, 132)
    # topk covers every chunk: no selection, every key
    assert f(12, 8, 4096, 32 * 1024 + 1, 8, 32, plan()) == ("group", 4, 2)
    assert f(1, 1, 32785, 32785, 1, 32, plan(C=32785))[0] == "group"  # a dense layer
    # small chunks, or too many chunks for the group kernel's shared memory: one CTA per head
    assert f(8, 1025, 128, L, 8, 32, plan(C=128)) == ("attend", 1, 1)  # 256 (row, head) CTAs
    assert f(8, cfg.GROUP_MAX_CHUNKS + 1, 1024, (cfg.GROUP_MAX_CHUNKS + 1) * 1024, 1, 32, plan(C=1024))[0] == "attend"
    assert f(8, 64, cfg.GROUP_SELECT_MIN_CHUNK - 1, L, 1, 32, plan(C=1023))[0] == "attend"
    # GPUs with 99 KB of shared memory per block: the per-head kernel, also over every chunk
    assert f(12, 8, 4096, 32 * 1024 + 1, 8, 32, plan(group_ok=False))[:2] == ("attend", 1)
    assert f(12, 33, 4096, L, 1, 32, plan(group_ok=False))[:2] == ("attend", 1)
    for D in cfg.SUPPORTED_HEAD_DIMS:
        for g in decode_launch.group_sizes(D):
            assert decode_launch.group_smem_bytes(D, g) <= 166912  # within an A100's block
    assert plan(D=256).tile == 32 // (256 // 8) * cfg.GROUP_KEYS_PER_LANE  # 8 keys per lane group
    assert all(plan(D=D).tile == 16 for D in cfg.GROUP_MMA_HEAD_DIMS)  # the m16n8k16 key tile


def test_decode_group_mma_three_stages_compile():
    """GROUP_MMA_STAGES = 3 (two 16-key tiles in flight per warp; measured no faster than 2 on the
    H200) still fits: the largest configuration compiles without spills within sm90's shared memory."""
    pytest.importorskip("cutlass")
    assert decode_launch.group_smem_bytes(128, 16, 3) <= 232448
    specs = decode_launch.kernel_specs("bfloat16", 128, False, True, 16, stages=3)
    for role in ("group", "group_select"):
        key, fac, fake = specs[role]
        assert key[-2:] == (3, cfg.GROUP_MMA_WARPS)
        rep = common.compile_for_arch(fac(), fake, "sm_90a")
        assert rep.spill_stores == 0 and rep.spill_loads == 0 and rep.stack_frame == 0, rep.ptxas[-600:]
