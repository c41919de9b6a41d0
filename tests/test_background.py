"""Background processes: served at an AF_UNIX address, detached, cleaned up, same user only.

The test process is a child subreaper (conftest), so a background process
becomes its child once the middle process exits: tests wait for it with
``waitpid`` and check its exit status.
"""

import functools
import os
import pickle
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

import interpreters
from conftest import descendants
from forkexec import ChannelBroken, MakeParallel, RemoteTraceback, start
from forkexec.background import (BackgroundCallable, BackgroundQueue, PersistentExchange,
                                 PersistentQueue, connect_background)
from forkexec.wire import encode

NOBODY = 65534
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def needs_root(test):
    """Mark a test that acts as another user (it becomes user nobody): that needs root.

    Not root, the test is skipped, except under CI (CI=true), where the suite runs as
    root: there it fails. The attribute makes ``-k root`` select these tests.
    """
    test.needs_root = True
    if os.geteuid() == 0:
        return test
    reason = "acting as user nobody (uid %d) needs root; this runs as uid %d" % (
        NOBODY, os.geteuid())
    if not interpreters.in_ci():
        return pytest.mark.skip(reason=reason)(test)

    @functools.wraps(test)
    def fail_under_ci(*args, **kwargs):
        interpreters.skip_or_fail(reason)
    return fail_under_ci


def wait_exit(pid, timeout=15.0):
    """The wait status of background process ``pid`` (our child: we are a subreaper)."""
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], timeout)[0], "process %d did not exit" % pid
    finally:
        os.close(fd)
    return os.waitpid(pid, 0)[1]


def exit_code(status):
    assert os.WIFEXITED(status), "killed by signal %d" % os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def socket_dir(address):
    """The directory holding the socket that ``address`` names (following a link)."""
    return os.path.dirname(os.path.realpath(address))


def assert_cleaned_up(address, directory):
    assert not os.path.lexists(address)
    assert not os.path.lexists(os.path.join(directory, "socket"))
    if os.path.basename(directory).startswith("forkexec-"):
        assert not os.path.exists(directory)


class Gate:
    """A pipe a background process waits on until the test opens it."""

    def __init__(self):
        self.read_end, self.write_end = os.pipe()

    def wait(self):
        os.read(self.read_end, 1)

    def open(self):
        os.write(self.write_end, b"x")

    def close(self):
        os.close(self.read_end)
        os.close(self.write_end)


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


@pytest.fixture
def shared_dir():
    """A directory anyone may enter and write to, like /tmp (tmp_path is private)."""
    path = tempfile.mkdtemp(dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path)


def gated_answer(channel, gate, answer):
    gate.wait()
    channel.send(answer)


