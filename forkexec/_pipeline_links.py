"""One pipeline process's channels, and the only place it waits on them.

A :class:`Links` holds the channels of one process: its inputs (from the
workers of the stage before it), its outputs (to the workers of the stage after
it) and its control channel(s) to the parent. Writes are queued and flushed
without blocking; whenever the process has nothing to do (no input item, no
credit to send with) it calls :meth:`Links.wait`, which first ships what is
pending (a partial batch, the credits owed upstream), then waits on every
channel at once. So a stage never blocks on one channel while another needs it,
and a stopped or dead parent is noticed at the next wait.

Flow control: each output channel starts with ``window`` credits (items); the
receiver gives them back as its stage takes the items. Items are batched: a
batch is shipped when it fills the credit of its channel (or ``MAX_BATCH``), when
it has been open ``LINGER`` seconds, when items come slowly, when it holds
``BATCH_BYTES`` of large ``bytes``, or when the process is about to wait. Large
``bytes`` travel out of band (:mod:`forkexec.wire`), without a copy into the pickle.
"""

import collections
import time

from . import _pipeline_records as rec
from .channel import encode_for_send
from .errors import ChannelBroken, ProtocolError
from .exchange import Poller
from .wire import OUT_OF_BAND_MIN, _OutOfBand, encode, loads

#: The most items in one ITEMS frame.
MAX_BATCH = 4096
#: A batch open this long, or an item that came this long after the previous one, is shipped.
LINGER = 0.001
#: A batch holding this many bytes of large ``bytes``/``bytearray`` items is shipped, so that
#: large items stream one by one instead of waiting for each other.
BATCH_BYTES = 1 << 20
_BLOBS = frozenset((bytes, bytearray))

_INPUT, _OUTPUT, _CONTROL = range(3)


class Stopped(BaseException):
    """The parent closed this stage's control channel (it stopped the pipeline or died).

    A BaseException, so a stage function's ``except Exception`` does not swallow it."""


class PeerGone(BaseException):
    """A neighbouring stage process went away without ending its stream: the parent will
    find out why and stop the pipeline. A BaseException for the same reason as Stopped."""


def _encode_batch(batch):
    try:
        return encode((rec.ITEMS, batch))
    except Exception:
        for item in batch:     # name the item that cannot travel
            encode_for_send(item)
        raise


