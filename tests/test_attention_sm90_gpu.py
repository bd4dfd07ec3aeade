"""GPU: the sm90 forward (segment kernel + merge) on the shapes that stress its own parts -- chunks
longer than one n-block (streamed K/V), chunks shorter than one (V tail zeroed), segments of many work
units, topk up to 64, GQA 8:1 -- against the fp32 reference (SPEC section 3, via test_attention_gpu's
check); the sm80 fallback on Hopper; and that a non-finite value in keys nobody attends (the next
sequence, read by a partial TMA box) does not leak."""

import pytest
import torch

from moba_cute import reference
from helpers import make_batch
from test_attention_gpu import _check

pytestmark = pytest.mark.gpu


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="sm90 kernels need a Hopper GPU")

CASES = [
    # lens_q, lens_k, H, Hk, C, K, causal
    ([3000, 1100], [3000, 1100], 2, 2, 256, 6, True),  # 2 n-blocks per chunk
    ([2500], [2500], 2, 1, 512, 4, True),  # 4 n-blocks, GQA 2:1
    ([777, 300], [777, 300], 8, 1, 48, 5, True),  # C < BN: V tail, GQA 8:1
    ([4096], [4096], 2, 2, 16, 64, True),  # topk 64, tiny chunks
    ([5000], [5000], 1, 1, 128, 2, True),  # big segments: many units of one chunk
    ([1500, 900], [1200, 900], 4, 4, 96, 3, False),
    ([600], [600], 2, 2, 256, 40, False),  # topk above the chunk count
    ([4500, 700], [4500, 700], 4, 2, 1024, 3, True),  # 8 n-blocks a chunk, odd sub-tile counts
    ([2000, 700], [2000, 700], 4, 2, 320, 3, True),  # 3 n-blocks, the last one a V tail
]


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_sm90_forward(case, D, dtype):
    from moba_cute.kernels import attention_launch as m

    lq, lk, H, Hk, C, K, causal = CASES[case]
    _check(lq, lk, H, Hk, D, C, K, causal, dtype, seed=100 + case)
    key = next(k for k in m.FWD_PLANS.plans if k[1] == sum(lq) and k[7] == C and k[8] == K)
    assert m.FWD_PLANS.plans[key].sm90


