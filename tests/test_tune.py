"""The per-GPU tile tuner (issue 14, point 3): the table format and its lookup
(moba_cute/configs/tuned.py), the tuner's choices with a fake timer (moba_cute/tune.py), and that
a tile from a table reaches the launch plan and the compile keys of its kernels. CPU, except the
``gpu`` smoke test that runs the tuner on a tiny shape."""

import importlib.util
import json
import os
import warnings

import pytest
import torch

from moba_cute import interface, tune
from moba_cute.configs import attention_sm80 as cfg80
from moba_cute.configs import attention_sm90 as cfg90
from moba_cute.configs import decode as cfg_decode
from moba_cute.configs import routing as rcfg
from moba_cute.configs import tuned
from moba_cute.kernels import attention_launch as al
from moba_cute.kernels import route_launch as rl

DEV = "Test GPU 80GB"
SM90_DEFAULT = tuple(cfg90.FWD_TILES[128])
SM90_ALT = tuned.candidates("sm90_fwd", 128)[1]
SM80_DEFAULT = tuple(cfg80.FWD_TILES[64])
SM80_ALT = tuned.candidates("sm80_fwd", 64)[1]
CLS = "bf16-d128-causal-c128-k8-rows2^18"  # flashmoba 8K


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No user table, an empty shipped table, no tile overrides in the environment; the tables
    reloaded and the plans dropped around every test."""
    for var in ("MOBA_CUTE_SM90_TILES", "MOBA_CUTE_FWD_STAGES", "MOBA_CUTE_TUNED", "MOBA_CUTE_FWD_SM80"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MOBA_CUTE_TUNE_FILE", str(tmp_path / "user.json"))
    shipped = tmp_path / "shipped.json"
    monkeypatch.setattr(tuned, "shipped_table_path", lambda: str(shipped))
    monkeypatch.setattr(rcfg, "_TILE_OVERRIDE", ())
    tuned.reset()
    al.FWD_PLANS.clear()
    rl.PLANS.clear()
    yield tmp_path
    tuned.reset()
    al.FWD_PLANS.clear()
    rl.PLANS.clear()


@pytest.fixture
def on_device(monkeypatch):
    """Plans built for device index 0 see the device name DEV (no CUDA needed)."""
    monkeypatch.setattr(tuned, "device_name", lambda index: None if index is None else DEV)


def _table(entries, device=DEV):
    """A table file body: ``entries`` = {family: {class: tile}}."""
    return {"format": 1, "devices": {device: {"meta": {}, "entries": {
        fam: {cls: {"tile": list(t)} for cls, t in classes.items()} for fam, classes in entries.items()}}}}


def _write(path, body):
    path.write_text(body if isinstance(body, str) else json.dumps(body))


def _fmt(t):
    return "(" + ", ".join(map(str, t)) + ")"


def _user(tmp):
    return tmp / "user.json"


def _shipped(tmp):
    return tmp / "shipped.json"


# --- shape classes ---------------------------------------------------------------------------

def test_shape_class_buckets():
    assert tuned.shape_class("bfloat16", 128, True, 128, 8, 2 * 8192 * 16) == CLS
    assert tuned.shape_class(torch.float16, 64, False, 96, 12, 1000) == "fp16-d64-noncausal-c128-k16-rows2^10"
    assert tuned.shape_class("bfloat16", 128, True, 4096, 1, 1) == "bf16-d128-causal-c4096-k1-rows2^0"
    # rows round to the nearest power of two in log space: 2^18.5 = 370727.6
    assert tuned.shape_class("bfloat16", 128, True, 128, 8, 370727).endswith("rows2^18")
    assert tuned.shape_class("bfloat16", 128, True, 128, 8, 370728).endswith("rows2^19")
    with pytest.raises(ValueError, match="float16/bfloat16"):
        tuned.shape_class(torch.float32, 128, True, 128, 8, 100)


def test_shape_class_parse():
    assert tuned.parse_shape_class(CLS) == ("bf16-d128-causal-c128-k8", 128, 18)
    for bad in ("bf16-d128-causal-c128-k8", "bf32-d128-causal-c128-k8-rows2^18", "bf16-d128-causal-c96-k8-rows2^18",
                "bf16-d128-causal-c128-k12-rows2^18", 17):
        with pytest.raises(ValueError):
            tuned.parse_shape_class(bad)


def test_presets_are_the_benchmark_shapes_and_have_distinct_classes():
    from benchmarks.configs import SUITES

    suite_shapes = {(c.B, c.H, c.Hk, c.D, c.C, c.K, c.S, c.dtype, c.causal) for cs in SUITES.values() for c in cs
                    if not c.varlen}
    decode = [s for s in tune.PRESETS.values() if s.decode]
    for s in tune.PRESETS.values():
        if not s.decode:
            assert (s.B, s.H, s.Hk, s.D, s.C, s.K, s.S, s.dtype, s.causal) in suite_shapes, s
    # decode steps: benchmarks/decode.py's defaults (H=32/8, D=128, one new token, B in 1/8, a
    # cached length of its range, (C, K) of its --moba list)
    assert {(s.B, s.C, s.K) for s in decode} == {(b, c, k) for b in (1, 8) for c, k in ((4096, 12), (128, 8))}
    for s in decode:
        assert (s.H, s.Hk, s.D, s.new, s.S, s.Sq, s.Sk, s.rows) == (32, 8, 128, 1, 65536, 1, 65537, s.B * 32)
        assert tune.family_for(s, "sm_90a") == ("decode", None) == tune.family_for(s, "sm_80")
    assert len({s.shape_class for s in tune.PRESETS.values()}) == len(tune.PRESETS)
    assert tune.PRESETS["flashmoba-8K"].shape_class == CLS


# --- candidates ------------------------------------------------------------------------------

def _load_test_module(name):
    path = os.path.join(os.path.dirname(__file__), name + ".py")
    spec = importlib.util.spec_from_file_location("_tune_" + name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_candidates_are_compiled_by_the_compile_tests():
    """Every tile a table or the tuner may pick is one whose kernels the CPU compile tests build
    without spills: its compile keys are among theirs."""
    pytest.importorskip("cutlass")
    sm80_keys = {k for k, _ in _load_test_module("test_attention_compile").SPECS}
    sm90_keys = {k for k, _ in _load_test_module("test_attention_sm90_compile").SPECS}
    from moba_cute.kernels.moba_fwd_sm90 import SegVariant

    for dtype in ("bfloat16", "float16"):
        for causal in (True, False):
            for D in cfg80.FWD_TILES:
                cands = tuned.candidates("sm80_fwd", D)
                assert cands[0] == tuple(cfg80.FWD_TILES[D]) and len(cands) == len(set(cands)) == 2
                for t in cands:
                    assert {k for k, _, _ in al.kernel_specs(dtype, D, causal, tile=t).values()} <= sm80_keys, t
            for D in cfg90.FWD_TILES:
                cands = tuned.candidates("sm90_fwd", D)
                assert cands[0] == tuple(cfg90.FWD_TILES[D])
                assert set(cands) == {tuple(cfg90.FWD_TILES[D])} | {tuple(t) for t in cfg90.ALT_TILES.get(D, ())}
                for t in cands:  # (as plans build them: the staged epilogue, the default)
                    specs = al.kernel_specs_sm90(dtype, D, causal, t, variant=SegVariant(staged=al.fwd_staged()))
                    assert {k for k, _, _ in specs.values()} <= sm90_keys, t
    assert tuned.candidates("sm90_fwd", 96) == ()
    # decode: key-split waves, host-side only (every choice runs the kernels the decode compile
    # tests build), the built-in WAVES first
    for D in cfg_decode.SUPPORTED_HEAD_DIMS:
        cands = tuned.candidates("decode", D)
        assert cands[0] == (cfg_decode.WAVES,) and {t[0] for t in cands} == set(cfg_decode.WAVE_CHOICES)
        assert len(cands) == len(set(cands)) and all(len(t) == 1 and t[0] >= 1 for t in cands)
    assert tuned.candidates("decode", 96) == ()
    # the routing's top-k: the warpgroup-MMA tile (the rule's own, compiled for every list length
    # by test_wgmma_topk_kernel_compiles) and the mma.sync tiles test_routing_compile compiles
    rc = _load_test_module("test_routing_compile")
    covered = {tuple(p.values[:3]) for p in rc._tune_cases()}
    for fam, arch in (("sm90_topk", "sm_90a"), ("sm80_topk", "sm_80")):
        for D in (64, 128):
            cands = tuned.candidates(fam, D)
            assert cands == rcfg.topk_tune_tiles(fam[:4], D) and len(cands) >= 4
            assert all(c[3] or (arch, D, c) in covered for c in cands), fam
            assert bool(cands[0][3]) == (fam == "sm90_topk")
        assert tuned.candidates(fam, 96) == ()
    with pytest.raises(ValueError, match="unknown tile family"):
        tuned.candidates("topk", 128)


# --- lookup: precedence, buckets, bad files --------------------------------------------------

def test_lookup_precedence(isolated, on_device, monkeypatch):
    """forced (the tuner) > environment > user table > shipped table > built-in."""
    tmp = isolated
    assert al.sm90_tiles(128, CLS, 0) == SM90_DEFAULT  # no table
    _write(_shipped(tmp), _table({"sm90_fwd": {CLS: SM90_ALT}, "sm80_fwd": {
        "bf16-d64-causal-c128-k8-rows2^18": SM80_ALT}}))
    tuned.reset()
    assert al.sm90_tiles(128, CLS, 0) == SM90_ALT  # shipped over built-in
    assert al.tiles(64, "bf16-d64-causal-c128-k8-rows2^18", 0) == SM80_ALT
    assert al.sm90_tiles(128) == SM90_DEFAULT  # without a shape class: no table (the compile tests' path)
    assert al.sm90_tiles(128, CLS, None) == SM90_DEFAULT  # no device: no table
    _write(_user(tmp), _table({"sm90_fwd": {CLS: SM90_DEFAULT}}))
    tuned.reset()
    assert al.sm90_tiles(128, CLS, 0) == SM90_DEFAULT  # user over shipped, class by class
    assert al.tiles(64, "bf16-d64-causal-c128-k8-rows2^18", 0) == SM80_ALT  # (the shipped sm80 entry stays)
    _write(_user(tmp), _table({"sm90_fwd": {CLS: SM90_ALT}, "sm80_fwd": {
        "bf16-d64-causal-c128-k8-rows2^18": SM80_ALT}}))
    tuned.reset()
    assert al.sm90_tiles(128, CLS, 0) == SM90_ALT
    monkeypatch.setenv("MOBA_CUTE_SM90_TILES", ",".join(map(str, SM90_DEFAULT)))
    monkeypatch.setenv("MOBA_CUTE_FWD_STAGES", str(SM80_DEFAULT[3]))
    assert al.sm90_tiles(128, CLS, 0) == SM90_DEFAULT  # environment over tables
    assert al.tiles(64, "bf16-d64-causal-c128-k8-rows2^18", 0) == SM80_DEFAULT
    with al.tile_override("sm90_fwd", SM90_ALT):
        assert al.sm90_tiles(128, CLS, 0) == SM90_ALT  # the tuner's override over everything
        assert al.sm90_tiles(128) == SM90_DEFAULT  # ...for plans only
    assert al.sm90_tiles(128, CLS, 0) == SM90_DEFAULT
    monkeypatch.delenv("MOBA_CUTE_SM90_TILES")
    monkeypatch.setenv("MOBA_CUTE_TUNED", "0")
    tuned.reset()
    assert al.sm90_tiles(128, CLS, 0) == SM90_DEFAULT  # tables off


def test_lookup_nearest_rows_bucket(isolated, on_device, monkeypatch):
    base = "bf16-d128-causal-c128-k8"
    _write(_user(isolated), _table({"sm90_fwd": {f"{base}-rows2^18": SM90_ALT, f"{base}-rows2^21": SM90_DEFAULT}}))
    for r, want in ((10, SM90_ALT), (18, SM90_ALT), (19, SM90_ALT), (20, SM90_DEFAULT), (30, SM90_DEFAULT)):
        assert tuned.lookup("sm90_fwd", 128, f"{base}-rows2^{r}", 0) == want, r
    _write(_user(isolated), _table({"sm90_fwd": {f"{base}-rows2^18": SM90_ALT, f"{base}-rows2^20": SM90_DEFAULT}}))
    tuned.reset()
    assert tuned.lookup("sm90_fwd", 128, f"{base}-rows2^19", 0) == SM90_DEFAULT  # tie: the larger bucket
    # every other field must match, and the device
    assert tuned.lookup("sm90_fwd", 128, "bf16-d128-causal-c128-k16-rows2^18", 0) is None
    assert tuned.lookup("sm90_fwd", 128, "fp16-d128-causal-c128-k8-rows2^18", 0) is None
    assert tuned.lookup("sm90_fwd", 128, "bf16-d128-noncausal-c128-k8-rows2^18", 0) is None
    assert tuned.lookup("sm80_fwd", 128, f"{base}-rows2^18", 0) is None
    monkeypatch.setattr(tuned, "device_name", lambda index: "Other GPU")
    assert tuned.lookup("sm90_fwd", 128, f"{base}-rows2^18", 0) is None


def test_tables_are_read_once_per_process(isolated, on_device, monkeypatch):
    _write(_user(isolated), _table({"sm90_fwd": {CLS: SM90_ALT}}))
    reads = []
    real = tuned.read_table
    monkeypatch.setattr(tuned, "read_table", lambda p: reads.append(p) or real(p))
    for _ in range(3):
        assert tuned.lookup("sm90_fwd", 128, CLS, 0) == SM90_ALT
    assert len(reads) == 2  # the shipped and the user table, once


@pytest.mark.parametrize("body,what", [
    ("{not json", "Expecting property name"),
    (json.dumps({"format": 2, "devices": {}}), "not a moba_cute tile table"),
    (json.dumps([1, 2]), "not a moba_cute tile table"),
])
def test_malformed_file_warns_once_and_is_ignored(isolated, on_device, body, what):
    _write(_user(isolated), body)
    _write(_shipped(isolated), _table({"sm90_fwd": {CLS: SM90_ALT}}))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert al.sm90_tiles(128, CLS, 0) == SM90_ALT  # the shipped table still applies
        assert al.sm90_tiles(128, CLS, 0) == SM90_ALT
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and "user tile table" in msgs[0] and what in msgs[0], msgs


def test_bad_entries_are_rejected_with_one_warning(isolated, on_device):
    body = _table({"sm90_fwd": {
        CLS: SM90_ALT,  # valid: kept
        "bf16-d128-causal-c128-k8-rows2^21": (64, 4, 1),  # not a shipped tile
        "bf16-d96-causal-c128-k8-rows2^21": SM90_DEFAULT,  # no sm90 tiles for D = 96
        "bf16-d128-causal-c128-k8-rows2^22": (128, 8, 1, 1),  # wrong length: not a candidate either
        "bf16-d128-causal-c128-k8": SM90_ALT,  # no rows bucket
    }, "sm80_fwd": {"bf16-d64-causal-c128-k8-rows2^18": (64, 80, 128, 3)},  # stages not compiled
        "topk": {CLS: (128, 32, 1, 32, 4, 1)}})  # not a tuned family
    body["devices"][DEV]["entries"]["sm90_fwd"]["bf16-d128-causal-c256-k8-rows2^18"] = {"tile": "128,8,1"}
    body["devices"]["Broken GPU"] = {"entries": []}
    _write(_user(isolated), body)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert tuned.lookup("sm90_fwd", 128, CLS, 0) == SM90_ALT
        for r in (21, 22):
            # (the nearest valid entry, rows2^18, serves them: the bad ones are gone)
            assert tuned.lookup("sm90_fwd", 128, f"bf16-d128-causal-c128-k8-rows2^{r}", 0) == SM90_ALT
        assert tuned.lookup("sm80_fwd", 64, "bf16-d64-causal-c128-k8-rows2^18", 0) is None
        assert tuned.lookup("sm90_fwd", 128, "bf16-d128-causal-c256-k8-rows2^18", 0) is None
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "ignoring 8 entries" in msgs[0] and "[64, 4, 1] is not a shipped sm90_fwd tile" in msgs[0]
    good, problems = tuned.validate_table(body)
    assert good == {DEV: {"sm90_fwd": {CLS: SM90_ALT}}} and len(problems) == 8


def test_tile_override_refuses_unshipped_tiles():
    with pytest.raises(ValueError, match="not a shipped sm90_fwd tile"):
        with al.tile_override("sm90_fwd", (64, 4, 1)):
            pass
    with pytest.raises(ValueError, match="unknown tile family"):
        with al.tile_override("sm100_fwd", SM90_DEFAULT):
            pass
    assert tuned._FORCED == {}


def test_tuned_topk_tile_reaches_the_routing_plan(isolated, on_device, monkeypatch):
    """The routing plan's top-k tile: ``MOBA_TOPK_TILE`` (the A/B override) > the tuner's forced
    tile > the tables > the rule; a tile reaches the top-k kernel's compile key; a plan for
    another device or without one keeps the rule's tile."""
    args = (torch.bfloat16, 2 * 8192, 16, 128, 2 * 8192, 16, 2, 128, 8, True, "sm_90a")
    rule = rcfg.topk_tile("sm90", 128, 7)
    alt = tuned.candidates("sm90_topk", 128)[3]  # (64, 32, 2, 0)
    assert rl._Plan(*args, 0).topk_tile == rule  # no table
    _write(_user(isolated), _table({"sm90_topk": {CLS: alt}}))
    tuned.reset()
    plan = rl._Plan(*args, 0)
    assert plan.topk_tile == (64, 32, 2, 32, 0, False)
    assert plan.rows_tile == 64  # the plan's query tiles follow the tile's rows
    key = next(k for k in plan.ks.specs if k == "topk")
    assert plan.ks.specs[key][0][5:11] == (64, 32, 2, 32, 0, False)
    assert rl._Plan(*args, None).topk_tile == rule  # no device: no table
    assert rl._Plan(*args[:-1], "sm_80", 0).topk_tile == rcfg.topk_tile("sm80", 128, 7)  # another family
    forced = tuned.candidates("sm90_topk", 128)[2]  # (128, 16, 2, 0)
    with rl.tile_override("sm90_topk", forced):
        assert rl._Plan(*args, 0).topk_tile == (128, 16, 2, 32, 0, False)
        monkeypatch.setattr(rcfg, "_TILE_OVERRIDE", (128, 32, 1, 16, 4, 0))
        assert rl._Plan(*args, 0).topk_tile == (128, 32, 1, 16, 4, False)
    assert tuned._FORCED == {}
    # the kernel set without a plan (centroids_cute) keeps the rule's tile
    ks = rl._kernels(torch.bfloat16, 128, 1, True, "sm_90a")
    assert ks.specs["topk"][0][5:11] == rcfg.topk_tile("sm90", 128, 1)
    with pytest.raises(ValueError, match="not a shipped sm90_topk tile"):
        with rl.tile_override("sm90_topk", (256, 32, 2, 0)):
            pass


