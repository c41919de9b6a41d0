#!/usr/bin/env python3
"""forkexec against its peers, in one process tree and interleaved rounds.

    python benchmarks/bench_peers.py [--quick] [--json out.json] [--only submit,map1]
                                     [--executors forkexec,loky] [--rounds N] [--list]

For each workload, every executor opens one warmed-up pool; then, round after
round, each executor runs the workload once (the order rotates every round), so
machine noise falls on all of them alike. The table shows the median of the
rounds and its ratio to ProcessPoolExecutor(fork) and to the raw floor (a
hand-written fork + pipe + pickle loop). Targets for forkexec are marked met or
missed. The numbers are information, never assertions. See benchmarks/README.md.
"""

import argparse
import contextlib
import copy
import faulthandler
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)   # benchmark the working tree's forkexec, not an installed one

from _tasks import echo, noop, spin  # noqa: E402

REFERENCE = "ppe-fork"
FLOOR = "floor"
#: A measurement (or a pool's start or shutdown) that takes longer is reported stuck.
STUCK_AFTER = {"quick": 60, "full": 240}


# -- formatting -------------------------------------------------------------------------
def _rate(v):
    if v >= 1e6:
        return "%.2fM/s" % (v / 1e6)
    if v >= 1e3:
        return "%.1fk/s" % (v / 1e3)
    return "%.0f/s" % v


def _ms(v):
    return "%.1f ms" % (v * 1e3)


def _us(v):
    return "%.0f us" % v


def _mibs(v):
    return "%.0f MiB/s" % v


def _percent(v):
    return "%.1f%%" % (v * 100)


def _mb(v):
    return "%.1f MB" % v


class Metric:
    def __init__(self, key, label, unit, better, fmt):
        self.key = key
        self.label = label
        self.unit = unit
        self.better = better   # "higher" or "lower"
        self.fmt = fmt


# -- workloads ------------------------------------------------------------------------
class Workload:
    """A workload runs through every peer's warmed-up session, round-robin."""

    name = ""
    metrics = ()
    full = {}
    quick = {}

    def title(self, p, workers):
        raise NotImplementedError

    def peers(self, peers):
        return peers

    def setup(self, p):
        pass

    def warm_up(self, session):
        """Start every worker with the operation the workload uses (mpire's kept-alive
        pool breaks when map follows apply_async, so each workload warms its own way)."""
        session.submit_all(noop, [(i,) for i in range(4 * session.workers)])

    def measure(self, session, p):
        raise NotImplementedError


class ColdStart(Workload):
    name = "cold"
    metrics = (Metric("seconds", "cold start", "s", "lower", _ms),)
    full = {"rounds": 7}
    quick = {"rounds": 3}

    def title(self, p, workers):
        return "cold start: create the pool (%d workers), run one task, shut down" % workers

    def measure_peer(self, peer, workers):
        start = time.perf_counter()
        peer.cold(workers)
        return {"seconds": time.perf_counter() - start}


class ColdStartNumpy(ColdStart):
    """The first pool of a program that has loaded numpy and started OpenBLAS's native
    threads (each sample in a fresh interpreter, ``_cold_child.py``): a pool must not wait
    for threads the program owns."""
    name = "coldnumpy"
    metrics = (Metric("seconds", "cold start, numpy loaded", "s", "lower", _ms),)

    def title(self, p, workers):
        return ("cold start of a program's first pool, numpy loaded and its BLAS threads "
                "running (own interpreter, %d workers)" % workers)

    def peers(self, peers):
        # Fork-based pools only: spawn, forkserver, loky and mpire leave helper processes
        # (resource trackers, servers) that outlive each short-lived interpreter.
        return [peer for peer in peers if peer.name in ("forkexec", REFERENCE, "mp-pool", FLOOR)]

    def setup(self, p):
        import numpy  # noqa: F401 - skipped with a note when numpy is missing

    def measure_peer(self, peer, workers):
        done = subprocess.run([sys.executable, os.path.join(HERE, "_cold_child.py"),
                               peer.name, str(workers)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or ["failed"])[-1])
        return {"seconds": json.loads(done.stdout.strip().splitlines()[-1])["seconds"]}


