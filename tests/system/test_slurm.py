"""Batch pools on a real Slurm cluster (issue 4, must-show items 1 and 4): the daemon submits
blocks with sbatch, one manager per node of each block registers from its node, the scaler
scales out with the load (up to max_blocks) and in when idle (down to min_blocks), a block
cancelled under its tasks has them retried elsewhere, blocks that never connect mark the pool
failed with the job's stderr file named, and `fnx map --launcher srun` inside an allocation
starts a manager on every node.

The cluster is `scripts/test-cluster.sh start`: 4 simulated nodes n1..n4 on this machine, told
apart by SLURMD_NODENAME. Jobs inherit the environment of sbatch, FNX_TEST_MARK included, so the
processes of a job that outlives its test are reported as leaked: every test stops its daemon
(which cancels its live blocks) and waits until its jobs are gone from the nodes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import wait_for
from daemon_env import TERMINAL, ok, to_toml

POOL = "hpc"
NODES = {"n1", "n2", "n3", "n4"}
# Slurm states of a job that still holds (or will hold) nodes.
LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING",
        "STAGE_OUT", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "STOPPED"}
# The task of the scaling tests: appends the node it runs on to the file {m}/{i} (one line per
# execution), sleeps, and prints the node.
NODE_TASK = 'echo "$SLURMD_NODENAME" >> {m}/{i}; sleep {t}; echo "$SLURMD_NODENAME"'


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------


def run(argv: list[str], env: dict | None = None, timeout: float = 30
        ) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def require_slurm() -> None:
    """Fail (not skip) when the test cluster is not up."""
    hint = "the Slurm test cluster is not usable: run scripts/test-cluster.sh start"
    for cmd in ("sbatch", "squeue", "sinfo", "scancel", "scontrol"):
        if shutil.which(cmd) is None:
            pytest.fail(f"{cmd} not found; {hint}", pytrace=False)
    try:
        r = run(["sinfo", "--noheader", "--Node", "--format=%N %T"])
    except subprocess.TimeoutExpired:
        pytest.fail(f"sinfo did not answer within 30 s; {hint}", pytrace=False)
    if r.returncode != 0:
        pytest.fail(f"sinfo failed ({r.returncode}): {r.stderr.strip()}; {hint}", pytrace=False)
    states = dict(line.split()[:2] for line in r.stdout.split("\n") if len(line.split()) >= 2)
    bad = ("down", "drain", "fail", "unk", "not_responding", "maint", "power", "reserved")
    usable = {n for n, s in states.items() if not any(b in s.lower() for b in bad)}
    if not NODES <= usable:
        pytest.fail(f"nodes n1..n4 are not all usable (sinfo: {states}); {hint}",
                    pytrace=False)


def job_states(jobs) -> dict[str, str]:
    """Slurm's state of each job id (jobs Slurm no longer knows are left out)."""
    jobs = [str(j) for j in jobs]
    if not jobs:
        return {}
    r = run(["squeue", "--noheader", "--states=all", "--format=%i %T",
             f"--jobs={','.join(jobs)}"])
    out = {}
    for line in r.stdout.split("\n"):
        parts = line.split()
        if len(parts) == 2 and parts[0] in jobs:
            out[parts[0]] = parts[1]
    if r.returncode != 0 and not out and len(jobs) > 1:
        # squeue refuses the whole list when one id is unknown: ask one by one.
        for j in jobs:
            out.update(job_states([j]))
    return out


def job_nodes(job: str) -> set[str]:
    """The nodes of a job (its NodeList, expanded)."""
    r = run(["squeue", "--noheader", "--states=all", "--format=%N", f"--jobs={job}"])
    nodelist = r.stdout.strip()
    if not nodelist or nodelist == "(null)":
        return set()
    r = run(["scontrol", "show", "hostnames", nodelist])
    return set(r.stdout.split())


def scontrol_job(job: str) -> str:
    return run(["scontrol", "show", "job", str(job)]).stdout


def squeue_all() -> str:
    r = run(["squeue", "--states=all", "--format=%.8i %.24j %.12T %.6D %.10M %R"])
    return r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# A daemon with one Slurm pool
# ---------------------------------------------------------------------------------------------


