"""A joblib parallel backend on :class:`~forkexec.ForkExchangeExecutor`.

Importing this module registers the backend ``"forkexec"``::

    import joblib
    import forkexec.joblib  # noqa: F401  (registers "forkexec")

    with joblib.parallel_config(backend="forkexec", n_jobs=4):
        results = joblib.Parallel()(joblib.delayed(f)(x) for x in items)

and through it scikit-learn's ``n_jobs``. Each ``Parallel`` call (or ``with
Parallel(...)`` block) gets a new executor, forked at its first task, so the
workers see the program as it is then: a function defined since the last call
is found. joblib groups tiny calls into batches (its auto batching), the
executor groups batches again on its side.
"""

try:
    from joblib.parallel import (AutoBatchingMixin, FallbackToBackend, ParallelBackendBase,
                                 SequentialBackend, register_parallel_backend)
except ImportError as exc:      # the module is optional: say which extra brings joblib
    raise ImportError("forkexec.joblib needs joblib, which is not installed: "
                      "pip install forkexec[joblib]") from exc

from .cpus import usable_cpus
from .executor import ForkExchangeExecutor

BACKEND_NAME = "forkexec"


class ForkExchangeBackend(AutoBatchingMixin, ParallelBackendBase):
    """Runs ``joblib.Parallel`` batches on a ForkExchangeExecutor of ``n_jobs`` workers.

    Keyword arguments of ``parallel_config(backend="forkexec", ...)`` other than
    joblib's own go to the executor (``initializer``, ``max_tasks_per_child``,
    ``on_worker_death``...).
    """

    supports_retrieve_callback = True    # results come back through future callbacks

    def __init__(self, nesting_level=None, inner_max_num_threads=None, **executor_kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **executor_kwargs)
        self._executor = None

    def effective_n_jobs(self, n_jobs):
        """joblib's meaning of ``n_jobs``: None is 1, -1 every usable CPU, -2 all but one."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            return max(usable_cpus() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None,
                  **joblib_kwargs):
        # joblib_kwargs (max_nbytes, mmap_mode, temp_folder, verbose) serve loky's memory
        # mapping of large arrays, which this backend does not do: fork shares the parent's.
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:     # no pool for one worker, as joblib's own process backends
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._executor = ForkExchangeExecutor(max_workers=n_jobs, **self.backend_kwargs)
        return n_jobs

    def submit(self, func, callback=None):
        future = self._executor.submit(func)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future):
        return future.result()

    def terminate(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready=True):
        """A call failed (or timed out): kill what still runs, start afresh if asked."""
        if self._executor is not None:
            self._executor.kill_workers()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if ensure_ready:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)


register_parallel_backend(BACKEND_NAME, ForkExchangeBackend)
