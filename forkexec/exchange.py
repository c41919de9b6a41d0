"""Exchange: the readiness loop over many channels, and the pprocess-style API on it.

:class:`Poller` is the one place that waits on descriptors (``selectors``:
epoll on Linux, so the cost of a wait follows the ready channels, not all of
them); the executor's loop uses it too. :class:`Exchange` watches channels to
child processes and hands each arriving message to ``store_data``; it can
start processes itself under a hard ``limit`` on live children, ``reuse``
them for queued work, or keep them ``continuous``. :class:`Queue` yields
results as they arrive, :class:`Map` in submission order; :func:`pmap`,
:class:`MakeParallel` and :class:`MakeReusable` wrap plain functions. Given
``executor=`` (any ``concurrent.futures.Executor``), an exchange submits its calls
to that executor instead of forking (see ``_foreign``).
"""

import collections
import os
import selectors
import time

from . import _foreign
from . import channel as _channel
from ._child_deadlines import ChildDeadlines
from ._child_judge import ChildJudge
from .errors import ChannelBroken, LocalOnlyError, check_timeout
from .progress import make_bar, progress_file

#: While finished children are still being reaped, wait at most this long per round.
REAP_POLL = 0.005


class Poller:
    """A thin wrapper over the best selector of the platform."""

    READ = selectors.EVENT_READ
    WRITE = selectors.EVENT_WRITE

    def __init__(self):
        self._selector = selectors.DefaultSelector()

    def register(self, fileobj, events, data=None):
        self._selector.register(fileobj, events, data)

    def modify(self, fileobj, events, data=None):
        self._selector.modify(fileobj, events, data)

    def unregister(self, fileobj):
        try:
            self._selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def wait(self, timeout=None):
        """[(data, events)] of the ready registrations; ``timeout`` in seconds."""
        if timeout is not None and timeout < 0:
            timeout = 0
        return [(key.data, events) for key, events in self._selector.select(timeout)]

    def close(self):
        self._selector.close()


