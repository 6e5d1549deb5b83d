"""The Triton block-sparse attention kernels (``frugal.kernels.sparse_attention``) called
directly, and once through ``frugal.sparse_attention(..., backend="triton")``: on CUDA tensors
with a GPU, else on CPU tensors under the Triton interpreter.

Every case runs forward and backward on fresh random inputs and compares with float64 dense
attention over the mask's exact bool form (``BlockMask.to_dense``), with FlashAttention's
accuracy rule: max error <= 2x the error of plain PyTorch attention (and autograd) in the same
precision, plus a tiny floor. Fresh allocations are poisoned (NaN), lengths are not multiples
of the block, Nq != Nk, GQA groups of 1, 2 and 4, masks per head and broadcast (stride-0
layouts), every element-rule flag (band, band + prefix, document, bitmask, combinations, none),
empty rows (out 0, lse -inf, zero gradient), block sizes 64 and 128 (kernel tiles smaller than
the block), and q/k/v that are transposed views of [B, N, H, D]. bf16 is compiled by
``frugal check`` and checked numerically only on a GPU (the interpreter's bf16 dots are wrong).
"""

import os
import zlib

import pytest
import torch

import frugal
from frugal import masks
from frugal.block_mask import BlockMask
from sparse_cases import assert_rule, random_docs

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Absolute floor of the accuracy rule, times max(1, |reference|): a few units in the last
# place of the accumulation dtype, far below either implementation's error.
FLOOR = {torch.float32: 2.0**-20, torch.float16: 2.0**-14}
BAND, PREFIX, DOC, BITS = 1, 2, 4, 8


@pytest.fixture(scope="module")
def sa():
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set (conftest sets it)")
    from frugal.kernels import sparse_attention

    return sparse_attention


def make_qkv(B, hq, hkv, nq, nk, d, dtype, gen, bnhd=False):
    """q [B, hq, nq, d], k, v [B, hkv, nk, d]; ``bnhd``: transposed views of [B, N, H, D]."""
    def rand(h, n):
        if bnhd:
            return torch.randn(B, n, h, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
        return torch.randn(B, h, n, d, generator=gen).to(DEVICE, dtype)

    return rand(hq, nq), rand(hkv, nk), rand(hkv, nk)


def dense_attention(q, k, v, allowed, scale):
    """Plain masked attention in q's dtype (autograd-friendly; an empty row gives 0)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    nonempty = allowed.any(-1, keepdim=True)
    s = torch.where(allowed, s, float("-inf"))
    p = torch.softmax(torch.where(nonempty, s, 0.0), -1) * nonempty
    return p @ v, torch.logsumexp(s.double(), -1)


def grads(q, k, v, allowed, scale, dout, dtype):
    """(out, lse, dq, dk, dv) of dense_attention computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = dense_attention(*leaves, allowed, scale)
    out.backward(dout.to(dtype))
    return (out.detach(), lse.detach(), *(t.grad for t in leaves))


def run_case(sa, mask, B, hq, hkv, d, dtype, seed, bnhd=False, scale=None, flags=None):
    """Forward and backward of the kernels on ``mask`` against float64 and plain ``dtype``."""
    nq, nk = mask.seq_lens
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, hq, hkv, nq, nk, d, dtype, gen, bnhd)
    dout = torch.randn(B, hq, nq, d, generator=gen).to(DEVICE, dtype)
    scale = d ** -0.5 if scale is None else scale
    layout = mask.layout(B, hq, DEVICE)
    if flags is not None:
        assert layout.flags == flags, f"the case means to test flags {flags}, got {layout.flags}"
    allowed = mask.to_dense(DEVICE).expand(B, hq, nq, nk)

    out, lse = sa.forward(q, k, v, layout, scale)
    dq, dk, dv = sa.backward(dout, q, k, v, out, lse, layout, scale)

    ref = grads(q, k, v, allowed, scale, dout, torch.float64)  # dk, dv summed over groups
    plain = grads(q, k, v, allowed, scale, dout, dtype)
    for name, got, r, p in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv),
                               ref[:1] + ref[2:], plain[:1] + plain[2:]):
        assert_rule(name, got, r, p, dtype, FLOOR[dtype])

    # lse: fp32, natural log, -inf exactly on the empty rows, which give out 0 and dq 0.
    ref_lse = ref[1]
    empty = ~allowed.any(-1)
    assert lse.dtype == torch.float32 and lse.shape == (B, hq, nq)
    assert torch.equal(torch.isneginf(lse), empty) and not torch.isnan(lse).any()
    lse_err = (lse.double() - ref_lse)[~empty].abs().max().item() if (~empty).any() else 0.0
    assert lse_err <= 1e-5 * max(1.0, ref_lse[~empty].abs().max().item() if (~empty).any() else 1)
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    return layout, empty


