"""The score modifiers of frugal.score_mods (softcap, ALiBi) in frugal.sparse_attention, on
every backend: torch (the reference path), cpu (C++), triton (the interpreter without a GPU;
fp32 and fp16, bf16 being wrong in the interpreter) forward and backward, and the CUDA C++
forward through the host emulation (frugal._cuda_emu; fp16 and bf16).

Each case compares with float64 dense attention over the mask's exact bool form with the
modifiers applied by ``reference.apply_score_mods``, and its gradients with autograd's, by
FlashAttention's accuracy rule: max error <= 2x the error of the same dense attention in the
input dtype, plus a floor of a few units in the last place. Inputs are fresh random draws,
outputs poisoned (NaN), lengths not multiples of the block, Nq != Nk both ways (query i at
position i + Nk - Nq), GQA, a head dim that is not a multiple of 16, empty rows, softcap alone,
ALiBi alone with [Hq] and [B, Hq] slopes, both together. Then the argument checks.
"""

import zlib

import pytest
import torch

import frugal
from frugal import _ext, masks, reference
from frugal.errors import DeviceError, DTypeError, ShapeError
from frugal.score_mods import alibi_slopes_like_bloom
from sparse_cases import assert_rule, random_docs

HAS_CPU_OPS = _ext.ext() is not None and hasattr(torch.ops.frugal, "sparse_attention_fwd")
FLOOR = {torch.float32: 2.0**-20, torch.float16: 2.0**-13, torch.bfloat16: 2.0**-10}


# (id, mask builder(gen), B, Hq, Hkv, D, softcap, slopes: None, "H" ([Hq]) or "BH" ([B, Hq]))
CASES = [
    ("softcap-causal-nq<nk-gqa2", lambda g: masks.causal(100, 177, block_size=64),
     1, 2, 1, 32, 2.0, None),
    ("alibi-H-window-gqa2-d40", lambda g: masks.sliding_window(150, 50, block_size=64),
     1, 4, 2, 40, None, "H"),
    ("alibi-BH-document-empty-rows",
     lambda g: masks.document(random_docs(130, 2, g), random_docs(110, 2, g) + 1, block_size=64),
     2, 2, 1, 32, None, "BH"),
    ("both-causal-nq>nk-empty-rows", lambda g: masks.causal(150, 90, block_size=64),
     2, 2, 2, 32, 3.0, "BH"),
]
SCALE = 0.5  # scores of std ~2.8 at D = 32: a softcap of 2 or 3 bends most of them


def make_case(case, dtype):
    """(mask, q, k, v, dout, softcap, slopes) of a case, fresh random draws from its seed."""
    name, build, B, hq, hkv, d, softcap, kind = case
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    mask = build(gen)
    nq, nk = mask.seq_lens
    q = torch.randn(B, hq, nq, d, generator=gen).to(dtype)
    k = torch.randn(B, hkv, nk, d, generator=gen).to(dtype)
    v = torch.randn(B, hkv, nk, d, generator=gen).to(dtype)
    dout = torch.randn(B, hq, nq, d, generator=gen).to(dtype)
    slopes = {None: None, "H": alibi_slopes_like_bloom(hq),
              "BH": torch.rand(B, hq, generator=gen) * 0.5 + 0.05}[kind]
    return mask, q, k, v, dout, softcap, slopes


def dense(q, k, v, allowed, softcap, slopes):
    """Masked attention with the modifiers, in q's dtype (autograd-friendly; an empty row gives
    0) -> (out, lse in float64)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    nq, nk = q.shape[2], k.shape[2]
    s = reference.apply_score_mods((q @ k.transpose(-1, -2)) * SCALE, softcap, slopes,
                                   torch.arange(nk - nq, nk), torch.arange(nk))
    nonempty = allowed.any(-1, keepdim=True)
    s = torch.where(allowed, s, float("-inf"))
    p = torch.softmax(torch.where(nonempty, s, 0.0), -1) * nonempty
    return p @ v, torch.logsumexp(s.double(), -1)


def dense_grads(q, k, v, dout, allowed, softcap, slopes, dtype):
    """(out, lse, dq, dk, dv) of ``dense`` computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = dense(*leaves, allowed, softcap, slopes)
    out.backward(dout.to(dtype))
    return (out.detach(), lse, *(t.grad for t in leaves))