class SlurmDaemons:
    """Starts daemons whose only pool is a Slurm pool; at teardown stops them (they cancel their
    blocks) and waits until every job the test submitted has left the nodes."""

    def __init__(self, make_daemon, fnx_env):
        self.make_daemon = make_daemon
        self.fnx_env = fnx_env
        self.daemons = []
        self.extra_jobs: list[str] = []  # jobs submitted by the test itself

    def start(self, interchange: dict | None = None, **pool):
        require_slurm()
        d = self.make_daemon(
            start=False,
            interchange={"address": "127.0.0.1", "heartbeat_period_s": 1,
                         "heartbeat_threshold_s": 5, **(interchange or {})},
        )
        cfg = {"provider": "slurm", "nodes_per_block": 2, "walltime": "00:10:00",
               "workers_per_node": 2, "poll_interval_s": 0.5, "scaling_interval_s": 0.5}
        cfg.update(pool)
        # The only pool, so that tasks go to it by default (the fixture's default is a local
        # pool named "local": replace it, not merge over it).
        d.config["pools"] = {POOL: cfg}
        d.config_path.write_text(to_toml(d.config))
        d.start()
        self.daemons.append(d)
        return d

    def jobs_of(self, d) -> list[str]:
        """Every job the daemon submitted (from the job_id files of its block directories)."""
        return [f.read_text().strip() for f in sorted(run_dir(d).glob("block-*/job_id"))]

    def all_jobs(self) -> list[str]:
        return [j for d in self.daemons for j in self.jobs_of(d)] + self.extra_jobs

    def wait_jobs_gone(self, jobs, timeout: float = 30, diag=lambda: "") -> dict[str, str]:
        """Wait until none of `jobs` holds nodes; returns their final states."""
        def gone():
            states = job_states(jobs)
            return states if not any(s in LIVE for s in states.values()) else None

        return wait_for(gone, timeout,
                        lambda: f"jobs {list(jobs)} to end (squeue: {job_states(jobs)})\n"
                        f"{diag()}", interval=0.2)

    def teardown(self):
        problems = []
        for d in self.daemons:
            if d.running:
                try:
                    d.stop()
                except BaseException as e:  # noqa: BLE001 - reported below
                    problems.append(f"stopping {d.dir.name}: {e}")
        jobs = self.all_jobs()
        # The daemon cancels its live blocks when it stops; Slurm takes a moment to end them.
        deadline = time.monotonic() + 20
        while (live := [j for j, s in job_states(jobs).items() if s in LIVE]) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        if live:
            blocks = [j for j in live if j not in self.extra_jobs]
            if blocks:
                problems.append(f"jobs {blocks} still live 20 s after the daemons stopped (the "
                                f"daemon must cancel its blocks when it stops):\n{squeue_all()}")
            run(["scancel", *live])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = [j for j, s in job_states(jobs).items() if s in LIVE]
            if not left and not self.fnx_env.processes():
                break
            time.sleep(0.2)
        else:
            problems.append(f"jobs or their processes still live after the test: "
                            f"{job_states(jobs)}\n{squeue_all()}")
        return problems


@pytest.fixture
def slurm(make_daemon, fnx_env):
    s = SlurmDaemons(make_daemon, fnx_env)
    yield s
    problems = s.teardown()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def run_dir(d) -> Path:
    return d.home / "runs" / POOL


def pool_status(d) -> dict:
    [p] = d.status()["pools"]
    assert p["name"] == POOL and p["provider"] == "slurm", p
    return p


def diagnostics(d) -> str:
    """Daemon log tail, the queue, the block directories with their job.err and manager logs."""
    parts = [d.log_tail(4000), "--- squeue:", squeue_all()]
    try:
        p = pool_status(d) if d.running else None
        if p is not None:
            parts.append("--- pool status: " + json.dumps(
                {k: p.get(k) for k in ("failed", "blocks", "managers", "queued", "running")},
                indent=1)[:4000])
    except BaseException as e:  # noqa: BLE001 - diagnostics only
        parts.append(f"--- pool status unavailable: {e}")
    rd = run_dir(d)
    if rd.is_dir():
        for block in sorted(rd.glob("block-*")):
            parts.append(f"--- {block}: {sorted(p.name for p in block.iterdir())}")
            for f in [block / "job.err", block / "job.out",
                      *sorted(block.glob("block-*/manager.log"))]:
                if f.is_file():
                    text = f.read_text(errors="replace")
                    parts.append(f"--- {f} (tail):\n{text[-1500:]}")
    return "\n".join(parts)


