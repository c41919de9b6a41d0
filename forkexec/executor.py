"""ForkExchangeExecutor: a drop-in ``ProcessPoolExecutor`` on forkexec's channels.

Data flow::

    caller threads              parent: exchange thread                 template          workers
    --------------              -----------------------                 --------          -------
    submit(fn, *a) --> pending --> dispatch: batch items --frame--> channel ------------> run batch
    (pickles the      (deque)      read results  <--frame-- channel <------------------- send results
     call, returns                 complete Futures
     a Future)   wake-up fd -->    poll (epoll: wake fd, control socket, worker channels)
                                   SPAWN / SIGNAL / KILL / EXIT -------> control  --fork--> worker
                                   SPAWNED(+fd) / EXITED <-------------- control  <-reap--

``submit()`` pickles the call (a pickling error fails that future at once),
appends a work item to ``pending`` and writes one byte to the wake-up pipe only
if the exchange thread is asleep.

The exchange thread owns every channel. It forks workers on demand (one per
queued task without an idle worker, up to ``max_workers``), sends them batches
sized from the queue length and each function's measured duration (tiny tasks
go in bulk, unknown or long ones one at a time), completes futures from the
results, and handles
worker exits reported by the template: a worker that retired after
``max_tasks_per_child`` is replaced; one that died makes the pool broken
(``on_worker_death="break"``) or is replaced with only its running task failed
(``"replace"``). Workers stopped on purpose (a task past its time limit,
``kill_task``, an idle worker, one past ``max_memory``) are handled by
:mod:`._task_control` and never break the pool.

The template is a single-threaded copy of the parent, forked by the thread
that first submitted; it forks every worker, so workers are never forked from
a multi-threaded process.
"""

import atexit
import collections
import errno
import functools
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import weakref
from concurrent.futures import Executor

from ._calls import call_blob, load_pickler, pickling_failed
from ._completion import FutureType, broken_copy, fail
from ._lifecycle import lifecycle_options
from ._loop import ExchangeLoop
from ._map_chunks import auto_chunksize, check_map_options, chunked, submit_chunk
from ._map_results import map_results
from ._protocol import Kind
from ._shared import Shared, WorkItem
from ._stats import statistics_fields
from ._stdlib_attrs import live_processes
from ._task_control import call_arguments, kill_task
from ._template_link import TEMPLATE_EXIT_TIMEOUT
from ._worker import WorkerConfig, run_chunk
from .cpus import usable_cpus
from .errors import check_timeout, describe_errno
from .progress import progress_file, track

POLICIES = ("break", "replace")
_POOL_DEFAULT = object()   # submit_task(timeout=...) not given: the pool's task_timeout


class ExecutorStatistics:
    """A frozen snapshot of an executor's state.

    Counts: ``workers_alive``, ``queued``, ``running``, ``completed``, ``failed``,
    ``workers_replaced``, ``tasks_timed_out``, ``tasks_killed`` (``kill_task``),
    ``workers_retired_idle``, ``workers_retired_memory``. Time, in seconds, summed over
    workers: ``busy_seconds`` (running tasks, measured in the workers),
    ``idle_seconds`` (alive, not running a task: waiting for work, or for the parent),
    ``starting_seconds`` (from asking for a worker to having it). ``functions``: a
    tuple of ``FunctionStatistics(name, calls, seconds, per_call)``, most time first.
    """

    __slots__ = ("workers_alive", "queued", "running", "completed", "failed", "workers_replaced",
                 "tasks_timed_out", "tasks_killed", "workers_retired_idle",
                 "workers_retired_memory", "busy_seconds", "idle_seconds", "starting_seconds",
                 "functions")
    _DEFAULTS = {"tasks_timed_out": 0, "tasks_killed": 0, "workers_retired_idle": 0,
                 "workers_retired_memory": 0, "busy_seconds": 0.0, "idle_seconds": 0.0,
                 "starting_seconds": 0.0, "functions": ()}

    def __init__(self, **fields):
        for name in self.__slots__:
            value = fields[name] if name in fields else self._DEFAULTS[name]
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("ExecutorStatistics is a frozen snapshot")

    def __eq__(self, other):
        return isinstance(other, ExecutorStatistics) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self):
        return hash(tuple(getattr(self, n) for n in self.__slots__))

    def __repr__(self):
        return "ExecutorStatistics(%s)" % ", ".join(
            "%s=%r" % (n, getattr(self, n)) for n in self.__slots__)


_live = weakref.WeakSet()   # Shared of executors whose exchange thread runs


