"""The parent's side of a running pipeline: wiring, forking, supervising, stopping.

:class:`Run` creates one socketpair per (upstream worker, downstream worker)
pair and one control socketpair per stage process, forks every stage process
(each in a process group of its own, so that its own children go with it), and
keeps only the control channels and, when the parent consumes, the last stage's
outputs. It then only reads control records (and the items it consumes); the
items between stages never pass through it.

A FAILED record raises the stage's exception here, with a note naming the
stage and pid; EOF on a control channel without DONE raises
:class:`~forkexec.errors.StageDied` with the exit status. :meth:`Run.stop`
closes the control channels (every stage stops at its next wait), gives the
processes ``grace`` seconds, then SIGKILLs each process group and reaps.
"""

import collections
import os
import signal
import socket
import time

from . import _fork
from . import _pipeline_records as rec
from ._pipeline_links import Links, PeerGone
from ._pipeline_stage import PRODUCER, serve, in_order
from .channel import Channel
from .errors import ChannelBroken, ProtocolError, StageDied, add_note, describe_status

#: Send buffer of each channel, smaller than Linux's default: a sender does not run ahead
#: of a full socket, so large items stream through a few buffers that stay in the CPU
#: caches instead of piling up (measured, 1 MiB items: 256 KiB about 1.35x as fast as
#: 64 KiB, which needs four times the wake-ups per item, and as 1 MiB).
SOCKET_BUFFER = 1 << 18
#: Seconds the stage processes get to stop by themselves before SIGKILL.
STOP_GRACE = 0.3
#: Seconds finished stage processes get to exit.
EXIT_GRACE = 10.0
#: How long to wait for the exit status of a process whose control channel closed.
STATUS_WAIT = 2.0


