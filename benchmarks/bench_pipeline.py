"""Pipeline benchmark: one three-stage pipeline through forkexec.pipeline and its peers.

    python benchmarks/bench_pipeline.py [--quick] [--only tiny|1mib|rss] [--json PATH]

The pipeline: a producer of N items, a transform stage with 2 workers, and a
consumer (the calling process, iterating). The peers, in one run:

* ``forkexec``  - ``forkexec.pipeline`` (``producer`` -> ``map(workers=2)`` -> iterate);
* ``pypeln``    - pypeln's process stages (``pypeln.process.map(workers=2)`` over the
                  producer's generator), skipped with a line saying so when pypeln is
                  not installed;
* ``mp.Queue``  - the seed's pattern written plainly: a producer Process, two
                  transform Processes and the parent, on ``multiprocessing.Queue``s
                  (bounded like the others) with one end-of-stream sentinel per worker.

Items: tiny (small ints, the transform adds 1) and 1 MiB (``bytes``, passed
through). Each figure is the best of 5 rounds, each run in a fresh interpreter
(the peers take turns in each round, so that a busy moment falls on all of
them), in items per second; the ratios are forkexec's throughput over the
peer's. Last, forkexec's parent RSS
while it consumes 10 million items slowly (the consumer does a little work per
item, so the stages run ahead until ``maxsize`` stops them): it must stay flat.
The numbers are information: no test asserts them.
"""

import argparse
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from forkexec import pipeline  # noqa: E402

MAXSIZE = 256
MIB = 1 << 20
_END = "__end_of_stream__"   # the seed's sentinel, made unambiguous for the benchmark


def produce_ints(n):
    yield from range(n)


def produce_blobs(n):
    blob = bytearray(MIB)
    for _ in range(n):
        yield bytes(blob)   # a new object each time: pickle's memo must not share them


def add_one(x):
    return x + 1


def same(x):
    return x


# -- the peers: each returns the number of items the consumer saw --------------------

def run_forkexec(produce, transform, n):
    stage = pipeline.map(transform, pipeline.producer(produce, n, maxsize=MAXSIZE),
                         workers=2, maxsize=MAXSIZE)
    count = 0
    for _ in stage:
        count += 1
    return count


def run_pypeln(produce, transform, n):
    import pypeln
    stage = pypeln.process.map(transform, produce(n), workers=2, maxsize=MAXSIZE)
    count = 0
    for _ in stage:
        count += 1
    return count


def _mp_producer(produce, n, out, consumers):
    for item in produce(n):
        out.put(item)
    for _ in range(consumers):
        out.put(_END)


def _mp_transform(transform, inq, out):
    for item in iter(inq.get, _END):
        out.put(transform(item))
    out.put(_END)


def run_mp_queue(produce, transform, n):
    ctx = multiprocessing.get_context("fork")
    q1, q2 = ctx.Queue(MAXSIZE), ctx.Queue(MAXSIZE)
    procs = [ctx.Process(target=_mp_producer, args=(produce, n, q1, 2))]
    procs += [ctx.Process(target=_mp_transform, args=(transform, q1, q2)) for _ in range(2)]
    for p in procs:
        p.start()
    count, ended = 0, 0
    while ended < 2:
        for _ in iter(q2.get, _END):
            count += 1
        ended += 1
    for p in procs:
        p.join()
    return count


PEERS = [("forkexec", run_forkexec, None), ("pypeln", run_pypeln, "pypeln"),
         ("mp.Queue", run_mp_queue, None)]
#: pypeln's process stages move about 2,000 small items/s here: fewer items keep a run
#: to a few seconds (its start-up is milliseconds, so its rate hardly changes).
FEWER = {"pypeln": 0.05}


WORKLOADS = {"tiny": ("tiny items", produce_ints, add_one),
             "1mib": ("1 MiB items", produce_blobs, same)}


def one_run(peer, workload, n):
    """Items/s of one run of ``peer`` on ``workload``, in this process."""
    run = {name: run for name, run, _ in PEERS}[peer]
    _, produce, transform = WORKLOADS[workload]
    t0 = time.perf_counter()
    got = run(produce, transform, n)
    elapsed = time.perf_counter() - t0
    if got != n:
        raise AssertionError("%s: the consumer saw %d of %d items" % (peer, got, n))
    return n / elapsed


def rates(peers, workload, counts, rounds):
    """Best items/s of each peer over ``rounds`` rounds. Each run is a fresh interpreter (a
    peer's imports and leftovers change how the next one runs: after pypeln's, mp.Queue
    moved 1 MiB items twice as fast), and the peers take turns in each round, so that a
    busy moment on the machine does not fall on one peer only."""
    best = {name: 0.0 for name in peers}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    for _ in range(rounds):
        for name in peers:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name,
                                  workload, str(counts[name])], env=env, check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            best[name] = max(best[name], float(out))
    return best


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_run(n, samples=10):
    """Parent RSS (MiB) at each tenth of ``n`` items consumed slowly through forkexec."""
    stage = pipeline.map(add_one, pipeline.producer(produce_ints, n, maxsize=MAXSIZE),
                         workers=2, maxsize=MAXSIZE)
    marks, step = [], max(1, n // samples)
    slow = 0
    for i, x in enumerate(stage, 1):
        for _ in range(3):      # the slow consumer
            slow += x
        if i % step == 0:
            marks.append(round(rss_mib(), 1))
    return marks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer items, one round")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--only", choices=["tiny", "1mib", "rss"], action="append",
                        help="run only this part (repeatable); default: all")
    parser.add_argument("--one", nargs=3, metavar=("PEER", "WORKLOAD", "N"),
                        help=argparse.SUPPRESS)   # one run, in a fresh interpreter
    args = parser.parse_args()
    if args.one:
        print(one_run(args.one[0], args.one[1], int(args.one[2])))
        return
    only = set(args.only or ["tiny", "1mib", "rss"])
    rounds = 1 if args.quick else 5
    sizes = {"tiny": 50_000 if args.quick else 300_000, "1mib": 100 if args.quick else 1000}
    rss_items = 1_000_000 if args.quick else 10_000_000
    print("python %s, %d CPUs; pipeline: producer -> transform (2 workers) -> consumer "
          "(the parent); maxsize %d" % (sys.version.split()[0], os.cpu_count(), MAXSIZE))
    results = {}
    for workload in [w for w in WORKLOADS if w in only]:
        label, n = WORKLOADS[workload][0], sizes[workload]
        peers, counts = [], {}
        for name, run, module in PEERS:
            if module and importlib.util.find_spec(module) is None:
                print("  %s: skipped, %s is not installed (pip install %s)"
                      % (name, module, module))
                continue
            peers.append(name)
            counts[name] = max(1, int(n * FEWER.get(name, 1)))
        best = rates(peers, workload, counts, rounds)
        results[label] = {"items": counts, "items_per_s": best}
        print("\n%s: items/s, and forkexec's throughput over the peer's" % label)
        for name, rate in best.items():
            ratio = best["forkexec"] / rate
            print("  %-10s %14.0f   %6.2fx   (%d items)" % (name, rate, ratio, counts[name]))
    if "rss" in only:
        before = rss_mib()
        marks = rss_run(rss_items)
        results["rss"] = {"items": rss_items, "before_mib": before, "marks_mib": marks}
        print("\nforkexec parent RSS over %d items, slow consumer (MiB): before %.1f, at each "
              "tenth %s" % (rss_items, before, marks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
