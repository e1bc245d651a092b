"""Per-task cost of a function's own container once its workers are warm (issue 5).

A daemon pool of 2 managers x 1 worker with the `custom` bubblewrap template; batches of N
no-op tasks of a function with `"container": {"image": "alpha"}` alternate with batches of a
function without one (5 each, after a warm-up batch of each). Prints each batch's time (from
the submit request to all results terminal), the medians and their ratio, and the managers'
workers per environment.

    python3 benches/daemon/function_containers.py target/debug/fnx 5000

Needs bubblewrap (`scripts/install-deps.sh --test` installs it)."""
import atexit, json, os, subprocess, sys, time, urllib.request, statistics, socket

FNX = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
d = os.path.join(os.environ.get("TMPDIR", "/tmp"), "fnx-bench-function-containers")
subprocess.run(["rm", "-rf", d]); os.makedirs(d)
def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
p = port()
tmpl = ("bwrap --ro-bind / / --dev /dev --proc /proc --bind {rundir} {rundir} "
        "--unshare-pid --die-with-parent --setenv FNX_TEST_IMAGE {image} {cmd}")
open(f"{d}/fnx.toml", "w").write(f"""
[daemon]
data_dir = "{d}/data"
listen = "127.0.0.1:{p}"
[pools.local]
managers = 2
workers_per_manager = 1
container_runtime = "custom"
container_template = "{tmpl}"
""")
env = dict(os.environ, FNX_HOME=f"{d}/data")
log = open(f"{d}/daemon.log", "w")
proc = subprocess.Popen([FNX, "daemon", "--config", f"{d}/fnx.toml"], env=env, stdout=log, stderr=log)
atexit.register(proc.terminate)
url = f"http://127.0.0.1:{p}"
def api(method, path, body=None):
    req = urllib.request.Request(url + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {tok}"} if tok else {})})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"null")
tok = None
for _ in range(200):
    try:
        api("GET", "/v1/health"); break
    except Exception:
        time.sleep(0.1)
tok = json.load(open(f"{d}/data/client.json"))["token"]
src = "def noop(x):\n    return x\n"
fc = api("POST", "/v1/functions", {"kind": "python", "entry": "noop", "source": src, "name": "c",
                                   "container": {"image": "alpha"}})["id"]
fb = api("POST", "/v1/functions", {"kind": "python", "entry": "noop", "source": src, "name": "b"})["id"]
def run(fid, n):
    t0 = time.monotonic()
    ids = api("POST", "/v1/tasks", {"tasks": [{"function": fid, "args": [i]} for i in range(n)]})["ids"]
    while True:
        recs = api("POST", "/v1/tasks/status", {"ids": ids})["tasks"]
        if all(r["state"] in ("success", "failed", "cancelled") for r in recs):
            assert all(r["state"] == "success" for r in recs), recs[:3]
            return time.monotonic() - t0
        time.sleep(0.02)
run(fc, 200); run(fb, 200)  # warm both
res = {"container": [], "bare": []}
for r in range(5):
    for name, fid in (("bare", fb), ("container", fc)):
        t = run(fid, N)
        res[name].append(t)
        print(name, r, f"{t:.3f}s", open("/proc/loadavg").read().split()[0], flush=True)
mb, mc = statistics.median(res["bare"]), statistics.median(res["container"])
print(f"median bare {mb:.3f}s ({N/mb:.0f} tasks/s), container {mc:.3f}s ({N/mc:.0f} tasks/s), "
      f"container/bare throughput {mb/mc:.3f}")
st = api("GET", "/v1/status")
print(json.dumps([m.get("environments") for p_ in st["pools"] for m in p_.get("managers", [])]))
proc.terminate(); proc.wait()
