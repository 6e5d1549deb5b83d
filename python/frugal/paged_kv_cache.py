"""The paged KV-cache manager (:class:`PagedKVCache`): blocks, reference counts, prefix
sharing, copy-on-write and sliding-window eviction over caches that the ops of
:mod:`frugal.paged_ops` read and write, and the per-step plan (:class:`StepPlan`) that serving
code builds once per decode or prefill step and runs in every layer.
"""

import array
import collections
import dataclasses
import functools
import hashlib
import threading

import torch

from . import cascade as _cascade
from .errors import (
    DeviceError,
    DTypeError,
    FrugalError,
    ShapeError,
    check_dtype,
    check_scale,
    check_tensor,
)
from .paged_ops import (
    CACHE_DTYPES,
    FLOATS,
    PAGED_APPEND,
    PAGED_ATTENTION,
    PAGED_PREFILL,
    BlockTableError,
    check_score_mods,
    check_window,
    empty_cache,
    is_block_size,
    is_int,
    _select_paged_attention,
    normalize,
    paged_attention,
    paged_prefill_attention,
)
from .score_mods import check_alibi_slopes, check_softcap


class CacheFullError(FrugalError, RuntimeError):
    """An append needs more free blocks than the cache has; nothing was changed."""


class SequenceError(FrugalError, ValueError):
    """A sequence id is unknown (never added, or freed), already present, or repeated in one
    call, or token ids disagree with the ids already recorded for those positions."""




# ---------------------------------------------------------------------------------------------
# Memory accounting


@dataclasses.dataclass(frozen=True)
class CacheUsage:
    """What a :class:`PagedKVCache` holds (:meth:`PagedKVCache.usage`).

    ``blocks_used`` are referenced by a sequence; ``blocks_free`` can be allocated, and
    ``blocks_cached`` of them still hold a prefix-cache block that a new sequence may reuse
    until an allocation takes it. ``tokens`` counts the token slots of used blocks that hold a
    token of some sequence (a shared block counts once); ``utilization`` is the share of used
    bytes those tokens need (1.0 when nothing is used).
    """

    blocks_total: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    bytes_total: int
    bytes_used: int
    tokens: int
    token_bytes: int
    utilization: float


@dataclasses.dataclass(frozen=True)
class KVFootprint:
    """KV slots a batch of sequences needs, paged vs a dense max-length cache
    (:func:`kv_footprint`). ``*_overhead`` is slots held per token needed, minus 1."""

    tokens: int
    paged_slots: int
    dense_slots: int
    paged_overhead: float
    dense_overhead: float


