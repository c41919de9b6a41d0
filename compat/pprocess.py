"""pprocess 0.5.1's names and calling conventions, on forkexec.

With this directory first on ``sys.path``, a program written for pprocess runs
unchanged. Only the conventions that differ from forkexec's live here:

* ``ready(timeout)`` and ``store(timeout)`` take milliseconds (pprocess passed
  the timeout to ``poll()``); forkexec takes seconds.
* ``Channel.receive()`` raises a received object that is an ``Exception``.
* ``exit(channel)`` ends a process made by ``create()``.
"""

import forkexec

__version__ = "0.5.1"

__all__ = [
    "BackgroundCallable", "BackgroundQueue", "Channel", "Exchange", "MakeParallel",
    "MakeReusable", "ManagedCallable", "Map", "PersistentExchange", "PersistentQueue",
    "Queue", "create", "exit", "get_number_of_cores", "pmap", "start", "waitall",
]

MakeParallel = forkexec.MakeParallel
MakeReusable = forkexec.MakeReusable
ManagedCallable = forkexec.ManagedCallable
BackgroundCallable = forkexec.BackgroundCallable
waitall = forkexec.waitall
get_number_of_cores = forkexec.usable_cpus


class Channel(forkexec.Channel):
    """A forkexec channel whose ``receive()`` raises a received exception."""

    def receive(self):
        obj = super().receive()
        if isinstance(obj, Exception):
            raise obj
        return obj


def _adopt(channel):
    # Channels are made inside forkexec; this class adds behaviour, not state.
    channel.__class__ = Channel
    return channel


class _ChildSide:
    """Runs ``callable`` in the child with a pprocess-style channel."""

    def __init__(self, callable):
        self.callable = callable

    def __call__(self, channel, *args, **kwargs):
        return self.callable(_adopt(channel), *args, **kwargs)


def create():
    """Fork; returns a channel in both processes (``pid == 0`` in the child)."""
    return _adopt(forkexec.create())


def start(callable, *args, **kw):
    """Run ``callable(channel, *args, **kw)`` in a new process; returns the channel."""
    return _adopt(forkexec.start(_ChildSide(callable), *args, **kw))


def exit(channel):
    """Close ``channel`` and end this created process."""
    channel.close()
    forkexec.exit_child(0)


def _seconds(milliseconds):
    return None if milliseconds is None else milliseconds / 1000.0


class _Watching:
    """pprocess's conventions for watching channels."""

    def add(self, channel):
        super().add(_adopt(channel))

    def ready(self, timeout=None):
        """Channels holding a message, waiting up to ``timeout`` milliseconds."""
        return super().ready(_seconds(timeout))

    def store(self, timeout=None):
        """Store what ready channels send, waiting up to ``timeout`` milliseconds."""
        super().store(_seconds(timeout))


class _Starting(_Watching):
    """pprocess's conventions for starting processes, too."""

    def start(self, callable, *args, **kw):
        super().start(_ChildSide(callable), *args, **kw)

    def create(self):
        channel = super().create()
        return None if channel is None else _adopt(channel)


class Exchange(_Starting, forkexec.Exchange):
    pass


class Queue(_Starting, forkexec.Queue):
    pass


class Map(_Starting, forkexec.Map):
    pass


class PersistentExchange(_Watching, forkexec.PersistentExchange):
    pass


class PersistentQueue(_Watching, forkexec.PersistentQueue):
    pass


def BackgroundQueue(address):
    """A queue of the results of the background process at ``address``."""
    queue = PersistentQueue(limit=1)
    queue.connect(address)
    return queue


def pmap(callable, sequence, limit=None):
    """A lazy parallel ``map``: a :class:`Map` running ``callable`` on each item."""
    return Map(limit=limit)(callable, sequence)
