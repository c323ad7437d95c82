#!/usr/bin/env bash
# Bring up a local stack in one command: N backends and bitnet-gateway on 127.0.0.1:8090.
#
#   deploy/quickstart.sh                                   # llama-sim backends with BitNet timing
#   LLAMA_SERVER=/path/llama-server MODEL=/path/model.gguf deploy/quickstart.sh   # real ones
#
# Environment: INSTANCES (default 2), THREADS (default 8, real backends only),
# LISTEN (default 127.0.0.1:8090). Ctrl-C stops everything and leaves no process behind.
set -euo pipefail
cd "$(dirname "$0")/.."

INSTANCES="${INSTANCES:-2}"
THREADS="${THREADS:-8}"
LISTEN="${LISTEN:-127.0.0.1:8090}"

cargo build --release --quiet -p gateway -p loadtest

work="$(mktemp -d)"
pids=()
cleanup() {
  trap - EXIT INT TERM
  if [ "${#pids[@]}" -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Wait for a "listening on http://HOST:PORT" line in a log and print the URL.
url_from_log() {
  local log="$1" pid="$2"
  for _ in $(seq 1 600); do
    if url="$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$log" | head -n 1)" && [ -n "$url" ]; then
      echo "${url#listening on }"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "backend exited during start-up:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "backend did not report its address in time:" >&2
  cat "$log" >&2
  return 1
}

backend_args=()
for i in $(seq 1 "$INSTANCES"); do
  log="$work/backend-$i.log"
  if [ -n "${LLAMA_SERVER:-}" ] && [ -n "${MODEL:-}" ]; then
    "$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port 0 -t "$THREADS" -c 4096 -ngl 0 --no-perf --metrics >"$log" 2>&1 &
    kind="llama-server"
  else
    target/release/llama-sim --port 0 --dialect bitnet --alias falcon3-10b >"$log" 2>&1 &
    kind="llama-sim (BitNet timing)"
  fi
  pids+=("$!")
  url="$(url_from_log "$log" "$!")"
  echo "backend $i: $kind at $url"
  backend_args+=(--backend "$url")
done

target/release/bitnet-gateway --listen "$LISTEN" --model falcon3-10b --alias bitnet "${backend_args[@]}" &
pids+=("$!")
echo "gateway: http://$LISTEN (Ctrl-C stops everything)"
wait "${pids[@]}"
