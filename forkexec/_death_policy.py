"""What a worker's end means: from a "worker gone" event to actions. No I/O.

* A worker that retired cleanly (its ``max_tasks_per_child`` budget spent) is
  replaced.
* ``"break"`` (the default, like ``ProcessPoolExecutor``): any other end breaks
  the pool; everything pending fails.
* ``"replace"``: the task it was running fails, tasks that finished but whose
  results were lost fail (they must not run twice), tasks it never started go
  back to the queue, and a new worker takes its place. Workers that keep dying
  without running anything break the pool instead of being replaced forever.
"""

import collections

from .errors import WorkerDiedError, describe_status

#: With "replace", this many deaths in a row with no task running break the pool (e.g.
#: an initializer that kills its process), instead of respawning forever.
MAX_BARREN_DEATHS = 5
LIKELY_CAUSES = ("Likely causes: the OOM killer (see dmesg), a segmentation fault in native "
                 "code, os._exit() in a task, or a signal sent from outside.")

#: fail: [(item, exception)]; requeue: items to run elsewhere; respawn: start a worker in
#: its slot; broken: the error that breaks the pool, or None.
Decision = collections.namedtuple("Decision", "fail requeue respawn broken")


def describe(item):
    fn = item.fn
    return getattr(fn, "__qualname__", None) or repr(fn)


class DeathPolicy:
    def __init__(self, policy):
        self.policy = policy
        self.barren = 0   # workers in a row that died with nothing running

    def results_arrived(self):
        self.barren = 0

    def decide(self, gone, keep_size):
        """The :class:`Decision` for a :class:`~forkexec._worker_table.WorkerGone` event.
        ``keep_size``: a retired worker is replaced (False once shutting down)."""
        worker, status = gone.worker, gone.status
        if worker.retiring and not worker.tasks and status == 0 and worker.error is None:
            return Decision([], [], keep_size, None)
        what = _what(gone)
        died = describe_status(status)
        if worker.error is not None:
            died += ", after an internal error in the worker:\n%s" % worker.error.rstrip()
        if self.policy == "break":
            return Decision([], [], False, WorkerDiedError(
                "A worker process (pid %d) of this ForkExchangeExecutor died %s: %s. %s The "
                "pool is broken: pending and later tasks fail (on_worker_death='replace' keeps "
                "the pool going)." % (worker.pid, what, died, LIKELY_CAUSES),
                worker.pid, status))
        if gone.running is not None or gone.lost:
            self.barren = 0
        else:
            self.barren += 1
            if self.barren >= MAX_BARREN_DEATHS:
                return Decision([], [], False, WorkerDiedError(
                    "%d worker processes in a row died before running any task (the last, pid "
                    "%d: %s). %s The pool is broken." % (self.barren, worker.pid, died,
                                                         LIKELY_CAUSES),
                    worker.pid, status))
        fail = []
        if gone.running is not None:
            fail.append((gone.running, WorkerDiedError(
                "The worker process (pid %d) running %s died: %s. %s The task was running; "
                "the worker was replaced and other tasks are not affected."
                % (worker.pid, describe(gone.running), died, LIKELY_CAUSES),
                worker.pid, status)))
        for item in gone.lost:
            fail.append((item, WorkerDiedError(
                "%s finished in worker process %d, but its result was lost when the worker "
                "died (%s) before sending it; it is not run again (at most once). The worker "
                "was replaced." % (describe(item), worker.pid, died), worker.pid, status)))
        return Decision(fail, list(gone.unstarted), keep_size or bool(gone.unstarted), None)


def _what(gone):
    if gone.running is not None:
        return "while running %s" % describe(gone.running)
    if gone.lost:
        return "after finishing %s, before sending its result" % describe(gone.lost[-1])
    if gone.unstarted:
        return "with %d tasks queued" % len(gone.unstarted)
    return "while idle"
