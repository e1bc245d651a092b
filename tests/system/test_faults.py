"""Faults from FAULTS.md injected into a running `fnx map`: killed workers, walltime,
interrupts (manager faults: test_managers.py). Each test waits on files, log lines or output
lines, never on a fixed sleep.
"""

import os
import signal
import textwrap
import time

import pytest

from conftest import alive, wait_for

# The user functions of these tests. Each records its worker's pid as the file d/pid-<pid>
# (so the test can find and kill it); hang() then waits for the file d/release.
GATE = """
    import os, signal, time

    def _gate(d):
        _record_pid(d)
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(d, "release")):
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            time.sleep(0.01)

    def hang(d):
        _gate(d)
        return os.getpid()

    def _record_pid(d):
        with open(os.path.join(d, "pid-%d" % os.getpid()), "w") as f:
            f.write(str(os.getpid()))

    def sleep_forever(d, ignore_term=False):
        if ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _record_pid(d)
        time.sleep(1000)

    def pid():
        return os.getpid()

    def poison(d, x):
        if x == 1:
            open(os.path.join(d, "attempt-%d" % os.getpid()), "w").close()
            os._exit(3)
        return x * 10

    def exit_on(x, code):
        if x == code:
            os._exit(code)
        return x * 10

    def segfault_on(x, bad):
        if x == bad:
            import ctypes
            ctypes.string_at(0)  # a null dereference in C: SIGSEGV
        return x * 10
"""


@pytest.fixture
def env(fnx_env):
    fnx_env.write("faulty.py", textwrap.dedent(GATE))
    (fnx_env.dir / "gate").mkdir()
    return fnx_env


def pid_files(env):
    return sorted((env.dir / "gate").glob("pid-*"))


def wait_pids(env, n, timeout=20):
    files = wait_for(lambda: (f := pid_files(env)) and len(f) >= n and f, timeout, f"{n} pid files")
    return [int(p.name.split("-")[1]) for p in files]


def release(env):
    (env.dir / "gate" / "release").touch()


# ---------------------------------------------------------------------------------------------
# Worker deaths
# ---------------------------------------------------------------------------------------------


def test_fault_11_worker_sigkilled_mid_task_is_retried(env):
    gate = str(env.dir / "gate")
    bg = env.start_map("faulty:hang", "--workers", "1", inputs=[[gate]])
    (victim,) = wait_pids(env, 1)
    os.kill(victim, signal.SIGKILL)
    release(env)
    run = bg.wait(30)

    assert run.returncode == 0, run.explain()
    (line,) = run.lines
    assert line["ok"] is True and line["index"] == 0, line
    assert line["result"] != victim, "the retry must run on a new worker"
    assert len(pid_files(env)) == 2, "the task ran exactly twice (first attempt and one retry)"


def test_fault_11_worker_sigkilled_without_retries_is_worker_lost(env):
    gate = str(env.dir / "gate")
    bg = env.start_map("faulty:hang", "--workers", "1", "--retries", "0", inputs=[[gate], []])
    # The second input line calls hang() without its argument: a plain exception, run after.
    (victim,) = wait_pids(env, 1)
    os.kill(victim, signal.SIGKILL)
    release(env)
    run = bg.wait(30)

    assert run.returncode == 1, run.explain()
    r = run.by_index()
    err = r[0]["error"]
    assert r[0]["ok"] is False and err["kind"] == "worker_lost", r[0]
    assert "SIGKILL" in err["message"], err
    assert str(victim) in err["message"], err
    assert r[1]["error"]["kind"] == "exception" and r[1]["error"]["type"] == "TypeError", r[1]
    assert len(pid_files(env)) == 1, "with --retries 0 the task must not run again"


def test_fault_11_os_exit_is_worker_lost_with_status_other_tasks_succeed(env):
    run = env.map(
        "faulty:exit_on", "--workers", "1", "--retries", "0",
        inputs=[[0, 3], [3, 3], [1, 3], [2, 3]],
    )
    assert run.returncode == 1, run.explain()
    r = run.by_index()
    err = r[1]["error"]
    assert r[1]["ok"] is False and err["kind"] == "worker_lost", r[1]
    assert "exit status 3" in err["message"], err
    assert [r[i]["result"] for i in (0, 2, 3)] == [0, 10, 20]


