"""frugal as a transformers attention backend: ``attn_implementation="frugal"``.

transformers' decoder models call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` in
every attention layer with q [B, Hq, Nq, D] (rotary applied), k, v [B, Hkv, Nk, D] and the mask
the model built for the layer's type (full or sliding) through ``ALL_MASK_ATTENTION_FUNCTIONS``.
Both are registered here under "frugal":

- the mask builder returns a :class:`FrugalMask`, which keeps what the model asked for unbuilt:
  no Nq x Nk tensor is made for the masks frugal knows (causal, sliding window, padding,
  packed sequences); anything else is evaluated densely with transformers' own builder and
  converted exactly (:meth:`frugal.BlockMask.from_dense`);
- :func:`frugal_attention` runs a paged step when the forward carries one (keyword
  ``frugal_step``, see :mod:`.paged`), else :func:`frugal.sparse_attention` (gradients flow),
  else -- for what the sparse op does not take, or when the attention weights are asked for --
  the model's own eager attention, with a :class:`FrugalFallbackWarning` that says why.
"""

import dataclasses
import sys
import warnings

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers import masking_utils as hf_masks
from transformers.models.llama import modeling_llama

from frugal import masks
from frugal.block_mask import BlockMask
from frugal.nn import quantize_model
from frugal.sparse_attention import HEAD_DIMS

NAME = "frugal"
STEP_KWARG = "frugal_step"
MASK_KWARG = "frugal_mask"
SPARSE = "frugal.sparse_attention"
_SPARSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FrugalFallbackWarning(UserWarning):
    """A layer ran the model's eager attention instead of frugal's; the message says why."""


# ---------------------------------------------------------------------------------------------
# Masks


def _made_by(fn, builder):
    """Whether ``fn`` is a closure made by ``transformers.masking_utils.<builder>``."""
    inner = "and_mask" if builder == "and_masks" else "inner_mask"
    return (getattr(fn, "__module__", None) == hf_masks.__name__
            and getattr(fn, "__qualname__", None) == f"{builder}.<locals>.{inner}")


def _closure(fn):
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


@dataclasses.dataclass(frozen=True)
class _Rule:
    window: object  # None (causal) or int (sliding window of that many keys)
    doc_ids: object  # None or int [B, N]: packed sequences


def _rule(fn):
    """The :class:`_Rule` of a mask function transformers built from its plain parts (causal;
    sliding window; either over packed sequences), or None for anything else. Only exact
    structural matches count: an unknown mask is never guessed, it is evaluated densely."""
    if fn is hf_masks.causal_mask_function:
        return _Rule(None, None)
    if not _made_by(fn, "and_masks"):
        return None
    parts = _closure(fn).get("mask_functions", ())
    if len(parts) != 2:
        return None
    first, second = parts
    if second is hf_masks.causal_mask_function and _made_by(first, "sliding_window_overlay"):
        return _Rule(_closure(first)["sliding_window"], None)
    if (_made_by(first, "remap_positions_for_packed_sequence")
            and _made_by(second, "packed_sequence_mask_function")):
        # Positions rise by one inside a packed sequence (that is how transformers finds the
        # sequences), so causal or windowed on positions is the same on indices there.
        inner = _rule(_closure(first)["mask_function"])
        if inner is not None and inner.doc_ids is None:
            return _Rule(inner.window, _closure(second)["packed_sequence_mask"])
    return None


