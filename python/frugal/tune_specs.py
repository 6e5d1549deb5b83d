"""How ``frugal tune`` exercises each op: its bucket dimension and sizes, fresh inputs, the
accuracy rule a candidate must meet against the float64 reference, and the launch-config search
spaces of the Triton implementations (``kernels/configs/space.json``)."""

import dataclasses

import torch

from . import reference, registry
from .score_mods import alibi_slopes_like_bloom
from .tuning import TuneSpec

_UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _gpu(device):
    return torch.device(device).type == "cuda"


def _with_space(op_name, space, launch):
    """Gives ``op_name``'s Triton implementation a search space and a run that takes a config
    (the launcher called directly; without one, the registered run)."""
    op = registry.op(op_name)
    impl = op.impls.get("triton")
    if impl is None:
        return
    plain = impl.run

    def run(*args, config=None, **kwargs):
        return (plain(*args, **kwargs) if config is None
                else launch(*args, config=config, **kwargs))

    op.impls["triton"] = dataclasses.replace(impl, run=run, space=space)


def _with_cpu_knobs(op_name, space_name, relevant=None):
    """Gives ``op_name``'s C++ CPU implementation the knob space ``space_name`` (space.json)
    and a run that takes knob values (``config=``) or else applies the tuned file's table
    ``cpu_<op_name>`` (:func:`frugal.knobs.with_tuned`; ops that share a kernel share a space,
    each tunes its own table). ``relevant`` drops candidates whose
    knobs cannot matter for ``args``: ``relevant(args)`` names the knobs that can; the others
    keep their defaults, and candidates that then coincide are one."""
    from . import knobs as cpu_knobs

    op = registry.op(op_name)
    impl = op.impls.get("cpu")
    if impl is None or not cpu_knobs.knobs():
        return
    table = f"cpu_{op_name}"

    def space(*args, quick=False):
        from frugal.kernels import configs

        defaults = {n: k.default for n, k in cpu_knobs.knobs().items()}
        out = []
        names = None if relevant is None else relevant(args)
        for cfg in configs.space(space_name, quick):
            if names is not None:
                cfg = {n: v if n in names else defaults[n] for n, v in cfg.items()}
            if cfg not in out:
                out.append(cfg)
        return [(table, cfg) for cfg in out]

    op.impls["cpu"] = dataclasses.replace(
        impl, run=cpu_knobs.with_tuned(impl.run, table, op.tune.size_of), space=space,
        knob_table=table)


def _within(got, want, bound, what):
    """None when |got - want| <= bound everywhere (NaN where want is NaN), else the reason."""
    got, want = got.double(), want.double()
    both_nan = torch.isnan(got) & torch.isnan(want)
    err = torch.where(both_nan, 0.0, (got - want).abs())
    excess = (err - bound).nan_to_num(float("inf"))
    if bool((excess > 0).any()):
        i = int(excess.argmax())
        return (f"{what}: error {float(err.flatten()[i]):.3g} > bound "
                f"{float(torch.as_tensor(bound).expand_as(err).flatten()[i]):.3g}")
    return None


# ----------------------------------------------------------------------------- quantize

def _quantize_inputs(k, device, gen):
    rows = 1024 if _gpu(device) else 64
    return (torch.randn(rows, k, generator=gen).to(device),)


def _quantize_check(out, args):
    q, s = out
    q_ref, s_ref = reference.quantize_per_token(args[0])
    if not (torch.equal(q.cpu(), q_ref.cpu()) and torch.equal(s.cpu(), s_ref.cpu())):
        return "not bit-identical to the reference"
    return None


def _quantize_space(x, quick=False):
    from frugal.kernels import configs

    k = x.shape[-1]
    return [("quantize_per_token", cfg) for cfg in configs.space("quantize_per_token", quick)
            if cfg["BLOCK_K"] <= max(512, 2 * k)]


def _quantize_launch(x, config):
    from frugal.kernels import quantize as kernel

    return kernel.quantize_per_token(x, config=config)


