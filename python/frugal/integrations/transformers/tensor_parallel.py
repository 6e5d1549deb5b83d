"""Tensor parallelism for transformers decoder models over ``torch.distributed`` (Megatron's
split: attention heads and MLP columns per rank, one all-reduce after each block's output
projection).

Rank r of W keeps query heads ``[r Hq/W, (r+1) Hq/W)`` and kv heads ``[r Hkv/W, (r+1) Hkv/W)``
(GQA groups stay whole), the matching rows of q/k/v projections and columns of o_proj, and
the r-th slice of the MLP's intermediate size in gate/up (rows) and down (columns). o_proj and
down_proj then give partial sums, added up by ``all_reduce`` before the bias. Embeddings, norms
and lm_head are replicated, so every rank computes the same logits and samples the same
tokens (seed the samplers alike); each rank's paged KV-cache holds its own kv heads. Works with
gloo on CPUs and NCCL on GPUs.
"""

import torch
import torch.distributed as dist
from torch import nn

from frugal.errors import ShapeError

from .attention import attention_layers, check_model, text_config

_QKV = ("q_proj", "k_proj", "v_proj")
_MLP_IN = ("gate_proj", "up_proj")


class RowParallelLinear(nn.Module):
    """A linear layer whose input features are split over the ranks of ``group``: each rank
    multiplies its slice, ``all_reduce`` sums the partial outputs, then the bias is added once.
    ``linear`` (no bias) is a child, so :func:`frugal.quantize_model` can swap it."""

    def __init__(self, linear, bias, group=None):
        super().__init__()
        self.linear, self.group = linear, group
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        y = self.linear(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def _take_rows(linear, pieces):
    """nn.Linear keeping the output rows ``pieces`` (list of (start, stop)), in order."""
    rows = torch.cat([torch.arange(a, b) for a, b in pieces])
    out = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[rows])
    return out


def _take_columns(linear, start, stop, group):
    out = nn.Linear(stop - start, linear.out_features, bias=False, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, start:stop])
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return RowParallelLinear(out, bias, group)


def _slice(n, rank, world):
    step = n // world
    return rank * step, (rank + 1) * step


def _split_attention(op, attn, hq, hkv, rank, world, group):
    d = attn.head_dim
    q0, q1 = _slice(hq, rank, world)
    k0, k1 = _slice(hkv, rank, world)
    if all(hasattr(attn, n) for n in _QKV):
        attn.q_proj = _take_rows(attn.q_proj, [(q0 * d, q1 * d)])
        attn.k_proj = _take_rows(attn.k_proj, [(k0 * d, k1 * d)])
        attn.v_proj = _take_rows(attn.v_proj, [(k0 * d, k1 * d)])
    elif hasattr(attn, "qkv_proj"):  # fused [q heads; k heads; v heads] rows (Phi-3)
        k_base, v_base = hq * d, (hq + hkv) * d
        attn.qkv_proj = _take_rows(attn.qkv_proj, [(q0 * d, q1 * d),
                                                   (k_base + k0 * d, k_base + k1 * d),
                                                   (v_base + k0 * d, v_base + k1 * d)])
    else:
        raise TypeError(f"{op}: {type(attn).__name__} has neither q_proj/k_proj/v_proj nor "
                        f"qkv_proj; its heads cannot be split")
    if not isinstance(getattr(attn, "o_proj", None), nn.Linear):
        raise TypeError(f"{op}: {type(attn).__name__} has no nn.Linear o_proj")
    attn.o_proj = _take_columns(attn.o_proj, q0 * d, q1 * d, group)
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = k1 - k0


def _mlp_size(op, mlp, world):
    """(fused gate_up?, intermediate size) of an MLP, checked before anything is split."""
    fused = not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in _MLP_IN)
    if fused and not isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear):
        raise TypeError(f"{op}: {type(mlp).__name__} has neither gate_proj/up_proj nor "
                        f"gate_up_proj nn.Linear layers; its columns cannot be split")
    size = mlp.gate_up_proj.out_features // 2 if fused else mlp.up_proj.out_features
    if size % world:
        raise ShapeError(f"{op}: the MLP's intermediate size {size} must be a multiple of the "
                         f"world size {world}")
    return fused, size


def _split_mlp(mlp, fused, size, rank, world, group):
    a, b = _slice(size, rank, world)
    if fused:  # rows [gate; up] (Phi-3)
        mlp.gate_up_proj = _take_rows(mlp.gate_up_proj, [(a, b), (size + a, size + b)])
    else:
        mlp.gate_proj = _take_rows(mlp.gate_proj, [(a, b)])
        mlp.up_proj = _take_rows(mlp.up_proj, [(a, b)])
    mlp.down_proj = _take_columns(mlp.down_proj, a, b, group)


def tensor_parallel(model, group=None):
    """Splits a transformers decoder model over the ranks of ``group`` (default: the world),
    in place: this rank keeps its attention heads and MLP columns (module docstring).

    Call it on every rank, on the same weights, after ``dist.init_process_group``; then use
    the model as before (``apply_frugal``, :class:`BatchGenerator`, ``quantize_model``).
    The config's head counts become this rank's.

    Raises ShapeError when the kv heads (hence the query heads) or the MLP's intermediate size
    do not divide by the world size, TypeError for layers other than q/k/v (or qkv), o_proj and
    gate/up (or gate_up), down_proj.

    Example (two processes)::

        dist.init_process_group("gloo")         # torchrun --nproc-per-node 2 ...
        model = tiny_model("llama")             # same weights on every rank
        tensor_parallel(model)
        out = generate(model, prompts)          # the same tokens on every rank
    """
    op = "tensor_parallel"
    check_model(op, model)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    config = text_config(model)
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    if hkv % world:
        raise ShapeError(f"{op}: num_key_value_heads {hkv} must be a multiple of the world size "
                         f"{world} (each rank keeps whole GQA groups)")
    layers = attention_layers(model)
    mlps = [m for name, m in model.named_modules() if name.endswith(".mlp")]
    if len(mlps) != len(layers):
        raise TypeError(f"{op}: expected one .mlp per attention layer; found {len(mlps)} for "
                        f"{len(layers)} layers")
    sizes = [_mlp_size(op, mlp, world) for mlp in mlps]  # every check before any change
    for attn in layers:
        _split_attention(op, attn, hq, hkv, rank, world, group)
    for mlp, (fused, size) in zip(mlps, sizes):
        _split_mlp(mlp, fused, size, rank, world, group)
    config.num_attention_heads, config.num_key_value_heads = hq // world, hkv // world
    return model