def test_shipped_table_is_valid_package_data():
    path = os.path.join(os.path.dirname(tuned.__file__), "tuned_defaults.json")
    with open(path) as f:
        table = json.load(f)
    good, problems = tuned.validate_table(table)
    assert problems == [] and table["format"] == tuned.FORMAT
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")) as f:
        assert '"moba_cute.configs" = ["tuned_defaults.json"]' in f.read()


# --- the tile reaches the plan and its compile keys -----------------------------------------

def _plan_key(total_q=8192 * 2, H=16, D=128, C=128, K=8, causal=True, dtype=torch.bfloat16, device=0):
    from moba_cute.routing import num_chunks_bound

    return (dtype, total_q, H, D, total_q, H, 2, C, K, causal, num_chunks_bound(total_q, 2, C), device)


def test_tuned_tile_reaches_the_sm90_plan(isolated, on_device):
    pytest.importorskip("cutlass")
    from moba_cute.kernels.moba_fwd_sm90 import MobaFwdSm90

    key = _plan_key()
    assert al.FwdPlan(key, "sm_90a").tile == SM90_DEFAULT
    _write(_user(isolated), _table({"sm90_fwd": {CLS: SM90_ALT}}))
    tuned.reset()
    plan = al.FWD_PLANS.get(key, key, "sm_90a")
    assert plan.sm90 and plan.shape_class == CLS and plan.tile == SM90_ALT
    # (the plan's loop switches, e.g. the persistent walk, are its own: the tile is what the table sets)
    assert plan.ks.specs["seg"][0] == MobaFwdSm90.compile_key("bfloat16", 128, *SM90_ALT, plan.variant)
    assert plan.ks.specs["slot_scan"][0] == ("slotscan", 64 * SM90_ALT[1])  # the index's unit: 64 * sub
    # the tuner's override re-plans: the cached plan is dropped on entry and on exit
    with al.tile_override("sm90_fwd", SM90_DEFAULT):
        p2 = al.FWD_PLANS.get(key, key, "sm_90a")
        assert p2 is not plan and p2.tile == SM90_DEFAULT
        assert p2.ks.specs["seg"][0] == MobaFwdSm90.compile_key("bfloat16", 128, *SM90_DEFAULT, p2.variant)
    assert al.FWD_PLANS.get(key, key, "sm_90a").tile == SM90_ALT
    # another device (or a plan for CPU tensors) does not read this device's entries
    assert al.FwdPlan(key[:-1] + (None,), "sm_90a").tile == SM90_DEFAULT


