"""The PyTorch reference against the brute-force float64 oracle (tests/oracle.py)."""

import math

import pytest
import torch

import moba_cute
from moba_cute import reference

from helpers import make_batch, make_cu
from oracle import oracle_attention, oracle_selection, selection_to_lists

# (lens_q, lens_k, H, Hk, D, chunk_size, topk, causal): SPEC section 3's list in small sizes.
CASES = [
    ([1], [1], 2, 1, 16, 16, 2, True),
    ([17], [17], 2, 2, 16, 16, 2, True),
    ([113], [113], 4, 2, 16, 16, 3, True),
    ([113], [113], 4, 2, 16, 16, 3, False),
    ([200, 1, 57, 64], [200, 1, 57, 64], 2, 1, 32, 32, 2, True),  # MQA, many sequences
    ([40, 100], [130, 100], 2, 2, 16, 16, 3, True),  # Sq < Sk: bottom-right alignment
    ([90, 33], [50, 20], 2, 1, 16, 16, 2, True),  # Sq > Sk: empty rows
    ([90, 33], [50, 20], 2, 1, 16, 16, 2, False),  # Sq != Sk non-causal
    ([150], [150], 8, 1, 16, 16, 4, True),  # GQA 8 groups
    ([100], [100], 2, 1, 16, 48, 1, True),  # K = 1: own chunk only
    ([100], [100], 2, 2, 16, 16, 10, True),  # K >= chunks: dense causal
    ([100], [100], 2, 2, 16, 16, 10, False),  # K >= chunks non-causal: dense
    ([77, 0, 31], [77, 5, 31], 2, 1, 16, 24, 3, True),  # empty sequence, chunk not multiple of 16
    ([31], [0], 2, 1, 16, 16, 2, True),  # no keys at all
]


def _ids(c):
    return f"q{c[0]}-k{c[1]}-H{c[2]}/{c[3]}-C{c[5]}-K{c[6]}-{'causal' if c[7] else 'full'}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_selection_matches_oracle_fp64(case):
    lq, lk, H, Hk, D, C, K, causal = case
    q, k, v, cu_q, cu_k = make_batch(lq, lk, H, Hk, D, seed=len(lq) + sum(lq))
    r = moba_cute.route(q, k, cu_q, cu_k, max(lq), max(lk), C, K, causal)
    assert r.selection.shape == (sum(lq), H, K) and r.selection.dtype == torch.int32
    assert selection_to_lists(r.selection, cu_q) == oracle_selection(q, k, cu_q, cu_k, C, K, causal)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_attention_and_grads_match_oracle_fp64(case):
    lq, lk, H, Hk, D, C, K, causal = case
    q, k, v, cu_q, cu_k = make_batch(lq, lk, H, Hk, D, seed=7 + sum(lk), requires_grad=True)
    out, lse = moba_cute.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), C, K, causal, return_lse=True)
    sel = oracle_selection(q.detach(), k.detach(), cu_q, cu_k, C, K, causal)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out_o, lse_o = oracle_attention(q2, k2, v2, cu_q, cu_k, C, sel, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (H, sum(lq))
    torch.testing.assert_close(out, out_o, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_o))
    fin = torch.isfinite(lse_o)
    torch.testing.assert_close(lse[fin], lse_o[fin], rtol=1e-10, atol=1e-10)
    if out.numel() == 0:
        return
    g = torch.randn_like(out)
    (out * g).sum().backward()
    if not out_o.requires_grad:  # no keys at all: nothing to differentiate, gradients are 0
        assert torch.all(q.grad == 0) and out.requires_grad
        return
    (out_o * g).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_lse_gradient_matches_oracle():
    q, k, v, cu_q, cu_k = make_batch([60, 20], [80, 10], 2, 1, 16, seed=3, requires_grad=True)
    out, lse = moba_cute.varlen_attention(q, k, v, cu_q, cu_k, 60, 80, 16, 2, return_lse=True)
    sel = oracle_selection(q.detach(), k.detach(), cu_q, cu_k, 16, 2, True)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out_o, lse_o = oracle_attention(q2, k2, v2, cu_q, cu_k, 16, sel, True)
    fin = torch.isfinite(lse_o)
    (lse[fin].sum() + out.sum()).backward()
    (lse_o[fin].sum() + out_o.sum()).backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_tiny(causal):
    q, k, v, cu_q, cu_k = make_batch([9, 5], [9, 7], 2, 1, 4, seed=11, requires_grad=True)

    def f(q, k, v):
        return moba_cute.varlen_attention(q, k, v, cu_q, cu_k, 9, 9, 3, 2, causal, softmax_scale=0.7)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)


