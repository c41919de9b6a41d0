"""Fault injection: crashed workers, killed parents, exhausted resources, hostile bytes.

The soak runner (``python -m tests.faults.soak``) is not part of the normal
test command.
"""
