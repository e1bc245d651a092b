"""Black-box tests of the `fnx` CLI's client commands against a running daemon (`fnx submit`,
`result`, `cancel`, `status`, `function`, `config check`, `fnx map --daemon`).

Tasks that must stay running use a shell gate (daemon_env.GATE): they touch `d/started-I`, then
wait for the file `d/release`, so a test waits on files, never on a fixed sleep.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter

from conftest import wait_for
from daemon_env import DIV, GATE, SQUARE, free_port, gate, ok, wait_started


# ---------------------------------------------------------------------------------------------
# Client commands
# ---------------------------------------------------------------------------------------------


def test_cli_function_register_list_show(daemon, fnx_env):
    src = fnx_env.write("sq.py", SQUARE["source"])
    fid = int(ok(daemon.fnx("function", "register", "--python", str(src), "--entry", "square")))
    sid = int(ok(daemon.fnx("function", "register", "--shell", "printf '[%s]' {x}",
                            "--name", "echoer")))
    rid = int(ok(daemon.fnx("function", "register", "--ref", "math:hypot")))
    mid = int(ok(daemon.fnx("function", "register", "--mpi", "./sim --steps {steps}")))
    assert len({fid, sid, rid, mid}) == 4

    text = ok(daemon.fnx("function", "list"))
    for name in ["square", "echoer", "hypot"]:
        assert name in text, text
    listed = json.loads(ok(daemon.fnx("function", "list", "--output", "json")))
    listed = listed["functions"] if isinstance(listed, dict) else listed
    assert {f["id"] for f in listed} == {fid, sid, rid, mid}, listed

    shown = json.loads(ok(daemon.fnx("function", "show", str(fid), "--output", "json")))
    assert shown["id"] == fid and shown["source"] == SQUARE["source"], shown
    assert shown["signature"]["params"][0]["name"] == "x", shown
    assert "square" in ok(daemon.fnx("function", "show", str(fid)))
    shown = json.loads(ok(daemon.fnx("function", "show", str(mid), "--output", "json")))
    assert shown["kind"] == "mpi" and shown["command"] == "./sim --steps {steps}", shown


def test_cli_submit_result_cancel_status(daemon, fnx_env):
    daemon.register(SQUARE)
    daemon.register(DIV)
    daemon.register({"kind": "shell", "command": "printf '[%s]' {x}", "name": "echoer"})
    daemon.register({"kind": "shell", "command": GATE, "name": "gated"})
    daemon.register({"kind": "python", "ref": "math:hypot"})
    g = gate(fnx_env)

    assert ok(daemon.fnx("submit", "square", "4", "--wait")).strip() == "16"
    assert ok(daemon.fnx("submit", "hypot", "3", "4", "--wait")).strip() == "5.0"
    out = ok(daemon.fnx("submit", "echoer", "x=two words", "--wait"))
    assert json.loads(out)["stdout"] == "[two words]", out
    out = ok(daemon.fnx("submit", "echoer", "x=42", "--wait"))
    assert json.loads(out)["stdout"] == "[42]", out

    tid = int(ok(daemon.fnx("submit", "square", "x=5")))
    assert ok(daemon.fnx("result", str(tid), "--wait")).strip() == "25"
    rec = json.loads(ok(daemon.fnx("result", str(tid), "--wait", "10", "--output", "json")))
    for bad in ["inf", "-1", "1e300"]:
        r = daemon.fnx("result", str(tid), f"--wait={bad}")
        assert r.returncode == 2 and "--wait" in r.stderr and "panicked" not in r.stderr, r
    assert rec["id"] == tid and rec["state"] == "success" and rec["result"]["value"] == 25, rec
    doc = json.loads(ok(daemon.fnx("submit", "--priority", "3", "--retries", "0",
                                   "--output", "json", "square", "6")))
    assert set(doc) == {"id"} and isinstance(doc["id"], int), doc
    assert ok(daemon.fnx("result", str(doc["id"]), "--wait")).strip() == "36"

    fid = int(ok(daemon.fnx("submit", "div", "1", "0")))
    r = daemon.fnx("result", str(fid), "--wait")
    assert r.returncode == 1 and "ZeroDivisionError" in r.stderr, r
    r = daemon.fnx("submit", "div", "1", "0", "--wait")
    assert r.returncode == 1 and "ZeroDivisionError" in r.stderr, r

    held = int(ok(daemon.fnx("submit", "gated", f"d={g}", "i=0")))
    wait_started(g, [0])
    r = daemon.fnx("result", str(held))
    assert r.returncode == 3 and "running" in r.stderr, r
    assert "cancelled" in ok(daemon.fnx("cancel", str(held)))
    assert daemon.task(held)["state"] == "cancelled"

    r = daemon.fnx("submit", "--walltime", "1", "gated", f"d={g}", "i=1", "--wait")
    assert r.returncode == 1 and "walltime" in r.stderr, r

    assert ok(daemon.fnx("status")).strip()
    s = json.loads(ok(daemon.fnx("status", "--output", "json")))
    assert s["user"] == daemon.user and s["tasks"]["running"] == 0, s
    assert s["tasks"]["finished"] >= 8, s


def test_cli_finds_the_daemon_by_flags_env_or_client_json(daemon):
    home_only = daemon.env_for(None)
    home_only.pop("FNX_URL")
    s = json.loads(ok(daemon.fnx("status", "--output", "json", env=home_only)))
    assert s["user"] == daemon.user, s

    bob = daemon.create_user("bob")
    s = json.loads(ok(daemon.fnx("status", "--output", "json", env=daemon.env_for(bob))))
    assert s["user"] == "bob", s

    wrong = dict(daemon.env, FNX_URL=f"http://127.0.0.1:{free_port()}", FNX_TOKEN="fnx_wrong")
    s = json.loads(ok(daemon.fnx("status", "--output", "json", "--url", daemon.url,
                                 "--token", bob, env=wrong)))
    assert s["user"] == "bob", s
    r = daemon.fnx("status", env=wrong)
    assert r.returncode == 1, r
    r = daemon.fnx("status", "--token", "fnx_wrong")
    assert r.returncode == 1 and re.search(r"unauthori[sz]ed|401", r.stderr, re.I), r


def test_config_check_good_and_bad_files(fnx_env):
    good = fnx_env.write("good.toml", f"""
