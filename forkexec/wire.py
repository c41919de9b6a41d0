"""The wire protocol: framing of pickled messages on a byte stream, sans-IO.

A frame is::

    +-------+---------+-------+----------+-------------+----------------+-----------+
    | "FX"  | version | flags | nbuffers | payload len | nbuffers x len | payload   | buffers...
    | 2 B   | 1 B     | 1 B   | u32      | u64         | u64 each       | pickle 5  | out of band
    +-------+---------+-------+----------+-------------+----------------+-----------+

The payload is a pickle (protocol 5); large contiguous buffers (NumPy arrays,
``PickleBuffer``, and a message that is itself a large ``bytes`` or
``bytearray``) travel out of band after it, without being copied into the
pickle. (The C pickler always copies ``bytes``/``bytearray`` nested inside
other objects into the pickle.) There are no acknowledgements: a sender writes frames,
a receiver decodes them.

A payload under ``CHECK_BELOW`` bytes ends with its CRC-32 (flag ``CHECKED``,
counted in the payload length) and a receiver refuses such a frame without it:
a garbled pickle of a few bytes can otherwise make the unpickler allocate
gigabytes (a huge memo index) before it fails. Larger payloads are not summed,
which would cost more than the copy they already take.

:func:`encode` turns objects into a list of buffers for one ``sendmsg``/``writev``.
:class:`Decoder` is fed bytes (it hands out the buffer to read into, so large
frames are read straight into their final place) and yields :class:`Frame`
objects; :func:`loads` unpickles one. Nothing here does I/O.
"""

import collections
import mmap
import pickle
import struct
import zlib

from .errors import ProtocolError

MAGIC = b"FX"
VERSION = 2
#: Flag: the payload's last 4 bytes are the CRC-32 of the rest.
CHECKED = 1
#: Payloads (pickle plus checksum) shorter than this must carry a checksum.
CHECK_BELOW = 1 << 20
_CRC = struct.Struct("<I")
HEADER = struct.Struct("<2sBBIQ")
LENGTH = struct.Struct("<Q")

#: Frames whose payload plus buffers exceed this are refused by default.
DEFAULT_MAX_FRAME = 1 << 31
#: More out-of-band buffers than this in one frame is treated as corruption; the
#: encoder keeps any further buffers in band. The table of buffer lengths must
#: fit in the read buffer, or a header could never be parsed.
MAX_BUFFERS = 1 << 14
#: Buffers smaller than this stay inside the pickle: an extra iovec costs more.
OUT_OF_BAND_MIN = 1 << 16
#: Payloads smaller than this are joined to their header (one copy beats one iovec).
JOIN_BELOW = 1 << 14
#: The reusable read buffer; frames larger than this get a buffer of their own.
READ_CHUNK = 1 << 18
#: The read buffer starts this small and doubles up to READ_CHUNK as it fills: a
#: process that only exchanges small messages never touches more (a fresh worker
#: would pay about 64 page faults to zero 256 KiB it may never use).
FIRST_CHUNK = 1 << 12
#: A large frame's buffer (an anonymous mmap: no zero-fill, and it grows by
#: mremap without copying) starts at this size and doubles as data arrives, so a
#: garbled length never allocates much more than twice what was really sent.
GROW_FROM = 2 * READ_CHUNK


def _keep_in_band(pickle_buffer):
    """buffer_callback for pickle: False sends the buffer out of band."""
    try:
        raw = pickle_buffer.raw()
    except BufferError:  # not contiguous: pickle copies it in band
        return True
    return raw.nbytes < OUT_OF_BAND_MIN


