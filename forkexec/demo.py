"""The main job: real CPU work through ForkExchangeExecutor and ProcessPoolExecutor, side by side.

Run with ``python -m forkexec.demo [--quick]``. It prints what happened: results checked
against a sequential run, timings, and the pprocess-style native API on a small grid.
"""

import argparse
import concurrent.futures
import multiprocessing
import time

import forkexec


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


def timed(label, fn):
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    return label, elapsed, result


def run_executor(make, sizes, items):
    with make() as ex:
        heavy = list(ex.map(collatz_steps, sizes))
        light = list(ex.map(tiny, range(items), chunksize=256))
        futures = [ex.submit(tiny, i) for i in range(items // 10)]
        submitted = [f.result() for f in concurrent.futures.as_completed(futures)]
    return heavy, sum(light), sum(submitted)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller workload (a few seconds)")
    args = parser.parse_args(argv)
    workers = forkexec.usable_cpus()
    sizes = [3000 + 37 * i for i in range(16 if args.quick else 48)]
    items = 20_000 if args.quick else 200_000
    print("forkexec %s demo: %d usable CPUs, %d CPU-bound tasks, %d tiny map items"
          % (forkexec.__version__, workers, len(sizes), items))

    label, seq_time, expected = timed("sequential", lambda: [collatz_steps(n) for n in sizes])
    print("  %-34s %8.3f s" % ("sequential (CPU-bound part only)", seq_time))
    fork_ctx = multiprocessing.get_context("fork")
    runs = [
        ("ForkExchangeExecutor", lambda: forkexec.ForkExchangeExecutor(workers)),
        ("ProcessPoolExecutor (fork)",
         lambda: concurrent.futures.ProcessPoolExecutor(workers, mp_context=fork_ctx)),
    ]
    timings = {}
    for name, make in runs:
        _, elapsed, (heavy, light_sum, submit_sum) = timed(name, lambda: run_executor(make, sizes, items))
        ok = heavy == expected and light_sum == sum(i * i for i in range(items)) \
            and submit_sum == sum(i * i for i in range(items // 10))
        timings[name] = elapsed
        print("  %-34s %8.3f s   results %s" % (name, elapsed, "correct" if ok else "WRONG"))
        if not ok:
            raise SystemExit("%s returned wrong results" % name)
    ratio = timings["ProcessPoolExecutor (fork)"] / timings["ForkExchangeExecutor"]
    print("  ForkExchangeExecutor is %.2fx the speed of ProcessPoolExecutor on this job" % ratio)

    print("native API: a 6x6 grid three ways")
    grid = [(x, y) for x in range(6) for y in range(6)]
    expected = [cell(x, y) for x, y in grid]
    pmapped = list(forkexec.pmap(lambda xy: cell(*xy), grid, limit=workers))
    mapped = forkexec.Map(limit=workers, reuse=1)
    for x, y in grid:
        mapped.start(forkexec.MakeReusable(cell), x, y)
    queue = forkexec.Queue(limit=workers)
    for x, y in grid:
        queue.start(forkexec.MakeParallel(lambda x, y: ((x, y), cell(x, y))), x, y)
    queued = dict(queue)
    for name, got in (("pmap", pmapped), ("Map(reuse=1)", list(mapped)),
                      ("Queue", [queued[xy] for xy in grid])):
        print("  %-14s %s" % (name, "correct" if got == expected else "WRONG"))
        if got != expected:
            raise SystemExit("%s returned a wrong grid" % name)
    for row in range(6):
        print("   " + " ".join("%2d" % v for v in pmapped[row * 6:(row + 1) * 6]))
    forkexec.waitall()


if __name__ == "__main__":
    main()
