"""The records of a pipeline's processes: one module, a table of kinds.

Every record is a tuple whose first field is its kind; it travels as one frame
(:mod:`forkexec.wire`). Between two stage processes (or the last stage and the
parent), on one duplex channel::

    sender -> receiver   ITEMS(batch)     a list of items, at most the receiver's credit
    sender -> receiver   END()            this sender will send nothing more
    receiver -> sender   CREDIT(n)        the receiver took n more items: send n more

In ordered mode every unit of a batch is a ``(seq, [values])`` group: ``seq`` is
the producer's count, and the values are what the stages made of that item (an
empty list when a filter dropped it), so the receiver can put groups in order.

Between a stage process and the parent, on the stage's control channel::

    stage -> parent      DONE(result)     the stage function returned ``result``
    stage -> parent      FAILED(failure)  a :class:`forkexec.errors.RemoteFailure`
    stage -> parent      RELEASED(seq)    ordered mode: the consumer has taken every group
                                          before ``seq`` (forwarded to the producer)
    parent -> producer   RELEASED(seq)    the producer may run ``window`` groups past seq

End of file on a control channel means the other side is gone: for the parent,
a stage process that died (unless it said DONE); for a stage, a parent that
stopped the pipeline or died, so the stage stops.
"""

ITEMS, END, CREDIT, DONE, FAILED, RELEASED = range(6)

NAMES = {ITEMS: "ITEMS", END: "END", CREDIT: "CREDIT", DONE: "DONE", FAILED: "FAILED",
         RELEASED: "RELEASED"}


def describe(record):
    """A short text for a record, for error messages: ``<ITEMS 12 items>``."""
    kind = record[0] if isinstance(record, tuple) and record else None
    name = NAMES.get(kind)
    if name is None:
        return "<unknown pipeline record %.60r - wire protocol corruption?>" % (record,)
    if kind == ITEMS:
        return "<ITEMS %d items>" % len(record[1])
    return "<%s%s>" % (name, "".join(" %.40r" % (f,) for f in record[1:]))
