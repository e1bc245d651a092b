"""Tests for fnx/worker.py: run it as a real subprocess and speak the frame protocol to it."""

import json
import os
import pickle
import platform
import select
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent.parent / "fnx" / "worker.py"
TIMEOUT = 60.0
LIMIT = 64 * 1024

USER_MODULE = r'''
import json, os, subprocess, sys

def ident(x): return x
def add(a, b=0): return a + b
def getpid(): return os.getpid()
def sys_path0(): return sys.path[0]
def boom(msg): raise ValueError(msg)
def huge_error(n): raise RuntimeError("x" * n)
def sys_exit(): sys.exit(4)
def exit_hard(code): os._exit(code)
def nan(): return float("nan")
def int_keys(): return {"a": [{1: 2}]}
def raw_bytes(): return b"x"
def plain_object(): return object()
def make_lambda(): return lambda: 1
def surrogate(): return "a\ud800b"
def big(): return 2 ** 100
def big_bytes(n): return b"x" * n

class Growing:
    """Pickles bigger every time: a __reduce__ with side effects."""
    calls = 0
    def __reduce__(self):
        Growing.calls += 1
        return (bytes, (b"x" * ((2 << 20) * Growing.calls),))

def growing(): return Growing()
def unicode(): return {"k\u00e9": "\u65e5\u672c"}

class Ops:
    @staticmethod
    def triple(x): return 3 * x

class BadStr(Exception):
    def __str__(self): raise RuntimeError("no str")
    def __reduce__(self): raise RuntimeError("no reduce")

class BadRepr(BadStr):
    def __repr__(self): raise RuntimeError("no repr")

def bad_str(): raise BadStr("hidden")
def bad_repr(): raise BadRepr()

def chatty(n):
    line = "y" * 1023 + "\n"
    for _ in range(n // 1024):
        print(line, end="")
    sys.stdout.flush()
    os.write(1, b"raw fd 1 write\n")
    print("to stderr", file=sys.stderr)
    return n

def fork_and_return():
    return "child" if os.fork() == 0 else "parent"

def read_stdin():
    return [sys.stdin.read(), os.read(0, 10).decode()]

CHILD = """
import json, os, sys
links = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        links[fd] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass
with open(sys.argv[1], "w") as f:
    json.dump(links, f)
"""

def spawn(out):
    cat = subprocess.run(["cat"], timeout=30)
    status = os.system("echo hi from os.system; cat")
    # close_fds=False: the child keeps every fd the worker lets it inherit.
    subprocess.run([sys.executable, "-c", CHILD, out], check=True, timeout=30, close_fds=False)
    return [cat.returncode, status]
'''


