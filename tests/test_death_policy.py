"""The death policy alone: from a "worker gone" event to a decision, without processes.

Exit statuses are raw wait statuses (``os.WIFSIGNALED`` and friends): a worker
killed by SIGKILL has status 9, one that called ``os._exit(3)`` has ``3 << 8``.
"""

import os
import signal
from concurrent.futures.process import BrokenProcessPool

import pytest

from forkexec._death_policy import MAX_BARREN_DEATHS, Decision, DeathPolicy
from forkexec._protocol import MARKS_PER_SLOT, NO_TASK, Kind
from forkexec._scheduler import CostModel, Scheduler
from forkexec._shared import WorkItem
from forkexec._worker_table import Worker, WorkerGone, WorkerTable
from forkexec.errors import WorkerDiedError

KILLED = signal.SIGKILL.value          # raw status of a worker killed by SIGKILL
SEGV = signal.SIGSEGV.value


def exited(code):
    return code << 8


def crunch(x):
    return x


def other(x):
    return x


class FakeClock:
    def __call__(self):
        return 0.0


SCHEDULER = Scheduler(CostModel(), FakeClock())
_ids = iter(range(1, 1 << 62))


def items(n, fn=crunch):
    return [WorkItem(object(), next(_ids), Kind.CALL, b"x", fn) for _ in range(n)]


def worker(pid=4242, tasks=(), budget=None, retiring=False, error=None):
    w = Worker(0, pid, None, budget)
    if tasks:
        SCHEDULER.sent(w, list(tasks))
    w.retiring = retiring or w.retiring
    w.error = error
    return w


def gone(w, status, running=None, lost=(), unstarted=None):
    if unstarted is None:
        unstarted = [it for it in w.tasks.values() if it is not running and it not in lost]
    return WorkerGone(w, status, running, list(lost), list(unstarted))


def test_raw_statuses_are_what_the_tests_think():
    assert os.WIFSIGNALED(KILLED) and os.WTERMSIG(KILLED) == signal.SIGKILL
    assert os.WIFEXITED(exited(3)) and os.WEXITSTATUS(exited(3)) == 3


# -- clean retirement ---------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["break", "replace"])
def test_a_cleanly_retired_worker_is_replaced(policy):
    w = worker(budget=0, retiring=True)
    decision = DeathPolicy(policy).decide(gone(w, 0), keep_size=True)
    assert decision == Decision([], [], True, None)


@pytest.mark.parametrize("policy", ["break", "replace"])
def test_a_retired_worker_is_not_replaced_when_the_pool_shrinks(policy):
    w = worker(budget=0, retiring=True)
    assert DeathPolicy(policy).decide(gone(w, 0), keep_size=False) == \
        Decision([], [], False, None)


@pytest.mark.parametrize("status", [KILLED, exited(1)])
def test_a_retiring_worker_that_dies_is_not_a_clean_retirement(status):
    w = worker(budget=0, retiring=True)
    decision = DeathPolicy("break").decide(gone(w, status), keep_size=True)
    assert isinstance(decision.broken, WorkerDiedError)


def test_a_retiring_worker_with_tasks_left_is_not_a_clean_retirement():
    w = worker(tasks=items(1), budget=1)
    assert w.retiring
    decision = DeathPolicy("break").decide(gone(w, 0), keep_size=True)
    assert isinstance(decision.broken, WorkerDiedError)


def test_a_retiring_worker_with_an_internal_error_is_not_a_clean_retirement():
    w = worker(budget=0, retiring=True, error="Traceback: boom\n")
    decision = DeathPolicy("break").decide(gone(w, 0), keep_size=True)
    assert decision.broken is not None
    assert "boom" in str(decision.broken)


def test_retirements_do_not_count_as_barren_deaths():
    policy = DeathPolicy("replace")
    for _ in range(3 * MAX_BARREN_DEATHS):
        assert policy.decide(gone(worker(budget=0, retiring=True), 0), True).broken is None


# -- "break" ------------------------------------------------------------------------------

def test_break_names_the_pid_and_the_signal():
    batch = items(3)
    w = worker(pid=31337, tasks=batch)
    decision = DeathPolicy("break").decide(gone(w, KILLED, running=batch[0]), keep_size=True)
    assert (decision.fail, decision.requeue, decision.respawn) == ([], [], False)
    err = decision.broken
    assert isinstance(err, WorkerDiedError) and isinstance(err, BrokenProcessPool)
    assert (err.pid, err.status, err.exitcode) == (31337, KILLED, -9)
    message = str(err)
    assert "pid 31337" in message
    assert "SIGKILL(-9)" in message
    assert "while running crunch" in message
    assert "on_worker_death='replace'" in message


def test_break_names_the_exit_code():
    w = worker(pid=77, tasks=items(2))
    err = DeathPolicy("break").decide(gone(w, exited(3)), keep_size=True).broken
    assert (err.pid, err.exitcode) == (77, 3)
    assert "exit code 3" in str(err)
    assert "with 2 tasks queued" in str(err)


@pytest.mark.parametrize("status", [0, exited(0)])
def test_break_on_an_idle_worker_that_exits_unasked(status):
    err = DeathPolicy("break").decide(gone(worker(pid=78), status), keep_size=True).broken
    assert isinstance(err, WorkerDiedError)
    assert "while idle" in str(err) and "exit code 0" in str(err)


def test_break_after_a_lost_result():
    batch = items(2)
    w = worker(tasks=batch)
    err = DeathPolicy("break").decide(gone(w, SEGV, lost=batch[:1]), True).broken
    assert "after finishing crunch, before sending its result" in str(err)
    assert "SIGSEGV(-11)" in str(err)


