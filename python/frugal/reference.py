"""Plain-PyTorch reference implementations: short, obviously correct, and the ``torch``
backend of every op. Imports nothing of frugal's."""

import torch


def quantize_per_token(x):
    """x [..., K] float -> (q int8 [..., K], scale float32 [...]).

    scale = absmax / 127 per row; q = round_half_to_even(x / scale) clamped to [-127, 127].
    A row of zeros gives scale 0 and zeros; a row holding inf or NaN gives scale NaN and zeros.
    """
    xf = x.float()
    if xf.shape[-1] == 0:
        return torch.empty_like(xf, dtype=torch.int8), xf.new_zeros(xf.shape[:-1])
    scale = xf.abs().amax(dim=-1) / 127.0
    finite = torch.isfinite(xf).all(dim=-1)
    usable = (finite & (scale > 0))[..., None]
    r = xf / torch.where(usable, scale[..., None], 1.0)
    q = torch.where(usable, torch.round(r.clamp(-127.0, 127.0)), 0.0).to(torch.int8)
    return q, torch.where(finite, scale, float("nan"))


def dequantize(q, scale, out_dtype=torch.float32):
    """q int8 [..., K], scale float32 [...] (or a single scale) -> q * scale in out_dtype."""
    s = scale.float()
    if s.dim() > 0:
        s = s[..., None]
    return (q.float() * s).to(out_dtype)


INT8_MAX_K = 131071  # 128 * 128 * K must stay below 2**31 for int32 accumulation


def int8_mm(a, b):
    """a int8 [M, K], b int8 [N, K] (nn.Linear layout) -> int32 [M, N] = a @ b^T, exact."""
    return (a.long() @ b.long().t()).to(torch.int32)


