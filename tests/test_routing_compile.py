"""CPU-only: every shipped routing kernel configuration compiles for sm_90a and sm_80 with
fake arguments, uses the instructions it must (mma.sync, ldmatrix, cp.async, match.sync),
and ptxas reports no spills and no stack frame.

Each distinct compile key is compiled once per arch. The default run covers the full top-k
matrix (head dim x list capacity x causal) for bf16 on sm_90a and a cross-section elsewhere;
``MOBA_FULL_COMPILE=1`` adds the rest of the matrix (both dtypes, both archs; ~10 minutes).
"""

import os
import re

# the ptxas report is printed only when ptxas really runs: no on-disk JIT cache hits here
# (read when the DSL is first imported, so set before anything imports cutlass)
os.environ["CUTE_DSL_NO_CACHE"] = "1"

import pytest  # noqa: E402

from moba_cute.configs import routing as cfg  # noqa: E402

ARCHS = ("sm_90a", "sm_80")


def _compile(spec, arch):
    from moba_cute.kernels.common import compile_for_arch

    key, factory, fake = spec
    return compile_for_arch(factory(), fake, arch)


def _check_clean(rep, what):
    assert rep.spill_stores == 0 and rep.spill_loads == 0, (what, rep.ptxas[-2000:])
    assert rep.stack_frame == 0, (what, rep.ptxas[-2000:])
    assert rep.registers, (what, "no ptxas report captured")


def _rounds_addresses(ptx):
    """Whether the PTX rounds an address up to 16 bytes at run time (``(p + 14) & -16``: what
    ``Pointer.align(16)`` emits when it cannot prove the alignment); the kernels declare their
    16-byte pieces aligned with ``cute.assume`` instead."""
    return re.search(r"add\.s(32|64)\s+(%\w+), %\w+, 14;\s*\n\s*and\.b\1\s+%\w+, \2, -16;", ptx) is not None


def _specs(dtype, d, topk, causal, arch):
    from moba_cute.kernels.route_launch import kernel_specs

    return {s[0]: s for s in kernel_specs(dtype, d, topk, causal, arch)}


@pytest.mark.parametrize("arch", ARCHS)
def test_support_kernels_compile(arch):
    """prep, centroids (every dtype x head dim), block count, column scan, scan, block write."""
    seen = set()
    for dtype in ("bfloat16", "float16"):
        for d in cfg.SUPPORTED_HEAD_DIMS:
            # topk 8 and 6: the key-major passes with and without 16-byte selection loads
            specs = {**_specs(dtype, d, 8, True, arch), **_specs(dtype, d, 6, True, arch)}
            for key, spec in specs.items():
                if key[0] == "topk" or key in seen:
                    continue
                seen.add(key)
                rep = _compile(spec, arch)
                _check_clean(rep, key)
                if key[0] in ("kmcount", "kmwrite"):
                    # warp-aggregated (shuffle + ballot runs) shared-memory atomics, no global
                    # atomics (deterministic)
                    assert "shfl.sync.up" in rep.ptx and "vote.sync.ballot" in rep.ptx, key
                    assert "atom.shared" in rep.ptx or "red.shared" in rep.ptx, key
                    assert "atom.global" not in rep.ptx and "red.global" not in rep.ptx, key
                if key[0] in ("kmcount", "kmwrite") and key[1]:
                    # 16-byte selection loads (topk % 4 == 0)
                    assert "ld.global.v4" in rep.ptx or "ld.global.nc.v4" in rep.ptx, key
                if key[0] in ("centroids", "centroids_prep"):
                    assert "ld.global.v4" in rep.ptx or "ld.global.nc.v4" in rep.ptx, key
                    assert not _rounds_addresses(rep.ptx), key
                if key[0] == "centroids_prep":
                    # the chunk bookkeeping by warp scan (one lane per sequence) instead of a prep launch
                    assert "shfl.sync.up" in rep.ptx and "shfl.sync.idx" in rep.ptx, key
                    assert "vote.sync.ballot" in rep.ptx, key


