"""Absurd integer arguments through torch.ops.frugal give a clear error or the right result, never
signed overflow (undefined behaviour; `make sanitize` runs these under UBSan with -fno-wrapv):
the size a packed int8 weight's header asks for, the capacity of a paged table row
(width * block_size), and the band / prefix bounds of a sparse-attention rule."""

import pytest
import torch

from frugal import _ext, masks, reference

pytestmark = pytest.mark.skipif(_ext.ext() is None, reason="frugal._C is not built")

ops = torch.ops.frugal
I64_MAX, I64_MIN = 2**63 - 1, -(2**63)


def packed_header(n, k, nbytes=128):
    """An int8 buffer with int8_pack_weight's header claiming an N x K weight."""
    buf = torch.zeros(nbytes, dtype=torch.int8)
    buf[:8] = torch.tensor(list(b"frgi8w01"), dtype=torch.uint8).view(torch.int8)
    buf[8:24] = torch.tensor([n, k], dtype=torch.int64).view(torch.int8)
    return buf


@pytest.mark.parametrize("n", [2**62, 2**63 - 16, I64_MAX])
def test_packed_header_too_large(n):
    packed = packed_header(n, 4)
    b_scale = torch.ones(1).expand(n)  # N is also read from b_scale: a stride-0 view of it
    with pytest.raises(RuntimeError, match=rf"int8_scaled_mm_packed: a packed int8 weight of "
                                           rf"N = {n}, K = 4 would take more than 2\^63 bytes"):
        ops.int8_scaled_mm_packed(torch.ones(2, 4, dtype=torch.int8), packed, torch.ones(2),
                                  b_scale, None, torch.float32)
    with pytest.raises(RuntimeError, match=rf"int8_dynamic_linear_packed: a packed int8 weight "
                                           rf"of N = {n}, K = 4"):
        ops.int8_dynamic_linear_packed(torch.ones(2, 4), packed, b_scale, None)


@pytest.mark.parametrize("n, k", [(I64_MIN, 4), (4, 2**62), (4, I64_MIN)])
def test_packed_header_out_of_range(n, k):
    with pytest.raises(RuntimeError, match=rf"b_packed has a corrupt header \(N = {n}, K = {k}; "
                                           rf"N must be >= 0 and K in \[0, 131071\]\)"):
        ops.int8_dynamic_linear_packed(torch.ones(2, 4), packed_header(n, k), torch.ones(4), None)


def test_pack_weight_of_empty_rows_too_many():
    b = torch.empty(2**62, 0, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"int8_pack_weight: a packed int8 weight of "
                                           r"N = 4611686018427387904, K = 0 would take more"):
        ops.int8_pack_weight(b)


def paged_case(gen, width):
    """One sequence of 5 tokens in block 0 of a 16-token-block cache, behind a table row of
    `width` entries (a stride-0 view: every entry names block 0)."""
    k_cache, v_cache = (torch.randn(1, 16, 1, 32, generator=gen) for _ in range(2))
    tables = torch.zeros(1, 1, dtype=torch.int32).expand(1, width)
    return k_cache, v_cache, tables, torch.tensor([5], dtype=torch.int32)


@pytest.mark.parametrize("width", [2**59, 2**62, I64_MAX])
def test_paged_table_row_capacity_overflow(poison, width):
    gen = torch.Generator().manual_seed(31)
    k_cache, v_cache, tables, seq_lens = paged_case(gen, width)
    q = torch.randn(1, 2, 32, generator=gen)
    out = ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, 0.2, 0, None, None)
    want = reference.paged_attention(q.double(), k_cache.double(), v_cache.double(),
                                     tables[:, :1], seq_lens, 0.2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    qp = torch.randn(3, 2, 32, generator=gen)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    out = ops.paged_prefill_attention(qp, k_cache, v_cache, tables, seq_lens, cu, 0.2, 0, None,
                                      None)
    want = reference.paged_prefill_attention(qp.double(), k_cache.double(), v_cache.double(),
                                             tables[:, :1], seq_lens, torch.tensor([3]), 0.2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match=rf"paged_attention: seq_lens\[0\] must be in "
                                           rf"\[0, {I64_MAX}\] \(block_tables rows hold {width} "
                                           rf"blocks of 16 tokens\); got -1"):
        ops.paged_attention(q, k_cache, v_cache, tables, torch.tensor([-1], dtype=torch.int32),
                            0.2, 0, None, None)


N, BLOCK = 192, 64


def dense_blocks(rule):
    """The dense mask a causal 64-block layout gives when its diagonal (partial) blocks apply
    `rule` (dense bool [N, N] or a constant) and its lower (full) blocks allow everything."""
    qb, kb = torch.arange(N)[:, None] // BLOCK, torch.arange(N)[None, :] // BLOCK
    return (kb < qb) | ((kb == qb) & rule)


BAND, PREFIX = 1, 2
RULES = {  # (flags, lo, hi, prefix) -> what the diagonal blocks allow
    "lo -2**63, hi 2**62": ((BAND, I64_MIN, 2**62, 0), True),
    "lo 2**62, hi 2**63-1": ((BAND, 2**62, I64_MAX, 0), False),
    "lo -2**63, hi -2**63": ((BAND, I64_MIN, I64_MIN, 0), False),
    "hi 2**63-1, lo 0": ((BAND, 0, I64_MAX, 0),
                         torch.arange(N)[None, :] >= torch.arange(N)[:, None]),
    "no band, prefix 2**63-1": ((BAND | PREFIX, 2**62, 2**62, I64_MAX), True),
    "causal, prefix -2**63": ((BAND | PREFIX, I64_MIN, 0, I64_MIN),
                              torch.arange(N)[None, :] <= torch.arange(N)[:, None]),
}


@pytest.mark.parametrize("name", list(RULES))
def test_sparse_rule_bounds(poison, name):
    (flags, lo, hi, prefix), rule = RULES[name]
    gen = torch.Generator().manual_seed(33)
    q, k, v = (torch.randn(1, 2, N, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    layout = masks.causal(N, block_size=BLOCK).layout(1, 2)
    layout = layout.replace(BQ=BLOCK, BK=BLOCK, flags=flags, lo=lo, hi=hi, prefix=prefix)
    out, lse = ops.sparse_attention_fwd(q.float(), k.float(), v.float(), *layout.op_args(),
                                        32**-0.5)
    want, want_lse = reference.sparse_attention(q, k, v, dense_blocks(rule))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
