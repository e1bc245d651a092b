"""Unit tests of the fnx SDK that need no daemon.

Where an HTTP exchange is needed the peer is a real threaded HTTP/1.1 server (``Peer``) on a
loopback port or on a Unix domain socket in the test's directory (the ``peer`` fixture runs
each test over both); its ``handle`` function decides each answer and every request is
recorded. ``FakeDaemon`` is such a handler implementing the few endpoints the Executor uses,
running each call in the test process, with switches for the orderings the Executor must
survive (results before the submit answer, results missing from the stream).
"""

import base64
import concurrent.futures
import itertools
import json
import math
import pickle
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fnx  # noqa: E402
from fnx import client as fnx_client  # noqa: E402

PY = "%d.%d" % sys.version_info[:2]
TOKEN = "fnx_test_token"


@dataclass
class Request:
    method: str
    path: str
    headers: dict
    body: object
    conn: int  # numbers the connection (the server's count, from 1)


class Peer:
    """A real HTTP/1.1 server in a thread, on a loopback port or (``unix``: a path) on a Unix
    domain socket. ``handle(request)`` returns ``(status, doc)``, or None to drop the
    connection without answering."""

    def __init__(self, handle=None, unix=None):
        self.requests = []
        self.connections = itertools.count(1)
        self.handle = handle or (lambda req: (404, {"error": {"code": "not_found",
                                                               "message": "no route"}}))
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                self.number = next(peer.connections)  # id() of a closed socket is reused

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                req = Request(self.command, self.path, dict(self.headers),
                              json.loads(raw) if raw else None, self.number)
                peer.requests.append(req)
                answer = peer.handle(req)
                if answer is None:
                    self.close_connection = True
                    return
                status, doc = answer
                data = doc if isinstance(doc, bytes) else \
                    (b"" if doc is None else json.dumps(doc).encode())
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args):
                pass

        if unix is None:
            self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        else:
            self.server = socketserver.ThreadingUnixStreamServer(str(unix), Handler)
            self.url = "unix://%s" % unix
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def client(self, **kwargs):
        return fnx.Client(self.url, TOKEN, **kwargs)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["tcp", "unix"])
def peer(request, tmp_path):
    p = Peer(unix=tmp_path / "fnx.sock" if request.param == "unix" else None)
    yield p
    p.close()


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(fnx_client, "SUBMIT_BACKOFF_S", (0.01,))


def pickled(value):
    return {"encoding": "pickle", "data_b64": base64.b64encode(pickle.dumps(value)).decode()}


