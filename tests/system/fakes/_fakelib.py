"""Shared pieces of the recording fake commands in this directory (see README.md).

Every fake appends one JSON line per call to the file named by FNX_FAKE_LOG:

    {"cmd": "qsub", "argv": [...], "cwd": "...", "pid": 123, "env": {COBALT_*, ALPS_*, ...},
     "time": 1764230000.1}

and, when it refuses a call, a second line {"cmd": ..., "error": "..."}; it then exits 2 with the
message on stderr, so both the caller and the test see what was wrong. Lines with neither "argv"
nor "error" are notes (`note`): what a fake observed, e.g. qdel's {"cmd": "qdel", "job": ID,
"sigkilled": [...]}.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time

LOG_VAR = "FNX_FAKE_LOG"
STATE_VAR = "FNX_FAKE_STATE"
# Environment variables worth keeping in the log (what the batch system gives a job).
ENV_PREFIXES = ("COBALT_", "ALPS_", "PBS_", "FAKE_", "FNX_POOL", "FNX_BLOCK")


def _append(doc: dict) -> None:
    path = os.environ.get(LOG_VAR)
    if not path:
        sys.stderr.write(f"{doc.get('cmd')} (fnx test fake): {LOG_VAR} is not set\n")
        sys.exit(2)
    line = json.dumps(doc) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)


def note(cmd: str, **fields) -> None:
    """Log something a fake observed (e.g. which processes qdel had to SIGKILL)."""
    _append({"cmd": cmd, **fields, "time": time.time()})


def record(cmd: str) -> list[str]:
    """Log this call; return its arguments."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    _append({"cmd": cmd, "argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(),
             "env": env, "time": time.time()})
    return sys.argv[1:]


def die(cmd: str, message: str, code: int = 2):
    """Refuse the call: log the reason, print it, exit non-zero."""
    try:
        _append({"cmd": cmd, "error": message, "argv": sys.argv[1:], "time": time.time()})
    finally:
        sys.stderr.write(f"{cmd} (fnx test fake): {message}\n")
        sys.stderr.flush()
    sys.exit(code)


def state_dir(cmd: str) -> str:
    d = os.environ.get(STATE_VAR)
    if not d:
        die(cmd, f"{STATE_VAR} is not set (the directory holding the fake batch system's jobs)")
    os.makedirs(d, exist_ok=True)
    return d


# -- processes ------------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The state letter of `pid` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def job_processes(var: str, value: str, exclude: set[int] = frozenset()) -> list[int]:
    """Live processes whose environment has var=value (what a batch system's cgroup holds:
    every process of the job, whatever process group or session it moved to)."""
    needle = f"{var}={value}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == os.getpid() or pid in exclude:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env and alive(pid):
            out.append(pid)
    return out


def kill_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def terminate(var: str, value: str, exclude: set[int], grace: float = 5.0) -> list[str]:
    """SIGTERM every process of the job, SIGKILL what is left after `grace` seconds; returns
    the command lines of the processes that needed SIGKILL."""
    kill_all(job_processes(var, value, exclude), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not job_processes(var, value, exclude):
            return []
        time.sleep(0.05)
    left = job_processes(var, value, exclude)
    killed = [f"{pid}: {cmdline(pid)}" for pid in left]
    kill_all(left, signal.SIGKILL)
    return killed


def passthrough(cmd: str):
    """Record the call, then exec the real `cmd`: the first one on PATH outside this fake's
    directory."""
    record(cmd)
    here = os.path.dirname(os.path.realpath(sys.argv[0]))
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or os.path.realpath(d) == here:
            continue
        real = os.path.join(d, cmd)
        if os.path.isfile(real) and os.access(real, os.X_OK):
            os.execv(real, [real, *sys.argv[1:]])
    die(cmd, f"no real {cmd} on PATH after {here}")
