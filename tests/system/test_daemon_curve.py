"""Encrypted, authenticated manager links (CurveZMQ; FAULTS.md 23): managers hold a key file
the daemon issued; a wrong client key, a wrong server key or a plaintext manager is refused
before any message is delivered, fails fast with a clear error, and other managers go on."""

from __future__ import annotations

import os
import subprocess
import time

import zmq

from conftest import wait_for


def manager(fnx_env, d, uid: str, keys=None) -> subprocess.CompletedProcess:
    argv = [str(fnx_env.bin), "manager", "--interchange",
            f"tcp://127.0.0.1:{d.interchange_port}", "--uid", uid,
            "--run-dir", str(d.dir / "external"), "--run-id", f"ext-{uid}", "--slots", "1",
            "--heartbeat-threshold-ms", "3000"]
    if keys is not None:
        argv += ["--curve-keys", str(keys)]
    return subprocess.run(argv, cwd=fnx_env.dir, env=fnx_env.env, capture_output=True,
                          text=True, timeout=30)


def key_file(path, server_public: str, public: str, secret: str, mode=0o600):
    path.write_text(f"server_public = {server_public}\npublic = {public}\nsecret = {secret}\n")
    os.chmod(path, mode)
    return path


def issued(d) -> dict:
    text = (d.home / "keys" / "local.manager").read_text()
    return {k.strip(): v.strip() for k, v in
            (line.split("=", 1) for line in text.splitlines() if "=" in line)}


def encrypted_daemon(make_daemon):
    return make_daemon(interchange={"encrypt": "always", "heartbeat_period_s": 0.5,
                                    "heartbeat_threshold_s": 3})


def run_one(d) -> None:
    sid = d.register({"kind": "shell", "command": "echo hi {x}"})
    [tid] = d.submit([{"function": sid, "args": {"x": "there"}}])
    rec = d.wait_task(tid, timeout=30)
    assert rec["state"] == "success" and rec["result"]["value"]["stdout"] == "hi there\n", rec


def test_encrypted_links_work_and_keys_are_private(make_daemon):
    d = encrypted_daemon(make_daemon)
    run_one(d)
    keys = d.home / "keys"
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    for f in ("interchange.key", "local.manager"):
        assert oct((keys / f).stat().st_mode & 0o777) == "0o600", f
    # The manager is given the file's path, never a key, on its command line.
    secret = issued(d)["secret"]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            assert secret not in cmd, f"a secret key shows in ps: {cmd}"


def test_fault_23_wrong_client_key_is_refused(make_daemon, fnx_env, tmp_path):
    d = encrypted_daemon(make_daemon)
    pub, sec = (k.decode() for k in zmq.curve_keypair())
    keys = key_file(tmp_path / "stolen.keys", issued(d)["server_public"], pub, sec)
    t0 = time.monotonic()
    r = manager(fnx_env, d, "intruder", keys)
    took = time.monotonic() - t0
    assert r.returncode != 0 and took < 3.5, (r.returncode, took, r.stderr)
    assert "refused this manager's key" in r.stderr, r.stderr
    wait_for(lambda: "was not issued by this daemon" in d.log_since_start(), 5,
             "the daemon logs the refused key")
    run_one(d)  # the daemon's own manager is unaffected


def test_fault_23_wrong_server_key_fails_fast(make_daemon, fnx_env, tmp_path):
    d = encrypted_daemon(make_daemon)
    other_server = zmq.curve_keypair()[0].decode()
    mine = issued(d)
    keys = key_file(tmp_path / "other.keys", other_server, mine["public"], mine["secret"])
    t0 = time.monotonic()
    r = manager(fnx_env, d, "lost", keys)
    took = time.monotonic() - t0
    assert r.returncode != 0 and took < 3.5, (r.returncode, took, r.stderr)
    assert "handshake failed" in r.stderr or "key file" in r.stderr, r.stderr
    assert "handshake with a manager failed" in d.log_since_start()
    run_one(d)


def test_fault_23_plaintext_manager_against_an_encrypted_interchange(make_daemon, fnx_env):
    d = encrypted_daemon(make_daemon)
    t0 = time.monotonic()
    r = manager(fnx_env, d, "plain")
    took = time.monotonic() - t0
    assert r.returncode != 0 and took < 6, (r.returncode, took, r.stderr)
    assert "--curve-keys" in r.stderr, r.stderr  # the error says what is missing
    wait_for(lambda: "handshake with a manager failed" in d.log_since_start(), 5,
             "the daemon logs the failed handshake")
    counts = d.status()["pools"][0]
    assert counts["managers_connected"] == 1, counts
    run_one(d)


def test_fault_23_key_files_and_directories_others_can_read_are_refused(make_daemon, fnx_env,
                                                                          tmp_path):
    d = encrypted_daemon(make_daemon)
    mine = issued(d)
    loose = key_file(tmp_path / "loose.keys", mine["server_public"], mine["public"],
                     mine["secret"], mode=0o644)
    r = manager(fnx_env, d, "loose", loose)
    assert r.returncode != 0 and "chmod 600" in r.stderr, r.stderr
    d.stop()
    os.chmod(d.home / "keys", 0o755)
    rc = d.try_start(timeout=20)
    log = d.log_since_start()
    assert rc is not None and rc != 0, "the daemon must refuse a key directory others can enter"
    assert "mode 755" in log and "chmod 700" in log, log[-2000:]
