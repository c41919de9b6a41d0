"""Background processes: callables served at an AF_UNIX socket address.

``BackgroundCallable(address, fn)(*args)`` runs ``fn(channel, *args)`` in a
process detached from its creator, which may exit at once. Any later process
of the same user reaches it by address: ``BackgroundQueue(address)`` for one,
a :class:`PersistentQueue` (``.connect(address)`` each) for many::

    creator                   middle process          background process
    -------                   --------------          ------------------
    bind, chmod 0600, listen
    fork -------------------> setsid, fork ---------> signal handlers, stdio on /dev/null
                              _exit                   listen again (SO_PEERCRED: its pid)
    read the pid <----------------------------------- write its pid
    waitpid(middle)                                   fn(PersistentChannel, *args)
    close the listener                                send: accept a client (bounded)
                                                      wait until it has read everything
                                                      unlink the socket, exit

Listening before the fork means a client can connect as soon as the call
returns. The middle process makes the background process an orphan in a
session of its own, and is reaped at once, so the creator keeps no zombie.

Who may connect: unpickling is code execution, so only the same user. If the
directory of ``address`` is already private (owned by this user, mode 0700 or
stricter), the socket is made there. Otherwise (``/tmp``, a shared working
directory) the socket is made in a fresh private directory
(``tempfile.mkdtemp``, mode 0700) and ``address`` is a symbolic link to it.
Either way the socket file has mode 0600, and both ends check the peer's uid
with ``SO_PEERCRED`` before reading anything. No TCP, ever.

The background process removes what it created (link, socket, directory) on
every way out but SIGKILL: return, exception, SIGTERM, SIGHUP or SIGINT, and
when no client came within ``timeout`` seconds.
"""

import collections
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import tempfile
import termios
import time

from . import _fork
from .channel import Channel, encode_for_send
from .errors import ChannelBroken, ChannelClosed, LocalOnlyError, RemoteFailure
from .exchange import Exchange, Queue

#: How long a background process waits for a client whenever it needs one.
DEFAULT_TIMEOUT = 24 * 3600.0
#: Connections the kernel holds for a background process that has not accepted yet.
BACKLOG = 16
#: Signals after which a background process still removes its socket.
CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
#: While a client has not read everything, look again at most this often.
DRAIN_POLL_MAX = 0.1

_UCRED = struct.Struct("iII")   # struct ucred: pid, uid, gid


# -- who is at the other end -------------------------------------------------------
def peer_credentials(sock):
    """``(pid, uid, gid)`` of the process at the other end of a connected AF_UNIX socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, _peercred_option(), _UCRED.size)
    return _UCRED.unpack(data)


def _peercred_option():
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:  # fail closed: without it anyone who can connect would be trusted
        raise OSError(errno.ENOSYS, "background processes need SO_PEERCRED (Linux)")
    return option


def connect_background(address):
    """A :class:`Channel` to the background process at ``address`` (its ``pid``).

    ``PermissionError`` if that process does not run as this user (nothing is
    read from it); ``FileNotFoundError`` or ``ConnectionRefusedError`` if no
    background process serves ``address``.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(os.fspath(address))
        except OSError as exc:
            raise type(exc)(exc.errno, "cannot reach a background process at %r: %s"
                            % (os.fspath(address), exc.strerror)) from None
        pid, uid, _gid = peer_credentials(sock)
        if uid != os.geteuid():
            raise PermissionError("refusing the background process at %r: it runs as uid %d, "
                                  "not as this user (uid %d)" % (address, uid, os.geteuid()))
    except BaseException:
        sock.close()
        raise
    return Channel(pid, sock, reapable=False)


