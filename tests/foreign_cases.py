"""The native API on an executor (``executor=``): one set of test bodies for every executor.

``test_foreign.py`` runs them on threads and on ForkExchangeExecutor, and
``test_foreign_dask.py`` on a Dask ``LocalCluster``; each module defines the
``executor`` fixture, and ``dying_executor`` (one whose workers are processes
that may die alone) with ``death_cause``, the type name of the executor's own
error that a WorkerDiedError carries as its cause. The task functions live
here, at module level, so that every executor finds them by reference (Dask's
workers import this module). Results are compared with the same program run the
default way, in forked children.
"""

import os
import signal
import socket
import threading
import time

import pytest

import forkexec
from forkexec import (Channel, ChannelBroken, Exchange, LocalOnlyError, MakeParallel,
                      MakeReusable, Map, PersistentQueue, Queue, WorkerDiedError, pmap)


# -- what the tasks run -------------------------------------------------------------------

def square(x):
    return x * x


def late_square(x, delay):
    time.sleep(delay)
    return x * x


def cell(row, col):
    """A cell of pprocess's 'simple' examples' grid: (row, col, value)."""
    return row, col, row * 10 + col


def send_twice(channel, x):
    """A pprocess-style callable: its first parameter is the channel."""
    channel.send(x)
    channel.send(-x)


def send_then_fail(channel, x):
    channel.send(x)
    raise KeyError("after sending %d" % x)


def sends_nothing(channel):
    pass


def asks_parent(channel):
    channel.send("before asking")
    return channel.receive()


def fail_on(x, bad):
    if x == bad:
        raise LookupError("no item %d" % x)
    return x


def die_on(x, victim):
    if x == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


class Counting:
    """An executor wrapper counting the calls submitted and not yet done."""

    def __init__(self, executor):
        self.executor = executor
        self.lock = threading.Lock()   # guards running and peak (done callbacks: any thread)
        self.running = self.peak = self.submitted = 0

    def submit(self, fn, *args, **kwargs):
        with self.lock:
            self.running += 1
            self.submitted += 1
            self.peak = max(self.peak, self.running)
        future = self.executor.submit(fn, *args, **kwargs)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future):
        with self.lock:
            self.running -= 1


class Collect(Exchange):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.got = []

    def store_data(self, channel):
        self.got.append(channel.receive())


def drain(queue):
    """Every value of ``queue`` and every error, as ("ok", value) / ("error", exc)."""
    out = []
    while True:
        try:
            out.append(("ok", next(queue)))
        except StopIteration:
            return out
        except Exception as exc:
            out.append(("error", exc))


# -- the same results as the local run ------------------------------------------------------

def test_pmap_gives_the_local_results(executor):
    local = list(pmap(square, range(12), limit=2))
    assert list(pmap(square, range(12), executor=executor)) == local == [x * x for x in range(12)]


def test_the_pprocess_grid_is_the_same(executor):
    def grid(**where):
        queue = Queue(limit=4, **where)
        compute = queue.manage(MakeParallel(cell))
        for row in range(10):
            for col in range(10):
                assert compute(row, col) is None
        return sorted(queue)

    assert grid(executor=executor) == grid() == [(r, c, r * 10 + c)
                                                 for r in range(10) for c in range(10)]


def test_map_keeps_submission_order_and_indexes(executor):
    m = Map(executor=executor)
    for i in range(4):
        m.start(MakeParallel(late_square), i, 0.05 * (4 - i))   # later items finish first
    assert len(m) == 4
    assert m[-1] == 9 and m[1:3] == [1, 4] and m[::2] == [0, 4]
    assert list(m) == [0, 1, 4, 9]
    with pytest.raises(IndexError):
        m[4]


def test_queue_yields_every_result_and_counts_what_is_buffered(executor):
    queue = Queue(executor=executor)
    for i in range(6):
        queue.start(MakeParallel(square), i)
    assert len(queue) == 0          # nothing stored before it is asked for
    first = next(queue)
    assert sorted([first] + list(queue)) == [0, 1, 4, 9, 16, 25]
    with pytest.raises(StopIteration):
        next(queue)


def test_the_limit_bounds_the_calls_in_flight(executor):
    counting = Counting(executor)
    m = Map(limit=2, executor=counting)
    for i in range(8):
        m.start(MakeParallel(late_square), i, 0.01)
    assert list(m) == [i * i for i in range(8)]
    assert counting.peak == 2 and counting.submitted == 8 and counting.running == 0


