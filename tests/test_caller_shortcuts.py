"""The caller's shortcuts on an idle pool (forkexec._caller_shortcuts).

``submit`` hands a task straight to an idle worker and ``result()`` reads its reply
in the calling thread, without waking the exchange thread. These tests pin what a
user must never notice about that: every other way of waiting still sees the
result (the standard executor is the oracle), a worker that dies while lent still
fails its task promptly, timeouts keep their meaning, and many threads doing round
trips at once all get their own results.
"""

import asyncio
import concurrent.futures
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

import executor_helpers as h
from forkexec import ForkExchangeExecutor, _loop

pytestmark = pytest.mark.timeout(60)

KINDS = ["stdlib", "forkexec"]
#: "Promptly": a generous bound, never a performance claim.
PROMPTLY = 10.0


def warm(ex):
    """Every worker started and idle, so the next submit finds an idle one."""
    list(ex.map(h.sleep_and_return, [0.05, 0.05], ["warm", "warm"]))
    time.sleep(0.05)


def test_a_round_trip_on_an_idle_pool_does_not_wake_the_exchange_thread(monkeypatch):
    handled = []
    original = _loop.ExchangeLoop.on_worker_event

    def counting(self, worker, mask):
        handled.append(worker.pid)
        return original(self, worker, mask)

    with ForkExchangeExecutor(2) as ex:
        warm(ex)
        monkeypatch.setattr(_loop.ExchangeLoop, "on_worker_event", counting)
        results = [ex.submit(h.square, i).result(timeout=PROMPTLY) for i in range(200)]
    assert results == [i * i for i in range(200)]
    # Without the shortcut every reply is an event of the exchange thread's; a stray
    # one (a reply racing the lend) is allowed, a habit is not.
    assert len(handled) < 20, handled


def _by_wait(future):
    done, _ = concurrent.futures.wait([future], timeout=PROMPTLY)
    assert done == {future}
    return future.result(timeout=0)


def _by_as_completed(future):
    return next(concurrent.futures.as_completed([future], timeout=PROMPTLY)).result(timeout=0)


def _by_callback(future):
    seen = threading.Event()
    future.add_done_callback(lambda f: seen.set())
    assert seen.wait(PROMPTLY)
    return future.result(timeout=0)


def _by_polling_done(future):
    deadline = time.monotonic() + PROMPTLY
    while not future.done():
        assert time.monotonic() < deadline, "done() never became true"
        time.sleep(0.001)
    return future.result(timeout=0)


def _by_polling_running(future):
    """Polls running() alone (the state is read, not asked for, until the task ran)."""
    from concurrent.futures._base import PENDING
    deadline = time.monotonic() + PROMPTLY
    while future.running() or future._state == PENDING:
        assert time.monotonic() < deadline, "running() never became false"
        time.sleep(0.001)
    return future.result(timeout=0)


def _by_asyncio(future):
    async def main():
        return await asyncio.wait_for(asyncio.wrap_future(future), PROMPTLY)
    return asyncio.run(main())


def _by_exception(future):
    assert future.exception(timeout=PROMPTLY) is None
    return future.result(timeout=0)


def _by_shutdown(future, ex):
    ex.shutdown(wait=True)
    assert future.done()
    return future.result(timeout=0)


WAYS = [_by_wait, _by_as_completed, _by_callback, _by_polling_done, _by_polling_running,
        _by_asyncio, _by_exception]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("way", WAYS, ids=lambda w: w.__name__[4:])
@pytest.mark.parametrize("seconds", [0.0, 0.05])   # a reply at once, and one after a while
def test_every_way_of_waiting_sees_a_handed_off_result(executors, kind, way, seconds):
    ex = executors(kind, 2)
    warm(ex)
    for value in range(3):
        assert way(ex.submit(h.sleep_and_return, seconds, value)) == value


@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_waits_for_a_handed_off_task_nobody_waited_for(executors, kind):
    ex = executors(kind, 2)
    warm(ex)
    future = ex.submit(h.sleep_and_return, 0.05, "late")
    assert _by_shutdown(future, ex) == "late"


