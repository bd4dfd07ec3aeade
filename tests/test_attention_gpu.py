"""GPU correctness of the CuTe MoBA forward and backward (SPEC section 3) against the fp32
reference with the same routing, through whichever family the device dispatches (on Hopper the
sm90 kernels). Outputs are pre-filled with NaN; error bound = 2x (forward) or 3x (gradients) the
error of the same computation done by PyTorch in the input dtype, + 1e-5."""

import math
import random

import pytest
import torch

from moba_cute import reference
from helpers import make_batch

pytestmark = pytest.mark.gpu


def _launch():
    from moba_cute.kernels import attention_launch

    return attention_launch


def _lse_err(a, b):
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb), "LSE infinities differ"
    assert torch.equal(a[~fa], b[~fb]), "LSE infinities differ"
    return (a[fa].double() - b[fb].double()).abs().max().item() if fa.any() else 0.0


def check_against_reference(o, l, q, k, v, r, scale, dtype):
    """SPEC section 3: ``o``/``l`` written (no NaN) and within twice the error of the reference
    computed in ``dtype`` (+1e-5) from the fp32 reference, for routing ``r``."""
    o32, l32 = reference.attention(q, k, v, r, softmax_scale=scale)
    olp, llp = reference.attention(q, k, v, r, softmax_scale=scale, compute_dtype=dtype)
    assert not torch.isnan(o).any(), "unwritten or NaN output"
    assert not torch.isnan(l).any(), "unwritten or NaN lse"
    err = (o.double() - o32.double()).abs().max().item()
    ref_err = (olp.double() - o32.double()).abs().max().item()
    assert err <= 2 * ref_err + 1e-5, f"out err {err} > 2 * {ref_err} + 1e-5"
    lerr = _lse_err(l, l32)
    lref = _lse_err(llp.float(), l32)
    assert lerr <= 2 * lref + 1e-5, f"lse err {lerr} > 2 * {lref} + 1e-5"


def _check(lens_q, lens_k, H, Hk, D, C, K, causal, dtype, scale=None, seed=0):
    dev = "cuda"
    q, k, v, cq, ck = make_batch(lens_q, lens_k, H, Hk, D, dtype=dtype, device=dev, seed=seed)
    r = reference.route(q, k, cq, ck, max(lens_q), max(lens_k), C, K, causal)
    m = _launch()
    assert m.attention_unsupported_reason(dtype, D, C, K, "sm_80") is None
    out = torch.full_like(q, float("nan"))
    lse = torch.full((H, q.shape[0]), float("nan"), dtype=torch.float32, device=dev)
    o, l = m.attention_cute(q, k, v, r, scale, False, out=out, lse=lse)
    torch.cuda.synchronize()
    check_against_reference(o, l, q, k, v, r, scale, dtype)
    # deterministic: a second run is bitwise identical
    o2, l2 = m.attention_cute(q, k, v, r, scale, False)
    assert torch.equal(o2, o) and torch.equal(l2, l)


_rng = random.Random(1)
_MANY = [_rng.randint(1, 90) for _ in range(48)]

