#!/usr/bin/env bash
# Can one gateway carry 1,000 concurrent token streams at 20 tokens/s each, and at what cost?
#
# One llama-sim with enough slots for every stream, generating 20 tokens/s per slot with
# near-instant prompt evaluation, is driven by 1,000 streams, once directly and once through a
# fresh bitnet-gateway, in alternating order over several repeats. Two arrival patterns:
#   - closed: exactly STREAMS workers, each starting its next stream as soon as one ends. They
#     all start together, so the simulator emits its tokens in bursts of about 1,000 every
#     50 ms: the harshest case for inter-token latency.
#   - open: streams arrive at Poisson times at STREAMS / (stream length) per second, which
#     holds about STREAMS streams in flight (Little's law) with tokens spread over time.
# Reports the gateway's CPU time, the time it waited for a CPU while runnable (schedstat) and
# its peak RSS (VmHWM) per run, and the inter-token latency (ITL) the gateway adds: ITL
# p50/p99 through the gateway minus direct, same load. With
# several WORKERS values, a gateway with each number of serving threads runs in every repeat,
# side by side. nginx runs beside them as a reference (one worker process per CPU, no
# response buffering): what a lean C proxy adds to the same bursts shows how much of the
# gateway's figure any proxy on this machine would pay.
#
# Usage: loadtest/bench/fanout.sh
# Knobs (environment): STREAMS (1000), TOKENS per stream (100, i.e. 5 s at 20 tokens/s),
# DURATION seconds of arrivals per run (15), REPEATS (3), SCENARIOS ("closed open"),
# WORKERS: the gateway's serving threads, one run per value ("1 2"); NGINX (1): 0 leaves nginx out;
# NGINX_ONE (1): a second nginx with one worker process, the like-for-like reference for one
# serving thread (0 leaves it out); RELAY (0): 1 adds hyper-relay (hyper's server and client
# on one thread with nothing between them, loadtest/bench/hyper-relay), the floor of a proxy
# built on hyper, to tell its share of a figure from the gateway's own, and byte-relay (the
# same on tokio alone: bytes copied from the backend to the client, no HTTP server library),
# to tell hyper's share from tokio's; CANDIDATE: a second
# gateway binary to run beside the first (see common.sh); TOKEN_TIMES (1): the closed runs keep every token's arrival time
# (bitnet-loadtest --token-times) and token-times.py splits their inter-token latency into
# the gaps near a crowd of stream starts and the rest; 0 leaves it out.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STREAMS=${STREAMS:-1000}
TOKENS=${TOKENS:-100}
DURATION=${DURATION:-15}
REPEATS=${REPEATS:-3}
read -r -a SCENARIOS <<<"${SCENARIOS:-closed open}"
read -r -a WORKERS <<<"${WORKERS:-1 2}"
TOKEN_TIMES=${TOKEN_TIMES:-1}
DECODE_RATE=20
MODEL=bench
# Headroom above STREAMS: Poisson arrivals briefly exceed the mean, and the comparison is
# about carrying streams, not about queueing for a slot.
SLOTS=$((STREAMS + STREAMS / 10))
STREAM_SECS=$(awk -v t="$TOKENS" -v r="$DECODE_RATE" 'BEGIN { print t / r }')
OPEN_RATE=$(awk -v s="$STREAMS" -v d="$STREAM_SECS" 'BEGIN { printf "%.1f", s / d }')

ensure_binaries
if [ "${RELAY:-0}" = 1 ]; then
    build_relays
fi
raise_fd_limit
[ "${NGINX:-1}${NGINX_ONE:-1}" != 00 ] && require_nginx
[ "$(ulimit -n)" -ge $((4 * STREAMS + 100)) ] || {
    echo "need at least $((4 * STREAMS + 100)) open files (ulimit -n is $(ulimit -n))" >&2
    exit 1
}

start_server sim "$BIN/llama-sim" --port 0 --alias "$MODEL" --slots "$SLOTS" \
    --decode-rate "$DECODE_RATE" --prefill-rate 1000000 --ctx 8192
