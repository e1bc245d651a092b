"""Exceptions of the fnx SDK, and turning task records into values or exceptions."""

import base64
import builtins
import pickle
import sys

TERMINAL = ("success", "failed", "cancelled")


class FnxError(Exception):
    """Base class of every error raised by the fnx SDK."""


class ConfigError(FnxError):
    """No URL or token was found, ``client.json`` cannot be read, or the URL is not usable
    (not http/https/unix, or a ``unix://`` URL without an absolute socket path)."""


class ConnectionFailed(FnxError, ConnectionError):
    """The daemon could not be reached or the connection broke (twice)."""


class HTTPError(FnxError):
    """The daemon answered with an error status; ``code`` and ``message`` come from its body."""

    def __init__(self, status, code, message, method="", path=""):
        self.status, self.code, self.message = status, code, message
        self.method, self.path = method, path
        where = " (%s %s)" % (method, path) if method else ""
        super().__init__("HTTP %d %s: %s%s" % (status, code, message, where))

    def __reduce__(self):
        return (type(self), (self.status, self.code, self.message, self.method, self.path))


class BadRequest(HTTPError):
    """400 ``bad_request``: a malformed request or arguments that do not fit the function."""


class AuthError(HTTPError):
    """401 ``unauthorized``: no token or an unknown token."""


class Forbidden(HTTPError):
    """403 ``forbidden``: the function or task belongs to another user."""


class NotFound(HTTPError):
    """404 ``not_found``: no such function or task."""


class PayloadTooLarge(HTTPError):
    """413 ``payload_too_large``: a body, batch or argument over a limit."""


class QueueFull(HTTPError):
    """429 ``queue_limit``: too many unfinished tasks."""


class StoreUnavailable(HTTPError):
    """503 ``store_unavailable``: nothing was accepted; retry later."""


_BY_STATUS = {400: BadRequest, 401: AuthError, 403: Forbidden, 404: NotFound,
              413: PayloadTooLarge, 429: QueueFull, 503: StoreUnavailable}


def http_error(status, code, message, method="", path=""):
    """The ``HTTPError`` subclass instance for an error answer."""
    return _BY_STATUS.get(status, HTTPError)(status, code, message, method, path)


class ResultDecodeError(FnxError):
    """A task succeeded but its result cannot be decoded here."""


class TaskFailed(FnxError):
    """A task ended in state ``failed`` (or ``cancelled``, see ``TaskCancelled``).

    ``kind`` is the daemon's error kind (``exception``, ``walltime``, ``worker_lost``, ...),
    ``type_name`` the remote exception type, ``remote_traceback`` its traceback text.
    """

    def __init__(self, task_id, kind, type_name="", message="", remote_traceback=""):
        self.task_id, self.kind, self.type_name = task_id, kind, type_name
        self.message, self.remote_traceback = message, remote_traceback
        super().__init__(self._text())

    def _text(self):
        what = "%s: %s" % (self.type_name, self.message) if self.type_name else self.message
        return "task %s failed (%s): %s" % (self.task_id, self.kind, what)

    def __str__(self):
        return self._text()

    def __reduce__(self):
        return (_rebuild_task_error, (self.task_id, self._record_error()))

    def _record_error(self):
        return {"kind": self.kind, "type": self.type_name, "message": self.message,
                "traceback": self.remote_traceback}


class RemoteException(TaskFailed):
    """The task's function raised; ``str()`` shows the remote type, message and traceback.

    If the remote type is a built-in exception (``ZeroDivisionError``, ``KeyError``, ...) the
    raised object is also an instance of it, so ``except ZeroDivisionError`` works.
    """

    def __str__(self):
        text = "%s: %s" % (self.type_name, self.message)
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip("\n")
        return text + "\n(task %s)" % self.task_id


class TaskCancelled(TaskFailed):
    """The task was cancelled before it finished."""

    def _text(self):
        return "task %s was cancelled" % self.task_id + (": " + self.message if self.message
                                                          else "")


class _RemoteTraceback(Exception):
    """Holds the remote traceback text; set as ``__cause__`` so tracebacks print it."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text

    def __str__(self):
        return "\n" + self.text.rstrip("\n")


_MIXINS = {}


def _remote_class(type_name):
    """``RemoteException``, or a subclass that is also the built-in ``type_name``."""
    builtin = getattr(builtins, type_name, None) if type_name.isidentifier() else None
    if not (isinstance(builtin, type) and issubclass(builtin, Exception)) or \
            issubclass(builtin, (StopIteration, StopAsyncIteration, FnxError)):
        return RemoteException
    cls = _MIXINS.get(type_name)
    if cls is None:
        try:  # shown as fnx.RemoteZeroDivisionError in tracebacks
            cls = type("Remote" + type_name, (RemoteException, builtin),
                       {"__module__": "fnx", "__reduce__": RemoteException.__reduce__})
        except TypeError:  # incompatible layouts
            cls = RemoteException
        _MIXINS[type_name] = cls
    return cls


def task_error(task_id, state, error):
    """The exception for a task that ended ``failed``/``cancelled`` with ``error`` (a dict)."""
    error = error or {}
    kind = error.get("kind") or ("cancelled" if state == "cancelled" else "unknown")
    args = (task_id, kind, error.get("type") or "", error.get("message") or "",
            error.get("traceback") or "")
    if state == "cancelled" or kind == "cancelled":
        return TaskCancelled(*args)
    if kind != "exception":
        return TaskFailed(*args)
    cls = _remote_class(args[2])
    try:
        exc = cls(*args)
    except Exception:
        exc = RemoteException(*args)
    if args[4]:
        exc.__cause__ = _RemoteTraceback(args[4])
    return exc


def _rebuild_task_error(task_id, error):
    return task_error(task_id, "cancelled" if error.get("kind") == "cancelled" else "failed",
                      error)


def decode_record(record):
    """The value of a terminal task record; raises ``TaskFailed`` for failed/cancelled ones."""
    tid, state = record.get("id"), record.get("state")
    if state == "success":
        result = record.get("result") or {}
        if result.get("encoding") == "pickle":
            try:
                return pickle.loads(base64.b64decode(result["data_b64"]))
            except Exception as exc:
                raise ResultDecodeError(
                    "the result of task %s was pickled by a worker whose Python may differ from "
                    "this client's (Python %s, %s) and cannot be unpickled here: %s: %s"
                    % (tid, sys.version.split()[0], sys.executable, type(exc).__name__, exc)
                ) from exc
        return result.get("value")
    if state in ("failed", "cancelled"):
        raise task_error(tid, state, record.get("error"))
    if state == "unknown":
        raise NotFound(404, "not_found", "task %s does not exist or is not yours" % tid)
    raise FnxError("task %s is not finished (state %s)" % (tid, state))
