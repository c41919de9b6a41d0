"""Exactness of ForkExchangeExecutor: what a user of ProcessPoolExecutor would notice.

Each test pins one behaviour a user can observe: a task that never runs twice,
a result map() lets go of, an exception of the type the standard executor
raises, a descriptor that does not leak into the program's own children. The
standard ``ProcessPoolExecutor`` (fork context) is the oracle wherever it
defines the behaviour; where it is known to be wrong, the test runs against
forkexec only and says why. "Ran" and "never ran" are proven by files the tasks
write, never by ``cancelled()`` alone.
"""

import ast
import collections
import concurrent.futures
import gc
import multiprocessing
import os
import pickle
import random
import select
import signal
import subprocess
import textwrap
import threading
import time
import warnings
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

import executor_helpers as h
from conftest import descendants, kill_all, open_fds, reap_orphans, state_of
from forkexec import ForkExchangeExecutor, WorkerDiedError

pytestmark = pytest.mark.timeout(90)

KINDS = ["stdlib", "forkexec"]
#: "Promptly": a generous bound, never a performance claim.
PROMPTLY = 10.0


@pytest.fixture
def gate(tmp_path):
    """A gate file that gated tasks wait on (opened by ``make``'s teardown at the latest)."""
    return str(tmp_path / "gate")


@pytest.fixture
def make(gate, executors):
    """make(kind, *args, **kwargs) -> an executor; the gate is opened before every
    executor is shut down after the test."""
    yield executors
    open_gate(gate)


def open_gate(path):
    open(path, "w").close()


def running(pid):
    return state_of(pid) not in (None, "Z", "X")


def gone_after_reaping(pid):
    """True once ``pid`` no longer runs; reaps it if it was re-parented to us (subreaper)."""
    if running(pid):
        return False
    reap_orphans()
    return True


def warm_up(ex, fn, make_args, calls=200, rounds=10):
    """Run ``fn`` ``calls`` times through submit so the pool measures it as tiny. For
    forkexec, repeat until map would group its items (the auto-chunked path)."""
    for _ in range(rounds):
        futures = [ex.submit(fn, *make_args(i)) for i in range(calls)]
        for future in futures:
            future.result(timeout=30)
        del futures
        auto = getattr(ex, "_auto_chunksize", None)
        if not isinstance(ex, ForkExchangeExecutor) or auto is None or auto(fn, 400) > 1:
            return
    raise AssertionError("%s was never measured as tiny enough to group" % fn.__name__)


def released(ref):
    """True if the object behind the weak reference ``ref`` is gone (after a gc if need be)."""
    if ref() is None:
        return True
    gc.collect()
    return ref() is None


# -- 1. at most once -----------------------------------------------------------------------
def test_no_task_starts_twice_while_workers_are_killed_repeatedly(make, tmp_path):
    log = str(tmp_path / "log")
    ex = make("forkexec", 2, on_worker_death="replace")
    futures = []
    for i in range(600):
        seconds = 0.25 if i % 50 == 0 else 0.003
        futures.append(ex.submit(h.log_with_pid, log, i, seconds))

    def finished():
        return sum(f.done() for f in futures)

    killed = []
    deadline = time.monotonic() + 40
    while len(killed) < 8 and finished() < len(futures) and time.monotonic() < deadline:
        before = finished()
        # Kill only workers that ran something, so the kills are not "barren" deaths.
        ran_in = {int(line.split(":")[1]) for line in h.read_lines(log)}
        victims = [pid for pid in ex._processes if pid in ran_in and pid not in killed]
        if victims:
            os.kill(victims[-1], signal.SIGKILL)
            killed.append(victims[-1])
        # Results must flow between kills (they reset the pool's count of barren deaths).
        h.wait_until(lambda: finished() > before or finished() == len(futures), 30,
                     "results between kills")
        time.sleep(0.05)
    concurrent.futures.wait(futures, timeout=60)
    assert len(killed) >= 3, "the test killed too few workers to mean anything"

    starts = collections.Counter(line.split(":")[0] for line in h.read_lines(log))
    assert [i for i, n in starts.items() if n > 1] == [], "tasks started more than once"
    for i, future in enumerate(futures):
        assert future.done(), "task %d never finished" % i
        exc = future.exception()
        if exc is None:
            assert future.result() == i
            assert starts[str(i)] == 1
            continue
        assert isinstance(exc, WorkerDiedError) and isinstance(exc, BrokenProcessPool), exc
        assert "was running" in str(exc) or "result was lost" in str(exc), str(exc)


