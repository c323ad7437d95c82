# shellcheck shell=bash
# Shared by the benchmark scripts in this directory; source it, do not run it.
#
# It gives every script the same guarantees: release binaries exist, every process it starts
# listens on loopback and is killed when the script ends (normally, on error or on Ctrl-C),
# and results land in one marked section of BENCHMARKS.md that a rerun replaces.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/../.." && pwd)
BIN="$ROOT/target/release"
BENCHMARKS_MD=${BENCHMARKS_MD:-"$ROOT/BENCHMARKS.md"}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bitnet-bench.XXXXXX")
CHILD_PIDS=()

bench_cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${CHILD_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # Give the gateway its graceful exit, then make sure nothing outlives the script.
    for pid in "${CHILD_PIDS[@]}"; do
        local waited=0
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 30 ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "${KEEP_WORK:-0}" = 1 ]; then
        echo "work files kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() {
    printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

# Builds the relays that stand for the floors (loadtest/bench/hyper-relay: hyper-relay and
# byte-relay) and copies them beside the other binaries in $WORK/bin. Call after
# ensure_binaries, which makes that folder.
build_relays() {
    log "building hyper-relay and byte-relay"
    (cd "$BENCH_DIR/hyper-relay" && CARGO_TARGET_DIR="$ROOT/target" cargo build --release --locked -q)
    cp "$ROOT/target/release/hyper-relay" "$ROOT/target/release/byte-relay" "$WORK/bin/"
}

# Builds the three binaries once if any is missing. Set BENCH_REBUILD=1 to rebuild anyway,
# e.g. after changing the gateway.
ensure_binaries() {
    local missing=0 b
    for b in bitnet-gateway llama-sim bitnet-loadtest; do
        [ -x "$BIN/$b" ] || missing=1
    done
    if [ "$missing" = 1 ] || [ "${BENCH_REBUILD:-0}" = 1 ]; then
        log "building release binaries"
        (cd "$ROOT" && cargo build --release -p gateway -p loadtest)
    fi
    # Run from a private copy: a build in the same checkout during the benchmark would
    # otherwise swap binaries between two runs that are meant to be compared.
    BUILT_AT=$(date -u -r "$BIN/bitnet-gateway" '+%Y-%m-%d %H:%M UTC')
    mkdir -p "$WORK/bin"
    for b in bitnet-gateway llama-sim bitnet-loadtest; do
        cp "$BIN/$b" "$WORK/bin/$b"
    done
    BIN="$WORK/bin"
    if [ -n "${CANDIDATE:-}" ]; then
        [ -x "$CANDIDATE" ] || {
            echo "CANDIDATE=$CANDIDATE is not an executable file" >&2
            exit 1
        }
        CANDIDATE_BUILT_AT=$(date -u -r "$CANDIDATE" '+%Y-%m-%d %H:%M UTC')
        cp "$CANDIDATE" "$BIN/candidate-gateway"
    fi
}

# CANDIDATE=FILE names a second bitnet-gateway binary, e.g. one built with a change under
# trial. proxy-overhead.sh and fanout.sh then run it beside the checkout's gateway, with the
# same WORKERS, as paths named candidate-wN, so that the change is judged against the code it
# would replace within one run, under the same machine noise. Such a run is an experiment:
# BENCHMARKS.md is left alone and the section goes to target/bench-NAME-candidate.md.
#
# gateway_binary PATH : the binary a gateway path (gateway-wN or candidate-wN) runs.
gateway_binary() {
    case $1 in
        candidate-w*) echo "$BIN/candidate-gateway" ;;
        *) echo "$BIN/bitnet-gateway" ;;
    esac
}

# start_server NAME CMD... : starts CMD in the background with its stdout in $WORK/NAME.out
# and stderr in $WORK/NAME.err, waits for its "listening on http://ADDR" line and sets
# SERVER_URL and SERVER_PID. The process is killed when the script exits.
start_server() {
    local name=$1
    shift
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    SERVER_PID=$!
    CHILD_PIDS+=("$SERVER_PID")
    local tries=0
    SERVER_URL=""
    while [ -z "$SERVER_URL" ]; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "$name exited before listening; stderr:" >&2
            tail -20 "$WORK/$name.err" >&2
            return 1
        fi
        if [ "$tries" -ge 200 ]; then
            echo "$name did not print its address within 20 s" >&2
            return 1
        fi
        SERVER_URL=$(grep -o 'listening on http://[0-9.:]*' "$WORK/$name.out" 2>/dev/null | head -1 | sed 's/^listening on //') || true
        [ -n "$SERVER_URL" ] || { sleep 0.1; tries=$((tries + 1)); }
    done
}

