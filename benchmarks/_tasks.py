"""The task functions every executor runs.

They live in their own small module so spawn and forkserver workers can import
them by name (a function defined in ``__main__`` would drag the whole harness in).
"""


def noop(x):
    """A tiny task: all of its cost is the executor's."""
    return x


def echo(data):
    """Bytes in, bytes out: all of its cost is moving the payload."""
    return data


def spin(loops):
    """A pure Python CPU-bound loop (holds the GIL, releases nothing)."""
    total = 0
    for i in range(loops):
        total += i
    return total