class Links:
    """The channels of one pipeline process (see the module docstring).

    ``in_windows[i]`` is the credit the sender on input ``i`` starts with;
    ``out_window`` the credit of each output. ``on_control(index, record)`` and
    ``on_control_eof(index)`` handle what arrives on the control channels.
    """

    def __init__(self, inputs, in_windows, outputs, out_window, controls,
                 on_control, on_control_eof):
        self._poller = Poller()
        self._events = {}                        # channel -> the events it is registered for
        self.inputs, self.outputs, self.controls = inputs, outputs, controls
        self._on_control, self._on_control_eof = on_control, on_control_eof
        # input side
        self._ready = collections.deque()        # (input index, batch) received, not taken
        self._read_ahead = 2 * max(1, len(inputs))   # batches; beyond, input waits in sockets
        self._reading = True
        self._ended = [False] * len(inputs)
        self.open_inputs = len(inputs)
        self._owed = [0] * len(inputs)           # credits taken but not yet given back
        self._give_at = [max(1, w // 2) for w in in_windows]
        # output side
        self._credit = [out_window] * len(outputs)
        self._writing = set()                    # channels with output not yet written
        self._batch = []
        self._cur = 0                            # the output the open batch goes to
        self._room = min(out_window, MAX_BATCH) if outputs else 0
        self._since = self._last = 0.0
        self._blob_bytes = 0                     # large bytes in the open batch
        self._finishing = False                  # END is queued on every output
        for role, channels in ((_INPUT, inputs), (_OUTPUT, outputs), (_CONTROL, controls)):
            for i, ch in enumerate(channels):
                self._update(ch, role, i)

    # -- input ---------------------------------------------------------------
    def items(self):
        """The items of every input, until all have ended; credits go back as they are taken."""
        ready = self._ready
        while True:
            while not ready:
                if not self.open_inputs:
                    return
                self.wait()
            i, batch = ready.popleft()
            yield from batch
            self._give(i, len(batch))
            if ready:
                self.wait(0)    # a failure or a stop elsewhere is noticed between batches

    def _give(self, i, n):
        owed = self._owed[i] + n
        if owed >= self._give_at[i] and not self._ended[i]:
            self._queue(self.inputs[i], encode((rec.CREDIT, owed)))
            owed = 0
        self._owed[i] = owed

    # -- output --------------------------------------------------------------
    def put(self, item):
        """Send one item downstream (batched; waits while no output has credit)."""
        if type(item) in _BLOBS and len(item) >= OUT_OF_BAND_MIN:
            item = _OutOfBand(item)     # out of band: not copied into the batch's pickle
            self._blob_bytes += len(item.data)
        batch = self._batch
        if not batch:
            # No credit, or the socket is still full: running ahead of it only piles up memory.
            while not self._room or self.outputs[self._cur] in self._writing:
                self.wait()
                self._choose(self._cur)
            batch.append(item)
            now = self._since = time.monotonic()
            slow = now - self._last >= LINGER
        else:
            batch.append(item)
            now = time.monotonic()
            slow = now - self._last >= LINGER or now - self._since >= LINGER
        self._last = now
        if slow or len(batch) >= self._room or self._blob_bytes >= BATCH_BYTES:
            self._ship()

    def _ship(self):
        batch, o = self._batch, self._cur
        self._batch = []
        self._blob_bytes = 0
        self._credit[o] -= len(batch)
        self._queue(self.outputs[o], _encode_batch(batch))
        self._choose(o + 1)

    def _choose(self, start):
        """Point the next batch at the first output from ``start`` (round robin) with credit,
        one whose socket is not full if there is one."""
        n = len(self.outputs)
        chosen = None
        for k in range(n):
            o = (start + k) % n
            if self._credit[o] > 0:
                if self.outputs[o] not in self._writing:
                    chosen = o
                    break
                if chosen is None:
                    chosen = o
        if chosen is None:
            self._room = 0
        else:
            self._cur, self._room = chosen, min(self._credit[chosen], MAX_BATCH)

    def finish(self):
        """Ship the last batch and END on every output, and wait until all is written."""
        if self._batch:
            self._ship()
        end = encode((rec.END,))
        self._finishing = True
        for ch in self.outputs:
            self._queue(ch, end)
        while self._writing:
            self.wait()

    # -- waiting -------------------------------------------------------------
    def _queue(self, ch, buffers):
        ch.queue(buffers)
        if ch not in self._writing and not self._flush(ch):
            self._writing.add(ch)
            if ch in self.inputs:
                self._update(ch, _INPUT, self.inputs.index(ch))
            else:
                self._update(ch, _OUTPUT, self.outputs.index(ch))

    def _update(self, ch, role, i):
        """(Re-)register ``ch`` for what we want from it now."""
        events = Poller.WRITE if ch in self._writing else 0
        if role != _INPUT or (self._reading and not self._ended[i]):
            events |= Poller.READ
        if role == _CONTROL and ch.at_eof:
            events = 0
        old = self._events.get(ch, 0)
        if events == old:
            return
        if not events:
            self._poller.unregister(ch)
            del self._events[ch]
        elif old:
            self._poller.modify(ch, events, (role, i))
        else:
            self._poller.register(ch, events, (role, i))
        if events:
            self._events[ch] = events

    def _flush(self, ch):
        try:
            return ch.flush_nowait()
        except ChannelBroken as exc:
            if ch in self.inputs:
                return True     # credits for a sender that ended and left: its END tells
            raise PeerGone(str(exc)) from exc

    def wait(self, timeout=None):
        """Ship what is pending, then handle whatever arrives (at most ``timeout`` s)."""
        if self._batch:
            self._ship()
        for i, owed in enumerate(self._owed):
            if owed and not self._ended[i]:
                self._owed[i] = 0
                self._queue(self.inputs[i], encode((rec.CREDIT, owed)))
        reading = len(self._ready) < self._read_ahead
        if reading != self._reading:
            self._reading = reading
            for j, ch in enumerate(self.inputs):
                self._update(ch, _INPUT, j)
        for (role, i), events in self._poller.wait(timeout):
            if role == _CONTROL:
                self._read_control(i)
                continue
            ch = self.inputs[i] if role == _INPUT else self.outputs[i]
            if events & Poller.WRITE and self._flush(ch):
                self._writing.discard(ch)
                self._update(ch, role, i)
            if events & Poller.READ:
                self._read(role, i, ch)

    def _read(self, role, i, ch):
        more = ch.read_nowait()
        for frame in ch.pop_frames():
            record = loads(frame)
            kind = record[0]
            if kind == rec.ITEMS and role == _INPUT:
                self._ready.append((i, record[1]))
            elif kind == rec.CREDIT and role == _OUTPUT:
                self._credit[i] += record[1]
                if not self._room:
                    self._choose(i)
            elif kind == rec.END and role == _INPUT:
                self._ended[i] = True
                self.open_inputs -= 1
                self._writing.discard(ch)
                self._update(ch, role, i)
                return
            else:
                raise ProtocolError("unexpected %s on a pipeline data channel"
                                    % rec.describe(record))
        if not more:
            if role == _OUTPUT and self._finishing:
                # A receiver that took our END may leave while we still write to others; one
                # that left without it died, and the parent finds that out.
                self._writing.discard(ch)
                self._poller.unregister(ch)
                self._events.pop(ch, None)
                return
            raise PeerGone("a neighbouring stage process closed its channel")

    def _read_control(self, i):
        ch = self.controls[i]
        more = ch.read_nowait()
        for frame in ch.pop_frames():
            self._on_control(i, loads(frame))
        if not more:
            self._update(ch, _CONTROL, i)
            self._on_control_eof(i)

    def wait_for_control_eof(self):
        """Wait until every control channel has reached EOF (ignoring data channels)."""
        for ch in self.inputs + self.outputs:
            self._poller.unregister(ch)
            self._events.pop(ch, None)
        self._writing.clear()
        while any(not ch.at_eof for ch in self.controls):
            for (_, i), _events in self._poller.wait():
                self._read_control(i)

    def close(self):
        self._poller.close()
        for ch in self.inputs + self.outputs + self.controls:
            ch.close()
