"""The native API on any ``concurrent.futures.Executor`` (the ``executor=`` argument).

An exchange given an executor forks nothing: it submits each call to the
executor and watches a :class:`TaskHandle` where it would watch a channel. A
handle behaves like the parent's end of a channel whose child sends its
messages and hangs up when the future completes, so the exchange's limit, its
queue of waiting work, ``Queue`` and ``Map`` run unchanged on it::

    exchange.start(fn, *a) --> waiting --> Tasks.submit --> executor.submit(...)
    exchange.store()       <-- Tasks.ready(timeout) <-- completed <-- done callbacks
                               (the caller's thread)     (SimpleQueue)  (any thread)

What is submitted for ``start(fn, *args)``:

* ``MakeParallel(f)`` or ``MakeReusable(f)``: ``f`` itself, unwrapped; its return
  value is the one message (the executor's workers are reused anyway, so
  ``reuse`` changes nothing here);
* any other callable ``fn(channel, *args)``: run in the executor with an
  :class:`Outbox` as its channel. What it sends comes back, in order, when it
  returns (not while it runs: ``continuous`` results arrive together). Its
  ``receive()`` raises :class:`~forkexec.errors.LocalOnlyError`: no parent
  talks to a task on an executor.

A worker that dies under a task (a Dask ``KilledWorker``, a broken process
pool) is reported as :class:`~forkexec.WorkerDiedError` through
``store_died``, like a local child that died; the executor's exception is its
``__cause__``.
"""

import collections
import queue
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool

from ._death_policy import LIKELY_CAUSES
from .errors import ChannelBroken, LocalOnlyError, RemoteFailure, WorkerDiedError


class Outbox:
    """The channel of a pprocess-style callable on an executor: it keeps what is sent."""

    pid = 0

    def __init__(self):
        self.sent = []

    def send(self, obj):
        self.sent.append(obj)

    def send_many(self, objs):
        self.sent.extend(objs)

    def receive(self, timeout=None):
        raise LocalOnlyError(
            "this call runs on an executor, not in a child forked by the exchange: it can "
            "send results but nothing can be received from the parent (a callable that "
            "talks both ways needs an exchange without executor=)")

    def close(self):
        pass


def run_with_outbox(fn, args, kwargs):
    """In the executor: run ``fn(outbox, *args, **kwargs)``. Returns (what it sent,
    its failure or None), so that results sent before an exception still arrive."""
    outbox = Outbox()
    try:
        fn(outbox, *args, **kwargs)
    except Exception as exc:
        return outbox.sent, RemoteFailure.capture(exc)
    return outbox.sent, None


class _Raise:
    """A message that raises ``error`` when received."""

    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error


class TaskHandle:
    """One submitted call, watched by an exchange in place of a channel.

    It is ``done`` once :meth:`Tasks.ready`, in the caller's thread, has taken it
    from the completed calls (never earlier, so its state cannot change between
    two checks of the exchange's loop); then its messages are the call's results.
    """

    pid = 0               # no process of ours: nothing to reap or signal
    _reapable = False

    def __init__(self, future, name, sends):
        self.future = future
        self.name = name
        self._sends = sends          # run through run_with_outbox: the result is (sent, failure)
        self.done = False
        self._messages = None        # a deque once done and read
        self._lost = None            # the WorkerDiedError of a call whose worker died
        self.closed = False

    def __repr__(self):
        state = "done" if self.done else ("closed" if self.closed else "running")
        return "<TaskHandle %s %s>" % (self.name, state)

    def fileno(self):
        return -1                    # nothing to poll: completion comes through Tasks.ready

    def report_buffered_to(self, watcher):
        pass

    def read_nowait(self, limit=None):
        return 0

    @property
    def at_eof(self):
        return self.done

    def has_message(self):
        return bool(self._read())

    def receive(self, timeout=None):
        messages = self._read()
        if not messages:
            raise ChannelBroken("%s has no message left to receive" % self.name)
        message = messages.popleft()
        if isinstance(message, _Raise):
            raise message.error
        if isinstance(message, RemoteFailure):
            raise message.exception()
        return message

    def close(self):
        """Stop watching: a call that has not started yet is cancelled."""
        self.closed = True
        self.future.cancel()

    def ended_error(self):
        """Why the call delivered nothing: its worker died, or it sent no result."""
        if self._lost is not None:
            return self._lost
        return ChannelBroken("%s ended without sending a result" % self.name)

    def _read(self):
        if self._messages is None and self.done:
            self._messages = collections.deque()
            future = self.future
            if future.cancelled():
                self._messages.append(_Raise(CancelledError("%s was cancelled" % self.name)))
                return self._messages
            error = future.exception()
            if error is None:
                self._messages.extend(self._results(future.result()))
            else:
                self._lost = worker_died(error, self.name)
                if self._lost is None:
                    self._messages.append(_Raise(error))
        return self._messages

    def _results(self, result):
        if not self._sends:
            return [result]
        sent, failure = result
        return sent + [failure] if failure is not None else sent


