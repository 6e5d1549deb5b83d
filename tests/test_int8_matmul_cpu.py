"""The C++ CPU int8 ops (csrc/cpu/int8_matmul.cpp), called directly through torch.ops.frugal,
on every CPU ISA path: int32 results bit-exact against the int64 reference, dequantized ones
against a float64 computation of the same formula (and exactly against the fp32 reference)."""

import itertools
import os
import threading

import frugal
import pytest
import torch
from conftest import cpu_isas
from frugal import _ext, reference

pytestmark = pytest.mark.skipif(_ext.ext() is None, reason="frugal._C is not built")


@pytest.fixture
def cpu_isa(int8_isa):
    """Every level, AMX included (emulated on a CPU without it)."""
    return int8_isa

ops = torch.ops.frugal
MAX_K = 131071
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand_int8(shape, gen, low=-128):
    """Uniform int8 in [low, 127] with both extremes present. (a without -128, as the
    quantizers make it, takes the AVX2 vpmaddubsw tile; a with it the vpmaddwd one.)"""
    t = torch.randint(low, 128, shape, dtype=torch.int8, generator=gen)
    flat = t.view(-1)
    if flat.numel() >= 2:
        flat[0], flat[-1] = low, 127
    return t


def assert_exact(got, a, b, what):
    want = reference.int8_mm(a, b)
    assert got.dtype == torch.int32 and got.shape == want.shape, what
    assert torch.equal(got, want), f"{what}: max |diff| {(got.long() - want.long()).abs().max()}"


@pytest.mark.parametrize("a_low", [-128, -127])
@pytest.mark.parametrize("K", [1, 3, 4, 5, 64, 67, 255, 1000])
def test_int8_mm_exact(cpu_isa, poison, K, a_low):
    gen = torch.Generator().manual_seed(K)
    for M, N in itertools.product([1, 2, 3, 4, 5, 16, 17, 63, 130], [1, 7, 16, 33, 100]):
        a, b = rand_int8((M, K), gen, a_low), rand_int8((N, K), gen)
        assert_exact(ops.int8_mm(a, b), a, b, f"{cpu_isa} M={M} N={N} K={K}")


def test_int8_mm_one_group_many_rows(cpu_isa, poison):
    # Few columns and many rows: the rows are split across threads.
    gen = torch.Generator().manual_seed(1)
    a, b = rand_int8((301, 70), gen), rand_int8((20, 70), gen)
    assert_exact(ops.int8_mm(a, b), a, b, cpu_isa)


def test_int8_mm_k_blocks_and_group_sets(cpu_isa, poison):
    # K over 4096 is summed in blocks; with many groups a task takes several at once.
    gen = torch.Generator().manual_seed(9)
    threads = torch.get_num_threads()
    try:
        for n_threads in [1, 2]:
            torch.set_num_threads(n_threads)
            for M, N, K in [(13, 1100, 4100), (7, 70, 4100), (40, 1030, 2049)]:
                a, b = rand_int8((M, K), gen), rand_int8((N, K), gen)
                what = f"{cpu_isa} {n_threads} threads M={M} N={N} K={K}"
                assert_exact(ops.int8_mm(a, b), a, b, what)
                a_scale, b_scale = torch.rand(M, generator=gen), torch.rand(N, generator=gen)
                want = reference.int8_scaled_mm(a, b, a_scale, b_scale, None, torch.bfloat16)
                packed = ops.int8_pack_weight(b)
                got = ops.int8_scaled_mm_packed(a, packed, a_scale, b_scale, None, torch.bfloat16)
                assert torch.equal(got, want), what
    finally:
        torch.set_num_threads(threads)


def test_int8_mm_worst_case_k(cpu_isa, poison):
    # K = 131071 all -128: every sum is 131071 * 2^14 = 2^31 - 2^14, the largest that fits.
    a = torch.full((3, MAX_K), -128, dtype=torch.int8)
    b = torch.full((2, MAX_K), -128, dtype=torch.int8)
    b[1] = 127
    got = ops.int8_mm(a, b)
    assert got[0, 0] == MAX_K * 128 * 128 and got[0, 1] == -MAX_K * 128 * 127
    assert_exact(got, a, b, cpu_isa)
    packed = ops.int8_pack_weight(b)
    ones = torch.ones(3)
    y = ops.int8_scaled_mm_packed(a, packed, ones, torch.ones(2), None, torch.float32)
    assert torch.equal(y, got.float())


