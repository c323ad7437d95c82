#!/usr/bin/env bash
# What does the routing policy buy on a fleet of slow single-slot BitNet backends?
#
# Eight llama-sim backends imitate the bitnet.cpp fork of llama-server (1 slot each, no prompt
# cache unless asked, 60 tokens/s prompt evaluation, 18 tokens/s generation) with every delay
# multiplied by TIME_SCALE, so that a minute of wall time stands for 1/TIME_SCALE minutes of
# the real fleet. For each workload and each offered load (a fraction of the fleet's capacity)
# every policy in POLICIES runs once per repeat against a fresh gateway, policies in rotating
# order. round-robin is the baseline.
#
# predicted-ttft is told the fleet's nominal rates (60 and 18 tokens/s) divided by TIME_SCALE, the
# speed the compressed backends really run at; it calibrates them from the backends' timings anyway.
#
# A policy entry is a gateway policy name, optionally followed by ":slots=N" to tell the
# gateway each backend has N slots instead of its true 1. The gateway's round-robin skips
# backends whose slots are all taken, which on 1-slot backends makes it pick the same free
# backends least-loaded would; "round-robin:slots=64" hides the slot limit, so requests are
# dealt out blindly and wait in the backends' own queues, as behind a plain reverse proxy.
#
# The fleet's capacity is estimated first: a zero-latency simulator in the same dialect
# answers a calibration sample of each workload at once, and the token counts it reports
# give each request's service time on a real backend,
#     S = uncached prompt tokens / 60 + completion tokens / 18   (seconds),
# so 8 backends serve at most 8 / mean(S) requests per second (times 1/TIME_SCALE when
# compressed). Sessions of the agent workload carry TURNS requests each, so their arrival rate
# is the request rate divided by TURNS.
#
# Usage: loadtest/bench/routing.sh
# Knobs (environment): POLICIES ("round-robin least-loaded predicted-ttft round-robin:slots=64"), WORKLOADS
# ("agent short-chat"), LOADS in percent of capacity ("70 90"), BACKENDS (8), TIME_SCALE (0.05),
# DURATION seconds of arrivals per run (60), AGENT_DURATION for the agent workload, whose
# sessions take a while to build up (90), SYSTEM_PROMPT_CHARS of the agent workload (8000, so
# that a whole 5-turn conversation fits the fork's 4,096-token context, which the gateway
# enforces), REPEATS (3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Adding a policy to the comparison is adding its name here.
read -r -a POLICIES <<<"${POLICIES:-round-robin least-loaded predicted-ttft round-robin:slots=64}"
read -r -a WORKLOADS <<<"${WORKLOADS:-agent short-chat}"
read -r -a LOADS <<<"${LOADS:-70 90}"
BACKENDS=${BACKENDS:-8}
TIME_SCALE=${TIME_SCALE:-0.05}
DURATION=${DURATION:-60}
AGENT_DURATION=${AGENT_DURATION:-90}
SYSTEM_PROMPT_CHARS=${SYSTEM_PROMPT_CHARS:-8000}
REPEATS=${REPEATS:-3}
PREFILL_RATE=60
DECODE_RATE=18
TURNS=5
# An agent's tool call between turns takes about 2 s; compressed like everything else.
THINK_TIME=$(awk -v s="$TIME_SCALE" 'BEGIN { print 2 * s }')
MODEL=bench

ensure_binaries
raise_fd_limit

# --- Capacity: service time per request, from a zero-latency calibration run. ---
start_server calib "$BIN/llama-sim" --port 0 --dialect bitnet --zero-latency --alias "$MODEL"
CALIB_URL=$SERVER_URL
CALIB_PID=$SERVER_PID
wait_ready "$CALIB_URL/health"
CAPACITY="$WORK/capacity.tsv"
printf 'workload\trequests\tprompt_mean\tcached_mean\tcompletion_mean\tservice_s\tfleet_req_s_real\tsession_requests\n' >"$CAPACITY"
# The agent flags for a workload with agent sessions (the load generator refuses them for one
# without). $1: the workload; $2: the think time.
agent_flags() {
    case $1 in
    *agent*) echo --turns "$TURNS" --think-time "$2" --system-prompt-chars "$SYSTEM_PROMPT_CHARS" ;;
    esac
}

