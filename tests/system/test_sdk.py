"""The Python SDK (sdk/python/fnx) against a real `fnx daemon` (fixtures in daemon_env.py).

The functions below are sent to the daemon as source by `Client.register_function`; `time` is
a module global they use, which the SDK sends as an import.
"""

from __future__ import annotations

import base64
import concurrent.futures
import glob
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

SDK = Path(__file__).resolve().parents[2] / "sdk" / "python"
if str(SDK) not in sys.path:
    sys.path.insert(0, str(SDK))

import fnx  # noqa: E402

TIMEOUT = 120
PY = "%d.%d" % sys.version_info[:2]


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def divide(a, b):
    return a / b


def sleepy(seconds):
    time.sleep(seconds)
    return seconds


def echo(*args, **kwargs):
    return [args, kwargs]


def other_python() -> str | None:
    """An interpreter of another major.minor version than this one, if the machine has one."""
    candidates = sorted(glob.glob("/usr/bin/python3.*") + glob.glob("/usr/local/bin/python3.*")
                        + glob.glob("/root/.pyenv/versions/3.*/bin/python3"))
    for path in candidates:
        try:
            out = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if out and out != PY and out >= "3.8":
            return path
    return None


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)
        time.sleep(0.05)
    return value


def test_client_round_trip(daemon):
    c = daemon.client()
    fid = c.register_function(square)
    assert isinstance(fid, int)
    record = c.get_function(fid)
    assert (record["name"], record["kind"], record["entry"]) == ("square", "python", "square")
    assert "def square(x):" in record["source"]

    tid = c.run(fid, 7)
    assert c.get_result(tid, timeout=TIMEOUT) == 49
    task = c.get_task(tid)
    assert (task["id"], task["function"], task["state"]) == (tid, fid, "success")
    assert task["result"]["encoding"] == "pickle"

    # Pickled arguments keep Python types both ways; a callable is registered once.
    tid = c.run(echo, (1, 2), {3}, key=b"bytes")
    assert c.get_result(tid, timeout=TIMEOUT) == [((1, 2), {3}), {"key": b"bytes"}]
    assert c.function_id(echo) == c.function_id(echo)
    # JSON arguments and results.
    tid = c.run_json(add, 2, 3)
    assert c.get_result(tid, timeout=TIMEOUT) == 5
    assert c.get_task(tid)["result"] == {"encoding": "json", "value": 5}
    assert c.whoami()["user"] == daemon.user


def test_client_finds_daemon_through_client_json(daemon, monkeypatch):
    monkeypatch.delenv("FNX_URL", raising=False)
    monkeypatch.delenv("FNX_TOKEN", raising=False)
    monkeypatch.setenv("FNX_HOME", str(daemon.home))
    c = fnx.Client()
    assert c.url == daemon.url
    assert c.whoami()["user"] == daemon.user


def test_batch_run_and_get_results(daemon):
    c = daemon.client()
    fid = c.register_function(add)
    calls = [(fid, (i,), {"b": 1000}) for i in range(500)] + [(square, (3,), {})]
    ids = c.batch_run(calls)
    assert len(ids) == len(set(ids)) == 501
    assert c.get_results(ids, timeout=TIMEOUT) == [i + 1000 for i in range(500)] + [9]
    assert c.status()["tasks"]["finished"] >= 501


def test_executor_ten_thousand_futures(daemon):
    c = daemon.client()
    n = 10_000
    start = time.monotonic()
    with fnx.Executor(c) as ex:
        futures = {ex.submit(square, i): i for i in range(n)}
        seen = 0
        for future in concurrent.futures.as_completed(futures, timeout=600):
            i = futures[future]
            assert future.result() == i * i, (i, future.task_id)
            seen += 1
    assert seen == n
    assert len({f.task_id for f in futures}) == n
    print(f"{n} futures in {time.monotonic() - start:.1f}s")


def test_executor_map(daemon):
    with fnx.Executor(daemon.client(), batch_size=50) as ex:
        assert list(ex.map(add, range(300), range(300), timeout=TIMEOUT)) == \
            [2 * i for i in range(300)]
        assert list(ex.map(square, [])) == []


