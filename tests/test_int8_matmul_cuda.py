"""The CUTLASS int8 GEMMs (csrc/cuda/int8_matmul_*.cu) as backend "cuda" of int8_mm,
int8_matmul and int8_weight_only_matmul. CUTLASS kernels cannot run in the host emulation, so
without a GPU this checks what can be checked: the registry's declarations, the shapes the
kernels refuse and why, and (tests/test_build.py) that every kernel is in the binary for sm_80
and sm_90a without spills or stack. With a GPU the kernels run against exact / float64
references at every M bucket (decode M <= 64 and the large tile), with poisoned outputs."""

import pytest
import torch
from conftest import HAS_CUDA

import frugal
from frugal import reference, registry

OPS = ("int8_mm", "int8_matmul", "int8_weight_only_matmul")
built = pytest.mark.skipif(
    not hasattr(torch.ops.frugal, "int8_mm")
    or not torch._C._dispatch_has_kernel_for_dispatch_key("frugal::int8_mm", "CUDA"),
    reason="frugal._C was built without the CUTLASS kernels (no nvcc, or no nvidia-cutlass)")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU (CUTLASS cannot run emulated)")


@pytest.mark.parametrize("name", OPS)
def test_cuda_backend_is_declared_after_triton(name):
    """auto tries Triton first on CUDA tensors: the CUTLASS kernels are compile-checked only
    until `frugal tune` has run them on the device (README)."""
    op = registry.op(name)
    assert "cuda" in op.backends
    assert op.order["cuda"] == ("triton", "cuda", "torch")
    assert op.impls["cuda"].devices == ("cuda",)


@built
@pytest.mark.parametrize("name", OPS)
def test_cuda_kernels_are_registered(name):
    assert registry._MISSING[name, "cuda"] is None


def test_shapes_the_kernels_refuse():
    a = torch.zeros(4, 24, dtype=torch.int8)
    b = torch.zeros(8, 24, dtype=torch.int8)
    why = registry.op("int8_mm").impls["cuda"].why_not
    assert "K a multiple of 16 and N a multiple of 8; got K=24, N=8" in why(a, b)
    assert "got K=32, N=12" in why(torch.zeros(4, 32, dtype=torch.int8),
                                   torch.zeros(12, 32, dtype=torch.int8))
    why = registry.op("int8_matmul").impls["cuda"].why_not
    assert "got K=24" in why(a, b, torch.ones(4), torch.ones(8), None, torch.float16)
    why = registry.op("int8_weight_only_matmul").impls["cuda"].why_not
    x = torch.zeros(4, 32)
    assert "takes float16 or bfloat16 x; got torch.float32" in why(x, b, torch.ones(8), None)


def test_cpu_tensors_are_refused_with_the_reason():
    a, b = torch.zeros(4, 32, dtype=torch.int8), torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(frugal.BackendError, match="backend='cuda' needs CUDA tensors"):
        frugal.int8_matmul(a, b, torch.ones(4), torch.ones(8), backend="cuda")


# ------------------------------------------------------------------------ on a GPU

def rand_int8(shape, gen):
    t = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    t.view(-1)[:2] = torch.tensor([-128, 127], dtype=torch.int8)[: t.numel()]
    return t


@gpu
@built
@pytest.mark.parametrize("M", [1, 7, 16, 33, 64, 65, 128, 300])
def test_int8_mm_exact_every_bucket(poison, M):
    gen = torch.Generator().manual_seed(M)
    a, b = rand_int8((M, 4096), gen), rand_int8((136, 4096), gen)
    got = frugal.int8_mm(a.cuda(), b.cuda(), backend="cuda")
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), reference.int8_mm(a, b))


@gpu
@built
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("M", [5, 200])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_int8_matmul_epilogue(poison, out_dtype, M, bias_dtype):
    gen = torch.Generator().manual_seed(M)
    N, K = 72, 160
    aq, bq = rand_int8((M, K), gen), rand_int8((N, K), gen)
    a_s, b_s = torch.rand(M, generator=gen) / 100, torch.rand(N, generator=gen) / 100
    bias = None if bias_dtype is None else torch.randn(N, generator=gen).to(bias_dtype)
    y = frugal.int8_matmul(aq.cuda(), bq.cuda(), a_s.cuda(), b_s.cuda(),
                           None if bias is None else bias.cuda(), out_dtype, backend="cuda")
    acc = aq.double() @ bq.double().t()
    p = acc * a_s.double()[:, None] * b_s.double()[None, :]
    ref = p + (0 if bias is None else bias.double())
    mag = p.abs() + (0 if bias is None else bias.double().abs())
    bound = torch.finfo(out_dtype).eps * ref.abs() + 4 * torch.finfo(torch.float32).eps * mag
    assert y.dtype == out_dtype
    assert ((y.cpu().double() - ref).abs() <= bound + 1e-30).all()


@gpu
@built
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 64, 65, 257])
def test_weight_only(poison, dtype, M):
    gen = torch.Generator().manual_seed(M)
    N, K = 96, 512
    x = torch.randn(M, K, generator=gen).to(dtype)
    bq = rand_int8((N, K), gen)
    b_s = torch.rand(N, generator=gen) / 50
    bias = torch.randn(N, generator=gen).to(dtype)
    y = frugal.int8_weight_only_matmul(x.cuda(), bq.cuda(), b_s.cuda(), bias.cuda(),
                                       backend="cuda")
    ref = (x.double() @ bq.double().t()) * b_s.double() + bias.double()
    scale = (x.double().abs() @ bq.double().abs().t()) * b_s.double() + bias.double().abs()
    tol = (torch.finfo(dtype).eps * 2 + K * torch.finfo(torch.float32).eps) * scale
    assert y.dtype == dtype and ((y.cpu().double() - ref).abs() <= tol).all()


@gpu
@built
def test_strided_and_misaligned_operands(poison):
    """A row stride that is not a multiple of 16 bytes and a start 1 byte into the storage are
    copied; a transposed view too."""
    gen = torch.Generator().manual_seed(0)
    a = rand_int8((40, 64), gen)
    b = rand_int8((48, 64), gen)
    want = reference.int8_mm(a, b)
    a_off = torch.empty(a.numel() + 1, dtype=torch.int8, device="cuda")[1:].view(40, 64)
    a_off.copy_(a)
    assert torch.equal(frugal.int8_mm(a_off, b.cuda(), backend="cuda").cpu(), want)
    bt = b.t().contiguous().cuda().t()
    assert torch.equal(frugal.int8_mm(a.cuda(), bt, backend="cuda").cpu(), want)
    registry_op = registry.op("int8_mm")
    assert "cuda" in [i.backend for i in registry_op.candidates(a_off.device, a_off, bt)]