@needs_hopper
@pytest.mark.parametrize("tile", ["builtin", "64,8,2"])
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_long_chunk_defaults(D, tile, monkeypatch):
    """Chunks of ``FWD_KV_MULTICAST_MIN_CHUNK`` keys: the plan takes the built-in long-chunk tile
    (the pair tile), and a one-consumer tile there runs with K/V multicast by default; both give
    the reference's result (a sequence ending inside a chunk, a short one inside its first)."""
    from moba_cute.configs import attention_sm90 as cfg90
    from moba_cute.kernels import attention_launch as m

    monkeypatch.delenv("MOBA_CUTE_FWD_MULTICAST", raising=False)
    monkeypatch.delenv("MOBA_CUTE_FWD_OVERLAP", raising=False)
    if tile == "builtin":
        monkeypatch.delenv("MOBA_CUTE_SM90_TILES", raising=False)
    else:
        monkeypatch.setenv("MOBA_CUTE_SM90_TILES", tile)
    C = cfg90.FWD_KV_MULTICAST_MIN_CHUNK
    lens = [4 * C + 700, C // 2 + 33]
    m.FWD_PLANS.clear()
    try:
        _check(lens, lens, 4, 2, D, C, 3, True, torch.bfloat16, seed=77)
        plans = [p for k, p in m.FWD_PLANS.plans.items() if k[1] == sum(lens) and k[7] == C]
        assert plans and all(p.sm90 for p in plans)
        if tile == "builtin":
            assert all(p.tile == cfg90.FWD_LONG_CHUNK_TILES[D][1] and p.variant.mcast == 1 for p in plans)
        else:
            assert all(p.tile == (64, 8, 2) and p.variant.mcast == 2 for p in plans)
    finally:
        m.FWD_PLANS.clear()


@needs_hopper
def test_sm80_fallback_on_hopper(monkeypatch):
    from moba_cute.kernels import attention_launch as m

    monkeypatch.setenv("MOBA_CUTE_FWD_SM80", "1")
    m.FWD_PLANS.clear()
    try:
        _check([700, 300], [700, 300], 4, 2, 128, 128, 4, True, torch.bfloat16)
        assert not any(p.sm90 for p in m.FWD_PLANS.plans.values())
    finally:
        monkeypatch.delenv("MOBA_CUTE_FWD_SM80")
        m.FWD_PLANS.clear()


@needs_hopper
def test_unattended_inf_does_not_leak():
    from moba_cute.kernels.attention_launch import attention_cute

    # sequence 0 has 200 keys: its last chunk (128..199), which every row of it selects
    # (non-causal, topk = chunks), is a partial 128-key TMA box that also covers sequence 1's
    # first keys, which hold inf in V
    lens = [200, 300]
    q, k, v, cq, ck = make_batch(lens, lens, 2, 2, 128, dtype=torch.bfloat16, device="cuda", seed=7)
    v[200:260] = float("inf")
    r = reference.route(q, k, cq, ck, 300, 300, 128, 2, False)
    o, _ = attention_cute(q, k, v, r, None, False)
    o32, _ = reference.attention(q, k, v, r)
    olp, _ = reference.attention(q, k, v, r, compute_dtype=torch.bfloat16)
    assert torch.isfinite(o[:200]).all()
    err = (o[:200].double() - o32[:200].double()).abs().max().item()
    ref_err = (olp[:200].double() - o32[:200].double()).abs().max().item()
    assert err <= 2 * ref_err + 1e-5


@needs_hopper
@pytest.mark.parametrize("case", [0, 1, 2, 3, 5, 7, 8])
def test_sm90_alternative_tiles(case, monkeypatch):
    """The alternative tiles of configs/attention_sm90.py (among them two consumer warpgroups),
    on the cases that stream K/V (2, 3, 4 and 8 n-blocks a chunk), zero V tails, use topk 64,
    and run non-causal."""
    from moba_cute.configs import attention_sm90 as cfg90
    from moba_cute.kernels import attention_launch as m

    lq, lk, H, Hk, C, K, causal = CASES[case]
    for D in (64, 128):
        for tile in cfg90.ALT_TILES.get(D, ()):
            monkeypatch.setenv("MOBA_CUTE_SM90_TILES", ",".join(str(x) for x in tile))
            m.FWD_PLANS.clear()
            try:
                _check(lq, lk, H, Hk, D, C, K, causal, torch.bfloat16, seed=200 + case)
            finally:
                monkeypatch.delenv("MOBA_CUTE_SM90_TILES")
                m.FWD_PLANS.clear()


@needs_hopper
@pytest.mark.parametrize("tiles", [((128, 8, 1), (128, 8, 2, 2)), ((64, 8, 1), (64, 8, 2))],
                         ids=["pair", "overlap"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", [0, 1, 2, 5, 7, 8])
def test_sm90_streamed_bitwise(case, D, tiles, monkeypatch):
    """Same n-blocks, same arithmetic order, so out and lse bitwise equal: two consumer
    warpgroups sharing each n-block (tile (128, 8, 2, 2)) against one warpgroup (the shipped
    (128, 8, 1)), and the intra-warpgroup overlap of a two-stage tile ((64, 8, 2) with
    ``MOBA_CUTE_FWD_OVERLAP=1``) against one block after the other ((64, 8, 1)); chunks of one
    n-block and of several."""
    from moba_cute.kernels import attention_launch as m
    from moba_cute.kernels.attention_launch import attention_cute

    lq, lk, H, Hk, C, K, causal = CASES[case]
    q, k, v, cq, ck = make_batch(lq, lk, H, Hk, D, dtype=torch.bfloat16, device="cuda", seed=400 + case)
    r = reference.route(q, k, cq, ck, max(lq), max(lk), C, K, causal)
    res = {}
    monkeypatch.setenv("MOBA_CUTE_FWD_OVERLAP", "1")
    for tile in tiles:
        monkeypatch.setenv("MOBA_CUTE_SM90_TILES", ",".join(map(str, tile)))
        m.FWD_PLANS.clear()
        try:
            res[tile] = attention_cute(q, k, v, r, None, False)
            assert all(p.tile == tile for p in m.FWD_PLANS.plans.values())
        finally:
            monkeypatch.delenv("MOBA_CUTE_SM90_TILES")
            m.FWD_PLANS.clear()
    (o1, l1), (o2, l2) = res.values()
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    o32, _ = reference.attention(q, k, v, r)
    olp, _ = reference.attention(q, k, v, r, compute_dtype=torch.bfloat16)
    err = (o2.double() - o32.double()).nan_to_num().abs().max().item()
    assert err <= 2 * (olp.double() - o32.double()).nan_to_num().abs().max().item() + 1e-5


def _both_settings(case, D, seed, tile, name, check_plan, monkeypatch, windows=False, overlap=False):
    """out and lse of the forward of ``CASES[case]`` with the switch ``name`` at 0 and at 1 (tile
    ``tile``, the overlap as asked; ``windows``: windows of 64 query rows); ``check_plan(plan, on)`` holds
    for every plan made. Asserts that the two are bitwise equal and returns the second."""
    from moba_cute.kernels import attention_launch as m
    from moba_cute.kernels.attention_launch import attention_cute

    lq, lk, H, Hk, C, K, causal = CASES[case]
    q, k, v, cq, ck = make_batch(lq, lk, H, Hk, D, dtype=torch.bfloat16, device="cuda", seed=seed)
    r = reference.route(q, k, cq, ck, max(lq), max(lk), C, K, causal)
    res = {}
    monkeypatch.setenv("MOBA_CUTE_SM90_TILES", ",".join(map(str, tile)))
    monkeypatch.setenv("MOBA_CUTE_FWD_OVERLAP", "1" if overlap else "0")
    # the persistent walk (the default for one-stage tiles of one n-block chunks) takes neither Q
    # in registers nor clusters: held off so that the switch under test takes effect
    monkeypatch.setenv("MOBA_CUTE_FWD_PERSISTENT", "0")
    if windows:
        monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES", "1")
    for flag in ("0", "1"):
        monkeypatch.setenv(name, flag)
        m.FWD_PLANS.clear()
        try:
            res[flag] = attention_cute(q, k, v, r, None, False)
            assert all(check_plan(p, flag == "1") for p in m.FWD_PLANS.plans.values())
        finally:
            m.FWD_PLANS.clear()
    (o1, l1), (o2, l2) = res.values()
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    return (q, k, v, r), o2


@needs_hopper
@pytest.mark.parametrize("tile", [(64, 8, 2), (64, 8, 1)], ids=["64x2", "64x1"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", [0, 1, 2, 5, 7, 8])
def test_sm90_q_regs_bitwise(case, D, tile, monkeypatch):
    """Q in registers for the streamed n-blocks (``MOBA_CUTE_FWD_QREGS=1``: RS QK^T, the Q stage
    released before the first n-block): the same wgmmas on the same values, so out and lse are
    bitwise those of the shared-memory Q (SS QK^T), and within the reference's bound."""
    (q, k, v, r), o2 = _both_settings(case, D, 500 + case, tile, "MOBA_CUTE_FWD_QREGS",
                                      lambda p, on: p.variant.q_regs == on, monkeypatch)
    o32, _ = reference.attention(q, k, v, r)
    olp, _ = reference.attention(q, k, v, r, compute_dtype=torch.bfloat16)
    err = (o2.double() - o32.double()).nan_to_num().abs().max().item()
    assert err <= 2 * (olp.double() - o32.double()).nan_to_num().abs().max().item() + 1e-5


@needs_hopper
@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
@pytest.mark.parametrize("windows", [False, True], ids=["one-window", "row-windows"])
@pytest.mark.parametrize("tile", [(64, 8, 2), (128, 8, 1)], ids=["64x2", "128x1"])
@pytest.mark.parametrize("case", [0, 1, 2, 4, 5, 7, 8])
def test_sm90_kv_multicast_bitwise(case, tile, windows, overlap, monkeypatch):
    """Clusters of two CTAs sharing each K/V n-block by TMA multicast (``MOBA_CUTE_FWD_MULTICAST=1``):
    every sub-tile sees the same n-blocks in the same order, so out and lse are bitwise those of
    one CTA per unit; chunks of one n-block and of several, odd sub-tile counts (a rank idle in
    the last step), V tails, windows of query rows; the sequential and the overlapped loop (the
    overlap needs two K/V stages: (128, 8, 1) runs only the sequential one)."""
    if overlap and tile[2] < 2:
        pytest.skip("the overlap needs two K/V stages")
    _both_settings(case, 128, 600 + case, tile, "MOBA_CUTE_FWD_MULTICAST",
                   lambda p, on: p.variant.mcast == (2 if on else 1) and p.variant.overlap == overlap,
                   monkeypatch, windows, overlap)


@needs_hopper
@pytest.mark.parametrize("variant", ["sequential", "overlap", "pair", "mcast"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", [0, 1, 2, 5, 7, 8])
def test_sm90_rescale_skip_bitwise(case, D, variant, monkeypatch):
    """A warp skipping ``O``'s rescale where no row max moved (``MOBA_CUTE_FWD_RESCALE_SKIP=1``)
    leaves out and lse bitwise as they were, in every streamed loop: one block after the other,
    the intra-warpgroup overlap, the pair tile, and clusters of two CTAs; within the reference's
    bound."""
    tile = {"pair": (128, 8, 2, 2), "mcast": (128, 8, 1)}.get(variant, (64, 8, 2))
    if variant == "mcast":
        monkeypatch.setenv("MOBA_CUTE_FWD_MULTICAST", "1")
    (q, k, v, r), o2 = _both_settings(case, D, 700 + case, tile, "MOBA_CUTE_FWD_RESCALE_SKIP",
                                      lambda p, on: p.variant.rescale_skip == on and p.tile == tile
                                      and p.variant.mcast == (2 if variant == "mcast" else 1),
                                      monkeypatch, overlap=variant == "overlap")
    o32, _ = reference.attention(q, k, v, r)
    olp, _ = reference.attention(q, k, v, r, compute_dtype=torch.bfloat16)
    err = (o2.double() - o32.double()).nan_to_num().abs().max().item()
    assert err <= 2 * (olp.double() - o32.double()).nan_to_num().abs().max().item() + 1e-5


WINDOW_CASES = [
    # lens_q, lens_k, H, Hk, C, K, causal
    ([700, 90, 333], [700, 90, 333], 8, 4, 128, 4, True),  # GQA 2:1, four windows of one KV head
    ([3000, 1100], [3000, 1100], 2, 2, 256, 6, True),  # streamed K/V, two windows
    ([1500, 900], [1200, 900], 4, 4, 96, 3, False),  # non-causal: the merge kernel per window
    ([600], [600], 6, 3, 256, 40, False),  # topk above the chunk count, three windows
]


@needs_hopper
@pytest.mark.parametrize("mode", ["kv", "rows64", "rows300", "inference"])
@pytest.mark.parametrize("case", range(len(WINDOW_CASES)))
def test_sm90_forward_windows(case, mode, monkeypatch):
    """The partial buffer of one window at a time, forced through ``MOBA_CUTE_FWD_PARTIAL_BYTES``:
    windows of one KV head (``kv``), or of 64 / 300 query rows of one head (``rows64``: the
    smallest windows, one diagonal tile each; ``rows300``: windows that cut diagonal tiles and
    sequences), or the inference bound's own choice (``inference``: one window at these sizes);
    ``inference`` and ``rows300`` write the pair lists over the routing's ``query_rows``. The
    reference's result within SPEC tolerance, and bitwise the single window's out and lse (a
    pair's arithmetic and the merge order do not depend on the window)."""
    from moba_cute.kernels import attention_launch as m
    from moba_cute.kernels import common

    lq, lk, H, Hk, C, K, causal = WINDOW_CASES[case]
    q, k, v, cq, ck = make_batch(lq, lk, H, Hk, 128, dtype=torch.bfloat16, device="cuda", seed=300 + case)
    r = reference.route(q, k, cq, ck, max(lq), max(lk), C, K, causal)
    arch = common.arch_of(q.device)
    key = m._plan_key(q, k, r)
    m.FWD_PLANS.clear()
    one = m.attention_cute(q, k, v, r, None, True)
    assert m.FWD_PLANS.get(key + (False,), key, arch).windows == 1
    kp = K - (1 if causal else 0)
    pair = 2 * 128 + 4
    forced = {"kv": q.shape[0] * (H // Hk) * kp * pair, "rows64": 1, "rows300": 300 * kp * pair}.get(mode)
    if forced is not None:
        monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES", str(forced))
    m.FWD_PLANS.clear()
    try:
        # (inference, rows300: the pair lists written over a routing of the call's own)
        consume = mode in ("inference", "rows300")
        r2 = reference.route(q, k, cq, ck, max(lq), max(lk), C, K, causal) if consume else r
        got = m.attention_cute(q, k, v, r2, None, True, inference=mode == "inference", consume_routing=consume)
        plan = m.FWD_PLANS.get(key + (mode == "inference",), key, arch)
        want_rows = {"rows64": 64, "rows300": 300}.get(mode)
        assert plan.row_window == (None if want_rows is None else min(want_rows, q.shape[0]))
        assert plan.windows == (Hk if mode != "inference" else 1)
        if want_rows is not None:
            assert len(plan.fwd_windows) == H * -(-q.shape[0] // plan.row_window)
        if forced is not None:
            _check(lq, lk, H, Hk, 128, C, K, causal, torch.bfloat16, seed=300 + case)
    finally:
        monkeypatch.delenv("MOBA_CUTE_FWD_PARTIAL_BYTES", raising=False)
        m.FWD_PLANS.clear()
    assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])


STAGED_CASES = [
    # lens_q, lens_k, H, Hk, C, K, causal, D
    ([700, 1, 333], [700, 1, 333], 8, 2, 64, 4, True, 128),  # segments of 1..several sub-tiles
    ([3000], [3000], 4, 4, 128, 8, True, 128),  # units of several 64-row sub-tiles (Q stage reuse)
    ([513, 90], [400, 700], 4, 1, 32, 3, False, 64),  # non-causal, Sq != Sk, MQA, D = 64
    ([2000, 50], [2000, 50], 8, 4, 208, 3, True, 128),  # chunks over one n-block: the streamed path
]


@needs_hopper
@pytest.mark.parametrize("case", range(len(STAGED_CASES)))
def test_sm90_forward_staged_epilogue(case, monkeypatch):
    """The segment kernel's staged epilogue (the default: partials through the sub-tile's Q ring
    stage, 16-byte stores) gives bitwise the fragment stores' out and lse
    (``MOBA_CUTE_FWD_STAGED=0``: same arithmetic, other store path), also with forced windows (64
    query rows); within SPEC tolerance of the reference."""
    from moba_cute.kernels import attention_launch as m
    from moba_cute.kernels import common

    lq, lk, H, Hk, C, K, causal, D = STAGED_CASES[case]
    q, k, v, cq, ck = make_batch(lq, lk, H, Hk, D, dtype=torch.bfloat16, device="cuda", seed=400 + case)
    r = reference.route(q, k, cq, ck, max(lq), max(lk), C, K, causal)
    arch = common.arch_of(q.device)
    key = m._plan_key(q, k, r)
    try:
        monkeypatch.setenv("MOBA_CUTE_FWD_STAGED", "0")
        m.FWD_PLANS.clear()
        one = m.attention_cute(q, k, v, r, None, True)
        assert not m.FWD_PLANS.get(key + (False,), key, arch).variant.staged
        monkeypatch.setenv("MOBA_CUTE_FWD_STAGED", "1")
        for forced_windows in (False, True):
            if forced_windows:
                monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES", "1")
            m.FWD_PLANS.clear()
            got = m.attention_cute(q, k, v, r, None, True)
            assert m.FWD_PLANS.get(key + (False,), key, arch).variant.staged
            assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1]), f"windows forced: {forced_windows}"
        _check(lq, lk, H, Hk, D, C, K, causal, torch.bfloat16, seed=400 + case)
    finally:
        monkeypatch.delenv("MOBA_CUTE_FWD_STAGED", raising=False)
        monkeypatch.delenv("MOBA_CUTE_FWD_PARTIAL_BYTES", raising=False)
        m.FWD_PLANS.clear()


PERSIST_CASES = [
    # lens_q, lens_k, H, Hk, C, K, causal, D, dtype, forced grid (None: the plan's), windows
    ([3000, 1, 700], [3000, 1, 700], 4, 2, 128, 8, True, 128, torch.bfloat16, None, None),
    ([3000, 1, 700], [3000, 1, 700], 4, 2, 128, 8, True, 128, torch.bfloat16, 3, None),  # many units a CTA
    ([1000, 517], [1000, 517], 8, 8, 64, 6, True, 128, torch.bfloat16, 5, "64"),  # windows of 64 rows
    ([2500], [2500], 8, 4, 112, 4, True, 128, torch.float16, 7, "kv"),  # windows of KV heads, V tails (C = 112)
    ([513, 90], [400, 700], 4, 1, 32, 3, False, 64, torch.bfloat16, 2, None),  # non-causal, Sq != Sk, MQA
    ([700, 1, 333], [700, 1, 333], 8, 2, 16, 9, True, 64, torch.float16, 4, None),  # topk > chunks
]


@needs_hopper
@pytest.mark.parametrize("case", range(len(PERSIST_CASES)))
def test_sm90_forward_persistent(case, monkeypatch):
    """The segment kernel's persistent walk (``MOBA_CUTE_FWD_PERSISTENT=1``: two CTAs per SM walk
    the units, K/V and Q of the next unit loaded while this one ends) gives bitwise the
    one-CTA-per-unit kernel's out and lse, also with a forced small grid (a CTA walks many units:
    ring phases and unit slots reused) and with windows; within SPEC tolerance of the reference."""
    from moba_cute.kernels import attention_launch as m
    from moba_cute.kernels import common

    lq, lk, H, Hk, C, K, causal, D, dtype, grid, windows = PERSIST_CASES[case]
    q, k, v, cq, ck = make_batch(lq, lk, H, Hk, D, dtype=dtype, device="cuda", seed=450 + case)
    r = reference.route(q, k, cq, ck, max(lq), max(lk), C, K, causal)
    arch = common.arch_of(q.device)
    key = m._plan_key(q, k, r)
    try:
        if windows == "64":  # windows of 64 rows of one head (the smallest)
            monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES", "1")
        elif windows == "kv":  # windows of one KV head
            monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES", str(q.shape[0] * (H // Hk) * (K - causal) * (2 * D + 4)))
        monkeypatch.setenv("MOBA_CUTE_FWD_PERSISTENT", "0")
        m.FWD_PLANS.clear()
        one = m.attention_cute(q, k, v, r, None, True)
        assert not m.FWD_PLANS.get(key + (False,), key, arch).variant.persistent
        monkeypatch.setenv("MOBA_CUTE_FWD_PERSISTENT", "1")
        m.FWD_PLANS.clear()
        got = m.attention_cute(q, k, v, r, None, True)
        plan = m.FWD_PLANS.get(key + (False,), key, arch)
        assert plan.variant.persistent
        if windows is not None:
            assert len(plan.fwd_windows) > 1
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])
        if grid is not None:
            plan.seg_grid = grid
            got = m.attention_cute(q, k, v, r, None, True)
            assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1]), f"grid {grid}"
            for _ in range(2):  # bit-identical on repeat
                again = m.attention_cute(q, k, v, r, None, True)
                assert torch.equal(again[0], got[0]) and torch.equal(again[1], got[1])
        m.FWD_PLANS.clear()
        _check(lq, lk, H, Hk, D, C, K, causal, dtype, seed=450 + case)
    finally:
        monkeypatch.delenv("MOBA_CUTE_FWD_PERSISTENT", raising=False)
        monkeypatch.delenv("MOBA_CUTE_FWD_PARTIAL_BYTES", raising=False)
        m.FWD_PLANS.clear()


DIAG_CASES = [
    # lens_q, lens_k, H, Hk, C, K, forced partial bytes (windows) or None
    ([5000, 3000], [5000, 3000], 2, 1, 2048, 3, None),  # long chunks: 32 n-blocks, GQA 2:1
    ([4500, 700], [4500, 700], 4, 2, 1024, 3, None),
    ([1, 17, 113, 1000], [1, 17, 113, 1000], 4, 4, 64, 4, None),  # 1-token sequences
    ([100, 300], [300, 100], 4, 2, 48, 3, None),  # Sq != Sk: rows without keys; tiles across chunks
    ([300], [300], 2, 2, 16, 5, None),  # chunks of 16: a tile spans four
    ([777, 300], [777, 300], 8, 1, 320, 1, None),  # topk 1: the own chunk only, no partials
    ([4096], [4096], 2, 2, 512, 64, None),  # topk above the chunk count
    ([3000, 1100], [3000, 1100], 2, 2, 256, 6, 1),  # windows of 64 query rows
    ([700, 90, 333], [700, 90, 333], 8, 4, 128, 4, "kv"),  # windows of one KV head
]


@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(DIAG_CASES)))
def test_sm90_diag_wgmma(case, D, monkeypatch):
    """The causal diagonal on wgmma (``MOBA_CUTE_FWD_DIAG_SM90=1``, :class:`MobaDiagSm90`): within
    SPEC tolerance of the reference (NaN-filled outputs, so every row is written), bitwise on
    repeat, and with windows forced bitwise the single window's result."""
    from moba_cute.kernels import attention_launch as m

    lq, lk, H, Hk, C, K, forced = DIAG_CASES[case]
    monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_SM90", "1")
    m.FWD_PLANS.clear()
    try:
        for dtype in (torch.bfloat16, torch.float16):
            _check(lq, lk, H, Hk, D, C, K, True, dtype, seed=500 + case)
        plans = list(m.FWD_PLANS.plans.values())
        assert plans and all(p.diag_sm90 and p.ks.specs["diag"][0][0] == "moba_diag_sm90" for p in plans)
        if forced is not None:
            q, k, v, cq, ck = make_batch(lq, lk, H, Hk, D, dtype=torch.bfloat16, device="cuda", seed=600 + case)
            r = reference.route(q, k, cq, ck, max(lq), max(lk), C, K, True)
            one = m.attention_cute(q, k, v, r, None, True)
            pair = 2 * D + 4
            monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES",
                               str(q.shape[0] * (H // Hk) * (K - 1) * pair if forced == "kv" else forced))
            m.FWD_PLANS.clear()
            got = m.attention_cute(q, k, v, r, None, True)
            assert all(len(p.fwd_windows) > 1 for p in m.FWD_PLANS.plans.values())
            assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])
    finally:
        monkeypatch.delenv("MOBA_CUTE_FWD_PARTIAL_BYTES", raising=False)
        m.FWD_PLANS.clear()


