"""ForkExchangeExecutor with each ``mp_context`` start method: fork, spawn, forkserver.

With fork the template is forked from the program at the first submit; with
spawn or forkserver ``multiprocessing`` starts it as a fresh interpreter (the
main module imported as ``__mp_main__``, ``sys.path`` and the start method
passed in its preparation data) and workers are forked from it. The contract
suite (tests/test_executor_contract.py) runs against all three; this file
checks what differs between them, with ``ProcessPoolExecutor`` and the same
context as the oracle where it has an opinion.
"""

import collections
import importlib
import json
import multiprocessing
import os
import sys
import threading
from concurrent.futures.process import BrokenProcessPool

import pytest

import executor_helpers as h
from conftest import descendants, open_fds
from forkexec import ForkExchangeExecutor
from test_mp_children import LOGGING, run_json

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("mp_helpers")]

FRESH = ["spawn", "forkserver"]     # the template starts as a fresh interpreter


@pytest.fixture
def make(executors):
    return executors


def run_fresh(script, **values):
    """run_json for a script whose pools start fresh templates: its multiprocessing helpers
    outlive it and are reaped here, whatever the outcome."""
    try:
        return run_json(script, **values)
    finally:
        h.reap_orphaned_helpers()


def exchange_threads():
    return [t for t in threading.enumerate() if t.name == "forkexec-exchange" and t.is_alive()]


# -- what workers inherit ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["stdlib", "forkexec", "stdlib-spawn", "forkexec-spawn",
                                  "forkexec-forkserver"])
def test_a_global_changed_after_import_reaches_forked_workers_only(make, kind):
    h.STATE["value"] = "changed in the parent"
    try:
        ex = make(kind, 1)
        seen = ex.submit(h.read_state).result(timeout=30)
    finally:
        h.STATE["value"] = "as imported"
    fresh = kind.endswith(("-spawn", "-forkserver"))
    assert seen == ("as imported" if fresh else "changed in the parent")


