"""Generator pipelines on an executor (``executor=``): one set of test bodies for every
executor.

``test_pipeline_foreign.py`` runs them on threads and on ForkExchangeExecutor, and
``test_pipeline_foreign_dask.py`` on a Dask ``LocalCluster``; each module defines the
fixtures ``executor``, ``dying_executor`` and ``death_cause`` (as for foreign_cases.py).
Stage functions live here, at module level, so that Dask's workers import them.
Results are compared with the same pipeline run the default way, in forked stage
processes.
"""

import collections
import os
import signal
import time

import pytest

from forkexec import LocalOnlyError, WorkerDiedError
from forkexec import pipeline as pl
from forkexec.errors import RemoteTraceback
from foreign_cases import Counting

GRACE = 10.0


def numbers(n, start=0):
    yield from range(start, start + n)


def with_nones(n):
    for i in range(n):
        yield None if i % 3 == 0 else i


def square(x):
    return x * x


def is_even(x):
    return x % 2 == 0


def twice(x):
    return [x, x]


def keep(x):
    return True


def describe(x):
    return "none" if x is None else x


def add_offset(x, offset):
    return x + offset


def offset_setup():
    return {"offset": 1000}


def plus_one(source):
    for x in source:
        yield x + 1


def total(source):
    return sum(source)


def fail_at(x, bad):
    if x == bad:
        raise LookupError("no item %d" % x)
    return x


def fail_here(source):
    for x in source:
        if x == 49:
            raise KeyError("item 49 in this process")
        yield x


def slow_after_first(x):
    if x:
        time.sleep(2.0)
    return x


def die_on(x, victim):
    if x == victim:
        time.sleep(0.5)     # the results of the chunks before it reach the client first
        os.kill(os.getpid(), signal.SIGKILL)
    return x


class CountingCancels(Counting):
    """Counting, and how many of the futures the pipeline asked to cancel (whether the
    executor could: ForkExchangeExecutor cannot once a call is sent to a worker)."""

    cancels = 0

    def submit(self, fn, *args, **kwargs):
        future = super().submit(fn, *args, **kwargs)
        cancel = future.cancel

        def counted_cancel():
            with self.lock:
                self.cancels += 1
            return cancel()

        future.cancel = counted_cancel
        return future


def fan_in_pipeline():
    a = pl.producer(numbers, 300)
    b = pl.producer(numbers, 200, 1000)
    squares = pl.map(square, [a, b], workers=3, maxsize=32)
    even = pl.filter(is_even, squares, workers=2)
    return pl.flat_map(twice, even, maxsize=16)


def drain(pipeline):
    """The items of ``pipeline`` until it raises; (items, exception)."""
    got = []
    try:
        for item in pipeline:
            got.append(item)
    except Exception as exc:
        return got, exc
    return got, None


def wait_until(condition):
    deadline = time.monotonic() + GRACE
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


# -- the same results as the local run -------------------------------------------------------

def test_unordered_results_are_the_local_ones(executor):
    stage = fan_in_pipeline()
    local = collections.Counter(pl.iterate(stage))
    assert collections.Counter(pl.iterate(stage, executor=executor)) == local
    assert sum(local.values()) == 2 * 250


def test_ordered_results_are_the_local_ones(executor):
    stage = pl.map(square, pl.producer(numbers, 500), workers=3, maxsize=16)
    stage = pl.flat_map(twice, pl.filter(is_even, stage, workers=2), maxsize=8)
    local = list(pl.iterate(stage, ordered=True))
    assert list(pl.iterate(stage, ordered=True, executor=executor)) == local
    assert local[:6] == [0, 0, 4, 4, 16, 16]


def test_none_is_an_item(executor):
    stage = pl.map(describe, pl.producer(with_nones, 30), workers=2, maxsize=4)
    local = list(pl.iterate(stage, ordered=True))
    assert list(pl.iterate(stage, ordered=True, executor=executor)) == local
    assert local.count("none") == 10
    passed = pl.filter(keep, pl.producer(with_nones, 30), maxsize=4)
    assert list(pl.iterate(passed, ordered=True, executor=executor)) == list(with_nones(30))


def test_generator_stages_and_setup_and_kwargs(executor):
    shifted = pl.map(add_offset, pl.producer(numbers, 100), workers=2, setup=offset_setup)
    stage = pl.consumer(total, pl.consumer_producer(plus_one, shifted))
    assert stage.run(executor=executor) == stage.run() == [sum(range(1001, 1101))]
    each = pl.each(add_offset, pl.producer(numbers, 10), workers=2, kwargs={"offset": 1})
    assert pl.run(each, executor=executor) == pl.run(each) == [None, None]


