"""Peak parent RSS growth of ``map(..., buffersize=...)`` over many tiny items.

Run in its own interpreter (``python _rss_child.py EXECUTOR ITEMS CHUNKSIZE
BUFFERSIZE WORKERS``) so nothing else the harness allocated counts; prints one
JSON line. Growth = peak RSS during the map - RSS just before it, for this
process only (not its workers). On Linux the peak is /proc's VmHWM, reset just
before the map; ``ru_maxrss`` cannot be used here, as it keeps the peak of the
forked harness across exec.
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _tasks import noop  # noqa: E402  (after the path set-up)


def _status_bytes(field):
    """A ``Vm*`` field of /proc/self/status in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak():
    """Make VmHWM start again from the current RSS (Linux 4.0+); False if we cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(run):
    """(growth, before, peak) in bytes around ``run()``."""
    before = _status_bytes("VmRSS")
    if before is not None and _reset_peak():
        run()
        peak = _status_bytes("VmHWM")
        return peak - before, before, peak
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - before, before, peak


def _executor(name, workers):
    if name == "forkexec":
        from forkexec import ForkExchangeExecutor
        return ForkExchangeExecutor(workers)
    if name == "ppe-fork":
        import concurrent.futures
        import multiprocessing
        return concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"))
    raise SystemExit("unknown executor %r" % name)


def main(name, items, chunksize, buffersize, workers):
    counted = []

    def run():
        count = 0
        for _ in executor.map(noop, range(items), chunksize=chunksize, buffersize=buffersize):
            count += 1
        counted.append(count)

    with _executor(name, workers) as executor:
        # Warm up at the same settings, so the pool's own set-up is in the baseline.
        for _ in executor.map(noop, range(chunksize * buffersize * 4), chunksize=chunksize,
                              buffersize=buffersize):
            pass
        start = time.perf_counter()
        growth, before, peak = _measure(run)
        seconds = time.perf_counter() - start
    if counted != [items]:
        raise SystemExit("map yielded %s results for %d items" % (counted, items))
    print(json.dumps({"growth_mb": growth / 1e6, "base_mb": before / 1e6,
                      "peak_mb": peak / 1e6, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:6]))