# ---------------------------------------------------------------------------- configuration


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """FNX_HOME in the test's directory (returned), no FNX_URL/FNX_TOKEN, and the host-wide
    socket moved there too (``tmp_path / "run" / "fnx.sock"``, not created)."""
    for var in ("FNX_URL", "FNX_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FNX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fnx_client, "SYSTEM_SOCKET", str(tmp_path / "run" / "fnx.sock"))
    return tmp_path / "home"


def write_client_json(home, **doc):
    home.mkdir(parents=True, exist_ok=True)
    (home / "client.json").write_text(json.dumps(doc))


def test_config_arguments_then_env_then_file(clean_env, monkeypatch):
    write_client_json(clean_env, url="http://file:1", token="t-file", user="alice")
    assert fnx_client.resolve_config() == ("http://file:1", "t-file")
    monkeypatch.setenv("FNX_URL", "http://env:2")
    assert fnx_client.resolve_config() == ("http://env:2", "t-file")  # each value on its own
    monkeypatch.setenv("FNX_TOKEN", "t-env")
    assert fnx_client.resolve_config() == ("http://env:2", "t-env")
    assert fnx_client.resolve_config("http://arg:3", "t-arg") == ("http://arg:3", "t-arg")
    assert fnx.Client(token="t-arg").url == "http://env:2"


def test_config_default_home_is_dot_fnx(monkeypatch, tmp_path):
    for var in ("FNX_URL", "FNX_TOKEN", "FNX_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    write_client_json(tmp_path / ".fnx", url="http://h:4", token="t")
    assert fnx_client.resolve_config() == ("http://h:4", "t")


def test_config_missing_names_every_place(clean_env):
    with pytest.raises(fnx.ConfigError) as info:
        fnx.Client()
    text = str(info.value)
    for part in ("URL or token", "Client(url=..., token=...)", "FNX_URL", "FNX_TOKEN",
                 str(clean_env / "client.json")):
        assert part in text, text
    write_client_json(clean_env, url="http://file:1")
    with pytest.raises(fnx.ConfigError, match="no fnx token found"):
        fnx.Client()


def test_config_unreadable_file(clean_env):
    clean_env.mkdir()
    (clean_env / "client.json").write_text("{not json")
    with pytest.raises(fnx.ConfigError, match="cannot read .*client.json"):
        fnx.Client()
    with pytest.raises(fnx.ConfigError, match="not an http://, https:// or unix:// URL"):
        fnx.Client("ftp://x", "t")


# ---------------------------------------------------------------------------- payloads


def test_pickle_payload_carries_client_python():
    task = fnx_client.make_task(7, (1, [2]), {"k": b"v"}, pool="gpu", priority=None)
    assert set(task) == {"function", "encoding", "data_b64", "pool"}
    assert (task["function"], task["encoding"], task["pool"]) == (7, "pickle", "gpu")
    args, kwargs, meta = pickle.loads(base64.b64decode(task["data_b64"]))
    assert (args, kwargs, meta) == ((1, [2]), {"k": b"v"}, {"python": PY})


def test_json_payload():
    assert fnx_client.make_task(3, [4], encoding="json") == {"function": 3, "args": [4]}
    assert fnx_client.make_task(3, (), {"x": 5}, "json", walltime=60) == \
        {"function": 3, "args": {"x": 5}, "walltime": 60}
    with pytest.raises(TypeError, match="positional or keyword"):
        fnx_client.make_task(3, [1], {"x": 2}, "json")


def test_decode_results():
    assert fnx_client.decode_record({"id": 1, "state": "success",
                                     "result": {"encoding": "json", "value": [1, 2]}}) == [1, 2]
    assert fnx_client.decode_record({"id": 1, "state": "success",
                                     "result": pickled({3, 4})}) == {3, 4}
    garbage = {"encoding": "pickle", "data_b64": base64.b64encode(b"\x80\x09junk").decode()}
    with pytest.raises(fnx.ResultDecodeError) as info:
        fnx_client.decode_record({"id": 9, "state": "success", "result": garbage})
    text = str(info.value)
    assert "task 9 was pickled by a worker whose Python may differ" in text
    assert "Python %s" % sys.version.split()[0] in text


TRACEBACK = ('Traceback (most recent call last):\n  File "<fnx source fid=3>", line 2, in div\n'
             '    return 1 / x\nZeroDivisionError: division by zero\n')


def test_remote_exception_reconstruction():
    exc = fnx_client.task_error(41, "failed", {"kind": "exception", "type": "ZeroDivisionError",
                                               "message": "division by zero",
                                               "traceback": TRACEBACK})
    assert isinstance(exc, fnx.RemoteException) and isinstance(exc, fnx.TaskFailed)
    assert isinstance(exc, ZeroDivisionError)  # `except ZeroDivisionError` works
    assert (exc.task_id, exc.kind, exc.type_name) == (41, "exception", "ZeroDivisionError")
    assert exc.remote_traceback == TRACEBACK
    text = str(exc)
    assert text.startswith("ZeroDivisionError: division by zero\n")
    assert "Remote traceback:\n" + TRACEBACK.rstrip() in text and "task 41" in text
    assert TRACEBACK.rstrip() in str(exc.__cause__)
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc) and str(again) == text

    custom = fnx_client.task_error(5, "failed", {"kind": "exception", "type": "mod.Custom",
                                                 "message": "m", "traceback": "tb"})
    assert type(custom) is fnx.RemoteException and "mod.Custom: m" in str(custom)


def test_other_failures():
    exc = fnx_client.task_error(6, "failed", {"kind": "walltime", "type": "",
                                              "message": "killed after 60 s", "traceback": ""})
    assert type(exc) is fnx.TaskFailed and exc.kind == "walltime"
    assert str(exc) == "task 6 failed (walltime): killed after 60 s"
    exc = fnx_client.task_error(7, "cancelled", {"kind": "cancelled", "message": ""})
    assert type(exc) is fnx.TaskCancelled and str(exc) == "task 7 was cancelled"


# ---------------------------------------------------------------------------- registration

import math as maths_alias  # noqa: E402  (a module global under another name)
from os.path import join as path_join  # noqa: E402

SCALE = 3


def uses_imports(x, base=math.e):
    return maths_alias.floor(math.log(x, base)) + len(path_join("a", "b"))


def uses_constant(x):
    return x * SCALE


class Box:
    def method(self):
        return self


def make_closure():
    y = 1

    def inner(x):
        return x + y
    return inner


def test_source_of_a_function():
    source, entry = fnx_client.source_of(uses_imports)
    assert entry == "uses_imports"
    assert source.splitlines()[:3] == ["import math", "import math as maths_alias",
                                       "from posixpath import join as path_join"]
    namespace = {}
    exec(source, namespace)
    assert namespace["uses_imports"](100) == uses_imports(100)


@pytest.mark.parametrize("fn, fragment", [
    (lambda x: x, "a lambda has no name"),
    (make_closure(), "closure over y"),
    (uses_constant, "uses the global name(s) SCALE"),
    (len, "only plain functions"),
    (Box().method, "only plain functions"),
])
def test_unsendable_callables(fn, fragment):
    with pytest.raises(fnx.FnxError) as info:
        fnx_client.source_of(fn)
    assert fragment in str(info.value) and '"module:qualname"' in str(info.value)


def test_register_forms(peer):
    def answer(req):
        return 201, {"id": len(peer.requests), "name": "x", "kind": req.body["kind"]}
    peer.handle = answer
    c = peer.client()
    assert c.register_function(uses_imports) == 1
    assert c.register_function("pkg.mod:func", name="f") == 2
    assert c.register_function("def a(x):\n    return x\n") == 3
    assert c.register_function("def a(): pass\ndef b(): pass\n", entry="b") == 4
    assert c.register_shell("gzip -k {path}") == 5
    with pytest.raises(fnx.FnxError, match="defines 2 top-level functions"):
        c.register_function("def a(): pass\ndef b(): pass\n")
    bodies = [r.body for r in peer.requests]
    assert bodies[0]["kind"] == "python" and bodies[0]["entry"] == "uses_imports"
    assert "def uses_imports(x, base=math.e):" in bodies[0]["source"]
    assert bodies[1] == {"kind": "python", "ref": "pkg.mod:func", "name": "f"}
    assert bodies[2] == {"kind": "python", "source": "def a(x):\n    return x\n", "entry": "a"}
    assert bodies[3]["entry"] == "b"
    assert bodies[4] == {"kind": "shell", "command": "gzip -k {path}"}
    for r in peer.requests:
        assert r.headers["Authorization"] == "Bearer " + TOKEN
        assert r.headers["Content-Type"] == "application/json"
    # A callable is registered once per client; a shell function gets JSON arguments.
    assert c.function_id(uses_imports) == c.function_id(uses_imports) == 6
    peer.handle = lambda req: (201, {"ids": [100]})
    assert c.run(5, path="/tmp/x") == 100
    assert peer.requests[-1].body == {"tasks": [{"function": 5, "args": {"path": "/tmp/x"}}]}


# ---------------------------------------------------------------------------- HTTP


@pytest.mark.parametrize("status, code, cls", [
    (400, "bad_request", fnx.BadRequest), (401, "unauthorized", fnx.AuthError),
    (403, "forbidden", fnx.Forbidden), (404, "not_found", fnx.NotFound),
    (413, "payload_too_large", fnx.PayloadTooLarge), (429, "queue_limit", fnx.QueueFull),
    (503, "store_unavailable", fnx.StoreUnavailable), (500, "internal", fnx.HTTPError),
])
def test_error_mapping(peer, status, code, cls):
    peer.handle = lambda req: (status, {"error": {"code": code, "message": "the reason"}})
    with pytest.raises(cls) as info:
        peer.client().get_task(12)
    exc = info.value
    assert (exc.status, exc.code, exc.message) == (status, code, "the reason")
    assert str(exc) == "HTTP %d %s: the reason (GET /v1/tasks/12)" % (status, code)
    assert isinstance(exc, fnx.HTTPError) and isinstance(exc, fnx.FnxError)


def test_error_body_not_json(peer):
    peer.handle = lambda req: (502, b"<html>bad gateway</html>")
    with pytest.raises(fnx.HTTPError, match="HTTP 502 : <html>bad gateway</html>"):
        peer.client().status()


def test_keep_alive_and_one_reconnect(peer):
    answers = iter([(200, {"n": 1}), None, (200, {"n": 2}), None, None])
    peer.handle = lambda req: next(answers)
    c = peer.client()
    assert c.status() == {"n": 1}
    assert c.status() == {"n": 2}  # the reused connection broke: reconnected, sent again
    conns = [r.conn for r in peer.requests]
    assert conns[0] == conns[1] != conns[2]
    with pytest.raises(fnx.ConnectionFailed):  # broken twice: given up
        c.status()
    assert len(peer.requests) == 5


def test_connection_per_thread(peer):
    peer.handle = lambda req: (200, {})
    c = peer.client()
    c.status()
    t = threading.Thread(target=c.status)
    t.start()
    t.join()
    c.status()
    conns = [r.conn for r in peer.requests]
    assert conns[0] == conns[2] != conns[1]


def test_unreachable_daemon():
    with pytest.raises(fnx.ConnectionFailed, match="cannot reach fnx daemon at"):
        fnx.Client("http://127.0.0.1:1", "t").status()


def test_submit_retried_with_same_idempotency_key(peer, no_backoff):
    answers = iter([(503, {"error": {"code": "store_unavailable", "message": "disk full"}}),
                    None, (201, {"ids": [1, 2]})])
    # The client asks once what kind function 3 is (registered elsewhere): a Python function.
    kind = (200, {"id": 3, "kind": "python"})
    peer.handle = lambda req: kind if req.path == "/v1/functions/3" else next(answers)
    c = peer.client()
    assert c.batch_run([(3, (1,), {}), (3, (2,), {"z": 1})]) == [1, 2]
    posts = [r for r in peer.requests if r.path == "/v1/tasks"]
    keys = [r.headers["Idempotency-Key"] for r in posts]
    assert len(keys) == 3 and len(set(keys)) == 1 and len(keys[0]) >= 16
    payload = pickle.loads(base64.b64decode(posts[0].body["tasks"][1]["data_b64"]))
    assert payload == ((2,), {"z": 1}, {"python": PY})
    peer.handle = lambda req: (201, {"ids": list(range(len(req.body["tasks"])))})
    assert len(c.batch_run((3, (i,), {}) for i in range(10_001))) == 10_001
    posts = [r for r in peer.requests if r.path == "/v1/tasks"]
    assert [len(r.body["tasks"]) for r in posts[3:]] == [10_000, 1]
    assert posts[3].headers["Idempotency-Key"] != posts[4].headers["Idempotency-Key"]


def test_get_result_long_polls_and_times_out(peer):
    peer.handle = lambda req: (200, {"id": 5, "state": "running"})
    c = peer.client()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="task 5 not finished after 1.5s"):
        c.get_result(5, timeout=1.5)
    assert 1.4 < time.monotonic() - start < 3
    assert peer.requests[0].path == "/v1/tasks/5?wait=1"
    assert all(r.path in ("/v1/tasks/5?wait=1", "/v1/tasks/5") for r in peer.requests)
    answers = iter([(200, {"id": 5, "state": "queued"}),
                    (200, {"id": 5, "state": "success", "result": pickled([1, (2,)])})])
    peer.handle = lambda req: next(answers)
    assert c.get_result(5) == [1, (2,)]
    assert peer.requests[-1].path == "/v1/tasks/5?wait=30"
    peer.handle = lambda req: (200, {"id": 6, "state": "failed", "error": {
        "kind": "exception", "type": "KeyError", "message": "'k'", "traceback": "tb"}})
    with pytest.raises(KeyError) as info:
        c.get_result(6)
    assert isinstance(info.value, fnx.RemoteException) and info.value.task_id == 6


