"""The crash table: objects that crash, exit or raise while pickled or unpickled.

Each row puts a misbehaving object in one place - the function, an argument or
the result - and says what each executor does with it. forkexec's promises:
a pickling problem in the parent fails only that future (``submit`` never
raises it, not even the first ``submit``); an error or exit while unpickling or
pickling in the worker fails only that future; a worker that really dies breaks
the pool with a ``BrokenProcessPool`` naming the pid and the signal or exit
code, promptly; nothing ever hangs.

The same table runs against ProcessPoolExecutor (fork context) as a record of
where the two differ; the stdlib column says what the standard executor does.
A crash (os._exit, SIGSEGV) while pickling an argument or unpickling a result
happens in the parent itself and would kill the test run, so those rows are
absent for both.
"""

import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

import executor_helpers as h
from executor_helpers import CustomError, Hazard

pytestmark = pytest.mark.timeout(60)

#: A crash must break the pool within this many seconds (generous: busy CI).
PROMPTLY = 10.0


class Fails:
    """Only this future fails, with ``exc_type``; the pool keeps working."""

    def __init__(self, exc_type, text=None):
        self.exc_type = exc_type
        self.text = text

    def __repr__(self):
        return "Fails(%s)" % (self.exc_type,)


class Breaks:
    """The worker dies: the pool is broken; the message names the pid and ``how``."""

    def __init__(self, how):
        self.how = how


class Hangs:
    """The standard executor never completes the future (so the row is skipped)."""

    def __init__(self, why):
        self.why = why


def place(where, how):
    """(fn, args) putting a misbehaving object at ``where``."""
    if where == "fn pickled":
        return Hazard("pickle", how), ()
    if where == "arg pickled":
        return h.identity, (Hazard("pickle", how),)
    if where == "fn unpickled":
        return Hazard("unpickle", how), ()
    if where == "arg unpickled":
        return h.identity, (Hazard("unpickle", how),)
    if where == "task body":
        return h.misbehave, (how,)
    if where == "result pickled":
        return h.return_hazard, ("pickle", how)
    if where == "result unpickled":
        return h.return_hazard, ("unpickle", how)
    raise AssertionError(where)


FEEDER_DIES = Hangs("SystemExit while pickling kills the stdlib's queue feeder thread; "
                    "the future never completes")
STDLIB_BREAKS = Breaks(None)

# (where it happens, what happens, forkexec's behaviour, the stdlib's behaviour)
# forkexec keeps the exception's own type everywhere (code written for the standard
# executor catches it) and adds a note saying where it happened.
CRASH_TABLE = [
    # In the parent, at submit: the call is pickled right away.
    ("fn pickled", "error", Fails(CustomError, "pickling the function"), Fails(CustomError)),
    ("fn pickled", "exit", Fails(SystemExit, "pickling the function"), FEEDER_DIES),
    ("arg pickled", "error", Fails(CustomError, "pickling argument 0"), Fails(CustomError)),
    ("arg pickled", "exit", Fails(SystemExit, "pickling argument 0"), FEEDER_DIES),
    # In the worker, unpickling the call: the stdlib loses the worker every time.
    ("fn unpickled", "error", Fails(CustomError, "unpickling the task"), STDLIB_BREAKS),
    ("fn unpickled", "exit", Fails(SystemExit, "unpickling the task"), STDLIB_BREAKS),
    ("fn unpickled", "interrupt", Fails(KeyboardInterrupt), STDLIB_BREAKS),
    ("arg unpickled", "error", Fails(CustomError), STDLIB_BREAKS),
    ("arg unpickled", "exit", Fails(SystemExit), STDLIB_BREAKS),
    ("arg unpickled", "os_exit", Breaks("exit code 3"), STDLIB_BREAKS),
    ("arg unpickled", "segv", Breaks("SIGSEGV"), STDLIB_BREAKS),
    # In the worker, running the task.
    ("task body", "error", Fails(CustomError), Fails(CustomError)),
    ("task body", "exit", Fails(SystemExit), Fails(SystemExit)),
    ("task body", "interrupt", Fails(KeyboardInterrupt), Fails(KeyboardInterrupt)),
    ("task body", "os_exit", Breaks("exit code 3"), STDLIB_BREAKS),
    ("task body", "segv", Breaks("SIGSEGV"), STDLIB_BREAKS),
    # In the worker, pickling the result: the same exception as the stdlib's.
    ("result pickled", "error", Fails(CustomError, "pickling the result of return_hazard"),
     Fails(CustomError)),
    ("result pickled", "exit", Fails(SystemExit, "pickling the result of return_hazard"),
     Fails(SystemExit)),
    ("result pickled", "interrupt", Fails(KeyboardInterrupt, "pickling the result"),
     Fails(KeyboardInterrupt)),
    ("result pickled", "os_exit", Breaks("exit code 3"), STDLIB_BREAKS),
    ("result pickled", "segv", Breaks("SIGSEGV"), STDLIB_BREAKS),
    # In the parent, unpickling the result: the stdlib breaks the whole pool.
    ("result unpickled", "error", Fails(CustomError, "unpickling the result of return_hazard"),
     STDLIB_BREAKS),
    ("result unpickled", "exit", Fails(SystemExit, "unpickling the result"), STDLIB_BREAKS),
    ("result unpickled", "interrupt", Fails(KeyboardInterrupt, "unpickling the result"),
     STDLIB_BREAKS),
]


