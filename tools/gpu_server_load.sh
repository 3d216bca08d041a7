#!/usr/bin/env bash
# The OpenAI server on a GPU under N concurrent streaming clients, in one command.
#
#   tools/gpu_server_load.sh [PRESET:QUANT] [CONCURRENCY]   (default llama3-8b:Q4_K_M 1,8,32)
#
# Writes the synthetic model (its minimal byte-level tokenizer makes ~6
# tokens of each prompt word), serves it with `helexa-native serve` on
# cuda with room for 64 sequences, waits for /health to report it ready,
# runs tools/load_test.py (streaming completions, ~512-token prompts, 128
# tokens each, EOS ignored), prints the server's /metrics batch histogram and
# stops the server. Logs and JSON go to $OUT (default /tmp/helexa-server-load).
# The server runs on waitress, which the GPU image lacks: stage its wheel next
# to gguf's and flask's (pip download --no-deps -d .device/wheels waitress).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SPEC=${1:-llama3-8b:Q4_K_M}
LEVELS=${2:-1,8,32}
OUT=${OUT:-/tmp/helexa-server-load}
PORT=${PORT:-8377}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d /tmp/hx-serve-XXXX)
trap 'kill $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT

MODEL=$(python3 -c "from pathlib import Path; from helexa_native.bench import write_synthetic; print(write_synthetic('$SPEC', Path('$WORK'), progress=False))") || exit 1
python3 -m helexa_native serve --model "$MODEL" --device cuda --n-ctx 1024 --max-num-seqs 64 \
  --port "$PORT" --no-progress >"$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 240); do
  python3 - "$PORT" <<'PY' && break
import json, sys, urllib.request
try:
    h = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2))
except Exception:
    sys.exit(1)
sys.exit(0 if h.get("status") == "ok" else 1)
PY
  kill -0 $SERVER 2>/dev/null || { echo "server exited:"; tail -20 "$OUT/server.log"; exit 1; }
  sleep 1
done
echo "== $SPEC served; load test N=$LEVELS"
python3 tools/load_test.py --base-url "http://127.0.0.1:$PORT/v1" --concurrency "$LEVELS" \
  --prompt-tokens 170 --max-tokens 128 --json "$OUT/load.json"
RC=$?
python3 - "$PORT" <<'PY'
import json, sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print("\n".join(l for l in text.splitlines() if "batch" in l and not l.startswith("#"))[:2000])
PY
exit $RC
