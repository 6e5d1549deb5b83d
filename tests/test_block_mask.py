"""BlockMask and the pattern builders of frugal.masks.

Every builder's ``to_dense`` is compared with an independent dense definition written here (from
the builder's documented rule, element by element), at odd lengths (Nq != Nk both ways, neither a
multiple of the block) for block sizes 64, 128 and (64, 128), in both alignments. On top: block
classification (full blocks all allowed, skipped blocks empty, bitmask blocks mixed), the kernel
layout (lists agree with the block matrices, ascending, transposed lists are the transpose, bits
rows hold the right bitmask), batch/head broadcasting, ``&`` / ``|`` composition, the converters
(dense, FlexAttention, BSR), error paths, and that building a mask compiles nothing.
"""

import copy
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from frugal import masks, reference
from frugal.block_mask import BAND, BlockMask, _unpack_bits
from frugal.errors import DTypeError, ShapeError

BLOCKS = [64, 128, (64, 128)]
LENGTHS = [(300, 300), (200, 457), (457, 200)]
ALIGNS = ["bottom_right", "top_left"]


# ------------------------------------------------------------------ dense definitions


def positions(nq, nk, align):
    """(p [Nq, 1], k [1, Nk]): each query's aligned position and each key's position."""
    off = nk - nq if align == "bottom_right" else 0
    return torch.arange(nq)[:, None] + off, torch.arange(nk)[None, :]


def sides(window, causal):
    if isinstance(window, int):
        return (window - 1, 0) if causal else (window, window)
    return window[0], 0 if causal else window[1]


def as4d(x):
    while x.dim() < 4:
        x = x[None]
    return x


def dense_strided(nq, nk, align, stride, summary, causal, heads):
    p, k = positions(nq, nk, align)
    out = []
    for h in range(heads or 1):
        j = h % (stride // summary)
        # same chunk: equal chunk starts (floor to a multiple of stride, negative p included)
        local = (p - p.remainder(stride)) == (k - k.remainder(stride))
        r = k.remainder(stride)
        summ = (r >= stride - (j + 1) * summary) & (r < stride - j * summary)
        m = local | summ
        out.append(m & (k <= p) if causal else m)
    return torch.stack(out)[None]


def dense_dilated(nq, nk, align, window, dilation, causal):
    p, k = positions(nq, nk, align)
    left, right = sides(window, causal)
    return as4d((k - p >= -left * dilation) & (k - p <= right * dilation)
                & ((p - k).remainder(dilation) == 0))


def dense_longformer(nq, nk, align, window, tokens, causal):
    p, k = positions(nq, nk, align)
    left, right = sides(window, causal)
    tokens = set(tokens)
    gk = torch.tensor([x in tokens for x in range(nk)])
    gq = torch.tensor([int(x) in tokens for x in p[:, 0]])
    m = ((k >= p - left) & (k <= p + right)) | gk[None, :] | gq[:, None]
    return as4d(m & (k <= p) if causal else m)


def bigbird_fixed_blocks(nq, nk, align, bq, bk, window, num_global):
    """The window and global blocks of masks.bigbird, block by block in Python."""
    off = nk - nq if align == "bottom_right" else 0
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    sel = torch.zeros(nqb, nkb, dtype=torch.bool)
    for qb in range(nqb):
        a0, a1 = qb * bq + off, min(nq, (qb + 1) * bq) - 1 + off
        for kb in range(nkb):
            in_window = a0 // bk - window // 2 <= kb <= a1 // bk + window // 2
            sel[qb, kb] = in_window or kb < num_global or a0 < num_global * bk
    return sel


def upsample(blocks, nq, nk, bq, bk):
    """Block matrix [..., nQB, nKB] -> element mask [..., Nq, Nk]."""
    return blocks.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :nq, :nk]


