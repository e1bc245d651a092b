"""fnx Python worker runtime.

The node manager runs this file as ``python3 -u -B <run_dir>/fnx_worker.py`` and speaks the
frame protocol of ``docs/design/worker-protocol.md`` to it. It is copied out of the ``fnx``
package, so it is one self-contained file that uses the standard library only and imports
nothing from ``fnx``.

Design
------
* **Protocol fds are private.** Before any user code is imported, the protocol pipes (fds 0
  and 1) are duplicated to new non-inheritable fds; fd 0 becomes ``/dev/null`` and fd 1 becomes
  the log (fd 2). User code that reads stdin sees end-of-file, ``print`` and C-level writes
  land in the log, and subprocesses of user code never inherit the protocol pipes. A child
  made with ``os.fork()`` gets them pointed at ``/dev/null``, so it cannot corrupt the stream.
* **One task at a time.** The main loop reads a frame (through a buffered reader over the
  protocol fd), runs it and writes exactly one reply with one write (two for big payloads).
  Nothing user code does can raise out of the loop: argument decoding, the call and result
  encoding each catch ``BaseException`` (so ``sys.exit`` and ``KeyboardInterrupt`` in user
  code become ``exception`` results) and are reported as text, never pickled.
* **Functions are loaded lazily and cached** per ``fid``, including a load failure, which
  then fails every task of that ``fid`` with ``import_error``.
* **Results are checked before they leave.** JSON results may not hold non-string dict keys
  (``json`` would silently turn ``{1: 2}`` into ``{"1": 2}``), NaN/infinity, lone surrogates
  or anything JSON cannot hold; every encoded result is checked against
  ``FNX_MAX_RESULT_BYTES``. Error texts over 64 KiB are cut with a marker.
* **A large pickled result is never held twice.** A first pass counts its pickled size
  (keeping the bytes only up to 1 MiB); a larger result within the limit is pickled again
  straight into the pipe, so the worker's memory peaks at the result plus a constant, and one
  over the limit is refused without being encoded.
* **Exit.** End of the protocol input or an ``exit`` frame ends the process with status 0
  through a normal interpreter exit (atexit handlers run, files are flushed). A malformed
  frame is a manager bug: it is logged and the worker exits with status 2.

The hot path allocates little: the success header is a bytes template, functions come from
a dict, and the reply is one ``os.write``.
"""

import json
import os
import pickle
import struct
import sys

_PREFIX = struct.Struct(">II")  # L (length of everything after L), H (header length)
_TEXT_LIMIT = 64 * 1024  # longest error message / traceback, in UTF-8 bytes
_FRAME_CAP = 0xFFFFFFFF - 4 - (1 << 20)  # a result must fit a u32 frame with its header
_BIG_WRITE = 1 << 16  # payloads at least this big are written without concatenation
_CONTAINERS = (dict, list, tuple)
_NO_KWARGS = {}

_json_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_json_scan = json.JSONDecoder().scan_once  # the C scanner: a third of json.loads' cost
try:
    # The C encoder called directly skips json.dumps' per-call set-up. It runs without
    # cycle detection (a cycle ends in RecursionError); _json_dumps then re-encodes with the
    # standard encoder so every error carries json's own message.
    _json_c_encode = json.encoder.c_make_encoder(
        None, _json_encoder.default, json.encoder.encode_basestring, None, ":", ",",
        False, False, False)
except (AttributeError, TypeError):  # no C accelerator
    _json_c_encode = None
_OK_JSON = b'{"op":"result","tid":%d,"ok":true,"enc":"json"}'
_OK_PICKLE = b'{"op":"result","tid":%d,"ok":true,"enc":"pickle"}'


class ProtocolError(Exception):
    """The manager sent something the protocol does not allow."""


class _Failed:
    """A cached function load failure: the ``(kind, type, message, traceback)`` to report."""

    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error


def _log(message):
    try:
        os.write(2, ("fnx worker %d: %s\n" % (os.getpid(), message)).encode("utf-8", "replace"))
    except OSError:
        pass


# ---------------------------------------------------------------------------- start-up


