#!/usr/bin/env bash
# How much work does the gateway do per request, counted rather than timed?
#
# The throughput and latency figures of proxy-overhead.sh move with the machine by tens of
# percent from run to run. This benchmark counts instead. The gateway (one serving thread),
# hyper-relay (hyper's server and client with nothing between them), byte-relay (a relay on
# tokio alone that copies the backend's bytes to the client) and nginx (configured as
# proxy-overhead.sh does, with one worker) each run under valgrind's callgrind in front of a
# zero-latency llama-sim, and the instructions each executes for a fixed number of requests
# are counted, after a warm-up that fills the connection pools. Instruction counts do not
# depend on how busy the machine is, so a change of a few hundred per request shows. The
# gateway, like byte-relay, serves HTTP/1 on tokio without hyper, so its count less
# byte-relay's is what it does beyond copying bytes (parsing and framing HTTP, routing,
# admission, accounting, metrics, the access log), and a breakdown names its largest parts. Then each
# proxy runs again, natively, under `strace -c` for the same number of requests: the system
# calls per request, the kernel's share of the work, which callgrind does not see.
#
# The third mode, `paced`, asks a second llama-sim that generates 20 tokens a second, as in
# fanout.sh, so that each token reaches the proxy on a read of its own: the cost of relaying
# one token, which the zero-latency streams (their tokens arriving together) do not show.
#
# Usage: loadtest/bench/instructions.sh
# Knobs (environment): REQUESTS counted per run (2000), WARMUP requests before counting
# (200), CONCURRENCY (8), REPEATS (3), MODES ("plain stream paced"), STRACE (1; 0 leaves
# the system-call count out), NGINX (1; 0 leaves nginx out); for `paced`: PACED_STREAMS in
# flight (20), PACED_TOKENS per stream (20), PACED_REQUESTS counted (100) and PACED_WARMUP
# (20). Needs valgrind (with callgrind_control), jq, nginx unless NGINX=0, and strace unless
# STRACE=0.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REQUESTS=${REQUESTS:-2000}
WARMUP=${WARMUP:-200}
CONCURRENCY=${CONCURRENCY:-8}
REPEATS=${REPEATS:-3}
read -r -a MODES <<<"${MODES:-plain stream paced}"
PACED_STREAMS=${PACED_STREAMS:-20}
PACED_TOKENS=${PACED_TOKENS:-20}
PACED_REQUESTS=${PACED_REQUESTS:-100}
PACED_WARMUP=${PACED_WARMUP:-20}
# Tokens a second per stream in the `paced` mode: the fan-out benchmark's rate.
PACED_RATE=20
for mode in "${MODES[@]}"; do
    case $mode in
        plain | stream | paced) ;;
        *)
            echo "unknown mode '$mode' in MODES (plain, stream, paced)" >&2
            exit 1
            ;;
    esac
done
STRACE=${STRACE:-1}
PROXIES=(gateway hyper-relay byte-relay)
if [ "${NGINX:-1}" = 1 ]; then
    require_nginx
    PROXIES+=(nginx)
fi
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
build_relays

LOAD_BEFORE=$(load_average)
STARTED=$(date +%s)

start_server sim "$BIN/llama-sim" --port 0 --zero-latency --alias "$MODEL" --slots "$SLOTS"
SIM_URL=$SERVER_URL
wait_ready "$SIM_URL/health"
PACED_SIM_URL=""
if [[ " ${MODES[*]} " == *" paced "* ]]; then
    # Prompt evaluation near instant, so that only the pace of the tokens differs.
    start_server sim-paced "$BIN/llama-sim" --port 0 --alias "$MODEL" --slots "$SLOTS" \
        --decode-rate "$PACED_RATE" --prefill-rate 1000000
    PACED_SIM_URL=$SERVER_URL
    wait_ready "$PACED_SIM_URL/health"
fi

# The simulator, the requests counted and the warm-up of a mode.
upstream_of() { if [ "$1" = paced ]; then echo "$PACED_SIM_URL"; else echo "$SIM_URL"; fi; }
requests_of() { if [ "$1" = paced ]; then echo "$PACED_REQUESTS"; else echo "$REQUESTS"; fi; }
warmup_of() { if [ "$1" = paced ]; then echo "$PACED_WARMUP"; else echo "$WARMUP"; fi; }

