"""Block-sparse attention kernels (flash-attention-2 style) over a ``frugal.BlockMask`` layout:
``forward`` (out, lse) and ``backward`` (dq, dk, dv). The mask format is described in
docs/block_mask_format.md; the launchers take its ``SparseLayout`` (tensors already broadcast to
[B, Hq, ...], broadcast dims with stride 0, which the kernels honour).

Forward
-------
Grid (cdiv(Nq, BLOCK_M) * B * Hq,), the q tiles of a head adjacent (one axis: y would cap B * Hq
at 65535). A program owns BLOCK_M query rows of one q-block (the tile may
be smaller than the mask block: BLOCK_M divides BQ and BLOCK_N divides BK) and walks that
q-block's lists, each kv-block as BK / BLOCK_N sub-tiles in one flat loop (so the loop
pipelines):

1. the *full* blocks with no element test at all -- except the ragged last kv-block (Nk not a
   multiple of BK), which, being the highest index, is the list's last entry and is walked
   apart with the ``k < Nk`` bound only;
2. the *partial* blocks with the element rule: bounds, then the constexpr flags HAS_BAND
   (``lo <= k - q <= hi``, or ``k < prefix`` with HAS_PREFIX), HAS_DOC (``q_doc == kv_doc``)
   and HAS_BITS (bit ``(q % BQ, k % BK)`` of the block's packed bitmask, arithmetic shift then
   ``& 1``). The values are runtime arguments: a new mask never compiles anything. The
   launchers compile two variants only (``_generic``): the band rule, and the generic rule
   (band, document ids and bitmask together, missing parts read as allow-all).

Scores are ``q @ k^T`` with ``scale * log2(e)`` folded into one multiply, softmax online in fp32
with exp2 (running max m, sum l, rescaled fp32 accumulator). A row that has seen no allowed key
keeps m = -inf; the exponent offset is then 0 instead of m, so ``exp2(-inf - (-inf))`` never
runs and nothing becomes NaN. At the end a row with l = 0 stores out = 0 and lse = -inf;
otherwise lse = (m + log2 l) * ln 2 (natural log, as the API documents).

Score modifiers (``frugal.score_mods``; constexpr HAS_SOFTCAP / HAS_ALIBI, so a call without
them compiles and runs the kernels without them): applied to every tile's scores right after
the product, before the element rule. The scores are already in base 2 (s2 = s log2(e)), so the
cap runs there as ``cap2 tanh(s2 / cap2)`` with ``cap2 = softcap log2(e)`` -- the same
function of the natural-scale score, scaled by log2(e) -- and ALiBi as ``slope log2(e) |q_pos -
k_pos|``. tanh is built from exp (no tanh in every supported Triton). The backward multiplies P
by the cap's derivative ``1 - tanh^2`` before the dP product, which gives dS of the uncapped
scores (and keeps tanh from being live across that product: the fp32 D = 256 tiles spilled).
A config entry may carry ``"mods"`` overrides for launches with a modifier (``pick_config``).

Dots: fp16/bf16 operands on tensor cores with an fp32 accumulator (P is rounded to the input
dtype for the P @ V dot, as FlashAttention does). fp32 inputs run IEEE fp32 dots
(``input_precision="ieee"``, CUDA cores): TF32 (10-bit mantissa) would miss the accuracy rule
(error <= 2x that of plain fp32 PyTorch). tf32x3 (fp32-accurate on tensor cores) is the
candidate for a faster fp32 path, not taken: the interpreter does not emulate it, so its
accuracy could not be checked here. The IEEE dots keep their operands in registers, so the
fp32 configs use small tiles (16-32 rows) to stay free of spills.

Bitmask: a tile's bits are read as one vector of words per 32-key column (over the tile's rows)
and selected per element; a per-element gather would hold a 64-bit address per element and
made the dk/dv kernel spill.

The three kernels repeat their prologues and list walks rather than share helpers: ptxas's
register allocation of these kernels proved sensitive to such restructuring (small spills
appeared in configs that had none), and ``frugal check`` fails on any spill.

Backward
--------
``delta = rowsum(dout * out)`` (fp32) by a small preprocess kernel, then two kernels with no
atomics (deterministic):

- dk/dv: grid (cdiv(Nk, BLOCK_N) * B * Hkv,). A program owns BLOCK_N keys of one kv-block, keeps
  K, V and the dk, dv accumulators (fp32) in registers, and for each of the G = Hq / Hkv query
  heads of its kv head (GQA: the sum over the group happens in registers) walks that head's
  transposed lists -- ``full_q_idx`` (ragged last q-block apart), then ``q_idx`` with the
  element rule (``q_bits`` for the bitmask) -- in BQ / BLOCK_M sub-tiles, computing the
  transposed products ``k @ q^T`` so that P^T and dS^T feed the dots directly:
  ``p = exp2(s - lse2)``, ``dv += p^T @ dout``, ``ds = p * (dout @ v^T - delta)``,
  ``dk += ds^T @ q``; dk is scaled by ``scale`` at the end. Rows past Nq read lse = +inf
  (p = 0), and an empty row's lse of -inf is also read as +inf: it contributes nothing.
- dq: grid (cdiv(Nq, BLOCK_M) * B * Hq,), the forward's walk: ``dq += ds @ k``, times ``scale``.

Layouts and limits: q, k, v, out and dout need unit stride in D and their other strides
multiples of 16 elements (the kernels state it to the compiler for 16-byte vector loads); an
input that breaks this is copied (a transpose of [B, N, H, D] does not). The list tensors need
contiguous inner dims (a copy otherwise; ``layout()`` expands, which keeps them). Integer
arguments are ``do_not_specialize``: a value of 1 or a multiple of 16 compiles nothing new.
Configs are data (``configs/default.json``, bucketed on D): ``sparse_attention_fwd`` /
``_bwd_dkdv`` / ``_bwd_dq`` for fp16/bf16, the same names with ``_fp32`` for fp32, and
``sparse_attention_bwd_pre``.
A config's tile larger than the mask block is clamped to it; ``frugal check`` compiles every
launch the call matrix makes.
"""

import functools

import torch
import triton
import triton.language as tl

from . import _launch, configs
from ._common import K_LN2, K_LOG2E, LOG2E, tanh
from ._launch import aligned as _aligned
from ._launch import head_block

HEAD_DIMS = tuple(range(8, 257, 8))  # D runs in a masked power-of-two BLOCK_D >= 32
BLOCK_SIZES = (64, 128)  # mask block sizes the launchers accept (BQ and BK)
FLAG_BAND, FLAG_PREFIX, FLAG_DOC, FLAG_BITS = 1, 2, 4, 8
_INF = 1 << 30  # an unbounded band side: |k - q| never reaches it (block_mask.INF)

