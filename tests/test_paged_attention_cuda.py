"""The CUDA paged KV-cache kernels (csrc/cuda/paged_attention.cu), run on the CPU through the
host emulation of CUDA device code (csrc/cuda_emu, module frugal._cuda_emu): the same kernel
source, launchers, split plan and torch glue as the GPU build, registered as
torch.ops.frugal_emu.* on CPU tensors. On a machine with a GPU the same cases also run on the
real kernels (torch.ops.frugal.* on CUDA tensors).

Results are compared with float64 references on fresh random inputs. Every cache slot no query
needs (past seq_len, before the window, blocks no table names) holds NaN (int8 caches: a NaN
scale) and table entries of blocks wholly before the window are -1, so a read the kernels
should not make shows; outputs and workspaces are NaN-poisoned (the `poison` fixture), so an
element they forget to write shows. The first tests check the emulator itself, including
deliberately wrong kernels that must give wrong answers."""

import math

import pytest
import torch
from conftest import HAS_CUDA

from frugal import reference

emu = pytest.importorskip("frugal._cuda_emu", reason="frugal._cuda_emu is not built")

ops = torch.ops.frugal_emu
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# Against float64: fp32 keeps fp32 accuracy (bf16x3 products), fp16 / bf16 round q, P and the
# output to the 16-bit type.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
# (q dtype, cache dtype): cache = q's dtype, or int8 under any float q.
COMBOS = [(d, d) for d in FLOATS] + [(d, torch.int8) for d in FLOATS]
COMBO_IDS = [f"{str(q)[6:]}-{str(c)[6:]}" for q, c in COMBOS]


@pytest.fixture(autouse=True)
def emu_defaults():
    """Plan as on an H100 (132 SMs, 2 resident blocks, 512-position partitions) in forward
    schedule unless a test says otherwise; restored afterwards."""
    before = emu.configure()
    emu.configure(num_sms=132, blocks_per_sm=2, min_partition=512, schedule="forward", seed=0)
    yield
    emu.configure(**{k: before[k] for k in ("num_sms", "blocks_per_sm", "min_partition",
                                              "schedule", "seed")})


def selftest(name, x=None, arg=0):
    x = torch.zeros(0) if x is None else x.float()
    return ops.emu_selftest(name, x, arg)


# ------------------------------------------------------------------------ the emulator itself

def expected_shuffles(v, width):
    """CUDA's __shfl_*_sync lane rules, written from the programming guide."""
    out = torch.empty(5, 32)
    for lane in range(32):
        first = lane // width * width
        last = first + width - 1
        out[0, lane] = v[first + (31 - lane) % width]
        out[1, lane] = v[lane - 3] if lane - 3 >= first else v[lane]
        out[2, lane] = v[lane + 5] if lane + 5 <= last else v[lane]
        out[3, lane] = v[lane ^ 6] if (lane ^ 6) <= last else v[lane]
        # Mask of the even lanes, src lane + 2: an odd src (outside the mask) is undefined and
        # never happens here; the last segment wraps inside its width.
        out[4, lane] = v[first + (lane + 2) % width] if lane % 2 == 0 else -1
    return out


@pytest.mark.parametrize("width", [32, 16, 8, 4, 2])
def test_emu_shuffle_lane_semantics(width):
    v = torch.randperm(1000)[:32].float()
    got = selftest("shuffle", v, width).view(5, 32)
    torch.testing.assert_close(got, expected_shuffles(v, width), rtol=0, atol=0)


def test_emu_ballot_any_all():
    p = (torch.rand(32) < 0.5).float()
    p[3], p[20] = 1, 0
    got = selftest("ballot", p, 0x0000F0F0)
    bits = sum(1 << i for i in range(32) if p[i])
    masked = sum(1 << i for i in range(32) if p[i] and (0x0000F0F0 >> i) & 1)
    assert got.tolist() == [bits & 0xFFFF, bits >> 16, 1, 0, masked & 0xFFFF, masked >> 16]
    ones = selftest("ballot", torch.ones(32), 0xFFFFFFFF)
    assert ones.tolist()[:4] == [0xFFFF, 0xFFFF, 1, 1]


@pytest.mark.parametrize("schedule", ["forward", "reverse", "shuffle"])
def test_emu_barriers(schedule):
    emu.configure(schedule=schedule, seed=7)
    x = torch.randn(128)
    got = selftest("block_sum", x)
    assert got[0].item() == pytest.approx(x.double().sum().item(), rel=1e-5, abs=1e-5)
    assert got[1:].tolist() == [43, 1, 1]  # __syncthreads_count(tid % 3 == 0), _or, _and


