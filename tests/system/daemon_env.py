"""A running `fnx daemon` for black-box tests, owned by the test's `FnxEnv` (conftest.py).

`make_daemon(**sections)` writes a site config in `<test dir>/daemon-N/fnx.toml`:

    [daemon]      data_dir = <test dir>/daemon-N/data, listen = 127.0.0.1:<free port>
    [interchange] port = <free port>
    [pools.local] workers_per_manager = 2

with every keyword merged over it (`pools={"local": {"workers_per_manager": 300}}`,
`store={"sync": "normal"}`, `limits={...}`), starts `fnx daemon --config FILE` with stdout and
stderr appended to `daemon-N/daemon.log`, and waits until `GET /v1/health` answers 200. The
ports are chosen once, so `start()` after `kill9()` or `stop()` restarts on the same address and
data directory.

Cleanup follows the env's discipline: every process carries `FNX_TEST_MARK` (the env's
environment), daemons still running at teardown are stopped with SIGTERM (and must exit 0),
the env then kills and reports anything left, and the daemon's log plus every log under its
data directory are scanned for Rust panics.

Requests go through `Daemon.api(method, path, body)`, a small http.client helper (the tests of
the daemon do not depend on the Python SDK, which is written in parallel). `Daemon.map(...)` and
`Daemon.start_map(...)` run `fnx map --daemon` in the daemon's client environment; the
functions and helpers the daemon tests share (SQUARE, NOOP, GATE, `gate`, ...) are here too.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import pytest

from conftest import (
    PANIC, REPO, BackgroundMap, FnxEnv, MapResult, Proc, descendants_of, read_proc, wait_for,
)

TERMINAL = ("success", "failed", "cancelled")
# How long processes of a stopped or killed daemon may take to disappear.
DEATH_GRACE_S = 5.0
_DEFAULT = object()  # "the daemon's admin token" for Daemon.api


# ---------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge(base: dict, over: dict) -> dict:
    """`base` with `over` merged into it, tables recursively."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def to_toml(doc: dict, prefix: str = "") -> str:
    """TOML text of nested dicts: scalars of a table first, then its sub-tables."""
    lines = []
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append(f"[{prefix}]")
    lines += [f"{k} = {toml_value(v)}" for k, v in scalars.items()]
    for k, v in tables.items():
        text = to_toml(v, f"{prefix}.{k}" if prefix else k)
        lines.append(text)
    return "\n".join(lines) + "\n"


def short(x: Any, n: int = 1000) -> str:
    """repr(x), cut to n characters (for assertion messages)."""
    text = x if isinstance(x, str) else repr(x)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


# Functions and helpers shared by the daemon tests. Tasks that must stay running use a shell
# gate: they touch `d/started-I`, then wait for the file `d/release`, so a test waits on files,
# never on a fixed sleep.

SQUARE = {"kind": "python", "name": "square", "entry": "square",
          "source": "def square(x):\n    return x * x\n"}
DIV = {"kind": "python", "entry": "div", "source": "def div(a, b):\n    return a / b\n"}
NOOP = {"kind": "python", "entry": "noop", "source": "def noop(i=0):\n    return i\n"}
GATE = ("touch {d}/started-{i}; while [ ! -e {d}/release ]; do sleep 0.02; done; "
        "touch {d}/done-{i}")


def gate(fnx_env, name="gate") -> Path:
    """A fresh directory for GATE tasks."""
    d = fnx_env.dir / name
    d.mkdir()
    return d


def wait_started(d, idxs, timeout=30) -> None:
    wait_for(lambda: all((d / f"started-{i}").exists() for i in idxs), timeout,
             lambda: f"gate tasks {list(idxs)} started (have {sorted(os.listdir(d))})")


def in_thread(fn):
    """Run fn() in a thread; returns (thread, box) where box gets "value" or "error"."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def ok(r: subprocess.CompletedProcess) -> str:
    """The stdout of a CLI command that must have exited 0."""
    assert r.returncode == 0, (
        f"{r.args}: exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r.stdout


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix stream socket (the daemon's local socket)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON or msgpack, text otherwise, None if empty

    def __repr__(self) -> str:
        return f"Response({self.status}, {short(self.body)})"


def result_value(record: dict) -> Any:
    """The value of a successful task record's result (JSON or pickle encoded)."""
    assert record.get("state") == "success", f"task did not succeed: {record}"
    res = record["result"]
    if res["encoding"] == "json":
        return res["value"]
    assert res["encoding"] == "pickle", res
    return pickle.loads(base64.b64decode(res["data_b64"]))


def pickled_args(*args, **kwargs) -> str:
    return base64.b64encode(pickle.dumps((args, kwargs), protocol=4)).decode()


