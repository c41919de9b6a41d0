"""The parent process dies or is interrupted while its workers are busy.

Nothing may outlive it: the template notices the parent's death (EOF on its
control socket) and kills the workers; Ctrl-C turns into ``KeyboardInterrupt``
at once, with every process of the pool gone.
"""

import os
import signal
import time

import pytest
from conftest import reap_orphans

from . import scripts

#: Generous bounds for a loaded 2-core machine ("a few seconds" in the contract).
GONE_WITHIN = 10.0
WORKERS = 2

BUSY_THEN_SLEEP = """
    import time
    from forkexec import ForkExchangeExecutor
    from faults.tasks import announce_when_busy, sleep_for

    ex = ForkExchangeExecutor(%d)
    futures = [ex.submit(sleep_for, 60) for _ in range(8)]
    announce_when_busy(ex, %d)
    time.sleep(120)
""" % (WORKERS, WORKERS)

INTERRUPTED_MAP = """
    import sys, threading
    from forkexec import ForkExchangeExecutor
    from faults.tasks import announce_when_busy, sleep_for

    ex = ForkExchangeExecutor(%d)
    threading.Thread(target=announce_when_busy, args=(ex, %d), daemon=True).start()
    if sys.argv[1] == "with":
        with ex:
            list(ex.map(sleep_for, [60] * 8))
    else:
        list(ex.map(sleep_for, [60] * 8))
    print("map returned")
""" % (WORKERS, WORKERS)


def pool_pids(proc):
    """[parent, template, worker, worker]: what the script printed once the pool was busy."""
    line = scripts.read_line(proc)
    pids = [int(p) for p in line.split()] if line.replace(" ", "").isdigit() else []
    assert len(pids) == 2 + WORKERS, "unexpected line from the script: %r" % line
    assert pids[0] == proc.pid
    return pids


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_no_worker_or_template_outlives_a_killed_parent(signum):
    with scripts.start(BUSY_THEN_SLEEP) as proc:
        try:
            pids = pool_pids(proc)
            os.kill(proc.pid, signum)
            assert proc.wait(timeout=30) == -signum
            scripts.wait_gone(pids, GONE_WITHIN)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reap_orphans()


@pytest.mark.parametrize("block", ["with", "bare"])
@pytest.mark.parametrize("target", ["process", "group"])
def test_one_sigint_during_map_interrupts_promptly_and_leaves_nothing(block, target):
    """``target="group"`` is a terminal's Ctrl-C: the workers get SIGINT too."""
    with scripts.start(INTERRUPTED_MAP, [block], start_new_session=True) as proc:
        try:
            pids = pool_pids(proc)
            sent = time.monotonic()
            if target == "group":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                os.kill(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=GONE_WITHIN)
            took = time.monotonic() - sent
            stdout, stderr = proc.communicate()
            assert "KeyboardInterrupt" in stderr and "map returned" not in stdout, stderr
            assert code == -signal.SIGINT, stderr
            assert took < GONE_WITHIN, "the interrupted program took %.1fs to exit" % took
            assert scripts.alive(pids) == [], "the program exited, its pool did not"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reap_orphans()
