"""forkexec.pipeline: results, order, fan-out and fan-in, stage set-up, the seed's shape,
bad input. Faults, early exit and backpressure are in test_pipeline_faults.py.

Every test runs under conftest's ``no_leftovers`` guard: a stage process, zombie or
descriptor left behind fails it.
"""

import collections
import multiprocessing
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkexec import pipeline as pl

pytestmark = pytest.mark.timeout(60)


# -- the seed's three roles, as written in the seed --------------------------------------

def prod(*args):
    for item in range(*args):
        yield item


def cons_prod(source):
    for item in source:
        next_value = item * 3
        yield next_value


def cons(source):
    total = 0
    for item in source:
        total += item
    return total


def test_seed_functions_compose_sequentially_and_as_a_pipeline():
    sequential = cons(cons_prod(prod(100)))
    stage = pl.consumer(cons, pl.consumer_producer(cons_prod, pl.producer(prod, 100),
                                                   workers=2))
    assert stage.run() == [sequential]


def test_iterating_a_stage_yields_every_item():
    stage = pl.consumer_producer(cons_prod, pl.producer(prod, 1000), workers=3)
    assert sorted(stage) == sorted(cons_prod(prod(1000)))


# The seed's classes, as the seed wrote them (on multiprocessing, None as the sentinel).
_mp = multiprocessing.get_context("fork")


class ProducerProcess(_mp.Process):
    def __init__(self, group=None, target=None, name=None, args=None, kwargs=None,
                 output_queue=None, consumers=0):
        super().__init__(name=name)
        self.target, self.args, self.kwargs = target, args or [], kwargs or {}
        self.output_queue, self.consumers = output_queue, consumers

    def run(self):
        for item in self.target(*self.args, **self.kwargs):
            self.output_queue.put(item)
        for _ in range(self.consumers):
            self.output_queue.put(None)
        self.output_queue.close()


class ConsumerProducerProcess(_mp.Process):
    def __init__(self, group=None, target=None, name=None, kwargs=None, input_queue=None,
                 producers=0, output_queue=None, consumers=0):
        super().__init__(name=name)
        self.target, self.kwargs = target, kwargs or {}
        self.input_queue, self.producers = input_queue, producers
        self.output_queue, self.consumers = output_queue, consumers

    def items(self):
        while self.producers != 0:
            for item in iter(self.input_queue.get, None):
                yield item
            self.producers -= 1

    def run(self):
        for item in self.target(self.items(), **self.kwargs):
            self.output_queue.put(item)
        for _ in range(self.consumers):
            self.output_queue.put(None)
        self.output_queue.close()


class ConsumerProcess(ConsumerProducerProcess):
    def run(self):
        self.target(self.items(), **self.kwargs)


def final_disposition(source, path):
    with open(path, "w") as f:
        for item in source:
            f.write("%d\n" % item)


def test_the_seed_program_runs_with_few_changes(tmp_path):
    seed_out, our_out = str(tmp_path / "seed.txt"), str(tmp_path / "ours.txt")
    # The seed's program: two queues, four processes, sentinels counted by hand.
    q1, q2 = _mp.Queue(), _mp.Queue()
    procs = [ProducerProcess(target=prod, args=(0, 50), output_queue=q1, consumers=2)]
    procs += [ConsumerProducerProcess(target=cons_prod, input_queue=q1, producers=1,
                                      output_queue=q2, consumers=1) for _ in range(2)]
    procs.append(ConsumerProcess(target=final_disposition, kwargs={"path": seed_out},
                                 input_queue=q2, producers=2))
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    q1.close()
    q2.close()
    # The same program on ours: one call per process class, no queues, no sentinels.
    source = pl.producer(prod, 0, 50)
    middle = pl.consumer_producer(cons_prod, source, workers=2)
    assert pl.consumer(final_disposition, middle, kwargs={"path": our_out}).run() == [None]

    def lines(path):
        with open(path) as f:
            return sorted(f.read().split(), key=int)

    assert lines(our_out) == lines(seed_out) == [str(3 * i) for i in range(50)]


def test_none_and_every_kind_of_value_are_items():
    values = [None, 0, "", b"", [], (), {}, None, False, float("inf"), "end", None]

    def gen():
        yield from values

    got = list(pl.iterate(pl.map(lambda x: x, pl.producer(gen), workers=2), ordered=True))
    assert got == values
    assert sorted(map(repr, pl.producer(gen))) == sorted(map(repr, values))


def test_ordered_keeps_the_producers_order_across_fan_out():
    def slow_on_even(x):
        if x % 2 == 0:
            time.sleep(0.002)   # even items come out late unless put back in order
        return x

    stage = pl.map(slow_on_even, pl.producer(prod, 200, maxsize=16), workers=4, maxsize=16)
    assert list(pl.iterate(stage, ordered=True)) == list(range(200))


