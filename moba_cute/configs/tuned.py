"""Per-GPU tuned tiles: the tables ``python -m moba_cute.tune`` writes, and their lookup.

A forward launch plan (``kernels/attention_launch.py``) asks :func:`lookup` for its tile once,
when it is built; plans are cached per call shape, so a call pays nothing for the table (a
decode plan, ``kernels/decode_launch.py``, and a routing plan, ``kernels/route_launch.py``,
likewise). The tile of a plan comes from, first to last:

1. :func:`forced` (the tuner's in-process override: ``attention_launch.tile_override``,
   ``decode_launch.tile_override``, ``route_launch.tile_override``);
2. the environment overrides ``MOBA_CUTE_SM90_TILES`` / ``MOBA_CUTE_FWD_STAGES`` (for the
   routing's top-k, ``MOBA_TOPK_TILE``, which comes first of all);
3. the user's table: ``$MOBA_CUTE_TUNE_FILE``, else ``$XDG_CACHE_HOME/moba_cute/tuned.json``
   (``~/.cache/moba_cute/tuned.json``);
4. the table shipped with the package (``tuned_defaults.json`` next to this file);
5. the built-in constants (``attention_sm90.FWD_TILES``, ``attention_sm80.FWD_TILES``,
   ``decode.WAVES``) and rules (``routing.topk_tile``).

``MOBA_CUTE_TUNED=0`` skips both tables (3 and 4). Both are read once per process, on the first
lookup; an unreadable or malformed file, or an entry whose tile is not one of the shipped
candidates of its family (:func:`candidates`, the configurations the CPU compile tests prove),
gives one warning per file and is ignored (the file, or that entry).

Table format (JSON)::

    {"format": 1,
     "devices": {
       "NVIDIA H200": {                                # torch.cuda.get_device_name()
         "meta": {...},                                # free-form (the tuner: versions, date)
         "entries": {
           "sm90_fwd": {                               # kernel family
             "bf16-d128-causal-c128-k8-rows2^21": {    # shape class, see shape_class()
               "tile": [128, 8, 1],                    # required; the rest is informational
               "ms": 8.52, "default_ms": 8.52,         # the tuner's medians: chosen, built-in
               "times_ms": {"128,8,1": 8.52, ...},   # every candidate (null: failed)
               "shape": "B=2 H=16/16 ...", "date": "2026-12-04"}}}}}}

Families and their tiles: ``sm90_fwd`` (bn, sub, kv_stages[, 2]) of the sm90 segment
kernel; ``sm80_fwd`` (bm, bn, threads, stages) of the sm80 slot-pass forward; ``decode``
(waves,) of the decode-step kernels (``configs/decode.py: WAVE_CHOICES``, the most CTAs per SM
their key splits may reach; ``decode_launch.splits_for`` picks the count within it);
``sm90_topk`` / ``sm80_topk`` (bm, bn, stages, wgmma) of the routing's top-k kernel on each arch
family (``configs/routing.py: topk_tune_tiles``, head dims 64 and 128).
The user's entries replace the shipped ones class by class. The backward kernels ship one
configuration per head dim (nothing to choose), so they have no family here.

Shape class: what a plan knows from its shape key, bucketed so that one tuned shape serves its
neighbours: ``{bf16|fp16}-d{head_dim}-{causal|noncausal}-c{C}-k{K}-rows2^{r}`` with the chunk
size ``C`` and ``topk`` ``K`` rounded up to powers of two, and ``r`` = log2 of ``total_q *
num_heads`` (the (query, head) rows of the call; a decode plan: ``batch * max_seqlen_q *
num_heads``) rounded to the nearest integer. A lookup needs
every field but ``r`` to match; among the entries that do, it takes the nearest ``r`` (ties:
the larger), so a table tuned at 8K and 64K also serves 16K and 32K.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import warnings

from . import attention_sm80 as cfg80
from . import attention_sm90 as cfg90
from . import decode as cfgdec
from . import routing as cfgr

__all__ = ["FAMILIES", "FORMAT", "candidates", "builtin", "shape_class", "parse_shape_class", "lookup",
           "forced", "set_forced", "user_table_path", "shipped_table_path", "read_table", "validate_table", "reset",
           "device_name"]

FORMAT = 1
FAMILIES = ("sm90_fwd", "sm80_fwd", "decode", "sm90_topk", "sm80_topk")

# stage counts of the sm80 forward that tests/test_attention_compile.py compiles (spill-free)
# for every head dim: the shipped value and the MOBA_CUTE_FWD_STAGES alternative
SM80_FWD_STAGES = (1, 2)

_DTYPE_TAGS = {"bfloat16": "bf16", "float16": "fp16", "bf16": "bf16", "fp16": "fp16"}
_CLASS_RE = re.compile(r"^(bf16|fp16)-d(\d+)-(causal|noncausal)-c(\d+)-k(\d+)-rows2\^(\d+)$")


def candidates(family: str, head_dim: int, chunk_size=None) -> tuple:
    """The shipped tiles of ``family`` for ``head_dim``, the built-in default first (for
    ``sm90_fwd``, the default for chunks of ``chunk_size`` keys: ``attention_sm90.fwd_tile``; the
    set does not depend on it); () when the family has none for that head dim. Only these may
    come from a table or the tuner."""
    if family == "sm90_fwd":
        if head_dim not in cfg90.FWD_TILES:
            return ()
        dflt = cfg90.fwd_tile(head_dim, chunk_size)
        rest = (tuple(cfg90.FWD_TILES[head_dim]),) + tuple(tuple(t) for t in cfg90.ALT_TILES.get(head_dim, ()))
        return (dflt,) + tuple(dict.fromkeys(t for t in rest if t != dflt))
    if family == "sm80_fwd":
        if head_dim not in cfg80.FWD_TILES:
            return ()
        bm, bn, nt, st = cfg80.FWD_TILES[head_dim]
        return ((bm, bn, nt, st),) + tuple((bm, bn, nt, s) for s in SM80_FWD_STAGES if s != st)
    if family == "decode":
        if head_dim not in cfgdec.SUPPORTED_HEAD_DIMS:
            return ()
        return ((cfgdec.WAVES,),) + tuple((w,) for w in cfgdec.WAVE_CHOICES if w != cfgdec.WAVES)
    if family in ("sm90_topk", "sm80_topk"):
        return cfgr.topk_tune_tiles(family[:4], head_dim)
    raise ValueError(f"unknown tile family {family!r}; choose one of {FAMILIES}")


def builtin(family: str, head_dim: int, chunk_size=None):
    """The built-in default tile (configs constants; ``chunk_size``: :func:`candidates`), or None."""
    c = candidates(family, head_dim, chunk_size)
    return c[0] if c else None


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _log2_round(n: int) -> int:
    """log2(n) rounded to the nearest integer (geometric midpoint, exact integer arithmetic)."""
    n = int(n)
    if n <= 1:
        return 0
    b = n.bit_length() - 1
    return b + (1 if n * n >= 1 << (2 * b + 1) else 0)


def shape_class(dtype_name: str, head_dim: int, causal: bool, chunk_size: int, topk: int, rows: int) -> str:
    """The table key of a call: ``rows`` = total_q * num_heads (see the module docstring)."""
    tag = _DTYPE_TAGS.get(str(dtype_name).replace("torch.", ""))
    if tag is None:
        raise ValueError(f"shape_class: dtype {dtype_name!r} is not float16/bfloat16")
    return (f"{tag}-d{int(head_dim)}-{'causal' if causal else 'noncausal'}-c{_pow2_ceil(chunk_size)}"
            f"-k{_pow2_ceil(topk)}-rows2^{_log2_round(rows)}")


def parse_shape_class(cls: str):
    """(base, head_dim, rows_log2) of a shape-class string: ``base`` is the class without its
    rows bucket (what a lookup must match exactly). ValueError if it is not one."""
    m = _CLASS_RE.match(cls) if isinstance(cls, str) else None
    if m is None:
        raise ValueError(f"not a shape class: {cls!r} (expected e.g. 'bf16-d128-causal-c128-k8-rows2^21')")
    c, k = int(m.group(4)), int(m.group(5))
    if c != _pow2_ceil(c) or k != _pow2_ceil(k):
        raise ValueError(f"shape class {cls!r}: chunk size and topk buckets are powers of two")
    return cls[: cls.rindex("-rows2^")], int(m.group(2)), int(m.group(6))


# --- table files ------------------------------------------------------------------------------

def user_table_path() -> str:
    """Where the user's table is read (and the tuner writes by default)."""
    p = os.environ.get("MOBA_CUTE_TUNE_FILE")
    if p:
        return os.path.expanduser(p)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "moba_cute", "tuned.json")


