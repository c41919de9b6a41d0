"""The native API on a Dask ``LocalCluster``: the same test bodies (foreign_cases.py) as on
threads and ForkExchangeExecutor.

One cluster (two worker processes, one thread each) serves the module and is closed after
its last test, which must leave no process behind. Dask is a test extra: without it these
tests skip, and fail under CI.
"""

import os
import time

import pytest

from conftest import GRACE, descendants, kill_all
from foreign_cases import *  # noqa: F401,F403  (the shared test bodies)
from interpreters import require_module


def wait_for_no_processes(ignore=()):
    """{pid: state} of the processes below this one (outside ``ignore``'s trees) left
    after GRACE seconds, or {} as soon as there are none."""
    deadline = time.monotonic() + GRACE
    while True:
        below = set(ignore)
        for root in ignore:
            below.update(descendants(root))
        left = {pid: s for pid, s in descendants().items() if pid not in below}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def worker_pids(client):
    """The pids of the cluster's workers, once both run (a killed one is restarted by its
    nanny, which runs in this process: workers are children of this process too)."""
    client.wait_for_workers(2, timeout=60)
    return set(client.run(os.getpid).values())


@pytest.fixture(scope="module")
def cluster(mp_helpers):
    """A client of a LocalCluster with two worker processes. Its workers start with spawn,
    which starts multiprocessing's resource tracker: mp_helpers stops it after the module,
    once the cluster is closed."""
    dask = require_module("dask")
    distributed = require_module("distributed")
    assert descendants() == {}
    # One death is enough: the call whose worker died fails at once with KilledWorker,
    # instead of being retried on 3 more workers (the default).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        left = wait_for_no_processes()
        kill_all(left)
        assert left == {}, "the closed Dask cluster left processes: %r" % left


@pytest.fixture(autouse=True)
def no_leftovers(cluster):
    """Replaces conftest's check: the cluster's processes, threads and sockets live as long
    as the module; what a test must not leave is a process of its own."""
    yield
    left = wait_for_no_processes(ignore=worker_pids(cluster))
    if left:
        kill_all(left)      # it waits for every process below this one: only if needed
    assert left == {}, "processes left behind (pid: state): %r" % left


@pytest.fixture
def executor(cluster):
    ex = cluster.get_executor()
    yield ex
    ex.shutdown(wait=True)


@pytest.fixture
def dying_executor(executor):
    return executor      # each Dask worker is a process: one dies alone, its nanny restarts it


@pytest.fixture
def death_cause():
    return "KilledWorker"
