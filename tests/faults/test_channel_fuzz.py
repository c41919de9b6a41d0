"""Hostile bytes on a channel: a protocol error, never a hang, crash or huge allocation.

Random, truncated, garbled and oversized byte streams are written into one end
of a socketpair; ``Channel.receive(timeout)`` on the other end must return
the objects that really came through and then raise ``ProtocolError``,
``ChannelBroken`` or ``TimeoutError`` - quickly, without allocating what a
garbled header claims. (tests/test_wire.py fuzzes the Decoder alone.)
"""

import ctypes
import socket
import struct
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkexec import Channel, ChannelBroken, ProtocolError, wire

from . import scripts
from .tasks import vm_size

#: glibc's malloc_trim (None elsewhere): gives freed heap memory back to the system.
MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXPECTED = (ProtocolError, ChannelBroken, TimeoutError)
#: receive() gets this long; a call must come back well within RETURN_WITHIN.
TIMEOUT = 0.05
RETURN_WITHIN = 5.0
#: Everything written fits in a socket buffer, so the writer never blocks.
MAX_STREAM = 48 * 1024
#: What the receiving side may hold on to, whatever a header claims.
MAX_GROWTH = 16 << 20
#: What the receiving side may touch at its peak for a message of a few bytes.
MAX_PEAK = 64 << 20

messages = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50)
    | st.binary(max_size=2000),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=5),
    max_leaves=20)


def frame_bytes(obj):
    return b"".join(bytes(b) for b in wire.encode(obj))


def held_memory():
    """The address space, once freed heap memory has been given back to the system
    (so what the unpickler freed does not count; the decoder's buffers do)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    return vm_size()


def drain(stream, close_writer):
    """Write ``stream`` into a socketpair and receive until an error.

    Returns (objects received, the exception that ended it).
    """
    assert len(stream) <= MAX_STREAM
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(0, reader)
    try:
        writer.sendall(stream)
        if close_writer:
            writer.close()
        before = held_memory()
        received = []
        # Each object needs at least a header, so this many calls must reach an error.
        for _ in range(len(stream) // wire.HEADER.size + 2):
            started = time.monotonic()
            try:
                received.append(channel.receive(TIMEOUT))
            except EXPECTED as exc:
                error = exc
                break
            finally:
                took = time.monotonic() - started
                assert took < RETURN_WITHIN, "receive(%s) took %.1fs" % (TIMEOUT, took)
                grown = held_memory() - before
                assert grown < MAX_GROWTH, "receiving grew the process by %d bytes" % grown
        else:
            raise AssertionError("receive() kept returning objects: %r" % received)
        return received, error
    finally:
        channel.close()
        writer.close()


@FUZZ
@given(st.binary(max_size=MAX_STREAM), st.booleans())
def test_random_bytes(stream, close_writer):
    drain(stream, close_writer)


@FUZZ
@given(st.lists(messages, min_size=1, max_size=4), st.data(), st.booleans())
def test_truncated_stream(objs, data, close_writer):
    stream = b"".join(frame_bytes(o) for o in objs)
    cut = data.draw(st.integers(0, len(stream) - 1), label="cut")
    received, error = drain(stream[:cut], close_writer)
    assert received == objs[:len(received)]
    assert isinstance(error, ChannelBroken if close_writer else TimeoutError), error


@FUZZ
@given(st.lists(messages, min_size=1, max_size=4),
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(1, 255)), min_size=1, max_size=8),
       st.binary(max_size=64), st.booleans())
def test_garbled_stream(objs, flips, junk, close_writer):
    stream = bytearray(b"".join(frame_bytes(o) for o in objs))
    for pos, xor in flips:
        stream[pos % len(stream)] ^= xor
    drain(bytes(stream + junk)[:MAX_STREAM], close_writer)


@FUZZ
@given(st.integers(0, (1 << 64) - 1),
       st.lists(st.integers(0, (1 << 64) - 1), max_size=3),
       st.binary(max_size=MAX_STREAM // 2), st.booleans())
def test_oversized_header(plen, lens, body, close_writer):
    """A header may claim any size; memory follows the bytes that really came."""
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, 0, len(lens), plen)
    head += b"".join(struct.pack("<Q", n) for n in lens)
    drain(head + body, close_writer)


def test_frame_claiming_just_under_the_limit_does_not_allocate_it():
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, 0, 0, wire.DEFAULT_MAX_FRAME - 1)
    received, error = drain(head + b"x" * 1000, close_writer=True)
    assert received == [] and isinstance(error, ChannelBroken)
    assert "in the middle of a message" in str(error)


def test_frame_over_the_limit_is_a_protocol_error():
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, 0, 0, wire.DEFAULT_MAX_FRAME + 1)
    received, error = drain(head, close_writer=False)
    assert received == [] and isinstance(error, ProtocolError)
    assert "exceeds the limit" in str(error)


def test_valid_frame_with_a_garbage_payload_is_a_protocol_error():
    payload = b"\x80\x05this is not a pickle"
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.CHECKED, 0, len(payload) + 4)
    payload += struct.pack("<I", zlib.crc32(payload))   # framed correctly: only unpickling fails
    received, error = drain(frame_bytes("ok") + head + payload, close_writer=False)
    assert received == ["ok"] and isinstance(error, ProtocolError), error


GARBLED_MEMO_INDEX = """
    import socket, struct
    from forkexec import Channel, ProtocolError, wire

    def peak():
        with open("/proc/self/status") as f:
            return [int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")][0]

    # A message garbled in transit: its header intact, its payload now reads "None,
    # memoize at index 10**7 (LONG_BINPUT), stop" - 12 bytes the unpickler obeys.
    frame = b"".join(bytes(b) for b in wire.encode("a message garbled in transit"))
    payload_size = len(frame) - wire.HEADER.size
    garbled = b"\\x80\\x05N" + b"r" + struct.pack("<I", 10 ** 7) + b"."
    frame = frame[:wire.HEADER.size] + garbled.ljust(payload_size, b"\\0")
    reader, writer = socket.socketpair()
    writer.sendall(frame)
    channel = Channel(0, reader)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # reset the peak resident size
    before = peak()
    try:
        print("received", repr(channel.receive(5)))
    except ProtocolError as exc:
        print("refused", exc)
    print(peak() - before)
"""


def test_a_garbled_payload_cannot_make_the_receiver_allocate_much():
    done = scripts.run(GARBLED_MEMO_INDEX)
    assert done.returncode == 0, done.stderr
    outcome, peak = done.stdout.splitlines()
    assert int(peak) < MAX_PEAK, "a 12-byte message touched %d MiB (%s)" % (int(peak) >> 20,
                                                                             outcome)
