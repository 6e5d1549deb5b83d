"""The CUDA C++ block-sparse attention forward (csrc/cuda/sparse_attention.cu), run on the CPU
through the host emulation of CUDA device code (frugal._cuda_emu: the same kernel source,
launcher and torch glue as the GPU build, as torch.ops.frugal_emu.sparse_attention_fwd on CPU
tensors), and the emulator's ldmatrix, which the kernel's fragments come from. On a machine
with a GPU the public API also runs with backend="cuda" (forward CUDA C++, backward Triton).

Every case compares with float64 attention over the mask's exact bool form, with
FlashAttention's accuracy rule: max |out - ref| <= 2x the error of a plain PyTorch
implementation in the same precision, plus a floor of a few units in the last place. Outputs
are poisoned (NaN), lengths are not multiples of the block, Nq != Nk, GQA groups of 1, 2 and
4, every element rule (band, band + prefix, document ids, bitmask and their combinations, no
rule), empty rows (out 0, lse -inf), block sizes 64 and 128, every instantiated head dim and
multiples of 8 between them, fp16 and bf16.
"""

import math
import zlib

import pytest
import torch
from conftest import HAS_CUDA

import frugal
from frugal import masks, reference
from frugal.block_mask import BlockMask, SparseLayout

emu = pytest.importorskip("frugal._cuda_emu", reason="frugal._cuda_emu is not built")

ops = torch.ops.frugal_emu
DTYPES = [torch.float16, torch.bfloat16]
# A few units in the last place of the output, times max(1, |ref|): far below either error.
FLOOR = {torch.float16: 2.0**-13, torch.bfloat16: 2.0**-10}
BAND, PREFIX, DOC, BITS = 1, 2, 4, 8


@pytest.fixture(autouse=True)
def forward_schedule():
    before = emu.configure()
    emu.configure(schedule="forward", seed=0)
    yield
    emu.configure(schedule=before["schedule"], seed=before["seed"])


def selftest(name, x=None, arg=0):
    x = torch.zeros(0) if x is None else x.float()
    return ops.emu_selftest(name, x, arg)


# ------------------------------------------------------------------------ ldmatrix, emulated

def ldmatrix_model(m, trans):
    """Per lane, per matrix: the two 16-bit elements ldmatrix gives (PTX ISA, ldmatrix, .m8n8
    .b16): (row lane // 4, columns 2 (lane % 4), +1), of the transposed matrix with .trans.
    m: [num, 8, 8]. Returns [32, num, 2]."""
    out = torch.empty(32, m.shape[0], 2)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(m.shape[0]):
            mi = m[i].t() if trans else m[i]
            out[lane, i] = mi[g, 2 * t:2 * t + 2]
    return out


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("num", [1, 2, 4])
def test_emu_ldmatrix_layouts(num, trans):
    x = torch.arange(num * 64, dtype=torch.float32)  # element ids, exact in f16
    got = selftest("ldmatrix_trans" if trans else "ldmatrix", x, num).view(32, num, 2)
    assert torch.equal(got, ldmatrix_model(x.view(num, 8, 8), trans))


