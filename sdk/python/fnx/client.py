"""The fnx HTTP client (standard library only; the API is ``docs/api.md``).

The daemon is reached at an ``http://`` or ``https://`` URL with a token, or at
``unix:///absolute/path/to/fnx.sock``: HTTP/1.1 over that Unix domain socket, where the daemon
knows the caller by the socket's peer credentials, so the token is optional.

Layout: ``resolve_config`` (URL and token, finding the daemon's socket when nothing names a
URL); ``_Transport`` (one keep-alive ``http.client`` connection per thread, over TCP or a Unix
socket, JSON in and out, error statuses raised as exceptions); helpers that turn callables into
source and arguments into task payloads; and ``Client``, the public facade. The exceptions and
the decoding of task records live in ``errors.py``.
"""

import ast
import base64
import dis
import http.client
import inspect
import json
import os
import pickle
import socket
import stat
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
import weakref

from .errors import (  # noqa: F401 (re-exported)
    TERMINAL, AuthError, BadRequest, ConfigError, ConnectionFailed, FnxError, Forbidden,
    HTTPError, NotFound, PayloadTooLarge, QueueFull, RemoteException, ResultDecodeError,
    StoreUnavailable, TaskCancelled, TaskFailed, decode_record, http_error, task_error)

PYTHON = "%d.%d" % sys.version_info[:2]
MAX_BATCH = 10_000  # tasks per POST /v1/tasks and ids per POST /v1/tasks/status
MAX_BATCH_BYTES = 64 << 20  # request body per POST /v1/tasks (the daemon's default limit: 256 MiB)


def task_size(task):
    """About how many bytes ``task`` adds to a submit's JSON body."""
    size = 64 + len(task.get("data_b64") or "")
    if "args" in task:
        size += len(json.dumps(task["args"]))
    for f in task.get("files") or ():
        size += 32 + len(f.get("data_b64") or "") + len(f.get("path") or "")
    return size