def test_int8_mm_largest_products_without_min_a(cpu_isa, poison):
    """a in [-127, 127] (the AVX2 vpmaddubsw tile): pairs of |b| = 128 times |a| = 127 are the
    largest int16 pair sums (2 * 128 * 127), of either sign, and K = 131071 of them the largest
    int32 sums; b = 0 and a = 0 lanes (vpsignb zeroes them) in between."""
    a = torch.tensor([[-127], [127], [-127], [0]], dtype=torch.int8).repeat(1, MAX_K)
    a[2, 1::3] = 0
    b = torch.tensor([[-128], [127], [-128], [0]], dtype=torch.int8).repeat(1, MAX_K)
    b[2, ::5] = 127
    b[3, ::2] = -128
    got = ops.int8_mm(a, b)
    assert got[0, 0] == MAX_K * 127 * 128 and got[1, 0] == -MAX_K * 127 * 128
    assert_exact(got, a, b, cpu_isa)
    ones = torch.ones(4)
    y = ops.int8_scaled_mm_packed(a, ops.int8_pack_weight(b), ones, ones, None, torch.float32)
    assert torch.equal(y, got.float())


def test_int8_mm_non_contiguous(cpu_isa, poison):
    gen = torch.Generator().manual_seed(2)
    base_a = rand_int8((40, 150), gen)
    base_b = rand_int8((90, 150), gen)
    a_views = [base_a[:, ::2], base_a[1:30, 7:], rand_int8((75, 23), gen).t(), base_a[::3]]
    b_views = [base_b[:, ::2], base_b[::2, 7:], rand_int8((75, 37), gen).t(), base_b[5:20]]
    for a, b in zip(a_views, b_views):
        assert not a.is_contiguous() or not b.is_contiguous()
        what = f"{cpu_isa} a strides {a.stride()} b strides {b.stride()}"
        assert_exact(ops.int8_mm(a, b), a, b, what)
        a_scale, b_scale = torch.rand(a.shape[0]), torch.rand(b.shape[0])
        want = reference.int8_scaled_mm(a, b, a_scale, b_scale, None, torch.float32)
        got = ops.int8_scaled_mm(a, b, a_scale, b_scale, None, torch.float32)
        assert torch.equal(got, want)
        got = ops.int8_scaled_mm_packed(
            a, ops.int8_pack_weight(b), a_scale, b_scale, None, torch.float32
        )
        assert torch.equal(got, want)


def test_few_rows_stream_b_unpacked(cpu_isa, poison):
    # M <= 4 reads b's rows as they are (no packing): row strides other than K, N across
    # several 64-column groups, K tails of every length, both thread counts; the results are
    # the packed path's bits.
    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    try:
        for n_threads, (M, N, K) in itertools.product([1, 2], [(1, 131, 77), (4, 200, 4100),
                                                               (3, 65, 33), (2, 5, 191)]):
            torch.set_num_threads(n_threads)
            a = rand_int8((M, K + 3), gen)[:, 3:]
            b = rand_int8((N, K + 9), gen)[:, 5:K + 5]
            what = f"{cpu_isa} {n_threads} threads M={M} N={N} K={K}"
            assert_exact(ops.int8_mm(a, b), a, b, what)
            a_scale, b_scale = torch.rand(M, generator=gen), torch.rand(N, generator=gen)
            got = ops.int8_scaled_mm(a, b, a_scale, b_scale, None, torch.float16)
            packed = ops.int8_scaled_mm_packed(a, ops.int8_pack_weight(b.contiguous()), a_scale,
                                               b_scale, None, torch.float16)
            assert torch.equal(got, packed), what
            assert torch.equal(got, reference.int8_scaled_mm(a, b, a_scale, b_scale, None,
                                                             torch.float16)), what
    finally:
        torch.set_num_threads(threads)


