"""Functions with dependencies: the daemon writes an Apptainer definition from them, builds the
image in the background with `apptainer build` (the recording fake in fakes/apptainer, which
checks the definition and writes the image), caches it by the definition's SHA-256, holds the
function's tasks until the image exists and then runs them inside it (the pool's workers start
through `apptainer exec ... IMAGE`; the fake gives the task FAKE_APPTAINER_IMAGE). A failed
build fails the held tasks naming its log; a daemon that cannot build refuses the registration;
bad dependencies are refused naming the item; a build interrupted by a restart starts again.

Tests that must see a build in progress put a gate in front of the fake (`gated`): an `apptainer`
earlier on PATH whose `build` notes its pid in `gate/waiting` and waits for the file `gate/open`
before it execs the fake, so "the build runs" is a state the test controls, not a duration
(while the file `gate/fail` exists, its text is the fake's FAKE_APPTAINER_BUILD_FAIL). Everything
else goes straight to the fake."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from conftest import read_proc, wait_for
from daemon_env import error_of, result_value, short

FAKES = Path(__file__).parent / "fakes"
HEADER = ("# fnx image: written from a function's dependencies; do not edit "
          "(the cache key is this file's SHA-256)")
WHERE = """
import os

def where(i):
    return [i, os.environ.get("FAKE_APPTAINER_IMAGE")]
"""
# Workers start inside functions' own images: the pool names the runtime only.
POOLS = {"local": {"workers_per_manager": 2, "container_runtime": "apptainer"}}
# The daemon's environment reaches user code only as the site lists (the fake runtime, started
# by the managers, records its calls in $FNX_FAKE_LOG).
PASS_FAKE_LOG = {"pass_env": ["FNX_TEST_MARK", "FNX_FAKE_LOG"]}


def fake_env(tmp_path: Path, **extra: str) -> tuple[dict, Path]:
    """Daemon environment with the fake apptainer first on PATH; and the fake's call log."""
    log = tmp_path / "apptainer-calls.jsonl"
    env = {"PATH": f"{FAKES / 'apptainer'}:{os.environ['PATH']}", "FNX_FAKE_LOG": str(log)}
    env.update(extra)
    return env, log


class Gate:
    """The gate in front of the fake's `build` (see the module's docstring)."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path / "gate"
        self.dir.mkdir()
        self.bin = tmp_path / "gated-bin"
        self.bin.mkdir()
        script = self.bin / "apptainer"
        script.write_text(f"""#!/bin/sh
if [ "$1" = build ]; then
    echo $$ >> '{self.dir}/waiting'
    while [ ! -e '{self.dir}/open' ]; do sleep 0.05; done
    if [ -e '{self.dir}/fail' ]; then
        FAKE_APPTAINER_BUILD_FAIL=$(cat '{self.dir}/fail')
        export FAKE_APPTAINER_BUILD_FAIL
    fi
fi
exec '{FAKES / "apptainer" / "apptainer"}' "$@"
""")
        script.chmod(0o755)

    def waiting(self) -> list[int]:
        """Pids of the builds that reached the gate (in order)."""
        try:
            return [int(x) for x in (self.dir / "waiting").read_text().split()]
        except FileNotFoundError:
            return []

    def wait_for_builds(self, n: int, d, timeout: float = 20) -> list[int]:
        wait_for(lambda: len(self.waiting()) >= n, timeout,
                 lambda: f"{n} build(s) at the gate (have {self.waiting()})\n{d.log_tail()}")
        return self.waiting()

    def open(self) -> None:
        (self.dir / "open").touch()

    def close(self) -> None:
        (self.dir / "open").unlink()

    def fail(self, why: str | None) -> None:
        """Builds from now on fail with `why` (None: they succeed)."""
        if why is None:
            (self.dir / "fail").unlink()
        else:
            (self.dir / "fail").write_text(why)


def gated(tmp_path: Path, **extra: str) -> tuple[dict, Path, Gate]:
    """Like fake_env, with the gate first on PATH."""
    env, log = fake_env(tmp_path, **extra)
    gate = Gate(tmp_path)
    env["PATH"] = f"{gate.bin}:{env['PATH']}"
    return env, log, gate


def alive(pid: int) -> bool:
    p = read_proc(pid)
    return p is not None and p.state not in ("Z", "X")


def calls(log: Path) -> list[dict]:
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def build_calls(log: Path) -> list[dict]:
    return [c for c in calls(log) if c.get("argv", [None])[0] == "build"]


def exec_calls(log: Path) -> list[dict]:
    return [c for c in calls(log) if c.get("argv", [None])[0] == "exec"]


def refusals(log: Path) -> list[dict]:
    return [c for c in calls(log) if "error" in c]


def where_fn(deps: dict, name: str = "where") -> dict:
    return {"kind": "python", "name": name, "entry": "where", "source": WHERE,
            "dependencies": deps}


def register(d, spec: dict) -> dict:
    """POST /v1/functions; the 201 body."""
    r = d.api("POST", "/v1/functions", spec)
    assert r.status == 201, f"register {spec}: {r.status} {short(r.body)}\n{d.log_tail()}"
    return r.body


def function(d, fid) -> dict:
    r = d.api("GET", f"/v1/functions/{fid}")
    assert r.status == 200, f"GET function {fid}: {r.status} {short(r.body)}"
    return r.body


def wait_build(d, fid, timeout: float = 30) -> dict:
    """The function's record once its build has ended (ready or failed)."""
    box = {}

    def ended():
        box["f"] = function(d, fid)
        return box["f"]["build"]["state"] in ("ready", "failed")

    wait_for(ended, timeout, lambda: f"the build of function {fid} to end: "
             f"{box.get('f', {}).get('build')}\n{d.log_tail()}")
    return box["f"]


