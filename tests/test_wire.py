"""The wire protocol: round trips, incremental decoding, and hostile input."""

import collections
import datetime
import decimal
import fractions
import os
import pickle
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkexec import wire
from forkexec.errors import ProtocolError

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: Larger than the decoder's read buffer, so it takes the large-frame path.
BIG = 3 * wire.READ_CHUNK + 17

Point = collections.namedtuple("Point", "x y")


class Plain:
    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return type(other) is Plain and other.value == self.value


class Blob:
    """Pickles its data out of band, like a NumPy array."""

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return Blob, (pickle.PickleBuffer(self.data),)

    def __eq__(self, other):
        return type(other) is Blob and bytes(other.data) == bytes(self.data)


def frame_bytes(obj):
    return b"".join(bytes(b) for b in wire.encode(obj))


def decode(data, max_frame=wire.DEFAULT_MAX_FRAME):
    decoder = wire.Decoder(max_frame)
    decoder.feed(data)
    return [wire.loads(f) for f in decoder.pop_frames()], decoder


def self_referencing_list():
    lst = [1, 2]
    lst.append(lst)
    return lst


def header(nbuf=0, plen=0, magic=b"FX", version=wire.VERSION, lens=()):
    """A frame header with the flags a payload of ``plen`` bytes must have."""
    flags = wire.CHECKED if plen < wire.CHECK_BELOW else 0
    return wire.HEADER.pack(magic, version, flags, nbuf, plen) + b"".join(
        wire.LENGTH.pack(n) for n in lens)


def checked(payload):
    """A payload followed by its checksum, as a sender writes it."""
    return payload + struct.pack("<I", zlib.crc32(payload))


