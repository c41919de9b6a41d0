"""procs' names on forkexec: run Python functions in parallel processes.

``call`` runs each process specification (see ``proc``) in a new process and
yields the results in order; ``pmap`` is a parallel ``map``. A call that raises
prints its traceback (from its process, to stderr) and yields ``Failed`` with
the original exception as its argument, in place of its result.
"""

import functools
import traceback

import forkexec

__all__ = ("proc", "call", "pmap", "Failed")


class Failed(Exception):
    """A call that failed; ``args[0]`` is the exception it raised."""


def proc(callback, *args, **kwargs):
    """The specification of the call ``callback(*args, **kwargs)`` in a new process."""
    return functools.partial(callback, *args, **kwargs)


def _run(channel, spec):
    try:
        result = spec()
    except Exception:
        traceback.print_exc()
        raise
    channel.send(result)


def call(procs):
    """Call each specification in a new process; yield the results in order."""
    results = forkexec.Map()
    try:
        for spec in procs:
            results.start(_run, spec)
        for index in range(len(results)):
            try:
                yield results[index]
            except Exception as exc:
                yield Failed(exc)
    finally:
        results.finish()
        results.close()


def pmap(function, *sequences):
    """Like the built-in ``map``, with each call in its own process."""
    return call(proc(function, *args) for args in zip(*sequences))
