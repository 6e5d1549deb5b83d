"""return_lse of the paged attention ops on every backend: the C++ CPU kernels, the Triton
kernels (under the interpreter without a GPU), the PyTorch reference, and the CUDA kernels
through the host emulation (frugal._cuda_emu). lse is checked against float64 attention on
fresh random inputs over caches whose unused slots are NaN, with fresh allocations poisoned,
for decode unsplit and split (split-KV merges its partitions' lse), windows, GQA, odd lengths,
int8 caches and empty sequences (out 0, lse -inf); then through PagedKVCache and StepPlan."""

import pytest
import torch
from conftest import backends_for
from paged_cases import (
    TOL,
    build_paged,
    dense_attention,
    expected_decode,
    expected_prefill,
    gather,
    random_kv,
    rounded,
)

import frugal
from frugal import reference
from frugal.paged_kv_cache import PagedKVCache

INF = float("inf")
BACKENDS = backends_for("cpu")
LSE_TOL = dict(rtol=1e-5, atol=2e-5)  # lse from fp32 scores of exactly-rounded inputs
# Split-KV on the CPU kernel: fewer live sequences than 4 per thread split into partitions of
# 512; 16 sequences on 1..2 threads do not.
SPLIT_LENS = [1, 16, 600, 37, 0, 1100, 5]
WHOLE_LENS = SPLIT_LENS + [3, 9, 16, 17, 2, 40, 33, 1, 64]


def check_pair(got, want, want_lse, dtype, tol=None):
    out, lse = got
    assert out.dtype == dtype and out.shape == want.shape
    assert lse.dtype == torch.float32 and lse.shape == want.shape[:-1]
    torch.testing.assert_close(out.cpu().double(), want, **(tol or TOL[dtype]))
    torch.testing.assert_close(lse.cpu().double(), want_lse, **LSE_TOL)


def case(lens, hkv, group, d, dtype, seed, window=None, bs=16):
    gen = torch.Generator().manual_seed(seed)
    ks, vs = random_kv(lens, hkv, d, gen)
    cache_dtype = dtype if dtype != "int8" else torch.int8
    caches = build_paged(ks, vs, bs, cache_dtype, "cpu", gen, pad="poison", window=window)
    q_dtype = torch.float32 if dtype == "int8" else dtype
    q = torch.randn(len(lens), hkv * group, d, generator=gen).to(q_dtype)
    if dtype == "int8":
        ks, vs = ([reference.dequantize(*reference.quantize_per_token(x)) for x in xs]
                  for xs in (ks, vs))
    else:
        ks, vs = rounded(ks, dtype), rounded(vs, dtype)
    return q, caches, ks, vs


# ------------------------------------------------------------------------ decode


@pytest.mark.parametrize("lens", [SPLIT_LENS, WHOLE_LENS], ids=["split", "whole"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, "int8"], ids=str)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_lse_matches_float64(poison, backend, group, dtype, lens):
    if backend == "triton" and lens is WHOLE_LENS:
        pytest.skip("the interpreter is slow; the Triton split paths run in "
                    "test_decode_lse_triton_split_and_unsplit")
    q, (kc, vc, ksc, vsc, tables, seq_lens), ks, vs = case(lens, 2, group, 64, dtype,
                                                           seed=group + len(lens))
    want, want_lse = expected_decode(q, ks, vs, return_lse=True)
    got = frugal.paged_attention(q, kc, vc, tables, seq_lens, k_scale=ksc, v_scale=vsc,
                                 backend=backend, return_lse=True)
    check_pair(got, want, want_lse, q.dtype)
    empty = lens.index(0)
    assert torch.equal(got[0][empty], torch.zeros_like(got[0][empty]))
    assert (got[1][empty] == -INF).all()
    # The plain call gives the same out.
    out = frugal.paged_attention(q, kc, vc, tables, seq_lens, k_scale=ksc, v_scale=vsc,
                                 backend=backend)
    torch.testing.assert_close(out, got[0], rtol=0, atol=0)