def test_a_worker_killed_after_finishing_a_task_does_not_run_it_again(make, tmp_path):
    log, marker = str(tmp_path / "log"), str(tmp_path / "flushing")
    ex = make("forkexec", 1, on_worker_death="replace")
    # The task returns, then the worker stalls flushing stdout before it sends the
    # result: killed there, the task has finished but its result is lost.
    first = ex.submit(h.finish_then_stall_in_flush, log, marker, "first")
    second = ex.submit(h.gated_log, log, "second")
    os.kill(h.read_pid(marker), signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match="result was lost"):
        first.result(timeout=30)
    assert second.result(timeout=30) == "second"
    ex.shutdown(wait=True)
    assert sorted(h.read_lines(log)) == ["first", "second"]


# -- 2. map lets go of its results ----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_keeps_no_reference_to_a_yielded_result(make, kind, chunksize):
    # CPython's own test_free_reference, for both executors.
    ex = make(kind, 2)
    for obj in ex.map(h.make_payload, range(10), chunksize=chunksize):
        ref = weakref.ref(obj)
        del obj
        assert released(ref)


def test_auto_chunked_map_keeps_no_reference_to_a_yielded_result(make):
    # forkexec only: the stdlib never groups map(chunksize=1) items itself.
    ex = make("forkexec", 2)
    warm_up(ex, h.make_payload, lambda i: (i,))
    count = 0
    for obj in ex.map(h.make_payload, range(400)):
        assert obj.value == count
        count += 1
        ref = weakref.ref(obj)
        del obj
        assert released(ref), "item %d is still referenced" % (count - 1)
    assert count == 400


# -- 3. map's timeout cancels outstanding work -----------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("measured", [False, True], ids=["unmeasured", "measured-tiny"])
def test_map_timeout_cancels_the_items_not_yet_started(make, kind, measured, gate, tmp_path):
    log = str(tmp_path / "log")
    ex = make(kind, 1)
    assert ex.submit(h.square, 2).result(timeout=30) == 4   # the worker is up
    if measured:   # known tiny: forkexec may send several items to the worker at once
        warm_up(ex, h.gated_log, lambda i: (str(tmp_path / "warm"), i))
    values = ["first"] + ["later%d" % i for i in range(10)]
    gates = [gate] + [None] * 10
    results = ex.map(h.gated_log, [log] * len(values), values, gates, timeout=0.5)
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)
    open_gate(gate)
    ex.shutdown(wait=True)
    ran = h.read_lines(log)
    later = set(ran) - {"first"}
    # The stdlib has already moved max_workers + 1 items into its call queue (marked
    # running, beyond cancel()); everything behind them is cancelled. forkexec sends a
    # worker nothing behind a call of unknown cost, and never more than the stdlib would
    # run: items sent to a worker but not started are given back, not run.
    assert later <= {"later0", "later1"}, ran
    if kind == "forkexec" and not measured:
        assert later == set(), ran


# -- 4. terminate_workers() and kill_workers() ----------------------------------------------
STOP_KINDS = (["stdlib"] if hasattr(ProcessPoolExecutor, "terminate_workers") else []) + \
    ["forkexec"]


@pytest.mark.parametrize("kind", STOP_KINDS)
@pytest.mark.parametrize("method, handler_runs",
                         [("terminate_workers", True), ("kill_workers", False)])
def test_terminate_lets_workers_handle_sigterm_and_kill_does_not(make, kind, method,
                                                                 handler_runs, tmp_path):
    flag, started = str(tmp_path / "sigterm-handled"), str(tmp_path / "started")
    ex = make(kind, 1, initializer=h.install_sigterm_writer, initargs=(flag,))
    future = ex.submit(h.announce_and_sleep, started, 60)
    pid = h.read_pid(started)
    begin = time.monotonic()
    getattr(ex, method)()
    assert time.monotonic() - begin < PROMPTLY
    h.wait_until(lambda: not running(pid), PROMPTLY, "the worker to be gone")
    assert os.path.exists(flag) == handler_runs
    with pytest.raises(BrokenProcessPool):
        future.result(timeout=PROMPTLY)


