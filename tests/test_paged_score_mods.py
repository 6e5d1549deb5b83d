"""Score modifiers of the paged attention ops (issue 17.2): ``softcap`` (Gemma-2's logit cap) and
``alibi_slopes`` (ALiBi, [Hq] or [B, Hq]) on ``paged_attention`` and
``paged_prefill_attention``, with and without return_lse, on every backend that runs here: the
C++ CPU kernels, the Triton kernels (interpreter: fp32 / fp16), the PyTorch reference and the
CUDA kernels through the host emulation. Semantics (frugal.score_mods): s = scale q.k, then
c tanh(s / c), then - slope |q_pos - k_pos| with decode's query at seq_len - 1 and prefill's rows
at [seq_len - n, seq_len); lse of the modified scores. Compared with float64 on fresh random
inputs over caches whose unused slots are NaN, fresh allocations poisoned; odd lengths, GQA,
int8 caches, windows, split-KV; then argument errors, the manager, its plan and the cascade."""

import pytest
import torch
from conftest import backends_for
from paged_cases import (
    INT8_TOL,
    ODD_LENS,
    ODD_Q_LENS,
    TOL,
    check_out_lse,
    expected_decode,
    expected_prefill,
    gather,
    out_tol,
    paged_case,
)

from frugal.errors import DTypeError, ShapeError
from frugal.paged_kv_cache import PagedKVCache
from frugal.paged_ops import paged_attention, paged_prefill_attention
from frugal.score_mods import alibi_slopes_like_bloom

BACKENDS = backends_for("cpu")
D = 40
SCALE = 0.5  # scores of std ~3: the cap of 2 bends most of them
# (softcap, slopes): slopes "H" are BLOOM's [Hq], "BH" random [B, Hq] (one row per sequence).
MODS = {"softcap": (2.0, None), "alibi-H": (None, "H"), "both-BH": (2.0, "BH")}


