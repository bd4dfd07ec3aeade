"""CPU: the launch plans of the attention and routing calls (docs/design.md, "Host path") are
cached per call shape: a repeated call of the same shape hits, a new shape misses. Plans hold
only host-side sizes, grids and workspace layouts (kernels compile lazily on first launch), so
they build here without a GPU."""

import pytest
import torch

pytest.importorskip("cutlass")

from moba_cute import reference  # noqa: E402
from moba_cute.kernels import attention_launch as al  # noqa: E402
from moba_cute.kernels import common  # noqa: E402
from moba_cute.kernels import route_launch as rl  # noqa: E402


def _batch(lens, H=4, Hk=2, D=64, C=64, K=3, causal=True, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    n = sum(lens)
    q = torch.randn(n, H, D, generator=g, dtype=dtype)
    k = torch.randn(n, Hk, D, generator=g, dtype=dtype)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    r = reference.route(q, k, cu, cu, max(lens), max(lens), C, K, causal)
    return q, k, r


@pytest.mark.parametrize("cache", [al.FWD_PLANS, al.BWD_PLANS])
def test_attention_plan_cache_hits_on_repeat_and_misses_on_new_shape(cache):
    cache.clear()
    q, k, r = _batch([100, 300])
    key = al._plan_key(q, k, r)
    h0, m0 = cache.hits, cache.misses
    p1 = cache.get(key, key, "sm_90a")
    q2, k2, r2 = _batch([100, 300])  # new tensors, same shapes
    key2 = al._plan_key(q2, k2, r2)
    assert key2 == key
    assert cache.get(key2, key2, "sm_90a") is p1
    assert (cache.hits - h0, cache.misses - m0) == (1, 1)
    for other in (_batch([100, 301]), _batch([100, 300], K=4), _batch([100, 300], causal=False)):
        ko = al._plan_key(*other)
        assert ko != key
        assert cache.get(ko, ko, "sm_90a") is not p1
    assert cache.misses - m0 == 4


def test_plan_cache_is_bounded():
    built = []
    cache = common.PlanCache(lambda x: built.append(x) or x, max_size=3)
    for i in range(5):
        cache.get(i, i)
    assert len(cache.plans) == 3 and list(cache.plans) == [2, 3, 4]
    assert cache.get(4, 4) == 4 and cache.hits == 1 and built == [0, 1, 2, 3, 4]


def test_forward_plan_layout():
    """One workspace holds every scratch piece, 256-byte aligned and disjoint."""
    q, k, r = _batch([1000, 17, 513], H=8, Hk=2, D=128, C=128, K=5)
    key = al._plan_key(q, k, r)
    plan = al.FwdPlan(key, "sm_80")
    rows = q.shape[0] * q.shape[1]
    ix = plan.index
    for lay in (plan.layout, ix.layout):
        offs = sorted(lay.offsets.values())
        assert all(o % 256 == 0 for o in offs) and offs[0] == 0
    assert plan.layout.offsets["mst"] >= rows * 128 * 4  # oacc first, fp32 (rows, D)
    assert ix.npass == 4 and ix.nseg == r.num_chunks_bound * 8 and ix.gather
    assert ix.layout.nbytes >= 4 * (rows * ix.npass + ix.tiles_bound)
    assert set(plan.ks.specs) == {"diag", "pass", "slot_prep", "slot_count", "slot_scan", "slot_scatter"}


def test_sm90_forward_plan_layout():
    """The sm90 plan: partials instead of the fp32 state, one all-slot index pass in units of
    64 * sub entries, and the sm90 kernel set."""
    q, k, r = _batch([1000, 17, 513], H=8, Hk=2, D=128, C=128, K=5)
    key = al._plan_key(q, k, r)
    plan = al.FwdPlan(key, "sm_90a")
    assert plan.sm90
    rows = q.shape[0] * q.shape[1]
    ix = plan.index
    assert ix.merged and ix.npass == 1 and ix.kp == 4 and ix.n_counts == ix.nseg
    assert "oacc" not in plan.layout.offsets
    assert plan.layout.offsets["part_lse"] >= rows * 4 * 128 * 2  # part_o first: (rows * KP, D) bf16
    assert plan.layout.nbytes >= rows * 4 * (128 * 2 + 4)
    assert ix.layout.nbytes >= 4 * (rows * 4 + ix.tiles_bound)
    # (pair_list_dual: the training forward's, which also writes the backward's lists)
    assert set(plan.ks.specs) == {"seg", "diag", "slot_prep", "slot_count", "slot_scan", "pair_list",
                                  "pair_list_dual"}
    assert plan.ks.specs["pair_list_dual"][0] == plan.ks.specs["pair_list"][0] + ("dual",)


def test_sm90_plan_long_chunk_tile(monkeypatch):
    """Without a tuned entry the sm90 plan's tile is the pair tile from the chunk size
    ``FWD_LONG_CHUNK_TILES`` gives for the head dim and ``FWD_TILES`` below; the tuner's built-in
    candidate agrees."""
    from moba_cute.configs import attention_sm90 as cfg90
    from moba_cute.configs import tuned

    for var in ("MOBA_CUTE_FWD_MULTICAST", "MOBA_CUTE_FWD_OVERLAP", "MOBA_CUTE_SM90_TILES"):
        monkeypatch.delenv(var, raising=False)
    for D in (64, 128):
        lo, long_tile = cfg90.FWD_LONG_CHUNK_TILES[D]
        assert cfg90.tile_consumers(long_tile) == 2 and long_tile in cfg90.ALT_TILES[D]
        for C, want in ((lo, long_tile), (2 * lo, long_tile), (lo // 2, cfg90.FWD_TILES[D]),
                        (128, cfg90.FWD_TILES[D])):
            q, k, r = _batch([C + 300, 200], H=4, Hk=2, D=D, C=C, K=2)
            plan = al.FwdPlan(al._plan_key(q, k, r), "sm_90a")
            assert plan.tile == tuple(want) and plan.variant.mcast == 1, (D, C, plan.tile)
            assert tuned.builtin("sm90_fwd", D, C) == tuple(want)
            assert set(tuned.candidates("sm90_fwd", D, C)) == set(tuned.candidates("sm90_fwd", D))


def test_sm90_plan_multicast_from_long_chunks(monkeypatch):
    """K/V multicast (clusters of two CTAs) is the sm90 plan's default for one-consumer tiles from
    chunks of ``FWD_KV_MULTICAST_MIN_CHUNK`` keys, not below and not with the overlap (where the
    tile has the two K/V stages it takes); the segment kernel's compile key says so. The pair tile
    (the built-in tile of long chunks) runs one CTA per SM, never in clusters."""
    from moba_cute.configs import attention_sm90 as cfg90

    for var in ("MOBA_CUTE_FWD_MULTICAST", "MOBA_CUTE_FWD_OVERLAP", "MOBA_CUTE_SM90_TILES"):
        monkeypatch.delenv(var, raising=False)
    lo = cfg90.FWD_KV_MULTICAST_MIN_CHUNK
    q, k, r = _batch([lo + 300, 200], H=4, Hk=2, D=128, C=lo, K=2)
    plan = al.FwdPlan(al._plan_key(q, k, r), "sm_90a")
    assert plan.tile == cfg90.FWD_LONG_CHUNK_TILES[128][1] and plan.variant.mcast == 1
    monkeypatch.setenv("MOBA_CUTE_SM90_TILES", "64,8,2")
    for C, want in ((lo, 2), (lo // 2, 1)):
        q, k, r = _batch([lo + 300, 200], H=4, Hk=2, D=128, C=C, K=2)
        plan = al.FwdPlan(al._plan_key(q, k, r), "sm_90a")
        assert plan.variant.mcast == want and (plan.ks.specs["seg"][0][-1] == "mc2") == (want == 2)
    monkeypatch.setenv("MOBA_CUTE_FWD_OVERLAP", "1")
    q, k, r = _batch([lo + 300, 200], H=4, Hk=2, D=128, C=lo, K=2)
    plan = al.FwdPlan(al._plan_key(q, k, r), "sm_90a")
    assert plan.variant.mcast == 1 and plan.ks.specs["seg"][0][-1] == "overlap"
    monkeypatch.setenv("MOBA_CUTE_SM90_TILES", "128,8,1")  # one K/V stage: no overlap, so multicast
    plan = al.FwdPlan(al._plan_key(q, k, r), "sm_90a")
    assert plan.variant.mcast == 2 and plan.ks.specs["seg"][0][-1] == "mc2"
    monkeypatch.setenv("MOBA_CUTE_SM90_TILES", "128,8,2,2")  # the pair tile: one CTA, no cluster
    plan = al.FwdPlan(al._plan_key(q, k, r), "sm_90a")
    assert plan.variant.mcast == 1 and plan.ks.specs["seg"][0][-1] == "pingpong"


def test_backward_reuses_the_forward_index_layout(monkeypatch):
    """The backward reads the forward's kept index (sm80 forward): same tile height, same layout;
    the sm90 forward's all-slot index is a different one (not kept for the backward). The sm90
    backward (chunks <= 128, head dim 64 / 128) has no per-slot index at all."""
    q, k, r = _batch([1000, 17, 513], H=8, Hk=2, D=128, C=128, K=5)
    key = al._plan_key(q, k, r)
    assert al.BwdPlan(key, "sm_80").index.same_as(al.FwdPlan(key, "sm_80").index)
    plan = al.BwdPlan(key, "sm_90a")
    assert plan.sm90 and plan.index is None
    # ("work": the persistent walk's unit counters, one per dQ window)
    work = {"work"} if plan.persistent else set()
    assert set(plan.layout.offsets) == {"delta", "part_dq", "pairs", "counts"} | work
    assert plan.layout.nbytes >= q.shape[0] * 8 * 5 * 128 * 2  # a dQ partial per pair (input dtype)
    monkeypatch.setenv("MOBA_CUTE_BWD_SM80", "1")
    plan = al.BwdPlan(key, "sm_90a")
    assert not plan.sm90
    assert not plan.index.same_as(al.FwdPlan(key, "sm_90a").index)
    assert not plan.index.same_as(al._SlotIndexPlan(3, 1530, 8, 5, 100, True, 32))


def test_sm90_backward_dq_windows(monkeypatch):
    """The dQ partial buffer holds one window of KV heads: bounded by the sm80 path's fp32 dQ
    accumulator (or 1 GiB), the windows cover every KV head once, in order."""
    assert al.dq_window_kv_heads(2 * 8192, 16, 16, 128, 8) == 16  # 0.5 GB: one window
    assert al.dq_window_kv_heads(2 * 65536, 16, 16, 128, 8) == 4  # 4.3 GB over 4 windows
    assert al.dq_window_kv_heads(1 << 20, 16, 16, 128, 8) == 4  # 512K B=2: 8.6 GB, as sm80's fp32 dQ
    assert al.dq_window_kv_heads(1 << 20, 16, 1, 128, 64) == 1  # MQA: a window is the one KV head
    q, k, r = _batch([1000, 17, 513], H=8, Hk=4, D=128, C=128, K=5)
    key = al._plan_key(q, k, r)
    one = al.BwdPlan(key, "sm_90a")
    assert [w[:2] for w in one.dq_windows] == [(0, 4)]
    monkeypatch.setenv("MOBA_CUTE_DQ_PARTIAL_BYTES", str(1530 * 2 * 5 * 128 * 2 * 3 // 2))
    plan = al.BwdPlan(key, "sm_90a")  # one and a half KV heads' partials fit: windows of one
    assert [w[:2] for w in plan.dq_windows] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert plan.layout.nbytes < one.layout.nbytes - 3 * 1530 * 2 * 5 * 128 * 2 + 4096
    monkeypatch.setenv("MOBA_CUTE_DQ_PARTIAL_BYTES", str(1530 * 2 * 5 * 128 * 2 * 3))
    assert [w[:2] for w in al.BwdPlan(key, "sm_90a").dq_windows] == [(0, 3), (3, 1)]


def test_sm90_forward_windows(monkeypatch):
    """The sm90 forward's partial buffer holds one window of KV heads (a divisor of Hk): within
    the sm80 forward's fp32 running state (or 1 GiB); the index gives each window its own
    tile range (one scan "pass" per window)."""
    assert al.fwd_window_kv_heads(2 * 8192, 16, 16, 128, 7) == 16  # flashmoba 8K: 0.48 GB, one window
    assert al.fwd_window_kv_heads(2 * 65536, 16, 16, 128, 7) == 4  # 64K: 3.8 GB over 4 windows
    assert al.fwd_window_kv_heads(1 << 20, 16, 16, 128, 7) == 4  # 512K B=2: 30.5 GB -> 7.6 GB per window
    assert al.fwd_window_kv_heads(131072, 32, 8, 128, 11) == 1  # moba-large 128K: 1.5 GB per KV head
    assert al.fwd_window_kv_heads(1 << 20, 16, 1, 128, 63) == 1  # MQA: a window is the one KV head
    monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES", str(4 * 1000 * 2 * 7 * 260))
    assert al.fwd_window_kv_heads(1000, 12, 6, 128, 7) == 3  # 4 KV heads fit: the divisor 3
    monkeypatch.delenv("MOBA_CUTE_FWD_PARTIAL_BYTES")
    q, k, r = _batch([1000, 17, 513], H=8, Hk=4, D=128, C=128, K=5)
    key = al._plan_key(q, k, r)
    one = al.FwdPlan(key, "sm_90a")
    assert one.windows == 1 and one.win_heads == 8 and one.index.npass == 1
    assert one.index.nseg == r.num_chunks_bound * 8
    total_q = q.shape[0]
    per_kv = total_q * 2 * 4 * (2 * 128 + 4)  # G = 2 heads, KP = 4 pairs per (row, head)
    monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES", str(2 * per_kv + per_kv // 2))
    plan = al.FwdPlan(key, "sm_90a")  # two and a half KV heads' partials fit: windows of two
    assert plan.windows == 2 and plan.win_heads == 4
    ix = plan.index
    assert ix.npass == 2 and ix.nseg * 2 == r.num_chunks_bound * 8 and ix.n_counts == r.num_chunks_bound * 8
    assert ix.tiles_bound == 2 * ix.bound_pass and ix.layout.nbytes >= 4 * (ix.npass + 1)
    assert plan.layout.nbytes < one.layout.nbytes - per_kv * 2 + 4096
    assert plan.layout.nbytes >= per_kv * 2
    monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES", str(per_kv))
    plan = al.FwdPlan(key, "sm_90a")
    assert plan.windows == 4 and plan.row_window is None


def test_sm90_forward_row_windows(monkeypatch):
    """When one KV head's partials exceed the bound, the windows are ranges of one query head's
    rows: as many rows as the bound holds (at least 64), every (head, row) once, in order; the
    index gets a scan pass per window, over one cell per chunk, and the window counts' kernel."""
    q, k, r = _batch([1000, 17, 513], H=8, Hk=4, D=128, C=128, K=5)
    key = al._plan_key(q, k, r)
    total_q, kp, pair = q.shape[0], 4, 2 * 128 + 4
    monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES", str(300 * kp * pair + 100))
    plan = al.FwdPlan(key, "sm_90a")
    assert plan.row_window == 300 and plan.windows == 4
    ix = plan.index
    nrw = -(-total_q // 300)
    assert ix.nrw == nrw and ix.npass == 8 * nrw and ix.nseg == r.num_chunks_bound
    assert ix.n_counts == 8 * nrw * r.num_chunks_bound and ix.tiles_bound == ix.npass * ix.bound_pass
    assert {"seg_pairs", "wstart"} <= set(ix.layout.offsets) and "win_count" in plan.ks.specs
    assert plan.layout.nbytes <= 300 * kp * pair + 4096  # the partials of one window
    wins = plan.fwd_windows
    assert len(wins) == 8 * nrw
    covered = [(h, row) for _, h0, nh, lo, hi, _, _, _ in wins for h in range(h0, h0 + nh) for row in range(lo, hi)]
    assert covered == [(h, row) for h in range(8) for row in range(total_q)]
    for sp, h0, nh, lo, hi, pbase, t0, grid in wins:
        assert nh == 1 and sp == h0 * nrw + lo // 300 and pbase == (h0 * total_q + lo) * kp
        # the diagonal tiles holding rows [lo, hi) (64-row tiles from each sequence's start)
        starts = [s + 64 * t for s, n in ((0, 1000), (1000, 17), (1017, 513)) for t in range(-(-n // 64))]
        need = [t for t, f in enumerate(starts) if f < hi and f + 64 > lo]
        assert t0 <= need[0] and need[-1] < t0 + grid <= ix.mt_bound
    monkeypatch.setenv("MOBA_CUTE_FWD_PARTIAL_BYTES", "1")
    assert al.FwdPlan(key, "sm_90a").row_window == 64  # the smallest window: one diagonal tile
    monkeypatch.delenv("MOBA_CUTE_FWD_PARTIAL_BYTES")
    assert al.FwdPlan(key, "sm_90a").row_window is None and "win_count" not in al.FwdPlan(key, "sm_90a").ks.specs


def test_sm90_forward_inference_bound():
    """Without a backward to follow (inference) the forward's partials get 1/16 of q's bytes, at
    least 512 MiB; with one, the backward's bound (the sm80 fp32 state, at least 1 GiB)."""
    pair, kp = 2 * 128 + 4, 7
    rows = 1 << 20  # flashmoba 512K, B = 2: a KV head's partials are 1.9 GB
    assert al.fwd_partials_bound(rows, 16, 128, inference=True) == 512 << 20
    assert al.fwd_partials_bound(4 * rows, 16, 128, inference=True) == 4 * rows * 16 * 128 * 2 // 16
    assert al.fwd_partials_bound(rows, 16, 128) == rows * 16 * 128 * 4
    W = al.fwd_row_window(rows, 16, 16, 128, kp, inference=True)
    assert W == (512 << 20) // (kp * pair) and -(-rows // W) == 4
    assert al.fwd_row_window(rows, 16, 16, 128, kp) is None
    assert al.fwd_window_kv_heads(rows, 16, 16, 128, kp) == 4
    assert al.fwd_window_kv_heads(2 * 8192, 16, 16, 128, kp, inference=True) == 16  # 8K: one window
    assert al.fwd_window_kv_heads(2 * 65536, 16, 16, 128, kp, inference=True) == 2
    for S in (65536, 131072):  # a KV head's partials fit: windows of KV heads
        assert al.fwd_row_window(2 * S, 16, 16, 128, kp, inference=True) is None
    assert al.fwd_window_kv_heads(2 * 131072, 16, 16, 128, kp, inference=True) == 1


def test_sm90_forward_consumes_an_owned_routing():
    """A forward that owns its routing (varlen_attention without gradients) writes the pair
    lists over the routing's query_rows: the index is allocated without its last piece."""
    q, k, r = _batch([1000, 17, 513], H=8, Hk=4, D=128, C=128, K=5)
    plan = al.FwdPlan(al._plan_key(q, k, r), "sm_90a", inference=True)
    ix = plan.index
    names = sorted(ix.layout.offsets, key=ix.layout.offsets.get)
    assert names[-1] == "rows_list" and ix.layout.offsets["rows_list"] + 4 * ix.list_cap <= ix.layout.nbytes
    assert ix.list_cap == r.query_rows.numel()
    own, p_own = plan.workspace("cpu")
    mine, p = plan.workspace("cpu", rows_list=r.query_rows.data_ptr())
    assert own[0].numel() - mine[0].numel() == ix.layout.nbytes - ix.layout.offsets["rows_list"]
    assert p["rows_list"] == r.query_rows.data_ptr() and p["counts"] - mine[0].data_ptr() == \
        p_own["counts"] - own[0].data_ptr()


def test_sm90_forward_staged_epilogue_plan(monkeypatch):
    """The segment kernel's staged epilogue is the default (its own compile key);
    MOBA_CUTE_FWD_STAGED=0 plans the fragment stores; other values are refused. (The persistent
    walk, which needs the staged epilogue, is held off so that the keys differ only there.)"""
    monkeypatch.setenv("MOBA_CUTE_FWD_PERSISTENT", "0")
    q, k, r = _batch([1000, 17, 513], H=8, Hk=4, D=128, C=128, K=5)
    key = al._plan_key(q, k, r)
    staged = al.FwdPlan(key, "sm_90a")
    monkeypatch.setenv("MOBA_CUTE_FWD_STAGED", "1")
    assert al.FwdPlan(key, "sm_90a").ks.specs["seg"][0] == staged.ks.specs["seg"][0]
    monkeypatch.setenv("MOBA_CUTE_FWD_STAGED", "0")
    plain = al.FwdPlan(key, "sm_90a")
    assert not plain.variant.staged and "staged" not in plain.ks.specs["seg"][0]
    assert staged.variant.staged and staged.ks.specs["seg"][0] == plain.ks.specs["seg"][0] + ("staged",)
    assert {n: s[0] for n, s in staged.ks.specs.items() if n != "seg"} == \
        {n: s[0] for n, s in plain.ks.specs.items() if n != "seg"}
    monkeypatch.setenv("MOBA_CUTE_FWD_STAGED", "yes")
    with pytest.raises(ValueError, match="MOBA_CUTE_FWD_STAGED must be 0 or 1"):
        al.FwdPlan(key, "sm_90a")


def test_sm90_forward_diagonal_plan(monkeypatch):
    """Causal plans on sm90 take the wgmma diagonal from ``DIAG_MIN_CHUNK``-key chunks on and the
    mma.sync one below (``MOBA_CUTE_FWD_DIAG_SM90`` forces either); non-causal plans have none."""
    from moba_cute.configs import attention_sm90 as cfg90

    monkeypatch.delenv("MOBA_CUTE_FWD_DIAG_SM90", raising=False)
    lo = cfg90.DIAG_MIN_CHUNK
    for C, want in ((lo, "moba_diag_sm90"), (lo // 2, "moba_fwd_sm80"), (2 * lo, "moba_diag_sm90")):
        q, k, r = _batch([3 * lo + 17, 100], H=4, Hk=2, D=128, C=C, K=3)
        plan = al.FwdPlan(al._plan_key(q, k, r), "sm_90a")
        assert plan.ks.specs["diag"][0][0] == want and plan.diag_sm90 == (want == "moba_diag_sm90"), C
    q, k, r = _batch([700, 100], H=4, Hk=2, D=64, C=64, K=3)
    key = al._plan_key(q, k, r)
    monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_SM90", "1")
    assert al.FwdPlan(key, "sm_90a").ks.specs["diag"][0][0] == "moba_diag_sm90"
    q, k, r = _batch([3 * lo, 100], H=4, Hk=2, D=128, C=lo, K=3)
    monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_SM90", "0")
    assert al.FwdPlan(al._plan_key(q, k, r), "sm_90a").ks.specs["diag"][0][0] == "moba_fwd_sm80"
    q, k, r = _batch([3 * lo, 100], H=4, Hk=2, D=128, C=lo, K=3, causal=False)
    monkeypatch.delenv("MOBA_CUTE_FWD_DIAG_SM90")
    plan = al.FwdPlan(al._plan_key(q, k, r), "sm_90a")
    assert "diag" not in plan.ks.specs and not plan.diag_sm90


def test_sm90_backward_long_chunks_plan(monkeypatch):
    """Chunks over 128 keys on Hopper without the chain (MOBA_CUTE_BWD_DQ_CHAIN=0): dK/dV per
    128-key tile and the dQ kernel that streams a chunk's tiles, its (chunk, KV head) pairs split
    over several CTAs."""
    monkeypatch.setenv("MOBA_CUTE_BWD_DQ_CHAIN", "0")
    q, k, r = _batch([600, 300], H=4, Hk=2, D=64, C=256, K=2)
    key = al._plan_key(q, k, r)
    plan = al.BwdPlan(key, "sm_90a")
    assert plan.sm90 and plan.ktiles == 2 and plan.zsplit >= 1
    assert {"bwd90_dkv", "dq90", "dq_reduce", "pair_list"} <= set(plan.ks.specs) and "bwd90" not in plan.ks.specs
    q2, k2, r2 = _batch([600, 300], H=4, Hk=2, D=64, C=128, K=2)
    short = al.BwdPlan(al._plan_key(q2, k2, r2), "sm_90a")
    assert short.ktiles == 1 and "bwd90" in short.ks.specs and "dq90" not in short.ks.specs


def test_sm90_backward_chain_plan(monkeypatch):
    """MOBA_CUTE_BWD_DQ_CHAIN=1, chunks over 128 keys: the one-pass kernel per key tile with the
    chain's semaphores (reset by their own kernel) and fp32 partials, no dK/dV-only or dQ kernel;
    short chunks keep the plain one-pass plan."""
    monkeypatch.setenv("MOBA_CUTE_BWD_DQ_CHAIN", "1")
    q, k, r = _batch([600, 300], H=4, Hk=2, D=128, C=256, K=2)
    plan = al.BwdPlan(al._plan_key(q, k, r), "sm_90a")
    assert plan.chain and plan.ktiles == 2 and "sems" in plan.layout.offsets
    assert {"bwd90", "zero32", "dq_reduce", "pair_list"} <= set(plan.ks.specs)
    assert "dq90" not in plan.ks.specs and "bwd90_dkv" not in plan.ks.specs
    assert "chain" in plan.ks.specs["bwd90"][0] and "f32" in plan.ks.specs["dq_reduce"][0]
    assert "pipe" not in plan.ks.specs["bwd90"][0]
    monkeypatch.setenv("MOBA_CUTE_BWD_CHAIN_PIPE", "1")  # (semaphores released one sub-tile later)
    assert "pipe" in al.BwdPlan(al._plan_key(q, k, r), "sm_90a").ks.specs["bwd90"][0]
    # (a semaphore per sub-tile of every (chunk, KV head))
    assert plan.nsem >= plan.list_cap // 64 + plan.nbound * plan.Hk
    q2, k2, r2 = _batch([600, 300], H=4, Hk=2, D=128, C=128, K=2)
    short = al.BwdPlan(al._plan_key(q2, k2, r2), "sm_90a")
    assert not short.chain and "chain" not in short.ks.specs["bwd90"][0]
    # (the reset kernel serves the persistent walk's counters there, if it is on)
    assert ("zero32" in short.ks.specs) == short.persistent


def test_sm90_backward_overlap_switch(monkeypatch):
    """MOBA_CUTE_BWD_OVERLAP (configs' BWD_OVERLAP): the one-pass kernel (chunks of one key tile,
    and the chain's) in FA3/FA4's order, except where its registers spill (BWD_OVERLAP_SPILLS)
    and with the chain's pipelined hand-over."""
    from moba_cute.configs import attention_sm90 as cfg90

    def ovl(C, causal=True, dtype=torch.bfloat16):
        q, k, r = _batch([600, 300], H=4, Hk=2, D=128, C=C, K=2, causal=causal, dtype=dtype)
        return "ovl" in al.BwdPlan(al._plan_key(q, k, r), "sm_90a").ks.specs["bwd90"][0]

    monkeypatch.delenv("MOBA_CUTE_BWD_OVERLAP", raising=False)
    monkeypatch.setenv("MOBA_CUTE_BWD_DQ_CHAIN", "1")
    assert ovl(128) == cfg90.BWD_OVERLAP and ovl(256) == cfg90.BWD_OVERLAP
    for value in ("0", "1"):
        monkeypatch.setenv("MOBA_CUTE_BWD_OVERLAP", value)
        assert ovl(128) == (value == "1") and ovl(256) == (value == "1")
        assert ovl(128, causal=False) == (value == "1")
        # the spilling configurations keep the sequential order
        assert not ovl(128, causal=False, dtype=torch.float16) and not ovl(256, causal=False)
    assert ("float16", 128, False, False) in cfg90.BWD_OVERLAP_SPILLS
    monkeypatch.setenv("MOBA_CUTE_BWD_CHAIN_PIPE", "1")
    assert not ovl(256)
    monkeypatch.setenv("MOBA_CUTE_BWD_OVERLAP", "yes")
    with pytest.raises(ValueError, match="MOBA_CUTE_BWD_OVERLAP"):
        ovl(128)


class _Recorder:
    """A kernel set that records the roles a launch sequence calls, and fails on a role its plan
    has no kernel for (what a GPU run would raise as KeyError)."""

    def __init__(self, specs):
        self.specs = specs
        self.calls = []

    def __getitem__(self, role):
        assert role in self.specs, f"the launch calls {role!r}, which its plan has no kernel for"
        return lambda *args: self.calls.append(role)


@pytest.mark.parametrize("arch,env", [
    ("sm_80", {}),
    ("sm_90a", {"MOBA_CUTE_FWD_SM80": "1"}),  # the sm80 forward forced on Hopper
    ("sm_90a", {}),
    ("sm_90a", {"MOBA_CUTE_FWD_PARTIAL_BYTES": "1"}),  # windows of rows
], ids=["sm80", "sm80-on-hopper", "sm90", "sm90-row-windows"])
def test_forward_index_launches_only_its_plans_kernels(arch, env, monkeypatch):
    """The forward's index launch sequence (``_SlotIndexPlan.launch``) calls only kernels its
    plan built, with and without the backward's kept pair list (sm90): a CPU check of the
    sequence each forward family runs."""
    import collections

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    q, k, r = _batch([600, 300], H=4, Hk=2, D=128, C=64, K=3)
    key = al._plan_key(q, k, r)
    plan = al.FwdPlan(key, arch)
    assert plan.sm90 == (arch == "sm_90a" and "MOBA_CUTE_FWD_SM80" not in env)
    p = collections.defaultdict(int)
    for kept in ((None, 0) if plan.sm90 else (None,)):
        ks = _Recorder(plan.ks.specs)
        plan.index.launch(ks, p, 0, 0, 0, 0, 0, plan.B, plan.total_q, plan.H, plan.K, None, 0, 0, bwd_pairs=kept)
        want = ("pair_list_dual" if kept is not None else "pair_list") if plan.sm90 else "slot_scatter"
        assert "slot_count" in ks.calls and want in ks.calls, ks.calls


@pytest.mark.parametrize("C,env", [
    (64, {"MOBA_CUTE_BWD_PERSISTENT": "1"}),
    (64, {"MOBA_CUTE_BWD_PERSISTENT": "0", "MOBA_CUTE_DQ_PARTIAL_BYTES": "1"}),  # windows of one KV head
    (256, {"MOBA_CUTE_BWD_DQ_CHAIN": "1"}),
    (256, {"MOBA_CUTE_BWD_DQ_CHAIN": "0"}),
], ids=["walk", "one-cta-windows", "long-chain", "long-dq-kernel"])
def test_sm90_launch_sequences_call_only_their_plans_kernels(C, env, monkeypatch):
    """The sm90 forward's and backward's launch sequences after the index (``_forward_sm90``,
    ``_backward_sm90``, with and without the LSE's gradient and the kept pair lists) call only
    kernels their plans built, every (KV-head) window its key-major kernel(s) and dQ reduction
    (CPU, a recording kernel set: no kernel runs)."""
    import collections

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    q, k, r = _batch([600, 300], H=4, Hk=2, D=128, C=C, K=3)
    key = al._plan_key(q, k, r)
    fwd = al.FwdPlan(key, "sm_90a")
    fwd.ks = _Recorder(fwd.ks.specs)
    p = collections.defaultdict(int)
    al._forward_sm90(fwd, p, q, k, k, 0, 0, 0, 0, 0, 0, 1.0, None)
    assert fwd.ks.calls.count("seg") == len(fwd.fwd_windows) and "diag" in fwd.ks.calls
    bwd = al.BwdPlan(key, "sm_90a")
    assert bwd.persistent == (env.get("MOBA_CUTE_BWD_PERSISTENT") == "1")
    assert bwd.chain == (env.get("MOBA_CUTE_BWD_DQ_CHAIN") == "1")
    nw = len(bwd.dq_windows)
    assert nw == (2 if "MOBA_CUTE_DQ_PARTIAL_BYTES" in env else 1)
    for dlse in (None, torch.zeros(4, q.shape[0])):
        for pairs_given in (False, True):
            bwd.ks = _Recorder(bwd.ks.specs)
            al._backward_sm90(bwd, p, q, k, k, q, q, 0, dlse, q, k, k, 0, 0, 0, 0, 0, 0, 1.0, 1.0, None,
                              pairs_given)
            calls = bwd.ks.calls
            assert calls[0] == ("bwd_prep" if dlse is None else "bwd_prep_dlse")
            assert ("pair_list" in calls) != pairs_given
            assert calls.count("dq_reduce") == nw
            if bwd.ktiles > 1 and not bwd.chain:
                assert calls.count("bwd90_dkv") == 1 and calls.count("dq90") == nw
            else:
                assert calls.count("bwd90") == nw
            assert ("zero32" in calls) == (bwd.chain or bwd.persistent)


def test_sm90_backward_persistent_switch(monkeypatch):
    """MOBA_CUTE_BWD_PERSISTENT (configs' BWD_PERSISTENT): the one-pass kernel for chunks of one key
    tile walks its units (compile key "persist", the counter reset "zero32", one counter per dQ
    window, a grid of at least one CTA per SM per window in chunks); not for longer chunks, nor
    in the sequential order."""
    from moba_cute.configs import attention_sm90 as cfg90

    def plan(C, dtype=torch.bfloat16, causal=True):
        q, k, r = _batch([600, 300], H=4, Hk=2, D=128, C=C, K=2, causal=causal, dtype=dtype)
        return al.BwdPlan(al._plan_key(q, k, r), "sm_90a")

    monkeypatch.delenv("MOBA_CUTE_BWD_PERSISTENT", raising=False)
    monkeypatch.delenv("MOBA_CUTE_BWD_OVERLAP", raising=False)
    assert plan(128).persistent == (cfg90.BWD_PERSISTENT and cfg90.BWD_OVERLAP)
    monkeypatch.setenv("MOBA_CUTE_BWD_PERSISTENT", "1")
    on = plan(64)
    assert on.persistent and on.ks.specs["bwd90"][0][-1] == "persist" and "zero32" in on.ks.specs
    assert on.layout.offsets["work"] >= 0 and len(on.dq_windows) >= 1
    for kv0, nkv, _ in on.dq_windows:
        chunks = on.bwd_chunks(nkv)
        assert chunks == min(on.nbound, -(-common.sm_count() // nkv)) and chunks <= on.bwd_grid
    assert not plan(256).persistent  # chunks of two key tiles
    assert not plan(128, torch.float16, causal=False).persistent  # the sequential order there
    monkeypatch.setenv("MOBA_CUTE_BWD_PERSISTENT", "0")
    off = plan(64)
    assert not off.persistent and "persist" not in off.ks.specs["bwd90"][0] and "zero32" not in off.ks.specs
    assert off.bwd_chunks(2) == off.bwd_grid
    monkeypatch.setenv("MOBA_CUTE_BWD_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="MOBA_CUTE_BWD_PERSISTENT"):
        plan(64)


def test_sm90_backward_takes_the_kept_pair_lists(monkeypatch):
    """The sm90 backward's workspace leaves out its pair-list piece (the layout's last) when the
    training forward kept the lists (``pairs``: their address); MOBA_CUTE_KEEP_BWD_PAIRS switches
    the keeping (configs' KEEP_BWD_PAIRS)."""
    from moba_cute.configs import attention_sm90 as cfg90

    q, k, r = _batch([600, 300], H=4, Hk=2, D=128, C=64, K=3)
    plan = al.BwdPlan(al._plan_key(q, k, r), "sm_90a")
    last = max(plan.layout.offsets, key=plan.layout.offsets.get)
    assert last == "pairs" and plan.layout.nbytes - plan.layout.offsets["pairs"] >= plan.list_cap * 4
    held, p = plan.workspace("cpu")
    assert held[0].numel() == plan.layout.nbytes
    held, p = plan.workspace("cpu", pairs=4096)
    assert held[0].numel() == plan.layout.offsets["pairs"] and p["pairs"] == 4096
    assert plan.list_cap == q.shape[0] * 4 * 3 == r.query_rows.numel()  # (the kept list's size)
    monkeypatch.delenv("MOBA_CUTE_KEEP_BWD_PAIRS", raising=False)
    assert al.kept_pairs_on() == cfg90.KEEP_BWD_PAIRS
    for value in ("0", "1"):
        monkeypatch.setenv("MOBA_CUTE_KEEP_BWD_PAIRS", value)
        assert al.kept_pairs_on() == (value == "1")


def test_sm90_backward_chain_memory_rule(monkeypatch):
    """By default the chain serves chunks over 128 keys where its fp32 partials for one KV head
    stay within BWD_CHAIN_MAX_BOUNDS times the dQ partial bound (topk <= 2 x KV heads past the
    1 GiB floor); beyond, the bf16 pair dQ kernel; MOBA_CUTE_BWD_DQ_CHAIN=1 / 0 forces either."""
    from moba_cute.configs import attention_sm90 as cfg90

    monkeypatch.delenv("MOBA_CUTE_BWD_DQ_CHAIN", raising=False)
    q, k, r = _batch([600, 300], H=4, Hk=2, D=128, C=256, K=3)  # per KV head: 900 * 2 * 3 * 128 * 4 bytes
    key = al._plan_key(q, k, r)
    per_kv = 900 * 2 * 3 * 128 * 4
    assert al.BwdPlan(key, "sm_90a").chain == cfg90.BWD_DQ_CHAIN  # (the 1 GiB floor)
    cap = per_kv // cfg90.BWD_CHAIN_MAX_BOUNDS
    monkeypatch.setenv("MOBA_CUTE_DQ_PARTIAL_BYTES", str(cap))  # at the limit: still the chain
    assert al.BwdPlan(key, "sm_90a").chain == cfg90.BWD_DQ_CHAIN
    monkeypatch.setenv("MOBA_CUTE_DQ_PARTIAL_BYTES", str(cap - 1))
    plan = al.BwdPlan(key, "sm_90a")
    assert not plan.chain and "dq90" in plan.ks.specs and "chain" not in str(plan.ks.specs["dq90"][0])
    monkeypatch.setenv("MOBA_CUTE_BWD_DQ_CHAIN", "1")
    assert al.BwdPlan(key, "sm_90a").chain
    monkeypatch.setenv("MOBA_CUTE_DQ_PARTIAL_BYTES", str(10 * per_kv))
    monkeypatch.setenv("MOBA_CUTE_BWD_DQ_CHAIN", "0")
    assert not al.BwdPlan(key, "sm_90a").chain


def test_sm90_backward_long_chunk_switches(monkeypatch):
    """The long-chunk backward's switches: the configs' defaults (pair dQ kernel, dK/dV ping-pong,
    reach skip) reach the plan's compile keys, MOBA_CUTE_BWD_* 0/1 override them when the plan is
    built, and any other value is refused naming the variable."""
    from moba_cute.configs import attention_sm90 as cfg90

    q, k, r = _batch([600, 300], H=4, Hk=2, D=128, C=256, K=2)
    key = al._plan_key(q, k, r)
    names = ("MOBA_CUTE_BWD_DQ_PAIR", "MOBA_CUTE_BWD_DKV_PINGPONG", "MOBA_CUTE_BWD_REACH_SKIP")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MOBA_CUTE_BWD_DQ_CHAIN", "0")  # (these kernels run without the chain)

    def keys():
        specs = al.BwdPlan(key, "sm_90a").ks.specs
        return specs["dq90"][0], specs["bwd90_dkv"][0]

    dq, dkv = keys()
    assert ("pair" in dq) == cfg90.BWD_DQ_PAIR and ("pingpong" in dkv) == cfg90.BWD_DKV_PINGPONG
    assert ("noskip" not in dkv) == cfg90.BWD_REACH_SKIP
    for value, want_dq, want_dkv in (("0", ("noskip",), ("dkv", "noskip")), ("1", ("pair",), ("dkv", "pingpong"))):
        for name in names:
            monkeypatch.setenv(name, value)
        dq, dkv = keys()
        assert dq == ("moba_bwd_dq_sm90", "bfloat16", 128, True) + want_dq
        assert dkv == ("moba_bwd_sm90", "bfloat16", 128, True) + want_dkv
    for name in names:
        monkeypatch.setenv(name, "yes")
        with pytest.raises(ValueError, match=name):
            keys()
        monkeypatch.setenv(name, "1")


def test_sm80_backward_fallback_on_hopper_warns_once(monkeypatch):
    """Head dims without sm90 tiles: the sm80 backward on Hopper, one warning naming the reason."""
    monkeypatch.setattr(al, "_WARNED", set())
    q, k, r = _batch([600, 300], H=4, Hk=2, D=96, C=128, K=2)
    key = al._plan_key(q, k, r)
    with pytest.warns(UserWarning, match="head_dim=96"):
        assert not al.BwdPlan(key, "sm_90a").sm90
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        al.BwdPlan(key, "sm_90a")  # once
        al.BwdPlan(key, "sm_80")  # Ampere: its own family, no warning


def test_sm90_backward_dispatch():
    assert al.uses_sm90_bwd("bfloat16", 128, "sm_90a")
    assert al.uses_sm90_bwd("float16", 64, "sm_90a")
    q, k, r = _batch([600, 300], H=4, Hk=2, D=128, C=4096, K=2)
    assert al.BwdPlan(al._plan_key(q, k, r), "sm_90a").sm90  # long chunks: dK/dV per key tile + dQ kernel
    assert not al.uses_sm90_bwd("bfloat16", 96, "sm_90a")
    assert not al.uses_sm90_bwd("bfloat16", 128, "sm_80")


def test_plans_refuse_int32_overflow():
    """Sizes past what the kernels' 32-bit indices cover are refused with the quantity named."""
    key = (torch.bfloat16, 1 << 22, 64, 128, 1 << 22, 64, 1, 128, 16, True, (1 << 22) // 128, 0)
    with pytest.raises(ValueError, match="exceeds 2\\^31-1"):
        al.FwdPlan(key, "sm_90a")


def test_routing_plan_cache():
    rl.PLANS.clear()
    args = (torch.bfloat16, 400, 4, 64, 400, 2, 2, 64, 3, True, "sm_90a")
    h0 = rl.PLANS.hits
    p = rl.PLANS.get(args[:-1] + (0,), *args)
    assert rl.PLANS.get(args[:-1] + (0,), *args) is p and rl.PLANS.hits == h0 + 1
    assert rl.PLANS.get((torch.bfloat16, 401) + args[2:-1] + (0,), torch.bfloat16, 401, *args[2:]) is not p