def test_emu_missing_barrier_gives_a_wrong_answer():
    # Without barriers thread 0 reads partial sums before the others wrote them: with the
    # forward schedule it reads poisoned shared memory. (The reverse schedule happens to run
    # every writer first and hides this race: tests of real kernels run more than one order.)
    x = torch.randn(128)
    assert math.isnan(selftest("block_sum_racy", x)[0].item())
    emu.configure(schedule="reverse")
    assert selftest("block_sum_racy", x)[0].item() == pytest.approx(x.double().sum().item(),
                                                                     rel=1e-5, abs=1e-5)


def test_emu_wrong_shuffle_gives_a_wrong_answer():
    x = torch.randn(32)
    assert selftest("warp_sum", x)[0].item() == pytest.approx(x.double().sum().item(), rel=1e-5,
                                                               abs=1e-5)
    assert selftest("warp_sum_wrong", x)[0].item() != pytest.approx(x.double().sum().item(),
                                                                     rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("k", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emu_mma_fragments(k, dtype):
    # The kernel loads A, B, C into registers by the PTX layouts of device.h; the emulated
    # mma.sync must then compute A @ B + C (products exact, fp32 sums).
    a = torch.randn(16, k).to(dtype).double()
    b = torch.randn(k, 8).to(dtype).double()
    c = torch.randn(16, 8).double()
    x = torch.cat([a.flatten(), b.flatten(), c.flatten()])
    got = selftest(f"mma{k}", x, int(dtype == torch.bfloat16)).view(16, 8).double()
    torch.testing.assert_close(got, a @ b + c, rtol=1e-6, atol=1e-6)
    # A transposed fragment (B read as if row-major) must not pass.
    assert not torch.allclose(got, a @ b.reshape(8, k).t() + c, rtol=1e-3, atol=1e-3)


def test_emu_cp_async_lands_at_the_wait():
    x = torch.randn(128)
    got = selftest("cp_async", x)
    torch.testing.assert_close(got[:128], x, rtol=0, atol=0)
    assert (got[128:] == 0).all()  # zero fill
    early = selftest("cp_async_nowait", x)
    assert torch.isnan(early).all(), "read before cp.async.wait_group must see poison"


def test_emu_dynamic_shared_memory_is_poisoned():
    assert torch.isnan(selftest("smem_poison")).all()


def test_emu_errors():
    with pytest.raises(RuntimeError, match=r"emu_selftest\(exited_lane\): kernel failed: .*"
                                           r"returned"):
        selftest("exited_lane")
    with pytest.raises(RuntimeError, match="deadlock in block"):
        selftest("deadlock")
    with pytest.raises(RuntimeError, match="unknown kernel 'nope'"):
        selftest("nope")


def test_emu_atomics_and_builtins():
    got = selftest("atomic")
    assert got[0].item() == 8 * 64
    assert got[1:].view(8, 4).tolist() == [[b, 8, 64, 0] for b in range(8)]


def test_emu_ops_take_frugal_schemas():
    for name in ("paged_attention", "paged_prefill_attention", "paged_append"):
        ours = str(getattr(ops, name).default._schema)
        theirs = str(getattr(torch.ops.frugal, name).default._schema)
        assert ours == theirs.replace("frugal::", "frugal_emu::")


# ------------------------------------------------------------------------ cases

class Case:
    """Sequences in a paged cache: tables randomly permuted, -1 for blocks before the window,
    NaN in every slot no query needs. layout: "contiguous", "permuted" (physical [Hkv,
    num_blocks, bs, D]) or "padded" (rows padded to D + 8 elements plus a one-element offset:
    misaligned for vector loads)."""

    def __init__(self, lens, hq, hkv, d, bs, q_dtype, cache_dtype, window=0, q_lens=None,
                 layout="contiguous", seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.lens, self.window, self.bs = list(lens), window, bs
        self.hq, self.hkv, self.d = hq, hkv, d
        self.q_lens = list(q_lens) if q_lens is not None else [1] * len(lens)
        # First position any query of sequence b reads.
        self.lo = [max(0, n - q - window + 1) if window > 0 else 0
                   for n, q in zip(self.lens, self.q_lens)]
        needed = [range(lo // bs, -(-n // bs)) for lo, n in zip(self.lo, self.lens)]
        num_blocks = sum(len(r) for r in needed) + 3
        width = max((-(-n // bs) for n in self.lens), default=0) + 1
        ids = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables = torch.full((len(self.lens), width), -1, dtype=torch.int32)
        for b, r in enumerate(needed):
            for j in r:
                self.tables[b, j] = ids.pop()
        self.k_cache = self._cache(num_blocks, cache_dtype, layout)
        self.v_cache = self._cache(num_blocks, cache_dtype, layout)
        self.k_scale = self.v_scale = None
        slots = [int(self.tables[b, p // bs]) * bs + p % bs
                 for b, n in enumerate(self.lens) for p in range(self.lo[b], n)]
        blk = torch.tensor([s // bs for s in slots], dtype=torch.long)
        off = torch.tensor([s % bs for s in slots], dtype=torch.long)
        for cache in (self.k_cache, self.v_cache):
            if cache_dtype == torch.int8:
                cache.copy_(torch.randint(-127, 128, cache.shape, dtype=torch.int8, generator=gen))
            else:
                cache[blk, off] = torch.randn(len(slots), hkv, d, generator=gen).to(cache_dtype)
        if cache_dtype == torch.int8:
            self.k_scale = torch.full((num_blocks, bs, hkv), float("nan"))
            self.v_scale = torch.full((num_blocks, bs, hkv), float("nan"))
            for s in (self.k_scale, self.v_scale):
                s[blk, off] = torch.rand(len(slots), hkv, generator=gen) * 0.02 + 0.002
        rows = len(self.lens) if q_lens is None else sum(self.q_lens)
        self.q = torch.randn(rows, hq, d, generator=gen).to(q_dtype)
        self.seq_lens = torch.tensor(self.lens, dtype=torch.int32)
        self.cu = torch.tensor([0] + torch.tensor(self.q_lens).cumsum(0).tolist(),
                               dtype=torch.int32)
        self.scale = d**-0.5

    def _cache(self, num_blocks, dtype, layout):
        shape = (num_blocks, self.bs, self.hkv, self.d)
        fill = 0 if dtype == torch.int8 else float("nan")
        if layout == "permuted":
            return torch.full((self.hkv, num_blocks, self.bs, self.d), fill,
                              dtype=dtype).permute(1, 2, 0, 3)
        if layout == "padded":
            flat = torch.full((num_blocks * self.bs * self.hkv * (self.d + 8) + 1,), fill,
                              dtype=dtype)
            return flat[1:].view(num_blocks, self.bs, self.hkv, self.d + 8)[..., :self.d]
        return torch.full(shape, fill, dtype=dtype)

    def dequantized(self):
        k, v = self.k_cache.double(), self.v_cache.double()
        if self.k_scale is not None:
            k, v = k * self.k_scale.double()[..., None], v * self.v_scale.double()[..., None]
        return k, v

    def decode(self, q=None, op=None):
        op = op or ops.paged_attention
        return op(self.q if q is None else q, self.k_cache, self.v_cache, self.tables,
                  self.seq_lens, self.scale, self.window, self.k_scale, self.v_scale)

    def decode64(self, q=None):
        k, v = self.dequantized()
        return reference.paged_attention((self.q if q is None else q).double(), k, v, self.tables,
                                         self.seq_lens, self.scale, self.window or None)

    def prefill(self, q=None, op=None):
        op = op or ops.paged_prefill_attention
        return op(self.q if q is None else q, self.k_cache, self.v_cache, self.tables,
                  self.seq_lens, self.cu, self.scale, self.window, self.k_scale, self.v_scale)

    def prefill64(self, q=None):
        k, v = self.dequantized()
        return reference.paged_prefill_attention(
            (self.q if q is None else q).double(), k, v, self.tables, self.seq_lens,
            torch.tensor(self.q_lens), self.scale, self.window or None)


def check(out, want, dtype):
    assert out.dtype == dtype and out.shape == want.shape
    assert torch.isfinite(out).all(), "non-finite output: an unused slot or unwritten element"
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


def mixed_lens(bs):
    """seq_len 1, exact multiples of block_size, others, and 0, in one batch."""
    return [1, bs, 3 * bs, 37, 0, 2 * bs + 1, 100]


# ------------------------------------------------------------------------ decode

@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2), (18, 2)], ids=["G1", "G4", "G8", "G9"])
@pytest.mark.parametrize("q_dtype,cache_dtype", COMBOS, ids=COMBO_IDS)
def test_decode_matches_float64(poison, q_dtype, cache_dtype, hq, hkv):
    case = Case(mixed_lens(16), hq, hkv, 72, 16, q_dtype, cache_dtype, seed=hq * 7 + hkv)
    check(case.decode(), case.decode64(), q_dtype)
    assert emu.last_plan()["splits"] == 1


@pytest.mark.parametrize("d", list(range(8, 257, 8)))
def test_decode_every_head_dim(poison, d):
    case = Case([5, 40, 17], 8, 2, d, 8, torch.float16, torch.float16, seed=d)
    check(case.decode(), case.decode64(), torch.float16)


@pytest.mark.parametrize("bs", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_decode_every_block_size(poison, bs):
    lens = [1, bs, 2 * bs + 3, 0, 61]
    case = Case(lens, 8, 2, 64, bs, torch.bfloat16, torch.bfloat16, seed=bs)
    check(case.decode(), case.decode64(), torch.bfloat16)


@pytest.mark.parametrize("layout", ["permuted", "padded"])
@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float16, torch.float16),
                                                 (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.int8)], ids=str)
def test_decode_cache_strides(poison, q_dtype, cache_dtype, layout):
    # Permuted caches keep 16-byte rows (cp.async); padded ones break the alignment and take
    # the element-wise path. q with a non-unit head-dim stride is copied by the glue.
    case = Case(mixed_lens(8), 8, 2, 40, 8, q_dtype, cache_dtype, layout=layout, seed=3)
    q = torch.randn(case.q.shape[0], 8, 80).to(q_dtype)[..., ::2]
    check(case.decode(q), case.decode64(q), q_dtype)


@pytest.mark.parametrize("window", [1, 7, 16, 100])
@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.float32),
                                                 (torch.float16, torch.int8)], ids=str)
def test_decode_window(poison, window, q_dtype, cache_dtype):
    lens = [1, 5, 16, 33, 150, 300, 0]
    case = Case(lens, 8, 2, 64, 4, q_dtype, cache_dtype, window=window, seed=window)
    assert (case.tables[5, :(300 - window) // 4] == -1).all()
    check(case.decode(), case.decode64(), q_dtype)


@pytest.mark.parametrize("window", [0, 50])
@pytest.mark.parametrize("min_partition", [8, 24, 40])
@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.int8)], ids=str)
def test_decode_split_kv(poison, q_dtype, cache_dtype, min_partition, window):
    # Few blocks and a small minimum partition: the plan splits every sequence; partitions
    # past a short sequence's end exit and the merge skips them (a read of one would be NaN).
    emu.configure(min_partition=min_partition)
    case = Case([200, 1, 8, 64, 0, 131], 8, 2, 64, 8, q_dtype, cache_dtype, window=window,
                seed=min_partition + window)
    out = case.decode()
    plan = emu.last_plan()
    assert plan["splits"] > 1 and plan["partition"] % 8 == 0
    assert plan["partition"] >= min_partition
    check(out, case.decode64(), q_dtype)


def test_decode_split_plan_follows_occupancy():
    # Tables of 20 blocks of 16: every span is bounded by 320 positions without reading seq_lens.
    case = Case([300] * 2, 8, 2, 64, 16, torch.float16, torch.float16, seed=1)
    emu.configure(min_partition=16, num_sms=4, blocks_per_sm=1)  # 4 units fill 4 SMs: no split
    case.decode()
    assert emu.last_plan() == dict(units=4, splits=1, partition=320, ws_o_floats=0,
                                   ws_lse_floats=0, blocks_per_sm=1)
    emu.configure(num_sms=64, blocks_per_sm=2)  # one wave is 128 blocks: 32 splits wanted
    case.decode()
    plan = emu.last_plan()
    assert plan["splits"] == 20 and plan["partition"] == 16  # cdiv(320 / 32, 8) * 8 = 16
    assert plan["ws_o_floats"] == 2 * 8 * 20 * 64 and plan["ws_lse_floats"] == 2 * 8 * 20


@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_decode_schedules(poison, schedule):
    # Another order of the threads between barriers: a race in the kernels would show here.
    emu.configure(schedule=schedule, seed=11, min_partition=16)
    case = Case(mixed_lens(16), 16, 2, 128, 16, torch.float16, torch.int8, seed=5)
    check(case.decode(), case.decode64(), torch.float16)


def test_decode_zero_lengths_and_empty(poison):
    case = Case([0, 0], 8, 2, 64, 16, torch.float32, torch.float32)
    assert (case.decode() == 0).all()
    assert case.decode(case.q[:, :0]).shape == (2, 0, 64)


def test_nan_in_what_a_query_reads_gives_nan():
    # As the reference: a NaN scale of an attended position poisons every head of its kv head,
    # and only those.
    case = Case([20, 30], 8, 2, 64, 8, torch.float16, torch.int8, seed=4)
    blk, off = int(case.tables[1, 1]), 3  # position 11 of sequence 1
    case.k_scale[blk, off, 0] = float("nan")
    out = case.decode()
    assert torch.isnan(out[1, :4]).all() and torch.isfinite(out[1, 4:]).all()
    assert torch.isfinite(out[0]).all()


# ------------------------------------------------------------------------ prefill

@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2), (18, 2)], ids=["G1", "G4", "G8", "G9"])
@pytest.mark.parametrize("q_dtype,cache_dtype", COMBOS, ids=COMBO_IDS)
def test_prefill_matches_float64(poison, q_dtype, cache_dtype, hq, hkv):
    # Chunks of 1 token, a whole sequence, exact block multiples, and an empty one.
    lens, q_lens = [37, 1, 48, 0, 70], [5, 1, 16, 0, 70]
    case = Case(lens, hq, hkv, 72, 16, q_dtype, cache_dtype, q_lens=q_lens, seed=hq + hkv)
    check(case.prefill(), case.prefill64(), q_dtype)