# ----------------------------------------------------------------------------- element rules

# (id, mask builder(gen), B, Hq, Hkv, D, dtype, flags)
CASES = [
    ("causal-br-nq<nk-gqa2-fp32", lambda g: masks.causal(100, 177, block_size=64),
     1, 2, 1, 32, torch.float32, BAND),
    ("causal-br-nq>nk-empty-rows-fp16", lambda g: masks.causal(177, 100, block_size=64),
     1, 1, 1, 64, torch.float16, BAND),
    ("causal-topleft-blocks-64x128-fp32",
     lambda g: masks.causal(150, 130, block_size=(64, 128), align="top_left"),
     1, 2, 2, 32, torch.float32, BAND),
    ("window-gqa4-block128-fp16", lambda g: masks.sliding_window(200, 40, block_size=128),
     1, 4, 1, 32, torch.float16, BAND),
    ("window-noncausal-fp32",
     lambda g: masks.sliding_window(140, (20, 70), causal=False, block_size=64),
     2, 1, 1, 32, torch.float32, BAND),
    ("prefix-lm-gqa2-fp32", lambda g: masks.prefix_lm(150, 70, block_size=(64, 128)),
     1, 2, 1, 64, torch.float32, BAND | PREFIX),
    ("document-empty-rows-fp32",
     lambda g: masks.document(random_docs(130, 2, g), random_docs(110, 2, g) + 1,
                              block_size=64),
     2, 1, 1, 32, torch.float32, DOC),
    ("causal-and-document-fp16",
     lambda g: masks.causal(160, block_size=64)
     & masks.document(random_docs(160, 1, g), block_size=64),
     1, 2, 1, 32, torch.float16, BAND | DOC),
    ("prefix-and-document-fp32",
     lambda g: masks.prefix_lm(130, 30, block_size=64)
     & masks.document(random_docs(130, 2, g), block_size=64),
     2, 2, 2, 32, torch.float32, BAND | PREFIX | DOC),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rules(sa, poison, case):
    _, build, B, hq, hkv, d, dtype, flags = case
    gen = torch.Generator().manual_seed(len(case[0]))
    seed = zlib.crc32(case[0].encode()) % 1000
    run_case(sa, build(gen), B, hq, hkv, d, dtype, seed=seed, flags=flags)


def random_bits_dense(B, H, nq, nk, bq, bk, gen, density=0.35):
    """A bool mask with every kind of block: random (partial), all true (full), all false
    (skipped), and a few all-false rows."""
    m = torch.rand(B, H, nq, nk, generator=gen) < density
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    kind = torch.randint(0, 3, (B, H, nqb, nkb), generator=gen)  # 0 random, 1 full, 2 empty
    kind = kind.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :nq, :nk]
    m = torch.where(kind == 1, True, torch.where(kind == 2, False, m))
    m[:, :, 3] = False
    return m


@pytest.mark.parametrize("dtype,B,hq,hkv,bq,bk", [
    (torch.float32, 1, 2, 1, 64, 64),      # a different mask per head of a GQA group
    (torch.float16, 2, 2, 2, 128, 64),
])
def test_bitmask_per_head(sa, poison, dtype, B, hq, hkv, bq, bk):
    gen = torch.Generator().manual_seed(7)
    dense = random_bits_dense(B, hq, 150, 170, bq, bk, gen)
    mask = BlockMask.from_dense(dense, block_size=(bq, bk))
    layout, _ = run_case(sa, mask, B, hq, hkv, 32, dtype, seed=3, flags=BITS)
    assert layout.kv_num.stride(0) != 0 or B == 1  # per-batch lists here


