"""joblib.Parallel on the "forkexec" backend against joblib's default, loky.

    python benchmarks/bench_joblib.py [--quick] [--rounds N] [--jobs N] [--json PATH]

Workloads (``n_jobs`` = the CPUs this process may use, unless ``--jobs``):

* ``tiny``: one ``Parallel`` call of 20,000 no-op calls (joblib's auto batching on
  both backends): calls per second;
* ``cpu``: one ``Parallel`` call of 4 x n_jobs pure-Python loops of ~50 ms each
  (calibrated here): efficiency = ideal wall time (loop time x loops / n_jobs) / wall
  time;
* ``calls``: 30 ``Parallel`` calls in a row of 2 x n_jobs no-op calls each, as
  scikit-learn makes them: milliseconds per ``Parallel`` call. loky keeps its workers
  between calls; forkexec starts a new pool for each call (so that workers see the
  program as it is), which this workload prices.

Each backend is warmed up once per workload (loky's workers started); then, round
after round, each runs the workload once, the order alternating; the table shows the
medians. The ratio is forkexec / loky in the workload's unit: above 1 is faster for
calls/s and efficiency, below 1 is faster for ms. The numbers are information: no test
asserts them.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import joblib  # noqa: E402

import forkexec.joblib  # noqa: E402,F401  (registers "forkexec")
from _tasks import noop, spin  # noqa: E402
from forkexec import usable_cpus  # noqa: E402

BACKENDS = ("forkexec", "loky")


def calibrate(seconds):
    """The loop count for which spin() takes about ``seconds`` here."""
    loops = 100_000
    while True:
        started = time.perf_counter()
        spin(loops)
        took = time.perf_counter() - started
        if took > 0.02:
            return max(1, int(loops * seconds / took)), took / loops
        loops *= 2


def tiny(backend, jobs, size):
    started = time.perf_counter()
    results = joblib.Parallel(backend=backend, n_jobs=jobs)(
        joblib.delayed(noop)(i) for i in range(size["tiny"]))
    took = time.perf_counter() - started
    assert results[-1] == size["tiny"] - 1
    return size["tiny"] / took


def cpu(backend, jobs, size):
    loops, per_loop = size["spin"]
    count = 4 * jobs
    started = time.perf_counter()
    joblib.Parallel(backend=backend, n_jobs=jobs)(
        joblib.delayed(spin)(loops) for _ in range(count))
    took = time.perf_counter() - started
    return (loops * per_loop * count / jobs) / took


def calls(backend, jobs, size):
    started = time.perf_counter()
    for _ in range(size["calls"]):
        joblib.Parallel(backend=backend, n_jobs=jobs)(
            joblib.delayed(noop)(i) for i in range(2 * jobs))
    return (time.perf_counter() - started) / size["calls"] * 1000


WORKLOADS = [("tiny", tiny, "calls/s", "{:,.0f}"), ("cpu", cpu, "efficiency", "{:.1%}"),
             ("calls", calls, "ms per Parallel call", "{:.1f}")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 3 rounds")
    parser.add_argument("--rounds", type=int, help="rounds per workload (default 5)")
    parser.add_argument("--jobs", type=int, default=usable_cpus(), help="n_jobs")
    parser.add_argument("--json", help="write the medians to this file")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    size = {"tiny": 5000 if args.quick else 20000, "calls": 10 if args.quick else 30,
            "spin": calibrate(0.02 if args.quick else 0.05)}
    print("joblib %s, Python %s, %d CPUs usable, n_jobs=%d, %d rounds"
          % (joblib.__version__, platform.python_version(), usable_cpus(), args.jobs, rounds))
    table = {}
    try:
        for name, run, unit, fmt in WORKLOADS:
            samples = {backend: [] for backend in BACKENDS}
            for backend in BACKENDS:
                run(backend, args.jobs, size)          # warm-up, untimed
            for i in range(rounds):
                order = BACKENDS if i % 2 == 0 else BACKENDS[::-1]
                for backend in order:
                    samples[backend].append(run(backend, args.jobs, size))
            table[name] = {backend: statistics.median(s) for backend, s in samples.items()}
            ours, theirs = table[name]["forkexec"], table[name]["loky"]
            print("%-6s %-22s forkexec %12s   loky %12s   ratio %.2fx"
                  % (name, unit, fmt.format(ours), fmt.format(theirs), ours / theirs),
                  flush=True)
    finally:
        from joblib.externals.loky import get_reusable_executor
        get_reusable_executor().shutdown(wait=True)    # loky keeps its workers otherwise
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": platform.python_version(), "joblib": joblib.__version__,
                       "n_jobs": args.jobs, "rounds": rounds, "medians": table}, f, indent=2)


if __name__ == "__main__":
    main()
