"""Round-trip latency of the Python SDK on an idle daemon: `Client.run` + `get_result` of a no-op.

Usage: python benches/daemon/sdk_latency.py [N]   (URL and token: FNX_URL/FNX_TOKEN or
$FNX_HOME/client.json, as for any SDK client). Prints JSON with p50/p90/p99 in milliseconds.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "sdk", "python"))
import fnx  # noqa: E402


def noop():
    return None


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    client = fnx.Client()
    fid = client.register_function(noop)
    samples = []
    for i in range(n + 50):
        t = time.perf_counter()
        tid = client.run(fid)
        client.get_result(tid, timeout=30)
        if i >= 50:  # warm-up: connections, worker start, caches
            samples.append(time.perf_counter() - t)
    samples.sort()
    q = lambda p: round(samples[min(len(samples) - 1, int(p * len(samples)))] * 1e3, 3)
    print(json.dumps({"round_trips": n, "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99),
                      "max_ms": round(samples[-1] * 1e3, 3)}))


if __name__ == "__main__":
    main()
