"""Faults from FAULTS.md injected into a running `fnx daemon` (1: kill -9 under load, 2: kill -9
right after a submit's acknowledgement, 3: a torn tail of the store's write-ahead log, 4: a block
of zeros in the middle of the store, 5: the store's disk is full).

"Accounted" (FAULTS.md): every task acknowledged with a 201 ends in exactly one terminal
record and none stays pending once the daemon is healthy. Executions are counted with marker
files, one per execution (`mktemp` gives each its own name).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shlex
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import wait_for
from daemon_env import (
    GATE, NOOP, TERMINAL, error_of, gate, in_thread, result_value, wait_started,
)


def read_stream(d, cursor: int, wait: float = 0) -> tuple[list[dict], int]:
    r = d.api("GET", f"/v1/results?since={cursor}&wait={wait}&limit=10000")
    assert r.status == 200, f"GET /v1/results: {r.status} {r.body}"
    for t in r.body["results"]:
        assert t["state"] in TERMINAL, f"a result that is not terminal: {t}"
    return r.body["results"], r.body["cursor"]


def read_all_results(d) -> list[int]:
    """Every result id from the start of the stream (since=0), paging by `limit`."""
    ids, cursor = [], 0
    while True:
        res, cursor = read_stream(d, cursor)
        if not res:
            return ids
        ids += [t["id"] for t in res]


def duplicates(ids) -> dict[int, int]:
    return {i: n for i, n in Counter(ids).items() if n > 1}


# ---------------------------------------------------------------------------------------------
# 1. Daemon kill -9 with 10,000 tasks queued and hundreds running, then restart
# ---------------------------------------------------------------------------------------------


def test_fault_01_daemon_kill9_recovers(make_daemon, fnx_env):
    N, SLEEPERS = 10_000, 300
    d = make_daemon(pools={"local": {"workers_per_manager": 300}})
    marks = fnx_env.dir / "marks"
    (marks / "start").mkdir(parents=True)
    (marks / "end").mkdir()
    q = shlex.quote(str(marks))
    # One marker file per execution (start/I.XXXXXXXX); sleepers also mark their end.
    sleeper = d.register({"kind": "shell", "name": "sleeper", "command":
                          f"mktemp {q}/start/{{i}}.XXXXXXXX >/dev/null && sleep 3 && "
                          f"touch {q}/end/{{i}}"})
    toucher = d.register({"kind": "shell", "name": "toucher",
                          "command": f"mktemp {q}/start/{{i}}.XXXXXXXX >/dev/null"})
    tasks = [{"function": sleeper, "args": {"i": i}, "priority": 10} for i in range(SLEEPERS)]
    tasks += [{"function": toucher, "args": {"i": i}} for i in range(SLEEPERS, N)]
    ids = d.submit(tasks, timeout=300)
    assert len(set(ids)) == N, "duplicate ids in one batch"
    index = {tid: i for i, tid in enumerate(ids)}

    delivered: list[int] = []
    wait_for(lambda: d.status()["tasks"]["running"] >= 200, 120,
             lambda: f"200 running tasks: {d.status()['tasks']}")
    res, cursor = read_stream(d, 0)
    delivered += [t["id"] for t in res]
    snapshot = d.statuses(ids[:SLEEPERS])
    d.kill9()  # asserts that every process under the daemon died with it
    fnx_env.assert_no_processes(grace=5)

    ended = {int(p.name) for p in (marks / "end").iterdir()}
    running_at_kill = {t["id"] for t in snapshot
                       if t["state"] == "running" and index[t["id"]] not in ended}
    executed_before = len(list((marks / "start").iterdir()))
    assert len(running_at_kill) >= 150, (
        f"test setup: only {len(running_at_kill)} sleepers were running at the kill")

    d.start(timeout=180)
    restart_s = d.ready_s
    t0 = time.monotonic()
    deadline = t0 + 300
    while len(set(delivered)) < N:
        res, cursor = read_stream(d, cursor, wait=10)
        delivered += [t["id"] for t in res]
        if time.monotonic() > deadline:
            states = Counter(t["state"] for t in d.statuses(ids))
            pytest.fail(f"only {len(set(delivered))} of {N} results after 300 s; states "
                        f"{dict(states)}\n{d.log_tail()}", pytrace=False)
    drain_s = time.monotonic() - t0
    res, cursor = read_stream(d, cursor, wait=2)
    delivered += [t["id"] for t in res]

    execs = Counter(int(p.name.split(".")[0]) for p in (marks / "start").iterdir())
    records = {t["id"]: t for t in d.statuses(ids)}
    reruns = sum(execs.values()) - len(execs)
    print(f"\nfault 01: {N} tasks, {len(running_at_kill)} running at the kill, "
          f"{executed_before} executions before it; restart to health {restart_s:.2f}s, "
          f"drain {drain_s:.1f}s; {sum(execs.values())} executions, {reruns} re-executions "
          f"({sum(1 for n in execs.values() if n > 1)} tasks ran more than once); attempts "
          f"{dict(Counter(t.get('attempt') for t in records.values()))}")

    # FAULTS.md 1: "Restart time is logged."
    after_restart = d.log_path.read_text(errors="replace").rsplit("==== fnx-test: start #2", 1)[1]
    recovery = [ln for ln in after_restart.splitlines()
                if re.search(r"(?i)\brecover.*\b\d+(\.\d+)?\s*m?s\b", ln)]
    print(f"fault 01: the daemon logged: {recovery}")
    assert recovery, f"no log line gives the recovery time:\n{after_restart[:3000]}"

    assert not duplicates(delivered), f"results delivered twice: {duplicates(delivered)}"
    assert set(delivered) == set(ids), f"{len(set(ids) - set(delivered))} ids never delivered"
    not_ok = {i: t for i, t in records.items() if t["state"] != "success"}
    assert not not_ok, f"{len(not_ok)} tasks not successful, e.g. {list(not_ok.values())[:3]}"
    everything = read_all_results(d)
    assert not duplicates(everything), f"the stream from 0 repeats {duplicates(everything)}"
    assert set(everything) == set(ids)
    missing = [i for i in range(N) if execs[i] == 0]
    assert not missing, f"{len(missing)} tasks recorded as success never ran: {missing[:10]}"
    low = {i: records[i]["attempt"] for i in running_at_kill if records[i]["attempt"] < 2}
    assert not low, (
        f"tasks running at the kill finished with attempt < 2: {dict(list(low.items())[:10])}")
    rerun_low = {ids[i]: (n, records[ids[i]]["attempt"]) for i, n in execs.items()
                 if n > 1 and records[ids[i]]["attempt"] < 2}
    assert not rerun_low, (
        f"tasks executed more than once whose record says attempt 1 (executions, attempt): "
        f"{dict(list(rerun_low.items())[:10])}")


# ---------------------------------------------------------------------------------------------
# 2. Daemon kill -9 right after (or before) a submit's acknowledgement
# ---------------------------------------------------------------------------------------------


def test_fault_02_kill9_after_ack(make_daemon):
    d = make_daemon()
    fid = d.register(NOOP)
    body = {"tasks": [{"function": fid, "args": [i]} for i in range(1000)]}
    key = {"Idempotency-Key": "fault-02-after-ack"}
    r = d.api("POST", "/v1/tasks", body, headers=key)
    d.kill9()
    assert r.status == 201, r
    ids = r.body["ids"]

    d.start()
    done = d.wait_all(ids, timeout=120)
    assert [result_value(done[t]) for t in ids] == list(range(1000))
    count = d.task_count()
    assert count == 1000, f"{count} tasks after the restart, 1000 were submitted"

    again = d.api("POST", "/v1/tasks", body, headers=key)
    assert again.status == 201, again
    assert again.body["ids"] == ids, "an idempotent retry after the restart gave other ids"
    assert again.headers.get("idempotent-replayed") == "true", again.headers
    assert d.task_count() == count, "the retry after the restart created tasks"


def test_fault_02_kill9_during_submit_retry_with_the_same_key_creates_no_duplicate(make_daemon):
    d = make_daemon()
    fid = d.register(NOOP)
    n = 2000
    body = json.dumps({"tasks": [{"function": fid, "args": [i]} for i in range(n)]}).encode()
    headers = {"Idempotency-Key": "fault-02-in-flight", "Content-Type": "application/json",
               "Authorization": f"Bearer {d.token}"}
    before = d.task_count()
    sent = threading.Event()

    def post():
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        try:
            conn.request("POST", "/v1/tasks", body=body, headers=headers)
        finally:
            sent.set()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")

    t, box = in_thread(post)
    assert sent.wait(30)
    d.kill9()
    t.join(30)
    first = box.get("value")
    print(f"\nfault 02: the in-flight submit got {first[0] if first else repr(box.get('error'))}")

    d.start()
    r = d.api("POST", "/v1/tasks", body, headers={k: v for k, v in headers.items()
                                                  if k != "Authorization"})
    assert r.status == 201, r
    ids = r.body["ids"]
    assert len(ids) == n and len(set(ids)) == n, r.body
    if first is not None:
        assert first[0] == 201, f"the in-flight submit was answered {first}"
        assert ids == first[1]["ids"], "the retry gave other ids than the acknowledged submit"
        assert r.headers.get("idempotent-replayed") == "true", r.headers
    assert d.task_count() == before + n, (
        f"{d.task_count() - before} tasks exist for one submit of {n} and its retry")
    done = d.wait_all(ids, timeout=120)
    assert all(t["state"] == "success" for t in done.values())


# ---------------------------------------------------------------------------------------------
# 3. A torn tail of the store's write-ahead log (truncated by a few bytes, or garbage appended)
# ---------------------------------------------------------------------------------------------


def store_log(d) -> list[str]:
    """Lines of the daemon's log since its last start that speak of the store or recovery."""
    return [ln for ln in d.log_since_start().splitlines()
            if re.search(r"(?i)wal|fnx\.db|store|recover|corrupt|malformed|warn|offset", ln)]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_fault_03_torn_wal_tail(make_daemon, damage):
    d = make_daemon()
    fid = d.register(NOOP)
    batches = [d.submit([{"function": fid, "args": [b * 100 + k]} for k in range(100)])
               for b in range(20)]
    d.kill9()
    wal = d.home / "fnx.db-wal"
    size = wal.stat().st_size if wal.exists() else 0
    assert size > 32, f"test setup: no write-ahead log to damage ({wal}: {size} bytes)"
    if damage == "truncate":
        os.truncate(wal, size - 7)
    else:
        with open(wal, "ab") as f:
            f.write(random.Random(3).randbytes(1000))

    d.start()
    present = {t["id"] for t in d.statuses([i for b in batches for i in b])
               if t["state"] != "unknown"}
    lost = [k for k, b in enumerate(batches) if not set(b) <= present]
    partly = [k for k in lost if set(batches[k]) & present]
    print(f"\nfault 03 ({damage}): WAL of {size} bytes; restart to health {d.ready_s:.2f}s; "
          f"batches lost: {lost} (of {len(batches)}); the daemon logged: {store_log(d)}")
    assert not partly, f"batches {partly} were half kept: a commit is all or nothing"
    if damage == "truncate":
        assert set(lost) <= {len(batches) - 1}, (
            f"acknowledged batches {lost} lost; only the last commit may go with a torn tail")
    else:
        assert not lost, f"garbage after the last commit lost acknowledged batches {lost}"

    kept = [i for b in batches for i in b if i in present]
    done = d.wait_all(kept, timeout=120)
    assert all(t["state"] == "success" for t in done.values()), [
        t for t in done.values() if t["state"] != "success"][:3]
    [new] = d.submit([{"function": fid, "args": [7]}])
    assert result_value(d.wait_task(new)) == 7
    acked = {i for b in batches for i in b}
    print(f"fault 03 ({damage}): a task submitted after the restart got id {new}")
    assert new not in acked, "an id acknowledged before the kill was handed out again"
    log = d.log_since_start()
    assert "not a whole log frame" in log and "offset" in log, (
        f"the torn tail must be logged with its byte offset:\n{log[-2000:]}")
    r = d.api("GET", "/v1/health", token=None)
    assert r.status == 200 and r.body["store"] == "ok", r