def check_lse(lse, ref_lse, allowed):
    empty = ~allowed.any(-1)
    assert lse.dtype == torch.float32 and torch.equal(torch.isneginf(lse), empty)
    live = ~empty
    if live.any():
        err = (lse.double() - ref_lse)[live].abs().max().item()
        assert err <= 1e-5 * max(1.0, ref_lse[live].abs().max().item()), f"lse error {err:.3g}"


def runs():
    """(case, backend, dtype): every case in fp32 on every backend; fp16 on the kernels for
    the case with both modifiers only, to keep the test time small."""
    cpu = ("cpu",) if HAS_CPU_OPS else ()
    out = [(c, b, torch.float32) for c in CASES for b in ("torch", "triton", *cpu)]
    return out + [(CASES[-1], b, torch.float16) for b in ("triton", *cpu)]


@pytest.mark.parametrize("case,backend,dtype", runs(),
                         ids=[f"{c[0]}-{b}-{str(d)[6:]}" for c, b, d in runs()])
def test_forward_backward(poison, case, backend, dtype):
    mask, q, k, v, dout, softcap, slopes = make_case(case, dtype)
    B, hq, nq = q.shape[:3]
    allowed = mask.to_dense("cpu").expand(B, hq, nq, k.shape[2])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = frugal.sparse_attention(*leaves, mask, SCALE, return_lse=True, softcap=softcap,
                                       alibi_slopes=slopes, backend=backend)
    out.backward(dout)
    ref = dense_grads(q, k, v, dout, allowed, softcap, slopes, torch.float64)
    plain = dense_grads(q, k, v, dout, allowed, softcap, slopes, dtype)
    got = (out.detach(), *(t.grad for t in leaves))
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref[:1] + ref[2:],
                             plain[:1] + plain[2:]):
        if backend == "torch":
            # The reference path (exp(s - lse), autograd) is not FlashAttention's softmax: its
            # fp32 error reaches 3.6x the plain one here (ALiBi's large |s|), 3e-6 of |ref|.
            # reference.sparse_attention itself is held to float64 below.
            err = (g.double() - r).abs().max().item()
            assert err <= 1e-5 * max(1.0, r.abs().max().item()), f"torch {name}: {err:.3g}"
        else:
            assert_rule(f"{backend} {name}", g, r, p, dtype, FLOOR[dtype])
    check_lse(lse, ref[1], allowed)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_float64(case):
    """reference.sparse_attention with the modifiers (the torch backend, in float64) against
    the dense formula above, forward and autograd backward."""
    mask, q, k, v, dout, softcap, slopes = make_case(case, torch.float64)
    B, hq, nq = q.shape[:3]
    allowed = mask.to_dense("cpu").expand(B, hq, nq, k.shape[2])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference.sparse_attention(*leaves, mask, SCALE, softcap, slopes)
    out.backward(dout)
    want = dense_grads(q, k, v, dout, allowed, softcap, slopes, torch.float64)
    for g, w in zip((out.detach(), *(t.grad for t in leaves)), want[:1] + want[2:]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    live = torch.isfinite(want[1])
    assert torch.equal(torch.isfinite(lse), live)
    torch.testing.assert_close(lse[live], want[1][live], rtol=1e-12, atol=1e-12)


def test_modifiers_change_the_result():
    """The cases exercise the modifiers: each changes the output well beyond the tolerance."""
    mask, q, k, v, _, softcap, slopes = make_case(CASES[-1], torch.float32)
    plain = frugal.sparse_attention(q, k, v, mask, SCALE, backend="torch")
    for kw in ({"softcap": softcap}, {"alibi_slopes": slopes}):
        moved = frugal.sparse_attention(q, k, v, mask, SCALE, backend="torch", **kw)
        assert (moved - plain).abs().max() > 0.05, kw


def test_cuda_forward_emulated(poison):
    """The CUDA C++ kernel's kMods instantiation, run by the host emulation, and its plain one
    where no modifier is given (the same bits as before the modifiers existed)."""
    emu = pytest.importorskip("frugal._cuda_emu", reason="frugal._cuda_emu is not built")
    ops = torch.ops.frugal_emu
    before = emu.configure()
    emu.configure(schedule="forward", seed=0)
    try:
        # D = 128: the kMods instantiation's own shape (one m16 tile a warp).
        d128 = ("both-d128-block128", lambda g: masks.causal(200, 150, block_size=128),
                1, 2, 1, 128, 3.0, "H")
        for case, dtype in ((CASES[0], torch.float16), (CASES[1], torch.bfloat16),
                            (CASES[3], torch.float16), (d128, torch.bfloat16)):
            mask, q, k, v, _, softcap, slopes = make_case(case, dtype)
            B, hq, nq = q.shape[:3]
            full = None if slopes is None else slopes.expand(B, hq).contiguous()
            out, lse = ops.sparse_attention_fwd(q, k, v, *mask.layout(B, hq, "cpu").op_args(),
                                                SCALE, softcap or 0.0, full)
            allowed = mask.to_dense("cpu").expand(B, hq, nq, k.shape[2])
            ref = dense(q.double(), k.double(), v.double(), allowed, softcap, slopes)
            plain = dense(q, k, v, allowed, softcap, slopes)
            assert_rule(f"{case[0]} emulated CUDA out", out, ref[0], plain[0], dtype,
                        FLOOR[dtype])
            check_lse(lse, ref[1], allowed)
    finally:
        emu.configure(schedule=before["schedule"], seed=before["seed"])


# ----------------------------------------------------------------------------- bad arguments

def _inputs(device="cpu"):
    q = torch.randn(2, 4, 64, 32, device=device)
    return q, torch.randn(2, 2, 64, 32, device=device), masks.causal(64, block_size=64)


@pytest.mark.parametrize("softcap,error,match", [
    (0.0, ValueError, r"softcap must be a finite float in \(0, 2\*\*64\].*got 0.0"),
    (-1.0, ValueError, r"softcap must .*got -1.0"),
    (float("inf"), ValueError, r"softcap must .*got inf"),
    (float("nan"), ValueError, r"softcap must .*got nan"),
    (True, TypeError, r"softcap must be a float > 0 or None; got bool"),
    (torch.tensor(2.0), TypeError, r"softcap must be a float > 0 or None; got Tensor"),
])
def test_bad_softcap(softcap, error, match):
    q, kv, mask = _inputs()
    with pytest.raises(error, match="sparse_attention: " + match):
        frugal.sparse_attention(q, kv, kv, mask, softcap=softcap)


@pytest.mark.parametrize("slopes,error,match", [
    (torch.ones(3), ShapeError, r"alibi_slopes must be \[num_heads\] = \[4\] or \[batch, "
     r"num_heads\] = \[2, 4\].*got \[3\]"),
    (torch.ones(4, 2), ShapeError, r"alibi_slopes must be .*got \[4, 2\]"),
    (torch.ones(1, 4), ShapeError, r"alibi_slopes must be .*got \[1, 4\]"),
    (torch.ones(4, dtype=torch.float64), DTypeError, r"alibi_slopes must be float32; got "
     r"torch.float64"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0]), ValueError, r"alibi_slopes must be finite"),
    ([0.5] * 4, TypeError, r"alibi_slopes"),
    (torch.ones(4, device="meta"), DeviceError, r"alibi_slopes must be on cpu with q; got meta"),
])
def test_bad_alibi_slopes(slopes, error, match):
    q, kv, mask = _inputs()
    with pytest.raises(error, match="sparse_attention: " + match):
        frugal.sparse_attention(q, kv, kv, mask, alibi_slopes=slopes)