[daemon]
data_dir = "{fnx_env.dir / 'data'}"
listen = "127.0.0.1:8470"
log_file = ""

[store]
sync = "normal"
max_size_mb = 0
result_retention_s = 86400
unfetched_retention_s = 2592000
prune_interval_s = 60

[limits]
max_tasks_per_request = 10000
max_request_mb = 256
max_payload_mb = 10
max_result_mb = 10
max_queued_per_user = 2000000

[interchange]
address = "127.0.0.1"
port = 0
heartbeat_period_s = 5
heartbeat_threshold_s = 30

[pools.local]
provider = "local"
managers = 1
workers_per_manager = 0
python = "python3"
kill_grace_s = 2

[pools.big]
workers_per_manager = 8
""")
    r = fnx_env.fnx("config", "check", str(good))
    assert r.returncode == 0, r
    assert "local" in r.stdout and "big" in r.stdout, f"no summary of the pools: {r.stdout}"

    unknown = fnx_env.write("unknown.toml", """
[daemon]
lisen = "127.0.0.1:1"
[store]
bogus = 1
[pools.local]
workerz = 2
[nonsense]
x = 1
""")
    bad_values = fnx_env.write("values.toml", """
[store]
sync = "sometimes"
[interchange]
address = "not-an-ip"
[pools.local]
managers = 1025
kill_grace_s = -1
""")
    wrong_type = fnx_env.write("type.toml", '[limits]\nmax_queued_per_user = "lots"\n')
    for path, keys in [
        (unknown, ["daemon.lisen", "store.bogus", "pools.local.workerz", "nonsense"]),
        (bad_values, ["store.sync", "interchange.address", "pools.local.managers",
                      "pools.local.kill_grace_s"]),
        (wrong_type, ["max_queued_per_user"]),
        (fnx_env.dir / "missing.toml", ["missing.toml"]),
    ]:
        r = fnx_env.fnx("config", "check", str(path))
        assert r.returncode == 2, f"{path.name}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        out = r.stdout + r.stderr
        for key in keys:
            assert key in out, f"{path.name}: {key} not named in:\n{out}"

    # The daemon refuses the same file, with the same message, before it starts anything.
    r = fnx_env.fnx("daemon", "--config", str(unknown), timeout=20)
    assert r.returncode == 2 and "pools.local.workerz" in r.stderr, r
    assert not fnx_env.processes()


def test_config_check_warns_about_what_an_example_leaves_to_edit(fnx_env):
    """An example site file copied as is: valid, but `config check` names each CHANGEME line,
    the fnx_path that is not on this host, and (in a second file) a batch pool without a fixed
    port or a worker count, one warning per line."""
    from conftest import REPO

    example = REPO / "scripts" / "site-configs" / "slurm-generic.toml"
    r = fnx_env.fnx("config", "check", "--quiet", str(example))
    assert r.returncode == 0, r
    warnings = [line for line in r.stdout.splitlines() if line.startswith("  warning: ")]
    changeme = [w for w in warnings if "a CHANGEME is left in place" in w]
    assert len(changeme) == 6, r.stdout  # data_dir, log_file, account, partition, venv, fnx_path
    assert any("data_dir = \"/project/CHANGEME/fnx\"" in w for w in changeme), r.stdout
    assert any("fnx_path /project/CHANGEME/fnx/bin/fnx does not exist" in w
               for w in warnings), r.stdout
    assert "valid, with 7 warning(s):" in r.stdout, r.stdout
    loose = fnx_env.write("loose.toml", """
