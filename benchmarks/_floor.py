"""The raw floor: the fastest hand-written fork + pipe + pickle loop we could make.

No futures, no threads, no error handling, no crash detection: the parent forks
workers, each with a pair of pipes; work goes down as one pickled
``(fn, [args, ...])`` per batch, results come back as one pickled list per batch,
two batches in flight per worker. Pickle protocol 5 with out-of-band buffers, so
large payloads (passed as memoryviews) are never copied into a pickle.

Everything an executor does beyond this is overhead; the floor shows how much.
"""

import collections
import fcntl
import io
import os
import pickle
import select
import selectors
import signal
import struct
import sys
import time

HEADER = struct.Struct("<QQ")   # payload length, number of out-of-band buffers
LENGTH = struct.Struct("<Q")
F_SETPIPE_SZ = 1031              # Linux: grow a pipe so big payloads need fewer syscalls
PIPE_SIZE = 1 << 20
DEPTH = 2                        # batches in flight per worker
OUT_OF_BAND_MIN = 1 << 16


def _as_buffer(view):
    return view


def _reap(pid, timeout=5.0):
    """Wait for a worker to exit; kill it if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.001)


class _Pickler(pickle.Pickler):
    # Large memoryviews travel out of band (plain bytes cannot be overridden: the
    # pickler takes its fast path for them, so callers pass memoryviews).
    def reducer_override(self, obj):
        if type(obj) is memoryview and obj.nbytes >= OUT_OF_BAND_MIN:
            return _as_buffer, (pickle.PickleBuffer(obj),)
        return NotImplemented


def encode(obj):
    """One message as a list of buffers for writev."""
    raws = []
    sink = io.BytesIO()
    _Pickler(sink, protocol=5, buffer_callback=lambda b: raws.append(b.raw())).dump(obj)
    payload = sink.getvalue()
    head = HEADER.pack(len(payload), len(raws)) + b"".join(LENGTH.pack(r.nbytes) for r in raws)
    return [head, payload] + raws


def _set_pipe_size(fd):
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


def _write_all_blocking(fd, buffers):
    views = collections.deque(memoryview(b).cast("B") for b in buffers)
    while views:
        written = os.writev(fd, views)
        while views and written >= views[0].nbytes:
            written -= views.popleft().nbytes
        if written:
            views[0] = views[0][written:]


def _read_exact_blocking(fd, size):
    buf = bytearray(size)
    view = memoryview(buf)
    pos = 0
    while pos < size:
        got = os.readv(fd, [view[pos:]])
        if not got:
            raise EOFError
        pos += got
    return buf


def _worker_loop(rfd, wfd):
    read = _read_exact_blocking
    while True:
        try:
            size, nbuf = HEADER.unpack(read(rfd, HEADER.size))
        except EOFError:
            return
        lengths = struct.unpack("<%dQ" % nbuf, read(rfd, 8 * nbuf)) if nbuf else ()
        payload = read(rfd, size)
        buffers = [read(rfd, n) for n in lengths]
        message = pickle.loads(payload, buffers=buffers)
        if message is None:
            return
        fn, batch = message
        _write_all_blocking(wfd, encode([fn(*args) for args in batch]))


class _Reader:
    """Incremental, non-blocking reader of one worker's result messages."""

    def __init__(self, fd):
        self.fd = fd
        self._start()

    def _start(self):
        self.stage = "head"
        self.targets = [bytearray(HEADER.size)]
        self.index = 0
        self.pos = 0

    def read(self):
        """Read what is available; return the completed messages; None at EOF."""
        done = []
        while True:
            target = self.targets[self.index]
            try:
                got = os.readv(self.fd, [memoryview(target)[self.pos:]])
            except BlockingIOError:
                return done
            if not got:
                return None
            self.pos += got
            if self.pos < len(target):
                continue
            self.index += 1
            self.pos = 0
            if self.index < len(self.targets):
                continue
            message = self._advance()
            if message is not None:
                done.append(message)

    def _advance(self):
        if self.stage == "head":
            size, nbuf = HEADER.unpack(self.targets[0])
            self.nbuf = nbuf
            self.stage = "lengths" if nbuf else "body"
            self.targets = [bytearray(8 * nbuf)] if nbuf else [bytearray(size)]
            self.index = 0
            self.size = size
            return None
        if self.stage == "lengths":
            lengths = struct.unpack("<%dQ" % self.nbuf, self.targets[0])
            self.stage = "body"
            self.targets = [bytearray(self.size)] + [bytearray(n) for n in lengths]
            self.index = 0
            return None
        payload, *buffers = self.targets
        self._start()
        return pickle.loads(payload, buffers=buffers)


