"""The iterator behind ``ForkExchangeExecutor.map``.

Like the standard library's: results in order, each exception raised at its
item, ``timeout`` measured from the call, and the futures still outstanding
cancelled when it expires or when the iterator is closed or dropped. It keeps no
reference to a result it has yielded (nor to its future), so mapping over large
results holds one at a time.
"""

import pickle
import time

from ._completion import ABANDONED

_END = object()


def _result_or_cancel(future, timeout=None):
    try:
        try:
            return future.result(timeout)
        finally:
            if not future.cancel() and not future.done():   # a timed-out future must
                setattr(future, ABANDONED, True)              # not run later
    finally:
        del future   # no cycle through a raised exception's traceback


def map_results(futures, chunks, submit_next, end_time, chunked, executor_ref):
    """Yield the results of ``futures`` (a deque), submitting the next of ``chunks`` as
    each is taken when the input is read lazily (``buffersize``)."""
    try:
        while futures:
            if chunks is not None:
                executor = executor_ref()
                nxt = next(chunks, _END) if executor is not None else _END
                if nxt is not _END:
                    futures.append(submit_next(nxt))
                del executor, nxt
            timeout = None if end_time is None else end_time - time.monotonic()
            if not chunked:
                yield _result_or_cancel(futures.popleft(), timeout)
                continue
            values, failures, pickled = _result_or_cancel(futures.popleft(), timeout)
            values.reverse()   # popped from the end, so the list lets go of each
            if not failures and not pickled:
                pop = values.pop
                while values:
                    yield pop()
                continue
            for i in range(len(values)):
                if i in failures:
                    raise failures[i].exception()
                if pickled:
                    yield pickle.loads(values.pop())
                else:
                    yield values.pop()
            del values, failures
    finally:
        for future in futures:
            if not future.cancel() and not future.done():
                # Sent to a worker already: if it comes back unstarted, it is not run.
                setattr(future, ABANDONED, True)
