"""Acceptance: the pprocess 0.5.1 sdist's own programs run on compat/pprocess.py.

The sdist is downloaded with pip (``pip download``) into a cache directory,
``$FORKEXEC_TEST_CACHE`` if set, else ``forkexec-tests`` in the user's cache
directory (``$XDG_CACHE_HOME`` or ``~/.cache``), and reused from there by later
sessions; its SHA-256 is checked either way. When it is not cached and cannot
be downloaded, the tests skip, except under CI (``CI=true``), where they fail:
CI must not pass without running them. Its ``examples/`` and ``tests/`` are
Python 2; they are converted with 2to3 and nothing else, except one mechanical
substitution: the per-cell ``delay = 1`` becomes ``delay = 0.01``, so a 10x10
grid takes a second instead of 100.

2to3 comes from, in order: ``lib2to3`` in this interpreter (Python <= 3.12);
another interpreter on ``PATH`` or under pyenv that still has it; else
``fissix`` (the maintained fork of lib2to3, same fixers, same output),
pip-installed into the same cache directory.

Each program runs in a subprocess with ``compat/`` first on ``PYTHONPATH``, in
an empty working directory (the background examples make their sockets
there). Afterwards no process may still run and no file may be left there.
"""

import ast
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

import conftest
import interpreters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPAT = os.path.join(ROOT, "compat")
SDIST = "pprocess==0.5.1"
SDIST_FILE = "pprocess-0.5.1.tar.gz"
#: As PyPI lists it (https://pypi.org/simple/pprocess/).
SDIST_SHA256 = "9b70f097587ac403523cd0e055a504b308f49f84aaa831dc842fe8cc5f51b68c"
#: Per program run; a grid takes about a second.
RUN_TIMEOUT = 60
#: How long processes a program leaves behind may take to exit.
EXIT_GRACE = 10.0

#: Every parallel example and the sequential program whose grid it must print:
#: the one computing the cell the same way (inline, calculate(i, j) returning
#: the cell or an (i, j, cell) triple, or calculate((i, j)) through map).
REFERENCES = {
    "simple_create": "simple",
    "simple_create_map": "simple",
    "simple_create_queue": "simple",
    "simple_managed_map": "simple1",
    "simple_managed_map_reusable": "simple1",
    "simple_managed": "simple2",
    "simple_managed_queue": "simple2",
    "simple_start": "simple2",
    "simple_start_queue": "simple2",
    "simple_continuous_queue": "simple2",
    "simple_pmap": "simple_map",
    "simple_pmap_iter": "simple_map",
    "simple_background_queue": "simple2",
    "simple_persistent_queue": "simple2",
    "simple_persistent_managed": "simple2",
}
BACKGROUND = ["simple_background_queue", "simple_persistent_queue", "simple_persistent_managed"]
FOREGROUND = sorted(set(REFERENCES) - set(BACKGROUND))
SEQUENTIAL = sorted(set(REFERENCES.values()))

EXPECTED_GRID = ["".join("%d " % (i * 10 + j) for j in range(10)) for i in range(10)]
GRID_LINE = re.compile(r"^(\d+ )+$")
#: pip's words when it cannot reach the package index at all.
UNREACHABLE = ("NewConnectionError", "Network is unreachable", "Temporary failure in name "
               "resolution", "Name or service not known", "ConnectTimeout", "No route to host",
               "Connection refused", "ProxyError")


def cache_dir():
    """Where downloads are kept between sessions (see the module docstring)."""
    if os.environ.get("FORKEXEC_TEST_CACHE"):
        return Path(os.environ["FORKEXEC_TEST_CACHE"])
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(user_cache) / "forkexec-tests"