def crash_rows():
    for where, how, ours, stdlib in CRASH_TABLE:
        row = "%s-%s" % (where.replace(" ", "-"), how)
        yield pytest.param("forkexec", where, how, ours, id="forkexec-" + row)
        yield pytest.param("stdlib", where, how, stdlib, id="stdlib-" + row)


@pytest.mark.parametrize("kind, where, how, expected", list(crash_rows()))
def test_crash_table(kind, where, how, expected):
    if isinstance(expected, Hangs):
        pytest.skip("stdlib hangs here: " + expected.why)
    fn, args = place(where, how)
    ex = h.new_executor(kind, 1)
    try:
        if isinstance(expected, Fails):
            check_only_the_future_fails(ex, fn, args, expected)
        else:
            check_the_pool_breaks(ex, kind, fn, args, expected)
    finally:
        started = time.monotonic()
        ex.shutdown(wait=True)
        assert time.monotonic() - started < PROMPTLY


def check_only_the_future_fails(ex, fn, args, expected):
    bad = ex.submit(fn, *args)          # the first submit: it must not raise
    good = ex.submit(h.square, 3)
    with pytest.raises(expected.exc_type) as info:
        bad.result(timeout=30)
    if expected.text is not None:
        notes = getattr(info.value, "__notes__", [])
        assert expected.text in str(info.value) + " ".join(notes), (info.value, notes)
    assert good.result(timeout=30) == 9
    assert ex.submit(h.square, 4).result(timeout=30) == 16


def check_the_pool_breaks(ex, kind, fn, args, expected):
    pid = ex.submit(h.getpid).result(timeout=30)
    started = time.monotonic()
    bad = ex.submit(fn, *args)
    behind = []
    try:
        for i in range(3):
            behind.append(ex.submit(h.square, i))
    except BrokenProcessPool:   # the pool may break already: submit says so
        pass
    with pytest.raises(BrokenProcessPool) as info:
        bad.result(timeout=30)
    assert time.monotonic() - started < PROMPTLY
    if kind == "forkexec":
        # Difference: the stdlib's message names neither the pid nor the cause.
        message = str(info.value)
        assert str(pid) in message and expected.how in message, message
    for future in behind:
        with pytest.raises(BrokenProcessPool):
            future.result(timeout=30)
    with pytest.raises(BrokenProcessPool):
        ex.submit(h.square, 2).result(timeout=30)


@pytest.mark.parametrize("kind", ["stdlib", "forkexec"])
def test_worker_killed_from_outside_breaks_the_pool(kind, tmp_path):
    started = str(tmp_path / "started")
    with h.new_executor(kind, 2) as ex:
        victim = ex.submit(h.announce_and_sleep, started, 30)
        pid = h.read_pid(started)
        os.kill(pid, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(BrokenProcessPool) as info:
            victim.result(timeout=30)
        assert time.monotonic() - began < PROMPTLY
        if kind == "forkexec":
            assert str(pid) in str(info.value) and "SIGKILL" in str(info.value)
        with pytest.raises(BrokenProcessPool):
            ex.submit(h.square, 2).result(timeout=30)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_unpicklable_map_item_fails_at_its_item_only(chunksize):
    items = [1, 2, Hazard("pickle", "error"), 4, 5]
    with h.new_executor("forkexec", 2) as ex:
        results = ex.map(h.identity, items, chunksize=chunksize, timeout=10)
        assert [next(results), next(results)] == [1, 2]
        with pytest.raises(CustomError) as info:   # the exception pickling raised
            next(results)
        assert "argument 0 (a Hazard)" in " ".join(info.value.__notes__)
        assert ex.submit(h.square, 5).result(timeout=30) == 25
