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
    """Close ``obj`` (via ``obj._after_fork_in_child()``) in every forked child."""
    _owned.add(obj)


def disown(obj):
    _owned.discard(obj)


def _after_fork_in_child():
    for obj in list(_owned):
        obj._after_fork_in_child()
    _owned.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def flush_stdio():
    """Flush Python's stdio so buffered output is neither lost nor printed twice."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


def _os_thread_count():
    try:
        with open("/proc/self/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[17])
    except (OSError, ValueError, IndexError):
        return None


def settle_threads(timeout=0.1):
    """If Python sees one thread but the OS still counts a thread that is exiting
    (one we just joined), wait briefly for it, so fork() does not warn for nothing."""
    if threading.active_count() != 1:
        return
    deadline = time.monotonic() + timeout
    while (_os_thread_count() or 1) > 1 and time.monotonic() < deadline:
        time.sleep(0.0005)


def fork():
    """Fork after flushing stdio. In the child, the parent's atexit handlers are dropped."""
    flush_stdio()
    pid = os.fork()
    if pid == 0:
        atexit._clear()
        atexit.register(flush_stdio)
    return pid


def exit_child(code=0):
    """Leave a forked child without running the parent's cleanup, output flushed."""
    flush_stdio()
    os._exit(code)