class Exchange(ChildJudge):
    """Watch channels to child processes, storing what arrives.

    ``limit`` is a hard bound on live child processes started through this
    exchange (``start``, ``create``, ``add_wait``); ``reuse`` sends queued work to
    a process that has just delivered a result (its callable must loop, see
    :class:`MakeReusable`); ``continuous`` lets each child send any number of
    messages until it exits. ``ready`` and ``store`` take timeouts in seconds.

    ``task_timeout``: a process started by :meth:`start` (or given new work by
    ``reuse``) that runs longer than this many seconds is killed, and reported through
    :meth:`store_died` with :class:`~forkexec.TaskTimeout` (a ``TimeoutError``).
    ``progress``: iterating a :class:`Queue` or :class:`Map` moves a progress bar (the
    values of ``ForkExchangeExecutor.map``'s ``progress=``, see :mod:`forkexec.progress`).

    ``executor`` (any ``concurrent.futures.Executor``) runs the calls instead of
    forked children; ``limit`` then bounds the calls submitted and not finished.
    A ``MakeParallel`` function is submitted unwrapped; another callable gets a
    channel that can only send. Channels, ``create()``, ``receive()`` in a call and
    ``task_timeout`` (there is no process of ours to kill) raise
    :class:`~forkexec.errors.LocalOnlyError` there.
    """

    def __init__(self, channels=None, limit=None, reuse=0, continuous=0, autoclose=1, *,
                 task_timeout=None, progress=None, executor=None):
        if reuse and continuous:
            raise ValueError("reuse and continuous cannot be combined: a continuous child "
                             "sends until it exits, so it can never be given new work")
        if limit is not None and limit < 1:
            raise ValueError("limit must be None or at least 1, not %r" % (limit,))
        self.limit = limit
        self.task_timeout = check_timeout(task_timeout, "task_timeout")
        if executor is not None and self.task_timeout is not None:
            raise LocalOnlyError(
                "task_timeout kills a forked child that runs too long; with executor= there "
                "is no process of ours to kill (use the executor's own limits)")
        self._progress = progress_file(progress)
        self._bar = None
        self._started = 0          # work started or queued by start() (a Queue bar's total)
        self._deadlines = None if self.task_timeout is None else \
            ChildDeadlines(self.task_timeout)
        self.reuse = reuse
        self.continuous = continuous
        self.autoclose = autoclose
        self._tasks = None if executor is None else _foreign.Tasks(executor)
        self._poller = Poller()
        self._channels = {}        # channel -> messages delivered (insertion-ordered)
        self._failed = set()       # channels whose child's failure was already raised
        self._waiting = collections.deque()   # queued (callable, args, kwargs, tag)
        self._tags = {}            # channel -> tag of the work it is doing (Map's index)
        self._init_judging()
        # Channels that may hold a message or EOF already read into memory: they
        # report themselves here, so ready() need not scan every channel.
        self._buffered = set()
        for ch in channels or ():
            self.add(ch)

    # -- channels --------------------------------------------------------------
    def add(self, channel):
        """Watch ``channel``."""
        if self._tasks is None:
            self._poller.register(channel.fileno(), Poller.READ, channel)
        elif not isinstance(channel, _foreign.TaskHandle):
            raise _foreign.refuse("watching %r" % (channel,))
        self._channels[channel] = 0
        channel.report_buffered_to(self._buffered)

    def remove(self, channel):
        """Stop watching ``channel``; with autoclose, close it and reap its process.

        Never blocks on a child that closed its end but has not exited yet: it is
        reaped later.
        """
        if self._channels.pop(channel, None) is None and channel.closed:
            return
        self._poller.unregister(channel.fileno())
        channel.report_buffered_to(None)
        self._buffered.discard(channel)
        self._tags.pop(channel, None)
        self._failed.discard(channel)
        if self._deadlines is not None:
            self._deadlines.forget(channel)
        if self.autoclose:
            channel.close()
            if channel.pid > 0 and channel.wait(os.WNOHANG) is None and channel._reapable:
                self._unreaped[channel.pid] = channel

    def active(self):
        """The channels being watched, as a list."""
        return list(self._channels)

    def ready(self, timeout=None):
        """Channels holding a message, waiting up to ``timeout`` seconds for one.

        ``receive()`` on a returned channel does not block. A channel whose child
        has ended is removed instead of returned (a child that failed is reported
        through :meth:`store_died`); then the call returns early, maybe empty.
        Never waits for a child to exit: one that has not exited yet is reaped
        (and judged) by a later call.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._unreaped:
            self._reap()
        while self._channels:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, ended = [], False
            for channel in self._ready(remaining):
                if channel not in self._channels:
                    continue
                if not channel.has_message() and not channel.at_eof:
                    channel.read_nowait()
                if channel.has_message():
                    # The caller receives it: count it as delivered for _ended.
                    self._channels[channel] += 1
                    ready.append(channel)
                elif channel.at_eof:
                    self._ended(channel)
                    ended = True
            if ready or ended or remaining == 0.0:
                return ready
        return []

    def _ready(self, timeout):
        """Channels with something to read: a message, or the end of the stream.

        Channels holding a message that was already read into memory are
        returned at once, without waiting.
        """
        if self._tasks is not None:
            return self._tasks.ready(self._channels, timeout)
        if not self._channels:
            # Nothing is registered (the poller may even be closed): only the
            # children still to be reaped are waited for, by polling.
            if timeout:
                time.sleep(timeout)
            return []
        buffered = [ch for ch in self._buffered if ch.has_message() or ch.at_eof]
        if len(buffered) < len(self._buffered):  # forget those whose messages were taken
            self._buffered.intersection_update(buffered)
        if buffered:
            timeout = 0
        deadlines = self._deadlines
        if deadlines:   # wake at the first deadline (a killed child's channel then ends)
            due = max(0.0, deadlines.kill_overdue() - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        seen = set(buffered)
        for ch, _ in self._poller.wait(timeout):
            if ch not in seen:
                buffered.append(ch)
        if deadlines:
            deadlines.kill_overdue()
        return buffered

    # -- the work queue ------------------------------------------------------------
    def _live(self):
        return len(self._channels) + len(self._unreaped)

    def busy(self):
        """True when the limit of live processes is reached."""
        return self.limit is not None and self._live() >= self.limit

    def unfinished(self):
        """True while channels are watched, work is queued, or a child whose channel
        ended is still to be reaped to learn whether it failed (see :meth:`store_died`)."""
        return bool(self._channels or self._waiting or self._unjudged)

    def store_data(self, channel):
        """Handle a message waiting on ``channel``: override in a subclass."""
        raise NotImplementedError("Exchange.store_data must be defined by a subclass")

    def store_died(self, channel, error):
        """Handle a child that ended without delivering (or with a failure): raise by default."""
        raise error

    def store(self, timeout=None):
        """Wait up to ``timeout`` seconds for ready channels and store what they send."""
        if self._unreaped:
            if self._reap():
                timeout = 0  # room was made (the caller may wait for that): do not block
            elif self._unreaped:
                timeout = REAP_POLL if timeout is None else min(timeout, REAP_POLL)
        if not self._channels and not self._unreaped:
            timeout = 0  # nothing can become ready: never block forever
        for channel in self._ready(timeout):
            if channel not in self._channels:
                continue
            if not channel.has_message() and not channel.at_eof:
                channel.read_nowait()
            while channel.has_message() and channel in self._channels:
                self._deliver(channel)
            if channel.at_eof and not channel.has_message() and channel in self._channels:
                self._ended(channel)
        self._start_waiting()

    def _deliver(self, channel):
        self._channels[channel] += 1
        try:
            self.store_data(channel)
        except Exception:
            self._failed.add(channel)
            raise
        if self.reuse and self._tasks is None and channel not in self._failed:
            self._reuse(channel)

    def _reuse(self, channel):
        if self._waiting:
            _callable, args, kwargs, tag = self._waiting.popleft()
            self._tags[channel] = tag
            if self._deadlines is not None:
                self._deadlines.new_job(channel)
            channel.send((args, kwargs))
        else:
            if self._deadlines is not None:
                self._deadlines.stopping(channel)
            channel.send(None)

    def _start_waiting(self):
        while self._waiting and not self.busy():
            fn, args, kwargs, tag = self._waiting.popleft()
            self._launch(fn, args, kwargs, tag)

    def _launch(self, fn, args, kwargs, tag):
        if self._tasks is None:
            channel = _channel.start(fn, *args, **kwargs)
        elif isinstance(fn, MakeParallel):      # its return value is its one message
            channel = self._tasks.submit_returning(fn.callable, args, kwargs)
        else:
            channel = self._tasks.submit_sending(fn, args, kwargs)
        self._tags[channel] = tag
        self.add(channel)
        if self._deadlines is not None:
            self._deadlines.started(channel, fn)

    def _tick(self):
        """One more item taken by iteration: move the progress bar."""
        if self._bar is None:
            self._bar = make_bar(self._progress_total(), None, self._progress)
        self._bar.update(1)

    def _progress_total(self):
        return None

    def _progress_done(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def wait(self):
        """Store results until fewer than ``limit`` processes are live."""
        while self.busy():
            self.store()

    def finish(self):
        """Store results until nothing is running or queued."""
        while self.unfinished() or self._unreaped:
            self.store()

    def add_wait(self, channel):
        """Wait for room under the limit, then add ``channel``."""
        self.wait()
        self.add(channel)

    # -- starting processes --------------------------------------------------------
    def start(self, callable, *args, **kwargs):
        """Run ``callable(channel, *args, **kwargs)`` in a new process, or queue it while busy."""
        self._submit(callable, args, kwargs, None)

    def _submit(self, fn, args, kwargs, tag):
        self._started += 1
        self._waiting.append((fn, args, kwargs, tag))
        self._start_waiting()

    def create(self):
        """Fork (after waiting for room under the limit). Returns the channel in the child,
        None in the parent, which watches the channel."""
        if self._tasks is not None:
            raise _foreign.refuse("create()")
        self.wait()
        channel = _channel.create()
        if channel.pid == 0:
            return channel
        self.add(channel)
        return None

    def manage(self, callable):
        """A callable that starts ``callable`` through this exchange when called."""
        return ManagedCallable(callable, self)

    def close(self):
        """Close every channel and the poller, and reap the children that have exited.

        Never waits: children still running are reaped later, by :meth:`store` or
        :meth:`finish` (which also report a death through :meth:`store_died`), or
        by :func:`waitall`.
        """
        for channel in list(self._channels):
            self.remove(channel)
        self._poller.close()
        if self._unreaped:
            self._reap()


class ManagedCallable:
    """A callable whose calls start processes through an exchange."""

    def __init__(self, callable, exchange):
        self.callable = callable
        self.exchange = exchange

    def __call__(self, *args, **kwargs):
        self.exchange.start(self.callable, *args, **kwargs)


class MakeParallel:
    """Wrap ``fn`` so that it runs in a child and sends its return value."""

    def __init__(self, callable):
        self.callable = callable

    def __call__(self, channel, *args, **kwargs):
        channel.send(self.callable(*args, **kwargs))


class MakeReusable(MakeParallel):
    """Wrap ``fn`` for a reusing exchange: send each result, then wait for the next
    ``(args, kwargs)``; stop on ``None``."""

    def __call__(self, channel, *args, **kwargs):
        channel.send(self.callable(*args, **kwargs))
        while True:
            work = channel.receive()
            if work is None:
                return
            args, kwargs = work
            channel.send(self.callable(*args, **kwargs))


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error


class Queue(Exchange):
    """An exchange whose results are read by iterating, in the order they arrive.

    A child's failure takes its place in that order: it is raised when reached,
    after the results that arrived before it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._results = collections.deque()

    def store_data(self, channel):
        try:
            value = channel.receive()
        except Exception as exc:
            value = _Failed(exc)
            self._failed.add(channel)
        self._results.append(value)

    def store_died(self, channel, error):
        self._results.append(_Failed(error))

    def __iter__(self):
        return self

    def __next__(self):
        while not self._results and (self.unfinished() or self._unreaped):
            self.store()
        if not self._results:
            if self._progress is not None:
                self._progress_done()
            raise StopIteration
        value = self._results.popleft()
        if self._progress is not None:
            self._tick()
        if isinstance(value, _Failed):
            raise value.error
        return value

    def _progress_total(self):
        """Results expected: one per started task, unknown for continuous children."""
        return None if self.continuous or not self._started else self._started

    next = __next__

    def __len__(self):
        """The number of results (and failures) received but not yet taken."""
        return len(self._results)


