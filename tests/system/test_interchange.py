"""Hostile traffic on the interchange's manager port during a run (FAULTS.md 19, 20 and 21), and
heartbeats answered while the store forgets a mass of finished tasks (FAULTS.md 10)."""

import os
import random
import re
import socket
import textwrap
import threading
import time

import msgpack
import pytest
import zmq

from conftest import all_pids, read_proc, wait_for

PROTOCOL_VERSION = 4

GATED = """
    import os, time

    def triple(d, x):
        open(os.path.join(d, "pid-%d-%d" % (os.getpid(), x)), "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(d, "release")):
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            time.sleep(0.01)
        return x * 3
"""


def interchange_port(bg) -> int:
    m = wait_for(
        lambda: re.search(r"interchange listening on tcp://127\.0\.0\.1:(\d+)", bg.log_text()),
        10, f"the interchange address in {bg.run_dir / 'fnx.log'}",
    )
    return int(m.group(1))


def register(version, uid="intruder"):
    msg = {"register": [uid, "nowhere", 4242, 1, 1, 0, None, False, "0.0.0-test"]}
    return msgpack.packb([version, msg])


def garbage_messages(rng):
    """Malformed frames: random bytes, truncated msgpack, well-formed msgpack of wrong shapes."""
    good = register(PROTOCOL_VERSION)
    yield b""
    for n in (1, 7, 64, 4096, 200_000):
        yield rng.randbytes(n)
    yield good[: len(good) // 2]                                   # truncated
    yield msgpack.packb([PROTOCOL_VERSION, {"no_such_message": []}])  # unknown kind
    yield msgpack.packb([PROTOCOL_VERSION, "register"])           # wrong type
    yield msgpack.packb({"register": 1})                            # no envelope
    yield msgpack.packb([PROTOCOL_VERSION, {"results": [[1, 2, 3]]}])  # results, never registered
    yield msgpack.packb([PROTOCOL_VERSION, "heartbeat"])           # heartbeat, never registered
    yield b"\xdb\xff\xff\xff\xff"                                    # str32 claiming 4 GiB
    yield b"\x92\x01\xdd\xff\xff\xff\xff"                            # array32 claiming 4G items


def manager_keys(d) -> dict[str, str]:
    """The pool's manager key file of daemon `d` (what a key holder has)."""
    text = (d.home / "keys" / "local.manager").read_text()
    return dict((k.strip(), v.strip()) for k, v in
                (line.split("=", 1) for line in text.splitlines() if "=" in line))


def keyed_socket(ctx, d):
    """A DEALER that passes the handshake of `d`'s interchange with the pool's key."""
    keys = manager_keys(d)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = keys["server_public"].encode()
    sock.curve_publickey = keys["public"].encode()
    sock.curve_secretkey = keys["secret"].encode()
    sock.connect(f"tcp://127.0.0.1:{d.interchange_port}")
    return sock


def test_fault_19_21_garbage_and_wrong_version_on_manager_port_run_unaffected(fnx_env):
    fnx_env.write("gated.py", textwrap.dedent(GATED))
    gate = fnx_env.dir / "gate"
    gate.mkdir()
    n = 12
    bg = fnx_env.start_map(
        "gated:triple", "--workers", "2", inputs=([str(gate), i] for i in range(n))
    )
    port = interchange_port(bg)
    wait_for(lambda: len(list(gate.glob("pid-*"))) >= 2, 20, "two running tasks")
    rng = random.Random(19)

    # Raw TCP garbage, not even a ZMTP greeting.
    for size in (16, 100_000):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(rng.randbytes(size))
    # A ZMTP signature followed by nonsense.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + rng.randbytes(1000))

    ctx = zmq.Context()
    try:
        # Without a key (plaintext ZMTP) nothing reaches the state machine, however well-formed:
        # the handshake fails first, loopback included (FAULTS.md 31).
        junk = ctx.socket(zmq.DEALER)
        junk.setsockopt(zmq.LINGER, 0)
        junk.connect(f"tcp://127.0.0.1:{port}")
        for frame in garbage_messages(rng):
            junk.send(frame)
        junk.send_multipart([b"two", b"parts"])
        junk.send(register(PROTOCOL_VERSION, uid="no-key"))
        assert not junk.poll(3000), "a manager without a key got an answer"
    finally:
        # Closes the sockets too: a failed assertion above must not hang on ctx.term().
        ctx.destroy(linger=0)

    (gate / "release").touch()
    run = bg.wait(40)

    assert run.returncode == 0, run.explain()
    r = run.by_index()
    assert sorted(r) == list(range(n))
    for i, line in r.items():
        assert line == {"index": i, "ok": True, "result": 3 * i}, line
    log = (run.run_dir / "fnx.log").read_text(errors="replace")
    assert "handshake with a manager failed" in log, "refused peers must be logged"
    assert "no-key" not in log, "nothing a peer without a key sent may reach the interchange"
    # The real manager stayed registered the whole time: exactly one registration.
    assert log.count("registered with") == 1, log


def test_fault_19_21_garbage_and_wrong_version_from_a_key_holder(make_daemon):
    """A peer holding an issued key passes the handshake; its malformed messages are then
    dropped and logged, and a registration in another protocol version is refused naming both
    versions, while the daemon's own manager runs tasks. (`encrypt = "always"`: the pool's key
    file is what a key holder has.)"""
    d = make_daemon(interchange={"encrypt": "always"})
    rng = random.Random(21)
    ctx = zmq.Context()
    try:
        def keyed():
            return keyed_socket(ctx, d)

        junk = keyed()
        for frame in garbage_messages(rng):
            junk.send(frame)
        junk.send_multipart([b"two", b"parts"])
        bad = keyed()
        bad.send(register(99, uid="from-the-future"))
        assert bad.poll(10_000), "no answer to a registration with protocol version 99"
        reply = msgpack.unpackb(bad.recv())
        assert reply == [
            PROTOCOL_VERSION,
            {"rejected": [
                "protocol version mismatch: manager speaks version 99, "
                f"interchange speaks version {PROTOCOL_VERSION}"
            ]},
        ]
        # The same protocol from another fnx release is refused too, naming both releases.
        old = keyed()
        old.send(register(PROTOCOL_VERSION, uid="old-release"))
        assert old.poll(10_000), "no answer to a registration from another fnx release"
        version = d.api("GET", "/v1/health", token=None).body["version"]
        assert msgpack.unpackb(old.recv()) == [PROTOCOL_VERSION, {"rejected": [
            "fnx release mismatch: manager old-release on nowhere is fnx 0.0.0-test, the "
            f"interchange is fnx {version}; run the same fnx release on the nodes (the pool's "
            "fnx_path)"]}]
    finally:
        ctx.destroy(linger=0)
    sid = d.register({"kind": "shell", "command": "echo {x}"})
    [tid] = d.submit([{"function": sid, "args": {"x": "fine"}}])
    rec = d.wait_task(tid)
    assert rec["state"] == "success" and rec["result"]["value"]["stdout"] == "fine\n", rec
    log = d.log_since_start()
    assert "version 99" in log, "the refused registration must be visible in the log"
    assert "fnx release mismatch" in log
    assert "ignored" in log, "malformed messages must be logged (rate-limited), not silently"
    assert log.count("registered with") == 1, log


def test_fault_20_results_and_heartbeats_from_a_manager_that_does_not_hold_the_task(make_daemon,
                                                                                    fnx_env):
    """A peer with an issued key registers, then reports a result for a task running on the
    daemon's own manager, and for a task that does not exist: both are discarded and logged;
    the task's own result is the one recorded."""
    d = make_daemon(interchange={"encrypt": "always"})
    gate = fnx_env.dir / "gate"
    gate.mkdir()
    sid = d.register({"kind": "shell", "command":
                      f"while [ ! -e {gate}/release ]; do sleep 0.02; done; echo real"})
    [tid] = d.submit([{"function": sid, "args": {}}])
    wait_for(lambda: d.task(tid)["state"] == "running", 30, "the task running")
    version = d.api("GET", "/v1/health", token=None).body["version"]
    ctx = zmq.Context()
    try:
        s = keyed_socket(ctx, d)
        s.send(msgpack.packb([PROTOCOL_VERSION, {"register": [
            "forger", "nowhere", 4242, 1, 1, 0, None, False, version]}]))
        assert s.poll(10_000), "the forger's registration got no answer"
        s.recv()
        forged = {"ok": ["json", b'"forged"']}
        s.send(msgpack.packb([PROTOCOL_VERSION, "heartbeat"]))
        s.send(msgpack.packb([PROTOCOL_VERSION, {"results": [[tid, 1, forged],
                                                              [999_999, 1, forged]]}]))
        wait_for(lambda: d.log_since_start().count("discarded the result of") >= 2, 10,
                 lambda: "both forged results discarded\n" + d.log_tail())
    finally:
        ctx.destroy(linger=0)
    assert d.task(tid)["state"] == "running", "a forged result finished the task"
    (gate / "release").touch()
    rec = d.wait_task(tid)
    assert rec["state"] == "success" and rec["result"]["value"]["stdout"] == "real\n", rec


class HeartbeatProbes:
    """`n` peers with the pool's key that register as managers (1 slot) and heartbeat every
    `period` seconds from a thread, timing each heartbeat until the interchange echoes it."""

    def __init__(self, d, n: int, version: str, period: float):
        self.ctx = zmq.Context()
        self.socks = [keyed_socket(self.ctx, d) for _ in range(n)]
        for i, s in enumerate(self.socks):
            s.send(msgpack.packb([PROTOCOL_VERSION, {"register": [
                f"probe-{i}", "probe-host", 4242, 1, 1, 0, None, False, version]}]))
        for i, s in enumerate(self.socks):
            assert s.poll(30_000), f"probe {i} got no answer to its registration"
            answer = msgpack.unpackb(s.recv())
            assert "registered" in answer[1], f"probe {i} was refused: {answer}"
        self.period = period
        self.rtts: list[float] = []
        self.unanswered = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        hb = msgpack.packb([PROTOCOL_VERSION, "heartbeat"])
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        while not self.stop.is_set():
            sent = time.monotonic()
            for s in self.socks:
                s.send(hb)
            pending = set(range(len(self.socks)))
            index = {s: i for i, s in enumerate(self.socks)}
            deadline = sent + self.period
            while pending and time.monotonic() < deadline + 10:
                for s, _ in poller.poll(100):
                    while s.poll(0):
                        msg = msgpack.unpackb(s.recv())
                        if msg[1] == "heartbeat" and index[s] in pending:
                            pending.discard(index[s])
                            self.rtts.append(time.monotonic() - sent)
            self.unanswered += len(pending)
            time.sleep(max(0.0, deadline - time.monotonic()))

    def close(self):
        self.stop.set()
        self.thread.join(30)
        self.ctx.destroy(linger=0)


def test_fault_10_forgetting_and_cancelling_finished_tasks_drops_no_manager(make_daemon):
    """FAULTS 10 in its gated form: with 100 managers connected, cancel and then forget (prune)
    100,000 finished tasks. No manager is dropped, and every heartbeat is answered within half
    the threshold. FNX_FAULT10_TASKS sets the number (1,000,000 for the full form against a
    release build; benches/README.md has its figures)."""
    n = int(os.environ.get("FNX_FAULT10_TASKS", "100000"))
    threshold = 6.0
    d = make_daemon(interchange={"encrypt": "always", "heartbeat_period_s": 1,
                                 "heartbeat_threshold_s": threshold},
                    store={"sync": "normal", "result_retention_s": 0, "prune_interval_s": 1})
    fid = d.register({"kind": "python", "entry": "noop",
                      "source": "def noop(i=0):\n    return i\n"})
    ids: list[int] = []
    for start in range(0, n, 10_000):
        ids += d.submit([{"function": fid, "args": [i]}
                         for i in range(start, min(n, start + 10_000))])
    wait_for(lambda: d.status()["tasks"]["finished"] >= n, 600,
             lambda: f"{n} tasks finished: {d.status()['tasks']}")
    version = d.api("GET", "/v1/health", token=None).body["version"]
    probes = HeartbeatProbes(d, 100, version, period=0.5)
    try:
        time.sleep(2)
        t0 = time.monotonic()
        # Cancel every finished task (nothing to cancel, but each id is looked at), then fetch
        # every result: with result_retention_s = 0 the store forgets them at its next prunes.
        for k in range(0, n, 10_000):
            r = d.api("POST", "/v1/tasks/cancel", {"ids": ids[k:k + 10_000]})
            assert r.status in (200, 202), (r.status, r.body)
        cursor = 0
        fetched = 0
        while fetched < n:
            r = d.api("GET", f"/v1/results?since={cursor}&limit=10000")
            assert r.status == 200, (r.status, r.body)
            if not r.body["results"]:
                break
            fetched += len(r.body["results"])
            cursor = r.body["cursor"]
        assert fetched == n, f"fetched {fetched} of {n} results"
        wait_for(lambda: d.api("GET", f"/v1/tasks/{ids[-1]}").status == 404, 120,
                 "the store to forget the last task")
        storm_s = time.monotonic() - t0
        time.sleep(2)
    finally:
        probes.close()
    st = d.status()
    pool = st["pools"][0]
    assert pool["managers_connected"] == 101, f"a manager was dropped: {pool}"
    assert probes.unanswered == 0, f"{probes.unanswered} heartbeats got no answer"
    assert probes.rtts, "no heartbeat was timed"
    worst = max(probes.rtts)
    assert worst < threshold / 2, \
        f"a heartbeat took {worst:.2f} s to be answered (threshold {threshold} s)"
    log = d.log_since_start()
    assert not re.search(r"manager .* lost", log), log[-3000:]
    rtts = sorted(probes.rtts)
    print(f"\nFAULTS 10: {n} finished tasks cancelled and forgotten in {storm_s:.1f} s with 101 "
          f"managers; heartbeat answer p50 {rtts[len(rtts) // 2] * 1e3:.1f} ms, p99 "
          f"{rtts[int(len(rtts) * 0.99)] * 1e3:.1f} ms, max {worst * 1e3:.1f} ms")


def test_bench_dispatch_spreads_simulated_managers_over_processes_and_leaves_none(fnx_env):
    """`fnx bench dispatch` with more simulated managers than one process holds (2,000) runs
    them in child processes (`fnx bench sim-managers`): every manager registers, every task
    completes, and no child outlives the run."""
    import json
    import subprocess

    def sims():
        procs = (read_proc(pid) for pid in all_pids())
        return [p.pid for p in procs
                if p and " sim-managers " in p.cmdline and p.state not in "ZX"]

    assert not sims(), "simulated managers of another run are alive"
    proc = subprocess.Popen(
        [str(fnx_env.bin), "bench", "dispatch", "--managers", "2100", "--slots", "4",
         "--tasks", "20000", "--memory-tasks", "0"],
        cwd=fnx_env.dir, env=fnx_env.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    most = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None:
        most = max(most, len(sims()))
        assert time.monotonic() < deadline, "fnx bench dispatch did not finish in 120 s"
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert (result["managers"], result["tasks"], result["failed"]) == (2100, 20000, 0), result
    assert result["workers"] == 2100 * 4
    assert most == 2, f"{most} sim-managers processes seen, not 2 (2,000 and 100 managers)"
    wait_for(lambda: not sims(), 10, "the simulated managers' processes exited")
