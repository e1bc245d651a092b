"""Worker placement on this machine (issue 5, must-show 1): for each `cpu_affinity` policy the
real workers' affinity, read from /proc/self/status inside the worker process, and their
OpenMP / GPU environment match the plan; `fnx manager --print-plan` shows it. The plans
themselves are unit-tested on fixed topologies (sys/tests/placement_fixtures.rs)."""

from __future__ import annotations

import os

import pytest

ALLOWED = sorted(os.sched_getaffinity(0))

# A Python task that waits until both tasks of the run have started (so both worker slots are
# in use at once), then reports what its worker process is bound to and sees.
PROBE = """
import os, time

def probe(marks, i):
    open(os.path.join(marks, str(i)), "w").close()
    deadline = time.time() + 20
    while len(os.listdir(marks)) < 2 and time.time() < deadline:
        time.sleep(0.01)
    status = open("/proc/self/status").read()
    allowed = next(l.split(":", 1)[1].strip() for l in status.splitlines()
                   if l.startswith("Cpus_allowed_list"))
    env = {k: os.environ.get(k) for k in ("FNX_WORKER_SLOT", "OMP_NUM_THREADS", "OMP_PLACES",
                                           "GOMP_CPU_AFFINITY", "KMP_AFFINITY",
                                           "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                                           "ZE_AFFINITY_MASK")}
    return {"allowed": allowed, "env": env}
"""