class FrugalMask:
    """The mask a transformers model asked for (the keyword arguments of its mask builder,
    e.g. ``create_causal_mask``), kept unbuilt until an attention layer needs it.

    :meth:`block_mask` gives the exact :class:`frugal.BlockMask` (built once, shared by the
    layers of its type); :meth:`dense` gives transformers' own bool mask [B, 1, Nq, Nk].

    Example
    -------
    >>> from transformers import masking_utils as hf
    >>> m = FrugalMask(batch_size=1, q_length=300, kv_length=300,
    ...                mask_function=hf.causal_mask_function)
    >>> bool((m.block_mask().to_dense()[0, 0] == m.dense()[0, 0]).all())
    True
    """

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self._block_mask = None

    def block_mask(self):
        if self._block_mask is None:
            self._block_mask = self._build()
        return self._block_mask

    def dense(self):
        """transformers' bool mask [B, 1, Nq, Nk] (True: attend), built as for SDPA."""
        kwargs = dict(self.kwargs, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        kwargs.setdefault("mask_function", hf_masks.causal_mask_function)
        return hf_masks.sdpa_mask(**kwargs)

    def _build(self):
        kw = self.kwargs
        b, nq, nk = kw["batch_size"], kw["q_length"], kw["kv_length"]
        q_off, kv_off = kw.get("q_offset", 0), kw.get("kv_offset", 0)
        rule = _rule(kw.get("mask_function", hf_masks.causal_mask_function))
        # frugal's masks align the last query with the last key (bottom-right).
        aligned = (isinstance(q_off, int) and isinstance(kv_off, int)
                   and q_off - kv_off == nk - nq)
        if rule is None or not aligned:
            return BlockMask.from_dense(self.dense())
        mask = (masks.causal(nq, nk) if rule.window is None
                else masks.sliding_window(nq, int(rule.window), nk))
        if rule.doc_ids is not None:
            mask = mask & masks.document(rule.doc_ids)
        pad = hf_masks.prepare_padding_mask(kw.get("attention_mask"), nk, kv_off)
        if pad is not None:
            keep = pad[:, kv_off:kv_off + nk].bool()
            if not bool(keep.all()):
                # Padded keys get a document of their own that no query belongs to.
                mask = mask & masks.document(torch.zeros(b, nq, dtype=torch.int32),
                                             (~keep).to(torch.int32))
        return mask


# ---------------------------------------------------------------------------------------------
# Attention

_warned = set()


def _warn_once(module, why):
    key = (type(module).__name__, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"frugal: {type(module).__name__}: {why}; this layer runs the model's "
                      f"eager attention", FrugalFallbackWarning, stacklevel=3)


def sparse_why_not(head_dim, dtype=None, dropout=0.0):
    """Why :func:`frugal.sparse_attention` cannot run a layer with these settings, or None
    (a logit softcap, Gemma-2's, it runs)."""
    if head_dim not in HEAD_DIMS:
        return (f"head_dim {head_dim} is not a multiple of 8 in [8, 256] (what "
                f"frugal.sparse_attention takes)")
    if dropout:
        return (f"attention dropout p={dropout} is not in frugal.sparse_attention (model.eval() "
                f"or config.attention_dropout=0 for frugal)")
    if dtype is not None and dtype not in _SPARSE_DTYPES:
        return f"dtype {dtype} is not float32, float16 or bfloat16"
    return None


def _additive_biases(mask):
    """Whether a float mask adds scores other than 0 and the masking minimum (ALiBi-like)."""
    return bool(((mask != 0) & (mask > torch.finfo(mask.dtype).min / 2)).any())


def _user_mask(mask, layer_idx):
    if isinstance(mask, BlockMask):
        return mask
    if callable(mask):
        made = mask(layer_idx)
        if isinstance(made, BlockMask):
            return made
        raise TypeError(f"frugal_attention: frugal_mask({layer_idx}) must return a "
                        f"frugal.BlockMask; got {type(made).__name__}")
    raise TypeError(f"frugal_attention: frugal_mask must be a frugal.BlockMask or a callable "
                    f"layer_idx -> BlockMask; got {type(mask).__name__}")


def _block_mask(attention_mask, nq, nk, sliding_window):
    if isinstance(attention_mask, FrugalMask):
        return attention_mask.block_mask()
    if attention_mask is None:
        return (masks.causal(nq, nk) if sliding_window is None
                else masks.sliding_window(nq, int(sliding_window), nk))
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return BlockMask.from_dense(allowed)
    raise TypeError(f"frugal_attention: attention_mask must be a FrugalMask, None or a 4-d "
                    f"tensor; got {type(attention_mask).__name__}"
                    + (f" of shape {tuple(attention_mask.shape)}"
                       if isinstance(attention_mask, torch.Tensor) else ""))


def _eager(module, why, query, key, value, attention_mask, user_mask, scaling, dropout,
           sliding_window, softcap, kwargs):
    """The model's own eager attention (softcap and all) over the exact same mask."""
    _warn_once(module, why)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward",
                    modeling_llama.eager_attention_forward)
    nq, nk = query.shape[2], key.shape[2]
    if user_mask is not None:
        allowed = user_mask.to_dense()
    elif isinstance(attention_mask, FrugalMask):
        allowed = attention_mask.dense()
    elif attention_mask is None:
        allowed = _block_mask(None, nq, nk, sliding_window).to_dense()
    else:
        allowed = attention_mask
    if allowed.dtype == torch.bool:
        low = torch.finfo(query.dtype).min
        allowed = torch.zeros((), dtype=query.dtype).masked_fill(~allowed.cpu(), low)
    extra = {} if softcap is None else {"softcap": softcap}
    return eager(module, query, key, value, allowed.to(query.device), scaling=scaling,
                 dropout=dropout, sliding_window=sliding_window, **extra, **kwargs)