[daemon]
data_dir = "/tmp/fnx-unused"
[pools.batch]
provider = "slurm"
nodes_per_block = 1
""")
    r = fnx_env.fnx("config", "check", "--quiet", str(loose))
    assert r.returncode == 0, r
    assert "pool batch: interchange.port is 0" in r.stdout, r.stdout
    assert "pool batch: no workers_per_node" in r.stdout, r.stdout


def test_first_start_creates_the_log_files_directory(make_daemon, fnx_env):
    """Every example puts log_file inside data_dir; on a first start neither exists yet."""
    data = fnx_env.dir.parent / f"{fnx_env.dir.name}-fresh" / "data"
    d = make_daemon(start=False, data_dir=data)
    d.config["daemon"]["log_file"] = str(data / "logs" / "daemon.log")
    from daemon_env import to_toml
    d.config_path.write_text(to_toml(d.config))
    assert not data.exists()
    d.start()
    assert (data / "logs" / "daemon.log").stat().st_size > 0
    assert oct((data / "logs").stat().st_mode & 0o777) == "0o700"


# ---------------------------------------------------------------------------------------------
# fnx map --daemon: fnx map's interface, with the tasks going through the daemon
# ---------------------------------------------------------------------------------------------

SCORE = """import math


def score(x, y=1, *, label="p"):
    return {"x": x, "value": x * y, "root": math.sqrt(x), "label": f"{label}-{x}",
            "tags": [x % 3, None, x % 2 == 0], "third": x / 3}
