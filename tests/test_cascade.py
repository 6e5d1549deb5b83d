"""Shared-prefix (cascade) decode: frugal.cascade.cascade_groups finds the groups of sequences
whose tables start with the same whole blocks, and PagedKVCache.attention / StepPlan.attention
read each group's shared blocks once (prefix pass with the group's queries folded into the
head dim, suffix pass, merge). Checked against float64 attention over each sequence's own
tokens (gathered from the cache) on fresh random inputs with poisoned allocations, for forks
with odd lengths (the shared partial block is not part of a group), prefix-cache hits, nested
groups of different sizes, GQA, int8 caches, suffixes of length 0, windows (cascade only where
the window covers every token; cascade=True refuses otherwise) and the argument errors."""

import pytest
import torch
from conftest import backends_for
from paged_cases import TOL, expected_decode, gather

import frugal
from frugal import cascade as cas
from frugal.paged_kv_cache import PagedKVCache

BACKENDS = backends_for("cpu")
LSE_TOL = dict(rtol=1e-5, atol=2e-5)


# ------------------------------------------------------------------------ groups


def test_groups_of_forks_and_the_trie_choice():
    bs = 4
    a = [10, 11, 12, 13, 14]
    rows = [a + [20], a + [21], a[:3] + [30, 31], a[:3] + [40], [50, 51], a[:2]]
    lens = [23, 21, 20, 13, 8, 8]
    # Everyone but row 4 shares block 10, 11; rows 0-3 share 10, 11, 12; rows 0-1 share 5.
    # Saved token reads: all five at depth 2: 4 * 8 = 32; rows 0-3 at depth 3: 3 * 12 = 36;
    # rows 0, 1 at depth 5 (20) + rows 2, 3 at depth 3 (12) = 32. Best: rows 0-3 at 3 blocks.
    assert cas.cascade_groups(rows, lens, bs, min_saved=1) == [((0, 1, 2, 3), 3)]
    # Row 3 holds 13 tokens: only its first 3 blocks are whole; with 12 tokens, 3 still.
    lens[3] = 12
    assert cas.cascade_groups(rows, lens, bs, min_saved=1) == [((0, 1, 2, 3), 3)]
    # A group must save min_saved token reads and share min_prefix tokens.
    assert cas.cascade_groups(rows, lens, bs, min_saved=37) == []
    assert cas.cascade_groups(rows, lens, bs, min_saved=1, min_prefix=13) == [((0, 1), 5)]
    # A -1 entry (a block given back) ends the shared run; a lone row forms no group.
    assert cas.cascade_groups([[-1, 1, 2], [-1, 1, 2]], [12, 12], bs, min_saved=1) == []
    assert cas.cascade_groups([[1, 2]], [8], bs, min_saved=1) == []
    # Different subtrees give separate groups (two groups of two here).
    rows = [[1, 2, 3], [1, 2, 4], [5, 6, 7], [5, 6, 8], [9]]
    got = cas.cascade_groups(rows, [12, 12, 12, 12, 4], bs, min_saved=1)
    assert sorted(got) == [((0, 1), 2), ((2, 3), 2)]


# ------------------------------------------------------------------------ decode


def build(dtype, gen, *, layers=1, window=None, hkv=2, d=32, bs=8, num_blocks=160):
    """A cache with a prompt of 45 tokens (5 whole blocks + 5) forked into four children,
    a child of a child sharing 11 blocks, a prefix-cache hit on the prompt and an unrelated
    sequence; every sequence then gets its own 0..13 tokens. Returns the cache and ids."""
    cache = PagedKVCache(layers, num_blocks, bs, hkv, d, dtype=dtype, window=window)
    kv_dtype = torch.float32 if dtype == torch.int8 else dtype

    def put(sid, n, ids=None):
        for layer in range(layers):
            k, v = torch.randn(2, 1, n, hkv, d, generator=gen).to(kv_dtype).unbind(0)
            cache.append(layer, [sid], k, v,
                         token_ids=None if ids is None or layer else [ids])

    prompt = torch.randint(0, 1000, (45,), generator=gen).tolist()
    cache.add_sequence("p", prompt)
    put("p", 45, prompt)
    for child in "abcd":
        cache.fork("p", child)
    put("a", 50)                # a: 95, its first own token copies the shared partial block
    cache.fork("a", "a2")      # a2 shares a's 11 whole blocks
    put("a2", 13)
    put("b", 3)
    put("c", 11)                # d: nothing of its own (45 tokens, all of p's)
    hit = cache.add_sequence("h", prompt + [1, 2])  # a prefix-cache hit: p's 5 whole blocks
    assert hit == 40
    put("h", 9)
    cache.add_sequence("u")
    put("u", 29)
    return cache, ["p", "a", "a2", "b", "c", "d", "h", "u"]


