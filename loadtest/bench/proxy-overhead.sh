#!/usr/bin/env bash
# What does the gateway add on top of a backend, compared with nginx as a plain reverse proxy?
#
# A zero-latency llama-sim (it answers at once, so all measured time is HTTP and proxy work)
# is reached directly, through bitnet-gateway, through nginx, and through two floors in
# loadtest/bench/hyper-relay: hyper-relay (hyper's server and client with nothing between
# them, the floor for any proxy built on hyper) and byte-relay (tokio alone, copying bytes).
# Each repeat runs the paths back to back for every (mode, rate) cell, in a rotating order,
# so machine noise hits them all alike. Reports medians over the repeats of:
#   - p50/p99 latency at fixed open-loop rates, and what each proxy adds to the direct path;
#   - maximum throughput in a closed loop at high concurrency, the gateway/nginx ratio, and
#     the CPU time each proxy spends per request, with the simulator's, the load
#     generator's and the machine's idle time beside it, so a throughput gap can be traced
#     to where it goes.
#
# Usage: loadtest/bench/proxy-overhead.sh
# Knobs (environment): REPEATS (5), DURATION seconds per latency run (5), RATES ("500 1000"),
# CONCURRENCY for the throughput runs (64), TPUT_DURATION seconds (5), WORKERS ("1 2"): one
# gateway per number of serving threads, side by side; the first is the one the targets
# judge (1 is the gateway's default); RELAY (1): 0 leaves hyper-relay and byte-relay out;
# NGINX_ONE (1): a second nginx with one worker process beside the usual one-per-CPU, the
# like-for-like comparison for one serving thread (0 leaves it out); CANDIDATE: a second
# gateway binary to run beside the first, with the same WORKERS (see common.sh). The targets
# are judged against nginx's usual setting.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPEATS=${REPEATS:-5}
DURATION=${DURATION:-5}
read -r -a RATES <<<"${RATES:-500 1000}"
CONCURRENCY=${CONCURRENCY:-64}
TPUT_DURATION=${TPUT_DURATION:-5}
read -r -a WORKERS <<<"${WORKERS:-1 2}"
PATHS=(direct)
for w in "${WORKERS[@]}"; do
    PATHS+=("gateway-w$w")
    [ -n "${CANDIDATE:-}" ] && PATHS+=("candidate-w$w")
done
[ "${RELAY:-1}" = 1 ] && PATHS+=(hyper-relay byte-relay)
PATHS+=(nginx)
[ "${NGINX_ONE:-1}" = 1 ] && PATHS+=(nginx-w1)
MODES=(plain stream)
MODEL=bench
# Larger than any concurrency used here, so neither the simulator nor the gateway queues:
# the comparison is about proxying, not admission.
SLOTS=1024

require_nginx
ensure_binaries
raise_fd_limit

start_server sim "$BIN/llama-sim" --port 0 --zero-latency --alias "$MODEL" --slots "$SLOTS"
SIM_URL=$SERVER_URL
SIM_PID=$SERVER_PID
SIM_HOSTPORT=${SIM_URL#http://}

if [ "${RELAY:-1}" = 1 ]; then
    build_relays
    start_server hyper-relay "$WORK/bin/hyper-relay" "$SIM_HOSTPORT"
    RELAY_URL=$SERVER_URL
    RELAY_PID=$SERVER_PID
    start_server byte-relay "$WORK/bin/byte-relay" "$SIM_HOSTPORT"
    BYTE_URL=$SERVER_URL
    BYTE_PID=$SERVER_PID
fi

# Keyed by path: gateway-wN or candidate-wN, N serving threads.
declare -A GATEWAY_URL GATEWAY_PID
for path in "${PATHS[@]}"; do
    case $path in
        gateway-w* | candidate-w*)
            start_server "$path" "$(gateway_binary "$path")" --listen 127.0.0.1:0 \
                --workers "${path##*-w}" --model "$MODEL" --backend "$SIM_URL#slots=$SLOTS"
            GATEWAY_URL[$path]=$SERVER_URL
            GATEWAY_PID[$path]=$SERVER_PID
            ;;
    esac
