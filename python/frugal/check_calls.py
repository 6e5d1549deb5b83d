"""The declared matrix of public calls that ``frugal check`` drives to find what the JIT builds.

Each family runs real public API calls with ``backend="triton"`` on CPU tensors inside
:func:`frugal.jit_capture.capture`, so every Triton launch the launchers make for them is
recorded (nothing runs). The matrix is chosen to reach every constexpr variant of every kernel
-- config bucket, dtype combination, split or not, element rule, and the integer arguments the
JIT turns into constants (value 1) -- and the divisibility-16 specializations of the shapes
users meet (M = 1, 2, 16, 17, 64, 4096; K and N off multiples of 16; sliced inputs).

``reachable(seed, n)`` draws random valid public calls instead; a test asserts that every
constexpr variant they reach is in the matrix, so a variant that only users would meet cannot
ship unchecked.
"""

import random

import torch

import frugal
from frugal.errors import BackendError
from frugal.score_mods import alibi_slopes_like_bloom

FAMILIES = ("quantize", "int8", "paged", "sparse")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _call(label, fn, *args, **kwargs):
    """``fn(*args, **kwargs, backend="triton")``; None when the API refuses the Triton backend
    for these arguments (BackendError: it would run another backend, no Triton launch)."""
    from .jit_capture import label as _label

    with _label(label):
        try:
            return fn(*args, **kwargs, backend="triton")
        except BackendError:
            return None


def _name(dtype):
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- quantize

def _quantize_call(x):
    _call(f"quantize_per_token {_name(x.dtype)} {tuple(x.shape)}", frugal.quantize_per_token, x)


def quantize():
    # K spans every config bucket and every clamped block size, each aligned (K % 16 == 0) and
    # not, one and several blocks per row; one sliced input (row stride != K, unaligned base).
    for dtype in _FLOATS:
        for K in (1, 7, 100, 128, 200, 256, 300, 512, 700, 1024, 1500, 2048, 3000, 4096, 5000,
                  8192):
            _quantize_call(torch.randn(3, K, dtype=dtype))
        _quantize_call(torch.randn(4, 300, dtype=dtype)[:, 3:203])


# --------------------------------------------------------------------------- int8

def _i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def _int8_variants(M, N, K, a, b, full=True):
    """Every dtype/bias/scale combination of the three int8 ops at one shape (a reduced set
    when ``full`` is False)."""
    tag = f"M={M} N={N} K={K}"
    a_s, b_s = torch.rand(M) + 0.5, torch.rand(N) + 0.5
    _call(f"int8_mm {tag}", frugal.int8_mm, a, b)
    outs = _FLOATS if full else (torch.float16,)
    for out in outs:
        biases = dict.fromkeys([None, out, torch.float32, torch.bfloat16]) if full else [None]
        for bias_dtype in biases:
            bias = None if bias_dtype is None else torch.randn(N, dtype=bias_dtype)
            _call(f"int8_matmul {tag} out={_name(out)} bias={bias_dtype and _name(bias_dtype)}",
                  frugal.int8_matmul, a, b, a_s, b_s, bias, out)
    if full:
        _call(f"int8_matmul {tag} per-tensor scales", frugal.int8_matmul, a, b,
              a_s[:1].clone(), b_s[:1].clone(), None, torch.float16)
    for dtype in (_FLOATS if full else (torch.float16,)):
        x = torch.randn(M, K, dtype=dtype)
        for bias_dtype in (dict.fromkeys([None, dtype, torch.float32]) if full else [None]):
            bias = None if bias_dtype is None else torch.randn(N, dtype=bias_dtype)
            _call(f"int8_weight_only_matmul {tag} x={_name(dtype)} "
                  f"bias={bias_dtype and _name(bias_dtype)}",
                  frugal.int8_weight_only_matmul, x, b, b_s, bias)


