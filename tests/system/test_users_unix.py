"""`[users] mode = "unix"` (issue 11): every user's tasks run as that user's own Unix account,
in managers that serve no one else, started by a daemon that runs as a non-root service account
holding only the capabilities the admin guide lists.

The test creates real accounts (idempotently): `fnxsvc` (the service account, a system
account), `fnxalice` and `fnxbob`. The daemon runs as `fnxsvc` through `setpriv` with ambient
CAP_SETUID, CAP_SETGID, CAP_SETPCAP and CAP_CHOWN and nothing else, from a copy of the binary
and a data directory outside the test's private temporary directory (which other accounts
cannot enter). These tests need root to set that up, as CI has; elsewhere they are skipped.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_for
from daemon_env import Daemon, error_of, merge, result_value, to_toml
from test_isolation import TRY_READ, assert_refused, rogue_manager

SERVICE, ALICE, BOB = "fnxsvc", "fnxalice", "fnxbob"
CAPS = "+setuid,+setgid,+setpcap,+chown"

PROBE = {"kind": "python", "entry": "probe", "source": TRY_READ + '''
def probe(paths):
    import os
    out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
           "home": os.environ.get("HOME"), "user": os.environ.get("USER"),
           "env": sorted(os.environ)}
    m = os.umask(0)
    os.umask(m)
    out["umask"] = m
    out["paths"] = try_read(paths)
    return out
'''}

SOCKET_CLIENT = r"""
import json, socket, sys
path, method, url, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(path)
data = body.encode()
head = (f"{method} {url} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
s.sendall(head.encode() + data)
raw = b""
while chunk := s.recv(65536):
    raw += chunk
head, _, payload = raw.partition(b"\r\n\r\n")
if b"chunked" in head.lower():
    out, rest = b"", payload
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, rest = out + rest[:n], rest[n + 2:]
    payload = out
print(json.dumps({"status": int(head.split()[1]),
                  "body": json.loads(payload) if payload else None}))
"""


def ensure_accounts() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("useradd") is None:
        pytest.skip("needs root, setpriv and useradd to create test accounts (CI runs as root)")
    for name, system in ((SERVICE, True), (ALICE, False), (BOB, False)):
        try:
            pwd.getpwnam(name)
            continue
        except KeyError:
            pass
        argv = ["useradd", "--user-group", "--shell", "/bin/sh"]
        argv += (["--system", "--no-create-home", "--home-dir", "/nonexistent"] if system
                 else ["--create-home"])
        subprocess.run([*argv, name], check=True, capture_output=True)


def as_account(name: str) -> list[str]:
    return ["setpriv", f"--reuid={name}", f"--regid={name}", "--init-groups", "--"]


class UnixDaemon(Daemon):
    """A daemon in unix mode, run as the service account from a directory others may enter."""

    def __init__(self, env, n: int, sections: dict):
        self.root = Path(tempfile.mkdtemp(prefix="fnx-unix-"))
        os.chmod(self.root, 0o755)
        svc = pwd.getpwnam(SERVICE)
        for d in ("data", "sock", "bin"):
            (self.root / d).mkdir()
            os.chmod(self.root / d, 0o755)
        os.chown(self.root / "data", svc.pw_uid, svc.pw_gid)
        os.chown(self.root / "sock", svc.pw_uid, svc.pw_gid)
        self.binary = self.root / "bin" / "fnx"
        shutil.copy2(env.bin, self.binary)
        os.chmod(self.binary, 0o755)
        self.socket = self.root / "sock" / "fnx.sock"
        base = {"daemon": {"socket": str(self.socket)},
                "users": {"mode": "unix", "user_idle_s": 3},
                "pools": {"local": {"python": "/usr/bin/python3", "workers_per_manager": 2}}}
        super().__init__(env, n, merge(base, sections), self.root / "data", None)
        # The service account reads its configuration: out of the test's private directory.
        self.config_path = self.root / "fnx.toml"
        self.config_path.write_text(to_toml(self.config))
        os.chmod(self.config_path, 0o644)
        # Its environment: the test's marker (daemon.pass_env) and a PATH without /root.
        self._daemon_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "FNX_TEST_MARK": env.mark,
                            "LANG": "C.UTF-8"}

    def daemon_argv(self) -> list[str]:
        return ["setpriv", f"--reuid={SERVICE}", f"--regid={SERVICE}", "--init-groups",
                f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}", f"--bounding-set=-all,{CAPS}",
                "--", str(self.binary), "daemon", "--config", str(self.config_path)]

    def as_service(self, *args: str) -> subprocess.CompletedProcess:
        """`fnx ARGS` as the service account (what an admin runs on the daemon's host)."""
        return subprocess.run([*as_account(SERVICE), str(self.binary), *args],
                              capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "FNX_TEST_MARK": self.fnx_env.mark},
                              cwd="/")

    def create_user(self, name: str, admin: bool = False) -> str:
        argv = ["token", "create", "--user", name, "--config", str(self.config_path),
                "--output", "json"]
        if admin:
            argv.append("--admin")
        r = self.as_service(*argv)
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        return json.loads(r.stdout)["token"]

    def via_socket(self, account: str, method: str, path: str, body=None) -> dict:
        """One request on the local socket from a process of `account` (no token)."""
        r = subprocess.run([*as_account(account), "/usr/bin/python3", "-c", SOCKET_CLIENT,
                            str(self.socket), method, path,
                            "" if body is None else json.dumps(body)],
                           capture_output=True, text=True, timeout=90, cwd="/")
        assert r.returncode == 0, (r.stdout, r.stderr)
        return json.loads(r.stdout)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def unix_daemon(fnx_env):
    ensure_accounts()
    made: list[UnixDaemon] = []

    def make(only_pools: dict | None = None, **sections) -> UnixDaemon:
        d = UnixDaemon(fnx_env, len(made) + 1, sections)
        if only_pools is not None:
            d.config["pools"] = only_pools
            d.config_path.write_text(to_toml(d.config))
        made.append(d)
        d.start()
        return d

    yield make
    for d in made:
        if d.running:
            d.stop()
        d.cleanup()


def processes_of(uid: int) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            status = open(f"/proc/{pid}/status").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        real = int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("Uid:")))
        if real == uid:
            out.append(f"{pid}: {cmd}")
    return out