def frugal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, **kwargs):
    """transformers' attention function signature, served by frugal.

    Parameters
    ----------
    module : the model's attention module (``layer_idx``, ``head_dim``).
    query : Tensor [B, Hq, Nq, D]; key, value : Tensor [B, Hkv, Nk, D].
    attention_mask : FrugalMask (the model built it through the "frugal" mask interface), a
        4-d bool or additive mask, or None (causal).
    scaling, dropout, sliding_window, softcap : as the model passes them.
    kwargs : the forward's keyword arguments; ``frugal_step`` (a paged step of
        :class:`.paged.PagedStep`) sends the layer through the paged KV-cache,
        ``frugal_mask`` (a BlockMask, or ``layer_idx -> BlockMask``) replaces the model's mask
        (causal, window and padding included).

    Returns
    -------
    (out [B, Nq, Hq, D], None): no attention weights.
    """
    step = kwargs.pop(STEP_KWARG, None)
    user = kwargs.pop(MASK_KWARG, None)
    if step is not None:
        return step.attend(module, query, key, value, scaling=scaling, dropout=dropout,
                           sliding_window=sliding_window, softcap=softcap), None
    if user is not None:
        user = _user_mask(user, module.layer_idx)
    why = sparse_why_not(query.shape[-1], query.dtype, dropout)
    if why is None and kwargs.get("output_attentions"):
        why = "output_attentions=True needs the attention weights, which frugal does not form"
    if (why is None and user is None and isinstance(attention_mask, torch.Tensor)
            and attention_mask.dtype != torch.bool and _additive_biases(attention_mask)):
        why = "the attention mask adds biases other than 0 and -inf"
    if why is not None:
        return _eager(module, why, query, key, value, attention_mask, user, scaling, dropout,
                      sliding_window, softcap, kwargs)
    from frugal.sparse_attention import sparse_attention

    mask = user if user is not None else _block_mask(attention_mask, query.shape[2],
                                                     key.shape[2], sliding_window)
    out = sparse_attention(query, key, value, mask, scale=scaling, softcap=softcap)
    return out.transpose(1, 2), None


AttentionInterface.register(NAME, frugal_attention)
hf_masks.AttentionMaskInterface.register(NAME, FrugalMask)


# ---------------------------------------------------------------------------------------------
# The model


def attention_layers(model):
    """The attention modules of a transformers model, in layer order."""
    found = [m for m in model.modules()
             if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "head_dim")
             and hasattr(m, "scaling")]
    return sorted(found, key=lambda m: m.layer_idx)


