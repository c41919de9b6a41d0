"""The native API on threads and on ForkExchangeExecutor (bodies in foreign_cases.py)."""

import concurrent.futures
import pickle
import socket

import pytest

from forkexec import Channel, ForkExchangeExecutor, Queue
from foreign_cases import *  # noqa: F401,F403  (the shared test bodies)


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
    """Workers that die alone: only the call a dead worker was running fails."""
    with ForkExchangeExecutor(2, on_worker_death="replace") as ex:
        yield ex


@pytest.fixture
def death_cause():
    return "NoneType"     # ForkExchangeExecutor's WorkerDiedError is passed on as it is


@pytest.mark.parametrize("bad", [3, "executor"])
def test_an_executor_must_have_submit(bad):
    with pytest.raises(TypeError, match=r"^executor must be a concurrent.futures.Executor "
                                        r"\(an object with a submit method\), not %r$" % bad):
        Queue(executor=bad)


def test_a_channel_cannot_be_pickled_to_an_executors_task():
    mine, theirs = socket.socketpair()
    channel = Channel(0, mine)
    try:
        with pytest.raises(TypeError, match=r"^cannot pickle <Channel pid=0 fd=\d+ open>: a "
                                            r"Channel links this process to one it forked"):
            pickle.dumps(channel)
    finally:
        channel.close()
        theirs.close()


@pytest.mark.parametrize("make", ["Queue", "Map", "pmap"])
def test_a_task_timeout_on_a_foreign_executor_is_refused_clearly(executor, make):
    """There is no process of ours to kill: say so, instead of silently never timing out."""
    import forkexec
    from forkexec import LocalOnlyError
    with pytest.raises(LocalOnlyError, match="task_timeout kills a forked child"):
        if make == "pmap":
            forkexec.pmap(abs, [1, -2], task_timeout=1.0, executor=executor)
        else:
            getattr(forkexec, make)(task_timeout=1.0, executor=executor)
