"""What the fault tests run in workers, and how they find and kill worker processes.

Tasks are module-level functions, so they pickle by reference. A fault task
misbehaves by a deterministic rule, so a test knows which futures must fail
and how; random SIGKILLs from outside come from a :class:`Killer` thread that
records every pid it killed.
"""

import ctypes
import faulthandler
import os
import random
import resource
import signal
import threading
import time
from concurrent.futures import TimeoutError as FuturesTimeout

#: Headroom over a worker's current address space when limiting it: enough to
#: run tasks, far too little for ALLOCATE_TOO_MUCH.
AS_HEADROOM = 256 << 20
ALLOCATE_TOO_MUCH = 4 << 30


def square(x):
    return x * x


def square_slowly(x, seconds=0.001, log=None):
    """x * x, a little later; with ``log``, first append "x pid" to that file."""
    if log is not None:
        note_start(log, x)
    time.sleep(seconds)
    return x * x


def note_start(log, x):
    # One short O_APPEND write: lines from many processes never interleave.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d %d\n" % (x, os.getpid()))
    finally:
        os.close(fd)


def read_starts(log):
    """{(x, pid)} of the tasks that started, from a ``note_start`` log."""
    try:
        with open(log) as f:
            return {tuple(int(v) for v in line.split()) for line in f}
    except FileNotFoundError:
        return set()


def sleep_for(seconds, value=None):
    time.sleep(seconds)
    return value


# -- faults, by kind ------------------------------------------------------------------
def segfault():
    faulthandler.disable()   # the crash is the point: no stack dump on the test's stderr
    ctypes.string_at(0)


def hard_exit(code=3):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def raise_memory_error():
    raise MemoryError("a task ran out of memory on purpose")


def allocate_too_much():
    """Under limit_address_space() this raises MemoryError instead of growing."""
    return len(bytearray(ALLOCATE_TOO_MUCH))


def limit_address_space():
    """A worker initializer: cap the address space a little above what is in use."""
    limit = vm_size() + AS_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


#: Fault kind -> (task, what the future raises, exit code or -signal of the worker).
#: A None exit code means the worker survives the fault.
FAULTS = {
    "segfault": (segfault, "WorkerDiedError", -signal.SIGSEGV),
    "os_exit": (hard_exit, "WorkerDiedError", 3),
    "sigkill": (kill_self, "WorkerDiedError", -signal.SIGKILL),
    "memory_error": (raise_memory_error, "MemoryError", None),
    "address_space": (allocate_too_much, "MemoryError", None),
}


def fault_at(i):
    """The deterministic fault rule: every 61st task misbehaves, cycling through the kinds."""
    if i % 61 != 7:
        return None
    kinds = sorted(FAULTS)
    return kinds[(i // 61) % len(kinds)]


def flow_task(i, log):
    """Task number ``i`` of a stream: note its start in ``log``, then square ``i`` slowly or
    misbehave as ``fault_at(i)`` says."""
    note_start(log, i)
    kind = fault_at(i)
    if kind is None:
        time.sleep(0.001)
        return i * i
    return FAULTS[kind][0]()


def unfinished(futures, timeout):
    """Wait for ``futures`` (at most ``timeout`` seconds in all); those not done by then.

    Waits on each future in turn rather than with ``concurrent.futures.wait``,
    so these tests do not depend on how the executor's futures notify waiters.
    """
    deadline = time.monotonic() + timeout
    for future in futures:
        try:
            future.exception(timeout=max(0.0, deadline - time.monotonic()))
        except FuturesTimeout:
            break
    return [f for f in futures if not f.done()]


# -- processes ----------------------------------------------------------------------
def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no %s in /proc/self/status" % field)


def vm_size():
    """This process's address space, in bytes."""
    return _status_bytes("VmSize")


def rss():
    """This process's resident memory, in bytes."""
    return _status_bytes("VmRSS")


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def process_table():
    """{pid: (ppid, state)} of every process on the system."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        table[int(name)] = (int(fields[1]), fields[0].decode())
    return table


def live_workers(root=None):
    """Pids of live workers below ``root``: grandchildren (children of the template)."""
    root = os.getpid() if root is None else root
    table = process_table()
    templates = {pid for pid, (ppid, _) in table.items() if ppid == root}
    return sorted(pid for pid, (ppid, state) in table.items()
                  if ppid in templates and state not in ("Z", "X"))


def descendants(root=None):
    """Pids of every process below ``root`` (default: this one), live or zombie."""
    root = os.getpid() if root is None else root
    table = process_table()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent]
        found += children
        frontier += children
    return sorted(found)


def announce_when_busy(ex, workers):
    """Print this process's pid and its descendants' once ``workers`` tasks are running.

    Runs in a script that a test then kills or interrupts.
    """
    deadline = time.monotonic() + 30
    while len(live_workers()) < workers or ex.statistics().running < workers:
        if time.monotonic() > deadline:
            print("the pool never got busy: %r" % (ex.statistics(),), flush=True)
            return
        time.sleep(0.01)
    print(" ".join(str(pid) for pid in [os.getpid()] + descendants()), flush=True)


class Killer(threading.Thread):
    """Sends SIGKILL to a random live worker every ``pause`` seconds (a random
    interval) until stopped or ``limit`` kills; ``killed`` lists the pids."""

    def __init__(self, seed, pause=(0.005, 0.03), limit=None):
        super().__init__(name="fault-killer", daemon=True)
        self.random = random.Random(seed)
        self.pause = pause
        self.limit = limit
        self.killed = []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(self.random.uniform(*self.pause)):
            if self.limit is not None and len(self.killed) >= self.limit:
                return
            workers = live_workers()
            if not workers:
                continue
            pid = self.random.choice(workers)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed.append(pid)

    def stop(self):
        self.stopping.set()
        self.join()
