"""int8 GEMMs in nn.Linear layout (weight ``b`` int8 [N, K]): exact int8 x int8 -> int32
(``int8_mm``), W8A8 with the dequantization and bias fused into the epilogue
(``int8_scaled_mm``), and int8 weight-only (``int8_weight_only_mm``).

One tiled ``tl.dot`` kernel serves all three. Its A operand is int8 (int32 accumulator: s8
``mma.sync`` on sm_80, ``wgmma`` on sm_90) or float (weight-only: the int8 weight tile is
converted in registers to x's dtype, exact since |q| <= 128; fp16/bf16 run on tensor cores
with an fp32 accumulator; fp32 uses an IEEE fp32 dot -- CUDA cores, no TF32 -- so fp32 inputs
get fp32 accuracy). Programs go in groups of GROUP_M tile rows so the tiles in flight stay in L2.

Edges. Rows past M (N) are clamped onto the last row for the loads, so A and B loads need no
row masks; stores are masked; the K tail is masked. ``ALIGNED`` (K, both row strides and both
base addresses multiples of 16 elements / 16 bytes) is shown to the compiler, so the loads
become 16-byte ``cp.async`` copies into a ``num_stages`` shared-memory pipeline. No integer
argument is specialized by the JIT (one variant per flag value, not one per divisibility
pattern or value of 1), and unaligned shapes (odd K, sliced inputs: byte loads, no async
pipeline) get their own small configs, which do not spill. The K dim must have stride 1: the
launchers copy an input that does not (rare; a weight is contiguous).

Epilogue, in fp32 and in this order: ``acc.to(fp32) * a_scale[m] * b_scale[n] + bias[n]``, then
the cast to the output dtype; the accumulator never goes to memory. A_SCALE / B_SCALE / HAS_BIAS
are constexpr presence flags; without any, the accumulator is stored as is (int8_mm's int32).
A scale holding one value is read through a stride of 0 (one broadcast load per tile), not a
third constexpr case: that would quadruple the compiled variants for no measurable gain.
A bias is converted to fp32 (exact) first, so the bias pointer has one dtype.

Small M (decode): split-K. A 16-row tile covers every token, so one program per BLOCK_N outputs
gives N / BLOCK_N programs -- 64 at N = 4096, BLOCK_N = 64, for 132 SMs on H100 -- each
streaming all of K alone. Decode is memory-bound (it reads the N * K weight bytes once, about
2 * M ops per byte), so what matters is many weight bytes in flight on every SM. When the tiles
alone do not fill one wave (tiles < SMs), the launcher splits K into ``split`` slices of whole
BLOCK_K blocks, aiming at ``_PROGRAMS_PER_SM`` programs per SM (at most the config's
``split_k``; the M <= 16 and M <= 64 buckets allow it). Each program writes its partial
accumulator (int32, or fp32 for weight-only) to a workspace [split, M, N], then, after a CTA
barrier, bumps its tile's counter with an acq_rel atomic; the program that arrives last sums
the slices in slice order (``.cg`` loads, from L2) and runs the epilogue. So the result is exact
(int32) and deterministic (fp32 partials summed in a fixed order, unlike float atomics); it
takes one launch plus a memset of the counters, and 2 * split * M * N * 4 bytes of extra
traffic, small next to the N * K weight bytes when M is small. Rejected: a GEMV-style kernel
(one program per BLOCK_N outputs, all of K): with 16-row tensor-core tiles it needs
BLOCK_N <= 32 to reach ~132 programs at N = 4096 and leaves narrow layers (N = 1024: 32
programs) on a quarter of the GPU, while CUDA-core dot products turn compute-bound from M ~ 4.
A 16-row tile is below ``wgmma``'s 64 rows, so on sm_90 the M <= 16 configs run s8
``mma.sync``: ample for a memory-bound shape.

int32 accumulation is exact for K <= 131071 (``INT8_MAX_K``: 128 * 128 * K < 2**31); the API
refuses larger K and the launchers assert it. (Triton emits the s8 ``mma`` with ``.satfinite``:
past that limit the sum would saturate, not wrap.)

Configs are data (``configs/default.json``, bucketed on M): ``int8_mm`` (int8_mm and
int8_scaled_mm), ``int8_weight_only_mm`` (fp16/bf16 x), ``int8_weight_only_mm_fp32`` (fp32 x,
aligned or not) and ``int8_mm_unaligned`` (int8 or fp16/bf16 A when not ALIGNED). A bucket with
``split_k`` > 1 may split K. ``frugal check`` compiles every launch the call matrix makes.
"""


import torch
import triton
import triton.language as tl

from . import _launch, configs

INT8_MAX_K = 131071  # 128 * 128 * K < 2**31: int32 accumulation of int8 products is exact
_PROGRAMS_PER_SM = 2  # split-K aims at this many programs per SM
_ALIGN = 16  # elements (K, row strides) and bytes (base addresses)


