"""Paged KV-cache kernels: ``paged_append`` (scatter new keys and values into cache slots; int8
caches quantize each head vector), ``paged_attention`` (decode attention through block
tables, with split-KV for batches too small to fill the GPU) and ``paged_prefill_attention``
(chunked prefill: a chunk of queries per sequence over its paged prefix and, causally, itself).

Layout (one layer): caches [num_blocks, page_size, Hkv, D]; position p of sequence b lives at
offset ``p % page_size`` of block ``block_tables[b, p // page_size]``; int8 caches keep fp32
scales [num_blocks, page_size, Hkv] (contiguous) beside them. The launchers expect what the
public API's availability check guarantees: D a multiple of 8 in [8, 256], caches with unit
stride in D and their other strides multiples of 8 elements (always so for contiguous caches
with such D). q, k and v that break the alignment are copied (they are small); the caches never
are. Tiles pad D to ``BLOCK_D = head_block(D)`` (a power of two >= 32: D = 80 or 120 runs in a
masked 128) and mask the padding. The kernels restate the alignment to the compiler
(``x // 8 * 8``, like the int8 GEMM's ``ALIGNED``), so K/V rows load as 16-byte vectors at
fp16; every integer argument is
``do_not_specialize``: a value of 1 or a multiple of 16 compiles nothing new.

paged_append
------------
Grid (tokens, cdiv(Hkv, BLOCK_H)); a program loads the [BLOCK_H, BLOCK_D] tile of one token's
k and v head vectors and stores it at its slot (a negative slot returns at once). int8 caches
quantize each head vector exactly as ``quantize_per_token`` does (absmax / 127 with an IEEE
division, round half to even, zero vector -> scale 0, inf/NaN -> scale NaN and zeros), so the
bytes and scales are bit-identical to the reference. int64 slot mappings are cast to int32
first (one tiny op; the manager passes int32), which halves the compiled variants.

paged_attention
---------------
Stage 1, grid (B * Hkv * cdiv(G, 16), splits). A program takes one sequence, one kv head and up
to BLOCK_G = 16 of its G = Hq / Hkv query heads, packed as the rows of a [16, BLOCK_D] q tile:
the GQA group shares every K/V load and both products are ``tl.dot`` with M = 16, the least
tensor-core tile (``mma.sync``; sm_90's ``wgmma`` wants 64 rows, which decode never has). G < 16
pads rows with zeros (never stored); G > 16 takes several programs per kv head, numbered
adjacently so they run together and read K/V from L2 (SGLang's grouped decode does the same).
MHA (G = 1) uses the same padded dot rather than a separate ``tl.sum`` GEMV: decode is
memory-bound, and 16 padded rows cost 32 flops per cache byte at fp16, far below the ~300 the
tensor cores sustain per byte of HBM bandwidth; one code path, one set of compiled variants.
fp32 q over an fp32 cache runs the dots as IEEE fp32 (CUDA cores, no TF32), so fp32 keeps fp32
accuracy. fp32 q over an int8 cache runs them as ``tf32x3`` on tensor cores (the int8 values are
exact in tf32; q and p are split into two tf32 terms), also fp32-accurate: an IEEE dot whose
operand is converted in registers keeps each thread's whole reduction strip live and spills.

The loop walks the sequence in tiles of BLOCK_N positions; each position's page comes from the
table, so a tile spans several pages when page_size < BLOCK_N (one table load per position, from
L1) and part of one page otherwise; every page size 1..256 takes the same path. Scores use exp2
with ``scale * log2(e)`` folded into one multiply; the softmax is online in fp32 (running max m,
sum l, fp32 accumulator rescaled per tile). Positions outside [lo, seq_len) are masked in the
table load and in the K/V/scale loads, so a -1 entry or a poisoned (NaN) slot is never read.

Window: the query (position L - 1) reads positions [lo, L) with lo = max(0, L - window). The
first tile starts at lo rounded down to BLOCK_N, i.e. at or after the first block holding
lo's position (entries before it are never loaded); positions below lo in that tile are masked.

int8 caches: int8 -> q's dtype is exact (|q| <= 127), so the dots run on the raw int8 values and
the per-token-per-head scales are applied in fp32 where they factor out: the score column n is
multiplied by k_scale[n], and p[:, n] by v_scale[n] before the P @ V dot.

Split-KV. With ``units = B * Hkv * cdiv(G, 16)`` programs and ``target = programs_per_sm * SMs``
(config; 2 waves by default, 132 SMs off a GPU), nothing is split when ``units >= target`` or
the longest attended span fits ``min_partition`` (config; 512 tokens as vLLM v2). Otherwise the
span is cut into ``splits = cdiv(span, partition)`` partitions with ``partition = max(
min_partition, ceil(span / cdiv(target, units)))`` rounded up to BLOCK_N. ``span`` is an upper
bound known on the host without a sync: ``max_blocks * page_size``, or ``window + BLOCK_N - 1``
when smaller, so no seq_len is read on the host (CUDA graphs / torch.compile friendly). The
partitions of a sequence start at lo rounded down to BLOCK_N; a partition past the sequence's
end exits at once. Each partition writes its normalized output o_s (fp32) and lse_s = m + log2(l)
(base 2) to a workspace; stage 2 (grid B * Hq) reads only the partitions the sequence has
(the same formula, so it never reads an unwritten one) and merges them: out = sum_s 2^(lse_s -
M) o_s / sum_s 2^(lse_s - M), M = max_s lse_s (vLLM's max-logit / exp-sum merge). Without a
split, stage 1 writes the result in q's dtype and stage 2 is not launched.

seq_len 0 gives zeros; a NaN anywhere the query reads (e.g. an int8 scale of NaN) gives NaN,
as in the reference.

Score modifiers (``frugal.score_mods``), in decode and prefill alike: the constexpr flags
SOFTCAP and ALIBI add, after the scale, ``c2 tanh(s / c2)`` (c2 = softcap * log2(e): the cap in
the base-2 domain the scores live in, equal to the natural-scale cap times log2(e)) and then
``- slope * log2(e) * |q_pos - k_pos|`` (slopes [B, Hq]; decode's query at seq_len - 1, prefill
rows at their own positions). With both off the kernels compile without that code.

paged_prefill_attention
-----------------------
q is packed [N, Hq, D] (vLLM / FlashAttention varlen): sequence b owns rows [cu[b], cu[b + 1]),
n_b queries at positions [seq_len - n_b, seq_len), whose keys and values are already in the
cache. A program takes BLOCK_M rows of one sequence and one kv head: the (token, query head)
pairs of that kv head's G query heads, token-major (row r is token r // G, head r % G), so a
GQA group shares every K/V load and M = BLOCK_M (64 for fp16/bf16: the ``wgmma`` tile on sm_90)
whatever G is; G = 1 packs 64 tokens, G = 8 packs 8, G > 64 splits a token's heads over
programs. Grid
``B * Hkv * cdiv(max_q_len * G, BLOCK_M)`` (max_q_len from the caller: one host sync for packed
q), programs numbered so that a sequence's tiles run adjacently, last tokens first (they read
the most); a tile past its sequence's chunk exits at once. The loop walks positions from the
window start of the tile's first token to its last token's position, in BLOCK_N tiles gathered
through the table as in decode; QK^T and PV are ``tl.dot`` (fp16/bf16 on tensor cores; fp32 q
as ``tf32x3``, fp32-accurate, with BLOCK_M = 32 and head_dim <= 128: its split operands spill
registers beyond, so fp32 q with larger head dims runs the reference); each row masks
positions past its own and, with a window, at or before ``pos - window``; online softmax in
base 2 as in decode. A row that has seen no position yet keeps m = -inf and takes weights
exp2(-inf) = 0 (never exp2(nan)). int8 caches apply k_scale and v_scale as in decode. No
split-KV: chunks give B * Hkv * tiles programs already.

Configs are data (``configs/default.json``, bucketed on D): ``paged_attention`` (fp16/bf16 q),
``paged_attention_fp32`` (fp32 q), ``paged_attention_merge``, ``paged_append``,
``paged_prefill`` (fp16/bf16 q) and ``paged_prefill_fp32`` (fp32 q). ``frugal check``
compiles every launch the call matrix makes.
"""