SIM_URL=$SERVER_URL
SIM_PID=$SERVER_PID
SIM_HOSTPORT=${SIM_URL#http://}
wait_ready "$SIM_URL/health"

RAW="$WORK/raw.tsv"
TT="$WORK/token-times.tsv"
printf 'repeat\tpath\tall_p99\tnear_p99\tsteady_p99\tnear_share\tstreams\n' >"$TT"
printf 'repeat\tscenario\tpath\tttft_p50\tttft_p99\titl_p50\titl_p99\titl_max\tstreams_done\tfailed\twall_s\tproxy_cpu_s\tproxy_hwm_mib\tsim_cpu_s\tgen_cpu_s\tlisten_overflows\tsyn_retrans\ttokens\tproxy_runq_s\n' >"$RAW"

# A machine-wide TCP counter from /proc/net/netstat. A burst of connects that overflows a
# listen backlog costs the dropped ones a 1 s SYN retransmission, which shows in TTFT.
tcp_counter() {
    awk -v k="$1" '$1 == "TcpExt:" { if (!n) { for (i = 2; i <= NF; i++) h[i] = $i; n = 1 } else { for (i = 2; i <= NF; i++) if (h[i] == k) print $i } }' /proc/net/netstat
}

# proxy_stat PATH FUNCTION PID : FUNCTION (cpu_seconds, runq_wait_seconds or peak_rss_mib)
# of the proxy of a path, whose main process is PID; for nginx, of its master and workers.
proxy_stat() {
    case $1 in
        nginx*) nginx_total "$2" "$3" ;;
        *) "$2" "$3" ;;
    esac
}

# run_one REPEAT SCENARIO PATH : one bitnet-loadtest run, one line of $RAW.
run_one() {
    local repeat=$1 scenario=$2 path=$3
    local json="$WORK/r$repeat-$scenario-$path.json" url="$SIM_URL" proxy_pid="" load=()
    # A fresh proxy per run, so that its peak RSS belongs to this run alone. Gateway paths
    # are named gateway-wN or candidate-wN: N serving threads.
    case $path in
        gateway-w* | candidate-w*)
            start_server "$path-$repeat-$scenario" "$(gateway_binary "$path")" --listen 127.0.0.1:0 \
                --workers "${path##*-w}" --model "$MODEL" --backend "$SIM_URL#slots=$SLOTS"
            url=$SERVER_URL
            proxy_pid=$SERVER_PID
            wait_ready "$url/health"
            ;;
        nginx | nginx-w1)
            local workers
            workers=$(nproc)
            [ "$path" = nginx-w1 ] && workers=1
            # As many idle backend connections kept as the gateway may keep.
            NGINX_WORKER_PROCESSES=$workers start_nginx "$path-$repeat-$scenario" "$SIM_HOSTPORT" "$SLOTS"
            url=$NGINX_URL
            proxy_pid=$NGINX_PID
            ;;
        hyper-relay | byte-relay)
            start_server "$path-$repeat-$scenario" "$WORK/bin/$path" "$SIM_HOSTPORT"
            url=$SERVER_URL
            proxy_pid=$SERVER_PID
            ;;
    esac
    case $scenario in
        closed)
            load=(--concurrency "$STREAMS")
            [ "$TOKEN_TIMES" = 1 ] && load+=(--token-times)
            ;;
        open) load=(--rate "$OPEN_RATE") ;;
    esac
    local proxy_before=0 proxy_after=0 runq_before=0 runq_after=0 sim_before sim_after
    if [ -n "$proxy_pid" ]; then
        proxy_before=$(proxy_stat "$path" cpu_seconds "$proxy_pid")
        runq_before=$(proxy_stat "$path" runq_wait_seconds "$proxy_pid")
    fi
    sim_before=$(cpu_seconds "$SIM_PID")
    local t0 t1 ovf_before syn_before
    ovf_before=$(tcp_counter ListenOverflows)
    syn_before=$(tcp_counter TCPSynRetrans)
    t0=$(date +%s.%N)
    /usr/bin/time -f '%U %S' -o "$json.time" \
        "$BIN/bitnet-loadtest" --url "$url" --model "$MODEL" --seed "$repeat" --stream \
        "${load[@]}" --max-tokens "$TOKENS" --duration "$DURATION" --drain 30 \
        --json "$json" -q >"$json.txt" 2>&1
    t1=$(date +%s.%N)
    sim_after=$(cpu_seconds "$SIM_PID")
    local hwm=0
    if [ -n "$proxy_pid" ]; then
        proxy_after=$(proxy_stat "$path" cpu_seconds "$proxy_pid")
        runq_after=$(proxy_stat "$path" runq_wait_seconds "$proxy_pid")
        hwm=$(proxy_stat "$path" peak_rss_mib "$proxy_pid")
        stop_server "$proxy_pid"
    fi
    jq -r --arg r "$repeat" --arg s "$scenario" --arg p "$path" \
        --arg gcpu "$(awk -v a="$proxy_before" -v b="$proxy_after" 'BEGIN { printf "%.2f", b - a }')" \
        --arg hwm "$hwm" --arg wall "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')" \
        --arg scpu "$(awk -v a="$sim_before" -v b="$sim_after" 'BEGIN { printf "%.2f", b - a }')" \
        --arg lcpu "$(awk '{ printf "%.2f", $1 + $2 }' "$json.time")" \
        --arg ovf "$(($(tcp_counter ListenOverflows) - ovf_before))" \
        --arg syn "$(($(tcp_counter TCPSynRetrans) - syn_before))" \
        --arg runq "$(awk -v a="$runq_before" -v b="$runq_after" 'BEGIN { printf "%.3f", b - a }')" \
        '.summary | [$r, $s, $p, .ttft_us.p50, .ttft_us.p99, .itl_us.p50, .itl_us.p99, .itl_us.max,
          .succeeded, .failed + .dropped_arrivals, $wall, $gcpu, $hwm, $scpu, $lcpu, $ovf, $syn,
          .completion_tokens, $runq] | @tsv' \
        "$json" >>"$RAW"
    log "repeat $repeat $scenario $path: $(tail -1 "$RAW" | cut -f4-)"
    if [ "$scenario" = closed ] && [ "$TOKEN_TIMES" = 1 ]; then
        printf '%s\t%s\t%s\n' "$repeat" "$path" "$(python3 "$BENCH_DIR/token-times.py" "$json")" >>"$TT"
    fi
}

