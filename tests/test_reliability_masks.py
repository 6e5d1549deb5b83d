"""masks.document with ids that do not fit int32: ids such as 0 and 2**32 name different
documents (they were truncated to int32 and landed in one), on every backend of
sparse_attention, against a float64 dense reference whose mask compares the int64 ids."""

import pytest
import torch

import frugal
from frugal import masks, reference

from conftest import backends_for

N, BLOCK = 200, 64


def wide_ids(gen, dtype):
    """[2, N] runs of ids drawn from values whose low 32 bits collide (0, 2**32, -2**32, ...)."""
    if dtype == torch.uint64:
        values = torch.tensor([0, 2**32, 2**63, 2**63 + 2**32, 2**64 - 2**32], dtype=torch.uint64)
    else:
        values = torch.tensor([0, 2**32, -(2**32), 2**62, -(2**63), 2**63 - 2**32])
    runs = torch.randint(0, len(values), (2, N // 8), generator=gen)
    return values[runs.repeat_interleave(8, dim=1)[:, :N]]


def dense_rule(q_ids, kv_ids):
    """[2, 1, Nq, Nk] bool: same id, compared as the 64-bit values they are."""
    return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint64], ids=str)
def test_to_dense_keeps_ids_apart(dtype):
    gen = torch.Generator().manual_seed(11)
    ids, kv_ids = wide_ids(gen, dtype), wide_ids(gen, dtype)
    as64 = lambda t: t.view(torch.int64) if t.dtype == torch.uint64 else t  # noqa: E731
    assert torch.equal(masks.document(ids, block_size=BLOCK).to_dense(),
                       dense_rule(as64(ids), as64(ids)))
    assert torch.equal(masks.document(ids, kv_ids, block_size=BLOCK).to_dense(),
                       dense_rule(as64(ids), as64(kv_ids)))
    # 0 and 2**32 alone: two documents, not one.
    two = torch.tensor([0] * 64 + [2**32] * 64)
    assert masks.document(two, block_size=BLOCK).to_dense().sum() == 2 * 64 * 64


def test_ids_that_fit_int32_are_kept():
    ids = torch.tensor([[-(2**31), -(2**31), 5, 2**31 - 1]])
    rule = masks.document(ids, block_size=64)._rule
    assert rule.q_doc.dtype == torch.int32 and torch.equal(rule.q_doc, ids.to(torch.int32))


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_sparse_attention_with_wide_ids(poison, backend):
    gen = torch.Generator().manual_seed(12)
    ids = wide_ids(gen, torch.int64)
    mask = masks.document(ids, block_size=BLOCK) & masks.causal(N, block_size=BLOCK)
    q, k, v = (torch.randn(2, 2, N, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    dense = dense_rule(ids, ids) & torch.ones(N, N, dtype=torch.bool).tril()
    want, want_lse = reference.sparse_attention(q, k, v, dense)
    out, lse = frugal.sparse_attention(q.float(), k.float(), v.float(), mask, return_lse=True,
                                       backend=backend)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-5)