def cpus(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def run_probe(fnx_env, tmp_path, *flags: str) -> dict[str, dict]:
    """Two probe tasks on 2 workers; their reports keyed by worker slot."""
    if len(ALLOWED) < 2:
        pytest.fail(f"this test needs 2 CPUs, the test process may use {ALLOWED}")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    marks = tmp_path / f"marks{len(list(tmp_path.iterdir()))}"
    marks.mkdir()
    r = fnx_env.map(f"{probe}:probe", "--workers", "2", *flags,
                    inputs=[[str(marks), i] for i in range(2)], timeout=60)
    assert r.returncode == 0, r.explain()
    reports = [line["result"] for line in r.lines]
    by_slot = {rep["env"]["FNX_WORKER_SLOT"]: rep for rep in reports}
    assert sorted(by_slot) == ["0", "1"], f"both slots ran: {reports}"
    return by_slot


@pytest.mark.parametrize("policy", ["block", "block-reverse", "alternating", "numa"])
def test_each_policy_binds_each_worker_to_its_own_cpus(fnx_env, tmp_path, policy):
    s = run_probe(fnx_env, tmp_path, "--cpu-affinity", policy)
    got = {slot: cpus(rep["allowed"]) for slot, rep in s.items()}
    assert set(got["0"]).isdisjoint(got["1"]), got
    assert set(got["0"]) | set(got["1"]) <= set(ALLOWED), got
    if policy == "block-reverse":
        assert min(got["0"]) > min(got["1"]), f"slot 0 takes the last cores: {got}"
    else:
        assert min(got["0"]) < min(got["1"]), f"slot 0 takes the first cores: {got}"
    for slot, rep in s.items():
        e, mine = rep["env"], got[slot]
        assert e["OMP_NUM_THREADS"] == str(len(mine)), rep
        assert e["OMP_PLACES"] == ",".join(f"{{{c}}}" for c in e["GOMP_CPU_AFFINITY"].split()), rep
        assert sorted(int(c) for c in e["GOMP_CPU_AFFINITY"].split()) == mine, rep
        assert e["KMP_AFFINITY"].startswith("explicit,proclist=["), rep
        assert e["CUDA_VISIBLE_DEVICES"] is None, "no accelerators given"


def test_explicit_lists_and_none(fnx_env, tmp_path):
    a, b = ALLOWED[0], ALLOWED[1]
    s = run_probe(fnx_env, tmp_path, "--cpu-affinity", f"list:{b}:{a}")
    assert cpus(s["0"]["allowed"]) == [b] and cpus(s["1"]["allowed"]) == [a], s
    s = run_probe(fnx_env, tmp_path, "--cpu-affinity", "none")
    for rep in s.values():
        assert cpus(rep["allowed"]) == ALLOWED, "not bound"
        assert rep["env"]["OMP_NUM_THREADS"] is None, rep


def test_gpus_are_shared_out_and_several_workers_may_share_one(fnx_env, tmp_path):
    s = run_probe(fnx_env, tmp_path, "--cpu-affinity", "block", "--accelerators", "0,1,2,3")
    for slot, want in (("0", "0,1"), ("1", "2,3")):
        e = s[slot]["env"]
        assert (e["CUDA_VISIBLE_DEVICES"], e["ROCR_VISIBLE_DEVICES"], e["ZE_AFFINITY_MASK"]) \
            == (want, want, want), e
    s = run_probe(fnx_env, tmp_path, "--accelerators", "7")
    assert [s[k]["env"]["CUDA_VISIBLE_DEVICES"] for k in ("0", "1")] == ["7", "7"], s


def test_shell_tasks_get_the_same_placement(fnx_env, tmp_path):
    r = fnx_env.map("--workers", "2", "--cpu-affinity", "block-reverse", "--shell",
                    "grep Cpus_allowed_list /proc/self/status; echo slot=$FNX_WORKER_SLOT",
                    inputs=[{} for _ in range(4)], timeout=60)
    assert r.returncode == 0, r.explain()
    seen = {}
    for line in r.lines:
        out = line["result"]["stdout"].split()
        seen.setdefault(out[-1], set()).add(out[1])
    for slot, allowed in seen.items():
        assert len(allowed) == 1, f"a slot's tasks always get the same CPUs: {seen}"
    if "slot=0" in seen:
        assert cpus(seen["slot=0"].pop()) == [ALLOWED[-1]], seen


def test_print_plan_and_bad_policies(fnx_env):
    r = fnx_env.fnx("manager", "--print-plan", "--cpu-affinity", "block", "--slots", "2")
    assert r.returncode == 0, r.stderr
    assert "cpu_affinity: block; 2 worker slots" in r.stdout, r.stdout
    assert "slot 0: CPUs" in r.stdout and "slot 1: CPUs" in r.stdout, r.stdout
    fixture = os.path.join(os.path.dirname(__file__), "..", "..", "sys", "tests", "fixtures",
                           "polaris.xml")
    r = fnx_env.fnx("manager", "--print-plan", "--topology", fixture, "--cpu-affinity",
                    "block", "--slots", "4", "--accelerators", "0,1,2,3")
    assert r.returncode == 0, r.stderr
    assert "32 cores, 64 hardware threads" in r.stdout, r.stdout
    assert "slot 3: CPUs 24-31,56-63 (8 cores); accelerators 3" in r.stdout, r.stdout
    r = fnx_env.fnx("manager", "--print-plan", "--cpu-affinity", "block", "--slots", "999")
    assert r.returncode == 2 and "999 workers" in r.stderr, r.stderr
    r = fnx_env.map("--shell", "true", "--cpu-affinity", "sideways", inputs=[{}])
    assert r.returncode == 2 and "sideways" in r.stderr, r.explain()


def test_local_managers_split_the_cores_between_them(fnx_env, tmp_path):
    """Two managers on one host with pinning: each gets its own block of cores, so their
    slot-0 workers are not pinned to the same CPU."""
    if len(ALLOWED) < 2:
        pytest.fail(f"this test needs 2 CPUs, the test process may use {ALLOWED}")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    marks = tmp_path / "marks"
    marks.mkdir()
    r = fnx_env.map(f"{probe}:probe", "--managers", "2", "--workers", "1", "--prefetch", "0",
                    "--cpu-affinity", "block", inputs=[[str(marks), i] for i in range(2)],
                    timeout=60)
    assert r.returncode == 0, r.explain()
    got = [cpus(line["result"]["allowed"]) for line in r.lines]
    assert len(got) == 2 and set(got[0]).isdisjoint(got[1]), got
