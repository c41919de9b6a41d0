"""The exchange thread of ForkExchangeExecutor: the one thread that owns every channel.

It wires the parts together: the template link (:mod:`._template_link`) forks
workers on request, the worker table (:mod:`._worker_table`) tracks them, the
scheduler (:mod:`._scheduler`) decides batches, :mod:`._worker_events` carries
out the template's reports (a worker born or gone, as the death policy
:mod:`._death_policy` or task control :mod:`._task_control` decides),
:mod:`._completion` settles futures, and :mod:`._caller_shortcuts` lets a caller
act for this thread while it sleeps. This module does the I/O: polling, sending
batches, reading results, and carrying out the callers' requests.
"""

import functools
import logging
import pickle
import signal
import threading
import traceback
from concurrent.futures.process import BrokenProcessPool

from . import _fork
from ._caller_shortcuts import hand_off, helped_wait, reclaim, reclaim_all
from ._completion import ABANDONED, FAST, cancel, fail, requeue, settle_results, start_running
from ._death_policy import DeathPolicy
from ._protocol import Batch, InitFailed, Results, Retiring, WorkerError, from_wire, to_wire
from ._scheduler import CostModel, Scheduler
from ._shared import WakeUp
from ._stats import PoolTimes
from ._task_control import MEMORY, TaskControl
from ._template_link import TemplateLink
from ._worker_events import on_control, on_deferred_exits
from ._worker_table import WorkerTable
from .errors import ChannelBroken
from .exchange import Poller
from .wire import OUT_OF_BAND_MIN, encode

#: terminate_workers(): workers still alive this long after SIGTERM are killed.
TERMINATE_GRACE = 3.0
#: While it has workers, the exchange thread wakes at least this often, to read a reply
#: lent to a future nobody waits on (its task's references go, its future completes).
STRANDED_REPLY_TICK = 0.5
_LOGGER = logging.getLogger("forkexec")


def _wrap_blob(blob):
    """Large pickles travel out of band (no copy into the frame)."""
    return pickle.PickleBuffer(blob) if len(blob) >= OUT_OF_BAND_MIN else blob


