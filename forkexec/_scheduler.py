"""The scheduler: which queued items go to which worker, in what batch. No I/O.

It learns each function's cost per call from measured durations and sizes
batches from it: tiny work travels in batches of about ``TARGET_BATCH_SECONDS``,
work of unknown cost goes one item at a time, and long work spreads over the
workers. An estimate can be stale (a function measured as tiny suddenly runs
long): a batch's worker gives back what it has not started once the batch runs
far past its estimate (``give_back_after``), the first long result replaces the
estimate at once, and a worker whose batch is overdue gets no second batch. So a
stale estimate never serializes work. The clock is injected, so all of this is
tested without processes.
"""

import collections
import time
import types

#: Aim for batches that take about this long to run.
TARGET_BATCH_SECONDS = 0.005
#: Batches of known-tiny tasks carry at least this much work when the queue is long:
#: more, smaller frames only add system calls and wake-ups.
MIN_BATCH_SECONDS = 0.001
MAX_BATCH = 4096
#: Stop adding items to a batch past this many bytes of pickled calls.
MAX_BATCH_BYTES = 1 << 22
#: A worker whose outstanding work is known and shorter than this gets a second batch
#: queued behind its first, so it never waits for the parent between batches.
PIPELINE_BELOW = 0.002
#: A worker gives back the unstarted rest of a batch that has run this many times its
#: estimate, and at least GIVE_BACK_MIN seconds, and the batches queued behind it.
GIVE_BACK_FACTOR = 4
GIVE_BACK_MIN = 0.02
#: A measurement this many times the estimate replaces it instead of being averaged in.
JUMP_FACTOR = 10
#: How many functions' durations are remembered.
COST_TABLE_SIZE = 1024


def is_plain(fn):
    """A function that pickles by name and holds no object: a Python function, or a
    builtin one (not a method bound to an object, like ``array.sum`` or ``list.append``)."""
    kind = type(fn)
    if kind is types.FunctionType:
        return True
    if kind is types.BuiltinFunctionType:
        owner = fn.__self__
        return owner is None or type(owner) is types.ModuleType
    return False


def cost_key(fn):
    """Which tasks share a duration estimate: the same plain function, or the same kind
    of callable (per-call partials or bound methods must not grow the table, nor keep
    their objects alive)."""
    if is_plain(fn):
        return fn
    if type(fn) is types.BuiltinFunctionType:   # a method of a C type, bound to an object
        return (type(fn.__self__), fn.__name__)
    inner = getattr(fn, "func", None) or getattr(fn, "__func__", None)
    return (type(fn), inner if is_plain(inner) else None)


class CostModel:
    """Seconds per call by function (a moving average; a table shared with ``map``)."""

    def __init__(self, table=None):
        self.table = {} if table is None else table

    def per_call(self, fn):
        return self.table.get(cost_key(fn))

    def estimate(self, item):
        """Expected seconds for an item, or None if its function was never measured. A
        task with a time limit counts as unknown: it goes alone and nothing waits behind
        it, so stopping it at its limit costs no other task."""
        if item.timeout is not None:
            return None
        cost = self.table.get(cost_key(item.fn))
        return None if cost is None else cost * item.count

    def learn(self, spent):
        """Fold ``{cost_key: [seconds, calls]}`` into the table."""
        table = self.table
        for key, (seconds, calls) in spent.items():
            per_call = seconds / calls
            cost = table.get(key)
            if cost is None:
                if len(table) >= COST_TABLE_SIZE:
                    table.clear()
                table[key] = per_call
            elif per_call > JUMP_FACTOR * cost:
                table[key] = per_call   # the estimate was stale: trust the news at once
            else:
                table[key] = 0.7 * cost + 0.3 * per_call


SentBatch = collections.namedtuple("SentBatch", "sent_at estimate")


class WorkerLoad:
    """What the scheduler knows of one worker's work."""

    __slots__ = ("tasks", "batches", "expected", "unknown", "budget", "retiring", "watched")

    def __init__(self, budget=None):
        self.tasks = {}                        # task_id -> item, in the order sent
        self.batches = collections.deque()     # SentBatch of each batch not yet done
        self.expected = 0.0                    # estimated seconds of its outstanding tasks
        self.unknown = 0                       # outstanding tasks of unknown cost
        self.budget = budget                   # tasks left before it retires, or None
        self.retiring = False                  # it will exit (its budget is spent)
        self.watched = None                    # lent to a caller thread (_caller_shortcuts)


