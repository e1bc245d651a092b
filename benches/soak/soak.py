#!/usr/bin/env python3
"""Soak (issue 12): mixed, partly hostile load on one daemon while its managers, workers and
the daemon itself are killed at random; then an audit of every acknowledged task.

Load, all at once for DURATION seconds:
- submitters: batches of no-op Python tasks and shell tasks, each batch with its own
  Idempotency-Key, retried with the same key until acknowledged (so a daemon kill during a
  submit creates nothing twice);
- large payloads: 1 to 4 MiB arguments;
- long-polls: a second user's idle `GET /v1/results?wait=20`;
- cancels of random acknowledged tasks;
- stalled sockets: connections that send one byte and stall, opened again as they are closed;
- a health prober (every 0.2 s; its latency is the p99 reported).
Chaos, every 10 to 30 s at random: SIGKILL a manager, SIGKILL a worker, or SIGKILL the daemon
and start it again.

Audit: wait until every acknowledged task is terminal; read each user's whole results stream
and count each task's outcomes. Reported: acknowledged, with exactly one outcome, lost (must
be 0), with more than one outcome (must be 0), daemon peak RSS and open descriptors, p99 health
latency, and health probes that failed (the daemon was down during its restarts).

Usage: benches/soak/soak.py [--duration 600] [--seed 1]   (needs: cargo build --release -p fnx)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FNX = Path(os.environ.get("FNX_BIN") or REPO / "target" / "release" / "fnx")
NOOP = {"kind": "python", "entry": "noop", "source": "def noop(x=0):\n    return x\n"}
SIZE = {"kind": "python", "entry": "size", "source": "def size(b):\n    return len(b)\n"}
SHELL = {"kind": "shell", "command": "echo {x}"}
TERMINAL = {"success", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.data = root / "data"
        self.config = root / "fnx.toml"
        self.config.write_text(f"""