def _setup():
    """Take the protocol fds away from user code; returns ``(proto_in, proto_out)``."""
    proto_in = os.dup(0)  # os.dup makes non-inheritable fds
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)

    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        old = getattr(sys, name)
        encoding = getattr(old, "encoding", None) or "utf-8"
        errors = (getattr(old, "errors", None) or "strict") if fd == 0 else "backslashreplace"
        stream = open(fd, mode, buffering=1, encoding=encoding, errors=errors, closefd=False)
        setattr(sys, name, stream)
        setattr(sys, "__%s__" % name, stream)

    def _blind_forked_child():
        # A child of os.fork() (e.g. a multiprocessing "fork" pool) must neither hold the
        # protocol pipes open nor write to them if it ever returns into this loop.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, proto_in, inheritable=False)
        os.dup2(null, proto_out, inheritable=False)
        os.close(null)

    os.register_at_fork(after_in_child=_blind_forked_child)

    # sys.path[0] is the run directory holding this file; resolve user modules against the
    # cwd instead, as `python -c` would (absolute, so a later os.chdir changes nothing).
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = None
    here = os.path.dirname(os.path.realpath(__file__))
    if sys.path and os.path.realpath(sys.path[0] or ".") == here:
        del sys.path[0]
    if cwd is not None:
        sys.path.insert(0, cwd)
    return proto_in, proto_out


def _max_result_bytes():
    raw = os.environ.get("FNX_MAX_RESULT_BYTES")
    if raw is None:
        _log("FNX_MAX_RESULT_BYTES is not set; using %d" % _FRAME_CAP)
        return _FRAME_CAP
    try:
        value = int(raw)
        if value < 0:
            raise ValueError
    except (TypeError, ValueError):
        _log("FNX_MAX_RESULT_BYTES=%r is not a byte count; using %d" % (raw, _FRAME_CAP))
        return _FRAME_CAP
    return min(value, _FRAME_CAP)


# ---------------------------------------------------------------------------- JSON


def _json_loads(data):
    """``json.loads`` for UTF-8 bytes, through the C scanner when the text is one bare value."""
    text = data.decode("utf-8")
    try:
        value, end = _json_scan(text, 0)
        if end == len(text):
            return value
    except StopIteration:
        pass
    return json.loads(text)  # surrounding whitespace, or an error with json's message


def _json_dumps(value):
    """Compact JSON text of ``value`` (no NaN/infinity); raises like ``json.dumps``."""
    if _json_c_encode is not None:
        try:
            return "".join(_json_c_encode(value, 0))
        except Exception:
            pass
    return _json_encoder.encode(value)


# ---------------------------------------------------------------------------- frames


def _write_all(fd, data):
    done = os.write(fd, data)
    if done < len(data):
        view = memoryview(data)
        while done < len(view):
            done += os.write(fd, view[done:])


class _Counter:
    """A pickle target that keeps the first ``keep`` bytes and counts the rest: the first
    pass over a result. A large ``bytes`` or buffer reaches ``write`` whole (the pickler does
    not copy it), so counting it costs nothing."""

    def __init__(self, keep):
        self.keep = keep
        self.size = 0
        self.parts = []

    def write(self, data):
        n = memoryview(data).nbytes
        self.size += n
        if self.parts is not None:
            if self.size <= self.keep:
                self.parts.append(bytes(data))
            else:
                self.parts = None
        return n


class _Streamed:
    """A result too large to hold twice: pickled again straight into the protocol pipe."""

    def __init__(self, value, size):
        self.value = value
        self.size = size

    def __len__(self):
        return self.size


class _PipeWriter:
    """A pickle target that writes to the protocol fd, holding the frame to ``size`` bytes."""

    def __init__(self, fd, size):
        self.fd = fd
        self.left = size

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self.left:
            self.mismatch()
        self.left -= n
        _write_all(self.fd, data)
        return n

    def mismatch(self):
        # The frame's length is already sent: the stream cannot be mended. The manager sees
        # the worker die and retries the task elsewhere; the log says why.
        _log("the result pickled to a different size the second time (a __reduce__ with side "
             "effects?): exiting")
        os._exit(3)


_SMALL_RESULT = 1 << 20  # pickled results up to this size are held and sent in one write
_SCALARS = (type(None), bool, int, float, str, bytes)  # sized without pickling them


def _pickle_result(result, max_result):
    """``(bytes or _Streamed, size)`` of ``result`` pickled; raises if it cannot be. A large
    result is counted first and streamed later, so the worker never holds it twice."""
    if type(result) in _SCALARS and sys.getsizeof(result) <= _SMALL_RESULT:
        # The common small result: one C call (the counting pass costs a microsecond more).
        data = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
        return data, len(data)
    counter = _Counter(_SMALL_RESULT)
    pickle.Pickler(counter, pickle.HIGHEST_PROTOCOL).dump(result)
    if counter.parts is not None:
        return b"".join(counter.parts), counter.size
    if counter.size > max_result:
        return None, counter.size
    return _Streamed(result, counter.size), counter.size


