"""Task control: per-task timeouts (``task_timeout=``, ``submit_task``), ``kill_task``,
and the statistics that show what happened.

"It ran once" and "it never ran" are proven by lines the tasks append to a log.
"""

import concurrent.futures
import time

import pytest

import executor_helpers as h
from conftest import state_of
from forkexec import ForkExchangeExecutor, FunctionStatistics, TaskTimeout

pytestmark = pytest.mark.timeout(90)


def log_sleep(log, name, seconds):
    """Log ``name`` on start, sleep, log ``name-done``; return ``name``."""
    h.append_line(log, name)
    time.sleep(seconds)
    h.append_line(log, name + "-done")
    return name


def counts(log):
    lines = h.read_lines(log)
    return {line: lines.count(line) for line in lines}


# -- per-task timeout -----------------------------------------------------------------
def test_a_task_past_its_timeout_fails_alone_and_every_neighbour_runs_once(tmp_path):
    log = str(tmp_path / "log")
    with ForkExchangeExecutor(2) as ex:
        slow = ex.submit_task(log_sleep, (log, "slow", 60), timeout=0.5)
        neighbours = [ex.submit(log_sleep, log, "n%d" % i, 0.05) for i in range(12)]
        with pytest.raises(TaskTimeout) as info:
            slow.result(timeout=30)
        assert [f.result(timeout=30) for f in neighbours] == ["n%d" % i for i in range(12)]
        # The pool is not broken (on_worker_death is "break"): a new worker took over.
        assert ex.submit(h.square, 7).result(timeout=30) == 49
        stats = ex.statistics()
    err = info.value
    assert isinstance(err, TimeoutError)
    assert "log_sleep ran longer than its timeout of 0.5 seconds" in str(err)
    assert err.function == "log_sleep" and err.timeout == 0.5
    seen = counts(log)
    assert seen.pop("slow") == 1 and "slow-done" not in seen
    assert seen == {name: 1 for i in range(12) for name in ("n%d" % i, "n%d-done" % i)}
    assert stats.tasks_timed_out == 1 and stats.workers_replaced >= 1


def test_time_spent_queued_does_not_count(tmp_path):
    log = str(tmp_path / "log")
    with ForkExchangeExecutor(1) as ex:
        ahead = ex.submit(log_sleep, log, "ahead", 1.2)
        timed = ex.submit_task(log_sleep, (log, "timed", 0.05), timeout=0.8)
        assert timed.result(timeout=30) == "timed"   # queued ~1.2 s, ran 0.05 s
        assert ahead.result(timeout=30) == "ahead"
        assert ex.statistics().tasks_timed_out == 0


def test_pool_task_timeout_applies_to_submit_and_map_and_can_be_lifted(tmp_path):
    log = str(tmp_path / "log")
    with ForkExchangeExecutor(2, task_timeout=0.5) as ex:
        with pytest.raises(TaskTimeout):
            ex.submit(time.sleep, 30).result(timeout=30)
        results = ex.map(h.sleep_and_return, [0.01, 30, 0.01], [1, 2, 3])
        assert next(results) == 1
        with pytest.raises(TaskTimeout, match="sleep_and_return ran longer"):
            next(results)
        # timeout=None lifts the pool's limit for one call; map takes its own.
        assert ex.submit_task(log_sleep, (log, "long", 0.8), timeout=None).result(30) == "long"
        assert list(ex.map(h.sleep_and_return, [0.7], [5], task_timeout=3)) == [5]
        assert ex.statistics().tasks_timed_out == 2


def test_submit_task_keeps_the_tasks_own_keyword_arguments():
    with ForkExchangeExecutor(1) as ex:
        fut = ex.submit_task(h.record_call, (1,), {"timeout": 3, "fn": "x"}, timeout=10)
        assert fut.result(timeout=30) == ((1,), {"timeout": 3, "fn": "x"})


