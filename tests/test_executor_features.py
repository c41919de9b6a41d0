"""What ForkExchangeExecutor does beyond the ProcessPoolExecutor contract.

Worker replacement (``on_worker_death="replace"``, ``max_tasks_per_child``
with fork), ``terminate_workers``/``kill_workers`` on every Python version,
``statistics()``, fork safety, and process hygiene: a forked child, a nested
executor, the parent's death, shutdown, and Ctrl-C.
"""

import collections
import concurrent.futures
import os
import select
import signal
import sys
import textwrap
import threading
import time
import warnings
from concurrent.futures.process import BrokenProcessPool

import pytest

import executor_helpers as h
import interpreters
from conftest import descendants, reap_orphans
from forkexec import ExecutorStatistics, ForkExchangeExecutor, WorkerDiedError

pytestmark = pytest.mark.timeout(90)

PROMPTLY = 5.0


def exchange_threads():
    return [t for t in threading.enumerate() if t.name == "forkexec-exchange" and t.is_alive()]


# -- worker replacement -------------------------------------------------------------------
def test_replace_policy_fails_only_the_killed_workers_task(tmp_path):
    started = str(tmp_path / "started")
    with ForkExchangeExecutor(2, on_worker_death="replace") as ex:
        victim = ex.submit(h.announce_and_sleep, started, 30)
        others = [ex.submit(h.sleep_and_return, 0.01, i) for i in range(20)]
        pid = h.read_pid(started)
        assert ex.statistics().workers_replaced == 0
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError) as info:
            victim.result(timeout=30)
        assert isinstance(info.value, BrokenProcessPool)
        assert str(pid) in str(info.value) and "SIGKILL" in str(info.value)
        assert [f.result(timeout=30) for f in others] == list(range(20))
        later = set(ex.map(h.getpid, range(10)))
        assert pid not in later
        assert ex.statistics().workers_replaced == 1


def test_replace_policy_survives_a_task_that_exits_the_worker():
    with ForkExchangeExecutor(1, on_worker_death="replace") as ex:
        doomed = ex.submit(h.misbehave, "os_exit")
        fine = ex.submit(h.square, 7)
        with pytest.raises(BrokenProcessPool, match="exit code 3"):
            doomed.result(timeout=30)
        assert fine.result(timeout=30) == 49


def test_max_tasks_per_child_replaces_retired_workers_with_fork():
    # Intentional difference: ProcessPoolExecutor refuses max_tasks_per_child
    # with a fork context (and before Python 3.11 has no such argument).
    with pytest.raises((ValueError, TypeError)):
        h.new_executor("stdlib", 2, max_tasks_per_child=2)
    with ForkExchangeExecutor(2, max_tasks_per_child=2) as ex:
        pids = [f.result(timeout=60) for f in [ex.submit(h.getpid) for _ in range(40)]]
        replaced = ex.statistics().workers_replaced
    per_worker = collections.Counter(pids)
    assert max(per_worker.values()) <= 2
    assert len(per_worker) >= 20
    assert replaced >= 18


# -- stopping workers ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers_stop_everything_promptly(method, tmp_path):
    ex = ForkExchangeExecutor(2)
    try:
        assert sum(ex.map(h.square, range(8))) == 140    # both workers are up
        running = []
        for i in range(2):     # one at a time, so each lands on its own worker
            mark = str(tmp_path / ("started%d" % i))
            running.append(ex.submit(h.announce_and_sleep, mark, 30))
            h.read_pid(mark)
        queued = [ex.submit(h.square, i) for i in range(5)]
        began = time.monotonic()
    finally:
        getattr(ex, method)()
    assert time.monotonic() - began < PROMPTLY
    assert descendants() == {}, "processes survived %s()" % method
    assert not exchange_threads()
    for future in running:
        assert isinstance(future.exception(timeout=0), BrokenProcessPool)
    assert all(f.done() for f in queued)
    with pytest.raises(RuntimeError):
        ex.submit(h.square, 1)


def test_kill_workers_on_an_unused_executor_is_harmless():
    ex = ForkExchangeExecutor(2)
    ex.kill_workers()
    with pytest.raises(RuntimeError):
        ex.submit(h.square, 1)