def held(d) -> int:
    return sum(p["held_for_images"] for p in d.status()["pools"])


def expected_definition(base: str, python: list[str], system: list[str]) -> str:
    """The definition file, written out by hand from the issue's description."""
    text = f"{HEADER}\nBootstrap: docker\nFrom: {base}\n\n%post\n    set -e\n"
    if system:
        text += ("    export DEBIAN_FRONTEND=noninteractive\n    apt-get update\n"
                 "    apt-get install -y --no-install-recommends "
                 + " ".join(f"'{p}'" for p in system) + "\n"
                 "    rm -rf /var/lib/apt/lists/*\n")
    if python:
        text += ("    python3 -m pip install --no-cache-dir "
                 + " ".join(f"'{p}'" for p in python) + "\n")
    text += "\n%labels\n"
    if python:
        text += f"    fnx.dependencies.python {' '.join(python)}\n"
    if system:
        text += f"    fnx.dependencies.system {' '.join(system)}\n"
    return text


def assert_ran_in(d, tids: list[int], image: str, log: Path, timeout: float = 30) -> None:
    """The tasks succeeded inside `image`, and every worker start went through it."""
    recs = d.wait_all(tids, timeout=timeout)
    for i, tid in enumerate(tids):
        rec = recs[tid]
        assert rec["state"] == "success", f"{rec}\n{d.log_tail()}"
        assert result_value(rec) == [i, image], rec
    execs = exec_calls(log)
    assert execs, calls(log)
    for c in execs:
        argv = c["argv"]
        assert argv[1] == "--bind" and argv[3] == image, argv
        assert argv[4:7] == ["python3", "-u", "-B"] and argv[7].endswith("fnx_worker.py"), argv
    assert not refusals(log), refusals(log)


# ---------------------------------------------------------------------------------------------


