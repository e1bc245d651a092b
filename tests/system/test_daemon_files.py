"""Input files of daemon tasks (docs/api.md, "Input files"): small files travel with the task,
large ones are linked by path; the task runs in its own directory holding them, which is
removed when the task ends."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

SDK = Path(__file__).resolve().parents[2] / "sdk" / "python"
if str(SDK) not in sys.path:
    sys.path.insert(0, str(SDK))

import fnx  # noqa: E402

READ_BOTH = (
    "import os\n"
    "def read_both(a, b):\n"
    "    return [open(a).read(), open(b).read(), os.environ['FNX_TASK_DIR'] == os.getcwd()]\n"
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def task_dirs(daemon) -> list[Path]:
    return list(daemon.home.glob("runs/*/*/tasks/*"))


def test_python_and_shell_tasks_read_inline_and_path_files(daemon, tmp_path):
    big = tmp_path / "big.dat"
    big.write_bytes(b"B" * (3 << 20))  # beyond the inline size the SDK and CLI upload
    fid = daemon.register({"kind": "python", "source": READ_BOTH, "entry": "read_both"})
    sid = daemon.register({"kind": "shell", "command": "wc -c < {f} && cat {g}"})
    ids = daemon.submit([
        {"function": fid, "args": ["small.txt", "big.dat"],
         "files": [{"name": "small.txt", "data_b64": b64(b"hello")},
                   {"name": "big.dat", "path": str(big)}]},
        {"function": sid, "args": {"f": "big.dat", "g": "note"},
         "files": [{"name": "big.dat", "path": str(big)},
                   {"name": "note", "data_b64": b64(b"a note")}]},
    ])
    py, sh = (daemon.wait_task(i) for i in ids)
    assert py["state"] == "success", py
    value = py["result"]["value"]
    assert value[0] == "hello" and len(value[1]) == 3 << 20 and value[2] is True, value[:1]
    assert sh["state"] == "success", sh
    assert sh["result"]["value"]["stdout"] == f"{3 << 20}\na note", sh
    assert task_dirs(daemon) == [], "task directories must be removed when tasks end"


def test_sdk_and_cli_upload_small_files_and_pass_large_ones_by_path(daemon, tmp_path):
    small, big = tmp_path / "small.txt", tmp_path / "big.dat"
    small.write_text("from the SDK")
    big.write_bytes(b"x" * (2 << 20))
    client = daemon.client()
    fid = client.register_function(READ_BOTH, entry="read_both")
    tid = client.run_with_files(fid, {"s.txt": str(small), "b.dat": str(big)}, "s.txt", "b.dat")
    got = client.get_result(tid, timeout=60)
    assert got[0] == "from the SDK" and len(got[1]) == 2 << 20 and got[2] is True
    tid = client.run_with_files(fid, {"s.txt": b"bytes", "b.dat": b"more"}, "s.txt", "b.dat")
    assert client.get_result(tid, timeout=60) == ["bytes", "more", True]

    r = daemon.fnx("submit", str(fid), "small.txt", "big.dat", "--file", str(small),
                   "--file", f"big.dat={big}", "--wait", "--output", "json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["state"] == "success", rec


def test_bad_files_are_refused_or_fail_clearly(daemon):
    sid = daemon.register({"kind": "shell", "command": "cat {f}"})

    def refused(files, status=400):
        r = daemon.api("POST", "/v1/tasks",
                       {"tasks": [{"function": sid, "args": {"f": "x"}, "files": files}]})
        assert r.status == status, (files, r.status, r.body)
        return r.body["error"]["message"]

    assert "tasks[0].files[0].name" in refused([{"name": "../x", "data_b64": b64(b"1")}])
    assert "tasks[0].files[0].name" in refused([{"name": "a/b", "data_b64": b64(b"1")}])
    assert "appears twice" in refused([{"name": "x", "data_b64": b64(b"1")},
                                       {"name": "x", "data_b64": b64(b"2")}])
    assert "absolute" in refused([{"name": "x", "path": "relative/x"}])
    assert "exactly one" in refused([{"name": "x"}])
    assert "data_b64" in refused([{"name": "x", "data_b64": "not base64!"}])
    # A path that does not exist on the node fails the task, naming the file.
    [tid] = daemon.submit([{"function": sid, "args": {"f": "x"},
                            "files": [{"name": "x", "path": "/does/not/exist"}]}])
    rec = daemon.wait_task(tid)
    assert rec["state"] == "failed" and rec["error"]["kind"] == "bad_input", rec
    assert "/does/not/exist" in rec["error"]["message"]


def test_inline_files_count_against_the_payload_limit(make_daemon):
    d = make_daemon(limits={"max_payload_mb": 1})
    sid = d.register({"kind": "shell", "command": "cat {f}"})
    r = d.api("POST", "/v1/tasks", {"tasks": [{"function": sid, "args": {"f": "x"},
                                               "files": [{"name": "x",
                                                          "data_b64": b64(b"z" * (1 << 20))}]}]})
    assert r.status == 413, (r.status, r.body)
    assert "path" in r.body["error"]["message"], "the error suggests passing the file by path"
