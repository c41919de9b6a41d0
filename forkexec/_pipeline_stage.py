"""The life of one stage process, from fork to ``os._exit``.

``serve`` runs the stage's set-up, then its function over the items arriving on
the input channels (see :mod:`forkexec._pipeline_links`), sending what it yields
downstream; then its tear-down, END on every output, DONE to the parent, and
exits. An exception anywhere is sent to the parent as FAILED; ``sys.exit`` leaves
with its code and no DONE, which the parent reports as a stage that died. When
the parent closes the control channel (it stopped the pipeline, or died) the
stage stops at its next wait: :class:`Stopped` unwinds the stage function, so its
``finally`` blocks and the tear-down run. When a neighbour goes away the stage
waits for the parent, which finds out why and stops everything.
"""

import collections
import functools
import itertools

from . import _pipeline_records as rec
from ._fork import exit_child
from ._pipeline_links import Links, PeerGone, Stopped
from .errors import ProtocolError, RemoteFailure

PRODUCER, CONSUMER_PRODUCER, CONSUMER, MAP, FILTER, FLAT_MAP, EACH = (
    "producer", "consumer_producer", "consumer", "map", "filter", "flat_map", "each")
SINKS = (CONSUMER, EACH)
ITEMWISE = (MAP, FILTER, FLAT_MAP, EACH)

#: Which stage worker this process is (None in a process that is no stage).
Worker = collections.namedtuple("Worker", "stage index workers")
current = None


def serve(stage, index, control, inputs, in_windows, outputs, out_window, ordered, window):
    """Run worker ``index`` of ``stage`` in this (forked) process; never returns."""
    global current
    current = Worker(stage.name, index, stage.workers)
    released = [0]      # ordered producer: the consumer has taken every group before this

    def on_control(_i, record):
        if record[0] != rec.RELEASED:
            raise ProtocolError("unexpected %s on a stage's control channel"
                                % rec.describe(record))
        released[0] = record[1]

    def on_control_eof(_i):
        raise Stopped()

    links = Links(inputs, in_windows, outputs, out_window, [control], on_control,
                  on_control_eof)
    code = 0
    try:
        try:
            result = _with_setup(stage, links, ordered, window, released)
            links.finish()
        except PeerGone:
            links.wait_for_control_eof()   # the parent finds out why and stops us
            raise Stopped() from None
        _report(control, (rec.DONE, result))
    except Stopped:
        pass
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        code = 1
        _report(control, (rec.FAILED, RemoteFailure.capture(exc)))
    finally:
        exit_child(code)


def _report(control, record):
    try:
        try:
            control.send(record)
        except Exception as exc:    # a result that cannot be pickled
            control.send((rec.FAILED, RemoteFailure.capture(exc)))
    except Exception:
        pass    # the parent is gone: nobody to tell


def setup_kwargs(name, setup):
    """The extra keyword arguments that the set-up of stage ``name`` returns (None: {})."""
    extra = setup() if setup is not None else None
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError("setup of pipeline stage %r must return a dict of keyword arguments "
                        "for the stage function, or None; it returned %s"
                        % (name, type(extra).__name__))
    return extra


def _with_setup(stage, links, ordered, window, released):
    extra = setup_kwargs(stage.name, stage.setup)
    try:
        fn = stage.fn
        kwargs = dict(stage.kwargs, **extra)
        if stage.kind == PRODUCER:
            return _produce(fn(*stage.args, **kwargs), links, ordered, window, released)
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        source = links.items()
        if ordered and stage.kind in SINKS:
            control = links.controls[0]
            source = in_order(source, lambda seq: control.send((rec.RELEASED, seq)), window)
        if stage.kind == CONSUMER:
            return fn(source)
        if stage.kind == CONSUMER_PRODUCER:
            _drain(fn(source), links.put)
        elif ordered and stage.kind != EACH:   # an ordered sink's source yields values
            _itemwise_ordered(stage.kind, fn, source, links.put)
        else:
            itemwise(stage.kind, fn, source, links.put)
        return None
    finally:
        if stage.teardown is not None:
            stage.teardown(**extra)


def _drain(iterable, put):
    for item in iterable:
        put(item)


def _produce(generator, links, ordered, window, released):
    if not ordered:
        _drain(generator, links.put)
        return None
    put, wait = links.put, links.wait
    for seq, item in enumerate(generator):
        while seq >= released[0] + window:   # bounds the consumer's reorder buffer
            wait()
        put((seq, [item]))
    return None


def itemwise(kind, fn, source, put):
    if kind == MAP:
        _drain(map(fn, source), put)
    elif kind == FILTER:
        _drain(filter(fn, source), put)
    elif kind == FLAT_MAP:
        _drain(itertools.chain.from_iterable(map(fn, source)), put)
    else:
        for item in source:
            fn(item)


def _itemwise_ordered(kind, fn, source, put):
    """Each group keeps its sequence number; a filter leaves an empty group behind."""
    if kind == MAP:
        expand = lambda x: (fn(x),)   # noqa: E731
    elif kind == FILTER:
        expand = lambda x: (x,) if fn(x) else ()   # noqa: E731
    else:
        expand = fn
    for seq, values in source:
        put((seq, [y for x in values for y in expand(x)]))


def in_order(groups, release, window):
    """Yield the values of ``(seq, values)`` groups in sequence order; call
    ``release(seq)`` now and then with the count of groups taken so far."""
    pending = {}
    expected = released = 0
    every = max(1, window // 4)
    for seq, values in groups:
        if seq != expected:
            pending[seq] = values
            continue
        while values is not None:
            yield from values
            expected += 1
            values = pending.pop(expected, None)
        if expected - released >= every:
            released = expected
            release(expected)
    if pending:
        raise ProtocolError("ordered pipeline: group %d never arrived (%d later ones did)"
                            % (expected, len(pending)))
