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


# -- tasks of test_executor_exactness ------------------------------------------------------
class Payload:
    """A result object a test can hold a weak reference to."""

    def __init__(self, value):
        self.value = value


def make_payload(value):
    return Payload(value)


def append_and_len(items):
    """Mutate the argument: each call must see its own copy, as if submitted alone."""
    items.append(1)
    return len(items)


def nap(seconds, log=None):
    """Sleep; with ``log``, record ``pid,start,end`` (monotonic, system-wide on Linux)."""
    start = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    if log is not None:
        append_line(log, "%d,%.6f,%.6f" % (os.getpid(), start, end))
    return seconds


def gated_log(log, value, gate=None):
    """Wait for ``gate`` (if any), then record ``value``: the record proves it ran."""
    if gate is not None:
        wait_for_gate(gate)
    append_line(log, value)
    return value


def log_with_pid(log, value, seconds):
    """Record ``value:pid`` as the task starts, then sleep."""
    append_line(log, "%s:%d" % (value, os.getpid()))
    time.sleep(seconds)
    return value


class _SlowFlush:
    """A stdout whose first flush() announces itself, then blocks: a worker flushing it
    has finished its task but not yet sent the result."""

    def __init__(self, marker, real):
        self.marker = marker
        self.real = real

    def write(self, text):
        return len(text)

    def flush(self):
        if self.marker is not None:
            marker, self.marker = self.marker, None
            write_atomic(marker, str(os.getpid()))
            time.sleep(GATE_LIMIT)


def finish_then_stall_in_flush(log, marker, value):
    """Record that the task ran, return; the worker then stalls flushing stdout."""
    append_line(log, value)
    sys.stdout = _SlowFlush(marker, sys.stdout)
    return value


class _BoomStream:
    def write(self, text):
        return len(text)

    def flush(self):
        raise RuntimeError("boom")


def break_stdout():
    """A task that returns fine but leaves a stdout whose flush() raises."""
    sys.stdout = _BoomStream()
    return 1


def _write_and_exit(path, signum, frame):
    write_atomic(path, str(os.getpid()))
    os._exit(0)


def install_sigterm_writer(path):
    """An initializer: on SIGTERM, write ``path`` and exit."""
    import functools
    import signal
    signal.signal(signal.SIGTERM, functools.partial(_write_and_exit, path))


def ignore_sigterm():
    """An initializer: SIGTERM does nothing to this worker."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def read_stdin(raw=True):
    """What a task gets from stdin: (sys.stdin.read(), os.read(0, 10) if ``raw``)."""
    text = sys.stdin.read() if sys.stdin is not None else None
    if not raw:
        return text, None
    try:
        data = os.read(0, 10)
    except OSError as exc:
        data = "OSError %d" % exc.errno
    return text, data


def start_sleeper(new_session=False):
    """Start ``sleep 60`` from the task; return (its pid, the worker's pid)."""
    child = subprocess.Popen(["sleep", "60"], start_new_session=new_session)
    child.returncode = 0   # never waited for by this process: keep Popen.__del__ quiet
    return child.pid, os.getpid()


# -- start methods ------------------------------------------------------------------------
#: Executor kinds beyond new_executor's: "<stdlib|forkexec>-<start method>".
START_METHODS = ("fork", "spawn", "forkserver")


def executor_of(kind, *args, **kwargs):
    """Like new_executor, and also "stdlib-spawn", "forkexec-forkserver" and so on: the
    executor with ``mp_context=multiprocessing.get_context(method)``."""
    base, _, method = kind.partition("-")
    if not method:
        return new_executor(kind, *args, **kwargs)
    if base not in ("stdlib", "forkexec") or method not in START_METHODS:
        raise ValueError("unknown executor kind %r" % (kind,))
    context = multiprocessing.get_context(method)
    if base == "stdlib":
        return concurrent.futures.ProcessPoolExecutor(*args, mp_context=context, **kwargs)
    return ForkExchangeExecutor(*args, mp_context=context, **kwargs)


def run_file(path, args=(), timeout=60, python=None):
    """Run the script file ``path`` as ``python path args...`` (its ``__main__`` has a
    ``__file__``, as spawn needs to find its functions); return the CompletedProcess."""
    return subprocess.run([python or sys.executable, str(path)] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout, env=python_env(),
                          cwd=os.path.dirname(str(path)))


#: A module-level global: tests mutate it in the parent to see which workers inherit it.
STATE = {"value": "as imported"}


def read_state(_=None):
    return STATE["value"]


def start_method_here(_=None):
    """The start method ``multiprocessing`` reports in this process (without fixing one)."""
    return multiprocessing.get_start_method(allow_none=True)


def sys_path_here(_=None):
    return list(sys.path)


# -- multiprocessing recipes (tests/test_mp_children.py) ----------------------------------
def log_to_queue(queue):
    """An initializer: send every log record of this worker to ``queue`` (QueueHandler)."""
    import logging
    import logging.handlers
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(queue)]
    root.setLevel(logging.INFO)


