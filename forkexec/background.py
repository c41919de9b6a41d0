"""Background processes: callables served at an AF_UNIX socket address.

``BackgroundCallable(address, fn)(*args)`` runs ``fn(channel, *args)`` in a
process detached from its creator, which may exit at once. Any later process
of the same user reaches it by address: ``BackgroundQueue(address)`` for one,
a :class:`PersistentQueue` (``.connect(address)`` each) for many::

    creator                     middle process            background process
    -------                     --------------            ------------------
    bind, chmod 0600, listen
    fork ---------------------> setsid, fork -----------> stdio on /dev/null
    read the pid <------------- write the pid, _exit      fn(PersistentChannel, *args)
    waitpid(middle)                                       send: accept a client (bounded)
    close the listener                                    wait until it has read everything
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
import signal
import socket
import struct
import tempfile
import termios
import time

from . import _fork
from .channel import Channel, encode_for_send
from .errors import ChannelBroken, ChannelClosed, RemoteFailure
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


def connect(address):
    """A :class:`Channel` to the background process at ``address``.

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
                    (os.rmdir if os.path.isdir(path) and not os.path.islink(path)
                     else os.unlink)(path)
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
