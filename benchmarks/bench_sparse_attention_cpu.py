"""The C++ CPU block-sparse attention forward (torch.ops.frugal.sparse_attention_fwd) against torch
SDPA causal on the same q, k, v: B=1, H=8, D=64, fp32 (issue 4's CPU targets).

    .venv/bin/python benchmarks/bench_sparse_attention_cpu.py [--n 4096 16384] [--reps 5] [--mods]

Runs are interleaved (SDPA, causal block mask, sliding window, ... in turn, `reps` rounds) and
each reports its best time, so a load that comes and goes hits every candidate alike. GFLOP/s
counts 4 * BQ * BK * D per computed block (the work the kernel does, padding included), and for
SDPA the 2 * N^2 * D of the causal half. Targets: sliding window w=512 at N=16k >= 10x faster than
SDPA causal; causal as a block mask within 1.3x of SDPA causal (ratio SDPA / ours >= 0.77).
``--mods`` adds each mask with softcap 30 and ALiBi (frugal.score_mods): the modifiers' cost."""

import argparse
import time

import torch

from frugal import masks
from frugal.score_mods import alibi_slopes_like_bloom


def best_times(fns, reps):
    for f in fns.values():
        f()
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--block", type=int, nargs="+", default=[128],
                    help="block sizes (BQ = BK) of the masks")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mods", action="store_true",
                    help="also time each mask with softcap=30 and ALiBi slopes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    H, D = args.heads, args.dim
    print(f"B=1 H={H} D={D} fp32, threads={torch.get_num_threads()}, best of {args.reps}")
    print(f"{'N':>6} {'case':<22} {'ms':>9} {'GFLOP/s':>8} {'SDPA causal / this':>19}")
    for n in args.n:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, H, n, D, generator=gen) for _ in range(3))
        fns = {"sdpa causal": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True)}
        flops = {"sdpa causal": 2.0 * n * n * D * H}
        for bs in args.block:
            for name, mask in ((f"causal mask {bs}", masks.causal(n, block_size=bs)),
                               (f"window {args.window} {bs}",
                                masks.sliding_window(n, args.window, block_size=bs))):
                lay = mask.layout(1, H)
                fargs = (*lay.op_args(), D**-0.5)
                variants = {name: fargs}
                if args.mods:
                    slopes = alibi_slopes_like_bloom(H)[None].contiguous()
                    variants[name + " mods"] = (*fargs, 30.0, slopes)
                blocks = int(lay.full_num.sum() + lay.kv_num.sum())
                for label, a in variants.items():
                    fns[label] = (lambda a: lambda: torch.ops.frugal.sparse_attention_fwd(
                        q, k, v, *a))(a)
                    flops[label] = 4.0 * blocks * bs * bs * D
        best = best_times(fns, args.reps)
        for name, t in best.items():
            print(f"{n:>6} {name:<22} {t * 1e3:>9.1f} {flops[name] / t / 1e9:>8.1f} "
                  f"{best['sdpa causal'] / t:>18.2f}x")


if __name__ == "__main__":
    main()
