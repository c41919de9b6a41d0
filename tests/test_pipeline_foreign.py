"""Generator pipelines on threads and on ForkExchangeExecutor (bodies in
pipeline_foreign_cases.py)."""

import concurrent.futures

import pytest

from forkexec import pipeline as pl
from foreign_cases import Counting
from pipeline_foreign_cases import *  # noqa: F401,F403  (the shared test bodies)
# The executors: threads and ours, and ours losing workers one at a time.
from test_foreign import death_cause, dying_executor, executor  # noqa: F401

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("bad", [3, "executor"])
def test_an_executor_must_have_submit(bad):
    with pytest.raises(TypeError, match=r"^executor must be a concurrent.futures.Executor "
                                        r"\(an object with a submit method\), not %r$" % bad):
        pl.iterate(pl.producer(numbers, 3), executor=bad)


def test_setup_and_teardown_run_around_each_chunk_and_once_here():
    """Threads only: the calls to set-up and tear-down are seen in this process."""
    calls = []

    def setup():
        calls.append("setup")
        return {"offset": len(calls)}

    def teardown(offset):
        calls.append(("teardown", offset))

    def shifted(x, offset):
        return x + 1000 * offset, pl.worker()

    def passing(source, offset):
        calls.append(("here", offset))
        yield from source

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        counting = Counting(pool)
        stage = pl.map(shifted, pl.producer(numbers, 50), maxsize=8, setup=setup,
                       teardown=teardown)
        stage = pl.consumer_producer(passing, stage, setup=setup, teardown=teardown)
        got = list(pl.iterate(stage, ordered=False, executor=counting))
    assert sorted(x % 1000 for x, _ in got) == list(range(50))
    assert {w for _, w in got} == {None}           # no stage process: pl.worker() is None
    assert calls.count("setup") == counting.submitted + 1 >= 50 // 4 + 1
    here = calls.index(("here", 1))                 # the consumer_producer set up first
    assert calls[here - 1] == "setup" and calls[-1] == ("teardown", 1)
    torn = [c for c in calls if c != "setup" and c[0] == "teardown"]
    assert len(torn) == counting.submitted + 1
