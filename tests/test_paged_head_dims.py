"""Every head dim that is a multiple of 8 up to 256 (issue 17.1) through the paged ops on every
backend that runs here: the C++ CPU kernels, the Triton kernels (under the interpreter without a
GPU: fp32 and fp16 only), the PyTorch reference and the CUDA kernels through the host emulation
(frugal._cuda_emu). D = 8, 24, 80, 120 and 192 are not multiples of 16: the Triton tiles pad
them to a power of two and mask the rest. Decode (unsplit and split-KV), prefill and append are
compared with float64 on fresh random inputs over caches whose unused slots are NaN, with odd
lengths, GQA, int8 caches and return_lse, and fresh allocations poisoned."""

import pytest
import torch
from conftest import backends_for
from paged_cases import (
    INT8_TOL,
    ODD_Q_LENS,
    TOL,
    check_out_lse,
    expected_decode,
    expected_prefill,
    out_tol,
    paged_case,
)

from frugal.paged_ops import paged_append, paged_attention, paged_prefill_attention

BACKENDS = backends_for("cpu")
HEAD_DIMS = [8, 24, 80, 120, 192]


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.int8], ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_and_prefill(poison, backend, d, cache_dtype):
    q, caches, tables, seq_lens, ks, vs = paged_case(d, cache_dtype, seed=d)
    kc, vc, ksc, vsc = caches
    want, want_lse = expected_decode(q, ks, vs, return_lse=True)
    got = paged_attention(q, kc, vc, tables, seq_lens, None, None, ksc, vsc, backend=backend,
                          return_lse=True)
    check_out_lse(got, want, want_lse, out_tol(q, cache_dtype))
    assert torch.equal(got[0][3], torch.zeros_like(got[0][3])) and (got[1][3] == -torch.inf).all()

    # Triton's float32 prefill stops at D = 128 (its tf32x3 operands spill beyond): fp16 q.
    fp16 = backend == "triton" and d > 128
    gen = torch.Generator().manual_seed(d + 1)
    qp = torch.randn(sum(ODD_Q_LENS), q.shape[1], d, generator=gen)
    qp = qp.half() if fp16 else qp.to(q.dtype)
    q_lens = torch.tensor(ODD_Q_LENS, dtype=torch.int32)
    got = paged_prefill_attention(qp, kc, vc, tables, seq_lens, q_lens, None, None, ksc, vsc,
                                  backend=backend, return_lse=True)
    t = TOL[qp.dtype] if fp16 else out_tol(q, cache_dtype)
    check_out_lse(got, *expected_prefill(qp, ks, vs, ODD_Q_LENS), t)


@pytest.mark.parametrize("d", [24, 120])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_decode_split_kv(poison, dtype, d):
    """Split-KV forced (partitions of one tile): stage 1's partial rows and the merge kernel
    at D = 24 and 120 (BLOCK_D 32 and 128)."""
    if "triton" not in BACKENDS:
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from frugal.kernels import paged_attention as kernel

    q, caches, tables, seq_lens, ks, vs = paged_case(d, dtype, seed=d + 5, lens=[70, 3, 0, 41])
    cfg = kernel.pick_config(q, d)
    cfg = {**cfg, "min_partition": cfg["BLOCK_N"]}
    assert kernel.split_plan(cfg, 4 * 2, tables.shape[1] * 8, 132)[0] > 1
    got = kernel.paged_attention(q, *caches[:2], tables, seq_lens, d**-0.5, 0, *caches[2:],
                                 config=cfg, num_sms=132, return_lse=True)
    check_out_lse(got, *expected_decode(q, ks, vs, return_lse=True), TOL[dtype])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_append_bit_identical(backend, cache_dtype):
    gen = torch.Generator().manual_seed(3)
    for d in (8, 24, 120):
        shape = (5, 4, 3, d)
        k, v = torch.randn(2, 9, 3, d, generator=gen).unbind(0)
        slots = torch.tensor([3, -1, 0, 19, 7, 8, 12, 2, 17], dtype=torch.int32)
        caches = []
        for b in (backend, "torch"):
            kc, vc = (torch.zeros(shape, dtype=cache_dtype) for _ in range(2))
            ks = vs = None
            if cache_dtype == torch.int8:
                ks, vs = torch.zeros(shape[:3]), torch.zeros(shape[:3])
            paged_append(k, v, kc, vc, slots, ks, vs, backend=b)
            caches.append([t for t in (kc, vc, ks, vs) if t is not None])
        for got, want in zip(*caches):
            assert torch.equal(got, want), d


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.int8], ids=str)
@pytest.mark.parametrize("d", [24, 120])
def test_cuda_emulated(poison, emu, d, cache_dtype):
    emu.configure(min_partition=16)
    q, caches, tables, seq_lens, ks, vs = paged_case(d, cache_dtype, seed=d + 9)
    ops = torch.ops.frugal_emu
    got = ops.paged_attention_lse(q, *caches[:2], tables, seq_lens, d**-0.5, 0, *caches[2:])
    assert emu.last_plan()["splits"] > 1
    t = dict(rtol=2e-3, atol=2e-3) if cache_dtype != torch.int8 else INT8_TOL
    check_out_lse(got, *expected_decode(q, ks, vs, return_lse=True), t)
    gen = torch.Generator().manual_seed(d)
    qp = torch.randn(sum(ODD_Q_LENS), q.shape[1], d, generator=gen).to(q.dtype)
    cu = torch.tensor([0] + torch.tensor(ODD_Q_LENS).cumsum(0).tolist(), dtype=torch.int32)
    got = ops.paged_prefill_attention_lse(qp, *caches[:2], tables, seq_lens, cu, d**-0.5, 0,
                                          *caches[2:])
    check_out_lse(got, *expected_prefill(qp, ks, vs, ODD_Q_LENS), t)
