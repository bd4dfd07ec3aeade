"""GPU tests of the CuTe routing kernels (skipped without CUDA).

Checks against the fp64 scores: every selection is a valid top-k up to a rounding tolerance,
the own chunk is in slot 0 (causal), counts are min(K, available), order is descending;
exact equality with the reference on inputs with clear score margins; bit-identical repeats;
the key-major index equals the transpose of the selection; centroids vs fp64; and the
agreement rate with the fp32-score selection (printed, must be >= 99.9%).
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _rl():
    from moba_cute.kernels import route_launch

    return route_launch


def _make(lens_q, lens_k, H, Hk, D, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, H, D, generator=g).to(DEV, dtype)
    k = torch.randn(tk, Hk, D, generator=g).to(DEV, dtype)
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
    return q, k, cq, ck


def _transpose(sel, cq, cu_chunks, nbound):
    """Key-major (offsets, query_rows) from a query-major selection, in PyTorch."""
    total_q, H, K = sel.shape
    bidx = torch.repeat_interleave(torch.arange(cq.numel() - 1, device=DEV), (cq[1:] - cq[:-1]).long(), output_size=total_q)
    rows = torch.arange(total_q, device=DEV).view(-1, 1, 1).expand(total_q, H, K)
    heads = torch.arange(H, device=DEV).view(1, -1, 1).expand(total_q, H, K)
    gch = cu_chunks[bidx].long().view(-1, 1, 1) + sel.long()
    valid = sel >= 0
    seg = (gch * H + heads)[valid]
    r = rows[valid]
    key = seg * (total_q + 1) + r
    order = torch.argsort(key)
    counts = torch.bincount(seg, minlength=nbound * H)
    offsets = torch.zeros(nbound * H + 1, dtype=torch.int64, device=DEV)
    offsets[1:] = counts.cumsum(0)
    qr = torch.full((total_q * H * K,), -1, dtype=torch.int32, device=DEV)
    qr[: r.numel()] = r[order].int()
    return offsets.int(), qr


def _check_valid(r, q, k, cq, ck, C, K, causal, tol_rel=2e-5):
    """SPEC section 3 validity against fp64 scores; returns the number of rows checked."""
    from moba_cute.reference import centroids

    H, Hk = q.shape[1], k.shape[1]
    G = H // Hk
    cent = centroids(k.double(), ck, C)  # fp64
    sel = r.selection.cpu()
    cqs, cks = cq.tolist(), ck.tolist()
    cuc = r.cu_chunks.tolist()
    nrows = 0
    for b in range(len(cqs) - 1):
        sq, sk = cqs[b + 1] - cqs[b], cks[b + 1] - cks[b]
        nc = cuc[b + 1] - cuc[b]
        assert nc == -(-sk // C)
        if sq == 0:
            continue
        qb = q[cqs[b]:cqs[b + 1]].double()
        cb = cent[cuc[b]:cuc[b + 1]].repeat_interleave(G, dim=1)  # (nc, H, D)
        sc = torch.einsum("rhd,chd->rhc", qb, cb).cpu()  # (sq, H, nc)
        scale = (qb.norm(dim=-1).unsqueeze(-1) * cb.norm(dim=-1).amax(0).view(1, H, 1)).cpu() + 1e-30
        pos = torch.arange(sq) + (sk - sq)
        sb = sel[cqs[b]:cqs[b + 1]].long()  # (sq, H, K)
        for i in range(sq):
            p = int(pos[i])
            for h in range(H):
                row = sb[i, h].tolist()
                if causal and (p < 0 or nc == 0):
                    assert all(x == -1 for x in row), (b, i, h, row)
                    continue
                if causal:
                    own = p // C
                    assert row[0] == own, (b, i, h, row, own)
                    avail = own
                    rest = row[1:]
                    kk = K - 1
                else:
                    avail = nc
                    rest = row
                    kk = K
                n_used = min(kk, avail)
                used = [x for x in rest if x >= 0]
                assert len(used) == n_used and all(x == -1 for x in rest[n_used:]), (b, i, h, row, avail)
                assert len(set(used)) == len(used)
                assert all(0 <= x < avail for x in used), (row, avail)
                if n_used and n_used < avail:
                    s = sc[i, h, :avail]
                    tol = tol_rel * float(scale[i, h, 0])
                    mask = torch.ones(avail, dtype=torch.bool)
                    mask[used] = False
                    assert float(s[used].min()) >= float(s[mask].max()) - tol, (b, i, h, row)
                if n_used > 1:  # descending order up to tolerance
                    s = sc[i, h]
                    vals = [float(s[x]) for x in used]
                    tol = tol_rel * float(scale[i, h, 0])
                    assert all(vals[t] >= vals[t + 1] - tol for t in range(len(vals) - 1)), (row, vals)
                nrows += 1
    return nrows


CASES = [
    # lens_q, lens_k, H, Hk, D, C, K, causal, dtype
    ([1000], [1000], 4, 4, 128, 64, 4, True, torch.bfloat16),
    ([113, 4097, 1, 17], [113, 4097, 1, 17], 4, 2, 64, 128, 3, True, torch.float16),
    ([500, 300], [900, 1200], 8, 1, 128, 16, 8, True, torch.bfloat16),  # Sq < Sk, MQA
    ([900], [300], 2, 2, 128, 32, 5, True, torch.bfloat16),  # Sq > Sk: empty rows
    ([700, 64], [1000, 64], 8, 8, 64, 48, 1, True, torch.bfloat16),  # K = 1
    ([640], [640], 4, 4, 128, 16, 64, True, torch.bfloat16),  # K large
    ([300, 513], [300, 513], 4, 2, 128, 32, 6, False, torch.float16),
    ([257], [1025], 6, 3, 96, 64, 20, False, torch.bfloat16),  # G=3, D=96, K >= chunks
    ([333], [333], 4, 2, 256, 32, 7, True, torch.bfloat16),
    ([333], [333], 4, 4, 192, 32, 33, True, torch.float16),
    # long rows (>= 256 chunks)
    ([4200, 100], [4200, 100], 2, 1, 128, 16, 8, True, torch.bfloat16),
    ([4500], [4500], 2, 2, 64, 16, 9, False, torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_route_valid_and_index(case):
    lens_q, lens_k, H, Hk, D, C, K, causal, dtype = case
    q, k, cq, ck = _make(lens_q, lens_k, H, Hk, D, dtype, seed=len(lens_q) * 7 + D + K)
    rl = _rl()
    r = rl.route_cute(q, k, cq, ck, max(lens_q), max(lens_k), C, K, causal)
    torch.cuda.synchronize()
    n = _check_valid(r, q, k, cq, ck, C, K, causal)
    assert n > 0 or not causal or True
    # key-major == transpose of query-major
    off, qr = _transpose(r.selection, cq, r.cu_chunks, r.num_chunks_bound)
    assert torch.equal(r.offsets, off)
    assert torch.equal(r.query_rows, qr)
    # bit-identical repeat
    r2 = rl.route_cute(q, k, cq, ck, max(lens_q), max(lens_k), C, K, causal)
    assert torch.equal(r.selection, r2.selection)
    assert torch.equal(r.offsets, r2.offsets) and torch.equal(r.query_rows, r2.query_rows)


def test_centroids_vs_fp64():
    from moba_cute.reference import centroids

    for dtype in (torch.bfloat16, torch.float16):
        for (lens, C, Hk, D) in (([1000, 1, 0, 4097], 128, 2, 128), ([77, 300], 16, 3, 64), ([5000], 4096, 1, 256)):
            _, k, _, ck = _make([1], lens, 1, Hk, D, dtype)
            got = _rl().centroids_cute(k, ck, C)
            ref = centroids(k.double(), ck, C)
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert torch.allclose(got.double(), ref, atol=1e-6, rtol=1e-5), (got.double() - ref).abs().max()


@pytest.mark.parametrize("K", [6, 24, 40], ids=["K6", "K24-smem-list", "K40-smem-list"])
def test_exact_on_clear_margins(K):
    """Scores well separated: the selection must equal the reference exactly (K = 24 and 40:
    the shared-memory lists, filling and full; 32 chunks)."""
    from moba_cute import reference

    torch.manual_seed(0)
    S, H, D, C = 2048, 4, 128, 64
    nc = S // C
    u = torch.randn(H, D, device=DEV)
    u = u / u.norm(dim=-1, keepdim=True)
    scales = torch.randperm(nc, device=DEV).float() / nc + 0.5  # distinct, spaced 1/nc
    k = (scales.view(nc, 1, 1, 1) * u.view(1, 1, H, D)).expand(nc, C, H, D).reshape(S, H, D)
    q = (4.0 * u).view(1, H, D).expand(S, H, D).contiguous()
    q = q.to(torch.bfloat16)
    k = k.to(torch.bfloat16).contiguous()
    cu = torch.tensor([0, S], dtype=torch.int32, device=DEV)
    for causal in (True, False):
        r = _rl().route_cute(q, k, cu, cu, S, S, C, K, causal)
        ref = reference.route(q, k, cu, cu, S, S, C, K, causal)
        assert torch.equal(r.selection, ref.selection.to(DEV))
        assert torch.equal(r.offsets, ref.offsets.to(DEV))
        assert torch.equal(r.query_rows, ref.query_rows.to(DEV))


@pytest.mark.parametrize("C", [128, 16], ids=["C128", "C16"])
def test_agreement_with_fp32_selection(C):
    """Random inputs: rows whose selection equals the fp32-score selection (target >= 99.9%).
    On sm90 every case takes the warpgroup-MMA top-k tile (D = 128); C=16 gives 256 chunks per
    row, C=128 32."""
    from moba_cute import reference

    rates = []
    for dtype, causal in ((torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)):
        q, k, cq, ck = _make([4096, 2048], [4096, 2048], 8, 2, 128, dtype, seed=3)
        r = _rl().route_cute(q, k, cq, ck, 4096, 4096, C, 8, causal)
        ref = reference.route(q.float(), k.float(), cq, ck, 4096, 4096, C, 8, causal)
        a = r.selection
        b = ref.selection.to(DEV)
        same = (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()
        rates.append(same)
        print(f"agreement with fp32 selection ({dtype}, causal={causal}, C={C}): {100 * same:.4f}%")
    assert min(rates) >= 0.999


def test_many_sequences_and_garbage_cu_seqlens():
    rl = _rl()
    lens = [int(x) for x in torch.randint(0, 200, (3000,)).tolist()]
    q, k, cq, ck = _make(lens, lens, 2, 1, 64, torch.bfloat16, seed=5)
    r = rl.route_cute(q, k, cq, ck, max(lens), max(lens), 32, 4, True)
    torch.cuda.synchronize()
    off, qr = _transpose(r.selection, cq, r.cu_chunks, r.num_chunks_bound)
    assert torch.equal(r.offsets, off) and torch.equal(r.query_rows, qr)
    # garbage cu_seqlens must not crash (memory safety only)
    bad = torch.tensor([5, -100, 10**9, 3, 2**31 - 1], dtype=torch.int32, device=DEV)
    q2 = q[:1000].contiguous()
    k2 = k[:1000].contiguous()
    rl.route_cute(q2, k2, bad, bad.flip(0).contiguous(), 1000, 1000, 32, 4, True)
    torch.cuda.synchronize()


def test_prep_fused_and_separate_agree():
    """Up to cfg.PREP_FUSED_MAX_SEQS sequences the centroids kernel does the chunk bookkeeping
    itself (warp scan); one more (empty) sequence takes the separate prep kernel. Both must give
    the same routing, and the fused one must be the transpose-consistent index."""
    from moba_cute.configs import routing as cfg

    rl = _rl()
    nseq = cfg.PREP_FUSED_MAX_SEQS
    g = torch.Generator().manual_seed(11)
    lens = [int(x) for x in torch.randint(0, 400, (nseq,), generator=g).tolist()]
    lens[3] = 0
    lens[nseq - 1] = 0
    q, k, cq, ck = _make(lens, lens, 4, 2, 64, torch.bfloat16, seed=13)
    r1 = rl.route_cute(q, k, cq, ck, max(lens), max(lens), 32, 5, True)
    cq2 = torch.cat([cq, cq[-1:]]).contiguous()
    ck2 = torch.cat([ck, ck[-1:]]).contiguous()
    r2 = rl.route_cute(q, k, cq2, ck2, max(lens), max(lens), 32, 5, True)
    torch.cuda.synchronize()
    nch = int(r1.cu_chunks[-1])
    exp = torch.tensor([0] + [(x + 31) // 32 for x in lens], dtype=torch.int64).cumsum(0)
    assert torch.equal(r1.cu_chunks.cpu().long(), exp)
    assert torch.equal(r2.cu_chunks[: nseq + 1], r1.cu_chunks) and int(r2.cu_chunks[-1]) == nch
    assert torch.equal(r1.selection, r2.selection)
    nused = nch * 4 + 1
    assert torch.equal(r1.offsets[:nused], r2.offsets[:nused])
    assert torch.equal(r1.query_rows, r2.query_rows)
    off, qr = _transpose(r1.selection, cq, r1.cu_chunks, r1.num_chunks_bound)
    assert torch.equal(r1.offsets, off) and torch.equal(r1.query_rows, qr)
    n = _check_valid(r1, q, k, cq, ck, 32, 5, True)
    assert n > 0


ALT_TILES = [
    ("mma.sync two-stage (the sm80 tile)", (128, 32, 2, 32, 0, 0)),
    # the other tiles the tuner may choose (configs/routing.py topk_tune_tiles)
    ("mma.sync two-stage 128x16", (128, 16, 2, 32, 0, 0)),
    ("mma.sync two-stage 64x32", (64, 32, 2, 32, 0, 0)),
    ("mma.sync two-stage 64x16", (64, 16, 2, 32, 0, 0)),
    ("mma.sync one-stage, 16-column passes", (128, 32, 1, 16, 4, 0)),
    ("wgmma, 16-column passes", (128, 32, 1, 16, 4, 1)),
]


@pytest.mark.parametrize("tile", [t for _, t in ALT_TILES], ids=[n for n, _ in ALT_TILES])
@pytest.mark.parametrize("case", [0, 1, 2, 5, 6, 10], ids=lambda c: f"case{c}")
def test_other_topk_tiles(tile, case):
    """The top-k tiles this GPU does not pick by default (sm80's mma.sync tile among them),
    forced through the tuning override: valid selections and a transpose-consistent index."""
    lens_q, lens_k, H, Hk, D, C, K, causal, dtype = CASES[case]
    q, k, cq, ck = _make(lens_q, lens_k, H, Hk, D, dtype, seed=len(lens_q) * 7 + D + K)
    rl = _rl()
    with rl.topk_tile_override(tile):
        r = rl.route_cute(q, k, cq, ck, max(lens_q), max(lens_k), C, K, causal)
        torch.cuda.synchronize()
    _check_valid(r, q, k, cq, ck, C, K, causal)
    off, qr = _transpose(r.selection, cq, r.cu_chunks, r.num_chunks_bound)
    assert torch.equal(r.offsets, off) and torch.equal(r.query_rows, qr)


@pytest.mark.parametrize("case", [0, 1, 2, 5, 6, 10, 11], ids=lambda c: f"case{c}")
def test_tuner_topk_tiles_agree_bitwise(case):
    """Every top-k tile the tuner may choose (configs/tuned.py, this GPU's family) gives the
    built-in tile's routing bit for bit: the top-k is exact, so a table can never change it."""
    from moba_cute.configs import tuned
    from moba_cute.kernels import common

    lens_q, lens_k, H, Hk, D, C, K, causal, dtype = CASES[case]
    rl = _rl()
    fam = rl.topk_family(common.arch_of(torch.device("cuda")))
    cands = tuned.candidates(fam, D)
    assert len(cands) >= 4
    q, k, cq, ck = _make(lens_q, lens_k, H, Hk, D, dtype, seed=case + 41)
    base = rl.route_cute(q, k, cq, ck, max(lens_q), max(lens_k), C, K, causal)
    for t in cands[1:]:
        with rl.tile_override(fam, t):
            r = rl.route_cute(q, k, cq, ck, max(lens_q), max(lens_k), C, K, causal)
        for name in ("selection", "offsets", "query_rows"):
            assert torch.equal(getattr(r, name), getattr(base, name)), (t, name)