# start_proxy PROXY NAME UPSTREAM WRAPPER... : starts PROXY in front of the simulator at
# UPSTREAM under WRAPPER (a command prefix) and sets PROXY_PID, PROXY_URL and WORKER_PID (the
# process that proxies; nginx runs with one worker).
start_proxy() {
    local proxy=$1 name=$2 upstream=$3
    shift 3
    case $proxy in
    gateway)
        start_server "$name" "$@" "$BIN/bitnet-gateway" --listen 127.0.0.1:0 --workers 1 \
            --model "$MODEL" --backend "$upstream#slots=$SLOTS"
        ;;
    hyper-relay | byte-relay) start_server "$name" "$@" "$BIN/$proxy" "${upstream#http://}" ;;
    nginx)
        start_nginx "$name" "${upstream#http://}" 64 "$@"
        SERVER_PID=$NGINX_PID
        SERVER_URL=$NGINX_URL
        ;;
    esac
    PROXY_PID=$SERVER_PID
    PROXY_URL=$SERVER_URL
    # nginx's one worker, forked by its master, does the proxying: that is the process to
    # count. (Forked under valgrind, it is counted into a file of its own pid.)
    WORKER_PID=$PROXY_PID
    if [ "$proxy" = nginx ]; then
        WORKER_PID=$(pgrep -P "$PROXY_PID" | head -1)
        [ -n "$WORKER_PID" ] || { echo "nginx started no worker" >&2; return 1; }
    fi
}