import functools

import torch
import triton
import triton.language as tl

from . import _launch, configs
from ._common import FLT_MAX, K_LN2, K_LOG2E, LOG2E, round_half_even, tanh
from ._launch import aligned, aligned_strides, head_block

BLOCK_G = 16  # query rows per program: the smallest tensor-core tile M
# Head dims and strides are multiples of ALIGN elements (16 bytes at fp16: one vector load); the
# tiles pad D to BLOCK_D = head_block(D), a power of two, and mask the rest.
ALIGN = 8
MIN_HEAD_DIM = 8
MAX_HEAD_DIM = 256
# fp32 q runs the prefill dots as tf32x3, whose split operands spill registers past this.
PREFILL_FP32_MAX_HEAD_DIM = 128

@triton.jit
def _score_mods(s, softcap2, slope2, q_pos, k_pos, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    # Steps 2-3 of frugal.score_mods on base-2 scores s = log2(e) * scale * q.k: the natural
    # score's cap c tanh(x / c) is c2 tanh(s / c2) in base 2 (softcap2 = c log2(e)); slope2
    # [rows] is the ALiBi slope times log2(e), q_pos a row's position (scalar or [rows, 1]).
    if SOFTCAP:
        s = softcap2 * tanh(s / softcap2)
    if ALIBI:
        s = s - slope2[:, None] * tl.abs(q_pos - k_pos).to(tl.float32)
    return s


_ATTN_INTS = ["window", "partition", "num_splits", "Hkv", "G", "D", "page_size", "stride_tb",
              "stride_qb", "stride_qh", "stride_kb", "stride_ko", "stride_kh", "stride_vb",
              "stride_vo", "stride_vh"]


@triton.jit(do_not_specialize=_ATTN_INTS)
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr, lens_ptr, out_ptr, lse_ptr, ws_o_ptr,
    ws_lse_ptr, alibi_ptr,
    qk_scale, softcap2, window, partition, num_splits, Hkv, G, D, page_size, stride_tb,
    stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    # Stage 1: one (sequence, kv head, 16-row chunk of its query heads, partition). See the
    # module docstring.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    chunks = tl.cdiv(G, BLOCK_G)
    c = pid % chunks
    h = (pid // chunks) % Hkv
    b = pid // chunks // Hkv
    # Alignment the launcher guarantees, stated so the compiler can see it.
    D = D // 8 * 8
    stride_qb = stride_qb // 8 * 8
    stride_qh = stride_qh // 8 * 8
    stride_kb = stride_kb // 8 * 8
    stride_ko = stride_ko // 8 * 8
    stride_kh = stride_kh // 8 * 8
    stride_vb = stride_vb // 8 * 8
    stride_vo = stride_vo // 8 * 8
    stride_vh = stride_vh // 8 * 8

    seq_len = tl.load(lens_ptr + b)
    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    start = lo // BLOCK_N * BLOCK_N + split * partition
    end = tl.minimum(seq_len, start + partition)
    if (num_splits > 1) & (start >= end):
        return  # a partition past this sequence's end: stage 2 does not read it

    offs_g = c * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    heads = h * G + offs_g  # query heads of this program
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    KV_INT8: tl.constexpr = k_ptr.dtype.element_ty == tl.int8
    IEEE: tl.constexpr = q_ptr.dtype.element_ty == tl.float32
    # fp32 q: IEEE fp32 dots on CUDA cores, except over an int8 cache, where such a dot would
    # keep each thread's whole reduction strip of the converted operand in registers (it spills
    # from D = 128): there the dots run as tf32x3 on tensor cores (int8 values are exact in
    # tf32, q is split in two tf32 halves), fp32-accurate.
    PRECISION: tl.constexpr = "tf32x3" if KV_INT8 else "ieee"
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table_row = table_ptr + b64 * stride_tb
    k_head = k_ptr + h * stride_kh
    v_head = v_ptr + h * stride_vh
    if ALIBI:  # each row's slope times log2(e); the query sits at seq_len - 1
        slope2 = tl.load(alibi_ptr + b64 * Hkv * G + heads, mask=g_mask, other=0.0) * K_LOG2E
    # Each tile's pages are loaded one iteration ahead: K/V addresses that hang on a table load
    # of the same iteration keep the pipeliner from multi-buffering them (one stage only).
    pos = start + offs_n
    page = tl.load(table_row + pos // page_size, mask=(pos >= lo) & (pos < end),
                   other=0).to(tl.int64)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = (pos >= lo) & (pos < end)
        ahead = pos + BLOCK_N
        page_ahead = tl.load(table_row + ahead // page_size, mask=ahead < end,
                             other=0).to(tl.int64)
        in_page = pos % page_size
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_head + (page * stride_kb + in_page * stride_ko)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k).to(tl.float32), input_precision=PRECISION)
        else:
            qk = tl.dot(q, tl.trans(k).to(q.dtype))
        if KV_INT8:
            slot = (page * page_size + in_page) * Hkv + h
            k_s = tl.load(ks_ptr + slot, mask=valid, other=0.0)
            s = qk * (k_s * qk_scale)[None, :]
        else:
            s = qk * qk_scale
        s = _score_mods(s, softcap2, slope2 if ALIBI else 0.0, seq_len - 1, pos[None, :],
                        SOFTCAP, ALIBI)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_head + (page * stride_vb + in_page * stride_vo)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0)
        if KV_INT8:
            v_s = tl.load(vs_ptr + slot, mask=valid, other=0.0)
            p = p * v_s[None, :]
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(p.to(q_ptr.dtype.element_ty), v.to(q_ptr.dtype.element_ty), acc)
        m = m_new
        page = page_ahead

    rows = b64 * Hkv * G + heads  # rows of out [B * Hq, D]
    mask = g_mask[:, None] & d_mask[None, :]
    if num_splits > 1:
        ws_rows = rows * num_splits + split
        tl.store(ws_o_ptr + ws_rows[:, None] * D + offs_d[None, :], acc / l[:, None], mask=mask)
        tl.store(ws_lse_ptr + ws_rows, m + tl.log2(l), mask=g_mask)
    else:
        o = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # seq_len 0: zeros
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(lse_ptr + rows, (m + tl.log2(l)) * K_LN2, mask=g_mask)  # seq_len 0: -inf


