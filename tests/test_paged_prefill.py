"""Chunked-prefill attention (``frugal.paged_prefill_attention``) on every backend that runs here:
the C++ CPU kernel (``cpu``, on each ISA path), the Triton kernel (``triton``: under the
interpreter without a GPU, so sizes stay small) and the PyTorch reference (``torch``).

Each sequence's chunk of n_b queries sits at positions [seq_len - n_b, seq_len) after a cached
prefix. Outputs are compared with a float64 dense computation (causal, windowed) on the values
the cache stores (fp16-rounded, or int8 dequantized), and int8 caches also with the
unquantized values within the stated tolerance. Tables are randomly permuted; every cache slot
no query may read (past seq_len, before the window, the blocks of a sequence with no queries,
table padding that points at poisoned blocks) holds NaN (int8: a NaN scale), entries wholly
before the window are -1, and fresh allocations are poisoned (``poison``), so any read the op
should not make, or an output it forgets to write, fails. bf16 runs on the C++ kernel only (the
interpreter's bf16 arithmetic is wrong; ``frugal check`` compiles the Triton bf16 variants).
"""

import frugal
import pytest
import torch
from conftest import backends_for
from frugal import _ext, reference
from frugal.errors import BackendError, ShapeError
from frugal.paged_kv_cache import PagedKVCache
from frugal.paged_ops import BlockTableError, paged_prefill_attention
from paged_cases import INT8_ATOL, TOL, dense_attention

NAN = float("nan")
BACKENDS = backends_for("cpu")
HAS_C = _ext.ext() is not None
needs_c = pytest.mark.skipif(not HAS_C, reason="frugal._C is not built")
# A prompt (prefix 0), chunks after prefixes that start mid-block (bs 8) and on a block boundary,
# T = 1, odd T, and a sequence with no queries, in one batch.
PREFIXES = [0, 5, 16, 37, 3, 11]
CHUNKS = [7, 1, 16, 9, 0, 3]


