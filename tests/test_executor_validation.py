"""Argument validation of ForkExchangeExecutor, with ProcessPoolExecutor as the oracle.

Each table lists what the standard executor does with a bad argument: the exception
type it raises, or ``ACCEPTED``. Every test runs for "stdlib" (ProcessPoolExecutor with
a fork context; a spawn context where fork refuses the argument) and "forkexec": the
stdlib rows prove the table is the running Python's behaviour, the forkexec rows that
ForkExchangeExecutor is a drop-in for it. A ForkExchangeExecutor error must also name
what was wrong (the stdlib's own messages often do not: ``'<=' not supported between
instances of 'str' and 'int'``). Where the stdlib has no opinion (``on_worker_death``;
``buffersize`` before Python 3.14, whose table follows 3.14's ``Executor.map``), only
forkexec runs.
"""

import concurrent.futures
import multiprocessing
import sys

import pytest

import executor_helpers as h

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("mp_helpers")]

KINDS = ["stdlib", "forkexec"]
ACCEPTED = "accepted"
#: The exact message both executors give for work after shutdown.
AFTER_SHUTDOWN = "cannot schedule new futures after shutdown"


@pytest.fixture
def make(executors):
    return executors


def check(kind, expected, call, names):
    """Run ``call``; it must raise ``expected`` (forkexec's message naming ``names``), or
    return (the result) when ``expected`` is ACCEPTED."""
    __tracebackhide__ = True
    if expected is ACCEPTED:
        return call()
    with pytest.raises(expected) as info:
        call()
    if kind == "forkexec":
        assert names in str(info.value), \
            "the error does not name %r: %s: %s" % (names, type(info.value).__name__, info.value)
    return None


def ids(value):
    """Stable test ids: a type by its name, a bare object() as "object()"."""
    if value is ACCEPTED:
        return ACCEPTED
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, tuple) and all(isinstance(v, type) for v in value):
        return "|".join(v.__name__ for v in value)
    if type(value) is object:
        return "object()"
    return repr(value)


# -- the constructor ---------------------------------------------------------------------
MAX_WORKERS = [
    (0, ValueError),
    (-1, ValueError),
    (1.5, TypeError),
    ("2", TypeError),
    (True, ACCEPTED),     # a bool is an int: ProcessPoolExecutor(True) is one worker
    (False, ValueError),  # ...and False is 0
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value, expected", MAX_WORKERS, ids=ids)
def test_max_workers(make, kind, value, expected):
    ex = check(kind, expected, lambda: make(kind, value), "max_workers")
    if ex is not None:
        assert ex.submit(h.square, 3).result(timeout=30) == 9


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [5, "h.square", object()], ids=ids)
def test_initializer_not_callable(make, kind, value):
    with pytest.raises(TypeError, match="initializer must be a callable"):
        make(kind, 1, initializer=value)


@pytest.mark.parametrize("value", [5, None], ids=ids)
def test_forkexec_initargs_not_iterable_is_refused_at_once_naming_initargs(make, value):
    # The stdlib accepts these and breaks the pool at the first submit (the initializer
    # cannot be called in the worker). Refusing at once is better, if the error says why.
    with pytest.raises(TypeError) as info:
        make("forkexec", 1, initializer=h.record_call, initargs=value)
    assert "initargs" in str(info.value), info.value


MAX_TASKS_PER_CHILD = [
    (0, ValueError),
    (-1, ValueError),
    ("x", TypeError),
    (1.5, TypeError),
    (True, ACCEPTED),     # a bool is an int: one task per worker
]


def max_tasks_executor(kind, value):
    if kind == "stdlib":
        # The stdlib refuses max_tasks_per_child with fork altogether: spawn is its oracle.
        return concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=value)
    return h.new_executor(kind, 1, max_tasks_per_child=value)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="max_tasks_per_child is new in 3.11")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value, expected", MAX_TASKS_PER_CHILD, ids=ids)
def test_max_tasks_per_child(kind, value, expected):
    ex = check(kind, expected, lambda: max_tasks_executor(kind, value), "max_tasks_per_child")
    if ex is not None:
        ex.shutdown(wait=True)   # never started: nothing to run


@pytest.mark.skipif(sys.version_info < (3, 11), reason="max_tasks_per_child is new in 3.11")
@pytest.mark.parametrize("kind", KINDS)
def test_max_tasks_per_child_with_fork(make, kind):
    # A deliberate difference (README): forkexec's workers are forked from a
    # single-threaded template, so max_tasks_per_child works with fork.
    if kind == "stdlib":
        with pytest.raises(ValueError, match="max_tasks_per_child.*'fork'"):
            make(kind, 1, max_tasks_per_child=1)
        return
    ex = make(kind, 1, mp_context=multiprocessing.get_context("fork"), max_tasks_per_child=1)
    pids = [ex.submit(h.getpid).result(timeout=30) for _ in range(2)]
    assert pids[0] != pids[1], "a worker ran more than max_tasks_per_child tasks"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", ["fork", 3, object()], ids=ids)
def test_mp_context_that_is_not_a_context(make, kind, value):
    # The stdlib does not check: it fails on mp_context.get_start_method (AttributeError).
    # forkexec checks, and says what it wanted (TypeError).
    if kind == "stdlib":
        with pytest.raises(AttributeError):
            concurrent.futures.ProcessPoolExecutor(1, mp_context=value)
        return
    check(kind, TypeError, lambda: make(kind, 1, mp_context=value), "mp_context")


