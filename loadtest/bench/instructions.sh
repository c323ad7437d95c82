#!/usr/bin/env bash
# How much work does the gateway do per request, counted rather than timed?
#
# The throughput and latency figures of proxy-overhead.sh move with the machine by tens of
# percent from run to run. This benchmark counts instead: the gateway (one serving thread)
# and hyper-relay (hyper's server and client with nothing between them) each run under
# valgrind's callgrind in front of a zero-latency llama-sim, and the instructions each
# executes for a fixed number of requests are counted, after a warm-up that fills the
# connection pools. Instruction counts do not depend on how busy the machine is, so a change
# of a few hundred instructions per request shows, and the difference between the two is
# the gateway's own work (routing, admission, accounting, metrics, the access log). A
# breakdown names the gateway's largest parts. Then each proxy runs again, natively, under
# `strace -c` for the same number of requests: the system calls per request, the kernel's
# share of the work, which callgrind does not see.
#
# Usage: loadtest/bench/instructions.sh
# Knobs (environment): REQUESTS counted per run (2000), WARMUP requests before counting
# (200), CONCURRENCY (8), REPEATS (3), MODES ("plain stream"), STRACE (1; 0 leaves the
# system-call count out). Needs valgrind (with callgrind_control), jq and, for the system
# calls, strace.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REQUESTS=${REQUESTS:-2000}
WARMUP=${WARMUP:-200}
CONCURRENCY=${CONCURRENCY:-8}
REPEATS=${REPEATS:-3}
read -r -a MODES <<<"${MODES:-plain stream}"
STRACE=${STRACE:-1}
PROXIES=(gateway hyper-relay)
MODEL=bench
SLOTS=1024

for tool in valgrind callgrind_control; do
    command -v "$tool" >/dev/null || {
        echo "$tool is not installed (Debian: apt-get install valgrind)" >&2
        exit 1
    }
done
if [ "$STRACE" = 1 ] && ! command -v strace >/dev/null; then
    echo "strace is not installed (Debian: apt-get install strace), or set STRACE=0" >&2
    exit 1
fi

ensure_binaries
log "building hyper-relay"
(cd "$BENCH_DIR/hyper-relay" && CARGO_TARGET_DIR="$ROOT/target" cargo build --release --locked -q)
cp "$ROOT/target/release/hyper-relay" "$WORK/bin/hyper-relay"

LOAD_BEFORE=$(load_average)
STARTED=$(date +%s)

start_server sim "$BIN/llama-sim" --port 0 --zero-latency --alias "$MODEL" --slots "$SLOTS"
SIM_URL=$SERVER_URL
wait_ready "$SIM_URL/health"

# proxy_command PROXY : the command line that serves PROXY in front of the simulator.
proxy_command() {
    case $1 in
    gateway) echo "$BIN/bitnet-gateway --listen 127.0.0.1:0 --workers 1 --model $MODEL --backend $SIM_URL#slots=$SLOTS" ;;
    hyper-relay) echo "$BIN/hyper-relay ${SIM_URL#http://}" ;;
    esac
}

# load URL MODE COUNT OUT : COUNT requests at CONCURRENCY; fails unless every one got a 200.
load() {
    local url=$1 mode=$2 count=$3 out=$4 stream=()
    [ "$mode" = stream ] && stream=(--stream)
    "$BIN/bitnet-loadtest" --url "$url" --model "$MODEL" --concurrency "$CONCURRENCY" \
        --requests "$count" "${stream[@]}" --json "$out" -q >"$out.txt" 2>"$out.err" || {
        cat "$out.err" >&2
        return 1
    }
    local ok
    ok=$(jq '.summary.succeeded' "$out")
    [ "$ok" = "$count" ] || {
        echo "only $ok of $count requests got a 200 through $url" >&2
        return 1
    }
}