@pytest.mark.skipif(not HAS_CPU_OPS, reason="frugal._C has no sparse attention kernels")
def test_op_checks_its_modifiers():
    """The C++ op checks what frugal.sparse_attention hands it (a direct caller gets errors
    naming the argument, never a wrong answer)."""
    q, kv, mask = _inputs()
    args = mask.layout(2, 4, "cpu").op_args()
    op = torch.ops.frugal.sparse_attention_fwd
    with pytest.raises(RuntimeError, match=r"softcap must be a finite float >= 0 .*got -1"):
        op(q, kv, kv, *args, 0.1, -1.0, None)
    for bad, match in ((torch.ones(4), r"alibi_slopes must be \[2, 4\] \(\[batch, num_heads\]\)"),
                       (torch.ones(4, 2).t(), r"alibi_slopes must be contiguous"),
                       (torch.ones(2, 4, dtype=torch.float16), r"alibi_slopes must be float32")):
        with pytest.raises(RuntimeError, match=match):
            op(q, kv, kv, *args, 0.1, 0.0, bad)
    out, lse = op(q, kv, kv, *args, 0.1)  # the modifiers default to none
    want, want_lse = op(q, kv, kv, *args, 0.1, 0.0, None)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.skipif(not HAS_CPU_OPS, reason="frugal._C has no sparse attention kernels")
