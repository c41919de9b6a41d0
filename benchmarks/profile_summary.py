#!/usr/bin/env python3
"""Summarise a ``py-spy record --subprocesses --threads --format raw`` profile.

    py-spy record --subprocesses --threads --format raw -r 250 -o prof.txt -- \\
        python benchmarks/bench_peers.py --only submit --executors forkexec --rounds 20
    python benchmarks/profile_summary.py prof.txt [--top 12] [--match forkexec/] [--lines]

Samples are grouped by where they were taken: the parent's threads (by name),
and child processes by depth (depth 1 = forkexec's template or a peer's worker,
depth 2 = forkexec's workers). For each group: its share of all samples, the
functions that were running (self time), and the matching functions anywhere on
the stack (inclusive time).
"""

import argparse
import collections
import re

_PROCESS = re.compile(r"^process \d+:")
_THREAD = re.compile(r"^thread \(\d+\): ?(.*)$")


def parse(path):
    """Yield (group, [frames, root first], count) for every line of the profile."""
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            parts = stack.split(";")
            depth = 0
            thread = "?"
            frames = []
            for part in parts:
                if _PROCESS.match(part):
                    depth += 1
                    continue
                match = _THREAD.match(part)
                if match:
                    thread = match.group(1) or "?"
                    continue
                frames.append(part)
            if depth <= 1:
                group = "parent: %s thread" % thread
            else:
                group = "child process, depth %d" % (depth - 1)
            yield group, frames, int(count)


def _short(frame, lines=False):
    # "name (path/file.py:123)" -> "name (dir/file.py)", so the lines of one function add
    # up, or "name (dir/file.py:123)" with ``lines``.
    match = re.match(r"^(.*) \((.*?)(:\d+)\)$", frame)
    if not match:
        return frame
    name, path, line = match.groups()
    return "%s (%s%s)" % (name, "/".join(path.split("/")[-2:]), line if lines else "")


def summarise(path, top, match, lines=False):
    total = 0
    per_group = collections.Counter()
    self_time = collections.defaultdict(collections.Counter)
    inclusive = collections.defaultdict(collections.Counter)
    for group, frames, count in parse(path):
        total += count
        per_group[group] += count
        if frames:
            self_time[group][_short(frames[-1], lines)] += count
        for name in {_short(f) for f in frames if match in f}:
            inclusive[group][name] += count
    for group, counts in inclusive.items():
        # Frames on every stack of the group (the loop itself, what a child inherited
        # from its fork) say nothing.
        for name in [n for n, c in counts.items() if c == per_group[group]]:
            del counts[name]
    lines = ["%d samples in %s" % (total, path)]
    for group, count in per_group.most_common():
        lines.append("")
        lines.append("== %s: %d samples (%.0f%%)" % (group, count, 100.0 * count / total))
        lines.append("   self (running):")
        for name, n in self_time[group].most_common(top):
            lines.append("   %5.1f%%  %s" % (100.0 * n / count, name))
        if inclusive[group]:
            lines.append("   inclusive (on the stack, matching %r):" % match)
            for name, n in inclusive[group].most_common(top):
                lines.append("   %5.1f%%  %s" % (100.0 * n / count, name))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--match", default="forkexec/",
                        help="inclusive time for frames whose text contains this")
    parser.add_argument("--lines", action="store_true", help="self time per source line")
    args = parser.parse_args()
    print(summarise(args.profile, args.top, args.match, args.lines))


if __name__ == "__main__":
    main()
