"""Example functions for `fnx map` (see README.md)."""

import time


def square(x):
    """Return x squared."""
    return x * x


def noop(x):
    """Return x unchanged (used by the throughput benchmarks)."""
    return x


def nap(seconds):
    """Sleep, then return the time slept (used by the efficiency benchmark)."""
    time.sleep(seconds)
    return seconds


def echo_bytes(data):
    """Return the bytes it was given (used by the transfer benchmark, pickle encoding)."""
    return data