def test_fault_11_a_segfault_inside_the_function_is_signal_11_and_the_slot_comes_back(env):
    run = env.map(
        "faulty:segfault_on", "--workers", "1", "--retries", "0",
        inputs=[[0, 2], [2, 2], [1, 2], [3, 2]],
    )
    assert run.returncode == 1, run.explain()
    r = run.by_index()
    err = r[1]["error"]
    assert r[1]["ok"] is False and err["kind"] == "worker_lost", r[1]
    assert "signal 11" in err["message"] and "SIGSEGV" in err["message"], err
    # One worker slot: the tasks after the crash ran in the worker started in its place.
    assert [r[i]["result"] for i in (0, 2, 3)] == [0, 10, 30]


def test_fault_12_poison_task_fails_after_its_retries_queue_drains(env):
    gate = str(env.dir / "gate")
    run = env.map(
        "faulty:poison", "--workers", "1", "--retries", "2",
        inputs=([gate, x] for x in range(4)), timeout=30,
    )
    assert run.returncode == 1, run.explain()
    r = run.by_index()
    err = r[1]["error"]
    assert r[1]["ok"] is False and err["kind"] == "worker_lost", r[1]
    assert "exit status 3" in err["message"] and "attempt 3" in err["message"], err
    assert err["message"].startswith("the task crashed 3 workers"), err
    crashed = list((env.dir / "gate").glob("attempt-*"))
    assert len(crashed) == 3, f"the poison task must run 1 + 2 retries times, ran {len(crashed)}"
    assert [r[i]["result"] for i in (0, 2, 3)] == [0, 20, 30]
    # The message points at the log of the worker that died, and that log exists.
    log = err["message"].split("worker log: ")[1].split(" ")[0]
    assert (env.dir / log).is_file(), err


# ---------------------------------------------------------------------------------------------
# Walltime
# ---------------------------------------------------------------------------------------------


def _is_sleep_1000(p):
    return p.cmdline == "sleep 1000"


def test_fault_15_shell_walltime_double_fork(env):
    t0 = time.monotonic()
    run = env.map(
        "--shell", "sleep 1000 & setsid sleep 1000 & sleep 1000",
        "--walltime", "1", "--kill-grace", "0.5", "--workers", "1",
        inputs=[{}], timeout=30,
    )
    took = time.monotonic() - t0
    # Right after the run: no `sleep 1000` of this test may be left, detached or not.
    env.assert_no_processes(_is_sleep_1000)

    assert run.returncode == 1, run.explain()
    (line,) = run.lines
    assert line["ok"] is False and line["error"]["kind"] == "walltime", line
    assert "walltime" in line["error"]["message"]
    assert took < 15, f"the run took {took:.1f}s for a 1 s walltime"


@pytest.mark.parametrize("ignore_term", [False, True], ids=["dies_on_sigterm", "ignores_sigterm"])
def test_fault_14_python_walltime_worker_replaced_next_task_works(env, ignore_term):
    gate = str(env.dir / "gate")
    env.write("mixed.py", textwrap.dedent("""
        import faulty

        def f(d, hang, ignore_term):
            if hang:
                faulty.sleep_forever(d, ignore_term)
            return faulty.pid()
    """))
    t0 = time.monotonic()
    run = env.map(
        "mixed:f", "--workers", "1", "--walltime", "1", "--kill-grace", "0.3",
        inputs=[[gate, False, False], [gate, True, ignore_term], [gate, False, False]],
        timeout=30,
    )
    took = time.monotonic() - t0

    assert run.returncode == 1, run.explain()
    r = run.by_index()
    (victim,) = [int(p.name.split("-")[1]) for p in pid_files(env)]
    assert r[1]["ok"] is False and r[1]["error"]["kind"] == "walltime", r[1]
    assert "walltime exceeded" in r[1]["error"]["message"]
    assert r[0]["result"] == victim, "one worker ran the first two tasks"
    assert r[2]["ok"] is True and r[2]["result"] != victim, "a new worker replaced the killed one"
    assert not alive(victim), f"the worker {victim} that ran past its walltime is still alive"
    assert took < 15, f"the run took {took:.1f}s for a 1 s walltime"


