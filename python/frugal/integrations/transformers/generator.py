"""Continuous-batching generation over a :class:`frugal.PagedKVCache`.

:class:`BatchGenerator` keeps a queue of requests and, each :meth:`~BatchGenerator.step`, runs
one forward over a batch of sequences: one token for each decoding sequence and prompt chunks
(chunked prefill) for sequences still reading their prompt, within ``max_step_tokens``. A
finished sequence leaves at once and a waiting one joins when the cache has room, so the batch
stays full while lengths differ. New prompts reuse the cached blocks of a shared prefix
(``add_sequence(token_ids=...)``); ``n > 1`` samples fork the prompt's blocks
(copy-on-write). When the cache is full a step first holds back sequences that would join,
then preempts the newest running ones (their blocks are freed and their tokens recomputed when
they are readmitted, reusing whatever prefix blocks are still cached); no sequence is lost.
Memory is the cache's blocks plus one step's activations.
"""

import collections
import dataclasses
import itertools
import math
from typing import Optional, Sequence

import torch

from frugal.errors import ShapeError
from frugal.paged_kv_cache import CacheFullError

from .paged import PagedModel


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Parameters
    ----------
    max_new_tokens : int >= 1, the request's token budget (per sample).
    temperature : float >= 0; 0 is greedy (argmax).
    top_p : float in (0, 1]: sample from the smallest set of tokens whose probability reaches
        top_p (nucleus sampling).
    seed : int or None. Sample i of the request draws from its own ``torch.Generator`` seeded
        ``seed + i``, so its tokens do not depend on which requests share its batches.
    stop_token_ids : ids that end a sample (the stop token is kept in its output); None uses
        the model's ``generation_config.eos_token_id``.
    n : int >= 1, samples of the prompt (they share its cached blocks).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Optional[Sequence[int]] = None
    n: int = 1

    def __post_init__(self):
        op = "SamplingParams"
        for name, low in (("max_new_tokens", 1), ("n", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{op}: {name} must be an int >= {low}; got {value!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0
                and math.isfinite(self.temperature)):
            raise ValueError(f"{op}: temperature must be a finite number >= 0; got "
                             f"{self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"{op}: top_p must be in (0, 1]; got {self.top_p!r}")


@dataclasses.dataclass
class Sample:
    """One generated continuation: its token ids and why it ended ("stop" or "length")."""

    token_ids: list
    finish_reason: str


@dataclasses.dataclass
class Completion:
    """A finished request: its id, prompt and samples (one per ``n``)."""

    request_id: object
    prompt_ids: list
    samples: list

    @property
    def token_ids(self):
        """The first sample's tokens (the only one when n = 1)."""
        return self.samples[0].token_ids


@dataclasses.dataclass
class GeneratorStats:
    """Counters of a :class:`BatchGenerator` run.

    steps: forwards run; tokens_computed: tokens through the model (prompt chunks,
    recomputation and decoded tokens); prefix_tokens_reused: prompt tokens served by cached
    blocks; preemptions: sequences whose blocks were freed to make room (recomputed later);
    held_back: times a sequence could not join a step for lack of blocks; peak_blocks: most
    blocks in use after a step; peak_batch: most sequences in one step."""

    steps: int = 0
    tokens_computed: int = 0
    prefix_tokens_reused: int = 0
    preemptions: int = 0
    held_back: int = 0
    peak_blocks: int = 0
    peak_batch: int = 0


class _Seq:
    """One sample in flight: ``tokens`` (prompt and generated), of which ``computed`` are in
    the cache; ``forks`` samples still to fork off when the prompt's last token is computed."""

    __slots__ = ("seq_id", "request", "index", "tokens", "computed", "generated", "generator",
                 "forks", "in_cache")

    def __init__(self, seq_id, request, index, tokens, generator, forks):
        self.seq_id, self.request, self.index = seq_id, request, index
        self.tokens, self.generator, self.forks = tokens, generator, forks
        self.computed, self.generated, self.in_cache = 0, [], False


class _Request:
    __slots__ = ("request_id", "prompt", "params", "stops", "samples", "open")

    def __init__(self, request_id, prompt, params, stops):
        self.request_id, self.prompt, self.params, self.stops = request_id, prompt, params, stops
        self.samples = [None] * params.n
        self.open = params.n


def _top_p_filter(probs, top_p):
    """probs with every token outside the top-p nucleus zeroed (the top token always stays)."""
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(0) - sorted_probs >= top_p
    return probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))


def sample_token(logits, params, generator=None):
    """A token id from one row of logits: argmax at temperature 0, else a draw (with
    ``generator``) from softmax(logits / temperature) restricted to the top-p nucleus.

    Example
    -------
    >>> sample_token(torch.tensor([0.0, 3.0, 1.0]), SamplingParams())
    1
    """
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        probs = _top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class BatchGenerator:
    """Serves many prompts at once from one paged KV-cache (continuous batching).

    Parameters
    ----------
    model : a transformers decoder model (fp32, fp16 or bf16; int8 weights welcome); its
        attention implementation is set to "frugal".
    num_blocks : int, the cache's blocks: memory is ``num_blocks * block_size`` token slots of
        K and V per layer, whatever the number of requests.
    block_size : int, tokens per block (a power of two).
    kv_dtype : None (the model's dtype) or torch.int8.
    max_step_tokens : int, most tokens in one forward (decode tokens plus prefill chunks).
    max_batch : int, most sequences in one forward.
    window : "auto" or None, as for :class:`PagedModel`.

    Example
    -------
    >>> from frugal.integrations.transformers import tiny_model
    >>> model = tiny_model("llama")
    >>> gen = BatchGenerator(model, num_blocks=32)
    >>> done = gen.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=4,
    ...                                                         stop_token_ids=()))
    >>> [len(c.token_ids) for c in done]
    [4, 4]
    """

    def __init__(self, model, num_blocks, *, block_size=16, kv_dtype=None, max_step_tokens=512,
                 max_batch=256, window="auto"):
        for name, value in (("max_step_tokens", max_step_tokens), ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BatchGenerator: {name} must be an int >= 1; got {value!r}")
        self.paged = PagedModel(model, num_blocks, block_size, kv_dtype, window)
        self.cache = self.paged.cache
        self.max_step_tokens, self.max_batch = max_step_tokens, max_batch
        eos = model.generation_config.eos_token_id
        self._eos = () if eos is None else tuple([eos] if isinstance(eos, int) else eos)
        self._waiting = collections.deque()
        self._running = []
        self._ids = itertools.count()
        self._requests = {}
        self.stats = GeneratorStats()

    # -- requests ---------------------------------------------------------------------------

    def _blocks(self, tokens):
        return -(-tokens // self.cache.block_size)

    def add_request(self, prompt_ids, params=None, request_id=None):
        """Queues a prompt (1-d ints); returns its request id (``request_id`` or a new int).

        Raises ValueError when the request could not fit in the cache even alone (its prompt
        and budget need more blocks than the cache has), so that no request can wait forever.
        """
        op = "BatchGenerator.add_request"
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"{op}: params must be a SamplingParams; got "
                            f"{type(params).__name__}")
        prompt = torch.as_tensor(prompt_ids).reshape(-1).tolist()
        if not prompt:
            raise ShapeError(f"{op}: prompt_ids must hold at least one token; got none")
        request_id = next(self._ids) if request_id is None else request_id
        if request_id in self._requests:
            raise ValueError(f"{op}: request_id {request_id!r} is already queued or running")
        span = len(prompt) + params.max_new_tokens
        if self.cache.window is not None:
            span = min(span, self.cache.window + self.cache.block_size + self.max_step_tokens)
        need = self._blocks(span) + params.n - 1
        if need > self.cache.num_blocks:
            raise ValueError(f"{op}: a prompt of {len(prompt)} tokens with max_new_tokens="
                             f"{params.max_new_tokens} and n={params.n} needs {need} blocks; the "
                             f"cache has {self.cache.num_blocks} (num_blocks)")
        stops = self._eos if params.stop_token_ids is None else tuple(params.stop_token_ids)
        request = _Request(request_id, prompt, params, frozenset(stops))
        self._requests[request_id] = request
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        generator = torch.Generator().manual_seed(seed)
        self._waiting.append(_Seq((request_id, 0), request, 0, list(prompt), generator,
                                  params.n - 1))
        return request_id

    def has_unfinished(self):
        return bool(self._waiting or self._running)

    # -- scheduling -------------------------------------------------------------------------

    def _admit(self, seq):
        """Adds a waiting sequence to the cache, reusing cached blocks of its prefix."""
        reused = self.cache.add_sequence(seq.seq_id, token_ids=seq.tokens)
        seq.computed, seq.in_cache = reused, True
        self.stats.prefix_tokens_reused += reused
        return reused

    def _release(self, seq):
        """Frees a sequence's blocks and queues it first, to be recomputed when it rejoins."""
        self.cache.free(seq.seq_id)
        seq.computed, seq.in_cache = 0, False
        self._waiting.appendleft(seq)

    def _schedule(self):
        """The step's (sequence, chunk length) list: every running sequence's next chunk
        (decodes need 1), then waiting sequences while tokens, batch slots and free blocks
        allow (a rough count: the plan below is the exact test)."""
        budget = self.max_step_tokens
        items, joined = [], set()
        for seq in self._running:
            if budget == 0 or len(items) == self.max_batch:
                break
            chunk = min(len(seq.tokens) - seq.computed, budget)
            items.append((seq, chunk))
            budget -= chunk
        free = self.cache.num_blocks - self.cache.usage().blocks_used - len(items)
        while (self._waiting and budget > 0 and len(items) < self.max_batch
               and len(self._running) < self.max_batch):
            seq = self._waiting[0]
            need = self._blocks(min(len(seq.tokens), budget))
            if need > free:
                self.stats.held_back += 1
                break
            self._waiting.popleft()
            self._admit(seq)
            self._running.append(seq)
            joined.add(seq)
            chunk = min(len(seq.tokens) - seq.computed, budget)
            items.append((seq, chunk))
            budget -= chunk
            free -= self._blocks(chunk) + 1
        return items, joined

    def _plan_or_shrink(self, items, joined):
        """Runs the step, first freeing the newest running sequences while the cache cannot
        take it: one that joined this step goes back to waiting (held back), others are
        preempted. The oldest sequence is never dropped for a newer one, so it progresses."""
        while True:
            try:
                return self._forward(items)
            except CacheFullError:
                victim = self._running[-1]
                if victim is items[0][0]:
                    raise
                self._running.pop()
                items = [(seq, n) for seq, n in items if seq is not victim]
                if victim in joined:
                    self.stats.held_back += 1
                else:
                    self.stats.preemptions += 1
                self._release(victim)

    def _forward(self, items):
        seqs = [seq for seq, _ in items]
        chunks = [seq.tokens[seq.computed:seq.computed + n] for seq, n in items]
        done = [i for i, (seq, n) in enumerate(items) if seq.computed + n == len(seq.tokens)]
        logits = self.paged.forward([s.seq_id for s in seqs], chunks,
                                    [s.computed for s in seqs], done)
        for seq, n in items:
            seq.computed += n
        self.stats.steps += 1
        self.stats.tokens_computed += sum(n for _, n in items)
        self.stats.peak_batch = max(self.stats.peak_batch, len(items))
        return [(seqs[i], logits[j]) for j, i in enumerate(done)]

    # -- stepping ---------------------------------------------------------------------------

    def _fork(self, seq):
        """The n - 1 siblings of a sample whose prompt is now in the cache."""
        request = seq.request
        children = []
        for i in range(1, seq.forks + 1):
            child = _Seq((request.request_id, i), request, i, list(seq.tokens),
                         torch.Generator().manual_seed(seq.generator.initial_seed() + i), 0)
            self.cache.fork(seq.seq_id, child.seq_id)
            child.computed, child.in_cache = seq.computed, True
            children.append(child)
        seq.forks = 0
        self._running.extend(children)
        return children

    def _finish(self, seq, reason):
        self.cache.free(seq.seq_id)
        self._running.remove(seq)
        request = seq.request
        request.samples[seq.index] = Sample(list(seq.generated), reason)
        request.open -= 1
        if request.open == 0:
            del self._requests[request.request_id]
            return Completion(request.request_id, request.prompt, request.samples)
        return None

    def step(self):
        """Runs one forward over the current batch and returns the requests it finished."""
        items, joined = self._schedule()
        if not items:
            if self._waiting:
                raise CacheFullError("BatchGenerator.step: no sequence fits in the free blocks "
                                     "and none is running to free some")
            return []
        sampled = self._plan_or_shrink(items, joined)
        finished = []
        for seq, row in sampled:
            group = [seq] + (self._fork(seq) if seq.forks else [])
            for member in group:
                params = member.request.params
                token = sample_token(row, params, member.generator)
                member.generated.append(token)
                member.tokens.append(token)
                reason = ("stop" if token in member.request.stops else
                          "length" if len(member.generated) == params.max_new_tokens else None)
                if reason is not None:
                    done = self._finish(member, reason)
                    if done is not None:
                        finished.append(done)
        self.stats.peak_blocks = max(self.stats.peak_blocks, self.cache.usage().blocks_used)
        return finished

    def run(self):
        """Steps until every queued request is finished; returns them in finishing order."""
        finished = []
        while self.has_unfinished():
            finished.extend(self.step())
        return finished

    def generate(self, prompts, params=None):
        """Queues ``prompts`` (a list of 1-d id lists or tensors) with one SamplingParams (or
        one per prompt), runs them all and returns their Completions in prompt order."""
        params_list = (list(params) if isinstance(params, (list, tuple))
                       else [params] * len(prompts))
        if len(params_list) != len(prompts):
            raise ShapeError(f"BatchGenerator.generate: params must be one SamplingParams or one "
                             f"per prompt ({len(prompts)}); got {len(params_list)}")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        done = {c.request_id: c for c in self.run()}
        return [done[i] for i in ids]


def generate(model, prompts, params=None, *, num_blocks=None, block_size=16, kv_dtype=None,
             **generator_kwargs):
    """Generates continuations of ``prompts`` with a :class:`BatchGenerator` whose cache holds
    every prompt and its budget at once (unless ``num_blocks`` says otherwise).

    Example
    -------
    >>> from frugal.integrations.transformers import tiny_model
    >>> model = tiny_model("llama")
    >>> out = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=5, stop_token_ids=()))
    >>> len(out[0].token_ids)
    5
    """
    params_list = (list(params) if isinstance(params, (list, tuple))
                   else [params or SamplingParams()] * len(prompts))
    if num_blocks is None:
        num_blocks = sum(-(-(len(p) + sp.max_new_tokens) // block_size) * sp.n
                         for p, sp in zip(prompts, params_list))
    gen = BatchGenerator(model, num_blocks, block_size=block_size, kv_dtype=kv_dtype,
                         **generator_kwargs)
    return gen.generate(prompts, params_list)
