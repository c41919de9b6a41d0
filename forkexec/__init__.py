"""forkexec: fork-based parallel execution for Python.

* :class:`ForkExchangeExecutor` - a drop-in ``concurrent.futures`` executor.
* The native, pprocess-style layer: :class:`Channel`, :func:`create`,
  :func:`start`, :func:`waitall`, :class:`Exchange`, :class:`Queue`,
  :class:`Map`, :func:`pmap`, :class:`MakeParallel`, :class:`MakeReusable`;
  ``executor=`` runs ``Queue``, ``Map`` and ``pmap`` on any executor (Dask...).
* ``forkexec.joblib`` - importing it registers the joblib backend "forkexec".
"""

from ._fork import exit_child
from ._lifecycle import worker_state
from ._stats import FunctionStatistics
from .background import (BackgroundCallable, BackgroundQueue, PersistentExchange,
                         PersistentQueue)
from .channel import Channel, create, start, waitall
from .cpus import usable_cpus
from .errors import (ChannelBroken, ChannelClosed, ChannelError, LocalOnlyError,
                     ProtocolError, RemoteTraceback, TaskTimeout, WorkerDiedError)
from .executor import ExecutorStatistics, ForkExchangeExecutor
from .exchange import (Exchange, MakeParallel, MakeReusable, ManagedCallable, Map,
                       Queue, pmap)
from .progress import as_completed

__version__ = "0.1.0"

__all__ = [
    "BackgroundCallable", "BackgroundQueue", "Channel", "ChannelBroken", "ChannelClosed",
    "ChannelError", "Exchange", "ExecutorStatistics", "ForkExchangeExecutor",
    "FunctionStatistics", "LocalOnlyError", "MakeParallel", "MakeReusable", "ManagedCallable",
    "Map", "PersistentExchange", "PersistentQueue", "ProtocolError", "Queue", "RemoteTraceback",
    "TaskTimeout", "WorkerDiedError", "as_completed", "create", "exit_child", "pmap", "start",
    "usable_cpus", "waitall", "worker_state",
]
