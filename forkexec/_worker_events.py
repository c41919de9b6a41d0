"""What the template reports about the workers, carried out by the exchange thread.

A worker is born (SPAWNED, with its channel's descriptor), could not be started
(SPAWN_FAILED), or exited (EXITED, with its wait status): then whatever it wrote
is read, the worker table turns it into a "worker gone" event, and the death
policy (or task control, for a worker stopped on purpose) decides what follows.
The template's own death breaks the pool.
"""

import errno
import socket
import struct
from concurrent.futures.process import BrokenProcessPool

from ._caller_shortcuts import HELP_SECONDS, READING
from ._completion import requeue, set_exception
from ._protocol import Control
from .channel import Channel
from .errors import describe_errno
from .exchange import Poller


def on_control(loop):
    """Carry out what the template reports: workers born, exited, not started, or its
    own death."""
    for record in loop.link.records():
        if record is None:
            _on_template_death(loop)
            return
        if record.kind == Control.SPAWNED:
            _on_spawned(loop, record.a, record.b, record.fd)
        elif record.kind == Control.EXITED:
            worker = loop.table.by_pid.get(record.a)   # None: its channel never came
            if worker is None:
                continue
            if worker.watched == READING:
                # A caller is reading its last replies outside loop_lock: judged once
                # the caller hands it back (it wakes us), so no reply is read twice or lost.
                worker.exit_status = record.b
                loop.exits_waiting.append(worker)
            else:
                _on_exited(loop, worker, record.b)
        elif record.kind == Control.SPAWN_FAILED:
            loop.table.start_failed(record.a)
            loop.break_pool(BrokenProcessPool(
                "could not start a worker process: %s" % describe_errno(record.b)))


def _on_spawned(loop, slot, pid, fd):
    if fd is None:   # the descriptor was dropped on the way: we are at our fd limit
        loop.table.start_failed(slot)
        loop.break_pool(BrokenProcessPool(
            "could not take the channel of a new worker process: %s"
            % describe_errno(errno.EMFILE)))
        return
    channel = Channel(pid, _caller_readable(socket.socket(fileno=fd)), reapable=False)
    worker = loop.table.born(slot, pid, channel, loop.max_tasks)
    loop.times.worker_born(worker)
    loop.shared.worker_pids.add(pid)
    loop.poller.register(channel.fileno(), Poller.READ, worker)


def _caller_readable(sock):
    """A worker's channel socket with a receive timeout of ``HELP_SECONDS``: a caller
    thread reading its reply waits in a single blocking ``recv`` (Channel sockets block at
    the descriptor; the exchange thread's every call passes MSG_DONTWAIT)."""
    seconds = int(HELP_SECONDS)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack(
        "ll", seconds, int((HELP_SECONDS - seconds) * 1e6)))
    return sock


def on_deferred_exits(loop):
    """Judge the exits put off while a caller was reading the worker (see on_control)."""
    for worker in list(loop.exits_waiting):
        if worker.watched != READING:
            loop.exits_waiting.remove(worker)
            _on_exited(loop, worker, worker.exit_status)


def _on_exited(loop, worker, status):
    channel = worker.channel
    if not channel.closed and not channel.at_eof:
        # The process is gone, so all it wrote is buffered: read it before judging
        # (until the socket is drained: a descendant may hold it open, so no EOF).
        channel.read_nowait(limit=1 << 62)
        loop.take_messages(worker)
    _worker_gone(loop, worker, status)


def _worker_gone(loop, worker, status):
    shared = loop.shared
    loop.poller.unregister(worker.channel.fileno())
    worker.channel.set_status(status)
    worker.channel.close()
    gone = loop.table.remove(worker, status)
    shared.worker_pids.discard(worker.pid)
    loop.times.worker_gone(worker)
    if shared.broken is not None:
        return
    shared.running -= len(worker.tasks)
    keep_size = not (shared.shutdown and not shared.pending) and shared.kill_signal is None
    if worker.stop is not None:   # stopped on purpose: a timeout, kill_task, idle
        decision = loop.control.decide(gone, keep_size)
    else:
        decision = loop.policy.decide(gone, keep_size)
    if decision.broken is not None:
        loop.break_pool(decision.broken, also=list(worker.tasks.values()))
        return
    for item, error in decision.fail:
        shared.failed += 1
        set_exception(item.future, error)
    requeue(decision.requeue, shared.pending)
    if decision.respawn:
        shared.replaced += 1
        loop.spawn(worker.slot)


def _on_template_death(loop):
    loop.poller.unregister(loop.link.fileno())
    loop.link.kill()   # its control socket failed: make sure, then reap it
    loop.break_pool(BrokenProcessPool(
        "the template process (pid %d) of this ForkExchangeExecutor died (%s); its "
        "workers died with it" % (loop.link.pid, loop.link.exit_status(block=True))))
