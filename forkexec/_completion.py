"""Settling futures: completing, failing and cancelling work items, in one place.

Every path that ends a future goes through these functions: results arriving,
a broken pool, a dead worker, cancellation, shutdown. Futures are
:class:`~forkexec._future.FastFuture` where this Python's ``Future`` has the
fields it relies on, else the standard ``Future``.
"""

import logging
import pickle
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, PENDING, RUNNING
from concurrent.futures.process import BrokenProcessPool

from ._future import FastFuture, finish_all, transition_lock, usable as _fast_futures_usable
from ._death_policy import describe
from ._protocol import Status
from ._scheduler import cost_key
from .errors import WorkerDiedError, add_note

FAST = _fast_futures_usable()
FutureType = FastFuture if FAST else Future
_LOGGER = logging.getLogger("concurrent.futures")


def settle_results(entries, worker, scheduler, shared):
    """Complete the futures of a worker's result entries ``(task_id, status, value,
    seconds)``; returns the measured ``{cost_key: [seconds, calls]}``."""
    spent = {}
    outcomes = []
    last_fn = last_key = None
    for task_id, status, value, elapsed in entries:
        item = scheduler.answered(worker, task_id)
        if item is None:
            continue
        shared.running -= 1
        if item.fn is not last_fn:
            last_fn, last_key = item.fn, cost_key(item.fn)
        total = spent.get(last_key)
        if total is None:
            spent[last_key] = [elapsed, item.count]
        else:
            total[0] += elapsed
            total[1] += item.count
        if status == Status.INLINE_OK:
            shared.completed += 1
            outcomes.append((item.future, value, None))
            continue
        try:
            value = pickle.loads(value)
        except BaseException as exc:  # noqa: B902 - only this task is lost
            add_note(exc, "forkexec: raised while unpickling the result of %s in the parent"
                     % describe(item))
            shared.failed += 1
            set_exception(item.future, exc)
            continue
        if status == Status.OK:
            shared.completed += 1
            outcomes.append((item.future, value, None))
        else:
            shared.failed += 1
            outcomes.append((item.future, None, value.exception()))
    complete(outcomes)
    return spent


def complete(outcomes):
    """Finish futures from ``(future, result, exception)`` triples."""
    if FAST:
        finish_all(outcomes)
        return
    for future, result, exception in outcomes:
        if exception is None:
            set_result(future, result)
        else:
            set_exception(future, exception)


def set_exception(future, exc):
    try:
        future.set_exception(exc)
    except BaseException as err:  # noqa: B902 - finished already, or a callback raised
        _log_unless_finished(err)


def set_result(future, value):
    try:
        future.set_result(value)
    except BaseException as err:  # noqa: B902
        _log_unless_finished(err)


def _log_unless_finished(err):
    if type(err).__name__ != "InvalidStateError":
        _LOGGER.error("a done callback raised %s: %s", type(err).__name__, err)


def broken_copy(err):
    """A fresh exception like ``err`` to raise (raising one instance twice chains tracebacks)."""
    if isinstance(err, WorkerDiedError):
        copy = type(err)(str(err), err.pid, err.status)
    else:
        copy = BrokenProcessPool(str(err))
    copy.__cause__ = err.__cause__
    return copy


def start_running(items):
    """The items whose futures move to RUNNING; cancelled ones are dropped and their
    waiters told (``wait``/``as_completed`` see them). Items put back in the queue after
    a worker gave them back are RUNNING already and stay so."""
    started, cancelled = [], []
    if FAST:
        with transition_lock:
            for item in items:
                if item.started or item.future._state == PENDING:
                    item.future._state = RUNNING
                    item.started = True
                    started.append(item)
                else:
                    cancelled.append(item)
        for item in cancelled:
            item.future.set_running_or_notify_cancel()
        return started
    for item in items:
        if item.started or item.future.set_running_or_notify_cancel():
            item.started = True
            started.append(item)
    return started


def fail(items, error):
    """Fail the futures of ``items`` with copies of ``error`` (cancelled ones stay so)."""
    for item in start_running(items):
        set_exception(item.future, broken_copy(error) if isinstance(error, BrokenProcessPool)
                      else error)


#: Set on a future whose owner no longer wants it but could not cancel it because it was
#: sent to a worker (map's iterator timed out or was closed): if the worker gives it back
#: unstarted, it is cancelled instead of run.
ABANDONED = "_forkexec_abandoned"


def requeue(items, pending):
    """Put items that never started back at the front of the queue, in order; those
    abandoned meanwhile are cancelled instead."""
    abandoned = [item for item in items if getattr(item.future, ABANDONED, False)]
    if abandoned:
        cancel(abandoned)
        items = [item for item in items if not getattr(item.future, ABANDONED, False)]
    pending.extendleft(reversed(items))


def cancel(items):
    """Cancel the futures of ``items`` and tell their waiters, even those already moved to
    RUNNING by a dispatch that never reached a worker (given back, requeued).
    Exchange thread only (it alone also moves futures to RUNNING)."""
    for item in items:
        future = item.future
        with future._condition:
            with transition_lock:   # against a concurrent Future.cancel()
                state = future._state
                fresh = state in (PENDING, RUNNING)
                if fresh:
                    future._state = CANCELLED
            if not fresh and state != CANCELLED:
                continue   # finished, or cancelled and notified already
            future._condition.notify_all()
        future.set_running_or_notify_cancel()   # CANCELLED -> CANCELLED_AND_NOTIFIED
        if fresh:
            try:
                future._invoke_callbacks()
            except BaseException as err:  # noqa: B902
                _log_unless_finished(err)


