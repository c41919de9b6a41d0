"""Stopping workers on purpose: task timeouts, ``kill_task`` and the idle timeout.

Exchange thread only. Each loop turn, while there is something to watch,
:meth:`TaskControl.check` reads the workers' marks and the clock and decides:

* a timed task that has run past its limit (counted from the start time its
  worker wrote, so time spent queued never counts): kill its worker;
* a ``kill_task`` request: once the task is running at the head of its
  worker's tasks (so no finished neighbour's result is lost), kill its worker;
  while it is still queued here, cancel it;
* a worker idle for ``idle_timeout`` seconds: tell it to exit (it runs its
  finalizer); it is forked again when work comes.

A worker stopped this way never breaks the pool and never counts as a crash:
:meth:`TaskControl.decide` fails only the task it was stopped for (``TaskTimeout``,
or cancelled for ``kill_task``), puts the tasks it never started back in the
queue, and replaces it. A timed task always travels alone in its batch and no
batch is queued behind it (the scheduler treats its cost as unknown), so
killing its worker costs no other task.
"""

import collections.abc
import os
import threading
import time
from concurrent.futures import Future

from ._completion import ABANDONED, cancel
from ._death_policy import Decision, describe
from ._protocol import MARKS_PER_SLOT, RETIRE, started_at_index, to_wire
from .errors import TaskTimeout, WorkerDiedError, describe_status
from .wire import encode

#: How often to look at the marks while a watched task has not started yet (its start
#: time, once seen, gives the exact deadline).
POLL = 0.005
#: Looks for idle workers per idle_timeout: a worker retires after idle_timeout seconds
#: idle, plus at most idle_timeout / IDLE_LOOKS.
IDLE_LOOKS = 4
TIMEOUT, KILLED, IDLE, MEMORY = "timeout", "kill_task", "idle", "memory"


def call_arguments(fn, args, kwargs):
    """``submit_task``'s ``(args, kwargs)`` as a tuple and a dict; a clear error if not."""
    if not callable(fn):
        raise TypeError("submit_task() needs a callable, not %r" % (fn,))
    try:
        args = tuple(args)
    except TypeError:
        raise TypeError("args must be an iterable of positional arguments, not %r"
                        % (args,)) from None
    if kwargs is None:
        return args, {}
    if not isinstance(kwargs, collections.abc.Mapping):
        raise TypeError("kwargs must be a mapping of keyword arguments or None, not %r"
                        % (kwargs,))
    return args, dict(kwargs)


def kill_task(shared, future):
    """``ForkExchangeExecutor.kill_task``: cancel ``future`` if it is queued, else ask the
    exchange thread to kill its worker, and wait for the answer."""
    if not isinstance(future, Future):
        raise TypeError("kill_task() needs a Future of this executor, not %r" % (future,))
    if future.done():   # cancelled already counts: this call changed nothing
        return False
    if future.cancel():
        return True
    if shared.owner_pid != os.getpid() or shared.thread is None or shared.closed:
        return False
    request = KillRequest(future, threading.Event())
    shared.kill_requests.append(request)
    shared.wake()
    while not request.done.wait(0.25):
        if shared.closed:   # the exchange thread ended: it answered what it saw
            return future.cancelled()
    return request.killed


class KillRequest:
    """``kill_task(future)`` waiting for the exchange thread: ``done`` is set once it is
    carried out, ``killed`` says whether the task was stopped or cancelled."""

    __slots__ = ("future", "done", "killed")

    def __init__(self, future, event):
        self.future = future
        self.done = event
        self.killed = False

    def answer(self, killed):
        self.killed = killed
        self.done.set()


