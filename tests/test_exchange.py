"""Exchange, Queue, Map, pmap: many children, a hard limit, reuse and continuous modes."""

import os
import signal
import threading
import time

import pytest

import forkexec
from forkexec import (ChannelBroken, Exchange, MakeParallel, MakeReusable, Map, Queue,
                      RemoteTraceback, pmap)
from conftest import _stat, descendants


class Collect(Exchange):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.got = []

    def store_data(self, channel):
        self.got.append(channel.receive())


def children(parent=None):
    """{pid: state} of the direct children of ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found = {}
    for name in os.listdir("/proc"):
        info = _stat(int(name)) if name.isdigit() else None
        if info is not None and info[0] == parent:
            found[int(name)] = info[1]
    return found


def siblings():
    """How many processes (zombies included) the parent of this child has."""
    return len(children(os.getppid()))


def square(x):
    return x * x


def report(x, hold=0.02):
    """Child work: (x, pid, processes of the parent while running)."""
    seen = siblings()
    time.sleep(hold)            # stay alive a little, so children overlap
    return x, os.getpid(), max(seen, siblings())


def wait_for_go(channel, value):
    channel.receive()
    channel.send(value)


def dies(channel, how):
    if how == "exit3":
        os._exit(3)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "raise":
        raise LookupError("no such thing")
    channel.send(how)


def stream(channel, n):
    for i in range(n):
        channel.send((os.getpid(), i))


def no_processes_left():
    return descendants() == {}


# -- the base Exchange ----------------------------------------------------------------

def test_base_store_data_is_abstract():
    with pytest.raises(NotImplementedError,
                       match=r"^Exchange.store_data must be defined by a subclass$"):
        Exchange().store_data(None)


def test_add_remove_active_ready():
    first = forkexec.start(wait_for_go, "first")
    second = forkexec.start(wait_for_go, "second")
    ex = Exchange([first])
    ex.add(second)
    assert ex.active() == [first, second] and isinstance(ex.active(), list)
    started = time.monotonic()
    assert ex.ready(0.2) == []
    assert 0.15 <= time.monotonic() - started < 10          # seconds, not milliseconds
    second.send("go")
    assert ex.ready(10) == [second]
    assert second.receive() == "second"
    ex.remove(second)
    assert ex.active() == [first] and second.closed
    first.send("go")
    assert ex.ready(10) == [first] and first.receive() == "first"
    ex.finish()
    assert not ex.unfinished() and ex.active() == []
    assert no_processes_left()


def test_remove_does_not_block_on_a_child_that_keeps_running():
    r, w = os.pipe()

    def closes_then_lingers(channel):
        channel.close()
        os.read(r, 1)

    channel = forkexec.start(closes_then_lingers)
    ex = Collect([channel])
    started = time.monotonic()
    ex.remove(channel)
    assert time.monotonic() - started < 1.5
    assert channel.pid in children()
    os.write(w, b"x")
    ex.finish()
    os.close(r)
    os.close(w)
    assert no_processes_left()


def test_remove_without_autoclose_leaves_the_channel_open():
    channel = forkexec.start(wait_for_go, 7)
    ex = Collect([channel], autoclose=0)
    ex.remove(channel)
    assert not channel.closed and ex.active() == []
    channel.send("go")
    assert channel.receive() == 7
    channel.close()
    assert channel.wait() == 0


def test_store_unfinished_busy_finish():
    ex = Collect(limit=2)
    assert not ex.unfinished() and not ex.busy()
    for i in range(5):
        ex.start(MakeParallel(square), i)
    assert ex.unfinished() and ex.busy()
    ex.store(10)
    ex.finish()
    assert sorted(ex.got) == [0, 1, 4, 9, 16]
    assert not ex.unfinished() and not ex.busy()
    assert no_processes_left()


def test_manage():
    ex = Collect()
    fn = ex.manage(MakeParallel(square))
    for i in range(4):
        assert fn(i) is None
    ex.finish()
    assert sorted(ex.got) == [0, 1, 4, 9]


def test_reuse_with_continuous_is_refused():
    with pytest.raises(ValueError, match=r"^reuse and continuous cannot be combined"):
        Queue(reuse=1, continuous=1)


@pytest.mark.parametrize("limit", [0, -1])
def test_bad_limit_is_refused(limit):
    with pytest.raises(ValueError, match=r"^limit must be None or at least 1, not %d$" % limit):
        Exchange(limit=limit)


# -- the hard limit --------------------------------------------------------------------

def test_limit_is_hard_for_start():
    limit = 3
    q = Queue(limit=limit)
    for i in range(12):
        q.start(MakeParallel(report), i)
        assert len(children()) <= limit
    results = list(q)
    assert sorted(r[0] for r in results) == list(range(12))
    assert max(r[2] for r in results) <= limit
    assert no_processes_left()


def test_limit_is_hard_for_create():
    limit = 2
    q = Queue(limit=limit)
    for i in range(6):
        channel = q.create()
        if channel:
            try:
                channel.send(report(i))
            finally:
                os._exit(0)
        assert len(children()) <= limit
    results = list(q)
    assert sorted(r[0] for r in results) == list(range(6))
    assert max(r[2] for r in results) <= limit
    assert no_processes_left()


def test_add_wait_waits_until_a_process_is_gone():
    q = Queue(limit=1)
    first = forkexec.start(wait_for_go, 1)
    q.add(first)
    second = forkexec.start(wait_for_go, 2)
    first.send("go")
    q.add_wait(second)
    assert list(children()) == [second.pid]          # the first is reaped, not a zombie
    assert q.active() == [second] and next(q) == 1
    second.send("go")
    assert list(q) == [2]
    assert no_processes_left()


def test_wait_makes_room():
    q = Queue(limit=2)
    q.start(wait_for_go, "a")
    q.start(wait_for_go, "b")
    assert q.busy()
    q.active()[1].send("go")
    q.wait()
    assert not q.busy() and len(children()) == 1
    assert next(q) == "b"
    q.active()[0].send("go")
    assert list(q) == ["a"]


# -- reuse and continuous -----------------------------------------------------------------

def test_reuse_serves_many_tasks_with_the_same_processes():
    q = Queue(limit=2, reuse=1)
    for i in range(10):
        q.start(MakeReusable(report), i, hold=0)
    results = list(q)
    assert sorted(r[0] for r in results) == list(range(10))
    assert len({r[1] for r in results}) <= 2
    assert no_processes_left()


def test_reuse_with_map_keeps_submission_order():
    m = Map(limit=2, reuse=1)
    m(MakeReusable(report), range(8))
    results = list(m)
    assert [r[0] for r in results] == list(range(8))
    assert len({r[1] for r in results}) <= 2
    assert no_processes_left()


def test_continuous_children_send_many_messages():
    q = Queue(limit=2, continuous=1)
    for _ in range(3):
        q.start(stream, 50)
    results = list(q)
    assert len(results) == 150
    by_pid = {}
    for pid, i in results:
        by_pid.setdefault(pid, []).append(i)
    assert sorted(by_pid.values()) == [list(range(50))] * 3
    assert no_processes_left()


# -- Queue and Map --------------------------------------------------------------------------

def test_queue_yields_in_arrival_order():
    channels = [forkexec.start(wait_for_go, i) for i in range(3)]
    q = Queue(channels)
    assert len(q) == 0
    channels[2].send("go")
    assert next(q) == 2
    channels[0].send("go")
    while len(q) == 0:
        q.store(10)
    assert len(q) == 1 and q.next() == 0 and len(q) == 0
    channels[1].send("go")
    assert list(q) == [1]
    with pytest.raises(StopIteration):
        next(q)
    assert no_processes_left()


def test_map_yields_in_submission_order():
    m = Map()
    for i in range(4):
        m.start(MakeParallel(report), i, hold=0.03 * (4 - i))     # later items finish first
    assert len(m) == 4
    assert [r[0] for r in m] == [0, 1, 2, 3]
    with pytest.raises(StopIteration):
        next(m)
    assert list(m) == []                                     # iterates once
    assert no_processes_left()


def test_map_indexing():
    m = Map(limit=3)(square, range(7))
    assert m[-1] == 36 and m[2] == 4
    assert m[1:4] == [1, 4, 9] and m[::3] == [0, 9, 36] and m[:] == [x * x for x in range(7)]
    with pytest.raises(IndexError):
        m[7]
    with pytest.raises(IndexError):
        m[-8]
    m.finish()
    assert no_processes_left()


def test_map_with_create():
    m = Map(limit=2)
    for i in range(4):
        channel = m.create()
        if channel:
            try:
                channel.send(i * 10)
            finally:
                os._exit(0)
    assert list(m) == [0, 10, 20, 30]
    assert no_processes_left()


@pytest.mark.parametrize("limit", [None, 2])
def test_pmap(limit):
    results = pmap(report, range(6), limit=limit)
    assert [r[0] for r in results] == list(range(6))
    if limit:
        assert max(r[2] for r in pmap(report, range(6), limit=limit)) <= limit
    assert no_processes_left()


def test_buffered_message_is_delivered_without_waiting():
    def two_then_wait(channel):
        channel.send_many([1, 2])           # one write
        channel.receive()                   # then nothing more until told

    channel = forkexec.start(two_then_wait)
    rescue = threading.Timer(8, channel.send, ("stop",))
    rescue.start()
    try:
        q = Queue([channel], continuous=1)
        started = time.monotonic()
        assert next(q) == 1 and next(q) == 2
        assert time.monotonic() - started < 5
        ex = Exchange()
        other = forkexec.start(two_then_wait)
        ex.add(other)
        assert ex.ready(10) == [other] and other.receive() == 1
        started = time.monotonic()
        assert ex.ready(6) == [other] and other.receive() == 2
        assert time.monotonic() - started < 5
        other.send("stop")
        ex.finish()
    finally:
        rescue.cancel()
        rescue.join()
    channel.send("stop")
    assert list(q) == []
    assert no_processes_left()


# -- children that fail ---------------------------------------------------------------------

def exitcode_of(error):
    assert isinstance(error, ChannelBroken)
    return error.exitcode


def test_queue_reports_children_that_die_without_sending():
    q = Queue()
    pids = {}
    for how in ["exit3", "kill", "fine"]:
        q.start(dies, how)
        pids[how] = q.active()[-1].pid
    results, errors = [], {}
    while True:
        try:
            results.append(next(q))
        except StopIteration:
            break
        except ChannelBroken as exc:
            errors[exc.pid] = exc
    assert results == ["fine"]
    assert exitcode_of(errors[pids["exit3"]]) == 3
    assert exitcode_of(errors[pids["kill"]]) == -9
    assert str(errors[pids["exit3"]]) == (
        "child process %d ended without sending a result (exit code 3)" % pids["exit3"])
    assert "killed by SIGKILL(-9)" in str(errors[pids["kill"]])
    assert no_processes_left()


def test_queue_raises_a_child_exception_and_goes_on():
    q = Queue()
    q.start(dies, "raise")
    q.start(dies, "fine")
    got, raised = [], []
    while True:
        try:
            got.append(next(q))
        except StopIteration:
            break
        except LookupError as exc:
            raised.append(exc)
    assert got == ["fine"] and len(raised) == 1
    assert isinstance(raised[0].__cause__, RemoteTraceback)
    assert "no such thing" in str(raised[0].__cause__)
    assert no_processes_left()


def test_map_reports_failures_at_their_index():
    m = Map()
    for how in ["fine", "exit3", "raise", "kill", "fine"]:
        m.start(dies, how)
    with pytest.raises(ChannelBroken) as info:
        m[1]
    assert exitcode_of(info.value) == 3 and info.value.pid > 0
    assert m[0] == "fine" and m[4] == "fine"
    with pytest.raises(LookupError, match="^no such thing$"):
        m[2]
    with pytest.raises(ChannelBroken) as info:
        m[3]
    assert exitcode_of(info.value) == -9
    m.finish()
    assert no_processes_left()
