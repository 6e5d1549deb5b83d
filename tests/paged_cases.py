"""Case builders and float64 references of the paged KV-cache tests (test_paged_kv_cache,
test_paged_attention_triton, test_paged_prefill, test_paged_plan): one place, so a test module
never imports another."""

import collections

import torch
from frugal import reference

NAN = float("nan")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
# int8 KV (per-token, per-head absmax / 127) against float64 on the unquantized values, for
# unit-normal q, k, v and head_dim 64 or 128: the stated tolerance of the int8 mode.
INT8_ATOL = 0.03
INT8_TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 q over exactly dequantized values
LSE_TOL = dict(rtol=1e-5, atol=2e-5)  # lse from fp32 scores of exactly-rounded inputs
# Decode lengths (1, odd, empty) and chunks of them for prefill (one, some, all, none).
ODD_LENS = [1, 37, 19, 0, 8]
ODD_Q_LENS = [1, 5, 19, 0, 2]


def dense_attention(q, k, v, scale=None, window=None, return_lse=False, softcap=None,
                    slopes=None):
    """q [n, Hq, D] at the last n positions of k, v [L, Hkv, D], in float64: causal, and each
    query sees the last ``window`` keys up to itself. With ``return_lse`` also the float64
    log-sum-exp [n, Hq] of each row's scaled scores (-inf with no keys, whose out is 0).
    ``softcap`` and ``slopes`` (ALiBi, [Hq]) modify the scores as frugal.score_mods says."""
    n, hq, d = q.shape
    length, hkv = k.shape[:2]
    k64 = k.double().repeat_interleave(hq // hkv, dim=1)
    v64 = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.double(), k64) * (d**-0.5 if scale is None else scale)
    q_pos = torch.arange(length - n, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    s = reference.apply_score_mods(s[None], softcap, None if slopes is None else
                                   slopes.double().reshape(1, hq), q_pos, k_pos)[0]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hq, n]
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    out = torch.einsum("hnl,lhd->nhd", p, v64)
    return (out, lse.t()) if return_lse else out