def test_tuned_tile_reaches_the_sm80_plan(isolated, on_device, monkeypatch):
    pytest.importorskip("cutlass")
    key = _plan_key(D=64, H=16, total_q=16384)
    cls = "bf16-d64-causal-c128-k8-rows2^18"
    _write(_user(isolated), _table({"sm80_fwd": {cls: SM80_ALT}}))
    for arch, force_sm80 in (("sm_80", "0"), ("sm_90a", "1")):
        monkeypatch.setenv("MOBA_CUTE_FWD_SM80", force_sm80)
        plan = al.FwdPlan(key, arch)
        assert not plan.sm90 and plan.shape_class == cls and plan.tile == SM80_ALT
        want = {r: k for r, (k, _, _) in al.kernel_specs("bfloat16", 64, True, tile=SM80_ALT).items()}
        assert {r: s[0] for r, s in plan.ks.specs.items()} == want
        assert want["diag"] != al.kernel_specs("bfloat16", 64, True)["diag"][0]  # the stages are in the key
    # the sm90 forward's merging diagonal on mma.sync (forced: from 128-key chunks on it is the
    # wgmma one) keeps the built-in sm80 tile (what its compile test proves)
    monkeypatch.delenv("MOBA_CUTE_FWD_SM80")
    monkeypatch.setenv("MOBA_CUTE_FWD_DIAG_SM90", "0")
    p90 = al.FwdPlan(_plan_key(D=64), "sm_90a")
    assert p90.sm90 and p90.ks.specs["diag"][0][8] == SM80_DEFAULT[3]