class Scheduler:
    def __init__(self, costs, clock=time.monotonic):
        self.costs = costs
        self.clock = clock

    def accepts(self, worker):
        """An idle worker takes work; a busy one only a second batch behind short known
        work that is on time, so it never sits on a backlog another worker could run."""
        if worker.retiring or worker.watched or (worker.budget is not None and
                                                 worker.budget <= 0):
            return False
        if not worker.tasks:
            return True
        if len(worker.batches) >= 2 or worker.unknown or worker.expected >= PIPELINE_BELOW:
            return False
        if not worker.batches:
            return False
        first = worker.batches[0]
        return self.clock() - first.sent_at <= max(PIPELINE_BELOW, GIVE_BACK_FACTOR *
                                                  first.estimate)

    @staticmethod
    def workers_wanted(queued, idle, live, slots):
        """How many workers to start: one per queued item no idle worker can take."""
        return max(0, min(queued - idle, slots - live))

    def next_batch(self, worker, queue, share):
        """Take the next batch for ``worker`` off the front of ``queue`` (a deque).

        ``share``: the workers ready or starting, over which the queue is spread.
        Returns ``(items, give_back_after)``.
        """
        queued = len(queue)
        if not queued:
            return [], None
        limit = -(-queued // max(1, share))
        head_cost = self.costs.estimate(queue[0])
        if head_cost is not None and queued > share:
            # A long queue of tiny tasks goes in worthwhile batches, but never more than
            # half the queue to one worker: if the estimate is stale, another has work too.
            tiny_batch = int(MIN_BATCH_SECONDS / max(head_cost, 1e-7))
            limit = max(limit, min(tiny_batch, -(-queued // 2)))
        limit = min(limit, MAX_BATCH)
        if worker.budget is not None:
            limit = min(limit, worker.budget)
        taken = []
        nbytes = seconds = 0
        while len(taken) < limit and nbytes < MAX_BATCH_BYTES and \
                seconds < TARGET_BATCH_SECONDS and queue:
            item = queue[0]
            estimate = self.costs.estimate(item)
            if estimate is None and taken:
                break   # unknown cost: it goes alone, next time
            queue.popleft()
            item.estimate = estimate
            taken.append(item)
            nbytes += len(item.blob)
            if estimate is None:
                break
            seconds += estimate
        give_back_after = None
        if taken and taken[-1].estimate is not None:   # known cost: it may run late
            give_back_after = max(GIVE_BACK_MIN, GIVE_BACK_FACTOR * seconds)
        return taken, give_back_after

    def plan(self, workers, queue, starting):
        """Batches for the workers that accept work, fewest tasks first: yields
        ``(worker, items, give_back_after)``, taking the items off ``queue`` as it goes.
        The queue is spread over the ready workers and the ``starting`` ones."""
        ready = [w for w in workers if self.accepts(w)]
        ready.sort(key=lambda w: len(w.tasks))
        share = len(ready) + starting
        for worker in ready:
            if not queue:
                return
            taken, give_back_after = self.next_batch(worker, queue, share)
            share = max(1, share - 1)   # the rest of the queue is spread over the others
            yield worker, taken, give_back_after

    def sent(self, worker, items):
        """Record that ``items`` went to ``worker`` as one batch."""
        tasks = worker.tasks
        seconds = 0.0
        for item in items:
            tasks[item.task_id] = item
            if item.estimate is None:
                worker.unknown += 1
            else:
                seconds += item.estimate
        worker.expected += seconds
        worker.batches.append(SentBatch(self.clock(), seconds))
        if worker.budget is not None:
            worker.budget -= len(items)
            if worker.budget <= 0:
                worker.retiring = True

    def answered(self, worker, task_id):
        """The task came back (a result, or given back); returns its item or None."""
        item = worker.tasks.pop(task_id, None)
        if item is None:
            return None
        if item.estimate is None:
            worker.unknown -= 1
        else:
            worker.expected -= item.estimate
        if not worker.tasks:
            worker.expected = 0.0   # no drift from float sums
        return item

    def given_back(self, worker, count):
        """``count`` tasks came back unstarted: they do not count against the budget."""
        if worker.budget is not None:
            worker.budget += count
            worker.retiring = worker.budget <= 0

    @staticmethod
    def batch_done(worker):
        if worker.batches:
            worker.batches.popleft()