@pytest.mark.parametrize("wrong", [False, True])
def test_emu_ldmatrix_feeds_mma(wrong):
    """A fragment by ldmatrix.x4, B fragments by ldmatrix.x2.trans from a row-major K x N B:
    the mma gives A @ B; B loaded without .trans (B^T's fragments) gives a wrong answer."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(-4, 5, (16, 16), generator=gen).float()
    b = torch.randint(-4, 5, (16, 8), generator=gen).float()
    got = selftest("ldmatrix_mma_wrong" if wrong else "ldmatrix_mma", torch.cat([a.flatten(),
                                                                              b.flatten()]))
    want = (a.double() @ b.double()).flatten()
    assert torch.equal(got.double(), want) != wrong


def test_emu_ldmatrix_errors():
    x = torch.zeros(128)
    with pytest.raises(RuntimeError, match="outside the block's dynamic shared memory"):
        selftest("ldmatrix_error", x, 0)
    with pytest.raises(RuntimeError, match=r"lane 3's row address is not 16-byte aligned"):
        selftest("ldmatrix_error", x, 1)
    with pytest.raises(RuntimeError, match="ldmatrix lanes disagree on the shape: lane 0 loads "
                                           "x4, lane 5 x2"):
        selftest("ldmatrix_error", x, 2)


# ------------------------------------------------------------------------ the kernel, emulated

def expected_mask(layout, B, hq):
    """The bool mask [B, Hq, Nq, Nk] a layout stands for, read from its tensors by the rules of
    docs/block_mask_format.md (independently of BlockMask.to_dense): every in-bounds element of
    a full block, the elements of a partial block that pass the element rule."""
    nq, nk, bq, bk, f = layout.Nq, layout.Nk, layout.BQ, layout.BK, layout.flags
    allowed = torch.zeros(B, hq, nq, nk, dtype=torch.bool)
    for b in range(B):
        for h in range(hq):
            for qb in range(-(-nq // bq)):
                rows = torch.arange(qb * bq, min(nq, qb * bq + bq))
                for j in range(int(layout.full_num[b, h, qb])):
                    kb = int(layout.full_idx[b, h, qb, j])
                    allowed[b, h, rows, kb * bk:(kb + 1) * bk] = True
                for j in range(int(layout.kv_num[b, h, qb])):
                    kb = int(layout.kv_idx[b, h, qb, j])
                    cols = torch.arange(kb * bk, min(nk, kb * bk + bk))
                    q, k = rows[:, None], cols[None, :]
                    ok = torch.ones(len(rows), len(cols), dtype=torch.bool)
                    if f & BAND:
                        ok &= ((k - q >= layout.lo) & (k - q <= layout.hi)) | (
                            (k < layout.prefix) if f & PREFIX else False)
                    if f & DOC:
                        ok &= layout.q_doc[b, rows][:, None] == layout.kv_doc[b, cols][None, :]
                    if f & BITS:
                        words = layout.bits[int(layout.kv_bits[b, h, qb, j])].long()
                        w = words[(q - qb * bq), (k - kb * bk) // 32]
                        ok &= ((w >> ((k - kb * bk) % 32)) & 1).bool()
                    allowed[b, h, q, k] = ok
    return allowed


def make_qkv(B, hq, hkv, nq, nk, d, dtype, seed, bnhd=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(h, n):
        if bnhd:  # a transposed view of [B, N, H, D] storage
            return torch.randn(B, n, h, d, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(B, h, n, d, generator=gen).to(dtype)

    return rand(hq, nq), rand(hkv, nk), rand(hkv, nk)


def check_forward(layout, q, k, v, allowed, scale=None):
    """Runs the emulated kernel on (q, k, v, layout) and checks it against float64 attention
    over `allowed` with FlashAttention's rule; returns (out, lse)."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = ops.sparse_attention_fwd(q, k, v, *layout.op_args(), scale)
    ref, ref_lse = reference.sparse_attention(q.double(), k.double(), v.double(), allowed, scale)
    plain, _ = reference.sparse_attention(q, k, v, allowed, scale)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert torch.isfinite(out).all(), "NaN / inf: an unwritten (poisoned) or bad output element"
    err = (out.double() - ref).abs().max().item()
    base = (plain.double() - ref).abs().max().item()
    floor = FLOOR[dtype] * max(1.0, ref.abs().max().item())
    assert err <= 2 * base + floor, f"max error {err:.3g} > 2 x {base:.3g} + {floor:.2g}"
    empty = ~allowed.expand(ref.shape[:3] + allowed.shape[-1:]).any(-1)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert torch.equal(torch.isneginf(lse), empty) and not torch.isnan(lse).any()
    if (~empty).any():
        lse_err = (lse.double() - ref_lse)[~empty].abs().max().item()
        assert lse_err <= 1e-5 * max(1.0, ref_lse[~empty].abs().max().item()), lse_err
    assert (out[empty] == 0).all()
    return out, lse