def test_the_definition_is_written_built_once_and_a_second_registration_hits_the_cache(
        make_daemon, tmp_path):
    env, log = fake_env(tmp_path)
    d = make_daemon(pools=POOLS, daemon=PASS_FAKE_LOG, env=env)
    body = register(d, where_fn({"python": ["SciPy", "numpy >= 1.26", "Foo_Bar.baz", "scipy"],
                                 "system": ["LibGOMP1", "zlib1g=1:1.2.13"]}))
    fid, build = body["id"], body["build"]
    python = ["foo-bar-baz", "numpy>=1.26", "scipy"]
    system = ["libgomp1", "zlib1g=1:1.2.13"]
    assert body["dependencies"] == {"python": python, "system": system}, body
    key = build["key"]
    cache = d.home / "images" / key
    image = str(cache / "image.sif")
    assert body["container"] == {"image": image, "runtime": "apptainer"}, body
    assert build["state"] in ("building", "ready"), build
    assert build["image"] == image and build["definition"] == str(cache / "image.def"), build
    assert build["log"] == str(cache / "build.log"), build

    # The definition: exactly the recipe of the normalised dependencies on the default base,
    # and the key is its SHA-256.
    text = (cache / "image.def").read_text()
    assert text == expected_definition("python:3.11-slim", python, system), text
    assert hashlib.sha256(text.encode()).hexdigest() == key

    done = wait_build(d, fid)
    assert done["build"]["state"] == "ready" and done["build"]["error"] is None, done["build"]
    assert done["build"]["started"] <= done["build"]["finished"], done["build"]
    assert done["container"] == body["container"] and done["dependencies"] == body["dependencies"]
    # The build command's argv, and what the fake wrote from the definition it was given.
    [b] = build_calls(log)
    assert b["argv"] == ["build", "--fakeroot", str(cache / "image.sif.part"),
                         str(cache / "image.def")], b
    assert Path(image).read_text() == "FAKE SIF\n" + text
    assert not (cache / "image.sif.part").exists()
    assert json.loads((cache / "state.json").read_text())["state"] == "ready"
    build_log = (cache / "build.log").read_text()
    assert build_log.startswith("# fnx: [") and f"Build complete: {cache}/image.sif.part" in \
        build_log, build_log

    # The same dependencies in another order, case and spelling: the same key, ready at once,
    # and no second build.
    again = register(d, where_fn({"system": ["zlib1g=1:1.2.13", "libgomp1"],
                                  "python": ["scipy", "FOO.bar_baz", "NumPy>=1.26"]}, "again"))
    assert again["id"] != fid
    assert again["build"]["key"] == key and again["build"]["state"] == "ready", again["build"]
    assert again["container"] == body["container"], again
    assert again["dependencies"] == body["dependencies"], again
    assert len(build_calls(log)) == 1, build_calls(log)
    assert (cache / "image.def").read_text() == text
    # Both functions' tasks run in that one image.
    tids = d.submit([{"function": again["id"], "args": [i]} for i in range(3)])
    assert_ran_in(d, tids, image, log)
    tids = d.submit([{"function": fid, "args": [i]} for i in range(2)])
    assert_ran_in(d, tids, image, log)
    assert len(build_calls(log)) == 1, build_calls(log)

    # Different dependencies are a different image.
    other = register(d, where_fn({"python": ["numpy>=1.26", "scipy"]}, "other"))
    assert other["build"]["key"] != key, other
    assert wait_build(d, other["id"])["build"]["state"] == "ready"
    assert len(build_calls(log)) == 2, build_calls(log)
    other_def = Path(other["build"]["definition"]).read_text()
    assert other_def == expected_definition("python:3.11-slim", ["numpy>=1.26", "scipy"], [])


def test_tasks_submitted_during_the_build_wait_and_then_run_in_the_image(make_daemon, tmp_path):
    env, log, gate = gated(tmp_path)
    d = make_daemon(pools=POOLS, daemon=PASS_FAKE_LOG, env=env)
    body = register(d, where_fn({"python": ["requests"]}))
    fid, image = body["id"], body["container"]["image"]
    assert body["build"]["state"] == "building", body["build"]
    tids = d.submit([{"function": fid, "args": [i]} for i in range(4)])
    gate.wait_for_builds(1, d)
    # The build is held at the gate: the tasks are accepted and wait, held for the image; no
    # worker has started (in any image).
    assert function(d, fid)["build"]["state"] == "building"
    wait_for(lambda: held(d) == 4, 10, lambda: f"4 held tasks: {d.status()['pools']}")
    assert all(t["state"] == "queued" for t in d.statuses(tids)), d.statuses(tids)
    # Each says why it waits, naming the build's log.
    why = d.task(tids[0]).get("waiting") or ""
    assert "image is being built" in why and body["build"]["log"] in why, d.task(tids[0])
    assert not exec_calls(log) and not Path(image).exists(), calls(log)
    gate.open()
    assert_ran_in(d, tids, image, log)
    build = function(d, fid)["build"]
    assert build["state"] == "ready", build
    # Every worker started in the image after the build had ended.
    for c in exec_calls(log):
        assert c["time"] >= build["finished"] - 0.05, (c, build)
    assert held(d) == 0
    assert len(build_calls(log)) == 1
    assert "waiting" not in d.task(tids[0])


