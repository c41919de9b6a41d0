"""Workers that die or run out of memory while thousands of tasks flow.

With ``on_worker_death="replace"`` only the task a dead worker was running is
lost; with ``"break"`` everything pending fails promptly with
``BrokenProcessPool``. A task that merely raises ``MemoryError`` (also when an
``RLIMIT_AS`` makes a large allocation fail) fails alone under either policy.
"""

import collections
import os
import random
import signal
from concurrent.futures.process import BrokenProcessPool

import pytest

from forkexec import ForkExchangeExecutor, WorkerDiedError

from .tasks import (FAULTS, Killer, fault_at, flow_task, limit_address_space, live_workers,
                    read_starts, square, square_slowly, unfinished)

#: Generous bounds for a loaded 2-core machine; a hang fails well before pytest's timeout.
SETTLE_WITHIN = 60.0
BREAK_PROMPTLY = 15.0


def test_replace_loses_only_the_tasks_running_in_killed_workers(tmp_path):
    seed = random.randrange(1 << 32)
    count = 3000
    log = str(tmp_path / "starts")
    with ForkExchangeExecutor(2, initializer=limit_address_space,
                              on_worker_death="replace") as ex:
        assert ex.submit(square, 3).result(timeout=SETTLE_WITHIN) == 9   # the pool is up
        killer = Killer(seed, pause=(0.01, 0.06), limit=30)
        killer.start()
        try:
            futures = [ex.submit(flow_task, i, log) for i in range(count)]
            not_done = unfinished(futures, SETTLE_WITHIN)
        finally:
            killer.stop()
        assert not not_done, "%d futures never finished (seed %d)" % (len(not_done), seed)

        killed = set(killer.killed)
        started = read_starts(log)
        lost_to_killer = collections.Counter()   # killed pid -> tasks it was running
        results_lost = 0   # tasks that finished where the killer struck, results not sent
        own_deaths = 0
        for i, future in enumerate(futures):
            kind = fault_at(i)
            exc = future.exception()
            if isinstance(exc, WorkerDiedError) and exc.pid in killed and exc.exitcode == -9 \
                    and kind != "sigkill":
                if "result was lost" in str(exc):   # it ran there, and is not run again
                    assert (i, exc.pid) in started, (i, exc)
                    results_lost += 1
                    continue
                assert "was running" in str(exc), exc
                # Only the task running where the killer struck may be lost: one that noted
                # its start there, or the one about to (killed before it could write).
                ran_there = [j for j, pid in started if pid == exc.pid]
                assert (i, exc.pid) in started or i > max(ran_there, default=-1), \
                    "task %d was not running in %d: %s" % (i, exc.pid, exc)
                lost_to_killer[exc.pid] += 1
                continue
            if kind is None:
                assert exc is None and future.result() == i * i, (i, exc, seed)
                continue
            _, raises, code = FAULTS[kind]
            assert type(exc).__name__ == raises, (i, kind, exc, seed)
            if code is not None:
                own_deaths += 1
                assert isinstance(exc, BrokenProcessPool)
                assert exc.exitcode == code and (i, exc.pid) in started, (i, kind, exc)
                assert "pid %d" % exc.pid in str(exc)
                if code < 0:
                    assert "%s(%d)" % (signal.Signals(-code).name, code) in str(exc)
                else:
                    assert "exit code %d" % code in str(exc)
        # One SIGKILL costs at most the one task that worker was running (and results of
        # tasks it had just finished and not yet sent), and no task ever starts twice.
        assert all(n == 1 for n in lost_to_killer.values()), lost_to_killer
        starts = collections.Counter(i for i, _pid in started)
        assert max(starts.values()) == 1, [i for i, n in starts.items() if n > 1]
        assert len(killed) >= 5, "the killer found too few workers to kill: %r" % killed
        # ... and the pool keeps going, at full strength.
        assert list(ex.map(square, range(500), chunksize=25)) == [x * x for x in range(500)]
        stats = ex.statistics()
        assert stats.workers_alive == 2
        assert stats.workers_replaced >= own_deaths + len(lost_to_killer)


