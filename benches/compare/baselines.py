#!/usr/bin/env python3
"""Measure fnx and its baselines (Parsl, ProcessPoolExecutor, Dask) on the same workloads in one run.

Normally started by run.sh, which makes the venv. Two modes:

  baselines.py [--scale small|full] [--repeat N] [--fnx PATH] [--only SYSTEMS] [--json PATH] ...
      The orchestrator: runs every (repeat, workload, system) cell, prints a Markdown report on
      stdout and writes the raw results as JSON.

  baselines.py cell SYSTEM WORKLOAD --tasks N --result FILE
      One baseline cell in its own process (started by the orchestrator in a new session): starts
      the pool (timed as start-up), runs the workload (timed end to end), shuts the pool down (timed),
      writes one JSON object to FILE.

This file is the orchestrator (process isolation and clean-up, the report, the command line); the
cells themselves, baseline and fnx, and the workload definitions are in systems.py beside it.

Only the standard library is imported at module level (here and in systems.py): the baseline
packages are imported inside the functions that use them, and Dask's spawned workers re-import
this file as __mp_main__.
"""

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from systems import (
    BASELINES,
    EXAMPLES,
    FNX_CELLS,
    HERE,
    METRIC,
    ROOT,
    SLEEP_SECONDS,
    SYSTEMS,
    WORKERS,
    WORKLOADS,
    cell_main,
    fnx_startup_probe,
    metric_value,
    tasks_for,
)


# --------------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------------