def slopes_for(kind, batch, hq, seed):
    if kind is None:
        return None, None
    if kind == "H":
        s = alibi_slopes_like_bloom(hq)
        return s, s.expand(batch, hq)
    s = torch.rand(batch, hq, generator=torch.Generator().manual_seed(seed)) * 0.3
    return s, s


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8], ids=str)
@pytest.mark.parametrize("mods", MODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_and_prefill(poison, backend, mods, cache_dtype):
    softcap, kind = MODS[mods]
    q, caches, tables, seq_lens, ks, vs = paged_case(D, cache_dtype, seed=len(mods))
    slopes, rows = slopes_for(kind, len(ODD_LENS), q.shape[1], seed=3)
    kw = dict(softcap=softcap, alibi_slopes=slopes)
    want = expected_decode(q, ks, vs, SCALE, return_lse=True, softcap=softcap, slopes=rows)
    got = paged_attention(q, *caches[:2], tables, seq_lens, SCALE, None, *caches[2:],
                          backend=backend, return_lse=True, **kw)
    check_out_lse(got, *want, out_tol(q, cache_dtype))
    out = paged_attention(q, *caches[:2], tables, seq_lens, SCALE, None, *caches[2:],
                          backend=backend, **kw)
    torch.testing.assert_close(out, got[0], rtol=0, atol=0)
    # Without modifiers the result differs: the test can tell them apart.
    plain = paged_attention(q, *caches[:2], tables, seq_lens, SCALE, None, *caches[2:],
                            backend=backend)
    assert (plain - out).abs().max() > 1e-2

    qp = torch.randn(sum(ODD_Q_LENS), q.shape[1], D,
                     generator=torch.Generator().manual_seed(7)).to(q.dtype)
    q_lens = torch.tensor(ODD_Q_LENS, dtype=torch.int32)
    want = expected_prefill(qp, ks, vs, ODD_Q_LENS, SCALE, softcap=softcap, slopes=rows)
    got = paged_prefill_attention(qp, *caches[:2], tables, seq_lens, q_lens, SCALE, None,
                                  *caches[2:], backend=backend, return_lse=True, **kw)
    check_out_lse(got, *want, out_tol(q, cache_dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_and_fp16(poison, backend):
    """A window with both modifiers, fp16 caches and [B, Hq] slopes, decode and 4-d prefill."""
    lens = [30, 9, 17]
    q, caches, tables, seq_lens, ks, vs = paged_case(D, torch.float16, seed=11, lens=lens,
                                                     hkv=1, group=4, bs=4)
    slopes, rows = slopes_for("BH", 3, 4, seed=5)
    kw = dict(softcap=3.0, alibi_slopes=slopes)
    want = expected_decode(q, ks, vs, window=6, return_lse=True, softcap=3.0, slopes=rows)
    got = paged_attention(q, *caches[:2], tables, seq_lens, None, 6, backend=backend,
                          return_lse=True, **kw)
    check_out_lse(got, *want, TOL[torch.float16])
    q4 = torch.randn(3, 5, 4, D, generator=torch.Generator().manual_seed(2)).half()
    want = expected_prefill(q4.reshape(15, 4, D), ks, vs, [5, 5, 5], window=6, softcap=3.0,
                            slopes=rows)
    got = paged_prefill_attention(q4, *caches[:2], tables, seq_lens, None, None, 6,
                                  backend=backend, return_lse=True, **kw)
    check_out_lse((got[0].reshape(15, 4, D), got[1].reshape(15, 4)), *want, TOL[torch.float16])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8], ids=str)
def test_cpu_isa_paths(cpu_isa, poison, cache_dtype):
    """The modifier variant of each CPU kernel path (scalar, AVX2, AVX-512): decode, whose
    600-token sequence splits into 512-token partitions merged by lse, and prefill."""
    lens = [1, 600, 19, 0, 8]
    q, caches, tables, seq_lens, ks, vs = paged_case(D, cache_dtype, seed=13, lens=lens)
    slopes, rows = slopes_for("BH", len(lens), q.shape[1], seed=6)
    kw = dict(softcap=2.0, alibi_slopes=slopes)
    got = paged_attention(q, *caches[:2], tables, seq_lens, SCALE, None, *caches[2:],
                          backend="cpu", return_lse=True, **kw)
    want = expected_decode(q, ks, vs, SCALE, return_lse=True, softcap=2.0, slopes=rows)
    check_out_lse(got, *want, out_tol(q, cache_dtype))
    q_lens = torch.tensor(ODD_Q_LENS, dtype=torch.int32)
    qp = torch.randn(sum(ODD_Q_LENS), q.shape[1], D, generator=torch.Generator().manual_seed(3))
    got = paged_prefill_attention(qp, *caches[:2], tables, seq_lens, q_lens, SCALE, 4,
                                  *caches[2:], backend="cpu", return_lse=True, **kw)
    want = expected_prefill(qp, ks, vs, ODD_Q_LENS, SCALE, 4, softcap=2.0, slopes=rows)
    check_out_lse(got, *want, out_tol(qp, cache_dtype))


def test_triton_split_kv(poison):
    if "triton" not in BACKENDS:
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from frugal.kernels import paged_attention as kernel

    q, caches, tables, seq_lens, ks, vs = paged_case(D, torch.float32, seed=4, lens=[70, 3, 0])
    slopes, rows = slopes_for("BH", 3, q.shape[1], seed=1)
    cfg = kernel.pick_config(q, D)
    cfg = {**cfg, "min_partition": cfg["BLOCK_N"]}
    assert kernel.split_plan(cfg, 3 * 2, tables.shape[1] * 8, 132)[0] > 1
    got = kernel.paged_attention(q, *caches[:2], tables, seq_lens, SCALE, 0, *caches[2:],
                                 config=cfg, num_sms=132, return_lse=True, softcap=2.0,
                                 alibi_slopes=slopes)
    want = expected_decode(q, ks, vs, SCALE, return_lse=True, softcap=2.0, slopes=rows)
    check_out_lse(got, *want, TOL[torch.float32])


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_cuda_emulated(poison, emu, cache_dtype, split):
    emu.configure(min_partition=16 if split else 10**6)
    q, caches, tables, seq_lens, ks, vs = paged_case(D, cache_dtype, seed=8)
    slopes, rows = slopes_for("BH", len(ODD_LENS), q.shape[1], seed=2)
    ops = torch.ops.frugal_emu
    t = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.int8: INT8_TOL}.get(
        cache_dtype, TOL[torch.float32])
    got = ops.paged_attention_lse(q, *caches[:2], tables, seq_lens, SCALE, 0, *caches[2:], 2.0,
                                  slopes)
    assert (emu.last_plan()["splits"] > 1) == split
    want = expected_decode(q, ks, vs, SCALE, return_lse=True, softcap=2.0, slopes=rows)
    check_out_lse(got, want[0], want[1], t)
    qp = torch.randn(sum(ODD_Q_LENS), q.shape[1], D,
                     generator=torch.Generator().manual_seed(9)).to(q.dtype)
    cu = torch.tensor([0] + torch.tensor(ODD_Q_LENS).cumsum(0).tolist(), dtype=torch.int32)
    got = ops.paged_prefill_attention_lse(qp, *caches[:2], tables, seq_lens, cu, SCALE, 3,
                                          *caches[2:], 2.0, slopes)
    want = expected_prefill(qp, ks, vs, ODD_Q_LENS, SCALE, window=3, softcap=2.0, slopes=rows)
    check_out_lse(got, *want, t)


