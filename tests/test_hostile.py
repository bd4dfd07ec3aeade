"""Hostile inputs (issue 13, point 2): each gets a clear exception naming the argument and the
rule, or a defined result; never a fault, a hang or silent garbage. CPU tests run the
reference; the ``gpu``-marked tests run the same inputs through the CuTe kernels.
docs/reliability.md lists what every bad input gets."""

import math

import pytest
import torch

import moba_cute
from moba_cute import interface, reference

from helpers import make_batch, make_cu

NAN = float("nan")


def _run(q, k, v, cq, ck, C, K, causal=True, backend="reference", grad=False):
    lq = (cq[1:] - cq[:-1]).tolist()
    lk = (ck[1:] - ck[:-1]).tolist()
    mq, mk = max(lq + [0]), max(lk + [0])
    if grad:
        # (detach keeps the strides and storage offset: the layout tests need them)
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    o, lse = moba_cute.varlen_attention(q, k, v, cq, ck, mq, mk, C, K, causal, return_lse=True, backend=backend)
    if not grad:
        return o, lse, None
    if o.requires_grad:
        (o.float() * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum().backward()
    # (an input no output depends on gets no gradient, as anywhere in autograd: None = zeros)
    return o, lse, tuple(torch.zeros_like(t) if t.grad is None else t.grad for t in (q, k, v))


def _positions(cq, ck):
    """Key position p of every packed query row and its sequence index."""
    pos, seq = [], []
    for b in range(cq.numel() - 1):
        sq, sk = int(cq[b + 1] - cq[b]), int(ck[b + 1] - ck[b])
        pos += [i + sk - sq for i in range(sq)]
        seq += [b] * sq
    return torch.tensor(pos), torch.tensor(seq)


def _check_selection_in_bounds(r, cq, ck, C):
    sel = r.selection.cpu().long()
    _, seq = _positions(cq.cpu(), ck.cpu())
    lens_k = (ck[1:] - ck[:-1]).cpu().long()
    nc = ((lens_k + C - 1) // C)[seq].view(-1, 1, 1)
    assert ((sel >= -1) & (sel < nc)).all(), "selection out of bounds"
    used = sel >= 0
    # used slots first, distinct
    assert (used[..., :-1] | ~used[..., 1:]).all()
    for row in sel.view(-1, sel.shape[-1]).tolist():
        ids = [c for c in row if c >= 0]
        assert len(set(ids)) == len(ids)


# --------------------------------------------------------------------------------------------
# NaN / Inf


LENS = [40, 100, 64]  # three sequences; the NaN goes into the middle one (rows/keys 40..139)


def _nan_inputs(dtype=torch.float32, device="cpu", H=4, Hk=2, D=16):
    return make_batch(LENS, LENS, H, Hk, D, dtype=dtype, device=device, seed=3)


def _same_outside(a, b, rows):
    """a == b (bitwise) on every row not in ``rows`` (a bool mask over dim 0)."""
    keep = ~rows
    assert torch.equal(a[keep], b[keep])


@pytest.mark.parametrize("causal", [True, False])
def test_nan_in_q_reaches_exactly_its_row_and_head(causal):
    q, k, v, cq, ck = _nan_inputs()
    o0, l0, _ = _run(q, k, v, cq, ck, 16, 3, causal)
    q[130, 1, 5] = NAN
    r = moba_cute.route(q, k, cq, ck, 100, 100, 16, 3, causal)
    _check_selection_in_bounds(r, cq, ck, 16)
    # every score of the row is NaN, i.e. +inf: ties go to the most recent chunks
    p = 130 - 40  # local position (Sq = Sk)
    own = p // 16
    expect = ([own] + list(range(own - 1, -1, -1))[:2]) if causal else [6, 5, 4]
    assert r.selection[130, 1].tolist() == expect
    o, lse, _ = _run(q, k, v, cq, ck, 16, 3, causal)
    nan_o = torch.isnan(o).any(-1)
    assert nan_o.nonzero().tolist() == [[130, 1]]
    assert torch.isnan(lse).nonzero().tolist() == [[1, 130]]
    o0[130, 1], o[130, 1] = 0, 0
    assert torch.equal(o, o0)


@pytest.mark.parametrize("causal", [True, False])
def test_nan_in_k_propagates_like_dense_attention(causal):
    q, k, v, cq, ck = _nan_inputs()
    o0, l0, _ = _run(q, k, v, cq, ck, 16, 3, causal)
    t = 40 + 37  # key 37 of the middle sequence: chunk 2
    k[t, 0, 3] = NAN  # KV head 0 = query heads 0, 1
    r = moba_cute.route(q, k, cq, ck, 100, 100, 16, 3, causal)
    _check_selection_in_bounds(r, cq, ck, 16)
    o, lse, _ = _run(q, k, v, cq, ck, 16, 3, causal)
    nan_rows = torch.isnan(o).any(-1)  # (total_q, H)
    pos, seq = _positions(cq, ck)
    in_seq = seq == 1
    # dense attention: every row of the sequence that sees key 37 (p >= 37 when causal), in the
    # heads of KV head 0; the chunk's NaN score ranks first, so MoBA reaches the same rows
    sees = in_seq & ((pos >= 37) if causal else torch.ones_like(in_seq))
    expect = torch.zeros_like(nan_rows)
    expect[:, :2] = sees.view(-1, 1)
    assert torch.equal(nan_rows, expect)
    assert torch.equal(torch.isnan(lse).t(), expect)
    _same_outside(o, o0, expect.any(-1))


def test_nan_in_v_stays_in_its_sequence():
    q, k, v, cq, ck = _nan_inputs()
    o0, l0, g0 = _run(q, k, v, cq, ck, 16, 3, grad=True)
    v[40 + 37, 1, 0] = NAN
    o, lse, g = _run(q, k, v, cq, ck, 16, 3, grad=True)
    pos, seq = _positions(cq, ck)
    r = moba_cute.route(q, k, cq, ck, 100, 100, 16, 3)
    nan_o = torch.isnan(o).any(-1)  # (total_q, H)
    # every (row, head) that attends key 37 (chunk 2 selected, p >= 37; KV head 1 = heads 2, 3)
    # is NaN; a masked key's NaN value may reach other rows that load its chunk (0 * NaN, as in
    # dense kernels); nothing outside the sequence changes
    attends = (r.selection == 2).any(-1) & ((seq == 1) & (pos >= 37)).view(-1, 1)
    attends[:, :2] = False
    assert attends.any() and nan_o[attends].all()
    assert not nan_o[seq != 1].any() and not nan_o[:, :2].any()
    assert torch.equal(lse, l0)
    other = seq != 1
    assert torch.equal(o[other], o0[other])
    for a, b in zip(g, g0):
        keep = torch.ones(a.shape[0], dtype=torch.bool)
        keep[40:140] = False
        assert torch.equal(a[keep], b[keep])


@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_inf_input_is_defined_and_stays_in_its_sequence(where, value):
    q, k, v, cq, ck = _nan_inputs()
    o0, l0, g0 = _run(q, k, v, cq, ck, 16, 3, grad=True)
    (q if where == "q" else k)[77, 0, 2] = value
    r = moba_cute.route(q, k, cq, ck, 100, 100, 16, 3)
    _check_selection_in_bounds(r, cq, ck, 16)
    o, lse, g = _run(q, k, v, cq, ck, 16, 3, grad=True)
    _, seq = _positions(cq, ck)
    other = seq != 1
    assert torch.equal(o[other], o0[other]) and torch.equal(lse[:, other], l0[:, other])
    # an infinite score makes the rows that see it NaN (softmax of inf), as dense attention does
    assert torch.isnan(o[seq == 1]).any()
    keep = torch.ones(q.shape[0], dtype=torch.bool)
    keep[40:140] = False
    for a, b in zip(g, g0):
        assert torch.equal(a[keep], b[keep])


def test_nan_routing_ranks_nan_as_plus_inf():
    """The rule the kernels follow too: a NaN score counts as +inf (ties with +inf by index)."""
    scores = torch.tensor([[[1.0, NAN, 3.0, math.inf, -math.inf, 2.0]]])
    sel = reference._select(torch.where(torch.isnan(scores), math.inf, scores), torch.tensor([100]), 6, 16, 4,
                            False)
    assert sel.tolist() == [[[3, 1, 2, 5]]]


# --------------------------------------------------------------------------------------------
# strides, offsets, empty batches


def _layouts(dtype, device):
    """(name, q, k, v) views with the same values as the contiguous make_batch tensors."""
    q, k, v, cq, ck = make_batch([30, 50], [30, 50], 4, 2, 64, dtype=dtype, device=device, seed=5)
    out = [("contiguous", q, k, v)]
    # heads interleaved with other data (head stride 2 * D); (S, H, D) from a (H, S, D) buffer
    wide = torch.zeros(q.shape[0], 8, 64, dtype=dtype, device=device)
    wide[:, ::2] = q
    hsd = k.transpose(0, 1).contiguous().transpose(0, 1)
    out.append(("strided", wide[:, ::2], hsd, v.transpose(0, 1).contiguous().transpose(0, 1)))
    # 2-byte (one element) storage offsets: not 16-byte aligned
    def shifted(t):
        buf = torch.zeros(t.numel() + 1, dtype=dtype, device=device)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)
    out.append(("misaligned", shifted(q), shifted(k), shifted(v)))
    # K/V stored once per KV head and expanded over a zero stride in the token dim (a view that
    # reads one token's row for every token)
    k1 = k[:1].expand_as(k)
    v1 = v[:1].expand_as(v)
    out.append(("zero-stride", q, k1, v1))
    return out, cq, ck


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_and_misaligned_inputs_match_contiguous_copies(dtype):
    layouts, cq, ck = _layouts(dtype, "cpu")
    for name, q, k, v in layouts:
        o, lse, g = _run(q, k, v, cq, ck, 16, 3, grad=True)
        oc, lc, gc = _run(q.contiguous(), k.contiguous(), v.contiguous(), cq, ck, 16, 3, grad=True)
        # the same bits, except that fp32 matrix products on a zero-stride view may round
        # differently (the reference computes on the caller's fp32 tensors without copies)
        tol = 1e-6 if (dtype == torch.float32 and name == "zero-stride") else 0.0
        for a, b in zip((o, lse) + tuple(g), (oc, lc) + tuple(gc)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


def test_last_dim_stride_is_refused_even_when_zero():
    q, k, v, cq, ck = make_batch([30], [30], 2, 2, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="k must be contiguous in its last dimension"):
        moba_cute.varlen_attention(q, k[..., :1].expand_as(k), v, cq, ck, 30, 30, 16, 2)


EMPTY = [
    # lens_q, lens_k
    ([0], [0]),
    ([0, 0, 0], [0, 0, 0]),
    ([0], [37]),  # no queries
    ([19], [0]),  # no keys: empty rows
    ([0, 5, 0], [3, 0, 0]),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens", EMPTY, ids=[str(e) for e in EMPTY])
def test_zero_tokens_give_empty_or_empty_row_results(lens, causal):
    lq, lk = lens
    q, k, v, cq, ck = make_batch(lq, lk, 4, 2, 16, dtype=torch.float32, seed=1)
    o, lse, g = _run(q, k, v, cq, ck, 16, 3, causal, grad=True)
    assert o.shape == q.shape and lse.shape == (4, q.shape[0])
    assert [t.shape for t in g] == [q.shape, k.shape, v.shape]
    # rows without any key: out 0, lse -inf, zero gradients
    _, seq = _positions(cq, ck)
    lens_k = torch.tensor(lk)
    dead = lens_k[seq] == 0 if q.shape[0] else torch.zeros(0, dtype=torch.bool)
    assert (o[dead] == 0).all() and (lse[:, dead] == -math.inf).all()
    assert not torch.isnan(o).any() and not torch.isnan(g[0]).any()


def test_padded_zero_length():
    q = torch.randn(2, 0, 4, 16)
    k = torch.randn(2, 0, 2, 16)
    out, lse = moba_cute.attention(q, k, k, 16, 2, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 0)


# --------------------------------------------------------------------------------------------
# cu_seqlens values


WRONG_CU = [
    # (id, cu_seqlens_q, cu_seqlens_k, message fragment); tokens: q 60, k 60, lens [20, 40]
    ("past-total", [0, 20, 200], [0, 20, 60], "cu_seqlens_q must end at the total number of tokens (60)"),
    ("start-not-0", [0, 20, 60], [10, 20, 60], "cu_seqlens_k must start at 0"),
    ("decreasing", [0, 50, 30, 60], [0, 20, 40, 60], "cu_seqlens_q must be non-decreasing"),
    ("negative", [0, -20, 60], [0, 20, 60], "cu_seqlens_q must be non-decreasing"),
    ("huge", [0, 2**31 - 1, 60], [0, 20, 60], "cu_seqlens_q must be non-decreasing"),
    ("short-total", [0, 20, 50], [0, 20, 60], "cu_seqlens_q must end at the total number of tokens (60)"),
]


def wrong_cu_inputs(case, device="cpu", dtype=torch.float32, D=16):
    _, cq, ck, _ = case
    q, k, v, _, _ = make_batch([60], [60], 4, 2, D, dtype=dtype, device=device, seed=2)
    cq = torch.tensor(cq, dtype=torch.int32, device=device)
    ck = torch.tensor(ck, dtype=torch.int32, device=device)
    if cq.numel() != ck.numel():
        raise AssertionError
    return q, k, v, cq, ck


@pytest.mark.parametrize("case", WRONG_CU, ids=[c[0] for c in WRONG_CU])
def test_wrong_cu_seqlens_values_raise_on_cpu(case):
    q, k, v, cq, ck = wrong_cu_inputs(case)
    with pytest.raises(ValueError, match=case[3].replace("(", r"\(").replace(")", r"\)")):
        moba_cute.varlen_attention(q, k, v, cq, ck, 60, 60, 16, 3)
    with pytest.raises(ValueError, match=case[3].replace("(", r"\(").replace(")", r"\)")):
        moba_cute.route(q, k, cq, ck, 60, 60, 16, 3)


# --------------------------------------------------------------------------------------------
# routings that do not fit the call


def _routing_and_inputs():
    q, k, v, cq, ck = make_batch([30, 50], [30, 50], 4, 2, 16, dtype=torch.float32, seed=6)
    return moba_cute.route(q, k, cq, ck, 50, 50, 16, 3), q, k, v


def _tampered(r, **fields):
    import dataclasses

    return dataclasses.replace(r, **fields)


def test_tampered_routing_is_refused():
    r, q, k, v = _routing_and_inputs()
    moba_cute.attention_with_routing(q, k, v, r)  # the untouched one runs
    sel = r.selection.clone()
    sel[10, 1, 1] = 7  # sequence 0 has 2 chunks
    with pytest.raises(ValueError, match="routing.selection must hold local chunk ids"):
        moba_cute.attention_with_routing(q, k, v, _tampered(r, selection=sel))
    sel = r.selection.clone()
    sel[10, 1, 1] = -5
    with pytest.raises(ValueError, match="routing.selection must hold local chunk ids"):
        moba_cute.attention_with_routing(q, k, v, _tampered(r, selection=sel))
    qr = r.query_rows.clone()
    qr[0] = 79
    with pytest.raises(ValueError, match="routing.offsets / routing.query_rows must be the key-major index"):
        moba_cute.attention_with_routing(q, k, v, _tampered(r, query_rows=qr))
    with pytest.raises(TypeError, match="routing.offsets must be an int32 tensor"):
        moba_cute.attention_with_routing(q, k, v, _tampered(r, offsets=r.offsets.long()))
    with pytest.raises(ValueError, match=r"routing.cu_chunks must have shape \(3,\)"):
        moba_cute.attention_with_routing(q, k, v, _tampered(r, cu_chunks=r.cu_chunks[:2]))
    with pytest.raises(ValueError, match="routing.cu_chunks must be the chunk offsets"):
        moba_cute.attention_with_routing(q, k, v, _tampered(r, cu_chunks=r.cu_chunks + 1))
    with pytest.raises(ValueError, match="routing.cu_seqlens_k must end at the total"):
        moba_cute.attention_with_routing(q, k, v, _tampered(r, cu_seqlens_k=make_cu([30, 40])))


def test_routing_made_for_other_keys_is_refused():
    r, q, k, v = _routing_and_inputs()
    with pytest.raises(ValueError, match="routing.offsets must have shape"):
        moba_cute.attention_with_routing(q, k[:40], v[:40], r)


# --------------------------------------------------------------------------------------------
# sizes past the kernels' 32-bit indexing


def test_size_limits_name_the_rule():
    big = interface.kernel_size_limits(2**27, 16, 128, 2**27, 16, 1, 128, 1, True)
    rules = dict(big)
    assert rules["total_q * num_heads * topk"] == 2**31
    ok = dict(interface.kernel_size_limits(2**27 - 1, 16, 128, 2**20, 16, 1, 128, 1, True))
    assert ok["total_q * num_heads * topk"] < 2**31
    assert rules["chunk_size"] == 128
    assert dict(interface.kernel_size_limits(10, 1, 64, 10, 1, 1, 2**31, 1, True))["chunk_size"] > 2**31 - 1


LIMIT_SHAPES = [
    # total_q, H, D, total_k, Hk, B, C, K, causal
    (2**24, 16, 128, 2**24, 16, 1, 128, 8, True),   # 16M tokens x 16 heads x 8: 2^31
    (2**24 - 1, 16, 128, 2**24 - 1, 16, 1, 128, 8, True),
    (2**20, 32, 128, 2**20, 8, 1, 4096, 64, False),  # 2^31 again
    (2**20, 32, 128, 2**20, 8, 1, 4096, 63, False),
    (2**21, 64, 128, 2**21, 64, 4, 16, 16, True),    # many chunks: topk * chunks * H
    (1000, 8, 64, 2**28, 8, 1, 16, 4, True),         # total_k * Hk * D / 8 and chunk tables
    (2**22, 8, 64, 2**22, 8, 2**20, 64, 4, True),    # a million sequences
    (2**25, 64, 64, 2**25, 64, 1, 64, 1, True),      # total_q * H = 2^31
    (2**27, 16, 64, 2**8, 1, 1, 64, 1, True),
    (2**20, 16, 128, 2**30, 2, 1, 16, 2, True),      # total_k * Hk = 2^31, dK/dV grid
    (16777200, 16, 64, 4096, 1, 1, 128, 8, True),    # selection fits, + key-major blocks does not
]


def _plan_raises(build):
    try:
        build()
    except ValueError as e:
        assert "exceeds 2^31-1" in str(e)
        return True
    return False


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("shape", LIMIT_SHAPES, ids=[str(s) for s in LIMIT_SHAPES])
def test_size_checks_cover_the_launch_plans(shape, arch):
    """Whenever a launch plan (built on the host before its first kernel, no GPU needed) would
    refuse a size, the interface's up-front check refuses it too, so a call never launches the
    routing and then fails in the attention's plan."""
    pytest.importorskip("cutlass")
    from moba_cute.kernels import attention_launch, route_launch
    from moba_cute.routing import num_chunks_bound

    total_q, H, D, total_k, Hk, B, C, K, causal = shape
    fam = "sm90" if arch.startswith("sm_90") else "sm80"
    ours = [v for _, v in interface.kernel_size_limits(total_q, H, D, total_k, Hk, B, C, K, causal, fam)]
    refused = max(ours) > interface.INT32_MAX
    key = (torch.bfloat16, total_q, H, D, total_k, Hk, B, C, K, causal, num_chunks_bound(total_k, B, C), 0)
    plans = [lambda: route_launch._Plan(torch.bfloat16, total_q, H, D, total_k, Hk, B, C, K, causal, arch),
             lambda: attention_launch.FwdPlan(key, arch), lambda: attention_launch.BwdPlan(key, arch)]
    for build in plans:
        if _plan_raises(build):
            assert refused, f"a launch plan refuses {shape} on {arch} but the interface does not"


def test_too_large_call_is_refused_before_any_launch(monkeypatch):
    """With the kernel path forced (meta tensors: no memory), the call raises before routing."""
    from moba_cute import ops

    def boom(*a, **kw):
        raise AssertionError("a kernel path was entered")

    monkeypatch.setattr(interface, "_use_kernel", lambda *a, **kw: True)
    monkeypatch.setattr(interface, "_arch", lambda device: "sm90")
    monkeypatch.setattr(ops, "route_eager", boom)
    monkeypatch.setattr(reference, "route", boom)
    q = torch.empty(2**24, 16, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2**24, 16, 128, dtype=torch.bfloat16, device="meta")
    cu = torch.tensor([0, 2**24], dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"total_q \* num_heads \* topk = 2147483648 must be <= 2\^31-1"):
        moba_cute.varlen_attention(q, k, k, cu, cu, 2**24, 2**24, 128, 8)
    with pytest.raises(ValueError, match=r"total_q \* num_heads \* topk = 2147483648 must be <= 2\^31-1"):
        moba_cute.route(q, k, cu, cu, 2**24, 2**24, 128, 8)
    with pytest.raises(ValueError, match=r"chunk_size = 4294967296 must be <= 2\^31-1"):
        moba_cute.route(q[:10], k[:10], cu, cu, 10, 10, 2**32, 2)


# --------------------------------------------------------------------------------------------
# the same on the GPU (CuTe kernels)

gpu = pytest.mark.gpu


def _cuda(*ts):
    return [t.cuda() for t in ts]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_nan_in_q_and_k_matches_the_reference(dtype, D, causal):
    """Kernels: NaN ranks as +inf in the routing (same selection as the reference for the rows
    that see it) and the output and LSE of exactly the reference's rows are NaN."""
    for where in ("q", "k"):
        q, k, v, cq, ck = _nan_inputs(dtype=dtype, device="cuda", H=4, Hk=2, D=D)
        (q if where == "q" else k)[77, 0, 3] = NAN
        r = moba_cute.route(q, k, cq, ck, 100, 100, 16, 3, causal, backend="cute")
        rr = reference.route(q, k, cq, ck, 100, 100, 16, 3, causal)
        _check_selection_in_bounds(r, cq, ck, 16)
        if where == "q":  # all scores +inf: the whole row is decided by the tie rule
            assert torch.equal(r.selection[77, 0], rr.selection[77, 0])
        else:  # the NaN chunk (2) is picked by the same rows (heads 0, 1 of the middle sequence)
            assert torch.equal((r.selection[40:140, :2] == 2).any(-1), (rr.selection[40:140, :2] == 2).any(-1))
        o, lse = moba_cute.attention_with_routing(q, k, v, rr, return_lse=True, backend="cute")
        o_ref, lse_ref = reference.attention(q, k, v, rr)
        assert torch.equal(torch.isnan(o), torch.isnan(o_ref)), where
        assert torch.equal(torch.isnan(lse), torch.isnan(lse_ref)), f"{where}: LSE of NaN rows must be NaN"


@gpu
@pytest.mark.parametrize("where,value", [("q", NAN), ("k", NAN), ("v", NAN), ("q", math.inf), ("k", -math.inf)])
def test_gpu_bad_values_stay_in_their_sequence(where, value):
    """NaN/Inf in the middle sequence: forward and backward of the other sequences are bitwise
    those of the clean inputs (the kernels are deterministic), no fault."""
    q, k, v, cq, ck = _nan_inputs(dtype=torch.bfloat16, device="cuda", H=4, Hk=2, D=64)
    o0, l0, g0 = _run(q, k, v, cq, ck, 16, 3, backend="cute", grad=True)
    {"q": q, "k": k, "v": v}[where][77, 0, 2] = value
    o, lse, g = _run(q, k, v, cq, ck, 16, 3, backend="cute", grad=True)
    torch.cuda.synchronize()
    keep = torch.ones(q.shape[0], dtype=torch.bool, device="cuda")
    keep[40:140] = False
    assert torch.equal(o[keep], o0[keep]) and torch.equal(lse[:, keep], l0[:, keep])
    for a, b in zip(g, g0):
        assert torch.equal(a[keep], b[keep])


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_strided_and_misaligned_inputs(dtype):
    layouts, cq, ck = _layouts(dtype, "cuda")
    for name, q, k, v in layouts:
        o, lse, g = _run(q, k, v, cq, ck, 16, 3, backend="cute", grad=True)
        oc, lc, gc = _run(q.contiguous().clone(), k.contiguous().clone(), v.contiguous().clone(), cq, ck, 16, 3,
                          backend="cute", grad=True)
        assert torch.equal(o, oc) and torch.equal(lse, lc), name
        for a, b in zip(g, gc):
            assert torch.equal(a, b), name


@gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens", EMPTY, ids=[str(e) for e in EMPTY])
def test_gpu_zero_tokens(lens, causal):
    lq, lk = lens
    q, k, v, cq, ck = make_batch(lq, lk, 4, 2, 64, dtype=torch.bfloat16, device="cuda", seed=1)
    o, lse, g = _run(q, k, v, cq, ck, 16, 3, causal, backend="cute", grad=True)
    ro, rl, rg = _run(q.float(), k.float(), v.float(), cq, ck, 16, 3, causal, grad=True)
    torch.cuda.synchronize()
    assert o.shape == q.shape and lse.shape == (4, q.shape[0])
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    assert not torch.isnan(o).any() and all(not torch.isnan(t).any() for t in g)


@gpu
@pytest.mark.parametrize("case", WRONG_CU, ids=[c[0] for c in WRONG_CU])
def test_gpu_wrong_cu_seqlens(case):
    """Strict mode raises; otherwise the call runs (meaningless values) without a fault: the
    sanitizer sweep (benchmarks/sanitize.py) checks that it stays in bounds."""
    q, k, v, cq, ck = wrong_cu_inputs(case, device="cuda", dtype=torch.bfloat16, D=64)
    moba_cute.set_strict_checks(True)
    try:
        with pytest.raises(ValueError, match=case[3].replace("(", r"\(").replace(")", r"\)")):
            moba_cute.varlen_attention(q, k, v, cq, ck, 60, 60, 16, 3, backend="cute")
    finally:
        moba_cute.set_strict_checks(False)
    _run(q, k, v, cq, ck, 16, 3, backend="cute", grad=True)
    torch.cuda.synchronize()


@gpu
def test_gpu_strict_mode_accepts_a_kernel_routing():
    """Strict mode re-derives the key-major index of a routing on the GPU: the kernels' routing
    must pass it."""
    q, k, v, cq, ck = make_batch([300, 1, 77], [300, 1, 77], 8, 2, 64, dtype=torch.bfloat16, device="cuda")
    r = moba_cute.route(q, k, cq, ck, 300, 300, 32, 4, backend="cute")
    moba_cute.set_strict_checks(True)
    try:
        moba_cute.attention_with_routing(q, k, v, r, backend="cute")
    finally:
        moba_cute.set_strict_checks(False)
