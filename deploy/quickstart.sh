#!/usr/bin/env bash
# Bring up the whole stack in one command: bitnet-runner supervising the backends, and
# bitnet-gateway on 127.0.0.1:8090 following the runner's instance list.
#
#   deploy/quickstart.sh                      # llama-sim backends with BitNet timing
#   LLAMA_SERVER=/path/to/llama-server MODEL=/path/to/model.gguf deploy/quickstart.sh
#
# Environment (all optional):
#   LLAMA_SERVER, MODEL  a llama-server binary and a GGUF model: real backends instead of
#                        llama-sim (only when both are set)
#   INSTANCES            number of backends (default 2)
#   THREADS              -t of each real backend (default: the cores divided among them)
#   CTX                  -c of each backend (default 4096)
#   SIM_ARGS             extra llama-sim arguments, e.g. "--time-scale 0.1" to run 10x faster
#   LISTEN               gateway address (default 127.0.0.1:8090; port 0 picks one)
#   RUNNER_CONTROL       runner control API address (default 127.0.0.1:8099; port 0 picks one)
#   PROFILE              cargo profile to build and run: release (default) or dev
#   BIN_DIR              run the binaries already in this directory instead of building
#   LOG_DIR              where the logs go (default target/quickstart)
#
# Ctrl-C stops everything and leaves no process behind: the gateway drains, the runner stops
# its instances, and the instances die with the runner even if it is killed.
set -euo pipefail
cd "$(dirname "$0")/.."

INSTANCES="${INSTANCES:-2}"
CTX="${CTX:-4096}"
LISTEN="${LISTEN:-127.0.0.1:8090}"
RUNNER_CONTROL="${RUNNER_CONTROL:-127.0.0.1:8099}"
PROFILE="${PROFILE:-release}"
MODEL_ID="falcon3-10b"

die() {
  echo "quickstart: $*" >&2
  exit 1
}

real_backends=""
if [ -n "${LLAMA_SERVER:-}" ] && [ -n "${MODEL:-}" ]; then
  real_backends=1
elif [ -n "${LLAMA_SERVER:-}${MODEL:-}" ]; then
  echo "quickstart: only one of LLAMA_SERVER and MODEL is set; using llama-sim backends" >&2
fi

if [ -n "${BIN_DIR:-}" ]; then
  bin_dir="$BIN_DIR"
else
  # cargo puts its output under CARGO_TARGET_DIR when that is set.
  target_dir="${CARGO_TARGET_DIR:-target}"
  case "$PROFILE" in
    release) bin_dir="$target_dir/release" ;;
    dev | debug) bin_dir="$target_dir/debug" PROFILE=dev ;;
    *) die "PROFILE must be release or dev, not '$PROFILE'" ;;
  esac
  echo "== building bitnet-gateway, bitnet-runner and llama-sim ($PROFILE; the first build takes a few minutes)"
  cargo build --profile "$PROFILE" -p gateway -p backend-runner -p loadtest --bins
fi
for bin in bitnet-gateway bitnet-runner llama-sim; do
  [ -x "$bin_dir/$bin" ] || die "$bin_dir/$bin not found"
done

logs="${LOG_DIR:-target/quickstart}"
mkdir -p "$logs"
runner_log="$logs/runner.log"
gateway_log="$logs/gateway.log"

if [ -n "$real_backends" ]; then
  backend_bin="$LLAMA_SERVER"
  model="$MODEL"
  cores="$(nproc 2>/dev/null || echo 1)"
  threads="${THREADS:-$((cores / INSTANCES > 0 ? cores / INSTANCES : 1))}"
  backend_args=()
  kind="llama-server ($backend_bin)"
else
  backend_bin="$bin_dir/llama-sim"
  # llama-sim never reads the model; the runner only checks that the file exists.
  model="$logs/$MODEL_ID-sim.gguf"
  : >"$model"
  threads="${THREADS:-8}"
  # The older BitNet server's behaviour, at 60 tokens/s of prompt and 18 tokens/s of output.
  # SIM_ARGS is split into words on purpose.
  # shellcheck disable=SC2206
  backend_args=(-- --dialect bitnet ${SIM_ARGS:-})
  kind="llama-sim (BitNet dialect and timing)"
fi

runner_pid=""
gateway_pid=""

