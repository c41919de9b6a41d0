"""Channel: one duplex link between a process and a child it forked.

``create()`` forks and returns a :class:`Channel` in both processes (``pid`` is
0 in the child). ``start(fn, *args, **kwargs)`` forks, runs
``fn(channel, *args, **kwargs)`` in the child and exits it. ``waitall()`` reaps
the children created here.

A channel is a ``socketpair`` end. Blocking ``send``/``receive`` serve the
native API; the executor's loop uses the non-blocking half (``queue``,
``flush_nowait``, ``read_nowait``, ``pop_frames``) from a single thread.
"""

import os
import pickle
import select
import socket
import time

from . import _fork
from .errors import (ChannelBroken, ChannelClosed, ProtocolError, RemoteFailure,
                     describe_status)
from .wire import DEFAULT_MAX_FRAME, Decoder, encode, loads

IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
#: How long to wait for a peer that closed its end to show up as exited.
EXIT_GRACE = 2.0
#: A write to a dead peer must be an error, not a SIGPIPE (which a program may
#: have set to kill it).
SEND_FLAGS = int(getattr(socket, "MSG_NOSIGNAL", 0))   # plain ints: enum arithmetic is slow
SEND_NOWAIT = SEND_FLAGS | int(socket.MSG_DONTWAIT)
RECV_NOWAIT = int(socket.MSG_DONTWAIT)
#: send_many joins the frames of a batch smaller than this into one buffer.
JOIN_BATCH_BELOW = 1 << 20

# Children created in this process: pid -> wait status (None while unreaped).
_children = {}


def _forget_children():
    _children.clear()


os.register_at_fork(after_in_child=_forget_children)


def encode_for_send(obj):
    """Encode ``obj``, turning pickling failures into an error that names the type."""
    try:
        return encode(obj)
    except Exception as exc:
        raise pickle.PicklingError(
            "cannot send %s object: %s: %s"
            % (type(obj).__qualname__, type(exc).__name__, exc)) from exc