def layer_window(module, config):
    """The sliding window a layer's attention passes (None: full causal attention)."""
    if "sliding_window" in vars(module):  # per-layer (Qwen2/3, Gemma-2/3 layer_types)
        return module.sliding_window
    return getattr(config, "sliding_window", None)  # every layer (Mistral, Phi-3)


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_model(op, model):
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{op}: model must be a transformers PreTrainedModel; got "
                        f"{type(model).__name__}")
    if not type(model)._supports_attention_backend:
        raise TypeError(f"{op}: {type(model).__name__} does not call transformers' attention "
                        f"interface (_supports_attention_backend is False), so frugal cannot "
                        f"serve its attention")
    if not attention_layers(model):
        raise TypeError(f"{op}: found no attention layers (modules with layer_idx, head_dim and "
                        f"scaling) in {type(model).__name__}")


@dataclasses.dataclass
class FrugalReport:
    """What :func:`apply_frugal` did.

    Attributes
    ----------
    model : str, the model's class name.
    attention : dict layer index -> "frugal.sparse_attention" or "eager: <why>".
    windows : list, per layer, of the sliding window (None: full causal attention).
    quantize : QuantizeReport or None (int8 weights not asked for).
    """

    model: str
    attention: dict
    windows: list
    quantize: object = None

    @property
    def fallbacks(self):
        """{layer: why} for the layers that run eager attention."""
        return {i: how[len("eager: "):] for i, how in self.attention.items()
                if how.startswith("eager: ")}

    def __str__(self):
        served = sum(how == SPARSE for how in self.attention.values())
        lines = [f"{self.model}: {served}/{len(self.attention)} attention layers on {SPARSE}"]
        lines += [f"  layer {i}: eager ({why})" for i, why in self.fallbacks.items()]
        windowed = {w for w in self.windows if w is not None}
        if windowed:
            lines.append(f"  sliding windows: {self.windows}")
        if self.quantize is not None:
            lines.append("  " + str(self.quantize).replace("\n", "\n  "))
        return "\n".join(lines)


def apply_frugal(model, *, int8_weights=False, skip=("lm_head",), mode="dynamic"):
    """Makes a transformers decoder model run on frugal, in place: attention through
    :func:`frugal.sparse_attention` (training, prefill, ``model.generate``) and, for the
    paged generation of :class:`BatchGenerator`, through :class:`frugal.PagedKVCache`.

    Parameters
    ----------
    model : a transformers ``PreTrainedModel`` whose attention goes through transformers'
        attention interface (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2/3, Phi-3, ...).
    int8_weights : bool, swap nn.Linear layers for :class:`frugal.Int8Linear`
        (:func:`frugal.quantize_model`).
    skip, mode : passed to :func:`frugal.quantize_model` (default: lm_head stays float).

    Returns
    -------
    FrugalReport : per layer, frugal or the eager fallback and why (head dims that are not
        a multiple of 8 up to 256, attention dropout in training); the windows; the
        quantization report.

    Example
    -------
    >>> from frugal.integrations.transformers import tiny_model
    >>> model = tiny_model("llama")
    >>> print(apply_frugal(model))
    LlamaForCausalLM: 2/2 attention layers on frugal.sparse_attention
    """
    op = "apply_frugal"
    check_model(op, model)
    config = text_config(model)
    model.set_attn_implementation(NAME)
    attention, windows = {}, []
    dropout = getattr(config, "attention_dropout", 0.0) if model.training else 0
    for layer in attention_layers(model):
        why = sparse_why_not(layer.head_dim, None, dropout)
        attention[layer.layer_idx] = SPARSE if why is None else f"eager: {why}"
        windows.append(layer_window(layer, config))
    report = FrugalReport(type(model).__name__, attention, windows)
    if int8_weights:
        report.quantize = quantize_model(model, skip=skip, mode=mode)
    return report


__all__ = ["FrugalFallbackWarning", "FrugalMask", "FrugalReport",
           "apply_frugal", "frugal_attention"]
