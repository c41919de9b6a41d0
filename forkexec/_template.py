"""The template process: a single-threaded process that forks the workers.

With the fork start method the parent forks the template at the first
``submit``; with spawn or forkserver, ``multiprocessing`` starts it as a fresh
interpreter (the main module imported as ``__mp_main__``, nothing else
inherited). Either way every worker is forked from the template, never from the
(possibly multi-threaded) parent, so a worker can be replaced at any time safely
and costs a fork, not an interpreter start. The control records are in
:mod:`forkexec._protocol`.

When the control socket reaches EOF the parent process is gone (whichever
thread started us): the template kills every worker and exits. Workers die with
the template (PR_SET_PDEATHSIG). When a worker exits, the template kills what is
left of its process group before reaping it.
"""

import errno
import mmap
import os
import signal
import socket
import time

from . import _fork
from ._protocol import Control, marks_bytes, recv_record, send_record
from ._worker import load_libc, worker_main, worker_process
from .exchange import Poller

#: On EXIT, workers that have not exited after this long are killed.
EXIT_GRACE = 10.0
#: Send buffer of worker channels (the kernel allocates it only as data queues).
SOCKET_BUFFER = 1 << 20
#: Without pidfds, how often to look for exited workers.
REAP_INTERVAL = 0.05


class Template:
    """State of the template process (lives only in the template)."""

    def __init__(self, control, config, marks, parent_sentinel):
        self.control = control
        self.config = config            # the executor's WorkerConfig
        self.marks = marks              # shared memory: the workers' started/finished marks
        self.parent_sentinel = parent_sentinel
        self.pid = os.getpid()
        self.workers = {}               # pid -> pidfd or None
        self.serial = 0                 # workers forked so far (names them)
        self.poller = Poller()
        self.exiting = False
        self.deadline = None            # when exiting: after this, remaining workers are killed
        self.kill_at = None             # after a SIGNAL with a grace period: SIGKILL at this time
        self.use_pidfd = hasattr(os, "pidfd_open")

    def run(self, prefork):
        self.poller.register(self.control, Poller.READ, None)
        for slot in range(prefork):   # the pool starts for a task: its first worker, at once
            self.spawn(slot)
        while True:
            timeout = None if self.use_pidfd else REAP_INTERVAL
            if self.exiting:
                if not self.workers:
                    return
                timeout = REAP_INTERVAL
            if self.kill_at is not None:
                timeout = max(0.0, min(timeout or REAP_INTERVAL, self.kill_at - time.monotonic()))
            for pid, _ in self.poller.wait(timeout):
                if pid is None:
                    self.on_control()
                else:
                    self.reap(pid)
            if not self.use_pidfd or self.exiting:
                self.reap_any()
            now = time.monotonic()
            if self.kill_at is not None and now >= self.kill_at:
                self.kill_at = None
                self.signal_all(signal.SIGKILL)
            if self.exiting and now >= self.deadline:
                self.signal_all(signal.SIGKILL)

    def on_control(self):
        try:
            record = recv_record(self.control)
        except BlockingIOError:
            return
        except ConnectionResetError:
            record = None
        if record is None:  # the parent process is gone: nothing may outlive it
            self.signal_all(signal.SIGKILL)
            self.poller.unregister(self.control)
            self.begin_exit(grace=0)
            return
        if record.kind == Control.SPAWN:
            self.spawn(record.a)
        elif record.kind == Control.SIGNAL:
            self.signal_all(record.a)
            if record.a != signal.SIGKILL and record.b > 0:
                self.kill_at = time.monotonic() + record.b / 1000.0
        elif record.kind == Control.EXIT:
            self.begin_exit(EXIT_GRACE)
        elif record.kind == Control.KILL and record.a in self.workers:
            try:   # not reaped yet, so the pid is still this worker's
                os.kill(record.a, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def begin_exit(self, grace):
        self.exiting = True
        self.deadline = time.monotonic() + grace

    def spawn(self, slot):
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:   # out of descriptors: the parent reports it
            self.send(Control.SPAWN_FAILED, slot, exc.errno or errno.EMFILE)
            return
        for end in (parent_end, child_end):   # fewer wake-ups for large payloads
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.serial += 1
        try:
            process = worker_process(child_end, slot, self.serial, self.config, self.marks)
        except Exception as exc:  # noqa: B902 - a custom Process class failed: the worker
            process = exc         # raises it, as it would have made it itself
        try:
            pid = _fork.fork()
        except OSError as exc:
            parent_end.close()
            child_end.close()
            self.send(Control.SPAWN_FAILED, slot, exc.errno or errno.EAGAIN)
            return
        if pid == 0:  # the new worker keeps nothing of ours but its channel end
            parent_end.close()
            self.control.close()
            for fd in self.workers.values():
                if fd is not None:
                    os.close(fd)
            self.poller.close()
            worker_main(process, self.parent_sentinel, self.pid)
        del process   # the worker's own, not the template's
        child_end.close()
        pidfd = None
        if self.use_pidfd:
            try:
                pidfd = os.pidfd_open(pid)
                self.poller.register(pidfd, Poller.READ, pid)
            except OSError:   # out of descriptors: look for exits by polling instead
                self.use_pidfd = False
        self.workers[pid] = pidfd
        self.send(Control.SPAWNED, slot, pid, fd=parent_end.fileno())
        parent_end.close()

    def send(self, kind, a=0, b=0, c=0, fd=None):
        try:
            send_record(self.control, kind, a, b, c, fd)
        except OSError:  # parent gone: we will see EOF
            pass

    def reap(self, pid):
        """``pid`` has exited (its pidfd is readable): kill its group, then reap it."""
        _kill_group(pid)
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done:
            self.forget(pid, status)

    def reap_any(self):
        while self.workers:
            try:   # look without reaping, so the group can be killed while its pid is held
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                self.workers.clear()
                return
            if info is None or not info.si_pid:
                return
            pid = info.si_pid
            _kill_group(pid)
            try:
                _pid, status = os.waitpid(pid, 0)
            except ChildProcessError:
                status = 0
            if pid in self.workers:
                self.forget(pid, status)

    def forget(self, pid, status):
        pidfd = self.workers.pop(pid, None)
        if pidfd is not None:
            self.poller.unregister(pidfd)
            os.close(pidfd)
        self.send(Control.EXITED, pid, status)

    def signal_all(self, signum):
        for pid in self.workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _kill_group(pid):
    """Kill what a worker started (its process group), once the worker itself has exited."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:   # no such group: it had no descendants left, or never made its group
        pass


def template_main(control, config, nslots, marks_fd, parent_sentinel, prefork):
    """Body of the template process; never returns."""
    code = 0
    try:
        load_libc()   # a spawned template is a fresh interpreter: workers need prctl
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's business
        _stdin_from_devnull()
        size = marks_bytes(nslots)
        marks_map = mmap.mmap(marks_fd, size)
        os.close(marks_fd)
        marks = memoryview(marks_map).cast("q")
        Template(control, config, marks, parent_sentinel).run(prefork)
    except BaseException:  # noqa: B902 - report through the exit status, never hang
        import traceback
        traceback.print_exc()
        code = 70
    finally:
        _fork.exit_child(code)


def _stdin_from_devnull():
    """Workers never read the program's stdin (a task would block on it, or steal input)."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return
    if fd != 0:
        os.dup2(fd, 0)
        os.close(fd)


class InheritedFd:
    """A descriptor for a template started by ``multiprocessing`` (spawn, forkserver):
    pickling it asks the starting process to pass the descriptor on."""

    def __init__(self, fd):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup):
    return dup.detach()