def _diag_switch(m, monkeypatch, case, D, env, attr, seed):
    """DIAG_CASES[case] through the wgmma diagonal with the switch ``env`` off and on (the plans'
    ``attr`` follows it); asserts the two results bitwise equal. Returns q, k, v, the routing and
    {"0": (out, lse), "1": (out, lse)}."""
    lq, lk, H, Hk, C, K, _ = DIAG_CASES[case]
    q, k, v, cq, ck = make_batch(lq, lk, H, Hk, D, dtype=torch.bfloat16, device="cuda", seed=seed + case)
    r = reference.route(q, k, cq, ck, max(lq), max(lk), C, K, True)
    got = {}
    for on in ("0", "1"):
        monkeypatch.setenv(env, on)
        m.FWD_PLANS.clear()
        got[on] = m.attention_cute(q, k, v, r, None, True)
        assert all(getattr(p, attr) == (on == "1") for p in m.FWD_PLANS.plans.values())
    assert torch.equal(got["0"][0], got["1"][0]) and torch.equal(got["0"][1], got["1"][1])
    return q, k, v, r, got


def _diag_windows_bitwise(m, monkeypatch, q, k, v, r, forced, want):
    """With windows forced (``forced``: "kv" for one KV head's partials, else the bound in bytes),
    the forward gives bitwise ``want``."""
    H, Hk, D, K = q.shape[1], k.shape[1], q.shape[2], r.selection.shape[-1]
    pair = 2 * D + 4
    monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES",
                       str(q.shape[0] * (H // Hk) * (K - 1) * pair if forced == "kv" else forced))
    m.FWD_PLANS.clear()
    win = m.attention_cute(q, k, v, r, None, True)
    assert torch.equal(win[0], want[0]) and torch.equal(win[1], want[1])
    monkeypatch.delenv("MOBA_CUTE_FWD_PARTIAL_BYTES")


@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(DIAG_CASES)))
def test_sm90_diag_staged_merge(case, D, monkeypatch):
    """The wgmma diagonal's merge staged in shared memory (``MOBA_CUTE_FWD_DIAG_STAGED=1``): within
    SPEC tolerance, and bitwise the merge from global memory (same arithmetic, same order; the grid
    order differs), also with windows forced."""
    from moba_cute.kernels import attention_launch as m

    lq, lk, H, Hk, C, K, forced = DIAG_CASES[case]
    monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_SM90", "1")
    try:
        q, k, v, r, got = _diag_switch(m, monkeypatch, case, D, "MOBA_CUTE_FWD_DIAG_STAGED", "diag_staged", 700)
        if forced is not None:
            _diag_windows_bitwise(m, monkeypatch, q, k, v, r, forced, got["1"])
        m.FWD_PLANS.clear()
        for dtype in (torch.bfloat16, torch.float16):
            _check(lq, lk, H, Hk, D, C, K, True, dtype, seed=800 + case)
    finally:
        monkeypatch.delenv("MOBA_CUTE_FWD_PARTIAL_BYTES", raising=False)
        m.FWD_PLANS.clear()