def _pip(args, workdir, what):
    """Run pip; if it cannot reach the package index, skip (fail under CI) saying that
    ``what`` could not be downloaded."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--retries", "1",
           "--timeout", "20"] + args
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        why = [line.strip() for line in output.splitlines()
               if any(marker in line for marker in UNREACHABLE)]
        if why:
            interpreters.skip_or_fail(
                "%s could not be downloaded (the package index is unreachable: %s) and is "
                "not cached in %s; run the tests once with network access, or set "
                "FORKEXEC_TEST_CACHE to a cache directory filled where it could"
                % (what, why[-1][:300], cache_dir()))
        pytest.fail("%s failed:\n%s" % (" ".join(cmd), output))


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _is_the_sdist(path):
    try:
        return _sha256(path) == SDIST_SHA256
    except OSError:     # missing, or a cache directory this user cannot read
        return False


def _new_dir_in_cache(tmp_path_factory, prefix):
    """A new directory beside the cached files (the same file system, so a rename moves
    what is made there into the cache at once); a session temporary one if the cache
    directory cannot be written, then (cache, new directory)."""
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return cache, Path(tempfile.mkdtemp(prefix=prefix, dir=cache))
    except OSError:
        where = tmp_path_factory.mktemp("uncached")
        return where, Path(tempfile.mkdtemp(prefix=prefix, dir=where))


@pytest.fixture(scope="session")
def sdist(tmp_path_factory):
    """The pprocess 0.5.1 source archive: from the cache, else downloaded into it."""
    cached = cache_dir() / SDIST_FILE
    if _is_the_sdist(cached):
        return cached
    cache, download = _new_dir_in_cache(tmp_path_factory, "download-")
    try:
        _pip(["download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(download)],
             download, "the pprocess sdist")
        archive = download / SDIST_FILE
        assert archive.is_file(), "pip download saved no %s: %r" % (
            SDIST_FILE, os.listdir(download))
        digest = _sha256(archive)
        assert digest == SDIST_SHA256, "%s has SHA-256 %s, not %s" % (
            SDIST_FILE, digest, SDIST_SHA256)
        os.replace(archive, cache / SDIST_FILE)   # atomic: a cached file is always whole
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return cache / SDIST_FILE


def _has_lib2to3(python):
    return subprocess.run([python, "-c", "import lib2to3"], capture_output=True).returncode == 0


def _two_to_three(tmp_path_factory):
    """(command, environment) that runs 2to3; see the module docstring for the choice."""
    env = dict(os.environ)
    if importlib.util.find_spec("lib2to3") is not None:
        return [sys.executable, "-m", "lib2to3"], env
    on_path = [shutil.which(name) for name in ("python3.12", "python3.11", "python3.10",
                                               "python3.9", "python3", "python")]
    pyenv = interpreters.newest_pythons(since=(3, 9))
    under_pyenv = [pyenv[minor] for minor in sorted(pyenv, reverse=True) if minor < (3, 13)]
    for python in on_path + under_pyenv:
        if python and _has_lib2to3(python):
            return [python, "-m", "lib2to3"], env
    target = cache_dir() / "fissix"
    if not os.path.isfile(target / "fissix" / "__main__.py"):
        cache, install = _new_dir_in_cache(tmp_path_factory, "fissix-")
        try:
            _pip(["install", "--quiet", "--target", str(install), "fissix"], install,
                 "fissix (for 2to3: no interpreter with lib2to3 was found)")
            target = cache / "fissix"
            try:
                os.rename(install, target)    # atomic: a cached install is always whole
            except OSError:
                pass                          # another session cached it meanwhile
        finally:
            shutil.rmtree(install, ignore_errors=True)
    env["PYTHONPATH"] = str(target)
    return [sys.executable, "-m", "fissix"], env


@pytest.fixture(scope="session")
def programs(sdist, tmp_path_factory):
    """The sdist unpacked, its examples/ and tests/ converted to Python 3."""
    where = tmp_path_factory.mktemp("pprocess")
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(where, filter="data")
        else:  # an older Python without extraction filters
            archive.extractall(where)
    top = where / "pprocess-0.5.1"
    # Only compat/pprocess.py may be imported as pprocess.
    (top / "pprocess.py").unlink()
    command, env = _two_to_three(tmp_path_factory)
    done = subprocess.run(command + ["--write", "--nobackups", "examples", "tests"],
                          cwd=top, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for path in (top / "examples").glob("simple*.py"):
        text = path.read_text()
        shortened, count = re.subn(r"(?m)^delay = 1$", "delay = 0.01", text)
        assert count == 1, "no 'delay = 1' line to shorten in %s" % path.name
        path.write_text(shortened)
    return top


def _wait_until_nothing_runs():
    """Wait for processes a program left behind to exit; reap them; fail if any still run."""
    deadline = time.monotonic() + EXIT_GRACE
    while True:
        running = {pid: state for pid, state in conftest.descendants().items() if state != "Z"}
        if not running or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    conftest.reap_orphans()
    if running:
        conftest.kill_all(running)
        pytest.fail("processes still running %.0f s after the program exited: %r"
                    % (EXIT_GRACE, running))


def run(path, *args, cwd, stdin=None, starts_background=False, tmpdir=None):
    """Run a converted program with compat/ first on PYTHONPATH; return the finished process.

    Unless it ``starts_background`` processes, nothing it started may outlive it.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([COMPAT, ROOT])
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    # Block-buffered, each process's output is one write, not interleaved mid-line.
    env.pop("PYTHONUNBUFFERED", None)
    try:
        done = subprocess.run([sys.executable, str(path)] + list(args), cwd=cwd, env=env,
                              input=stdin, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT)
    finally:
        if not starts_background:
            _wait_until_nothing_runs()
    return done