def test_concurrent_registrations_of_the_same_dependencies_share_one_build(make_daemon,
                                                                            tmp_path):
    env, log, gate = gated(tmp_path, FAKE_APPTAINER_BUILD_SECONDS="1")
    cache = tmp_path / "image-cache"
    d = make_daemon(pools=POOLS, daemon=PASS_FAKE_LOG, env=env,
                    builds={"dir": str(cache), "base_image": "python:3.12-slim"})
    specs = [where_fn({"python": ["pandas", "NumPy"], "system": ["curl"]}, "a"),
             where_fn({"python": ["numpy", "Pandas", "numpy"], "system": [" CURL "]}, "b")]
    barrier = threading.Barrier(len(specs))
    answers: list = [None] * len(specs)

    def go(k):
        barrier.wait()
        answers[k] = d.api("POST", "/v1/functions", specs[k])

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for a in answers:
        assert a is not None and a.status == 201, f"{answers}\n{d.log_tail()}"
    a, b = (r.body for r in answers)
    assert a["id"] != b["id"]
    assert a["build"]["key"] == b["build"]["key"], (a["build"], b["build"])
    # Both answered while the one build was held at the gate: the second joined it.
    assert a["build"]["state"] == b["build"]["state"] == "building", (a["build"], b["build"])
    key = a["build"]["key"]
    image = str(cache / key / "image.sif")
    assert a["container"] == b["container"] == {"image": image, "runtime": "apptainer"}
    text = (cache / key / "image.def").read_text()
    assert text == expected_definition("python:3.12-slim", ["numpy", "pandas"], ["curl"]), text
    tids = d.submit([{"function": (a, b)[i % 2]["id"], "args": [i]} for i in range(6)])
    gate.wait_for_builds(1, d)
    wait_for(lambda: held(d) == 6, 10, lambda: f"6 held tasks: {d.status()['pools']}")
    gate.open()
    assert_ran_in(d, tids, image, log)
    assert len(gate.waiting()) == 1, gate.waiting()
    assert len(build_calls(log)) == 1, build_calls(log)
    for f in (a, b):
        assert function(d, f["id"])["build"]["state"] == "ready"
    # The cache is where [builds] dir says, nothing under the data directory.
    assert not (d.home / "images").exists(), list((d.home / "images").rglob("*"))


def test_a_failed_build_fails_the_held_tasks_naming_its_log(make_daemon, tmp_path):
    why = "ERROR: No matching distribution found for nosuchpkg==9.9"
    env, log, gate = gated(tmp_path)
    gate.fail(why)
    d = make_daemon(pools=POOLS, daemon=PASS_FAKE_LOG, env=env)
    body = register(d, where_fn({"python": ["nosuchpkg==9.9"]}))
    fid, build = body["id"], body["build"]
    tids = d.submit([{"function": fid, "args": [i]} for i in range(3)])
    gate.wait_for_builds(1, d)
    wait_for(lambda: held(d) == 3, 10, lambda: f"3 held tasks: {d.status()['pools']}")
    gate.open()
    recs = d.wait_all(tids, timeout=30)
    for rec in recs.values():
        assert rec["state"] == "failed", rec
        err = rec["error"]
        assert err["type"] == "ImageBuildFailed", err
        assert why in err["message"] and build["log"] in err["message"], err
    f = function(d, fid)["build"]
    assert f["state"] == "failed" and why in f["error"], f
    assert f["finished"] is not None
    build_log = Path(build["log"]).read_text()
    assert why in build_log and "# fnx: [" in build_log, build_log
    assert not Path(build["image"]).exists() and not Path(build["image"] + ".part").exists()
    assert json.loads((Path(build["log"]).parent / "state.json").read_text())["state"] == \
        "failed"
    assert not exec_calls(log), "nothing ran without its image"
    assert held(d) == 0

    # New submissions are refused, naming the failure; a restart does not change that (nor
    # does it build again).
    for restart in (False, True):
        if restart:
            d.stop()
            d.start()
            assert function(d, fid)["build"]["state"] == "failed"
        r = d.api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": [9]}]})
        msg = error_of(r, 400, "bad_request")
        assert why in msg, msg
    assert len(build_calls(log)) == 1, build_calls(log)

    # Registering the same dependencies again builds again (and fails again here).
    again = register(d, where_fn({"python": ["NoSuchPkg == 9.9"]}, "again"))
    assert again["build"]["key"] == build["key"]
    assert again["build"]["state"] == "building", again["build"]
    assert wait_build(d, again["id"])["build"]["state"] == "failed"
    assert len(build_calls(log)) == 2, build_calls(log)
    assert Path(build["log"]).read_text().count("# fnx: [") == 2

    # Once the cause is gone, registering again builds the image. Tasks of the older functions
    # with these dependencies, submitted while it builds, wait for it like the new function's;
    # all run in the image.
    gate.fail(None)
    gate.close()
    fixed = register(d, where_fn({"python": ["nosuchpkg==9.9"]}, "fixed"))
    assert fixed["build"]["key"] == build["key"]
    assert fixed["build"]["state"] == "building", fixed["build"]
    gate.wait_for_builds(3, d)
    order = [fixed["id"], fid, again["id"]]
    tids = d.submit([{"function": order[i % 3], "args": [i]} for i in range(6)])
    wait_for(lambda: held(d) == 6, 10, lambda: f"6 held tasks: {d.status()['pools']} "
             f"{[(t['state'], t.get('error')) for t in d.statuses(tids)]}")
    assert all(t["state"] == "queued" for t in d.statuses(tids)), d.statuses(tids)
    gate.open()
    assert_ran_in(d, tids, build["image"], log)
    assert len(build_calls(log)) == 3
    for f in order:
        assert function(d, f)["build"]["state"] == "ready"


