"""``task_timeout`` for the native API: forked children killed when they run too long.

An :class:`~forkexec.Exchange` started with ``task_timeout`` gives each child it
starts (and each job a ``reuse`` child is sent) a deadline. Past it the child is
killed; its channel then ends, and the exchange reports :class:`TaskTimeout`
where that child's result would have been.
"""

import os
import signal
import time

from .errors import TaskTimeout


class ChildDeadlines:
    def __init__(self, seconds):
        self.seconds = seconds
        self._deadlines = {}   # channel -> when its child is killed
        self._names = {}       # channel -> name of the callable it runs
        self._timed_out = {}   # pid -> that name, for children killed at their deadline

    def __bool__(self):
        return bool(self._deadlines)

    def started(self, channel, fn):
        inner = getattr(fn, "callable", fn)   # MakeParallel's function
        self._names[channel] = getattr(inner, "__qualname__", None) or repr(inner)
        self._deadlines[channel] = time.monotonic() + self.seconds

    def new_job(self, channel):
        """A reuse child was sent more work: its clock starts again."""
        if channel in self._names:
            self._deadlines[channel] = time.monotonic() + self.seconds

    def stopping(self, channel):
        """A reuse child was told to stop: it exits on its own."""
        self._deadlines.pop(channel, None)

    def forget(self, channel):
        self._deadlines.pop(channel, None)
        self._names.pop(channel, None)

    def kill_overdue(self):
        """Kill the children past their deadline; return the next deadline (inf if none)."""
        now = time.monotonic()
        for channel, deadline in list(self._deadlines.items()):
            if deadline <= now:
                del self._deadlines[channel]
                self._timed_out[channel.pid] = self._names.get(channel, "a task")
                try:
                    os.kill(channel.pid, signal.SIGKILL)   # our unreaped child: its pid
                except ProcessLookupError:
                    pass
        return min(self._deadlines.values(), default=float("inf"))

    def error_for(self, pid):
        """The TaskTimeout of a child killed at its deadline, else None."""
        name = self._timed_out.pop(pid, None)
        if name is None:
            return None
        return TaskTimeout("%s ran longer than its task_timeout of %g seconds; its child "
                           "process %d was killed" % (name, self.seconds, pid),
                           name, self.seconds)
