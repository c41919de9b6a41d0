"""forkexec.pipeline under failure: exceptions, dead stage processes, early exit, Ctrl-C,
a dead parent, and backpressure (``maxsize``) on an endless producer.

Every test runs under conftest's ``no_leftovers`` guard; the tests about stopping also
check, right after the stop, that no stage process is left (the guard alone would wait
for them for seconds).
"""

import ctypes
import faulthandler
import gc
import itertools
import mmap
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import descendants, reap_orphans
from forkexec import RemoteTraceback
from forkexec import pipeline as pl

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: What "within a second" is measured against (from the failure to the raise).
PROMPTLY = 1.0


def forever():
    yield from itertools.count()


def none_left():
    """The stage processes are all gone: nothing below this process, not even a zombie."""
    return descendants() == {}


class Boom(Exception):
    pass


def fail_at_10(x):
    if x == 10:
        raise Boom(repr(time.monotonic()))   # CLOCK_MONOTONIC is system-wide
    return x


# -- exceptions ------------------------------------------------------------------------------

def test_an_exception_at_item_10_with_maxsize_4_and_4_workers_raises_within_a_second():
    stage = pl.map(fail_at_10, pl.producer(forever, maxsize=4), workers=4, maxsize=4,
                   name="fragile")
    with pytest.raises(Boom) as info:
        for _ in stage:
            pass
    raised_at = float(info.value.args[0])
    assert time.monotonic() - raised_at < PROMPTLY
    assert none_left()
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_at_10" in str(info.value.__cause__)
    note, = info.value.__notes__
    assert note.startswith("raised in pipeline stage 'fragile' (worker ")
    assert "pid " in note


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_the_exception_is_raised_every_time(workers):
    for _ in range(5):
        with pytest.raises(Boom):
            list(pl.map(fail_at_10, pl.producer(forever, maxsize=4), workers=workers,
                        maxsize=4))
        assert none_left()


def test_an_exception_in_a_middle_stage_reaches_a_consumer_stage():
    counted = pl.consumer(sum, pl.map(lambda x: x, pl.map(fail_at_10, pl.producer(
        forever, maxsize=4), workers=2, maxsize=4), workers=2, maxsize=4))
    with pytest.raises(Boom) as info:
        counted.run()
    assert time.monotonic() - float(info.value.args[0]) < PROMPTLY
    assert none_left()


def test_a_generator_that_raises_midway():
    def five_then_fail():
        yield from range(5)
        raise KeyError("midway")

    got = []
    with pytest.raises(KeyError, match="midway"):
        for x in pl.map(lambda x: x, pl.producer(five_then_fail), workers=2):
            got.append(x)
    assert len(got) <= 5 and set(got) <= set(range(5))

    def step(source):
        for x in source:
            if x == 3:
                raise ValueError("step broke at %d" % x)
            yield x

    with pytest.raises(ValueError, match="^step broke at 3"):
        list(pl.consumer_producer(step, pl.producer(forever), workers=2))
    assert none_left()


def test_an_exception_that_cannot_be_pickled_keeps_its_name_and_message():
    class Local(Exception):
        pass

    def fail(x):
        raise Local("not importable")

    with pytest.raises(RuntimeError, match=r"\.Local: not importable"):
        list(pl.map(fail, pl.producer(forever)))


def test_an_item_that_cannot_be_pickled_is_named():
    import pickle
    import threading
    with pytest.raises(pickle.PicklingError, match=r"^cannot send lock object"):
        list(pl.map(lambda x: threading.Lock(), pl.producer(forever)))


def test_teardown_runs_when_another_stage_fails(tmp_path):
    def setup():
        return {"mark": str(tmp_path / str(os.getpid()))}

    def teardown(mark):
        open(mark, "w").close()

    def passthrough(x, mark):
        return x

    stage = pl.map(fail_at_10, pl.map(passthrough, pl.producer(forever, maxsize=4), workers=2,
                                      maxsize=4, setup=setup, teardown=teardown))
    with pytest.raises(Boom):
        list(stage)
    assert len(os.listdir(tmp_path)) == 2