# load URL MODE COUNT OUT : COUNT requests at CONCURRENCY; fails unless every one got a 200.
load() {
    local url=$1 mode=$2 count=$3 out=$4 args=(--concurrency "$CONCURRENCY")
    case $mode in
        stream) args+=(--stream) ;;
        paced) args=(--concurrency "$PACED_STREAMS" --stream --max-tokens "$PACED_TOKENS") ;;
    esac
    "$BIN/bitnet-loadtest" --url "$url" --model "$MODEL" --requests "$count" "${args[@]}" \
        --json "$out" -q >"$out.txt" 2>"$out.err" || {
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

# wait_for_totals FILE : waits until callgrind has written FILE whole, then prints its total.
wait_for_totals() {
    local file=$1 tries=0
    until [ -s "$file" ] && grep -q '^totals:\|^summary:' "$file"; do
        tries=$((tries + 1))
        [ "$tries" -lt 100 ] || { echo "callgrind wrote no totals to $file" >&2; return 1; }
        sleep 0.1
    done
    sed -n 's/^summary: //p; s/^totals: //p' "$file" | head -1
}

# counted PROXY REPEAT MODE COUNT : starts PROXY under callgrind, sends the warm-up, then
# COUNT requests, and sets COUNTED to the instructions its worker executed for those COUNT.
# It sets a variable rather than printing, so that it runs in this shell: a server started
# in a command substitution's subshell would be unknown to the cleanup trap.
counted() {
    local proxy=$1 repeat=$2 mode=$3 count=$4
    local out="$WORK/cg.$repeat.$mode.$proxy.$count"
    start_proxy "$proxy" "$proxy-cg-$repeat-$mode-$count" "$(upstream_of "$mode")" \
        valgrind --tool=callgrind --callgrind-out-file="$out.%p"
    load "$PROXY_URL" "$mode" "$(warmup_of "$mode")" "$WORK/warm.json"
    if [ "$proxy" = nginx ]; then
        # callgrind_control cannot reach a process forked under valgrind, so nginx's worker
        # is counted whole, from its start to its exit; the caller subtracts a run with no
        # counted requests.
        [ "$count" = 0 ] || load "$PROXY_URL" "$mode" "$count" "$WORK/run.json"
        stop_server "$PROXY_PID"
        COUNTED=$(wait_for_totals "$out.$WORKER_PID")
        return
    fi
    callgrind_control -z "$WORKER_PID" >/dev/null 2>&1
    load "$PROXY_URL" "$mode" "$count" "$WORK/run.json"
    callgrind_control -d "$WORKER_PID" >/dev/null 2>&1
    COUNTED=$(wait_for_totals "$out.$WORKER_PID.1")
    stop_server "$PROXY_PID"
    if [ "$proxy" = gateway ]; then
        cp "$out.$WORKER_PID.1" "$WORK/gateway.$repeat.$mode.dump"
    fi
}

RAW="$WORK/raw.tsv"
printf 'repeat\tmode\tproxy\tinstructions\trequests\n' >"$RAW"
for repeat in $(seq 1 "$REPEATS"); do
    for mode in "${MODES[@]}"; do
        count=$(requests_of "$mode")
        for proxy in "${PROXIES[@]}"; do
            counted "$proxy" "$repeat" "$mode" "$count"
            total=$COUNTED
            if [ "$proxy" = nginx ]; then
                counted "$proxy" "$repeat" "$mode" 0
                total=$((total - COUNTED))
            fi
            printf '%s\t%s\t%s\t%s\t%s\n' "$repeat" "$mode" "$proxy" "$total" "$count" >>"$RAW"
            log "repeat $repeat, $mode, $proxy: $((total / count)) instructions per request"
        done
    done
done

SYSCALLS="$WORK/syscalls.tsv"
printf 'mode\tproxy\tsyscall\tcalls\trequests\n' >"$SYSCALLS"
if [ "$STRACE" = 1 ]; then
    for mode in "${MODES[@]}"; do
        for proxy in "${PROXIES[@]}"; do
            # `env` as the wrapper only gives nginx one worker, as under valgrind.
            start_proxy "$proxy" "$proxy-native-$mode" "$(upstream_of "$mode")" env
            pid=$PROXY_PID
            url=$PROXY_URL
            count=$(requests_of "$mode")
            load "$url" "$mode" "$(warmup_of "$mode")" "$WORK/warm.json"
            strace -c -f -p "$WORKER_PID" -o "$WORK/strace.$mode.$proxy" 2>/dev/null &
            tracer=$!
            CHILD_PIDS+=("$tracer")
            # strace attaches to each thread in turn; give it time before counting starts.
            sleep 1
            load "$url" "$mode" "$count" "$WORK/run.json"
            kill -INT "$tracer"
            wait "$tracer" 2>/dev/null || true
            stop_server "$pid"
            awk -v m="$mode" -v p="$proxy" -v n="$count" \
                '$NF ~ /^[a-z_0-9]+$/ && $NF != "total" && $4 ~ /^[0-9]+$/ { print m "\t" p "\t" $NF "\t" $4 "\t" n }' \
                "$WORK/strace.$mode.$proxy" >>"$SYSCALLS"
        done
    done
fi
ELAPSED=$(($(date +%s) - STARTED))
LOAD_AFTER=$(load_average)

SECTION="$WORK/section.md"
{
    echo "## Instructions per request: the gateway against bare relays (hyper, and tokio alone) and nginx"
    echo
    machine_markdown
    echo "- Load average before / after: $LOAD_BEFORE / $LOAD_AFTER. Instruction counts do not depend on it. Wall time ${ELAPSED} s."
    echo "- $(valgrind --version) (callgrind): user-space instructions of every thread of the proxy, from after $WARMUP warm-up requests to the end of $REQUESTS requests at concurrency $CONCURRENCY, to a zero-latency llama-sim; the gateway with one serving thread."
    echo "- hyper-relay is hyper's server and client with nothing between them; byte-relay is tokio alone, one task per client connection, copying each read from the backend to the client unchanged (loadtest/bench/hyper-relay)."
    if [ -n "$PACED_SIM_URL" ]; then
        echo "- *paced*: $PACED_REQUESTS streams of $PACED_TOKENS tokens (after $PACED_WARMUP), $PACED_STREAMS at a time, from a llama-sim that generates $PACED_RATE tokens a second per stream, so that each token reaches the proxy on a read of its own, as in the fan-out benchmark."
    fi
    if [ "${NGINX:-1}" = 1 ]; then
        echo "- nginx $(nginx -v 2>&1 | sed 's/^nginx version: nginx\///') as proxy-overhead.sh configures it (upstream \`keepalive 64\`, \`proxy_buffering off\`, access log on) but with one worker process, whose work is counted: from its start to its exit, less the same count for a run with the warm-up only, since callgrind_control cannot reach a process forked under valgrind."
    fi
    echo
    echo "Command:"
    echo
    echo '```sh'
    paced=""
    [ -n "$PACED_SIM_URL" ] && paced=" PACED_STREAMS=$PACED_STREAMS PACED_TOKENS=$PACED_TOKENS PACED_REQUESTS=$PACED_REQUESTS PACED_WARMUP=$PACED_WARMUP"
    echo "REQUESTS=$REQUESTS WARMUP=$WARMUP CONCURRENCY=$CONCURRENCY REPEATS=$REPEATS MODES=\"${MODES[*]}\"$paced STRACE=$STRACE NGINX=${NGINX:-1} loadtest/bench/instructions.sh"
    echo '```'
    echo
    python3 - "$RAW" "$SYSCALLS" "$WORK" "$PACED_TOKENS" <<'PY'
import csv
import re
import statistics
import sys
from collections import defaultdict

raw, syscalls, work, paced_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
per = defaultdict(list)
# Requests counted per run, by mode.
counted = {}
for r in csv.DictReader(open(raw), delimiter="\t"):
    per[(r["mode"], r["proxy"])].append(int(r["instructions"]) / int(r["requests"]))
    counted[r["mode"]] = int(r["requests"])
modes = list(dict.fromkeys(m for m, _ in per))
NAMES = {"plain": "non-streamed", "stream": "streamed", "paced": "paced stream"}

proxies = list(dict.fromkeys(p for _, p in per))
repeats = len(next(iter(per.values())))
print(f"Instructions per request, median of {repeats} repeats (each repeat's figure in brackets):")
print()
head = " | ".join(proxies)
ratios = [p for p in proxies if p != "gateway"]
print(f"| mode | {head} | " + " | ".join(f"gateway ÷ {p}" for p in ratios) + " | beyond copying bytes (gateway − byte-relay) |")
print("|---|" + "---:|" * (len(proxies) + len(ratios) + 1))
for mode in modes:
    med = {p: statistics.median(per[(mode, p)]) for p in proxies}
    each = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)
    name = NAMES[mode]
    cells = [f"{med[p]:,.0f} ({each(per[(mode, p)])})" for p in proxies]
    cells += [f"{med['gateway'] / med[p]:.2f}" for p in ratios]
    cells.append(f"{med['gateway'] - med['byte-relay']:,.0f}")
    print(f"| {name} | " + " | ".join(cells) + " |")
print()
if "paced" in modes:
    med = {p: statistics.median(per[("paced", p)]) / paced_tokens for p in proxies}
    # The per-request figure of a paced stream is mostly its tokens: the request's own work
    # (head, routing, accounting at the end) is spread over them, so this is an upper bound.
    print(
        f"Per token of a paced stream (its per-request figure ÷ {paced_tokens} tokens, which also spreads the request's own work over them): "
        + ", ".join(f"{p} {med[p]:,.0f}" for p in proxies)
        + "; the gateway beyond copying bytes "
        + f"{med['gateway'] - med['byte-relay']:,.0f}."
    )
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
    ("the request head, parsed by the gateway's own HTTP/1 server side (`http1::parse_head`)", "gateway::http1::parse_head"),
    ("the response head, written by it (`http1::write_head`)", "gateway::http1::write_head"),
    ("token accounting while relaying (`sse::Scanner::feed`)", "gateway::sse::Scanner::feed"),
    ("token accounting at the end (`sse::Scanner::finish`)", "gateway::sse::Scanner::finish"),
    ("the backend client, the gateway's own (hyper-relay uses hyper's): request out, response head in", "gateway::forward::client::UpstreamClient::request::{{closure}}"),
    ("reading the request body for `model` and `stream` (`inspect`)", "gateway::inspect::inspect"),
    ("the access-log line", "gateway::logging::Access::log"),
    ("the request id", "gateway::routes::request_id"),
    ("admission and the routing pick (`ModelPool::try_claim`)", "gateway::pool::ModelPool::try_claim"),
]
for mode in modes:
    dump = f"{work}/gateway.1.{mode}.dump"
    try:
        cost = inclusive(dump)
    except OSError:
        continue
    name = NAMES[mode]
    print(f"The gateway's largest parts, {name}, instructions per request (first repeat; each part with what it calls):")
    print()
    print("| part | instructions per request |")
    print("|---|---:|")
    for label, fn in parts:
        print(f"| {label} | {cost.get(fn, 0) / counted[mode]:,.0f} |")
    print()

calls = defaultdict(lambda: defaultdict(int))
calls_counted = {}
for r in csv.DictReader(open(syscalls), delimiter="\t"):
    calls[(r["mode"], r["proxy"])][r["syscall"]] += int(r["calls"])
    calls_counted[r["mode"]] = int(r["requests"])
if calls:
    print("System calls per request, from `strace -c -f` over the same number of requests as counted above (one run, natively); calls under 0.05 per request are left out:")
    print()
    print("| mode | proxy | per request | of which |")
    print("|---|---|---:|---|")
    for (mode, proxy), by in calls.items():
        requests = calls_counted[mode]
        total = sum(by.values()) / requests
        named = ", ".join(
            f"{name} {n / requests:.2f}" for name, n in sorted(by.items(), key=lambda kv: -kv[1]) if n / requests >= 0.05
        )
        name = NAMES[mode]
        print(f"| {name} | {proxy} | {total:.2f} | {named} |")
    print()
PY
} >"$SECTION"

write_section instructions "$SECTION"
cat "$SECTION"