def test_each_user_runs_as_their_account_and_reaches_nothing_of_the_daemon_or_others(
        unix_daemon):
    d = unix_daemon()
    alice, bob = pwd.getpwnam(ALICE), pwd.getpwnam(BOB)
    # Alice through the socket, no token; bob by token over HTTP.
    who = d.via_socket(ALICE, "GET", "/v1/whoami")
    assert who == {"status": 200, "body": {"user": ALICE, "admin": False}}, who
    bob_token = d.create_user(BOB)
    assert d.api("GET", "/v1/whoami", token=bob_token).body == {"user": BOB, "admin": False}

    # Bob first: a task with an input file that stays running (it waits for a gate) and
    # tells where its task directory is.
    gate = Path(tempfile.mkdtemp(prefix="fnx-gate-", dir=d.root))
    os.chmod(gate, 0o777)
    sid = d.register({"kind": "shell", "command":
                      f"pwd > {gate}/bob-cwd; while [ ! -e {gate}/release ]; do sleep 0.05; "
                      'done; id -u; id -g; id -G; echo "$HOME"; umask'}, token=bob_token)
    secret = base64.b64encode(b"bob's input").decode()
    [bt] = d.submit([{"function": sid, "args": {},
                      "files": [{"name": "in.txt", "data_b64": secret}]}], token=bob_token)
    wait_for(lambda: (gate / "bob-cwd").exists(), 60, "bob's task runs")
    bob_cwd = (gate / "bob-cwd").read_text().strip()
    assert os.path.exists(f"{bob_cwd}/in.txt"), bob_cwd
    bob_run = d.home / "runs" / "local" / BOB
    secrets = [str(d.home / "fnx.db"), str(d.home / "client.json"), str(d.home / "keys"),
               str(d.home / "keys" / "interchange.key"), str(bob_run), bob_cwd,
               f"{bob_cwd}/in.txt"]
    fid = d.via_socket(ALICE, "POST", "/v1/functions", PROBE)["body"]["id"]
    sub = d.via_socket(ALICE, "POST", "/v1/tasks",
                       {"tasks": [{"function": fid, "args": [secrets]}]})
    assert sub["status"] == 201, sub
    [at] = sub["body"]["ids"]
    got = d.via_socket(ALICE, "GET", f"/v1/tasks/{at}?wait=60")["body"]
    out = result_value(got)
    assert (out["uid"], out["gid"]) == (alice.pw_uid, alice.pw_gid), out
    assert out["groups"] == sorted(os.getgrouplist(ALICE, alice.pw_gid)), out
    assert out["home"] == alice.pw_dir and out["user"] == ALICE, out
    assert out["umask"] == 0o077, out
    assert "FNX_HOME" not in out["env"], out["env"]
    # Each path named: nothing of the daemon's, nothing of bob's (his task still runs).
    assert out["paths"] == {p: "PermissionError" for p in secrets}, out["paths"]
    (gate / "release").touch()
    rec = d.wait_task(bt, timeout=60, token=bob_token)
    assert rec["state"] == "success", rec
    uid, gid, groups, home, umask = rec["result"]["value"]["stdout"].splitlines()
    assert (int(uid), int(gid)) == (bob.pw_uid, bob.pw_gid), rec
    assert sorted(map(int, groups.split())) == sorted(os.getgrouplist(BOB, bob.pw_gid)), rec
    assert home == bob.pw_dir and umask == "0077", rec
    # Each of them also the other way: bob on the socket, alice by token over HTTP.
    assert d.via_socket(BOB, "GET", "/v1/whoami")["body"] == {"user": BOB, "admin": False}
    alice_token = d.create_user(ALICE)
    aid = d.register({"kind": "shell", "command": "id -un"}, token=alice_token)
    [t] = d.submit([{"function": aid, "args": {}}], token=alice_token)
    assert d.wait_task(t, timeout=60, token=alice_token)["result"]["value"]["stdout"] == \
        f"{ALICE}\n"
    # A file linked by path is opened as the task's user: alice cannot link bob's.
    private = Path(bob.pw_dir) / "fnx-private.txt"
    private.write_text("bob only\n")
    os.chown(private, bob.pw_uid, bob.pw_gid)
    os.chmod(private, 0o600)
    cat = d.via_socket(ALICE, "POST", "/v1/functions", {"kind": "shell", "command": "cat in"})
    sub = d.via_socket(ALICE, "POST", "/v1/tasks", {"tasks": [{
        "function": cat["body"]["id"], "args": {}, "files": [{"name": "in",
                                                            "path": str(private)}]}]})
    got = d.via_socket(ALICE, "GET", f"/v1/tasks/{sub['body']['ids'][0]}?wait=60")["body"]
    assert got["state"] == "failed" and "permission denied" in got["error"]["message"], got

    # Bob's ids do not exist for alice.
    for path in (f"/v1/tasks/{bt}", f"/v1/functions/{sid}"):
        r = d.via_socket(ALICE, "GET", path)
        assert r["status"] == 404, (path, r)
    res = d.via_socket(ALICE, "GET", "/v1/results?since=0")["body"]["results"]
    assert bt not in [t["id"] for t in res] and at in [t["id"] for t in res], res
    # Their managers run as themselves, and serve no one else.
    assert any(" manager " in p for p in processes_of(alice.pw_uid)), processes_of(alice.pw_uid)
    assert any(" manager " in p for p in processes_of(bob.pw_uid)), processes_of(bob.pw_uid)
    managers = d.status()["pools"][0]["managers"]
    assert sorted(m["user"] for m in managers) == [ALICE, BOB], managers
    # Bob sees his own manager, and not alice's.
    mine = d.status(token=bob_token)["pools"][0]["managers"]
    assert [m["user"] for m in mine] == [BOB], mine
    # The daemon itself holds only its documented capabilities.
    caps = {line.split(":")[0]: line.split()[1] for line in
            open(f"/proc/{d.pid}/status").read().splitlines() if line.startswith("Cap")}
    assert caps["CapEff"] == caps["CapPrm"] == "00000000000001c1", caps
    # ... and keeps them to itself: nothing it starts inherits any at exec.
    assert caps["CapAmb"] == caps["CapInh"] == "0000000000000000", caps