def test_terminate_workers_still_stops_a_worker_that_ignores_sigterm(make, tmp_path):
    # forkexec's promise (a bounded grace, then SIGKILL); the stdlib's terminate_workers
    # (3.14) only sends SIGTERM.
    started = str(tmp_path / "started")
    ex = make("forkexec", 1, initializer=h.ignore_sigterm)
    future = ex.submit(h.announce_and_sleep, started, 60)
    pid = h.read_pid(started)
    begin = time.monotonic()
    ex.terminate_workers()
    assert time.monotonic() - begin < PROMPTLY
    assert not running(pid)
    with pytest.raises(BrokenProcessPool):
        future.result(timeout=PROMPTLY)


# -- 5. pool descriptors stay out of the program's own children -----------------------------
def test_a_child_the_program_forks_holds_no_descriptor_of_the_pool(make):
    # forkexec only: the stdlib's pipes and queues are inherited by any fork.
    before = open_fds()
    ex = make("forkexec", 2)
    assert sorted(ex.map(h.square, range(8))) == [i * i for i in range(8)]
    assert ex.submit(h.square, 3).result(timeout=30) == 9
    pool_fds = {fd: target for fd, target in open_fds().items()
                if before.get(fd) != target and "/proc/" not in target}
    assert pool_fds, "the started pool holds no descriptor at all?"
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():   # Python 3.12+: forking a threaded process is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            lines = []
            for name in os.listdir("/proc/self/fd"):
                try:
                    lines.append("%s %s" % (name, os.readlink("/proc/self/fd/" + name)))
                except OSError:
                    pass
            data = "\n".join(lines).encode()
            while data:
                data = data[os.write(write_end, data):]
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], 30)
            if not ready:
                break
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    child = {}
    for line in b"".join(chunks).decode().splitlines():
        fd, _, target = line.partition(" ")
        child[int(fd)] = target
    assert child, "the child reported nothing"
    leaked = {fd: target for fd, target in child.items()
              if fd not in (read_end, write_end) and pool_fds.get(fd) == target}
    assert leaked == {}, "the pool's descriptors leaked into a forked child"


# -- 6. pickling errors have the stdlib's types ---------------------------------------------
def _unpicklable_call(ex, case):
    if case == "local function":
        def local(x):
            return x
        return ex.submit(local, 1)
    return ex.submit(h.identity, threading.Lock())


@pytest.mark.parametrize("case", ["local function", "lock argument"])
def test_an_unpicklable_call_fails_its_future_with_the_stdlib_type(make, case):
    expected = _unpicklable_call(make("stdlib", 1), case).exception(timeout=30)
    ex = make("forkexec", 1)
    got = _unpicklable_call(ex, case).exception(timeout=30)
    assert expected is not None and got is not None
    assert type(got) is type(expected), (got, expected)
    assert any("pickl" in note for note in getattr(got, "__notes__", ())), \
        getattr(got, "__notes__", None)
    assert ex.submit(h.square, 7).result(timeout=30) == 49   # the pool is still usable
    assert list(ex.map(h.square, range(4))) == [0, 1, 4, 9]


def _map_until_error(ex, items):
    got = []
    try:
        for value in ex.map(h.identity, items, chunksize=2):
            got.append(value)
    except Exception as exc:  # noqa: B902 - the type is what is compared
        return got, type(exc)
    return got, None


def test_map_raises_the_stdlib_pickling_error_at_the_unpicklable_item(make):
    # The lock starts the second chunk, so both executors fail from the same item.
    items = [1, 2, threading.Lock(), 4]
    expected = _map_until_error(make("stdlib", 1), items)
    ex = make("forkexec", 1)
    got = _map_until_error(ex, items)
    assert expected[0] == [1, 2] and expected[1] is not None
    assert got == expected
    assert list(ex.map(h.square, range(4), chunksize=2)) == [0, 1, 4, 9]