def test_get_results_in_order(peer):
    def answer(req):
        if req.path == "/v1/tasks/status":
            return 200, {"tasks": [{"id": i, "state": "success" if i != 3 else "failed",
                                    "result": {"encoding": "json", "value": i * 10},
                                    "error": {"kind": "walltime", "message": "late"}}
                                   for i in req.body["ids"]]}
    peer.handle = answer
    c = peer.client()
    assert c.get_results([2, 1]) == [20, 10]
    with pytest.raises(fnx.TaskFailed, match="walltime"):
        c.get_results([1, 3])
    out = c.get_results([3, 1], return_exceptions=True)
    assert isinstance(out[0], fnx.TaskFailed) and out[1] == 10


# ---------------------------------------------------------------------------- Unix socket


@pytest.fixture
def unix_peer(tmp_path):
    p = Peer(lambda req: (200, {"path": req.path}), unix=tmp_path / "d.sock")
    yield p
    p.close()


def test_unix_url_needs_no_token(clean_env, unix_peer):
    assert fnx_client.resolve_config(unix_peer.url) == (unix_peer.url, None)
    c = fnx.Client(unix_peer.url)
    assert c.url == unix_peer.url
    assert c.status() == {"path": "/v1/status"}
    req = unix_peer.requests[-1]
    assert "Authorization" not in req.headers and req.headers["Host"] == "localhost"
    fnx.Client(unix_peer.url, "t-unix").whoami()  # a token that is given is sent as over TCP
    assert unix_peer.requests[-1].path == "/v1/whoami"
    assert unix_peer.requests[-1].headers["Authorization"] == "Bearer t-unix"


