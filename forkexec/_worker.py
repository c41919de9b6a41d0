"""The worker process: a ``multiprocessing`` child that runs batches of tasks.

A worker is forked by the template and then starts the way a ``multiprocessing``
child does (``BaseProcess._bootstrap``): the after-fork hooks that
``multiprocessing`` objects registered run (a ``multiprocessing.Queue`` gets its
own feeder thread, a manager proxy its own connection), ``current_process()`` is
the worker and ``parent_process()`` the program, stdin is ``/dev/null``, and the
worker's finalizers run when it exits. Tools that hook ``_bootstrap``
(coverage.py's subprocess measurement) see workers like any other child.

Each worker leads its own process group, which the template kills when the
worker exits, so nothing a task started outlives its worker unless it asked to
(a new session). See :mod:`forkexec._protocol` for the messages.
"""

import atexit
import os
import pickle
import signal
import time
import traceback

from multiprocessing import util as mp_util

from . import _fork, _lifecycle
from ._protocol import (MARKS_PER_SLOT, InitFailed, Kind, Results, Retiring, Status,
                        WorkerError, from_wire, started_at_index, to_wire)
from .channel import Channel
from .errors import ChannelBroken, RemoteFailure, add_note
from .wire import OUT_OF_BAND_MIN

#: Results of these exact types cannot fail to unpickle: they skip their own pickle.
INLINE = frozenset((int, float, bool, type(None), complex, str, bytes))
SIZED = frozenset((str, bytes))
INLINE_MAX = 1 << 12
#: Finished tasks' results are sent once this long has passed since the last send, so
#: the results of any task longer than this travel back as it finishes.
FLUSH_EVERY = 0.001
PR_SET_PDEATHSIG = 1
#: With a memory ceiling, the worker's size is read at most this often (between tasks).
MEMORY_CHECK_EVERY = 0.005

_libc = None


def load_libc():
    """Load libc once, before the template is forked (importing ctypes in a fresh fork
    costs ~10 ms of copy-on-write faults), so each worker's prctl costs nothing."""
    global _libc
    if _libc is not None:
        return
    try:
        import ctypes
        _libc = ctypes.CDLL(None)
        _libc.prctl   # looked up (and cached) once here, not in every fresh worker
    except (ImportError, OSError, AttributeError):
        _libc = None


def die_with_parent(parent_pid):
    """Ask the kernel to SIGKILL us when the template (a single-threaded process) dies."""
    try:
        _libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    except AttributeError:  # no libc or no prctl (not Linux): EOF from the parent still ends us
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _dump_failure(exc):
    return pickle.dumps(RemoteFailure.capture(exc), protocol=5)


def _dump_result(value, what):
    """``(status, blob)``: the pickled value, or the pickling error (its own type, with a
    note) as the task's failure."""
    try:
        return Status.OK, pickle.dumps(value, protocol=5)
    except BaseException as exc:  # noqa: B902 - even KeyboardInterrupt: it is the task's
        add_note(exc, "forkexec: raised while pickling the result of %s (a %s object) in the "
                      "worker" % (what, type(value).__qualname__))
        return Status.FAILED, _dump_failure(exc)


_functions = {}   # pickled plain function -> the function (they pickle by name)
FUNCTION_CACHE_SIZE = 512


def _function(pickled):
    blob, shareable = pickled
    if not shareable:
        return pickle.loads(blob)
    fn = _functions.get(blob)
    if fn is None:
        if len(_functions) >= FUNCTION_CACHE_SIZE:
            _functions.clear()
        fn = _functions[blob] = pickle.loads(blob)
    return fn


LATE_MAIN = ("the function (or an object of the call) was defined in __main__ after this "
             "executor started: its workers are copies of the program as it was at the first "
             "submit() or map(), and have no such name. Define it before the executor's "
             "first use, or in a module, or send it by value with "
             "ForkExchangeExecutor(pickler='cloudpickle')")


def _unpickling_failed(exc):
    if type(exc) is AttributeError and "__main__" in str(exc):
        # Still an AttributeError (code written for the standard executor may catch it),
        # but one that says why, also where notes are not shown (before Python 3.11).
        exc = AttributeError("%s: %s" % (exc, LATE_MAIN))
    add_note(exc, "forkexec: raised while unpickling the task in worker process %d"
             % os.getpid())
    return Status.FAILED, _dump_failure(exc)


def _name(fn):
    return getattr(fn, "__qualname__", None) or repr(fn)


