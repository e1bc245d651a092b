"""Example functions for `fnx map` (see README.md)."""

import os
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


def timed_nap(seconds):
    """Sleep; return [pid, start, end] (perf_counter) to measure the gap between tasks."""
    start = time.perf_counter()
    time.sleep(seconds)
    return [os.getpid(), start, time.perf_counter()]
