"""TemplateLink alone: the parent's side of the template, without an executor or a thread.

Each test drives a real template the way the exchange thread does, from the test
thread: it starts the template (forked from this process, or started by a
``multiprocessing`` spawn or forkserver context), watches the control socket in a
:class:`~forkexec.exchange.Poller`, reads the records with ``records()``, wraps each
worker's channel descriptor in a :class:`~forkexec.Channel` and talks the worker
protocol (``Batch`` in, ``Results`` out) by hand. What is checked is the link's
contract: ``PREFORK`` workers start unasked, ``spawn(slot)`` answers with SPAWNED,
a worker's end is reported by EXITED with its raw wait status, ``signal`` escalates to
SIGKILL after its grace, what a worker started dies with it, ``close`` ends everything
(``abandon`` at once), and a template killed from outside shows up as a None record.
The autouse fixture of conftest.py checks that nothing is left: processes, zombies,
threads, descriptors.
"""

import multiprocessing
import os
import pickle
import re
import signal
import socket
import time

import pytest

import executor_helpers as h
from conftest import descendants, parent_of, reap_orphans, state_of
from forkexec import Channel, ChannelBroken
from forkexec._calls import call_blob
from forkexec._protocol import NO_TASK, Batch, Control, Kind, Results, Status, from_wire, to_wire
from forkexec._template import EXIT_GRACE
from forkexec._template_link import PREFORK, TemplateLink
from forkexec._worker import WorkerConfig
from forkexec.exchange import Poller

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("mp_helpers")]

METHODS = ["fork", "spawn", "forkserver"]
#: A generous bound for "at once" / "promptly", never a performance claim.
PROMPTLY = 5.0
#: A worker gets SIGKILL from the kernel the moment its template dies (PR_SET_PDEATHSIG).
DIES_WITH_TEMPLATE = 3.0


def running(pid):
    return state_of(pid) not in (None, "Z", "X")


def settle(timeout=10.0):
    """Wait until every process below this one has exited, then reap those re-parented
    here (this process is a subreaper: workers whose template died come to us)."""
    h.wait_until(lambda: all(s in ("Z", "X") for s in descendants().values()), timeout,
                 "every process of the template to exit")
    reap_orphans()


class Link:
    """A started TemplateLink, its poller, and the worker channels it delivered."""

    def __init__(self, method, nslots=2, initializer=None, max_tasks=None):
        context = multiprocessing.get_context(method)
        self.method = method
        self.config = WorkerConfig(initializer, (), max_tasks, context.Process, os.getpid(),
                                   "MainProcess")
        self.link = TemplateLink(nslots, None if method == "fork" else context)
        self.poller = Poller()
        self.channels = {}     # worker pid -> Channel
        self.backlog = []      # records read but not yet asked for
        self.link_closed = False
        self.poller_closed = False

    def start(self):
        self.link.start(self.config)
        self.poller.register(self.link.fileno(), Poller.READ, "control")
        return self

    # -- records -----------------------------------------------------------------------
    def _drain(self):
        for record in self.link.records():
            if record is not None and record.kind == Control.SPAWNED:
                # Wrapped at once: whatever the test does next, the descriptor is owned.
                assert record.fd is not None, "SPAWNED came without its descriptor"
                self.channels[record.b] = Channel(record.b, socket.socket(fileno=record.fd),
                                                  reapable=False)
            else:
                assert record is None or record.fd is None, record
            self.backlog.append(record)

    def expect(self, kind, timeout=10.0, **fields):
        """The next record of ``kind`` (None: the template's end) whose fields match."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            for i, record in enumerate(self.backlog):
                if kind is None:
                    if record is None:
                        return self.backlog.pop(i)
                elif record is not None and record.kind == kind and all(
                        getattr(record, k) == v for k, v in fields.items()):
                    return self.backlog.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no %s record %r within %.1fs; received: %r"
                                     % (kind, fields, timeout, self.backlog))
            self.poller.wait(min(remaining, 0.1))

    def quiet_for(self, seconds):
        """The records that arrive within ``seconds`` (none are expected)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poller.wait(max(0.0, deadline - time.monotonic()))
            self._drain()
        return list(self.backlog)

    def spawned(self, slot):
        """(pid, channel) of the worker of ``slot``, once SPAWNED arrives."""
        record = self.expect(Control.SPAWNED, a=slot)
        return record.b, self.channels[record.b]

    def exited(self, pid, timeout=10.0):
        """The raw wait status of worker ``pid``, once EXITED arrives."""
        return self.expect(Control.EXITED, timeout, a=pid).b

    # -- the worker protocol -------------------------------------------------------------
    @staticmethod
    def send(channel, *calls, give_back_after=None):
        """Send one batch of ``(task_id, fn, args)`` calls."""
        channel.send(to_wire(Batch([(task_id, Kind.CALL, call_blob(fn, args, {}))
                                    for task_id, fn, args in calls], give_back_after)))

    @staticmethod
    def results(channel, count, timeout=10.0):
        """{task_id: ("ok", value) | ("failed", exception)} of the next ``count`` tasks."""
        found = {}
        while len(found) < count:
            message = from_wire(channel.receive(timeout=timeout))
            assert type(message) is Results, message
            assert not message.returned, message
            for task_id, status, value, _seconds in message.entries:
                if status == Status.INLINE_OK:
                    found[task_id] = ("ok", value)
                elif status == Status.OK:
                    found[task_id] = ("ok", pickle.loads(value))
                else:
                    assert status == Status.FAILED, status
                    found[task_id] = ("failed", pickle.loads(value).exception())
        return found

    def run(self, channel, task_id, fn, *args):
        self.send(channel, (task_id, fn, args))
        outcome, value = self.results(channel, 1)[task_id]
        assert outcome == "ok", value
        return value

    def marks(self, slot):
        return self.link.marks[2 * slot], self.link.marks[2 * slot + 1]

    # -- ending ----------------------------------------------------------------------
    def close_channels(self):
        for channel in self.channels.values():
            channel.close()

    def close_link(self, abandon=False):
        """link.close(); returns how long it took."""
        begin = time.monotonic()
        try:
            self.link.close(self.poller, abandon=abandon)
        finally:
            self.link_closed = True
        return time.monotonic() - begin

    def release(self):
        self.close_channels()
        try:
            if not self.link_closed:
                self.close_link(abandon=True)
        finally:
            if not self.poller_closed:
                self.poller.close()
                self.poller_closed = True
            try:
                settle(timeout=3.0)
            except AssertionError:
                pass   # still running: conftest's leftovers check reports them, and kills them


