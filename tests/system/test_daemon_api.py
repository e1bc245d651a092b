"""Black-box tests of `fnx daemon` through its HTTP API (docs/api.md, authoritative).
Requests go through `Daemon.api`, a plain http.client helper, not the Python SDK. The results
stream is tested in test_daemon_results.py, the CLI client commands in test_daemon_cli.py.

Tasks that must stay running use a shell gate (daemon_env.GATE): they touch `d/started-I`, then
wait for the file `d/release`, so a test waits on files, never on a fixed sleep.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
import time

import msgpack

from conftest import wait_for
from daemon_env import (
    DIV, GATE, NOOP, SQUARE, error_of, gate, in_thread, pickled_args, result_value, short,
    wait_started,
)

SIG_F = "def f(x, y=2, *, z):\n    return [x, y, z]\n"
SIG_G = "def g(a, /, b, *args, c=None, **kw):\n    return [a, b, list(args), c, kw]\n"


class Metrics:
    """Samples of a Prometheus text answer."""

    def __init__(self, text: str):
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)(\s+-?\d+)?$', line)
            assert m, f"not a Prometheus sample line: {line!r}"
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
            self.samples.append((m.group(1), labels, float(m.group(4))))

    def __call__(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` that carry `labels` (others labels summed over)."""
        found = [v for n, lab, v in self.samples
                 if n == name and all(lab.get(k) == w for k, w in labels.items())]
        assert found, f"no sample {name} {labels} in {self.samples}"
        return sum(found)


# ---------------------------------------------------------------------------------------------
# Health, description, identity, status, metrics
# ---------------------------------------------------------------------------------------------


def test_health_openapi_and_metrics_need_no_token_whoami_does(daemon):
    r = daemon.api("GET", "/v1/health", token=None)
    assert r.status == 200, r
    assert r.body == {"status": "ok", "version": "0.1.0", "store": "ok"}, r.body

    r = daemon.api("GET", "/v1/openapi.json", token=None)
    assert r.status == 200, r
    assert isinstance(r.body, dict), f"openapi.json is not a JSON object: {r.body!r:.300}"
    assert str(r.body.get("openapi", "")).startswith("3."), r.body.get("openapi")
    for path in ["/v1/tasks", "/v1/tasks/{id}", "/v1/results", "/v1/functions", "/v1/status"]:
        assert path in r.body.get("paths", {}), f"{path} missing from openapi paths"

    r = daemon.api("GET", "/metrics", token=None)
    assert r.status == 200, r
    assert "fnx_tasks_submitted_total" in r.body, r.body[:500]

    r = daemon.api("GET", "/v1/whoami")
    assert r.status == 200, r
    assert r.body == {"user": daemon.user, "admin": True}, r.body
    assert daemon.user, "client.json names no user"


def test_client_json_written_on_first_start_mode_0600(daemon):
    path = daemon.home / "client.json"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, f"client.json has mode {mode:o}"
    doc = json.loads(path.read_text())
    assert doc["url"] == daemon.url, doc
    assert doc["token"].startswith("fnx_"), doc
    assert path.as_posix() in daemon.log_path.read_text(), "the daemon did not print the path"


def test_status_document_and_metrics(daemon):
    wait_for(lambda: daemon.status()["pools"][0]["workers"] == 2, 30,
             lambda: f"2 workers in /v1/status: {daemon.status()}")
    fid = daemon.register(SQUARE)
    ids = daemon.submit([{"function": fid, "args": [i]} for i in range(5)])
    daemon.wait_all(ids)

    s = daemon.status()
    assert s["version"] == "0.1.0" and s["user"] == daemon.user and s["admin"] is True, s
    assert isinstance(s["uptime_s"], (int, float)) and s["uptime_s"] > 0, s
    assert isinstance(s["tasks_per_s"], (int, float)) and s["tasks_per_s"] >= 0, s
    assert s["tasks"]["queued"] == 0 and s["tasks"]["running"] == 0, s
    assert s["tasks"]["finished"] == 5, s
    # docs/api.md: admins get "users" with the task counts ("plus"; inside or beside "tasks").
    users = s["tasks"].get("users") or s.get("users")
    assert users and users[daemon.user]["finished"] == 5, s
    [pool] = s["pools"]
    assert pool["name"] == "local" and pool["provider"] == "local", pool
    assert pool["workers"] == 2 and pool["queued"] == 0 and pool["running"] == 0, pool
    [m] = pool["managers"]
    assert m["workers"] == 2 and m["draining"] is False, m
    for key in ["id", "uid", "host", "block", "inflight", "completed", "idle_s"]:
        assert key in m, f"manager entry lacks {key}: {m}"
    assert s["store"]["healthy"] is True and s["store"]["size_bytes"] > 0, s["store"]
    assert s["store"]["path"].startswith(str(daemon.home)), s["store"]

    bob = daemon.create_user("bob")
    sb = daemon.status(token=bob)
    assert sb["user"] == "bob" and sb["admin"] is False, sb
    assert sb["tasks"] == {"queued": 0, "running": 0, "finished": 0}, sb["tasks"]
    assert "store" not in sb, f"store shown to a non-admin: {sb}"
    assert all(p["managers"] == [] for p in sb["pools"]), f"others' managers shown: {sb}"

    r = daemon.api("GET", "/metrics", token=None)
    assert r.status == 200 and "text/plain" in r.headers.get("content-type", ""), r.headers
    m = Metrics(r.body)
    assert m("fnx_tasks_submitted_total") == 5
    assert m("fnx_tasks_finished_total", state="success") == 5
    assert m("fnx_tasks_finished_total", state="failed") == 0
    assert m("fnx_tasks_finished_total", state="cancelled") == 0
    assert m("fnx_tasks_queued") == 0 and m("fnx_tasks_running") == 0
    assert m("fnx_managers") == 1 and m("fnx_workers") == 2
    assert m("fnx_store_commits_total") >= 1 and m("fnx_store_commit_errors_total") == 0
    assert m("fnx_store_size_bytes") > 0


