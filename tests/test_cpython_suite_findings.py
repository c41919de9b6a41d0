"""What running CPython's own concurrent.futures suite against ForkExchangeExecutor found
(tests/cpython_suite/run_cpython_futures_suite.py), checked here against the standard
executor as the oracle wherever it can be.

Each test runs on ``stdlib`` (ProcessPoolExecutor, fork context) and on forkexec with
each start method, like tests/test_executor_contract.py.
"""

import concurrent.futures
import gc
import logging
import logging.handlers
import multiprocessing
import queue
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback

import pytest

import executor_helpers as h
from forkexec import ForkExchangeExecutor

KINDS = ["stdlib", "forkexec", "forkexec-spawn", "forkexec-forkserver"]
CONTEXTS = {"stdlib": "fork", "forkexec": "fork", "forkexec-spawn": "spawn",
            "forkexec-forkserver": "forkserver"}
pytestmark = [pytest.mark.usefixtures("mp_helpers"), pytest.mark.timeout(120)]
PROMPTLY = 30.0


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def init_fail_logging_to(log_queue):
    """CPython's test_init.init_fail: log the concurrent.futures logger to a queue, fail."""
    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(logging.handlers.QueueHandler(log_queue))
    logger.setLevel("CRITICAL")
    logger.propagate = False
    raise ValueError("error in initializer")


def raise_runtime_error():
    raise RuntimeError(123)


# -- _processes right after submit (CPython's test_killed_child) ---------------------------
def test_processes_right_after_submit_shows_the_worker_and_killing_it_breaks_the_pool(
        make, gate):
    ex = make(5)
    future = ex.submit(h.wait_for_gate, gate)
    handles = list(ex._processes.values())   # no sleep, no waiting for the task to start
    assert handles, "no worker in _processes right after submit"
    assert all(p.is_alive() for p in handles)
    for p in handles:
        p.terminate()
    with pytest.raises(BrokenProcessPool):
        future.result(timeout=PROMPTLY)
    with pytest.raises(BrokenProcessPool):
        ex.submit(pow, 2, 8)


def test_processes_counts_the_workers_a_burst_of_blocked_tasks_needs(make, gate):
    # CPython's test_saturation with tasks that can be sent (a gate, not a Semaphore).
    ex = make(3)
    futures = [ex.submit(h.wait_for_gate, gate) for _ in range(12)]
    assert len(ex._processes) == 3
    open(gate, "w").close()
    assert [f.result(timeout=PROMPTLY) for f in futures] == [None] * 12


def test_processes_does_not_wait_on_an_idle_or_shut_down_pool(make):
    ex = make(2)
    assert ex._processes == {}   # never started: at once, no worker
    assert ex.submit(h.square, 3).result(timeout=PROMPTLY) == 9
    t0 = time.monotonic()
    ex._processes
    ex.shutdown(wait=True)
    assert not ex._processes   # the stdlib's is None then, ours {}
    assert time.monotonic() - t0 < 3.0


def test_processes_read_in_a_done_callback_does_not_stall(make):
    # Our callbacks run on the exchange thread (or a caller holding it up): _processes
    # must not wait there for a fork only that thread could do.
    ex = make(2)
    seen = []

    def callback(_future):
        more = ex.submit(h.square, 4)
        t0 = time.monotonic()
        processes = ex._processes
        seen.append((time.monotonic() - t0, len(processes), more))

    first = ex.submit(h.sleep_and_return, 0.2, 1)
    first.add_done_callback(callback)
    assert first.result(timeout=PROMPTLY) == 1
    h.wait_until(lambda: seen, PROMPTLY, "the callback")
    spent, count, more = seen[0]
    assert spent < 1.0 and count >= 1
    assert more.result(timeout=PROMPTLY) == 16


