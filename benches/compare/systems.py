"""The systems and workloads that baselines.py measures: one function per (system, workload) cell.

  * the workload definitions (tasks per scale, the headline metric) shared with the orchestrator;
  * the baseline cells (processpool, parsl, dask): a context manager per system that starts the
    pool (timed as start-up) and shuts it down (timed), and a function per workload that runs it
    end to end; cell_main() runs one of them and writes one JSON object to a file. It is the
    `baselines.py cell SYSTEM WORKLOAD ...` mode, which the orchestrator starts in a new session;
  * the fnx cells: the binary as a subprocess, timed as a whole command.

Only the standard library is imported at module level: the baseline packages are imported inside
the functions that use them, and Dask's spawned workers re-import baselines.py (which imports this
module) as __mp_main__.

The task functions are the ones fnx runs: examples/square.py (noop, nap, echo_bytes), imported by
reference from PYTHONPATH (the orchestrator puts examples/ on it for every child process).
"""

import argparse
import concurrent.futures
import contextlib
import json
import os
import shlex
import subprocess
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
EXAMPLES = os.path.join(ROOT, "examples")

SYSTEMS = ["fnx", "parsl", "processpool", "dask"]
BASELINES = SYSTEMS[1:]
WORKLOADS = ["noop", "sleep", "transfer"]
WORKERS = 2
SLEEP_SECONDS = 0.01
TRANSFER_BYTES = 1024 * 1024
# Tasks per workload at --scale full; --scale small divides by 10.
FULL_TASKS = {"noop": 100_000, "sleep": 2_000, "transfer": 1_000}
METRIC = {"noop": "tasks/s", "sleep": "efficiency", "transfer": "MB/s"}


def tasks_for(workload, scale):
    n = FULL_TASKS[workload]
    return n if scale == "full" else n // 10


def metric_value(workload, tasks, seconds):
    """The headline number of a cell (higher is better for all three)."""
    if not seconds or seconds <= 0:
        return None
    if workload == "noop":
        return tasks / seconds
    if workload == "sleep":
        ideal = tasks * SLEEP_SECONDS / WORKERS
        return ideal / seconds
    # transfer: payload of one direction, in 10^6-byte MB as `fnx bench transfer` counts them
    # (1,000 tasks x 1,048,576 B = 1,048.6 MB).
    return tasks * TRANSFER_BYTES / 1e6 / seconds


# --------------------------------------------------------------------------------------------
# Shared helpers for the baseline cells
# --------------------------------------------------------------------------------------------


def _task_functions():
    import square  # examples/square.py, on PYTHONPATH

    return square


# The function of examples/square.py that each workload calls, for every system.
WORKLOAD_FUNCTION = {"noop": "noop", "sleep": "nap", "transfer": "echo_bytes"}


def _task_function(workload):
    return getattr(_task_functions(), WORKLOAD_FUNCTION[workload])


def _args_for(workload, n):
    if workload == "noop":
        return [(i,) for i in range(n)]
    if workload == "sleep":
        return [(SLEEP_SECONDS,)] * n
    payload = os.urandom(TRANSFER_BYTES)  # one object, pickled afresh for every task by each system
    return [(payload,)] * n


class Checker:
    """Checks each result as it arrives (cheap), and the total at the end."""

    def __init__(self, workload, n):
        self.workload, self.n, self.count, self.total = workload, n, 0, 0

    def add(self, result):
        self.count += 1
        if self.workload == "noop":
            self.total += result
        elif self.workload == "sleep":
            if result != SLEEP_SECONDS:
                raise AssertionError(f"nap returned {result!r}")
        elif len(result) != TRANSFER_BYTES:
            raise AssertionError(f"echo_bytes returned {len(result)} bytes")

    def finish(self):
        if self.count != self.n:
            raise AssertionError(f"{self.count} results for {self.n} tasks")
        if self.workload == "noop" and self.total != self.n * (self.n - 1) // 2:
            raise AssertionError("noop results do not add up")


def _timed_run(submit_all, wait_all, workload, n):
    """Time from the first submit to the last result received."""
    check = Checker(workload, n)
    t0 = time.perf_counter()
    futures = submit_all()
    t_submitted = time.perf_counter()
    wait_all(futures, check)
    t1 = time.perf_counter()
    check.finish()
    return {"seconds": t1 - t0, "submit_seconds": t_submitted - t0}


def _wait_cf(futures, check):
    # In submission order: the last one returns only when every task has (as_completed costs more).
    for fut in futures:
        check.add(fut.result())


# --------------------------------------------------------------------------------------------
# processpool: concurrent.futures.ProcessPoolExecutor(max_workers=2), one submit per task
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def processpool_pool(timing):
    sq = _task_functions()
    t0 = time.perf_counter()
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=WORKERS)
    try:
        # Warm-up: make sure both worker processes exist before the timed part.
        for f in [pool.submit(sq.noop, i) for i in range(WORKERS)]:
            f.result()
        timing["startup_seconds"] = time.perf_counter() - t0
        yield pool
    finally:
        t1 = time.perf_counter()
        pool.shutdown(wait=True, cancel_futures=True)
        timing["shutdown_seconds"] = time.perf_counter() - t1