# -- 7. a worker's internal error is reported -----------------------------------------------
def test_an_internal_error_in_a_worker_is_reported_and_stays_in_the_worker():
    # The task returns normally but leaves a stdout whose flush() raises: the worker
    # fails outside any task (it flushes stdio after each batch). Run as a script: a
    # worker that escaped its own stack would run the program's code after submit().
    code = textwrap.dedent("""
        import os
        from concurrent.futures.process import BrokenProcessPool
        import executor_helpers as h
        from forkexec import ForkExchangeExecutor

        def say(text):
            os.write(1, ("%d %s\\n" % (os.getpid(), " ".join(text.split()))).encode())

        say("main")
        ex = ForkExchangeExecutor(1, on_worker_death="break")
        try:
            future = ex.submit(h.break_stdout)
        except BaseException as exc:
            say("submit raised " + type(exc).__name__)
            os._exit(0)
        try:
            say("no error, result %r" % (future.result(timeout=30),))
        except BaseException as exc:
            say("error %s broken=%s: %s" % (type(exc).__name__,
                                           isinstance(exc, BrokenProcessPool), exc))
        ex.shutdown(wait=True)
        say("done")
    """)
    proc = h.run_script(code, timeout=60)
    lines = proc.stdout.splitlines()
    assert lines and lines[0].endswith(" main"), (proc.stdout, proc.stderr)
    main_pid = lines[0].split()[0]
    strangers = [line for line in lines if line.split()[0] != main_pid]
    assert strangers == [], "a worker ran the program's own code: %r" % strangers
    assert lines[-1] == "%s done" % main_pid, proc.stdout
    errors = [line for line in lines if " error " in line]
    assert len(errors) == 1, proc.stdout
    message = errors[0]
    assert "broken=True" in message
    assert "internal error" in message and "boom" in message, message
    assert "exit code 0" not in message, message


# -- 8. grouping map items never shares an argument ------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_map_items_each_get_their_own_copy_of_a_shared_argument(make, kind):
    ex = make(kind, 2)
    warm_up(ex, h.append_and_len, lambda i: ([],))
    shared = []
    assert list(ex.map(h.append_and_len, [shared] * 400)) == [1] * 400
    assert shared == []


# -- 9. a stale estimate does not serialize work ---------------------------------------------
def _overlapping_runs(log):
    runs = []
    for line in h.read_lines(log):
        pid, start, end = line.split(",")
        runs.append((int(pid), float(start), float(end)))
    pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]
             if a[0] != b[0] and a[1] < b[2] and b[1] < a[2]]
    return runs, pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("via", ["submit", "map"])
def test_calls_measured_as_tiny_that_turn_long_still_run_side_by_side(make, kind, via,
                                                                     tmp_path):
    log = str(tmp_path / "log")
    ex = make(kind, 2)
    warm_up(ex, h.nap, lambda i: (0,), calls=500)
    if via == "submit":
        futures = [ex.submit(h.nap, 0.12, log) for _ in range(8)]
        assert [f.result(timeout=30) for f in futures] == [0.12] * 8
    else:
        assert list(ex.map(h.nap, [0.12] * 16, [log] * 16)) == [0.12] * 16
    runs, overlapping = _overlapping_runs(log)
    assert len({pid for pid, _, _ in runs}) == 2, runs
    assert overlapping, "no two calls ran at the same time: %r" % runs


# -- 10. map goes through a wrapped submit ---------------------------------------------------
def _counting_executor(kind, how, counted):
    if how == "subclass":
        base = ProcessPoolExecutor if kind == "stdlib" else ForkExchangeExecutor

        class Counting(base):
            def submit(self, fn, /, *args, **kwargs):
                counted.append(fn)
                return super().submit(fn, *args, **kwargs)

        if kind == "stdlib":
            return Counting(2, mp_context=multiprocessing.get_context("fork"))
        return Counting(2)
    ex = h.new_executor(kind, 2)
    original = ex.submit

    def wrapper(fn, *args, **kwargs):
        counted.append(fn)
        return original(fn, *args, **kwargs)

    ex.submit = wrapper
    return ex


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["subclass", "instance"])
@pytest.mark.parametrize("chunksize, calls", [(5, 4), (1, 20)])
def test_map_calls_a_wrapped_submit_once_per_chunk(kind, how, chunksize, calls):
    counted = []
    ex = _counting_executor(kind, how, counted)
    try:
        assert list(ex.map(h.square, range(20), chunksize=chunksize)) == \
            [i * i for i in range(20)]
        assert len(counted) == calls   # what the stdlib does
    finally:
        ex.shutdown(wait=True)
        ex.__dict__.pop("submit", None)


