"""Small random-weight models of the decoder families frugal serves, built from configs (no
download): for tests, benchmarks and examples."""

import torch
import transformers

# Per family: the config class and what makes its attention what the family is (windows,
# alternating layer types, softcap). head_dim 32 everywhere (hidden 128, 4 heads), GQA 4:2.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 24}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 24,
                              "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {"head_dim": 32}),
    "gemma2": ("Gemma2Config", {"head_dim": 32, "sliding_window": 24}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 32, "sliding_window": 24,
                                    "sliding_window_pattern": 2}),
    "phi3": ("Phi3Config", {}),
}

_COMMON = dict(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(family, **overrides):
    """The config of a small ``family`` model (see :data:`FAMILIES`), with ``overrides``.

    Example
    -------
    >>> tiny_config("mistral").sliding_window
    24
    """
    if family not in FAMILIES:
        raise ValueError(f"tiny_config: family must be one of {sorted(FAMILIES)}; got "
                         f"{family!r}")
    name, extra = FAMILIES[family]
    return getattr(transformers, name)(**{**_COMMON, **extra, **overrides})


def tiny_model(family, *, seed=0, dtype=torch.float32, attn_implementation="eager",
               **overrides):
    """A ``family`` causal LM with weights drawn from ``seed``, in eval mode.

    Example
    -------
    >>> tiny_model("llama", num_hidden_layers=1).config.num_hidden_layers
    1
    """
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()