def chunks(tasks):
    """Split task dicts into submit requests: at most MAX_BATCH tasks and about
    MAX_BATCH_BYTES each (a single larger task goes alone)."""
    chunk, size = [], 0
    for task in tasks:
        n = task_size(task)
        if chunk and (len(chunk) == MAX_BATCH or size + n > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(task)
        size += n
    if chunk:
        yield chunk
POLL_SLICE_S = 30  # the longest single long-poll the client asks for
SUBMIT_ATTEMPTS = 7  # connection errors and 503s: retried with the same Idempotency-Key
BUSY_ATTEMPTS = 6  # a 503 refused before anything was done (a connection cap, busy): retried
SUBMIT_BACKOFF_S = (0.2, 0.5, 1, 2, 4, 8)


# ---------------------------------------------------------------------------- configuration


SYSTEM_SOCKET = "/run/fnx/fnx.sock"  # a daemon's socket for the whole host


def fnx_home():
    """``$FNX_HOME``, by default ``~/.fnx``: where ``client.json`` and a user's socket are."""
    return os.environ.get("FNX_HOME") or os.path.join(os.path.expanduser("~"), ".fnx")


def unix_socket_path(url):
    """The socket path of a ``unix:///absolute/path`` URL, or None for any other URL; a unix
    URL whose path is empty or relative raises ``ConfigError``."""
    if not url.lower().startswith("unix:"):
        return None
    path = url[7:] if url[5:7] == "//" else ""
    if not path.startswith("/"):
        raise ConfigError("fnx URL %r does not name a socket by its absolute path (write "
                          "unix:///absolute/path/to/fnx.sock)" % url)
    return path


def find_socket(paths):
    """The first of ``paths`` that exists and is a socket, or None."""
    for path in paths:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path
        except OSError:
            pass  # missing, or a directory on the way that we may not search
    return None


def resolve_config(url=None, token=None):
    """``(url, token)``: each from the arguments, else ``FNX_URL``/``FNX_TOKEN``, else the file
    ``$FNX_HOME/client.json`` (``~/.fnx/client.json``). When none of these gives a URL, the first
    of ``$FNX_HOME/fnx.sock`` and ``/run/fnx/fnx.sock`` that is a socket gives
    ``unix:///that/path``. The token may be None for a ``unix://`` URL only (the daemon knows the
    caller by the socket's credentials); otherwise ``ConfigError`` names every place looked at.
    """
    url = url or os.environ.get("FNX_URL") or None
    token = token or os.environ.get("FNX_TOKEN") or None
    home = fnx_home()
    path = os.path.join(home, "client.json")
    if url is None or token is None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise ConfigError("cannot read %s: %s" % (path, exc)) from None
        url = url or data.get("url") or None
        token = token or data.get("token") or None
    sockets = (os.path.join(home, "fnx.sock"), SYSTEM_SOCKET)
    if url is None:
        found = find_socket(sockets)
        if found is not None:
            url = "unix://" + found
    if url is not None and unix_socket_path(url) is not None:
        return url, token
    missing = [name for name, value in (("URL", url), ("token", token)) if value is None]
    if missing:
        ways = ["pass Client(url=..., token=...)", "set FNX_URL and FNX_TOKEN",
                "provide %s (the daemon writes it on its first start)" % path]
        if url is None:
            ways.append("run the daemon with its socket at %s or %s (neither is a socket now)"
                        % sockets)
        raise ConfigError("no fnx %s found: %s, or %s"
                          % (" or ".join(missing), ", ".join(ways[:-1]), ways[-1]))
    return url, token


# ---------------------------------------------------------------------------- transport


class UnixHTTPConnection(http.client.HTTPConnection):
    """An ``http.client`` connection over the AF_UNIX stream socket at ``socket_path`` (the
    Host header is ``localhost``). A failed connect names the path in its ``OSError``."""

    def __init__(self, socket_path, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            if exc.errno is not None and exc.filename is None:
                exc.filename = self.socket_path
            raise
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _Transport:
    """JSON over one persistent ``http.client`` connection per thread (TCP, or the socket of a
    ``unix://`` URL). Without a token no ``Authorization`` header is sent."""

    def __init__(self, url, token, timeout):
        self.url = url
        self._socket = unix_socket_path(url)
        if self._socket is None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("fnx URL %r is not an http://, https:// or unix:// URL" % url)
            self._host, self._port = parts.hostname, parts.port
            self._cls = http.client.HTTPSConnection if parts.scheme == "https" else \
                http.client.HTTPConnection
            self._prefix = parts.path.rstrip("/")
        else:
            self._prefix = ""
        self._auth = None if token is None else "Bearer " + token
        self.timeout = timeout
        self._local = threading.local()
        self._all = weakref.WeakSet()  # live connections, for close(); a thread's goes with it
        self._lock = threading.Lock()

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            if self._socket is not None:
                conn = UnixHTTPConnection(self._socket, timeout=self.timeout)
            else:
                conn = self._cls(self._host, self._port, timeout=self.timeout)
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._all.add(conn)
        return conn

    def _drop(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                self._all.discard(conn)

    def close(self):
        with self._lock:
            conns, self._all = list(self._all), weakref.WeakSet()
        for conn in conns:
            conn.close()

    def request(self, method, path, body=None, headers=None, wait=0.0):
        """Send one request; returns ``(status, headers, decoded JSON or None)``.

        A reused connection that turns out broken is reopened and the request sent once more.
        A 503 the daemon gives before doing anything (``too_many_connections`` at a connection
        cap, ``busy``) is retried after its ``Retry-After``, a few times. Error statuses raise
        the matching ``HTTPError`` subclass.
        """
        for attempt in range(BUSY_ATTEMPTS):
            try:
                return self._request_once(method, path, body, headers, wait)
            except StoreUnavailable as exc:
                if exc.code not in ("too_many_connections", "busy") or \
                        attempt + 1 == BUSY_ATTEMPTS:
                    raise
                time.sleep(min(getattr(exc, "retry_after", None) or 1.0, 5.0))

    def _request_once(self, method, path, body=None, headers=None, wait=0.0):
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        hdrs = {"Accept": "application/json"}
        if self._auth is not None:
            hdrs["Authorization"] = self._auth
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        timeout = None if self.timeout is None else self.timeout + wait
        for attempt in (1, 2):
            conn = self._connection()
            reused = conn.sock is not None
            conn.timeout = timeout
            if reused:
                conn.sock.settimeout(timeout)
            try:
                try:
                    conn.request(method, self._prefix + path, body=data, headers=hdrs)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the daemon may answer (413) before reading all of a large body
                resp = conn.getresponse()
                raw = resp.read()
            except socket.timeout as exc:
                self._drop()
                raise ConnectionFailed("no answer from %s to %s %s within %gs"
                                       % (self.url, method, path, timeout)) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if reused and attempt == 1:
                    continue  # the daemon closed an idle keep-alive connection
                raise ConnectionFailed("cannot reach fnx daemon at %s (%s %s): %s"
                                       % (self.url, method, path, exc)) from exc
            try:
                return self._decode(method, path, resp, raw)
            except StoreUnavailable as exc:
                try:
                    exc.retry_after = float(resp.headers.get("Retry-After") or 1)
                except ValueError:
                    exc.retry_after = 1.0
                raise

    @staticmethod
    def _decode(method, path, resp, raw):
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        if resp.status < 400:
            if raw and doc is None:
                raise FnxError("%s %s answered %d with a body that is not JSON: %r"
                               % (method, path, resp.status, raw[:200]))
            return resp.status, resp.headers, doc
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            code, message = str(err.get("code", "")), str(err.get("message", ""))
        else:
            code, message = "", raw[:500].decode("utf-8", "replace") or resp.reason
        raise http_error(resp.status, code, message, method, path)


# ---------------------------------------------------------------------------- payloads


def encode_pickle(args, kwargs):
    """``data_b64`` for pickled arguments: ``(args, kwargs, {"python": "X.Y"})``."""
    data = pickle.dumps((tuple(args), dict(kwargs), {"python": PYTHON}))
    return base64.b64encode(data).decode("ascii")


# Input files up to this size are uploaded with the task; larger ones are passed by path (they
# must be on a filesystem the nodes share).
INLINE_FILE_MAX = 1 << 20


def file_entries(files):
    """``files`` of a task from ``{name: bytes | local path}``: bytes and small files are
    uploaded, larger files are passed by their absolute path."""
    out = []
    for name, value in files.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            out.append({"name": name, "data_b64": base64.b64encode(bytes(value)).decode("ascii")})
            continue
        path = os.path.abspath(os.fspath(value))
        if os.path.getsize(path) <= INLINE_FILE_MAX:
            with open(path, "rb") as f:
                data = f.read()
            out.append({"name": name, "data_b64": base64.b64encode(data).decode("ascii")})
        else:
            out.append({"name": name, "path": path})
    return out


def make_task(function_id, args=(), kwargs=None, encoding="pickle", files=None, **options):
    """One element of ``POST /v1/tasks``' ``tasks``; ``options``: pool, priority, walltime,
    retries, memory_mb; ``files``: ``{name: bytes | local path}`` placed in the task's working
    directory."""
    task = {"function": int(function_id)}
    if files:
        task["files"] = file_entries(files)
    kwargs = kwargs or {}
    if encoding == "pickle":
        task["encoding"] = "pickle"
        task["data_b64"] = encode_pickle(args, kwargs)
    elif encoding == "json":
        if args and kwargs:
            raise TypeError("JSON arguments are either positional or keyword, not both; "
                            "use the pickle encoding to mix them")
        task["args"] = dict(kwargs) if kwargs else list(args)
    else:
        raise ValueError("unknown encoding %r (use 'pickle' or 'json')" % (encoding,))
    task.update({k: v for k, v in options.items() if v is not None})
    return task


def _no_source(fn, why):
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return FnxError(
        "cannot register %s: %s; define it at the top level of a module and pass the string "
        "\"module:qualname\" (importable on the workers), or pass its source text and entry"
        % (name, why))


def _global_names(code):
    """Names ``code`` (and code nested in it) reads as globals."""
    names = set()
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"):
            names.add(ins.argval)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _global_names(const)
    return names


def _import_line(name, value):
    """An import statement binding ``name`` to ``value`` on the worker, or None."""
    if inspect.ismodule(value):
        mod = value.__name__
        return "import %s" % mod if name == mod else "import %s as %s" % (mod, name)
    mod, qual = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not isinstance(mod, str) or mod == "__main__" or not isinstance(qual, str) or "." in qual:
        return None
    if getattr(sys.modules.get(mod), qual, None) is not value:
        return None
    return "from %s import %s" % (mod, qual) + ("" if qual == name else " as %s" % name)


def source_of(fn):
    """``(source, entry)`` for a plain function: its dedented source without decorators,
    preceded by imports for the modules and importable objects it uses as globals."""
    if inspect.ismethod(fn) or not inspect.isfunction(fn):
        raise _no_source(fn, "only plain functions can be sent as source")
    if fn.__name__ == "<lambda>":
        raise _no_source(fn, "a lambda has no name to call")
    if fn.__code__.co_freevars:
        raise _no_source(fn, "it is a closure over %s" % ", ".join(fn.__code__.co_freevars))
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise _no_source(fn, "its source is not available (%s)" % exc) from None
    tree = ast.parse(source)
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != fn.__name__:
        raise _no_source(fn, "its source does not start with its def")
    lines = source.splitlines(True)[node.lineno - 1:]  # decorators are not sent
    names = _global_names(fn.__code__)
    for part in (node.args, node.returns):  # defaults and annotations run at def time
        if part is not None:
            names.update(n.id for n in ast.walk(part) if isinstance(n, ast.Name))
    imports, unknown = [], []
    for name in sorted(names - {fn.__name__}):
        if name not in fn.__globals__:
            continue  # a builtin, or undefined here too
        line = _import_line(name, fn.__globals__[name])
        (imports if line else unknown).append(line or name)
    if unknown:
        raise _no_source(fn, "it uses the global name(s) %s, which cannot be sent with its source"
                         " (import or define them inside the function, or pass them as "
                         "arguments)" % ", ".join(unknown))
    return "".join(line + "\n" for line in imports) + "".join(lines), fn.__name__


def _single_def(source):
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise FnxError("the function source does not parse: %s" % exc) from None
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if len(defs) != 1:
        raise FnxError("the source defines %d top-level functions (%s); pass entry=NAME"
                       % (len(defs), ", ".join(defs) or "none"))
    return defs[0]


# ---------------------------------------------------------------------------- the client


class Client:
    """A connection to an fnx daemon.

    ``url`` is ``http://host:port``, ``https://...`` or ``unix:///absolute/path/to/fnx.sock``
    (HTTP over that Unix domain socket). ``url`` and ``token`` each default to
    ``FNX_URL``/``FNX_TOKEN``, then to ``$FNX_HOME/client.json`` (``~/.fnx/client.json``). If
    none of them names a URL, the first of ``$FNX_HOME/fnx.sock`` and ``/run/fnx/fnx.sock``
    that is a socket is used. Over a socket the daemon knows the caller by its credentials, so
    the token is optional (one that is found is still sent); other URLs need one.
    ``ConfigError`` names every place looked at when nothing is found.

    ``timeout`` (seconds) bounds every request (long polls get their wait on top). Each thread
    uses its own keep-alive connection, so one ``Client`` may be shared between threads.
    """

    def __init__(self, url=None, token=None, timeout=60.0):
        url, token = resolve_config(url, token)
        self.url = url
        self._http = _Transport(url, token, timeout)
        self._lock = threading.Lock()
        # function object -> id (weak: a function that goes away leaves no entry), and
        # (source, entry) -> id, so that a function defined anew with the same code (a nested
        # def, a re-run cell) is not registered again.
        self._registered = weakref.WeakKeyDictionary()
        self._by_source = {}
        self._refs = {}  # "module:qualname" -> id
        self._kinds = {}  # function id -> kind, for functions registered through this client

    def close(self):
        """Close every connection of this client (they reopen on the next request)."""
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, method, path, body=None, headers=None, wait=0.0):
        """Low-level: one API request; returns the decoded JSON answer (None for 204)."""
        return self._http.request(method, path, body, headers, wait)[2]

    # -- functions -----------------------------------------------------------------------

    def register_function(self, callable_or_source, name=None, entry=None, container=None,
                          dependencies=None):
        """Register a Python function; returns its id.

        ``callable_or_source`` is a function (its source is sent; it may use modules and
        importable objects as globals, which become imports), a ``"module:qualname"``
        reference imported on the workers, or source text defining ``entry`` (default: its
        only top-level function). Decorators of a callable are not sent.
        """
        body = {"kind": "python"}
        obj = callable_or_source
        if callable(obj):
            body["source"], body["entry"] = source_of(obj)
        elif not isinstance(obj, str):
            raise TypeError("expected a function or a string, not %s" % type(obj).__name__)
        elif ":" in obj and "\n" not in obj and "def " not in obj:
            body["ref"] = obj.strip()
        else:
            body["source"], body["entry"] = obj, entry or _single_def(obj)
        for key, value in (("name", name), ("container", container),
                           ("dependencies", dependencies)):
            if value is not None:
                body[key] = value
        return self._register(body)

    def register_shell(self, command, name=None):
        """Register a shell command template (``{param}`` fields); returns its id."""
        body = {"kind": "shell", "command": command}
        if name is not None:
            body["name"] = name
        return self._register(body)

    def _register(self, body):
        record = self.request("POST", "/v1/functions", body)
        self._kinds[record["id"]] = body["kind"]
        return int(record["id"])

    def function_id(self, fn):
        """The id of ``fn``: an int is returned as is; a function (or a ``"module:qualname"``
        string) is registered once per client, cached by the object."""
        if isinstance(fn, int) and not isinstance(fn, bool):
            return fn
        if not (inspect.isfunction(fn) or isinstance(fn, str)):
            return self.register_function(fn)  # raises the reason it cannot be sent
        cache = self._refs if isinstance(fn, str) else self._registered
        with self._lock:
            fid = cache.get(fn)
        if fid is not None:
            return fid
        key = None
        if not isinstance(fn, str):
            key = source_of(fn)  # (source, entry); raises the reason it cannot be sent
            with self._lock:
                fid = self._by_source.get(key)
        if fid is None:
            fid = self.register_function(fn)
        with self._lock:
            fid = cache.setdefault(fn, fid)
            if key is not None:
                self._by_source.setdefault(key, fid)
        return fid

    def get_function(self, function_id):
        """The function record (with ``source`` for Python source functions)."""
        return self.request("GET", "/v1/functions/%d" % function_id)

    def list_functions(self):
        """Your function records (an admin's: everyone's)."""
        return self.request("GET", "/v1/functions")["functions"]

    def delete_function(self, function_id):
        """Delete a function; submitted tasks still run."""
        self.request("DELETE", "/v1/functions/%d" % function_id)

    # -- submitting ----------------------------------------------------------------------

    def submit_tasks(self, tasks):
        """Low-level: ``POST /v1/tasks`` with task dicts (see ``make_task``); returns ids.

        Batches over 10,000 tasks or about 64 MiB are split. Each request carries an ``Idempotency-Key`` and
        is retried with the same key after connection errors and 503 answers.
        """
        ids = []
        for chunk in chunks(tasks):
            ids.extend(self._submit_chunk(chunk))
        return ids

    def _submit_chunk(self, tasks):
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                return self.request("POST", "/v1/tasks", {"tasks": tasks}, headers)["ids"]
            except (ConnectionFailed, StoreUnavailable):
                if attempt + 1 == SUBMIT_ATTEMPTS:
                    raise
            except PayloadTooLarge as exc:
                # The request as a whole is over the daemon's limits (not one task: that
                # message names `tasks[i]`): send it in two halves, each with its own key.
                if len(tasks) < 2 or exc.message.startswith("tasks["):
                    raise
                half = len(tasks) // 2
                return self._submit_chunk(tasks[:half]) + self._submit_chunk(tasks[half:])
            time.sleep(SUBMIT_BACKOFF_S[min(attempt, len(SUBMIT_BACKOFF_S) - 1)])

    def _encoding(self, function_id):
        kind = self._kinds.get(function_id)
        if kind is None:
            # Registered elsewhere (another client, the CLI): ask once.
            try:
                kind = self.get_function(function_id).get("kind")
            except FnxError:
                kind = None  # the submit reports an unknown function itself
            if kind is not None:
                self._kinds[function_id] = kind
        return "json" if kind in ("shell", "mpi") else "pickle"

    def run(self, function, /, *args, **kwargs):
        """Submit one call (pickled arguments; JSON for shell functions registered here);
        returns the task id. ``function`` is an id or a callable."""
        fid = self.function_id(function)
        return self.submit_tasks([make_task(fid, args, kwargs, self._encoding(fid))])[0]

    def run_with_files(self, function, files, /, *args, **kwargs):
        """Like ``run``, with input files: ``files`` maps a file name to bytes or to a local
        path. The task runs in its own directory on the node holding them, so the function
        opens them by name (pass the names as arguments). Files up to 1 MiB are uploaded with
        the task; larger ones are passed by their absolute path, which must be on a
        filesystem the nodes share."""
        fid = self.function_id(function)
        return self.submit_tasks([make_task(fid, args, kwargs, self._encoding(fid), files=files)])[0]

    def run_json(self, function, /, *args, **kwargs):
        """Like ``run`` with JSON arguments (checked against the signature by the daemon)."""
        fid = self.function_id(function)
        return self.submit_tasks([make_task(fid, args, kwargs, "json")])[0]

    def batch_run(self, calls):
        """Submit ``(function, args, kwargs)`` tuples; returns the task ids in order."""
        tasks = []
        for function, args, kwargs in calls:
            fid = self.function_id(function)
            tasks.append(make_task(fid, args, kwargs, self._encoding(fid)))
        return self.submit_tasks(tasks)

    # -- results -------------------------------------------------------------------------

    def get_task(self, task_id, wait=0):
        """The task record; ``wait`` (≤ 60 s) holds the answer until the task is terminal."""
        query = "?wait=%g" % wait if wait else ""
        return self.request("GET", "/v1/tasks/%d%s" % (task_id, query), wait=wait)

    def wait_task(self, task_id, timeout=None):
        """The terminal record of a task, long-polling in slices of at most 30 s; raises
        ``TimeoutError`` after ``timeout`` seconds (None: never)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE_S if deadline is None else deadline - time.monotonic()
            record = self.get_task(task_id, wait=int(max(0, min(POLL_SLICE_S, left))))
            if record.get("state") in TERMINAL:
                return record
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("task %s not finished after %gs (state %s)"
                                       % (task_id, timeout, record.get("state")))
                if left < 1:
                    time.sleep(min(left, 0.05))

    def get_result(self, task_id, timeout=None):
        """Wait for a task and return its value, or raise ``RemoteException`` (the function
        raised), ``TaskCancelled``, ``TaskFailed`` (other failures) or ``TimeoutError``."""
        return decode_record(self.wait_task(task_id, timeout))

    def tasks_status(self, task_ids):
        """Records of many tasks (``POST /v1/tasks/status``, chunked); an unknown id gives
        ``{"id": N, "state": "unknown"}``."""
        task_ids = [int(t) for t in task_ids]
        records = []
        for start in range(0, len(task_ids), MAX_BATCH):
            body = {"ids": task_ids[start:start + MAX_BATCH]}
            records.extend(self.request("POST", "/v1/tasks/status", body)["tasks"])
        return records

    def get_results(self, task_ids, timeout=None, return_exceptions=False):
        """Values of many tasks, in order, waiting until all are terminal.

        A failed task raises its exception unless ``return_exceptions`` puts it in the list.
        """
        task_ids = [int(t) for t in task_ids]
        deadline = None if timeout is None else time.monotonic() + timeout
        done = {}
        pending = list(dict.fromkeys(task_ids))
        while pending:
            omitted = False
            for record in self.tasks_status(pending):
                if record.get("omitted"):
                    omitted = True  # finished, but its result did not fit in this answer
                elif record.get("state") in TERMINAL or record.get("state") == "unknown":
                    done[record["id"]] = record
            pending = [t for t in pending if t not in done]
            if pending and not omitted:  # long-poll on the first one, then look at all again
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("%d of %d tasks not finished after %gs"
                                       % (len(pending), len(task_ids), timeout))
                try:
                    self.wait_task(pending[0], None if left is None else min(left, POLL_SLICE_S))
                except TimeoutError:
                    pass
        out = []
        for tid in task_ids:
            try:
                out.append(decode_record(done[tid]))
            except FnxError as exc:
                if not return_exceptions:
                    raise
                out.append(exc)
        return out

    def cancel(self, task_id):
        """Cancel a task; returns its state afterwards (``cancelled``, or the state it reached
        first; ``running`` if the kill is still under way after 5 s)."""
        return self.request("DELETE", "/v1/tasks/%d" % task_id, wait=5)["state"]

    def results_page(self, since=0, wait=0, limit=1000):
        """One ``GET /v1/results`` page: ``(records, cursor)``. Asking with ``since=C``
        acknowledges the results up to ``C`` as fetched."""
        path = "/v1/results?since=%d&wait=%d&limit=%d" % (since, wait, limit)
        doc = self.request("GET", path, wait=wait)
        return doc["results"], doc["cursor"]

    def results_end(self):
        """The cursor of your newest result (``GET /v1/results?since=end``); acknowledges
        nothing. Stream from it to see only results that arrive from now on."""
        return self.request("GET", "/v1/results?since=end")["cursor"]

    def results(self, since=0, wait=0, limit=1000):
        """Iterate over your finished task records in completion order, from cursor ``since``,
        until no new record arrives within ``wait`` seconds. Each record has its ``seq``."""
        while True:
            records, since = self.results_page(since, wait, limit)
            if not records:
                return
            yield from records

    # -- the daemon ------------------------------------------------------------------------

    def status(self):
        """The ``GET /v1/status`` document."""
        return self.request("GET", "/v1/status")

    def whoami(self):
        """``{"user": ..., "admin": ...}`` for this client's token (over a socket without one:
        for the user the daemon sees at the other end)."""
        return self.request("GET", "/v1/whoami")

    def health(self):
        """The ``GET /v1/health`` document."""
        return self.request("GET", "/v1/health")
