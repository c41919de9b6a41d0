"""What ``statistics()`` reports beyond counts: time per function, and where workers'
time went (starting, busy, idle). Written by the exchange thread; read by any
thread through :meth:`PoolTimes.snapshot` (dict copies are atomic under the GIL).
"""

import collections
import time

#: One function's line in ``ExecutorStatistics.functions``: ``calls`` counted items
#: (a map chunk counts each item), ``seconds`` measured in the workers, ``per_call``
#: their mean.
FunctionStatistics = collections.namedtuple("FunctionStatistics", "name calls seconds per_call")
#: Functions remembered; past this the least busy ones are folded into "(other)".
MAX_FUNCTIONS = 256


def statistics_fields(times):
    """The ``ExecutorStatistics`` fields a :class:`PoolTimes` provides (none before the
    exchange thread exists)."""
    if times is None:
        return {}
    functions, busy, idle, starting = times.snapshot()
    return dict(tasks_timed_out=times.timed_out, tasks_killed=times.killed,
                workers_retired_idle=times.idle_retired,
                workers_retired_memory=times.memory_retired, busy_seconds=busy,
                idle_seconds=idle, starting_seconds=starting, functions=functions)


def function_name(key):
    """A readable name for a cost key (a function, or ``(type, inner function)``)."""
    if isinstance(key, tuple):
        kind, inner = key
        label = getattr(kind, "__qualname__", repr(kind))
        return label if inner is None else "%s(%s)" % (label, function_name(inner))
    module = getattr(key, "__module__", None)
    name = getattr(key, "__qualname__", None) or repr(key)
    return name if module in (None, "builtins") else "%s.%s" % (module, name)


class PoolTimes:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.functions = {}        # cost key -> [calls, seconds]
        self.busy = 0.0            # seconds of tasks measured in the workers
        self.starting = 0.0        # seconds from asking for a worker to having it
        self.lived = 0.0           # seconds of workers that are gone, from birth to end
        self.asked = {}            # slot -> when its worker was asked for
        self.born = {}             # live worker -> when it started
        self.timed_out = 0
        self.killed = 0
        self.idle_retired = 0
        self.memory_retired = 0

    def spawn_requested(self, slot):
        self.asked[slot] = self.clock()

    def worker_born(self, worker):
        now = self.clock()
        asked = self.asked.pop(worker.slot, None)
        if asked is not None:
            self.starting += now - asked
        self.born[worker] = now

    def worker_gone(self, worker):
        born = self.born.pop(worker, None)
        if born is not None:
            self.lived += self.clock() - born

    def tasks_done(self, spent):
        """Fold ``{cost_key: [seconds, calls]}`` from one results message."""
        functions = self.functions
        for key, (seconds, calls) in spent.items():
            self.busy += seconds
            entry = functions.get(key)
            if entry is None:
                if len(functions) >= MAX_FUNCTIONS:
                    self._fold()
                functions[key] = [calls, seconds]
            else:
                entry[0] += calls
                entry[1] += seconds

    def _fold(self):
        functions = self.functions
        ranked = sorted(functions, key=lambda k: functions[k][1])
        other = functions.setdefault("(other)", [0, 0.0])
        for key in ranked[:len(ranked) // 2]:
            if key != "(other)":
                calls, seconds = functions.pop(key)
                other[0] += calls
                other[1] += seconds

    def snapshot(self):
        """``(functions, busy, idle, starting)``: functions most time first."""
        now = self.clock()
        functions = dict(self.functions)
        born = dict(self.born)
        lived = self.lived + sum(now - t for t in born.values())
        busy = self.busy
        lines = []
        for key, (calls, seconds) in functions.items():
            name = key if isinstance(key, str) else function_name(key)
            lines.append(FunctionStatistics(name, calls, seconds,
                                            seconds / calls if calls else 0.0))
        lines.sort(key=lambda f: -f.seconds)
        return tuple(lines), busy, max(0.0, lived - busy), self.starting
