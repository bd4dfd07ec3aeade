#!/usr/bin/env bash
# The GPU checks that the streamed sm90 forward's two variants still need before either may become
# a default (docs/design.md section 8, update 5): the pair tile (128, 8, 2, 2) and the
# intra-warpgroup overlap of the one-consumer two-stage tile (MOBA_CUTE_FWD_OVERLAP=1). One GPU
# command, about 6-9 minutes on an H200 with a cold DSL cache:
#
#   benchmarks/validate_streamed.sh OUT_DIR
#
# 1. GPU tests: both variants bitwise equal to the sequential one-consumer kernel, and the
#    alternative tiles against the reference (pytest-xdist workers: the time is kernel compiles;
#    VALIDATE_JOBS, default 6).
# 2. benchmarks.kernel_times on moba-large (B=1, H=32, Hk=8, D=128): C=512 K=3 at 32K and C=4096
#    K=12 at 128K, for (64, 8, 2) sequential, (64, 8, 2) overlapped and (128, 8, 2, 2).
# 3. memcheck and racecheck on the fwd-pair-* and fwd-overlap-* sanitizer cases (last: the
#    slowest step, and the kernel times already tell whether a variant is worth keeping).
# OUT_DIR/summary.txt gets one line per step and the kernel times; each step has its own time limit
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

timeout 240 $PY -m pytest -m gpu -q -n "$JOBS" tests/test_attention_sm90_gpu.py \
  -k "streamed_bitwise or alternative_tiles" > "$out/tests.log" 2>&1
rc=$?
[ "$rc" -eq 0 ] || status=1
echo "tests: exit $rc, $(tail -1 "$out/tests.log"), $(since)" >> "$summary"

for shape in "--C 512 --K 3 --S 32768" "--C 4096 --K 12 --S 131072 --reps 3"; do
  for variant in "64,8,2 0" "64,8,2 1" "128,8,2,2 0"; do
    set -- $variant
    name="kt$(echo "$shape" | grep -Eo 'S [0-9]+' | tr -d 'S ')-$(echo "$1" | tr , x)-overlap$2"  # (no commas: files come back by plain names)
    MOBA_CUTE_FWD_OVERLAP=$2 timeout 60 $PY -m benchmarks.kernel_times --B 1 --H 32 --Hk 8 $shape \
      --tiles "$1" > "$out/$name.log" 2>&1
    echo "$name: exit $?, $(since)" >> "$summary"
    grep -E '^S=|moba_fwd_sm90|MobaFwdSm90' "$out/$name.log" | head -4 | sed 's/^/  /' >> "$summary"
  done
done
for cases in fwd-pair fwd-overlap; do
  SANITIZE_TOOLS="memcheck racecheck" SANITIZE_TIMEOUT=90 \
    timeout 200 benchmarks/sanitize_all.sh "$out/sanitize-$cases" --only "$cases" > /dev/null 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || status=1
  echo "sanitize $cases: exit $rc, $(since)" >> "$summary"
  grep -E '^(memcheck|racecheck|plain)' "$out/sanitize-$cases/summary.txt" 2>/dev/null | sed 's/^/  /' >> "$summary"
done

cat "$summary"
exit $status
