"""The parent's side of the template: starting it, the control socket, one close path.

:class:`TemplateLink` owns everything the parent holds for its template: the
control socket, the shared memory of the workers' marks, and the write end of
the *parent sentinel* (a pipe that reaches EOF in the template and the workers
when the program exits, what ``multiprocessing.parent_process()`` watches).
It is the single owner of those descriptors: a child the program forks closes
them (``_fork.own``). Normal shutdown and abandonment share :meth:`close`.
"""

import collections
import mmap
import os
import signal
import socket
import time

from . import _fork
from ._protocol import NO_TASK, Control, marks_bytes, recv_record, send_record
from ._template import InheritedFd, template_main
from ._worker import load_libc
from .errors import describe_errno, describe_exitcode, describe_status
from .exchange import Poller

#: How long shutdown waits for the template to exit before killing it.
TEMPLATE_EXIT_TIMEOUT = 15.0
#: Workers the template forks as soon as it starts, unasked (a pool starts for a task).
PREFORK = 1


def _marks_file(size):
    """A descriptor of ``size`` bytes of shared memory a spawned template can map too."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("forkexec-marks", os.MFD_CLOEXEC)
    else:   # pragma: no cover - non-Linux POSIX
        import tempfile
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd


class TemplateLink:
    """Start the template and talk to it (exchange thread only, after :meth:`start`)."""

    def __init__(self, nslots, context):
        self.nslots = nslots
        self.prefork = min(PREFORK, nslots)   # slots 0.. are starting once start() returns
        self.context = context     # a multiprocessing context, or None to fork the template
        self.control = None
        self.pid = 0
        self.process = None        # the multiprocessing.Process of a spawned template
        self.sentinel_w = -1
        self.marks = None
        self._marks_map = None
        self._backlog = collections.deque()   # control records the full socket refused

    # -- starting ----------------------------------------------------------------------
    def start(self, config):
        """Start the template process; raises OSError with a clear message on failure,
        having released everything."""
        load_libc()
        size = marks_bytes(self.nslots)
        fds, ends = [], ()
        _fork.own(self)   # from here on, a forked child (the template too) drops our part
        try:
            marks_fd = _marks_file(size)
            fds.append(marks_fd)
            sentinel_r, self.sentinel_w = os.pipe()
            fds.append(sentinel_r)
            ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._marks_map = mmap.mmap(marks_fd, size)
            self.marks = memoryview(self._marks_map).cast("q")
            for i in range(len(self.marks)):
                self.marks[i] = NO_TASK
            if self.context is None:
                self._fork(config, ends[0], ends[1], marks_fd, sentinel_r)
            else:
                self._start_process(config, ends[1], marks_fd, sentinel_r)
        except BaseException as exc:
            for end in ends:
                end.close()
            self._close_fds(fds)
            self._release()
            if isinstance(exc, OSError) and exc.errno:
                raise OSError(exc.errno, "ForkExchangeExecutor could not start its template "
                              "process: %s" % describe_errno(exc.errno)) from exc
            raise
        parent_end, child_end = ends
        child_end.close()
        self._close_fds(fds)
        parent_end.setblocking(False)
        self.control = parent_end

    def _fork(self, config, parent_end, child_end, marks_fd, sentinel_r):
        _fork.settle_threads()
        pid = _fork.fork()
        if pid == 0:   # the fork hook has dropped our sentinel end and marks mapping
            parent_end.close()
            template_main(child_end, config, self.nslots, marks_fd, sentinel_r, self.prefork)
        self.pid = pid

    def _start_process(self, config, child_end, marks_fd, sentinel_r):
        import multiprocessing.process as mp_process
        process = self.context.Process(
            target=template_main, name="ForkExchangeTemplate",
            args=(child_end, config, self.nslots, InheritedFd(marks_fd),
                  InheritedFd(sentinel_r), self.prefork))
        process.start()
        # Ours to reap: multiprocessing must neither list it nor join it at exit.
        mp_process._children.discard(process)
        self.process = process
        self.pid = process.pid

    @staticmethod
    def _close_fds(fds):
        for fd in fds:
            os.close(fd)

    def _after_fork_in_child(self):
        # A child forked from the program must not keep the pool's descriptors.
        self._close_descriptors()

    # -- talking -----------------------------------------------------------------------
    def fileno(self):
        return self.control.fileno()

    def spawn(self, slot):
        self._send(Control.SPAWN, slot)

    def signal(self, signum, grace=0.0):
        """Send ``signum`` to every worker; SIGKILL those left after ``grace`` seconds."""
        self._send(Control.SIGNAL, signum, int(grace * 1000))

    def kill_worker(self, pid):
        """SIGKILL one worker. The template does it, so the pid cannot have been reused:
        it is the template's unreaped child until it reports the exit."""
        self._send(Control.KILL, pid)

    def _send(self, kind, a=0, b=0):
        """Send a record, or queue it while the socket is full (hundreds of workers asked
        for at once): the loop flushes the backlog. A template that is gone is noticed by
        :meth:`records`."""
        if not self._backlog:
            try:
                send_record(self.control, kind, a, b)
                return
            except BlockingIOError:
                pass
            except OSError:
                return
        self._backlog.append((kind, a, b))

    def flush(self):
        """Send queued records; True when none is left."""
        backlog = self._backlog
        while backlog:
            try:
                send_record(self.control, *backlog[0])
            except BlockingIOError:
                return False
            except OSError:
                backlog.clear()
                break
            backlog.popleft()
        return True

    @property
    def backlog(self):
        return bool(self._backlog)

    def records(self):
        """Control records received so far; a None record means the template is gone."""
        while True:
            try:
                record = recv_record(self.control)
            except BlockingIOError:
                return
            except (ConnectionResetError, OSError):
                record = None
            yield record
            if record is None:
                return

    # -- ending ------------------------------------------------------------------------
    def exit_status(self, block):
        """The template's exit described in words once it has exited, else None."""
        if self.process is not None:
            self.process.join(None if block else 0)
            code = self.process.exitcode
            return None if code is None else describe_exitcode(code)
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return "exit status unknown"
        return describe_status(status) if pid else None

    def close(self, poller, abandon=False):
        """Ask the template to exit (or kill it when ``abandon``), wait for it, reap it and
        release everything. Worker channels still arriving are closed, so those workers see
        EOF and exit at once. ``poller`` already watches the control socket."""
        if abandon:
            self.kill()
        else:
            self._send(Control.EXIT)
        deadline = time.monotonic() + TEMPLATE_EXIT_TIMEOUT
        exit_fd = self._exit_fd()
        if exit_fd is not None:
            poller.register(exit_fd, Poller.READ, "template")
        try:
            while self.exit_status(block=False) is None:
                self.flush()
                for record in self.records():
                    if record is None:   # EOF: the socket stays readable; wait for the exit
                        poller.unregister(self.control)
                    elif record.fd is not None:
                        os.close(record.fd)
                if time.monotonic() > deadline:
                    self.kill()   # its workers die with it
                    deadline = float("inf")
                poller.wait(0.1 if exit_fd is not None else 0.002)
        finally:
            if exit_fd is not None:
                poller.unregister(exit_fd)
                if self.process is None:
                    os.close(exit_fd)
        self._release()

    def _exit_fd(self):
        """A descriptor readable once the template has exited, or None."""
        if self.process is not None:
            return self.process.sentinel
        if hasattr(os, "pidfd_open"):
            try:
                return os.pidfd_open(self.pid)
            except OSError:   # e.g. out of descriptors: poll instead
                return None
        return None

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _release(self):
        _fork.disown(self)
        self._close_descriptors()
        if self.process is not None:
            self.process.close()

    def _close_descriptors(self):
        if self.control is not None:
            self.control.close()
        if self.sentinel_w >= 0:
            os.close(self.sentinel_w)
            self.sentinel_w = -1
        if self.marks is not None:
            self.marks.release()
            self.marks = None
        if self._marks_map is not None:
            self._marks_map.close()   # the mapping holds a descriptor of its own
            self._marks_map = None
