"""The worker process: receive batches of tasks, run them, send results back.

Parent -> worker, one frame per batch: ``[(task_id, kind, blob), ...]`` where
``blob`` is a pickle made in the parent (so a task that cannot be unpickled
fails alone): ``CALL`` blobs hold ``(fn, args, kwargs)``, ``CHUNK`` blobs hold
``(fn, star, [item, ...])`` for ``map`` (items are argument tuples if ``star``)
and give ``(values, {index: failure})``. ``fn`` is ``(pickle, shareable)``:
plain functions pickle by name, so the worker unpickles each one once.

Worker -> parent: ``(RESULTS, batch_done, seconds, [(task_id, ok, blob, seconds), ...])``
where ``ok`` is FAILED, OK or INLINE_OK: each ``blob`` is pickled on its own
(an unpicklable result fails only its task) unless it is a small value of a
builtin type, carried as is; ``seconds`` is how long the task ran. Or
``(INIT_FAILED, failure_blob)`` if the initializer raised.
Results of a long batch are sent every ``FLUSH_EVERY`` seconds, so the parent
sees progress and knows which tasks are done.

Before each task the worker writes its id into a shared-memory slot; if the
worker dies, the parent reads which task was running.
"""

import os
import pickle
import time

from . import _fork
from .channel import Channel
from .errors import ChannelBroken, RemoteFailure
from .wire import OUT_OF_BAND_MIN

CALL, CHUNK = 0, 1
#: Result kinds: a pickled failure, a pickled value, a value carried in the frame itself.
FAILED, OK, INLINE_OK = 0, 1, 2
#: Results of these exact types cannot fail to unpickle: they skip their own pickle.
INLINE = frozenset((int, float, bool, type(None), complex, str, bytes))
SIZED = frozenset((str, bytes))
INLINE_MAX = 1 << 12
RESULTS, INIT_FAILED = 0, 1
FLUSH_EVERY = 0.05
IDLE = -1
PR_SET_PDEATHSIG = 1


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
    except (ImportError, OSError):
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


def _dump_result(value):
    try:
        return True, pickle.dumps(value, protocol=5)
    except BaseException as exc:  # noqa: B902 - workers ignore SIGINT: any error here is the task's
        err = pickle.PicklingError("cannot pickle the result (a %s object): %s: %s"
                                   % (type(value).__qualname__, type(exc).__name__, exc))
        err.__cause__ = exc
        return False, _dump_failure(err)


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


def _run_call(blob):
    try:
        pickled_fn, args, kwargs = pickle.loads(blob)
        value = _function(pickled_fn)(*args, **kwargs)
    except BaseException as exc:  # noqa: B902 - SystemExit/KeyboardInterrupt fail their task only
        return False, _dump_failure(exc)
    if type(value) in INLINE and (type(value) not in SIZED or len(value) < INLINE_MAX):
        return INLINE_OK, value
    return _dump_result(value)


def _run_chunk(blob):
    """A map chunk: ``(values, {index: failure})``, so an exception is raised at its item."""
    try:
        pickled_fn, star, chunk = pickle.loads(blob)
        fn = _function(pickled_fn)
    except BaseException as exc:  # noqa: B902
        return False, _dump_failure(exc)
    values, failures = [], {}
    for item in chunk:
        try:
            values.append(fn(*item) if star else fn(item))
        except BaseException as exc:  # noqa: B902
            failures[len(values)] = RemoteFailure.capture(exc)
            values.append(None)
    ok, blob = _dump_result((values, failures))
    if ok:
        return ok, blob
    # Some value does not pickle: find it and fail that item alone.
    for i, value in enumerate(values):
        if i not in failures and not _dump_result(value)[0]:
            failures[i] = pickle.loads(_dump_result(value)[1])
            values[i] = None
    return _dump_result((values, failures))


RUNNERS = {CALL: _run_call, CHUNK: _run_chunk}


def worker_main(sock, slot, marks, initializer, initargs, max_tasks, template_pid):
    """Body of a worker process; never returns."""
    die_with_parent(template_pid)
    channel = Channel(0, sock, reapable=False)
    code = 0
    try:
        if initializer is not None:
            try:
                initializer(*initargs)
            except BaseException as exc:  # noqa: B902
                channel.send((INIT_FAILED, _dump_failure(exc)))
                code = 1
                return
        _serve(channel, slot, marks, max_tasks)
    except ChannelBroken:  # the parent closed our channel: time to go
        pass
    finally:
        _fork.exit_child(code)


def _serve(channel, slot, marks, max_tasks):
    done = 0
    clock = time.monotonic
    while max_tasks is None or done < max_tasks:
        batch = channel.receive()
        results = []
        started = last_flush = now = clock()
        last = len(batch) - 1
        for i, (task_id, kind, blob) in enumerate(batch):
            marks[slot] = task_id
            ok, out = RUNNERS[kind](blob)
            before, now = now, clock()
            if ok != INLINE_OK and len(out) >= OUT_OF_BAND_MIN:   # out of band, uncopied
                out = pickle.PickleBuffer(out)
            results.append((task_id, ok, out, now - before))
            if now - last_flush > FLUSH_EVERY and i < last:
                channel.send((RESULTS, False, now - started, results))
                results = []
                last_flush = now
        marks[slot] = IDLE
        done += len(batch)
        _fork.flush_stdio()
        channel.send((RESULTS, True, clock() - started, results))

