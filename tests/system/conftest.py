"""Black-box system tests of the `fnx` binary.

One `FnxEnv` per test owns every process the test starts (STYLE.md item 10):

- a fresh temporary directory (the cwd of every command, so `module:name` resolves there),
- `FNX_HOME` inside it, and one run directory per `fnx` invocation (`run-N/`),
- a unique `FNX_TEST_MARK=<uuid>` in the environment of every command. Every descendant of
  `fnx` (interchange, managers, workers, shell tasks and anything they fork) inherits it, so
  scanning `/proc/*/environ` finds every process of the test, however it was detached,
- at teardown: background commands still running are interrupted (SIGINT, then SIGKILL),
  then every process still carrying the marker is killed and the test FAILS ("nothing leaked");
  it also fails if any log of the test (fnx's stderr, the run's fnx.log, manager and worker
  logs) shows a Rust panic ("nothing crashed").

The binary is `$FNX_BIN`, else `target/debug/fnx` of the repository holding this file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pytest

REPO = Path(__file__).resolve().parents[2]
MARK_VAR = "FNX_TEST_MARK"

# How long processes of a finished run may take to disappear (death signals are asynchronous).
LEAK_GRACE_S = 2.0
PANIC = "panicked at"


def fnx_bin() -> Path:
    # Absolute: commands run in the test's own directory.
    path = Path(os.environ.get("FNX_BIN") or REPO / "target" / "debug" / "fnx").resolve()
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(f"fnx binary not found at {path}: build it or set FNX_BIN", pytrace=False)
    return path


# ---------------------------------------------------------------------------------------------
# Process table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    cmdline: str


def read_proc(pid: int) -> Proc | None:
    """The process `pid`, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: fields start after the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    return Proc(pid=pid, ppid=int(rest[1]), state=rest[0], cmdline=cmd)


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (a zombie holds no resources but its slot)."""
    p = read_proc(pid)
    return p is not None and p.state not in ("Z", "X")


def children_of(pid: int) -> list[Proc]:
    out = []
    for q in all_pids():
        p = read_proc(q)
        if p is not None and p.ppid == pid and p.state not in ("Z", "X"):
            out.append(p)
    return out


def descendants_of(pid: int) -> list[Proc]:
    procs = [p for p in map(read_proc, all_pids()) if p is not None and p.state not in ("Z", "X")]
    by_parent: dict[int, list[Proc]] = {}
    for p in procs:
        by_parent.setdefault(p.ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in by_parent.get(todo.pop(), []):
            out.append(c)
            todo.append(c.pid)
    return out


def marked_processes(mark: str) -> list[Proc]:
    """Live processes whose environment carries FNX_TEST_MARK=mark."""
    needle = f"{MARK_VAR}={mark}".encode()
    out = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if needle in env.split(b"\0"):
            p = read_proc(pid)
            if p is not None and p.state not in ("Z", "X"):
                out.append(p)
    return out


def wait_for(cond: Callable[[], object], timeout: float, what, interval: float = 0.02):
    """Poll `cond` until it returns something truthy; fail the test after `timeout` seconds.
    `what` describes the condition (a string, or a callable giving one at failure time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            desc = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout}s waiting for {desc}", pytrace=False)
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Results of fnx map
# ---------------------------------------------------------------------------------------------


def parse_lines(raw: bytes) -> list[dict]:
    """Parse complete result lines (a trailing partial line is ignored)."""
    text = raw.decode()
    lines = text.split("\n")
    lines.pop()  # the part after the last newline: empty, or a line still being written
    return [json.loads(line) for line in lines]