@pytest.fixture
def make():
    made = []

    def factory(method, **kwargs):
        link = Link(method, **kwargs)
        try:
            link.start()   # a link that fails to start has released what it took
        except BaseException:
            link.poller.close()
            raise
        made.append(link)
        return link

    yield factory
    for link in made:
        link.release()


# -- starting, spawning, talking ---------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_prefork_spawns_slot_0_unasked_and_spawn_adds_a_worker(make, method):
    assert PREFORK == 1
    link = make(method)
    assert link.link.prefork == 1
    assert link.link.pid > 0 and link.link.pid != os.getpid()
    pid0, channel0 = link.spawned(0)           # never asked for
    assert link.quiet_for(0.2) == [], "the template started more than PREFORK workers"
    link.link.spawn(1)
    pid1, channel1 = link.spawned(1)
    assert len({pid0, pid1, link.link.pid, os.getpid()}) == 4
    for pid, channel in ((pid0, channel0), (pid1, channel1)):
        assert parent_of(pid) == link.link.pid, "a worker must be the template's child"
        # Received with MSG_CMSG_CLOEXEC: not inherited by programs this process starts.
        assert not os.get_inheritable(channel.fileno())
    if method != "fork":   # started by multiprocessing, but ours alone to reap
        assert link.link.process is not None
        assert link.link.process not in multiprocessing.active_children()
        assert link.link.pid not in [p.pid for p in multiprocessing.active_children()]
    assert [link.link.marks[i] for i in range(4)] == [NO_TASK] * 4
    assert link.quiet_for(0.05) == []


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_runs_in_the_worker_and_sets_its_marks(make, method):
    link = make(method)
    pid0, channel0 = link.spawned(0)
    link.link.spawn(1)
    pid1, channel1 = link.spawned(1)

    assert link.run(channel1, 41, h.getpid) == pid1
    assert link.marks(1) == (41, 41)
    assert link.marks(0) == (NO_TASK, NO_TASK)   # slot 0 ran nothing

    # One batch, three tasks: in order, one failing with its own exception type.
    link.send(channel0, (7, h.square, (6,)), (8, h.raise_value_error_in_task, ("boom",)),
              (9, h.add, ("a", "b")))
    found = link.results(channel0, 3)
    assert found[7] == ("ok", 36)
    assert found[9] == ("ok", "ab")
    outcome, error = found[8]
    assert outcome == "failed" and type(error) is ValueError and "boom" in str(error)
    assert link.marks(0) == (9, 9)
    # A result that is not a small builtin travels pickled (Status.OK).
    assert link.run(channel0, 10, h.make_payload, 3).value == 3
    assert link.marks(0) == (10, 10)
    assert link.marks(1) == (41, 41)
    assert link.quiet_for(0.05) == []