def _topk_cases(full):
    out = []
    for arch in ARCHS:
        for dtype in ("bfloat16", "float16"):
            for d in cfg.SUPPORTED_HEAD_DIMS:
                for cap in cfg.LIST_CAPS:
                    for causal in (True, False):
                        topk = cap + 1 if causal else cap
                        if topk > 64:
                            topk = 64
                        import torch

                        from moba_cute.kernels.route_launch import route_unsupported_reason

                        tdt = getattr(torch, dtype)
                        if route_unsupported_reason(tdt, d, 64, topk, arch) is not None:
                            continue
                        core = arch == "sm_90a" and dtype == "bfloat16"
                        cross = (d in (64, 128, 256) and cap in (8, 64) and causal) or (
                            d == 128 and dtype == "float16" and not causal and cap == 16)
                        if full or core or cross:
                            out.append(pytest.param(arch, dtype, d, topk, causal,
                                                    id=f"{arch}-{dtype}-d{d}-cap{cap}-{'causal' if causal else 'full'}"))
    return out


@pytest.mark.parametrize("arch,dtype,d,topk,causal", _topk_cases(full=os.environ.get("MOBA_FULL_COMPILE") == "1"))
def test_topk_kernel_compiles(arch, dtype, d, topk, causal):
    specs = _specs(dtype, d, topk, causal, arch)
    key = [k for k in specs if k[0] == "topk"][0]
    rep = _compile(specs[key], arch)
    _check_clean(rep, key)
    if key[10]:
        assert "wgmma.mma_async.sync.aligned.m64n32k16.f32" in rep.ptx, key
    else:
        assert "mma.sync.aligned.m16n8k16" in rep.ptx
    assert "ldmatrix.sync.aligned" in rep.ptx
    assert "cp.async.cg.shared.global" in rep.ptx or "cp.async.ca.shared.global" in rep.ptx
    assert not _rounds_addresses(rep.ptx), key


def _wgmma_cases():
    """Every shipped warpgroup-MMA configuration in bf16 (D = 64 and 128, every register list
    length and both shared-memory capacities, both causal modes), fp16 for D = 128 and a D = 64
    sample."""
    out = []
    for d in (64, 128):
        for causal in (True, False):
            for cap in list(range(1, 17)) + [32, 64]:
                dtypes = ("bfloat16", "float16") if d == 128 or cap in (7, 16) else ("bfloat16",)
                for dtype in dtypes:
                    topk = min(cap + 1 if causal else cap, 64)
                    out.append(pytest.param(dtype, d, topk, causal,
                                            id=f"{dtype}-d{d}-cap{cap}-{'causal' if causal else 'full'}"))
    return out


@pytest.mark.parametrize("dtype,d,topk,causal", _wgmma_cases())
def test_wgmma_topk_kernel_compiles(dtype, d, topk, causal):
    """The sm90 top-k tile (warpgroup MMA, 32 columns, one centroid buffer): compiles without
    spills, within 128 registers where it asks for 4 CTAs per SM; scores with RS wgmma, loads
    the centroid slabs through swizzled cp.async and fences them for the async proxy."""
    specs = _specs(dtype, d, topk, causal, "sm_90a")
    key = [k for k in specs if k[0] == "topk"][0]
    assert key[5:11] == (128, 32, 1, 32, key[9], True), key
    rep = _compile(specs[key], "sm_90a")
    _check_clean(rep, key)
    if key[9] == 4:
        assert ".minnctapersm 4" in rep.ptx
        assert max(rep.registers.values()) <= 128, rep.registers
    assert "wgmma.mma_async.sync.aligned.m64n32k16.f32" in rep.ptx
    assert "wgmma.fence.sync.aligned" in rep.ptx and "wgmma.wait_group.sync.aligned" in rep.ptx
    assert "fence.proxy.async.shared::cta" in rep.ptx
    assert "mma.sync.aligned" not in rep.ptx
    assert not _rounds_addresses(rep.ptx), key