def _send(fd, header, payload=b""):
    prefix = _PREFIX.pack(4 + len(header) + len(payload), len(header))
    if type(payload) is _Streamed:
        _write_all(fd, prefix + header)
        writer = _PipeWriter(fd, payload.size)
        try:
            pickle.Pickler(writer, pickle.HIGHEST_PROTOCOL).dump(payload.value)
        except BrokenPipeError:
            raise
        except BaseException as exc:
            # Half a frame is out: the stream cannot be mended. The manager sees the worker
            # die (worker_lost, retried); the log says why.
            _log("pickling the result the second time failed (%s): exiting" % _safe_str(exc))
            os._exit(3)
        if writer.left:
            writer.mismatch()
    elif len(payload) < _BIG_WRITE:
        _write_all(fd, prefix + header + payload)
    else:
        _write_all(fd, prefix + header)
        _write_all(fd, payload)


# ---------------------------------------------------------------------------- errors


def _clip(text, keep_tail=False):
    """``text`` as valid UTF-8-encodable text of at most 64 KiB (plus the cut marker)."""
    data = text.encode("utf-8", "backslashreplace")  # also escapes lone surrogates
    if len(data) <= _TEXT_LIMIT:
        return data.decode("utf-8")
    if keep_tail:  # tracebacks: the end names the exception, keep both ends
        head = data[: _TEXT_LIMIT // 2].decode("utf-8", "ignore")
        tail = data[-(_TEXT_LIMIT // 2):].decode("utf-8", "ignore")
    else:
        head = data[:_TEXT_LIMIT].decode("utf-8", "ignore")
        tail = ""
    cut = len(data) - len(head.encode("utf-8")) - len(tail.encode("utf-8"))
    marker = "[... %d bytes truncated]" % cut
    return head + ("\n" + marker + "\n" + tail if keep_tail else marker)


def _type_name(exc):
    try:
        cls = type(exc)
        module = cls.__module__
        if module in (None, "builtins"):
            return str(cls.__qualname__)
        return "%s.%s" % (module, cls.__qualname__)
    except BaseException:
        return "<unknown exception type>"


def _safe_str(exc):
    for convert in (str, repr):
        try:
            text = convert(exc)
            if isinstance(text, str):
                return str.__str__(text)
        except BaseException:
            pass
    try:
        return "<unprintable %s>" % type(exc).__name__
    except BaseException:
        return "<unprintable exception>"


def _describe(exc, with_traceback=True):
    """``(type, message, traceback)`` of ``exc``; the worker's own frame is left out."""
    message = _safe_str(exc)
    text = ""
    if with_traceback:
        try:
            import traceback

            tb = exc.__traceback__
            if tb is not None:
                tb = tb.tb_next
            text = "".join(traceback.format_exception(type(exc), exc, tb))
        except BaseException:
            text = "%s: %s\n" % (_type_name(exc), message)
    return (_type_name(exc), message, text)


def _error_frame(tid, kind, type_name, message, traceback_text=""):
    error = {
        "kind": kind,
        "type": _clip(type_name),
        "message": _clip(message),
        "traceback": _clip(traceback_text, keep_tail=True),
    }
    header = {"op": "result", "tid": tid, "ok": False, "error": error}
    return json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------------- loading


def _import_module(name):
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        # The module may have been written after this process started (stale finder cache).
        importlib.invalidate_caches()
        return importlib.import_module(name)


def _load_file(fid, path):
    import importlib.machinery
    import importlib.util

    path = os.path.abspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    existing = sys.modules.get(name)
    if existing is not None:
        if getattr(existing, "__file__", None) == path:
            return existing  # another function of the same file
        name = "__fnx_file_%d__" % fid  # do not shadow an unrelated module (json.py, ...)
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    loader = importlib.machinery.SourceFileLoader(name, path)  # any file name suffix
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    return _run_new_module(importlib.util.module_from_spec(spec), name, loader.exec_module)


def _load_source(fid, source):
    import linecache
    import types

    name = "__fnx_source_%d__" % fid
    filename = "<fnx source fid=%d>" % fid
    # Lets tracebacks show source lines (entries with mtime None survive checkcache()).
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    code = compile(source, filename, "exec")
    return _run_new_module(types.ModuleType(name), name, lambda m: exec(code, m.__dict__))


def _run_new_module(module, name, execute):
    """Register ``module`` as ``name`` and run ``execute(module)``; unregister it on failure."""
    sys.modules[name] = module
    try:
        execute(module)
    except BaseException:
        if sys.modules.get(name) is module:
            del sys.modules[name]
        raise
    return module


def _load(fid, body):
    """The callable described by ``body``, or a ``_Failed`` describing why not."""
    if body is None:
        return _Failed(("import_error", "LookupError", "no def received for fid %d" % fid, ""))
    try:
        kind = body.get("kind")
        if kind == "python_ref":
            obj, attr = _import_module(body["module"]), body["qualname"]
        elif kind == "python_file":
            obj, attr = _load_file(fid, body["path"]), body["name"]
        elif kind == "python_source":
            obj, attr = _load_source(fid, body["source"]), body["name"]
        else:
            raise ValueError("unknown function body kind %r" % (kind,))
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError("%r is a %s, not a callable" % (attr, type(obj).__name__))
        return obj
    except BaseException as exc:
        return _Failed(("import_error",) + _describe(exc))


# ---------------------------------------------------------------------------- tasks


def _check_keys(obj):
    """Raise TypeError at the first dict key in ``obj`` that is not a str."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                try:
                    shown = repr(key)[:200]
                except BaseException:
                    shown = "<unprintable key>"
                raise TypeError(
                    "dict key %s of type %s is not a string (JSON would turn it into one)"
                    % (shown, type(key).__name__)
                )
            if isinstance(value, _CONTAINERS):
                _check_keys(value)
    else:
        for value in obj:
            if isinstance(value, _CONTAINERS):
                _check_keys(value)


def _check_pickle_meta(meta):
    """Raise TypeError if pickled arguments come from a Python of another major.minor version.

    ``meta`` is the third element of a pickled ``(args, kwargs, meta)`` tuple; the client
    puts its ``"python": "X.Y"`` there. Pickles of one version may load in another and then
    mean something else (or fail deep inside user code), so a mismatch fails the task early.
    """
    if not isinstance(meta, dict):
        raise TypeError("pickled argument metadata must be a dict, not %s" % type(meta).__name__)
    theirs = meta.get("python")
    if theirs is None:
        return
    ours = "%d.%d" % sys.version_info[:2]
    if not isinstance(theirs, str) or ".".join(theirs.split(".")[:2]) != ours:
        raise TypeError(
            "arguments were pickled by Python %s on the client but this worker runs Python %s "
            "(%s); use the same Python major.minor version on both sides (the pool's `python` "
            "setting) or submit JSON arguments" % (theirs, ours, sys.executable)
        )


def _run_in(cwd, fn, tid, enc, payload, max_result):
    """Run a task that has input files in its own directory `cwd` (the manager placed them
    there and removes the directory afterwards): the call runs with `cwd` as the working
    directory and FNX_TASK_DIR naming it, and both are restored afterwards."""
    before = os.getcwd()
    try:
        os.chdir(cwd)
    except OSError as exc:
        return _error_frame(tid, "bad_input", "InputFileError",
                            "cannot enter the task directory %s: %s" % (cwd, exc)), b""
    os.environ["FNX_TASK_DIR"] = cwd
    try:
        return _run(fn, tid, enc, payload, max_result)
    finally:
        os.environ.pop("FNX_TASK_DIR", None)
        os.chdir(before)


def _run(fn, tid, enc, payload, max_result):
    """Run one task; returns ``(header, payload)`` of the reply."""
    # Arguments.
    try:
        if enc == "json":
            args = _json_loads(payload)
            if type(args) is list:
                kwargs = _NO_KWARGS
            elif type(args) is dict:
                args, kwargs = (), args
            else:
                raise TypeError(
                    "JSON arguments must be an array (positional) or an object (keyword), not %s"
                    % ("null" if args is None else type(args).__name__)
                )
        elif enc == "pickle":
            both = pickle.loads(payload)
            if type(both) is not tuple or len(both) not in (2, 3):
                raise TypeError(
                    "pickled arguments must be the tuple (args, kwargs) or (args, kwargs, meta)"
                )
            if len(both) == 3:
                _check_pickle_meta(both[2])
            args, kwargs = both[0], both[1]
            if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
                raise TypeError("pickled arguments must be (tuple or list, dict)")
        else:
            raise ValueError("unknown argument encoding %r" % (enc,))
    except BaseException as exc:
        return _error_frame(tid, "bad_input", *_describe(exc)), b""

    # The call.
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        return _error_frame(tid, "exception", *_describe(exc)), b""
    args = kwargs = None

    # The result.
    if enc == "json":
        if type(result) is str and len(result) > max_result:
            # Its JSON text has at least its length in bytes and two quotes: not encoded.
            message = "result of at least %d bytes exceeds the limit of %d bytes" % (
                len(result) + 2, max_result)
            return _error_frame(tid, "result_too_large", "ValueError", message), b""
        try:
            text = _json_dumps(result)
            if isinstance(result, _CONTAINERS):
                _check_keys(result)
            data = text.encode("utf-8")
            text = None
        except UnicodeEncodeError as exc:
            message = "result is not valid Unicode text: %s" % _safe_str(exc)
            return _error_frame(tid, "not_serializable", "UnicodeEncodeError", message), b""
        except BaseException as exc:
            type_name, message, _ = _describe(exc, with_traceback=False)
            message = "result cannot be encoded as JSON: " + message
            return _error_frame(tid, "not_serializable", type_name, message), b""
        header = _OK_JSON % tid
    else:
        try:
            data, size = _pickle_result(result, max_result)
        except BaseException as exc:
            type_name, message, tb = _describe(exc)
            message = "result cannot be pickled: " + message
            return _error_frame(tid, "not_serializable", type_name, message, tb), b""
        if data is None:
            message = "result of %d bytes exceeds the limit of %d bytes" % (size, max_result)
            return _error_frame(tid, "result_too_large", "ValueError", message), b""
        header = _OK_PICKLE % tid
    if len(data) > max_result:
        message = "result of %d bytes exceeds the limit of %d bytes" % (len(data), max_result)
        return _error_frame(tid, "result_too_large", "ValueError", message), b""
    return header, data


def _serve(proto_in, proto_out, max_result):
    """Answer frames until the manager is done; returns the reason."""
    read = open(proto_in, "rb", buffering=1 << 16).read
    unpack = _PREFIX.unpack
    loads = _json_loads
    defs = {}  # fid -> body
    funcs = {}  # fid -> callable or _Failed
    while True:
        prefix = read(8)
        if len(prefix) < 8:
            if prefix:
                _log("protocol input ended inside a frame prefix")
            return "end of protocol input"
        length, header_len = unpack(prefix)
        if header_len > length - 4:
            raise ProtocolError("header length %d exceeds frame length %d" % (header_len, length))
        header_bytes = read(header_len)
        payload_len = length - 4 - header_len
        payload = read(payload_len) if payload_len else b""
        if len(header_bytes) < header_len or len(payload) < payload_len:
            _log("protocol input ended inside a frame")
            return "end of protocol input"
        try:
            header = loads(header_bytes)
            op = header["op"]
            if op == "task":
                tid, fid, enc = header["tid"], header["fid"], header["enc"]
                if type(tid) is not int or type(fid) is not int:
                    raise TypeError("tid and fid must be integers")
        except (ValueError, TypeError, KeyError) as exc:
            raise ProtocolError("bad frame header %r: %s" % (header_bytes[:200], exc))

        if op == "task":
            fn = funcs.get(fid)
            if fn is None:
                fn = funcs[fid] = _load(fid, defs.get(fid))
            cwd = header.get("cwd")
            if type(fn) is _Failed:
                reply = _error_frame(tid, *fn.error), b""
            elif cwd is None:
                reply = _run(fn, tid, enc, payload, max_result)
            else:
                reply = _run_in(cwd, fn, tid, enc, payload, max_result)
            payload = None
            _send(proto_out, *reply)
            reply = None  # the result is not kept while the next task runs
        elif op == "def":
            try:
                fid, body = header["fid"], header["body"]
                if type(fid) is not int:
                    raise TypeError("fid must be an integer")
            except (KeyError, TypeError) as exc:
                raise ProtocolError("bad def frame: %s" % exc)
            defs[fid] = body
            funcs.pop(fid, None)
        elif op == "exit":
            return "exit requested"
        else:
            raise ProtocolError("unknown op %r" % (op,))


def _ready_header(pid, python, executable):
    """The header of the worker's first frame. An interpreter path Python cannot tell, or that
    is not UTF-8, is sent as null (the manager then keeps its own)."""
    try:
        if executable:
            executable.encode("utf-8")
    except UnicodeEncodeError:
        executable = None
    ready = {"op": "ready", "pid": pid, "python": python, "executable": executable or None}
    return json.dumps(ready, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def main():
    proto_in, proto_out = _setup()
    max_result = _max_result_bytes()
    python = sys.version.split()[0]
    _log(
        "started: python %s (%s), worker id %s, max result %d bytes"
        % (python, sys.executable, os.environ.get("FNX_WORKER_ID", "?"), max_result)
    )
    try:
        _send(proto_out, _ready_header(os.getpid(), python, sys.executable))
        reason = _serve(proto_in, proto_out, max_result)
    except BrokenPipeError:
        reason = "protocol output closed"
    except ProtocolError as exc:
        _log("exiting on protocol error: %s" % exc)
        sys.exit(2)
    _log("exiting: %s" % reason)
    sys.exit(0)


if __name__ == "__main__":
    main()
