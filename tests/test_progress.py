"""Progress bars: ``map(..., progress=...)`` and ``forkexec.as_completed``.

The bar is checked as users see it: a real program whose stderr is a pseudo
terminal, or a plain pipe (where ``progress=True`` must print nothing). tqdm is
hidden from the program (``sys.modules["tqdm"] = None``) to see the plain bar.
"""

import fcntl
import io
import os
import re
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

import executor_helpers as h
import forkexec
from forkexec import ForkExchangeExecutor
from forkexec.progress import PlainBar
from interpreters import skip_or_fail

pytestmark = pytest.mark.timeout(90)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = textwrap.dedent("""
    import sys
    if {hide_tqdm}:
        sys.modules["tqdm"] = None   # as if tqdm were not installed
    from forkexec import ForkExchangeExecutor

    def square(x):
        return x * x

    with ForkExchangeExecutor(2) as ex:
        got = list(ex.map(square, range(50), chunksize={chunksize}, progress={progress}))
    assert got == [x * x for x in range(50)]
    print("ok")
""")


def run(progress, hide_tqdm=True, chunksize=1, terminal=False):
    """Run the program; return (stdout, what it wrote to stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = PROGRAM.format(hide_tqdm=hide_tqdm, chunksize=chunksize, progress=progress)
    if not terminal:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # 100 columns
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=slave, env=env)
    finally:
        os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:   # EIO: every writer of the terminal has closed it
                break
            if not data:
                break
            chunks.append(data)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, b"".join(chunks)
    return out, b"".join(chunks).decode(errors="replace")


def need_tqdm():
    try:
        import tqdm  # noqa: F401
    except ImportError:
        skip_or_fail("tqdm is not installed (pip install 'forkexec[progress]')")


def test_plain_bar_on_a_terminal_counts_items_not_chunks():
    out, err = run("True", chunksize=10, terminal=True)
    assert out == "ok\n"
    assert "square: |" in err and "50/50 100%" in err
    assert not re.search(r" [0-9]+/5 ", err)   # never a count of the 5 chunks of 10
    assert err.rstrip("\r\n").count("\n") == 0   # one line, redrawn in place


def test_tqdm_bar_on_a_terminal():
    need_tqdm()
    out, err = run("True", hide_tqdm=False, terminal=True)
    assert out == "ok\n"
    assert "square: 100%" in err and "50/50 [" in err   # tqdm's format, not the plain bar


def test_nothing_is_printed_on_a_pipe_unless_asked():
    assert run("True") == ("ok\n", "")
    assert run("True", hide_tqdm=False) == ("ok\n", "")
    out, err = run("'always'")
    assert out == "ok\n" and "50/50 100%" in err and err.endswith("\n")


def test_progress_to_a_file_object_and_as_completed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)   # tqdm's monitor thread would outlive us
    bar = io.StringIO()
    with ForkExchangeExecutor(2) as ex:
        assert list(ex.map(h.square, range(7), progress=bar)) == [x * x for x in range(7)]
        futures = [ex.submit(h.square, x) for x in range(5)]
        done = list(forkexec.as_completed(futures, progress=io.StringIO()))
        assert sorted(f.result() for f in done) == [0, 1, 4, 9, 16]
        # Without progress it is the standard as_completed.
        assert set(forkexec.as_completed(futures, progress=None)) == set(futures)
    assert "7/7" in bar.getvalue()


def test_bad_progress_values_are_refused():
    with ForkExchangeExecutor(1) as ex:
        with pytest.raises(ValueError, match="^progress must be True, False, None, 'always' "
                                             "or a file object, not 'yes'$"):
            ex.map(h.square, range(3), progress="yes")
        with pytest.raises(TypeError, match="^progress must be"):
            forkexec.as_completed([], progress=3)


def test_plain_bar_draws_at_most_ten_times_a_second_and_ends_its_line():
    now = [0.0]
    out = io.StringIO()
    bar = PlainBar(1000, "job", out, clock=lambda: now[0])
    for _ in range(1000):
        now[0] += 0.0001   # 1000 items in 0.1 s
        bar.update()
    bar.close()
    text = out.getvalue()
    assert text.count("\r") <= 4 and text.endswith("1000/1000 100% 0.1s\n")
    unknown = io.StringIO()
    bar = PlainBar(None, None, unknown, clock=lambda: 2.0)
    bar.update(3)
    bar.close()
    assert unknown.getvalue().endswith("3 items 0.0s\n")
