"""Progress bars for ``map(..., progress=True)`` and :func:`as_completed`.

With tqdm installed the bar is tqdm's; without it, a plain one-line bar is
redrawn on stderr (``\\r``), at most ten times a second, and ended with a
newline. Nothing is printed unless asked:

* ``progress=None`` or ``False``: no bar (the default);
* ``progress=True``: a bar on stderr only when stderr is a terminal, so logs
  and pipes stay clean;
* ``progress="always"``: a bar on stderr even when it is not a terminal;
* ``progress=<file object>``: a bar written to that file, always.

Bars count items (a map chunk of 64 items moves the bar by 64).
"""

import concurrent.futures
import sys
import time

#: The plain bar is redrawn at most this often (seconds).
REDRAW_EVERY = 0.1
WIDTH = 30


def progress_file(progress):
    """Where to draw the bar for a ``progress=`` value, or None for no bar."""
    if progress is None or progress is False:
        return None
    if progress is True:
        stream = sys.stderr
        try:
            return stream if stream is not None and stream.isatty() else None
        except (AttributeError, ValueError):   # no isatty, or closed
            return None
    if isinstance(progress, str):
        if progress == "always":
            return sys.stderr
        raise ValueError("progress must be True, False, None, 'always' or a file object, "
                         "not %r" % (progress,))
    if callable(getattr(progress, "write", None)):
        return progress
    raise TypeError("progress must be True, False, None, 'always' or a file object, not %r"
                    % (progress,))


class PlainBar:
    """A one-line text bar: ``desc: |#####-----| 50/100 50% 1.2s``."""

    def __init__(self, total, desc, file, clock=time.monotonic):
        self.total = total
        self.desc = desc
        self.file = file
        self.clock = clock
        self.count = 0
        self.start = clock()
        self.drawn = None   # when it was last drawn
        self.closed = False
        self._draw()

    def update(self, n=1):
        self.count += n
        now = self.clock()
        if now - self.drawn >= REDRAW_EVERY or self.count == self.total:
            self._draw(now)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self._draw()
        self._write("\n")

    def line(self, now=None):
        elapsed = (self.clock() if now is None else now) - self.start
        prefix = "%s: " % self.desc if self.desc else ""
        if self.total:
            done = min(self.count, self.total)
            filled = WIDTH * done // self.total
            return "%s|%s%s| %d/%d %3d%% %.1fs" % (
                prefix, "#" * filled, "-" * (WIDTH - filled), self.count, self.total,
                100 * done // self.total, elapsed)
        return "%s%d items %.1fs" % (prefix, self.count, elapsed)

    def _draw(self, now=None):
        self.drawn = self.clock() if now is None else now
        self._write("\r" + self.line(now))

    def _write(self, text):
        try:
            self.file.write(text)
            self.file.flush()
        except (OSError, ValueError):   # closed or broken stream: no bar, no failure
            pass


def make_bar(total, desc, file):
    """A tqdm bar when tqdm can be imported, else a :class:`PlainBar`."""
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainBar(total, desc, file)
    return tqdm(total=total, desc=desc, file=file, disable=False, unit="item")


def track(iterable, total=None, progress=True, desc=None):
    """An iterator over ``iterable`` that moves a bar one step per item (``progress`` as
    described above; a bad value is an error now, not at the first item). ``total``
    defaults to ``len(iterable)`` when it has one. Closing it closes ``iterable`` too."""
    file = progress_file(progress)
    if file is None:
        return iter(iterable)
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    return _tracked(iterable, make_bar(total, desc, file))


def _tracked(iterable, bar):
    try:
        for item in iterable:
            bar.update(1)
            yield item
    finally:
        bar.close()
        close = getattr(iterable, "close", None)
        if close is not None:
            close()


def as_completed(fs, timeout=None, *, progress=True, desc=None):
    """``concurrent.futures.as_completed`` with a bar counting finished futures."""
    fs = set(fs)
    return track(concurrent.futures.as_completed(fs, timeout), total=len(fs),
                 progress=progress, desc=desc)
