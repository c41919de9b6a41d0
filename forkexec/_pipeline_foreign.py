"""Generator pipelines on any ``concurrent.futures.Executor`` (``executor=``).

An executor runs calls, not processes that stream to each other, so there are no
stage processes and no channels: this process drives the pipeline, one generator
per stage, each pulling items from its source(s) as the consumer asks::

    producer(s) --> map/filter/flat_map/each --> consumer_producer --> consumer, or
    (here)          chunks of items submitted      (here)               this process
                    to the executor, in flight <= about maxsize items

* Generator stages (producer, consumer_producer, consumer) see a stream, so they
  run here, as one copy (``workers=1``; more is refused with LocalOnlyError), with
  their ``setup`` / ``teardown`` here too.
* Item-wise stages submit :func:`run_chunk` calls: a chunk of at most
  ``maxsize // (2 * workers)`` items, up to ``2 * workers`` chunks in flight (so
  at most about ``maxsize`` items: the bound of an endless producer); the next
  chunks are ready when one finishes. ``setup`` / ``teardown`` run around each
  chunk, in the executor. Outputs come in submission order when ``ordered``,
  else chunk by chunk as they complete.
* A task's exception is raised with its type, after the outputs its chunk made
  before it, with a note naming the stage; a dead worker is a WorkerDiedError
  (:func:`forkexec._foreign.worker_died`). Closing the pipeline closes every
  stage's generator, which cancels the chunks it has in flight.
"""

import collections
import functools
import queue
import time

from . import _pipeline_stage as _st
from ._foreign import check_executor, worker_died
from .errors import LocalOnlyError, RemoteFailure, add_note

#: Seconds after its first item when a chunk goes to the executor, full or not, so that
#: the items of a slow source do not wait for a whole chunk.
CHUNK_AGE = 0.005

_NOTE = "raised in pipeline stage "


def run_chunk(job, items):
    """In the executor: one chunk of an item-wise stage. Returns (outputs, failure or
    None), so that what the items before an exception made still arrives."""
    kind, fn, kwargs, name, setup, teardown = job
    outputs = []
    try:
        extra = _st.setup_kwargs(name, setup)
        try:
            if kwargs or extra:
                fn = functools.partial(fn, **dict(kwargs, **extra))
            _st.itemwise(kind, fn, items, outputs.append)
        finally:
            if teardown is not None:
                teardown(**extra)
    except Exception as exc:
        return outputs, RemoteFailure.capture(exc)
    return outputs, None


def _take(source, size):
    """(up to ``size`` items of ``source``, whether it ended); fewer when an item comes
    CHUNK_AGE or more after the first."""
    chunk = []
    deadline = None
    while len(chunk) < size:
        try:
            chunk.append(next(source))
        except StopIteration:
            return chunk, True
        if deadline is None:
            deadline = time.monotonic() + CHUNK_AGE
        elif time.monotonic() > deadline:
            break
    return chunk, False


def _interleave(sources):
    """Fan-in: one item of each source in turn, until every one has ended."""
    live = collections.deque(sources)
    while live:
        source = live.popleft()
        try:
            item = next(source)
        except StopIteration:
            continue
        live.append(source)
        yield item


class Run:
    """The pipeline of ``stages`` (sources first) driven from this process on
    ``executor``; the interface of :class:`forkexec._pipeline_run.Run`."""

    def __init__(self, stages, executor, ordered):
        self.executor = check_executor(executor)
        self.ordered = ordered
        self.stopped = False
        for stage in stages:
            if stage.kind not in _st.ITEMWISE and stage.workers != 1:
                raise LocalOnlyError(
                    "pipeline stage %r is a %s with workers=%d: on an executor a generator "
                    "stage runs in this process, as one copy (workers=1); map, filter, "
                    "flat_map and each spread their items over the executor"
                    % (stage.name, stage.kind, stage.workers))
        self._sink = stages[-1]
        self._generators = []     # every stage's generator, sources first
        self._last = self._build(stages[-1])

    def _build(self, stage):
        sources = [self._build(src) for src in stage.sources]
        if len(sources) > 1:
            sources = [_interleave(sources)]
            self._generators.append(sources[0])
        if stage.kind == _st.PRODUCER:
            generator = self._here(stage, lambda kw: stage.fn(*stage.args, **kw))
        elif stage.kind == _st.CONSUMER_PRODUCER:
            generator = self._here(stage, lambda kw: stage.fn(sources[0], **kw))
        elif stage.kind == _st.CONSUMER:   # its one item is what it returns
            generator = self._here(stage, lambda kw: [stage.fn(sources[0], **kw)])
        else:
            generator = self._submitted(stage, sources[0])
        self._generators.append(generator)
        return generator

    def _noted(self, exc, stage, where):
        """``exc`` with a note naming ``stage``, unless a stage further up named itself."""
        if not any(str(note).startswith(_NOTE) for note in getattr(exc, "__notes__", ())):
            add_note(exc, "%s%r (%s)" % (_NOTE, stage.name, where))
        return exc

    def _here(self, stage, make):
        """A generator stage, run in this process: set-up, its items, tear-down."""
        try:
            extra = _st.setup_kwargs(stage.name, stage.setup)
            try:
                yield from make(dict(stage.kwargs, **extra))
            finally:
                if stage.teardown is not None:
                    stage.teardown(**extra)
        except Exception as exc:
            raise self._noted(exc, stage, "in this process, driving the pipeline")

    def _submitted(self, stage, source):
        """An item-wise stage: its items go to the executor in chunks."""
        job = (stage.kind, stage.fn, stage.kwargs, stage.name, stage.setup, stage.teardown)
        size = max(1, stage.maxsize // (2 * stage.workers))
        in_flight = 2 * stage.workers
        pending = collections.deque()     # futures, in submission order
        completed = queue.SimpleQueue()   # futures as they complete (done callbacks)
        ended = False
        try:
            while True:
                while not ended and len(pending) < in_flight:
                    chunk, ended = _take(source, size)
                    if chunk:
                        try:    # Dask pickles at submit: an unpicklable function fails here
                            future = self.executor.submit(run_chunk, job, chunk)
                        except Exception as exc:
                            raise self._noted(exc, stage, self._where())
                        pending.append(future)
                        if not self.ordered:
                            future.add_done_callback(completed.put)
                if not pending:
                    return
                if self.ordered:
                    future = pending.popleft()
                else:
                    future = completed.get()
                    pending.remove(future)
                outputs, failure = self._outcome(stage, future)
                yield from outputs
                if failure is not None:
                    raise self._noted(failure.exception(), stage, self._where())
        finally:
            for future in pending:
                future.cancel()

    def _where(self):
        return "a task on %s" % type(self.executor).__name__

    def _outcome(self, stage, future):
        try:
            return future.result()
        except Exception as error:
            died = worker_died(error, "pipeline stage %r" % stage.name)
            raise self._noted(error if died is None else died, stage, self._where())

    # -- what pipeline.iterate and pipeline.run use ----------------------------------------
    def items(self):
        return self._last

    def wait_sinks(self):
        """Run to the end: [what the consumer returned], or [None] per worker of an
        ``each`` stage, as the local run returns."""
        results = list(self._last)
        return results if self._sink.kind == _st.CONSUMER else [None] * self._sink.workers

    def stop(self):
        """Close every stage's generator (idempotent): what is in flight is cancelled."""
        if self.stopped:
            return
        self.stopped = True
        for generator in reversed(self._generators):
            generator.close()
