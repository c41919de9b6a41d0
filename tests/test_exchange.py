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


# -- children that close their channel and linger before exiting --------------------------

QUICK = 1.0     # seconds: generous, the calls below wait 0.1 s at most


def closes_then_lingers(channel, release, code, send=True):
    """Send (or not), close the channel, then stay alive until one byte comes on ``release``."""
    if send:
        channel.send("sent")
    channel.close()
    os.read(release, 1)
    os._exit(code)


@pytest.fixture
def gate():
    """A pipe that keeps lingering children alive until ``gate.open()``; always opened at the end."""
    class Gate:
        def __init__(self):
            self.r, self._w = os.pipe()

        def open(self, n=1):
            os.write(self._w, b"x" * n)

    g = Gate()
    try:
        yield g
    finally:
        g.open(64)              # release any child a failing test left waiting,
        forkexec.waitall()      # and reap it (a passing test reaped it already)
        os.close(g.r)
        os.close(g._w)


class Recording(Collect):
    """Collect, recording store_died reports instead of raising them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.died = []

    def store_died(self, channel, error):
        self.died.append(error)


def timed(fn, *args):
    started = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - started


def store_until_ended(ex, channel):
    """store(0.1) until ``channel`` is no longer watched; returns the longest call."""
    longest, deadline = 0.0, time.monotonic() + 10
    while channel in ex.active() and time.monotonic() < deadline:
        _, took = timed(ex.store, 0.1)
        longest = max(longest, took)
    assert channel not in ex.active()
    return longest


def test_store_does_not_wait_for_a_child_that_lingers_after_closing(gate):
    ex = Recording()
    channel = forkexec.start(closes_then_lingers, gate.r, 5)
    ex.add(channel)
    assert store_until_ended(ex, channel) < QUICK
    assert ex.got == ["sent"] and ex.died == []        # its exit status is not known yet
    assert channel.pid in children()                    # still running: not waited for
    assert ex.active() == [] and ex.unfinished()        # its end is still to be judged
    _, took = timed(ex.store, 0.1)                      # nothing left but the lingering child
    assert took < QUICK and ex.died == []
    gate.open()
    ex.finish()                                         # reaps it and reports the exit code
    assert [exitcode_of(e) for e in ex.died] == [5] and ex.died[0].pid == channel.pid
    assert str(ex.died[0]) == "child process %d ended abnormally (exit code 5)" % channel.pid
    assert no_processes_left()


def test_ready_does_not_wait_for_a_child_that_lingers_after_closing(gate):
    ex = Recording()
    channel = forkexec.start(closes_then_lingers, gate.r, 4, send=False)
    ex.add(channel)
    longest, deadline = 0.0, time.monotonic() + 10
    while ex.active() and time.monotonic() < deadline:
        ready, took = timed(ex.ready, 0.1)
        assert ready == []
        longest = max(longest, took)
    assert ex.active() == [] and longest < QUICK
    assert ex.died == [] and channel.pid in children()
    gate.open()
    ex.finish()
    assert [exitcode_of(e) for e in ex.died] == [4]
    assert str(ex.died[0]) == (
        "child process %d ended without sending a result (exit code 4)" % channel.pid)
    assert no_processes_left()


def test_a_store_loop_on_unfinished_reports_the_lingering_childs_death(gate):
    ex = Recording()
    channel = forkexec.start(closes_then_lingers, gate.r, 9, send=False)
    ex.add(channel)
    longest, released, deadline = 0.0, False, time.monotonic() + 10
    while ex.unfinished() and time.monotonic() < deadline:
        _, took = timed(ex.store, 0.1)
        longest = max(longest, took)
        if not ex.active() and not released:
            assert ex.died == []
            gate.open()
            released = True
    assert longest < QUICK and not ex.unfinished()
    assert [exitcode_of(e) for e in ex.died] == [9]
    ex.finish()
    assert no_processes_left()


def test_a_lingering_child_that_exits_cleanly_after_its_result_is_not_reported(gate):
    ex = Recording()
    channel = forkexec.start(closes_then_lingers, gate.r, 0)
    ex.add(channel)
    assert store_until_ended(ex, channel) < QUICK
    gate.open()
    ex.finish()
    assert ex.got == ["sent"] and ex.died == [] and channel.status == 0
    assert no_processes_left()


def test_a_later_store_reports_the_lingering_childs_death(gate):
    ex = Recording()
    channel = forkexec.start(closes_then_lingers, gate.r, 6, send=False)
    ex.add(channel)
    assert store_until_ended(ex, channel) < QUICK and ex.died == []
    gate.open()
    deadline = time.monotonic() + 10
    while not ex.died and time.monotonic() < deadline:
        _, took = timed(ex.store, 0.1)
        assert took < QUICK
    assert [exitcode_of(e) for e in ex.died] == [6]
    assert no_processes_left()


def test_the_default_store_died_raises_when_the_lingering_child_is_reaped(gate):
    ex = Collect()
    channel = forkexec.start(closes_then_lingers, gate.r, 7)
    ex.add(channel)
    assert store_until_ended(ex, channel) < QUICK
    gate.open()
    with pytest.raises(ChannelBroken, match=r"ended abnormally \(exit code 7\)$") as info:
        ex.finish()
    assert info.value.pid == channel.pid and exitcode_of(info.value) == 7
    ex.finish()                                         # reported once, not again
    assert ex.got == ["sent"]
    assert no_processes_left()


def test_a_lingering_child_counts_against_the_limit_until_reaped(gate):
    ex = Recording(limit=1)
    channel = forkexec.start(closes_then_lingers, gate.r, 0)
    ex.add(channel)
    assert store_until_ended(ex, channel) < QUICK
    assert ex.busy()                                    # not running work, but still alive
    gate.open()
    ex.wait()
    assert not ex.busy() and ex.died == []
    assert no_processes_left()


def test_queue_and_map_report_a_lingering_child_at_its_place(gate):
    q = Queue()
    q.start(closes_then_lingers, gate.r, 3, send=False)
    q.start(dies, "fine")
    lingering = q.active()[0]
    assert store_until_ended(q, lingering) < QUICK
    gate.open()
    got = []
    for _ in range(2):
        try:
            got.append(next(q))
        except ChannelBroken as exc:
            got.append(exitcode_of(exc))
    assert sorted(got, key=str) == [3, "fine"]
    assert list(q) == []

    m = Map()
    m.start(dies, "fine")
    m.start(closes_then_lingers, gate.r, 3, send=False)
    lingering = m.active()[1]
    assert store_until_ended(m, lingering) < QUICK
    gate.open()
    assert m[0] == "fine"
    with pytest.raises(ChannelBroken) as info:
        m[1]
    assert exitcode_of(info.value) == 3 and info.value.pid == lingering.pid
    m.finish()
    assert no_processes_left()


def test_close_does_not_wait_for_a_lingering_child_and_finish_still_reports_it(gate):
    ex = Recording()
    channel = forkexec.start(closes_then_lingers, gate.r, 2)
    ex.add(channel)
    assert store_until_ended(ex, channel) < QUICK
    _, took = timed(ex.close)
    assert took < QUICK and channel.pid in children()
    gate.open()
    ex.finish()
    assert [exitcode_of(e) for e in ex.died] == [2]
    assert no_processes_left()


def test_an_exited_child_is_judged_at_once():
    ex = Recording()
    ex.start(dies, "exit3")
    channel = ex.active()[0]
    assert channel.wait() is not None                   # reaped here: its status is known
    assert store_until_ended(ex, channel) < QUICK
    assert [exitcode_of(e) for e in ex.died] == [3] and not ex._unreaped
    assert no_processes_left()