@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(DIAG_CASES)))
def test_sm90_diag_overlap(case, D, monkeypatch):
    """The wgmma diagonal's overlapped n-block loop (``MOBA_CUTE_FWD_DIAG_OVERLAP=1``): bitwise
    the sequential loop (the same operations on O in the same order) and within SPEC tolerance."""
    from moba_cute.kernels import attention_launch as m

    lq, lk, H, Hk, C, K, _ = DIAG_CASES[case]
    monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_SM90", "1")
    try:
        _diag_switch(m, monkeypatch, case, D, "MOBA_CUTE_FWD_DIAG_OVERLAP", "diag_overlap", 900)
        monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_OVERLAP", "1")
        m.FWD_PLANS.clear()
        for dtype in (torch.bfloat16, torch.float16):
            _check(lq, lk, H, Hk, D, C, K, True, dtype, seed=1000 + case)
    finally:
        m.FWD_PLANS.clear()


@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(DIAG_CASES)))
def test_sm90_diag_interleave(case, D, monkeypatch):
    """The wgmma diagonal's tiles launched short and long in turn
    (``MOBA_CUTE_FWD_DIAG_INTERLEAVE=1``): every tile still runs once (a permutation of the grid),
    so bitwise the index order's out and lse, also with windows forced; within SPEC tolerance."""
    from moba_cute.kernels import attention_launch as m

    lq, lk, H, Hk, C, K, forced = DIAG_CASES[case]
    monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_SM90", "1")
    try:
        q, k, v, r, got = _diag_switch(m, monkeypatch, case, D, "MOBA_CUTE_FWD_DIAG_INTERLEAVE", "diag_interleave",
                                       1100)
        if forced is not None:
            _diag_windows_bitwise(m, monkeypatch, q, k, v, r, forced, got["1"])
        m.FWD_PLANS.clear()
        _check(lq, lk, H, Hk, D, C, K, True, torch.bfloat16, seed=1200 + case)
    finally:
        monkeypatch.delenv("MOBA_CUTE_FWD_PARTIAL_BYTES", raising=False)
        m.FWD_PLANS.clear()