LOAD_BEFORE=$(load_average)
STARTED=$(date +%s)
for repeat in $(seq 1 "$REPEATS"); do
    for scenario in "${SCENARIOS[@]}"; do
        order=(direct)
        for w in "${WORKERS[@]}"; do
            order+=("gateway-w$w")
            [ -n "${CANDIDATE:-}" ] && order+=("candidate-w$w")
        done
        [ "${NGINX:-1}" = 1 ] && order+=(nginx)
        [ "${NGINX_ONE:-1}" = 1 ] && order+=(nginx-w1)
        [ "${RELAY:-0}" = 1 ] && order+=(hyper-relay byte-relay)
        if [ $((repeat % 2)) = 0 ]; then
            # Every other repeat in reverse, so that no path always runs first.
            for ((i = 0, j = ${#order[@]} - 1; i < j; i++, j--)); do
                t=${order[i]}
                order[i]=${order[j]}
                order[j]=$t
            done
        fi
        for path in "${order[@]}"; do
            run_one "$repeat" "$scenario" "$path"
        done
    done
done
ELAPSED=$(($(date +%s) - STARTED))
LOAD_AFTER=$(load_average)

SECTION="$WORK/section.md"
{
    echo "## Fan-out: $STREAMS concurrent streams at $DECODE_RATE tokens/s"
    echo
    machine_markdown
    echo "- Load average before / after: $LOAD_BEFORE / $LOAD_AFTER (the machine is shared; other builds may have run at the same time). Wall time ${ELAPSED} s."
    echo "- One llama-sim, $SLOTS slots, $DECODE_RATE tokens/s per slot, prompt evaluation at 1,000,000 tokens/s (near instant). Each stream asks for $TOKENS tokens (${STREAM_SECS} s). The gateway knows the backend has $SLOTS slots, so nothing queues."
    echo "- *closed*: $STREAMS workers back to back, started together, so tokens come in bursts of ~$STREAMS every $((1000 / DECODE_RATE)) ms. *open*: Poisson arrivals at $OPEN_RATE streams/s, ~$STREAMS in flight after the first ${STREAM_SECS} s."
    echo "- The load generator, the simulator and the proxy share the machine's $(nproc) CPUs; their CPU use is shown so that the proxy's share can be judged."
    [ "${NGINX:-1}" = 1 ] && echo "- $(nginx_markdown "$SLOTS"). nginx's peak RSS is its master's and workers' added up."
    [ "${NGINX_ONE:-1}" = 1 ] && echo "- nginx, 1 worker: the same nginx with \`worker_processes 1\`, the like-for-like reference for one serving thread."
    [ "${RELAY:-0}" = 1 ] && echo "- hyper-relay: hyper's server and client on one thread with nothing between them (loadtest/bench/hyper-relay), the floor of a proxy built on hyper; its backend side is hyper's client, with a task per connection, where the gateway reads the backend in the relaying task."
    [ "${RELAY:-0}" = 1 ] && echo "- byte-relay: the same on tokio alone, one thread and one task per client connection, as the gateway (loadtest/bench/hyper-relay/src/bin/byte-relay.rs): it reads a request, sends it unchanged on an idle backend connection and writes each read from the backend to the client as it is, chunk framing and all, one read and one write per token as in nginx. What it adds beyond nginx is, roughly, the cost of tokio and a task per connection; what hyper-relay adds beyond it, the cost of hyper."
    echo
    echo "Command:"
    echo
    echo '```sh'
    echo "STREAMS=$STREAMS TOKENS=$TOKENS DURATION=$DURATION REPEATS=$REPEATS SCENARIOS=\"${SCENARIOS[*]}\" WORKERS=\"${WORKERS[*]}\" NGINX=${NGINX:-1} NGINX_ONE=${NGINX_ONE:-1} RELAY=${RELAY:-0} TOKEN_TIMES=$TOKEN_TIMES${CANDIDATE:+ CANDIDATE=$CANDIDATE} loadtest/bench/fanout.sh"
    echo '```'
    echo
    python3 - "$RAW" "$TT" "$STREAM_SECS" <<'PY'
import csv
import statistics
import sys

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
token_times = {(r["repeat"], r["path"]): r for r in csv.DictReader(open(sys.argv[2]), delimiter="\t")}
stream_secs = sys.argv[3]
reps = sorted({r["repeat"] for r in rows})
scenarios = []
for r in rows:
    if r["scenario"] not in scenarios:
        scenarios.append(r["scenario"])
cell = {(r["repeat"], r["scenario"], r["path"]): r for r in rows}
# The token-time split of a closed run joins that run's row, so col() and paired() read it.
for (r, p), split in token_times.items():
    cell[(r, "closed", p)].update(split)
# gateway-wN and candidate-wN: N serving threads, of the checkout's gateway or of CANDIDATE.
gateways = sorted(
    {r["path"] for r in rows if r["path"].startswith(("gateway-w", "candidate-w"))},
    key=lambda p: (int(p.rsplit("-w", 1)[1]), p.startswith("candidate")),
)
paths = ["direct"] + gateways + [n for n in ("nginx", "nginx-w1", "hyper-relay", "byte-relay") if any(r["path"] == n for r in rows)]


def label(p):
    if p in ("direct", "nginx", "hyper-relay", "byte-relay"):
        return p
    if p == "nginx-w1":
        return "nginx, 1 worker"
    kind, n = p.rsplit("-w", 1)
    return f"{kind}, {n} thread{'s' if int(n) > 1 else ''}"


def med(values):
    return statistics.median(values) if values else float("nan")


def col(scenario, path, key):
    return [float(cell[(r, scenario, path)][key]) for r in reps if (r, scenario, path) in cell]


def paired(scenario, path, key, reference="direct"):
    """Per repeat, path's figure less reference's in the same repeat."""
    return [
        float(cell[(r, scenario, path)][key]) - float(cell[(r, scenario, reference)][key])
        for r in reps
        if (r, scenario, path) in cell and (r, scenario, reference) in cell
    ]


print(f"Medians of {len(reps)} repeats; latency in ms. *Added* is the median over repeats of (proxy − direct) in the same repeat.")
print()
print("*Listen overflows* and *SYN retransmits* are the machine's TCP counters (/proc/net/netstat) over the run, summed over")
print("the repeats: connections dropped by a full listen backlog and retried after 1 s, which shows in TTFT p99.")
print()
print("| arrivals | path | streams done | failed | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | ITL max | added ITL p50 | added ITL p99 | listen overflows | SYN retransmits |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in scenarios:
    for p in paths:
        if not col(s, p, "itl_p50"):
            continue
        a50 = "—" if p == "direct" else f"{med(paired(s, p, 'itl_p50')) / 1000:+.2f}"
        a99 = "—" if p == "direct" else f"{med(paired(s, p, 'itl_p99')) / 1000:+.2f}"
        print(
            f"| {s} | {label(p)} | {med(col(s, p, 'streams_done')):.0f} | {sum(col(s, p, 'failed')):.0f} "
            f"| {med(col(s, p, 'ttft_p50')) / 1000:.1f} | {med(col(s, p, 'ttft_p99')) / 1000:.1f} "
            f"| {med(col(s, p, 'itl_p50')) / 1000:.2f} | {med(col(s, p, 'itl_p99')) / 1000:.2f} | {med(col(s, p, 'itl_max')) / 1000:.1f} "
            f"| {a50} | {a99} | {sum(col(s, p, 'listen_overflows')):.0f} | {sum(col(s, p, 'syn_retrans')):.0f} |"
        )
print()
print("CPU time is user + system seconds, and wall time is seconds, over the whole run: arrivals plus the streams still running after them.")
print("*Proxy µs per token* is the proxy's CPU time divided by the tokens the streams received. *Proxy waiting for a CPU*")
print("is the time its threads (nginx: its processes) spent runnable but not running, from the kernel's schedstat, in")
print("µs per token: the part of its delay that was waiting its turn on the shared CPUs rather than its own work.")
print()
print("| arrivals | path | wall s | proxy CPU s | proxy CPU % of one core | proxy µs per token | proxy waiting for a CPU, µs per token | proxy peak RSS MiB | simulator CPU s | load generator CPU s |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in scenarios:
    for p in paths:
        if not col(s, p, "wall_s"):
            continue
        wall = med(col(s, p, "wall_s"))
        if p != "direct":
            share = med([c / w * 100 for c, w in zip(col(s, p, "proxy_cpu_s"), col(s, p, "wall_s"))])
            per_token = med([c / t * 1e6 for c, t in zip(col(s, p, "proxy_cpu_s"), col(s, p, "tokens")) if t > 0])
            waiting = med([q / t * 1e6 for q, t in zip(col(s, p, "proxy_runq_s"), col(s, p, "tokens")) if t > 0])
            gw = f"{med(col(s, p, 'proxy_cpu_s')):.2f} | {share:.0f} % | {per_token:.1f} | {waiting:.1f} | {med(col(s, p, 'proxy_hwm_mib')):.1f}"
        else:
            gw = "— | — | — | — | —"
        print(f"| {s} | {label(p)} | {wall:.1f} | {gw} | {med(col(s, p, 'sim_cpu_s')):.2f} | {med(col(s, p, 'gen_cpu_s')):.2f} |")
if token_times:
    print()
    print(f"Where the closed runs' inter-token latency arises. Every {stream_secs} s all streams end and start again together, and")
    print("a proxy does each request's own work (reading it, routing it, opening the backend request, closing the last one's")
    print("accounting) for all of them at once; in between it only relays tokens. From each token's arrival time")
    print("(`bitnet-loadtest --token-times`, split by `token-times.py`): the p99 of the gaps between a stream's tokens that end")
    print("within 300 ms after a 100 ms window in which at least 5 % of the streams got their first token (*near starts*),")
    print("and of the rest (*steady relay*), in ms; *added* is less direct's in the same repeat, the median over repeats.")
    print()
    print("| path | share of gaps near starts | ITL p99 | near starts | steady relay | added: near starts | added: steady relay |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for p in paths:
        if not col("closed", p, "all_p99"):
            continue
        added = (
            "— | —"
            if p == "direct"
            else f"{med(paired('closed', p, 'near_p99')) / 1000:+.2f} | {med(paired('closed', p, 'steady_p99')) / 1000:+.2f}"
        )
        print(
            f"| {label(p)} | {med(col('closed', p, 'near_share')) * 100:.0f} % | {med(col('closed', p, 'all_p99')) / 1000:.2f} "
            f"| {med(col('closed', p, 'near_p99')) / 1000:.2f} | {med(col('closed', p, 'steady_p99')) / 1000:.2f} | {added} |"
        )
print()
for s in scenarios:
    for p in gateways:
        if not col(s, p, "proxy_hwm_mib"):
            continue
        hwm = max(col(s, p, "proxy_hwm_mib"))
        a99 = med(paired(s, p, "itl_p99")) / 1000
        line = f"- {s}, {label(p)}: peak RSS, largest of the repeats: **{hwm:.1f} MiB** (target ≤ 100 MB: {'met' if hwm * 1.048576 <= 100 else 'not met'}); added ITL p99: **{a99:+.2f} ms** (target ≤ 1 ms: {'met' if a99 <= 1 else 'not met'})"
        if col(s, "nginx", "itl_p99"):
            line += f"; nginx in the same repeats: {med(paired(s, 'nginx', 'itl_p99')) / 1000:+.2f} ms"
        if col(s, "nginx-w1", "itl_p99"):
            line += f"; nginx with 1 worker: {med(paired(s, 'nginx-w1', 'itl_p99')) / 1000:+.2f} ms"
        print(line)
for s in scenarios:
    for p in gateways:
        base = p.replace("candidate-w", "gateway-w")
        if p == base:
            continue
        diff = paired(s, p, "itl_p99", reference=base)
        if diff:
            print(
                f"- {s}, {label(p)} against {label(base)}: ITL p99 {med(diff) / 1000:+.2f} ms "
                f"(per repeat: {', '.join(f'{d / 1000:+.2f}' for d in diff)})"
            )
PY
} >"$SECTION"
write_section fanout "$SECTION"
cat "$SECTION"