# stop_server PID : stops one server started by start_server and forgets it.
stop_server() {
    local pid=$1 waited=0 kept=() p
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 50 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${CHILD_PIDS[@]}"; do
        [ "$p" = "$pid" ] || kept+=("$p")
    done
    CHILD_PIDS=("${kept[@]+"${kept[@]}"}")
}

# wait_ready URL : polls URL until it answers 200 (the gateway marks backends up after a probe).
wait_ready() {
    local url=$1 tries=0
    until curl -fsS -o /dev/null --max-time 1 "$url"; do
        tries=$((tries + 1))
        [ "$tries" -lt 100 ] || { echo "$url never became ready" >&2; return 1; }
        sleep 0.1
    done
}

# The CPU time (user + system) a process has used so far, in seconds.
cpu_seconds() {
    local ticks
    ticks=$(getconf CLK_TCK)
    # Fields 14 and 15 of /proc/PID/stat, counted after the parenthesised command name.
    sed 's/^.*) //' "/proc/$1/stat" | awk -v hz="$ticks" '{ printf "%.3f\n", ($12 + $13) / hz }'
}

# Seconds the machine's CPUs have spent idle (or waiting on I/O) and stolen by the
# hypervisor since boot, summed over CPUs: "IDLE STEAL". Over a run, idle time is capacity no
# process used, so a closed-loop throughput gap can be split into CPU spent and CPU left idle.
machine_idle_steal_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '/^cpu / { printf "%.3f %.3f\n", ($5 + $6) / hz, $9 / hz }' /proc/stat
}

# Seconds the threads of a process have spent runnable but waiting for a CPU, summed over
# its threads since each started (the second field of /proc/PID/task/TID/schedstat). Over a
# run it tells a proxy that waited its turn on a shared CPU from one that was slow at its work.
runq_wait_seconds() {
    cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $2 } END { printf "%.3f\n", s / 1e9 }'
}

# The peak resident set size of a process, in MiB.
peak_rss_mib() {
    awk '/^VmHWM:/ { printf "%.1f\n", $2 / 1024 }' "/proc/$1/status"
}

load_average() {
    cut -d' ' -f1-3 /proc/loadavg
}

# A markdown description of the machine, for the head of each section.
machine_markdown() {
    local model mem
    model=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
    mem=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    printf -- '- Date: %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    # shellcheck disable=SC2016 # the backticks are Markdown, not a command
    printf -- '- Machine: %s CPUs (`nproc`), %s, %s RAM, Linux %s\n' \
        "$(nproc)" "${model:-unknown CPU}" "$mem" "$(uname -r)"
    printf -- '- Code: release binaries built %s; the checkout was at commit %s%s when this section was written\n' \
        "${BUILT_AT:-at an unknown time}" "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        "$(git -C "$ROOT" diff --quiet HEAD -- gateway loadtest 2>/dev/null || echo ', with uncommitted changes in gateway/ or loadtest/')"
    if [ -n "${CANDIDATE:-}" ]; then
        # shellcheck disable=SC2016 # the backticks are Markdown, not a command
        printf -- '- Candidate: `%s`, built %s, run beside the gateway as *candidate*\n' "$CANDIDATE" "$CANDIDATE_BUILT_AT"
    fi
}

# write_section NAME FILE : puts FILE between the NAME markers of BENCHMARKS.md, replacing
# what a previous run wrote there, or appends it with markers when the section is new.
write_section() {
    local name=$1 file=$2
    local begin="<!-- bench:$name:begin -->" end="<!-- bench:$name:end -->"
    if [ -n "${CANDIDATE:-}" ]; then
        mkdir -p "$ROOT/target"
        cp "$file" "$ROOT/target/bench-$name-candidate.md"
        log "CANDIDATE is set: $BENCHMARKS_MD left alone, section written to target/bench-$name-candidate.md"
        return
    fi
    [ -f "$BENCHMARKS_MD" ] || printf '# Benchmarks\n' >"$BENCHMARKS_MD"
    python3 - "$BENCHMARKS_MD" "$file" "$begin" "$end" <<'PY'
import sys

path, section_path, begin, end = sys.argv[1:5]
text = open(path, encoding="utf-8").read()
section = open(section_path, encoding="utf-8").read().rstrip("\n")
block = f"{begin}\n{section}\n{end}"
if begin in text and end in text:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = head + block + tail
else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
open(path, "w", encoding="utf-8").write(text)
PY
    log "wrote section '$name' of $BENCHMARKS_MD"
}