def test_a_daemon_that_cannot_build_refuses_dependencies(make_daemon, tmp_path):
    path = "/usr/local/bin:/usr/bin:/bin"
    assert shutil.which("apptainer", path=path) is None, "a real apptainer is installed"
    d = make_daemon(pools=POOLS, daemon=PASS_FAKE_LOG, env={"PATH": path})
    r = d.api("POST", "/v1/functions", where_fn({"python": ["numpy"]}))
    msg = error_of(r, 400, "bad_request")
    assert "apptainer" in msg and "[builds]" in msg, msg
    assert not (d.home / "images").exists() or not list((d.home / "images").iterdir())
    listed = d.api("GET", "/v1/functions").body
    assert "where" not in json.dumps(listed), listed
    # Functions without dependencies still register there.
    d.register({"kind": "python", "entry": "where", "source": WHERE})

    # A configured build command that does not exist is named too.
    env, log = fake_env(tmp_path)
    d2 = make_daemon(pools=POOLS, daemon=PASS_FAKE_LOG, env=env,
                     builds={"command": f"{tmp_path}/no-such/apptainer build"})
    r = d2.api("POST", "/v1/functions", where_fn({"python": ["numpy"]}))
    msg = error_of(r, 400, "bad_request")
    assert f"{tmp_path}/no-such/apptainer" in msg and "[builds]" in msg, msg
    assert not calls(log)


