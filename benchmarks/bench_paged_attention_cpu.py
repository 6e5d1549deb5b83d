"""Paged decode attention on the CPU (torch.ops.frugal.paged_attention) against dense baselines.

    .venv/bin/python benchmarks/bench_paged_attention_cpu.py [--quick] [--rounds R]

Baselines, on the same K/V content:
  sdpa        F.scaled_dot_product_attention over a contiguous cache [B, Hkv, L, D] with
              enable_gqa=True, or with K/V repeated to Hq heads (the faster of the two is the
              baseline; both are printed for the main shape)
  gather+sdpa K/V gathered through the block table with index_select, then sdpa

Every method rotates over independent copies of its inputs totalling > 64 MiB, so the 32 MiB
L3 cannot serve repeated calls. Methods are interleaved within each round and repeated over
rounds; the figure is the median over all calls. GB/s for paged_attention counts the K and V
bytes read; %copy compares it with the machine's copy bandwidth (dst.copy_(src) of 256 MiB,
read + write bytes), which for the main shape (B=8, 4k) is one of the interleaved methods, as
is the same batch at 32k context with a 4096-token window (its blocks before the window given
back: -1 in the tables).
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import frugal
from frugal.paged_ops import empty_cache

MiB = 1 << 20
ROTATE_BYTES = 128 * MiB


COPY_BYTES = 256 * MiB


def copy_fn():
    """dst.copy_(src) of COPY_BYTES, as a one-call method for measure()."""
    src = torch.randn(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    return [lambda: dst.copy_(src)]


def copy_bandwidth(reps=15):
    """Read + write GB/s of dst.copy_(src), median of reps."""
    return 2 * COPY_BYTES / measure({"copy": copy_fn()}, 1, reps)["copy"] / 1e9


class Case:
    """Independent copies of one decode problem: paged caches with randomly permuted tables,
    and on request the contiguous caches with the same content."""

    def __init__(self, B, L, Hq, Hkv, D, bs, dtype, window=0, dense=True, seed=0):
        self.B, self.L, self.Hq, self.Hkv, self.D, self.window = B, L, Hq, Hkv, D, window
        self.dtype = dtype
        gen = torch.Generator().manual_seed(seed)
        lo = max(0, L - window) if window > 0 else 0
        first = lo // bs  # blocks before it were given back by the window
        per_seq = -(-L // bs) - first
        self.kv_bytes = 2 * B * (L - lo) * Hkv * D * torch.empty((), dtype=dtype).element_size()
        copies = max(1, math.ceil(ROTATE_BYTES / self.kv_bytes))
        self.paged, self.dense = [], []
        for _ in range(copies):
            nb = B * per_seq
            # Allocated as PagedKVCache allocates its storage (huge pages where the OS allows).
            k = empty_cache((nb, bs, Hkv, D), dtype, "cpu")
            k.copy_(torch.randn(nb, bs, Hkv, D, generator=gen))
            v = empty_cache((nb, bs, Hkv, D), dtype, "cpu")
            v.copy_(torch.randn(nb, bs, Hkv, D, generator=gen))
            tables = torch.full((B, first + per_seq), -1, dtype=torch.int32)
            tables[:, first:] = torch.randperm(nb, generator=gen).reshape(B, per_seq).int()
            q = torch.randn(B, Hq, D, generator=gen).to(dtype)
            lens = torch.full((B,), L, dtype=torch.int32)
            self.paged.append((q, k, v, tables, lens))
            if dense:
                idx = tables.long().clamp(min=0)
                # The contiguous baselines get the same kind of pages.
                kd = empty_cache((B, Hkv, L, D), dtype, "cpu")
                kd.copy_(k[idx].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2))
                vd = empty_cache((B, Hkv, L, D), dtype, "cpu")
                vd.copy_(v[idx].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2))
                self.dense.append((q[:, :, None], kd, vd))
        self.scale = D**-0.5

    def paged_fn(self):
        op = torch.ops.frugal.paged_attention
        return [lambda a=a: op(*a, self.scale, self.window, None, None) for a in self.paged]

    def sdpa_fn(self, repeat):
        g = self.Hq // self.Hkv

        def call(q, k, v):
            if repeat:
                return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=True)

        if repeat:
            def repeated(x):
                out = empty_cache((x.shape[0], x.shape[1] * g, *x.shape[2:]), x.dtype, "cpu")
                return out.copy_(x.repeat_interleave(g, 1))

            dense = [(q, repeated(k), repeated(v)) for q, k, v in self.dense]
        else:
            dense = self.dense
        return [lambda a=a: call(*a) for a in dense]

    def gather_fn(self):
        B, L, Hkv, D = self.B, self.L, self.Hkv, self.D

        def call(q, k_cache, v_cache, tables, lens):
            idx = tables.reshape(-1)
            k = k_cache.index_select(0, idx).reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2)
            v = v_cache.index_select(0, idx).reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2)
            return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=self.scale,
                                                  enable_gqa=True)

        return [lambda a=a: call(*a) for a in self.paged]


def measure(methods, rounds, calls):
    """methods: name -> list of callables (one per input copy). Interleaved rounds; per round
    each method makes `calls` passes over its copies; returns name -> median seconds per call."""
    times = {name: [] for name in methods}
    for fns in methods.values():
        fns[0]()  # warm-up
    for _ in range(rounds):
        for name, fns in methods.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                for f in fns:
                    f()
                times[name].append((time.perf_counter() - t0) / len(fns))
    return {name: statistics.median(t) for name, t in times.items()}


def check(case):
    q, k, v, tables, lens = case.paged[0]
    out = torch.ops.frugal.paged_attention(q, k, v, tables, lens, case.scale, case.window, None,
                                           None)
    want = frugal.reference.paged_attention(q, k, v, tables, lens, case.scale,
                                            case.window or None)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[case.dtype]
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the main shape and the window pair only")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args()
    Hq, Hkv, D, bs = 32, 8, 128, 16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"isa {frugal._C.cpu_isa()}; Hq={Hq} Hkv={Hkv} D={D} block_size={bs}, permuted tables")
    bw = copy_bandwidth()
    print(f"copy bandwidth (256 MiB dst.copy_(src), read+write): {bw:.1f} GB/s\n")

    header = (f"{'B':>3} {'context':>7} {'window':>6} {'dtype':>8} | {'paged ms':>9} {'GB/s':>6} "
              f"{'%copy':>6} | {'sdpa ms':>9} {'x':>5} | {'gather+sdpa ms':>14} {'x':>5}")

    def line(case, t, name="paged", copy_bw=bw):
        gbs = case.kv_bytes / t[name] / 1e9
        out = (f"{case.B:>3} {case.L:>7} {case.window or '-':>6} {str(case.dtype)[6:]:>8} | "
               f"{t[name] * 1e3:9.2f} {gbs:6.1f} {100 * gbs / copy_bw:5.0f}% | ")
        if "gather" in t:
            sdpa = min(t["sdpa_gqa"], t.get("sdpa_repeat", math.inf))
            out += (f"{sdpa * 1e3:9.2f} {sdpa / t[name]:5.2f} | {t['gather'] * 1e3:14.2f} "
                    f"{t['gather'] / t[name]:5.2f}")
        return out

    def methods(case):
        m = {"paged": case.paged_fn()}
        if case.dense:
            m["sdpa_gqa"] = case.sdpa_fn(repeat=False)
            m["gather"] = case.gather_fn()
        return m

    # The main shape, the same batch at 32k with a 4096 window, and the copy, interleaved.
    main_case = Case(8, 4096, Hq, Hkv, D, bs, torch.float32)
    window_case = Case(8, 32768, Hq, Hkv, D, bs, torch.float32, window=4096, dense=False)
    for case in (main_case, window_case):
        check(case)
    t = measure(dict(methods(main_case), sdpa_repeat=main_case.sdpa_fn(repeat=True),
                     window=window_case.paged_fn(), copy=copy_fn()),
                args.rounds, args.calls)
    copy_bw = 2 * COPY_BYTES / t["copy"] / 1e9
    print(f"main shape, interleaved with the 32k/window run and the copy "
          f"(copy {copy_bw:.1f} GB/s in this measurement):")
    print(header)
    print("-" * len(header))
    print(line(main_case, t, copy_bw=copy_bw))
    print(line(window_case, {"paged": t["window"]}, copy_bw=copy_bw))
    print(f"sdpa: enable_gqa {t['sdpa_gqa'] * 1e3:.2f} ms, K/V repeated to Hq heads "
          f"{t['sdpa_repeat'] * 1e3:.2f} ms (the faster is the baseline)")
    print(f"window 4096: decode at 32k / decode at 4k (B=8) = {t['window'] / t['paged']:.2f}\n")
    del main_case, window_case
    if args.quick:
        return

    print("sweep (each row interleaves its own methods; %copy against the copy bandwidth above):")
    print(header)
    print("-" * len(header))
    rows = [(B, L, 0, torch.float32, True) for B, Ls in ((1, (512, 2048, 8192, 32768)),
                                                           (8, (512, 2048, 8192, 32768)),
                                                           (32, (512, 2048, 8192)))
            for L in Ls]
    rows += [(B, 32768, 4096, torch.float32, False) for B in (1, 32)]
    rows += [(8, 4096, 0, dtype, True) for dtype in (torch.float16, torch.bfloat16)]
    for B, L, window, dtype, dense in rows:
        case = Case(B, L, Hq, Hkv, D, bs, dtype, window, dense=dense)
        check(case)
        print(line(case, measure(methods(case), args.rounds, args.calls)), flush=True)


if __name__ == "__main__":
    main()