def worker_died(error, name):
    """The WorkerDiedError for an executor's ``error`` that says a worker died under the
    call ``name``, or None for any other error (the call's own, raised as it is)."""
    if isinstance(error, WorkerDiedError):
        return error                 # our own executor: it names the pid and the signal
    kind = type(error)
    dask_gave_up = kind.__name__ == "KilledWorker" and kind.__module__.startswith("distributed")
    if not (dask_gave_up or isinstance(error, BrokenProcessPool)):
        return None
    died = WorkerDiedError("The worker process running %s died: %s.%s: %s %s"
                           % (name, kind.__module__, kind.__qualname__, error, LIKELY_CAUSES))
    died.__cause__ = error
    return died


class Tasks:
    """The calls an exchange submitted to ``executor``, and the order they complete in."""

    def __init__(self, executor):
        self.executor = check_executor(executor)
        # Handles whose future is done, put by done callbacks (any thread), taken by ready().
        self._completed = queue.SimpleQueue()
        self._done = []              # handles taken from _completed that may hold messages

    def submit_returning(self, fn, args, kwargs):
        """Submit ``fn(*args, **kwargs)``: its return value is the handle's message."""
        return self._watch(self.executor.submit(fn, *args, **kwargs), fn, False)

    def submit_sending(self, fn, args, kwargs):
        """Submit ``fn(outbox, *args, **kwargs)``: what it sends are the handle's messages."""
        return self._watch(self.executor.submit(run_with_outbox, fn, args, kwargs), fn, True)

    def _watch(self, future, fn, sends):
        handle = TaskHandle(future, _name(fn), sends)
        future.add_done_callback(lambda _future: self._completed.put(handle))
        return handle

    def ready(self, watched, timeout):
        """The handles in ``watched`` whose call completed, waiting up to ``timeout``
        seconds (None: no limit) for one; never waits when nothing is watched."""
        self._done = [handle for handle in self._done if handle in watched]
        if not self._done and watched and timeout != 0:
            try:
                self._take(self._completed.get(timeout=None if timeout is None
                                               else max(0.0, timeout)))
            except queue.Empty:
                pass
        while True:
            try:
                self._take(self._completed.get_nowait())
            except queue.Empty:
                break
        return [handle for handle in self._done if handle in watched]

    def _take(self, handle):
        handle.done = True
        self._done.append(handle)


def check_executor(executor):
    """``executor``, or a TypeError if it cannot be one."""
    if not callable(getattr(executor, "submit", None)):
        raise TypeError("executor must be a concurrent.futures.Executor (an object with "
                        "a submit method), not %r" % (executor,))
    return executor


def _name(fn):
    name = getattr(fn, "__qualname__", None)
    return "%s()" % name if name else repr(fn)


def refuse(what):
    """The error for ``what`` (a local-only operation) asked of an exchange on an executor."""
    return LocalOnlyError(
        "%s needs a process forked by this one, so an exchange on an executor (executor=) "
        "cannot do it; start() or manage() a function instead, or use an exchange "
        "without executor=" % what)
