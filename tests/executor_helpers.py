"""What the executor tests send to worker processes, and how they watch them.

Everything a worker runs is a module-level function or a picklable class, so
it pickles by reference in any process: forkexec's workers, the standard
executor's workers, and ``python -c`` scripts run with tests/ on PYTHONPATH.
Tasks and the test talk through files in a temporary directory: a task
announces that it started by writing a file, and waits on a "gate" file that
the test creates to let it go.
"""

import concurrent.futures
import ctypes
import faulthandler
import multiprocessing
import os
import select
import subprocess
import sys
import time

from forkexec import ForkExchangeExecutor

MAIN = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(MAIN, "tests")
#: How long a task waits on a gate before giving up (a test bug, never a hang).
GATE_LIMIT = 30.0
POLL = 0.005


def new_executor(kind, *args, **kwargs):
    """A ProcessPoolExecutor with a fork context ("stdlib") or a ForkExchangeExecutor."""
    if kind == "stdlib":
        return concurrent.futures.ProcessPoolExecutor(
            *args, mp_context=multiprocessing.get_context("fork"), **kwargs)
    return ForkExchangeExecutor(*args, **kwargs)


def wait_until(predicate, timeout=10.0, what="condition"):
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(POLL)


def write_atomic(path, text):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def read_pid(path, timeout=10.0):
    """The pid a task wrote to ``path`` once it started (waits for the file)."""
    wait_until(lambda: os.path.exists(path), timeout, "a task to write %s" % path)
    with open(path) as f:
        return int(f.read())


def append_line(path, text):
    # One short O_APPEND write per line: lines from many processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, ("%s\n" % text).encode())
    finally:
        os.close(fd)


def read_lines(path):
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


# -- tasks --------------------------------------------------------------------------------
def square(x):
    return x * x


def add(x, y):
    return x + y


def getpid(_=None):
    return os.getpid()


def record_call(*args, **kwargs):
    return args, kwargs


def sleep_and_return(seconds, value=None):
    time.sleep(seconds)
    return value


def raise_value_error_in_task(message):
    raise ValueError(message)


def fail_at(x, bad):
    if x == bad:
        raise ValueError("bad item %r" % (x,))
    return x * 10


def wait_for_gate(gate, started=None, value=None):
    """Announce (pid in ``started``), then block until the file ``gate`` exists."""
    if started is not None:
        write_atomic(started, str(os.getpid()))
    deadline = time.monotonic() + GATE_LIMIT
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise RuntimeError("gate %s never opened" % gate)
        time.sleep(POLL)
    return value


def log_and_sleep(log, value, seconds):
    append_line(log, value)
    time.sleep(seconds)
    return value


def announce_and_sleep(started, seconds):
    write_atomic(started, str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def rendezvous(directory, count, timeout):
    """Check in, then wait until ``count`` tasks have: True if they all met in time."""
    write_atomic(os.path.join(directory, "%d-%d" % (os.getpid(), time.monotonic_ns())), "")
    deadline = time.monotonic() + timeout
    while len([n for n in os.listdir(directory) if not n.endswith(".tmp")]) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def count_peers(directory, seconds):
    """Stay checked in for ``seconds``; return the most tasks seen checked in at once."""
    mine = os.path.join(directory, "%d-%d" % (os.getpid(), time.monotonic_ns()))
    write_atomic(mine, "")
    most = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        most = max(most, len([n for n in os.listdir(directory) if not n.endswith(".tmp")]))
        time.sleep(POLL)
    os.unlink(mine)
    return most


def record_pid(path):
    """An initializer: one line per worker start."""
    append_line(path, os.getpid())


def failing_initializer():
    raise RuntimeError("initializer refuses")


def print_line(value):
    # One write per line: with PYTHONUNBUFFERED, print() writes the newline separately
    # and lines from two workers could interleave.
    sys.stdout.write("task-output %s\n" % value)
    sys.stdout.flush()
    return value


def nested_executor_sum(n):
    """A task that runs its own ForkExchangeExecutor inside the worker."""
    with ForkExchangeExecutor(2) as inner:
        return sum(inner.map(square, range(n))), os.getpid()


class CountingInput:
    """An endless-if-need-be input that counts how many items were taken from it."""

    def __init__(self, limit):
        self.limit = limit
        self.taken = 0

    def __iter__(self):
        while self.taken < self.limit:
            self.taken += 1
            yield self.taken - 1


# -- misbehaviour -------------------------------------------------------------------------
class CustomError(Exception):
    pass


def misbehave(how):
    """Do the bad thing named ``how`` in this process."""
    if how == "error":
        raise CustomError("misbehaving on purpose")
    if how == "exit":
        sys.exit(7)
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "os_exit":
        os._exit(3)
    if how == "segv":
        faulthandler.disable()   # the crash is the point: no stack dump on stderr
        ctypes.string_at(0)
    raise AssertionError("unknown misbehaviour %r" % how)


def _rebuild(when, how):
    if when == "unpickle":
        misbehave(how)
    return Hazard(when, how)


class Hazard:
    """A callable that misbehaves (``how``) when pickled or unpickled (``when``)."""

    def __init__(self, when, how):
        self.when = when
        self.how = how

    def __reduce__(self):
        if self.when == "pickle":
            misbehave(self.how)
        return _rebuild, (self.when, self.how)

    def __call__(self, *args):
        return "called"

    def __repr__(self):
        return "Hazard(%r, %r)" % (self.when, self.how)


def return_hazard(when, how):
    return Hazard(when, how)


def identity(x):
    return x


# -- subprocesses -------------------------------------------------------------------------
def python_env():
    """An environment where a ``python -c`` script imports forkexec and these helpers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [MAIN, TESTS] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("PYTHONWARNINGS", None)
    return env


def run_script(code, timeout=60, python=None, args=()):
    """Run ``code`` in a fresh interpreter; return the CompletedProcess (text)."""
    return subprocess.run([python or sys.executable] + list(args) + ["-c", code],
                          capture_output=True, text=True, timeout=timeout, env=python_env())


def start_script(code, python=None, args=(), **popen_options):
    """Start ``code`` in a fresh interpreter, stdout and stderr piped (text)."""
    return subprocess.Popen([python or sys.executable] + list(args) + ["-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=python_env(), **popen_options)


def read_line(proc, timeout=30.0):
    """The next line a started script prints, waiting at most ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError("the script printed nothing for %.0fs" % timeout)
    return proc.stdout.readline().strip()