def test_unix_url_from_env_or_client_json(clean_env, unix_peer, monkeypatch):
    monkeypatch.setenv("FNX_URL", unix_peer.url)
    assert fnx_client.resolve_config() == (unix_peer.url, None)
    assert fnx.Client().health() == {"path": "/v1/health"}
    assert "Authorization" not in unix_peer.requests[-1].headers
    monkeypatch.setenv("FNX_TOKEN", "t-env")
    fnx.Client().status()
    assert unix_peer.requests[-1].headers["Authorization"] == "Bearer t-env"
    for var in ("FNX_URL", "FNX_TOKEN"):
        monkeypatch.delenv(var)
    write_client_json(clean_env, url=unix_peer.url)  # no token in the file either
    c = fnx.Client()
    assert c.url == unix_peer.url and c.status() == {"path": "/v1/status"}
    assert "Authorization" not in unix_peer.requests[-1].headers
    assert len(unix_peer.requests) == 3


def test_socket_found_under_fnx_home(clean_env):
    clean_env.mkdir()
    peer = Peer(unix=clean_env / "fnx.sock")
    try:
        daemon = FakeDaemon(peer)
        url = "unix://%s" % (clean_env / "fnx.sock")
        assert fnx_client.resolve_config() == (url, None)  # no client.json, nothing in the env
        with fnx.Executor() as ex:  # its Client() finds the socket too
            assert ex.client.url == url
            assert ex.submit(square, 7).result(10) == 49
        assert len(daemon.functions) == 1 and peer.requests
        assert all("Authorization" not in r.headers for r in peer.requests)
    finally:
        peer.close()