# Stop a process gracefully, then for good after $2 seconds.
# shellcheck disable=SC2317 # reached through the EXIT trap
stop() {
  local pid="$1" grace="$2"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 $((grace * 10))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  # The runner's instances die with it (parent-death signal), so SIGKILL leaves no orphan.
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  echo "== stopping"
  # Gateway first, so that nothing new reaches backends that are about to stop.
  stop "$gateway_pid" 35
  stop "$runner_pid" 25
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'exit 129' HUP

# The runner and the gateway run in sessions of their own (setsid), so that a Ctrl-C at the
# terminal reaches only this script. cleanup() then stops them once each, in order: a
# signal from the terminal as well would be their second, which means "stop now" to both.
echo "== starting bitnet-runner: $INSTANCES x $kind (log: $runner_log)"
setsid "$bin_dir/bitnet-runner" \
  --llama-server "$backend_bin" --model "$model" \
  --instances "$INSTANCES" --threads "$threads" --ctx "$CTX" \
  --base-port 0 --control "$RUNNER_CONTROL" \
  "${backend_args[@]}" >"$runner_log" 2>&1 &
runner_pid=$!

# The runner prints its control URL once the API is up; instances then start in the background.
control=""
for _ in $(seq 1 300); do
  control="$(grep -o 'control API listening on http://[^ ]*' "$runner_log" | head -n 1 | sed 's/.* on //')" || true
  [ -n "$control" ] && break
  kill -0 "$runner_pid" 2>/dev/null || { cat "$runner_log" >&2; die "bitnet-runner exited during start-up"; }
  sleep 0.1
done
[ -n "$control" ] || { cat "$runner_log" >&2; die "bitnet-runner did not start its control API"; }

# Real models can take minutes to load; the runner's own startup timeout bounds this wait.
echo "== waiting for $INSTANCES instances to be ready ($control/instances)"
while :; do
  ready="$(curl -fsS "$control/instances" 2>/dev/null | grep -o '"state":"ready"' | wc -l)" || ready=0
  [ "$ready" -ge "$INSTANCES" ] && break
  kill -0 "$runner_pid" 2>/dev/null || { tail -n 40 "$runner_log" >&2; die "bitnet-runner exited before its instances were ready"; }
  sleep 0.2
done

echo "== starting bitnet-gateway on $LISTEN (log: $gateway_log)"
setsid "$bin_dir/bitnet-gateway" --listen "$LISTEN" --model "$MODEL_ID" --alias bitnet \
  --policy predicted-ttft --runner "$control" >"$gateway_log" 2>&1 &
gateway_pid=$!

# The gateway prints its bound address (LISTEN may ask for port 0); /health then answers 200
# once a backend can take work.
gateway=""
for _ in $(seq 1 300); do
  gateway="$(grep -o 'bitnet-gateway listening on http://[^ ]*' "$gateway_log" | head -n 1 | sed 's/.* on http:\/\///')" || true
  [ -n "$gateway" ] && curl -fsS "http://$gateway/health" >/dev/null 2>&1 && break
  kill -0 "$gateway_pid" 2>/dev/null || { cat "$gateway_log" >&2; die "bitnet-gateway exited during start-up"; }
  sleep 0.1
done
if [ -z "$gateway" ] || ! curl -fsS "http://$gateway/health" >/dev/null 2>&1; then
  cat "$gateway_log" >&2
  die "bitnet-gateway found no ready backend"
fi

cat <<EOF
== ready: gateway http://$gateway, runner $control ($INSTANCES x $kind)

  curl -s http://$gateway/v1/chat/completions -H "Content-Type: application/json" -d '{"model":"$MODEL_ID","messages":[{"role":"user","content":"What is 2+2?"}],"max_tokens":64}'
  curl -s http://$gateway/health
  curl -s $control/instances

Ctrl-C stops everything.
EOF

# Run until Ctrl-C, or until either process ends on its own (then stop the other).
set +e
wait -n "$runner_pid" "$gateway_pid"
status=$?
set -e
if kill -0 "$runner_pid" 2>/dev/null; then
  echo "quickstart: bitnet-gateway exited (status $status); see $gateway_log" >&2
else
  echo "quickstart: bitnet-runner exited (status $status); see $runner_log" >&2
fi
exit 1
