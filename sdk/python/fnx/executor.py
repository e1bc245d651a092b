"""``fnx.Executor``: a ``concurrent.futures.Executor`` whose calls run as fnx tasks.

Two background threads serve an executor:

* the **submitter** takes submitted calls from a queue and sends them in batches (up to
  ``batch_size`` calls, or what arrived within ``batch_interval`` seconds of the first) with
  ``POST /v1/tasks`` (each batch with its own ``Idempotency-Key``, retried by the client);
* the **results** thread first pages through ``GET /v1/results`` without waiting, to reach
  the end of the caller's result stream, then long-polls it and resolves futures by task id
  (results of other tasks are ignored). Results seen while a batch is in flight are kept by
  id and matched once the batch's ids are known. Every ``RECONCILE_S`` seconds, futures
  submitted at least that long ago are checked with ``POST /v1/tasks/status`` (a rotating
  window of at most 10,000), so a result the stream did not deliver cannot leave a future
  hanging.

Lock order: a future's own lock may be held while taking the executor's condition (done
callbacks may submit), never the reverse; futures are resolved outside the condition.
"""

import collections
import concurrent.futures
import itertools
import os
import threading
import time

from .client import MAX_BATCH, MAX_BATCH_BYTES, Client, make_task, task_size
from .errors import (TERMINAL, AuthError, BadRequest, FnxError, Forbidden, HTTPError, NotFound,
                     decode_record)

_Future = concurrent.futures.Future


class FnxFuture(_Future):
    """The future of one fnx task; ``task_id`` is None until the task is submitted.

    It stays pending (``running()`` is False) until its result arrives, as the executor does
    not learn when the remote task starts. ``cancel()`` drops a call not yet sent, or cancels
    the submitted task (``DELETE /v1/tasks/{id}``): it returns True if the task ended
    cancelled (or its kill is under way), False if it finished first.
    """

    def __init__(self, executor, task):
        super().__init__()
        self.task_id = None
        self._fnx_executor = executor
        self._fnx_task = task  # the task dict, until sent
        self._fnx_lock = threading.RLock()  # held by every state change made by fnx
        self._fnx_sent = False  # taken by the submitter (guarded by the executor)
        self._fnx_dropped = False  # cancelled before it was taken
        self._fnx_sent_at = 0.0

    def cancel(self):
        return self._fnx_executor._cancel(self)

    def _fnx_cancel_local(self):
        """Make the future cancelled (notifying waiters) unless it is done; returns
        ``cancelled()``."""
        with self._fnx_lock:
            if not self.done():
                _Future.cancel(self)  # PENDING -> CANCELLED
                self.set_running_or_notify_cancel()  # -> CANCELLED_AND_NOTIFIED, wakes waiters
            return self.cancelled()

    def _fnx_resolve(self, value=None, exc=None):
        with self._fnx_lock:
            if self.done():
                return
            self.set_running_or_notify_cancel()  # PENDING -> RUNNING (never cancelled here)
            if exc is not None:
                self.set_exception(exc)
            else:
                self.set_result(value)

    def _fnx_resolve_record(self, record):
        """Resolve from a terminal task record (``state`` unknown: the task is gone)."""
        if record.get("state") == "cancelled":
            self._fnx_cancel_local()
            return
        try:
            value = decode_record(record)
        except FnxError as exc:
            self._fnx_resolve(exc=exc)
        else:
            self._fnx_resolve(value)