# -- other private attributes code reads -----------------------------------------------------
def test_executor_manager_thread_is_joinable_after_shutdown_without_wait(make):
    ex = make(2)
    assert ex._executor_manager_thread is None   # nothing submitted yet
    results = ex.map(abs, range(-5, 5))
    thread = ex._executor_manager_thread
    processes = ex._processes
    ex.shutdown(wait=False)
    thread.join(PROMPTLY)
    assert not thread.is_alive()
    for p in processes.values():
        p.join(PROMPTLY)
        assert not p.is_alive()
    assert list(results) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]


def test_broken_is_false_then_says_why(make):
    ex = make(1, initializer=h.failing_initializer)
    assert ex._broken is False
    with pytest.raises(BrokenProcessPool):
        ex.submit(h.square, 2).result(timeout=PROMPTLY)
    h.wait_until(lambda: ex._broken, PROMPTLY, "the pool to be marked broken")
    assert isinstance(ex._broken, str) and ex._broken
    with pytest.raises(BrokenProcessPool):
        ex.submit(h.square, 3)


def test_mp_context_is_the_context_given(kind):
    ctx = multiprocessing.get_context(CONTEXTS[kind])
    cls = concurrent.futures.ProcessPoolExecutor if kind == "stdlib" else ForkExchangeExecutor
    ex = cls(1, mp_context=ctx)
    try:
        assert ex._mp_context is ctx
    finally:
        ex.shutdown()


def test_mp_context_defaults_to_a_context():
    ex = ForkExchangeExecutor(1)
    assert ex._mp_context.get_start_method() in ("fork", "spawn", "forkserver")
    ex.shutdown()


# -- a discarded future's task lets go of its references (CPython's test_no_stale_references)
class Owner:
    def method(self):
        return None


def test_a_discarded_future_on_a_warm_pool_lets_go_of_its_task(make):
    """On an idle, warm pool a submit may hand its task straight to a resting worker and
    leave the reply for the future's caller to read; a caller that never asks must not
    leave the reply (and the task's references) stranded."""
    ex = make(2)
    for _ in range(3):
        assert ex.submit(h.square, 3).result(timeout=PROMPTLY) == 9
        time.sleep(0.05)   # the exchange thread goes back to sleep: the hand-off path
        owner = Owner()
        collected = threading.Event()
        ref = weakref.ref(owner, lambda _: collected.set())
        ex.submit(owner.method)   # the future is dropped at once
        del owner
        assert collected.wait(10), "the task's references outlived it"
        assert ref() is None


# -- what a task's exception carries -------------------------------------------------------
def test_remote_traceback_is_the_stdlib_kind(make):
    future = make(1).submit(raise_runtime_error)
    with pytest.raises(RuntimeError) as info:
        future.result(timeout=PROMPTLY)
    assert info.value.args == (123,)
    cause = info.value.__cause__
    assert isinstance(cause, _RemoteTraceback)
    assert "raise RuntimeError(123)" in cause.tb


# -- a failing initializer is logged, like the stdlib's workers do ----------------------------
def test_failing_initializer_is_logged_on_the_concurrent_futures_logger(kind):
    ctx = multiprocessing.get_context(CONTEXTS[kind])
    log_queue = ctx.Queue()
    ex = h.executor_of(kind, 2, initializer=init_fail_logging_to, initargs=(log_queue,))
    try:
        with pytest.raises(BrokenProcessPool):
            ex.submit(h.square, 2).result(timeout=PROMPTLY)
    finally:
        ex.shutdown(wait=True)
    records = []
    deadline = time.monotonic() + PROMPTLY
    while not records and time.monotonic() < deadline:
        try:
            records.append(log_queue.get(timeout=0.1))
        except queue.Empty:
            pass
    # The queue's pipe goes with the last reference to it (the executor holds initargs).
    log_queue.close()
    del ex, log_queue
    gc.collect()
    assert records, "nothing logged"
    assert records[0].levelname == "CRITICAL"
    assert "Exception in initializer:" in records[0].getMessage()
    assert "ValueError: error in initializer" in records[0].getMessage()


def test_stdlib_oracle_is_the_real_process_pool():
    assert type(h.executor_of("stdlib", 1)) is concurrent.futures.ProcessPoolExecutor