def log_message(i):
    import logging
    logging.getLogger("forkexec-tests.task").info("task %d in %d", i, os.getpid())
    return os.getpid()


#: Manager proxies a worker uses: set by keep_proxies (initializer) or by the parent.
PROXIES = {}


def keep_proxies(shared_list):
    """An initializer: keep the manager's list proxy passed through initargs."""
    PROXIES["list"] = shared_list


def update_proxies(i):
    """Append to the list proxy from initargs and set an item of the dict proxy that the
    parent put in PROXIES before the pool started."""
    PROXIES["list"].append((i, os.getpid()))
    PROXIES["dict"][i] = os.getpid()
    return os.getpid()


def process_identity(_=None):
    """How ``multiprocessing`` sees this process, and what a MainProcess guard would do."""
    current = multiprocessing.current_process()
    parent = multiprocessing.parent_process()
    guard_ran = False
    if multiprocessing.current_process().name == "MainProcess":
        guard_ran = True
    return {"pid": os.getpid(), "ppid": os.getppid(), "name": current.name,
            "parent_pid": None if parent is None else parent.pid,
            "parent_alive": None if parent is None else parent.is_alive(),
            "guard_ran": guard_ran, "identity": list(current._identity)}


def register_finalizer(directory):
    """An initializer: a multiprocessing.util.Finalize that writes ``finalized-<pid>``
    in ``directory`` when this worker exits; ``started-<pid>`` is written now."""
    from multiprocessing import util
    write_atomic(os.path.join(directory, "started-%d" % os.getpid()), "")
    util.Finalize(None, write_atomic,
                  args=(os.path.join(directory, "finalized-%d" % os.getpid()), ""),
                  exitpriority=10)


def append_pid(path):
    """A finalizer callback: one line with the pid of the process running it."""
    append_line(path, os.getpid())


def reap_orphaned_helpers(timeout=10.0):
    """After a script that used spawn or forkserver has exited: its multiprocessing helpers
    (resource tracker, forkserver) outlive it by design, exit once it is gone, and are
    re-parented to the test process (a subreaper), which reaps them here. A process of the
    script still running after ``timeout`` seconds fails the test."""
    from conftest import descendants, reap_orphans   # the test process only
    wait_until(lambda: all(state == "Z" for state in descendants().values()), timeout,
               "the script's processes to exit")
    reap_orphans()


# -- tasks of test_executor_regressions ---------------------------------------------------
def sigint_is_default(_=None):
    """True if SIGINT in this process raises KeyboardInterrupt, as in a stdlib worker."""
    import signal
    return signal.getsignal(signal.SIGINT) is signal.default_int_handler


def interrupt_a_child(limit):
    """Start ``python -c "time.sleep(10)"``, send it SIGINT at once; return the seconds it
    took to end, or None if it was still alive after ``limit`` seconds (then killed)."""
    import signal
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    start = time.monotonic()
    child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return None
    return time.monotonic() - start


def fd_targets(_=None):
    """What every open descriptor of this process points to (``/proc/self/fd``)."""
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink("/proc/self/fd/" + name))
        except OSError:   # the listing's own descriptor, closed by now
            pass
    return targets


def sleep_and_pid(seconds, value):
    """Sleep; return ``(value, pid)``."""
    time.sleep(seconds)
    return value, os.getpid()