# Every loopback connection needs a descriptor; the fan-out benchmark holds thousands.
raise_fd_limit() {
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}

require_nginx() {
    command -v nginx >/dev/null || {
        echo "nginx is not installed (Debian: apt-get install nginx)" >&2
        exit 1
    }
}

# start_nginx NAME UPSTREAM KEEPALIVE [WRAPPER...] : starts nginx as a plain reverse proxy to UPSTREAM
# (host:port), configured as the gateway is used: HTTP/1.1 to the backend with up to
# KEEPALIVE idle connections kept, no response buffering (tokens pass as they come), one
# access-log line per request. Sets NGINX_URL and NGINX_PID (the master; it is killed when
# the script exits, and stop_server stops it like any other server). With a WRAPPER command
# (e.g. valgrind and its options), nginx runs under it with one worker process, so that all of
# its proxying happens in one process the wrapper can watch. (Without a master process nginx
# cannot take an inherited listener: 1.22 crashes.) NGINX_WORKER_PROCESSES, when set, is the
# number of worker processes instead of one per CPU.
start_nginx() {
    local name=$1 upstream=$2 keepalive=$3
    shift 3
    local wrapper=("$@")
    local dir="$WORK/$name"
    local processes="# One worker per CPU, nginx's usual setting, unless told otherwise.
worker_processes ${NGINX_WORKER_PROCESSES:-$(nproc)};"
    if [ "${#wrapper[@]}" -gt 0 ]; then
        processes="worker_processes 1;"
    fi
    mkdir -p "$dir/tmp"
    # nginx's workers drop to an unprivileged user when started as root; they must still
    # reach their config and temporary files.
    chmod 755 "$WORK" "$dir" "$dir/tmp"
    local user=""
    [ "$(id -u)" = 0 ] && user="user root;"
    cat >"$dir/nginx.conf.in" <<CONF
daemon off;
$user
$processes
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
    # The gateway writes one access-log line per request too.
    access_log $dir/access.log;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    client_body_buffer_size 1m;
    # nginx closes a client connection after 1,000 requests by default; the gateway does not.
    keepalive_requests 1000000;
    upstream backend {
        server $upstream;
        keepalive $keepalive;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:@PORT@;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
CONF
    # nginx must be told its port in its config: nginx-on-listener.py binds 127.0.0.1 port 0,
    # writes the port into the config (@PORT@ above) and hands the open socket to nginx.
    python3 "$BENCH_DIR/nginx-on-listener.py" "$dir/nginx.conf.in" "$dir/nginx.conf" "$dir/port" -- \
        ${wrapper[@]+"${wrapper[@]}"} nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    NGINX_PID=$!
    CHILD_PIDS+=("$NGINX_PID")
    local tries=0
    until [ -s "$dir/port" ]; do
        kill -0 "$NGINX_PID" 2>/dev/null || { cat "$WORK/$name.err" >&2; return 1; }
        tries=$((tries + 1))
        [ "$tries" -lt 100 ] || { echo "nginx never got its listener" >&2; return 1; }
        sleep 0.1
    done
    NGINX_URL="http://127.0.0.1:$(cat "$dir/port")"
    wait_ready "$NGINX_URL/health" || { cat "$dir/error.log" >&2; return 1; }
}

# A markdown line describing the nginx that start_nginx runs.
nginx_markdown() {
    # shellcheck disable=SC2016 # the backticks are Markdown, not a command
    printf 'nginx: %s, %s worker processes, upstream `keepalive %s`, HTTP/1.1, `proxy_buffering off`, access log on (as the gateway'"'"'s), listening on a socket the script bound to 127.0.0.1 port 0 and handed over' \
        "$(nginx -v 2>&1 | sed 's/^nginx version: //')" "$(nproc)" "$1"
}

# nginx_total FUNCTION PID : FUNCTION (cpu_seconds, runq_wait_seconds or peak_rss_mib) of
# nginx's master PID and of each of its workers, added up. For peak_rss_mib, pages the
# processes share are counted once per process, so the sum is an upper bound.
nginx_total() {
    local fn=$1 pid total=0
    for pid in "$2" $(pgrep -P "$2"); do
        total=$(awk -v a="$total" -v b="$("$fn" "$pid")" 'BEGIN { print a + b }')
    done
    echo "$total"
}

# CPU seconds used so far by nginx: its master and workers.
nginx_cpu_seconds() { nginx_total cpu_seconds "$1"; }
