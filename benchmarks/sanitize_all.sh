#!/usr/bin/env bash
# The sanitizer sweep in one GPU command (issue 13; docs/reliability.md):
#
#   benchmarks/sanitize_all.sh OUT_DIR [arguments for benchmarks.sanitize, e.g. --only tiny]
#
# Runs `python3 -m benchmarks.sanitize` once without a sanitizer, in parallel shards (every
# kernel compiles into the DSL's disk cache, outside the sanitized runs), then under
# compute-sanitizer's memcheck, racecheck, synccheck and initcheck (--report-api-errors no).
# Each run's output goes to OUT_DIR/<tool>.log (plain run: OUT_DIR/plain-<shard>.log);
# OUT_DIR/summary.txt gets one line per run: exit status, the sanitizer's own summary line,
# cases ok, seconds. The PyTorch caching allocator is off (PYTORCH_NO_CUDA_MEMORY_CACHING=1), so
# every tensor is its own allocation and an access past its end is caught. Exit status: 0 when every run exited 0 with a zero error/hazard count.
#
# Environment: PYTHON (default python3), COMPUTE_SANITIZER (default: on PATH, else
# /usr/local/cuda/bin/compute-sanitizer), SANITIZE_TIMEOUT (seconds per sanitized run, default 300),
# SANITIZE_TOOLS (default "memcheck racecheck synccheck initcheck"), SANITIZE_WARMUP_JOBS (parallel
# processes of the plain run, default min(8, cores)), SANITIZE_PARALLEL (1: the tools run side by side),
# SANITIZE_COMMIT (the commit to print, where the tree was copied without its .git).
set -u
out=${1:?usage: benchmarks/sanitize_all.sh OUT_DIR [benchmarks.sanitize arguments]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
PY=${PYTHON:-python3}
CS=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
TIMEOUT=${SANITIZE_TIMEOUT:-300}
TOOLS=${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}
JOBS=${SANITIZE_WARMUP_JOBS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
summary="$out/summary.txt"
: > "$summary"
status=0

cases_ok() {  # "N/M cases ok" from a log
  local line
  line=$(grep -E '^sanitize: ' "$1" | tail -1)
  if [ -n "$line" ]; then echo "${line#sanitize: }"; else echo "no case summary (killed or crashed)"; fi
}

{
  # (SANITIZE_COMMIT names the code where the tree travels without an up-to-date .git)
  echo "commit ${SANITIZE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' + local changes')}"
  echo "device $($PY -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo unknown)"
  echo "compute-sanitizer $("$CS" --version 2>/dev/null | grep -Eo 'Version [^ ]+' | head -1)"
} >> "$summary"

# plain run in JOBS parallel shards: compiles every kernel (~100) into the disk cache
t0=$(date +%s)
pids=()
for ((i = 0; i < JOBS; i++)); do
  $PY -m benchmarks.sanitize --shard "$i/$JOBS" "$@" > "$out/plain-$i.log" 2>&1 &
  pids+=($!)
done
rcs=""
for ((i = 0; i < JOBS; i++)); do
  wait "${pids[$i]}"
  rc=$?
  rcs="$rcs $rc"
  [ "$rc" -eq 0 ] || status=1
done
ok=$(cat "$out"/plain-*.log | grep -c '^ok: ')
bad=$(cat "$out"/plain-*.log | grep -c '^FAILED: ')
echo "plain ($JOBS shards): exit$rcs, $ok ok, $bad failed, $(( $(date +%s) - t0 )) s" >> "$summary"

run_tool() {  # one sanitized run; writes its summary line to OUT_DIR/<tool>.summary, returns 0 when clean
  local tool=$1 t0 rc found note
  t0=$(date +%s)
  timeout "$TIMEOUT" "$CS" --tool "$tool" --report-api-errors no $PY -m benchmarks.sanitize "${@:2}" \
    > "$out/$tool.log" 2>&1
  rc=$?
  # memcheck/synccheck/initcheck: "ERROR SUMMARY: N errors"; racecheck: "RACECHECK SUMMARY: N hazards
  # displayed (E errors, W warnings)"
  found=$(grep -Eo '(ERROR|RACECHECK) SUMMARY: .*' "$out/$tool.log" | tail -1)
  [ -n "$found" ] || found="no sanitizer summary"
  note=""
  [ "$rc" -eq 124 ] && note=" (timed out after ${TIMEOUT} s)"
  echo "$tool: exit $rc$note, $found, $(cases_ok "$out/$tool.log"), $(( $(date +%s) - t0 )) s" > "$out/$tool.summary"
  [ "$rc" -eq 0 ] && echo "$found" | grep -Eq 'SUMMARY: 0 (errors|hazards)'
}

# SANITIZE_PARALLEL=1 runs the tools side by side (each is one process on one GPU; the slowest,
# racecheck, then bounds the wall time instead of the sum)
pids=()
for tool in $TOOLS; do
  if [ "${SANITIZE_PARALLEL:-0}" = 1 ]; then
    run_tool "$tool" "$@" &
    pids+=($!)
  else
    run_tool "$tool" "$@" || status=1
  fi
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for tool in $TOOLS; do cat "$out/$tool.summary" >> "$summary"; done
cat "$summary"
exit $status
