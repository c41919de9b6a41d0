"""The scheduler alone: batches, costs and budgets, with a fake clock and no process.

``Pool`` below plays the exchange loop's part (``forkexec/_loop.py``): its
``dispatch_round`` is ``ExchangeLoop.dispatch`` (ready workers are those that
accept, fewest tasks first; the share is the ready workers plus those starting),
and ``on_results`` is ``ExchangeLoop.on_results`` (answered, learn, given back to
the front of the queue, batch done). The loop runs ``dispatch`` again at once
(poll timeout 0) while work is queued and a worker accepts;
``dispatch_until_quiet`` does the same and checks that each round makes progress,
since a round that moves nothing would make the real loop spin.
"""

import collections
import functools
import io
import math
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from forkexec import _scheduler
from forkexec._protocol import Kind
from forkexec._scheduler import (
    COST_TABLE_SIZE, GIVE_BACK_FACTOR, GIVE_BACK_MIN, JUMP_FACTOR, MAX_BATCH,
    MAX_BATCH_BYTES, MIN_BATCH_SECONDS, PIPELINE_BELOW, TARGET_BATCH_SECONDS, CostModel,
    Scheduler, SentBatch, WorkerLoad, cost_key)
from forkexec._shared import WorkItem

PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


# Real functions: cost_key depends on the function's identity.
def task_a(x):
    return x


def task_b(x):
    return x


def task_c(x):
    return x


def task_d(x):
    return x


def task_e(x):
    return x


FUNCS = (task_a, task_b, task_c, task_d, task_e)


class Counter:
    def method(self, x):
        return x

    def other(self, x):
        return x


@functools.lru_cache(maxsize=None)
def blob(size):
    """A pickled call of ``size`` bytes (only its length matters to the scheduler)."""
    return bytes(size)


_ids = iter(range(1, 1 << 62))


def item(fn=task_a, size=16, count=1):
    return WorkItem(object(), next(_ids), Kind.CALL, blob(size), fn, count)


def items(n, fn=task_a, size=16, count=1):
    return [item(fn, size, count) for _ in range(n)]


def known(costs, fn, per_call):
    costs.table[cost_key(fn)] = per_call


class Pool:
    """Workers, a queue and the scheduler, driven as the exchange loop drives them."""

    def __init__(self, nworkers=2, budget=None, starting=0):
        self.clock = FakeClock()
        self.costs = CostModel()
        self.scheduler = Scheduler(self.costs, self.clock)
        self.workers = [WorkerLoad(budget) for _ in range(nworkers)]
        self.starting = starting
        self.queue = collections.deque()
        self.batches = []   # (worker, items, give_back_after) in the order sent

    def accepting(self):
        return [w for w in self.workers if self.scheduler.accepts(w)]

    def dispatch_round(self):
        """``ExchangeLoop.dispatch`` (``Scheduler.plan``), without the I/O; returns the
        batches it sent."""
        sent = []
        for worker, taken, give_back_after in self.scheduler.plan(
                self.workers, self.queue, self.starting):
            if taken:
                self.scheduler.sent(worker, taken)
                sent.append((worker, list(taken), give_back_after))
        self.batches.extend(sent)
        return sent

    def dispatch_until_quiet(self, max_rounds=10000):
        """What the loop does with a zero poll timeout: dispatch while it can."""
        for _ in range(max_rounds):
            if not (self.queue and self.accepting()):
                return
            before = len(self.queue)
            self.dispatch_round()
            assert len(self.queue) < before, "a dispatch round moved nothing: the loop spins"
        raise AssertionError("dispatch never settled")

    def received(self, worker):
        return [it for w, batch, _ in self.batches if w is worker for it in batch]

    def on_results(self, worker, entries, returned=(), batch_done=True):
        """``ExchangeLoop.on_results``: entries are (task_id, seconds)."""
        scheduler = self.scheduler
        spent = {}
        for task_id, elapsed in entries:
            it = scheduler.answered(worker, task_id)
            if it is None:
                continue
            total = spent.setdefault(cost_key(it.fn), [0.0, 0])
            total[0] += elapsed
            total[1] += it.count
        scheduler.costs.learn(spent)
        if returned:
            back = [scheduler.answered(worker, t) for t in returned]
            back = [it for it in back if it is not None]
            scheduler.given_back(worker, len(back))
            self.queue.extendleft(reversed(back))
        if batch_done:
            scheduler.batch_done(worker)