class Case:
    """A batch of sequences in a paged cache, their chunks' queries packed [N, Hq, D]."""

    def __init__(self, prefixes, chunks, hkv, group, d, bs, dtype, seed, window=None,
                 q_dtype=None, spare=3):
        gen = torch.Generator().manual_seed(seed)
        self.window, self.chunks, self.hkv, self.d = window, list(chunks), hkv, d
        self.lens = [p + c for p, c in zip(prefixes, chunks)]
        self.lo = [0 if window is None else max(0, n - c - window + 1)
                   for n, c in zip(self.lens, chunks)]
        self.ks = [torch.randn(n, hkv, d, generator=gen) for n in self.lens]
        self.vs = [torch.randn(n, hkv, d, generator=gen) for n in self.lens]
        counts = [-(-n // bs) for n in self.lens]
        first = [lo // bs for lo in self.lo]
        used = sum(c - f for c, f in zip(counts, first))
        perm = torch.randperm(used + spare, generator=gen).tolist()
        shape = (used + spare, bs, hkv, d)
        self.int8 = dtype == torch.int8
        if self.int8:
            self.k_cache = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
            self.v_cache = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
            self.k_scale, self.v_scale = torch.full(shape[:3], NAN), torch.full(shape[:3], NAN)
        else:
            self.k_cache = torch.full(shape, NAN, dtype=dtype)
            self.v_cache = torch.full(shape, NAN, dtype=dtype)
            self.k_scale = self.v_scale = None
        # Padding entries name poisoned spare blocks; entries wholly before the window are -1.
        spare_blocks = torch.tensor(perm[used:], dtype=torch.int32)
        width = max(counts, default=0) + 1
        self.tables = spare_blocks[torch.randint(spare, (len(self.lens), width), generator=gen)]
        slots, rows = [], []
        for b, (n, c, f) in enumerate(zip(self.lens, counts, first)):
            self.tables[b, :f] = -1
            blocks = [perm.pop() for _ in range(c - f)]
            self.tables[b, f:c] = torch.tensor(blocks, dtype=torch.int32)
            if self.chunks[b] == 0:
                continue  # no queries: nothing of it may be read, all of it stays NaN
            for p in range(self.lo[b], n):
                slots.append(int(self.tables[b, p // bs]) * bs + p % bs)
                rows.append((b, p))
        k = torch.stack([self.ks[b][p] for b, p in rows]) if rows else torch.empty(0, hkv, d)
        v = torch.stack([self.vs[b][p] for b, p in rows]) if rows else torch.empty(0, hkv, d)
        cast = (lambda x: x) if self.int8 else (lambda x: x.to(dtype))
        reference.paged_append(cast(k), cast(v), self.k_cache, self.v_cache,
                               torch.tensor(slots, dtype=torch.long), self.k_scale, self.v_scale)
        self.seq_lens = torch.tensor(self.lens, dtype=torch.int32)
        self.q_lens = torch.tensor(self.chunks, dtype=torch.int32)
        q_dtype = q_dtype or (torch.float32 if self.int8 else dtype)
        self.q = torch.randn(sum(chunks), hkv * group, d, generator=gen).to(q_dtype)
        self.stored_dtype = dtype

    def stored(self, xs):
        """The values the cache holds for xs, in float64."""
        if self.int8:
            return [reference.dequantize(*reference.quantize_per_token(x)).double() for x in xs]
        return [x.to(self.stored_dtype).double() for x in xs]

    def run(self, backend, q=None, q_lens="packed", **kw):
        q = self.q if q is None else q
        q_lens = self.q_lens if q_lens == "packed" else q_lens
        return paged_prefill_attention(q, self.k_cache, self.v_cache, self.tables, self.seq_lens,
                                       q_lens, kw.pop("scale", None), self.window, self.k_scale,
                                       self.v_scale, backend=backend, **kw)

    def dense(self, q=None, exact=True):
        """float64 causal (windowed) attention of each chunk over the stored values (or, with
        exact=False, the unquantized ones), packed like q."""
        q = self.q if q is None else q
        ks, vs = (self.stored(self.ks), self.stored(self.vs)) if exact else (self.ks, self.vs)
        out, start = [], 0
        for k, v, n in zip(ks, vs, self.chunks):
            if n:
                out.append(dense_attention(q[start:start + n].double(), k, v, window=self.window))
            start += n
        return torch.cat(out) if out else torch.empty(q.shape, dtype=torch.float64)

    def check(self, backend, tol=None, **kw):
        out = self.run(backend, **kw)
        assert out.shape == self.q.shape and out.dtype == self.q.dtype
        assert torch.isfinite(out).all(), "non-finite output: a poisoned slot was read"
        tol = tol or TOL[self.q.dtype]
        torch.testing.assert_close(out.double(), self.dense(), **tol)
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_matches_dense(poison, backend, dtype, group, d):
    seed = group * 1000 + d + (dtype == torch.float16)
    Case(PREFIXES, CHUNKS, 2, group, d, 8, dtype, seed).check(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bs", [1, 16, 64])
def test_block_sizes(poison, backend, bs):
    # Tiles spanning many blocks (bs 1) or a part of one (64); chunks crossing block ends.
    Case([0, bs - 1, 2 * bs + 3], [bs + 2, 5, 1], 1, 4, 64, bs, torch.float32, bs).check(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 5, 20])
def test_window(poison, backend, window):
    # Each query reads (p - window, p]: rows of one tile start at different positions, and a
    # row may see nothing in the tile's first positions. Blocks before the first query's window
    # are -1 and NaN, as are the slots before it in its first block.
    case = Case([40, 3, 70, 0], [9, 6, 1, 12], 2, 4, 64, 4, torch.float32, window, window=window)
    assert (case.tables[2, :(71 - window) // 4] == -1).all()
    case.check(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 4])
def test_int8(poison, backend, group):
    # fp32-accurate over the dequantized cache; within INT8_ATOL of the unquantized values.
    for q_dtype in (torch.float32, torch.float16):
        case = Case(PREFIXES, CHUNKS, 2, group, 128, 16, torch.int8, group, q_dtype=q_dtype)
        out = case.check(backend)
        err = (out.double() - case.dense(exact=False)).abs().max()
        assert err <= INT8_ATOL, f"int8 KV error {err:.3g} > {INT8_ATOL}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_and_non_contiguous_q(poison, backend):
    # q [B, T, Hq, D] (every sequence a chunk of T after its own prefix), as views without unit
    # stride in D or with heads and tokens swapped; the same as the packed contiguous q.
    case = Case([0, 21, 8], [5, 5, 5], 2, 4, 64, 8, torch.float32, 11)
    want = case.check(backend).reshape(3, 5, 8, 64)
    views = [torch.randn(3, 5, 8, 64, 2)[..., 0],
             torch.randn(3, 8, 5, 64).transpose(1, 2)]
    for q in views:
        q.copy_(case.q.reshape(3, 5, 8, 64))
        assert not q.is_contiguous()
        out = case.run(backend, q=q, q_lens=None)
        assert out.shape == q.shape
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    packed = torch.randn(15, 8, 128)[:, :, ::2]  # packed, D stride 2
    packed.copy_(case.q)
    torch.testing.assert_close(case.run(backend, q=packed), want.reshape(15, 8, 64), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_last_row_is_decode(poison, backend):
    # An explicit scale (large: the online softmax must rescale, never overflow); and the last
    # query of each chunk equals decode attention at that position.
    case = Case([30, 2], [4, 9], 2, 4, 64, 8, torch.float32, 5)
    out = case.run(backend, scale=0.5)
    ref = reference.paged_prefill_attention(case.q, case.k_cache, case.v_cache, case.tables,
                                            case.seq_lens, case.q_lens, 0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out = case.check(backend)
    last = frugal.paged_attention(case.q[case.q_lens.cumsum(0) - 1], case.k_cache, case.v_cache,
                                  case.tables, case.seq_lens, backend="torch")
    torch.testing.assert_close(out[case.q_lens.cumsum(0) - 1], last, rtol=1e-5, atol=1e-6)


def test_backends_agree_through_the_manager(poison):
    # Chunked prefill of two prompts through PagedKVCache (int8 and fp32), each backend against
    # the reference.
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.int8):
        cache = PagedKVCache(1, 16, 8, 2, 64, dtype=dtype)
        for sid in ("a", "b"):
            cache.add_sequence(sid)
        for counts in ([13, 6], [1, 9]):  # a first chunk each, then a second
            k = torch.randn(sum(counts), 2, 64, generator=gen)
            cache.append(0, ["a", "b"], k, torch.randn_like(k), num_tokens=counts)
            q = torch.randn(sum(counts), 8, 64, generator=gen)
            want = cache.prefill_attention(q, 0, ["a", "b"], q_lens=counts, backend="torch")
            for backend in BACKENDS:
                got = cache.prefill_attention(q, 0, ["a", "b"], q_lens=counts, backend=backend)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=backend)


# ---------------------------------------------------------------------------------------------
# The C++ kernel: ISA paths, dtypes the interpreter cannot check, work split


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8],
                         ids=str)
def test_cpu_isa_paths(cpu_isa, poison, dtype):
    tol = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}.get(dtype)
    for i, (group, d, window) in enumerate([(8, 128, None), (1, 64, 6), (4, 72, None),
                                            (3, 40, 3)]):  # D without 16 (or 8) lanes
        Case(PREFIXES, CHUNKS, 2, group, d, 8, dtype, i, window=window).check("cpu", tol)


@needs_c
def test_cpu_thread_counts_agree(poison):
    # The q tile shrinks (16 tokens to 8 with one thread, to 2 with two) when there are few
    # items per thread; every split gives each row the same arithmetic.
    case = Case([300, 0], [20, 3], 1, 4, 128, 16, torch.float32, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = case.check("cpu")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(case.check("cpu"), one, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dispatch, custom ops, errors


def test_explain_and_backend_errors():
    case = Case([3], [2], 1, 2, 64, 4, torch.float32, 0)
    args = (case.q, case.k_cache, case.v_cache, case.tables, case.seq_lens, case.q_lens)
    choice = frugal.explain(paged_prefill_attention, *args)
    assert choice.backend == ("cpu" if HAS_C else "torch")
    for backend in BACKENDS:
        assert frugal.explain(paged_prefill_attention, *args, backend=backend).backend == backend
    with pytest.raises(BackendError, match=r"backend must be one of"):
        paged_prefill_attention(*args, backend="tpu")
    if "triton" in BACKENDS:
        odd = Case([3], [2], 1, 2, 36, 4, torch.float32, 0)  # head_dim 36: no Triton kernel
        with pytest.raises(BackendError, match=r"head_dim a multiple of 8.*got 36"):
            odd.run("triton")
        wide = Case([3], [2], 1, 2, 256, 4, torch.float32, 0)  # fp32 q: head_dim <= 128
        with pytest.raises(BackendError, match=r"head_dim <= 128 for float32 q.*got 256"):
            wide.run("triton")
        choice = frugal.explain(paged_prefill_attention, wide.q, wide.k_cache, wide.v_cache,
                                wide.tables, wide.seq_lens, wide.q_lens)
        assert choice.backend != "triton"
        half = Case([3], [2], 1, 2, 256, 4, torch.float16, 0)
        half.check("triton")


@needs_c
def test_opcheck():
    case = Case([5, 0, 9], [3, 2, 4], 2, 2, 32, 4, torch.float32, 1)
    case.k_cache, case.v_cache = case.k_cache.nan_to_num(0), case.v_cache.nan_to_num(0)
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    for window in (0, 3):
        torch.library.opcheck(torch.ops.frugal.paged_prefill_attention.default,
                              (case.q, case.k_cache, case.v_cache, case.tables, case.seq_lens,
                               cu, 0.3, window, None, None))
        if "triton" in BACKENDS:
            torch.library.opcheck(torch.ops.frugal.paged_prefill_attention_triton.default,
                                  (case.q, case.k_cache, case.v_cache, case.tables,
                                   case.seq_lens, cu, 4, 0.3, window, None, None))


@needs_c
def test_cpu_op_errors():
    # The C++ op checks what it reads by itself (it can be called directly): a clear error,
    # never an out-of-bounds read.
    case = Case([5, 9], [3, 4], 2, 2, 32, 4, torch.float32, 2)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    args = dict(q=case.q, k=case.k_cache, v=case.v_cache, t=case.tables, lens=case.seq_lens,
                cu=cu, scale=0.2, window=0, ks=None, vs=None)

    def call(**change):
        a = {**args, **change}
        return torch.ops.frugal.paged_prefill_attention(*a.values())

    missing = case.tables.clone()
    missing[1, 2] = -1  # positions 8..11 of a sequence of 13
    far = case.tables.clone()
    far[0, 0] = case.k_cache.shape[0]
    for change, match in [
        (dict(cu=cu.long()), r"cu_seqlens_q must be int32; got Long"),
        (dict(cu=cu[None]), r"cu_seqlens_q must be 1-d \[batch \+ 1\]"),
        (dict(cu=torch.tensor([1, 3, 7], dtype=torch.int32)), r"cu_seqlens_q\[0\] must be 0"),
        (dict(cu=torch.tensor([0, 3, 6], dtype=torch.int32)),
         r"cu_seqlens_q\[2\] must be q's 7 rows; got 6"),
        (dict(cu=torch.tensor([0, 9, 7], dtype=torch.int32)),
         r"sequence 0's queries\) must be in \[0, seq_lens\[0\]\] = \[0, 8\]; got 9"),
        (dict(cu=torch.tensor([0, 3, 3, 7], dtype=torch.int32)),
         r"block_tables must be \[3, max_blocks\]"),
        (dict(q=case.q[None]), r"q must be 3-d \[num_tokens, num_heads, head_dim\]"),
        (dict(q=case.q[:, :3]), r"q's head count 3 must be a multiple of k_cache's num_kv_heads"),
        (dict(t=missing), r"block_tables\[1, 2\] must be in \[0, \d+\).*positions 8\.\.11.*got -1"),
        (dict(t=far), r"block_tables\[0, 0\] must be in \[0, \d+\)"),
        (dict(lens=torch.tensor([8, 99], dtype=torch.int32)), r"seq_lens\[1\] must be in \[0, "),
        (dict(ks=torch.ones(case.k_cache.shape[:3])), r"k_scale is only for int8 caches"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            call(**change)
    # A window reads no entry before it: the -1 there is fine.
    early = case.tables.clone()
    early[1, 0] = -1
    assert torch.isfinite(call(t=early, window=2)).all()


def test_api_errors():
    case = Case([5, 9], [3, 4], 2, 2, 32, 4, torch.float32, 2)
    for backend in BACKENDS:
        with pytest.raises(ShapeError, match=r"q_lens must sum to q's 7 rows; got 6"):
            case.run(backend, q_lens=torch.tensor([3, 3], dtype=torch.int32))
        with pytest.raises(BlockTableError, match=r"q_lens\[1\] must be in \[0, seq_lens\[1\]\]"):
            case.run(backend, q=torch.randn(18, 4, 32),
                     q_lens=torch.tensor([3, 15], dtype=torch.int32))
        with pytest.raises(ValueError, match=r"window must be None or an int >= 1; got 0"):
            paged_prefill_attention(case.q, case.k_cache, case.v_cache, case.tables,
                                    case.seq_lens, case.q_lens, window=0, backend=backend)
