"""Foundation benchmark: Channel against a raw pipe + pickle loop, and Exchange.ready() scaling.

    python benchmarks/bench_channel.py [--quick] [--json PATH]

(a) latency: a small object's round trip to a forked child and back, through a
    Channel and through raw pipes with a length prefix (median and p99); a raw
    loop on a socketpair (a Channel's transport) shows what the transport costs;
(b) throughput: a child streams small ints to the parent, through Channel.send,
    Channel.send_many (batches), and the raw floor (pickle + length prefix on a
    pipe, one write per message or buffered writes; and on a socketpair);
(c) Exchange.ready() with 256 channels against 2, one of them holding a message.

Every figure is the median of several rounds; the ratios compare like with like.
Standard library only. The numbers are information: no test asserts them.
"""

import argparse
import json
import os
import pickle
import select
import socket
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import forkexec  # noqa: E402
from forkexec import Exchange  # noqa: E402

LEN = struct.Struct("<Q")
SMALL = ("ping", 12345, 1.5, None)
GOALS = {"latency": 1.5, "throughput": 0.5, "ready": 1.5}


# -- raw floor -------------------------------------------------------------------------

class RawPipes:
    """A forked child on two pipes (or one socketpair, the transport a Channel
    uses); messages are a u64 length and a pickle."""

    def __init__(self, child, transport="pipe"):
        if transport == "pipe":
            down_r, self.down_w = os.pipe()
            self.up_r, up_w = os.pipe()
        else:
            ours, theirs = (s.detach() for s in socket.socketpair())
            down_r = up_w = theirs
            self.down_w = self.up_r = ours
        self.pid = os.fork()
        if self.pid == 0:
            for fd in {self.down_w, self.up_r}:
                os.close(fd)
            code = 0
            try:
                child(down_r, up_w)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        for fd in {down_r, up_w}:
            os.close(fd)
        self.pending = b""

    def send(self, obj):
        payload = pickle.dumps(obj, protocol=5)
        os.write(self.down_w, LEN.pack(len(payload)) + payload)

    def receive(self):
        return raw_receive(self.up_r, self)

    def close(self):
        for fd in {self.down_w, self.up_r}:
            os.close(fd)
        os.waitpid(self.pid, 0)


def raw_receive(fd, state):
    """One message from ``fd``; ``state.pending`` keeps bytes of later messages."""
    data = state.pending
    while len(data) < LEN.size or len(data) < LEN.size + LEN.unpack_from(data)[0]:
        more = os.read(fd, 1 << 18)
        if not more:
            raise EOFError
        data += more
    end = LEN.size + LEN.unpack_from(data)[0]
    state.pending = data[end:]
    return pickle.loads(data[LEN.size:end])


class _State:
    pending = b""


def raw_echo(down, up):
    state = _State()
    while True:
        try:
            obj = raw_receive(down, state)
        except EOFError:
            return
        payload = pickle.dumps(obj, protocol=5)
        os.write(up, LEN.pack(len(payload)) + payload)


def raw_stream(buffered):
    def child(down, up):
        n = raw_receive(down, _State())
        dumps, pack, write = pickle.dumps, LEN.pack, os.write
        if not buffered:
            for i in range(n):
                payload = dumps(i, protocol=5)
                write(up, pack(len(payload)) + payload)
            return
        out, size = [], 0
        for i in range(n):
            payload = dumps(i, protocol=5)
            out.append(pack(len(payload)))
            out.append(payload)
            size += len(payload) + 8
            if size >= 1 << 16:
                write(up, b"".join(out))
                out, size = [], 0
        write(up, b"".join(out))
    return child


def raw_stream_receive(up, n):
    """Parse ``n`` messages off ``up`` in big reads, the fastest way we know."""
    loads, unpack, size = pickle.loads, LEN.unpack_from, LEN.size
    data, pos, got = b"", 0, 0
    while got < n:
        chunk = os.read(up, 1 << 18)
        if not chunk:
            raise EOFError
        data = data[pos:] + chunk
        pos = 0
        while len(data) - pos >= size:
            length = unpack(data, pos)[0]
            end = pos + size + length
            if end > len(data):
                break
            loads(data[pos + size:end])
            pos = end
            got += 1


# -- forkexec children -------------------------------------------------------------------

def channel_echo(channel):
    for obj in iter(channel.receive, None):
        channel.send(obj)


def channel_stream(batch):
    def child(channel):
        n = channel.receive()
        if batch == 1:
            send = channel.send
            for i in range(n):
                send(i)
            return
        for start in range(0, n, batch):
            channel.send_many(range(start, min(n, start + batch)))
    return child


# -- measurements ----------------------------------------------------------------------------

