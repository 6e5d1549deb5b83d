"""The C++ CPU block-sparse attention ops (csrc/cpu/sparse_attention.cpp), called directly through
torch.ops.frugal and through frugal.sparse_attention(backend="cpu"), on every CPU ISA path.

Two sources of layouts: the mask builders (frugal.masks, BlockMask), and layouts assembled here by
hand from docs/block_mask_format.md, so that every combination of element-rule flags (band,
prefix, document ids, bitmask: combinations the builders never emit, since they fold mixed rules
into a bitmask) is exercised, with blocks listed as partial that could be full or skipped,
per-head lists, and stride-0 broadcast views.

Accuracy rule (FlashAttention's): the max error against a float64 reference is at most twice the
error of a plain PyTorch implementation in the same precision, plus a tiny floor. Outputs are
poisoned (NaN) before each call."""

import dataclasses
import pathlib
import re

import pytest
import torch

import frugal
from frugal import _ext, masks, reference
from frugal.block_mask import SparseLayout

pytestmark = pytest.mark.skipif(
    _ext.ext() is None or not hasattr(torch.ops.frugal, "sparse_attention_fwd"),
    reason="frugal._C has no sparse_attention kernels",
)

ops = torch.ops.frugal
INF = 2**30
BAND, PREFIX, DOC, BITS = 1, 2, 4, 8
# Every meaningful combination (prefix only exists beside a band).
FLAG_COMBOS = [f for f in range(16) if not (f & PREFIX) or (f & BAND)]
FLOOR = {torch.float32: 2e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


# --------------------------------------------------------------------------- layouts by hand


def _rule_mask(B, Nq, Nk, flags, lo, hi, prefix, q_doc, kv_doc, dense_bits):
    """Element rule of the format doc, as a bool [B, H|1, Nq, Nk]."""
    q = torch.arange(Nq)[:, None]
    k = torch.arange(Nk)[None, :]
    allowed = torch.ones(B, 1, Nq, Nk, dtype=torch.bool)
    if flags & BAND:
        band = (q + lo <= k) & (k <= q + hi)
        if flags & PREFIX:
            band = band | (k < prefix)
        allowed = allowed & band
    if flags & DOC:
        allowed = allowed & (q_doc[:, None, :, None] == kv_doc[:, None, None, :])
    if flags & BITS:
        allowed = allowed & dense_bits
    return allowed


def _lists(status, kind, bits_rows=None):
    """Per-row lists of the column indices whose status is `kind`: (num, idx[, bits]) padded."""
    B, H, R, C = status.shape
    sel = status == kind
    num = sel.sum(-1).to(torch.int32)
    width = max(int(num.max()) if num.numel() else 0, 1) + 1  # one spare column of padding
    idx = torch.zeros(B, H, R, width, dtype=torch.int32)
    rows = torch.zeros(B, H, R, width, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for r in range(R):
                cols = sel[b, h, r].nonzero().flatten()
                idx[b, h, r, : len(cols)] = cols.to(torch.int32)
                if bits_rows is not None:
                    rows[b, h, r, : len(cols)] = bits_rows[b, h, r, cols]
    return num, idx, rows


def hand_layout(B, Hq, Nq, Nk, BQ, BK, flags, seed, per_head=False):
    """A SparseLayout and its dense bool mask [B, Hq|1, Nq, Nk], assembled from the format doc.

    Blocks with no allowed element are skipped (a few are listed as partial anyway), blocks with
    every element allowed are full (a few are listed as partial), the rest partial. With
    per_head=False the lists are built once and broadcast to [B, Hq] by stride-0 views."""
    gen = torch.Generator().manual_seed(seed)

    def rint(a, b):
        return int(torch.randint(a, b + 1, (), generator=gen))

    lo = rint(-Nk // 2, 0) if rint(0, 3) else -INF
    hi = rint(Nk - Nq - BK, Nk - Nq + BK) if rint(0, 3) else INF
    prefix = rint(0, Nk // 2)
    # Sorted document ids; key ids skip one value, so its queries have no key (empty rows).
    q_doc = torch.randint(0, 4, (B, Nq), generator=gen).sort(-1).values.to(torch.int32)
    kv_doc = torch.randint(0, 4, (B, Nk), generator=gen).sort(-1).values.to(torch.int32)
    kv_doc[kv_doc == 2] = 3
    Hm = Hq if per_head else 1
    Bm = B if (per_head or flags & DOC) else 1  # lists differ per batch only with doc ids
    dense_bits = torch.rand(Bm, Hm, Nq, Nk, generator=gen) < 0.6
    dense = _rule_mask(B, Nq, Nk, flags, lo, hi, prefix, q_doc, kv_doc, dense_bits)
    dense = dense.expand(B, Hm, Nq, Nk)
    nQB, nKB = -(-Nq // BQ), -(-Nk // BK)
    allowed = torch.zeros(Bm, Hm, nQB * BQ, nKB * BK, dtype=torch.bool)
    inb = torch.zeros_like(allowed)
    allowed[..., :Nq, :Nk] = dense[:Bm]
    inb[..., :Nq, :Nk] = True
    n_allowed = allowed.view(Bm, Hm, nQB, BQ, nKB, BK).sum((3, 5))
    n_inb = inb.view(Bm, Hm, nQB, BQ, nKB, BK).sum((3, 5))
    # 0 skipped, 1 partial, 2 full; a quarter of the others listed as partial anyway
    status = torch.where(n_allowed == 0, 0, torch.where(n_allowed == n_inb, 2, 1))
    coin = torch.rand(status.shape, generator=gen)
    status = torch.where((status != 1) & (coin < 0.25), 1, status)
    if not flags:
        status = torch.where(status == 0, 0, 2)  # no rule: a partial block would be unmasked
    # One bitmask row per partial block, from the bitmask alone (the kernel ANDs the rules).
    bits_rows = torch.zeros(status.shape, dtype=torch.int32)
    padded_bits = torch.zeros(Bm, Hm, nQB * BQ, nKB * BK, dtype=torch.bool)
    padded_bits[..., :Nq, :Nk] = dense_bits
    rows = []
    for b, h, i, j in (status == 1).nonzero().tolist():
        bits_rows[b, h, i, j] = len(rows)
        if not flags & BITS:
            rows.append(None)
            continue
        tile = padded_bits[b, h, i * BQ:(i + 1) * BQ, j * BK:(j + 1) * BK]
        words = (tile.reshape(BQ, BK // 32, 32).long() << torch.arange(32)).sum(-1)
        rows.append(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))
    if flags & BITS and rows:
        bits = torch.stack(rows)
    else:
        bits = torch.zeros(1, 1, 1, dtype=torch.int32)
    kv_num, kv_idx, kv_bits = _lists(status, 1, bits_rows)
    full_num, full_idx, _ = _lists(status, 2)
    st = status.transpose(-1, -2)
    q_num, q_idx, q_bits = _lists(st, 1, bits_rows.transpose(-1, -2))
    full_q_num, full_q_idx, _ = _lists(st, 2)

    def bh(x):
        return x.expand(B, Hq, *x.shape[2:])

    layout = SparseLayout(
        Nq=Nq, Nk=Nk, BQ=BQ, BK=BK, flags=flags, lo=lo, hi=hi, prefix=prefix,
        kv_num=bh(kv_num), kv_idx=bh(kv_idx), kv_bits=bh(kv_bits), full_num=bh(full_num),
        full_idx=bh(full_idx), q_num=bh(q_num), q_idx=bh(q_idx), q_bits=bh(q_bits),
        full_q_num=bh(full_q_num), full_q_idx=bh(full_q_idx),
        q_doc=q_doc if flags & DOC else torch.zeros(1, 1, dtype=torch.int32).expand(B, 1),
        kv_doc=kv_doc if flags & DOC else torch.zeros(1, 1, dtype=torch.int32).expand(B, 1),
        bits=bits,
    )
    return layout, dense


# --------------------------------------------------------------------------- helpers


def inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    dout = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    return q, k, v, dout


def fwd(q, k, v, layout, scale):
    return ops.sparse_attention_fwd(q, k, v, *layout.op_args(), scale)


def bwd(dout, q, k, v, out, lse, layout, scale):
    return ops.sparse_attention_bwd(dout, q, k, v, out, lse, *layout.op_args(), scale)


def max_err(x, ref):
    x, ref = x.double(), ref.double()
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(x)), "finite / infinite entries differ"
    assert torch.equal(x[~fin], ref[~fin])
    return (x[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def assert_accurate(got, ref64, plain, dtype, what):
    err, base = max_err(got, ref64), max_err(plain, ref64)
    assert err <= 2 * base + FLOOR[dtype], f"{what}: error {err:.3g} > 2 x {base:.3g} + floor"


class _Dense:
    """A bool mask for reference.sparse_attention, which takes anything with a to_dense(device)
    for a BlockMask (a bool tensor has a to_dense of another signature)."""

    def __init__(self, mask):
        self.mask = mask

    def to_dense(self, device="cpu"):
        return self.mask.to(device)


def as_mask(mask):
    return _Dense(mask) if isinstance(mask, torch.Tensor) else mask


def check_forward(q, k, v, mask, layout, scale):
    """The op against float64 and against plain PyTorch in q's dtype; returns (out, lse)."""
    mask = as_mask(mask)
    out, lse = fwd(q, k, v, layout, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    ro, rl = reference.sparse_attention(q.double(), k.double(), v.double(), mask, scale)
    po, pl = reference.sparse_attention(q, k, v, mask, scale)
    assert_accurate(out, ro, po, q.dtype, "out")
    assert_accurate(lse, rl, pl, q.dtype, "lse")
    empty = torch.isinf(rl)
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    return out, lse


def check_backward(q, k, v, dout, mask, layout, scale):
    mask = as_mask(mask)
    out, lse = fwd(q, k, v, layout, scale)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, layout, scale)
    for g, x in zip((dq, dk, dv), (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref = torch.autograd.grad(reference.sparse_attention(*leaves64, mask, scale)[0], leaves64,
                              dout.double())
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    plain = torch.autograd.grad(reference.sparse_attention(*leaves, mask, scale)[0], leaves, dout)
    for name, g, r, p in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, plain):
        assert_accurate(g, r, p, q.dtype, name)


# --------------------------------------------------------------------------- hand layouts


@pytest.mark.parametrize("flags", FLAG_COMBOS)
def test_forward_every_flag_combo(cpu_isa, poison, flags):
    q, k, v, _ = inputs(2, 4, 2, 150, 231, 64, torch.float32, seed=flags)
    layout, mask = hand_layout(2, 4, 150, 231, 64, 64, flags, seed=flags, per_head=flags % 3 == 0)
    check_forward(q, k, v, mask, layout, 0.125)


@pytest.mark.parametrize("flags", FLAG_COMBOS)
def test_backward_every_flag_combo(cpu_isa, poison, flags):
    q, k, v, dout = inputs(2, 4, 2, 150, 231, 32, torch.float32, seed=100 + flags)
    layout, mask = hand_layout(2, 4, 150, 231, 64, 64, flags, seed=flags, per_head=flags % 3 == 1)
    check_backward(q, k, v, dout, mask, layout, 0.2)


@pytest.mark.parametrize("BQ,BK,flags", [(128, 64, BAND | BITS), (64, 128, DOC | BITS),
                                         (128, 128, BAND | PREFIX), (32, 16, BAND | DOC),
                                         (16, 96, BAND | PREFIX | DOC | BITS)])
def test_block_sizes(cpu_isa, poison, BQ, BK, flags):
    q, k, v, dout = inputs(2, 2, 2, 261, 190, 32, torch.float32, seed=BQ + BK)
    layout, mask = hand_layout(2, 2, 261, 190, BQ, BK, flags, seed=BQ * BK, per_head=True)
    check_forward(q, k, v, mask, layout, 0.3)
    check_backward(q, k, v, dout, mask, layout, 0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("flags", [BAND | PREFIX | DOC | BITS, BAND | DOC])
def test_half_precision(cpu_isa, poison, dtype, flags):
    q, k, v, dout = inputs(1, 4, 1, 130, 77, 96, dtype, seed=flags)
    layout, mask = hand_layout(1, 4, 130, 77, 64, 64, flags, seed=7, per_head=True)
    check_forward(q, k, v, mask, layout, 96**-0.5)
    check_backward(q, k, v, dout, mask, layout, 96**-0.5)


# --------------------------------------------------------------------------- builders


def builder_masks(Nq, Nk, bs):
    ids_q = (torch.arange(Nq) * 3 // Nq).to(torch.int32)
    ids_k = (torch.arange(Nk) * 3 // Nk).to(torch.int32)
    gen = torch.Generator().manual_seed(Nq + Nk)
    return {
        "causal": masks.causal(Nq, Nk, block_size=bs),
        "causal_top_left": masks.causal(Nq, Nk, block_size=bs, align="top_left"),
        "window": masks.sliding_window(Nq, 70, Nk, block_size=bs),
        "window_2sided": masks.sliding_window(Nq, (40, 25), Nk, causal=False, block_size=bs),
        "document": masks.document(ids_q, ids_k, block_size=bs),
        "prefix_lm": masks.prefix_lm(Nq, 50, Nk, block_size=bs),
        "causal&document": masks.causal(Nq, Nk, block_size=bs)
        & masks.document(ids_q, ids_k, block_size=bs),
        "from_dense": frugal.BlockMask.from_dense(torch.rand(2, 1, Nq, Nk, generator=gen) < 0.3,
                                                  block_size=bs),
        "full": masks.full(Nq, Nk, block_size=bs),
    }


@pytest.mark.parametrize("name", list(builder_masks(8, 8, 64)))
@pytest.mark.parametrize("Nq,Nk,bs", [(333, 333, 64), (200, 457, (128, 64)), (300, 129, 128)])
def test_builders_forward_backward(poison, name, Nq, Nk, bs):
    mask = builder_masks(Nq, Nk, bs)[name]
    layout = mask.layout(2, 4)
    q, k, v, dout = inputs(2, 4, 2, Nq, Nk, 64, torch.float32, seed=Nq)
    check_forward(q, k, v, mask, layout, 0.125)
    check_backward(q, k, v, dout, mask, layout, 0.125)


@pytest.mark.parametrize("D,group", [
    *((D, g) for D in (32, 64, 96, 128, 256) for g in (1, 2, 4)),
    (8, 2), (24, 1), (48, 4), (80, 2), (112, 1), (120, 4), (192, 2)])
def test_head_dims_and_gqa(cpu_isa, poison, D, group):
    # Every multiple of 8: those not a multiple of 16 run zero-padded (csrc: padded_dim).
    Hkv = 2 if group < 4 else 1
    mask = masks.sliding_window(197, 90, block_size=64)
    layout = mask.layout(1, Hkv * group)
    q, k, v, dout = inputs(1, Hkv * group, Hkv, 197, 197, D, torch.float32, seed=D + group)
    check_forward(q, k, v, mask, layout, D**-0.5)
    if D in (8, 32, 120, 128) or group == 2:
        check_backward(q, k, v, dout, mask, layout, D**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_builders(poison, dtype):
    mask = masks.causal(300, block_size=128) & masks.document(
        torch.tensor([0] * 120 + [1] * 100 + [2] * 80), block_size=128)
    layout = mask.layout(1, 2)
    q, k, v, dout = inputs(1, 2, 2, 300, 300, 64, dtype)
    check_forward(q, k, v, mask, layout, 0.125)
    check_backward(q, k, v, dout, mask, layout, 0.125)


def test_empty_rows(cpu_isa, poison):
    # Bottom-right causal with Nq > Nk: the first Nq - Nk queries see no key.
    mask = masks.causal(200, 70, block_size=64)
    layout = mask.layout(1, 2)
    q, k, v, dout = inputs(1, 2, 1, 200, 70, 64, torch.float32)
    out, lse = check_forward(q, k, v, mask, layout, 0.125)
    assert (lse[:, :, :130] == float("-inf")).all() and (out[:, :, :130] == 0).all()
    dq, dk, dv = bwd(dout, q, k, v, out, lse, layout, 0.125)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[:, :, :130] == 0).all()
    check_backward(q, k, v, dout, mask, layout, 0.125)


def test_non_contiguous_inputs(cpu_isa, poison):
    mask = masks.sliding_window(150, 60, block_size=64)
    layout = mask.layout(2, 4)
    gen = torch.Generator().manual_seed(3)
    # q [B, N, H, D] transposed; k with a strided head dim; v a slice of a wider tensor.
    q = torch.randn(2, 150, 4, 64, generator=gen).transpose(1, 2)
    k = torch.randn(2, 2, 150, 128, generator=gen)[..., ::2]
    v = torch.randn(2, 2, 150, 96, generator=gen)[..., 16:80]
    dout = torch.randn(2, 150, 4, 64, generator=gen).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_forward(q, k, v, mask, layout, 0.125)
    check_backward(q, k, v, dout, mask, layout, 0.125)


def test_zero_sizes():
    layout = masks.causal(64, block_size=64).layout(0, 2)
    q, k, v, _ = inputs(0, 2, 2, 64, 64, 64, torch.float32)
    out, lse = fwd(q, k, v, layout, 0.125)
    assert out.shape == q.shape and lse.shape == (0, 2, 64)


# --------------------------------------------------------------------------- public API


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_api_autograd(poison, dtype):
    mask = masks.prefix_lm(190, 40, block_size=64)
    q, k, v, dout = inputs(1, 4, 2, 190, 190, 64, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = frugal.sparse_attention(*leaves, mask, return_lse=True, backend="cpu")
    grads = torch.autograd.grad(out, leaves, dout)
    ref_out, ref_lse = fwd(q, k, v, mask.layout(1, 4), 64**-0.5)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    direct = bwd(dout, q, k, v, ref_out, ref_lse, mask.layout(1, 4), 64**-0.5)
    for g, d in zip(grads, direct):
        assert torch.equal(g, d)


# --------------------------------------------------------------------------- bad input


def _args(layout, **over):
    return layout.replace(**over).op_args()


@pytest.mark.parametrize("case,match", [
    ("head_dim", "head dim must be a multiple of 8 in \\[8, 256\\]; got 44"),
    ("head_dim_big", "head dim must be a multiple of 8 in \\[8, 256\\]; got 264"),
    ("heads", "must be a multiple of k's"),
    ("dtype", "k and v must have q's dtype"),
    ("kv_idx", r"kv_idx\[0, 0, 0, 0\] must be a block index in \[0, 4\); got 9"),
    ("full_num", r"full_num\[0, 1, 2\] must be in \[0, "),
    ("bits_shape", "bits must have shape"),
    ("bits_row", r"kv_bits\[.*must be a row of bits"),
    ("block", "BQ must be a multiple of 16"),
    ("num_shape", "kv_num must have shape"),
    ("index_dtype", "kv_idx must be int32"),
])
def test_errors(case, match):
    N = 200
    layout = frugal.BlockMask.from_dense(torch.rand(N, N) < 0.5, block_size=64).layout(1, 2)
    q, k, v, _ = inputs(1, 2, 2, N, N, 64, torch.float32)
    over = {}
    if case == "head_dim":
        q, k, v = q[..., :44], k[..., :44], v[..., :44]
    elif case == "head_dim_big":
        q, k, v = (torch.randn(1, 2, N, 264) for _ in range(3))
    elif case == "heads":
        q = torch.randn(1, 3, N, 64)
        layout = frugal.BlockMask.from_dense(torch.rand(N, N) < 0.5, block_size=64).layout(1, 3)
        k, v = torch.randn(1, 2, N, 64), torch.randn(1, 2, N, 64)
    elif case == "dtype":
        k = k.half()
    elif case == "kv_idx":
        idx = layout.kv_idx.clone()
        idx[0, 0, 0, 0] = 9
        over["kv_idx"] = idx
    elif case == "full_num":
        num = layout.full_num.clone()
        num[0, 1, 2] = 99
        over["full_num"] = num
    elif case == "bits_shape":
        over["bits"] = layout.bits[:, :, :1]
    elif case == "bits_row":
        rows = layout.kv_bits.clone()
        rows[0, 0, 0, 0] = 10**6
        over["kv_bits"] = rows
    elif case == "block":
        over["BQ"] = 40
    elif case == "num_shape":
        over["kv_num"] = layout.kv_num[:, :, :2]
    elif case == "index_dtype":
        over["kv_idx"] = layout.kv_idx.long()
    with pytest.raises(RuntimeError, match=match):
        ops.sparse_attention_fwd(q, k, v, *_args(layout, **over), 0.125)


def test_opcheck():
    """Schemas, fakes and dispatch of both ops agree with the kernels (torch.library.opcheck)."""
    mask = masks.causal(150, block_size=64) & masks.document(
        torch.tensor([0] * 70 + [1] * 80), block_size=64)
    layout = mask.layout(1, 2)
    q, k, v, dout = inputs(1, 2, 1, 150, 150, 32, torch.float32)
    torch.library.opcheck(ops.sparse_attention_fwd.default,
                          (q, k, v, *layout.op_args(), 0.2))
    out, lse = fwd(q, k, v, layout, 0.2)
    torch.library.opcheck(ops.sparse_attention_bwd.default,
                          (dout, q, k, v, out, lse, *layout.op_args(), 0.2))


def test_layout_lists_defined_once():
    """csrc/sparse_layout.h names the op's layout arguments in SparseLayout's orders."""
    header = (pathlib.Path(__file__).parents[1] / "csrc" / "sparse_layout.h").read_text()

    def names(macro):
        body = re.search(rf"#define {macro}\(X\)(.*?)(?<!\\)\n", header, re.S).group(1)
        return tuple(re.findall(r"X\((\w+)\)", body))

    assert names("FRUGAL_SPARSE_LAYOUT_TENSORS") == SparseLayout.TENSORS
    assert names("FRUGAL_SPARSE_LAYOUT_INTS") == SparseLayout.INTS
    fields = {f.name for f in dataclasses.fields(SparseLayout)}
    assert set(SparseLayout.TENSORS + SparseLayout.INTS) | {"Nq", "Nk"} == fields


@pytest.mark.parametrize("which", ["tensors", "ints"])
def test_layout_list_length(which):
    layout = masks.causal(100, block_size=64).layout(1, 2)
    q, k, v, _ = inputs(1, 2, 2, 100, 100, 32, torch.float32)
    tensors, ints = layout.op_args()
    if which == "tensors":
        tensors = tensors[:-1]
        match = r"layout must hold 13 tensors \( kv_num kv_idx .* bits \); got 12"
    else:
        ints = ints + [0]
        match = r"layout_ints must hold 6 ints \( BQ BK flags lo hi prefix \); got 7"
    with pytest.raises(RuntimeError, match=match):
        ops.sparse_attention_fwd(q, k, v, tensors, ints, 0.125)
    with pytest.raises(ValueError, match="SparseLayout: expected 13 tensors"):
        SparseLayout.from_op_args(100, 100, tensors, ints)