# -- 11. a Future does not pickle -------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_future_cannot_be_pickled_nor_passed_to_a_task(make, kind, gate):
    ex = make(kind, 1)
    pending = ex.submit(h.wait_for_gate, gate, None, "gated")
    with pytest.raises(TypeError):
        pickle.dumps(pending)
    passed = ex.submit(h.identity, pending)
    assert type(passed.exception(timeout=30)) is TypeError
    open_gate(gate)
    assert pending.result(timeout=30) == "gated"
    assert ex.submit(h.square, 5).result(timeout=30) == 25


# -- 12. workers read /dev/null, not the program's stdin -------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_workers_stdin_is_dev_null(kind):
    code = textwrap.dedent("""
        import executor_helpers as h
        ex = h.new_executor(%r, 1)
        print(repr(ex.submit(h.read_stdin, %r).result(timeout=60)), flush=True)
        ex.shutdown(wait=True)
    """ % (kind, kind == "forkexec"))
    # The script's stdin is a pipe kept open: a worker reading it would block.
    proc = h.start_script(code, stdin=subprocess.PIPE)
    try:
        line = h.read_line(proc, timeout=30)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    text, raw = ast.literal_eval(line)
    assert text == ""   # the stdlib's sys.stdin is os.devnull in its workers...
    if kind == "forkexec":
        # ...but its fd 0 stays the program's stdin (sys.stdin was opened with
        # closefd=False), so only forkexec is asked for os.read(0): /dev/null there too.
        assert raw == b""


# -- 13. a done callback raising SystemExit/KeyboardInterrupt --------------------------------
@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_a_done_callback_raising_base_exception_does_not_stop_the_pool(make, gate, exc_type):
    # forkexec only: the stdlib's Future._invoke_callbacks catches Exception only, so a
    # SystemExit or KeyboardInterrupt ends its executor manager thread and the pool hangs.
    ex = make("forkexec", 2)
    called = []

    def bad(future):
        called.append("bad")
        raise exc_type()

    first = ex.submit(h.wait_for_gate, gate, None, "first")
    first.add_done_callback(bad)
    first.add_done_callback(lambda future: called.append("after"))
    others = [ex.submit(h.square, i) for i in range(10)]
    others[3].add_done_callback(bad)
    open_gate(gate)
    assert first.result(timeout=30) == "first"
    assert [f.result(timeout=30) for f in others] == [i * i for i in range(10)]
    h.wait_until(lambda: len(called) == 3, PROMPTLY, "the callbacks")
    assert sorted(called) == ["after", "bad", "bad"]
    assert ex.submit(h.square, 12).result(timeout=30) == 144
    assert list(ex.map(h.square, range(5))) == [0, 1, 4, 9, 16]


# -- 14. shutdown(cancel_futures=True) wakes waiters -----------------------------------------
@pytest.mark.parametrize("waiter", ["wait", "as_completed"])
def test_shutdown_cancelling_futures_wakes_threads_waiting_on_them(make, gate, tmp_path,
                                                                    waiter):
    # forkexec only: the stdlib cancels the queued futures without telling their
    # waiters, so wait()/as_completed() in another thread hang.
    log, started = str(tmp_path / "log"), str(tmp_path / "started")
    ex = make("forkexec", 1)
    busy = ex.submit(h.wait_for_gate, gate, started, "busy")
    h.read_pid(started)
    queued = [ex.submit(h.gated_log, log, "q%d" % i) for i in range(5)]
    outcome = []

    def wait_for_them():
        try:
            if waiter == "wait":
                done, _ = concurrent.futures.wait(queued, timeout=20)
                outcome.append(len(done))
            else:
                outcome.append(len(list(concurrent.futures.as_completed(queued, timeout=20))))
        except BaseException as exc:  # noqa: B902
            outcome.append(exc)

    thread = threading.Thread(target=wait_for_them)
    thread.start()
    time.sleep(0.1)   # let it block (the test holds either way)
    ex.shutdown(wait=False, cancel_futures=True)
    open_gate(gate)
    thread.join(PROMPTLY)
    try:
        assert not thread.is_alive(), "the waiting thread was never woken"
        assert outcome == [5]
        assert all(f.cancelled() for f in queued)
    finally:
        thread.join()
    ex.shutdown(wait=True)
    assert busy.result(timeout=30) == "busy"
    assert h.read_lines(log) == []