PAIR_LIST_CASES = [
    # lens_q (= lens_k), H, Hk, C, K, causal
    ([3000, 1100], 4, 2, 16, 4, True),  # short segments, 16-byte slot reads (topk % 4 == 0)
    ([8192], 2, 1, 1024, 3, True),  # long segments (up to ~8K rows): many steps of one CTA
    ([5000, 1], 2, 2, 512, 5, False),  # non-causal, a 1-row sequence
]


def _expected_pair_lists(r, H, Hk, total_q, K, s0, head_major, in_place=False):
    """The pair lists and per-segment counts PairListKernel should write, from the routing in
    PyTorch (entries with a bad row, or whose row did not select the chunk, are dropped;
    ``in_place``: the dual kernel's second list instead, one entry per routing entry, -1 there)."""
    off, rows, sel, cuc = (t.cpu().long() for t in (r.offsets, r.query_rows, r.selection, r.cu_chunks))
    nseg = off.numel() - 1
    nbound, G, kp = nseg // H, H // Hk, K - s0
    lists, counts = {}, torch.zeros(nseg, dtype=torch.long)
    for seg in range(nseg):
        g, h = divmod(seg, H)
        b = int(torch.searchsorted(cuc, torch.tensor(g), right=True)) - 1
        gl = g - int(cuc[min(max(b, 0), cuc.numel() - 1)])
        e = rows[off[seg]:off[seg + 1]]
        ok = (e >= 0) & (e < total_q)
        if in_place:
            ec = e.clamp(0, total_q - 1)
            hit = (sel[ec, h] == gl) & ok[:, None]
            lists[seg] = torch.where(hit.any(1), (ec * H + h) * K + hit.float().argmax(1), -1)
            continue
        e = e[ok]
        hit = sel[e, h] == gl
        has = hit.any(1)
        slot = hit.float().argmax(1)
        keep = has & (slot >= s0)
        e, slot = e[keep], slot[keep]
        pair = ((h * total_q + e) * kp if head_major else (e * H + h) * kp) + slot - s0
        lists[seg] = pair
        cseg = ((h // G) * nbound + g) * G + h % G if head_major else seg
        counts[cseg] = pair.numel()
    return lists, counts


@needs_hopper
@pytest.mark.parametrize("variant", ["forward", "backward", "dual"])
@pytest.mark.parametrize("case", range(len(PAIR_LIST_CASES)))
def test_pair_lists(case, variant):
    """PairListKernel, the forward's (head-major, own chunks dropped when causal) and the
    backward's (every slot, -1 past the pairs) lists: each segment's pairs in row order and its
    count, against PyTorch, on short and long segments; entries corrupted in the routing (a row
    out of range, a row that did not select the chunk) are dropped. ``dual``: the forward's
    lists, and the backward's in place (one per entry, -1 where one does not check out)."""
    from moba_cute.kernels import attention_launch as m
    from moba_cute.kernels import common
    from moba_cute.kernels.slot_index import PairListKernel

    lq, H, Hk, C, K, causal = PAIR_LIST_CASES[case]
    q, k, _, cq, ck = make_batch(lq, lq, H, Hk, 64, dtype=torch.bfloat16, device="cuda", seed=700 + case)
    r = reference.route(q, k, cq, ck, max(lq), max(lq), C, K, causal)
    total_q = q.shape[0]
    rows = r.query_rows.clone()
    n = int(r.offsets[-1])
    g = torch.Generator().manual_seed(case)
    bad = torch.randint(0, n, (max(n // 50, 1),), generator=g).cuda()
    rows[bad[0::3]] = -7
    rows[bad[1::3]] = total_q + 5
    rows[bad[2::3]] = (rows[bad[2::3]] + 1) % total_q  # likely a row that did not pick the chunk
    r = type(r)(**{**r.__dict__, "query_rows": rows})
    head_major = variant != "backward"
    dual = variant == "dual"
    s0 = 1 if (causal and head_major) else 0
    vec = 4 if K % 4 == 0 else 1
    kw = dict(fill_tail=not head_major, head_major=head_major, dual=dual)
    kern = PairListKernel(causal and head_major, vec, **kw)
    key = PairListKernel.compile_key(causal and head_major, vec, **kw)
    ks = common.KernelSet({"pl": (key, lambda: kern, m._fake([(m._i32p(1)[0][0], 16 if vec == 4 else 4)]
                                                              + m._i32p(6), 7))}, common.arch_of(q.device))
    nseg = r.offsets.numel() - 1
    cap = rows.numel()
    out = torch.full((cap,), -99, dtype=torch.int32, device="cuda")
    counts = torch.full((nseg,), -99, dtype=torch.int32, device="cuda")
    every = torch.full((cap,), -99, dtype=torch.int32, device="cuda")
    ks["pl"](r.selection.data_ptr(), r.cu_chunks.data_ptr(), r.offsets.data_ptr(), rows.data_ptr(), out.data_ptr(),
             counts.data_ptr(), every.data_ptr() if dual else out.data_ptr(), len(lq), total_q, H, Hk, K, nseg, cap,
             common.raw_stream(q.device))
    torch.cuda.synchronize()
    want, want_counts = _expected_pair_lists(r, H, Hk, total_q, K, s0, head_major)
    assert torch.equal(counts.cpu().long(), want_counts)
    got, off = out.cpu().long(), r.offsets.cpu().long()
    assert max(int(off[s + 1] - off[s]) for s in range(nseg)) > (2048 if case == 1 else 0)
    for seg in range(nseg):
        o0, o1, w = int(off[seg]), int(off[seg + 1]), want[seg]
        assert torch.equal(got[o0:o0 + w.numel()], w), seg
        if not head_major:
            assert (got[o0 + w.numel():o1] == -1).all(), seg
    if dual:
        want_all, _ = _expected_pair_lists(r, H, Hk, total_q, K, 0, False, in_place=True)
        got_all = every.cpu().long()
        for seg in range(nseg):
            assert torch.equal(got_all[int(off[seg]):int(off[seg + 1])], want_all[seg]), seg
