"""Pickling a call for a worker: cached pickles of plain functions, and errors that keep
the type pickling raised (code written for the standard executor catches it)."""

import itertools
import pickle

from ._scheduler import is_plain
from .errors import add_note

#: Pickled plain functions, keyed by the function (they pickle by name, so bytes never change).
_fn_pickles = {}
FN_CACHE_SIZE = 512


def pickled_fn(fn):
    """``(pickle, shareable)`` of a task's function. Plain functions pickle by name: their
    bytes are cached here, and the worker may keep one unpickled copy for all tasks."""
    if is_plain(fn):
        blob = _fn_pickles.get(fn)
        if blob is None:
            if len(_fn_pickles) >= FN_CACHE_SIZE:
                _fn_pickles.clear()
            blob = _fn_pickles[fn] = pickle.dumps(fn, protocol=5)
        return blob, True
    return pickle.dumps(fn, protocol=5), False


def call_blob(fn, args, kwargs):
    return pickle.dumps((pickled_fn(fn), args, kwargs), protocol=5)


def pickling_failed(fn, args, kwargs, exc):
    """``exc`` itself, with a note naming the part of the call that could not be pickled."""
    what = "the call"
    for label, obj in itertools.chain(
            [("the function %r" % (fn,), fn)],
            (("argument %d (a %s)" % (i, type(a).__qualname__), a) for i, a in enumerate(args)),
            (("keyword argument %r (a %s)" % (k, type(v).__qualname__), v)
             for k, v in kwargs.items())):
        try:
            pickle.dumps(obj, protocol=5)
        except BaseException:  # noqa: B902
            what = label
            break
    return add_note(exc, "forkexec: raised while pickling %s to send it to a worker" % what)