def as_nobody(fn):
    """Run ``fn()`` in a child that became user nobody; returns the text it returned."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, fn().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with open(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return text


def try_connect(path):
    def attempt():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            return type(exc).__name__
        finally:
            sock.close()
        return "connected"
    return attempt


# -- results ------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["private", "shared"])
def test_background_queue_gets_the_result(tmp_path, shared_dir, where):
    address = str(tmp_path / "task.socket") if where == "private" else shared_dir + "/t.sock"
    pid = BackgroundCallable(address, MakeParallel(pow))(2, 10)
    directory = socket_dir(address)
    assert list(BackgroundQueue(address)) == [1024]
    assert exit_code(wait_exit(pid)) == 0
    assert_cleaned_up(address, directory)


def test_connect_succeeds_before_the_background_process_accepts(tmp_path, gate):
    address = str(tmp_path / "s")
    pid = BackgroundCallable(address, gated_answer)(gate, "late")
    channel = connect_background(address)  # the process has not even started to serve
    assert channel.pid == pid
    gate.open()
    assert channel.receive() == "late"
    channel.close()
    assert exit_code(wait_exit(pid)) == 0
    assert not os.path.lexists(address)


def test_start_then_connect_never_races(tmp_path):
    for i in range(10):
        address = str(tmp_path / ("s%d" % i))
        pid = BackgroundCallable(address, MakeParallel(str))(i)
        assert list(BackgroundQueue(address)) == [str(i)]
        assert exit_code(wait_exit(pid)) == 0


def test_a_large_result_arrives_whole(tmp_path):
    address = str(tmp_path / "big")
    pid = BackgroundCallable(address, MakeParallel(bytes))(20 << 20)
    assert list(BackgroundQueue(address)) == [bytes(20 << 20)]
    assert exit_code(wait_exit(pid)) == 0


def sends_nothing(channel, gate):
    gate.wait()


def test_a_background_process_that_sends_nothing_is_reported(tmp_path, gate):
    address = str(tmp_path / "silent")
    pid = BackgroundCallable(address, sends_nothing)(gate)
    queue = BackgroundQueue(address)
    gate.open()
    with pytest.raises(ChannelBroken, match="process %d ended without sending a result" % pid):
        list(queue)
    assert exit_code(wait_exit(pid)) == 0


def test_persistent_queue_gathers_many_background_processes(tmp_path):
    pids = [BackgroundCallable(str(tmp_path / ("t%d" % i)), MakeParallel(pow))(i, 2)
            for i in range(4)]
    queue = PersistentQueue(limit=2)
    for i in range(4):
        queue.connect(str(tmp_path / ("t%d" % i)))
    assert sorted(queue) == [0, 1, 4, 9]
    assert [exit_code(wait_exit(pid)) for pid in pids] == [0, 0, 0, 0]
    assert os.listdir(tmp_path) == []


class Collect(PersistentExchange):
    def store_data(self, channel):
        self.results.append(channel.receive())


def test_persistent_exchange_manage_and_connect(tmp_path):
    address = str(tmp_path / "m")
    starter = Collect(limit=1)
    pid = starter.manage(address, MakeParallel(sorted))([3, 1, 2])
    del starter
    exchange = Collect(limit=1)
    exchange.results = []
    exchange.connect(address)
    exchange.finish()
    assert exchange.results == [[1, 2, 3]]
    assert exit_code(wait_exit(pid)) == 0


def echo_twice(channel):
    try:
        channel.receive(timeout=0.05)
    except TimeoutError:
        channel.send("nothing yet")
    channel.send(2 * channel.receive())


def test_background_process_receives_from_its_client(tmp_path):
    address = str(tmp_path / "e")
    pid = BackgroundCallable(address, echo_twice)()
    channel = connect_background(address)
    assert channel.receive(timeout=10) == "nothing yet"
    channel.send(21)
    assert channel.receive(timeout=10) == 42
    channel.close()
    assert exit_code(wait_exit(pid)) == 0


def test_results_left_unread_go_to_the_next_client(tmp_path):
    address = str(tmp_path / "u")
    pid = BackgroundCallable(address, MakeParallel(str.upper))("kept")
    first = connect_background(address)
    assert select.select([first], [], [], 10)[0]  # the result is there; leave it unread
    first.close()
    assert list(BackgroundQueue(address)) == ["KEPT"]
    assert exit_code(wait_exit(pid)) == 0


# -- detaching ----------------------------------------------------------------------------
def test_background_process_is_detached(tmp_path, gate):
    address = str(tmp_path / "d")
    pid = BackgroundCallable(address, gated_answer)(gate, "done")
    # The middle process is already reaped: no zombie, only the background process.
    assert list(descendants()) == [pid]
    assert descendants()[pid] != "Z"
    # In a session of its own, and not its leader: it can never get a controlling terminal.
    assert os.getsid(pid) not in (os.getsid(0), pid)
    for fd in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == os.devnull
    gate.open()
    assert list(BackgroundQueue(address)) == ["done"]
    assert exit_code(wait_exit(pid)) == 0


START_AND_RECONNECT = textwrap.dedent("""
    import sys
    from forkexec import MakeParallel, Queue
    from forkexec.background import BackgroundCallable, BackgroundQueue, PersistentQueue

    def square(x):
        return x * x

    def task(i):
        queue = Queue(limit=2)
        calc = queue.manage(MakeParallel(square))
        for j in range(3):
            calc(10 * i + j)
        return i, sorted(queue)

    if "--start" in sys.argv:
        for i in range(3):
            print(BackgroundCallable("task-%d.socket" % i, MakeParallel(task))(i))
        print(BackgroundCallable("total.socket", MakeParallel(sum))(range(5)))
    else:
        queue = PersistentQueue(limit=2)
        for i in range(3):
            queue.connect("task-%d.socket" % i)
        print(sorted(queue))
        print(list(BackgroundQueue("total.socket")))
