"""The main job: the same work done sequentially, by ForkExchangeExecutor and by
ProcessPoolExecutor (fork), with every result checked against the sequential run.

Run with ``python -m forkexec.demo [--quick]``. It prints one table of wall times (the
sequential column is a plain loop in this process, the same calls the pools make), then the
pprocess-style native API doing the same small two-argument calls three ways.
"""

import argparse
import concurrent.futures
import multiprocessing
import time

import forkexec


LABEL = "  %-42s"
TIME = "%14.3f"


def collatz_steps(n):
    """Total Collatz steps for every number below n: pure-Python CPU work."""
    total = 0
    for k in range(1, n):
        while k != 1:
            k = k // 2 if k % 2 == 0 else 3 * k + 1
            total += 1
    return total


def tiny(x):
    return x * x


def cell(x, y):
    return collatz_steps(200 + 10 * x + y) % 97


def timed(fn):
    """(seconds, result) of calling fn()."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_sequential(sizes, items, submits):
    """The executors' job as a plain loop: {part: (seconds, results)}, plus the total."""
    parts = {
        "cpu": timed(lambda: [collatz_steps(n) for n in sizes]),
        "map": timed(lambda: [tiny(i) for i in range(items)]),
        "submit": timed(lambda: sorted(tiny(i) for i in range(submits))),
    }
    return parts, sum(seconds for seconds, _ in parts.values())


def run_executor(make, sizes, items, submits):
    """The same job through a pool: {part: (seconds, results)}, plus the total including
    the pool's start and shutdown."""
    parts = {}

    def job():
        with make() as ex:
            parts["cpu"] = timed(lambda: list(ex.map(collatz_steps, sizes)))
            parts["map"] = timed(lambda: list(ex.map(tiny, range(items), chunksize=256)))
            parts["submit"] = timed(lambda: sorted(
                f.result() for f in concurrent.futures.as_completed(
                    [ex.submit(tiny, i) for i in range(submits)])))

    total, _ = timed(job)
    return parts, total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller workload (a few seconds)")
    args = parser.parse_args(argv)
    workers = forkexec.usable_cpus()
    sizes = [3000 + 37 * i for i in range(16 if args.quick else 48)]
    items = 20_000 if args.quick else 200_000
    submits = items // 10
    fork_ctx = multiprocessing.get_context("fork")
    pools = [
        ("ForkExchange", lambda: forkexec.ForkExchangeExecutor(workers)),
        ("ProcessPool",
         lambda: concurrent.futures.ProcessPoolExecutor(workers, mp_context=fork_ctx)),
    ]

    print("forkexec %s demo, %d usable CPUs: one job done sequentially and by %d-worker pools"
          % (forkexec.__version__, workers, workers))
    print("(ProcessPool = concurrent.futures.ProcessPoolExecutor with fork). Wall time, seconds:")
    expected, seq_total = run_sequential(sizes, items, submits)
    columns = [("sequential", expected, seq_total)]
    for name, make in pools:
        parts, total = run_executor(make, sizes, items, submits)
        wrong = [part for part in expected if parts[part][1] != expected[part][1]]
        if wrong:
            raise SystemExit("%s returned wrong results for: %s" % (name, ", ".join(wrong)))
        columns.append((name, parts, total))

    rows = [
        ("cpu", "%d CPU-bound tasks, map, incl. pool start" % len(sizes)),
        ("map", "%d tiny tasks, map(chunksize=256)" % items),
        ("submit", "%d tiny tasks, submit + as_completed" % submits),
    ]
    print(LABEL % "" + "".join("%14s" % name for name, _, _ in columns))
    for part, label in rows:
        print(LABEL % label + "".join(TIME % parts[part][0] for _, parts, _ in columns))
    print(LABEL % "whole job (pools: with start and shutdown)"
          + "".join(TIME % total for _, _, total in columns))
    print("  Pool results all equal the sequential ones. The tiny tasks measure per-task overhead:")
    print("  a plain loop wins there. Whole job: ForkExchangeExecutor %.2fx as fast as ProcessPool."
          % (columns[2][2] / columns[1][2]))

    grid = [(x, y) for x in range(6) for y in range(6)]
    print("native API: %d calls cell(x, y), x and y in 0..5, each a small Collatz sum. "
          "Wall time, seconds:" % len(grid))
    seq_time, expected = timed(lambda: [cell(x, y) for x, y in grid])

    def with_pmap():
        # the native API forks a child per call, so a lambda needs no pickling
        return list(forkexec.pmap(lambda xy: cell(*xy), grid, limit=workers))

    def with_map():
        mapped = forkexec.Map(limit=workers, reuse=1)
        for x, y in grid:
            mapped.start(forkexec.MakeReusable(cell), x, y)
        return list(mapped)

    def with_queue():
        queue = forkexec.Queue(limit=workers)
        for x, y in grid:
            queue.start(forkexec.MakeParallel(lambda x, y: ((x, y), cell(x, y))), x, y)
        queued = dict(queue)  # results arrive in any order: key them by their arguments
        return [queued[xy] for xy in grid]

    print(LABEL % "sequential" + TIME % seq_time)
    for label, fn in (("pmap (a child per call)", with_pmap),
                      ("Map(reuse=1) + MakeReusable (%d children)" % workers, with_map),
                      ("Queue + MakeParallel (a child per call)", with_queue)):
        elapsed, got = timed(fn)
        if got != expected:
            raise SystemExit("%s returned wrong results" % label)
        print(LABEL % label + TIME % elapsed + "   results equal")
    forkexec.waitall()


if __name__ == "__main__":
    main()
