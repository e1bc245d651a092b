"""Providers and launchers other than Slurm + srun (issue 4): PBS blocks through the real
Torque-style wrappers of the test cluster (qsub/qstat/qdel → sbatch/squeue/scancel) with
`mpiexec.mpich` as the launcher; `fnx map --launcher mpiexec` with MPICH (Hydra) and Open MPI
starting one manager per host of a hostfile; Cobalt + aprun through recording fakes (no Cray
here); and `fnx config check`'s dry run.

Two "hosts" on one machine: both MPIs start their remote helpers (hydra_pmi_proxy, orted)
through ssh, and both can be given another ssh (`-launcher ssh -launcher-exec FILE` for Hydra,
`--mca plm_rsh_agent FILE` for Open MPI). `fakes/ssh/ssh` records the host it is asked for and
runs the command here, with SLURMD_NODENAME=<host> so that the manager started through it
reports that host as its node. Every fake command logs its argv as one JSON line in
$FNX_FAKE_LOG (see fakes/README.md); `fakes/passthrough/` records calls of the real batch
commands.

The Slurm cluster (`scripts/test-cluster.sh start`) is shared with other tests: these tests
only look at their own jobs and leave none behind (they stop their daemons, which cancel their
blocks, and wait until Slurm no longer runs the jobs). Job environments inherit FNX_TEST_MARK,
so a job process that outlives its test is reported as leaked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import wait_for
from daemon_env import GATE, TERMINAL, result_value, to_toml

FAKES = Path(__file__).resolve().parent / "fakes"
FAKE_SSH = FAKES / "ssh" / "ssh"
# Give a job of the Torque wrappers a PBS-like environment: without the unset Hydra notices
# Slurm and launches through srun (which fails for a step inside this kind of job).
UNSET_SLURM = r"unset $(env | sed -n 's/^\(SLURM[A-Z_]*\)=.*/\1/p')"
OMPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_rmaps_base_oversubscribe": "1"}
# Slurm states of a job that still holds (or will hold) nodes.
LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING",
        "STAGE_OUT", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "STOPPED"}
FAST = {"poll_interval_s": 0.5, "scaling_interval_s": 0.5, "max_idletime": 3}
CLUSTER_HINT = "the Slurm test cluster is not usable: run scripts/test-cluster.sh start"


# ---------------------------------------------------------------------------------------------
# Commands, fakes, Slurm
# ---------------------------------------------------------------------------------------------


def run(argv, env=None, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def require(*commands: str, hint: str) -> None:
    """Fail (not skip) when a command the test needs is missing."""
    for c in commands:
        if shutil.which(c) is None:
            pytest.fail(f"{c} not found; {hint}", pytrace=False)


def require_pbs() -> None:
    require("qsub", "qstat", "qdel", "sbatch", "squeue", "sinfo", "mpiexec.mpich",
            hint=CLUSTER_HINT)
    r = run(["sinfo", "--noheader", "--format=%a %D"])
    if r.returncode != 0:
        pytest.fail(f"sinfo failed ({r.returncode}): {r.stderr.strip()}; {CLUSTER_HINT}",
                    pytrace=False)


def fake_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def calls(path: Path, cmd: str) -> list[dict]:
    """The recorded calls of `cmd` (not refusals, not notes)."""
    return [e for e in fake_log(path) if e["cmd"] == cmd and "argv" in e and "error" not in e]


def fake_errors(path: Path) -> list[dict]:
    return [e for e in fake_log(path) if "error" in e]


def show_log(path: Path, n: int = 40) -> str:
    lines = path.read_text().splitlines()[-n:] if path.exists() else ["(no calls)"]
    return f"--- {path} (last {n} calls):\n" + "\n".join(x[:400] for x in lines)


def squeue_field(job: str, field: str) -> str | None:
    """One squeue field (`%T` state, `%j` name) of `job`, None once Slurm has forgotten it."""
    r = run(["squeue", "--noheader", "--states=all", f"--format=%i {field}", f"--jobs={job}"])
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == job:
            return parts[1]
    return None


def slurm_state(job: str) -> str | None:
    return squeue_field(job, "%T")


def slurm_job_name(job: str) -> str | None:
    return squeue_field(job, "%j")


def squeue_all() -> str:
    """The whole queue (other tests' jobs too: they may hold the nodes ours wait for)."""
    r = run(["squeue", "--states=all", "--format=%.8i %.24j %.10T %.6D %.10M %R"])
    return f"--- squeue:\n{r.stdout}{r.stderr}"


def wait_job_done(job: str, timeout: float = 20) -> str | None:
    """Wait until Slurm no longer runs `job`; its last state (None: forgotten)."""
    box = {}

    def done():
        box["s"] = slurm_state(job)
        return box["s"] not in LIVE

    wait_for(done, timeout, lambda: f"Slurm job {job} to end (state {box.get('s')})",
             interval=0.2)
    return box["s"]


def tail(path: Path, n: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return f"--- {path}: (missing)"
    return f"--- {path}:\n{text[-n:]}"


def block_report(blk: Path) -> str:
    """The files of a block directory and the tails of its logs (for failure messages)."""
    if not blk.is_dir():
        return f"--- {blk}: (no block directory)"
    files = sorted(str(p.relative_to(blk)) for p in blk.rglob("*"))
    parts = [f"--- {blk}: {files}"]
    for name in ("job.out", "job.err", "job.output", "job.error", "job.cobaltlog",
                 "submit.error"):
        if (blk / name).exists():
            parts.append(tail(blk / name))
    for log in sorted(blk.glob("block-*/manager.log")):
        parts.append(tail(log))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Daemons with batch pools
# ---------------------------------------------------------------------------------------------


def batch_daemon(make_daemon, pools: dict, env: dict | None = None):
    """A started daemon whose pools are exactly `pools` (no local pool), its interchange on
    loopback with fast heartbeats. Port 0: pool N would otherwise listen on port + N, which
    another process may hold."""
    d = make_daemon(start=False, env=env,
                    interchange={"address": "127.0.0.1", "port": 0, "heartbeat_period_s": 1,
                                 "heartbeat_threshold_s": 5})
    d.config["pools"] = pools
    d.config_path.write_text(to_toml(d.config))
    return d.start()


class Watch:
    """Polls /v1/status for one pool and remembers every manager and block it has shown."""

    def __init__(self, daemon, pool: str, diag=lambda: ""):
        self.d, self.pool, self.diag = daemon, pool, diag
        self.managers: dict[str, dict] = {}
        self.blocks: dict[int, dict] = {}
        self.last: dict = {}

    def poll(self) -> dict:
        st = self.d.status()
        pools = [p for p in st["pools"] if p["name"] == self.pool]
        assert pools, f"pool {self.pool} missing from /v1/status: {st['pools']}"
        p = self.last = pools[0]
        for m in p.get("managers", []):
            self.managers[m["uid"]] = m
        for b in p.get("blocks", []):
            self.blocks[b["id"]] = b
        return p

    def until(self, cond, timeout: float, what: str, blk: Path | None = None):
        deadline = time.monotonic() + timeout
        while True:
            value = cond(self.poll())
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out after {timeout}s waiting for {what}\npool: "
                    f"{json.dumps(self.last)[:3000]}\n"
                    + (block_report(blk) + "\n" if blk else "") + self.diag() + "\n"
                    + self.d.log_tail(),
                    pytrace=False)
            time.sleep(0.1)

    def tasks(self, ids: list[int], timeout: float, blk: Path | None = None) -> dict[int, dict]:
        """Records of `ids` once all are terminal (watching the pool meanwhile)."""
        box = {}

        def done(_pool):
            recs = self.d.statuses(ids)
            box["states"] = [t["state"] for t in recs]
            if all(t["state"] in TERMINAL for t in recs):
                return {t["id"]: t for t in recs}
            return None

        return self.until(done, timeout, lambda: f"tasks {ids} (states {box.get('states')})",
                          blk)

    def block(self, n: int) -> dict:
        return self.blocks.get(n, {})


def shell_out(rec: dict) -> str:
    """The stdout of a successful shell task (its exit status must be 0)."""
    res = result_value(rec)
    assert res["returncode"] == 0, f"shell task failed: {rec}"
    return res["stdout"]


def pbs_pool(nodefile: Path, **over) -> dict:
    """A PBS pool on the Torque wrappers, launching with MPICH on the nodes of `nodefile`."""
    return {"provider": "pbs", "launcher": "mpiexec", "mpiexec": "mpiexec.mpich",
            "nodes_per_block": 1, "workers_per_node": 2, **FAST,
            "worker_init": f"{UNSET_SLURM}\nexport PBS_NODEFILE={nodefile}", **over}


# ---------------------------------------------------------------------------------------------
# PBS through the real qsub / qstat / qdel (Slurm's Torque wrappers)
# ---------------------------------------------------------------------------------------------


def test_pbs_blocks_through_qsub_qstat_qdel(make_daemon, fnx_env):
    """A PBS block is submitted with `qsub -o -e submit.sh`, polled with `qstat -f`, runs its
    manager through mpiexec.mpich, takes the pool's tasks, and is drained when idle (its job
    ends by itself, no qdel). A daemon stopped with live blocks (one running a task, one
    queued, one running without a manager) qdels them, and Slurm ends all their jobs.

    About 7 s on an idle cluster; the jobs wait (up to 60 s) for a node while other tests'
    jobs hold all of them."""
    require_pbs()
    log = fnx_env.dir / "pbs-calls.jsonl"
    env = {"PATH": f"{FAKES / 'passthrough'}:{os.environ['PATH']}", "FNX_FAKE_LOG": str(log)}
    nodefile = fnx_env.write("nodefile", "localhost\n")
    d = batch_daemon(make_daemon, {"pbs": pbs_pool(nodefile)}, env)
    blk = d.home / "runs" / "pbs" / "block-0"
    w = Watch(d, "pbs", squeue_all)

    fid = d.register({"kind": "shell", "command":
                      'echo "rank=$PMI_RANK slurm=${SLURM_JOB_ID:-none} '
                      'nodefile=$PBS_NODEFILE block=$FNX_BLOCK x={x}"'})
    ids = d.submit([{"function": fid, "args": {"x": i}, "pool": "pbs"} for i in range(4)])
    recs = w.tasks(ids, 60, blk)
    for i, t in enumerate(ids):
        assert shell_out(recs[t]) == f"rank=0 slurm=none nodefile={nodefile} block=0 x={i}\n", (
            recs[t])
    status_text = d.fnx("status").stdout

    # The job: its id is one qsub printed and Slurm (and qstat) know.
    job = (blk / "job_id").read_text().strip()
    assert re.fullmatch(r"\d+", job), f"job_id {job!r}\n{block_report(blk)}"
    qsubs = [c["argv"] for c in calls(log, "qsub")]
    assert qsubs == [["-o", f"{blk}/job.out", "-e", f"{blk}/job.err", f"{blk}/submit.sh"]], (
        show_log(log))
    assert calls(log, "qsub")[0]["cwd"] == str(blk), show_log(log)
    assert slurm_job_name(job) is not None, f"squeue does not know job {job}"
    q = run(["qstat", "-f", job])
    assert re.search(rf"^Job Id:\s*{job}\b", q.stdout, re.M) and "job_state =" in q.stdout, (
        q.stdout, q.stderr)

    # The block directory.
    script = (blk / "submit.sh").read_text()
    for want in ["#!/bin/bash\n", "#PBS -N fnx.pbs.block-0\n", f"#PBS -o {blk}/job.out\n",
                 f"#PBS -e {blk}/job.err\n", "#PBS -l select=1\n", "#PBS -l walltime=00:30:00\n",
                 f"{UNSET_SLURM}\nexport PBS_NODEFILE={nodefile}\n",
                 "mpiexec.mpich -n \"$FNX_NODES\" ", " manager ", "--uid 'block-0.{rank}'",
                 " --block-id 0"]:
        assert want in script, f"{want!r} missing from submit.sh:\n{script}"
    assert script.index("export PBS_NODEFILE") < script.index("mpiexec.mpich -n"), script
    for name in ("job.out", "job.err"):
        assert (blk / name).is_file(), f"{name} missing (qsub -o/-e not honoured?)\n" + (
            block_report(blk))
    # With -o/-e ignored the wrapper would write submit.sh.o<job> / .e<job> instead.
    strays = [p.name for p in blk.iterdir() if re.fullmatch(r".*\.[oe]\d+", p.name)]
    assert not strays, f"job output in default files {strays}\n{block_report(blk)}"
    assert (blk / "hosts").read_text() == "localhost\n", block_report(blk)
    mlog = blk / "block-0.0" / "manager.log"
    assert mlog.is_file() and "block-0.0" in mlog.read_text(), block_report(blk)
    assert set(w.managers) == {"block-0.0"}, w.managers
    assert w.managers["block-0.0"]["block"] == 0, w.managers
    assert str(blk) in status_text and "pbs" in status_text, status_text

    # Idle: the block is drained and its job ends by itself (no qdel).
    w.until(lambda p: w.block(0).get("phase") == "ended" and not p.get("managers"), 20,
            "block 0 drained and ended", blk)
    assert "block 0 is idle; draining it" in d.log_since_start(), d.log_tail()
    state = wait_job_done(job)
    assert state in (None, "COMPLETED"), f"job {job} ended as {state}, expected COMPLETED"
    assert w.block(0)["job_state"] == "COMPLETED", w.block(0)
    # The end was seen by polling (a fast job may finish its tasks before the first poll).
    qstats = [c["argv"] for c in calls(log, "qstat")]
    assert qstats and all(a == ["-f", job] for a in qstats), show_log(log)
    assert calls(log, "qdel") == [], show_log(log)
    assert w.last["failed"] is None, w.last
    d.stop()
    assert calls(log, "qdel") == [], show_log(log)

    # Stopped with three live blocks: one whose manager runs a task, one still queued in
    # Slurm, one running in Slurm whose manager never started (its worker_init sleeps). The
    # last two are qdel'ed (Slurm: CANCELLED); the busy one is qdel'ed too, unless its job
    # already ended because the stopping daemon released its manager. None is left.
    g = fnx_env.dir / "gate"
    g.mkdir()
    keep = {"init_blocks": 1, "min_blocks": 1}
    d2 = batch_daemon(make_daemon, {
        "pbs": pbs_pool(nodefile),
        "held": pbs_pool(nodefile, **keep, scheduler_options="#SBATCH --begin=now+3600"),
        "stuck": pbs_pool(nodefile, **keep, worker_init=f"{UNSET_SLURM}\nsleep 300"),
    }, env)
    blks = {p: d2.home / "runs" / p / "block-0" for p in ("pbs", "held", "stuck")}
    watch = {p: Watch(d2, p, squeue_all) for p in blks}
    gid = d2.register({"kind": "shell", "command": GATE})
    d2.submit([{"function": gid, "args": {"d": str(g), "i": 0}, "pool": "pbs"}])
    wait_for(lambda: (g / "started-0").exists(), 60,
             lambda: f"the gate task to start\n{block_report(blks['pbs'])}\n{squeue_all()}\n"
             f"{d2.log_tail()}", interval=0.1)
    for p, want in (("held", "PENDING"), ("stuck", "RUNNING")):
        w_ = watch[p]
        w_.until(lambda _p, w_=w_, want=want: w_.block(0).get("job_state") == want, 60,
                 f"block 0 of pool {p} {want}", blks[p])
    watch["pbs"].until(lambda _p: watch["pbs"].block(0).get("phase") == "running", 5,
                       "the busy block running", blks["pbs"])
    jobs = {p: (b / "job_id").read_text().strip() for p, b in blks.items()}
    states = {p: slurm_state(j) for p, j in jobs.items()}
    assert states == {"pbs": "RUNNING", "held": "PENDING", "stuck": "RUNNING"}, (jobs, states)
    before = len(calls(log, "qdel"))
    d2.stop()
    qdeled = sorted(j for c in calls(log, "qdel")[before:] for j in c["argv"])
    ends = {p: wait_job_done(j) for p, j in jobs.items()}
    assert ends["held"] in (None, "CANCELLED") and ends["stuck"] in (None, "CANCELLED"), (
        jobs, ends, show_log(log))
    assert jobs["held"] in qdeled and jobs["stuck"] in qdeled, show_log(log)
    if jobs["pbs"] not in qdeled:
        assert ends["pbs"] in (None, "COMPLETED"), (jobs, ends, show_log(log))
    assert len(qdeled) == len(set(qdeled)), show_log(log)
    assert not (g / "done-0").exists()
    fnx_env.assert_no_processes(lambda p: str(g) in p.cmdline or "sleep 300" in p.cmdline,
                                grace=10)


# ---------------------------------------------------------------------------------------------
# fnx map --launcher mpiexec: one manager per host of the hostfile
# ---------------------------------------------------------------------------------------------

MPI = {
    # Hydra starts hydra_pmi_proxy on each host with `-launcher ssh`, through -launcher-exec.
    "mpich": ("mpiexec.mpich", f"-launcher ssh -launcher-exec {FAKE_SSH}", {}, "PMI_RANK"),
    # Open MPI starts orted on each host through its rsh agent.
    "openmpi": ("mpiexec.openmpi", f"--mca plm_rsh_agent {FAKE_SSH}", OMPI_ENV,
                "OMPI_COMM_WORLD_RANK"),
}
HOSTS = ["fnx-host-a", "fnx-host-b"]
# Both tasks wait (up to 10 s) until both have started: with one worker per manager and no
# prefetch they can only run at the same time on two managers.
BARRIER = ("touch {d}/started-{i}; n=0; "
           "while [ $(ls {d} | grep -c started) -lt 2 ]; do n=$((n+1)); "
           "[ $n -gt 200 ] && echo barrier timeout >&2 && exit 3; sleep 0.05; done; "
           "echo rank=$RANKVAR host=$FAKE_SSH_HOST i={i}")


def map_mpi(fnx_env, flavor: str, hostfile: Path, d: Path, n: int, log: Path):
    mpiexec, opts, extra, rankvar = MPI[flavor]
    require(mpiexec, hint=CLUSTER_HINT)
    fnx_env.env.update(extra, FNX_FAKE_LOG=str(log))
    try:
        return fnx_env.map(
            "--launcher", "mpiexec", "--mpiexec", mpiexec, "--launcher-options", opts,
            "--hostfile", str(hostfile), "--workers", "1", "--prefetch", "0",
            "--shell", BARRIER.replace("RANKVAR", rankvar),
            inputs=[{"d": str(d), "i": i} for i in range(n)], timeout=60)
    finally:
        for k in [*extra, "FNX_FAKE_LOG"]:
            fnx_env.env.pop(k, None)


def manager_hosts(r) -> dict[str, str]:
    """uid → host of the managers that registered, from the run's fnx.log."""
    text = (r.run_dir / "fnx.log").read_text()
    return dict(re.findall(r"manager (manager-\d+) \(\S+\) on (\S+) registered", text))


@pytest.mark.parametrize("flavor", ["mpich", "openmpi"])
def test_mpiexec_launches_one_manager_per_host(fnx_env, flavor):
    """Two distinct hosts in the hostfile: mpiexec starts a remote helper on each (through the
    fake ssh, which records the host), ranks 0 and 1 become managers manager-0 and manager-1 on
    those hosts, and the tasks run on both."""
    hf = fnx_env.write("hostfile", "".join(h + "\n" for h in HOSTS))
    log = fnx_env.dir / "ssh-calls.jsonl"
    d = fnx_env.dir / "barrier"
    d.mkdir()
    r = map_mpi(fnx_env, flavor, hf, d, 2, log)
    diag = r.explain() + "\n" + tail(r.run_dir / "launcher.log") + "\n" + show_log(log)
    assert r.returncode == 0, diag
    res = r.by_index()
    assert sorted(res) == [0, 1] and all(x["ok"] for x in res.values()), diag
    outs = {res[i]["result"]["stdout"] for i in (0, 1)}
    assert {re.sub(r" i=\d+\n", "", o) for o in outs} == {
        f"rank=0 host={HOSTS[0]}", f"rank=1 host={HOSTS[1]}"}, (outs, diag)
    # The launcher asked (fake) ssh for each host once.
    ssh_hosts = []
    for c in calls(log, "ssh"):
        args = [a for a in c["argv"] if a not in ("-x", "-q", "-T", "-n")]
        ssh_hosts.append(args[0])
    assert sorted(ssh_hosts) == HOSTS, show_log(log)
    helper = "hydra_pmi_proxy" if flavor == "mpich" else "orted"
    assert all(helper in " ".join(c["argv"]) for c in calls(log, "ssh")), show_log(log)
    assert fake_errors(log) == [], show_log(log)
    # Two managers, rank K is manager-K on the K-th host, each with its own log.
    assert manager_hosts(r) == {"manager-0": HOSTS[0], "manager-1": HOSTS[1]}, diag
    for k in (0, 1):
        mlog = r.run_dir / f"manager-{k}" / "manager.log"
        assert mlog.is_file(), diag
        assert re.search(rf"manager manager-{k} starting: 1 slots on {HOSTS[k]}\b",
                         mlog.read_text()), tail(mlog)
    assert not (r.run_dir / "manager-2").exists(), diag
    assert (r.run_dir / "hosts").read_text() == "".join(h + "\n" for h in HOSTS)
    log_text = (r.run_dir / "fnx.log").read_text()
    assert f"starting 2 managers: {MPI[flavor][0]} " in log_text, log_text


def map_two_hosts(fnx_env, name: str, hostfile: str) -> Path:
    """`fnx map --launcher mpiexec` (MPICH) from `hostfile`, which names fnx-host-a and
    fnx-host-b in some form: exactly one manager per host runs; returns the fake ssh's log."""
    hf = fnx_env.write(name, hostfile)
    log = fnx_env.dir / "ssh-calls.jsonl"
    d = fnx_env.dir / "barrier"
    d.mkdir()
    r = map_mpi(fnx_env, "mpich", hf, d, 2, log)
    diag = r.explain() + "\n" + tail(r.run_dir / "launcher.log") + "\n" + show_log(log)
    assert r.returncode == 0 and len(r.lines) == 2, diag
    assert (r.run_dir / "hosts").read_text() == "fnx-host-a\nfnx-host-b\n", diag
    assert sorted(manager_hosts(r).values()) == HOSTS, diag
    return log


def test_mpiexec_hostfile_duplicates_give_one_manager_per_host(fnx_env):
    """A hostfile with one line per slot (as PBS_NODEFILE has) gives one manager per distinct
    host: 5 lines over 2 hosts start 2 managers (and ssh twice), 3 lines of one host start 1."""
    log = map_two_hosts(fnx_env, "hostfile-slots",
                        "fnx-host-b\nfnx-host-a\nfnx-host-b\nfnx-host-a\nfnx-host-b\n")
    assert len(calls(log, "ssh")) == 2, show_log(log)

    one = fnx_env.write("hostfile-one", "localhost\nlocalhost\nlocalhost\n")
    inputs = [{"x": i} for i in range(4)]
    r = fnx_env.map("--launcher", "mpiexec", "--mpiexec", "mpiexec.mpich", "--hostfile",
                    str(one), "--workers", "1",
                    "--shell", 'echo rank=$PMI_RANK x={x}', inputs=inputs, timeout=60)
    diag = r.explain() + "\n" + tail(r.run_dir / "launcher.log")
    assert r.returncode == 0, diag
    res = r.by_index()
    assert {i: res[i]["result"]["stdout"] for i in res} == {
        i: f"rank=0 x={i}\n" for i in range(4)}, diag
    assert (r.run_dir / "hosts").read_text() == "localhost\n", diag
    assert list(manager_hosts(r)) == ["manager-0"], diag
    assert sorted(p.name for p in r.run_dir.glob("manager-*")) == ["manager-0"], diag


def test_mpiexec_hostfile_blank_lines_and_spaces_are_not_hosts(fnx_env):
    """`--hostfile`: a blank line or trailing blanks do not make another host. fnx counts the
    distinct trimmed non-empty lines (here 2), so the hostfile it hands to mpiexec must list
    exactly those hosts, or mpiexec starts more ranks than fnx expects managers."""
    map_two_hosts(fnx_env, "hostfile-blanks", "fnx-host-a\n\nfnx-host-b \nfnx-host-b\n")


# ---------------------------------------------------------------------------------------------
# Cobalt + aprun (recording fakes)
# ---------------------------------------------------------------------------------------------


def test_cobalt_and_aprun_through_recording_fakes(make_daemon, fnx_env):
    """A Cobalt pool submits `qsub -n 2 -t 30 -q Q -A ACC -O <blockdir>/job --mode script
    submit.sh`, polls with `qstat --header JobId:State`, and its script starts one manager per
    node with `aprun -n 2 -N 1 -d 64 -cc none`: managers block-0.0 and block-0.1 run the tasks,
    the idle block is drained (its job ends by itself), and a daemon stopped with live blocks
    qdels them, leaving no process of any job."""
    log = fnx_env.dir / "cobalt-calls.jsonl"
    state = fnx_env.dir / "cobalt-state"
    env = {"PATH": f"{FAKES / 'cobalt'}:{FAKES / 'aprun'}:{os.environ['PATH']}",
           "FNX_FAKE_LOG": str(log), "FNX_FAKE_STATE": str(state)}
    pool = {"provider": "cobalt", "launcher": "aprun", "nodes_per_block": 2,
            "cores_per_node": 64, "workers_per_node": 2, "queue": "debug-cache-quad",
            "account": "fnxproj", "walltime": "00:30:00", **FAST}
    # A second pool whose one block never starts a manager (its worker_init sleeps): the
    # daemon must qdel it at stop.
    stuck = dict(pool, nodes_per_block=1, init_blocks=1, min_blocks=1, worker_init="sleep 300")
    d = batch_daemon(make_daemon, {"knl": pool, "stuck": stuck}, env)
    runs = d.home / "runs" / "knl"
    blk = runs / "block-0"
    w = Watch(d, "knl")

    fid = d.register({"kind": "shell",
                      "command": 'echo "pe=$ALPS_APP_PE job=$COBALT_JOBID x={x}"'})
    ids = d.submit([{"function": fid, "args": {"x": i}} for i in range(6)])
    recs = w.tasks(ids, 25, blk)
    job = (blk / "job_id").read_text().strip()
    for i, t in enumerate(ids):
        out = shell_out(recs[t])
        assert re.fullmatch(rf"pe=[01] job={job} x={i}\n", out), (out, recs[t])
    diag = show_log(log) + "\n" + block_report(blk)
    assert fake_errors(log) == [], diag

    qsub = [c for c in calls(log, "qsub") if "/knl/" in c["argv"][-1]]
    assert [c["argv"] for c in qsub] == [[
        "-n", "2", "-t", "30", "-q", "debug-cache-quad", "-A", "fnxproj",
        "-O", f"{blk}/job", "--mode", "script", f"{blk}/submit.sh"]], diag
    assert json.loads((state / f"{job}.json").read_text())["argv"] == qsub[0]["argv"], diag
    sjob = (runs.parent / "stuck" / "block-0" / "job_id").read_text().strip()
    qstats = [c["argv"] for c in calls(log, "qstat")]
    assert ["--header", "JobId:State", job] in qstats, diag
    assert all(a in (["--header", "JobId:State", job], ["--header", "JobId:State", sjob])
               for a in qstats), diag
    aprun = calls(log, "aprun")
    assert len(aprun) == 1, diag
    a = aprun[0]["argv"]
    assert a[:10] == ["-n", "2", "-N", "1", "-d", "64", "-cc", "none", str(fnx_env.bin),
                      "manager"], diag
    assert a[a.index("--uid") + 1] == "block-0.{rank}" and a[a.index("--block-id") + 1] == "0", a
    assert aprun[0]["env"].get("COBALT_JOBID") == job, aprun[0]
    assert aprun[0]["cwd"] == str(blk), aprun[0]
    script = (blk / "submit.sh").read_text()
    assert f"\naprun {' '.join(a[:9])} manager " in script, script
    # Both managers register (the second may do so after the first ran all six tasks, and so
    # after the polls above: watch until it shows).
    w.until(lambda p: {"block-0.0", "block-0.1"} <= set(w.managers), 15,
            "both managers of the block registered", blk)
    assert set(w.managers) == {"block-0.0", "block-0.1"}, w.managers
    assert all(m["block"] == 0 for m in w.managers.values()), w.managers
    for k in (0, 1):
        mlog = blk / f"block-0.{k}" / "manager.log"
        assert mlog.is_file() and f"block-0.{k}" in mlog.read_text(), diag
    for name in ("job.output", "job.error", "job.cobaltlog"):
        assert (blk / name).is_file(), diag

    # Idle: drained; the script (aprun) returns and the job ends by itself.
    w.until(lambda p: w.block(0).get("phase") == "ended" and not p.get("managers"), 20,
            "block 0 drained and ended", blk)
    end = json.loads((state / f"{job}.exit").read_text())
    assert end == {"rc": 0, "leftover": [], "deleted": False}, (end, diag)
    assert calls(log, "qdel") == [], show_log(log)
    assert "block 0 is idle; draining it" in d.log_since_start(), d.log_tail()

    # A new block runs a task that never ends; the daemon stops: qdel, nothing left behind.
    g = fnx_env.dir / "gate"
    g.mkdir()
    gid = d.register({"kind": "shell", "command": GATE})
    d.submit([{"function": gid, "args": {"d": str(g), "i": 0}}])
    blk1 = runs / "block-1"
    wait_for(lambda: (g / "started-0").exists(), 20,
             lambda: f"the gate task to start\n{block_report(blk1)}\n{d.log_tail()}",
             interval=0.1)
    job1 = (blk1 / "job_id").read_text().strip()
    assert job1 != job
    d.stop()
    # The stuck job is qdel'ed, and all its processes end on SIGTERM. The busy one is qdel'ed
    # too, unless it had already ended (the stopping daemon releases its managers first).
    qdeled = [j for c in calls(log, "qdel") for j in c["argv"]]
    assert sjob in qdeled and set(qdeled) <= {sjob, job1}, show_log(log)
    assert len(qdeled) == len(set(qdeled)), show_log(log)
    notes = {e["job"]: e["sigkilled"] for e in fake_log(log)
             if e["cmd"] == "qdel" and "sigkilled" in e}
    assert notes.get(sjob) == [] and notes.get(job1, []) == [], (
        "processes of a job outlived qdel's SIGTERM by 5 s:\n" + show_log(log))
    for j in (job1, sjob):
        wait_for(lambda j=j: (state / f"{j}.exit").exists(), 10, f"job {j} to end",
                 interval=0.1)
    end = json.loads((state / f"{sjob}.exit").read_text())
    assert end["deleted"] is True and end["leftover"] == [], end
    end = json.loads((state / f"{job1}.exit").read_text())
    assert end["leftover"] == [] and (end["deleted"] or end["rc"] == 0), end
    assert not (g / "done-0").exists()
    fnx_env.assert_no_processes(lambda p: "COBALT_JOBID=" in _environ(p.pid)
                                or str(g) in p.cmdline, grace=5)
    assert fake_errors(log) == [], show_log(log)


def _environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode(
            errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# fnx config check
# ---------------------------------------------------------------------------------------------


def test_config_check_prints_batch_script_and_launch_line(fnx_env):
    """The dry run prints, per batch pool, the script of block 0 (directives, worker_init, the
    launch line) and the launch line; it submits nothing and creates nothing. A bad file exits
    2 and names every bad key by its path."""
    data = fnx_env.dir / "site-data"
    cfg = fnx_env.write("site.toml", to_toml({
        "daemon": {"data_dir": str(data), "listen": "127.0.0.1:18470"},
        "interchange": {"address": "127.0.0.1", "port": 54000},
        "pools": {
            "cpu": {"provider": "slurm", "nodes_per_block": 2, "partition": "debug",
                    "account": "m1234", "walltime": "01:00:00", "cores_per_node": 4,
                    "worker_init": "module load python\nexport FNX_CHECK=cpu",
                    "scheduler_options": "#SBATCH --mail-type=NONE"},
            "gpu": {"provider": "pbs", "mpiexec": "mpiexec.mpich", "nodes_per_block": 2,
                    "queue": "debug", "account": "proj", "cores_per_node": 32,
                    "gpus_per_node": 4, "launcher_options": "--cpu-bind depth",
                    "worker_init": "source /opt/env/bin/activate",
                    "scheduler_options": "#PBS -l filesystems=home:eagle"},
            "knl": {"provider": "cobalt", "nodes_per_block": 2, "cores_per_node": 64,
                    "queue": "debug-cache-quad", "account": "fnxproj",
                    "walltime": "00:30:00", "worker_init": "module load conda"},
        },
    }))
    log = fnx_env.dir / "calls.jsonl"
    env = dict(fnx_env.env, FNX_FAKE_LOG=str(log), FNX_FAKE_STATE=str(fnx_env.dir / "state"),
               PATH=f"{FAKES / 'passthrough'}:{FAKES / 'aprun'}:{os.environ['PATH']}")
    r = fnx_env.fnx("config", "check", str(cfg), env=env)
    out = r.stdout
    assert r.returncode == 0, (r.returncode, out, r.stderr)
    fnx = str(fnx_env.bin)

    def section(pool: str) -> str:
        m = re.search(rf"--- pool {pool}: batch script of block 0 .*?(?=\n  pool |\Z)", out,
                      re.S)
        assert m, f"no batch script for pool {pool}:\n{out}"
        return m.group(0)

    runs = data / "runs"
    cpu = section("cpu")
    for want in ["#SBATCH --job-name=fnx.cpu.block-0\n", "#SBATCH --nodes=2\n",
                 "#SBATCH --time=01:00:00\n", "#SBATCH --account=m1234\n",
                 "#SBATCH --partition=debug\n", "#SBATCH --mail-type=NONE\n",
                 f"#SBATCH --error={runs}/cpu/block-0/job.err\n",
                 "\nmodule load python\nexport FNX_CHECK=cpu\n",
                 "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 ", "--cpus-per-task=4 ",
                 f"{fnx} manager --interchange tcp://127.0.0.1:54000 ",
                 "--uid 'block-0.{rank}'", "--- pool cpu: manager launch line ---\nsrun "]:
        assert want in cpu, f"{want!r} missing from pool cpu:\n{cpu}"
    assert cpu.index("#SBATCH --account") < cpu.index("#SBATCH --mail-type"), cpu
    gpu = section("gpu")
    for want in ["#PBS -N fnx.gpu.block-0\n", "#PBS -l select=2:ncpus=32:ngpus=4\n",
                 "#PBS -l walltime=00:30:00\n", "#PBS -q debug\n", "#PBS -A proj\n",
                 "#PBS -l filesystems=home:eagle\n", "\nsource /opt/env/bin/activate\n",
                 f'mpiexec.mpich -n "$FNX_NODES" $FNX_MPI_ARGS {runs}/gpu/block-0/hosts '
                 f"--cpu-bind depth {fnx} manager --interchange tcp://127.0.0.1:54001 ",
                 "--- pool gpu: manager launch line ---\nmpiexec.mpich "]:
        assert want in gpu, f"{want!r} missing from pool gpu:\n{gpu}"
    knl = section("knl")
    for want in ["\nmodule load conda\n",
                 f"aprun -n 2 -N 1 -d 64 -cc none {fnx} manager --interchange "
                 "tcp://127.0.0.1:54002 ", "--- pool knl: manager launch line ---\naprun -n 2 "]:
        assert want in knl, f"{want!r} missing from pool knl:\n{knl}"
    assert "#SBATCH" not in knl and "#PBS" not in knl, knl
    for s in (cpu, gpu, knl):  # worker_init comes before the launch line
        launch = s.index("manager --interchange")
        assert s.rfind("# worker_init", 0, launch) != -1, s
    assert not log.exists(), "config check ran batch commands:\n" + show_log(log)
    assert not data.exists(), f"config check created {data}"

    bad = fnx_env.write("bad.toml", to_toml({
        "daemon": {"data_dir": str(data), "listen": "127.0.0.1:18471"},
        "interchange": {"address": "0.0.0.0", "port": 54000},
        "pools": {"p": {"provider": "pbs", "parallelism": 2, "walltime": "1h",
                        "partition": "debug"}},
    }))
    r = fnx_env.fnx("config", "check", str(bad), env=env)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    text = r.stdout + r.stderr
    for key in ("pools.p.parallelism", "pools.p.walltime", "pools.p.partition",
                "pools.p.address"):
        assert key in text, f"{key} not named:\n{text}"
    assert "1h" in text and "0.0.0.0" in text, text
    assert not log.exists() and not data.exists()


# ---------------------------------------------------------------------------------------------
# FAULTS.md 30: a batch system that hangs or answers garbage
# ---------------------------------------------------------------------------------------------


def test_fault_30_an_sbatch_that_hangs_or_answers_garbage_is_reported_with_backoff(
        make_daemon, fnx_env, tmp_path):
    """`sbatch` answering nonsense, then hanging: each failure shows in the pool's
    `submit_error` (and `fnx status`) with what it said or that it timed out; submissions back
    off (5 s, then 10 s, ...) instead of hammering the scheduler; the API stays responsive while
    a submission hangs. A stand-in `sbatch` (real Slurm never does this on purpose) records
    each call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls"
    mode = tmp_path / "sbatch-mode"
    mode.write_text("garbage")
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
date +%s.%N >> '{calls}'
if [ "$(cat '{mode}')" = hang ]; then exec sleep 1000; fi
echo 'Submitted a batch of bananas'
""")
    (bin_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    d = batch_daemon(make_daemon, {"cpu": {
        "provider": "slurm", "nodes_per_block": 1, "workers_per_node": 1, "min_blocks": 1,
        "max_blocks": 1, "submit_timeout_s": 2, "scaling_interval_s": 0.2}}, env=env)

    def pool() -> dict:
        return d.status()["pools"][0]

    p = wait_for(lambda: pool().get("submit_error") and pool(), 20, "the garbage in status")
    assert "Submitted a batch of bananas" in p["submit_error"], p
    out = d.fnx("status").stdout
    assert "cannot submit blocks: " in out and "bananas" in out, out
    mode.write_text("hang")
    first = len(calls.read_text().split())
    wait_for(lambda: len(calls.read_text().split()) > first, 30, "a submission that hangs")
    # While sbatch hangs, the API answers at once.
    t0 = time.monotonic()
    assert d.api("GET", "/v1/health", token=None).status == 200
    assert time.monotonic() - t0 < 1.0
    p = wait_for(lambda: "did not finish within" in (pool().get("submit_error") or "")
                 and pool(), 30, "the timeout in status")
    assert "did not finish within 2s and was killed" in p["submit_error"], p
    # Backoff: the gaps between calls grow (5 s, 10 s, ...), never a call per scaling tick.
    wait_for(lambda: len(calls.read_text().split()) >= 3, 60, "three submissions")
    times = [float(t) for t in calls.read_text().split()]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= 4.5 for g in gaps), gaps
    assert gaps[-1] > gaps[0], gaps
