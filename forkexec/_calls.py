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


CLOUDPICKLE_HINT = ("forkexec: lambdas, closures, local functions and functions defined "
                    "interactively can be sent by value with "
                    "ForkExchangeExecutor(pickler='cloudpickle') (pip install "
                    "'forkexec[cloudpickle]')")


def load_pickler(name):
    """The module that pickles calls: None for the standard pickle (the fast path), or
    cloudpickle. A clear error for an unknown name or a missing package."""
    if name is None or name == "pickle":
        return None
    if name != "cloudpickle":
        raise ValueError("pickler must be 'pickle' or 'cloudpickle', not %r" % (name,))
    try:
        import cloudpickle
    except ImportError as exc:
        raise ImportError("ForkExchangeExecutor(pickler='cloudpickle') needs the cloudpickle "
                          "package, which is not installed: pip install "
                          "'forkexec[cloudpickle]'") from exc
    return cloudpickle


def call_blob(fn, args, kwargs, pickler=None):
    if pickler is None:
        return pickle.dumps((pickled_fn(fn), args, kwargs), protocol=5)
    # By value where the standard pickle would refer to a name the worker may not have.
    # Plain functions' pickles stay shareable: equal bytes are equal functions.
    return pickler.dumps(((pickler.dumps(fn, protocol=5), is_plain(fn)), args, kwargs),
                         protocol=5)


def pickling_failed(fn, args, kwargs, exc, pickler=None):
    """``exc`` itself, with a note naming the part of the call that could not be pickled
    (and, with the standard pickle, how cloudpickle would send it)."""
    what = "the call"
    dumps = pickle.dumps if pickler is None else pickler.dumps
    for label, obj in itertools.chain(
            [("the function %r" % (fn,), fn)],
            (("argument %d (a %s)" % (i, type(a).__qualname__), a) for i, a in enumerate(args)),
            (("keyword argument %r (a %s)" % (k, type(v).__qualname__), v)
             for k, v in kwargs.items())):
        try:
            dumps(obj, protocol=5)
        except BaseException:  # noqa: B902
            what = label
            break
    add_note(exc, "forkexec: raised while pickling %s to send it to a worker" % what)
    if pickler is None and isinstance(exc, (pickle.PicklingError, AttributeError, TypeError)):
        add_note(exc, CLOUDPICKLE_HINT)
    return exc
