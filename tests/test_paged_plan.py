"""PagedKVCache.plan / StepPlan: a step planned once and run per layer gives what the per-layer
manager calls and the float64 reference give, on every backend; the per-layer call reads no
device memory on the host (it runs under FakeTensorMode and compiles with fullgraph=True), and
a stale or malformed call fails clearly without changing the cache."""

import pytest
import torch
from conftest import backends_for
from paged_cases import INT8_ATOL, TOL, assert_unchanged, dense_attention, snapshot

import frugal
from frugal import CacheFullError, PagedKVCache, SequenceError
from frugal.errors import DeviceError, DTypeError, ShapeError

BACKENDS = backends_for("cpu")


def _history(cache, layer, seq_id):
    """(keys, values) of a sequence in ``layer`` as float [L, Hkv, D], read through its table."""
    table = cache.block_tables([seq_id])[0].tolist()
    length = int(cache.seq_lens([seq_id], layer)[0])
    out = []
    for data, scale in ((cache.k_cache, cache.k_scale), (cache.v_cache, cache.v_scale)):
        rows = []
        for p in range(length):
            block, off = table[p // cache.block_size], p % cache.block_size
            row = data[layer, block, off].float()
            if scale is not None:
                row = row * scale[layer, block, off][:, None]
            rows.append(row)
        out.append(torch.stack(rows))
    return out


def _run_steps(cache, seq_ids, steps, hq, gen, backend, window=None):
    """Runs ``steps`` (a list of token counts per sequence) through plans; returns per step and
    layer the outputs and the float64 expectation over what the cache holds."""
    results = []
    for counts in steps:
        plan = cache.plan(seq_ids, counts, window=window, backend=backend)
        n = sum(counts)
        for layer in range(cache.num_layers):
            q = torch.randn(n, hq, cache.head_dim, generator=gen).to(cache.dtype if
                                                                    cache.dtype != torch.int8
                                                                    else torch.float32)
            k = torch.randn(n, cache.num_kv_heads, cache.head_dim, generator=gen).to(q.dtype)
            v = torch.randn(n, cache.num_kv_heads, cache.head_dim, generator=gen).to(q.dtype)
            out = plan.run(layer, q, k, v)
            want, row = [], 0
            for seq_id, t in zip(seq_ids, counts):
                keys, values = _history(cache, layer, seq_id)
                want.append(dense_attention(q[row:row + t].float(), keys, values, None,
                                            window))
                row += t
            results.append((out, torch.cat(want)))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8], ids=str)
def test_plan_prefill_then_decode_matches_reference(poison, backend, dtype):
    gen = torch.Generator().manual_seed(3)
    cache = PagedKVCache(3, 40, 4, 2, 32, dtype=dtype)
    for s in "abc":
        cache.add_sequence(s)
    steps = [[5, 1, 9], [1, 1, 1], [3, 2, 1], [1, 1, 1]]  # prefill, decode, chunk, decode
    for out, want in _run_steps(cache, list("abc"), steps, 8, gen, backend):
        assert out.dtype == (torch.float32 if dtype == torch.int8 else dtype)
        if dtype == torch.int8:
            # The history read back is the dequantized cache: the kernels see the same values.
            torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4)
        else:
            torch.testing.assert_close(out.double(), want, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_agrees_with_the_per_layer_calls(poison, backend):
    gen = torch.Generator().manual_seed(4)
    caches = [PagedKVCache(2, 32, 4, 2, 16, dtype=torch.float32) for _ in range(2)]
    for cache in caches:
        cache.add_sequence(0)
        cache.add_sequence(1)
    for counts in ([6, 2], [1, 1], [1, 1]):
        plan = caches[0].plan([0, 1], counts, backend=backend)
        for layer in range(2):
            q = torch.randn(sum(counts), 4, 16, generator=gen)
            kv = torch.randn(sum(counts), 2, 16, generator=gen)
            got = plan.run(layer, q, kv, kv)
            caches[1].append(layer, [0, 1], kv, kv, num_tokens=counts, backend=backend)
            if max(counts) == 1:
                want = caches[1].attention(q, layer, [0, 1], backend=backend)
            else:
                want = caches[1].prefill_attention(q, layer, [0, 1], q_lens=counts,
                                                   backend=backend)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert caches[0].block_tables([0, 1]).tolist() == caches[1].block_tables([0, 1]).tolist()


def test_plan_fork_copy_on_write_window_and_int8_scales(poison):
    gen = torch.Generator().manual_seed(5)
    cache = PagedKVCache(2, 24, 4, 1, 16, dtype=torch.int8, window=6)
    cache.add_sequence("p")
    _run_steps(cache, ["p"], [[7]], 2, gen, "auto", window=6)
    cache.fork("p", "c")
    shared = cache.block_tables(["p"])[0, 1].item()
    results = _run_steps(cache, ["p", "c"], [[1, 1], [2, 1], [1, 1], [1, 1]], 2, gen, "auto",
                         window=6)
    for out, want in results:
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4)
    tables = cache.block_tables(["p", "c"])
    assert tables[0, 1].item() != tables[1, 1].item()  # the partial block was copied on write
    assert shared in tables[:, 1].tolist()
    assert (tables[:, 0] == -1).all()  # the window gave the first block back