class SubmitTiny(Workload):
    name = "submit"
    metrics = (Metric("rate", "submit tiny", "tasks/s", "higher", _rate),)
    full = {"rounds": 5, "tasks": 20000}
    quick = {"rounds": 3, "tasks": 1000}

    def title(self, p, workers):
        return "submit %d tiny tasks one by one, then wait for all (%d workers)" % (
            p["tasks"], workers)

    def measure(self, session, p):
        n = p["tasks"]
        args = [(i,) for i in range(n)]
        start = time.perf_counter()
        results = session.submit_all(noop, args)
        seconds = time.perf_counter() - start
        _check(len(results) == n and results[-1] == n - 1, "wrong results")
        return {"rate": n / seconds}


class Workers32(SubmitTiny):
    name = "workers32"
    metrics = (Metric("rate", "32 workers, tiny", "tasks/s", "higher", _rate),)
    full = {"rounds": 3, "tasks": 10000}
    quick = {"rounds": 2, "tasks": 1000}

    def title(self, p, workers):
        return ("32 workers: submit %d tiny tasks, then wait for all (forkexec-2w: the same "
                "with 2 workers)" % p["tasks"])

    def peers(self, peers):
        from _peers import FORKEXEC_2W
        chosen = []
        for peer in peers:
            wide = copy.copy(peer)
            wide.workers = 32
            chosen.append(wide)
            if peer.name == "forkexec":
                chosen.append(FORKEXEC_2W)
        return chosen


class MapTiny(Workload):
    metrics = ()

    def __init__(self, chunksize, full_items, quick_items):
        self.chunksize = chunksize
        self.name = "map%d" % chunksize
        self.metrics = (Metric("rate", "map(chunksize=%d)" % chunksize, "items/s", "higher",
                               _rate),)
        self.full = {"rounds": 5, "items": full_items}
        self.quick = {"rounds": 3, "items": quick_items}

    def title(self, p, workers):
        return "map(noop, range(%d), chunksize=%d), consume all (%d workers)" % (
            p["items"], self.chunksize, workers)

    def warm_up(self, session):
        session.map(noop, range(4 * session.workers * self.chunksize), self.chunksize)

    def measure(self, session, p):
        n = p["items"]
        start = time.perf_counter()
        results = session.map(noop, range(n), self.chunksize)
        seconds = time.perf_counter() - start
        _check(len(results) == n and results[-1] == n - 1, "wrong results")
        return {"rate": n / seconds}


