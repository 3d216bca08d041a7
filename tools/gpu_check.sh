#!/usr/bin/env bash
# Build, test and benchmark helexa_native on a GPU machine, in one command.
#
#   tools/gpu_check.sh [all|check|build|test|bench|tp] [options]
#     all    build, GPU tests, benchmark, tensor parallelism (default)
#     check  build + GPU tests
#     build  build only;  test  tests only;  bench  benchmark only
#     tp     tensor parallelism over --tp GPUs: the multi-GPU tests, then
#            bench TP=1 against TP=N ("skipped: needs N GPUs" on fewer)
#   options:
#     --models LIST   bench models, PRESET:QUANT comma-separated
#                     (default: llama3-8b Q4_K_M/Q4_0/Q8_0/bf16, smollm2-135m Q4_0/bf16)
#     --depths LIST   KV depths of the bench runs (default 0,4096)
#     --repeats N     timed bench runs per depth (default 3)
#     -k EXPR         pytest -k filter for the tests
#     --arch X.Y      TORCH_CUDA_ARCH_LIST (default 9.0)
#     --int8-modes    bench: also time int8-everywhere and float-only decode
#     --concurrency L bench: also N concurrent streams for each N of L (e.g. 1,8,32,64)
#     --tc-min L      bench: repeat the concurrency runs for each HELEXA_TC_MIN of L
#                     (the fewest tokens of a tensor-core product; e.g. 2,9)
#     --tc-kernel L   bench: the same for each HELEXA_TC_KERNEL of L (v1,staged)
#     --ab 'V=1;V=0'  bench: the same for each environment setting (';' between them)
#     --layers N      bench: synthetic models of N layers (shapes too large for the disk)
#     --tp N          tp stage: GPUs to split over (default 2)
#     --tp-models L   tp stage: bench models (default llama3-8b:bf16)
#
# Logs and JSON go to $OUT (default /tmp/helexa-gpu-check): build.log, tests.log,
# tests.xml, bench.log, bench.json, tp.log, bench_tp.json, summary.txt. The
# summary table is printed last. A stage that is not run keeps no stale file. Each stage has a
# time limit (BUILD_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT seconds), and all
# share BUDGET (570 s) so one call ends inside a 10-minute window with its
# logs and summary intact.
#
# gguf and flask, which the GPU image lacks, are installed from
# .device/wheels when present (../shared/device-prep.sh stages them).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/helexa-gpu-check}
mkdir -p "$OUT"

MODE=all
case "${1:-}" in
  all|check|build|test|bench|tp) MODE=$1; shift ;;
esac
MODELS=""
DEPTHS="0,4096"
REPEATS=3
KEXPR=""
INT8_MODES=""
CONCURRENCY=""
TC_MIN=""
TC_KERNEL=""
AB=""
LAYERS=""
TP=2
TP_MODELS="llama3-8b:bf16"
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) LAYERS=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --depths) DEPTHS=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    -k) KEXPR=$2; shift 2 ;;
    --arch) ARCH=$2; shift 2 ;;
    --int8-modes) INT8_MODES=1; shift ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --tc-min) TC_MIN=$2; shift 2 ;;
    --tc-kernel) TC_KERNEL=$2; shift 2 ;;
    --ab) AB=$2; shift 2 ;;
    --tp) TP=$2; shift 2 ;;
    --tp-models) TP_MODELS=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