# -- 15. a task's own children ----------------------------------------------------------------
def test_a_tasks_child_does_not_outlive_the_pool(make):
    # forkexec's promise (each worker leads a process group killed with it); the stdlib
    # leaves such children running.
    ex = make("forkexec", 1)
    sleeper, _worker = ex.submit(h.start_sleeper).result(timeout=30)
    assert running(sleeper)
    ex.shutdown(wait=True)
    h.wait_until(lambda: gone_after_reaping(sleeper), PROMPTLY, "the task's child to go")


def test_a_killed_workers_child_goes_with_it(make):
    ex = make("forkexec", 1, on_worker_death="replace")
    sleeper, worker = ex.submit(h.start_sleeper).result(timeout=30)
    assert running(sleeper)
    os.kill(worker, signal.SIGKILL)
    h.wait_until(lambda: gone_after_reaping(sleeper), PROMPTLY, "the task's child to go")
    assert ex.submit(h.square, 3).result(timeout=30) == 9   # replaced


def test_a_child_in_its_own_session_survives_the_pool(make):
    ex = make("forkexec", 1)
    sleeper, _worker = ex.submit(h.start_sleeper, True).result(timeout=30)
    try:
        ex.shutdown(wait=True)
        time.sleep(0.2)
        assert running(sleeper), "a child that asked for its own session was killed"
    finally:
        kill_all([sleeper])


# -- 16. exit with a hung task after shutdown(wait=False, cancel_futures=True) ---------------
def test_exit_after_shutdown_without_waiting_leaves_a_hung_task_behind(tmp_path):
    # forkexec only: the stdlib joins its workers at exit, so this script waits 600 s.
    started = str(tmp_path / "started")
    code = textwrap.dedent("""
        import executor_helpers as h
        from forkexec import ForkExchangeExecutor
        ex = ForkExchangeExecutor(1)
        ex.submit(h.announce_and_sleep, %r, 600)
        h.read_pid(%r, 30)
        ex.shutdown(wait=False, cancel_futures=True)
        print("exiting", flush=True)
    """ % (started, started))
    begin = time.monotonic()
    proc = h.run_script(code, timeout=60)
    assert time.monotonic() - begin < 20
    assert proc.returncode == 0 and proc.stdout.strip() == "exiting", proc.stderr
    worker = h.read_pid(started)
    h.wait_until(lambda: gone_after_reaping(worker), PROMPTLY, "the hung worker to go")
    h.wait_until(lambda: not reap_orphans() and not descendants(), PROMPTLY,
                 "no process left")