def test_opcheck_with_modifiers():
    """Schema, fake (meta) kernels and autograd registration hold with the modifiers given."""
    q, kv, mask = _inputs()
    args = mask.layout(2, 4, "cpu").op_args()
    slopes = alibi_slopes_like_bloom(4).expand(2, 4).contiguous()
    out, lse = torch.ops.frugal.sparse_attention_fwd(q, kv, kv, *args, 0.1, 5.0, slopes)
    torch.library.opcheck(torch.ops.frugal.sparse_attention_fwd.default,
                          (q, kv, kv, *args, 0.1, 5.0, slopes))
    torch.library.opcheck(torch.ops.frugal.sparse_attention_bwd.default,
                          (torch.randn_like(q), q, kv, kv, out, lse, *args, 0.1, 5.0, slopes))


@pytest.mark.skipif(not HAS_CPU_OPS, reason="frugal._C has no sparse attention kernels")
@pytest.mark.parametrize("with_alibi", [False, True])
def test_torch_compile_with_modifiers(with_alibi):
    """torch.compile(fullgraph=True) through the op with a softcap and with [B, Hq] slopes too:
    the same value and gradients as eager. The slopes' finiteness check
    (score_mods.check_alibi_slopes) runs inside the compiled graph, without a graph break."""
    mask, q, k, v, _, softcap, slopes = make_case(CASES[-1], torch.float32)
    slopes = slopes if with_alibi else None

    def loss(q, k, v):
        out = frugal.sparse_attention(q, k, v, mask, SCALE, softcap=softcap,
                                      alibi_slopes=slopes, backend="cpu")
        return (out ** 2).sum()

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        value = fn(*leaves)
        value.backward()
        grads.append((value.detach(), *(t.grad for t in leaves)))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CPU_OPS, reason="frugal._C has no sparse attention kernels")
def test_torch_compile_checks_slopes_as_it_runs():
    """Under torch.compile(fullgraph=True) the finiteness of the slopes is checked inside the
    graph: finite slopes give eager's answer, a NaN slope raises (and a later good call still
    works)."""
    mask, q, k, v, _, softcap, slopes = make_case(CASES[-1], torch.float32)

    def attend(q, k, v, slopes):
        return frugal.sparse_attention(q, k, v, mask, SCALE, alibi_slopes=slopes, backend="cpu")

    compiled = torch.compile(attend, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, slopes), attend(q, k, v, slopes),
                               rtol=1e-5, atol=1e-5)
    bad = slopes.clone()
    bad.view(-1)[1] = float("nan")
    with pytest.raises(RuntimeError, match=r"alibi_slopes must be finite"):
        compiled(q, k, v, bad)
    torch.testing.assert_close(compiled(q, k, v, slopes), attend(q, k, v, slopes),
                               rtol=1e-5, atol=1e-5)
