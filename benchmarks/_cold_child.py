"""The first pool of a program that has loaded numpy and started OpenBLAS's threads.

Run in its own interpreter (``python _cold_child.py EXECUTOR WORKERS``) so the
pool is the program's first: prints one JSON line with the seconds to create
the pool, run one task and shut it down.
"""

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy  # noqa: E402

from _peers import PEERS  # noqa: E402


#: Imported before the clock starts: a cold start times the pool, not the import.
PREIMPORT = {"forkexec": ["forkexec"], "loky": ["loky"], "mpire": ["mpire"]}
STDLIB = ["concurrent.futures.process", "multiprocessing.pool"]


def main(name, workers):
    for module in PREIMPORT.get(name, STDLIB):
        importlib.import_module(module)
    matrix = numpy.ones((300, 300))
    matrix @ matrix   # starts OpenBLAS's thread pool
    peer = next(p for p in PEERS if p.name == name)
    start = time.perf_counter()
    peer.cold(workers)
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
