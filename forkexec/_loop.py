"""The exchange thread of ForkExchangeExecutor: the one thread that owns every channel.

It forks the template, asks it for workers on demand, hands queued work items to
workers in batches (sized from each function's measured cost: unknown or long
work goes one item at a time, tiny work in bulk), completes futures from the
results, and decides what a worker's exit means: a retirement (replaced), a
death that breaks the pool, or with ``on_worker_death="replace"`` a death that
fails only the task it was running (read from a shared-memory slot).
"""

import collections
import errno
import itertools
import mmap
import os
import pickle
import signal
import socket
import time
import traceback
import types
from concurrent.futures import Future
from concurrent.futures._base import PENDING, RUNNING
from concurrent.futures.process import BrokenProcessPool

from . import _fork
from ._future import FastFuture, finish_all, transition_lock, usable as _fast_futures_usable
from ._template import (EXIT, EXITED, SIGNAL, SPAWN, SPAWN_FAILED, SPAWNED, recv_record,
                        send_record, template_main)
from ._worker import IDLE, INIT_FAILED, INLINE_OK, RESULTS, load_libc
from .channel import Channel
from .errors import ChannelBroken, WorkerDiedError, describe_status
from .exchange import Poller
from .wire import OUT_OF_BAND_MIN, encode

#: Aim for batches that take about this long to run.
TARGET_BATCH_SECONDS = 0.005
MAX_BATCH = 4096
#: With on_worker_death="replace", this many deaths in a row with no task running break
#: the pool (e.g. an initializer that kills its process), instead of respawning forever.
MAX_BARREN_DEATHS = 5
#: Batches of known-cost tasks carry at least this much work, however many workers wait:
#: more, smaller frames only add system calls and wake-ups.
MIN_BATCH_SECONDS = 0.001
#: How many functions' durations are remembered.
COST_TABLE_SIZE = 1024
#: Stop adding items to a batch past this many bytes of pickled calls.
MAX_BATCH_BYTES = 1 << 22
#: Tasks shorter than this get a second batch queued behind the running one.
PIPELINE_BELOW = 0.002
#: How long shutdown waits for the template to exit before killing it.
TEMPLATE_EXIT_TIMEOUT = 15.0
#: Futures handed to users: FastFuture where this Python's Future has the fields it expects.
FAST = _fast_futures_usable()
FutureType = FastFuture if FAST else Future
BY_NAME = (types.FunctionType, types.BuiltinFunctionType)
LIKELY_CAUSES = ("Likely causes: the OOM killer (see dmesg), a segmentation fault in native "
                 "code, os._exit() in a task, or a signal sent from outside.")


class WorkItem:
    """One queued call (or map chunk): its future and its pickled form."""

    __slots__ = ("future", "task_id", "kind", "blob", "fn", "count", "started", "estimate")

    def __init__(self, future, task_id, kind, blob, fn, count=1):
        self.future = future
        self.task_id = task_id
        self.kind = kind
        self.blob = blob
        self.fn = fn
        self.count = count        # calls in this item (a map chunk holds several)
        self.started = False
        self.estimate = None      # expected seconds when dispatched, None if unknown


class WorkerConfig:
    """What the template needs to make workers (travels by fork, never pickled)."""

    def __init__(self, marks, initializer, initargs, max_tasks_per_child):
        self.marks = marks
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks_per_child = max_tasks_per_child
        self.template_pid = 0


def cost_key(fn):
    """Which tasks share a duration estimate: the same plain function, or the same kind
    of callable (per-call partials or bound methods must not grow the table)."""
    if type(fn) in BY_NAME:
        return fn
    inner = getattr(fn, "func", None) or getattr(fn, "__func__", None)
    return (type(fn), inner if type(inner) in BY_NAME else None)


def describe_errno(code):
    """An errno with the limit that most likely caused it."""
    hint = {errno.EMFILE: " (the RLIMIT_NOFILE limit on file descriptors; see ulimit -n)",
            errno.ENFILE: " (the system-wide limit on open files)",
            errno.EAGAIN: " (the RLIMIT_NPROC limit on processes, or memory; see ulimit -u)",
            errno.ENOMEM: " (out of memory)"}.get(code, "")
    return "[Errno %d] %s%s" % (code, os.strerror(code), hint)


def complete(outcomes):
    """Finish futures from ``(future, result, exception)`` triples."""
    if FAST:
        finish_all(outcomes)
        return
    for future, result, exception in outcomes:
        if exception is None:
            set_result(future, result)
        else:
            set_exception(future, exception)