@pytest.mark.parametrize("method", FRESH)
def test_a_fresh_template_gets_the_programs_sys_path(make, method, tmp_path, monkeypatch):
    # How functions of tests/ (or any directory a program put on sys.path) are found:
    # multiprocessing's preparation data carries sys.path as it is when the template starts.
    name = "start_method_probe_%s" % method
    (tmp_path / (name + ".py")).write_text("def where():\n    return __file__\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        probe = importlib.import_module(name)
        ex = make("forkexec-" + method, 1)
        assert ex.submit(probe.where).result(timeout=30) == probe.where()
        worker_path = ex.submit(h.sys_path_here).result(timeout=30)
    finally:
        sys.modules.pop(name, None)
    assert worker_path == sys.path
    assert h.TESTS in worker_path


START_METHODS = """
    import concurrent.futures, json, multiprocessing
    import executor_helpers as h
    from forkexec import ForkExchangeExecutor

    if GLOBAL_METHOD:
        multiprocessing.set_start_method(GLOBAL_METHOD)
    seen = {}
    for kind in KINDS:
        with h.executor_of(kind, 1) as ex:
            seen[kind] = ex.submit(h.start_method_here).result(timeout=30)
    if GLOBAL_METHOD:   # mp_context=multiprocessing.get_context(): the program's own choice
        for name, cls in [("stdlib-default", concurrent.futures.ProcessPoolExecutor),
                          ("forkexec-default", ForkExchangeExecutor)]:
            with cls(1, mp_context=multiprocessing.get_context()) as ex:
                seen[name] = ex.submit(h.start_method_here).result(timeout=30)
    print(json.dumps(seen))
"""


def test_workers_report_the_start_method_the_stdlibs_workers_report():
    # A spawned child takes the program's start method from the preparation data, not
    # the context it was started with: the stdlib's workers report the program's method.
    kinds = ["%s-%s" % (base, m) for m in FRESH for base in ("stdlib", "forkexec")]
    seen = run_fresh(START_METHODS, kinds=kinds, global_method=None)
    for method in FRESH:
        assert seen["forkexec-" + method] == seen["stdlib-" + method], seen


@pytest.mark.parametrize("method", FRESH)
def test_workers_report_the_pools_start_method_when_the_program_chose_it(method):
    kinds = ["stdlib-" + method, "forkexec-" + method]
    seen = run_fresh(START_METHODS, kinds=kinds, global_method=method)
    assert seen == dict.fromkeys(kinds + ["stdlib-default", "forkexec-default"], method)


# -- worker replacement with a fresh template ----------------------------------------------
@pytest.mark.parametrize("method", FRESH)
def test_max_tasks_per_child_replaces_workers(make, method):
    ex = make("forkexec-" + method, 2, max_tasks_per_child=2)
    futures = [(i, ex.submit(h.identity, i), ex.submit(h.getpid)) for i in range(10)]
    assert [f.result(timeout=60) for _, f, _ in futures] == list(range(10))
    per_worker = collections.Counter(p.result(timeout=60) for _, _, p in futures)
    assert max(per_worker.values()) <= 2 and os.getpid() not in per_worker
    ex.shutdown(wait=True)
    assert ex.statistics().workers_replaced >= 8


@pytest.mark.parametrize("method", FRESH)
def test_replace_policy_replaces_a_dead_worker(make, method):
    ex = make("forkexec-" + method, 1, on_worker_death="replace")
    doomed = ex.submit(h.misbehave, "os_exit")
    fine = ex.submit(h.square, 7)
    with pytest.raises(BrokenProcessPool, match="exit code 3"):
        doomed.result(timeout=30)
    assert fine.result(timeout=30) == 49
    assert list(ex.map(h.square, range(5))) == [0, 1, 4, 9, 16]
    assert ex.statistics().workers_replaced == 1
    identity = ex.submit(h.process_identity).result(timeout=30)
    assert identity["parent_pid"] == os.getpid() and identity["name"] != "MainProcess"


@pytest.mark.parametrize("kind", ["stdlib-spawn", "forkexec-spawn"])
def test_unpicklable_initargs_with_spawn_raise_at_submit_like_the_stdlib(kind):
    # The initializer's arguments travel by pickle to a fresh interpreter: a thread lock
    # cannot. The stdlib raises the TypeError from submit(); so does forkexec.
    ex = h.executor_of(kind, 1, initializer=h.keep_proxies, initargs=(threading.Lock(),))
    try:
        with pytest.raises(TypeError, match="pickle"):
            ex.submit(h.square, 3)
    finally:
        ex.shutdown(wait=True)


def test_logging_through_a_queue_with_spawn(tmp_path):
    # The QueueHandler recipe where it is most common (spawn is the default on macOS):
    # the multiprocessing.Queue in initargs is pickled to the fresh template.
    out = run_fresh(LOGGING, kind="forkexec-spawn", preuse=True)
    assert sorted(m for m, _, _ in out["records"]) == \
        sorted("task %d in %d" % (i, pid) for i, pid in enumerate(out["pids"]))
    assert all(name != "MainProcess" for _, name, _ in out["records"])


# -- processes -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", FRESH)
def test_the_template_is_not_one_of_the_programs_multiprocessing_children(make, method):
    ex = make("forkexec-" + method, 2)
    identity = ex.submit(h.process_identity).result(timeout=30)
    template = identity["ppid"]
    assert template in descendants(), "the worker's parent is not one of our processes"
    assert multiprocessing.active_children() == []
    ex.shutdown(wait=True)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_shutdown_leaves_nothing_behind(method):
    fds_before = open_fds()
    ex = ForkExchangeExecutor(2, multiprocessing.get_context(method),
                              on_worker_death="replace", max_tasks_per_child=3)
    assert sum(ex.map(h.square, range(20))) == sum(i * i for i in range(20))
    with pytest.raises(BrokenProcessPool):
        ex.submit(h.misbehave, "os_exit").result(timeout=30)
    assert ex.submit(h.square, 3).result(timeout=30) == 9
    ex.shutdown(wait=True)
    # At once, not after a grace period: shutdown(wait=True) returns when all is gone.
    assert descendants() == {}
    assert not exchange_threads()
    fds = {fd: t for fd, t in open_fds().items()
           if fds_before.get(fd) != t and "/proc/" not in t}
    assert fds == {}


MAIN_SCRIPT = '''\
import json
import multiprocessing
import sys

import executor_helpers as h

IMPORTED_AS = __name__     # set again in every process that imports this module


def cube(x):
    return x ** 3


def where(_=None):
    return [IMPORTED_AS, multiprocessing.current_process().name]


if __name__ == "__main__":
    print("main-block-ran", flush=True)
    with h.executor_of(sys.argv[1], 2) as ex:
        cubes = list(ex.map(cube, range(10)))
        seen = ex.submit(where).result(timeout=30)
    print(json.dumps({"cubes": cubes, "where": seen}), flush=True)
'''


@pytest.mark.parametrize("kind", ["stdlib-spawn", "forkexec-spawn", "forkexec-forkserver"])
def test_a_main_guarded_script_with_a_fresh_template_finds_its_main_functions(kind, tmp_path):
    script = tmp_path / "program.py"
    script.write_text(MAIN_SCRIPT)
    try:
        proc = h.run_file(script, [kind])
    finally:
        h.reap_orphaned_helpers()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines.count("main-block-ran") == 1, proc.stdout   # never again in the template
    out = json.loads(lines[-1])
    assert out["cubes"] == [x ** 3 for x in range(10)]
    imported_as, worker_name = out["where"]
    assert imported_as == "__mp_main__" and worker_name != "MainProcess"
    assert "Traceback" not in proc.stderr, proc.stderr


PROGRAM_CHOSE = """
import json, multiprocessing
from concurrent.futures import ProcessPoolExecutor
import executor_helpers as h
from forkexec import ForkExchangeExecutor

multiprocessing.set_start_method(METHOD)
h.STATE["value"] = "changed in the parent"
seen = {}
for name, cls in [("stdlib", ProcessPoolExecutor), ("forkexec", ForkExchangeExecutor)]:
    with cls(1) as ex:   # no mp_context: the program's own choice applies
        seen[name] = ex.submit(h.read_state).result(timeout=30)
print(json.dumps(seen))
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_without_mp_context_the_programs_chosen_start_method_applies(method):
    try:
        proc = h.run_script(PROGRAM_CHOSE.replace("METHOD", repr(method)))
    finally:
        h.reap_orphaned_helpers()
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    expected = "changed in the parent" if method == "fork" else "as imported"
    assert seen == {"stdlib": expected, "forkexec": expected}, seen