def test_bitmask_and_band_broadcast(sa, poison):
    """A [1, 1] mask with band and bitmask broadcast over B = 2, Hq = 4 (stride-0 lists)."""
    gen = torch.Generator().manual_seed(11)
    dense = random_bits_dense(1, 1, 140, 140, 64, 64, gen, density=0.6)
    mask = masks.causal(140, block_size=64) & BlockMask.from_dense(dense, block_size=64)
    layout, _ = run_case(sa, mask, 2, 4, 2, 32, torch.float32, seed=5)
    assert layout.flags & BITS
    assert layout.kv_idx.stride(0) == 0 and layout.kv_idx.stride(1) == 0


def test_no_rule_full_blocks_only(sa, poison):
    """A block-aligned mask: only full (and skipped) blocks, flags 0, ragged last blocks."""
    gen = torch.Generator().manual_seed(2)
    nq, nk = 150, 190
    blocks = torch.rand(2, 3, generator=gen) < 0.6
    blocks[0, 0] = True
    dense = blocks.repeat_interleave(64, 0).repeat_interleave(64, 1)[:nq, :nk]
    mask = BlockMask.from_dense(dense, block_size=64)
    layout, _ = run_case(sa, mask, 1, 2, 1, 32, torch.float32, seed=4, flags=0)
    assert int(layout.kv_num.max()) == 0


def pack_words(bits):
    """bool [..., BK] -> int32 [..., BK // 32]: bit c is bit c & 31 of word c >> 5."""
    w = bits.unflatten(-1, (-1, 32)).long() << torch.arange(32)
    w = w.sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def hand_layout(B, nq, nk, bq, bk, flags, gen, lo=0, hi=0, prefix=0, docs=None):
    """A SparseLayout built here, independently of BlockMask, for rule + bitmask combinations
    (BlockMask composes such masks into pure bitmasks): per batch, allowed = rule & random
    bits; blocks all allowed are full, the rest with any allowed partial (their bitmask is the
    random bits). Per-batch lists; broadcast over 2 heads. Returns (layout, allowed)."""
    from frugal.block_mask import SparseLayout

    q = torch.arange(nq)[:, None]
    k = torch.arange(nk)[None, :]
    ok = torch.ones(B, nq, nk, dtype=torch.bool)
    if flags & BAND:
        band = (k - q >= lo) & (k - q <= hi)
        if flags & PREFIX:
            band = band | (k < prefix)
        ok = ok & band
    if flags & DOC:
        ok = ok & (docs[0][:, :, None] == docs[1][:, None, :])
    src = torch.rand(B, nq, nk, generator=gen) < 0.7 if flags & BITS else torch.ones_like(ok)
    allowed = ok & src
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    pad = torch.zeros(B, nqb * bq, nkb * bk, dtype=torch.bool)
    inside = pad.clone()
    pad[:, :nq, :nk], inside[:, :nq, :nk] = allowed, True
    blocks = pad.view(B, nqb, bq, nkb, bk).transpose(2, 3)
    full = (blocks | ~inside.view(B, nqb, bq, nkb, bk).transpose(2, 3)).all(-1).all(-1)
    part = blocks.any(-1).any(-1) & ~full
    src_pad = torch.zeros_like(pad)
    src_pad[:, :nq, :nk] = src
    words = pack_words(src_pad.view(B, nqb, bq, nkb, bk).transpose(2, 3))  # [B, nqb, nkb, bq, w]
    row = torch.cumsum(part.flatten(), 0).view(B, nqb, nkb) - 1  # bitmask row of each block

    def lists(sel, ids):
        num = sel.sum(-1).to(torch.int32)
        width = max(1, int(num.max()))
        order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        valid = torch.arange(width) < num[..., None]
        idx = torch.where(valid, order, 0).to(torch.int32)
        rows = torch.where(valid, torch.gather(ids, -1, order), 0).to(torch.int32)
        return tuple(t[:, None].expand(B, 2, *t.shape[1:]) for t in (num, idx, rows))

    kv_num, kv_idx, kv_bits = lists(part, row)
    full_num, full_idx, _ = lists(full, row)
    q_num, q_idx, q_bits = lists(part.transpose(1, 2), row.transpose(1, 2))
    full_q_num, full_q_idx, _ = lists(full.transpose(1, 2), row.transpose(1, 2))
    dummy = torch.zeros(1, dtype=torch.int32)
    has_doc, has_bits = bool(flags & DOC), bool(flags & BITS)
    layout = SparseLayout(
        Nq=nq, Nk=nk, BQ=bq, BK=bk, flags=flags, lo=lo, hi=hi, prefix=prefix,
        kv_num=kv_num, kv_idx=kv_idx, kv_bits=kv_bits if has_bits else dummy,
        full_num=full_num, full_idx=full_idx, q_num=q_num, q_idx=q_idx,
        q_bits=q_bits if has_bits else dummy, full_q_num=full_q_num, full_q_idx=full_q_idx,
        q_doc=docs[0] if has_doc else dummy, kv_doc=docs[1] if has_doc else dummy,
        bits=words[part] if has_bits and part.any() else torch.zeros(1, bq, bk // 32,
                                                                     dtype=torch.int32))
    layout = SparseLayout(**{f: (getattr(layout, f).to(DEVICE) if isinstance(
        getattr(layout, f), torch.Tensor) else getattr(layout, f))
        for f in SparseLayout.__dataclass_fields__})
    return layout, allowed[:, None].expand(B, 2, nq, nk)


