"""Black-box tests of the daemon's results stream (`GET /v1/results`, docs/api.md) and of
long polls (`?wait=`) on an idle daemon.
"""

from __future__ import annotations

import time

from conftest import wait_for
from daemon_env import NOOP, SQUARE, in_thread, result_value


# ---------------------------------------------------------------------------------------------
# Results stream
# ---------------------------------------------------------------------------------------------


def test_results_stream_cursor_seq_and_limit(daemon):
    fid = daemon.register(SQUARE)
    first = daemon.submit([{"function": fid, "args": [i]} for i in range(5)])
    daemon.wait_all(first)
    r = daemon.api("GET", "/v1/results?since=0")
    assert r.status == 200, r
    res, cursor = r.body["results"], r.body["cursor"]
    assert sorted(t["id"] for t in res) == sorted(first), res
    seqs = [t["seq"] for t in res]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5, seqs
    assert cursor >= seqs[-1], (cursor, seqs)
    assert {t["id"]: result_value(t) for t in res} == {
        tid: i * i for i, tid in enumerate(first)}, res

    r = daemon.api("GET", f"/v1/results?since={cursor}")
    assert r.status == 200 and r.body == {"results": [], "cursor": cursor}, r.body

    second = daemon.submit([{"function": fid, "args": [i]} for i in range(5)])
    daemon.wait_all(second)
    seen, c, pages = [], cursor, []
    for _ in range(5):
        r = daemon.api("GET", f"/v1/results?since={c}&limit=2")
        assert r.status == 200, r
        pages.append(len(r.body["results"]))
        seen += [t["id"] for t in r.body["results"]]
        assert all(t["seq"] > c for t in r.body["results"]), (c, r.body)
        c = r.body["cursor"]
    assert pages == [2, 2, 1, 0, 0], pages
    assert sorted(seen) == sorted(second), seen

    r = daemon.api("GET", "/v1/results?since=0&limit=3")
    assert [t["id"] for t in r.body["results"]] == [t["id"] for t in res[:3]], r.body


def test_results_long_poll_returns_when_a_result_arrives(daemon):
    fid = daemon.register(SQUARE)
    [warm] = daemon.submit([{"function": fid, "args": [1]}])
    daemon.wait_task(warm)
    cursor = daemon.api("GET", "/v1/results?since=0").body["cursor"]

    t0 = time.monotonic()
    r = daemon.api("GET", f"/v1/results?since={cursor}&wait=1")
    took = time.monotonic() - t0
    assert r.status == 200 and r.body == {"results": [], "cursor": cursor}, r.body
    assert 0.8 <= took < 5, f"wait=1 with nothing new answered after {took:.2f}s"

    t, box = in_thread(lambda: daemon.api("GET", f"/v1/results?since={cursor}&wait=30"))
    time.sleep(0.5)
    t0 = time.monotonic()
    [tid] = daemon.submit([{"function": fid, "args": [12]}])
    t.join(30)
    took = time.monotonic() - t0
    assert "value" in box, box
    r = box["value"]
    assert r.status == 200 and [x["id"] for x in r.body["results"]] == [tid], r.body
    assert r.body["results"][0]["result"]["value"] == 144, r.body
    assert r.body["cursor"] > cursor, r.body
    assert took < 10, f"the long poll answered {took:.2f}s after the submit (wait=30)"


def finished(d, token=None) -> int:
    """The user's finished tasks per /v1/status (reading it acknowledges nothing)."""
    kw = {} if token is None else {"token": token}
    return d.status(**kw)["tasks"]["finished"]


