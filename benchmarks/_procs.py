"""Keeping the process tree clean: every process the benchmark starts ends with it.

The harness makes itself a child subreaper (Linux), so a grandchild orphaned by
a peer (a worker whose manager died, a forkserver, a resource tracker) is
re-parented to us and is still found, killed and reaped at the end.
"""

import ctypes
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36
#: Helper processes peers leave running on purpose until their parent exits.
EXPECTED_HELPERS = ("forkserver", "resource_tracker", "semaphore_tracker")


def make_subreaper():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[1])


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def descendants():
    """{pid: command line} of every process below this one."""
    if not os.path.isdir("/proc"):
        return {}
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            ppid = _parent_of(int(name))
            if ppid is not None:
                parents[int(name)] = ppid
    found, frontier = {}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = _cmdline(pid)
                frontier.append(pid)
    return found


def kill_leftovers(grace=2.0):
    """Kill and reap every remaining descendant; return {pid: command line} of
    those that were not expected helpers (forkserver, resource trackers)."""
    found = descendants()
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.01)
    return {pid: cmd for pid, cmd in found.items()
            if not any(helper in cmd for helper in EXPECTED_HELPERS)}
