#!/usr/bin/env python3
"""Where a run's inter-token latency arises: near a crowd of stream starts, or in steady relay.

Reads a bitnet-loadtest --json file written with --token-times and prints one tab-separated
line: the p99 of the inter-token gaps (microseconds) over all streams, over the gaps that end
within WINDOW_US after a crowd of stream starts, and over the rest; then the share of gaps
near the starts, and the number of streams.

A *crowd of starts* is a 100 ms window in which at least 5 % of the run's streams received
their first token. In fanout.sh's closed scenario every stream ends and starts again at about
the same moment, every TOKENS / 20 s; a proxy then does each request's own work (routing,
opening the backend request, finishing the last one's accounting) for all of them at once,
and the streams still running wait behind it. In between, it only relays tokens. Telling the
two apart says which kind of work a proxy's added latency comes from.

Usage: token-times.py FILE.json
"""

import json
import sys
from collections import Counter

BUCKET_US = 100_000
WINDOW_US = 300_000
CROWD_SHARE = 0.05


def p99(values):
    if not values:
        return -1
    values = sorted(values)
    return values[min(len(values) - 1, len(values) * 99 // 100)]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    with open(sys.argv[1], encoding="utf-8") as f:
        result = json.load(f)
    streams = [
        r["token_us"]
        for r in result["records"]
        if r.get("error") is None and len(r.get("token_us") or []) >= 2
    ]
    if not streams:
        sys.exit(f"{sys.argv[1]}: no stream with token times (run with --stream --token-times)")
    starts = Counter(times[0] // BUCKET_US for times in streams)
    crowd = [b * BUCKET_US for b, n in starts.items() if n >= CROWD_SHARE * len(streams)]

    def near_starts(t):
        return any(0 <= t - begin < WINDOW_US for begin in crowd)

    near, steady = [], []
    for times in streams:
        for before, at in zip(times, times[1:]):
            (near if near_starts(at) else steady).append(at - before)
    total = len(near) + len(steady)
    print(
        "\t".join(
            str(x)
            for x in (
                p99(near + steady),
                p99(near),
                p99(steady),
                f"{len(near) / total:.3f}",
                len(streams),
            )
        )
    )


if __name__ == "__main__":
    main()
