"""What tests need from the machine: other Python interpreters, and what a missing one does.

Interpreters are found through pyenv, never through hard-coded paths: the root
``pyenv root`` prints (else ``$PYENV_ROOT``, else ``~/.pyenv``), its
``versions/`` folder, the newest patch release of the wanted minor version
(plain CPython releases only: no ``3.13.0t``, ``3.13-dev`` or ``3.13.0rc1``).

A test whose prerequisite is missing (an interpreter, root, the network)
skips with the reason, except under CI (``CI=true``), where it fails: a CI run
must not pass by skipping what it was meant to check.
"""

import importlib
import os
import re
import subprocess

import pytest

#: The first Python whose os.fork() warns (DeprecationWarning) in a multi-threaded process.
FORK_WARNING_SINCE = (3, 12)

_RELEASE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def in_ci():
    """Whether this runs under CI: the environment variable CI is true (CI=true, as CI
    services set it; 1 and yes count too)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason):
    """Skip the test for ``reason``; under CI, fail it instead."""
    __tracebackhide__ = True    # pytest reports the caller's line, not this one
    if in_ci():
        pytest.fail("%s (CI=true: a prerequisite missing under CI fails the test instead "
                    "of skipping it)" % reason, pytrace=False)
    pytest.skip(reason)


def require_module(name):
    """Import and return the module ``name``: a test extra; skip the test (fail it under CI)
    when it is not installed."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail("%s is not installed (pip install '.[test]')" % name)


def pyenv_root():
    """pyenv's root: what ``pyenv root`` prints, else $PYENV_ROOT, else ~/.pyenv."""
    try:
        done = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is not None and done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip()
    return os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")


def installed():
    """{(major, minor, patch): path of its python} for every CPython release under pyenv."""
    versions = os.path.join(pyenv_root(), "versions")
    try:
        names = os.listdir(versions)
    except OSError:
        return {}
    found = {}
    for name in names:
        match = _RELEASE.match(name)
        python = os.path.join(versions, name, "bin", "python")
        if match and os.access(python, os.X_OK):
            found[tuple(int(part) for part in match.groups())] = python
    return found


def find_python(minor):
    """The python of the newest installed patch release of ``minor`` ("3.13" or (3, 13)),
    or None."""
    if isinstance(minor, str):
        minor = tuple(int(part) for part in minor.split("."))
    return newest_pythons(since=minor).get(tuple(minor))


def newest_pythons(since=(3, 0)):
    """{(major, minor): python of its newest patch release} for each installed minor
    version from ``since`` on."""
    newest = {}
    for version, python in sorted(installed().items()):
        if version[:2] >= tuple(since):
            newest[version[:2]] = python       # sorted: a later patch replaces an earlier
    return newest


def require_python(minor):
    """Like find_python, but skip the test (fail it under CI) when none is installed."""
    __tracebackhide__ = True
    python = find_python(minor)
    if python is None:
        wanted = minor if isinstance(minor, str) else "%d.%d" % tuple(minor)
        skip_or_fail("no Python %s under %s/versions (pyenv install %s)"
                     % (wanted, pyenv_root(), wanted))
    return python