class TaskControl:
    def __init__(self, shared, link, marks, nslots, idle_timeout, clock=time.monotonic):
        self.shared = shared
        self.link = link
        self.marks = marks
        self.nslots = nslots
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.watched = set()     # workers sent a timed task not yet answered
        self.wanted = []         # KillRequests not carried out yet
        self.stopping = {}       # worker -> KillRequest answered when the worker is gone
        # check() has something to look at (a plain attribute: the loop reads it each turn;
        # new kill_task requests are seen in shared.kill_requests)
        self.busy = idle_timeout is not None
        # Idle workers are looked for at most every idle_timeout / IDLE_LOOKS seconds (each
        # look costs a pass over the workers), and when the first one is due to retire.
        self.idle_next = 0.0
        self.idle_first = None

    def sent(self, worker, batch):
        """A batch went to ``worker``: watch it if its task has a time limit. Returns
        whether the worker must write start times (the batch's ``timed`` flag)."""
        if len(batch) == 1 and batch[0].timeout is not None:
            self.watched.add(worker)
            self.busy = True
            return True
        return False

    # -- deciding ------------------------------------------------------------------------
    def check(self, table):
        """Stop what must be stopped now; return the seconds until the next look, or
        None if nothing needs one."""
        now = self.clock()
        wake = None
        requests = self.shared.kill_requests
        while requests:
            self.wanted.append(requests.popleft())
        if self.wanted:
            self.wanted = [r for r in self.wanted if not self._kill_requested(r, table)]
            if self.wanted:
                wake = POLL
        for worker in list(self.watched):
            due = self._check_timed(worker, table, now)
            if due is not None:
                wake = due if wake is None else min(wake, due)
        if self.idle_timeout is not None:
            if now >= self.idle_next or (self.idle_first is not None and now >= self.idle_first):
                due = self._check_idle(table, now)
                self.idle_next = now + self.idle_timeout / IDLE_LOOKS
                self.idle_first = None if due is None else now + due
            nxt = self.idle_next if self.idle_first is None else min(self.idle_next,
                                                                     self.idle_first)
            wake = max(0.0, nxt - now) if wake is None else min(wake, max(0.0, nxt - now))
        self.busy = bool(self.watched or self.wanted or self.idle_timeout is not None)
        return wake

    def _head(self, worker):
        """``(item, running)``: the worker's first unanswered task, and whether it runs."""
        for item in worker.tasks.values():
            base = MARKS_PER_SLOT * worker.slot
            started, finished = self.marks[base], self.marks[base + 1]
            return item, started == item.task_id and finished != started
        return None, False

    def _check_timed(self, worker, table, now):
        if worker.stop is not None or table.workers.get(worker.slot) is not worker:
            self.watched.discard(worker)
            return None
        item, running = self._head(worker)
        if item is None or not any(i.timeout is not None for i in worker.tasks.values()):
            self.watched.discard(worker)
            return None
        if item.timeout is None or not running:
            return POLL   # it has not started yet (or its result is on the way)
        started_at = self.marks[started_at_index(self.nslots, worker.slot)] / 1e6
        left = started_at + item.timeout - now
        if left > 0:
            return left
        self.stop(worker, TIMEOUT, item)
        self.watched.discard(worker)
        return None

    def _kill_requested(self, request, table):
        """Carry out ``request`` if possible now; True once it needs no more looks."""
        future = request.future
        if future.done():
            request.answer(future.cancelled())
            return True
        if future.cancel():   # still queued and never sent
            request.answer(True)
            return True
        for worker in table:
            for item in worker.tasks.values():
                if item.future is future:
                    setattr(future, ABANDONED, True)   # if given back: cancelled, not run
                    if worker.stop is not None:   # stopping already: look again after
                        return False
                    head, running = self._head(worker)
                    if head is item and running:
                        self.stop(worker, KILLED, item)
                        self.stopping.setdefault(worker, []).append(request)
                        return True
                    return False   # queued behind other tasks in that worker: wait
        pending = self.shared.pending
        for item in list(pending):
            if item.future is future:   # given back to the queue, never run
                pending.remove(item)
                cancel([item])
                request.answer(True)
                return True
        request.answer(False)   # finished meanwhile, or not a task of this executor
        return True

    def _check_idle(self, table, now):
        """Retire workers idle for ``idle_timeout``; a worker counts as idle from the first
        look that finds it without tasks and with the same finished mark as before."""
        wake = None
        for worker in table:
            if worker.stop is not None or worker.retiring:
                continue
            finished = self.marks[MARKS_PER_SLOT * worker.slot + 1]
            if worker.tasks:
                worker.idle_since = None   # its results wake the loop, which looks again
                continue
            if worker.idle_since is None or worker.idle_mark != finished:
                worker.idle_since, worker.idle_mark = now, finished
            due = worker.idle_since + self.idle_timeout - now
            if due <= 0:
                self.retire(worker, IDLE)
                continue
            wake = due if wake is None else min(wake, due)
        return wake

    # -- acting --------------------------------------------------------------------------
    def stop(self, worker, reason, item):
        """Kill ``worker`` for ``reason``; no more work goes to it."""
        worker.stop = (reason, item)
        _no_more_work(worker)
        self.link.kill_worker(worker.pid)

    def retire(self, worker, reason):
        """Ask ``worker`` to exit once done (idle, or it said its memory is too large)."""
        if worker.stop is not None:
            return
        worker.stop = (reason, None)
        _no_more_work(worker)
        channel = worker.channel
        if not channel.closed:
            channel.queue(encode(to_wire(RETIRE)))
            try:
                channel.flush_nowait()
            except Exception:  # noqa: B902 - it died: its exit report follows
                pass

    def decide(self, gone, keep_size):
        """The :class:`~forkexec._death_policy.Decision` for a worker that was stopped
        on purpose (``worker.stop`` is set). Cancels the task of a ``kill_task``."""
        worker = gone.worker
        reason, target = worker.stop
        self.watched.discard(worker)
        requests = self.stopping.pop(worker, ())
        times = self.shared.times
        if reason == TIMEOUT:
            times.timed_out += 1
        elif reason == KILLED:
            times.killed += 1
        elif reason == IDLE:
            times.idle_retired += 1
        else:
            times.memory_retired += 1
        fail = []
        killed = False
        for item in gone.lost:   # never expected: stopped only with no finished task unsent
            fail.append((item, WorkerDiedError(
                "%s finished in worker process %d, but its result was lost when the worker "
                "was stopped (%s); it is not run again" % (describe(item), worker.pid, reason),
                worker.pid, gone.status)))
        running = gone.running
        if running is not None and running is target:
            if reason == TIMEOUT:
                fail.append((running, timeout_error(running, worker.pid)))
            else:
                cancel([running])
                killed = True
        elif running is not None:   # the target finished just as the kill came
            fail.append((running, WorkerDiedError(
                "%s was running in worker process %d when that worker was killed to stop "
                "%s, which had just finished (%s)" % (describe(running), worker.pid,
                                                      describe(target) if target else reason,
                                                      describe_status(gone.status)),
                worker.pid, gone.status)))
        for request in requests:
            request.answer(killed and target is not None and request.future is target.future)
        respawn = (keep_size and reason != IDLE) or bool(gone.unstarted)
        return Decision(fail, list(gone.unstarted), respawn, None)

    def close(self):
        """The exchange thread is ending: no kill_task caller may wait any longer."""
        requests = list(self.wanted) + [r for rs in self.stopping.values() for r in rs]
        while self.shared.kill_requests:
            requests.append(self.shared.kill_requests.popleft())
        self.wanted, self.stopping = [], {}
        for request in requests:
            request.answer(request.future.cancelled())


def timeout_error(item, pid):
    name = describe(item)
    return TaskTimeout(
        "%s ran longer than its timeout of %g seconds; it was stopped by killing its worker "
        "process (pid %d), which was replaced" % (name, item.timeout, pid), name, item.timeout)


def _no_more_work(worker):
    worker.retiring = True
    worker.budget = None   # so that tasks it gives back do not make it take work again