# ---------------------------------------------------------------------------------------------
# Functions
# ---------------------------------------------------------------------------------------------


def test_python_source_function_register_list_show_and_run(daemon):
    t0 = time.time()
    # (Functions with a container or dependencies: test_warm_routing.py, test_image_builds.py.)
    spec = dict(SQUARE)
    r = daemon.api("POST", "/v1/functions", spec)
    assert r.status == 201, r
    rec = r.body
    fid = rec["id"]
    assert isinstance(fid, int) and fid > 0, rec
    assert t0 - 1 <= rec["created_at"] <= time.time() + 1, rec
    assert {k: rec[k] for k in ["name", "kind", "owner", "entry", "ref", "command"]} == {
        "name": "square", "kind": "python", "owner": daemon.user, "entry": "square",
        "ref": None, "command": None}, rec
    assert rec["signature"] == {
        "params": [{"name": "x", "kind": "positional_or_keyword", "default": None}]}, rec
    assert rec["container"] is None and rec["dependencies"] is None, rec

    shown = daemon.api("GET", f"/v1/functions/{fid}")
    assert shown.status == 200, shown
    assert shown.body["source"] == SQUARE["source"], shown.body
    listed = daemon.api("GET", "/v1/functions")
    assert listed.status == 200, listed

    before = time.time()
    ids = daemon.submit([{"function": fid, "args": [4]},
                         {"function": fid, "args": {"x": 5}, "priority": 10, "walltime": 60,
                          "retries": 1, "pool": "local"}])
    assert len(set(ids)) == 2 and all(isinstance(i, int) and i > 0 for i in ids), ids
    for tid, want in zip(ids, [16, 25]):
        t = daemon.wait_task(tid)
        assert t["id"] == tid and t["function"] == fid and t["pool"] == "local", t
        assert t["state"] == "success" and t["attempt"] == 1, t
        assert t["result"] == {"encoding": "json", "value": want}, t
        assert "error" not in t or t["error"] is None, t
        assert before - 1 <= t["submitted_at"] <= t["finished_at"] <= time.time() + 1, t

    # One record: what the 201 answered is what GET and the list show.
    assert {k: v for k, v in shown.body.items() if k != "source"} == rec, (shown.body, rec)
    assert [f for f in listed.body["functions"] if f["id"] == fid] == [rec], listed.body


def test_python_source_that_does_not_parse_or_lacks_its_entry_is_400(daemon):
    r = daemon.api("POST", "/v1/functions",
                   {"kind": "python", "entry": "f", "source": "def f(x:\n    return x\n"})
    error_of(r, 400, "bad_request")
    r = daemon.api("POST", "/v1/functions",
                   {"kind": "python", "entry": "nothere", "source": "def f(x):\n    return x\n"})
    msg = error_of(r, 400, "bad_request")
    assert "nothere" in msg, msg
    r = daemon.api("POST", "/v1/functions", {"kind": "python", "source": "def f():\n  pass\n"})
    msg = error_of(r, 400, "bad_request")
    assert "entry" in msg, msg


def test_ref_shell_and_mpi_functions(daemon):
    r = daemon.api("POST", "/v1/functions", {"kind": "python", "ref": "math:hypot"})
    assert r.status == 201, r
    ref = r.body
    assert ref["name"] == "hypot" and ref["ref"] == "math:hypot" and ref["kind"] == "python", ref
    assert ref["signature"] is None, f"a ref has no recorded signature: {ref}"

    r = daemon.api("POST", "/v1/functions", {"kind": "shell", "command": "printf '[%s]' {x} {y}"})
    assert r.status == 201, r
    sh = r.body
    assert sh["name"] == f"shell-{sh['id']}" and sh["command"] == "printf '[%s]' {x} {y}", sh
    assert sh["signature"] == {"params": [
        {"name": "x", "kind": "positional_or_keyword", "default": None},
        {"name": "y", "kind": "positional_or_keyword", "default": None}]}, sh

    r = daemon.api("POST", "/v1/functions",
                   {"kind": "mpi", "command": "./simulate --steps {steps}", "name": "sim"})
    assert r.status == 201, r
    mpi = r.body
    assert mpi["kind"] == "mpi" and mpi["name"] == "sim", mpi
    assert mpi["command"] == "./simulate --steps {steps}", mpi

    listed = daemon.api("GET", "/v1/functions").body["functions"]
    assert {f["id"] for f in listed} >= {ref["id"], sh["id"], mpi["id"]}, listed

    ids = daemon.submit([
        {"function": ref["id"], "args": [3, 4]},
        {"function": sh["id"], "args": {"x": "a b; touch PWNED", "y": 2}},
        {"function": sh["id"], "args": ["p", 7.5]},
        {"function": ref["id"], "args": {"nope": 1}},  # no signature: fails when it runs
    ])
    done = daemon.wait_all(ids)
    assert result_value(done[ids[0]]) == 5.0, done[ids[0]]
    assert result_value(done[ids[1]]) == {
        "returncode": 0, "stdout": "[a b; touch PWNED][2]", "stderr": ""}, done[ids[1]]
    assert result_value(done[ids[2]])["stdout"] == "[p][7.5]", done[ids[2]]
    bad = done[ids[3]]
    assert bad["state"] == "failed" and bad["error"]["kind"] == "exception", bad
    assert bad["error"]["type"] == "TypeError", bad

    r = daemon.api("POST", "/v1/tasks", {"tasks": [{"function": mpi["id"], "args": {"steps": 3}}]})
    error_of(r, 400, "bad_request")


