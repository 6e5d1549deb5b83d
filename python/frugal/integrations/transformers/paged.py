"""A transformers causal LM over a :class:`frugal.PagedKVCache`: one forward per step.

A step packs the new tokens of all its sequences into one row (input_ids [1, N], each
sequence's rotary positions given by position_ids), plans it once (``cache.plan``: block
allocation, copy-on-write, window trims, slot mapping and tables, all host work) and passes the
plan to every attention layer through the forward's ``frugal_step`` keyword, where
:meth:`PagedStep.attend` runs ``plan.run(layer, q, k, v)``: no host work or sync per layer.
Prefill chunks and decode tokens of different sequences share a step (chunked prefill).
"""

import dataclasses

import torch

from frugal.errors import BackendError, DTypeError, ShapeError
from frugal.paged_kv_cache import PagedKVCache

from .attention import NAME, STEP_KWARG, attention_layers, check_model, layer_window, text_config


class PagedStep:
    """One planned step as the attention layers see it (the forward's ``frugal_step``).

    Layers whose window differs from the plan's (Gemma-2/3 and Qwen2 mix windowed and full
    layers) run a copy of the plan with their window, made once per step and window: every
    copy shares the plan's slot mapping, tables and lengths.
    """

    def __init__(self, plan):
        self.plan = plan
        self._plans = {plan.window or None: plan}

    def _plan_for(self, window):
        plan = self._plans.get(window)
        if plan is None:
            # Own implementation and workspace tables (replace() re-selects the implementations
            # into them): the split-KV workspace's size depends on the window.
            plan = self._plans[window] = dataclasses.replace(
                self.plan, window=window or 0, _impls={}, _workspaces={})
        return plan

    def attend(self, module, query, key, value, *, scaling=None, dropout=0.0,
               sliding_window=None, softcap=None):
        """``plan.run`` of the module's layer: query [1, Hq, N, D], key/value [1, Hkv, N, D]
        (the step's N packed tokens) -> [1, N, Hq, D]; ``softcap`` (Gemma-2's attention logit
        cap) goes to the kernels."""
        op = "PagedStep.attend"
        if dropout:
            raise BackendError(f"{op}: attention dropout p={dropout} in generation; call "
                               f"model.eval() first")
        if query.shape[0] != 1:
            raise ShapeError(f"{op}: a paged step packs its tokens in one row: query must be "
                             f"[1, Hq, N, D]; got {tuple(query.shape)}")
        window = self.plan.cache.window
        if window is not None and (sliding_window is None or sliding_window > window):
            raise ValueError(f"{op}: layer {module.layer_idx} attends to "
                             f"{sliding_window or 'all'} past tokens but the cache keeps only "
                             f"the last {window}: build the cache with window=None")
        plan = self._plan_for(sliding_window)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        return plan.run(module.layer_idx, q, k, v, scale=scaling, softcap=softcap)[None]


class PagedModel:
    """A transformers causal LM (frugal attention) and the paged KV-cache of its layers.

    Parameters
    ----------
    model : a transformers decoder model; its attention implementation is set to "frugal".
    num_blocks, block_size : the cache's size (tokens = num_blocks * block_size, shared by
        all sequences).
    kv_dtype : the cache dtype: the model's (default) or torch.int8 (per-token, per-head
        scales).
    window : "auto" (default): the model's sliding window when every layer has the same one,
        so blocks that slide out of it are given back; None keeps every token.

    Attributes
    ----------
    cache : frugal.PagedKVCache; windows : list, per layer, of the window it attends with.

    Example
    -------
    >>> from frugal.integrations.transformers import tiny_model
    >>> model = tiny_model("llama")
    >>> paged = PagedModel(model, num_blocks=8)
    >>> paged.cache.add_sequence("a")
    0
    >>> paged.forward(["a"], [[1, 2, 3]], [0]).shape          # logits of the last token
    torch.Size([1, 128])
    """

    def __init__(self, model, num_blocks, block_size=16, kv_dtype=None, window="auto"):
        op = "PagedModel"
        check_model(op, model)
        config = text_config(model)
        layers = attention_layers(model)
        if [m.layer_idx for m in layers] != list(range(len(layers))):
            raise ShapeError(f"{op}: attention layers must be numbered 0..{len(layers) - 1}; "
                             f"got {[m.layer_idx for m in layers]}")
        head_dims = {m.head_dim for m in layers}
        if len(head_dims) != 1:
            raise ShapeError(f"{op}: every layer must have the same head_dim for one cache; got "
                             f"{sorted(head_dims)}")
        param = next(model.parameters())
        kv_dtype = param.dtype if kv_dtype is None else kv_dtype
        if kv_dtype not in (param.dtype, torch.int8):
            raise DTypeError(f"{op}: kv_dtype must be the model's dtype {param.dtype} or "
                             f"torch.int8; got {kv_dtype}")
        self.windows = [layer_window(m, config) for m in layers]
        if window == "auto":
            window = self.windows[0] if len(set(self.windows)) == 1 else None
        model.set_attn_implementation(NAME)
        self.model = model
        self.device = param.device
        self.cache = PagedKVCache(len(layers), num_blocks, block_size, config.num_key_value_heads,
                                  head_dims.pop(), dtype=kv_dtype, device=self.device,
                                  window=window)

    def forward(self, seq_ids, token_ids, starts, logits_of=None):
        """Runs one step: appends ``token_ids[i]`` (a list of ids, at positions ``starts[i]``,
        ``starts[i] + 1``, ...) to sequence ``seq_ids[i]`` in every layer and returns the
        logits [len(logits_of), vocab] of the last new token of the sequences at the indices
        ``logits_of`` (default: all), as float32 on the CPU. Raises CacheFullError, with
        nothing changed, when the cache lacks the blocks."""
        counts = [len(t) for t in token_ids]
        flat = [t for ids in token_ids for t in ids]
        plan = self.cache.plan(list(seq_ids), num_tokens=counts, token_ids=flat)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)])
        ends = torch.tensor(counts).cumsum(0) - 1
        if logits_of is not None:
            ends = ends[list(logits_of)]
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(flat, device=self.device)[None],
                             position_ids=positions.to(self.device)[None], use_cache=False,
                             logits_to_keep=ends.to(self.device),
                             **{STEP_KWARG: PagedStep(plan)})
        return out.logits[0].float().cpu()  # one transfer a step: sampling runs on the host