def test_round_trips_from_two_threads_while_workers_are_killed(tmp_path):
    """Round trips take the callers' shortcuts (a task handed to an idle worker, its reply
    read in the caller, the worker resting between calls): killed at random meanwhile, a
    worker costs at most the task it was running, no task starts twice, nothing hangs."""
    import threading
    seed = random.randrange(1 << 32)
    log = str(tmp_path / "starts")
    outcomes = {}
    with ForkExchangeExecutor(2, on_worker_death="replace") as ex:
        assert ex.submit(square, 3).result(timeout=SETTLE_WITHIN) == 9

        def caller(base):
            for i in range(base, base + 400):
                future = ex.submit(square_slowly, i, 0, log)
                try:
                    outcomes[i] = future.result(timeout=SETTLE_WITHIN)
                except BaseException as exc:  # noqa: B902 - judged below
                    outcomes[i] = exc

        killer = Killer(seed, pause=(0.005, 0.03), limit=25)
        callers = [threading.Thread(target=caller, args=(k * 1000,)) for k in range(2)]
        killer.start()
        try:
            for t in callers:
                t.start()
            for t in callers:
                t.join(SETTLE_WITHIN * 2)
        finally:
            killer.stop()
        assert not any(t.is_alive() for t in callers), "a round trip hung (seed %d)" % seed
        killed = set(killer.killed)
        started = read_starts(log)
        for i, outcome in outcomes.items():
            if isinstance(outcome, WorkerDiedError):
                assert outcome.pid in killed, (i, outcome, seed)
            else:
                assert outcome == i * i, (i, outcome, seed)
        starts = collections.Counter(i for i, _pid in started)
        assert starts and max(starts.values()) == 1, [i for i, n in starts.items() if n > 1]
        assert len(outcomes) == 800
        assert len(killed) >= 3, "the killer found too few workers to kill: %r" % killed
        assert [ex.submit(square, i).result(timeout=SETTLE_WITHIN) for i in range(10)] == \
            [i * i for i in range(10)]


def test_replace_a_worker_killed_while_idle_costs_no_task(tmp_path):
    log = str(tmp_path / "starts")
    with ForkExchangeExecutor(2, on_worker_death="replace") as ex:
        for round_ in range(5):
            assert [f.result(timeout=SETTLE_WITHIN) for f in
                    [ex.submit(square_slowly, i, 0.05) for i in range(2)]] == [0, 1]
            victim = live_workers()[0]    # both are idle now
            os.kill(victim, signal.SIGKILL)
            futures = [ex.submit(square_slowly, i, 0, log) for i in range(4)]
            outcomes = [f.exception(timeout=SETTLE_WITHIN) or f.result() for f in futures]
            assert outcomes == [0, 1, 4, 9], "round %d: %r; tasks started: %r" % (
                round_, outcomes, sorted(read_starts(log)))


def test_memory_errors_fail_alone_and_cost_no_worker():
    with ForkExchangeExecutor(2, initializer=limit_address_space) as ex:
        futures = []
        for i in range(600):
            kind = ("address_space", "memory_error")[i % 2] if i % 50 == 0 else None
            futures.append(ex.submit(FAULTS[kind][0]) if kind else ex.submit(square, i))
        for i, future in enumerate(futures):
            if i % 50 == 0:
                with pytest.raises(MemoryError):
                    future.result(timeout=SETTLE_WITHIN)
            else:
                assert future.result(timeout=SETTLE_WITHIN) == i * i
        assert ex.statistics().workers_replaced == 0


def submit_until_broken(ex, calls):
    """Submit ``(fn, *args)`` calls; stop quietly when submit says the pool is broken."""
    futures = []
    for fn, *args in calls:
        try:
            futures.append(ex.submit(fn, *args))
        except BrokenProcessPool:
            break
    return futures


@pytest.mark.parametrize("how", ["segfault", "os_exit", "sigkill", "external_sigkill"])
def test_break_fails_everything_pending_promptly(how):
    calls = [(square_slowly, i) for i in range(2000)]
    if how != "external_sigkill":
        calls.insert(300, (FAULTS[how][0],))
    code = -signal.SIGKILL if how.endswith("sigkill") else FAULTS[how][2]
    killer = Killer(seed=1, pause=(0.1, 0.1), limit=1)
    ex = ForkExchangeExecutor(2)
    try:
        assert ex.submit(square, 3).result(timeout=SETTLE_WITHIN) == 9   # workers are up
        futures = submit_until_broken(ex, calls)
        if how == "external_sigkill":
            killer.start()
        not_done = unfinished(futures, BREAK_PROMPTLY)
        assert not not_done, "%d futures still pending after the pool broke" % len(not_done)
        died = [f.exception() for f in futures if isinstance(f.exception(), WorkerDiedError)]
        assert died, "no future names the dead worker"
        assert all(exc.exitcode == code and "pid %d" % exc.pid in str(exc) for exc in died), died
        assert len({exc.pid for exc in died}) == 1, died
        if how == "external_sigkill":
            assert died[0].pid == killer.killed[0]
        for (fn, *args), future in zip(calls, futures):
            err = future.exception()
            assert (err is None and future.result() == args[0] ** 2
                    or isinstance(err, BrokenProcessPool)), (args, err)
        assert isinstance(futures[-1].exception(), BrokenProcessPool)
        with pytest.raises(BrokenProcessPool):
            ex.submit(square, 1)
    finally:
        if killer.ident is not None:   # it was started
            killer.stop()
        ex.shutdown(wait=True)