CASES = [
    # lens_q, lens_k, H, Hk, C, K, causal
    ([1, 17, 113, 1000], [1, 17, 113, 1000], 4, 4, 64, 4, True),
    ([4097], [4097], 2, 1, 128, 8, True),
    (_MANY, _MANY, 8, 1, 32, 3, True),
    ([100, 300], [300, 100], 4, 2, 48, 3, True),
    ([1000], [1000], 2, 2, 64, 1, True),
    ([200, 17], [200, 17], 2, 1, 64, 8, True),
    ([300], [300], 2, 2, 16, 5, True),
    ([113, 1000], [1000, 113], 4, 2, 64, 3, False),
    ([200, 5], [150, 70], 2, 2, 48, 8, False),
    ([64, 1], [0, 9], 2, 1, 16, 2, False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward(case, D, dtype):
    lq, lk, H, Hk, C, K, causal = CASES[case]
    _check(lq, lk, H, Hk, D, C, K, causal, dtype, seed=case)


def test_softmax_scale():
    _check([333], [333], 2, 1, 128, 64, 3, True, torch.bfloat16, scale=0.3, seed=7)


# ------------------------------------------------------------------------------- backward

def _ref_grads(q, k, v, r, dout, dlse, scale, cdt):
    """dq, dk, dv of sum(out * dout) (+ sum(lse * dlse)) through the reference's autograd,
    computed in ``cdt`` (None: fp32)."""
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o, l = reference.attention(qq, kk, vv, r, softmax_scale=scale, compute_dtype=cdt)
    loss = (o.float() * dout.float()).sum()
    if dlse is not None:
        lf = torch.where(torch.isfinite(l), l, torch.zeros_like(l)).float()
        loss = loss + (lf * dlse).sum()
    return torch.autograd.grad(loss, (qq, kk, vv))


def _grad_errs(got, q, k, v, r, dout, dlse, scale, dtype):
    g32 = _ref_grads(q, k, v, r, dout, dlse, scale, None)
    glp = _ref_grads(q, k, v, r, dout, dlse, scale, dtype)
    for name, a, b32, blp in zip(("dq", "dk", "dv"), got, g32, glp):
        assert not torch.isnan(a).any(), f"unwritten or NaN {name}"
        err = (a.double() - b32.double()).abs().max().item() if a.numel() else 0.0
        ref_err = (blp.double() - b32.double()).abs().max().item() if a.numel() else 0.0
        assert err <= 3 * ref_err + 1e-5, f"{name} err {err} > 3 * {ref_err} + 1e-5"


def _check_bwd(lens_q, lens_k, H, Hk, D, C, K, causal, dtype, scale=None, seed=0, with_lse=False):
    dev = "cuda"
    q, k, v, cq, ck = make_batch(lens_q, lens_k, H, Hk, D, dtype=dtype, device=dev, seed=seed)
    r = reference.route(q, k, cq, ck, max(lens_q), max(lens_k), C, K, causal)
    m = _launch()
    out, lse = m.attention_cute(q, k, v, r, scale, True)
    g = torch.Generator(device="cpu").manual_seed(seed + 1000)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dev, dtype)
    dlse = torch.randn(H, q.shape[0], generator=g, dtype=torch.float64).to(dev, torch.float32) if with_lse else None
    bufs = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    dq, dk, dv = m.attention_backward_cute(q, k, v, out, lse, dout, dlse, r, scale, True,
                                           dq=bufs[0], dk=bufs[1], dv=bufs[2])
    torch.cuda.synchronize()
    _grad_errs((dq, dk, dv), q, k, v, r, dout, dlse, scale, dtype)
    # deterministic: bitwise identical on a second run
    dq2, dk2, dv2 = m.attention_backward_cute(q, k, v, out, lse, dout, dlse, r, scale, True)
    assert torch.equal(dq2, dq) and torch.equal(dk2, dk) and torch.equal(dv2, dv)


BWD_CASES = [
    # lens_q, lens_k, H, Hk, C, K, causal
    ([1, 17, 113, 1000], [1, 17, 113, 1000], 4, 4, 64, 4, True),  # odd lengths
    (_MANY, _MANY, 8, 1, 32, 3, True),  # many short sequences, GQA 8
    ([100, 300], [300, 100], 4, 2, 48, 3, True),  # Sq != Sk both ways, uneven chunks, GQA 2
    ([1000], [1000], 2, 2, 64, 1, True),  # K = 1
    ([200, 17], [200, 17], 2, 1, 64, 8, True),  # K >= chunks
    ([113, 1000], [1000, 113], 4, 2, 64, 3, False),  # non-causal
    ([200, 5], [150, 70], 2, 2, 48, 8, False),
    ([64, 1], [0, 9], 2, 1, 16, 2, False),  # a sequence without keys
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(BWD_CASES)))
def test_backward(case, D, dtype):
    lq, lk, H, Hk, C, K, causal = BWD_CASES[case]
    _check_bwd(lq, lk, H, Hk, D, C, K, causal, dtype, seed=case)