registry.op("quantize_per_token").tune = TuneSpec(
    dim="K", sizes=lambda quick, device: [512, 4096] if quick else [512, 1024, 2048, 4096, 8192],
    inputs=_quantize_inputs, check=_quantize_check, size_of=lambda args: args[0].shape[-1])
_with_space("quantize_per_token", _quantize_space, _quantize_launch)


# ----------------------------------------------------------------------------- int8 GEMMs

def _gemm_nk(device):
    return (4096, 4096) if _gpu(device) else (1024, 1024)


def _int8(shape, gen, device):
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8).to(device)


def _int8_sizes(quick, device):
    if _gpu(device):
        return [1, 16, 128, 1024] if quick else [1, 4, 16, 32, 64, 128, 256, 1024, 4096]
    return [1, 32, 256] if quick else [1, 4, 16, 64, 256, 1024]


def _space_for(table, m, quick):
    """Configs of an int8 table that make sense at M rows: 16-row tiles for decode, split-K
    only where the tiles alone would not fill the GPU."""
    from frugal.kernels import configs

    out = []
    for cfg in configs.space(table, quick):
        if m <= 16 and cfg["BLOCK_M"] != 16:
            continue
        if m > 64 and cfg["split_k"] > 1:
            continue
        out.append((table, cfg))
    return out


def _mm_space(a, b, *rest, quick=False):
    from frugal.kernels import int8_matmul as kernel

    table, _ = kernel.pick_config(a, b)
    return _space_for(table, a.shape[0], quick)


def _epilogue_bound(acc, a_s, b_s, bias, out_dtype):
    """What fp32 epilogue rounding (3 ops) and the output rounding allow."""
    exact = acc.double() * a_s.double()[:, None] * b_s.double()[None, :]
    if bias is not None:
        exact = exact + bias.double()
    mag = (acc.double().abs() * a_s.double()[:, None] * b_s.double()[None, :])
    mag = mag + (0 if bias is None else bias.double().abs())
    return exact, 4 * 2.0**-24 * mag + _UNIT[out_dtype] * exact.abs() + 1e-30


def _mm_inputs(m, device, gen):
    n, k = _gemm_nk(device)
    return _int8((m, k), gen, device), _int8((n, k), gen, device)


def _mm_check(out, args):
    a, b = args
    return None if torch.equal(out.cpu(), reference.int8_mm(a.cpu(), b.cpu())) else \
        "int32 result differs from the exact product"


registry.op("int8_mm").tune = TuneSpec(
    dim="M", sizes=_int8_sizes, inputs=_mm_inputs, check=_mm_check,
    size_of=lambda args: args[0].shape[0])
def _mm_launch(a, b, config):
    from frugal.kernels import int8_matmul as kernel

    return kernel.int8_mm(a, b, config=config)


_with_space("int8_mm", _mm_space, _mm_launch)


def _matmul_inputs(m, device, gen):
    n, k = _gemm_nk(device)
    a, b = _int8((m, k), gen, device), _int8((n, k), gen, device)
    a_s = (torch.rand(m, generator=gen) + 0.5).to(device)
    b_s = (torch.rand(n, generator=gen) * 1e-3).to(device)
    bias = torch.randn(n, generator=gen).to(device)
    return a, b, a_s, b_s, bias, torch.bfloat16 if _gpu(device) else torch.float32


def _matmul_check(out, args):
    a, b, a_s, b_s, bias, out_dtype = (x.cpu() if torch.is_tensor(x) else x for x in args)
    if out.dtype != out_dtype:
        return f"output dtype {out.dtype}, not {out_dtype}"
    exact, bound = _epilogue_bound(reference.int8_mm(a, b), a_s, b_s, bias, out_dtype)
    return _within(out.cpu(), exact, bound, "W8A8 output")


def _matmul_launch(a, b, a_s, b_s, bias, out_dtype, config):
    from frugal.kernels import int8_matmul as kernel

    return kernel.int8_scaled_mm(a, b, a_s, b_s, bias, out_dtype, config=config)


registry.op("int8_matmul").tune = TuneSpec(
    dim="M", sizes=_int8_sizes, inputs=_matmul_inputs, check=_matmul_check,
    size_of=lambda args: args[0].shape[0])
