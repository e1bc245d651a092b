"""Manager faults (FAULTS.md 6, 7, 16) in a running `fnx map --managers 2`.

Tests that need work on both managers pass a small `--prefetch`: the default lets the first
manager to register take a short queue whole."""

import os
import re
import signal
import socket
import textwrap

import pytest

from conftest import alive, children_of, descendants_of, wait_for

TASKS = """
    import json, os, time

    def slow_square(x):
        time.sleep(0.3)
        return x * x

    def gated(d, i, gate="release"):
        # Record the attempt (this worker's pid and the task index), then wait for the gate.
        with open(os.path.join(d, "run-%d-%d" % (i, os.getpid())), "w") as f:
            f.write(json.dumps([i, os.getpid()]))
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(d, gate)):
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            time.sleep(0.01)
        return [i, os.getpid()]
"""


@pytest.fixture
def env(fnx_env):
    fnx_env.write("tasks.py", textwrap.dedent(TASKS))
    (fnx_env.dir / "gate").mkdir()
    return fnx_env


def attempts(env) -> list[tuple[int, int]]:
    """(task index, worker pid) of every attempt started so far."""
    out = []
    for p in (env.dir / "gate").glob("run-*"):
        _, i, pid = p.name.split("-")
        out.append((int(i), int(pid)))
    return sorted(out)


def manager_proc(bg, uid):
    """The manager process `uid` (a child of fnx map), once it has started a worker."""
    return wait_for(
        lambda: next((p for p in children_of(bg.pid)
                      if f"--uid {uid} " in p.cmdline + " " and children_of(p.pid)), None),
        10, f"manager {uid} with workers",
    )


def lost_line(bg, uid):
    """The run log's line declaring manager `uid` lost, if any."""
    return next((l for l in bg.log_text().splitlines() if f"manager {uid} (" in l and " lost" in l),
                None)


def test_fault_06_16_manager_sigkilled_mid_run_tasks_finish_workers_gone(env):
    n = 40
    bg = env.start_map(
        "tasks:slow_square", "--managers", "2", "--workers", "2", "--prefetch", "2",
        inputs=([i] for i in range(n)),
    )
    bg.wait_for_results(4)
    managers = wait_for(
        lambda: [p for p in children_of(bg.pid) if "manager" in p.cmdline and children_of(p.pid)],
        10, "a manager with workers",
    )
    victim = managers[0]
    workers = descendants_of(victim.pid)
    assert workers, f"manager {victim.pid} has no workers"
    os.kill(victim.pid, signal.SIGKILL)
    # Its workers die with it, promptly.
    wait_for(
        lambda: not [w for w in workers if alive(w.pid)], 5,
        f"the workers {[w.pid for w in workers]} of the killed manager {victim.pid} to die",
    )
    run = bg.wait(40)

    assert run.returncode == 0, run.explain()
    r = run.by_index()
    assert sorted(r) == list(range(n)), "every task accounted for exactly once"
    for i, line in r.items():
        assert line == {"index": i, "ok": True, "result": i * i}, line
    for w in workers:
        assert not alive(w.pid), f"worker {w.pid} of the killed manager survived: {w.cmdline}"


def test_fault_06_manager_lost_without_retries_names_host_and_signal(env):
    gate = str(env.dir / "gate")
    n = 6
    bg = env.start_map(
        "tasks:gated", "--managers", "2", "--workers", "1", "--prefetch", "1", "--retries", "0",
        inputs=([gate, i] for i in range(n)),
    )
    victim = manager_proc(bg, "manager-0")
    wait_for(lambda: len(attempts(env)) >= 2, 20, "a running task on each manager")
    victim_workers = {p.pid for p in descendants_of(victim.pid)}
    lost_running = [i for i, pid in attempts(env) if pid in victim_workers]
    assert len(lost_running) == 1, (attempts(env), victim_workers)
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: lost_line(bg, "manager-0"), 10, "the interchange to declare manager-0 lost")
    (env.dir / "gate" / "release").touch()
    run = bg.wait(30)

    assert run.returncode == 1, run.explain()
    r = run.by_index()
    assert sorted(r) == list(range(n)), "every task accounted for exactly once"
    lost = {i for i, line in r.items() if not line["ok"]}
    assert lost_running[0] in lost, "the task running on the killed manager is lost"
    for i, line in r.items():
        if i in lost:
            err = line["error"]
            assert err["kind"] == "manager_lost", line
            assert "manager-0" in err["message"], err
            assert socket.gethostname() in err["message"], err
            assert "SIGKILL" in err["message"], err
        else:
            assert line["result"][0] == i, line
    # Lost tasks are not run again (--retries 0); the others ran once each.
    ran = [i for i, _ in attempts(env)]
    assert sorted(ran) == sorted(set(ran)), f"a task ran twice: {attempts(env)}"