_PENDING = object()


class Map(Exchange):
    """An exchange whose results are read in the order the work was started.

    Index it (an int or a slice) or iterate it once; both block until the
    results are in. A child that ended without a result raises at its index.
    """

    def __init__(self, *args, **kwargs):
        self._results = []
        self._next = 0
        super().__init__(*args, **kwargs)

    def _new_index(self):
        self._results.append(_PENDING)
        return len(self._results) - 1

    def add(self, channel):
        super().add(channel)
        if channel not in self._tags:
            self._tags[channel] = self._new_index()

    def start(self, callable, *args, **kwargs):
        self._submit(callable, args, kwargs, self._new_index())

    def __call__(self, callable, sequence):
        """Start ``callable`` (wrapped in MakeParallel if needed) on each item of ``sequence``."""
        if not isinstance(callable, MakeParallel):
            callable = MakeParallel(callable)
        for item in sequence:
            self.start(callable, item)
        return self

    def store_data(self, channel):
        # A failure is raised at its own index, not while waiting for another one.
        try:
            value = channel.receive()
        except Exception as exc:
            value = _Failed(exc)
            self._failed.add(channel)
        self._results[self._tags[channel]] = value

    def store_died(self, channel, error):
        index = self._tags.get(channel)
        if index is None or self._results[index] is not _PENDING:
            raise error
        self._results[index] = _Failed(error)

    def _result(self, index):
        while self._results[index] is _PENDING and (self.unfinished() or self._unreaped):
            self.store()
        value = self._results[index]
        if value is _PENDING:
            raise ChannelBroken("no result was delivered for item %d" % index)
        if isinstance(value, _Failed):
            raise value.error
        return value

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._result(i) for i in range(*index.indices(len(self._results)))]
        if index < 0:
            index += len(self._results)
        if not 0 <= index < len(self._results):
            raise IndexError("Map index out of range")
        return self._result(index)

    def __len__(self):
        return len(self._results)

    def __iter__(self):
        return self

    def __next__(self):
        if self._next >= len(self._results):
            self.finish()  # every result is in: reap the children that sent them
            if self._progress is not None:
                self._progress_done()
            raise StopIteration
        index, self._next = self._next, self._next + 1
        if self._progress is not None:
            self._tick()
        return self._result(index)

    def _progress_total(self):
        return len(self._results)

    next = __next__


def pmap(callable, sequence, limit=None, *, task_timeout=None, progress=None, executor=None):
    """A lazy parallel ``map``: a :class:`Map` running ``callable`` on each item (on
    ``executor``, if given). ``task_timeout`` and ``progress`` as for :class:`Exchange`."""
    mymap = Map(limit=limit, task_timeout=task_timeout, progress=progress, executor=executor)
    return mymap(callable, sequence)
