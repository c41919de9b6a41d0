"""How ``map`` sends its items in chunks: one work item per chunk, each item failing alone.

A chunk's result is ``(values, {index: RemoteFailure}, pickled)``. When ``map``
groups items itself (``separate``), items are pickled one by one unless all are
immutable builtin values, so no object is shared between items (a task that
mutates its argument sees a fresh copy, as with ``chunksize=1``); the worker
pickles the results one by one for the same reason.
"""

import itertools
import pickle
import time
from concurrent.futures import Future

from ._calls import pickled_fn, pickling_failed
from ._completion import FutureType
from ._protocol import Kind
from ._scheduler import MAX_BATCH, cost_key
from ._shared import WorkItem
from ._worker import INLINE
from .errors import RemoteFailure

#: map(chunksize=1) groups items of functions known to run faster than this...
AUTO_CHUNK_BELOW = 0.0005
#: ...into chunks of about this many seconds.
AUTO_CHUNK_SECONDS = 0.002


def chunked(iterable, size):
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def auto_chunksize(costs, fn, count, workers):
    """The chunk size for ``count`` items of ``fn`` when map may group them: more than 1
    only for a function this pool measured as tiny."""
    cost = costs.get(cost_key(fn))
    if cost is None or cost >= AUTO_CHUNK_BELOW:
        return 1
    per_chunk = int(AUTO_CHUNK_SECONDS / max(cost, 1e-7))
    spread = count // (4 * workers)
    return max(1, min(per_chunk, spread, MAX_BATCH))


def chunk_blob(fn, chunk, star, separate, pickler=None):
    dumps = pickle.dumps if pickler is None else pickler.dumps
    if separate and not _all_immutable(chunk, star):
        items = [dumps(item, protocol=5) for item in chunk]
    else:
        separate, items = False, chunk
    if pickler is not None:   # the function by value where it must be (see call_blob)
        return dumps(((dumps(fn, protocol=5), False), star, separate, items), protocol=5)
    return pickle.dumps((pickled_fn(fn), star, separate, items), protocol=5)


def _all_immutable(chunk, star):
    """True if sharing objects between items cannot matter (immutable builtin values)."""
    if star:
        return all(type(arg) in INLINE for item in chunk for arg in item)
    return all(type(item) in INLINE for item in chunk)


def submit_chunk(enqueue, new_id, fn, chunk, star, separate, timeout=None, pickler=None):
    """Queue (through ``enqueue``) one work item running ``fn`` over ``chunk``;
    ``timeout`` limits the whole chunk's run time."""
    future = FutureType()
    try:
        blob = chunk_blob(fn, chunk, star, separate, pickler)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: B902
        return _submit_partial_chunk(enqueue, new_id, fn, chunk, star, separate, exc,
                                     timeout, pickler)
    enqueue(WorkItem(future, new_id(), Kind.CHUNK, blob, fn, len(chunk), timeout))
    return future


def _submit_partial_chunk(enqueue, new_id, fn, chunk, star, separate, exc, timeout=None,
                          pickler=None):
    """A chunk that does not pickle: fail the items that do not, run the others."""
    failures = {}
    for i, item in enumerate(chunk):
        args = item if star else (item,)
        try:
            (pickle if pickler is None else pickler).dumps(args, protocol=5)
        except BaseException as item_exc:  # noqa: B902
            failures[i] = RemoteFailure(pickling_failed(fn, args, {}, item_exc, pickler), "")
    if not failures:  # the function itself does not pickle: the whole chunk fails
        future = FutureType()
        future.set_exception(pickling_failed(fn, (), {}, exc, pickler))
        return future
    good = [item for i, item in enumerate(chunk) if i not in failures]
    future = Future()
    if not good:
        future.set_result(([None] * len(chunk), failures, False))
        return future
    inner = submit_chunk(enqueue, new_id, fn, good, star, separate, timeout, pickler)

    def merge(done):
        try:
            values, inner_failures, pickled = done.result()
        except BaseException as err:  # noqa: B902
            future.set_exception(err)
            return
        if pickled:
            values = [None if j in inner_failures else pickle.loads(v)
                      for j, v in enumerate(values)]
        merged, merged_failures, it = [], dict(failures), iter(range(len(good)))
        for i in range(len(chunk)):
            if i in failures:
                merged.append(None)
                continue
            j = next(it)
            merged.append(values[j])
            if j in inner_failures:
                merged_failures[i] = inner_failures[j]
        future.set_result((merged, merged_failures, False))

    future.set_running_or_notify_cancel()
    inner.add_done_callback(merge)
    return future


def check_map_options(timeout, chunksize, buffersize):
    """Refuse bad ``map`` options as the standard executor does; returns the map's end
    time (None without a timeout)."""
    if buffersize is not None:
        if not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None, not %r" % (buffersize,))
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
    if not isinstance(chunksize, int):
        raise TypeError("chunksize must be an integer, not %r" % (chunksize,))
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    try:
        return None if timeout is None else timeout + time.monotonic()
    except TypeError:
        raise TypeError("timeout must be a number of seconds or None, not %r"
                        % (timeout,)) from None
