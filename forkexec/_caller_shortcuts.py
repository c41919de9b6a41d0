"""Two shortcuts a caller thread takes for the sleeping exchange thread.

A round trip (``submit(f).result()`` on an idle pool) would otherwise wake the
exchange thread twice, once to send the task and once to read its reply, and
each wake-up is a thread switch costing as much as the work. While the exchange
thread sleeps in poll it holds no state, so a caller holding ``loop_lock`` may
act for it:

* :func:`hand_off`: ``submit`` on a quiet pool (nothing running) sends the queue
  to an idle worker itself. When that is a single task, the worker is *lent* to
  the task's future: its descriptor leaves the exchange thread's poll set first,
  so the reply wakes nobody.
* :func:`helped_wait`: ``result()``/``exception()`` on that future read the
  lent worker's reply in the calling thread, for at most ``HELP_SECONDS``.

A lent worker goes back to the exchange thread (:func:`reclaim`) when anything
else could wait on the future (a condition, a callback, ``done()``:
:meth:`FastFuture._release_helper` wakes the exchange thread), and whenever the
exchange thread wakes for any reason, so a reply nobody reads is never stranded.
When the reader is done with a plain reply, the idle worker *rests*: it stays out
of the poll set (lent, to no future), so the next round trip sends to it and reads
from it without two ``epoll_ctl`` calls; the thread takes it back when it wakes.
Deaths (the template's exit reports), control records and every other worker stay
with the exchange thread, which never waits for a caller while holding the lock.
"""

import threading
import time
from concurrent.futures._base import FINISHED
from concurrent.futures.process import BrokenProcessPool

from ._completion import ABANDONED, start_running
from ._scheduler import GIVE_BACK_FACTOR, GIVE_BACK_MIN
from .channel import _wait_readable
from .exchange import Poller

#: How long a caller reads its worker's reply itself before leaving it to the exchange
#: thread: longer tasks gain nothing from the shortcut.
HELP_SECONDS = 0.005
LENT, READING = 1, 2   # Worker.watched: lent to a future; its caller is reading it now
#: The caller's first read takes up to this much (a small result's reply); the rest, if any,
#: is read under the lock.
FIRST_READ = 1 << 12


def hand_off(loop):
    """Called with ``loop_lock`` held: send queued work to an idle worker now. True when
    nothing is left that needs the exchange thread awake; False: wake it."""
    shared = loop.shared
    # Only on a quiet pool (nothing running): a burst of submits is better batched by the
    # exchange thread than sent one by one, each send paying a process switch here.
    if shared.running or not shared.sleeping or shared.broken is not None or \
            shared.shutdown or shared.kill_signal is not None or shared.cancel_requested:
        return False
    pending = shared.pending
    try:
        if len(pending) == 1 and loop.lent:
            worker = _resting(loop)
            if worker is not None and _send_to_resting(loop, worker, pending):
                return not loop.control.busy and not worker.writing
        if not any(not w.tasks and loop.scheduler.accepts(w) for w in loop.table):
            return False
        loop.dispatch(lend=_lend)
    except BaseException as exc:  # noqa: B902 - even a Ctrl-C: no item may be lost
        loop.break_pool(BrokenProcessPool(
            "internal error or interruption while handing work to a worker: %r" % (exc,)))
        raise
    # A time limit or idle retirement needs the thread's clock: wake it to look.
    return not shared.pending and not loop.control.busy and \
        not any(w.writing for w in loop.table)


def _resting(loop):
    """A resting worker that can take a task now, or None."""
    for worker in loop.lent:
        if worker.lent_to is None and worker.watched == LENT and not worker.tasks and \
                not worker.retiring and not worker.writing and not worker.channel.closed \
                and not worker.channel.at_eof and \
                (worker.budget is None or worker.budget > 0):
            return worker
    return None


def _send_to_resting(loop, worker, pending):
    """Send the one queued item to the resting ``worker`` (what :meth:`ExchangeLoop.dispatch`
    would do for it, without planning). False: leave the item to the general path."""
    item = pending[0]
    if getattr(item.future, ABANDONED, False):
        return False
    pending.popleft()
    loop.in_hand = [item]   # so an internal error still fails it
    batch = start_running(loop.in_hand)
    if batch:
        estimate = item.estimate = loop.scheduler.costs.estimate(item)
        worker.lent_to = item.future
        item.future._helper = (loop, worker)
        loop.send_batch(worker, batch, None if estimate is None else
                        max(GIVE_BACK_MIN, GIVE_BACK_FACTOR * estimate))
    loop.in_hand = []
    return True