def test_ordered_through_filter_and_flat_map_and_an_ordered_consumer_stage():
    def record(source):
        return list(source)

    evens = pl.filter(lambda x: x % 2 == 0, pl.producer(prod, 300, maxsize=8), workers=3,
                      maxsize=8)
    pairs = pl.flat_map(lambda x: (x, -x), evens, workers=2, maxsize=8)
    expected = [y for x in range(0, 300, 2) for y in (x, -x)]
    assert list(pl.iterate(pairs, ordered=True)) == expected
    assert pl.consumer(record, pairs).run(ordered=True) == [expected]


def test_map_filter_flat_map_each():
    src = pl.producer(prod, 100)
    assert sorted(pl.map(lambda x: x + 1, src, workers=2)) == list(range(1, 101))
    assert sorted(pl.filter(lambda x: x % 3 == 0, src, workers=2)) == list(range(0, 100, 3))
    assert sorted(pl.flat_map(lambda x: [x] * (x % 3), src, workers=2)) == sorted(
        x for x in range(100) for _ in range(x % 3))
    assert pl.each(lambda x: None, src, workers=2).run() == [None, None]


def test_fan_in_several_producers_feed_one_stage():
    a = pl.producer(prod, 0, 100)
    b = pl.producer(prod, 1000, 1050, workers=1)
    c = pl.producer(prod, 5000, 5010)
    merged = pl.map(lambda x: x, [a, b, c], workers=3)
    assert sorted(merged) == list(range(100)) + list(range(1000, 1050)) + list(range(5000, 5010))


def test_fan_out_spreads_items_over_the_workers():
    def whoami(source):
        for _ in source:
            yield pl.worker().index

    counts = collections.Counter(pl.consumer_producer(
        whoami, pl.producer(prod, 2000, maxsize=8), workers=4, maxsize=8))
    assert sorted(counts) == [0, 1, 2, 3]
    assert sum(counts.values()) == 2000


def test_producer_workers_shard_with_worker_info():
    def shard(n):
        me = pl.worker()
        yield from range(me.index, n, me.workers)

    assert sorted(pl.producer(shard, 100, workers=3)) == list(range(100))
    assert pl.worker() is None


def test_a_consumer_stage_with_workers_returns_each_result():
    results = pl.consumer(cons, pl.producer(prod, 1000), workers=3).run()
    assert len(results) == 3 and sum(results) == sum(range(1000))


def test_setup_and_teardown_once_per_worker_and_extra_keyword_arguments(tmp_path):
    def setup():
        path = tmp_path / ("conn-%d" % os.getpid())
        path.write_text("open")
        return {"conn": str(path)}

    def teardown(conn):
        with open(conn, "a") as f:
            f.write(" closed")

    def tag(x, conn, scale):
        assert open(conn).read() == "open"   # set up in this process, not yet torn down
        return (x * scale, os.path.basename(conn))

    stage = pl.map(tag, pl.producer(prod, 200), workers=3, setup=setup, teardown=teardown,
                   kwargs={"scale": 10})
    got = list(stage)
    assert sorted(x for x, _ in got) == [10 * i for i in range(200)]
    conns = sorted(os.listdir(tmp_path))
    assert len(conns) == 3
    assert {name for _, name in got} <= set(conns)
    assert all((tmp_path / name).read_text() == "open closed" for name in conns)


def test_items_between_stages_do_not_pass_through_the_parent():
    # The parent keeps one control channel per stage process, its epoll descriptor, and
    # (only when it consumes) one channel from each worker of the last stage: no end of a
    # channel between two stages.
    def parent_fds(source, expected):
        for _ in source:
            pass
        deadline = time.monotonic() + 5     # the parent may still be starting, under load
        while True:
            count = len(os.listdir("/proc/%d/fd" % os.getppid()))
            if count == expected or time.monotonic() > deadline:
                return count
            time.sleep(0.01)

    before = len(os.listdir("/proc/self/fd")) - 1    # less the one listing them
    middle = pl.map(abs, pl.producer(prod, 1000), workers=3)
    expected = before + (1 + 3 + 1) + 1     # a control channel per process, and an epoll
    assert pl.consumer(parent_fds, middle, kwargs={"expected": expected}).run() == [expected]

    def last_stage_sees_parent_fds(x):
        # The stages hold under 900 items, so item 900 exists only once the parent has taken
        # items: it has finished starting (its count is final).
        return len(os.listdir("/proc/%d/fd" % os.getppid())) if x >= 900 else None

    counts = set(pl.map(last_stage_sees_parent_fds, middle, workers=2)) - {None}
    assert counts == {before + (1 + 3 + 2) + 1 + 2}


@pytest.mark.timeout(30)
def test_a_receiver_that_ends_first_does_not_stop_the_sender_finishing_the_others():
    # The producer ends while its write to the slow worker is still pending; the fast
    # worker takes its END and exits meanwhile. (That EOF once read as a dead neighbour,
    # and the pipeline hung.)
    def blobs():
        for i in range(24):
            yield bytes([i]) * (256 << 10)

    def uneven(blob):
        if pl.worker().index == 0:
            time.sleep(0.02)
        return blob[0]

    stage = pl.map(uneven, pl.producer(blobs, maxsize=64), workers=2, maxsize=64)
    assert sorted(stage) == list(range(24))


