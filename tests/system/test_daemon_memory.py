"""Memory (issue 12). The daemon's does not grow with what users queue: large task inputs stay in
the store while their tasks wait (`limits.spill_kb`) and are read back at dispatch, intact,
before and after a restart. A task's is held to its limit (FAULTS.md 17: the pool's
mem_per_worker or its own memory_mb; by a memory cgroup per worker, or by sampling), and a
large result is never held twice by its worker (FAULTS.md 18)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

import pytest

from conftest import descendants_of, wait_for
from daemon_env import error_of, pickled_args, result_value, to_toml

DIGEST = {"kind": "python", "entry": "digest", "source": (
    "def digest(s, tag=0):\n"
    "    import hashlib\n"
    "    with open('in.bin', 'rb') as f:\n"
    "        data = f.read()\n"
    "    return [tag, len(s), hashlib.sha256(s.encode()).hexdigest(),\n"
    "            hashlib.sha256(data).hexdigest()]\n")}


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def digest_task(fid: int, i: int, size: int) -> tuple[dict, list]:
    """A task with `size` bytes of arguments and a file of `size` bytes, and its expected
    result."""
    s = (str(i) * size)[:size]
    data = os.urandom(size)
    task = {"function": fid, "args": [s, i],
            "files": [{"name": "in.bin", "data_b64": base64.b64encode(data).decode()}]}
    return task, [i, size, hashlib.sha256(s.encode()).hexdigest(),
                  hashlib.sha256(data).hexdigest()]


def test_stored_inputs_run_intact_before_and_after_a_restart(make_daemon):
    # No managers at first: every task waits, its inputs in the store only (over 1 KiB).
    d = make_daemon(pools={"local": {"managers": 0, "workers_per_manager": 2}},
                    limits={"spill_kb": 1})
    fid = d.register(DIGEST)
    sizes = [10, 900, 2000, 60_000, 300_000]  # below and above the threshold
    tasks, expected = zip(*(digest_task(fid, i, n) for i, n in enumerate(sizes)))
    ids = d.submit(list(tasks))
    # The queue survives a restart, and its inputs are still read from the store.
    d.stop()
    d.config["pools"]["local"]["managers"] = 1
    d.config_path.write_text(to_toml(d.config))
    d.start()
    more, more_expected = zip(*(digest_task(fid, 10 + i, n) for i, n in enumerate(sizes)))
    ids += d.submit(list(more))
    recs = d.wait_all(ids, timeout=90)
    for task_id, want in zip(ids, expected + more_expected):
        assert result_value(recs[task_id]) == want, recs[task_id]


def test_budget_queued_large_payloads_do_not_grow_the_daemon(make_daemon):
    """Queued tasks of 100 KiB each: the daemon's memory stays under a fixed bound while they
    are submitted, once it is idle, and when it starts again with all of them queued. Without
    the spill it held every byte queued. The bound is 160 MiB plus 1 KiB a task. The gate runs 10,000 tasks (0.98 GiB queued;
    FNX_BUDGET_TASKS sets the number); the full 100,000 (9.8 GiB) runs the same test against
    a release build, see benches/README.md."""
    n = int(os.environ.get("FNX_BUDGET_TASKS", "10000"))
    per_request = 500  # 50 MiB bodies, under max_request_mb
    d = make_daemon(pools={"local": {"managers": 0}},
                    limits={"max_queued_mb_per_user": 16384, "max_request_mb": 64})
    fid = d.register(DIGEST)
    payload = b'{"function": %d, "args": ["%s"]}' % (fid, b"x" * (100 << 10))
    submitted = 0
    while submitted < n:
        k = min(per_request, n - submitted)
        body = b'{"tasks": [' + b", ".join([payload] * k) + b"]}"
        r = d.api("POST", "/v1/tasks", body, headers={"Content-Type": "application/json"},
                  timeout=300)
        assert r.status == 201, (r.status, r.body)
        submitted += k
    st = d.api("GET", "/v1/status").body
    assert st["tasks"]["queued"] == n, st["tasks"]
    queued_mib = n * 100 / 1024
    # The peak holds the request bodies being read and parsed, never the queue.
    peak_mib = rss_kib(d.pid, "VmHWM") / 1024
    assert peak_mib < 512, f"daemon peak {peak_mib:.0f} MiB with {queued_mib:.0f} MiB queued"
    # Idle, it gives the memory of those requests back: what stays is a fixed part (store
    # cache, threads) and the queue's bookkeeping, about 1 KiB a task, whatever their size.
    bound_mib = 160 + n / 1024
    wait_for(lambda: rss_kib(d.pid) < bound_mib * 1024, 15,
             lambda: f"daemon RSS under {bound_mib:.0f} MiB with {queued_mib:.0f} MiB queued "
             f"(it holds {rss_kib(d.pid) >> 10} MiB)")
    idle_mib = rss_kib(d.pid) / 1024
    d.stop()
    d.start(timeout=300)
    st = d.api("GET", "/v1/status").body
    assert st["tasks"]["queued"] == n, st["tasks"]
    restart_mib = rss_kib(d.pid, "VmHWM") / 1024
    assert restart_mib < bound_mib, \
        f"daemon peak {restart_mib:.0f} MiB after a restart with {queued_mib:.0f} MiB queued"
    print(f"budget: {n} x 100 KiB queued ({queued_mib:.0f} MiB): daemon peak {peak_mib:.0f} MiB "
          f"while submitting, {idle_mib:.0f} MiB idle, peak {restart_mib:.0f} MiB after a restart")


HOG = {"kind": "python", "entry": "hog", "source": (
    "def hog(mib, hold=0):\n"
    "    import time\n"
    "    b = bytearray(b'x') * (mib << 20)  # written: resident\n"
    "    time.sleep(hold)\n"
    "    return len(b) >> 20\n")}


@pytest.mark.parametrize("cgroups", ["auto", "off"])
def test_fault_17_a_task_over_its_memory_limit_is_killed_alone(make_daemon, cgroups):
    """mem_per_worker = 0.1 GiB (103 MiB): a task holding 400 MiB, one that reaches 400 MiB and
    returns at once, and a shell task whose child allocates 400 MiB each fail as memory_exceeded
    with their peak and the limit. Where the manager can make a memory cgroup per worker (CI's
    writable v1 hierarchy) the kernel holds each at the limit and kills it there; elsewhere, or
    with FNX_MEMORY_CGROUPS=off, the manager's sampling (and a Python worker's own peak, between
    samples) catches it over the limit. The task beside them, the manager and the worker slots
    survive."""
    env = {"FNX_MEMORY_CGROUPS": cgroups}
    cgroups = cgroups == "auto" and own_memory_cgroup() is not None
    d = make_daemon(pools={"local": {"workers_per_manager": 2, "mem_per_worker": 0.1}},
                    daemon={"pass_env": ["FNX_TEST_MARK", "FNX_MEMORY_CGROUPS"]}, env=env)
    fid = d.register(HOG)
    sid = d.register({"kind": "shell", "command":
                      "python3 -c \"import time; b = b'x' * (400 << 20); time.sleep(5)\""})
    manager = d.status()["pools"][0]["managers"][0]["id"]

    def killed_at_limit(rec):
        assert rec["state"] == "failed" and rec["error"]["kind"] == "memory_exceeded", rec
        msg = rec["error"]["message"]
        used = int(re.search(r"used (\d+) MiB", msg).group(1))
        if cgroups:
            assert "reached its limit of 103 MiB" in msg and "own memory cgroup" in msg, msg
            assert used >= 100, msg
        else:
            assert "over its limit of 103 MiB" in msg and used > 103, msg

    [held, bystander] = d.submit([{"function": fid, "args": [400, 5]},
                                  {"function": fid, "args": [5, 3]}])
    killed_at_limit(d.wait_task(held))
    assert d.wait_task(bystander)["state"] == "success"
    [spike, shell] = d.submit([{"function": fid, "args": [400, 0]},
                               {"function": sid, "args": {}}])
    killed_at_limit(d.wait_task(spike))
    killed_at_limit(d.wait_task(shell))
    # Small tasks still run, on the same manager.
    ok = d.submit([{"function": fid, "args": [10]} for _ in range(4)])
    assert [result_value(r) for r in d.wait_all(ok).values()] == [10] * 4
    managers = d.status()["pools"][0]["managers"]
    assert [m["id"] for m in managers] == [manager], managers


@pytest.mark.parametrize("cgroups", ["auto", "off"])
def test_fault_17_a_task_is_held_to_its_own_memory_mb(make_daemon, cgroups):
    """A task's own memory_mb: below the pool's mem_per_worker it holds that task alone (the
    worker's next task has the pool's limit again); in a pool without one it is the only
    limit; above a worker's memory it is refused at submit. JSON and msgpack alike; by cgroups
    where the node allows them, and by sampling with FNX_MEMORY_CGROUPS=off."""
    import msgpack
    d = make_daemon(pools={"local": {"workers_per_manager": 1, "mem_per_worker": 0.5},
                           "free": {"workers_per_manager": 1}},
                    daemon={"pass_env": ["FNX_TEST_MARK", "FNX_MEMORY_CGROUPS"]},
                    env={"FNX_MEMORY_CGROUPS": cgroups})
    fid = d.register(HOG)
    sid = d.register({"kind": "shell", "command":
                      "python3 -c \"b = b'x' * (200 << 20)\"; echo done"})

    def fails_at(rec, mib, source):
        assert rec["state"] == "failed" and rec["error"]["kind"] == "memory_exceeded", rec
        assert f"limit of {mib} MiB ({source})" in rec["error"]["message"], rec["error"]

    # One worker, one after the other: a larger task, then a smaller one with a lower limit of
    # its own that it keeps (the larger task's peak is not held against it, and it is not
    # pipelined under the larger limit), then the larger again.
    [big, fits, again] = d.submit([{"function": fid, "args": [200]},
                                   {"function": fid, "args": [20], "memory_mb": 100},
                                   {"function": fid, "args": [200]}])
    assert [result_value(d.wait_task(t)) for t in (big, fits, again)] == [200, 20, 200]
    [small, big_again] = d.submit([{"function": fid, "args": [200], "memory_mb": 100},
                                   {"function": fid, "args": [200]}])
    fails_at(d.wait_task(small), 100, "the task's memory_mb")
    assert result_value(d.wait_task(big_again)) == 200  # the pool's 512 MiB again
    [shell] = d.submit([{"function": sid, "args": {}, "memory_mb": 64}])
    fails_at(d.wait_task(shell), 64, "the task's memory_mb")
    # A pool without mem_per_worker: only the task's own limit.
    [free_small, free_big] = d.submit([
        {"function": fid, "args": [200], "memory_mb": 100, "pool": "free"},
        {"function": fid, "args": [200], "pool": "free"}])
    fails_at(d.wait_task(free_small), 100, "the task's memory_mb")
    assert result_value(d.wait_task(free_big)) == 200
    # Refused at submit.
    for bad, what in ((600, "more than a worker of pool \"local\" has (512 MiB"),
                      (0, "must be"), (-5, "must be"), ("lots", "must be"),
                      (1 << 21, "must be")):
        r = d.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": [1],
                                                   "memory_mb": bad}]})
        msg = error_of(r, 400, "bad_request")
        assert msg.startswith("tasks[0].memory_mb: ") and what in msg, (bad, msg)
    mp = {"Content-Type": "application/msgpack"}
    body = msgpack.packb({"tasks": [{"function": fid, "encoding": "json", "data": b"[1]",
                                     "memory_mb": 600}]})
    assert "more than a worker" in error_of(d.api("POST", "/v1/tasks", body, headers=mp), 400,
                                            "bad_request")
    body = msgpack.packb({"tasks": [{"function": fid, "encoding": "json", "data": b"[150]",
                                     "memory_mb": 100}]})
    r = d.api("POST", "/v1/tasks", body, headers=mp)
    assert r.status == 201, (r.status, r.body)
    fails_at(d.wait_task(r.body["ids"][0]), 100, "the task's memory_mb")


BLOB = {"kind": "python", "entry": "blob",
        "source": "def blob(mib):\n    return b'x' * (mib << 20)\n"}


def test_fault_18_a_large_result_is_never_held_twice_by_its_worker(make_daemon):
    """mem_per_worker = 0.09 GiB (92 MiB): a 48 MiB pickled result fits (it is counted, then
    streamed into the pipe; held as the object and its pickled copy it would pass the limit),
    and a 60 MiB one over max_result_mb = 50 is refused as result_too_large with both sizes
    instead of being killed for memory."""
    d = make_daemon(pools={"local": {"workers_per_manager": 1, "mem_per_worker": 0.09}},
                    limits={"max_result_mb": 50})
    fid = d.register(BLOB)
    [fits] = d.submit([{"function": fid, "encoding": "pickle", "data_b64": pickled_args(48)}])
    rec = d.wait_task(fits)
    assert rec["state"] == "success", rec["error"]
    assert result_value(rec) == b"x" * (48 << 20)
    [over] = d.submit([{"function": fid, "encoding": "pickle", "data_b64": pickled_args(60)}])
    rec = d.wait_task(over)
    assert rec["state"] == "failed" and rec["error"]["kind"] == "result_too_large", rec
    assert str(50 << 20) in rec["error"]["message"], rec["error"]
    size = int(re.search(r"result of (\d+) bytes", rec["error"]["message"]).group(1))
    assert size > 60 << 20, rec["error"]


RAISE_OWN_LIMIT = {"kind": "python", "entry": "raise_own_limit", "source": (
    "def raise_own_limit():\n"
    "    for line in open('/proc/self/cgroup'):\n"
    "        _, controllers, path = line.rstrip('\\n').split(':', 2)\n"
    "        if 'memory' in controllers.split(','):\n"
    "            break\n"
    "    import os\n"
    "    leaf = '/sys/fs/cgroup/memory' + path\n"
    "    own = os.path.dirname(os.path.dirname(leaf))\n"
    "    out = [open(leaf + '/memory.limit_in_bytes').read().strip()]\n"
    "    for f, value in ((leaf + '/memory.limit_in_bytes', '-1'), (leaf + '/cgroup.procs', '0'),\n"
    "                     (own + '/cgroup.procs', '0')):\n"
    "        try:\n"
    "            with open(f, 'w') as fh:\n"
    "                fh.write(value)\n"
    "            out.append('written')\n"
    "        except OSError as e:\n"
    "            out.append(type(e).__name__)\n"
    "    try:\n"
    "        os.mkdir(own + '/escape')\n"
    "        out.append('made')\n"
    "    except OSError as e:\n"
    "        out.append(type(e).__name__)\n"
    "    return out\n")}


CGROUP_OF = {"kind": "python", "entry": "cgroup_of", "source": (
    "def cgroup_of():\n"
    "    for line in open('/proc/self/cgroup'):\n"
    "        _, controllers, path = line.rstrip('\\n').split(':', 2)\n"
    "        if 'memory' in controllers.split(','):\n"
    "            return path\n")}


def test_fault_17_each_worker_runs_in_its_own_memory_cgroup_held_to_the_limit(make_daemon):
    """Where the manager can write the v1 memory hierarchy: each Python worker and each shell
    task runs in its own memory cgroup limited to mem_per_worker (memory and swap), under one
    parent per manager, which is gone once the manager stops. A parent left by a manager that
    was killed (its pid runs no more) is removed by the next manager on the node."""
    base = own_memory_cgroup()
    if base is None:
        pytest.skip("needs a writable cgroup v1 memory hierarchy (CI has one)")
    stale = base / "fnx-4999999"  # above any pid_max: no such process
    (stale / "w1").mkdir(parents=True)
    d = make_daemon(pools={"local": {"workers_per_manager": 2, "mem_per_worker": 0.1}})
    fid = d.register(CGROUP_OF)
    sid = d.register({"kind": "shell", "command": "grep :memory: /proc/self/cgroup"})
    gate_fid = d.register(HOG)
    # Two workers at once (one holds its slot), so both report their own cgroup.
    [hold] = d.submit([{"function": gate_fid, "args": [1, 3]}])
    [py] = d.submit([{"function": fid, "args": []}])
    [sh] = d.submit([{"function": sid, "args": {}}])
    wait_for(lambda: not stale.exists(), 10, f"{stale} of a dead manager to be removed")
    paths = [result_value(d.wait_task(py)),
             result_value(d.wait_task(sh))["stdout"].strip().split(":", 2)[2]]
    assert result_value(d.wait_task(hold)) == 1
    root = Path("/sys/fs/cgroup/memory")
    parents = set()
    for path in paths:
        leaf = root / path.lstrip("/")
        assert leaf.parent.parent == base and leaf.parent.name.startswith("fnx-"), (leaf, base)
        parents.add(leaf.parent)
    assert len(set(paths)) == 2, f"the worker and the shell task share a cgroup: {paths}"
    [parent] = parents
    # The shell task's cgroup went with it; the worker's is there, at the limit.
    limit = int((root / paths[0].lstrip("/") / "memory.limit_in_bytes").read_text())
    assert limit == 103 << 20, limit  # mem_per_worker 0.1 GiB, in whole MiB
    wait_for(lambda: not (root / paths[1].lstrip("/")).exists(), 10,
             "the shell task's cgroup to be removed")
    d.stop()
    assert not parent.exists(), f"{parent} was left behind"


def test_fault_17_a_task_cannot_raise_its_own_memory_limit(make_daemon):
    """Tasks of a shared-account pool run sandboxed: a task reads its memory cgroup's limit but
    can neither lift it, nor leave its cgroup for the manager's, nor make a cgroup of its own
    there."""
    if own_memory_cgroup() is None:
        pytest.skip("needs a writable cgroup v1 memory hierarchy (CI has one)")
    d = make_daemon(pools={"local": {"workers_per_manager": 1, "mem_per_worker": 0.1}})
    fid = d.register(RAISE_OWN_LIMIT)
    [t] = d.submit([{"function": fid, "args": []}])
    assert result_value(d.wait_task(t)) == [str(103 << 20), "PermissionError",
                                            "PermissionError", "PermissionError",
                                            "PermissionError"]


def own_memory_cgroup() -> Path | None:
    """This process's cgroup in a writable v1 memory hierarchy (as on CI), or None."""
    for line in open("/proc/self/cgroup"):
        _, controllers, path = line.rstrip("\n").split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (base / "memory.limit_in_bytes").exists() and os.access(base, os.W_OK):
                return base
    return None


