"""Chunked-prefill attention on the CPU (torch.ops.frugal.paged_prefill_attention) against the
PyTorch reference and SDPA.

    .venv/bin/python benchmarks/bench_paged_prefill_cpu.py [--rounds R] [--calls C] [--sweep]

Main shape: B=4 sequences, each a cached prefix of 2048 tokens plus a chunk of 256 new tokens
(already appended), Hq=32, Hkv=8, D=128, block_size 16, permuted tables, fp32. Methods, on the
same K/V content:
  paged        the C++ kernel through the block tables
  reference    frugal.reference.paged_prefill_attention (the ``torch`` backend)
  sdpa         F.scaled_dot_product_attention over K/V already gathered into a contiguous
               [B, Hkv, L, D] cache, enable_gqa=True, with the bottom-right causal mask of the
               chunk (``causal_lower_right``); the faster of that and a dense bool mask is the
               baseline, both printed
  gather+sdpa  K/V gathered through the block table (index_select) on every call, then sdpa
Methods are interleaved within each round (``measure`` of bench_paged_attention_cpu.py); the
figure is the median over all calls. GFLOP/s counts 4 * D flops per (query head, visible key)
pair: the causal work, not the padded tiles.
"""

import argparse

import torch
import torch.nn.functional as F
from bench_paged_attention_cpu import measure
from torch.nn.attention.bias import causal_lower_right

import frugal


class Case:
    """One chunked-prefill problem: paged caches with permuted tables, packed q, and the same
    K/V gathered into a contiguous cache."""

    def __init__(self, B, prefix, T, Hq, Hkv, D, bs, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.B, self.T, self.Hq, self.Hkv, self.D, self.dtype = B, T, Hq, Hkv, D, dtype
        self.L = L = prefix + T
        per_seq = -(-L // bs)
        nb = B * per_seq
        self.k = torch.randn(nb, bs, Hkv, D, generator=gen).to(dtype)
        self.v = torch.randn(nb, bs, Hkv, D, generator=gen).to(dtype)
        self.tables = torch.randperm(nb, generator=gen).reshape(B, per_seq).int()
        self.lens = torch.full((B,), L, dtype=torch.int32)
        self.q_lens = torch.full((B,), T, dtype=torch.int32)
        self.cu = torch.arange(B + 1, dtype=torch.int32) * T
        self.q = torch.randn(B * T, Hq, D, generator=gen).to(dtype)
        idx = self.tables.long()
        self.kd = self.k[idx].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous()
        self.vd = self.v[idx].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous()
        self.qd = self.q.reshape(B, T, Hq, D).transpose(1, 2).contiguous()
        self.bool_mask = torch.ones(T, L, dtype=torch.bool).tril(L - T)
        self.scale = D**-0.5
        self.flops = 4 * D * B * Hq * sum(prefix + t + 1 for t in range(T))

    def paged(self):
        return torch.ops.frugal.paged_prefill_attention(self.q, self.k, self.v, self.tables,
                                                        self.lens, self.cu, self.scale, 0, None,
                                                        None)

    def reference(self):
        return frugal.reference.paged_prefill_attention(self.q, self.k, self.v, self.tables,
                                                        self.lens, self.q_lens, self.scale)

    def sdpa(self, mask):
        return F.scaled_dot_product_attention(self.qd, self.kd, self.vd, attn_mask=mask,
                                              scale=self.scale, enable_gqa=True)

    def gather_sdpa(self):
        B, L, Hkv, D = self.B, self.L, self.Hkv, self.D
        idx = self.tables.reshape(-1)
        k = self.k.index_select(0, idx).reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2)
        v = self.v.index_select(0, idx).reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2)
        return F.scaled_dot_product_attention(self.qd, k, v, scale=self.scale, enable_gqa=True,
                                              attn_mask=causal_lower_right(self.T, L))

    def check(self):
        out = self.paged()
        want = self.reference()
        tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[self.dtype]
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
        dense = self.sdpa(causal_lower_right(self.T, self.L))
        torch.testing.assert_close(out, dense.transpose(1, 2).reshape(out.shape), rtol=tol,
                                   atol=tol)


def run(case, rounds, calls, baselines=True):
    methods = {"paged": [case.paged]}
    if baselines:
        methods.update(reference=[case.reference],
                       sdpa_lower_right=[lambda: case.sdpa(causal_lower_right(case.T, case.L))],
                       sdpa_bool=[lambda: case.sdpa(case.bool_mask)],
                       gather=[case.gather_sdpa])
    return measure(methods, rounds, calls)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--sweep", action="store_true", help="also other chunk sizes and dtypes")
    args = p.parse_args()
    Hq, Hkv, D, bs = 32, 8, 128, 16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"isa {frugal._C.cpu_isa()}; Hq={Hq} Hkv={Hkv} D={D} block_size={bs}, permuted tables")
    header = (f"{'B':>2} {'prefix':>6} {'chunk':>5} {'dtype':>8} | {'paged ms':>9} {'GFLOP/s':>7} "
              f"| {'ref ms':>8} {'x':>5} | {'sdpa ms':>8} {'x':>5} | {'gather+sdpa ms':>14} "
              f"{'x':>5}")
    print(header)
    print("-" * len(header))
    shapes = [(4, 2048, 256, torch.float32)]
    if args.sweep:
        shapes += [(4, 2048, 64, torch.float32), (4, 2048, 1024, torch.float32),
                   (16, 512, 16, torch.float32), (4, 2048, 256, torch.float16),
                   (4, 2048, 256, torch.bfloat16)]
    for B, prefix, T, dtype in shapes:
        case = Case(B, prefix, T, Hq, Hkv, D, bs, dtype)
        case.check()
        t = run(case, args.rounds, args.calls)
        sdpa = min(t["sdpa_lower_right"], t["sdpa_bool"])
        print(f"{B:>2} {prefix:>6} {T:>5} {str(dtype)[6:]:>8} | {t['paged'] * 1e3:9.2f} "
              f"{case.flops / t['paged'] / 1e9:7.1f} | {t['reference'] * 1e3:8.2f} "
              f"{t['reference'] / t['paged']:5.2f} | {sdpa * 1e3:8.2f} {sdpa / t['paged']:5.2f} "
              f"| {t['gather'] * 1e3:14.2f} {t['gather'] / t['paged']:5.2f}", flush=True)
        print(f"   sdpa: causal_lower_right {t['sdpa_lower_right'] * 1e3:.2f} ms, bool mask "
              f"{t['sdpa_bool'] * 1e3:.2f} ms (the faster is the baseline)")


if __name__ == "__main__":
    main()
