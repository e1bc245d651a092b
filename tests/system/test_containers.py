"""Workers and shell tasks inside containers (issue 5, "Containers"; must-show 2, first part):
bubblewrap as a real sandboxing runtime through the `custom` template, and the `apptainer`
runtime through a recording fake (Apptainer cannot be installed here) that checks its arguments
and runs the command under bubblewrap. A missing runtime fails the tasks with an error naming
it: nothing runs outside the container silently."""

from __future__ import annotations

import json
import os
from pathlib import Path

FAKES = Path(__file__).parent / "fakes"
BWRAP = ("bwrap --ro-bind / / --dev /dev --proc /proc --bind {rundir} {rundir} "
         "--unshare-pid --die-with-parent {cmd}")
PROBE = """
import os

def probe(i):
    try:
        open("/usr/fnx-probe-%d" % i, "w")
        writable_root = True
    except OSError:
        writable_root = False
    return {"i": i, "pid": os.getpid(), "pid1": open("/proc/1/cmdline").read().split("\\0")[0],
            "writable_root": writable_root, "image": os.environ.get("FAKE_APPTAINER_IMAGE")}
"""


def probe_file(tmp_path: Path) -> Path:
    f = tmp_path / "probe.py"
    f.write_text(PROBE)
    return f


def assert_inside(result: dict, pid1: str = "bwrap") -> None:
    assert result["pid1"] == pid1, f"PID 1 of the task's namespace is {result['pid1']}"
    assert result["pid"] < 10, f"the worker runs in its own PID namespace: {result}"
    assert not result["writable_root"], "the host's /usr is read-only inside"


def test_python_and_shell_tasks_run_inside_bubblewrap(fnx_env, tmp_path):
    r = fnx_env.map(f"{probe_file(tmp_path)}:probe", "--workers", "2",
                    "--container-runtime", "custom", "--container-template", BWRAP,
                    inputs=[[i] for i in range(6)], timeout=60)
    assert r.returncode == 0, r.explain()
    for line in r.lines:
        assert_inside(line["result"])
    # Worker logs still land in the run directory (bound into the sandbox).
    assert list(r.run_dir.glob("manager-0/worker-*.log")), sorted(r.run_dir.rglob("*"))
    r = fnx_env.map("--shell", "echo pid=$$; touch /usr/fnx-x 2>&1 || echo denied",
                    "--container-runtime", "custom", "--container-template", BWRAP,
                    inputs=[{}], timeout=60)
    assert r.returncode == 0, r.explain()
    out = r.lines[0]["result"]["stdout"]
    assert "pid=2" in out and "Read-only file system" in out, out
    assert not os.path.exists("/usr/fnx-x")


def test_apptainer_runtime_through_a_recording_fake(fnx_env, tmp_path):
    image = tmp_path / "python.sif"
    image.write_bytes(b"SIF fake image")
    log = tmp_path / "apptainer-calls.jsonl"
    env = dict(fnx_env.env, PATH=f"{FAKES / 'apptainer'}:{fnx_env.env['PATH']}",
               FNX_FAKE_LOG=str(log))
    r = fnx_env.fnx("run", f"{probe_file(tmp_path)}:probe", "--container-runtime", "apptainer",
                    "--container-image", str(image), "--", "[7]", env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert_inside(result)
    assert result["image"] == str(image)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert not [c for c in calls if "error" in c], calls
    [call] = [c for c in calls if c.get("argv")]
    argv = call["argv"]
    assert argv[:2] == ["exec", "--bind"], argv
    assert argv[3] == str(image), argv
    assert argv[4:7] == ["python3", "-u", "-B"] and argv[7].endswith("fnx_worker.py"), argv
    assert argv[7].startswith(argv[2]), "the worker runtime is inside the bound run directory"


def test_a_missing_runtime_or_image_fails_the_task_naming_it(fnx_env, tmp_path):
    env = dict(fnx_env.env, PATH="/usr/bin:/bin")
    r = fnx_env.fnx("run", "--shell", "echo outside", "--container-runtime", "apptainer",
                    "--container-image", "/x.sif", "--", "{}", env=env, timeout=60)
    assert r.returncode != 0 and "outside" not in r.stdout, (r.stdout, r.stderr)
    assert "cannot start apptainer" in r.stdout + r.stderr, (r.stdout, r.stderr)
    log = tmp_path / "calls.jsonl"
    env = dict(fnx_env.env, PATH=f"{FAKES / 'apptainer'}:{fnx_env.env['PATH']}",
               FNX_FAKE_LOG=str(log))
    r = fnx_env.fnx("run", "--shell", "echo outside", "--container-runtime", "apptainer",
                    "--container-image", str(tmp_path / "missing.sif"), "--", "{}", env=env,
                    timeout=60)
    assert r.returncode != 0 and "could not open image" in r.stdout + r.stderr, (r.stdout,
                                                                                  r.stderr)
    r = fnx_env.map("--shell", "true", "--container-runtime", "custom",
                    "--container-template", "bwrap --ro-bind / / sh -c '{cmd}'", inputs=[{}])
    assert r.returncode == 2 and "{cmd}" in r.stderr, r.explain()


def test_a_daemon_pool_runs_its_tasks_in_its_container(make_daemon, tmp_path):
    d = make_daemon(pools={"local": {"workers_per_manager": 1, "container_runtime": "custom",
                                     "container_template": BWRAP}})
    fid = d.register({"kind": "shell", "command": "echo pid=$$"})
    [tid] = d.submit([{"function": fid, "args": {}}])
    rec = d.wait_task(tid, timeout=30)
    assert rec["state"] == "success" and rec["result"]["value"]["stdout"] == "pid=2\n", rec