def test_delete_function_tasks_already_submitted_still_run_new_submits_400(daemon, fnx_env):
    d = gate(fnx_env)
    fid = daemon.register({"kind": "shell", "command": GATE})
    ids = daemon.submit([{"function": fid, "args": {"d": str(d), "i": i}} for i in range(4)])
    wait_started(d, [0, 1])
    r = daemon.api("DELETE", f"/v1/functions/{fid}")
    assert r.status == 204 and r.body is None, r
    r = daemon.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": {"d": "x", "i": 9}}]})
    error_of(r, 400, "bad_request")
    (d / "release").touch()
    done = daemon.wait_all(ids)
    assert all(t["state"] == "success" for t in done.values()), done
    assert sorted(p.name for p in d.glob("done-*")) == [f"done-{i}" for i in range(4)]


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


def test_pickle_args_and_msgpack_bodies(daemon):
    fid = daemon.register(SQUARE)
    [t1] = daemon.submit([{"function": fid, "encoding": "pickle", "data_b64": pickled_args(7)}])
    [t2] = daemon.submit([{"function": fid, "encoding": "pickle",
                           "data_b64": pickled_args(x=8)}])
    body = msgpack.packb({"tasks": [
        {"function": fid, "data": b"[6]"},
        {"function": fid, "data": b'{"x": 9}', "priority": 1},
        {"function": fid, "encoding": "pickle",
         "data": pickle.dumps(((11,), {}), protocol=4)},
    ]}, use_bin_type=True)
    r = daemon.api("POST", "/v1/tasks", body, headers={"Content-Type": "application/msgpack"})
    assert r.status == 201, r
    mp = r.body["ids"]
    assert len(mp) == 3, r.body
    done = daemon.wait_all([t1, t2, *mp])
    got = [result_value(done[i]) for i in [t1, t2, *mp]]
    assert got == [49, 64, 36, 81, 121], done

    # The results stream in msgpack carries the same records as in JSON.
    rj = daemon.api("GET", "/v1/results?since=0")
    rm = daemon.api("GET", "/v1/results?since=0", headers={"Accept": "application/msgpack"})
    assert rm.status == 200 and "msgpack" in rm.headers.get("content-type", ""), rm.headers
    assert rm.body["cursor"] == rj.body["cursor"], (rm.body, rj.body)
    assert [t["id"] for t in rm.body["results"]] == [t["id"] for t in rj.body["results"]]
    assert {t["id"] for t in rm.body["results"]} == {t1, t2, *mp}


def test_task_failures_exception_and_walltime(daemon):
    div = daemon.register(DIV)
    sleeper = daemon.register({"kind": "shell", "command": "sleep {s}"})
    failing = daemon.register({"kind": "shell", "command": "echo out; echo err >&2; exit {c}"})
    t0 = time.monotonic()
    ids = daemon.submit([
        {"function": div, "args": [1, 0]},
        {"function": sleeper, "args": {"s": 30}, "walltime": 1},
        {"function": failing, "args": {"c": 3}},
        {"function": div, "args": {"a": 1, "b": 4}},
    ])
    done = daemon.wait_all(ids, timeout=20)
    assert time.monotonic() - t0 < 20
    zero = done[ids[0]]
    assert zero["state"] == "failed" and zero.get("result") is None, zero
    e = zero["error"]
    assert e["kind"] == "exception" and e["type"] == "ZeroDivisionError", zero
    assert "division by zero" in e["message"] and "ZeroDivisionError" in e["traceback"], zero
    wall = done[ids[1]]
    assert wall["state"] == "failed" and wall["error"]["kind"] == "walltime", wall
    ex = done[ids[2]]
    assert ex["state"] == "failed" and ex["error"]["kind"] == "exception", ex
    assert "3" in ex["error"]["message"], ex
    assert result_value(done[ids[3]]) == 0.25