@pytest.mark.parametrize("window", [1, 6, 40])
@pytest.mark.parametrize("bs", [1, 8, 256])
def test_prefill_window_and_block_sizes(poison, window, bs):
    lens, q_lens = [90, 3, 64], [33, 3, 9]
    case = Case(lens, 8, 2, 64, bs, torch.float32, torch.float32, window=window, q_lens=q_lens,
                seed=window * 10 + bs)
    check(case.prefill(), case.prefill64(), torch.float32)


@pytest.mark.parametrize("d", [8, 56, 128, 200, 256])
@pytest.mark.parametrize("layout", ["permuted", "padded"])
def test_prefill_head_dims_and_strides(poison, d, layout):
    case = Case([40, 17], 4, 2, d, 16, torch.bfloat16, torch.bfloat16, q_lens=[20, 17],
                layout=layout, seed=d)
    q = torch.randn(37, 4, 2 * d).to(torch.bfloat16)[..., ::2]
    check(case.prefill(q), case.prefill64(q), torch.bfloat16)


@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_prefill_schedules(poison, schedule):
    emu.configure(schedule=schedule, seed=3)
    case = Case([50, 20], 16, 2, 64, 8, torch.float16, torch.float16, q_lens=[40, 20], window=9)
    check(case.prefill(), case.prefill64(), torch.float16)