def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def round_trips(send, receive, count):
    times = []
    clock = time.perf_counter
    for _ in range(count // 10):                 # warm up
        send(SMALL)
        receive()
    for _ in range(count):
        t0 = clock()
        send(SMALL)
        receive()
        times.append(clock() - t0)
    return times


def bench_latency(count, rounds):
    results = {"channel": [], "raw pipes": [], "raw socketpair": []}
    for _ in range(rounds):
        channel = forkexec.start(channel_echo)
        results["channel"] += round_trips(channel.send, channel.receive, count)
        channel.send(None)
        channel.close()
        channel.wait()
        for transport in ("pipe", "socket"):
            raw = RawPipes(raw_echo, transport)
            results["raw pipes" if transport == "pipe" else "raw socketpair"] += round_trips(
                raw.send, raw.receive, count)
            raw.close()
    return {name: {"median_us": statistics.median(t) * 1e6,
                   "p99_us": percentile(t, 0.99) * 1e6} for name, t in results.items()}


def stream_channel(n, batch):
    channel = forkexec.start(channel_stream(batch))
    receive = channel.receive
    t0 = time.perf_counter()
    channel.send(n)
    for _ in range(n):
        receive()
    elapsed = time.perf_counter() - t0
    channel.close()
    channel.wait()
    return elapsed


def stream_raw(n, buffered, transport="pipe"):
    raw = RawPipes(raw_stream(buffered), transport)
    t0 = time.perf_counter()
    raw.send(n)
    raw_stream_receive(raw.up_r, n)
    elapsed = time.perf_counter() - t0
    raw.close()
    return elapsed


def bench_throughput(n, rounds):
    runs = {
        "channel send": lambda: stream_channel(n, 1),
        "channel send_many": lambda: stream_channel(n, 1000),
        "raw, one write each": lambda: stream_raw(n, False),
        "raw, buffered writes": lambda: stream_raw(n, True),
        "raw socketpair, one write each": lambda: stream_raw(n, False, "socket"),
    }
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():            # interleaved: noise falls on all alike
            times[name].append(run())
    return {name: {"msgs_per_s": n / statistics.median(t)} for name, t in times.items()}


def bench_ready(nchannels, count, rounds):
    """Median cost of ready(0) when one channel of ``nchannels`` holds a message."""
    channels = [forkexec.start(channel_echo) for _ in range(nchannels)]
    exchange = Exchange(channels)
    hot = channels[nchannels // 2]
    poller = select.poll()
    poller.register(hot.fileno(), select.POLLIN)
    clock = time.perf_counter
    times = []
    try:
        for _ in range(rounds):
            for i in range(count + count // 10):
                hot.send(i)
                poller.poll()                        # the reply is there before we time
                t0 = clock()
                ready = exchange.ready(0)
                elapsed = clock() - t0
                assert ready == [hot], ready
                hot.receive()
                if i >= count // 10:
                    times.append(elapsed)
    finally:
        for channel in channels:
            channel.send(None)
        exchange.close()
        forkexec.waitall()
    return {"median_us": statistics.median(times) * 1e6, "p99_us": percentile(times, 0.99) * 1e6}


# -- report -------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quick look (well under 20 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        latency_count, stream_n, ready_count, rounds = 2000, 30000, 1000, 3
    else:
        latency_count, stream_n, ready_count, rounds = 10000, 100000, 5000, 5

    latency = bench_latency(latency_count, rounds)
    throughput = bench_throughput(stream_n, rounds)
    ready = {n: bench_ready(n, ready_count, rounds) for n in (2, 256)}

    ratios = {
        "latency channel/raw (median)":
            latency["channel"]["median_us"] / latency["raw pipes"]["median_us"],
        "latency channel/raw (p99)":
            latency["channel"]["p99_us"] / latency["raw pipes"]["p99_us"],
        "latency channel/raw socketpair (median)":
            latency["channel"]["median_us"] / latency["raw socketpair"]["median_us"],
        "throughput send / raw one write each":
            throughput["channel send"]["msgs_per_s"]
            / throughput["raw, one write each"]["msgs_per_s"],
        "throughput send / raw socketpair one write each":
            throughput["channel send"]["msgs_per_s"]
            / throughput["raw socketpair, one write each"]["msgs_per_s"],
        "throughput send_many / raw buffered":
            throughput["channel send_many"]["msgs_per_s"]
            / throughput["raw, buffered writes"]["msgs_per_s"],
        "ready() 256 / 2 channels (median)": ready[256]["median_us"] / ready[2]["median_us"],
    }
    goals = {
        "latency channel/raw (median)": ("<=", GOALS["latency"]),
        "throughput send / raw one write each": (">=", GOALS["throughput"]),
        "throughput send_many / raw buffered": (">=", GOALS["throughput"]),
        "ready() 256 / 2 channels (median)": ("<=", GOALS["ready"]),
    }

    print("(a) round trip of %r, %d per round, %d rounds" % (SMALL, latency_count, rounds))
    print("    %-24s %10s %10s" % ("", "median us", "p99 us"))
    for name, row in latency.items():
        print("    %-24s %10.1f %10.1f" % (name, row["median_us"], row["p99_us"]))
    print("(b) stream of %d ints, child -> parent, median of %d rounds" % (stream_n, rounds))
    for name, row in throughput.items():
        print("    %-32s %10.0f msgs/s" % (name, row["msgs_per_s"]))
    print("(c) Exchange.ready(0), one of N channels holding a message")
    for n, row in ready.items():
        print("    %-24s %10.2f %10.2f" % ("%d channels" % n, row["median_us"], row["p99_us"]))
    print("ratios")
    met = {}
    for name, value in ratios.items():
        goal = goals.get(name)
        verdict = ""
        if goal:
            op, target = goal
            met[name] = value <= target if op == "<=" else value >= target
            verdict = "goal %s %.2f: %s" % (op, target, "met" if met[name] else "MISSED")
        print("    %-48s %6.2f   %s" % (name, value, verdict))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": sys.version.split()[0], "quick": args.quick,
                       "latency": latency, "throughput": throughput,
                       "ready": {str(n): row for n, row in ready.items()},
                       "ratios": ratios, "goals_met": met}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
