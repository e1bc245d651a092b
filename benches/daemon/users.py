#!/usr/bin/env python3
"""[users] mode = "unix" (issue 11): what running every user's tasks as that user costs.

1. Throughput: 100,000 no-ops through the HTTP API (`fnx bench api`) by one user alone, and by
   two users at once (100,000 each, started together; aggregate = 200,000 / wall time of both),
   on one unix-mode daemon; alternated, REPEAT times each.
2. First-task latency: submit to result of one task for a user whose manager has gone idle and
   exited (the manager's start as the user is included), and for a user whose manager runs.

Needs root: it creates the accounts fnxsvc, fnxalice and fnxbob if they are missing (as the
system tests do) and runs the daemon as fnxsvc with only its documented capabilities.
Usage: sudo benches/daemon/users.py [REPEAT]     (needs: cargo build --release -p fnx)
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FNX = Path(os.environ.get("FNX_BIN") or REPO / "target" / "release" / "fnx")
SERVICE, USERS = "fnxsvc", ("fnxalice", "fnxbob")
CAPS = "+setuid,+setgid,+setpcap,+chown"
NOOP = {"kind": "python", "entry": "noop", "source": "def noop():\n    return None\n"}


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_accounts() -> None:
    for name in (SERVICE, *USERS):
        try:
            pwd.getpwnam(name)
        except KeyError:
            extra = (["--system", "--no-create-home", "--home-dir", "/nonexistent"]
                     if name == SERVICE else ["--create-home"])
            subprocess.run(["useradd", "--user-group", "--shell", "/bin/sh", *extra, name],
                           check=True)


class Daemon:
    def __init__(self, root: Path, idle_s: float):
        self.root, self.port = root, free_port()
        for d in ("data", "sock", "bin"):
            (root / d).mkdir(mode=0o755)
        svc = pwd.getpwnam(SERVICE)
        os.chown(root / "data", svc.pw_uid, svc.pw_gid)
        os.chown(root / "sock", svc.pw_uid, svc.pw_gid)
        self.bin = root / "bin" / "fnx"
        shutil.copy2(FNX, self.bin)
        self.config = root / "site.toml"
        self.config.write_text(
            f'[daemon]\ndata_dir = "{root}/data"\nlisten = "127.0.0.1:{self.port}"\n'
            f'socket = "{root}/sock/fnx.sock"\n[users]\nmode = "unix"\nuser_idle_s = {idle_s}\n'
            '[pools.local]\nworkers_per_manager = 2\npython = "/usr/bin/python3"\n')
        os.chmod(self.config, 0o644)
        self.log = open(root / "daemon.log", "wb")
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={SERVICE}", f"--regid={SERVICE}", "--init-groups",
             f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}", f"--bounding-set=-all,{CAPS}",
             "--", str(self.bin), "daemon", "--config", str(self.config)],
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
            stdout=self.log, stderr=self.log, cwd="/")
        for _ in range(400):
            try:
                if self.get("/v1/health", None)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            sys.exit(f"the daemon did not start; see {root}/daemon.log")
        self.admin = json.loads((root / "data" / "client.json").read_text())["token"]
        self.tokens = {u: self.token(u) for u in USERS}

    def token(self, user: str) -> str:
        r = subprocess.run(["setpriv", f"--reuid={SERVICE}", f"--regid={SERVICE}",
                            "--init-groups", "--", str(self.bin), "token", "create", "--user",
                            user, "--config", str(self.config)],
                           capture_output=True, text=True, check=True, cwd="/")
        return r.stdout.strip()

    def request(self, method: str, path: str, token: str | None, body=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        c.request(method, path, None if body is None else json.dumps(body), headers)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, json.loads(data) if data else None

    def get(self, path: str, token: str | None):
        return self.request("GET", path, token)

    def bench(self, user: str) -> subprocess.Popen:
        env = dict(os.environ, FNX_URL=f"http://127.0.0.1:{self.port}",
                   FNX_TOKEN=self.tokens[user])
        return subprocess.Popen([str(self.bin), "bench", "api", "--tasks", "100000",
                                 "--batch", "1000"], env=env, stdout=subprocess.PIPE, text=True)

    def managers_of(self, user: str) -> int:
        pools = self.get("/v1/status", self.admin)[1]["pools"]
        return sum(m["user"] == user for p in pools for m in p.get("managers", []))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def throughput(d: Daemon, repeat: int) -> None:
    print(f"== 1. throughput, 100,000 no-ops per user (load {load()})")
    for u in USERS:  # warm: each user's manager running before the first measurement
        p = d.bench(u)
        p.wait()
    one, two = [], []
    for i in range(repeat):
        order = ["one", "two"] if i % 2 == 0 else ["two", "one"]
        for what in order:
            procs = [d.bench(u) for u in (USERS[:1] if what == "one" else USERS)]
            outs = [json.loads(p.communicate()[0]) for p in procs]
            # Each client times from its first submit to its last result (its start-up, which
            # reads the user's earlier results, is left out); both start together, so the
            # aggregate is all tasks over the longer of the two.
            rates = [o["throughput"]["tasks_per_s"] for o in outs]
            rate = 100_000 * len(procs) / max(100_000 / r for r in rates)
            (one if what == "one" else two).append(rate)
            each = ", ".join(f"{r:,.0f}" for r in rates)
            print(f"  run {i + 1} {what} user(s): aggregate {rate:,.0f} tasks/s "
                  f"(each: {each}; load {load()})")
    m1, m2 = statistics.median(one), statistics.median(two)
    print(f"  median: one user {m1:,.0f} tasks/s, two users {m2:,.0f} tasks/s aggregate, "
          f"ratio {m2 / m1:.3f} (target ≥ 0.85)")


def latency(d: Daemon, repeat: int) -> None:
    print(f"== 2. first-task latency, users.user_idle_s = 2 (load {load()})")
    user, token = USERS[0], d.tokens[USERS[0]]
    fid = d.request("POST", "/v1/functions", token, NOOP)[1]["id"]
    cold, warm = [], []

    def one() -> float:
        t0 = time.monotonic()
        [tid] = d.request("POST", "/v1/tasks", token,
                          {"tasks": [{"function": fid, "args": []}]})[1]["ids"]
        rec = d.get(f"/v1/tasks/{tid}?wait=30", token)[1]
        assert rec["state"] == "success", rec
        return (time.monotonic() - t0) * 1000

    for _ in range(repeat * 3):
        deadline = time.monotonic() + 30
        while d.managers_of(user) and time.monotonic() < deadline:
            time.sleep(0.2)  # until the idle manager has drained and exited
        cold.append(one())
        warm.extend(one() for _ in range(5))
    print(f"  user with no manager (its start as the user included): median "
          f"{statistics.median(cold):.0f} ms over {len(cold)} (min {min(cold):.0f}, "
          f"max {max(cold):.0f})")
    print(f"  user with a running manager: median {statistics.median(warm):.1f} ms over "
          f"{len(warm)} (p90 {sorted(warm)[int(len(warm) * 0.9)]:.1f})")


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: it creates test accounts and runs the daemon as fnxsvc")
    if not FNX.is_file():
        sys.exit(f"{FNX} not found: cargo build --release -p fnx (or set FNX_BIN)")
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    ensure_accounts()
    work = Path(tempfile.mkdtemp(prefix="fnx-bench-users-"))
    os.chmod(work, 0o755)
    try:
        # Throughput with managers that stay; latency with managers that leave after 2 s.
        for name, idle_s, measure in (("tp", 600, throughput), ("lat", 2, latency)):
            (work / name).mkdir(mode=0o755)
            d = Daemon(work / name, idle_s=idle_s)
            try:
                measure(d, repeat)
            finally:
                d.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
