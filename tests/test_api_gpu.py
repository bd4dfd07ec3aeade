"""The public API on the GPU: kernel dispatch, CUDA graph capture, torch.compile, streams."""

import pytest
import torch

import moba_cute

from helpers import make_batch

pytestmark = pytest.mark.gpu


def _inputs(seed=0, requires_grad=False):
    return make_batch([700, 129, 1200], [700, 129, 1200], 8, 2, 128, dtype=torch.bfloat16, device="cuda",
                      seed=seed, requires_grad=requires_grad)


def test_kernel_paths_report_the_device():
    paths = moba_cute.kernel_paths()
    assert paths["route"] in ("sm90", "sm80") and paths["attention"] in ("sm90", "sm80")
    major = torch.cuda.get_device_capability()[0]
    assert paths["attention_backward"] == ("sm90" if major == 9 else "sm80")


def test_cuda_graph_capture_and_replay():
    q, k, v, cq, ck = _inputs()

    def step():
        return moba_cute.varlen_attention(q, k, v, cq, ck, 1200, 1200, 64, 4, backend="cute")

    with torch.no_grad():
        expect = step().clone()  # also compiles every kernel outside the capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step()
        # new data in the same buffers: the replay must recompute from it
        q2, k2, v2, _, _ = _inputs(seed=1)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        g.replay()
        torch.cuda.synchronize()
        fresh = step()
    assert torch.equal(out, fresh)
    assert not torch.equal(out, expect)


def test_torch_compile_matches_eager():
    q, k, v, cq, ck = _inputs(seed=2)

    def f(q, k, v):
        return moba_cute.varlen_attention(q, k, v, cq, ck, 1200, 1200, 64, 4)

    with torch.no_grad():
        eager = f(q, k, v)
        compiled = torch.compile(f)(q, k, v)
    assert torch.equal(eager, compiled)


def test_runs_on_the_callers_stream():
    q, k, v, cq, ck = _inputs(seed=3)
    with torch.no_grad():
        expect = moba_cute.varlen_attention(q, k, v, cq, ck, 1200, 1200, 64, 4)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            out = moba_cute.varlen_attention(q, k, v, cq, ck, 1200, 1200, 64, 4)
        torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(out, expect)


def test_strict_checks_catch_bad_cu_seqlens_on_cuda():
    q, k, v, cq, ck = _inputs(seed=4)
    bad = cq.clone()
    bad[1] = 5000
    moba_cute.set_strict_checks(True)
    try:
        with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
            moba_cute.varlen_attention(q, k, v, bad, ck, 1200, 1200, 64, 4)
    finally:
        moba_cute.set_strict_checks(False)
    # without strict checks garbage offsets must not fault the GPU (clamped indices)
    with torch.no_grad():
        moba_cute.varlen_attention(q, k, v, bad, ck, 1200, 1200, 64, 4)
    torch.cuda.synchronize()