done

wait_ready "$SIM_URL/health"
for url in "${GATEWAY_URL[@]}"; do wait_ready "$url/health"; done
if [ "${NGINX_ONE:-1}" = 1 ]; then
    NGINX_WORKER_PROCESSES=1 start_nginx nginx-w1 "$SIM_HOSTPORT" 64
    NGINX_W1_URL=$NGINX_URL
    NGINX_W1_PID=$NGINX_PID
fi
start_nginx nginx "$SIM_HOSTPORT" 64

url_of() {
    case $1 in
        direct) echo "$SIM_URL" ;;
        gateway-w* | candidate-w*) echo "${GATEWAY_URL[$1]}" ;;
        hyper-relay) echo "$RELAY_URL" ;;
        byte-relay) echo "$BYTE_URL" ;;
        nginx) echo "$NGINX_URL" ;;
        nginx-w1) echo "$NGINX_W1_URL" ;;
    esac
}

# CPU seconds used so far by the proxy of a path (nginx: master and workers).
proxy_cpu() {
    case $1 in
        direct) echo 0 ;;
        gateway-w* | candidate-w*) cpu_seconds "${GATEWAY_PID[$1]}" ;;
        hyper-relay) cpu_seconds "$RELAY_PID" ;;
        byte-relay) cpu_seconds "$BYTE_PID" ;;
        nginx) nginx_cpu_seconds "$NGINX_PID" ;;
        nginx-w1) nginx_cpu_seconds "$NGINX_W1_PID" ;;
    esac
}

RAW="$WORK/raw.tsv"
printf 'repeat\tmode\tload\tpath\tttft_p50\tttft_p99\te2e_p50\te2e_p99\trps\trequests\tfailed\tproxy_cpu_s\tsim_cpu_s\tloadgen_cpu_s\tidle_s\tsteal_s\n' >"$RAW"

# run_one REPEAT MODE LOAD PATH ARGS... : one bitnet-loadtest run, one line of $RAW.
run_one() {
    local repeat=$1 mode=$2 load=$3 path=$4
    shift 4
    local json="$WORK/r$repeat-$mode-$load-$path.json" stream=() before after sim_before sim_after
    local idle_before idle_after TIMEFORMAT='%3U %3S'
    [ "$mode" = stream ] && stream=(--stream)
    before=$(proxy_cpu "$path")
    sim_before=$(cpu_seconds "$SIM_PID")
    idle_before=$(machine_idle_steal_seconds)
    # bash's `time` reports the load generator's own user and system seconds.
    if ! { time "$BIN/bitnet-loadtest" --url "$(url_of "$path")" --model "$MODEL" --seed "$repeat" \
        "${stream[@]}" "$@" --json "$json" -q >"$json.txt" 2>"$json.err"; } 2>"$json.time"; then
        cat "$json.err" >&2
        return 1
    fi
    after=$(proxy_cpu "$path")
    sim_after=$(cpu_seconds "$SIM_PID")
    idle_after=$(machine_idle_steal_seconds)
    jq -r --arg r "$repeat" --arg m "$mode" --arg l "$load" --arg p "$path" \
        --arg cpu "$(awk -v a="$before" -v b="$after" 'BEGIN { printf "%.3f", b - a }')" \
        --arg sim "$(awk -v a="$sim_before" -v b="$sim_after" 'BEGIN { printf "%.3f", b - a }')" \
        --arg gen "$(awk '{ printf "%.3f", $1 + $2 }' "$json.time")" \
        --arg idle "$(echo "$idle_before $idle_after" | awk '{ printf "%.3f", $3 - $1 }')" \
        --arg steal "$(echo "$idle_before $idle_after" | awk '{ printf "%.3f", $4 - $2 }')" \
        '.summary | [$r, $m, $l, $p, .ttft_us.p50, .ttft_us.p99, .e2e_us.p50, .e2e_us.p99,
          .requests_per_s, .requests, .failed + .dropped_arrivals, $cpu, $sim, $gen, $idle, $steal]
          | @tsv' "$json" >>"$RAW"
    log "repeat $repeat $mode $load $path: $(tail -1 "$RAW" | cut -f5-)"
}

