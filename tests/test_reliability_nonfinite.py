"""NaN and inf in q, k or v propagate the same way on every path of sparse_attention (each CPU
ISA level, the Triton kernel under the interpreter, PyTorch) and in the paged decode / prefill
CPU kernels, forward and backward; a NaN is never dropped into a finite number or a -inf lse.

What each path is compared with, element by element (NaN where NaN, +-inf where +-inf):

* sparse_attention, cpu and triton: the float64 evaluation of the reference's formulas over
  exactly the blocks the mask lists for each q-block, which is what a block-sparse kernel
  computes: dense masked attention within those blocks (a masked score is -inf whatever q and k
  hold; 0 * NaN = NaN where a listed block meets a NaN in v), and the FlashAttention-2 backward
  (P = exp(S - lse), dS = P (dP - delta)). lse is compared as finite / -inf / not a number, +inf
  counting as not a number: a row with a +inf score has lse +inf in the reference and NaN in the
  kernels (m + log(l) with m = +inf and l = NaN).
* sparse_attention, torch: the dense float64 reference with autograd.
* paged decode and prefill: frugal.reference in float64; a NaN or inf in v at a key that a
  query of the same work tile does not attend reaches that query too (0 * NaN in the tile's P V
  product), so there the check is that every attending query gets it and no query of another
  sequence or kv head does.
"""

import pytest
import torch

import frugal
from frugal import _ext, masks, reference
from frugal.block_mask import BlockMask

from conftest import cpu_isas

pytestmark = [
    pytest.mark.skipif(_ext.ext() is None, reason="frugal._C is not built"),
    # The Triton interpreter runs on numpy, which warns about the NaN it is given.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

N, D, BLOCK = 200, 32, 64
INF, NAN = float("inf"), float("nan")
# (tensor, value, (head, row, col)) put into fresh random inputs.
CASES = {
    "nan in q": ("q", NAN, (1, 70, 3)),
    "+inf in q": ("q", INF, (0, 130, 5)),
    "nan in k": ("k", NAN, (0, 70, 3)),
    "+inf in k": ("k", INF, (0, 70, 3)),
    "-inf in k": ("k", -INF, (0, 130, 7)),
    "nan in v": ("v", NAN, (0, 70, 3)),
    "+inf in v": ("v", INF, (0, 130, 5)),
    "-inf in v": ("v", -INF, (0, 199, 0)),
}
PATHS = ["scalar", "avx2", "avx512", "avx512_vnni", "triton", "torch"]


def random_mask():
    """Random blocks: full, partial (bitmask) and skipped ones, and rows with no key."""
    gen = torch.Generator().manual_seed(41)
    dense = torch.rand(N, N, generator=gen) < 0.3
    dense &= torch.rand(N // 20 + 1, N // 20 + 1, generator=gen).repeat_interleave(
        20, 0).repeat_interleave(20, 1)[:N, :N] < 0.6
    dense[:, 64:128] |= torch.arange(N)[:, None] >= 64  # a column of full blocks
    dense[[5, 100, 150]] = False
    return BlockMask.from_dense(dense, block_size=BLOCK)


MASKS = {
    "causal": lambda: masks.causal(N, block_size=BLOCK),
    "random": random_mask,
}


def inputs(case):
    gen = torch.Generator().manual_seed(42)
    q = torch.randn(1, 2, N, D, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1, N, D, generator=gen, dtype=torch.float64)
    dout = torch.randn(1, 2, N, D, generator=gen, dtype=torch.float64)
    name, value, (h, i, d) = CASES[case]
    {"q": q, "k": k, "v": v}[name][0, h, i, d] = value
    return q, k, v, dout


def blockwise64(q, k, v, dout, mask, scale):
    """out, lse, dq, dk, dv in float64: the reference's formulas over each q-block's listed
    blocks (see the module docstring)."""
    dense = mask.to_dense()[0, 0]
    full, partial = mask._block_matrices()
    listed = (full | partial)[0, 0]
    out, dq = torch.zeros_like(q), torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    lse = torch.empty(q.shape[:3], dtype=torch.float64)
    for h in range(q.shape[1]):
        for qb in range(listed.shape[0]):
            rows = slice(qb * BLOCK, min(N, (qb + 1) * BLOCK))
            cols = torch.cat([torch.arange(kb * BLOCK, min(N, (kb + 1) * BLOCK))
                              for kb in listed[qb].nonzero()[:, 0].tolist()] or
                             [torch.zeros(0, dtype=torch.long)])
            qi, kj, vj, do = q[0, h, rows], k[0, 0, cols], v[0, 0, cols], dout[0, h, rows]
            s = (qi @ kj.t() * scale).masked_fill(~dense[rows][:, cols], -INF)
            m = s.amax(-1) if len(cols) else torch.full((len(qi),), -INF, dtype=torch.float64)
            m_use = torch.where(m == -INF, 0.0, m)
            p = torch.exp(s - m_use[:, None])
            l = p.sum(-1)
            empty = l == 0
            o = (p @ vj) / torch.where(empty, 1.0, l)[:, None]
            row_lse = torch.where(empty, -INF, m_use + torch.log(l))
            out[0, h, rows], lse[0, h, rows] = o, row_lse
            delta = (do * o).sum(-1)
            pb = torch.exp(s - torch.where(row_lse == -INF, INF, row_lse)[:, None])
            ds = pb * (do @ vj.t() - delta[:, None])
            dq[0, h, rows] = ds @ kj * scale
            dk[0, 0, cols] += ds.t() @ qi * scale
            dv[0, 0, cols] += pb.t() @ do
    return out, lse, dq, dk, dv


def dense64(q, k, v, dout, mask, scale):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = reference.sparse_attention(q, k, v, mask, scale)
    out.backward(dout)
    return out.detach(), lse, q.grad, k.grad, v.grad


def assert_same_nonfinite(name, got, want):
    got, want = got.double(), want.double()
    for what, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        bad = f(got) != f(want)
        assert not bad.any(), (f"{name}: {what} pattern differs at {bad.nonzero()[:5].tolist()}"
                               f" ({int(bad.sum())} elements)")
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-3, atol=1e-3)


