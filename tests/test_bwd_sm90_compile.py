"""CPU/CI: the sm90 backward's kernels (issue 12: the key-major kernel with per-pair dQ partials,
the all-pair lists, delta without dQ_acc, the slot-order dQ reduction) compile for sm_90a with
fake arguments; the key-major kernel's PTX holds wgmma, TMA and setmaxnreg. The GPU tests
(tests/test_attention_gpu.py) run them against the reference on Hopper.
"""

import pytest

pytest.importorskip("cutlass")

from moba_cute.kernels import attention_launch as launch  # noqa: E402
from moba_cute.kernels import common  # noqa: E402


def _specs():
    seen = {}
    for dtype in ("bfloat16", "float16"):
        for D in (64, 128):
            for causal in (True, False):
                for topk in (3, 8):
                    for key, fac, fake in launch.bwd_kernel_specs_sm90(dtype, D, causal, topk).values():
                        seen.setdefault(key, (fac, fake))
    return sorted(seen.items(), key=lambda kv: str(kv[0]))


# head dim 128: 2 x 64 keys x 128 dims of dK and dV accumulators plus S^T, dP^T and the dQ partial
# sit at setmaxnreg's 240 registers; ptxas spills 4-36 bytes depending on the variant and the DSL's
# libraries (one smem address in the consumer loop; with 24 registers, one value in the producer).
# Bounded here, not hidden: open in issue 12.
SPILL_BOUND = {("moba_bwd_sm90", 128): 64}  # bytes (ptxas reports spill bytes)


@pytest.mark.parametrize("key,spec", [pytest.param(k, s, id=str(k)) for k, s in _specs()])
def test_sm90_backward_compiles_without_spills(key, spec):
    fac, fake = spec
    rep = common.compile_for_arch(fac(), fake, "sm_90a")
    assert "Used" in rep.ptxas, "no ptxas report"
    if key[0] == "moba_bwd_sm90":
        for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "setmaxnreg.inc", "setmaxnreg.dec",
                      "cp.async.mbarrier.arrive"):
            assert instr in rep.ptx, instr
    bound = SPILL_BOUND.get((key[0], key[2]), 0) if len(key) > 2 else 0
    assert rep.spill_stores <= bound and rep.spill_loads <= bound, rep.ptxas[-600:]
