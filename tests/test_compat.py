"""The conventions of compat/pprocess.py and compat/procs.py that programs observe."""

import os
import sys
import time

import pytest

import conftest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "compat"))

import pprocess  # noqa: E402  (compat/, not the original)
import procs  # noqa: E402

import forkexec  # noqa: E402
from forkexec import ChannelBroken  # noqa: E402


def _done(exchange):
    """Reap every child (a Map returns results before their processes exit), then close."""
    exchange.finish()
    exchange.close()


def test_the_shims_come_from_compat():
    assert os.path.basename(os.path.dirname(pprocess.__file__)) == "compat"
    assert os.path.basename(os.path.dirname(procs.__file__)) == "compat"


# -- pprocess ---------------------------------------------------------------------

def _wait_for_go(channel):
    """A child that sends nothing until the parent tells it to."""
    channel.send(channel.receive())


class Collect(pprocess.Exchange):
    def store_data(self, channel):
        self.got.append(channel.receive())


class WaitingChild:
    """A Collect exchange watching one child that sends nothing until ``go()``."""

    def __init__(self):
        self.exchange = Collect()
        self.exchange.got = []
        self.channel = pprocess.start(_wait_for_go)
        self.exchange.add(self.channel)
        self.gone = False

    def go(self):
        if not self.gone:
            self.gone = True
            self.channel.send("go")


@pytest.fixture
def waiting():
    child = WaitingChild()
    yield child
    child.go()
    child.exchange.finish()
    child.exchange.close()


def test_ready_timeout_is_in_milliseconds(waiting):
    began = time.monotonic()
    assert waiting.exchange.ready(150) == []
    elapsed = time.monotonic() - began
    # 150 ms: not 150 s (the test would time out), and not zero.
    assert 0.14 <= elapsed < 10
    waiting.go()
    assert waiting.exchange.ready(30000) == [waiting.channel]
    assert waiting.channel.receive() == "go"


def test_store_timeout_is_in_milliseconds(waiting):
    began = time.monotonic()
    waiting.exchange.store(150)
    elapsed = time.monotonic() - began
    assert 0.14 <= elapsed < 10
    assert waiting.exchange.got == []
    waiting.go()
    waiting.exchange.finish()
    assert waiting.exchange.got == ["go"]


def _send_values(channel, values):
    for value in values:
        channel.send(value)


def test_receive_raises_a_received_exception_instance():
    channel = pprocess.start(_send_values, [1, ValueError("sent, not raised"), 2])
    try:
        assert channel.receive() == 1
        with pytest.raises(ValueError, match="^sent, not raised$"):
            channel.receive()
        assert channel.receive() == 2
    finally:
        channel.close()
        channel.wait()


def test_receive_returns_base_exceptions_that_are_not_exceptions():
    channel = pprocess.start(_send_values, [KeyboardInterrupt("a value")])
    try:
        value = channel.receive()
        assert type(value) is KeyboardInterrupt and value.args == ("a value",)
    finally:
        channel.close()
        channel.wait()


def _echo_what_receive_raises(channel):
    try:
        channel.receive()
    except LookupError as exc:
        channel.send("child caught %r" % (exc,))


def test_receive_raises_in_the_child_too():
    channel = pprocess.start(_echo_what_receive_raises)
    try:
        channel.send(KeyError("k"))
        assert channel.receive() == "child caught KeyError('k')"
    finally:
        channel.close()
        channel.wait()


def _fail(channel):
    raise ZeroDivisionError("in the child")


def test_a_childs_exception_is_raised_by_receive():
    channel = pprocess.start(_fail)
    try:
        with pytest.raises(ZeroDivisionError, match="in the child"):
            channel.receive()
    finally:
        channel.close()
        channel.wait()


def test_create_and_exit():
    channel = pprocess.create()
    if channel.pid == 0:
        try:
            channel.send(("child", os.getpid()))
        finally:
            pprocess.exit(channel)
    try:
        assert channel.receive() == ("child", channel.pid)
    finally:
        channel.close()
        channel.wait()
    assert os.WIFEXITED(channel.status) and os.WEXITSTATUS(channel.status) == 0


def test_exchange_create_returns_none_in_the_parent():
    queue = pprocess.Queue(limit=2)
    try:
        for i in range(4):
            channel = queue.create()
            if channel:
                try:
                    channel.send(i * i)
                finally:
                    pprocess.exit(channel)
            assert channel is None
        assert sorted(queue) == [0, 1, 4, 9]
    finally:
        _done(queue)


def _square(x):
    return x * x


def test_queue_len_next_and_dunder_next():
    queue = pprocess.Queue(limit=2)
    try:
        calc = queue.manage(pprocess.MakeParallel(_square))
        for i in range(3):
            calc(i)
        queue.finish()
        assert len(queue) == 3
        first = queue.next()
        second = next(queue)
        assert len(queue) == 1
        assert sorted([first, second] + list(queue)) == [0, 1, 4]
        assert len(queue) == 0
    finally:
        _done(queue)


def test_map_indexing_and_slicing():
    results = pprocess.pmap(_square, range(6), limit=3)
    try:
        assert results[4] == 16
        assert results[1:4] == [1, 4, 9]
        assert results[-1] == 25
        assert results[::2] == [0, 4, 16]
        with pytest.raises(IndexError):
            results[6]
        assert list(results) == [0, 1, 4, 9, 16, 25]
    finally:
        _done(results)