def test_results_since_end_gives_the_newest_cursor_and_acknowledges_nothing(make_daemon):
    # Fetched results are pruned at once (retention 0, a prune pass every 0.2 s): had
    # since=end acknowledged anything, a later since=0 would miss it.
    d = make_daemon(store={"result_retention_s": 0, "prune_interval_s": 0.2})
    bob = d.create_user("bob")
    r = d.api("GET", "/v1/results?since=end", token=bob)
    assert r.status == 200 and r.body["results"] == [], r
    bob_start = r.body["cursor"]
    assert isinstance(bob_start, int) and bob_start >= 0, r.body

    fid = d.register(SQUARE)
    ids = d.submit([{"function": fid, "args": [i]} for i in range(5)])
    wait_for(lambda: finished(d) == 5, 30, lambda: f"5 finished tasks: {d.status()['tasks']}")
    r = d.api("GET", "/v1/results?since=end")
    assert r.status == 200 and r.body["results"] == [], r
    newest = r.body["cursor"]  # the stream's end: alice's five are the newest results so far
    t0 = time.monotonic()
    r = d.api("GET", "/v1/results?since=end&wait=5")
    assert r.body == {"results": [], "cursor": newest}, r
    assert time.monotonic() - t0 < 2, "since=end waited instead of answering at once"
    time.sleep(1.0)  # five prune passes
    everything = d.api("GET", "/v1/results?since=0").body
    assert sorted(t["id"] for t in everything["results"]) == sorted(ids), (
        f"since=end marked results fetched: since=0 now gives {everything}")
    assert newest == max(t["seq"] for t in everything["results"]) == everything["cursor"]

    # Bob's stream is his own: his newest result, not alice's.
    bf = d.register(NOOP, token=bob)
    [b1] = d.submit([{"function": bf, "args": [1]}], token=bob)
    wait_for(lambda: finished(d, bob) == 1, 30, "bob's task finished")
    [mine] = d.api("GET", "/v1/results?since=0", token=bob).body["results"]
    assert mine["id"] == b1, mine
    r = d.api("GET", "/v1/results?since=end", token=bob)
    assert r.body == {"results": [], "cursor": mine["seq"]}, (r, mine)  # the newest of all
    assert d.api("GET", "/v1/results?since=end").body["cursor"] >= newest

    # A consumer that starts at since=end gets what finishes afterwards, and only that.
    [later] = d.submit([{"function": fid, "args": [9]}])
    r = d.api("GET", f"/v1/results?since={newest}&wait=30")
    assert [t["id"] for t in r.body["results"]] == [later], r.body
    assert result_value(r.body["results"][0]) == 81

    # Control: what a page delivers counts as fetched, so with no retention it goes.
    wait_for(lambda: not d.api("GET", "/v1/results?since=0").body["results"], 10,
             lambda: "delivered results pruned (retention 0): since=0 still gives "
             f"{[t['id'] for t in d.api('GET', '/v1/results?since=0').body['results']]}")


# ---------------------------------------------------------------------------------------------
# Long polls on an idle daemon
# ---------------------------------------------------------------------------------------------


def test_regression_idle_long_poll_wakes(daemon):
    """Bug "idle long-poll missed its wake-up": the results sequence was only stored when a
    long poll was waiting, so on an idle daemon `GET /v1/tasks/{id}?wait=` sometimes slept
    through the task's completion (29 s instead of milliseconds)."""
    fid = daemon.register(NOOP)
    [warm] = daemon.submit([{"function": fid, "args": [0]}])
    daemon.wait_task(warm)
    took, slow = [], []
    for i in range(200):
        t0 = time.monotonic()
        [tid] = daemon.submit([{"function": fid, "args": [i]}])
        r = daemon.api("GET", f"/v1/tasks/{tid}?wait=20")
        dt = time.monotonic() - t0
        took.append(dt)
        assert r.status == 200 and r.body["state"] == "success", (i, r)
        assert r.body["result"]["value"] == i, r.body
        if dt > 5:
            slow.append((i, round(dt, 2)))
    took.sort()
    print(f"\nidle long poll: 200 submit+wait round trips, p50 {took[100] * 1000:.1f} ms, "
          f"p99 {took[198] * 1000:.1f} ms, max {took[-1] * 1000:.1f} ms")
    assert not slow, f"round trips over 5 s (round, seconds): {slow}"
