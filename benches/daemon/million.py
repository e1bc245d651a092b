"""Daemon memory with 1,000,000 queued tasks, and restart time with them in the store.

Starts `fnx daemon` (FNX_BIN, default target/release/fnx) on a fresh data directory with one
worker busy on a long task, submits N no-op tasks that stay queued (HTTP, batches of 10,000),
and reads the daemon's RSS before and after. Then kills it with SIGKILL, starts it again and
times how long until it answers /v1/health and has every task back in its queue.

Usage: python benches/daemon/million.py [N]   Prints JSON.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FNX = os.environ.get("FNX_BIN", os.path.join(REPO, "target", "release", "fnx"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Api:
    def __init__(self, port, token):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.auth = "Bearer " + token

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers={"Authorization": self.auth,
                                                            "Content-Type": "application/json"})
        r = self.conn.getresponse()
        raw = r.read()
        if r.status >= 300:
            raise RuntimeError("%s %s: %d %s" % (method, path, r.status, raw[:300]))
        return json.loads(raw) if raw else None


def start(cfg, log):
    p = subprocess.Popen([FNX, "daemon", "--config", cfg], stdout=log, stderr=log)
    return p


def wait_healthy(port, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v1/health")
            if c.getresponse().status == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError("daemon not healthy")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    tmp = tempfile.mkdtemp(prefix="fnx-million-")
    port, ic_port = free_port(), free_port()
    cfg = os.path.join(tmp, "site.toml")
    with open(cfg, "w") as f:
        f.write('[daemon]\ndata_dir = "%s/data"\nlisten = "127.0.0.1:%d"\n'
                '[interchange]\nport = %d\n[pools.local]\nworkers_per_manager = 1\n'
                % (tmp, port, ic_port))
    log = open(os.path.join(tmp, "daemon.log"), "ab")
    d = start(cfg, log)
    try:
        wait_healthy(port)
        token = json.load(open(os.path.join(tmp, "data", "client.json")))["token"]
        api = Api(port, token)
        blocker = api.call("POST", "/v1/functions", {"kind": "shell", "command": "sleep {s}"})["id"]
        api.call("POST", "/v1/tasks", {"tasks": [{"function": blocker, "args": {"s": 3600}}]})
        noop = api.call("POST", "/v1/functions", {"kind": "shell", "command": "true"})["id"]
        time.sleep(1)
        rss0 = rss_kib(d.pid)
        t0 = time.monotonic()
        batch = [{"function": noop, "args": []}] * 10_000
        for _ in range(n // 10_000):
            api.call("POST", "/v1/tasks", {"tasks": batch})
        submit_s = time.monotonic() - t0
        time.sleep(2)
        rss1 = rss_kib(d.pid)
        status = api.call("GET", "/v1/status")
        queued = sum(p["queued"] + p["running"] for p in status["pools"])
        db = os.path.getsize(os.path.join(tmp, "data", "fnx.db"))
        d.send_signal(signal.SIGKILL)
        d.wait()
        t1 = time.monotonic()
        d = start(cfg, log)
        wait_healthy(port)
        healthy_s = time.monotonic() - t1
        api = Api(port, token)
        while True:
            st = api.call("GET", "/v1/status")
            if sum(p["queued"] + p["running"] for p in st["pools"]) >= queued:
                break
            time.sleep(0.05)
        ready_s = time.monotonic() - t1
        rss2 = rss_kib(d.pid)
        log.flush()
        recovered = [l for l in open(os.path.join(tmp, "daemon.log"), errors="replace")
                     if "recovered" in l]
        print(json.dumps({
            "tasks": n, "submit_seconds": round(submit_s, 2),
            "submit_tasks_per_s": round(n / submit_s),
            "rss_before_kib": rss0, "rss_queued_kib": rss1,
            "bytes_per_queued_task": round((rss1 - rss0) * 1024 / n),
            "store_bytes": db, "held_by_pools": queued,
            "restart_healthy_seconds": round(healthy_s, 2),
            "restart_all_queued_seconds": round(ready_s, 2),
            "rss_after_restart_kib": rss2,
            "recovery_log": recovered[-1].strip()[-160:] if recovered else None,
        }))
    finally:
        d.send_signal(signal.SIGTERM)
        try:
            d.wait(30)
        except subprocess.TimeoutExpired:
            d.kill()


if __name__ == "__main__":
    main()