# -- failures ----------------------------------------------------------------------------------

def test_an_exception_at_item_10_keeps_its_type_and_names_the_stage(executor):
    stage = pl.map(fail_at, pl.producer(numbers, 100), workers=2, maxsize=8, name="picky",
                   kwargs={"bad": 10})
    got, error = drain(pl.iterate(stage, ordered=True, executor=executor))
    assert got == list(range(10))
    assert type(error) is LookupError and error.args == ("no item 10",)
    assert error.__notes__ == ["raised in pipeline stage 'picky' (a task on %s)"
                               % type(executor).__name__]
    assert isinstance(error.__cause__, RemoteTraceback) and "fail_at" in str(error.__cause__)
    got, error = drain(pl.iterate(stage, executor=executor))
    assert type(error) is LookupError and len(error.__notes__) == 1


def test_an_exception_in_a_stage_run_here_names_it_once(executor):
    stage = pl.consumer_producer(fail_here, pl.map(square, pl.producer(numbers, 20)))
    got, error = drain(pl.iterate(stage, executor=executor))
    assert type(error) is KeyError
    assert error.__notes__ == ["raised in pipeline stage 'fail_here' (in this process, "
                               "driving the pipeline)"]


def test_a_killed_worker_is_a_worker_died_error(dying_executor, death_cause):
    stage = pl.map(die_on, pl.producer(numbers, 10), maxsize=2, kwargs={"victim": 3})
    got, error = drain(pl.iterate(stage, ordered=True, executor=dying_executor))
    assert got == [0, 1, 2]
    assert isinstance(error, WorkerDiedError), repr(error)
    assert "raised in pipeline stage 'die_on'" in error.__notes__[0]
    assert type(error.__cause__).__name__ == death_cause


# -- bounds, early exit ------------------------------------------------------------------------

def test_a_stalled_consumer_keeps_the_items_in_flight_bounded(executor):
    produced = [0]

    def counted(n):     # runs in this process: the producer is iterated here
        for i in range(n):
            produced[0] += 1
            yield i

    counting = Counting(executor)
    first = pl.map(square, pl.producer(counted, 10_000), workers=2, maxsize=16)
    second = pl.map(square, first, workers=1, maxsize=8)
    with pl.iterate(second, ordered=True, executor=counting) as items:
        taken = [next(items) for _ in range(5)]
        time.sleep(0.3)         # the stages have every chance to run ahead
        assert taken == [x ** 4 for x in range(5)]
        # maxsize per stage, plus the chunk each one is handing on (16/4 and 8/2 items)
        assert 5 < produced[0] <= 5 + 16 + 8 + 4 + 4, produced[0]
        assert counting.submitted <= 2 * (2 + 1) + (16 // 4 + 8 // 2), counting.submitted
        assert counting.peak <= 2 * 2 + 2 * 1
    assert wait_until(lambda: counting.running == 0)


def test_break_cancels_what_is_in_flight_and_returns_promptly(executor):
    counting = CountingCancels(executor)
    stage = pl.map(slow_after_first, pl.producer(numbers, 1000), workers=2, maxsize=4)
    with pl.iterate(stage, ordered=True, executor=counting) as items:
        for item in items:
            break
        started = time.monotonic()
    assert time.monotonic() - started < 1.5     # not waiting for the 2-second items
    assert item == 0 and counting.submitted <= 5
    assert counting.cancels >= counting.submitted - 1 >= 1   # all but the one taken (Dask
    # cancels its own futures once more, when the cancel reaches its scheduler)
    assert wait_until(lambda: counting.running == 0)    # cancelled, or finished by now


# -- what an executor cannot do ----------------------------------------------------------------

@pytest.mark.parametrize("make", ["producer", "consumer_producer", "consumer"])
def test_a_generator_stage_with_several_workers_is_refused(executor, make):
    source = pl.producer(numbers, 5, workers=2 if make == "producer" else 1, name="src")
    if make == "consumer_producer":
        source = pl.consumer_producer(plus_one, source, workers=2, name="src")
    elif make == "consumer":
        with pytest.raises(LocalOnlyError, match=r"^pipeline stage 'sum' is a consumer with "
                                                 r"workers=3: on an executor a generator"):
            pl.consumer(total, source, workers=3, name="sum").run(executor=executor)
        return
    with pytest.raises(LocalOnlyError, match=r"^pipeline stage 'src' is a %s with workers=2: "
                                             r"on an executor a generator stage runs in this "
                                             r"process, as one copy" % make):
        pl.iterate(source, executor=executor)