def shipped_table_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_defaults.json")


def validate_table(table) -> tuple[dict, list[str]]:
    """Split a decoded table into its valid entries ``{device: {family: {class: tile}}}`` and a
    list of problems (entries dropped). Raises ValueError when the file as a whole is not a
    table of this format."""
    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("devices"), dict):
        raise ValueError(f'not a moba_cute tile table (expected {{"format": {FORMAT}, "devices": {{...}}}})')
    good: dict = {}
    problems: list[str] = []
    for dev, body in table["devices"].items():
        entries = body.get("entries") if isinstance(body, dict) else None
        if not isinstance(entries, dict):
            problems.append(f"device {dev!r}: no 'entries' object")
            continue
        for fam, classes in entries.items():
            if fam not in FAMILIES or not isinstance(classes, dict):
                problems.append(f"device {dev!r}: unknown family {fam!r}")
                continue
            for cls, ent in classes.items():
                where = f"{dev!r} {fam} {cls!r}"
                try:
                    _, head_dim, _ = parse_shape_class(cls)
                except ValueError as e:
                    problems.append(f"{where}: {e}")
                    continue
                raw = ent.get("tile") if isinstance(ent, dict) else None
                if not (isinstance(raw, list) and all(type(x) is int for x in raw)):
                    problems.append(f"{where}: 'tile' must be a list of integers, got {raw!r}")
                    continue
                tile = tuple(raw)
                if tile not in candidates(fam, head_dim):
                    problems.append(f"{where}: tile {list(tile)} is not a shipped {fam} tile for head_dim "
                                    f"{head_dim} ({[list(t) for t in candidates(fam, head_dim)]})")
                    continue
                good.setdefault(dev, {}).setdefault(fam, {})[cls] = tile
    return good, problems