class Channel:
    """A duplex message link to one other process.

    ``pid`` is the peer's pid in the parent and 0 in the child.
    """

    def __init__(self, pid, sock, max_frame=DEFAULT_MAX_FRAME, reapable=None):
        self.pid = pid
        # Blocking at the descriptor, whatever socket.setdefaulttimeout() says: waits go
        # through poll or a blocking recv, non-blocking calls pass MSG_DONTWAIT.
        sock.settimeout(None)
        self._sock = sock
        # The fd, or -1 once closed, so a use after close is an error, not a recycled fd.
        self._fd = sock.fileno()
        self._decoder = Decoder(max_frame)
        self._out = []          # buffers accepted by queue() but not yet written
        self._eof = False
        self._watcher = None    # a set told about buffered messages (see report_buffered_to)
        self._drained = False   # the last read was short: nothing more is buffered
        self._status = None
        self._reapable = (pid > 0 and pid in _children) if reapable is None else reapable
        _fork.own(self)

    def __repr__(self):
        state = "closed" if self._fd < 0 else ("at EOF" if self._eof else "open")
        return "<Channel pid=%d fd=%d %s>" % (self.pid, self._fd, state)

    def __reduce__(self):
        raise TypeError("cannot pickle %r: a Channel links this process to one it forked, so "
                        "it cannot travel to another process (an executor's task included)"
                        % (self,))

    # -- plumbing ------------------------------------------------------------
    def fileno(self):
        return self._fd

    @property
    def closed(self):
        return self._fd < 0

    def _check_open(self):
        if self._fd < 0:
            raise ChannelClosed("channel is closed")

    def _after_fork_in_child(self):
        # The child must not keep this end open: close it without telling the peer.
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._fd = -1
        self._out = []

    def close(self):
        """Close this end (idempotent). The peer sees EOF."""
        if self._sock is not None:
            _fork.disown(self)
            self._sock.close()
            self._sock = None
        self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        if self._reapable:
            self.wait()

    # -- process status --------------------------------------------------------
    @property
    def status(self):
        """The peer's raw wait status once it has been reaped, else None."""
        return self._status

    def wait(self, options=0):
        """``waitpid`` the child (if we created it); returns its wait status or None."""
        if self._status is not None or not self._reapable:
            return self._status
        status = _children.get(self.pid)
        if status is None:
            try:
                pid, status = os.waitpid(self.pid, options)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            _children[self.pid] = status
        self._status = status
        return status

    def set_status(self, status):
        """Record a wait status learned elsewhere (e.g. from the process that reaped it)."""
        self._status = status

    def _broken(self, cause=None):
        """The error for a peer that went away, with its exit status if we can learn it."""
        status = self._status
        if status is None and self._reapable:
            deadline = time.monotonic() + EXIT_GRACE
            while status is None and time.monotonic() < deadline:
                status = self.wait(os.WNOHANG)
                if status is None:
                    time.sleep(0.001)
        if self.pid > 0:
            what = "process %d" % self.pid
            state = describe_status(status) if status is not None else "exit status unknown"
        else:
            what, state = "the parent process", "it closed its end"
        if not self._decoder.at_boundary():
            state += "; it went away in the middle of a message"
        err = ChannelBroken("channel is broken: %s went away (%s)" % (what, state),
                            self.pid, status)
        if cause is not None:
            err.__cause__ = cause
        return err

    # -- sending -------------------------------------------------------------
    def send(self, obj):
        """Send one object; blocks until it is written. An unpicklable ``obj``
        raises ``pickle.PicklingError`` naming its type and sends nothing."""
        self._check_open()
        self._write_all(encode_for_send(obj))

    def send_many(self, objs):
        """Send several objects with as few system calls as possible."""
        self._check_open()
        buffers = []
        for obj in objs:
            buffers.extend(encode_for_send(obj))
        if len(buffers) > 1 and sum(map(len, buffers)) < JOIN_BATCH_BELOW:
            buffers = [b"".join(buffers)]   # one copy is cheaper than many iovecs
        self._write_all(buffers)

    def _write_all(self, buffers):
        if self._out:
            buffers = self._out + list(buffers)
            self._out = []
        try:
            if len(buffers) == 1:  # the common case: one small frame, or a joined batch
                self._sock.sendall(buffers[0], SEND_FLAGS)
                return
            while buffers:
                sent = self._sock.sendmsg(buffers[:IOV_MAX], (), SEND_FLAGS)
                buffers = _advance(buffers, sent)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise self._broken(exc) from None

    # non-blocking half, for the loop that owns the channel
    def queue(self, buffers):
        """Append encoded frame buffers to the output, to be written by :meth:`flush_nowait`."""
        self._out.extend(buffers)

    def wants_write(self):
        return bool(self._out)

    def flush_nowait(self):
        """Write as much queued output as the socket takes; True when all is written."""
        self._check_open()
        out = self._out
        try:
            if len(out) == 1:   # the common case: one small frame
                sent = self._sock.send(out[0], SEND_NOWAIT)
                out = [] if sent == len(out[0]) else _advance(out, sent)
            while out:
                sent = self._sock.sendmsg(out[:IOV_MAX], (), SEND_NOWAIT)
                out = _advance(out, sent)
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._out = []
            raise self._broken(exc) from None
        self._out = out
        return not out

    # -- receiving -----------------------------------------------------------
    def _read_once(self, flags):
        """One recv into the decoder; returns the bytes read, 0 at EOF."""
        decoder = self._decoder
        target = decoder.read_target()
        wanted = len(target)
        try:
            n = self._sock.recv_into(target, 0, flags)
        except ConnectionResetError:
            n = 0
        finally:
            del target
        if n == 0:
            self._eof = True
            if self._watcher is not None:
                self._watcher.add(self)
            return 0
        # A short read drained the socket: the next recv would only fail with EAGAIN.
        self._drained = n < wanted
        decoder.commit(n)
        if self._watcher is not None and decoder.has_frames():
            self._watcher.add(self)
        return n

    def recv_waiting(self, size):
        """Block for what the peer sends next, for at most the socket's receive timeout
        (``SO_RCVTIMEO``), without touching the decoder, so that another thread may own
        the channel meanwhile; hand the result to :meth:`feed` under that owner's lock.
        Returns the bytes, b"" at EOF, or None if nothing came (or the channel was closed
        meanwhile). Reads once, so the caller thread waits in one system call."""
        sock = self._sock
        if sock is None:
            return None
        try:
            return sock.recv(size)
        except ConnectionResetError:
            return b""
        except OSError:   # timed out (EAGAIN), or closed by the owner meanwhile (EBADF)
            return None

    def feed(self, data):
        """Take ``data`` from :meth:`recv_waiting` as if this channel had read it."""
        self._check_open()
        if not data:
            self._eof = True
            if self._watcher is not None:
                self._watcher.add(self)
            return
        decoder = self._decoder
        decoder.feed(data)
        if self._watcher is not None and decoder.has_frames():
            self._watcher.add(self)

    def report_buffered_to(self, watcher):
        """Add this channel to the set ``watcher`` whenever a read leaves a message
        (or the end of the stream) buffered here, so that a readiness loop finds
        such channels without scanning them all. None stops the reports."""
        self._watcher = watcher
        if watcher is not None and (self._eof or self._decoder.has_frames()):
            watcher.add(self)

    def read_nowait(self, limit=1 << 22):
        """Read what is available without blocking (up to about ``limit`` bytes).

        Returns True while the peer may send more, False once at EOF.
        """
        self._check_open()
        got = 0
        try:
            while got < limit and not self._eof:
                n = self._read_once(RECV_NOWAIT)
                if not n or self._drained:
                    break
                got += n
        except BlockingIOError:
            pass
        return not self._eof

    def pop_frames(self):
        """Complete frames received so far (see :func:`forkexec.wire.loads`)."""
        return self._decoder.pop_frames()

    def has_message(self):
        """True if a complete message is already buffered (no system call)."""
        return self._decoder.has_frames()

    @property
    def at_eof(self):
        return self._eof

    def poll(self, timeout=0.0):
        """True if :meth:`receive` would not block (a message, EOF or an error is ready)."""
        self._check_open()
        if self._decoder.has_frames() or self._eof:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _wait_readable(self._fd, remaining):
                return False
            self.read_nowait()
            if self._decoder.has_frames() or self._eof:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def receive(self, timeout=None):
        """Receive one object, blocking (at most ``timeout`` seconds if given).

        A failure sent by a child made with :func:`start` is raised here, with
        the child's traceback as ``__cause__``. ``TimeoutError`` if nothing came;
        ``ChannelBroken`` (with the pid and exit status) once the peer has gone.
        """
        self._check_open()
        decoder = self._decoder
        if not decoder.has_frames():
            if timeout is not None and not self.poll(timeout):
                raise TimeoutError("nothing received within %s seconds" % timeout)
            while not decoder.has_frames():
                if self._eof:  # the message says if it went away mid-message
                    raise self._broken()
                self._read_once(0)
        try:
            obj = loads(decoder.pop_frame())
        except Exception as exc:  # a garbled payload can raise almost anything
            raise ProtocolError("cannot unpickle a received message: %s: %s"
                                % (type(exc).__name__, exc)) from exc
        if type(obj) is RemoteFailure:
            raise obj.exception()
        return obj