def run_mask(mask, B, hq, hkv, d, dtype, seed, flags=None, bnhd=False, scale=None):
    nq, nk = mask.seq_lens
    q, k, v = make_qkv(B, hq, hkv, nq, nk, d, dtype, seed, bnhd)
    layout = mask.layout(B, hq, "cpu")
    if flags is not None:
        assert layout.flags == flags, f"the case means flags {flags}, got {layout.flags}"
    allowed = mask.to_dense("cpu").expand(B, hq, nq, nk)
    assert torch.equal(allowed, expected_mask(layout, B, hq))  # the format read two ways
    return check_forward(layout, q, k, v, allowed, scale)


def random_docs(n, B, gen, num_docs=3):
    """doc ids int32 [B, n]: sorted runs of random lengths."""
    cuts = torch.sort(torch.randint(0, n, (B, num_docs - 1), generator=gen), -1).values
    return (torch.arange(n)[None, None, :] >= cuts[:, :, None]).sum(1).to(torch.int32)


def random_blocks(B, H, nq, nk, bq, bk, gen, density=0.35):
    """A bool mask with every kind of block (random: partial, all true: full, all false:
    skipped) and an empty row."""
    m = torch.rand(B, H, nq, nk, generator=gen) < density
    kind = torch.randint(0, 3, (B, H, -(-nq // bq), -(-nk // bk)), generator=gen)
    kind = kind.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :nq, :nk]
    m = torch.where(kind == 1, True, torch.where(kind == 2, False, m))
    m[:, :, 3] = False
    return m


def block_aligned(nq, nk, gen):
    """A mask of whole 64 x 64 blocks (full or skipped: no element rule, flags 0), ragged at
    both ends, the last kv-block full for the first q-block."""
    blocks = torch.rand(-(-nq // 64), -(-nk // 64), generator=gen) < 0.6
    blocks[0, -1] = True
    dense = blocks.repeat_interleave(64, 0).repeat_interleave(64, 1)[:nq, :nk]
    return BlockMask.from_dense(dense, block_size=64)


# (id, mask builder(gen), B, Hq, Hkv, D, flags)
CASES = [
    ("causal-br-nq<nk-gqa2", lambda g: masks.causal(100, 177, block_size=64), 1, 2, 1, 32, BAND),
    ("causal-br-nq>nk-empty-rows", lambda g: masks.causal(177, 100, block_size=64),
     1, 1, 1, 64, BAND),
    ("causal-topleft-blocks-64x128",
     lambda g: masks.causal(150, 130, block_size=(64, 128), align="top_left"), 1, 2, 2, 32,
     BAND),
    ("window-gqa4-block128", lambda g: masks.sliding_window(200, 40, block_size=128),
     1, 4, 1, 32, BAND),
    ("window-noncausal-blocks-128x64",
     lambda g: masks.sliding_window(140, (20, 70), causal=False, block_size=(128, 64)),
     2, 1, 1, 64, BAND),
    ("prefix-lm-gqa2", lambda g: masks.prefix_lm(150, 70, block_size=(64, 128)),
     1, 2, 1, 64, BAND | PREFIX),
    ("document-empty-rows",
     lambda g: masks.document(random_docs(130, 2, g), random_docs(110, 2, g) + 1,
                              block_size=64), 2, 1, 1, 32, DOC),
    ("causal-and-document",
     lambda g: masks.causal(160, block_size=128)
     & masks.document(random_docs(160, 1, g), block_size=128), 1, 2, 1, 32, BAND | DOC),
    ("prefix-and-document",
     lambda g: masks.prefix_lm(130, 30, block_size=64)
     & masks.document(random_docs(130, 2, g), block_size=64), 2, 2, 2, 32,
     BAND | PREFIX | DOC),
    ("bitmask-per-head-gqa2",
     lambda g: BlockMask.from_dense(random_blocks(1, 2, 150, 170, 64, 64, g), block_size=64),
     1, 2, 1, 32, BITS),
    ("bitmask-blocks-128x64",
     lambda g: BlockMask.from_dense(random_blocks(2, 2, 150, 170, 128, 64, g),
                                    block_size=(128, 64)), 2, 2, 2, 64, BITS),
    ("full-blocks-only-ragged", lambda g: block_aligned(150, 190, g), 1, 2, 1, 32, 0),
    ("all-rows-empty",
     lambda g: BlockMask.from_dense(torch.zeros(70, 90, dtype=torch.bool), block_size=64),
     1, 2, 1, 32, 0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rules(poison, case, dtype):
    name, build, B, hq, hkv, d, flags = case
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    run_mask(build(gen), B, hq, hkv, d, dtype, seed=len(name), flags=flags)


def with_rules(layout, flags, lo=0, hi=0, prefix=0, docs=None):
    """A bitmask layout given the band (with prefix) and document rule as well: the kernel then
    tests all of them together on the partial blocks (BlockMask folds such masks into pure
    bitmasks, so only a layout made here reaches that code)."""
    fields = dict(flags=flags, lo=lo, hi=hi, prefix=prefix)
    if flags & DOC:
        fields.update(q_doc=docs[0], kv_doc=docs[1])
    return layout.replace(**fields)


@pytest.mark.parametrize("flags", [BAND | BITS, BAND | PREFIX | BITS, DOC | BITS,
                                   BAND | PREFIX | DOC | BITS])
def test_rule_and_bitmask_combinations(poison, flags):
    gen = torch.Generator().manual_seed(flags)
    B, hq, nq, nk = 2, 2, 150, 170
    dense = random_blocks(B, hq, nq, nk, 64, 128, gen, density=0.6)
    base = BlockMask.from_dense(dense, block_size=(64, 128)).layout(B, hq, "cpu")
    docs = (random_docs(nq, B, gen), random_docs(nk, B, gen))
    layout = with_rules(base, flags, lo=-100, hi=nk - nq, prefix=45, docs=docs)
    allowed = expected_mask(layout, B, hq)
    q, k, v = make_qkv(B, hq, 1, nq, nk, 32, torch.float16, seed=flags)
    check_forward(layout, q, k, v, allowed)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [32, 64, 96, 128, 256, 8, 24, 80, 120, 136, 200])
def test_head_dims(poison, d, dtype):
    """Every instantiated head dim and others (multiples of 8 run on the next instantiation up,
    the padding columns zero in shared memory and never stored: the output's row stride is D),
    both mask block sizes: D <= 128 runs 32 rows a warp, D > 128 16 rows and 2 CTAs per 128-row
    q-block (their tiles of the same lists)."""
    run_mask(masks.sliding_window(150, 50, 165, block_size=(128, 64)), 1, 2, 1, d, dtype,
             seed=d)
    run_mask(masks.causal(100, block_size=64), 1, 1, 1, d, dtype, seed=d + 1)


@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_schedules(poison, schedule):
    """Other orders of the threads between barriers (a missing barrier would show)."""
    emu.configure(schedule=schedule, seed=5)
    run_mask(masks.causal(140, block_size=64) & masks.document(
        random_docs(140, 1, torch.Generator().manual_seed(1)), block_size=64), 1, 2, 1, 64,
        torch.bfloat16, seed=2)


def test_strided_and_misaligned_inputs(poison):
    """q/k/v as transposed views of [B, N, H, D] (read in place), and k starting 2 elements
    into its storage (not 16-byte aligned: copied)."""
    mask = masks.causal(120, 130, block_size=64)
    run_mask(mask, 2, 2, 1, 32, torch.float16, seed=9, bnhd=True, scale=0.3)
    q, k, v = make_qkv(1, 2, 1, 120, 130, 32, torch.float16, seed=4)
    k_off = torch.empty(k.numel() + 2, dtype=k.dtype)[2:].view(k.shape).copy_(k)
    allowed = mask.to_dense("cpu").expand(1, 2, 120, 130)
    out, lse = check_forward(mask.layout(1, 2, "cpu"), q, k_off, v, allowed)
    want_out, want_lse = ops.sparse_attention_fwd(q, k, v, *mask.layout(1, 2, "cpu")
                                                  .op_args(), 32 ** -0.5)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


def test_nan_in_a_visited_key_gives_nan_and_elsewhere_nothing():
    """A NaN in a key some row attends to reaches that row (the kernel really reads it) and no
    row whose mask excludes it."""
    mask = masks.causal(128, block_size=64)
    q, k, v = make_qkv(1, 1, 1, 128, 128, 32, torch.float16, seed=0)
    k[0, 0, 100, 5] = float("nan")
    out, _ = ops.sparse_attention_fwd(q, k, v, *mask.layout(1, 1, "cpu").op_args(), 0.2)
    rows_nan = torch.isnan(out[0, 0]).any(-1)
    assert rows_nan[100:].all() and not rows_nan[:100].any()


def test_errors_name_argument_expectation_and_value():
    mask = masks.causal(64, block_size=64)
    layout = mask.layout(1, 1, "cpu")
    q = torch.zeros(1, 1, 64, 32, dtype=torch.float16)
    args = (*layout.op_args(), 0.1)
    with pytest.raises(RuntimeError, match="takes float16 or bfloat16 q, k, v; got Float"):
        ops.sparse_attention_fwd(q.float(), q.float(), q.float(), *args)
    with pytest.raises(RuntimeError, match=r"head_dim must be a multiple of 8 in \[8, 256\]; "
                                           "got 84"):
        z = torch.zeros(1, 1, 64, 84, dtype=torch.float16)
        ops.sparse_attention_fwd(z, z, z, *args)
    with pytest.raises(RuntimeError, match=r"q's head count 3 must be a multiple of k's 2"):
        ops.sparse_attention_fwd(torch.zeros(1, 3, 64, 32, dtype=torch.float16),
                                 torch.zeros(1, 2, 64, 32, dtype=torch.float16),
                                 torch.zeros(1, 2, 64, 32, dtype=torch.float16), *args)
    with pytest.raises(RuntimeError, match=r"kv_num must have shape \[1, 2, 1\]; got \[1, 1, 1\]"):
        ops.sparse_attention_fwd(torch.zeros(1, 2, 64, 32, dtype=torch.float16), q, q, *args)
    with pytest.raises(RuntimeError, match="mask blocks of 64 or 128; got BQ=32, BK=64"):
        ops.sparse_attention_fwd(q, q, q, *layout.replace(BQ=32).op_args(), 0.1)
    with pytest.raises(RuntimeError, match="kv_num must be int32; got Long"):
        ops.sparse_attention_fwd(q, q, q, *layout.replace(kv_num=layout.kv_num.long()).op_args(),
                                 0.1)
    tensors, ints = layout.op_args()
    with pytest.raises(RuntimeError, match=r"layout must hold 13 tensors \( kv_num kv_idx .* "
                                           r"bits \); got 12"):
        ops.sparse_attention_fwd(q, q, q, tensors[:-1], ints, 0.1)
    with pytest.raises(RuntimeError, match=r"layout_ints must hold 6 ints \( BQ BK flags lo hi "
                                           r"prefix \); got 7"):
        ops.sparse_attention_fwd(q, q, q, tensors, ints + [0], 0.1)


def test_empty_shapes(poison):
    """No keys: zeros and lse -inf (empty lists); no queries: empty results, nothing launched."""
    q = torch.zeros(1, 2, 64, 32, dtype=torch.float16)
    kv = torch.zeros(1, 1, 0, 32, dtype=torch.float16)
    empty_lists = BlockMask.from_dense(torch.zeros(64, 64, dtype=torch.bool), block_size=64)
    out, lse = ops.sparse_attention_fwd(q, kv, kv, *empty_lists.layout(1, 2, "cpu")
                                        .op_args(), 1.0)
    assert (out == 0).all() and torch.isneginf(lse).all()
    none = torch.zeros(1, 2, 0, dtype=torch.int32)
    idx = torch.zeros(1, 2, 0, 1, dtype=torch.int32)
    dummy = torch.zeros(1, dtype=torch.int32)
    lists = dict(kv_num=none, kv_idx=idx, full_num=none, full_idx=idx)
    tensors = [lists.get(n, dummy) for n in SparseLayout.TENSORS]
    ints = [dict(BQ=64, BK=64, flags=1).get(n, 0) for n in SparseLayout.INTS]
    out, lse = ops.sparse_attention_fwd(q[:, :, :0], q, q, tensors, ints, 1.0)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)


# ------------------------------------------------------------------------ registry, GPU

def test_cuda_backend_is_declared():
    """backend='cuda' exists, auto ranks it first on CUDA tensors (its device code runs here,
    emulated), it takes fp16 / bf16 only and needs CUDA tensors."""
    op = frugal.registry.op("sparse_attention")
    assert "cuda" in op.backends
    assert op.order["cuda"][:2] == ("cuda", "triton")
    impl = op.impls["cuda"]
    q = torch.zeros(1, 1, 64, 32)
    assert "float16 or bfloat16" in impl.why_not(q, q, q, None, 0.1)
    assert impl.why_not(q.half(), q.half(), q.half(), None, 0.1) is None
    mask = masks.causal(64, block_size=64)
    with pytest.raises(frugal.BackendError, match="backend='cuda' needs CUDA tensors"):
        frugal.sparse_attention(q.half(), q.half(), q.half(), mask, backend="cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: the emulated kernel runs above")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_real_kernel_forward_and_backward(poison, dtype):
    """backend='cuda' on the GPU: the CUDA forward against float64 and the emulated kernel,
    return_lse, a candidate of the registry; gradients through the Triton backward."""
    mask = masks.sliding_window(300, 100, block_size=64) & masks.document(
        random_docs(300, 1, torch.Generator().manual_seed(0)), block_size=64)
    q, k, v = make_qkv(1, 4, 2, 300, 300, 64, dtype, seed=1)
    op = frugal.registry.op("sparse_attention")
    qc, kc, vc = (t.cuda().requires_grad_() for t in (q, k, v))
    names = [i.backend for i in op.candidates(qc.device, qc, kc, vc, mask, 0.125)]
    assert names[0] == "cuda", names
    out, lse = frugal.sparse_attention(qc, kc, vc, mask, return_lse=True, backend="cuda")
    emu_out, emu_lse = ops.sparse_attention_fwd(q, k, v, *mask.layout(1, 4, "cpu")
                                                .op_args(), 0.125)
    allowed = mask.to_dense("cpu").expand(1, 4, 300, 300)
    ref, _ = reference.sparse_attention(q.double(), k.double(), v.double(), allowed, 0.125)
    plain, _ = reference.sparse_attention(q, k, v, allowed, 0.125)
    err = (out.detach().cpu().double() - ref).abs().max().item()
    assert err <= 2 * (plain.double() - ref).abs().max().item() + FLOOR[dtype] * 4
    assert torch.allclose(lse.cpu(), emu_lse, atol=1e-4, rtol=1e-5)
    assert (out.detach().cpu() - emu_out).abs().max().item() <= 4 * FLOOR[dtype] * 4
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (qc, kc, vc))
    assert math.isfinite(float(lse[torch.isfinite(lse)].sum()))


def test_cuda_backend_refuses_gpus_before_sm80(monkeypatch):
    """mma.sync m16n8k16 and cp.async need sm_80: an older GPU is refused with the reason (auto
    then runs Triton), asked of the tensor's device."""
    asked = []

    def capability(device):
        asked.append(device)
        return (7, 5)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    q = torch.zeros(1, 1, 64, 32, dtype=torch.float16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    why = frugal.registry.op("sparse_attention").impls["cuda"].why_not(q, q, q, None, 0.1)
    assert why == ("the CUDA kernel needs compute capability 8.0 or newer (mma.sync m16n8k16, "
                   "cp.async); got 7.5")
    assert asked and asked[0] == q.device