def run_ok(path, *args, cwd, **options):
    done = run(path, *args, cwd=cwd, **options)
    assert done.returncode == 0 and done.stderr == "", (
        "%s %s failed (exit %s):\n%s%s" % (path.name, " ".join(args), done.returncode,
                                           done.stdout, done.stderr))
    return done.stdout


def grid(output):
    return [line for line in output.splitlines() if GRID_LINE.match(line)]


@pytest.fixture(scope="session")
def reference_grids(programs, tmp_path_factory):
    """Sequential program name -> the grid it prints (each run at most once)."""
    cache = {}

    def get(name):
        if name not in cache:
            cwd = tmp_path_factory.mktemp(name)
            cache[name] = grid(run_ok(programs / "examples" / (name + ".py"), cwd=cwd))
            assert cache[name] == EXPECTED_GRID, "the sequential %s.py printed %r" % (
                name, cache[name])
        return cache[name]
    return get


def test_every_simple_example_is_checked(programs):
    found = {path.stem for path in (programs / "examples").glob("simple*.py")}
    assert found == set(REFERENCES) | set(SEQUENTIAL)


@pytest.mark.parametrize("name", FOREGROUND)
def test_parallel_example_prints_the_sequential_grid(name, programs, reference_grids,
                                                     tmp_path):
    expected = reference_grids(REFERENCES[name])
    output = run_ok(programs / "examples" / (name + ".py"), cwd=tmp_path)
    assert grid(output) == expected
    assert "Time taken:" in output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mode", [0o700, 0o755], ids=["private-dir", "shared-dir"])
@pytest.mark.parametrize("name", BACKGROUND)
def test_background_example_started_then_reconnected(name, mode, programs, reference_grids,
                                                     tmp_path):
    # In a directory others may enter, the sockets are made in a private
    # directory under TMPDIR, with links to them here: both must go.
    expected = reference_grids(REFERENCES[name])
    script = programs / "examples" / (name + ".py")
    cwd, tmpdir = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir(mode)
    cwd.chmod(mode)
    tmpdir.mkdir()
    started = run_ok(script, "--start", cwd=cwd, tmpdir=tmpdir, starts_background=True)
    assert grid(started) == []
    reconnected = run_ok(script, "--reconnect", cwd=cwd, tmpdir=tmpdir)
    assert grid(reconnected) == expected
    assert "Waiting for persistent results" in reconnected
    assert os.listdir(cwd) == [] and os.listdir(tmpdir) == [], "files left behind"


# Parent and child print to the same stdout from separate buffers, so the
# order of their lines is not fixed: compare each line's count.

def test_create_loop(programs, tmp_path):
    output = run_ok(programs / "tests" / "create_loop.py", cwd=tmp_path)
    assert Counter(output.splitlines()) == Counter([str(i) for i in range(100)] + ["Done"])


def test_start_loop(programs, tmp_path):
    output = run_ok(programs / "tests" / "start_loop.py", cwd=tmp_path)
    assert Counter(output.splitlines()) == Counter(
        ["loop to 100"] + [str(i) for i in range(100)] + ["Done"])


def test_two_way(programs, tmp_path):
    output = run_ok(programs / "tests" / "two_way.py", cwd=tmp_path)
    expected = []
    for data in range(20, 0, -1):
        expected += ["Child: %d" % data, "Child sent", "Parent: %d" % data, "Parent sent"]
    assert Counter(output.splitlines()) == Counter(expected)


@pytest.fixture
def text_files(tmp_path):
    """Ten small text files: fileN holds 'common', 'wordN' and 'partyN%2'."""
    directory = tmp_path / "texts"
    directory.mkdir()
    for i in range(10):
        (directory / ("file%d" % i)).write_text("common, word%d. party%d!\n" % (i, i % 2))
    return directory


def test_start_indexer_without_prompt(programs, text_files, tmp_path):
    output = run_ok(programs / "tests" / "start_indexer.py", str(text_files), "3", "2",
                    "0.01", "--noprompt", cwd=tmp_path)
    assert output == ""


def test_start_indexer_answers_queries(programs, text_files, tmp_path):
    done = run(programs / "tests" / "start_indexer.py", str(text_files), "4", "3",
               cwd=tmp_path, stdin="word\nparty1\nnothing\n")
    # The program prompts until its input ends, which it does not expect.
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == "EOFError: EOF when reading a line", done.stderr
    answers = re.findall(r"Pattern: (.*)\n", done.stdout)
    assert len(answers) == 3, done.stdout
    found = [ast.literal_eval(answer) for answer in answers]
    path = str(text_files) + "/file%d"
    assert found[0] == {"word%d" % i: [path % i] for i in range(10)}
    assert {word: sorted(paths) for word, paths in found[1].items()} == {
        "party1": sorted(path % i for i in range(1, 10, 2))}
    assert found[2] == []