def test_plan_matches_int8_tolerance_against_unquantized_values(poison):
    gen = torch.Generator().manual_seed(6)
    cache = PagedKVCache(1, 16, 8, 2, 64, dtype=torch.int8)
    cache.add_sequence(0)
    q = torch.randn(20, 4, 64, generator=gen)
    k = torch.randn(20, 2, 64, generator=gen)
    v = torch.randn(20, 2, 64, generator=gen)
    out = cache.plan([0], 20).run(0, q, k, v)
    torch.testing.assert_close(out.double(), dense_attention(q, k, v), rtol=0, atol=INT8_ATOL)


def test_stale_plan_and_bad_calls_raise_and_change_nothing():
    cache = PagedKVCache(2, 8, 4, 2, 16, dtype=torch.float32)
    cache.add_sequence("a")
    plan = cache.plan(["a"], 3)
    q, kv = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    snap = snapshot(cache)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\); got 2"):
        plan.run(2, q, kv, kv)
    with pytest.raises(ShapeError, match=r"k must be \[3, 2, 16\]"):
        plan.append(0, kv[:2], kv[:2])
    with pytest.raises(ShapeError, match="multiple of the cache's num_kv_heads 2"):
        plan.attention(torch.randn(3, 3, 16), 0)
    with pytest.raises(DTypeError, match="k must be float32"):
        plan.append(0, kv.half(), kv.half())
    with pytest.raises(DeviceError, match="cache's device"):
        plan.append(0, kv.to("meta"), kv.to("meta"))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        plan.attention(q, 0, scale=float("nan"))
    assert_unchanged(cache, snap)
    cache.append(0, ["a"], kv[:1], kv[:1])  # its sequence changes: the plan is stale
    with pytest.raises(SequenceError, match="the plan is stale"):
        plan.run(1, q, kv, kv)
    with pytest.raises(SequenceError, match="different lengths per layer"):
        cache.plan(["a"])


def test_plan_errors_change_nothing():
    cache = PagedKVCache(1, 3, 4, 1, 16, dtype=torch.float32)
    cache.add_sequence("a")
    cache.add_sequence("b")
    cache.plan(["a", "b"], [4, 4])
    snap = snapshot(cache)
    with pytest.raises(CacheFullError, match="needs 2 free blocks"):
        cache.plan(["a", "b"], [1, 1])
    with pytest.raises(ShapeError, match="at least one token"):
        cache.plan(["a", "b"], [1, 0])
    with pytest.raises(TypeError, match="num_tokens must be an int or a list of ints"):
        cache.plan(["a"], 1.0)
    with pytest.raises(SequenceError, match="not in the cache"):
        cache.plan(["a", "zz"])
    with pytest.raises(SequenceError, match="at least one sequence"):
        cache.plan([])
    with pytest.raises(SequenceError, match="differ from its recorded ids"):
        cache.add_sequence("c", token_ids=[1, 2, 3])
        snap = snapshot(cache)
        cache.plan(["c"], 2, token_ids=[9, 9])
    assert_unchanged(cache, snap)