def _run_call(blob):
    try:
        pickled_fn, args, kwargs = pickle.loads(blob)
        fn = _function(pickled_fn)
    except BaseException as exc:  # noqa: B902
        return _unpickling_failed(exc)
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: B902 - SystemExit/KeyboardInterrupt fail their task only
        return Status.FAILED, _dump_failure(exc)
    if type(value) in INLINE and (type(value) not in SIZED or len(value) < INLINE_MAX):
        return Status.INLINE_OK, value
    return _dump_result(value, _name(fn))


def _run_chunk(blob):
    """A map chunk: ``(values, {index: failure}, pickled)``, so an exception is raised at
    its item. With ``separate`` items, each value is pickled on its own (``pickled``) unless
    all are of immutable builtin types, so results never share objects either."""
    try:
        pickled_fn, star, separate, chunk = pickle.loads(blob)
        fn = _function(pickled_fn)
    except BaseException as exc:  # noqa: B902
        return _unpickling_failed(exc)
    values, failures = [], {}
    for item in chunk:
        try:
            if separate:
                item = pickle.loads(item)
            values.append(fn(*item) if star else fn(item))
        except BaseException as exc:  # noqa: B902
            failures[len(values)] = RemoteFailure.capture(exc)
            values.append(None)
    what = _name(fn)
    if separate and not all(type(v) in INLINE for v in values):
        for i, value in enumerate(values):
            if i not in failures:
                status, values[i] = _dump_result(value, "%s (item %d of the chunk)" % (what, i))
                if status == Status.FAILED:
                    failures[i] = pickle.loads(values[i])
                    values[i] = None
        return _dump_result((values, failures, True), what)
    status, out = _dump_result((values, failures, False), what)
    if status == Status.OK:
        return status, out
    # Some value does not pickle: find it and fail that item alone.
    for i, value in enumerate(values):
        if i not in failures:
            status, item_blob = _dump_result(value, "%s (item %d of the chunk)" % (what, i))
            if status == Status.FAILED:
                failures[i] = pickle.loads(item_blob)
                values[i] = None
    return _dump_result((values, failures, False), what)


RUNNERS = {Kind.CALL: _run_call, Kind.CHUNK: _run_chunk}


def run_chunk(fn, star, chunk):
    """A map chunk sent through a replaced ``submit``: ``(values, failures, False)``."""
    values, failures = [], {}
    for item in chunk:
        try:
            values.append(fn(*item) if star else fn(item))
        except BaseException as exc:  # noqa: B902
            failures[len(values)] = RemoteFailure.capture(exc)
            values.append(None)
    return values, failures, False


class WorkerConfig:
    """What a worker needs from the executor; reaches the template by fork or by pickle.

    ``process_class`` is the ``multiprocessing`` Process class of the pool's start
    method; ``parent_pid`` and ``parent_name`` say who ``parent_process()`` is.
    """

    def __init__(self, initializer, initargs, max_tasks, process_class, parent_pid,
                 parent_name, finalizer=None, finalargs=(), max_memory=None):
        self.finalizer = finalizer
        self.finalargs = finalargs
        self.max_memory = max_memory      # RSS bytes after which the worker retires
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks = max_tasks
        self.process_class = process_class
        self.parent_pid = parent_pid
        self.parent_name = parent_name


def worker_process(sock, slot, serial, config, marks):
    """The ``multiprocessing`` Process object a worker runs as. The template makes it before
    forking (a fresh fork that builds it pays for the pages it touches: ~0.2 ms), so each
    worker also gets its own ``_identity``, as the standard executor's do."""
    process = config.process_class(
        target=_run, args=(sock, slot, config, marks), name="ForkExchangeWorker-%d" % serial)
    process._parent_pid = config.parent_pid
    process._parent_name = config.parent_name
    return process


def worker_main(process, parent_sentinel, template_pid):
    """Body of a worker process, forked by the template; never returns. ``process`` comes
    from :func:`worker_process` (or is the exception making it raised); ``parent_sentinel``
    is a descriptor that reaches EOF when the program exits."""
    code = 1
    try:
        die_with_parent(template_pid)
        try:
            os.setpgid(0, 0)   # a group of its own: the template kills it with the worker
        except OSError:
            pass
        # The template ignores SIGINT; a worker (and what its tasks start) must not: a
        # terminal's Ctrl-C does not reach its process group anyway.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if isinstance(process, BaseException):
            raise process
        # As multiprocessing's own fork start does: the worker's exit runs its finalizers
        # (from Python 3.13 _bootstrap leaves that to atexit) and its own atexit handlers.
        atexit.register(mp_util._exit_function)
        code = process._bootstrap(parent_sentinel=parent_sentinel)
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            _fork.exit_child(code)