def int8_scaled_mm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float16):
    """(a @ b^T) * a_scale[:, None] * b_scale[None, :] + bias, computed in float32.

    a_scale float32 [M] or [1]; b_scale float32 [N] or [1]; bias [N] or None.
    """
    acc = int8_mm(a, b).float()
    y = acc * a_scale.float().reshape(-1, 1) * b_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_weight_only_mm(x, b, b_scale, bias=None):
    """x float [M, K] @ (b int8 [N, K] * b_scale[:, None])^T + bias, in x's dtype."""
    y = (x.float() @ b.float().t()) * b_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """Writes k[i], v[i] ([Hkv, D], token i) into flat slot ``slot_mapping[i]`` of the caches, in
    place. Slot s is offset ``s % block_size`` of block ``s // block_size`` in k_cache, v_cache
    [num_blocks, block_size, Hkv, D]; a negative slot is padding and is skipped.

    int8 caches (k_scale, v_scale float32 [num_blocks, block_size, Hkv] given) store each head
    vector quantized by :func:`quantize_per_token` and its scale beside it.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    index = (slots // k_cache.shape[1], slots % k_cache.shape[1])
    for x, cache, scale in ((k[keep], k_cache, k_scale), (v[keep], v_cache, v_scale)):
        if scale is not None:
            x, s = quantize_per_token(x)
            scale.index_put_(index, s)
        cache.index_put_(index, x.to(cache.dtype))


def _paged_gather(cache, scale, table_row, lo, hi):
    """Positions [lo, hi) of one sequence, float32 [hi - lo, Hkv, D], read through its table row."""
    bs = cache.shape[1]
    first = lo // bs
    blocks = table_row[first:(hi + bs - 1) // bs].long()
    x = cache[blocks].float()
    if scale is not None:
        x = x * scale[blocks][..., None]
    return x.reshape(-1, *cache.shape[2:])[lo - first * bs:hi - first * bs]


def _paged_attend(q, k_cache, v_cache, table_row, seq_len, scale, window, k_scale, v_scale,
                  softcap=None, slopes=None):
    """Queries q [n, Hq, D] at positions [seq_len - n, seq_len) of one sequence, each attending to
    the keys at positions p with ``q_pos - window < p <= q_pos``, scores modified by
    ``softcap`` and ALiBi ``slopes`` [Hq] (:func:`apply_score_mods`). (out float32 [n, Hq, D],
    lse float32 [n, Hq])."""
    n, hq, d = q.shape
    hkv = k_cache.shape[2]
    lo = 0 if window is None else max(0, seq_len - n - window + 1)
    k = _paged_gather(k_cache, k_scale, table_row, lo, seq_len)
    v = _paged_gather(v_cache, v_scale, table_row, lo, seq_len)
    q_pos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(lo, seq_len, device=q.device)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    # Query head h reads kv head h // (Hq // Hkv).
    qg = q.float().reshape(n, hkv, hq // hkv, d)
    s = torch.einsum("nhgd,khd->hgnk", qg, k) * scale
    s = apply_score_mods(s.reshape(1, hq, n, -1), softcap,
                         None if slopes is None else slopes.reshape(1, hq), q_pos, k_pos)
    s = s.reshape(hkv, hq // hkv, n, -1).masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)
    lse = torch.logsumexp(s, dim=-1).permute(2, 0, 1).reshape(n, hq)
    return torch.einsum("hgnk,khd->nhgd", p, v).reshape(n, hq, d), lse


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None, window=None,
                    k_scale=None, v_scale=None, return_lse=False, softcap=None,
                    alibi_slopes=None):
    """Decode attention over a paged KV cache: q [B, Hq, D], one query per sequence at position
    ``seq_lens[b] - 1``, attending to that sequence's keys at positions [0, seq_lens[b]) (the last
    ``window`` of them when window is given). Keys and values are read through
    ``block_tables[b]``: position p lives at offset ``p % block_size`` of block
    ``block_tables[b, p // block_size]``. Query head h reads kv head ``h // (Hq // Hkv)``.
    scale defaults to D**-0.5; a sequence of length 0 gives zeros. Computed in float32; the
    result has q's dtype. With ``return_lse``, (out, lse float32 [B, Hq]): the log-sum-exp of
    each row's scaled scores, -inf for a sequence of length 0. ``softcap`` (None or a float)
    and ``alibi_slopes`` ([Hq] or [B, Hq]) modify the scores as :mod:`frugal.score_mods`
    says, the query at position ``seq_lens[b] - 1``.
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    slopes = _slope_rows(alibi_slopes, q.shape[0])
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len > 0:
            o, s = _paged_attend(q[b:b + 1], k_cache, v_cache, block_tables[b], seq_len, scale,
                                 window, k_scale, v_scale, softcap, slopes[b])
            out[b], lse[b] = o[0], s[0]
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)


def _slope_rows(alibi_slopes, batch):
    """ALiBi slopes [H] or [B, H] (or None) -> one row (or None) per sequence."""
    if alibi_slopes is None:
        return [None] * batch
    return list(alibi_slopes.expand(batch, alibi_slopes.shape[-1]).unbind(0))


def paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens=None, scale=None,
                            window=None, k_scale=None, v_scale=None, return_lse=False,
                            softcap=None, alibi_slopes=None):
    """Chunked-prefill attention over a paged KV cache whose tables already hold the chunk.

    q is [B, T, Hq, D] (T queries per sequence) or packed [N, Hq, D] with q_lens [B] (sequence
    b owns the next q_lens[b] rows). The queries of sequence b sit at positions
    [seq_lens[b] - n_b, seq_lens[b]) and each attends to the cached keys at positions up to and
    including its own (the last ``window`` of them when window is given): the cached prefix and,
    causally, the chunk. Otherwise as :func:`paged_attention`; the result has q's shape (and
    lse, with ``return_lse``, q's shape without the last dim).
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    rows = q.reshape(-1, *q.shape[-2:])
    counts = [q.shape[1]] * q.shape[0] if q.dim() == 4 else q_lens.tolist()
    slopes = _slope_rows(alibi_slopes, len(counts))
    out = torch.zeros(rows.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(rows.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    start = 0
    for b, (n, seq_len) in enumerate(zip(counts, seq_lens.tolist())):
        if n > 0:
            out[start:start + n], lse[start:start + n] = _paged_attend(
                rows[start:start + n], k_cache, v_cache, block_tables[b], seq_len, scale, window,
                k_scale, v_scale, softcap, slopes[b])
        start += n
    out = out.reshape(q.shape).to(q.dtype)
    return (out, lse.reshape(q.shape[:-1])) if return_lse else out


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets, from the attention over each:
    out_* [..., D] with lse_* [...] (natural log of the sum of exp of the scaled scores) ->
    (out in out_a's dtype, lse float32; float64 in and out for float64 inputs).

    lse = log(e^lse_a + e^lse_b), out = (e^lse_a out_a + e^lse_b out_b) / e^lse, computed
    relative to max(lse_a, lse_b). A part with lse -inf is empty: it weighs exactly 0 and its
    out is not read (merging with an empty part returns the other part unchanged); both empty
    give out 0 and lse -inf. A NaN lse gives NaN out and lse; a +inf lse gives NaN too.
    """
    wide = torch.float64 if lse_a.dtype == torch.float64 else torch.float32
    la, lb = lse_a.to(wide), lse_b.to(wide)
    m = torch.maximum(la, lb)  # NaN if either is NaN
    base = torch.where(m == float("-inf"), 0.0, m)
    wa, wb = torch.exp(la - base), torch.exp(lb - base)
    total = wa + wb
    oa = torch.where((la == float("-inf"))[..., None], 0.0,
                     out_a.to(wide) * (wa / total)[..., None])
    ob = torch.where((lb == float("-inf"))[..., None], 0.0,
                     out_b.to(wide) * (wb / total)[..., None])
    return (oa + ob).to(out_a.dtype), base + torch.log(total)


def sparse_attention(q, k, v, mask, scale=None, softcap=None, alibi_slopes=None):
    """Dense masked attention: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D], mask bool broadcastable
    to [B, Hq, Nq, Nk] (True: attend) or an object with ``to_dense()`` -> (out [B, Hq, Nq, D],
    lse [B, Hq, Nq]), computed in q's dtype (pass float64 for a reference). A row with no
    allowed key gives out 0 and lse -inf. softcap / alibi_slopes ([Hq] or [B, Hq]): the score
    modifiers (:func:`apply_score_mods`), query i at position ``i + Nk - Nq``, key j at j."""
    if not isinstance(mask, torch.Tensor):
        mask = mask.to_dense(q.device)
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = (q @ k.transpose(-1, -2)) * scale
    nq, nk = q.shape[2], k.shape[2]
    q_pos = torch.arange(nk - nq, nk, device=q.device)  # bottom-right, as the causal masks
    s = apply_score_mods(s, softcap, alibi_slopes, q_pos, torch.arange(nk, device=q.device))
    s = s.masked_fill(~mask.to(q.device), float("-inf"))
    lse = torch.logsumexp(s.float() if s.dtype != torch.float64 else s, dim=-1)
    # Only an empty row (lse -inf) is special; a +inf score gives lse +inf and a NaN row.
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None].to(s.dtype))
    out = p @ v
    return out, lse.float() if lse.dtype != torch.float64 else lse


def apply_score_mods(s, softcap=None, alibi_slopes=None, q_pos=None, k_pos=None):
    """Steps 2-3 of frugal.score_mods on scaled scores s [B, H, Nq, Nk] (or any shape whose
    dims -4, -3 are batch and query head, when alibi_slopes is given): softcap c gives
    ``c * tanh(s / c)``; alibi_slopes [H] or [B, H] subtract ``slope * |q_pos - k_pos|`` with
    q_pos [Nq], k_pos [Nk] integer positions. Computed in s's dtype."""
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        m = alibi_slopes.to(s.dtype)
        m = m.reshape(1, -1) if m.dim() == 1 else m
        dist = (q_pos.reshape(-1, 1) - k_pos.reshape(1, -1)).abs().to(s.dtype)
        s = s - m[:, :, None, None] * dist
    return s