# -- dead stage processes ----------------------------------------------------------------------

def _die(how):
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "os._exit":
        os._exit(3)
    elif how == "sys.exit":
        sys.exit(4)
    elif how == "segfault":
        faulthandler.disable()   # no stack dump on the test's stderr
        ctypes.string_at(0)
    elif how == "abort":
        faulthandler.disable()
        os.abort()


@pytest.mark.parametrize("how, expected", [
    ("SIGKILL", r"killed by SIGKILL\(-9\)"),
    ("os._exit", r"exit code 3 before finishing its work"),
    ("sys.exit", r"exit code 4 before finishing its work"),
    ("segfault", r"killed by SIGSEGV\(-11\)"),
    ("abort", r"killed by SIGABRT\(-6\)"),
])
def test_a_dead_stage_worker_is_named_with_pid_and_signal_or_exit_code(how, expected):
    def dies_at_7(x):
        if x == 7:
            _die(how)
        return x

    stage = pl.map(dies_at_7, pl.producer(forever, maxsize=4), workers=2, maxsize=4,
                   name="mortal")
    with pytest.raises(pl.StageDied, match=r"^pipeline stage 'mortal' \(worker [12] of 2, "
                                           r"pid \d+\) died: " + expected) as info:
        list(stage)
    assert info.value.stage == "mortal" and info.value.pid > 0
    assert none_left()


def test_a_killed_producer_is_reported_to_a_consumer_stage():
    def suicidal():
        yield 1
        os.kill(os.getpid(), signal.SIGKILL)
        yield 2

    with pytest.raises(pl.StageDied, match=r"stage 'suicidal' .* killed by SIGKILL"):
        pl.consumer(list, pl.map(abs, pl.producer(suicidal), workers=2)).run()


def test_a_stage_process_killed_from_outside_while_idle():
    def whoami(x):
        return os.getpid()

    it = pl.iterate(pl.map(whoami, pl.producer(forever, maxsize=2), workers=1, maxsize=2))
    victim = next(it)
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(pl.StageDied, match=r"pid %d\) died: killed by SIGKILL" % victim):
        for _ in it:
            pass
    assert none_left()


# -- early exit ------------------------------------------------------------------------------

def test_break_stops_every_stage_and_leaves_nothing():
    stage = pl.map(abs, pl.map(abs, pl.producer(forever), workers=3), workers=2)
    for x in stage:
        if x > 100:
            break
    assert none_left()


