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
import time
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


@pytest.fixture
def make(kind, executors):
    def factory(*args, **kwargs):
        return executors(kind, *args, **kwargs)

    factory.kind = kind
    return factory


@pytest.fixture
def gate(tmp_path):
    path = str(tmp_path / "gate")
    yield path
    open(path, "w").close()


def init_fail_logging_to(log_queue):
    """CPython's test_init.init_fail: log the concurrent.futures logger to a queue, fail."""
    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(logging.handlers.QueueHandler(log_queue))
    logger.setLevel("CRITICAL")
    logger.propagate = False
    raise ValueError("error in initializer")


def raise_runtime_error():
    raise RuntimeError(123)


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