@pytest.mark.parametrize("value", ["x", None, 3, "Break", "replace "], ids=ids)
def test_forkexec_on_worker_death_invalid(make, value):
    with pytest.raises(ValueError) as info:
        make("forkexec", 1, on_worker_death=value)
    message = str(info.value)
    assert "on_worker_death" in message and "'break'" in message and "'replace'" in message
    assert repr(value) in message


@pytest.mark.parametrize("value", ["break", "replace"])
def test_forkexec_on_worker_death_valid(make, value):
    ex = make("forkexec", 1, on_worker_death=value)
    assert ex.submit(h.square, 5).result(timeout=30) == 25


# -- map ----------------------------------------------------------------------------------
CHUNKSIZE = [
    (0, ValueError),
    (-1, ValueError),
    ("x", TypeError),
    # The stdlib's error depends on its version, by accident (3.11: ValueError from
    # islice; 3.13: TypeError from batched): either is the stdlib's.
    (1.5, (TypeError, ValueError)),
    (True, ACCEPTED),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value, expected", CHUNKSIZE, ids=ids)
def test_map_chunksize(make, kind, value, expected):
    ex = make(kind, 1)
    results = check(kind, expected, lambda: ex.map(h.square, range(4), chunksize=value),
                    "chunksize")
    if results is not None:
        assert list(results) == [0, 1, 4, 9]


@pytest.mark.parametrize("kind", KINDS)
def test_map_with_a_negative_timeout_times_out_at_the_first_result(make, kind):
    ex = make(kind, 1)
    assert list(ex.map(h.square, [], timeout=-1)) == []
    results = ex.map(h.sleep_and_return, [0.5, 0.5], timeout=-1)   # the call itself is fine
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", ["x", object()], ids=ids)
def test_map_timeout_not_a_number(make, kind, value):
    ex = make(kind, 1)
    check(kind, TypeError, lambda: ex.map(h.square, range(4), timeout=value), "timeout")


#: Python 3.14's Executor.map: "buffersize must be an integer or None" (isinstance int:
#: True passes) and "buffersize must be None or > 0".
BUFFERSIZE = [
    (0, ValueError),
    (-1, ValueError),
    ("x", TypeError),
    (1.5, TypeError),
    (True, ACCEPTED),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value, expected", BUFFERSIZE, ids=ids)
def test_map_buffersize(make, kind, value, expected):
    if kind == "stdlib" and sys.version_info < (3, 14):
        pytest.skip("ProcessPoolExecutor.map has no buffersize before Python 3.14")
    ex = make(kind, 1)
    results = check(kind, expected, lambda: ex.map(h.square, range(4), buffersize=value),
                    "buffersize")
    if results is not None:
        assert list(results) == [0, 1, 4, 9]


# -- submit, shutdown --------------------------------------------------------------------
@pytest.mark.parametrize("started", [True, False], ids=["started", "never-started"])
@pytest.mark.parametrize("kind", KINDS)
def test_work_after_shutdown_is_refused(make, kind, started):
    ex = make(kind, 1)
    if started:
        assert ex.submit(h.square, 2).result(timeout=30) == 4
    ex.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="^%s$" % AFTER_SHUTDOWN):
        ex.submit(h.square, 3)
    with pytest.raises(RuntimeError, match="^%s$" % AFTER_SHUTDOWN):
        ex.map(h.square, [1, 2])


@pytest.mark.parametrize("kind", KINDS)
def test_submit_with_a_function_that_is_not_callable(make, kind):
    # Neither executor checks at submit: the future fails with the TypeError of the call.
    ex = make(kind, 1)
    future = ex.submit(5)
    error = future.exception(timeout=30)
    assert type(error) is TypeError
    assert str(error) == "'int' object is not callable"
    results = ex.map(5, [1, 2])
    with pytest.raises(TypeError, match="^'int' object is not callable$"):
        next(results)
    assert ex.submit(h.square, 4).result(timeout=30) == 16   # the pool is fine


@pytest.mark.parametrize("kind", KINDS)
def test_submit_without_a_function(make, kind):
    ex = make(kind, 1)
    with pytest.raises(TypeError, match="'fn'"):
        ex.submit()
    with pytest.raises(TypeError, match="'fn'"):
        ex.submit(fn=h.square)


@pytest.mark.parametrize("started", [True, False], ids=["started", "never-started"])
@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_twice_is_fine(make, kind, started):
    ex = make(kind, 1)
    if started:
        assert ex.submit(h.square, 2).result(timeout=30) == 4
    assert ex.shutdown(wait=True) is None
    assert ex.shutdown(wait=True) is None
    assert ex.shutdown(wait=False, cancel_futures=True) is None
    with ex:   # __exit__ shuts down once more
        pass


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_over_nothing_after_shutdown_is_empty_and_over_something_raises(kind, chunksize):
    ex = h.new_executor(kind, 1)
    ex.shutdown(wait=True)
    assert list(ex.map(h.square, [], chunksize=chunksize)) == []
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.map(h.square, [1, 2], chunksize=chunksize)