def test_json_numbers_in_arguments_and_results_arrive_exactly(daemon):
    """JSON arguments reach the function, and its JSON result comes back, number for number:
    integers beyond 64 bits stay integers, floats keep every bit."""
    fid = daemon.register({"kind": "python", "entry": "echo", "source":
                           "import math\n\n\ndef echo(*a):\n"
                           "    return {'seen': repr(a), 'back': list(a), 'sqrt14': math.sqrt(14),"
                           " 'big': 2**70, 'third': 1 / 3}\n"})
    args = [2**70, -2**64, 123456789.12345679, 3.7416573867739413, 0.1, 5e-324, 1e300]
    [tid] = daemon.submit([{"function": fid, "args": args}])
    got = result_value(daemon.wait_task(tid))
    assert got["seen"] == repr(tuple(args)), f"the function saw {got['seen']}"
    assert got["back"] == args and [type(x) for x in got["back"]] == [type(x) for x in args], (
        f"sent {args}, got back {got['back']}")
    assert (got["sqrt14"], got["big"], got["third"]) == (math.sqrt(14), 2**70, 1 / 3), got


def test_get_task_wait_returns_when_terminal_or_at_the_deadline(daemon, fnx_env):
    d = gate(fnx_env)
    g = daemon.register({"kind": "shell", "command": GATE})
    [held] = daemon.submit([{"function": g, "args": {"d": str(d), "i": 0}}])
    wait_started(d, [0])

    t0 = time.monotonic()
    r = daemon.api("GET", f"/v1/tasks/{held}?wait=1")
    took = time.monotonic() - t0
    assert r.status == 200 and r.body["state"] == "running", r
    assert 0.8 <= took < 5, f"wait=1 on an unfinished task answered after {took:.2f}s"

    t, box = in_thread(lambda: daemon.api("GET", f"/v1/tasks/{held}?wait=30"))
    time.sleep(0.5)
    t0 = time.monotonic()
    (d / "release").touch()
    t.join(30)
    took = time.monotonic() - t0
    assert "value" in box, box
    r = box["value"]
    assert r.status == 200 and r.body["state"] == "success", r
    assert took < 5, f"wait=30 answered {took:.2f}s after the task finished (not at once)"


def test_status_of_many_tasks_in_request_order(daemon):
    alice, bob = daemon.create_user("alice"), daemon.create_user("bob")
    fid = daemon.register(NOOP, token=alice)
    ids = daemon.submit([{"function": fid, "args": [i]} for i in range(50)], token=alice)
    [bobs] = daemon.submit([{"function": daemon.register(NOOP, token=bob), "args": [1]}],
                           token=bob)
    daemon.wait_all(ids, token=alice)
    ask = [ids[7], 999_999_999, *reversed(ids), bobs, ids[7]]
    r = daemon.api("POST", "/v1/tasks/status", {"ids": ask}, token=alice)
    assert r.status == 200, r
    got = r.body["tasks"]
    assert [t["id"] for t in got] == ask, got
    assert got[1] == {"id": 999_999_999, "state": "unknown"}, got[1]
    assert got[-2] == {"id": bobs, "state": "unknown"}, f"another user's task shown: {got[-2]}"
    for t in got[2:-2]:
        assert t["state"] == "success" and t["result"]["value"] == ids.index(t["id"]), t

    r = daemon.api("POST", "/v1/tasks/status", {"ids": list(range(1, 10_002))}, token=alice)
    assert r.status in (400, 413), f"10,001 ids in one status request: {r.status} {short(r.body)}"


# ---------------------------------------------------------------------------------------------
# Cancel
# ---------------------------------------------------------------------------------------------


def test_cancel_queued_and_running_tasks(daemon, fnx_env):
    d = gate(fnx_env)
    sleeper = daemon.register(
        {"kind": "shell", "command": "touch {d}/started-{i}; sleep 300; touch {d}/done-{i}"})
    marker = daemon.register({"kind": "shell", "command": "touch {d}/ran-{i}"})
    running = daemon.submit([{"function": sleeper, "args": {"d": str(d), "i": i}}
                             for i in range(2)])
    wait_started(d, [0, 1])
    wait_for(lambda: all(t["state"] == "running" for t in daemon.statuses(running)), 10,
             "both sleepers running")
    [queued] = daemon.submit([{"function": marker, "args": {"d": str(d), "i": 2}}])
    # Both workers are busy: the task waits, either in the daemon's queue ("queued") or in the
    # manager's local prefetch queue ("running": handed to a manager, docs/api.md).
    assert daemon.task(queued)["state"] in ("queued", "running"), "not yet finished"

    r = daemon.api("DELETE", f"/v1/tasks/{queued}")
    assert r.status == 200, r
    assert r.body["state"] == "cancelled" and r.body["error"]["kind"] == "cancelled", r.body

    for tid in running:
        t0 = time.monotonic()
        r = daemon.api("DELETE", f"/v1/tasks/{tid}")
        assert r.status in (200, 202), r
        rec = r.body if r.status == 200 else daemon.wait_task(tid, timeout=15)
        assert rec["state"] == "cancelled" and rec["error"]["kind"] == "cancelled", rec
        assert time.monotonic() - t0 < 15
    fnx_env.assert_no_processes(lambda p: p.cmdline.startswith("sleep 300"), grace=5)

    # The workers are free again: a later task runs, the cancelled one never did.
    [after] = daemon.submit([{"function": marker, "args": {"d": str(d), "i": 3}}])
    assert daemon.wait_task(after)["state"] == "success"
    assert (d / "ran-3").exists() and not (d / "ran-2").exists(), "a cancelled queued task ran"
    assert not list(d.glob("done-*")), "a cancelled sleeper ran to its end"

    # Cancelling a finished task answers with the state it reached first.
    r = daemon.api("DELETE", f"/v1/tasks/{after}")
    assert r.status == 200 and r.body["state"] == "success", r
    assert daemon.task(queued)["state"] == "cancelled"