# -- the address ---------------------------------------------------------------------
class _Endpoint:
    """A listening socket at an address, and the file-system entries made for it."""

    def __init__(self, listener):
        self.listener = listener
        self._entries = []  # (path, (st_dev, st_ino)) in the order they were made

    def made(self, path):
        st = os.lstat(path)
        self._entries.append((path, (st.st_dev, st.st_ino)))

    def remove(self):
        """Remove what was made, unless someone replaced it since (idempotent)."""
        while self._entries:
            path, identity = self._entries.pop()
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == identity:
                    (os.rmdir if stat.S_ISDIR(st.st_mode) else os.unlink)(path)
            except OSError:
                pass


def _is_private(directory):
    st = os.stat(directory)
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _listen(address):
    """Bind and listen at ``address`` as the module docstring describes."""
    _peercred_option()
    address = os.fspath(address)
    path = os.path.abspath(address)
    endpoint = _Endpoint(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    try:
        if _is_private(os.path.dirname(path)):
            _bind(endpoint, address, path)
        else:
            private = tempfile.mkdtemp(prefix="forkexec-")
            endpoint.made(private)
            _bind(endpoint, os.path.join(private, "socket"))
            try:
                os.symlink(os.path.join(private, "socket"), path)
            except FileExistsError:
                raise _exists(address) from None
            endpoint.made(path)
        # Connections fail until listen(), so nobody slips in before the chmod.
        endpoint.listener.listen(BACKLOG)
        endpoint.listener.setblocking(False)
    except BaseException:
        endpoint.remove()
        endpoint.listener.close()
        raise
    return endpoint


def _bind(endpoint, address, path=None):
    try:
        endpoint.listener.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _exists(address) from None
        raise
    path = path or address
    endpoint.made(path)
    os.chmod(path, 0o600)


def _exists(address):
    return FileExistsError(errno.EEXIST, "%r already exists: another background process may be "
                           "serving it (remove it if none is)" % address)


# -- the background process's end -------------------------------------------------------
class PersistentChannel:
    """The background process's end of its channel: a link to whichever client connects.

    A client is accepted when one is needed (to send or to receive), waiting at
    most ``timeout`` seconds; after that the channel gives up for good and
    raises ``TimeoutError``. A message is kept until the client has read it: if
    a client goes away leaving messages unread, they are sent again to the next
    client (which may then also get a message the first one read just before
    leaving).
    """

    pid = 0

    def __init__(self, listener, timeout=DEFAULT_TIMEOUT):
        self._listener = listener
        self._timeout = timeout
        self._sock = None          # the connection to the current client, or None
        self._channel = None       # the Channel over _sock
        self._reset = False        # the client left with data unread (it saw ECONNRESET)
        self._unsent = collections.deque()   # frames (bytes) not yet written to a client
        self._unread = collections.deque()   # frames written to this client, perhaps unread
        self._unread_start = 0     # stream offset of _unread[0] on this connection
        self._written = 0          # bytes written on this connection
        self._gave_up = False      # no client came in time: never wait again
        _fork.own(self)

    def __repr__(self):
        if self._listener is None:
            state = "closed"
        else:
            state = "connected" if self._channel is not None else "waiting for a client"
        return "<PersistentChannel %s, %d messages unsent, %d perhaps unread>" % (
            state, len(self._unsent), len(self._unread))

    def _check_open(self):
        if self._listener is None:
            raise ChannelClosed("channel is closed")

    def _after_fork_in_child(self):
        # A process the callable forks must hold neither the listener nor the client
        # (the Channel closes its own socket).
        self._listener.close()
        self._listener = self._sock = self._channel = None

    def close(self):
        """Close the connection and the listener (idempotent)."""
        if self._channel is not None:
            self._channel.close()
        if self._listener is not None:
            self._listener.close()
        self._listener = self._sock = self._channel = None
        _fork.disown(self)

    # -- clients ---------------------------------------------------------------------
    def _client(self, limit=None):
        """The client's Channel, accepting a client if none is connected.

        Gives up for good after ``timeout`` seconds; a ``limit`` (a deadline on
        the monotonic clock) that comes first raises ``TimeoutError`` for now.
        """
        if self._channel is not None:
            return self._channel
        if self._gave_up:
            raise TimeoutError("no client connected in time; the channel gave up")
        deadline = time.monotonic() + self._timeout
        while True:
            end = deadline if limit is None else min(deadline, limit)
            if not _wait(self._listener.fileno(), select.POLLIN, end - time.monotonic()):
                if limit is not None and limit < deadline:
                    raise TimeoutError("no client connected in time")
                self._gave_up = True
                raise TimeoutError("no client connected within %g seconds" % self._timeout)
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:  # the client left before it was accepted
                continue
            pid, uid, _gid = peer_credentials(sock)
            if uid != os.geteuid():
                sock.close()  # before anything is read from it
                continue
            sock.setblocking(True)
            self._sock, self._channel = sock, Channel(pid, sock, reapable=False)
            self._reset, self._written, self._unread_start = False, 0, 0
            return self._channel

    def _note_reset(self):
        # Read before a recv() consumes it: ECONNRESET says the client left data unread.
        if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
            self._reset = True

    def _lost(self):
        """The client went away: what it left unread goes to the next one."""
        self._note_reset()
        if self._reset:
            self._unsent.extendleft(reversed(self._unread))
        self._unread.clear()
        self._channel.close()
        self._sock = self._channel = None

    def _read(self, limit):
        """Read what the client sent, waiting until ``limit``; False if nothing came."""
        remaining = None if limit is None else limit - time.monotonic()
        if not _wait(self._channel.fileno(), select.POLLIN, remaining):
            return False
        self._note_reset()
        self._channel.read_nowait()
        return True

    # -- sending -----------------------------------------------------------------------
    def send(self, obj):
        """Send one object, first waiting for a client if none is connected."""
        self.send_many((obj,))

    def send_many(self, objs):
        """Send several objects, first waiting for a client if none is connected."""
        self._check_open()
        self._unsent.extend([b"".join(encode_for_send(obj)) for obj in objs])
        self._flush()

    def _flush(self, limit=None):
        """Write every unsent frame to a client."""
        while self._unsent:
            channel = self._client(limit)
            frames = list(self._unsent)
            channel.queue(frames)
            try:
                while not channel.flush_nowait():
                    _wait(channel.fileno(), select.POLLOUT, None)
            except ChannelBroken:
                self._lost()
                continue
            self._unsent.clear()
            self._unread.extend(frames)
            self._written += sum(len(frame) for frame in frames)
        self._confirm()

    def _confirm(self):
        """Forget the frames the client has certainly read."""
        if not self._unread:
            return
        unread = _unread_bytes(self._sock)
        if _wait(self._sock.fileno(), 0, 0):  # hung up: the count may be of a purged queue
            return
        read = self._written - unread
        while self._unread and self._unread_start + len(self._unread[0]) <= read:
            self._unread_start += len(self._unread.popleft())

    def drain(self):
        """Wait until a client has read everything sent.

        A client that leaves with messages unread has them sent again to the
        next one. Returns early once the client has kept messages unread for
        ``timeout`` seconds: they stay in its socket, for it to read later.
        """
        self._check_open()
        deadline = time.monotonic() + self._timeout
        delay = 0.001
        while True:
            self._flush()
            remaining = deadline - time.monotonic()
            if not self._unread or remaining <= 0:
                return
            # Nothing signals that the client has read, but its leaving is signalled.
            if self._read(time.monotonic() + min(delay, remaining)) and self._channel.at_eof:
                self._lost()
            delay = min(2 * delay, DRAIN_POLL_MAX)

    # -- receiving ---------------------------------------------------------------------
    def receive(self, timeout=None):
        """Receive one object from the client, accepting one first if none is connected.

        A new client first gets the messages an earlier one left unread.
        ``TimeoutError`` if nothing came within ``timeout`` seconds.
        """
        self._check_open()
        limit = None if timeout is None else time.monotonic() + timeout
        while True:
            self._flush(limit)
            channel = self._client(limit)
            if channel.has_message():
                return channel.receive()
            if channel.at_eof:
                self._lost()
            elif not self._read(limit):
                raise TimeoutError("nothing received within %s seconds" % timeout)


def _wait(fd, events, timeout):
    """True once ``fd`` is ready for ``events`` (or hung up); False after ``timeout`` seconds."""
    poller = select.poll()
    poller.register(fd, events)
    if timeout is None:
        return bool(poller.poll())
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


def _unread_bytes(sock):
    """At least the number of bytes written to ``sock`` that its peer has not read.

    Linux counts the memory those bytes take in the peer's queue, never less
    than the bytes themselves. Where the count is unavailable, 0: messages are
    then taken as read once written.
    """
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


# -- starting a background process ---------------------------------------------------------
class _Terminated(BaseException):
    """Raised in a background process by one of CLEANUP_SIGNALS."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def spawn(address, fn, args=(), kwargs=None, timeout=DEFAULT_TIMEOUT):
    """Run ``fn(channel, *args, **kwargs)`` in a background process serving ``address``.

    Returns the pid of that process, which is not a child of this one.
    """
    endpoint = _listen(address)
    try:
        return _fork_detached(
            lambda ready_fd: _serve(endpoint, timeout, fn, args, kwargs or {}, ready_fd))
    except BaseException:
        endpoint.remove()
        raise
    finally:
        endpoint.listener.close()


def _fork_detached(run):
    """Run ``run(ready_fd)`` in an orphan in a session of its own; returns its pid.

    ``run`` must write its pid to ``ready_fd`` once it serves, close it, and
    exit rather than return.
    """
    read_end, write_end = os.pipe()
    try:
        middle = _fork.fork()
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    if middle == 0:
        _middle(read_end, write_end, run)
    os.close(write_end)
    try:
        with open(read_end, "rb") as pipe:
            pid = pipe.read()
    finally:
        try:
            os.waitpid(middle, 0)
        except ChildProcessError:  # SIGCHLD is ignored: nothing to reap
            pass
    if not pid:
        raise ChildProcessError("the background process could not be started")
    return int(pid)


def _middle(read_end, write_end, run):
    """The middle process: a new session, the background process's fork, exit."""
    try:
        os.close(read_end)
        os.setsid()
        # Until its handlers are in place the background process must not die of
        # these signals: it would leave its socket behind.
        signal.pthread_sigmask(signal.SIG_BLOCK, CLEANUP_SIGNALS)
        if _fork.fork() == 0:
            run(write_end)
    finally:
        os._exit(0)


def _serve(endpoint, timeout, fn, args, kwargs, ready_fd):
    """The background process: run ``fn``, hand over what it sent, clean up, exit."""
    code, signum, channel = 1, 0, None
    try:
        _on_signals(_terminate_handler(endpoint))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CLEANUP_SIGNALS)
        _detach_stdio()
        # Listening again makes SO_PEERCRED name this process, not the creator, to clients.
        endpoint.listener.listen(BACKLOG)
        os.write(ready_fd, b"%d" % os.getpid())
        os.close(ready_fd)
        channel = PersistentChannel(endpoint.listener, timeout)
        code = _run(channel, fn, args, kwargs)
        channel.drain()
    except _Terminated as exc:
        signum = exc.signum
    except BaseException:  # no client came for the result, or worse: nobody to tell
        code = 1
    finally:
        try:
            _on_signals(signal.SIG_IGN)
            if channel is not None:
                channel.close()
            endpoint.remove()
            if signum:  # die of the signal, so that whoever waits sees it
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
        finally:
            _fork.exit_child(code)


