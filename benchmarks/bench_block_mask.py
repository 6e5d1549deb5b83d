"""Build time of block masks (frugal.masks) at long sequence lengths.

    .venv/bin/python benchmarks/bench_block_mask.py [--n 131072] [--reps 5] [--threads T]

For each pattern: the time to build the BlockMask (block classification, shared bitmasks) and to
produce the kernels' layout (``mask.layout(1, 8)``: the full / partial lists, transposed lists,
bits), on a fresh mask each call. "first" is the first call in the process (imports and
allocator warm-up included), "warm" the median of the following ``--reps`` calls. Nothing is
compiled: builders are plain tensor arithmetic on the block grid (tests/test_block_mask.py checks
that no dynamo frame or Triton cache entry appears).
"""

import argparse
import statistics
import time

import torch

from frugal import masks


def patterns(n):
    docs = torch.arange(n) // 3000  # packed documents of 3000 tokens
    return {
        "causal": lambda: masks.causal(n),
        "sliding_window(1024)": lambda: masks.sliding_window(n, 1024),
        "document & causal": lambda: masks.document(docs) & masks.causal(n),
        "bigbird(3, 1, 3)": lambda: masks.bigbird(n, 3, 1, 3, seed=0),
        "bigbird(3, 1, 3, heads=8)": lambda: masks.bigbird(n, 3, 1, 3, seed=0, heads=8),
        "longformer(512, 16 global)": lambda: masks.longformer(n, 512, list(range(0, n, n // 16))),
        "longformer(512, 64 random global)": lambda: masks.longformer(
            n, 512, torch.randint(0, n, (64,), generator=torch.Generator().manual_seed(0))),
        "strided(1024, summary 32)": lambda: masks.strided(n, 1024, summary=32),
        "dilated(512, 2)": lambda: masks.dilated(n, 512, 2),
    }


def timed(fn):
    t0 = time.perf_counter()
    m = fn()
    t1 = time.perf_counter()
    m.layout(1, 8)
    t2 = time.perf_counter()
    return m, t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"N = {args.n}, block 128x128, torch threads = {torch.get_num_threads()}")
    print(f"{'pattern':36s} {'first ms':>9s} {'warm build':>11s} {'warm layout':>12s} "
          f"{'warm total':>11s}  {'full':>7s} {'partial':>7s} {'bits':>5s} {'density':>8s}")
    for name, fn in patterns(args.n).items():
        m, b0, l0 = timed(fn)
        builds, lays = [], []
        for _ in range(args.reps):
            m, b, lay = timed(fn)
            builds.append(b)
            lays.append(lay)
        b, lay = statistics.median(builds), statistics.median(lays)
        full, partial = m.counts()
        bits = m._bits.shape[0] if m.has_bits else 0
        print(f"{name:36s} {1e3 * (b0 + l0):9.1f} {1e3 * b:11.1f} {1e3 * lay:12.1f} "
              f"{1e3 * (b + lay):11.1f}  {full:7d} {partial:7d} {bits:5d} {m.density():8.2%}")


if __name__ == "__main__":
    main()