# ---------------------------------------------------------------------------------------------
# 4. A block of zeros in the middle of the store
# ---------------------------------------------------------------------------------------------


def filled_then_stopped(d, batches: int, per_batch: int) -> tuple[int, list[int]]:
    """Run batches of no-op tasks with 1 KB arguments on `d` to completion, then stop it: a
    clean stop checkpoints the write-ahead log into fnx.db. Returns the function and ids."""
    fid = d.register(NOOP)
    pad = "z" * 1000
    ids = []
    for b in range(batches):
        ids += d.submit([{"function": fid, "args": [f"{b}-{k}-{pad}"]}
                         for k in range(per_batch)])
    d.wait_all(ids, timeout=120)
    d.stop()
    return fid, ids


def test_fault_04_corrupt_store(make_daemon, fnx_env):
    d = make_daemon()
    fid, ids = filled_then_stopped(d, 4, 1000)
    db, wal = d.home / "fnx.db", d.home / "fnx.db-wal"
    wal_size = wal.stat().st_size if wal.exists() else None
    size = db.stat().st_size
    offset = size // 2 // 4096 * 4096
    with open(db, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * 8192)

    t0 = time.monotonic()
    rc = d.try_start(timeout=30)  # fails the test if the daemon neither serves nor exits
    took = time.monotonic() - t0
    log = d.log_since_start()
    if rc is not None:
        print(f"\nfault 04: {size}-byte store (WAL after the stop: {wal_size}), zeros at "
              f"{offset}: the daemon exited with {rc} after {took:.2f}s:\n{log.strip()[-2000:]}")
        assert rc != 0, f"the daemon exited 0 on a corrupt store:\n{log}"
        assert took < 10, f"the daemon took {took:.1f}s to give up on a corrupt store"
        assert "fnx.db" in log, f"the error does not name the store file:\n{log}"
        fnx_env.assert_no_processes(grace=5)
        return

    states: Counter = Counter()
    for k in range(0, len(ids), 500):
        r = d.api("POST", "/v1/tasks/status", {"ids": ids[k:k + 500]})
        if r.status != 200:
            states[f"HTTP {r.status}"] += 1
        else:
            states.update(t["state"] for t in r.body["tasks"])
    print(f"\nfault 04: {size}-byte store (WAL after the stop: {wal_size}), zeros at {offset}: "
          f"the daemon came up in {took:.2f}s; old tasks: {dict(states)}; it logged: "
          f"{store_log(d)}")
    assert d.api("GET", "/v1/status").status == 200
    [new] = d.submit([{"function": fid, "args": ["after"]}])
    assert result_value(d.wait_task(new)) == "after"