def test_argument_errors():
    q, caches, tables, seq_lens, _, _ = paged_case(D, torch.float32, seed=0)
    args = (q, *caches[:2], tables, seq_lens)
    q_lens = torch.tensor(ODD_Q_LENS, dtype=torch.int32)
    qp = torch.randn(sum(ODD_Q_LENS), q.shape[1], D)
    calls = [lambda **kw: paged_attention(*args, **kw),
             lambda **kw: paged_prefill_attention(qp, *caches[:2], tables, seq_lens, q_lens,
                                                  **kw)]
    for call in calls:
        with pytest.raises(ValueError, match=r"softcap must be a finite float in \(0, 2\*\*64\]"
                                             r".*got 0.0"):
            call(softcap=0.0)
        with pytest.raises(TypeError, match=r"softcap must be a float > 0 or None; got bool"):
            call(softcap=True)
        with pytest.raises(DTypeError, match=r"alibi_slopes must be float32; got torch.float64"):
            call(alibi_slopes=torch.ones(6, dtype=torch.float64))
        with pytest.raises(ShapeError, match=r"alibi_slopes must be \[num_heads\] = \[6\] or "
                                             r"\[batch, num_heads\] = \[5, 6\].*got \[5, 3\]"):
            call(alibi_slopes=torch.ones(5, 3))
        with pytest.raises(ValueError, match=r"alibi_slopes must be finite; got \[nan\]"):
            call(alibi_slopes=torch.tensor([0.1, float("nan"), 0.1, 0.1, 0.1, 0.1]))


def test_cpp_op_errors():
    q, caches, tables, seq_lens, _, _ = paged_case(D, torch.float32, seed=0)
    args = (q, *caches[:2], tables, seq_lens, 1.0, 0, None, None)
    ops = [torch.ops.frugal.paged_attention]
    try:
        import frugal._cuda_emu  # noqa: F401

        ops.append(torch.ops.frugal_emu.paged_attention)
    except ImportError:
        pass
    for op in ops:
        with pytest.raises(RuntimeError, match=r"paged_attention: softcap must be a finite float "
                                               r">= 0 \(0: no cap\); got -1"):
            op(*args, -1.0, None)
        with pytest.raises(RuntimeError, match=r"paged_attention: alibi_slopes must be \[5, 6\] "
                                               r"\(\[batch, num_heads\]\); got shape \[6\]"):
            op(*args, 0.0, torch.ones(6))
        with pytest.raises(RuntimeError, match=r"alibi_slopes must be contiguous"):
            op(*args, 0.0, torch.ones(6, 5).t())