""")


def test_start_then_reconnect_from_another_process(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(START_AND_RECONNECT)
    env = dict(os.environ, PYTHONPATH=ROOT)

    def run(flag):
        # Output is captured: run() returns only once every holder of the pipes
        # has closed them, so background processes must not hold them.
        done = subprocess.run([sys.executable, str(script), flag], cwd=str(tmp_path), env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    pids = [int(line) for line in run("--start")]
    alive = descendants()  # the creators have exited; the background processes wait
    assert all(alive.get(pid) not in (None, "Z") for pid in pids)
    assert run("--reconnect") == [
        "[(0, [0, 1, 4]), (1, [100, 121, 144]), (2, [400, 441, 484])]", "[10]"]
    assert [exit_code(wait_exit(pid)) for pid in pids] == [0, 0, 0, 0]
    assert sorted(os.listdir(tmp_path)) == ["prog.py"]


# -- every way out removes the socket ---------------------------------------------------------
def fail(message):
    raise ValueError(message)


def test_exception_is_sent_and_socket_removed(tmp_path, shared_dir):
    address = shared_dir + "/x"
    pid = BackgroundCallable(address, MakeParallel(fail))("boom")
    directory = socket_dir(address)
    with pytest.raises(ValueError, match="^boom$") as info:
        list(BackgroundQueue(address))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in fail" in str(info.value.__cause__)
    assert exit_code(wait_exit(pid)) == 1
    assert_cleaned_up(address, directory)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
@pytest.mark.parametrize("where", ["private", "shared"])
def test_signal_removes_the_socket(tmp_path, shared_dir, gate, signum, where):
    address = str(tmp_path / "k") if where == "private" else shared_dir + "/k"
    pid = BackgroundCallable(address, gated_answer)(gate, "never")
    directory = socket_dir(address)
    os.kill(pid, signum)
    status = wait_exit(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signum
    assert_cleaned_up(address, directory)


@pytest.mark.parametrize("where", ["private", "shared"])
def test_nobody_connecting_in_time_ends_the_process(tmp_path, shared_dir, where):
    address = str(tmp_path / "t") if where == "private" else shared_dir + "/t"
    pid = BackgroundCallable(address, MakeParallel(abs), timeout=0.2)(-1)
    directory = socket_dir(address)
    assert exit_code(wait_exit(pid)) == 1
    assert_cleaned_up(address, directory)
    with pytest.raises(FileNotFoundError, match="cannot reach a background process"):
        connect_background(address)


@pytest.mark.parametrize("timeout", [0, -1, None, "10"])
def test_timeout_must_be_positive(timeout):
    with pytest.raises(ValueError, match="^timeout must be a positive number of seconds"):
        BackgroundCallable("unused", MakeParallel(abs), timeout=timeout)


@pytest.mark.parametrize("where", ["private", "shared"])
def test_address_in_use_is_refused_and_left_alone(tmp_path, shared_dir, gate, monkeypatch,
                                                  where):
    runtime = tmp_path / "runtime"  # where private directories are made
    runtime.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(runtime))
    address = str(tmp_path / "busy") if where == "private" else shared_dir + "/busy"
    pid = BackgroundCallable(address, gated_answer)(gate, "first")
    made = os.listdir(runtime)
    with pytest.raises(FileExistsError, match="already exists"):
        BackgroundCallable(address, gated_answer)(gate, "second")
    assert os.listdir(runtime) == made  # the second call left nothing behind
    gate.open()
    assert list(BackgroundQueue(address)) == ["first"]
    assert exit_code(wait_exit(pid)) == 0


# -- same user only ------------------------------------------------------------------------------
def test_socket_in_a_shared_directory_lives_in_a_private_one(shared_dir, gate):
    address = shared_dir + "/p"
    pid = BackgroundCallable(address, gated_answer)(gate, "ok")
    assert os.path.islink(address)
    directory = socket_dir(address)
    dir_stat, sock_stat = os.stat(directory), os.stat(os.path.realpath(address))
    assert dir_stat.st_uid == sock_stat.st_uid == os.geteuid()
    assert stat.S_IMODE(dir_stat.st_mode) == 0o700
    assert stat.S_ISSOCK(sock_stat.st_mode) and stat.S_IMODE(sock_stat.st_mode) == 0o600
    gate.open()
    assert list(BackgroundQueue(address)) == ["ok"]
    assert exit_code(wait_exit(pid)) == 0
    assert_cleaned_up(address, directory)


def test_socket_in_a_private_directory_is_made_there(tmp_path, gate):
    address = str(tmp_path / "p")
    pid = BackgroundCallable(address, gated_answer)(gate, "ok")
    sock_stat = os.lstat(address)
    assert stat.S_ISSOCK(sock_stat.st_mode) and stat.S_IMODE(sock_stat.st_mode) == 0o600
    gate.open()
    assert list(BackgroundQueue(address)) == ["ok"]
    assert exit_code(wait_exit(pid)) == 0


@needs_root
def test_other_users_cannot_reach_a_socket_in_a_shared_directory(shared_dir, gate):
    address = shared_dir + "/n"
    pid = BackgroundCallable(address, gated_answer)(gate, "mine")
    assert as_nobody(try_connect(address)) == "PermissionError"
    gate.open()
    assert list(BackgroundQueue(address)) == ["mine"]
    assert exit_code(wait_exit(pid)) == 0


@needs_root
def test_each_guard_refuses_another_user_on_its_own(shared_dir):
    """Directory, then socket mode, then SO_PEERCRED: loosen each guard in turn."""
    directory = os.path.join(shared_dir, "private")
    os.mkdir(directory, 0o700)
    address = os.path.join(directory, "g")
    pid = BackgroundCallable(address, MakeParallel(str))("owner's")
    assert as_nobody(try_connect(address)) == "PermissionError"       # the directory
    os.chmod(directory, 0o711)
    assert as_nobody(try_connect(address)) == "PermissionError"       # the socket's mode

    def connect_and_read():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        sock.settimeout(10)
        return "refused" if sock.recv(1) == b"" else "served"

    os.chmod(address, 0o666)
    assert as_nobody(connect_and_read) == "refused"                   # SO_PEERCRED
    assert list(BackgroundQueue(address)) == ["owner's"]
    assert exit_code(wait_exit(pid)) == 0
    assert not os.path.lexists(address)


class Bomb:
    """Unpickling it would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@needs_root
