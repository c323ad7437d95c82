#!/usr/bin/env bash
# Does the gateway lose nothing, and stay flat in memory and descriptors, under long mixed
# traffic with misbehaving clients and a backend that crashes?
#
# bitnet-runner keeps INSTANCES llama-sim backends alive (llama.cpp dialect, SLOTS slots each,
# delays scaled by TIME_SCALE so that answers take 0.1-1 s) and bitnet-gateway follows the
# runner's control API. For DURATION seconds, at the same time:
#   - one bitnet-loadtest sends streamed requests: short chats and multi-turn agent sessions;
#   - one bitnet-loadtest sends non-streamed short chats;
#   - a small client sends streamed and non-streamed requests and walks away from them: after
#     the first chunk (half of them with a TCP reset), before any answer, or mid-wait;
#   - at CRASH_AT seconds one backend is killed with SIGKILL while it holds requests, and the
#     runner starts a new one, which the gateway picks up.
# Every SAMPLE_EVERY seconds the gateway's RSS (VmRSS), open descriptors and threads are
# sampled, and once a second for IDLE_SECS before and after the load. At the end the
# gateway's /metrics and log are read, and the outcome of every request is counted.
#
# "Lost" is a request the gateway took that did not end in a complete answer, except the
# streams that were relaying from the killed backend at the moment of the crash: by design
# those end with an `upstream_stream_broken` error event (bytes already reached the client,
# so they cannot be retried) and are counted apart as "cut by the crash". Everything else
# counts as lost: transport errors, truncated bodies, timeouts, any 4xx/5xx (429/503 too, since
# the offered load stays well under capacity), error events naming another backend, requests
# still running when the drain period ended, and non-200 answers to the disconnecting client.
# Requests the disconnecting client abandons on purpose are not failures.
#
# Usage: loadtest/bench/soak.sh
# Knobs (environment): DURATION (600), INSTANCES (3), SLOTS (4), TIME_SCALE (0.05),
# STREAM_RATE (4 sessions/s), PLAIN_RATE (6 requests/s), DISCONNECT_PAUSE (0.2 s),
# SAMPLE_EVERY (5 s), WARMUP (30 s), CRASH_AT (DURATION / 2), DRAIN (60 s), IDLE_SECS (10 s).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DURATION=${DURATION:-600}
INSTANCES=${INSTANCES:-3}
SLOTS=${SLOTS:-4}
TIME_SCALE=${TIME_SCALE:-0.05}
STREAM_RATE=${STREAM_RATE:-4}
PLAIN_RATE=${PLAIN_RATE:-6}
DISCONNECT_PAUSE=${DISCONNECT_PAUSE:-0.2}
SAMPLE_EVERY=${SAMPLE_EVERY:-5}
WARMUP=${WARMUP:-30}
CRASH_AT=${CRASH_AT:-$((DURATION / 2))}
DRAIN=${DRAIN:-60}
IDLE_SECS=${IDLE_SECS:-10}
MODEL=soak
# The shared system prompt of the agent sessions, in characters; small enough that a whole
# five-turn history fits the simulator's 4,096-token context.
AGENT_PROMPT_CHARS=2000

[ "$DURATION" -gt $((WARMUP + 4 * SAMPLE_EVERY)) ] || {
    echo "DURATION must leave room for WARMUP and a few samples" >&2
    exit 2
}
[ "$CRASH_AT" -gt 0 ] && [ "$CRASH_AT" -lt "$DURATION" ] || {
    echo "CRASH_AT must fall inside the run" >&2
    exit 2
}

ensure_binaries
# The runner is not part of ensure_binaries' set; build and copy it the same way.
if [ ! -x "$ROOT/target/release/bitnet-runner" ] || [ "${BENCH_REBUILD:-0}" = 1 ]; then
    log "building bitnet-runner"
    (cd "$ROOT" && cargo build --release -p backend-runner)
fi
cp "$ROOT/target/release/bitnet-runner" "$BIN/bitnet-runner"
raise_fd_limit

# The simulator never reads the model file, but the runner insists that it exists.
: >"$WORK/model.gguf"
start_server runner "$BIN/bitnet-runner" --llama-server "$BIN/llama-sim" --model "$WORK/model.gguf" \
    --instances "$INSTANCES" --base-port 0 --control 127.0.0.1:0 --threads 1 --parallel "$SLOTS" \
    -- --alias "$MODEL" --time-scale "$TIME_SCALE"