def test_prefill_last_rows_equal_decode(poison):
    # The last token of each chunk is a decode query: the two kernels must agree.
    case = Case([37, 64, 5], 8, 2, 64, 16, torch.float32, torch.float32, q_lens=[6, 64, 5])
    last = case.cu[1:].long() - 1
    torch.testing.assert_close(case.prefill()[last], case.decode(case.q[last]), rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------------ append

def append_case(n, hkv, d, bs, x_dtype, cache_dtype, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-n // bs) + 2
    case = Case([], hkv, hkv, d, bs, x_dtype, cache_dtype, layout=layout)
    k_cache = case._cache(num_blocks, cache_dtype, layout)
    v_cache = case._cache(num_blocks, cache_dtype, layout)
    if cache_dtype == torch.int8:
        k_cache.fill_(99)
        v_cache.fill_(99)
    scales = [torch.full((num_blocks, bs, hkv), -7.0) for _ in range(2)] \
        if cache_dtype == torch.int8 else [None, None]
    slots = torch.randperm(num_blocks * bs, generator=gen)[:n]
    slots[::4] = -1  # padding
    k = torch.randn(n, hkv, d, generator=gen).to(x_dtype)
    v = torch.randn(n, hkv, d, generator=gen).to(x_dtype)
    return k, v, k_cache, v_cache, slots, scales


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("cache_dtype", FLOATS + [torch.int8], ids=str)
@pytest.mark.parametrize("x_dtype", FLOATS, ids=str)
def test_append_bit_identical_to_reference(x_dtype, cache_dtype, slot_dtype):
    k, v, kc, vc, slots, (ks, vs) = append_case(23, 3, 40, 8, x_dtype, cache_dtype,
                                                  seed=FLOATS.index(x_dtype))
    if cache_dtype == torch.int8:  # rows of zeros and rows holding inf / NaN
        k[1].zero_()
        v[2, 1, 5] = float("inf")
        k[5, 0, 0] = float("nan")
    want = [t.clone() for t in (kc, vc)] + ([ks.clone(), vs.clone()] if ks is not None else [])
    reference.paged_append(k, v, *want[:2], slots, *(want[2:] or [None, None]))
    ops.paged_append(k, v, kc, vc, slots.to(slot_dtype), ks, vs)
    got = [kc, vc] + ([ks, vs] if ks is not None else [])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["permuted", "padded"])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.int8], ids=str)
