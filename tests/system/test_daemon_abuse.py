"""A hostile but unprivileged API client against the daemon (issue 12, FAULTS 29 and 33):
stalled and idle connections, connection caps, descriptor exhaustion, huge chunked bodies and
bodies that stop half way. Each test checks what a client sees (a status and an error code),
what the admin's log says, and that the daemon serves again afterwards."""

from __future__ import annotations

import re
import resource
import socket
import time

import os
import threading

from conftest import read_proc, wait_for
from daemon_env import NOOP, error_of, in_thread, result_value

HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"


def connect(d, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", d.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def answer_of(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the daemon sends until it closes the connection or `timeout` passes."""
    s.settimeout(timeout)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and b'"}}' in out:
                break
    except (socket.timeout, ConnectionResetError):
        pass
    return out


def closed_by_daemon(s: socket.socket, timeout: float) -> bool:
    """True if the daemon closes `s` (EOF or reset) within `timeout` seconds."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def health_status(d) -> int:
    s = connect(d)
    try:
        s.sendall(HEALTH)
        head = answer_of(s, 5.0).split(b"\r\n", 1)[0]
        return int(head.split()[1]) if head.startswith(b"HTTP/1.1") else 0
    finally:
        s.close()


def test_fault_33_stalled_and_idle_connections_are_closed_and_capped_per_peer(make_daemon):
    d = make_daemon(limits={"max_connections_per_peer": 20, "idle_timeout_s": 2,
                            "body_timeout_s": 2})
    # Twenty connections that send one byte of a request head and stall.
    stalled = [connect(d) for _ in range(20)]
    for s in stalled:
        s.sendall(b"G")
    # Once the daemon has accepted all twenty (asked over the local socket, another peer, whose
    # own connection counts too: 21 open)...
    deadline = time.monotonic() + 10
    while True:
        text = d.api("GET", "/metrics", token=None, socket_path=d.home / "fnx.sock").body
        open_now = [float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("fnx_api_connections ")]
        if open_now and open_now[0] >= 21:
            break
        assert time.monotonic() < deadline, f"the daemon did not accept the 20 connections: {text}"
        time.sleep(0.05)
    # ...the peer is at its cap: the 21st connection gets 503 with Retry-After at once.
    t0 = time.monotonic()
    s = connect(d)
    answer = answer_of(s, 5.0)
    s.close()
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"Retry-After: 1" in answer and b"too_many_connections" in answer, answer
    assert time.monotonic() - t0 < 3, "the refusal must not wait for a stalled connection"
    # Another peer (the local socket, keyed by uid) is not affected.
    r = d.api("GET", "/v1/health", token=None, socket_path=d.home / "fnx.sock")
    assert r.status == 200, r
    # The stalled connections are closed after the idle timeout (2 s), and TCP serves again.
    for s in stalled:
        assert closed_by_daemon(s, 10.0), "a stalled connection stayed open past idle_timeout_s"
        s.close()
    assert health_status(d) == 200
    # An idle keep-alive connection is closed too, after it was served once.
    s = connect(d)
    s.sendall(HEALTH)
    assert answer_of(s, 5.0).startswith(b"HTTP/1.1 200")
    assert closed_by_daemon(s, 10.0), "an idle keep-alive connection was never closed"
    s.close()
    log = d.log_since_start()
    assert "connections from 127.0.0.1 are open (limits.max_connections_per_peer = 20)" in log, \
        d.log_tail()


def test_fault_29_descriptor_exhaustion_answers_503_and_recovers(make_daemon, fnx_env):
    d = make_daemon(limits={"idle_timeout_s": 3})
    fid = d.register(NOOP)
    ids = d.submit([{"function": fid, "args": [i]} for i in range(200)])
    d.wait_all(ids)
    # The open-file limit drops to 256 while the daemon runs (an administrator's `prlimit`).
    soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (256, hard))
    held = []
    try:
        for _ in range(300):
            s = connect(d)
            s.sendall(b"G")
            held.append(s)
        # Out of descriptors: clients the daemon cannot serve are answered 503, not left
        # hanging in the listen backlog until they time out.
        answers = [answer_of(s, 0.5) for s in held]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert refused, {a[:40] for a in answers}
        assert all(b"Retry-After: 1" in a for a in refused)
        log = d.log_since_start()
        assert "Too many open files" in log and "refusing new connections with 503" in log, \
            d.log_tail()
        # The limit is raised again and the stalled clients are closed by the idle timeout:
        # the daemon serves, and runs tasks, as before.
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
        wait_for(lambda: health_status(d) == 200, 20, "health 200 after the stalled clients")
        ids = d.submit([{"function": fid, "args": [i]} for i in range(200)])
        assert {t["state"] for t in d.wait_all(ids).values()} == {"success"}
    finally:
        for s in held:
            s.close()
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))


def vm_hwm_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_fault_33_chunked_gigabyte_body_is_cut_at_the_limit_with_bounded_memory(make_daemon):
    limit_mib = 64
    d = make_daemon(limits={"max_request_mb": limit_mib})
    # Warm up with small requests (reader connections, threads), then measure the peak.
    fid = d.register(NOOP)
    d.wait_all(d.submit([{"function": fid, "args": [1]}]))
    assert d.api("POST", "/v1/tasks", b"[" * 4096).status == 400
    before = vm_hwm_kib(d.pid)
    s = connect(d, timeout=10)
    s.sendall(b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + d.token.encode()
              + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"[" * (1 << 20))
    sent = 0
    try:
        while sent < 1 << 30:  # 1 GiB, unless the daemon stops reading first
            s.sendall(chunk)
            sent += 1 << 20
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass
    answer = answer_of(s, 10.0)
    s.close()
    assert sent < 4 * limit_mib << 20, f"the daemon read {sent >> 20} MiB of a {limit_mib} MiB body"
    assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer \
        and b"limits.max_request_mb" in answer, answer[:300]
    # The body is read into one buffer of at most the limit (no copies as it grows).
    grew_mib = (vm_hwm_kib(d.pid) - before) / 1024
    assert grew_mib < limit_mib + 16, \
        f"daemon peak memory grew by {grew_mib:.0f} MiB for a {limit_mib} MiB limit"
    assert health_status(d) == 200


def test_fault_33_a_body_that_stops_half_way_is_408_after_body_timeout(make_daemon):
    d = make_daemon(limits={"body_timeout_s": 1})
    s = connect(d, timeout=10)
    s.sendall(b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + d.token.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{\"functi")
    t0 = time.monotonic()
    answer = answer_of(s, 10.0)
    waited = time.monotonic() - t0
    s.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer \
        and b"limits.body_timeout_s" in answer, answer[:300]
    assert 0.9 < waited < 8, waited
    assert d.task_count() == 0


def test_fault_33_deeply_nested_json_is_refused_before_it_is_parsed(daemon):
    before = vm_hwm_kib(daemon.pid)
    r = daemon.api("POST", "/v1/tasks", b"[" * (32 << 20))
    assert r.status == 400 and "deeper than 128 levels" in r.body["error"]["message"], r
    # Skipping 32 MiB of `[` used to cost a byte per level on top of the body.
    grew_mib = (vm_hwm_kib(daemon.pid) - before) / 1024
    assert grew_mib < 32 + 16, f"daemon peak memory grew by {grew_mib:.0f} MiB"


BIG = {"kind": "python", "entry": "big", "source": "def big(n):\n    return 'x' * n\n"}


def test_fault_33_results_pages_and_status_answers_are_capped_in_bytes(make_daemon):
    d = make_daemon(limits={"max_answer_mb": 1, "max_result_mb": 2})
    fid = d.register(BIG)
    ids = d.submit([{"function": fid, "args": [600_000]} for _ in range(5)])
    d.wait_all(ids)  # the wait itself reads status answers: it must get through them
    # A results page ends before the result that would pass 1 MiB; its cursor continues.
    cursor, pages, seen = 0, 0, []
    while len(seen) < 5:
        r = d.api("GET", f"/v1/results?since={cursor}&limit=100")
        assert r.status == 200 and r.body["results"], r
        assert len(r.body["results"]) == 1, "two 600 kB results exceed a 1 MiB answer"
        seen += [x["id"] for x in r.body["results"]]
        cursor, pages = r.body["cursor"], pages + 1
    assert sorted(seen) == sorted(ids) and pages == 5
    # A status answer carries the first result whole and says why the others are missing.
    r = d.api("POST", "/v1/tasks/status", {"ids": ids})
    tasks = r.body["tasks"]
    assert [t["state"] for t in tasks] == ["success"] * 5
    assert "result" in tasks[0] and "omitted" not in tasks[0]
    for t in tasks[1:]:
        assert "result" not in t and "limits.max_answer_mb" in t["omitted"], t
    # The SDK asks again for what was omitted: every value arrives.
    values = d.client().get_results(ids, timeout=30)
    assert values == ["x" * 600_000] * 5


def test_fault_33_a_client_that_does_not_read_its_answer_is_cut_off(make_daemon):
    d = make_daemon(limits={"max_answer_mb": 64, "max_result_mb": 8, "body_timeout_s": 1})
    fid = d.register(BIG)
    ids = d.submit([{"function": fid, "args": [6 << 20]} for _ in range(4)])
    d.wait_all(ids)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", d.port))
    s.sendall(b"GET /v1/results?since=0&limit=100 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
              + d.token.encode() + b"\r\n\r\n")
    time.sleep(4)  # the daemon's writes stall; after body_timeout_s it gives up
    data = b""
    s.settimeout(10)
    try:
        while chunk := s.recv(1 << 20):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    assert length > 24 << 20 and len(body) < length, (length, len(body))
    assert health_status(d) == 200


def test_fault_33_signature_readers_are_bounded_in_size_and_number(make_daemon):
    d = make_daemon(limits={"max_source_kb": 256})
    big = "def f(x):\n    return x\n" + "y = 1\n" * ((300 << 10) // 6)
    r = d.api("POST", "/v1/functions", {"kind": "python", "entry": "f", "source": big})
    assert "limits.max_source_kb" in error_of(r, 413, "payload_too_large")
    # Six registrations at once of sources under the limit: all are registered, and the
    # readers (python3 running ast) run at most a few at a time, never six.
    source = "def f(x):\n    return x\n" + "".join(f"v{i} = [{i}] * 3\n" for i in range(12000))
    assert len(source) < 256 << 10
    cap = min(max(len(os.sched_getaffinity(0)) // 2, 1), 4)
    stop, most = threading.Event(), [0]

    def watch():
        while not stop.is_set():
            pids = [int(x) for x in os.listdir("/proc") if x.isdigit()]
            readers = [p for p in map(read_proc, pids)
                       if p is not None and p.ppid == d.pid and "import ast" in p.cmdline]
            most[0] = max(most[0], len(readers))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    calls = [in_thread(lambda: d.api("POST", "/v1/functions",
                                     {"kind": "python", "entry": "f", "source": source}))
             for _ in range(6)]
    for t, _ in calls:
        t.join(60)
    stop.set()
    watcher.join()
    statuses = [box["value"].status for _, box in calls]
    assert statuses == [201] * 6, [box.get("value") or box.get("error") for _, box in calls]
    assert 1 <= most[0] <= cap, f"{most[0]} signature readers at once; the cap is {cap}"


def test_strictness_every_unparseable_value_is_a_400_naming_its_field(daemon):
    import msgpack

    fid = daemon.register(NOOP)
    # Raw JSON text: values Python's json module would not write.
    cases = {
        '"priority": 1e400': "tasks[0].priority",
        '"walltime": {"s": 5}': "tasks[0].walltime",
        '"walltime": -1': "tasks[0].walltime",
        '"pool": "\\ud800"': "tasks[0].pool",
        '"files": [{"name": "\\udc00x", "data_b64": ""}]': "tasks[0].files",
        '"retries": 2.5': "tasks[0].retries",
    }
    for field, named in cases.items():
        body = ('{"tasks": [{"function": %d, "args": [1], %s}]}' % (fid, field)).encode()
        r = daemon.api("POST", "/v1/tasks", body)
        assert named in error_of(r, 400, "bad_request"), (field, r)
    # msgpack: trailing bytes, and a file with both data and path.
    ok = msgpack.packb({"tasks": [{"function": fid, "encoding": "json", "data": b"[1]"}]})
    mp = {"Content-Type": "application/msgpack"}
    r = daemon.api("POST", "/v1/tasks", ok + b"\xc0", headers=mp)
    assert "1 bytes after its end" in error_of(r, 400, "bad_request")
    both = msgpack.packb({"tasks": [{"function": fid, "encoding": "json", "data": b"[1]",
                                     "files": [{"name": "a", "data": b"x", "path": "/etc"}]}]})
    r = daemon.api("POST", "/v1/tasks", both, headers=mp)
    assert "tasks[0].files[0]: give exactly one of data and path" in error_of(r, 400,
                                                                             "bad_request")
    assert daemon.task_count() == 0, "nothing may be created by a refused request"
    # The same document in msgpack is accepted.
    r = daemon.api("POST", "/v1/tasks", ok, headers=mp)
    assert r.status == 201, r
    # A cursor past 2^63 is refused rather than wrapped to a negative number.
    r = daemon.api("GET", "/v1/results?since=9223372036854775808")
    assert "since: must be a cursor" in error_of(r, 400, "bad_request")


def metric(d, name: str) -> float:
    text = d.api("GET", "/metrics").body
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_fault_33_idle_long_polls_wake_only_for_their_own_users_results(make_daemon):
    d = make_daemon()
    alice = d.create_user("alice")
    fid = d.register(NOOP)
    cursor = d.api("GET", "/v1/results?since=end", token=alice).body["cursor"]
    # Alice has 30 long-polls open on her (empty) results stream.
    polls = [in_thread(lambda: d.api("GET", f"/v1/results?since={cursor}&wait=60",
                                     token=alice, timeout=90))
             for _ in range(30)]
    wait_for(lambda: metric(d, "fnx_api_connections") >= 30, 10, "30 polls open")
    before = metric(d, "fnx_api_long_poll_wakeups_total")
    # Another user's 200 tasks, in many commits: none of Alice's polls wakes.
    for i in range(20):
        d.wait_all(d.submit([{"function": fid, "args": [j]} for j in range(10)]))
    assert metric(d, "fnx_api_long_poll_wakeups_total") == before
    assert all(t.is_alive() for t, _ in polls)
    # Alice's own result wakes every one of her polls, which answer it.
    afid = d.register(NOOP, token=alice)
    [mine] = d.submit([{"function": afid, "args": [7]}], token=alice)
    for t, box in polls:
        t.join(30)
        r = box["value"]
        assert r.status == 200 and [x["id"] for x in r.body["results"]] == [mine], r
    assert metric(d, "fnx_api_long_poll_wakeups_total") >= before + 30


def test_per_user_quotas_on_queued_bytes_and_function_bytes(make_daemon):
    # No managers: tasks stay queued, holding their bytes.
    d = make_daemon(pools={"local": {"managers": 0}},
                    limits={"max_queued_mb_per_user": 1, "max_function_mb_per_user": 0.05})
    alice = d.create_user("alice")
    fid = d.register(NOOP)
    big = "x" * 400_000
    first = d.submit([{"function": fid, "args": [big]}, {"function": fid, "args": [big]}])
    r = d.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": [big]}]})
    msg = error_of(r, 429, "quota")
    assert "limits.max_queued_mb_per_user" in msg and "quota of 1 MiB" in msg, msg
    # Another user has a quota of their own.
    afid = d.register(NOOP, token=alice)
    d.submit([{"function": afid, "args": [big]}], token=alice)
    # A task that ends gives its bytes back.
    assert d.api("DELETE", f"/v1/tasks/{first[0]}").status in (200, 202)
    d.submit([{"function": fid, "args": [big]}])
    # The daemon counts them again at start.
    d.stop()
    d.start()
    r = d.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": [big]}]})
    assert "limits.max_queued_mb_per_user" in error_of(r, 429, "quota")
    # Functions: 50 KiB of records per user.
    src = "def f(x):\n    return x\n" + "# padding\n" * 2000
    ids = [d.register({"kind": "python", "entry": "f", "source": src}) for _ in range(2)]
    r = d.api("POST", "/v1/functions", {"kind": "python", "entry": "f", "source": src})
    assert "limits.max_function_mb_per_user" in error_of(r, 429, "quota")
    assert d.api("DELETE", f"/v1/functions/{ids[0]}").status in (200, 204)
    d.register({"kind": "python", "entry": "f", "source": src})


def test_fault_27_values_reach_shell_commands_as_literal_arguments_never_code(daemon, fnx_env):
    """Shell metacharacters, command substitutions, newlines, quotes and braces in a value are
    passed as they are, outside quotes and inside double quotes; a parameter inside single
    quotes is refused at registration, naming it."""
    pwned = fnx_env.dir / "pwned"
    values = [f"$(touch {pwned})", f"`touch {pwned}`", f"x; touch {pwned}", "a\nb",
              "'\"{y}\"'", "*", "  spaced  ", "$HOME"]
    plain = daemon.register({"kind": "shell", "command": "printf '[%s]' {x}"})
    quoted = daemon.register({"kind": "shell", "command": "printf '[%s]' \"<{x}>\""})
    ids = daemon.submit([{"function": f, "args": {"x": v}} for v in values
                         for f in (plain, quoted)])
    done = daemon.wait_all(ids)
    outs = [result_value(done[i])["stdout"] for i in ids]
    want = [w for v in values for w in (f"[{v}]", f"[<{v}>]")]
    assert outs == want, list(zip(outs, want))
    assert not pwned.exists(), "a value ran as code"
    r = daemon.api("POST", "/v1/functions", {"kind": "shell", "command": "echo '{x}'"})
    assert "parameter {x} is inside single quotes" in error_of(r, 400, "bad_request")


def test_the_sdk_retries_a_503_given_at_a_connection_cap(make_daemon):
    """At the per-peer cap the daemon answers 503 too_many_connections with Retry-After; the
    SDK waits and asks again, and succeeds once the stalled connections are closed."""
    d = make_daemon(limits={"max_connections_per_peer": 2, "idle_timeout_s": 2})
    client = d.client()
    stalled = [connect(d) for _ in range(2)]
    for s in stalled:
        s.sendall(b"G")
    # Both are counted before the SDK connects (asked over the socket, another peer).
    sock = d.home / "fnx.sock"
    def open_connections() -> int:
        text = d.api("GET", "/metrics", socket_path=sock).body
        return int(re.search(r"^fnx_api_connections (\d+)", text, re.M).group(1))

    # The stalled two, and this request's own.
    wait_for(lambda: open_connections() >= 3, 10, "the two stalled connections admitted")
    assert client.whoami()["user"] == d.user
    for s in stalled:
        s.close()
    # The SDK met the cap (the daemon logged its 503) and got through on a later attempt.
    assert "connections from 127.0.0.1 are open (limits.max_connections_per_peer = 2)" \
        in d.log_since_start(), d.log_tail()