def read_table(path: str) -> dict:
    """The decoded JSON of a table file (``{}`` if it does not exist); raises OSError /
    ValueError (json.JSONDecodeError included) on an unreadable or malformed file."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_valid(path: str, what: str) -> dict:
    """The valid entries of one table file; one warning for whatever is wrong with it."""
    try:
        table = read_table(path)
        if table == {}:
            return {}
        good, problems = validate_table(table)
    except (OSError, ValueError) as e:
        warnings.warn(f"moba_cute: ignoring the {what} tile table {path}: {e}", RuntimeWarning, stacklevel=4)
        return {}
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        warnings.warn(f"moba_cute: ignoring {len(problems)} entr{'y' if len(problems) == 1 else 'ies'} of the "
                      f"{what} tile table {path}: {'; '.join(problems[:3])}{more}", RuntimeWarning, stacklevel=4)
    return good


_LOCK = threading.Lock()
_INDEX = None  # {(device, family, base class): [(rows_log2, tile), ...]} once loaded
_FORCED: dict = {}  # family -> tile (attention_launch.tile_override)
_NAMES: dict = {}  # device index -> name


def _index() -> dict:
    global _INDEX
    idx = _INDEX
    if idx is not None:
        return idx
    with _LOCK:
        if _INDEX is None:
            merged: dict = {}
            if os.environ.get("MOBA_CUTE_TUNED", "1") not in ("0", "false", "False", "off"):
                # shipped first, then the user's table replaces it class by class
                for path, what in ((shipped_table_path(), "shipped"), (user_table_path(), "user")):
                    for dev, fams in _load_valid(path, what).items():
                        for fam, classes in fams.items():
                            merged.setdefault(dev, {}).setdefault(fam, {}).update(classes)
            built: dict = {}
            for dev, fams in merged.items():
                for fam, classes in fams.items():
                    for cls, tile in classes.items():
                        base, _, r = parse_shape_class(cls)
                        built.setdefault((dev, fam, base), []).append((r, tile))
            _INDEX = built
        return _INDEX


def reset() -> None:
    """Forget the loaded tables (the next lookup reads the files again). Launch plans built
    before keep their tiles: clear ``attention_launch.FWD_PLANS`` too."""
    global _INDEX
    with _LOCK:
        _INDEX = None


def device_name(index):
    """``torch.cuda.get_device_name(index)``, cached; None for ``index=None`` or without CUDA
    (plans built on the host in the CPU tests: no table applies)."""
    if index is None:
        return None
    name = _NAMES.get(index, False)
    if name is False:
        import torch

        name = _NAMES[index] = torch.cuda.get_device_name(index) if torch.cuda.is_available() else None
    return name


def set_forced(family: str, tile):
    """Force ``tile`` (None: nothing) for ``family`` in this process; returns the previous one.
    Used through ``attention_launch.tile_override`` (and the decode / routing ones), which also
    drop the cached plans."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tile family {family!r}; choose one of {FAMILIES}")
    prev = _FORCED.pop(family, None)
    if tile is not None:
        _FORCED[family] = tuple(tile)
    return prev


@contextlib.contextmanager
def forcing(family: str, tile, head_dims, clear):
    """Within the block, ``tile`` (a shipped candidate of ``family`` for one of ``head_dims``) is
    forced for ``family``: the body of the kernels' ``tile_override`` hooks, what the tuner
    times. ``clear()`` drops the caller's cached plans on entry and exit, so calls re-plan with
    the tile in force."""
    tile = tuple(int(x) for x in tile)
    if not any(tile in candidates(family, d) for d in head_dims):
        raise ValueError(f"tile_override: {tile} is not a shipped {family} tile")
    saved = set_forced(family, tile)
    try:
        clear()
        yield
    finally:
        set_forced(family, saved)
        clear()


def forced(family: str, head_dim: int):
    """The tile forced for ``family`` in this process (the tuner), if it applies to ``head_dim``."""
    t = _FORCED.get(family)
    return t if t is not None and t in candidates(family, head_dim) else None


def lookup(family: str, head_dim: int, cls: str, device_index):
    """The tuned tile of ``family`` for shape class ``cls`` on CUDA device ``device_index``,
    or None (no table entry for this device and class; see the module docstring)."""
    dev = device_name(device_index)
    if dev is None:
        return None
    base, _, r = parse_shape_class(cls)
    ents = _index().get((dev, family, base))
    if not ents:
        return None
    _, tile = min(ents, key=lambda e: (abs(e[0] - r), -e[0]))
    # the tables were checked against the candidates of the class's head dim when loaded
    return tile if tile in candidates(family, head_dim) else None