def test_fault_24_root_the_service_account_and_missing_accounts_are_refused(unix_daemon,
                                                                           fnx_env):
    # Tokens made while the daemon ran in service mode, for names unix mode must refuse.
    # No manager in service mode, so that a task accepted then is still queued after the switch.
    d = unix_daemon(users={"mode": "service"}, pools={"local": {"managers": 0}})
    tokens = {name: d.create_user(name) for name in ("root", SERVICE, "fnx-no-such-user")}
    ghost = tokens["fnx-no-such-user"]
    gf = d.register({"kind": "shell", "command": "id -u"}, token=ghost)
    [queued] = d.submit([{"function": gf, "args": {}}], token=ghost)
    d.stop()
    d.config["users"]["mode"] = "unix"
    d.config_path.write_text(to_toml(d.config))
    d.start()
    before = {u: len(processes_of(pwd.getpwnam(u).pw_uid)) for u in ("root", SERVICE)}
    fid = d.register({"kind": "shell", "command": "id -u"})  # the admin's own function
    for name, token in tokens.items():
        # (These are not admin tokens: admin rights go with a token, not with its user.)
        r = d.api("GET", "/v1/whoami", token=token)
        error_of(r, 403, "identity_not_allowed")
        r = d.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": {}}]}, token=token)
        msg = error_of(r, 403, "identity_not_allowed")
        assert name not in msg, "the client learns nothing of why"
    # The service account's admin token may manage the service but not run tasks as itself.
    assert d.api("GET", "/v1/whoami").body == {"user": SERVICE, "admin": True}
    r = d.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": {}}]})
    error_of(r, 403, "identity_not_allowed")
    # Root on the socket is refused too.
    r = d.api("GET", "/v1/whoami", token=None, socket_path=d.socket)
    error_of(r, 403, "identity_not_allowed")
    log = d.log_since_start()
    for why in ('"root" maps to root', "maps to the service account",
                'no Unix account is named "fnx-no-such-user"'):
        wait_for(lambda: why in d.log_since_start(), 5, f"the admin log says {why!r}")
    assert "identity_not_allowed" in log
    # A task accepted before the switch is not left waiting forever: it fails, and says so.
    d.api("GET", "/v1/health", token=None)
    rec = d.wait_task(queued, timeout=30)  # as the admin, who sees every task
    assert rec["state"] == "failed" and rec["error"]["type"] == "IdentityNotAllowed", rec
    # Nothing was spawned for any of them: no manager at all.
    assert d.status()["pools"][0]["managers_connected"] == 0
    assert not [p for p in fnx_env.processes() if " manager " in f" {p.cmdline} "]
    after = {u: len(processes_of(pwd.getpwnam(u).pw_uid)) for u in ("root", SERVICE)}
    assert after[SERVICE] == before[SERVICE], "a process was spawned as the service account"