def test_fault_14_python_walltime_kills_the_tasks_children(env):
    env.write("spawner.py", textwrap.dedent("""
        import os, subprocess, time

        def f(hang):
            subprocess.Popen(["sleep", "1000"])
            subprocess.Popen(["setsid", "sleep", "1000"])
            if hang:
                time.sleep(1000)
            return os.getpid()
    """))
    run = env.map(
        "spawner:f", "--workers", "1", "--walltime", "1", "--kill-grace", "0.3",
        inputs=[[True], [False]], timeout=30,
    )
    r = run.by_index()
    assert r[0]["ok"] is False and r[0]["error"]["kind"] == "walltime", r[0]
    assert r[1]["ok"] is True, r[1]
    # Right after the run: neither the children of the killed task nor those left behind by
    # the finished one survive.
    env.assert_no_processes(_is_sleep_1000)


# ---------------------------------------------------------------------------------------------
# Interrupt
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, sig",
    [("python", signal.SIGINT), ("python_ignoring_sigterm", signal.SIGINT),
     ("shell", signal.SIGINT), ("python", signal.SIGTERM)],
    ids=["python_sigint", "python_ignoring_sigterm_sigint", "shell_sigint", "python_sigterm"],
)
def test_interrupt_exits_130_and_stops_every_process(env, kind, sig):
    gate = env.dir / "gate"
    if kind.startswith("python"):
        bg = env.start_map(
            "faulty:sleep_forever", "--workers", "2", "--kill-grace", "0.5",
            inputs=([str(gate), kind == "python_ignoring_sigterm"] for _ in range(4)),
        )
    else:
        # Each task starts children (a background sleep and a detached one) and then waits.
        bg = env.start_map(
            "--shell", "touch {flag}; sleep 1000 & setsid sleep 1000 & sleep 1000",
            "--workers", "2", "--kill-grace", "0.5",
            inputs=({"flag": str(gate / f"pid-{i}")} for i in range(4)),
        )
    wait_pids(env, 2)
    if kind == "shell":
        wait_for(lambda: len([p for p in env.processes() if _is_sleep_1000(p)]) >= 6, 10,
                 "the sleeps of both running tasks")
    t0 = time.monotonic()
    bg.proc.send_signal(sig)
    run = bg.wait(15)
    took = time.monotonic() - t0

    assert run.returncode == 130, run.explain()
    assert took < 5, f"fnx map took {took:.1f}s to stop after {sig.name}"
    # Every task that was handed out is accounted for: still-running ones are cancelled.
    assert sorted(line["index"] for line in run.lines) == [0, 1, 2, 3], run.lines
    assert all(line["error"]["kind"] == "cancelled" for line in run.lines), run.lines
    env.assert_no_processes(grace=1.0)


def test_fault_16_fnx_map_sigkilled_takes_every_process_with_it(env):
    """No Ctrl-C handler runs on SIGKILL: managers, workers and task children must still die
    (death signals and the run marker), with none left on the node."""
    gate = env.dir / "gate"
    bg = env.start_map(
        "--shell", "touch {flag}; sleep 1000 & setsid sleep 1000 & sleep 1000",
        "--managers", "2", "--workers", "1", "--prefetch", "1", "--kill-grace", "0.3",
        inputs=({"flag": str(gate / f"pid-{i}")} for i in range(4)),
    )
    wait_pids(env, 2)
    wait_for(lambda: len([p for p in env.processes() if _is_sleep_1000(p)]) >= 6, 10,
             "the sleeps of both running tasks")
    bg.proc.kill()
    bg.proc.wait()
    env.assert_no_processes(grace=5.0)
