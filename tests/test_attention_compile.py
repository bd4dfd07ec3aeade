"""CPU/CI: every shipped configuration of the sm80 MoBA forward and backward and of the index and row-wise
kernels around them compiles for sm_80 with fake arguments, uses mma.sync, cp.async and ldmatrix, and does
not spill (ptxas report). The index and row-wise kernels are checked for sm_90a too. (Built for sm_90a,
where they run on Hopper today, the D=128 dK/dV kernels spill 12-24 bytes with both DSL library sets:
known, docs/reliability.md section 4; the sm90 kernels of issue 11 replace them there. The D=64 forward
with bn=80 compiles clean for sm_90a.) `make test-cu13` runs this file with the cu13 libraries too."""

import pytest

pytest.importorskip("cutlass")

from moba_cute.configs import attention_sm80 as cfg  # noqa: E402
from moba_cute.kernels import common  # noqa: E402

from moba_cute.kernels import attention_launch as launch  # noqa: E402


def _specs():
    seen = {}
    for dtype in ("bfloat16", "float16"):
        for D in cfg.SUPPORTED_HEAD_DIMS:
            for causal in (True, False):
                for stages in (1, 2):  # the shipped value and the MOBA_CUTE_FWD_STAGES alternative
                    for key, fac, fake in launch.kernel_specs(dtype, D, causal, stages).values():
                        seen.setdefault(key, (fac, fake))
                for key, fac, fake in launch.bwd_kernel_specs(dtype, D, causal).values():
                    seen.setdefault(key, (fac, fake))
    return sorted(seen.items(), key=lambda kv: str(kv[0]))


SPECS = _specs()
MMA_KERNELS = ("moba_fwd_sm80", "moba_bwd_dq_sm80", "moba_bwd_dkv_sm80")
CASES = [pytest.param(key, fake, arch, id=f"{key}-{arch}") for key, fake in SPECS
         for arch in (("sm_80",) if key[0] in MMA_KERNELS else ("sm_80", "sm_90a"))]


@pytest.mark.parametrize("key,spec,arch", CASES)
def test_compiles_without_spills(key, spec, arch):
    fac, fake = spec
    rep = common.compile_for_arch(fac(), fake, arch)
    assert "Used" in rep.ptxas, "no ptxas report"
    assert rep.spill_stores == 0 and rep.spill_loads == 0, rep.ptxas[-600:]
    assert rep.stack_frame == 0, rep.ptxas[-600:]
    if key[0] in MMA_KERNELS:
        assert "mma.sync.aligned.m16n8k16" in rep.ptx
        assert "cp.async" in rep.ptx
        assert "ldmatrix.sync.aligned" in rep.ptx
        assert "ldmatrix.sync.aligned.m8n8.x4.trans" in rep.ptx


def test_backward_is_wired():
    assert launch.HAS_BACKWARD is True
    assert callable(launch.attention_backward_cute)


def test_unsupported_reasons():
    import torch

    assert launch.attention_unsupported_reason(torch.bfloat16, 128, 128, 8, "sm_80") is None
    assert launch.attention_unsupported_reason(torch.float32, 128, 128, 8, "sm_80") is not None
    assert launch.attention_unsupported_reason(torch.bfloat16, 80, 128, 8, "sm_80") is not None
    assert launch.attention_unsupported_reason(torch.bfloat16, 128, 24, 8, "sm_80") is not None
    assert launch.attention_unsupported_reason(torch.bfloat16, 128, 128, 65, "sm_80") is not None
    assert launch.attention_unsupported_reason(torch.bfloat16, 128, 128, 8, "sm_75") is not None