LOAD_BEFORE=$(load_average)
STARTED=$(date +%s)
for repeat in $(seq 1 "$REPEATS"); do
    # Rotate the order of the paths from one repeat to the next.
    order=()
    for i in "${!PATHS[@]}"; do
        order+=("${PATHS[$(((i + repeat - 1) % ${#PATHS[@]}))]}")
    done
    for mode in "${MODES[@]}"; do
        for rate in "${RATES[@]}"; do
            for path in "${order[@]}"; do
                run_one "$repeat" "$mode" "rate=$rate" "$path" --rate "$rate" --duration "$DURATION"
            done
        done
        for path in "${order[@]}"; do
            run_one "$repeat" "$mode" "max" "$path" --concurrency "$CONCURRENCY" \
                --duration "$TPUT_DURATION"
        done
    done
done
ELAPSED=$(($(date +%s) - STARTED))
LOAD_AFTER=$(load_average)
cp "$RAW" "$ROOT/target/bench-proxy-overhead.tsv" 2>/dev/null || true

SECTION="$WORK/section.md"
{
    echo "## Proxy overhead: direct vs bitnet-gateway vs nginx"
    echo
    machine_markdown
    echo "- $(nginx_markdown 64)"
    [ "${NGINX_ONE:-1}" = 1 ] && echo "- nginx, 1 worker: the same nginx with \`worker_processes 1\`, the like-for-like comparison for one serving thread (the targets are judged against the usual one worker per CPU)"
    echo "- Load average before / after: $LOAD_BEFORE / $LOAD_AFTER (the machine is shared; other builds may have run at the same time). Wall time ${ELAPSED} s."
    echo
    echo "Command:"
    echo
    echo '```sh'
    echo "REPEATS=$REPEATS DURATION=$DURATION RATES=\"${RATES[*]}\" CONCURRENCY=$CONCURRENCY TPUT_DURATION=$TPUT_DURATION WORKERS=\"${WORKERS[*]}\" NGINX_ONE=${NGINX_ONE:-1} RELAY=${RELAY:-1}${CANDIDATE:+ CANDIDATE=$CANDIDATE} loadtest/bench/proxy-overhead.sh"
    echo '```'
    echo
    python3 - "$RAW" "$REPEATS" "$CONCURRENCY" "$(nproc)" "${PATHS[@]}" <<'PY'
import csv
import statistics
import sys
from collections import defaultdict

raw, repeats, concurrency, cpus = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
paths = sys.argv[5:]
# The first gateway is the one the targets judge; the others are shown beside it.
judged = next(p for p in paths if p.startswith("gateway-w"))


def is_gateway(path):
    """gateway-wN and candidate-wN: N serving threads, of the checkout's gateway or of CANDIDATE."""
    return path.startswith(("gateway-w", "candidate-w"))


rows = list(csv.DictReader(open(raw), delimiter="\t"))
cell = {(r["repeat"], r["mode"], r["load"], r["path"]): r for r in rows}


def label(path):
    if path == "hyper-relay":
        return "hyper-relay (floor)"
    if path == "byte-relay":
        return "byte-relay (tokio alone)"
    if path == "nginx-w1":
        return "nginx, 1 worker"
    if not is_gateway(path):
        return path
    kind, n = path.rsplit("-w", 1)
    return f"{kind}, {n} thread{'s' if int(n) > 1 else ''}"
modes = sorted({r["mode"] for r in rows}, key=["plain", "stream"].index)
loads = []
for r in rows:
    if r["load"] not in loads:
        loads.append(r["load"])
reps = sorted({r["repeat"] for r in rows})


def med(values):
    return statistics.median(values) if values else float("nan")


def ms(us):
    return f"{us / 1000:.2f}"


def added(us):
    return f"{us / 1000:+.2f}"


def series(mode, load, path, key):
    return [float(cell[(r, mode, load, path)][key]) for r in reps if (r, mode, load, path) in cell]


def paired(mode, load, path, key, reference="direct"):
    """Per repeat, path's figure less reference's in the same repeat."""
    out = []
    for r in reps:
        a, b = cell.get((r, mode, load, path)), cell.get((r, mode, load, reference))
        if a and b:
            out.append(float(a[key]) - float(b[key]))
    return out


print(f"Medians of {len(reps)} repeats. Latency in ms, measured by bitnet-loadtest from sending a request to")
print("its first token (TTFT) and to its last byte (E2E). *Added* is the median over repeats of (path − direct)")
print("within the same repeat. Non-streamed answers carry 64 tokens; streamed answers are 64 SSE chunks plus")
print("the final ones. hyper-relay is hyper's server and client with nothing between them (loadtest/bench/hyper-relay):")
print("what any proxy built on hyper pays before doing work of its own. byte-relay is a relay on tokio alone that")
print("copies the backend's bytes to the client, one read to one write: the floor for a proxy on tokio without hyper.")
print()
print("### Latency at fixed open-loop rates")
print()
print("| mode | rate (req/s) | path | achieved req/s | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 | added E2E p50 | added E2E p99 | failed |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for mode in modes:
    for load in loads:
        if not load.startswith("rate="):
            continue
        for path in paths:
            if not series(mode, load, path, "rps"):
                continue
            add50 = "—" if path == "direct" else added(med(paired(mode, load, path, "e2e_p50")))
            add99 = "—" if path == "direct" else added(med(paired(mode, load, path, "e2e_p99")))
            print(
                f"| {mode} | {load[5:]} | {label(path)} | {med(series(mode, load, path, 'rps')):.0f} "
                f"| {ms(med(series(mode, load, path, 'ttft_p50')))} | {ms(med(series(mode, load, path, 'ttft_p99')))} "
                f"| {ms(med(series(mode, load, path, 'e2e_p50')))} | {ms(med(series(mode, load, path, 'e2e_p99')))} "
                f"| {add50} | {add99} | {sum(series(mode, load, path, 'failed')):.0f} |"
            )
print()
print(f"### Maximum throughput (closed loop, {concurrency} concurrent requests)")
print()
print("The CPU columns are microseconds per request: the proxy's, the simulator's and the load generator's CPU time")
print(f"(user + system), and the time the machine's {cpus} CPUs sat idle, over the run divided by its requests.")
print(f"Together with whatever else ran, they add up to the machine time a request took: {cpus} CPUs ÷ req/s.")
print()
print("| mode | path | req/s | vs direct | proxy CPU | simulator CPU | load generator CPU | idle | E2E p50 | E2E p99 | failed |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
ratios = {}
# The same against the one-worker nginx, when it ran.
ratios_w1 = {}
cpu_med = {}


def throughput_ratio(mode, path, reference):
    """Median over repeats of path's closed-loop throughput over reference's."""
    return med([
        float(cell[(r, mode, "max", path)]["rps"]) / float(cell[(r, mode, "max", reference)]["rps"]) for r in reps
    ])


# (mode, path) -> {part: median µs per request}, for the split of the gap to nginx.
parts = {}
PARTS = {"proxy": "proxy_cpu_s", "simulator": "sim_cpu_s", "load generator": "loadgen_cpu_s", "idle": "idle_s"}


def per_request(mode, path, key):
    out = []
    for r in reps:
        c = cell.get((r, mode, "max", path))
        if c and c.get(key) not in (None, ""):
            out.append(float(c[key]) * 1e6 / max(1.0, float(c["requests"])))
    return out


for mode in modes:
    for path in paths:
        rps = series(mode, "max", path, "rps")
        if not rps:
            continue
        rel = [float(cell[(r, mode, "max", path)]["rps"]) / float(cell[(r, mode, "max", "direct")]["rps"]) for r in reps]
        parts[(mode, path)] = {name: med(per_request(mode, path, key)) for name, key in PARTS.items()}
        parts[(mode, path)]["machine"] = med([cpus * 1e6 / x for x in rps])
        cpu_med[(mode, path)] = parts[(mode, path)]["proxy"]
        cols = [
            "—" if name == "proxy" and path == "direct" else f"{parts[(mode, path)][name]:.0f}"
            for name in PARTS
        ]
        print(
            f"| {mode} | {label(path)} | {med(rps):.0f} | {med(rel):.2f} | {' | '.join(cols)} "
            f"| {ms(med(series(mode, 'max', path, 'e2e_p50')))} | {ms(med(series(mode, 'max', path, 'e2e_p99')))} "
            f"| {sum(series(mode, 'max', path, 'failed')):.0f} |"
        )
    for path in paths:
        if is_gateway(path) or path in ("hyper-relay", "byte-relay"):
            ratios[(mode, path)] = throughput_ratio(mode, path, "nginx")
            if (mode, "nginx-w1") in parts:
                ratios_w1[(mode, path)] = throughput_ratio(mode, path, "nginx-w1")
print()
for (mode, path), ratio in ratios.items():
    target = f"; target ≥ 1.0: {'met' if ratio >= 1.0 else 'not met'}" if path == judged else ""
    print(f"- Throughput ratio {label(path)}/nginx, {mode}: **{ratio:.2f}** (median of per-repeat ratios{target})")
for (mode, path), ratio in ratios_w1.items():
    print(f"- Throughput ratio {label(path)}/nginx, 1 worker, {mode}: **{ratio:.2f}** (median of per-repeat ratios)")
for mode in modes:
    for other in ("nginx", "nginx-w1"):
        if (mode, judged) in parts and (mode, other) in parts:
            g, n = parts[(mode, judged)], parts[(mode, other)]
            split = ", ".join(f"{name} {g[name] - n[name]:+.0f}" for name in PARTS)
            rest = (g["machine"] - sum(g[k] for k in PARTS)) - (n["machine"] - sum(n[k] for k in PARTS))
            print(
                f"- {label(judged)} against {label(other)}, {mode}: {g['machine'] - n['machine']:+.0f} µs of machine time per request "
                f"({g['machine']:.0f} against {n['machine']:.0f}): {split}, everything else {rest:+.0f}"
            )
for mode in modes:
    if (mode, judged) in cpu_med and (mode, "hyper-relay") in cpu_med:
        own = cpu_med[(mode, judged)] - cpu_med[(mode, "hyper-relay")]
        print(f"- {label(judged)}, {mode}: {own:.0f} µs of CPU per request beyond hyper-relay's (its own work: routing, accounting, metrics, access log)")
for mode in modes:
    load = "rate=1000"
    for path in paths:
        if is_gateway(path) and series(mode, load, path, "e2e_p99"):
            a = med(paired(mode, load, path, "e2e_p99")) / 1000
            target = f" (target ≤ 0.3 ms: {'met' if a <= 0.3 else 'not met'})" if path == judged else ""
            print(f"- {label(path)}: added E2E p99 at 1,000 req/s, {mode}: **{a:+.2f} ms**{target}")
for mode in modes:
    for path in paths:
        base = path.replace("candidate-w", "gateway-w")
        if path == base or base not in paths:
            continue
        # Against the checkout's gateway with as many threads, in the same repeats.
        p99 = paired(mode, "rate=1000", path, "e2e_p99", reference=base)
        print(
            f"- {label(path)} against {label(base)}, {mode}: throughput ratio **{throughput_ratio(mode, path, base):.2f}**, "
            f"E2E p99 at 1,000 req/s {med(p99) / 1000:+.2f} ms"
        )
PY
} >"$SECTION"
write_section proxy-overhead "$SECTION"
cat "$SECTION"