def test_manage_and_reuse_run_the_unwrapped_function(executor):
    queue = Queue(limit=2, reuse=1, executor=executor)
    compute = queue.manage(MakeReusable(square))
    for i in range(5):
        compute(i)
    assert sorted(queue) == [0, 1, 4, 9, 16]


def test_a_base_exchange_stores_through_store_data(executor):
    ex = Collect(limit=3, executor=executor)
    for i in range(5):
        ex.start(MakeParallel(square), i)
    assert ex.unfinished()
    ex.finish()
    assert sorted(ex.got) == [0, 1, 4, 9, 16] and not ex.unfinished()


# -- pprocess-style callables: a channel that can only send ---------------------------------

def test_a_callable_taking_a_channel_sends_its_messages_in_order(executor):
    queue = Queue(limit=2, continuous=1, executor=executor)
    for i in (1, 2, 3):
        queue.start(send_twice, i)
    results = list(queue)
    assert sorted(results) == [-3, -2, -1, 1, 2, 3]
    for i in (1, 2, 3):
        assert results.index(i) < results.index(-i)


def test_messages_sent_before_an_exception_arrive_then_it_is_raised(executor):
    queue = Queue(executor=executor)
    queue.start(send_then_fail, 7)
    got = drain(queue)
    assert got[0] == ("ok", 7) and len(got) == 2
    error = got[1][1]
    assert isinstance(error, KeyError) and error.args == ("after sending 7",)
    assert "send_then_fail" in str(error.__cause__)     # the remote traceback


def test_a_callable_that_sends_nothing_fails_at_its_place(executor):
    m = Map(executor=executor)
    m.start(sends_nothing)
    m.start(MakeParallel(square), 3)
    with pytest.raises(ChannelBroken, match=r"^sends_nothing\(\) ended without sending a "
                                            r"result$"):
        m[0]
    assert m[1] == 9


def test_receive_in_a_call_on_an_executor_is_refused_clearly(executor):
    queue = Queue(executor=executor)
    queue.start(asks_parent)
    got = drain(queue)
    assert got[0] == ("ok", "before asking")
    error = got[1][1]
    assert isinstance(error, LocalOnlyError)
    assert str(error).startswith("this call runs on an executor, not in a child forked by "
                                 "the exchange: it can send results but nothing can be "
                                 "received from the parent")


# -- failures ------------------------------------------------------------------------------

def test_a_task_exception_keeps_its_type_and_the_rest_goes_on(executor):
    m = Map(limit=2, executor=executor)
    for i in range(5):
        m.start(MakeParallel(fail_on), i, 2)
    assert m[0] == 0 and m[1] == 1
    with pytest.raises(LookupError, match=r"^no item 2$"):
        m[2]
    assert m[3:] == [3, 4]


def test_a_killed_worker_is_a_worker_died_error_at_its_place(dying_executor, death_cause):
    # One call at a time: Dask may give a worker a second call to hold while it runs
    # one, and a worker's death fails both (its allowed-failures counts them alike).
    m = Map(limit=1, executor=dying_executor)
    for i in range(3):
        m.start(MakeParallel(die_on), i, 1)
    assert m[0] == 0
    with pytest.raises(WorkerDiedError, match=r"running die_on.*died") as info:
        m[1]
    assert isinstance(info.value, forkexec.errors.BrokenProcessPool)
    assert type(info.value.__cause__).__name__ == death_cause
    assert m[2] == 2


# -- what only forked children can do -------------------------------------------------------

LOCAL_ONLY = r"needs a process forked by this one, so an exchange on an executor"


def test_create_is_refused(executor):
    with pytest.raises(LocalOnlyError, match=r"^create\(\) " + LOCAL_ONLY):
        Queue(executor=executor).create()


def test_a_raw_channel_is_refused(executor):
    mine, theirs = socket.socketpair()
    channel = Channel(0, mine)
    try:
        with pytest.raises(LocalOnlyError, match=r"^watching <Channel pid=0 .*> " + LOCAL_ONLY):
            Queue([channel], executor=executor)
        with pytest.raises(LocalOnlyError, match=LOCAL_ONLY):
            Map(executor=executor).add(channel)
    finally:
        channel.close()
        theirs.close()


def test_background_processes_are_refused(executor):
    with pytest.raises(LocalOnlyError, match=r"^PersistentQueue watches background "
                                             r"processes on this machine"):
        PersistentQueue(limit=2, executor=executor)