def test_host_socket_is_the_last_resort(clean_env, tmp_path):
    clean_env.mkdir()
    (clean_env / "fnx.sock").write_text("")  # a file, not a socket: passed over
    (tmp_path / "run").mkdir()
    host = Peer(lambda req: (200, {"who": "host"}), unix=fnx_client.SYSTEM_SOCKET)
    try:
        assert fnx_client.resolve_config() == ("unix://" + fnx_client.SYSTEM_SOCKET, None)
        assert fnx.Client().status() == {"who": "host"}
        (clean_env / "fnx.sock").unlink()
        mine = Peer(lambda req: (200, {"who": "mine"}), unix=clean_env / "fnx.sock")
        try:
            assert fnx.Client().status() == {"who": "mine"}  # $FNX_HOME/fnx.sock comes first
        finally:
            mine.close()
    finally:
        host.close()


def test_config_sources_win_over_a_socket(clean_env, monkeypatch):
    clean_env.mkdir()
    found = Peer(unix=clean_env / "fnx.sock")
    try:
        write_client_json(clean_env, url="http://file:1", token="t-file")
        assert fnx_client.resolve_config() == ("http://file:1", "t-file")
        monkeypatch.setenv("FNX_URL", "http://env:2")
        assert fnx_client.resolve_config() == ("http://env:2", "t-file")
        assert fnx_client.resolve_config("unix:///arg.sock") == ("unix:///arg.sock", "t-file")
        monkeypatch.delenv("FNX_URL")
        write_client_json(clean_env, token="t-file")  # a token but no URL: the socket, with it
        assert fnx_client.resolve_config() == (found.url, "t-file")
    finally:
        found.close()
    assert found.requests == []