def _tune_cases():
    """The top-k tiles the tuner may choose (configs/routing.py ``topk_tune_tiles``) that the rule
    does not pick on that arch: every mma.sync candidate for D = 64 / 128, causal, bf16, at
    register-list lengths 7 and 16 and shared-memory capacities 32 and 64 on sm_90a, 8 and 64 on
    sm_80 (the warpgroup-MMA tile is the rule's own: test_wgmma_topk_kernel_compiles)."""
    out = []
    for arch, caps in (("sm_90a", (7, 16, 32, 64)), ("sm_80", (8, 64))):
        fam = "sm90" if arch == "sm_90a" else "sm80"
        for d in cfg.TOPK_TUNE_HEAD_DIMS:
            for choice in cfg.topk_tune_tiles(fam, d):
                if choice[3]:
                    continue
                for cap in caps:
                    name = f"{arch}-d{d}-{'x'.join(map(str, choice))}-cap{cap}"
                    out.append(pytest.param(arch, d, choice, cap, id=name))
    return out


@pytest.mark.parametrize("arch,d,choice,cap", _tune_cases())
def test_tune_candidate_topk_kernels_compile(arch, d, choice, cap):
    """Every mma.sync top-k tile the tuner may choose compiles without spills on its arch."""
    from moba_cute.kernels.route_launch import kernel_specs

    topk = min(cap + 1, 64)
    specs = {s[0]: s for s in kernel_specs("bfloat16", d, topk, True, arch, choice=choice)}
    key = [k for k in specs if k[0] == "topk"][0]
    assert key[5:8] == choice[:3] and not key[10], key
    rep = _compile(specs[key], arch)
    _check_clean(rep, key)
    assert "mma.sync.aligned.m16n8k16" in rep.ptx and "ldmatrix.sync.aligned" in rep.ptx
    assert not _rounds_addresses(rep.ptx), key


def test_tune_candidates_resolve_to_themselves():
    """A tuner choice becomes that very tile wherever it fits (every list capacity at the tuned
    head dims), and the built-in choice is the rule's own tile."""
    for fam in ("sm90", "sm80"):
        for d in cfg.TOPK_TUNE_HEAD_DIMS:
            cands = cfg.topk_tune_tiles(fam, d)
            assert len(cands) == len(set(cands)) >= 4
            for cap in list(range(1, 17)) + [32, 64]:
                assert cfg.topk_tile(fam, d, cap, True, cands[0]) == cfg.topk_tile(fam, d, cap)
                for c in cands:
                    t = cfg.topk_tile(fam, d, cap, True, c)
                    assert (t[0], t[1], t[2], int(t[5])) == c and t[3] == 32
    assert cfg.topk_tune_tiles("sm90", 96) == ()
    assert cfg.topk_tune_tiles("sm80", 128)[0] == (128, 32, 2, 0)


def test_tile_choice():
    # sm90 D = 64 / 128: warpgroup MMA, 4 CTAs per SM where 128 registers hold it
    assert cfg.topk_tile("sm90", 128, 7) == (128, 32, 1, 32, 4, True)
    assert cfg.topk_tile("sm90", 128, 12, causal=False) == (128, 32, 1, 32, 4, True)
    assert cfg.topk_tile("sm90", 128, 13) == (128, 32, 1, 32, 0, True)  # would spill at 128
    assert cfg.topk_tile("sm90", 64, 16, causal=False) == (128, 32, 1, 32, 4, True)
    assert cfg.topk_tile("sm90", 128, 64) == (128, 32, 1, 32, 0, True)
    # mma.sync two-stage elsewhere
    assert cfg.topk_tile("sm80", 128, 7) == (128, 32, 2, 32, 0, False)
    assert cfg.topk_tile("sm90", 96, 7) == (128, 32, 2, 32, 0, False)
    assert cfg.topk_tile("sm90", 256, 7)[2] == 2 and not cfg.topk_tile("sm90", 256, 7)[5]


def test_unsupported_reasons():
    import torch

    from moba_cute.kernels.route_launch import route_unsupported_reason as r

    assert r(torch.bfloat16, 128, 128, 8, "sm_90a") is None
    assert r(torch.float16, 64, 16, 1, "sm_80") is None
    assert r(torch.float32, 128, 128, 8, "sm_90a")
    assert r(torch.bfloat16, 80, 128, 8, "sm_90a")
    assert r(torch.bfloat16, 128, 128, 65, "sm_90a")
    assert r(torch.bfloat16, 128, 128, 8, "sm_75")
