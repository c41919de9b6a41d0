"""Exceptions shared by every layer of forkexec.

"Closed" means *your* side closed the resource; "broken" means the other side
went away. The executor's failures subclass the standard library's
``BrokenProcessPool`` so existing ``except`` clauses keep working.
"""

import errno
import os
import signal
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback


class ChannelError(Exception):
    """Base class for errors raised by a channel."""


class ChannelClosed(ChannelError):
    """The channel was closed by this process and cannot be used any more."""


class ChannelBroken(ChannelError, EOFError):
    """The process at the other end of the channel went away.

    ``pid`` is the peer's process id (0 when unknown) and ``status`` the raw
    wait status when it could be read (``None`` otherwise).
    """

    def __init__(self, message, pid=0, status=None):
        super().__init__(message)
        self.pid = pid
        self.status = status

    @property
    def exitcode(self):
        """The peer's exit code, or minus the signal number, like multiprocessing."""
        return exitcode_from_status(self.status)


class LocalOnlyError(NotImplementedError):
    """Asked of an exchange on an executor (``executor=``), or of a task running on one,
    what only a process forked by this one can do: a raw channel, ``create()``, a
    background process, ``receive()`` from the parent."""


class ProtocolError(ChannelError):
    """A frame on the wire was truncated, oversized or garbled."""


class RemoteTraceback(_RemoteTraceback):
    """The traceback text of an exception raised in another process.

    A subclass of the standard executor's ``_RemoteTraceback`` (the ``__cause__`` of a
    task's exception there), so code that checks for that one finds ours too."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


class WorkerDiedError(BrokenProcessPool):
    """A worker process of an executor died while it held work."""

    def __init__(self, message, pid=0, status=None):
        super().__init__(message)
        self.pid = pid
        self.status = status

    @property
    def exitcode(self):
        return exitcode_from_status(self.status)


class TaskTimeout(TimeoutError):
    """A task ran past its time limit (``task_timeout=``, ``submit_task(timeout=)``): its
    worker was killed and replaced. A subclass of the builtin ``TimeoutError`` (which is
    ``concurrent.futures.TimeoutError`` from Python 3.11). ``function`` is the task's
    qualified name and ``timeout`` the limit in seconds."""

    def __init__(self, message, function=None, timeout=None):
        super().__init__(message)
        self.function = function
        self.timeout = timeout

    def __str__(self):
        return self.args[0] if self.args else ""

    def __reduce__(self):
        return type(self), (str(self), self.function, self.timeout)


def check_timeout(value, what):
    """``value`` as a positive number of seconds, or None; a clear error otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be a number of seconds or None, not %r" % (what, value))
    if not value > 0 or value == float("inf"):
        raise ValueError("%s must be a positive, finite number of seconds or None, not %r"
                         % (what, value))
    return float(value)


def exitcode_from_status(status):
    """Turn a raw wait status into an exit code, or minus the signal number."""
    if status is None:
        return None
    sig = signal_from_status(status)
    return -sig if sig else _exit_status(status)


def signal_from_status(status):
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def _exit_status(status):
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else None


def describe_exitcode(code):
    """The same words as :func:`describe_status`, from an exit code (minus the signal)."""
    if code < 0:
        return describe_status(-code)   # a raw status of n is "killed by signal n"
    return "exit code %d" % code


def describe_status(status):
    """A human description of a raw wait status: 'killed by SIGKILL(-9)' or 'exit code 3'."""
    if status is None:
        return "exit status unknown"
    sig = signal_from_status(status)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "signal %d" % sig
        return "killed by %s(-%d)" % (name, sig)
    code = _exit_status(status)
    return "exit code %s" % code


def add_note(exc, note):
    """Add a PEP 678 note to ``exc`` (``__notes__`` set by hand before Python 3.11)."""
    try:
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        elif getattr(exc, "__notes__", None) is None:
            exc.__notes__ = [note]
        else:
            exc.__notes__.append(note)
    except (AttributeError, TypeError):   # an exception type that refuses attributes
        pass
    return exc


def describe_errno(code):
    """An errno with the limit that most likely caused it."""
    hint = {errno.EMFILE: " (the RLIMIT_NOFILE limit on file descriptors; see ulimit -n)",
            errno.ENFILE: " (the system-wide limit on open files)",
            errno.EAGAIN: " (the RLIMIT_NPROC limit on processes, or memory; see ulimit -u)",
            errno.ENOMEM: " (out of memory)"}.get(code, "")
    return "[Errno %d] %s%s" % (code, os.strerror(code), hint)


class RemoteFailure:
    """An exception raised in another process, packed to travel over a channel.

    The exception itself travels when it pickles; otherwise a ``RuntimeError``
    carrying its type name and message stands in. The traceback text always
    travels, and comes back as ``__cause__`` (like CPython's executor).
    """

    __slots__ = ("exc", "tb")

    def __init__(self, exc, tb):
        self.exc = exc
        self.tb = tb

    @classmethod
    def capture(cls, exc):
        import pickle
        import traceback
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            pickle.loads(pickle.dumps(exc, protocol=5))
        except BaseException:  # unpicklable exception: keep its name and text
            exc = RuntimeError("%s: %s" % (_qualname(type(exc)), exc))
        exc.__traceback__ = None
        exc.__context__ = exc.__cause__ = None
        return cls(exc, '\n"""\n%s"""' % tb)

    def __reduce__(self):
        return RemoteFailure, (self.exc, self.tb)

    def exception(self):
        """The exception, with the remote traceback as its ``__cause__``."""
        self.exc.__cause__ = RemoteTraceback(self.tb)
        return self.exc


def _qualname(cls):
    module = getattr(cls, "__module__", "")
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if module in ("builtins", "__main__", None, "") else "%s.%s" % (module, name)


class StageDied(RuntimeError):
    """A process of a pipeline stage died (a signal, ``os._exit``, ``sys.exit``) before
    finishing its stage. ``stage`` is the stage's name, ``pid`` the process id and
    ``status`` the raw wait status (``None`` if it could not be read)."""

    def __init__(self, message, stage=None, pid=0, status=None):
        super().__init__(message)
        self.stage = stage
        self.pid = pid
        self.status = status

    @property
    def exitcode(self):
        return exitcode_from_status(self.status)