"""


def first_difference(a: bytes, b: bytes, parsed: bool = False) -> str:
    """The first line that differs between embedded (a) and --daemon (b) output, as text or
    (parsed) as JSON values."""
    la, lb = a.decode().split("\n"), b.decode().split("\n")
    for k, (x, y) in enumerate(zip(la, lb)):
        if (json.loads(x) != json.loads(y)) if parsed and x and y else x != y:
            return f"line {k} differs:\n  embedded: {x}\n  --daemon: {y}"
    return f"{len(la)} lines (embedded) against {len(lb)} (--daemon)"


def test_map_daemon_ordered_gives_the_same_lines_as_embedded_map(daemon, fnx_env):
    fnx_env.write("score.py", SCORE)
    inputs = [[i] if i % 3 == 0 else [i, 2] if i % 3 == 1 else {"x": i, "label": "ü"}
              for i in range(500)]
    embedded = fnx_env.map("score.py:score", "--ordered", inputs=inputs)
    assert embedded.returncode == 0, embedded.explain()
    remote = daemon.map("score.py:score", "--ordered", inputs=inputs)
    assert remote.returncode == 0, remote.explain()

    assert [line["index"] for line in remote.lines] == list(range(500)), "not in input order"
    assert all(line["ok"] for line in remote.lines), [x for x in remote.lines if not x["ok"]][:3]
    assert remote.lines == embedded.lines, "other results: " + first_difference(
        embedded.raw, remote.raw, parsed=True)
    assert remote.raw == embedded.raw, (
        "the same results, written differently: " + first_difference(embedded.raw, remote.raw))
    assert "500 tasks: 500 succeeded, 0 failed" in remote.stderr, remote.stderr
    assert daemon.status()["tasks"]["finished"] == 500, "the tasks did not go through the daemon"


def test_map_daemon_shell_template(daemon, fnx_env):
    values = [f"v{i}" for i in range(200)]
    values[:6] = ["a; touch PWNED", "$(touch PWNED2)", "`touch PWNED3`", "two words", "",
                  "héllo ✓"]
    # Objects and arrays (in parameter order) both give the template's values.
    inputs = [{"x": v, "n": i} if i % 2 else [v, i] for i, v in enumerate(values)]
    run = daemon.map("--shell", "printf '[%s]' {x} {n}", inputs=inputs)
    assert run.returncode == 0, run.explain()
    results = run.by_index()
    assert sorted(results) == list(range(200)), sorted(results)
    for i, v in enumerate(values):
        assert results[i] == {"index": i, "ok": True, "result": {
            "returncode": 0, "stdout": f"[{v}][{i}]", "stderr": ""}}, (v, results[i])
    for name in ["PWNED", "PWNED2", "PWNED3"]:
        assert not (fnx_env.dir / name).exists(), f"a template value ran as shell code ({name})"
    assert daemon.status()["tasks"]["finished"] == 200


def test_map_daemon_bad_argument_line_fails_alone(daemon, fnx_env):
    fnx_env.write("pair.py", "def pair(x, y=1):\n    return [x, y]\n")
    inputs = [[i] for i in range(20)]
    inputs[7] = [7, 8, 9]  # three positional arguments for two parameters
    inputs[13] = {"y": 2}  # x missing
    run = daemon.map("pair.py:pair", inputs=inputs)
    assert run.returncode == 1, run.explain()
    results = run.by_index()
    assert sorted(results) == list(range(20)), run.raw

    bad = {i: results.pop(i) for i in (7, 13)}
    for i, line in bad.items():
        assert line["ok"] is False and line["error"]["kind"] == "bad_input", line
    too_many = bad[7]["error"]["message"]
    assert "positional" in too_many and "3" in too_many, too_many
    missing = bad[13]["error"]["message"]
    assert re.search(r"\bx\b", missing) and "missing" in missing, missing
    for i, line in results.items():
        assert line == {"index": i, "ok": True, "result": [i, 1]}, line
    assert "18 succeeded, 2 failed" in run.stderr, run.stderr
    # The refused lines never reached the daemon's queue; the others all ran there.
    assert daemon.status()["tasks"] == {"queued": 0, "running": 0, "finished": 18}


def test_map_daemon_sigint_cancels_the_unfinished_tasks(daemon, fnx_env):
    d = gate(fnx_env, "slow")
    n, fast = 10, 3
    bg = daemon.start_map("--shell", "touch {d}/started-{i}; [ {i} -lt 3 ] || sleep 300",
                          inputs=[{"d": str(d), "i": i} for i in range(n)])
    bg.wait_for_results(fast)
    wait_for(lambda: len([p for p in d.iterdir() if int(p.name.split("-")[1]) >= fast]) >= 2,
             30, lambda: f"two slow tasks started (have {sorted(p.name for p in d.iterdir())})")
    bg.proc.send_signal(signal.SIGINT)
    run = bg.wait(30)
    started = sorted(p.name for p in d.iterdir())

    assert run.returncode == 130, run.explain()
    results = run.by_index()
    assert sorted(results) == list(range(n)), run.raw
    for i in range(fast):
        assert results[i]["ok"] is True and results[i]["result"]["returncode"] == 0, results[i]
    cancelled = [results[i] for i in range(fast, n)]
    assert all(not x["ok"] and x["error"]["kind"] == "cancelled" for x in cancelled), cancelled

    def states():
        res = daemon.api("GET", "/v1/results?since=0").body["results"]
        return Counter(t["state"] for t in res)

    wait_for(lambda: states() == {"success": fast, "cancelled": n - fast}, 20,
             lambda: f"{fast} successes and {n - fast} cancelled results: {dict(states())}")
    assert daemon.status()["tasks"] == {"queued": 0, "running": 0, "finished": n}
    fnx_env.assert_no_processes(lambda p: p.cmdline.startswith("sleep 300"), grace=10)
    late = sorted(set(p.name for p in d.iterdir()) - set(started))
    print(f"\nmap --daemon SIGINT: started before the exit {started}; after it {late}")


def test_map_daemon_explicit_url_and_token(daemon, fnx_env):
    bob = daemon.create_user("bob")
    fnx_env.write("sq.py", SQUARE["source"])
    bare = {k: v for k, v in fnx_env.env.items() if k not in ("FNX_URL", "FNX_TOKEN")}
    assert not list(fnx_env.dir.glob("fnx-home/client.json")), "a client.json in FNX_HOME"

    run = daemon.map("sq.py:square", "--daemon", daemon.url, "--token", bob,
                     inputs=[[i] for i in range(20)], env=bare)
    assert run.returncode == 0, run.explain()
    assert {i: x["result"] for i, x in run.by_index().items()} == {i: i * i for i in range(20)}
    res = daemon.api("GET", "/v1/results?since=0", token=bob).body["results"]
    assert sorted(t["result"]["value"] for t in res) == sorted(i * i for i in range(20)), res
    assert daemon.status(token=bob)["tasks"]["finished"] == 20

    t0 = time.monotonic()
    wrong = daemon.map("sq.py:square", "--daemon", daemon.url, "--token", "fnx_wrong",
                       inputs=[[1]], env=bare, timeout=30)
    print(f"\nmap --daemon with a wrong token: exit {wrong.returncode} after "
          f"{time.monotonic() - t0:.2f}s: {wrong.stderr.strip()}")
    assert wrong.returncode in (1, 2), wrong.explain()
    assert re.search(r"authenticat|unauthori[sz]ed", wrong.stderr, re.I), wrong.stderr
    assert not wrong.lines, wrong.raw
    assert daemon.status(token=bob)["tasks"]["finished"] == 20

    none = daemon.map("sq.py:square", "--daemon", daemon.url, inputs=[[1]], env=bare,
                      timeout=30)
    assert none.returncode in (1, 2) and "token" in none.stderr, none.explain()


def test_regression_client_output_into_a_closed_pipe_ends_quietly(daemon, fnx_env):
    # `fnx status | head -1` used to panic ("failed printing to stdout: Broken pipe").
    import subprocess

    for cmd in ("status", "function list"):
        p = subprocess.run(
            f"'{fnx_env.bin}' {cmd} | head -0; echo \"rc=${{PIPESTATUS[0]}}\"",
            shell=True, executable="/bin/bash", cwd=fnx_env.dir, env=daemon.env,
            capture_output=True, text=True, timeout=30,
        )
        assert "panicked" not in p.stderr, p.stderr
        rc = int(p.stdout.strip().rsplit("rc=", 1)[1])
        assert rc in (0, 141), (cmd, rc, p.stderr)  # 141: ended by SIGPIPE, like other tools