def test_a_stage_process_s_own_children_are_stopped_with_it():
    def spawn(x):
        return subprocess.Popen(["sleep", "60"]).pid   # never waited for by the stage

    for grandchild in pl.map(spawn, pl.producer(forever, maxsize=2), maxsize=2):
        break
    # SIGKILLed with its stage's process group, it was re-parented to this (subreaper)
    # process; it must die at once, not after its 60 s.
    deadline = time.monotonic() + 5
    while _not_zombie(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _not_zombie(grandchild)
    # The stage may have started more than one; each is reaped once it has died.
    while True:
        reap_orphans()
        if none_left() or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert none_left()


def test_close_and_the_context_manager_stop_everything():
    it = pl.iterate(pl.map(abs, pl.producer(forever), workers=2))
    next(it)
    it.close()
    assert none_left()
    it.close()      # idempotent
    with pytest.raises(StopIteration):
        next(it)
    with pl.iterate(pl.map(abs, pl.producer(forever), workers=2)) as it:
        next(it)
    assert none_left()
    assert repr(it) == "<Pipeline stopped>"


def test_dropping_the_iterator_stops_everything():
    it = pl.iterate(pl.map(abs, pl.producer(forever), workers=2))
    next(it)
    assert not none_left()
    del it
    gc.collect()
    assert none_left()


def test_a_consumer_stage_that_returns_early_ends_the_run():
    def first_ten(source):
        return [x for x, _ in zip(source, range(10))]

    got, = pl.consumer(first_ten, pl.map(abs, pl.producer(forever), workers=2)).run()
    assert len(got) == 10 and len(set(got)) == 10
    assert none_left()


def _python(code, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def test_one_ctrl_c_stops_everything_within_a_second():
    proc = _python("""
        import itertools, os, time
        from forkexec import pipeline as pl
        def forever():
            yield from itertools.count()
        def slow(x):
            time.sleep(0.01)
            return x
        try:
            for i, x in enumerate(pl.map(slow, pl.producer(forever), workers=2)):
                if i == 0:
                    print("ready", flush=True)
        except KeyboardInterrupt:
            children = open("/proc/self/task/%d/children" % os.getpid()).read().split()
            print("stopped", time.monotonic(), len(children), flush=True)
        """, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)     # what a terminal's Ctrl-C does
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    word, stopped, children = out.split()
    assert word == "stopped", err
    assert float(stopped) - sent < PROMPTLY, err
    assert children == "0"


def test_stage_processes_exit_when_the_parent_dies():
    proc = _python("""
        import itertools
        from forkexec import pipeline as pl
        def forever():
            yield from itertools.count()
        for i, x in enumerate(pl.map(abs, pl.producer(forever), workers=2)):
            if i == 0:
                print("ready", flush=True)
                input()     # the parent waits here, its stages blocked on credit
        """, stdin=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "ready\n"
        stages = descendants(proc.pid)
        assert len(stages) == 3
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            os.path.exists("/proc/%d" % pid) and _not_zombie(pid) for pid in stages):
        time.sleep(0.01)
    assert not any(_not_zombie(pid) for pid in stages)
    reap_orphans()      # they were re-parented to this (subreaper) process


def _not_zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- backpressure ------------------------------------------------------------------------------

def test_chained_maxsize_holds_ahead_of_a_stalled_consumer():
    counter = mmap.mmap(-1, 8)      # shared with the forked producer

    def counting():
        for i in itertools.count(1):
            struct.pack_into("q", counter, 0, i)
            yield i

    maxsize = 8
    stage = pl.map(abs, pl.map(abs, pl.producer(counting, maxsize=maxsize), workers=2,
                               maxsize=maxsize), workers=2, maxsize=maxsize)
    with pl.iterate(stage) as it:
        next(it)
        time.sleep(0.5)          # the consumer stalls: everyone else runs until blocked
        produced = struct.unpack_from("q", counter)[0]
    # Each stage holds at most maxsize items in flight, plus one in hand per process.
    bound = 3 * maxsize + (1 + 2 + 2) + 1
    assert 1 <= produced <= bound, produced
    counter.close()


def test_memory_stays_bounded_with_an_endless_producer_and_a_slow_consumer():
    big = bytearray(1 << 20)

    def blobs():
        while True:
            yield bytes(big)    # a new 1 MiB object each time

    def rss_kib(pid):
        with open("/proc/%d/status" % pid) as f:
            return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])

    def total_kib(pids):
        return sum(rss_kib(pid) for pid in pids) + rss_kib(os.getpid())

    # Growth, not totals: a forked stage's RSS starts with every page it shares with this
    # process (hundreds of MiB once the test run has imported numpy, dask, scikit-learn).
    with pl.iterate(pl.map(lambda b: b, pl.producer(blobs, maxsize=4), workers=2,
                           maxsize=4)) as it:
        for i, _ in enumerate(it):
            if i == 20:
                pids = list(descendants())
                before = total_kib(pids)
            if i == 120:
                time.sleep(0.2)
                grown = total_kib(pids) - before
                break
    # 100 MiB more went through; what each process holds is a handful of 1 MiB items.
    assert grown < 60 * 1024, grown