RAW="$WORK/raw.tsv"
printf 'repeat\tmode\tproxy\tinstructions\n' >"$RAW"
for repeat in $(seq 1 "$REPEATS"); do
    for mode in "${MODES[@]}"; do
        for proxy in "${PROXIES[@]}"; do
            out="$WORK/cg.$repeat.$mode.$proxy"
            # shellcheck disable=SC2046 # the command line is split on purpose
            start_server "$proxy-cg" valgrind --tool=callgrind --callgrind-out-file="$out" \
                $(proxy_command "$proxy")
            pid=$SERVER_PID
            url=$SERVER_URL
            load "$url" "$mode" "$WARMUP" "$WORK/warm.json"
            callgrind_control -z "$pid" >/dev/null
            load "$url" "$mode" "$REQUESTS" "$WORK/run.json"
            callgrind_control -d "$pid" >/dev/null
            tries=0
            until [ -s "$out.1" ] && grep -q '^totals:\|^summary:' "$out.1"; do
                tries=$((tries + 1))
                [ "$tries" -lt 100 ] || { echo "callgrind wrote no dump for $proxy" >&2; exit 1; }
                sleep 0.1
            done
            stop_server "$pid"
            total=$(sed -n 's/^summary: //p; s/^totals: //p' "$out.1" | head -1)
            printf '%s\t%s\t%s\t%s\n' "$repeat" "$mode" "$proxy" "$total" >>"$RAW"
            log "repeat $repeat, $mode, $proxy: $((total / REQUESTS)) instructions per request"
        done
    done
done

SYSCALLS="$WORK/syscalls.tsv"
printf 'mode\tproxy\tsyscall\tcalls\n' >"$SYSCALLS"
if [ "$STRACE" = 1 ]; then
    for mode in "${MODES[@]}"; do
        for proxy in "${PROXIES[@]}"; do
            # shellcheck disable=SC2046 # the command line is split on purpose
            start_server "$proxy-native" $(proxy_command "$proxy")
            pid=$SERVER_PID
            url=$SERVER_URL
            load "$url" "$mode" "$WARMUP" "$WORK/warm.json"
            strace -c -f -p "$pid" -o "$WORK/strace.$mode.$proxy" 2>/dev/null &
            tracer=$!
            CHILD_PIDS+=("$tracer")
            # strace attaches to each thread in turn; give it time before counting starts.
            sleep 1
            load "$url" "$mode" "$REQUESTS" "$WORK/run.json"
            kill -INT "$tracer"
            wait "$tracer" 2>/dev/null || true
            stop_server "$pid"
            awk -v m="$mode" -v p="$proxy" \
                '$NF ~ /^[a-z_0-9]+$/ && $NF != "total" && $4 ~ /^[0-9]+$/ { print m "\t" p "\t" $NF "\t" $4 }' \
                "$WORK/strace.$mode.$proxy" >>"$SYSCALLS"
        done
    done
fi
ELAPSED=$(($(date +%s) - STARTED))
LOAD_AFTER=$(load_average)

SECTION="$WORK/section.md"
{
    echo "## Instructions per request: the gateway against a bare hyper relay"
    echo
    machine_markdown
    echo "- Load average before / after: $LOAD_BEFORE / $LOAD_AFTER. Instruction counts do not depend on it. Wall time ${ELAPSED} s."
    echo "- $(valgrind --version) (callgrind): user-space instructions of every thread of the proxy, from after $WARMUP warm-up requests to the end of $REQUESTS requests at concurrency $CONCURRENCY, to a zero-latency llama-sim; the gateway with one serving thread."
    echo
    echo "Command:"
    echo
    echo '```sh'
    echo "REQUESTS=$REQUESTS WARMUP=$WARMUP CONCURRENCY=$CONCURRENCY REPEATS=$REPEATS MODES=\"${MODES[*]}\" STRACE=$STRACE loadtest/bench/instructions.sh"
    echo '```'
    echo
    python3 - "$RAW" "$SYSCALLS" "$REQUESTS" "$WORK" <<'PY'
import csv
import re
import statistics
import sys
from collections import defaultdict

raw, syscalls, requests, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
per = defaultdict(list)
for r in csv.DictReader(open(raw), delimiter="\t"):
    per[(r["mode"], r["proxy"])].append(int(r["instructions"]) / requests)
modes = list(dict.fromkeys(m for m, _ in per))

print(f"Instructions per request, median of {len(next(iter(per.values())))} repeats (each repeat's figure in brackets):")
print()
print("| mode | gateway | hyper-relay | gateway ÷ hyper-relay | the gateway's own work (difference) |")
print("|---|---:|---:|---:|---:|")
for mode in modes:
    g, h = per[(mode, "gateway")], per[(mode, "hyper-relay")]
    gm, hm = statistics.median(g), statistics.median(h)
    each = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)
    name = "non-streamed" if mode == "plain" else "streamed"
    print(f"| {name} | {gm:,.0f} ({each(g)}) | {hm:,.0f} ({each(h)}) | {gm / hm:.2f} | {gm - hm:,.0f} |")
