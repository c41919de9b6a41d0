"""Worker lifecycle: the finalizer, ``worker_state()``, the idle timeout and the memory
ceiling. The finalizer proves it ran by appending its worker's pid to a file."""

import os

import pytest

import executor_helpers as h
import forkexec
from forkexec import ForkExchangeExecutor

pytestmark = pytest.mark.timeout(90)


def write_pid(path):
    h.append_line(path, os.getpid())


def remember_pid_in_state(path):
    forkexec.worker_state()["log"] = path


def log_state_pid():
    h.append_line(forkexec.worker_state()["log"], os.getpid())


def count_in_state():
    state = forkexec.worker_state()
    state["n"] = state.get("n", 0) + 1
    return os.getpid(), state["n"], state.get("log")


_hog = []


def grow(megabytes):
    """Keep ``megabytes`` more memory (touched) alive in this worker."""
    _hog.append(b"\1" * (megabytes << 20))
    return os.getpid()


def worker_rss(_=None):
    return forkexec._lifecycle.rss_bytes()


def pids_in(path):
    return [int(p) for p in h.read_lines(path)]


def test_finalizer_runs_once_per_worker_on_retire_and_on_shutdown(tmp_path):
    path = str(tmp_path / "final")
    with ForkExchangeExecutor(1, max_tasks_per_child=2, finalizer=write_pid,
                              finalargs=(path,)) as ex:
        pids = [ex.submit(h.getpid).result(timeout=30) for _ in range(4)]
        # Two workers ran two tasks each and retired: their finalizers ran then.
        retired = sorted(set(pids))
        assert len(retired) == 2
        h.wait_until(lambda: sorted(pids_in(path)) == retired, what="retired finalizers")
        last = ex.submit(h.getpid).result(timeout=30)
    finals = pids_in(path)
    assert sorted(finals) == sorted(retired + [last])   # the last one at shutdown; once each


def test_worker_state_lives_with_its_worker_from_initializer_to_finalizer(tmp_path):
    path = str(tmp_path / "final")
    with ForkExchangeExecutor(1, initializer=remember_pid_in_state, initargs=(path,),
                              finalizer=log_state_pid, max_tasks_per_child=3) as ex:
        seen = [ex.submit(count_in_state).result(timeout=30) for _ in range(5)]
    first, second = seen[0][0], seen[3][0]
    assert first != second
    # Each worker starts with an empty state (bar what its initializer put there).
    assert seen == [(first, 1, path), (first, 2, path), (first, 3, path),
                    (second, 1, path), (second, 2, path)]
    assert sorted(pids_in(path)) == sorted([first, second])


def test_worker_state_outside_a_worker_is_a_clear_error():
    with pytest.raises(RuntimeError, match="only available in a task, initializer or "
                                           "finalizer running in a ForkExchangeExecutor"):
        forkexec.worker_state()


def test_a_failing_finalizer_is_reported_and_costs_nothing(tmp_path, capfd):
    with ForkExchangeExecutor(1, finalizer=h.raise_value_error_in_task,
                              finalargs=("finalizer boom",)) as ex:
        assert ex.submit(h.square, 2).result(timeout=30) == 4
    err = capfd.readouterr().err
    assert "the finalizer" in err and "finalizer boom" in err


def test_idle_workers_exit_and_come_back_on_demand(tmp_path):
    path = str(tmp_path / "final")
    with ForkExchangeExecutor(2, idle_timeout=0.3, finalizer=write_pid,
                              finalargs=(path,)) as ex:
        pids = set(ex.map(h.getpid, range(4)))
        h.wait_until(lambda: ex.statistics().workers_alive == 0, what="idle workers to exit")
        retired = set(pids_in(path))
        assert pids <= retired   # their finalizers ran on the way out
        later = ex.submit(h.getpid).result(timeout=30)
        assert later not in retired
        assert ex.statistics().workers_retired_idle >= len(pids)
        assert ex.statistics().workers_alive >= 1


def test_a_worker_past_its_memory_ceiling_is_recycled_between_tasks(tmp_path):
    with ForkExchangeExecutor(1) as probe:
        baseline = probe.submit(worker_rss).result(timeout=30)
    ceiling = baseline + (64 << 20)
    path = str(tmp_path / "final")
    with ForkExchangeExecutor(1, max_memory=ceiling, finalizer=write_pid,
                              finalargs=(path,)) as ex:
        small = [ex.submit(h.getpid).result(timeout=30) for _ in range(3)]
        assert len(set(small)) == 1   # under the ceiling: the same worker
        grown = ex.submit(grow, 128).result(timeout=30)
        assert grown == small[0]      # the task that grew it finished normally
        after = ex.submit(h.getpid).result(timeout=30)
        assert after != grown         # ...and its worker was replaced before the next one
        assert ex.statistics().workers_retired_memory == 1
        assert pids_in(path) == [grown]   # it retired: its finalizer ran


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_memory=0), ValueError, "max_memory must be a positive number of bytes, not 0"),
    (dict(max_memory=1.5), TypeError, "max_memory must be a number of bytes"),
    (dict(idle_timeout=-2), ValueError, "idle_timeout must be a positive"),
    (dict(finalizer=3), TypeError, "finalizer must be a callable, not 3"),
    (dict(finalargs=5), TypeError, "finalargs must be an iterable"),
])
def test_bad_lifecycle_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match="^" + message):
        ForkExchangeExecutor(1, **kwargs)
