"""Generator pipelines: plain generator functions, each stage in forked processes.

The stage functions are the seed's three roles, unchanged, so they compose
sequentially for debugging (``for x in cons_prod(prod(10)): ...``)::

    def prod(n):            # producer: a generator function
        yield from range(n)

    def cons_prod(source):  # consumer-producer: a generator over an iterable
        for x in source:
            yield x * x

    def cons(source):       # consumer: a function over an iterable
        return sum(source)

and a pipeline runs them in processes::

    from forkexec import pipeline as pl
    squares = pl.consumer_producer(cons_prod, pl.producer(prod, 10), workers=2)
    total, = pl.consumer(cons, squares).run()     # the consumer as a stage, or
    for x in squares: ...                         # this process as the consumer

Data flow (every arrow a socketpair channel; items never pass the parent
unless the parent is the consumer)::

    producer worker --ITEMS/END-->  stage worker 1 --ITEMS/END-->  consumer worker
          (1..n)    <--CREDIT----   stage worker 2 <--CREDIT----   (or the parent)
                                     (workers=N)
          \\____________________________|_______________________________/
                     control channels: DONE / FAILED / EOF -> parent

*Producer*: runs its generator and sends what it yields in batches, each
within the credit its receiver gave (``maxsize`` items per stage, split over its
channels), to the downstream worker with credit, round robin (fan-out).
*Stage worker*: its function pulls from an iterator over every input channel
(fan-in); credits go back as items are taken; what it yields goes on like a
producer's. *Parent*: forks and supervises (:mod:`forkexec._pipeline_run`);
when it is the consumer it also reads the last stage's items. An exception in a
stage, a dead stage process, ``close()``, ``break``, dropping the iterator or
Ctrl-C stops every process of the pipeline.

With ``executor=`` (:func:`iterate`, :func:`run`) there are no stage processes:
this process drives the pipeline and the item-wise stages run on the executor
(:mod:`forkexec._pipeline_foreign`).
"""

import inspect
import weakref

from . import _fork
from . import _pipeline_foreign
from . import _pipeline_stage as _st
from ._pipeline_run import Run
from .errors import StageDied

__all__ = ["Pipeline", "Stage", "StageDied", "consumer", "consumer_producer", "each",
           "filter", "flat_map", "iterate", "map", "producer", "run", "worker"]

#: Items a stage may hold (sent downstream and not yet taken there) unless told.
DEFAULT_MAXSIZE = 256


class Stage:
    """A stage of a pipeline: what runs, in how many processes, fed by which stages.

    Stages describe; nothing runs until a pipeline is iterated (``for x in
    stage``, :func:`iterate`) or a consumer stage is :meth:`run`. A stage feeds at
    most one other stage; the same description can run any number of times.
    """

    __slots__ = ("kind", "fn", "args", "kwargs", "sources", "workers", "maxsize", "name",
                 "setup", "teardown")

    def __init__(self, kind, fn, args, sources, workers, maxsize, name, setup, teardown,
                 kwargs):
        self.kind, self.fn, self.args, self.sources = kind, fn, args, sources
        self.workers = _positive("workers", workers)
        self.maxsize = _positive("maxsize", maxsize)
        self.name = _name(fn) if name is None else str(name)
        for what, value in (("setup", setup), ("teardown", teardown)):
            if value is not None and not callable(value):
                raise TypeError("%s of pipeline stage %r must be callable or None, not %s"
                                % (what, self.name, type(value).__name__))
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError("kwargs of pipeline stage %r must be a dict or None, not %s"
                            % (self.name, type(kwargs).__name__))
        self.setup, self.teardown, self.kwargs = setup, teardown, dict(kwargs or {})

    def __repr__(self):
        return "<Stage %r %s workers=%d maxsize=%d>" % (self.name, self.kind, self.workers,
                                                        self.maxsize)

    def __iter__(self):
        return iterate(self)

    def run(self, *, ordered=False, executor=None):
        """Run the pipeline ending in this consumer stage; see :func:`run`."""
        return run(self, ordered=ordered, executor=executor)


