"""Keeping users and the daemon apart (issue 11): one daemon per data directory, nothing of the
daemon's environment in user code, and no manager link without a key, loopback included
(FAULTS.md 31: any local account can reach a loopback port).

Where a case needs a second Unix account (a rogue manager started by someone else), the test
runs it as `nobody` through `setpriv` when it runs as root, as CI does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest

from conftest import wait_for
from daemon_env import GATE, gate, result_value, wait_started

ENV_OF_TASK = {"kind": "python", "entry": "envf",
               "source": "def envf():\n    import os\n    return dict(os.environ)\n"}


def as_other_account() -> list[str]:
    """The prefix that runs a command as another local account (nobody), or [] when this
    test does not run as root."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def rogue_manager(fnx_env, endpoint: str) -> subprocess.CompletedProcess:
    """`fnx manager` pointed at `endpoint` with no key, as another account where possible."""
    run_dir = tempfile.mkdtemp(prefix="fnx-rogue-")
    os.chmod(run_dir, 0o777)
    try:
        argv = [*as_other_account(), str(fnx_env.bin), "manager", "--interchange", endpoint,
                "--uid", "rogue", "--run-dir", run_dir, "--run-id", "rogue", "--slots", "4",
                "--heartbeat-threshold-ms", "3000"]
        return subprocess.run(argv, cwd=run_dir, env=fnx_env.env, capture_output=True,
                              text=True, timeout=30)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def assert_refused(r: subprocess.CompletedProcess, took: float) -> None:
    assert r.returncode != 0 and took < 10, (r.returncode, took, r.stderr)
    assert "--curve-keys" in r.stderr, r.stderr  # it says what it lacks
    assert "registered" not in r.stderr.lower() or "not registered" in r.stderr.lower(), r.stderr


def test_second_daemon_on_the_same_data_dir_refuses_naming_the_pid(make_daemon):
    first = make_daemon()
    second = make_daemon(start=False, data_dir=first.home)
    rc = second.try_start(timeout=30)
    log = second.log_since_start()
    assert rc is not None and rc != 0, "a second daemon on the same data directory must not start"
    assert f"another fnx daemon (pid {first.pid})" in log and str(first.home) in log, log[-2000:]
    # The first one goes on serving.
    assert first.api("GET", "/v1/health", token=None).status == 200
    assert (first.home / "fnx.lock").read_text().strip() == str(first.pid)


def test_tasks_get_nothing_of_the_daemons_environment(make_daemon):
    d = make_daemon(env={"FNX_TEST_DAEMON_ONLY": "not-for-tasks"})
    fid = d.register(ENV_OF_TASK)
    [tid] = d.submit([{"function": fid, "args": []}])
    env = result_value(d.wait_task(tid))
    assert "FNX_HOME" not in env, env
    assert "FNX_TEST_DAEMON_ONLY" not in env, env
    # (A pyenv shim for python3 puts its own directories in front.)
    assert env.get("PATH", "").endswith(os.environ["PATH"]), env
    # What the site lists in daemon.pass_env does reach tasks (the tests list their marker).
    assert env.get("FNX_TEST_MARK") == d.fnx_env.mark, env
    # Shell tasks too.
    sid = d.register({"kind": "shell", "command": "env"})
    [tid] = d.submit([{"function": sid, "args": {}}])
    out = d.wait_task(tid)["result"]["value"]["stdout"]
    assert "FNX_HOME=" not in out and "FNX_TEST_DAEMON_ONLY" not in out, out


def test_fault_31_rogue_manager_on_loopback_gets_nothing_from_the_daemon(make_daemon, fnx_env):
    # The default configuration: the interchange on loopback, no encryption setting.
    d = make_daemon(interchange={"heartbeat_period_s": 0.5, "heartbeat_threshold_s": 3})
    g = gate(fnx_env)
    sid = d.register({"kind": "shell", "command": GATE.replace("{d}", str(g))})
    ids = d.submit([{"function": sid, "args": {"i": i}} for i in range(20)])
    wait_started(g, [0, 1])  # both workers busy, the rest queued
    t0 = time.monotonic()
    r = rogue_manager(fnx_env, f"tcp://127.0.0.1:{d.interchange_port}")
    assert_refused(r, time.monotonic() - t0)
    wait_for(lambda: "handshake with a manager failed" in d.log_since_start(), 5,
             "the daemon logs the refused handshake")
    assert d.status()["pools"][0]["managers_connected"] == 1
    (g / "release").touch()
    recs = d.wait_all(ids, timeout=60)
    assert all(rec["state"] == "success" for rec in recs.values()), recs
    # Every task ran here (a task the rogue took would have no marker file).
    assert sorted(os.listdir(g)) == sorted(
        ["release", *(f"started-{i}" for i in range(20)), *(f"done-{i}" for i in range(20))])


