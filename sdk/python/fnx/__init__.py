"""fnx Python SDK: run Python functions and shell commands as tasks of an fnx daemon.

>>> import fnx
>>> client = fnx.Client()                 # FNX_URL/FNX_TOKEN, ~/.fnx/client.json, or a socket
>>> tid = client.run(pow, 2, 10)          # doctest: +SKIP
>>> with fnx.Executor() as ex:            # a concurrent.futures.Executor
...     squares = list(ex.map(square, range(100)))   # doctest: +SKIP

The daemon is found at an ``http(s)://`` URL with a token, or at
``unix:///absolute/path/to/fnx.sock`` without one (the daemon knows the caller by the
socket's peer credentials). ``Client()`` takes the URL and token from ``FNX_URL`` and
``FNX_TOKEN``, else from ``$FNX_HOME/client.json`` (``~/.fnx/client.json``), else uses the
first socket among ``$FNX_HOME/fnx.sock`` and ``/run/fnx/fnx.sock``; ``Executor()`` does the
same through ``Client()``.

Modules: ``client`` (``Client``, the HTTP API of ``docs/api.md``), ``executor``
(``Executor``), ``errors`` (the exceptions). Only the standard library is used.

The worker runtime (``fnx/worker.py``) is a self-contained script that the node manager
embeds and runs; it is deliberately not imported here.
"""

from .errors import (AuthError, BadRequest, ConfigError, ConnectionFailed, FnxError, Forbidden,
                     HTTPError, NotFound, PayloadTooLarge, QueueFull, RemoteException,
                     ResultDecodeError, StoreUnavailable, TaskCancelled, TaskFailed)

__version__ = "0.1.0"

# Client and Executor are imported on first use: http.client (with ssl) is most of the cost.
_LAZY = {"Client": "client", "Executor": "executor", "FnxFuture": "executor"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module 'fnx' has no attribute %r" % name)
    import importlib

    value = getattr(importlib.import_module("." + module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "Client", "Executor", "FnxFuture", "FnxError", "ConfigError", "ConnectionFailed",
    "HTTPError", "BadRequest", "AuthError", "Forbidden", "NotFound", "PayloadTooLarge",
    "QueueFull", "StoreUnavailable", "ResultDecodeError", "TaskFailed", "RemoteException",
    "TaskCancelled", "__version__",
]