def set_exception(future, exc):
    try:
        future.set_exception(exc)
    except Exception:  # already finished (InvalidStateError)
        pass


def set_result(future, value):
    try:
        future.set_result(value)
    except Exception:  # already finished (InvalidStateError)
        pass


def broken_copy(err):
    """A fresh exception like ``err`` to raise (raising one instance twice chains tracebacks)."""
    copy = type(err)(str(err), getattr(err, "pid", 0), getattr(err, "status", None)) \
        if isinstance(err, WorkerDiedError) else BrokenProcessPool(str(err))
    copy.__cause__ = err.__cause__
    return copy


def _wrap_blob(blob):
    """Large pickles travel out of band (no copy into the frame)."""
    return pickle.PickleBuffer(blob) if len(blob) >= OUT_OF_BAND_MIN else blob


def _describe(item):
    fn = item.fn
    return getattr(fn, "__qualname__", None) or repr(fn)


class _Worker:
    __slots__ = ("slot", "pid", "channel", "tasks", "batch_sizes", "budget", "retiring",
                 "status", "writing", "expected", "unknown")

    def __init__(self, slot, pid, channel, budget):
        self.slot = slot
        self.pid = pid
        self.channel = channel
        self.tasks = {}                       # task_id -> WorkItem, in dispatch order
        self.batch_sizes = collections.deque()  # sizes of batches not fully answered
        self.budget = budget                  # tasks left before it retires, or None
        self.retiring = False                 # it will exit (budget spent, or shutdown)
        self.status = None                    # raw wait status, once reported
        self.writing = False                  # registered for EVENT_WRITE
        self.expected = 0.0                   # estimated seconds of its outstanding tasks
        self.unknown = 0                      # outstanding tasks of unknown cost