def node_results(d, ids, timeout) -> dict[int, dict]:
    """Records of `ids` once terminal; fails with diagnostics otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        recs = {t["id"]: t for t in d.statuses(ids)}
        if all(t["state"] in TERMINAL for t in recs.values()):
            return recs
        if time.monotonic() > deadline:
            states = sorted(t["state"] for t in recs.values())
            pytest.fail(f"tasks not terminal within {timeout}s: {states}\n{diagnostics(d)}",
                        pytrace=False)
        time.sleep(0.2)


def node_of(record: dict) -> str:
    """The node a NODE_TASK ran on (its stdout)."""
    assert record["state"] == "success", record
    res = record["result"]
    assert res["encoding"] == "json", res
    value = res["value"]
    assert value["returncode"] == 0, value
    return value["stdout"].strip()


class Watcher:
    """Polls /v1/status and remembers every block and every manager (uid → host, block) seen,
    and the most blocks active (pending or running) at once."""

    def __init__(self, d):
        self.d = d
        self.blocks: dict[int, dict] = {}
        self.managers: dict[str, tuple[str, int]] = {}
        self.most_active = 0
        self.last: dict = {}

    def poll(self) -> dict:
        p = pool_status(self.d)
        self.last = p
        for b in p["blocks"]:
            self.blocks[b["id"]] = b
        for m in p.get("managers") or []:
            self.managers[m["uid"]] = (m["host"], m["block"])
        active = sum(b["phase"] in ("pending", "running") for b in p["blocks"])
        self.most_active = max(self.most_active, active)
        return p

    def hosts_of_block(self, block: int) -> set[str]:
        return {h for h, b in self.managers.values() if b == block}

    def until(self, cond, timeout, what) -> dict:
        """Poll until `cond(pool status)` holds; returns that status."""
        wait_for(lambda: cond(self.poll()), timeout,
                 lambda: f"{what}\n{diagnostics(self.d)}", interval=0.2)
        return self.last


# ---------------------------------------------------------------------------------------------
# Scaling out and in
# ---------------------------------------------------------------------------------------------


def test_slurm_blocks_run_tasks_on_both_nodes_and_scale_out_then_in(slurm, fnx_env, tmp_path):
    idle = 6
    d = slurm.start(min_blocks=0, max_blocks=2, max_idletime=idle)
    w = Watcher(d)
    assert w.poll()["blocks"] == [], "min_blocks = 0 and nothing to do: no block yet"

    sid = d.register({"kind": "shell", "command": NODE_TASK})
    # 8 tasks, 4 slots per block (2 nodes x 2 workers): the scaler wants 2 blocks at once.
    marks = tmp_path / "marks"
    marks.mkdir()
    ids = d.submit([{"function": sid, "args": {"m": str(marks), "i": str(i), "t": "3"}}
                    for i in range(8)])
    w.until(lambda p: sum(b["managers"] for b in p["blocks"]) == 4, 40,
            "both blocks running with 2 managers each")
    recs = node_results(d, ids, 60)
    t_done = time.monotonic()
    w.poll()

    # Exactly two blocks (max_blocks), each a Slurm job of 2 exclusive nodes.
    assert sorted(w.blocks) == [0, 1], f"blocks seen: {w.blocks}\n{diagnostics(d)}"
    assert w.most_active == 2, w.most_active
    jobs = slurm.jobs_of(d)
    assert sorted(jobs) == sorted(b["job"] for b in w.blocks.values()), (jobs, w.blocks)
    for b in w.blocks.values():
        assert Path(b["dir"]) == run_dir(d) / f"block-{b['id']}", b
        assert Path(b["stderr"]) == Path(b["dir"]) / "job.err", b
        script = (Path(b["dir"]) / "submit.sh").read_text()
        assert "#SBATCH --nodes=2" in script and "#SBATCH --exclusive" in script, script
        assert f"--job-name=fnx.{POOL}.block-{b['id']}" in script, script
        info = scontrol_job(b["job"])
        assert f"JobName=fnx.{POOL}.block-{b['id']}" in info, info
    nodes = {b["id"]: job_nodes(b["job"]) for b in w.blocks.values()}
    assert all(len(n) == 2 for n in nodes.values()), nodes
    assert nodes[0] | nodes[1] == NODES and not nodes[0] & nodes[1], \
        f"two exclusive 2-node blocks hold n1..n4: {nodes}"

    # One manager per node of each block, named block-<n>.<rank>, on its job's nodes.
    for blk in (0, 1):
        uids = sorted(u for u, (_, b) in w.managers.items() if b == blk)
        assert uids == [f"block-{blk}.0", f"block-{blk}.1"], w.managers
        assert w.hosts_of_block(blk) == nodes[blk], \
            f"block {blk}: managers on {w.hosts_of_block(blk)}, job on {nodes[blk]}"

    # Every task succeeded and ran once, on a node of the cluster; the work was spread out.
    # (`attempt` counts dispatches: a prefetched task that the interchange reclaims from the
    # first manager to register, for the ones registering after it, is dispatched again
    # without having run. Executions are counted with the marker files.)
    assert all(r["state"] == "success" for r in recs.values()), recs
    executions = {int(f.name): f.read_text().split() for f in marks.iterdir()}
    assert sorted(executions) == list(range(8)), executions
    assert all(len(v) == 1 for v in executions.values()), f"ran more than once: {executions}"
    ran_on = [node_of(recs[t]) for t in ids]
    assert ran_on == [executions[i][0] for i in range(8)], (ran_on, executions)
    assert set(ran_on) <= NODES, ran_on
    assert len(set(ran_on)) >= 2, f"tasks ran on {ran_on}"
    results = d.api("GET", "/v1/results?since=0&limit=1000").body["results"]
    assert sorted(r["id"] for r in results) == sorted(ids), "each result delivered once"
    print(f"\ntasks ran on {sorted(ran_on)}; blocks on {nodes}; attempts "
          f"{sorted(r['attempt'] for r in recs.values())}")

    # Idle: both blocks are drained (not before max_idletime) and their jobs complete.
    drained_at = {}

    def both_ended(p):
        for b in p["blocks"]:
            if b["phase"] in ("draining", "ended"):
                drained_at.setdefault(b["id"], time.monotonic())
        return sorted(b["id"] for b in p["blocks"] if b["phase"] == "ended") == [0, 1]

    w.until(both_ended, idle + 20, f"both blocks drained and ended within {idle + 20}s of idle")
    t_ended = time.monotonic()
    for blk, t in drained_at.items():
        assert t - t_done >= idle - 1.5, \
            f"block {blk} drained {t - t_done:.1f}s after the last task (max_idletime {idle})"
    final = {b["id"]: b for b in w.last["blocks"]}
    # (The daemon takes COMPLETING, Slurm's last step before COMPLETED, for the job's end.)
    assert all(final[b]["job_state"] in ("COMPLETED", "COMPLETING") for b in (0, 1)), final
    assert all(final[b]["managers"] == 0 for b in (0, 1)), final
    assert not w.last.get("managers"), w.last.get("managers")
    states = slurm.wait_jobs_gone(jobs, 20)
    assert all(states.get(j) == "COMPLETED" for j in jobs), \
        f"drained jobs end by themselves (not cancelled): {states}"
    log = d.log_since_start()
    for blk in (0, 1):
        assert f"block {blk} is idle; draining it" in log, log[-3000:]
    print(f"blocks ended {t_ended - t_done:.1f}s after the last task (max_idletime {idle})")

    # No new block while idle.
    assert sorted(b["id"] for b in pool_status(d)["blocks"]) == [0, 1]
    assert len(slurm.jobs_of(d)) == 2


def test_idle_scale_in_keeps_min_blocks(slurm, fnx_env, tmp_path):
    idle = 4
    d = slurm.start(min_blocks=1, max_blocks=2, max_idletime=idle)
    w = Watcher(d)
    # min_blocks = 1: one block comes up with nothing to do.
    w.until(lambda p: [b["phase"] for b in p["blocks"]] == ["running"]
            and p["blocks"][0]["managers"] == 2, 30, "the min_blocks block running")
    sid = d.register({"kind": "shell", "command": NODE_TASK})
    marks = tmp_path / "marks"
    marks.mkdir()
    ids = d.submit([{"function": sid, "args": {"m": str(marks), "i": str(i), "t": "2"}}
                    for i in range(8)])
    w.until(lambda p: len(p["blocks"]) == 2, 20, "a second block for the load")
    recs = node_results(d, ids, 60)
    assert all(r["state"] == "success" for r in recs.values()), recs
    assert sorted(w.blocks) == [0, 1], w.blocks

    w.until(lambda p: any(b["phase"] == "ended" for b in p["blocks"]), idle + 20,
            "one block drained and ended")
    t_one = time.monotonic()
    # The other one stays (min_blocks) well past another max_idletime.
    while time.monotonic() < t_one + idle + 3:
        p = w.poll()
        phases = sorted(b["phase"] for b in p["blocks"])
        assert phases == ["ended", "running"], f"min_blocks = 1 keeps one block: {p['blocks']}"
        time.sleep(0.5)
    [kept] = [b for b in w.last["blocks"] if b["phase"] == "running"]
    [gone] = [b for b in w.last["blocks"] if b["phase"] == "ended"]
    assert kept["managers"] == 2 and job_states([kept["job"]]) == {kept["job"]: "RUNNING"}, kept
    assert gone["job_state"] in ("COMPLETED", "COMPLETING"), gone
    assert slurm.wait_jobs_gone([gone["job"]], 20) == {gone["job"]: "COMPLETED"}
    assert len(slurm.jobs_of(d)) == 2, "no block submitted while idle"

    # The daemon cancels its live block when it stops. It releases the block's managers at
    # the same time (as test_launchers' Cobalt test shows), so the job ends cancelled, or
    # completed when its managers were quicker than scancel; either way nothing is left.
    d.stop()
    final = slurm.wait_jobs_gone([kept["job"]], 30, lambda: squeue_all())
    assert final[kept["job"]] in ("CANCELLED", "COMPLETED"), final
    assert re.search(rf"cancelling jobs {kept['job']} \(blocks {kept['id']}\)",
                     d.log_since_start()), d.log_tail()


# ---------------------------------------------------------------------------------------------
# A block cancelled under its tasks
# ---------------------------------------------------------------------------------------------


def two_running_blocks(slurm, **pool):
    """A daemon with min_blocks = 2, once both blocks run with 2 managers each."""
    d = slurm.start(min_blocks=2, **pool)
    w = Watcher(d)
    w.until(lambda p: [b["managers"] for b in p["blocks"]] == [2, 2], 40,
            "min_blocks = 2: two blocks running with 2 managers each")
    return d, w


def test_scancel_of_a_busy_block_retries_its_tasks_elsewhere(slurm, fnx_env, tmp_path):
    d, w = two_running_blocks(slurm, max_blocks=2, max_idletime=30)
    marks = tmp_path / "marks"
    marks.mkdir()
    # Each execution appends "start NODE" and, if it is not killed, "done NODE" to marks/I; a
    # killed sleep fails the whole command (exit 143), as a careful batch script would.
    sid = d.register({"kind": "shell", "command":
                      'echo "start $SLURMD_NODENAME" >> {m}/{i}; sleep {t} && '
                      'echo "done $SLURMD_NODENAME" >> {m}/{i} && echo "$SLURMD_NODENAME"'})
    n = 12  # more than the 8 slots of both blocks
    ids = d.submit([{"function": sid, "args": {"m": str(marks), "i": str(i), "t": "8"}}
                    for i in range(n)])

    def starts() -> dict[int, list[str]]:
        out = {}
        for f in marks.iterdir():
            out[int(f.name)] = [ln.split()[1] for ln in f.read_text().splitlines()
                                if ln.startswith("start ") and len(ln.split()) == 2]
        return out

    p = w.until(lambda p: all(m["inflight"] > 0 for m in p["managers"])
                and len(p["managers"]) == 4
                and {h for s in starts().values() for h in s} == NODES,
                30, "every manager of both blocks running tasks")
    victim = {b["id"]: b for b in p["blocks"]}[0]
    victim_nodes = w.hosts_of_block(0)
    assert victim_nodes == job_nodes(victim["job"]) and len(victim_nodes) == 2, \
        (victim_nodes, victim)
    before = starts()
    on_victim = sorted(i for i, hs in before.items() if set(hs) & victim_nodes)
    assert on_victim, before
    r = run(["scancel", victim["job"]])
    assert r.returncode == 0, r
    t_cancel = time.monotonic()

    w.until(lambda p: any(b["id"] == 0 and b["phase"] == "ended" for b in p["blocks"]), 20,
            f"block 0 (job {victim['job']}) ended after scancel")
    ended = {b["id"]: b for b in w.last["blocks"]}[0]
    # (The daemon takes COMPLETING, the job's processes being killed, for its end.)
    assert ended["job_state"] in ("CANCELLED", "COMPLETING"), ended
    assert slurm.wait_jobs_gone([victim["job"]], 20) == {victim["job"]: "CANCELLED"}
    log_after_cancel = d.log_since_start()

    recs = node_results(d, ids, 90)
    t_done = time.monotonic()
    bad = {i: r for i, r in recs.items() if r["state"] != "success"}
    assert not bad, "tasks lost with the block:\n" + "\n".join(
        f"  task {t}: {r['state']}, attempt {r['attempt']}, error {r.get('error')}"
        for t, r in bad.items()) + f"\n{diagnostics(d)}"
    by_index = dict(enumerate(ids))
    for i in on_victim:
        rec = recs[by_index[i]]
        assert rec["attempt"] >= 2, f"task {i} ran on the cancelled block: {rec}"
    # Each task ran to its end exactly once (the killed attempts never wrote "done").
    done = {int(f.name): [ln for ln in f.read_text().splitlines() if ln.startswith("done ")]
            for f in marks.iterdir()}
    assert sorted(done) == list(range(n)) and all(len(v) == 1 for v in done.values()), done
    for i in on_victim:
        assert len(starts()[i]) == 2, f"task {i}: {starts()[i]}"
    results = d.api("GET", "/v1/results?since=0&limit=1000").body["results"]
    assert sorted(r["id"] for r in results) == sorted(ids), "each outcome recorded once"

    # min_blocks = 2: the scaler replaced the cancelled block (after its backoff).
    w.until(lambda p: any(b["id"] >= 2 and b["phase"] == "running" and b["managers"] == 2
                          for b in p["blocks"]), 30, "a replacement block running")
    new = [b for b in w.last["blocks"] if b["id"] >= 2]
    assert [b["id"] for b in new] == [2], f"one replacement: {w.last['blocks']}"
    retried_on = sorted(node_of(recs[by_index[i]]) for i in on_victim)
    print(f"\ntasks {on_victim} on {sorted(victim_nodes)} retried on {retried_on}; all done "
          f"{t_done - t_cancel:.1f}s after scancel; replacement block 2 on "
          f"{sorted(w.hosts_of_block(2))}")

    # The daemon log says that the block's job ended. (Its managers got Slurm's SIGTERM with
    # the job's other processes and may have left before the job's end was polled.)
    job_ended = re.compile(rf"(job {victim['job']}\b|block 0\b)[^\n]*\bended\b")
    assert job_ended.search(log_after_cancel), \
        f"no line of the daemon log says that job {victim['job']} (block 0) ended " \
        f"(scancel):\n{log_after_cancel[-3000:]}"


# ---------------------------------------------------------------------------------------------
# Blocks that never connect
# ---------------------------------------------------------------------------------------------


def test_block_that_never_connects_marks_the_pool_failed(slurm, fnx_env):
    message = "module: cannot load python/9.9"
    d = slurm.start(max_blocks=1, max_failed_blocks=2, max_idletime=60,
                    worker_init=f"echo '{message}' >&2; exit 3")
    w = Watcher(d)
    sid = d.register({"kind": "shell", "command": "echo {x}"})
    [tid] = d.submit([{"function": sid, "args": {"x": "hello"}}])

    p = w.until(lambda p: p["failed"], 45, "the pool marked failed after 2 blocks")
    failed = p["failed"]
    m = re.search(r"(/\S+/block-(\d+)/job\.err)", failed)
    assert m, f"the error names a block's job.err: {failed!r}"
    err_file, last = Path(m.group(1)), int(m.group(2))
    ended = [b for b in p["blocks"] if b["phase"] == "ended"]
    assert sorted(b["id"] for b in ended) == [0, 1], p["blocks"]
    assert last == 1 and err_file == run_dir(d) / "block-1" / "job.err", failed
    assert err_file.is_file(), f"{err_file} does not exist\n{diagnostics(d)}"
    assert message in err_file.read_text(), err_file.read_text()
    assert "2 blocks in a row" in failed and message in failed, failed
    for b in ended:
        assert b["job_state"] == "FAILED" and b["managers"] == 0, b
        assert job_states([b["job"]]) == {b["job"]: "FAILED"}, scontrol_job(b["job"])
        assert "ExitCode=3:0" in scontrol_job(b["job"])

    rec = d.task(tid)
    assert rec["state"] == "queued" and rec["attempt"] == 0, rec
    assert rec.get("waiting") == failed, rec
    out = ok(d.fnx("status"))
    assert "FAILED" in out and str(err_file) in out, out
    print(f"\nfnx status:\n{out}")

    # Still queued a moment later: not lost, not failed.
    rec = d.task(tid)
    assert rec["state"] == "queued" and rec["attempt"] == 0, rec
    assert d.status()["tasks"]["queued"] == 1


def test_a_rejected_first_block_shows_in_status_with_no_task_queued(slurm, fnx_env):
    """sbatch refuses the pool's first block (init_blocks = 1, a partition Slurm does not
    have): `fnx status` says why at once, before any task asks for a block."""
    d = slurm.start(init_blocks=1, min_blocks=0, max_blocks=1, partition="nosuchpartition")
    w = Watcher(d)
    p = w.until(lambda p: p.get("submit_error"), 30, "the submit error in /v1/status")
    assert "nosuchpartition" in p["submit_error"] or "partition" in p["submit_error"], p
    assert not p["failed"], "one rejection does not mark the pool failed"
    out = ok(d.fnx("status"))
    assert "cannot submit blocks: " in out and "partition" in out, out
    assert d.status()["tasks"]["queued"] == 0


# ---------------------------------------------------------------------------------------------
# fnx map inside a batch job
# ---------------------------------------------------------------------------------------------


def test_map_with_srun_launcher_inside_sbatch_uses_every_node(slurm, fnx_env, tmp_path):
    require_slurm()
    work = tmp_path / "job"
    work.mkdir()
    n = 40
    (work / "in.jsonl").write_text("".join(json.dumps({"s": 0.5}) + "\n" for _ in range(n)))
    script = work / "map.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=fnx-test-map
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:05:00
#SBATCH --output={work}/job.out
#SBATCH --error={work}/job.err
set -e
cd {work}
scontrol show hostnames "$SLURM_JOB_NODELIST" > nodes
exec {fnx_env.bin} map --launcher srun --shell 'echo "$SLURMD_NODENAME"; sleep {{s}}' \\
    --input in.jsonl --output out.jsonl --workers 1 --run-dir {work}/run --progress never
""")
    r = run(["sbatch", "--parsable", str(script)], env=fnx_env.env)
    assert r.returncode == 0, f"sbatch: {r.stderr}"
    job = r.stdout.strip().split(";")[0]
    slurm.extra_jobs.append(job)

    def diag():
        parts = [squeue_all(), scontrol_job(job)]
        for f in [work / "job.out", work / "job.err",
                  *sorted((work / "run").glob("**/*.log"))]:
            if f.is_file():
                parts.append(f"--- {f}:\n{f.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    final = slurm.wait_jobs_gone([job], 60, diag)
    assert final.get(job) == "COMPLETED", f"job {job}: {final}\n{diag()}"
    assert "ExitCode=0:0" in scontrol_job(job), diag()
    allocation = set((work / "nodes").read_text().split())
    assert allocation == NODES, allocation

    lines = [json.loads(ln) for ln in (work / "out.jsonl").read_text().splitlines()]
    assert sorted(ln["index"] for ln in lines) == list(range(n)), lines
    assert all(ln["ok"] and ln["result"]["returncode"] == 0 for ln in lines), lines
    seen = [ln["result"]["stdout"].strip() for ln in lines]
    assert set(seen) == allocation, f"tasks ran on {sorted(set(seen))}, allocation " \
        f"{sorted(allocation)}\n{diag()}"
    counts = {h: seen.count(h) for h in sorted(set(seen))}
    print(f"\ntasks per node: {counts}")


def run_node_tasks(d, tmp_path, n: int) -> dict[int, dict]:
    """Run `n` short NODE_TASKs; their terminal records."""
    marks = tmp_path / "marks"
    marks.mkdir()
    sid = d.register({"kind": "shell", "command": NODE_TASK})
    ids = d.submit([{"function": sid, "args": {"m": str(marks), "i": str(i), "t": "0.2"}}
                    for i in range(n)])
    return node_results(d, ids, 30)


def test_encrypted_blocks_get_their_keys_from_the_shared_key_file(slurm, fnx_env, tmp_path):
    """`encrypt = "always"`: block managers read the pool's key file (0600, in the key directory
    on the filesystem the nodes share) named by path on their command line; the secret never
    appears on any command line; tasks run over the encrypted links."""
    d = slurm.start(interchange={"encrypt": "always"}, min_blocks=1, max_blocks=1)
    w = Watcher(d)
    w.until(lambda p: [b["managers"] for b in p["blocks"]] == [2], 40,
            "one encrypted block with 2 managers")
    key_file = d.home / "keys" / f"{POOL}.manager"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (d.home / "keys").stat().st_mode & 0o777 == 0o700
    script = (run_dir(d) / "block-0" / "submit.sh").read_text()
    assert f"--curve-keys {key_file}" in script, script
    secret = next(line.split("=", 1)[1].strip() for line in key_file.read_text().splitlines()
                  if line.startswith("secret"))
    managers = [p for p in fnx_env.processes() if " manager " in f" {p.cmdline} "]
    assert len(managers) >= 2, [p.cmdline for p in fnx_env.processes()]
    for p in managers:
        assert secret not in p.cmdline, "a key on a command line is visible to ps"
        assert str(key_file) in p.cmdline, p.cmdline
    recs = run_node_tasks(d, tmp_path, 8)
    assert {node_of(r) for r in recs.values()} == set(job_nodes(slurm.jobs_of(d)[0])), recs
    assert "encrypted (CurveZMQ)" in d.log_since_start()


def test_a_restarted_daemon_adopts_the_blocks_that_survived_it(slurm, fnx_env, tmp_path):
    """After `kill -9` of the daemon its blocks keep running; the restarted daemon finds their
    jobs (job_id files without an `ended` marker), counts them instead of submitting new ones,
    its managers register again, and they run the recovered and the new tasks."""
    d = slurm.start(min_blocks=1, max_blocks=2, max_idletime=60)
    w = Watcher(d)
    w.until(lambda p: [b["managers"] for b in p["blocks"]] == [2], 40,
            "min_blocks = 1: one block with 2 managers")
    [job] = slurm.jobs_of(d)
    d.kill9(check=False)
    assert job_states([job]).get(job) == "RUNNING", "the block outlives the daemon"
    d.start()
    w = Watcher(d)
    w.until(lambda p: [(b["id"], b["job"], b["managers"]) for b in p["blocks"]]
            == [(0, job, 2)], 30, f"block 0 (job {job}) adopted with its 2 managers")
    assert f"adopting block 0 (job {job})" in d.log_since_start()
    recs = run_node_tasks(d, tmp_path, 4)
    assert all(r["state"] == "success" for r in recs.values()), recs
    assert slurm.jobs_of(d) == [job], "no block was submitted in place of the adopted one"


def test_admins_force_a_busy_block_out_and_drain_another(slurm, fnx_env, tmp_path):
    """`fnx block cancel POOL N` cancels a block's job even while it runs tasks (they are
    retried, nothing is lost, no backoff); `fnx block drain POOL N` drains one now; both are
    for admins only and name unknown blocks."""
    d, w = two_running_blocks(slurm, max_blocks=3, max_idletime=60)
    marks = tmp_path / "marks"
    marks.mkdir()
    sid = d.register({"kind": "shell", "command":
                      'echo "$SLURMD_NODENAME" >> {m}/{i}; sleep {t} && echo "$SLURMD_NODENAME"'})
    ids = d.submit([{"function": sid, "args": {"m": str(marks), "i": str(i), "t": "4"}}
                    for i in range(8)])
    w.until(lambda p: all(m["inflight"] > 0 for m in p["managers"]), 30,
            "every manager of both blocks runs a task")
    user = d.create_user("someone")
    refused = d.fnx("block", "cancel", POOL, "0", env=d.env_for(user))
    assert refused.returncode != 0 and "admin" in refused.stderr, refused
    missing = d.fnx("block", "drain", POOL, "99")
    assert missing.returncode != 0 and "no live block 99" in missing.stderr, missing
    [job0] = [b["job"] for b in pool_status(d)["blocks"] if b["id"] == 0]
    r = d.fnx("block", "cancel", POOL, "0")
    assert r.returncode == 0, r
    slurm.wait_jobs_gone([job0], 20, lambda: diagnostics(d))
    recs = node_results(d, ids, 60)
    assert all(t["state"] == "success" for t in recs.values()), recs
    runs = {int(f.name): f.read_text().split() for f in marks.iterdir()}
    assert any(len(v) == 2 for v in runs.values()), f"tasks of block 0 ran again: {runs}"
    assert f"cancelling block 0 (job {job0}) on an admin's request" in d.log_since_start()
    # min_blocks = 2 brings a new block at once (an admin's cancel is not a failure: no backoff).
    p = w.until(lambda p: sum(b["phase"] == "running" for b in p["blocks"]) == 2, 30,
                "a replacement block runs")
    assert p["failed"] is None, p
    r = d.fnx("block", "drain", POOL, "1")
    assert r.returncode == 0, r
    w.until(lambda p: any(b["id"] == 1 and b["phase"] == "ended" for b in p["blocks"]), 30,
            "block 1 is drained and its job ends")