def test_fault_07_sigstop_manager_past_threshold_then_sigcont(env):
    """The stopped manager is declared lost and its tasks re-run elsewhere; once resumed, it
    exits, and whatever it still sends is discarded (attempt fencing): one outcome per task."""
    gate = str(env.dir / "gate")
    n = 8
    # The last task waits on a second gate, keeping one worker of the healthy manager busy so
    # that the run is still going when the stale manager resumes.
    inputs = [[gate, i] for i in range(n - 1)] + [[gate, n - 1, "release-last"]]
    bg = env.start_map(
        "tasks:gated", "--managers", "2", "--workers", "2", "--prefetch", "1",
        "--heartbeat-period", "0.2", "--heartbeat-threshold", "2", inputs=inputs,
    )
    victim = manager_proc(bg, "manager-0")
    wait_for(lambda: len(attempts(env)) >= 4, 20, "two running tasks on each manager")
    victim_workers = {p.pid for p in descendants_of(victim.pid)}
    stale = [(i, pid) for i, pid in attempts(env) if pid in victim_workers]
    assert len(stale) == 2, (attempts(env), victim_workers)

    def reruns():
        return {i: [pid for j, pid in attempts(env) if j == i and pid not in victim_workers]
                for i, _ in stale}

    os.kill(victim.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: lost_line(bg, "manager-0"), 10, "manager-0 to be declared lost")
        # The stale workers finish now too, but their manager cannot pass the results on yet.
        (env.dir / "gate" / "release").touch()
        wait_for(lambda: all(reruns().values()), 20,
                 lambda: f"the stale tasks to run again elsewhere: {attempts(env)}")
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    wait_for(lambda: not alive(victim.pid), 10, "the resumed stale manager to exit")
    (env.dir / "gate" / "release-last").touch()
    run = bg.wait(30)

    assert run.returncode == 0, run.explain()
    r = run.by_index()
    assert sorted(r) == list(range(n)), "every task accounted for exactly once"
    for i, line in r.items():
        assert line["ok"] is True and line["result"][0] == i, line
    # The recorded outcome of a superseded task is the re-run's, not the stale attempt's.
    for i, pid in stale:
        assert r[i]["result"][1] in reruns()[i], (r[i], pid)
        assert not alive(pid), f"the stale manager's worker {pid} must be gone"


def test_fault_16_manager_killed_while_shell_tasks_have_children(env):
    flags = env.dir / "gate"
    bg = env.start_map(
        "--shell", "touch {flag}; sleep 1000 & setsid sleep 1000 & sleep 1000",
        "--managers", "2", "--workers", "1", "--prefetch", "1", "--retries", "0",
        "--kill-grace", "0.3",
        inputs=({"flag": str(flags / f"run-{i}-0")} for i in range(4)),
    )
    victim = manager_proc(bg, "manager-0")
    tree = wait_for(
        lambda: (d := descendants_of(victim.pid)) and
        len([p for p in d if p.cmdline == "sleep 1000"]) == 3 and d,
        10, "the three sleeps of the task on manager-0",
    )
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: not [p for p in tree if alive(p.pid)], 5,
             f"every process of the killed manager's task to die: {tree}")
    # The interrupt comes once fnx map has seen the manager go (under load it could see the
    # interrupt first, and then every task is rightly reported cancelled).
    wait_for(lambda: re.search(r"manager-0\b.* lost", bg.log_text()), 10,
             lambda: "fnx map to record manager-0 as lost:\n" + bg.log_text()[-2000:])
    bg.proc.send_signal(signal.SIGINT)
    run = bg.wait(15)
    assert run.returncode == 130, run.explain()
    failed = [line for line in run.lines if not line["ok"]]
    kinds = {line["error"]["kind"] for line in failed}
    # The killed manager's task is manager_lost; the ones still running at Ctrl-C are reported
    # cancelled (every handed-out task gets a line).
    assert "manager_lost" in kinds and kinds <= {"manager_lost", "cancelled"}, run.lines
    assert sorted(line["index"] for line in run.lines) == list(range(4)), run.lines
    env.assert_no_processes(grace=1.0)