def test_unix_keep_alive_and_timeout(clean_env, unix_peer):
    c = fnx.Client(unix_peer.url, timeout=0.5)
    for i in range(5):
        assert c.get_task(i) == {"path": "/v1/tasks/%d" % i}
    conns = [r.conn for r in unix_peer.requests]
    assert len(conns) == 5 and len(set(conns)) == 1  # one connection for all five
    t = threading.Thread(target=c.status)
    t.start()
    t.join()
    assert unix_peer.requests[-1].conn != conns[0]  # another thread: its own connection
    unix_peer.handle = lambda req: time.sleep(1.5) or (200, {})
    with pytest.raises(fnx.ConnectionFailed, match="no answer from unix://.* within 0.5s"):
        c.status()
    unix_peer.handle = lambda req: (200, {"again": True})
    assert c.status() == {"again": True}  # reconnected after the timeout
    assert unix_peer.requests[-1].conn not in conns


@pytest.mark.parametrize("url", ["unix://fnx.sock", "unix://run/fnx/fnx.sock", "unix://",
                                 "unix:/tmp/fnx.sock", "UNIX:relative.sock"])
def test_unix_url_needs_an_absolute_path(clean_env, monkeypatch, url):
    for attempt in (lambda: fnx.Client(url), lambda: fnx.Client(url, "t"),
                    lambda: fnx_client.resolve_config(url)):
        with pytest.raises(fnx.ConfigError) as info:
            attempt()
        assert repr(url) in str(info.value) and "absolute path" in str(info.value)
    monkeypatch.setenv("FNX_URL", url)
    with pytest.raises(fnx.ConfigError, match="does not name a socket by its absolute path"):
        fnx.Client()


def test_missing_or_refusing_socket(tmp_path):
    missing = tmp_path / "missing.sock"
    with pytest.raises(fnx.ConnectionFailed) as info:
        fnx.Client("unix://%s" % missing).status()
    assert isinstance(info.value, ConnectionError)
    assert "cannot reach fnx daemon at unix://" in str(info.value)
    assert "No such file or directory: '%s'" % missing in str(info.value)
    stale = tmp_path / "stale.sock"  # a socket left behind by a daemon that is gone
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    with pytest.raises(fnx.ConnectionFailed, match="Connection refused: '%s'" % stale):
        fnx.Client("unix://%s" % stale).status()