# Runtime integer arguments (all do_not_specialize). The list strides are (batch, head) for the
# counts and (batch, head, row) for the index lists, whose inner dim has unit stride.
_LIST_INTS = ["s_pnum_b", "s_pnum_h", "s_pidx_b", "s_pidx_h", "s_pidx_r", "s_pbits_b",
              "s_pbits_h", "s_pbits_r", "s_fnum_b", "s_fnum_h", "s_fidx_b", "s_fidx_h",
              "s_fidx_r", "s_qdoc_b", "s_kdoc_b", "s_bits_i", "s_bits_r"]
_QKV_INTS = ["stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn",
             "stride_vb", "stride_vh", "stride_vn"]
_FWD_INTS = ["Nq", "Nk", "BQ", "BK", "Hq", "G", "D", "lo", "hi", "prefix", *_QKV_INTS,
             *_LIST_INTS]
_DQ_INTS = [*_FWD_INTS, "stride_dob", "stride_doh", "stride_dom"]
_DKDV_INTS = ["Nq", "Nk", "BQ", "BK", "Hkv", "G", "D", "lo", "hi", "prefix", *_QKV_INTS,
              "stride_dob", "stride_doh", "stride_dom", *_LIST_INTS]
_PRE_INTS = ["Nq", "D", "stride_ob", "stride_oh", "stride_om", "stride_dob", "stride_doh",
             "stride_dom", "Hq"]


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 operands: IEEE fp32 (no TF32, see the module docstring). Two helpers, not one with
    # a None accumulator: Triton 3.2 cannot pass None through a jit function.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _allowed(qpos, kpos, Nq, Nk, lo, hi, prefix, qd, kd, bit,
             HAS_BAND: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DOC: tl.constexpr,
             HAS_BITS: tl.constexpr):
    # The element rule of docs/block_mask_format.md on broadcastable position tensors (qpos
    # [M, 1] and kpos [1, N], or transposed), bounds included. qd / kd: the document ids at
    # those positions (HAS_DOC); bit: the bitmask bits at those positions (HAS_BITS).
    ok = (qpos < Nq) & (kpos < Nk)
    if HAS_BAND:
        delta = kpos - qpos
        band = (delta >= lo) & (delta <= hi)
        if HAS_PREFIX:
            band = band | (kpos < prefix)
        ok = ok & band
    if HAS_DOC:
        ok = ok & (qd == kd)
    if HAS_BITS:
        ok = ok & (bit != 0)
    return ok


@triton.jit
def _bits(bits_blk, s_bits_r, qrow, kcol, kofs, NW: tl.constexpr):
    # Bits of a block's bitmask [BQ, BK // 32] (int32 words) at broadcastable in-block positions
    # qrow (rows) and kcol (columns; the tile's columns start at kofs and span NW words), as
    # 0/1 of the broadcast shape. Each word column is loaded as one vector over the rows and
    # selected per element: no gather, no reshape (both cost registers in the MMA layouts).
    first = kofs >> 5
    row_ptr = bits_blk + qrow * s_bits_r + first
    word = tl.load(row_ptr)
    for i in tl.static_range(1, NW):
        word = tl.where((kcol >> 5) == first + i, tl.load(row_ptr + i), word)
    return (word >> (kcol & 31)) & 1  # arithmetic shift, then & 1


