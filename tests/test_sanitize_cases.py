"""CPU: the sanitizer sweep's case list (benchmarks/sanitize.py) covers what issue 13 asks for,
every case is well formed (the reference runs its forward), and the driver script calls every tool."""

import itertools
import os
import subprocess

import pytest
import torch

from benchmarks import sanitize as S
from moba_cute.configs import routing as rcfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COVERED = set().union(*(S.covers(c) for c in S.CASES))

REQUIRED = {
    "empty-seq", "1-token", "sq>sk", "sq<sk", "chunk-not-dividing", "topk>chunks", "gqa8", "causal", "noncausal",
    "thousands-of-seqs", "zero-total-q", "zero-total-k", "nan", "own-chunk-only",
    "float16", "bfloat16", "D64", "D128",
    "centroids-fused-prep", "centroids-separate-prep", "kmindex-vec16", "kmindex-scalar",
    "fwd-device", "fwd-sm80", "fwd-sm80-2stage", "fwd-windows-rows", "fwd-windows-kv", "fwd-staged", "fwd-unstaged",
    "fwd-pair", "fwd-overlap", "fwd-qregs", "fwd-mcast", "fwd-persistent", "fwd-diag90", "fwd-diag90-staged",
    "fwd-diag90-interleave",
    "grad", "fwd-only", "route-only",
    "chunk>128", "bwd-chain", "bwd-chain-pipe", "bwd-overlap", "bwd-sequential", "bwd-persistent", "bwd-kept-pairs",
}


def test_covers_the_listed_properties():
    assert not (REQUIRED - COVERED), f"not covered: {sorted(REQUIRED - COVERED)}"


def test_covers_every_wrong_cu_kind_with_both_forward_families():
    for kind in S.WRONG_CU:
        fams = {f for c in S.CASES for f in ("fwd-sm80", "fwd-device")
                if f"wrong-cu:{kind}" in S.covers(c) and f in S.covers(c)}
        assert fams == {"fwd-sm80", "fwd-device"}, kind


def test_covers_each_dtype_and_head_dim_through_the_attention():
    attn = [S.covers(c) for c in S.CASES if not c.route_only and not c.cu_q]
    for dt, d in itertools.product(("float16", "bfloat16"), ("D64", "D128")):
        assert any({dt, d} <= t for t in attn), (dt, d)
        assert any({dt, d, "grad"} <= t for t in attn), (dt, d)


def test_covers_every_topk_flavour_the_sm90_config_picks():
    """Every tile family configs/routing.py gives an sm90 device for D = 64 / 128 (any topk,
    both modes), and the mma.sync two-stage tiles (sm80, forced) with both list kinds."""
    picked = set()
    for d, k, causal in itertools.product((64, 128), range(1, 65), (True, False)):
        picked.add("topk:" + S.topk_flavour(S.Case("x", (1,), (1,), D=d, K=k, causal=causal)))
    assert not (picked - COVERED), sorted(picked - COVERED)
    mma = {t for t in COVERED if t.startswith("topk:mma-")}
    assert any(t.endswith("reglist") for t in mma) and any(t.endswith("smemlist") for t in mma)
    assert {f"{bm}x" for bm, _ in rcfg.TOPK_TILE_CANDIDATES} <= {t.split("-")[1].split("x")[0] + "x" for t in mma}


def test_covers_is_computed_not_declared():
    plain = S.covers(S.Case("plain", (64,), (64,), 4, 4, 64, 64, 1))
    for tag in ("empty-seq", "1-token", "sq>sk", "sq<sk", "chunk-not-dividing", "topk>chunks", "gqa8",
                "thousands-of-seqs", "nan", "noncausal", "fwd-sm80"):
        assert tag not in plain, tag


@pytest.mark.parametrize("case", [c for c in S.CASES if not c.cu_q and sum(c.lens_q) <= 1500],
                         ids=lambda c: c.name)
def test_cases_run_on_the_reference(case):
    q, k, v, cq, ck, mq, mk = S.build(case, "cpu")
    assert q.shape[0] == int(cq[-1]) and k.shape[0] == int(ck[-1])
    S.run_case(case, device="cpu", backend="reference", grad=False)


def test_wrong_cu_cases_are_really_wrong():
    import moba_cute

    for c in (c for c in S.CASES if c.cu_q):
        q, k, v, cq, ck, mq, mk = S.build(c, "cpu")
        with pytest.raises(ValueError, match="cu_seqlens"):
            moba_cute.varlen_attention(q, k, v, cq, ck, mq, mk, c.C, c.K, c.causal)


def test_driver_script_runs_every_tool():
    path = os.path.join(ROOT, "benchmarks", "sanitize_all.sh")
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        assert tool in text
    assert "--report-api-errors no" in text and "benchmarks.sanitize" in text
