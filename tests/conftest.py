"""Test guards: no test may leave a process, zombie, thread or descriptor behind.

The test process makes itself a child subreaper (Linux), so a grandchild
orphaned by a test (a worker whose template died, a detached background
process) is re-parented here and still counts as left behind.
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


def descendants(root=None):
    """{pid: state} of every process below ``root`` (default: this one)."""
    root = os.getpid() if root is None else root
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


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """Fail a test that leaves child processes, zombies, threads or fds behind."""
    gc.collect()
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