# -- 17. an executor created before the program forks ----------------------------------------
def test_an_unused_executor_created_before_a_fork_works_in_the_child(make):
    unused = make("forkexec", 2)          # e.g. a module-level pool in a preforking server
    used = make("forkexec", 1)
    assert used.submit(h.square, 2).result(timeout=30) == 4
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            report = {"pid": os.getpid()}
            try:
                report["submit"] = unused.submit(h.getpid).result(timeout=30)
                report["map"] = list(unused.map(h.square, range(5)))
                report["chunked"] = list(unused.map(h.square, range(10), chunksize=3))
                unused.shutdown(wait=True)
            except BaseException as exc:  # noqa: B902
                report["unused error"] = "%s: %s" % (type(exc).__name__, exc)
            try:
                used.submit(h.square, 3)
                report["used"] = "no error"
            except BaseException as exc:  # noqa: B902
                report["used"] = "%s: %s" % (type(exc).__name__, exc)
            used.shutdown(wait=True)
            os.write(write_end, repr(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 60)
        data = os.read(read_end, 65536) if ready else b""
    finally:
        os.close(read_end)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert ready, "the child hung"
    report = ast.literal_eval(data.decode())
    assert "unused error" not in report, report
    assert report["submit"] not in (report["pid"], os.getpid())
    assert report["map"] == [0, 1, 4, 9, 16]
    assert report["chunked"] == [i * i for i in range(10)]
    assert report["used"].startswith("RuntimeError: ") and str(os.getpid()) in report["used"]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert unused.submit(h.square, 6).result(timeout=30) == 36   # still the parent's too


# -- 18. the rest of the contract ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_wait_first_exception_returns_at_the_first_failure(make, kind, gate):
    ex = make(kind, 2)
    slow = ex.submit(h.wait_for_gate, gate, None, "slow")
    ok = ex.submit(h.square, 2)
    assert ok.result(timeout=30) == 4
    bad = ex.submit(h.raise_value_error_in_task, "first failure")
    done, not_done = concurrent.futures.wait(
        [slow, ok, bad], timeout=30, return_when=concurrent.futures.FIRST_EXCEPTION)
    assert done == {ok, bad} and not_done == {slow}
    open_gate(gate)
    assert slow.result(timeout=30) == "slow"


@pytest.mark.parametrize("kind", KINDS)
def test_done_callbacks_run_exactly_once_with_their_future(make, kind, gate, tmp_path):
    started = str(tmp_path / "started")
    ex = make(kind, 1)
    calls = collections.defaultdict(list)

    def callback(name):
        return lambda future: calls[name].append(future)

    succeeds = ex.submit(h.wait_for_gate, gate, started, 5)
    fails = ex.submit(h.raise_value_error_in_task, "no")
    cancelled = [ex.submit(h.square, i) for i in range(4)]   # the last one stays pending
    h.read_pid(started)
    for name, future in (("succeeds", succeeds), ("fails", fails),
                         ("cancelled", cancelled[-1])):
        future.add_done_callback(callback(name))
    assert cancelled[-1].cancel()
    open_gate(gate)
    assert succeeds.result(timeout=30) == 5
    assert isinstance(fails.exception(timeout=30), ValueError)
    ex.shutdown(wait=True)
    succeeds.add_done_callback(callback("late"))   # after completion: called at once
    assert dict(calls) == {"succeeds": [succeeds], "fails": [fails],
                           "cancelled": [cancelled[-1]], "late": [succeeds]}


@pytest.mark.parametrize("kind", KINDS)
def test_a_cancelled_pending_future_never_runs(make, kind, gate, tmp_path):
    log, started = str(tmp_path / "log"), str(tmp_path / "started")
    ex = make(kind, 1)
    busy = ex.submit(h.wait_for_gate, gate, started)
    h.read_pid(started)
    queued = [ex.submit(h.gated_log, log, "q%d" % i) for i in range(8)]
    accepted = [future.cancel() for future in queued]
    # The stdlib's call queue holds max_workers + 1 items already marked running.
    assert all(accepted[3:]), accepted
    open_gate(gate)
    ex.shutdown(wait=True)
    assert busy.result() is None
    ran = collections.Counter(h.read_lines(log))
    for i, (future, cancelled) in enumerate(zip(queued, accepted)):
        key = "q%d" % i
        if cancelled:
            assert future.cancelled() and ran[key] == 0, key
        else:
            assert future.result() == key and ran[key] == 1, key


@pytest.mark.parametrize("kind", KINDS)
def test_future_states_stay_exact_under_eight_racing_threads(make, kind, tmp_path):
    log = str(tmp_path / "log")
    ex = make(kind, 2)
    assert ex.submit(h.square, 1).result(timeout=30) == 1
    barrier = threading.Barrier(8)
    submitted = [None] * 8
    errors = []

    def hammer(t):
        try:
            rng = random.Random(t)
            mine = []
            barrier.wait(timeout=30)
            for i in range(40):
                key = "%d-%d" % (t, i)
                mine.append((key, ex.submit(h.gated_log, log, key)))
                mine[rng.randrange(len(mine))][1].cancel()
                try:
                    mine[rng.randrange(len(mine))][1].result(timeout=0)
                except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                    pass
            submitted[t] = mine
        except BaseException as exc:  # noqa: B902
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    ex.shutdown(wait=True)
    ran = collections.Counter(h.read_lines(log))
    outcomes = collections.Counter()
    for mine in submitted:
        for key, future in mine:
            assert future.done(), key
            if future.cancelled():
                assert ran[key] == 0, "%s was cancelled but ran" % key
                outcomes["cancelled"] += 1
            else:
                assert future.result() == key and ran[key] == 1, key
                outcomes["ran"] += 1
    assert sum(ran.values()) == outcomes["ran"]
    assert outcomes["cancelled"] > 0 and outcomes["ran"] > 0, outcomes


@pytest.mark.parametrize("kind", KINDS)
def test_large_arguments_and_results_round_trip_exactly(make, kind):
    ex = make(kind, 2)
    big = os.urandom(32 << 20)
    assert ex.submit(h.identity, big).result(timeout=60) == big
    five = os.urandom(5 << 20)
    items = [b"a", five, b"b", five[::-1], b"c"]
    assert list(ex.map(h.identity, items, chunksize=2)) == items