def assert_same_lse(got, want):
    cls = lambda x: torch.where(torch.isfinite(x), 0, torch.where(x == -INF, 1, 2))  # noqa: E731
    bad = cls(got) != cls(want)
    assert not bad.any(), f"lse: finite / -inf / NaN-or-+inf differs at {bad.nonzero()[:5].tolist()}"


@pytest.fixture(params=PATHS)
def path(request):
    """A backend, or the cpu backend with its C++ kernels capped at one ISA level."""
    if request.param in ("triton", "torch"):
        yield request.param
        return
    if request.param not in cpu_isas():
        pytest.skip(f"this CPU lacks {request.param}")
    previous = _ext.ext().cpu_isa()
    _ext.ext().set_cpu_isa(request.param)
    yield "cpu"
    _ext.ext().set_cpu_isa(previous)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("case", list(CASES))
def test_sparse_attention_nonfinite(poison, path, mask_name, case):
    mask = MASKS[mask_name]()
    q64, k64, v64, dout64 = inputs(case)
    scale = D**-0.5
    q, k, v = (t.float().requires_grad_() for t in (q64, k64, v64))
    out, lse = frugal.sparse_attention(q, k, v, mask, return_lse=True, backend=path)
    out.backward(dout64.float())
    want = (dense64 if path == "torch" else blockwise64)(q64, k64, v64, dout64, mask, scale)
    if path == "torch" and CASES[case][0] != "v":
        # NaN and inf in q or k reach the same outputs in the dense reference as in the kernels.
        kernels = blockwise64(q64, k64, v64, dout64, mask, scale)
        assert_same_nonfinite("out vs the kernels", out.detach(), kernels[0])
        assert_same_lse(lse, kernels[1])
    assert_same_nonfinite("out", out.detach(), want[0])
    assert_same_lse(lse, want[1])
    for name, got, w in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), want[2:]):
        assert_same_nonfinite(name, got, w)
    # The case is not vacuous: the value reached the output.
    assert not torch.isfinite(out).all()