def _positive(what, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be an int, not %s" % (what, type(value).__name__))
    if value < 1:
        raise ValueError("%s must be at least 1, not %d" % (what, value))
    return value


def _name(fn):
    return getattr(fn, "__name__", None) or repr(fn)


def _is_generator_function(fn):
    return inspect.isgeneratorfunction(fn) or inspect.isgeneratorfunction(
        getattr(fn, "__call__", None))


def _check_fn(fn, role):
    if not callable(fn):
        raise TypeError("the %s must be callable, not %s" % (role, type(fn).__name__))
    generator = _is_generator_function(fn)
    if role in ("producer", "consumer-producer") and not generator:
        raise TypeError("the %s must be a generator function (one that yields), and %s is "
                        "not" % (role, _name(fn)))
    if role == "consumer" and generator:
        raise TypeError("the consumer %s is a generator function, so calling it would run "
                        "nothing; a stage whose output goes on is a consumer_producer"
                        % _name(fn))


def _sources(source):
    sources = tuple(source) if isinstance(source, (list, tuple)) else (source,)
    if not sources:
        raise ValueError("a stage needs at least one source stage")
    for src in sources:
        if not isinstance(src, Stage):
            raise TypeError("a source must be a pipeline Stage (from producer, map, ...), "
                            "not %s" % type(src).__name__)
        if src.kind in _st.SINKS:
            raise ValueError("stage %r is a consumer: it has no output to feed another "
                             "stage" % src.name)
    return sources


def producer(fn, *args, workers=1, maxsize=DEFAULT_MAXSIZE, name=None, setup=None,
             teardown=None, kwargs=None):
    """A producer stage: each of its ``workers`` processes runs ``fn(*args, **kwargs)``, a
    generator function, and its items go downstream (see :func:`worker` to shard)."""
    _check_fn(fn, "producer")
    return Stage(_st.PRODUCER, fn, args, (), workers, maxsize, name, setup, teardown, kwargs)


def _stage(kind, role, fn, source, workers, maxsize, name, setup, teardown, kwargs):
    _check_fn(fn, role)
    return Stage(kind, fn, (), _sources(source), workers, maxsize, name, setup, teardown,
                 kwargs)


def consumer_producer(fn, source, *, workers=1, maxsize=DEFAULT_MAXSIZE, name=None,
                      setup=None, teardown=None, kwargs=None):
    """A stage running ``fn(items, **kwargs)``, a generator function over an iterable, in
    each of its ``workers`` processes. ``source`` is a stage or a list of stages (fan-in)."""
    return _stage(_st.CONSUMER_PRODUCER, "consumer-producer", fn, source, workers, maxsize,
                  name, setup, teardown, kwargs)


def consumer(fn, source, *, workers=1, maxsize=DEFAULT_MAXSIZE, name=None, setup=None,
             teardown=None, kwargs=None):
    """A final stage running ``fn(items, **kwargs)`` in each of its ``workers`` processes;
    :meth:`Stage.run` returns what each returned."""
    return _stage(_st.CONSUMER, "consumer", fn, source, workers, maxsize, name, setup,
                  teardown, kwargs)


def map(fn, source, *, workers=1, maxsize=DEFAULT_MAXSIZE, name=None, setup=None,
        teardown=None, kwargs=None):
    """A stage yielding ``fn(item, **kwargs)`` for each item."""
    return _stage(_st.MAP, "function", fn, source, workers, maxsize, name, setup, teardown,
                  kwargs)


def filter(fn, source, *, workers=1, maxsize=DEFAULT_MAXSIZE, name=None, setup=None,
           teardown=None, kwargs=None):
    """A stage passing on the items for which ``fn(item, **kwargs)`` is true."""
    return _stage(_st.FILTER, "function", fn, source, workers, maxsize, name, setup,
                  teardown, kwargs)


def flat_map(fn, source, *, workers=1, maxsize=DEFAULT_MAXSIZE, name=None, setup=None,
             teardown=None, kwargs=None):
    """A stage yielding every item of the iterable ``fn(item, **kwargs)``, for each item."""
    return _stage(_st.FLAT_MAP, "function", fn, source, workers, maxsize, name, setup,
                  teardown, kwargs)


def each(fn, source, *, workers=1, maxsize=DEFAULT_MAXSIZE, name=None, setup=None,
         teardown=None, kwargs=None):
    """A final stage calling ``fn(item, **kwargs)`` for each item (results dropped)."""
    return _stage(_st.EACH, "function", fn, source, workers, maxsize, name, setup, teardown,
                  kwargs)


def worker():
    """In a stage process, ``Worker(stage, index, workers)`` (index from 0); else None."""
    return _st.current


def _graph(last, ordered):
    """The stages feeding ``last``, sources before the stages they feed, ``last`` last."""
    if not isinstance(last, Stage):
        raise TypeError("expected a pipeline Stage, not %s" % type(last).__name__)
    order, feeds = [], {}

    def visit(stage, fed):
        if id(stage) in feeds:
            raise ValueError("stage %r feeds two stages (%r and %r); a stage feeds one stage, "
                             "and one stage may have several sources"
                             % (stage.name, feeds[id(stage)].name, fed.name))
        feeds[id(stage)] = fed
        for src in stage.sources:
            visit(src, stage)
        order.append(stage)

    visit(last, None)
    if ordered:
        producers = [s for s in order if s.kind == _st.PRODUCER]
        if len(producers) != 1 or producers[0].workers != 1:
            raise ValueError("ordered=True needs a single producer with workers=1: the order "
                             "is the order in which that producer yields")
        for s in order:
            if s.kind == _st.CONSUMER_PRODUCER:
                raise ValueError("ordered=True works with map, filter, flat_map and each "
                                 "stages; consumer_producer stage %r has no item-by-item "
                                 "correspondence to keep in order" % s.name)
        if last.kind in _st.SINKS and last.workers != 1:
            raise ValueError("ordered=True: consumer stage %r must have workers=1 to see "
                             "every item in order" % last.name)
    return order


def _start(stages, to_parent, ordered, executor):
    if executor is None:
        return Run(stages, to_parent, ordered)
    return _pipeline_foreign.Run(stages, executor, ordered)


def iterate(stage, *, ordered=False, executor=None):
    """Start the pipeline ending in ``stage`` and return a :class:`Pipeline` iterator over
    its items in this process (in the producer's order if ``ordered``). With ``executor``
    (any ``concurrent.futures.Executor``) the item-wise stages run on it, driven from
    this process (see the README, "When one machine is not enough")."""
    stages = _graph(stage, ordered)
    if stage.kind in _st.SINKS:
        raise ValueError("stage %r is a consumer: run() it instead of iterating" % stage.name)
    return Pipeline(_start(stages, True, ordered, executor))


def run(stage, *, ordered=False, executor=None):
    """Run the pipeline ending in the consumer ``stage`` to its end; returns the list of
    what each of its workers returned. Raises what a stage raised. ``executor`` as for
    :func:`iterate`."""
    stages = _graph(stage, ordered)
    if stage.kind not in _st.SINKS:
        raise ValueError("stage %r is not a consumer: iterate it, or end the pipeline with "
                         "consumer() or each()" % stage.name)
    running = _start(stages, False, ordered, executor)
    try:
        return running.wait_sinks()
    finally:
        running.stop()


class Pipeline:
    """A running pipeline whose consumer is this process: an iterator over its items.

    ``close()``, leaving a ``with`` block, an exception (or Ctrl-C) while waiting, and
    dropping the iterator all stop every stage process and reap it.
    """

    def __init__(self, running):
        self._items = running.items()
        self._running = weakref.ref(running)
        self._stop = weakref.finalize(self, running.stop)
        _fork.own(self)

    def __repr__(self):
        running = self._running()
        state = "stopped" if running is None or running.stopped else "running"
        return "<Pipeline %s>" % state

    def __iter__(self):
        return self

    def __next__(self):
        if not self._stop.alive:
            raise StopIteration
        try:
            return next(self._items)
        except BaseException:   # the end, a stage's failure, or Ctrl-C: stop everything
            self._stop()
            raise

    def close(self):
        """Stop every stage process (idempotent)."""
        self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _after_fork_in_child(self):
        # A process forked from the owner must not stop the owner's pipeline at its exit.
        self._stop.detach()
        return False