class _Dense:
    """The minimal mask interface run_case needs, over a hand-built layout."""

    def __init__(self, layout, allowed):
        self._layout, self._allowed = layout, allowed
        self.seq_lens = (layout.Nq, layout.Nk)

    def layout(self, B, hq, device):
        return self._layout

    def to_dense(self, device):
        return self._allowed.to(device)


@pytest.mark.parametrize("flags,dtype", [
    (BAND | BITS, torch.float32),
    (BAND | PREFIX | DOC | BITS, torch.float32),
    (DOC | BITS, torch.float16),
    (BAND | PREFIX | BITS, torch.float16),
])
def test_rule_and_bitmask_combinations(sa, poison, flags, dtype):
    """The element rule and the bitmask together (every flag at once included), on layouts
    built here; block sizes 64 x 128, Nq != Nk, causal band with a prefix."""
    gen = torch.Generator().manual_seed(flags)
    B, nq, nk = 2, 150, 170
    docs = (random_docs(nq, B, gen), random_docs(nk, B, gen))
    layout, allowed = hand_layout(B, nq, nk, 64, 128, flags, gen, lo=-100, hi=nk - nq,
                                  prefix=45, docs=docs)
    run_case(sa, _Dense(layout, allowed), B, 2, 1, 32, dtype, seed=flags, flags=flags)


def test_all_rows_empty(sa, poison):
    mask = BlockMask.from_dense(torch.zeros(70, 90, dtype=torch.bool), block_size=64)
    run_case(sa, mask, 1, 2, 1, 32, torch.float32, seed=1)


# ----------------------------------------------------------------------------- shapes, layouts

@pytest.mark.parametrize("d,dtype", [(96, torch.float16), (128, torch.float16),
                                     (64, torch.float32), (128, torch.float32),
                                     (8, torch.float32), (80, torch.float16),
                                     (120, torch.float32), (192, torch.float16)])
def test_head_dims(sa, poison, d, dtype):
    mask = masks.sliding_window(90, 50, 75, block_size=64)
    run_case(sa, mask, 1, 2, 1, d, dtype, seed=d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transposed_inputs(sa, poison, dtype):
    """q/k/v as transposed views of [B, N, H, D] (strides not of a contiguous tensor)."""
    mask = masks.causal(120, 130, block_size=64)
    run_case(sa, mask, 2, 2, 1, 32, dtype, seed=9, bnhd=True, scale=0.3)


def test_subtile_configs(sa, poison):
    """Tiles smaller than the mask block in both dims, forced: 16 x 16 kernel tiles walk each
    128 x 128 block as 8 x 8 sub-tiles (the list index per sub-tile, the ragged tail)."""
    mask = masks.sliding_window(150, 60, block_size=128) & masks.document(
        random_docs(150, 1, torch.Generator().manual_seed(0)), block_size=128)
    gen = torch.Generator().manual_seed(21)
    q, k, v = make_qkv(1, 2, 1, 150, 150, 32, torch.float32, gen)
    dout = torch.randn(1, 2, 150, 32, generator=gen).to(DEVICE)
    layout = mask.layout(1, 2, DEVICE)
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    out, lse = sa.forward(q, k, v, layout, 0.2, config=small)
    want_out, want_lse = sa.forward(q, k, v, layout, 0.2)
    dq, dk, dv = sa.backward(dout, q, k, v, out, lse, layout, 0.2,
                             configs_={"bwd_dkdv": small, "bwd_dq": small})
    want = sa.backward(dout, q, k, v, want_out, want_lse, layout, 0.2)
    allowed = mask.to_dense(DEVICE).expand(1, 2, 150, 150)
    ref = grads(q, k, v, allowed, 0.2, dout, torch.float64)
    for name, got, other, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv),
                                   (want_out, *want), (ref[0], *ref[2:])):
        # as accurate as the default tiles
        assert_rule(name, got, r, other, torch.float32, FLOOR[torch.float32])


