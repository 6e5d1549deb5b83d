"""Paged generation of transformers models (frugal.integrations.transformers): greedy tokens
against transformers' own generate on the same weights, and each behaviour of the
BatchGenerator (continuous batching, chunked prefill, prefix reuse, fork, sampling, stop
tokens, budgets, a full cache, sliding-window eviction, int8 KV)."""

import copy
import pathlib
import re
import types

import pytest
import torch

pytest.importorskip("transformers", minversion="5")
pytestmark = pytest.mark.usefixtures("one_thread")

import frugal  # noqa: E402
from frugal.integrations import transformers as ft  # noqa: E402

GREEDY = ft.SamplingParams(max_new_tokens=12, stop_token_ids=())


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, new_tokens):
    """transformers' generate on its own eager attention and dense cache, one prompt alone."""
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ft.FAMILIES)
def test_greedy_tokens_equal_transformers_generate(family):
    """Mixed odd prompt lengths decoded together, prompts split into chunks of at most 32
    tokens (chunked prefill beside decodes), GQA; windows where the family has them (Mistral:
    every layer, the cache gives blocks back; Qwen2, Gemma-2/3: some layers); Gemma-2's
    attention logit softcap in the paged kernels."""
    eager = ft.tiny_model(family)
    prompts = _prompts([5, 61, 17, 40])
    out = ft.generate(copy.deepcopy(eager), prompts, GREEDY, max_step_tokens=32)
    for prompt, completion in zip(prompts, out):
        assert completion.token_ids == _hf_greedy(eager, prompt, 12)
        assert completion.samples[0].finish_reason == "length"


def test_gemma2_softcap_in_the_paged_kernels():
    """Gemma-2's attention logit cap (0.1 here: the random tiny model's scores are too small
    for a cap to change a token) reaches the kernels: the paged prefill and decode logits are
    transformers' within 1e-5, where those of the uncapped model differ by 1e-4 or more."""
    capped = ft.tiny_model("gemma2", attn_logit_softcapping=0.1)
    uncapped = ft.tiny_model("gemma2", attn_logit_softcapping=None)
    prompt = _prompts([40])[0]
    paged = ft.PagedModel(copy.deepcopy(capped), num_blocks=16, block_size=8)
    paged.cache.add_sequence("a")
    steps = [paged.forward(["a"], [prompt], [0])[0], paged.forward(["a"], [[7]], [40])[0]]
    for got, ids in zip(steps, (prompt, prompt + [7])):
        with torch.no_grad():
            want, other = (m(torch.tensor([ids])).logits[0, -1] for m in (capped, uncapped))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (other - want).abs().max() > 1e-4


def test_sliding_window_gives_blocks_back():
    """Mistral (window 24, every layer): a 100-token prompt and 40 new tokens hold at most
    about window + one step of blocks, and the tokens still equal transformers'."""
    eager = ft.tiny_model("mistral")
    prompt = _prompts([100])[0]
    gen = ft.BatchGenerator(copy.deepcopy(eager), num_blocks=64, block_size=8,
                            max_step_tokens=16)
    assert gen.cache.window == 24
    out = gen.generate([prompt], ft.SamplingParams(max_new_tokens=40, stop_token_ids=()))
    assert out[0].token_ids == _hf_greedy(eager, prompt, 40)
    assert gen.stats.peak_blocks <= (24 + 16) // 8 + 2 < (100 + 40) // 8


def test_continuous_batching_lets_finished_sequences_leave_and_waiting_ones_join():
    eager = ft.tiny_model("llama")
    prompts = _prompts([9, 30, 4, 22, 13])
    budgets = [3, 14, 6, 2, 9]
    params = [ft.SamplingParams(max_new_tokens=b, stop_token_ids=()) for b in budgets]
    gen = ft.BatchGenerator(copy.deepcopy(eager), num_blocks=32, block_size=8, max_batch=2)
    first_done = []
    rid = [gen.add_request(p, sp) for p, sp in zip(prompts, params)]
    while gen.has_unfinished():
        first_done += [c.request_id for c in gen.step()]
    assert gen.stats.peak_batch == 2
    assert first_done[:2] == [rid[0], rid[2]]  # short budgets finish first, others join
    gen2 = ft.BatchGenerator(copy.deepcopy(eager), num_blocks=32, block_size=8)
    for c, prompt, b in zip(gen2.generate(prompts, params), prompts, budgets):
        assert c.token_ids == _hf_greedy(eager, prompt, b)


