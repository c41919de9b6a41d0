"""The template process: a single-threaded copy of the parent that forks the workers.

The parent forks the template once (at the first ``submit``) and talks to it
over a ``SOCK_SEQPACKET`` control socket, one fixed-size record per message::

    parent -> template   SPAWN(slot)              fork a worker for this slot
                         SIGNAL(signum)           send signum to every worker
                         EXIT                     wait for workers to exit, then exit
    template -> parent   SPAWNED(slot, pid) + fd  the parent's end of the new worker's channel
                         EXITED(pid, status)      a worker was reaped (raw wait status)
                         SPAWN_FAILED(slot, errno)

Workers are forked here, never in the (possibly multi-threaded) parent, so a
worker can be replaced at any time safely. When the control socket reaches EOF
the parent process is gone (whichever thread forked us): the template kills
every worker and exits. Workers die with the template (PR_SET_PDEATHSIG).
"""

import array
import errno
import os
import signal
import socket
import struct
import time

from . import _fork
from .exchange import Poller
from ._worker import worker_main

RECORD = struct.Struct("<iiii")   # kind, a, b, c
SPAWN, SIGNAL, EXIT, SPAWNED, EXITED, SPAWN_FAILED = range(6)
#: On EXIT, workers that have not exited after this long are killed.
EXIT_GRACE = 10.0
#: Send buffer of worker channels (the kernel allocates it only as data queues).
SOCKET_BUFFER = 1 << 20
#: Without pidfds, how often to look for exited workers.
REAP_INTERVAL = 0.05


def send_record(sock, kind, a=0, b=0, c=0, fd=None):
    data = RECORD.pack(kind, a, b, c)
    if fd is None:
        sock.send(data)
    else:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def recv_record(sock):
    """(kind, a, b, c, fd-or-None), or None at EOF."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        RECORD.size, socket.CMSG_SPACE(fds.itemsize))
    if not data:
        return None
    fd = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fd = fds[0]
    return RECORD.unpack(data) + (fd,)


class Template:
    """State of the template process (lives only in the template)."""

    def __init__(self, control, config):
        self.control = control
        self.config = config          # the executor's WorkerConfig
        self.workers = {}             # pid -> pidfd or None
        self.poller = Poller()
        self.exiting = False
        self.deadline = None          # when exiting: after this, remaining workers are killed
        self.use_pidfd = hasattr(os, "pidfd_open")

    def run(self):
        self.poller.register(self.control, Poller.READ, None)
        while True:
            timeout = None if self.use_pidfd else REAP_INTERVAL
            if self.exiting:
                if not self.workers:
                    return
                timeout = REAP_INTERVAL
            for pid, _ in self.poller.wait(timeout):
                if pid is None:
                    self.on_control()
                else:
                    self.reap(pid)
            if not self.use_pidfd or self.exiting:
                self.reap_any()
            if self.exiting and time.monotonic() >= self.deadline:
                self.signal_all(signal.SIGKILL)

    def on_control(self):
        try:
            record = recv_record(self.control)
        except ConnectionResetError:
            record = None
        if record is None:  # the parent process is gone: nothing may outlive it
            self.signal_all(signal.SIGKILL)
            self.poller.unregister(self.control)
            self.begin_exit(grace=0)
            return
        kind, a, _b, _c, _fd = record
        if kind == SPAWN:
            self.spawn(a)
        elif kind == SIGNAL:
            self.signal_all(a)
        elif kind == EXIT:
            self.begin_exit(EXIT_GRACE)

    def begin_exit(self, grace):
        self.exiting = True
        self.deadline = time.monotonic() + grace

    def spawn(self, slot):
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:   # out of descriptors: the parent reports it
            self.send(SPAWN_FAILED, slot, exc.errno or errno.EMFILE)
            return
        for end in (parent_end, child_end):   # fewer wake-ups for large payloads
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        try:
            pid = _fork.fork()
        except OSError as exc:
            parent_end.close()
            child_end.close()
            self.send(SPAWN_FAILED, slot, exc.errno or errno.EAGAIN)
            return
        if pid == 0:  # the new worker keeps nothing of ours but its channel end
            parent_end.close()
            self.control.close()
            for fd in self.workers.values():
                if fd is not None:
                    os.close(fd)
            self.poller.close()
            cfg = self.config
            worker_main(child_end, slot, cfg.marks, cfg.initializer, cfg.initargs,
                        cfg.max_tasks_per_child, cfg.template_pid)
        child_end.close()
        pidfd = None
        if self.use_pidfd:
            try:
                pidfd = os.pidfd_open(pid)
                self.poller.register(pidfd, Poller.READ, pid)
            except OSError:   # out of descriptors: look for exits by polling instead
                self.use_pidfd = False
        self.workers[pid] = pidfd
        self.send(SPAWNED, slot, pid, fd=parent_end.fileno())
        parent_end.close()

    def send(self, kind, a=0, b=0, c=0, fd=None):
        try:
            send_record(self.control, kind, a, b, c, fd)
        except OSError:  # parent gone: we will see EOF
            pass

    def reap(self, pid):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done:
            self.forget(pid, status)

    def reap_any(self):
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return
            if not pid:
                return
            if pid in self.workers:
                self.forget(pid, status)

    def forget(self, pid, status):
        pidfd = self.workers.pop(pid, None)
        if pidfd is not None:
            self.poller.unregister(pidfd)
            os.close(pidfd)
        self.send(EXITED, pid, status)

    def signal_all(self, signum):
        for pid in self.workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def template_main(control, config):
    """Body of the template process; never returns."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's business
        config.template_pid = os.getpid()
        Template(control, config).run()
    except BaseException:  # noqa: B902 - report through the exit status, never hang
        import traceback
        traceback.print_exc()
        code = 70
    finally:
        _fork.exit_child(code)