@dataclass
class MapResult:
    returncode: int
    lines: list[dict]
    raw: bytes
    stderr: str
    duration: float
    run_dir: Path

    def by_index(self) -> dict[int, dict]:
        """Results keyed by input index; fails if an index appears twice."""
        out: dict[int, dict] = {}
        for line in self.lines:
            i = line["index"]
            assert i not in out, f"index {i} reported twice: {out[i]} and {line}"
            out[i] = line
        return out

    def explain(self) -> str:
        """Stderr and the run's own logs, for assertion messages."""
        parts = [f"exit {self.returncode}; stderr:\n{self.stderr[-4000:]}"]
        for log in [self.run_dir / "fnx.log", *sorted(self.run_dir.glob("manager-*/manager.log"))]:
            if log.is_file():
                parts.append(f"--- {log}:\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


@dataclass
class BackgroundMap:
    """An `fnx map` started in the background; its results go to `output`."""

    proc: subprocess.Popen
    output: Path
    stderr_path: Path
    run_dir: Path
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def results_so_far(self) -> list[dict]:
        try:
            return parse_lines(self.output.read_bytes())
        except FileNotFoundError:
            return []

    def wait_for_results(self, n: int, timeout: float = 30) -> list[dict]:
        def enough():
            if self.proc.poll() is not None:
                explain = self.finish_result().explain()
                pytest.fail(f"fnx map exited early:\n{explain}", pytrace=False)
            r = self.results_so_far()
            return r if len(r) >= n else None

        return wait_for(
            enough, timeout,
            lambda: f"{n} result lines in {self.output} (it has {len(self.results_so_far())}: "
            f"{self.output.read_bytes() if self.output.exists() else b''!r})",
        )

    def log_text(self) -> str:
        try:
            return (self.run_dir / "fnx.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def finish_result(self) -> MapResult:
        raw = self.output.read_bytes() if self.output.exists() else b""
        return MapResult(
            returncode=self.proc.returncode,
            lines=parse_lines(raw),
            raw=raw,
            stderr=self.stderr_path.read_text(errors="replace"),
            duration=time.monotonic() - self.started,
            run_dir=self.run_dir,
        )

    def wait(self, timeout: float = 60) -> MapResult:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(
                f"fnx map did not finish within {timeout}s:\n{self.finish_result().explain()}",
                pytrace=False,
            )
        return self.finish_result()


# ---------------------------------------------------------------------------------------------
# The environment object
# ---------------------------------------------------------------------------------------------


class FnxEnv:
    def __init__(self, root: Path):
        self.dir = root
        self.mark = uuid.uuid4().hex
        self.bin = fnx_bin()
        self.env = dict(os.environ)
        self.env[MARK_VAR] = self.mark
        self.env["FNX_HOME"] = str(root / "fnx-home")
        self.env.pop("FNX_PYTHON", None)
        self._count = 0
        self._background: list[BackgroundMap] = []
        self._started: list[subprocess.Popen] = []
        self._panics: list[str] = []
        # Further sources of panics (each returns descriptions), e.g. a daemon's logs.
        self.crash_checks: list[Callable[[], list[str]]] = []

    # -- files --------------------------------------------------------------------------------

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def write_inputs(self, values: Iterable[object], name: str | None = None) -> Path:
        """One JSON value per line."""
        text = "".join(json.dumps(v) + "\n" for v in values)
        return self.write(name or f"input-{self._next()}.jsonl", text)

    def _next(self) -> int:
        self._count += 1
        return self._count

    # -- running fnx --------------------------------------------------------------------------

    def _map_argv(self, args: list[str], input_path: Path, n: int) -> tuple[list[str], Path, Path]:
        output = self.dir / f"output-{n}.jsonl"
        run_dir = self.dir / f"run-{n}"
        argv = [str(self.bin), "map", *args, "-i", str(input_path), "-o", str(output)]
        argv += ["--run-dir", str(run_dir), "--progress", "never"]
        if "--workers" not in args and "-w" not in args:
            argv += ["--workers", "2"]
        return argv, output, run_dir

    def _input(self, inputs, input_bytes) -> Path:
        if input_bytes is not None:
            return self._raw(input_bytes)
        return self.write_inputs(inputs)

    def _raw(self, data: bytes) -> Path:
        path = self.dir / f"input-{self._next()}.jsonl"
        path.write_bytes(data)
        return path

    def start_map(self, *args: str, inputs=None, input_bytes: bytes | None = None) -> BackgroundMap:
        """Start `fnx map ARGS -i <inputs> -o <file>` in the background."""
        n = self._next()
        argv, output, run_dir = self._map_argv(list(args), self._input(inputs, input_bytes), n)
        stderr_path = self.dir / f"map-{n}.stderr"
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                argv, cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
            )
        bg = BackgroundMap(proc, output, stderr_path, run_dir, time.monotonic())
        self._background.append(bg)
        return bg

    def map(
        self, *args: str, inputs=None, input_bytes: bytes | None = None, timeout: float = 60
    ) -> MapResult:
        """Run `fnx map ARGS` to completion (failing the test after `timeout` seconds)."""
        return self.start_map(*args, inputs=inputs, input_bytes=input_bytes).wait(timeout)

    def fnx(
        self, *args: str, timeout: float = 30, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Run `fnx ARGS` to completion (in `env`, default the test's), capturing stdout and
        stderr as text."""
        proc = subprocess.Popen(
            [str(self.bin), *args], cwd=self.dir, env=self.env if env is None else env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._started.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(
                f"fnx {' '.join(args)} did not finish within {timeout}s:\n{err}", pytrace=False
            )
        if PANIC in err:
            at = max(0, err.index(PANIC) - 20)
            self._panics.append(f"fnx {' '.join(args)}: {err[at:][:400]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    # -- processes ----------------------------------------------------------------------------

    def processes(self) -> list[Proc]:
        """Live processes started (directly or not) by this test."""
        return marked_processes(self.mark)

    def assert_no_processes(
        self, match: Callable[[Proc], bool] = lambda p: True, grace: float = 0.0
    ):
        """Fail if a process of this test matching `match` is still alive after `grace` seconds."""
        deadline = time.monotonic() + grace
        while True:
            left = [p for p in self.processes() if match(p)]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        assert not left, "processes left behind:\n" + "\n".join(
            f"  pid {p.pid} (ppid {p.ppid}, {p.state}): {p.cmdline}" for p in left
        )

    def crashes(self) -> list[str]:
        """Rust panics reported by any fnx process of this test."""
        found = list(self._panics)
        logs = [*self.dir.glob("map-*.stderr"), *self.dir.glob("run-*/**/*.log")]
        for log in sorted(logs):
            text = log.read_text(errors="replace")
            if PANIC in text:
                found.append(f"{log}: {text[max(0, text.index(PANIC) - 20):][:400]}")
        for check in self.crash_checks:
            found += check()
        return found

    def teardown(self) -> list[str]:
        """Stop what is still running; return the description of every leaked process."""
        for bg in self._background:
            if bg.proc.poll() is None:
                bg.proc.send_signal(signal.SIGINT)
                try:
                    bg.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    bg.proc.kill()
                    bg.proc.wait()
        for proc in self._started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + LEAK_GRACE_S
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        leaked = [f"pid {p.pid} (ppid {p.ppid}, {p.state}): {p.cmdline}" for p in left]
        for _ in range(3):
            if not left:
                break
            for p in left:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
            left = self.processes()
        return leaked


@pytest.fixture
def fnx_env(tmp_path: Path):
    env = FnxEnv(tmp_path)
    yield env
    problems = []
    leaked = env.teardown()
    if leaked:
        problems.append(
            f"{len(leaked)} process(es) with {MARK_VAR}={env.mark} survived the test:\n  "
            + "\n  ".join(leaked)
        )
    crashes = env.crashes()
    if crashes:
        problems.append("fnx crashed:\n  " + "\n  ".join(crashes))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def pytest_configure(config):
    if sys.platform != "linux":
        raise pytest.UsageError("the fnx system tests read /proc and need Linux")


# Fixtures of the daemon tests (`daemon`, `make_daemon`); imported last: daemon_env imports
# from this module.
from daemon_env import daemon, make_daemon  # noqa: E402,F401