def test_a_shared_system_prompt_is_computed_once():
    eager = ft.tiny_model("qwen3")
    system = _prompts([48], seed=3)[0]
    prompts = [system + tail for tail in _prompts([5, 11, 7], seed=4)]
    gen = ft.BatchGenerator(copy.deepcopy(eager), num_blocks=64, block_size=16)
    first = gen.generate(prompts[:1], GREEDY)
    rest = gen.generate(prompts[1:], GREEDY)
    assert gen.stats.prefix_tokens_reused == 2 * 48
    assert gen.stats.tokens_computed == sum(map(len, prompts)) - 2 * 48 + 3 * 11
    for prompt, completion in zip(prompts, first + rest):
        assert completion.token_ids == _hf_greedy(eager, prompt, 12)


def test_n_samples_fork_the_prompt_and_sample_independently():
    """Sample i of a request with seed s equals a lone request seeded s + i: forked samples
    share the prompt's blocks (computed once) and draw from their own generators."""
    model = ft.tiny_model("llama")
    prompt = _prompts([37])[0]
    params = ft.SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=3,
                               stop_token_ids=())
    gen = ft.BatchGenerator(model, num_blocks=32, block_size=8)
    samples = gen.generate([prompt], params)[0].samples
    assert gen.stats.tokens_computed == 37 + 3 * 9
    assert len({tuple(s.token_ids) for s in samples}) == 3
    for i, sample in enumerate(samples):
        alone = ft.generate(model, [prompt], ft.SamplingParams(
            max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7 + i, stop_token_ids=()))
        assert alone[0].token_ids == sample.token_ids


def test_sampling_is_seeded_and_independent_of_the_batch():
    model = ft.tiny_model("phi3")
    prompt, others = _prompts([21])[0], _prompts([8, 33, 15], seed=5)
    hot = ft.SamplingParams(max_new_tokens=16, temperature=1.5, seed=11, stop_token_ids=())
    alone = ft.generate(model, [prompt], hot)[0].token_ids
    mixed = ft.generate(model, others + [prompt], [GREEDY] * 3 + [hot])[-1].token_ids
    other_seed = ft.generate(model, [prompt], ft.SamplingParams(
        max_new_tokens=16, temperature=1.5, seed=12, stop_token_ids=()))[0].token_ids
    assert alone == mixed and alone != other_seed