def test_bulk_cancel_counts_only_own_unfinished_tasks(daemon, fnx_env):
    alice, bob = daemon.create_user("alice"), daemon.create_user("bob")
    d = gate(fnx_env)
    af = daemon.register({"kind": "shell", "command": GATE}, token=alice)
    bf = daemon.register({"kind": "shell", "command": GATE}, token=bob)
    [done] = daemon.submit([{"function": daemon.register(NOOP, token=alice), "args": [1]}],
                           token=alice)
    assert daemon.wait_task(done, token=alice)["state"] == "success"
    [running] = daemon.submit([{"function": af, "args": {"d": str(d), "i": 0}}], token=alice)
    [bobs] = daemon.submit([{"function": bf, "args": {"d": str(d), "i": 1}}], token=bob)
    wait_started(d, [0, 1])

    r = daemon.api("POST", "/v1/tasks/cancel",
                   {"ids": [running, done, bobs, 999_999_999]}, token=alice)
    assert r.status == 202 and r.body == {"cancelling": 1}, r
    rec = daemon.wait_task(running, timeout=15, token=alice)
    assert rec["state"] == "cancelled" and rec["error"]["kind"] == "cancelled", rec
    assert daemon.task(done, token=alice)["state"] == "success"
    assert daemon.task(bobs, token=bob)["state"] == "running", "another user's task cancelled"
    (d / "release").touch()
    assert daemon.wait_task(bobs, token=bob)["state"] == "success"
    assert (d / "done-1").exists() and not (d / "done-0").exists(), sorted(os.listdir(d))

    r = daemon.api("POST", "/v1/tasks/cancel", {"ids": [running, done]}, token=alice)
    assert r.status == 202 and r.body == {"cancelling": 0}, r


# ---------------------------------------------------------------------------------------------
# Idempotency, users
# ---------------------------------------------------------------------------------------------


def test_fault_34_an_idempotency_key_replays_the_same_ids_and_creates_nothing(daemon):
    fid = daemon.register(NOOP)
    body = {"tasks": [{"function": fid, "args": [i]} for i in range(3)]}
    key = {"Idempotency-Key": "submit-7f3a"}
    r1 = daemon.api("POST", "/v1/tasks", body, headers=key)
    assert r1.status == 201, r1
    assert r1.headers.get("idempotent-replayed", "false") != "true", r1.headers
    count = daemon.task_count()
    assert count == 3

    r2 = daemon.api("POST", "/v1/tasks", body, headers=key)
    assert r2.status == 201, r2
    assert r2.body["ids"] == r1.body["ids"], (r1.body, r2.body)
    assert r2.headers.get("idempotent-replayed") == "true", r2.headers
    assert daemon.task_count() == count, "a replayed request created tasks"
    daemon.wait_all(r1.body["ids"])
    r3 = daemon.api("POST", "/v1/tasks", body, headers=key)
    assert r3.status == 201 and r3.body["ids"] == r1.body["ids"], r3
    assert daemon.task_count() == count

    # FAULTS.md 34: the same key with another body is another request: 409 naming the key,
    # nothing created, and the earlier tasks untouched.
    other = {"tasks": [{"function": fid, "args": [i]} for i in range(5)]}
    r409 = daemon.api("POST", "/v1/tasks", other, headers=key)
    msg = error_of(r409, 409, "idempotency_conflict")
    assert "submit-7f3a" in msg, msg
    assert daemon.task_count() == count, "a conflicting request created tasks"
    assert [t["state"] for t in daemon.statuses(r1.body["ids"])] == ["success"] * 3
    # The original request still replays.
    r3b = daemon.api("POST", "/v1/tasks", body, headers=key)
    assert r3b.status == 201 and r3b.body["ids"] == r1.body["ids"], r3b

    r4 = daemon.api("POST", "/v1/tasks", body, headers={"Idempotency-Key": "another"})
    assert r4.status == 201 and not set(r4.body["ids"]) & set(r1.body["ids"]), r4
    assert daemon.task_count() == count + 3

    # Keys belong to a user: bob's request with the same key is his own.
    bob = daemon.create_user("bob")
    bfid = daemon.register(NOOP, token=bob)
    r5 = daemon.api("POST", "/v1/tasks", {"tasks": [{"function": bfid}]}, token=bob, headers=key)
    assert r5.status == 201 and len(r5.body["ids"]) == 1, r5
    assert not set(r5.body["ids"]) & set(r1.body["ids"]), r5
    assert r5.headers.get("idempotent-replayed", "false") != "true", r5.headers