# -- statistics ---------------------------------------------------------------------------
def test_processes_lists_live_workers_like_the_stdlib(tmp_path):
    """Suites written for ProcessPoolExecutor reach for ``_processes``: it must show the
    live workers, and terminating one through it breaks the pool with its pid named."""
    ex = ForkExchangeExecutor(2)
    try:
        started = [str(tmp_path / ("started%d" % i)) for i in range(2)]
        gates = [str(tmp_path / ("gate%d" % i)) for i in range(2)]
        running = [ex.submit(h.wait_for_gate, g, s) for g, s in zip(gates, started)]
        pids = [h.read_pid(s) for s in started]
        handles = ex._processes
        assert set(handles) == set(pids) and all(p.is_alive() for p in handles.values())
        victim = handles[pids[0]]
        victim.terminate()
        victim.join(PROMPTLY)
        assert not victim.is_alive()
        with pytest.raises(BrokenProcessPool, match=r"pid %d\).*SIGTERM" % pids[0]):
            running[0].result(timeout=PROMPTLY)
    finally:
        for g in gates:
            open(g, "w").close()
        ex.shutdown()
    assert ex._processes == {}
    assert all(not p.is_alive() for p in handles.values())


def test_statistics_is_a_frozen_snapshot_with_the_right_counts(gate, tmp_path):
    with ForkExchangeExecutor(1) as ex:
        idle = ex.statistics()
        assert isinstance(idle, ExecutorStatistics)
        assert (idle.queued, idle.running, idle.completed, idle.failed) == (0, 0, 0, 0)
        with pytest.raises(AttributeError):
            idle.completed = 5

        done = [ex.submit(h.square, i) for i in range(10)]
        failed = [ex.submit(h.fail_at, 1, 1) for _ in range(3)]
        concurrent.futures.wait(done + failed, timeout=30)
        settled = ex.statistics()
        assert (settled.workers_alive, settled.queued, settled.running, settled.completed,
                settled.failed, settled.workers_replaced) == (1, 0, 0, 10, 3, 0)

        started = str(tmp_path / "started")
        blocked = ex.submit(h.wait_for_gate, gate, started)
        waiting = [ex.submit(h.square, i) for i in range(5)]
        h.read_pid(started)
        busy = ex.statistics()
        assert busy.running >= 1 and busy.running + busy.queued == 6
        open(gate, "w").close()
        concurrent.futures.wait(waiting + [blocked], timeout=30)
        assert ex.statistics().completed == 16
        # The earlier snapshots did not move.
        assert (settled.completed, busy.completed) == (10, 10)