def cases(nq, nk, block_size, align):
    """(name, mask, dense definition) for every builder, several parameter sets each."""
    p, k = positions(nq, nk, align)
    out = [
        ("full", masks.full(nq, nk, block_size=block_size), as4d(torch.ones(nq, nk).bool())),
        ("causal", masks.causal(nq, nk, block_size=block_size, align=align), as4d(k <= p)),
        ("prefix_lm", masks.prefix_lm(nq, 77, nk, block_size=block_size, align=align),
         as4d((k < 77) | (k <= p))),
    ]
    for window, causal in [(33, True), (100, False), ((5, 140), False), ((130, 9), True)]:
        left, right = sides(window, causal)
        out.append((f"sliding_window{window, causal}",
                    masks.sliding_window(nq, window, nk, causal=causal, block_size=block_size,
                                         align=align),
                    as4d((k >= p - left) & (k <= p + right))))
    gen = torch.Generator().manual_seed(nq * 7 + nk)
    qdoc = torch.sort(torch.randint(0, 4, (2, nq), generator=gen), dim=1).values
    kdoc = torch.sort(torch.randint(0, 4, (2, nk), generator=gen), dim=1).values
    out.append(("document", masks.document(qdoc, kdoc, block_size=block_size),
                (qdoc[:, :, None] == kdoc[:, None, :])[:, None]))
    for stride, summary, causal, heads in [(64, 1, True, None), (100, 7, True, 3),
                                           (256, 32, False, None), (50, 50, True, 2),
                                           (128, 16, True, 8)]:
        out.append((f"strided{stride, summary, causal, heads}",
                    masks.strided(nq, stride, nk, summary=summary, causal=causal, heads=heads,
                                  block_size=block_size, align=align),
                    dense_strided(nq, nk, align, stride, summary, causal, heads)))
    for window, dilation, causal in [(5, 3, True), (40, 2, False), ((10, 3), 4, False),
                                     (7, 1, True)]:
        out.append((f"dilated{window, dilation, causal}",
                    masks.dilated(nq, window, dilation, nk, causal=causal,
                                  block_size=block_size, align=align),
                    dense_dilated(nq, nk, align, window, dilation, causal)))
    for window, tokens, causal in [(16, [0, 5, 129], False), (33, [nk - 1, 64], True),
                                   ((3, 70), [], False), (8, list(range(0, nk, 40)), True)]:
        out.append((f"longformer{window, len(tokens), causal}",
                    masks.longformer(nq, window, tokens, nk, causal=causal,
                                     block_size=block_size, align=align),
                    dense_longformer(nq, nk, align, window, tokens, causal)))
    return out


# ------------------------------------------------------------------ invariants


def element_blocks(dense, bq, bk, fill=False):
    """[..., Nq, Nk] -> [..., nQB, nKB, BQ, BK], padded with ``fill``."""
    nq, nk = dense.shape[-2:]
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    x = torch.nn.functional.pad(dense, (0, nkb * bk - nk, 0, nqb * bq - nq), value=fill)
    x = x.view(*dense.shape[:-2], nqb, bq, nkb, bk)
    return x.transpose(-3, -2)


def lists_to_matrix(num, idx, width):
    valid = torch.arange(idx.shape[-1]) < num[..., None].long()
    out = torch.zeros(*idx.shape[:-1], width + 1, dtype=torch.bool)
    return out.scatter_(-1, torch.where(valid, idx.long(), width), True)[..., :width]


def check_lists(num, idx, matrix):
    assert num.dtype == torch.int32 and idx.dtype == torch.int32
    assert torch.equal(num, matrix.sum(-1, dtype=torch.int32))
    assert torch.equal(lists_to_matrix(num, idx, matrix.shape[-1]), matrix)
    valid = torch.arange(idx.shape[-1]) < num[..., None].long()
    assert (idx[~valid] == 0).all(), "entries past the count must be 0"
    pairs = valid[..., 1:]
    assert (idx[..., 1:][pairs] > idx[..., :-1][pairs]).all(), "lists must ascend"


def check_bits(num, idx, bits_rows, bits, elem, inb, transposed):
    """Each listed partial block's bits row holds its exact elements (in bounds); ``elem``
    [B, Hq, nQB, nKB, BQ, BK] the mask's elements by block, ``inb`` which are in bounds."""
    valid = torch.arange(idx.shape[-1]) < num[..., None].long()
    where = valid.nonzero()
    b, h, a = where[:, 0], where[:, 1], where[:, 2]
    other = idx[tuple(where.t())].long()
    qb, kb = (other, a) if transposed else (a, other)
    rows = bits_rows[tuple(where.t())].long()
    assert (rows >= 0).all() and (rows < bits.shape[0]).all()
    got = _unpack_bits(bits[rows], elem.shape[-1])
    assert torch.equal(got & inb[qb, kb], elem[b, h, qb, kb])


