"""ForkExchangeExecutor: a drop-in ``ProcessPoolExecutor`` on forkexec's channels.

Data flow::

    caller threads              parent: exchange thread                 template          workers
    --------------              -----------------------                 --------          -------
    submit(fn, *a) --> pending --> dispatch: batch items --frame--> channel ------------> run batch
    (pickles the      (deque)      read results  <--frame-- channel <------------------- send results
     call, returns                 complete Futures
     a Future)   wake-up fd -->    poll (epoll: wake fd, control socket, worker channels)
                                   SPAWN / SIGNAL / EXIT --------------> control  --fork--> worker
                                   SPAWNED(+fd) / EXITED <-------------- control  <-reap--

``submit()`` pickles the call (a pickling error fails that future at once),
appends a work item to ``pending`` and writes one byte to the wake-up pipe only
if the exchange thread is asleep.

The exchange thread owns every channel. It sends idle workers batches sized
from the queue length and the measured task duration (tiny tasks go in bulk,
long ones one at a time), completes futures from the results, and handles
worker exits reported by the template: a worker that retired after
``max_tasks_per_child`` is replaced; one that died makes the pool broken
(``on_worker_death="break"``) or is replaced with only its running task failed
(``"replace"``).

The template is a single-threaded copy of the parent, forked by the thread
that first submitted; it forks every worker, so workers are never forked from
a multi-threaded process.
"""

import atexit
import collections
import errno
import itertools
import mmap
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
import types
import weakref
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool

from . import _fork
from concurrent.futures._base import PENDING, RUNNING

from ._future import FastFuture, transition_lock, usable as _fast_futures_usable
from ._template import (EXIT, EXITED, SIGNAL, SPAWN, SPAWN_FAILED, SPAWNED, recv_record,
                        send_record, template_main)
from ._worker import CALL, CHUNK, IDLE, INIT_FAILED, RESULTS, load_libc
from .channel import Channel
from .cpus import usable_cpus
from .errors import ChannelBroken, RemoteFailure, WorkerDiedError, describe_status
from .exchange import Poller
from .wire import OUT_OF_BAND_MIN, encode

#: Aim for batches that take about this long to run.
TARGET_BATCH_SECONDS = 0.005
MAX_BATCH = 4096
#: How many functions' durations are remembered.
COST_TABLE_SIZE = 1024
#: map(chunksize=1) groups items of functions known to run faster than this...
AUTO_CHUNK_BELOW = 0.0005
#: ...into chunks of about this many seconds.
AUTO_CHUNK_SECONDS = 0.002
#: Measured seconds per call, by _cost_key (written by exchange threads, read by map).
_costs = {}
#: Stop adding items to a batch past this many bytes of pickled calls.
MAX_BATCH_BYTES = 1 << 22
#: Tasks shorter than this get a second batch queued behind the running one.
PIPELINE_BELOW = 0.002
#: How long shutdown waits for the template to exit before killing it.
TEMPLATE_EXIT_TIMEOUT = 15.0
POLICIES = ("break", "replace")
#: Futures handed to users: FastFuture where this Python's Future has the fields it expects.
_FAST = _fast_futures_usable()
_FutureType = FastFuture if _FAST else Future
#: Pickled plain functions, keyed by the function (they pickle by name, so bytes never change).
_fn_pickles = {}
FN_CACHE_SIZE = 512
_BY_NAME = (types.FunctionType, types.BuiltinFunctionType)

_LIKELY_CAUSES = ("Likely causes: the OOM killer (see dmesg), a segmentation fault in native "
                  "code, os._exit() in a task, or a signal sent from outside.")


class ExecutorStatistics:
    """A frozen snapshot of an executor's state."""

    __slots__ = ("workers_alive", "queued", "running", "completed", "failed", "workers_replaced")

    def __init__(self, **fields):
        for name in self.__slots__:
            object.__setattr__(self, name, fields[name])

    def __setattr__(self, name, value):
        raise AttributeError("ExecutorStatistics is a frozen snapshot")

    def __eq__(self, other):
        return isinstance(other, ExecutorStatistics) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self):
        return "ExecutorStatistics(%s)" % ", ".join(
            "%s=%r" % (n, getattr(self, n)) for n in self.__slots__)


