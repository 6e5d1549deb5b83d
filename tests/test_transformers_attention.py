"""frugal.integrations.transformers attention: logits and gradients of small random-weight
models of each family against transformers' own eager attention and a float64 reference
(FlashAttention's rule), the masks transformers asks for, the eager fallbacks and errors."""

import copy
import doctest
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers", minversion="5")
pytestmark = pytest.mark.usefixtures("one_thread")

from transformers import masking_utils as hf_masks  # noqa: E402

import frugal  # noqa: E402
from frugal import masks  # noqa: E402
from frugal.integrations import transformers as ft  # noqa: E402
from frugal.integrations.transformers import attention as ft_attention  # noqa: E402


def _tokens(shape, seed=1):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def _batch(n=150, pad=9):
    """Two sequences of n tokens (n > 128: two 128-blocks), the second right-padded by ``pad``
    (no query row is left without keys, so the float64 eager reference has no NaN)."""
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, n - pad:] = 0
    return _tokens((2, n)), mask


def _run(model, ids, mask, **kwargs):
    """Logits (float64) and every parameter's gradient of the masked LM loss."""
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), **kwargs)
    out.loss.backward()
    grads = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()
                       if p.grad is not None])
    return out.logits.detach().double(), grads


def _fallbacks(caught):
    return [str(w.message) for w in caught if issubclass(w.category, ft.FrugalFallbackWarning)]


def _frugal_copy(model):
    model = copy.deepcopy(model)
    return model, ft.apply_frugal(model)


def _meets_the_accuracy_rule(eager):
    """max |frugal - fp64| <= 2 max |eager fp32 - fp64| for the logits of real tokens and for
    every parameter's gradient, every layer on frugal (no fallback said at apply or run time);
    returns (ids, mask, the float64 logits, the eager model's logit error)."""
    reference = copy.deepcopy(eager).double()
    model, report = _frugal_copy(eager)
    assert model.config._attn_implementation == "frugal"
    ids, mask = _batch()
    ft_attention._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_grad = _run(model, ids, mask)
    ref, ref_grad = _run(reference, ids, mask)
    base, base_grad = _run(eager, ids, mask)
    real = mask.bool()
    err, base_err = (got - ref)[real].abs().max(), (base - ref)[real].abs().max()
    assert err <= 2 * base_err, (err, base_err)
    grad_err, base_grad_err = (got_grad - ref_grad).abs().max(), (base_grad - ref_grad).abs().max()
    assert grad_err <= 2 * base_grad_err, (grad_err, base_grad_err)
    assert report.fallbacks == {} and _fallbacks(caught) == []
    return ids, mask, ref, base_err


@pytest.mark.parametrize("family", list(ft.FAMILIES))
def test_logits_and_gradients_meet_the_accuracy_rule(family):
    """Each family on frugal against its float64 eager model: GQA (4 q heads, 2 kv heads),
    windows of 24 tokens where the family has them (every layer or alternating layers), 150
    tokens, right padding, Gemma-2's softcap of 50."""
    _meets_the_accuracy_rule(ft.tiny_model(family))


def test_gemma2_softcap_runs_on_frugal():
    """Gemma-2's logit softcap goes to frugal.sparse_attention, with a cap small enough for the
    tiny model's scores that it moves the logits far beyond the rule's tolerance."""
    ids, mask, ref, base_err = _meets_the_accuracy_rule(
        ft.tiny_model("gemma2", attn_logit_softcapping=0.05))
    with torch.no_grad():
        uncapped = ft.tiny_model("gemma2", attn_logit_softcapping=None)(
            ids, attention_mask=mask).logits.double()
    assert (uncapped - ref)[mask.bool()].abs().max() > 1000 * base_err


def test_windows_are_applied_per_layer():
    """A window that is ignored, or given to the wrong layers, would move the logits: Qwen2
    with window 24 on layer 1 only differs from the same model without windows, and frugal
    follows each layer."""
    eager = ft.tiny_model("qwen2")
    assert ft.apply_frugal(copy.deepcopy(eager)).windows == [None, 24]
    ids = _tokens((1, 100))
    no_window = ft.tiny_model("qwen2", use_sliding_window=False)
    model, _ = _frugal_copy(eager)
    with torch.no_grad():
        got, want, other = model(ids).logits, eager(ids).logits, no_window(ids).logits
    assert (got - want).abs().max() < 1e-5
    assert (want - other).abs().max() > 1e-3


