"""Exhausted resources: descriptors, processes, and many short-lived pools.

Each scenario runs in a fresh interpreter (the limits would hurt pytest) that
prints one JSON line per case; the test judges the lines. A limit that is too
low must give a clear error when the pool is created or started - never a
pool with fewer workers than asked for, a hang, or a process left behind.
"""

import json
import re

import pytest
from conftest import reap_orphans

from . import scripts
from .tasks import descendants

CYCLES = 1000
#: What a clear error about descriptors or forking names.
CLEAR_FD_ERROR = re.compile(r"RLIMIT_NOFILE|file descriptors")
CLEAR_FORK_ERROR = re.compile(r"(fork|start).*(process|thread)|(process|thread).*(fork|start)")

POOL_OUTCOME = """
    import json, os, resource, sys, time
    from forkexec import ForkExchangeExecutor
    from faults.tasks import descendants, live_workers, square, square_slowly

    def settle(ex, workers):
        deadline = time.monotonic() + 10
        while ex.statistics().workers_alive < workers and time.monotonic() < deadline:
            time.sleep(0.005)
        return ex.statistics().workers_alive

    def try_pool(workers, before_start=lambda: None):
        '''Create a pool and make it start every worker; describe what happened.'''
        outcome = {}
        try:
            ex = ForkExchangeExecutor(workers)
        except Exception as exc:
            outcome["refused"] = "%s: %s" % (type(exc).__name__, exc)
            return outcome
        held = before_start()
        try:
            # Tasks that last long enough for each to need a worker of its own (a pool
            # forks a worker only for work no idle worker can take).
            futures = [ex.submit(square_slowly, i, 0.2) for i in range(workers)]
            outcome["results"] = [f.result(timeout=30) for f in futures]
            outcome["alive"] = settle(ex, workers)
        except Exception as exc:
            outcome["error"] = "%s: %s" % (type(exc).__name__, exc)
        finally:
            for fd in held or ():
                os.close(fd)
            ex.shutdown()
        return outcome

    def report(outcome):
        deadline = time.monotonic() + 2
        while descendants() and time.monotonic() < deadline:
            time.sleep(0.01)
        outcome["left"] = left = descendants()
        print(json.dumps(outcome), flush=True)
        for pid in left:   # judged already: do not let them outlive this script
            os.kill(pid, 9)
"""

NOFILE_AT_CREATION = POOL_OUTCOME + """
    workers = int(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    for spare in range(0, 16, 2):
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + workers + spare, hard))
        outcome = try_pool(workers)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        outcome["spare"] = spare
        report(outcome)
"""

NOFILE_AFTER_CREATION = POOL_OUTCOME + """
    workers = int(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    for free in range(0, workers + 12, 2):
        def use_up_descriptors():
            held = []
            try:
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:   # EMFILE: now give back the few the pool may have
                pass
            for _ in range(free):
                os.close(held.pop())
            return held
        outcome = try_pool(workers, use_up_descriptors)
        outcome["free"] = free
        report(outcome)
"""

#: Run as root, then become an unprivileged user (RLIMIT_NPROC does not bind root).
AS_NOBODY = """
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
"""

FORK_FAILS_AT_START = POOL_OUTCOME + AS_NOBODY + """
    # 1: the template cannot be forked; 2: it can, but then no thread can start
    nproc = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    report(try_pool(2))
"""

FORK_FAILS_FOR_A_REPLACEMENT = POOL_OUTCOME + AS_NOBODY + """
    import signal
    ex = ForkExchangeExecutor(2, on_worker_death="replace")
    futures = [ex.submit(square_slowly, i, 0.2) for i in range(4)]
    assert [f.result(timeout=30) for f in futures] == [0, 1, 4, 9]
    assert settle(ex, 2) == 2
    template = [pid for pid in descendants() if pid not in live_workers()]
    resource.prlimit(template[0], resource.RLIMIT_NPROC, (1, 1))   # it can fork no more
    os.kill(live_workers()[0], signal.SIGKILL)
    outcome = {}
    deadline = time.monotonic() + 30
    while "error" not in outcome and time.monotonic() < deadline:
        try:
            ex.submit(square, 3).exception(timeout=30)
        except Exception as exc:   # submit itself says the pool is broken, and why
            outcome["error"] = "%s: %s" % (type(exc).__name__, exc)
    ex.shutdown()
    report(outcome)
"""

