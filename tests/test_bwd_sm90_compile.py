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
                    # the one-pass kernel's sub-tiles in both orders (None: FA3/FA4's where it ships)
                    # ... and as the persistent walk over its units (MOBA_CUTE_BWD_PERSISTENT=1)
                    for ovl in (False, None):
                        for pers in (False, True):
                            for key, fac, fake in launch.bwd_kernel_specs_sm90(dtype, D, causal, topk, overlap=ovl,
                                                                               persistent=pers).values():
                                seen.setdefault(key, (fac, fake))
                    # chunks over 128 keys: the dK/dV-only variant and both dQ kernels
                    # (the defaults, the pair dQ kernel with and without its reach skip, and the loops
                    # without ping-pong and skips)
                    for pair, pp, skip in ((False, True, True), (True, True, True), (True, True, False),
                                           (False, False, False)):
                        for key, fac, fake in launch.bwd_kernel_specs_sm90_long(dtype, D, causal, topk, dq_pair=pair,
                                                                                dkv_pingpong=pp,
                                                                                reach_skip=skip).values():
                            seen.setdefault(key, (fac, fake))
                    # the 5-GEMM chain (one-pass kernel per key tile, fp32 partials by bulk copies and
                    # bulk reduce-adds in key-tile order, semaphores)
                    # (in both sub-tile orders)
                    for pipe, ovl in ((False, False), (False, None), (True, None)):
                        for key, fac, fake in launch.bwd_kernel_specs_sm90_chain(dtype, D, causal, topk,
                                                                                 chain_pipe=pipe,
                                                                                 overlap=ovl).values():
                            seen.setdefault(key, (fac, fake))
    return sorted(seen.items(), key=lambda kv: str(kv[0]))


# (dS^T stored as pairs of rows into an MN-major sdS keeps head dim 128 within setmaxnreg's 232
# registers: no spills with either DSL library set)
SPILL_BOUND = {}  # bytes (ptxas reports spill bytes)


@pytest.mark.parametrize("key,spec", [pytest.param(k, s, id=str(k)) for k, s in _specs()])
def test_sm90_backward_compiles_without_spills(key, spec):
    fac, fake = spec
    rep = common.compile_for_arch(fac(), fake, "sm_90a")
    assert "Used" in rep.ptxas, "no ptxas report"
    if key[0] in ("moba_bwd_sm90", "moba_bwd_dq_sm90"):
        for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "setmaxnreg.inc", "setmaxnreg.dec",
                      "cp.async.mbarrier.arrive"):
            assert instr in rep.ptx, instr
    if "persist" in key:  # the unit counter, the named barrier that hands a unit to the producer warps
        assert "atom.global.add" in rep.ptx and "bar.sync" in rep.ptx
    if "chain" in key:  # (the hand-over: bulk store / bulk reduce-add from the fenced staging buffer)
        for instr in ("cp.async.bulk.global.shared::cta.bulk_group", "cp.reduce.async.bulk.global.shared::cta"
                      ".bulk_group.add.f32", "fence.proxy.async", "cp.async.bulk.wait_group"):
            assert instr in rep.ptx, instr
    bound = SPILL_BOUND.get((key[0], key[2]), 0) if len(key) > 2 else 0
    assert rep.spill_stores <= bound and rep.spill_loads <= bound, rep.ptxas[-600:]
