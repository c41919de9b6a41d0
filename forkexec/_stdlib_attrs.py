"""The standard executor's private attributes that other code reads, for ours.

Test suites and libraries written for ``ProcessPoolExecutor`` reach for
``_processes`` (to kill a worker, count them, join them); the executor's
properties of the same names come here.
"""

import os
import signal
import threading
import time

#: How long ``_processes`` waits for the workers that queued work is about to get.
PROCESSES_WAIT = 5.0


def live_processes(shared, max_workers):
    """``{pid: WorkerHandle}`` of the live workers of the pool ``shared``.

    The standard executor starts the processes a submit needs before ``submit``
    returns; ours are forked by the exchange thread just after. So that
    ``ex.submit(...); ex._processes`` sees the worker that will run the task, this
    waits (at most ``PROCESSES_WAIT`` seconds) while queued work still waits for a
    worker the pool is allowed to start."""
    now = time.monotonic()
    deadline, held_since = now + PROCESSES_WAIT, None
    while shared.pending and len(shared.worker_pids) < max_workers and \
            shared.thread is not None and not shared.closed and \
            shared.broken is None and shared.owner_pid == os.getpid() and \
            now < deadline and shared.thread is not threading.current_thread():
        # A done-callback run by a caller reading its own reply holds loop_lock while
        # the exchange thread waits for it: it could never fork for us, so do not wait.
        if shared.sleeping and shared.loop_lock.locked():
            held_since = now if held_since is None else held_since
            if now - held_since > 0.05:
                break
        else:
            held_since = None
        time.sleep(0.002)
        now = time.monotonic()
    return {pid: WorkerHandle(pid) for pid in frozenset(shared.worker_pids)}


class WorkerHandle:
    """A worker seen from the parent (it is the template's child, not ours)."""

    def __init__(self, pid):
        self.pid = pid

    def __repr__(self):
        return "<WorkerHandle pid=%d %s>" % (self.pid, "alive" if self.is_alive() else "gone")

    def is_alive(self):
        try:
            with open("/proc/%d/stat" % self.pid, "rb") as f:
                data = f.read()
        except OSError:
            return False
        return data[data.rindex(b")") + 2:][:1] not in (b"Z", b"X")

    def join(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_alive() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.005)

    def terminate(self):
        self._signal(signal.SIGTERM)

    def kill(self):
        self._signal(signal.SIGKILL)

    def _signal(self, signum):
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass
