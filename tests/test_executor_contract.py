"""The ProcessPoolExecutor contract, written once and run against two executors.

``stdlib`` is ``concurrent.futures.ProcessPoolExecutor`` with a fork context:
the oracle. ``forkexec`` is ``ForkExchangeExecutor``: it must behave the same
wherever a user of the standard executor could tell. Where the two differ on
purpose, the test says so and runs against forkexec only. ``forkexec-spawn``
and ``forkexec-forkserver`` are ForkExchangeExecutor with that ``mp_context``
(the template starts as a fresh interpreter): the contract holds for them too.
"""

import asyncio
import concurrent.futures
import gc
import multiprocessing
import os
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import pytest

import executor_helpers as h
from conftest import descendants
from forkexec import ForkExchangeExecutor, usable_cpus

KINDS = ["stdlib", "forkexec", "forkexec-spawn", "forkexec-forkserver"]
#: spawn and forkserver start multiprocessing's resource tracker and forkserver.
pytestmark = pytest.mark.usefixtures("mp_helpers")


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def open_gate(path):
    open(path, "w").close()


# -- submit and result --------------------------------------------------------------------
def test_submit_returns_a_real_future_with_the_result(make):
    ex = make(2)
    future = ex.submit(h.add, 2, y=40)
    assert isinstance(future, Future)
    assert future.result(timeout=30) == 42
    assert future.done() and not future.cancelled()


def test_submit_takes_fn_positionally_so_fn_and_self_are_keywords(make):
    ex = make(1)
    assert ex.submit(h.record_call, fn=1, self=2).result(timeout=30) == ((), {"fn": 1, "self": 2})


def test_task_exception_is_reraised_with_the_remote_traceback_as_cause(make):
    ex = make(1)
    future = ex.submit(h.raise_value_error_in_task, "no good")
    with pytest.raises(ValueError, match="^no good$") as info:
        future.result(timeout=30)
    cause = info.value.__cause__
    assert cause is not None
    assert "raise_value_error_in_task" in str(cause)
    assert "Traceback" in str(cause)
    assert isinstance(future.exception(), ValueError)


# -- map ----------------------------------------------------------------------------------
def test_map_returns_results_in_input_order(make):
    ex = make(2)
    delays = [0.03, 0.0, 0.02, 0.0, 0.01, 0.0]
    assert list(ex.map(h.sleep_and_return, delays, range(6))) == list(range(6))


def test_map_yields_each_result_without_waiting_for_later_items(make, gate):
    ex = make(2)
    results = ex.map(h.wait_for_gate, ["/", gate], [None, None], ["first", "second"])
    assert next(results) == "first"      # the second item is still blocked on the gate
    open_gate(gate)
    assert list(results) == ["second"]


def test_map_over_several_iterables_stops_at_the_shortest(make):
    ex = make(2)
    assert list(ex.map(h.add, [1, 2, 3], [10, 20, 30, 40])) == [11, 22, 33]


def test_map_with_chunksize_keeps_order(make):
    ex = make(2)
    results = ex.map(h.square, range(53), chunksize=7, timeout=10)
    assert list(results) == [x * x for x in range(53)]


def test_map_timeout_is_measured_from_the_call(make, gate):
    ex = make(1)
    results = ex.map(h.wait_for_gate, [gate], timeout=1.0)
    time.sleep(1.0)     # the consumer is slow: the whole timeout is used up before next()
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)
    assert time.monotonic() - started < 0.6


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_raises_an_exception_at_its_item(make, chunksize):
    ex = make(2)
    results = ex.map(h.fail_at, range(8), [4] * 8, chunksize=chunksize, timeout=10)
    seen = []
    with pytest.raises(ValueError, match="bad item 4"):
        for value in results:
            seen.append(value)
    if make.kind == "stdlib" and chunksize > 1:
        # Difference: the stdlib loses the whole chunk holding the failing item
        # (3 here); forkexec yields every item before the failing one.
        assert seen == [0, 10, 20]
    else:
        assert seen == [0, 10, 20, 30]