def test_append_strides(layout, cache_dtype):
    k, v, kc, vc, slots, (ks, vs) = append_case(17, 2, 24, 4, torch.float32, cache_dtype,
                                                  layout=layout, seed=9)
    k = torch.randn(17, 2, 48)[..., ::2]  # non-unit head-dim stride
    want = [t.clone() for t in (kc, vc)] + ([ks.clone(), vs.clone()] if ks is not None else [])
    reference.paged_append(k, v, *want[:2], slots, *(want[2:] or [None, None]))
    ops.paged_append(k, v, kc, vc, slots, ks, vs)
    for g, w in zip([kc, vc] + ([ks, vs] if ks is not None else []), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_append_skips_slots_outside_the_cache():
    # The glue reads no slot on the host (frugal.paged_append checks them with one sync); the
    # kernel must still not write past the cache.
    k, v, kc, vc, slots, _ = append_case(6, 2, 16, 4, torch.float32, torch.float32, seed=2)
    slots = torch.tensor([0, kc.shape[0] * 4, 5, 1 << 40, -3, 7])
    want = [kc.clone(), vc.clone()]
    keep = torch.tensor([True, False, True, False, True, True])
    reference.paged_append(k[keep], v[keep], *want, slots[keep])
    ops.paged_append(k, v, kc, vc, slots, None, None)
    for g, w in zip((kc, vc), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_append_then_attend(poison):
    # The kernels together: append a chunk into int8 caches, then prefill over it.
    bs, hkv, d = 4, 2, 32
    kc = torch.zeros(12, bs, hkv, d, dtype=torch.int8)
    vc = torch.zeros_like(kc)
    ks, vs = torch.full((12, bs, hkv), float("nan")), torch.full((12, bs, hkv), float("nan"))
    tables = torch.tensor([[7, 2, 9, 0, -1]], dtype=torch.int32)
    k, v = torch.randn(15, hkv, d), torch.randn(15, hkv, d)
    slots = torch.tensor([int(tables[0, p // bs]) * bs + p % bs for p in range(15)])
    ops.paged_append(k, v, kc, vc, slots, ks, vs)
    q = torch.randn(15, 4, d)
    lens, cu = torch.tensor([15], dtype=torch.int32), torch.tensor([0, 15], dtype=torch.int32)
    out = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, d**-0.5, 0, ks, vs)
    kd, vd = kc.double() * ks.double()[..., None], vc.double() * vs.double()[..., None]
    want = reference.paged_prefill_attention(q.double(), kd, vd, tables, lens, torch.tensor([15]))
    check(out, want, torch.float32)


# ------------------------------------------------------------------------ errors

def test_errors_name_op_argument_expectation_and_value():
    case = Case([5, 9], 8, 2, 64, 16, torch.float16, torch.float16)
    args = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, tables=case.tables,
                lens=case.seq_lens, k_scale=None, v_scale=None)

    def decode(**kw):
        a = {**args, **kw}
        return ops.paged_attention(a["q"], a["k_cache"], a["v_cache"], a["tables"], a["lens"],
                                   0.1, 0, a["k_scale"], a["v_scale"])

    cases = [
        (dict(q=case.q[0]), r"paged_attention: q must be 3-d \[batch, num_heads, head_dim\]; "
                            r"got shape \[8, 64\]"),
        (dict(q=case.q.to(torch.bfloat16)),
         r"paged_attention: q must have k_cache's dtype Half \(any float q only over an int8 "
         r"cache\); got BFloat16"),
        (dict(q=case.q[:, :7]), "q's head count 7 must be a multiple of k_cache's num_kv_heads 2"),
        (dict(k_cache=case.k_cache[..., :60], v_cache=case.v_cache[..., :60], q=case.q[..., :60]),
         r"head_dim \(k_cache.size\(3\)\) a multiple of 8 from 8 to 256; got 60"),
        (dict(k_cache=case.k_cache[:, :12], v_cache=case.v_cache[:, :12]),
         r"block_size \(k_cache.size\(1\)\) must be a power of two from 1 to 256; got 12"),
        (dict(v_cache=case.v_cache.float()), "v_cache must have k_cache's dtype Half; got Float"),
        (dict(k_cache=case.k_cache.transpose(1, 3), v_cache=case.v_cache.transpose(1, 3),
              q=torch.zeros(2, 8, 16, dtype=torch.float16)),
         "must have unit stride along head_dim"),
        (dict(k_scale=torch.ones(4)), "k_scale is only for int8 caches; k_cache is Half"),
        (dict(tables=case.tables.long()), "block_tables must be int32; got Long"),
        (dict(tables=case.tables[:1]), r"block_tables must be \[2, max_blocks\]"),
        (dict(lens=case.seq_lens.float()), "seq_lens must be int32; got Float"),
        (dict(lens=torch.zeros(3, dtype=torch.int32)),
         r"seq_lens must have shape \(2,\); got \[3\]"),
    ]
    for kw, message in cases:
        with pytest.raises(RuntimeError, match=message):
            decode(**kw)
    i8 = Case([5], 8, 2, 64, 16, torch.float16, torch.int8)
    with pytest.raises(RuntimeError, match=r"int8 caches need v_scale \(float32"):
        ops.paged_attention(i8.q, i8.k_cache, i8.v_cache, i8.tables, i8.seq_lens, 0.1, 0,
                            i8.k_scale, None)
    with pytest.raises(RuntimeError,
                       match=r"k_scale must have shape \[.*\] \(k_cache.shape\[:3\]\)"):
        ops.paged_attention(i8.q, i8.k_cache, i8.v_cache, i8.tables, i8.seq_lens, 0.1, 0,
                            i8.k_scale[:, :1], i8.v_scale)
    with pytest.raises(RuntimeError, match="paged_prefill_attention: cu_seqlens_q must be int32"):
        ops.paged_prefill_attention(case.q, case.k_cache, case.v_cache, case.tables,
                                    case.seq_lens, case.cu.long(), 0.1, 0, None, None)
    with pytest.raises(RuntimeError, match=r"paged_append: slot_mapping must be int32 or int64; "
                                           "got Float"):
        ops.paged_append(case.q[:, :2], case.q[:, :2], case.k_cache, case.v_cache,
                         torch.zeros(2), None, None)
    with pytest.raises(RuntimeError, match=r"paged_append: k must be \[num_tokens, 2, 64\]"):
        ops.paged_append(case.q, case.q, case.k_cache, case.v_cache,
                         torch.zeros(2, dtype=torch.int32), None, None)


# ------------------------------------------------------------------------ on a GPU

def on_gpu(case):
    for name, t in list(vars(case).items()):
        if isinstance(t, torch.Tensor):
            setattr(case, name, t.cuda())
    return case


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine; the same cases run "
                                         "through the emulator above")
@pytest.mark.parametrize("q_dtype,cache_dtype", COMBOS, ids=COMBO_IDS)
def test_real_kernels_match_float64(poison, q_dtype, cache_dtype):
    ops_gpu = torch.ops.frugal
    # Short sequences (no split) and long ones (split-KV on any GPU: 12 blocks, 4k positions).
    for lens in (mixed_lens(16), [3000, 1, 4097]):
        case = on_gpu(Case(lens, 16, 2, 128, 16, q_dtype, cache_dtype, seed=len(lens)))
        check(case.decode(op=ops_gpu.paged_attention).cpu(), case.decode64().cpu(), q_dtype)
    case = on_gpu(Case([37, 1, 48, 0, 70], 16, 2, 72, 16, q_dtype, cache_dtype,
                       q_lens=[5, 1, 16, 0, 70], window=20))
    check(case.prefill(op=ops_gpu.paged_prefill_attention).cpu(), case.prefill64().cpu(),
          q_dtype)
