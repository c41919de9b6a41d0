"""A ``concurrent.futures.Future`` that costs less when nobody waits on it.

The standard ``Future`` builds a ``threading.Condition`` at creation and takes
it for every state change and read; at tens of thousands of tasks a second that
is a large part of the parent's time. :class:`FastFuture` is a real ``Future``
subclass that creates its condition only when some thread must wait or be told
(``result()`` on an unfinished future, ``wait``, ``as_completed``,
``add_done_callback``, ``cancel``).

Correctness rests on two orders, both safe under the GIL:

* a condition is created, and a condition-less future finished, only under one
  lock: either the future is finished before anyone can wait on it (they then
  see FINISHED), or the finishing happens under its condition like the standard
  Future (so ``wait``/``as_completed`` count it exactly once);
* PENDING -> RUNNING (dispatch) and PENDING -> CANCELLED (``cancel``) happen
  under one lock shared by all FastFutures, so a cancelled future never runs;
  the dispatcher takes it once per batch, not per task.
"""

import threading
from concurrent.futures import Future
from concurrent.futures._base import LOGGER
from concurrent.futures._base import (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING,
                                      RUNNING)

# Guards PENDING -> RUNNING and PENDING -> CANCELLED of every FastFuture. A child forked
# while another thread held it gets it unlocked (it would otherwise never be released).
transition_lock = threading.Lock()
if hasattr(transition_lock, "_at_fork_reinit"):
    import os
    os.register_at_fork(after_in_child=transition_lock._at_fork_reinit)

_STANDARD_FIELDS = {"_condition", "_done_callbacks", "_exception", "_result", "_state",
                    "_waiters"}


class FastFuture(Future):
    """A ``Future`` whose condition variable is created on first need."""

    #: ``(loop, worker)`` when a caller handed this future's task to an idle worker: a
    #: waiting ``result()`` may then read the worker's reply itself (_caller_shortcuts).
    _helper = None

    def __init__(self):  # noqa: super().__init__ would build the condition we avoid
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks = []

    @property
    def _condition(self):
        if self._helper is not None:   # someone else will wait or be told: not result()
            self._release_helper()
        cond = self.__dict__.get("_cond")
        if cond is None:
            with transition_lock:   # so finish() sees either no condition or this one
                cond = self.__dict__.get("_cond")
                if cond is None:
                    cond = self.__dict__["_cond"] = threading.Condition()
        return cond

    def done(self):
        if self._helper is not None:   # polled for: the exchange thread must read the reply
            self._release_helper()
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)

    def running(self):
        if self._helper is not None:   # polled for, as done()
            self._release_helper()
        return self._state == RUNNING

    def result(self, timeout=None):
        if self._state == FINISHED and self._exception is None:
            return self._result
        if self._helper is not None:
            timeout = self._help(timeout)
            if self._state == FINISHED and self._exception is None:
                return self._result   # read by this thread: no condition needed
        return super().result(timeout)

    def exception(self, timeout=None):
        if self._state == FINISHED:
            return self._exception
        if self._helper is not None:
            timeout = self._help(timeout)
        return super().exception(timeout)

    def _help(self, timeout):
        """Read the reply of our worker in this thread for a moment; returns what is left
        of ``timeout``."""
        loop, worker = self._helper
        self._helper = None   # once: past its moment the exchange thread reads as usual
        spent = loop.helped_wait(worker, self, timeout)
        return None if timeout is None else max(0.0, timeout - spent)

    def _release_helper(self):
        """Nobody will read the lent worker's reply here: the exchange thread, woken,
        takes the worker back."""
        helper, self._helper = self._helper, None
        if helper is not None:
            helper[0].shared.wake()

    def cancel(self):
        with transition_lock:
            state = self._state
            if state in (RUNNING, FINISHED):
                return False
            if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED
        cond = self._condition
        with cond:
            cond.notify_all()
        self._invoke_callbacks()
        return True

    def _invoke_callbacks(self):
        # Callbacks run on the exchange thread: whatever one raises (SystemExit included)
        # is logged, and the other callbacks and the loop go on.
        for callback in self._done_callbacks:
            try:
                callback(self)
            except BaseException:  # noqa: B902
                LOGGER.exception("exception calling callback for %r", self)

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle %r object: a Future lives in the process that made "
                        "it; pass its result instead" % type(self).__name__)


def finish_all(outcomes):
    """Complete RUNNING FastFutures from ``(future, result, exception)`` triples.

    Futures nobody has made a condition for are finished under one acquisition of
    the transition lock (so no condition, waiter or callback can appear half-way);
    the others under their own condition, like the standard Future.
    """
    watched = []
    with transition_lock:
        for outcome in outcomes:
            future = outcome[0]
            if future._state != RUNNING:
                continue
            if "_cond" in future.__dict__:
                watched.append(outcome)
            elif outcome[2] is None:
                future._result = outcome[1]
                future._state = FINISHED
            else:
                future._exception = outcome[2]
                future._state = FINISHED
    for future, result, exception in watched:
        cond = future.__dict__["_cond"]
        with cond:
            if future._state != RUNNING:
                continue
            if exception is None:
                future._result = result
            else:
                future._exception = exception
            future._state = FINISHED
            for waiter in future._waiters:
                if exception is None:
                    waiter.add_result(future)
                else:
                    waiter.add_exception(future)
            cond.notify_all()
        future._invoke_callbacks()


def usable():
    """FastFuture relies on Future's private fields; check this Python has exactly those."""
    return set(Future().__dict__) == _STANDARD_FIELDS