LONG_CHUNK_CASES = [
    # chunks over 128 keys (on Hopper: dK/dV by the sm90 kernel per 128-key tile, dQ by
    # MobaBwdDqSm90Pair streaming the chunk's key tiles)
    ([3000, 1100], [3000, 1100], 2, 2, 256, 6, True),
    ([2500], [2500], 4, 2, 512, 3, True),  # GQA 2:1, 4 key tiles per chunk
    ([1500, 900], [1200, 900], 4, 4, 200, 3, False),  # a partial last key tile, Sq != Sk
    ([600, 7], [600, 7], 2, 1, 256, 40, True),  # topk above the chunk count, a 7-token sequence
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(LONG_CHUNK_CASES)))
def test_backward_long_chunks(case, D, dtype):
    lq, lk, H, Hk, C, K, causal = LONG_CHUNK_CASES[case]
    _check_bwd(lq, lk, H, Hk, D, C, K, causal, dtype, seed=40 + case)


def _sm90_forward(cases, case, D, dtype, seed):
    """``cases[case]`` (lens_q, lens_k, H, Hk, C, K, causal) with head dim D in ``dtype`` on Hopper
    (skips elsewhere): the launch module, the inputs, their routing, the forward's out and LSE,
    and a random dout."""
    from moba_cute.kernels import common

    m = _launch()
    if not m.uses_sm90_bwd(str(dtype).split(".")[-1], D, common.arch_of(torch.device("cuda"))):
        pytest.skip("the sm90 backward runs on Hopper")
    lq, lk, H, Hk, C, K, causal = cases[case]
    q, k, v, cq, ck = make_batch(lq, lk, H, Hk, D, dtype=dtype, device="cuda", seed=seed)
    r = reference.route(q, k, cq, ck, max(lq), max(lk), C, K, causal)
    out, lse = m.attention_cute(q, k, v, r, None, True)
    return m, q, k, v, r, out, lse, torch.randn_like(q)


