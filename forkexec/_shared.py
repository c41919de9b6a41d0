"""What caller threads and the exchange thread share: the work queue, requests, counters.

The rule of the queue: caller threads only append (and read its length); the
exchange thread alone takes items out or puts given-back items back at the
front. Cancelling queued work, terminating and killing are *requests*: a caller
sets a flag and wakes the thread, which carries them out.
"""

import collections
import os
import threading

from . import _fork


class WorkItem:
    """One queued call (or map chunk): its future and its pickled form."""

    __slots__ = ("future", "task_id", "kind", "blob", "fn", "count", "started", "estimate",
                 "timeout")

    def __init__(self, future, task_id, kind, blob, fn, count=1, timeout=None):
        self.future = future
        self.task_id = task_id
        self.kind = kind
        self.blob = blob
        self.fn = fn
        self.count = count        # calls in this item (a map chunk holds several)
        self.started = False      # its future was moved to RUNNING
        self.estimate = None      # expected seconds when dispatched, None if unknown
        self.timeout = timeout    # seconds it may run before its worker is killed, or None


class WakeUp:
    """A self-pipe that wakes the exchange thread. The single owner of both descriptors:
    a forked child closes them at once (``_fork.own``)."""

    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.lock = threading.Lock()   # no wake-up may write to a closed (reused) number
        _fork.own(self)

    def wake(self):
        with self.lock:
            if self.w < 0:
                return
            try:
                os.write(self.w, b"\0")
            except OSError:   # full: a wake-up is pending anyway
                pass

    def drain(self):
        try:
            while len(os.read(self.r, 4096)) == 4096:
                pass
        except OSError:
            pass

    def close(self):
        _fork.disown(self)
        with self.lock:
            r, w, self.r, self.w = self.r, self.w, -1, -1
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)

    def _after_fork_in_child(self):
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


class Shared:
    """State of one executor shared by its callers and its exchange thread."""

    def __init__(self):
        self.owner_pid = os.getpid()
        self.start_lock = threading.Lock()   # the one-time start of template and thread
        self.foreign = False        # set in a forked child: this executor is not ours
        self.starting = False       # the template is being started (a fork now copies us)
        self.pending = collections.deque()
        self.wakeup = None          # WakeUp, while the exchange thread runs
        self.sleeping = False       # the thread is (about to be) blocked in poll
        # Held by the exchange thread except while it polls; a caller holding it may act
        # for the sleeping thread through hand_off (the loop's).
        self.loop_lock = threading.Lock()
        self.hand_off = None
        self.shutdown = False       # no new work; finish what is queued and stop
        self.cancel_requested = False   # cancel everything queued (shutdown(cancel_futures))
        self.kill_signal = None     # terminate_workers/kill_workers/Ctrl-C: signal to send
        self.kill_reason = None
        self.kill_on_exit = False   # shutdown(wait=False, cancel_futures=True): never wait at exit
        self.kill_requests = collections.deque()   # kill_task(): KillRequests to carry out
        self.broken = None          # the error that broke the pool
        self.closed = False         # the exchange thread has finished cleaning up
        self.thread = None
        self.completed = self.failed = self.replaced = self.running = 0
        self.worker_pids = set()    # live workers (the exchange thread adds and discards)
        self.times = None           # _stats.PoolTimes, once the exchange thread exists
        # Measured seconds per call by function (written by the exchange thread, read by
        # map): this pool's own history, so another pool's tasks never mislead it.
        self.costs = {}
        _fork.own(self)

    def _after_fork_in_child(self):
        if self.thread is None and not self.starting and not self.foreign:
            # Never started here: the child may adopt it as its own (a module-level pool
            # in a server that preloads its app and then forks).
            self.owner_pid = os.getpid()
            self.start_lock = threading.Lock()
            self.loop_lock = threading.Lock()
            self.costs = {}
            return True   # stays owned in the child
        self.foreign = True
        self.wakeup = None
        return False

    def wake(self):
        wakeup = self.wakeup
        if wakeup is not None:
            wakeup.wake()