@pytest.mark.parametrize("damage", ["zeros", "claim"])
def test_fault_04_a_damaged_page_is_named_and_the_store_salvaged_on_request(make_daemon, damage):
    """A leaf page of the tasks table overwritten with zeros, or a row on it whose length field
    claims 2^40 bytes: the daemon refuses to start (without a huge allocation), naming the
    file, the damaged page with its byte offsets and what is wrong, and --salvage. Started with
    --salvage it moves the file aside (kept), copies every readable row, says which row ids
    were lost, and serves: the other tasks are there, and new ids never reuse lost ones."""
    d = make_daemon(store={"sync": "normal"})
    fid, ids = filled_then_stopped(d, 3, 500)
    db = d.home / "fnx.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        page_size = c.execute("PRAGMA page_size").fetchone()[0]
        leaves = [p for (p,) in c.execute(
            "SELECT pageno FROM dbstat WHERE name = 'tasks' AND pagetype = 'leaf' ORDER BY pageno")]
    page = leaves[len(leaves) // 2]
    with open(db, "r+b") as f:
        if damage == "zeros":
            f.seek((page - 1) * page_size)
            f.write(b"\0" * page_size)
            what = "its type byte is 0x00"
        else:
            # The first cell's payload length, as a varint of 2^40.
            f.seek((page - 1) * page_size + 8)
            cell = int.from_bytes(f.read(2), "big")
            f.seek((page - 1) * page_size + cell)
            f.write(bytes([0xa0, 0x80, 0x80, 0x80, 0x80, 0x00]))
            what = f"cell 0 claims a payload of {1 << 40} bytes"

    rc = d.try_start(timeout=30)
    log = d.log_since_start()
    assert rc not in (None, 0), f"the daemon started on a damaged store:\n{log[-3000:]}"
    assert str(db) in log and f"page {page} (bytes {(page - 1) * page_size} to " in log, log[-3000:]
    assert what in log, log[-3000:]
    assert "fnx daemon --salvage" in log, log[-3000:]

    plain = d.daemon_argv
    d.daemon_argv = lambda: plain() + ["--salvage"]
    try:
        d.start()
    finally:
        d.daemon_argv = plain
    log = d.log_since_start()
    m = re.search(r"salvaged the store .*?: the damaged store is kept as (\S+?);", log)
    assert m and os.path.exists(m.group(1)), log[-3000:]
    lost = re.search(r"tasks: (\d+) rows copied, unreadable rowids ([\d, -]+)", log)
    assert lost, log[-3000:]
    lost_ids = set()
    for part in lost.group(2).split(", "):
        a, _, b = part.partition("-")
        lost_ids.update(range(int(a), int(b or a) + 1))
    assert 0 < len(lost_ids) < 100, lost.group(0)
    states = Counter()
    for k in range(0, len(ids), 500):
        for t in d.api("POST", "/v1/tasks/status", {"ids": ids[k:k + 500]}).body["tasks"]:
            states[t["state"]] += 1
            if t["state"] != "unknown":
                assert t["id"] not in lost_ids, t
    # Every task is either whole or gone (a damaged row's own id bytes may be gone with it,
    # so a neighbour can go unreported); a handful at most, one page's worth.
    assert states["success"] + states["unknown"] == len(ids), states
    assert len(lost_ids & set(ids)) <= states["unknown"] <= 10, (states, lost.group(0))
    [new] = d.submit([{"function": fid, "args": ["after"]}])
    assert new > max(ids) + 2**31, f"a new task took id {new}: ids did not skip ahead"
    assert result_value(d.wait_task(new)) == "after"
    d.stop()
    d.start()  # an ordinary start on the salvaged store


# ---------------------------------------------------------------------------------------------
# 5. The store's disk is full, or the store reaches its configured size
# ---------------------------------------------------------------------------------------------


def fill(path, nbytes: int) -> None:
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        while nbytes > 0:
            k = min(nbytes, len(chunk))
            f.write(chunk[:k])
            nbytes -= k


def submit_until_503(d, fid, marks, first_index: int, batches: int) -> tuple[list[int], str]:
    """Submit batches of 20 tasks with 4 KiB arguments each until a 503; returns the
    acknowledged ids and the 503's message."""
    pad = "p" * 4096
    acked: list[int] = []
    for b in range(batches):
        base = first_index + b * 20
        tasks = [{"function": fid, "args": {"m": str(marks), "i": base + k, "x": pad}}
                 for k in range(20)]
        r = d.api("POST", "/v1/tasks", {"tasks": tasks})
        if r.status == 201:
            acked += r.body["ids"]
            continue
        return acked, error_of(r, 503, "store_unavailable")
    pytest.fail(f"no 503 after {batches} batches ({len(acked)} tasks acknowledged)\n"
                + d.log_tail(), pytrace=False)


PAYLOAD = {"kind": "shell", "name": "payload", "command": ": {x}; touch {m}/{i}"}


def test_fault_05_store_full(make_daemon, fnx_env):
    mnt = fnx_env.dir / "store-tmpfs"
    mnt.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a 16 MiB tmpfs for the store (needs root): {m.stderr.strip()}")
    d = None
    # Made before the daemon starts: its data directory is in this test's directory, whose
    # entries are fixed for the tasks' sandbox when a manager starts (service mode).
    g = fnx_env.dir / "gate"
    marks = fnx_env.dir / "marks"
    g.mkdir()
    marks.mkdir()
    try:
        d = make_daemon(data_dir=mnt)
        gated = d.register({"kind": "shell", "command": GATE})
        fid = d.register(PAYLOAD)
        held = d.submit([{"function": gated, "args": {"d": str(g), "i": i}} for i in range(2)])
        wait_for(lambda: all((g / f"started-{i}").exists() for i in range(2)), 30,
                 "both gated tasks started")

        st = os.statvfs(mnt)
        fill(mnt / "filler", st.f_bavail * st.f_frsize - 384 * 1024)
        acked, msg = submit_until_503(d, fid, marks, 0, batches=400)
        print(f"\nfault 05: {len(acked)} tasks acknowledged before the store was full: {msg}")
        # Both workers hold the gated tasks and the rest is queued. Dispatch records may still
        # commit (they are small), but submits fail: health and status say so.
        r = d.api("GET", "/v1/health", token=None)
        assert r.status == 503 and r.body["store"].startswith("unavailable"), r
        s = d.status()
        assert s["store"]["healthy"] is False, s["store"]
        metrics = d.api("GET", "/metrics", token=None).body
        errors = [ln for ln in metrics.splitlines()
                  if re.match(r"fnx_store_commit_errors_total[{ ]", ln)]
        assert errors and sum(float(ln.split()[-1]) for ln in errors) >= 1, errors
        assert d.task_count() == 2 + len(acked), "a refused submit left tasks behind"

        # Running tasks continue while the store is full.
        (g / "release").touch()
        wait_for(lambda: all((g / f"done-{i}").exists() for i in range(2)), 30,
                 "the gated tasks finished their work while the store was full")
        time.sleep(1)
        ran_while_full = sum(1 for i in range(len(acked)) if (marks / str(i)).exists())
        print(f"fault 05: {ran_while_full} of {len(acked)} queued tasks ran while it was full")

        # Space comes back: submits succeed again within a few seconds.
        (mnt / "filler").unlink()
        t0 = time.monotonic()
        later: list[int] = []
        while True:
            r = d.api("POST", "/v1/tasks", {"tasks": [
                {"function": fid, "args": {"m": str(marks), "i": 100_000, "x": "after"}}]})
            if r.status == 201:
                later = r.body["ids"]
                break
            error_of(r, 503, "store_unavailable")
            assert time.monotonic() - t0 < 10, "submits still refused 10 s after space was freed"
            time.sleep(0.2)
        print(f"fault 05: submits accepted {time.monotonic() - t0:.2f}s after space was freed")
        everything = held + acked + later
        done = d.wait_all(everything, timeout=60)
        bad = [t for t in done.values() if t["state"] != "success"]
        assert not bad, f"{len(bad)} acknowledged tasks did not succeed, e.g. {bad[:3]}"
        missing = [i for i in [*range(len(acked)), 100_000] if not (marks / str(i)).exists()]
        assert not missing, f"acknowledged tasks recorded as success never ran: {missing[:10]}"
        wait_for(lambda: d.api("GET", "/v1/health", token=None).status == 200, 10,
                 "health 200 once space is back")

        # Everything acknowledged was persisted.
        d.kill9()
        d.start()
        after = d.statuses(everything)
        assert all(t["state"] == "success" for t in after), [
            t for t in after if t["state"] != "success"][:3]
        d.stop()
    finally:
        if d is not None:
            d.crashes()  # read the logs on the tmpfs before it goes away
            d.kill9(check=False)
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_fault_05_store_size_limit(make_daemon, fnx_env):
    d = make_daemon(store={"max_size_mb": 1})
    marks = fnx_env.dir / "marks"
    marks.mkdir()
    fid = d.register(PAYLOAD)
    acked, msg = submit_until_503(d, fid, marks, 0, batches=200)
    print(f"\nfault 05 (max_size_mb = 1): {len(acked)} tasks acknowledged: {msg}")
    assert acked, "the first batch was refused already"
    assert "max_size_mb" in msg or re.search(r"\b1(\.0)?\s*Mi?B\b|1048576", msg), (
        f"the limit is not in the message: {msg}")
    assert d.task_count() == len(acked), "a refused submit left tasks behind"
    done = d.wait_all(acked, timeout=60)
    bad = [t for t in done.values() if t["state"] != "success"]
    assert not bad, f"{len(bad)} acknowledged tasks did not succeed, e.g. {bad[:3]}"
    missing = [i for i in range(len(acked)) if not (marks / str(i)).exists()]
    assert not missing, f"acknowledged tasks recorded as success never ran: {missing[:10]}"


def test_fault_32_a_task_running_in_two_daemon_crashes_in_a_row_fails_daemon_crashed(
        make_daemon, fnx_env):
    """A task that (we pretend) kills the daemon: it runs in each of two crashes in a row and is
    then failed as daemon_crashed instead of being dispatched a third time; the next task runs.
    A task dispatched in both crashes but waiting in its manager's queue (prefetched, never
    started) is not counted. One crash, a clean stop and another crash are not two in a row."""
    g = gate(fnx_env)
    d = make_daemon(pools={"local": {"workers_per_manager": 1}})
    fid = d.register({"kind": "shell", "command": GATE.format(d=g, i="{i}")})
    quick = d.register({"kind": "shell", "command": "echo waited"})
    [poison] = d.submit([{"function": fid, "args": {"i": 1}}])

    def running_attempt(tid, n):
        wait_for(lambda: d.task(tid)["state"] == "running" and d.task(tid)["attempt"] == n, 30,
                 f"attempt {n} of task {tid} running")

    def started(tid, n):
        """The store has recorded that attempt `n` of `tid` started on its manager."""
        def recorded():
            with sqlite3.connect(f"file:{d.home / 'fnx.db'}?mode=ro", uri=True) as db:
                row = db.execute("SELECT started FROM tasks WHERE id = ?", (tid,)).fetchone()
            return row is not None and row[0] == n
        wait_for(recorded, 30, f"the start of attempt {n} of task {tid} recorded")

    running_attempt(poison, 1)
    [waiting] = d.submit([{"function": quick, "args": {}}])
    running_attempt(waiting, 1)  # dispatched: held in the manager's queue behind the poison
    started(poison, 1)
    d.kill9()
    d.start()
    assert "the last daemon did not stop in order" in d.log_since_start()
    running_attempt(poison, 2)
    running_attempt(waiting, 2)
    started(poison, 2)
    d.kill9()
    d.start()
    rec = d.wait_task(poison)
    assert rec["state"] == "failed" and rec["error"]["kind"] == "daemon_crashed", rec
    assert "crashed 2 times in a row" in rec["error"]["message"], rec
    assert "limits.max_daemon_crashes = 2" in rec["error"]["message"], rec
    assert "fail as daemon_crashed" in d.log_since_start()
    rec = d.wait_task(waiting)
    assert rec["state"] == "success" and rec["result"]["value"]["stdout"] == "waited\n", rec
    assert d.status()["tasks"] == {"queued": 0, "running": 0, "finished": 2}

    # Crashes count in a row: one crash, a clean stop, one crash is not two.
    [again] = d.submit([{"function": fid, "args": {"i": 2}}])
    running_attempt(again, 1)
    started(again, 1)
    d.kill9()
    d.start()
    running_attempt(again, 2)
    d.stop()
    d.start()
    running_attempt(again, 3)
    started(again, 3)
    d.kill9()
    d.start()
    running_attempt(again, 4)
    (g / "release").touch()
    assert d.wait_task(again)["state"] == "success"


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_fault_28_a_hundred_thousand_queued_tasks_within_budget_and_across_a_restart(
        make_daemon):
    """The smaller, gated form of FAULTS 28 (the million is in benches/daemon/million.py):
    100,000 queued no-op tasks cost the daemon at most 2 KiB each beyond their arguments, and
    a restart recovers every one of them, saying how long it took."""
    n = 100_000
    d = make_daemon(pools={"local": {"managers": 0}}, store={"sync": "normal"})
    fid = d.register(NOOP)
    d.submit([{"function": fid, "args": [0]}])  # warm-up: threads, connections, caches
    before = rss_kib(d.pid)
    for start in range(0, n, 10_000):
        d.submit([{"function": fid, "args": [i]} for i in range(start, start + 10_000)])
    grew = rss_kib(d.pid) - before
    print(f"\n{n} queued tasks: daemon RSS +{grew / 1024:.1f} MiB ({grew * 1024 / n:.0f} B/task)")
    assert grew * 1024 / n < 2048, f"{grew * 1024 / n:.0f} bytes per queued task"
    d.stop()
    d.start()
    m = re.search(r"recovered (\d+) unfinished tasks .* in ([\d.]+) s", d.log_since_start())
    assert m and int(m.group(1)) == n + 1, d.log_tail()
    assert d.status()["tasks"]["queued"] == n + 1


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SLEEP = {"kind": "python", "entry": "nap",
         "source": "def nap(s):\n    import time\n    time.sleep(s)\n    return s\n"}


def test_fault_30_a_wall_clock_step_expires_nothing(make_daemon, fnx_env):
    """The login node's clock steps an hour forward, then two back (libfaketime, wall clock
    only: the monotonic clock runs on, as it does through a real step). Heartbeats, walltimes,
    connection timeouts and long polls run on the monotonic clock: no manager is lost, no task
    runs out of time, and no result is pruned."""
    assert LIBFAKETIME.exists(), "libfaketime is missing: run scripts/install-deps.sh --test"
    offset = fnx_env.dir / "clock-offset"
    offset.write_text("+0\n")
    d = make_daemon(
        interchange={"heartbeat_period_s": 0.5, "heartbeat_threshold_s": 3},
        store={"prune_interval_s": 1},
        env={"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(offset),
             "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"})
    noop = d.register(NOOP)
    nap = d.register(SLEEP)
    before = d.wait_all(d.submit([{"function": noop, "args": [i]} for i in range(20)]))
    for step, label in (("+3600", "an hour forward"), ("-3600", "two hours back")):
        # A task with a walltime runs across the step.
        [napping] = d.submit([{"function": nap, "args": [3], "walltime": 6}])
        wait_for(lambda: d.task(napping)["state"] == "running", 30, "the nap task to start")
        offset.write_text(step + "\n")
        t0 = time.time()
        new = d.wait_all(d.submit([{"function": noop, "args": [99]}]))
        finished_at = next(iter(new.values()))["finished_at"]
        skew = finished_at - t0
        assert abs(skew - int(step)) < 120, \
            f"the daemon's wall clock did not step {label} (task finished {skew:+.0f} s away)"
        done = d.wait_all([napping], timeout=30)[napping]
        assert result_value(done) == 3, f"after a step {label}: {done}"
        time.sleep(4)  # past the heartbeat threshold and a prune
        st = d.api("GET", "/v1/status").body
        assert st["pools"][0]["managers_connected"] == 1, f"after a step {label}: {st['pools']}"
        kept = d.statuses(list(before))
        assert all(t["state"] == "success" and "result" in t for t in kept), \
            f"results were pruned after a step {label}: {kept[:2]}"
    log = d.log_path.read_text(errors="replace")
    assert not re.search(r"manager .* lost|declared lost", log), log[-3000:]
