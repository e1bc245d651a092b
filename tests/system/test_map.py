"""`fnx map` and `fnx run` on well-behaved and misbehaving user code (no infrastructure faults)."""

import json
import textwrap

import pytest


def module(env, name, source):
    """Write a Python module into the test's directory (the cwd of fnx)."""
    env.write(f"{name}.py", textwrap.dedent(source))


# ---------------------------------------------------------------------------------------------
# Volume and correctness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ordered", [False, True], ids=["as_completed", "ordered"])
def test_python_10k_tasks_each_index_once_with_correct_result(fnx_env, ordered):
    module(fnx_env, "double", "def f(x):\n    return x * 2\n")
    n = 10_000
    args = ["double:f"] + (["--ordered"] if ordered else [])
    run = fnx_env.map(*args, inputs=([i] for i in range(n)), timeout=60)

    assert run.returncode == 0, run.explain()
    assert len(run.lines) == n
    results = run.by_index()  # fails on a duplicate index
    assert sorted(results) == list(range(n))
    for i, line in results.items():
        assert line == {"index": i, "ok": True, "result": 2 * i}
    if ordered:
        assert [line["index"] for line in run.lines] == list(range(n))
    assert f"{n} tasks: {n} succeeded, 0 failed" in run.stderr


SPECIAL_ARGS = [
    "a; touch PWNED",
    "$(touch PWNED2)",
    "`touch PWNED3`",
    "x && touch PWNED4 || touch PWNED4",
    "*",
    "two words",
    "",
    "'single' \"double\" \\back",
    "-n",
    "line1\nline2",
    "{x}",
    "héllo ✓",
]


def test_shell_1000_tasks_template_parameter_is_one_literal_argument(fnx_env):
    values = [f"v{i}" for i in range(1000)]
    values[: len(SPECIAL_ARGS)] = SPECIAL_ARGS
    # printf prints one [..] per argument: a value split into several words would show.
    run = fnx_env.map(
        "--shell", "printf '[%s]' {x}", inputs=({"x": v} for v in values), timeout=60
    )

    assert run.returncode == 0, run.explain()
    results = run.by_index()
    assert sorted(results) == list(range(1000))
    for i, v in enumerate(values):
        line = results[i]
        assert line["ok"] is True, line
        assert line["result"] == {"returncode": 0, "stdout": f"[{v}]", "stderr": ""}, (v, line)
    for name in ["PWNED", "PWNED2", "PWNED3", "PWNED4"]:
        assert not (fnx_env.dir / name).exists(), f"a template value ran as shell code ({name})"


def test_shell_parameter_values_checked_per_line(fnx_env):
    """Values that cannot become one command argument are the input's fault: bad_input for
    that line, not an infrastructure failure that is retried."""
    lines = [
        {"x": "a\u0000b"},        # NUL cannot be in an argv element
        {"y": "1"},               # unknown parameter
        {"x": [1, 2]},            # not a scalar
        {"x": None},
        {"x": 5},                 # numbers and booleans are fine
        {"x": True},
    ]
    run = fnx_env.map("--shell", "printf '[%s]' {x}", inputs=lines)
    assert run.returncode == 1, run.explain()
    r = run.by_index()
    for i in range(4):
        assert r[i]["ok"] is False, r[i]
        assert r[i]["error"]["kind"] == "bad_input", r[i]
        assert r[i]["error"]["message"].startswith(f"line {i + 1}:"), r[i]
    assert r[4]["result"]["stdout"] == "[5]" and r[5]["result"]["stdout"] == "[true]"
    assert "infrastructure" not in run.stderr, run.stderr


def test_shell_nonzero_exit_is_an_exception_with_returncode(fnx_env):
    run = fnx_env.map(
        "--shell", "echo out {x}; echo err >&2; exit {x}",
        inputs=[{"x": "0"}, {"x": "3"}],
    )
    assert run.returncode == 1, run.explain()
    ok, bad = run.by_index()[0], run.by_index()[1]
    assert ok["result"] == {"returncode": 0, "stdout": "out 0\n", "stderr": "err\n"}
    assert bad["ok"] is False and bad["error"]["kind"] == "exception", bad
    assert "3" in bad["error"]["message"], bad


# ---------------------------------------------------------------------------------------------
# User code behaviour
# ---------------------------------------------------------------------------------------------


def test_python_file_reference(fnx_env):
    fnx_env.write("scripts/score.py", "def score(x, y=1):\n    return [x * y, __name__]\n")
    run = fnx_env.map("./scripts/score.py:score", inputs=[[2], {"x": 3, "y": 4}])
    assert run.returncode == 0, run.explain()
    r = run.by_index()
    assert r[0]["result"] == [2, "score"] and r[1]["result"] == [12, "score"]


