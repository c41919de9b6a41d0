"""Channel, create(), start() and waitall(): one link to one forked child."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import forkexec
from forkexec import ChannelBroken, ChannelClosed, RemoteTraceback, wire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CustomError(Exception):
    pass


def child_main(body):
    """Run ``body`` in a create() child; never return into pytest."""
    code = 0
    try:
        code = body() or 0
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 70
    finally:
        os._exit(code)


def exited_within(channel, seconds):
    """Poll for the child's exit without blocking forever; its wait status or None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = channel.wait(os.WNOHANG)
        if status is not None:
            return status
        time.sleep(0.01)
    return None


def run_program(source, **kwargs):
    """Run a Python program with forkexec importable and stdio block-buffered."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PYTHONUNBUFFERED", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source)], env=env,
                          capture_output=True, text=True, timeout=60, **kwargs)


def echo(channel, prefix, *, suffix):
    """Send items back decorated, until None or until the parent goes away."""
    try:
        for item in iter(channel.receive, None):
            channel.send(prefix + item + suffix)
    except ChannelBroken:
        pass


# -- creating children -------------------------------------------------------------

def test_create_returns_a_channel_in_both_processes():
    channel = forkexec.create()
    if channel.pid == 0:
        child_main(lambda: channel.send((os.getpid(), channel.receive() * 2)))
    with channel:
        channel.send(21)
        pid, doubled = channel.receive()
    assert (pid, doubled) == (channel.pid, 42)
    assert channel.closed and os.WIFEXITED(channel.status)
    assert os.WEXITSTATUS(channel.status) == 0


def test_start_passes_arguments_and_exits_cleanly():
    channel = forkexec.start(echo, "<", suffix=">")
    for word in ["a", "bc", "é" * 3]:
        channel.send(word)
        assert channel.receive() == "<" + word + ">"
    channel.send(None)
    with pytest.raises(ChannelBroken):
        channel.receive()
    assert channel.wait() == 0
    channel.close()


def test_waitall_reaps_every_child_it_created():
    channels = [forkexec.start(lambda ch, n=n: ch.send(n)) for n in range(3)]
    assert sorted(ch.receive() for ch in channels) == [0, 1, 2]
    forkexec.waitall()
    for ch in channels:
        assert ch.wait() == 0           # the status waitall() collected
        with pytest.raises(ChildProcessError):
            os.waitpid(ch.pid, os.WNOHANG)
        ch.close()


def test_waitall_leaves_other_children_alone():
    pid = os.fork()
    if pid == 0:
        os._exit(5)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)    # a zombie now, not reaped
    channel = forkexec.start(lambda ch: None)
    try:
        forkexec.waitall()
        assert channel.wait() == 0
    finally:
        reaped, status = os.waitpid(pid, os.WNOHANG)        # still ours to reap
        channel.close()
    assert reaped == pid and os.WEXITSTATUS(status) == 5


def test_start_as_context_manager_reaps():
    with forkexec.start(lambda ch: ch.send(os.getpid())) as channel:
        pid = channel.receive()
    assert pid == channel.pid and channel.closed and channel.status == 0


# -- messages ----------------------------------------------------------------------

def test_large_and_many_messages_both_ways():
    big = os.urandom(5 << 20)
    channel = forkexec.start(echo, b"", suffix=b"")
    channel.send(big)
    assert channel.receive() == big
    channel.send_many([bytes([i]) for i in range(200)])
    assert [channel.receive() for _ in range(200)] == [bytes([i]) for i in range(200)]
    channel.send(None)
    assert channel.wait() == 0
    channel.close()


def test_child_streams_with_send_many():
    def producer(ch):
        ch.send_many(range(10000))
        ch.send("done")

    with forkexec.start(producer) as channel:
        got = [channel.receive() for _ in range(10001)]
    assert got == list(range(10000)) + ["done"]


def test_poll_and_receive_timeout():
    channel = forkexec.start(echo, 1, suffix=1)
    assert not channel.poll(0)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^nothing received within 0.05 seconds$"):
        channel.receive(timeout=0.05)
    assert 0.04 <= time.monotonic() - start < 5
    channel.send(1)
    assert channel.poll(10)
    assert channel.receive(timeout=0) == 3
    channel.send(None)
    channel.close()
    channel.wait()


# -- failures in the child -----------------------------------------------------------

def fails(channel, message):
    raise CustomError(message)


def test_child_exception_reaches_the_parent_with_its_traceback():
    channel = forkexec.start(fails, "bad input")
    with pytest.raises(CustomError, match=r"^bad input$") as info:
        channel.receive()
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fails" in str(cause) and "raise CustomError(message)" in str(cause)
    assert os.WEXITSTATUS(channel.wait()) == 1
    channel.close()


def test_unpicklable_child_exception_keeps_its_name_and_text():
    class Local(Exception):
        pass

    def raises_local(channel):
        raise Local("only here")

    channel = forkexec.start(raises_local)
    with pytest.raises(RuntimeError, match=r"Local: only here$") as info:
        channel.receive()
    assert "raise Local" in str(info.value.__cause__)
    channel.close()
    channel.wait()


def test_start_child_exit_code_follows_system_exit():
    channel = forkexec.start(lambda ch: sys.exit(4))
    assert os.WEXITSTATUS(channel.wait()) == 4
    channel.close()


@pytest.mark.parametrize("obj,name", [(lambda: 1, "function"),
                                      (threading.Lock(), "lock"),
                                      ([1, threading.Lock()], "list")])
def test_unpicklable_object_fails_only_that_send(obj, name):
    channel = forkexec.start(echo, 0, suffix=1)
    with pytest.raises(pickle.PicklingError, match=r"^cannot send %s object: " % name):
        channel.send(obj)
    with pytest.raises(pickle.PicklingError, match=r"^cannot send %s object: " % name):
        channel.send_many([5, obj, 6])        # nothing of the batch is sent
    channel.send(10)
    assert channel.receive() == 11
    channel.send(None)
    channel.close()
    assert channel.wait() == 0


def test_child_unpicklable_send_leaves_the_channel_usable():
    def child(ch):
        try:
            ch.send(threading.Lock())
        except pickle.PicklingError as exc:
            ch.send(str(exc))

    with forkexec.start(child) as channel:
        assert channel.receive().startswith("cannot send lock object: ")


# -- closed and broken ----------------------------------------------------------------

def test_use_after_close_is_channel_closed():
    channel = forkexec.start(echo, 0, suffix=0)
    channel.close()
    channel.close()                               # idempotent
    for use in (lambda: channel.send(1), channel.receive, channel.poll,
                lambda: channel.send_many([1])):
        with pytest.raises(ChannelClosed, match=r"^channel is closed$"):
            use()
    assert channel.fileno() == -1
    assert channel.wait() == 0                    # the child saw EOF and left


@pytest.mark.parametrize("how,exitcode,text", [
    (lambda: os._exit(3), 3, "exit code 3"),
    (lambda: os.kill(os.getpid(), signal.SIGKILL), -9, "killed by SIGKILL(-9)"),
])
def test_dead_peer_is_channel_broken_with_pid_and_status(how, exitcode, text):
    channel = forkexec.create()
    if channel.pid == 0:
        child_main(how)
    with pytest.raises(ChannelBroken) as info:
        channel.receive()
    err = info.value
    assert err.pid == channel.pid and err.exitcode == exitcode
    assert str(err) == "channel is broken: process %d went away (%s)" % (channel.pid, text)
    with pytest.raises(ChannelBroken) as info:
        channel.send(b"x" * 100000)
    assert info.value.exitcode == exitcode
    channel.close()


def test_peer_killed_while_parent_waits():
    channel = forkexec.start(echo, 0, suffix=0)
    killer = threading.Timer(0.05, os.kill, (channel.pid, signal.SIGKILL))
    killer.start()
    with pytest.raises(ChannelBroken) as info:
        channel.receive()
    killer.join()
    assert info.value.exitcode == -signal.SIGKILL
    channel.close()


def test_child_killed_mid_message():
    def child():
        partial = b"".join(bytes(b) for b in wire.encode(b"x" * 100000))[:5000]
        os.write(channel.fileno(), b"".join(map(bytes, wire.encode("ready"))) + partial)
        signal.pause()

    channel = forkexec.create()
    if channel.pid == 0:
        child_main(child)
    assert channel.receive() == "ready"
    with pytest.raises(TimeoutError):
        channel.receive(timeout=0.05)             # half a message is no message
    os.kill(channel.pid, signal.SIGKILL)
    with pytest.raises(forkexec.ChannelError) as info:
        channel.receive()
    assert "middle of a message" in str(info.value)
    assert isinstance(info.value, ChannelBroken) and info.value.exitcode == -9
    channel.close()


def test_child_sees_the_parent_go_away():
    def child():
        try:
            channel.receive()
        except ChannelBroken as exc:
            return 0 if (exc.pid, str(exc)) == (0, "channel is broken: the parent process "
                                                   "went away (it closed its end)") else 1
        return 2

    channel = forkexec.create()
    if channel.pid == 0:
        child_main(child)
    channel.close()
    assert channel.wait() == 0


def test_send_to_dead_child_is_an_error_even_with_default_sigpipe():
    result = run_program("""
        import os, signal, forkexec
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        ch = forkexec.start(lambda ch: None)
        ch.wait()
        try:
            for _ in range(100):
                ch.send(b"x" * 65536)
        except forkexec.ChannelBroken as exc:
            print("broken", exc.exitcode)
        ch.close()
    """)
    assert (result.returncode, result.stdout) == (0, "broken 0\n"), result.stderr


# -- what a child inherits -------------------------------------------------------------

def socket_inode(fd):
    return os.readlink("/proc/self/fd/%d" % fd)


def test_child_closes_other_channels_ends():
    first = forkexec.start(echo, 0, suffix=0)
    second = forkexec.start(echo, 0, suffix=0)
    second.send(1)
    assert second.receive() == 1              # second is running and holds its own end
    fds = os.listdir("/proc/%d/fd" % second.pid)
    targets = {os.readlink("/proc/%d/fd/%s" % (second.pid, fd)) for fd in fds}
    assert socket_inode(first.fileno()) not in targets
    # so the first child sees EOF when we close our end, while the second lives on
    first.close()
    assert exited_within(first, 10) == 0, "the first child never saw EOF"
    second.send(None)
    second.close()
    assert second.wait() == 0


def test_plain_os_fork_child_does_not_keep_channel_ends():
    channel = forkexec.start(echo, 0, suffix=0)
    fd = channel.fileno()
    pid = os.fork()
    if pid == 0:
        try:
            os.fstat(fd)
            os._exit(1)
        except OSError:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    channel.close()
    assert channel.wait() == 0


# -- stdio and interpreter exit ---------------------------------------------------------

def test_stdio_neither_duplicated_nor_lost():
    result = run_program("""
        import sys, forkexec
        print("parent before fork")                # buffered: stdout is a pipe
        sys.stderr.write("err before fork\\n")
        def child(ch):
            print("child says hi")                 # buffered, never flushed by the child
            sys.stderr.write("child err\\n")
        for _ in range(2):
            forkexec.start(child)
        ch = forkexec.create()
        if ch.pid == 0:
            print("create child")
            sys.exit(0)
        forkexec.waitall()
        print("parent done")
    """)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out.count("parent before fork") == 1
    assert out.count("child says hi") == 2 and out.count("create child") == 1
    assert out[-1] == "parent done" and len(out) == 5
    assert result.stderr.count("err before fork") == 1
    assert result.stderr.count("child err") == 2


def test_parent_atexit_handlers_never_run_in_children():
    result = run_program("""
        import atexit, os, sys, forkexec
        atexit.register(print, "atexit in", os.getpid())
        forkexec.start(lambda ch: None)
        forkexec.start(lambda ch: sys.exit(2))
        forkexec.start(lambda ch: 1 / 0)
        ch = forkexec.create()
        if ch.pid == 0:
            sys.exit(0)                              # leaves through the interpreter
        forkexec.waitall()
        print("parent", os.getpid())
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    parent = lines[0].split()[1]
    assert lines == ["parent " + parent, "atexit in " + parent]