def _processpool(pool, workload, n):
    fn = _task_function(workload)
    args = _args_for(workload, n)
    return _timed_run(lambda: [pool.submit(fn, *a) for a in args], _wait_cf, workload, n)


# --------------------------------------------------------------------------------------------
# parsl: HighThroughputExecutor(max_workers_per_node=2) + LocalProvider, python_app per task
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def parsl_pool(timing, tmpdir):
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    sq = _task_functions()
    encrypted = os.environ.get("FNX_COMPARE_PARSL_ENCRYPTED", "0") == "1"
    log = os.environ.get("FNX_COMPARE_PARSL_LOG", "off") == "default"
    htex_kwargs = dict(
        label="htex",
        address="127.0.0.1",  # loopback only; no probing of the machine's interfaces
        cores_per_worker=1,
        encrypted=encrypted,
        working_dir=os.path.join(tmpdir, "htex"),
        worker_logdir_root=os.path.join(tmpdir, "htex-logs"),
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
    )
    # The option is max_workers_per_node in Parsl >= 2024.x; older releases called it max_workers.
    import inspect

    params = inspect.signature(HighThroughputExecutor.__init__).parameters
    workers_option = "max_workers_per_node" if "max_workers_per_node" in params else "max_workers"
    htex_kwargs[workers_option] = WORKERS
    timing["parsl_options"] = {
        "workers_option": workers_option,
        "encrypted": encrypted,
        "initialize_logging": log,
        "version": parsl.__version__,
    }
    config = Config(
        executors=[HighThroughputExecutor(**htex_kwargs)],
        run_dir=os.path.join(tmpdir, "runinfo"),
        strategy="none",  # one fixed block of 2 workers; no scaling thread decisions mid-run
        usage_tracking=0,
        initialize_logging=log,  # Parsl's default (True) DEBUG-logs every task to parsl.log
    )
    t0 = time.perf_counter()
    dfk = parsl.load(config)
    try:
        apps = {
            w: parsl.python_app(getattr(sq, name), executors=["htex"])
            for w, name in WORKLOAD_FUNCTION.items()
        }
        # Warm-up: waits until the worker pool has connected to the interchange.
        for f in [apps["noop"](i) for i in range(WORKERS)]:
            f.result()
        timing["startup_seconds"] = time.perf_counter() - t0
        yield apps
    finally:
        t1 = time.perf_counter()
        try:
            dfk.cleanup()
        finally:
            parsl.clear()
        timing["shutdown_seconds"] = time.perf_counter() - t1


def _parsl(apps, workload, n):
    app = apps[workload]
    args = _args_for(workload, n)
    return _timed_run(lambda: [app(*a) for a in args], _wait_cf, workload, n)