def vm_size():
    """This process's virtual memory size in bytes (counts untouched mmaps too)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


# -- round trips -----------------------------------------------------------------

ROUND_TRIP = [
    None, True, 0, -1, 2 ** 200, 1.5, float("inf"), 3 + 4j, "", "text", "ünïcødé ✓",
    b"", b"\x00\xff", bytearray(b"ba"), (), (1, (2, (3,))), [1, [2, []]], {"a": {"b": None}},
    {1, 2}, frozenset("ab"), fractions.Fraction(1, 3), decimal.Decimal("1.10"),
    datetime.datetime(2024, 2, 29, 12, 0), Point(1, 2), Plain([1, 2]), ValueError("boom"),
    list(range(20000)),                               # payload in its own iovec
    b"x" * (wire.OUT_OF_BAND_MIN - 1), b"y" * wire.OUT_OF_BAND_MIN,
    os.urandom(BIG), bytearray(os.urandom(BIG)),      # out of band, large-frame path
    [bytearray(BIG), b"z" * BIG],                     # nested: in band, large-frame path
    Blob(bytearray(b"q" * 100000)), [Blob(bytearray(os.urandom(70000))) for _ in range(3)],
]


@pytest.mark.parametrize("obj", ROUND_TRIP, ids=lambda o: type(o).__name__)
def test_round_trip(obj):
    (back,), decoder = decode(frame_bytes(obj))
    if isinstance(obj, ValueError):
        assert type(back) is ValueError and back.args == obj.args
    else:
        assert back == obj and type(back) is type(obj)
    assert decoder.at_boundary()


def test_round_trip_keeps_shared_and_recursive_structure():
    shared = [1]
    (back,), _ = decode(frame_bytes([shared, shared, self_referencing_list()]))
    assert back[0] is back[1]
    assert back[2][2] is back[2]


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_large_bytes_travel_out_of_band_without_a_copy(kind):
    data = kind(os.urandom(1 << 20))
    buffers = wire.encode(data)
    assert any(isinstance(b, memoryview) and b.obj is data for b in buffers)
    decoder = wire.Decoder()
    decoder.feed(b"".join(bytes(b) for b in buffers))
    (frame,) = decoder.pop_frames()
    assert len(frame.buffers) == 1 and len(frame.payload) < 100
    assert wire.loads(frame) == data


def test_out_of_band_buffers_of_one_frame_arrive_separately():
    blobs = [Blob(bytearray(os.urandom(70000 + i))) for i in range(4)]
    decoder = wire.Decoder()
    decoder.feed(frame_bytes(blobs))
    (frame,) = decoder.pop_frames()
    assert [len(b) for b in frame.buffers] == [70000, 70001, 70002, 70003]
    assert wire.loads(frame) == blobs


def test_buffers_past_the_limit_stay_in_band(monkeypatch):
    monkeypatch.setattr(wire, "MAX_BUFFERS", 2)
    blobs = [Blob(bytearray(os.urandom(70000))) for _ in range(3)]
    decoder = wire.Decoder()
    decoder.feed(frame_bytes(blobs))
    (frame,) = decoder.pop_frames()
    assert len(frame.buffers) == 2 and wire.loads(frame) == blobs


def test_unpicklable_object_raises_and_encodes_nothing():
    with pytest.raises(TypeError, match="lock"):
        wire.encode({"ok": 1, "bad": __import__("threading").Lock()})


# -- incremental feeding -------------------------------------------------------------

MESSAGES = [1, "two", {"three": [3]}, b"\x04" * 5000, list(range(6000)), None]


def test_frames_fed_byte_by_byte():
    frames = [frame_bytes(m) for m in MESSAGES]
    stream = b"".join(frames)
    boundaries = {sum(map(len, frames[:i])) for i in range(1, len(frames) + 1)}
    decoder = wire.Decoder()
    got = []
    for i in range(len(stream)):
        decoder.feed(stream[i:i + 1])
        got.extend(wire.loads(f) for f in decoder.pop_frames())
        assert decoder.at_boundary() == (i + 1 in boundaries)
    assert got == MESSAGES


def test_several_frames_in_one_feed():
    got, decoder = decode(b"".join(frame_bytes(m) for m in MESSAGES))
    assert got == MESSAGES and decoder.at_boundary()


small_objects = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=20)
#: Frames between the read buffer's first size and READ_CHUNK make it grow on the way.
MID_SIZED = [b"m" * (3 * wire.FIRST_CHUNK), "t" * (wire.READ_CHUNK // 3), list(range(30000))]
objects = small_objects | st.sampled_from([b"b" * BIG, bytearray(b"c" * BIG)] + MID_SIZED)


@FUZZ
@given(st.lists(objects, min_size=1, max_size=6), st.data())
def test_frames_in_random_splits(messages, data):
    stream = b"".join(frame_bytes(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = wire.Decoder()
    got = []
    for a, b in zip([0] + cuts, cuts + [len(stream)]):
        decoder.feed(stream[a:b])
        got.extend(wire.loads(f) for f in decoder.pop_frames())
    assert got == messages
    assert decoder.at_boundary() and decoder.buffered() == 0


@FUZZ
@given(st.lists(small_objects, min_size=1, max_size=4), st.data())
def test_truncated_stream_is_incomplete_not_an_error(messages, data):
    frames = [frame_bytes(m) for m in messages]
    stream = b"".join(frames)
    boundaries = {sum(len(f) for f in frames[:i]) for i in range(len(frames) + 1)}
    cut = data.draw(st.integers(1, len(stream) - 1).filter(lambda c: c not in boundaries))
    got, decoder = decode(stream[:cut])
    complete = max(i for i in range(len(frames) + 1) if sum(map(len, frames[:i])) <= cut)
    assert got == messages[:complete]
    assert not decoder.at_boundary()


# -- hostile input -------------------------------------------------------------------

def test_bad_magic_message():
    with pytest.raises(ProtocolError,
                       match=r"^bad frame magic b'XY' - wire protocol corruption\?$"):
        decode(header(magic=b"XY"))


def test_unknown_version_message():
    with pytest.raises(ProtocolError, match=r"^unknown wire protocol version 7$"):
        decode(header(version=7))


def test_too_many_buffers_message():
    n = wire.MAX_BUFFERS + 1
    with pytest.raises(ProtocolError, match=r"^frame declares %d out-of-band buffers "
                       r"\(limit %d\) - wire protocol corruption\?$" % (n, wire.MAX_BUFFERS)):
        decode(header(nbuf=n))


def test_oversized_frame_message():
    with pytest.raises(ProtocolError,
                       match=r"^frame of 1001 bytes exceeds the limit of 1000 bytes$"):
        decode(header(nbuf=2, plen=1, lens=(500, 500)), max_frame=1000)


def test_frame_at_the_limit_is_accepted():
    payload = checked(pickle.dumps(b"x" * 50, protocol=5))
    (back,), _ = decode(header(plen=len(payload)) + payload, max_frame=len(payload))
    assert back == b"x" * 50


def test_largest_buffer_table_is_parsed():
    """A header declaring the most buffers allowed is waited for, not a stall."""
    n = wire.MAX_BUFFERS
    blob = header(nbuf=n, plen=1, lens=[1] * n)
    _, decoder = decode(blob[:-5])
    assert not decoder.at_boundary()
    decoder.feed(blob[-5:] + b"p" + b"b" * (n - 1))
    assert not decoder.at_boundary() and not decoder.pop_frames()


@FUZZ
@given(st.binary(min_size=1, max_size=4000).filter(lambda b: not b.startswith(b"FX")))
def test_random_bytes(data):
    if len(data) < wire.HEADER.size:
        _, decoder = decode(data, max_frame=4096)
        assert not decoder.at_boundary()
    else:
        with pytest.raises(ProtocolError, match="^bad frame magic"):
            decode(data, max_frame=4096)


@FUZZ
@given(st.lists(small_objects, min_size=1, max_size=3),
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(1, 255)), min_size=1,
                max_size=8),
       st.integers(1, 4096))
def test_garbled_frames(messages, flips, chunk):
    stream = bytearray(b"".join(frame_bytes(m) for m in messages))
    for pos, xor in flips:
        stream[pos % len(stream)] ^= xor
    decoder = wire.Decoder(max_frame=1 << 16)
    tracemalloc.start()
    try:
        for i in range(0, len(stream), chunk):
            decoder.feed(stream[i:i + chunk])
            decoder.pop_frames()
    except ProtocolError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < wire.READ_CHUNK + 2 * len(stream) + 65536


@FUZZ
@given(st.integers(0, 1 << 40), st.lists(st.integers(0, 1 << 40), max_size=3),
       st.integers(0, 600000))
def test_declared_size_never_allocated_up_front(plen, lens, fed):
    """A header may claim a huge frame; memory follows the bytes that really came."""
    max_frame = 1 << 30
    blob = header(nbuf=len(lens), plen=plen, lens=lens)
    body = plen + sum(lens)
    decoder = wire.Decoder(max_frame)
    before = vm_size()
    if body > max_frame:
        with pytest.raises(ProtocolError, match="^frame of %d bytes exceeds" % body):
            decoder.feed(blob)
        return
    if not body:   # a complete frame whose payload is too short to hold its checksum
        with pytest.raises(ProtocolError, match="^frame checksum mismatch"):
            decoder.feed(blob)
        return
    decoder.feed(blob + b"\0" * min(fed, body - 1))
    grown = vm_size() - before
    assert grown <= 2 * fed + 2 * wire.READ_CHUNK + (1 << 20), grown
    if body:
        assert not decoder.at_boundary() and not decoder.pop_frames()


def test_large_frame_grows_with_the_data():
    decoder = wire.Decoder(max_frame=1 << 30)
    before = vm_size()
    decoder.feed(header(plen=1 << 29))
    for _ in range(4):
        decoder.feed(b"\0" * (1 << 20))
    grown = vm_size() - before
    assert 4 << 20 <= grown <= 12 << 20, grown
    assert decoder.buffered() == 4 << 20 and not decoder.at_boundary()


def test_error_is_sticky():
    decoder = wire.Decoder()
    with pytest.raises(ProtocolError):
        decoder.feed(header(magic=b"??"))
    with pytest.raises(ProtocolError):
        decoder.feed(frame_bytes(1))