# -- processes ----------------------------------------------------------------------------
def test_executor_used_in_a_forked_child_raises_a_clear_error():
    ex = ForkExchangeExecutor(1)
    assert ex.submit(h.square, 2).result(timeout=30) == 4
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():   # Python 3.12+: this fork of a threaded process is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            report = []
            for attempt in (lambda: ex.submit(h.square, 3), lambda: ex.map(h.square, [1])):
                try:
                    attempt()
                    report.append("no error")
                except Exception as exc:
                    report.append("%s: %s" % (type(exc).__name__, exc))
            ex.shutdown(wait=True)   # must return: the child owns nothing
            os.write(write_end, "\n".join(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 30)
        report = os.read(read_end, 65536).decode() if ready else ""
    finally:
        os.close(read_end)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        ex.shutdown(wait=True)
    assert ready, "the child hung using the parent's executor"
    lines = report.split("\n")
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("RuntimeError: ") and str(os.getpid()) in line, line


def test_a_task_may_run_its_own_executor():
    with ForkExchangeExecutor(2) as ex:
        total, worker_pid = ex.submit(h.nested_executor_sum, 10).result(timeout=60)
    assert total == sum(i * i for i in range(10))
    assert worker_pid != os.getpid()


def test_no_helper_process_survives_shutdown():
    ex = ForkExchangeExecutor(2, on_worker_death="replace", max_tasks_per_child=3)
    assert sum(ex.map(h.square, range(20))) == sum(i * i for i in range(20))
    with pytest.raises(BrokenProcessPool):
        ex.submit(h.misbehave, "os_exit").result(timeout=30)
    h.wait_until(lambda: ex.statistics().workers_alive == 2, 10, "the replacement worker")
    ex.shutdown(wait=True)
    assert descendants() == {}
    assert not exchange_threads()


def test_shutdown_while_workers_are_still_starting_is_prompt():
    # Workers may still be starting when shutdown() comes: at first (one quick task
    # on four workers) or after a replacement. The window is narrow, so try a few
    # times; each try takes milliseconds.
    for policy in ["break", "replace"]:
        for _ in range(5):
            ex = ForkExchangeExecutor(4, on_worker_death=policy)
            if policy == "replace":
                with pytest.raises(BrokenProcessPool):
                    ex.submit(h.misbehave, "os_exit").result(timeout=30)
            else:
                assert ex.submit(h.square, 2).result(timeout=30) == 4
            began = time.monotonic()
            ex.shutdown(wait=True)
            assert time.monotonic() - began < PROMPTLY, policy
            assert descendants() == {}


def test_workers_die_with_a_parent_that_started_the_pool_from_a_short_lived_thread():
    script = textwrap.dedent("""
        import threading, time
        import executor_helpers as h
        from forkexec import ForkExchangeExecutor
        ex = ForkExchangeExecutor(2)
        starter = threading.Thread(target=lambda: ex.submit(h.square, 2).result())
        starter.start()
        starter.join()
        # The thread that forked the template is gone; the pool must still work.
        assert ex.submit(h.square, 3).result(timeout=30) == 9
        busy = [ex.submit(h.sleep_and_return, 60) for _ in range(2)]
        print("ready", flush=True)
        time.sleep(60)
    """)
    with h.start_script(script) as proc:
        try:
            assert h.read_line(proc) == "ready", proc.stderr.read()
            h.wait_until(lambda: len(descendants(proc.pid)) >= 3, 10,
                         "a template and 2 busy workers")
        finally:
            proc.kill()
            proc.communicate(timeout=30)
    # The orphans are re-parented to us (a subreaper): they must all exit soon.
    h.wait_until(lambda: all(state == "Z" for state in descendants().values()), PROMPTLY,
                 "the dead parent's template and workers to exit")
    reap_orphans()
    assert descendants() == {}


FORK_WARNING_SCRIPT = textwrap.dedent("""
    import os, sys, threading
    import executor_helpers as h
    from forkexec import ForkExchangeExecutor
    ex = ForkExchangeExecutor(2, max_tasks_per_child=2, on_worker_death="replace")
    ex.submit(h.square, 1).result(timeout=30)      # the template is forked now
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    assert sum(ex.map(h.square, range(12))) == sum(i * i for i in range(12))
    try:
        ex.submit(h.misbehave, "os_exit").result(timeout=30)
    except Exception as exc:
        print("died:", type(exc).__name__, flush=True)
    assert sum(ex.map(h.square, range(6))) == sum(i * i for i in range(6))
    print("replaced:", ex.statistics().workers_replaced, flush=True)
    ex.shutdown(wait=True)
    # Control: forking this multi-threaded process directly does warn.
    print("CONTROL", file=sys.stderr, flush=True)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    stop.set()
    other.join()
""")


def fork_warning_python():
    """A pyenv interpreter whose fork() warns in a multi-threaded process (3.12+): the
    newest patch of the newest such minor version other than this interpreter's own
    (else of this one's), or None."""
    newest = interpreters.newest_pythons(since=interpreters.FORK_WARNING_SINCE)
    others = {minor: python for minor, python in newest.items()
              if minor != sys.version_info[:2]}
    choice = others or newest
    return choice[max(choice)] if choice else None


@pytest.mark.parametrize("python", ["current", "pyenv"])
def test_worker_replacement_while_threads_run_gives_no_fork_warning(python):
    if python == "current":
        if sys.version_info < interpreters.FORK_WARNING_SINCE:
            pytest.skip("Python %d.%d has no multi-threaded fork() warning; the pyenv "
                        "variant covers it" % sys.version_info[:2])
        executable = sys.executable
    else:
        executable = fork_warning_python()
        if executable is None:
            interpreters.skip_or_fail(
                "no Python %d.%d or newer under %s/versions to check the fork() warning "
                "with" % (interpreters.FORK_WARNING_SINCE + (interpreters.pyenv_root(),)))
    proc = h.run_script(FORK_WARNING_SCRIPT, python=executable, args=["-W", "always"])
    assert proc.returncode == 0, proc.stderr
    assert "died: WorkerDiedError" in proc.stdout
    replaced = int(proc.stdout.split("replaced:")[1].split()[0])
    assert replaced >= 5, proc.stdout
    before, _, after = proc.stderr.partition("CONTROL")
    assert "use of fork()" in after, "the control fork did not warn: %r" % proc.stderr
    assert "use of fork()" not in before, before


def test_one_ctrl_c_stops_map_inside_with_block_within_seconds():
    script = textwrap.dedent("""
        import executor_helpers as h
        from forkexec import ForkExchangeExecutor
        with ForkExchangeExecutor(2) as ex:
            ex.submit(h.square, 1).result(timeout=30)
            print("ready", flush=True)
            for value in ex.map(h.sleep_and_return, [60] * 8):
                print("got", value, flush=True)
        print("not interrupted", flush=True)
    """)
    with h.start_script(script, start_new_session=True) as proc:
        assert h.read_line(proc) == "ready", proc.stderr.read()
        h.wait_until(lambda: len(descendants(proc.pid)) >= 3, 10, "the workers to start")
        began = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)     # what a terminal's Ctrl-C does
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - began
    assert took < PROMPTLY, "Ctrl-C took %.1fs" % took
    assert "KeyboardInterrupt" in err and "Traceback" in err, err
    assert "not interrupted" not in out and "got" not in out
    assert proc.returncode != 0
    leftover = {pid: s for pid, s in descendants().items() if s != "Z"}
    reap_orphans()
    assert leftover == {}