@pytest.mark.parametrize("kind", KINDS)
def test_a_result_timeout_keeps_its_meaning(executors, kind):
    ex = executors(kind, 2)
    warm(ex)
    future = ex.submit(h.sleep_and_return, 1.0, "slow")
    began = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=0.1)
    waited = time.monotonic() - began
    assert 0.09 <= waited < 0.9, waited
    assert future.result(timeout=PROMPTLY) == "slow"
    # and the pool goes on as usual afterwards
    assert ex.submit(h.square, 7).result(timeout=PROMPTLY) == 49


@pytest.mark.parametrize("kind", KINDS)
def test_a_worker_dying_while_its_reply_is_awaited_fails_the_task_promptly(executors, kind):
    ex = executors(kind, 2)
    warm(ex)
    future = ex.submit(os._exit, 3)
    began = time.monotonic()
    with pytest.raises(BrokenProcessPool):
        future.result(timeout=PROMPTLY)
    assert time.monotonic() - began < PROMPTLY


def test_a_worker_dying_while_lent_is_replaced_under_the_replace_policy():
    with ForkExchangeExecutor(2, on_worker_death="replace") as ex:
        warm(ex)
        for _ in range(3):
            with pytest.raises(BrokenProcessPool):
                ex.submit(os._exit, 3).result(timeout=PROMPTLY)
            assert ex.submit(h.square, 5).result(timeout=PROMPTLY) == 25


def _kill_and_wait(pid):
    """SIGKILL ``pid`` and wait until it is reaped (by its parent) and so gone."""
    import signal
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + PROMPTLY
    while os.path.exists("/proc/%d" % pid):
        assert time.monotonic() < deadline, "killed worker %d never went away" % pid
        time.sleep(0.01)
    time.sleep(0.2)   # the pool has noticed by now (the standard one polls its sentinels)


@pytest.mark.parametrize("kind", KINDS)
def test_a_worker_killed_while_resting_between_round_trips_breaks_the_pool(executors, kind):
    """After a round trip the idle worker rests out of the exchange thread's poll set:
    its death is still noticed, as the standard executor notices it."""
    ex = executors(kind, 1)
    pid = ex.submit(h.getpid).result(timeout=PROMPTLY)
    _kill_and_wait(pid)
    with pytest.raises(BrokenProcessPool):
        ex.submit(h.square, 3).result(timeout=PROMPTLY)


def test_a_worker_killed_while_resting_is_replaced_under_the_replace_policy():
    with ForkExchangeExecutor(1, on_worker_death="replace") as ex:
        for _ in range(3):
            pid = ex.submit(h.getpid).result(timeout=PROMPTLY)
            _kill_and_wait(pid)
            assert [ex.submit(h.square, i).result(timeout=PROMPTLY) for i in range(20)] == \
                [i * i for i in range(20)]
            assert ex.submit(h.getpid).result(timeout=PROMPTLY) != pid


def test_a_worker_killed_just_before_a_round_trip_sends_to_it_fails_only_that_task():
    """The kill and the next send race (the exit report may come after the send): the
    task is never lost or run twice; under ``replace`` the pool goes on."""
    import signal
    with ForkExchangeExecutor(1, on_worker_death="replace") as ex:
        for _ in range(5):
            pid = ex.submit(h.getpid).result(timeout=PROMPTLY)
            os.kill(pid, signal.SIGKILL)
            try:   # the task either ran on a new worker, or was lost with the old one
                assert ex.submit(h.square, 6).result(timeout=PROMPTLY) == 36
            except BrokenProcessPool as exc:
                assert str(pid) in str(exc)
            assert ex.submit(h.square, 7).result(timeout=PROMPTLY) == 49


def test_round_trips_under_max_tasks_per_child_each_get_a_fresh_worker():
    """A worker that retires after its task never rests: the next round trip goes to its
    replacement."""
    with ForkExchangeExecutor(1, max_tasks_per_child=1) as ex:
        pids = [ex.submit(h.getpid).result(timeout=PROMPTLY) for _ in range(6)]
        assert [ex.submit(h.square, i).result(timeout=PROMPTLY) for i in range(6)] == \
            [i * i for i in range(6)]
    assert len(set(pids)) == 6, pids



