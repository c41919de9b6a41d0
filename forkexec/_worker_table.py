"""The worker table: slots, pids, workers starting, and one "worker gone" event.

A worker's end is known from the template's EXITED record, which always follows
its SPAWNED record on the ordered control socket; EOF on its channel may come
before or after. When a worker is removed, the table reads the worker's marks to
sort its unanswered tasks: finished (their results were lost), running, or never
started.
"""

import collections

from ._protocol import MARKS_PER_SLOT, NO_TASK
from ._scheduler import WorkerLoad


class Worker(WorkerLoad):
    """One live worker, seen from the exchange thread."""

    __slots__ = ("slot", "pid", "channel", "writing", "error", "lent_to", "stop",
                 "idle_since", "idle_mark", "exit_status")

    def __init__(self, slot, pid, channel, budget):
        super().__init__(budget)
        self.slot = slot
        self.pid = pid
        self.channel = channel
        self.writing = False     # registered for EVENT_WRITE
        self.error = None        # traceback text of an internal error it reported
        self.lent_to = None      # the future whose caller may read its reply (watched)
        self.stop = None         # (reason, item) once stopped on purpose (_task_control)
        self.idle_since = None   # when it was first seen idle (idle_timeout only)
        self.idle_mark = None    # its finished mark then
        self.exit_status = None  # reported while a caller was reading it (_worker_events)


#: status: raw wait status; running: the item it was running, or None; lost: items that
#: finished but whose results never arrived; unstarted: items it never started.
WorkerGone = collections.namedtuple("WorkerGone", "worker status running lost unstarted")


class WorkerTable:
    def __init__(self, nslots, marks):
        self.nslots = nslots
        self.marks = marks
        self.workers = {}        # slot -> Worker
        self.by_pid = {}         # pid -> Worker
        self.starting = set()    # slots asked of the template

    def __iter__(self):
        return iter(list(self.workers.values()))

    def __len__(self):
        return len(self.workers)

    def live(self):
        return len(self.workers) + len(self.starting)

    def idle(self):
        """Workers that could take work now or as soon as they start."""
        return len(self.starting) + sum(
            1 for w in self.workers.values() if not w.tasks and not w.retiring)

    def free_slots(self):
        return [slot for slot in range(self.nslots)
                if slot not in self.workers and slot not in self.starting]

    def start_requested(self, slot):
        self.starting.add(slot)

    def start_failed(self, slot):
        self.starting.discard(slot)

    def born(self, slot, pid, channel, budget):
        """A worker started in ``slot``: returns it."""
        self.starting.discard(slot)
        base = MARKS_PER_SLOT * slot
        for i in range(MARKS_PER_SLOT):
            self.marks[base + i] = NO_TASK
        worker = Worker(slot, pid, channel, budget)
        self.workers[slot] = worker
        self.by_pid[pid] = worker
        return worker

    def remove(self, worker, status):
        """Forget ``worker`` and return the :class:`WorkerGone` event of its end."""
        del self.workers[worker.slot]
        del self.by_pid[worker.pid]
        base = MARKS_PER_SLOT * worker.slot
        started, finished = self.marks[base], self.marks[base + 1]
        ids = list(worker.tasks)
        running, lost, unstarted = None, [], ids
        if started in worker.tasks:
            # Tasks run in the order sent: those before the last started one finished.
            i = ids.index(started)
            lost, unstarted = ids[:i], ids[i + 1:]
            if finished == started:
                lost.append(started)
            else:
                running = worker.tasks[started]
        tasks = worker.tasks
        return WorkerGone(worker, status, running, [tasks[t] for t in lost],
                          [tasks[t] for t in unstarted])