def _backward_into_nan(m, q, k, v, out, lse, dout, r):
    """``attention_backward_cute`` into NaN-filled dq, dk, dv (an unwritten element shows)."""
    bufs = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    return m.attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True, dq=bufs[0], dk=bufs[1],
                                     dv=bufs[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", [0, 1, 2, 5, 7])
def test_backward_overlap(case, D, dtype, monkeypatch):
    """The one-pass sm90 kernel's sub-tiles in FA3/FA4's order (the default where it fits the
    registers; MOBA_CUTE_BWD_OVERLAP=0 turns it off: dV, dQ and dK issued back to back, dQ staged
    while dK runs): bitwise the sequential order's gradients, and within SPEC's bound of the
    reference."""
    monkeypatch.setenv("MOBA_CUTE_BWD_OVERLAP", "1")
    if not _launch().bwd_overlap(str(dtype).split(".")[-1], D, BWD_CASES[case][6]):
        pytest.skip("this configuration keeps the sequential order (BWD_OVERLAP_SPILLS)")
    m, q, k, v, r, out, lse, dout = _sm90_forward(BWD_CASES, case, D, dtype, seed=100 + case)
    grads = {}
    for ovl in ("0", "1"):
        monkeypatch.setenv("MOBA_CUTE_BWD_OVERLAP", ovl)
        m.BWD_PLANS.clear()  # (plans read the switches when they are built)
        grads[ovl] = _backward_into_nan(m, q, k, v, out, lse, dout, r)
    m.BWD_PLANS.clear()
    _grad_errs(grads["1"], q, k, v, r, dout, None, None, dtype)
    assert all(torch.equal(a, b) for a, b in zip(grads["1"], grads["0"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(BWD_CASES)))
def test_backward_persistent(case, D, dtype, monkeypatch):
    """The one-pass sm90 kernel's persistent walk (MOBA_CUTE_BWD_PERSISTENT=1: about one CTA per SM
    takes (chunk, KV head) units from a counter, the rings and the dQ copy-out running on across
    units): bitwise the one-CTA-per-unit gradients, also with the grid forced down to 1-3 CTAs per
    window (each walks many units: K/V stage and unit slots reused) and with windows of one KV
    head (a counter each); bit-identical on repeat; within SPEC's bound of the reference."""
    from moba_cute.kernels import common

    if not _launch().bwd_overlap(str(dtype).split(".")[-1], D, BWD_CASES[case][6]):
        pytest.skip("the persistent walk runs the overlapped order only")
    m, q, k, v, r, out, lse, dout = _sm90_forward(BWD_CASES, case, D, dtype, seed=300 + case)
    key = m._plan_key(q, k, r)
    arch = common.arch_of(q.device)

    def grads():
        return _backward_into_nan(m, q, k, v, out, lse, dout, r)

    try:
        monkeypatch.setenv("MOBA_CUTE_BWD_PERSISTENT", "0")
        m.BWD_PLANS.clear()
        one = grads()
        assert not m.BWD_PLANS.get(key, key, arch).persistent
        monkeypatch.setenv("MOBA_CUTE_BWD_PERSISTENT", "1")
        for windows in (False, True):
            if windows:  # windows of one KV head (the smallest dQ partial buffer)
                monkeypatch.setenv("MOBA_CUTE_DQ_PARTIAL_BYTES", "1")
            m.BWD_PLANS.clear()
            got = grads()
            plan = m.BWD_PLANS.get(key, key, arch)
            assert plan.persistent and (not windows or len(plan.dq_windows) == k.shape[1])
            assert all(torch.equal(a, b) for a, b in zip(got, one))
            for sms in (1, 3):  # forced small grids: each CTA walks many units
                plan.sms = sms
                again = grads()
                assert all(torch.equal(a, b) for a, b in zip(again, one)), f"grid of {sms} SMs"
        _grad_errs(one, q, k, v, r, dout, None, None, dtype)
    finally:
        monkeypatch.delenv("MOBA_CUTE_BWD_PERSISTENT", raising=False)
        monkeypatch.delenv("MOBA_CUTE_DQ_PARTIAL_BYTES", raising=False)
        m.BWD_PLANS.clear()


def _long_chunk_forward(case, D, seed):
    """:func:`_sm90_forward` of LONG_CHUNK_CASES[case] in bf16."""
    return _sm90_forward(LONG_CHUNK_CASES, case, D, torch.bfloat16, seed)


@pytest.mark.parametrize("dq_pair,dkv_pingpong", [(True, True), (True, False), (False, True)],
                         ids=["pair-pingpong", "pair", "pingpong"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(LONG_CHUNK_CASES)))
def test_backward_long_chunk_variants(case, D, dq_pair, dkv_pingpong, monkeypatch):
    """The long-chunk backward's alternatives (the pair dQ kernel, the dK/dV kernel's ping-pong)
    against the reference; dK and dV bitwise those of the plain dK/dV loop (the same GEMMs in the
    same order), and dQ too where the dQ kernel is the plain one."""
    m, q, k, v, r, out, lse, dout = _long_chunk_forward(case, D, seed=60 + case)
    monkeypatch.setenv("MOBA_CUTE_BWD_DQ_CHAIN", "0")  # (these are the kernels without the chain)
    grads = {}
    for variant in ((False, False), (dq_pair, dkv_pingpong)):
        monkeypatch.setenv("MOBA_CUTE_BWD_DQ_PAIR", str(int(variant[0])))
        monkeypatch.setenv("MOBA_CUTE_BWD_DKV_PINGPONG", str(int(variant[1])))
        m.BWD_PLANS.clear()  # (plans read the switches when they are built)
        grads[variant] = _backward_into_nan(m, q, k, v, out, lse, dout, r)
    m.BWD_PLANS.clear()
    got, plain = grads[(dq_pair, dkv_pingpong)], grads[(False, False)]
    _grad_errs(got, q, k, v, r, dout, None, None, torch.bfloat16)
    assert torch.equal(got[1], plain[1]) and torch.equal(got[2], plain[2])
    if not dq_pair:
        assert torch.equal(got[0], plain[0])


@pytest.mark.parametrize("pipe", [False, True], ids=["", "pipe"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(LONG_CHUNK_CASES)))
def test_backward_long_chunk_chain(case, D, pipe, monkeypatch):
    """The 5-GEMM long-chunk backward (MOBA_CUTE_BWD_DQ_CHAIN=1: each key tile's CTA adds its dQ
    contribution by bulk reduce-adds, in key-tile order; MOBA_CUTE_BWD_CHAIN_PIPE: semaphores
    released one sub-tile later) against the reference, bitwise on repeat, and dK/dV bitwise those
    of the kernels without the chain (the same GEMMs in the same order)."""
    m, q, k, v, r, out, lse, dout = _long_chunk_forward(case, D, seed=80 + case)
    monkeypatch.setenv("MOBA_CUTE_BWD_DQ_CHAIN", "0")
    m.BWD_PLANS.clear()
    plain = m.attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True)
    monkeypatch.setenv("MOBA_CUTE_BWD_DQ_CHAIN", "1")
    monkeypatch.setenv("MOBA_CUTE_BWD_CHAIN_PIPE", str(int(pipe)))
    m.BWD_PLANS.clear()  # (plans read the switches when they are built)
    try:
        got = _backward_into_nan(m, q, k, v, out, lse, dout, r)
        again = m.attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True)
    finally:
        monkeypatch.delenv("MOBA_CUTE_BWD_DQ_CHAIN")
        monkeypatch.delenv("MOBA_CUTE_BWD_CHAIN_PIPE")
        m.BWD_PLANS.clear()
    _grad_errs(got, q, k, v, r, dout, None, None, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    assert torch.equal(got[1], plain[1]) and torch.equal(got[2], plain[2])


def test_backward_reuses_the_forward_index(monkeypatch):
    """The sm80 kernels (forced on Hopper): the backward takes the per-slot index the training
    forward kept, found through that forward's own plan (no new forward plan is built)."""
    monkeypatch.setenv("MOBA_CUTE_FWD_SM80", "1")
    monkeypatch.setenv("MOBA_CUTE_BWD_SM80", "1")
    m = _launch()
    m.FWD_PLANS.clear()
    m.BWD_PLANS.clear()
    try:
        q, k, v, cq, ck = make_batch([700, 90], [700, 90], 4, 2, 64, dtype=torch.bfloat16, device="cuda", seed=31)
        r = reference.route(q, k, cq, ck, 700, 700, 64, 3, True)
        out, lse, index = m.attention_cute(q, k, v, r, None, True, keep_index=True)
        assert index is not None
        dout = torch.randn_like(q)
        plain = m.attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True)
        misses = m.FWD_PLANS.misses
        got = m.attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True, index=index)
        assert m.FWD_PLANS.misses == misses
    finally:
        m.FWD_PLANS.clear()
        m.BWD_PLANS.clear()
    assert all(torch.equal(a, b) for a, b in zip(got, plain))