def scaled_inputs(M, N, K, gen, a_scalar, b_scalar, bias_dtype):
    a, b = rand_int8((M, K), gen), rand_int8((N, K), gen)
    # Outputs of order 1..1e3, well inside fp16's range.
    a_scale = torch.rand(1 if a_scalar else M, generator=gen) * 0.02 + 1e-3
    b_scale = torch.rand(1 if b_scalar else N, generator=gen) * 0.02 + 1e-3
    bias = None
    if bias_dtype is not None:
        bias = (torch.randn(N, generator=gen) * 10).to(bias_dtype)
    return a, b, a_scale, b_scale, bias


def float64_formula(a, b, a_scale, b_scale, bias):
    acc = a.double() @ b.double().t()
    y = acc * a_scale.double().reshape(-1, 1) * b_scale.double().reshape(1, -1)
    return y if bias is None else y + bias.double()


def check_scaled(got, a, b, a_scale, b_scale, bias, out_dtype, what):
    assert got.dtype == out_dtype and got.shape == (a.shape[0], b.shape[0]), what
    # Same fp32 operations in the same order as the reference: the same bits.
    want = reference.int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype)
    diff = (got.double() - want.double()).abs().max()
    assert torch.equal(got, want), f"{what}: max |diff| {diff}"
    # And the formula itself: one rounding to out_dtype plus a few fp32 roundings.
    exact = float64_formula(a, b, a_scale, b_scale, bias)
    terms = (exact - (0 if bias is None else bias.double())).abs()
    if bias is not None:
        terms = terms + bias.double().abs()
    eps_out = torch.finfo(out_dtype).eps
    eps32 = torch.finfo(torch.float32).eps
    bound = eps_out * exact.abs() + 4 * eps32 * terms + 1e-30
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"{what}: worst error / bound {(err / bound).max()}"


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_int8_scaled_mm(cpu_isa, poison, out_dtype):
    gen = torch.Generator().manual_seed(3)
    cases = [
        # M, N, K, a_scale numel 1, b_scale numel 1, bias dtype
        (1, 1, 1, False, False, None),
        (5, 33, 67, False, False, torch.float32),
        (17, 100, 255, True, False, torch.float16),
        (63, 16, 64, False, True, torch.bfloat16),
        (130, 7, 1000, True, True, torch.float32),
        (2, 129, 5, False, False, None),
    ]
    for M, N, K, a_scalar, b_scalar, bias_dtype in cases:
        a, b, a_scale, b_scale, bias = scaled_inputs(M, N, K, gen, a_scalar, b_scalar, bias_dtype)
        what = f"{cpu_isa} M={M} N={N} K={K} bias={bias_dtype}"
        got = ops.int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype)
        check_scaled(got, a, b, a_scale, b_scale, bias, out_dtype, what)
        b_scale_n = b_scale.expand(N).contiguous()
        packed = ops.int8_pack_weight(b)
        got_packed = ops.int8_scaled_mm_packed(a, packed, a_scale, b_scale_n, bias, out_dtype)
        assert torch.equal(got_packed, got), what