@pytest.mark.parametrize("window", [1, 7, 16, 300])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_lse_window_and_scale(poison, backend, window):
    lens = [1, 16, 37, 300, 5] if backend == "triton" else SPLIT_LENS
    q, (kc, vc, _, _, tables, seq_lens), ks, vs = case(lens, 2, 3, 32, torch.float32,
                                                       seed=window, window=window)
    want, want_lse = expected_decode(q, ks, vs, scale=0.3, window=window, return_lse=True)
    got = frugal.paged_attention(q, kc, vc, tables, seq_lens, scale=0.3, window=window,
                                 backend=backend, return_lse=True)
    check_pair(got, want, want_lse, q.dtype)


def test_decode_lse_triton_split_and_unsplit(poison):
    if "triton" not in BACKENDS:
        pytest.skip("no Triton interpreter (TRITON_INTERPRET is not set)")
    from frugal.kernels import paged_attention as pa

    lens = [70, 1, 0, 33]
    q, (kc, vc, _, _, tables, seq_lens), ks, vs = case(lens, 2, 4, 64, torch.float16, seed=9)
    cfg = pa.pick_config(q, 64)
    for c in ({**cfg, "programs_per_sm": 0}, {**cfg, "min_partition": cfg["BLOCK_N"]}):
        got = pa.paged_attention(q, kc, vc, tables, seq_lens, 0.125, config=c, num_sms=132,
                                 return_lse=True)
        check_pair(got, *expected_decode(q, ks, vs, scale=0.125, return_lse=True), q.dtype)
    assert pa.split_plan({**cfg, "min_partition": cfg["BLOCK_N"]}, 8, tables.shape[1] * 16,
                         132)[0] > 1
    out = pa.paged_attention(q, kc, vc, tables, seq_lens, 0.125)
    assert torch.is_tensor(out)  # without return_lse: the output alone


def test_decode_lse_non_contiguous_q_and_bf16(poison):
    gen = torch.Generator().manual_seed(4)
    ks, vs = random_kv([3, 40, 16, 0], 2, 64, gen)
    for dtype, backends in ((torch.float32, BACKENDS), (torch.bfloat16, ["cpu", "torch"])):
        kc, vc, _, _, tables, lens = build_paged(ks, vs, 16, dtype, "cpu", gen)
        wide = torch.randn(8, 4, 128, generator=gen).to(dtype)
        q = wide.transpose(0, 1)[:, :, ::2]  # [4, 8, 64], neither dim contiguous
        want, want_lse = expected_decode(q, rounded(ks, dtype), rounded(vs, dtype),
                                         return_lse=True)
        for backend in backends:
            if backend not in BACKENDS:
                continue
            got = frugal.paged_attention(q, kc, vc, tables, lens, backend=backend,
                                         return_lse=True)
            check_pair(got, want, want_lse, dtype)


# ------------------------------------------------------------------------ prefill


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, "int8"], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_lse_matches_float64(poison, backend, dtype, window):
    lens = [1, 16, 37, 20, 0, 50]
    q_lens = [1, 16, 5, 20, 0, 3]
    # A chunk of n queries reads back to seq_len - n - window + 1: the cache drops (NaN, -1)
    # only the blocks before that.
    held = None if window is None else window + max(q_lens) - 1
    q_full, (kc, vc, ksc, vsc, tables, seq_lens), ks, vs = case(lens, 2, 3, 32, dtype,
                                                                seed=11, window=held)
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(sum(q_lens), 6, 32, generator=gen).to(q_full.dtype)
    want, want_lse = expected_prefill(q, ks, vs, q_lens, 0.25, window)
    got = frugal.paged_prefill_attention(q, kc, vc, tables, seq_lens,
                                         torch.tensor(q_lens, dtype=torch.int32), scale=0.25,
                                         window=window, k_scale=ksc, v_scale=vsc,
                                         backend=backend, return_lse=True)
    check_pair(got, want, want_lse, q.dtype)
    # 4-d q: lse [B, T, Hq].
    q4 = torch.randn(3, 2, 6, 32, generator=gen).to(q.dtype)
    sub = [1, 2, 3]
    got = frugal.paged_prefill_attention(q4, kc, vc, tables[sub], seq_lens[sub], scale=0.25,
                                         window=window, k_scale=ksc, v_scale=vsc,
                                         backend=backend, return_lse=True)
    w, wl = expected_prefill(q4.reshape(6, 6, 32), [ks[i] for i in sub], [vs[i] for i in sub],
                             [2, 2, 2], 0.25, window)
    check_pair(got, w.view(3, 2, 6, 32), wl.view(3, 2, 6), q.dtype)