# -- workers ending ----------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_a_killed_worker_is_reported_exited_with_its_signal(make, method):
    link = make(method)
    pid, channel = link.spawned(0)
    assert link.run(channel, 1, h.square, 3) == 9
    os.kill(pid, signal.SIGKILL)
    status = link.exited(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    with pytest.raises(ChannelBroken):
        channel.receive(timeout=PROMPTLY)
    assert state_of(pid) is None, "the template reaps its workers"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_worker_that_ran_max_tasks_exits_with_code_0(make, method):
    link = make(method, max_tasks=1)
    pid, channel = link.spawned(0)
    assert link.run(channel, 1, h.square, 4) == 16
    status = link.exited(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_sigterm_ends_a_worker_that_does_not_ignore_it(make, method):
    link = make(method)
    pid, channel = link.spawned(0)
    assert link.run(channel, 1, h.square, 2) == 4
    begin = time.monotonic()
    link.link.signal(signal.SIGTERM, grace=PROMPTLY * 2)
    status = link.exited(pid)
    assert time.monotonic() - begin < PROMPTLY, "SIGTERM was not delivered at once"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_signal_escalates_to_sigkill_after_the_grace(make, method):
    link = make(method, initializer=h.ignore_sigterm)
    pid0, channel0 = link.spawned(0)
    link.link.spawn(1)
    pid1, channel1 = link.spawned(1)
    # A task answered: the initializer ran, SIGTERM is ignored from now on.
    assert link.run(channel0, 1, h.getpid) == pid0
    assert link.run(channel1, 2, h.getpid) == pid1
    grace = 0.5
    begin = time.monotonic()
    link.link.signal(signal.SIGTERM, grace=grace)
    statuses = {pid: link.exited(pid) for pid in (pid0, pid1)}
    elapsed = time.monotonic() - begin
    for pid, status in statuses.items():
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (pid, status)
    assert grace * 0.8 <= elapsed < grace + PROMPTLY, elapsed


@pytest.mark.parametrize("how", ["killed", "retired"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_what_a_worker_started_dies_with_it(make, method, how):
    link = make(method, max_tasks=1 if how == "retired" else None)
    pid, channel = link.spawned(0)
    sleeper, worker = link.run(channel, 1, h.start_sleeper)
    assert worker == pid
    if how == "killed":
        assert running(sleeper)
        os.kill(pid, signal.SIGKILL)
    # (A retired worker's group may be killed before this line: `sleep 60` gone within
    # PROMPTLY was killed.)
    status = link.exited(pid)   # a retired worker exits by itself after its one task
    assert os.WIFSIGNALED(status) == (how == "killed"), status
    h.wait_until(lambda: not running(sleeper), PROMPTLY, "the task's child to be killed")
    reap_orphans()


# -- closing -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_close_sends_exit_and_returns_once_everything_has_exited(make, method):
    link = make(method)
    pid0, channel0 = link.spawned(0)
    link.link.spawn(1)
    pid1, channel1 = link.spawned(1)
    assert link.run(channel0, 1, h.square, 5) == 25
    template = link.link.pid
    link.close_channels()   # what the exchange thread does first: workers see EOF
    took = link.close_link()
    assert took < min(PROMPTLY, EXIT_GRACE), "close waited for the template's exit grace"
    for pid in (template, pid0, pid1):
        assert state_of(pid) is None, "process %d is left after close()" % pid
    assert descendants() == {}
    assert link.link.process is None or link.link.process not in \
        multiprocessing.active_children()
    assert link.link.marks is None


@pytest.mark.parametrize("method", METHODS)
def test_close_closes_the_channels_of_workers_still_arriving(make, method):
    link = make(method)
    link.link.spawn(1)   # SPAWNED(0) and SPAWNED(1) are never read by the test
    took = link.close_link()
    assert took < min(PROMPTLY, EXIT_GRACE), \
        "a worker whose channel arrived during close() kept the template alive"
    assert link.channels == {}
    assert descendants() == {}


@pytest.mark.parametrize("method", METHODS)
def test_close_with_abandon_kills_at_once(make, method):
    link = make(method)
    pid, channel = link.spawned(0)
    link.send(channel, (1, h.sleep_and_return, (60,)))
    h.wait_until(lambda: link.marks(0)[0] == 1, PROMPTLY, "the task to start")
    template = link.link.pid
    took = link.close_link(abandon=True)   # the worker's channel is still open
    assert took < PROMPTLY
    assert state_of(template) is None
    # The workers die with their template (PR_SET_PDEATHSIG) and come to us to be reaped.
    try:
        h.wait_until(lambda: not running(pid), DIES_WITH_TEMPLATE,
                     "the worker running a task to die with its template")
    finally:
        if running(pid):   # reported above: not left to run its 60 s task
            os.kill(pid, signal.SIGKILL)
    settle()
    assert descendants() == {}
    assert link.link.marks is None


@pytest.mark.parametrize("method", METHODS)
def test_a_template_killed_from_outside_ends_the_records(make, method):
    link = make(method)
    pid, channel = link.spawned(0)
    assert link.run(channel, 1, h.square, 7) == 49
    os.kill(link.link.pid, signal.SIGKILL)
    assert link.expect(None) is None              # records() yields None: the template is gone
    description = link.link.exit_status(block=True)
    assert re.search(r"killed by (SIGKILL|signal 9)\b", description), description
    h.wait_until(lambda: not running(pid), DIES_WITH_TEMPLATE,
                 "the worker to die with its template")
    with pytest.raises(ChannelBroken):
        channel.receive(timeout=PROMPTLY)
    assert link.close_link() < PROMPTLY           # nothing left to wait for
    settle()
    assert descendants() == {}