def _handed_off(shared):
    """Let this caller thread send the queue to an idle worker itself while the exchange
    thread sleeps (one thread wake-up less per round trip). False: wake the thread."""
    lock = shared.loop_lock
    if not lock.acquire(blocking=False):
        return False
    try:
        hand_off = shared.hand_off
        return hand_off is not None and hand_off()
    finally:
        lock.release()


def _start_method(mp_context):
    """``(template_context, process_class, context)``: None to fork the template from this
    process (the fork start method), else the context that starts it as a fresh
    interpreter; ``context`` is the one given, or the default chosen."""
    if mp_context is None:
        # The program's explicit choice (set_start_method), else fork: our default.
        method = multiprocessing.get_start_method(allow_none=True) or "fork"
        mp_context = multiprocessing.get_context(method)
    get_method = getattr(mp_context, "get_start_method", None)
    if get_method is None:
        raise TypeError("mp_context must be a multiprocessing context, not %r" % (mp_context,))
    method = get_method()
    return (None if method == "fork" else mp_context), mp_context.Process, mp_context


class ForkExchangeExecutor(Executor):
    """An ``Executor`` running calls in worker processes forked from a template.

    Same arguments as ``ProcessPoolExecutor``. ``mp_context`` picks how the template
    starts: fork (the default) copies this process; spawn or forkserver start it as a
    fresh interpreter, like ``multiprocessing``; workers are forked from the template.
    ``on_worker_death`` is ``"break"`` (like the standard executor: a dead worker breaks
    the pool) or ``"replace"`` (only the task that worker was running fails; a new
    worker takes its place).
    """

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *,
                 max_tasks_per_child=None, on_worker_death="break", task_timeout=None,
                 pickler=None, finalizer=None, finalargs=(), idle_timeout=None,
                 max_memory=None):
        if max_workers is None:
            max_workers = usable_cpus()
        elif not isinstance(max_workers, int):
            raise TypeError("max_workers must be an integer, not %r" % (max_workers,))
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        # _mp_context, like the standard executor's: the context given, or the default
        # chosen (code reads it to make matching Queues, Events and Managers).
        self._template_context, self._process_class, self._mp_context = \
            _start_method(mp_context)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._task_timeout = check_timeout(task_timeout, "task_timeout")
        self._idle_timeout = check_timeout(idle_timeout, "idle_timeout")
        self._finalizer, self._finalargs, self._max_memory = lifecycle_options(
            finalizer, finalargs, max_memory)
        self._pickler = load_pickler(pickler)
        if on_worker_death not in POLICIES:
            raise ValueError("on_worker_death must be 'break' or 'replace', not %r"
                             % (on_worker_death,))
        _check_fd_budget(max_workers)
        self._max_workers = max_workers
        self._initializer = initializer
        try:
            self._initargs = tuple(initargs)
        except TypeError:
            raise TypeError("initargs must be an iterable of arguments for the initializer, "
                            "not %r" % (initargs,)) from None
        self._max_tasks_per_child = max_tasks_per_child
        self._policy = on_worker_death
        self._shared = Shared()
        self._new_id = itertools.count().__next__
        self._shutdown_requested = False

    # -- starting --------------------------------------------------------------------
    def _check_usable(self):
        shared = self._shared
        if not (shared.foreign or shared.shutdown or self._shutdown_requested
                or shared.broken is not None):
            return   # the common case, without a getpid() system call
        if shared.owner_pid != os.getpid():
            raise RuntimeError(
                "this ForkExchangeExecutor belongs to process %d and cannot be used in process "
                "%d (a forked child); create a new executor in the child" % (shared.owner_pid,
                                                                             os.getpid()))
        if shared.broken is not None:
            raise broken_copy(shared.broken)
        if self._shutdown_requested or shared.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _ensure_started(self):
        shared = self._shared
        with shared.start_lock:
            if shared.thread is not None:
                return
            if self._shutdown_requested:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if sys.is_finalizing():
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            _check_fd_budget(self._max_workers)   # the limit may have dropped since __init__
            loop = ExchangeLoop(shared, self._max_workers, self._policy,
                                self._max_tasks_per_child, self._template_context,
                                self._idle_timeout)
            shared.starting = True   # the template (a fork of us) must not adopt this pool
            try:
                loop.start(WorkerConfig(
                    self._initializer, self._initargs, self._max_tasks_per_child,
                    self._process_class, os.getpid(),
                    multiprocessing.current_process().name, self._finalizer,
                    self._finalargs, self._max_memory))
            except OSError as exc:   # no descriptor or process left: a later submit may retry
                shared.starting = shared.closed = False
                if "ForkExchangeExecutor" in str(exc):
                    raise
                raise OSError(exc.errno, "ForkExchangeExecutor could not start: %s"
                              % describe_errno(exc.errno or errno.EMFILE)) from exc
            except BaseException:
                shared.starting = shared.closed = False
                raise
            thread = threading.Thread(target=loop.run, name="forkexec-exchange", daemon=True)
            try:
                thread.start()
            except BaseException as exc:
                loop.cleanup(abandon=True)
                shared.closed = shared.starting = False   # a later submit may try again
                raise RuntimeError("ForkExchangeExecutor could not start its exchange thread: "
                                   "%s" % exc) from exc
            shared.thread = thread
            _live.add(shared)
            weakref.finalize(self, _executor_collected, shared).atexit = False

    # -- the Executor API ------------------------------------------------------------
    def submit(self, fn, /, *args, **kwargs):
        """Schedule ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``."""
        return self._submit_call(fn, args, kwargs, self._task_timeout)

    def submit_task(self, fn, /, args=(), kwargs=None, *, timeout=_POOL_DEFAULT):
        """Schedule ``fn(*args, **kwargs)`` with its own limit of ``timeout`` seconds of
        running (None: none; default: the pool's ``task_timeout``); past it, its worker is
        killed and replaced and the future raises :class:`TaskTimeout`. The task's own
        keyword arguments go in ``kwargs``, so none can collide with ``timeout``."""
        args, kwargs = call_arguments(fn, args, kwargs)
        timeout = self._task_timeout if timeout is _POOL_DEFAULT else \
            check_timeout(timeout, "timeout")
        return self._submit_call(fn, args, kwargs, timeout)

    def _submit_call(self, fn, args, kwargs, timeout):
        self._check_usable()
        if self._shared.thread is None:
            self._ensure_started()
        future = FutureType()
        try:
            blob = call_blob(fn, args, kwargs, self._pickler)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: B902 - reported through the future
            future.set_exception(pickling_failed(fn, args, kwargs, exc, self._pickler))
            return future
        self._enqueue(WorkItem(future, self._new_id(), Kind.CALL, blob, fn, 1, timeout))
        return future

    def kill_task(self, future):
        """Stop the task behind ``future``: running, its worker is killed (and replaced);
        running or queued, the future is cancelled. True if this call cancelled it, False
        if it had finished or is not this executor's. ``Future.cancel()`` is unchanged."""
        return kill_task(self._shared, future)

    def _enqueue(self, item):
        shared = self._shared
        shared.pending.append(item)
        if shared.sleeping and not _handed_off(shared):
            shared.wake()
        if shared.closed or shared.broken is not None:
            # The thread may have drained the queue before our append and is gone: take
            # our own item back (if the thread's last sweep did not settle it already).
            try:
                shared.pending.remove(item)
            except ValueError:
                return
            if shared.broken is None:
                raise RuntimeError("cannot schedule new futures after shutdown")
            # It broke after this call began: its future says so, as the stdlib's would.
            fail([item], shared.broken)

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None, progress=None,
            task_timeout=_POOL_DEFAULT):
        """Like ``ProcessPoolExecutor.map``: ordered results, an exception at its item.

        ``buffersize`` bounds how many chunks are submitted ahead of the consumer.
        ``progress``: a bar counting items (see :mod:`forkexec.progress`). ``task_timeout``:
        each call's limit (each chunk's if ``chunksize`` > 1), by default the pool's.
        """
        bar_file = progress_file(progress)
        per_call = task_timeout is not _POOL_DEFAULT
        task_timeout = check_timeout(task_timeout, "task_timeout") if per_call else \
            self._task_timeout
        total = _known_length(iterables) if bar_file is not None else None
        end_time = check_map_options(timeout, chunksize, buffersize)
        star = len(iterables) != 1   # one iterable: items go as they are, not as 1-tuples
        args = zip(*iterables) if star else iter(iterables[0])
        via_submit = self._submit_is_replaced()
        separate = False
        if chunksize == 1 and buffersize is None and not via_submit:
            args = list(args)
            total = len(args)
            chunksize = 1 if self._max_tasks_per_child is not None or \
                task_timeout is not None else auto_chunksize(
                    self._shared.costs, fn, len(args), self._max_workers)   # a chunk is a task
            separate = chunksize > 1
        if chunksize == 1:
            items = args

            def submit_next(item):
                if per_call:   # its own limit: not through submit
                    return self._submit_call(fn, tuple(item) if star else (item,), {},
                                             task_timeout)
                return self.submit(fn, *item) if star else self.submit(fn, item)
        else:
            items = chunked(args, chunksize)
            if via_submit:   # tools that wrap submit (progress bars) see every chunk
                chunk_fn = functools.partial(run_chunk, fn, star)

                def submit_next(chunk):
                    return self.submit(chunk_fn, chunk)
            else:
                def submit_next(chunk):
                    self._check_usable()   # as submit() does: map over nothing never raises
                    if self._shared.thread is None:
                        self._ensure_started()
                    return submit_chunk(self._enqueue, self._new_id, fn, chunk, star, separate,
                                        task_timeout, self._pickler)

        if buffersize is None:
            futures = collections.deque(map(submit_next, items))
            items = None
        else:
            items = iter(items)
            futures = collections.deque(map(submit_next, itertools.islice(items, buffersize)))
        results = map_results(futures, items, submit_next, end_time, chunksize > 1,
                              weakref.ref(self))
        if bar_file is None:
            return results
        return track(results, total=total, progress=bar_file, desc=_fn_name(fn))

    def _submit_is_replaced(self):
        """True when ``submit`` was overridden in a subclass or replaced on the instance
        (map then goes through it, like the standard library's map)."""
        return "submit" in self.__dict__ or \
            type(self).submit is not ForkExchangeExecutor.submit

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop accepting work; with ``wait``, return once everything has finished
        and every process of this executor has exited."""
        shared = self._shared
        if shared.owner_pid != os.getpid():
            return  # a forked child owns nothing of ours (its copies were closed at fork)
        self._shutdown_requested = True
        if cancel_futures:
            # Cancelled now, as the caller expects; the exchange thread removes them from
            # the queue and tells their waiters.
            for item in list(shared.pending):
                item.future.cancel()
            shared.cancel_requested = True
            if not wait:
                shared.kill_on_exit = True   # the program said it will not wait
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
        """Send SIGTERM to every worker, cancel pending work and shut down (Python 3.14
        API). Workers still alive ``TERMINATE_GRACE`` seconds later are killed; returns
        once every process of this executor is gone."""
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
            workers_alive=len(shared.worker_pids), queued=len(shared.pending),
            running=shared.running,
            completed=shared.completed, failed=shared.failed,
            workers_replaced=shared.replaced, **statistics_fields(shared.times))

    @property
    def _processes(self):
        """``{pid: handle}`` of the live workers, like ``ProcessPoolExecutor._processes``
        (test suites reach for it): see :func:`forkexec._stdlib_attrs.live_processes`."""
        return live_processes(self._shared, self._max_workers)

    # -- more of ProcessPoolExecutor's private attributes that other code reads ------------
    @property
    def _executor_manager_thread(self):
        """The thread that runs the pool (None before the first submit), like the standard
        executor's: it ends once the pool has shut down and every worker is gone."""
        return self._shared.thread

    @property
    def _broken(self):
        """False, or the message of the error that broke the pool (like the standard
        executor's ``_broken``)."""
        broken = self._shared.broken
        return False if broken is None else (str(broken) or type(broken).__name__)

    def __repr__(self):
        shared = self._shared
        state = ("broken" if shared.broken is not None else "shut down" if shared.shutdown
                 else "running" if shared.thread is not None else "idle")
        return "<ForkExchangeExecutor max_workers=%d %s>" % (self._max_workers, state)