class _Link:
    __slots__ = ("pid", "rfd", "wfd", "reader", "out", "inflight", "writing")

    def __init__(self, pid, rfd, wfd):
        self.pid = pid
        self.rfd = rfd
        self.wfd = wfd
        self.reader = _Reader(rfd)
        self.out = collections.deque()
        self.inflight = collections.deque()
        self.writing = False


class Floor:
    """``workers`` forked processes and the loop that feeds them."""

    def __init__(self, workers):
        self.links = []
        self.selector = selectors.DefaultSelector()
        try:
            for _ in range(workers):
                self._fork_one()
        except BaseException:
            self.close()
            raise

    def _fork_one(self):
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        for fd in (down_w, up_w):
            _set_pipe_size(fd)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:   # the worker
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.close(down_w)
                os.close(up_r)
                for link in self.links:
                    os.close(link.rfd)
                    os.close(link.wfd)
                _worker_loop(down_r, up_w)
            except BaseException:  # noqa: B902 - a worker never returns into the harness
                code = 1
            finally:
                os._exit(code)
        os.close(down_r)
        os.close(up_w)
        os.set_blocking(down_w, False)
        os.set_blocking(up_r, False)
        link = _Link(pid, up_r, down_w)
        self.links.append(link)
        self.selector.register(up_r, selectors.EVENT_READ, link)

    # -- sending -----------------------------------------------------------------
    def _send(self, link, message):
        link.out.extend(memoryview(b).cast("B") for b in encode(message))
        self._flush(link)

    def _flush(self, link):
        out = link.out
        while out:
            try:
                written = os.writev(link.wfd, out)
            except BlockingIOError:
                break
            while out and written >= out[0].nbytes:
                written -= out.popleft().nbytes
            if written:
                out[0] = out[0][written:]
        want = bool(out)
        if want != link.writing:
            link.writing = want
            if want:
                self.selector.register(link.wfd, selectors.EVENT_WRITE, link)
            else:
                self.selector.unregister(link.wfd)

    # -- the loop ----------------------------------------------------------------
    def run(self, fn, args_list, batch):
        """``[fn(*args) for args in args_list]``, in parallel, in order."""
        batches = [args_list[i:i + batch] for i in range(0, len(args_list), batch)]
        results = [None] * len(batches)
        pending = collections.deque(range(len(batches)))
        done = 0
        for _ in range(DEPTH):
            for link in self.links:
                if pending:
                    index = pending.popleft()
                    link.inflight.append(index)
                    self._send(link, (fn, batches[index]))
        while done < len(batches):
            for key, events in self.selector.select():
                link = key.data
                if events & selectors.EVENT_WRITE:
                    self._flush(link)
                    continue
                messages = link.reader.read()
                if messages is None:
                    raise EOFError("floor worker %d died" % link.pid)
                for message in messages:
                    results[link.inflight.popleft()] = message
                    done += 1
                    if pending:
                        index = pending.popleft()
                        link.inflight.append(index)
                        self._send(link, (fn, batches[index]))
        return [value for chunk in results for value in chunk]

    def call(self, fn, *args):
        """One task, one round trip, on the first worker (a ping-pong)."""
        link = self.links[0]
        self._send(link, (fn, [args]))
        while True:
            if link.out:
                select.select([link.rfd], [link.wfd], [])
                self._flush(link)
                continue
            select.select([link.rfd], [], [])
            messages = link.reader.read()
            if messages is None:
                raise EOFError("floor worker %d died" % link.pid)
            if messages:
                return messages[0][0]

    def close(self):
        """Stop every worker and reap it (killing any that does not stop)."""
        for link in self.links:
            try:
                os.set_blocking(link.wfd, True)
                _write_all_blocking(link.wfd, encode(None))
            except OSError:
                pass
        for link in self.links:
            for fd in (link.rfd, link.wfd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            _reap(link.pid)
        self.links = []
        self.selector.close()