def test_break_includes_the_workers_internal_error():
    w = worker(pid=90, tasks=items(1), error="Traceback (most recent call last):\n  oops\n")
    err = DeathPolicy("break").decide(gone(w, exited(1)), True).broken
    assert "after an internal error in the worker:\nTraceback (most recent call last):\n  oops" \
        in str(err)


# -- "replace" ----------------------------------------------------------------------------

def test_replace_fails_running_and_lost_and_requeues_the_rest_in_order():
    batch = items(5)
    w = worker(pid=501, tasks=batch)
    event = gone(w, KILLED, running=batch[2], lost=batch[:2])
    decision = DeathPolicy("replace").decide(event, keep_size=True)
    assert decision.broken is None
    assert decision.respawn is True
    assert decision.requeue == batch[3:]
    failed = [it for it, _ in decision.fail]
    assert failed == [batch[2], batch[0], batch[1]]
    running_error = decision.fail[0][1]
    assert isinstance(running_error, WorkerDiedError)
    assert (running_error.pid, running_error.status) == (501, KILLED)
    assert "was running" in str(running_error)
    assert "pid 501" in str(running_error) and "SIGKILL(-9)" in str(running_error)
    assert "running crunch" in str(running_error)
    for it, error in decision.fail[1:]:
        assert isinstance(error, WorkerDiedError)
        assert "result was lost" in str(error)
        assert "not run again" in str(error)
        assert "501" in str(error)


def test_replace_with_only_unstarted_work_requeues_it_all():
    batch = items(3)
    decision = DeathPolicy("replace").decide(gone(worker(tasks=batch), KILLED), True)
    assert decision == Decision([], batch, True, None)


def test_replace_names_the_failed_function():
    batch = items(1, fn=other)
    decision = DeathPolicy("replace").decide(
        gone(worker(tasks=batch), KILLED, running=batch[0]), True)
    assert "running other died" in str(decision.fail[0][1])


def test_replace_includes_the_workers_internal_error():
    batch = items(1)
    w = worker(tasks=batch, error="Traceback: kaputt\n")
    decision = DeathPolicy("replace").decide(gone(w, exited(1), running=batch[0]), True)
    assert "internal error in the worker:\nTraceback: kaputt" in str(decision.fail[0][1])


def test_replace_from_a_table_event():
    """The worker table's event, from the marks, straight into the policy."""
    tbl = WorkerTable(1, [NO_TASK] * MARKS_PER_SLOT)
    w = tbl.born(0, 600, None, None)
    batch = items(4)
    SCHEDULER.sent(w, batch)
    tbl.marks[0] = batch[1].task_id   # started the second
    tbl.marks[1] = batch[0].task_id   # finished the first
    decision = DeathPolicy("replace").decide(tbl.remove(w, KILLED), True)
    assert [it for it, _ in decision.fail] == [batch[1], batch[0]]
    assert "was running" in str(decision.fail[0][1])
    assert "result was lost" in str(decision.fail[1][1])
    assert decision.requeue == batch[2:]


# -- barren deaths ------------------------------------------------------------------------

def barren(policy, pid=1):
    return policy.decide(gone(worker(pid=pid, tasks=items(1)), KILLED), keep_size=True)


def test_barren_deaths_in_a_row_break_the_pool():
    policy = DeathPolicy("replace")
    for i in range(MAX_BARREN_DEATHS - 1):
        decision = barren(policy, pid=i)
        assert decision.broken is None and decision.respawn
    decision = barren(policy, pid=999)
    assert MAX_BARREN_DEATHS == 5
    assert decision.respawn is False and decision.requeue == [] and decision.fail == []
    err = decision.broken
    assert isinstance(err, WorkerDiedError) and err.pid == 999
    assert "5 worker processes in a row died before running any task" in str(err)
    assert "SIGKILL(-9)" in str(err)


def test_results_reset_the_barren_count():
    policy = DeathPolicy("replace")
    for _ in range(3):
        for _ in range(MAX_BARREN_DEATHS - 1):
            assert barren(policy).broken is None
        policy.results_arrived()
    assert policy.barren == 0


def test_deaths_with_a_task_running_are_not_barren():
    policy = DeathPolicy("replace")
    for _ in range(3 * MAX_BARREN_DEATHS):
        batch = items(1)
        decision = policy.decide(gone(worker(tasks=batch), KILLED, running=batch[0]), True)
        assert decision.broken is None
    for _ in range(3 * MAX_BARREN_DEATHS):
        batch = items(1)
        decision = policy.decide(gone(worker(tasks=batch), KILLED, lost=batch), True)
        assert decision.broken is None


def test_a_death_with_a_task_running_ends_a_row_of_barren_deaths():
    """"this many deaths in a row with no task running": a worker that got as far as
    running a task interrupts the row."""
    policy = DeathPolicy("replace")
    for _ in range(MAX_BARREN_DEATHS - 1):
        assert barren(policy).broken is None
    batch = items(1)
    assert policy.decide(gone(worker(tasks=batch), KILLED, running=batch[0]), True).broken \
        is None
    for _ in range(MAX_BARREN_DEATHS - 1):
        assert barren(policy).broken is None, \
            "broken after %d barren deaths in a row" % (MAX_BARREN_DEATHS - 1)


def test_the_break_policy_ignores_the_barren_count():
    policy = DeathPolicy("break")
    assert barren(policy).broken is not None
    assert policy.barren == 0
