"""Test guards: no test may leave a process, zombie, thread or descriptor behind.

The test process makes itself a child subreaper (Linux), so a grandchild
orphaned by a test (a worker whose template died, a detached background
process) is re-parented here and still counts as left behind.

multiprocessing's two long-lived helper processes, the resource tracker (any
spawn or forkserver start launches it) and the forkserver, are never counted as
left behind by a test; what runs below them (a pool's template started by the
forkserver, its workers) still is. A module whose tests start spawn or
forkserver pools uses the ``mp_helpers`` fixture: the helpers start before its
first test (so no test is blamed for them, their descriptors included) and are
stopped after its last (other suites, e.g. tests/faults, count every process
below pytest).
"""

import ctypes
import gc
import os
import signal
import threading
import time

import pytest

PR_SET_CHILD_SUBREAPER = 36
#: How long processes may take to disappear after a test before it fails.
GRACE = 10.0


def _make_subreaper():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


_make_subreaper()


def _stat(pid):
    """(ppid, state) of a process, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[1]), fields[0].decode()


def state_of(pid):
    """The /proc state letter of ``pid`` ("R", "S", "Z"...), or None if it is gone."""
    info = _stat(pid)
    return None if info is None else info[1]


def parent_of(pid):
    """The parent pid of ``pid`` (which must exist)."""
    return _stat(pid)[0]


def mp_helper_pids():
    """Pids of multiprocessing's long-lived helpers (resource tracker, forkserver) that
    this process started, whichever is running now (multiprocessing restarts a dead one)."""
    from multiprocessing import forkserver, resource_tracker
    pids = (getattr(resource_tracker._resource_tracker, "_pid", None),
            getattr(forkserver._forkserver, "_forkserver_pid", None))
    return {pid for pid in pids if pid is not None}


def start_mp_helpers():
    """Start the resource tracker and the forkserver now, before any test snapshots its
    processes and descriptors, so that a test starting a spawn or forkserver pool does not
    leave them behind (they would live as long as this process, by design)."""
    from multiprocessing import forkserver, resource_tracker
    resource_tracker.ensure_running()
    forkserver.ensure_running()


def stop_mp_helpers():
    """Stop the forkserver and the resource tracker (multiprocessing restarts them when
    next needed) and wait for them to exit."""
    from multiprocessing import forkserver, resource_tracker
    forkserver._forkserver._stop()
    resource_tracker._resource_tracker._stop()


def descendants(root=None):
    """{pid: state} of every process below ``root`` (default: this one), without
    multiprocessing's helper processes themselves (their children are included)."""
    root = os.getpid() if root is None else root
    helpers = mp_helper_pids()
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info:
                parents[int(name)] = info
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = state
                frontier.append(pid)
    for pid in helpers:
        found.pop(pid, None)
    return found


def open_fds():
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass
    return fds


def reap_orphans():
    """Reap zombies re-parented to this (subreaper) process; return their pids."""
    reaped = []
    for pid, state in descendants().items():
        if state == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
                reaped.append(pid)
            except ChildProcessError:
                pass
    return reaped


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            s != "Z" for s in descendants().values()):
        time.sleep(0.01)
    reap_orphans()


@pytest.fixture(scope="module")
def mp_helpers():
    """multiprocessing's resource tracker and forkserver, running for a module's tests
    (``pytestmark = pytest.mark.usefixtures("mp_helpers")``)."""
    start_mp_helpers()
    yield
    stop_mp_helpers()


@pytest.fixture(scope="module", autouse=True)
def frozen_heap():
    """Keep the garbage collections of ``no_leftovers`` cheap.

    A full collection walks every object the test process tracks; once pytest, hypothesis,
    numpy, scikit-learn and Dask are imported that is ~70 ms, and each test needs at least
    two (half of the suite's time went there). So: one full collection at the start of each
    module, after which ``gc.freeze()`` moves every surviving object to the permanent
    generation; ``no_leftovers`` freezes again after its collection before each test. Its
    collections then only walk what was made since, which is what a test can leave behind.

    Frozen objects that turn into cyclic garbage stay until the next module's full
    collection: that can only keep something alive longer (and so be reported as left
    behind), never hide a process, thread or descriptor a test leaves.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()   # the module's fixtures are gone: the next module collects them


@pytest.fixture(autouse=True)
def no_leftovers(request, frozen_heap):
    """Fail a test that leaves child processes, zombies, threads or fds behind."""
    gc.collect()
    gc.freeze()     # see frozen_heap: the collections below walk only what the test makes
    fds_before = open_fds()
    threads_before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + GRACE
    while True:
        gc.collect()
        procs = descendants()
        threads = [t for t in threading.enumerate()
                   if t not in threads_before and t.is_alive()]
        if (not procs and not threads) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    problems = []
    if procs:
        problems.append("processes left behind (pid: state): %r" % procs)
        kill_all(procs)
    if threads:
        problems.append("threads left behind: %r" % threads)
    fds = {fd: target for fd, target in open_fds().items()
           if fd not in fds_before or fds_before[fd] != target}
    # the readlink of /proc/self/fd itself may briefly show up
    fds = {fd: t for fd, t in fds.items() if "/proc/" not in t}
    if fds:
        # Reported, not closed: a still-live object owning the fd would later close
        # whatever reused that number.
        problems.append("file descriptors left open: %r" % fds)
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def executors():
    """executors(kind, *args, **kwargs) -> a new executor (kinds as in
    ``executor_helpers.executor_of``); every one is shut down after the test."""
    import executor_helpers
    created = []

    def factory(kind, *args, **kwargs):
        ex = executor_helpers.executor_of(kind, *args, **kwargs)
        created.append(ex)
        return ex

    yield factory
    for ex in created:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def make(kind, executors):
    """make(*args, **kwargs) -> an executor of the module's ``kind`` (a fixture each module
    parametrizes with its own kinds), shut down after the test."""
    def factory(*args, **kwargs):
        return executors(kind, *args, **kwargs)

    factory.kind = kind
    return factory


@pytest.fixture
def gate(tmp_path):
    """A gate file that blocked tasks wait on; always opened at the end of the test."""
    path = str(tmp_path / "gate")
    yield path
    open(path, "w").close()