def _run(channel, fn, args, kwargs):
    """Run ``fn`` as :func:`forkexec.start` does (a failure is sent); returns the exit code."""
    try:
        fn(channel, *args, **kwargs)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _Terminated:
        raise
    except BaseException as exc:
        channel.send(RemoteFailure.capture(exc))
        return 1
    return 0


def _on_signals(handler):
    for signum in CLEANUP_SIGNALS:
        previous = signal.signal(signum, handler)
        _replaced_handlers.setdefault(signum, previous)


def _terminate_handler(endpoint):
    def terminate(signum, frame):
        _on_signals(signal.SIG_IGN)
        endpoint.remove()  # now: the exception may land where nothing cleans up
        raise _Terminated(signum)
    return terminate


# In a background process: the signal handlers it replaced. Processes it forks get
# them back, with the signals blocked across the fork, so that a signal that
# comes early is neither lost nor handled by the background process's cleanup.
_replaced_handlers = {}


def _block_before_fork():
    if _replaced_handlers:
        signal.pthread_sigmask(signal.SIG_BLOCK, CLEANUP_SIGNALS)


def _unblock_in_parent():
    if _replaced_handlers:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CLEANUP_SIGNALS)


def _restore_in_child():
    if _replaced_handlers:
        for signum, handler in _replaced_handlers.items():
            signal.signal(signum, handler)
        _replaced_handlers.clear()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CLEANUP_SIGNALS)


