"""GPU: the lean call path (issue 16). One warm eager forward (no grad) and one forward+backward of
``moba_cute.varlen_attention`` launch only moba_cute's own kernels (no PyTorch kernel, memset or memcpy),
and no more of them than the bounds below. The GPU work is recorded with torch.profiler and told apart with
``benchmarks.host.is_moba_kernel``, the rule the host benchmark suite uses too."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import make_inputs  # noqa: E402
from benchmarks.configs import Config  # noqa: E402
from benchmarks.host import cuda_kernels, is_moba_kernel, moba_calls, short_kernel_name  # noqa: E402

# Launch-count bounds of one call, causal, topk=8 (the figures docs/design.md documents; adjust both
# together when the launch plan changes).
MAX_FWD_KERNELS = 18
MAX_FWDBWD_KERNELS = 29
# A non-causal forward has no diagonal pass but one gather pass per routing slot (the same count
# today); its bound allows one launch more.
NONCAUSAL_EXTRA_KERNELS = 1

B, S, D, C, K = 2, 2048, 128, 128, 8
CASES = [
    pytest.param(16, 16, True, id="causal"),
    pytest.param(16, 16, False, id="noncausal"),
    pytest.param(16, 4, True, id="gqa-causal"),
]


def _listing(names):
    return "\n".join(f"  {i:2d}. {'ours   ' if is_moba_kernel(n) else 'FOREIGN'} {short_kernel_name(n)}"
                     + ("" if is_moba_kernel(n) else f"\n               full name: {n}")
                     for i, n in enumerate(names, 1))


def _check(names, bound, what):
    assert names, f"{what}: the profiler recorded no GPU work at all (is CUPTI working?)"
    foreign = [n for n in names if not is_moba_kernel(n)]
    listing = _listing(names)
    assert not foreign, f"{what}: {len(foreign)} GPU activities not launched by moba_cute:\n{listing}"
    assert len(names) <= bound, f"{what}: {len(names)} kernels > bound {bound}:\n{listing}"


@pytest.fixture(scope="module")
def mc():
    moba_cute = pytest.importorskip("moba_cute")
    if not moba_cute.kernel_paths().get("attention"):
        pytest.skip("no CuTe attention kernel on this device")
    return moba_cute


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("H,Hk,causal", CASES)
def test_eager_call_launches_only_our_kernels(mc, H, Hk, causal, kind):
    cfg = Config("host", B=B, H=H, Hk=Hk, D=D, C=C, K=K, S=S, causal=causal)
    fwd, fwdbwd = moba_calls(mc, make_inputs(cfg, "cuda"))
    fn = fwd if kind == "fwd" else fwdbwd
    for _ in range(2):  # compile, then the first-call setup of every launcher
        fn()
    bound = (MAX_FWD_KERNELS if kind == "fwd" else MAX_FWDBWD_KERNELS) + (0 if causal else NONCAUSAL_EXTRA_KERNELS)
    what = "forward (no grad)" if kind == "fwd" else "forward+backward"
    _check(cuda_kernels(fn), bound, f"{what}, B={B} S={S} H={H}/{Hk} D={D} C={C} K={K} causal={causal}")