RUNNER_URL=$SERVER_URL
RUNNER_PID=$SERVER_PID
start_server gateway "$BIN/bitnet-gateway" --listen 127.0.0.1:0 --runner "$RUNNER_URL" \
    --model "$MODEL" --log-format json
GW_URL=$SERVER_URL
GW_PID=$SERVER_PID

# backends_up : how many backends the gateway routes to now.
backends_up() {
    curl -fsS --max-time 2 "$GW_URL/health" | jq '[.backends[] | select(.state == "up")] | length'
}
tries=0
until [ "$(backends_up 2>/dev/null || echo 0)" = "$INSTANCES" ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 300 ] || { echo "the gateway never saw $INSTANCES backends up" >&2; exit 1; }
    sleep 0.1
done
log "gateway $GW_URL follows runner $RUNNER_URL with $INSTANCES backends up"

# The disconnecting client: raw sockets, so that it can leave at exactly the chosen moment.
cat >"$WORK/disconnect.py" <<'PY'
import json
import random
import socket
import struct
import sys
import time

url, model, duration, pause, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
host, port = url.removeprefix("http://").rsplit(":", 1)
port = int(port)
rng = random.Random(7)
modes = ["stream_after_first_chunk", "stream_before_answer", "plain_before_answer"]
tally = {m: {"sent": 0, "abandoned": 0, "statuses": {}, "failures": [], "cut_by_crash": 0} for m in modes}


def send(i, stream):
    body = json.dumps({
        "model": model,
        "stream": stream,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"request {i}: how do ternary weights save memory?"}],
    }).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(head + body)
    return s


def leave(s, reset):
    if reset:
        # SO_LINGER with a zero timeout turns close() into a TCP reset.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