def ceil_div(a, b):
    return -(-a // b)


# -- CostModel ----------------------------------------------------------------------------

def test_unmeasured_function_has_no_estimate():
    costs = CostModel()
    assert costs.per_call(task_a) is None
    assert costs.estimate(item(task_a)) is None


def test_first_measurement_is_the_estimate_per_call():
    costs = CostModel()
    costs.learn({cost_key(task_a): [0.3, 3]})
    assert costs.per_call(task_a) == pytest.approx(0.1)
    assert costs.estimate(item(task_a, count=5)) == pytest.approx(0.5)
    assert costs.per_call(task_b) is None


def test_learn_is_a_moving_average():
    costs = CostModel()
    costs.learn({cost_key(task_a): [1.0, 1]})
    costs.learn({cost_key(task_a): [2.0, 1]})
    assert costs.per_call(task_a) == pytest.approx(0.7 * 1.0 + 0.3 * 2.0)
    costs.learn({cost_key(task_a): [0.5, 1]})
    assert costs.per_call(task_a) == pytest.approx(0.7 * 1.3 + 0.3 * 0.5)


def test_a_jump_replaces_the_estimate():
    costs = CostModel()
    costs.learn({cost_key(task_a): [1e-6, 1]})
    costs.learn({cost_key(task_a): [1.0, 1]})   # a stale estimate: the news wins at once
    assert costs.per_call(task_a) == 1.0


def test_exactly_jump_factor_is_averaged():
    costs = CostModel()
    costs.learn({cost_key(task_a): [1.0, 1]})
    costs.learn({cost_key(task_a): [float(JUMP_FACTOR), 1]})
    assert costs.per_call(task_a) == pytest.approx(0.7 + 0.3 * JUMP_FACTOR)


positive = st.floats(1e-9, 100.0)


@PROPERTY
@given(old=positive, seconds=positive, calls=st.integers(1, 1000))
def test_learn_moves_between_old_and_new_or_jumps(old, seconds, calls):
    costs = CostModel()
    costs.learn({cost_key(task_a): [old, 1]})
    costs.learn({cost_key(task_a): [seconds, calls]})
    new = seconds / calls
    got = costs.per_call(task_a)
    if new > JUMP_FACTOR * old:
        assert got == new
    else:
        assert min(old, new) * (1 - 1e-12) <= got <= max(old, new) * (1 + 1e-12)
        assert got == pytest.approx(0.7 * old + 0.3 * new)


def test_learn_updates_several_functions_at_once():
    costs = CostModel()
    costs.learn({cost_key(task_a): [1.0, 2], cost_key(task_b): [3.0, 1]})
    assert costs.per_call(task_a) == 0.5
    assert costs.per_call(task_b) == 3.0


def test_cost_table_is_bounded():
    costs = CostModel()
    for i in range(3 * COST_TABLE_SIZE + 7):
        costs.learn({("key", i): [1.0, 1]})
        assert len(costs.table) <= COST_TABLE_SIZE
    assert len(costs.table) >= 1


def test_full_cost_table_still_updates_known_keys():
    costs = CostModel()
    for i in range(COST_TABLE_SIZE):
        costs.learn({("key", i): [1.0, 1]})
    assert len(costs.table) == COST_TABLE_SIZE
    costs.learn({("key", 0): [2.0, 1]})   # known: averaged in, nothing forgotten
    assert len(costs.table) == COST_TABLE_SIZE
    assert costs.table[("key", 0)] == pytest.approx(1.3)


def test_cost_model_shares_the_table_it_is_given():
    table = {}
    CostModel(table).learn({cost_key(task_a): [1.0, 1]})
    assert CostModel(table).per_call(task_a) == 1.0


# -- cost_key -----------------------------------------------------------------------------

def test_cost_key_of_a_plain_function_is_the_function():
    assert cost_key(task_a) is task_a
    assert cost_key(task_a) != cost_key(task_b)
    assert cost_key(len) is len
    lam = lambda x: x   # noqa: E731
    assert cost_key(lam) is lam


def test_partials_of_one_function_share_a_key():
    assert cost_key(functools.partial(task_a, 1)) == cost_key(functools.partial(task_a, 2))
    assert cost_key(functools.partial(task_a, 1)) != cost_key(functools.partial(task_b, 1))
    assert cost_key(functools.partial(task_a)) != cost_key(task_a)
    assert cost_key(functools.partial(pow, 2)) == cost_key(functools.partial(pow, 3))


def test_bound_methods_share_a_key_by_type_and_function():
    one, two = Counter(), Counter()
    assert cost_key(one.method) == cost_key(two.method)
    assert cost_key(one.method) != cost_key(one.other)
    assert cost_key(one.method) != cost_key(task_a)


def test_callable_keys_hold_no_reference_to_the_bound_object():
    one = Counter()
    ref = weakref.ref(one)
    key = cost_key(one.method)
    del one
    assert ref() is None
    assert key == cost_key(Counter().method)


def test_per_call_partials_do_not_grow_the_table():
    costs = CostModel()
    for i in range(100):
        costs.learn({cost_key(functools.partial(task_a, i)): [1.0, 1]})
        costs.learn({cost_key(Counter().method): [1.0, 1]})
    assert len(costs.table) == 2


def test_bound_builtin_methods_share_a_key_by_type_and_function():
    """``obj.method`` of a C type (a NumPy array's ``.sum``, a ``BytesIO``'s
    ``.getvalue``) is a ``builtin_function_or_method`` too, bound to its object."""
    one, two = io.BytesIO(b"1"), io.BytesIO(b"2")
    assert cost_key(one.getvalue) == cost_key(two.getvalue)


def test_bound_builtin_method_keys_hold_no_reference_to_the_object():
    one = io.BytesIO(b"1")
    ref = weakref.ref(one)
    costs = CostModel()
    costs.learn({cost_key(one.getvalue): [1.0, 1]})
    del one
    assert ref() is None, "the cost table keeps every object whose method was submitted alive"


# -- accepts ------------------------------------------------------------------------------

def loaded(scheduler, estimates, budget=None):
    """A worker sent one batch of items with these estimates (None: unknown)."""
    worker = WorkerLoad(budget)
    batch = []
    for est in estimates:
        it = item()
        it.estimate = est
        batch.append(it)
    scheduler.sent(worker, batch)
    return worker


def test_idle_worker_accepts():
    assert Scheduler(CostModel(), FakeClock()).accepts(WorkerLoad())
    assert Scheduler(CostModel(), FakeClock()).accepts(WorkerLoad(budget=1))


def test_spent_or_retiring_worker_does_not_accept():
    scheduler = Scheduler(CostModel(), FakeClock())
    assert not scheduler.accepts(WorkerLoad(budget=0))
    worker = WorkerLoad()
    worker.retiring = True
    assert not scheduler.accepts(worker)


def test_worker_with_unknown_cost_work_does_not_accept():
    scheduler = Scheduler(CostModel(), FakeClock())
    assert not scheduler.accepts(loaded(scheduler, [None]))


def test_worker_with_long_work_does_not_accept():
    scheduler = Scheduler(CostModel(), FakeClock())
    assert not scheduler.accepts(loaded(scheduler, [PIPELINE_BELOW]))
    assert not scheduler.accepts(loaded(scheduler, [PIPELINE_BELOW / 2] * 2))


def test_short_work_on_time_takes_a_second_batch():
    clock = FakeClock()
    scheduler = Scheduler(CostModel(), clock)
    worker = loaded(scheduler, [PIPELINE_BELOW / 10])
    assert scheduler.accepts(worker)
    clock.advance(PIPELINE_BELOW)   # exactly the limit: still on time
    assert scheduler.accepts(worker)


@pytest.mark.parametrize("estimate", [1e-6, PIPELINE_BELOW / 10, PIPELINE_BELOW * 0.99])
def test_overdue_batch_gets_no_second_batch(estimate):
    clock = FakeClock()
    scheduler = Scheduler(CostModel(), clock)
    worker = loaded(scheduler, [estimate])
    allowed = max(PIPELINE_BELOW, GIVE_BACK_FACTOR * estimate)
    clock.advance(allowed * 0.999)
    assert scheduler.accepts(worker)
    clock.advance(allowed * 0.002)
    assert not scheduler.accepts(worker)


def test_at_most_two_batches_outstanding():
    scheduler = Scheduler(CostModel(), FakeClock())
    worker = loaded(scheduler, [1e-6])
    assert scheduler.accepts(worker)
    tiny = item()
    tiny.estimate = 1e-6
    scheduler.sent(worker, [tiny])
    assert len(worker.batches) == 2
    assert not scheduler.accepts(worker)
    scheduler.answered(worker, next(iter(worker.tasks)))
    scheduler.batch_done(worker)
    assert scheduler.accepts(worker)


@PROPERTY
@given(estimates=st.lists(st.lists(st.one_of(st.none(), st.floats(0, 0.01)),
                                   min_size=1, max_size=4), max_size=3),
       waits=st.lists(st.floats(0, 0.05), min_size=3, max_size=3),
       budget=st.one_of(st.none(), st.integers(0, 10)))
def test_accepts_only_an_idle_worker_or_a_short_on_time_pipeline(estimates, waits, budget):
    clock = FakeClock()
    scheduler = Scheduler(CostModel(), clock)
    worker = WorkerLoad(budget)
    for batch, wait in zip(estimates, waits):
        sent = []
        for est in batch:
            it = item()
            it.estimate = est
            sent.append(it)
        if worker.budget is None or worker.budget > 0:
            scheduler.sent(worker, sent)
        clock.advance(wait)
    if not scheduler.accepts(worker):
        return
    assert not worker.retiring
    assert worker.budget is None or worker.budget > 0
    if worker.tasks:
        assert len(worker.batches) == 1
        assert worker.unknown == 0
        assert worker.expected < PIPELINE_BELOW
        first = worker.batches[0]
        assert clock() - first.sent_at <= max(PIPELINE_BELOW, GIVE_BACK_FACTOR * first.estimate)


def test_answered_keeps_the_books():
    scheduler = Scheduler(CostModel(), FakeClock())
    worker = loaded(scheduler, [1e-4, None, 2e-4, None])
    first, unknown, third, _ = worker.tasks.values()
    assert (worker.expected, worker.unknown) == (pytest.approx(3e-4), 2)
    assert scheduler.answered(worker, first.task_id) is first
    assert (worker.expected, worker.unknown) == (pytest.approx(2e-4), 2)
    assert scheduler.answered(worker, unknown.task_id) is unknown
    assert (worker.expected, worker.unknown) == (pytest.approx(2e-4), 1)
    assert scheduler.answered(worker, unknown.task_id) is None   # twice: ignored
    assert scheduler.answered(worker, -5) is None
    assert (worker.expected, worker.unknown) == (pytest.approx(2e-4), 1)
    for it in list(worker.tasks.values()):
        scheduler.answered(worker, it.task_id)
    assert (worker.expected, worker.unknown, worker.tasks) == (0.0, 0, {})
    assert len(worker.batches) == 1   # until the worker says the batch is done
    scheduler.batch_done(worker)
    scheduler.batch_done(worker)   # a stray one is harmless
    assert not worker.batches


def test_sent_records_when_and_how_long():
    clock = FakeClock(5.0)
    scheduler = Scheduler(CostModel(), clock)
    worker = loaded(scheduler, [1e-4, None, 2e-4])
    assert list(worker.batches) == [SentBatch(5.0, pytest.approx(3e-4))]


# -- budgets ------------------------------------------------------------------------------

def test_sent_spends_the_budget_and_retires_at_zero():
    scheduler = Scheduler(CostModel(), FakeClock())
    worker = WorkerLoad(budget=3)
    scheduler.sent(worker, items(2))
    assert (worker.budget, worker.retiring) == (1, False)
    scheduler.sent(worker, items(1))
    assert (worker.budget, worker.retiring) == (0, True)
    assert not scheduler.accepts(worker)


def test_given_back_restores_the_budget():
    scheduler = Scheduler(CostModel(), FakeClock())
    worker = WorkerLoad(budget=3)
    batch = items(3)
    scheduler.sent(worker, batch)
    assert worker.retiring
    for it in batch[1:]:
        scheduler.answered(worker, it.task_id)
    scheduler.given_back(worker, 2)
    assert (worker.budget, worker.retiring) == (2, False)


def test_no_budget_is_never_spent():
    scheduler = Scheduler(CostModel(), FakeClock())
    worker = WorkerLoad()
    scheduler.sent(worker, items(5000))
    scheduler.given_back(worker, 7)
    assert (worker.budget, worker.retiring) == (None, False)


@pytest.mark.parametrize("budget", [1, 2, 5])
def test_a_batch_never_exceeds_the_budget(budget):
    pool = Pool(nworkers=1, budget=budget)
    known(pool.costs, task_a, 1e-7)
    pool.queue.extend(items(100))
    pool.dispatch_until_quiet()
    [worker] = pool.workers
    assert len(pool.received(worker)) == budget
    assert worker.retiring
    assert len(pool.queue) == 100 - budget


# -- next_batch: bounds -------------------------------------------------------------------

SIZES = st.one_of(st.integers(0, 4096),
                  st.sampled_from([MAX_BATCH_BYTES // 3, MAX_BATCH_BYTES // 2,
                                   MAX_BATCH_BYTES - 1, MAX_BATCH_BYTES,
                                   MAX_BATCH_BYTES + 1]))
COSTS = st.one_of(st.none(), st.floats(1e-9, 1e-5), st.floats(1e-5, 0.02),
                  st.sampled_from([TARGET_BATCH_SECONDS, 2 * TARGET_BATCH_SECONDS]))


@st.composite
def queues(draw, max_items=60):
    costs = CostModel()
    for fn in FUNCS:
        per_call = draw(COSTS)
        if per_call is not None:
            known(costs, fn, per_call)
    queue = collections.deque(
        item(draw(st.sampled_from(FUNCS)), draw(SIZES), draw(st.integers(1, 20)))
        for _ in range(draw(st.integers(1, max_items))))
    return costs, queue


def check_batch(costs, taken, give_back_after, queue_before, share, budget):
    queued = len(queue_before)
    assert taken == queue_before[:len(taken)], "a batch is the front of the queue, in order"
    assert 1 <= len(taken) <= MAX_BATCH
    if budget is not None:
        assert len(taken) <= budget
    if share >= 2:
        assert len(taken) <= ceil_div(queued, 2), "more than half the queue to one worker"
    estimates = [costs.estimate(it) for it in taken]
    assert [it.estimate for it in taken] == estimates
    if None in estimates:
        assert len(taken) == 1, "work of unknown cost was batched"
    # Bytes and seconds stop growing once past their bound: only the last item may cross.
    assert sum(len(it.blob) for it in taken[:-1]) < MAX_BATCH_BYTES
    if len(taken) > 1:
        assert sum(estimates[:-1]) < TARGET_BATCH_SECONDS
    if None in estimates:   # unknown cost: nothing to measure it against
        assert give_back_after is None
    elif taken:   # known cost, one item or many: it may run late (the queue behind it too)
        assert give_back_after == max(GIVE_BACK_MIN, GIVE_BACK_FACTOR * sum(estimates))
    # Nor does it stop early: short of a bound, a worker takes at least its share.
    rest = queue_before[len(taken):]
    if rest and None not in estimates and costs.estimate(rest[0]) is not None \
            and sum(len(it.blob) for it in taken) < MAX_BATCH_BYTES \
            and sum(estimates) < TARGET_BATCH_SECONDS:
        assert len(taken) >= min(ceil_div(queued, share), budget or MAX_BATCH, MAX_BATCH)


@PROPERTY
@given(data=queues(), share=st.integers(1, 8), budget=st.one_of(st.none(), st.integers(1, 30)))
def test_a_batch_stays_within_its_bounds(data, share, budget):
    costs, queue = data
    scheduler = Scheduler(costs, FakeClock())
    worker = WorkerLoad(budget)
    while queue and (worker.budget is None or worker.budget > 0):
        before = list(queue)
        taken, give_back_after = scheduler.next_batch(worker, queue, share)
        check_batch(costs, taken, give_back_after, before, share, worker.budget)
        assert list(queue) == before[len(taken):]
        scheduler.sent(worker, taken)
        for it in taken:
            scheduler.answered(worker, it.task_id)
        scheduler.batch_done(worker)


def test_empty_queue_gives_an_empty_batch():
    scheduler = Scheduler(CostModel(), FakeClock())
    assert scheduler.next_batch(WorkerLoad(), collections.deque(), 3) == ([], None)


def test_a_batch_holds_at_most_max_batch_items():
    costs = CostModel()
    known(costs, task_a, 1e-9)
    queue = collections.deque(items(3 * MAX_BATCH))
    taken, _ = Scheduler(costs, FakeClock()).next_batch(WorkerLoad(), queue, 1)
    assert len(taken) == MAX_BATCH


def test_bytes_stop_at_the_item_that_crosses_the_limit():
    costs = CostModel()
    known(costs, task_a, 1e-9)
    size = MAX_BATCH_BYTES // 4 + 1
    queue = collections.deque(items(10, size=size))
    taken, _ = Scheduler(costs, FakeClock()).next_batch(WorkerLoad(), queue, 1)
    assert len(taken) == 4   # 3 items are under the limit; the 4th crosses it
    assert len(queue) == 6


def test_a_blob_larger_than_the_limit_goes_alone():
    costs = CostModel()
    known(costs, task_a, 1e-9)
    queue = collections.deque([item(size=MAX_BATCH_BYTES + 1)] + items(5))
    taken, give_back_after = Scheduler(costs, FakeClock()).next_batch(WorkerLoad(), queue, 1)
    assert len(taken) == 1 and give_back_after == GIVE_BACK_MIN


def test_seconds_stop_at_the_target():
    costs = CostModel()
    known(costs, task_a, 0.3 * TARGET_BATCH_SECONDS)
    queue = collections.deque(items(10))
    taken, give_back_after = Scheduler(costs, FakeClock()).next_batch(WorkerLoad(), queue, 1)
    assert len(taken) == 4   # 0.9 of the target after three; the fourth crosses it
    assert give_back_after == max(GIVE_BACK_MIN, GIVE_BACK_FACTOR * 1.2 * TARGET_BATCH_SECONDS)


def test_map_chunks_count_their_calls():
    costs = CostModel()
    known(costs, task_a, TARGET_BATCH_SECONDS / 10)
    queue = collections.deque(items(5, count=20))   # each chunk: twice the target
    taken, _ = Scheduler(costs, FakeClock()).next_batch(WorkerLoad(), queue, 1)
    assert len(taken) == 1


# -- next_batch: unknown cost -------------------------------------------------------------

def test_unknown_cost_goes_alone_at_the_head():
    scheduler = Scheduler(CostModel(), FakeClock())
    queue = collections.deque(items(5, fn=task_b))
    taken, give_back_after = scheduler.next_batch(WorkerLoad(), queue, 1)
    assert len(taken) == 1 and give_back_after is None
    assert taken[0].estimate is None


def test_unknown_cost_ends_a_batch_of_known_work():
    costs = CostModel()
    known(costs, task_a, 1e-6)
    scheduler = Scheduler(costs, FakeClock())
    queue = collections.deque(items(3) + [item(task_b)] + items(3))
    first, _ = scheduler.next_batch(WorkerLoad(), queue, 1)
    assert [it.fn for it in first] == [task_a] * 3
    second, give_back_after = scheduler.next_batch(WorkerLoad(), queue, 1)
    assert [it.fn for it in second] == [task_b] and give_back_after is None


@PROPERTY
@given(data=queues(), nworkers=st.integers(1, 6), starting=st.integers(0, 3))
def test_unknown_cost_is_never_batched(data, nworkers, starting):
    costs, queue = data
    pool = Pool(nworkers, starting=starting)
    pool.costs.table.update(costs.table)
    pool.queue.extend(queue)
    pool.dispatch_until_quiet()
    for _, batch, _ in pool.batches:
        if any(it.estimate is None for it in batch):
            assert len(batch) == 1


def test_a_worker_with_unknown_work_gets_nothing_more():
    pool = Pool(nworkers=1)
    pool.queue.extend(items(3, fn=task_b))
    pool.dispatch_until_quiet()
    assert [len(batch) for _, batch, _ in pool.batches] == [1]
    assert len(pool.queue) == 2


# -- dispatch: spreading work -------------------------------------------------------------

@PROPERTY
@given(nworkers=st.integers(1, 12),
       per_call=st.floats(TARGET_BATCH_SECONDS * 1.0001, 10.0))
def test_long_tasks_spread_over_all_workers(nworkers, per_call):
    pool = Pool(nworkers)
    known(pool.costs, task_a, per_call)
    pool.queue.extend(items(nworkers))
    pool.dispatch_until_quiet()
    assert not pool.queue
    assert [len(pool.received(w)) for w in pool.workers] == [1] * nworkers


@PROPERTY
@given(nworkers=st.integers(1, 12), extra=st.integers(1, 30),
       per_call=st.floats(TARGET_BATCH_SECONDS * 1.0001, 10.0))
def test_long_tasks_wait_in_the_queue_rather_than_behind_a_busy_worker(nworkers, extra,
                                                                      per_call):
    pool = Pool(nworkers)
    known(pool.costs, task_a, per_call)
    pool.queue.extend(items(nworkers + extra))
    pool.dispatch_until_quiet()
    assert [len(pool.received(w)) for w in pool.workers] == [1] * nworkers
    assert len(pool.queue) == extra


def test_unknown_tasks_spread_over_all_workers():
    pool = Pool(4)
    pool.queue.extend(items(4, fn=task_b))
    pool.dispatch_until_quiet()
    assert [len(pool.received(w)) for w in pool.workers] == [1] * 4


def test_a_stale_estimate_never_serializes_a_round():
    """Learned as tiny, then 8 queued with 2 idle workers: one dispatch round."""
    pool = Pool(nworkers=2)
    pool.costs.learn({cost_key(task_a): [1e-6, 1]})
    pool.queue.extend(items(8))
    pool.dispatch_round()
    got = [len(pool.received(w)) for w in pool.workers]
    assert max(got) <= 4, got
    assert all(got), got


def test_a_stale_estimate_never_serializes_while_the_batches_run_late():
    """The tasks really take a second each: no result comes back, the clock moves on,
    and once the first batches are overdue nobody gets more."""
    pool = Pool(nworkers=2)
    pool.costs.learn({cost_key(task_a): [1e-6, 1]})
    pool.queue.extend(items(8))
    pool.dispatch_round()
    pool.clock.advance(max(PIPELINE_BELOW, GIVE_BACK_FACTOR * 4e-6) * 1.01)
    pool.dispatch_until_quiet()
    got = [len(pool.received(w)) for w in pool.workers]
    assert max(got) <= 4 and all(got), got
    # What was sent can come back: every multi-item batch has a give-back deadline.
    for _, batch, give_back_after in pool.batches:
        assert len(batch) == 1 or give_back_after >= GIVE_BACK_MIN


def test_a_stale_estimate_never_serializes_through_pipelining():
    """The same, but the loop dispatches again at once (poll timeout 0), before the
    clock moves: each worker still holds at most half of the 8."""
    pool = Pool(nworkers=2)
    pool.costs.learn({cost_key(task_a): [1e-6, 1]})
    pool.queue.extend(items(8))
    pool.dispatch_until_quiet()
    got = [len(pool.received(w)) for w in pool.workers]
    assert sum(got) + len(pool.queue) == 8
    assert max(got) < 8, got
    assert max(got) <= 4, got


def test_first_long_result_replaces_a_stale_estimate():
    pool = Pool(nworkers=2)
    pool.costs.learn({cost_key(task_a): [1e-6, 1]})
    pool.queue.extend(items(8))
    pool.dispatch_round()
    worker, batch, give_back_after = pool.batches[0]
    assert give_back_after >= GIVE_BACK_MIN
    # The worker ran one task for a second, then gave the rest back.
    pool.clock.advance(1.0)
    pool.on_results(worker, [(batch[0].task_id, 1.0)],
                    returned=[it.task_id for it in batch[1:]])
    assert pool.costs.per_call(task_a) == 1.0
    assert list(pool.queue)[:len(batch) - 1] == batch[1:], "given back to the front, in order"
    assert worker.budget is None and not worker.tasks and not worker.batches
    # Now known as long: one per worker that accepts.
    pool.batches.clear()
    pool.dispatch_until_quiet()
    assert all(len(b) == 1 for _, b, _ in pool.batches)


@PROPERTY
@given(n=st.integers(2, 200), nworkers=st.integers(2, 8),
       per_call=st.floats(1e-9, TARGET_BATCH_SECONDS))
def test_no_worker_gets_the_whole_queue_in_one_batch(n, nworkers, per_call):
    pool = Pool(nworkers)
    known(pool.costs, task_a, per_call)
    pool.queue.extend(items(n))
    for _, batch, _ in pool.dispatch_round():
        assert len(batch) <= ceil_div(n, 2)


def test_a_long_queue_of_tiny_tasks_goes_in_worthwhile_batches():
    pool = Pool(nworkers=4)
    per_call = 1e-6
    known(pool.costs, task_a, per_call)
    pool.queue.extend(items(10000))
    sent = pool.dispatch_round()
    assert len(sent) == 4
    for _, batch, _ in sent:
        assert len(batch) * per_call >= MIN_BATCH_SECONDS


def test_starting_workers_count_in_the_share():
    pool = Pool(nworkers=1, starting=3)
    known(pool.costs, task_a, MIN_BATCH_SECONDS / 2)
    pool.queue.extend(items(8))
    pool.dispatch_round()
    assert len(pool.received(pool.workers[0])) == 2   # a quarter: three more are coming
    alone = Pool(nworkers=1)
    known(alone.costs, task_a, MIN_BATCH_SECONDS / 2)
    alone.queue.extend(items(8))
    alone.dispatch_round()
    assert len(alone.received(alone.workers[0])) == 8


# -- dispatch: nobody idles ---------------------------------------------------------------

@st.composite
def busy_workers(draw, scheduler):
    """Workers in assorted states: idle, with work of known or unknown cost, spent."""
    workers = []
    for _ in range(draw(st.integers(1, 6))):
        worker = WorkerLoad(draw(st.one_of(st.none(), st.integers(1, 6))))
        for _ in range(draw(st.integers(0, 2))):
            if worker.budget is not None and worker.budget <= 0:
                break
            batch = []
            for est in draw(st.lists(st.one_of(st.none(), st.floats(0, 0.004)), min_size=1,
                                     max_size=3)):
                it = item()
                it.estimate = est
                batch.append(it)
            if worker.budget is not None:
                batch = batch[:worker.budget]
            scheduler.sent(worker, batch)
            scheduler.clock.advance(draw(st.floats(0, 0.01)))
        workers.append(worker)
    return workers


@PROPERTY
@given(data=st.data(), queue=queues(), starting=st.integers(0, 2))
def test_no_worker_idles_while_work_is_queued(data, queue, starting):
    costs, queued = queue
    pool = Pool(0, starting=starting)
    pool.costs.table.update(costs.table)
    pool.workers = data.draw(busy_workers(pool.scheduler))
    pool.queue.extend(queued)
    ready = pool.accepting()
    first = pool.dispatch_round()
    # A round serves every worker that accepted, until the queue runs out.
    if pool.queue:
        assert {id(w) for w, _, _ in first} == {id(w) for w in ready}
    pool.dispatch_until_quiet()
    if pool.queue:
        assert not pool.accepting()
        for worker in pool.workers:
            assert worker.tasks or worker.retiring


# -- the loop as a state machine ----------------------------------------------------------

class PoolMachine(RuleBasedStateMachine):
    """Submit, dispatch, run, give back, let time pass and retire, in any order;
    the scheduler's books must match what the workers really hold."""

    @initialize(nworkers=st.integers(1, 4), budget=st.one_of(st.none(), st.integers(1, 12)),
                measured=st.dictionaries(st.sampled_from(FUNCS), st.floats(1e-8, 0.01)))
    def start(self, nworkers, budget, measured):
        self.pool = Pool(nworkers, budget)
        for fn, per_call in measured.items():
            known(self.pool.costs, fn, per_call)
        self.budget = budget
        self.held = {}        # worker -> deque of batches (lists of items) it holds
        self.spent = {}       # worker -> tasks sent minus tasks given back
        self.done = []
        self.submitted = []
        for worker in self.pool.workers:
            self.adopt(worker)

    def adopt(self, worker):
        self.held[worker] = collections.deque()
        self.spent[worker] = 0

    @rule(fn=st.sampled_from(FUNCS), n=st.integers(1, 20), size=SIZES.filter(
        lambda s: s < MAX_BATCH_BYTES // 2), count=st.integers(1, 3))
    def submit(self, fn, n, size, count):
        new = items(n, fn, size, count)
        self.submitted.extend(new)
        self.pool.queue.extend(new)

    @rule()
    def dispatch(self):
        pool = self.pool
        before = len(pool.batches)
        pool.dispatch_until_quiet()
        for worker, batch, give_back_after in pool.batches[before:]:
            self.held[worker].append([list(batch), give_back_after])
            self.spent[worker] += len(batch)
        assert not pool.queue or not pool.accepting()
        if pool.queue:
            assert all(w.tasks or w.retiring for w in pool.workers)

    @rule(seconds=st.floats(0, 0.1))
    def tick(self, seconds):
        self.pool.clock.advance(seconds)

    def busy(self, data):
        workers = [w for w in self.pool.workers if self.held[w]]
        return data.draw(st.sampled_from(workers)) if workers else None

    @rule(data=st.data(), per_call=st.floats(1e-8, 0.05))
    def run_some(self, data, per_call):
        """A worker runs tasks of its current batch and reports them; the batch is done
        with its last task's report."""
        worker = self.busy(data)
        if worker is None:
            return
        batch = self.held[worker][0][0]
        k = data.draw(st.integers(1, len(batch)))
        ran, batch[:] = batch[:k], batch[k:]
        done = not batch
        if done:
            self.held[worker].popleft()
        self.pool.clock.advance(per_call * k)
        self.pool.on_results(worker, [(it.task_id, per_call * it.count) for it in ran],
                             batch_done=done)
        self.done.extend(ran)

    @rule(data=st.data(), per_call=st.floats(1e-8, 1.0))
    def give_back(self, data, per_call):
        """A batch runs past its give-back time: the worker reports the task it ran,
        returns the rest, then returns the batches queued behind it whole."""
        worker = self.busy(data)
        if worker is None:
            return
        batch, give_back_after = self.held[worker][0]
        if give_back_after is None or len(batch) < 2:
            return
        self.pool.clock.advance(give_back_after + per_call)
        ran, rest = batch[0], batch[1:]
        self.held[worker].popleft()
        self.pool.on_results(worker, [(ran.task_id, per_call * ran.count)],
                             returned=[it.task_id for it in rest])
        self.spent[worker] -= len(rest)
        self.done.append(ran)
        while self.held[worker]:
            queued, _ = self.held[worker].popleft()
            self.pool.on_results(worker, [], returned=[it.task_id for it in queued])
            self.spent[worker] -= len(queued)

    @rule()
    def retire(self):
        """Workers whose budget is spent and whose work is done exit; new ones start."""
        for i, worker in enumerate(self.pool.workers):
            if worker.retiring and not worker.tasks:
                assert not self.held[worker] and not worker.batches
                fresh = WorkerLoad(self.budget)
                self.pool.workers[i] = fresh
                self.adopt(fresh)

    @invariant()
    def books_match(self):
        if not hasattr(self, "pool"):
            return
        pool = self.pool
        everywhere = list(pool.queue) + self.done
        for worker in pool.workers:
            held = [it for batch, _ in self.held[worker] for it in batch]
            assert list(worker.tasks.values()) == held
            assert len(worker.batches) == len(self.held[worker]) <= 2
            assert worker.unknown == sum(it.estimate is None for it in held)
            known_seconds = sum(it.estimate for it in held if it.estimate is not None)
            assert worker.expected == pytest.approx(known_seconds, rel=1e-9, abs=1e-12)
            if not held:
                assert worker.expected == 0.0
            if self.budget is None:
                assert worker.budget is None and not worker.retiring
            else:
                assert worker.budget == self.budget - self.spent[worker] >= 0
                assert worker.retiring == (worker.budget == 0)
            for batch, give_back_after in self.held[worker]:
                if any(it.estimate is None for it in batch):
                    assert len(batch) == 1
            everywhere += held
        # Every item is in exactly one place: queued, held by one worker, or done.
        assert sorted(it.task_id for it in everywhere) == \
            sorted(it.task_id for it in self.submitted)


PoolMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30,
                                         deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_pool_machine = PoolMachine.TestCase


# -- workers_wanted -----------------------------------------------------------------------

@pytest.mark.parametrize("queued, idle, live, slots, wanted", [
    (0, 0, 0, 4, 0),
    (3, 0, 0, 4, 3),
    (10, 0, 0, 4, 4),
    (10, 1, 2, 4, 2),
    (2, 3, 3, 4, 0),
    (5, 0, 4, 4, 0),
])
def test_workers_wanted(queued, idle, live, slots, wanted):
    assert Scheduler.workers_wanted(queued, idle, live, slots) == wanted


def test_module_constants_are_consistent():
    assert MIN_BATCH_SECONDS <= TARGET_BATCH_SECONDS
    assert PIPELINE_BELOW < GIVE_BACK_MIN
    assert _scheduler.SentBatch is SentBatch
    assert math.isfinite(GIVE_BACK_FACTOR) and GIVE_BACK_FACTOR > 1


def test_a_timed_task_goes_alone_and_nothing_is_queued_behind_it():
    """A task with a time limit travels alone, even among known tiny tasks, and its worker
    takes no second batch: killing that worker at the limit costs no other task."""
    pool = Pool(nworkers=1)
    known(pool.costs, task_a, 1e-6)
    timed = item(task_a)
    timed.timeout = 5.0
    pool.queue.extend(items(3) + [timed] + items(3))
    worker = pool.workers[0]
    first = pool.scheduler.next_batch(worker, pool.queue, 1)[0]
    assert timed not in first   # the known tasks before it go in their own batch
    pool.scheduler.sent(worker, first)
    assert pool.scheduler.accepts(worker)   # a second batch behind short known work...
    second, give_back_after = pool.scheduler.next_batch(worker, pool.queue, 1)
    assert second == [timed] and give_back_after is None   # ...holds the timed task alone
    pool.scheduler.sent(worker, second)
    assert not pool.scheduler.accepts(worker)   # and nothing goes behind it