def test_fault_13_exception_reported_and_worker_reused(fnx_env):
    module(fnx_env, "raiser", """
        import os

        def boom(x):
            if x % 2:
                raise ValueError(f"odd input {x}")
            return os.getpid()
    """)
    n = 40
    run = fnx_env.map("raiser:boom", "--workers", "2", inputs=([i] for i in range(n)))

    assert run.returncode == 1, run.explain()
    results = run.by_index()
    assert sorted(results) == list(range(n))
    pids = set()
    for i, line in results.items():
        if i % 2 == 0:
            assert line["ok"] is True, line
            pids.add(line["result"])
        else:
            err = line["error"]
            assert line["ok"] is False
            assert err["kind"] == "exception"
            assert err["type"] == "ValueError"
            assert err["message"] == f"odd input {i}"
            assert "Traceback (most recent call last)" in err["traceback"]
            assert "in boom" in err["traceback"]
            assert "raise ValueError" in err["traceback"]
    # User exceptions neither kill nor replace the worker: successes come from the 2 workers.
    assert 1 <= len(pids) <= 2, pids
    assert "20 succeeded, 20 failed" in run.stderr


def test_fault_13_huge_unpicklable_and_system_exit_exceptions(fnx_env):
    module(fnx_env, "odd", """
        class Unpicklable(Exception):
            def __reduce__(self):
                raise TypeError("cannot pickle this")

        class BadStr(Exception):
            def __str__(self):
                raise RuntimeError("str() fails")

        def f(k):
            if k == 0:
                raise ValueError("m" * (50 << 20))
            if k == 1:
                raise Unpicklable("unpicklable one")
            if k == 2:
                raise BadStr("x")
            if k == 3:
                raise SystemExit(7)
            return k
    """)
    run = fnx_env.map("odd:f", "--workers", "1", inputs=([k] for k in range(5)), timeout=60)
    assert run.returncode == 1, run.explain()
    r = run.by_index()
    errs = {k: r[k]["error"] for k in range(4)}
    assert all(e["kind"] == "exception" for e in errs.values()), errs
    # 50 MB message: cut to about 64 KiB with a marker naming what was dropped.
    msg = errs[0]["message"]
    assert errs[0]["type"] == "ValueError"
    assert 64 << 10 <= len(msg) <= 70 << 10, len(msg)
    assert msg.startswith("mmmm") and "bytes truncated]" in msg, msg[-100:]
    assert len(errs[0]["traceback"]) <= 70 << 10
    assert errs[1]["type"].endswith("Unpicklable") and errs[1]["message"] == "unpicklable one"
    assert errs[2]["type"].endswith("BadStr")
    assert errs[3]["type"] == "SystemExit" and errs[3]["message"] == "7"
    assert r[4] == {"index": 4, "ok": True, "result": 4}


def test_user_prints_megabytes_to_stdout_results_intact_text_in_worker_log(fnx_env):
    module(fnx_env, "chatty", """
        import sys

        def f(x):
            line = ("chatty-%d-" % x) + "y" * 1000
            for _ in range(1500):      # ~1.5 MB per task, through print and the raw fd
                print(line)
            sys.stdout.flush()
            return x + 1
    """)
    run = fnx_env.map("chatty:f", "--workers", "2", inputs=([i] for i in range(4)))

    assert run.returncode == 0, run.explain()
    assert {i: l["result"] for i, l in run.by_index().items()} == {0: 1, 1: 2, 2: 3, 3: 4}
    logs = sorted(run.run_dir.glob("manager-*/worker-*.log"))
    assert logs, f"no worker log under {run.run_dir}"
    text = "".join(p.read_text(errors="replace") for p in logs)
    for i in range(4):
        assert text.count(f"chatty-{i}-") == 1500, f"output of task {i} missing from {logs}"
    assert '{"index"' not in text


def test_user_code_reading_stdin_gets_eof(fnx_env):
    module(fnx_env, "reader", """
        import os, sys

        def f(x):
            return [x, sys.stdin.read(), os.read(0, 10).decode(), sys.stdin.readline()]
    """)
    run = fnx_env.map("reader:f", "--walltime", "20", inputs=[[1], [2]], timeout=40)

    assert run.returncode == 0, run.explain()
    assert run.by_index()[0]["result"] == [1, "", "", ""]
    assert run.by_index()[1]["result"] == [2, "", "", ""]