BUILD_TIMEOUT=${BUILD_TIMEOUT:-420}
TEST_TIMEOUT=${TEST_TIMEOUT:-420}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-540}
# The whole call's budget: every stage is cut to what is left of it (less a
# margin for the summary), so the summary always prints.
BUDGET=${BUDGET:-570}
T_START=$SECONDS
limit() {
  local left=$((BUDGET - (SECONDS - T_START) - 15))
  [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import gguf, flask" >/dev/null 2>&1 && ls .device/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl >/dev/null 2>&1 || true
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

STATUS_BUILD="not run"; STATUS_TEST="not run"; STATUS_BENCH="not run"; STATUS_TP="not run"
RC=0

built() {
  python3 -c "import helexa_native._C as C, sys; sys.exit(0 if C.cuda else 1)" >/dev/null 2>&1
}

do_build() {
  rm -f "$OUT/build.log"
  local t0=$SECONDS
  echo "== build (TORCH_CUDA_ARCH_LIST=$ARCH)"
  { python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvcc --version | tail -1
    command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja: missing (serial build)"; } >"$OUT/build.log" 2>&1
  local lim; lim=$(limit "$BUILD_TIMEOUT")
  TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-16} timeout "$lim" \
    python3 setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ] && built; then
    STATUS_BUILD="ok ($((SECONDS - t0)) s)"
  else
    [ $rc -eq 124 ] && STATUS_BUILD="TIMEOUT after $lim s" || STATUS_BUILD="FAILED (rc $rc)"
    RC=1
    echo "-- build errors:"
    grep -E "error|Error" "$OUT/build.log" | grep -v "^ *$" | head -40
  fi
  echo "build: $STATUS_BUILD"
}

do_test() {
  rm -f "$OUT/tests.log" "$OUT"/tests*.xml
  if ! built; then STATUS_TEST="skipped (no CUDA build)"; RC=1; return; fi
  local t0=$SECONDS
  echo "== tests"
  # One pytest process per file: a crash in one file cannot hide the others.
  local files=(${TEST_FILES:-tests/gpu/test_*.py})
  local passed=0 failed=0 crashed=""
  for f in "${files[@]}"; do
    local args=("$f" -q -rfE --maxfail=25 -p no:cacheprovider)
    [ -n "$KEXPR" ] && args+=(-k "$KEXPR")
    local lim; lim=$(limit "$TEST_TIMEOUT")
    echo "---- $f" >>"$OUT/tests.log"
    timeout "$lim" python3 -X faulthandler -m pytest "${args[@]}" >>"$OUT/tests.log" 2>&1
    local rc=$?
    local last
    last=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped)|no tests ran" "$OUT/tests.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    echo "$(basename "$f"): rc $rc; $last"
    [ $rc -ne 0 ] && RC=1 && failed=$((failed + 1))
    [ $rc -gt 128 ] && crashed="$crashed $(basename "$f")"
  done
  grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | cut -c1-300 | head -40
  if [ $failed -eq 0 ]; then STATUS_TEST="ok"; else STATUS_TEST="FAILED in $failed file(s)${crashed:+; crashed:$crashed}"; fi
  STATUS_TEST="$STATUS_TEST ($((SECONDS - t0)) s)"
  echo "tests: $STATUS_TEST"
}

do_bench() {
  rm -f "$OUT/bench.log" "$OUT/bench.json"
  if ! built; then STATUS_BENCH="skipped (no CUDA build)"; RC=1; return; fi
  local t0=$SECONDS
  echo "== bench"
  local args=(tools/gpu_bench.py --json "$OUT/bench.json" --depths "$DEPTHS" --repeats "$REPEATS")
  [ -n "$MODELS" ] && args+=(--models "$MODELS")
  [ -n "$INT8_MODES" ] && args+=(--int8-modes)
  [ -n "$CONCURRENCY" ] && args+=(--concurrency "$CONCURRENCY")
  [ -n "$TC_MIN" ] && args+=(--tc-min "$TC_MIN")
  [ -n "$TC_KERNEL" ] && args+=(--tc-kernel "$TC_KERNEL")
  [ -n "$AB" ] && args+=(--ab "$AB")
  [ -n "$LAYERS" ] && args+=(--layers "$LAYERS")
  local lim; lim=$(limit "$BENCH_TIMEOUT")
  timeout "$lim" python3 "${args[@]}" 2>&1 | tee "$OUT/bench.log"
  local rc=${PIPESTATUS[0]}
  if [ $rc -eq 124 ]; then STATUS_BENCH="TIMEOUT after $lim s (partial results kept)"; RC=1
  elif [ $rc -ne 0 ]; then STATUS_BENCH="FAILED (rc $rc)"; RC=1
  else STATUS_BENCH="ok"; fi
  STATUS_BENCH="$STATUS_BENCH ($((SECONDS - t0)) s)"
}

gpu_count() {
  python3 -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0
}

do_tp() {
  rm -f "$OUT/tp.log" "$OUT/bench_tp.json"
  if ! built; then STATUS_TP="skipped (no CUDA build)"; RC=1; return; fi
  local n; n=$(gpu_count)
  echo "== tensor parallelism (TP=$TP, $n GPU(s) visible)"
  if [ "$n" -lt "$TP" ]; then
    STATUS_TP="skipped: needs $TP GPUs ($n visible)"
    echo "tp: $STATUS_TP"
    return
  fi
  local t0=$SECONDS
  local args=(tests/gpu/test_tensor_parallel_gpu.py -q -rfE -p no:cacheprovider)
  [ -n "$KEXPR" ] && args+=(-k "$KEXPR")
  local lim; lim=$(limit "$TEST_TIMEOUT")
  timeout "$lim" python3 -X faulthandler -m pytest "${args[@]}" >"$OUT/tp.log" 2>&1
  local trc=$?
  local last
  last=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped)|no tests ran" "$OUT/tp.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  echo "tp tests: rc $trc; $last"
  grep -E "^(FAILED|ERROR) " "$OUT/tp.log" | cut -c1-300 | head -20
  lim=$(limit "$BENCH_TIMEOUT")
  timeout "$lim" python3 tools/gpu_bench.py --json "$OUT/bench_tp.json" --tensor-parallel "1,$TP" \
    --models "$TP_MODELS" --depths 0 --repeats "$REPEATS" 2>&1 | tee -a "$OUT/tp.log"
  local brc=${PIPESTATUS[0]}
  if [ $trc -ne 0 ] || [ $brc -ne 0 ]; then
    STATUS_TP="FAILED (tests rc $trc, bench rc $brc)"; RC=1
  else
    STATUS_TP="ok"
  fi
  STATUS_TP="$STATUS_TP ($((SECONDS - t0)) s)"
}