def test_fault_26_two_users_cannot_see_each_others_tasks_functions_or_results(daemon):
    alice, bob = daemon.create_user("alice"), daemon.create_user("bob")
    assert daemon.api("GET", "/v1/whoami", token=alice).body == {"user": "alice", "admin": False}
    assert daemon.api("GET", "/v1/whoami", token=bob).body == {"user": "bob", "admin": False}
    af = daemon.register(SQUARE, token=alice)
    bf = daemon.register(NOOP, token=bob)
    a_ids = daemon.submit([{"function": af, "args": [i]} for i in range(3)], token=alice)
    b_ids = daemon.submit([{"function": bf, "args": [i]} for i in range(2)], token=bob)
    daemon.wait_all(a_ids, token=alice)
    daemon.wait_all(b_ids, token=bob)

    for me, mine_f, mine_t, other_f, other_t in [
        (bob, bf, b_ids, af, a_ids), (alice, af, a_ids, bf, b_ids)
    ]:
        fl = daemon.api("GET", "/v1/functions", token=me).body["functions"]
        assert [f["id"] for f in fl] == [mine_f], fl
        # Another user's ids answer exactly like ids that do not exist (404, not 403), so
        # their existence is not revealed (issue 11).
        missing = 10**9
        for path in ["/v1/functions/{}", "/v1/tasks/{}", "/v1/tasks/{}?wait=1"]:
            theirs = other_f if "functions" in path else other_t[0]
            said = error_of(daemon.api("GET", path.format(theirs), token=me), 404, "not_found")
            none = error_of(daemon.api("GET", path.format(missing), token=me), 404, "not_found")
            assert said == none.replace(str(missing), str(theirs)), (said, none)
        error_of(daemon.api("DELETE", f"/v1/tasks/{other_t[0]}", token=me), 404, "not_found")
        r = daemon.api("POST", "/v1/tasks", {"tasks": [{"function": other_f, "args": [1]}]},
                       token=me)
        assert f"function {other_f} does not exist" in error_of(r, 400, "bad_request")
        st = daemon.statuses(other_t, token=me)
        assert st == [{"id": i, "state": "unknown"} for i in other_t], st
        res = daemon.api("GET", "/v1/results?since=0", token=me).body["results"]
        assert sorted(t["id"] for t in res) == sorted(mine_t), res
        doc = daemon.status(token=me)
        assert doc["tasks"] == {"queued": 0, "running": 0, "finished": len(mine_t)}, doc
        # Only their own counts, and no path on the server.
        pool = doc["pools"][0]
        assert not {"run_dir", "queued", "running", "blocks"} & set(pool), pool
        assert pool["managers"] == [], "a shared manager is not theirs to see"
        assert str(daemon.home) not in json.dumps(doc) and "store" not in doc, doc
    # Last, so that everything above ran with the function in place.
    error_of(daemon.api("DELETE", f"/v1/functions/{af}", token=bob), 404, "not_found")
    assert daemon.api("GET", f"/v1/functions/{af}", token=alice).status == 200

    # Admins see everyone's functions.
    fl = daemon.api("GET", "/v1/functions").body["functions"]
    assert {af, bf} <= {f["id"] for f in fl}, fl


# ---------------------------------------------------------------------------------------------
# Signature checks (400 naming the task and the parameter; nothing in the batch accepted)
# ---------------------------------------------------------------------------------------------


def test_signature_recorded_and_arguments_bound_at_submit(daemon):
    r = daemon.api("POST", "/v1/functions", {"kind": "python", "entry": "f", "source": SIG_F})
    assert r.status == 201, r
    f = r.body
    assert f["signature"] == {"params": [
        {"name": "x", "kind": "positional_or_keyword", "default": None},
        {"name": "y", "kind": "positional_or_keyword", "default": "2"},
        {"name": "z", "kind": "keyword_only", "default": None},
    ]}, f
    r = daemon.api("POST", "/v1/functions", {"kind": "python", "entry": "g", "source": SIG_G})
    assert r.status == 201, r
    g = r.body
    assert [(p["name"], p["kind"], p["default"]) for p in g["signature"]["params"]] == [
        ("a", "positional_only", None), ("b", "positional_or_keyword", None),
        ("args", "var_positional", None), ("c", "keyword_only", "None"),
        ("kw", "var_keyword", None)], g

    good = {"function": f["id"], "args": {"x": 1, "z": 3}}
    bad_cases = [
        (f, [1], "z"),                          # a keyword-only parameter cannot be positional
        (f, [1, 2], "z"),
        (f, {"x": 1}, "z"),
        (f, {"z": 3}, "x"),
        (f, {}, "x"),
        (f, {"x": 1, "z": 3, "w": 4}, "w"),     # unknown keyword
        (f, {"x": 1, "y": 2, "z": 3, "q": 0}, "q"),
        (f, [1, 2, 3], None),                   # too many positional arguments
        (g, [1], "b"),
        (g, {"a": 1, "b": 2}, "a"),             # a is positional-only: missing
    ]
    count = daemon.task_count()
    for fn, args, param in bad_cases:
        r = daemon.api("POST", "/v1/tasks",
                       {"tasks": [good, good, {"function": fn["id"], "args": args}]})
        msg = error_of(r, 400, "bad_request")
        assert "tasks[2]" in msg, f"{args}: the message does not name the task: {msg}"
        if param:
            assert re.search(rf"\b{param}\b", msg), f"{args}: {param!r} not named: {msg}"
    assert daemon.task_count() == count, "a rejected batch left tasks behind"

    ids = daemon.submit([
        good,
        {"function": f["id"], "args": {"x": 1, "y": 5, "z": 3}},
        {"function": f["id"], "args": {"z": "c", "x": "a"}},
        {"function": f["id"], "encoding": "pickle", "data_b64": pickled_args(1, z=3)},
        {"function": g["id"], "args": [1, 2, 3, 4]},
        {"function": g["id"], "args": [1, 2]},
    ])
    done = daemon.wait_all(ids)
    assert [result_value(done[i]) for i in ids] == [
        [1, 2, 3], [1, 5, 3], ["a", 2, "c"], [1, 2, 3], [1, 2, [3, 4], None, {}],
        [1, 2, [], None, {}]], done