deadline = time.monotonic() + duration
i = 0
while time.monotonic() < deadline:
    mode = modes[i % len(modes)]
    t = tally[mode]
    t["sent"] += 1
    try:
        if mode == "stream_after_first_chunk":
            s = send(i, True)
            buf = b""
            while b"\r\n\r\n" not in buf or b"data:" not in buf.split(b"\r\n\r\n", 1)[1]:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            status = buf.split(b" ", 2)[1].decode() if buf.startswith(b"HTTP/") else "none"
            t["statuses"][status] = t["statuses"].get(status, 0) + 1
            first = buf.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in buf else b""
            if status != "200":
                t["failures"].append(f"status {status}: {first[:200]!r}")
            elif b"upstream_stream_broken" in first:
                t["cut_by_crash"] += 1
            elif b'"error"' in first[:400] or b"data:" not in first:
                t["failures"].append(f"first chunk: {first[:200]!r}")
            else:
                t["abandoned"] += 1
            leave(s, reset=(i // len(modes)) % 2 == 1)
        elif mode == "stream_before_answer":
            s = send(i, True)
            time.sleep(rng.uniform(0.0, 0.03))
            leave(s, reset=False)
            t["abandoned"] += 1
        else:
            s = send(i, False)
            time.sleep(rng.uniform(0.02, 0.1))
            leave(s, reset=False)
            t["abandoned"] += 1
    except OSError as e:
        t["failures"].append(f"{type(e).__name__}: {e}")
    i += 1
    time.sleep(pause)

json.dump(tally, open(out, "w"), indent=1)
PY

# sample SECONDS_SINCE_START : one line of $SAMPLES about the gateway process.
SAMPLES="$WORK/samples.tsv"
printf 't_s\trss_kib\tfds\tsockets\tthreads\n' >"$SAMPLES"
sample() {
    local rss threads fds sockets
    [ -r "/proc/$GW_PID/status" ] || {
        echo "the gateway (pid $GW_PID) exited during the run; the end of its log:" >&2
        tail -20 "$WORK/gateway.err" >&2
        exit 1
    }
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$GW_PID/status")
    threads=$(awk '/^Threads:/ { print $2 }' "/proc/$GW_PID/status")
    # A descriptor closed between find's listing and its look at the entry makes find fail,
    # which under pipefail would end the run without a word; the count of what was listed
    # stands.
    fds=$( { find "/proc/$GW_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null || true; } | wc -l)
    sockets=$( { find "/proc/$GW_PID/fd" -mindepth 1 -maxdepth 1 -lname 'socket:*' 2>/dev/null || true; } | wc -l)
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$rss" "$fds" "$sockets" "$threads" >>"$SAMPLES"
}

# crash : SIGKILL the ready backend that holds the most requests (waiting up to 3 s for one
# that holds at least two), and write what was killed to $WORK/crash.json.
crash() {
    local health instances victim="" best=0 tries=0 backend inflight
    while [ "$tries" -lt 30 ]; do
        # /health lists every backend with its requests in flight, whatever its own status.
        health=$(curl -sS --max-time 2 "$GW_URL/health")
        read -r backend inflight < <(jq -r '[.backends[] | select(.state == "up")] | max_by(.inflight) | "\(.name) \(.inflight)"' <<<"$health")
        if [ "$inflight" -gt "$best" ] || [ -z "$victim" ]; then
            victim=$backend
            best=$inflight
        fi
        [ "$inflight" -lt 2 ] || break
        sleep 0.1
        tries=$((tries + 1))
    done
    instances=$(curl -fsS --max-time 2 "$RUNNER_URL/instances")
    jq --arg b "$victim" --argjson inflight "$best" --arg t "$(($(date +%s) - LOAD_STARTED))" \
        '.instances[] | select(.url == "http://\($b)") | {name, pid, backend: $b, inflight: $inflight, at_s: ($t | tonumber)}' \
        <<<"$instances" >"$WORK/crash.json"
    local pid
    pid=$(jq -r .pid "$WORK/crash.json")
    [ -n "$pid" ] && [ "$pid" != null ] || { echo "no runner instance serves $victim" >&2; return 1; }
    kill -KILL "$pid"
    log "killed backend $(jq -r .name "$WORK/crash.json") ($victim, pid $pid) holding $best requests"
}

# restarted : prints a JSON object with the victim's state in the runner and the gateway.
restarted() {
    local name
    name=$(jq -r .name "$WORK/crash.json")
    curl -fsS --max-time 2 "$RUNNER_URL/instances" | jq -c --arg n "$name" '.instances[] | select(.name == $n)'
}

# idle_samples FILE : one sample a second for IDLE_SECS seconds into FILE. The idle figures
# are the smallest of them: the health probes open a pooled connection to each backend every
# few seconds, which the pool drops 4 s later, so a single sample may catch them or not.
idle_samples() {
    local i
    for i in $(seq 1 "$IDLE_SECS"); do
        sample "-$i"
        tail -1 "$SAMPLES" >>"$1"
        sleep 1
    done
}

STARTED=$(date +%s)
LOAD_BEFORE=$(load_average)
GW_CPU_BEFORE=$(cpu_seconds "$GW_PID")
idle_samples "$WORK/idle-before.tsv"
IDLE_FDS_BEFORE=$(cut -f3 "$WORK/idle-before.tsv" | sort -n | head -1)
IDLE_RSS_BEFORE=$(cut -f2 "$WORK/idle-before.tsv" | sort -n | head -1)

LOAD_STARTED=$(date +%s)
"$BIN/bitnet-loadtest" --url "$GW_URL" --model "$MODEL" --workload mix:short-chat=70,agent=30 \
    --stream --rate "$STREAM_RATE" --duration "$DURATION" --drain "$DRAIN" --timeout 120 --seed 1 \
    --think-time 0.5 --system-prompt-chars "$AGENT_PROMPT_CHARS" --json "$WORK/stream.json" -q \
    >"$WORK/stream.txt" 2>&1 &
STREAM_GEN=$!
CHILD_PIDS+=("$STREAM_GEN")
"$BIN/bitnet-loadtest" --url "$GW_URL" --model "$MODEL" --workload short-chat \
    --rate "$PLAIN_RATE" --duration "$DURATION" --drain "$DRAIN" --timeout 120 --seed 2 \
    --json "$WORK/plain.json" -q >"$WORK/plain.txt" 2>&1 &
PLAIN_GEN=$!
CHILD_PIDS+=("$PLAIN_GEN")
python3 "$WORK/disconnect.py" "$GW_URL" "$MODEL" "$DURATION" "$DISCONNECT_PAUSE" "$WORK/disconnect.json" \
    >"$WORK/disconnect.txt" 2>&1 &
DISCONNECT_CLIENT=$!
CHILD_PIDS+=("$DISCONNECT_CLIENT")
log "load started for $DURATION s; crash at $CRASH_AT s"

crashed=0
back_at=""
next_sample=$SAMPLE_EVERY
hard_stop=$((DURATION + DRAIN + 120))
while kill -0 "$STREAM_GEN" 2>/dev/null || kill -0 "$PLAIN_GEN" 2>/dev/null || kill -0 "$DISCONNECT_CLIENT" 2>/dev/null; do
    now=$(($(date +%s) - LOAD_STARTED))
    [ "$now" -lt "$hard_stop" ] || { echo "load generators still running after $hard_stop s" >&2; exit 1; }
    if [ "$crashed" = 0 ] && [ "$now" -ge "$CRASH_AT" ]; then
        crash
        crashed=1
    fi
    if [ "$crashed" = 1 ] && [ -z "$back_at" ]; then
        state=$(restarted || true)
        if [ "$(jq -r .state <<<"$state")" = ready ] && [ "$(jq -r .restarts <<<"$state")" -ge 1 ] &&
            [ "$(backends_up 2>/dev/null || echo 0)" = "$INSTANCES" ]; then
            back_at=$now
            printf '%s\n' "$state" >"$WORK/restarted.json"
            log "backend restarted and routed to again $((back_at - $(jq -r .at_s "$WORK/crash.json"))) s after the crash"
        fi
    fi
    if [ "$now" -ge "$next_sample" ]; then
        sample "$now"
        next_sample=$((next_sample + SAMPLE_EVERY))
    fi
    sleep 0.5
done
LOAD_SECS=$(($(date +%s) - LOAD_STARTED))
gen_status=0
wait "$STREAM_GEN" || gen_status=$?
wait "$PLAIN_GEN" || gen_status=$?
wait "$DISCONNECT_CLIENT" || { echo "the disconnecting client failed:" >&2; cat "$WORK/disconnect.txt" >&2; exit 1; }
[ "$gen_status" = 0 ] || { echo "a load generator failed:" >&2; cat "$WORK/stream.txt" "$WORK/plain.txt" >&2; exit 1; }
[ -s "$WORK/crash.json" ] || { echo "the crash never happened" >&2; exit 1; }

# Let connections the clients closed be torn down, and the pool's idle ones expire, before
# the idle figures are taken.
sleep 5
idle_samples "$WORK/idle-after.tsv"
IDLE_FDS_AFTER=$(cut -f3 "$WORK/idle-after.tsv" | sort -n | head -1)
IDLE_RSS_AFTER=$(cut -f2 "$WORK/idle-after.tsv" | sort -n | head -1)
GW_CPU_AFTER=$(cpu_seconds "$GW_PID")
curl -fsS --max-time 5 "$GW_URL/metrics" >"$WORK/metrics.txt"
curl -fsS --max-time 5 "$GW_URL/health" >"$WORK/health.json"
curl -fsS --max-time 5 "$RUNNER_URL/instances" >"$WORK/instances.json"
[ -s "$WORK/restarted.json" ] || restarted >"$WORK/restarted.json"
ls -l "/proc/$GW_PID/fd" >"$WORK/fds-after.txt" 2>/dev/null || true
stop_server "$GW_PID"
stop_server "$RUNNER_PID"
LOAD_AFTER=$(load_average)
ELAPSED=$(($(date +%s) - STARTED))

SECTION="$WORK/section.md"
{
    echo "## Soak: mixed load, disconnects and a backend crash"
    echo
    machine_markdown
    echo "- Load average before / after: $LOAD_BEFORE / $LOAD_AFTER (the machine is shared; other benchmarks and builds may have run at the same time). Wall time ${ELAPSED} s."
    echo "- bitnet-runner keeps $INSTANCES llama-sim backends (llama.cpp dialect, $SLOTS slots each, delays × $TIME_SCALE) alive; bitnet-gateway follows its control API."
    echo "- Load for $DURATION s, all at once: streamed \`mix:short-chat=70,agent=30\` sessions at $STREAM_RATE/s (agent sessions: 5 turns, 0.5 s think time), non-streamed short chats at $PLAIN_RATE/s, and a client that abandons a request every ~$DISCONNECT_PAUSE s (after the first chunk, half of them with a TCP reset; before any answer; or while waiting for a non-streamed answer). Requests still running $DRAIN s after the end count as lost."
    echo
    echo "Command:"
    echo
    echo '```sh'
    echo "DURATION=$DURATION INSTANCES=$INSTANCES SLOTS=$SLOTS TIME_SCALE=$TIME_SCALE STREAM_RATE=$STREAM_RATE PLAIN_RATE=$PLAIN_RATE CRASH_AT=$CRASH_AT WARMUP=$WARMUP loadtest/bench/soak.sh"
    echo '```'
    echo
    python3 - "$WORK" "$WARMUP" "$DURATION" "$LOAD_SECS" "$IDLE_FDS_BEFORE" "$IDLE_FDS_AFTER" \
        "$IDLE_RSS_BEFORE" "$IDLE_RSS_AFTER" "$GW_CPU_BEFORE" "$GW_CPU_AFTER" "${back_at:-}" <<'PY'
import collections
import json
import re
import statistics
import sys

work = sys.argv[1]
warmup, duration, load_secs = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
idle_fds_before, idle_fds_after = int(sys.argv[5]), int(sys.argv[6])
idle_rss_before, idle_rss_after = int(sys.argv[7]), int(sys.argv[8])
cpu = float(sys.argv[10]) - float(sys.argv[9])
back_at = sys.argv[11]

crash = json.load(open(f"{work}/crash.json"))
victim = crash["backend"]
restarted = json.load(open(f"{work}/restarted.json"))

# Outcome of every generated request.
outcomes = collections.Counter()
lost_examples = collections.Counter()
by_gen = {}
for gen in ["stream", "plain"]:
    run = json.load(open(f"{work}/{gen}.json"))
    c = collections.Counter()
    for r in run["records"]:
        err, msg = r.get("error"), r.get("error_message") or ""
        if err is None:
            kind = "complete"
        elif err == "mid_stream" and "failed in the middle of the response" in msg and victim in msg:
            kind = "cut by the crash"
        else:
            kind = f"lost: {err}"
            lost_examples[f"{gen}: {err}: {msg[:120]}"] += 1
        c[kind] += 1
    c["arrivals dropped by the generator"] = run["summary"].get("dropped_arrivals", 0)
    by_gen[gen] = c
    outcomes.update(c)

dis = json.load(open(f"{work}/disconnect.json"))
dis_sent = sum(m["sent"] for m in dis.values())
dis_abandoned = sum(m["abandoned"] for m in dis.values())
dis_cut = sum(m["cut_by_crash"] for m in dis.values())
dis_failures = [f for m in dis.values() for f in m["failures"]]
for f in dis_failures:
    lost_examples[f"disconnecting client: {f[:120]}"] += 1

gen_lost = sum(v for k, v in outcomes.items() if k.startswith("lost"))
lost = gen_lost + len(dis_failures)
cut = outcomes["cut by the crash"] + dis_cut

# Gateway metrics: sum each family over its labels, and per label value where it matters.
metrics = collections.defaultdict(float)
by_label = collections.defaultdict(float)
for line in open(f"{work}/metrics.txt"):
    if line.startswith("#") or not line.strip():
        continue
    m = re.match(r"^([a-zA-Z_:]+)(\{(.*)\})? ([^ ]+)", line)
    if not m:
        continue
    name, labels, value = m.group(1), m.group(3) or "", float(m.group(4))
    metrics[name] += value
    for key in ["status", "kind", "reason"]:
        lm = re.search(rf'{key}="([^"]*)"', labels)
        if lm:
            by_label[(name, key, lm.group(1))] += value
    bm = re.search(r'backend="([^"]*)"', labels)
    if bm and bm.group(1) == victim:
        by_label[(name, "victim", "")] += value


def labelled(name, key):
    items = sorted((k[2], v) for k, v in by_label.items() if k[0] == name and k[1] == key)
    return ", ".join(f"{k or '(none)'}: {v:.0f}" for k, v in items) or "none"


# Gateway log: warnings and errors grouped by message, and how the logged requests ended.
levels = collections.Counter()
messages = collections.Counter()
endings = collections.Counter()
# Short chats are answered with 64 tokens; a response that carried all of them and still
# ended as ClientGone reached the client in full.
full_but_gone = 0
for line in open(f"{work}/gateway.err", errors="replace"):
    try:
        ev = json.loads(line)
    except ValueError:
        continue
    level = str(ev.get("level", "")).upper()
    if ev.get("fields", {}).get("message") == "request":
        endings[str(ev["fields"].get("ending"))] += 1
        if ev["fields"].get("ending") == "ClientGone" and ev["fields"].get("completion_tokens", 0) >= 64:
            full_but_gone += 1
    if level in ("WARN", "ERROR"):
        levels[level] += 1
        fields = ev.get("fields", {})
        messages[f"{level} {fields.get('message', '')}"] += 1

# Resource samples: start = median of the first minute after warm-up, end = median of the
# last minute of load; single samples swing with the requests in flight at that instant.
rows = [r.split("\t") for r in open(f"{work}/samples.tsv").read().splitlines()[1:]]
samples = [(int(t), int(rss), int(fds), int(sk), int(th)) for t, rss, fds, sk, th in rows]
idle = [s for s in samples if s[0] < 0]
under_load = [s for s in samples if warmup <= s[0] <= duration]
window = min(60, max((duration - warmup) // 4, 1))
first = [s for s in under_load if s[0] < warmup + window]
last = [s for s in under_load if s[0] > duration - window]
mib = lambda kib: kib / 1024
rss_start = statistics.median(s[1] for s in first)
rss_end = statistics.median(s[1] for s in last)
rss_med = statistics.median(s[1] for s in under_load)
rss_max = max(s[1] for s in under_load)
fds_start = statistics.median(s[2] for s in first)
fds_end = statistics.median(s[2] for s in last)
fds_max = max(s[2] for s in under_load)
rss_growth = (rss_end - rss_start) / rss_start * 100
# A leak of even one descriptor per thousand requests would add several over a run; the
# slack covers connections that happen to be open at the sampling instant.
fd_slack = 4
fd_growth = idle_fds_after - idle_fds_before

requests_total = sum(v for k, v in outcomes.items() if k != "arrivals dropped by the generator") + dis_sent

print(f"Gateway figures from /proc and from its own /metrics; load ran {load_secs} s including the drain. "
      f"Resource *start* is the median of the samples in the first {window} s after a {warmup} s warm-up, *end* the median "
      f"of the last {window} s of load; one sample every few seconds, {len(under_load)} under load.")
print()
print("### Requests")
print()
print("| source | outcome | requests |")
print("|---|---|---:|")
for gen, label in [("stream", "streamed (short chat + agent)"), ("plain", "non-streamed short chat")]:
    for kind, n in sorted(by_gen[gen].items()):
        if n or kind == "complete":
            print(f"| {label} | {kind} | {n} |")
print(f"| disconnecting client | abandoned on purpose | {dis_abandoned} |")
if dis_cut:
    print(f"| disconnecting client | cut by the crash | {dis_cut} |")
print(f"| disconnecting client | lost (non-200 or transport error) | {len(dis_failures)} |")
print()
print(f"- Requests sent: {requests_total}; cut by the crash: {cut}; **lost: {lost}** (target 0: {'met' if lost == 0 else 'not met'}).")
print(f"- Crash at {crash['at_s']} s: SIGKILL of backend `{crash['name']}` ({victim}, pid {crash['pid']}) while the gateway counted "
      f"{crash['inflight']} requests on it. The runner restarted it (restarts {restarted.get('restarts')}, last exit `{restarted.get('last_exit')}`, "
      f"now {restarted.get('url')}, {restarted.get('state')})"
      + (f"; the gateway routed to all backends again {int(back_at) - crash['at_s']} s after the crash." if back_at else "; the gateway did not route to it again before the end."))
if lost_examples:
    print("- Lost requests, by error:")
    for msg, n in lost_examples.most_common(8):
        print(f"  - {n} × `{msg}`")
print()
print("### Gateway resources")
print()
print("| figure | idle before load | start | median | max | end | idle after load |")
print("|---|---:|---:|---:|---:|---:|---:|")
print(f"| RSS MiB | {mib(idle_rss_before):.1f} | {mib(rss_start):.1f} | {mib(rss_med):.1f} | {mib(rss_max):.1f} | {mib(rss_end):.1f} | {mib(idle_rss_after):.1f} |")
print(f"| open fds | {idle_fds_before} | {fds_start:.0f} | {statistics.median(s[2] for s in under_load):.0f} | {fds_max} | {fds_end:.0f} | {idle_fds_after} |")
print(f"| threads | {idle[0][4]} | {statistics.median(s[4] for s in first):.0f} | {statistics.median(s[4] for s in under_load):.0f} | {max(s[4] for s in under_load)} | {statistics.median(s[4] for s in last):.0f} | {idle[-1][4]} |")
print()
print(f"- Idle figures are the smallest of {len(idle) // 2} samples taken once a second before the load and again 5 s after it.")
print("- Every 30 s under load, RSS MiB / open fds: " + ", ".join(
    f"{s[0]} s: {mib(s[1]):.1f} / {s[2]}" for s in samples if s[0] >= 0 and s[0] <= duration and s[0] % 30 < 5))
print(f"- Gateway CPU {cpu:.1f} s (user + system) over the run.")
print(f"- RSS end vs start: **{rss_growth:+.1f} %** (target within ±10 %: {'met' if abs(rss_growth) <= 10 else 'not met'}).")
print(f"- Open fds idle after load vs idle before: **{fd_growth:+d}** (target: no growth: {'met' if fd_growth <= 0 else 'not met'}). "
      f"Under load they count the connections open at the sampling instant, so end vs start ({fds_end - fds_start:+.0f}) follows the traffic "
      f"rather than leaks; a leak of one descriptor per thousand requests would still show in the idle figures.")
print()
print("### Gateway /metrics at the end")
print()
print(f"- `bitnet_gateway_requests_total` by status: {labelled('bitnet_gateway_requests_total', 'status')}")
disconnects = metrics["bitnet_gateway_client_disconnects_total"]
plain_complete = by_gen["plain"]["complete"]
print(f"- `bitnet_gateway_client_disconnects_total`: {disconnects:.0f}; the clients abandoned at most {dis_abandoned + dis_cut} responses"
      + (f". **The metric counts {disconnects - dis_abandoned - dis_cut:.0f} more disconnects than clients made**; the load generator "
         f"read {plain_complete} non-streamed answers in full, and the access log has {full_but_gone} responses that carried a whole "
         f"64-token answer yet ended as `ClientGone`."
         if disconnects > dis_abandoned + dis_cut else "."))
unlogged = requests_total - sum(endings.values())
left_early = dis["stream_before_answer"]["sent"] + dis["plain_before_answer"]["sent"]
print(f"- Access log: {sum(endings.values())} requests logged, by ending: " + ", ".join(f"{k}: {v}" for k, v in sorted(endings.items()))
      + f". Not logged: {unlogged}"
      + (f", within the {left_early} the disconnecting client abandoned before any answer (a request whose client left before its response head is logged as \"client went away before the response\" and counted with status 499, not with an ending)."
         if 0 <= unlogged <= left_early else f", **more than the {left_early} the disconnecting client abandoned before any answer**."))
print(f"- `bitnet_gateway_upstream_errors_total` by kind: {labelled('bitnet_gateway_upstream_errors_total', 'kind')}; "
      f"on the killed backend: {by_label[('bitnet_gateway_upstream_errors_total', 'victim', '')]:.0f}")
print(f"- `bitnet_gateway_retries_total`: {metrics['bitnet_gateway_retries_total']:.0f} (requests moved to another backend before their first byte)")
print(f"- `bitnet_gateway_queue_rejected_total`: {metrics['bitnet_gateway_queue_rejected_total']:.0f}")
if "process_open_fds" in metrics:
    print(f"- `process_open_fds` {metrics['process_open_fds']:.0f}, `process_resident_memory_bytes` {metrics['process_resident_memory_bytes'] / 1048576:.1f} MiB (after load)")
print(f"- Gateway log: {levels['WARN']} warnings, {levels['ERROR']} errors" + (":" if messages else "."))
for msg, n in messages.most_common(8):
    print(f"  - {n} × {msg}")
PY
} >"$SECTION"
write_section soak "$SECTION"
cat "$SECTION"