def test_fault_17_a_kill_by_the_kernels_oom_killer_is_oom_killed_not_worker_lost(make_daemon):
    """The daemon, its manager and workers in a memory cgroup of 400 MiB and no pool limit: a
    task that allocates 1 GiB is killed by the kernel's out-of-memory killer. It is labelled
    oom_killed (retried like a lost worker), not worker_lost; the manager survives."""
    base = own_memory_cgroup()
    if base is None:
        pytest.skip("needs a writable cgroup v1 memory hierarchy (CI has one)")
    cg = base / f"fnx-test-oom-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(400 << 20))
        d = make_daemon(pools={"local": {"workers_per_manager": 1}})
        for pid in [d.pid] + [p.pid for p in descendants_of(d.pid)]:
            (cg / "cgroup.procs").write_text(str(pid))
        fid = d.register(HOG)
        [big] = d.submit([{"function": fid, "args": [1024, 0], "retries": 0}])
        rec = d.wait_task(big)
        assert rec["state"] == "failed" and rec["error"]["kind"] == "oom_killed", rec
        assert "out-of-memory killer" in rec["error"]["message"], rec
        [small] = d.submit([{"function": fid, "args": [10]}])
        assert result_value(d.wait_task(small)) == 10
        d.stop()
    finally:
        for pid in (cg / "cgroup.procs").read_text().split():
            try:
                (base / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        cg.rmdir()


CHILD_HOG = {"kind": "python", "entry": "child_hog", "source": (
    "def child_hog(mib, catch):\n"
    "    import subprocess, sys\n"
    "    code = subprocess.call([sys.executable, '-c', 'b = bytearray(b\"x\") * (%d << 20)' % mib])\n"
    "    if code == 0 or catch:\n"
    "        return code\n"
    "    raise RuntimeError('the child died: %d' % code)\n")}


def test_fault_17_an_oom_kill_is_blamed_on_the_task_it_hit_only(make_daemon):
    """One worker held by its cgroup to 103 MiB: a task whose child is killed for memory and
    which deals with it succeeds; the worker's next task, failing for its own reasons, is not
    blamed for that kill; a task whose child is killed and which fails is memory_exceeded."""
    if own_memory_cgroup() is None:
        pytest.skip("needs a writable cgroup v1 memory hierarchy (CI has one)")
    d = make_daemon(pools={"local": {"workers_per_manager": 1, "mem_per_worker": 0.1}})
    fid = d.register(CHILD_HOG)
    div = d.register({"kind": "python", "entry": "div",
                      "source": "def div(a, b):\n    return a / b\n"})
    [handled] = d.submit([{"function": fid, "args": [300, True]}])
    assert result_value(d.wait_task(handled)) == -9
    [own_error] = d.submit([{"function": div, "args": [1, 0]}])
    rec = d.wait_task(own_error)
    assert rec["state"] == "failed" and rec["error"]["kind"] == "exception", rec
    [killed] = d.submit([{"function": fid, "args": [300, False]}])
    rec = d.wait_task(killed)
    assert rec["state"] == "failed" and rec["error"]["kind"] == "memory_exceeded", rec
    assert "own memory cgroup" in rec["error"]["message"], rec


def test_fault_18_a_result_larger_than_a_manager_message_fails_instead_of_hanging(make_daemon,
                                                                                 fnx_env):
    """limits.max_result_mb = 100 is more than one message from a manager can carry: a 70 MiB
    result fails as result_too_large naming the limit that applies (56 MiB) instead of being
    dropped with its batch (its task then ran for ever); config check says so beforehand; a
    smaller result still arrives."""
    d = make_daemon(limits={"max_result_mb": 100})
    check = fnx_env.fnx("config", "check", str(d.config_path))
    assert "limits.max_result_mb: results over 56 MiB cannot travel" in check.stdout + check.stderr
    fid = d.register(BLOB)
    [big, fits] = d.submit([
        {"function": fid, "encoding": "pickle", "data_b64": pickled_args(70)},
        {"function": fid, "encoding": "pickle", "data_b64": pickled_args(40)}])
    rec = d.wait_task(big, timeout=60)
    assert rec["state"] == "failed" and rec["error"]["kind"] == "result_too_large", rec
    assert str(56 << 20) in rec["error"]["message"], rec["error"]
    assert result_value(d.wait_task(fits, timeout=60)) == b"x" * (40 << 20)