def kv_footprint(lengths, block_size=16):
    """Token slots that a paged cache (whole blocks of ``block_size`` per sequence) and a dense
    cache (every sequence padded to the longest) hold for sequences of ``lengths``.

    Example: lengths uniform in [256, 4096] with block_size 16 give a paged overhead under 1%
    (at most block_size - 1 slots per sequence) against 80 to 90% for the dense cache.
    """
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError(f"kv_footprint: lengths must be >= 0; got {lengths}")
    if not is_block_size(block_size):
        raise ValueError(f"kv_footprint: block_size must be a power of two from 1 to 256; got "
                         f"{block_size!r}")
    tokens = sum(lengths)
    paged = sum(-(-n // block_size) * block_size for n in lengths)
    dense = len(lengths) * max(lengths, default=0)
    over = (lambda slots: slots / tokens - 1.0) if tokens else (lambda slots: 0.0)
    return KVFootprint(tokens, paged, dense, over(paged), over(dense))


# ---------------------------------------------------------------------------------------------
# The manager


def _check_cascade(op, cascade):
    if not (cascade is True or cascade is False or cascade == "auto"):
        raise ValueError(f"{op}: cascade must be 'auto', True or False; got {cascade!r}")


def _short(x, limit=80):
    text = repr(x)
    return text if len(text) <= limit else text[:limit] + "..."


def _locked(method):
    """Runs a PagedKVCache method under the cache's lock (see "Threads" in its docstring)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return run


def _chain_hash(parent, ids):
    """Hash of a full block: its parent block's hash (b"" for the first block) and its ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array.array("q", ids).tobytes())
    return h.digest()


class _Sequence:
    """Host-side state of one sequence.

    blocks: table row (block ids, -1 where a window gave the block back).
    lens: tokens written, per layer.
    token_ids: ids of positions 0, 1, ... as far as they are known without a gap.
    hashes: chained hash of each leading full block whose ids are known and whose every layer
    is written.
    """

    __slots__ = ("blocks", "lens", "token_ids", "hashes", "version")

    def __init__(self, blocks, lens, token_ids, hashes):
        self.blocks, self.lens, self.token_ids, self.hashes = blocks, lens, token_ids, hashes
        self.version = 0  # bumped by every change of its blocks or lengths: plans check it


class PagedKVCache:
    """A paged KV cache for ``num_layers`` layers and the manager of its blocks.

    Parameters
    ----------
    num_layers, num_blocks, num_kv_heads, head_dim : int >= 1.
    block_size : int, a power of two from 1 to 256 (tokens per block).
    dtype : float16, bfloat16, float32, or int8 (per-token, per-head float32 scales beside).
    device : where the cache tensors live.
    window : int or None. With a window, each append first gives back the blocks of its
        sequences that lie wholly before ``min(lens) - window`` (see :meth:`trim`), and
        :meth:`attention` uses the window by default.

    Attributes
    ----------
    k_cache, v_cache : Tensor [num_layers, num_blocks, block_size, num_kv_heads, head_dim].
    k_scale, v_scale : Tensor [num_layers, num_blocks, block_size, num_kv_heads] float32 for
        int8 caches, else None.

    Notes
    -----
    Sequences are named by any hashable id. Every layer keeps its own length, so a model
    appends and attends layer by layer (``append(0, ...)``, ``attention(q, 0, ...)``,
    ``append(1, ...)``, ...); the first layer to reach a position allocates its block and the
    other layers write into the same block. Block tables are shared by all layers.

    Blocks are reference counted. :meth:`fork` shares every block of the parent; a write into a
    block that another sequence also references copies it first, in every layer
    (copy-on-write). :meth:`free` drops references; a block whose count reaches 0 is free.

    Prefix caching works on full blocks identified by a chained hash of their token ids (the
    parent block's hash and the block's own ids), so two blocks match only if the whole prefix
    up to their end matches. A block is registered once its ids are known and every layer has
    written it; ids are known from :meth:`add_sequence` (the prompt) or from ``token_ids`` of
    the append that first writes a position, and only without a gap from position 0. Reuse
    happens in :meth:`add_sequence` only: a new sequence starts with the longest run of
    registered blocks matching its prompt, leaving at least one prompt token to compute.
    Registered blocks that no sequence references stay reusable (``usage().blocks_cached``)
    until an allocation takes them, least recently released first, after the never-registered
    free blocks.

    Every method checks all of its arguments and plans its allocations before changing
    anything: on an error, including :class:`CacheFullError`, every sequence, table, count and
    cache tensor is as it was.
    """

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                 dtype=torch.float16, device="cpu", window=None):
        op = "PagedKVCache"
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not (is_int(value) and value >= 1):
                raise ValueError(f"{op}: {name} must be an int >= 1; got {value!r}")
        if not is_block_size(block_size):
            raise ValueError(f"{op}: block_size must be a power of two from 1 to 256; got "
                             f"{block_size!r}")
        if dtype not in CACHE_DTYPES:
            raise DTypeError(f"{op}: dtype must be float32, float16, bfloat16 or int8; got "
                             f"{dtype}")
        check_window(op, window)
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.window = window
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = empty_cache(shape, dtype, device).zero_()
        self.v_cache = empty_cache(shape, dtype, device).zero_()
        self.device = self.k_cache.device
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device)
        self._seqs = {}
        self._lock = threading.RLock()
        self._ref = [0] * num_blocks
        self._free = collections.deque(range(num_blocks))
        self._cached = collections.OrderedDict()  # registered blocks with count 0, LRU first
        self._block_hash = {}
        self._hash_block = {}

    # -- sequences --------------------------------------------------------------------------

    @_locked
    def __contains__(self, seq_id):
        return seq_id in self._seqs

    def _seq(self, op, seq_id):
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise SequenceError(f"{op}: sequence {seq_id!r} is not in the cache (never added, "
                                f"or freed)") from None

    def _seq_list(self, op, seq_ids):
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()
        if not isinstance(seq_ids, (list, tuple, range)):
            raise TypeError(f"{op}: seq_ids must be a list or tuple of sequence ids; got "
                            f"{type(seq_ids).__name__}")
        seqs = [self._seq(op, s) for s in seq_ids]
        if len(set(map(id, seqs))) != len(seqs):
            raise SequenceError(f"{op}: seq_ids must not repeat a sequence; got {list(seq_ids)}")
        return list(seq_ids), seqs

    def _new_id(self, op, seq_id):
        try:
            present = seq_id in self._seqs
        except TypeError:
            raise SequenceError(f"{op}: a sequence id must be hashable; got {seq_id!r}") from None
        if present:
            raise SequenceError(f"{op}: sequence {seq_id!r} is already in the cache")

    def _token_list(self, op, token_ids, count):
        """token_ids as a list of ints, each in [-2**63, 2**63) (the prefix hash packs them as
        int64): checked here, before anything changes."""
        try:
            ids = torch.as_tensor(token_ids)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            raise ValueError(f"{op}: token_ids must be integers in [-2**63, 2**63); got "
                             f"{_short(token_ids)}") from None
        if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex
                            or ids.dtype == torch.bool):
            raise DTypeError(f"{op}: token_ids must be integers; got {ids.dtype}")
        if count is not None and ids.numel() != count:
            raise ShapeError(f"{op}: token_ids must hold {count} ids (one per new token); got "
                             f"{ids.numel()}")
        values = ids.reshape(-1).tolist()
        if ids.dtype == torch.uint64 and any(v >= 2**63 for v in values):
            raise ValueError(f"{op}: token_ids must be integers in [-2**63, 2**63); got "
                             f"{max(values)}")
        return values

    @_locked
    def add_sequence(self, seq_id, token_ids=None):
        """Adds an empty sequence, or one that starts with its prompt's cached prefix.

        Parameters
        ----------
        seq_id : hashable, not already in the cache.
        token_ids : 1-d ints (list or tensor), the prompt, or None. With ids, the sequence
            shares the longest run of registered full blocks that match the prompt (all but its
            last token), and the ids of every prompt position are recorded, so appends of the
            prompt may omit them.

        Returns
        -------
        int : tokens already in the cache (a multiple of block_size, less than the prompt's
            length): append keys and values from that position on.
        """
        op = "add_sequence"
        self._new_id(op, seq_id)
        ids = [] if token_ids is None else self._token_list(op, token_ids, None)
        bs = self.block_size
        blocks, hashes, parent = [], [], b""
        for j in range((len(ids) - 1) // bs if ids else 0):
            h = _chain_hash(parent, ids[j * bs:(j + 1) * bs])
            block = self._hash_block.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        for block in blocks:
            if self._ref[block] == 0:
                del self._cached[block]
            self._ref[block] += 1
        n = len(blocks) * bs
        self._seqs[seq_id] = _Sequence(blocks, [n] * self.num_layers, ids, hashes)
        return n

    @_locked
    def fork(self, parent, child):
        """Adds sequence ``child`` sharing every block of ``parent`` (its tokens, token ids and
        per-layer lengths). Either may be appended to afterwards; a write into a shared block
        copies it first."""
        op = "fork"
        p = self._seq(op, parent)
        self._new_id(op, child)
        for block in p.blocks:
            if block >= 0:
                self._ref[block] += 1
        self._seqs[child] = _Sequence(list(p.blocks), list(p.lens), list(p.token_ids),
                                      list(p.hashes))
        p.version += 1  # its blocks are shared now: a plan's writes would reach the child

    @_locked
    def free(self, seq_id):
        """Removes a sequence and drops its references; blocks no one references are free."""
        seq = self._seq("free", seq_id)
        for block in seq.blocks:
            if block >= 0:
                self._release(block)
        del self._seqs[seq_id]
        seq.version += 1

    @_locked
    def trim(self, seq_id, window):
        """Gives back the blocks of ``seq_id`` whose every position is before
        ``min(lens) - window``: no query at a written position, attending to its last
        ``window`` tokens, reads them. Their table entries become -1; positions keep their
        entries. Returns the number of entries dropped."""
        op = "trim"
        seq = self._seq(op, seq_id)
        check_window(op, window)
        dropped = self._trimmable(seq, window)
        for j in dropped:
            self._release(seq.blocks[j])
            seq.blocks[j] = -1
        seq.version += 1
        return len(dropped)

    def _trimmable(self, seq, window):
        full = max(0, min(seq.lens) - window) // self.block_size
        return [j for j in range(min(full, len(seq.blocks))) if seq.blocks[j] >= 0]

    # -- blocks -----------------------------------------------------------------------------

    def _release(self, block):
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if block in self._block_hash:
                self._cached[block] = None
            else:
                self._free.append(block)

    def _take(self):
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._cached.popitem(last=False)
            del self._hash_block[self._block_hash.pop(block)]
        self._ref[block] = 1
        return block

    # -- writing ----------------------------------------------------------------------------

    def _parse_append(self, op, layer, seq_ids, k, v, num_tokens, token_ids):
        if not (is_int(layer) and 0 <= layer < self.num_layers):
            raise ValueError(f"{op}: layer must be an int in [0, {self.num_layers}); got "
                             f"{layer!r}")
        seq_ids, seqs = self._seq_list(op, seq_ids)
        check_dtype(op, "k", k, FLOATS)
        check_tensor(op, "v", v)
        if k.shape != v.shape:
            raise ShapeError(f"{op}: v must have k's shape {tuple(k.shape)}; got "
                             f"{tuple(v.shape)}")
        if v.dtype != k.dtype:
            raise DTypeError(f"{op}: v must have k's dtype {k.dtype}; got {v.dtype}")
        if self.dtype != torch.int8 and k.dtype != self.dtype:
            raise DTypeError(f"{op}: k must have the cache dtype {self.dtype}; got {k.dtype}")
        for name, t in (("k", k), ("v", v)):
            if t.device != self.device:
                raise DeviceError(f"{op}: {name} must be on the cache's device ({self.device}); "
                                  f"got {t.device}")
        heads = (self.num_kv_heads, self.head_dim)
        s = len(seqs)
        if k.dim() == 4 and k.shape[0] == s and k.shape[2:] == heads and num_tokens is None:
            counts = [k.shape[1]] * s
        elif k.dim() == 3 and k.shape[1:] == heads:
            counts = [1] * s if num_tokens is None else num_tokens
            if not (isinstance(counts, (list, tuple)) and all(map(is_int, counts))
                    and len(counts) == s and sum(counts) == k.shape[0]):
                raise ShapeError(f"{op}: num_tokens must list one int per sequence ({s}) summing "
                                 f"to k's {k.shape[0]} rows; got {num_tokens!r}")
        else:
            raise ShapeError(f"{op}: k must be [{s}, T, {heads[0]}, {heads[1]}] (T tokens per "
                             f"sequence) or packed [num_tokens, {heads[0]}, {heads[1]}]; got "
                             f"{tuple(k.shape)}"
                             + (" with num_tokens" if num_tokens is not None else ""))
        if any(t < 1 for t in counts):
            raise ShapeError(f"{op}: every sequence must get at least one token; got {counts}")
        ids = None if token_ids is None else self._token_list(op, token_ids, sum(counts))
        return seq_ids, seqs, counts, ids

    def _check_known_ids(self, op, layer, seq_ids, seqs, counts, ids):
        """Ids given for positions whose ids are known must match them."""
        offset = 0
        for seq_id, seq, t in zip(seq_ids, seqs, counts):
            start = seq.lens[layer]
            known = seq.token_ids[start:start + t]
            if known != ids[offset:offset + len(known)]:
                raise SequenceError(f"{op}: token_ids of sequence {seq_id!r} at positions "
                                    f"{start}..{start + t - 1} differ from its recorded ids "
                                    f"{known}")
            offset += t

    @_locked
    def append(self, layer, seq_ids, k, v, num_tokens=None, token_ids=None, *, backend="auto"):
        """Appends keys and values of one layer for one or many sequences.

        Parameters
        ----------
        layer : int in [0, num_layers).
        seq_ids : list of distinct sequence ids in the cache.
        k, v : Tensor [S, T, Hkv, D] (T >= 1 tokens for each of the S sequences), or packed
            [N, Hkv, D]: ``num_tokens[i]`` rows for ``seq_ids[i]`` in order (one each when
            num_tokens is None). The cache dtype, or any float dtype for int8 caches.
        num_tokens : list of ints >= 1, packed k only.
        token_ids : ints, one per new token (shape [S, T] or [N]), or None. Recorded for the
            positions this call is the first to write, for prefix caching; where ids are
            already known they must match.
        backend : "auto" | "triton" | "cpu" | "torch", the :func:`paged_append` backend.

        With a cache window, first gives back the sequences' blocks that lie wholly outside it
        (:meth:`trim`). Then allocates the blocks the new tokens need and copies shared blocks
        written into, all planned first: raises CacheFullError, with nothing changed, when too
        few blocks are free (counting those the window would give back). The new tokens of
        ``layer`` sit at positions ``[lens[layer], lens[layer] + T)``.
        """
        op = "append"
        seq_ids, seqs, counts, ids = self._parse_append(op, layer, seq_ids, k, v, num_tokens,
                                                        token_ids)
        if ids is not None:
            self._check_known_ids(op, layer, seq_ids, seqs, counts, ids)
        name = self._append_backend(backend)
        self._allocate(*self._plan(op, layer, seqs, counts), seqs)
        starts = [seq.lens[layer] for seq in seqs]
        heads = (self.num_kv_heads, self.head_dim)
        name.run(k.reshape(-1, *heads), v.reshape(-1, *heads), self.k_cache[layer],
                   self.v_cache[layer], self._slots(seqs, starts, counts),
                   *self._scales(layer))
        self._advance(seqs, starts, counts, ids, (layer,))

    def _allocate(self, trims, copies, grows, seqs):
        """Carries out a :meth:`_plan`: gives back the trimmed blocks, copies the shared blocks
        written into (every layer), and takes the new blocks."""
        for seq, dropped in zip(seqs, trims):
            for j in dropped:
                self._release(seq.blocks[j])
                seq.blocks[j] = -1
        src, dst = [], []
        for seq, j in copies:
            src.append(seq.blocks[j])
            self._release(seq.blocks[j])
            seq.blocks[j] = self._take()
            dst.append(seq.blocks[j])
        for seq, grow in zip(seqs, grows):
            seq.blocks.extend(self._take() for _ in range(grow))
        if src:
            src_t = torch.tensor(src, device=self.device)
            dst_t = torch.tensor(dst, device=self.device)
            for t in (self.k_cache, self.v_cache, self.k_scale, self.v_scale):
                if t is not None:
                    t.index_copy_(1, dst_t, t.index_select(1, src_t))
        for seq in seqs:
            seq.version += 1

    def _advance(self, seqs, starts, counts, ids, layers):
        """Records ``counts`` tokens written from ``starts`` in ``layers``, and their ids."""
        offset = 0
        for seq, start, t in zip(seqs, starts, counts):
            frontier = max(seq.lens)
            for layer in layers:
                seq.lens[layer] = start + t
            known = len(seq.token_ids)
            if ids is not None and max(start, frontier) <= known < start + t:
                seq.token_ids.extend(ids[offset + known - start:offset + t])
            offset += t
            self._register(seq)
            seq.version += 1

    def _plan(self, op, layer, seqs, counts):
        """Blocks each sequence gives back (window), copy-on-write copies and new blocks, and
        CacheFullError if the free blocks (with those given back) do not cover them."""
        bs = self.block_size
        delta = collections.Counter()
        released = 0
        trims = []
        for seq in seqs:
            dropped = [] if self.window is None else self._trimmable(seq, self.window)
            for j in dropped:
                delta[seq.blocks[j]] -= 1
                released += self._ref[seq.blocks[j]] + delta[seq.blocks[j]] == 0
            trims.append(dropped)
        copies, grows = [], []
        for seq, t in zip(seqs, counts):
            start, end = seq.lens[layer], seq.lens[layer] + t
            last = -(-end // bs)
            for j in range(start // bs, min(last, len(seq.blocks))):
                block = seq.blocks[j]
                if self._ref[block] + delta[block] > 1:
                    copies.append((seq, j))
                    delta[block] -= 1
            grows.append(max(0, last - len(seq.blocks)))
        need = len(copies) + sum(grows)
        have = len(self._free) + len(self._cached) + released
        if need > have:
            by_window = ("" if self.window is None
                         else f" ({released} of them given back by the window)")
            raise CacheFullError(
                f"{op}: needs {need} free blocks ({sum(grows)} new, {len(copies)} copy-on-write "
                f"copies) but {have} of {self.num_blocks} are free{by_window}; every sequence is "
                f"unchanged")
        return trims, copies, grows

    def _append_backend(self, backend):
        """The :func:`paged_append` implementation of this cache's writes (BackendError if it
        cannot run); its needs depend on the caches only, the same in every layer."""
        return PAGED_APPEND.select(self.device, backend, None, None, self.k_cache[0],
                                   self.v_cache[0], None, *self._scales(0))

    def _slots(self, seqs, starts, counts):
        """int32 [sum(counts)] on the cache's device: the slot of each new token, sequence by
        sequence (positions start, start + 1, ...), from the host-side tables."""
        bs = self.block_size
        parts, small = [], array.array("i")
        for seq, start, t in zip(seqs, starts, counts):
            if t <= 16:  # decode: a few Python ints beat tensor ops
                small.extend(seq.blocks[p // bs] * bs + p % bs for p in range(start, start + t))
                continue
            if small:
                parts.append(torch.tensor(small, dtype=torch.int32))
                small = array.array("i")
            row = torch.tensor(seq.blocks[start // bs:(start + t - 1) // bs + 1],
                               dtype=torch.int32)
            offs = torch.arange(start % bs, start % bs + t, dtype=torch.int32)
            parts.append(row[offs // bs] * bs + offs % bs)
        if small:
            parts.append(torch.tensor(small, dtype=torch.int32))
        return torch.cat(parts).to(self.device)

    def _scales(self, layer):
        if self.k_scale is None:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def _register(self, seq):
        """Hashes the sequence's newly complete full blocks and registers blocks not yet
        cached under their hash."""
        bs = self.block_size
        full = min(min(seq.lens), len(seq.token_ids)) // bs
        for j in range(len(seq.hashes), full):
            parent = seq.hashes[-1] if seq.hashes else b""
            h = _chain_hash(parent, seq.token_ids[j * bs:(j + 1) * bs])
            seq.hashes.append(h)
            block = seq.blocks[j]
            if block >= 0 and h not in self._hash_block and block not in self._block_hash:
                self._hash_block[h] = block
                self._block_hash[block] = h

    # -- per-step plans ---------------------------------------------------------------------

    @_locked
    def plan(self, seq_ids, num_tokens=1, token_ids=None, *, window=None, backend="auto",
             cascade="auto", alibi_slopes=None):
        """Plans one decode or prefill step of ``seq_ids`` for every layer: allocates the
        blocks their ``num_tokens`` new tokens need (copy-on-write and window trims included),
        records the tokens as written in every layer, and builds on the cache's device, from
        the host-side tables alone, everything the layers need: slot mapping, block tables,
        sequence and query lengths. Returns a :class:`StepPlan`; each layer then calls
        ``plan.run(layer, q, k, v)`` (or ``append`` and ``attention``), which reads no device
        memory on the host, allocates nothing but its outputs, and can be captured in a CUDA
        graph or compiled with ``torch.compile(fullgraph=True)``.

        Parameters
        ----------
        seq_ids : list of distinct sequence ids in the cache, each with the same length in
            every layer (per-layer :meth:`append` calls finished).
        num_tokens : int >= 1 (every sequence) or a list with one int >= 1 per sequence: the
            tokens of this step (1 for decode).
        token_ids : ints, one per new token, or None: recorded for prefix caching as
            :meth:`append` does.
        window : int or None; default the cache's window.
        backend : the backend of the plan's appends and attention ("auto" picks per device).
        cascade : "auto" | True | False. A decode step (one token per sequence, no window
            shorter than a sequence) whose sequences share leading blocks (forks,
            prefix-cache hits) can read each
            group's shared blocks once per layer instead of once per sequence: a prefix pass
            with the group's queries folded into the head dim, a per-sequence suffix pass and
            a merge (:mod:`frugal.cascade`; ``StepPlan.cascade`` names the groups). "auto"
            does so for the groups that save at least
            :data:`frugal.cascade.MIN_SAVED_BYTES` of K/V reads ((n - 1) * shared tokens)
            and share at least :data:`frugal.cascade.MIN_PREFIX_BYTES`,
            True for every group sharing a whole block, False never.
        alibi_slopes : float32 [Hq] or [len(seq_ids), Hq] on the cache's device, or None: the
            ALiBi slopes of every layer's attention (:mod:`frugal.score_mods`), checked here
            once (a host sync), not per layer. The softcap is an argument of
            :meth:`StepPlan.attention`.

        Raises CacheFullError (nothing changed) when too few blocks are free. The plan is
        valid until one of its sequences changes (an append, plan, fork, free or trim of it;
        other sequences may come and go); using a stale plan raises SequenceError. Run every
        layer of a plan before changing its sequences: the step's tokens count as written
        once planned (prefix caching may offer their full blocks to a new sequence).
        """
        op = "plan"
        seq_ids, seqs = self._seq_list(op, seq_ids)
        if not seqs:
            raise SequenceError(f"{op}: seq_ids must name at least one sequence; got []")
        _check_cascade(op, cascade)
        if is_int(num_tokens):
            counts = [num_tokens] * len(seqs)
        elif isinstance(num_tokens, (list, tuple)) and all(map(is_int, num_tokens)):
            counts = list(num_tokens)
        else:
            raise TypeError(f"{op}: num_tokens must be an int or a list of ints; got "
                            f"{num_tokens!r}")
        if len(counts) != len(seqs) or any(t < 1 for t in counts):
            raise ShapeError(f"{op}: num_tokens must give each of the {len(seqs)} sequences at "
                             f"least one token; got {counts}")
        for seq_id, seq in zip(seq_ids, seqs):
            if len(set(seq.lens)) != 1:
                raise SequenceError(f"{op}: sequence {seq_id!r} has different lengths per layer "
                                    f"{seq.lens}; finish its per-layer appends first")
        ids = None if token_ids is None else self._token_list(op, token_ids, sum(counts))
        if ids is not None:
            self._check_known_ids(op, 0, seq_ids, seqs, counts, ids)
        window = self.window if window is None else window
        check_window(op, window)
        if alibi_slopes is not None:  # [H] or [B, H], H the query heads (of any layer's q)
            alibi_slopes = check_alibi_slopes(op, alibi_slopes, len(seqs),
                                              alibi_slopes.shape[-1] if alibi_slopes.dim() else 0,
                                              self.device)
        self._check_reads(op, seq_ids, seqs, counts, window)
        decode = max(counts) == 1
        if decode:  # a refused cascade=True raises here, before anything changes
            self._cascade_window(op, [seq.lens[0] + 1 for seq in seqs], window, cascade)
        name = self._append_backend(backend)
        self._allocate(*self._plan(op, 0, seqs, counts), seqs)
        starts = [seq.lens[0] for seq in seqs]
        slots = self._slots(seqs, starts, counts)
        self._advance(seqs, starts, counts, ids, range(self.num_layers))
        lens = [start + t for start, t in zip(starts, counts)]
        width = max(len(seq.blocks) for seq in seqs)
        tables = torch.tensor([seq.blocks + [-1] * (width - len(seq.blocks)) for seq in seqs],
                              dtype=torch.int32)
        cu = [0]
        for t in counts:
            cu.append(cu[-1] + t)
        shared = self._cascade(op, seqs, lens, window, cascade) if decode else None
        return StepPlan(
            cache=self, seqs=tuple(seqs), versions=tuple(seq.version for seq in seqs),
            seq_ids=tuple(seq_ids),
            num_tokens=tuple(counts), window=window or 0, backend=backend, append_impl=name,
            slot_mapping=slots, block_tables=tables.to(self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32).to(self.device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32).to(self.device),
            max_q_len=max(counts), max_seq_len=max(lens), decode=max(counts) == 1,
            cascade=shared, alibi_slopes=alibi_slopes,
        )

    def _check_reads(self, op, seq_ids, seqs, counts, window):
        """The step's queries read no block a trim gave back: the tables a plan builds are
        run unchecked by the kernels."""
        bs = self.block_size
        for seq_id, seq, t in zip(seq_ids, seqs, counts):
            start = seq.lens[0]
            first = 0 if not window else max(0, start - window + 1)
            gone = [j for j in range(first // bs, min(len(seq.blocks), -(-start // bs)))
                    if seq.blocks[j] < 0]
            if gone:
                raise BlockTableError(
                    f"{op}: sequence {seq_id!r} gave back block {gone[0]} (positions "
                    f"{gone[0] * bs}..{gone[0] * bs + bs - 1}), which its queries from position "
                    f"{start} read with window {window}; plan with a window of at most "
                    f"{start - (gone[-1] + 1) * bs + 1}")

    # -- reading ----------------------------------------------------------------------------

    @_locked
    def block_tables(self, seq_ids):
        """int32 [len(seq_ids), max_blocks] on the cache's device: the sequences' table rows,
        padded with -1 to the longest (entries a window gave back are -1 too)."""
        _, seqs = self._seq_list("block_tables", seq_ids)
        width = max((len(seq.blocks) for seq in seqs), default=0)
        rows = [seq.blocks + [-1] * (width - len(seq.blocks)) for seq in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(seqs), width)

    @_locked
    def seq_lens(self, seq_ids, layer=None):
        """int32 [len(seq_ids)] on the cache's device: tokens written in ``layer``, or in every
        layer (the least per-layer length) when layer is None."""
        op = "seq_lens"
        _, seqs = self._seq_list(op, seq_ids)
        if layer is not None and not (is_int(layer) and 0 <= layer < self.num_layers):
            raise ValueError(f"{op}: layer must be None or an int in [0, {self.num_layers}); "
                             f"got {layer!r}")
        lens = [min(seq.lens) if layer is None else seq.lens[layer] for seq in seqs]
        return torch.tensor(lens, dtype=torch.int32, device=self.device)

    def _layer_args(self, op, layer, seq_ids):
        if not (is_int(layer) and 0 <= layer < self.num_layers):
            raise ValueError(f"{op}: layer must be an int in [0, {self.num_layers}); got "
                             f"{layer!r}")
        self._seq_list(op, seq_ids)
        return (self.k_cache[layer], self.v_cache[layer], self.block_tables(seq_ids),
                self.seq_lens(seq_ids, layer), self._scales(layer))

    @_locked
    def attention(self, q, layer, seq_ids, window=None, scale=None, *, backend="auto",
                  return_lse=False, cascade="auto", softcap=None, alibi_slopes=None):
        """Decode attention of ``q`` [len(seq_ids), Hq, D] over the sequences' tokens in
        ``layer`` (:func:`paged_attention`); window defaults to the cache's window. With
        ``return_lse``, (out, lse float32 [len(seq_ids), Hq]).

        ``cascade``: "auto" reads the leading blocks a group of the sequences shares once for
        the group when the cost rule of :mod:`frugal.cascade` says it pays (see
        :meth:`plan`); True whenever a group shares a whole block; False never. Without a
        window only: windowed decode always runs per sequence. ``softcap`` and
        ``alibi_slopes`` as :func:`paged_attention` takes them."""
        op = "attention"
        _check_cascade(op, cascade)
        k, v, tables, lens, (ks, vs) = self._layer_args(op, layer, seq_ids)
        window = self.window if window is None else window
        # Checks every argument (q, scale, window) before anything runs.
        impl = _select_paged_attention(q, k, v, tables, lens, scale, window, ks, vs,
                                       backend=backend)
        mods = check_score_mods(op, q, softcap, alibi_slopes, q.shape[0])
        _, seqs = self._seq_list(op, seq_ids)
        shared = self._cascade(op, seqs, [seq.lens[layer] for seq in seqs], window, cascade)
        scale, window = normalize(q, scale, window)
        if shared is None:
            return impl.run(q, k, v, tables, lens, scale, window, ks, vs,
                            return_lse=bool(return_lse), **mods)
        out, lse = shared.run(impl, q, k, v, scale, ks, vs, **mods)
        return (out, lse) if return_lse else out

    def _cascade_window(self, op, lens, window, cascade):
        """Whether a decode attending to ``lens`` tokens may cascade under ``window``: it
        may when the window covers every sequence (a query at position L - 1 reads positions
        > L - 1 - window: all of them when L <= window). cascade=True with a window that cuts
        into a sequence raises ValueError."""
        if not window or max(lens, default=0) <= window:
            return True
        if cascade is True:
            raise ValueError(f"{op}: cascade=True needs a window of at least every sequence's "
                             f"length; got window {window} < {max(lens)} (a window that cuts "
                             f"into the shared prefix changes what each sequence reads); use "
                             f"cascade='auto' or False")
        return False

    def _cascade(self, op, seqs, lens, window, cascade):
        """The :class:`frugal.cascade.CascadeDecode` of a decode over ``seqs`` attending to
        ``lens`` tokens, or None: cascade is off (False), a window cuts into a sequence
        ("auto"; True raises), no group pays under the rule of :mod:`frugal.cascade` ("auto")
        or none shares a whole block (True)."""
        _check_cascade(op, cascade)
        if cascade is False or not self._cascade_window(op, lens, window, cascade):
            return None
        rows = [seq.blocks for seq in seqs]
        auto = cascade == "auto"
        groups = _cascade.cascade_groups(rows, lens, self.block_size,
                                         _cascade.min_saved_tokens(self) if auto else 1,
                                         _cascade.min_prefix_tokens(self) if auto else 1)
        if not groups:
            return None
        return _cascade.CascadeDecode(groups, rows, lens, self.block_size, self.device)

    @_locked
    def prefill_attention(self, q, layer, seq_ids, q_lens=None, window=None, scale=None, *,
                          backend="auto", softcap=None, alibi_slopes=None):
        """Chunked-prefill attention (:func:`paged_prefill_attention`) of the sequences' latest
        chunk, already appended in ``layer``: q [len(seq_ids), T, Hq, D], or packed [N, Hq, D]
        with q_lens (list or int32 tensor); window defaults to the cache's window; softcap and
        alibi_slopes as the op takes them."""
        k, v, tables, lens, (ks, vs) = self._layer_args("prefill_attention", layer, seq_ids)
        if isinstance(q_lens, (list, tuple)):
            q_lens = torch.tensor(q_lens, dtype=torch.int32, device=self.device)
        window = self.window if window is None else window
        return paged_prefill_attention(q, k, v, tables, lens, q_lens, scale, window, ks, vs,
                                       backend=backend, softcap=softcap,
                                       alibi_slopes=alibi_slopes)

    @_locked
    def usage(self):
        """A :class:`CacheUsage`: blocks used, free and cached, bytes, tokens held."""
        bs = self.block_size
        filled = {}
        for seq in self._seqs.values():
            n = max(seq.lens)
            for j, block in enumerate(seq.blocks):
                if block >= 0:
                    filled[block] = max(filled.get(block, 0), min(bs, n - j * bs))
        token_bytes = 2 * self.num_layers * self.num_kv_heads * (
            self.head_dim * self.k_cache.element_size() + (4 if self.k_scale is not None else 0))
        used = len(filled)
        tokens = sum(filled.values())
        return CacheUsage(
            blocks_total=self.num_blocks,
            blocks_used=used,
            blocks_free=self.num_blocks - used,
            blocks_cached=len(self._cached),
            bytes_total=self.num_blocks * bs * token_bytes,
            bytes_used=used * bs * token_bytes,
            tokens=tokens,
            token_bytes=tokens * token_bytes,
            utilization=tokens / (used * bs) if used else 1.0,
        )


@dataclasses.dataclass(eq=False)
class StepPlan:
    """One step of :meth:`PagedKVCache.plan`: what every layer of the step shares, built once.

    Attributes
    ----------
    seq_ids, num_tokens : the step's sequences and their new tokens (N = sum(num_tokens)).
    slot_mapping : int32 [N], block_tables : int32 [B, max_blocks], seq_lens : int32 [B] (after
        the step), cu_seqlens_q : int32 [B + 1]: on the cache's device.
    max_q_len, max_seq_len : host ints (the Triton grid and split plan need no device read).
    decode : every sequence takes one token (decode kernels; otherwise chunked prefill).
    cascade : a :class:`frugal.cascade.CascadeDecode` when the decode reads shared prefixes
        once per group (``cascade.groups``: (batch indices, shared tokens) per group), else
        None (see :meth:`PagedKVCache.plan`).
    alibi_slopes : float32 [B, Hq] (checked, contiguous) or None: the plan's ALiBi slopes.

    Per layer, :meth:`append` writes the step's keys and values, :meth:`attention` attends the
    step's queries to everything written, and :meth:`run` does both. They check shapes, dtypes
    and devices (host metadata), never table contents (built by the manager), and do no host
    sync.

    Example
    -------
    >>> cache = PagedKVCache(2, 64, 16, 2, 64, dtype=torch.float32)
    >>> cache.add_sequence("a"); cache.add_sequence("b")
    0
    0
    >>> step = cache.plan(["a", "b"], num_tokens=[5, 3])         # prefill 5 and 3 tokens
    >>> q, k = torch.randn(8, 4, 64), torch.randn(8, 2, 64)
    >>> [step.run(layer, q, k, k).shape for layer in range(2)]
    [torch.Size([8, 4, 64]), torch.Size([8, 4, 64])]
    >>> step = cache.plan(["a", "b"])                              # then decode one token each
    >>> step.run(0, q[:2], k[:2], k[:2]).shape
    torch.Size([2, 4, 64])
    """

    cache: PagedKVCache
    seqs: tuple
    versions: tuple
    seq_ids: tuple
    num_tokens: tuple
    window: int
    backend: str
    append_impl: object
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    max_seq_len: int
    decode: bool
    cascade: object = None
    alibi_slopes: object = None
    _impls: dict = dataclasses.field(default_factory=dict)
    _workspaces: dict = dataclasses.field(default_factory=dict)

    def _check_layer(self, op, layer):
        for seq, version in zip(self.seqs, self.versions):
            if seq.version != version:
                raise SequenceError(f"{op}: the plan is stale: one of its sequences changed "
                                    f"after it was made (append, plan, fork, free or trim); "
                                    f"plan every step anew")
        if not (is_int(layer) and 0 <= layer < self.cache.num_layers):
            raise ValueError(f"{op}: layer must be an int in [0, {self.cache.num_layers}); got "
                             f"{layer!r}")

    def _rows(self, op, name, x, heads, dtypes):
        """x as [N, heads, D] (from [N, ...] or [B, T, ...] with uniform T), checked."""
        cache = self.cache
        check_dtype(op, name, x, dtypes)
        n, b = sum(self.num_tokens), len(self.num_tokens)
        uniform = len(set(self.num_tokens)) == 1
        if x.dim() == 4 and uniform and x.shape[:2] == (b, self.num_tokens[0]):
            x = x.reshape(n, *x.shape[2:])
        if x.dim() != 3 or x.shape[0] != n or x.shape[2] != cache.head_dim or (
                heads is not None and x.shape[1] != heads):
            want = f"[{n}, {heads if heads is not None else 'H'}, {cache.head_dim}]"
            raise ShapeError(f"{op}: {name} must be {want} (the plan's {n} new tokens)"
                             + (f" or [{b}, {self.num_tokens[0]}, ...]" if uniform else "")
                             + f"; got {tuple(x.shape)}")
        if x.device != cache.device:
            raise DeviceError(f"{op}: {name} must be on the cache's device ({cache.device}); got "
                              f"{x.device}")
        return x

    def append(self, layer, k, v):
        """Writes the step's keys and values of ``layer``: k, v [N, Hkv, D] (or [B, T, Hkv, D])
        in the cache dtype (any float dtype for int8 caches)."""
        op = "StepPlan.append"
        self._check_layer(op, layer)
        cache = self.cache
        dtypes = FLOATS if cache.dtype == torch.int8 else (cache.dtype,)
        k = self._rows(op, "k", k, cache.num_kv_heads, dtypes)
        check_tensor(op, "v", v)
        v = self._rows(op, "v", v, cache.num_kv_heads, (k.dtype,))
        self.append_impl.run(k, v, cache.k_cache[layer], cache.v_cache[layer],
                   self.slot_mapping, *cache._scales(layer))

    def __post_init__(self):
        # Implementations chosen once here, per q dtype the cache takes, not per layer:
        # selection asks the dispatcher which kernels exist, which torch.compile would not
        # trace. What they need depends on q's dtype and the caches only.
        cache = self.cache
        op = PAGED_ATTENTION if self.decode else PAGED_PREFILL
        ks, vs = cache._scales(0)
        for dtype in FLOATS if cache.dtype == torch.int8 else (cache.dtype,):
            q = torch.empty((0, cache.num_kv_heads, cache.head_dim), dtype=dtype, device="meta")
            tables = (cache.k_cache[0], cache.v_cache[0], None, None)  # + block_tables, lens
            args = (q, *tables, 1.0, 0, ks, vs) if self.decode else (
                q, *tables, None, 0, 1.0, 0, ks, vs)
            self._impls[dtype] = op.select(cache.device, self.backend, *args)

    def attention(self, q, layer, scale=None, *, return_lse=False, softcap=None):
        """Attention of the step's queries in ``layer`` over everything written (the step's
        keys included: append first). q [N, Hq, D] (decode: [B, Hq, D]; or [B, T, Hq, D]) in
        the cache dtype (any float dtype over int8 caches); Hq a multiple of num_kv_heads.
        Returns q's shape and dtype; with ``return_lse``, (out, lse float32 of q's shape
        without head_dim). A plan with ``cascade`` reads each group's shared blocks once.
        ``softcap`` (float > 0 or None) and the plan's ``alibi_slopes`` modify the scores
        (:mod:`frugal.score_mods`)."""
        op = "StepPlan.attention"
        self._check_layer(op, layer)
        check_scale(op, scale)
        mods = dict(softcap=check_softcap(op, softcap), alibi_slopes=self.alibi_slopes)
        cache = self.cache
        dtypes = FLOATS if cache.dtype == torch.int8 else (cache.dtype,)
        rows = self._rows(op, "q", q, None, dtypes)
        if rows.shape[1] % cache.num_kv_heads:
            raise ShapeError(f"{op}: q's head count {rows.shape[1]} must be a multiple of the "
                             f"cache's num_kv_heads {cache.num_kv_heads}")
        if self.alibi_slopes is not None and self.alibi_slopes.shape[1] != rows.shape[1]:
            raise ShapeError(f"{op}: the plan's alibi_slopes have {self.alibi_slopes.shape[1]} "
                             f"heads; q has {rows.shape[1]}")
        impl = self._impls[rows.dtype]
        ks, vs = cache._scales(layer)
        kc, vc = cache.k_cache[layer], cache.v_cache[layer]
        scale, window = normalize(rows, scale, self.window)
        # A copy of the plan with a window that cuts into a sequence (a layer with its own
        # window: dataclasses.replace) runs per sequence: the cascade reads everything.
        if self.decode and self.cascade is not None and (
                not self.window or self.max_seq_len <= self.window):
            out, lse = self.cascade.run(
                impl, rows, kc, vc, scale, ks, vs,
                lambda tag, x, tables, max_len: self._workspace(impl.backend, x, tables, max_len,
                                                                tag), **mods)
            result = (out, lse) if return_lse else out
        elif self.decode:
            result = impl.run(rows, kc, vc, self.block_tables, self.seq_lens, scale, window, ks,
                              vs, self.max_seq_len, self._workspace(impl.backend, rows),
                              return_lse=return_lse, **mods)
        else:
            result = impl.run(rows, kc, vc, self.block_tables, self.seq_lens, self.cu_seqlens_q,
                              self.max_q_len, scale, window, ks, vs, return_lse=return_lse,
                              **mods)
        if not return_lse:
            return result.reshape(q.shape)
        out, lse = result
        return out.reshape(q.shape), lse.reshape(q.shape[:-1])

    def _workspace(self, name, q, tables=None, max_seq_len=None, tag=""):
        """The Triton split-KV buffers of a decode of q over ``tables`` (default the plan's),
        allocated by the first layer only."""
        if name != "triton":
            return None
        tables = self.block_tables if tables is None else tables
        max_seq_len = self.max_seq_len if max_seq_len is None else max_seq_len
        key = (tag, *q.shape)
        if key not in self._workspaces:
            from frugal.kernels import paged_attention as kernel

            n_o, n_lse = kernel.workspace_numel(q, self.cache.k_cache[0], tables.shape[1],
                                                self.window, max_seq_len)
            self._workspaces[key] = None if n_o == 0 else (
                torch.empty(n_o, dtype=torch.float32, device=q.device),
                torch.empty(n_lse, dtype=torch.float32, device=q.device))
        return self._workspaces[key]

    def run(self, layer, q, k, v, scale=None, softcap=None):
        """:meth:`append` then :meth:`attention`: one layer of the step."""
        self.append(layer, k, v)
        return self.attention(q, layer, scale, softcap=softcap)