def test_closing_the_map_iterator_cancels_outstanding_work(make, tmp_path):
    ex = make(1)
    log = str(tmp_path / "log")
    results = ex.map(h.log_and_sleep, [log] * 20, range(20), [0.05] * 20)
    assert next(results) == 0
    results.close()
    ex.shutdown(wait=True)
    ran = h.read_lines(log)
    assert len(ran) < 10, ran


def test_map_buffersize_bounds_how_far_the_input_is_read_ahead(make):
    if make.kind == "stdlib" and sys.version_info < (3, 14):
        pytest.skip("ProcessPoolExecutor.map has no buffersize before Python 3.14; "
                    "forkexec supports it on every version")
    ex = make(2)
    source = h.CountingInput(200)
    results = ex.map(h.square, source, buffersize=4)
    assert source.taken <= 4
    assert next(results) == 0
    assert source.taken <= 6
    assert list(results) == [x * x for x in range(1, 200)]
    assert source.taken == 200


def test_map_without_buffersize_reads_all_input_at_once(make):
    ex = make(2)
    source = h.CountingInput(50)
    results = ex.map(h.square, source)
    assert source.taken == 50
    assert sum(results) == sum(x * x for x in range(50))


# -- shutdown -----------------------------------------------------------------------------
def test_shutdown_wait_returns_after_all_work_is_done(make):
    ex = make(2)
    futures = [ex.submit(h.sleep_and_return, 0.02, i) for i in range(8)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(8))


def test_shutdown_cancel_futures_cancels_what_has_not_started(make, gate, tmp_path):
    ex = make(1)
    started = str(tmp_path / "started")
    first = ex.submit(h.wait_for_gate, gate, started, "first")
    rest = [ex.submit(h.square, i) for i in range(10)]
    h.read_pid(started)
    ex.shutdown(wait=False, cancel_futures=True)
    open_gate(gate)
    # Not a second shutdown(wait=True): after shutdown(wait=False) the stdlib's returns at
    # once. Not wait(): it never counts a future cancelled by shutdown as done.
    assert first.result(timeout=30) == "first"
    h.wait_until(lambda: all(f.done() for f in rest), 30, "every future to be done")
    # Both executors may have handed one item to the worker before the cancel.
    assert sum(f.cancelled() for f in rest) >= 8


def test_submit_after_shutdown_raises_runtime_error(make):
    ex = make(1)
    assert ex.submit(h.square, 3).result(timeout=30) == 9
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(h.square, 3)


def test_submit_after_shutdown_of_an_unused_executor_raises_runtime_error(make):
    ex = make(1)
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(h.square, 3)


def test_context_manager_waits_for_work_and_shuts_down(make):
    with make(2) as ex:
        futures = [ex.submit(h.sleep_and_return, 0.02, i) for i in range(6)]
    assert [f.result(timeout=0) for f in futures] == list(range(6))
    with pytest.raises(RuntimeError):
        ex.submit(h.square, 1)


# -- working with other concurrent.futures and asyncio machinery ---------------------------
def test_wait_first_completed_and_all_completed(make, gate):
    ex = make(2)
    blocked = ex.submit(h.wait_for_gate, gate, None, "late")
    quick = ex.submit(h.square, 5)
    done, not_done = concurrent.futures.wait([blocked, quick], timeout=30,
                                             return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {quick} and not_done == {blocked}
    open_gate(gate)
    done, not_done = concurrent.futures.wait([blocked, quick], timeout=30)
    assert done == {blocked, quick} and not not_done


def test_as_completed_yields_every_future_as_it_finishes(make, gate):
    ex = make(2)
    blocked = ex.submit(h.wait_for_gate, gate, None, "late")
    quick = [ex.submit(h.square, i) for i in range(5)]
    order = []
    for future in concurrent.futures.as_completed(quick + [blocked], timeout=30):
        order.append(future)
        if len(order) == 5:
            open_gate(gate)
    assert order[-1] is blocked
    assert sorted(f.result() for f in order[:5]) == [i * i for i in range(5)]


def test_asyncio_run_in_executor(make):
    ex = make(2)

    async def main():
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(ex, h.square, i) for i in range(10)))

    assert asyncio.run(main()) == [i * i for i in range(10)]