def test_manager_exits_with_its_workers_when_the_interchange_falls_silent(env):
    """The interchange (inside fnx map) stops answering: each manager notices the silence within
    the heartbeat threshold and exits, taking its workers and their children with it."""
    bg = env.start_map(
        "tasks:gated", "--workers", "2", "--heartbeat-period", "0.2", "--heartbeat-threshold", "1.5",
        inputs=([str(env.dir / "gate"), i] for i in range(2)),
    )
    manager = manager_proc(bg, "manager-0")
    workers = wait_for(lambda: len(children_of(manager.pid)) == 2 and children_of(manager.pid), 10,
                       "both workers of manager-0")
    os.kill(bg.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not alive(manager.pid), 10, "the manager to exit after the silence")
        wait_for(lambda: not [w for w in workers if alive(w.pid)], 5, "its workers to be gone")
        log = (bg.run_dir / "manager-0" / "manager.log").read_text()
        assert "has been silent" in log, log
    finally:
        os.kill(bg.pid, signal.SIGKILL)
        os.kill(bg.pid, signal.SIGCONT)
    bg.proc.wait(10)
    env.assert_no_processes(grace=2.0)


def test_fault_09_busy_node_is_not_declared_lost(env):
    """Tasks pin every core for several heartbeat thresholds: heartbeats come from the manager's
    own thread, so the manager is never declared lost and every task succeeds once."""
    env.write("busy.py", textwrap.dedent("""
        import time

        def spin(seconds):
            end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < end:
                n += 1
            return seconds
    """))
    run = env.map("busy:spin", "--workers", "2", "--heartbeat-period", "0.1",
                  "--heartbeat-threshold", "1.0", inputs=[[2.5]] * 4)
    assert run.returncode == 0, run.explain()
    assert sorted(r["index"] for r in run.lines) == [0, 1, 2, 3]
    assert all(r["ok"] and r["result"] == 2.5 for r in run.lines), run.lines
    log = (run.run_dir / "fnx.log").read_text()
    assert " lost" not in log, log


def test_no_short_task_waits_behind_a_long_one_while_a_worker_is_idle(env):
    """On 2 workers, inputs 0.1 s, 3 s, then eight of 0.1 s: every short task starts while the
    long one runs, on the other worker. Before, one short task was written into the long
    task's pipe (pipelining) and waited 3 s while the other worker sat idle."""
    env.write("naps.py", textwrap.dedent("""
        import os, time

        def f(seconds):
            start = time.monotonic()
            time.sleep(seconds)
            return [os.getpid(), start, time.monotonic()]
    """))
    naps = [[0.1], [3]] + [[0.1]] * 8
    run = env.map("naps:f", "--workers", "2", inputs=naps, timeout=60)
    assert run.returncode == 0, run.explain()
    r = {i: line["result"] for i, line in run.by_index().items()}
    assert sorted(r) == list(range(len(naps)))
    long_pid, _, long_end = r[1]
    late = {i: r[i] for i in r if i != 1 and r[i][1] >= long_end}
    assert not late, (
        f"short tasks started only after the 3 s task ended (at {long_end:.2f}, worker "
        f"{long_pid}), though the other worker was idle: {late}")


def test_idle_manager_takes_back_tasks_prefetched_by_a_busy_one(env):
    """With the default prefetch, each of two managers takes half of a short queue. When one
    manager's worker is stuck on a long task, the other, once idle, gets the stuck manager's
    unstarted tasks back through the interchange (Reclaim / Returned) instead of idling."""
    env.write("uneven.py", textwrap.dedent("""
        import os, time

        def f(d, i):
            if i == 0:
                deadline = time.monotonic() + 60
                while not os.path.exists(os.path.join(d, "release")):
                    if time.monotonic() > deadline:
                        raise TimeoutError("never released")
                    time.sleep(0.01)
            return [i, os.getpid()]
    """))
    gate = env.dir / "gate"
    bg = env.start_map("uneven:f", "--managers", "2", "--workers", "1",
                       inputs=([str(gate), i] for i in range(10)))
    # Everything but task 0 finishes (at least 8: before a function is known to be quick, no
    # task is pipelined behind the stuck one; before that rule, one was).
    done = bg.wait_for_results(8, timeout=30)
    assert all(line["ok"] for line in done), done
    assert 0 not in {line["index"] for line in done}
    (gate / "release").touch()
    run = bg.wait(30)
    assert run.returncode == 0, run.explain()
    r = run.by_index()
    assert sorted(r) == list(range(10))
    stuck_pid = r[0]["result"][1]
    moved = [i for i in range(1, 5) if r[i]["result"][1] != stuck_pid]
    assert len(moved) >= 3, f"tasks queued behind the stuck one ran elsewhere: {r}"
