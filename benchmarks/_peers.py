"""The executors under test, each in its idiomatic best form.

Every peer opens a *session* (a live pool, warmed up) with the same four
operations, so a workload is written once for all of them:

* ``submit_all(fn, args_list)`` - submit each call on its own, then wait for all;
* ``map(fn, items, chunksize)`` - the pool's own ordered map;
* ``call(fn, *args)`` - one task, wait for its result (a round trip);
* ``close()`` - shut the pool down and wait for its processes.

``cold(workers)`` creates a pool, runs one task and shuts it down.
"""

import concurrent.futures
import importlib.util
import multiprocessing
import os

from _floor import OUT_OF_BAND_MIN, Floor
from _tasks import noop

#: loky's workers exit after this long idle; keep them for the whole workload.
LOKY_IDLE_TIMEOUT = 600


class FuturesSession:
    """Any ``concurrent.futures.Executor``."""

    def __init__(self, executor):
        self.executor = executor

    def submit_all(self, fn, args_list):
        submit = self.executor.submit
        futures = [submit(fn, *args) for args in args_list]
        return [f.result() for f in futures]

    def map(self, fn, items, chunksize):
        return list(self.executor.map(fn, items, chunksize=chunksize))

    def call(self, fn, *args):
        return self.executor.submit(fn, *args).result()

    def close(self):
        self.executor.shutdown(wait=True)


class PoolSession:
    """``multiprocessing.Pool``: apply_async, map, apply."""

    def __init__(self, pool):
        self.pool = pool

    def submit_all(self, fn, args_list):
        apply_async = self.pool.apply_async
        pending = [apply_async(fn, args) for args in args_list]
        return [r.get() for r in pending]

    def map(self, fn, items, chunksize):
        return self.pool.map(fn, items, chunksize=chunksize)

    def call(self, fn, *args):
        return self.pool.apply(fn, args)

    def close(self):
        self.pool.terminate()
        self.pool.join()


class MpireSession:
    """mpire's ``WorkerPool`` kept alive between calls (``keep_alive=True``)."""

    def __init__(self, pool):
        self.pool = pool

    def submit_all(self, fn, args_list):
        apply_async = self.pool.apply_async
        pending = [apply_async(fn, args=args) for args in args_list]
        return [r.get() for r in pending]

    def map(self, fn, items, chunksize):
        return self.pool.map(fn, items, chunk_size=chunksize)

    def call(self, fn, *args):
        return self.pool.apply(fn, args=args)

    def close(self):
        self.pool.terminate()


class FloorSession:
    """The raw floor: everything goes in batches, no futures."""

    def __init__(self, floor, workers):
        self.floor = floor
        self.workers = workers

    def _batch(self, count):
        per_slot = -(-count // (self.workers * 2))
        return max(1, min(1024, per_slot))

    def submit_all(self, fn, args_list):
        args_list = [tuple(_zero_copy(a) for a in args) for args in args_list]
        large = any(type(a) is memoryview for args in args_list[:1] for a in args)
        # Large payloads go one per message: batching them only delays the first result.
        return self.floor.run(fn, args_list, 1 if large else self._batch(len(args_list)))

    def map(self, fn, items, chunksize):
        args_list = [(x,) for x in items]
        return self.floor.run(fn, args_list, self._batch(len(args_list)))

    def call(self, fn, *args):
        return self.floor.call(fn, *args)

    def close(self):
        self.floor.close()


def _zero_copy(arg):
    # The floor sends large payloads out of band; plain bytes cannot be, memoryviews can.
    if isinstance(arg, bytes) and len(arg) >= OUT_OF_BAND_MIN:
        return memoryview(arg)
    return arg


class Peer:
    """One executor kind. ``workers`` overrides the workload's worker count."""

    needs = None   # a module that must be importable

    def __init__(self, name, description, workers=None):
        self.name = name
        self.description = description
        self.workers = workers

    def missing(self):
        """Why this peer cannot run here, or None."""
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return "%s is not installed (pip install '.[bench]')" % self.needs
        return None

    def open(self, workers):
        """A live pool; ``session.workers`` is its size."""
        session = self._open(self.workers or workers)
        session.workers = self.workers or workers
        return session

    def cold(self, workers):
        session = self._open(self.workers or workers)
        try:
            session.call(noop, 1)
        finally:
            session.close()


class ForkExec(Peer):
    def _open(self, workers):
        from forkexec import ForkExchangeExecutor
        return FuturesSession(ForkExchangeExecutor(workers))


class StdlibExecutor(Peer):
    def __init__(self, name, description, method):
        super().__init__(name, description)
        self.method = method

    def missing(self):
        if self.method not in multiprocessing.get_all_start_methods():
            return "start method %r is not available here" % self.method
        return None

    def _open(self, workers):
        context = multiprocessing.get_context(self.method)
        return FuturesSession(concurrent.futures.ProcessPoolExecutor(workers, mp_context=context))


class StdlibPool(Peer):
    def _open(self, workers):
        return PoolSession(multiprocessing.get_context("fork").Pool(workers))


class Loky(Peer):
    needs = "loky"

    def _open(self, workers):
        import loky
        return FuturesSession(loky.get_reusable_executor(max_workers=workers,
                                                         timeout=LOKY_IDLE_TIMEOUT))


class Mpire(Peer):
    needs = "mpire"

    def _open(self, workers):
        import mpire
        return MpireSession(mpire.WorkerPool(n_jobs=workers, start_method="fork",
                                             keep_alive=True))


class RawFloor(Peer):
    def _open(self, workers):
        return FloorSession(Floor(workers), workers)


PEERS = [
    ForkExec("forkexec", "forkexec.ForkExchangeExecutor"),
    StdlibExecutor("ppe-fork", "concurrent.futures.ProcessPoolExecutor, fork context", "fork"),
    StdlibExecutor("ppe-forkserver", "ProcessPoolExecutor, forkserver context", "forkserver"),
    StdlibExecutor("ppe-spawn", "ProcessPoolExecutor, spawn context", "spawn"),
    StdlibPool("mp-pool", "multiprocessing.Pool (fork): apply_async / map / apply"),
    Loky("loky", "loky.get_reusable_executor"),
    Mpire("mpire", "mpire.WorkerPool(keep_alive=True, start_method='fork')"),
    RawFloor("floor", "raw floor: fork + pipes + pickle, batched, written in benchmarks/_floor.py"),
]

#: forkexec with two workers, for the "32 workers keep our 2-worker rate" target.
FORKEXEC_2W = ForkExec("forkexec-2w", "forkexec with 2 workers (same tasks)", workers=2)


def usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
