"""The native API's task control: ``task_timeout=`` and ``progress=`` on ``Exchange``,
``Queue``, ``Map`` and ``pmap``."""

import io
import sys
import time

import pytest

import executor_helpers as h
import forkexec
from forkexec import TaskTimeout

pytestmark = pytest.mark.timeout(60)


def log_sleep(log, name, seconds):
    h.append_line(log, name)
    time.sleep(seconds)
    return name


def test_pmap_task_timeout_fails_only_the_late_item_and_runs_each_once(tmp_path):
    log = str(tmp_path / "log")
    names = ["a", "late", "b", "c"]
    secs = {"a": 0.05, "late": 30, "b": 0.05, "c": 0.05}
    results = forkexec.pmap(lambda n: log_sleep(log, n, secs[n]), names, limit=4,
                            task_timeout=0.5)
    assert results[0] == "a"
    with pytest.raises(TaskTimeout, match="ran longer than its task_timeout of 0.5 seconds; "
                                          "its child process [0-9]+ was killed") as info:
        results[1]
    assert isinstance(info.value, TimeoutError) and info.value.timeout == 0.5
    assert results[2:] == ["b", "c"]
    assert sorted(h.read_lines(log)) == sorted(names)


def test_queue_task_timeout_reports_in_arrival_order(tmp_path):
    log = str(tmp_path / "log")
    queue = forkexec.Queue(limit=2, task_timeout=0.5)
    for name, seconds in (("quick", 0.05), ("late", 30), ("next", 0.1)):
        queue.start(forkexec.MakeParallel(log_sleep), log, name, seconds)
    got = []
    while True:
        try:
            got.append(next(queue))
        except StopIteration:
            break
        except TaskTimeout as exc:
            got.append("timeout: " + exc.function)
    assert got == ["quick", "next", "timeout: log_sleep"]
    assert sorted(h.read_lines(log)) == ["late", "next", "quick"]


def test_progress_on_pmap_and_queue_counts_items(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)   # the plain bar, whatever is installed
    bar = io.StringIO()
    assert list(forkexec.pmap(h.square, range(6), limit=3, progress=bar)) == \
        [x * x for x in range(6)]
    assert "6/6 100%" in bar.getvalue() and bar.getvalue().endswith("\n")
    bar = io.StringIO()
    queue = forkexec.Queue(limit=2, progress=bar)
    for i in range(4):
        queue.start(forkexec.MakeParallel(h.square), i)
    assert sorted(queue) == [0, 1, 4, 9]
    assert "4/4 100%" in bar.getvalue()
    quiet = forkexec.pmap(h.square, range(3), progress=True)   # stderr is not a terminal
    assert list(quiet) == [0, 1, 4]


def test_bad_native_options_are_refused():
    with pytest.raises(ValueError, match="^task_timeout must be a positive"):
        forkexec.Queue(task_timeout=0)
    with pytest.raises(ValueError, match="^progress must be"):
        forkexec.pmap(h.square, [1], progress="sometimes")