class Executor(concurrent.futures.Executor):
    """Run calls as fnx tasks: ``submit(fn, *args, **kwargs)`` returns an ``FnxFuture``.

    ``fn`` is a function (registered once through the client and cached by the function
    object) or a function id. Arguments and results are pickled, so the workers should run
    the client's Python major.minor version. ``client`` defaults to ``Client()``; ``pool``
    names the pool the tasks run in (default: the daemon's first pool).

    ``map`` and the context-manager protocol work as for any ``concurrent.futures.Executor``.
    """

    LONG_POLL_S = 5  # wait of one GET /v1/results
    RECONCILE_S = 5.0  # futures unresolved this long are checked by status
    ERROR_LIMIT_S = 60.0  # the results stream failing this long breaks the executor
    MAX_ORPHANS = 100_000  # ids remembered while a batch is in flight

    def __init__(self, client=None, pool=None, batch_size=1000, batch_interval=0.005):
        self.client = client if client is not None else Client()
        self.pool = pool
        self.batch_size = max(1, min(int(batch_size), MAX_BATCH))
        self.batch_interval = batch_interval
        self._cond = threading.Condition()
        self._pending = collections.deque()  # futures not yet taken by the submitter
        self._in_flight = []  # the batch being submitted
        self._by_id = {}  # task id -> submitted, unresolved future (in submit order)
        self._orphans = set()  # ids of results that arrived while a batch was in flight
        self._shutdown = False
        self._submitter_done = False
        self._broken = None
        self._recheck_at = 0
        self._pid = os.getpid()
        # Where the results stream ends now: taken before anything is submitted, so that no
        # result of this executor's tasks can fall before it (nothing is acknowledged).
        self._start_cursor = self.client.results_end()
        self._submitter = threading.Thread(target=self._guard, args=(self._submit_loop,),
                                           name="fnx-submitter", daemon=True)
        self._results = threading.Thread(target=self._guard, args=(self._results_loop,),
                                         name="fnx-results", daemon=True)
        self._submitter.start()
        self._results.start()

    # -- the caller's side ---------------------------------------------------------------

    def submit(self, fn, /, *args, **kwargs):
        """Schedule ``fn(*args, **kwargs)`` as an fnx task; returns its ``FnxFuture``."""
        self._check_open()
        fid = self.client.function_id(fn)
        future = FnxFuture(self, make_task(fid, args, kwargs, self.client._encoding(fid),
                                           pool=self.pool))
        with self._cond:
            self._check_open()
            self._pending.append(future)
            if len(self._pending) in (1, self.batch_size):
                self._cond.notify_all()
        return future

    def _check_open(self):
        if os.getpid() != self._pid:
            raise RuntimeError("an fnx Executor cannot be used in a forked child; create a new one")
        if self._broken is not None:
            raise concurrent.futures.BrokenExecutor(
                "the fnx executor is broken: %s" % self._broken) from self._broken
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Send what is queued and stop accepting calls. ``wait``: block until every future
        is done. ``cancel_futures``: cancel every unfinished future (queued ones locally,
        submitted ones on the daemon). The background threads end once nothing is left."""
        with self._cond:
            self._shutdown = True
            unfinished = [*self._pending, *self._in_flight, *self._by_id.values()]
            self._cond.notify_all()
        if cancel_futures:
            # Submitted tasks are cancelled on the daemon in bulk (their records reach this
            # executor through the results stream); the others locally.
            submitted = [f.task_id for f in unfinished if f.task_id is not None]
            for future in unfinished:
                if future.task_id is None:
                    future.cancel()
            for start in range(0, len(submitted), MAX_BATCH):
                try:
                    self.client.request("POST", "/v1/tasks/cancel",
                                        {"ids": submitted[start:start + MAX_BATCH]})
                except FnxError:
                    for future in unfinished:
                        if future.task_id in submitted[start:start + MAX_BATCH]:
                            future.cancel()
        if wait and threading.current_thread() in (self._submitter, self._results):
            wait = False  # called from a done-callback: waiting here would wait for ourselves
        if wait:
            concurrent.futures.wait(unfinished)
            self._submitter.join()
            # The results thread may sit in a long poll with nothing left to wait for; it
            # returns on its own after that poll (at most LONG_POLL_S).
            with self._cond:
                outstanding = bool(self._by_id)
            if outstanding:
                self._results.join()

    def _cancel(self, future):
        with self._cond:
            if future.done():
                return future.cancelled()
            if not future._fnx_sent:
                future._fnx_dropped = True  # the submitter will skip it
                sent = False
            else:
                # Its batch is in flight: wait for the answer (ids, or the batch failed). Never
                # wait on the submitter's own thread, which resolves the batch (a done-callback
                # cancelling a sibling).
                on_submitter = threading.current_thread() is self._submitter
                while (future in self._in_flight and future.task_id is None
                       and not future.done() and not on_submitter):
                    self._cond.wait()
                sent = future.task_id is not None and not future.done()
        if not sent:
            return future._fnx_cancel_local()
        tid = future.task_id
        try:
            record = self.client.request("DELETE", "/v1/tasks/%d" % tid, wait=5)
        except FnxError:
            return False
        with self._cond:
            self._by_id.pop(tid, None)
        if record.get("state") in ("success", "failed"):
            future._fnx_resolve_record(record)
        else:  # cancelled, or the kill is under way (202)
            future._fnx_cancel_local()
        return future.cancelled()

    # -- background threads --------------------------------------------------------------

    def _guard(self, loop):
        """Run a background loop; an unexpected error breaks the executor instead of
        leaving futures hanging."""
        try:
            loop()
        except BaseException as exc:  # noqa: B902 - a bug here must not hang futures
            self._break(exc)
        finally:
            if loop == self._submit_loop:
                with self._cond:
                    self._submitter_done = True
                    self._cond.notify_all()

    def _break(self, exc):
        """Fail every unfinished future with ``exc``; later submits raise BrokenExecutor."""
        with self._cond:
            if self._broken is None:
                self._broken = exc
            futures = [*self._pending, *self._in_flight, *self._by_id.values()]
            self._pending.clear()
            self._by_id.clear()
            self._cond.notify_all()
        for future in futures:
            future._fnx_resolve(exc=exc)

    def _take_batch(self):
        """The next batch to send, or None when the submitter should end."""
        with self._cond:
            while not self._pending and not self._shutdown and self._broken is None:
                self._cond.wait()
            if self._broken is not None or not self._pending:
                return None
            deadline = time.monotonic() + self.batch_interval
            while len(self._pending) < self.batch_size and not self._shutdown:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, size = [], 0
            while self._pending and len(batch) < self.batch_size:
                n = task_size(self._pending[0]._fnx_task)
                if batch and size + n > MAX_BATCH_BYTES:
                    break  # a request body stays within the daemon's limit
                future = self._pending.popleft()
                if not future._fnx_dropped and not future.done():
                    future._fnx_sent = True
                    batch.append(future)
                    size += n
            self._in_flight = batch
            self._cond.notify_all()  # the results thread listens while a batch is in flight
            return batch

    def _submit_loop(self):
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._send(batch)

    def _send(self, batch):
        try:
            while True:
                try:
                    ids = self.client.submit_tasks([f._fnx_task for f in batch])
                    break
                except HTTPError as exc:
                    # The daemon names the one task it refuses (`tasks[3].args: ...`): that
                    # future fails alone and the others are sent again.
                    bad = _refused_task(exc, len(batch))
                    if bad is None:
                        raise
                    batch[bad]._fnx_resolve(exc=exc)
                    del batch[bad]
                    if not batch:
                        ids = []
                        break
            if len(ids) != len(batch):
                raise FnxError("the daemon answered %d ids for %d tasks" % (len(ids), len(batch)))
        except Exception as exc:
            with self._cond:
                self._in_flight = []
                self._orphans.clear()
                self._cond.notify_all()
            for future in batch:
                future._fnx_resolve(exc=exc)
            return
        now = time.monotonic()
        with self._cond:
            if self._broken is None:
                for future, tid in zip(batch, ids):
                    future.task_id, future._fnx_task, future._fnx_sent_at = tid, None, now
                    self._by_id[tid] = future
            early = [tid for tid in ids if tid in self._orphans] if self._orphans else []
            self._orphans.clear()
            self._in_flight = []
            self._cond.notify_all()
        if early:
            self._check_status(early)

    def _results_loop(self):
        # The stream starts where it ended when this executor was made (`results_end`), so
        # older results of the user are neither read nor marked fetched.
        cursor = self._start_cursor
        failing_since, delay = None, 0.1
        last_reconcile = time.monotonic()
        while True:
            with self._cond:
                while not (self._by_id or self._in_flight or self._pending):
                    if self._broken is not None or (self._submitter_done and self._shutdown):
                        return
                    self._cond.wait()
                if self._broken is not None:
                    return
            try:
                records, cursor = self.client.results_page(cursor, self.LONG_POLL_S, MAX_BATCH)
                failing_since, delay = None, 0.1
            except Exception as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if _fatal(exc) or now - failing_since > self.ERROR_LIMIT_S:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._take(records)
            if time.monotonic() - last_reconcile >= self.RECONCILE_S:
                last_reconcile = time.monotonic()
                self._reconcile()

    def _take(self, records):
        found = []
        with self._cond:
            for record in records:
                tid = record.get("id")
                future = self._by_id.pop(tid, None)
                if future is not None:
                    found.append((future, record))
                elif self._in_flight and len(self._orphans) < self.MAX_ORPHANS:
                    self._orphans.add(tid)
        for future, record in found:
            future._fnx_resolve_record(record)

    def _reconcile(self):
        """Check by status a window of futures submitted at least RECONCILE_S ago."""
        old = time.monotonic() - self.RECONCILE_S
        with self._cond:
            if self._recheck_at >= len(self._by_id):
                self._recheck_at = 0
            window = itertools.islice(self._by_id.items(), self._recheck_at,
                                      self._recheck_at + MAX_BATCH)
            ids = [tid for tid, f in window if f._fnx_sent_at <= old]
            self._recheck_at += MAX_BATCH
        if ids:
            self._check_status(ids)

    def _check_status(self, ids):
        """Resolve the futures of ``ids`` whose tasks are terminal (or gone)."""
        try:
            records = self.client.tasks_status(ids)
        except Exception as exc:
            if _fatal(exc):
                raise
            return  # the next round tries again
        done = [r for r in records if r.get("state") in TERMINAL or r.get("state") == "unknown"]
        self._take(done)


def _fatal(exc):
    """Errors that retrying cannot fix."""
    return isinstance(exc, (AuthError, Forbidden, NotFound, BadRequest)) or \
        not isinstance(exc, FnxError)


def _refused_task(exc, n):
    """The index of the task a 400 or 413 names (``tasks[3]...``), if it is one of ``n``."""
    if exc.status not in (400, 413) or not exc.message.startswith("tasks["):
        return None
    try:
        i = int(exc.message[len("tasks["):exc.message.index("]")])
    except ValueError:
        return None
    return i if 0 <= i < n else None