def build_paged(ks, vs, block_size, dtype, device, gen, pad="neg", window=None, extra=3):
    """Caches holding sequence b's keys and values ks[b], vs[b] [L_b, Hkv, D] in randomly
    permuted blocks. Every other slot is NaN (for int8, its scale is), so a read past seq_len
    or outside the window shows. ``pad``: table padding -1 ("neg") or a poisoned block
    ("poison"). With a window, entries wholly before L - window are -1 and their blocks NaN.
    Returns k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens."""
    hkv, d = ks[0].shape[1:]
    lens = [k.shape[0] for k in ks]
    counts = [-(-n // block_size) for n in lens]
    total = sum(counts) + extra
    perm = torch.randperm(total, generator=gen).tolist()
    shape = (total, block_size, hkv, d)
    int8 = dtype == torch.int8
    caches = [torch.zeros(shape, dtype=dtype) if int8 else torch.full(shape, NAN, dtype=dtype)
              for _ in range(2)]
    scales = [torch.full(shape[:3], NAN) for _ in range(2)] if int8 else [None, None]
    poison_blocks = perm[sum(counts):]
    width = max(counts) + 1
    tables = torch.full((len(ks), width), -1, dtype=torch.int32)
    if pad == "poison":
        tables = torch.tensor(poison_blocks, dtype=torch.int32)[
            torch.randint(len(poison_blocks), (len(ks), width), generator=gen)]
    taken = 0
    for b, (k, v, n) in enumerate(zip(ks, vs, counts)):
        blocks = perm[taken:taken + n]
        taken += n
        tables[b, :n] = torch.tensor(blocks, dtype=torch.int32)
        for cache, scale, x in ((caches[0], scales[0], k), (caches[1], scales[1], v)):
            for j, block in enumerate(blocks):
                rows = x[j * block_size:(j + 1) * block_size]
                if int8:
                    rq, rs = reference.quantize_per_token(rows)
                    cache[block, :len(rows)] = rq
                    scale[block, :len(rows)] = rs
                else:
                    cache[block, :len(rows)] = rows.to(dtype)
        if window is not None:
            for j in range(max(0, lens[b] - window) // block_size):
                for t in caches + scales:
                    if t is not None:
                        t[blocks[j]] = 0 if t.dtype == torch.int8 else NAN
                tables[b, j] = -1
    seq_lens = torch.tensor(lens, dtype=torch.int32)

    def move(t):
        return None if t is None else t.to(device)

    return (*map(move, caches), *map(move, scales), tables.to(device), seq_lens.to(device))


def random_kv(lens, hkv, d, gen):
    ks = [torch.randn(n, hkv, d, generator=gen) for n in lens]
    vs = [torch.randn(n, hkv, d, generator=gen) for n in lens]
    return ks, vs


def paged_case(d, cache_dtype, seed, lens=ODD_LENS, hkv=2, group=3, bs=8, q_rows=None):
    """Sequences of ``lens`` tokens in a paged cache of ``cache_dtype`` (block size ``bs``, tables
    poisoned past the end) and decode queries: (q [len(lens) or q_rows, Hkv * group, d] in the
    cache dtype (float32 over int8), (k_cache, v_cache, k_scale, v_scale), tables, seq_lens,
    ks, vs), ks and vs the values the cache holds, in float."""
    gen = torch.Generator().manual_seed(seed)
    ks, vs = random_kv(lens, hkv, d, gen)
    k_cache, v_cache, k_scale, v_scale, tables, seq_lens = build_paged(
        ks, vs, bs, cache_dtype, "cpu", gen, pad="poison")
    q_dtype = torch.float32 if cache_dtype == torch.int8 else cache_dtype
    q = torch.randn(q_rows or len(lens), hkv * group, d, generator=gen).to(q_dtype)
    if cache_dtype == torch.int8:
        ks, vs = ([reference.dequantize(*reference.quantize_per_token(x)) for x in xs]
                  for xs in (ks, vs))
    else:
        ks, vs = rounded(ks, cache_dtype), rounded(vs, cache_dtype)
    return q, (k_cache, v_cache, k_scale, v_scale), tables, seq_lens, ks, vs


def expected_decode(q, ks, vs, scale=None, window=None, return_lse=False, softcap=None,
                    slopes=None):
    """float64 decode of q [B, Hq, D] over ks[b], vs[b] [L_b, Hkv, D] (out [B, Hq, D], and lse
    [B, Hq] with ``return_lse``; an empty sequence gives out 0 and lse -inf). ``slopes``: ALiBi
    [B, Hq]."""
    rows = [dense_attention(q[b:b + 1].float(), k, v, scale, window, return_lse=True,
                            softcap=softcap, slopes=None if slopes is None else slopes[b])
            for b, (k, v) in enumerate(zip(ks, vs))]
    out = torch.stack([o[0] for o, _ in rows])
    return (out, torch.stack([s[0] for _, s in rows])) if return_lse else out


def expected_prefill(q, ks, vs, q_lens, scale=None, window=None, softcap=None, slopes=None):
    """float64 (out, lse) of packed q [N, Hq, D], sequence b owning the next q_lens[b] rows at its
    last positions; ``slopes`` ALiBi [B, Hq]."""
    outs, lses, start = [], [], 0
    for b, (k, v, n) in enumerate(zip(ks, vs, q_lens)):
        if n:
            o, s = dense_attention(q[start:start + n].double(), k, v, scale, window,
                                   return_lse=True, softcap=softcap,
                                   slopes=None if slopes is None else slopes[b])
            outs.append(o)
            lses.append(s)
        start += n
    return torch.cat(outs), torch.cat(lses)


def out_tol(q, cache_dtype):
    """The tolerance of an output for q over a cache of ``cache_dtype`` against float64."""
    return INT8_TOL if cache_dtype == torch.int8 else TOL[q.dtype]


def check_out_lse(got, want, want_lse, tol):
    """got (out, lse) against float64 (want, want_lse): out within ``tol``, finite, lse within
    LSE_TOL."""
    out, lse = got
    assert out.shape == want.shape and lse.shape == want_lse.shape
    assert torch.isfinite(out).all(), "non-finite output: a poisoned slot or unwritten element"
    torch.testing.assert_close(out.cpu().double(), want, **tol)
    torch.testing.assert_close(lse.cpu().double(), want_lse, **LSE_TOL)


def assert_close(got, want, dtype=torch.float32):
    torch.testing.assert_close(got.cpu().double(), want, **TOL[dtype])


def rounded(xs, dtype):
    return [x.to(dtype).float() for x in xs]


MIXED_LENS = [1, 16, 32, 37, 5, 100]  # 1, multiples of block_size 16, and neither


def gather(cache, seq_id, layer):
    """A sequence's keys and values in ``layer`` as float [L, Hkv, D]; NaN where the window gave
    the block back."""
    table = cache.block_tables([seq_id])[0].tolist()
    length = int(cache.seq_lens([seq_id], layer)[0])
    out = []
    for cache_t, scale in ((cache.k_cache, cache.k_scale), (cache.v_cache, cache.v_scale)):
        x = torch.full((length, cache.num_kv_heads, cache.head_dim), NAN)
        for p in range(length):
            block = table[p // cache.block_size]
            if block >= 0:
                row = cache_t[layer, block, p % cache.block_size].float().cpu()
                if scale is not None:
                    row = row * scale[layer, block, p % cache.block_size].cpu()[:, None]
                x[p] = row
        out.append(x)
    return out


def snapshot(cache):
    seqs = {sid: (list(s.blocks), list(s.lens), list(s.token_ids), list(s.hashes))
            for sid, s in cache._seqs.items()}
    tensors = [t.clone() for t in (cache.k_cache, cache.v_cache, cache.k_scale, cache.v_scale)
               if t is not None]
    return (seqs, list(cache._ref), list(cache._free), list(cache._cached),
            dict(cache._block_hash), dict(cache._hash_block)), tensors


def assert_unchanged(cache, snap):
    state, tensors = snapshot(cache)
    assert state == snap[0]
    for t, b in zip(tensors, snap[1]):
        torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)


def check_invariants(cache):
    bs = cache.block_size
    held = collections.Counter()
    for seq in cache._seqs.values():
        live = [b for b in seq.blocks if b >= 0]
        assert len(set(live)) == len(live), "a block twice in one table"
        held.update(live)
        assert len(seq.blocks) == -(-max(seq.lens) // bs)
    free, cached = list(cache._free), list(cache._cached)
    assert len(set(free)) == len(free), "duplicate in the free list"
    assert not set(free) & set(cached)
    for b in range(cache.num_blocks):
        assert cache._ref[b] == held[b], f"block {b}: count {cache._ref[b]}, held {held[b]}"
    assert not (set(free) | set(cached)) & set(held), "a block both free and referenced"
    assert len(free) + len(cached) + len(held) == cache.num_blocks
    assert set(cached) <= set(cache._block_hash) and not set(free) & set(cache._block_hash)
    assert {h: b for b, h in cache._block_hash.items()} == cache._hash_block
    usage = cache.usage()
    assert usage.blocks_used == len(held)
    assert usage.blocks_used + usage.blocks_free == cache.num_blocks
    assert usage.blocks_cached == len(cached)


def fill_nan(cache):
    cache.k_cache.fill_(NAN)
    cache.v_cache.fill_(NAN)