# ------------------------------------------------------------------------ CUDA (emulated)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"], ids=str)
def test_cuda_emulated_decode_lse(poison, emu, dtype, split):
    emu.configure(min_partition=16 if split else 10**6)
    lens = [1, 16, 77, 0, 40]
    q, (kc, vc, ksc, vsc, tables, seq_lens), ks, vs = case(lens, 2, 4, 64, dtype, seed=21)
    want, want_lse = expected_decode(q, ks, vs, scale=0.2, return_lse=True)
    got = torch.ops.frugal_emu.paged_attention_lse(q, kc, vc, tables, seq_lens, 0.2, 0, ksc,
                                                   vsc)
    assert (emu.last_plan()["splits"] > 1) == split
    tol = dict(rtol=1.6e-2, atol=1.6e-2) if dtype == torch.bfloat16 else None
    check_pair(got, want, want_lse, q.dtype, tol)
    assert (got[1][3] == -INF).all() and torch.equal(got[0][3], torch.zeros_like(got[0][3]))
    out = torch.ops.frugal_emu.paged_attention(q, kc, vc, tables, seq_lens, 0.2, 0, ksc, vsc)
    torch.testing.assert_close(out, got[0], rtol=0, atol=0)


@pytest.mark.parametrize("window", [None, 6])
def test_cuda_emulated_prefill_and_window_lse(poison, emu, window):
    lens = [1, 16, 37, 20, 50]
    q_lens = [1, 16, 5, 20, 3]
    _, (kc, vc, _, _, tables, seq_lens), ks, vs = case(lens, 2, 4, 64, torch.float16, seed=5,
                                                       window=window)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(sum(q_lens), 8, 64, generator=gen).half()
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    got = torch.ops.frugal_emu.paged_prefill_attention_lse(q, kc, vc, tables, seq_lens, cu,
                                                           0.125, window or 0, None, None)
    check_pair(got, *expected_prefill(q, ks, vs, q_lens, 0.125, window), q.dtype,
               dict(rtol=2e-3, atol=2e-3))
    dq = torch.randn(len(lens), 8, 64, generator=gen).half()
    got = torch.ops.frugal_emu.paged_attention_lse(dq, kc, vc, tables, seq_lens, 0.125,
                                                   window or 0, None, None)
    check_pair(got, *expected_decode(dq, ks, vs, 0.125, window, return_lse=True), dq.dtype,
               dict(rtol=2e-3, atol=2e-3))


# ------------------------------------------------------------------------ manager and plan


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_and_plan_return_lse(poison, backend):
    gen = torch.Generator().manual_seed(8)
    cache = PagedKVCache(1, 32, 8, 2, 32, dtype=torch.float32)
    lens = [5, 19]
    for sid, n in zip("ab", lens):
        cache.add_sequence(sid)
        cache.append(0, [sid], torch.randn(1, n, 2, 32, generator=gen),
                     torch.randn(1, n, 2, 32, generator=gen))
    q = torch.randn(2, 4, 32, generator=gen)
    kv = [gather(cache, sid, 0) for sid in "ab"]
    want, want_lse = expected_decode(q, [k for k, _ in kv], [v for _, v in kv], return_lse=True)
    check_pair(cache.attention(q, 0, ["a", "b"], backend=backend, return_lse=True), want,
               want_lse, q.dtype)
    # A prefill step of 3 tokens for "a", then a decode step for both, through plans.
    step = cache.plan(["a"], num_tokens=3, backend=backend)
    k, v = torch.randn(2, 3, 2, 32, generator=gen).unbind(0)
    step.append(0, k, v)
    qp = torch.randn(3, 4, 32, generator=gen)
    ka, va = gather(cache, "a", 0)
    want, want_lse = dense_attention(qp, ka, va, return_lse=True)
    check_pair(step.attention(qp, 0, return_lse=True), want, want_lse, qp.dtype)
    out = step.attention(qp, 0)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    step = cache.plan(["a", "b"], backend=backend)
    k, v = torch.randn(2, 2, 2, 32, generator=gen).unbind(0)
    step.append(0, k, v)
    kv = [gather(cache, sid, 0) for sid in "ab"]
    want, want_lse = expected_decode(q, [k for k, _ in kv], [v for _, v in kv], return_lse=True)
    check_pair(step.attention(q, 0, return_lse=True), want, want_lse, q.dtype)