def test_a_stage_description_runs_again():
    stage = pl.map(lambda x: x * 2, pl.producer(prod, 50), workers=2)
    assert sorted(stage) == sorted(stage) == [2 * i for i in range(50)]


def test_large_items_travel_intact():
    blob = bytes(range(256)) * 4096    # 1 MiB

    def blobs():
        for i in range(20):
            yield bytes([i]) + blob

    got = sorted(pl.map(lambda b: b, pl.producer(blobs, maxsize=4), workers=2, maxsize=4))
    assert [g[0] for g in got] == list(range(20)) and all(g[1:] == blob for g in got)


OPS = st.sampled_from(["map", "filter", "flat_map"])


def _sequential(ops, items):
    for op in ops:
        if op == "map":
            items = (x * 7 % 101 for x in items)
        elif op == "filter":
            items = (x for x in items if x % 3)
        else:
            items = (y for x in items for y in range(x % 4))
    return list(items)


def _fn(op):
    return {"map": lambda x: x * 7 % 101, "filter": lambda x: x % 3,
            "flat_map": lambda x: range(x % 4)}[op]


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(items=st.lists(st.integers(0, 1000), max_size=300),
       ops=st.lists(st.tuples(OPS, st.integers(1, 3), st.integers(1, 20)), min_size=1,
                    max_size=3),
       ordered=st.booleans())
def test_property_a_pipeline_gives_what_sequential_composition_gives(items, ops, ordered):
    def gen():
        yield from items

    stage = pl.producer(gen, maxsize=5)
    for op, workers, maxsize in ops:
        stage = getattr(pl, op)(_fn(op), stage, workers=workers, maxsize=maxsize)
    expected = _sequential([op for op, _, _ in ops], items)
    got = list(pl.iterate(stage, ordered=ordered))
    assert got == expected if ordered else sorted(got) == sorted(expected)


# -- bad input -----------------------------------------------------------------------------

def not_a_generator(n):
    return list(range(n))


@pytest.mark.parametrize("make, error, message", [
    (lambda: pl.producer(not_a_generator, 3), TypeError,
     r"^the producer must be a generator function \(one that yields\), and not_a_generator "
     r"is not$"),
    (lambda: pl.consumer_producer(not_a_generator, pl.producer(prod, 3)), TypeError,
     r"^the consumer-producer must be a generator function"),
    (lambda: pl.consumer(cons_prod, pl.producer(prod, 3)), TypeError,
     r"^the consumer cons_prod is a generator function, so calling it would run nothing"),
    (lambda: pl.producer(prod, 3, workers=0), ValueError, r"^workers must be at least 1, not 0$"),
    (lambda: pl.producer(prod, 3, workers=True), TypeError, r"^workers must be an int, not bool$"),
    (lambda: pl.map(abs, pl.producer(prod, 3), maxsize=0), ValueError,
     r"^maxsize must be at least 1, not 0$"),
    (lambda: pl.map(abs, [1, 2]), TypeError, r"^a source must be a pipeline Stage"),
    (lambda: pl.map(abs, []), ValueError, r"^a stage needs at least one source stage$"),
    (lambda: pl.map(42, pl.producer(prod, 3)), TypeError, r"^the function must be callable, not int$"),
    (lambda: pl.map(abs, pl.each(abs, pl.producer(prod, 3))), ValueError,
     r"^stage 'abs' is a consumer: it has no output to feed another stage$"),
    (lambda: pl.map(abs, pl.producer(prod, 3), setup=1), TypeError,
     r"^setup of pipeline stage 'abs' must be callable or None, not int$"),
    (lambda: pl.map(abs, pl.producer(prod, 3), kwargs=[1]), TypeError,
     r"^kwargs of pipeline stage 'abs' must be a dict or None, not list$"),
])
def test_bad_stage_definitions_are_refused_clearly(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_pipelines_are_refused_before_anything_starts():
    src = pl.producer(prod, 3)
    a, b = pl.map(abs, src), pl.map(abs, src)
    with pytest.raises(ValueError, match=r"^stage 'prod' feeds two stages \('abs' and 'abs'\)"):
        list(pl.map(abs, [a, b]))
    with pytest.raises(ValueError, match=r"^stage 'abs' is a consumer: run\(\) it instead"):
        iter(pl.each(abs, src))
    with pytest.raises(ValueError, match=r"^stage 'prod' is not a consumer: iterate it"):
        pl.run(src)
    with pytest.raises(ValueError, match=r"^ordered=True works with map, filter, flat_map"):
        pl.iterate(pl.consumer_producer(cons_prod, src), ordered=True)
    with pytest.raises(ValueError, match=r"^ordered=True needs a single producer"):
        pl.iterate(pl.map(abs, [src, pl.producer(prod, 2)]), ordered=True)
    with pytest.raises(ValueError, match=r"^ordered=True: consumer stage 'cons' must have"):
        pl.consumer(cons, src, workers=2).run(ordered=True)


def test_setup_must_return_a_dict_or_none():
    with pytest.raises(TypeError, match=r"^setup of pipeline stage 'abs' must return a dict"):
        list(pl.map(abs, pl.producer(prod, 3), setup=lambda: 42))
