"""The README's code runs as printed.

Every ```python block of README.md runs in a fresh interpreter twice: as a script, and
pasted line by line into the interactive interpreter (``python -i`` reading the block from
stdin, as a user pasting it into ``python`` would), where a missing blank line after an
indented block is a SyntaxError. Blocks are found anew at each run, so a block added to the
README is tested without touching this file; each test is named after the heading above
its block. The README's main command, ``python -m forkexec.demo``, runs here too (quick).
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT = 60
#: A line of stderr that reports an exception (a traceback's last line, or a REPL's
#: SyntaxError, which has no "Traceback" header).
ERROR_LINE = re.compile(r"^\s*(\w+\.)*\w*(Error|Exception|Interrupt|Exit)\b.*$", re.MULTILINE)
#: Noise of an in-process Dask cluster's teardown, not a failure of the README's code, which
#: had finished: Dask's own INFO record, with a traceback, of a comm it found closed (seen
#: with distributed 2024.8 on Python 3.9, now and then), and asyncio's report, at the exit of
#: ``python -i``, of a comm timeout of Dask's that nobody retrieved (3.11, now and then).
DASK_TEARDOWN_NOISE = re.compile(
    r"[\d-]{10} [\d:,]+ - distributed\.[\w.]+ - INFO - [^\n]*\n(?:[^\n]*\n)*?"
    r"distributed\.comm\.core\.CommClosedError\n"
    r"|Future exception was never retrieved\n"
    r"future: <Future finished exception=TimeoutError\('Timeout'\)>\n"
    r"(?:Traceback[^\n]*\n(?:[ \t][^\n]*\n)*)?(?:[\w.]+\.)?TimeoutError: Timeout\n")


def python_blocks(path=README):
    """[(test id, code)] for every ```python block of the markdown file, in order."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, heading, seen = [], "top", {}
    i = 0
    while i < len(lines):
        line = lines[i]
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            heading = match.group(1).strip()
        fence = re.match(r"\s*(```+|~~~+)\s*python3?\s*$", line)
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(fence.group(1)):
                end += 1
            seen[heading] = seen.get(heading, 0) + 1
            name = heading if seen[heading] == 1 else "%s (%d)" % (heading, seen[heading])
            blocks.append((name, "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return blocks


def run(args, tmp_path, stdin=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run([sys.executable] + args, cwd=str(tmp_path), env=env, input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=TIMEOUT)


def check(proc, how, code):
    stderr = DASK_TEARDOWN_NOISE.sub("", proc.stderr)
    failed = "Traceback" in stderr or ERROR_LINE.search(stderr)
    assert proc.returncode == 0 and not failed, (
        "README block failed %s (exit code %s)\n--- code\n%s--- stdout\n%s--- stderr\n%s"
        % (how, proc.returncode, code, proc.stdout, proc.stderr))


BLOCKS = python_blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, BLOCKS


@pytest.mark.parametrize("code", [code for _, code in BLOCKS],
                         ids=[name for name, _ in BLOCKS])
def test_readme_block_runs(code, tmp_path):
    script = tmp_path / "readme_block.py"
    script.write_text(code, encoding="utf-8")
    check(run([str(script)], tmp_path), "as a script", code)
    # -q: no banner; the prompts go to stderr and are harmless. End with a blank line so
    # that a block ending inside an indented statement still runs, as Enter would.
    check(run(["-q", "-i"], tmp_path, stdin=code + "\n"), "pasted into python -i", code)


def test_demo_runs(tmp_path):
    proc = run(["-m", "forkexec.demo", "--quick"], tmp_path)
    check(proc, "python -m forkexec.demo --quick", "")
    assert "results equal" in proc.stdout, proc.stdout