# ------------------------------------------------------------------ paged decode / prefill

BS, HQ, HKV, PD = 16, 4, 2, 32
LENS = [37, 64, 5]


def paged_inputs(case, chunk):
    """A paged cache of 3 sequences (blocks in shuffled order) and queries: one per sequence
    (decode) or its last `chunk` positions (prefill). The case's value goes into sequence 0's
    query or key / value at position 20 (20 - 37 + chunk: inside the chunk for prefill)."""
    gen = torch.Generator().manual_seed(43)
    blocks = [-(-n // BS) for n in LENS]
    ids = torch.randperm(sum(blocks) + 2, generator=gen).tolist()
    tables = torch.full((len(LENS), max(blocks)), -1, dtype=torch.int32)
    for b, nb in enumerate(blocks):
        tables[b, :nb] = torch.tensor([ids.pop() for _ in range(nb)])
    shape = (sum(blocks) + 2, BS, HKV, PD)
    k_cache = torch.randn(shape, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(shape, generator=gen, dtype=torch.float64)
    rows = sum(min(chunk, n) for n in LENS)
    q = torch.randn(rows, HQ, PD, generator=gen, dtype=torch.float64)
    name, value, (h, _, d) = CASES[case]
    if name == "q":
        q[min(chunk, LENS[0]) - 1 if chunk > 1 else 0, h, d] = value
    else:
        pos = 20
        cache = k_cache if name == "k" else v_cache
        cache[int(tables[0, pos // BS]), pos % BS, h % HKV, d] = value
    return q, k_cache, v_cache, tables, torch.tensor(LENS, dtype=torch.int32)


@pytest.mark.parametrize("chunk", [1, 24], ids=["decode", "prefill"])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_nonfinite(poison, cpu_isa, case, chunk):
    q, k_cache, v_cache, tables, lens = paged_inputs(case, chunk)
    n = torch.tensor([min(chunk, x) for x in LENS])
    scale = PD**-0.5
    ops = torch.ops.frugal
    if chunk == 1:
        got = ops.paged_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens,
                                  scale, 0, None, None)
        want = reference.paged_attention(q, k_cache, v_cache, tables, lens, scale)
    else:
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), n.cumsum(0).to(torch.int32)])
        got = ops.paged_prefill_attention(q.float(), k_cache.float(), v_cache.float(), tables,
                                          lens, cu, scale, 0, None, None)
        want = reference.paged_prefill_attention(q, k_cache, v_cache, tables, lens, n, scale)
    assert not torch.isfinite(got).all()
    name = CASES[case][0]
    if name != "v" or chunk == 1:
        assert_same_nonfinite("out", got, want)
        return
    # v inside a prefill chunk: the queries at and after position 20 of sequence 0 attend to it
    # and get its NaN / inf; earlier queries of the same tile may get NaN (0 * NaN), no other
    # sequence or kv head gets anything.
    h, d = CASES[case][2][0] % HKV, CASES[case][2][2]
    first = LENS[0] - n[0].item()
    heads = slice(h * (HQ // HKV), (h + 1) * (HQ // HKV))
    attending = got[20 - first:n[0], heads, d]
    assert_same_nonfinite("out (attending queries)", attending, want[20 - first:n[0], heads, d])
    elsewhere = torch.ones_like(got, dtype=torch.bool)
    elsewhere[:n[0], heads, d] = False
    assert torch.isfinite(got[elsewhere]).all()
    torch.testing.assert_close(got[elsewhere].double(), want[elsewhere], rtol=1e-4, atol=1e-5)