@pytest.mark.parametrize("persistent", ["0", "1"], ids=["one-cta", "walk"])
@pytest.mark.parametrize("case", [0, 1, 2, 3, 5, 7])
def test_backward_kept_pairs(case, persistent, monkeypatch):
    """The sm90 training forward keeps the sm90 backward's pair lists (MOBA_CUTE_KEEP_BWD_PAIRS=1:
    its pair-list kernel writes them beside its own): the backward that takes them gives bitwise
    the gradients of the one that builds its own, with and without the persistent walk
    (MOBA_CUTE_BWD_PERSISTENT); without a gather pass (topk 1, causal) nothing is kept; a kept
    list of the wrong size is ignored."""
    from moba_cute.kernels import common

    m = _launch()
    if not m.uses_sm90_bwd("bfloat16", 128, common.arch_of(torch.device("cuda"))):
        pytest.skip("the sm90 backward runs on Hopper")
    lq, lk, H, Hk, C, K, causal = BWD_CASES[case]
    q, k, v, cq, ck = make_batch(lq, lk, H, Hk, 128, dtype=torch.bfloat16, device="cuda", seed=500 + case)
    r = reference.route(q, k, cq, ck, max(lq), max(lk), C, K, causal)
    dout = torch.randn_like(q)
    monkeypatch.setenv("MOBA_CUTE_KEEP_BWD_PAIRS", "1")
    monkeypatch.setenv("MOBA_CUTE_BWD_PERSISTENT", persistent)
    try:
        m.FWD_PLANS.clear()
        m.BWD_PLANS.clear()
        out, lse, kept = m.attention_cute(q, k, v, r, None, True, keep_index=True)
        if K == 1 and causal:
            assert kept is None  # (no gather pass: the forward runs no pair-list kernel)
            return
        assert kept is not None and kept.dtype == torch.int32 and kept.numel() == r.query_rows.numel()
        own = m.attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True)
        got = m.attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True, index=kept)
        assert all(torch.equal(a, b) for a, b in zip(got, own))
        wrong = m.attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True, index=kept[:-1])
        assert all(torch.equal(a, b) for a, b in zip(wrong, own))
        _grad_errs(got, q, k, v, r, dout, None, None, torch.bfloat16)
    finally:
        m.FWD_PLANS.clear()
        m.BWD_PLANS.clear()


