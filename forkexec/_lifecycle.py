"""A worker's life beyond its tasks: per-worker state, the finalizer, the memory ceiling.

Runs in the worker process. ``worker_state()`` is the dict of the worker running
the caller (mpire's ``worker_state``): the initializer can open a connection and
keep it there, every task that worker runs finds it, and the finalizer closes it.
The finalizer runs when the worker retires (``max_tasks_per_child``, the memory
ceiling, the idle timeout) and when the pool shuts down; not when the worker is
killed (a task's timeout, ``kill_task``, a crash).
"""

import os
import sys
import traceback

_state = None   # the dict of this worker; None outside workers
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def worker_state():
    """The state dict of the worker process running the caller: it lives as long as the
    worker, is shared by the initializer, every task of that worker and the finalizer, and
    starts empty in each new worker. Outside a worker it raises ``RuntimeError``."""
    if _state is None:
        raise RuntimeError("forkexec.worker_state() is only available in a task, initializer "
                           "or finalizer running in a ForkExchangeExecutor worker")
    return _state


def lifecycle_options(finalizer, finalargs, max_memory):
    """The executor's ``finalizer``, ``finalargs`` and ``max_memory``, checked."""
    if max_memory is not None:
        if isinstance(max_memory, bool) or not isinstance(max_memory, int):
            raise TypeError("max_memory must be a number of bytes (an int) or None, not %r"
                            % (max_memory,))
        if max_memory <= 0:
            raise ValueError("max_memory must be a positive number of bytes, not %r"
                             % (max_memory,))
    if finalizer is not None and not callable(finalizer):
        raise TypeError("finalizer must be a callable, not %r" % (finalizer,))
    try:
        finalargs = tuple(finalargs)
    except TypeError:
        raise TypeError("finalargs must be an iterable of arguments for the finalizer, "
                        "not %r" % (finalargs,)) from None
    return finalizer, finalargs, max_memory


def begin_worker():
    """A worker starts: its state is empty (not the template's, nor a previous worker's)."""
    global _state
    _state = {}


def finalize(config):
    """Run the pool's finalizer once in this worker; a failure is printed, not raised
    (the worker is ending either way)."""
    if config.finalizer is None:
        return
    try:
        config.finalizer(*config.finalargs)
    except BaseException:  # noqa: B902 - a finalizer must not turn a clean exit into a crash
        sys.stderr.write("forkexec: the finalizer %r of worker process %d raised:\n%s"
                         % (config.finalizer, os.getpid(), traceback.format_exc()))


def rss_bytes():
    """This process's resident set size, in bytes (0 if unknown)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    try:   # not Linux: the peak, which is what getrusage offers
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return 0
