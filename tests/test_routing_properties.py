"""Hypothesis properties of the routing (SPEC section 3's validity rule) on the reference."""

import torch
from hypothesis import given, settings, strategies as st

import moba_cute

from helpers import make_batch
from oracle import oracle_scores, seq_bounds


def check_routing(r, q, k, cu_q, cu_k, C, K, causal, tol):
    """Validity of a Routing against fp64 scores: counts, own chunk, top-k, order, transpose."""
    sel = r.selection
    H = q.shape[1]
    assert sel.shape == (q.shape[0], H, K) and sel.dtype == torch.int32
    scores = oracle_scores(q, k, cu_q, cu_k, C)
    for b, ((qa, qb), (ka, kb)) in enumerate(zip(seq_bounds(cu_q), seq_bounds(cu_k))):
        Sq, Sk = qb - qa, kb - ka
        nc = (Sk + C - 1) // C
        for i in range(Sq):
            p = i + Sk - Sq
            for h in range(H):
                row = sel[qa + i, h].tolist()
                used = [c for c in row if c >= 0]
                assert row == used + [-1] * (K - len(used)), "used slots must come first"
                assert len(set(used)) == len(used)
                sc = scores[b][i, h]
                if causal:
                    if p < 0:
                        assert used == []
                        continue
                    own = p // C
                    assert used[0] == own, "own chunk in slot 0"
                    rest, pool = used[1:], list(range(own))
                    assert len(used) == 1 + min(K - 1, own)
                else:
                    rest, pool = used, list(range(nc))
                    assert len(used) == min(K, nc)
                assert all(c in pool for c in rest)
                if rest:
                    others = [c for c in pool if c not in rest]
                    worst = min(float(sc[c]) for c in rest)
                    if others:
                        assert worst >= max(float(sc[c]) for c in others) - tol, "not a top-k"
                    vals = [float(sc[c]) for c in rest]
                    assert all(x >= y - tol for x, y in zip(vals, vals[1:])), "slots by descending score"
    # the key-major index is exactly the transpose of the query-major selection
    cu_chunks = r.cu_chunks.tolist()
    expect = {}
    for b, (qa, qb) in enumerate(seq_bounds(cu_q)):
        for i in range(qa, qb):
            for h in range(H):
                for c in sel[i, h].tolist():
                    if c >= 0:
                        expect.setdefault((cu_chunks[b] + c) * H + h, []).append(i)
    offs = r.offsets.tolist()
    got = {}
    for seg in range(len(offs) - 1):
        if offs[seg + 1] > offs[seg]:
            got[seg] = r.query_rows[offs[seg] : offs[seg + 1]].tolist()
    assert got == expect
    assert torch.all(r.query_rows[offs[-1] :] == -1)


lens = st.lists(st.integers(0, 70), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(
    lq=lens,
    extra=st.lists(st.integers(-20, 40), min_size=4, max_size=4),
    group=st.sampled_from([1, 2, 4]),
    hk=st.sampled_from([1, 2]),
    C=st.sampled_from([1, 3, 16, 32]),
    K=st.integers(1, 6),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_routing_is_valid(lq, extra, group, hk, C, K, causal, seed):
    lk = [max(0, n + e) for n, e in zip(lq, extra)]
    q, k, v, cu_q, cu_k = make_batch(lq, lk, hk * group, hk, 8, dtype=torch.float32, seed=seed)
    r = moba_cute.route(q, k, cu_q, cu_k, max(lq), max(lk), C, K, causal)
    check_routing(r, q, k, cu_q, cu_k, C, K, causal, tol=1e-4)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 200), C=st.sampled_from([16, 32]), K=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_routing_exact_with_clear_margins(n, C, K, seed):
    # centroid j is e_j-scaled: scores are j-dependent integers times a common factor, so no
    # two differ by less than ~1; rounding cannot reorder them and the selection is exact.
    nc = -(-n // C)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(nc, generator=g)
    k = torch.zeros(n, 1, 32)
    for j in range(nc):
        k[j * C : (j + 1) * C, 0, j % 32] = 1.0 + float(perm[j]) * (1 + j // 32)
    q = torch.ones(n, 1, 32)
    cu = torch.tensor([0, n], dtype=torch.int32)
    r = moba_cute.route(q, k, cu, cu, n, n, C, K, True)
    for i in range(n):
        own = i // C
        # the exact ranking by score (= centroid's single nonzero value)
        val = lambda j: float(k[j * C, 0, j % 32])
        past = sorted(range(own), key=lambda j: (-val(j), -j))[: K - 1]
        assert [c for c in r.selection[i, 0].tolist() if c >= 0] == [own] + past