def test_size_limits_hold_for_every_candidate():
    """interface.kernel_size_limits bounds the tile tables with the smallest candidate tile, so
    the up-front check stays valid whatever tile a table picks."""
    pytest.importorskip("cutlass")
    from moba_cute.routing import num_chunks_bound

    total_q, H, D, B, C, K = 300000, 16, 128, 3, 64, 9
    key = (torch.bfloat16, total_q, H, D, total_q, H, B, C, K, True, num_chunks_bound(total_q, B, C), None)
    lim = dict(interface.kernel_size_limits(total_q, H, D, total_q, H, B, C, K, True, "sm90", backward=False))
    for t in tuned.candidates("sm90_fwd", D):
        with al.tile_override("sm90_fwd", t):
            plan = al.FwdPlan(key, "sm_90a")
        assert plan.tile == t and plan.index.tiles_bound <= lim["merged slot tile table"]
    for t in tuned.candidates("sm80_fwd", D):
        with al.tile_override("sm80_fwd", t):
            plan = al.FwdPlan(key, "sm_80")
        assert plan.tile == t and plan.index.tiles_bound <= lim["per-slot tile table"]


# --- the tuner with a fake timer -------------------------------------------------------------

def test_choose():
    d, a = SM90_DEFAULT, SM90_ALT
    assert tune.choose({d: 10.0, a: 9.0}, d, 0.01) == a
    assert tune.choose({d: 10.0, a: 9.95}, d, 0.01) == d  # within the noise margin
    assert tune.choose({d: 10.0, a: 10.0}, d, 0.0) == d  # a tie keeps the built-in tile
    assert tune.choose({d: 10.0, a: 11.0}, d, 0.01) == d
    assert tune.choose({d: "RuntimeError: boom", a: 11.0}, d, 0.01) == a
    assert tune.choose({d: "wrong result", a: "out of memory"}, d, 0.01) is None