def test_per_layer_call_needs_no_device_memory_on_the_host():
    """Under FakeTensorMode every tensor op is shape propagation: a host read of a device value
    (a sync) would raise. The plan is built outside, as serving code does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cache = PagedKVCache(2, 16, 4, 2, 32, dtype=torch.float16)
    cache.add_sequence(0)
    cache.add_sequence(1)
    for counts in ([5, 3], [1, 1]):
        plan = cache.plan([0, 1], counts)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            n = sum(counts)
            q = torch.empty(n, 4, 32, dtype=torch.float16)
            kv = torch.empty(n, 2, 32, dtype=torch.float16)
            for layer in range(2):
                out = plan.run(layer, q, kv, kv)
                assert out.shape == (n, 4, 32) and mode.is_our_fake(out)


@pytest.mark.slow
def test_per_layer_call_compiles_without_graph_breaks():
    torch._dynamo.reset()
    cache = PagedKVCache(2, 16, 4, 2, 32, dtype=torch.float32)
    cache.add_sequence(0)
    gen = torch.Generator().manual_seed(8)
    plan = cache.plan([0], 6)
    q = torch.randn(6, 4, 32, generator=gen)
    kv = torch.randn(6, 2, 32, generator=gen)
    compiled = torch.compile(lambda layer, q, k, v: plan.run(layer, q, k, v), fullgraph=True)
    got = compiled(0, q, kv, kv)
    torch.testing.assert_close(got.double(), dense_attention(q, kv, kv), rtol=1e-5, atol=1e-5)
    decode = cache.plan([0])
    compiled = torch.compile(lambda q, k, v: decode.run(1, q, k, v), fullgraph=True)
    assert compiled(q[:1], kv[:1], kv[:1]).shape == (1, 4, 32)


def test_threads_share_a_cache():
    """Each method is atomic under the cache's lock: two threads serving their own sequences
    (plans, per-layer runs, reads) on one cache lose nothing and break no invariant; a plan of
    one thread stays valid while the other changes its own sequences."""
    import threading

    from paged_cases import check_invariants

    cache = PagedKVCache(2, 64, 4, 1, 16, dtype=torch.float32)
    failures = []

    def worker(name):
        try:
            cache.add_sequence(name)
            for _ in range(20):
                plan = cache.plan([name], 2)
                x = torch.randn(2, 1, 16)
                for layer in range(2):
                    plan.run(layer, x, x, x)
                cache.attention(x[:1], 0, [name])
                cache.block_tables([name])
                cache.usage()
        except Exception as exc:  # collected: the assertion below names it
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert cache.seq_lens([0]).tolist() == cache.seq_lens([1]).tolist() == [40]
    check_invariants(cache)
    with pytest.raises(frugal.BackendError, match="backend must be one of"):
        cache.plan([0], 1, backend="flash")


def test_a_plan_goes_stale_only_when_its_sequences_change():
    cache = PagedKVCache(1, 16, 4, 1, 16, dtype=torch.float32)
    for s in "abc":
        cache.add_sequence(s)
    x = torch.randn(1, 1, 16)
    plan = cache.plan(["a"], 1)
    cache.plan(["b"], 1).run(0, x, x, x)
    cache.free("c")
    cache.add_sequence("d")
    plan.run(0, x, x, x)  # still valid
    for change in (lambda: cache.fork("a", "e"), lambda: cache.trim("a", 1),
                   lambda: cache.free("a")):
        plan = cache.plan(["a"], 1)
        change()
        with pytest.raises(SequenceError, match="the plan is stale"):
            plan.run(0, x, x, x)


def test_a_plan_never_reads_a_trimmed_block():
    """Found by the cache fuzzer: a sequence trimmed to a window, then planned with a wider
    one, made the kernels read a -1 table entry (unchecked on a GPU). Now refused up front."""
    from frugal import BlockTableError

    cache = PagedKVCache(1, 8, 2, 1, 16, dtype=torch.float32)
    cache.add_sequence(0)
    x = torch.randn(6, 1, 16)
    cache.plan([0], 6).append(0, x, x)
    assert cache.trim(0, 2) == 2  # blocks 0 and 1 (positions 0..3) given back
    snap = snapshot(cache)
    with pytest.raises(BlockTableError, match=r"plan: sequence 0 gave back block 0 .* window "
                                              r"None; plan with a window of at most 3"):
        cache.plan([0], 1)
    assert_unchanged(cache, snap)
    out = cache.plan([0], 1, window=3).run(0, x[:1], x[:1], x[:1])  # reads positions 4..6
    hist = torch.cat([x[4:], x[:1]])
    torch.testing.assert_close(out.double(), dense_attention(x[:1], hist, hist), rtol=1e-5,
                               atol=1e-5)