def test_a_worker_exiting_while_its_caller_reads_the_reply_loses_nothing(monkeypatch):
    """result() waits for the reply in a blocking recv outside the loop's lock. A worker
    that exits right after replying (max_tasks_per_child=1) is reported meanwhile: its
    exit is judged only once the caller has taken the reply in, so the result arrives
    instead of being reported lost with the worker."""
    from forkexec import _worker_events
    from forkexec.channel import Channel
    original_recv, original_exited = Channel.recv_waiting, _worker_events._on_exited
    deferred = []

    def slow_handover(self, size):
        data = original_recv(self, size)
        time.sleep(0.2)   # the worker exits and its exit report arrives meanwhile
        return data

    def recording(loop, worker, status):
        deferred.append(worker.exit_status is not None)
        return original_exited(loop, worker, status)

    monkeypatch.setattr(_worker_events, "_on_exited", recording)
    with ForkExchangeExecutor(1, max_tasks_per_child=1) as ex:
        ex.submit(h.square, 0).result(timeout=PROMPTLY)
        monkeypatch.setattr(Channel, "recv_waiting", slow_handover)
        results = []
        for i in range(1, 5):
            time.sleep(0.1)   # the replacement worker is up and idle: a round trip's path
            results.append(ex.submit(h.square, i).result(timeout=PROMPTLY))
    assert results == [1, 4, 9, 16]
    assert any(deferred), "no worker exited while its caller was reading the reply"

@pytest.mark.parametrize("kind", KINDS)
def test_a_callback_added_to_a_handed_off_future_runs_once(executors, kind):
    ex = executors(kind, 2)
    warm(ex)
    calls = []
    lock = threading.Lock()
    future = ex.submit(h.sleep_and_return, 0.02, "x")

    def callback(f):
        with lock:
            calls.append(f.result())

    future.add_done_callback(callback)
    assert future.result(timeout=PROMPTLY) == "x"
    deadline = time.monotonic() + PROMPTLY
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert calls == ["x"]


@pytest.mark.parametrize("kind", KINDS)
def test_many_threads_doing_round_trips_each_get_their_own_results(executors, kind):
    ex = executors(kind, 2)
    warm(ex)
    errors = []

    def client(base):
        try:
            for i in range(100):
                value = base + i
                assert ex.submit(h.identity, value).result(timeout=PROMPTLY) == value
        except BaseException as exc:  # noqa: B902 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k * 1000,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PROMPTLY * 3)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_round_trips_beside_a_running_map_all_complete():
    """A caller's round trips and a bulk map share the workers: neither starves."""
    with ForkExchangeExecutor(2) as ex:
        warm(ex)
        mapped = []
        mapper = threading.Thread(
            target=lambda: mapped.extend(ex.map(h.square, range(20000), chunksize=50)))
        mapper.start()
        trips = [ex.submit(h.identity, i).result(timeout=PROMPTLY) for i in range(300)]
        mapper.join(PROMPTLY * 3)
        assert not mapper.is_alive()
    assert trips == list(range(300))
    assert mapped == [i * i for i in range(20000)]


def test_an_interrupted_wait_leaves_the_reply_to_the_exchange_thread():
    """A Ctrl-C while result() reads the reply itself: the program may go on using the
    pool, and the interrupted future still completes."""
    import signal
    with ForkExchangeExecutor(2) as ex:
        warm(ex)
        future = ex.submit(h.sleep_and_return, 0.5, "late")
        timer = threading.Timer(0.002, signal.raise_signal, (signal.SIGINT,))
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                future.result(timeout=PROMPTLY)
        finally:
            timer.cancel()
            signal.signal(signal.SIGINT, previous)
        assert _by_wait(future) == "late"
        assert [ex.submit(h.square, i).result(timeout=PROMPTLY) for i in range(4)] == \
            [0, 1, 4, 9]