def _run(sock, slot, config, marks):
    channel = Channel(0, sock, reapable=False)
    _lifecycle.begin_worker()
    if config.initializer is not None:
        try:
            config.initializer(*config.initargs)
        except BaseException as exc:  # noqa: B902
            _log_init_failure()
            channel.send(to_wire(InitFailed(_dump_failure(exc))))
            raise SystemExit(1)
    try:
        _serve(channel, slot, config.max_tasks, marks, config.max_memory)
    except ChannelBroken:   # the parent closed our channel (shutdown): time to go
        pass
    except BaseException:  # noqa: B902 - tell the parent, then exit with the traceback
        try:
            channel.send(to_wire(WorkerError(traceback.format_exc())))
        except BaseException:  # noqa: B902
            pass
        raise
    _lifecycle.finalize(config)


#: How long a worker whose initializer failed may spend flushing (its multiprocessing
#: queues' feeders) before it reports the failure, and the parent kills it.
INIT_FAILURE_FLUSH = 5.0


def _log_init_failure():
    """Log the initializer's exception in the worker, as the standard executor's workers
    do: a CRITICAL record "Exception in initializer:" with the traceback on the
    "concurrent.futures" logger (so, with no logging set up, on stderr). Then run the
    worker's multiprocessing finalizers, as its exit would, which flushes a
    ``multiprocessing.Queue`` (the QueueHandler logging recipe) before the parent, told
    of the failure, kills the worker; bounded, a queue nobody reads cannot hold it."""
    try:
        import logging
        logging.getLogger("concurrent.futures").critical("Exception in initializer:",
                                                         exc_info=True)
        import threading
        flush = threading.Thread(target=mp_util._run_finalizers, daemon=True)
        flush.start()
        flush.join(INIT_FAILURE_FLUSH)
    except BaseException:  # noqa: B902 - a broken handler must not hide the failure
        pass


def _serve(channel, slot, max_tasks, marks, max_memory=None):
    started_mark, finished_mark = MARKS_PER_SLOT * slot, MARKS_PER_SLOT * slot + 1
    at_mark = started_at_index(len(marks) // (MARKS_PER_SLOT + 1), slot)
    done = 0
    clock = time.monotonic
    memory_checked = clock()
    while max_tasks is None or done < max_tasks:
        tasks, give_back_after, timed = from_wire(channel.receive())
        if tasks is None:   # the parent retires us (idle, or after our Retiring)
            return
        results = []
        begin = last_flush = now = clock()
        last = len(tasks) - 1
        for i, (task_id, kind, blob) in enumerate(tasks):
            if timed:   # before the started mark: the parent reads them in that order
                marks[at_mark] = int(clock() * 1e6)
            marks[started_mark] = task_id
            status, out = RUNNERS[kind](blob)
            marks[finished_mark] = task_id
            before, now = now, clock()
            if status != Status.INLINE_OK and len(out) >= OUT_OF_BAND_MIN:   # uncopied
                out = pickle.PickleBuffer(out)
            results.append((task_id, status, out, now - before))
            done += 1
            if max_memory is not None and (i == last or
                                           now - memory_checked >= MEMORY_CHECK_EVERY):
                memory_checked = now
                if _lifecycle.rss_bytes() > max_memory:
                    _retire(channel, results, [t[0] for t in tasks[i + 1:]], "memory")
                    return
            if i == last:
                break
            if give_back_after is not None and now - begin > give_back_after:
                # The batch runs far longer than estimated: return what has not started.
                _fork.flush_stdio()
                channel.send(to_wire(Results(True, results, [t[0] for t in tasks[i + 1:]])))
                if _give_back_queued(channel):
                    return
                results = None
                break
            if now - last_flush > FLUSH_EVERY:
                channel.send(to_wire(Results(False, results, ())))
                results = []
                last_flush = now
        if results is not None:
            _fork.flush_stdio()
            channel.send(to_wire(Results(True, results, ())))
            if give_back_after is not None and clock() - begin > give_back_after:
                if _give_back_queued(channel):   # what was queued behind it expected us
                    return                       # sooner


def _give_back_queued(channel):
    """Return, unstarted, the batches already sent to us behind the current one; True
    if the parent told us to exit meanwhile."""
    while channel.poll(0):
        batch = from_wire(channel.receive())
        if batch.tasks is None:
            return True
        channel.send(to_wire(Results(True, [], [t[0] for t in batch.tasks])))
    return False


def _retire(channel, results, unstarted, reason):
    """Stop taking tasks: send the results so far, give back what has not started, say
    why, and give back whatever else comes until the parent says to exit."""
    _fork.flush_stdio()
    channel.send(to_wire(Results(True, results, unstarted)))
    channel.send(to_wire(Retiring(reason)))
    while True:
        batch = from_wire(channel.receive())
        if batch.tasks is None:
            return
        channel.send(to_wire(Results(True, [], [t[0] for t in batch.tasks])))
