"""Managers drain before their batch job's walltime ends (`--drain-after-ms`, set by every block
to walltime − drain_margin): they take no new tasks, finish the ones they hold, are released and
exit 0; the tasks they never got wait for other managers. Nothing is lost (issue 4, "Blocks";
FAULTS.md 30)."""

from __future__ import annotations

from conftest import wait_for
from test_daemon_reregister import managers_connected, start_external_manager


def test_a_manager_drains_at_its_deadline_finishing_what_it_holds(make_daemon, fnx_env, tmp_path):
    d = make_daemon(pools={"local": {"managers": 0}})
    early = start_external_manager(fnx_env, d, "early", 2, "--prefetch", "0",
                                   "--drain-after-ms", "2500")
    late = None
    try:
        wait_for(lambda: managers_connected(d) == 1, 20, "the first manager registers")
        marks = tmp_path / "marks"
        marks.mkdir()
        fid = d.register({"kind": "shell",
                          "command": "sleep {s}; echo $FNX_TASK_ID >> " + str(marks) + "/{i}"})
        # Two 4 s tasks start at once and are still running at the 2.5 s deadline.
        ids = d.submit([{"function": fid, "args": {"s": "4", "i": f"t{i}"}} for i in range(6)])
        wait_for(lambda: sum(t["state"] == "running" for t in d.statuses(ids)) == 2, 20,
                 "two tasks run on the early manager")
        mlog = d.dir / "external" / "early" / "manager.log"
        wait_for(lambda: "draining" in mlog.read_text(errors="replace"), 10,
                 f"the manager says it drains in {mlog}")
        # It finishes its two tasks, gets nothing new, is released and exits 0.
        assert early.wait(timeout=20) == 0, mlog.read_text(errors="replace")[-2000:]
        states = [t["state"] for t in d.statuses(ids)]
        assert states.count("success") == 2, states
        assert states.count("queued") == 4, f"the other tasks wait, none is lost: {states}"
        # A manager of the next block picks up the rest.
        late = start_external_manager(fnx_env, d, "late", 4)
        records = [d.wait_task(t, timeout=30) for t in ids]
        assert all(r["state"] == "success" for r in records), records
        assert all(r["attempt"] == 1 for r in records), \
            f"draining requeues nothing that ran: {[r['attempt'] for r in records]}"
        ran = {p.name: len(p.read_text().split()) for p in marks.iterdir()}
        assert ran == {f"t{i}": 1 for i in range(6)}, ran
        assert "drained and released" in d.log_since_start()
    finally:
        for p in (early, late):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