class FakeMeasure:
    """Stands in for CudaMeasure: fixed times per (shape, tile), recording what it was asked."""

    def __init__(self, times):
        self.times = times
        self.calls = []

    def __call__(self, shape, family, tiles):
        self.calls.append((shape.name, family, list(tiles)))
        return {t: self.times[shape.name].get(t, "RuntimeError: no time") for t in tiles}


def test_tune_with_fake_timer(isolated, on_device, monkeypatch):
    s8, s64 = tune.PRESETS["flashmoba-8K"], tune.PRESETS["flashmoba-64K"]
    d96 = tune.parse_shape("B=1,H=4,D=96,C=64,K=3,S=2K")
    d80 = tune.parse_shape("B=1,H=4,D=80,C=64,K=3,S=2K")
    tk = tuned.candidates("sm90_topk", 128)
    fake = FakeMeasure({s8.name: {SM90_DEFAULT: 1.30, SM90_ALT: 1.20, tk[0]: 0.10, tk[2]: 0.09},
                        s64.name: {SM90_DEFAULT: 9.50, SM90_ALT: 9.49},
                        d96.name: {tuned.candidates("sm80_fwd", 96)[0]: 2.0}})
    lines = []
    res = tune.tune([s8, s64, d96, d80], fake, "sm_90a", 0.01, log=lines.append)
    assert [c[:2] for c in fake.calls] == [(s8.name, "sm90_fwd"), (s8.name, "sm90_topk"), (s64.name, "sm90_fwd"),
                                           (s64.name, "sm90_topk"), (d96.name, "sm80_fwd")]
    assert fake.calls[0][2] == list(tuned.candidates("sm90_fwd", 128))
    assert fake.calls[1][2] == list(tk)
    r8, r8t, r64, r64t, r96, r80 = res
    assert r8t.family == "sm90_topk" and r8t.chosen == tk[2] and r8t.speedup == pytest.approx(0.10 / 0.09)
    assert r64t.chosen is None and "no candidate" in r64t.note  # every top-k candidate failed there
    assert r8.chosen == SM90_ALT and r8.speedup == pytest.approx(1.30 / 1.20)
    assert r64.chosen == SM90_DEFAULT and r64.speedup == 1.0  # 0.1 % faster: noise
    assert r96.chosen == tuned.candidates("sm80_fwd", 96)[0]  # the other candidate failed
    assert r80.chosen is None and r80.family is None and "head dims" in r80.note
    text = "\n".join(lines)
    # progress: one line per candidate with its time (or why it has none)
    assert text.count(f"sm90_fwd {_fmt(SM90_DEFAULT)}") == 2 and "1.3000 ms" in text and "1.2000 ms" in text
    assert "failed: RuntimeError: no time" in text and "skipped" in text
    # the table: written, re-read, looked up by dispatch
    path = isolated / "out" / "tuned.json"
    table = tune.update_table({}, DEV, {"torch": "x"}, res, "2026-12-04")
    tune.write_table(str(path), table)
    good, problems = tuned.validate_table(tuned.read_table(str(path)))
    assert problems == []
    assert good == {DEV: {"sm90_fwd": {s8.shape_class: SM90_ALT, s64.shape_class: SM90_DEFAULT},
                          "sm80_fwd": {r96.shape.shape_class: r96.chosen},
                          "sm90_topk": {s8.shape_class: tk[2]}}}
    ent = table["devices"][DEV]["entries"]["sm90_fwd"][s8.shape_class]
    assert ent["ms"] == 1.20 and ent["default_ms"] == 1.30
    assert ent["times_ms"] == {",".join(map(str, t)): {SM90_DEFAULT: 1.3, SM90_ALT: 1.2}.get(t)
                               for t in tuned.candidates("sm90_fwd", 128)}
    monkeypatch.setenv("MOBA_CUTE_TUNE_FILE", str(path))
    tuned.reset()
    assert al.sm90_tiles(128, s8.shape_class, 0) == SM90_ALT
    assert al.sm90_tiles(128, tuned.shape_class("bfloat16", 128, True, 128, 8, 2 * 16384 * 16), 0) == SM90_ALT
    assert al.sm90_tiles(128, s64.shape_class, 0) == SM90_DEFAULT
    # the routing plan of the tuned shape takes the tuned top-k tile; another class the rule's
    plan = rl._Plan(torch.bfloat16, 2 * 8192, 16, 128, 2 * 8192, 16, 2, 128, 8, True, "sm_90a", 0)
    assert plan.topk_tile[:3] == tk[2][:3] and not plan.topk_tile[5]
    other = rl._Plan(torch.bfloat16, 2 * 8192, 16, 128, 2 * 8192, 16, 2, 128, 3, True, "sm_90a", 0)
    assert other.topk_tile == rcfg.topk_tile("sm90", 128, 2)