def int8():
    # Shapes: N = K = 4096 (aligned; split-K at small M), N = 1, odd N and K (the unaligned
    # tables), K = 8 (one K block), and a sliced activation (row stride and base address off
    # 16).
    shapes = ((4096, 4096), (1, 512), (33, 100), (4096, 8))
    # Small M splits K unless the tiles fill the GPU already: wide layers, N aligned or not.
    wide = ((16384, 4096), (16383, 100))
    for M in (1, 2, 16, 17, 64, 100, 4096):
        full = M in (1, 17, 100, 4096)  # one M per config bucket gets every dtype variant
        for N, K in shapes + (wide if M <= 64 else ()):
            _int8_variants(M, N, K, _i8(M, K), _i8(N, K), full)
        big = _i8(M, 4096 + 24)
        _int8_variants(M, 4096, 4096, big[:, 3:4099], _i8(4096, 4096), full)


# --------------------------------------------------------------------------- paged

_PAGED_DTYPES = ((torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                 (torch.float32, torch.float32), (torch.float16, torch.int8),
                 (torch.bfloat16, torch.int8), (torch.float32, torch.int8))


def _paged_case(q_dtype, cache_dtype, D, hkv, G, block_size, lens, window, gen):
    """Caches, tables and scales for sequences of ``lens`` tokens (blocks shuffled)."""
    B = len(lens)
    need = [-(-n // block_size) for n in lens]
    width = max(need + [1])
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((B, width), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    shape = (num_blocks, block_size, hkv, D)
    if cache_dtype == torch.int8:
        k_cache, v_cache = _i8(*shape), _i8(*shape)
        k_scale, v_scale = torch.rand(shape[:3]), torch.rand(shape[:3])
    else:
        k_cache = torch.randn(shape, dtype=cache_dtype)
        v_cache = torch.randn(shape, dtype=cache_dtype)
        k_scale = v_scale = None
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return k_cache, v_cache, table, seq_lens, k_scale, v_scale


def _paged_calls(q_dtype, cache_dtype, D, hkv, G, block_size, lens, window, gen, **mods):
    kc, vc, table, seq_lens, ks, vs = _paged_case(q_dtype, cache_dtype, D, hkv, G, block_size,
                                                  lens, window, gen)
    B, hq = len(lens), hkv * G
    tag = (f"q={_name(q_dtype)} cache={_name(cache_dtype)} D={D} Hkv={hkv} G={G} "
           f"bs={block_size} B={B} window={window}"
           + "".join(f" {k}" for k, v in mods.items() if v is not None))
    q = torch.randn(B, hq, D, dtype=q_dtype)
    _call(f"paged_attention {tag}", frugal.paged_attention, q, kc, vc, table, seq_lens,
          None, window, ks, vs, **mods)
    chunk = min(lens)
    q4 = torch.randn(B, chunk, hq, D, dtype=q_dtype)
    _call(f"paged_prefill_attention {tag} chunk={chunk}", frugal.paged_prefill_attention, q4,
          kc, vc, table, seq_lens, None, None, window, ks, vs, **mods)
    q_lens = torch.tensor([max(1, n // 3) for n in lens], dtype=torch.int32)
    packed = torch.randn(int(q_lens.sum()), hq, D, dtype=q_dtype)
    _call(f"paged_prefill_attention {tag} packed", frugal.paged_prefill_attention, packed, kc,
          vc, table, seq_lens, q_lens, None, window, ks, vs, **mods)
    new = torch.randn(B, hkv, D, dtype=q_dtype)
    slots = (table[:, 0].long() * block_size).to(torch.int32)
    _call(f"paged_append {tag}", frugal.paged_append, new, new.clone(), kc, vc, slots, ks, vs)


def paged():
    gen = torch.Generator().manual_seed(0)
    for q_dtype, cache_dtype in _PAGED_DTYPES:
        # First, so that the report names it: a head dim that is a multiple of 8, not of 16
        # (the BLOCK_D = 128 variants of D = 128, masked).
        _paged_calls(q_dtype, cache_dtype, 120, 2, 4, 16, [300, 7], None, gen)
        for D in (32, 64, 128, 256):
            # One long sequence (split-KV and the merge kernel) per GQA group size, a short
            # batch with page size 1 and a window, and a batch that fills the GPU unsplit.
            for hkv, G in ((2, 1), (1, 4), (2, 8)):
                _paged_calls(q_dtype, cache_dtype, D, hkv, G, 16, [2000], None, gen)
            _paged_calls(q_dtype, cache_dtype, D, 2, 4, 1, [37, 5], 16, gen)
            _paged_calls(q_dtype, cache_dtype, D, 1, 4, 16, [40] * 140, None, gen)
            # int64 slot mappings (cast to int32 by the launcher) and an unaligned k view.
            kc, vc, table, seq_lens, ks, vs = _paged_case(q_dtype, cache_dtype, D, 2, 1, 16,
                                                          [20], None, gen)
            k = torch.randn(3, 2, D + 8, dtype=q_dtype)[:, :, 8:]
            _call(f"paged_append int64 slots D={D}", frugal.paged_append, k, k, kc, vc,
                  torch.tensor([0, -1, 5]), ks, vs)
    # The score modifiers (constexpr flags adding their code to the same tiles): one launch
    # each per attention kernel -- decode (split-KV), prefill -- not a cross product.
    for mods in (dict(softcap=30.0), dict(alibi_slopes=alibi_slopes_like_bloom(8))):
        _paged_calls(torch.float16, torch.float16, 128, 2, 4, 16, [2000], None, gen, **mods)


# --------------------------------------------------------------------------- sparse

def _masks(n, block):
    ids = torch.arange(n) // 97
    g = torch.Generator().manual_seed(n)
    dense = torch.rand(n, n, generator=g) < 0.3
    return {
        "full": frugal.masks.full(n, block_size=block),
        "causal": frugal.masks.causal(n, block_size=block),
        "window": frugal.masks.sliding_window(n, 100, block_size=block),
        "prefix_lm": frugal.masks.prefix_lm(n, 70, block_size=block),
        "document": frugal.masks.document(ids, block_size=block),
        "causal&document": frugal.masks.causal(n, block_size=block)
        & frugal.masks.document(ids, block_size=block),
        "dense": frugal.BlockMask.from_dense(dense, block_size=block),
        "bigbird": frugal.masks.bigbird(n, block_size=block),
    }


def _sparse_call(label, q, k, v, mask, **mods):
    q = q.requires_grad_()
    k = k.requires_grad_()
    v = v.requires_grad_()
    out = _call(label, frugal.sparse_attention, q, k, v, mask, **mods)
    if out is None:
        return
    from .jit_capture import label as _label

    with _label(label + " backward"):
        out.float().sum().backward()


def sparse():
    n = 300  # not a multiple of either block size: ragged last blocks
    for block in (64, 128, (64, 128)):
        for mask_name, mask in _masks(n, block).items():
            for dtype in _FLOATS:
                for D in (32, 64, 96, 128, 256):
                    q = torch.randn(1, 4, n, D, dtype=dtype)  # GQA: 2 query heads per kv head
                    k = torch.randn(1, 2, n, D, dtype=dtype)
                    v = torch.randn(1, 2, n, D, dtype=dtype)
                    _sparse_call(f"sparse_attention {mask_name} block={block} {_name(dtype)} "
                                 f"D={D}", q, k, v, mask)
    # Other multiples of 8: a masked BLOCK_D, row strides that are not multiples of 16 (8, 120).
    # The rule flags do not depend on D, so one mask covers them.
    mask = frugal.masks.causal(n, block_size=64)
    for dtype in _FLOATS:
        for D in (8, 80, 120, 192):
            q, k, v = (torch.randn(1, h, n, D, dtype=dtype) for h in (4, 2, 2))
            _sparse_call(f"sparse_attention causal block=64 {_name(dtype)} D={D}", q, k, v, mask)
    # Score modifiers: softcap and ALiBi together (the kernels' HAS_SOFTCAP / HAS_ALIBI
    # variant with the most live values), on the band rule and on the generic one, at the head
    # dims with the most registers; each modifier alone is a subset of it.
    slopes = torch.linspace(0.05, 0.5, 4)
    for dtype in _FLOATS:
        for D, mask_name in ((128, "causal"), (256, "document")):
            q, k, v = (torch.randn(1, h, n, D, dtype=dtype) for h in (4, 2, 2))
            _sparse_call(f"sparse_attention {mask_name} block=64 {_name(dtype)} D={D} softcap "
                         f"alibi", q, k, v, _masks(n, 64)[mask_name], softcap=30.0,
                         alibi_slopes=slopes)


def run(families=FAMILIES):
    """Every family's calls, run in turn (inside a capture)."""
    for family in families:
        globals()[family]()


# --------------------------------------------------------------------------- random calls

def _random_quantize(rng):
    dtype = rng.choice(_FLOATS)
    K = rng.choice([1, 2, 3, rng.randint(1, 6000), 16 * rng.randint(1, 400)])
    rows = rng.randint(1, 5)
    x = torch.randn(rows, K + 5, dtype=dtype)[:, rng.randint(0, 5):][:, :K]
    _quantize_call(x)


def _random_int8(rng):
    M = rng.choice([1, 2, rng.randint(1, 300), rng.randint(1, 5000)])
    N = rng.choice([1, rng.randint(1, 300), 16 * rng.randint(1, 300)])
    K = rng.choice([1, rng.randint(1, 300), 16 * rng.randint(1, 300)])
    offset = rng.choice([0, 0, rng.randint(1, 16)])
    a = _i8(M, K + offset)[:, offset:]
    b = _i8(N, K)
    op = rng.choice(["mm", "matmul", "weight_only"])
    if op == "mm":
        _call("random int8_mm", frugal.int8_mm, a, b)
    elif op == "matmul":
        out = rng.choice(_FLOATS)
        bias_dtype = rng.choice([None, *_FLOATS])
        bias = None if bias_dtype is None else torch.randn(N, dtype=bias_dtype)
        a_s = torch.rand(1 if rng.random() < 0.2 else M)
        b_s = torch.rand(1 if rng.random() < 0.2 else N)
        _call("random int8_matmul", frugal.int8_matmul, a, b, a_s, b_s, bias, out)
    else:
        dtype = rng.choice(_FLOATS)
        x = torch.randn(M, K + offset, dtype=dtype)[:, offset:]
        bias_dtype = rng.choice([None, *_FLOATS])
        bias = None if bias_dtype is None else torch.randn(N, dtype=bias_dtype)
        _call("random int8_weight_only_matmul", frugal.int8_weight_only_matmul, x, b,
              torch.rand(N), bias)


def _random_paged(rng):
    q_dtype, cache_dtype = rng.choice(_PAGED_DTYPES)
    D = 8 * rng.randint(1, 32)
    hkv = rng.choice([1, 2, 4])
    G = rng.choice([1, 2, 4, 8, 16, 32])
    block_size = rng.choice([1, 2, 8, 16, 32, 64, 128, 256])
    B = rng.choice([1, 2, rng.randint(1, 300)])
    lens = [rng.randint(1, 3000 if B < 4 else 200) for _ in range(B)]
    window = rng.choice([None, rng.randint(1, 4000)])
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    _paged_calls(q_dtype, cache_dtype, D, hkv, G, block_size, lens, window, gen)


def _random_sparse(rng):
    block = rng.choice([64, 128, (64, 128), (128, 64)])
    n = rng.randint(1, 400)
    mask_name, mask = rng.choice(list(_masks(n, block).items()))
    dtype = rng.choice(_FLOATS)
    D = rng.choice(frugal.HEAD_DIMS)
    hkv = rng.choice([1, 2])
    hq = hkv * rng.choice([1, 3])
    B = rng.choice([1, 2])
    q = torch.randn(B, hq, n, D, dtype=dtype)
    k = torch.randn(B, hkv, n, D, dtype=dtype)
    v = torch.randn(B, hkv, n, D, dtype=dtype)
    _sparse_call(f"random sparse_attention {mask_name}", q, k, v, mask)


_RANDOM = {"quantize": _random_quantize, "int8": _random_int8, "paged": _random_paged,
           "sparse": _random_sparse}


def reachable(seed, n, families=FAMILIES):
    """``n`` random valid public calls per family (inside a capture)."""
    rng = random.Random(seed)
    for family in families:
        for _ in range(n):
            _RANDOM[family](rng)
