"""GPU-only sweeps (``frugal gpu-check`` runs them): frugal against the kernels users compare it
with on the same GPU -- SDPA's FlashAttention backend and FlexAttention for attention, bf16
cuBLAS and ``torch._int_mm`` for the int8 GEMM, a dense SDPA decode and the HBM copy bandwidth
for paged decode. bf16 throughout; each targets figure is a README expectation."""

import functools

import torch
import torch.nn.functional as F

import frugal
from frugal import masks
from frugal.paged_ops import PAGED_ATTENTION

from .registry import Target, sweep

_H, _D = 16, 128


def _qkv(n, device, batch=1, heads=_H, kv_heads=_H):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(batch, heads, n, _D, generator=g).to(device, torch.bfloat16)
    k = torch.randn(batch, kv_heads, n, _D, generator=g).to(device, torch.bfloat16)
    v = torch.randn(batch, kv_heads, n, _D, generator=g).to(device, torch.bfloat16)
    return q, k, v


def _flash(q, k, v, causal=True):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


@functools.lru_cache(maxsize=1)
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_call(q, k, v, mask):
    flex_mask = mask.to_flex(device=q.device)
    fn = _flex()
    return lambda: fn(q, k, v, block_mask=flex_mask)


def _attention_flops(n, density):
    return 4 * _H * _D * n * n * density


@sweep(
    "gpu_attention_causal",
    op="attention",
    x_name="tokens",
    xs=(2048, 4096, 8192, 16384),
    quick=(4096, 16384),
    baseline="sdpa_flash",
    compare=("flex",),
    flops=lambda n: _attention_flops(n, 0.5),
    params={"B": 1, "H": _H, "D": _D, "dtype": "bfloat16"},
    targets=(Target(x=16384, candidate="frugal", min_speedup=0.9, device="cuda"),),
    devices=("cuda",),
)
def _causal(n, device):
    """Causal block-sparse attention vs SDPA's FlashAttention backend and FlexAttention."""
    q, k, v = _qkv(n, device)
    mask = masks.causal(n)
    return {"frugal": lambda: frugal.sparse_attention(q, k, v, mask),
            "sdpa_flash": _flash(q, k, v), "flex": _flex_call(q, k, v, mask)}


@sweep(
    "gpu_attention_window",
    op="attention",
    x_name="tokens",
    xs=(4096, 8192, 16384, 32768),
    quick=(4096, 16384),
    baseline="sdpa_flash",
    compare=("flex",),
    flops=lambda n: _attention_flops(n, 0.5),
    params={"B": 1, "H": _H, "D": _D, "window": 512, "dtype": "bfloat16"},
    targets=(Target(x=16384, candidate="frugal", min_speedup=10.0, device="cuda"),),
    devices=("cuda",),
)
def _window(n, device):
    """A 512-token sliding window vs dense causal FlashAttention (SDPA) and FlexAttention with
    the same window."""
    q, k, v = _qkv(n, device)
    mask = masks.sliding_window(n, 512)
    return {"frugal": lambda: frugal.sparse_attention(q, k, v, mask),
            "sdpa_flash": _flash(q, k, v), "flex": _flex_call(q, k, v, mask)}


_GEMM_N = _GEMM_K = 8192


@sweep(
    "gpu_int8_gemm",
    op="int8_matmul",
    x_name="M",
    xs=(1, 16, 128, 1024, 8192),
    quick=(16, 8192),
    baseline="bf16",
    compare=("int_mm",),
    flops=lambda m: 2 * m * _GEMM_N * _GEMM_K,
    params={"N": _GEMM_N, "K": _GEMM_K, "out": "bfloat16"},
    targets=(Target(x=8192, candidate="frugal", min_speedup=1.6, device="cuda"),
             Target(x=8192, candidate="frugal", min_speedup=1.0, device="cuda",
                    versus="int_mm")),
    devices=("cuda",),
)
def _int8_gemm(m, device):
    """W8A8 int8 GEMM with the fused dequant epilogue (bf16 out) vs bf16 cuBLAS and
    torch._int_mm (int32 out, no epilogue)."""
    g = torch.Generator().manual_seed(m)
    aq = torch.randint(-127, 128, (m, _GEMM_K), generator=g, dtype=torch.int8).to(device)
    bq = torch.randint(-127, 128, (_GEMM_N, _GEMM_K), generator=g, dtype=torch.int8).to(device)
    a_s, b_s = torch.rand(m, device=device), torch.rand(_GEMM_N, device=device)
    x = torch.randn(m, _GEMM_K, generator=g).to(device, torch.bfloat16)
    w = torch.randn(_GEMM_N, _GEMM_K, generator=g).to(device, torch.bfloat16)
    candidates = {
        "frugal": lambda: frugal.int8_matmul(aq, bq, a_s, b_s, out_dtype=torch.bfloat16),
        "bf16": lambda: x @ w.t(),
    }
    if m > 16:  # torch._int_mm needs M > 16 on CUDA
        candidates["int_mm"] = lambda: torch._int_mm(aq, bq.t())
    return candidates


_DEC_B, _DEC_HQ, _DEC_HKV, _DEC_BS = 8, 32, 8, 16


def _decode_bytes(context):
    return 2 * _DEC_B * context * _DEC_HKV * _D * 2  # K and V, bf16


@sweep(
    "gpu_paged_decode",
    op="paged_attention",
    x_name="context",
    xs=(1024, 4096, 16384, 32768),
    quick=(4096, 32768),
    baseline="sdpa",
    nbytes=_decode_bytes,
    memory_bound=True,
    params={"B": _DEC_B, "Hq": _DEC_HQ, "Hkv": _DEC_HKV, "D": _D, "block_size": _DEC_BS,
            "dtype": "bfloat16"},
    targets=(Target(x=4096, candidate="frugal", min_copy_fraction=0.8, device="cuda"),),
    devices=("cuda",),
)
def _paged_decode(context, device):
    """Paged decode (GQA 4, split-KV) vs SDPA over a dense contiguous cache; % copy bw is the
    fraction of the GPU's measured copy bandwidth (the HBM roofline)."""
    g = torch.Generator().manual_seed(context)
    blocks = _DEC_B * context // _DEC_BS
    shape = (blocks, _DEC_BS, _DEC_HKV, _D)
    k_cache = torch.randn(shape, generator=g).to(device, torch.bfloat16)
    v_cache = torch.randn(shape, generator=g).to(device, torch.bfloat16)
    tables = torch.randperm(blocks, generator=g).to(device, torch.int32).view(_DEC_B, -1)
    lens = torch.full((_DEC_B,), context, dtype=torch.int32, device=device)
    q = torch.randn(_DEC_B, _DEC_HQ, _D, generator=g).to(device, torch.bfloat16)
    dense_k = torch.randn(_DEC_B, _DEC_HKV, context, _D, generator=g).to(device, torch.bfloat16)
    dense_v = torch.randn_like(dense_k)
    q4 = q.view(_DEC_B, _DEC_HQ, 1, _D)
    # The kernel as a serving step runs it (StepPlan): no per-call table validation.
    args = (q, k_cache, v_cache, tables, lens, _D**-0.5, 0, None, None, context)
    impl = PAGED_ATTENTION.select(q.device, "auto", *args)
    return {
        "frugal": lambda: impl.run(*args),
        "sdpa": lambda: F.scaled_dot_product_attention(q4, dense_k, dense_v, enable_gqa=True),
    }