_with_space("int8_matmul", _mm_space, _matmul_launch)


def _int8_knobs_relevant(args):
    """The stream threshold matters only at M <= 4 (an unpacked weight); the task and K-block
    knobs only on the packed path above it."""
    if args[0].shape[0] <= 4:
        return {"int8_stream_max_m"}
    return {"int8_block_k4", "int8_task_groups", "int8_task_block_bytes"}


for _name in ("int8_mm", "int8_matmul"):
    _with_cpu_knobs(_name, "cpu_int8_gemm", _int8_knobs_relevant)


def _weight_only_inputs(m, device, gen):
    n, k = _gemm_nk(device)
    dtype = torch.bfloat16 if _gpu(device) else torch.float32
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    b = _int8((n, k), gen, device)
    return x, b, (torch.rand(n, generator=gen) * 1e-2).to(device), \
        torch.randn(n, generator=gen).to(device, dtype)


def _weight_only_check(out, args):
    x, b, b_s, bias = (t.cpu() for t in args)
    w = b.double() * b_s.double()[:, None]
    exact = x.double() @ w.t() + bias.double()
    k = x.shape[1]
    mag = x.double().abs() @ w.abs().t() + bias.double().abs()
    # Products rounded to x's dtype at most (tensor cores keep fp32 sums), K fp32 additions.
    bound = (2 * _UNIT[x.dtype] + k * 2.0**-24) * mag + _UNIT[x.dtype] * exact.abs()
    return _within(out.cpu(), exact, bound, "weight-only output")


def _weight_only_space(x, b, *rest, quick=False):
    from frugal.kernels import int8_matmul as kernel

    table, _ = kernel.pick_config(x, b)
    return _space_for(table, x.shape[0], quick)


def _weight_only_launch(x, b, b_s, bias, config):
    from frugal.kernels import int8_matmul as kernel

    return kernel.int8_weight_only_mm(x, b, b_s, bias, config=config)


registry.op("int8_weight_only_matmul").tune = TuneSpec(
    dim="M", sizes=_int8_sizes, inputs=_weight_only_inputs, check=_weight_only_check,
    size_of=lambda args: args[0].shape[0])
_with_space("int8_weight_only_matmul", _weight_only_space, _weight_only_launch)


# ----------------------------------------------------------------------------- paged decode

def _decode_shape(device):
    """(batch, context, Hq, Hkv, block_size): a decode step worth timing on this device. On a
    CPU one long sequence: the case whose work split (the split-KV knobs) decides its speed; a
    batch that fills the threads does not split. (With 4 sequences of 1024 tokens, 256-token
    partitions won by 4% and then cost 7% at B = 1 with 512 and 8192 tokens.)"""
    return (8, 4096, 32, 8, 16) if _gpu(device) else (1, 4096, 32, 8, 16)


def _decode_inputs(d, device, gen):
    batch, context, hq, hkv, bs = _decode_shape(device)
    dtype = torch.bfloat16 if _gpu(device) else torch.float32
    blocks = batch * context // bs
    k = torch.randn(blocks, bs, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(blocks, bs, hkv, d, generator=gen).to(device, dtype)
    tables = torch.randperm(blocks, generator=gen).to(device, torch.int32).view(batch, -1)
    lens = torch.randint(context // 2, context + 1, (batch,), generator=gen).to(device,
                                                                               torch.int32)
    q = torch.randn(batch, hq, d, generator=gen).to(device, dtype)
    return q, k, v, tables, lens, d**-0.5, 0, None, None, context, None


def _attention_rule(out, args, run_ref):
    """FlashAttention's rule: |out - ref64| <= 2 x |ref in the input dtype - ref64| + 1e-5."""
    ref64 = run_ref(tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                          for a in args))
    same = run_ref(args)
    bound = 2 * (same.double() - ref64).abs() + 1e-5
    return _within(out, ref64, bound.to(out.device), "attention output")


