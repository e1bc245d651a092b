"""Managers that outlive the daemon (started outside it, as batch jobs will start them) register
again with the restarted daemon; results of the attempts it superseded are discarded, and each
task's outcome is recorded once (issue 3, "Store"; FAULTS.md 1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

from conftest import wait_for


def start_external_manager(fnx_env, daemon, uid: str, slots: int, *extra: str,
                           port: int | None = None) -> subprocess.Popen:
    log = open(daemon.dir / f"{uid}.stderr", "wb")
    return subprocess.Popen(
        [str(fnx_env.bin), "manager", "--interchange",
         f"tcp://127.0.0.1:{port or daemon.interchange_port}", "--uid", uid,
         "--run-dir", str(daemon.dir / "external"), "--run-id", f"ext-{uid}",
         "--slots", str(slots), "--heartbeat-period-ms", "500",
         # Every manager link is authenticated: the pool's issued key file.
         "--curve-keys", str(daemon.home / "keys" / "local.manager"), *extra],
        cwd=fnx_env.dir, env=fnx_env.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=log,
    )


def stop_manager(manager: subprocess.Popen) -> None:
    """SIGTERM an external manager if it still runs; SIGKILL it after 15 s."""
    if manager.poll() is None:
        manager.send_signal(signal.SIGTERM)
        try:
            manager.wait(15)
        except subprocess.TimeoutExpired:
            manager.kill()
            manager.wait(5)


def managers_connected(daemon) -> int:
    return sum(p["managers_connected"] for p in daemon.status()["pools"])


def test_fault_01_external_manager_reregisters_after_daemon_kill9(make_daemon, fnx_env, tmp_path):
    d = make_daemon(pools={"local": {"managers": 0}})
    manager = start_external_manager(fnx_env, d, "ext-0", slots=4)
    try:
        wait_for(lambda: managers_connected(d) == 1, 20, "the external manager registers")
        marks = tmp_path / "marks"
        marks.mkdir()
        sid = d.register({"kind": "shell",
                          "command": "sleep {s}; echo run >> " + str(marks) + "/{i}"})
        slow = d.submit([{"function": sid, "args": {"s": "3", "i": f"slow{i}"}}
                         for i in range(2)])
        wait_for(lambda: all(t["state"] == "running" for t in d.statuses(slow)), 20,
                 "the slow tasks are running")
        time.sleep(0.5)
        d.kill9(check=False)
        assert manager.poll() is None, "a manager started outside the daemon outlives it"
        d.start()
        wait_for(lambda: managers_connected(d) == 1, 20, "the manager registers again")
        mlog = d.dir / "external" / "ext-0" / "manager.log"
        wait_for(lambda: "registering again" in mlog.read_text(errors="replace"), 10,
                 f"'registering again' in {mlog}")

        quick = d.submit([{"function": sid, "args": {"s": "0", "i": f"q{i}"}} for i in range(20)])
        records = [d.wait_task(t, timeout=60) for t in slow + quick]
        assert all(r["state"] == "success" for r in records), records
        # The slow tasks were running at the kill: they ran again with a higher attempt, and
        # the results of the first attempts (finishing on the re-registered manager) were
        # discarded, not recorded a second time.
        for r in records[:2]:
            assert r["attempt"] >= 2, r
        time.sleep(3.5)  # let the first attempts finish and report
        for r, t in zip(records[:2], slow):
            again = d.task(t)
            assert (again["state"], again["finished_at"], again["attempt"]) == \
                (r["state"], r["finished_at"], r["attempt"]), "an outcome was recorded twice"
        ran = {p.name: len(p.read_text().split()) for p in marks.iterdir()}
        assert all(ran[f"slow{i}"] >= 1 for i in range(2)), ran
        assert all(ran[f"q{i}"] == 1 for i in range(20)), ran
        results = d.api("GET", "/v1/results?since=0&limit=1000").body["results"]
        ids = [r["id"] for r in results]
        assert sorted(ids) == sorted(slow + quick), "each task delivered exactly once"
        daemon_log = d.log_since_start()
        print(f"\nslow tasks ran {[ran[f'slow{i}'] for i in range(2)]} times; "
              f"attempts {[r['attempt'] for r in records[:2]]}")
        # The first attempts' results are discarded either as results of a manager the restarted
        # interchange does not know yet (they may be what makes it register again) or, after it
        # registered again, as results of superseded attempts; either way the log says so.
        assert "discarded" in daemon_log or all(ran[f"slow{i}"] == 1 for i in range(2)), \
            f"a superseded attempt's result must be discarded and logged:\n{daemon_log[-3000:]}"
    finally:
        stop_manager(manager)


def test_fault_06_a_killed_local_manager_is_replaced_and_its_tasks_retried(daemon):
    from conftest import children_of

    sid = daemon.register({"kind": "shell", "command": "sleep {s}"})
    ids = daemon.submit([{"function": sid, "args": {"s": "2"}} for _ in range(2)])
    wait_for(lambda: all(t["state"] == "running" for t in daemon.statuses(ids)), 20,
             "the tasks are running")
    [manager] = [p for p in children_of(daemon.pid) if " manager " in f" {p.cmdline} "]
    os.kill(manager.pid, signal.SIGKILL)
    wait_for(lambda: any(p.pid != manager.pid and " manager " in f" {p.cmdline} "
                         for p in children_of(daemon.pid)), 15, "a replacement manager")
    records = [daemon.wait_task(t, timeout=60) for t in ids]
    assert [r["state"] for r in records] == ["success", "success"], records
    assert all(r["attempt"] == 2 for r in records), records
    wait_for(lambda: managers_connected(daemon) == 1, 15, "the pool has one manager again")
    assert "started manager manager-1" in daemon.log_since_start()


class PausableProxy:
    """A TCP proxy to `port` that can stop passing bytes either way (a network partition: the
    connections stay open, nothing arrives) and let them through again later."""

    def __init__(self, port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = port
        self.open = threading.Event()
        self.open.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.open.wait()  # held while partitioned
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.open.set()
        self.listener.close()


def test_fault_08_a_partitioned_manager_finishes_its_task_and_only_one_outcome_counts(
        make_daemon, fnx_env, tmp_path):
    """The link of the manager running a task is cut for twice the heartbeat threshold while
    the task finishes on it. The manager is declared lost, the task runs again on another
    manager; when the link comes back, the partitioned attempt's result is not recorded: the
    task has exactly one outcome, from the second attempt."""
    # The task (1 s) ends well inside the manager's own threshold (3 s), after which it would
    # give the link up and kill what it runs.
    d = make_daemon(pools={"local": {"managers": 0}},
                    interchange={"heartbeat_period_s": 0.5, "heartbeat_threshold_s": 3})
    proxy = PausableProxy(d.interchange_port)
    marks = tmp_path / "marks"
    marks.mkdir()
    behind = start_external_manager(fnx_env, d, "behind", 1, port=proxy.port)
    direct = None
    try:
        wait_for(lambda: managers_connected(d) == 1, 20, "the manager behind the proxy")
        sid = d.register({"kind": "shell",
                          "command": f"sleep 1; echo $$ >> {marks}/ran; echo done"})
        [tid] = d.submit([{"function": sid, "args": {}}])
        wait_for(lambda: d.task(tid)["state"] == "running", 20, "the task running")
        proxy.open.clear()
        partitioned = time.monotonic()
        direct = start_external_manager(fnx_env, d, "direct", 1)
        wait_for(lambda: d.task(tid)["attempt"] == 2, 20,
                 "the task dispatched again once the partitioned manager is lost")
        # The first attempt finishes during the partition (its `ran` line appears).
        wait_for(lambda: (marks / "ran").exists(), 10, "the first attempt finished")
        time.sleep(max(0.0, partitioned + 6 - time.monotonic()))  # 2 x the threshold
        proxy.open.set()
        rec = d.wait_task(tid, timeout=30)
        assert rec["state"] == "success" and rec["attempt"] == 2, rec
        wait_for(lambda: len((marks / "ran").read_text().split()) == 2, 10, "both attempts ran")
        time.sleep(2)  # the partitioned manager's late messages arrive and are handled
        again = d.task(tid)
        assert (again["attempt"], again["finished_at"]) == (2, rec["finished_at"]), again
        results = d.api("GET", "/v1/results?since=0").body["results"]
        assert [r["id"] for r in results] == [tid], "exactly one outcome"
        assert "manager behind" in d.log_since_start() and " lost: " in d.log_since_start()
    finally:
        proxy.close()
        for m in (behind, direct):
            if m is not None:
                stop_manager(m)