class ExchangeLoop:
    """The exchange thread's world. Nothing outside this thread touches these objects."""

    def __init__(self, shared, nworkers, policy, max_tasks):
        self.shared = shared
        self.nworkers = nworkers
        self.policy = policy
        self.max_tasks = max_tasks
        self.marks_map = mmap.mmap(-1, 8 * nworkers)   # MAP_SHARED: template and workers see it
        self.marks = memoryview(self.marks_map).cast("q")
        for i in range(nworkers):
            self.marks[i] = IDLE
        self.poller = Poller()
        self.workers = {}          # slot -> _Worker
        self.by_pid = {}           # pid -> _Worker
        self.spawning = set()      # slots asked of the template
        self.exited = {}           # pid -> status reported before the worker's EOF
        self.costs = shared.costs  # function key -> moving average of seconds per call
        self.control = None
        self.template_pid = 0
        self.in_hand = []          # items off the queue, not yet recorded with a worker
        self.barren_deaths = 0     # workers in a row that died with nothing running

    # -- set-up and tear-down ---------------------------------------------------------
    def start_template(self, config):
        load_libc()
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            self.close_marks()
            raise OSError(exc.errno, "ForkExchangeExecutor could not start: no socket for its "
                          "template process: %s" % describe_errno(exc.errno)) from exc
        _fork.settle_threads()
        try:
            pid = _fork.fork()
        except BaseException as exc:
            parent_end.close()
            child_end.close()
            self.close_marks()
            if isinstance(exc, OSError) and exc.errno:
                raise OSError(exc.errno, "ForkExchangeExecutor could not fork its template "
                              "process: %s" % describe_errno(exc.errno)) from exc
            raise
        if pid == 0:
            parent_end.close()
            template_main(child_end, config)
        child_end.close()
        self.template_pid = pid
        self.control = parent_end
        parent_end.setblocking(False)
        shared = self.shared
        shared.wake_r, shared.wake_w = os.pipe()
        os.set_blocking(shared.wake_r, False)
        os.set_blocking(shared.wake_w, False)
        _fork.own(self)
        self.poller.register(shared.wake_r, Poller.READ, "wake")
        self.poller.register(parent_end, Poller.READ, "control")

    def _after_fork_in_child(self):
        # A child forked from the parent must not keep the pool's descriptors.
        for fd in (self.shared.wake_r, self.shared.wake_w):
            if fd >= 0:
                os.close(fd)
        if self.control is not None:
            self.control.close()
        self.poller.close()

    def run(self):
        try:
            self.loop()
        except BaseException as exc:  # noqa: B902 - never leave futures hanging
            traceback.print_exc()
            self.break_pool(BrokenProcessPool(
                "internal error in the forkexec exchange thread: %r" % (exc,)))
        finally:
            self.cleanup()

    def cleanup(self):
        shared = self.shared
        for worker in list(self.workers.values()):
            self.poller.unregister(worker.channel.fileno())   # its fd number may be reused
            worker.channel.close()
        self.workers.clear()
        self.by_pid.clear()
        try:
            send_record(self.control, EXIT)
        except OSError:
            pass
        self.wait_template()
        shared.worker_pids.clear()   # the template reaped them all before it exited
        self.control.close()
        self.poller.close()
        shared.closed = True
        os.close(shared.wake_r)
        os.close(shared.wake_w)
        shared.wake_r = shared.wake_w = -1
        _fork.disown(self)
        _fork.disown(shared)
        # Anything submitted while we were closing cannot run any more.
        error = shared.broken if shared.broken is not None else None
        if error is not None:
            _fail_queued(shared.pending, error)
        while shared.pending:
            item = shared.pending.popleft()
            if not item.future.cancel():
                set_exception(item.future, RuntimeError("cannot schedule new futures after "
                                                         "shutdown"))
        self.close_marks()

    def close_marks(self):
        self.marks.release()
        self.marks_map.close()

    def abandon(self):
        """The thread could not start: kill the template and release everything."""
        _fork.disown(self)
        os.kill(self.template_pid, signal.SIGKILL)
        os.waitpid(self.template_pid, 0)
        self.control.close()
        self.poller.close()
        os.close(self.shared.wake_r)
        os.close(self.shared.wake_w)
        self.shared.wake_r = self.shared.wake_w = -1
        self.close_marks()

    def wait_template(self):
        """Reap the template, reading the control socket meanwhile; kill it if it hangs."""
        deadline = time.monotonic() + TEMPLATE_EXIT_TIMEOUT
        poller = self.poller   # already watches the control socket; needs no new fd
        pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(self.template_pid)
                poller.register(pidfd, Poller.READ, "template")
            except OSError:   # e.g. out of descriptors: poll instead
                pidfd = None
        try:
            while True:
                self.discard_control()
                try:
                    pid, _status = os.waitpid(self.template_pid, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid:
                    return
                if time.monotonic() > deadline:
                    os.kill(self.template_pid, signal.SIGKILL)   # its workers die with it
                    deadline = float("inf")
                poller.wait(0.1 if pidfd is not None else 0.002)
        finally:
            if pidfd is not None:
                poller.unregister(pidfd)
                os.close(pidfd)

    # -- the loop ----------------------------------------------------------------------
    def loop(self):
        shared = self.shared
        poller = self.poller
        while True:
            if shared.kill_signal is not None:
                self.kill_workers()
                return
            if shared.pending:
                self.grow()
                self.dispatch()
            if self.finished():
                return
            shared.sleeping = True
            timeout = 0 if (shared.pending and self.can_dispatch()) or \
                shared.kill_signal is not None or self.finished() else None
            events = poller.wait(timeout)
            shared.sleeping = False
            for data, mask in events:
                if data == "wake":
                    _drain(shared.wake_r)
                elif data == "control":
                    self.on_control()
                else:
                    self.on_worker_event(data, mask)

    def finished(self):
        shared = self.shared
        if shared.broken is not None:
            return True
        return shared.shutdown and not shared.pending and not any(
            w.tasks for w in self.workers.values())

    def can_dispatch(self):
        return any(self.accepts(w) for w in self.workers.values())

    def accepts(self, worker):
        """An idle worker takes work; a busy one only a second batch behind short known work,
        so it never sits on a backlog another worker could run."""
        if worker.retiring or (worker.budget is not None and worker.budget <= 0):
            return False
        if not worker.tasks:
            return True
        return (len(worker.batch_sizes) < 2 and not worker.unknown
                and worker.expected < PIPELINE_BELOW)

    # -- sending work ------------------------------------------------------------------
    def estimate(self, item):
        """Expected seconds for an item from its function's measured cost, or None."""
        cost = self.costs.get(cost_key(item.fn))
        return None if cost is None else cost * item.count

    def dispatch(self):
        """Hand queued items to workers that accept them, in batches of about
        TARGET_BATCH_SECONDS; an item whose cost is unknown goes alone."""
        pending = self.shared.pending
        ready = [w for w in self.workers.values() if self.accepts(w)]
        if not ready:
            return
        ready.sort(key=lambda w: len(w.tasks))
        for worker in ready:
            if not pending:
                return
            # Spread the queue over the workers that are ready or starting...
            share = len(ready) + len(self.spawning)
            limit = -(-len(pending) // share)
            try:
                head_cost = self.estimate(pending[0])
            except IndexError:
                return
            if head_cost is not None and len(pending) > share:
                # ...but a long queue of tiny tasks goes in worthwhile batches.
                limit = max(limit, int(MIN_BATCH_SECONDS / max(head_cost, 1e-7)))
            limit = min(limit, MAX_BATCH)
            if worker.budget is not None:
                limit = min(limit, worker.budget)
            taken = []
            self.in_hand = taken   # so an internal error still fails them
            nbytes = seconds = 0
            while len(taken) < limit and nbytes < MAX_BATCH_BYTES and \
                    seconds < TARGET_BATCH_SECONDS:
                try:
                    item = pending.popleft()
                except IndexError:
                    break
                estimate = self.estimate(item)
                if estimate is None and taken:
                    pending.appendleft(item)   # unknown cost: it goes alone, next time
                    break
                item.estimate = estimate
                taken.append(item)
                nbytes += len(item.blob)
                if estimate is None:
                    break
                seconds += estimate
            batch = _start_running(taken)
            if batch:
                self.send_batch(worker, batch)
            self.in_hand = []

    def send_batch(self, worker, batch):
        frame = []
        tasks = worker.tasks
        for item in batch:
            frame.append((item.task_id, item.kind, _wrap_blob(item.blob)))
            tasks[item.task_id] = item
            if item.estimate is None:
                worker.unknown += 1
            else:
                worker.expected += item.estimate
        worker.batch_sizes.append(len(batch))
        self.shared.running += len(batch)
        if worker.budget is not None:
            worker.budget -= len(batch)
            if worker.budget == 0:
                worker.retiring = True
        channel = worker.channel
        channel.queue(encode(frame))
        try:
            done = channel.flush_nowait()
        except ChannelBroken:
            return   # it died: its EXITED record will come
        if not done and not worker.writing:
            worker.writing = True
            self.poller.modify(channel.fileno(), Poller.READ | Poller.WRITE, worker)

    # -- receiving ---------------------------------------------------------------------
    def on_worker_event(self, worker, mask):
        channel = worker.channel
        if channel.closed:
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
            self.take_results(worker)
            if channel.at_eof:
                self.on_eof(worker)

    def take_results(self, worker):
        for frame in worker.channel.pop_frames():
            msg = pickle.loads(frame.payload, buffers=frame.buffers)
            if msg[0] == RESULTS:
                self.on_results(worker, msg)
            elif msg[0] == INIT_FAILED:
                failure = pickle.loads(msg[1])
                exc = failure.exception()
                err = BrokenProcessPool(
                    "the initializer of worker process %d raised %s: %s; the pool is not "
                    "usable" % (worker.pid, type(exc).__name__, exc))
                err.__cause__ = exc
                self.break_pool(err)

    def on_results(self, worker, msg):
        _, batch_done, seconds, results = msg
        shared = self.shared
        tasks = worker.tasks
        spent = {}   # cost key -> [seconds, calls] in this message
        outcomes = []
        if results:
            self.barren_deaths = 0
        last_fn = last_key = None
        for task_id, ok, blob, elapsed in results:
            item = tasks.pop(task_id, None)
            if item is None:
                continue
            shared.running -= 1
            if item.estimate is None:
                worker.unknown -= 1
            else:
                worker.expected -= item.estimate
            if item.fn is not last_fn:
                last_fn, last_key = item.fn, cost_key(item.fn)
            total = spent.get(last_key)
            if total is None:
                spent[last_key] = [elapsed, item.count]
            else:
                total[0] += elapsed
                total[1] += item.count
            if ok == INLINE_OK:
                shared.completed += 1
                outcomes.append((item.future, blob, None))
                continue
            try:
                value = pickle.loads(blob)
            except BaseException as exc:  # noqa: B902 - only this task is lost
                err = pickle.UnpicklingError(
                    "cannot unpickle the result of %s: %s: %s"
                    % (_describe(item), type(exc).__name__, exc))
                err.__cause__ = exc
                shared.failed += 1
                set_exception(item.future, err)
                continue
            if ok:
                shared.completed += 1
                outcomes.append((item.future, value, None))
            else:
                shared.failed += 1
                outcomes.append((item.future, None, value.exception()))
        complete(outcomes)
        self.learn(spent)
        if not tasks:
            worker.expected = 0.0   # no drift from float sums
        if batch_done and worker.batch_sizes:
            worker.batch_sizes.popleft()

    def learn(self, spent):
        """Fold measured durations into the per-function cost table."""
        costs = self.costs
        for key, (seconds, calls) in spent.items():
            per_call = seconds / calls
            cost = costs.get(key)
            if cost is None and len(costs) >= COST_TABLE_SIZE:
                costs.clear()
            costs[key] = per_call if cost is None else 0.7 * cost + 0.3 * per_call

    # -- processes ---------------------------------------------------------------------
    def grow(self):
        """Fork workers on demand: one per queued task without an idle worker to take it,
        up to max_workers (one task forks one worker, like the standard executor)."""
        live = len(self.workers) + len(self.spawning)
        if live >= self.nworkers:
            return
        idle = len(self.spawning) + sum(
            1 for w in self.workers.values() if not w.tasks and not w.retiring)
        wanted = min(len(self.shared.pending) - idle, self.nworkers - live)
        if wanted <= 0:
            return
        free = (slot for slot in range(self.nworkers)
                if slot not in self.workers and slot not in self.spawning)
        for slot in itertools.islice(free, wanted):
            self.spawn(slot)

    def spawn(self, slot):
        self.spawning.add(slot)
        send_record(self.control, SPAWN, slot)

    def on_control(self):
        while True:
            try:
                record = recv_record(self.control)
            except BlockingIOError:
                return
            except ConnectionResetError:
                record = None
            if record is None:
                self.on_template_death()
                return
            kind, a, b, _c, fd = record
            if kind == SPAWNED:
                self.on_spawned(a, b, fd)
            elif kind == EXITED:
                self.on_exited(a, b)
            elif kind == SPAWN_FAILED:
                self.spawning.discard(a)
                self.break_pool(BrokenProcessPool(
                    "could not start a worker process: %s" % describe_errno(b)))

    def on_spawned(self, slot, pid, fd):
        self.spawning.discard(slot)
        if fd is None:   # the descriptor was dropped on the way: we are at our fd limit
            self.exited.pop(pid, None)
            self.break_pool(BrokenProcessPool(
                "could not take the channel of a new worker process: %s"
                % describe_errno(errno.EMFILE)))
            return
        sock = socket.socket(fileno=fd)
        channel = Channel(pid, sock, reapable=False)
        worker = _Worker(slot, pid, channel, self.max_tasks)
        self.marks[slot] = IDLE
        self.workers[slot] = worker
        self.by_pid[pid] = worker
        self.shared.worker_pids.add(pid)
        self.poller.register(channel.fileno(), Poller.READ, worker)
        if pid in self.exited:  # it died before we even heard it was born
            self.on_exited(pid, self.exited.pop(pid))

    def on_eof(self, worker):
        self.poller.unregister(worker.channel.fileno())
        if worker.pid in self.exited:
            self.on_exited(worker.pid, self.exited.pop(worker.pid))

    def on_exited(self, pid, status):
        worker = self.by_pid.get(pid)
        if worker is None:
            self.exited[pid] = status
            return
        channel = worker.channel
        if not channel.closed and not channel.at_eof:
            # The process is gone, so all it wrote is buffered: read it before judging.
            while channel.read_nowait():
                self.take_results(worker)
            self.take_results(worker)
            self.poller.unregister(channel.fileno())
        self.finalize(worker, status)

    def finalize(self, worker, status):
        shared = self.shared
        channel = worker.channel
        channel.set_status(status)
        self.poller.unregister(channel.fileno())
        channel.close()
        del self.workers[worker.slot]
        del self.by_pid[worker.pid]
        shared.worker_pids.discard(worker.pid)
        if shared.broken is not None or shared.kill_signal is not None:
            return
        if worker.retiring and not worker.tasks and status == 0:
            if not (shared.shutdown and not shared.pending):
                shared.replaced += 1   # the pool keeps the size it has grown to
                self.spawn(worker.slot)
            return
        running_id = self.marks[worker.slot]
        running = worker.tasks.get(running_id)
        what = ("while running %s" % _describe(running)) if running is not None else \
            "while idle" if not worker.tasks else "with %d tasks queued" % len(worker.tasks)
        if self.policy == "break":
            err = WorkerDiedError(
                "A worker process (pid %d) of this ForkExchangeExecutor died %s: %s. %s The "
                "pool is broken: pending and later tasks fail (on_worker_death='replace' keeps "
                "the pool going)." % (worker.pid, what, describe_status(status), LIKELY_CAUSES),
                worker.pid, status)
            self.workers[worker.slot] = worker   # so break_pool fails its tasks too
            self.break_pool(err)
            del self.workers[worker.slot]
            return
        # "replace": the running task fails; the tasks behind it run again elsewhere.
        if running is None:
            # Nothing was running (killed while idle): nobody to blame, but workers that
            # keep dying without running anything would be replaced forever.
            self.barren_deaths += 1
            if self.barren_deaths >= MAX_BARREN_DEATHS:
                self.workers[worker.slot] = worker
                self.break_pool(WorkerDiedError(
                    "%d worker processes in a row died before running any task (the last, pid "
                    "%d: %s). %s The pool is broken." % (self.barren_deaths, worker.pid,
                                                         describe_status(status), LIKELY_CAUSES),
                    worker.pid, status))
                del self.workers[worker.slot]
                return
        else:
            del worker.tasks[running_id]
            shared.running -= 1
            shared.failed += 1
            set_exception(running.future, WorkerDiedError(
                "The worker process (pid %d) running %s died: %s. %s The worker was replaced; "
                "other tasks are not affected." % (worker.pid, _describe(running),
                                                   describe_status(status), LIKELY_CAUSES),
                worker.pid, status))
        shared.running -= len(worker.tasks)
        shared.pending.extendleft(reversed(list(worker.tasks.values())))
        worker.tasks.clear()
        shared.replaced += 1
        self.spawn(worker.slot)

    def discard_control(self):
        """While closing: close worker channels the template still sends, so those
        workers see EOF and exit instead of waiting for the template's grace period."""
        while True:
            try:
                record = recv_record(self.control)
            except (BlockingIOError, OSError):
                return
            if record is None:
                return
            if record[4] is not None:
                os.close(record[4])

    def on_template_death(self):
        self.poller.unregister(self.control)
        status = None
        try:
            pid, status = os.waitpid(self.template_pid, 0)
        except ChildProcessError:
            pass
        self.break_pool(BrokenProcessPool(
            "the template process (pid %d) of this ForkExchangeExecutor died (%s); its "
            "workers died with it" % (self.template_pid, describe_status(status))))

    def break_pool(self, err):
        """Fail everything, now and later, with ``err``; kill the workers."""
        shared = self.shared
        if shared.broken is not None:
            return
        shared.broken = err
        for worker in self.workers.values():
            for item in worker.tasks.values():
                set_exception(item.future, broken_copy(err))
                shared.failed += 1
            shared.running -= len(worker.tasks)
            worker.tasks.clear()
        for item in self.in_hand:
            set_exception(item.future, broken_copy(err))
        self.in_hand = []
        _fail_queued(shared.pending, err)
        try:
            send_record(self.control, SIGNAL, signal.SIGKILL)
        except OSError:
            pass

    def kill_workers(self):
        shared = self.shared
        try:
            send_record(self.control, SIGNAL, shared.kill_signal)
        except OSError:
            pass
        self.break_pool(BrokenProcessPool(
            "the workers were stopped: %s" % (shared.kill_reason or "killed")))


def _fail_queued(pending, err):
    """Fail every queued item with a copy of ``err`` (cancelled ones stay cancelled)."""
    items = []
    while True:
        try:
            items.append(pending.popleft())
        except IndexError:
            break
    for item in _start_running(items):
        set_exception(item.future, broken_copy(err))


def _start_running(items):
    """The items whose futures move to RUNNING (cancelled ones are dropped and notified)."""
    started, cancelled = [], []
    if FAST:
        with transition_lock:
            for item in items:
                if item.started or item.future._state == PENDING:
                    item.future._state = RUNNING
                    item.started = True
                    started.append(item)
                else:
                    cancelled.append(item)
        for item in cancelled:
            item.future.set_running_or_notify_cancel()   # tells wait()/as_completed()
        return started
    for item in items:
        if item.started or item.future.set_running_or_notify_cancel():
            item.started = True
            started.append(item)
    return started


def _drain(fd):
    try:
        while len(os.read(fd, 4096)) == 4096:
            pass
    except (BlockingIOError, OSError):
        pass