# ---------------------------------------------------------------------------------------------
# Error statuses
# ---------------------------------------------------------------------------------------------


def test_400_malformed_missing_or_wrong_fields(daemon):
    fid = daemon.register(SQUARE)
    count = daemon.task_count()
    ok = {"function": fid, "args": [1]}

    r = daemon.api("POST", "/v1/tasks", b'{"tasks": [{"function": 1,')
    error_of(r, 400, "bad_request")
    r = daemon.api("POST", "/v1/tasks", b"\xc1\xff\x00",
                   headers={"Content-Type": "application/msgpack"})
    error_of(r, 400, "bad_request")
    r = daemon.api("POST", "/v1/functions", b"not json")
    error_of(r, 400, "bad_request")

    cases = [
        ({}, "tasks"),
        ({"tasks": []}, "tasks"),
        ({"tasks": [ok, {"args": [2]}]}, "tasks[1].function"),
        ({"tasks": [ok, {"function": fid, "args": [1], "walltime": "soon"}]}, "tasks[1].walltime"),
        ({"tasks": [ok, {"function": fid, "args": [1], "walltime": 1e300}]}, "tasks[1].walltime"),
        ({"tasks": [{"function": fid, "args": "x"}]}, "tasks[0].args"),
        ({"tasks": [{"function": fid, "priority": "high"}]}, "tasks[0].priority"),
        ({"tasks": [{"function": fid, "retries": -1}]}, "tasks[0].retries"),
        ({"tasks": [{"function": fid, "encoding": "yaml", "args": [1]}]}, "tasks[0].encoding"),
        ({"tasks": [{"function": fid, "encoding": "pickle"}]}, "tasks[0].data_b64"),
        ({"tasks": [{"function": fid, "encoding": "pickle", "data_b64": "%%%"}]},
         "tasks[0].data_b64"),
        ({"tasks": [ok, ok, {"function": fid, "args": [1], "pool": "nope"}]}, "pool"),
    ]
    unnamed = []
    for body, name in cases:
        msg = error_of(daemon.api("POST", "/v1/tasks", body), 400, "bad_request")
        if name not in msg:
            unnamed.append(f"{body}: {msg!r} does not name {name!r}")
    assert daemon.task_count() == count, "a rejected batch left tasks behind"

    for spec, name in [({"name": "x"}, "kind"), ({"kind": "fortran", "command": "x"}, "kind"),
                       ({"kind": "shell"}, "command"), ({"kind": "mpi"}, "command"),
                       ({"kind": "python", "ref": "no_colon_here"}, "ref")]:
        msg = error_of(daemon.api("POST", "/v1/functions", spec), 400, "bad_request")
        if name not in msg:
            unnamed.append(f"{spec}: {msg!r} does not name {name!r}")
    assert not unnamed, "messages that do not name the field:\n" + "\n".join(unnamed)

    r = daemon.api("POST", "/v1/tasks", {"tasks": [{"function": 987_654, "args": [1]}]})
    assert r.status in (400, 404), f"unknown function id: {r.status} {r.body}"
    assert r.body["error"]["code"] == {400: "bad_request", 404: "not_found"}[r.status], r.body


def test_fault_22_unauthenticated_requests_are_refused_before_their_body_is_read(daemon):
    """No token, an unknown one, or another scheme: 401 for every endpoint that needs one, and
    before the body is parsed (a malformed body is a 401, not a 400, and a body of 64 MiB is
    not read)."""
    for method, path, body in [("GET", "/v1/whoami", None), ("GET", "/v1/functions", None),
                               ("POST", "/v1/tasks", {"tasks": [{"function": 1}]}),
                               ("GET", "/v1/tasks/1", None), ("GET", "/v1/results", None),
                               ("GET", "/v1/status", None), ("DELETE", "/v1/tasks/1", None),
                               ("POST", "/v1/tasks/status", {"ids": [1]})]:
        for token in [None, "fnx_not_a_token", daemon.token + "x"]:
            r = daemon.api(method, path, body, token=token)
            error_of(r, 401, "unauthorized")
    r = daemon.api("GET", "/v1/whoami", headers={"Authorization": "Basic dXNlcjpwYXNz"},
                   token=None)
    error_of(r, 401, "unauthorized")
    r = daemon.api("POST", "/v1/tasks", b"{not json", token=None)
    error_of(r, 401, "unauthorized")
    r = daemon.api("POST", "/v1/tasks", b"[" * (64 << 20), token="fnx_guess")
    msg = error_of(r, 401, "unauthorized")
    assert "task" not in msg.lower() or "token" in msg.lower(), msg