@pytest.mark.parametrize("bad, error, message", [
    (-1, ValueError, "task_timeout must be a positive, finite number of seconds or None, "
                     "not -1"),
    (0, ValueError, "task_timeout must be a positive"),
    (float("nan"), ValueError, "task_timeout must be a positive"),
    ("5", TypeError, "task_timeout must be a number of seconds or None, not '5'"),
    (True, TypeError, "task_timeout must be a number of seconds or None, not True"),
])
def test_bad_timeouts_are_refused_with_a_clear_error(bad, error, message):
    with pytest.raises(error, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        ForkExchangeExecutor(1, task_timeout=bad)
    ex = ForkExchangeExecutor(1)
    with pytest.raises(error, match="^" + message.replace("task_timeout", "timeout")
                       .replace("(", r"\(").replace(")", r"\)")):
        ex.submit_task(h.square, (1,), timeout=bad)
    with pytest.raises(TypeError, match="^args must be an iterable"):
        ex.submit_task(h.square, 1)
    with pytest.raises(TypeError, match="^kwargs must be a mapping"):
        ex.submit_task(h.square, (1,), [("a", 1)])
    ex.shutdown()


# -- kill_task ---------------------------------------------------------------------------
def test_kill_task_stops_a_running_task_and_replaces_its_worker(tmp_path):
    log = str(tmp_path / "log")
    started = str(tmp_path / "started")
    with ForkExchangeExecutor(2) as ex:
        victim = ex.submit(h.announce_and_sleep, started, 60)
        pid = h.read_pid(started)
        neighbours = [ex.submit(log_sleep, log, "n%d" % i, 0.05) for i in range(8)]
        assert ex.kill_task(victim) is True
        assert victim.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            victim.result(timeout=1)
        assert [f.result(timeout=30) for f in neighbours] == ["n%d" % i for i in range(8)]
        assert pid not in set(ex.map(h.getpid, range(8)))
        h.wait_until(lambda: state_of(pid) is None, what="the killed worker to be reaped")
        assert ex.kill_task(victim) is False   # nothing left to do
        stats = ex.statistics()
    assert stats.tasks_killed == 1
    assert counts(log) == {n: 1 for i in range(8) for n in ("n%d" % i, "n%d-done" % i)}


def test_kill_task_cancels_a_queued_task_which_never_runs(tmp_path):
    log = str(tmp_path / "log")
    with ForkExchangeExecutor(1) as ex:
        ahead = ex.submit(log_sleep, log, "ahead", 0.5)
        queued = ex.submit(log_sleep, log, "queued", 0)
        assert ex.kill_task(queued) is True
        assert queued.cancelled()
        assert ahead.result(timeout=30) == "ahead"
        assert ex.submit(h.square, 4).result(timeout=30) == 16
    assert "queued" not in counts(log)


def test_kill_task_of_a_finished_or_foreign_future_does_nothing():
    with ForkExchangeExecutor(1) as ex:
        fut = ex.submit(h.square, 5)
        assert fut.result(timeout=30) == 25
        assert ex.kill_task(fut) is False
        foreign = concurrent.futures.Future()
        foreign.set_running_or_notify_cancel()
        assert ex.kill_task(foreign) is False
        assert not foreign.done()
        with pytest.raises(TypeError, match="^kill_task\\(\\) needs a Future"):
            ex.kill_task("not a future")
        assert ex.submit(h.square, 6).result(timeout=30) == 36


# -- statistics ---------------------------------------------------------------------------
def test_statistics_show_time_per_function_and_where_worker_time_went():
    with ForkExchangeExecutor(2) as ex:
        assert list(ex.map(h.sleep_and_return, [0.05] * 6, range(6))) == list(range(6))
        assert list(ex.map(h.square, range(100), chunksize=10)) == [i * i for i in range(100)]
        stats = ex.statistics()
    by_name = {f.name: f for f in stats.functions}
    sleeper = by_name["executor_helpers.sleep_and_return"]
    assert isinstance(sleeper, FunctionStatistics)
    assert sleeper.calls == 6 and 0.25 <= sleeper.seconds < 10
    assert sleeper.per_call == pytest.approx(sleeper.seconds / 6)
    assert by_name["executor_helpers.square"].calls == 100   # items, not chunks
    assert list(stats.functions) == sorted(stats.functions, key=lambda f: -f.seconds)
    assert stats.busy_seconds >= sleeper.seconds
    assert stats.starting_seconds > 0 and stats.idle_seconds >= 0
    assert stats.tasks_timed_out == stats.tasks_killed == 0


# -- the decisions, without processes ------------------------------------------------------
class FakeLink:
    def __init__(self):
        self.killed = []

    def kill_worker(self, pid):
        self.killed.append(pid)


class FakeChannel:
    closed = False

    def __init__(self):
        self.frames = []

    def queue(self, frame):
        self.frames.append(frame)

    def flush_nowait(self):
        return True


def control_with_worker(clock, idle_timeout=None):
    from forkexec._protocol import MARKS_PER_SLOT, NO_TASK, TIMES_PER_SLOT
    from forkexec._shared import Shared
    from forkexec._task_control import TaskControl
    from forkexec._worker_table import WorkerTable
    marks = [NO_TASK] * ((MARKS_PER_SLOT + TIMES_PER_SLOT) * 2)
    table = WorkerTable(2, marks)
    worker = table.born(1, 4242, FakeChannel(), None)
    link = FakeLink()
    control = TaskControl(Shared(), link, marks, 2, idle_timeout, clock=lambda: clock[0])
    return control, table, worker, link, marks


def timed_item(task_id, timeout):
    from forkexec._protocol import Kind
    from forkexec._shared import WorkItem
    return WorkItem(concurrent.futures.Future(), task_id, Kind.CALL, b"", h.square, 1,
                    timeout)


def test_the_limit_counts_from_the_start_time_the_worker_wrote():
    from forkexec._protocol import started_at_index
    clock = [100.0]
    control, table, worker, link, marks = control_with_worker(clock)
    item = timed_item(7, 2.0)
    worker.tasks[7] = item
    assert control.sent(worker, [item]) is True
    clock[0] = 150.0   # long after it was sent, but it has not started: no kill
    assert control.check(table) is not None and link.killed == []
    marks[started_at_index(2, 1)] = int(149.5 * 1e6)   # started at 149.5...
    marks[2 * 1] = 7
    assert control.check(table) == pytest.approx(1.5)   # ...so it is due at 151.5
    clock[0] = 151.4
    control.check(table)
    assert link.killed == []
    clock[0] = 151.6
    control.check(table)
    assert link.killed == [4242] and worker.stop == ("timeout", item) and worker.retiring


def test_a_worker_is_retired_after_idle_timeout_of_idleness_only():
    from forkexec._protocol import RETIRE, to_wire
    from forkexec.wire import encode
    clock = [10.0]
    control, table, worker, link, marks = control_with_worker(clock, idle_timeout=5.0)
    assert control.check(table) == pytest.approx(1.25)   # idle from now; looks again soon
    clock[0] = 13.0
    marks[2 * 1 + 1] = 99   # it finished a task meanwhile: idle again from now
    control.check(table)
    clock[0] = 17.9
    assert control.check(table) == pytest.approx(0.1)   # wakes when it is due
    assert worker.channel.frames == []
    clock[0] = 18.0
    control.check(table)
    assert worker.channel.frames == [encode(to_wire(RETIRE))] and worker.stop == ("idle", None)
    assert link.killed == []   # asked to exit (it runs its finalizer), not killed