_MERGE_INTS = ["window", "partition", "num_splits", "tile", "Hq", "D"]


@triton.jit(do_not_specialize=_MERGE_INTS)
def _paged_attention_merge_kernel(
    ws_o_ptr, ws_lse_ptr, lens_ptr, out_ptr, lse_ptr, window, partition, num_splits, tile, Hq, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Stage 2: merge one query head's partitions (max-logit / exp-sum, base 2).
    row = tl.program_id(0).to(tl.int64)  # b * Hq + head
    D = D // 8 * 8
    seq_len = tl.load(lens_ptr + row // Hq)
    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    n_parts = tl.cdiv(seq_len - lo // tile * tile, partition)  # those stage 1 wrote
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    lse_row = ws_lse_ptr + row * num_splits
    o_row = ws_o_ptr + row * num_splits * D
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, n_parts, BLOCK_S):
        lse = tl.load(lse_row + s0 + offs_s, mask=s0 + offs_s < n_parts, other=float("-inf"))
        m = tl.maximum(m, lse)
    m_all = tl.max(m, 0)
    den = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for s0 in range(0, n_parts, BLOCK_S):
        s_mask = s0 + offs_s < n_parts
        lse = tl.load(lse_row + s0 + offs_s, mask=s_mask, other=float("-inf"))
        w = tl.where(s_mask, tl.exp2(lse - m_all), 0.0)
        o = tl.load(o_row + (s0 + offs_s)[:, None] * D + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        den += w
        acc += w[:, None] * o
    total = tl.sum(den, 0)
    out = tl.sum(acc, 0) / tl.where(total == 0.0, 1.0, total)  # seq_len 0: zeros
    tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)
    tl.store(lse_ptr + row, (m_all + tl.log2(total)) * K_LN2)  # seq_len 0: -inf


_PREFILL_INTS = ["window", "num_tiles", "Hkv", "G", "D", "page_size", "stride_tb", "stride_qn",
                 "stride_qh", "stride_kb", "stride_ko", "stride_kh", "stride_vb", "stride_vo",
                 "stride_vh"]


@triton.jit(do_not_specialize=_PREFILL_INTS)
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr, lens_ptr, cu_ptr, out_ptr, lse_ptr,
    alibi_ptr, qk_scale, softcap2, window, num_tiles, Hkv, G, D, page_size, stride_tb,
    stride_qn, stride_qh, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    # One q tile (BLOCK_M rows of the (token, query head) pairs of one kv head, token-major) of
    # one sequence. See the module docstring.
    pid = tl.program_id(0)
    tile = num_tiles - 1 - pid % num_tiles  # the last tokens (the longest spans) first
    b = pid // num_tiles // Hkv
    h = pid // num_tiles % Hkv
    D = D // 8 * 8
    stride_qn = stride_qn // 8 * 8
    stride_qh = stride_qh // 8 * 8
    stride_kb = stride_kb // 8 * 8
    stride_ko = stride_ko // 8 * 8
    stride_kh = stride_kh // 8 * 8
    stride_vb = stride_vb // 8 * 8
    stride_vo = stride_vo // 8 * 8
    stride_vh = stride_vh // 8 * 8

    q_start = tl.load(cu_ptr + b)
    n_q = tl.load(cu_ptr + b + 1) - q_start
    row0 = tile * BLOCK_M
    if row0 >= n_q * G:
        return  # past this sequence's chunk
    seq_len = tl.load(lens_ptr + b)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    tok = offs_m // G
    g = offs_m % G
    m_mask = offs_m < n_q * G
    q_pos = seq_len - n_q + tok  # each row's position
    first = seq_len - n_q + row0 // G
    hi = seq_len - n_q + tl.minimum(n_q, (row0 + BLOCK_M - 1) // G + 1)  # last position + 1
    lo = tl.where(window > 0, tl.maximum(first - window + 1, 0), 0)
    span = tl.where(window > 0, window, seq_len + 1)  # a row reads (pos - span, pos]

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    q_rows = (q_start + tok).to(tl.int64)
    heads = h * G + g
    q = tl.load(q_ptr + q_rows[:, None] * stride_qn + heads[:, None] * stride_qh
                + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    KV_INT8: tl.constexpr = k_ptr.dtype.element_ty == tl.int8
    FP32: tl.constexpr = q_ptr.dtype.element_ty == tl.float32
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = table_ptr + b.to(tl.int64) * stride_tb
    k_head = k_ptr + h * stride_kh
    v_head = v_ptr + h * stride_vh
    if ALIBI:  # each row's slope times log2(e)
        slope2 = tl.load(alibi_ptr + b.to(tl.int64) * Hkv * G + heads, mask=m_mask,
                         other=0.0) * K_LOG2E
    first_tile = lo // BLOCK_N * BLOCK_N
    pos = first_tile + offs_n  # pages one iteration ahead, as in decode
    page = tl.load(table_row + pos // page_size, mask=(pos >= lo) & (pos < hi),
                   other=0).to(tl.int64)
    for n0 in range(first_tile, hi, BLOCK_N):
        pos = n0 + offs_n
        valid = (pos >= lo) & (pos < hi)
        ahead = pos + BLOCK_N
        page_ahead = tl.load(table_row + ahead // page_size, mask=ahead < hi,
                             other=0).to(tl.int64)
        in_page = pos % page_size
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_head + (page * stride_kb + in_page * stride_ko)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0)
        if FP32:
            qk = tl.dot(q, tl.trans(k).to(tl.float32), input_precision="tf32x3")
        else:
            qk = tl.dot(q, tl.trans(k).to(q.dtype))
        if KV_INT8:
            slot = (page * page_size + in_page) * Hkv + h
            k_s = tl.load(ks_ptr + slot, mask=valid, other=0.0)
            s = qk * (k_s * qk_scale)[None, :]
        else:
            s = qk * qk_scale
        s = _score_mods(s, softcap2, slope2 if ALIBI else 0.0, q_pos[:, None], pos[None, :],
                        SOFTCAP, ALIBI)
        seen = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - span)
        s = tl.where(seen & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row that has seen nothing yet keeps m = -inf: subtract 0 so its weights are 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_head + (page * stride_vb + in_page * stride_vo)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0)
        if KV_INT8:
            v_s = tl.load(vs_ptr + slot, mask=valid, other=0.0)
            p = p * v_s[None, :]
        acc = acc * alpha[:, None]
        if FP32:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(p.to(q_ptr.dtype.element_ty), v.to(q_ptr.dtype.element_ty), acc)
        m = m_new
        page = page_ahead

    o = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # l > 0 for every stored row
    out_rows = q_rows * (Hkv * G) + heads  # rows of out [N * Hq, D]
    tl.store(out_ptr + out_rows[:, None] * D + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + out_rows, (m + tl.log2(l)) * K_LN2, mask=m_mask)


_APPEND_INTS = ["Hkv", "D", "page_size", "stride_kn", "stride_kh", "stride_vn", "stride_vh",
                "stride_kcb", "stride_kco", "stride_kch", "stride_vcb", "stride_vco",
                "stride_vch"]


@triton.jit
def _store_heads(x, c_ptrs, s_ptr, s_off, mask, h_mask):
    # x [BLOCK_H, BLOCK_D] (zeros where masked) into a cache tile; int8 caches quantize each
    # row as quantize_per_token does and store its scale at s_ptr + s_off.
    if c_ptrs.dtype.element_ty == tl.int8:
        xf = x.to(tl.float32)
        a = tl.abs(xf)
        bad = tl.max((~(a <= FLT_MAX)).to(tl.int32), axis=1) != 0  # inf or NaN
        scale = tl.div_rn(tl.max(a, axis=1), 127.0)
        tl.store(s_ptr + s_off, tl.where(bad, float("nan"), scale), mask=h_mask)
        zero = bad | (scale == 0.0)
        divisor = tl.where(zero, 1.0, scale)
        r = tl.minimum(tl.maximum(tl.div_rn(xf, divisor[:, None]), -127.0), 127.0)
        q = tl.where(zero[:, None], 0.0, round_half_even(r)).to(tl.int8)
        tl.store(c_ptrs, q, mask=mask)
    else:
        tl.store(c_ptrs, x.to(c_ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_APPEND_INTS)
def _paged_append_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, Hkv, D, page_size,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok)
    if slot < 0:
        return  # padding
    D = D // 8 * 8
    stride_kn = stride_kn // 8 * 8
    stride_kh = stride_kh // 8 * 8
    stride_vn = stride_vn // 8 * 8
    stride_vh = stride_vh // 8 * 8
    stride_kcb = stride_kcb // 8 * 8
    stride_kco = stride_kco // 8 * 8
    stride_kch = stride_kch // 8 * 8
    stride_vcb = stride_vcb // 8 * 8
    stride_vco = stride_vco // 8 * 8
    stride_vch = stride_vch // 8 * 8
    slot64 = slot.to(tl.int64)
    block = slot64 // page_size
    in_page = slot64 % page_size
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = heads < Hkv
    mask = h_mask[:, None] & (offs_d < D)[None, :]
    tok64 = tok.to(tl.int64)
    k = tl.load(k_ptr + tok64 * stride_kn + heads[:, None] * stride_kh + offs_d[None, :],
                mask=mask, other=0.0)
    v = tl.load(v_ptr + tok64 * stride_vn + heads[:, None] * stride_vh + offs_d[None, :],
                mask=mask, other=0.0)
    kc = kc_ptr + block * stride_kcb + in_page * stride_kco
    vc = vc_ptr + block * stride_vcb + in_page * stride_vco
    s_off = slot64 * Hkv + heads  # scales [num_blocks, page_size, Hkv], contiguous
    _store_heads(k, kc + heads[:, None] * stride_kch + offs_d[None, :], ks_ptr, s_off, mask,
                 h_mask)
    _store_heads(v, vc + heads[:, None] * stride_vch + offs_d[None, :], vs_ptr, s_off, mask,
                 h_mask)


# frugal check: {kernel: (label, tensor cores expected for these pointer dtypes)}. fp32 q over
# an fp32 cache runs IEEE fp32 dots on CUDA cores by design; over int8, tf32x3 on tensor cores.
CHECK_KERNELS = {
    "_paged_attention_kernel": (
        "paged_attention", lambda d: d["q_ptr"] != "float32" or d["k_ptr"] == "int8"),
    "_paged_attention_merge_kernel": ("paged_attention_merge", lambda d: False),
    "_paged_prefill_kernel": ("paged_prefill", lambda d: True),
    "_paged_append_kernel": ("paged_append", lambda d: False),
}


# ----------------------------------------------------------------------------- launchers

# Triton 3.2 crashes compiling these (fixed in 3.3): the tf32x3 dots of float32 q over an int8
# cache (decode and prefill), and the prefill of fp16/bf16 q over an int8 cache at head_dim > 128.
_TRITON_3_2 = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3)


def unsupported(k_cache, v_cache, k_scale=None, v_scale=None, q_dtype=None):
    """Why these caches (and q of ``q_dtype``, when given) cannot go through the Triton kernels
    (None when they can)."""
    if _TRITON_3_2 and q_dtype == torch.float32 and k_cache.dtype == torch.int8:
        return (f"Triton {triton.__version__} cannot compile float32 q over an int8 cache "
                f"(Triton >= 3.3 can)")
    D = k_cache.shape[3]
    if not (MIN_HEAD_DIM <= D <= MAX_HEAD_DIM and D % ALIGN == 0):
        return (f"the Triton kernels need head_dim a multiple of {ALIGN} from {MIN_HEAD_DIM} to "
                f"{MAX_HEAD_DIM}; got {D}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(3) != 1 or not aligned_strides(t, range(3), ALIGN):
            return (f"the Triton kernels need {name} with unit stride in head_dim and its other "
                    f"strides multiples of {ALIGN} elements; got strides {tuple(t.stride())}")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is not None and not s.is_contiguous():
            return f"the Triton kernels need a contiguous {name}"
    return None


def attention_table(q_dtype):
    return "paged_attention_fp32" if q_dtype == torch.float32 else "paged_attention"


def pick_config(q, D):
    """The stage-1 config for q's dtype and head dim D."""
    return configs.pick(attention_table(q.dtype), "D", D, _launch.device_key(q.device))


def split_plan(cfg, units, span, sms):
    """(splits, partition) for ``units`` stage-1 programs per partition and an attended span
    of at most ``span`` positions; see the module docstring. ``partition`` is a multiple of
    BLOCK_N that covers the span when splits == 1."""
    bn = cfg["BLOCK_N"]
    whole = triton.cdiv(max(span, 1), bn) * bn
    min_part = triton.cdiv(max(cfg["min_partition"], 1), bn) * bn
    target = cfg["programs_per_sm"] * sms
    if units >= target or span <= min_part:
        return 1, whole
    want = triton.cdiv(target, units)
    part = max(min_part, triton.cdiv(triton.cdiv(span, want), bn) * bn)
    splits = triton.cdiv(span, part)
    return (1, whole) if splits <= 1 else (splits, part)


@functools.lru_cache(maxsize=None)
def _unused_fp32(device):
    # An fp32 pointer for the workspace arguments of a launch without split (one per device,
    # not an allocation per call; fp32 so that both launches share one compiled variant).
    return torch.empty(1, dtype=torch.float32, device=device)


def _decode_split(cfg, B, Hq, Hkv, capacity, window, max_seq_len, sms):
    """(splits, partition) of a decode launch: the attended span is bounded by the table's
    capacity, the window, and the host-known max_seq_len when given (>= 0)."""
    span = capacity if window == 0 else min(capacity, window + cfg["BLOCK_N"] - 1)
    if max_seq_len >= 0:  # a partition starts at or after 0 and ends before seq_len
        span = min(span, max_seq_len)
    units = B * Hkv * triton.cdiv(Hq // Hkv, BLOCK_G)
    return split_plan(cfg, units, span, sms)


def workspace_numel(q, k_cache, width, window=0, max_seq_len=-1):
    """(ws_o, ws_lse) element counts a decode launch of q [B, Hq, D] over tables of ``width``
    blocks needs (0, 0 without split-KV): what a plan allocates once for all its layers."""
    B, Hq, D = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    capacity = width * page_size
    window = int(window) if window is not None and 0 < window < capacity else 0
    cfg = pick_config(q, D)
    splits, _ = _decode_split(cfg, B, Hq, Hkv, capacity, window, max_seq_len,
                              _launch.num_sms(q.device))
    return (B * Hq * splits * D, B * Hq * splits) if splits > 1 else (0, 0)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, window=0, k_scale=None,
                    v_scale=None, *, max_seq_len=-1, workspace=None, config=None,
                    merge_config=None, num_sms=None, return_lse=False, softcap=0.0,
                    alibi_slopes=None):
    """Decode attention over a paged cache; arguments as ``frugal.paged_attention`` (already
    checked), ``window`` <= 0 for none. Returns [B, Hq, D] in q's dtype, and with
    ``return_lse`` also lse float32 [B, Hq] (natural log; -inf for seq_len 0): the kernels
    always write it (B * Hq floats), so both calls run the same compiled variants.

    ``max_seq_len`` >= 0 is a bound of seq_lens the caller knows on the host (the cache manager
    does): the split plan then follows the real lengths instead of the table width.
    ``workspace`` (ws_o, ws_lse) are fp32 buffers of at least :func:`workspace_numel` elements
    to use for split-KV instead of allocating (a plan reuses them for every layer).
    ``config`` / ``merge_config`` override the picked launch configs and ``num_sms`` the SM
    count of the split rule (tests, tuning). ``softcap`` (0.0: none) and ``alibi_slopes``
    (None or contiguous float32 [B, Hq]) modify the scores (frugal.score_mods); without them
    the kernel compiles without their code (constexpr flags).
    """
    B, Hq, D = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    width = block_tables.shape[1]
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    result = (out, lse) if return_lse else out
    if B == 0 or Hq == 0:
        return result
    if width == 0:  # every seq_len is 0
        out.zero_()
        lse.fill_(float("-inf"))
        return result
    capacity = width * page_size
    window = int(window) if window is not None and 0 < window < capacity else 0
    q = aligned(q, ALIGN)
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    G = Hq // Hkv
    cfg = config or pick_config(q, D)
    bn = cfg["BLOCK_N"]
    units = B * Hkv * triton.cdiv(G, BLOCK_G)
    splits, partition = _decode_split(cfg, B, Hq, Hkv, capacity, window, max_seq_len,
                                      num_sms or _launch.num_sms(q.device))
    if splits > 1 and workspace is not None:
        ws_o = workspace[0].view(-1)[:B * Hq * splits * D].view(B, Hq, splits, D)
        ws_lse = workspace[1].view(-1)[:B * Hq * splits].view(B, Hq, splits)
    elif splits > 1:
        ws_o = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
        ws_lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    else:
        ws_o = ws_lse = _unused_fp32(q.device)  # the kernel takes the no-split branch
    block_d = head_block(D)
    _launch.launch(_paged_attention_kernel, (units, splits), q.device)(
        q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, out, lse, ws_o, ws_lse,
        alibi_slopes, float(scale) * LOG2E, float(softcap) * LOG2E, window, partition, splits,
        Hkv, G, D, page_size, block_tables.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_G=BLOCK_G, BLOCK_N=bn, BLOCK_D=block_d, SOFTCAP=softcap > 0,
        ALIBI=alibi_slopes is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        mcfg = merge_config or configs.pick("paged_attention_merge", "D", D,
                                            _launch.device_key(q.device))
        _launch.launch(_paged_attention_merge_kernel, (B * Hq,), q.device)(
            ws_o, ws_lse, seq_lens, out, lse, window, partition, splits, bn, Hq, D,
            BLOCK_S=mcfg["BLOCK_S"], BLOCK_D=block_d, num_warps=mcfg["num_warps"],
        )
    return result


def prefill_unsupported(q_dtype, D, cache_dtype=None):
    """Why the prefill kernel cannot take q of this dtype and head dim D (over a cache of
    ``cache_dtype``) beyond :func:`unsupported` (None when it can)."""
    if _TRITON_3_2 and cache_dtype == torch.int8 and D > 128:
        return (f"Triton {triton.__version__} cannot compile the prefill over an int8 cache at "
                f"head_dim > 128 (Triton >= 3.3 can); got {D}")
    if q_dtype == torch.float32 and D > PREFILL_FP32_MAX_HEAD_DIM:
        return (f"the Triton prefill kernel needs head_dim <= {PREFILL_FP32_MAX_HEAD_DIM} for "
                f"float32 q (its tf32x3 dots spill beyond); got {D}")
    return None


def prefill_table(q_dtype):
    return "paged_prefill_fp32" if q_dtype == torch.float32 else "paged_prefill"


def paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len,
                            scale, window=0, k_scale=None, v_scale=None, *, config=None,
                            return_lse=False, softcap=0.0, alibi_slopes=None):
    """Chunked-prefill attention over a paged cache: q [N, Hq, D] packed, sequence b owning rows
    ``[cu_seqlens_q[b], cu_seqlens_q[b + 1])`` (at most ``max_q_len`` of them) at positions
    ``[seq_lens[b] - n_b, seq_lens[b])``; arguments already checked, ``window`` <= 0 for none.
    Returns [N, Hq, D] in q's dtype, and with ``return_lse`` also lse float32 [N, Hq] (natural
    log; always written, as in decode). ``config`` overrides the picked launch config;
    ``softcap`` and ``alibi_slopes`` as in :func:`paged_attention`."""
    N, Hq, D = q.shape
    B = seq_lens.shape[0]
    _, page_size, Hkv, _ = k_cache.shape
    out = torch.empty((N, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((N, Hq), dtype=torch.float32, device=q.device)
    result = (out, lse) if return_lse else out
    if N == 0 or Hq == 0 or B == 0 or max_q_len <= 0:
        return result
    capacity = block_tables.shape[1] * page_size
    window = int(window) if window is not None and 0 < window < capacity else 0
    q = aligned(q, ALIGN)
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    seq_lens, cu_seqlens_q = seq_lens.contiguous(), cu_seqlens_q.contiguous()
    G = Hq // Hkv
    cfg = config or configs.pick(prefill_table(q.dtype), "D", D, _launch.device_key(q.device))
    num_tiles = triton.cdiv(max_q_len * G, cfg["BLOCK_M"])
    _launch.launch(_paged_prefill_kernel, (B * Hkv * num_tiles,), q.device)(
        q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, cu_seqlens_q, out, lse,
        alibi_slopes, float(scale) * LOG2E, float(softcap) * LOG2E, window, num_tiles, Hkv, G, D,
        page_size, block_tables.stride(0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=head_block(D),
        SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return result


def paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None, *,
                 config=None):
    """Writes k, v [N, Hkv, D] into the caches' slots (negative: skipped), in place; int8
    caches quantize each head vector and store its scale. Arguments already checked."""
    N, Hkv, D = k.shape
    if N == 0 or Hkv == 0:
        return
    k, v = aligned(k, ALIGN), aligned(v, ALIGN)
    if slot_mapping.dtype != torch.int32:
        slot_mapping = slot_mapping.to(torch.int32)  # slots < num_blocks * page_size < 2**31
    slot_mapping = slot_mapping.contiguous()
    cfg = config or configs.pick("paged_append", "D", D, _launch.device_key(k.device))
    _launch.launch(_paged_append_kernel, (N, triton.cdiv(Hkv, cfg["BLOCK_H"])),
                   k.device)(
        k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, Hkv, D, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_H=cfg["BLOCK_H"], BLOCK_D=head_block(D), num_warps=cfg["num_warps"],
    )