[daemon]
data_dir = "{self.data}"
listen = "127.0.0.1:{self.port}"
[interchange]
port = {free_port()}
heartbeat_period_s = 1
heartbeat_threshold_s = 5
[limits]
idle_timeout_s = 10
[pools.local]
managers = 2
workers_per_manager = 3
""")
        self.log = open(root / "daemon.log", "ab")
        self.proc: subprocess.Popen | None = None
        self.token = ""
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = subprocess.Popen([str(FNX), "daemon", "--config", str(self.config)],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/v1/health", token=None, timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise SystemExit("the daemon did not become healthy; see daemon.log")
        self.token = json.loads((self.data / "client.json").read_text())["token"]

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def request(self, method: str, path: str, body=None, token: str | None = "",
                headers: dict | None = None, timeout: float = 30):
        hdrs = dict(headers or {})
        token = self.token if token == "" else token
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        return resp.status, doc

    def children(self) -> list[int]:
        """Pids of every process under the daemon."""
        out, todo = [], [self.proc.pid]
        parents: dict[int, list[int]] = {}
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(pid)
        while todo:
            for c in parents.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out


class Soak:
    def __init__(self, d: Daemon, duration: float, rng: random.Random):
        self.d, self.duration, self.rng = d, duration, rng
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, list[int]] = {"admin": [], "bob": []}
        self.health: list[float] = []
        self.health_failed = 0
        self.peak_rss = 0
        self.peak_fds = 0
        self.chaos: list[str] = []
        self.refused = 0  # 4xx/5xx answers to load requests other than while down
        self.bob = ""
        self.fids: dict[str, int] = {}

    def call(self, *args, **kw):
        """A request that survives the daemon's restarts: retried until it gets an answer."""
        while not self.stop.is_set() or kw.pop("final", False):
            try:
                return self.d.request(*args, **kw)
            except OSError:
                time.sleep(0.2)
        return 0, None

    def submit(self, user: str, tasks: list[dict]) -> None:
        key = uuid.uuid4().hex
        token = self.bob if user == "bob" else ""
        while True:
            try:
                status, doc = self.d.request("POST", "/v1/tasks", {"tasks": tasks}, token=token,
                                             headers={"Idempotency-Key": key}, timeout=60)
            except OSError:
                time.sleep(0.2)
                continue
            if status == 201:
                with self.lock:
                    self.acked[user] += doc["ids"]
                return
            if status in (429, 503):
                time.sleep(0.5)
                continue
            raise SystemExit(f"submit refused: {status} {doc}")

    def submitter(self, user: str) -> None:
        fid = self.fids[f"{user}-noop"]
        sid = self.fids[f"{user}-shell"]
        while not self.stop.is_set():
            n = self.rng.randint(1, 200)
            tasks = [{"function": fid, "args": [i]} if i % 4 else
                     {"function": sid, "args": {"x": i}} for i in range(n)]
            self.submit(user, tasks)
            time.sleep(self.rng.uniform(0, 0.2))

    def large(self) -> None:
        fid = self.fids["admin-size"]
        while not self.stop.is_set():
            # 1 to 4 MiB of base64 text.
            blob = base64.b64encode(os.urandom((self.rng.randint(1, 4) << 20) * 3 // 4)).decode()
            self.submit("admin", [{"function": fid, "args": [blob]}])
            time.sleep(self.rng.uniform(0.5, 2))

    def poller(self) -> None:
        while not self.stop.is_set():
            try:
                self.d.request("GET", "/v1/results?since=end", token=self.bob)
                self.d.request("GET", "/v1/results?since=999999999999&wait=20", token=self.bob,
                               timeout=40)
            except OSError:
                time.sleep(0.2)

    def canceller(self) -> None:
        while not self.stop.is_set():
            time.sleep(self.rng.uniform(0.1, 1))
            with self.lock:
                ids = self.rng.sample(self.acked["admin"], min(5, len(self.acked["admin"])))
            if ids:
                try:
                    self.d.request("POST", "/v1/tasks/cancel", {"ids": ids})
                except OSError:
                    pass

    def staller(self) -> None:
        held: list[socket.socket] = []
        while not self.stop.is_set():
            while len(held) < 50:
                try:
                    s = socket.create_connection(("127.0.0.1", self.d.port), timeout=2)
                    s.sendall(b"G")
                    s.setblocking(False)
                    held.append(s)
                except OSError:
                    break
            time.sleep(1)
            alive = []
            for s in held:  # closed by the daemon's idle timeout: open another
                try:
                    if s.recv(1) == b"":
                        s.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    continue
                alive.append(s)
            held = alive
        for s in held:
            s.close()

    def prober(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                status, _ = self.d.request("GET", "/v1/health", token=None, timeout=5)
                if status == 200:
                    self.health.append(time.monotonic() - t0)
                else:
                    self.health_failed += 1
            except OSError:
                self.health_failed += 1
            try:
                pid = self.d.proc.pid
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        self.peak_rss = max(self.peak_rss, int(line.split()[1]) << 10)
                self.peak_fds = max(self.peak_fds, len(os.listdir(f"/proc/{pid}/fd")))
            except OSError:
                pass
            time.sleep(0.2)

    def chaos_loop(self) -> None:
        while not self.stop.wait(self.rng.uniform(10, 30)):
            what = self.rng.choice(["manager", "worker", "daemon"])
            kids = self.d.children()
            cmd = {p: open(f"/proc/{p}/cmdline", "rb").read() for p in kids
                   if os.path.exists(f"/proc/{p}/cmdline")}
            if what == "manager":
                victims = [p for p, c in cmd.items() if b"manager" in c and b"fnx" in c]
            elif what == "worker":
                victims = [p for p, c in cmd.items() if b"worker" in c and b"python" in c]
            else:
                victims = [self.d.proc.pid]
            if not victims:
                continue
            victim = self.rng.choice(victims)
            self.chaos.append(f"{time.strftime('%H:%M:%S')} SIGKILL {what} {victim}")
            print(self.chaos[-1], flush=True)
            if what == "daemon":
                self.d.kill9()
                self.d.start()
            else:
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def run(self) -> dict:
        d = self.d
        _, doc = self.call("POST", "/v1/tokens", {"user": "bob"})
        self.bob = doc["token"]
        for user, token in (("admin", ""), ("bob", self.bob)):
            for name, spec in (("noop", NOOP), ("shell", SHELL), ("size", SIZE)):
                _, doc = self.call("POST", "/v1/functions", spec, token=token)
                self.fids[f"{user}-{name}"] = doc["id"]
        threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in [
            (self.submitter, ("admin",)), (self.submitter, ("admin",)),
            (self.submitter, ("bob",)), (self.large, ()), (self.canceller, ()),
            (self.staller, ()), (self.prober, ()), (self.chaos_loop, ()),
            *[(self.poller, ()) for _ in range(20)]]]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < self.duration:
            time.sleep(5)
            with self.lock:
                n = sum(len(v) for v in self.acked.values())
            print(f"{time.monotonic() - t0:5.0f} s: {n} tasks acknowledged, "
                  f"daemon starts {d.starts}", flush=True)
        self.stop.set()
        for t in threads:
            t.join(60)
        return self.audit()

    def audit(self) -> dict:
        d = self.d
        out = {"acknowledged": 0, "one_outcome": 0, "lost": 0, "more_than_one": 0}
        kinds: dict[str, int] = {}
        deadline = time.monotonic() + 600
        for user, token in (("admin", ""), ("bob", self.bob)):
            ids = self.acked[user]
            out["acknowledged"] += len(ids)
            # Every acknowledged task ends (retries, lost managers) within the deadline.
            pending = list(ids)
            while pending and time.monotonic() < deadline:
                states = {}
                for i in range(0, len(pending), 10_000):
                    _, doc = d.request("POST", "/v1/tasks/status",
                                       {"ids": pending[i:i + 10_000]}, token=token)
                    states.update({t["id"]: t["state"] for t in doc["tasks"]})
                pending = [i for i in pending if states.get(i) not in TERMINAL]
                if pending:
                    time.sleep(1)
            # Each terminal task appears in its user's results stream exactly once.
            seen: dict[int, int] = {}
            cursor = 0
            while True:
                _, doc = d.request("GET", f"/v1/results?since={cursor}&limit=10000",
                                   token=token, timeout=120)
                if not doc["results"]:
                    break
                for r in doc["results"]:
                    seen[r["id"]] = seen.get(r["id"], 0) + 1
                    kind = r["state"] + (f" ({r['error']['kind']})" if r.get("error") else "")
                    kinds[kind] = kinds.get(kind, 0) + 1
                cursor = doc["cursor"]
            for i in ids:
                n = seen.get(i, 0)
                if n == 0:
                    out["lost"] += 1
                elif n == 1:
                    out["one_outcome"] += 1
                else:
                    out["more_than_one"] += 1
        lat = sorted(self.health)
        out["outcomes"] = dict(sorted(kinds.items()))
        out.update({
            "daemon_starts": d.starts,
            "chaos_events": len(self.chaos),
            "peak_rss_mib": round(self.peak_rss / 2**20, 1),
            "peak_fds": self.peak_fds,
            "health_probes": len(lat) + self.health_failed,
            "health_failed": self.health_failed,
            "health_p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
            "health_p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
        })
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fnx-soak-"))
    load0 = open("/proc/loadavg").read().split()[:3]
    d = Daemon(root)
    d.start()
    try:
        result = Soak(d, a.duration, random.Random(a.seed)).run()
    finally:
        d.stop()
    result["duration_s"] = a.duration
    result["load_at_start"] = " ".join(load0)
    print(json.dumps(result, indent=2))
    print(f"(daemon log: {root / 'daemon.log'})")
    bad = result["lost"] or result["more_than_one"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