@triton.jit
def _walk(num_ptr, idx_ptr, N, B_):
    # (count, count without the ragged last block, its index) of one block list: a list entry
    # equal to the ragged last block of a length-N axis cut in blocks of B_ (always the last
    # entry, the lists being ascending) is walked apart with bounds.
    n = tl.load(num_ptr)
    last = tl.load(idx_ptr + tl.maximum(n - 1, 0))
    ragged = ((N % B_) != 0) & (n > 0) & (last == (N - 1) // B_)
    return n, n - ragged.to(tl.int32), last


@triton.jit
def _score_mods(s, qpos, kpos, cap2, slope2, shift,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    # frugal.score_mods on base-2 scores s = scale log2(e) q.k at broadcastable query / key
    # indices: the softcap c is cap2 tanh(s / cap2) with cap2 = c log2(e) (c tanh(s_e / c) in
    # base 2), ALiBi subtracts slope2 |q_pos - k_pos| with slope2 = slope log2(e) and query i at
    # position i + shift. Returns (s, t): t = tanh(s / cap2) for the backward's 1 - t^2.
    t = 0.0
    if HAS_SOFTCAP:
        t = tanh(s / cap2)
        s = cap2 * t
    if HAS_ALIBI:
        s = s - slope2 * tl.abs((qpos + shift - kpos).to(tl.float32))
    return s, t


# ----------------------------------------------------------------------------- forward

@triton.jit
def _fwd_tile(acc, l, m, q, rows, qd, k_head, v_head, n0, kb, offs_n, offs_d, d_mask,
              stride_kn, stride_vn, qk_scale, Nq, Nk, BK, lo, hi, prefix, kdoc_row,
              bits_blk, s_bits_r, q0, cap2, slope2, shift,
              MASKED: tl.constexpr, HAS_BAND: tl.constexpr, HAS_PREFIX: tl.constexpr,
              HAS_DOC: tl.constexpr, HAS_BITS: tl.constexpr, IEEE: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    # One [BLOCK_M, BLOCK_N] step of the online softmax over keys n0 + offs_n. MASKED: the
    # key bound and the element rule (flags) apply; otherwise no element test at all.
    cols = n0 + offs_n
    k_ptrs = k_head + n0.to(tl.int64) * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_head + n0.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
    if MASKED:
        kv_mask = (cols < Nk)[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    s, _ = _score_mods(s, rows[:, None], cols[None, :], cap2, slope2, shift, HAS_SOFTCAP,
                       HAS_ALIBI)
    if MASKED:
        kd = 0
        if HAS_DOC:
            kd = tl.load(kdoc_row + cols, mask=cols < Nk, other=-1)[None, :]
        bit = 0
        if HAS_BITS:
            bit = _bits(bits_blk, s_bits_r, (rows - q0)[:, None], (cols - kb * BK)[None, :],
                        n0 - kb * BK, (k.shape[0] + 31) // 32)
        ok = _allowed(rows[:, None], cols[None, :], Nq, Nk, lo, hi, prefix, qd, kd, bit,
                      HAS_BAND, HAS_PREFIX, HAS_DOC, HAS_BITS)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no allowed key yet: exp2(-inf) = 0
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return acc, l, m_new


@triton.jit(do_not_specialize=_FWD_INTS)
def _sparse_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    pnum_ptr, pidx_ptr, pbits_ptr, fnum_ptr, fidx_ptr, qdoc_ptr, kdoc_ptr, bits_ptr, alibi_ptr,
    qk_scale, cap2, Nq, Nk, BQ, BK, Hq, G, D, lo, hi, prefix,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    s_pnum_b, s_pnum_h, s_pidx_b, s_pidx_h, s_pidx_r, s_pbits_b, s_pbits_h, s_pbits_r,
    s_fnum_b, s_fnum_h, s_fidx_b, s_fidx_h, s_fidx_r, s_qdoc_b, s_kdoc_b, s_bits_i, s_bits_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DOC: tl.constexpr,
    HAS_BITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    IEEE: tl.constexpr = q_ptr.dtype.element_ty == tl.float32
    # Alignment the launcher guarantees, stated so the compiler can see it.
    D = D // 16 * 16
    stride_qb = stride_qb // 16 * 16
    stride_qh = stride_qh // 16 * 16
    stride_qm = stride_qm // 16 * 16
    stride_kb = stride_kb // 16 * 16
    stride_kh = stride_kh // 16 * 16
    stride_kn = stride_kn // 16 * 16
    stride_vb = stride_vb // 16 * 16
    stride_vh = stride_vh // 16 * 16
    stride_vn = stride_vn // 16 * 16

    # One grid axis (x allows 2**31 - 1 programs; y only 65535): the q tiles of a head are
    # adjacent, so neighbouring programs share K/V blocks in L2.
    tiles = tl.cdiv(Nq, BLOCK_M)
    m0 = tl.program_id(0) % tiles * BLOCK_M
    bh = (tl.program_id(0) // tiles).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    qb = m0 // BQ
    q0 = qb * BQ
    shift = Nk - Nq  # query i sits at position i + Nk - Nq (score modifiers)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(alibi_ptr + bh) * K_LOG2E
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    rows = m0 + offs_m
    r_mask = rows < Nq
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + m0.to(tl.int64) * stride_qm
                + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    k_head = k_ptr + b * stride_kb + hk * stride_kh
    v_head = v_ptr + b * stride_vb + hk * stride_vh
    kdoc_row = kdoc_ptr + b * s_kdoc_b
    qd = 0
    if HAS_DOC:
        qd = tl.load(qdoc_ptr + b * s_qdoc_b + rows, mask=r_mask, other=-1)[:, None]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    SUB = BK // BLOCK_N  # sub-tiles per kv-block

    # Full blocks: no element test; the ragged last kv-block apart, with the key bound only.
    fidx_row = fidx_ptr + b * s_fidx_b + h * s_fidx_h + qb * s_fidx_r
    n_full, n_even, last = _walk(fnum_ptr + b * s_fnum_b + h * s_fnum_h + qb, fidx_row, Nk, BK)
    for j in range(0, n_even * SUB):
        kb = tl.load(fidx_row + j // SUB)
        acc, l, m = _fwd_tile(acc, l, m, q, rows, qd, k_head, v_head,
                              kb * BK + (j % SUB) * BLOCK_N, kb, offs_n, offs_d, d_mask,
                              stride_kn, stride_vn, qk_scale, Nq, Nk, BK, lo, hi, prefix,
                              kdoc_row, bits_ptr, s_bits_r, q0,
                              MASKED=False, HAS_BAND=False, HAS_PREFIX=False, HAS_DOC=False,
                              HAS_BITS=False, IEEE=IEEE,
                              cap2=cap2, slope2=slope2, shift=shift, HAS_SOFTCAP=HAS_SOFTCAP,
                              HAS_ALIBI=HAS_ALIBI)
    if n_even < n_full:
        for t in range(0, tl.cdiv(Nk - last * BK, BLOCK_N)):
            acc, l, m = _fwd_tile(acc, l, m, q, rows, qd, k_head, v_head,
                                  last * BK + t * BLOCK_N, last, offs_n,
                                  offs_d, d_mask, stride_kn, stride_vn, qk_scale, Nq, Nk, BK,
                                  lo, hi, prefix, kdoc_row, bits_ptr, s_bits_r, q0,
                                  MASKED=True, HAS_BAND=False, HAS_PREFIX=False, HAS_DOC=False,
                                  HAS_BITS=False, IEEE=IEEE,
                                  cap2=cap2, slope2=slope2, shift=shift, HAS_SOFTCAP=HAS_SOFTCAP,
                                  HAS_ALIBI=HAS_ALIBI)

    # Partial blocks: bounds and the element rule.
    pidx_row = pidx_ptr + b * s_pidx_b + h * s_pidx_h + qb * s_pidx_r
    pbits_row = pbits_ptr + b * s_pbits_b + h * s_pbits_h + qb * s_pbits_r
    n_part = tl.load(pnum_ptr + b * s_pnum_b + h * s_pnum_h + qb)
    for j in range(0, n_part * SUB):
        kb = tl.load(pidx_row + j // SUB)
        bits_blk = bits_ptr
        if HAS_BITS:
            bits_blk = bits_ptr + tl.load(pbits_row + j // SUB).to(tl.int64) * s_bits_i
        acc, l, m = _fwd_tile(acc, l, m, q, rows, qd, k_head, v_head,
                              kb * BK + (j % SUB) * BLOCK_N, kb, offs_n, offs_d, d_mask,
                              stride_kn, stride_vn, qk_scale, Nq, Nk, BK, lo, hi, prefix,
                              kdoc_row, bits_blk, s_bits_r, q0,
                              MASKED=True, HAS_BAND=HAS_BAND, HAS_PREFIX=HAS_PREFIX,
                              HAS_DOC=HAS_DOC, HAS_BITS=HAS_BITS, IEEE=IEEE,
                              cap2=cap2, slope2=slope2, shift=shift, HAS_SOFTCAP=HAS_SOFTCAP,
                              HAS_ALIBI=HAS_ALIBI)

    empty = l == 0.0  # no allowed key: out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.log2(l_safe)) * K_LN2)
    out_rows = bh * Nq + rows
    tl.store(out_ptr + out_rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=r_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + out_rows, lse, mask=r_mask)


# ----------------------------------------------------------------------------- backward

@triton.jit(do_not_specialize=_PRE_INTS)
def _sparse_bwd_pre_kernel(out_ptr, do_ptr, delta_ptr, Nq, D, stride_ob, stride_oh, stride_om,
                           stride_dob, stride_doh, stride_dom, Hq,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta[b, h, q] = sum_d dout * out in fp32, D in chunks of BLOCK_D (one build for all D).
    D = D // 16 * 16
    stride_ob = stride_ob // 16 * 16
    stride_oh = stride_oh // 16 * 16
    stride_om = stride_om // 16 * 16
    stride_dob = stride_dob // 16 * 16
    stride_doh = stride_doh // 16 * 16
    stride_dom = stride_dom // 16 * 16
    tiles = tl.cdiv(Nq, BLOCK_M)
    bh = (tl.program_id(0) // tiles).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    rows = tl.program_id(0) % tiles * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < Nq
    offs_d = tl.arange(0, BLOCK_D)
    o_rows = out_ptr + b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_om
    do_rows = do_ptr + b * stride_dob + h * stride_doh + rows[:, None].to(tl.int64) * stride_dom
    acc = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask = r_mask[:, None] & (cols < D)[None, :]
        o = tl.load(o_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(o * do, 1)
    tl.store(delta_ptr + bh * Nq + rows, acc, mask=r_mask)


@triton.jit
def _lse2(lse):
    # Natural-log lse to base 2; an empty row's -inf becomes +inf so that its p is 0.
    return tl.where(lse == float("-inf"), float("inf"), lse * K_LOG2E)


@triton.jit
def _dkdv_tile(dk, dv, k, v, cols, kd, q_head, do_head, lse_row, delta_row, m0, offs_m, offs_d,
               d_mask, stride_qm, stride_dom, qk_scale, Nq, Nk, lo, hi, prefix, qdoc_row,
               bits_blk, s_bits_r, q0, kofs, kcol, cap2, slope2, shift,
               MASKED: tl.constexpr, HAS_BAND: tl.constexpr, HAS_PREFIX: tl.constexpr,
               HAS_DOC: tl.constexpr, HAS_BITS: tl.constexpr, IEEE: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    # Queries m0 + offs_m against this program's keys, transposed ([BLOCK_N, BLOCK_M]).
    rows = m0 + offs_m
    q_ptrs = q_head + m0.to(tl.int64) * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = (do_head + m0.to(tl.int64) * stride_dom + offs_m[:, None] * stride_dom
               + offs_d[None, :])
    if MASKED:
        r_mask = rows < Nq
        ld_mask = r_mask[:, None] & d_mask[None, :]
        lse2 = _lse2(tl.load(lse_row + rows, mask=r_mask, other=float("inf")))
        delta = tl.load(delta_row + rows, mask=r_mask, other=0.0)
    else:
        ld_mask = d_mask[None, :]
        lse2 = _lse2(tl.load(lse_row + rows))
        delta = tl.load(delta_row + rows)
    q = tl.load(q_ptrs, mask=ld_mask, other=0.0)
    do = tl.load(do_ptrs, mask=ld_mask, other=0.0)
    s = _dot(k, tl.trans(q), IEEE) * qk_scale
    s, t = _score_mods(s, rows[None, :], cols[:, None], cap2, slope2, shift, HAS_SOFTCAP,
                       HAS_ALIBI)
    if MASKED:
        qd = 0
        if HAS_DOC:
            qd = tl.load(qdoc_row + rows, mask=rows < Nq, other=-1)[None, :]
        bit = 0
        if HAS_BITS:
            bit = _bits(bits_blk, s_bits_r, (rows - q0)[None, :], kcol, kofs,
                        (k.shape[0] + 31) // 32)
        ok = _allowed(rows[None, :], cols[:, None], Nq, Nk, lo, hi, prefix, qd, kd, bit,
                      HAS_BAND, HAS_PREFIX, HAS_DOC, HAS_BITS)
        s = tl.where(ok, s, float("-inf"))
    p = tl.exp2(s - lse2[None, :])
    dv = _dot_acc(p.to(do.dtype), do, dv, IEEE)
    if HAS_SOFTCAP:
        # dS of the uncapped scores: the cap's derivative folded into P before the dp product,
        # so that t is not live across it (with ALiBi and the generic rule, fp32 at D = 256
        # spilled otherwise).
        p = p * (1.0 - t * t)
    dp = _dot(v, tl.trans(do), IEEE)
    ds = p * (dp - delta[None, :])
    dk = _dot_acc(ds.to(q.dtype), q, dk, IEEE)
    return dk, dv


@triton.jit(do_not_specialize=_DKDV_INTS)
def _sparse_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    pnum_ptr, pidx_ptr, pbits_ptr, fnum_ptr, fidx_ptr, qdoc_ptr, kdoc_ptr, bits_ptr, alibi_ptr,
    qk_scale, scale, cap2, Nq, Nk, BQ, BK, Hkv, G, D, lo, hi, prefix,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
    s_pnum_b, s_pnum_h, s_pidx_b, s_pidx_h, s_pidx_r, s_pbits_b, s_pbits_h, s_pbits_r,
    s_fnum_b, s_fnum_h, s_fidx_b, s_fidx_h, s_fidx_r, s_qdoc_b, s_kdoc_b, s_bits_i, s_bits_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DOC: tl.constexpr,
    HAS_BITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    # The lists read here are the transposed ones (q-blocks per kv-block): pnum/pidx/pbits are
    # q_num/q_idx/q_bits, fnum/fidx are full_q_num/full_q_idx.
    IEEE: tl.constexpr = q_ptr.dtype.element_ty == tl.float32
    D = D // 16 * 16
    stride_qb = stride_qb // 16 * 16
    stride_qh = stride_qh // 16 * 16
    stride_qm = stride_qm // 16 * 16
    stride_kb = stride_kb // 16 * 16
    stride_kh = stride_kh // 16 * 16
    stride_kn = stride_kn // 16 * 16
    stride_vb = stride_vb // 16 * 16
    stride_vh = stride_vh // 16 * 16
    stride_vn = stride_vn // 16 * 16
    stride_dob = stride_dob // 16 * 16
    stride_doh = stride_doh // 16 * 16
    stride_dom = stride_dom // 16 * 16

    tiles = tl.cdiv(Nk, BLOCK_N)
    n0 = tl.program_id(0) % tiles * BLOCK_N
    bhk = (tl.program_id(0) // tiles).to(tl.int64)
    b = bhk // Hkv
    hk = bhk % Hkv
    Hq = Hkv * G
    kb = n0 // BK
    k0 = kb * BK
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    cols = n0 + offs_n
    kcol = (cols - k0)[:, None]  # in-block key offsets, for the bitmask
    c_mask = cols < Nk
    kv_mask = c_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + n0.to(tl.int64) * stride_kn
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + n0.to(tl.int64) * stride_vn
                + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    kd = 0
    if HAS_DOC:
        kd = tl.load(kdoc_ptr + b * s_kdoc_b + cols, mask=c_mask, other=-1)[:, None]
    qdoc_row = qdoc_ptr + b * s_qdoc_b
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    SUB = BQ // BLOCK_M  # sub-tiles per q-block
    shift = Nk - Nq  # query i sits at position i + Nk - Nq (score modifiers)

    for g in range(0, G):  # the query heads of this kv head, each with its own lists
        h = hk * G + g
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(alibi_ptr + b * Hq + h) * K_LOG2E
        q_head = q_ptr + b * stride_qb + h * stride_qh
        do_head = do_ptr + b * stride_dob + h * stride_doh
        lse_row = lse_ptr + (b * Hq + h) * Nq
        delta_row = delta_ptr + (b * Hq + h) * Nq

        fidx_row = fidx_ptr + b * s_fidx_b + h * s_fidx_h + kb * s_fidx_r
        n_full, n_even, last = _walk(fnum_ptr + b * s_fnum_b + h * s_fnum_h + kb, fidx_row,
                                     Nq, BQ)
        for j in range(0, n_even * SUB):
            qb = tl.load(fidx_row + j // SUB)
            dk, dv = _dkdv_tile(dk, dv, k, v, cols, kd, q_head, do_head, lse_row, delta_row,
                                qb * BQ + (j % SUB) * BLOCK_M, offs_m, offs_d, d_mask,
                                stride_qm, stride_dom, qk_scale, Nq, Nk, lo, hi, prefix,
                                qdoc_row, bits_ptr, s_bits_r, qb * BQ, n0 - k0, kcol,
                                MASKED=False, HAS_BAND=False, HAS_PREFIX=False, HAS_DOC=False,
                                HAS_BITS=False, IEEE=IEEE,
                                cap2=cap2, slope2=slope2, shift=shift, HAS_SOFTCAP=HAS_SOFTCAP,
                                HAS_ALIBI=HAS_ALIBI)
        if n_even < n_full:
            for t in range(0, tl.cdiv(Nq - last * BQ, BLOCK_M)):
                dk, dv = _dkdv_tile(dk, dv, k, v, cols, kd, q_head, do_head, lse_row,
                                    delta_row, last * BQ + t * BLOCK_M, offs_m, offs_d, d_mask,
                                    stride_qm, stride_dom, qk_scale, Nq, Nk, lo, hi, prefix,
                                    qdoc_row, bits_ptr, s_bits_r, last * BQ, n0 - k0, kcol,
                                    MASKED=True, HAS_BAND=False, HAS_PREFIX=False, HAS_DOC=False,
                                    HAS_BITS=False, IEEE=IEEE,
                                    cap2=cap2, slope2=slope2, shift=shift, HAS_SOFTCAP=HAS_SOFTCAP,
                                    HAS_ALIBI=HAS_ALIBI)

        pidx_row = pidx_ptr + b * s_pidx_b + h * s_pidx_h + kb * s_pidx_r
        pbits_row = pbits_ptr + b * s_pbits_b + h * s_pbits_h + kb * s_pbits_r
        n_part = tl.load(pnum_ptr + b * s_pnum_b + h * s_pnum_h + kb)
        for j in range(0, n_part * SUB):
            qb = tl.load(pidx_row + j // SUB)
            bits_blk = bits_ptr
            if HAS_BITS:
                bits_blk = bits_ptr + tl.load(pbits_row + j // SUB).to(tl.int64) * s_bits_i
            dk, dv = _dkdv_tile(dk, dv, k, v, cols, kd, q_head, do_head, lse_row, delta_row,
                                qb * BQ + (j % SUB) * BLOCK_M, offs_m, offs_d, d_mask,
                                stride_qm, stride_dom, qk_scale, Nq, Nk, lo, hi, prefix,
                                qdoc_row, bits_blk, s_bits_r, qb * BQ, n0 - k0, kcol,
                                MASKED=True, HAS_BAND=HAS_BAND, HAS_PREFIX=HAS_PREFIX,
                                HAS_DOC=HAS_DOC, HAS_BITS=HAS_BITS, IEEE=IEEE,
                                cap2=cap2, slope2=slope2, shift=shift, HAS_SOFTCAP=HAS_SOFTCAP,
                                HAS_ALIBI=HAS_ALIBI)

    out_rows = bhk * Nk + cols
    offs = out_rows[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, rows, qd, k_head, v_head, n0, kb, offs_n, offs_d, d_mask,
             stride_kn, stride_vn, qk_scale, Nq, Nk, BK, lo, hi, prefix, kdoc_row, bits_blk,
             s_bits_r, q0, cap2, slope2, shift,
             MASKED: tl.constexpr, HAS_BAND: tl.constexpr, HAS_PREFIX: tl.constexpr,
             HAS_DOC: tl.constexpr, HAS_BITS: tl.constexpr, IEEE: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    cols = n0 + offs_n
    k_ptrs = k_head + n0.to(tl.int64) * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_head + n0.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
    if MASKED:
        kv_mask = (cols < Nk)[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    s, t = _score_mods(s, rows[:, None], cols[None, :], cap2, slope2, shift, HAS_SOFTCAP,
                       HAS_ALIBI)
    if MASKED:
        kd = 0
        if HAS_DOC:
            kd = tl.load(kdoc_row + cols, mask=cols < Nk, other=-1)[None, :]
        bit = 0
        if HAS_BITS:
            bit = _bits(bits_blk, s_bits_r, (rows - q0)[:, None], (cols - kb * BK)[None, :],
                        n0 - kb * BK, (k.shape[0] + 31) // 32)
        ok = _allowed(rows[:, None], cols[None, :], Nq, Nk, lo, hi, prefix, qd, kd, bit,
                      HAS_BAND, HAS_PREFIX, HAS_DOC, HAS_BITS)
        s = tl.where(ok, s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    if HAS_SOFTCAP:
        p = p * (1.0 - t * t)  # dS of the uncapped scores (as in _dkdv_tile)
    dp = _dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    return _dot_acc(ds.to(k.dtype), k, dq, IEEE)


@triton.jit(do_not_specialize=_DQ_INTS)
def _sparse_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    pnum_ptr, pidx_ptr, pbits_ptr, fnum_ptr, fidx_ptr, qdoc_ptr, kdoc_ptr, bits_ptr, alibi_ptr,
    qk_scale, scale, cap2, Nq, Nk, BQ, BK, Hq, G, D, lo, hi, prefix,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    s_pnum_b, s_pnum_h, s_pidx_b, s_pidx_h, s_pidx_r, s_pbits_b, s_pbits_h, s_pbits_r,
    s_fnum_b, s_fnum_h, s_fidx_b, s_fidx_h, s_fidx_r, s_qdoc_b, s_kdoc_b, s_bits_i, s_bits_r,
    stride_dob, stride_doh, stride_dom,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DOC: tl.constexpr,
    HAS_BITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    IEEE: tl.constexpr = q_ptr.dtype.element_ty == tl.float32
    D = D // 16 * 16
    stride_qb = stride_qb // 16 * 16
    stride_qh = stride_qh // 16 * 16
    stride_qm = stride_qm // 16 * 16
    stride_kb = stride_kb // 16 * 16
    stride_kh = stride_kh // 16 * 16
    stride_kn = stride_kn // 16 * 16
    stride_vb = stride_vb // 16 * 16
    stride_vh = stride_vh // 16 * 16
    stride_vn = stride_vn // 16 * 16
    stride_dob = stride_dob // 16 * 16
    stride_doh = stride_doh // 16 * 16
    stride_dom = stride_dom // 16 * 16

    # One grid axis (x allows 2**31 - 1 programs; y only 65535): the q tiles of a head are
    # adjacent, so neighbouring programs share K/V blocks in L2.
    tiles = tl.cdiv(Nq, BLOCK_M)
    m0 = tl.program_id(0) % tiles * BLOCK_M
    bh = (tl.program_id(0) // tiles).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    qb = m0 // BQ
    q0 = qb * BQ
    shift = Nk - Nq  # query i sits at position i + Nk - Nq (score modifiers)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(alibi_ptr + bh) * K_LOG2E
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    rows = m0 + offs_m
    r_mask = rows < Nq
    ld_mask = r_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + m0.to(tl.int64) * stride_qm
                + offs_m[:, None] * stride_qm + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + m0.to(tl.int64) * stride_dom
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=ld_mask, other=0.0)
    lse2 = _lse2(tl.load(lse_ptr + bh * Nq + rows, mask=r_mask, other=float("inf")))
    delta = tl.load(delta_ptr + bh * Nq + rows, mask=r_mask, other=0.0)
    k_head = k_ptr + b * stride_kb + hk * stride_kh
    v_head = v_ptr + b * stride_vb + hk * stride_vh
    kdoc_row = kdoc_ptr + b * s_kdoc_b
    qd = 0
    if HAS_DOC:
        qd = tl.load(qdoc_ptr + b * s_qdoc_b + rows, mask=r_mask, other=-1)[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    SUB = BK // BLOCK_N

    fidx_row = fidx_ptr + b * s_fidx_b + h * s_fidx_h + qb * s_fidx_r
    n_full, n_even, last = _walk(fnum_ptr + b * s_fnum_b + h * s_fnum_h + qb, fidx_row, Nk, BK)
    for j in range(0, n_even * SUB):
        kb = tl.load(fidx_row + j // SUB)
        dq = _dq_tile(dq, q, do, lse2, delta, rows, qd, k_head, v_head,
                      kb * BK + (j % SUB) * BLOCK_N, kb, offs_n, offs_d, d_mask, stride_kn,
                      stride_vn, qk_scale, Nq, Nk, BK, lo, hi, prefix, kdoc_row, bits_ptr,
                      s_bits_r, q0, MASKED=False, HAS_BAND=False, HAS_PREFIX=False, HAS_DOC=False,
                      HAS_BITS=False, IEEE=IEEE,
                      cap2=cap2, slope2=slope2, shift=shift, HAS_SOFTCAP=HAS_SOFTCAP,
                      HAS_ALIBI=HAS_ALIBI)
    if n_even < n_full:
        for t in range(0, tl.cdiv(Nk - last * BK, BLOCK_N)):
            dq = _dq_tile(dq, q, do, lse2, delta, rows, qd, k_head, v_head,
                          last * BK + t * BLOCK_N, last, offs_n,
                          offs_d, d_mask, stride_kn, stride_vn, qk_scale, Nq, Nk, BK, lo, hi,
                          prefix, kdoc_row, bits_ptr, s_bits_r, q0,
                          MASKED=True, HAS_BAND=False, HAS_PREFIX=False, HAS_DOC=False,
                          HAS_BITS=False, IEEE=IEEE,
                          cap2=cap2, slope2=slope2, shift=shift, HAS_SOFTCAP=HAS_SOFTCAP,
                          HAS_ALIBI=HAS_ALIBI)

    pidx_row = pidx_ptr + b * s_pidx_b + h * s_pidx_h + qb * s_pidx_r
    pbits_row = pbits_ptr + b * s_pbits_b + h * s_pbits_h + qb * s_pbits_r
    n_part = tl.load(pnum_ptr + b * s_pnum_b + h * s_pnum_h + qb)
    for j in range(0, n_part * SUB):
        kb = tl.load(pidx_row + j // SUB)
        bits_blk = bits_ptr
        if HAS_BITS:
            bits_blk = bits_ptr + tl.load(pbits_row + j // SUB).to(tl.int64) * s_bits_i
        dq = _dq_tile(dq, q, do, lse2, delta, rows, qd, k_head, v_head,
                      kb * BK + (j % SUB) * BLOCK_N, kb, offs_n, offs_d, d_mask, stride_kn,
                      stride_vn, qk_scale, Nq, Nk, BK, lo, hi, prefix, kdoc_row, bits_blk,
                      s_bits_r, q0, MASKED=True, HAS_BAND=HAS_BAND, HAS_PREFIX=HAS_PREFIX,
                      HAS_DOC=HAS_DOC, HAS_BITS=HAS_BITS, IEEE=IEEE,
                      cap2=cap2, slope2=slope2, shift=shift, HAS_SOFTCAP=HAS_SOFTCAP,
                      HAS_ALIBI=HAS_ALIBI)

    tl.store(dq_ptr + (bh * Nq + rows)[:, None] * D + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=ld_mask)


# frugal check: {kernel: (label, tensor cores expected for these pointer dtypes)}. fp32 runs
# IEEE fp32 dots on CUDA cores by design (no TF32: the accuracy rule).
CHECK_KERNELS = {
    "_sparse_fwd_kernel": ("sparse_attention_fwd", lambda d: d["q_ptr"] != "float32"),
    "_sparse_bwd_pre_kernel": ("sparse_attention_bwd_pre", lambda d: False),
    "_sparse_bwd_dkdv_kernel": ("sparse_attention_bwd_dkdv", lambda d: d["q_ptr"] != "float32"),
    "_sparse_bwd_dq_kernel": ("sparse_attention_bwd_dq", lambda d: d["q_ptr"] != "float32"),
}


# ----------------------------------------------------------------------------- launchers

# Triton 3.2's pipeline fails on the IEEE fp32 dots of these kernels (3.3 compiles them).
_TRITON_3_2 = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3)


def unsupported(dtype):
    """Why the kernels cannot take inputs of ``dtype`` with the installed Triton (None when they
    can)."""
    if _TRITON_3_2 and dtype == torch.float32:
        return (f"Triton {triton.__version__} cannot compile the float32 kernels (Triton >= 3.3 "
                f"can; fp16/bf16 run)")
    return None


def table(kind, dtype):
    """Config table of ``kind`` ("fwd", "bwd_dkdv", "bwd_dq") for inputs of ``dtype``."""
    name = "sparse_attention_" + kind
    return name + "_fp32" if dtype == torch.float32 else name


def clamp(cfg, BQ, BK):
    """``cfg`` with its tiles clamped to the mask block (BLOCK_M <= BQ, BLOCK_N <= BK)."""
    cfg = dict(cfg)
    if "BLOCK_M" in cfg:
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], BQ)
    if "BLOCK_N" in cfg:
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], BK)
    return cfg


def pick_config(kind, dtype, D, BQ, BK, device=None, mods=False):
    """The launch config of ``kind`` for this dtype, head dim and mask block size. ``mods``: a
    score modifier is on; a config's optional ``"mods"`` entry then overrides some of its
    values (where the modifiers' extra live values made ptxas spill with the plain config)."""
    cfg = configs.pick(table(kind, dtype), "D", D,
                       None if device is None else _launch.device_key(torch.device(device)))
    extra = cfg.pop("mods", {})
    if mods:
        cfg.update(extra)
    return clamp(cfg, BQ, BK)


def flags_of(layout):
    """(HAS_BAND, HAS_PREFIX, HAS_DOC, HAS_BITS) of a layout; a prefix only widens a band."""
    f = int(layout.flags)
    band = bool(f & FLAG_BAND)
    return band, band and bool(f & FLAG_PREFIX), bool(f & FLAG_DOC), bool(f & FLAG_BITS)


def _unit_inner(t, used):
    # Unit stride in the last dim (a copy when not; never for a size-1 dim).
    if used and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _strides(t, n, used):
    return [t.stride(i) for i in range(n)] if used else [0] * n


def _generic(layout):
    """Whether a layout runs the kernels' generic element rule (document ids and bitmask) or
    the band rule. Either way the band test (with its prefix) runs: a layout without one passes
    lo = -INF, hi = INF, prefix = 0, which allow every element. So only two variants of each
    kernel exist per (dtype, config) instead of the twelve flag combinations -- half as many
    compiles for users and for ``frugal check`` -- at the cost of a few integer ops per element
    of partial blocks (the diagonal and boundary blocks only)."""
    _, _, has_doc, has_bits = flags_of(layout)
    return has_doc or has_bits


@functools.lru_cache(maxsize=64)
def _allow_all(device, Nq, Nk, words):
    """Dummies of the generic rule's missing parts: document ids of zeros (every pair in one
    document) and one bitmask row of set bits, read through zero strides."""
    zeros = torch.zeros(1, max(Nq, Nk), dtype=torch.int32, device=device)
    ones = torch.full((1, 1, words), -1, dtype=torch.int32, device=device)
    return zeros, ones


def _list_args(layout, transposed):
    """(tensors, strides) of the lists a kernel walks: forward lists (per q-block) or the
    transposed ones (per kv-block), then q_doc, kv_doc and bits; strides in _LIST_INTS order."""
    _, _, has_doc, has_bits = flags_of(layout)
    if transposed:
        lists = (layout.q_num, layout.q_idx, layout.q_bits, layout.full_q_num, layout.full_q_idx)
    else:
        lists = (layout.kv_num, layout.kv_idx, layout.kv_bits, layout.full_num, layout.full_idx)
    pnum, pidx, pbits, fnum, fidx = (_unit_inner(t, True) for t in lists)
    pbits = _unit_inner(pbits, has_bits)
    qdoc = _unit_inner(layout.q_doc, has_doc)
    kdoc = _unit_inner(layout.kv_doc, has_doc)
    bits = _unit_inner(layout.bits, has_bits)
    if _generic(layout) and not (has_doc and has_bits):
        zeros, ones = _allow_all(layout.kv_num.device, layout.Nq, layout.Nk,
                                 triton.cdiv(layout.BK, 32))
        qdoc, kdoc = (qdoc, kdoc) if has_doc else (zeros, zeros)
        bits = bits if has_bits else ones
    strides = (_strides(pnum, 2, True) + _strides(pidx, 3, True) + _strides(pbits, 3, has_bits)
               + _strides(fnum, 2, True) + _strides(fidx, 3, True) + _strides(qdoc, 1, has_doc)
               + _strides(kdoc, 1, has_doc) + _strides(bits, 2, has_bits))
    return (pnum, pidx, pbits, fnum, fidx, qdoc, kdoc, bits), strides


def _check(layout, q, k, cfg_m, cfg_n):
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    if (layout.Nq, layout.Nk) != (Nq, Nk):
        raise ValueError(f"layout: built for Nq={layout.Nq}, Nk={layout.Nk}; "
                         f"the inputs have Nq={Nq}, Nk={Nk}")
    if tuple(layout.kv_num.shape[:2]) != (B, Hq):
        raise ValueError(f"layout: expanded to [B, Hq] = {list(layout.kv_num.shape[:2])}; "
                         f"q has [B, Hq] = [{B}, {Hq}]")
    if layout.BQ % cfg_m or layout.BK % cfg_n:
        raise ValueError(f"layout: block size ({layout.BQ}, {layout.BK}) is not a multiple of "
                         f"the kernel tile ({cfg_m}, {cfg_n}); supported: {BLOCK_SIZES}")


def _band(layout):
    """(lo, hi, prefix) the kernels test: the layout's where its flags have them, else values
    that allow everything (the band test always runs, see ``_generic``)."""
    band, prefix, _, _ = flags_of(layout)
    lo, hi = (int(layout.lo), int(layout.hi)) if band else (-_INF, _INF)
    return lo, hi, int(layout.prefix) if prefix else 0


def _flag_kwargs(layout):
    generic = _generic(layout)
    return {"HAS_BAND": True, "HAS_PREFIX": True, "HAS_DOC": generic, "HAS_BITS": generic}


def _mods(softcap, alibi, dummy):
    """(alibi tensor, cap2, constexpr flags) of the score modifiers: softcap 0.0 is off, alibi
    None or fp32 [B, Hq] contiguous; ``dummy`` (an fp32 tensor) stands in for absent slopes."""
    flags = {"HAS_SOFTCAP": softcap > 0.0, "HAS_ALIBI": alibi is not None}
    return (dummy if alibi is None else alibi), float(softcap) * LOG2E, flags


def _qkv_strides(q, k, v):
    return [q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2)]


# The kernels state D and every stride as multiples of 16 (their vector loads); other head
# dims (multiples of 8) run zero-padded to the next multiple of 16: zero columns add nothing to
# q.k, and the extra output columns are dropped (a copy in and out, O(N D) against O(N w D)).
ALIGN_D = 16


def _pad_d(*ts):
    d = ts[0].shape[-1]
    return [torch.nn.functional.pad(t, (0, -d % ALIGN_D)) for t in ts]


def _unpad_d(t, d):
    return t[..., :d].contiguous()


def forward(q, k, v, layout, scale, softcap=0.0, alibi_slopes=None, *, config=None):
    """Block-sparse attention forward.

    Parameters
    ----------
    q : Tensor [B, Hq, Nq, D]; k, v : Tensor [B, Hkv, Nk, D]
        fp16, bf16 or fp32, one dtype, Hq % Hkv == 0, D in HEAD_DIMS (already validated;
        D not a multiple of 16 runs zero-padded).
    layout : SparseLayout
        ``mask.layout(B, Hq, device)``.
    scale : float
        Softmax scale.
    softcap, alibi_slopes : float (0.0: none), fp32 [B, Hq] contiguous or None
        The score modifiers (``frugal.score_mods``; already validated).
    config : dict, optional
        Overrides the picked launch config (tests, tuning).

    Returns
    -------
    out : Tensor [B, Hq, Nq, D] in q's dtype (0 on a row with no allowed key)
    lse : Tensor [B, Hq, Nq] fp32, natural log (-inf on such a row)
    """
    B, Hq, Nq, D = q.shape
    if D % ALIGN_D:
        out, lse = forward(*_pad_d(q, k, v), layout, scale, softcap, alibi_slopes,
                           config=config)
        return _unpad_d(out, D), lse
    Hkv, Nk = k.shape[1], k.shape[2]
    mods = softcap > 0.0 or alibi_slopes is not None
    cfg = config or pick_config("fwd", q.dtype, D, layout.BQ, layout.BK, q.device, mods)
    _check(layout, q, k, cfg["BLOCK_M"], cfg["BLOCK_N"])
    out = torch.empty((B, Hq, Nq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Nk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    tensors, list_strides = _list_args(layout, transposed=False)
    alibi, cap2, mod_flags = _mods(softcap, alibi_slopes, lse)
    grid = (triton.cdiv(Nq, cfg["BLOCK_M"]) * B * Hq,)
    _launch.launch(_sparse_fwd_kernel, grid, q.device)(
        q, k, v, out, lse, *tensors, alibi,
        float(scale) * LOG2E, cap2, Nq, Nk, layout.BQ, layout.BK, Hq, Hq // Hkv, D,
        *_band(layout), *_qkv_strides(q, k, v),
        *list_strides,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=head_block(D),
        **_flag_kwargs(layout), **mod_flags, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out, lse


def backward(dout, q, k, v, out, lse, layout, scale, softcap=0.0, alibi_slopes=None, *,
             configs_=None):
    """Block-sparse attention backward: (dq, dk, dv) in the inputs' dtype, computed in fp32;
    dk / dv sum over the query heads of each kv head (GQA). A row with lse = -inf contributes
    nothing. softcap / alibi_slopes as in :func:`forward` (the forward's). ``configs_``
    ({"pre", "bwd_dkdv", "bwd_dq": config}) overrides picked configs."""
    B, Hq, Nq, D = q.shape
    if D % ALIGN_D:
        grads = backward(*_pad_d(dout, q, k, v, out), lse, layout, scale, softcap, alibi_slopes,
                         configs_=configs_)
        return tuple(_unpad_d(g, D) for g in grads)
    Hkv, Nk = k.shape[1], k.shape[2]
    over = configs_ or {}
    mods = softcap > 0.0 or alibi_slopes is not None
    c_dkdv = over.get("bwd_dkdv") or pick_config("bwd_dkdv", q.dtype, D, layout.BQ, layout.BK,
                                                  q.device, mods)
    c_dq = over.get("bwd_dq") or pick_config("bwd_dq", q.dtype, D, layout.BQ, layout.BK,
                                              q.device, mods)
    c_pre = over.get("pre") or configs.pick("sparse_attention_bwd_pre", "D", D,
                                            _launch.device_key(q.device))
    _check(layout, q, k, c_dkdv["BLOCK_M"], c_dkdv["BLOCK_N"])
    _check(layout, q, k, c_dq["BLOCK_M"], c_dq["BLOCK_N"])
    dq = torch.empty((B, Hq, Nq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Nk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Nk, D), dtype=v.dtype, device=q.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    dout, out = _aligned(dout), _aligned(out)
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    block_d = head_block(D)
    _launch.launch(_sparse_bwd_pre_kernel, (triton.cdiv(Nq, c_pre["BLOCK_M"]) * B * Hq,),
                   q.device)(
        out, dout, delta, Nq, D, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), Hq,
        BLOCK_M=c_pre["BLOCK_M"], BLOCK_D=c_pre["BLOCK_D"], num_warps=c_pre["num_warps"],
    )
    qk_scale = float(scale) * LOG2E
    common = (Nq, Nk, layout.BQ, layout.BK)
    band = _band(layout)
    do_strides = [dout.stride(0), dout.stride(1), dout.stride(2)]
    alibi, cap2, mod_flags = _mods(softcap, alibi_slopes, delta)
    flags = {**_flag_kwargs(layout), **mod_flags}

    tensors, list_strides = _list_args(layout, transposed=True)
    _launch.launch(_sparse_bwd_dkdv_kernel, (triton.cdiv(Nk, c_dkdv["BLOCK_N"]) * B * Hkv,),
                   q.device)(
        q, k, v, dout, lse, delta, dk, dv, *tensors, alibi, qk_scale, float(scale), cap2,
        *common, Hkv,
        Hq // Hkv, D, *band, *_qkv_strides(q, k, v), *do_strides, *list_strides,
        BLOCK_M=c_dkdv["BLOCK_M"], BLOCK_N=c_dkdv["BLOCK_N"], BLOCK_D=block_d, **flags,
        num_warps=c_dkdv["num_warps"], num_stages=c_dkdv["num_stages"],
    )
    tensors, list_strides = _list_args(layout, transposed=False)
    _launch.launch(_sparse_bwd_dq_kernel, (triton.cdiv(Nq, c_dq["BLOCK_M"]) * B * Hq,),
                   q.device)(
        q, k, v, dout, lse, delta, dq, *tensors, alibi, qk_scale, float(scale), cap2,
        *common, Hq,
        Hq // Hkv, D, *band, *_qkv_strides(q, k, v), *list_strides, *do_strides,
        BLOCK_M=c_dq["BLOCK_M"], BLOCK_N=c_dq["BLOCK_N"], BLOCK_D=block_d, **flags,
        num_warps=c_dq["num_warps"], num_stages=c_dq["num_stages"],
    )
    return dq, dk, dv