class _WorkItem:
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


class _WorkerConfig:
    """What the template needs to make workers (travels by fork, never pickled)."""

    def __init__(self, marks, initializer, initargs, max_tasks_per_child):
        self.marks = marks
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks_per_child = max_tasks_per_child
        self.template_pid = 0


class _Shared:
    """State shared by the caller's side and the exchange thread.

    The pending deque and the flags are only appended/set (atomic under the GIL);
    nothing here needs a lock. The exchange thread alone touches channels.
    """

    def __init__(self, owner_pid):
        self.owner_pid = owner_pid
        self.pending = collections.deque()
        self.sleeping = False       # the thread is (about to be) blocked in poll
        self.shutdown = False       # no new work; finish what is queued and stop
        self.kill_signal = None     # terminate_workers/kill_workers/Ctrl-C: signal to send
        self.kill_reason = None
        self.broken = None          # the error that broke the pool
        self.closed = False         # the exchange thread has finished cleaning up
        self.thread = None
        self.wake_r = self.wake_w = -1
        self.completed = self.failed = self.replaced = self.running = self.alive = 0
        _fork.own(self)

    def _after_fork_in_child(self):
        # A forked child must never write to the parent's wake-up pipe.
        self.wake_w = self.wake_r = -1

    def wake(self):
        try:
            os.write(self.wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass


_live = weakref.WeakSet()   # _Shared of executors whose exchange thread runs


class ForkExchangeExecutor(Executor):
    """An ``Executor`` running calls in forked worker processes.

    Same arguments as ``ProcessPoolExecutor``; ``mp_context`` may only be
    ``None`` or a fork context. ``on_worker_death`` is ``"break"`` (like the
    standard executor: a dead worker breaks the pool) or ``"replace"`` (only the
    task that worker was running fails; a new worker takes its place).
    """

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *,
                 max_tasks_per_child=None, on_worker_death="break"):
        if max_workers is None:
            max_workers = usable_cpus()
        elif not isinstance(max_workers, int) or isinstance(max_workers, bool):
            raise TypeError("max_workers must be an integer, not %r" % (max_workers,))
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if mp_context is not None:
            method = getattr(mp_context, "get_start_method", lambda: None)()
            if method != "fork":
                raise ValueError(
                    "ForkExchangeExecutor always forks its workers: mp_context must be None "
                    "or a 'fork' context, not %r" % (method or mp_context,))
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or isinstance(max_tasks_per_child, bool):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if on_worker_death not in POLICIES:
            raise ValueError("on_worker_death must be 'break' or 'replace', not %r"
                             % (on_worker_death,))
        _check_fd_budget(max_workers)
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_tasks_per_child = max_tasks_per_child
        self._policy = on_worker_death
        self._shared = _Shared(os.getpid())
        self._start_lock = threading.Lock()   # guards the one-time start of template and thread
        self._ids = itertools.count()
        self._shutdown_requested = False

    # -- starting --------------------------------------------------------------
    def _check_usable(self):
        shared = self._shared
        if shared.owner_pid != os.getpid():
            raise RuntimeError(
                "this ForkExchangeExecutor belongs to process %d and cannot be used in process "
                "%d (a forked child); create a new executor in the child" % (shared.owner_pid,
                                                                             os.getpid()))
        if shared.broken is not None:
            raise _broken_copy(shared.broken)
        if self._shutdown_requested or shared.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _ensure_started(self):
        with self._start_lock:
            shared = self._shared
            if shared.thread is not None:
                return
            if self._shutdown_requested:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if sys.is_finalizing():
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            loop = _ExchangeLoop(shared, self._max_workers, self._policy,
                                 self._max_tasks_per_child)
            loop.start_template(_WorkerConfig(loop.marks, self._initializer, self._initargs,
                                              self._max_tasks_per_child))
            thread = threading.Thread(target=loop.run, name="forkexec-exchange", daemon=True)
            shared.thread = thread
            _live.add(shared)
            thread.start()
            weakref.finalize(self, _executor_collected, shared).atexit = False

    # -- the Executor API ------------------------------------------------------------
    def submit(self, fn, /, *args, **kwargs):
        """Schedule ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``."""
        self._check_usable()
        if self._shared.thread is None:
            self._ensure_started()
        future = _FutureType()
        try:
            blob = pickle.dumps((_pickled_fn(fn), args, kwargs), protocol=5)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: B902 - reported through the future
            future.set_exception(_pickling_error(fn, args, kwargs, exc))
            return future
        self._enqueue(_WorkItem(future, next(self._ids), CALL, blob, fn))
        return future

    def _enqueue(self, item):
        shared = self._shared
        shared.pending.append(item)
        if shared.sleeping:
            shared.wake()
        if shared.closed or shared.broken is not None:
            # The thread may have drained the queue before our append: fail it here.
            try:
                shared.pending.remove(item)
            except ValueError:
                return
            if shared.broken is not None:
                raise _broken_copy(shared.broken)
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _submit_chunk(self, fn, chunk):
        future = _FutureType()
        try:
            blob = pickle.dumps((_pickled_fn(fn), chunk), protocol=5)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: B902
            # Find the item that does not pickle, so only it fails.
            outcomes = []
            for args in chunk:
                try:
                    pickle.dumps((fn, args), protocol=5)
                except BaseException as item_exc:  # noqa: B902
                    outcomes.append((False, RemoteFailure(
                        _pickling_error(fn, args, {}, item_exc), "")))
                else:
                    outcomes.append(None)
            if all(o is not None for o in outcomes) or len(chunk) == 1:
                future.set_exception(_pickling_error(fn, chunk[0] if len(chunk) == 1 else (),
                                                     {}, exc))
                return future
            return self._submit_partial_chunk(fn, chunk, outcomes)
        self._enqueue(_WorkItem(future, next(self._ids), CHUNK, blob, fn, len(chunk)))
        return future

    def _submit_partial_chunk(self, fn, chunk, outcomes):
        """A chunk where some items do not pickle: run the others, fail those in place."""
        good = [args for args, o in zip(chunk, outcomes) if o is None]
        inner = self._submit_chunk(fn, good) if good else None
        future = Future()

        def merge(done):
            try:
                results = iter(done.result())
            except BaseException as exc:  # noqa: B902
                future.set_exception(exc)
                return
            future.set_result([o if o is not None else next(results) for o in outcomes])

        if inner is None:
            future.set_result(outcomes)
        else:
            future.set_running_or_notify_cancel()
            inner.add_done_callback(merge)
        return future

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None):
        """Like ``ProcessPoolExecutor.map``: ordered results, an exception at its item.

        ``buffersize`` bounds how many chunks are submitted ahead of the consumer.
        """
        if buffersize is not None:
            if not isinstance(buffersize, int) or isinstance(buffersize, bool):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        self._check_usable()
        if self._shared.thread is None:
            self._ensure_started()
        args = zip(*iterables)
        if chunksize == 1 and buffersize is None:
            args = list(args)
            chunksize = self._auto_chunksize(fn, len(args))
        if chunksize == 1:
            items = args

            def submit_next(item):
                return self.submit(fn, *item)
        else:
            items = _chunked(args, chunksize)

            def submit_next(chunk):
                return self._submit_chunk(fn, chunk)

        if buffersize is None:
            futures = collections.deque(map(submit_next, items))
            items = None
        else:
            items = iter(items)
            futures = collections.deque(map(submit_next, itertools.islice(items, buffersize)))
        return _map_results(futures, items, submit_next, end_time, chunksize > 1,
                            weakref.ref(self))

    def _auto_chunksize(self, fn, count):
        """Group a map's items when ``fn`` is known to be tiny: results, their order and
        per-item exceptions are unchanged, the cost per item falls many times."""
        if self._max_tasks_per_child is not None:
            return 1   # a chunk counts as one task: grouping would stretch the limit
        cost = _costs.get(_cost_key(fn))
        if cost is None or cost >= AUTO_CHUNK_BELOW:
            return 1
        per_chunk = int(AUTO_CHUNK_SECONDS / max(cost, 1e-7))
        spread = count // (4 * self._max_workers)
        return max(1, min(per_chunk, spread, MAX_BATCH))

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop accepting work; with ``wait``, return once everything has finished
        and every process of this executor has exited."""
        shared = self._shared
        if shared.owner_pid != os.getpid():
            return  # a forked child owns nothing of ours (its copies were closed at fork)
        self._shutdown_requested = True
        if cancel_futures:
            _cancel_pending(shared)
        shared.shutdown = True
        shared.wake()
        if wait:
            _join(shared)

    def __exit__(self, exc_type, exc_val, exc_tb):
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._kill(signal.SIGKILL, "the executor was interrupted (KeyboardInterrupt)")
            return False
        self.shutdown(wait=True)
        return False

    def terminate_workers(self):
        """Send SIGTERM to every worker, cancel pending work and shut down (Python 3.14 API)."""
        self._kill(signal.SIGTERM, "terminate_workers() was called")

    def kill_workers(self):
        """Send SIGKILL to every worker, cancel pending work and shut down (Python 3.14 API)."""
        self._kill(signal.SIGKILL, "kill_workers() was called")

    def _kill(self, signum, reason):
        shared = self._shared
        if shared.owner_pid != os.getpid():
            return
        self._shutdown_requested = True
        _kill_shared(shared, signum, reason)

    def statistics(self):
        """A frozen :class:`ExecutorStatistics` snapshot."""
        shared = self._shared
        return ExecutorStatistics(
            workers_alive=shared.alive, queued=len(shared.pending), running=shared.running,
            completed=shared.completed, failed=shared.failed,
            workers_replaced=shared.replaced)

    def __repr__(self):
        shared = self._shared
        state = ("broken" if shared.broken is not None else "shut down" if shared.shutdown
                 else "running" if shared.thread is not None else "idle")
        return "<ForkExchangeExecutor max_workers=%d %s>" % (self._max_workers, state)


#: Descriptors the parent needs besides one per worker: wake-up pipe, control socket,
#: epoll, and room for the template's fork and a worker being replaced.
FIXED_FDS = 8


def _check_fd_budget(workers):
    """Refuse at once, rather than half-build a pool, if the fd limit is too low."""
    try:
        import resource
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
    except (ImportError, OSError):
        return
    if soft == resource.RLIM_INFINITY:
        return
    needed = workers + FIXED_FDS
    if in_use + needed > soft:
        raise OSError(
            errno.EMFILE,
            "ForkExchangeExecutor(max_workers=%d) needs about %d more file descriptors, but only "
            "%d of the RLIMIT_NOFILE soft limit of %d are free; raise the limit (ulimit -n) or "
            "use fewer workers" % (workers, needed, max(0, soft - in_use), soft))


def _kill_shared(shared, signum, reason):
    shared.kill_reason = reason
    shared.kill_signal = signum
    _cancel_pending(shared)
    shared.shutdown = True
    shared.wake()
    _join(shared)


def _join(shared):
    """Wait for the exchange thread; a Ctrl-C while waiting kills the workers instead."""
    thread = shared.thread
    if thread is None or thread is threading.current_thread():
        return
    try:
        while thread.is_alive():
            thread.join(0.25)
    except KeyboardInterrupt:
        shared.kill_reason = "the executor was interrupted (KeyboardInterrupt)"
        shared.kill_signal = signal.SIGKILL
        _cancel_pending(shared)
        shared.wake()
        thread.join(TEMPLATE_EXIT_TIMEOUT)
        raise


def _cancel_pending(shared):
    pending = shared.pending
    while True:
        try:
            item = pending.popleft()
        except IndexError:
            return
        if not item.future.cancel():   # a requeued, already running item
            _set_exception(item.future, CancelledError())


def _executor_collected(shared):
    """The executor was garbage-collected without shutdown: finish the work, then stop."""
    if shared.owner_pid == os.getpid():
        shared.shutdown = True
        shared.wake()


@atexit.register
def _at_exit():
    """Interpreter exit: finish outstanding work, or kill it after a KeyboardInterrupt."""
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    for shared in list(_live):
        if shared.owner_pid != os.getpid() or shared.closed:
            continue
        try:
            if interrupted:
                _kill_shared(shared, signal.SIGKILL, "the program was interrupted")
            else:
                shared.shutdown = True
                shared.wake()
                _join(shared)
        except KeyboardInterrupt:
            pass


def _chunked(iterable, size):
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _map_results(futures, chunks, submit_next, end_time, chunked, executor_ref):
    """The generator behind map(); it cancels what is left when closed or dropped."""
    try:
        while futures:
            future = futures.popleft()
            if chunks is not None:
                executor = executor_ref()
                nxt = next(chunks, None) if executor is not None else None
                if nxt is not None:
                    futures.append(submit_next(nxt))
                del executor
            if end_time is None:
                value = future.result()
            else:
                value = future.result(end_time - time.monotonic())
            if not chunked:
                yield value
                continue
            for ok, item in value:
                if not ok:
                    raise item.exception()
                yield item
    finally:
        for future in futures:
            future.cancel()


def _pickled_fn(fn):
    """``(pickle, shareable)`` of a task's function. Plain functions pickle by name: their
    bytes are cached here, and the worker may keep one unpickled copy for all tasks."""
    if type(fn) in _BY_NAME:
        blob = _fn_pickles.get(fn)
        if blob is None:
            if len(_fn_pickles) >= FN_CACHE_SIZE:
                _fn_pickles.clear()
            blob = _fn_pickles[fn] = pickle.dumps(fn, protocol=5)
        return blob, True
    return pickle.dumps(fn, protocol=5), False


def _cost_key(fn):
    """Which tasks share a duration estimate: the same plain function, or the same kind
    of callable (per-call partials or bound methods must not grow the table)."""
    if type(fn) in _BY_NAME:
        return fn
    inner = getattr(fn, "func", None) or getattr(fn, "__func__", None)
    return (type(fn), inner if type(inner) in _BY_NAME else None)


def _finish(future, result=None, exception=None):
    if _FAST:
        future.finish(result, exception)
    elif exception is None:
        _set_result(future, result)
    else:
        _set_exception(future, exception)


def _set_exception(future, exc):
    try:
        future.set_exception(exc)
    except Exception:  # already finished (InvalidStateError)
        pass


def _set_result(future, value):
    try:
        future.set_result(value)
    except Exception:  # already finished (InvalidStateError)
        pass


def _broken_copy(err):
    """A fresh exception like ``err`` to raise (raising one instance twice chains tracebacks)."""
    copy = type(err)(str(err), getattr(err, "pid", 0), getattr(err, "status", None)) \
        if isinstance(err, WorkerDiedError) else BrokenProcessPool(str(err))
    copy.__cause__ = err.__cause__
    return copy


def _pickling_error(fn, args, kwargs, exc):
    """A PicklingError that names the part of a call that could not be pickled."""
    what = "the call"
    for label, obj in itertools.chain(
            [("the function %r" % (fn,), fn)],
            (("argument %d (a %s)" % (i, type(a).__qualname__), a) for i, a in enumerate(args)),
            (("keyword argument %r (a %s)" % (k, type(v).__qualname__), v)
             for k, v in kwargs.items())):
        try:
            pickle.dumps(obj, protocol=5)
        except BaseException:  # noqa: B902
            what = label
            break
    err = pickle.PicklingError("cannot pickle %s for the worker: %s: %s"
                               % (what, type(exc).__name__, exc))
    err.__cause__ = exc
    return err


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
        self.tasks = {}                       # task_id -> _WorkItem, in dispatch order
        self.batch_sizes = collections.deque()  # sizes of batches not fully answered
        self.budget = budget                  # tasks left before it retires, or None
        self.retiring = False                 # it will exit (budget spent, or shutdown)
        self.status = None                    # raw wait status, once reported
        self.writing = False                  # registered for EVENT_WRITE
        self.expected = 0.0                   # estimated seconds of its outstanding tasks
        self.unknown = 0                      # outstanding tasks of unknown cost


class _ExchangeLoop:
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
        self.costs = _costs        # function key -> moving average of seconds per call
        self.control = None
        self.template_pid = 0
        self.in_hand = []          # items off the queue, not yet recorded with a worker

    # -- set-up and tear-down ---------------------------------------------------------
    def start_template(self, config):
        load_libc()
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _fork.settle_threads()
        try:
            pid = _fork.fork()
        except BaseException:
            parent_end.close()
            child_end.close()
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
            worker.channel.close()
        self.workers.clear()
        self.by_pid.clear()
        shared.alive = 0
        try:
            send_record(self.control, EXIT)
        except OSError:
            pass
        self.wait_template()
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
        while shared.pending:
            item = shared.pending.popleft()
            if error is not None:
                _set_exception(item.future, _broken_copy(error))
            elif not item.future.cancel():
                _set_exception(item.future, RuntimeError("cannot schedule new futures after "
                                                         "shutdown"))
        self.marks.release()
        self.marks_map.close()

    def wait_template(self):
        """Reap the template, reading the control socket meanwhile; kill it if it hangs."""
        deadline = time.monotonic() + TEMPLATE_EXIT_TIMEOUT
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(self.template_pid)
                poller.register(pidfd, select.POLLIN)
            except OSError:
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
                poller.poll(100 if pidfd is not None else 2)
        finally:
            if pidfd is not None:
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
        cost = self.costs.get(_cost_key(item.fn))
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
            limit = min(MAX_BATCH, -(-len(pending) // len(ready)))
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
        costs = self.costs
        for task_id, ok, blob, elapsed in results:
            item = tasks.pop(task_id, None)
            if item is None:
                continue
            shared.running -= 1
            if item.estimate is None:
                worker.unknown -= 1
            else:
                worker.expected -= item.estimate
            key = _cost_key(item.fn)
            cost = costs.get(key)
            per_call = elapsed / item.count
            if cost is None and len(costs) >= COST_TABLE_SIZE:
                costs.clear()
            costs[key] = per_call if cost is None else 0.7 * cost + 0.3 * per_call
            try:
                value = pickle.loads(blob)
            except BaseException as exc:  # noqa: B902 - only this task is lost
                err = pickle.UnpicklingError(
                    "cannot unpickle the result of %s: %s: %s"
                    % (_describe(item), type(exc).__name__, exc))
                err.__cause__ = exc
                shared.failed += 1
                _set_exception(item.future, err)
                continue
            if ok:
                shared.completed += 1
                _finish(item.future, value)
            else:
                shared.failed += 1
                _finish(item.future, None, value.exception())
        if not tasks:
            worker.expected = 0.0   # no drift from float sums
        if batch_done and worker.batch_sizes:
            worker.batch_sizes.popleft()

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
                    "could not fork a worker process: %s" % os.strerror(b)))

    def on_spawned(self, slot, pid, fd):
        self.spawning.discard(slot)
        sock = socket.socket(fileno=fd)
        channel = Channel(pid, sock, reapable=False)
        worker = _Worker(slot, pid, channel, self.max_tasks)
        self.marks[slot] = IDLE
        self.workers[slot] = worker
        self.by_pid[pid] = worker
        self.shared.alive = len(self.workers)
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
        channel.close()
        del self.workers[worker.slot]
        del self.by_pid[worker.pid]
        shared.alive = len(self.workers)
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
                "the pool going)." % (worker.pid, what, describe_status(status), _LIKELY_CAUSES),
                worker.pid, status)
            self.workers[worker.slot] = worker   # so break_pool fails its tasks too
            self.break_pool(err)
            del self.workers[worker.slot]
            return
        # "replace": the running task fails; the tasks behind it run again elsewhere.
        if running is None and worker.tasks:
            running_id = next(iter(worker.tasks))
            running = worker.tasks[running_id]
        if running is not None:
            del worker.tasks[running_id]
            shared.running -= 1
            shared.failed += 1
            _set_exception(running.future, WorkerDiedError(
                "The worker process (pid %d) running %s died: %s. %s The worker was replaced; "
                "other tasks are not affected." % (worker.pid, _describe(running),
                                                   describe_status(status), _LIKELY_CAUSES),
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
                _set_exception(item.future, _broken_copy(err))
                shared.failed += 1
            shared.running -= len(worker.tasks)
            worker.tasks.clear()
        for item in self.in_hand:
            _set_exception(item.future, _broken_copy(err))
        self.in_hand = []
        while shared.pending:
            item = shared.pending.popleft()
            if item.started or item.future.set_running_or_notify_cancel():
                _set_exception(item.future, _broken_copy(err))
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


def _start_running(items):
    """The items whose futures move to RUNNING (cancelled ones are dropped and notified)."""
    started, cancelled = [], []
    if _FAST:
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