def _advance(buffers, sent):
    """Drop ``sent`` bytes from the front of a list of buffers."""
    i = 0
    while i < len(buffers):
        n = memoryview(buffers[i]).nbytes
        if sent < n:
            break
        sent -= n
        i += 1
    rest = buffers[i:]
    if sent:
        rest[0] = memoryview(rest[0]).cast("B")[sent:]
    return rest


def _wait_readable(fd, timeout):
    """Block until ``fd`` is readable or ``timeout`` seconds pass (None: forever)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = -1 if timeout is None else int(timeout * 1000 + 0.999)
    while True:
        try:
            return bool(poller.poll(ms))
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue


def create(max_frame=DEFAULT_MAX_FRAME):
    """Fork. Returns a Channel in both processes; ``channel.pid == 0`` in the child.

    The child drops the parent's atexit handlers and every other channel end it
    inherited. It should leave with ``os._exit`` (or return from a
    :func:`start` function).
    """
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = _fork.fork()
    except BaseException:
        parent_end.close()
        child_end.close()
        raise
    if pid == 0:
        parent_end.close()
        return Channel(0, child_end, max_frame)
    child_end.close()
    _children[pid] = None
    return Channel(pid, parent_end, max_frame, reapable=True)


def start(fn, *args, **kwargs):
    """Fork a child that runs ``fn(channel, *args, **kwargs)`` and then exits.

    Returns the parent's channel. An exception in ``fn`` is sent to the parent
    (its :meth:`Channel.receive` raises it) and the child exits with code 1.
    """
    channel = create()
    if channel.pid:
        return channel
    code = 0
    try:
        fn(channel, *args, **kwargs)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        code = 1
        try:
            channel.send(RemoteFailure.capture(exc))
        except BaseException:
            pass
    finally:
        channel.close()
        _fork.exit_child(code)


def waitall():
    """Wait for every child created by :func:`create`/:func:`start` in this process."""
    for pid, status in list(_children.items()):
        if status is not None:
            continue
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 0
        except InterruptedError:  # pragma: no cover
            continue
        _children[pid] = status


def reap(pid):
    """Forget a reaped child (keeps the table from growing without bound)."""
    _children.pop(pid, None)