class Worker:
    """One worker subprocess and the manager's side of the frame protocol."""

    def __init__(self, tmp_path, max_result=10 << 20):
        run_dir = tmp_path / "run"
        run_dir.mkdir(exist_ok=True)
        script = run_dir / "fnx_worker.py"
        shutil.copy(WORKER, script)
        self.cwd = tmp_path / "cwd"
        self.cwd.mkdir(exist_ok=True)
        (self.cwd / "userfns.py").write_text(USER_MODULE)
        self.log_path = tmp_path / "worker.log"
        env = dict(os.environ, FNX_WORKER_ID="7", FNX_MAX_RESULT_BYTES=str(max_result),
                   FNX_RUN_ID="test-run")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-B", str(script)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, cwd=self.cwd, env=env, bufsize=0)
        self.tid = 0
        self.fid = 0
        self.ready = self.recv()

    def send(self, header, payload=b""):
        h = json.dumps(header).encode()
        self.proc.stdin.write(struct.pack(">II", 4 + len(h) + len(payload), len(h)) + h + payload)

    def _read_exact(self, n):
        fd, chunks, got = self.proc.stdout.fileno(), [], 0
        while got < n:
            if not select.select([fd], [], [], TIMEOUT)[0]:
                raise TimeoutError("worker did not answer")
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def recv(self):
        """``(header, payload)`` of the next frame, or None at end of output."""
        prefix = self._read_exact(8)
        if prefix is None:
            return None
        length, hlen = struct.unpack(">II", prefix)
        body = self._read_exact(length - 4)
        assert body is not None, "truncated frame"
        return json.loads(body[:hlen]), body[hlen:]

    def define(self, body):
        self.fid += 1
        self.send({"op": "def", "fid": self.fid, "body": body})
        return self.fid

    def ref(self, qualname, module="userfns"):
        return self.define({"kind": "python_ref", "module": module, "qualname": qualname})

    def task(self, fid, payload, enc="json"):
        self.tid += 1
        self.send({"op": "task", "tid": self.tid, "fid": fid, "enc": enc}, payload)
        reply = self.recv()
        assert reply is not None, "worker exited instead of answering"
        header, payload = reply
        assert header["op"] == "result" and header["tid"] == self.tid
        return header, payload

    def _json_task(self, fid, args, kwargs):
        return self.task(fid, json.dumps(kwargs if kwargs else list(args)).encode())

    def call(self, fid, *args, **kwargs):
        header, payload = self._json_task(fid, args, kwargs)
        assert header["ok"] is True, header
        assert header["enc"] == "json"
        return json.loads(payload)

    def call_pickle(self, fid, *args, **kwargs):
        header, payload = self.task(fid, pickle.dumps((args, kwargs)), enc="pickle")
        assert header["ok"] is True, header
        assert header["enc"] == "pickle"
        return pickle.loads(payload)

    def error(self, fid, *args, enc="json", **kwargs):
        if enc == "json":
            header, payload = self._json_task(fid, args, kwargs)
        else:
            header, payload = self.task(fid, pickle.dumps((args, kwargs)), enc="pickle")
        assert header["ok"] is False and payload == b"", header
        assert set(header["error"]) == {"kind", "type", "message", "traceback"}
        return header["error"]

    def log(self):
        return self.log_path.read_text(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def make_worker(tmp_path):
    workers = []

    def make(**kwargs):
        workers.append(Worker(tmp_path, **kwargs))
        return workers[-1]

    yield make
    for w in workers:
        w.close()


@pytest.fixture
def worker(make_worker):
    return make_worker()


def test_ready_frame_and_start_log(worker):
    header, payload = worker.ready
    executable = header.pop("executable")
    assert header == {"op": "ready", "pid": worker.proc.pid, "python": platform.python_version()}
    assert os.path.isabs(executable) and os.path.samefile(executable, sys.executable), executable
    assert payload == b""
    log = worker.log()
    assert "fnx worker %d: started: python %s" % (worker.proc.pid, platform.python_version()) in log
    assert "worker id 7" in log


def test_json_positional_and_keyword_calls(worker):
    add = worker.ref("add")
    assert worker.call(add, 2, 3) == 5
    assert worker.call(add, a=10, b=5) == 15
    assert worker.call(add, a=1) == 1
    assert worker.call(add, [1], [2, "x"]) == [1, 2, "x"]
    assert worker.call(worker.ref("unicode")) == {"k\u00e9": "\u65e5\u672c"}
    header, payload = worker.task(worker.ref("ident"), b'[[1,2.5,null,true,"s",{"a":{}}]]')
    assert payload == b'[1,2.5,null,true,"s",{"a":{}}]'


def test_pickle_call(worker):
    add = worker.ref("add")
    assert worker.call_pickle(add, (1, 2), b=(3,)) == (1, 2, 3)
    assert worker.call_pickle(worker.ref("ident"), {1, 2, 3}) == {1, 2, 3}
    assert worker.call_pickle(worker.ref("ident"), b"\x00\xff") == b"\x00\xff"
    assert worker.call_pickle(add, a=1.5, b=2) == 3.5
    # A pickled list of args and a list instead of tuple are accepted too.
    header, payload = worker.task(add, pickle.dumps(([4, 5], {})), enc="pickle")
    assert header["ok"] and pickle.loads(payload) == 9


def test_pickle_call_with_client_meta(worker):
    # The SDK sends (args, kwargs, {"python": "X.Y"}); the worker checks X.Y and ignores the rest.
    here = "%d.%d" % sys.version_info[:2]
    add = worker.ref("add")
    for meta in ({"python": here}, {"python": platform.python_version()}, {}, {"other": 1}):
        header, payload = worker.task(add, pickle.dumps(((2,), {"b": 3}, meta)), enc="pickle")
        assert header["ok"] and pickle.loads(payload) == 5, (meta, header)


def test_pickle_meta_python_version_mismatch(worker):
    here = "%d.%d" % sys.version_info[:2]
    add = worker.ref("add")
    for theirs in ("2.7", "3.%d" % (sys.version_info[1] + 1)):
        header, payload = worker.task(add, pickle.dumps(((1,), {}, {"python": theirs})),
                                      enc="pickle")
        assert header["ok"] is False and payload == b""
        err = header["error"]
        assert (err["kind"], err["type"]) == ("bad_input", "TypeError")
        assert err["message"].startswith(
            "arguments were pickled by Python %s on the client but this worker runs Python %s (%s);"
            % (theirs, here, sys.executable)), err["message"]
    header, _ = worker.task(add, pickle.dumps(((1,), {}, "3.11")), enc="pickle")
    assert header["error"]["kind"] == "bad_input"
    assert "metadata must be a dict, not str" in header["error"]["message"]
    header, _ = worker.task(add, pickle.dumps(((1,), {}, {}, {})), enc="pickle")
    assert "(args, kwargs) or (args, kwargs, meta)" in header["error"]["message"]
    assert worker.call_pickle(add, 1, 2) == 3  # the same worker goes on


def test_python_ref_resolves_against_cwd(worker):
    assert worker.call(worker.ref("sys_path0")) == str(worker.cwd)
    assert worker.call(worker.ref("Ops.triple"), 7) == 21
    assert worker.call(worker.ref("dumps", module="json"), [1]) == "[1]"


def test_python_file(worker, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "fnx_helper_mod.py").write_text("def double(x):\n    return 2 * x\n")
    (scripts / "job.py").write_text(textwrap.dedent("""
        from fnx_helper_mod import double
        LOADS = []
        LOADS.append(1)
        def run(x):
            return double(x) + len(LOADS) - 1
        class Ops:
            @staticmethod
            def triple(x):
                return 3 * x
        def module_name():
            return __name__
    """))
    path = str(scripts / "job.py")
    run = worker.define({"kind": "python_file", "path": path, "name": "run"})
    assert worker.call(run, 21) == 42
    triple = worker.define({"kind": "python_file", "path": path, "name": "Ops.triple"})
    assert worker.call(triple, 5) == 15
    # The second def of the same file reuses the loaded module (LOADS still has one entry).
    assert worker.call(run, 1) == 2
    assert worker.call(worker.define({"kind": "python_file", "path": path,
                                      "name": "module_name"})) == "job"


def test_python_source(worker):
    source = textwrap.dedent("""
        import dataclasses
        @dataclasses.dataclass
        class P:
            x: int
        def sq(x):
            return P(x).x ** 2
        def fail():
            raise KeyError("the key")
        class Ns:
            def twice(x):
                return x * 2
    """)
    assert worker.call(worker.define({"kind": "python_source", "source": source,
                                      "name": "sq"}), 9) == 81
    assert worker.call(worker.define({"kind": "python_source", "source": source,
                                      "name": "Ns.twice"}), "ab") == "abab"
    err = worker.error(worker.define({"kind": "python_source", "source": source, "name": "fail"}))
    assert err["kind"] == "exception" and err["type"] == "KeyError"
    assert err["message"] == "'the key'"
    assert 'raise KeyError("the key")' in err["traceback"]  # source lines shown


def test_exception_reported_and_same_worker_continues(worker):
    err = worker.error(worker.ref("boom"), "bad value")
    assert err["kind"] == "exception"
    assert err["type"] == "ValueError"
    assert err["message"] == "bad value"
    tb = err["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert "userfns.py" in tb and "in boom" in tb
    assert "fnx_worker.py" not in tb  # the worker's own frame is left out
    assert tb.rstrip().endswith("ValueError: bad value")
    pid = worker.call(worker.ref("getpid"))
    assert pid == worker.ready[0]["pid"] == worker.proc.pid
    assert worker.call(worker.ref("add"), 1, 2) == 3

    err = worker.error(worker.ref("sys_exit"))
    assert (err["kind"], err["type"], err["message"]) == ("exception", "SystemExit", "4")
    err = worker.error(worker.ref("add"), 1, 2, 3)  # wrong arity is the caller's exception
    assert err["kind"] == "exception" and err["type"] == "TypeError"
    assert "positional argument" in err["message"]
    assert worker.call(worker.ref("getpid")) == pid


def test_exception_with_failing_str_and_reduce(worker):
    err = worker.error(worker.ref("bad_str"))
    assert err["kind"] == "exception"
    assert err["type"] == "userfns.BadStr"
    assert err["message"] == "BadStr('hidden')"  # str() failed, repr() used
    assert "in bad_str" in err["traceback"]
    err = worker.error(worker.ref("bad_repr"), enc="pickle")
    assert err["type"] == "userfns.BadRepr"
    assert err["message"] == "<unprintable BadRepr>"
    assert worker.call(worker.ref("add"), 1, 1) == 2


def test_huge_exception_message_truncated(worker):
    n = 50_000_000
    err = worker.error(worker.ref("huge_error"), n)
    assert err["type"] == "RuntimeError"
    message = err["message"]
    assert message == "x" * LIMIT + "[... %d bytes truncated]" % (n - LIMIT)
    tb = err["traceback"]
    assert len(tb.encode()) < LIMIT + 100
    assert tb.startswith("Traceback (most recent call last):")
    assert tb.endswith("x" * 1000 + "\n")
    assert "bytes truncated]" in tb
    assert worker.call(worker.ref("ident"), "after") == "after"


def test_print_goes_to_log(worker):
    n = 5 * 1024 * 1024
    assert worker.call(worker.ref("chatty"), n) == n
    assert worker.call(worker.ref("ident"), {"next": [1, 2]}) == {"next": [1, 2]}
    log = worker.log()
    assert log.count("y" * 1023 + "\n") == n // 1024
    assert "raw fd 1 write\n" in log and "to stderr\n" in log


def test_user_code_reading_stdin_gets_eof(worker):
    assert worker.call(worker.ref("read_stdin")) == ["", ""]
    assert worker.call(worker.ref("add"), 2, 2) == 4


def test_subprocesses_cannot_touch_protocol(worker, tmp_path):
    out = tmp_path / "child_fds.json"
    assert worker.call(worker.ref("spawn"), str(out)) == [0, 0]
    links = json.loads(out.read_text())
    assert links["0"] == "/dev/null"
    assert links["1"] == links["2"] == str(worker.log_path)
    assert not [link for link in links.values() if link.startswith("pipe:")]
    assert "hi from os.system\n" in worker.log()
    assert worker.call(worker.ref("add"), 40, 2) == 42


def test_forked_child_cannot_answer(worker):
    # The child of a bare os.fork() returns into the worker loop; its reply must go nowhere.
    assert worker.call(worker.ref("fork_and_return")) == "parent"
    for i in range(20):
        assert worker.call(worker.ref("ident"), i) == i
    assert worker.call(worker.ref("getpid")) == worker.proc.pid


@pytest.mark.parametrize("func, enc, type_name, fragment", [
    ("int_keys", "json", "TypeError", "dict key 1 of type int is not a string"),
    ("nan", "json", "ValueError", "Out of range float values are not JSON compliant"),
    ("raw_bytes", "json", "TypeError", "Object of type bytes is not JSON serializable"),
    ("plain_object", "json", "TypeError", "Object of type object is not JSON serializable"),
    ("surrogate", "json", "UnicodeEncodeError", "surrogates not allowed"),
    ("make_lambda", "pickle", None, "result cannot be pickled: "),
])
def test_not_serializable(worker, func, enc, type_name, fragment):
    err = worker.error(worker.ref(func), enc=enc)
    assert err["kind"] == "not_serializable"
    if type_name:
        assert err["type"] == type_name
    assert fragment in err["message"]
    assert worker.call(worker.ref("ident"), 5) == 5


def test_big_integer_exact(worker):
    header, payload = worker.task(worker.ref("big"), b"[]")
    assert header["ok"] and payload == b"1267650600228229401496703205376"
    assert json.loads(payload) == 2 ** 100
    assert worker.call(worker.ref("ident"), -(2 ** 80)) == -(2 ** 80)


def test_result_too_large(make_worker):
    worker = make_worker(max_result=1000)
    ident = worker.ref("ident")
    err = worker.error(ident, "x" * 2000)
    assert err["kind"] == "result_too_large"
    # A string longer than the limit is refused before it is encoded: its size is a bound.
    assert err["message"] == "result of at least 2002 bytes exceeds the limit of 1000 bytes"
    err = worker.error(ident, ["x" * 2000])
    assert err["message"] == "result of 2004 bytes exceeds the limit of 1000 bytes"
    assert worker.call(ident, "x" * 998) == "x" * 998  # exactly 1000 bytes is allowed
    err = worker.error(ident, "x" * 2000, enc="pickle")
    assert err["kind"] == "result_too_large"
    assert "exceeds the limit of 1000 bytes" in err["message"]


def peak_kib(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_large_pickled_results_are_never_held_twice(make_worker):
    """FAULTS 18: a result is pickled twice (counted, then streamed into the pipe), not held
    as an object and a copy; one over the limit is refused with its exact size, unencoded."""
    mib = 1 << 20
    worker = make_worker(max_result=128 * mib)
    big = worker.ref("big_bytes")
    assert worker.call_pickle(big, 3 * mib) == b"x" * (3 * mib)  # warm-up
    before = peak_kib(worker.proc.pid)
    assert worker.call_pickle(big, 64 * mib) == b"x" * (64 * mib)
    grew = (peak_kib(worker.proc.pid) - before) / 1024
    assert grew < 64 + 16, "the worker's peak grew by %d MiB for a 64 MiB result" % grew
    err = worker.error(big, 200 * mib, enc="pickle")
    assert err["kind"] == "result_too_large", err
    size = len(pickle.dumps(b"x" * (200 * mib), pickle.HIGHEST_PROTOCOL))
    assert err["message"] == "result of %d bytes exceeds the limit of %d bytes" % (
        size, 128 * mib), err
    grew = (peak_kib(worker.proc.pid) - before) / 1024
    assert grew < 200 + 16, "the worker's peak grew by %d MiB for a 200 MiB result" % grew
    # Still in service.
    assert worker.call_pickle(worker.ref("add"), 1, 2) == 3


def test_a_result_that_pickles_differently_twice_ends_the_worker(worker):
    worker.tid += 1
    worker.send({"op": "task", "tid": worker.tid, "fid": worker.ref("growing"), "enc": "pickle"},
                pickle.dumps(((), {})))
    assert worker.proc.wait(TIMEOUT) == 3
    assert "pickled to a different size the second time" in worker.log()


def test_import_errors(worker):
    missing = worker.ref("f", module="no_such_module_fnx")
    for _ in range(2):  # the failure is cached: every task of the fid fails the same way
        err = worker.error(missing)
        assert err["kind"] == "import_error"
        assert err["type"] == "ModuleNotFoundError"
        assert err["message"] == "No module named 'no_such_module_fnx'"
        assert "ModuleNotFoundError" in err["traceback"]

    err = worker.error(worker.ref("nope"))
    assert (err["kind"], err["type"]) == ("import_error", "AttributeError")
    assert "has no attribute 'nope'" in err["message"]

    err = worker.error(worker.define({"kind": "python_source", "source": "def f(:\n", "name": "f"}))
    assert (err["kind"], err["type"]) == ("import_error", "SyntaxError")
    assert "SyntaxError" in err["traceback"]

    err = worker.error(worker.define({"kind": "python_source", "source": "raise SystemExit(9)",
                                      "name": "f"}))
    assert (err["kind"], err["type"], err["message"]) == ("import_error", "SystemExit", "9")

    err = worker.error(worker.define({"kind": "python_file", "path": "/nonexistent/x.py",
                                      "name": "f"}))
    assert (err["kind"], err["type"]) == ("import_error", "FileNotFoundError")

    err = worker.error(worker.define({"kind": "python_source", "source": "f = 3", "name": "f"}))
    assert err["kind"] == "import_error" and "not a callable" in err["message"]
    assert worker.call(worker.ref("add"), 1, 2) == 3


def test_bad_input(worker):
    add = worker.ref("add")
    for payload, fragment in [(b"5", "not int"), (b'"s"', "not str"), (b"null", "not null"),
                              (b"[1,", "Expecting value")]:
        header, _ = worker.task(add, payload)
        assert header["ok"] is False
        assert header["error"]["kind"] == "bad_input"
        assert fragment in header["error"]["message"]
    header, _ = worker.task(add, b"not a pickle", enc="pickle")
    assert header["error"]["kind"] == "bad_input"
    header, _ = worker.task(add, pickle.dumps([1, 2]), enc="pickle")
    assert header["error"]["kind"] == "bad_input"
    assert "(args, kwargs)" in header["error"]["message"]
    assert worker.call(add, 1, 2) == 3


def test_exit_op(worker):
    assert worker.call(worker.ref("add"), 1, 2) == 3
    worker.send({"op": "exit"})
    assert worker.recv() is None
    assert worker.proc.wait(TIMEOUT) == 0
    assert "exiting: exit requested" in worker.log()


def test_eof_exits_zero(worker):
    worker.proc.stdin.close()
    assert worker.recv() is None
    assert worker.proc.wait(TIMEOUT) == 0
    assert "exiting: end of protocol input" in worker.log()


def test_os_exit_in_user_code(worker):
    worker.tid += 1
    worker.send({"op": "task", "tid": worker.tid, "fid": worker.ref("exit_hard"), "enc": "json"},
                b"[3]")
    assert worker.recv() is None
    assert worker.proc.wait(TIMEOUT) == 3


def test_protocol_error_exits_two(worker):
    worker.send({"op": "bogus"})
    assert worker.recv() is None
    assert worker.proc.wait(TIMEOUT) == 2
    assert "unknown op 'bogus'" in worker.log()


GOLDEN = json.loads((Path(__file__).resolve().parent / "golden" / "worker_frames.json").read_text())


def _golden(direction):
    """``{name: frame bytes}`` of the frames the manager (manager/src/wire.rs) agrees on."""
    out = {}
    for f in GOLDEN[direction]:
        header, payload = f["header"].encode(), f["payload"].encode()
        out[f["name"]] = struct.pack(">II", 4 + len(header) + len(payload), len(header)) + header + payload
    return out


def test_golden_frames_a_real_worker_answers_the_managers_frames_byte_for_byte(tmp_path):
    to_worker, from_worker = _golden("manager_to_worker"), _golden("worker_to_manager")
    w = Worker(tmp_path)
    try:
        header, _ = w.ready
        assert set(header) == {"op", "pid", "python", "executable"} and header["op"] == "ready"
        fd = w.proc.stdout.fileno()
        for send, answer in [(["def_python_source", "task_json"], "result_task_json"),
                             (["def_python_ref", "task_in_cwd"], "result_task_in_cwd")]:
            w.proc.stdin.write(b"".join(to_worker[name] for name in send))
            want = from_worker[answer]
            got = w._read_exact(len(want))
            assert got == want, (answer, got)
        w.proc.stdin.write(to_worker["exit"])
        assert w.proc.wait(timeout=TIMEOUT) == 0
        assert os.read(fd, 1) == b"", "nothing after the last result"
    finally:
        w.close()


def test_golden_frames_the_workers_own_headers_are_written_byte_for_byte():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fnx_worker_golden", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    golden = {f["name"]: f["header"].encode() for f in GOLDEN["worker_to_manager"]}
    assert worker._ready_header(4242, "3.11.7", "/usr/bin/python3") == golden["ready"]
    assert worker._OK_JSON % 7 == golden["result_task_json"]
    error = worker._error_frame(9, "exception", "ValueError", "boom",
                                "Traceback (most recent call last):\nValueError: boom\n")
    assert error == golden["result_error"]


def test_a_ready_header_with_an_interpreter_path_that_is_not_utf8_sends_null():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fnx_worker_ready", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    for exe in [None, "", "/opt/py\udcff/bin/python3"]:
        header = json.loads(worker._ready_header(1, "3.12.1", exe))
        assert header == {"op": "ready", "pid": 1, "python": "3.12.1", "executable": None}, exe