case "$MODE" in
  all) do_build; do_test; do_bench; do_tp ;;
  check) do_build; do_test ;;
  build) do_build ;;
  test) built || do_build; do_test ;;
  bench) built || do_build; do_bench ;;
  tp) built || do_build; do_tp ;;
esac

{
  echo
  echo "================ helexa_native GPU check ================"
  python3 -c "import torch; p = torch.cuda.get_device_properties(0); print(f'device  {p.name}, {p.total_memory >> 30} GiB, sm_{p.major}{p.minor}')" 2>/dev/null \
    || echo "device  (none visible)"
  echo "build   $STATUS_BUILD"
  echo "tests   $STATUS_TEST"
  echo "bench   $STATUS_BENCH"
  echo "tp      $STATUS_TP"
  if [ -f "$OUT/bench_tp.json" ]; then
    python3 - "$OUT/bench_tp.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"tensor parallelism, decode at depth 0 ({d['decode_tokens']} tokens, medians)")
base = {}
for e in d["results"]:
    if "error" in e or not e.get("runs"):
        print(f"{e['model']:<22} TP={e.get('tensor_parallel', '?')} FAILED {e.get('error', '')[:80]}")
        continue
    r = e["runs"][0]
    tp = e["tensor_parallel"]
    if tp == 1:
        base[e["model"]] = r["decode_tokens_per_s"]
    one = base.get(e["model"])
    speedup = f"{r['decode_tokens_per_s'] / one:.2f}x" if one else ""
    print(f"{e['model']:<22} TP={tp:<2} decode {r['decode_tokens_per_s']:>8.1f} tok/s {speedup:>7}  "
          f"prefill {r['prefill_tokens_per_s']:>8.0f} tok/s")
EOF
  fi
  if [ -f "$OUT/bench.json" ]; then
    python3 - "$OUT/bench.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
bw = d.get("copy_bandwidth_gb_per_s") or 0
print(f"copy bandwidth {bw:.0f} GB/s; prefill {d['prompt_tokens']} tokens, decode {d['decode_tokens']} tokens; medians")
up = d.get("upload")
if up:
    print(f"host-to-device {up['worker_pageable_gb_per_s']:.1f} GB/s worker upload (pageable), {up['torch_pinned_gb_per_s']:.1f} GB/s torch pinned copy")
hdr = f"{'model':<22} {'load s':>7} {'depth':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/tok':>7} {'GB/s':>7} {'%bw':>5}"
print(hdr)
print("-" * len(hdr))
for e in d["results"]:
    if "error" in e:
        print(f"{e['model']:<22} FAILED {e['error'][:90]}")
        continue
    for i, r in enumerate(e.get("runs", [])):
        load = f"{e['load_seconds']:.2f}" if i == 0 else ""
        share = r.get("bandwidth_share")
        print(f"{e['model'] if i == 0 else '':<22} {load:>7} {r['depth']:>6} {r['prefill_tokens_per_s']:>14.0f} "
              f"{r['decode_tokens_per_s']:>13.1f} {r['decode_ms_per_token']:>7.2f} {r['achieved_gb_per_s']:>7.0f} "
              f"{(100 * share if share else 0):>5.1f}")
    by_tc = e.get("concurrency_by_variant") or {"": e.get("concurrency") or []}
    for tc, rows in by_tc.items():
        for c in rows or []:
            label = f"  N={c['concurrency']}" + (f" {tc}" if tc else "")
            print(f"{label:<22} {'':>7} {0:>6} {'':>14} {c['aggregate_decode_tokens_per_s']:>13.1f} "
                  f"TPOT p50 {c.get('tpot_ms_p50', 0):.2f} p99 {c.get('tpot_ms_p99', 0):.2f} ms, "
                  f"ITL p99 {c['itl_ms_p99']:.2f} ms, TTFT p50 {c['ttft_ms_p50']:.0f} ms")
    for key, label in (("int8_all_depth0", "  int8 everywhere"), ("float_depth0", "  float only")):
        r = e.get(key)
        if r:
            share = r.get("bandwidth_share")
            print(f"{label:<22} {'':>7} {0:>6} {'':>14} {r['decode_tokens_per_s']:>13.1f} "
                  f"{r['decode_ms_per_token']:>7.2f} {r['achieved_gb_per_s']:>7.0f} {(100 * share if share else 0):>5.1f}")
EOF
  fi
} | tee "$OUT/summary.txt"
exit $RC