@triton.jit
def _epilogue(acc, offs_m, offs_n, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
              M, N, stride_cm, stride_as, stride_bs,
              A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Each step converts to fp32 (a no-op after the first); without any, the accumulator is
    # stored as is. (Nested flags, not `A_SCALE or B_SCALE or ...`: Triton 3.2 rejects boolean
    # operators on constexprs.)
    out = acc
    if A_SCALE:
        a_s = tl.load(a_scale_ptr + offs_m * stride_as, mask=mask_m, other=0.0)
        out = out.to(tl.float32) * a_s[:, None]
    if B_SCALE:
        b_s = tl.load(b_scale_ptr + offs_n * stride_bs, mask=mask_n, other=0.0)
        out = out.to(tl.float32) * b_s[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        out = out.to(tl.float32) + bias[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# No integer argument is specialized by the JIT: M = 1 (decode) would become a constexpr (which
# M.to() rejects) for no gain, and N = 1, K = 1 or a stride of 1 would each be a variant of its
# own for every other choice. ALIGNED states the divisibility that matters: that of the loads.
# C's stores go without (the epilogue writes M * N values once; the main loop reads K times
# more), which halves the compiled variants.
@triton.jit(do_not_specialize=["M", "N", "K", "stride_am", "stride_bn", "stride_cm", "stride_as",
                               "stride_bs", "k_slice_blocks"])
def _mm_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, ws_ptr, count_ptr,
    M, N, K, stride_am, stride_bn, stride_cm, stride_as, stride_bs, k_slice_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, A_SCALE: tl.constexpr, B_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, ALIGNED: tl.constexpr,
):
    # c[m, n] = epilogue(sum_k a[m, k] * b[n, k]); grid (tiles, split). See the module docstring.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    if ALIGNED:
        # Divisibility the compiler can see (tl.multiple_of on an argument is not kept).
        K = (K // 16) * 16
        stride_am = (stride_am // 16) * 16
        stride_bn = (stride_bn // 16) * 16
    if SPLIT_K:
        pid_k = tl.program_id(1)
        k_lo = pid_k * k_slice_blocks * BLOCK_K
        k_hi = tl.minimum(K, k_lo + k_slice_blocks * BLOCK_K)
    else:
        k_lo = 0
        k_hi = K

    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = tl.minimum(rm, M - 1 - m0)  # clamped: in-bounds loads without row masks
    b_rows = tl.minimum(rn, N - 1 - n0)
    a_ptrs = (a_ptr + m0.to(tl.int64) * stride_am + k_lo
              + a_rows[:, None] * stride_am + rk[None, :])  # [BLOCK_M, BLOCK_K]
    b_ptrs = (b_ptr + n0.to(tl.int64) * stride_bn + k_lo
              + b_rows[None, :] * stride_bn + rk[:, None])  # [BLOCK_K, BLOCK_N]

    IS_INT8: tl.constexpr = a_ptr.dtype.element_ty == tl.int8
    if IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_mask = rk < k_hi - k
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0)
        if IS_INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        elif a_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a_ptr.dtype.element_ty), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    offs_m = m0 + rm
    offs_n = n0 + rn
    if SPLIT_K:
        # Partial sums to ws[pid_k]; the last program of this tile to arrive reduces them.
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        ws_tile = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        slice_size = M.to(tl.int64) * N
        tl.store(ws_tile + pid_k * slice_size, acc, mask=mask)
        tl.debug_barrier()  # all of this CTA's partials are written before the release below
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(1) - 1:
            total = tl.load(ws_tile, mask=mask, other=0, cache_modifier=".cg")
            for s in range(1, tl.num_programs(1)):
                total += tl.load(ws_tile + s * slice_size, mask=mask, other=0,
                                 cache_modifier=".cg")
            _epilogue(total, offs_m, offs_n, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
                      M, N, stride_cm, stride_as, stride_bs, A_SCALE, B_SCALE, HAS_BIAS)
    else:
        _epilogue(acc, offs_m, offs_n, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
                  M, N, stride_cm, stride_as, stride_bs, A_SCALE, B_SCALE, HAS_BIAS)


# frugal check: {kernel: (label, tensor cores expected for these pointer dtypes)}. The fp32
# weight-only dot is IEEE fp32 on CUDA cores by design (no TF32).
CHECK_KERNELS = {"_mm_kernel": ("int8_mm", lambda dtypes: dtypes["a_ptr"] != "float32")}


# ----------------------------------------------------------------------------- launchers

def _k_contiguous(t):
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _row_stride(t):
    # A single row's stride is never used (every row index is 0): pass an aligned one.
    return t.stride(0) if t.shape[0] > 1 else 0


def _is_aligned(a, b):
    # Base addresses from the storage offset, not data_ptr(): torch.compile traces this with
    # fake tensors, and allocations themselves are aligned. The flag only asserts K and the
    # strides to the compiler; pointer alignment stays the JIT's own specialization.
    K = a.shape[1]
    return (K % _ALIGN == 0 and _row_stride(a) % _ALIGN == 0 and _row_stride(b) % _ALIGN == 0
            and a.storage_offset() * a.element_size() % 16 == 0
            and b.storage_offset() % 16 == 0)


def _table(a, aligned):
    """The config table of a launch: by the A operand's dtype and alignment."""
    if a.dtype == torch.int8:
        return "int8_mm" if aligned else "int8_mm_unaligned"
    if a.dtype == torch.float32:
        return "int8_weight_only_mm_fp32"
    return "int8_weight_only_mm" if aligned else "int8_mm_unaligned"


def pick_config(a, b):
    """(table, config) of a launch with A operand ``a`` [M, K] and weight ``b`` [N, K], both
    with K stride 1 (the launchers copy an operand that is not)."""
    table = _table(a, _is_aligned(a, b))
    return table, configs.pick(table, "M", a.shape[0], _launch.device_key(a.device))


def _split(cfg, M, N, K, device):
    """Number of K slices and K blocks per slice (see the module docstring)."""
    k_blocks = triton.cdiv(K, cfg["BLOCK_K"])
    split_max = min(cfg.get("split_k", 1), k_blocks)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    sms = _launch.num_sms(device)
    if split_max <= 1 or tiles >= sms:  # a full wave already: no workspace traffic
        return 1, k_blocks
    want = triton.cdiv(_PROGRAMS_PER_SM * sms, tiles)
    split = max(1, min(split_max, want))
    per_slice = triton.cdiv(k_blocks, split)
    return triton.cdiv(k_blocks, per_slice), per_slice  # no empty slice


def _run(a, b, c, a_scale, b_scale, bias, config=None):
    M, K = a.shape
    N = b.shape[0]
    assert K <= INT8_MAX_K, f"K={K} > {INT8_MAX_K}: int32 accumulation could overflow"
    if M == 0 or N == 0:
        return c
    a, b = _k_contiguous(a), _k_contiguous(b)
    aligned = _is_aligned(a, b)
    cfg = config or configs.pick(_table(a, aligned), "M", M, _launch.device_key(a.device))
    split, per_slice = _split(cfg, M, N, K, a.device)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    if split > 1:
        ws_dtype = torch.int32 if a.dtype == torch.int8 else torch.float32
        ws = torch.empty((split, M, N), dtype=ws_dtype, device=a.device)
        count = torch.zeros(tiles, dtype=torch.int32, device=a.device)
    else:
        ws = count = None
    if bias is not None:
        # fp32 (exact from any float dtype): one bias dtype, not one per output dtype, halves
        # the epilogue variants compiled (a conversion of N values when it is not fp32).
        bias = bias.to(torch.float32).contiguous()
    _launch.launch(_mm_kernel, (tiles, split), a.device)(
        a, b, c, a_scale, b_scale, bias, ws, count,
        M, N, K, _row_stride(a), _row_stride(b), c.stride(0),
        0 if a_scale is None or a_scale.numel() == 1 else a_scale.stride(0),
        0 if b_scale is None or b_scale.numel() == 1 else b_scale.stride(0),
        per_slice,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], A_SCALE=a_scale is not None, B_SCALE=b_scale is not None,
        HAS_BIAS=bias is not None, SPLIT_K=split > 1, ALIGNED=aligned,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c


def int8_mm(a, b, *, config=None):
    """a int8 [M, K] @ (b int8 [N, K])^T -> int32 [M, N], exact. Any strides; K <= 131071.

    ``config`` overrides the picked launch config (tests, tuning).
    """
    c = torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    return _run(a, b, c, None, None, None, config)


def int8_scaled_mm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float16, *, config=None):
    """(a @ b^T) * a_scale[:, None] * b_scale[None, :] + bias, epilogue fused, in out_dtype.

    a int8 [M, K], b int8 [N, K]; a_scale float32 numel M or 1; b_scale float32 numel N or 1;
    bias [N] float16/bfloat16/float32 or None; out_dtype float16/bfloat16/float32.
    """
    c = torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)
    return _run(a, b, c, a_scale.reshape(-1), b_scale.reshape(-1), bias, config)


def int8_weight_only_mm(x, b, b_scale, bias=None, *, config=None):
    """x float [M, K] @ (b int8 [N, K])^T * b_scale[None, :] + bias, in x's dtype.

    b_scale float32 numel N or 1; bias [N] float or None. fp32 x uses an IEEE fp32 dot.
    """
    c = torch.empty((x.shape[0], b.shape[0]), dtype=x.dtype, device=x.device)
    return _run(x, b, c, None, b_scale.reshape(-1), bias, config)