class RoundTrip(Workload):
    name = "roundtrip"
    metrics = (Metric("p50", "round trip, median", "us", "lower", _us),
               Metric("p99", "round trip, p99", "us", "lower", _us))
    full = {"rounds": 5, "calls": 2000}
    quick = {"rounds": 3, "calls": 300}

    def title(self, p, workers):
        return "round trip: %d tasks one at a time, each waited for (%d workers)" % (
            p["calls"], workers)

    def warm_up(self, session):
        for i in range(4 * session.workers):
            session.call(noop, i)

    def measure(self, session, p):
        call = session.call
        clock = time.perf_counter
        latencies = []
        for i in range(p["calls"]):
            start = clock()
            call(noop, i)
            latencies.append(clock() - start)
        latencies.sort()
        return {"p50": statistics.median(latencies) * 1e6,
                "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1e6}


class Payload(Workload):
    def __init__(self, name, size, full, quick):
        self.name = name
        self.size = size
        label = "%d MiB payload" % (size >> 20)
        self.metrics = (Metric("rate", label, "MiB/s", "higher", _mibs),)
        self.full = full
        self.quick = quick
        self.data = None

    def title(self, p, workers):
        return ("%d tasks of %d MiB bytes in, the same bytes out; MiB/s counts both ways "
                "(%d workers)" % (p["tasks"], self.size >> 20, workers))

    def setup(self, p):
        self.data = bytes(range(256)) * (self.size // 256)   # real pages, not the zero page

    def measure(self, session, p):
        n = p["tasks"]
        start = time.perf_counter()
        results = session.submit_all(echo, [(self.data,)] * n)
        seconds = time.perf_counter() - start
        _check(len(results) == n and all(len(r) == self.size for r in results),
               "wrong results")
        return {"rate": 2 * n * self.size / seconds / (1 << 20)}


class CpuBound(Workload):
    name = "cpu"
    metrics = (Metric("efficiency", "CPU-bound efficiency", "ideal/wall", "higher", _percent),)
    full = {"rounds": 15, "task_seconds": 0.02, "tasks_per_worker": 2, "maps": 3}
    quick = {"rounds": 3, "task_seconds": 0.02, "tasks_per_worker": 2, "maps": 1}

    def __init__(self):
        self.loops = None
        self.task_seconds = None

    def title(self, p, workers):
        return ("CPU-bound: map(chunksize=1) of %d pure-Python tasks of ~%.0f ms, %d time(s) "
                "per sample; efficiency = ideal wall time / measured (%d workers)" % (
                    p["tasks_per_worker"] * workers, p["task_seconds"] * 1e3, p["maps"],
                    workers))

    def setup(self, p):
        # Calibrate in the parent, undisturbed: the ideal is this time x tasks / workers.
        probe = 200000
        best = min(_timed(spin, probe) for _ in range(5))
        self.loops = int(probe * p["task_seconds"] / best)
        self.task_seconds = min(_timed(spin, self.loops) for _ in range(5))

    def warm_up(self, session):
        session.map(noop, range(4 * session.workers), 1)

    def measure(self, session, p):
        workers = session.workers
        tasks = p["tasks_per_worker"] * workers
        start = time.perf_counter()
        for _ in range(p["maps"]):
            results = session.map(spin, [self.loops] * tasks, 1)
            _check(len(results) == tasks, "wrong results")
        seconds = time.perf_counter() - start
        ideal = self.task_seconds * tasks / workers * p["maps"]
        return {"efficiency": ideal / seconds}


class MapRss(Workload):
    name = "rss"
    metrics = (Metric("growth", "map+buffersize: parent RSS growth", "MB", "lower", _mb),
               Metric("peak_mb", "map+buffersize: parent peak RSS", "MB", "lower", _mb),
               Metric("seconds", "map+buffersize: wall time", "s", "lower", _ms))
    full = {"rounds": 1, "items": 10_000_000, "chunksize": 256, "buffersize": 16}
    quick = {"rounds": 1, "items": 1_000_000, "chunksize": 256, "buffersize": 16}

    def title(self, p, workers):
        return ("peak parent RSS growth (own interpreter) of map over %d tiny items, "
                "chunksize=%d, buffersize=%d (%d workers)" % (
                    p["items"], p["chunksize"], p["buffersize"], workers))

    def peers(self, peers):
        return [peer for peer in peers if peer.name in ("forkexec", REFERENCE)]

    def run(self, peers, p, workers, stuck_after):
        """{peer: [sample]}, {peer: why not run}."""
        samples, errors = {}, {}
        for peer in peers:
            if peer.name == REFERENCE and sys.version_info < (3, 14):
                errors[peer.name] = "n/a: map(buffersize=) needs Python 3.14+"
                continue
            command = [sys.executable, os.path.join(HERE, "_rss_child.py"), peer.name,
                       str(p["items"]), str(p["chunksize"]), str(p["buffersize"]),
                       str(workers)]
            for _ in range(p["rounds"]):
                try:
                    done = subprocess.run(command, capture_output=True, text=True,
                                          timeout=stuck_after)
                except subprocess.TimeoutExpired:
                    errors[peer.name] = "stuck: no result after %d s" % stuck_after
                    break
                if done.returncode != 0:
                    errors[peer.name] = "failed: " + (done.stderr.strip().splitlines()
                                                      or ["exit %d" % done.returncode])[-1]
                    break
                out = json.loads(done.stdout.strip().splitlines()[-1])
                samples.setdefault(peer.name, []).append(
                    {"growth": out["growth_mb"], "seconds": out["seconds"],
                     "base_mb": out["base_mb"], "peak_mb": out["peak_mb"]})
        return samples, errors


def _timed(fn, arg):
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def _check(ok, message):
    if not ok:
        raise AssertionError(message)


WORKLOADS = [
    ColdStart(),
    SubmitTiny(),
    MapTiny(1, 20000, 1000),
    MapTiny(256, 500000, 50000),
    RoundTrip(),
    Payload("payload1m", 1 << 20, {"rounds": 5, "tasks": 64}, {"rounds": 3, "tasks": 16}),
    Payload("payload64m", 64 << 20, {"rounds": 5, "tasks": 2}, {"rounds": 2, "tasks": 1}),
    CpuBound(),
    Workers32(),
    MapRss(),
    ColdStartNumpy(),
]


# -- targets --------------------------------------------------------------------------
class Target:
    """forkexec's median compared with a reference executor's (a ratio), or an absolute bound."""

    def __init__(self, label, workload, metric, op, bound, reference=None):
        self.label = label
        self.workload = workload
        self.metric = metric
        self.op = op
        self.bound = bound
        self.reference = reference

    def describe(self):
        if self.reference is None:
            return "forkexec %s %g" % (self.op, self.bound)
        return "forkexec %s %gx %s" % (self.op, self.bound, self.reference)

    def evaluate(self, results):
        """(shown value, True/False) or (reason, None) when it cannot be judged."""
        medians = results.get(self.workload, {}).get("medians", {}).get(self.metric, {})
        ours = medians.get("forkexec")
        if ours is None:
            return "n/a (no forkexec result)", None
        if self.reference is None:
            value = ours
            shown = "%.1f" % value
        else:
            ref = medians.get(self.reference)
            if not ref:
                return "n/a (no %s result)" % self.reference, None
            value = ours / ref
            shown = "%.2fx" % value
        ok = {">=": value >= self.bound, "<=": value <= self.bound,
              "<": value < self.bound}[self.op]
        return shown, ok


TARGETS = [
    Target("submit tiny tasks", "submit", "rate", ">=", 15, REFERENCE),
    Target("map(chunksize=1)", "map1", "rate", ">=", 10, REFERENCE),
    Target("map(chunksize=256)", "map256", "rate", ">=", 3, REFERENCE),
    Target("map(chunksize=256) vs multiprocessing.Pool", "map256", "rate", ">=", 1, "mp-pool"),
    Target("round trip, median", "roundtrip", "p50", "<=", 0.5, REFERENCE),
    Target("round trip, median, vs the raw pipe floor", "roundtrip", "p50", "<=", 1.5, FLOOR),
    Target("cold start", "cold", "seconds", "<=", 1, REFERENCE),
    Target("cold start, numpy loaded", "coldnumpy", "seconds", "<=", 1, REFERENCE),
    Target("64 MiB payload", "payload64m", "rate", ">=", 1.3, REFERENCE),
    Target("32 workers, tiny tasks", "workers32", "rate", ">=", 10, REFERENCE),
    Target("32 workers vs our own 2 workers", "workers32", "rate", ">=", 0.8, "forkexec-2w"),
    Target("CPU-bound efficiency vs the floor", "cpu", "efficiency", ">=", 0.95, FLOOR),
    Target("10M-item map, buffersize: RSS growth (MB)", "rss", "growth", "<", 100),
]


# -- running --------------------------------------------------------------------------
class Stuck(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds):
    """Raise Stuck in the main thread (after dumping every thread's stack) if the
    block runs longer than ``seconds``: a hung peer must not hang the run."""
    def on_alarm(signum, frame):
        faulthandler.dump_traceback(all_threads=True)
        raise Stuck("stuck: no result after %d s" % seconds)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _describe_error(exc):
    text = str(exc) or type(exc).__name__
    if isinstance(exc, Stuck):
        return text
    return "failed: %s: %s" % (type(exc).__name__, text.splitlines()[0] if text else "")


class Run:
    """Runs the workloads; remembers what could not be cleaned up."""

    def __init__(self, peers, workers, mode, rounds_override):
        self.peers = peers
        self.workers = workers
        self.mode = mode
        self.rounds_override = rounds_override
        self.stuck_after = STUCK_AFTER[mode]
        self.abandoned = []   # sessions whose close() itself got stuck
        self.stuck = {}       # peer -> why: a peer that hung once is not tried again
        self.startup = {}     # peer -> seconds to open and warm up its pool (last workload)

    def params(self, workload):
        p = dict(workload.quick if self.mode == "quick" else workload.full)
        if self.rounds_override and workload.name != "rss":
            p["rounds"] = self.rounds_override
        return p

    def workload(self, workload):
        p = self.params(workload)
        everyone = workload.peers(self.peers)
        peers = [peer for peer in everyone if peer.name not in self.stuck]
        started = time.perf_counter()
        self.startup = {}
        print("== %s: %s" % (workload.name, workload.title(p, self.workers)), flush=True)
        if isinstance(workload, MapRss):
            samples, errors = workload.run(peers, p, self.workers, self.stuck_after)
        elif isinstance(workload, ColdStart):
            try:
                workload.setup(p)
            except ImportError as exc:
                print("   skipped: %s (pip install numpy)" % exc, flush=True)
                return {"title": workload.title(p, self.workers), "params": p,
                        "peers": [], "samples": {}, "errors": {}, "medians": {},
                        "startup_seconds": {}, "seconds": 0.0}
            samples, errors = self._rounds(peers, p, lambda peer: workload.measure_peer(
                peer, self.workers), warm_up=True)
        else:
            samples, errors = self._with_sessions(workload, peers, p)
        for name, why in sorted(errors.items()):
            print("   %s: %s" % (name, why), flush=True)
            if "stuck:" in why:
                self.stuck.setdefault(name, "%s (in %s)" % (why, workload.name))
        for peer in everyone:
            if peer not in peers:
                errors[peer.name] = "skipped: " + self.stuck[peer.name]
        medians = {}
        for metric in workload.metrics:
            medians[metric.key] = {
                name: statistics.median(s[metric.key] for s in runs)
                for name, runs in samples.items() if runs}
        return {"title": workload.title(p, self.workers), "params": p,
                "peers": [peer.name for peer in everyone], "samples": samples,
                "errors": errors, "medians": medians, "startup_seconds": self.startup,
                "seconds": time.perf_counter() - started}

    def _rounds(self, peers, p, measure, warm_up=False):
        samples = {peer.name: [] for peer in peers}
        errors = {}
        live = list(peers)
        for round_no in range(p["rounds"] + (1 if warm_up else 0)):
            shift = round_no % max(1, len(live))
            for peer in live[shift:] + live[:shift]:
                if peer.name in errors:
                    continue
                try:
                    with deadline(self.stuck_after):
                        sample = measure(peer)
                except Exception as exc:   # noqa: B902 - one peer's failure is a result
                    errors[peer.name] = _describe_error(exc)
                    continue
                if not (warm_up and round_no == 0):
                    samples[peer.name].append(sample)
        return samples, errors

    def _with_sessions(self, workload, peers, p):
        workload.setup(p)
        sessions, errors = {}, {}
        try:
            for peer in peers:
                started = time.perf_counter()
                try:
                    with deadline(self.stuck_after):
                        session = peer.open(self.workers)
                        sessions[peer.name] = session
                        workload.warm_up(session)
                except Exception as exc:   # noqa: B902
                    errors[peer.name] = "could not start: " + _describe_error(exc)
                self.startup[peer.name] = time.perf_counter() - started
            live = [peer for peer in peers if peer.name in sessions
                    and peer.name not in errors]
            samples, failures = self._rounds(
                live, p, lambda peer: workload.measure(sessions[peer.name], p))
            errors.update(failures)
        finally:
            for name, session in sessions.items():
                try:
                    with deadline(self.stuck_after):
                        session.close()
                except Exception as exc:   # noqa: B902
                    errors.setdefault(name, "shutdown " + _describe_error(exc))
                    if isinstance(exc, Stuck):
                        self.abandoned.append(name)
        return samples, errors


# -- reporting ------------------------------------------------------------------------
def _ratio(value, reference):
    if value is None or not reference:
        return "-"
    return "%.2fx" % (value / reference)


def report(results):
    lines = []
    for name, result in results.items():
        workload = next(w for w in WORKLOADS if w.name == name)
        lines.append("")
        lines.append("%s - %s" % (name, result["title"]))
        for metric in workload.metrics:
            medians = result["medians"].get(metric.key, {})
            lines.append("  %-34s %14s %11s %9s   (%s, %s is better)" % (
                metric.label, "median", "x " + REFERENCE, "x " + FLOOR, metric.unit,
                metric.better))
            for peer in result["peers"]:
                value = medians.get(peer)
                if value is None:
                    why = result["errors"].get(peer, "no result")
                    lines.append("  %-34s %s" % (peer, why))
                    continue
                lines.append("  %-34s %14s %11s %9s" % (
                    peer, metric.fmt(value), _ratio(value, medians.get(REFERENCE)),
                    _ratio(value, medians.get(FLOOR))))
        for target in TARGETS:
            if target.workload == name:
                shown, ok = target.evaluate(results)
                lines.append("  target: %-36s %-9s %s" % (
                    target.describe(), shown, _verdict(ok)))
    lines.append("")
    lines.append("TARGETS (forkexec, ratios to the same run's medians)")
    for target in TARGETS:
        if target.workload not in results:
            continue
        shown, ok = target.evaluate(results)
        lines.append("  %-44s %-30s %-9s %s" % (target.label, target.describe(), shown,
                                                 _verdict(ok)))
    return "\n".join(lines)


def _verdict(ok):
    return {True: "met", False: "MISSED", None: "n/a"}[ok]


def _machine():
    info = {"python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "platform": platform.platform(), "usable_cpus": None, "cpu": platform.processor()}
    from _peers import usable_cpus
    info["usable_cpus"] = usable_cpus()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["memory"] = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    info["versions"] = _versions()
    try:
        info["forkexec_commit"] = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["forkexec_commit"] = None
    return info


def _versions():
    from importlib import metadata
    import forkexec
    versions = {"forkexec": "%s (%s)" % (forkexec.__version__, os.path.dirname(forkexec.__file__))}
    for name in ("loky", "mpire", "psutil"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def main(argv=None):
    from _peers import PEERS
    from _procs import kill_leftovers, make_subreaper

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--only", metavar="WORKLOADS",
                        help="comma-separated workloads (default: all; see --list)")
    parser.add_argument("--executors", metavar="NAMES",
                        help="comma-separated executors (default: all); the ratio columns "
                             "need %s and %s" % (REFERENCE, FLOOR))
    parser.add_argument("--rounds", type=int, help="rounds per workload (default: 5, quick 3)")
    parser.add_argument("--workers", type=int, help="workers per pool (default: usable CPUs)")
    parser.add_argument("--list", action="store_true", help="list workloads and executors")
    args = parser.parse_args(argv)

    if args.list:
        for w in WORKLOADS:
            print("workload  %-11s %s" % (w.name, w.title(w.full, 2)))
        for peer in PEERS:
            print("executor  %-15s %s" % (peer.name, peer.description))
        return 0
    workloads = _select(args.only, WORKLOADS, "workload", parser)
    peers = _select(args.executors, PEERS, "executor", parser)
    from _peers import usable_cpus
    workers = args.workers or usable_cpus()
    mode = "quick" if args.quick else "full"

    make_subreaper()
    runnable = []
    for peer in peers:
        why = peer.missing()
        if why:
            print("skipped %s: %s" % (peer.name, why))
        else:
            runnable.append(peer)
    machine = _machine()
    machine["load_before"] = os.getloadavg()
    print("forkexec benchmark (%s), Python %s, %d usable CPUs, %d workers per pool; %s" % (
        mode, machine["python"], machine["usable_cpus"], workers, machine["cpu"]))
    print("load average before: %.2f %.2f %.2f" % machine["load_before"], flush=True)

    run = Run(runnable, workers, mode, args.rounds)
    results = {}
    started = time.perf_counter()
    interrupted = False
    try:
        for workload in workloads:
            results[workload.name] = run.workload(workload)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: reporting what was measured", flush=True)
    finally:
        leftovers = kill_leftovers()
    machine["load_after"] = os.getloadavg()
    elapsed = time.perf_counter() - started

    print(report(results))
    print("")
    print("total %.0f s; load average after: %.2f %.2f %.2f" % ((elapsed,) + machine["load_after"]))
    if leftovers:
        print("killed %d unexpected leftover processes: %s" % (
            len(leftovers), "; ".join("%d %s" % kv for kv in sorted(leftovers.items()))))
    if args.json:
        document = {
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "mode": mode, "workers": workers, "machine": machine, "seconds": elapsed,
            "skipped": {p.name: p.missing() for p in peers if p not in runnable},
            "workloads": results,
            "targets": [dict(zip(("label", "rule", "value", "met"),
                                 (t.label, t.describe()) + t.evaluate(results)))
                        for t in TARGETS if t.workload in results],
            "leftovers_killed": leftovers, "interrupted": interrupted,
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1, default=str)
        print("wrote %s" % args.json)
    sys.stdout.flush()
    if run.abandoned:
        # A peer's shutdown hung; its threads would block interpreter exit. Its
        # processes are already killed above.
        os._exit(3)
    return 130 if interrupted else 0


def _select(option, choices, kind, parser):
    if not option:
        return list(choices)
    wanted = [n.strip() for n in option.split(",") if n.strip()]
    known = {c.name for c in choices}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        parser.error("unknown %s(s): %s (known: %s)" % (kind, ", ".join(unknown),
                                                        ", ".join(sorted(known))))
    return [c for c in choices if c.name in wanted]


if __name__ == "__main__":
    sys.exit(main())