def expected(cache, q, ids, layer=0, scale=None):
    kv = [gather(cache, sid, layer) for sid in ids]
    return expected_decode(q, [k for k, _ in kv], [v for _, v in kv], scale=scale,
                           return_lse=True)


def check(got, want, want_lse, dtype):
    out, lse = got
    tol = dict(rtol=0, atol=0.03) if dtype == torch.int8 else TOL[dtype]
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(lse.double(), want_lse, **LSE_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_attention_cascade_matches_float64(poison, backend, dtype):
    if backend == "triton" and dtype == torch.int8:
        pytest.skip("the interpreter is slow; Triton runs the fp32 and fp16 caches")
    gen = torch.Generator().manual_seed(hash((backend, str(dtype))) % 1000)
    cache, ids = build(dtype, gen)
    q_dtype = torch.float32 if dtype == torch.int8 else dtype
    q = torch.randn(len(ids), 6, 32, generator=gen).to(q_dtype)  # GQA: 3 query heads per kv
    want, want_lse = expected(cache, q, ids, scale=0.3)
    plan = cache._cascade("attention", [cache._seqs[s] for s in ids],
                          [cache._seqs[s].lens[0] for s in ids], None, True)
    # a and a2 share 11 whole blocks; p, b, c, d, h share 5 (h through the prefix cache):
    # two groups (88 + 4 * 40 token reads saved, more than 6 * 40 for all seven at 5 blocks).
    assert sorted(plan.groups) == [((0, 3, 4, 5, 6), 40), ((1, 2), 88)]
    got = cache.attention(q, 0, ids, scale=0.3, backend=backend, return_lse=True,
                          cascade=True)
    assert got[0].dtype == q_dtype and got[0].shape == q.shape and got[1].shape == q.shape[:2]
    check(got, want, want_lse, dtype)
    plain = cache.attention(q, 0, ids, scale=0.3, backend=backend, return_lse=True,
                            cascade=False)
    check(plain, want, want_lse, dtype)
    # Without return_lse: the output alone, the same as with it.
    out = cache.attention(q, 0, ids, scale=0.3, backend=backend, cascade=True)
    torch.testing.assert_close(out, got[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_cascade_over_layers_matches_float64(poison, backend):
    gen = torch.Generator().manual_seed(31)
    cache, ids = build(torch.float32, gen, layers=2)
    step = cache.plan(ids, backend=backend, cascade=True)
    assert step.cascade is not None
    # After the step's token: a and a2 still share 11 blocks, the others 5.
    assert sorted(step.cascade.groups) == [((0, 3, 4, 5, 6), 40), ((1, 2), 88)]
    for layer in (1, 0):
        k, v = torch.randn(2, len(ids), 2, 32, generator=gen).unbind(0)
        step.append(layer, k, v)
        q = torch.randn(len(ids), 4, 32, generator=gen)  # GQA 2
        want, want_lse = expected(cache, q, ids, layer)
        check(step.attention(q, layer, return_lse=True), want, want_lse, torch.float32)
        out = step.attention(q, layer)
        torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    # A prefill step (several tokens per sequence) never cascades.
    assert cache.plan(ids[:2], num_tokens=2, cascade=True).cascade is None


def test_every_member_without_a_suffix(poison):
    # Forks at a block boundary, before any own token: every member's suffix is empty
    # (lse -inf; the suffix tables have no columns) and the prefix pass gives the result.
    gen = torch.Generator().manual_seed(5)
    cache = PagedKVCache(1, 16, 8, 1, 16, dtype=torch.float32)
    cache.add_sequence("x")
    k, v = torch.randn(2, 1, 24, 1, 16, generator=gen).unbind(0)
    cache.append(0, ["x"], k, v)
    cache.fork("x", "y")
    cache.fork("x", "z")
    q = torch.randn(3, 2, 16, generator=gen)
    want, want_lse = expected(cache, q, ["x", "y", "z"])
    got = cache.attention(q, 0, ["x", "y", "z"], return_lse=True, cascade=True)
    check(got, want, want_lse, torch.float32)


def test_auto_rule_and_window(poison):
    gen = torch.Generator().manual_seed(6)
    cache, ids = build(torch.float32, gen)
    seqs = [cache._seqs[s] for s in ids]
    lens = [s.lens[0] for s in seqs]
    # Far below the auto threshold (a few hundred token reads of 2 x 32 floats): per sequence.
    assert cache._cascade("attention", seqs, lens, None, "auto") is None
    assert cache._cascade("attention", seqs, lens, None, False) is None
    # A window that covers every token changes nothing: cascade still applies.
    assert cache._cascade("attention", seqs, lens, max(lens), True) is not None
    # A window that cuts into a sequence: auto runs per sequence, True refuses, naming it.
    assert cache._cascade("attention", seqs, lens, max(lens) - 1, "auto") is None
    q = torch.randn(len(ids), 2, 32, generator=gen)
    with pytest.raises(ValueError, match=r"attention: cascade=True needs a window of at least "
                                         r"every sequence's length; got window 64 < 108"):
        cache.attention(q, 0, ids, window=64, cascade=True)
    before = {s: (list(cache._seqs[s].blocks), list(cache._seqs[s].lens)) for s in ids}
    free = cache.usage().blocks_free
    with pytest.raises(ValueError, match=r"plan: cascade=True needs a window of at least every "
                                         r"sequence's length; got window 50 < 109"):
        cache.plan(ids, window=50, cascade=True)
    # Nothing changed by the refused plan.
    assert before == {s: (list(cache._seqs[s].blocks), list(cache._seqs[s].lens)) for s in ids}
    assert cache.usage().blocks_free == free
    # Windowed decode through auto matches float64 with the window.
    want, want_lse = expected_decode(q, *zip(*[gather(cache, s, 0) for s in ids]), window=20,
                                     return_lse=True)
    check(cache.attention(q, 0, ids, window=20, return_lse=True), want, want_lse,
          torch.float32)


def test_window_cache_with_eviction_runs_per_sequence(poison):
    # A cache window gives back blocks of long sequences (their rows start with -1): such rows
    # share nothing, and a window shorter than a sequence keeps the decode per sequence.
    gen = torch.Generator().manual_seed(8)
    cache = PagedKVCache(1, 64, 4, 2, 16, dtype=torch.float32, window=12)
    cache.add_sequence("s")
    k, v = torch.randn(2, 1, 9, 2, 16, generator=gen).unbind(0)
    cache.append(0, ["s"], k, v)
    cache.fork("s", "t")
    # Both hold 9 tokens < window: the shared 2 blocks cascade.
    step = cache.plan(["s", "t"], cascade=True)
    assert step.cascade is not None and step.cascade.groups == (((0, 1), 8),)
    k, v = torch.randn(2, 2, 2, 16, generator=gen).unbind(0)
    step.append(0, k, v)
    q = torch.randn(2, 4, 16, generator=gen)
    check(step.attention(q, 0, return_lse=True), *expected(cache, q, ["s", "t"]),
          torch.float32)
    # Grow s past the window: the next step's plan trims its leading blocks.
    k, v = torch.randn(2, 1, 12, 2, 16, generator=gen).unbind(0)
    cache.append(0, ["s"], k, v)
    step = cache.plan(["s", "t"])
    assert cache.block_tables(["s"])[0, 0] == -1
    assert step.cascade is None
    k, v = torch.randn(2, 2, 2, 16, generator=gen).unbind(0)
    step.append(0, k, v)
    kv = [gather(cache, sid, 0) for sid in "st"]  # NaN where s gave blocks back
    want, want_lse = expected_decode(q, [x[-12:] for x, _ in kv], [x[-12:] for _, x in kv],
                                     return_lse=True)
    check(step.attention(q, 0, return_lse=True), want, want_lse, torch.float32)


def test_a_fork_after_planning_invalidates_the_plan():
    gen = torch.Generator().manual_seed(9)
    cache, ids = build(torch.float32, gen)
    step = cache.plan(ids, cascade=True)
    cache.fork("a", "a3")
    k, v = torch.randn(2, len(ids), 2, 32, generator=gen).unbind(0)
    with pytest.raises(frugal.SequenceError):
        step.append(0, k, v)


def test_cascade_argument_errors():
    cache = PagedKVCache(1, 8, 4, 1, 16, dtype=torch.float32)
    cache.add_sequence("s")
    k = torch.randn(1, 3, 1, 16)
    cache.append(0, ["s"], k, k)
    q = torch.randn(1, 1, 16)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"attention: cascade must be 'auto', True or "
                                             rf"False; got {bad!r}"):
            cache.attention(q, 0, ["s"], cascade=bad)
        with pytest.raises(ValueError, match=r"plan: cascade must be 'auto', True or False; "
                                             rf"got {bad!r}"):
            cache.plan(["s"], cascade=bad)
    assert cache.seq_lens(["s"], 0).tolist() == [3]  # the refused plans changed nothing


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_many_members_fold_many_heads(poison, backend):
    # 12 members x 3 query heads per kv head: 36 folded heads per kv head, where the C++
    # decode splits the work by kv head alone (8 kv heads: enough items for up to 2 threads,
    # no partition merge) and runs items of many heads.
    gen = torch.Generator().manual_seed(13)
    cache = PagedKVCache(1, 64, 8, 8, 32, dtype=torch.float32)
    cache.add_sequence(0)
    k, v = torch.randn(2, 1, 43, 8, 32, generator=gen).unbind(0)
    cache.append(0, [0], k, v)
    ids = list(range(12))
    for i in ids[1:]:
        cache.fork(0, i)
    for i in ids:
        if i % 4:
            k, v = torch.randn(2, 1, i % 4, 8, 32, generator=gen).unbind(0)
            cache.append(0, [i], k, v)
    q = torch.randn(12, 24, 32, generator=gen)
    want, want_lse = expected(cache, q, ids)
    got = cache.attention(q, 0, ids, backend=backend, return_lse=True, cascade=True)
    check(got, want, want_lse, torch.float32)


@pytest.mark.slow
def test_cascade_plan_compiles_without_graph_breaks():
    # A plan's per-layer call with a cascade, under torch.compile(fullgraph=True), from its
    # first layer on (the folded-row indices are built then), the same as eager.
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(14)
    cache = PagedKVCache(2, 32, 4, 2, 32, dtype=torch.float32)
    cache.add_sequence(0)
    for layer in range(2):
        k, v = torch.randn(2, 1, 9, 2, 32, generator=gen).unbind(0)
        cache.append(layer, [0], k, v)
    cache.fork(0, 1)
    cache.fork(0, 2)
    plan = cache.plan([0, 1, 2], cascade=True)
    assert plan.cascade.groups == (((0, 1, 2), 8),)
    q = torch.randn(3, 4, 32, generator=gen)
    k, v = torch.randn(2, 3, 2, 32, generator=gen).unbind(0)
    compiled = torch.compile(lambda layer, q, k, v: plan.run(layer, q, k, v), fullgraph=True)
    for layer in range(2):
        got = compiled(layer, q, k, v)
        want, _ = expected(cache, q, [0, 1, 2], layer)
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


def test_a_windowed_copy_of_a_cascade_plan_runs_per_sequence(poison):
    # The transformers integration copies a step's plan per layer window
    # (dataclasses.replace(plan, window=w, ...)): a window that cuts into a sequence must not
    # run the plan's cascade, which reads every token.
    import dataclasses

    gen = torch.Generator().manual_seed(15)
    cache, ids = build(torch.float32, gen)
    step = cache.plan(ids, cascade=True)
    assert step.cascade is not None
    k, v = torch.randn(2, len(ids), 2, 32, generator=gen).unbind(0)
    step.append(0, k, v)
    q = torch.randn(len(ids), 4, 32, generator=gen)
    for window in (7, 1000):
        copy = dataclasses.replace(step, window=window, _impls={}, _workspaces={})
        kv = [gather(cache, s, 0) for s in ids]
        want, want_lse = expected_decode(q, [x[-window:] for x, _ in kv],
                                         [x[-window:] for _, x in kv], return_lse=True)
        check(copy.attention(q, 0, return_lse=True), want, want_lse, torch.float32)