def test_remote_exception_carries_remote_traceback(daemon):
    c = daemon.client()
    tid = c.run(divide, 1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        c.get_result(tid, timeout=TIMEOUT)
    exc = info.value
    assert isinstance(exc, fnx.RemoteException)
    assert (exc.task_id, exc.kind, exc.type_name) == (tid, "exception", "ZeroDivisionError")
    text = str(exc)
    assert text.startswith("ZeroDivisionError: division by zero"), text
    assert "Remote traceback:" in text and "in divide" in text, text
    assert "return a / b" in text, text  # the source line of the function, from the worker
    assert "return a / b" in str(exc.__cause__)

    with fnx.Executor(c) as ex:
        future = ex.submit(divide, 2, 0)
        with pytest.raises(ZeroDivisionError, match="division by zero"):
            future.result(TIMEOUT)
        assert "return a / b" in str(future.exception())


def test_future_cancel_of_running_task(daemon):
    c = daemon.client()
    with fnx.Executor(c) as ex:
        future = ex.submit(sleepy, 300)
        wait_until(lambda: future.task_id is not None, 30, "the task to be submitted")
        wait_until(lambda: c.get_task(future.task_id)["state"] == "running", 60,
                   "the task to run")
        assert not future.done()
        start = time.monotonic()
        assert future.cancel() is True
        assert future.cancelled() and future.done()
        assert time.monotonic() - start < 30
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(1)
        record = c.get_task(future.task_id)
        assert record["state"] == "cancelled", record
        # The executor goes on after a cancel.
        assert ex.submit(square, 12).result(TIMEOUT) == 144


def test_client_cancel_gives_task_cancelled(daemon):
    c = daemon.client()
    tid = c.run(sleepy, 300)
    wait_until(lambda: c.get_task(tid)["state"] == "running", 60, "the task to run")
    assert c.cancel(tid) == "cancelled"
    with pytest.raises(fnx.TaskCancelled) as info:
        c.get_result(tid, timeout=TIMEOUT)
    assert info.value.task_id == tid


def test_pickled_arguments_from_another_python(daemon):
    c = daemon.client()
    fid = c.register_function(square)
    data = base64.b64encode(pickle.dumps(((3,), {}, {"python": "2.7"}))).decode()
    [tid] = c.submit_tasks([{"function": fid, "encoding": "pickle", "data_b64": data}])
    with pytest.raises(fnx.TaskFailed) as info:
        c.get_result(tid, timeout=TIMEOUT)
    exc = info.value
    assert exc.kind == "bad_input" and exc.type_name == "TypeError", exc
    assert f"arguments were pickled by Python 2.7 on the client but this worker runs Python {PY}" \
        in str(exc), str(exc)
    # The same function with this client's own meta works.
    assert c.get_result(c.run(fid, 3), timeout=TIMEOUT) == 9


def test_http_errors(daemon):
    c = daemon.client()
    with pytest.raises(fnx.NotFound) as info:
        c.get_task(987654321)
    assert info.value.code == "not_found"
    with pytest.raises(fnx.AuthError) as info:
        fnx.Client(daemon.url, "fnx_not_a_token").status()
    assert info.value.code == "unauthorized"
    with pytest.raises(fnx.BadRequest) as info:
        c.run_json(c.register_function(square), y=1)
    assert "y" in info.value.message

    other = fnx.Client(daemon.url, daemon.create_user("bob"))
    tid = c.run(square, 2)
    # Another user's task answers like one that does not exist (issue 11).
    with pytest.raises(fnx.NotFound):
        other.get_task(tid)
    assert other.get_results([tid], return_exceptions=True)[0].__class__ is fnx.NotFound


def test_refs_shell_functions_and_results_stream(daemon):
    c = daemon.client()
    sqrt = c.register_function("math:sqrt", name="sqrt")
    shell = c.register_shell("echo {word}", name="say")
    assert {f["id"] for f in c.list_functions()} >= {sqrt, shell}
    first = c.run(sqrt, 16.0)
    second = c.run(shell, word="hi")  # shell functions take JSON arguments
    assert c.get_result(first, timeout=TIMEOUT) == 4.0
    out = c.get_result(second, timeout=TIMEOUT)
    assert out["returncode"] == 0 and out["stdout"] == "hi\n", out
    records = list(c.results())
    assert {first, second} <= {r["id"] for r in records}
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(seqs)
    assert list(c.results(since=seqs[-1])) == []
    c.delete_function(sqrt)
    with pytest.raises(fnx.BadRequest):
        c.run(sqrt, 1.0)


def test_executor_shutdown_cancel_futures(daemon):
    c = daemon.client()
    ex = fnx.Executor(c)
    running = [ex.submit(sleepy, 300) for _ in range(4)]  # 2 run, 2 wait for a worker
    wait_until(lambda: all(f.task_id for f in running), 30, "the tasks to be submitted")
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in running)
    states = {r["state"] for r in c.tasks_status([f.task_id for f in running])}
    assert states == {"cancelled"}, states
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_worker_of_another_python_rejects_pickled_arguments(make_daemon):
    python = other_python()
    if python is None:
        pytest.skip("no Python interpreter of another major.minor version on this machine")
    daemon = make_daemon(pools={"local": {"python": python, "workers_per_manager": 1}})
    c = daemon.client()
    with pytest.raises(fnx.TaskFailed) as info:
        c.get_result(c.run(square, 3), timeout=TIMEOUT)
    text = str(info.value)
    assert info.value.kind == "bad_input", text
    assert f"arguments were pickled by Python {PY} on the client but this worker runs Python" \
        in text and python in text, text
    assert c.get_result(c.run_json(square, 3), timeout=TIMEOUT) == 9  # JSON is fine