def dynamic_linear_inputs(M, N, K, gen, dtype, with_bias):
    """x with a row of zeros and a row holding inf (when M >= 3), b, b_scale, bias."""
    x = (torch.randn(M, K, generator=gen) * 3).to(dtype)
    if M >= 3:
        x[1] = 0
        x[2, K // 2] = float("inf")
    b = rand_int8((N, K), gen)
    b_scale = torch.rand(N, generator=gen) * 0.02 + 1e-3
    bias = (torch.randn(N, generator=gen) * 10).to(dtype) if with_bias else None
    return x, b, b_scale, bias


def check_dynamic_linear(got, x, b, b_scale, bias, what):
    """got must be quantize_per_token then int8_scaled_mm_packed, bit for bit (the ops, and the
    PyTorch reference with its float64 bounds); a row holding inf or NaN gives a NaN row."""
    assert got.dtype == x.dtype and got.shape == (x.shape[0], b.shape[0]), what
    q, s = ops.quantize_per_token(x)
    two_ops = ops.int8_scaled_mm_packed(q, ops.int8_pack_weight(b), s, b_scale, bias, x.dtype)
    assert torch.equal(got.isnan(), two_ops.isnan()), what
    assert torch.equal(got.nan_to_num(), two_ops.nan_to_num()), what
    finite = x.isfinite().all(1)
    assert got[~finite].isnan().all(), what
    q_ref, s_ref = reference.quantize_per_token(x[finite])
    check_scaled(got[finite], q_ref, b, s_ref, b_scale, bias, x.dtype, what)


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
def test_int8_dynamic_linear_packed(cpu_isa, poison, dtype):
    gen = torch.Generator().manual_seed(10)
    # Long rows first: the rows of a packed for a call land in memory kept from earlier calls.
    for M, N, K, with_bias in [
        (130, 100, 1000, True),
        (7, 70, 4100, False),
        (1, 7, 1, True),
        (5, 33, 67, False),
        (17, 129, 255, True),
        (64, 16, 5, True),
    ]:
        x, b, b_scale, bias = dynamic_linear_inputs(M, N, K, gen, dtype, with_bias)
        got = ops.int8_dynamic_linear_packed(x, ops.int8_pack_weight(b), b_scale, bias)
        check_dynamic_linear(got, x, b, b_scale, bias, f"{cpu_isa} M={M} N={N} K={K}")


def test_int8_dynamic_linear_packed_views_and_empty(cpu_isa, poison):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(40, 150, generator=gen)
    b = rand_int8((23, 75), gen)
    packed, b_scale = ops.int8_pack_weight(b), torch.rand(23, generator=gen)
    for x in [base[:, ::2], base[::3, 75:], torch.randn(75, 9, generator=gen).t()]:
        assert not x.is_contiguous()
        got = ops.int8_dynamic_linear_packed(x, packed, b_scale, None)
        check_dynamic_linear(got, x, b, b_scale, None, f"{cpu_isa} x strides {x.stride()}")
    y = ops.int8_dynamic_linear_packed(torch.empty(0, 75), packed, b_scale, None)
    assert y.shape == (0, 23)
    bias = torch.arange(5.0)
    empty_b = ops.int8_pack_weight(torch.empty(5, 0, dtype=torch.int8))
    y = ops.int8_dynamic_linear_packed(torch.empty(3, 0), empty_b, torch.ones(5), bias)
    assert torch.equal(y, bias.expand(3, 5))


def test_large_outputs_and_scratch(poison):
    # Outputs from 8 MiB on are hinted to huge pages; packed rows over 32 MiB live for one call;
    # many rows times many groups are split into row blocks of at most 2^28 multiply-adds.
    gen = torch.Generator().manual_seed(12)
    a, b = rand_int8((1100, 2049), gen), rand_int8((1030, 2049), gen)
    assert_exact(ops.int8_mm(a, b), a, b, "row blocks by size")
    x, b, b_scale, bias = dynamic_linear_inputs(2100, 1030, 8, gen, torch.float32, True)
    got = ops.int8_dynamic_linear_packed(x, ops.int8_pack_weight(b), b_scale, bias)
    check_dynamic_linear(got, x, b, b_scale, bias, "8.3 MiB output")
    a = rand_int8((2100, 8), gen)
    assert_exact(ops.int8_mm(a, b), a, b, "8.3 MiB int32 output")
    a, b = rand_int8((4200, 8192), gen), rand_int8((17, 8192), gen)  # 33.6 MiB of packed rows
    got = ops.int8_mm(a, b)
    for m in range(0, 4200, 600):
        assert_exact(got[m : m + 600], a[m : m + 600], b, f"rows {m}..{m + 600}")


def test_int8_dynamic_linear_packed_from_threads(poison):
    # Each calling thread packs its rows into its own kept memory.
    gen = torch.Generator().manual_seed(13)
    b = rand_int8((70, 300), gen)
    packed, b_scale = ops.int8_pack_weight(b), torch.rand(70, generator=gen)
    xs = [torch.randn(m, 300, generator=gen) for m in (50, 9, 120, 33)]
    want = [ops.int8_dynamic_linear_packed(x, packed, b_scale, None) for x in xs]
    got = {}

    def run(i):
        for _ in range(20):
            got[i] = ops.int8_dynamic_linear_packed(xs[i], packed, b_scale, None)
            assert torch.equal(got[i], want[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[i], want[i]) for i in range(len(xs)))


def test_opcheck_int8_dynamic_linear_packed():
    gen = torch.Generator().manual_seed(14)
    _, b, b_scale, bias = dynamic_linear_inputs(5, 19, 37, gen, torch.float32, True)
    x = torch.randn(5, 37, generator=gen)  # finite: opcheck compares outputs with NaN != NaN
    torch.library.opcheck(
        ops.int8_dynamic_linear_packed.default, (x, ops.int8_pack_weight(b), b_scale, bias)
    )


def test_bf16_and_fp16_rounding_ties(cpu_isa, poison):
    # acc * 1 * 1 + bias lands exactly on halfway points of bf16 and fp16: ties go to even.
    a = torch.ones(1, 1, dtype=torch.int8)
    b = torch.ones(8, 1, dtype=torch.int8)
    one = torch.ones(1)
    bias = torch.tensor([0.0, 2**-8, 3 * 2**-8, 2**-11, 3 * 2**-11, 255.0, 2049.0, -(2**-8)])
    for out_dtype in [torch.bfloat16, torch.float16]:
        got = ops.int8_scaled_mm(a, b, one, one, bias, out_dtype)
        want = (1.0 + bias).to(out_dtype).reshape(1, 8)
        assert torch.equal(got, want), (out_dtype, got, want)


def test_packed_buffer_works_under_every_isa(poison):
    mod = _ext.ext()
    previous = mod.cpu_isa()
    gen = torch.Generator().manual_seed(4)
    a, b = rand_int8((23, 301), gen), rand_int8((77, 301), gen)
    a_scale, b_scale = torch.rand(23), torch.rand(77)
    bias = torch.randn(77)
    want = reference.int8_scaled_mm(a, b, a_scale, b_scale, bias, torch.float32)
    try:
        for pack_isa in cpu_isas():
            mod.set_cpu_isa(pack_isa)
            packed = ops.int8_pack_weight(b)
            for run_isa in cpu_isas():
                mod.set_cpu_isa(run_isa)
                got = ops.int8_scaled_mm_packed(a, packed, a_scale, b_scale, bias, torch.float32)
                assert torch.equal(got, want), (pack_isa, run_isa)
    finally:
        mod.set_cpu_isa(previous)


def test_pack_weight_format():
    b = torch.arange(-40, 40, dtype=torch.int8).reshape(16, 5)  # K = 5: one padded k4 step
    packed = ops.int8_pack_weight(b)
    assert packed.dtype == torch.int8 and packed.dim() == 1
    assert packed.numel() == 64 + 4 * 16 + 16 * 2 * 4
    assert bytes(packed[:8].tolist()) == b"frgi8w01"
    header = packed[8:24].view(torch.int64)
    assert header.tolist() == [16, 5]
    comp = packed[64:128].view(torch.int32)
    assert torch.equal(comp, -128 * b.int().sum(1))
    data = packed[128:].view(2, 16, 4)  # [K4][W][4]
    assert torch.equal(data[0], b[:, :4])
    assert torch.equal(data[1, :, 0], b[:, 4]) and not data[1, :, 1:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_int8_weight_only_mm(cpu_isa, poison, dtype):
    gen = torch.Generator().manual_seed(5)
    eps32 = torch.finfo(torch.float32).eps
    # M <= 16 streams int8 rows of b; M > 16 dequantizes blocks for at::mm.
    for M, N, K, with_bias in [
        (1, 7, 1, True),
        (1, 100, 1000, False),
        (3, 33, 67, True),
        (16, 16, 255, True),
        (5, 5, 4, False),
        (17, 100, 64, True),
        (40, 300, 70, False),
    ]:
        x = torch.randn(M, K, generator=gen).to(dtype)
        b = rand_int8((N, K), gen)
        b_scale = torch.rand(N, generator=gen) / 64
        bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
        got = ops.int8_weight_only_mm(x, b, b_scale, bias)
        assert got.dtype == dtype and got.shape == (M, N)
        exact = (x.double() @ b.double().t()) * b_scale.double()
        abs_sum = (x.double().abs() @ b.double().abs().t()) * b_scale.double()
        if bias is not None:
            exact = exact + bias.double()
            abs_sum = abs_sum + bias.double().abs()
        bound = torch.finfo(dtype).eps * exact.abs() + (K + 2) * eps32 * abs_sum + 1e-6
        err = (got.double() - exact).abs()
        assert (err <= bound).all(), f"{cpu_isa} M={M} N={N} K={K}: {(err / bound).max()}"


def test_weight_only_scalar_b_scale_and_views(poison):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(40, 3, generator=gen).t()  # [3, 40], not K-contiguous
    b_views = [rand_int8((80, 60), gen)[::2, 10:50], rand_int8((40, 40), gen).t()]
    scales = [torch.tensor([0.25]), torch.rand(40, generator=gen)]
    for b, scale in itertools.product(b_views, scales):
        got = ops.int8_weight_only_mm(x, b, scale, None)
        want = reference.int8_weight_only_mm(x, b, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_empty_and_k_zero(cpu_isa, poison):
    e = torch.empty
    for M, N in [(0, 5), (4, 0), (0, 0)]:
        a, b = e(M, 8, dtype=torch.int8), e(N, 8, dtype=torch.int8)
        assert ops.int8_mm(a, b).shape == (M, N)
        y = ops.int8_scaled_mm(a, b, torch.ones(M), torch.ones(N), None, torch.float16)
        assert y.shape == (M, N) and y.dtype == torch.float16
        y = ops.int8_scaled_mm_packed(
            a, ops.int8_pack_weight(b), torch.ones(M), torch.ones(N), None, torch.float32
        )
        assert y.shape == (M, N)
        assert ops.int8_weight_only_mm(e(M, 8), b, torch.ones(N), None).shape == (M, N)
    a, b = e(3, 0, dtype=torch.int8), e(5, 0, dtype=torch.int8)
    assert torch.equal(ops.int8_mm(a, b), torch.zeros(3, 5, dtype=torch.int32))
    bias = torch.arange(5.0)
    y = ops.int8_scaled_mm(a, b, torch.ones(3), torch.ones(5), bias, torch.float32)
    assert torch.equal(y, bias.expand(3, 5))
    y = ops.int8_scaled_mm_packed(
        a, ops.int8_pack_weight(b), torch.ones(3), torch.ones(5), bias, torch.float32
    )
    assert torch.equal(y, bias.expand(3, 5))
    for M in [3, 20]:  # the streaming kernel and the at::mm path
        y = ops.int8_weight_only_mm(e(M, 0), b, torch.ones(5), bias)
        assert torch.equal(y, bias.expand(M, 5))


def test_errors():
    a = torch.zeros(4, 8, dtype=torch.int8)
    b = torch.zeros(6, 8, dtype=torch.int8)
    sa, sb = torch.ones(4), torch.ones(6)
    f16 = torch.float16
    cases = [
        (lambda: ops.int8_mm(a.float(), b), r"int8_mm: a must be int8; got Float"),
        (lambda: ops.int8_mm(a, b.half()), r"int8_mm: b must be int8; got Half"),
        (
            lambda: ops.int8_mm(a, b[0]),
            r"int8_mm: b must be 2-D \[N, K\]; got a 1-D tensor of shape \[8\]",
        ),
        (
            lambda: ops.int8_mm(a, b[None]),
            r"b must be 2-D \[N, K\]; got a 3-D tensor of shape \[1, 6, 8\]",
        ),
        (
            lambda: ops.int8_mm(a, b[:, :5]),
            r"must have the same K; got a.size\(1\) = 8, b.size\(1\) = 5",
        ),
        (
            lambda: ops.int8_mm(
                torch.zeros(1, MAX_K + 1, dtype=torch.int8),
                torch.zeros(1, MAX_K + 1, dtype=torch.int8),
            ),
            r"K must be <= 131071 \(larger K can overflow the int32 accumulator\); got K = 131072",
        ),
        (
            lambda: ops.int8_scaled_mm(a, b, torch.ones(3), sb, None, f16),
            r"int8_scaled_mm: a_scale must have M = 4 or 1 elements; got 3",
        ),
        (
            lambda: ops.int8_scaled_mm(a, b, sa, torch.ones(5), None, f16),
            r"b_scale must have N = 6 or 1 elements; got 5",
        ),
        (
            lambda: ops.int8_scaled_mm(a, b, sa.double(), sb, None, f16),
            r"a_scale must be float32; got Double",
        ),
        (
            lambda: ops.int8_scaled_mm(a, b, sa, sb.half(), None, f16),
            r"b_scale must be float32; got Half",
        ),
        (
            lambda: ops.int8_scaled_mm(a, b, sa, sb, torch.ones(5), f16),
            r"bias must have shape \[N\] = \[6\]; got \[5\]",
        ),
        (
            lambda: ops.int8_scaled_mm(a, b, sa, sb, torch.ones(6).double(), f16),
            r"bias must be float32, float16 or bfloat16; got Double",
        ),
        (
            lambda: ops.int8_scaled_mm(a, b, sa, sb, None, torch.int32),
            r"out_dtype must be float32, float16 or bfloat16; got Int",
        ),
        (lambda: ops.int8_pack_weight(b.float()), r"int8_pack_weight: b must be int8; got Float"),
        (
            lambda: ops.int8_pack_weight(torch.zeros(2, 3, 4, dtype=torch.int8)),
            r"int8_pack_weight: b must be 2-D \[N, K\]; got a 3-D tensor",
        ),
        (
            lambda: ops.int8_pack_weight(torch.zeros(1, MAX_K + 1, dtype=torch.int8)),
            r"int8_pack_weight: K must be <= 131071.*got K = 131072",
        ),
        (
            lambda: ops.int8_weight_only_mm(a, b, sb, None),
            r"int8_weight_only_mm: x must be float32, float16 or bfloat16; got Char",
        ),
        (
            lambda: ops.int8_weight_only_mm(a.float(), b[:, :7], sb, None),
            r"x \[M, K\] and b \[N, K\] must have the same K; got x.size\(1\) = 8, b.size\(1\) = 7",
        ),
        (
            lambda: ops.int8_weight_only_mm(a.float(), b, torch.ones(5), None),
            r"int8_weight_only_mm: b_scale must have N = 6 or 1 elements; got 5",
        ),
        (
            lambda: ops.int8_weight_only_mm(a.float(), b.float(), sb, None),
            r"int8_weight_only_mm: b must be int8; got Float",
        ),
    ]
    for fn, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fn()


def test_packed_errors():
    a = torch.zeros(4, 8, dtype=torch.int8)
    sa = torch.ones(4)
    packed = ops.int8_pack_weight(torch.zeros(6, 8, dtype=torch.int8))
    f32 = torch.float32
    run = ops.int8_scaled_mm_packed
    cases = [
        (
            lambda: run(a, packed, sa, torch.ones(7), None, f32),
            r"int8_scaled_mm_packed: b_packed holds a weight with N = 6; "
            r"b_scale has N = 7 elements",
        ),
        (
            lambda: run(a[:, :4], packed, sa, torch.ones(6), None, f32),
            r"b_packed holds a weight with K = 8; a has K = a.size\(1\) = 4",
        ),
        (
            lambda: run(
                a,
                ops.int8_pack_weight(torch.zeros(6, 12, dtype=torch.int8)),
                sa,
                torch.ones(6),
                None,
                f32,
            ),
            r"b_packed holds a weight with K = 12; a has K = a.size\(1\) = 8",
        ),
        (
            lambda: run(a, packed[:-4], sa, torch.ones(6), None, f32),
            r"b_packed holds N = 6, K = 8, which take \d+ bytes; got \d+ bytes",
        ),
        (
            lambda: run(a, torch.zeros(256, dtype=torch.int8), sa, torch.ones(6), None, f32),
            r"b_packed is not an int8_pack_weight buffer \(no 'frgi8w01' header\)",
        ),
        (
            lambda: run(a, packed.float(), sa, torch.ones(6), None, f32),
            r"b_packed must be the 1-D int8 buffer int8_pack_weight returns; got a 1-D Float",
        ),
        (
            lambda: run(a, packed, sa, torch.ones(1, 6), None, f32),
            r"b_scale must be 1-D \[N\] \(N is read from it\); got shape \[1, 6\]",
        ),
        (
            lambda: run(a, packed, sa, torch.ones(6).half(), None, f32),
            r"int8_scaled_mm_packed: b_scale must be float32; got Half",
        ),
        (
            lambda: run(a.float(), packed, sa, torch.ones(6), None, f32),
            r"int8_scaled_mm_packed: a must be int8; got Float",
        ),
    ]
    x = a.float()
    fused = ops.int8_dynamic_linear_packed
    cases += [
        (
            lambda: fused(a, packed, torch.ones(6), None),
            r"int8_dynamic_linear_packed: x must be float32, float16 or bfloat16; got Char",
        ),
        (
            lambda: fused(x[0], packed, torch.ones(6), None),
            r"int8_dynamic_linear_packed: x must be 2-D \[M, K\]; got a 1-D tensor of shape \[8\]",
        ),
        (
            lambda: fused(x[:, :5], packed, torch.ones(6), None),
            r"b_packed holds a weight with K = 8; x has K = x.size\(1\) = 5",
        ),
        (
            lambda: fused(x, packed, torch.ones(7), None),
            r"int8_dynamic_linear_packed: b_packed holds a weight with N = 6; "
            r"b_scale has N = 7 elements",
        ),
        (
            lambda: fused(x, packed, torch.ones(6).double(), None),
            r"int8_dynamic_linear_packed: b_scale must be float32; got Double",
        ),
        (
            lambda: fused(x, packed, torch.ones(6), torch.ones(5)),
            r"bias must have shape \[N\] = \[6\]; got \[5\]",
        ),
        (
            lambda: fused(x, packed[1:], torch.ones(6), None),
            r"int8_dynamic_linear_packed: b_packed is not an int8_pack_weight buffer",
        ),
    ]
    for fn, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fn()


@pytest.mark.parametrize("block_k4", [16, 17, 23, 40])
def test_k_blocks_of_any_knob_value(cpu_isa, poison, block_k4):
    # The K blocks of the packed GEMM for any int8_block_k4: on AMX they are rounded up to whole
    # tiles (16 k4 steps), so only the last block has a tail; every depth is exact.
    gen = torch.Generator().manual_seed(block_k4)
    for M, N, K in [(37, 150, 300), (16, 64, 256), (5, 17, 65), (21, 70, 4)]:
        a, b = rand_int8((M, K), gen), rand_int8((N, K), gen)
        with frugal.cpu_knobs(int8_block_k4=block_k4):
            got = ops.int8_mm(a, b)
            packed = ops.int8_scaled_mm_packed(a, ops.int8_pack_weight(b), torch.ones(M),
                                               torch.ones(N), None, torch.float32)
        assert_exact(got, a, b, f"{cpu_isa} block_k4={block_k4} M={M} N={N} K={K}")
        assert torch.equal(packed, got.float())


def test_amx_state_reported():
    mod = _ext.ext()
    emulation, why_not = mod.cpu_amx()
    from_env = os.environ.get("FRUGAL_CPU_AMX_EMULATION") == "1"
    assert emulation == ("emulated" if from_env else "")
    assert (why_not == "") == (mod.detected_cpu_isa() == "amx_int8"), why_not
    before = mod.set_cpu_amx_emulation(True)
    try:
        assert before is from_env and mod.cpu_amx()[0] == "emulated"
    finally:
        mod.set_cpu_amx_emulation(before)
    assert mod.cpu_amx()[0] == emulation
