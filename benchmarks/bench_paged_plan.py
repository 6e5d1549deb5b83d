"""Per-layer cost of a decode step on tiny shapes (B = 1, one kv head, D = 64, context 16),
where the kernels take microseconds and the Python around them is what shows:

  per-layer calls  cache.append(layer, ...) then cache.attention(q, layer, ...): each call
                   checks its arguments, rebuilds the tables from the host lists and validates
                   them on the device (a host sync)
  plan + run       step = cache.plan(...) once per step, then step.run(layer, q, k, v)
  raw ops          torch.ops.frugal.paged_append + torch.ops.frugal.paged_attention on
                   prepared tensors: the floor

    .venv/bin/python benchmarks/bench_paged_plan.py [--layers 32] [--steps 200]

Prints microseconds per layer (median over steps, each step timing all layers), and the plan's
own cost per step.
"""

import argparse
import statistics
import time

import torch

import frugal

HKV, HQ, D, BS = 1, 4, 64, 16


def _cache(layers):
    cache = frugal.PagedKVCache(layers, 4096, BS, HKV, D, dtype=torch.float32)
    cache.add_sequence(0)
    prompt = cache.plan([0], 16)
    x = torch.randn(16, HKV, D)
    for layer in range(layers):
        prompt.append(layer, x, x)
    return cache


def _median_us(fn, steps, layers):
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) / layers * 1e6)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers = args.layers
    q = torch.randn(1, HQ, D)
    kv = torch.randn(1, HKV, D)

    legacy = _cache(layers)

    def per_layer_calls():
        for layer in range(layers):
            legacy.append(layer, [0], kv[None], kv[None])
            legacy.attention(q, layer, [0])

    planned = _cache(layers)
    plan_us = []

    def plan_and_run():
        start = time.perf_counter()
        step = planned.plan([0], 1)
        plan_us.append((time.perf_counter() - start) * 1e6)
        for layer in range(layers):
            step.run(layer, q, kv, kv)

    raw = _cache(layers)
    step = raw.plan([0], 1)  # tensors prepared once; the raw ops rewrite the same slot
    scale = D**-0.5

    def raw_ops():
        for layer in range(layers):
            torch.ops.frugal.paged_append(kv, kv, raw.k_cache[layer], raw.v_cache[layer],
                                          step.slot_mapping, None, None)
            torch.ops.frugal.paged_attention(q, raw.k_cache[layer], raw.v_cache[layer],
                                             step.block_tables, step.seq_lens, scale, 0, None,
                                             None)

    for fn in (per_layer_calls, plan_and_run, raw_ops):  # warm-up
        fn()
    plan_us.clear()
    rows = [("per-layer calls (append + attention)", _median_us(per_layer_calls, args.steps,
                                                                  layers)),
            ("plan + run (per layer)", _median_us(plan_and_run, args.steps, layers)),
            ("raw ops (paged_append + paged_attention)", _median_us(raw_ops, args.steps,
                                                                     layers))]
    floor = rows[-1][1]
    print(f"decode step, B=1, Hq={HQ}, Hkv={HKV}, D={D}, {layers} layers, CPU, 1 thread")
    print(f"{'':44s} {'us/layer':>9s} {'vs raw':>7s}")
    for name, us in rows:
        print(f"{name:44s} {us:9.1f} {us / floor:6.1f}x")
    print(f"plan() itself: {statistics.median(plan_us):.1f} us per step "
          f"({statistics.median(plan_us) / layers:.1f} us per layer at {layers} layers)")


if __name__ == "__main__":
    main()