for workload in "${WORKLOADS[@]}"; do
    # shellcheck disable=SC2046 # agent_flags' words are meant to split
    "$BIN/bitnet-loadtest" --url "$CALIB_URL" --model "$MODEL" --workload "$workload" \
        --concurrency 1 --requests 50 --seed 1000 $(agent_flags "$workload" 0) \
        --json "$WORK/calib-$workload.json" -q >/dev/null 2>&1
    session_requests=1
    [ "$workload" = agent ] && session_requests=$TURNS
    jq -r --arg w "$workload" --argjson p "$PREFILL_RATE" --argjson d "$DECODE_RATE" \
        --argjson n "$BACKENDS" --argjson k "$session_requests" '
        [.records[] | select(.status == 200)] as $ok
        | ($ok | length) as $c
        | ([$ok[] | .prompt_tokens] | add / $c) as $pt
        | ([$ok[] | .cached_tokens // 0] | add / $c) as $ct
        | ([$ok[] | .completion_tokens] | add / $c) as $gt
        | (($pt - $ct) / $p + $gt / $d) as $s
        | [$w, $c, $pt, $ct, $gt, $s, $n / $s, $k] | @tsv' \
        "$WORK/calib-$workload.json" >>"$CAPACITY"
done
stop_server "$CALIB_PID"
log "capacity: $(cut -f1,6,7 "$CAPACITY" | tail -n +2 | tr '\n' ' ')"

# Arrival rate (sessions per second on the compressed clock) for WORKLOAD at PERCENT.
arrival_rate() {
    awk -F'\t' -v w="$1" -v pct="$2" -v s="$TIME_SCALE" \
        '$1 == w { printf "%.4f", $7 / s * pct / 100 / $8 }' "$CAPACITY"
}

# --- The fleet. ---
SIM_URLS=()
SIM_PIDS=()
for i in $(seq 1 "$BACKENDS"); do
    start_server "sim$i" "$BIN/llama-sim" --port 0 --dialect bitnet --alias "$MODEL" \
        --prefill-rate "$PREFILL_RATE" --decode-rate "$DECODE_RATE" --time-scale "$TIME_SCALE"
    SIM_URLS+=("$SERVER_URL")
    SIM_PIDS+=("$SERVER_PID")
    wait_ready "$SERVER_URL/health"
done

# Sum over the fleet of a llama-server counter.
fleet_counter() {
    local url total=0 v
    for url in "${SIM_URLS[@]}"; do
        v=$(curl -fsS --max-time 2 "$url/metrics" | awk -v k="llamacpp:$1" '$1 == k { print $2 }')
        total=$(awk -v a="$total" -v b="${v:-0}" 'BEGIN { print a + b }')
    done
    echo "$total"
}

# Waits until no backend is still working on a request a previous run left behind.
wait_fleet_idle() {
    local tries=0
    while [ "$(fleet_counter requests_processing)" != 0 ] || [ "$(fleet_counter requests_deferred)" != 0 ]; do
        tries=$((tries + 1))
        [ "$tries" -lt 600 ] || { echo "fleet did not go idle" >&2; return 1; }
        sleep 0.1
    done
}

busy_seconds() {
    awk -v a="$(fleet_counter prompt_seconds_total)" -v b="$(fleet_counter tokens_predicted_seconds_total)" \
        'BEGIN { print a + b }'
}

RAW="$WORK/raw.tsv"
printf 'repeat\tworkload\tload\tpolicy\trate\trequests\tsucceeded\trejected\tfailed\tttft_p50\tttft_p99\te2e_p50\te2e_p99\trps\twall_s\tutilization\tttft_mean\tcached_share\n' >"$RAW"

# The gateway polls each backend's own load report (its /metrics) once a second and, until the
# next poll, counts the backend at least as busy as reported. That interval is part of the
# system's timing, so it is compressed like the backends' delays; left at 1 s, it would stand
# for 20 s of the real fleet and leave 1-slot backends idle behind stale reports.
GATEWAY_CONFIG="$WORK/gateway.toml"
printf '[health]\nload_interval_secs = %s\n[routing]\nprefill_rate = %s\ndecode_rate = %s\n' \
    "$(awk -v s="$TIME_SCALE" 'BEGIN { print 1 * s }')" \
    "$(awk -v s="$TIME_SCALE" -v r="$PREFILL_RATE" 'BEGIN { print r / s }')" \
    "$(awk -v s="$TIME_SCALE" -v r="$DECODE_RATE" 'BEGIN { print r / s }')" >"$GATEWAY_CONFIG"

run_one() {
    local repeat=$1 workload=$2 load=$3 policy=$4
    local name=${policy%%:*} slots=1 duration=$DURATION
    [[ $policy == *:slots=* ]] && slots=${policy##*:slots=}
    [ "$workload" = agent ] && duration=$AGENT_DURATION
    local rate json="$WORK/r$repeat-$workload-$load-${policy//[:=]/-}.json" backend_flags=() url
    for url in "${SIM_URLS[@]}"; do
        backend_flags+=(--backend "$url#slots=$slots")
    done
    rate=$(arrival_rate "$workload" "$load")
    wait_fleet_idle
    start_server "gateway-$repeat-$workload-$load-${policy//[:=]/-}" "$BIN/bitnet-gateway" \
        --config "$GATEWAY_CONFIG" --listen 127.0.0.1:0 --model "$MODEL" --policy "$name" \
        "${backend_flags[@]}"
    local gw_url=$SERVER_URL gw_pid=$SERVER_PID busy_before busy_after evaluated_before
    wait_ready "$gw_url/health"
    busy_before=$(busy_seconds)
    evaluated_before=$(fleet_counter prompt_tokens_total)
    # shellcheck disable=SC2046 # agent_flags' words are meant to split
    "$BIN/bitnet-loadtest" --url "$gw_url" --model "$MODEL" --workload "$workload" --stream \
        --rate "$rate" --duration "$duration" --drain 120 --seed "$repeat" \
        $(agent_flags "$workload" "$THINK_TIME") \
        --json "$json" -q >"$json.txt" 2>&1
    busy_after=$(busy_seconds)
    # The bitnet dialect reports no cached tokens, so the cached share is what the clients sent
    # (usage.prompt_tokens) less what the fleet evaluated (its llamacpp:prompt_tokens_total).
    local evaluated
    evaluated=$(awk -v a="$evaluated_before" -v b="$(fleet_counter prompt_tokens_total)" 'BEGIN { print b - a }')
    stop_server "$gw_pid"
    jq -r --arg r "$repeat" --arg w "$workload" --arg l "$load" --arg p "$policy" --arg rate "$rate" \
        --arg util "$(awk -v a="$busy_before" -v b="$busy_after" -v n="$BACKENDS" -v d="$duration" \
            'BEGIN { printf "%.3f", (b - a) / (n * d) }')" \
        --argjson evaluated "$evaluated" '
        .summary | [$r, $w, $l, $p, $rate, .requests, .succeeded,
          ((.statuses["429"] // 0) + (.statuses["503"] // 0) + .dropped_arrivals),
          .failed, .ttft_us.p50, .ttft_us.p99, .e2e_us.p50, .e2e_us.p99,
          .requests_per_s, .wall_secs, $util, .ttft_us.mean,
          (if .prompt_tokens > 0 then 1 - $evaluated / .prompt_tokens else 0 end)] | @tsv' "$json" >>"$RAW"
    log "repeat $repeat $workload $load% $policy: $(tail -1 "$RAW" | cut -f5-)"
}

LOAD_BEFORE=$(load_average)
STARTED=$(date +%s)
for repeat in $(seq 1 "$REPEATS"); do
    for workload in "${WORKLOADS[@]}"; do
        for load in "${LOADS[@]}"; do
            n=${#POLICIES[@]}
            for i in $(seq 0 $((n - 1))); do
                run_one "$repeat" "$workload" "$load" "${POLICIES[$(((i + repeat - 1) % n))]}"
            done
        done
    done
done
ELAPSED=$(($(date +%s) - STARTED))
LOAD_AFTER=$(load_average)

SECTION="$WORK/section.md"
{
    echo "## Routing policies on $BACKENDS BitNet-like backends"
    echo
    machine_markdown
    echo "- Load average before / after: $LOAD_BEFORE / $LOAD_AFTER (the machine is shared; other builds may have run at the same time). Wall time ${ELAPSED} s."
    echo "- $BACKENDS llama-sim backends, \`--dialect bitnet\` (1 slot; a prompt cache only for requests that ask for one, as the gateway may do for BitNet backends), $PREFILL_RATE tokens/s prompt evaluation, $DECODE_RATE tokens/s generation, **\`--time-scale $TIME_SCALE\`: every delay is multiplied by $TIME_SCALE**, so one wall-clock second stands for $(awk -v s="$TIME_SCALE" 'BEGIN { print 1 / s }') s of the real fleet. The gateway is told each backend has 1 slot, and polls the backends' load reports every $(awk -v s="$TIME_SCALE" 'BEGIN { print 1 * s }') s (its 1 s default, compressed alike); a fresh gateway serves each run."
    echo "- Policies: \`round-robin\` and \`least-loaded\` are the gateway's count-based policies; both skip a backend whose slots are all taken, so with 1-slot backends they choose among the same free backends. \`predicted-ttft\` routes each request to the backend and slot with the lowest predicted time to first token (the work queued on the slot plus the prompt it does not hold in cache, over the backend's prefill rate), told the fleet's rates compressed alike ($PREFILL_RATE and $DECODE_RATE tokens/s ÷ $TIME_SCALE) and calibrating them from the backends' timings. \`round-robin:slots=64\` is round-robin with the gateway told each backend has 64 slots: it deals requests out without regard to load and they queue inside the backends, as behind a plain reverse proxy."
    echo "- Streamed requests, Poisson arrivals for $DURATION s per run ($AGENT_DURATION s for agent, whose sessions take a while to build up), then up to 120 s for the last requests to finish. The agent workload runs sessions of $TURNS turns, re-sending the whole history, with $THINK_TIME s (2 s real) between turns and a $SYSTEM_PROMPT_CHARS-character system prompt, so that a whole conversation fits the 4,096-token context (the gateway refuses longer prompts with 400 rather than let the fork truncate them)."
    echo
    echo "Command:"
    echo
    echo '```sh'
    echo "POLICIES=\"${POLICIES[*]}\" WORKLOADS=\"${WORKLOADS[*]}\" LOADS=\"${LOADS[*]}\" TIME_SCALE=$TIME_SCALE DURATION=$DURATION AGENT_DURATION=$AGENT_DURATION SYSTEM_PROMPT_CHARS=$SYSTEM_PROMPT_CHARS REPEATS=$REPEATS loadtest/bench/routing.sh"
    echo '```'
    echo
    python3 - "$RAW" "$CAPACITY" "$TIME_SCALE" "$BACKENDS" "$PREFILL_RATE" "$DECODE_RATE" <<'PY'
import csv
import statistics
import sys

raw, capacity_path = sys.argv[1], sys.argv[2]
scale = float(sys.argv[3])
backends, prefill, decode = sys.argv[4], sys.argv[5], sys.argv[6]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
caps = list(csv.DictReader(open(capacity_path), delimiter="\t"))


def ordered(key):
    out = []
    for r in rows:
        if r[key] not in out:
            out.append(r[key])
    return out


workloads, loads, policies = ordered("workload"), ordered("load"), ordered("policy")
reps = ordered("repeat")
cell = {(r["repeat"], r["workload"], r["load"], r["policy"]): r for r in rows}


def med(values):
    return statistics.median(values) if values else float("nan")


def col(w, l, p, key):
    return [float(cell[(r, w, l, p)][key]) for r in reps if (r, w, l, p) in cell]


print("### Capacity")
print()
print(f"A zero-latency simulator in the bitnet dialect answered a calibration sample of each workload; from the")
print(f"token counts it reported, each request keeps a real backend's only slot busy for")
print(f"S = (prompt tokens − cached tokens) / {prefill} + completion tokens / {decode} seconds. With {backends} backends the fleet")
print(f"completes at most {backends} / S requests per second. This ignores prompt caching: through the gateway, which")
print(f"asks BitNet backends to cache prompts, repeated prefixes (the agent's shared system prompt, and its history when")
print(f"a turn lands on the backend that served the previous one) are not evaluated again, so the work actually done,")
print(f"shown as utilization below, can be well under the offered fraction.")
print()
print("| workload | sample | mean prompt tokens | mean cached | mean completion tokens | S (s, real) | fleet capacity (req/s, real) | requests per session | sessions/s at 70 % (compressed clock) | at 90 % |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for c in caps:
    s, fleet, k = float(c["service_s"]), float(c["fleet_req_s_real"]), float(c["session_requests"])
    print(
        f"| {c['workload']} | {c['requests']} | {float(c['prompt_mean']):.0f} | {float(c['cached_mean']):.0f} "
        f"| {float(c['completion_mean']):.0f} | {s:.2f} | {fleet:.3f} | {k:.0f} "
        f"| {fleet / scale * 0.7 / k:.3f} | {fleet / scale * 0.9 / k:.3f} |"
    )
print()
print("For example, the offered session rate on the compressed clock is capacity ÷ time scale × load ÷ requests per session.")
print()
print("### Results")
print()
print(f"Medians of {len(reps)} repeats. TTFT and E2E are given in **real-time seconds** (measured ÷ {scale}). Throughput is")
print("completed requests per second on the compressed clock. *Utilization* is the fleet's measured busy time (prompt")
print("evaluation + generation, from the backends' /metrics) over backends × arrival window: a check of the offered load.")
print("*Rejected* counts 429 and 503 answers (queue full or queue timeout) summed over the repeats; *failed* counts all failures.")
print("*Cached* is the share of the prompt tokens sent (the clients' usage.prompt_tokens) that the backends did not have to")
print("evaluate (their llamacpp:prompt_tokens_total counts only evaluated ones): what their slot caches saved. The last")
print("three columns compare with least-loaded in the same repeat (medians of the per-repeat ratios): how many times lower")
print("the mean and the p99 TTFT are (above 1 is better), and the throughput ratio.")
print()
print("| workload | load | policy | requests | rejected | failed | TTFT mean (s) | TTFT p50 (s) | TTFT p99 (s) | E2E p50 (s) | E2E p99 (s) | throughput (req/s) | utilization | cached | TTFT p99 vs round-robin | TTFT mean: least-loaded ÷ this | TTFT p99: least-loaded ÷ this | throughput ÷ least-loaded |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for w in workloads:
    for l in loads:
        for p in policies:
            if not col(w, l, p, "requests"):
                continue
            rel = []
            for r in reps:
                a, b = cell.get((r, w, l, p)), cell.get((r, w, l, "round-robin"))
                if a and b and float(b["ttft_p99"]) > 0:
                    rel.append(float(a["ttft_p99"]) / float(b["ttft_p99"]))
            rel_cell = f"{med(rel):.2f}" if rel else "—"

            def vs_ll(key, invert):
                out = []
                for r in reps:
                    a, b = cell.get((r, w, l, p)), cell.get((r, w, l, "least-loaded"))
                    if a and b and float(a[key]) > 0 and float(b[key]) > 0:
                        x, y = float(a[key]), float(b[key])
                        out.append(y / x if invert else x / y)
                return f"{med(out):.2f}" if out else "—"

            sec = lambda key: med(col(w, l, p, key)) / 1e6 / scale
            print(
                f"| {w} | {l} % | {p} | {med(col(w, l, p, 'requests')):.0f} | {sum(col(w, l, p, 'rejected')):.0f} "
                f"| {sum(col(w, l, p, 'failed')):.0f} | {sec('ttft_mean'):.1f} | {sec('ttft_p50'):.1f} | {sec('ttft_p99'):.1f} "
                f"| {sec('e2e_p50'):.1f} | {sec('e2e_p99'):.1f} | {med(col(w, l, p, 'rps')):.2f} "
                f"| {med(col(w, l, p, 'utilization')) * 100:.0f} % | {med(col(w, l, p, 'cached_share')) * 100:.0f} % | {rel_cell} "
                f"| {vs_ll('ttft_mean', True)} | {vs_ll('ttft_p99', True)} | {vs_ll('rps', False)} |"
            )
PY
} >"$SECTION"
write_section routing "$SECTION"
cat "$SECTION"