def test_client_refuses_a_process_of_another_user(tmp_path):
    address, marker = str(tmp_path / "other"), str(tmp_path / "unpickled")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # another user's "background process", eager to send a pickle
        try:
            os.setuid(NOBODY)
            listener.listen(1)  # SO_PEERCRED reports who listened
            os.write(ready_w, b"x")
            listener.settimeout(10)
            conn, _ = listener.accept()
            conn.sendmsg(encode(Bomb(marker)))
            conn.settimeout(10)
            conn.recv(1)
        finally:
            os._exit(0)
    listener.close()
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    with pytest.raises(PermissionError, match="runs as uid %d, not as this user" % NOBODY):
        PersistentQueue().connect(address)
    os.waitpid(pid, 0)
    assert not os.path.exists(marker)
    assert pickle.loads(pickle.dumps(Bomb(marker))) is None and os.path.isdir(marker)


def test_exit_leaves_an_address_taken_over_since_alone(tmp_path, gate):
    address = str(tmp_path / "r")
    first = BackgroundCallable(address, gated_answer)(gate, "first")
    os.unlink(address)  # the user removes it and starts another process there
    second = BackgroundCallable(address, MakeParallel(str))("second")
    os.kill(first, signal.SIGTERM)
    assert os.WTERMSIG(wait_exit(first)) == signal.SIGTERM
    assert list(BackgroundQueue(address)) == ["second"]
    assert exit_code(wait_exit(second)) == 0


def kill_forked_worker(channel, gate):
    worker = start(gated_answer, gate, "never")
    channel.send(worker.pid)
    channel.send(worker.wait())
    channel.receive()  # until the test has looked at the socket


def test_a_process_forked_in_the_background_dies_of_its_signal_alone(tmp_path, gate):
    address = str(tmp_path / "w")
    pid = BackgroundCallable(address, kill_forked_worker)(gate)
    client = connect_background(address)
    worker = client.receive(timeout=10)
    os.kill(worker, signal.SIGTERM)
    status = client.receive(timeout=10)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert os.path.lexists(address)  # the worker did not take the socket with it
    client.send("seen")
    client.close()
    assert exit_code(wait_exit(pid)) == 0
