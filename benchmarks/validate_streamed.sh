#!/usr/bin/env bash
# The GPU checks that the streamed sm90 forward's variants still need before any may become a
# default (docs/design.md section 8): the intra-warpgroup overlap of the one-consumer two-stage
# tile (MOBA_CUTE_FWD_OVERLAP=1, K and V in rings of their own since 2026-12-06), the pair tile
# (128, 8, 2, 2), and K/V multicast in clusters of two CTAs (the default from 2048-key chunks).
# One GPU command, 10 minutes at most (each step has its time limit), with a cold DSL cache:
#
#   benchmarks/validate_streamed.sh OUT_DIR
#
# 1. GPU tests: every variant bitwise equal to the sequential one-consumer kernel, the
#    alternative tiles and the default multicast against the reference (pytest-xdist workers
#    where it is installed, VALIDATE_JOBS of them, default 6: the time is kernel compiles).
# 2. benchmarks.fwd_env_ab on moba-large (B=1, H=32, Hk=8, D=128): C=512 K=3 at 32K and C=4096
#    K=12 at 128K, in one process, interleaved: (64, 8, 2) sequential (multicast by default at
#    C=4096), overlapped, overlapped in clusters, and (128, 8, 2, 2); each checked bit for bit
#    against the first.
# 3. memcheck, racecheck and synccheck on the fwd-overlap-*, fwd-pair-* and fwd-mcast-* sanitizer
#    cases (last: the slowest step, and the times already tell whether a variant is worth keeping).
# OUT_DIR/summary.txt gets one line per step and the timings; each step has its own time limit
# and a failed step does not stop the later ones. Exit status 0 when every test and sanitizer
# run passed.
set -u
out=${1:?usage: benchmarks/validate_streamed.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
PY=${PYTHON:-python3}
JOBS=${VALIDATE_JOBS:-6}
summary="$out/summary.txt"
{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat .probe/commit 2>/dev/null || echo unknown)"
  echo "device $($PY -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo unknown)"
} > "$summary"
status=0
t0=$(date +%s)
since() { echo "$(( $(date +%s) - t0 )) s"; }

xd=""
$PY -c "import xdist" 2>/dev/null && xd="-n $JOBS"
timeout 170 $PY -m pytest -m gpu -q $xd tests/test_attention_sm90_gpu.py \
  -k "streamed_bitwise or alternative_tiles or multicast" > "$out/tests.log" 2>&1
rc=$?
[ "$rc" -eq 0 ] || status=1
echo "tests: exit $rc, $(tail -1 "$out/tests.log"), $(since)" >> "$summary"

T=MOBA_CUTE_SM90_TILES=64,8,2
timeout 150 $PY -m benchmarks.fwd_env_ab --shapes C512-32K,moba-large-128K --reps 5 \
  "$T" "$T;MOBA_CUTE_FWD_OVERLAP=1" "$T;MOBA_CUTE_FWD_OVERLAP=1;MOBA_CUTE_FWD_MULTICAST=1" \
  "MOBA_CUTE_SM90_TILES=128,8,2,2" > "$out/ab.log" 2>&1
rc=$?
[ "$rc" -eq 0 ] || status=1
echo "fwd_env_ab: exit $rc, $(since)" >> "$summary"
grep -E ' ms  x' "$out/ab.log" | sed 's/^/  /' >> "$summary"
grep -c '"same_bits_as_first": false' "$out/ab.log" | sed 's/^/  outputs not bitwise equal to the first variant: /' \
  >> "$summary"

for cases in fwd-overlap fwd-mcast fwd-pair; do
  SANITIZE_TOOLS="memcheck racecheck synccheck" SANITIZE_TIMEOUT=75 SANITIZE_PARALLEL=1 \
    timeout 90 benchmarks/sanitize_all.sh "$out/sanitize-$cases" --only "$cases" > /dev/null 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || status=1
  echo "sanitize $cases: exit $rc, $(since)" >> "$summary"
  grep -E '^(memcheck|racecheck|synccheck|plain)' "$out/sanitize-$cases/summary.txt" 2>/dev/null | sed 's/^/  /' \
    >> "$summary"
done

cat "$summary"
exit $status