CYCLES_SCRIPT = """
    import json, os, sys, threading, time
    from forkexec import ForkExchangeExecutor
    from faults.tasks import descendants, fd_count, square

    def cycle(i):
        if i % 2:
            with ForkExchangeExecutor(1) as ex:
                assert ex.submit(square, i).result(timeout=30) == i * i
        else:
            ex = ForkExchangeExecutor(1)
            assert ex.submit(square, i).result(timeout=30) == i * i
            ex.shutdown()

    cycle(1)   # anything created once per process is created now
    fds, threads = fd_count(), threading.active_count()
    started = time.monotonic()
    for i in range(int(sys.argv[1])):
        cycle(i)
    print(json.dumps({"seconds": time.monotonic() - started,
                      "fds": [fds, fd_count()], "threads": [threads, threading.active_count()],
                      "left": descendants()}))
"""


def outcomes(code, *args, timeout=90):
    try:
        done = scripts.run(code, timeout=timeout, args=[str(a) for a in args])
    finally:   # what the script killed may have been re-parented to us
        scripts.wait_gone(descendants(), 10)
        reap_orphans()
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0 and lines, "the script failed:\n%s" % done.stderr
    return lines, done.stderr


def assert_whole_or_refused(outcome, workers, clear_error):
    """A pool is whole and works, or was refused/broken with a clear error; nothing is left."""
    assert outcome["left"] == [], "processes left behind: %r" % outcome
    error = outcome.get("refused") or outcome.get("error")
    if error is not None:
        assert clear_error.search(error), "unclear error: %r" % outcome
    else:
        assert outcome["results"] == [i * i for i in range(workers)], outcome
        assert outcome["alive"] == workers, "a half-built pool: %r" % outcome


@pytest.mark.parametrize("workers", [2, 16])
def test_too_few_descriptors_for_the_workers_is_refused_at_creation(workers):
    lines, stderr = outcomes(NOFILE_AT_CREATION, workers)
    for outcome in lines:
        assert_whole_or_refused(outcome, workers, CLEAR_FD_ERROR)
        assert "error" not in outcome, outcome
    refused = [o["spare"] for o in lines if "refused" in o]
    assert refused and refused == [o["spare"] for o in lines[:len(refused)]], lines
    assert len(refused) < len(lines), "a generous limit was refused too: %r" % lines
    assert "Traceback" not in stderr, stderr


def test_descriptors_running_out_before_the_start_is_a_clear_error():
    lines, stderr = outcomes(NOFILE_AFTER_CREATION, 4)
    for outcome in lines:
        assert_whole_or_refused(outcome, 4, CLEAR_FD_ERROR)
    assert "Traceback" not in stderr, stderr


def test_a_worker_that_cannot_be_forked_is_a_clear_error():
    (outcome,), stderr = outcomes(FORK_FAILS_FOR_A_REPLACEMENT)
    assert outcome["left"] == [], outcome
    error = outcome["error"]
    assert error.startswith("BrokenProcessPool: ") and CLEAR_FORK_ERROR.search(error), outcome
    assert "Resource temporarily unavailable" in error, outcome


@pytest.mark.parametrize("nproc", [1, 2], ids=["template", "thread"])
def test_fork_failing_at_start_is_a_clear_error(nproc):
    (outcome,), stderr = outcomes(FORK_FAILS_AT_START, nproc)
    assert_whole_or_refused(outcome, 2, CLEAR_FORK_ERROR)


def test_a_thousand_pools_leak_nothing():
    (figures,), _ = outcomes(CYCLES_SCRIPT, CYCLES, timeout=110)
    assert figures["left"] == [], figures
    fds, threads = figures["fds"], figures["threads"]
    assert fds[1] == fds[0] and threads[1] == threads[0], figures