def _become_subreaper():
    """Orphaned descendants (e.g. a Parsl worker pool, which runs in its own process group) are
    re-parented to us instead of init, so we can find and end any that outlive their cell."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    return False


def _proc_table():
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            state = stat[stat.rindex(")") + 2:].split()[0]
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
        table[int(d)] = (ppid, state, cmd)
    return table


def _descendants():
    table = _proc_table()
    me, out, frontier = os.getpid(), [], [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state, cmd) in table.items():
            if ppid == parent and pid != me:
                if state != "Z":
                    out.append((pid, cmd))
                frontier.append(pid)
    return out


def _reap():
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def end_strays(grace=5.0):
    """Give leftovers `grace` seconds to exit by themselves, then TERM, then KILL. Returns what
    had to be ended (a leak worth reporting)."""
    deadline = time.monotonic() + grace
    while True:
        _reap()
        left = _descendants()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not left:
        return []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in _descendants():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        t = time.monotonic() + 3
        while _descendants() and time.monotonic() < t:
            _reap()
            time.sleep(0.1)
        _reap()
    return [f"{pid} {cmd[:200]}" for pid, cmd in left]


def run_baseline_cell(ctx, system, workload, n):
    cell_tmp = tempfile.mkdtemp(prefix=f"{system}-{workload}-", dir=ctx["tmpdir"])
    result_file = os.path.join(cell_tmp, "cell-result.json")
    log_file = os.path.join(cell_tmp, "cell.log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(result_file)
    cmd = [sys.executable, os.path.abspath(__file__), "cell", system, workload,
           "--tasks", str(n), "--result", result_file, "--tmpdir", cell_tmp]
    with open(log_file, "w") as log:
        p = subprocess.Popen(cmd, cwd=cell_tmp, env=ctx["env"], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ctx["current"] = p
        try:
            p.wait(timeout=ctx["timeout"])
            res = None
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            res = {"error": f"timed out after {ctx['timeout']} s"}
        finally:
            ctx["current"] = None
    if res is None:
        try:
            with open(result_file) as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = {"error": f"cell exited {p.returncode} without a result"}
    if "error" in res:
        with open(log_file, errors="replace") as f:
            res["log_tail"] = f.read()[-3000:]
    if not ctx["keep_tmp"]:
        shutil.rmtree(cell_tmp, ignore_errors=True)  # Parsl's runinfo/, Dask's scratch space, logs
    return res


def _fmt(value, workload):
    if value is None:
        return "–"
    if workload == "sleep":
        return f"{value * 100:.1f}%"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(results, meta):
    runs = results["runs"]
    systems, workloads = meta["systems"], meta["workloads"]
    lines = []
    p = lines.append

    def cell_runs(system, workload):
        return [r for r in runs if r["system"] == system and r["workload"] == workload]

    medians = {}
    p(f"## fnx vs baselines — scale {meta['scale']}, {meta['repeat']} repeat(s), {WORKERS} workers each")
    p("")
    p(f"nproc: {meta['nproc']} · /proc/loadavg before: `{meta['loadavg_before']}` · after: "
      f"`{meta['loadavg_after']}`")
    p("")
    v = meta.get("versions", {})
    p("Versions: " + ", ".join(f"{k} {v[k]}" for k in ("fnx", "git", "python", "parsl", "dask",
                                                        "distributed") if v.get(k)))
    p("")
    p("Median of the runs (individual runs in parentheses, in run order). Higher is better "
      "everywhere. tasks/s = tasks ÷ end-to-end s; efficiency = ideal s (tasks × 10 ms ÷ 2 "
      "workers) ÷ end-to-end s; MB/s = tasks × 1,048,576 B ÷ 10^6 ÷ end-to-end s (one direction).")
    p("")
    p("| workload | metric | " + " | ".join(systems) + " |")
    p("|---|---|" + "---|" * len(systems))
    for w in workloads:
        n = tasks_for(w, meta["scale"])
        desc = {"noop": f"noop: {n:,} × `f(x)=x`",
                "sleep": f"sleep: {n:,} × 10 ms (ideal {n * SLEEP_SECONDS / WORKERS:g} s)",
                "transfer": f"transfer: {n:,} × 1 MiB in and out"}[w]
        cells = []
        for s in systems:
            rs = cell_runs(s, w)
            vals = [r.get("value") for r in rs]
            med = _median(vals)
            medians[(s, w)] = med
            if not rs:
                cells.append("–")
            elif all("skipped" in r for r in rs):
                cells.append("skipped¹")
            else:
                txt = _fmt(med, w)
                if len(rs) > 1:
                    txt += " (" + ", ".join(
                        "err" if "error" in r else "skip" if "skipped" in r else _fmt(r["value"], w)
                        for r in rs) + ")"
                elif "error" in rs[0]:
                    txt = "error²"
                cells.append(txt)
        p(f"| {desc} | {METRIC[w]} | " + " | ".join(cells) + " |")
    p("")
    if "fnx" in systems and any(b in systems for b in BASELINES):
        bs = [b for b in BASELINES if b in systems]
        p("fnx's median divided by each baseline's median (>1× means fnx is better):")
        p("")
        p("| workload | " + " | ".join(f"fnx/{b}" for b in bs) + " |")
        p("|---|" + "---|" * len(bs))
        for w in workloads:
            f = medians.get(("fnx", w))
            row = []
            for b in bs:
                v = medians.get((b, w))
                row.append(("–" if not (f and v) else
                            f"{f / v:.1f}×" if f / v >= 10 else f"{f / v:.2f}×"))
            p(f"| {w} | " + " | ".join(row) + " |")
        p("")
    p("Times in seconds (medians). End-to-end: first submit to last result (fnx: the whole "
      "command, start-up included). Start-up and shutdown of the baselines' pools are not in "
      "end-to-end.")
    p("")
    p("| workload | system | end-to-end s | submit s | start-up s | shutdown s | runs (s) |")
    p("|---|---|---|---|---|---|---|")
    for w in workloads:
        for s in systems:
            rs = [r for r in cell_runs(s, w) if "seconds" in r and "error" not in r]
            if not rs:
                continue
            def m(key, rs=rs):
                v = _median([r.get(key) for r in rs])
                return "–" if v is None else f"{v:.3f}"
            startup = m("startup_seconds")
            if s == "fnx":
                startup = "incl."
            p(f"| {w} | {s} | {m('seconds')} | {m('submit_seconds')} | {startup} | "
              f"{m('shutdown_seconds')} | " + ", ".join(f"{r['seconds']:.3f}" for r in rs) + " |")
    p("")
    if "fnx" in systems:
        probes = [x for x in meta.get("fnx_startup_probe_seconds", []) if x is not None]
        if probes:
            p(f"fnx start-up estimate (whole `fnx map` command with {WORKERS} noop tasks, included in "
              f"every fnx cell): median {statistics.median(probes):.3f} s "
              f"({', '.join(f'{x:.3f}' for x in probes)})")
            p("")
        p("fnx's own summary lines (stderr) / reports:")
        p("")
        for r in runs:
            if r["system"] != "fnx":
                continue
            extra = r.get("fnx_summary") or ""
            if r.get("fnx_report"):
                rep = r["fnx_report"]
                extra = (extra + " " if extra else "") + (
                    f"report: seconds={rep.get('seconds')} mb_per_second={rep.get('mb_per_second')}")
            if "skipped" in r:
                extra = "skipped: " + r["skipped"]
            p(f"- run {r['repeat']} {r['workload']}: {extra or '(none)'}")
        p("")
    notes = []
    if any("skipped" in r for r in runs):
        notes.append("¹ skipped: " + "; ".join(sorted({f"{r['system']} {r['workload']}: "
                                                       f"{r['skipped']}" for r in runs
                                                       if "skipped" in r})))
    errs = [r for r in runs if "error" in r]
    if errs:
        notes.append("² errors: " + "; ".join(
            f"run {r['repeat']} {r['system']} {r['workload']}: {r['error'][:300]}" for r in errs))
    strays = [r for r in runs if r.get("strays")]
    if meta.get("interrupted"):
        notes.append(f"INTERRUPTED: partial results; {len(meta.get('strays_at_exit') or [])} "
                     "process(es) of the interrupted cell ended by the harness.")
    if strays:
        notes.append("Processes left behind and ended by the harness: " + "; ".join(
            f"{r['system']} {r['workload']}: {len(r['strays'])}" for r in strays))
    elif runs:
        notes.append("No process outlived its cell (checked after every cell).")
    for n in notes:
        p(n)
        p("")
    return "\n".join(lines)


def _versions(fnx):
    v = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("parsl", "dask", "distributed"):
        with contextlib.suppress(Exception):
            v[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        out = subprocess.run([fnx, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.strip().split("\n")[0]
        v["fnx"] = out.split(" ", 1)[1] if out.startswith("fnx ") else out
    with contextlib.suppress(Exception):
        v["fnx_worker_python"] = subprocess.run(
            [os.environ.get("FNX_PYTHON", "python3"), "--version"], capture_output=True,
            text=True, timeout=30).stdout.strip()
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
        v["git"] = head + (" (dirty)" if dirty else "")
    return v


def _loadavg():
    with open("/proc/loadavg") as f:
        return f.read().strip()


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=["small", "full"], default="full")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fnx", default=os.path.join(ROOT, "target", "release", "fnx"))
    ap.add_argument("--only", default=",".join(SYSTEMS),
                    help="comma-separated subset of " + ",".join(SYSTEMS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="comma-separated subset of " + ",".join(WORKLOADS))
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--cell-timeout", type=float, default=None,
                    help="seconds before a cell is killed (default 300 small, 3600 full)")
    ap.add_argument("--keep-tmp", action="store_true")
    a = ap.parse_args(argv)

    systems = [s for s in a.only.split(",") if s]
    workloads = [w for w in a.workloads.split(",") if w]
    bad = [s for s in systems if s not in SYSTEMS] + [w for w in workloads if w not in WORKLOADS]
    if bad or not systems or not workloads or a.repeat < 1:
        ap.error(f"bad --only/--workloads/--repeat: {bad}")
    systems = [s for s in SYSTEMS if s in systems]  # fixed column order
    workloads = [w for w in WORKLOADS if w in workloads]
    fnx = os.path.abspath(a.fnx)
    if "fnx" in systems and not os.access(fnx, os.X_OK):
        print(f"error: no fnx binary at {fnx} (build it with `cargo build --release -p fnx`, pass "
              f"--fnx PATH, or leave fnx out with --only)", file=sys.stderr)
        return 2

    def _terminated(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminated)
    subreaper = _become_subreaper()
    tmpdir = tempfile.mkdtemp(prefix="fnx-compare-")
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = EXAMPLES + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["FNX_HOME"] = os.path.join(tmpdir, "fnx-home")  # fnx's run directories (logs)
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    timeout = a.cell_timeout or (300 if a.scale == "small" else 3600)
    ctx = {"fnx": fnx, "env": env, "tmpdir": tmpdir, "timeout": timeout, "current": None,
           "keep_tmp": a.keep_tmp}
    meta = {
        "scale": a.scale, "repeat": a.repeat, "systems": systems, "workloads": workloads,
        "workers": WORKERS, "tasks": {w: tasks_for(w, a.scale) for w in workloads},
        "nproc": len(os.sched_getaffinity(0)),  # what `nproc` prints
        "fnx_binary": fnx if "fnx" in systems else None,
        "versions": _versions(fnx), "subreaper": subreaper,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_before": _loadavg(), "fnx_startup_probe_seconds": [],
        "parsl_encrypted": os.environ.get("FNX_COMPARE_PARSL_ENCRYPTED", "0") == "1",
        "metrics": {"noop": "tasks / end-to-end seconds",
                    "sleep": "ideal (tasks x 0.01 s / 2 workers) / end-to-end seconds",
                    "transfer": "tasks x 1,048,576 B / 10^6 (MB, one direction) / end-to-end "
                                "seconds"},
    }
    results = {"meta": meta, "runs": []}
    print(f"# {len(systems)} systems x {len(workloads)} workloads x {a.repeat} repeat(s), "
          f"scale {a.scale}; load {meta['loadavg_before']}", file=sys.stderr, flush=True)
    rc = 0
    try:
        # Repeats outermost, so that drift in the machine's load hits every system alike.
        for rep in range(1, a.repeat + 1):
            if "fnx" in systems:
                meta["fnx_startup_probe_seconds"].append(fnx_startup_probe(ctx))
                end_strays()
            for w in workloads:
                n = tasks_for(w, a.scale)
                for s in systems:
                    load = _loadavg().split()[0]
                    print(f"[run {rep}/{a.repeat}] {w:8s} {s:11s} {n:>7,} tasks ... ",
                          end="", file=sys.stderr, flush=True)
                    try:
                        r = (FNX_CELLS[w](ctx, n) if s == "fnx"
                             else run_baseline_cell(ctx, s, w, n))
                    except subprocess.TimeoutExpired:
                        r = {"error": f"timed out after {timeout} s"}
                    r.update({"system": s, "workload": w, "tasks": n, "repeat": rep,
                              "loadavg1_at_start": float(load)})
                    r["strays"] = end_strays()
                    if "seconds" in r and "error" not in r:
                        r["value"] = metric_value(w, n, r["seconds"])
                    results["runs"].append(r)
                    if "skipped" in r:
                        msg = "skipped: " + r["skipped"]
                    elif "error" in r:
                        msg = "ERROR: " + r["error"][:300]
                        rc = 1
                    else:
                        msg = f"{r['seconds']:.3f} s -> {_fmt(r['value'], w)} {METRIC[w]}"
                        if "startup_seconds" in r:
                            msg += f" (start-up {r['startup_seconds']:.2f} s)"
                    if r["strays"]:
                        msg += f" [ended {len(r['strays'])} leftover process(es)]"
                    print(msg, file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        rc = 130
        cur = ctx.get("current")
        if cur is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cur.pid, signal.SIGKILL)
        meta["interrupted"] = True
        print("\ninterrupted; writing partial results", file=sys.stderr)
    finally:
        meta["strays_at_exit"] = end_strays(grace=1.0)
        meta["loadavg_after"] = _loadavg()
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
        if a.keep_tmp:
            print(f"temporary files kept in {tmpdir}", file=sys.stderr)
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
    print(report(results, meta))
    print(f"Raw results: {a.json}")
    return rc


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "cell":
        sys.exit(cell_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