# --------------------------------------------------------------------------------------------
# dask: LocalCluster(n_workers=2, threads_per_worker=1, processes=True), Client.submit per task
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def dask_pool(timing, tmpdir):
    import logging

    import dask
    import distributed

    sq = _task_functions()
    timing["dask_options"] = {"version": distributed.__version__}
    t0 = time.perf_counter()
    cluster = client = None
    try:
        with dask.config.set({"temporary-directory": os.path.join(tmpdir, "dask")}):
            cluster = distributed.LocalCluster(
                n_workers=WORKERS,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            client = distributed.Client(cluster)
            client.wait_for_workers(WORKERS)
            client.gather([client.submit(sq.noop, i, pure=False) for i in range(WORKERS)])
            timing["startup_seconds"] = time.perf_counter() - t0
            yield client
    finally:
        t1 = time.perf_counter()
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()
        timing["shutdown_seconds"] = time.perf_counter() - t1


def _dask(client, workload, n):
    fn = _task_function(workload)
    args = _args_for(workload, n)

    def wait_all(futures, check):
        # One gather: Dask fetches the results in bulk (faster here than as_completed).
        for result in client.gather(futures):
            check.add(result)

    return _timed_run(
        lambda: [client.submit(fn, *a, pure=False) for a in args], wait_all, workload, n
    )




def cell_main(argv):
    ap = argparse.ArgumentParser(prog="baselines.py cell")
    ap.add_argument("system", choices=BASELINES)
    ap.add_argument("workload", choices=WORKLOADS)
    ap.add_argument("--tasks", type=int, required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--tmpdir", required=True)
    a = ap.parse_args(argv)
    out = {"system": a.system, "workload": a.workload, "tasks": a.tasks}
    # Dask warns about every large (1 MB) argument embedded in the graph; that is the point here.
    warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
    warnings.filterwarnings("ignore", message=".*[Ss]ending large graph.*")
    timing = {}
    run = {"processpool": _processpool, "parsl": _parsl, "dask": _dask}[a.system]
    try:
        if a.system == "processpool":
            pool_cm = processpool_pool(timing)
        else:
            pool_cm = globals()[f"{a.system}_pool"](timing, a.tmpdir)
        with pool_cm as pool:
            out.update(run(pool, a.workload, a.tasks))
    except BaseException as e:  # noqa: BLE001 - reported, not swallowed
        out["error"] = f"{type(e).__name__}: {e}"
    out.update(timing)
    with open(a.result, "w") as f:
        json.dump(out, f)
    return 0 if "error" not in out else 1


# --------------------------------------------------------------------------------------------
# fnx cells: the binary as a subprocess, timed as a whole command
# --------------------------------------------------------------------------------------------


def _write_inputs(path, workload, n):
    with open(path, "w") as f:
        if workload == "noop":
            f.writelines(f"[{i}]\n" for i in range(n))
        else:
            f.writelines(f"[{SLEEP_SECONDS}]\n" for _ in range(n))


def _fnx_summary(stderr):
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("fnx:")]
    return lines[-1] if lines else None


def _fnx_map(ctx, workload, n, function):
    inp = os.path.join(ctx["tmpdir"], f"fnx-{workload}-{n}.jsonl")
    if not os.path.exists(inp):
        _write_inputs(inp, workload, n)
    outp = os.path.join(ctx["tmpdir"], f"fnx-{workload}-out.jsonl")
    cmd = [ctx["fnx"], "map", function, "-i", inp, "-o", outp,
           "--workers", str(WORKERS), "--progress", "never"]
    res = {"command": " ".join(shlex.quote(c) for c in cmd), "cwd": EXAMPLES}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=EXAMPLES, env=ctx["env"], capture_output=True, text=True,
                       timeout=ctx["timeout"])
    res["seconds"] = time.perf_counter() - t0
    res["fnx_summary"] = _fnx_summary(p.stderr)
    if p.returncode != 0:
        res["error"] = f"exit {p.returncode}: {p.stderr.strip()[-2000:]}"
        return res
    count = total = 0
    with open(outp) as f:
        for line in f:
            r = json.loads(line)
            if not r.get("ok"):
                res["error"] = f"task failed: {line.strip()[:500]}"
                return res
            count += 1
            if workload == "noop":
                total += r["result"]
    os.unlink(outp)
    if count != n:
        res["error"] = f"{count} output lines for {n} tasks"
    elif workload == "noop" and total != n * (n - 1) // 2:
        res["error"] = "noop results do not add up"
    return res


def fnx_noop(ctx, n):
    return _fnx_map(ctx, "noop", n, "square:" + WORKLOAD_FUNCTION["noop"])


def fnx_sleep(ctx, n):
    return _fnx_map(ctx, "sleep", n, "square:" + WORKLOAD_FUNCTION["sleep"])


def fnx_transfer(ctx, n):
    probe = subprocess.run([ctx["fnx"], "bench", "transfer", "--help"], cwd=EXAMPLES,
                           env=ctx["env"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        if "unrecognized subcommand" in probe.stderr:
            return {"skipped": "this fnx binary has no `fnx bench transfer`"}
        return {"error": f"`fnx bench transfer --help` exit {probe.returncode}: "
                         f"{probe.stderr.strip()[-500:]}"}
    cmd = [ctx["fnx"], "bench", "transfer", "--tasks", str(n), "--bytes", str(TRANSFER_BYTES),
           "--workers", str(WORKERS)]
    res = {"command": " ".join(shlex.quote(c) for c in cmd), "cwd": EXAMPLES}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=EXAMPLES, env=ctx["env"], capture_output=True, text=True,
                       timeout=ctx["timeout"])
    res["seconds"] = time.perf_counter() - t0
    res["fnx_summary"] = _fnx_summary(p.stderr)
    if p.returncode != 0:
        res["error"] = f"exit {p.returncode}: {p.stderr.strip()[-2000:]}"
        return res
    report = None
    try:
        report = json.loads(p.stdout)
    except ValueError:
        for line in reversed(p.stdout.splitlines()):  # the last JSON object line
            with contextlib.suppress(ValueError):
                report = json.loads(line)
                break
    if not isinstance(report, dict):
        res["error"] = f"no JSON report on stdout: {p.stdout[-500:]!r}"
        return res
    res["fnx_report"] = report
    return res


def fnx_startup_probe(ctx):
    """Whole-command time of `fnx map` with 2 noop tasks: fnx's start-up, included in its cells."""
    r = _fnx_map(ctx, "noop", WORKERS, "square:noop")
    return None if "error" in r else r["seconds"]


# The fnx cell of each workload, for the orchestrator.
FNX_CELLS = {"noop": fnx_noop, "sleep": fnx_sleep, "transfer": fnx_transfer}