class _OutOfBand:
    """Pickles a large bytes/bytearray message as an out-of-band buffer."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return type(self.data), (pickle.PickleBuffer(self.data),)


_BLOBS = (bytes, bytearray)
#: The first 8 header bytes of a checked frame without out-of-band buffers.
_PLAIN = MAGIC + bytes([VERSION, CHECKED]) + b"\0\0\0\0"
_pack_plain = struct.Struct("<8sQ").pack
_unpack_plain = struct.Struct("<8sQ").unpack_from


def dumps(obj):
    """Pickle ``obj`` as (payload, [buffers]); raises pickling errors unchanged."""
    if type(obj) in _BLOBS and len(obj) >= OUT_OF_BAND_MIN:
        obj = _OutOfBand(obj)
    # Fast path: every buffer out of band (most messages have none at all).
    buffers = []
    payload = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    if not buffers:
        return payload, buffers
    try:
        buffers = [pb.raw() for pb in buffers]
    except BufferError:  # not contiguous: must go in band
        return _dumps_selective(obj)
    if len(buffers) <= MAX_BUFFERS and all(b.nbytes >= OUT_OF_BAND_MIN for b in buffers):
        return payload, buffers
    return _dumps_selective(obj)


def _dumps_selective(obj):
    """Pickle again, keeping small (and surplus) buffers in band."""
    buffers = []

    def collect(pb):
        if len(buffers) >= MAX_BUFFERS or _keep_in_band(pb):
            return True
        buffers.append(pb.raw())
        return False

    payload = pickle.dumps(obj, protocol=5, buffer_callback=collect)
    return payload, buffers


def frame_buffers(payload, buffers=()):
    """The iovec list of one frame from an already pickled payload."""
    flags = 0
    if len(payload) + _CRC.size < CHECK_BELOW:
        payload += _CRC.pack(zlib.crc32(payload))
        flags = CHECKED
    if not buffers and flags:
        header = _pack_plain(_PLAIN, len(payload))
    else:
        header = HEADER.pack(MAGIC, VERSION, flags, len(buffers), len(payload))
        header += b"".join(LENGTH.pack(b.nbytes) for b in buffers)
    if len(payload) < JOIN_BELOW:
        return [header + payload, *buffers]
    return [header, payload, *buffers]


def encode(obj):
    """Return the buffers of one frame carrying ``obj`` (pickling errors propagate)."""
    payload, buffers = dumps(obj)
    if not buffers and len(payload) < JOIN_BELOW:
        return [_pack_plain(_PLAIN, len(payload) + _CRC.size) + payload
                + _CRC.pack(zlib.crc32(payload))]
    return frame_buffers(payload, buffers)


class Frame:
    """One decoded frame: a pickle payload and its out-of-band buffers."""

    __slots__ = ("payload", "buffers")

    def __init__(self, payload, buffers=()):
        self.payload = payload
        self.buffers = buffers

    def __repr__(self):
        return "<Frame payload=%d buffers=%d>" % (len(self.payload), len(self.buffers))


def loads(frame):
    """Unpickle a :class:`Frame`."""
    return pickle.loads(frame.payload, buffers=frame.buffers)


class Decoder:
    """Incremental frame decoder.

    Use: ``view = d.read_target(); n = recv_into(view); del view; d.commit(n)``,
    then take complete frames with :meth:`pop_frames`. At end of stream call
    :meth:`at_boundary` to tell a clean EOF from one in the middle of a frame.
    """

    def __init__(self, max_frame=DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray(FIRST_CHUNK)
        self._start = 0
        self._end = 0
        self._frames = collections.deque()
        # A frame too large for the read buffer: (payload length, lengths, data, filled, body size)
        self._large = None
        self._error = None   # a protocol error found after good frames, raised once they are taken

    # -- feeding -----------------------------------------------------------
    def read_target(self):
        """A writable memoryview to receive the next bytes into."""
        if self._error is not None:
            raise self._error
        large = self._large
        if large is not None:
            _, _, data, filled, body = large
            if filled == len(data):  # grow: double, never past the declared size
                data.resize(min(body, 2 * len(data)))
            return memoryview(data)[filled:]
        if self._end == len(self._buf):   # the last read filled it: more is coming
            self._compact()
            if len(self._buf) < READ_CHUNK:
                self._grow(2 * len(self._buf))
        return memoryview(self._buf)[self._end:]

    def commit(self, n):
        """Record that ``n`` bytes were written into the last read target."""
        if self._error is not None:
            raise self._error
        large = self._large
        if large is not None:
            plen, lens, data, filled, body = large
            filled += n
            if filled < body:
                self._large = (plen, lens, data, filled, body)
                return
            self._large = None
            self._frames.append(_split(memoryview(data), plen, lens))
            return
        self._end += n
        self._parse()

    def feed(self, data):
        """Feed a bytes-like object (convenience for tests and small inputs)."""
        data = memoryview(data).cast("B")
        while data:
            target = self.read_target()
            n = min(len(target), len(data))
            target[:n] = data[:n]
            del target
            self.commit(n)
            data = data[n:]

    # -- results -----------------------------------------------------------
    def pop_frames(self):
        """Return and forget the frames decoded so far (a list)."""
        frames = list(self._frames)
        self._frames.clear()
        return frames

    def has_frames(self):
        return bool(self._frames)

    def pop_frame(self):
        """The oldest decoded frame (IndexError if there is none)."""
        return self._frames.popleft()

    def at_boundary(self):
        """True when no partial frame is buffered (an EOF here is a clean one)."""
        return self._large is None and self._start == self._end

    def buffered(self):
        """Number of bytes received but not yet part of a complete frame."""
        if self._large is not None:
            return self._large[3]
        return self._end - self._start

    # -- internals ---------------------------------------------------------
    def _compact(self):
        start, end = self._start, self._end
        if start:
            self._buf[: end - start] = self._buf[start:end]
            self._start, self._end = 0, end - start

    def _grow(self, size):
        size = min(size, READ_CHUNK)
        if size > len(self._buf):
            self._buf.extend(bytes(size - len(self._buf)))

    def _make_room(self, size):
        """Let the frame at ``_start`` (``size`` bytes, at most READ_CHUNK) fit."""
        if size > len(self._buf) - self._start:
            self._compact()
            if size > len(self._buf):
                self._grow(max(size, 2 * len(self._buf)))

    def _parse(self):
        count = len(self._frames)
        try:
            self._parse_frames()
        except ProtocolError as exc:
            if len(self._frames) == count:
                raise
            self._error = exc   # deliver the good frames before it first

    def _parse_frames(self):
        buf, frames, end, max_frame = self._buf, self._frames, self._end, self.max_frame
        start = self._start
        size = HEADER.size
        while end - start >= size:
            # Fast path: a complete frame without out-of-band buffers.
            prefix, plen = _unpack_plain(buf, start)
            stop = start + size + plen
            if prefix == _PLAIN and stop <= end and plen <= max_frame:
                self._start = start   # where a checksum error leaves the stream
                frames.append(Frame(_checked(buf, start + size, stop)))
                start = stop
                continue
            self._start = start
            if not self._parse_one():
                return
            start = self._start
        self._start = start
        if start == end:
            self._start = self._end = 0

    def _parse_one(self):
        """Check the frame at ``_start``; take it if complete. False when more data is needed."""
        buf, start = self._buf, self._start
        avail = self._end - start
        magic, version, flags, nbuf, plen = HEADER.unpack_from(buf, start)
        if magic != MAGIC:
            raise ProtocolError("bad frame magic %r - wire protocol corruption?" % bytes(magic))
        if version != VERSION:
            raise ProtocolError("unknown wire protocol version %d" % version)
        if (plen < CHECK_BELOW) != (flags == CHECKED):
            raise ProtocolError(
                "frame flags %#x do not fit a payload of %d bytes (payloads under %d bytes "
                "carry a checksum) - wire protocol corruption?" % (flags, plen, CHECK_BELOW))
        if nbuf > MAX_BUFFERS:
            raise ProtocolError(
                "frame declares %d out-of-band buffers (limit %d) - "
                "wire protocol corruption?" % (nbuf, MAX_BUFFERS))
        hsize = HEADER.size + LENGTH.size * nbuf
        if avail < hsize:
            self._make_room(hsize)   # the table of lengths fits in READ_CHUNK
            return False
        lens = struct.unpack_from("<%dQ" % nbuf, buf, start + HEADER.size) if nbuf else ()
        body = plen + sum(lens)
        if body > self.max_frame:
            raise ProtocolError(
                "frame of %d bytes exceeds the limit of %d bytes" % (body, self.max_frame))
        if avail >= hsize + body:
            first = start + hsize
            self._frames.append(_split_copy(buf, first, plen, lens))
            self._start = first + body
            return True
        if hsize + body <= READ_CHUNK:
            self._make_room(hsize + body)
            return False
        # Too big for the read buffer: move what we have into a buffer of its own.
        have = avail - hsize
        data = mmap.mmap(-1, max(have, min(body, GROW_FROM)), flags=mmap.MAP_PRIVATE)
        data[:have] = buf[start + hsize: self._end]
        self._start = self._end = 0
        self._large = (plen, lens, data, have, body)
        return False


def _checked(buf, first, stop):
    """The payload in ``buf[first:stop]`` without its checksum, once the checksum agrees."""
    view = memoryview(buf)
    end = stop - _CRC.size
    if end < first or zlib.crc32(view[first:end]) != _CRC.unpack_from(buf, end)[0]:
        raise ProtocolError("frame checksum mismatch - wire protocol corruption?")
    return bytes(view[first:end])


def _split(view, plen, lens):
    """Frame over a buffer owned by this frame alone (no copies)."""
    buffers = []
    pos = plen
    for n in lens:
        buffers.append(view[pos:pos + n])
        pos += n
    payload = _checked(view, 0, plen) if plen < CHECK_BELOW else view[:plen]
    return Frame(payload, buffers)


def _split_copy(buf, first, plen, lens):
    """Frame copied out of the shared read buffer, which will be reused."""
    view = memoryview(buf)
    payload = _checked(buf, first, first + plen)   # large payloads never come this way
    buffers = []
    pos = first + plen
    for n in lens:
        buffers.append(bytearray(view[pos:pos + n]))
        pos += n
    return Frame(payload, buffers)