def check_mask(m, dense, B=None, Hq=None):
    """to_dense equals ``dense``, and every structural invariant of the mask holds; the layout
    is checked for a call with batch ``B`` and ``Hq`` heads (default: the mask's own dims, or
    2 and 4 where it broadcasts)."""
    B = B or (m.shape[0] if m.shape[0] > 1 else 2)
    Hq = Hq or (m.shape[1] if m.shape[1] > 1 else 4)
    nq, nk = m.seq_lens
    bq, bk = m.block_size
    got = m.to_dense()
    assert got.dtype == torch.bool and got.shape == m.shape
    assert m.shape[:2] == tuple(dense.shape[:2]), (m.shape, dense.shape)
    assert torch.equal(got, dense.expand(m.shape)), "to_dense differs from the definition"

    full, part = m._full, m._partial
    assert full.dtype == torch.bool and part.shape == full.shape
    assert full.shape[2:] == (-(-nq // bq), -(-nk // bk))
    assert not (full & part).any(), "a block is both full and partial"
    cells = element_blocks(got, bq, bk)
    inb = element_blocks(torch.ones(nq, nk, dtype=torch.bool), bq, bk)
    cnt = cells.sum((-1, -2))
    area = inb.sum((-1, -2)).expand(cnt.shape)
    assert torch.equal(cnt[full], area[full]), "a full block has a disallowed element"
    assert (cnt[~(full | part)] == 0).all(), "a skipped block has an allowed element"
    if m.has_bits or m.flags == BAND:
        assert ((cnt[part] > 0) & (cnt[part] < area[part])).all(), "partial block not mixed"
    # density: the visited fraction of the in-bounds score matrix
    visited = (full | part).expand(cnt.shape)
    want = float((area * visited).sum()) / (m.shape[0] * m.shape[1] * nq * nk)
    assert m.density() == pytest.approx(want, rel=1e-12)
    assert m.sparsity() == pytest.approx(1 - want, rel=1e-12)

    # the kernels' layout, broadcast to the call's (B, Hq)
    lay = m.layout(B, Hq)
    assert (lay.Nq, lay.Nk, lay.BQ, lay.BK, lay.flags) == (nq, nk, bq, bk, m.flags)
    big = (B, Hq) + full.shape[2:]
    f, p = full.expand(big), part.expand(big)
    check_lists(lay.full_num, lay.full_idx, f)
    check_lists(lay.kv_num, lay.kv_idx, p)
    check_lists(lay.full_q_num, lay.full_q_idx, f.transpose(-1, -2))
    check_lists(lay.q_num, lay.q_idx, p.transpose(-1, -2))
    if m.has_bits:
        assert lay.bits.dtype == torch.int32 and lay.bits.shape[1:] == (bq, bk // 32)
        elem = element_blocks(got.expand(B, Hq, nq, nk), bq, bk)
        check_bits(lay.kv_num, lay.kv_idx, lay.kv_bits, lay.bits, elem, inb, False)
        check_bits(lay.q_num, lay.q_idx, lay.q_bits, lay.bits, elem, inb, True)
    if m.flags & 4:  # document ids
        assert lay.q_doc.shape == (B, nq) and lay.kv_doc.shape == (B, nk)


# ------------------------------------------------------------------ builders


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("block_size", BLOCKS, ids=str)
@pytest.mark.parametrize("nq,nk", LENGTHS)
def test_builders_exact(nq, nk, block_size, align):
    for name, m, dense in cases(nq, nk, block_size, align):
        try:
            check_mask(m, dense)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("block_size", BLOCKS + [(128, 64)], ids=str)
@pytest.mark.parametrize("nq,nk", LENGTHS + [(1, 130)])
def test_bigbird(nq, nk, block_size, align):
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    nkb = -(-nk // bk)
    for window, g, r, heads in [(3, 1, 2, None), (1, 0, 1, 3), (5, 2, 0, None),
                                (3, 1, 50, 2)]:
        m = masks.bigbird(nq, window, g, r, nk, seed=11, heads=heads, block_size=block_size,
                          align=align)
        fixed = bigbird_fixed_blocks(nq, nk, align, bq, bk, window, g)
        assert m.shape == (1, heads or 1, nq, nk)
        assert not m._partial.any() and not m.has_bits, "bigbird has only full blocks"
        blocks = m._full[0]
        assert (blocks >= fixed).all(), "a window or global block is missing"
        extra = (blocks & ~fixed).sum(-1)
        want = torch.clamp((~fixed).sum(-1), max=r).expand(extra.shape)
        assert torch.equal(extra, want), "wrong number of random blocks per q-block"
        check_mask(m, upsample(blocks, nq, nk, bq, bk)[None])
        again = masks.bigbird(nq, window, g, r, nk, seed=11, heads=heads,
                              block_size=block_size, align=align)
        assert torch.equal(again._full, m._full), "same seed, different mask"
        assert nkb >= 1
    # another seed draws other blocks; heads draw independently
    a = masks.bigbird(2000, 3, 1, 3, seed=1, heads=4, block_size=64)
    b = masks.bigbird(2000, 3, 1, 3, seed=2, heads=4, block_size=64)
    assert not torch.equal(a._full, b._full)
    assert not torch.equal(a._full[:, 0], a._full[:, 1])


def test_builder_patterns_are_what_the_papers_draw():
    """Spot checks of the documented definitions on a tiny grid."""
    # strided, stride 4, summary 1, causal: row 9 sees its chunk 8..9 and keys 3, 7
    d = masks.strided(12, 4, block_size=64).to_dense()[0, 0]
    assert d[9].nonzero().flatten().tolist() == [3, 7, 8, 9]
    # dilated: window 3 with dilation 2 -> p, p - 2, p - 4
    d = masks.dilated(12, 3, 2, block_size=64).to_dense()[0, 0]
    assert d[10].nonzero().flatten().tolist() == [6, 8, 10]
    # longformer: global token 0 sees all, and is seen by all
    d = masks.longformer(12, 1, [0], block_size=64).to_dense()[0, 0]
    assert d[0].all() and d[:, 0].all() and d[6].nonzero().flatten().tolist() == [0, 5, 6, 7]


def test_large_masks_share_bitmasks():
    """Partial blocks with the same pattern share one bits row, so big masks stay small."""
    n = 16384
    m = masks.strided(n, 1024, summary=32)
    full, partial = m.counts()
    assert partial > 1000 and m._bits.shape[0] <= 8
    m = masks.longformer(n, 256, list(range(0, n, 2048)))
    assert m.counts()[1] > 500 and m._bits.shape[0] <= 16
    m = masks.dilated(n, 256, 4)
    assert m.counts()[1] > 500 and m._bits.shape[0] <= 16
    # and they are still exact at this size (checked on a window of rows)
    d = m.to_dense()[0, 0, 5000:5200]
    p = torch.arange(5000, 5200)[:, None]
    k = torch.arange(n)[None, :]
    assert torch.equal(d, (k <= p) & (k >= p - 255 * 4) & ((p - k) % 4 == 0))


# ------------------------------------------------------------------ composition


def small_masks(nq, nk, bs):
    """Masks of every builder for composition, with broadcast batch/head dims."""
    gen = torch.Generator().manual_seed(3)
    doc = torch.sort(torch.randint(0, 3, (2, nq), generator=gen), dim=1).values
    kdoc = torch.sort(torch.randint(0, 3, (2, nk), generator=gen), dim=1).values
    dense = torch.rand(1, 3, nq, nk, generator=gen) < 0.3
    return {
        "causal": masks.causal(nq, nk, block_size=bs),
        "window": masks.sliding_window(nq, (40, 20), nk, causal=False, block_size=bs),
        "document": masks.document(doc, kdoc, block_size=bs),
        "prefix": masks.prefix_lm(nq, 50, nk, block_size=bs),
        "strided": masks.strided(nq, 96, nk, summary=8, heads=3, block_size=bs),
        "dilated": masks.dilated(nq, 20, 3, nk, causal=False, block_size=bs),
        "longformer": masks.longformer(nq, 10, [3, 150], nk, block_size=bs),
        "bigbird": masks.bigbird(nq, 1, 1, 1, nk, seed=5, heads=3, block_size=bs),
        "dense": BlockMask.from_dense(dense, block_size=bs),
    }


@pytest.mark.parametrize("nq,nk", [(200, 333), (333, 200)])
def test_compose_every_pair(nq, nk):
    ms = small_masks(nq, nk, (64, 128))
    dn = {k: m.to_dense() for k, m in ms.items()}
    for (a, ma), (b, mb) in itertools.combinations_with_replacement(ms.items(), 2):
        for op in ("&", "|"):
            got = (ma & mb) if op == "&" else (ma | mb)
            want = (dn[a] & dn[b]) if op == "&" else (dn[a] | dn[b])
            try:
                check_mask(got, want)
            except AssertionError as e:
                raise AssertionError(f"{a} {op} {b}: {e}") from e


@st.composite
def composed(draw):
    nq = draw(st.integers(1, 260))
    nk = draw(st.integers(1, 260))
    bs = draw(st.sampled_from(BLOCKS))
    align = draw(st.sampled_from(ALIGNS))
    seed = draw(st.integers(0, 2 ** 16))
    p, k = positions(nq, nk, align)

    def leaf():
        kind = draw(st.sampled_from(["causal", "window", "strided", "dilated", "longformer",
                                     "bigbird", "dense", "document"]))
        if kind == "causal":
            return masks.causal(nq, nk, block_size=bs, align=align), as4d(k <= p)
        if kind == "window":
            left, right = draw(st.integers(0, 300)), draw(st.integers(0, 300))
            return (masks.sliding_window(nq, (left, right), nk, causal=False, block_size=bs,
                                         align=align),
                    as4d((k >= p - left) & (k <= p + right)))
        if kind == "strided":
            s = draw(st.integers(1, 200))
            c = draw(st.integers(1, s))
            return (masks.strided(nq, s, nk, summary=c, block_size=bs, align=align),
                    dense_strided(nq, nk, align, s, c, True, None))
        if kind == "dilated":
            w, dil = draw(st.integers(1, 60)), draw(st.integers(1, 5))
            return (masks.dilated(nq, w, dil, nk, causal=False, block_size=bs, align=align),
                    dense_dilated(nq, nk, align, w, dil, False))
        if kind == "longformer":
            tokens = draw(st.lists(st.integers(0, nk - 1), max_size=4))
            w = draw(st.integers(1, 50))
            return (masks.longformer(nq, w, tokens, nk, block_size=bs, align=align),
                    dense_longformer(nq, nk, align, w, tokens, False))
        if kind == "bigbird":
            m = masks.bigbird(nq, 1, 1, 1, nk, seed=seed, block_size=bs, align=align)
            return m, m.to_dense()  # its random part is checked in test_bigbird
        if kind == "document":
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, 3, (nq,), generator=g)
            kids = torch.randint(0, 3, (nk,), generator=g)
            return (masks.document(ids, kids, block_size=bs),
                    as4d(ids[:, None] == kids[None, :]))
        g = torch.Generator().manual_seed(seed)
        d = torch.rand(nq, nk, generator=g) < 0.5
        return BlockMask.from_dense(d, block_size=bs), as4d(d)

    m, d = leaf()
    for _ in range(draw(st.integers(1, 2))):
        m2, d2 = leaf()
        if draw(st.booleans()):
            m, d = m & m2, d & d2
        else:
            m, d = m | m2, d | d2
    return m, d


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(composed())
def test_random_composition(case):
    m, d = case
    check_mask(m, d)


# ------------------------------------------------------------------ converters


def test_dense_round_trip():
    gen = torch.Generator().manual_seed(1)
    for nq, nk, bs in [(257, 130, 64), (100, 300, (64, 128)), (65, 65, 128)]:
        d = torch.rand(2, 3, nq, nk, generator=gen) < 0.2
        d[..., 5:70, 0:64] = True  # some full blocks too
        m = BlockMask.from_dense(d, block_size=bs)
        check_mask(m, d)
        check_mask(BlockMask.from_dense(m.to_dense(), block_size=bs), d)
        mm = BlockMask.from_mask_mod(lambda b, h, q, k: d[b, h, q, k], 2, 3, nq, nk,
                                     block_size=bs)
        check_mask(mm, d)


def bsr_cases():
    gen = torch.Generator().manual_seed(2)
    doc = torch.randint(0, 3, (2, 300), generator=gen)
    return [masks.causal(300, 457, block_size=64),
            masks.strided(300, 100, 457, summary=7, heads=2, block_size=(64, 128)),
            masks.document(doc, block_size=128) & masks.causal(300, block_size=128),
            masks.bigbird(300, 3, 1, 2, 457, seed=4, heads=3, block_size=64),
            masks.longformer(457, 20, [7, 150], 200, causal=True, block_size=(128, 64))]


@pytest.mark.parametrize("i", range(5))
def test_bsr_round_trip(i):
    m = bsr_cases()[i]
    bq, bk = m.block_size
    nq, nk = m.seq_lens
    bsr = m.to_bsr(block_masks=True)
    bm, hm, nqb, nkb = m._full.shape
    visited = m._full | m._partial
    assert bsr.indptr.dtype == torch.int32 and bsr.indptr.shape == (bm, hm, nqb + 1)
    assert bsr.indices.dtype == torch.int32 and bsr.is_full.dtype == torch.bool
    assert int(bsr.indptr[0, 0, 0]) == 0 and int(bsr.indptr[-1, -1, -1]) == len(bsr.indices)
    assert torch.equal(bsr.indptr.diff(dim=-1), visited.sum(-1, dtype=torch.int32))
    # each row's indices are its visited blocks, ascending, flagged full as the mask says
    for b, h, qb in itertools.product(range(bm), range(hm), range(nqb)):
        s, e = int(bsr.indptr[b, h, qb]), int(bsr.indptr[b, h, qb + 1])
        assert bsr.indices[s:e].tolist() == visited[b, h, qb].nonzero().flatten().tolist()
        assert torch.equal(bsr.is_full[s:e], m._full[b, h, qb][bsr.indices[s:e].long()])
    # block_mask holds each listed block's exact elements
    dense = m.to_dense()
    where = visited.nonzero()
    cells = element_blocks(dense, bq, bk)[tuple(where.t())]
    assert torch.equal(bsr.block_mask, cells)
    assert bsr.block_mask[bsr.is_full].sum() == element_blocks(
        torch.ones(nq, nk, dtype=torch.bool), bq, bk).expand(*visited.shape, bq, bk)[
        tuple(where.t())][bsr.is_full].sum()
    # round trips: with block masks exact, without them every listed block full
    back = BlockMask.from_bsr(bsr.indptr, bsr.indices, m.seq_lens, m.block_size,
                              block_mask=bsr.block_mask)
    check_mask(back, dense)
    coarse = BlockMask.from_bsr(bsr.indptr, bsr.indices, m.seq_lens, m.block_size)
    check_mask(coarse, upsample(visited, nq, nk, bq, bk))
    if bm == hm == 1:  # FlashInfer's single-matrix form: 1-d indptr
        flat = BlockMask.from_bsr(bsr.indptr[0, 0], bsr.indices, m.seq_lens, m.block_size,
                                  block_mask=bsr.block_mask)
        check_mask(flat, dense)


def test_from_bsr_unsorted_and_partial_rows():
    # q-block 0 lists kv-blocks 2, 0 (unsorted), q-block 1 nothing, q-block 2 block 1
    indptr = torch.tensor([0, 2, 2, 3])
    indices = torch.tensor([2, 0, 1])
    m = BlockMask.from_bsr(indptr, indices, (150, 140), 64)
    want = torch.zeros(3, 3, dtype=torch.bool)
    want[0, 2] = want[0, 0] = want[2, 1] = True
    check_mask(m, upsample(want, 150, 140, 64, 64)[None, None])


@pytest.mark.parametrize("i", range(5))
def test_flex_round_trip(i):
    m = bsr_cases()[i]
    nq, nk = m.seq_lens
    bm, hm = m.shape[:2]
    f = m.to_flex()
    assert isinstance(f, FlexBlockMask)
    assert tuple(f.BLOCK_SIZE) == m.block_size and tuple(f.seq_lengths) == m.seq_lens
    assert torch.equal(f.to_dense().bool(), m._full | m._partial)
    assert torch.equal(lists_to_matrix(f.full_kv_num_blocks, f.full_kv_indices,
                                       m.num_blocks[1]), m._full)
    dense = m.to_dense()
    assert torch.equal(create_mask(f.mask_mod, bm, hm, nq, nk, device="cpu"), dense)
    check_mask(BlockMask.from_flex(f), dense)


def test_from_flex_create_block_mask():
    def mod(b, h, q, k):
        return ((q >= k) & ((q - k) % 3 != 1)) | (k < 5) | (h == 1)

    for bs in (64, (128, 64)):
        f = create_block_mask(mod, 2, 2, 300, 457, device="cpu", BLOCK_SIZE=bs)
        m = BlockMask.from_flex(f)
        check_mask(m, create_mask(mod, 2, 2, 300, 457, device="cpu"))

    def scalar_only(b, h, q, k):  # works per element only (torch.vmap path)
        return torch.where(q >= k, torch.tensor(True), torch.tensor(False)).reshape(())

    f = create_block_mask(scalar_only, None, None, 130, 130, device="cpu", BLOCK_SIZE=64)
    check_mask(BlockMask.from_flex(f), create_mask(scalar_only, 1, 1, 130, 130, device="cpu"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_agrees_with_reference():
    from torch.nn.attention.flex_attention import flex_attention

    m = masks.strided(200, 70, 333, summary=9, heads=2, block_size=(64, 128))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 200, 32, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 333, 32, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 333, 32, generator=gen, dtype=torch.float64)
    out = flex_attention(q, k, v, block_mask=m.to_flex())
    ref, _ = reference.sparse_attention(q, k, v, m)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ broadcasting, repr


def test_broadcasting():
    gen = torch.Generator().manual_seed(5)
    doc = torch.randint(0, 3, (3, 200), generator=gen)  # batch 3, heads broadcast
    heads = masks.strided(200, 64, summary=4, heads=4, block_size=64)  # heads 4, batch 1
    m = masks.document(doc, block_size=64) & heads
    assert m.shape == (3, 4, 200, 200)
    want = (doc[:, None, :, None] == doc[:, None, None, :]) & heads.to_dense()
    check_mask(m, want, B=3, Hq=4)
    lay = masks.causal(200, block_size=64).layout(5, 7)
    assert lay.full_idx.shape[:2] == (5, 7) and lay.full_idx.stride(0) == 0
    with pytest.raises(ShapeError, match="batch"):
        m.layout(2, 4)
    with pytest.raises(ShapeError, match="head"):
        m.layout(3, 8)


def test_repr_and_density():
    m = masks.sliding_window(1000, 256, block_size=128)
    text = repr(m)
    assert "shape=(1, 1, 1000, 1000)" in text and "block_size=(128, 128)" in text
    assert "density=" in text and "band" in text
    assert len(text.splitlines()) == 1 + 8  # one line per q-block
    assert "bitmask" in repr(masks.strided(1000, 256, summary=8))
    heads = repr(masks.bigbird(600, heads=2))
    assert "shape=(1, 2, 600, 600)" in heads and "batch 0, head 0" in heads
    assert 0 < m.density() < 1 and m.sparsity() == pytest.approx(1 - m.density())
    assert masks.full(130, 70).density() == 1.0


# ------------------------------------------------------------------ errors


def test_errors():
    with pytest.raises(ShapeError, match="block_size"):
        masks.strided(100, 10, block_size=32)
    with pytest.raises(ShapeError, match="block_size"):
        masks.bigbird(100, block_size=(64, 256))
    with pytest.raises(ShapeError, match="nq"):
        masks.longformer(0, 4, [])
    with pytest.raises(ShapeError, match="stride"):
        masks.strided(100, 0)
    with pytest.raises(ShapeError, match="summary"):
        masks.strided(100, 8, summary=9)
    with pytest.raises(ShapeError, match="heads"):
        masks.strided(100, 8, heads=0)
    with pytest.raises(ShapeError, match="dilation"):
        masks.dilated(100, 8, 0)
    with pytest.raises(ShapeError, match="window"):
        masks.dilated(100, -1, 2)
    with pytest.raises(ShapeError, match="window"):
        masks.longformer(100, (1, -2), [])
    with pytest.raises(ShapeError, match="global_tokens"):
        masks.longformer(100, 4, [100])
    with pytest.raises(DTypeError, match="global_tokens"):
        masks.longformer(100, 4, torch.tensor([1.0]))
    with pytest.raises(DTypeError, match="global_tokens"):
        masks.longformer(100, 4, [1.5])
    with pytest.raises(ShapeError, match="window"):
        masks.bigbird(100, window=2)
    with pytest.raises(ShapeError, match="num_random"):
        masks.bigbird(100, num_random=-1)
    with pytest.raises(TypeError, match="seed"):
        masks.bigbird(100, seed=1.5)
    with pytest.raises(ValueError, match="align"):
        masks.strided(100, 8, align="center")
    # composing masks of different lengths / block sizes
    with pytest.raises(ShapeError, match=r"\(Nq, Nk\)"):
        masks.strided(100, 8) & masks.causal(101)
    with pytest.raises(ShapeError, match="block_size"):
        masks.longformer(100, 4, [1]) | masks.causal(100, block_size=64)
    with pytest.raises(ShapeError, match="head"):
        masks.strided(100, 8, heads=2) & masks.bigbird(100, heads=3)
    # dense and document inputs
    with pytest.raises(DTypeError, match="mask"):
        BlockMask.from_dense(torch.ones(10, 10, dtype=torch.int32))
    with pytest.raises(DTypeError, match="doc_ids"):
        masks.document(torch.tensor([0.0, 1.0]))


def test_bsr_and_flex_errors():
    ok_ptr, ok_idx = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    BlockMask.from_bsr(ok_ptr, ok_idx, (100, 100), 64)
    with pytest.raises(DTypeError, match="indptr"):
        BlockMask.from_bsr(ok_ptr.float(), ok_idx, (100, 100), 64)
    with pytest.raises(DTypeError, match="indices"):
        BlockMask.from_bsr(ok_ptr, ok_idx.float(), (100, 100), 64)
    with pytest.raises(ShapeError, match="indptr"):
        BlockMask.from_bsr(ok_ptr, ok_idx, (200, 100), 64)  # wrong number of q-blocks
    with pytest.raises(ShapeError, match="indptr"):
        BlockMask.from_bsr(torch.tensor([0, 2, 1]), ok_idx, (100, 100), 64)
    with pytest.raises(ShapeError, match="indptr"):
        BlockMask.from_bsr(torch.tensor([0, 1, 3]), ok_idx, (100, 100), 64)
    with pytest.raises(ShapeError, match="indices"):
        BlockMask.from_bsr(ok_ptr, torch.tensor([0, 2]), (100, 100), 64)
    with pytest.raises(ShapeError, match="twice"):
        BlockMask.from_bsr(torch.tensor([0, 2, 2]), torch.tensor([1, 1]), (100, 100), 64)
    with pytest.raises(ShapeError, match="block_size"):
        BlockMask.from_bsr(ok_ptr, ok_idx, (100, 100), 48)
    with pytest.raises(ShapeError, match="seq_lens"):
        BlockMask.from_bsr(ok_ptr, ok_idx, (100, 0), 64)
    with pytest.raises(ShapeError, match="block_mask"):
        BlockMask.from_bsr(ok_ptr, ok_idx, (100, 100), 64,
                           block_mask=torch.ones(2, 64, 32, dtype=torch.bool))
    with pytest.raises(DTypeError, match="block_mask"):
        BlockMask.from_bsr(ok_ptr, ok_idx, (100, 100), 64,
                           block_mask=torch.ones(2, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="flex_mask"):
        BlockMask.from_flex(masks.causal(100))
    f = create_block_mask(lambda b, h, q, k: q >= k, None, None, 100, 100, device="cpu",
                          BLOCK_SIZE=32)
    with pytest.raises(ShapeError, match="block_size"):
        BlockMask.from_flex(f)


# ------------------------------------------------------------------ nothing compiles


def test_building_compiles_nothing(tmp_path, monkeypatch):
    """Builders and layouts are plain tensor ops: no dynamo frame, no Triton cache entry."""
    import torch._dynamo.utils as dyn

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    before = copy.deepcopy(dict(dyn.counters))
    n = 8192
    built = [masks.causal(n), masks.sliding_window(n, 1024), masks.strided(n, 512, summary=16),
             masks.dilated(n, 256, 2), masks.longformer(n, 128, [0, 4000]),
             masks.bigbird(n, seed=0), masks.document(torch.arange(n) // 1000) & masks.causal(n),
             masks.prefix_lm(n, 100) | masks.sliding_window(n, 64)]
    for m in built:
        m.layout(1, 8)
    assert dict(dyn.counters) == before
    assert not any(tmp_path.iterdir())