def test_left_padding_and_packed_sequences_match_eager():
    eager = ft.tiny_model("mistral")
    model, _ = _frugal_copy(eager)
    ids, mask = _tokens((2, 77)), torch.ones(2, 77, dtype=torch.long)
    mask[1, :13] = 0  # left padding, as in batched generation
    # Two packed sequences (transformers detects them from position_ids without a cache).
    positions = torch.cat([torch.arange(30), torch.arange(47)])[None]
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
        assert (got - want)[mask.bool()].abs().max() < 1e-5
        got = model(ids[:1], position_ids=positions, use_cache=False).logits
        first, second = eager(ids[:1, :30]).logits, eager(ids[:1, 30:]).logits
    assert (got - torch.cat([first, second], 1)).abs().max() < 1e-5


def _mask_cases():
    causal, packed = hf_masks.causal_mask_function, torch.tensor([[0] * 70 + [1] * 80])
    window = hf_masks.sliding_window_causal_mask_function(24)
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[0, :11] = False
    return {
        "causal": dict(mask_function=causal),
        "window": dict(mask_function=window, local_size=24),
        "padding": dict(mask_function=causal, attention_mask=pad, batch_size=2),
        "decode": dict(mask_function=window, q_length=1, q_offset=149, attention_mask=pad,
                       batch_size=2),
        "chunk": dict(mask_function=causal, q_length=37, q_offset=113),
        "packed": dict(mask_function=hf_masks.and_masks(
            hf_masks.remap_positions_for_packed_sequence(
                window, torch.cat([torch.arange(70), torch.arange(80)])[None]),
            hf_masks.packed_sequence_mask_function(packed))),
    }


@pytest.mark.parametrize("case", list(_mask_cases()))
def test_masks_are_exact_and_built_from_rules(case):
    """Each mask transformers builds from plain parts becomes a rule-based BlockMask (no
    dense Nq x Nk tensor) equal to transformers' own dense mask."""
    kwargs = dict(batch_size=1, q_length=150, kv_length=150, q_offset=0, kv_offset=0)
    kwargs.update(_mask_cases()[case])
    assert ft_attention._rule(kwargs["mask_function"]) is not None
    mask = ft.FrugalMask(**kwargs)
    block = mask.block_mask()
    assert block._bits is None  # rule-based: no per-element bitmask
    want = mask.dense()
    assert torch.equal(block.to_dense().expand_as(want), want)


def test_unknown_masks_are_evaluated_densely_and_exactly():
    """A chunked mask (Llama 4) passes local_size like a window; it must not be read as one."""
    chunked = hf_masks.chunked_causal_mask_function(32, torch.zeros(1, dtype=torch.long))
    kwargs = dict(batch_size=1, q_length=100, kv_length=100, mask_function=chunked,
                  local_size=32, allow_is_causal_skip=True)
    assert ft_attention._rule(chunked) is None
    mask = ft.FrugalMask(**kwargs)
    assert torch.equal(mask.block_mask().to_dense(), mask.dense())


def test_a_user_block_mask_replaces_the_models_mask():
    """frugal_mask (a BlockMask or layer -> BlockMask) is the whole mask: here causal within two
    documents, against eager given the same mask as a 4-d tensor; gradients flow."""
    eager = ft.tiny_model("llama")
    model, _ = _frugal_copy(eager)
    ids = _tokens((1, 140))
    mask = masks.causal(140) & masks.document(torch.tensor([0] * 60 + [1] * 80))
    dense = mask.to_dense()  # [1, 1, 140, 140]
    additive = torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)
    got = model(ids, frugal_mask=lambda layer: mask).logits
    got.sum().backward()
    want = eager(ids, attention_mask=additive).logits
    assert (got - want).abs().max() < 1e-5
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="frugal_mask must be a frugal.BlockMask"):
        model(ids, frugal_mask="causal")
    with pytest.raises(TypeError, match=r"frugal_mask\(0\) must return a frugal.BlockMask"):
        model(ids, frugal_mask=lambda layer: None)
    with pytest.raises(frugal.ShapeError, match="mask was built for"):
        model(ids, frugal_mask=masks.causal(64))


