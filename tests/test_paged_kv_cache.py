"""Paged KV cache: the ops against a float64 dense computation on permuted, NaN-poisoned caches,
and the manager's invariants under long random operation sequences (hypothesis)."""


import pytest
import torch
from frugal import reference
from frugal.errors import DTypeError, ShapeError
from frugal.paged_kv_cache import CacheFullError, PagedKVCache, SequenceError, kv_footprint
from frugal.paged_ops import (
    BlockTableError,
    paged_append,
    paged_attention,
    paged_prefill_attention,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from paged_cases import (
    INT8_ATOL,
    MIXED_LENS,
    TOL,
    assert_close,
    assert_unchanged,
    build_paged,
    check_invariants,
    dense_attention,
    expected_decode,
    fill_nan,
    gather,
    random_kv,
    rounded,
    snapshot,
)

# ---------------------------------------------------------------------------------------------
# paged_attention




@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_matches_dense(device, poison, dtype, group, head_dim):
    gen = torch.Generator().manual_seed(group * 1000 + head_dim)
    hkv = 2
    ks, vs = random_kv(MIXED_LENS, hkv, head_dim, gen)
    k_cache, v_cache, _, _, tables, lens = build_paged(ks, vs, 16, dtype, device, gen,
                                                       pad="poison")
    q = torch.randn(len(MIXED_LENS), hkv * group, head_dim, generator=gen).to(dtype)
    out = paged_attention(q.to(device), k_cache, v_cache, tables, lens)
    assert out.dtype == dtype and out.shape == q.shape
    want = expected_decode(q, rounded(ks, dtype), rounded(vs, dtype))
    torch.testing.assert_close(out.cpu().double(), want, **TOL[dtype])


@pytest.mark.parametrize("block_size", [1, 2, 8, 64, 256])
def test_decode_block_sizes(device, block_size):
    gen = torch.Generator().manual_seed(block_size)
    lens = [1, block_size, 2 * block_size, 3 * block_size + 1, 300]
    ks, vs = random_kv(lens, 1, 64, gen)
    k_cache, v_cache, _, _, tables, seq_lens = build_paged(ks, vs, block_size, torch.float32,
                                                           device, gen)
    q = torch.randn(len(lens), 4, 64, generator=gen)
    out = paged_attention(q.to(device), k_cache, v_cache, tables, seq_lens, backend="torch")
    torch.testing.assert_close(out.cpu().double(), expected_decode(q, ks, vs), **TOL[torch.float32])


def test_decode_bfloat16_and_scale(device):
    gen = torch.Generator().manual_seed(5)
    ks, vs = random_kv([7, 33], 2, 64, gen)
    k_cache, v_cache, _, _, tables, lens = build_paged(ks, vs, 16, torch.bfloat16, device, gen)
    q = torch.randn(2, 4, 64, generator=gen).bfloat16()
    out = paged_attention(q.to(device), k_cache, v_cache, tables, lens, scale=0.3)
    want = expected_decode(q, rounded(ks, torch.bfloat16), rounded(vs, torch.bfloat16), scale=0.3)
    torch.testing.assert_close(out.cpu().double(), want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_int8_kv(device, poison, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    ks, vs = random_kv(MIXED_LENS, 2, head_dim, gen)
    k_cache, v_cache, k_scale, v_scale, tables, lens = build_paged(ks, vs, 16, torch.int8, device,
                                                                   gen, pad="poison")
    for qdtype in (torch.float32, torch.float16):
        q = torch.randn(len(MIXED_LENS), 8, head_dim, generator=gen).to(qdtype)
        out = paged_attention(q.to(device), k_cache, v_cache, tables, lens, k_scale=k_scale,
                              v_scale=v_scale)
        assert out.dtype == qdtype
        # Exactly the attention over the dequantized cache...
        deq = [[reference.dequantize(*reference.quantize_per_token(x)) for x in xs]
               for xs in (ks, vs)]
        torch.testing.assert_close(out.cpu().double(), expected_decode(q, *deq), **TOL[qdtype])
        # ...and within the stated tolerance of the unquantized attention.
        err = (out.cpu().double() - expected_decode(q, ks, vs)).abs().max()
        assert err <= INT8_ATOL, err


def test_decode_non_contiguous_q(device):
    gen = torch.Generator().manual_seed(11)
    ks, vs = random_kv([3, 40, 16], 2, 64, gen)
    k_cache, v_cache, _, _, tables, lens = build_paged(ks, vs, 16, torch.float32, device, gen)
    wide = torch.randn(8, 3, 128, generator=gen)
    q = wide.transpose(0, 1)[:, :, ::2]  # [3, 8, 64], neither dim contiguous
    assert not q.is_contiguous()
    out = paged_attention(q.to(device), k_cache, v_cache, tables, lens)
    torch.testing.assert_close(out.cpu().double(), expected_decode(q, ks, vs), **TOL[torch.float32])


@pytest.mark.parametrize("window", [1, 5, 16, 17, 40, 1000])
def test_decode_window(device, poison, window):
    gen = torch.Generator().manual_seed(window)
    ks, vs = random_kv(MIXED_LENS, 2, 64, gen)
    # Blocks wholly before L - window are -1 and NaN: the window must not read them.
    k_cache, v_cache, _, _, tables, lens = build_paged(ks, vs, 16, torch.float32, device, gen,
                                                       window=window)
    q = torch.randn(len(MIXED_LENS), 4, 64, generator=gen)
    out = paged_attention(q.to(device), k_cache, v_cache, tables, lens, window=window)
    want = expected_decode(q, ks, vs, window=window)
    torch.testing.assert_close(out.cpu().double(), want, **TOL[torch.float32])


def test_decode_zero_length_gives_zeros(device):
    gen = torch.Generator().manual_seed(2)
    ks, vs = random_kv([5, 9], 1, 64, gen)
    k_cache, v_cache, _, _, tables, lens = build_paged(ks, vs, 4, torch.float32, device, gen)
    lens[0] = 0
    q = torch.randn(2, 2, 64, generator=gen)
    out = paged_attention(q.to(device), k_cache, v_cache, tables, lens).cpu()
    assert torch.equal(out[0], torch.zeros(2, 64))
    assert_close(out[1], expected_decode(q[1:], ks[1:], vs[1:])[0])


# ---------------------------------------------------------------------------------------------
# paged_prefill_attention


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_prefill_packed_matches_dense(device, poison, window, dtype):
    gen = torch.Generator().manual_seed(3 if window is None else 4)
    lens = [1, 16, 37, 50, 9]
    q_lens = [1, 16, 5, 0, 9]  # a whole prompt, a chunk after a prefix, nothing, ...
    ks, vs = random_kv(lens, 2, 64, gen)
    k_cache, v_cache, _, _, tables, seq_lens = build_paged(ks, vs, 8, dtype, device, gen,
                                                           pad="poison")
    q = torch.randn(sum(q_lens), 8, 64, generator=gen).to(dtype)
    out = paged_prefill_attention(q.to(device), k_cache, v_cache, tables, seq_lens,
                                  torch.tensor(q_lens, dtype=torch.int32, device=device),
                                  window=window)
    assert out.shape == q.shape and out.dtype == dtype
    rows = torch.tensor(q_lens).cumsum(0) - torch.tensor(q_lens)
    for b, (n, start) in enumerate(zip(q_lens, rows.tolist())):
        want = dense_attention(q[start:start + n].float(), rounded(ks, dtype)[b],
                               rounded(vs, dtype)[b], window=window)
        torch.testing.assert_close(out[start:start + n].cpu().double(), want, **TOL[dtype])


def test_prefill_batched_and_decode_agree(device):
    gen = torch.Generator().manual_seed(8)
    lens = [4, 20, 33]
    ks, vs = random_kv(lens, 1, 64, gen)
    k_cache, v_cache, _, _, tables, seq_lens = build_paged(ks, vs, 16, torch.float32, device, gen)
    q = torch.randn(4, 3, 4, 64, generator=gen).transpose(0, 1)  # [B=3, T=4, Hq, D], strided
    out = paged_prefill_attention(q.to(device), k_cache, v_cache, tables, seq_lens).cpu()
    for b in range(3):
        assert_close(out[b], dense_attention(q[b], ks[b], vs[b]))
    last = paged_attention(q[:, -1].to(device), k_cache, v_cache, tables, seq_lens).cpu()
    torch.testing.assert_close(last, out[:, -1], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Op argument errors: a clear error each, and nothing written


def small_caches(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    ks, vs = random_kv([5, 9], 2, 8, gen)
    return build_paged(ks, vs, 4, dtype, device, gen)


def test_attention_bad_tables(device):
    k_cache, v_cache, _, _, tables, lens = small_caches(device)
    q = torch.randn(2, 4, 8, device=device)
    nb = k_cache.shape[0]
    for value, where in ((nb, (1, 0)), (-2, (0, 3)), (10**6, (1, 2))):
        bad = tables.clone()
        bad[where] = value
        with pytest.raises(BlockTableError, match=rf"block_tables\[{where[0]}, {where[1]}\] must "
                                                  rf"be in \[0, {nb}\).*got {value}"):
            paged_attention(q, k_cache, v_cache, bad, lens)
    bad = tables.clone()
    bad[1, 1] = -1  # positions 4..7 of a sequence of 9
    with pytest.raises(BlockTableError, match=r"block_tables\[1, 1\] is -1.*positions 4\.\.7"):
        paged_attention(q, k_cache, v_cache, bad, lens)
    # ... but a window that skips it reads fine.
    paged_attention(q, k_cache, v_cache, bad, lens, window=1)
    long = lens.clone()
    long[0] = tables.shape[1] * 4 + 1
    cap = tables.shape[1] * 4
    with pytest.raises(BlockTableError, match=rf"seq_lens\[0\] must be in \[0, {cap}\].*"
                                              rf"got {cap + 1}"):
        paged_attention(q, k_cache, v_cache, tables, long)
    with pytest.raises(BlockTableError, match=r"seq_lens\[1\] must be in"):
        paged_attention(q, k_cache, v_cache, tables, torch.tensor([1, -1], dtype=torch.int32,
                                                                  device=device))


def test_attention_bad_shapes_and_dtypes(device):
    k_cache, v_cache, _, _, tables, lens = small_caches(device)
    q = torch.randn(2, 4, 8, device=device)
    cases = [
        (ShapeError, r"head count 3 must be a multiple of k_cache's num_kv_heads 2",
         dict(q=torch.randn(2, 3, 8, device=device))),
        (ShapeError, r"head_dim \(last dim\) must be k_cache's 8; got 16",
         dict(q=torch.randn(2, 4, 16, device=device))),
        (ShapeError, r"q must be 3-d", dict(q=q[None])),
        (DTypeError, r"q must have the cache dtype torch.float32; got torch.float16",
         dict(q=q.half())),
        (ShapeError, r"v_cache must have k_cache's shape", dict(v_cache=v_cache[:, :2])),
        (DTypeError, r"block_tables must be int32; got torch.int64",
         dict(block_tables=tables.long())),
        (ShapeError, r"block_tables must be \[2, max_blocks\]", dict(block_tables=tables[:1])),
        (ShapeError, r"seq_lens must have shape \(2,\)", dict(seq_lens=lens[:1])),
        (DTypeError, r"k_scale is only for int8 caches",
         dict(k_scale=torch.ones(k_cache.shape[:3], device=device))),
        (ValueError, r"window must be None or an int >= 1; got 0", dict(window=0)),
        (ShapeError, r"block_size \(k_cache.shape\[1\]\) must be a power of two",
         dict(k_cache=k_cache[:, :3], v_cache=v_cache[:, :3])),
    ]
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, seq_lens=lens)
    for error, match, change in cases:
        with pytest.raises(error, match=match):
            paged_attention(**{**args, **change})
    k8, v8, ks, vs, _, _ = small_caches(device, torch.int8)
    with pytest.raises(DTypeError, match=r"int8 caches need v_scale"):
        paged_attention(q, k8, v8, tables, lens, k_scale=ks)


def test_prefill_bad_q_lens(device):
    k_cache, v_cache, _, _, tables, lens = small_caches(device)
    q = torch.randn(7, 4, 8, device=device)

    def q_lens(*n):
        return torch.tensor(n, dtype=torch.int32, device=device)

    with pytest.raises(BlockTableError, match=r"q_lens\[0\] must be in \[0, seq_lens\[0\]\] = "
                                              r"\[0, 5\]; got 6"):
        paged_prefill_attention(q, k_cache, v_cache, tables, lens, q_lens(6, 1))
    with pytest.raises(ShapeError, match=r"q_lens must sum to q's 7 rows; got 5"):
        paged_prefill_attention(q, k_cache, v_cache, tables, lens, q_lens(2, 3))
    with pytest.raises(ShapeError, match=r"needs q_lens"):
        paged_prefill_attention(q, k_cache, v_cache, tables, lens)
    with pytest.raises(ShapeError, match=r"q_lens is only for packed"):
        paged_prefill_attention(q.reshape(1, 7, 4, 8).expand(2, 7, 4, 8), k_cache, v_cache,
                                tables, lens, q_lens(1, 1))


def test_append_matches_slots_and_skips_padding(device, poison):
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.int8):
        k_cache, v_cache, k_scale, v_scale, _, _ = small_caches(device, dtype)
        k = torch.randn(4, 2, 8, generator=gen)
        v = torch.randn(4, 2, 8, generator=gen)
        kin, vin = (k, v) if dtype == torch.int8 else (k.to(dtype), v.to(dtype))
        slots = torch.tensor([5, -1, 0, 17], device=device)
        before = [t.clone() for t in (k_cache, v_cache)]
        paged_append(kin.to(device), vin.to(device), k_cache, v_cache, slots, k_scale, v_scale)
        changed = (k_cache != before[0]) & ~(k_cache.isnan() & before[0].isnan())
        for i, slot in ((0, 5), (2, 0), (3, 17)):
            block, off = divmod(slot, 4)
            if dtype == torch.int8:
                q, s = reference.quantize_per_token(k[i])
                assert torch.equal(k_cache[block, off].cpu(), q)
                assert torch.equal(k_scale[block, off].cpu(), s)
            else:
                assert torch.equal(k_cache[block, off].cpu(), kin[i])
                assert torch.equal(v_cache[block, off].cpu(), vin[i])
            changed[block, off] = False
        assert not changed.any()  # nothing else, and the padding row was skipped


def test_append_errors_leave_caches_unchanged(device):
    k_cache, v_cache, _, _, _, _ = small_caches(device)
    before = (k_cache.clone(), v_cache.clone())
    k = torch.randn(2, 2, 8, device=device)
    num_slots = k_cache.shape[0] * 4
    cases = [
        (ShapeError, r"v must have k's shape \(2, 2, 8\); got \(2, 2, 4\)",
         dict(v=k[..., :4]), ),
        (BlockTableError, rf"slot_mapping entries must be < {num_slots}.*got {num_slots}",
         dict(slot_mapping=torch.tensor([0, num_slots], device=device))),
        (BlockTableError, r"must not repeat a slot; slot 3",
         dict(slot_mapping=torch.tensor([3, 3], device=device))),
        (ShapeError, r"slot_mapping must have shape \(2,\)",
         dict(slot_mapping=torch.tensor([3], device=device))),
        (DTypeError, r"k must have the cache dtype torch.float32; got torch.float16",
         dict(k=k.half(), v=k.half())),
    ]
    args = dict(k=k, v=k, k_cache=k_cache, v_cache=v_cache,
                slot_mapping=torch.tensor([0, 1], device=device))
    for error, match, change in cases:
        with pytest.raises(error, match=match):
            paged_append(**{**args, **change})
        for t, b in zip((k_cache, v_cache), before):
            torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# The manager


def test_append_per_layer_and_attention(device, poison):
    gen = torch.Generator().manual_seed(21)
    cache = PagedKVCache(2, 32, 4, 2, 64, dtype=torch.float32, device=device)
    fill_nan(cache)
    ids = ["a", "b", "c"]
    for sid in ids:
        cache.add_sequence(sid)
    ks = {(sid, layer): [] for sid in ids for layer in range(2)}
    vs = {(sid, layer): [] for sid in ids for layer in range(2)}
    for counts in ([5, 1, 8], [1, 1, 1], [3, 7, 4]):  # packed, several sequences per call
        for layer in range(2):
            k = torch.randn(sum(counts), 2, 64, generator=gen)
            v = torch.randn(sum(counts), 2, 64, generator=gen)
            cache.append(layer, ids, k.to(device), v.to(device), num_tokens=counts)
            for sid, part_k, part_v in zip(ids, k.split(counts), v.split(counts)):
                ks[sid, layer].append(part_k)
                vs[sid, layer].append(part_v)
            assert cache.seq_lens(ids, layer).tolist() == [
                sum(x.shape[0] for x in ks[sid, layer]) for sid in ids]
    k4 = torch.randn(3, 2, 2, 64, generator=gen)  # [S, T, Hkv, D]
    cache.append(0, ids, k4.to(device), k4.to(device))
    assert cache.seq_lens(ids).tolist() == [9, 9, 13]  # tokens in every layer
    assert cache.seq_lens(ids, 0).tolist() == [11, 11, 15]
    for sid, part in zip(ids, k4):
        ks[sid, 0].append(part)
        vs[sid, 0].append(part)
    for layer in range(2):
        q = torch.randn(3, 8, 64, generator=gen)
        out = cache.attention(q.to(device), layer, ids).cpu()
        for b, sid in enumerate(ids):
            k, v = torch.cat(ks[sid, layer]), torch.cat(vs[sid, layer])
            got_k, got_v = gather(cache, sid, layer)
            assert torch.equal(got_k, k) and torch.equal(got_v, v)
            assert_close(out[b:b + 1], dense_attention(q[b:b + 1], k, v))
    check_invariants(cache)


def test_int8_cache(device):
    gen = torch.Generator().manual_seed(22)
    cache = PagedKVCache(1, 8, 16, 2, 64, dtype=torch.int8, device=device)
    cache.add_sequence(0)
    k = torch.randn(20, 2, 64, generator=gen)
    v = torch.randn(20, 2, 64, generator=gen)
    cache.append(0, [0], k[None].to(device), v[None].to(device))
    got_k, _ = gather(cache, 0, 0)
    torch.testing.assert_close(got_k, reference.dequantize(*reference.quantize_per_token(k)),
                               rtol=0, atol=0)
    q = torch.randn(1, 8, 64, generator=gen)
    out = cache.attention(q.to(device), 0, [0]).cpu()
    assert (out.double() - dense_attention(q, k, v)).abs().max() <= INT8_ATOL
    usage = cache.usage()
    assert usage.bytes_total == 8 * 16 * 2 * 2 * (64 + 4)


def test_fork_and_copy_on_write(device):
    gen = torch.Generator().manual_seed(23)
    cache = PagedKVCache(2, 16, 4, 1, 8, dtype=torch.float32, device=device)
    cache.add_sequence("p")
    base = torch.randn(6, 1, 8, generator=gen)  # blocks: one full, one partial (2 of 4)
    for layer in range(2):
        cache.append(layer, ["p"], base[None].to(device), base[None].to(device))
    cache.fork("p", "c")
    tp, tc = cache.block_tables(["p", "c"]).tolist()
    assert tp == tc and cache.usage().blocks_used == 2
    extra_p = torch.randn(1, 1, 8, generator=gen)
    extra_c = torch.randn(3, 1, 8, generator=gen)
    for layer in range(2):
        cache.append(layer, ["p"], extra_p.to(device), extra_p.to(device))
        cache.append(layer, ["c"], extra_c.to(device), extra_c.to(device),
                     num_tokens=[3])
    tp, tc = cache.block_tables(["p", "c"]).tolist()
    assert tp[0] == tc[0] and tp[1] != tc[1]  # the full block shared, the partial one copied
    assert cache._ref[tp[0]] == 2 and cache._ref[tp[1]] == cache._ref[tc[1]] == 1
    for layer in range(2):
        assert torch.equal(gather(cache, "p", layer)[0], torch.cat([base, extra_p]))
        assert torch.equal(gather(cache, "c", layer)[0], torch.cat([base, extra_c]))
    cache.free("p")
    assert cache._ref[tc[0]] == 1 and cache.usage().blocks_used == 3
    check_invariants(cache)


def test_fork_between_layers(device):
    """A fork after layer 0 wrote a step: the parent's layer-1 write copies the shared block,
    keeping layer 0's tokens, and the child still writes its own layer 1."""
    gen = torch.Generator().manual_seed(24)
    cache = PagedKVCache(2, 8, 4, 1, 4, dtype=torch.float32, device=device)
    cache.add_sequence(0)
    x = torch.randn(3, 1, 4, generator=gen)
    cache.append(0, [0], x[None].to(device), x[None].to(device))
    cache.fork(0, 1)
    y, z = torch.randn(2, 3, 1, 4, generator=gen)
    cache.append(1, [0], y[None].to(device), y[None].to(device))
    cache.append(1, [1], z[None].to(device), z[None].to(device))
    assert cache.block_tables([0])[0, 0] != cache.block_tables([1])[0, 0]
    for sid, layer1 in ((0, y), (1, z)):
        assert torch.equal(gather(cache, sid, 0)[0], x)
        assert torch.equal(gather(cache, sid, 1)[0], layer1)
    check_invariants(cache)


def test_prefix_caching(device):
    gen = torch.Generator().manual_seed(25)
    bs = 4
    cache = PagedKVCache(2, 12, bs, 1, 4, dtype=torch.float32, device=device)
    prompt = list(range(100, 111))  # 11 tokens: two full blocks and 3 more
    assert cache.add_sequence("a", prompt) == 0
    kv = torch.randn(2, 11, 1, 4, generator=gen)
    for layer in range(2):
        # The prompt's ids were recorded by add_sequence: passing them again is optional.
        cache.append(layer, ["a"], kv[layer][None].to(device), kv[layer][None].to(device),
                     token_ids=[prompt] if layer == 0 else None)
    blocks_a = cache.block_tables(["a"])[0].tolist()
    # A second request with the same prompt shares both full blocks (not the partial one).
    assert cache.add_sequence("b", prompt) == 8
    assert cache.block_tables(["b"])[0].tolist() == blocks_a[:2]
    for layer in range(2):
        assert torch.equal(gather(cache, "b", layer)[0], kv[layer][:8])
    # The whole prompt cached still leaves its last token to compute.
    assert cache.add_sequence("c", prompt[:8]) == 4
    # A different first block shares nothing, even where the second block's ids match.
    assert cache.add_sequence("d", [0] + prompt[1:]) == 0
    check_invariants(cache)
    for sid in ("a", "b", "c", "d"):
        cache.free(sid)
    usage = cache.usage()
    assert usage.blocks_used == 0 and usage.blocks_cached == 2  # kept for reuse
    assert cache.add_sequence("e", prompt) == 8
    assert cache.usage().blocks_cached == 0
    cache.free("e")
    # Allocations take never-registered blocks first, then the least recently released.
    cache.add_sequence("f")
    big = torch.randn(1, 10 * bs + 1, 1, 4, generator=gen).to(device)
    cache.append(0, ["f"], big, big)
    assert cache.usage().blocks_cached == 1
    assert cache.add_sequence("g", prompt) == 0
    check_invariants(cache)


def test_prefix_blocks_register_only_when_known_and_complete(device):
    cache = PagedKVCache(2, 12, 4, 1, 4, dtype=torch.float32, device=device)
    prompt = list(range(9))
    cache.add_sequence("a")
    x = torch.randn(1, 8, 1, 4).to(device)
    cache.append(0, ["a"], x, x, token_ids=[prompt[:8]])
    assert cache.add_sequence("b", prompt) == 0  # layer 1 has not written the blocks yet
    cache.append(1, ["a"], x, x)
    assert cache.add_sequence("c", prompt) == 8
    # Ids first given by a lagging layer are not learned: layer 0 wrote those tokens without.
    other = [50 + i for i in range(9)]
    cache.add_sequence("d")
    cache.append(0, ["d"], x, x)
    cache.append(1, ["d"], x, x, token_ids=[other[:8]])
    assert cache.add_sequence("e", other) == 0
    check_invariants(cache)


def test_token_id_mismatch_changes_nothing(device):
    cache = PagedKVCache(1, 8, 4, 1, 4, dtype=torch.float32, device=device)
    cache.add_sequence(0, [1, 2, 3, 4, 5])
    snap = snapshot(cache)
    x = torch.zeros(1, 3, 1, 4, device=device)
    with pytest.raises(SequenceError, match=r"token_ids of sequence 0 at positions 0\.\.2 differ "
                                            r"from its recorded ids \[1, 2, 3\]"):
        cache.append(0, [0], x, x, token_ids=[[1, 2, 9]])
    assert_unchanged(cache, snap)


@pytest.mark.parametrize("window", [1, 6, 16])
def test_window_decode(device, poison, window):
    gen = torch.Generator().manual_seed(window)
    bs = 4
    cache = PagedKVCache(1, 3 + -(-window // bs) + 1, bs, 2, 64, dtype=torch.float32,
                         device=device, window=window)
    fill_nan(cache)
    cache.add_sequence(0)
    k = torch.randn(60, 2, 64, generator=gen)
    v = torch.randn(60, 2, 64, generator=gen)
    for p in range(60):  # decode far past what the cache could hold without the window
        cache.append(0, [0], k[p:p + 1].to(device), v[p:p + 1].to(device))
        q = torch.randn(1, 4, 64, generator=gen)
        out = cache.attention(q.to(device), 0, [0]).cpu()
        want = dense_attention(q, k[:p + 1], v[:p + 1], window=window)
        assert_close(out, want)
        assert cache.usage().blocks_used <= -(-window // bs) + 2
    table = cache.block_tables([0])[0].tolist()
    assert table[:(60 - 1 - window) // bs] == [-1] * ((60 - 1 - window) // bs)
    with pytest.raises(BlockTableError, match=r"is -1"):
        cache.attention(torch.randn(1, 4, 64, device=device), 0, [0], window=window + 2 * bs)
    check_invariants(cache)


def test_explicit_trim(device):
    cache = PagedKVCache(1, 16, 4, 1, 4, dtype=torch.float32, device=device)
    cache.add_sequence(0)
    x = torch.randn(1, 23, 1, 4).to(device)
    cache.append(0, [0], x, x)
    assert cache.trim(0, 8) == 3  # positions 0..11 lie before 23 - 8 = 15
    assert cache.block_tables([0])[0].tolist()[:4] == [-1, -1, -1, 3]
    assert cache.trim(0, 8) == 0
    assert cache.usage().blocks_used == 3
    q = torch.randn(1, 1, 4, device=device)
    cache.attention(q, 0, [0], window=8)
    check_invariants(cache)


@pytest.mark.parametrize("window", [None, 5])
def test_chunked_prefill_equals_full_causal(device, window):
    gen = torch.Generator().manual_seed(26)
    cache = PagedKVCache(1, 16, 4, 2, 64, dtype=torch.float32, device=device)
    fill_nan(cache)
    for sid in (0, 1):
        cache.add_sequence(sid)
    lens = (23, 14)
    k = [torch.randn(n, 2, 64, generator=gen) for n in lens]
    v = [torch.randn(n, 2, 64, generator=gen) for n in lens]
    q = [torch.randn(n, 8, 64, generator=gen) for n in lens]
    outs = [[], []]
    done = [0, 0]
    for chunk in ((5, 3), (1, 8), (9, 3), (8, 0)):
        sids = [s for s in (0, 1) if chunk[s]]
        counts = [chunk[s] for s in sids]

        def rows(xs, sids=sids, chunk=chunk):
            return torch.cat([xs[s][done[s]:done[s] + chunk[s]] for s in sids])

        cache.append(0, sids, rows(k).to(device), rows(v).to(device), num_tokens=counts)
        out = cache.prefill_attention(rows(q).to(device), 0, sids, q_lens=counts,
                                      window=window).cpu()
        for s, part in zip(sids, out.split(counts)):
            outs[s].append(part)
            done[s] += chunk[s]
    for s in (0, 1):
        assert_close(torch.cat(outs[s]), dense_attention(q[s], k[s], v[s], window=window))


def test_cache_full_changes_nothing(device):
    cache = PagedKVCache(2, 6, 4, 1, 4, dtype=torch.float32, device=device)
    for sid in (0, 1):
        cache.add_sequence(sid)
    x = torch.randn(2, 6, 1, 4).to(device)
    cache.append(0, [0, 1], x, x)  # 4 blocks, one partial block each
    cache.fork(0, 2)
    snap = snapshot(cache)
    y = torch.randn(3, 7, 1, 4).to(device)
    # 0 and 2 share a partial block: a copy, then 2 new blocks each -> 7 needed, 2 free.
    with pytest.raises(CacheFullError, match=r"needs 7 free blocks \(6 new, 1 copy-on-write "
                                             r"copies\) but 2 of 6 are free; every sequence"):
        cache.append(0, [0, 1, 2], y, y)
    assert_unchanged(cache, snap)
    # Layer 1 has written nothing yet: 0 copies both shared blocks (after which 2 owns them
    # alone), and each sequence needs one new block.
    with pytest.raises(CacheFullError, match=r"needs 5 free blocks \(3 new, 2 copy-on-write"):
        z = torch.randn(3, 9, 1, 4).to(device)
        cache.append(1, [0, 1, 2], z, z)
    assert_unchanged(cache, snap)
    cache.append(0, [2], y[:1, :2], y[:1, :2])  # exactly fits: the copy of the shared block
    check_invariants(cache)


def test_window_release_counts_toward_an_append(device):
    cache = PagedKVCache(1, 3, 2, 1, 4, dtype=torch.float32, device=device, window=2)
    cache.add_sequence(0)
    x = torch.randn(1, 6, 1, 4).to(device)
    cache.append(0, [0], x, x)  # all three blocks
    snap = snapshot(cache)
    with pytest.raises(CacheFullError, match=r"needs 3 free blocks.*but 2 of 3 are free "
                                             r"\(2 of them given back by the window\)"):
        cache.append(0, [0], x[:, :5], x[:, :5])
    assert_unchanged(cache, snap)
    cache.append(0, [0], x[:, :4], x[:, :4])  # the window frees 2 blocks and the append uses them
    assert cache.block_tables([0])[0].tolist()[:2] == [-1, -1]
    check_invariants(cache)
    # A block another sequence still holds is not given back.
    cache = PagedKVCache(1, 4, 2, 1, 4, dtype=torch.float32, device=device, window=2)
    cache.add_sequence(0)
    cache.append(0, [0], x, x)
    cache.fork(0, 1)
    snap = snapshot(cache)
    with pytest.raises(CacheFullError, match=r"needs 2 free blocks.*but 1 of 4 are free "
                                             r"\(0 of them"):
        cache.append(0, [0], x[:, :3], x[:, :3])
    assert_unchanged(cache, snap)
    cache.append(0, [0, 1], x[:, :1].expand(2, 1, 1, 4), x[:, :1].expand(2, 1, 1, 4))
    check_invariants(cache)


def test_manager_errors_change_nothing(device):
    cache = PagedKVCache(2, 8, 4, 2, 8, dtype=torch.float16, device=device)
    for sid in (0, 1):
        cache.add_sequence(sid)
    x = torch.randn(2, 3, 2, 8, device=device).half()
    cache.append(0, [0, 1], x, x)
    cache.add_sequence(2)
    cache.free(2)
    snap = snapshot(cache)
    cases = [
        (SequenceError, r"sequence 2 is not in the cache \(never added, or freed\)",
         lambda: cache.append(0, [0, 2], x, x)),
        (SequenceError, r"sequence 'x' is not in the cache",
         lambda: cache.append(0, ["x"], x[:1], x[:1])),
        (SequenceError, r"seq_ids must not repeat a sequence; got \[1, 1\]",
         lambda: cache.append(0, [1, 1], x, x)),
        (ShapeError, r"v must have k's shape \(2, 3, 2, 8\); got \(2, 2, 2, 8\)",
         lambda: cache.append(0, [0, 1], x, x[:, :2])),
        (ShapeError, r"k must be \[2, T, 2, 8\].*got \(2, 3, 4, 4\)",
         lambda: cache.append(0, [0, 1], x.reshape(2, 3, 4, 4), x.reshape(2, 3, 4, 4))),
        (DTypeError, r"k must have the cache dtype torch.float16; got torch.float32",
         lambda: cache.append(0, [0, 1], x.float(), x.float())),
        (ShapeError, r"num_tokens must list one int per sequence \(2\) summing to k's 6 rows; "
                     r"got \[2, 3\]",
         lambda: cache.append(0, [0, 1], x.reshape(6, 2, 8), x.reshape(6, 2, 8), [2, 3])),
        (ShapeError, r"every sequence must get at least one token",
         lambda: cache.append(0, [0, 1], x.reshape(6, 2, 8), x.reshape(6, 2, 8), [6, 0])),
        (ShapeError, r"token_ids must hold 6 ids",
         lambda: cache.append(0, [0, 1], x, x, token_ids=[1, 2])),
        (ValueError, r"layer must be an int in \[0, 2\); got 2",
         lambda: cache.append(2, [0], x[:1], x[:1])),
        (SequenceError, r"sequence 0 is already in the cache", lambda: cache.add_sequence(0)),
        (SequenceError, r"sequence 1 is already in the cache", lambda: cache.fork(0, 1)),
        (SequenceError, r"sequence 5 is not in the cache", lambda: cache.fork(5, 6)),
        (SequenceError, r"sequence 2 is not in the cache", lambda: cache.free(2)),
        (ShapeError, r"head count 3 must be a multiple of k_cache's num_kv_heads 2",
         lambda: cache.attention(torch.randn(2, 3, 8, device=device).half(), 0, [0, 1])),
        (SequenceError, r"sequence 7 is not in the cache",
         lambda: cache.attention(torch.randn(1, 2, 8, device=device).half(), 0, [7])),
        (ValueError, r"window must be None or an int >= 1", lambda: cache.trim(0, -1)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
        assert_unchanged(cache, snap)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"block_size must be a power of two from 1 to 256; "
                                         r"got 12"):
        PagedKVCache(1, 4, 12, 1, 8)
    with pytest.raises(ValueError, match=r"num_blocks must be an int >= 1; got 0"):
        PagedKVCache(1, 0, 16, 1, 8)
    with pytest.raises(DTypeError, match=r"dtype must be float32, float16, bfloat16 or int8"):
        PagedKVCache(1, 4, 16, 1, 8, dtype=torch.int32)


def test_footprint_mixed_batch():
    gen = torch.Generator().manual_seed(27)
    lengths = torch.randint(256, 4097, (64,), generator=gen).tolist()
    f = kv_footprint(lengths, block_size=16)
    assert f.tokens == sum(lengths) and f.dense_slots == 64 * max(lengths)
    assert f.paged_overhead <= 0.05 < f.dense_overhead
    # The same batch in a real cache holds exactly what kv_footprint says.
    cache = PagedKVCache(1, f.paged_slots // 16, 16, 1, 1, dtype=torch.float16)
    for sid, n in enumerate(lengths):
        cache.add_sequence(sid)
        x = torch.zeros(1, n, 1, 1, dtype=torch.float16)
        cache.append(0, [sid], x, x)
    usage = cache.usage()
    assert usage.blocks_free == 0 and usage.tokens == f.tokens
    assert usage.bytes_used == f.paged_slots * 2 * 2
    assert usage.token_bytes == f.tokens * 2 * 2
    assert 1 / usage.utilization - 1 == pytest.approx(f.paged_overhead)
    assert kv_footprint([1, 16, 17], 16) == kv_footprint([17, 16, 1], 16)
    assert kv_footprint([1, 16, 17], 16).paged_slots == 64


# ---------------------------------------------------------------------------------------------
# Long random operation sequences


HKV, HEAD_DIM, LAYERS, MAX_SEQS = 2, 4, 2, 6
SCRIPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] * 3,
           [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0] * 3,
           [9, 9, 9, 9, 1, 2, 3, 4, 5, 6, 7, 8] * 3]


def token_value(layer, pos, token):
    """What a model would write for a known token: a function of (layer, position, token) only,
    so two sequences with the same prefix hold the same values."""
    base = (layer * 131 + pos * 17 + token * 7) % 1009 / 1009
    return base + torch.arange(HKV * HEAD_DIM, dtype=torch.float32).reshape(HKV, HEAD_DIM) / 8


class Shadow:
    def __init__(self, script, rows, known, window):
        self.script, self.rows, self.known, self.window = script, rows, known, window

    def copy(self):
        return Shadow(self.script, [list(r) for r in self.rows], list(self.known), self.window)


class CacheMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(3, 32),
                window=st.sampled_from([None, None, 3, 6]))
    def setup(self, block_size, num_blocks, window):
        self.cache = PagedKVCache(LAYERS, num_blocks, block_size, HKV, HEAD_DIM,
                                  dtype=torch.float32, window=window)
        self.seqs = {}
        self.next_id = 0
        self.gen = torch.Generator().manual_seed(0)
        # Two sequences from the start, and free keeps one, so most rules can always run.
        self.add(0, 0)
        self.add(1, 0)

    def fresh_value(self):
        """Values for a token whose id is not known: random."""
        return torch.randn(HKV, HEAD_DIM, generator=self.gen)

    def lengths(self):
        return {sid: max(len(r) for r in sh.rows) for sid, sh in self.seqs.items()}

    @precondition(lambda self: len(self.seqs) < MAX_SEQS)
    @rule(script=st.sampled_from(range(len(SCRIPTS))), prompt_len=st.integers(0, 20))
    def add(self, script, prompt_len):
        sid, self.next_id = self.next_id, self.next_id + 1
        prompt = SCRIPTS[script][:prompt_len]
        cached = self.cache.add_sequence(sid, prompt or None)
        bs = self.cache.block_size
        assert cached % bs == 0 and cached <= max(0, (prompt_len - 1) // bs * bs)
        rows = [[token_value(layer, p, prompt[p]) for p in range(cached)]
                for layer in range(LAYERS)]
        self.seqs[sid] = Shadow(SCRIPTS[script], rows, list(prompt), self.cache.window)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), with_ids=st.booleans())
    def append_step(self, data, with_ids):
        self.append(data, with_ids, range(LAYERS))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), with_ids=st.booleans(), layer=st.integers(0, LAYERS - 1))
    def append_layer(self, data, with_ids, layer):
        self.append(data, with_ids, [layer])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), with_ids=st.booleans())
    def plan_step(self, data, with_ids):
        """A step planned once (PagedKVCache.plan) and run in every layer (StepPlan.run); the
        attention of each layer checked against the shadow."""
        self.append(data, with_ids, range(LAYERS), planned=True)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def bad_call(self, data):
        """A call with one bad argument: a frugal error naming it, and nothing changed."""
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        x = torch.randn(1, 1, HKV, HEAD_DIM)
        calls = [
            (SequenceError, lambda: self.cache.append(0, [sid, "nope"], x, x)),
            (SequenceError, lambda: self.cache.plan([sid, sid])),
            (ShapeError, lambda: self.cache.append(0, [sid], x[..., :-1], x[..., :-1])),
            (DTypeError, lambda: self.cache.append(0, [sid], x.double(), x.double())),
            (ValueError, lambda: self.cache.append(LAYERS, [sid], x, x)),
            (ValueError, lambda: self.cache.append(0, [sid], x, x, token_ids=[2**64])),
            (ValueError, lambda: self.cache.attention(x[0], 0, [sid], scale=float("nan"))),
            (ShapeError, lambda: self.cache.plan([sid], 0)),
            (TypeError, lambda: self.cache.plan(sid)),
        ]
        error, call = data.draw(st.sampled_from(calls))
        snap = snapshot(self.cache)
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
        assert message.split(":")[0] in ("append", "plan", "paged_attention"), message
        assert_unchanged(self.cache, snap)

    def append(self, data, with_ids, layers, planned=False):
        """Appends 1 to 5 tokens to each of up to 3 sequences, layer by layer (or through one
        plan for every layer)."""
        live = sorted(self.seqs)
        if planned:  # a plan needs sequences whose layers are level
            live = [s for s in live if len({len(r) for r in self.seqs[s].rows}) == 1]
            if not live:
                return
        sids = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=3, unique=True))
        counts = data.draw(st.lists(st.integers(1, 5), min_size=len(sids), max_size=len(sids)))
        plan = None
        if planned:
            snap = snapshot(self.cache)
            ids = None
            if with_ids:
                ids = []
                for sid, t in zip(sids, counts):
                    sh, start = self.seqs[sid], len(self.seqs[sid].rows[0])
                    ids += [sh.known[p] if p < len(sh.known) else sh.script[p % len(sh.script)]
                            for p in range(start, start + t)]
            windows = [self.seqs[s].window for s in sids if self.seqs[s].window is not None]
            try:
                plan = self.cache.plan(sids, counts, token_ids=ids,
                                       window=min(windows) if windows else None)
            except CacheFullError:
                assert_unchanged(self.cache, snap)
                return
        for layer in layers:
            ids, ks, plans = [], [], []
            for sid, t in zip(sids, counts):
                sh = self.seqs[sid]
                start = len(sh.rows[layer])
                frontier = max(len(r) for r in sh.rows)
                new_ids = [sh.known[p] if p < len(sh.known) else sh.script[p % len(sh.script)]
                           for p in range(start, start + t)]
                known = list(sh.known)
                if with_ids and max(start, frontier) <= len(known) < start + t:
                    known += new_ids[len(known) - start:]
                rows = [token_value(layer, p, known[p]) if p < len(known) else self.fresh_value()
                        for p in range(start, start + t)]
                ids += new_ids
                ks += rows
                plans.append((sh, known, rows))
            k = torch.stack(ks)
            if plan is not None:
                q = torch.randn(len(ks), 2 * HKV, HEAD_DIM, generator=self.gen)
                out = plan.run(layer, q, k, -k)
            else:
                snap = snapshot(self.cache)
                try:
                    self.cache.append(layer, sids, k, -k, num_tokens=counts,
                                      token_ids=ids if with_ids else None)
                except CacheFullError:
                    assert_unchanged(self.cache, snap)
                    return
            for sh, known, rows in plans:
                sh.known = known
                sh.rows[layer] += rows
            if plan is not None:  # each sequence's queries over its whole (windowed) history
                row = 0
                for (sh, _, _), t in zip(plans, counts):
                    hist = torch.stack(sh.rows[layer])
                    assert_close(out[row:row + t],
                                 dense_attention(q[row:row + t], hist, -hist,
                                                 window=plan.window or None))
                    row += t

    @precondition(lambda self: len(self.seqs) < MAX_SEQS and any(self.lengths().values()))
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(s for s, n in self.lengths().items() if n)))
        sid, self.next_id = self.next_id, self.next_id + 1
        self.cache.fork(parent, sid)
        self.seqs[sid] = self.seqs[parent].copy()

    @precondition(lambda self: len(self.seqs) > 1)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.cache.free(sid)
        del self.seqs[sid]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), window=st.integers(1, 8))
    def trim(self, data, window):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.cache.trim(sid, window)
        sh = self.seqs[sid]
        sh.window = window if sh.window is None else min(sh.window, window)

    @precondition(lambda self: any(min(len(r) for r in sh.rows) for sh in self.seqs.values()))
    @rule(data=st.data())
    def attend(self, data):
        live = sorted(s for s, sh in self.seqs.items() if min(len(r) for r in sh.rows))
        sids = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=3, unique=True))
        layer = data.draw(st.integers(0, LAYERS - 1))
        windows = [self.seqs[s].window for s in sids if self.seqs[s].window is not None]
        window = min(windows) if windows else None
        q = torch.randn(len(sids), 2 * HKV, HEAD_DIM, generator=self.gen)
        out = self.cache.attention(q, layer, sids, window=window)
        for b, sid in enumerate(sids):
            k = torch.stack(self.seqs[sid].rows[layer])
            assert_close(out[b:b + 1], dense_attention(q[b:b + 1], k, -k, window=window))

    @invariant()
    def consistent(self):
        if not hasattr(self, "cache"):
            return
        check_invariants(self.cache)
        bs = self.cache.block_size
        for sid, sh in self.seqs.items():
            table = self.cache.block_tables([sid])[0].tolist()
            for j, block in enumerate(table):
                if block < 0:  # only blocks wholly outside the narrowest window applied
                    assert (j + 1) * bs <= min(len(r) for r in sh.rows) - sh.window
            for layer in range(LAYERS):
                got_k, got_v = gather(self.cache, sid, layer)
                want = torch.stack(sh.rows[layer]) if sh.rows[layer] else got_k
                kept = ~got_k.isnan()
                assert got_k.shape == want.shape
                assert torch.equal(got_k[kept], want[kept])
                assert torch.equal(got_v[kept], -want[kept])


CacheMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_cache_machine = CacheMachine.TestCase


# -- cache storage ---------------------------------------------------------------------------

def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def test_advise_huge_pages_marks_large_buffers_only():
    from frugal import _ext

    ext = _ext.ext()
    big = torch.empty(16 << 20, dtype=torch.uint8)
    small = torch.empty(4 << 20, dtype=torch.uint8)
    assert ext.advise_huge_pages(small.data_ptr(), small.numel()) is False
    assert ext.advise_huge_pages(big.data_ptr(), 0) is False
    # madvise(MADV_HUGEPAGE) succeeds wherever the kernel has transparent huge pages at all.
    if _thp_mode() in ("madvise", "always"):
        assert ext.advise_huge_pages(big.data_ptr(), big.numel()) is True
    with pytest.raises(ValueError, match=r"advise_huge_pages: nbytes must be >= 0; got -1"):
        ext.advise_huge_pages(big.data_ptr(), -1)
    with pytest.raises(TypeError):
        ext.advise_huge_pages("not an address", 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_cache_storage_is_zeroed_and_shaped(dtype):
    # 2 * 9 MiB or more per cache: past the huge-page threshold, so the hinted path runs.
    cache = PagedKVCache(2, 1152, 16, 4, 128, dtype=dtype)
    for t in (cache.k_cache, cache.v_cache):
        assert t.shape == (2, 1152, 16, 4, 128) and t.dtype == dtype and t.is_contiguous()
        assert t.numel() * t.element_size() >= 8 << 20
        assert int(t.count_nonzero()) == 0
