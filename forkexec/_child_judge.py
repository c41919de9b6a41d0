"""Children whose channel has ended: reaped without waiting, and judged.

A base of :class:`~forkexec.Exchange`. A child that closed its channel is
removed at once; if it has not exited yet it is remembered and reaped by a
later call, never waited for. A child that ended abnormally or without a
result is reported through ``store_died`` (with :class:`TaskTimeout` when
``task_timeout`` killed it, or the executor's error on a foreign executor).
"""

import os

from .errors import ChannelBroken, describe_status


class ChildJudge:
    """Needs from the subclass: ``_channels``, ``_failed``, ``_tags``, ``_tasks``,
    ``_deadlines``, ``remove`` and ``store_died``."""

    def _init_judging(self):
        self._unreaped = {}        # pid -> channel: removed, but the process has not exited
        # pid -> (channel, messages delivered, tag) of unreaped children that ended
        # their channel before their exit status was known: judged when reaped.
        self._unjudged = {}

    def _ended(self, channel):
        """The child closed its channel: remove it, reporting a child that failed silently.

        Never waits for the child to exit: if its exit status is not known yet,
        it stays in ``_unreaped`` and is judged when a later call reaps it.
        """
        delivered = self._channels.get(channel, 0)
        failed = channel in self._failed
        tag = self._tags.get(channel)
        self.remove(channel)   # with autoclose, reaps it if it has exited already
        reapable = channel.pid > 0 and channel._reapable
        status = channel.wait(os.WNOHANG) if reapable else None
        if status is None and reapable:
            # Still running (or not yet a zombie): reap it later, and judge it then
            # unless its failure was raised already.
            self._unreaped[channel.pid] = channel
            if not failed:
                self._unjudged[channel.pid] = (channel, delivered, tag)
        else:
            if reapable:
                self._unreaped.pop(channel.pid, None)   # remove() may have listed it
            if not failed:
                self._judge(channel, delivered, tag, status)

    def _judge(self, channel, delivered, tag, status):
        """Report through store_died a child that ended abnormally or without a result."""
        abnormal = status is not None and status != 0
        if delivered and not abnormal:
            return
        if self._tasks is not None:
            err = channel.ended_error()
        else:
            err = self._child_error(channel, delivered, status)
        self._tags[channel] = tag
        try:
            self.store_died(channel, err)
        finally:
            self._tags.pop(channel, None)

    def _child_error(self, channel, delivered, status):
        if self._deadlines is not None:
            timed_out = self._deadlines.error_for(channel.pid)
            if timed_out is not None:
                return timed_out
        why = describe_status(status) if status is not None else "exit status unknown"
        what = "without sending a result" if not delivered else "abnormally"
        return ChannelBroken("child process %d ended %s (%s)" % (channel.pid, what, why),
                             channel.pid, status)

    def _reap(self):
        """Reap (without waiting) the children that have exited; judge those whose
        channel ended before their exit status was known. Returns how many were reaped."""
        reaped = 0
        for pid, channel in list(self._unreaped.items()):
            status = channel.wait(os.WNOHANG)
            if status is None:
                continue
            del self._unreaped[pid]
            reaped += 1
            unjudged = self._unjudged.pop(pid, None)
            if unjudged is not None:
                _, delivered, tag = unjudged
                self._judge(channel, delivered, tag, status)   # may raise: the rest wait
        return reaped
