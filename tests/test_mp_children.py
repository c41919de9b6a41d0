"""Real programs' multiprocessing recipes, run in the workers of both executors.

Programs written for ``ProcessPoolExecutor`` lean on the workers being
``multiprocessing`` children: a ``multiprocessing.Queue`` or a manager proxy
passed through ``initargs`` works in each worker (their after-fork hooks run),
``current_process()`` and ``parent_process()`` say who is who,
``multiprocessing.util.Finalize`` callbacks run when a worker exits, and
coverage.py measures code run in workers. ``stdlib`` (``ProcessPoolExecutor``
with a fork context) is the oracle; ``forkexec`` must do the same. Recipes that
touch process-wide state (a manager, finalizers, logging) run in a fresh
interpreter.
"""

import importlib.util
import json
import os
import sys
import textwrap

import pytest

import executor_helpers as h
import interpreters
from conftest import _stat

KINDS = ["stdlib", "forkexec"]

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def run_json(script, **values):
    """Run ``script`` (with ``values`` bound as upper-case names) in a fresh interpreter;
    the last line it prints, as JSON."""
    head = "".join("%s = %r\n" % (name.upper(), value) for name, value in values.items())
    proc = h.run_script(head + textwrap.dedent(script), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def both_workers_up(ex, directory):
    """Make sure two workers exist at once (two tasks meet), so later tasks are spread."""
    os.makedirs(directory)
    assert all(ex.map(h.rendezvous, [directory] * 2, [2] * 2, [20.0] * 2))


# -- 1. logging through a multiprocessing.Queue -------------------------------------------
LOGGING = """
    import json, logging, logging.handlers, multiprocessing, os
    import executor_helpers as h

    method = KIND.partition("-")[2] or "fork"
    queue = multiprocessing.get_context(method).Queue()   # the pool's context, as the docs say
    if PREUSE:   # the parent's feeder thread runs before the pool exists
        queue.put("hello")
        assert queue.get(timeout=10) == "hello"
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append([record.getMessage(), record.processName, record.process])

    listener = logging.handlers.QueueListener(queue, Keep())
    listener.start()
    with h.executor_of(KIND, 2, initializer=h.log_to_queue, initargs=(queue,)) as ex:
        pids = [f.result(timeout=30) for f in [ex.submit(h.log_message, i) for i in range(40)]]
    listener.stop()
    print(json.dumps({"records": records, "pids": pids, "main": os.getpid()}))
"""


@pytest.mark.parametrize("preuse", [False, True], ids=["fresh-queue", "queue-used-first"])
def test_logging_through_a_queue_handler_reaches_the_parent(kind, preuse):
    out = run_json(LOGGING, kind=kind, preuse=preuse)
    messages = sorted(message for message, _, _ in out["records"])
    assert messages == sorted("task %d in %d" % (i, pid) for i, pid in enumerate(out["pids"]))
    for message, process_name, pid in out["records"]:
        assert process_name != "MainProcess", message
        assert pid != out["main"] and message.endswith(" %d" % pid)


# -- 2. a manager's proxies, used by the parent first, then by two workers -----------------
MANAGER = """
    import json, multiprocessing, os
    import executor_helpers as h

    with multiprocessing.Manager() as manager:
        shared_list = manager.list()
        shared_dict = manager.dict()
        shared_list.append(["parent", os.getpid()])   # the parent's proxies are connected
        shared_dict["parent"] = os.getpid()
        h.PROXIES["dict"] = shared_dict                 # inherited as a global
        with h.new_executor(KIND, 2, initializer=h.keep_proxies,
                            initargs=(shared_list,)) as ex:
            os.makedirs(RENDEZVOUS)
            assert all(ex.map(h.rendezvous, [RENDEZVOUS] * 2, [2] * 2, [20.0] * 2))
            futures = [ex.submit(h.update_proxies, i) for i in range(50)]
            pids = [f.result(timeout=30) for f in futures]
        items = [list(item) for item in shared_list]
        mapping = {str(k): v for k, v in shared_dict.items()}
    print(json.dumps({"pids": pids, "items": items, "mapping": mapping, "main": os.getpid()}))
"""


def test_manager_proxies_from_initargs_and_globals_work_in_two_workers(kind, tmp_path):
    out = run_json(MANAGER, kind=kind, rendezvous=str(tmp_path / "meet"))
    pids = out["pids"]
    assert out["main"] not in pids
    assert len(set(pids)) == 2, "the 50 updates did not come from both workers: %r" % pids
    assert out["items"][0] == ["parent", out["main"]]
    assert sorted(map(tuple, out["items"][1:])) == sorted(zip(range(50), pids))
    assert out["mapping"] == dict({str(i): pid for i, pid in enumerate(pids)},
                                  parent=out["main"])


# -- 3. and 6. who is who ------------------------------------------------------------------
def test_workers_know_they_are_children_of_the_program(make, tmp_path):
    ex = make(2)
    both_workers_up(ex, str(tmp_path / "meet"))
    seen = list(ex.map(h.process_identity, range(20)))
    assert {s["pid"] for s in seen}.isdisjoint({os.getpid()})
    for identity in seen:
        assert identity["name"] != "MainProcess"
        assert identity["guard_ran"] is False     # `if current_process().name == "MainProcess"`
        assert identity["parent_pid"] == os.getpid()
        assert identity["parent_alive"] is True
    names = {s["pid"]: s["name"] for s in seen}
    assert len(set(names.values())) == len(names), "two workers share a name: %r" % names
    # Each its own multiprocessing identity (what names child processes it starts itself).
    identities = {s["pid"]: tuple(s["identity"]) for s in seen}
    assert len(set(identities.values())) == len(identities), identities


def test_getppid_is_the_template_but_parent_process_is_the_program(make):
    # Documented difference (README, "Deliberate differences"): a forkexec worker is
    # forked by the template, so os.getppid() is the template's pid;
    # multiprocessing.parent_process().pid is the program, as with the stdlib.
    ex = make(1)
    identity = ex.submit(h.process_identity).result(timeout=30)
    assert identity["parent_pid"] == os.getpid()
    if make.kind == "stdlib":
        assert identity["ppid"] == os.getpid()
    else:
        template = identity["ppid"]
        assert template != os.getpid()
        assert _stat(template)[0] == os.getpid(), "the worker's parent is not our child"


# -- 4. multiprocessing.util.Finalize ------------------------------------------------------
FINALIZERS = """
    import json, os
    from multiprocessing import util
    import executor_helpers as h

    util.Finalize(None, h.append_pid, args=(PARENT_LOG,), exitpriority=5)
    with h.new_executor(KIND, 2, initializer=h.register_finalizer, initargs=(DIRECTORY,)) as ex:
        os.makedirs(RENDEZVOUS)
        assert all(ex.map(h.rendezvous, [RENDEZVOUS] * 2, [2] * 2, [20.0] * 2))
    print(json.dumps({"main": os.getpid()}))
"""


def test_finalizers_of_workers_run_at_exit_and_the_parents_do_not_run_in_workers(kind,
                                                                                 tmp_path):
    directory = tmp_path / "workers"
    directory.mkdir()
    parent_log = str(tmp_path / "parent-finalizer")
    out = run_json(FINALIZERS, kind=kind, directory=str(directory), parent_log=parent_log,
                   rendezvous=str(tmp_path / "meet"))
    names = [n for n in os.listdir(str(directory)) if not n.endswith(".tmp")]
    started = {n.split("-")[1] for n in names if n.startswith("started-")}
    finalized = {n.split("-")[1] for n in names if n.startswith("finalized-")}
    assert len(started) == 2
    assert finalized == started, "workers whose finalizer never ran: %r" % (started - finalized)
    # The parent's finalizer ran once, in the parent, at its exit: never in a worker.
    assert h.read_lines(parent_log) == [str(out["main"])]


# -- 5. coverage.py measures code run in workers -------------------------------------------
COVERED = '''\
import sys

import executor_helpers as h


def worker_only(x):
    y = x * 3                 # WORKER-LINE-A
    return y + 1              # WORKER-LINE-B


if __name__ == "__main__":
    with h.executor_of(sys.argv[1], 2) as ex:
        print(sum(ex.map(worker_only, range(8))))
'''


def _coverage(tmp_path, *args):
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "coverage"] + list(args)
                          + ["--rcfile=%s" % (tmp_path / ".coveragerc")],
                          capture_output=True, text=True, timeout=60, env=h.python_env(),
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("kind", KINDS + ["forkexec-spawn"])
def test_coverage_measures_lines_run_only_in_workers(kind, tmp_path):
    if importlib.util.find_spec("coverage") is None:
        interpreters.skip_or_fail("coverage.py is not installed (pip install -e '.[test]')")
    script = tmp_path / "covered.py"
    script.write_text(COVERED)
    (tmp_path / ".coveragerc").write_text(textwrap.dedent("""\
        [run]
        data_file = %s
        source = %s
        """ % (tmp_path / "cov.data", tmp_path)))
    try:
        ran = _coverage(tmp_path, "run", "--concurrency=multiprocessing", "--parallel-mode",
                        str(script), kind)
    finally:
        if "-" in kind:   # spawn: the script's resource tracker outlives it
            h.reap_orphaned_helpers()
    assert ran.stdout.split() == [str(sum(3 * x + 1 for x in range(8)))]
    _coverage(tmp_path, "combine")
    _coverage(tmp_path, "json", "-o", str(tmp_path / "cov.json"))
    with open(str(tmp_path / "cov.json")) as f:
        files = json.load(f)["files"]
    measured = [v for name, v in files.items() if os.path.basename(name) == "covered.py"]
    assert len(measured) == 1, sorted(files)
    lines = COVERED.splitlines()
    worker_lines = [n for n, text in enumerate(lines, 1) if "WORKER-LINE" in text]
    executed = set(measured[0]["executed_lines"])
    assert set(worker_lines) <= executed, (
        "the lines run only in workers were not measured: executed %s" % sorted(executed))