def test_map_of_a_reusable_callable():
    results = pprocess.Map(limit=2, reuse=1)
    try:
        calc = results.manage(pprocess.MakeReusable(_square))
        for i in range(7):
            calc(i)
        assert results[:] == [i * i for i in range(7)]
    finally:
        _done(results)


def test_queue_raises_a_failure_in_arrival_order():
    queue = pprocess.Queue()
    try:
        queue.add(pprocess.start(_send_values, [1, ValueError("second"), 2]))
        queue.finish()  # everything is in; nothing is raised yet
        assert len(queue) == 3
        assert next(queue) == 1
        with pytest.raises(ValueError, match="^second$"):
            next(queue)
        assert list(queue) == [2]
    finally:
        _done(queue)


def _square_but_not_one(x):
    if x == 1:
        raise ArithmeticError("not one")
    return x * x


def test_map_raises_a_failure_at_its_own_index():
    results = pprocess.pmap(_square_but_not_one, range(3))
    try:
        results.finish()
        assert results[2] == 4
        assert results[0] == 0
        with pytest.raises(ArithmeticError, match="^not one$"):
            results[1]
    finally:
        _done(results)


def _send_several(channel, count):
    for i in range(count):
        channel.send(i)


def test_a_ready_loop_sees_every_message_and_no_ended_channel():
    # The loop of the sdist's start_indexer: receive from what ready() returns
    # until no channel is active. A child that ends is removed, not returned.
    exchange = pprocess.Exchange()
    try:
        for count in (3, 5):
            exchange.add(pprocess.start(_send_several, count))
        got = []
        while exchange.active():
            for channel in exchange.ready():
                got.append(channel.receive())
        assert sorted(got) == [0, 0, 1, 1, 2, 2, 3, 4]
    finally:
        _done(exchange)


def _wait_until_gone(pid):
    """Wait for a background process (re-parented to this subreaper) to exit; reap it."""
    deadline = time.monotonic() + 10
    while conftest.descendants().get(pid, "Z") != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    conftest.reap_orphans()


def test_background_queue_receives_with_pprocess_conventions(tmp_path):
    address = str(tmp_path / "task.socket")
    pid = pprocess.BackgroundCallable(address, _send_values)([5, LookupError("sent")])
    queue = pprocess.BackgroundQueue(address)
    try:
        assert isinstance(queue, pprocess.PersistentQueue)
        assert queue.next() == 5
        with pytest.raises(LookupError, match="^sent$"):
            next(queue)
        assert list(queue) == []
    finally:
        queue.close()
        _wait_until_gone(pid)
    assert os.listdir(tmp_path) == []


def test_get_number_of_cores_is_the_usable_cpus():
    assert pprocess.get_number_of_cores() == forkexec.usable_cpus() >= 1


# -- procs -------------------------------------------------------------------------

def _linear(x, y):
    return 5 * x + 3 * y


def _plus_four(n):
    return n + 4


def test_call_yields_results_in_specification_order():
    specs = [procs.proc(_linear, 2, 7), procs.proc(_linear, x=-3, y=8),
             procs.proc(_plus_four, 38), procs.proc(_plus_four, n=95)]
    assert list(procs.call(specs)) == [31, 9, 42, 99]


def _read_one_byte(fd):
    return os.read(fd, 1)


def _write_one_byte(fd):
    return os.write(fd, b"x")


def test_call_keeps_order_when_a_later_call_finishes_first():
    r, w = os.pipe()
    try:
        # The first call cannot finish before the second one has.
        results = procs.call([procs.proc(_read_one_byte, r), procs.proc(_write_one_byte, w)])
        assert list(results) == [b"x", 1]
    finally:
        os.close(r)
        os.close(w)


def test_pmap_takes_several_sequences_like_map():
    assert list(procs.pmap(_linear, [12, 75, -2, 9], [5, -6, 0, 23])) == [75, 357, -10, 114]
    assert list(procs.pmap(_linear, [1, 2, 3], [10, 20])) == list(map(_linear, [1, 2, 3],
                                                                      [10, 20]))


def test_results_are_copies():
    thing = [object()]
    assert next(procs.call([procs.proc(lambda obj: obj, thing)])) is not thing


def _double_odd(x):
    if x % 2 == 1:
        return x + x
    raise ValueError("not odd", x)


def test_a_failed_call_yields_failed_in_its_place(capfd):
    results = list(procs.pmap(_double_odd, [1, 3, 6, 7]))
    assert results[:2] == [2, 6] and results[3] == 14
    failed = results[2]
    assert isinstance(failed, procs.Failed) and isinstance(failed, Exception)
    (original,) = failed.args
    assert type(original) is ValueError and original.args == ("not odd", 6)
    err = capfd.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "ValueError: ('not odd', 6)" in err


def test_a_process_that_dies_yields_failed():
    results = list(procs.pmap(os._exit, [7]))
    (original,) = results[0].args
    assert isinstance(original, ChannelBroken)
    assert original.exitcode == 7


def test_a_generator_dropped_early_leaves_nothing_behind():
    results = procs.pmap(_square, range(5))
    assert next(results) == 0
    results.close()
