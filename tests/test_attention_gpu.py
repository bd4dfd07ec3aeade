"""GPU correctness of the CuTe MoBA forward (SPEC section 3) against the fp32 reference with the
same routing. Outputs are pre-filled with NaN; error bound = 2x the error of the same
computation done by PyTorch in the input dtype, + 1e-5."""

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


def test_grad_inputs_fall_back_to_reference():
    """No CuTe backward yet: the API sends grad-requiring inputs to the reference (auto) or
    refuses them (cute); the output stays correct and differentiable."""
    import moba_cute

    dev = "cuda"
    q, k, v, cq, ck = make_batch([200], [200], 2, 1, 64, dtype=torch.bfloat16, device=dev, seed=3,
                                 requires_grad=True)
    args = (q, k, v, cq, ck, 200, 200, 64, 3)
    with pytest.raises(moba_cute.UnsupportedError, match="backward"):
        moba_cute.varlen_attention(*args, backend="cute")
    o = moba_cute.varlen_attention(*args)
    o.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():  # without grad the kernel path is taken and agrees with the reference
        o_k = moba_cute.varlen_attention(*args, backend="cute")
    assert (o_k.float() - o.detach().float()).abs().max().item() < 2e-2