def error_of(r: Response, status: int, code: str) -> str:
    """Assert an error answer (status and code); return its message."""
    assert r.status == status, f"expected {status} {code}, got {r.status}: {short(r.body)}"
    assert isinstance(r.body, dict) and isinstance(r.body.get("error"), dict), (
        f"error body is not {{'error': {{...}}}}: {short(r.body)}"
    )
    assert r.body["error"].get("code") == code, f"expected code {code}: {r.body!r}"
    msg = r.body["error"].get("message")
    assert isinstance(msg, str) and msg, f"error without a message: {r.body!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------


class Daemon:
    def __init__(self, env: FnxEnv, n: int, sections: dict, data_dir: Path | None,
                 extra_env: dict | None):
        self.fnx_env = env
        self.dir = env.dir / f"daemon-{n}"
        self.dir.mkdir(parents=True)
        # The data directory sits beside the test's directory, not in it: tasks are sandboxed
        # away from it (service mode), and the entries of its ancestors are fixed when a
        # manager starts, while tests keep creating files in their own directory.
        self.home = (Path(data_dir) if data_dir is not None
                     else env.dir.parent / f"{env.dir.name}-daemon-{n}" / "data")
        self.port = free_port()
        self.interchange_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = merge(
            {
                # The test's marker reaches every process the daemon starts, so that
                # teardown finds them all; nothing else of its environment does.
                "daemon": {"data_dir": str(self.home), "listen": f"127.0.0.1:{self.port}",
                           "pass_env": ["FNX_TEST_MARK"]},
                "interchange": {"port": self.interchange_port},
                "pools": {"local": {"workers_per_manager": 2}},
            },
            sections,
        )
        self.config_path = self.dir / "fnx.toml"
        self.config_path.write_text(to_toml(self.config))
        self.log_path = self.dir / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None
        self.user: str | None = None
        self.starts = 0
        self.ready_s: float | None = None  # seconds from the last start to health 200
        self._daemon_env = dict(env.env)
        self._daemon_env["FNX_HOME"] = str(self.home)
        for var in ("FNX_URL", "FNX_TOKEN"):
            self._daemon_env.pop(var, None)
        self._daemon_env.update(extra_env or {})
        self._panics: dict[str, str] = {}
        env.crash_checks.append(self.crashes)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no daemon log)"
        return f"--- {self.log_path} (tail):\n{text[-n:]}"

    def start(self, timeout: float = 60.0) -> "Daemon":
        """Start (or restart) the daemon on its config and wait for health 200."""
        rc = self.try_start(timeout)
        if rc is not None:
            pytest.fail(f"fnx daemon exited with {rc} before it was ready\n" + self.log_tail(),
                        pytrace=False)
        return self

    def daemon_argv(self) -> list[str]:
        """The command that starts the daemon."""
        return [str(self.fnx_env.bin), "daemon", "--config", str(self.config_path)]

    def try_start(self, timeout: float = 60.0) -> int | None:
        """Start (or restart) the daemon; None once health answers 200, or its exit status if
        it exits first. Fails the test if it does neither within `timeout` seconds."""
        assert not self.running, "the daemon is already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== fnx-test: start #{self.starts} at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.daemon_argv(),
                cwd=self.fnx_env.dir, env=self._daemon_env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log,
            )
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                return self.proc.returncode
            try:
                if self.api("GET", "/v1/health", token=None, timeout=5).status == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() - t0 > timeout:
                pytest.fail(
                    f"fnx daemon not healthy within {timeout}s\n" + self.log_tail(), pytrace=False
                )
            time.sleep(0.05)
        self.ready_s = time.monotonic() - t0
        client = self.home / "client.json"
        doc = json.loads(client.read_text())
        self.token, self.user = doc["token"], doc.get("user")
        return None

    def log_since_start(self) -> str:
        """The daemon's log from its last start on."""
        text = self.log_path.read_text(errors="replace")
        return text.rsplit(f"==== fnx-test: start #{self.starts} ", 1)[-1]

    def _descendants(self) -> list[Proc]:
        return descendants_of(self.pid) if self.running else []

    def _assert_gone(self, procs: list[Proc], after: str) -> None:
        def left():
            out = []
            for p in procs:
                q = read_proc(p.pid)
                if q is not None and q.state not in ("Z", "X") and q.cmdline == p.cmdline:
                    out.append(q)
            return out

        deadline = time.monotonic() + DEATH_GRACE_S
        while (still := left()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not still, (
            f"processes of the daemon survived it {DEATH_GRACE_S}s {after}:\n"
            + "\n".join(f"  pid {p.pid} ({p.state}): {p.cmdline}" for p in still)
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM; the daemon must exit 0 and take its managers (and their tasks) with it."""
        assert self.running, "the daemon is not running"
        procs = self._descendants()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(
                f"fnx daemon did not exit within {timeout}s of SIGTERM\n" + self.log_tail(),
                pytrace=False,
            )
        assert rc == 0, f"fnx daemon exited with {rc} on SIGTERM (expected 0)\n{self.log_tail()}"
        self._assert_gone(procs, "after SIGTERM")

    def kill9(self, check: bool = True) -> list[Proc]:
        """SIGKILL the daemon. With `check`, every process under it (managers, workers, tasks)
        must die with it. Returns the processes that were under it."""
        if not self.running:
            return []
        procs = self._descendants()
        self.proc.kill()
        self.proc.wait()
        if check:
            self._assert_gone(procs, "after kill -9")
        return procs

    def crashes(self) -> list[str]:
        """Rust panics in the daemon's log or in any log under its data directory. Results are
        kept, so a scan before the data directory goes away (a tmpfs) still counts."""
        logs = [self.log_path]
        if self.home.is_dir():
            logs += sorted(self.home.glob("**/*.log"))
        for log in logs:
            try:
                text = log.read_text(errors="replace")
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                continue
            if PANIC in text:
                self._panics[str(log)] = text[max(0, text.index(PANIC) - 20):][:400]
        return [f"{log}: {text}" for log, text in self._panics.items()]

    # -- clients ------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands: the test mark, FNX_HOME, FNX_URL, FNX_TOKEN."""
        return self.env_for(self.token)

    def env_for(self, token: str | None) -> dict[str, str]:
        env = dict(self._daemon_env)
        env["FNX_URL"] = self.url
        if token is not None:
            env["FNX_TOKEN"] = token
        return env

    def fnx(self, *args: str, env: dict | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess:
        """Run `fnx ARGS` with the daemon's client environment (or `env`)."""
        return self.fnx_env.fnx(*args, env=self.env if env is None else env, timeout=timeout)

    def start_map(self, *args: str, inputs, env: dict | None = None) -> BackgroundMap:
        """Start `fnx map ARGS --daemon -i <inputs> -o <file>` in the background, in the
        daemon's client environment (or `env`). `--daemon` is added unless ARGS has it. Owned
        by the test's FnxEnv like its own `start_map` (interrupted at teardown, stderr scanned
        for panics)."""
        fe = self.fnx_env
        n = fe._next()
        input_path = fe.write_inputs(inputs, f"input-{n}.jsonl")
        output = fe.dir / f"output-{n}.jsonl"
        stderr_path = fe.dir / f"map-{n}.stderr"
        argv = [str(fe.bin), "map", *args]
        if "--daemon" not in args:
            argv.append("--daemon")
        argv += ["-i", str(input_path), "-o", str(output), "--progress", "never"]
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                argv, cwd=fe.dir, env=self.env if env is None else env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )
        bg = BackgroundMap(proc, output, stderr_path, fe.dir / f"run-{n}", time.monotonic())
        fe._background.append(bg)
        return bg

    def map(self, *args: str, inputs, env: dict | None = None, timeout: float = 120
            ) -> MapResult:
        """Run `fnx map ARGS --daemon` to completion (see `start_map`)."""
        return self.start_map(*args, inputs=inputs, env=env).wait(timeout)

    def client(self):
        """The Python SDK's client for this daemon (admin token)."""
        sdk = str(REPO / "sdk" / "python")
        if sdk not in sys.path:
            sys.path.insert(0, sdk)
        import fnx

        return fnx.Client(url=self.url, token=self.token)

    def create_user(self, name: str, admin: bool = False) -> str:
        """A token for a new user, from `fnx token create` (it writes the store directly)."""
        args = ["token", "create", "--user", name, "--config", str(self.config_path)]
        if admin:
            args.append("--admin")
        r = self.fnx(*args, "--output", "json")
        if r.returncode == 2 and "--output" in r.stderr:
            r = self.fnx(*args)
        assert r.returncode == 0, (
            f"fnx token create failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        try:
            doc = json.loads(r.stdout)
            token = doc["token"] if isinstance(doc, dict) else doc
        except (ValueError, KeyError, TypeError):
            m = re.search(r"fnx_[A-Za-z0-9_\-.~+/=]+", r.stdout)
            assert m, f"no token in the output of fnx token create: {r.stdout!r}"
            token = m.group(0)
        assert isinstance(token, str) and token, r.stdout
        return token

    # -- HTTP ---------------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, *, token: Any = _DEFAULT,
            headers: dict | None = None, timeout: float = 75.0,
            socket_path: str | Path | None = None) -> Response:
        """One request. `body`: bytes as is, anything else as JSON. `token=None`: no
        Authorization header. `socket_path`: over that Unix socket instead of TCP. Answers are
        parsed by their Content-Type."""
        hdrs = dict(headers or {})
        if token is _DEFAULT:
            token = self.token
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if socket_path is not None:
            conn: http.client.HTTPConnection = UnixHTTPConnection(str(socket_path), timeout)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            try:
                conn.request(method, path, body=data, headers=hdrs)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer (413) before it has read a large body
            resp = conn.getresponse()
            raw = resp.read()
            rheaders = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        ctype = rheaders.get("content-type", "")
        parsed: Any
        if not raw:
            parsed = None
        elif "msgpack" in ctype:
            parsed = msgpack.unpackb(raw, raw=False)
        elif "json" in ctype:
            try:
                parsed = json.loads(raw)
            except ValueError:
                raise AssertionError(f"{method} {path}: invalid JSON answer {raw[:500]!r}")
        else:
            parsed = raw.decode(errors="replace")
        return Response(resp.status, rheaders, parsed)

    # -- common requests ----------------------------------------------------------------------

    def register(self, spec: dict, token: Any = _DEFAULT) -> int:
        r = self.api("POST", "/v1/functions", spec, token=token)
        assert r.status == 201, f"register {spec}: {r.status} {short(r.body)}"
        return r.body["id"]

    def submit(self, tasks: list[dict], token: Any = _DEFAULT, headers: dict | None = None,
               timeout: float = 120.0) -> list[int]:
        r = self.api("POST", "/v1/tasks", {"tasks": tasks}, token=token, headers=headers,
                     timeout=timeout)
        assert r.status == 201, f"submit of {len(tasks)} task(s): {r.status} {short(r.body)}"
        ids = r.body["ids"]
        assert len(ids) == len(tasks), r.body
        return ids

    def task(self, task_id: int, token: Any = _DEFAULT) -> dict:
        r = self.api("GET", f"/v1/tasks/{task_id}", token=token)
        assert r.status == 200, f"GET task {task_id}: {r.status} {short(r.body)}"
        return r.body

    def wait_task(self, task_id: int, timeout: float = 30.0, token: Any = _DEFAULT) -> dict:
        """The task's record once it is terminal (long-polls with ?wait)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            w = max(0.0, min(10.0, left))
            r = self.api("GET", f"/v1/tasks/{task_id}?wait={w:.1f}", token=token)
            assert r.status == 200, f"GET task {task_id}: {r.status} {short(r.body)}"
            if r.body["state"] in TERMINAL:
                return r.body
            if time.monotonic() >= deadline:
                pytest.fail(f"task {task_id} not terminal within {timeout}s: {r.body}\n"
                            + self.log_tail(), pytrace=False)
            if w == 0:
                time.sleep(0.05)

    def statuses(self, ids: list[int], token: Any = _DEFAULT) -> list[dict]:
        out = []
        for k in range(0, len(ids), 10_000):
            chunk = ids[k:k + 10_000]
            r = self.api("POST", "/v1/tasks/status", {"ids": chunk}, token=token)
            assert r.status == 200, f"tasks/status: {r.status} {short(r.body)}"
            assert [t["id"] for t in r.body["tasks"]] == chunk, "status not in request order"
            out += r.body["tasks"]
        return out

    def wait_all(self, ids: list[int], timeout: float = 60.0, token: Any = _DEFAULT
                 ) -> dict[int, dict]:
        """Records of `ids` once all are terminal."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.statuses(ids, token=token)
            if all(t["state"] in TERMINAL for t in recs):
                return {t["id"]: t for t in recs}
            if time.monotonic() > deadline:
                states: dict[str, int] = {}
                for t in recs:
                    states[t["state"]] = states.get(t["state"], 0) + 1
                pytest.fail(f"{len(ids)} tasks not terminal within {timeout}s: states {states}\n"
                            + self.log_tail(), pytrace=False)
            time.sleep(0.1)

    def status(self, token: Any = _DEFAULT) -> dict:
        r = self.api("GET", "/v1/status", token=token)
        assert r.status == 200, f"GET /v1/status: {r.status} {short(r.body)}"
        return r.body

    def task_count(self, token: Any = _DEFAULT) -> int:
        """All tasks of the user (queued + running + finished) per /v1/status."""
        t = self.status(token=token)["tasks"]
        return t["queued"] + t["running"] + t["finished"]


# ---------------------------------------------------------------------------------------------
# Fixtures (imported by conftest.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def make_daemon(fnx_env):
    """Factory: `make_daemon(start=True, data_dir=None, env=None, **config_sections)`."""
    made: list[Daemon] = []

    def make(start: bool = True, data_dir: Path | None = None, env: dict | None = None,
             **sections) -> Daemon:
        d = Daemon(fnx_env, len(made) + 1, sections, data_dir, env)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    problems = []
    for d in made:
        if d.running:
            try:
                d.stop()
            except (AssertionError, pytest.fail.Exception) as e:
                problems.append(f"{d.dir.name}: {e}")
    if problems:
        pytest.fail("stopping the daemon at teardown:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    """A started daemon: one local pool, one manager with 2 workers."""
    return make_daemon()
