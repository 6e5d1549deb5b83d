"""The C++ CPU paged KV-cache ops (csrc/cpu/paged_attention.cpp), called directly through
torch.ops.frugal, on every CPU ISA path.

paged_attention is compared with a float64 dense computation over exactly the positions each
query attends to, and with frugal.reference.paged_attention. Every cache slot no query needs
(past seq_len, before the window, blocks no table names) holds NaN (for int8 caches: a NaN
scale), and table entries of evicted blocks are -1, so any read the op should not make shows.
paged_append must match frugal.reference.paged_append bit for bit."""

import copy
import math

import pytest
import torch

from frugal import _ext, reference

pytestmark = pytest.mark.skipif(_ext.ext() is None, reason="frugal._C is not built")

ops = torch.ops.frugal
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# Tolerance relative to the float64 result: fp32 arithmetic, or one rounding to the output dtype.
RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


class Case:
    """A batch of sequences in a paged cache with randomly permuted tables."""

    def __init__(self, lens, hq, hkv, d, bs, dtype, window=None, seed=0, spare_blocks=3):
        gen = torch.Generator().manual_seed(seed)
        self.lens, self.window, self.hq, self.hkv, self.d = list(lens), window, hq, hkv, d
        self.lo = [0 if window is None else max(0, n - window) for n in lens]
        needed = [range(lo // bs, -(-n // bs)) for lo, n in zip(self.lo, lens)]
        num_blocks = sum(len(r) for r in needed) + spare_blocks
        width = max((-(-n // bs) for n in lens), default=0) + 1
        ids = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables = torch.full((len(lens), width), -1, dtype=torch.int32)
        for b, r in enumerate(needed):
            for j in r:
                self.tables[b, j] = ids.pop()
        shape = (num_blocks, bs, hkv, d)
        int8 = dtype == torch.int8
        self.scale = d**-0.5
        if int8:
            self.k_cache = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
            self.v_cache = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
            self.k_scale = torch.full(shape[:3], float("nan"))
            self.v_scale = torch.full(shape[:3], float("nan"))
        else:
            self.k_cache = torch.full(shape, float("nan"), dtype=dtype)
            self.v_cache = torch.full(shape, float("nan"), dtype=dtype)
            self.k_scale = self.v_scale = None
        # Only the attended positions get values.
        slots = [int(self.tables[b, p // bs]) * bs + p % bs
                 for b, n in enumerate(lens) for p in range(self.lo[b], n)]
        k = torch.randn(len(slots), hkv, d, generator=gen)
        v = torch.randn(len(slots), hkv, d, generator=gen)
        reference.paged_append(k if int8 else k.to(dtype), v if int8 else v.to(dtype),
                               self.k_cache, self.v_cache, torch.tensor(slots, dtype=torch.long),
                               self.k_scale, self.v_scale)
        self.q = torch.randn(len(lens), hq, d, generator=gen).to(torch.float32 if int8 else dtype)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32)

    def subset(self, b):
        """The same cache with sequence b alone."""
        one = copy.copy(self)
        one.q, one.tables, one.seq_lens = (t[b:b + 1] for t in (self.q, self.tables, self.seq_lens))
        one.lens, one.lo = self.lens[b:b + 1], self.lo[b:b + 1]
        return one

    def run(self, q=None):
        q = self.q if q is None else q
        return ops.paged_attention(q, self.k_cache, self.v_cache, self.tables, self.seq_lens,
                                   self.scale, self.window or 0, self.k_scale, self.v_scale)

    def dense64(self, q=None):
        """float64 softmax(q k^T * scale) v over each query's positions, gathered by hand."""
        q = (self.q if q is None else q).double()
        bs = self.k_cache.shape[1]
        g = self.hq // self.hkv
        out = torch.zeros(q.shape, dtype=torch.float64)
        for b, n in enumerate(self.lens):
            if n == 0:
                continue
            pos = torch.arange(self.lo[b], n)
            blocks = self.tables[b, pos // bs].long()
            k = self.k_cache[blocks, pos % bs].double()
            v = self.v_cache[blocks, pos % bs].double()
            if self.k_scale is not None:
                k = k * self.k_scale[blocks, pos % bs].double()[..., None]
                v = v * self.v_scale[blocks, pos % bs].double()[..., None]
            k = k.repeat_interleave(g, dim=1)  # [L, Hq, D]
            v = v.repeat_interleave(g, dim=1)
            s = torch.einsum("hd,lhd->hl", q[b], k) * self.scale
            out[b] = torch.einsum("hl,lhd->hd", torch.softmax(s, dim=-1), v)
        return out

    def check(self, q=None, out_dtype=None):
        out = self.run(q)
        want = self.dense64(q)
        out_dtype = out_dtype or (self.q if q is None else q).dtype
        assert out.dtype == out_dtype and out.shape == want.shape
        assert torch.isfinite(out).all(), "non-finite output: a slot outside the range was read"
        rtol = RTOL[out_dtype]
        err = (out.double() - want).abs()
        bound = rtol * want.abs() + rtol * 0.1
        assert (err <= bound).all(), f"max err {err.max():.3g} ({(err / bound).max():.3g}x bound)"
        ref = reference.paged_attention(self.q if q is None else q, self.k_cache, self.v_cache,
                                        self.tables, self.seq_lens, self.scale, self.window,
                                        self.k_scale, self.v_scale)
        torch.testing.assert_close(out, ref, rtol=4 * rtol, atol=rtol)
        return out


def mixed_lens(bs):
    """seq_len 1, exact multiples of block_size, others, and 0, in one batch."""
    return [1, bs, 3 * bs, 37, 0, 2 * bs + 1, 100]


@pytest.mark.parametrize("bs", [1, 16, 256])
@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2)], ids=["G1", "G4", "G8"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_matches_dense(poison, dtype, hq, hkv, d, bs):
    seed = ((FLOATS.index(dtype) * 100 + hq) * 1000 + d) * 1000 + bs
    Case(mixed_lens(bs), hq, hkv, d, bs, dtype, seed=seed).check()


@pytest.mark.parametrize("window", [1, 7, 16, 100])
@pytest.mark.parametrize("bs", [1, 16])
def test_window(poison, window, bs):
    # Blocks wholly before the window are -1 in the table, positions before it NaN.
    lens = [1, 5, 16, 33, 150, 700, 0]
    case = Case(lens, 8, 2, 64, bs, torch.float32, window=window, seed=window * 3 + bs)
    assert (case.tables[5, :(700 - window) // bs] == -1).all()
    case.check()


@pytest.mark.parametrize("dtype", FLOATS + [torch.int8], ids=str)
def test_isa_paths(cpu_isa, poison, dtype):
    for i, (lens, bs, window, d) in enumerate([
        (mixed_lens(16), 16, None, 128),
        ([3, 64, 700], 8, 50, 64),
        ([1300], 16, None, 96),  # B=1: split into partitions and merged
        ([1, 17, 40], 1, None, 72),  # head_dim not a multiple of 16 (nor 8 for AVX2)
    ]):
        Case(lens, 16, 2, d, bs, dtype, window=window, seed=i).check()


@pytest.mark.parametrize("g", [1, 2, 3, 4, 6])
def test_isa_paths_group_widths(cpu_isa, poison, g):
    # Every group width of the vector tiles (query heads per kv head go in groups of 8, 4, 2,
    # 1), with token counts and head dims that leave partial token blocks and chunk blocks.
    for i, (lens, d) in enumerate([([1, 7, 37, 300], 40), ([3, 130], 24), ([77], 120)]):
        Case(lens, 2 * g, 2, d, 16, torch.float32, seed=10 * g + i).check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8], ids=str)
def test_split_and_unsplit_agree(poison, dtype):
    # One long sequence is split into partitions and merged, whatever the thread count; with
    # one thread and eight sequences nothing is split. Both must match the dense result, and
    # the long sequence must come out the same (up to fp32 rounding) either way.
    lens = [3000, 1, 511, 512, 513, 2048, 64, 1000]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        batch = Case(lens, 32, 8, 128, 16, dtype, seed=5)
        whole = batch.check()
    finally:
        torch.set_num_threads(threads)
    for b in (0, 5):
        split = batch.subset(b).check()
        torch.testing.assert_close(split[0], whole[b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 8), (32, 1)], ids=["G1", "G4", "G32"])
def test_int8(poison, hq, hkv):
    # Compared with the dequantized cache in float64; q may be any float dtype.
    case = Case(mixed_lens(16), hq, hkv, 128, 16, torch.int8, seed=hq + hkv)
    case.check()
    for dtype in (torch.float16, torch.bfloat16):
        case.check(case.q.to(dtype))


def test_non_contiguous_q(poison):
    case = Case([5, 40, 0, 300], 16, 4, 64, 16, torch.float32, seed=2)
    views = (torch.randn(64, 4, 16, 2)[..., 0].permute(1, 2, 0),  # no unit stride anywhere
             torch.randn(4, 64, 32)[:, :, ::2].transpose(1, 2))
    for q in views:
        assert q.shape == case.q.shape and not q.is_contiguous()
        torch.testing.assert_close(case.check(q.contiguous()), case.check(q), rtol=0, atol=0)


def test_strided_tables_and_caches(poison):
    # Tables, seq_lens, caches and scales as views with unusual strides (head_dim contiguous).
    for dtype in (torch.float32, torch.int8):
        case = Case([3, 40, 129], 8, 2, 64, 16, dtype, seed=7)
        want = case.check()
        wide = torch.full((case.tables.shape[0], 2 * case.tables.shape[1]), -1, dtype=torch.int32)
        wide[:, ::2] = case.tables
        case.tables = wide[:, ::2]
        case.seq_lens = torch.stack([case.seq_lens, case.seq_lens], 1)[:, 1]
        # Each head followed by a copy of itself: stride(2) is 2 * D (2 for the scales).
        case.k_cache, case.v_cache = (torch.stack([t, t], -2)[..., 0, :]
                                      for t in (case.k_cache, case.v_cache))
        if dtype == torch.int8:
            case.k_scale, case.v_scale = (torch.stack([t, t], -1)[..., 0]
                                          for t in (case.k_scale, case.v_scale))
        assert not case.tables.is_contiguous() and not case.k_cache.is_contiguous()
        torch.testing.assert_close(case.check(), want, rtol=0, atol=0)


def test_q_dtype_differs_from_cache(poison):
    case = Case([9, 70], 8, 2, 64, 16, torch.float16, seed=4)
    case.check(case.q.float(), out_dtype=torch.float32)


def test_zero_lengths_and_empty(poison):
    case = Case([0, 0, 0], 4, 2, 64, 16, torch.float32, seed=1, spare_blocks=2)
    assert torch.equal(case.run(), torch.zeros(3, 4, 64))
    empty = Case([], 4, 2, 64, 16, torch.float32, seed=1, spare_blocks=2)
    assert empty.run().shape == (0, 4, 64)


def test_large_scores_stay_finite(poison):
    # Scores in the hundreds: the online softmax must rescale, never overflow exp. (fp32
    # rounding of such scores alone moves the weights by ~1e-5, hence the looser bound.)
    case = Case([500, 33], 8, 2, 64, 16, torch.float32, seed=9)
    case.scale = 10.0
    out = case.run()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), case.dense64(), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# paged_append


def append_case(n, hkv, d, bs, num_blocks, dtype, gen):
    shape = (num_blocks, bs, hkv, d)
    src_dtype = torch.float32 if dtype == torch.int8 else dtype
    k = torch.randn(n, hkv, d, generator=gen).to(src_dtype)
    v = torch.randn(n, hkv, d, generator=gen).to(src_dtype)
    if dtype == torch.int8:
        caches = [torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen) for _ in "kv"]
        scales = [torch.full(shape[:3], float("nan")) for _ in "kv"]
    else:
        caches = [torch.full(shape, float("nan"), dtype=dtype) for _ in "kv"]
        scales = [None, None]
    return k, v, caches, scales


def assert_same(got, want):
    for g, w in zip(got, want):
        if g is None:
            assert w is None
            continue
        assert g.dtype == w.dtype
        assert torch.equal(g.view(torch.uint8) if g.dtype != torch.int8 else g,
                           w.view(torch.uint8) if w.dtype != torch.int8 else w)


@pytest.mark.parametrize("dtype", FLOATS + [torch.int8], ids=str)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
def test_append_matches_reference(cpu_isa, poison, dtype, slot_dtype):
    gen = torch.Generator().manual_seed(3)
    for n, hkv, d, bs, nb in [(1, 1, 1, 1, 1), (13, 2, 64, 16, 4), (40, 4, 80, 1, 64),
                              (9, 8, 128, 256, 2)]:
        k, v, caches, scales = append_case(n, hkv, d, bs, nb, dtype, gen)
        if dtype == torch.int8 and n > 2:
            k[1] = 0.0  # zero vector: scale 0, zeros
            k[2, 0, 0] = float("inf")  # scale NaN, zeros
            v[2, -1, -1] = float("nan")
        slots = torch.randperm(nb * bs, generator=gen)[:n]
        slots[::3] = -1 - slots[::3]  # padding: skipped
        slots = slots.to(slot_dtype)
        want = [c.clone() for c in caches] + [s if s is None else s.clone() for s in scales]
        reference.paged_append(k, v, want[0], want[1], slots, want[2], want[3])
        assert ops.paged_append(k, v, caches[0], caches[1], slots, scales[0], scales[1]) is None
        assert_same(caches + scales, want)


def test_append_non_contiguous_and_converting_sources(poison):
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(3, 20, 64, 2, generator=gen)
    k, v = base[..., 0].transpose(0, 1), base[..., 1].transpose(0, 1)  # [20, 3, 64], strided
    slots = torch.arange(20, dtype=torch.int64) * 3
    for cache_dtype, src_dtype in [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                   (torch.bfloat16, torch.float16), (torch.int8, torch.bfloat16)]:
        _, _, caches, scales = append_case(20, 3, 64, 16, 4, cache_dtype, gen)
        ks, vs = k.to(src_dtype), v.to(src_dtype)
        want = [c.clone() for c in caches] + [s if s is None else s.clone() for s in scales]
        reference.paged_append(ks, vs, want[0], want[1], slots, want[2], want[3])
        ops.paged_append(ks, vs, caches[0], caches[1], slots, scales[0], scales[1])
        assert_same(caches + scales, want)


# ---------------------------------------------------------------------------------------------
# errors


def test_attention_errors():
    case = Case([20, 5], 8, 2, 64, 16, torch.float32, seed=6)
    args = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, block_tables=case.tables,
                seq_lens=case.seq_lens, scale=0.1, window=0, k_scale=None, v_scale=None)

    def call(**change):
        a = dict(args, **change)
        return ops.paged_attention(a["q"], a["k_cache"], a["v_cache"], a["block_tables"],
                                   a["seq_lens"], a["scale"], a["window"], a["k_scale"],
                                   a["v_scale"])

    bad_table = case.tables.clone()
    bad_table[0, 1] = -1
    far_table = case.tables.clone()
    far_table[1, 0] = case.k_cache.shape[0]
    for change, match in [
        (dict(block_tables=case.tables.long()), r"block_tables must be int32; got Long"),
        (dict(block_tables=case.tables[:1]), r"block_tables must be \[2, max_blocks\]"),
        (dict(seq_lens=case.seq_lens.long()), r"seq_lens must be int32; got Long"),
        (dict(q=case.q.to(torch.int8)), r"q must be float32, float16 or bfloat16; got Char"),
        (dict(q=torch.randn(2, 7, 64)), r"q's head count 7 must be a multiple of k_cache's "
                                        r"num_kv_heads 2"),
        (dict(q=torch.randn(2, 8, 32)), r"q's head_dim \(last dim\) must be k_cache's 64; got 32"),
        (dict(q=case.q[0]), r"q must be 3-d"),
        (dict(v_cache=case.v_cache.half()), r"v_cache must have k_cache's dtype Float; got Half"),
        (dict(k_cache=case.k_cache.double(), v_cache=case.v_cache.double()),
         r"k_cache must be float32, float16, bfloat16 or int8; got Double"),
        (dict(k_cache=torch.zeros(case.k_cache.shape, dtype=torch.int8),
              v_cache=torch.zeros(case.k_cache.shape, dtype=torch.int8)),
         r"int8 caches need k_scale"),
        (dict(k_scale=torch.ones(case.k_cache.shape[:3])), r"k_scale is only for int8 caches"),
        (dict(seq_lens=torch.tensor([20, 49], dtype=torch.int32)),
         r"seq_lens\[1\] must be in \[0, 48\] \(block_tables rows hold 3 blocks of 16 tokens\); "
         r"got 49"),
        (dict(block_tables=bad_table), r"block_tables\[0, 1\] must be in \[0, \d+\).*got -1"),
        (dict(block_tables=far_table), r"block_tables\[1, 0\] must be in \[0, \d+\)"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            call(**change)
    k8 = torch.zeros(case.k_cache.shape, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"int8 caches need v_scale"):
        call(k_cache=k8, v_cache=k8.clone(), k_scale=torch.ones(k8.shape[:3]))
    # A window reads no entry before it: the -1 there is fine.
    windowed = case.tables.clone()
    windowed[0, 0] = -1
    call(block_tables=windowed, window=4)


def test_append_errors_leave_cache_unchanged():
    gen = torch.Generator().manual_seed(2)
    k, v, caches, scales = append_case(4, 2, 64, 16, 3, torch.float32, gen)
    _, _, caches8, scales8 = append_case(4, 2, 64, 16, 3, torch.int8, gen)
    slots = torch.tensor([0, 5, -1, 47])
    before = [t.clone() for t in caches + caches8 + scales8]

    for args, match in [
        ((k, v, *caches, torch.tensor([0, 48, 1, 2]), None, None),
         r"slot_mapping\[1\] must be < 48 \(num_blocks \* block_size\).*got 48"),
        ((k, v, *caches, torch.tensor([0, 1, 2, 10**6], dtype=torch.int32), None, None),
         r"slot_mapping\[3\] must be < 48"),
        ((k, v, *caches, slots.float(), None, None), r"slot_mapping must be int32 or int64"),
        ((k, v, *caches, slots[:3], None, None), r"slot_mapping must have shape \(4,\)"),
        ((k.half(), v.half(), *caches8, slots, scales8[0], None), r"int8 caches need v_scale"),
        ((k, v, *caches8, slots, None, None), r"int8 caches need k_scale"),
        ((k, v, *caches, slots, scales8[0], scales8[1]), r"k_scale is only for int8 caches"),
        ((k[:, :1], v[:, :1], *caches, slots, None, None), r"k must be \[num_tokens, 2, 64\]"),
        ((k.int(), v.int(), *caches, slots, None, None), r"k must be float32, float16 or bfloat16"),
        ((k, v.half(), *caches, slots, None, None), r"v must have k's dtype Float; got Half"),
        ((k, v, caches[0], caches[1].half(), slots, None, None), r"v_cache must have k_cache's "
                                                               r"dtype"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            ops.paged_append(*args)
    after = caches + caches8 + scales8
    for b, a in zip(before, after):
        assert torch.equal(b.view(torch.uint8) if b.is_floating_point() else b,
                           a.view(torch.uint8) if a.is_floating_point() else a)


def test_dense_helper_is_right():
    # The float64 check itself against an independent formulation (one head, no paging).
    case = Case([20], 1, 1, 8, 4, torch.float32, seed=12)
    q = case.q[0, 0].double()
    pos = torch.arange(20)
    blocks = case.tables[0, pos // 4].long()
    k = case.k_cache[blocks, pos % 4, 0].double()
    v = case.v_cache[blocks, pos % 4, 0].double()
    w = [math.exp(float(q @ k[j]) * case.scale) for j in range(20)]
    want = sum(wj * v[j] for j, wj in enumerate(w)) / sum(w)
    torch.testing.assert_close(case.dense64()[0, 0], want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# torch.library: schemas, fake (meta) implementations, torch.compile


def test_append_schema_marks_the_mutated_caches():
    schema = ops.paged_append.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and
               a.alias_info.is_write}
    assert mutated == {"k_cache", "v_cache", "k_scale", "v_scale"}
    assert len(schema.returns) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8], ids=str)
def test_opcheck_append(dtype):
    # opcheck runs the op on real tensors, under FakeTensorMode (the fake must agree with the
    # kernel on what it returns and mutates), and checks the schema's aliasing annotations.
    gen = torch.Generator().manual_seed(11)
    k, v, caches, scales = append_case(7, 2, 64, 16, 3, dtype, gen)
    caches = [c.nan_to_num(0) if c.is_floating_point() else c for c in caches]
    scales = [s if s is None else s.nan_to_num(0) for s in scales]
    for slot_dtype in (torch.int32, torch.int64):
        slots = torch.randperm(48, generator=gen)[:7].to(slot_dtype)
        slots[2] = -1  # padding
        torch.library.opcheck(ops.paged_append.default,
                              (k, v, caches[0], caches[1], slots, scales[0], scales[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8], ids=str)
def test_opcheck_attention(dtype):
    case = Case([5, 40, 0, 17], 8, 2, 64, 16, dtype, seed=13)
    case.k_cache, case.v_cache = (t.nan_to_num(0) if t.is_floating_point() else t
                                  for t in (case.k_cache, case.v_cache))
    if case.k_scale is not None:
        case.k_scale, case.v_scale = case.k_scale.nan_to_num(0), case.v_scale.nan_to_num(0)
    for window in (0, 9):
        torch.library.opcheck(ops.paged_attention.default,
                              (case.q, case.k_cache, case.v_cache, case.tables, case.seq_lens,
                               case.scale, window, case.k_scale, case.v_scale))


def test_append_then_attention_under_torch_compile():
    # The mutation must be visible to the attention that follows it in the compiled graph.
    gen = torch.Generator().manual_seed(14)
    k, v, caches, _ = append_case(6, 2, 64, 16, 2, torch.float32, gen)
    caches = [c.zero_() for c in caches]
    slots = torch.tensor([0, 1, 2, 16, 17, -1], dtype=torch.int32)
    tables = torch.tensor([[0], [1]], dtype=torch.int32)
    lens = torch.tensor([3, 2], dtype=torch.int32)
    q = torch.randn(2, 8, 64, generator=gen)

    def step(k, v, k_cache, v_cache):
        ops.paged_append(k, v, k_cache, v_cache, slots, None, None)
        return ops.paged_attention(q, k_cache, v_cache, tables, lens, 0.125, 0, None, None)

    eager_caches = [c.clone() for c in caches]
    want = step(k, v, *eager_caches)
    got = torch.compile(step, fullgraph=True)(k, v, *caches)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caches, eager_caches, rtol=0, atol=0)