def test_404_unknown_ids_and_paths(daemon):
    for method, path in [("GET", "/v1/tasks/999999999"), ("DELETE", "/v1/tasks/999999999"),
                         ("GET", "/v1/tasks/999999999?wait=1"),
                         ("GET", "/v1/functions/999999999"),
                         ("DELETE", "/v1/functions/999999999"), ("GET", "/v1/nope"),
                         ("GET", "/nope"), ("POST", "/v1/taskz")]:
        error_of(daemon.api(method, path), 404, "not_found")


def test_413_batch_over_10000_tasks_and_payload_and_request_limits(make_daemon):
    d = make_daemon(limits={"max_payload_mb": 1, "max_request_mb": 2})
    fid = d.register(NOOP)
    count = d.task_count()

    r = d.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": [i]}
                                              for i in range(10_001)]})
    msg = error_of(r, 413, "payload_too_large")
    assert re.search(r"10,?000", msg), f"the limit is not in the message: {msg}"

    big = "x" * (1536 * 1024)
    r = d.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": [1]},
                                              {"function": fid, "args": [big]}]})
    msg = error_of(r, 413, "payload_too_large")
    assert re.search(r"1048576|\b1(\.0)?\s*Mi?B\b", msg), f"the limit is not in the message: {msg}"
    r = d.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "encoding": "pickle",
                                               "data_b64": pickled_args(big)}]})
    error_of(r, 413, "payload_too_large")

    under = "y" * (900 * 1024)
    r = d.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": [under]}] * 3})
    msg = error_of(r, 413, "payload_too_large")
    assert re.search(r"2097152|\b2(\.0)?\s*Mi?B\b", msg), f"the limit is not in the message: {msg}"
    assert d.task_count() == count, "a rejected request left tasks behind"

    # At the limits exactly: accepted.
    ids = d.submit([{"function": fid, "args": [under]}])
    ids += d.submit([{"function": fid, "args": [i]} for i in range(10_000)])
    assert d.task_count() == count + 10_001
    assert d.wait_task(ids[0])["result"]["value"] == under


def test_429_over_max_queued_per_user(make_daemon, fnx_env):
    d = make_daemon(limits={"max_queued_per_user": 5})
    g = gate(fnx_env)
    fid = d.register({"kind": "shell", "command": GATE})
    ids = d.submit([{"function": fid, "args": {"d": str(g), "i": i}} for i in range(5)])

    for n in (1, 3):
        r = d.api("POST", "/v1/tasks",
                  {"tasks": [{"function": fid, "args": {"d": str(g), "i": 10 + i}}
                             for i in range(n)]})
        error_of(r, 429, "queue_limit")
    assert d.task_count() == 5, "a rejected batch left tasks behind"

    bob = d.create_user("bob")
    bf = d.register({"kind": "shell", "command": GATE}, token=bob)
    bids = d.submit([{"function": bf, "args": {"d": str(g), "i": 20 + i}} for i in range(5)],
                    token=bob)
    error_of(d.api("POST", "/v1/tasks", {"tasks": [{"function": bf, "args": ["x", 1]}]},
                   token=bob), 429, "queue_limit")

    (g / "release").touch()
    d.wait_all(ids)
    d.wait_all(bids, token=bob)
    again = d.submit([{"function": fid, "args": {"d": str(g), "i": 30 + i}} for i in range(5)])
    assert all(t["state"] == "success" for t in d.wait_all(again).values())


# ---------------------------------------------------------------------------------------------
# Restart
# ---------------------------------------------------------------------------------------------


def test_graceful_restart_keeps_functions_tasks_results_and_tokens(make_daemon):
    d = make_daemon()
    bob = d.create_user("bob")
    fid = d.register(SQUARE)
    ids = d.submit([{"function": fid, "args": [i]} for i in range(4)])
    d.wait_all(ids)
    r = d.api("GET", "/v1/results?since=0")
    cursor, token = r.body["cursor"], d.token
    client_json = (d.home / "client.json").read_text()
    d.stop()
    d.start()
    assert d.token == token and (d.home / "client.json").read_text() == client_json
    assert d.api("GET", "/v1/whoami", token=bob).body == {"user": "bob", "admin": False}
    assert d.api("GET", f"/v1/functions/{fid}").body["source"] == SQUARE["source"]
    assert [result_value(t) for t in d.statuses(ids)] == [0, 1, 4, 9]
    assert d.api("GET", f"/v1/results?since={cursor}").body == {"results": [],
                                                                "cursor": cursor}
    [new] = d.submit([{"function": fid, "args": [5]}])
    assert result_value(d.wait_task(new)) == 25
    assert new not in ids
    r = d.api("GET", f"/v1/results?since={cursor}")
    assert [t["id"] for t in r.body["results"]] == [new] and r.body["cursor"] > cursor, r.body