def test_submit_from_eight_threads_at_once(make):
    ex = make(2)
    barrier = threading.Barrier(8)
    outcomes = [None] * 8

    def submitter(n):
        barrier.wait()
        futures = [ex.submit(h.add, n, i) for i in range(25)]
        outcomes[n] = [f.result(timeout=60) for f in futures]

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert outcomes == [[n + i for i in range(25)] for n in range(8)]


def test_cancel_a_pending_future(make, gate, tmp_path):
    ex = make(1)
    started = str(tmp_path / "started")
    first = ex.submit(h.wait_for_gate, gate, started, "first")
    queued = [ex.submit(h.square, i) for i in range(5)]
    h.read_pid(started)
    assert queued[-1].cancel()
    assert queued[-1].cancelled()
    open_gate(gate)
    assert first.result(timeout=30) == "first"
    assert [f.result(timeout=30) for f in queued[:-1]] == [0, 1, 4, 9]
    with pytest.raises(concurrent.futures.CancelledError):
        queued[-1].result()


def test_a_running_future_cannot_be_cancelled(make, gate, tmp_path):
    ex = make(1)
    started = str(tmp_path / "started")
    running = ex.submit(h.wait_for_gate, gate, started, "done")
    h.read_pid(started)
    assert not running.cancel()
    open_gate(gate)
    assert running.result(timeout=30) == "done"


# -- initializer --------------------------------------------------------------------------
def test_initializer_runs_once_in_each_worker(make, tmp_path):
    log = str(tmp_path / "init")
    ex = make(2, initializer=h.record_pid, initargs=(log,))
    task_pids = set(ex.map(h.getpid, range(30)))
    ex.shutdown(wait=True)
    init_pids = [int(p) for p in h.read_lines(log)]
    assert len(init_pids) == len(set(init_pids)) <= 2
    assert task_pids <= set(init_pids)


def test_failing_initializer_breaks_the_pool(make):
    ex = make(1, initializer=h.failing_initializer)
    future = ex.submit(h.square, 2)
    with pytest.raises(BrokenProcessPool):
        future.result(timeout=30)
    with pytest.raises(BrokenProcessPool):
        ex.submit(h.square, 3).result(timeout=30)


# -- constructor --------------------------------------------------------------------------
def test_the_first_tasks_on_a_fresh_pool_all_run_at_once(make, tmp_path):
    ex = make(4)
    met = ex.map(h.rendezvous, [str(tmp_path)] * 4, [4] * 4, [3.0] * 4)
    assert list(met) == [True] * 4


def test_long_tasks_after_many_short_ones_still_run_in_parallel(make, tmp_path):
    ex = make(2)
    assert sum(ex.map(h.square, range(200))) == sum(x * x for x in range(200))
    long_ones = [ex.submit(h.rendezvous, str(tmp_path), 2, 3.0) for _ in range(2)]
    short_ones = [ex.submit(h.square, i) for i in range(5)]
    assert [f.result(timeout=30) for f in long_ones] == [True, True]
    assert [f.result(timeout=30) for f in short_ones] == [0, 1, 4, 9, 16]