def test_a_manager_without_a_users_key_gets_none_of_their_tasks(unix_daemon, fnx_env):
    # encrypt = "always": every link is CurveZMQ, and the pool's shared key file exists (with
    # the default, the users' managers on loopback authenticate with passwords instead).
    d = unix_daemon(interchange={"encrypt": "always"})
    bob = d.create_user(BOB)
    fid = d.register({"kind": "shell", "command": "sleep 0.2; id -un"}, token=bob)
    # The pool's shared key file (what an admin gives managers started by hand) names no user:
    # a manager holding it that calls itself bob's gets nothing of bob's.
    keys = d.home / "keys" / "local.manager"
    run_dir = Path(tempfile.mkdtemp(prefix="fnx-impostor-"))
    impostor = subprocess.Popen(
        [str(fnx_env.bin), "manager", "--interchange", f"tcp://127.0.0.1:{d.interchange_port}",
         "--uid", f"{BOB}.manager-99", "--run-dir", str(run_dir), "--run-id", "impostor",
         "--slots", "8", "--curve-keys", str(keys)],
        env=fnx_env.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: d.status()["pools"][0]["managers_connected"] == 1, 20,
                 "the impostor registers (its key is a real one)")
        ids = d.submit([{"function": fid, "args": {}} for _ in range(6)], token=bob)
        recs = d.wait_all(ids, timeout=60, token=bob)
        for r in recs.values():
            assert r["state"] == "success" and r["result"]["value"]["stdout"] == f"{BOB}\n", r
        managers = d.status()["pools"][0]["managers"]
        impostors = [m for m in managers if m["uid"] == f"{BOB}.manager-99"]
        assert impostors and impostors[0]["completed"] == 0 and impostors[0]["user"] == "", \
            managers
        # And one with no key at all is refused outright (FAULTS.md 31).
        t0 = time.monotonic()
        assert_refused(rogue_manager(fnx_env, f"tcp://127.0.0.1:{d.interchange_port}"),
                       time.monotonic() - t0)
    finally:
        impostor.terminate()
        impostor.wait(10)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_users_manager_starts_on_demand_and_leaves_when_idle(unix_daemon):
    d = unix_daemon()
    alice = pwd.getpwnam(ALICE)
    token = d.create_user(ALICE)
    assert d.status()["pools"][0]["managers_connected"] == 0, "no manager before any work"
    fid = d.register({"kind": "shell", "command": "id -un"}, token=token)
    t0 = time.monotonic()
    [tid] = d.submit([{"function": fid, "args": {}}], token=token)
    rec = d.wait_task(tid, timeout=60, token=token)
    first = time.monotonic() - t0
    assert rec["result"]["value"]["stdout"] == f"{ALICE}\n", rec
    # users.user_idle_s = 3: drained, and its process gone.
    wait_for(lambda: not [p for p in processes_of(alice.pw_uid) if " manager " in p], 30,
             "alice's idle manager exits")
    assert "draining it" in d.log_since_start()
    [tid] = d.submit([{"function": fid, "args": {}}], token=token)
    assert d.wait_task(tid, timeout=60, token=token)["state"] == "success"
    print(f"first task of a user with no manager: {first:.2f} s")