@pytest.mark.parametrize("causal", [True, False])
def test_backward_lse_grad(causal):
    """The loss uses the LSE too: dS = P * (dP - rowsum(dO * O) + dlse)."""
    _check_bwd([333, 90], [333, 90], 4, 2, 128, 64, 3, causal, torch.bfloat16, scale=0.3, seed=11, with_lse=True)


def test_backward_long():
    _check_bwd([4097], [4097], 2, 1, 128, 128, 8, True, torch.bfloat16, seed=5)


def test_interface_backward():
    """attention_with_routing / varlen_attention (backend="cute") are differentiable through the
    kernels, out and lse."""
    import moba_cute

    dev = "cuda"
    q, k, v, cq, ck = make_batch([300, 77], [300, 77], 4, 2, 64, dtype=torch.bfloat16, device=dev, seed=3,
                                 requires_grad=True)
    r = reference.route(q.detach(), k.detach(), cq, ck, 300, 300, 64, 3, True)
    o, l = moba_cute.attention_with_routing(q, k, v, r, return_lse=True, deterministic=True, backend="cute")
    g = torch.Generator(device="cpu").manual_seed(9)
    dout = torch.randn(o.shape, generator=g).to(dev, o.dtype)
    dlse = torch.randn(l.shape, generator=g).to(dev)
    loss = (o.float() * dout.float()).sum() + (l * dlse).sum()
    got = torch.autograd.grad(loss, (q, k, v))
    _grad_errs(got, q.detach(), k.detach(), v.detach(), r, dout, dlse, None, torch.bfloat16)
    # the varlen entry point (routing included) also backpropagates through the kernels
    o2 = moba_cute.varlen_attention(q, k, v, cq, ck, 300, 300, 64, 3, backend="cute")
    (o2.float() * dout.float()).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()



@pytest.mark.parametrize("C,chain", [(128, False), (256, False), (256, True)], ids=["C128", "C256", "C256-chain"])
def test_backward_dq_windows(C, chain, monkeypatch):
    """sm90 backward: the dQ partials of one KV-head window at a time (forced: one KV head per
    window) give the reference's gradients, bitwise those of a single window; chunks of one key
    tile, of two (the pair dQ kernel) and of two with the dQ chain (its semaphores span windows)."""
    from moba_cute.kernels import common

    m = _launch()
    arch = common.arch_of(torch.device("cuda"))
    if not m.uses_sm90_bwd("bfloat16", 128, arch):
        pytest.skip("the sm90 backward runs on Hopper")
    monkeypatch.setenv("MOBA_CUTE_BWD_DQ_CHAIN", str(int(chain)))
    q, k, v, cq, ck = make_batch([700, 90, 333], [700, 90, 333], 8, 4, 128, dtype=torch.bfloat16, device="cuda",
                                 seed=21)
    r = reference.route(q, k, cq, ck, 700, 700, C, 4, True)
    out, lse = m.attention_cute(q, k, v, r, None, True)
    dout = torch.randn_like(q)
    key = m._plan_key(q, k, r)
    m.BWD_PLANS.clear()
    one = m.attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True)
    plan = m.BWD_PLANS.get(key, key, arch)
    assert len(plan.dq_windows) == 1 and plan.ktiles == C // 128 and plan.chain == chain
    monkeypatch.setenv("MOBA_CUTE_DQ_PARTIAL_BYTES", "1")
    m.BWD_PLANS.clear()
    try:
        got = m.attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True)
        assert len(m.BWD_PLANS.get(key, key, arch).dq_windows) == 4
    finally:
        monkeypatch.delenv("MOBA_CUTE_DQ_PARTIAL_BYTES")
        m.BWD_PLANS.clear()
    _grad_errs(got, q, k, v, r, dout, None, None, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(got, one))