def _score_mod_variants(q):
    """The score-modifier forms of an attention call on q [B, Hq, ...], as the implementations
    take them (softcap a float, slopes contiguous float32 [B, Hq]): Gemma-2's logit cap and
    BLOOM's ALiBi. Each compiles to its own kernel variant; the cap of 2 bends scores of
    unit size, so a candidate that got it wrong would fail the check."""
    b, hq = q.shape[0], q.shape[1]
    slopes = alibi_slopes_like_bloom(hq, q.device).expand(b, hq).contiguous()
    return [("softcap", dict(softcap=2.0)), ("alibi", dict(alibi_slopes=slopes))]


def _decode_check(out, args, softcap=0.0, alibi_slopes=None):
    return _attention_rule(out, args, lambda a: reference.paged_attention(
        a[0], a[1], a[2], a[3], a[4], a[5], None, None, None, softcap=softcap or None,
        alibi_slopes=alibi_slopes))


def _decode_space(q, k_cache, *rest, quick=False):
    from frugal.kernels import configs
    from frugal.kernels import paged_attention as kernel

    table = kernel.attention_table(q.dtype)
    return [(table, cfg) for cfg in configs.space(table, quick)]


def _decode_launch(q, k, v, tables, lens, scale, window, ks, vs, max_seq_len=-1,
                   workspace=None, *, config, return_lse=False, softcap=0.0, alibi_slopes=None):
    from frugal.kernels import paged_attention as kernel

    return kernel.paged_attention(q, k, v, tables, lens, scale, window, ks, vs,
                                  max_seq_len=max_seq_len, config=config,
                                  return_lse=return_lse, softcap=softcap,
                                  alibi_slopes=alibi_slopes)


registry.op("paged_attention").tune = TuneSpec(
    dim="D", sizes=lambda quick, device: [128] if quick else [64, 128, 256],
    inputs=_decode_inputs, check=_decode_check, size_of=lambda args: args[0].shape[-1],
    variants=lambda args: _score_mod_variants(args[0]))
_with_space("paged_attention", _decode_space, _decode_launch)
# The C++ decode's work split (split-KV partition, items per thread). The tuning inputs have
# fewer sequences than a 2-core machine wants items, so the split is what they exercise.
_with_cpu_knobs("paged_attention", "cpu_paged_decode")


# ----------------------------------------------------------------------------- sparse

def _sparse_inputs(d, device, gen):
    from frugal import masks

    n = 2048 if _gpu(device) else 512
    dtype = torch.bfloat16 if _gpu(device) else torch.float32
    q = torch.randn(1, 8, n, d, generator=gen).to(device, dtype)
    k = torch.randn(1, 2, n, d, generator=gen).to(device, dtype)
    v = torch.randn(1, 2, n, d, generator=gen).to(device, dtype)
    return q, k, v, masks.causal(n), d**-0.5


def _sparse_check(out, args, softcap=0.0, alibi_slopes=None):
    q, k, v, mask, scale = args

    def ref(a):
        return reference.sparse_attention(a[0], a[1], a[2], mask, scale, softcap=softcap or None,
                                          alibi_slopes=alibi_slopes)[0]

    return _attention_rule(out[0], (q, k, v), ref)


def _sparse_space(q, k, v, mask, scale, quick=False):
    from frugal.kernels import configs
    from frugal.kernels import sparse_attention as kernel

    table = kernel.table("fwd", q.dtype)
    bq, bk = mask.block_size
    return [(table, cfg) for cfg in configs.space(table, quick)
            if bq % cfg["BLOCK_M"] == 0 and bk % cfg["BLOCK_N"] == 0]


def _sparse_launch(q, k, v, mask, scale, softcap=0.0, alibi_slopes=None, *, config):
    from frugal.kernels import sparse_attention as kernel

    return kernel.forward(q, k, v, mask.layout(q.shape[0], q.shape[1], q.device), scale,
                          softcap, alibi_slopes, config=config)


registry.op("sparse_attention").tune = TuneSpec(
    dim="D", sizes=lambda quick, device: [128] if quick else [64, 128],
    inputs=_sparse_inputs, check=_sparse_check, size_of=lambda args: args[0].shape[-1],
    variants=lambda args: _score_mod_variants(args[0]))
_with_space("sparse_attention", _sparse_space, _sparse_launch)