def _lend(loop, worker, item):
    """Before ``item`` (alone in its batch) is sent to the idle ``worker``."""
    if worker.watched is None:   # a resting worker is out of the poll set already
        loop.poller.unregister(worker.channel.fileno())
    worker.watched = LENT
    worker.lent_to = item.future
    loop.lent.add(worker)
    item.future._helper = (loop, worker)


def reclaim(loop, worker):
    """The exchange thread watches ``worker`` again (``loop_lock`` held). A worker whose
    channel ended is left out, as any: its exit report decides."""
    worker.watched = None
    worker.lent_to = None
    loop.lent.discard(worker)
    channel = worker.channel
    if channel.closed or channel.at_eof or loop.shared.closed:
        return
    events = Poller.READ | (Poller.WRITE if worker.writing else 0)
    loop.poller.register(channel.fileno(), events, worker)


def reclaim_all(loop):
    """Exchange thread, awake: take back every lent worker that no caller is reading."""
    for worker in list(loop.lent):
        if worker.watched == LENT:
            reclaim(loop, worker)


def helped_wait(loop, worker, future, timeout):
    """Read the lent ``worker``'s reply for ``future`` in this thread, for at most
    ``HELP_SECONDS`` (and ``timeout``). Returns the seconds spent."""
    started = time.monotonic()
    budget = HELP_SECONDS if timeout is None else min(HELP_SECONDS, timeout)
    if loop.thread_ident == threading.get_ident():
        return 0.0   # a done-callback waiting: the exchange thread cannot read for it
    lock = loop.shared.loop_lock
    with lock:   # the exchange thread holds it only briefly, never waiting for us
        if worker.watched != LENT or worker.lent_to is not future:
            return 0.0   # taken back meanwhile: the exchange thread reads the reply
        if budget <= 0 or future.done():
            reclaim(loop, worker)
            return 0.0
        worker.watched = READING
    try:
        _read_reply(loop, worker, future, started + budget, budget >= HELP_SECONDS)
    except BaseException:   # a Ctrl-C while waiting: the exchange thread reads on
        with lock:
            if worker.watched == READING:
                reclaim(loop, worker)
        loop.shared.wake()
        raise
    return time.monotonic() - started


def _read_reply(loop, worker, future, deadline, whole_budget):
    """Wait for the reply outside ``loop_lock``, take it in under the lock. The first wait
    is one blocking ``recv`` (its socket's receive timeout is ``HELP_SECONDS``: the whole
    budget), later ones poll until ``deadline``. Until this thread hands the worker back,
    nobody else reads it: its exit, if reported meanwhile, waits (_worker_events)."""
    lock = loop.shared.loop_lock
    channel = worker.channel
    fd = channel.fileno()
    first = whole_budget
    while True:
        if first:
            first = False
            data = channel.recv_waiting(FIRST_READ)
            more = data is not None and len(data) == FIRST_READ
        else:
            data = None
            more = _wait_readable(fd, max(0.0, deadline - time.monotonic()))
        with lock:
            if channel.closed or loop.shared.closed:   # the pool ended meanwhile
                reclaim(loop, worker)
                return
            if data is not None:
                channel.feed(data)
            if more:
                channel.read_nowait()
            loop.take_messages(worker)
            if future._state == FINISHED or channel.at_eof or time.monotonic() >= deadline:
                _rest_or_reclaim(loop, worker)
                if loop.shared.pending and loop.shared.sleeping:
                    loop.shared.wake()   # work the worker may take now
                return


def _rest_or_reclaim(loop, worker):
    """The reader is done: an idle worker with nothing to report rests (stays out of the
    poll set, see the module's docstring); any other goes back to the exchange thread."""
    channel = worker.channel
    if worker.exit_status is not None:   # it exited while we read: the thread judges it
        reclaim(loop, worker)
        loop.shared.wake()
    elif worker.tasks or worker.retiring or worker.writing or channel.at_eof or \
            channel.has_message() or loop.control.busy:
        reclaim(loop, worker)
    else:
        worker.watched = LENT
        worker.lent_to = None