def test_fault_18_result_too_large_names_both_sizes_next_task_works(fnx_env):
    module(fnx_env, "big", "def f(n):\n    return 'x' * n\n")
    run = fnx_env.map(
        "big:f", "--workers", "1", "--max-result-bytes", "1000",
        inputs=[[10], [5000], [20]],
    )
    assert run.returncode == 1, run.explain()
    r = run.by_index()
    assert r[0] == {"index": 0, "ok": True, "result": "x" * 10}
    assert r[2] == {"index": 2, "ok": True, "result": "x" * 20}
    err = r[1]["error"]
    assert r[1]["ok"] is False and err["kind"] == "result_too_large", r[1]
    # The encoded result is the JSON string: 5000 characters plus two quotes.
    assert "5002" in err["message"] and "1000" in err["message"], err


def test_not_serializable_results_and_big_int_exact(fnx_env):
    module(fnx_env, "weird", """
        def f(k):
            return [{1: 2}, float("nan"), b"bytes", float("inf"), {1, 2}, 2**100, -(2**70)][k]
    """)
    run = fnx_env.map("weird:f", inputs=([k] for k in range(7)))

    assert run.returncode == 1, run.explain()
    r = run.by_index()
    for k in range(5):
        assert r[k]["ok"] is False, r[k]
        assert r[k]["error"]["kind"] == "not_serializable", r[k]
    # Parsed back with Python's json module, big integers come back exact.
    assert r[5] == {"index": 5, "ok": True, "result": 2**100}
    assert type(r[5]["result"]) is int
    assert r[6]["result"] == -(2**70)
    assert "1267650600228229401496703205376" in run.raw.decode()


# ---------------------------------------------------------------------------------------------
# Input and usage errors
# ---------------------------------------------------------------------------------------------


def test_fault_18_input_payload_too_large_is_rejected_before_running(fnx_env):
    module(fnx_env, "length", """
        import os

        def f(s):
            open("ran-%d" % len(s), "w").close()
            return len(s)
    """)
    big = "x" * (11 << 20)  # over the 10 MiB default limit
    run = fnx_env.map("length:f", "--workers", "1", inputs=[[big], ["small"]], timeout=60)
    assert run.returncode == 1, run.explain()
    r = run.by_index()
    err = r[0]["error"]
    assert r[0]["ok"] is False and err["kind"] == "bad_input", r[0]
    assert str(len(big) + 4) in err["message"] and "10485760" in err["message"], err
    assert r[1] == {"index": 1, "ok": True, "result": 5}
    assert not (fnx_env.dir / f"ran-{len(big)}").exists(), "the oversized task must not run"


def test_bad_input_lines_reported_by_line_number_others_run(fnx_env):
    module(fnx_env, "double", "def f(x):\n    return x * 2\n")
    lines = [
        b"[1]",            # 0 ok
        b"5",              # 1 a number: neither args array nor kwargs object
        b"{broken",        # 2 broken JSON
        b"[\xff\xfe]",     # 3 invalid UTF-8
        b"",               # 4 blank: skipped, no output line
        b"[2]",            # 5 ok
        b'["\xc3\x28"]',   # 6 invalid UTF-8 inside a string
        b'{"x": 3}',       # 7 ok (keyword arguments)
        b"[1, 2",          # 8 truncated JSON
    ]
    run = fnx_env.map("double:f", input_bytes=b"\n".join(lines) + b"\n")

    assert run.returncode == 1, run.explain()
    r = run.by_index()
    assert sorted(r) == [0, 1, 2, 3, 5, 6, 7, 8], "the blank line must be skipped, others reported"
    assert r[0]["result"] == 2 and r[5]["result"] == 4 and r[7]["result"] == 6
    for i in [1, 2, 3, 6, 8]:
        assert r[i]["ok"] is False, r[i]
        assert r[i]["error"]["kind"] == "bad_input", r[i]
        assert r[i]["error"]["message"].startswith(f"line {i + 1}:"), r[i]
    assert "number" in r[1]["error"]["message"]
    assert "UTF-8" in r[3]["error"]["message"] and "UTF-8" in r[6]["error"]["message"]


def test_fnx_run_prints_result(fnx_env):
    module(fnx_env, "calc", """
        def add(a, b):
            return {"sum": a + b}

        def fail(x):
            raise KeyError(f"no such key {x}")
    """)
    p = fnx_env.fnx("run", "calc:add", "--", "[1, 2]")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"sum": 3}

    p = fnx_env.fnx("run", "calc:add", "--", '{"a": 40, "b": 2}')
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"sum": 42}

    p = fnx_env.fnx("run", "calc:fail", "--", '["k1"]')
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stdout == ""
    assert "Traceback (most recent call last)" in p.stderr
    assert "in fail" in p.stderr and "KeyError" in p.stderr and "no such key k1" in p.stderr