def _finishes(fn, timeout: float) -> bool:
    """Run `fn` on a thread; True if it returned within `timeout` (False: it hung)."""
    import threading

    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def test_regression_callback_cancelling_a_sibling_of_a_failed_batch_does_not_deadlock(daemon):
    ex = fnx.Executor(daemon.client(), batch_interval=0.2)
    a, b = ex.submit(999_999), ex.submit(999_999)  # no such function: the batch gets a 400
    a.add_done_callback(lambda f: b.cancel())
    assert _finishes(lambda: concurrent.futures.wait([a, b], timeout=30), 30)
    assert a.done() and b.done()
    assert _finishes(lambda: ex.shutdown(), 30), "shutdown hung"


def test_regression_shutdown_from_a_done_callback_does_not_deadlock(daemon):
    ex = fnx.Executor(daemon.client())
    first = ex.submit(square, 2)
    first.add_done_callback(lambda f: ex.shutdown())
    assert first.result(timeout=TIMEOUT) == 4
    assert _finishes(lambda: ex.shutdown(), 30)


def test_regression_shell_function_registered_elsewhere_gets_json_arguments(daemon):
    sid = daemon.register({"kind": "shell", "command": "echo {x}"})
    c = daemon.client()  # knows nothing of `sid`
    assert c.get_result(c.run(sid, x="7"), timeout=TIMEOUT)["stdout"] == "7\n"
    with fnx.Executor(daemon.client()) as ex:
        assert ex.submit(sid, x="8").result(timeout=TIMEOUT)["stdout"] == "8\n"


def test_regression_client_without_timeout_works(daemon):
    c = fnx.Client(daemon.url, daemon.token, timeout=None)
    assert c.get_result(c.run(c.register_function(square), 3), timeout=TIMEOUT) == 9


def test_regression_one_refused_call_fails_alone_in_an_executor_batch(daemon):
    sid = daemon.register({"kind": "shell", "command": "echo {x}"})
    with fnx.Executor(daemon.client(), batch_interval=0.2) as ex:
        good = [ex.submit(sid, x=str(i)) for i in range(5)]
        bad = ex.submit(sid, y="no such parameter")
        more = [ex.submit(sid, x=str(i)) for i in range(5, 10)]
        with pytest.raises(fnx.BadRequest, match="no parameter 'y'"):
            bad.result(timeout=TIMEOUT)
        outs = [f.result(timeout=TIMEOUT)["stdout"] for f in good + more]
    assert outs == [f"{i}\n" for i in range(10)]


def byte_count(data):
    return len(data)


def test_regression_large_batches_are_split_by_size(make_daemon):
    # The daemon takes request bodies of at most 4 MiB here: 24 calls of 1 MiB go in several
    # requests (every future failed with 413 before batches were split).
    d = make_daemon(limits={"max_request_mb": 4})
    blob = b"x" * (1 << 20)
    with fnx.Executor(d.client(), batch_interval=0.5) as ex:
        futures = [ex.submit(byte_count, blob) for _ in range(24)]
        assert [f.result(timeout=TIMEOUT) for f in futures] == [1 << 20] * 24
    c = d.client()
    ids = c.batch_run([(byte_count, (blob,), {}) for _ in range(12)])
    assert c.get_results(ids, timeout=TIMEOUT) == [1 << 20] * 12


def test_regression_a_function_defined_anew_is_registered_once(daemon):
    c = daemon.client()
    ids = set()
    for i in range(5):
        def triple(x):
            return 3 * x
        ids.add(c.function_id(triple))
    assert len(ids) == 1, ids
    assert len([f for f in c.list_functions() if f["name"] == "triple"]) == 1
    assert c.get_result(c.run(ids.pop(), 2), timeout=TIMEOUT) == 6
