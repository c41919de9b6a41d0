"""Running a pool in a separate Python process, to kill it or starve it of resources."""

import os
import select
import subprocess
import sys
import textwrap
import time

from .tasks import process_table

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.dirname(TESTS)


def python_env():
    """An environment where a script imports forkexec and ``faults.tasks``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([MAIN, TESTS])
    env.pop("PYTHONWARNINGS", None)
    return env


def start(code, args=(), **popen_options):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=python_env(), **popen_options)


def run(code, timeout=60, args=(), **popen_options):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)] + list(args),
                          capture_output=True,
                          text=True, timeout=timeout, env=python_env(), **popen_options)


def read_line(proc, timeout=30.0):
    """The next line ``proc`` prints; fails (with its stderr) if none comes in time."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError("the script printed no line within %.0fs; stderr:\n%s"
                             % (timeout, err))
    return line.strip()


def alive(pids):
    """Those of ``pids`` that are still running (neither gone nor zombies)."""
    table = process_table()
    return sorted(p for p in pids if p in table and table[p][1] not in ("Z", "X"))


def wait_gone(pids, timeout):
    """Seconds until every one of ``pids`` has exited; AssertionError after ``timeout``."""
    started = time.monotonic()
    while alive(pids):
        if time.monotonic() - started > timeout:
            raise AssertionError("still alive after %.0fs: %r" % (timeout, alive(pids)))
        time.sleep(0.01)
    return time.monotonic() - started