def test_head_dims_the_sparse_op_does_not_take_fall_back_to_eager_and_say_so():
    eager = ft.tiny_model("llama", head_dim=12)  # not a multiple of 8
    model, report = _frugal_copy(eager)
    assert report.fallbacks == {0: report.fallbacks[0], 1: report.fallbacks[1]}
    assert "head_dim 12 is not a multiple of 8" in report.fallbacks[0] and "eager" in str(report)
    ids = _tokens((1, 50))
    ft_attention._warned.clear()
    with pytest.warns(ft.FrugalFallbackWarning, match="head_dim 12"):
        got = model(ids).logits
    assert torch.equal(got, eager(ids).logits)


def test_head_dim_80_runs_on_frugal():
    """Phi-2 / StableLM's head dim: frugal's own attention (no fallback), logits by the
    accuracy rule against float64."""
    eager = ft.tiny_model("llama", head_dim=80)
    reference = copy.deepcopy(eager).double()
    model, report = _frugal_copy(eager)
    assert not report.fallbacks
    ids, mask = _batch()
    got, ref, base = (_run(m, ids, mask)[0] for m in (model, reference, eager))
    real = mask.bool()
    assert (got - ref)[real].abs().max() <= 2 * (base - ref)[real].abs().max()


def test_attention_weights_asked_for_come_from_eager():
    eager = ft.tiny_model("qwen3")
    model, _ = _frugal_copy(eager)
    ids = _tokens((1, 30))
    ft_attention._warned.clear()
    with pytest.warns(ft.FrugalFallbackWarning, match="output_attentions=True"):
        got = model(ids, output_attentions=True).attentions
    want = eager(ids, output_attentions=True).attentions
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_transformers_generate_runs_on_frugal_attention():
    """transformers' own generate (its dense cache; decode steps are Nq = 1 against Nk keys)
    gives the same greedy tokens on frugal attention as on eager attention."""
    eager = ft.tiny_model("gemma3")
    eager.generation_config.eos_token_id = None
    model, _ = _frugal_copy(eager)
    prompt = _tokens((1, 41))
    want = eager.generate(prompt, max_new_tokens=30, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=30, do_sample=False), want)


def test_int8_weights_on_the_same_model():
    eager = ft.tiny_model("llama")
    model = copy.deepcopy(eager)
    report = ft.apply_frugal(model, int8_weights=True)
    assert report.quantize.skipped == {"lm_head": "matched skip"}
    assert len(report.quantize.swapped) == 2 * 7
    assert isinstance(model.model.layers[0].mlp.down_proj, frugal.Int8Linear)
    ids = _tokens((1, 60))
    with torch.no_grad():
        got, want = model(ids).logits, eager(ids).logits
    # int8 per-token x per-channel error of 14 layers (7% measured), well under the spread
    assert (got - want).abs().max() < 0.15 * want.std()


def test_apply_frugal_errors_name_the_problem():
    with pytest.raises(TypeError, match="must be a transformers PreTrainedModel; got Linear"):
        ft.apply_frugal(torch.nn.Linear(2, 2))

    class NoInterface(ft.tiny_model("llama").__class__):
        _supports_attention_backend = False

    model = NoInterface(ft.tiny_config("llama"))
    with pytest.raises(TypeError, match="does not call transformers' attention interface"):
        ft.apply_frugal(model)


def test_importing_frugal_does_not_import_transformers(tmp_path):
    code = "import sys, frugal; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


@pytest.mark.parametrize("module", ["attention", "paged", "generator", "tiny"])
def test_docstring_examples(module):
    mod = __import__(f"frugal.integrations.transformers.{module}", fromlist=["_"])
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
