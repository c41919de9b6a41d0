"""Run CPython's own concurrent.futures test suite with ForkExchangeExecutor standing in
for ProcessPoolExecutor: an oracle for the drop-in claim.

Not collected by pytest (its name does not start with ``test_``); run it by hand::

    cd /work/wt-cpy
    PYTHONPATH=$PWD timeout 1800 /tmp/pl-venv-3.13.0/bin/python \
        tests/cpython_suite/run_cpython_futures_suite.py [--methods fork,spawn] \
        [--modules test_process_pool,test_shutdown] [--only SUBSTRING] [--stdlib] [-v]

It needs a Python whose standard library ships ``test.test_concurrent_futures`` (3.13
from pyenv does; 3.11's does not). ``--stdlib`` runs the same selection against the real
ProcessPoolExecutor, to tell our failures from the machine's.

How the substitution works: before the test modules are imported,
``concurrent.futures.ProcessPoolExecutor`` is set to ``ForkExchangeExecutor``, so the
ProcessPool mixins of ``test_concurrent_futures.util`` (``executor_type``) and the tests
that call ``futures.ProcessPoolExecutor(...)`` directly get ours. Tests that start a fresh
interpreter (``from concurrent.futures import ForkExchangeExecutor``) find it through
``site/sitecustomize.py``, put on their PYTHONPATH. Only the process-pool test classes
run (the thread-pool ones do not involve us).

Failures listed in KNOWN (with why) are reported as "known"; the run exits 1 only for
others (or, with ``--stdlib``, for any).

Each (module, start method) pair runs in a child process; every test is bounded by a
faulthandler watchdog (``--per-test-timeout``). A test that hangs ends its child with a
traceback; the driver records it as HANG and runs the rest of that pair again without it.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODULES = ("test_process_pool", "test_shutdown", "test_wait", "test_as_completed",
           "test_deadlock", "test_init")
METHODS = ("fork", "forkserver", "spawn")
#: Failures we know and accept, by test method: (category, reason[, start methods]). "private": the test
#: reads ProcessPoolExecutor internals we do not have (or relies on how it starts its
#: processes); "deliberate": forkexec differs on purpose (README, *Deliberate differences*).
#: Anything else failing is new and makes the run fail.
KNOWN = {
    "test_max_tasks_per_child": (
        "deliberate", "fork: the stdlib refuses max_tasks_per_child with fork (ValueError); "
        "ours forks workers from a single-threaded template, so it works", ("fork",)),
    "test_max_tasks_per_child_defaults_to_spawn_context": (
        "deliberate", "the stdlib switches its default context to spawn when "
        "max_tasks_per_child is given; ours keeps the program's default (fork works)"),
    "test_saturation": (
        "private", "counts _processes right after 15*max_workers submits of a fork-context "
        "Semaphore's acquire, which cannot be pickled: the stdlib has started its processes "
        "inside submit anyway, our submit fails those futures at once and starts none"),
    "test_processes_terminate": (
        "private", "same: a local function cannot be pickled, so our pool starts no "
        "process; the stdlib pre-starts max_workers (fork) or one per submit"),
    "test_traceback": (
        "private", "checks type(exc.__cause__) is concurrent.futures.process._RemoteTraceback; "
        "ours is forkexec.RemoteTraceback, a subclass of it"),
    "test_python_finalization_error": (
        "private", "makes the stdlib's second internal thread (the call queue's feeder) "
        "fail to start; ours starts only one thread, so the map runs (and mul((2, 3)) "
        "raises TypeError)"),
    "test_del_shutdown": (
        "private", "reads _call_queue (the stdlib's multiprocessing call queue) to "
        "join_thread() it; we have no call queue"),
    "test_shutdown_no_wait": ("private", "reads _call_queue, as test_del_shutdown"),
    "test_cancel_futures": (
        "deliberate", "a queued task stays cancellable until a worker starts it; the stdlib "
        "marks up to max_workers + 1 queued tasks running at once, so right after 50 "
        "submits its shutdown(cancel_futures=True) always lets some run, ours may cancel "
        "all"),
    "test_error_at_task_unpickle": (
        "deliberate", "a task that cannot be unpickled in the worker fails only its future "
        "with the unpickling error (the stdlib breaks the pool)"),
    "test_exit_at_task_unpickle": (
        "deliberate", "as test_error_at_task_unpickle: SystemExit from unpickling fails only "
        "the future"),
    "test_error_during_result_unpickle_in_result_handler": (
        "deliberate", "a result that cannot be unpickled in the parent fails only its future "
        "(the stdlib breaks the pool)"),
    "test_exit_during_result_unpickle_in_result_handler": (
        "deliberate", "as above, with SystemExit"),
}

CLASS_PREFIX = {"fork": "ProcessPoolFork", "forkserver": "ProcessPoolForkserver",
                "spawn": "ProcessPoolSpawn"}


# -- child: one module, one start method ------------------------------------------------
def _selected(test, method, only):
    test_id = test.id()
    cls = type(test).__name__
    name = test_id.rsplit(".", 1)[-1]
    if only and not any(o in test_id for o in only):
        return False
    if cls == "FailingInitializerResourcesTest":   # test_spawn / test_forkserver
        return name == "test_" + method
    prefix = CLASS_PREFIX[method]
    if not cls.startswith(prefix):
        return False
    # "ProcessPoolForkserver..." also starts with "ProcessPoolFork"
    return not (method == "fork" and cls.startswith("ProcessPoolForkserver"))


def _flatten(suite):
    for item in suite:
        if hasattr(item, "__iter__"):
            yield from _flatten(item)
        else:
            yield item


def run_child(module_name, method, excluded, only, per_test, status_path, stdlib, verbose):
    import faulthandler
    import gc
    import unittest
    import concurrent.futures

    if not stdlib:
        from forkexec import ForkExchangeExecutor
        concurrent.futures.ProcessPoolExecutor = ForkExchangeExecutor
        # Child interpreters get our PYTHONPATH (and so sitecustomize) instead of -I/-E.
        from test.support import script_helper
        script_helper.interpreter_requires_environment = lambda: True
    from test.test_concurrent_futures import util
    for mixin in (util.ProcessPoolForkMixin, util.ProcessPoolForkserverMixin,
                  util.ProcessPoolSpawnMixin):
        assert mixin.executor_type is concurrent.futures.ProcessPoolExecutor, mixin
    module = __import__("test.test_concurrent_futures." + module_name,
                        fromlist=[module_name])
    loaded = unittest.defaultTestLoader.loadTestsFromModule(module)
    tests = [t for t in _flatten(loaded)
             if _selected(t, method, only) and t.id() not in excluded]
    suite = unittest.TestSuite(tests)

    status = open(status_path, "a", buffering=1)

    def record(kind, test, detail=""):
        status.write("OUTCOME %s\n" % json.dumps([kind, test.id(), detail]))

    class Result(unittest.TextTestResult):
        # Every outcome goes to the status file at once: a hang later (another test, or
        # the module's teardown) loses nothing.
        def startTest(self, test):
            status.write("START %s\n" % test.id())
            faulthandler.dump_traceback_later(per_test, exit=True, file=sys.__stderr__)
            self._t0 = time.monotonic()
            self._bad = False
            super().startTest(test)

        def stopTest(self, test):
            if not self._bad:
                record("passed", test)
            else:
                # A test that failed before shutting its executor down leaves it to the
                # garbage collector (its frame is in a traceback cycle); collect now, or
                # its processes outlive the module (forkserver's teardown waits on them).
                gc.collect()
            status.write("END %s %.2f\n" % (test.id(), time.monotonic() - self._t0))
            super().stopTest(test)
            # Still bounded between tests and during the module's teardown.
            faulthandler.dump_traceback_later(per_test, exit=True, file=sys.__stderr__)

        def _bad_outcome(self, kind, test, detail):
            if isinstance(test, unittest.TestCase) and test in tests:
                self._bad = True
            record(kind, test, detail)

        def addFailure(self, test, err):
            super().addFailure(test, err)
            self._bad_outcome("failed", test, self.failures[-1][1])

        def addError(self, test, err):
            super().addError(test, err)
            self._bad_outcome("errors", test, self.errors[-1][1])

        def addSkip(self, test, reason):
            super().addSkip(test, reason)
            self._bad_outcome("skipped", test, reason)

        def addExpectedFailure(self, test, err):
            super().addExpectedFailure(test, err)
            self._bad_outcome("expected_failures", test, "")

        def addUnexpectedSuccess(self, test):
            super().addUnexpectedSuccess(test)
            self._bad_outcome("failed", test, "unexpected success")

    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=2 if verbose else 1,
                                     resultclass=Result)
    runner.run(suite)
    faulthandler.cancel_dump_traceback_later()
    status.write("DONE\n")
    status.close()


# -- driver -----------------------------------------------------------------------------
def run_pair(module_name, method, args):
    """Run one (module, method) pair, again without any test that hangs."""
    excluded, hung = [], []
    total = collections.defaultdict(list)
    env = dict(os.environ)
    env["FORKEXEC_CPYTHON_SUITE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(HERE, "site"), REPO] + [p for p in env.get("PYTHONPATH", "").split(
            os.pathsep) if p])
    t0 = time.monotonic()
    while True:
        fd, status_path = tempfile.mkstemp(prefix="cpysuite-", suffix=".status")
        os.close(fd)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", module_name, method,
               "--per-test-timeout", str(args.per_test_timeout), "--status", status_path]
        for test_id in excluded:
            cmd += ["--exclude", test_id]
        for o in args.only or ():
            cmd += ["--only", o]
        if args.stdlib:
            cmd.append("--stdlib")
        if args.verbose:
            cmd.append("-v")
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=args.pair_timeout, env=env, cwd=REPO)
        except subprocess.TimeoutExpired as exc:   # the watchdog should have fired first
            proc = subprocess.CompletedProcess(cmd, -9, exc.stdout or b"")
        with open(status_path) as f:
            lines = f.read().splitlines()
        os.unlink(status_path)
        outcomes = [json.loads(line[8:]) for line in lines if line.startswith("OUTCOME ")]
        if args.verbose:
            sys.stderr.write(proc.stdout.decode(errors="replace")[-20000:])
        started = [line.split()[1] for line in lines if line.startswith("START ")]
        ended = {line.split()[1] for line in lines if line.startswith("END ")}
        running = [t for t in started if t not in ended]
        done = "DONE" in lines
        if done or not running:
            for kind, test_id, detail in outcomes:
                total[kind].append(test_id if kind == "passed" else [test_id, detail])
            if not done:   # every test ended, then the child hung or died (teardown)
                total["errors"].append(["%s[%s] (module teardown)" % (module_name, method),
                                        "child exited with %d after its last test:\n%s"
                                        % (proc.returncode,
                                           proc.stdout.decode(errors="replace")[-6000:])])
            break
        test_id = running[-1]
        hung.append([test_id, "no result after %ss (rc %d):\n%s" % (
            args.per_test_timeout, proc.returncode,
            proc.stdout.decode(errors="replace")[-8000:])])
        excluded.append(test_id)
        # tests that finished before the hang run again: drop their first results
        total.clear()
    total["hung"] = hung
    total["seconds"] = round(time.monotonic() - t0, 1)
    return dict(total)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("MODULE", "METHOD"))
    parser.add_argument("--status")
    parser.add_argument("--exclude", action="append", default=[])
    parser.add_argument("--only", action="append", help="run only test ids containing this")
    parser.add_argument("--modules", default=",".join(MODULES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--per-test-timeout", type=float, default=90.0)
    parser.add_argument("--pair-timeout", type=float, default=900.0)
    parser.add_argument("--stdlib", action="store_true",
                        help="run against the real ProcessPoolExecutor (baseline)")
    parser.add_argument("--json", help="write the full outcome here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1], set(args.exclude), args.only,
                  args.per_test_timeout, args.status, args.stdlib, args.verbose)
        return 0
    outcome = {}
    counts = collections.Counter()
    for method in args.methods.split(","):
        for module_name in args.modules.split(","):
            res = run_pair(module_name, method, args)
            outcome["%s[%s]" % (module_name, method)] = res
            line = {k: len(res.get(k, ())) for k in
                    ("passed", "failed", "errors", "hung", "skipped")}
            for k, v in line.items():
                counts[method, k] += v
            print("%-20s %-10s %s (%ss)" % (module_name, method, " ".join(
                "%s=%d" % kv for kv in line.items()), res.get("seconds")), flush=True)
            for key in ("failed", "errors", "hung"):
                for test_id, tb in res.get(key, ()):
                    known = KNOWN.get(test_id.rsplit(".", 1)[-1])
                    if known and key != "hung" and (len(known) < 3 or method in known[2]):
                        counts[method, "known"] += 1
                        print("    known  %s: %s: %s" % (test_id.rsplit(".", 2)[-1],
                                                        known[0], known[1][:110]), flush=True)
                        continue
                    counts[method, "unexpected"] += 1
                    last = [ln for ln in tb.strip().splitlines() if ln.strip()][-1:]
                    print("    %-6s %s: %s" % (key.upper(), test_id, last[0][:200] if last
                                               else ""), flush=True)
    print()
    for method in args.methods.split(","):
        print("%-10s %s" % (method, " ".join("%s=%d" % (k, counts[method, k]) for k in
                                             ("passed", "failed", "errors", "hung",
                                              "skipped", "known", "unexpected"))))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(outcome, f, indent=1)
    if args.stdlib:   # the oracle itself: every failure counts
        bad = sum(counts[m, k] for m in args.methods.split(",")
                  for k in ("failed", "errors", "hung"))
    else:
        bad = sum(counts[m, "unexpected"] for m in args.methods.split(","))
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