def test_tune_follows_dispatch_family(monkeypatch):
    s = tune.PRESETS["flashmoba-8K"]
    assert tune.families_for(s, "sm_90a") == (["sm90_fwd", "sm90_topk"], None)
    assert tune.families_for(s, "sm_80") == (["sm80_fwd", "sm80_topk"], None)
    assert tune.families_for(tune.PRESETS["decode-B1-C128"], "sm_90a") == (["decode"], None)
    assert tune.families_for(tune.parse_shape("B=1,H=4,D=96,C=64,K=3,S=2K"), "sm_90a") == (["sm80_fwd"], None)
    assert tune.family_for(s, "sm_90a") == ("sm90_fwd", None)
    assert tune.family_for(s, "sm_80") == ("sm80_fwd", None)
    assert tune.family_for(s, "sm_100a") == ("sm80_fwd", None)
    monkeypatch.setenv("MOBA_CUTE_FWD_SM80", "1")
    assert tune.family_for(s, "sm_90a") == ("sm80_fwd", None)
    fam, why = tune.family_for(tune.parse_shape("B=1,H=4,D=128,C=24,K=3,S=1K"), "sm_90a")
    assert fam is None and "multiple of 16" in why


def test_update_table_keeps_other_entries():
    other = {"tile": list(SM90_DEFAULT)}
    old = {"format": 1, "devices": {
        "Other GPU": {"meta": {}, "entries": {"sm90_fwd": {CLS: other}}},
        DEV: {"meta": {"torch": "old"}, "entries": {"sm90_fwd": {
            CLS: {"tile": list(SM90_DEFAULT)}, "bf16-d128-causal-c128-k8-rows2^21": other}}}}}
    r = tune.Result(tune.PRESETS["flashmoba-8K"], "sm90_fwd", SM90_DEFAULT, {SM90_DEFAULT: 2.0, SM90_ALT: 1.0},
                    SM90_ALT)
    skipped = tune.Result(tune.PRESETS["flashmoba-64K"], "sm90_fwd", SM90_DEFAULT, {}, None, "no time")
    new = tune.update_table(old, DEV, {"torch": "new"}, [r, skipped], "2026-12-04")
    assert new["devices"]["Other GPU"] == old["devices"]["Other GPU"]
    ents = new["devices"][DEV]["entries"]["sm90_fwd"]
    assert ents[CLS]["tile"] == list(SM90_ALT) and ents["bf16-d128-causal-c128-k8-rows2^21"] == other
    assert new["devices"][DEV]["meta"] == {"torch": "new"}
    assert old["devices"][DEV]["entries"]["sm90_fwd"][CLS]["tile"] == list(SM90_DEFAULT)  # not modified