def test_custom_scale_and_long_selection_fp64():
    q, k, v, cu_q, cu_k = make_batch([300], [300], 2, 2, 16, seed=5)
    out = moba_cute.varlen_attention(q, k, v, cu_q, cu_k, 300, 300, 32, 4, softmax_scale=0.31)
    sel = oracle_selection(q, k, cu_q, cu_k, 32, 4, True)
    out_o, _ = oracle_attention(q, k, v, cu_q, cu_k, 32, sel, True, scale=0.31)
    torch.testing.assert_close(out, out_o, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [1000, 4097])
def test_long_odd_length_selection(n):
    q, k, v, cu_q, cu_k = make_batch([n], [n], 2, 1, 16, seed=n)
    r = moba_cute.route(q, k, cu_q, cu_k, n, n, 128, 4)
    assert selection_to_lists(r.selection, cu_q) == oracle_selection(q, k, cu_q, cu_k, 128, 4, True)


def test_ties_go_to_the_larger_chunk():
    # every chunk of the keys is the same block of small integers, so all centroids and scores
    # are exact and tie bit for bit whatever the summation order
    C, nc = 16, 6
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (C, 1, 8), generator=g).to(torch.float32)
    k = base.repeat(nc, 1, 1)
    q = torch.randint(-3, 4, (nc * C, 1, 8), generator=g).to(torch.float32)
    cu = make_cu([nc * C])
    for causal, K in ((True, 3), (False, 4)):
        r = moba_cute.route(q, k, cu, cu, nc * C, nc * C, C, K, causal)
        last = r.selection[-1, 0].tolist()
        if causal:
            assert last == [5, 4, 3]  # own, then the most recent past chunks
            assert r.selection[3 * C, 0].tolist() == [3, 2, 1]
        else:
            assert last == [5, 4, 3, 2]


def test_partial_chunk_centroid_uses_real_length():
    k = torch.arange(1, 21, dtype=torch.float64).view(20, 1, 1)  # chunk 1 holds 17..20
    cent = reference.centroids(k, make_cu([20]), 16)
    assert cent[0, 0, 0].item() == pytest.approx(8.5)
    assert cent[1, 0, 0].item() == pytest.approx(18.5)


