"""Generator pipelines on threads and on ForkExchangeExecutor (bodies in
pipeline_foreign_cases.py)."""

import concurrent.futures

import pytest

from forkexec import ForkExchangeExecutor
from forkexec import pipeline as pl
from pipeline_foreign_cases import *  # noqa: F401,F403  (the shared test bodies)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["threads", "forkexec"])
def executor(request):
    if request.param == "threads":
        ex = concurrent.futures.ThreadPoolExecutor(2)
    else:
        ex = ForkExchangeExecutor(2)
    with ex:
        yield ex


@pytest.fixture
def dying_executor():
    """Workers that die alone: only the chunk a dead worker was running fails."""
    with ForkExchangeExecutor(2, on_worker_death="replace") as ex:
        yield ex


@pytest.fixture
def death_cause():
    return "NoneType"     # ForkExchangeExecutor's WorkerDiedError is passed on as it is


@pytest.mark.parametrize("bad", [3, "executor"])
def test_an_executor_must_have_submit(bad):
    with pytest.raises(TypeError, match=r"^executor must be a concurrent.futures.Executor "
                                        r"\(an object with a submit method\), not %r$" % bad):
        pl.iterate(pl.producer(numbers, 3), executor=bad)