def test_default_max_workers_is_the_number_of_usable_cpus(make, tmp_path):
    cpus = usable_cpus()
    if make.kind == "stdlib" and sys.version_info < (3, 13) and os.cpu_count() != cpus:
        pytest.skip("before Python 3.13 the stdlib uses os.cpu_count() (%s), not the CPUs this "
                    "process may use (%d)" % (os.cpu_count(), cpus))
    ex = make()
    list(ex.map(h.square, range(4 * cpus)))   # every worker is up
    together = tmp_path / "together"
    together.mkdir()
    # usable_cpus() tasks run at the same time...
    assert all(ex.map(h.rendezvous, [str(together)] * cpus, [cpus] * cpus, [10.0] * cpus))
    # ...but never more than that.
    crowd = tmp_path / "crowd"
    crowd.mkdir()
    seen = ex.map(h.count_peers, [str(crowd)] * (2 * cpus + 1), [0.1] * (2 * cpus + 1))
    assert max(seen) == cpus


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(kind, bad):
    with pytest.raises(ValueError, match=r"^max_workers must be greater than 0$"):
        h.executor_of(kind, bad)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_forkexec_accepts_spawn_and_forkserver_mp_contexts(method):
    # Like ProcessPoolExecutor, ForkExchangeExecutor takes any multiprocessing context:
    # with spawn or forkserver its template starts as a fresh interpreter.
    context = multiprocessing.get_context(method)
    with ForkExchangeExecutor(1, context) as ex:                 # positionally, as the stdlib
        assert ex.submit(h.square, 4).result(timeout=30) == 16
        identity = ex.submit(h.process_identity).result(timeout=30)
    assert identity["parent_pid"] == os.getpid()
    with ForkExchangeExecutor(1, mp_context=context) as ex:
        assert list(ex.map(h.square, range(5))) == [0, 1, 4, 9, 16]


def test_forkexec_refuses_an_mp_context_that_is_not_a_context():
    with pytest.raises(TypeError, match="mp_context"):
        ForkExchangeExecutor(1, mp_context="spawn")


def test_forkexec_accepts_a_fork_mp_context():
    with ForkExchangeExecutor(1, multiprocessing.get_context("fork")) as ex:
        assert ex.submit(h.square, 4).result(timeout=30) == 16


# -- interpreter exit and garbage collection ---------------------------------------------
def test_script_that_exits_without_shutdown_still_runs_its_tasks(kind):
    script = textwrap.dedent("""
        import sys
        import executor_helpers as h
        ex = h.executor_of(%r, 2)
        for i in range(6):
            ex.submit(h.print_line, i)
        sys.stdout.write("main-done\\n")   # one write: workers print at the same time
        sys.stdout.flush()
    """ % kind)
    proc = h.run_script(script, timeout=60)
    if "-" in kind:   # spawn, forkserver: the script's resource tracker (and forkserver)
        h.reap_orphaned_helpers()   # outlive it and are left to this process to reap
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert "main-done" in lines
    assert sorted(l for l in lines if l.startswith("task-output")) == \
        ["task-output %d" % i for i in range(6)]
    assert "Traceback" not in proc.stderr


def test_garbage_collected_executor_without_shutdown_goes_away(kind):
    threads_before = threading.active_count()
    ex = h.executor_of(kind, 2)
    assert ex.submit(h.square, 6).result(timeout=30) == 36
    del ex
    gc.collect()
    h.wait_until(lambda: not descendants() and threading.active_count() == threads_before, 15,
                 "the collected executor's processes and threads to exit")


def test_a_program_wide_socket_timeout_changes_nothing(make):
    """Programs that use the network often call ``socket.setdefaulttimeout()``. The pool's
    own sockets must not inherit it: idle workers outlive it, and results that take longer
    than it still arrive (the standard executor, on pipes, is the oracle)."""
    import socket
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.05)
    try:
        ex = make(2)
        assert [ex.submit(h.square, i).result(timeout=30) for i in range(5)] == \
            [0, 1, 4, 9, 16]
        time.sleep(0.3)   # idle for several timeouts
        assert ex.submit(h.sleep_and_return, 0.3, "late").result(timeout=30) == "late"
        assert list(ex.map(h.sleep_and_return, [0.3, 0.01], ["a", "b"])) == ["a", "b"]
    finally:
        socket.setdefaulttimeout(previous)
