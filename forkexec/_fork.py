"""Forking: stdio flushing, and closing in every child what belongs to the parent.

Every object holding descriptors that only make sense in this process (a
channel's parent end, an executor's wake-up pipe) registers with :func:`own`.
Whoever forks — us, ``multiprocessing``, or a plain ``os.fork()`` — the child
closes them at once, so a child never keeps another child's channel open (a
channel would never see EOF) and descriptors do not pile up.
"""

import atexit
import os
import sys
import threading
import time
import weakref

_owned = weakref.WeakSet()


def own(obj):
    """Close ``obj`` (via ``obj._after_fork_in_child()``) in every forked child. The hook
    returns True if ``obj`` stays owned in the child (it adopted it)."""
    _owned.add(obj)


def disown(obj):
    _owned.discard(obj)


def _after_fork_in_child():
    kept = [obj for obj in list(_owned) if obj._after_fork_in_child()]
    _owned.clear()
    for obj in kept:
        _owned.add(obj)


os.register_at_fork(after_in_child=_after_fork_in_child)


def flush_stdio():
    """Flush Python's stdio so buffered output is neither lost nor printed twice."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


#: Native ids of our own threads that have ended; the OS may still count them a moment.
_ended_threads = set()


def thread_ending():
    """Called by one of our threads as it ends (the next fork waits for it to be gone)."""
    _ended_threads.add(threading.get_native_id())


def settle_threads(timeout=0.1):
    """Wait briefly for our own threads that just ended to leave the OS thread list, so
    fork() does not warn for nothing. Threads the program owns (e.g. OpenBLAS's) are never
    waited for."""
    if not _ended_threads:
        return
    deadline = time.monotonic() + timeout
    for tid in list(_ended_threads):
        while os.path.exists("/proc/self/task/%d" % tid) and time.monotonic() < deadline:
            time.sleep(0.0002)
        _ended_threads.discard(tid)


def fork():
    """Fork after flushing stdio. In the child, the parent's atexit handlers are dropped."""
    flush_stdio()
    pid = os.fork()
    if pid == 0:
        atexit._clear()
        atexit.register(flush_stdio)
    return pid


def exit_child(code=0):
    """Leave a forked child without running the parent's cleanup, output flushed. Nothing
    a flush raises can keep the child from exiting (it must never run its parent's code)."""
    try:
        flush_stdio()
    finally:
        os._exit(code)