def test_public_api_matches_direct_call(sa, poison):
    mask = masks.sliding_window(100, 30, block_size=64)
    gen = torch.Generator().manual_seed(17)
    q, k, v = make_qkv(1, 2, 1, 100, 100, 32, torch.float32, gen)
    out, lse = frugal.sparse_attention(q, k, v, mask, return_lse=True, backend="triton")
    want_out, want_lse = sa.forward(q, k, v, mask.layout(1, 2, DEVICE), 32 ** -0.5)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    frugal.sparse_attention(*leaves, mask, backend="triton").backward(dout)
    want = sa.backward(dout, q, k, v, want_out, want_lse, mask.layout(1, 2, DEVICE), 32 ** -0.5)
    for t, w in zip(leaves, want):
        assert torch.equal(t.grad, w)


# ----------------------------------------------------------------------------- bad input, edges

def test_layout_of_other_lengths_is_refused(sa):
    q, k, v = make_qkv(1, 1, 1, 64, 64, 32, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Nq=70, Nk=64"):
        sa.forward(q, k, v, masks.causal(70, 64, block_size=64).layout(1, 1, DEVICE), 1.0)
    with pytest.raises(ValueError, match=r"\[B, Hq\]"):
        sa.forward(q, k, v, masks.causal(64, block_size=64).layout(1, 2, DEVICE), 1.0)


def test_tile_larger_than_block_is_refused(sa):
    q, k, v = make_qkv(1, 1, 1, 64, 64, 32, torch.float32, torch.Generator().manual_seed(0))
    layout = masks.causal(64, block_size=64).layout(1, 1, DEVICE)
    with pytest.raises(ValueError, match="not a multiple of the kernel tile"):
        sa.forward(q, k, v, layout, 1.0, config={"BLOCK_M": 48, "BLOCK_N": 32, "num_warps": 4,
                                                  "num_stages": 1})


# ----------------------------------------------------------------------------- configs, specs

def test_configs_pick_and_the_check_matrix_reaches_them(sa):
    """Every config a launcher may pick (dtype x head dim x block size) is launched by the
    call matrix that ``frugal check`` compiles; tensor cores are expected of fp16/bf16 and not
    of fp32 (IEEE dots); the module stays under 200 distinct launches (compiles per target)."""
    from frugal import check, check_calls, jit_capture

    with jit_capture.capture() as launches:
        check_calls.sparse()
    unique = [launch for launch, _ in jit_capture.unique(launches)]
    assert len(unique) <= 200, len(unique)
    tiles = {(check.kernel_info(launch)[0], check.pointer_dtypes(launch).get("q_ptr"),
              dict(launch.kwargs)["BLOCK_M"][1], dict(launch.kwargs).get("BLOCK_N", (0, 0))[1])
             for launch in unique}
    names = {"fwd": "sparse_attention_fwd", "bwd_dkdv": "sparse_attention_bwd_dkdv",
             "bwd_dq": "sparse_attention_bwd_dq"}
    for kind, label in names.items():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for d in sa.HEAD_DIMS:
                for bq in sa.BLOCK_SIZES:
                    for bk in sa.BLOCK_SIZES:
                        cfg = sa.pick_config(kind, dtype, d, bq, bk)
                        assert bq % cfg["BLOCK_M"] == 0 and bk % cfg["BLOCK_N"] == 0
                        name = str(dtype).replace("torch.", "")
                        assert (label, name, cfg["BLOCK_M"], cfg["BLOCK_N"]) in tiles
    for launch in unique:
        label, tensor_cores = check.kernel_info(launch)
        dtypes = check.pointer_dtypes(launch)
        fp32 = dtypes.get("q_ptr", dtypes.get("out_ptr")) == "float32"
        assert tensor_cores == (label != "sparse_attention_bwd_pre" and not fp32), label