print()

# The gateway's largest parts, from the first repeat's dump. A function's cost is its own
# instructions plus those of the calls it makes, summed over every place it was compiled
# into; the dump names each function once in full and later by number.
def inclusive(path):
    names, cost, fn = {}, defaultdict(int), None

    def name(rest):
        m = re.match(r"\((\d+)\)(?: (.*))?$", rest)
        if not m:
            return rest
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), rest)

    for line in open(path, encoding="utf-8", errors="replace"):
        if line.startswith("fn="):
            fn = name(line[3:].rstrip("\n"))
        elif line.startswith("cfn="):
            name(line[4:].rstrip("\n"))
        elif fn is not None and line[:1] and (line[0].isdigit() or line[0] in "+-*"):
            # A cost line: a position, then the Ir count. After `calls=` it is the
            # inclusive cost of that call, which belongs to the caller.
            cost[fn] += int(line.split()[-1])
    return cost


parts = [
    ("token accounting while relaying (`sse::Scanner::feed`)", "gateway::sse::Scanner::feed"),
    ("token accounting at the end (`sse::Scanner::finish`)", "gateway::sse::Scanner::finish"),
    ("the backend client, the gateway's own (hyper-relay uses hyper's): request out, response head in", "gateway::forward::client::UpstreamClient::request::{{closure}}"),
    ("reading the request body for `model` and `stream` (`inspect`)", "gateway::inspect::inspect"),
    ("the access-log line", "gateway::logging::Access::log"),
    ("the request id", "gateway::routes::request_id"),
    ("admission and the routing pick (`ModelPool::try_claim`)", "gateway::pool::ModelPool::try_claim"),
]
for mode in modes:
    dump = f"{work}/cg.1.{mode}.gateway.1"
    try:
        cost = inclusive(dump)
    except OSError:
        continue
    name = "non-streamed" if mode == "plain" else "streamed"
    print(f"The gateway's largest parts, {name}, instructions per request (first repeat; each part with what it calls):")
    print()
    print("| part | instructions per request |")
    print("|---|---:|")
    for label, fn in parts:
        print(f"| {label} | {cost.get(fn, 0) / requests:,.0f} |")
    print()

calls = defaultdict(lambda: defaultdict(int))
for r in csv.DictReader(open(syscalls), delimiter="\t"):
    calls[(r["mode"], r["proxy"])][r["syscall"]] += int(r["calls"])
if calls:
    print(f"System calls per request, from `strace -c -f` over {requests} requests (one run, natively); calls under 0.05 per request are left out:")
    print()
    print("| mode | proxy | per request | of which |")
    print("|---|---|---:|---|")
    for (mode, proxy), by in calls.items():
        total = sum(by.values()) / requests
        named = ", ".join(
            f"{name} {n / requests:.2f}" for name, n in sorted(by.items(), key=lambda kv: -kv[1]) if n / requests >= 0.05
        )
        name = "non-streamed" if mode == "plain" else "streamed"
        print(f"| {name} | {proxy} | {total:.2f} | {named} |")
    print()
PY
} >"$SECTION"

write_section instructions "$SECTION"
cat "$SECTION"
