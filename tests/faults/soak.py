"""Soak: a million tiny tasks and ten thousand uneven ones, with workers killed at random.

Run from the repository root (it is not part of the normal test command)::

    python -m tests.faults.soak                 # the full soak, a minute or two
    python -m tests.faults.soak --tiny 100000 --timed 1000    # a quick one
    FORKEXEC_SOAK=1 python -m pytest -m soak tests/faults     # the same, under pytest

Tasks go through ``submit`` (in windows, so the parent holds a bounded number
of futures) and ``map`` (chunked). A killer thread SIGKILLs a random worker
every so often; the pool uses ``on_worker_death="replace"``. Every future
that fails must be a ``WorkerDiedError`` naming a pid the killer killed: at
most one task that was running per kill, plus tasks that had finished there but
whose results were not yet sent (never run twice); every other result must be correct. A ``map`` cut short
by a dead worker's chunk is resumed after that chunk. At the end it prints
the figures and exits non-zero if any result was lost beyond the killed
tasks, or the parent's memory or descriptors grew.
"""

import argparse
import collections
import random
import sys
import time

from forkexec import ForkExchangeExecutor, WorkerDiedError

from .tasks import Killer, descendants, fd_count, rss, sleep_for, square

#: Parent RSS may grow this much from the start of the soak to its end.
RSS_SLACK = 32 << 20


class Tally:
    """What came back, and what was lost to which kill."""

    def __init__(self):
        self.expected = 0
        self.correct = 0
        self.lost = collections.Counter()   # killed pid -> tasks lost with it
        self.futures_lost = collections.Counter()   # killed pid -> futures (tasks or chunks)
        self.wrong = []                     # anything not explained by a kill

    def failed(self, exc, tasks, killed):
        if isinstance(exc, WorkerDiedError) and exc.exitcode == -9 and exc.pid in killed:
            self.lost[exc.pid] += tasks
            if "result was lost" not in str(exc):   # finished there: not run again
                self.futures_lost[exc.pid] += 1
        else:
            self.wrong.append(repr(exc))


def through_submit(ex, fn, columns, expect, tally, killed, window):
    """``fn(*args)`` for each row of ``columns`` (sequences, so nothing big is built),
    ``window`` futures at a time."""
    rows = len(columns[0])
    for start in range(0, rows, window):
        batch = list(zip(*(column[start:start + window] for column in columns)))
        futures = [ex.submit(fn, *args) for args in batch]
        tally.expected += len(batch)
        for args, future in zip(batch, futures):
            exc = future.exception(timeout=600)
            if exc is not None:
                tally.failed(exc, 1, killed)
            elif future.result() == expect(*args):
                tally.correct += 1
            else:
                tally.wrong.append("wrong result for %r" % (args,))


def through_map(ex, fn, columns, expect, tally, killed, chunksize):
    """``ex.map(fn, *columns)``; after a chunk lost to a kill, map the rest again.

    ``buffersize`` bounds the chunks in flight, so memory does not follow the input's size.
    """
    tally.expected += len(columns[0])
    while len(columns[0]):
        got = 0
        try:
            results = ex.map(fn, *columns, chunksize=chunksize, timeout=600, buffersize=64)
            for args, value in zip(zip(*columns), results):
                got += 1
                if value == expect(*args):
                    tally.correct += 1
                else:
                    tally.wrong.append("wrong result for %r" % (args,))
            return
        except Exception as exc:  # the chunk at ``got`` failed: count it, go on after it
            tally.failed(exc, len(columns[0][got:got + chunksize]), killed)
            columns = tuple(column[got + chunksize:] for column in columns)


def run(tiny=1_000_000, timed=10_000, workers=2, seed=None, kill_pause=(0.05, 0.5), out=None):
    """Run the soak, print its figures to ``out`` (stdout); return (ok, figures)."""
    out = sys.stdout if out is None else out
    seed = random.randrange(1 << 32) if seed is None else seed
    rng = random.Random(seed)
    started = time.monotonic()
    with ForkExchangeExecutor(workers, on_worker_death="replace") as ex:
        # Warm up with the same shapes of work, so the start figures include what
        # one window of futures costs.
        warm = Tally()
        through_submit(ex, square, (range(20000),), square, warm, [], window=20000)
        through_map(ex, square, (range(20000),), square, warm, [], chunksize=500)
        rss_start, fds_start = rss(), fd_count()
        killer = Killer(seed, pause=kill_pause)
        killed = killer.killed
        killer.start()
        tally = Tally()
        samples = []   # parent RSS after each phase, to tell a plateau from a leak
        try:
            half = tiny // 2
            through_submit(ex, square, (range(half),), square, tally, killed, window=20000)
            samples.append(rss())
            through_map(ex, square, (range(half, tiny),), square, tally, killed, chunksize=500)
            samples.append(rss())
            durations = [round(rng.uniform(0, 0.01), 4) for _ in range(timed)]
            values = range(timed)
            half = timed // 2
            through_submit(ex, sleep_for, (durations[:half], values[:half]),
                           lambda s, v: v, tally, killed, window=1000)
            samples.append(rss())
            through_map(ex, sleep_for, (durations[half:], values[half:]),
                        lambda s, v: v, tally, killed, chunksize=4)
        finally:
            killer.stop()
        rss_end, fds_end = rss(), fd_count()
        stats = ex.statistics()
    left = descendants()
    figures = collections.OrderedDict([
        ("seed", seed),
        ("tasks", tally.expected),
        ("correct results", tally.correct),
        ("faults injected (SIGKILLs)", len(killer.killed)),
        ("kills that cost tasks", len(tally.lost)),
        ("tasks lost to kills", sum(tally.lost.values())),
        ("results lost beyond the killed tasks",
         tally.expected - tally.correct - sum(tally.lost.values())),
        ("unexplained failures", len(tally.wrong)),
        ("most futures lost to one kill", max(tally.futures_lost.values(), default=0)),
        ("workers replaced", stats.workers_replaced),
        ("parent RSS start/end (MiB)", "%.1f / %.1f" % (rss_start / 2 ** 20, rss_end / 2 ** 20)),
        ("parent RSS between phases (MiB)", " ".join("%.1f" % (n / 2 ** 20) for n in samples)),
        ("fds start/end", "%d / %d" % (fds_start, fds_end)),
        ("processes left", left),
        ("seconds", round(time.monotonic() - started, 1)),
    ])
    for name, value in figures.items():
        print("%-40s %s" % (name, value), file=out)
    for line in tally.wrong[:10]:
        print("  unexplained: %s" % line, file=out)
    ok = (figures["results lost beyond the killed tasks"] == 0 and not tally.wrong
          and all(n == 1 for n in tally.futures_lost.values())
          and rss_end - rss_start < RSS_SLACK and fds_end == fds_start and not left)
    return ok, figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", type=int, default=1_000_000, help="tiny tasks (default 1e6)")
    parser.add_argument("--timed", type=int, default=10_000,
                        help="tasks of random duration, 0-10 ms (default 10000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    ok, _ = run(args.tiny, args.timed, args.workers, args.seed)
    print("SOAK %s" % ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
