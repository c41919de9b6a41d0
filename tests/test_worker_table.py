"""The worker table alone: slots, births, exit reports and a dead worker's tasks.

No process: the marks are a plain list laid out as the shared array is
(``marks[2*slot]``: the id of the task the worker last started,
``marks[2*slot+1]``: the one it last finished, ``NO_TASK`` for none), and
``Worker`` objects are fed batches through the scheduler, as the exchange loop
does. ``run_worker`` plays ``forkexec._worker._serve``'s part: it writes the
marks around each task in the order the tasks were sent.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkexec._protocol import MARKS_PER_SLOT, NO_TASK, Kind
from forkexec._scheduler import CostModel, Scheduler
from forkexec._shared import WorkItem
from forkexec._worker_table import Worker, WorkerGone, WorkerTable

PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def work(x):
    return x


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


SCHEDULER = Scheduler(CostModel(), FakeClock())
_ids = iter(range(100, 1 << 62))


def items(n):
    return [WorkItem(object(), next(_ids), Kind.CALL, b"x", work) for _ in range(n)]


def table(nslots=3):
    return WorkerTable(nslots, [NO_TASK] * (MARKS_PER_SLOT * nslots))


def send(worker, batch):
    SCHEDULER.sent(worker, batch)
    return batch


def start_mark(tbl, worker, task_id):
    tbl.marks[MARKS_PER_SLOT * worker.slot] = task_id


def finish_mark(tbl, worker, task_id):
    tbl.marks[MARKS_PER_SLOT * worker.slot + 1] = task_id


def ids(gone_items):
    return [it.task_id for it in gone_items]


# -- births, slots, exit reports ----------------------------------------------------------

def test_a_new_table_has_every_slot_free():
    tbl = table(3)
    assert tbl.free_slots() == [0, 1, 2]
    assert (len(tbl), tbl.live(), tbl.idle()) == (0, 0, 0)
    assert list(tbl) == []


def test_start_requested_born_and_start_failed_keep_the_slots():
    tbl = table(3)
    tbl.start_requested(0)
    tbl.start_requested(2)
    assert tbl.free_slots() == [1]
    assert (tbl.live(), tbl.idle()) == (2, 2)   # starting workers will take work
    worker = tbl.born(0, 1234, "channel-0", 5)
    assert isinstance(worker, Worker)
    assert (worker.slot, worker.pid, worker.channel, worker.budget) == (0, 1234, "channel-0", 5)
    assert tbl.starting == {2} and tbl.workers == {0: worker} and tbl.by_pid == {1234: worker}
    assert list(tbl) == [worker] and len(tbl) == 1
    tbl.start_failed(2)
    assert tbl.free_slots() == [1, 2]
    assert (tbl.live(), tbl.idle()) == (1, 1)


def test_idle_counts_neither_busy_nor_retiring_workers():
    tbl = table(3)
    idle, busy, retiring = (tbl.born(slot, 10 + slot, None, None) for slot in range(3))
    send(busy, items(1))
    retiring.retiring = True
    assert tbl.idle() == 1
    assert tbl.live() == 3


def test_born_resets_the_marks_of_its_slot_only():
    tbl = table(3)
    tbl.marks[:] = [7, 8, 17, 18, 27, 28]   # left by the slots' previous workers
    tbl.born(1, 99, None, None)
    assert tbl.marks == [7, 8, NO_TASK, NO_TASK, 27, 28]


def test_born_resets_marks_in_an_array():
    import array
    tbl = WorkerTable(2, array.array("q", [5, 6, 7, 8]))
    tbl.born(0, 99, None, None)
    assert list(tbl.marks) == [NO_TASK, NO_TASK, 7, 8]


def test_remove_frees_the_slot_and_the_pid():
    tbl = table()
    worker = tbl.born(2, 55, None, None)
    gone = tbl.remove(worker, 0)
    assert isinstance(gone, WorkerGone)
    assert (gone.worker, gone.status, gone.running, gone.lost, gone.unstarted) == \
        (worker, 0, None, [], [])
    assert tbl.workers == {} and tbl.by_pid == {} and 2 in tbl.free_slots()
    assert 55 not in tbl.by_pid   # a stray second exit report matches no worker


# -- remove: a dead worker's tasks --------------------------------------------------------

def test_no_task_started_all_unstarted():
    tbl = table()
    worker = tbl.born(1, 55, None, None)
    batch = send(worker, items(4))
    gone = tbl.remove(worker, 9)
    assert gone.running is None and gone.lost == []
    assert ids(gone.unstarted) == ids(batch)


def test_started_and_finished_second_task_first_two_lost():
    tbl = table()
    worker = tbl.born(1, 55, None, None)
    batch = send(worker, items(4))
    start_mark(tbl, worker, batch[1].task_id)
    finish_mark(tbl, worker, batch[1].task_id)
    gone = tbl.remove(worker, 9)
    assert gone.running is None
    assert ids(gone.lost) == ids(batch[:2])
    assert ids(gone.unstarted) == ids(batch[2:])


def test_started_second_finished_first_first_lost_second_running():
    tbl = table()
    worker = tbl.born(1, 55, None, None)
    batch = send(worker, items(4))
    start_mark(tbl, worker, batch[1].task_id)
    finish_mark(tbl, worker, batch[0].task_id)
    gone = tbl.remove(worker, 9)
    assert gone.running is batch[1]
    assert ids(gone.lost) == ids(batch[:1])
    assert ids(gone.unstarted) == ids(batch[2:])


def test_started_first_still_running():
    tbl = table()
    worker = tbl.born(0, 55, None, None)
    batch = send(worker, items(3))
    start_mark(tbl, worker, batch[0].task_id)
    gone = tbl.remove(worker, 9)
    assert gone.running is batch[0] and gone.lost == []
    assert ids(gone.unstarted) == ids(batch[1:])


def test_started_mark_of_an_answered_task_leaves_the_rest_unstarted():
    tbl = table()
    worker = tbl.born(0, 55, None, None)
    batch = send(worker, items(4))
    start_mark(tbl, worker, batch[1].task_id)
    finish_mark(tbl, worker, batch[1].task_id)
    for it in batch[:2]:
        SCHEDULER.answered(worker, it.task_id)   # their results arrived
    gone = tbl.remove(worker, 9)
    assert gone.running is None and gone.lost == []
    assert ids(gone.unstarted) == ids(batch[2:])


def test_marks_of_another_slot_are_not_read():
    tbl = table()
    one = tbl.born(0, 55, None, None)
    two = tbl.born(1, 56, None, None)
    batch = send(one, items(2))
    start_mark(tbl, two, batch[0].task_id)
    finish_mark(tbl, two, batch[0].task_id)
    gone = tbl.remove(one, 9)
    assert gone.running is None and gone.lost == []
    assert ids(gone.unstarted) == ids(batch)


def test_a_reborn_slot_forgets_its_previous_workers_marks():
    tbl = table()
    old = tbl.born(0, 55, None, None)
    batch = send(old, items(2))
    start_mark(tbl, old, batch[0].task_id)
    tbl.remove(old, 9)
    new = tbl.born(0, 56, None, None)
    send(new, batch)   # given back and sent again to the slot's new worker
    gone = tbl.remove(new, 9)
    assert gone.running is None and gone.lost == []
    assert ids(gone.unstarted) == ids(batch)


class Run:
    """How far a worker got: a plan drawn by hypothesis, played by ``run_worker``."""

    def __init__(self, batches, ran, died_running, delivered, given_back):
        self.batches = batches          # batch sizes, in the order sent
        self.ran = ran                  # tasks it finished before dying
        self.died_running = died_running   # it died inside the next task
        self.delivered = delivered      # finished tasks whose results reached the parent
        self.given_back = given_back    # tasks after those it returned unstarted


@st.composite
def runs(draw):
    batches = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    total = sum(batches)
    ran = draw(st.integers(0, total))
    died_running = ran < total and draw(st.booleans())
    delivered = draw(st.integers(0, ran))
    left = total - ran - died_running
    given_back = 0 if died_running or ran == 0 else draw(st.integers(0, left))
    return Run(batches, ran, died_running, delivered, given_back)


@PROPERTY
@given(run=runs(), slot=st.integers(0, 2), stale=st.lists(st.integers(-1, 10 ** 6),
                                                         min_size=6, max_size=6))
def test_remove_sorts_tasks_as_they_really_ended(run, slot, stale):
    """Tasks run in the order sent, marks written around each (``_worker._serve``);
    the results of a prefix of the finished ones arrived; maybe the worker gave back
    the rest unstarted; then it died. The table must tell exactly which tasks
    finished unreported, which one was running, and which never started."""
    tbl = WorkerTable(3, list(stale))
    worker = tbl.born(slot, 1000 + slot, None, None)
    sent = []
    for size in run.batches:
        sent += send(worker, items(size))
    for it in sent[:run.ran]:
        start_mark(tbl, worker, it.task_id)
        finish_mark(tbl, worker, it.task_id)
    running = None
    if run.died_running:
        running = sent[run.ran]
        start_mark(tbl, worker, running.task_id)
    for it in sent[:run.delivered]:
        assert SCHEDULER.answered(worker, it.task_id) is it
    after = run.ran + run.died_running
    returned = sent[after:after + run.given_back]
    for it in returned:
        assert SCHEDULER.answered(worker, it.task_id) is it
    gone = tbl.remove(worker, 9)
    assert gone.running is running
    assert ids(gone.lost) == ids(sent[run.delivered:run.ran])
    assert ids(gone.unstarted) == ids(sent[after + run.given_back:])
    assert gone.status == 9 and gone.worker is worker
    assert slot in tbl.free_slots()
