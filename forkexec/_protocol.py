"""The records the executor's processes exchange: one module, named fields, explicit values.

Parent -> template, over a ``SOCK_SEQPACKET`` control socket, one fixed-size record each::

    SPAWN(slot)                  fork a worker for this slot
    SIGNAL(signum, grace_ms)     send signum to every worker; SIGKILL the rest after grace_ms
    EXIT                         wait for the workers to exit, then exit
    KILL(pid)                    SIGKILL this worker if it has not been reaped yet

Template -> parent::

    SPAWNED(slot, pid) + fd      the parent's end of the new worker's channel
    EXITED(pid, status)          a worker was reaped (raw wait status)
    SPAWN_FAILED(slot, errno)

Parent -> worker, one frame per batch: :class:`Batch`. Worker -> parent:
:class:`Results` (as tasks finish), :class:`InitFailed`, :class:`WorkerError`,
:class:`Retiring`. A batch whose ``tasks`` is None tells the worker to exit. Each
travels as the plain tuple :func:`to_wire` makes and :func:`from_wire` reads.

Each task runs at most once. Before a task starts, the worker writes its id into
its ``started`` mark (shared memory); when it ends, into its ``finished`` mark.
Tasks run in the order they were sent, so when a worker dies the parent knows
which of its unanswered tasks finished (their results were lost), which one was
running, and which never started (they may run elsewhere). In a batch marked ``timed`` the
worker also writes the time each task started (``time.monotonic()`` in
microseconds, before the started mark) where :func:`started_at_index` says, so
the parent measures a task's run time, never its time in the queue.
"""

import array
import collections
import socket
import struct


class Control:
    """Kinds of control records."""
    SPAWN, SIGNAL, EXIT, SPAWNED, EXITED, SPAWN_FAILED, KILL = range(7)


_RECORD = struct.Struct("<iiii")   # kind, a, b, c
#: A received descriptor is not inherited by programs the process later starts (PEP 446).
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
ControlRecord = collections.namedtuple("ControlRecord", "kind a b c fd")


def send_record(sock, kind, a=0, b=0, c=0, fd=None):
    data = _RECORD.pack(kind, a, b, c)
    if fd is None:
        sock.send(data)
    else:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def recv_record(sock):
    """The next :class:`ControlRecord`, or None at EOF (BlockingIOError if none is queued)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(_RECORD.size, socket.CMSG_SPACE(fds.itemsize),
                                                _CLOEXEC)
    if not data:
        return None
    fd = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fd = fds[0]
    return ControlRecord(*_RECORD.unpack(data), fd)


class Kind:
    """What a task's blob holds."""
    CALL = 0     # (fn, args, kwargs) -> the value
    CHUNK = 1    # (fn, star, separate, items) -> (values, {index: RemoteFailure})
    # star: items are argument tuples; separate: each item is its own pickle (bytes), so
    # items never share an object (map's own grouping must not change results).


class Status:
    """How a task ended, in a :class:`Results` entry ``(task_id, status, value, seconds)``."""
    FAILED = 0      # value: a pickled RemoteFailure
    OK = 1          # value: the pickled result
    INLINE_OK = 2   # value: the result itself (a small builtin value)


#: tasks: [(task_id, Kind, blob)]; give_back_after: seconds after which the worker returns
#: the tasks of this batch it has not started, and the batches queued behind it (None:
#: never), so a batch whose estimate was wrong never holds work another worker could run.
#: timed: write each task's start time (its tasks have a time limit). tasks None: exit.
Batch = collections.namedtuple("Batch", "tasks give_back_after timed", defaults=(False,))
#: A batch that tells an idle or retiring worker to exit (running its finalizer).
RETIRE = Batch(None, None)
#: batch_done: the worker is done with the oldest batch it was sent; entries: finished
#: tasks; returned: ids of tasks it gives back unstarted.
Results = collections.namedtuple("Results", "batch_done entries returned")
#: The initializer raised: failure is a pickled RemoteFailure.
InitFailed = collections.namedtuple("InitFailed", "failure")
#: The worker's own code failed (not a task's): the traceback text; the worker exits.
WorkerError = collections.namedtuple("WorkerError", "traceback")
#: The worker will run no more tasks (reason: "memory"); it gives back what it is sent
#: and exits when the parent answers with :data:`RETIRE`.
Retiring = collections.namedtuple("Retiring", "reason")

#: The worker records by kind number: on the wire a record is a plain tuple led by its
#: kind. (A pickled named tuple names its class, which both ends look up: four times the
#: cost of a plain tuple, on every message.)
RECORDS = (Batch, Results, InitFailed, WorkerError, Retiring)
_KIND_OF = {record: kind for kind, record in enumerate(RECORDS)}


def to_wire(record):
    """The plain tuple that carries a worker record."""
    return (_KIND_OF[type(record)],) + record


def from_wire(message):
    """The worker record a received plain tuple carries, or None if it carries none."""
    try:
        record = RECORDS[message[0]]
        return record._make(message[1:])
    except (TypeError, IndexError, KeyError):
        return None

#: Marks of a worker slot: a task id, or NO_TASK.
NO_TASK = -1
MARKS_PER_SLOT = 2   # started, finished
#: After the 2 * nslots task marks, one start time per slot (microseconds, monotonic).
TIMES_PER_SLOT = 1


def marks_bytes(nslots):
    """Size of the shared memory holding the marks of ``nslots`` worker slots."""
    return 8 * (MARKS_PER_SLOT + TIMES_PER_SLOT) * nslots


def started_at_index(nslots, slot):
    """Where the worker in ``slot`` writes the start time of its timed task."""
    return MARKS_PER_SLOT * nslots + slot