class ExchangeLoop:
    """The exchange thread's world. Nothing outside this thread touches these objects."""

    def __init__(self, shared, nworkers, policy, max_tasks, context, idle_timeout=None):
        self.shared = shared
        self.nworkers = nworkers
        self.max_tasks = max_tasks
        self.link = TemplateLink(nworkers, context)
        self.poller = None
        self.table = None
        self.scheduler = Scheduler(CostModel(shared.costs))
        self.policy = DeathPolicy(policy)
        self.in_hand = []          # items off the queue, not yet recorded with a worker
        self.lent = set()          # workers lent to a caller's future (_caller_shortcuts)
        self.exits_waiting = []    # workers that exited while a caller was reading them
        self.thread_ident = None
        self.idle_timeout = idle_timeout
        self.control = None        # TaskControl: timeouts, kill_task, idle workers
        self.times = shared.times = PoolTimes()

    # -- set-up and tear-down ---------------------------------------------------------
    def start(self, config):
        """Start the template; then :meth:`run` may run in the exchange thread. On failure
        everything is released (and the template, if it started, killed)."""
        self.poller = Poller()
        _fork.own(self)   # the poller's descriptor is ours alone: not the template's
        try:
            self.link.start(config)
        except BaseException:
            _fork.disown(self)
            self.poller.close()
            raise
        try:
            self.table = WorkerTable(self.nworkers, self.link.marks)
            self.control = TaskControl(self.shared, self.link, self.link.marks, self.nworkers,
                                       self.idle_timeout)
            for slot in range(self.link.prefork):
                self.table.start_requested(slot)
                self.times.spawn_requested(slot)
            self.shared.wakeup = WakeUp()
            self.shared.hand_off = functools.partial(hand_off, self)
            self.poller.register(self.shared.wakeup.r, Poller.READ, "wake")
            self.poller.register(self.link.fileno(), Poller.READ, "control")
        except BaseException:
            self.cleanup(abandon=True)
            raise

    def _after_fork_in_child(self):
        self.poller.close()

    def helped_wait(self, worker, future, timeout):
        """``result()`` on a future handed to ``worker``: see _caller_shortcuts."""
        return helped_wait(self, worker, future, timeout)

    def run(self):
        # Everything but the poll runs under loop_lock, so that while this thread sleeps
        # a caller holding the lock may act for it (see _caller_shortcuts).
        self.thread_ident = threading.get_ident()
        lock = self.shared.loop_lock
        lock.acquire()
        try:
            try:
                self.loop(lock)
            except BaseException as exc:  # noqa: B902 - never leave futures hanging
                traceback.print_exc()
                self.break_pool(BrokenProcessPool(
                    "internal error in the forkexec exchange thread: %r" % (exc,)))
            finally:
                self.shared.sleeping = False
                self.cleanup(abandon=False)
        finally:
            lock.release()
            _fork.thread_ending()

    def cleanup(self, abandon):
        """The one close path, for shutdown and for a thread that never started."""
        shared = self.shared
        shared.hand_off = None
        for worker in self.table or ():
            self.poller.unregister(worker.channel.fileno())   # its fd number may be reused
            worker.channel.close()
        if shared.wakeup is not None:   # late wake-ups must not make the wait below spin
            self.poller.unregister(shared.wakeup.r)
        self.link.close(self.poller, abandon=abandon)
        shared.worker_pids.clear()   # the template reaped them all before it exited
        if self.control is not None:
            self.control.close()
        _fork.disown(self)
        self.poller.close()
        shared.closed = True
        if shared.wakeup is not None:
            shared.wakeup.close()
            shared.wakeup = None
        # Anything submitted while we were closing cannot run any more.
        items = _take_all(shared.pending)
        if shared.broken is not None:
            fail(items, shared.broken)
        else:
            cancel(items)

    # -- the loop ----------------------------------------------------------------------
    def loop(self, lock):
        shared = self.shared
        poller = self.poller
        while True:
            if self.lent:
                reclaim_all(self)
            if self.exits_waiting:
                on_deferred_exits(self)
            if shared.kill_signal is not None:
                self.kill_workers()
            if shared.cancel_requested:
                shared.cancel_requested = False
                cancel(_take_all(shared.pending))
            if shared.pending:
                self.grow()
                self.dispatch()
            wake = self.control.check(self.table) if self.control.busy or \
                shared.kill_requests else None
            if self.finished():
                return
            shared.sleeping = True   # from here on, callers wake us: look once more
            timeout = 0 if shared.kill_signal is not None or shared.cancel_requested or \
                shared.kill_requests or (shared.pending and self.can_act()) else wake
            if self.link.backlog and not self.link.flush():
                timeout = 0.001 if timeout is None else timeout   # until the socket drains
            if timeout is None and self.table.workers:
                # A caller may lend a worker to a future while we sleep and then never ask
                # for its result (a future discarded): take the reply back now and then.
                timeout = STRANDED_REPLY_TICK
            lock.release()
            try:
                events = poller.wait(timeout)
            finally:
                lock.acquire()
            shared.sleeping = False
            for data, mask in events:
                if data == "wake":
                    shared.wakeup.drain()
                elif data == "control":
                    on_control(self)
                elif data != "template":
                    self.on_worker_event(data, mask)

    def finished(self):
        shared = self.shared
        if shared.broken is not None:
            return True
        return shared.shutdown and not shared.pending and \
            not any(w.tasks for w in self.table.workers.values())

    def can_act(self):
        """Queued work can be sent, or a worker started for it, right now."""
        table = self.table
        return any(self.scheduler.accepts(w) for w in table) or self.scheduler.workers_wanted(
            len(self.shared.pending), table.idle(), table.live(), self.nworkers) > 0

    # -- sending work ------------------------------------------------------------------
    def dispatch(self, lend=None):
        """Hand queued items to the workers that accept them, as the scheduler plans.
        ``lend(loop, worker, item)`` is called before a lone item goes to an idle worker
        (a caller's hand-off: _caller_shortcuts)."""
        for worker, taken, give_back_after in self.scheduler.plan(
                self.table, self.shared.pending, len(self.table.starting)):
            self.in_hand = taken   # so an internal error still fails them
            batch = start_running(taken)
            if any(getattr(item.future, ABANDONED, False) for item in batch):
                cancel([item for item in batch if getattr(item.future, ABANDONED, False)])
                batch = [item for item in batch if not getattr(item.future, ABANDONED, False)]
            if batch:
                if lend is not None and len(batch) == 1 and not worker.tasks and FAST:
                    lend(self, worker, batch[0])
                self.send_batch(worker, batch, give_back_after)
            self.in_hand = []

    def send_batch(self, worker, batch, give_back_after):
        self.scheduler.sent(worker, batch)
        self.shared.running += len(batch)
        channel = worker.channel
        timed = batch[0].timeout is not None and self.control.sent(worker, batch)
        channel.queue(encode(to_wire(Batch(
            [(item.task_id, item.kind, _wrap_blob(item.blob)) for item in batch],
            give_back_after, timed))))
        try:
            done = channel.flush_nowait()
        except ChannelBroken:
            return   # it died: its EXITED record will come
        if not done and not worker.writing:
            worker.writing = True
            if worker.watched:   # lent to a caller: a big task is better left to us
                reclaim(self, worker)
            else:
                self.poller.modify(channel.fileno(), Poller.READ | Poller.WRITE, worker)

    # -- receiving ---------------------------------------------------------------------
    def on_worker_event(self, worker, mask):
        channel = worker.channel
        if channel.closed or worker.watched:   # a stale event: lent to a caller meanwhile
            return
        if mask & Poller.WRITE:
            try:
                done = channel.flush_nowait()
            except ChannelBroken:
                done = True
            if done:
                worker.writing = False
                self.poller.modify(channel.fileno(), Poller.READ, worker)
        if mask & Poller.READ:
            channel.read_nowait()
            self.take_messages(worker)
            if channel.at_eof:   # judged when the template reports its exit
                self.poller.unregister(channel.fileno())

    def take_messages(self, worker):
        for frame in worker.channel.pop_frames():
            msg = from_wire(pickle.loads(frame.payload, buffers=frame.buffers))
            kind = type(msg)
            if kind is Results:
                self.on_results(worker, msg)
            elif kind is InitFailed:
                exc = pickle.loads(msg.failure).exception()
                err = BrokenProcessPool(
                    "the initializer of worker process %d raised %s: %s; the pool is not "
                    "usable" % (worker.pid, type(exc).__name__, exc))
                err.__cause__ = exc
                self.break_pool(err)
            elif kind is Retiring:
                self.control.retire(worker, MEMORY)
            elif kind is WorkerError:
                worker.error = msg.traceback
                _LOGGER.error("forkexec worker process %d failed:\n%s", worker.pid,
                              msg.traceback)

    def on_results(self, worker, msg):
        shared = self.shared
        scheduler = self.scheduler
        if msg.entries:
            self.policy.results_arrived()
            spent = settle_results(msg.entries, worker, scheduler, shared)
            scheduler.costs.learn(spent)
            self.times.tasks_done(spent)
        if msg.returned:
            returned = [scheduler.answered(worker, task_id) for task_id in msg.returned]
            returned = [item for item in returned if item is not None]
            scheduler.given_back(worker, len(returned))
            shared.running -= len(returned)
            requeue(returned, shared.pending)
        if msg.batch_done:
            scheduler.batch_done(worker)

    # -- processes ---------------------------------------------------------------------
    def grow(self):
        """Fork workers on demand: one per queued task without an idle worker to take it,
        up to max_workers (one task forks one worker, like the standard executor)."""
        table = self.table
        if table.live() >= self.nworkers:
            return
        wanted = self.scheduler.workers_wanted(len(self.shared.pending), table.idle(),
                                               table.live(), self.nworkers)
        for slot in table.free_slots()[:wanted]:
            self.spawn(slot)

    def spawn(self, slot):
        self.table.start_requested(slot)
        self.times.spawn_requested(slot)
        self.link.spawn(slot)

    def break_pool(self, err, also=(), kill=True):
        """Fail everything, now and later, with ``err``; kill the workers."""
        shared = self.shared
        if shared.broken is not None:
            return
        shared.broken = err
        items = list(also) + self.in_hand
        for worker in self.table or ():
            items.extend(worker.tasks.values())
            shared.running -= len(worker.tasks)
            worker.tasks.clear()
        self.in_hand = []
        shared.failed += len(items)
        fail(items, err)
        fail(_take_all(shared.pending), err)
        if kill:
            self.link.signal(signal.SIGKILL)

    def kill_workers(self):
        """Carry out terminate_workers(), kill_workers() or a Ctrl-C."""
        shared = self.shared
        signum = shared.kill_signal
        grace = TERMINATE_GRACE if signum == signal.SIGTERM else 0.0
        self.link.signal(signum, grace)
        cancel(_take_all(shared.pending))
        self.break_pool(BrokenProcessPool(
            "the workers were stopped: %s" % (shared.kill_reason or "killed")), kill=False)


def _take_all(pending):
    items = []
    while True:
        try:
            items.append(pending.popleft())
        except IndexError:
            return items