def test_bad_dependencies_are_refused_naming_the_item(make_daemon, tmp_path):
    env, log = fake_env(tmp_path)
    d = make_daemon(pools=POOLS, daemon=PASS_FAKE_LOG, env=env)
    cases = [
        ({"python": ["numpy", "numpy; rm -rf /"]}, ["dependencies.python[1]", "numpy; rm -rf /"]),
        ({"python": ["https://example.com/evil-1.0.whl"]},
         ["dependencies.python[0]", "https://example.com/evil-1.0.whl", "URL"]),
        ({"python": ["pkg @ git+https://x/y"]},
         ["dependencies.python[0]", "pkg @ git+https://x/y"]),
        ({"python": ["numpy$(id)"]}, ["dependencies.python[0]", "numpy$(id)"]),
        ({"python": ["numpy'"]}, ["dependencies.python[0]", "numpy'"]),
        ({"system": ["curl", "curl;reboot"]}, ["dependencies.system[1]", "curl;reboot"]),
        ({"system": ["-y"]}, ["dependencies.system[0]", "-y"]),
        ({"python": ["numpy"], "conda": ["x"]}, ["dependencies.conda", "unknown"]),
        ({"python": [], "system": []}, ["dependencies", "at least one"]),
        ({}, ["dependencies", "at least one"]),
        ({"python": "numpy"}, ["dependencies.python", "array"]),
        ({"python": [3]}, ["dependencies.python[0]", "string"]),
        (["numpy"], ["dependencies", "object"]),
    ]
    for deps, words in cases:
        r = d.api("POST", "/v1/functions", where_fn(deps))
        msg = error_of(r, 400, "bad_request")
        for w in words:
            assert w in msg, f"{deps}: {w!r} not in {msg!r}"
    # Both an image and dependencies.
    spec = dict(where_fn({"python": ["numpy"]}), container={"image": str(tmp_path / "x.sif")})
    msg = error_of(d.api("POST", "/v1/functions", spec), 400, "bad_request")
    assert "container" in msg and "dependencies" in msg, msg
    # Nothing was built or written, and nothing registered.
    assert not calls(log), calls(log)
    assert not (d.home / "images").exists() or not list((d.home / "images").iterdir())
    assert "where" not in json.dumps(d.api("GET", "/v1/functions").body)
    # The same daemon accepts good dependencies (the refusals were about the items).
    ok = register(d, where_fn({"python": ["numpy"]}))
    assert wait_build(d, ok["id"])["build"]["state"] == "ready"


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_a_build_interrupted_by_a_restart_starts_again(make_daemon, tmp_path, how):
    env, log, gate = gated(tmp_path)
    d = make_daemon(pools=POOLS, daemon=PASS_FAKE_LOG, env=env)
    body = register(d, where_fn({"python": ["scikit-learn"]}))
    fid, image = body["id"], body["container"]["image"]
    [tid] = d.submit([{"function": fid, "args": [5]}])
    [first] = gate.wait_for_builds(1, d)
    assert function(d, fid)["build"]["state"] == "building"
    # The build is a process of the daemon: it must end with it (d.stop and d.kill9 check
    # that every process under the daemon is gone).
    if how == "sigterm":
        d.stop()
    else:
        d.kill9()
    assert not alive(first), f"the interrupted build (pid {first}) outlived the daemon"
    assert not Path(image).exists()
    d.start()
    # The build starts again; the task held across the restart runs in the image.
    [_, second] = gate.wait_for_builds(2, d)
    assert function(d, fid)["build"]["state"] == "building"
    assert d.task(tid)["state"] == "queued"
    gate.open()
    rec = d.wait_task(tid, timeout=40)
    assert result_value(rec) == [5, image], rec
    [b] = build_calls(log)
    assert b["pid"] == second, (b, first, second)
    assert function(d, fid)["build"]["state"] == "ready"
    assert Path(body["build"]["log"]).read_text().count("# fnx: [") == 2

    # With the image on disk a restart runs the function's tasks at once: no build.
    d.stop()
    d.start()
    assert function(d, fid)["build"]["state"] == "ready"
    [tid] = d.submit([{"function": fid, "args": [6]}])
    assert result_value(d.wait_task(tid, timeout=30)) == [6, image]
    assert len(build_calls(log)) == 1 and len(gate.waiting()) == 2


def test_builds_wait_for_a_slot_and_one_user_starts_at_most_two(make_daemon, tmp_path):
    """Issue 12: six registrations used to start six builds at once. With builds.max_running =
    1 the second build waits at its slot (not at the gate); a user's third new build is a 429
    naming builds.max_per_user; another user's is accepted; all finish in turn."""
    env, log, gate = gated(tmp_path)
    d = make_daemon(pools=POOLS, daemon=PASS_FAKE_LOG, env=env, builds={"max_running": 1})
    register(d, where_fn({"python": ["requests"]}, "a"))
    register(d, where_fn({"python": ["numpy"]}, "b"))
    r = d.api("POST", "/v1/functions", where_fn({"python": ["scipy"]}, "c"))
    assert "builds.max_per_user" in error_of(r, 429, "build_limit")
    bob = d.create_user("bob")
    r = d.api("POST", "/v1/functions", where_fn({"python": ["scipy"]}, "c"), token=bob)
    assert r.status == 201, r
    gate.wait_for_builds(1, d)
    wait_for(lambda: "image build waits: 1 builds run already" in d.log_since_start(), 10,
             "the log saying builds wait for a slot")
    assert len(gate.waiting()) == 1, "a second build started while one runs"
    gate.open()
    wait_for(lambda: len(build_calls(log)) == 3, 60, lambda: f"3 builds done\n{d.log_tail()}")
    # Once they are done, the user may start new builds again.
    r = d.api("POST", "/v1/functions", where_fn({"python": ["scipy", "pandas"]}, "d"))
    assert r.status == 201, r
