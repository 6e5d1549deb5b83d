"""The Triton int8 kernels (``frugal.kernels.int8_matmul``) called directly: on CUDA tensors
with a GPU, else on CPU tensors under the Triton interpreter.

int8_mm is checked bit-exact; the fused epilogues against the same formula in float64 within a
bound derived from fp32 rounding and the output dtype's rounding. bf16 outputs and bf16 inputs
are not checked numerically under the interpreter (its bf16 casts and bf16 dots are wrong);
they are compiled here and by ``frugal check``. Running this file as a script (no
TRITON_INTERPRET) compiles a few specs for sm_80 / sm_90 and prints what their PTX holds.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import frugal

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
U32 = 2.0**-24  # fp32 unit roundoff
UNIT = {torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
TINY = {torch.float16: 2.0**-25, torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134}

# Every (M, N, K) of M in {1, 3, 16, 17, 70}, N in {1, 7, 33, 130}, K in {1, 5, 64, 100, 300}.
MS, NS, KS = (1, 3, 16, 17, 70), (1, 7, 33, 130), (1, 5, 64, 100, 300)
# Small configs that force many tiles, grouped ordering and split-K on small shapes.
SPLIT_CFG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4,
             "num_stages": 2, "split_k": 4}
TILED_CFG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3, "num_warps": 4,
             "num_stages": 2}


def _kernels():
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set (conftest sets it)")
    from frugal.kernels import int8_matmul

    return int8_matmul


def rand_int8(shape, gen):
    t = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    flat = t.view(-1)
    flat[: min(2, flat.numel())] = torch.tensor([-128, 127], dtype=torch.int8)[: flat.numel()]
    return t.to(DEVICE)


def assert_exact(got, a, b):
    from frugal import reference

    want = reference.int8_mm(a.cpu(), b.cpu())
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got.cpu(), want), (got.cpu() - want).abs().max()


@pytest.mark.parametrize("M", MS)
def test_int8_mm_exact_every_shape(poison, M):
    km = _kernels()
    gen = torch.Generator().manual_seed(M)
    for N in NS:
        for K in KS:
            a, b = rand_int8((M, K), gen), rand_int8((N, K), gen)
            assert_exact(km.int8_mm(a, b), a, b)


def test_int8_mm_extremes_and_the_k_limit(poison):
    km = _kernels()
    for K in (300, 1000):
        for va, vb in ((-128, -128), (-128, 127), (127, 127)):
            a = torch.full((17, K), va, dtype=torch.int8, device=DEVICE)
            b = torch.full((5, K), vb, dtype=torch.int8, device=DEVICE)
            assert_exact(km.int8_mm(a, b), a, b)
    # The largest K the API allows: 128 * 128 * 131071 = 2**31 - 16384 fits int32.
    K = km.INT8_MAX_K
    a = torch.full((1, K), -128, dtype=torch.int8, device=DEVICE)
    got = km.int8_mm(a, a.clone())
    assert got.item() == 128 * 128 * K
    with pytest.raises(AssertionError, match="int32 accumulation could overflow"):
        km.int8_mm(torch.zeros((1, K + 1), dtype=torch.int8, device=DEVICE),
                   torch.zeros((1, K + 1), dtype=torch.int8, device=DEVICE))


def test_empty_shapes(poison):
    km = _kernels()
    i8 = dict(dtype=torch.int8, device=DEVICE)
    assert km.int8_mm(torch.zeros(0, 8, **i8), torch.zeros(5, 8, **i8)).shape == (0, 5)
    one = torch.ones(1, device=DEVICE)
    y = km.int8_scaled_mm(torch.zeros(3, 8, **i8), torch.zeros(0, 8, **i8), one, one, None,
                          torch.float16)
    assert y.shape == (3, 0) and y.dtype == torch.float16
    assert torch.equal(km.int8_mm(torch.ones(3, 0, **i8), torch.ones(5, 0, **i8)).cpu(),
                       torch.zeros(3, 5, dtype=torch.int32))


@pytest.mark.parametrize("cfg", [SPLIT_CFG, TILED_CFG], ids=["split_k", "grouped"])
def test_split_k_and_grouped_ordering(poison, cfg):
    km = _kernels()
    gen = torch.Generator().manual_seed(3)
    for M, N, K in [(70, 130, 300), (16, 33, 100), (3, 130, 64), (17, 7, 5), (1, 1, 300)]:
        split, _ = km._split(cfg, M, N, K, torch.device(DEVICE))
        if cfg is SPLIT_CFG and K > 2 * cfg["BLOCK_K"]:
            assert split > 1, (M, N, K)
        a, b = rand_int8((M, K), gen), rand_int8((N, K), gen)
        assert_exact(km.int8_mm(a, b, config=cfg), a, b)
        x = torch.randn(M, K, generator=gen).to(DEVICE)
        b_scale = torch.rand(N, generator=gen).to(DEVICE)
        check_weight_only(km.int8_weight_only_mm(x, b, b_scale, None, config=cfg), x, b, b_scale,
                          None)


def test_default_configs_take_both_paths():
    km = _kernels()
    from frugal.kernels import configs

    dev = torch.device(DEVICE)
    for table in ("int8_mm", "int8_weight_only_mm", "int8_mm_unaligned",
                  "int8_weight_only_mm_fp32"):
        small, large = configs.pick(table, "M", 16), configs.pick(table, "M", 17)
        assert small["BLOCK_M"] == 16 and small.get("split_k", 1) > 1, table
        assert large.get("split_k", 1) == 1 or large["BLOCK_M"] > 16, table
    # Decode at N = 4096: the small-M config splits K to fill the SMs (132 off a GPU).
    cfg = configs.pick("int8_mm", "M", 1)
    split, _ = km._split(cfg, 1, 4096, 4096, dev)
    tiles, sms = 4096 // cfg["BLOCK_N"], km._launch.num_sms(dev)
    assert (split > 1 and tiles * split >= sms) if tiles < sms else split == 1


def test_int8_mm_non_contiguous(poison):
    km = _kernels()
    gen = torch.Generator().manual_seed(5)
    K = 96
    wide_a = rand_int8((40, K + 32), gen)   # row stride K + 32: aligned, not contiguous
    wide_b = rand_int8((50, 2 * K + 16), gen)
    cases = [  # (a, b, takes the aligned path)
        (wide_a[:, :K], wide_b[:33, :K], True),               # strided rows, 16-aligned
        (wide_a[3:20, 1:K + 1], wide_b[1:, 3:K + 3], False),  # misaligned base addresses
        (wide_a[:, :2 * K:2][:, :48], wide_b[::2, 1:97:2], True),  # K strided: copied
        (rand_int8((K, 17), gen).t(), wide_b[::3, :K], True),  # a transposed; every 3rd row
        (wide_a[:2, :K], wide_b[:1, 5:K + 5], False),         # one misaligned b row
    ]
    for a, b, aligned in cases:
        assert not (a.is_contiguous() and b.is_contiguous())
        assert km._is_aligned(km._k_contiguous(a), km._k_contiguous(b)) == aligned
        assert_exact(km.int8_mm(a, b), a, b)
        assert_exact(km.int8_mm(a, b, config=SPLIT_CFG), a, b)


def scaled_ref64(a, b, a_scale, b_scale, bias):
    p = (a.double().cpu() @ b.double().cpu().t()) * a_scale.double().cpu().reshape(-1, 1)
    p = p * b_scale.double().cpu().reshape(1, -1)
    bias64 = torch.zeros(b.shape[0], dtype=torch.float64) if bias is None else bias.double().cpu()
    return p + bias64, p.abs() + bias64.abs()


def assert_within(y, y64, mag, out_dtype, fp32_terms):
    """|y - y64| <= fp32_terms * u32 * mag, then one rounding to out_dtype."""
    assert y.dtype == out_dtype and y.shape == y64.shape
    inner = fp32_terms * U32 * mag
    bound = inner + UNIT[out_dtype] * (y64.abs() + inner) + TINY[out_dtype]
    err = (y.double().cpu() - y64).abs()
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 33, 300), (16, 130, 100), (3, 7, 5), (17, 130, 300),
                                   (70, 33, 64), (5, 9, 0)])
def test_int8_scaled_mm(poison, out_dtype, M, N, K):
    km = _kernels()
    gen = torch.Generator().manual_seed(M * N + K)
    a, b = rand_int8((M, K), gen), rand_int8((N, K), gen)
    vec = ((torch.rand(M, generator=gen) + 0.01) / 100, (torch.rand(N, generator=gen) + 0.01) / 50)
    one = (torch.tensor([0.013]), torch.tensor(0.02))
    bias_values = torch.randn(N, generator=gen)
    all_biases = (None, out_dtype, torch.float32, torch.bfloat16, torch.float16)
    for a_scale, b_scale in [vec, one, (vec[0], one[1]), (one[0], vec[1])]:
        both_vectors = a_scale is vec[0] and b_scale is vec[1]
        for bias_dtype in all_biases if both_vectors else (None, out_dtype):
            bias = None if bias_dtype is None else bias_values.to(bias_dtype).to(DEVICE)
            a_s, b_s = a_scale.to(DEVICE), b_scale.to(DEVICE)
            y = km.int8_scaled_mm(a, b, a_s, b_s, bias, out_dtype)
            y64, mag = scaled_ref64(a, b, a_s, b_s, bias)
            assert_within(y, y64, mag, out_dtype, fp32_terms=4)
    # The small-M split path and a grouped tiling give the same bound.
    bias = bias_values.to(out_dtype).to(DEVICE)
    for cfg in (SPLIT_CFG, TILED_CFG):
        y = km.int8_scaled_mm(a, b, vec[0].to(DEVICE), vec[1].to(DEVICE), bias, out_dtype,
                              config=cfg)
        y64, mag = scaled_ref64(a, b, vec[0], vec[1], bias)
        assert_within(y, y64, mag, out_dtype, fp32_terms=4)


def check_weight_only(y, x, b, b_scale, bias):
    K = x.shape[1]
    x64, b64 = x.double().cpu(), b.double().cpu()
    s64 = b_scale.double().cpu().reshape(1, -1)
    bias64 = torch.zeros(b.shape[0], dtype=torch.float64) if bias is None else bias.double().cpu()
    y64 = (x64 @ b64.t()) * s64 + bias64
    mag = (x64.abs() @ b64.abs().t()) * s64 + bias64.abs()
    # K fp32 products and sums in any order (split-K included), the scale and the bias.
    assert_within(y, y64, mag, x.dtype, fp32_terms=K + 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 130, 300), (16, 7, 64), (3, 33, 5), (17, 130, 100),
                                   (70, 33, 300), (4, 6, 0)])
def test_int8_weight_only_mm(poison, dtype, M, N, K):
    km = _kernels()
    gen = torch.Generator().manual_seed(M + N * K)
    x = torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)
    b = rand_int8((N, K), gen)
    for b_scale in [(torch.rand(N, generator=gen) + 0.01) / 50, torch.tensor([0.03])]:
        for bias_dtype in (None, dtype, torch.float32, torch.bfloat16):
            bias = None if bias_dtype is None else torch.randn(N, generator=gen).to(bias_dtype)
            bias = None if bias is None else bias.to(DEVICE)
            b_s = b_scale.to(DEVICE)
            check_weight_only(km.int8_weight_only_mm(x, b, b_s, bias), x, b, b_s, bias)
    if K:
        xs = torch.randn(M, K + 16, generator=gen).to(dtype).to(DEVICE)[:, 3:K + 3]  # strided
        check_weight_only(km.int8_weight_only_mm(xs, b, b_s, None), xs, b, b_s, None)


# ---------------------------------------------------------------------------- compilation

_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
_PICKS = {  # name: (M, N, K, A dtype, output dtype): one launch per tl.dot path
    "int8 tiled": (4096, 4096, 4096, "i8", "fp16"),
    "int8 small-M split-K": (2, 4096, 4096, "i8", "bf16"),
    "int8 raw int32": (64, 16384, 256, "i8", "i32"),
    "weight-only bf16 tiled": (4096, 4096, 4096, "bf16", "bf16"),
    "weight-only fp16 split-K": (2, 4096, 4096, "fp16", "fp16"),
}
_TC = {  # the s8 / f16 / bf16 tensor-core instruction each path must contain
    ("i8", "sm_80"): r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32",
    ("i8", "sm_90"): r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8",
    ("fp16", "sm_80"): r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32",
    ("fp16", "sm_90"): r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.f16\.f16",
    ("bf16", "sm_80"): r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32",
    ("bf16", "sm_90"): r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16",
}

_TC_ANY = r"(wgmma\.mma_async\.sync|(?<![\w.])mma\.sync)\.aligned\.[\w.]+"


def _pick_launch(M, N, K, a_dtype, out):
    """The launch the public op makes for these shapes (captured, not run)."""
    from frugal import jit_capture

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    b = torch.randint(-9, 9, (N, K), dtype=torch.int8)
    with jit_capture.capture() as launches:
        if a_dtype == "i8":
            a = torch.randint(-9, 9, (M, K), dtype=torch.int8)
            if out == "i32":
                frugal.int8_mm(a, b, backend="triton")
            else:
                frugal.int8_matmul(a, b, torch.rand(M), torch.rand(N), torch.randn(N),
                                   dtypes[out], backend="triton")
        else:
            x = torch.randn(M, K, dtype=dtypes[a_dtype])
            frugal.int8_weight_only_matmul(x, b, torch.rand(N), torch.randn(N),
                                           backend="triton")
    (launch,) = launches
    return launch


def _compile_picks():
    """Script mode: compile the picked launches and report their PTX's tensor-core
    instructions."""
    from frugal import jit_capture

    rows = []
    for name, (M, N, K, a_dtype, out) in _PICKS.items():
        launch = _pick_launch(M, N, K, a_dtype, out)
        constexprs = dict(launch.kwargs)
        for arch, cap in (("sm_80", 80), ("sm_90", 90)):
            k = jit_capture.compile_launch(launch, cap)
            ptx = k.asm["ptx"]
            found = re.finditer(_TC_ANY, ptx)
            rows.append({"name": name, "arch": arch, "a_dtype": a_dtype,
                         "block_m": constexprs["BLOCK_M"][1],
                         "split": bool(constexprs["SPLIT_K"][1]), "shared": k.metadata.shared,
                         "cp_async": "cp.async" in ptx,
                         "tc": sorted({m.group(0) for m in found})})
    return rows


@pytest.mark.slow
def test_tensor_core_instructions_in_ptx():
    done = subprocess.run([sys.executable, __file__], env=_ENV, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout)
    assert len(rows) == 2 * len(_PICKS)
    for row in rows:
        assert row["split"] == ("split-K" in row["name"]), row
        tc = " ".join(row["tc"])
        arch = row["arch"]
        if arch == "sm_90" and row["block_m"] < 64:
            arch = "sm_80"  # a 16-row tile is below wgmma's 64 rows: mma.sync on sm_90 too
        assert re.search(_TC[row["a_dtype"], arch], tc), row
        assert row["cp_async"], row  # the aligned variant streams through cp.async
        assert row["shared"] <= (166912 if row["arch"] == "sm_80" else 232448), row


if __name__ == "__main__":
    print(json.dumps(_compile_picks()))