def test_topk_covering_every_chunk_is_dense_causal():
    # independent check against PyTorch's own dense causal attention
    q, k, v, cu_q, cu_k = make_batch([200], [200], 4, 2, 32, dtype=torch.float32, seed=9)
    out = moba_cute.varlen_attention(q, k, v, cu_q, cu_k, 200, 200, 16, 64)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.repeat_interleave(2, 1).transpose(0, 1)[None],
        v.repeat_interleave(2, 1).transpose(0, 1)[None], is_causal=True,
    )[0].transpose(0, 1)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_attention_within_rule(dtype):
    # SPEC section 3 style: error of the reference (fp32 compute) vs the fp64 oracle on the
    # same selection stays tiny; the output is in the input dtype.
    q, k, v, cu_q, cu_k = make_batch([130, 70], [130, 70], 4, 2, 32, dtype=dtype, seed=13)
    r = moba_cute.route(q, k, cu_q, cu_k, 130, 130, 16, 3)
    out, lse = moba_cute.attention_with_routing(q, k, v, r, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    sel = selection_to_lists(r.selection, cu_q)
    out_o, lse_o = oracle_attention(q, k, v, cu_q, cu_k, 16, sel, True)
    low, _ = reference.attention(q, k, v, r, compute_dtype=dtype)
    tol = 2 * (low.double() - out_o).abs().max().item() + 1e-5
    assert (out.double() - out_o).abs().max().item() <= tol
    torch.testing.assert_close(lse.double(), lse_o, rtol=1e-5, atol=1e-5)


def test_padded_attention_equals_varlen():
    B, S, H, Hk, D = 3, 50, 4, 2, 16
    q = torch.randn(B, S, H, D, dtype=torch.float64)
    k = torch.randn(B, S, Hk, D, dtype=torch.float64)
    v = torch.randn(B, S, Hk, D, dtype=torch.float64)
    out, lse = moba_cute.attention(q, k, v, 16, 2, return_lse=True)
    cu = make_cu([S] * B)
    out_v, lse_v = moba_cute.varlen_attention(q.reshape(-1, H, D), k.reshape(-1, Hk, D), v.reshape(-1, Hk, D),
                                              cu, cu, S, S, 16, 2, return_lse=True)
    assert out.shape == (B, S, H, D) and lse.shape == (B, H, S)
    torch.testing.assert_close(out.reshape(-1, H, D), out_v, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_v.view(H, B, S).permute(1, 0, 2), rtol=0, atol=0)


def test_empty_rows_are_zero_with_minus_inf_lse():
    q, k, v, cu_q, cu_k = make_batch([40], [10], 2, 1, 16, dtype=torch.float32, seed=2)
    out, lse = moba_cute.varlen_attention(q, k, v, cu_q, cu_k, 40, 10, 16, 2, return_lse=True)
    # p = i + 10 - 40 < 0 for the first 30 rows
    assert torch.all(out[:30] == 0)
    assert torch.all(lse[:, :30] == -math.inf)
    assert torch.isfinite(lse[:, 30:]).all()


def test_key_major_index_is_transpose_of_selection():
    q, k, v, cu_q, cu_k = make_batch([100, 3, 64], [120, 3, 40], 4, 2, 16, seed=21)
    r = moba_cute.route(q, k, cu_q, cu_k, 100, 120, 16, 3)
    cu_chunks = r.cu_chunks.tolist()
    assert cu_chunks == [0, 8, 9, 12]
    H = 4
    nbound = r.num_chunks_bound
    assert nbound >= cu_chunks[-1]
    expected = {}
    starts = cu_q.tolist()
    for b in range(3):
        for i in range(starts[b], starts[b + 1]):
            for h in range(H):
                for c in r.selection[i, h].tolist():
                    if c >= 0:
                        expected.setdefault((cu_chunks[b] + c) * H + h, []).append(i)
    offs = r.offsets.tolist()
    assert offs[0] == 0 and len(offs) == nbound * H + 1
    total = 0
    for seg in range(nbound * H):
        rows = r.query_rows[offs[seg] : offs[seg + 1]].tolist()
        assert rows == expected.get(seg, [])
        total += len(rows)
    assert offs[-1] == total
    assert torch.all(r.query_rows[total:] == -1)
    assert r.counts.shape == (nbound, H)


def test_32k_sequence_runs_in_bounded_memory():
    # the size: a 32K-token sequence, H=4, D=64. Work is linear in S (gathered chunks),
    # so this is quick; memory is bounded by the query block size, not S^2.
    S, H, D = 32768, 4, 64
    q, k, v, cu_q, cu_k = make_batch([S], [S], H, H, D, dtype=torch.bfloat16, seed=1)
    out = moba_cute.varlen_attention(q, k, v, cu_q, cu_k, S, S, 512, 3)
    assert out.shape == (S, H, D) and torch.isfinite(out.float()).all()


def test_cpu_backward_is_bitwise_deterministic():
    """A repeated forward+backward on the CPU gives bit-identical gradients (bf16). The query
    rows of each chunk are gathered with index_select, whose backward (index_add) accumulates
    in a fixed order; advanced indexing's backward (index_put_ with accumulate) did not, and dq
    differed between calls by up to ~5e-4 at this shape."""
    lens = [1000, 2049, 17]
    H, Hk, D, C, K = 8, 2, 128, 128, 4
    g = torch.Generator().manual_seed(0)
    n = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(n, h, D, generator=g).bfloat16() for h in (H, Hk, Hk))
    dout = torch.randn(n, H, D, generator=g).bfloat16()
    r = moba_cute.route(q, k, cu, cu, max(lens), max(lens), C, K, True)

    def grads():
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        out = moba_cute.attention_with_routing(qq, kk, vv, r)
        return torch.autograd.grad(out, (qq, kk, vv), dout)

    first = grads()
    for _ in range(3):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)