def test_two_users_at_once_each_get_only_their_own_tasks(unix_daemon):
    d = unix_daemon()
    tokens = {u: d.create_user(u) for u in (ALICE, BOB)}
    fids = {u: d.register({"kind": "shell", "command": "id -un"}, token=t)
            for u, t in tokens.items()}
    ids: dict[str, list[int]] = {}

    def submit(u):
        ids[u] = d.submit([{"function": fids[u], "args": {}} for _ in range(40)],
                          token=tokens[u])

    threads = [threading.Thread(target=submit, args=(u,)) for u in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for u, t in tokens.items():
        recs = d.wait_all(ids[u], timeout=90, token=t)
        ran_as = {r["result"]["value"]["stdout"].strip() for r in recs.values()}
        assert ran_as == {u}, (u, ran_as)


def test_slurm_blocks_are_submitted_as_each_user_and_run_only_their_tasks(unix_daemon):
    """A batch pool in unix mode: each user's blocks are submitted as that user (the
    scheduler shows them as the user's jobs), and each user's tasks run only in that user's
    own blocks, as that user."""
    from test_slurm import LIVE, job_states, require_slurm
    require_slurm()
    pool = {"provider": "slurm", "nodes_per_block": 1, "max_blocks": 1, "walltime": "00:10:00",
            "workers_per_node": 2, "poll_interval_s": 0.5, "scaling_interval_s": 0.5,
            "python": "/usr/bin/python3"}
    d = unix_daemon(only_pools={"hpc": pool},
                    interchange={"address": "127.0.0.1", "heartbeat_period_s": 1,
                                 "heartbeat_threshold_s": 5})
    tokens = {u: d.create_user(u) for u in (ALICE, BOB)}
    ids, fids = {}, {}
    for u, t in tokens.items():
        fids[u] = d.register({"kind": "shell", "command": 'echo "$(id -un) $SLURM_JOB_ID"'},
                             token=t)
        ids[u] = d.submit([{"function": fids[u], "args": {}} for _ in range(4)], token=t)
    jobs_of: dict[str, set[str]] = {}
    for u, t in tokens.items():
        recs = d.wait_all(ids[u], timeout=120, token=t)
        for r in recs.values():
            assert r["state"] == "success", (u, r, d.log_tail())
            who, job = r["result"]["value"]["stdout"].split()
            assert who == u, (u, r)
            jobs_of.setdefault(u, set()).add(job)
    assert not jobs_of[ALICE] & jobs_of[BOB], jobs_of
    # The scheduler has each user's blocks as that user's jobs.
    def owners() -> dict[str, str]:
        listed = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i %u"],
                                capture_output=True, text=True).stdout.split("\n")
        return dict(line.split() for line in listed if line.strip())

    owner = owners()
    for u, jobs in jobs_of.items():
        assert {owner.get(j) for j in jobs} == {u}, (u, jobs, owner)
    status = d.status()["pools"][0]
    assert sorted(m["user"] for m in status["managers"]) == [ALICE, BOB], status
    # A manager holding alice's key that calls itself bob's gets alice's tasks only: its user
    # comes from its key, not from its words.
    key = d.home / "runs" / "hpc" / ".blocks" / ALICE / "manager.key"
    run_dir = Path(tempfile.mkdtemp(prefix="fnx-impostor-"))
    impostor = subprocess.Popen(
        [str(d.binary), "manager", "--interchange", f"tcp://127.0.0.1:{d.interchange_port}",
         "--uid", f"{BOB}.block-99.0", "--run-dir", str(run_dir), "--run-id", "impostor",
         "--slots", "4", "--curve-keys", str(key)],
        env={"PATH": "/usr/bin:/bin", "FNX_TEST_MARK": d.fnx_env.mark},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def impostor_status():
            ms = d.status()["pools"][0]["managers"]
            return next((m for m in ms if m["uid"] == f"{BOB}.block-99.0"), None)

        m = wait_for(impostor_status, 20, "the manager with alice's key registers")
        assert m["user"] == ALICE, m
        more = d.submit([{"function": fids[BOB], "args": {}} for _ in range(6)],
                        token=tokens[BOB])
        recs = d.wait_all(more, timeout=120, token=tokens[BOB])
        owner = owners()
        for r in recs.values():
            who, job = r["result"]["value"]["stdout"].split()
            assert who == BOB and owner.get(job) == BOB, (r, owner)
            jobs_of[BOB].add(job)
        assert impostor_status()["completed"] == 0, impostor_status()
    finally:
        impostor.terminate()
        impostor.wait(10)
        shutil.rmtree(run_dir, ignore_errors=True)
    all_jobs = sorted(set().union(*jobs_of.values()))
    d.stop()
    # The daemon cancelled its users' blocks (as the users) when it stopped.
    wait_for(lambda: not any(s in LIVE for s in job_states(all_jobs).values()), 30,
             f"the users' jobs {all_jobs} to end")