@pytest.mark.parametrize("backend", BACKENDS)
def test_manager_plan_and_cascade(poison, backend):
    """PagedKVCache.attention / prefill_attention and StepPlan.attention take the modifiers; a
    decode over sequences that share a prefix (cascade) gives what per-sequence decode gives."""
    gen = torch.Generator().manual_seed(12)
    cache = PagedKVCache(1, 64, 4, 2, D, dtype=torch.float32)
    cache.add_sequence("root")
    k, v = torch.randn(2, 1, 21, 2, D, generator=gen).unbind(0)
    cache.append(0, ["root"], k, v)
    for sid, n in (("a", 3), ("b", 6), ("c", 1)):
        cache.fork("root", sid)
        cache.append(0, [sid], torch.randn(1, n, 2, D, generator=gen),
                     torch.randn(1, n, 2, D, generator=gen))
    seqs = ["a", "b", "c"]
    slopes, rows = slopes_for("BH", 3, 6, seed=4)
    kw = dict(softcap=2.0, alibi_slopes=slopes)
    q = torch.randn(3, 6, D, generator=gen)
    kv = [gather(cache, s, 0) for s in seqs]
    want = expected_decode(q, [x for x, _ in kv], [y for _, y in kv], return_lse=True,
                           softcap=2.0, slopes=rows)
    for cascade in (False, True):
        got = cache.attention(q, 0, seqs, backend=backend, return_lse=True, cascade=cascade,
                              **kw)
        check_out_lse(got, *want, TOL[torch.float32])
    step = cache.plan(seqs, backend=backend, cascade=True, alibi_slopes=slopes)
    assert step.cascade is not None
    k, v = torch.randn(2, 3, 2, D, generator=gen).unbind(0)
    step.append(0, k, v)
    kv = [gather(cache, s, 0) for s in seqs]
    want = expected_decode(q, [x for x, _ in kv], [y for _, y in kv], return_lse=True,
                           softcap=2.0, slopes=rows)
    check_out_lse(step.attention(q, 0, return_lse=True, softcap=2.0), *want, TOL[torch.float32])
    step = cache.plan(["a", "b"], num_tokens=2, backend=backend, alibi_slopes=slopes[:2])
    k, v = torch.randn(2, 4, 2, D, generator=gen).unbind(0)
    step.append(0, k, v)
    qp = torch.randn(4, 6, D, generator=gen)
    kv = [gather(cache, s, 0) for s in ("a", "b")]
    want = expected_prefill(qp, [x for x, _ in kv], [y for _, y in kv], [2, 2], softcap=2.0,
                            slopes=rows[:2])
    check_out_lse(step.attention(qp, 0, return_lse=True, softcap=2.0), *want, TOL[torch.float32])
    out = cache.prefill_attention(qp, 0, ["a", "b"], q_lens=[2, 2], backend=backend,
                                  softcap=2.0, alibi_slopes=slopes[:2])
    torch.testing.assert_close(out.double(), want[0], **TOL[torch.float32])


def test_opcheck():
    """The ops with modifiers pass torch.library.opcheck (schema, fake, autograd
    registration): the C++ ops and, where they run, the Triton ones."""
    q, caches, tables, seq_lens, _, _ = paged_case(D, torch.float32, seed=1, lens=[5, 9])
    kc, vc = (c.nan_to_num(0) for c in caches[:2])
    slopes = torch.rand(2, q.shape[1])
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    qp = torch.randn(5, q.shape[1], D)
    mods = (1.5, slopes)
    torch.library.opcheck(torch.ops.frugal.paged_attention_lse.default,
                          (q, kc, vc, tables, seq_lens, 0.3, 0, None, None, *mods))
    torch.library.opcheck(torch.ops.frugal.paged_prefill_attention.default,
                          (qp, kc, vc, tables, seq_lens, cu, 0.3, 2, None, None, *mods))
    if "triton" in BACKENDS:
        torch.library.opcheck(torch.ops.frugal.paged_attention_triton.default,
                              (q, kc, vc, tables, seq_lens, 0.3, 0, None, None, -1, None, None,
                               *mods))
        torch.library.opcheck(torch.ops.frugal.paged_prefill_attention_triton.default,
                              (qp, kc, vc, tables, seq_lens, cu, 3, 0.3, 0, None, None, *mods))



def test_plan_with_slopes_under_torch_compile_fullgraph(poison):
    """A step plan with ALiBi slopes (checked at plan time) and a softcap: its per-layer append
    + attention compiles with fullgraph=True and gives the float64 answer."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(22)
    cache = PagedKVCache(1, 16, 4, 2, D, dtype=torch.float32)
    seqs = ["a", "b"]
    for sid, n in zip(seqs, (13, 6)):
        cache.add_sequence(sid)
        cache.append(0, [sid], torch.randn(1, n, 2, D, generator=gen),
                     torch.randn(1, n, 2, D, generator=gen))
    slopes, rows = slopes_for("BH", 2, 6, seed=9)
    step = cache.plan(seqs, backend="cpu", alibi_slopes=slopes)
    q = torch.randn(2, 6, D, generator=gen)
    k, v = torch.randn(2, 2, 2, D, generator=gen).unbind(0)
    compiled = torch.compile(lambda q, k, v: step.run(0, q, k, v, softcap=2.0), fullgraph=True)
    got = compiled(q, k, v)
    kv = [gather(cache, s, 0) for s in seqs]
    want = expected_decode(q, [x for x, _ in kv], [y for _, y in kv], softcap=2.0, slopes=rows)
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])