def _peek(pid):
    """(exited, raw wait status or None) of a child, without reaping it, so that its
    process group stays valid for killpg."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:    # reaped by someone else: the status is lost
        return True, None
    if info is None:
        return False, None
    if info.si_code == os.CLD_EXITED:
        return True, (info.si_status & 0xff) << 8
    return True, info.si_status & 0x7f


Proc = collections.namedtuple("Proc", "stage index pid")


class _Spec:
    """The channel ends one stage process will keep, and the credit of its outputs."""

    def __init__(self, window):
        self.window = window
        self.control = None
        self.ins, self.in_windows, self.outs = [], [], []


def _close_all_but(socks, keep):
    keep = set(map(id, keep))
    for sock in socks:
        if id(sock) not in keep:
            sock.close()


class Run:
    """Stage processes started for ``stages`` (sources first, the sink last)."""

    def __init__(self, stages, to_parent, ordered):
        self.stages = stages
        self.ordered = ordered
        self.window = sum(s.maxsize for s in stages)     # ordered mode's reorder bound
        self.procs = []          # Proc by control index
        self.done = {}           # control index -> the stage function's result
        self.stopped = False
        parent_ins, controls = self._start(stages, to_parent)
        self.links = Links(parent_ins, [self._window(stages[-1], 1)] * len(parent_ins),
                           [], 0, controls, self._on_control, self._on_control_eof)

    @staticmethod
    def _window(stage, downstream_workers):
        """Credit of each channel out of one of ``stage``'s workers."""
        return max(1, stage.maxsize // (stage.workers * downstream_workers))

    # -- start ---------------------------------------------------------------
    def _start(self, stages, to_parent):
        """Wire and fork; returns the parent's (inputs, controls)."""
        socks = []

        def pair():
            a, b = socket.socketpair()
            socks.extend((a, b))
            for sock in (a, b):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            return a, b

        feeds = {stages.index(src): si for si, stage in enumerate(stages)
                 for src in stage.sources}
        specs = {}      # (stage index, worker) -> _Spec of that process's channel ends
        for si, stage in enumerate(stages):
            down = stages[feeds[si]].workers if si in feeds else 1
            for w in range(stage.workers):
                specs[si, w] = _Spec(self._window(stage, down))
        parent_ins, parent_controls = [], []
        for (si, w), spec in specs.items():
            parent_end, spec.control = pair()
            parent_controls.append(parent_end)
            for d in range(stages[feeds[si]].workers) if si in feeds else ():
                mine, theirs = pair()
                spec.outs.append(mine)
                specs[feeds[si], d].ins.append(theirs)
                specs[feeds[si], d].in_windows.append(spec.window)
            if si not in feeds and to_parent:
                out, parent_in = pair()
                spec.outs.append(out)
                parent_ins.append(parent_in)
        kept = parent_ins + parent_controls
        try:
            for (si, w), spec in specs.items():
                self.procs.append(Proc(stages[si], w, self._fork(stages[si], w, spec, socks)))
        except BaseException:
            for sock in kept:
                sock.close()
            self._kill_and_reap(0)
            raise
        finally:
            _close_all_but(socks, kept)
        return ([Channel(0, s) for s in parent_ins],
                [Channel(proc.pid, s) for proc, s in zip(self.procs, parent_controls)])

    def _fork(self, stage, index, spec, socks):
        pid = _fork.fork()
        if pid:
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass    # the child did it first
            return pid
        try:
            os.setpgid(0, 0)
            _close_all_but(socks, [spec.control] + spec.ins + spec.outs)
            serve(stage, index, Channel(0, spec.control), [Channel(0, s) for s in spec.ins],
                  spec.in_windows, [Channel(0, s) for s in spec.outs], spec.window,
                  self.ordered, self.window)
        finally:
            _fork.exit_child(1)

    # -- supervising ---------------------------------------------------------
    def _describe(self, i):
        stage, index, pid = self.procs[i]
        return "pipeline stage %r (worker %d of %d, pid %d)" % (
            stage.name, index + 1, stage.workers, pid)

    def _on_control(self, i, record):
        kind = record[0]
        if kind == rec.DONE:
            self.done[i] = record[1]
        elif kind == rec.FAILED:
            raise add_note(record[1].exception(), "raised in " + self._describe(i))
        elif kind == rec.RELEASED:   # from an ordered consumer stage to the producer
            self._release(record[1])
        else:
            raise ProtocolError("unexpected %s from %s" % (rec.describe(record),
                                                           self._describe(i)))

    def _on_control_eof(self, i):
        if i in self.done:
            return
        pid = self.procs[i].pid
        deadline = time.monotonic() + STATUS_WAIT
        exited, status = _peek(pid)
        while not exited and time.monotonic() < deadline:
            time.sleep(0.001)
            exited, status = _peek(pid)
        how = describe_status(status)
        if status is not None and os.WIFEXITED(status):
            how += " before finishing its work (sys.exit or os._exit in the stage?)"
        raise StageDied("%s died: %s" % (self._describe(i), how), self.procs[i].stage.name,
                        pid, status)

    def _release(self, seq):
        for i, proc in enumerate(self.procs):
            if proc.stage.kind == PRODUCER and not self.links.controls[i].at_eof:
                try:
                    self.links.controls[i].send((rec.RELEASED, seq))
                except ChannelBroken:
                    pass    # it finished or died: its EOF tells which

    # -- consuming -----------------------------------------------------------
    def items(self):
        """The last stage's items (ordered if asked); stops everything at the end."""
        source = self.links.items()
        if self.ordered:
            source = in_order(source, self._release, self.window)
        try:
            yield from source
        except PeerGone:    # a last-stage process left: its control channel says why
            self.links.wait_for_control_eof()
            raise StageDied("a stage process closed its channel and exited cleanly")
        self.stop(EXIT_GRACE)

    def wait_sinks(self):
        """Wait until every worker of the sink stage is done; their results in order."""
        sink = self.stages[-1]
        mine = [i for i, p in enumerate(self.procs) if p.stage is sink]
        while not all(i in self.done for i in mine):
            self.links.wait()
        results = [self.done[i] for i in mine]
        self.stop(EXIT_GRACE)
        return results

    # -- stopping ------------------------------------------------------------
    def stop(self, grace=STOP_GRACE):
        """Stop every stage process (idempotent): close, wait ``grace`` s, SIGKILL, reap."""
        if self.stopped:
            return
        self.stopped = True
        self.links.close()
        self._kill_and_reap(grace)

    def _kill_and_reap(self, grace):
        deadline = time.monotonic() + grace
        running = [p.pid for p in self.procs]
        try:
            while running and time.monotonic() < deadline:
                running = [pid for pid in running if not _peek(pid)[0]]
                if running:
                    time.sleep(0.002)
        finally:    # a second Ctrl-C while waiting must not leave them running
            for p in self.procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)   # its leftover children too
                except OSError:
                    pass
            for p in self.procs:
                try:
                    os.waitpid(p.pid, 0)
                except ChildProcessError:
                    pass