def test_config_missing_names_the_sockets(clean_env, monkeypatch):
    clean_env.mkdir()
    (clean_env / "fnx.sock").write_text("")  # not a socket
    with pytest.raises(fnx.ConfigError) as info:
        fnx.Client()
    text = str(info.value)
    for part in ("no fnx URL or token found", "FNX_URL", str(clean_env / "client.json"),
                 str(clean_env / "fnx.sock"), fnx_client.SYSTEM_SOCKET):
        assert part in text, text
    monkeypatch.setenv("FNX_TOKEN", "t")
    with pytest.raises(fnx.ConfigError, match="no fnx URL found: .*%s or %s" % (
            clean_env / "fnx.sock", fnx_client.SYSTEM_SOCKET)):
        fnx.Client()
    monkeypatch.delenv("FNX_TOKEN")
    write_client_json(clean_env, url="http://file:1")  # an http URL still needs a token
    with pytest.raises(fnx.ConfigError, match="no fnx token found") as info:
        fnx.Client()
    assert "fnx.sock" not in str(info.value)  # no socket was looked for


def test_host_socket_default(monkeypatch, tmp_path):
    if fnx_client.find_socket(["/run/fnx/fnx.sock"]):
        pytest.skip("a daemon listens on /run/fnx/fnx.sock here")
    for var in ("FNX_URL", "FNX_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FNX_HOME", str(tmp_path))
    with pytest.raises(fnx.ConfigError, match="%s or /run/fnx/fnx.sock " % (tmp_path / "fnx.sock")):
        fnx.Client()


# ---------------------------------------------------------------------------- Executor


class FakeDaemon:
    """The endpoints the Executor uses. A call runs in the test process when submitted."""

    def __init__(self, peer):
        self.peer, self.lock = peer, threading.Lock()
        self.functions, self.tasks, self.stream = {}, {}, []  # stream: ids in completion order
        self.hold = set()  # function ids whose tasks stay running until cancelled
        self.hide_from_stream = False
        self.answer_delay = 0.0  # seconds between finishing a batch and answering its POST
        self.old_results = 0  # results of earlier tasks already in the stream
        peer.handle = self.handle

    def run(self, tid, task):
        fn = self.functions[task["function"]]
        args, kwargs, _ = pickle.loads(base64.b64decode(task["data_b64"]))
        record = {"id": tid, "function": task["function"], "state": "success"}
        try:
            record["result"] = pickled(fn(*args, **kwargs))
        except Exception as exc:
            record.update(state="failed", error={"kind": "exception", "type": type(exc).__name__,
                                                 "message": str(exc), "traceback": "tb"})
        return record

    def finish(self, record):
        self.tasks[record["id"]] = record
        if not self.hide_from_stream:
            self.stream.append(record["id"])

    def handle(self, req):
        path, _, query = req.path.partition("?")
        q = dict(p.split("=") for p in query.split("&")) if query else {}
        if path == "/v1/results" and q.get("since") == "end":
            with self.lock:
                return 200, {"results": [], "cursor": self.old_results + len(self.stream)}
        if path == "/v1/results":  # a long poll, roughly
            deadline = time.monotonic() + int(q["wait"])
            while time.monotonic() < deadline and \
                    self.old_results + len(self.stream) <= int(q["since"]):
                time.sleep(0.02)
        with self.lock:
            if path == "/v1/functions":
                namespace = {}
                exec(req.body["source"], namespace)
                fid = len(self.functions) + 1
                self.functions[fid] = namespace[req.body["entry"]]
                return 201, {"id": fid}
            if path == "/v1/tasks":
                ids = list(range(len(self.tasks) + 1000, len(self.tasks) + 1000 +
                                 len(req.body["tasks"])))
                for tid, task in zip(ids, req.body["tasks"]):
                    if task["function"] in self.hold:
                        self.tasks[tid] = {"id": tid, "state": "running"}
                    else:
                        self.finish(self.run(tid, task))
            elif path == "/v1/results":
                since, limit = int(q["since"]), int(q["limit"])
                stream = [{"id": -i, "state": "success"} for i in range(1, self.old_results + 1)]
                stream += [self.tasks[t] for t in self.stream]
                page = [dict(r, seq=i + 1) for i, r in enumerate(stream)][since:since + limit]
                return 200, {"results": page, "cursor": since + len(page)}
            elif path == "/v1/tasks/status":
                return 200, {"tasks": [self.tasks.get(t, {"id": t, "state": "unknown"})
                                       for t in req.body["ids"]]}
            elif req.method == "DELETE":
                tid = int(path.rsplit("/", 1)[1])
                if self.tasks[tid]["state"] == "running":
                    self.finish({"id": tid, "state": "cancelled", "error": {"kind": "cancelled"}})
                return 200, self.tasks[tid]
        if path == "/v1/tasks":
            time.sleep(self.answer_delay)
            return 201, {"ids": ids}
        return 404, {"error": {"code": "not_found", "message": path}}