def test_parse_shape():
    s = tune.parse_shape("B=2,H=16,D=128,C=128,K=8,S=8K")
    assert (s.B, s.H, s.Hk, s.D, s.C, s.K, s.S, s.dtype, s.causal) == (2, 16, 16, 128, 128, 8, 8192, "bfloat16", True)
    assert s.shape_class == CLS
    s = tune.parse_shape("B=1,H=32,Hk=8,D=64,C=512,K=3,S=1000,dtype=float16,causal=0")
    assert (s.Hk, s.S, s.dtype, s.causal) == (8, 1000, "float16", False)
    for bad in ("B=2,H=16,D=128,C=128,K=8", "B=2,H=16,D=128,C=128,K=8,S=8K,E=1", "B=2,H=16,Hk=3,D=128,C=128,K=8,S=8K",
                "B=2,H=16,D=128,C=128,K=8,S=0", "B=2,H=16,D=128,C=128,K=8,S=8K,dtype=float32", "B2"):
        with pytest.raises(ValueError):
            tune.parse_shape(bad)


def test_cli_list_and_errors(capsys):
    assert tune.main(["--list", "--shapes", "flashmoba-8K"]) == 0
    out = capsys.readouterr().out
    cands = " ".join(_fmt(t) for t in tuned.candidates("sm90_fwd", 128))
    assert CLS in out and f"sm90_fwd: {cands}  (built-in first)" in out and "moba-large" not in out
    with pytest.raises(SystemExit):
        tune.main(["--shapes", "nope"])
    with pytest.raises(SystemExit):
        tune.main(["--reps", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only exit")
def test_cli_needs_a_gpu(capsys):
    assert tune.main(["--shapes", "flashmoba-8K"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _decode_key(B=8, max_q=1, H=32, Hk=8, D=128, C=4096, K=12, device=0):
    return ("bfloat16", B, max_q, H, Hk, D, C, K, True, False, 132, 232448, device)


def test_tuned_waves_reach_the_decode_plan(isolated, on_device):
    """A decode plan takes its key-split waves from the tuner's override, else the table's entry
    for its class, else WAVES; the splits of a call follow them."""
    pytest.importorskip("cutlass")
    from moba_cute.kernels import decode_launch as dl

    key = _decode_key()
    plan = dl.DecodePlan(key, "sm_90a")
    cls = "bf16-d128-causal-c4096-k16-rows2^8"
    assert plan.shape_class == cls and plan.waves == cfg_decode.WAVES
    alt = next(t for t in tuned.candidates("decode", 128) if t[0] != cfg_decode.WAVES)
    _write(_user(isolated), _table({"decode": {cls: alt}}))
    tuned.reset()
    dl.DECODE_PLANS.clear()
    plan = dl.DECODE_PLANS.get(key, key, "sm_90a")
    assert plan.waves == alt[0]
    assert dl.DecodePlan(key[:-1] + (None,), "sm_90a").waves == cfg_decode.WAVES  # no device: no table
    # one sequence of 32K (every chunk): the splits aim at waves x SMs CTAs over 8 (row, head group) pairs
    for w in cfg_decode.WAVE_CHOICES:
        with dl.tile_override((w,)):
            p = dl.DECODE_PLANS.get(key, key, "sm_90a")
            assert p is not plan and p.waves == w
            role, gt, splits = dl.attend_launch(12, 8, 4096, 32 * 1024 + 1, 8, 32, p)
            assert role == "group" and splits == dl.splits_for(64, -(-(32 * 1024 + 1) // 32), 132, w, p.resident)
    assert dl.DECODE_PLANS.get(key, key, "sm_90a").waves == alt[0]
    with pytest.raises(ValueError, match="not a shipped decode tile"):
        with dl.tile_override((7,)):
            pass
    assert tuned._FORCED == {}


def test_tune_decode_with_fake_timer(isolated, on_device):
    pytest.importorskip("cutlass")
    from moba_cute.kernels import decode_launch as dl

    s = tune.PRESETS["decode-B8-C4096"]
    dflt, alt = tuned.candidates("decode", 128)[:2]
    fake = FakeMeasure({s.name: {dflt: 0.30, alt: 0.25}})
    lines = []
    (res,) = tune.tune([s], fake, "sm_90a", 0.01, log=lines.append)
    assert fake.calls == [(s.name, "decode", list(tuned.candidates("decode", 128)))]
    assert res.family == "decode" and res.chosen == alt and res.speedup == pytest.approx(0.30 / 0.25)
    assert f"decode {_fmt(alt)}" in "\n".join(lines)
    path = isolated / "user.json"
    tune.write_table(str(path), tune.update_table({}, DEV, {}, [res], "2026-12-04"))
    tuned.reset()
    dl.DECODE_PLANS.clear()
    assert tuned.validate_table(tuned.read_table(str(path)))[1] == []
    key = _decode_key(B=s.B)
    assert dl.DECODE_PLANS.get(key, key, "sm_90a").waves == alt[0]
    # the nearest rows bucket: 4 sequences (rows 2^7) use the 8-sequence entry (2^8)
    assert dl.DecodePlan(_decode_key(B=4), "sm_90a").waves == alt[0]
    dl.DECODE_PLANS.clear()


def test_parse_decode_shape():
    s = tune.parse_shape("B=8,H=32,Hk=8,D=128,C=4096,K=12,S=32K,new=4")
    assert s.decode and (s.Sq, s.Sk, s.rows) == (4, 32 * 1024 + 4, 8 * 4 * 32)
    assert "+4 (decode)" in s.label() and s.name.endswith("-new4")
    assert not tune.parse_shape("B=8,H=32,Hk=8,D=128,C=4096,K=12,S=32K").decode
    with pytest.raises(ValueError):
        tune.parse_shape("B=8,H=32,Hk=8,D=128,C=4096,K=12,S=32K,new=-1")
    fam, why = tune.family_for(tune.parse_shape("B=1,H=32,Hk=8,D=128,C=4096,K=12,S=32K,new=17"), "sm_90a")
    assert fam is None and "queries per sequence" in why
    fam, why = tune.family_for(tune.parse_shape("B=1,H=32,Hk=8,D=96,C=4096,K=12,S=32K,new=1"), "sm_90a")
    assert fam is None and "head dims" in why


# --- GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_tuner_smoke_on_gpu(isolated, monkeypatch):
    """The tuner on a tiny shape: every candidate runs and agrees with the built-in tile, the
    table is written, and a call in the same process then plans with the chosen tile."""
    import moba_cute

    out = isolated / "tuned.json"
    spec = "B=2,H=4,Hk=2,D=128,C=64,K=3,S=2K"
    assert tune.main(["--shape", spec, "--reps", "2", "--rounds", "1", "--warmup", "1", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    name = torch.cuda.get_device_name()
    good, problems = tuned.validate_table(table)
    assert problems == [] and list(good) == [name]
    shape = tune.parse_shape(spec)
    entries = table["devices"][name]["entries"]
    fam, topk_fam = tune.families_for(shape, al.common.arch_of(torch.device("cuda")))[0]
    assert set(entries) == {fam, topk_fam}
    ent = entries[fam][shape.shape_class]
    # every top-k tile gave the built-in tile's routing bit for bit, and was timed
    tent = entries[topk_fam][shape.shape_class]
    assert len(tent["times_ms"]) == len(tuned.candidates(topk_fam, 128))
    assert all(isinstance(ms, float) and ms > 0 for ms in tent["times_ms"].values()), tent
    assert all(isinstance(ms, float) and ms > 0 for ms in ent["times_ms"].values()), ent
    assert len(ent["times_ms"]) == len(tuned.candidates(fam, 128))
    monkeypatch.setenv("MOBA_CUTE_TUNE_FILE", str(out))
    tuned.reset()
    q = torch.randn(2 * 2048, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2 * 2048, 2, 128, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 2048, 4096], device="cuda", dtype=torch.int32)
    moba_cute.varlen_attention(q, k, k, cu, cu, 2048, 2048, 64, 3, backend="cute")
    (plan,) = al.FWD_PLANS.plans.values()
    assert plan.shape_class == shape.shape_class and plan.tile == tuple(ent["tile"])


@pytest.mark.gpu
def test_decode_tuner_smoke_on_gpu(isolated, monkeypatch):
    """The tuner on a small decode step: every waves candidate runs and agrees with the built-in,
    the table is written, and a decode call in the same process then plans with the chosen waves."""
    import moba_cute
    from moba_cute.kernels import decode_launch as dl

    out = isolated / "tuned.json"
    spec = "B=2,H=8,Hk=2,D=128,C=1024,K=4,S=8K,new=1"
    assert tune.main(["--shape", spec, "--reps", "3", "--rounds", "1", "--warmup", "1", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    name = torch.cuda.get_device_name()
    assert tuned.validate_table(table)[1] == []
    shape = tune.parse_shape(spec)
    ent = table["devices"][name]["entries"]["decode"][shape.shape_class]
    assert len(ent["times_ms"]) == len(tuned.candidates("decode", 128))
    assert all(isinstance(ms, float) and ms > 0 for ms in ent["times_ms"].values()), ent
    monkeypatch.setenv("MOBA_CUTE_TUNE_FILE", str(out))
    tuned.reset()
    dl.DECODE_PLANS.clear()
    Sk = shape.Sk
    q = torch.randn(2, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2 * Sk, 2, 128, device="cuda", dtype=torch.bfloat16)
    cu_q = torch.tensor([0, 1, 2], device="cuda", dtype=torch.int32)
    cu_k = cu_q * Sk
    moba_cute.varlen_attention(q, k, k, cu_q, cu_k, 1, Sk, 1024, 4, backend="cute")
    (plan,) = dl.DECODE_PLANS.plans.values()
    assert plan.shape_class == shape.shape_class and plan.waves == ent["tile"][0]
    dl.DECODE_PLANS.clear()