def test_bytes_taken_by_recv_waiting_and_fed_back_make_the_same_messages():
    """recv_waiting() reads for a thread that does not own the channel's decoder; feed()
    hands the bytes over. Messages of every size survive the split; a quiet socket gives
    None after its receive timeout, a closed peer b"" (EOF)."""
    import socket
    import struct
    left, right = socket.socketpair()
    reader = forkexec.Channel(1, left, reapable=False)
    writer = forkexec.Channel(1, right, reapable=False)

    def timeout(seconds):
        left.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))

    messages = [b"", b"x", b"y" * 5000, bytes(range(256)) * 1200, ("a", 1, None)]
    sender = threading.Thread(target=writer.send_many, args=(messages,))
    sender.start()
    timeout(10)
    got = []
    try:
        while len(got) < len(messages):
            data = reader.recv_waiting(4096)
            assert data, "the peer is writing: neither a timeout nor EOF"
            assert len(data) <= 4096
            reader.feed(data)
            while reader.has_message():
                got.append(reader.receive())
    finally:
        sender.join()
    assert got == messages
    timeout(0.05)
    assert reader.recv_waiting(4096) is None
    writer.close()
    assert reader.recv_waiting(4096) == b""
    reader.feed(b"")
    assert reader.at_eof
    reader.close()
    assert reader.recv_waiting(4096) is None