def test_fnx_map_missing_input_file_is_usage_error(fnx_env):
    module(fnx_env, "double", "def f(x):\n    return x * 2\n")
    p = fnx_env.fnx("map", "double:f", "-i", "no-such-input.jsonl", "--progress", "never")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "no-such-input.jsonl" in p.stderr and "No such file" in p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize(
    "ref, words",
    [
        ("nocolon", ["nocolon", "MODULE:NAME"]),
        ("double:", ["double:"]),
        ("double:1bad", ["1bad", "not a Python name"]),
        ("./missing.py:f", ["missing.py", "No such file"]),
    ],
)
def test_fnx_map_bad_function_reference_is_usage_error(fnx_env, ref, words):
    module(fnx_env, "double", "def f(x):\n    return x * 2\n")
    inp = fnx_env.write_inputs([[1]])
    p = fnx_env.fnx("map", ref, "-i", str(inp), "--progress", "never")
    assert p.returncode == 2, (p.stdout, p.stderr)
    for w in words:
        assert w in p.stderr, p.stderr
    assert p.stdout == ""


def test_missing_function_in_module_is_import_error_per_task(fnx_env):
    module(fnx_env, "double", "def f(x):\n    return x * 2\n")
    run = fnx_env.map("double:nope", inputs=[[1], [2]])
    assert run.returncode == 1, run.explain()
    for line in run.lines:
        assert line["error"]["kind"] == "import_error", line
        assert "nope" in line["error"]["message"], line


def test_results_written_as_they_complete_while_others_still_run(fnx_env):
    """Output is written "as they complete": a finished task's line must reach the output file
    while other tasks are still running, not only when a later result arrives."""
    module(fnx_env, "gated", """
        import os, time

        def f(d, i, wait):
            deadline = time.monotonic() + 60
            while wait and not os.path.exists(os.path.join(d, "release")):
                if time.monotonic() > deadline:
                    raise TimeoutError("never released")
                time.sleep(0.01)
            return i
    """)
    d = str(fnx_env.dir)
    inputs = [[d, 0, False], [d, 1, False], [d, 2, False], [d, 3, True], [d, 4, True]]
    bg = fnx_env.start_map("gated:f", "--workers", "2", inputs=inputs)
    try:
        early = bg.wait_for_results(3, timeout=5)
    finally:
        (fnx_env.dir / "release").touch()
    assert sorted(line["index"] for line in early) == [0, 1, 2]
    run = bg.wait(30)
    assert run.returncode == 0, run.explain()
    assert {i: line["result"] for i, line in run.by_index().items()} == {i: i for i in range(5)}


def test_output_pipe_closed_early_stops_the_run_and_every_process(fnx_env):
    """`fnx map ... | head -1`: once the reader is gone, fnx stops the run (exit 1, a clear
    message) and leaves no manager, worker or task behind."""
    import subprocess

    module(fnx_env, "slow", "import time\ndef f(x):\n    time.sleep(0.05)\n    return x\n")
    inp = fnx_env.write_inputs([i] for i in range(200))
    proc = subprocess.Popen(
        [str(fnx_env.bin), "map", "slow:f", "-i", str(inp), "--workers", "2",
         "--progress", "never", "--run-dir", str(fnx_env.dir / "run-pipe")],
        cwd=fnx_env.dir, env=fnx_env.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    first = json.loads(proc.stdout.readline())
    assert first["ok"] is True
    proc.stdout.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert b"Broken pipe" in err, err
    fnx_env.assert_no_processes(grace=2.0)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--kill-grace", "1e300"),
        ("--kill-grace", "inf"),
        ("--kill-grace", "-1"),
        ("--walltime", "1e300"),
        ("--walltime", "nan"),
        ("--heartbeat-period", "1e10"),
    ],
)
def test_fnx_map_out_of_range_seconds_are_usage_errors_not_panics(fnx_env, flag, value):
    """A number of seconds too large for a deadline (it once panicked in Duration) is refused
    by the flag's parser, naming the flag and the range."""
    module(fnx_env, "double", "def f(x):\n    return x * 2\n")
    inp = fnx_env.write_inputs([[1]])
    p = fnx_env.fnx("map", "double:f", "-i", str(inp), "--progress", "never", f"{flag}={value}")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert flag in p.stderr and "from 0 to 1e9" in p.stderr, p.stderr
    assert "panicked" not in p.stderr
    assert p.stdout == ""