def test_fault_31_rogue_manager_gets_nothing_from_fnx_map(fnx_env):
    g = gate(fnx_env)
    run = fnx_env.start_map("--shell", GATE.replace("{d}", str(g)),
                            inputs=({"i": i} for i in range(10)))
    wait_started(g, [0, 1])
    log = run.run_dir / "fnx.log"
    line = wait_for(lambda: log.exists() and re.search(r"interchange listening on (\S+)",
                                                       log.read_text()), 10,
                    "the map's interchange address in its log")
    endpoint = line.group(1)
    assert endpoint.startswith("tcp://127.0.0.1:"), endpoint
    t0 = time.monotonic()
    r = rogue_manager(fnx_env, endpoint)
    assert_refused(r, time.monotonic() - t0)
    (g / "release").touch()
    res = run.wait(60)
    assert res.returncode == 0, res.explain()
    by_index = res.by_index()
    assert sorted(by_index) == list(range(10)), res.lines
    assert all(x["ok"] for x in res.lines), res.lines


# ---------------------------------------------------------------------------------------------
# The local socket (identity from the kernel) and tokens bound to users
# ---------------------------------------------------------------------------------------------

WHOAMI_AS_OTHER = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b"GET /v1/whoami HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
print(json.dumps({"status": int(head.split()[1]), "body": json.loads(body)}))
"""


def public_socket_dir() -> str:
    """A directory any account may enter, for a socket others must reach."""
    d = tempfile.mkdtemp(prefix="fnx-sock-")
    os.chmod(d, 0o755)
    return d


def test_the_local_socket_knows_the_caller_without_a_token(make_daemon, fnx_env):
    sock_dir = public_socket_dir()
    try:
        sock = f"{sock_dir}/fnx.sock"
        d = make_daemon(daemon={"socket": sock})
        assert oct(os.stat(sock).st_mode & 0o777) == "0o666"
        # In service mode users' tasks run as the daemon's own account: on the socket that
        # account is nobody in particular, and must show its token like anyone remote.
        me = d.api("GET", "/v1/whoami", token=None, socket_path=sock)
        assert me.status == 401 and "client.json" in me.body["error"]["message"], me
        me = d.api("GET", "/v1/whoami", socket_path=sock)
        assert me.status == 200 and me.body == {"user": d.user, "admin": True}, me
        # A token counts over the socket (an admin's, another user's...).
        bob = d.create_user("bob")
        r = d.api("GET", "/v1/whoami", token=bob, socket_path=sock)
        assert r.body == {"user": "bob", "admin": False}, r
        # The CLI finds the socket when nothing names a URL (FNX_HOME's socket).
        env = dict(fnx_env.env, FNX_HOME=sock_dir, FNX_TOKEN=bob)
        env.pop("FNX_URL", None)
        out = d.fnx("status", "--output", "json", env=env)
        assert out.returncode == 0 and json.loads(out.stdout)["user"] == "bob", out
        other = as_other_account()
        if other:
            # Another account with no fnx user (service mode): 401 naming what to ask for.
            r = subprocess.run([*other, "/usr/bin/python3", "-c", WHOAMI_AS_OTHER, sock],
                               capture_output=True, text=True, timeout=30)
            doc = json.loads(r.stdout)
            assert doc["status"] == 401 and "nobody" in doc["body"]["error"]["message"], doc
            d.create_user("nobody")
            r = subprocess.run([*other, "/usr/bin/python3", "-c", WHOAMI_AS_OTHER, sock],
                               capture_output=True, text=True, timeout=30)
            doc = json.loads(r.stdout)
            assert doc == {"status": 200, "body": {"user": "nobody", "admin": False}}, doc
        d.stop()
        assert not os.path.exists(sock), "the daemon removes its socket when it stops"
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_tokens_expire_and_a_revoked_one_ends_an_open_long_poll_within_a_second(make_daemon):
    d = make_daemon()
    # An expiring token, made through the API by an admin.
    r = d.api("POST", "/v1/tokens", {"user": "alice", "expires_s": 1.0})
    assert r.status == 201 and r.body["user"] == "alice" and r.body["expires"], r
    short_lived = r.body["token"]
    assert d.api("GET", "/v1/whoami", token=short_lived).status == 200
    wait_for(lambda: d.api("GET", "/v1/whoami", token=short_lived).status == 401, 3,
             "the token expires")
    # A token from the CLI, revoked by the CLI while a long-poll holds it.
    alice = d.create_user("alice")
    mine = d.api("GET", "/v1/tokens", token=alice).body["tokens"]
    assert [t["user"] for t in mine] == ["alice", "alice"] and [t["live"] for t in mine] == \
        [False, True], mine
    box: dict = {}

    def poll():
        box["r"] = d.api("GET", "/v1/results?since=end&wait=0", token=alice)
        cursor = box["r"].body["cursor"]
        box["started"] = time.monotonic()
        box["r"] = d.api("GET", f"/v1/results?since={cursor}&wait=30", token=alice)
        box["ended"] = time.monotonic()

    import threading
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    wait_for(lambda: "started" in box, 10, "the long-poll is open")
    time.sleep(0.5)
    r = d.fnx("token", "revoke", str(mine[1]["id"]), "--config", str(d.config_path))
    assert r.returncode == 0 and "alice" in r.stdout, r
    revoked_at = time.monotonic()
    t.join(10)
    assert "ended" in box, "the long-poll did not end"
    took = box["ended"] - revoked_at
    assert box["r"].status == 401, box["r"]
    assert took < 1.5, f"the revoked token's poll ended {took:.2f} s after the revocation"
    assert d.api("GET", "/v1/whoami", token=alice).status == 401
    # The CLI lists it as revoked.
    listed = d.fnx("token", "list", "--user", "alice", "--config", str(d.config_path))
    assert listed.returncode == 0 and "revoked" in listed.stdout, listed


def test_users_manage_only_their_own_tokens(make_daemon):
    d = make_daemon()
    alice, bob = d.create_user("alice"), d.create_user("bob")
    r = d.api("POST", "/v1/tokens", {"user": "bob"}, token=alice)
    assert r.status == 403, r
    r = d.api("POST", "/v1/tokens", {"admin": True}, token=alice)
    assert r.status == 403, r
    r = d.api("POST", "/v1/tokens", {"expires_s": -1}, token=alice)
    assert r.status == 400, r
    r = d.api("POST", "/v1/tokens", {"nope": 1}, token=alice)
    assert r.status == 400 and "nope" in r.body["error"]["message"], r
    second = d.api("POST", "/v1/tokens", {}, token=alice)
    assert second.status == 201 and second.body["user"] == "alice", second
    assert d.api("GET", "/v1/whoami", token=second.body["token"]).body["user"] == "alice"
    bobs = d.api("GET", "/v1/tokens", token=bob).body["tokens"]
    assert [t["user"] for t in bobs] == ["bob"], bobs
    # Alice cannot see or revoke bob's token: 404, as if it did not exist.
    assert d.api("DELETE", f"/v1/tokens/{bobs[0]['id']}", token=alice).status == 404
    assert d.api("GET", "/v1/whoami", token=bob).status == 200
    # Revoking her own through the API takes effect at once.
    assert d.api("DELETE", f"/v1/tokens/{second.body['id']}", token=alice).status == 204
    assert d.api("GET", "/v1/whoami", token=second.body["token"]).status == 401
    everyone = d.api("GET", "/v1/tokens").body["tokens"]
    assert {t["user"] for t in everyone} >= {"alice", "bob", d.user}, everyone


PATCH_SUM = {"kind": "python", "entry": "patch", "source": (
    "def patch():\n"
    "    import builtins, os\n"
    "    builtins.sum = lambda *a, **k: 'tampered'\n"
    "    return os.getpid()\n")}
USE_SUM = {"kind": "python", "entry": "use", "source": (
    "def use():\n"
    "    import os\n"
    "    return [sum([1, 2]), os.getpid()]\n")}


def test_a_worker_never_serves_two_users_in_service_mode(make_daemon):
    # One manager with a single worker slot: without per-user workers, bob's task would land
    # on the worker alice's task patched.
    d = make_daemon(pools={"local": {"workers_per_manager": 1}})
    alice, bob = d.create_user("alice"), d.create_user("bob")
    pf, uf = d.register(PATCH_SUM, token=alice), d.register(USE_SUM, token=bob)
    [t] = d.submit([{"function": pf, "args": []}], token=alice)
    alice_worker = result_value(d.wait_task(t, token=alice))
    [t] = d.submit([{"function": uf, "args": []}], token=bob)
    total, bob_worker = result_value(d.wait_task(t, timeout=60, token=bob))
    assert total == 3, "bob's task ran on a worker alice's task had patched"
    assert bob_worker != alice_worker
    # Alice's own later tasks may share her worker (that is her business).
    af = d.register(USE_SUM, token=alice)
    [t] = d.submit([{"function": af, "args": []}], token=alice)
    total, again = result_value(d.wait_task(t, timeout=60, token=alice))
    assert total in (3, "tampered") and again != bob_worker


# Task source: what reading each path gave ("read", or the error's type).
TRY_READ = '''
def try_read(paths):
    import os
    seen = {}
    for p in paths:
        try:
            if os.path.isdir(p):
                os.listdir(p)
            else:
                open(p, "rb").read(1)
            seen[p] = "read"
        except OSError as e:
            seen[p] = type(e).__name__
    return seen
'''

REACH = {"kind": "python", "entry": "reach", "source": TRY_READ + '''
def reach(read, append, pids, scratch):
    import os
    out = try_read(read)
    for p in append:
        try:
            open(p, "ab").close()
            out["append " + p] = "written"
        except OSError as e:
            out["append " + p] = type(e).__name__
    for pid in pids:
        try:
            os.kill(pid, 0)
            out["signal %d" % pid] = "sent"
        except OSError as e:
            out["signal %d" % pid] = type(e).__name__
    with open(os.path.join(scratch, "ok"), "w") as f:
        f.write("still works")
    out["input"] = open("in.txt").read()
    return out
'''}


def test_service_mode_tasks_cannot_reach_the_daemons_files_nor_signal_it(make_daemon, fnx_env):
    """Tasks run under the daemon's own account here, so the account's permissions cannot keep
    them out: a Landlock sandbox does (where the kernel has it, as this one does)."""
    d = make_daemon()
    runtime = d.home / "runs" / "local" / "manager-0" / "fnx_worker.py"
    secrets = [str(d.home / "fnx.db"), str(d.home / "client.json"), str(d.home / "keys"),
               str(d.home / "keys" / "local.manager"), str(d.home)]
    manager = [p.pid for p in fnx_env.processes() if " manager " in f" {p.cmdline} "]
    assert manager, fnx_env.processes()
    scratch = fnx_env.dir / "scratch"
    scratch.mkdir()
    fid = d.register(REACH)
    [t] = d.submit([{"function": fid, "args": [secrets, [str(runtime)], [d.pid, manager[0]],
                                               str(scratch)],
                     "files": [{"name": "in.txt", "data_b64": "aW5wdXQ="}]}])
    out = result_value(d.wait_task(t, timeout=60))
    for p in secrets:
        assert out[p] == "PermissionError", (p, out)
    assert out[f"append {runtime}"] == "PermissionError", out
    assert out[f"signal {d.pid}"] == "PermissionError", out
    assert out[f"signal {manager[0]}"] == "PermissionError", out
    # What tasks need still works: their input files, and the rest of the file system.
    assert out["input"] == "input" and (scratch / "ok").read_text() == "still works"
    assert "sandboxed away from" in (d.home / "runs" / "local" / "manager-0" /
                                     "manager.log").read_text()


def test_fault_31_a_wrong_password_on_loopback_is_refused(make_daemon):
    """Managers the daemon starts on loopback authenticate with a password (ZeroMQ PLAIN,
    unencrypted: other accounts cannot read loopback); a peer with any other password gets
    nothing and is logged."""
    import msgpack
    import zmq
    d = make_daemon()
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.plain_username = b"fnx"
        s.plain_password = b"0" * 64
        s.connect(f"tcp://127.0.0.1:{d.interchange_port}")
        reg = {"register": ["guess", "nowhere", 1, 1, 1, 0, None, False, "0.1.0"]}
        s.send(msgpack.packb([4, reg]))
        assert not s.poll(3000), "a peer with a wrong password got an answer"
    finally:
        ctx.destroy(linger=0)
    wait_for(lambda: "refused a manager connection" in d.log_since_start(), 5,
             "the daemon logs the refused password")
    assert "guess" not in d.log_since_start()
    sid = d.register({"kind": "shell", "command": "echo ok"})
    [t] = d.submit([{"function": sid, "args": {}}])
    assert d.wait_task(t)["state"] == "success"


def test_a_function_cannot_pick_a_container_runtime_its_pool_did_not_configure(make_daemon):
    d = make_daemon(pools={"local": {"workers_per_manager": 1, "container_runtime": "apptainer"}})
    fid = d.register({"kind": "shell", "command": "echo ran",
                      "container": {"image": "alpine", "runtime": "docker"}})
    [t] = d.submit([{"function": fid, "args": {}}])
    rec = d.wait_task(t, timeout=30)
    assert rec["state"] == "failed", rec
    assert rec["error"]["type"] == "ContainerUnavailable", rec
    assert "docker" in rec["error"]["message"] and "apptainer" in rec["error"]["message"], rec