#: Descriptors the parent needs besides one per worker: wake-up pipe, control socket,
#: epoll, and room for the template's fork and a worker being replaced.
FIXED_FDS = 8


def _known_length(iterables):
    """How many items map will yield, if its iterables say (else None)."""
    try:
        return min(len(it) for it in iterables)
    except (TypeError, ValueError):
        return None


def _fn_name(fn):
    return getattr(fn, "__qualname__", None) or type(fn).__name__


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
        shared.wake()
        thread.join(TEMPLATE_EXIT_TIMEOUT)
        raise


def _executor_collected(shared):
    """The executor was garbage-collected without shutdown: finish the work, then stop."""
    if shared.owner_pid == os.getpid():
        shared.shutdown = True
        shared.wake()


def _at_exit():
    """Interpreter exit: finish outstanding work, or kill it after a KeyboardInterrupt or
    once the program said it would not wait (``shutdown(wait=False, cancel_futures=True)``)."""
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    for shared in list(_live):
        if shared.owner_pid != os.getpid() or shared.closed:
            continue
        try:
            if interrupted:
                _kill_shared(shared, signal.SIGKILL, "the program was interrupted")
            elif shared.kill_on_exit:
                _kill_shared(shared, signal.SIGKILL, "the program exited after "
                             "shutdown(wait=False, cancel_futures=True)")
            else:
                shared.shutdown = True
                shared.wake()
                _join(shared)
        except KeyboardInterrupt:
            pass


# Like the standard executor: drained when the main thread ends, before atexit handlers
# the program registered later (they may rely on the work being done).
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_at_exit)
else:   # pragma: no cover - Python < 3.9
    atexit.register(_at_exit)
