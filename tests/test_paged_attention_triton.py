"""The Triton paged KV-cache kernels (``frugal.kernels.paged_attention``): called directly and
through the public API with backend="triton"; on CUDA tensors with a GPU, else on CPU tensors
under the Triton interpreter.

Decode attention is compared with a float64 dense computation and with ``frugal.reference`` on
caches whose blocks are randomly permuted and whose every unused slot is NaN (and fresh
allocations too, with the ``poison`` fixture), so a read past seq_len, before the window or of
an unwritten output fails. Each case runs unsplit and with split-KV forced (a partition of one
or two tiles); the default split rule is checked on its own. Append is checked bit for bit
(int8 bytes and scales included) against the reference. bf16 is compiled by ``frugal check``
and checked numerically only on a GPU (the interpreter's bf16 arithmetic is wrong).
"""

import os

import pytest
import torch
from frugal import reference
from frugal.errors import BackendError
from frugal.paged_kv_cache import PagedKVCache
from frugal.paged_ops import paged_append, paged_attention
from paged_cases import (
    INT8_ATOL,
    MIXED_LENS,
    TOL,
    build_paged,
    expected_decode,
    random_kv,
    rounded,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NAN = float("nan")


@pytest.fixture(scope="module")
def pa():
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set (conftest sets it)")
    from frugal.kernels import paged_attention

    return paged_attention


def configs_for(pa, q, tiles=1):
    """{name: config}: the picked config with no split, and one forcing a split into
    partitions of ``tiles`` tiles."""
    cfg = pa.pick_config(q, q.shape[-1])
    return {"single": {**cfg, "programs_per_sm": 0},
            "split": {**cfg, "min_partition": tiles * cfg["BLOCK_N"]}}


def assert_splits(pa, cfg, q, k_cache, tables, window=None):
    """The forced config really splits this call."""
    b, hq, _ = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    capacity = tables.shape[1] * bs
    span = capacity if window is None else min(capacity, window + cfg["BLOCK_N"] - 1)
    units = b * hkv * -(-(hq // hkv) // pa.BLOCK_G)
    assert pa.split_plan(cfg, units, span, 132)[0] > 1


def decode_all(pa, q, caches, tables, lens, scale=None, window=None, tiles=1, check_split=True):
    """The launcher's output per config (unsplit, forced split)."""
    k_cache, v_cache, k_scale, v_scale = caches
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = {}
    for name, cfg in configs_for(pa, q, tiles).items():
        if name == "split" and check_split:
            assert_splits(pa, cfg, q, k_cache, tables, window)
        outs[name] = pa.paged_attention(q, k_cache, v_cache, tables, lens, scale, window or 0,
                                        k_scale, v_scale, config=cfg, num_sms=132)
    return outs


def check_decode(outs, q, want, caches, tables, lens, window=None, tol=None):
    k_cache, v_cache, k_scale, v_scale = caches
    tol = tol or TOL[q.dtype]
    ref = reference.paged_attention(q, k_cache, v_cache, tables, lens, None, window, k_scale,
                                    v_scale)
    for name, out in outs.items():
        assert out.dtype == q.dtype and out.shape == q.shape, name
        torch.testing.assert_close(out.cpu().double(), want, **tol, msg=name)
        torch.testing.assert_close(out.cpu().double(), ref.cpu().double(), **tol, msg=name)


# ---------------------------------------------------------------------------------------------
# paged_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_matches_dense(pa, poison, dtype, group, head_dim):
    gen = torch.Generator().manual_seed(group * 1000 + head_dim)
    hkv = 2
    lens = MIXED_LENS + [0]  # 1, multiples of the block size, neither, and empty
    ks, vs = random_kv(lens, hkv, head_dim, gen)
    k_cache, v_cache, _, _, tables, seq_lens = build_paged(ks, vs, 16, dtype, DEVICE, gen,
                                                           pad="poison")
    q = torch.randn(len(lens), hkv * group, head_dim, generator=gen).to(dtype)
    caches = (k_cache, v_cache, None, None)
    outs = decode_all(pa, q.to(DEVICE), caches, tables, seq_lens)
    want = expected_decode(q, rounded(ks, dtype), rounded(vs, dtype))
    want[-1] = 0  # seq_len 0 gives zeros (the dense computation has no keys to attend to)
    check_decode(outs, q.to(DEVICE), want, caches, tables, seq_lens)
    for out in outs.values():
        assert torch.equal(out[-1].cpu(), torch.zeros_like(out[-1].cpu()))


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_decode_block_sizes(pa, poison, block_size):
    gen = torch.Generator().manual_seed(block_size)
    lens = [1, block_size, 2 * block_size, 3 * block_size + 1, 150]
    ks, vs = random_kv(lens, 1, 64, gen)
    k_cache, v_cache, _, _, tables, seq_lens = build_paged(ks, vs, block_size, torch.float32,
                                                           DEVICE, gen)
    q = torch.randn(len(lens), 4, 64, generator=gen)
    caches = (k_cache, v_cache, None, None)
    # Partitions of two tiles: several tiles per partition, several pages per tile (or not).
    outs = decode_all(pa, q.to(DEVICE), caches, tables, seq_lens, tiles=2)
    check_decode(outs, q.to(DEVICE), expected_decode(q, ks, vs), caches, tables, seq_lens)


@pytest.mark.parametrize("shape", [(2, 3, 96), (1, 20, 64)], ids=["D96", "G20"])
def test_decode_padded_head_dim_and_many_heads_per_group(pa, poison, shape):
    """D = 96 runs in a masked BLOCK_D of 128; G = 20 takes two 16-row chunks per kv head."""
    hkv, group, head_dim = shape
    gen = torch.Generator().manual_seed(head_dim + group)
    lens = [9, 64, 33]
    ks, vs = random_kv(lens, hkv, head_dim, gen)
    dtype = torch.float16
    k_cache, v_cache, _, _, tables, seq_lens = build_paged(ks, vs, 8, dtype, DEVICE, gen,
                                                           pad="poison")
    q = torch.randn(len(lens), hkv * group, head_dim, generator=gen).to(dtype)
    caches = (k_cache, v_cache, None, None)
    outs = decode_all(pa, q.to(DEVICE), caches, tables, seq_lens)
    want = expected_decode(q, rounded(ks, dtype), rounded(vs, dtype))
    check_decode(outs, q.to(DEVICE), want, caches, tables, seq_lens)


@pytest.mark.parametrize("window", [1, 5, 16, 17, 40, 1000])
def test_decode_window(pa, poison, window):
    gen = torch.Generator().manual_seed(window)
    ks, vs = random_kv(MIXED_LENS, 2, 64, gen)
    # Blocks wholly before L - window are -1 in the table and NaN: never to be read.
    k_cache, v_cache, _, _, tables, seq_lens = build_paged(ks, vs, 16, torch.float32, DEVICE,
                                                           gen, window=window)
    q = torch.randn(len(MIXED_LENS), 4, 64, generator=gen)
    caches = (k_cache, v_cache, None, None)
    outs = decode_all(pa, q.to(DEVICE), caches, tables, seq_lens, window=window,
                      check_split=window > 1)
    want = expected_decode(q, ks, vs, window=window)
    check_decode(outs, q.to(DEVICE), want, caches, tables, seq_lens, window=window)


@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_int8_kv(pa, poison, qdtype, head_dim):
    gen = torch.Generator().manual_seed(head_dim + 7)
    lens = [5, 16, 37, 0, 70]
    ks, vs = random_kv(lens, 2, head_dim, gen)
    caches = build_paged(ks, vs, 16, torch.int8, DEVICE, gen, pad="poison")
    tables, seq_lens = caches[4:]
    q = torch.randn(len(lens), 8, head_dim, generator=gen).to(qdtype)
    outs = decode_all(pa, q.to(DEVICE), caches[:4], tables, seq_lens)
    deq = [[reference.dequantize(*reference.quantize_per_token(x)) for x in xs]
           for xs in (ks, vs)]
    want = expected_decode(q, *deq)
    want[3] = 0
    check_decode(outs, q.to(DEVICE), want, caches[:4], tables, seq_lens)
    exact = expected_decode(q, ks, vs)
    exact[3] = 0
    for out in outs.values():
        assert (out.cpu().double() - exact).abs().max() <= INT8_ATOL


def test_decode_int8_nan_scale_gives_nan(pa, poison):
    """A head vector stored with scale NaN (it held inf or NaN) makes its query heads NaN, as
    in the reference; the other kv head and sequence are unaffected."""
    gen = torch.Generator().manual_seed(3)
    ks, vs = random_kv([40, 9], 2, 64, gen)
    ks[0][4, 1, 0] = float("inf")
    caches = build_paged(ks, vs, 8, torch.int8, DEVICE, gen)
    tables, seq_lens = caches[4:]
    q = torch.randn(2, 4, 64, generator=gen)
    ref = reference.paged_attention(q.to(DEVICE), *caches[:2], tables, seq_lens, None, None,
                                    *caches[2:4]).cpu()
    for out in decode_all(pa, q.to(DEVICE), caches[:4], tables, seq_lens).values():
        out = out.cpu()
        assert out[0, 2:].isnan().all() and not out[0, :2].isnan().any()
        assert not out[1].isnan().any()
        torch.testing.assert_close(out, ref, **TOL[torch.float32], equal_nan=True)


def test_decode_default_split_rule(pa, poison):
    """A long sequence in a small batch splits by the default config (partitions of 512 from
    the 132-SM rule off a GPU) and merges to the unsplit result."""
    gen = torch.Generator().manual_seed(17)
    lens = [700, 30, 0]
    ks, vs = random_kv(lens, 1, 64, gen)
    dtype = torch.float16
    k_cache, v_cache, _, _, tables, seq_lens = build_paged(ks, vs, 16, dtype, DEVICE, gen,
                                                           pad="poison")
    q = torch.randn(len(lens), 4, 64, generator=gen).to(dtype).to(DEVICE)
    cfg = pa.pick_config(q, 64)
    splits, partition = pa.split_plan(cfg, len(lens), tables.shape[1] * 16, 132)
    assert splits == 2 and partition == 512
    out = pa.paged_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, num_sms=132)
    want = expected_decode(q.cpu(), rounded(ks, dtype), rounded(vs, dtype), scale=0.125)
    want[2] = 0
    torch.testing.assert_close(out.cpu().double(), want, **TOL[dtype])
    # Enough programs for two waves: no split.
    assert pa.split_plan(cfg, 264, 10**6, 132) == (1, 10**6)


def test_split_plan_rule(pa):
    cfg = {"BLOCK_N": 64, "min_partition": 512, "programs_per_sm": 2}
    assert pa.split_plan(cfg, 300, 8192, 132) == (1, 8192)  # a full two waves already
    assert pa.split_plan(cfg, 8, 500, 132) == (1, 512)  # one partition holds it all
    for units, span in ((1, 4096), (8, 5000), (32, 100_000), (100, 1000)):
        splits, part = pa.split_plan(cfg, units, span, 132)
        assert splits > 1 and part % 64 == 0 and part >= 512
        assert (splits - 1) * part < span <= splits * part  # no empty partition
        assert units * splits <= 2 * 132 + units  # about two waves, not more
    splits, part = pa.split_plan({**cfg, "min_partition": 1}, 4, 1000, 132)
    assert part == 64 and splits == 16  # partitions are whole tiles


def test_decode_non_contiguous_q_through_the_api(pa, poison):
    gen = torch.Generator().manual_seed(11)
    ks, vs = random_kv([3, 40, 16], 2, 64, gen)
    k_cache, v_cache, _, _, tables, lens = build_paged(ks, vs, 16, torch.float32, DEVICE, gen)
    wide = torch.randn(8, 3, 128, generator=gen)
    q = wide.transpose(0, 1)[:, :, ::2]  # [3, 8, 64], neither dim contiguous
    out = paged_attention(q.to(DEVICE), k_cache, v_cache, tables, lens, backend="triton")
    torch.testing.assert_close(out.cpu().double(), expected_decode(q, ks, vs),
                               **TOL[torch.float32])
    out = paged_attention(q.to(DEVICE), k_cache, v_cache, tables, lens, scale=0.3, window=7,
                          backend="triton")
    want = expected_decode(q, ks, vs, scale=0.3, window=7)
    torch.testing.assert_close(out.cpu().double(), want, **TOL[torch.float32])


def test_api_int8_and_explain(pa, poison):
    import frugal

    gen = torch.Generator().manual_seed(5)
    ks, vs = random_kv([12, 30], 2, 32, gen)
    k_cache, v_cache, k_scale, v_scale, tables, lens = build_paged(ks, vs, 4, torch.int8,
                                                                   DEVICE, gen)
    q = torch.randn(2, 4, 32, generator=gen).to(DEVICE)
    args = (q, k_cache, v_cache, tables, lens)
    kw = dict(k_scale=k_scale, v_scale=v_scale)
    assert frugal.explain(paged_attention, *args, **kw, backend="triton").backend == "triton"
    out = paged_attention(*args, **kw, backend="triton")
    want = paged_attention(*args, **kw, backend="torch")
    torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_triton_refuses_unsupported_layouts(pa):
    k_cache = torch.zeros(4, 16, 2, 12, device=DEVICE)  # head_dim 12
    tables = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    q = torch.zeros(1, 2, 12, device=DEVICE)
    with pytest.raises(BackendError, match=r"head_dim a multiple of 8 from 8 to 256; got 12"):
        paged_attention(q, k_cache, k_cache, tables, lens, backend="triton")
    wide = torch.zeros(4, 16, 2, 64, device=DEVICE)[..., ::2]  # head_dim 32 with stride 2
    assert "unit stride in head_dim" in pa.unsupported(wide, wide)
    with pytest.raises(BackendError, match=r"unit stride in head_dim"):
        paged_append(torch.zeros(1, 2, 32, device=DEVICE), torch.zeros(1, 2, 32, device=DEVICE),
                      wide, wide, torch.zeros(1, dtype=torch.int32, device=DEVICE),
                      backend="triton")


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 numerics need a GPU (the interpreter's bf16 "
                                          "arithmetic is wrong); frugal check compiles bf16")
def test_decode_bfloat16_on_gpu(pa, poison):
    gen = torch.Generator().manual_seed(21)
    ks, vs = random_kv(MIXED_LENS, 2, 128, gen)
    dtype = torch.bfloat16
    k_cache, v_cache, _, _, tables, seq_lens = build_paged(ks, vs, 16, dtype, DEVICE, gen,
                                                           pad="poison")
    q = torch.randn(len(MIXED_LENS), 8, 128, generator=gen).to(dtype)
    caches = (k_cache, v_cache, None, None)
    outs = decode_all(pa, q.to(DEVICE), caches, tables, seq_lens)
    want = expected_decode(q, rounded(ks, dtype), rounded(vs, dtype))
    check_decode(outs, q.to(DEVICE), want, caches, tables, seq_lens)


# ---------------------------------------------------------------------------------------------
# paged_append


def poisoned_caches(dtype, shape=(6, 4, 3, 32)):
    if dtype == torch.int8:
        caches = [torch.randint(-128, 128, shape, dtype=torch.int8) for _ in range(2)]
        scales = [torch.full(shape[:3], NAN) for _ in range(2)]
    else:
        caches = [torch.full(shape, NAN, dtype=dtype) for _ in range(2)]
        scales = [None, None]
    return [t if t is None else t.to(DEVICE) for t in caches + scales]


def clones(ts):
    return [None if t is None else t.clone() for t in ts]


def assert_same_bits(got, want):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        elif w.is_floating_point():
            assert torch.equal(g.view(torch.int32 if w.element_size() == 4 else torch.int16),
                               w.view(torch.int32 if w.element_size() == 4 else torch.int16))
        else:
            assert torch.equal(g, w)


@pytest.mark.parametrize("cache_dtype,x_dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.int8, torch.float32), (torch.int8, torch.float16)], ids=str)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
def test_append_bit_identical(pa, poison, cache_dtype, x_dtype, slot_dtype):
    gen = torch.Generator().manual_seed(2)
    n, shape = 7, (6, 4, 3, 32)
    k = (torch.randn(n, 3, 32, generator=gen) * 3).to(x_dtype)
    v = (torch.randn(n, 3, 32, generator=gen) * 3).to(x_dtype)
    k[1, 0] = 0  # scale 0
    k[2, 2, 5] = float("inf")  # scale NaN, zeros
    v[4, 1, 0] = NAN
    ties = torch.arange(32) - 15.5  # with absmax 127 the scale is 1: x / scale = n + 0.5
    ties[0] = 127
    k[3, 1] = ties  # round half to even
    slots = torch.tensor([0, 23, -1, 5, 7, -3, 17], dtype=slot_dtype, device=DEVICE)
    caches = poisoned_caches(cache_dtype, shape)
    want = clones(caches)
    reference.paged_append(k.to(DEVICE), v.to(DEVICE), *want[:2], slots, *want[2:])
    pa.paged_append(k.to(DEVICE), v.to(DEVICE), *caches[:2], slots, *caches[2:])
    assert_same_bits(caches, want)  # written slots bit for bit; padding and the rest untouched


def test_append_strided_inputs_and_many_heads(pa, poison):
    gen = torch.Generator().manual_seed(4)
    shape = (5, 2, 7, 64)  # Hkv = 7: a partial head block
    big = torch.randn(3, 7, 2, 128, generator=gen).to(DEVICE)
    k = big.transpose(1, 2)[:, 0, :, ::2]  # [3, 7, 64], nothing contiguous
    v = big[:, :, 1, 64:]
    slots = torch.tensor([9, 0, 4], device=DEVICE)
    for dtype in (torch.float32, torch.int8):
        caches = poisoned_caches(dtype, shape)
        want = clones(caches)
        reference.paged_append(k, v, *want[:2], slots, *want[2:])
        paged_append(k, v, *caches[:2], slots, *caches[2:], backend="triton")
        assert_same_bits(caches, want)


def test_manager_on_triton(pa, poison):
    """The manager's writes and reads through the Triton kernels match the reference's."""
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.float16, torch.int8):
        caches = [PagedKVCache(1, 12, 4, 2, 32, dtype=dtype, device=DEVICE) for _ in range(2)]
        for cache in caches:
            cache.add_sequence("a")
            cache.add_sequence("b")
        steps = [(["a", "b"], [5, 3]), (["b"], [6]), (["a", "b"], [1, 1])]
        for seq_ids, counts in steps:
            xdtype = torch.float32 if dtype == torch.int8 else dtype
            k = torch.randn(sum(counts), 2, 32, generator=gen).to(xdtype).to(DEVICE)
            v = torch.randn(sum(counts), 2, 32, generator=gen).to(xdtype).to(DEVICE)
            for cache, backend in zip(caches, ("triton", "torch")):
                cache.append(0, seq_ids, k, v, num_tokens=counts, backend=backend)
        got, want = caches
        for name in ("k_cache", "v_cache", "k_scale", "v_scale"):
            assert_same_bits([getattr(got, name)], [getattr(want, name)])
        q = torch.randn(2, 8, 32, generator=gen).to(torch.float16).to(DEVICE)
        for window in (None, 3):
            out = got.attention(q, 0, ["a", "b"], window=window, backend="triton")
            ref = want.attention(q, 0, ["a", "b"], window=window, backend="torch")
            torch.testing.assert_close(out, ref, **TOL[torch.float16])


# ---------------------------------------------------------------------------------------------
# Custom ops


def test_custom_ops_opcheck(pa):
    gen = torch.Generator().manual_seed(6)
    ks, vs = random_kv([5, 18], 2, 32, gen)
    for dtype in (torch.float32, torch.int8):
        k_cache, v_cache, k_scale, v_scale, tables, lens = build_paged(ks, vs, 4, dtype,
                                                                       DEVICE, gen)
        k_cache, v_cache = k_cache.nan_to_num(0), v_cache.nan_to_num(0)
        if k_scale is not None:
            k_scale, v_scale = k_scale.nan_to_num(0), v_scale.nan_to_num(0)
        q = torch.randn(2, 4, 32, generator=gen).to(DEVICE)
        torch.library.opcheck(torch.ops.frugal.paged_attention_triton.default,
                              (q, k_cache, v_cache, tables, lens, 0.2, 3, k_scale, v_scale, -1,
                               None, None))
        ws = (torch.zeros(64, device=DEVICE), torch.zeros(8, device=DEVICE))  # a plan's buffers
        torch.library.opcheck(torch.ops.frugal.paged_attention_triton.default,
                              (q, k_cache, v_cache, tables, lens, 0.2, 0, k_scale, v_scale, 18,
                               *ws))
        k = torch.randn(3, 2, 32, generator=gen).to(DEVICE)
        slots = torch.tensor([7, -1, 30], dtype=torch.int32, device=DEVICE)
        torch.library.opcheck(torch.ops.frugal.paged_append_triton.default,
                              (k, k * 2, k_cache, v_cache, slots, k_scale, v_scale))


def test_cpu_backend_needs_its_kernel(monkeypatch):
    """Until frugal._C has the CPU kernels (the schemas exist first), auto on CPU tensors skips
    "cpu" with the reason and an explicit backend="cpu" raises it."""
    import frugal
    from frugal import registry

    if frugal._ext.ext() is None:
        pytest.skip("frugal._C is not built")
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda name, key: False)
    registry.refresh()  # implementations ask what they need at registration: ask again
    try:
        k_cache = torch.zeros(4, 16, 2, 32)
        tables = torch.zeros(1, 1, dtype=torch.int32)
        lens = torch.ones(1, dtype=torch.int32)
        q = torch.randn(1, 4, 32)
        choice = frugal.explain(paged_attention, q, k_cache, k_cache, tables, lens)
        assert choice.backend == "torch"
        assert "no CPU kernel for frugal::paged_attention" in choice.reason
        with pytest.raises(BackendError, match=r"no CPU kernel for frugal::paged_append"):
            paged_append(q[:, :2], q[:, :2], k_cache, k_cache,
                         torch.zeros(1, dtype=torch.int32), backend="cpu")
        cache = PagedKVCache(1, 4, 4, 2, 32, dtype=torch.float32)
        cache.add_sequence(0)
        cache.append(0, [0], q[:, :2], q[:, :2])  # auto: the reference
        assert torch.equal(cache.k_cache[0, cache.block_tables([0])[0, 0], 0], q[0, :2])
        assert registry.cpp_kernel("paged_append", "CPU")() is not None
    finally:
        monkeypatch.undo()
        registry.refresh()


_PIPELINE_SCRIPT = """
import json, re, torch, frugal
from frugal import jit_capture
from paged_cases import build_paged, random_kv

gen = torch.Generator().manual_seed(0)
ks, vs = random_kv([3000] * 8, 2, 128, gen)
caches = build_paged(ks, vs, 16, torch.float16, "cpu", gen)
kc, vc, _, _, tables, lens = caches
q = torch.randn(8, 8, 128, dtype=torch.float16)
with jit_capture.capture() as launches:
    frugal.paged_attention(q, kc, vc, tables, lens, backend="triton")
    frugal.paged_prefill_attention(q[:, None].expand(8, 64, 8, 128).contiguous(), kc, vc,
                                   tables, lens, backend="triton")
rows = []
for launch in launches:
    if launch.name == "_paged_attention_merge_kernel":
        continue
    for cap in (80, 90):
        ttgir = jit_capture.compile_launch(launch, cap).asm["ttgir"]
        tiles = re.findall(r"ttg.local_alloc.*?: \\(\\) -> !ttg.memdesc<(\\d+)x\\d+x128xf16", ttgir)
        rows.append([launch.name, cap, [int(t) for t in tiles]])
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_kv_tiles_are_multi_buffered():
    """The K/V tiles of decode and prefill go through at least two shared-memory buffers on
    sm_80 and sm_90 (the page indices are loaded a tile ahead; loaded in the same iteration,
    they left the pipeliner one buffer)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PIPELINE_SCRIPT], env=env, text=True,
                          capture_output=True, timeout=600,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert {(name, cap) for name, cap, _ in rows} == {
        (name, cap) for name in ("_paged_attention_kernel", "_paged_prefill_kernel")
        for cap in (80, 90)}
    for name, cap, buffers in rows:
        assert len(buffers) >= 2 and min(buffers) >= 2, (name, cap, buffers)