os.register_at_fork(before=_block_before_fork, after_in_parent=_unblock_in_parent,
                    after_in_child=_restore_in_child)


def _detach_stdio():
    """Point stdin, stdout and stderr at /dev/null: the creator's terminal or pipes
    must not be held open (or written to) by a process that outlives it."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd)
    if null > 2:
        os.close(null)


# -- the pprocess-style API --------------------------------------------------------------
class BackgroundCallable:
    """Calling it runs ``callable(channel, *args, **kwargs)`` in a background process
    serving ``address``, and returns that process's pid.

    ``callable`` takes the channel first (wrap a plain function in
    :class:`~forkexec.MakeParallel`). Whenever the background process needs a
    client (to send, to receive, to hand over what is unread at the end) it
    waits at most ``timeout`` seconds for one; then it cleans up and exits.
    """

    def __init__(self, address, callable, timeout=DEFAULT_TIMEOUT):
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError("timeout must be a positive number of seconds, not %r" % (timeout,))
        self.address = address
        self.callable = callable
        self.timeout = timeout

    def __repr__(self):
        return "<BackgroundCallable %r at %r>" % (self.callable, self.address)

    def __call__(self, *args, **kwargs):
        return spawn(self.address, self.callable, args, kwargs, self.timeout)


class Persistent:
    """Mix-in for exchanges whose processes run in the background, reached by address."""

    def __init__(self, *args, executor=None, **kwargs):
        if executor is not None:
            raise LocalOnlyError(
                "%s watches background processes on this machine, reached at their socket "
                "address; it cannot run on an executor (executor=%r)"
                % (type(self).__name__, executor))
        super().__init__(*args, **kwargs)

    def start(self, address, callable, *args, **kwargs):
        """Start ``callable(channel, *args, **kwargs)`` in a background process serving
        ``address`` (watch it with :meth:`connect`); returns its pid."""
        return spawn(address, callable, args, kwargs)

    def manage(self, address, callable):
        """A callable that starts ``callable`` in a background process at ``address``."""
        return BackgroundCallable(address, callable)

    def connect(self, address):
        """Watch the background process at ``address``, once there is room under the limit."""
        self.wait()
        self.add(connect_background(address))


class PersistentExchange(Persistent, Exchange):
    """An :class:`~forkexec.Exchange` over background processes (define ``store_data``)."""


class PersistentQueue(Persistent, Queue):
    """A :class:`~forkexec.Queue` of background processes' results, as they arrive."""


def BackgroundQueue(address):
    """A queue of the results of the background process at ``address``."""
    queue = PersistentQueue(limit=1)
    queue.connect(address)
    return queue
