"""Timers (a timer maps a no-argument callable to its median time in milliseconds) and the
device's copy bandwidth, the ceiling a memory-bound kernel is measured against."""

import functools
import glob
import statistics
import time

import torch


@functools.cache
def llc_bytes():
    """The CPU's last-level cache in bytes (Linux sysfs; 32 MiB when it cannot be read)."""
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 << 20


def rotation_bytes():
    """How many bytes of inputs a CPU candidate rotates through so that every call reads them
    from memory: 4x the last-level cache (at least 64 MiB). At 2x, a victim L3 still held part
    of the rotation between calls, and kernels whose loads displace less of it (torch.ao's
    quantize_dynamic) measured up to 2x faster than on cold data."""
    return max(64 << 20, 4 * llc_bytes())


def time_cpu(fn, *, min_time=0.2, min_runs=5, warmup_time=0.05, stat=statistics.median):
    """Median (or ``stat``) wall time of ``fn()`` in milliseconds.

    Parameters
    ----------
    fn : callable with no arguments.
    min_time : float
        Keep timing until the timed runs add up to at least this many seconds ...
    min_runs : int
        ... and at least this many runs were timed.
    warmup_time : float
        Untimed calls first (at least one), until this many seconds have passed: the first
        calls pay for page faults, allocator growth and thread-pool start-up.
    stat : callable
        Reduces the list of run times (seconds); ``min`` for the fastest run (``frugal tune``
        on a CPU: another process taking a core only ever adds time).
    """
    if min_runs < 1:
        raise ValueError(f"time_cpu: min_runs must be >= 1; got {min_runs}")
    deadline = time.perf_counter() + warmup_time
    fn()
    while time.perf_counter() < deadline:
        fn()
    times = []
    while len(times) < min_runs or sum(times) < min_time:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return stat(times) * 1e3


def time_cuda(fn, *, warmup=25, rep=100):
    """Median time of ``fn()`` on the current CUDA stream in milliseconds (CUDA events, via
    ``triton.testing.do_bench``, which also flushes the L2 cache between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def default_timer(device):
    """``time_cuda`` for a CUDA device, ``time_cpu`` otherwise."""
    return time_cuda if torch.device(device).type == "cuda" else time_cpu


def copy_fn(device, *, nbytes=256 << 20):
    """``(fn, counted)``: a callable doing ``dst.copy_(src)`` of ``nbytes`` on ``device`` and the
    bytes it counts (read + written, ``2 * nbytes``): time it, and counted / time is the copy
    bandwidth."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=torch.device(device))
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * nbytes


def copy_bandwidth(device, *, nbytes=256 << 20, timer=None):
    """Memory bandwidth of ``dst.copy_(src)`` on ``device`` in GB/s, counting the bytes read
    and the bytes written.

    Parameters
    ----------
    device : str or torch.device
    nbytes : int
        Size of each buffer; the default (256 MiB) is far larger than any cache.
    timer : callable, optional
        Defaults to :func:`default_timer` for the device.
    """
    device = torch.device(device)
    timer = timer or default_timer(device)
    fn, counted = copy_fn(device, nbytes=nbytes)
    return counted / timer(fn) / 1e6


def read_bandwidth(device, *, nbytes=256 << 20, timer=None):
    """Memory bandwidth of a pure read (``src.sum()`` over ``nbytes`` of float32) on ``device``
    in GB/s: the ceiling of a kernel that only reads, such as decode attention over a KV-cache.
    """
    device = torch.device(device)
    timer = timer or default_timer(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    ms = timer(lambda: src.sum())
    return nbytes / ms / 1e6
