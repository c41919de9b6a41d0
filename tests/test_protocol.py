"""The records between the executor's processes, without processes.

Control records travel over a ``SOCK_SEQPACKET`` socketpair in this process, a
descriptor with them by ``SCM_RIGHTS``; the worker messages (``Batch``,
``Results``, ``InitFailed``, ``WorkerError``) round-trip through pickle and
through the wire framing the channels use.
"""

import os
import pickle
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkexec import wire
from forkexec._protocol import (
    MARKS_PER_SLOT, NO_TASK, RETIRE, Batch, Control, ControlRecord, InitFailed, Kind, Results,
    Retiring, Status, WorkerError, from_wire, recv_record, send_record, to_wire)

PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
INT32 = st.integers(-2 ** 31, 2 ** 31 - 1)
KINDS = [Control.SPAWN, Control.SIGNAL, Control.EXIT, Control.SPAWNED, Control.EXITED,
         Control.SPAWN_FAILED]


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


# -- control records ----------------------------------------------------------------------

def test_control_kinds_are_distinct_small_numbers():
    assert sorted(KINDS) == list(range(6))


@pytest.mark.parametrize("kind", KINDS)
def test_each_control_kind_round_trips(pair, kind):
    a, b = pair
    send_record(a, kind, 12, -34, 56)
    assert recv_record(b) == ControlRecord(kind, 12, -34, 56, None)


def test_fields_default_to_zero(pair):
    a, b = pair
    send_record(a, Control.EXIT)
    record = recv_record(b)
    assert (record.kind, record.a, record.b, record.c, record.fd) == (Control.EXIT, 0, 0, 0, None)


@PROPERTY
@given(kind=st.sampled_from(KINDS), a=INT32, b=INT32, c=INT32)
def test_any_int32_fields_round_trip(kind, a, b, c):
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        send_record(left, kind, a, b, c)
        assert recv_record(right) == (kind, a, b, c, None)
    finally:
        left.close()
        right.close()


def test_a_field_out_of_range_is_refused_not_truncated(pair):
    a, _ = pair
    with pytest.raises(struct.error):
        send_record(a, Control.SPAWNED, 2 ** 31)


def test_records_keep_their_boundaries_and_order(pair):
    a, b = pair
    sent = [(Control.SPAWN, 0, 0, 0), (Control.SIGNAL, 15, 3000, 0), (Control.EXITED, 123, 9, 0),
            (Control.SPAWN_FAILED, 2, 11, 0), (Control.EXIT, 0, 0, 0)]
    for record in sent:
        send_record(a, *record)
    assert [tuple(recv_record(b))[:4] for _ in sent] == sent
    with pytest.raises(BlockingIOError):
        recv_record(b)