def test_top_p_and_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, -3.0])
    g = torch.Generator().manual_seed(0)
    nucleus = ft.SamplingParams(temperature=1.0, top_p=0.5)  # top token alone holds >= 0.5
    assert {ft.sample_token(logits, nucleus, g) for _ in range(50)} == {0}
    two = ft.SamplingParams(temperature=1.0, top_p=0.8)  # the top two hold 0.82
    assert {ft.sample_token(logits, two, g) for _ in range(200)} == {0, 1}
    draws = torch.tensor([ft.sample_token(logits, ft.SamplingParams(temperature=1.0), g)
                          for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).double() / 4000
    assert (freq - torch.softmax(logits.double(), 0)).abs().max() < 0.03
    for bad, match in ((dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(n=0), "n must")):
        with pytest.raises(ValueError, match=match):
            ft.SamplingParams(**bad)


def test_stop_tokens_end_a_sample_and_default_to_eos():
    model = ft.tiny_model("gemma")
    prompt = _prompts([19])[0]
    free = ft.generate(model, [prompt], GREEDY)[0].token_ids
    stop = free[4]
    cut = free.index(stop) + 1
    out = ft.generate(model, [prompt], ft.SamplingParams(max_new_tokens=12,
                                                         stop_token_ids=[stop]))[0]
    assert out.token_ids == free[:cut] and out.samples[0].finish_reason == "stop"
    model.generation_config.eos_token_id = [stop]
    default = ft.generate(model, [prompt], ft.SamplingParams(max_new_tokens=12))[0]
    assert default.token_ids == free[:cut]


def test_a_full_cache_holds_back_and_preempts_without_losing_a_sequence():
    """Ten requests through a cache that holds two or three of them: sequences wait or are
    preempted (their tokens recomputed later), and every one ends with the tokens it gets
    from a cache large enough for all."""
    model = ft.tiny_model("llama")
    prompts = _prompts([13, 29, 7, 40, 22, 9, 31, 18, 25, 11], seed=8)
    params = ft.SamplingParams(max_new_tokens=20, stop_token_ids=())
    roomy = ft.generate(model, prompts, params)
    gen = ft.BatchGenerator(model, num_blocks=14, block_size=8, max_step_tokens=64)
    tight = gen.generate(prompts, params)
    assert gen.stats.preemptions > 0 and gen.stats.held_back > 0
    assert gen.stats.peak_blocks <= 14
    assert [c.token_ids for c in tight] == [c.token_ids for c in roomy]
    assert gen.cache.usage().blocks_used == 0


def test_requests_that_cannot_fit_are_refused_up_front():
    gen = ft.BatchGenerator(ft.tiny_model("llama"), num_blocks=4, block_size=8)
    with pytest.raises(ValueError, match=r"needs 5 blocks; the cache has 4"):
        gen.add_request(list(range(3, 30)), ft.SamplingParams(max_new_tokens=13))
    with pytest.raises(frugal.ShapeError, match="at least one token"):
        gen.add_request([])
    gen.add_request([3, 4], request_id="a")
    with pytest.raises(ValueError, match="request_id 'a' is already"):
        gen.add_request([3, 4], request_id="a")
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        gen.add_request([3], {"max_new_tokens": 2})
    with pytest.raises(ValueError, match="max_step_tokens must be an int >= 1"):
        ft.BatchGenerator(ft.tiny_model("llama"), num_blocks=4, max_step_tokens=0)


def test_int8_kv_cache():
    """int8 K/V (per-token, per-head scales): last-token logits of a 70-token prompt within
    int8 error of the float cache's, the blocks a quarter of the bytes (plus scales)."""
    model = ft.tiny_model("qwen2")
    prompt = _prompts([70])[0]
    logits = {}
    for dtype in (None, torch.int8):
        paged = ft.PagedModel(model, num_blocks=8, block_size=16, kv_dtype=dtype)
        paged.cache.add_sequence("s", token_ids=prompt)
        logits[dtype] = paged.forward(["s"], [prompt], [0])
        usage = paged.cache.usage()
        logits[dtype, "bytes"] = usage.bytes_used
    err = (logits[torch.int8] - logits[None]).abs().max()
    assert 0 < err < 0.02 * logits[None].std()
    assert logits[torch.int8, "bytes"] / logits[None, "bytes"] == (32 + 4) / (4 * 32)
    with pytest.raises(frugal.DTypeError, match="kv_dtype must be the model's dtype"):
        ft.PagedModel(model, num_blocks=8, kv_dtype=torch.float16)


def test_a_layer_window_wider_than_the_cache_window_is_refused():
    paged = ft.PagedModel(ft.tiny_model("llama"), num_blocks=8, window=16)
    paged.cache.add_sequence("s")
    with pytest.raises(ValueError, match="attends to all past tokens but the cache keeps only "
                                         "the last 16"):
        paged.forward(["s"], [[3, 4, 5]], [0])


def test_the_readme_example_runs(monkeypatch, capsys):
    """The README's example, from a model name to generated text, with the download replaced by
    a small Qwen2 and a character tokenizer: every call it makes exists and runs."""
    import transformers

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("\n## transformers models\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)

    class CharTokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

        def __call__(self, text):
            return types.SimpleNamespace(input_ids=[3 + ord(c) % 125 for c in text])

        def decode(self, ids, skip_special_tokens):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        staticmethod(lambda name: CharTokenizer()))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        staticmethod(lambda name, dtype: ft.tiny_model("qwen2", dtype=dtype)))
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["Qwen2ForCausalLM: 2/2 attention layers on frugal.sparse_attention",
                         "  sliding windows: [None, 24]"]
    assert len(lines) == 5 and all(1 <= len(text) <= 64 for text in lines[2:]), lines
