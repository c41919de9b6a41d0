"""Generator pipelines on a Dask ``LocalCluster``: the same test bodies
(pipeline_foreign_cases.py) as on threads and ForkExchangeExecutor.

The fixtures are test_foreign_dask.py's: one cluster (two worker processes, one thread
each) for this module, closed after its last test, which must leave no process behind.
Without Dask these tests skip, and fail under CI.
"""

import threading

import pytest

from forkexec import pipeline as pl
from pipeline_foreign_cases import *  # noqa: F401,F403  (the shared test bodies)
from test_foreign_dask import (cluster, death_cause, dying_executor,  # noqa: F401
                               executor, no_leftovers)

pytestmark = pytest.mark.timeout(120)


def test_what_dask_cannot_pickle_fails_at_submit_naming_the_stage(executor):
    stage = pl.map(add_offset, pl.producer(numbers, 5), kwargs={"offset": threading.Lock()},
                   name="locked")
    with pytest.raises(Exception, match="serialize") as info:
        list(pl.iterate(stage, executor=executor))
    assert info.value.__notes__ == ["raised in pipeline stage 'locked' (a task on "
                                    "ClientExecutor)"]