def test_spawned_carries_a_working_descriptor(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        send_record(a, Control.SPAWNED, 3, 4567, fd=w)
        record = recv_record(b)
    finally:
        os.close(w)   # the sender's copy; the record brought its own
    try:
        assert (record.kind, record.a, record.b) == (Control.SPAWNED, 3, 4567)
        assert record.fd is not None and record.fd not in (r, w)
        os.write(record.fd, b"through the passed fd")
    finally:
        if record.fd is not None:
            os.close(record.fd)
    assert os.read(r, 100) == b"through the passed fd"
    assert os.read(r, 100) == b""   # no copy of the write end is left open anywhere
    os.close(r)


def test_a_passed_descriptor_is_not_inheritable(pair):
    """PEP 446: descriptors Python creates are not inherited by programs the parent
    runs (``os.posix_spawn``, ``subprocess`` with ``close_fds=False``, ``os.exec*``
    after a fork); a worker's channel received from the template must not be either,
    or another program could hold it open."""
    a, b = pair
    r, w = os.pipe()
    assert not os.get_inheritable(w)
    send_record(a, Control.SPAWNED, 3, 4567, fd=w)
    os.close(w)
    record = recv_record(b)
    try:
        assert not os.get_inheritable(record.fd)
    finally:
        os.close(record.fd)
        os.close(r)


def test_a_passed_socket_stays_a_socket(pair):
    """The parent's end of a worker's channel arrives as a socket it can wrap."""
    a, b = pair
    mine, theirs = socket.socketpair()
    try:
        send_record(a, Control.SPAWNED, 0, 1, fd=mine.fileno())
        record = recv_record(b)
        mine.close()
        channel = socket.socket(fileno=record.fd)
        try:
            channel.sendall(b"ping")
            assert theirs.recv(4) == b"ping"
        finally:
            channel.close()
    finally:
        theirs.close()


def test_records_without_descriptors_after_one_with(pair):
    a, b = pair
    r, w = os.pipe()
    send_record(a, Control.SPAWNED, 0, 1, fd=w)
    send_record(a, Control.EXITED, 1, 0)
    os.close(w)
    first, second = recv_record(b), recv_record(b)
    os.close(first.fd)
    os.close(r)
    assert second == ControlRecord(Control.EXITED, 1, 0, 0, None)


def test_eof_is_none(pair):
    a, b = pair
    send_record(a, Control.EXITED, 5, 0)
    a.shutdown(socket.SHUT_WR)
    assert recv_record(b).kind == Control.EXITED
    assert recv_record(b) is None


def test_eof_after_close_is_none():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.close()
    try:
        assert recv_record(b) is None
    finally:
        b.close()


def test_nothing_queued_is_blocking_io_error(pair):
    _, b = pair
    with pytest.raises(BlockingIOError):
        recv_record(b)


# -- worker messages ----------------------------------------------------------------------

def through_wire(obj):
    """Encode as a channel does and decode the frame."""
    decoder = wire.Decoder()
    decoder.feed(b"".join(bytes(part) for part in wire.encode(obj)))
    [frame] = decoder.pop_frames()
    return wire.loads(frame)


MESSAGES = [
    Batch([(1, Kind.CALL, b"call"), (2, Kind.CHUNK, b"chunk")], 0.25),
    Batch([(7, Kind.CALL, b"")], None),
    Results(True, [(1, Status.OK, b"pickled", 0.5), (2, Status.INLINE_OK, 42, 1e-6),
                   (3, Status.FAILED, b"failure", 0.0)], ()),
    Results(False, [], [4, 5, 6]),
    InitFailed(b"a pickled RemoteFailure"),
    WorkerError("Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_pickle_round_trip(message):
    back = pickle.loads(pickle.dumps(message, protocol=5))
    assert back == message and type(back) is type(message)
    assert back._fields == message._fields


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_wire_round_trip(message):
    back = through_wire(message)
    assert back == message and type(back) is type(message)


@pytest.mark.parametrize("message", MESSAGES + [RETIRE, Retiring("memory")],
                         ids=lambda m: type(m).__name__)
def test_records_travel_as_plain_tuples_and_come_back_named(message):
    sent = to_wire(message)
    assert type(sent) is tuple
    payload, _ = wire.dumps(sent)
    assert b"_protocol" not in payload, "the record's class travels by name"
    back = from_wire(through_wire(sent))
    assert back == message and type(back) is type(message)


@pytest.mark.parametrize("garbage", [None, 7, (), (99, 1), (0, 1), "text", (1, 2, 3, 4, 5)])
def test_a_message_that_is_no_record_reads_as_none(garbage):
    assert from_wire(garbage) is None


def test_a_batch_with_a_large_blob_out_of_band():
    """The loop wraps large blobs in a PickleBuffer so they travel uncopied."""
    big = os.urandom(wire.OUT_OF_BAND_MIN + 123)
    message = Batch([(1, Kind.CALL, pickle.PickleBuffer(big)), (2, Kind.CALL, b"small")], 0.5)
    payload, buffers = wire.dumps(message)
    assert len(buffers) == 1 and len(payload) < len(big)
    back = through_wire(message)
    assert back.give_back_after == 0.5
    (i1, k1, b1), (i2, k2, b2) = back.tasks
    assert (i1, k1, bytes(b1)) == (1, Kind.CALL, big)
    assert (i2, k2, b2) == (2, Kind.CALL, b"small")


@PROPERTY
@given(tasks=st.lists(st.tuples(st.integers(0, 2 ** 62), st.sampled_from([Kind.CALL,
                                                                          Kind.CHUNK]),
                                st.binary(max_size=64)), max_size=20),
       give_back_after=st.one_of(st.none(), st.floats(0, 10)))
def test_any_batch_round_trips(tasks, give_back_after):
    message = Batch(tasks, give_back_after)
    assert through_wire(message) == message


@PROPERTY
@given(batch_done=st.booleans(),
       entries=st.lists(st.tuples(st.integers(0, 2 ** 62),
                                  st.sampled_from([Status.OK, Status.FAILED]),
                                  st.binary(max_size=64), st.floats(0, 100)), max_size=20),
       returned=st.lists(st.integers(0, 2 ** 62), max_size=10))
def test_any_results_round_trip(batch_done, entries, returned):
    message = Results(batch_done, entries, returned)
    assert through_wire(message) == message


def test_status_and_kind_values_are_explicit_and_distinct():
    assert (Status.FAILED, Status.OK, Status.INLINE_OK) == (0, 1, 2)
    assert (Kind.CALL, Kind.CHUNK) == (0, 1)


def test_mark_layout():
    assert MARKS_PER_SLOT == 2
    assert NO_TASK == -1