def square(x):
    return x * x


def divide(a, b):
    return a / b


def test_executor_round_trip_and_map(peer):
    daemon = FakeDaemon(peer)
    daemon.old_results = 25_000  # the executor pages past them before it listens
    with fnx.Executor(peer.client(), batch_size=100) as ex:
        futures = [ex.submit(square, i) for i in range(1000)]
        assert sorted(f.result(10) for f in concurrent.futures.as_completed(futures, 30)) == \
            sorted(i * i for i in range(1000))
        assert list(ex.map(divide, [1, 4], [2, 8], timeout=10)) == [0.5, 0.5]
        with pytest.raises(ZeroDivisionError):
            ex.submit(divide, 1, 0).result(10)
        assert ex.submit(1, 7).result(10) == 49  # by function id
    assert len(daemon.functions) == 2  # each function registered once
    posts = [r for r in peer.requests if r.path == "/v1/tasks"]
    assert max(len(r.body["tasks"]) for r in posts) <= 100
    assert len({r.headers["Idempotency-Key"] for r in posts}) == len(posts)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(square, 1)


def test_executor_results_before_submit_answer(peer):
    daemon = FakeDaemon(peer)
    daemon.answer_delay = 0.3  # results are in the stream before the ids are known
    with fnx.Executor(peer.client()) as ex:
        start = time.monotonic()
        assert [f.result(10) for f in [ex.submit(square, i) for i in range(5)]] == \
            [0, 1, 4, 9, 16]
        assert time.monotonic() - start < ex.RECONCILE_S  # matched without reconciliation


def test_executor_reconciles_results_missing_from_stream(peer):
    daemon = FakeDaemon(peer)
    daemon.hide_from_stream = True
    ex = fnx.Executor(peer.client())
    ex.RECONCILE_S, ex.LONG_POLL_S = 0.5, 1
    assert ex.submit(square, 12).result(10) == 144
    ex.shutdown()


def test_executor_cancel(peer):
    daemon = FakeDaemon(peer)
    daemon.hold.add(1)
    with fnx.Executor(peer.client(), batch_interval=0.2) as ex:
        running = ex.submit(square, 3)  # function 1: held running
        assert not running.done() and running.task_id is None
        time.sleep(0.6)
        assert running.task_id is not None and not running.running()
        assert running.cancel() and running.cancelled()
        assert daemon.tasks[running.task_id]["state"] == "cancelled"
        with pytest.raises(concurrent.futures.CancelledError):
            running.result(1)
        queued = ex.submit(square, 4)
        assert queued.cancel() and queued.task_id is None  # dropped before it was sent
        done, _ = concurrent.futures.wait([running, queued], timeout=5)
        assert done == {running, queued}
    assert queued.task_id is None and running.cancel()  # cancelling again: still cancelled


def test_executor_background_failure_fails_futures(peer):
    daemon = FakeDaemon(peer)
    ex = fnx.Executor(peer.client())
    assert ex.submit(square, 2).result(10) == 4
    peer.handle = lambda req: (401, {"error": {"code": "unauthorized", "message": "token revoked"}})
    future = ex.submit(1, 5)
    with pytest.raises(fnx.AuthError, match="token revoked"):
        future.result(10)
    ex.shutdown()
    assert daemon.functions
